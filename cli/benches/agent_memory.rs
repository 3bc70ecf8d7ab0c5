//! `cargo build --release -p meshauth-agent && cargo bench -p meshauthctl --bench agent_memory
//! [-- --churn N] [-- --json]` (root): a real agent's resident memory on a node with 1,000
//! pods and 10,000 authenticated pairs against the same agent on an empty cluster, its peak,
//! and its RSS over N pod creations and deletions on the node (default 5,000). See
//! `tests/support/agent_memory.rs` for what is measured and how.

#[path = "../tests/support/agent_load.rs"]
#[allow(dead_code)] // the handshake log reader and CPU time are the other tests'
mod agent_load;
#[path = "../tests/support/agent_memory.rs"]
mod agent_memory;
#[path = "../tests/support/api_box.rs"]
mod api_box;

use agent_memory::{MemoryReport, MemoryScale};

fn json(r: &MemoryReport) -> serde_json::Value {
    serde_json::json!({
        "local_pods": r.scale.local_pods,
        "auth_entries": r.auth_entries,
        "baseline_rss_bytes": r.baseline.total,
        "steady": {"rss_bytes": r.steady.total, "anon_bytes": r.steady.anon, "file_bytes": r.steady.file},
        "ratio_to_baseline": r.steady.total as f64 / r.baseline.total.max(1) as f64,
        "peak_rss_bytes": r.peak,
        "churned_pods": r.after_batches.len() * r.scale.churn_batch,
        "rss_after_each_batch": r.after_batches,
        "after_churn_rss_bytes": r.after_churn.total,
        "churn_drift": r.churn_drift(),
        "goals": {"steady_mib": 30, "peak_over_steady": 1.2, "churn_deviation": 0.05},
    })
}

fn main() -> std::process::ExitCode {
    meshauth_datapath::netns::require_root();
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<usize>().ok());
    let scale = MemoryScale {
        local_pods: 1000,
        local_identities: 100,
        remote_identities: 100,
        churn_pods: value("--churn").unwrap_or(5000),
        churn_batch: 50,
        change_timeout: std::time::Duration::from_secs(60),
    };
    match agent_memory::run(&scale) {
        Ok(report) => {
            if args.iter().any(|a| a == "--json") {
                println!("{}", json(&report));
            } else {
                print!("{}", agent_memory::table(&report));
            }
            if report.checks.iter().any(|(_, found, expected)| found != expected) {
                eprintln!("agent_memory: something was left behind (see the checks)");
                return std::process::ExitCode::FAILURE;
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("agent_memory: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
