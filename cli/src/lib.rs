//! `meshauthctl`, the user's tool: offline policy checks, SVID verification, the node's maps and
//! agent state, benchmarks and the demo. Each subcommand lives in its own module (or in the
//! crate it drives) and returns a typed error; `main.rs` only parses arguments, dispatches and
//! turns errors into exit codes (2 for bad input, 1 for a failed verification or demo check).
//!
//! It must not hold policy logic of its own: decisions come from `meshauth-policy`.

pub mod datapath;
pub mod demo;
pub mod explain;
pub mod observe;
pub mod policy_check;
pub mod svid_verify;
