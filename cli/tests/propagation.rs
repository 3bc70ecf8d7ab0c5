//! The propagation bench, small: three node agents on the real API server, MeshPolicies
//! created and changed, pods created and deleted, quiet and under background churn. Every
//! change reaches every node's maps and nothing is left behind; timings are the bench's
//! (`cargo bench -p meshauthctl --bench propagation`), not asserted here. Root.

#[path = "support/agent_load.rs"]
#[allow(dead_code)] // the handshake log reader is the end-to-end tests'
mod agent_load;
#[path = "support/api_box.rs"]
mod api_box;
#[path = "support/propagation.rs"]
mod propagation;

use std::time::Duration;

use propagation::Scale;

#[test]
fn every_change_reaches_every_node_and_nothing_is_left_behind() {
    meshauth_datapath::netns::require_root();
    let scale = Scale {
        nodes: 3,
        namespaces: 12,
        pods_per_namespace: 6,
        policies: 12,
        changes: 6,
        churn_per_second: 10,
        // A correctness bound, far above any latency worth reporting.
        change_timeout: Duration::from_secs(20),
    };
    // run() fails naming the change and the nodes it did not reach, or a stray endpoint.
    let report = propagation::run(&scale).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}", propagation::table(&report));
    for round in [&report.quiet, &report.under_churn] {
        for series in [&round.policy_created, &round.policy_changed, &round.pod_created, &round.pod_deleted] {
            assert_eq!(series.all_nodes_ms.len(), scale.changes, "a change was not measured");
        }
    }
    assert!(report.churned_pods > 0, "the background churn made no pod");
    for (listed, expected) in &report.final_endpoints {
        assert_eq!(listed, expected, "a node's endpoints at the end");
    }
}
