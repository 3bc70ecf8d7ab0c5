//! The agent-memory bench, small: a real agent on the real API server holding a node with its
//! pods and adopted pairs, then pods created on the node and deleted again in batches. Every
//! batch reaches the agent and leaves it again, and nothing is left behind (endpoints, pairs,
//! the pods it lists); the memory figures are the bench's
//! (`cargo bench -p meshauthctl --bench agent_memory`), not asserted here. Root.

#[path = "support/agent_load.rs"]
#[allow(dead_code)] // the handshake log reader and CPU time are the other tests'
mod agent_load;
#[path = "support/agent_memory.rs"]
mod agent_memory;
#[path = "support/api_box.rs"]
mod api_box;

use std::time::Duration;

#[test]
fn pods_churned_on_a_node_come_and_go_and_leave_nothing_behind() {
    meshauth_datapath::netns::require_root();
    let scale = agent_memory::MemoryScale {
        local_pods: 40,
        local_identities: 8,
        remote_identities: 10,
        churn_pods: 60,
        churn_batch: 20,
        // A correctness bound, far above any latency worth reporting.
        change_timeout: Duration::from_secs(30),
    };
    // run() fails naming the batch the agent did not take in or let go.
    let report = agent_memory::run(&scale).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", agent_memory::table(&report));
    assert_eq!(report.after_batches.len(), 3, "every batch came and went");
    assert_eq!(report.auth_entries, 80, "the agent adopted the pairs written before it started");
    for (what, found, expected) in &report.checks {
        assert_eq!(found, expected, "{what}");
    }
}
