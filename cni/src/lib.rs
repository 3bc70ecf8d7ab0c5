//! `meshauth-cni`, a CNI chaining plugin (spec 1.0/1.1: ADD, DEL, CHECK, STATUS, VERSION), and
//! the protocol it speaks with the node's meshauth agent over a local Unix socket.
//!
//! The plugin runs last in the node's conflist. ADD hands the agent the pod's network namespace
//! (as a file descriptor, so the agent never resolves a path in another mount namespace), the
//! interface name and the addresses the earlier plugins gave the pod, and returns only once the
//! agent has attached the datapath to the pod's veth: the pod's first packet is enforced. An
//! unreachable agent fails ADD (fail closed; the kubelet retries). DEL tells the agent the pod's
//! interface is going. The plugin must not touch interfaces, maps or routes itself: the agent
//! verifies and does everything, so there is one implementation of the rules.

pub mod plugin;
pub mod protocol;

pub use protocol::{AgentRequest, AgentResponse, Command, ProtocolError};
