//! Attacks on the conntrack cache with real packets between pod namespaces: a cached flow must
//! never outlive the authentication, the policy or the pod it was cached for. Each test makes
//! the datapath cache something a tenant could abuse, then tries to ride it. Run as root.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::Duration;

use common::*;
use meshauth_datapath::netns::{tcp_connect, tcp_echo_server, tcp_request, tcp_roundtrip, udp_socket};
use meshauth_datapath::{BootTime, Counter};
use meshauth_policy::tables::{AuthRequirement as Auth, TableProtocol as P};

const SERVER_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40_123;

/// The Internet checksum of `data` with `initial` (a pseudo-header's sum) folded in.
fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment with a valid checksum, so the receiving kernel answers it.
fn tcp_segment(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20);
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&[0x12, 0x34, 0x56, 0x78, 0x0a, 0xbc, 0xde, 0xf0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let mut pseudo = 0u32;
    for o in [src.octets(), dst.octets()] {
        pseudo += u32::from(u16::from_be_bytes([o[0], o[1]])) + u32::from(u16::from_be_bytes([o[2], o[3]]));
    }
    pseudo += 6 + seg.len() as u32;
    let sum = checksum(pseudo, &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// An ICMP echo message (`icmp_type` 8: request, 0: reply) with a valid checksum.
fn icmp_echo(icmp_type: u8, id: u16) -> Vec<u8> {
    let mut m = vec![icmp_type, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1, b'm', b'a']);
    let sum = checksum(0, &m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// A raw IPv4 socket of `protocol` in the calling thread's namespace (the kernel writes the
/// IP header), as a tenant with CAP_NET_RAW in its pod has.
struct RawSocket(libc::c_int);

impl RawSocket {
    fn new(protocol: libc::c_int) -> std::io::Result<Self> {
        // SAFETY: a plain socket call; the descriptor is owned by the returned value.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, protocol) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let timeout = libc::timeval { tv_sec: 0, tv_usec: 300_000 };
        // SAFETY: setsockopt with a timeval that outlives the call.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(RawSocket(fd))
    }

    fn send_to(&self, dst: Ipv4Addr, payload: &[u8]) -> std::io::Result<()> {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: the buffer and address outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.0,
                payload.as_ptr().cast(),
                payload.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if sent < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
    }

    /// Whether an ICMP echo reply with `id` arrives before the receive timeouts run out.
    fn echo_reply_arrives(&self, id: u16) -> bool {
        let mut buf = [0u8; 1500];
        for _ in 0..5 {
            // SAFETY: the buffer outlives the call.
            let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return false;
            }
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n >= ihl + 8 && buf[ihl] == 0 && u16::from_be_bytes([buf[ihl + 4], buf[ihl + 5]]) == id {
                return true;
            }
        }
        false
    }
}

impl Drop for RawSocket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// A TCP connection from `src:sport` (bound with SO_REUSEADDR) to `dst:dport`, made within
/// `timeout`: `true` when the handshake completed.
fn connect_from_port(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, timeout: Duration) -> bool {
    let Ok(socket) = tokio::net::TcpSocket::new_v4() else { return false };
    if socket.set_reuseaddr(true).is_err() || socket.bind(SocketAddrV4::new(src, sport).into()).is_err() {
        return false;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return false };
    rt.block_on(async { matches!(tokio::time::timeout(timeout, socket.connect(SocketAddrV4::new(dst, dport).into())).await, Ok(Ok(_))) })
}

/// Pod 2 requires authentication of pod 1 on TCP 8080 and UDP 9090 and is isolated: pod 1
/// reaches nothing else on it.
fn strict_server(f: &mut Fixture) {
    let t = tables(
        vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::Required), endpoint(3, false, Auth::None)],
        vec![rule(2, 1, P::Tcp, SERVER_PORT, Auth::Required), rule(2, 1, P::Udp, 9090, Auth::Required)],
    );
    f.dp().apply_tables(&t).unwrap();
}

#[test]
fn a_pods_answer_to_a_stray_segment_does_not_let_the_client_in_after_revocation() {
    let mut f = Fixture::new("ctrst");
    strict_server(&mut f);
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(600))).unwrap();
    let _server = tcp_echo_server(f.pod(2), SERVER_PORT).unwrap();
    assert!(tcp_request(f.pod(1), f.ip(2), SERVER_PORT, LONG), "authenticated: the pair connects");

    // While authenticated, pod 1 sends a stray ACK from a port with no connection. It passes
    // (checked in full, not cached) and pod 2's kernel answers with a RST.
    let (ip1, ip2) = (f.ip(1), f.ip(2));
    let from_pods_before = f.counters().packets(Counter::PassFromPod);
    let entries_before = f.dp().maps().conntrack_entries().unwrap();
    f.ns(1)
        .run(|| RawSocket::new(libc::IPPROTO_TCP)?.send_to(ip2, &tcp_segment(ip1, ip2, CLIENT_PORT, SERVER_PORT, 0x10)))
        .unwrap()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(f.counters().packets(Counter::PassFromPod) >= from_pods_before + 2, "the stray segment left pod 1 and pod 2 answered it");
    assert_eq!(f.dp().maps().conntrack_entries().unwrap(), entries_before, "neither the stray segment nor pod 2's answer to it is cached");

    // The pair's authentication is revoked. A new connection from that very port must not
    // ride what pod 2's answer left behind.
    assert!(f.dp().remove_auth(2, 1, meshauth_datapath::NodeId::This).unwrap());
    let connected = f.ns(1).run(|| connect_from_port(ip1, CLIENT_PORT, ip2, SERVER_PORT, SHORT)).unwrap();
    assert!(!connected, "a connection without authentication got through on the stray segment's reply entry");
    assert!(f.counters().packets(Counter::DropAuthMissing) > 0);
}

#[test]
fn a_reset_closes_the_entry_but_cannot_cut_the_connection_at_once() {
    let mut f = Fixture::with_config("ctrst2", |c| c.conntrack_timeouts.closing_s = 1);
    strict_server(&mut f);
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(600))).unwrap();
    let _server = tcp_echo_server(f.pod(2), SERVER_PORT).unwrap();
    let (ip1, ip2) = (f.ip(1), f.ip(2));
    let mut conn = tcp_connect(f.pod(1), ip2, SERVER_PORT, LONG).unwrap();
    assert!(tcp_roundtrip(&mut conn, b"meshauth"));
    let entries = f.dp().maps().conntrack_entries().unwrap();
    assert_eq!(entries, 2, "both pods cache the connection: pod 2 admitted it, pod 1 started it");
    // A RST with the connection's tuple (whoever sent it: the program cannot tell an
    // in-window one from a spoofed one) closes the entries instead of deleting them.
    let sport = conn.local_addr().unwrap().port();
    f.ns(1).run(|| RawSocket::new(libc::IPPROTO_TCP)?.send_to(ip2, &tcp_segment(ip1, ip2, sport, SERVER_PORT, 0x04))).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(f.dp().maps().conntrack_entries().unwrap(), 2, "a RST does not delete: closing");
    // Past the closing timeout the entries are gone: the next packets take the full check
    // (and pass, authenticated), and nothing is cached for the closed flow again.
    std::thread::sleep(Duration::from_millis(2_600));
    assert!(tcp_roundtrip(&mut conn, b"meshauth"), "the connection the kernel kept still works");
    assert_eq!(f.dp().maps().conntrack_entries().unwrap(), 0, "closed entries idle out");
}

#[test]
fn a_pods_echo_reply_does_not_admit_echo_requests() {
    let mut f = Fixture::new("cticmp");
    // Pod 2 is isolated and no rule lets pod 1 ping it.
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Tcp, SERVER_PORT, Auth::None)]);
    f.dp().apply_tables(&t).unwrap();
    let (ip1, ip2) = (f.ip(1), f.ip(2));
    const ID: u16 = 0x4d41;
    // Pod 2 sends pod 1 an unsolicited echo reply with the id pod 1 will use.
    f.ns(2).run(|| RawSocket::new(libc::IPPROTO_ICMP)?.send_to(ip1, &icmp_echo(0, ID))).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let answered = f
        .ns(1)
        .run(|| -> std::io::Result<bool> {
            let s = RawSocket::new(libc::IPPROTO_ICMP)?;
            s.send_to(ip2, &icmp_echo(8, ID))?;
            Ok(s.echo_reply_arrives(ID))
        })
        .unwrap()
        .unwrap();
    assert!(!answered, "pod 1's echo request reached the isolated pod on pod 2's reply entry");
    assert!(f.counters().packets(Counter::DropDenied) > 0);
    // A ping pod 2 starts is answered (its reply entry is a request's).
    let answered = f
        .ns(2)
        .run(|| -> std::io::Result<bool> {
            let s = RawSocket::new(libc::IPPROTO_ICMP)?;
            s.send_to(ip1, &icmp_echo(8, ID + 1))?;
            Ok(s.echo_reply_arrives(ID + 1))
        })
        .unwrap()
        .unwrap();
    assert!(answered, "the isolated pod's own ping is answered");
}

/// Pod 2 (isolated, no rule for UDP 5353) starts a UDP flow to pod 1 from port 5353; pod 1's
/// answers pass as replies.
fn pod2_starts_a_udp_flow(f: &Fixture) -> (UdpSocket, UdpSocket) {
    let ip2 = f.ip(2);
    let client = f.ns(2).run(|| UdpSocket::bind(SocketAddrV4::new(ip2, 5353))).unwrap().unwrap();
    client.set_read_timeout(Some(SHORT)).unwrap();
    let peer = udp_socket(f.pod(1), None).unwrap();
    peer.set_read_timeout(Some(SHORT)).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    client.send_to(b"query", peer_addr).unwrap();
    let mut buf = [0u8; 16];
    let (_, from) = peer.recv_from(&mut buf).expect("pod 1 hears pod 2");
    assert_eq!(from, SocketAddrV4::new(ip2, 5353).into());
    (client, peer)
}

fn answer_arrives(client: &UdpSocket, peer: &UdpSocket, to: SocketAddrV4) -> bool {
    peer.send_to(b"answer", to).unwrap();
    let mut buf = [0u8; 16];
    client.recv_from(&mut buf).is_ok()
}

#[test]
fn idle_entries_expire_and_the_flow_is_checked_in_full_again() {
    let mut f = Fixture::with_config("ctidle", |c| c.conntrack_timeouts.udp_s = 1);
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let (client, peer) = pod2_starts_a_udp_flow(&f);
    let to = SocketAddrV4::new(f.ip(2), 5353);
    assert!(answer_arrives(&client, &peer, to), "the answer to pod 2's own flow passes");
    // Idle past the one-second UDP timeout (entries are refreshed at most once a second).
    std::thread::sleep(Duration::from_millis(2_600));
    assert!(!answer_arrives(&client, &peer, to), "an idle reply entry kept letting pod 1 into the isolated pod");
}

#[test]
fn entries_of_an_address_that_changes_hands_are_flushed() {
    let mut f = Fixture::new("ctflush");
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let (client, peer) = pod2_starts_a_udp_flow(&f);
    let to = SocketAddrV4::new(f.ip(2), 5353);
    assert!(answer_arrives(&client, &peer, to));
    // Pod 2 goes; a new pod (another SPIFFE ID) gets its address and is isolated too.
    let mut reborn = endpoint(2, true, Auth::None);
    reborn.spiffe_id = 42;
    let stats = f.dp().apply_tables(&tables(vec![endpoint(1, false, Auth::None), reborn], vec![])).unwrap();
    assert!(stats.conntrack_flushed >= 1, "{stats:?}");
    assert!(!answer_arrives(&client, &peer, to), "the new pod accepted traffic of the old pod's flow");
}

#[test]
fn a_deleted_remote_pods_address_is_forgotten_at_once_and_a_local_pods_is_left_to_the_apply() {
    let mut f = Fixture::new("ctforget");
    // Pod 4 is another node's: no interface here.
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None), endpoint(4, false, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let remote = endpoint(4, false, Auth::None).ip;
    let maps = meshauth_datapath::Maps::open(&f.pins.0).unwrap();
    assert!(maps.endpoint(remote).unwrap().is_some());
    assert!(f.dp().forget_remote_endpoint(remote).unwrap(), "the remote pod's entry was there");
    assert_eq!(maps.endpoint(remote).unwrap(), None, "its address still names its identity");
    assert!(!f.dp().forget_remote_endpoint(remote).unwrap(), "nothing left to forget");
    // A pod of this node keeps its entry (and its guard) until the apply: its flow still works.
    let local = f.ip(2);
    assert!(!f.dp().forget_remote_endpoint(local).unwrap());
    assert!(maps.endpoint(f.ip(2)).unwrap().is_some_and(|e| e.isolated));
    let (client, peer) = pod2_starts_a_udp_flow(&f);
    assert!(answer_arrives(&client, &peer, SocketAddrV4::new(f.ip(2), 5353)));
}
