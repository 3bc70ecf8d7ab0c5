//! `meshauthctl auth list`, `status` and `bench datapath`: this node's datapath as a user reads
//! it. The datapath library returns the maps and the benchmark's figures; this prints them as a
//! table or JSON, to the writer it is given.

use std::io::{self, Write};
use std::path::Path;

use serde::Serialize;
use serde_json::json;

use meshauth_datapath::bench::{self, BenchError, BenchOptions, BenchReport};
use meshauth_datapath::config::DEFAULT_PIN_DIR;
use meshauth_datapath::loader::{DatapathError, Maps, PROGRAM_VERSION};
use meshauth_datapath::{BootTime, Counter};

/// Table for people, JSON for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

/// A subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading the pinned datapath maps under {pin_dir} (is the agent running on this node, and are you root?): {source}")]
    Maps { pin_dir: String, source: Box<DatapathError> },
    #[error(transparent)]
    Bench(#[from] Box<BenchError>),
    #[error("writing output: {0}")]
    Write(#[from] io::Error),
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The default pin directory, for the CLI's `--pin-dir` default.
pub fn default_pin_dir() -> &'static Path {
    Path::new(DEFAULT_PIN_DIR)
}

fn open(pin_dir: &Path) -> Result<Maps, CliError> {
    Maps::open(pin_dir).map_err(maps_err(pin_dir))
}

fn maps_err(pin_dir: &Path) -> impl Fn(DatapathError) -> CliError + '_ {
    move |source| CliError::Maps { pin_dir: pin_dir.display().to_string(), source: Box::new(source) }
}

#[derive(Serialize)]
struct PairOut {
    dst_spiffe_id: u32,
    dst: Option<String>,
    src_spiffe_id: u32,
    src: Option<String>,
    /// The node whose agent proved the pair for its pods of the source: "this" or its address.
    src_node: String,
    expiry_boottime_ns: u64,
    /// `null` once expired.
    remaining_seconds: Option<f64>,
}

/// `meshauthctl auth list`: the authenticated pairs and their remaining lifetime.
pub fn auth_list(pin_dir: &Path, format: OutputFormat, out: &mut dyn Write) -> Result<(), CliError> {
    let maps = open(pin_dir)?;
    let names = maps.spiffe_names().map_err(maps_err(pin_dir))?;
    let pairs: Vec<PairOut> = maps
        .auth_entries()
        .map_err(maps_err(pin_dir))?
        .into_iter()
        .map(|e| PairOut {
            dst_spiffe_id: e.dst_spiffe_id,
            dst: names.get(&e.dst_spiffe_id).cloned(),
            src_spiffe_id: e.src_spiffe_id,
            src: names.get(&e.src_spiffe_id).cloned(),
            src_node: e.src_node.to_string(),
            expiry_boottime_ns: e.expiry.0,
            remaining_seconds: e.expiry.remaining().map(|d| d.as_secs_f64()),
        })
        .collect();
    match format {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &json!({ "pairs": pairs }))?;
            writeln!(out)?;
        }
        OutputFormat::Table => {
            let name = |n: u32, s: &Option<String>| s.clone().unwrap_or_else(|| format!("#{n}"));
            let rows: Vec<[String; 4]> = pairs
                .iter()
                .map(|p| {
                    [
                        name(p.dst_spiffe_id, &p.dst),
                        name(p.src_spiffe_id, &p.src),
                        p.src_node.clone(),
                        p.remaining_seconds.map_or("expired".into(), human_seconds),
                    ]
                })
                .collect();
            table(out, ["DESTINATION", "SOURCE", "SOURCE NODE", "EXPIRES IN"], &rows)?;
            writeln!(out, "{} pair(s)", pairs.len())?;
        }
    }
    Ok(())
}

/// `meshauthctl status`: programs, interfaces, endpoints, map occupancy and counters.
pub fn status(pin_dir: &Path, format: OutputFormat, out: &mut dyn Write) -> Result<(), CliError> {
    let maps = open(pin_dir)?;
    let e = maps_err(pin_dir);
    let names = maps.spiffe_names().map_err(&e)?;
    let endpoints = maps.endpoints().map_err(&e)?;
    let interfaces = maps.interfaces().map_err(&e)?;
    let counters = maps.counters().map_err(&e)?;
    let auth = maps.auth_entries().map_err(&e)?;
    let now = BootTime::now();
    let expired = auth.iter().filter(|a| a.expiry <= now).count();
    let conntrack = maps.conntrack_entries().map_err(&e)?;
    let rc = maps.runtime_config().map_err(&e)?;
    let programs: Vec<String> = std::fs::read_dir(pin_dir.join("programs"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    match format {
        OutputFormat::Json => {
            let endpoints: Vec<_> = endpoints
                .iter()
                .map(|ep| {
                    json!({
                        "ip": ep.ip, "security_identity": ep.security_identity, "spiffe_id": ep.spiffe_id,
                        "spiffe": names.get(&ep.spiffe_id), "ifindex": ep.ifindex, "isolated": ep.isolated,
                        "mutual_auth": ep.mutual_auth,
                    })
                })
                .collect();
            let v = json!({
                "pin_dir": pin_dir,
                "loader_version": PROGRAM_VERSION,
                "pinned_programs": programs,
                "policy_epoch": rc.policy_epoch,
                "ipv6": if rc.ipv6_mode == meshauth_datapath::abi::IPV6_PASS { "pass" } else { "drop" },
                "interfaces": interfaces,
                "endpoints": endpoints,
                "maps": { "auth_entries": auth.len(), "auth_expired": expired, "conntrack_entries": conntrack, "endpoints": endpoints.len() },
                "counters": counters.0,
            });
            serde_json::to_writer_pretty(&mut *out, &v)?;
            writeln!(out)?;
        }
        OutputFormat::Table => {
            writeln!(out, "pin dir:        {}", pin_dir.display())?;
            writeln!(out, "programs:       {} (this tool: {PROGRAM_VERSION})", programs.join(", "))?;
            writeln!(out, "policy epoch:   {}", rc.policy_epoch)?;
            writeln!(out, "auth pairs:     {} ({expired} expired)", auth.len())?;
            writeln!(out, "conntrack:      {conntrack} entries")?;
            writeln!(out, "\nINTERFACES")?;
            let rows: Vec<[String; 4]> = interfaces
                .iter()
                .map(|i| [i.name.clone().unwrap_or_else(|| "(gone)".into()), i.ifindex.to_string(), i.pod_ip.to_string(), i.attach.into()])
                .collect();
            table(out, ["NAME", "IFINDEX", "POD IP", "HOOK"], &rows)?;
            writeln!(out, "\nENDPOINTS")?;
            let rows: Vec<[String; 5]> = endpoints
                .iter()
                .map(|ep| {
                    [
                        ep.ip.to_string(),
                        ep.security_identity.to_string(),
                        names.get(&ep.spiffe_id).cloned().unwrap_or_else(|| format!("#{}", ep.spiffe_id)),
                        if ep.isolated { "yes" } else { "no" }.into(),
                        format!("{:?}", ep.mutual_auth).to_lowercase(),
                    ]
                })
                .collect();
            table(out, ["IP", "IDENTITY", "SPIFFE ID", "ISOLATED", "MUTUAL AUTH"], &rows)?;
            writeln!(out, "\nCOUNTERS")?;
            let rows: Vec<[String; 3]> = Counter::ALL
                .iter()
                .map(|c| {
                    let v = counters.0.get(c.name()).copied().unwrap_or_default();
                    [c.name().to_string(), v.packets.to_string(), v.bytes.to_string()]
                })
                .collect();
            table(out, ["COUNTER", "PACKETS", "BYTES"], &rows)?;
        }
    }
    Ok(())
}

/// `meshauthctl bench datapath`.
pub fn bench_datapath(opts: &BenchOptions, format: OutputFormat, out: &mut dyn Write) -> Result<BenchReport, CliError> {
    let report = bench::run(opts).map_err(Box::new)?;
    match format {
        OutputFormat::Json => {
            serde_json::to_writer(&mut *out, &report)?;
            writeln!(out)?;
        }
        OutputFormat::Table => {
            writeln!(out, "BPF_PROG_TEST_RUN, {} runs x {} rounds (median)", opts.repeat, opts.rounds)?;
            writeln!(out, "baseline (empty TC program): {:.1} ns/packet", report.baseline_ns)?;
            let rows: Vec<[String; 4]> = report
                .paths
                .iter()
                .map(|p| {
                    let base = report.baseline_ns;
                    [p.path.into(), p.entries.to_string(), format!("{:.1}", p.ns_per_packet), format!("{:+.1}", p.ns_per_packet - base)]
                })
                .collect();
            table(out, ["PATH", "AUTH ENTRIES", "NS/PACKET", "OVER BASELINE"], &rows)?;
            {
                writeln!(
                    out,
                    "\nnew connections on real packets, {} SYNs per path (kernel BPF run-time statistics; baseline: an empty program on the same hook, same packets)",
                    opts.connections
                )?;
                let rows: Vec<[String; 5]> = report
                    .new_connections
                    .iter()
                    .map(|p| {
                        [
                            p.path.into(),
                            p.program.into(),
                            format!("{:.1}", p.ns_per_packet),
                            format!("{:.1}", p.baseline_ns_per_packet),
                            format!("{:+.1}", p.ns_per_packet - p.baseline_ns_per_packet),
                        ]
                    })
                    .collect();
                table(out, ["PATH", "PROGRAM", "NS/PACKET", "BASELINE", "OVER BASELINE"], &rows)?;
            }
        }
    }
    Ok(report)
}

fn human_seconds(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn table<const N: usize>(out: &mut dyn Write, header: [&str; N], rows: &[[String; N]]) -> io::Result<()> {
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |out: &mut dyn Write, cells: Vec<&str>| -> io::Result<()> {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, header.to_vec())?;
    for r in rows {
        line(out, r.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut out = Vec::new();
        table(&mut out, ["A", "LONGER"], &[["xyz".into(), "1".into()]]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "A    LONGER\nxyz  1\n");
        assert_eq!(human_seconds(3700.0), "1h1m");
    }
}
