//! `cargo bench -p meshauth-agent --bench handshake [-- SECONDS [CONCURRENCY [SAMPLES]]]`:
//! meshauth's mutual handshake beside a plain rustls TLS 1.3 mutual handshake, one core.

mod bench;

use std::time::Duration;

use bench::{BenchOptions, run_handshake_bench};

fn main() -> std::process::ExitCode {
    // `cargo bench` passes `--bench`; positional numbers are ours.
    let numbers: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let mut options = BenchOptions::default();
    if let Some(secs) = numbers.first() {
        options.duration = Duration::from_secs(*secs);
    }
    if let Some(concurrency) = numbers.get(1) {
        options.concurrency = usize::try_from(*concurrency).unwrap_or(16);
    }
    if let Some(samples) = numbers.get(2) {
        options.latency_samples = usize::try_from(*samples).unwrap_or(2000);
    }
    match run_handshake_bench(options) {
        Ok(report) => {
            println!("{report}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("handshake bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
