//! A real agent process from outside: which binary the tests run, the handshakes it answered
//! for one pair (its debug log), the CPU time it used (`/proc`) and its `/metrics` in a box. Shared by the end-to-end
//! tests and the propagation bench.

use std::path::PathBuf;
use std::time::Duration;

/// The `meshauth-agent` beside this build's `meshauthctl` (`MESHAUTH_AGENT_BIN` overrides it).
pub fn agent_bin() -> PathBuf {
    std::env::var_os("MESHAUTH_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshauthctl")).with_file_name("meshauth-agent"))
}

/// Handshakes an agent answered (server side) for the pair (`local` presented by it, `peer`
/// proven to it) in the part of its log after `from` bytes.
pub fn answered(log: &str, from: usize, local: &str, peer: &str) -> usize {
    let (local, peer) = (format!("local={local}"), format!("peer={peer}"));
    log.get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("handshake answered") && l.contains(&local) && l.contains(&peer))
        .count()
}

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: state is the first, utime and stime the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split_whitespace().collect();
    let used: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    Duration::from_millis(used * 1000 / ticks)
}

/// The `/metrics` page of a box node's agent, which listens on the node namespace's loopback.
pub fn box_metrics(node: &meshauthctl::demo::mesh::BoxNode) -> std::io::Result<String> {
    use std::io::{Read, Write};
    node.ns
        .run(|| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", node.metrics_port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })
        .and_then(|r| r)
}
