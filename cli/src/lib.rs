//! `meshauthctl`, the user's tool: offline policy checks, SVID verification, the node's maps and
//! agent state, benchmarks and the demo. Each subcommand lives in its own module and returns a
//! typed error that carries its exit code; `main.rs` only parses arguments and dispatches.
//!
//! It must not hold policy logic of its own: decisions come from `meshauth-policy`.

pub mod bench_agent;
pub mod demo;
pub mod policy_check;
