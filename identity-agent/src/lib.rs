//! `meshauth-agent`, the per-node daemon: obtains the X.509 SVIDs of the identities of its
//! node's pods from SPIRE's Workload API, proves pod pairs with mutual TLS handshakes against
//! the peer node's agent, and keeps the datapath's maps true (endpoints and policy from the
//! policy model, the auth map from handshakes).
//!
//! It must not decide policy itself (that is `meshauth-policy`) nor write to the API server.

pub mod auth_manager;
pub mod cni_install;
pub mod config;
pub mod dev_issuer;
pub mod explain;
pub mod flows;
pub mod handshake;
pub mod heap;
pub mod inputs;
pub mod metrics;
pub mod node_agent;
pub mod numbering;
pub mod plan;
pub mod pod_net;
pub mod status_port;
pub mod svid;
pub mod tls;
pub mod verify;
