//! An agent's resident memory at node size, shared by the bench
//! (`cargo bench -p meshauthctl --bench agent_memory`) and its smoke test
//! (`cli/tests/agent_memory.rs`).
//!
//! The real test environment's kube-apiserver and etcd; one real `meshauth-agent` process in its
//! own node network namespace (the demo's `MeshBox`), reading that API server, with SVIDs from
//! the development issuer. First on an empty cluster (the baseline), then on a node with
//! `local_pods` pods over `local_identities` service accounts and `remote_identities` pods on
//! another node, a MeshPolicy requiring authentication from every remote pod to every local
//! one: local × remote identity pairs. Those pairs are written into the auth map before the
//! agent starts, with the agent's own numbering computed from the same API objects, so the
//! agent adopts them the way it does after a restart: what is measured is holding them, not a
//! handshake storm against peers that do not exist here. Then the churn: pods created on the
//! node and deleted again, batch after batch, the RSS read after each batch once the agent's
//! `local_pods` metric shows it took the batch in and out again.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshauth_agent::plan;
use meshauth_datapath::{BootTime, Datapath, DatapathConfig, Maps};
use meshauth_policy::compile::NumberAllocator;
use meshauth_policy::model::ModelConfig;
use meshauth_testenv::TestEnv;
use meshauth_testenv::k8s::{self, TestPod};
use meshauthctl::demo::mesh::MeshBox;
use serde_json::json;

use crate::api_box::{self, err};

/// How big the node is and how much churn.
#[derive(Debug, Clone)]
pub struct MemoryScale {
    pub local_pods: usize,
    pub local_identities: usize,
    pub remote_identities: usize,
    /// Pods created on the node and deleted again, in all.
    pub churn_pods: usize,
    /// How many are created before they are deleted again.
    pub churn_batch: usize,
    /// How long one batch may take to be seen in and out before the run fails.
    pub change_timeout: Duration,
}

/// The agent's memory at one moment, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rss {
    /// VmRSS: what the process holds in RAM.
    pub total: u64,
    /// RssAnon: its heap and stacks (the part that grows with pods and pairs).
    pub anon: u64,
    /// RssFile: pages of its binary and libraries.
    pub file: u64,
    /// VmHWM: the highest VmRSS so far.
    pub peak: u64,
}

impl Rss {
    pub fn of(pid: u32) -> Option<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let kb: u64 = status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        };
        Some(Self { total: field("VmRSS:")?, anon: field("RssAnon:")?, file: field("RssFile:")?, peak: field("VmHWM:")? })
    }
}

#[derive(Debug, Clone)]
pub struct MemoryReport {
    pub scale: MemoryScale,
    /// The agent on an empty cluster.
    pub baseline: Rss,
    /// The agent holding the node, settled, before the churn.
    pub steady: Rss,
    /// Authenticated pairs the agent held (its `auth_entries` metric).
    pub auth_entries: usize,
    /// VmRSS right after each churn batch was created and deleted again.
    pub after_batches: Vec<u64>,
    /// The agent settled again after the churn (as `steady` was measured).
    pub after_churn: Rss,
    /// VmHWM at the end: the highest the agent ever held, churn included.
    pub peak: u64,
    /// What was checked at the end: (what, found, expected).
    pub checks: Vec<(String, usize, usize)>,
}

impl MemoryReport {
    /// How far the settled RSS after the churn is from the settled RSS before it, as a
    /// fraction (both read the same way, so an apply in flight counts in neither).
    pub fn churn_drift(&self) -> f64 {
        let steady = self.steady.total.max(1) as f64;
        (self.after_churn.total as f64 - steady) / steady
    }
}

const NODE: &str = "mem-node";
const PEER: &str = "mem-peer";
const NAMESPACE: &str = "memory";
const SETTLE: Duration = Duration::from_secs(5);

fn local_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 130, 0, 0)) + u32::try_from(i + 1).unwrap_or(u32::MAX))
}

fn remote_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 131, 0, 0)) + u32::try_from(i + 1).unwrap_or(u32::MAX))
}

/// Churn pods take addresses from here, never reused in a run.
fn churn_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 132, 0, 0)) + u32::try_from(i + 1).unwrap_or(u32::MAX))
}

fn local_pod(i: usize, identities: usize) -> TestPod {
    let sa = format!("server-{}", i % identities.max(1));
    TestPod::new(NAMESPACE, format!("local-{i}")).label("role", "server").label("app", sa.clone()).service_account(sa).node(NODE)
}

/// The running node: environment, the box with the node's agent, and what it reads.
/// Fields drop in this order: the agent stops before the API server does.
struct Node {
    mesh: MeshBox,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    _env: TestEnv,
}

impl Node {
    fn start() -> Result<Self, String> {
        let (env, rt, client) = api_box::start_env()?;
        let nodes = [(NODE.to_owned(), Ipv4Addr::new(192, 168, 81, 1)), (PEER.to_owned(), Ipv4Addr::new(192, 168, 81, 2))];
        let mut mesh = api_box::build(&env, &rt, &client, &format!("am{}", std::process::id() % 100_000), &nodes)?;
        // What a deployment logs, not the demo's debug lines.
        mesh.agent_log_filter = "info".into();
        Ok(Self { mesh, rt, client, _env: env })
    }

    fn agent_pid(&self) -> Result<u32, String> {
        self.mesh.node(NODE).and_then(|n| n.agent.as_ref()).map(std::process::Child::id).ok_or_else(|| "the agent is not running".into())
    }

    fn rss(&self) -> Result<Rss, String> {
        Rss::of(self.agent_pid()?).ok_or_else(|| format!("the agent exited:\n{}", tail(&self.mesh.agent_log(NODE))))
    }

    /// (Re)starts the node's issuer (it reads the identities to issue from the box's
    /// manifests once, at start) and agent.
    fn start_agent(&mut self) -> Result<(), String> {
        if let Some(n) = self.mesh.nodes.iter_mut().find(|n| n.name == NODE)
            && let Some(mut issuer) = n.issuer.take()
        {
            let _ = issuer.kill();
            let _ = issuer.wait();
            let _ = std::fs::remove_file(&n.socket);
        }
        self.mesh.start_issuer(NODE).map_err(|e| e.to_string())?;
        self.mesh.start_agent(NODE).map_err(|e| e.to_string())
    }

    /// A metric of the agent's /metrics (0 while it is not there yet).
    fn metric(&self, name: &str) -> Result<usize, String> {
        let node = self.mesh.node(NODE).ok_or("no node")?;
        let body = crate::agent_load::box_metrics(node).map_err(|e| err("reading the agent's metrics")(&e))?;
        Ok(body
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0, |v| v as usize))
    }

    fn until_metric(&self, name: &str, want: usize, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        loop {
            let now = self.metric(name)?;
            if now == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(format!("{name} is {now}, not {want}, after {timeout:?}:\n{}", tail(&self.mesh.agent_log(NODE))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Creates the node's pods, the other node's pods and the MeshPolicy.
    fn fill(&self, scale: &MemoryScale) -> Result<(), String> {
        let client = &self.client;
        self.rt.block_on(async {
            k8s::ensure_namespace(client, NAMESPACE).await.map_err(|e| e.to_string())?;
            let mut set = tokio::task::JoinSet::new();
            let mut all: Vec<(TestPod, Ipv4Addr)> =
                (0..scale.local_pods).map(|i| (local_pod(i, scale.local_identities), local_address(i))).collect();
            all.extend((0..scale.remote_identities).map(|i| {
                let sa = format!("client-{i}");
                (TestPod::new(NAMESPACE, format!("remote-{i}")).label("role", "client").service_account(sa).node(PEER), remote_address(i))
            }));
            for chunk in all.chunks(all.len().div_ceil(16).max(1)) {
                let (client, chunk) = (client.clone(), chunk.to_vec());
                set.spawn(async move {
                    for (pod, ip) in &chunk {
                        create_running(&client, pod, *ip).await?;
                    }
                    Ok::<_, String>(())
                });
            }
            while let Some(done) = set.join_next().await {
                done.map_err(|e| e.to_string())??;
            }
            let policy = json!({
                "apiVersion": "meshauth.io/v1alpha1",
                "kind": "MeshPolicy",
                "metadata": {"name": "servers", "namespace": NAMESPACE},
                "spec": {
                    "selector": {"matchLabels": {"role": "server"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}], "authentication": {"mode": "Required"}}],
                },
            });
            let api = k8s::dynamic_api(client, "meshauth.io", "v1alpha1", "MeshPolicy", "meshpolicies", NAMESPACE);
            k8s::create_dynamic(&api, policy).await.map_err(|e| err("the MeshPolicy")(&e))?;
            Ok::<_, String>(())
        })?;
        // The issuer issues what the box's manifests put on the node: the local identities
        // (these pods exist only for it; the agent reads the API server).
        let mut pods = String::new();
        for i in 0..scale.local_identities {
            pods.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: id-{i}, namespace: {NAMESPACE}}}\nspec: {{serviceAccountName: server-{i}, nodeName: {NODE}, containers: []}}\nstatus: {{podIP: 10.133.0.{}}}\n",
                i + 1
            ));
        }
        std::fs::write(self.mesh.manifests.join("identities.yaml"), pods).map_err(|e| err("the issuer's identities")(&e))
    }

    /// The agent's plan for the filled node, from the same API objects it will read: the
    /// numbering goes into its state directory, the pairs into its auth map.
    fn write_adopted_pairs(&self, scale: &MemoryScale) -> Result<usize, String> {
        let notify = Arc::new(tokio::sync::Notify::new());
        let (stores, reflectors) = meshauth_cluster::reflect::watch_all(&self.client, notify);
        let watching = self.rt.spawn(reflectors);
        let expected = scale.local_pods + scale.remote_identities;
        let deadline = Instant::now() + Duration::from_secs(60);
        let snapshot = loop {
            self.rt.block_on(stores.wait_until_ready()).map_err(|kind| format!("the {kind} watch ended"))?;
            let snapshot = stores.snapshot();
            if snapshot.inputs.pods.len() >= expected && !snapshot.inputs.mesh_policies.is_empty() {
                break snapshot;
            }
            if Instant::now() > deadline {
                return Err(format!("the API listed {} of {expected} pods", snapshot.inputs.pods.len()));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        watching.abort();
        let mut allocator = NumberAllocator::default();
        let node_plan = plan::plan(&snapshot, &ModelConfig::default(), NODE, 4250, &mut allocator);
        let state = self.mesh.dir.join(NODE).join("state");
        std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        std::fs::write(state.join("numbers.json"), serde_json::to_vec(&allocator).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let pin_dir = self.mesh.node(NODE).map(|n| n.pin_dir.clone()).ok_or("no node")?;
        let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pin_dir)).map_err(|e| e.to_string())?;
        // The tables name every number (the pinned SPIFFE names), as a previous agent left them:
        // the agent keeps only entries whose numbers mean what they meant.
        dp.apply_tables(&node_plan.tables).map_err(|e| e.to_string())?;
        let expiry = BootTime::after(Duration::from_secs(3600));
        for pair in &node_plan.desired {
            for peer in &pair.peers {
                dp.set_auth(pair.dst_number, pair.src_number, peer.node, expiry).map_err(|e| e.to_string())?;
            }
        }
        Ok(node_plan.desired.len())
    }

    /// One churn batch: `batch` pods created Running on the node, seen by the agent, deleted,
    /// seen gone. `first` numbers their names and addresses.
    fn churn_batch(&self, scale: &MemoryScale, first: usize) -> Result<(), String> {
        let pods: Vec<(TestPod, Ipv4Addr)> = (first..first + scale.churn_batch)
            .map(|i| {
                let mut pod = local_pod(i, scale.local_identities);
                pod.name = format!("churn-{i}");
                (pod, churn_address(i))
            })
            .collect();
        let client = &self.client;
        self.rt.block_on(async {
            for (pod, ip) in &pods {
                create_running(client, pod, *ip).await?;
            }
            Ok::<_, String>(())
        })?;
        self.until_metric("meshauth_agent_local_pods", scale.local_pods + scale.churn_batch, scale.change_timeout)?;
        self.rt.block_on(async {
            for (pod, _) in &pods {
                k8s::delete_pod(client, NAMESPACE, &pod.name).await.map_err(|e| e.to_string())?;
            }
            Ok::<_, String>(())
        })?;
        self.until_metric("meshauth_agent_local_pods", scale.local_pods, scale.change_timeout)?;
        Ok(())
    }
}

async fn create_running(client: &kube::Client, pod: &TestPod, ip: Ipv4Addr) -> Result<(), String> {
    let what = format!("pod {}/{}", pod.namespace, pod.name);
    k8s::create_pod(client, pod).await.map_err(|e| err(&what)(&e))?;
    k8s::set_pod_status(client, &pod.namespace, &pod.name, "Running", Some(&ip.to_string())).await.map_err(|e| err(&what)(&e))?;
    Ok(())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Samples the agent's RSS every 200 ms for `SETTLE` and returns the last sample (the heap
/// has settled when two seconds of samples agree; the last one is what it holds).
fn settled(node: &Node) -> Result<Rss, String> {
    let start = Instant::now();
    let mut last = node.rss()?;
    while start.elapsed() < SETTLE {
        std::thread::sleep(Duration::from_millis(200));
        last = node.rss()?;
    }
    Ok(last)
}

/// Measures the empty node, fills it, measures it, churns it, and checks what is left.
pub fn run(scale: &MemoryScale) -> Result<MemoryReport, String> {
    let mut node = Node::start()?;
    node.start_agent()?;
    let baseline = settled(&node)?;
    node.mesh.stop_agent(NODE);

    node.fill(scale)?;
    let pairs = node.write_adopted_pairs(scale)?;
    node.start_agent()?;
    node.until_metric("meshauth_agent_local_pods", scale.local_pods, Duration::from_secs(60))?;
    let steady = settled(&node)?;
    let auth_entries = node.metric("meshauth_agent_auth_entries")?;

    let mut after_batches = Vec::new();
    let mut made = 0;
    while made < scale.churn_pods {
        node.churn_batch(scale, made)?;
        made += scale.churn_batch;
        after_batches.push(node.rss()?.total);
    }
    let end = settled(&node)?;

    // Nothing left behind: the other node's pods are this node's only endpoints (its own have
    // no veth here, so they name no identity), the adopted pairs are all still held, and the
    // agent lists the node's pods and no churn pod.
    let pin_dir = node.mesh.node(NODE).map(|n| n.pin_dir.clone()).ok_or("no node")?;
    let maps = Maps::open(&pin_dir).map_err(|e| e.to_string())?;
    let endpoints: BTreeSet<Ipv4Addr> = maps.endpoints().map_err(|e| e.to_string())?.iter().map(|e| e.ip).collect();
    let remote: BTreeSet<Ipv4Addr> = (0..scale.remote_identities).map(remote_address).collect();
    let checks = vec![
        ("endpoints in the map (the other node's pods)".to_owned(), endpoints.len(), remote.len()),
        ("of them, not the other node's pods".to_owned(), endpoints.difference(&remote).count(), 0),
        ("auth entries in the map".to_owned(), maps.auth_entries().map_err(|e| e.to_string())?.len(), pairs),
        ("auth entries the agent holds (metric)".to_owned(), node.metric("meshauth_agent_auth_entries")?, pairs),
        ("local pods the agent lists (metric)".to_owned(), node.metric("meshauth_agent_local_pods")?, scale.local_pods),
    ];
    Ok(MemoryReport { scale: scale.clone(), baseline, steady, auth_entries, after_batches, after_churn: end, peak: end.peak, checks })
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The report as a table, the goals beside the figures.
pub fn table(r: &MemoryReport) -> String {
    let s = &r.scale;
    let row = |what: &str, x: &Rss| format!("{what:<34} {:>9.1} {:>9.1} {:>9.1}\n", mib(x.total), mib(x.anon), mib(x.file));
    let mut out = format!("{:<34} {:>9} {:>9} {:>9}\n", "AGENT (MiB)", "RSS", "ANON", "FILE");
    out.push_str(&row("empty cluster (baseline)", &r.baseline));
    out.push_str(&row(&format!("{} local pods, {} pairs", s.local_pods, r.auth_entries), &r.steady));
    out.push_str(&format!(
        "ratio to baseline: {:.2}x; goal ≤ 30 MiB at 1,000 pods / 10,000 pairs: {}\n",
        r.steady.total as f64 / r.baseline.total.max(1) as f64,
        if r.steady.total <= 30 << 20 { "met" } else { "NOT met" }
    ));
    let peak_ratio = r.peak as f64 / r.steady.total.max(1) as f64;
    out.push_str(&format!(
        "peak (VmHWM, whole run): {:.1} MiB = {peak_ratio:.2}x steady; goal ≤ 1.2x: {}\n",
        mib(r.peak),
        if peak_ratio <= 1.2 { "met" } else { "NOT met" }
    ));
    if !r.after_batches.is_empty() {
        let (lo, hi) = r.after_batches.iter().fold((u64::MAX, 0), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        out.push_str(&format!(
            "churn: {} pods created and deleted in batches of {}: RSS right after a batch {:.1}–{:.1} MiB; settled after the churn {:.1} MiB (anon {:.1}) = {:+.1} % from steady; goal ±5 %: {}\n",
            r.after_batches.len() * s.churn_batch,
            s.churn_batch,
            mib(lo),
            mib(hi),
            mib(r.after_churn.total),
            mib(r.after_churn.anon),
            r.churn_drift() * 100.0,
            if r.churn_drift().abs() <= 0.05 { "met" } else { "NOT met" }
        ));
    }
    for (what, found, expected) in &r.checks {
        out.push_str(&format!("check: {what}: {found} (expected {expected})\n"));
    }
    out
}
