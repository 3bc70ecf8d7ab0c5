//! Nodes and pods on this machine (feature `netns`; the demo, the benchmarks, tests): a "node" as a network namespace with pods
//! as namespaces behind veths, routed the way CNIs do it (a /32 route per pod on the node,
//! proxy ARP on the host side, the pod's default route via 169.254.1.1).
//!
//! Sockets belong to the namespace they were created in, whatever thread uses them later, so
//! [`Netns::run`] creates them on a short-lived thread inside the namespace and hands them back.
//! Everything is named after the test, and removed on drop.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Runs a command; its stderr is the error.
pub fn sh(args: &[&str]) -> io::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails the test early with a clear message when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests load BPF programs and create network namespaces: run them as root");
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name`, replacing a leftover of an earlier run.
    pub fn new(name: &str) -> io::Result<Self> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        // IPv6 stays out of the way (router solicitations, MLD): IPv6 rules are tested with
        // BPF_PROG_TEST_RUN instead.
        let ns = Netns { name: name.into() };
        ns.sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
        ns.sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
        Ok(ns)
    }

    /// Writes `/proc/sys/<key>` inside the namespace (network sysctls are per namespace, as
    /// seen by the thread that opens them).
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let path = format!("/proc/sys/{key}");
        self.run(|| std::fs::write(&path, value))?
    }

    fn open(&self) -> io::Result<File> {
        File::open(format!("/run/netns/{}", self.name))
    }

    /// Runs `f` on a thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let ns = self.open()?;
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&ns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("namespace thread panicked"))?
        })
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> io::Result<NetnsGuard> {
        let back = File::open("/proc/thread-self/ns/net")?;
        enter(&self.open()?)?;
        Ok(NetnsGuard { back })
    }

    /// `ip netns exec NAME args...`.
    pub fn exec(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// TCP segments retransmitted in this namespace so far (`/proc/net/snmp`).
    pub fn tcp_retransmits(&self) -> io::Result<u64> {
        self.run(|| -> io::Result<u64> {
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
            let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == "RetransSegs")
                .and_then(|(_, v)| v.parse().ok())
                .ok_or_else(|| io::Error::other("no RetransSegs in /proc/net/snmp"))
        })?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: a valid namespace descriptor; affects only the calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Returns the thread to its namespace of before [`Netns::enter`].
pub struct NetnsGuard {
    back: File,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = enter(&self.back);
    }
}

/// A pod: its namespace, address and the host side of its veth in the node namespace.
pub struct Pod {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

/// A node namespace and its pods, `10.77.0.1`, `10.77.0.2`, ...
pub struct Node {
    pub pods: Vec<Pod>,
    pub ns: Netns,
}

impl Node {
    /// Creates `<prefix>-node` and `<prefix>-p1..=pN` (keep `prefix` short and unique per test).
    pub fn new(prefix: &str, pods: usize) -> io::Result<Self> {
        Self::new_in(prefix, pods, 0)
    }

    /// As [`Node::new`], with pods `10.77.<subnet>.1..=N` (nodes of one test need their own).
    pub fn new_in(prefix: &str, pods: usize, subnet: u8) -> io::Result<Self> {
        let ns = Netns::new(&format!("{prefix}-node"))?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        // The pods' gateway: a node address, so the host sides answer ARP for it.
        sh(&["ip", "-n", &ns.name, "addr", "add", "169.254.1.1/32", "dev", "lo"])?;
        let mut node = Node { pods: Vec::new(), ns };
        for i in 1..=pods {
            let pod_ns = Netns::new(&format!("{prefix}-p{i}"))?;
            let ip = Ipv4Addr::new(10, 77, subnet, i as u8);
            let host_if = format!("h{i}");
            let (n, p) = (node.ns.name.as_str(), pod_ns.name.as_str());
            let ip_s = ip.to_string();
            sh(&["ip", "-n", n, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", p])?;
            sh(&["ip", "-n", p, "addr", "add", &format!("{ip_s}/32"), "dev", "eth0"])?;
            sh(&["ip", "-n", p, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", p, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
            sh(&["ip", "-n", p, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
            sh(&["ip", "-n", n, "link", "set", &host_if, "up"])?;
            sh(&["ip", "-n", n, "route", "add", &format!("{ip_s}/32"), "dev", &host_if])?;
            node.ns.sysctl(&format!("net/ipv4/conf/{host_if}/proxy_arp"), "1")?;
            node.pods.push(Pod { ns: pod_ns, ip, host_if });
        }
        Ok(node)
    }
}

/// Links two nodes' namespaces with a veth, `uplink` in both, addressed `192.168.<net>.1/30`
/// (in `a`) and `.2/30` (in `b`), and routes each node's pod subnet (`10.77.<subnet>.0/24`)
/// via the other: the underlay between two nodes.
pub fn link_nodes(a: &Netns, a_subnet: u8, b: &Netns, b_subnet: u8, net: u8, uplink: &str) -> io::Result<()> {
    let peer = format!("{uplink}p");
    sh(&["ip", "-n", &a.name, "link", "add", uplink, "type", "veth", "peer", "name", &peer, "netns", &b.name])?;
    sh(&["ip", "-n", &b.name, "link", "set", &peer, "name", uplink])?;
    for (ns, host, other_subnet) in [(a, 1, b_subnet), (b, 2, a_subnet)] {
        let n = ns.name.as_str();
        sh(&["ip", "-n", n, "addr", "add", &format!("192.168.{net}.{host}/30"), "dev", uplink])?;
        sh(&["ip", "-n", n, "link", "set", uplink, "up"])?;
        let via = format!("192.168.{net}.{}", 3 - host);
        sh(&["ip", "-n", n, "route", "add", &format!("10.77.{other_subnet}.0/24"), "via", &via, "dev", uplink])?;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        // The underlay carries pod addresses that are not its own: no reverse-path filter.
        ns.sysctl("net/ipv4/conf/all/rp_filter", "0")?;
        ns.sysctl(&format!("net/ipv4/conf/{uplink}/rp_filter"), "0")?;
    }
    Ok(())
}

/// A pin directory for one test, removed (with everything pinned in it) on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(test: &str) -> Self {
        let p = PathBuf::from(format!("/sys/fs/bpf/meshauth-test-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        PinDir(p)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server thread that stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP echo server on `pod:port` (one thread per connection).
pub fn tcp_echo_server(pod: &Pod, port: u16) -> io::Result<Server> {
    let addr = SocketAddrV4::new(pod.ip, port);
    let listener = pod.ns.run(|| TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                        let _ = conn.set_nodelay(true);
                        let mut buf = [0u8; 65536];
                        while !flag.load(Ordering::Relaxed) {
                            match conn.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => {
                                    if conn.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                                Err(_) => break,
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(Server { stop, thread: Some(thread) })
}

/// A UDP echo server on `pod:port`.
pub fn udp_echo_server(pod: &Pod, port: u16) -> io::Result<Server> {
    let addr = SocketAddrV4::new(pod.ip, port);
    let sock = pod.ns.run(|| UdpSocket::bind(addr))??;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while !flag.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    });
    Ok(Server { stop, thread: Some(thread) })
}

/// A TCP connection from `pod` to `dst:port`, or the connect error (a drop shows as a timeout).
pub fn tcp_connect(pod: &Pod, dst: Ipv4Addr, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let addr = SocketAddr::V4(SocketAddrV4::new(dst, port));
    let conn = pod.ns.run(|| TcpStream::connect_timeout(&addr, timeout))??;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_nodelay(true)?;
    Ok(conn)
}

/// One request/response on an open connection: `true` when the echo came back in time.
pub fn tcp_roundtrip(conn: &mut TcpStream, msg: &[u8]) -> bool {
    if conn.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0u8; msg.len()];
    conn.read_exact(&mut buf).is_ok() && buf == msg
}

/// A new connection and one round trip: `true` when the echo came back within `timeout`.
pub fn tcp_request(pod: &Pod, dst: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    match tcp_connect(pod, dst, port, timeout) {
        Ok(mut c) => tcp_roundtrip(&mut c, b"meshauth"),
        Err(_) => false,
    }
}

/// A UDP socket in `pod`, bound to `src` (the pod's address when `None`).
pub fn udp_socket(pod: &Pod, src: Option<Ipv4Addr>) -> io::Result<UdpSocket> {
    let addr = SocketAddrV4::new(src.unwrap_or(pod.ip), 0);
    pod.ns.run(|| UdpSocket::bind(addr))?
}

/// One datagram from `pod` (from `src`, when given) to `dst:port`: `true` when its echo came
/// back within `timeout`.
pub fn udp_request(pod: &Pod, src: Option<Ipv4Addr>, dst: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let Ok(sock) = udp_socket(pod, src) else {
        return false;
    };
    if sock.set_read_timeout(Some(timeout)).is_err() || sock.send_to(b"meshauth", SocketAddrV4::new(dst, port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(sock.recv_from(&mut buf), Ok((8, _)))
}

/// An endpoint of the tables, not isolated, with `auth` as its MutualAuth; `node`: the address
/// of the node the pod runs on as the node loading the tables reaches it (none for its own
/// pods: their veths say where they are).
pub fn endpoint(
    ip: Ipv4Addr,
    identity: u32,
    spiffe_id: u32,
    auth: meshauth_policy::tables::AuthRequirement,
    node: Option<Ipv4Addr>,
) -> meshauth_policy::tables::EndpointEntry {
    meshauth_policy::tables::EndpointEntry {
        ip,
        security_identity: identity,
        spiffe_id,
        isolated: false,
        audit: false,
        mutual_auth: auth,
        pod: format!("test/{ip}"),
        node: None,
        node_address: node,
    }
}
