//! The chart on a real cluster: `tests/testenv up --kubelet` (two nodes, each with its own
//! kubelet, containerd, kube-proxy, CNI — `bridge` on node-1, `ptp` on node-2 — and SPIRE agent
//! with the `k8s` workload attestor), the meshauth image built by `scripts/images` and loaded
//! into both nodes, `helm install` with the chart's defaults (but for taking the join-token agents'
//! node annotations). Then, as a user would see it:
//! every meshauth pod Running and Ready, the nodes still reachable, a Strict mesh between app
//! pods the kubelet started (the permitted pair connects first time once pre-authenticated,
//! another service account is dropped, the policed pod's readiness probe keeps it Ready), the
//! client reaches the server through a ClusterIP Service first time too (kube-proxy's DNAT on
//! node-1 comes before the uplink's tagger), a SYN with the client's address from a node-1
//! process is dropped at node-2 for its missing tag, the
//! webhook called through its Service refuses an invalid MeshPolicy, and `helm uninstall`
//! leaves each node's CNI configuration as it was. Root only.

use meshauth_testenv::{Kubelet, Options, TestEnv};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The workspace's binaries (`cargo build --workspace --bins`, as scripts/test does first).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/real_cluster-<hash>
    exe.parent().and_then(Path::parent).expect("target dir").to_owned()
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

struct Cluster {
    env: TestEnv,
    work: tempfile::TempDir,
}

impl Cluster {
    fn kubectl(&self, args: &[&str]) -> (bool, String) {
        self.env.kubectl(args, "")
    }

    fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> (bool, String) {
        self.env.kubectl(args, stdin)
    }

    fn helm(&self, args: &[&str]) -> (bool, String) {
        run(Command::new(self.env.bin("helm")).arg("--kubeconfig").arg(self.env.kubeconfig()).args(args))
    }

    /// What the cluster looks like, for failure messages.
    fn describe(&self) -> String {
        let (_, pods) = self.kubectl(&["get", "pods", "-A", "-o", "wide"]);
        let (_, events) = self.kubectl(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
        let (_, logs) = self.kubectl(&[
            "logs",
            "-n",
            "meshauth-system",
            "-l",
            "app.kubernetes.io/name=meshauth-agent",
            "--tail=40",
            "--all-containers",
        ]);
        format!("pods:\n{pods}\nevents:\n{}\nagent logs:\n{logs}", events.lines().rev().take(40).collect::<Vec<_>>().join("\n"))
    }

    fn wait(&self, what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok() {
            assert!(Instant::now() < deadline, "{what}: not after {timeout:?}\n{}", self.describe());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// An HTTP request from `pod` to `ip:port` through busybox `nc` (its `wget` segfaults on
    /// this machine kind).
    fn http_from(&self, pod: &str, ip: &str, port: u16) -> bool {
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}");
        let (ok, out) = self.kubectl(&["exec", "-n", "shop", pod, "--", "sh", "-c", &script]);
        ok && out.contains("HTTP/1")
    }

    /// Whether the server pod is Ready, and since when (the condition's lastTransitionTime).
    fn server_ready(&self) -> (bool, String) {
        let (_, out) = self.kubectl(&[
            "get",
            "pod",
            "-n",
            "shop",
            "server",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.conditions[?(@.type==\"Ready\")].lastTransitionTime}",
        ]);
        let (status, since) = out.trim().split_once(' ').unwrap_or((out.trim(), ""));
        (status == "True", since.to_owned())
    }

    fn pod_ip(&self, pod: &str) -> String {
        let (ok, out) = self.kubectl(&["get", "pod", "-n", "shop", pod, "-o", "jsonpath={.status.podIP}"]);
        assert!(ok && !out.is_empty(), "{pod} has no IP: {out}");
        out.trim().to_owned()
    }

    /// A counter of `node`'s datapath (`meshauthctl status` in its agent pod).
    fn counter(&self, agent: &str, name: &str) -> u64 {
        self.counters(agent)[name]["packets"].as_u64().unwrap_or(0)
    }

    /// Every counter of the agent's datapath, as `meshauthctl status` reports them.
    fn counters(&self, agent: &str) -> serde_json::Value {
        let (ok, out) = self.kubectl(&["exec", "-n", "meshauth-system", agent, "--", "meshauthctl", "status", "--output", "json"]);
        assert!(ok, "status: {out}");
        // The output is the JSON document, then whatever kubectl adds on stderr.
        let v: serde_json::Value = serde_json::Deserializer::from_str(&out)
            .into_iter()
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("status JSON: {out}"));
        v["counters"].clone()
    }

    /// IPv4 packets the agent's datapath dropped so far, by drop counter. (IPv6 is left out:
    /// pods' own neighbour and multicast chatter is dropped whatever meshauth authenticates.)
    fn drops(&self, agent: &str) -> std::collections::BTreeMap<&'static str, u64> {
        const IPV4_DROPS: [&str; 10] = [
            "drop_denied",
            "drop_auth_missing",
            "drop_auth_expired",
            "drop_spoofed",
            "drop_fragment",
            "drop_malformed",
            "drop_wrong_interface",
            "drop_tag_missing",
            "drop_tag_invalid",
            "drop_syn_not_from_pod",
        ];
        let counters = self.counters(agent);
        IPV4_DROPS.into_iter().map(|name| (name, counters[name]["packets"].as_u64().unwrap_or(0))).collect()
    }

    /// TCP segments `pod` has retransmitted so far (`RetransSegs` of its `/proc/net/snmp`).
    fn retransmits(&self, pod: &str) -> u64 {
        let (ok, out) = self.kubectl(&["exec", "-n", "shop", pod, "--", "cat", "/proc/net/snmp"]);
        assert!(ok, "{pod}'s /proc/net/snmp: {out}");
        let tcp: Vec<&str> = out.lines().filter(|l| l.starts_with("Tcp:")).collect();
        let [names, values] = tcp.as_slice() else { panic!("no Tcp lines in {out}") };
        let at = names.split_whitespace().position(|n| n == "RetransSegs").expect("RetransSegs");
        values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).expect("RetransSegs value")
    }

    fn conflist(&self, node: &str) -> String {
        let k = self.env.kubelet_node(node).expect("kubelet node");
        std::fs::read_to_string(k.cni_conf_dir.join(Kubelet::CNI_CONFLIST)).expect("node conflist")
    }
}

/// A TCP connection from `src` (not an address of the namespace: IP_TRANSPARENT) to `dst:port`,
/// made inside the network namespace at `netns`: whether it was accepted.
fn connect_as(netns: &Path, src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, port: u16) -> bool {
    use std::net::{SocketAddr, SocketAddrV4};
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns).expect("node netns");
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this short-lived thread only; the descriptor outlives the call.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
            socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into()).expect("bind");
            socket.connect_timeout(&SocketAddr::V4(SocketAddrV4::new(dst, port)).into(), Duration::from_secs(2)).is_ok()
        })
        .join()
        .expect("namespace thread")
    })
}

/// Strips the debug builds into a directory for the image (a release build would double the
/// test command's build time).
fn image(work: &Path) -> PathBuf {
    let bins = work.join("bin");
    std::fs::create_dir_all(&bins).expect("bin dir");
    for b in ["meshauth-agent", "meshauth-cni", "meshauth-operator", "meshauth-webhook", "meshauthctl"] {
        let from = bin_dir().join(b);
        assert!(from.exists(), "{} is missing: run `cargo build --workspace --bins` first", from.display());
        let (ok, out) = run(Command::new("objcopy").arg("--strip-debug").arg(&from).arg(bins.join(b)));
        assert!(ok, "objcopy {b}: {out}");
    }
    let build = |out_dir: &Path| {
        let (ok, out) = run(Command::new(repo().join("scripts/images")).arg("--bin-dir").arg(&bins).arg("--out").arg(out_dir));
        assert!(ok, "scripts/images: {out}");
        out_dir.join("meshauth.tar")
    };
    let image = build(&work.join("images"));
    // Reproducible: the same binaries give the same bytes, whenever and wherever built (a
    // second later, into another directory: no clock or path may leak into the archive).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = build(&work.join("images-again"));
    let bytes = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(bytes(&image) == bytes(&again), "two builds of the image from the same binaries differ");
    image
}

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: stranger, namespace: shop}
---
apiVersion: meshauth.io/v1alpha1
kind: MutualAuth
metadata: {name: default, namespace: shop}
spec: {mode: Strict}
---
apiVersion: meshauth.io/v1alpha1
kind: MeshPolicy
metadata: {name: server-ingress, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  ingress:
  - from: [{identity: spiffe://cluster.local/ns/shop/sa/client}]
    ports: [{port: 8080}]
    authentication: {mode: Required}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: shop}
spec:
  selector: {app: server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec:
  serviceAccountName: server
  nodeName: node-2
  containers:
  - name: app
    image: IMAGE
    imagePullPolicy: IfNotPresent
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 2
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  serviceAccountName: client
  nodeName: node-1
  containers: [{name: app, image: IMAGE, imagePullPolicy: IfNotPresent}]
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: shop, labels: {app: stranger}}
spec:
  serviceAccountName: stranger
  nodeName: node-1
  containers: [{name: app, image: IMAGE, imagePullPolicy: IfNotPresent}]
"#;

#[test]
fn the_chart_runs_on_real_kubelets_and_enforces_a_strict_mesh() {
    let env = TestEnv::start_blocking(Options { kubelet: true, ..Options::default() }).expect("kubelet test environment");
    let work = tempfile::tempdir().expect("tempdir");
    let c = Cluster { env, work };
    let tar = image(c.work.path());
    c.env.load_image_blocking(&tar).expect("load the meshauth image");
    let before: Vec<String> = ["node-1", "node-2"].iter().map(|n| c.conflist(n)).collect();

    // The test environment's SPIRE agents attest with join tokens, which name no node: the
    // operator must be told to take the nodes' agent annotations (k8s_psat clusters need not).
    let (ok, out) = c.helm(&[
        "install",
        "meshauth",
        repo().join("config/helm/meshauth").to_str().expect("path"),
        "-n",
        "meshauth-system",
        "--create-namespace",
        "--set",
        "operator.trustNodeAgentAnnotations=true",
    ]);
    assert!(ok, "helm install: {out}");
    c.wait("every meshauth pod Running and Ready", Duration::from_secs(240), || {
        let (ok, out) = c.kubectl(&[
            "get",
            "pods",
            "-n",
            "meshauth-system",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ]);
        let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
        // 2 agents, 2 operators, 2 webhooks.
        ok && lines.len() == 6 && lines.iter().all(|l| l.ends_with(" True"))
    });
    for node in ["node-1", "node-2"] {
        assert!(c.conflist(node).contains("meshauth-cni"), "{node}: meshauth-cni chained into the conflist");
    }
    let (ok, out) =
        c.kubectl(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}"]);
    assert!(ok && out.lines().filter(|l| *l == "True").count() == 2, "both nodes still Ready and reachable: {out}");

    let apps = APPS.replace("IMAGE", Kubelet::TEST_IMAGE);
    let (ok, out) = c.kubectl_stdin(&["apply", "-f", "-"], &apps);
    assert!(ok, "apply the apps: {out}");
    // The readiness probe comes from node-2's own address: the policed pod still goes Ready.
    c.wait("the policed server Ready through its probe", Duration::from_secs(120), || c.server_ready().0);
    let (_, ready_since) = c.server_ready();
    c.wait("client and stranger Running", Duration::from_secs(120), || {
        let (_, out) = c.kubectl(&["get", "pods", "-n", "shop", "-o", "jsonpath={range .items[*]}{.status.phase}{\"\\n\"}{end}"]);
        out.lines().filter(|l| *l == "Running").count() == 3
    });
    let server = c.pod_ip("server");

    // Pre-authentication: node-2's agent writes the pair before the client sends anything.
    let agent_on_node_2 = {
        let (ok, out) = c.kubectl(&[
            "get",
            "pods",
            "-n",
            "meshauth-system",
            "-l",
            "app.kubernetes.io/name=meshauth-agent",
            "--field-selector",
            "spec.nodeName=node-2",
            "-o",
            "jsonpath={.items[0].metadata.name}",
        ]);
        assert!(ok && !out.is_empty(), "the agent pod on node-2: {out}");
        out.trim().to_owned()
    };
    c.wait("the pair (server ← client) authenticated on node-2", Duration::from_secs(120), || {
        let (ok, out) =
            c.kubectl(&["exec", "-n", "meshauth-system", &agent_on_node_2, "--", "meshauthctl", "auth", "list", "--output", "json"]);
        ok && out.contains("spiffe://cluster.local/ns/shop/sa/server") && out.contains("spiffe://cluster.local/ns/shop/sa/client")
    });
    let enforced_at = Instant::now();
    // First time means no drop and no SYN retransmitted (`nc -w 3` alone would hide one).
    let (drops, retransmits) = (c.drops(&agent_on_node_2), c.retransmits("client"));
    assert!(c.http_from("client", &server, 8080), "the permitted, pre-authenticated pair connects first time\n{}", c.describe());
    assert_eq!(c.drops(&agent_on_node_2), drops, "node-2 dropped a packet of the pre-authenticated pair");
    assert_eq!(c.retransmits("client"), retransmits, "the client retransmitted a segment");
    let denied = c.counter(&agent_on_node_2, "drop_denied");
    assert!(!c.http_from("stranger", &server, 8080), "a pod of another service account is dropped");
    assert!(c.counter(&agent_on_node_2, "drop_denied") > denied, "node-2 counted the stranger's SYN as denied by the policy");
    let (ok, cluster_ip) = c.kubectl(&["get", "service", "-n", "shop", "server", "-o", "jsonpath={.spec.clusterIP}"]);
    assert!(ok && !cluster_ip.trim().is_empty(), "the Service's ClusterIP: {cluster_ip}");
    let (drops, retransmits) = (c.drops(&agent_on_node_2), c.retransmits("client"));
    assert!(
        c.http_from("client", cluster_ip.trim(), 80),
        "the client reaches the server through its ClusterIP first time\n{}",
        c.describe()
    );
    assert_eq!(c.drops(&agent_on_node_2), drops, "node-2 dropped a packet of the connection through the ClusterIP");
    assert_eq!(c.retransmits("client"), retransmits, "the client retransmitted a segment through the ClusterIP");

    // A process on node-1 (root, as a hostNetwork pod can be) writes the client's address
    // into a SYN: node-1's tagger gives it no tag (the client's veth never sent it) and node-2
    // drops it.
    let client_ip: std::net::Ipv4Addr = c.pod_ip("client").parse().expect("client IP");
    let server_ip: std::net::Ipv4Addr = server.parse().expect("server IP");
    let missing = c.counter(&agent_on_node_2, "drop_tag_missing");
    let node_1 = c.env.kubelet_node("node-1").expect("node-1").netns.clone();
    assert!(!connect_as(&node_1, client_ip, server_ip, 8080), "a spoofed SYN from node-1 must not connect");
    assert!(c.counter(&agent_on_node_2, "drop_tag_missing") > missing, "dropped at node-2 for its missing tag");
    assert!(c.http_from("client", &server, 8080), "the genuine client still connects");
    // node-1 itself (a hostNetwork pod there, the kubelet) is no source the server's policy
    // names: only node-2's own addresses pass as the host, so node-1's is dropped.
    let node_1_ip: std::net::Ipv4Addr = c.env.kubelet_node("node-1").expect("node-1").ip.parse().expect("node-1 IP");
    let denied = c.counter(&agent_on_node_2, "drop_denied");
    assert!(!connect_as(&node_1, node_1_ip, server_ip, 8080), "another node's own address passed the server's policy");
    assert!(c.counter(&agent_on_node_2, "drop_denied") > denied, "node-2 counted node-1's own SYN as denied by the policy");

    // The probe kept the server Ready all along under enforcement: at least five probe
    // periods (2 s; three failures turn it NotReady) after node-2 enforced the pair, Ready
    // has not changed since it first became so.
    if let Some(rest) = Duration::from_secs(10).checked_sub(enforced_at.elapsed()) {
        std::thread::sleep(rest);
    }
    assert_eq!(c.server_ready(), (true, ready_since.clone()), "the policed server left Ready under enforcement\n{}", c.describe());

    // The webhook, called by the API server through its Service.
    let bad = "apiVersion: meshauth.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: bad, namespace: shop}\nspec:\n  selector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{identity: 'spiffe://Cluster.Local/ns/shop/sa/x'}]\n";
    let (ok, out) = c.kubectl_stdin(&["apply", "-f", "-"], bad);
    // The CRD's own rules cannot read a SPIFFE ID; this reason is the webhook's (a 422 with
    // field causes, which kubectl prints as "is invalid").
    assert!(
        !ok && out.contains("is not a valid SPIFFE ID: trust domain has character 'C'"),
        "the webhook refuses an invalid MeshPolicy: {out}"
    );

    let (ok, out) = c.kubectl(&["delete", "namespace", "shop", "--wait=true", "--timeout=120s"]);
    assert!(ok, "delete the apps: {out}");
    let (ok, out) = c.helm(&["uninstall", "meshauth", "-n", "meshauth-system", "--wait", "--timeout", "120s"]);
    assert!(ok, "helm uninstall: {out}");
    c.wait("each node's CNI configuration as it was, byte for byte", Duration::from_secs(60), || {
        ["node-1", "node-2"].iter().zip(&before).all(|(n, b)| c.conflist(n) == *b)
    });
    for node in ["node-1", "node-2"] {
        let plugin = c.env.kubelet_node(node).expect("kubelet node").cni_bin_dir.join("meshauth-cni");
        assert!(!plugin.exists(), "{node}: {} left behind", plugin.display());
    }
}
