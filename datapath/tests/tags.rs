//! Identity-bound connections with real packets between two nodes (network namespaces joined by
//! an underlay veth) and an attacker's third: a TCP SYN that needs authentication is admitted
//! only when it proves its source, by a tag the source node's uplink writes with the pair's
//! key. Each node numbers SPIFFE IDs its own way, as real agents do. Run as root.

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use common::{Capture, LONG, RawIpSender, SHORT, TcpSeen, await_event, parse_tcp, rises_above, tcp_syn_packet, with_source_port};
use meshauth_datapath::NodeId::At;
use meshauth_datapath::netns::{Netns, Node, PinDir, endpoint, link_nodes, require_root, tcp_echo_server, tcp_request};
use meshauth_datapath::{
    BootTime, ConnectionKey, Counter, Datapath, DatapathConfig, EventKind, EventStream, Hook, tag_option, tag_slot_now,
};
use meshauth_policy::tables::{AuthRequirement, CompiledTables, EndpointEntry};

const PORT: u16 = 8080;
const A_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const A_OTHER: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const B_SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
/// Node A's numbers: the client 11, the other pod 13, the server 12, a new identity 14.
/// Node B's: the client 1, the server 2, the other pod 3.
const KEY: ConnectionKey = ConnectionKey([0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321]);

/// Node a's address on the underlay to b, and b's.
const A_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 1);
const B_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 78, 2);

fn tables(endpoints: Vec<EndpointEntry>) -> CompiledTables {
    let spiffe_ids = endpoints.iter().map(|e| (e.spiffe_id, format!("spiffe://cluster.local/ns/test/sa/{}", e.spiffe_id))).collect();
    CompiledTables { endpoints, policy: Vec::new(), spiffe_ids, security_identities: Vec::new() }
}

/// Node A's view: `client_spiffe` is whoever holds the client's address now.
fn tables_a(client_spiffe: u32) -> CompiledTables {
    tables(vec![
        endpoint(A_CLIENT, 301, client_spiffe, AuthRequirement::None, None),
        endpoint(A_OTHER, 303, 13, AuthRequirement::None, None),
        endpoint(B_SERVER, 302, 12, AuthRequirement::Required, Some(B_NODE)),
    ])
}

fn tables_b() -> CompiledTables {
    tables_b_with(AuthRequirement::Required)
}

/// Node B's view with the server's MutualAuth mode `server`.
fn tables_b_with(server: AuthRequirement) -> CompiledTables {
    tables(vec![
        endpoint(A_CLIENT, 301, 1, AuthRequirement::None, Some(A_NODE)),
        endpoint(A_OTHER, 303, 3, AuthRequirement::None, Some(A_NODE)),
        endpoint(B_SERVER, 302, 2, server, None),
    ])
}

fn load(node: &Node, pins: &PinDir, uplinks: &[&str], t: &CompiledTables) -> Datapath {
    let _inside = node.ns.enter().expect("entering the node");
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pins.0)).expect("loading the datapath");
    for pod in &node.pods {
        dp.attach(&pod.host_if, pod.ip).expect("attaching");
    }
    for uplink in uplinks {
        dp.attach_uplink(uplink).expect("attaching the tagger");
    }
    assert!(dp.apply_tables(t).expect("tables").complete());
    dp
}

/// Two nodes and an attacker: A (client pods) and B (the server) on underlay 192.168.78.0/30,
/// C on 192.168.79.0/30 behind B.
struct Mesh {
    // Drop order: datapaths, pins, then namespaces.
    a: Option<Datapath>,
    b: Option<Datapath>,
    pins_a: PinDir,
    pins_b: PinDir,
    node_a: Node,
    node_b: Node,
    attacker: Netns,
}

impl Mesh {
    fn new(tag: &str) -> Self {
        require_root();
        let node_a = Node::new_in(&format!("ma-{tag}a"), 2, 1).expect("node a");
        let node_b = Node::new_in(&format!("ma-{tag}b"), 1, 2).expect("node b");
        let attacker = Netns::new(&format!("ma-{tag}c")).expect("attacker");
        link_nodes(&node_a.ns, 1, &node_b.ns, 2, 78, "up0").expect("underlay a-b");
        link_nodes(&attacker, 3, &node_b.ns, 2, 79, "up1").expect("underlay c-b");
        let (pins_a, pins_b) = (PinDir::new(&format!("{tag}-a")), PinDir::new(&format!("{tag}-b")));
        let a = load(&node_a, &pins_a, &["up0"], &tables_a(11));
        let b = load(&node_b, &pins_b, &["up0", "up1"], &tables_b());
        let mut mesh = Mesh { a: Some(a), b: Some(b), pins_a, pins_b, node_a, node_b, attacker };
        let expiry = BootTime::after(Duration::from_secs(600));
        mesh.a().set_tag_key(11, 12, At(B_NODE), expiry, KEY).expect("source key");
        mesh.b().set_auth_keyed(2, 1, At(A_NODE), expiry, KEY).expect("destination key");
        mesh
    }

    fn a(&mut self) -> &mut Datapath {
        self.a.as_mut().expect("node a")
    }

    fn b(&mut self) -> &mut Datapath {
        self.b.as_mut().expect("node b")
    }

    fn count_b(&self, c: Counter) -> u64 {
        self.b.as_ref().expect("node b").counters().expect("counters").packets(c)
    }

    fn count_a(&self, c: Counter) -> u64 {
        self.a.as_ref().expect("node a").counters().expect("counters").packets(c)
    }

    fn client(&self) -> &meshauth_datapath::netns::Pod {
        &self.node_a.pods[0]
    }

    fn connects(&self) -> bool {
        tcp_request(self.client(), B_SERVER, PORT, Duration::from_secs(2))
    }

    /// A connection from node a's other pod (10.77.1.2: 13 on node a, 3 on node b).
    fn other_connects(&self) -> bool {
        tcp_request(&self.node_a.pods[1], B_SERVER, PORT, Duration::from_secs(2))
    }

    /// Whether node a's counter `c` rises above `before` (bounded wait).
    fn a_counted_above(&self, c: Counter, before: u64) -> bool {
        rises_above(before, || self.count_a(c))
    }

    fn b_counted_above(&self, c: Counter, before: u64) -> bool {
        rises_above(before, || self.count_b(c))
    }

    /// Node b's events; `runtime` (the stream registers with its reactor) must outlive them.
    fn events_b(&self, runtime: &tokio::runtime::Runtime) -> EventStream {
        let _in_runtime = runtime.enter();
        self.b.as_ref().expect("node b").events().expect("events")
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// Whether `packet` is a SYN (not a SYN-ACK) from `src` to the server's port.
fn syn_from(packet: &[u8], src: Ipv4Addr) -> Option<TcpSeen> {
    parse_tcp(packet).filter(|t| t.is_syn() && t.src == src && t.dst == B_SERVER && t.dport == PORT)
}

/// Whether `packet` is the server's SYN-ACK to port `dport`.
fn syn_ack_to(packet: &[u8], dport: u16) -> bool {
    parse_tcp(packet).is_some_and(|t| t.is_syn_ack() && t.src == B_SERVER && t.sport == PORT && t.dport == dport)
}

/// A TCP connection from `src` (bound on the attacker's own loopback) to the server.
fn spoofed_connect(ns: &Netns, src: Ipv4Addr) -> bool {
    ns.run(|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into()).expect("bind");
        socket.connect_timeout(&SocketAddr::V4(SocketAddrV4::new(B_SERVER, PORT)).into(), Duration::from_millis(1500)).is_ok()
    })
    .expect("attacker namespace")
}

#[test]
fn the_genuine_pod_connects_first_time_and_a_spoofed_source_from_another_node_is_dropped() {
    let mut mesh = Mesh::new("tg1");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    let retransmits = mesh.client().ns.tcp_retransmits().expect("snmp");
    for _ in 0..5 {
        assert!(mesh.connects(), "the authenticated client must connect");
    }
    assert_eq!(mesh.client().ns.tcp_retransmits().expect("snmp"), retransmits, "no SYN was retransmitted");
    assert!(mesh.count_a(Counter::TagWritten) >= 5, "node a tagged the client's SYNs");
    assert_eq!(mesh.count_b(Counter::DropTagMissing) + mesh.count_b(Counter::DropTagInvalid), 0);

    // The attacker writes the client's address into its packets (on its own loopback): the
    // address alone names the authenticated client.
    mesh.attacker.exec(&["ip", "addr", "add", "10.77.1.1/32", "dev", "lo"]).expect("spoofed address");
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let _in_runtime = runtime.enter();
    let mut events = mesh.b.as_ref().expect("b").events().expect("events");
    let missing = mesh.count_b(Counter::DropTagMissing);
    assert!(!spoofed_connect(&mesh.attacker, A_CLIENT), "a spoofed SYN from another node must not connect");
    assert!(mesh.count_b(Counter::DropTagMissing) > missing, "dropped for its missing tag");
    let mut tagged = Vec::new();
    while let Some(e) = events.try_next() {
        let e = e.expect("event");
        if e.kind == EventKind::Tag {
            tagged.push(e);
        }
    }
    assert!(tagged.iter().any(|e| e.src_spiffe_id == 1 && e.dst_spiffe_id == 2), "the event names the identity claimed: {tagged:?}");
    // The genuine client is unaffected.
    assert!(mesh.connects());
    mesh.b().set_auth_keyed(2, 1, At(A_NODE), BootTime::now(), KEY).expect("expire");
    assert!(!mesh.connects(), "an expired pair admits nothing, tag or not");
}

/// A SYN frame from the client to the server with the given TCP options.
fn syn_frame(sport: u16, seq: u32, options: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&tcp_syn_packet(A_CLIENT, B_SERVER, sport, PORT, seq, options));
    f
}

#[test]
fn a_tag_verifies_only_for_its_own_connection_key_and_time() {
    require_root();
    let pins = PinDir::new("tg-run");
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pins.0)).expect("load");
    assert!(dp.apply_tables(&tables_b()).expect("tables").complete());
    let expiry = BootTime::after(Duration::from_secs(600));
    dp.set_auth_keyed(2, 1, At(A_NODE), expiry, KEY).expect("key");
    let slot = tag_slot_now();
    let tag = |key: ConnectionKey, sport: u16, seq: u32, slot: u32| tag_option(key.0, A_CLIENT, B_SERVER, sport, PORT, seq, slot);
    let run = |dp: &Datapath, frame: &[u8]| dp.test_run(Hook::ToPod, frame, 1).expect("test run").passed();
    let counter = |dp: &Datapath, c| dp.counters().expect("counters").packets(c);

    assert!(run(&dp, &syn_frame(40_000, 7, &tag(KEY, 40_000, 7, slot))), "a valid tag passes");
    // A captured tag replayed from another port, with another sequence number, or much later.
    let before = counter(&dp, Counter::DropTagInvalid);
    assert!(!run(&dp, &syn_frame(40_001, 7, &tag(KEY, 40_000, 7, slot))), "another port");
    assert!(!run(&dp, &syn_frame(40_000, 8, &tag(KEY, 40_000, 7, slot))), "another sequence number");
    assert!(!run(&dp, &syn_frame(40_000, 7, &tag(KEY, 40_000, 7, slot.wrapping_sub(3)))), "an old slot");
    let other = ConnectionKey([1, 2]);
    assert!(!run(&dp, &syn_frame(40_000, 7, &tag(other, 40_000, 7, slot))), "another pair's key");
    assert_eq!(counter(&dp, Counter::DropTagInvalid), before + 4);
    let missing = counter(&dp, Counter::DropTagMissing);
    assert!(!run(&dp, &syn_frame(40_000, 7, &[1, 1, 1, 1])), "no tag");
    assert_eq!(counter(&dp, Counter::DropTagMissing), missing + 1);

    // Rotation: the previous key is accepted during its overlap, the new one at once.
    let next = ConnectionKey([3, 4]);
    dp.set_auth_keyed(2, 1, At(A_NODE), expiry, next).expect("rotate");
    assert!(run(&dp, &syn_frame(40_002, 9, &tag(KEY, 40_002, 9, slot))), "previous key in its overlap");
    assert!(run(&dp, &syn_frame(40_003, 9, &tag(next, 40_003, 9, slot))), "new key");
    // A pair written without a key (same-node pairs need none) admits no tag from elsewhere:
    // the all-zero key's MAC is anyone's to compute.
    dp.remove_auth(2, 1, At(A_NODE)).expect("remove");
    dp.set_auth(2, 1, At(A_NODE), expiry).expect("no key");
    assert!(!run(&dp, &syn_frame(40_004, 9, &tag(ConnectionKey([0, 0]), 40_004, 9, slot))), "zero key");
    drop(dp);
}

#[test]
fn a_pod_on_a_reused_address_with_another_identity_cannot_connect() {
    let mut mesh = Mesh::new("tg2");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    assert!(mesh.connects());
    // The client's pod is gone; a pod of another identity (14 on node a) got its address. Node
    // a knows; node b has not heard yet and still names the old identity.
    assert!(mesh.a().apply_tables(&tables_a(14)).expect("tables").complete());
    let missing = mesh.count_b(Counter::DropTagMissing);
    assert!(!mesh.connects(), "no key for the new pair: untagged, dropped");
    assert!(mesh.count_b(Counter::DropTagMissing) > missing);
    // Even authenticated with the server under its own identity, its tags are its pair's.
    let its_own = ConnectionKey([0x5555, 0xaaaa]);
    mesh.a().set_tag_key(14, 12, At(B_NODE), BootTime::after(Duration::from_secs(600)), its_own).expect("key");
    let invalid = mesh.count_b(Counter::DropTagInvalid);
    assert!(!mesh.connects(), "tagged with another pair's key: dropped");
    assert!(mesh.count_b(Counter::DropTagInvalid) > invalid);
}

#[test]
fn a_wrong_tag_is_dropped_and_reported_under_the_identity_it_claimed() {
    let mut mesh = Mesh::new("tg6");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    assert!(mesh.connects(), "the genuine client connects");
    let runtime = runtime();
    let mut events = mesh.events_b(&runtime);
    // A pod of another identity (14 on node a) got the client's address, and a key of its own
    // pair: node a tags its SYNs with that key, node b (not told yet) checks them with the
    // client's.
    assert!(mesh.a().apply_tables(&tables_a(14)).expect("tables").complete());
    mesh.a().set_tag_key(14, 12, At(B_NODE), BootTime::after(Duration::from_secs(600)), ConnectionKey([0x5555, 0xaaaa])).expect("key");
    let written = mesh.count_a(Counter::TagWritten);
    let (invalid, missing) = (mesh.count_b(Counter::DropTagInvalid), mesh.count_b(Counter::DropTagMissing));
    assert!(!mesh.connects(), "tagged with another pair's key: must not connect");
    assert!(mesh.a_counted_above(Counter::TagWritten, written), "node a tagged the SYN");
    assert!(mesh.b_counted_above(Counter::DropTagInvalid, invalid), "dropped for its wrong tag");
    assert_eq!(mesh.count_b(Counter::DropTagMissing), missing, "the SYN did carry a tag");
    let e = await_event(&mut events, |e| e.kind == EventKind::Tag && e.counter == Counter::DropTagInvalid)
        .unwrap_or_else(|seen| panic!("no event for the wrong tag: {seen:?}"));
    assert!(e.dropped, "{e:?}");
    assert_eq!((e.src, e.dst, e.dst_port, e.protocol), (A_CLIENT, B_SERVER, PORT, 6), "{e:?}");
    // Node b's numbers: the identity the address claims (the client's, 1), and the server's.
    assert_eq!((e.src_spiffe_id, e.dst_spiffe_id, e.src_identity, e.dst_identity), (1, 2, 301, 302), "{e:?}");
    assert_eq!(e.auth, AuthRequirement::Required, "{e:?}");
}

#[test]
fn a_tag_captured_on_the_wire_and_replayed_from_another_port_is_dropped() {
    let mesh = Mesh::new("tg7");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    // Watching from before the genuine connection: node b's underlay, where the SYN arrives
    // (before routing, and before to_pod on the server's veth), and the server pod itself.
    let underlay = Capture::open(&mesh.node_b.ns, "up0").expect("capture on node b's underlay");
    let at_server = Capture::open(&mesh.node_b.pods[0].ns, "eth0").expect("capture in the server pod");
    let runtime = runtime();
    let mut events = mesh.events_b(&runtime);
    let (invalid, missing) = (mesh.count_b(Counter::DropTagInvalid), mesh.count_b(Counter::DropTagMissing));
    assert!(mesh.connects(), "the genuine client connects");
    assert_eq!(
        (mesh.count_b(Counter::DropTagInvalid), mesh.count_b(Counter::DropTagMissing)),
        (invalid, missing),
        "the genuine SYN was not dropped"
    );
    let captured = underlay
        .find(LONG, |p| syn_from(p, A_CLIENT).is_some_and(|t| t.tag().is_some()))
        .expect("the client's tagged SYN crossed the underlay");
    let genuine = parse_tcp(&captured).expect("a TCP packet");
    assert!(at_server.find(LONG, |p| syn_from(p, A_CLIENT).is_some_and(|t| t.sport == genuine.sport)).is_some(), "it reached the server");

    // The attacker (behind node b on another underlay) sends it again with the client's
    // address, tag and sequence number, from another port.
    let sport = genuine.sport.wrapping_add(1);
    let replay = with_source_port(&captured, sport);
    let replayed = parse_tcp(&replay).expect("a TCP packet");
    assert_eq!((replayed.sport, replayed.seq, replayed.tag()), (sport, genuine.seq, genuine.tag()), "the captured tag, resent");
    RawIpSender::open(&mesh.attacker).expect("raw socket in the attacker namespace").send(&replay).expect("sending the replay");
    assert!(mesh.b_counted_above(Counter::DropTagInvalid, invalid), "a replayed tag must not verify for another port");
    let e = await_event(&mut events, |e| e.kind == EventKind::Tag && e.src_port == sport)
        .unwrap_or_else(|seen| panic!("no event for the replay: {seen:?}"));
    assert_eq!((e.counter, e.dropped, e.src, e.src_spiffe_id, e.dst_spiffe_id), (Counter::DropTagInvalid, true, A_CLIENT, 1, 2), "{e:?}");
    assert!(at_server.find(SHORT, |p| syn_from(p, A_CLIENT).is_some_and(|t| t.sport == sport)).is_none(), "the replay reached the server");
    assert_eq!(mesh.count_b(Counter::DropTagMissing), missing);
    assert!(mesh.connects(), "the genuine client is unaffected");
}

#[test]
fn a_syn_its_node_has_no_key_for_leaves_untagged_and_passes_only_under_permissive() {
    let mut mesh = Mesh::new("tg8");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    // Node b proved the other pod's pair (3 to 2 there) with a key; node a holds no tag key for
    // it (13 to 12): a source node whose agent does not (yet) tag.
    mesh.b().set_auth_keyed(2, 3, At(A_NODE), BootTime::after(Duration::from_secs(600)), ConnectionKey([0x3333, 0x4444])).expect("key");
    let underlay = Capture::open(&mesh.node_b.ns, "up0").expect("capture on node b's underlay");
    let runtime = runtime();
    let mut events = mesh.events_b(&runtime);

    // Strict.
    let (no_key, written, missing) =
        (mesh.count_a(Counter::TagNoKey), mesh.count_a(Counter::TagWritten), mesh.count_b(Counter::DropTagMissing));
    assert!(!mesh.other_connects(), "an untagged SYN must not connect under Strict");
    assert!(mesh.a_counted_above(Counter::TagNoKey, no_key), "node a counted the SYN it had no key for");
    assert!(mesh.b_counted_above(Counter::DropTagMissing, missing), "node b dropped it for its missing tag");
    assert_eq!(mesh.count_a(Counter::TagWritten), written, "nothing was tagged");
    let syn = underlay.find(LONG, |p| syn_from(p, A_OTHER).is_some()).expect("the SYN crossed the underlay");
    assert_eq!(parse_tcp(&syn).expect("a TCP packet").tag(), None, "it left node a untagged");
    let e = await_event(&mut events, |e| e.kind == EventKind::Tag && e.counter == Counter::DropTagMissing)
        .unwrap_or_else(|seen| panic!("no event for the untagged SYN: {seen:?}"));
    assert_eq!((e.dropped, e.src, e.src_spiffe_id, e.dst_spiffe_id, e.auth), (true, A_OTHER, 3, 2, AuthRequirement::Required), "{e:?}");

    // Permissive: the same SYN passes, counted and reported as untagged (the pair is proved:
    // an unproved one would be pass_permissive_unauthenticated).
    assert!(mesh.b().apply_tables(&tables_b_with(AuthRequirement::Permissive)).expect("tables").complete());
    let (no_key, untagged, missing) =
        (mesh.count_a(Counter::TagNoKey), mesh.count_b(Counter::PassUntaggedPermissive), mesh.count_b(Counter::DropTagMissing));
    assert!(mesh.other_connects(), "an untagged SYN connects under Permissive");
    assert!(mesh.a_counted_above(Counter::TagNoKey, no_key), "still untagged");
    assert!(mesh.b_counted_above(Counter::PassUntaggedPermissive, untagged), "passed as untagged under Permissive");
    assert_eq!(mesh.count_b(Counter::DropTagMissing), missing, "nothing dropped");
    let e = await_event(&mut events, |e| e.kind == EventKind::Tag && e.counter == Counter::PassUntaggedPermissive)
        .unwrap_or_else(|seen| panic!("no event for the permitted SYN: {seen:?}"));
    assert_eq!((e.dropped, e.src, e.src_spiffe_id, e.dst_spiffe_id, e.auth), (false, A_OTHER, 3, 2, AuthRequirement::Permissive), "{e:?}");
}

#[test]
fn a_syn_without_room_for_the_tag_leaves_untagged_and_is_dropped_under_strict() {
    let mesh = Mesh::new("tg9");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    let underlay = Capture::open(&mesh.node_b.ns, "up0").expect("capture on node b's underlay");
    let at_client = Capture::open(&mesh.client().ns, "eth0").expect("capture in the client pod");
    let raw = RawIpSender::open(&mesh.client().ns).expect("raw socket in the client pod");
    let runtime = runtime();
    let mut events = mesh.events_b(&runtime);
    let (roomy, full) = (61_001, 61_002);
    let mss: [u8; 4] = [2, 4, 0x05, 0xb4];

    // The same raw SYN with room (its header 24 bytes, 36 tagged) is tagged and answered.
    let written = mesh.count_a(Counter::TagWritten);
    raw.send(&tcp_syn_packet(A_CLIENT, B_SERVER, roomy, PORT, 0x1000_0001, &mss)).expect("sending");
    assert!(mesh.a_counted_above(Counter::TagWritten, written), "a raw SYN with room is tagged");
    assert!(at_client.find(LONG, |p| syn_ack_to(p, roomy)).is_some(), "and admitted: the server answered");

    // 28 NOPs and the MSS: a 52-byte header, which 12 more bytes would take past 60.
    let mut options = vec![1u8; 28];
    options.extend_from_slice(&mss);
    let (written, no_room, missing) =
        (mesh.count_a(Counter::TagWritten), mesh.count_a(Counter::TagNoRoom), mesh.count_b(Counter::DropTagMissing));
    raw.send(&tcp_syn_packet(A_CLIENT, B_SERVER, full, PORT, 0x2000_0002, &options)).expect("sending");
    assert!(mesh.a_counted_above(Counter::TagNoRoom, no_room), "node a counted the SYN it had no room to tag");
    assert!(mesh.b_counted_above(Counter::DropTagMissing, missing), "node b dropped it for its missing tag");
    assert_eq!(mesh.count_a(Counter::TagWritten), written, "not tagged");
    let syn = underlay.find(LONG, |p| syn_from(p, A_CLIENT).is_some_and(|t| t.sport == full)).expect("the SYN crossed the underlay");
    let syn = parse_tcp(&syn).expect("a TCP packet");
    assert_eq!((&syn.options, syn.tag()), (&options, None), "it arrived as sent, untagged");
    let e = await_event(&mut events, |e| e.kind == EventKind::Tag && e.src_port == full)
        .unwrap_or_else(|seen| panic!("no event for the untagged SYN: {seen:?}"));
    assert_eq!((e.counter, e.dropped, e.src, e.src_spiffe_id, e.dst_spiffe_id), (Counter::DropTagMissing, true, A_CLIENT, 1, 2), "{e:?}");
    assert!(at_client.find(SHORT, |p| syn_ack_to(p, full)).is_none(), "the server answered a SYN it should never have seen");
}

#[test]
fn connections_across_key_rotations_and_restarts_never_fail() {
    let mut mesh = Mesh::new("tg3");
    let _server = tcp_echo_server(&mesh.node_b.pods[0], PORT).expect("server");
    let retransmits = mesh.client().ns.tcp_retransmits().expect("snmp");
    let expiry = BootTime::after(Duration::from_secs(600));
    let keys = [ConnectionKey([10, 11]), ConnectionKey([20, 21]), ConnectionKey([30, 31])];
    let mut failures = 0;
    for i in 0..60 {
        match i {
            // The source side installs first (what a handshake does: the answering agent
            // installs before it confirms), then the destination.
            10 => {
                mesh.a().set_tag_key(11, 12, At(B_NODE), expiry, keys[0]).expect("rotate a");
                mesh.b().set_auth_keyed(2, 1, At(A_NODE), expiry, keys[0]).expect("rotate b");
            }
            // The destination first.
            25 => {
                mesh.b().set_auth_keyed(2, 1, At(A_NODE), expiry, keys[1]).expect("rotate b");
                mesh.a().set_tag_key(11, 12, At(B_NODE), expiry, keys[1]).expect("rotate a");
            }
            // Both agents restart (the datapath is adopted from its pins) and rotate again.
            40 => {
                drop(mesh.a.take());
                drop(mesh.b.take());
                mesh.a = Some(load(&mesh.node_a, &mesh.pins_a, &["up0"], &tables_a(11)));
                mesh.b = Some(load(&mesh.node_b, &mesh.pins_b, &["up0", "up1"], &tables_b()));
                mesh.a().set_tag_key(11, 12, At(B_NODE), expiry, keys[2]).expect("rotate a");
                mesh.b().set_auth_keyed(2, 1, At(A_NODE), expiry, keys[2]).expect("rotate b");
            }
            _ => {}
        }
        if !mesh.connects() {
            failures += 1;
        }
        std::thread::sleep(Duration::from_millis(80));
    }
    assert_eq!(failures, 0, "connections failed across rotations and restarts");
    assert_eq!(mesh.client().ns.tcp_retransmits().expect("snmp"), retransmits, "no SYN was retransmitted");
    assert_eq!(mesh.count_b(Counter::DropTagInvalid) + mesh.count_b(Counter::DropTagMissing), 0);
    // After the switch delay the source tags with the newest key, which the destination holds.
    std::thread::sleep(meshauth_datapath::KEY_SWITCH_DELAY);
    assert!(mesh.connects());
}

/// A hub node linked to two spoke nodes, each over its own underlay: spoke 1 on
/// 192.168.80.0/30 (`up0`), spoke 2 on 192.168.81.0/30 (`up1`), the hub `.2` on both. One pod
/// each: the hub's 10.77.2.1, spoke 1's 10.77.1.1, spoke 2's 10.77.3.1. Each node numbers
/// SPIFFE IDs its own way and knows the others by the address it reaches them at.
struct Star {
    // Drop order: datapaths, pins, then namespaces.
    dps: [Option<Datapath>; 3],
    _pins: [PinDir; 3],
    nodes: [Node; 3],
}

const HUB_POD: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 1);
const SPOKE1_POD: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
const SPOKE2_POD: Ipv4Addr = Ipv4Addr::new(10, 77, 3, 1);
const SPOKE1_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 1);
const SPOKE2_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 81, 1);
/// The hub as spoke 1 reaches it, and as spoke 2 does.
const HUB_FROM_1: Ipv4Addr = Ipv4Addr::new(192, 168, 80, 2);
const HUB_FROM_2: Ipv4Addr = Ipv4Addr::new(192, 168, 81, 2);
const HUB: usize = 0;

impl Star {
    /// `uplinks` and `tables`: the hub's, spoke 1's, spoke 2's.
    fn new(tag: &str, uplinks: [&[&str]; 3], tables: [CompiledTables; 3]) -> Self {
        require_root();
        let nodes = [
            Node::new_in(&format!("ma-{tag}h"), 1, 2).expect("hub"),
            Node::new_in(&format!("ma-{tag}1"), 1, 1).expect("spoke 1"),
            Node::new_in(&format!("ma-{tag}2"), 1, 3).expect("spoke 2"),
        ];
        link_nodes(&nodes[1].ns, 1, &nodes[HUB].ns, 2, 80, "up0").expect("underlay 1");
        link_nodes(&nodes[2].ns, 3, &nodes[HUB].ns, 2, 81, "up1").expect("underlay 2");
        let pins = [PinDir::new(&format!("{tag}-h")), PinDir::new(&format!("{tag}-1")), PinDir::new(&format!("{tag}-2"))];
        let dps = [0, 1, 2].map(|i| Some(load(&nodes[i], &pins[i], uplinks[i], &tables[i])));
        Star { dps, _pins: pins, nodes }
    }

    fn dp(&mut self, node: usize) -> &mut Datapath {
        self.dps[node].as_mut().expect("datapath")
    }

    fn count(&self, node: usize, c: Counter) -> u64 {
        self.dps[node].as_ref().expect("datapath").counters().expect("counters").packets(c)
    }

    fn tag_drops(&self, node: usize) -> u64 {
        self.count(node, Counter::DropTagMissing) + self.count(node, Counter::DropTagInvalid)
    }

    /// A connection from the pod of `node` to `dst`.
    fn connects(&self, node: usize, dst: Ipv4Addr) -> bool {
        tcp_request(&self.nodes[node].pods[0], dst, PORT, Duration::from_secs(2))
    }

    fn retransmits(&self, node: usize) -> u64 {
        self.nodes[node].pods[0].ns.tcp_retransmits().expect("snmp")
    }
}

#[test]
fn each_node_hosting_the_source_identity_proves_its_own_pods() {
    // A replicated client (one identity, a pod on each spoke) and a server on the hub.
    let hub = tables(vec![
        endpoint(HUB_POD, 302, 2, AuthRequirement::Required, None),
        endpoint(SPOKE1_POD, 301, 1, AuthRequirement::None, Some(SPOKE1_NODE)),
        endpoint(SPOKE2_POD, 301, 1, AuthRequirement::None, Some(SPOKE2_NODE)),
    ]);
    let spoke1 = tables(vec![
        endpoint(SPOKE1_POD, 301, 11, AuthRequirement::None, None),
        endpoint(HUB_POD, 302, 12, AuthRequirement::Required, Some(HUB_FROM_1)),
    ]);
    let spoke2 = tables(vec![
        endpoint(SPOKE2_POD, 301, 21, AuthRequirement::None, None),
        endpoint(HUB_POD, 302, 22, AuthRequirement::Required, Some(HUB_FROM_2)),
    ]);
    let mut star = Star::new("tg4", [&[], &["up0"], &["up1"]], [hub, spoke1, spoke2]);
    let expiry = BootTime::after(Duration::from_secs(600));
    // The hub's agent handshook with each spoke's: a key per node.
    let (k1, k2) = (ConnectionKey([0x1111, 0x1212]), ConnectionKey([0x2121, 0x2222]));
    star.dp(1).set_tag_key(11, 12, At(HUB_FROM_1), expiry, k1).expect("spoke 1 key");
    star.dp(2).set_tag_key(21, 22, At(HUB_FROM_2), expiry, k2).expect("spoke 2 key");
    star.dp(HUB).set_auth_keyed(2, 1, At(SPOKE1_NODE), expiry, k1).expect("hub key 1");
    star.dp(HUB).set_auth_keyed(2, 1, At(SPOKE2_NODE), expiry, k2).expect("hub key 2");
    let _server = tcp_echo_server(&star.nodes[HUB].pods[0], PORT).expect("server");
    let retransmits = (star.retransmits(1), star.retransmits(2));
    for _ in 0..5 {
        assert!(star.connects(1, HUB_POD), "spoke 1's client must connect");
        assert!(star.connects(2, HUB_POD), "spoke 2's client must connect");
    }
    assert_eq!((star.retransmits(1), star.retransmits(2)), retransmits, "no SYN was retransmitted");
    assert_eq!(star.tag_drops(HUB), 0);

    // Spoke 2's proof goes (its agent refused the hub): its pods lose the pair; spoke 1's, of
    // the same identity, keep theirs.
    assert!(star.dp(HUB).remove_auth(2, 1, At(SPOKE2_NODE)).expect("remove"));
    let missing = star.count(HUB, Counter::DropAuthMissing);
    assert!(!star.connects(2, HUB_POD), "another node's proof admitted spoke 2's pod");
    assert!(star.count(HUB, Counter::DropAuthMissing) > missing, "dropped as unauthenticated");
    assert!(star.connects(1, HUB_POD), "spoke 1's proof still stands");
    // Spoke 1's key does not make up for it: the hub checks a SYN with its node's key only.
    star.dp(HUB).set_auth(2, 1, At(SPOKE2_NODE), expiry).expect("keyless proof");
    let invalid = star.count(HUB, Counter::DropTagInvalid);
    assert!(!star.connects(2, HUB_POD), "spoke 2's SYN verified with a key its node's proof lacks");
    assert!(star.count(HUB, Counter::DropTagInvalid) > invalid);
    star.dp(HUB).set_auth_keyed(2, 1, At(SPOKE2_NODE), expiry, k2).expect("proved again");
    assert!(star.connects(2, HUB_POD), "proved again, spoke 2 connects");
}

#[test]
fn each_node_hosting_the_destination_identity_gets_its_own_key() {
    // A client on the hub and a replicated server (one identity, a pod on each spoke).
    let hub = tables(vec![
        endpoint(HUB_POD, 301, 11, AuthRequirement::None, None),
        endpoint(SPOKE1_POD, 302, 12, AuthRequirement::Required, Some(SPOKE1_NODE)),
        endpoint(SPOKE2_POD, 302, 12, AuthRequirement::Required, Some(SPOKE2_NODE)),
    ]);
    let spoke1 = tables(vec![
        endpoint(SPOKE1_POD, 302, 2, AuthRequirement::Required, None),
        endpoint(HUB_POD, 301, 1, AuthRequirement::None, Some(HUB_FROM_1)),
    ]);
    let spoke2 = tables(vec![
        endpoint(SPOKE2_POD, 302, 6, AuthRequirement::Required, None),
        endpoint(HUB_POD, 301, 5, AuthRequirement::None, Some(HUB_FROM_2)),
    ]);
    let mut star = Star::new("tg5", [&["up0", "up1"], &[], &[]], [hub, spoke1, spoke2]);
    let expiry = BootTime::after(Duration::from_secs(600));
    // Each spoke's agent handshook with the hub's on its own: two keys for one pair of
    // identities, which a key per identity pair would have had to choose between.
    let (k1, k2) = (ConnectionKey([0x3131, 0x3232]), ConnectionKey([0x4141, 0x4242]));
    star.dp(HUB).set_tag_key(11, 12, At(SPOKE1_NODE), expiry, k1).expect("hub key 1");
    star.dp(HUB).set_tag_key(11, 12, At(SPOKE2_NODE), expiry, k2).expect("hub key 2");
    star.dp(1).set_auth_keyed(2, 1, At(HUB_FROM_1), expiry, k1).expect("spoke 1 key");
    star.dp(2).set_auth_keyed(6, 5, At(HUB_FROM_2), expiry, k2).expect("spoke 2 key");
    let _servers = [1, 2].map(|i| tcp_echo_server(&star.nodes[i].pods[0], PORT).expect("server"));
    let retransmits = star.retransmits(HUB);
    for _ in 0..5 {
        assert!(star.connects(HUB, SPOKE1_POD), "the client must reach spoke 1's server");
        assert!(star.connects(HUB, SPOKE2_POD), "the client must reach spoke 2's server");
    }
    assert_eq!(star.retransmits(HUB), retransmits, "no SYN was retransmitted");
    assert_eq!(star.tag_drops(1) + star.tag_drops(2), 0);
    assert!(star.count(HUB, Counter::TagWritten) >= 10);

    // Spoke 2 proves the pair again with a new key: spoke 1's stays as it was.
    let k3 = ConnectionKey([0x5151, 0x5252]);
    star.dp(HUB).set_tag_key(11, 12, At(SPOKE2_NODE), expiry, k3).expect("rotate on the hub");
    star.dp(2).set_auth_keyed(6, 5, At(HUB_FROM_2), expiry, k3).expect("rotate on spoke 2");
    std::thread::sleep(meshauth_datapath::KEY_SWITCH_DELAY);
    for _ in 0..3 {
        assert!(star.connects(HUB, SPOKE1_POD) && star.connects(HUB, SPOKE2_POD), "a rotation on one node broke a connection");
    }
    assert_eq!(star.tag_drops(1) + star.tag_drops(2), 0);
    let nodes: Vec<_> = star.dp(HUB).tag_key_pairs().expect("tag keys").into_iter().map(|(_, _, node, _)| node).collect();
    assert_eq!(nodes, [At(SPOKE1_NODE), At(SPOKE2_NODE)], "one key per destination node");
}
