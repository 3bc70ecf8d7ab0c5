//! A node with three pods, the datapath loaded in the test's own pin directory and attached to
//! every pod, and table builders. Pod `i` (1-based) has security identity `255 + i` and
//! SPIFFE-ID number `i`.

#![allow(dead_code)]

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use meshauth_datapath::abi::{TAG_EXID, TAG_OPT_KIND, TAG_OPT_LEN};
use meshauth_datapath::netns::{Netns, NetnsGuard, Node, PinDir, require_root};
use meshauth_datapath::{Counter, Counters, Datapath, DatapathConfig, Event, EventKind, EventStream};
use meshauth_policy::tables::{AuthRequirement, CompiledTables, EndpointEntry, PolicyEntry, TableProtocol};

pub const SHORT: Duration = Duration::from_millis(700);
pub const LONG: Duration = Duration::from_secs(3);

pub struct Fixture {
    // Field order is drop order: detach and unpin, leave the node, then delete namespaces.
    pub dp: Option<Datapath>,
    pub pins: PinDir,
    _guard: NetnsGuard,
    pub node: Node,
}

impl Fixture {
    /// `prefix`: a short name unique to the test (namespaces and pins are named after it).
    pub fn new(prefix: &str) -> Self {
        Self::with_config(prefix, |_| {})
    }

    /// [`Fixture::new`] with a changed configuration.
    pub fn with_config(prefix: &str, change: impl FnOnce(&mut DatapathConfig)) -> Self {
        require_root();
        let node = Node::new(&format!("ma-{prefix}"), 3).expect("creating namespaces");
        // The test thread lives in the node namespace: the loader attaches by interface name.
        let guard = node.ns.enter().expect("entering the node namespace");
        let pins = PinDir::new(prefix);
        let mut config = DatapathConfig::with_pin_dir(&pins.0);
        change(&mut config);
        let mut dp = Datapath::load_or_adopt(config).expect("loading the datapath");
        for pod in &node.pods {
            dp.attach(&pod.host_if, pod.ip).expect("attaching");
        }
        Fixture { dp: Some(dp), pins, _guard: guard, node }
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath loaded")
    }

    pub fn pod(&self, i: usize) -> &meshauth_datapath::netns::Pod {
        &self.node.pods[i - 1]
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.pod(i).ip
    }

    pub fn ns(&self, i: usize) -> &Netns {
        &self.pod(i).ns
    }

    pub fn counters(&self) -> Counters {
        self.dp.as_ref().expect("datapath").counters().expect("counters")
    }

    /// Whether `counter` rises above `before` within `LONG`. A refused client gives up after its
    /// own timeout, but its packet is counted only when it reaches the program, which on a
    /// loaded machine (CI's two cores, a test binary's tests in parallel) can come later.
    pub fn counted_above(&self, counter: Counter, before: u64) -> bool {
        rises_above(before, || self.counters().packets(counter))
    }

    pub fn events(&self) -> EventStream {
        self.dp.as_ref().expect("datapath").events().expect("event stream")
    }
}

/// Pod `i`'s endpoint entry.
pub fn endpoint(i: usize, isolated: bool, mutual_auth: AuthRequirement) -> EndpointEntry {
    EndpointEntry {
        ip: Ipv4Addr::new(10, 77, 0, i as u8),
        security_identity: identity(i),
        spiffe_id: i as u32,
        isolated,
        audit: false,
        mutual_auth,
        pod: format!("test/pod-{i}"),
        node: Some("node".into()),
        node_address: None,
    }
}

pub fn identity(i: usize) -> u32 {
    255 + i as u32
}

/// A rule: traffic from pod `src` to pod `dst` on `protocol`/`port`.
pub fn rule(dst: usize, src: usize, protocol: TableProtocol, port: u16, auth: AuthRequirement) -> PolicyEntry {
    PolicyEntry { dst_identity: identity(dst), src_identity: identity(src), protocol, port_start: port, port_end: port, auth }
}

pub fn tables(endpoints: Vec<EndpointEntry>, policy: Vec<PolicyEntry>) -> CompiledTables {
    let spiffe_ids = endpoints.iter().map(|e| (e.spiffe_id, format!("spiffe://cluster.local/ns/test/sa/pod-{}", e.spiffe_id))).collect();
    CompiledTables { endpoints, policy, spiffe_ids, security_identities: Vec::new() }
}

/// Every event already written.
pub fn drain_all(events: &mut EventStream) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = events.try_next() {
        out.push(e.expect("event parses"));
    }
    out
}

/// Every event already written, of the given kind.
pub fn drain(events: &mut EventStream, kind: EventKind) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = events.try_next() {
        let e = e.expect("event parses");
        if e.kind == kind {
            out.push(e);
        }
    }
    out
}

/// Whether what `read` reads rises above `before` within `LONG` (see [`Fixture::counted_above`]:
/// a packet is counted when it reaches the program, which can be after its sender gave up).
pub fn rises_above(before: u64, read: impl Fn() -> u64) -> bool {
    let deadline = Instant::now() + LONG;
    loop {
        if read() > before {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first event `accept` takes, waiting up to `LONG` for it (an event is written just after
/// its packet is counted); every other event read on the way when none comes.
pub fn await_event(events: &mut EventStream, accept: impl Fn(&Event) -> bool) -> Result<Event, Vec<Event>> {
    let deadline = Instant::now() + LONG;
    let mut seen = Vec::new();
    loop {
        match events.try_next() {
            Some(e) => {
                let e = e.expect("event parses");
                if accept(&e) {
                    return Ok(e);
                }
                seen.push(e);
            }
            None if Instant::now() >= deadline => return Err(seen),
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The Internet checksum (RFC 1071) of `data`, with `initial` (a pseudo-header's sum) folded in.
pub fn inet_checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes the IPv4 header checksum and the TCP checksum (pseudo-header included) of `packet`,
/// an IPv4 header and a TCP segment that ends where the header's total length says.
pub fn set_checksums(packet: &mut [u8]) {
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    packet[10..12].fill(0);
    let ip = inet_checksum(0, &packet[..ihl]);
    packet[10..12].copy_from_slice(&ip.to_be_bytes());
    let sum_at = ihl + 16;
    packet[sum_at..sum_at + 2].fill(0);
    let mut pseudo = 6 + (total - ihl) as u32;
    for word in packet[12..20].chunks(2) {
        pseudo += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    let tcp = inet_checksum(pseudo, &packet[ihl..total]);
    packet[sum_at..sum_at + 2].copy_from_slice(&tcp.to_be_bytes());
}

/// An IPv4 TCP SYN (no data, window 65535, DF, TTL 64, IP id 1) with the given options
/// (whole 32-bit words, at most 40 bytes) and valid checksums: what a pod with CAP_NET_RAW can
/// send, and a frame's payload for BPF_PROG_TEST_RUN.
pub fn tcp_syn_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40, "TCP options are whole words, at most 40 bytes");
    let tcp_len = 20 + options.len();
    let total = (20 + tcp_len) as u16;
    let mut p = Vec::with_capacity(usize::from(total));
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, ((tcp_len / 4) as u8) << 4, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p.extend_from_slice(options);
    set_checksums(&mut p);
    p
}

/// `packet` (an IPv4 TCP packet, captured or built) from source port `sport`, cut to its total
/// length, its checksums valid again.
pub fn with_source_port(packet: &[u8], sport: u16) -> Vec<u8> {
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let mut p = packet[..total].to_vec();
    p[ihl..ihl + 2].copy_from_slice(&sport.to_be_bytes());
    set_checksums(&mut p);
    p
}

/// The fields of an IPv4 TCP packet that tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub flags: u8,
    /// The header's options, as many bytes as its data offset says.
    pub options: Vec<u8>,
}

impl TcpSeen {
    /// A SYN that opens a connection (not the answer, SYN-ACK).
    pub fn is_syn(&self) -> bool {
        (self.flags & 0x12) == 0x02
    }

    pub fn is_syn_ack(&self) -> bool {
        (self.flags & 0x12) == 0x12
    }

    /// The connection tag: the option as `tag_syn` writes it and `to_pod` looks for it, the
    /// header's last 12 bytes.
    pub fn tag(&self) -> Option<&[u8]> {
        let opt = self.options.get(self.options.len().checked_sub(TAG_OPT_LEN)?..)?;
        let ours = opt[0] == TAG_OPT_KIND && usize::from(opt[1]) == TAG_OPT_LEN && opt[2..4] == TAG_EXID.to_be_bytes()[..];
        ours.then_some(opt)
    }
}

/// `packet`'s TCP fields, when it is an IPv4 packet carrying a whole TCP header.
pub fn parse_tcp(packet: &[u8]) -> Option<TcpSeen> {
    if packet.len() < 20 || packet[0] >> 4 != 4 || packet[9] != 6 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if ihl < 20 || total > packet.len() || total < ihl + 20 {
        return None;
    }
    let tcp = &packet[ihl..total];
    let hlen = usize::from(tcp[12] >> 4) * 4;
    if hlen < 20 || hlen > tcp.len() {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    Some(TcpSeen {
        src: ip(12),
        dst: ip(16),
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        flags: tcp[13],
        options: tcp[20..hlen].to_vec(),
    })
}

fn set_receive_timeout(fd: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros() as libc::suseconds_t };
    // SAFETY: setsockopt with a timeval that outlives the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An AF_PACKET socket (ETH_P_ALL, SOCK_DGRAM) on one interface of a namespace: every packet
/// that interface receives or sends, from the network header on, queued from when it is
/// opened. A received packet is seen before any tc ingress program and before routing; a sent
/// one after the tc egress programs (so not at all when one of them dropped it).
pub struct Capture(OwnedFd);

impl Capture {
    pub fn open(ns: &Netns, ifname: &str) -> io::Result<Self> {
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        ns.run(move || -> io::Result<Self> {
            let protocol = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: a plain socket call; the descriptor is owned at once below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(protocol)) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name that outlives the call.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: all zeroes is a valid sockaddr_ll.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = protocol;
            addr.sll_ifindex = ifindex as i32;
            // SAFETY: the address outlives the call and its size is given.
            let bound = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if bound != 0 {
                return Err(io::Error::last_os_error());
            }
            set_receive_timeout(&fd, Duration::from_millis(50))?;
            Ok(Capture(fd))
        })?
    }

    /// The next packet `accept` takes within `within`, passing over (and consuming) others.
    pub fn find(&self, within: Duration, accept: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            // SAFETY: the buffer outlives the call and its length is given.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
                    continue;
                }
                panic!("reading the capture: {e}");
            };
            if accept(&buf[..n]) {
                return Some(buf[..n].to_vec());
            }
        }
        None
    }
}

/// A raw IPv4 socket created in a namespace that sends packets as given, IP header included
/// (IPPROTO_RAW, IP_HDRINCL: any source address; the kernel fills in only the total length,
/// the header checksum and a zero IP id): what a tenant with CAP_NET_RAW has.
pub struct RawIpSender(OwnedFd);

impl RawIpSender {
    pub fn open(ns: &Netns) -> io::Result<Self> {
        ns.run(|| -> io::Result<Self> {
            // SAFETY: a plain socket call; the descriptor is owned at once below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with an int that outlives the call.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_HDRINCL,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(RawIpSender(fd))
        })?
    }

    /// Sends `packet` (an IPv4 packet) to its header's destination.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        let dst: [u8; 4] = packet.get(16..20).and_then(|d| d.try_into().ok()).ok_or_else(|| io::Error::other("not an IPv4 packet"))?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst) },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and the address outlive the call and their sizes are given.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}
