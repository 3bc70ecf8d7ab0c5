//! The meshauth policy model: from Namespaces, Pods, MeshPolicies and MutualAuths it decides,
//! for a source and a destination pod, port and protocol, whether traffic is allowed and how
//! strongly it must be authenticated (MISSION.md §3), and compiles the same state into the flat
//! tables the datapath loads ([`tables`]), so that the kernel and this model cannot disagree.
//!
//! Every other crate (datapath, agent, operator, webhook, CLI) uses this one; none keeps a copy
//! of these rules. It must not do I/O: no API server, no files, no maps.

pub mod compile;
pub mod model;
pub mod tables;
pub mod validate;
