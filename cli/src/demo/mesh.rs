//! A mesh in a box: nodes and pods as network namespaces on this machine, wired the way CNIs
//! do it (a /32 route and proxy ARP per pod on its node, node-to-node routes over an underlay
//! veth), with a development issuer and a real meshauth agent per node.

use meshauth_cluster::manifests::Manifests;
use meshauth_datapath::netns::{Netns, Pod, sh};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the box could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{what}: {error}")]
    Io { what: String, error: io::Error },
    #[error("the manifests: {0}")]
    Manifests(String),
    #[error("{0} did not become ready in time; its log is {1}")]
    NotReady(String, PathBuf),
    #[error("{0} names no kept mesh (no {KEPT_FILE}): nothing to take down")]
    NothingKept(PathBuf),
    #[error("{path} is damaged: {reason}")]
    DamagedKept { path: PathBuf, reason: String },
}

/// Where `demo --keep` records what it left running, for `demo down`.
pub const KEPT_FILE: &str = "kept.json";

/// A process of a kept mesh, as `demo down` recognises it: a PID alone may be another
/// process's by then.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeptProcess {
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// Its start time (`/proc/PID/stat` field 22, clock ticks since boot).
    pub started: u64,
}

/// What a kept mesh consists of.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Kept {
    /// The agents and issuers.
    pub processes: Vec<KeptProcess>,
    /// Network namespaces, pods first (deleting a pod's removes its veth pair).
    pub namespaces: Vec<String>,
    /// Pin directories (the nodes' maps and links).
    pub pin_roots: Vec<PathBuf>,
}

impl MeshBox {
    /// Leaves the nodes, pods and processes running and records them in `dir/kept.json` for
    /// [`take_down`].
    pub fn keep(self) -> Result<Kept, MeshError> {
        let processes = self
            .nodes
            .iter()
            .flat_map(|n| [n.agent.as_ref(), n.issuer.as_ref()])
            .flatten()
            .filter_map(|c| {
                Some(KeptProcess {
                    pid: c.id(),
                    binary: std::fs::canonicalize(&self.agent_bin).unwrap_or_else(|_| self.agent_bin.clone()),
                    started: start_time(c.id())?,
                })
            })
            .collect();
        let namespaces = self.pods.values().map(|p| p.ns.name.clone()).chain(self.nodes.iter().map(|n| n.ns.name.clone())).collect();
        let pin_roots = self.nodes.iter().filter_map(|n| n.pin_dir.parent().map(Path::to_path_buf)).collect();
        let kept = Kept { processes, namespaces, pin_roots };
        let path = self.dir.join(KEPT_FILE);
        // Plain data: serialization cannot fail.
        std::fs::write(&path, serde_json::to_vec_pretty(&kept).unwrap_or_default())
            .map_err(io_err(format!("writing {}", path.display())))?;
        // Nothing of it may go with this process: no drop runs.
        std::mem::forget(self);
        Ok(kept)
    }
}

/// A process's start time: field 22 of `/proc/PID/stat` (after the command in parentheses).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// What a kept mesh may name: the demo's own namespaces (`md<N>-n<N>`, `md<N>-p<N>`) and pin
/// roots (`/sys/fs/bpf/meshauth-md<N>`). `demo down` runs as root on what the file says.
fn kept_names_only_the_demos(kept: &Kept) -> Result<(), String> {
    let demo_tag = |t: &str| t.strip_prefix("md").is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    for ns in &kept.namespaces {
        let ok = ns.split_once('-').is_some_and(|(tag, rest)| {
            demo_tag(tag) && rest.len() > 1 && matches!(rest.as_bytes()[0], b'n' | b'p') && rest[1..].bytes().all(|b| b.is_ascii_digit())
        });
        if !ok {
            return Err(format!("{ns:?} is no namespace of the demo"));
        }
    }
    for root in &kept.pin_roots {
        let ok = root.to_str().and_then(|r| r.strip_prefix("/sys/fs/bpf/meshauth-")).is_some_and(demo_tag);
        if !ok {
            return Err(format!("{} is no pin directory of the demo", root.display()));
        }
    }
    Ok(())
}

/// Whether `pid` runs (a zombie waiting for its parent to reap it does not).
fn alive(pid: libc::pid_t) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// Stops and removes the mesh that `demo --keep` left in `dir`: its processes (only those
/// still running the recorded binary), namespaces and pins. What was already gone is skipped.
pub fn take_down(dir: &Path) -> Result<Kept, MeshError> {
    let path = dir.join(KEPT_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(MeshError::NothingKept(dir.to_path_buf())),
        Err(e) => return Err(MeshError::Io { what: format!("reading {}", path.display()), error: e }),
    };
    // Only a file root wrote and nobody else may change: it names what root will remove.
    for (what, p) in [("directory", dir), ("file", path.as_path())] {
        let meta = std::fs::metadata(p).map_err(io_err(format!("reading {}", p.display())))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if std::os::unix::fs::MetadataExt::uid(&meta) != me || std::os::unix::fs::MetadataExt::mode(&meta) & 0o022 != 0 {
            return Err(MeshError::DamagedKept {
                path: p.to_path_buf(),
                reason: format!("the {what} is not this user's alone (owner or group/other write)"),
            });
        }
    }
    let kept: Kept = serde_json::from_slice(&text).map_err(|e| MeshError::DamagedKept { path: path.clone(), reason: e.to_string() })?;
    kept_names_only_the_demos(&kept).map_err(|reason| MeshError::DamagedKept { path: path.clone(), reason })?;
    for process in &kept.processes {
        let pid = process.pid;
        let runs_it = std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == process.binary)
            && start_time(pid) == Some(process.started);
        if !runs_it {
            continue;
        }
        let Ok(pid) = libc::pid_t::try_from(pid) else { continue };
        // SAFETY: a signal to a process we checked runs the mesh's binary.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(pid) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for ns in &kept.namespaces {
        let _ = sh(&["ip", "netns", "del", ns]);
    }
    for root in &kept.pin_roots {
        let _ = std::fs::remove_dir_all(root);
    }
    std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
    Ok(kept)
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> MeshError {
    let what = what.into();
    move |error| MeshError::Io { what, error }
}

/// A node of the box.
pub struct BoxNode {
    pub name: String,
    pub ns: Netns,
    pub address: Ipv4Addr,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub metrics_port: u16,
    pub agent: Option<Child>,
    pub issuer: Option<Child>,
}

/// Where the box's agents learn the cluster.
#[derive(Debug, Clone)]
pub enum AgentInputs {
    /// A manifest directory (the demo).
    Manifests(PathBuf),
    /// A real API server (integration tests).
    Kubeconfig(PathBuf),
}

/// The whole box: nodes, pods (by `namespace/name`), and where things live on disk.
pub struct MeshBox {
    pub dir: PathBuf,
    /// What the development issuers read their nodes' identities from.
    pub manifests: PathBuf,
    pub agent_inputs: AgentInputs,
    pub agent_bin: PathBuf,
    pub svid_ttl: Duration,
    /// The agents' `RUST_LOG` (the demo's agents log at debug: its checks read those lines).
    pub agent_log_filter: String,
    pub nodes: Vec<BoxNode>,
    pub pods: BTreeMap<String, Pod>,
}

impl MeshBox {
    /// Builds the namespaces of every node and pod of `manifests` (Nodes need an address,
    /// Pods a node and an IP). `tag` keeps names unique when several boxes run at once.
    pub fn build(
        tag: &str,
        dir: PathBuf,
        manifests_dir: PathBuf,
        parsed: &Manifests,
        agent_bin: PathBuf,
        svid_ttl: Duration,
    ) -> Result<Self, MeshError> {
        std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let snapshot = parsed.snapshot();
        let mut nodes = Vec::new();
        for (i, n) in snapshot.nodes.iter().enumerate() {
            let address: Ipv4Addr = n
                .address
                .as_deref()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| MeshError::Manifests(format!("node {} has no IPv4 InternalIP", n.name)))?;
            let ns = Netns::new(&format!("{tag}-n{}", i + 1)).map_err(io_err(format!("creating node {}", n.name)))?;
            let run = |args: &[&str]| sh(args).map_err(io_err(format!("setting up node {}", n.name)));
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).map_err(io_err("ip_forward"))?;
            run(&["ip", "-n", &ns.name, "addr", "add", "169.254.1.1/32", "dev", "lo"])?;
            nodes.push(BoxNode {
                name: n.name.clone(),
                address,
                pin_dir: PathBuf::from(format!("/sys/fs/bpf/meshauth-{tag}/{}", n.name)),
                socket: dir.join(&n.name).join("workload.sock"),
                metrics_port: 0,
                agent: None,
                issuer: None,
                ns,
            });
        }
        // The underlay: a bridge namespace with one veth per node.
        let underlay = nodes.first().map(|n| n.ns.name.clone()).ok_or_else(|| MeshError::Manifests("no Node objects".into()))?;
        let bridge = format!("{tag}-br");
        sh(&["ip", "-n", &underlay, "link", "add", &bridge, "type", "bridge"]).map_err(io_err("underlay bridge"))?;
        sh(&["ip", "-n", &underlay, "link", "set", &bridge, "up"]).map_err(io_err("underlay bridge"))?;
        for (i, n) in nodes.iter().enumerate() {
            let port = format!("{tag}u{}", i + 1);
            let addr = format!("{}/24", n.address);
            if n.ns.name == underlay {
                sh(&["ip", "-n", &underlay, "addr", "add", &addr, "dev", &bridge]).map_err(io_err("underlay address"))?;
                continue;
            }
            sh(&["ip", "-n", &underlay, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &n.ns.name])
                .map_err(io_err("underlay veth"))?;
            sh(&["ip", "-n", &underlay, "link", "set", &port, "master", &bridge, "up"]).map_err(io_err("underlay port"))?;
            sh(&["ip", "-n", &n.ns.name, "addr", "add", &addr, "dev", "eth0"]).map_err(io_err("underlay address"))?;
            sh(&["ip", "-n", &n.ns.name, "link", "set", "eth0", "up"]).map_err(io_err("underlay link"))?;
        }
        let mut pods = BTreeMap::new();
        for (i, p) in snapshot.inputs.pods.iter().enumerate() {
            let (Some(ip), Some(node_name)) = (p.ip, p.node.as_deref()) else { continue };
            let node = nodes
                .iter()
                .find(|n| n.name == node_name)
                .ok_or_else(|| MeshError::Manifests(format!("pod {}/{} is on unknown node {node_name}", p.namespace, p.name)))?;
            let pod_ns = Netns::new(&format!("{tag}-p{i}")).map_err(io_err(format!("creating pod {}", p.name)))?;
            let host_if = format!("{tag}h{i}");
            let (n, pn, ip_s) = (node.ns.name.as_str(), pod_ns.name.as_str(), ip.to_string());
            let what = format!("wiring pod {}/{}", p.namespace, p.name);
            for args in [
                vec!["ip", "-n", n, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", pn],
                vec!["ip", "-n", pn, "addr", "add", &format!("{ip_s}/32"), "dev", "eth0"],
                vec!["ip", "-n", pn, "link", "set", "eth0", "up"],
                vec!["ip", "-n", pn, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"],
                vec!["ip", "-n", pn, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"],
                vec!["ip", "-n", n, "link", "set", &host_if, "up"],
                vec!["ip", "-n", n, "route", "add", &format!("{ip_s}/32"), "dev", &host_if],
            ] {
                sh(&args).map_err(io_err(what.clone()))?;
            }
            node.ns.exec(&["sysctl", "-qw", &format!("net.ipv4.conf.{host_if}.proxy_arp=1")]).map_err(io_err(what.clone()))?;
            // Pods on other nodes: routed through that node's underlay address.
            for other in nodes.iter().filter(|o| o.name != node_name) {
                sh(&["ip", "-n", &other.ns.name, "route", "add", &format!("{ip_s}/32"), "via", &node.address.to_string()])
                    .map_err(io_err(what.clone()))?;
            }
            pods.insert(format!("{}/{}", p.namespace, p.name), Pod { ns: pod_ns, ip, host_if });
        }
        let agent_inputs = AgentInputs::Manifests(manifests_dir.clone());
        let agent_log_filter = "info,meshauth_agent=debug".to_owned();
        Ok(Self { dir, manifests: manifests_dir, agent_inputs, agent_bin, svid_ttl, agent_log_filter, nodes, pods })
    }

    pub fn pod(&self, name: &str) -> &Pod {
        // The scenario names pods of the embedded example mesh, which build() created.
        &self.pods[name]
    }

    pub fn node(&self, name: &str) -> Option<&BoxNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn node_mut(&mut self, name: &str) -> Option<&mut BoxNode> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }

    /// Makes every node's agent read a real API server (`kubeconfig`, whose server is the
    /// host's 127.0.0.1:`port`). Inside a node's namespace 127.0.0.1 is not the host's, so each
    /// node forwards its own 127.0.0.1:`port` to the host's; TLS passes through untouched.
    pub fn use_api_server(&mut self, kubeconfig: PathBuf, port: u16) -> Result<(), MeshError> {
        for node in &self.nodes {
            forward_to_host(&node.ns, port).map_err(io_err(format!("forwarding the API server port into {}", node.name)))?;
        }
        self.agent_inputs = AgentInputs::Kubeconfig(kubeconfig);
        Ok(())
    }

    /// Points a node's agent at another Workload API (e.g. a real SPIRE agent's socket).
    pub fn set_workload_socket(&mut self, node: &str, socket: PathBuf) {
        if let Some(n) = self.node_mut(node) {
            n.socket = socket;
        }
    }

    /// Starts the development issuer of one node (its CA state is shared by all nodes: one
    /// trust domain), and waits for its socket.
    pub fn start_issuer(&mut self, node: &str) -> Result<(), MeshError> {
        let (bin, dir, manifests, ttl) = (self.agent_bin.clone(), self.dir.clone(), self.manifests.clone(), self.svid_ttl);
        let Some(n) = self.node_mut(node) else { return Err(MeshError::Manifests(format!("no node {node}"))) };
        let node_dir = dir.join(&n.name);
        std::fs::create_dir_all(&node_dir).map_err(io_err("node dir"))?;
        let log = node_dir.join("issuer.log");
        let mut cmd = Command::new(&bin);
        cmd.args(["dev-issuer", "--socket"])
            .arg(&n.socket)
            .arg("--state-dir")
            .arg(dir.join("ca"))
            .args(["--svid-ttl", &ttl.as_secs().to_string(), "--node", &n.name, "--manifests"])
            .arg(&manifests);
        let child = spawn_logged(cmd, &log, None)?;
        n.issuer = Some(child);
        wait_for(&format!("{node} dev issuer"), &log, Duration::from_secs(10), || n.socket.exists())
    }

    /// Starts the agent of one node inside the node's network namespace (its own mount
    /// namespace, so the pinned maps under /sys/fs/bpf stay visible to later agents).
    pub fn start_agent(&mut self, node: &str) -> Result<(), MeshError> {
        let (bin, dir, inputs, log_filter) =
            (self.agent_bin.clone(), self.dir.clone(), self.agent_inputs.clone(), self.agent_log_filter.clone());
        let Some(n) = self.node_mut(node) else { return Err(MeshError::Manifests(format!("no node {node}"))) };
        let node_dir = dir.join(&n.name);
        std::fs::create_dir_all(&node_dir).map_err(io_err("node dir"))?;
        let log = node_dir.join("agent.log");
        if n.metrics_port == 0 {
            n.metrics_port = free_port().map_err(io_err("picking a metrics port"))?;
        }
        let mut cmd = Command::new(&bin);
        cmd.args(["run", "--node-name", &n.name]);
        match &inputs {
            AgentInputs::Manifests(dir) => cmd.arg("--manifests").arg(dir),
            AgentInputs::Kubeconfig(path) => cmd.env("KUBECONFIG", path),
        };
        cmd.args(["--listen", &format!("{}:4250", n.address)])
            .args(["--metrics-addr", &format!("127.0.0.1:{}", n.metrics_port)])
            .arg("--workload-api-socket")
            .arg(&n.socket)
            .arg("--state-dir")
            .arg(node_dir.join("state"))
            .arg("--pin-dir")
            .arg(&n.pin_dir)
            .env("MESHAUTH_CNI_SOCKET", node_dir.join("cni.sock"))
            .env("RUST_LOG", &log_filter);
        let netns = File::open(format!("/run/netns/{}", n.ns.name)).map_err(io_err("opening the node namespace"))?;
        let readies = || std::fs::read_to_string(&log).map_or(0, |l| l.matches("meshauth-agent ready").count());
        let before = readies();
        let child = spawn_logged(cmd, &log, Some(netns))?;
        n.agent = Some(child);
        wait_for(&format!("{node} agent"), &log, Duration::from_secs(60), || readies() > before)
    }

    /// Stops a node's agent with SIGTERM, as a rolling update does.
    pub fn stop_agent(&mut self, node: &str) {
        if let Some(child) = self.node_mut(node).and_then(|n| n.agent.take()) {
            terminate(child);
        }
    }

    /// The node's agent log so far.
    pub fn agent_log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(node).join("agent.log")).unwrap_or_default()
    }
}

impl Drop for MeshBox {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            for child in [n.agent.take(), n.issuer.take()].into_iter().flatten() {
                terminate(child);
            }
        }
        // Pods before nodes: deleting a pod namespace removes its veth pair.
        self.pods.clear();
        let pin_roots: Vec<PathBuf> = self.nodes.iter().filter_map(|n| n.pin_dir.parent().map(Path::to_path_buf)).collect();
        self.nodes.clear();
        for root in pin_roots {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn spawn_logged(mut cmd: Command, log: &Path, netns: Option<File>) -> Result<Child, MeshError> {
    // Appended: a restarted process's log follows the previous one's.
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io_err(format!("creating {}", log.display())))?;
    let err = out.try_clone().map_err(io_err("log file"))?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    if let Some(ns) = netns {
        // SAFETY: setns is async-signal-safe; it runs in the child between fork and exec and
        // only changes that child's network namespace.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    cmd.spawn().map_err(io_err(format!("starting {:?}", cmd.get_program())))
}

fn terminate(mut child: Child) {
    // SAFETY: kill with a pid we own and have not reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for(what: &str, log: &Path, timeout: Duration, ready: impl Fn() -> bool) -> Result<(), MeshError> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(MeshError::NotReady(what.to_owned(), log.to_owned()))
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Forwards `ns`'s 127.0.0.1:`port` to the host's, one pair of copying threads per connection.
fn forward_to_host(ns: &Netns, port: u16) -> io::Result<()> {
    let listener = ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))??;
    // Threads spawned here live in the host namespace: the outbound side dials the host.
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            std::thread::spawn(move || {
                let Ok(outbound) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
                    return;
                };
                let (Ok(mut in_r), Ok(mut out_w)) = (inbound.try_clone(), outbound.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || {
                    let _ = io::copy(&mut in_r, &mut out_w);
                    let _ = out_w.shutdown(Shutdown::Write);
                });
                let (mut out_r, mut in_w) = (outbound, inbound);
                let _ = io::copy(&mut out_r, &mut in_w);
                let _ = in_w.shutdown(Shutdown::Write);
                let _ = up.join();
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_down_takes_only_the_demos_own_namespaces_and_pins() {
        let kept = |ns: &str, root: &str| Kept { processes: vec![], namespaces: vec![ns.into()], pin_roots: vec![root.into()] };
        assert!(kept_names_only_the_demos(&kept("md123-n1", "/sys/fs/bpf/meshauth-md123")).is_ok());
        assert!(kept_names_only_the_demos(&kept("md123-p4", "/sys/fs/bpf/meshauth-md123")).is_ok());
        for (ns, root) in [
            ("production", "/sys/fs/bpf/meshauth-md1"),
            ("md1-x1", "/sys/fs/bpf/meshauth-md1"),
            ("md-n1", "/sys/fs/bpf/meshauth-md1"),
            ("md1-n1", "/sys/fs/bpf/meshauth"),
            ("md1-n1", "/sys/fs/bpf/meshauth-md1/../../../../etc"),
            ("md1-n1", "/etc"),
        ] {
            assert!(kept_names_only_the_demos(&kept(ns, root)).is_err(), "{ns} {root} accepted");
        }
    }
}
