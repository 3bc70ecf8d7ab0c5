//! Reads the cluster into the policy model's inputs, once for every component: the reflectors
//! on the Kubernetes API ([`reflect`]), YAML manifests read offline ([`manifests`]), and the
//! rules that decide which pods are endpoints at all ([`endpoints`]): hostNetwork pods, pods
//! using a node's address, finished pods, pods without an IP, mirror pods, pods without a
//! service account, pods whose IP lies outside their node's pod CIDRs and pods whose IP another
//! pod claims too never are (a claimed-twice address is an isolated non-identity).
//!
//! The agent, the operator, the webhook and the CLI use this crate; none keeps its own copy of
//! these rules. It must not write to the API server and must not decide policy (that is
//! `meshauth-policy`).

pub mod endpoints;
pub mod manifests;
pub mod reflect;
pub mod snapshot;

pub use endpoints::{EndpointRules, NotEndpoint, SharedAddress};
pub use snapshot::{NodeInfo, Snapshot};
