//! Policy and pod changes reaching every node, at cluster size, shared by the bench
//! (`cargo bench -p meshauthctl --bench propagation`) and its smoke test
//! (`cli/tests/propagation.rs`).
//!
//! The real test environment's kube-apiserver and etcd; N real `meshauth-agent` processes, each
//! in its own node network namespace with its own pin directory (the demo's `MeshBox`), reading
//! that API server; Namespaces, Pods and MeshPolicies as API objects (no kubelet: a pod's status
//! is set as a kubelet would set it). Every change is timed from just before its API write to
//! the moment every node's pinned maps show it, read by single-key lookups:
//! - a MeshPolicy created (its namespace's `app: a1` pods become isolated on every node that
//!   knows them) and changed (its selector moved away: no longer isolated);
//! - a pod created (its address is an endpoint on every other node) and deleted (its address
//!   gone from every node).
//!
//! A pod's own node does not list it: its address becomes an endpoint there only once its veth
//! is guarded, which needs the CNI ADD this environment has no kubelet to make. Each namespace
//! spreads its pods over the nodes, so every node sees every policy change.
//!
//! The API server's own write latency is measured on the same writes, as the floor.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use meshauth_datapath::Maps;
use meshauth_testenv::TestEnv;
use meshauth_testenv::k8s::{self, TestPod};
use meshauthctl::demo::mesh::MeshBox;
use serde_json::json;

use crate::agent_load::cpu_time;
use crate::api_box::{self, err};

/// How big the cluster is and how much is measured.
#[derive(Debug, Clone)]
pub struct Scale {
    pub nodes: usize,
    pub namespaces: usize,
    /// Spread over the nodes; half `app: a0` (selected by their namespace's MeshPolicy), half
    /// `app: a1` (allowed in by it).
    pub pods_per_namespace: usize,
    /// One per namespace at most.
    pub policies: usize,
    /// Of each kind (policy created, policy changed, pod created, pod deleted), quiet and again
    /// under churn.
    pub changes: usize,
    /// Pod creations per second in the background during the second series (each deleted about
    /// a second later, so as many deletions).
    pub churn_per_second: usize,
    /// How long one change may take to reach every node before the run fails.
    pub change_timeout: Duration,
}

/// Milliseconds, one per change.
#[derive(Debug, Clone, Default)]
pub struct Series {
    /// API write → every node's maps.
    pub all_nodes_ms: Vec<f64>,
    /// The API server's write latency for the same changes (the floor).
    pub api_write_ms: Vec<f64>,
}

impl Series {
    fn push(&mut self, all_nodes: Duration, api_write: Duration) {
        self.all_nodes_ms.push(all_nodes.as_secs_f64() * 1e3);
        self.api_write_ms.push(api_write.as_secs_f64() * 1e3);
    }
}

/// p50, p99 and max of a series of milliseconds.
pub fn percentiles(ms: &[f64]) -> (f64, f64, f64) {
    let mut v = ms.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// One series of changes of every kind.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub policy_created: Series,
    pub policy_changed: Series,
    pub pod_created: Series,
    pub pod_deleted: Series,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub scale: Scale,
    /// Until every node listed every pod of the other nodes.
    pub initial_sync: Duration,
    pub quiet: Round,
    pub under_churn: Round,
    /// Background pods created and deleted during `under_churn`.
    pub churned_pods: usize,
    /// Each agent's CPU use over an idle interval, in percent of one core.
    pub idle_cpu_percent: Vec<f64>,
    /// Each node's endpoint count at the end, and what it must be.
    pub final_endpoints: Vec<(usize, usize)>,
}

/// Waiting for one change: a look at the maps every millisecond (one lookup per node and pod
/// concerned).
const CHANGE_POLL: Duration = Duration::from_millis(1);
/// Waiting for the whole cluster: a full read of every node's endpoints (thousands of lookups)
/// every 200 ms, for up to 5 minutes.
const SYNC_WAIT: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(300));
const IDLE_WINDOW: Duration = Duration::from_secs(5);

fn node_name(i: usize) -> String {
    format!("pn-{}", i + 1)
}

fn node_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 79, u8::try_from(i + 1).unwrap_or(u8::MAX))
}

/// Pod addresses from 10.120.0.1 up, never reused in a run.
fn pod_address(n: usize) -> Ipv4Addr {
    let n = u32::try_from(n + 1).unwrap_or(u32::MAX);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 120, 0, 0)) + n)
}

fn namespace(k: usize) -> String {
    format!("prop-{k}")
}

/// A pod of the cluster as the bench placed it.
#[derive(Debug, Clone)]
struct Placed {
    namespace: String,
    name: String,
    node: usize,
    ip: Ipv4Addr,
    app: &'static str,
}

/// The running cluster: environment, agents, and where everything is.
/// Fields drop in this order: the agents stop before the API server does.
struct Cluster {
    maps: Vec<Maps>,
    mesh: MeshBox,
    rt: tokio::runtime::Runtime,
    client: kube::Client,
    /// Held for its drop, which stops the environment.
    _env: TestEnv,
    pods: Vec<Placed>,
    next_ip: Arc<AtomicUsize>,
    change_wait: (Duration, Duration),
}

/// API clients writing at once while the cluster is filled.
const PARALLEL: usize = 16;

async fn create_running_pod(client: &kube::Client, p: &Placed) -> Result<(), String> {
    let pod = TestPod::new(&p.namespace, &p.name).label("app", p.app).node(node_name(p.node));
    let what = format!("pod {}/{}", p.namespace, p.name);
    k8s::create_pod(client, &pod).await.map_err(|e| err(&what)(&e))?;
    k8s::set_pod_status(client, &p.namespace, &p.name, "Running", Some(&p.ip.to_string())).await.map_err(|e| err(&what)(&e))?;
    Ok(())
}

async fn create_pods(client: &kube::Client, pods: &[Placed]) -> Result<(), String> {
    let mut set = tokio::task::JoinSet::new();
    for chunk in pods.chunks(pods.len().div_ceil(PARALLEL).max(1)) {
        let (client, chunk) = (client.clone(), chunk.to_vec());
        set.spawn(async move {
            for p in &chunk {
                create_running_pod(&client, p).await?;
            }
            Ok::<_, String>(())
        });
    }
    while let Some(done) = set.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}

fn policy_api(client: &kube::Client, ns: &str) -> Api<kube::api::DynamicObject> {
    k8s::dynamic_api(client, "meshauth.io", "v1alpha1", "MeshPolicy", "meshpolicies", ns)
}

/// A MeshPolicy selecting `app: <selects>` pods of `ns`, letting `app: a0` pods in on 8080
/// with authentication.
fn policy(ns: &str, name: &str, selects: &str) -> serde_json::Value {
    json!({
        "apiVersion": "meshauth.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": selects}},
            "ingress": [{
                "from": [{"podSelector": {"matchLabels": {"app": "a0"}}}],
                "ports": [{"port": 8080, "protocol": "TCP"}],
                "authentication": {"mode": "Required"},
            }],
        },
    })
}

impl Cluster {
    fn start(scale: &Scale) -> Result<Self, String> {
        let (env, rt, client) = api_box::start_env()?;

        let nodes: Vec<(String, Ipv4Addr)> = (0..scale.nodes).map(|i| (node_name(i), node_address(i))).collect();
        let mesh = api_box::build(&env, &rt, &client, &format!("pr{}", std::process::id() % 100_000), &nodes)?;

        // Namespaces, their pods spread over the nodes, a MeshPolicy per namespace.
        let mut pods = Vec::new();
        for k in 0..scale.namespaces {
            for j in 0..scale.pods_per_namespace {
                let n = pods.len();
                pods.push(Placed {
                    namespace: namespace(k),
                    name: format!("p-{j}"),
                    node: (k + j) % scale.nodes,
                    ip: pod_address(n),
                    app: if j % 2 == 0 { "a0" } else { "a1" },
                });
            }
        }
        rt.block_on(async {
            for k in 0..scale.namespaces {
                k8s::ensure_namespace(&client, &namespace(k)).await.map_err(|e| e.to_string())?;
            }
            create_pods(&client, &pods).await?;
            for k in 0..scale.policies.min(scale.namespaces) {
                let ns = namespace(k);
                k8s::create_dynamic(&policy_api(&client, &ns), policy(&ns, "base", "a0")).await.map_err(|e| err(&ns)(&e))?;
            }
            Ok::<_, String>(())
        })?;
        let next_ip = Arc::new(AtomicUsize::new(pods.len()));
        Ok(Self { _env: env, mesh, rt, client, maps: Vec::new(), pods, next_ip, change_wait: (CHANGE_POLL, scale.change_timeout) })
    }

    /// Starts every node's issuer and agent, then opens its maps.
    fn start_agents(&mut self, nodes: usize) -> Result<(), String> {
        for i in 0..nodes {
            let name = node_name(i);
            self.mesh.start_issuer(&name).map_err(|e| e.to_string())?;
            self.mesh.start_agent(&name).map_err(|e| e.to_string())?;
            let node = self.mesh.node(&name).ok_or_else(|| format!("no box node {name}"))?;
            self.maps.push(Maps::open(&node.pin_dir).map_err(|e| err(&name)(&e))?);
        }
        Ok(())
    }

    fn agent_pids(&self) -> Vec<u32> {
        self.mesh.nodes.iter().filter_map(|n| n.agent.as_ref().map(std::process::Child::id)).collect()
    }

    /// Waits until `holds(node, maps)` for every node, looking every `poll` for at most
    /// `timeout`; the time from `since` until the last one did.
    fn until_every_node(
        &self,
        what: &str,
        since: Instant,
        (poll, timeout): (Duration, Duration),
        holds: impl Fn(usize, &Maps) -> bool,
    ) -> Result<Duration, String> {
        let start = since;
        let mut pending: BTreeSet<usize> = (0..self.maps.len()).collect();
        loop {
            pending.retain(|&i| !holds(i, &self.maps[i]));
            if pending.is_empty() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let names: Vec<String> = pending.iter().map(|i| node_name(*i)).collect();
                return Err(format!("{what} had not reached {} after {timeout:?}", names.join(", ")));
            }
            std::thread::sleep(poll);
        }
    }

    /// The `app: a1` pods of namespace `k` and whether every node that knows them sees each
    /// `isolated` as wanted.
    fn a1_isolated_everywhere(&self, what: &str, since: Instant, k: usize, want: bool) -> Result<Duration, String> {
        let targets: Vec<&Placed> = self.pods.iter().filter(|p| p.namespace == namespace(k) && p.app == "a1").collect();
        self.until_every_node(what, since, self.change_wait, |node, maps| {
            targets.iter().filter(|p| p.node != node).all(|p| maps.endpoint(p.ip).ok().flatten().map(|e| e.isolated) == Some(want))
        })
    }

    /// A MeshPolicy created in namespace `k` (isolating its `a1` pods), then changed to select
    /// nothing there; both timed.
    fn policy_change(&self, k: usize, round: &mut Round, tag: &str) -> Result<(), String> {
        let ns = namespace(k);
        let name = format!("probe-{tag}");
        let api = policy_api(&self.client, &ns);
        let t0 = Instant::now();
        self.rt.block_on(k8s::create_dynamic(&api, policy(&ns, &name, "a1"))).map_err(|e| err(&name)(&e))?;
        let write = t0.elapsed();
        let arrived = self.a1_isolated_everywhere(&format!("MeshPolicy {ns}/{name} created"), t0, k, true)?;
        round.policy_created.push(arrived, write);

        let patch = json!({"spec": {"selector": {"matchLabels": {"app": "nothing"}}}});
        let t0 = Instant::now();
        self.rt.block_on(api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))).map_err(|e| err(&name)(&e))?;
        let write = t0.elapsed();
        let arrived = self.a1_isolated_everywhere(&format!("MeshPolicy {ns}/{name} changed"), t0, k, false)?;
        round.policy_changed.push(arrived, write);
        self.rt.block_on(api.delete(&name, &DeleteParams::default())).map_err(|e| err(&name)(&e))?;
        Ok(())
    }

    /// A pod created and set Running on node `node` (every other node lists it), then deleted
    /// (every node forgets it); both timed.
    fn pod_change(&self, k: usize, node: usize, round: &mut Round, tag: &str) -> Result<(), String> {
        let n = self.next_ip.fetch_add(1, Ordering::Relaxed);
        let p = Placed { namespace: namespace(k), name: format!("probe-{tag}"), node, ip: pod_address(n), app: "a1" };
        let t0 = Instant::now();
        self.rt.block_on(create_running_pod(&self.client, &p))?;
        let write = t0.elapsed();
        let what = format!("pod {}/{} created", p.namespace, p.name);
        let arrived =
            self.until_every_node(&what, t0, self.change_wait, |i, maps| i == p.node || maps.endpoint(p.ip).ok().flatten().is_some())?;
        round.pod_created.push(arrived, write);

        let t0 = Instant::now();
        self.rt.block_on(k8s::delete_pod(&self.client, &p.namespace, &p.name)).map_err(|e| e.to_string())?;
        let write = t0.elapsed();
        let what = format!("pod {}/{} deleted", p.namespace, p.name);
        let arrived = self.until_every_node(&what, t0, self.change_wait, |_, maps| maps.endpoint(p.ip).ok().flatten().is_none())?;
        round.pod_deleted.push(arrived, write);
        Ok(())
    }

    fn series(&self, scale: &Scale, tag: &str) -> Result<Round, String> {
        let mut round = Round::default();
        for c in 0..scale.changes {
            let k = c % scale.namespaces;
            self.policy_change(k, &mut round, &format!("{tag}-{c}"))?;
            self.pod_change(k, c % scale.nodes, &mut round, &format!("{tag}-{c}"))?;
        }
        Ok(round)
    }

    /// Creates `per_second` pods a second in namespace `churn`, each deleted a second later,
    /// until `stop`; returns how many came and went.
    fn churn(&self, per_second: usize, nodes: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Result<usize, String>> {
        let (client, next_ip) = (self.client.clone(), self.next_ip.clone());
        self.rt.spawn(async move {
            k8s::ensure_namespace(&client, "churn").await.map_err(|e| e.to_string())?;
            let every = Duration::from_secs_f64(1.0 / per_second.max(1) as f64);
            let mut live: std::collections::VecDeque<(Instant, String)> = Default::default();
            let mut made = 0usize;
            let mut tick = tokio::time::interval(every);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let n = next_ip.fetch_add(1, Ordering::Relaxed);
                let p = Placed { namespace: "churn".into(), name: format!("c-{n}"), node: n % nodes, ip: pod_address(n), app: "a1" };
                create_running_pod(&client, &p).await?;
                live.push_back((Instant::now(), p.name));
                made += 1;
                while live.front().is_some_and(|(at, _)| at.elapsed() >= Duration::from_secs(1)) {
                    if let Some((_, name)) = live.pop_front() {
                        k8s::delete_pod(&client, "churn", &name).await.map_err(|e| e.to_string())?;
                    }
                }
            }
            for (_, name) in live {
                k8s::delete_pod(&client, "churn", &name).await.map_err(|e| e.to_string())?;
            }
            Ok(made)
        })
    }
}

/// Builds the cluster at `scale`, measures, and checks that nothing was left behind.
pub fn run(scale: &Scale) -> Result<Report, String> {
    let mut cluster = Cluster::start(scale)?;
    let t0 = Instant::now();
    cluster.start_agents(scale.nodes)?;
    // Every node lists every pod of the other nodes.
    let expected: Vec<usize> = (0..scale.nodes).map(|i| cluster.pods.iter().filter(|p| p.node != i).count()).collect();
    let endpoints = |maps: &Maps| maps.endpoints().map(|e| e.len()).unwrap_or(0);
    cluster.until_every_node("the initial cluster", t0, SYNC_WAIT, |i, maps| endpoints(maps) == expected[i])?;
    let initial_sync = t0.elapsed();

    let pids = cluster.agent_pids();
    let before: Vec<Duration> = pids.iter().map(|p| cpu_time(*p)).collect();
    std::thread::sleep(IDLE_WINDOW);
    let idle_cpu_percent: Vec<f64> =
        pids.iter().zip(&before).map(|(p, b)| cpu_time(*p).saturating_sub(*b).as_secs_f64() / IDLE_WINDOW.as_secs_f64() * 100.0).collect();

    let quiet = cluster.series(scale, "q")?;
    let stop = Arc::new(AtomicBool::new(false));
    let churning = cluster.churn(scale.churn_per_second, scale.nodes, stop.clone());
    let under_churn = cluster.series(scale, "c");
    stop.store(true, Ordering::Relaxed);
    let churned_pods = cluster.rt.block_on(churning).map_err(|e| e.to_string())??;
    let under_churn = under_churn?;

    // Nothing left behind: every probe and churn pod is gone from every node, the cluster's
    // own pods are all still there.
    cluster.until_every_node("the end state", Instant::now(), SYNC_WAIT, |i, maps| endpoints(maps) == expected[i])?;
    let final_endpoints: Vec<(usize, usize)> = cluster.maps.iter().zip(&expected).map(|(m, e)| (endpoints(m), *e)).collect();
    let known: BTreeMap<Ipv4Addr, usize> = cluster.pods.iter().map(|p| (p.ip, p.node)).collect();
    for (i, maps) in cluster.maps.iter().enumerate() {
        let listed = maps.endpoints().map_err(|e| e.to_string())?;
        if let Some(stray) = listed.iter().find(|e| known.get(&e.ip).is_none_or(|n| *n == i)) {
            return Err(format!("{} still lists {}, which is no pod of another node", node_name(i), stray.ip));
        }
    }
    Ok(Report { scale: scale.clone(), initial_sync, quiet, under_churn, churned_pods, idle_cpu_percent, final_endpoints })
}

/// The figures as a table, each beside its floor and goal.
pub fn table(r: &Report) -> String {
    let s = &r.scale;
    let mut out = format!(
        "{} node agents, {} pods over {} namespaces, {} MeshPolicies; {} changes of each kind per series; \
         initial sync {:.1} s\n",
        s.nodes,
        s.namespaces * s.pods_per_namespace,
        s.namespaces,
        s.policies.min(s.namespaces),
        s.changes,
        r.initial_sync.as_secs_f64()
    );
    let goal = |kind: &str| match kind {
        "MeshPolicy created" | "MeshPolicy changed" => "p99 <= 300 ms",
        "pod deleted" => "p99 <= 200 ms",
        _ => "-",
    };
    let met = |kind: &str, p99: f64| match kind {
        "MeshPolicy created" | "MeshPolicy changed" => {
            if p99 <= 300.0 {
                " met"
            } else {
                " NOT met"
            }
        }
        "pod deleted" => {
            if p99 <= 200.0 {
                " met"
            } else {
                " NOT met"
            }
        }
        _ => "",
    };
    for (title, round) in
        [("quiet".to_owned(), &r.quiet), (format!("under churn ({} pods created and deleted)", r.churned_pods), &r.under_churn)]
    {
        out.push_str(&format!(
            "\n{title}\n{:<20} {:>9} {:>9} {:>9} {:>13} {:>13} {:>9}  goal\n",
            "change → all nodes", "p50 ms", "p99 ms", "max ms", "API p50 ms", "API p99 ms", "p50 / API"
        ));
        for (kind, series) in [
            ("MeshPolicy created", &round.policy_created),
            ("MeshPolicy changed", &round.policy_changed),
            ("pod created", &round.pod_created),
            ("pod deleted", &round.pod_deleted),
        ] {
            let (p50, p99, max) = percentiles(&series.all_nodes_ms);
            let (a50, a99, _) = percentiles(&series.api_write_ms);
            out.push_str(&format!(
                "{kind:<20} {p50:>9.1} {p99:>9.1} {max:>9.1} {a50:>13.1} {a99:>13.1} {:>9.1}  {}{}\n",
                p50 / a50,
                goal(kind),
                met(kind, p99)
            ));
        }
    }
    let cpu: Vec<String> = r.idle_cpu_percent.iter().map(|c| format!("{c:.2}")).collect();
    let worst = r.idle_cpu_percent.iter().copied().fold(0.0, f64::max);
    out.push_str(&format!(
        "\nidle agent CPU, % of one core over {} s: {} (goal ≈ 0: {})\n",
        IDLE_WINDOW.as_secs(),
        cpu.join(" "),
        if worst <= 1.0 { "met, each <= 1 %" } else { "NOT met" }
    ));
    let ends: Vec<String> = r.final_endpoints.iter().map(|(have, want)| format!("{have}/{want}")).collect();
    out.push_str(&format!("endpoints per node at the end (listed/expected): {}\n", ends.join(" ")));
    out
}
