//! The datapath with real packets: a node namespace, three pod namespaces behind veths, the
//! programs attached to the host sides, TCP and UDP between the pods. Run as root; each test
//! has its own namespaces and pin directory, so they run in parallel.

mod common;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use meshauth_datapath::netns::{tcp_connect, tcp_echo_server, tcp_request, tcp_roundtrip, udp_echo_server, udp_request, udp_socket};
use meshauth_datapath::{BootTime, Counter, Datapath, EventKind};
use meshauth_policy::tables::{AuthRequirement as Auth, TableProtocol as P};

#[tokio::test]
async fn policy_allows_the_rule_and_denies_the_rest() {
    let mut f = Fixture::new("allow");
    // Pod 2 is isolated: pod 1 may reach TCP 8080 and UDP 9090; pod 3 nothing.
    let t = tables(
        vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None), endpoint(3, false, Auth::None)],
        vec![rule(2, 1, P::Tcp, 8080, Auth::None), rule(2, 1, P::Udp, 9090, Auth::None)],
    );
    f.dp().apply_tables(&t).unwrap();
    let mut events = f.events();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _tcp2 = tcp_echo_server(f.pod(2), 8081).unwrap();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();

    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG), "allowed TCP");
    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "allowed UDP");
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "TCP from a source no rule names");
    assert!(!udp_request(f.pod(3), None, f.ip(2), 9090, SHORT), "UDP from a source no rule names");
    assert!(!tcp_request(f.pod(1), f.ip(2), 8081, SHORT), "TCP to a port no rule names");
    // Pod 1 is not isolated: anyone reaches it (a server there would answer; the SYN passes).
    let c = f.counters();
    assert!(c.packets(Counter::PassPolicy) >= 2, "{c:?}");
    assert!(c.packets(Counter::DropDenied) >= 3, "{c:?}");

    let denied = drain(&mut events, EventKind::Denied);
    let seen = |src: Ipv4Addr, port: u16, proto: u8| {
        denied.iter().any(|e| e.src == src && e.dst == f.ip(2) && e.dst_port == port && e.protocol == proto && e.dropped)
    };
    assert!(seen(f.ip(3), 8080, 6), "denied TCP event: {denied:?}");
    assert!(seen(f.ip(3), 9090, 17), "denied UDP event: {denied:?}");
    assert!(seen(f.ip(1), 8081, 6), "denied port event: {denied:?}");
    let e = denied.iter().find(|e| e.src == f.ip(3)).unwrap();
    assert_eq!((e.src_identity, e.dst_identity, e.counter), (identity(3), identity(2), Counter::DropDenied));
}

#[tokio::test]
async fn auth_required_drops_until_the_pair_is_authenticated_and_again_after_expiry() {
    let mut f = Fixture::new("auth");
    let t = tables(
        vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)],
        vec![rule(2, 1, P::Tcp, 8080, Auth::Required), rule(2, 1, P::Udp, 9090, Auth::Required)],
    );
    f.dp().apply_tables(&t).unwrap();
    let mut events = f.events();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();

    // Not authenticated: dropped, reported with the pair to authenticate.
    assert!(!tcp_request(f.pod(1), f.ip(2), 8080, SHORT));
    assert!(!udp_request(f.pod(1), None, f.ip(2), 9090, SHORT));
    let missing = drain(&mut events, EventKind::AuthRequired);
    assert!(missing.iter().any(|e| e.protocol == 6 && e.dropped), "{missing:?}");
    assert!(missing.iter().any(|e| e.protocol == 17 && e.dropped), "{missing:?}");
    let e = &missing[0];
    assert_eq!((e.dst_spiffe_id, e.src_spiffe_id, e.auth, e.counter), (2, 1, Auth::Required, Counter::DropAuthMissing));
    assert!(f.counters().packets(Counter::DropAuthMissing) >= 2);

    // Authenticated for a short while: new and established flows pass.
    let expiry = BootTime::after(Duration::from_secs(3));
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, expiry).unwrap();
    assert_eq!(f.dp().auth_entries().unwrap().len(), 1);
    let mut conn = tcp_connect(f.pod(1), f.ip(2), 8080, LONG).expect("authenticated connect");
    assert!(tcp_roundtrip(&mut conn, b"one"), "authenticated TCP");
    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "authenticated UDP");
    assert!(tcp_roundtrip(&mut conn, b"two"), "established, authenticated");
    let c = f.counters();
    assert!(c.packets(Counter::PassAuthenticated) >= 2 && c.packets(Counter::PassCtEstablished) >= 1, "{c:?}");

    // Expired: the established connection and new ones are dropped again.
    std::thread::sleep(expiry.remaining().unwrap_or_default() + Duration::from_millis(100));
    conn.set_read_timeout(Some(SHORT)).unwrap();
    assert!(!tcp_roundtrip(&mut conn, b"three"), "established flow after expiry");
    assert!(!tcp_request(f.pod(1), f.ip(2), 8080, SHORT), "new connection after expiry");
    assert!(!udp_request(f.pod(1), None, f.ip(2), 9090, SHORT), "UDP after expiry");
    assert!(f.counters().packets(Counter::DropAuthExpired) >= 3);
    let expired = drain(&mut events, EventKind::AuthRequired);
    assert!(expired.iter().any(|e| e.counter == Counter::DropAuthExpired && e.protocol == 6), "{expired:?}");
    assert!(expired.iter().any(|e| e.counter == Counter::DropAuthExpired && e.protocol == 17), "{expired:?}");

    // And removing the pair is "missing" again.
    assert!(f.dp().remove_auth(2, 1, meshauth_datapath::NodeId::This).unwrap());
    assert!(!f.dp().remove_auth(2, 1, meshauth_datapath::NodeId::This).unwrap());
}

#[tokio::test]
async fn strict_mutual_auth_and_permissive() {
    let mut f = Fixture::new("mode");
    // Pod 2 Strict without any MeshPolicy; pod 3 Permissive.
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, false, Auth::Required), endpoint(3, false, Auth::Permissive)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let mut events = f.events();
    let _s2 = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _s3 = tcp_echo_server(f.pod(3), 8080).unwrap();
    assert!(!tcp_request(f.pod(1), f.ip(2), 8080, SHORT), "Strict, unauthenticated");
    assert!(tcp_request(f.pod(1), f.ip(3), 8080, LONG), "Permissive passes");
    let c = f.counters();
    assert!(c.packets(Counter::PassPermissive) >= 1, "{c:?}");
    let ev = drain(&mut events, EventKind::AuthRequired);
    assert!(ev.iter().any(|e| e.dst == f.ip(3) && !e.dropped && e.auth == Auth::Permissive), "{ev:?}");
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(60))).unwrap();
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG), "Strict, authenticated");
}

#[tokio::test]
async fn replies_of_allowed_connections_pass() {
    let mut f = Fixture::new("reply");
    // Pod 1 is isolated (no rule: accepts nothing) and Strict; it may still talk to pod 2 and
    // get answers.
    let t = tables(vec![endpoint(1, true, Auth::Required), endpoint(2, false, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();
    let _back = tcp_echo_server(f.pod(1), 8080).unwrap();

    let mut conn = tcp_connect(f.pod(1), f.ip(2), 8080, LONG).expect("connect out of an isolated pod");
    for i in 0..20u8 {
        assert!(tcp_roundtrip(&mut conn, &[i; 100]), "TCP reply {i}");
    }
    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "UDP reply");
    assert!(!tcp_request(f.pod(2), f.ip(1), 8080, SHORT), "a new connection into pod 1 is still refused");
    let c = f.counters();
    assert!(c.packets(Counter::PassCtReply) >= 21, "{c:?}");
    assert!(c.packets(Counter::DropDenied) >= 1, "{c:?}");
}

#[tokio::test]
async fn spoofed_sources_are_dropped() {
    let mut f = Fixture::new("spoof");
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, false, Auth::None), endpoint(3, false, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let mut events = f.events();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    // Pod 1 takes pod 3's address as a second one and sends with it.
    let spoofed = f.ip(3);
    f.ns(1).exec(&["ip", "addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]).unwrap();

    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "own address passes");
    let sock = udp_socket(f.pod(1), Some(spoofed)).unwrap();
    for _ in 0..5 {
        sock.send_to(b"spoof", (f.ip(2), 9090)).unwrap();
    }
    sock.set_read_timeout(Some(SHORT)).unwrap();
    let mut buf = [0u8; 16];
    assert!(sock.recv_from(&mut buf).is_err(), "a spoofed datagram got an answer");
    let c = f.counters();
    assert!(c.packets(Counter::DropSpoofed) >= 5, "{c:?}");
    let ev = drain(&mut events, EventKind::Spoofed);
    assert!(ev.iter().filter(|e| e.src == spoofed && e.dst == f.ip(2) && e.protocol == 17).count() >= 5, "{ev:?}");
    assert_eq!(ev[0].counter, Counter::DropSpoofed);
}

fn f_ip2() -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 2)
}

/// A UDP stream and a TCP stream run while the loader restarts (adopting the pins) and then
/// upgrades the programs (atomic link update): nothing is lost, nothing retransmitted.
#[tokio::test]
async fn loader_restart_and_upgrade_mid_flow_lose_no_packet() {
    let mut f = Fixture::new("restart");
    let t = tables(
        vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::Required)],
        vec![rule(2, 1, P::Tcp, 8080, Auth::Required), rule(2, 1, P::Udp, 9090, Auth::Required)],
    );
    f.dp().apply_tables(&t).unwrap();
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(600))).unwrap();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();

    // UDP receiver counts what arrives at pod 2; the sender counts what it sent.
    let rx = f.pod(2).ns.run(|| std::net::UdpSocket::bind((f_ip2(), 9090))).unwrap().unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let tx = udp_socket(f.pod(1), None).unwrap();
    let mut conn = tcp_connect(f.pod(1), f.ip(2), 8080, LONG).unwrap();
    let retrans_before = f.ns(1).tcp_retransmits().unwrap() + f.ns(2).tcp_retransmits().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, received, tcp_rounds) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let receiver = {
        let received = received.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while rx.recv_from(&mut buf).is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let sender = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tx.send_to(&seq.to_be_bytes(), (f_ip2(), 9090)).unwrap();
                seq += 1;
                sent.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let tcp = {
        let (stop, rounds) = (stop.clone(), tcp_rounds.clone());
        std::thread::spawn(move || {
            let mut ok = true;
            while ok && !stop.load(Ordering::Relaxed) {
                ok = tcp_roundtrip(&mut conn, &[7u8; 64]);
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            ok
        })
    };

    std::thread::sleep(Duration::from_millis(500));
    // The agent exits: the Datapath is dropped without detaching anything...
    let config = f.dp().config().clone();
    drop(f.dp.take());
    std::thread::sleep(Duration::from_millis(300));
    // ...and a new one adopts what is pinned and replays its state (all idempotent).
    let mut dp = Datapath::load_or_adopt(config).unwrap();
    assert!(dp.adopted(), "same version: adopted, not reloaded");
    for pod in &f.node.pods {
        dp.attach(&pod.host_if, pod.ip).unwrap();
    }
    let stats = dp.apply_tables(&t).unwrap();
    assert_eq!(stats.endpoints_written + stats.policy_written, 0, "nothing changed: {stats:?}");
    dp.set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(600))).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // An upgrade: new programs, every link moved in one step.
    dp.reload_programs().unwrap();
    assert!(!dp.adopted());
    f.dp = Some(dp);
    std::thread::sleep(Duration::from_millis(500));

    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    assert!(tcp.join().unwrap(), "the TCP stream stalled");
    receiver.join().unwrap();
    let (sent, received) = (sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
    let retrans = f.ns(1).tcp_retransmits().unwrap() + f.ns(2).tcp_retransmits().unwrap() - retrans_before;
    let c = f.counters();
    eprintln!("udp sent {sent} received {received}; tcp round trips {}; retransmits {retrans}", tcp_rounds.load(Ordering::Relaxed));
    assert!(sent > 1000, "the stream ran ({sent})");
    assert_eq!(sent, received, "UDP datagrams lost across restart and upgrade");
    assert_eq!(retrans, 0, "TCP retransmitted across restart and upgrade");
    assert_eq!(c.dropped(), 0, "{c:?}");
    // The programs on the interfaces are the pinned ones of this version, once per direction.
    let pinned: Vec<_> = std::fs::read_dir(f.pins.0.join("programs")).unwrap().collect();
    assert_eq!(pinned.len(), 1);
}

/// A loader that starts with an older program pinned moves the links to its own version.
#[tokio::test]
async fn a_new_version_replaces_the_pinned_one() {
    let mut f = Fixture::new("upgr");
    let config = f.dp().config().clone();
    drop(f.dp.take());
    // Pretend the pinned programs are an older build.
    let programs = f.pins.0.join("programs");
    let current = programs.join(meshauth_datapath::PROGRAM_VERSION);
    std::fs::rename(&current, programs.join("0000000000000000")).unwrap();
    let dp = Datapath::load_or_adopt(config).unwrap();
    assert!(!dp.adopted(), "an older version is replaced, not adopted");
    let names: Vec<String> = std::fs::read_dir(&programs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec![meshauth_datapath::PROGRAM_VERSION.to_string()]);
    f.dp = Some(dp);
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Tcp, 8080, Auth::None)]);
    f.dp().apply_tables(&t).unwrap();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG));
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "the new program enforces");
}

#[tokio::test]
async fn events_arrive_on_the_async_stream() {
    let mut f = Fixture::new("async");
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let mut events = f.events();
    // The socket belongs to pod 1's namespace whichever thread sends on it; sending later
    // makes next() wait on the ring buffer's readiness.
    let sock = udp_socket(f.pod(1), None).unwrap();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        sock.send_to(b"x", (f_ip2(), 5353)).unwrap();
    });
    let e = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("an event in time").unwrap();
    sender.join().unwrap();
    assert_eq!((e.kind, e.src, e.dst, e.dst_port, e.protocol), (EventKind::Denied, f.ip(1), f.ip(2), 5353, 17));
}

#[tokio::test]
async fn detach_stops_enforcement_and_tables_sync_by_diff() {
    let mut f = Fixture::new("diff");
    let mut t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Tcp, 8080, Auth::None)]);
    let s = f.dp().apply_tables(&t).unwrap();
    assert_eq!((s.endpoints_written, s.policy_written), (2, 1));
    // Widen the rule to a range: new blocks written, the old one removed, epoch bumped.
    t.policy[0].port_start = 8000;
    t.policy[0].port_end = 8100;
    let s2 = f.dp().apply_tables(&t).unwrap();
    assert!(s2.policy_written > 1 && s2.policy_removed == 1 && s2.policy_epoch == s.policy_epoch + 1, "{s2:?}");
    assert_eq!(f.dp().apply_tables(&t).unwrap().policy_epoch, s2.policy_epoch, "no change, no new epoch");
    let eps = f.dp().maps().endpoints().unwrap();
    assert_eq!(eps.len(), 2);
    assert!(eps.iter().all(|e| e.ifindex != 0), "local pods carry their interface: {eps:?}");
    let _tcp = tcp_echo_server(f.pod(2), 8050).unwrap();
    assert!(tcp_request(f.pod(1), f.ip(2), 8050, LONG));
    assert!(!tcp_request(f.pod(3), f.ip(2), 8050, SHORT));
    let host_if = f.pod(2).host_if.clone();
    f.dp().detach(&host_if).unwrap();
    assert!(tcp_request(f.pod(3), f.ip(2), 8050, LONG), "detached: no enforcement");
    let ifaces = f.dp().maps().interfaces().unwrap();
    let i2 = ifaces.iter().find(|i| i.pod_ip == f.ip(2)).unwrap();
    assert_eq!(i2.attach, "detached", "the address stays registered: {ifaces:?}");
    let ip2 = f.ip(2);
    f.dp().attach(&host_if, ip2).unwrap();
    assert!(!tcp_request(f.pod(3), f.ip(2), 8050, SHORT), "attached again: enforced again");
    assert!(tcp_request(f.pod(1), f.ip(2), 8050, LONG));
}

/// A pod's packets leave only through its own veth: routed to another pod's veth (a bridge
/// flooding a frame, a stale or hostile route), they are dropped there, not delivered.
#[tokio::test]
async fn a_packet_routed_out_of_another_pods_veth_is_dropped() {
    let mut f = Fixture::new("wrongif");
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, false, Auth::None), endpoint(3, false, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();
    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "pod 1 reaches pod 2 on its own veth");
    // A flow already in conntrack, to be misrouted below: its cache entry is pod 2's veth's.
    let flow = udp_socket(f.pod(1), None).unwrap();
    flow.set_read_timeout(Some(LONG)).unwrap();
    let to_pod2 = std::net::SocketAddrV4::new(f.ip(2), 9090);
    let mut buf = [0u8; 64];
    flow.send_to(b"meshauth", to_pod2).unwrap();
    assert!(matches!(flow.recv_from(&mut buf), Ok((8, _))), "the flow is established");
    let node = f.node.ns.name.clone();
    let route = |how: &str, dev: &str| {
        let status =
            std::process::Command::new("ip").args(["-n", &node, "route", how, &format!("{}/32", f.ip(2)), "dev", dev]).status().unwrap();
        assert!(status.success(), "ip route {how}");
    };
    let wrong = f.pod(3).host_if.clone();
    let right = f.pod(2).host_if.clone();
    route("replace", &wrong);
    // Pod 3 does not answer ARP for pod 2's address: a static neighbour sends the frames anyway.
    let neigh = |how: &str| {
        let mut args = vec!["-n".to_owned(), node.clone(), "neigh".into(), how.into(), f.ip(2).to_string()];
        if how == "replace" {
            args.extend(["lladdr", "02:00:00:00:00:99", "nud", "permanent"].map(String::from));
        }
        args.extend(["dev".to_owned(), wrong.clone()]);
        assert!(std::process::Command::new("ip").args(&args).status().unwrap().success(), "ip neigh {how}");
    };
    neigh("replace");
    let dropped = f.counters().packets(Counter::DropWrongIface);
    assert!(!udp_request(f.pod(1), None, f.ip(2), 9090, SHORT), "delivered through another pod's veth");
    assert!(f.counted_above(Counter::DropWrongIface, dropped), "not counted as leaving the wrong interface");
    // The established flow's next datagram: its conntrack entry is no pass onto another veth.
    let dropped = f.counters().packets(Counter::DropWrongIface);
    flow.send_to(b"meshauth", to_pod2).unwrap();
    std::thread::sleep(SHORT);
    assert!(f.counted_above(Counter::DropWrongIface, dropped), "an established flow's packet left through another pod's veth");
    neigh("del");
    route("replace", &right);
    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "its own veth again");
}

/// The CNI hands a pod's veth to the agent after its tables named the pod by its node's address
/// (how the agent's plan names every pod, its own node's included): from the attach on, the
/// pod's connections are checked against this node's proof of the pair, first SYN through.
#[tokio::test]
async fn a_pod_attached_after_its_tables_is_proven_by_this_node_at_once() {
    let mut f = Fixture::new("late");
    let own_address = Ipv4Addr::new(192, 0, 2, 9);
    let host_if = f.pod(1).host_if.clone();
    let ifindex = f.dp().maps().interfaces().unwrap().iter().find(|i| i.pod_ip == f.ip(1)).unwrap().ifindex;
    f.dp().release_interface(ifindex).unwrap();
    let mut client = endpoint(1, false, Auth::None);
    client.node_address = Some(own_address);
    let t = tables(vec![client, endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Tcp, 8080, Auth::Required)]);
    f.dp().apply_tables(&t).unwrap();
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(600))).unwrap();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    // Before its veth is this node's, the pod counts as one of the node at its address, which
    // proved nothing: refused for want of that node's proof, before any tag is looked at.
    let (missing, untagged) = (f.counters().packets(Counter::DropAuthMissing), f.counters().packets(Counter::DropTagMissing));
    assert!(!tcp_request(f.pod(1), f.ip(2), 8080, SHORT), "a proof of this node admitted a pod of another");
    assert!(f.counted_above(Counter::DropAuthMissing, missing), "this node's proof counted for a pod at another node's address");
    assert_eq!(f.counters().packets(Counter::DropTagMissing), untagged);
    let ip1 = f.ip(1);
    f.dp().attach(&host_if, ip1).unwrap();
    let retransmits = f.pod(1).ns.tcp_retransmits().unwrap();
    let missing = f.counters().packets(Counter::DropAuthMissing);
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG), "attached: this node's proof covers the pod");
    assert_eq!(f.pod(1).ns.tcp_retransmits().unwrap(), retransmits, "no SYN was retransmitted");
    assert_eq!(f.counters().packets(Counter::DropAuthMissing), missing);
}

/// The clsact fallback (kernels without tcx), forced on this kernel: enforcement, a restart
/// that adopts, an upgrade that replaces the filters, and detaching.
#[tokio::test]
async fn clsact_fallback_attaches_survives_restarts_and_upgrades() {
    let mut f = Fixture::with_config("nl", |c| c.attach_mode = meshauth_datapath::AttachMode::Netlink);
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Tcp, 8080, Auth::None)]);
    f.dp().apply_tables(&t).unwrap();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG));
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "enforced through clsact");
    let filters = f.node.ns.exec(&["tc", "filter", "show", "dev", "h2", "egress"]).unwrap();
    assert!(filters.contains("to_pod"), "{filters}");
    assert!(f.dp().maps().interfaces().unwrap().iter().all(|i| i.attach == "clsact"));

    let config = f.dp().config().clone();
    drop(f.dp.take());
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "no agent: still enforced");
    let mut dp = Datapath::load_or_adopt(config).unwrap();
    assert!(dp.adopted());
    dp.reload_programs().unwrap();
    let filters = f.node.ns.exec(&["tc", "filter", "show", "dev", "h2", "egress"]).unwrap();
    assert_eq!(filters.matches("name to_pod").count(), 1, "replaced, not added: {filters}");
    f.dp = Some(dp);
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG));
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "enforced after the upgrade");
    let h2 = f.pod(2).host_if.clone();
    f.dp().detach(&h2).unwrap();
    assert!(tcp_request(f.pod(3), f.ip(2), 8080, LONG), "detached");
}

/// Sends one raw Ethernet frame out of `ifname` in the calling thread's namespace.
fn send_raw_frame(ifname: &str, frame: &[u8]) -> std::io::Result<()> {
    let name = std::ffi::CString::new(ifname).map_err(std::io::Error::other)?;
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (libc::ETH_P_ALL as u16).to_be() as i32);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        addr.sll_halen = 6;
        let sent = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if sent < 0 { Err(err) } else { Ok(()) }
    }
}

/// A gratuitous ARP reply claiming `ip` for the sender.
fn arp_claim(ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

#[tokio::test]
async fn arp_claiming_another_pods_address_is_dropped() {
    let mut f = Fixture::new("arp");
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, false, Auth::None), endpoint(3, false, Auth::None)], vec![]);
    f.dp().apply_tables(&t).unwrap();
    let before = f.counters();
    let (own, other) = (f.ip(1), f.ip(3));
    f.ns(1).run(|| send_raw_frame("eth0", &arp_claim(own))).unwrap().unwrap();
    f.ns(1).run(|| send_raw_frame("eth0", &arp_claim(other))).unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = f.counters();
    assert!(
        after.packets(Counter::DropSpoofed) > before.packets(Counter::DropSpoofed),
        "an ARP claim of pod 3's address from pod 1 is dropped: {after:?}"
    );
    assert!(after.packets(Counter::PassArp) > before.packets(Counter::PassArp), "its own address passes");
}

#[tokio::test]
async fn an_upgrade_after_a_pods_veth_vanished_forgets_it_and_moves_the_rest() {
    let mut f = Fixture::new("gone");
    let config = f.dp().config().clone();
    drop(f.dp.take());
    // Pod 3 is deleted while no loader runs: its veth goes, its pins stay.
    let gone = f.pod(3).host_if.clone();
    meshauth_datapath::netns::sh(&["ip", "link", "del", &gone]).unwrap();
    let programs = f.pins.0.join("programs");
    std::fs::rename(programs.join(meshauth_datapath::PROGRAM_VERSION), programs.join("0000000000000000")).unwrap();
    let dp = Datapath::load_or_adopt(config).expect("the upgrade is not stopped by a vanished veth");
    let interfaces = dp.maps().interfaces().unwrap();
    assert_eq!(interfaces.len(), 2, "{interfaces:?}");
    assert!(interfaces.iter().all(|i| i.pod_ip != f.ip(3)));
    let links = std::fs::read_dir(f.pins.0.join("links")).unwrap().count();
    assert_eq!(links, 4, "the vanished veth's link pins are gone");
    f.dp = Some(dp);
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Tcp, 8080, Auth::None)]);
    f.dp().apply_tables(&t).unwrap();
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG), "the remaining pods run on the new programs");
    f.dp().reload_programs().expect("an on-demand upgrade too");
}

/// One datagram from the node's namespace (this test thread's) with source `src` to
/// `dst:port`: `true` when its echo came back.
fn udp_from_node(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> bool {
    let Ok(sock) = std::net::UdpSocket::bind((src, 0)) else { return false };
    if sock.set_read_timeout(Some(SHORT)).is_err() || sock.send_to(b"meshauth", (dst, port)).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(sock.recv_from(&mut buf), Ok((8, _)))
}

/// The kubelet's probes come from the node's own address: with `allow_host` (the default)
/// they reach a policed pod; without it they follow the policy like everything else, and an
/// address of the node that is not listed as its own (what another node's traffic carries)
/// always does.
#[tokio::test]
async fn only_this_nodes_own_addresses_pass_a_policy_and_only_while_allow_host_is_set() {
    const NODE: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1); // the pods' gateway, on the node's lo
    const OTHER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50); // an address the node does not list
    for allow_host in [true, false] {
        let mut f = Fixture::with_config(if allow_host { "host1" } else { "host0" }, |c| c.allow_host = allow_host);
        f.node.ns.exec(&["ip", "addr", "add", &format!("{OTHER}/32"), "dev", "lo"]).unwrap();
        let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Udp, 9090, Auth::None)]);
        f.dp().apply_tables(&t).unwrap();
        f.dp().set_host_addresses(&[NODE].into()).unwrap();
        let _udp = udp_echo_server(f.pod(2), 9090).unwrap();
        assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "the permitted pod");
        let passed_host = f.counters().packets(Counter::PassHost);
        assert_eq!(udp_from_node(NODE, f.ip(2), 9090), allow_host, "the node's own address, allow_host={allow_host}");
        assert_eq!(f.counters().packets(Counter::PassHost) > passed_host, allow_host);
        let denied = f.counters().packets(Counter::DropDenied);
        assert!(!udp_from_node(OTHER, f.ip(2), 9090), "an address not the node's own passed the policy");
        assert!(f.counted_above(Counter::DropDenied, denied), "not the policy's drop");
    }
}

/// A pod's address on a new veth (a pod recreated with its IP and identity, a sandbox
/// restarted): the flows its predecessor's veth cached neither pass nor refuse the new one's
/// packets; they are checked afresh and cached again on the new veth.
#[tokio::test]
async fn a_flow_cached_on_a_pods_old_veth_is_checked_afresh_on_its_new_one() {
    let mut f = Fixture::new("newveth");
    let t = tables(vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None)], vec![rule(2, 1, P::Udp, 9090, Auth::None)]);
    f.dp().apply_tables(&t).unwrap();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();
    let flow = udp_socket(f.pod(1), None).unwrap();
    flow.set_read_timeout(Some(LONG)).unwrap();
    let to_pod2 = std::net::SocketAddrV4::new(f.ip(2), 9090);
    let mut buf = [0u8; 64];
    let roundtrip = |sock: &std::net::UdpSocket, buf: &mut [u8]| {
        sock.send_to(b"meshauth", to_pod2).is_ok() && matches!(sock.recv_from(buf), Ok((8, _)))
    };
    assert!(roundtrip(&flow, &mut buf), "the flow is established on pod 2's first veth");

    // Pod 2's veth goes and a new one takes its address.
    let (node, pod2) = (f.node.ns.name.clone(), f.pod(2).ns.name.clone());
    let ip2 = f.ip(2);
    let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    ip(&["-n", &node, "link", "del", "h2"]);
    ip(&["-n", &node, "link", "add", "h2new", "type", "veth", "peer", "name", "eth0", "netns", &pod2]);
    ip(&["-n", &pod2, "addr", "add", &format!("{ip2}/32"), "dev", "eth0"]);
    ip(&["-n", &pod2, "link", "set", "eth0", "up"]);
    ip(&["-n", &pod2, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"]);
    ip(&["-n", &pod2, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"]);
    ip(&["-n", &node, "link", "set", "h2new", "up"]);
    ip(&["-n", &node, "route", "add", &format!("{ip2}/32"), "dev", "h2new"]);
    f.node.ns.sysctl("net/ipv4/conf/h2new/proxy_arp", "1").unwrap();
    f.dp().attach("h2new", ip2).unwrap();
    f.dp().apply_tables(&t).unwrap();

    let wrong = f.counters().packets(Counter::DropWrongIface);
    assert!(roundtrip(&flow, &mut buf), "the old veth's cached flow refused the new veth's packets");
    assert!(roundtrip(&flow, &mut buf), "and again, once cached on the new veth");
    assert_eq!(f.counters().packets(Counter::DropWrongIface), wrong);
}

/// An audited destination (only audited MeshPolicies select it) drops nothing: what no rule
/// admits, and what lacks the authentication its rule requires, passes, is counted as
/// `pass_audit` and reported as an Audit event (with the pair to authenticate). MutualAuth is
/// not audited. The same tables enforced drop both, established flows included, from the next
/// packet on.
#[tokio::test]
async fn an_audited_destination_passes_and_reports_what_enforcing_would_drop() {
    let mut f = Fixture::new("audit");
    let audited = |isolated: bool, mutual_auth: Auth| {
        let mut dst = endpoint(2, isolated, mutual_auth);
        dst.audit = !isolated;
        tables(
            vec![endpoint(1, false, Auth::None), dst, endpoint(3, false, Auth::None)],
            vec![rule(2, 1, P::Tcp, 8080, Auth::Required), rule(2, 1, P::Udp, 9090, Auth::None)],
        )
    };
    f.dp().apply_tables(&audited(false, Auth::None)).unwrap();
    assert!(f.dp().maps().endpoints().unwrap().iter().any(|e| e.ip == f.ip(2) && e.audit && !e.isolated));
    let mut events = f.events();
    // Every event of the test, to show at the end that none was a sampled pass.
    let mut seen = Vec::new();
    let mut take = |events: &mut meshauth_datapath::EventStream| {
        std::thread::sleep(Duration::from_millis(100));
        let new = drain_all(events);
        seen.extend(new.iter().cloned());
        new
    };
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _udp = udp_echo_server(f.pod(2), 9090).unwrap();

    // No rule admits pod 3: it passes, counted and reported with no authentication asked.
    let audited_before = f.counters().packets(Counter::PassAudit);
    assert!(tcp_request(f.pod(3), f.ip(2), 8080, LONG), "an audited policy dropped what no rule admits");
    let flow = udp_socket(f.pod(3), None).unwrap();
    flow.set_read_timeout(Some(LONG)).unwrap();
    let mut buf = [0u8; 64];
    flow.send_to(b"meshauth", std::net::SocketAddrV4::new(f.ip(2), 9090)).unwrap();
    assert!(matches!(flow.recv_from(&mut buf), Ok((8, _))), "audited UDP passes");
    assert!(f.counted_above(Counter::PassAudit, audited_before + 1), "both would-be denials counted");
    let denied = take(&mut events);
    assert!(
        denied.iter().any(|e| e.kind == EventKind::Audit
            && e.src == f.ip(3)
            && e.protocol == 6
            && !e.dropped
            && e.auth == Auth::None
            && e.counter == Counter::PassAudit),
        "{denied:?}"
    );
    assert_eq!(f.counters().packets(Counter::DropDenied), 0);

    // Pod 1's rule requires authentication it does not have: passes, reported with the pair.
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG), "an audited rule's authentication was enforced");
    let unauthenticated = take(&mut events);
    let pod1 = f.ip(1);
    let reports = move |list: &[meshauth_datapath::Event]| {
        list.iter()
            .filter(|e| {
                e.kind == EventKind::Audit && e.src == pod1 && e.auth == Auth::Required && (e.dst_spiffe_id, e.src_spiffe_id) == (2, 1)
            })
            .count()
    };
    assert_eq!(reports(&unauthenticated), 1, "reported once per connection, not per packet: {unauthenticated:?}");
    assert_eq!(f.counters().packets(Counter::DropAuthMissing), 0);
    // Authenticated, it passes as authenticated and reports nothing.
    f.dp().set_auth(2, 1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(60))).unwrap();
    // The first connection's last packets may still be on their way: only later ones count.
    std::thread::sleep(SHORT);
    take(&mut events);
    let authenticated = f.counters().packets(Counter::PassAuthenticated);
    assert!(tcp_request(f.pod(1), f.ip(2), 8080, LONG));
    assert!(f.counted_above(Counter::PassAuthenticated, authenticated));
    let later = take(&mut events);
    assert_eq!(reports(&later), 0, "an authenticated pair reported as audit: {later:?}");
    f.dp().remove_auth(2, 1, meshauth_datapath::NodeId::This).unwrap();

    // MutualAuth Strict on the audited destination is enforced: no rule or no proof, dropped.
    f.dp().apply_tables(&audited(false, Auth::Required)).unwrap();
    let (missing, audited_before) = (f.counters().packets(Counter::DropAuthMissing), f.counters().packets(Counter::PassAudit));
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "Strict dropped nothing at an audited destination");
    assert!(!tcp_request(f.pod(1), f.ip(2), 8080, SHORT), "Strict: the unauthenticated pair");
    assert!(f.counted_above(Counter::DropAuthMissing, missing + 1), "both dropped for want of authentication");
    assert_eq!(f.counters().packets(Counter::PassAudit), audited_before, "a Strict drop is no audit finding");
    take(&mut events);

    // Enforced: the same rules drop pod 3, and the established UDP flow's next datagram.
    f.dp().apply_tables(&audited(true, Auth::None)).unwrap();
    let dropped = f.counters().packets(Counter::DropDenied);
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "enforced: no rule admits pod 3");
    flow.set_read_timeout(Some(SHORT)).unwrap();
    flow.send_to(b"meshauth", std::net::SocketAddrV4::new(f.ip(2), 9090)).unwrap();
    assert!(flow.recv_from(&mut buf).is_err(), "enforced: the audited flow's next datagram passed");
    assert!(f.counted_above(Counter::DropDenied, dropped + 1), "both counted as denied");
    assert!(!tcp_request(f.pod(1), f.ip(2), 8080, SHORT), "enforced: the rule's authentication is required");
    assert!(udp_request(f.pod(1), None, f.ip(2), 9090, LONG), "what the rules admit still passes");
    take(&mut events);
    assert!(seen.iter().all(|e| e.kind != EventKind::Pass), "passes sampled although sampling is off by default");
}

/// Asked to (`pass_sample_every`), the datapath reports a sample of new flows that pass, with
/// how they passed; established packets and flows reported otherwise are not sampled.
#[tokio::test]
async fn new_flows_that_pass_are_sampled_when_asked() {
    let mut f = Fixture::with_config("sample", |c| c.pass_sample_every = 1);
    let t = tables(
        vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None), endpoint(3, false, Auth::None)],
        vec![rule(2, 1, P::Tcp, 8080, Auth::None)],
    );
    f.dp().apply_tables(&t).unwrap();
    let mut events = f.events();
    let _tcp = tcp_echo_server(f.pod(2), 8080).unwrap();
    let _open = tcp_echo_server(f.pod(3), 8080).unwrap();
    let mut conn = tcp_connect(f.pod(1), f.ip(2), 8080, LONG).expect("allowed");
    for _ in 0..5 {
        assert!(tcp_roundtrip(&mut conn, b"meshauth"));
    }
    assert!(tcp_request(f.pod(1), f.ip(3), 8080, LONG), "a pod no policy selects");
    // Pod 1 under Permissive: the unauthenticated connection has its own event, no sample.
    let mut permissive = t.clone();
    permissive.endpoints[0].mutual_auth = Auth::Permissive;
    f.dp().apply_tables(&permissive).unwrap();
    let _back = tcp_echo_server(f.pod(1), 8080).unwrap();
    assert!(tcp_request(f.pod(3), f.ip(1), 8080, LONG), "Permissive passes");
    assert!(!tcp_request(f.pod(3), f.ip(2), 8080, SHORT), "denied");
    std::thread::sleep(SHORT);
    let passes = drain(&mut events, EventKind::Pass);
    let to = |ip| passes.iter().filter(|e| e.dst == ip && !e.dropped).map(|e| e.counter).collect::<Vec<_>>();
    assert_eq!(to(f.ip(2)), [Counter::PassPolicy], "one sample per new flow, with its reason: {passes:?}");
    assert_eq!(to(f.ip(3)), [Counter::PassNoPolicy], "{passes:?}");
    assert!(passes.iter().all(|e| e.dst != f.ip(1)), "a flow with an event of its own sampled: {passes:?}");
    assert!(passes.iter().all(|e| e.src != f.ip(3) || e.dst != f.ip(2)), "a drop is no pass: {passes:?}");
}
