//! The agent against the REAL SPIRE and kube-apiserver of the test environment
//! (`meshauth-testenv`): two nodes as network namespaces (the demo's `MeshBox`), a real
//! `meshauth-agent` per node reading the API server (`KUBECONFIG`) and its node's real SPIRE
//! agent Workload API socket, the real eBPF datapath, node-scoped SPIRE registration entries
//! with a 30 s X.509-SVID TTL (created here by hand; the operator does it in production).
//!
//! Everything asserted is what a user can see: entries in the pinned auth map, requests that
//! pass or fail, the datapath's drop counters, TCP retransmissions.
//!
//! Needs root, the testenv cache (`scripts/testenv-build`) and the agent binary next to
//! `meshauthctl` (`cargo build -p meshauth-agent`, or `MESHAUTH_AGENT_BIN=PATH`). One
//! environment and one box serve every test of this binary; the tests take turns (they share
//! the two agents and SPIRE agents, and some restart them).

use k8s_openapi::api::core::v1::Node as K8sNode;
use kube::api::{Api, Patch, PatchParams};
use meshauth_agent::handshake::{HandshakeClient, HostedIdentities};
use meshauth_agent::svid::{StoreConfig, SvidStore, SystemClock, WorkloadApiSource};
use meshauth_crds::SpiffeId;
use meshauth_datapath::netns::{Netns, Pod, Server, require_root, tcp_connect, tcp_echo_server, tcp_request, tcp_roundtrip};
use meshauth_datapath::{BootTime, Counter, Counters, Maps};
use meshauth_testenv::k8s::{self, TestPod};
use meshauth_testenv::{EntrySpec, TestEnv, svid};
use meshauthctl::demo::mesh::MeshBox;
use serde::Deserialize as _;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "support/agent_load.rs"]
#[allow(dead_code)] // the box metrics reader is the benches'
mod agent_load;
use agent_load::{agent_bin, answered, cpu_time};

const NODE1_ADDR: &str = "192.168.78.1";
const PAYMENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const PORT: u16 = 8080;
const SVID_TTL: u32 = 30;
/// Below TCP's 1 s initial SYN retransmission timeout: a dropped SYN is a failed request.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(900);

/// The mesh, as the API server holds it and as the box is built from it.
/// - order-0 → payment-0:8080: the pair most tests follow;
/// - refund-0: sends nothing until the pre-authentication test;
/// - checkout-0: deleted by an impostor test;
/// - audit-0: on node-1, but SPIRE registers its identity under node-2's agent only.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 192.168.78.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.78.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: order-0, namespace: shop, labels: {app: order-service}}
spec: {serviceAccountName: order, nodeName: node-1, containers: [{name: main, image: shop/order:1}]}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: refund-0, namespace: shop, labels: {app: order-service}}
spec: {serviceAccountName: refund, nodeName: node-1, containers: [{name: main, image: shop/refund:1}]}
status: {podIP: 10.244.1.12}
---
apiVersion: v1
kind: Pod
metadata: {name: checkout-0, namespace: shop, labels: {app: order-service}}
spec: {serviceAccountName: checkout, nodeName: node-1, containers: [{name: main, image: shop/checkout:1}]}
status: {podIP: 10.244.1.13}
---
apiVersion: v1
kind: Pod
metadata: {name: audit-0, namespace: shop, labels: {app: order-service}}
spec: {serviceAccountName: audit, nodeName: node-1, containers: [{name: main, image: shop/audit:1}]}
status: {podIP: 10.244.1.14}
---
apiVersion: v1
kind: Pod
metadata: {name: payment-0, namespace: shop, labels: {app: payment-service}}
spec: {serviceAccountName: payment, nodeName: node-2, containers: [{name: main, image: shop/payment:1}]}
status: {podIP: 10.244.2.10}
---
apiVersion: meshauth.io/v1alpha1
kind: MutualAuth
metadata: {name: payment-strict, namespace: shop}
spec:
  selector: {matchLabels: {app: payment-service}}
  mode: Strict
---
apiVersion: meshauth.io/v1alpha1
kind: MeshPolicy
metadata: {name: payment-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: payment-service}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: order-service}}
    ports:
    - {port: 8080, protocol: TCP}
    authentication: {mode: Required}
"#;

/// SPIRE registrations: (service account in `shop`, node whose SPIRE agent is the parent).
/// audit is registered under node-2, which hosts no audit pod: a node that could present an
/// identity it does not host.
const REGISTRATIONS: &[(&str, &str)] =
    &[("order", "node-1"), ("refund", "node-1"), ("checkout", "node-1"), ("payment", "node-2"), ("audit", "node-2")];

// ---------------------------------------------------------------------------------------------
// The shared fixture

struct Registered {
    service_account: String,
    node: String,
    entry_id: String,
}

/// Fields drop in order: servers, pods, the box (agents stopped, namespaces and pins removed).
struct Fixture {
    _servers: Vec<Server>,
    pods: BTreeMap<String, Pod>,
    mesh: MeshBox,
    env: &'static TestEnv,
    client: kube::Client,
    rt: tokio::runtime::Runtime,
    /// Each node's SPIRE agent ID now (a restarted join-token agent gets a new one).
    agent_ids: BTreeMap<String, String>,
    registered: Vec<Registered>,
    /// SPIRE agents this test restarted (the environment's `down` stops them by pid file).
    spire_agents: Vec<Child>,
}

enum Slot {
    Empty,
    Failed(String),
    Ready(Box<Fixture>),
}

static FIXTURE: Mutex<Slot> = Mutex::new(Slot::Empty);

/// Runs `f` with the shared fixture (built on first use), one test at a time.
fn with_fixture<T>(f: impl FnOnce(&mut Fixture) -> T) -> T {
    let mut slot = FIXTURE.lock().unwrap_or_else(PoisonError::into_inner);
    if matches!(*slot, Slot::Empty) {
        *slot = Slot::Failed("the fixture panicked while starting (see the first test's output)".into());
        // SAFETY: registers a plain extern "C" function once; it runs at process exit.
        unsafe { libc::atexit(cleanup) };
        *slot = match Fixture::start() {
            Ok(fx) => Slot::Ready(Box::new(fx)),
            Err(e) => Slot::Failed(e),
        };
    }
    match &mut *slot {
        Slot::Ready(fx) => {
            // A test that failed with a SPIRE agent stopped leaves it stopped: the next test
            // starts from a whole environment, so one failure is not taken for several.
            fx.restart_stopped_spire_agents();
            f(fx)
        }
        Slot::Failed(e) => panic!("fixture unavailable: {e}"),
        Slot::Empty => unreachable!(),
    }
}

/// At exit: stop the agents and remove the box (the environment's watchdog stops SPIRE and the
/// API server once this process is gone). Statics are never dropped, hence atexit.
extern "C" fn cleanup() {
    let mut slot = match FIXTURE.try_lock() {
        Ok(s) => s,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    if let Slot::Ready(fx) = std::mem::replace(&mut *slot, Slot::Empty) {
        drop(fx);
    }
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("MESH: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

impl Fixture {
    fn start() -> Result<Self, String> {
        require_root();
        let t0 = Instant::now();
        let agent_bin = agent_bin();
        if !agent_bin.exists() {
            return Err(format!(
                "{} is missing: build it with `cargo build -p meshauth-agent` (or set MESHAUTH_AGENT_BIN)",
                agent_bin.display()
            ));
        }
        let env = TestEnv::shared_blocking().map_err(|e| e.to_string())?;
        eprintln!("agent_spire: test environment up in {:.1} s ({})", t0.elapsed().as_secs_f64(), env.dir().display());
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(|e| e.to_string())?;
        let client = rt.block_on(env.client()).map_err(|e| e.to_string())?;

        // The cluster: CRDs, then every object of MESH.
        rt.block_on(async {
            k8s::install_crds(&client, &k8s::crd_dir(), Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
            for doc in docs(MESH) {
                apply(&client, &doc).await?;
            }
            Ok::<_, String>(())
        })?;

        let agent_ids: BTreeMap<String, String> = env.nodes().iter().map(|n| (n.name.clone(), n.agent_id.clone())).collect();

        // The box, from the same objects.
        let mut parsed = meshauth_cluster::manifests::Manifests::default();
        parsed.add_source("mesh.yaml", MESH).map_err(|e| e.to_string())?;
        let dir = env.dir().join("box");
        let manifests_dir = dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir).map_err(|e| e.to_string())?;
        std::fs::write(manifests_dir.join("mesh.yaml"), MESH).map_err(|e| e.to_string())?;
        let tag = format!("as{}", std::process::id() % 100_000);
        let mut mesh = MeshBox::build(&tag, dir, manifests_dir, &parsed, agent_bin, Duration::from_secs(u64::from(SVID_TTL)))
            .map_err(|e| e.to_string())?;
        let port = env.api_port().ok_or("no port in the kubeconfig's server")?;
        mesh.use_api_server(env.kubeconfig(), port).map_err(|e| e.to_string())?;
        for node in env.nodes() {
            mesh.set_workload_socket(&node.name, node.agent_socket.clone());
        }
        let pods = std::mem::take(&mut mesh.pods);
        let servers = vec![tcp_echo_server(&pods["shop/payment-0"], PORT).map_err(|e| e.to_string())?];

        let mut fx =
            Fixture { _servers: servers, pods, mesh, env, client, rt, agent_ids, registered: Vec::new(), spire_agents: Vec::new() };
        for (sa, node) in REGISTRATIONS {
            fx.register(sa, node)?;
        }
        fx.mesh.start_agent("node-2").map_err(|e| e.to_string())?;
        fx.mesh.start_agent("node-1").map_err(|e| e.to_string())?;
        eprintln!("agent_spire: fixture ready in {:.1} s (box logs under {})", t0.elapsed().as_secs_f64(), fx.mesh.dir.display());
        Ok(fx)
    }

    fn id(&self, service_account: &str) -> String {
        self.env.workload_id("shop", service_account)
    }

    fn pod(&self, name: &str) -> &Pod {
        &self.pods[name]
    }

    /// A node-scoped entry: `shop/<sa>` for the SPIRE agent of `node`, any root process
    /// (`unix:uid:0`: the meshauth agent runs as root), 30 s SVIDs.
    fn register(&mut self, service_account: &str, node: &str) -> Result<(), String> {
        let spec = EntrySpec::new(self.id(service_account), &self.agent_ids[node]).selector("unix:uid:0").x509_svid_ttl(SVID_TTL);
        let entry = self.rt.block_on(self.env.spire().create_entry(&spec)).map_err(|e| e.to_string())?;
        self.registered.push(Registered { service_account: service_account.into(), node: node.into(), entry_id: entry.id });
        Ok(())
    }

    fn maps(&self, node: &str) -> Maps {
        let pins = &self.mesh.node(node).unwrap_or_else(|| panic!("no node {node}")).pin_dir;
        Maps::open(pins).unwrap_or_else(|e| panic!("opening {node}'s maps at {}: {e}", pins.display()))
    }

    /// The auth entry (destination `shop/<dst>`, source `shop/<src>`) of `node`'s map, with
    /// its expiry as wall time (in the past when present but expired).
    fn entry(&self, node: &str, dst: &str, src: &str) -> Option<SystemTime> {
        let maps = self.maps(node);
        let names = maps.spiffe_names().unwrap_or_else(|e| panic!("{e}"));
        let number = |id: String| names.iter().find(|(_, n)| **n == id).map(|(k, _)| *k);
        let (d, s) = (number(self.id(dst))?, number(self.id(src))?);
        let entries = maps.auth_entries().unwrap_or_else(|e| panic!("{e}"));
        entries.iter().find(|e| e.dst_spiffe_id == d && e.src_spiffe_id == s).map(|e| wall(e.expiry))
    }

    /// Waits for a live auth entry; panics with the agent logs' tail after `timeout`.
    fn wait_entry(&self, node: &str, dst: &str, src: &str, timeout: Duration) -> SystemTime {
        let start = Instant::now();
        loop {
            if let Some(expiry) = self.entry(node, dst, src).filter(|e| *e > SystemTime::now()) {
                return expiry;
            }
            if start.elapsed() > timeout {
                panic!("no live auth entry ({dst} <- {src}) in {node}'s map after {timeout:?}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn counters(&self, node: &str) -> Counters {
        self.maps(node).counters().unwrap_or_else(|e| panic!("{e}"))
    }

    /// The SVID the node's SPIRE agent hands out for `shop/<sa>` now: its notAfter (unix s).
    fn svid_not_after(&self, node: &str, service_account: &str) -> (i64, String) {
        let endpoint = format!("unix:{}", self.env.node(node).unwrap_or_else(|e| panic!("{e}")).agent_socket.display());
        let (got, bundle) = self
            .rt
            .block_on(svid::wait_for_svid(&endpoint, &self.id(service_account), Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{node}'s SPIRE agent: {e}"));
        let v = svid::verify_svid(&got, &bundle).unwrap_or_else(|e| panic!("{e}"));
        (v.not_after, v.serial)
    }

    /// The tails of both agents' logs, for failure messages.
    fn logs(&self) -> String {
        ["node-1", "node-2"]
            .iter()
            .map(|n| {
                let log = self.mesh.agent_log(n);
                let tail: Vec<&str> = log.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect();
                format!("---- {n} agent log (tail)\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    // -- the SPIRE agent of a node, stopped and started again

    fn spire_pid_file(&self, node: &str) -> PathBuf {
        self.env.dir().join("run").join(format!("spire-agent-{node}.pid"))
    }

    /// Starts again each node's SPIRE agent that is not running.
    fn restart_stopped_spire_agents(&mut self) {
        for node in ["node-1", "node-2"] {
            let pid: Option<i32> = std::fs::read_to_string(self.spire_pid_file(node)).ok().and_then(|s| s.trim().parse().ok());
            if !pid.is_some_and(alive) {
                eprintln!("the SPIRE agent of {node} is not running (an earlier test stopped it): starting it");
                self.start_spire_agent(node);
            }
        }
    }

    /// SIGTERM to the node's SPIRE agent (its own process group, as `tests/testenv` starts it).
    fn stop_spire_agent(&mut self, node: &str) {
        let pid_file = self.spire_pid_file(node);
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no pid in {}", pid_file.display()));
        // SAFETY: signals the process recorded by the environment for this node.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while alive(pid) {
            assert!(start.elapsed() < Duration::from_secs(15), "SPIRE agent {pid} still runs 15 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
            for c in &mut self.spire_agents {
                let _ = c.try_wait();
            }
        }
    }

    /// Starts the node's SPIRE agent again with its config, data dir and socket. Join tokens
    /// are single use and the agent keeps its key in memory, so it attests again with a new
    /// token and gets a new agent ID: the node's entries are re-parented to it (what the
    /// operator does from the Node's `meshauth.io/spire-agent-id` annotation).
    fn start_spire_agent(&mut self, node: &str) -> Duration {
        let env = self.env;
        let out = Command::new(env.bin("spire-server"))
            .args(["token", "generate", "-ttl", "600", "-socketPath"])
            .arg(env.spire_server_socket())
            .output()
            .unwrap_or_else(|e| panic!("spire-server token generate: {e}"));
        let text = String::from_utf8_lossy(&out.stdout);
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("Token:"))
            .map(|t| t.trim().to_owned())
            .unwrap_or_else(|| panic!("no token in {text:?} {}", String::from_utf8_lossy(&out.stderr)));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(env.log(&format!("spire-agent-{node}")))
            .unwrap_or_else(|e| panic!("{e}"));
        let err = log.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let started = Instant::now();
        let child = Command::new(env.bin("spire-agent"))
            .args(["run", "-config"])
            .arg(env.dir().join("nodes").join(node).join("agent.conf"))
            .args(["-joinToken", &token])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting spire-agent: {e}"));
        // Recorded where `tests/testenv down` (and its watchdog) look.
        let pid_file = self.spire_pid_file(node);
        std::fs::write(&pid_file, format!("{}\n", child.id())).unwrap_or_else(|e| panic!("{e}"));
        self.spire_agents.push(child);
        let socket = env.node(node).unwrap_or_else(|e| panic!("{e}")).agent_socket.clone();
        loop {
            let ok = Command::new(env.bin("spire-agent"))
                .args(["healthcheck", "-socketPath"])
                .arg(&socket)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "restarted SPIRE agent of {node} not healthy after 60 s; see {}",
                env.log(&format!("spire-agent-{node}")).display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let healthy = started.elapsed();
        let new_id = format!("spiffe://{}/spire/agent/join_token/{token}", env.trust_domain());
        self.agent_ids.insert(node.to_owned(), new_id.clone());
        let old: Vec<Registered> = {
            let (mine, rest) = std::mem::take(&mut self.registered).into_iter().partition(|r| r.node == node);
            self.registered = rest;
            mine
        };
        for r in &old {
            self.rt.block_on(env.spire().delete_entry(&r.entry_id)).unwrap_or_else(|e| panic!("{e}"));
            self.register(&r.service_account, node).unwrap_or_else(|e| panic!("{e}"));
        }
        let nodes: Api<K8sNode> = Api::all(self.client.clone());
        let patch = json!({"metadata": {"annotations": {meshauth_testenv::NODE_AGENT_ID_ANNOTATION: new_id}}});
        self.rt.block_on(nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch))).unwrap_or_else(|e| panic!("{e}"));
        healthy
    }
}

/// Creates one object of MESH in the API server (Nodes exist already: they get their agent
/// address annotation; Pods get their IP through the status subresource).
async fn apply(client: &kube::Client, doc: &Value) -> Result<(), String> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let ns = doc["metadata"]["namespace"].as_str().unwrap_or_default();
    let labels: BTreeMap<String, String> = serde_json::from_value(doc["metadata"]["labels"].clone()).unwrap_or_default();
    let e = |e: &dyn std::fmt::Display| format!("{kind} {ns}/{name}: {e}");
    match kind {
        "Namespace" => k8s::label_namespace(client, name, &labels).await.map_err(|x| e(&x)),
        "Node" => {
            let addr = doc["status"]["addresses"][0]["address"].as_str().unwrap_or_default();
            k8s::set_node_address(client, name, addr).await.map_err(|x| e(&x))
        }
        "Pod" => {
            let mut pod = TestPod::new(ns, name)
                .service_account(doc["spec"]["serviceAccountName"].as_str().unwrap_or("default"))
                .node(doc["spec"]["nodeName"].as_str().unwrap_or_default());
            pod.labels = labels;
            k8s::create_pod(client, &pod).await.map_err(|x| e(&x))?;
            k8s::set_pod_status(client, ns, name, "Running", doc["status"]["podIP"].as_str()).await.map(|_| ()).map_err(|x| e(&x))
        }
        "MutualAuth" | "MeshPolicy" => {
            let plural = if kind == "MutualAuth" { "mutualauths" } else { "meshpolicies" };
            let api = k8s::dynamic_api(client, "meshauth.io", "v1alpha1", kind, plural, ns);
            k8s::create_dynamic(&api, doc.clone()).await.map(|_| ()).map_err(|x| e(&x))
        }
        other => Err(format!("MESH has an unexpected kind {other}")),
    }
}

fn alive(pid: i32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
}

/// A boot-clock instant of the maps as wall time.
fn wall(b: BootTime) -> SystemTime {
    let (now_b, now) = (BootTime::now(), SystemTime::now());
    if b >= now_b { now + Duration::from_nanos(b.0 - now_b.0) } else { now - Duration::from_nanos(now_b.0 - b.0) }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn auth_drops(c: &Counters) -> u64 {
    c.packets(Counter::DropAuthMissing) + c.packets(Counter::DropAuthExpired)
}

#[derive(Debug, Default)]
struct Flow {
    sent: u64,
    failed: u64,
}

/// A new TCP connection (and one echo) from `client` to payment:8080 every `every` while
/// `during` runs.
fn with_flow<T>(client: &Pod, every: Duration, during: impl FnOnce() -> T) -> (Flow, T) {
    let stop = AtomicBool::new(false);
    let (sent, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                sent.fetch_add(1, Ordering::Relaxed);
                if !tcp_request(client, PAYMENT_IP, PORT, REQUEST_TIMEOUT) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(every);
            }
        });
        let out = during();
        stop.store(true, Ordering::Relaxed);
        out
    });
    (Flow { sent: sent.into_inner(), failed: failed.into_inner() }, out)
}

// ---------------------------------------------------------------------------------------------
// The tests

/// Two nodes' agents authenticate a pair and the auth entry appears with the right
/// expiry: no later than either SVID's notAfter, and within the 30 s TTL.
#[test]
fn agents_authenticate_the_pair_with_an_expiry_no_later_than_either_svid() {
    with_fixture(|fx| {
        let start = Instant::now();
        let expiry = fx.wait_entry("node-2", "payment", "order", Duration::from_secs(60));
        let waited = start.elapsed();
        // What the SPIRE agents hand out now (the same SVIDs, or later ones after a rotation).
        let (order_na, _) = fx.svid_not_after("node-1", "order");
        let (payment_na, _) = fx.svid_not_after("node-2", "payment");
        let expiry = fx.entry("node-2", "payment", "order").unwrap_or(expiry);
        let (e, now) = (unix(expiry), unix(SystemTime::now()));
        eprintln!(
            "entry (payment <- order) after {waited:?}: expires in {:.1} s; SVID notAfter order {} s, payment {} s from now",
            e - now,
            order_na as f64 - now,
            payment_na as f64 - now
        );
        assert!(e > now, "the entry has expired");
        assert!(
            e <= order_na.min(payment_na) as f64 + 0.5,
            "entry expiry {e} later than an SVID's notAfter (order {order_na}, payment {payment_na})"
        );
        assert!(e - now <= f64::from(SVID_TTL) + 1.0, "entry lives {} s, beyond the {SVID_TTL} s SVIDs", e - now);
        // The entry is what lets the pair through Strict.
        assert!(tcp_request(fx.pod("shop/order-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT), "order-0 -> payment-0:8080 failed\n{}", fx.logs());
        // Enforcement is at the destination's node: node-1 hosts no Strict destination.
        assert_eq!(fx.entry("node-1", "payment", "order"), None, "node-1 holds an entry it does not enforce");
    });
}

/// SVIDs with a 30 s TTL rotate under a continuous flow through the datapath with
/// zero dropped packets: a new connection every ~50 ms for 40 s.
#[test]
fn svids_rotate_under_a_continuous_flow_with_zero_failed_requests() {
    with_fixture(|fx| {
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(60));
        let (first_na, first_serial) = fx.svid_not_after("node-1", "order");
        let before = fx.counters("node-2");
        let client = fx.pod("shop/order-0").ns.tcp_retransmits().unwrap_or_else(|e| panic!("{e}"));
        let fx_ref = &*fx;
        let (flow, expiries) = with_flow(fx_ref.pod("shop/order-0"), Duration::from_millis(50), || {
            let mut seen: Vec<f64> = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(40) {
                if let Some(e) = fx_ref.entry("node-2", "payment", "order").map(unix)
                    && seen.last().is_none_or(|l| (e - l).abs() > 0.5)
                {
                    seen.push(e);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            seen
        });
        let after = fx.counters("node-2");
        let retrans = fx.pod("shop/order-0").ns.tcp_retransmits().unwrap_or_else(|e| panic!("{e}")) - client;
        let (last_na, last_serial) = fx.svid_not_after("node-1", "order");
        let now = unix(SystemTime::now());
        eprintln!(
            "flow: {} connections, {} failed, {retrans} retransmissions; auth drops on node-2: {}; entry expiries seen (s from now): {:?}; order SVID {first_serial} -> {last_serial}",
            flow.sent,
            flow.failed,
            auth_drops(&after) - auth_drops(&before),
            expiries.iter().map(|e| (e - now).round()).collect::<Vec<_>>()
        );
        assert!(flow.sent >= 300, "only {} connections in 40 s", flow.sent);
        assert_eq!(flow.failed, 0, "{} of {} connections failed across rotation\n{}", flow.failed, flow.sent, fx.logs());
        assert_eq!(auth_drops(&after), auth_drops(&before), "node-2 dropped packets for lack of authentication");
        assert_eq!(retrans, 0, "TCP retransmissions in order-0");
        assert_ne!(first_serial, last_serial, "the order SVID did not rotate in 40 s");
        // Entries never outlive the SVIDs, so an expiry beyond the first SVID's notAfter
        // proves a re-handshake with a rotated SVID.
        let last = expiries.last().copied().unwrap_or(0.0);
        assert!(
            expiries.len() >= 2 && last > first_na as f64 + 1.0,
            "the entry was not renewed past the first SVID ({first_na}): {expiries:?}"
        );
        assert!(last <= last_na as f64 + 0.5, "entry expiry {last} beyond the current SVID's notAfter {last_na}");
    });
}

/// The SPIRE agent restarting leaves existing entries until they expire and new
/// handshakes resume after.
#[test]
fn a_spire_agent_restart_keeps_entries_until_they_expire_and_handshakes_resume() {
    with_fixture(|fx| {
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(60));
        fx.stop_spire_agent("node-1");
        let stopped = SystemTime::now();
        assert!(
            tcp_request(fx.pod("shop/order-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT),
            "the pair stopped passing as soon as SPIRE went away; node-2 counters {:?}\n{}",
            fx.counters("node-2"),
            fx.logs()
        );

        // The entry stays, never beyond an SVID minted before SPIRE stopped, until it expires.
        let mut last_expiry: Option<SystemTime> = None;
        let gone_at = loop {
            let now = SystemTime::now();
            match fx.entry("node-2", "payment", "order") {
                Some(e) if e > now => last_expiry = Some(last_expiry.map_or(e, |l| l.max(e))),
                _ => break now,
            }
            assert!(now < stopped + Duration::from_secs(45), "the entry outlived 45 s without SPIRE\n{}", fx.logs());
            std::thread::sleep(Duration::from_millis(100));
        };
        let last_expiry = last_expiry.unwrap_or_else(|| panic!("no live entry right after the SPIRE agent stopped"));
        eprintln!(
            "SPIRE agent of node-1 down: entry kept {:.1} s, expired {:.2} s after its expiry",
            unix(gone_at) - unix(stopped),
            unix(gone_at) - unix(last_expiry)
        );
        assert!(
            last_expiry <= stopped + Duration::from_secs(u64::from(SVID_TTL) + 1),
            "an entry expiring after any SVID SPIRE could have issued"
        );
        assert!(
            unix(gone_at) >= unix(last_expiry) - 0.3,
            "the entry went away {:.2} s before its expiry",
            unix(last_expiry) - unix(gone_at)
        );
        // Fail closed: no valid SVID on node-1, no entry, no traffic.
        assert!(!tcp_request(fx.pod("shop/order-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT), "the pair still passes with every SVID expired");

        let restarted = Instant::now();
        let healthy = fx.start_spire_agent("node-1");
        // New handshakes resume (a dropped packet also asks the agent to handshake at once).
        let resumed = loop {
            if tcp_request(fx.pod("shop/order-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT) {
                break restarted.elapsed();
            }
            assert!(restarted.elapsed() < Duration::from_secs(90), "no handshake 90 s after the SPIRE agent restarted\n{}", fx.logs());
            std::thread::sleep(Duration::from_millis(500));
        };
        let expiry = fx.wait_entry("node-2", "payment", "order", Duration::from_secs(5));
        eprintln!(
            "SPIRE agent healthy after {healthy:?}; the pair passes again {resumed:?} after the restart; entry expires in {:.1} s",
            unix(expiry) - unix(SystemTime::now())
        );
    });
}

/// With the source node's SPIRE agent stopped no SVID of its can rotate, so
/// no re-authentication can extend the pair's entry. The destination's agent used to
/// handshake for it hundreds of times a second once less than the 5 s margin was left; now a
/// handful of handshakes until the entry ends.
#[test]
fn with_spire_stopped_a_pair_costs_a_handful_of_handshakes_until_its_entry_ends() {
    with_fixture(|fx| {
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(60));
        let pid = fx.mesh.node("node-2").and_then(|n| n.agent.as_ref()).map(Child::id).unwrap_or_else(|| panic!("no node-2 agent"));
        let log_from = fx.mesh.agent_log("node-1").len();
        let cpu_before = cpu_time(pid);
        fx.stop_spire_agent("node-1");
        let stopped = Instant::now();
        while fx.entry("node-2", "payment", "order").is_some_and(|e| e > SystemTime::now()) {
            assert!(stopped.elapsed() < Duration::from_secs(45), "the entry outlived 45 s without SPIRE\n{}", fx.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        // The entry's last seconds are where the storm was: count a little past them.
        std::thread::sleep(Duration::from_secs(2));
        let outage = stopped.elapsed();
        let (local, peer) = (fx.id("order"), fx.id("payment"));
        let handshakes = answered(&fx.mesh.agent_log("node-1"), log_from, &local, &peer);
        let cpu = cpu_time(pid).saturating_sub(cpu_before);
        eprintln!(
            "SPIRE agent of node-1 down for {outage:?}: {handshakes} handshakes for (payment <- order) until its entry ended; node-2's agent used {cpu:?} of CPU"
        );
        assert!(handshakes <= 15, "{handshakes} handshakes for one pair in {outage:?} without SPIRE\n{}", fx.logs());
        fx.start_spire_agent("node-1");
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(90));
    });
}

/// The meshauth agent restarting keeps the flows of authenticated pairs going
/// (zero drops): both nodes' agents, one after the other, under a connection every 50 ms.
#[test]
fn a_meshauth_agent_restart_keeps_authenticated_flows_going() {
    with_fixture(|fx| {
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(90));
        let before = fx.counters("node-2");
        let Fixture { pods, mesh, .. } = &mut *fx;
        let (flow, restarts) = with_flow(&pods["shop/order-0"], Duration::from_millis(50), || {
            let mut results = Vec::new();
            for node in ["node-2", "node-1"] {
                std::thread::sleep(Duration::from_secs(1));
                mesh.stop_agent(node);
                std::thread::sleep(Duration::from_secs(1));
                results.push((node, mesh.start_agent(node).map_err(|e| e.to_string())));
            }
            std::thread::sleep(Duration::from_secs(3));
            results
        });
        let after = fx.counters("node-2");
        eprintln!(
            "agent restarts under a flow: {} connections, {} failed, {} auth drops",
            flow.sent,
            flow.failed,
            auth_drops(&after) - auth_drops(&before)
        );
        for (node, r) in &restarts {
            assert!(r.is_ok(), "{node}'s agent did not come back: {r:?}");
        }
        assert_eq!(flow.failed, 0, "{} of {} connections failed across agent restarts\n{}", flow.failed, flow.sent, fx.logs());
        assert!(flow.sent >= 50, "only {} connections", flow.sent);
        assert_eq!(auth_drops(&after), auth_drops(&before), "node-2 dropped packets for lack of authentication");
        let log = fx.mesh.agent_log("node-2");
        let adopted = log.lines().rfind(|l| l.contains("datapath ready")).is_some_and(|l| l.contains("adopted=true"));
        assert!(adopted, "node-2's restarted agent did not adopt the pinned datapath");
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(5));
    });
}

/// A new connection of a pre-authenticated pair sees no drop and no SYN
/// retransmission; refund-0 never sent a packet before, its pair was authenticated ahead.
#[test]
fn a_new_connection_of_a_pre_authenticated_pair_sees_no_drop_and_no_syn_retransmission() {
    with_fixture(|fx| {
        let before = fx.counters("node-2");
        let expiry = fx.wait_entry("node-2", "payment", "refund", Duration::from_secs(90));
        assert!(expiry > SystemTime::now());
        let client = fx.pod("shop/refund-0");
        let retrans_before = client.ns.tcp_retransmits().unwrap_or_else(|e| panic!("{e}"));
        let t = Instant::now();
        let conn = tcp_connect(client, PAYMENT_IP, PORT, Duration::from_secs(3));
        let connect = t.elapsed();
        let answered = conn.map(|mut c| tcp_roundtrip(&mut c, b"first")).unwrap_or(false);
        let retrans = client.ns.tcp_retransmits().unwrap_or_else(|e| panic!("{e}")) - retrans_before;
        let after = fx.counters("node-2");
        eprintln!("refund-0 -> payment-0:8080: connected in {:.2} ms, {retrans} retransmissions", connect.as_secs_f64() * 1000.0);
        assert!(answered, "the first connection of the pair failed\n{}", fx.logs());
        assert_eq!(retrans, 0, "SYN (or data) retransmitted");
        assert!(connect < Duration::from_millis(200), "connect took {connect:?}: a dropped SYN");
        assert_eq!(auth_drops(&after), auth_drops(&before), "node-2 dropped packets of a pre-authenticated pair");
        assert_eq!(after.packets(Counter::DropDenied), before.packets(Counter::DropDenied));
        assert!(after.packets(Counter::PassAuthenticated) > before.packets(Counter::PassAuthenticated), "not passed as authenticated");
    });
}

/// An impostor: a pod that is gone. Its pair's entry leaves the auth map and its address no
/// longer gets through.
#[test]
fn a_deleted_pods_pair_leaves_the_auth_map_and_its_traffic_is_dropped() {
    with_fixture(|fx| {
        fx.wait_entry("node-2", "payment", "checkout", Duration::from_secs(90));
        assert!(
            tcp_request(fx.pod("shop/checkout-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT),
            "checkout-0 cannot reach payment while authenticated\n{}",
            fx.logs()
        );
        fx.rt.block_on(k8s::delete_pod(&fx.client, "shop", "checkout-0")).unwrap_or_else(|e| panic!("{e}"));
        let deleted = Instant::now();
        while fx.entry("node-2", "payment", "checkout").is_some() {
            assert!(
                deleted.elapsed() < Duration::from_secs(10),
                "the entry of a deleted pod's pair is still there after 10 s\n{}",
                fx.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let removed = deleted.elapsed();
        let before = fx.counters("node-2");
        let ok = tcp_request(fx.pod("shop/checkout-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT);
        let after = fx.counters("node-2");
        eprintln!("checkout-0 deleted: entry removed after {removed:?}; its address now {}", if ok { "passes" } else { "is dropped" });
        assert!(!ok, "a deleted pod's address still reaches payment");
        assert!(after.dropped() > before.dropped(), "nothing counted as dropped at node-2");
    });
}

/// The handshake's "who hosts what" checks, with a client under our control on node-2 that
/// holds real SPIRE SVIDs for everything node-2's SPIRE agent gives it and claims to host
/// everything. It asks node-1's agent for order's identity.
struct ClaimsEverything;

impl HostedIdentities for ClaimsEverything {
    fn is_hosted_here(&self, _: &SpiffeId) -> bool {
        true
    }

    fn identity_hosted_at(&self, _: &SpiffeId, _: IpAddr) -> bool {
        true
    }

    fn is_node(&self, _: IpAddr) -> bool {
        true
    }
}

fn handshakes_from(ns: &Netns, socket: &Path, peer: SocketAddr, attempts: &[(String, String)]) -> Vec<Result<(), String>> {
    let (socket, attempts) = (socket.display().to_string(), attempts.to_vec());
    ns.run(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
        // A current-thread runtime on this thread: the sockets are made in the node's namespace.
        rt.block_on(async move {
            let (store, task) = SvidStore::spawn(Arc::new(WorkloadApiSource::new(socket)), StoreConfig::default(), Arc::new(SystemClock));
            let client = HandshakeClient::new(store.clone(), Arc::new(ClaimsEverything)).with_timeout(Duration::from_secs(5));
            let mut out = Vec::new();
            for (local, expected) in attempts {
                let (local, expected) = (
                    SpiffeId::parse(&local).unwrap_or_else(|e| panic!("{e}")),
                    SpiffeId::parse(&expected).unwrap_or_else(|e| panic!("{e}")),
                );
                if let Err(e) = store.wait_available(&local, Duration::from_secs(30)).await {
                    out.push(Err(format!("no SVID of our own: {e}")));
                    continue;
                }
                out.push(client.authenticate(peer, &local, &expected).await.map(|_| ()).map_err(|e| format!("{}: {e}", e.reason())));
            }
            task.abort();
            out
        })
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Impostors (... a node that does not host the identity) are refused on either side
/// and no entry appears. SPIRE (mis)registers audit under node-2, which hosts no audit pod;
/// audit-0 runs on node-1, which has no audit SVID.
#[test]
fn a_node_that_does_not_host_an_identity_is_refused_and_no_entry_appears() {
    with_fixture(|fx| {
        fx.wait_entry("node-2", "payment", "order", Duration::from_secs(90));
        // node-2 really holds a valid audit SVID from SPIRE.
        let (audit_na, _) = fx.svid_not_after("node-2", "audit");
        assert!(audit_na as f64 > unix(SystemTime::now()));

        // 1. node-1 hosts audit-0 but has no SVID for it: fail closed, no entry, traffic dropped.
        let before = fx.counters("node-2");
        let ok = tcp_request(fx.pod("shop/audit-0"), PAYMENT_IP, PORT, REQUEST_TIMEOUT);
        std::thread::sleep(Duration::from_secs(3));
        let after = fx.counters("node-2");
        assert!(!ok, "audit-0 reached payment without any node able to prove audit");
        assert!(after.packets(Counter::DropAuthMissing) > before.packets(Counter::DropAuthMissing), "not dropped as auth-missing");
        assert_eq!(fx.entry("node-2", "payment", "audit"), None, "an entry for audit, which no hosting node can prove");

        // 2. A client on node-2 presents identities to node-1's agent.
        let node2 = fx.env.node("node-2").unwrap_or_else(|e| panic!("{e}")).agent_socket.clone();
        let peer: SocketAddr = format!("{NODE1_ADDR}:4250").parse().unwrap_or_else(|e| panic!("{e}"));
        let attempts = vec![
            // Control: payment runs on node-2, order on node-1: accepted.
            (fx.id("payment"), fx.id("order")),
            // Impostor: audit's SVID is valid and signed by SPIRE, but node-2 hosts no audit pod.
            (fx.id("audit"), fx.id("order")),
            // Asking node-1 for an identity it hosts but holds no SVID for.
            (fx.id("payment"), fx.id("audit")),
            // Asking node-1 for an identity it does not host (node-1 has no payment SVID either).
            (fx.id("payment"), fx.id("payment")),
        ];
        let results = handshakes_from(&fx.mesh.node("node-2").unwrap_or_else(|| panic!("node-2")).ns, &node2, peer, &attempts);
        for ((local, expected), r) in attempts.iter().zip(&results) {
            eprintln!("node-2 presenting {local}, asking node-1 for {expected}: {r:?}");
        }
        assert!(results[0].is_ok(), "control handshake refused: {:?}\n{}", results[0], fx.logs());
        for r in &results[1..] {
            assert!(r.is_err(), "an impostor handshake was accepted: {results:?}");
        }
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(fx.entry("node-2", "payment", "audit"), None, "an entry appeared for audit");
        assert!(fx.maps("node-1").auth_entries().unwrap_or_else(|e| panic!("{e}")).is_empty(), "node-1 wrote auth entries");
    });
}
