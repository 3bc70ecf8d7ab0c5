//! Shared by the operator's integration tests: the real test environment (kube-apiserver,
//! etcd, SPIRE server and agents from `meshauth-testenv`), the operator binary run as a
//! subprocess (stopped when its guard drops, also on panic), and polling helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_testenv::{TestEnv, k8s};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The operator binary of this build; `MESHAUTH_OPERATOR_BIN` overrides it (e.g. a release
/// build for the benchmark).
pub fn operator_bin() -> PathBuf {
    std::env::var_os("MESHAUTH_OPERATOR_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_meshauth-operator")), PathBuf::from)
}
/// The lease duration the tests run the operator with, in seconds.
pub const LEASE_SECONDS: u64 = 6;

/// Fails the test with the error's message.
pub trait OrPanic<T> {
    fn or_panic(self, what: &str) -> T;
}

impl<T, E: std::fmt::Display> OrPanic<T> for Result<T, E> {
    fn or_panic(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e}"))
    }
}

/// The environment of this test binary with the CRDs and the operator's namespace installed.
pub async fn env() -> (&'static TestEnv, kube::Client) {
    let env = TestEnv::shared().await.or_panic("test environment");
    let client = env.client().await.or_panic("client");
    k8s::install_crds(&client, &k8s::crd_dir(), Duration::from_secs(60)).await.or_panic("install CRDs");
    k8s::ensure_namespace(&client, "meshauth-system").await.or_panic("namespace");
    (env, client)
}

/// The operator binary running against the environment; stopped (SIGTERM, then SIGKILL)
/// when dropped.
pub struct Operator {
    child: Option<Child>,
    pub id: String,
    pub metrics: SocketAddr,
    pub log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).or_panic("free port")
}

impl Operator {
    pub fn start(env: &TestEnv, id: &str) -> Self {
        Self::start_with(env, id, &[])
    }

    /// With extra flags, which replace the defaults of the same name.
    pub fn start_with(env: &TestEnv, id: &str, extra: &[&str]) -> Self {
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = env.dir().join(format!("operator-{id}.log"));
        let file = std::fs::File::create(&log).or_panic("operator log");
        let err = file.try_clone().or_panic("operator log");
        let defaults: Vec<(&str, String)> = vec![
            ("--kubeconfig", env.kubeconfig().display().to_string()),
            ("--spire-server-socket", env.spire_server_socket().display().to_string()),
            ("--trust-domain", env.trust_domain().to_owned()),
            ("--spire-entry-selector", "unix:uid:0".into()),
            ("--svid-ttl", "300".into()),
            ("--metrics-addr", metrics.to_string()),
            ("--leader-id", id.to_owned()),
            ("--lease-duration", LEASE_SECONDS.to_string()),
            ("--resync-interval", "20".into()),
        ];
        let mut args: Vec<String> = Vec::new();
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.push(flag.to_owned());
                args.push(value);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(operator_bin())
            .args(&args)
            .env("RUST_LOG", "info,meshauth_operator=debug")
            // The environment's SPIRE agents attest with join tokens, which name no node.
            .env("MESHAUTH_TRUST_NODE_AGENT_ANNOTATIONS", "true")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .or_panic("start the operator");
        Self { child: Some(child), id: id.to_owned(), metrics, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: no chance to release the lease.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `/metrics` as text, or `None` when it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(self.metrics)).await.ok()?.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await.ok()?.ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((code, body))
    }

    /// The value of a metric line (`name{labels}` exactly as printed), 0 when absent.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        Some(
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0.0),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Polls `f` every 200 ms until it returns `Some`, or panics after `timeout` with `what` and
/// the last observation.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(t) => return t,
            Err(last) if Instant::now() >= deadline => panic!("timed out after {timeout:?} waiting for {what}; last: {last}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

static IP: AtomicU32 = AtomicU32::new(1);

/// A pod on a node with an IP (as a kubelet would report it).
pub async fn pod(client: &kube::Client, ns: &str, name: &str, sa: &str, app: &str, node: &str) {
    let p = k8s::TestPod::new(ns, name).label("app", app).service_account(sa).node(node);
    k8s::create_pod(client, &p).await.or_panic("create pod");
    let n = IP.fetch_add(1, Ordering::SeqCst);
    let ip = format!("10.{}.{}.{}", 100 + (n >> 16) % 100, (n >> 8) & 255, n & 255);
    k8s::set_pod_status(client, ns, name, "Running", Some(&ip)).await.or_panic("pod status");
}

pub async fn delete_pod(client: &kube::Client, ns: &str, name: &str) {
    k8s::delete_pod(client, ns, name).await.or_panic("delete pod");
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait_for("pod gone", Duration::from_secs(30), || async {
        match api.get_opt(name).await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}").chars().take(200).collect()),
        }
    })
    .await
}

pub async fn create<K>(client: &kube::Client, ns: &str, obj: &K) -> K
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns).create(&PostParams::default(), obj).await.or_panic("create")
}

pub async fn delete<K>(client: &kube::Client, ns: &str, name: &str)
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::namespaced(client.clone(), ns).delete(name, &DeleteParams::default()).await.or_panic("delete");
}

/// A condition of a status as (status, reason, message).
pub fn condition(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], t: &str) -> Option<(String, String, String)> {
    conditions.iter().find(|c| c.type_ == t).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub async fn mesh_policy(client: &kube::Client, ns: &str, name: &str) -> Result<MeshPolicy, String> {
    Api::<MeshPolicy>::namespaced(client.clone(), ns).get(name).await.map_err(|e| e.to_string())
}

pub async fn mutual_auth(client: &kube::Client, ns: &str, name: &str) -> Result<MutualAuth, String> {
    Api::<MutualAuth>::namespaced(client.clone(), ns).get(name).await.map_err(|e| e.to_string())
}

/// Entries whose SPIFFE ID is in namespace `ns`, as `sa -> {node}` (via `spire-server entry
/// show`); with hand-made ones when `all`.
pub async fn entries_by_sa(env: &TestEnv, ns: &str) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let list = env.spire().list_entries().await.map_err(|e| e.to_string())?;
    let prefix = format!("spiffe://{}/ns/{ns}/sa/", env.trust_domain());
    let node_of: BTreeMap<&str, &str> = env.nodes().iter().map(|n| (n.agent_id.as_str(), n.name.as_str())).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for e in list {
        if let Some(sa) = e.spiffe_id.strip_prefix(&prefix) {
            let node = node_of.get(e.parent_id.as_str()).map_or_else(|| e.parent_id.clone(), |n| n.to_string());
            out.entry(sa.to_owned()).or_default().insert(node);
        }
    }
    Ok(out)
}

/// `[(sa, [nodes])]` as a map, for comparisons.
pub fn expect_entries(list: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
    list.iter().map(|(sa, nodes)| (sa.to_string(), nodes.iter().map(|n| n.to_string()).collect())).collect()
}

/// One test at a time per binary: they share one environment and the operator's lease.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until the operator's `meshauth_operator_leader` gauge is 1; returns how long it took.
pub async fn wait_leader(op: &Operator, timeout: Duration) -> Duration {
    let start = Instant::now();
    wait_for(&format!("{} to lead", op.id), timeout, || async {
        match op.metric("meshauth_operator_leader").await {
            Some(v) if (v - 1.0).abs() < f64::EPSILON => Ok(start.elapsed()),
            other => Err(format!("leader gauge {other:?}")),
        }
    })
    .await
}
