//! One running environment: starting it through `tests/testenv up`, reading what it wrote,
//! and stopping it through `tests/testenv down` when the [`TestEnv`] is dropped.
//!
//! This module only drives the script and reads its directory layout; it does not start
//! processes itself, so the shell (`tests/testenv`) and Rust users get the same environment.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::spire::SpireServer;

/// The script that does the work; it lives next to this crate's manifest.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testenv");

/// Set to `1` to keep an environment's directory (logs, data) after it stops.
pub const KEEP_VAR: &str = "MESHAUTH_TESTENV_KEEP";

/// Where temporary environment directories are created (default `/tmp`; keep it short,
/// Unix socket paths are limited to about 100 bytes).
pub const TMP_VAR: &str = "MESHAUTH_TESTENV_TMP";

/// Errors of starting, reading and stopping an environment.
#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    /// The script could not be executed at all.
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `tests/testenv up` exited non-zero; `output` is what it printed (the failing
    /// component's log tail included).
    #[error(
        "`tests/testenv up --dir {dir}` failed ({status}).\n\
         The test environment must run as root (or with MESHAUTH_TESTENV_CACHE pointing at a \
         writable directory) and builds its pinned Go binaries on first use (about 10 minutes, \
         through the Go module proxy).\n--- output ---\n{output}"
    )]
    Up { dir: PathBuf, status: String, output: String },
    /// `tests/testenv down` exited non-zero.
    #[error("`tests/testenv down --dir {dir}` failed ({status}):\n{output}")]
    Down { dir: PathBuf, status: String, output: String },
    /// A temporary directory for the environment could not be created.
    #[error("cannot create a directory for the test environment under {parent}: {source}")]
    TempDir {
        parent: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the script should have written is missing or unreadable.
    #[error("cannot read {path} (written by `tests/testenv up`): {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file the script wrote has unexpected content.
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    /// The options are not usable.
    #[error("invalid test environment options: {0}")]
    Options(String),
    /// The kubeconfig could not be loaded.
    #[error("cannot load the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// A client could not be built from the kubeconfig.
    #[error("cannot build a Kubernetes client from {path}: {source}")]
    Client {
        path: PathBuf,
        #[source]
        source: kube::Error,
    },
    /// No node of that name.
    #[error("the test environment has no node named {0:?}")]
    NoSuchNode(String),
    /// The shared environment of this test binary failed to start (the first error, repeated
    /// for every test that asks for it).
    #[error("the shared test environment failed to start: {0}")]
    Shared(String),
    /// A kubelet-mode operation on an environment started without [`Options::kubelet`].
    #[error("the test environment was not started with kubelets (Options::kubelet)")]
    NotKubelet,
    /// `tests/testenv load-image` failed.
    #[error("`tests/testenv load-image --dir {dir} {image}` failed ({status}):\n{output}")]
    LoadImage { dir: PathBuf, image: PathBuf, status: String, output: String },
    /// A blocking task could not complete.
    #[error("the test environment task did not complete: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of nodes (SPIRE agents and Node objects), named `node-1` … `node-N`.
    pub nodes: usize,
    /// The SPIFFE trust domain of the SPIRE server.
    pub trust_domain: String,
    /// The environment directory; `None` creates a fresh one under `$MESHAUTH_TESTENV_TMP`
    /// (default `/tmp`) that is removed when the environment stops, unless
    /// `MESHAUTH_TESTENV_KEEP=1` or the stopping thread is panicking.
    pub dir: Option<PathBuf>,
    /// A real cluster (`tests/testenv up --kubelet`): kube-controller-manager, kube-scheduler
    /// and per node a network + mount namespace with containerd, a kubelet, kube-proxy and the
    /// SPIRE agent (workload attestors `unix` and `k8s`). One such environment per machine;
    /// the Node objects are the kubelets' own. See [`Kubelet`] for addresses and paths.
    pub kubelet: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { nodes: 2, trust_domain: "cluster.local".to_owned(), dir: None, kubelet: false }
    }
}

/// One node of the environment: a SPIRE agent and a Node object.
#[derive(Clone, Debug)]
pub struct Node {
    /// `node-1` …
    pub name: String,
    /// The node's SPIFFE Workload API socket.
    pub agent_socket: PathBuf,
    /// The SPIFFE ID of the node's SPIRE agent (the parent of node-scoped entries; also the
    /// Node object's `meshauth.io/spire-agent-id` annotation).
    pub agent_id: String,
    /// The node's namespaces and paths when the environment runs kubelets.
    pub kubelet: Option<Kubelet>,
}

/// A kubelet-mode node: a network namespace (`eth0` with [`Kubelet::ip`] on the host's bridge
/// `mtk0`, 10.213.0.1) and a mount namespace in which `/sys/fs/bpf` (own bpffs),
/// `/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/meshauth`, `/run/spire/sockets` (`agent.sock`)
/// and `/run/spire/server-sockets` (`api.sock`) are the node's own; the host paths below are
/// the same directories seen from outside.
#[derive(Clone, Debug)]
pub struct Kubelet {
    /// The node's first process: `nsenter -t PID -n -m` enters the node.
    pub pid: u32,
    /// The node's network namespace (`/proc/PID/ns/net`).
    pub netns: PathBuf,
    /// The node IP (InternalIP), 10.213.0.(10+i).
    pub ip: String,
    /// The node's pod subnet, 10.214.i.0/24 (node-1: CNI `bridge`, others `ptp`).
    pub pod_cidr: String,
    /// The node's containerd socket (namespace `k8s.io` holds the kubelet's images).
    pub containerd_socket: PathBuf,
    /// The node's `/etc/cni/net.d` (holds [`Kubelet::CNI_CONFLIST`]).
    pub cni_conf_dir: PathBuf,
    /// The node's `/opt/cni/bin`.
    pub cni_bin_dir: PathBuf,
    /// The node's `/var/lib/meshauth`.
    pub state_dir: PathBuf,
}

impl Kubelet {
    /// The file name of every node's single CNI conflist in its `/etc/cni/net.d`.
    pub const CNI_CONFLIST: &str = "10-meshauth-testenv.conflist";
    /// The pause image every node's containerd runs as sandbox (loaded by `up`).
    pub const PAUSE_IMAGE: &str = "docker.io/meshauth/testenv-pause:1";
    /// The test app image (busybox: `sh`, `httpd`, `nc`; default command: HTTP on :8080
    /// answering with the host name), loaded into every node by `up`. Its busybox `wget`
    /// is left out (it segfaults on these machines): send requests with `nc`.
    pub const TEST_IMAGE: &str = "docker.io/meshauth/testenv-app:1";
    /// The address of the host on the nodes' bridge: kube-apiserver and the SPIRE server.
    pub const HOST_IP: &str = "10.213.0.1";
    /// The node IPs.
    pub const NODE_CIDR: &str = "10.213.0.0/24";
    /// Every node's pod subnet lies in this range.
    pub const POD_CIDR: &str = "10.214.0.0/16";
    /// The Service range (the `kubernetes` Service is 10.96.0.1:443).
    pub const SERVICE_CIDR: &str = "10.96.0.0/16";

    /// `nsenter -t PID -n -m -- PROGRAM`: a command run inside the node (its network and
    /// mounts; host PID namespace and cgroups).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.pid.to_string()).args(["-n", "-m", "--"]).arg(program);
        c
    }
}

impl Node {
    /// The Workload API endpoint in the form the `spiffe` crate takes (`unix:/path`).
    pub fn workload_api_endpoint(&self) -> String {
        format!("unix:{}", self.agent_socket.display())
    }
}

/// A running environment: etcd, kube-apiserver, a SPIRE server and one SPIRE agent per node.
/// Dropping it stops every process (also while unwinding from a panic); if the test process
/// dies without unwinding, a watchdog started by `tests/testenv up --owner-pid` stops it.
#[derive(Debug)]
pub struct TestEnv {
    dir: PathBuf,
    temporary: bool,
    kubelet: bool,
    trust_domain: String,
    nodes: Vec<Node>,
    stopped: AtomicBool,
}

static SHARED: OnceLock<Result<TestEnv, String>> = OnceLock::new();

impl TestEnv {
    /// Starts an environment (blocking work runs on the blocking thread pool). The first
    /// call on a machine may build the Go binaries, which takes about 10 minutes.
    pub async fn start(opts: Options) -> Result<Self, EnvError> {
        tokio::task::spawn_blocking(move || Self::start_blocking(opts)).await?
    }

    /// [`TestEnv::start`] without async.
    pub fn start_blocking(opts: Options) -> Result<Self, EnvError> {
        if opts.nodes == 0 {
            return Err(EnvError::Options("nodes must be at least 1".into()));
        }
        let (dir, temporary) = match opts.dir {
            Some(d) => (d, false),
            None => (temp_dir()?, true),
        };
        let purge_on_exit = temporary && !keep();
        if opts.kubelet && opts.nodes > 50 {
            return Err(EnvError::Options("kubelet mode supports at most 50 nodes".into()));
        }
        let mut args: Vec<String> = vec![
            "up".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--nodes".into(),
            opts.nodes.to_string(),
            "--trust-domain".into(),
            opts.trust_domain.clone(),
            "--owner-pid".into(),
            std::process::id().to_string(),
        ];
        if purge_on_exit {
            args.push("--purge-on-exit".into());
        }
        if opts.kubelet {
            args.push("--kubelet".into());
        }
        let (ok, status, output) = match run_script(&args) {
            Ok(r) => r,
            Err(e) => {
                if temporary {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Err(e);
            }
        };
        if !ok {
            if temporary && !keep() {
                // Keep nothing but the message: `up` already stopped what it started.
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(EnvError::Up { dir, status, output });
        }
        let mut env = TestEnv {
            dir,
            temporary,
            kubelet: opts.kubelet,
            trust_domain: String::new(),
            nodes: Vec::new(),
            stopped: AtomicBool::new(false),
        };
        // If reading the layout fails, `env` is dropped and stops what `up` started.
        env.trust_domain = read_trimmed(&env.dir.join("trust-domain"))?;
        for i in 1..=opts.nodes {
            let name = format!("node-{i}");
            let ndir = env.dir.join("nodes").join(&name);
            let agent_id = read_trimmed(&ndir.join("agent-id"))?;
            if !agent_id.starts_with("spiffe://") {
                return Err(EnvError::Layout { path: ndir.join("agent-id"), reason: format!("not a SPIFFE ID: {agent_id:?}") });
            }
            let kubelet = if opts.kubelet { Some(read_kubelet(&ndir)?) } else { None };
            env.nodes.push(Node { name, agent_socket: ndir.join("agent.sock"), agent_id, kubelet });
        }
        Ok(env)
    }

    /// The environment shared by every test of this test binary (2 nodes, trust domain
    /// `cluster.local`), started on first use. It is never dropped: the watchdog stops it and
    /// removes its directory when the test binary exits. A start failure is returned to
    /// every caller.
    pub fn shared_blocking() -> Result<&'static TestEnv, EnvError> {
        let slot = SHARED.get_or_init(|| TestEnv::start_blocking(Options::default()).map_err(|e| e.to_string()));
        match slot {
            Ok(env) => Ok(env),
            Err(msg) => Err(EnvError::Shared(msg.clone())),
        }
    }

    /// [`TestEnv::shared_blocking`] from async code.
    pub async fn shared() -> Result<&'static TestEnv, EnvError> {
        tokio::task::spawn_blocking(Self::shared_blocking).await?
    }

    /// A new Kubernetes client (cluster-admin). Make one per test (per tokio runtime): a
    /// client's connections belong to the runtime that created them.
    pub async fn client(&self) -> Result<kube::Client, EnvError> {
        crate::install_crypto_provider();
        let path = self.kubeconfig();
        let kc = Kubeconfig::read_from(&path).map_err(|source| EnvError::Kubeconfig { path: path.clone(), source })?;
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|source| EnvError::Kubeconfig { path: path.clone(), source })?;
        kube::Client::try_from(config).map_err(|source| EnvError::Client { path, source })
    }

    /// The environment directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `DIR/kubeconfig` (cluster-admin).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// The API server's port, from the kubeconfig's server URL (`None` if it names none).
    pub fn api_port(&self) -> Option<u16> {
        let text = std::fs::read_to_string(self.kubeconfig()).ok()?;
        let kc: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
        let server = kc["clusters"][0]["cluster"]["server"].as_str()?;
        server.rsplit(':').next()?.trim_end_matches('/').parse().ok()
    }

    /// `DIR/env`: shell exports of the environment.
    pub fn env_file(&self) -> PathBuf {
        self.dir.join("env")
    }

    /// A binary of the environment: `etcd`, `kube-apiserver`, `kubectl`, `spire-server`,
    /// `spire-agent`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    /// The log of a component: `etcd`, `kube-apiserver`, `spire-server`,
    /// `spire-agent-node-1`, …
    pub fn log(&self, component: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{component}.log"))
    }

    /// The SPIRE server API socket (`DIR/spire/server.sock`).
    pub fn spire_server_socket(&self) -> PathBuf {
        self.dir.join("spire").join("server.sock")
    }

    /// The SPIRE trust bundle as PEM (`DIR/spire/bundle.pem`), as of `up`.
    pub fn spire_bundle_pem(&self) -> PathBuf {
        self.dir.join("spire").join("bundle.pem")
    }

    /// The SPIRE server's CLI, bound to this environment's socket.
    pub fn spire(&self) -> SpireServer {
        SpireServer::new(self.bin("spire-server"), self.spire_server_socket(), self.trust_domain.clone())
    }

    /// The SPIFFE trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn workload_id(&self, namespace: &str, service_account: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.trust_domain)
    }

    /// Every node, in order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node of that name.
    pub fn node(&self, name: &str) -> Result<&Node, EnvError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| EnvError::NoSuchNode(name.to_owned()))
    }

    /// Runs this environment's `kubectl` (cluster-admin) with `stdin`; (success, stdout and
    /// stderr). Panics only when kubectl cannot be started at all (a broken environment).
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> (bool, String) {
        let mut child = Command::new(self.bin("kubectl"))
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin("kubectl").display()));
        if let Some(mut input) = child.stdin.take() {
            // A kubectl that exits before reading its input reports why on stderr.
            let _ = input.write_all(stdin.as_bytes());
        }
        match child.wait_with_output() {
            Ok(out) => (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))),
            Err(e) => (false, format!("kubectl: {e}")),
        }
    }

    /// Whether the environment runs kubelets ([`Options::kubelet`]).
    pub fn is_kubelet(&self) -> bool {
        self.kubelet
    }

    /// The kubelet-mode view of a node (namespaces, IP, pod subnet, paths).
    pub fn kubelet_node(&self, name: &str) -> Result<&Kubelet, EnvError> {
        self.node(name)?.kubelet.as_ref().ok_or(EnvError::NotKubelet)
    }

    /// The test app image tarball `up` built and loaded (`DIR/images/test-app.tar`).
    pub fn test_image_tar(&self) -> PathBuf {
        self.dir.join("images").join("test-app.tar")
    }

    /// Imports an image tarball (docker-archive or OCI layout, e.g. `target/images/meshauth.tar`
    /// from `scripts/images`) into every node's containerd (`k8s.io` namespace), so that pods
    /// with `imagePullPolicy: IfNotPresent` or `Never` use it. Kubelet mode only.
    pub fn load_image_blocking(&self, image: &Path) -> Result<(), EnvError> {
        if !self.kubelet {
            return Err(EnvError::NotKubelet);
        }
        load_image_into(&self.dir, image)
    }

    /// [`TestEnv::load_image_blocking`] from async code.
    pub async fn load_image(&self, image: impl Into<PathBuf>) -> Result<(), EnvError> {
        if !self.kubelet {
            return Err(EnvError::NotKubelet);
        }
        let (dir, image) = (self.dir.clone(), image.into());
        tokio::task::spawn_blocking(move || load_image_into(&dir, &image)).await?
    }

    /// Stops every process now (idempotent). Removes the directory if it was temporary,
    /// unless `MESHAUTH_TESTENV_KEEP=1`.
    pub fn stop(&self) -> Result<(), EnvError> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let keep_dir = !self.temporary || keep() || std::thread::panicking();
        let mut args = vec!["down".to_owned(), "--dir".to_owned(), self.dir.display().to_string()];
        if !keep_dir {
            args.push("--purge".into());
        }
        let (ok, status, output) = run_script(&args)?;
        if !ok {
            return Err(EnvError::Down { dir: self.dir.clone(), status, output });
        }
        if keep_dir && self.temporary {
            let _ = writeln!(std::io::stderr(), "meshauth-testenv: kept {} (logs in {}/logs)", self.dir.display(), self.dir.display());
        }
        Ok(())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            let _ = writeln!(std::io::stderr(), "meshauth-testenv: stopping {}: {e}", self.dir.display());
        }
    }
}

fn keep() -> bool {
    std::env::var(KEEP_VAR).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn temp_dir() -> Result<PathBuf, EnvError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let parent = std::env::var_os(TMP_VAR).map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = parent.join(format!("meshauth-te-{}-{n}", std::process::id()));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(source) => return Err(EnvError::TempDir { parent, source }),
        }
    }
}

fn load_image_into(dir: &Path, image: &Path) -> Result<(), EnvError> {
    let args = vec!["load-image".to_owned(), "--dir".to_owned(), dir.display().to_string(), image.display().to_string()];
    let (ok, status, output) = run_script(&args)?;
    if !ok {
        return Err(EnvError::LoadImage { dir: dir.to_owned(), image: image.to_owned(), status, output });
    }
    Ok(())
}

/// The kubelet-mode files `up` writes in `DIR/nodes/<node>/`.
fn read_kubelet(ndir: &Path) -> Result<Kubelet, EnvError> {
    let pid_path = ndir.join("pid");
    let pid: u32 =
        read_trimmed(&pid_path)?.parse().map_err(|e| EnvError::Layout { path: pid_path, reason: format!("not a process id: {e}") })?;
    Ok(Kubelet {
        pid,
        netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
        ip: read_trimmed(&ndir.join("node-ip"))?,
        pod_cidr: read_trimmed(&ndir.join("pod-cidr"))?,
        containerd_socket: ndir.join("containerd-run").join("containerd.sock"),
        cni_conf_dir: ndir.join("cni-conf"),
        cni_bin_dir: ndir.join("cni-bin"),
        state_dir: ndir.join("meshauth"),
    })
}

fn read_trimmed(path: &Path) -> Result<String, EnvError> {
    let s = std::fs::read_to_string(path).map_err(|source| EnvError::Read { path: path.to_owned(), source })?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        return Err(EnvError::Layout { path: path.to_owned(), reason: "empty".into() });
    }
    Ok(s)
}

/// Runs the script; its stderr is passed through live (build progress, errors) and also
/// collected. Returns (success, exit status text, stdout + stderr).
fn run_script(args: &[String]) -> Result<(bool, String, String), EnvError> {
    let spawn_err = |source| EnvError::Spawn { script: PathBuf::from(SCRIPT), source };
    let mut child =
        Command::new(SCRIPT).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(spawn_err)?;
    let stdout = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut o) = stdout {
            let _ = std::io::Read::read_to_string(&mut o, &mut s);
        }
        s
    });
    let mut collected = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            // Written to the real stderr (not captured by the test harness) so a long first
            // build shows its progress.
            let _ = writeln!(std::io::stderr(), "{line}");
            collected.push_str(&line);
            collected.push('\n');
        }
    }
    let status = child.wait().map_err(spawn_err)?;
    let stdout = out_thread.join().unwrap_or_default();
    let output = if stdout.is_empty() { collected } else { format!("{stdout}{collected}") };
    Ok((status.success(), status.to_string(), output))
}
