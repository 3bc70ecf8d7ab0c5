//! `meshauthctl bench datapath` without the CLI: `cargo run --release -p meshauth-datapath
//! --example bench_datapath [-- --output json]` (root).

use meshauth_datapath::bench::BenchOptions;
use meshauth_datapath::cli::{OutputFormat, bench_datapath};

fn main() {
    let json = std::env::args().any(|a| a == "json" || a == "--json");
    let format = if json { OutputFormat::Json } else { OutputFormat::Table };
    if let Err(e) = bench_datapath(&BenchOptions::default(), format, &mut std::io::stdout()) {
        eprintln!("bench datapath: {e}");
        std::process::exit(1);
    }
}
