//! `cargo build --release -p meshauth-agent && cargo bench -p meshauthctl --bench propagation
//! [-- --quick] [-- --json] [-- --namespaces N --changes N]` (root): how fast a MeshPolicy or
//! pod change reaches every node's maps at cluster size, beside the API server's own write latency in the same run, quiet and
//! under 50 pod creations and deletions a second; and an idle agent's CPU. See
//! `tests/support/propagation.rs` for what is measured and how.

#[path = "../tests/support/agent_load.rs"]
#[allow(dead_code)] // the handshake log reader is the end-to-end tests'
mod agent_load;
#[path = "../tests/support/api_box.rs"]
mod api_box;
#[path = "../tests/support/propagation.rs"]
mod propagation;

use propagation::{Report, Scale, Series, percentiles};

fn series_json(s: &Series) -> serde_json::Value {
    let (p50, p99, max) = percentiles(&s.all_nodes_ms);
    let (a50, a99, amax) = percentiles(&s.api_write_ms);
    serde_json::json!({
        "changes": s.all_nodes_ms.len(),
        "all_nodes_ms": {"p50": p50, "p99": p99, "max": max},
        "api_write_ms": {"p50": a50, "p99": a99, "max": amax},
    })
}

fn json(r: &Report) -> serde_json::Value {
    let round = |x: &propagation::Round| {
        serde_json::json!({
            "meshpolicy_created": series_json(&x.policy_created),
            "meshpolicy_changed": series_json(&x.policy_changed),
            "pod_created": series_json(&x.pod_created),
            "pod_deleted": series_json(&x.pod_deleted),
        })
    };
    serde_json::json!({
        "nodes": r.scale.nodes,
        "pods": r.scale.namespaces * r.scale.pods_per_namespace,
        "namespaces": r.scale.namespaces,
        "meshpolicies": r.scale.policies.min(r.scale.namespaces),
        "initial_sync_s": r.initial_sync.as_secs_f64(),
        "quiet": round(&r.quiet),
        "under_churn": round(&r.under_churn),
        "churned_pods": r.churned_pods,
        "idle_cpu_percent": r.idle_cpu_percent,
        "goals": {"meshpolicy_p99_ms": 300, "pod_deleted_p99_ms": 200},
    })
}

fn main() -> std::process::ExitCode {
    meshauth_datapath::netns::require_root();
    let args: Vec<String> = std::env::args().collect();
    let timeout = std::time::Duration::from_secs(120);
    let mut scale = if args.iter().any(|a| a == "--quick") {
        Scale { nodes: 4, namespaces: 50, pods_per_namespace: 10, policies: 50, changes: 20, churn_per_second: 20, change_timeout: timeout }
    } else {
        Scale {
            nodes: 10,
            namespaces: 500,
            pods_per_namespace: 10,
            policies: 500,
            changes: 50,
            churn_per_second: 50,
            change_timeout: timeout,
        }
    };
    // `--namespaces N` and `--changes N` scale a run down (or up) from the chosen size.
    let number = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<usize>().ok());
    if let Some(n) = number("--namespaces") {
        scale.namespaces = n;
        scale.policies = n;
    }
    if let Some(n) = number("--changes") {
        scale.changes = n;
    }
    match propagation::run(&scale) {
        Ok(report) if args.iter().any(|a| a == "--json") => {
            println!("{}", json(&report));
            std::process::ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{}", propagation::table(&report));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench propagation: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
