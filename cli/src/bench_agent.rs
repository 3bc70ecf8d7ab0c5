//! `meshauthctl bench agent-memory`: the resident memory of a real `meshauth-agent` process
//! holding a large node — 1,000 local pods and 10,000 authenticated pairs — against the same
//! agent on an empty node, measured in the same run.
//!
//! The pairs are written into the auth map before the agent starts (with the numbering the
//! agent itself will use), so the agent adopts them the way it does after a restart; its SVIDs
//! come from a development issuer. Nothing here is simulated inside the agent: it is the
//! shipped binary, its RSS read from /proc.

use meshauth_agent::inputs::snapshot_from_dir;
use meshauth_agent::plan;
use meshauth_datapath::{BootTime, Datapath, DatapathConfig};
use meshauth_policy::compile::NumberAllocator;
use meshauth_policy::model::ModelConfig;
use serde::Serialize;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchAgentError {
    #[error("the benchmark loads BPF programs: run it as root")]
    NotRoot,
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchAgentError {
    let what = what.into();
    move |error| BenchAgentError::Io { what, error }
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryPoint {
    pub local_pods: usize,
    pub auth_entries: usize,
    pub rss_bytes: u64,
}

/// The report: the empty node is the baseline.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub baseline: MemoryPoint,
    pub loaded: MemoryPoint,
    /// `loaded.rss_bytes / baseline.rss_bytes`.
    pub ratio: f64,
}

/// Writes a mesh with `local_pods` pods over `local_identities` service accounts on
/// `node-bench`, `remote_identities` pods on `node-peer`, and a MeshPolicy that requires
/// authentication from every remote pod to every local one: local × remote identity pairs.
fn write_mesh(dir: &Path, local_pods: usize, local_identities: usize, remote_identities: usize) -> Result<(), BenchAgentError> {
    std::fs::create_dir_all(dir).map_err(io("creating the manifest dir"))?;
    let mut y = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-bench}\nstatus: {addresses: [{type: InternalIP, address: 127.0.0.1}]}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-peer}\nstatus: {addresses: [{type: InternalIP, address: 127.0.0.2}]}\n",
    );
    for i in 0..local_pods {
        let (a, b) = ((i / 250) % 256, i % 250 + 1);
        // Writing into a String cannot fail.
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: local-{i}, namespace: bench, labels: {{role: server, app: app-{}}}}}\n\
             spec: {{serviceAccountName: sa-{}, nodeName: node-bench, containers: []}}\nstatus: {{podIP: 10.{}.{a}.{b}}}\n",
            i % local_identities,
            i % local_identities,
            100,
        );
    }
    for i in 0..remote_identities {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: remote-{i}, namespace: bench, labels: {{role: client}}}}\n\
             spec: {{serviceAccountName: client-{i}, nodeName: node-peer, containers: []}}\nstatus: {{podIP: 10.200.{}.{}}}\n",
            i / 250,
            i % 250 + 1,
        );
    }
    y.push_str(
        "---\napiVersion: meshauth.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: servers, namespace: bench}\n\
         spec:\n  selector: {matchLabels: {role: server}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {role: client}}}]\n    authentication: {mode: Required}\n",
    );
    std::fs::write(dir.join("mesh.yaml"), y).map_err(io("writing the mesh"))
}

struct Running {
    children: Vec<Child>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs an agent on the mesh in `work`, with `pairs` pre-authenticated, and returns its RSS
/// once it has settled.
fn measure(agent_bin: &Path, work: &Path, local_pods: usize, local_ids: usize, remote_ids: usize) -> Result<MemoryPoint, BenchAgentError> {
    let manifests = work.join("manifests");
    write_mesh(&manifests, local_pods, local_ids.max(1), remote_ids)?;
    let state = work.join("state");
    std::fs::create_dir_all(&state).map_err(io("state dir"))?;
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/meshauth-bench-agent-{}-{local_pods}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pin_dir);

    // The agent's own numbering, so the entries written here are the ones it wants.
    let snapshot = snapshot_from_dir(&manifests).map_err(|e| BenchAgentError::Setup(e.to_string()))?;
    let mut allocator = NumberAllocator::default();
    let node_plan = plan::plan(&snapshot, &ModelConfig::default(), "node-bench", 4250, &mut allocator);
    std::fs::write(state.join("numbers.json"), serde_json::to_vec(&allocator).map_err(|e| BenchAgentError::Setup(e.to_string()))?)
        .map_err(io("numbering"))?;
    let entries = node_plan.desired.len();
    {
        let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pin_dir)).map_err(|e| BenchAgentError::Setup(e.to_string()))?;
        let expiry = BootTime::after(Duration::from_secs(3600));
        for pair in &node_plan.desired {
            dp.set_auth(pair.dst_number, pair.src_number, meshauth_datapath::NodeId::This, expiry)
                .map_err(|e| BenchAgentError::Setup(e.to_string()))?;
        }
    }

    let socket = work.join("workload.sock");
    let log = std::fs::File::create(work.join("agent.log")).map_err(io("agent log"))?;
    let issuer_log = std::fs::File::create(work.join("issuer.log")).map_err(io("issuer log"))?;
    let mut running = Running { children: Vec::new() };
    running.children.push(
        Command::new(agent_bin)
            .args(["dev-issuer", "--node", "node-bench", "--svid-ttl", "3600", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(work.join("ca"))
            .arg("--manifests")
            .arg(&manifests)
            .stdout(Stdio::null())
            .stderr(issuer_log)
            .spawn()
            .map_err(io("starting the dev issuer"))?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = log.try_clone().map_err(io("agent log"))?;
    let agent = Command::new(agent_bin)
        .args(["run", "--node-name", "node-bench", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--manifests"])
        .arg(&manifests)
        .arg("--workload-api-socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .env("MESHAUTH_CNI_SOCKET", work.join("cni.sock"))
        .env("RUST_LOG", "warn")
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(io("starting the agent"))?;
    let pid = agent.id();
    running.children.push(agent);
    // Settle: the first plan is applied, SVIDs fetched, the auth manager has adopted the map.
    std::thread::sleep(Duration::from_secs(6));
    let rss =
        rss_bytes(pid).ok_or_else(|| BenchAgentError::Setup(format!("the agent exited; see {}", work.join("agent.log").display())))?;
    drop(running);
    let _ = std::fs::remove_dir_all(&pin_dir);
    Ok(MemoryPoint { local_pods, auth_entries: entries, rss_bytes: rss })
}

/// Runs the benchmark and writes a table or JSON.
pub fn run(agent_bin: &Path, json: bool, out: &mut dyn Write) -> Result<MemoryReport, BenchAgentError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(BenchAgentError::NotRoot);
    }
    let work = std::env::temp_dir().join(format!("meshauth-bench-agent-{}", std::process::id()));
    let baseline = measure(agent_bin, &work.join("empty"), 0, 0, 0)?;
    let loaded = measure(agent_bin, &work.join("loaded"), 1000, 100, 100)?;
    let _ = std::fs::remove_dir_all(&work);
    let ratio = loaded.rss_bytes as f64 / baseline.rss_bytes.max(1) as f64;
    let report = MemoryReport { baseline, loaded, ratio };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let text = if json {
        serde_json::to_string(&report).unwrap_or_default()
    } else {
        format!(
            "{:<28} {:>10} {:>12} {:>10}\n{:<28} {:>10} {:>12} {:>9.1}M\n{:<28} {:>10} {:>12} {:>9.1}M\nratio to baseline: {:.2}x\n",
            "AGENT",
            "LOCAL PODS",
            "AUTH ENTRIES",
            "RSS",
            "empty node (baseline)",
            report.baseline.local_pods,
            report.baseline.auth_entries,
            mib(report.baseline.rss_bytes),
            "large node",
            report.loaded.local_pods,
            report.loaded.auth_entries,
            mib(report.loaded.rss_bytes),
            report.ratio
        )
    };
    writeln!(out, "{text}").map_err(io("writing the report"))?;
    Ok(report)
}
