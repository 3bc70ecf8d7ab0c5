//! `cargo build --release -p meshauth-agent && cargo bench -p meshauthctl --bench handshake_scale
//! [-- --quick]` (root): handshakes at node scale between two real agents, each in its own node
//! network namespace (the demo's box, manifests as the cluster, SVIDs from the development
//! issuer, the real datapath's auth map read from its pins):
//!
//! 1. Scale-up: a node gains 10 destination identities at once, each admitting 100 source
//!    identities of the other node with authentication: 1,000 pairs. Timed from the manifest
//!    write until every pair is in the destination node's auth map; the agents' CPU time over
//!    the same interval gives handshakes per CPU-second, beside a plain rustls TLS 1.3 mutual
//!    handshake (webpki verifiers, both sides on one core) measured in the same run.
//! 2. Rotation: 100 × 100 = 10,000 pairs with 60 s SVIDs, which the issuer rotates at half
//!    their lifetime, watched for two lifetimes: handshakes per second (the destination
//!    agent's successful client handshakes, each second), and every second whether any of the
//!    10,000 entries is missing or expired (a lapse).

#[path = "../tests/support/agent_load.rs"]
#[allow(dead_code)] // the handshake log reader is the end-to-end tests'
mod agent_load;
#[path = "../../identity-agent/benches/handshake/bench.rs"]
#[allow(dead_code)] // only the plain rustls baseline is used here
mod handshake;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_load::{agent_bin, cpu_time};
use meshauth_datapath::{BootTime, Maps};
use meshauthctl::demo::mesh::{AgentInputs, MeshBox};

const DST_NODE: &str = "hs-dst";
const SRC_NODE: &str = "hs-src";

/// Manifests for `dst` destination identities on the destination node and `src` source
/// identities on the other, one pod each, and the MeshPolicy between them.
fn mesh_yaml(dst: usize, src: usize) -> String {
    let mut y = String::new();
    for i in 0..dst {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: server-{i}, namespace: hs, labels: {{role: server}}}}\n\
             spec: {{serviceAccountName: server-{i}, nodeName: {DST_NODE}, containers: []}}\nstatus: {{podIP: 10.140.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    for i in 0..src {
        y.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: client-{i}, namespace: hs, labels: {{role: client}}}}\n\
             spec: {{serviceAccountName: client-{i}, nodeName: {SRC_NODE}, containers: []}}\nstatus: {{podIP: 10.141.{}.{}}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    y.push_str(
        "---\napiVersion: meshauth.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: servers, namespace: hs}\n\
         spec:\n  selector: {matchLabels: {role: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    authentication: {mode: Required}\n",
    );
    y
}

const NODES: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: hs}\n---\n\
    apiVersion: v1\nkind: Node\nmetadata: {name: hs-dst}\nstatus: {addresses: [{type: InternalIP, address: 192.168.82.1}]}\n---\n\
    apiVersion: v1\nkind: Node\nmetadata: {name: hs-src}\nstatus: {addresses: [{type: InternalIP, address: 192.168.82.2}]}\n";

/// A box of the two nodes: the issuers read `issued` (every identity, from the start), the
/// agents read `cluster`, which the bench rewrites.
struct TwoNodes {
    mesh: MeshBox,
    cluster: PathBuf,
    maps: Maps,
    _dir: tempfile::TempDir,
}

impl TwoNodes {
    fn start(tag: &str, svid_ttl: Duration, dst: usize, src: usize, initial_dst: usize) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let issued = dir.path().join("issued");
        let cluster = dir.path().join("cluster");
        for d in [&issued, &cluster] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            std::fs::write(d.join("nodes.yaml"), NODES).map_err(|e| e.to_string())?;
        }
        std::fs::write(issued.join("mesh.yaml"), mesh_yaml(dst, src)).map_err(|e| e.to_string())?;
        write_atomically(&cluster.join("mesh.yaml"), &mesh_yaml(initial_dst, src))?;
        let mut parsed = meshauth_cluster::manifests::Manifests::default();
        parsed.add_source("nodes.yaml", NODES).map_err(|e| e.to_string())?;
        let mut mesh = MeshBox::build(tag, dir.path().join("box"), issued, &parsed, agent_bin(), svid_ttl).map_err(|e| e.to_string())?;
        mesh.agent_inputs = AgentInputs::Manifests(cluster.clone());
        mesh.agent_log_filter = std::env::var("MESHAUTH_BENCH_LOG").unwrap_or_else(|_| "info".into());
        for node in [SRC_NODE, DST_NODE] {
            mesh.start_issuer(node).map_err(|e| e.to_string())?;
            mesh.start_agent(node).map_err(|e| e.to_string())?;
        }
        let pins = mesh.node(DST_NODE).map(|n| n.pin_dir.clone()).ok_or("no destination node")?;
        let maps = Maps::open(&pins).map_err(|e| e.to_string())?;
        Ok(Self { mesh, cluster, maps, _dir: dir })
    }

    /// (entries, of them unexpired) in the destination node's auth map.
    fn entries(&self) -> (usize, usize) {
        let now = BootTime::now();
        let all = self.maps.auth_entries().unwrap_or_default();
        let live = all.iter().filter(|e| e.expiry.0 > now.0).count();
        (all.len(), live)
    }

    fn agent_cpu(&self) -> Duration {
        self.mesh.nodes.iter().filter_map(|n| n.agent.as_ref()).map(|a| cpu_time(a.id())).sum()
    }

    /// The destination agent's successful handshakes so far (it dials for its pods).
    fn handshakes(&self) -> usize {
        let Some(node) = self.mesh.node(DST_NODE) else { return 0 };
        let body = agent_load::box_metrics(node).unwrap_or_default();
        body.lines()
            .filter(|l| {
                l.starts_with("meshauth_agent_handshakes_total{") && l.contains("side=\"client\"") && l.contains("result=\"success\"")
            })
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as usize
    }

    fn until_entries(&self, want: usize, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let (all, live) = self.entries();
            if all == want && live == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let log = self.mesh.agent_log(DST_NODE);
                let tail: Vec<&str> = log.lines().rev().filter(|l| !l.contains("no_local_svid")).take(15).collect();
                let issuer = std::fs::read_to_string(self.mesh.dir.join(DST_NODE).join("issuer.log")).unwrap_or_default();
                let workload: Vec<&str> = log.lines().filter(|l| l.contains("orkload")).take(5).collect();
                return Err(format!(
                    "{all} auth entries ({live} unexpired), not {want}, after {timeout:?}:\n{}\n{}\nissuer:\n{issuer}",
                    tail.join("\n"),
                    workload.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn write_atomically(path: &Path, text: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

struct ScaleUp {
    pairs: usize,
    all_proven: Duration,
    agents_cpu: Duration,
}

fn scale_up(dst: usize, src: usize) -> Result<ScaleUp, String> {
    let nodes = TwoNodes::start(&format!("hu{}", std::process::id() % 100_000), Duration::from_secs(3600), dst, src, 0)?;
    // Settled: both agents up, no pair yet.
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = nodes.agent_cpu();
    let t0 = Instant::now();
    write_atomically(&nodes.cluster.join("mesh.yaml"), &mesh_yaml(dst, src))?;
    nodes.until_entries(dst * src, Duration::from_secs(120))?;
    let all_proven = t0.elapsed();
    Ok(ScaleUp { pairs: dst * src, all_proven, agents_cpu: nodes.agent_cpu().saturating_sub(cpu0) })
}

struct Rotation {
    pairs: usize,
    watched: Duration,
    per_second: Vec<usize>,
    /// Seconds in which some entry was missing or expired, after all were first proven.
    lapsed_seconds: usize,
    fewest_live: usize,
}

fn rotation(dst: usize, src: usize, ttl: Duration) -> Result<Rotation, String> {
    let pairs = dst * src;
    let nodes = TwoNodes::start(&format!("hr{}", std::process::id() % 100_000), ttl, dst, src, dst)?;
    nodes.until_entries(pairs, Duration::from_secs(180))?;
    let watched = ttl * 2;
    let (mut per_second, mut lapsed_seconds, mut fewest_live) = (Vec::new(), 0, usize::MAX);
    let mut last = nodes.handshakes();
    let start = Instant::now();
    while start.elapsed() < watched {
        std::thread::sleep(Duration::from_secs(1));
        let now = nodes.handshakes();
        per_second.push(now.saturating_sub(last));
        last = now;
        let (all, live) = nodes.entries();
        fewest_live = fewest_live.min(live);
        if all < pairs || live < pairs {
            lapsed_seconds += 1;
        }
    }
    Ok(Rotation { pairs, watched, per_second, lapsed_seconds, fewest_live })
}

fn main() -> std::process::ExitCode {
    meshauth_datapath::netns::require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    let (scale_dst, scale_src, rot_dst, rot_src, ttl) =
        if quick { (5, 20, 10, 20, Duration::from_secs(20)) } else { (10, 100, 100, 100, Duration::from_secs(60)) };
    if !agent_bin().exists() {
        eprintln!("handshake_scale: {} is missing: cargo build --release -p meshauth-agent", agent_bin().display());
        return std::process::ExitCode::FAILURE;
    }
    let baseline = match handshake::run_handshake_bench(handshake::BenchOptions {
        duration: Duration::from_secs(3),
        concurrency: 16,
        latency_samples: 0,
    }) {
        Ok(r) => r.plain,
        Err(e) => {
            eprintln!("handshake_scale: the plain rustls baseline: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let up = match scale_up(scale_dst, scale_src) {
        Ok(up) => up,
        Err(e) => {
            eprintln!("handshake_scale: scale-up: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let rot = match rotation(rot_dst, rot_src, ttl) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("handshake_scale: rotation: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let plain_per_core = baseline.per_second();
    let agents_per_core = up.pairs as f64 / up.agents_cpu.as_secs_f64().max(1e-9);
    println!("SCALE-UP: {} pairs gained at once", up.pairs);
    println!("  every pair proven after: {:.0} ms (bound reported, not a goal)", up.all_proven.as_secs_f64() * 1e3);
    println!("  pairs per second: {:.0}", up.pairs as f64 / up.all_proven.as_secs_f64().max(1e-9));
    println!(
        "  agents' CPU: {:.2} s for {} handshakes (both sides) = {agents_per_core:.0} handshakes per CPU-second",
        up.agents_cpu.as_secs_f64(),
        up.pairs
    );
    println!(
        "  plain rustls TLS 1.3 mutual, both sides on one core, same run: {plain_per_core:.0}/s; ratio meshauth / plain: {:.2}",
        agents_per_core / plain_per_core.max(1e-9)
    );
    let busiest = rot.per_second.iter().copied().max().unwrap_or(0);
    let total: usize = rot.per_second.iter().sum();
    let mean = total as f64 / rot.per_second.len().max(1) as f64;
    println!("ROTATION: {} pairs, {} s SVIDs (rotated at half-life), watched {} s", rot.pairs, ttl.as_secs(), rot.watched.as_secs());
    println!(
        "  handshakes: {total} ({mean:.0}/s mean, {busiest}/s in the busiest second: {:.1}x the mean)",
        busiest as f64 / mean.max(1e-9)
    );
    println!("  per second: {:?}", rot.per_second);
    println!(
        "  seconds with an entry missing or expired: {} (goal 0: {}); fewest unexpired entries seen: {}",
        rot.lapsed_seconds,
        if rot.lapsed_seconds == 0 { "met" } else { "NOT met" },
        rot.fewest_live
    );
    if rot.lapsed_seconds > 0 { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS }
}
