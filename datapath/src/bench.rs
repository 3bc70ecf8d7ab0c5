//! `meshauthctl bench datapath`: nanoseconds per packet of `to_pod` on each decision path,
//! measured in the kernel with `BPF_PROG_TEST_RUN`, next to an empty TC program measured in
//! the same run (the baseline), at 10 and at 500,000 entries in the auth map.
//!
//! A new connection's SYN from another node has rows of its own: its tag verified, and no tag.
//! The local proof and the uplink's tagger cannot be timed here: `BPF_PROG_TEST_RUN` gives
//! every packet a socket, and a SYN with a socket is one the node itself sent, which neither
//! admits as a pod's. Those are timed on real packets between namespaces (`live`, the
//! `new_connections` rows), against an empty program on the same hook.
//!
//! It loads its own datapath in a private pin directory (never the node's maps), fills it,
//! and removes it afterwards. Every path is checked once (verdict and counter) before it is
//! timed, so each number is the cost of the path it is named after.

use std::path::PathBuf;
use std::time::Duration;

use aya::Ebpf;
use aya::programs::SchedClassifier;
use meshauth_policy::tables::{ANY_IDENTITY, AuthRequirement, CompiledTables, EndpointEntry, PolicyEntry, TableProtocol};
use serde::Serialize;

use crate::abi::Counter;
use crate::clock::BootTime;
use crate::config::DatapathConfig;
use crate::loader::{self, Datapath, DatapathError, Hook};
use crate::packet::{self, TCP_ACK, TCP_SYN};

#[cfg(feature = "netns")]
mod live;
#[cfg(feature = "netns")]
pub use live::LivePathResult;

static EMPTY_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/empty.bpf.o"));

/// The auth-map sizes every path is measured at.
pub const ENTRY_COUNTS: [u32; 2] = [10, 500_000];

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Program runs per measurement (the kernel averages over them).
    pub repeat: u32,
    /// Measurements per path; the median is reported.
    pub rounds: u32,
    /// Private pin directory, removed afterwards.
    pub pin_dir: PathBuf,
    /// New connections per path timed on real packets (the `new_connections` rows).
    pub connections: u32,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            repeat: 200_000,
            rounds: 9,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/meshauth-bench-{}", std::process::id())),
            connections: 5000,
        }
    }
}

/// The report; its JSON is the documented shape.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    pub baseline_ns: f64,
    pub paths: Vec<PathResult>,
    /// A new connection's SYN on the paths `BPF_PROG_TEST_RUN` cannot time, on real packets.
    #[cfg(feature = "netns")]
    pub new_connections: Vec<LivePathResult>,
}

/// One path at one auth-map size.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PathResult {
    pub path: &'static str,
    pub entries: u32,
    pub ns_per_packet: f64,
}

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("loading the empty baseline program: {0}")]
    Baseline(String),
    #[error("path {path} is not what it claims: expected {expected}, the program {got}")]
    WrongPath { path: &'static str, expected: String, got: String },
}

/// A path: a packet and what the program must do with it.
struct Path {
    name: &'static str,
    packet: Vec<u8>,
    passes: bool,
    counter: Counter,
}

const IP_NO_POLICY: [u8; 4] = [10, 0, 0, 1];
const IP_DST: [u8; 4] = [10, 0, 0, 2];
const IP_SRC_AUTH: [u8; 4] = [10, 0, 1, 1];
const IP_SRC_NOAUTH: [u8; 4] = [10, 0, 1, 2];
const IP_SRC_DENIED: [u8; 4] = [10, 0, 1, 3];
const IP_SRC_CT: [u8; 4] = [10, 0, 1, 4];
const DST_SPIFFE: u32 = 2;
const SRC_AUTH_SPIFFE: u32 = 10;
/// The node of the benchmark's other pods.
const BENCH_NODE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 1);
const BENCH_KEY: crate::loader::ConnectionKey = crate::loader::ConnectionKey([0x1111_2222_3333_4444, 0x5555_6666_7777_8888]);

fn endpoint(ip: [u8; 4], identity: u32, spiffe_id: u32, isolated: bool) -> EndpointEntry {
    EndpointEntry {
        ip: ip.into(),
        security_identity: identity,
        spiffe_id,
        isolated,
        audit: false,
        mutual_auth: AuthRequirement::None,
        pod: format!("bench/{identity}"),
        node: None,
        // The benchmark's local pod is this node's (its interface is registered); the others
        // are another node's.
        node_address: Some(BENCH_NODE),
    }
}

fn rule(src: u32, protocol: TableProtocol, ports: (u16, u16), auth: AuthRequirement) -> PolicyEntry {
    PolicyEntry { dst_identity: 301, src_identity: src, protocol, port_start: ports.0, port_end: ports.1, auth }
}

fn tables() -> CompiledTables {
    CompiledTables {
        endpoints: vec![
            endpoint(IP_NO_POLICY, 300, 1, false),
            endpoint(IP_DST, 301, DST_SPIFFE, true),
            endpoint(IP_SRC_AUTH, 400, SRC_AUTH_SPIFFE, false),
            endpoint(IP_SRC_NOAUTH, 401, 11, false),
            endpoint(IP_SRC_DENIED, 402, 12, false),
            endpoint(IP_SRC_CT, 403, 13, false),
        ],
        policy: vec![
            rule(400, TableProtocol::Tcp, (8080, 8080), AuthRequirement::Required),
            rule(401, TableProtocol::Tcp, (8080, 8080), AuthRequirement::Required),
            rule(403, TableProtocol::Tcp, (8080, 8080), AuthRequirement::None),
            // A few more entries so the trie has the shape of a real one.
            rule(ANY_IDENTITY, TableProtocol::Tcp, (9000, 9999), AuthRequirement::None),
            rule(400, TableProtocol::Udp, (1, 1023), AuthRequirement::None),
            rule(402, TableProtocol::Tcp, (10000, 10100), AuthRequirement::None),
        ],
        spiffe_ids: Vec::new(),
        security_identities: Vec::new(),
    }
}

fn paths() -> Vec<Path> {
    // Mid-stream segments (ACK): they take the full check every time, where a SYN would be
    // cached in conntrack after the first run.
    let ack = |src: [u8; 4], dst: [u8; 4]| packet::tcp(src.into(), dst.into(), 40000, 8080, TCP_ACK);
    vec![
        Path { name: "no-policy", packet: ack(IP_SRC_AUTH, IP_NO_POLICY), passes: true, counter: Counter::PassNoPolicy },
        Path { name: "conntrack-hit", packet: ack(IP_SRC_CT, IP_DST), passes: true, counter: Counter::PassCtEstablished },
        Path { name: "auth-present", packet: ack(IP_SRC_AUTH, IP_DST), passes: true, counter: Counter::PassAuthenticated },
        Path { name: "auth-missing", packet: ack(IP_SRC_NOAUTH, IP_DST), passes: false, counter: Counter::DropAuthMissing },
        Path { name: "denied", packet: ack(IP_SRC_DENIED, IP_DST), passes: false, counter: Counter::DropDenied },
        Path { name: "syn-tag-verified", packet: tagged_syn(), passes: true, counter: Counter::PassAuthenticated },
        Path {
            name: "syn-untagged-dropped",
            packet: packet::tcp_syn(IP_SRC_AUTH.into(), IP_DST.into(), 40001, 8080, 7, &packet::LINUX_SYN_OPTIONS),
            passes: false,
            counter: Counter::DropTagMissing,
        },
    ]
}

/// A Linux SYN from another node's pod with its tag, as the destination sees it. Its own
/// source port: the conntrack entry it leaves must not turn the ACK paths into hits.
fn tagged_syn() -> Vec<u8> {
    let mut options = packet::LINUX_SYN_OPTIONS.to_vec();
    options.extend_from_slice(&crate::abi::tag_option(
        BENCH_KEY.0,
        IP_SRC_AUTH.into(),
        IP_DST.into(),
        40010,
        8080,
        7,
        crate::abi::tag_slot_now(),
    ));
    packet::tcp_syn(IP_SRC_AUTH.into(), IP_DST.into(), 40010, 8080, 7, &options)
}

/// Removes the private pin directory however the benchmark ends.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2] as f64,
        n => (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0,
    }
}

/// Runs the benchmark (root; loads BPF programs).
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let _cleanup = Cleanup(opts.pin_dir.clone());
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&opts.pin_dir))?;
    dp.apply_tables(&tables())?;
    let day = BootTime::after(Duration::from_secs(24 * 3600));
    dp.set_auth_keyed(DST_SPIFFE, SRC_AUTH_SPIFFE, crate::NodeId::At(BENCH_NODE), day, BENCH_KEY)?;
    // The conntrack-hit flow starts with a SYN, as a real one does.
    let syn = packet::tcp(IP_SRC_CT.into(), IP_DST.into(), 40000, 8080, TCP_SYN);
    dp.test_run(Hook::ToPod, &syn, 1)?;

    let mut ebpf = Ebpf::load(EMPTY_OBJECT).map_err(|e| BenchError::Baseline(e.to_string()))?;
    let empty: &mut SchedClassifier = ebpf
        .program_mut("empty")
        .ok_or_else(|| BenchError::Baseline("no program named empty".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| BenchError::Baseline(e.to_string()))?;
    empty.load().map_err(|e| BenchError::Baseline(e.to_string()))?;

    let paths = paths();
    for p in &paths {
        check_path(&dp, p)?;
    }
    let mut baseline = Vec::new();
    let mut results = Vec::new();
    let mut filled = 1u32; // the authenticated pair
    for entries in ENTRY_COUNTS {
        // Other pairs, as a busy node would hold: distinct destinations and sources, none
        // of them the measured ones.
        let expiry = BootTime::after(Duration::from_secs(24 * 3600));
        while filled < entries {
            dp.set_auth(1_000_000 + filled / 1024, 2_000_000 + filled, crate::NodeId::This, expiry)?;
            filled += 1;
        }
        let mut samples: Vec<Vec<u64>> = vec![Vec::new(); paths.len()];
        for _ in 0..opts.rounds {
            // Interleaved, so drifts (frequency, other load) hit every path alike.
            baseline.push(loader::test_run(empty, "empty", &paths[0].packet, opts.repeat)?.ns_per_run);
            for (i, p) in paths.iter().enumerate() {
                samples[i].push(dp.test_run(Hook::ToPod, &p.packet, opts.repeat)?.ns_per_run);
            }
        }
        for (p, s) in paths.iter().zip(samples) {
            results.push(PathResult { path: p.name, entries, ns_per_packet: median(s) });
        }
    }
    dp.uninstall()?;
    Ok(BenchReport {
        baseline_ns: median(baseline),
        paths: results,
        #[cfg(feature = "netns")]
        new_connections: live::run(opts.connections)?,
    })
}

/// Runs a path once and checks the verdict and the counter it moved.
fn check_path(dp: &Datapath, p: &Path) -> Result<(), BenchError> {
    let before = dp.counters()?;
    let out = dp.test_run(Hook::ToPod, &p.packet, 1)?;
    let after = dp.counters()?;
    if out.passed() != p.passes {
        return Err(BenchError::WrongPath {
            path: p.name,
            expected: if p.passes { "pass".into() } else { "drop".into() },
            got: format!("returned {}", out.retval),
        });
    }
    if after.packets(p.counter) != before.packets(p.counter) + 1 {
        return Err(BenchError::WrongPath {
            path: p.name,
            expected: format!("counter {}", p.counter.name()),
            got: format!("counted {:?}", after.0.iter().filter(|(k, v)| before.0.get(*k) != Some(*v)).map(|(k, _)| *k).collect::<Vec<_>>()),
        });
    }
    Ok(())
}
