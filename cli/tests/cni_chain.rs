//! The real CNI chain as the kubelet's runtime runs it: the standard `bridge` or `ptp` plugin
//! (with `host-local` IPAM) creates a pod's veth, then `meshauth-cni` hands it to a real agent
//! running in the node's network namespace. The pod's first packet is already enforced, the
//! node's own address (the kubelet's probes) reaches a policed pod, DEL releases everything,
//! and 5,000 pods created and deleted leave the maps and pins bounded by the live pods.
//! Root only; the plugins come from Debian's `containernetworking-plugins`.

use meshauth_datapath::Maps;
use meshauth_datapath::netns::{Netns, PinDir, require_root};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CNI_BIN_DIR: &str = "/usr/lib/cni";

fn meshauth_bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshauthctl")).with_file_name(name)
}

/// A node: its network namespace, a real agent inside it, its pin directory and CNI socket.
struct NodeUnderTest {
    ns: Netns,
    pins: PinDir,
    dir: tempfile::TempDir,
    agent: Child,
    /// Extra environment of the agent (datapath settings).
    env: Vec<(String, String)>,
}

impl NodeUnderTest {
    fn start(tag: &str, manifests: &str) -> Self {
        Self::start_with_env(tag, manifests, &[])
    }

    fn start_with_env(tag: &str, manifests: &str, env: &[(&str, &str)]) -> Self {
        require_root();
        for plugin in ["bridge", "ptp", "host-local"] {
            assert!(
                Path::new(CNI_BIN_DIR).join(plugin).exists(),
                "{CNI_BIN_DIR}/{plugin} is missing: apt-get install containernetworking-plugins"
            );
        }
        let ns = Netns::new(&format!("cc{}-{tag}", std::process::id() % 100_000)).expect("node netns");
        ns.sysctl("net/ipv4/ip_forward", "1").expect("forwarding");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("manifests")).expect("manifests dir");
        std::fs::write(dir.path().join("manifests/mesh.yaml"), manifests).expect("manifests");
        let pins = PinDir::new(&format!("cni-{tag}"));
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let agent = spawn_agent(&ns, dir.path(), &pins, &env);
        let node = NodeUnderTest { ns, pins, dir, agent, env };
        node.wait_ready(1);
        node
    }

    fn wait_ready(&self, times: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches("serving the CNI plugin").count() < times {
            assert!(Instant::now() < deadline, "agent not ready:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the agent with SIGTERM (as a rolling update does) and starts it again.
    fn restart_agent(&mut self) {
        // SAFETY: a pid we spawned and have not reaped.
        unsafe { libc::kill(self.agent.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.agent.wait();
        self.agent = spawn_agent(&self.ns, self.dir.path(), &self.pins, &self.env);
        self.wait_ready(2);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn maps(&self) -> Maps {
        Maps::open(&self.pins.0).expect("pinned maps")
    }

    /// The `interfaces` map, names resolved in the node's namespace.
    fn interfaces(&self) -> Vec<meshauth_datapath::Interface> {
        self.ns.run(|| self.maps().interfaces().expect("interfaces")).expect("node netns")
    }

    fn link_pins(&self) -> usize {
        std::fs::read_dir(self.pins.0.join("links")).map_or(0, |d| d.count())
    }

    /// Runs one plugin as a runtime does: in the node's namespace, the CNI variables set, the
    /// network configuration on stdin. Returns (success, stdout).
    fn cni(&self, plugin: &Path, command: &str, container: &str, pod_ns: &str, args: &str, conf: &serde_json::Value) -> (bool, String) {
        let mut cmd = Command::new(plugin);
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", format!("/run/netns/{pod_ns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env("CNI_PATH", CNI_BIN_DIR)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        in_netns(&mut cmd, &self.ns);
        let mut child = cmd.spawn().expect("run plugin");
        child.stdin.take().expect("stdin").write_all(conf.to_string().as_bytes()).expect("write conf");
        let out = child.wait_with_output().expect("plugin output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success(), format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }

    /// ADD through the whole chain (`first` then meshauth-cni); the pod's IPv4 address.
    fn add(&self, first: &serde_json::Value, container: &str, pod_ns: &str, pod: &str) -> Ipv4Addr {
        self.add_with_args(first, container, pod_ns, &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}"))
    }

    /// [`Self::add`] with the runtime's `CNI_ARGS` as given.
    fn add_with_args(&self, first: &serde_json::Value, container: &str, pod_ns: &str, args: &str) -> Ipv4Addr {
        let args = args.to_owned();
        let plugin = Path::new(CNI_BIN_DIR).join(first["type"].as_str().expect("type"));
        let (ok, out) = self.cni(&plugin, "ADD", container, pod_ns, &args, first);
        assert!(ok, "{} ADD failed: {out}", first["type"]);
        let prev: serde_json::Value = serde_json::from_str(&out).expect("plugin result");
        let (ok, out) = self.cni(&meshauth_bin("meshauth-cni"), "ADD", container, pod_ns, &args, &self.meshauth_conf(Some(prev.clone())));
        assert!(ok, "meshauth-cni ADD failed: {out}\nagent log:\n{}", self.log());
        let result: serde_json::Value = serde_json::from_str(&out).expect("meshauth-cni result");
        assert_eq!(result["ips"], prev["ips"], "a chained plugin passes the previous result on");
        prev["ips"][0]["address"].as_str().and_then(|a| a.split('/').next()).and_then(|a| a.parse().ok()).expect("pod address")
    }

    /// DEL through the chain in reverse order.
    fn del(&self, first: &serde_json::Value, container: &str, pod_ns: &str, pod: &str, ip: Ipv4Addr) {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}");
        let (ok, out) =
            self.cni(&meshauth_bin("meshauth-cni"), "DEL", container, pod_ns, &args, &self.meshauth_conf(Some(prev_result(pod_ns, ip))));
        assert!(ok, "meshauth-cni DEL failed: {out}");
        let plugin = Path::new(CNI_BIN_DIR).join(first["type"].as_str().expect("type"));
        let (ok, out) = self.cni(&plugin, "DEL", container, pod_ns, &args, first);
        assert!(ok, "{} DEL failed: {out}", first["type"]);
    }

    fn meshauth_conf(&self, prev: Option<serde_json::Value>) -> serde_json::Value {
        let mut c = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "type": "meshauth-cni", "socket": self.dir.path().join("cni.sock")});
        if let Some(p) = prev {
            c["prevResult"] = p;
        }
        c
    }

    fn ipam(&self, subnet: &str) -> serde_json::Value {
        serde_json::json!({"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": self.dir.path().join("ipam")})
    }
}

impl Drop for NodeUnderTest {
    fn drop(&mut self) {
        // SAFETY: a pid we spawned and have not reaped.
        unsafe { libc::kill(self.agent.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.agent.wait();
    }
}

/// A real agent in the node's namespace, reading `dir/manifests`, serving `dir/cni.sock`.
fn spawn_agent(ns: &Netns, dir: &Path, pins: &PinDir, env: &[(String, String)]) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("agent.log")).expect("log");
    let mut cmd = Command::new(meshauth_bin("meshauth-agent"));
    cmd.args(["run", "--node-name", "node-1", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--manifests"])
        .arg(dir.join("manifests"))
        .arg("--workload-api-socket")
        .arg(dir.join("no-workload-api.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--pin-dir")
        .arg(&pins.0)
        .env("MESHAUTH_CNI_SOCKET", dir.join("cni.sock"))
        .env("MESHAUTH_NETNS_DIRS", dir.join("no-netns"))
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    in_netns(&mut cmd, ns);
    cmd.spawn().expect("start the agent")
}

fn in_netns(cmd: &mut Command, ns: &Netns) {
    let file = File::open(format!("/run/netns/{}", ns.name)).expect("open netns");
    // SAFETY: setns is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A listener on `port` in `ns` that accepts and closes every connection, for the life of the
/// test process.
fn accept_on(ns: &Netns, port: u16) {
    let listener = ns.run(|| TcpListener::bind(("0.0.0.0", port))).expect("netns").expect("listen");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
}

fn connects(from: &Netns, to: Ipv4Addr, port: u16) -> bool {
    from.run(|| TcpStream::connect_timeout(&SocketAddrV4::new(to, port).into(), Duration::from_millis(700)).is_ok()).expect("netns")
}

const BRIDGE_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: shop, labels: {app: stranger}}
spec: {nodeName: node-1, serviceAccountName: stranger, containers: []}
---
apiVersion: meshauth.io/v1alpha1
kind: MeshPolicy
metadata: {name: web-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}]
"#;

#[test]
fn a_bridge_chain_guards_each_pod_from_its_first_packet_and_lets_the_node_probe() {
    let node = NodeUnderTest::start("br", BRIDGE_MESH);
    let bridge = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni-ma", "isGateway": true, "ipMasq": false, "ipam": node.ipam("10.251.1.0/24")});
    let tag = std::process::id() % 100_000;
    let pods: Vec<Netns> = ["web", "client", "stranger"].iter().map(|p| Netns::new(&format!("cc{tag}-{p}")).expect("pod netns")).collect();
    let ips: Vec<Ipv4Addr> =
        ["web", "client", "stranger"].iter().zip(&pods).map(|(p, ns)| node.add(&bridge, &format!("c-{p}"), &ns.name, p)).collect();
    let interfaces = node.interfaces();
    assert_eq!(interfaces.len(), 3, "one entry per pod veth, none for the bridge: {interfaces:?}");
    assert!(interfaces.iter().all(|i| i.name.as_deref().is_some_and(|n| n.starts_with("veth"))), "{interfaces:?}");

    accept_on(&pods[0], 8080);
    // The stranger's very first connection: the pods were attached before ADD returned.
    let denied_before = node.maps().counters().expect("counters").packets(meshauth_datapath::Counter::DropDenied);
    assert!(!connects(&pods[2], ips[0], 8080), "a pod outside the policy is dropped from its first packet");
    let denied = node.maps().counters().expect("counters").packets(meshauth_datapath::Counter::DropDenied);
    assert!(denied > denied_before, "the drop was the policy's ({denied_before} → {denied})");
    assert!(connects(&pods[1], ips[0], 8080), "the permitted pod connects across the bridge");
    // The kubelet's probe: from the node's own address (the bridge's gateway address).
    assert!(connects(&node.ns, ips[0], 8080), "the node's own address reaches a policed pod");
    assert!(node.maps().counters().expect("counters").packets(meshauth_datapath::Counter::PassHost) > 0);

    // An agent restart keeps every pod guarded, and DEL still finds them (by address: the
    // restarted agent never saw their container IDs).
    let mut node = node;
    node.restart_agent();
    assert_eq!(node.interfaces().len(), 3, "the restarted agent adopted the pinned interfaces");
    assert!(!connects(&pods[2], ips[0], 8080), "still dropped after the restart");
    assert!(connects(&pods[1], ips[0], 8080), "still allowed after the restart");
    for ((p, ns), ip) in ["web", "client", "stranger"].iter().zip(&pods).zip(&ips) {
        node.del(&bridge, &format!("c-{p}"), &ns.name, p, *ip);
    }
    assert!(node.interfaces().is_empty(), "DEL released every interface");
    assert_eq!(node.link_pins(), 0, "DEL removed every link pin");
}

#[test]
fn an_interface_whose_pod_nobody_names_is_isolated_not_passed() {
    let node = NodeUnderTest::start("anon", BRIDGE_MESH);
    let bridge = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni-mb", "isGateway": true, "ipMasq": false, "ipam": node.ipam("10.251.2.0/24")});
    let tag = std::process::id() % 100_000;
    let client = Netns::new(&format!("cc{tag}-aclient")).expect("pod netns");
    let anon = Netns::new(&format!("cc{tag}-nameless")).expect("pod netns");
    node.add(&bridge, "c-client", &client.name, "client");
    // No K8S_POD_* arguments: the agent guards the veth but knows no pod for it.
    let anon_ip = node.add_with_args(&bridge, "c-anon", &anon.name, "IgnoreUnknown=1");
    accept_on(&anon, 8080);
    assert!(!connects(&client, anon_ip, 8080), "a pod the model does not know accepts no mesh traffic");
    assert!(connects(&node.ns, anon_ip, 8080), "the node itself still reaches it");
}

/// The previous result a runtime passes to DEL and CHECK for a pod of `pod_ns` with `ip`.
fn prev_result(pod_ns: &str, ip: Ipv4Addr) -> serde_json::Value {
    serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": format!("{ip}/24"), "interface": 0}], "interfaces": [{"name": "eth0", "sandbox": format!("/run/netns/{pod_ns}")}]})
}

#[test]
fn an_interface_guarded_for_one_pod_is_refused_for_another_and_check_tells_guarded_from_not() {
    let node = NodeUnderTest::start("reuse", BRIDGE_MESH);
    let bridge = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni-mc", "isGateway": true, "ipMasq": false, "ipam": node.ipam("10.251.3.0/24")});
    let tag = std::process::id() % 100_000;
    let web = Netns::new(&format!("cc{tag}-rweb")).expect("pod netns");
    let client = Netns::new(&format!("cc{tag}-rclient")).expect("pod netns");
    let web_ip = node.add(&bridge, "c-web", &web.name, "web");
    let client_ip = node.add(&bridge, "c-client", &client.name, "client");
    let args = |pod: &str| format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod}");
    let plugin = meshauth_bin("meshauth-cni");

    // CHECK: the guarded pod passes.
    let (ok, out) = node.cni(
        &plugin,
        "CHECK",
        "c-client",
        &client.name,
        &args("client"),
        &node.meshauth_conf(Some(prev_result(&client.name, client_ip))),
    );
    assert!(ok, "CHECK of a guarded pod: {out}");

    // A second address on the client's interface, claimed for another pod: the client's veth
    // is already the client's, so the ADD is refused and the client's guard stays as it was.
    let stolen = Ipv4Addr::new(10, 251, 3, 200);
    client.exec(&["ip", "addr", "add", &format!("{stolen}/24"), "dev", "eth0"]).expect("second address");
    let (ok, out) = node.cni(
        &plugin,
        "ADD",
        "c-stranger",
        &client.name,
        &args("stranger"),
        &node.meshauth_conf(Some(prev_result(&client.name, stolen))),
    );
    assert!(!ok, "an interface registered for one pod was registered for another address");
    assert!(out.contains("already registered for"), "{out}");
    let interfaces = node.interfaces();
    assert_eq!(interfaces.len(), 2, "{interfaces:?}");
    assert!(interfaces.iter().any(|i| i.pod_ip == client_ip) && !interfaces.iter().any(|i| i.pod_ip == stolen), "{interfaces:?}");
    accept_on(&web, 8080);
    assert!(connects(&client, web_ip, 8080), "the client is still guarded as the client");

    // CHECK of the client's address from the web pod's namespace, which holds it too now:
    // guarded, but on the client's veth, not the web pod's.
    web.exec(&["ip", "addr", "add", &format!("{client_ip}/32"), "dev", "eth0"]).expect("client's address on web");
    let (ok, out) =
        node.cni(&plugin, "CHECK", "c-web", &web.name, &args("web"), &node.meshauth_conf(Some(prev_result(&web.name, client_ip))));
    assert!(!ok && out.contains("not on this pod's interface"), "CHECK passed a pod for another pod's guarded address: {out}");
    web.exec(&["ip", "addr", "del", &format!("{client_ip}/32"), "dev", "eth0"]).expect("remove it again");
    // After DEL, CHECK says the pod is no longer guarded.
    node.del(&bridge, "c-client", &client.name, "client", client_ip);
    let (ok, out) = node.cni(
        &plugin,
        "CHECK",
        "c-client",
        &client.name,
        &args("client"),
        &node.meshauth_conf(Some(prev_result(&client.name, client_ip))),
    );
    assert!(!ok && out.contains("not guarded"), "CHECK after DEL: {out}");

    // A pod whose veth goes without a DEL (a runtime that crashed, a namespace torn down):
    // the agent forgets it, entry and link pins, on its own.
    assert_eq!((node.interfaces().len(), node.link_pins()), (1, 2), "the web pod is still guarded");
    web.exec(&["ip", "link", "del", "eth0"]).expect("delete the web pod's veth");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(node.interfaces().is_empty() && node.link_pins() == 0) {
        assert!(Instant::now() < deadline, "a vanished veth stayed registered: {:?}\n{}", node.interfaces(), node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

const CHURN_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: churn, namespace: shop, labels: {app: churn}}
spec: {nodeName: node-1, serviceAccountName: churn, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: steady, namespace: shop, labels: {app: steady}}
spec: {nodeName: node-1, serviceAccountName: steady, containers: []}
---
apiVersion: meshauth.io/v1alpha1
kind: MeshPolicy
metadata: {name: churn-isolated, namespace: shop}
spec:
  selector: {matchLabels: {app: churn}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: nobody}}}]
    ports: [{port: 8080}]
"#;

#[test]
fn five_thousand_pods_through_the_ptp_chain_leave_the_maps_bounded_by_live_pods() {
    let pods: usize = std::env::var("MESHAUTH_CHURN_PODS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let node = NodeUnderTest::start("ptp", CHURN_MESH);
    let ptp =
        serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "type": "ptp", "ipMasq": false, "ipam": node.ipam("10.252.0.0/16")});
    let tag = std::process::id() % 100_000;
    let steady_ns = Netns::new(&format!("cc{tag}-steady")).expect("pod netns");
    let steady_ip = node.add(&ptp, "steady", &steady_ns.name, "steady");
    let churn_ns = Netns::new(&format!("cc{tag}-churn")).expect("pod netns");
    let start = Instant::now();
    for i in 0..pods {
        let container = format!("churn-{i}");
        let ip = node.add(&ptp, &container, &churn_ns.name, "churn");
        // Guarded when ADD returned: its entry and both link pins exist.
        let interfaces = node.interfaces();
        assert_eq!(interfaces.len(), 2, "pod {i}: the steady pod and this one, nothing left of earlier pods: {interfaces:?}");
        assert!(
            interfaces.iter().any(|e| e.pod_ip == ip && e.attach != "none"),
            "pod {i} ({ip}) guarded when ADD returned: {interfaces:?}"
        );
        assert_eq!(node.link_pins(), 4, "pod {i}: two links per live pod");
        // Enforced from its first packet (sampled: a refused connection waits out its
        // timeout): the policy isolating it drops the steady pod's SYN at its veth.
        if i % 250 == 0 {
            let denied = node.maps().counters().expect("counters").packets(meshauth_datapath::Counter::DropDenied);
            assert!(!connects(&steady_ns, ip, 8080), "pod {i} ({ip}): its policy did not hold right after ADD");
            let now = node.maps().counters().expect("counters").packets(meshauth_datapath::Counter::DropDenied);
            assert!(now > denied, "pod {i} ({ip}): the SYN was not dropped by its policy ({denied} → {now})");
        }
        node.del(&ptp, &container, &churn_ns.name, "churn", ip);
    }
    eprintln!("{pods} pods added and deleted through ptp + meshauth-cni in {:.1} s", start.elapsed().as_secs_f64());
    let interfaces = node.interfaces();
    assert_eq!(interfaces.len(), 1, "only the steady pod is left: {interfaces:?}");
    assert_eq!(interfaces[0].pod_ip, steady_ip);
    assert_eq!(node.link_pins(), 2);
    let endpoints = node.maps().endpoints().expect("endpoints");
    assert_eq!(endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), vec![steady_ip], "endpoints of deleted pods are gone");
}

/// GET `path` from the agent's metrics endpoint (its address is in the agent's log): the
/// status line and the body.
fn agent_http(node: &NodeUnderTest, path: &str) -> String {
    use std::io::Read;
    let log = node.log();
    let addr = log
        .lines()
        .filter(|l| l.contains("serving /metrics"))
        .find_map(|l| {
            l.split("metrics_addr")
                .nth(1)
                .and_then(|rest| rest.trim_start_matches(['"', ':', '=', ' ']).split(['"', ' ', ',']).next().map(str::to_owned))
        })
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .unwrap_or_else(|| panic!("no metrics address in the agent log:\n{log}"));
    node.ns
        .run(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .expect("node netns")
        .expect("metrics endpoint")
}

/// The web pod's policy needs ten entries; the agent's policy map holds four.
const OVERSIZED_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: node-1, serviceAccountName: web, containers: []}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {nodeName: node-1, serviceAccountName: client, containers: []}
---
apiVersion: meshauth.io/v1alpha1
kind: MeshPolicy
metadata: {name: web-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}, {port: 8082}, {port: 8084}, {port: 8086}, {port: 8088}, {port: 8090}, {port: 8092}, {port: 8094}, {port: 8096}, {port: 8098}]
"#;

#[test]
fn an_agent_fed_a_policy_larger_than_its_map_still_guards_every_pod() {
    let node = NodeUnderTest::start_with_env("big", OVERSIZED_MESH, &[("MESHAUTH_BPF_POLICY_ENTRIES", "4")]);
    let bridge = serde_json::json!({"cniVersion": "1.0.0", "name": "podnet", "type": "bridge", "bridge": "cni-mb", "isGateway": true, "ipMasq": false, "ipam": node.ipam("10.251.3.0/24")});
    let tag = std::process::id() % 100_000;
    let pods: Vec<Netns> = ["web", "client"].iter().map(|p| Netns::new(&format!("cb{tag}-{p}")).expect("pod netns")).collect();
    // ADD still succeeds: the pods are attached although the policy cannot be written.
    let ips: Vec<Ipv4Addr> = ["web", "client"].iter().zip(&pods).map(|(p, ns)| node.add(&bridge, &format!("c-{p}"), &ns.name, p)).collect();
    assert_eq!(node.interfaces().len(), 2, "every pod is attached");
    accept_on(&pods[0], 8080);
    // The web pod's rules did not fit: it accepts nothing rather than half its rules (or all).
    assert!(!connects(&pods[1], ips[0], 8080), "a destination whose policy did not fit fails closed");
    let ready = agent_http(&node, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("deny everything"), "{ready}");
    assert!(agent_http(&node, "/healthz").starts_with("HTTP/1.1 200"), "alive: no restart loop");
    let metrics = agent_http(&node, "/metrics");
    assert!(metrics.contains("meshauth_agent_policy_applies_total{result=\"degraded\"}"), "{metrics}");
    assert!(metrics.contains("meshauth_agent_policy_denied_destinations 1"), "{metrics}");
    assert!(node.log().contains("does not fit in the maps"), "the agent says so in its log");
}

/// The primary CNI's conflist as Calico's installer writes it (its own spacing, which
/// uninstalling must give back byte for byte).
const PRIMARY_CONFLIST: &str = "{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": \"podnet\",\n  \"plugins\": [\n    {\"type\": \"ptp\", \"ipMasq\": false, \"ipam\": {\"type\": \"host-local\", \"subnet\": \"10.253.0.0/24\"}}\n  ]\n}\n";

#[test]
fn the_agent_chains_meshauth_cni_back_when_the_primary_rewrites_its_config_and_uninstall_gives_its_bytes_back() {
    require_root();
    let dir = tempfile::tempdir().expect("tempdir");
    let (conf, bin, socket) = (dir.path().join("net.d"), dir.path().join("bin"), dir.path().join("cni.sock"));
    std::fs::create_dir_all(&conf).expect("conf dir");
    let list = conf.join("10-calico.conflist");
    std::fs::write(&list, PRIMARY_CONFLIST).expect("primary conflist");
    let agent = |args: &[&str]| {
        let out = Command::new(meshauth_bin("meshauth-agent"))
            .args(args)
            .arg("--bin-dir")
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .env("MESHAUTH_CNI_SOCKET", &socket)
            .stdin(Stdio::null())
            .output()
            .expect("meshauth-agent");
        assert!(out.status.success(), "meshauth-agent {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let chained = || {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&list).expect("read conflist")).expect("conflist JSON");
        v["plugins"].as_array().and_then(|p| p.last()).is_some_and(|p| p["type"] == "meshauth-cni")
    };
    // As the chart's init container does, then the agent.
    let plugin = meshauth_bin("meshauth-cni");
    agent(&["cni-install", "--plugin", plugin.to_str().expect("path")]);
    assert!(chained() && bin.join("meshauth-cni").exists(), "installed and chained last");
    let s = |p: &Path| p.to_str().expect("path").to_owned();
    let node = NodeUnderTest::start_with_env(
        "rc",
        BRIDGE_MESH,
        &[("MESHAUTH_CNI_CONF_DIR", &s(&conf)), ("MESHAUTH_CNI_BIN_DIR", &s(&bin)), ("MESHAUTH_CNI_SOCKET", &s(&socket))],
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(!node.log().contains("chained again"), "an agent whose entry is in place writes nothing:\n{}", node.log());

    // The primary's installer restarts and writes its conflist anew (another subnet), without
    // meshauth's entry: new pods would start unguarded.
    let rewritten = PRIMARY_CONFLIST.replace("10.253.0.0/24", "10.253.1.0/24");
    std::fs::write(&list, &rewritten).expect("primary rewrites");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !chained() {
        assert!(Instant::now() < deadline, "meshauth-cni not chained back:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(std::fs::read_to_string(&list).expect("read").contains("10.253.1.0/24"), "the primary's new config kept");
    // The agent logs the repair after it wrote the file: the line may come a moment later.
    while !node.log().contains("chained again") {
        assert!(Instant::now() < deadline, "the repair is not logged:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(node);

    agent(&["cni-uninstall"]);
    assert_eq!(std::fs::read_to_string(&list).expect("read"), rewritten, "the primary's own bytes are back");
    let left: Vec<String> =
        std::fs::read_dir(&conf).expect("conf dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, ["10-calico.conflist"], "nothing of meshauth's is left in the CNI config directory");
    assert!(!bin.join("meshauth-cni").exists(), "the plugin binary is removed");
}
