//! The documented rules for what is not plain TCP/UDP (IPv6, fragments, other protocols, ICMP,
//! ARP, other link layers, truncated packets), checked on crafted frames with
//! BPF_PROG_TEST_RUN against a datapath in the test's own pin directory. Run as root.

mod common;

use std::net::Ipv4Addr;

use common::{endpoint, identity, rule, tables};
use meshauth_datapath::netns::{PinDir, require_root};
use meshauth_datapath::packet::{self, TCP_ACK, TCP_SYN};
use meshauth_datapath::{Counter, Datapath, DatapathConfig, Hook, Ipv6Mode};
use meshauth_policy::tables::{AuthRequirement as Auth, PolicyEntry, TableProtocol as P};

fn ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, i)
}

/// Pods 1-3; pod 2 isolated, reachable from pod 1 on UDP 9090, TCP 8080, ICMP and "other"
/// protocols; pod 3 neither isolated nor Strict.
fn datapath(name: &str, ipv6: Ipv6Mode) -> (Datapath, PinDir) {
    require_root();
    let pins = PinDir::new(name);
    let mut config = DatapathConfig::with_pin_dir(&pins.0);
    config.ipv6 = ipv6;
    let mut dp = Datapath::load_or_adopt(config).expect("load");
    let any_other = PolicyEntry {
        dst_identity: identity(2),
        src_identity: identity(1),
        protocol: P::Other,
        port_start: 0,
        port_end: 0,
        auth: Auth::None,
    };
    let t = tables(
        vec![endpoint(1, false, Auth::None), endpoint(2, true, Auth::None), endpoint(3, false, Auth::None)],
        vec![rule(2, 1, P::Udp, 9090, Auth::None), rule(2, 1, P::Tcp, 8080, Auth::None), rule(2, 1, P::Icmp, 0, Auth::None), any_other],
    );
    dp.apply_tables(&t).expect("tables");
    (dp, pins)
}

fn passes(dp: &Datapath, hook: Hook, frame: &[u8]) -> bool {
    dp.test_run(hook, frame, 1).unwrap_or_else(|e| panic!("test run of {frame:02x?}: {e}")).passed()
}

#[test]
fn ipv6_is_dropped_except_neighbour_discovery_unless_set_to_pass() {
    let (dp, _pins) = datapath("v6drop", Ipv6Mode::Drop);
    let udp6 = packet::ipv6(17, &packet::udp_header(1000, 9090, &[0; 8]));
    for hook in [Hook::ToPod, Hook::FromPod] {
        assert!(!passes(&dp, hook, &udp6), "{hook:?}: IPv6 UDP");
        assert!(!passes(&dp, hook, &packet::icmpv6(128)), "{hook:?}: ICMPv6 echo");
        for nd in 133..=137 {
            assert!(passes(&dp, hook, &packet::icmpv6(nd)), "{hook:?}: neighbour discovery {nd}");
        }
    }
    let c = dp.counters().unwrap();
    assert_eq!((c.packets(Counter::DropIpv6), c.packets(Counter::PassIpv6)), (4, 10));

    let (dp, _pins) = datapath("v6pass", Ipv6Mode::Pass);
    assert!(passes(&dp, Hook::ToPod, &udp6), "IPv6 under the pass setting");
    assert!(passes(&dp, Hook::FromPod, &udp6), "IPv6 under the pass setting");
    assert_eq!(dp.counters().unwrap().packets(Counter::PassIpv6), 2);
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let (dp, _pins) = datapath("frag", Ipv6Mode::Drop);
    let first = |id, port| packet::ipv4(ip(1), ip(2), 17, id, (true, 0), &packet::udp_header(1000, port, &[0; 32]));
    let later = |id, dst| packet::ipv4(ip(1), dst, 17, id, (false, 5), &[0; 16]);

    assert!(passes(&dp, Hook::ToPod, &first(7, 9090)), "allowed first fragment");
    assert!(passes(&dp, Hook::ToPod, &later(7, ip(2))), "its later fragment");
    assert!(!passes(&dp, Hook::ToPod, &later(8, ip(2))), "a later fragment without its first");
    assert!(!passes(&dp, Hook::ToPod, &first(9, 9999)), "denied first fragment");
    assert!(!passes(&dp, Hook::ToPod, &later(9, ip(2))), "the later fragment of a denied one");
    assert!(passes(&dp, Hook::ToPod, &later(10, ip(3))), "towards a pod without policy: unchecked");
    let c = dp.counters().unwrap();
    assert_eq!(c.packets(Counter::PassFragment), 1);
    assert_eq!(c.packets(Counter::DropFragment), 2);
    assert_eq!(c.packets(Counter::DropDenied), 1);
}

#[test]
fn icmp_and_other_protocols_are_checked_with_their_table_protocol() {
    let (dp, _pins) = datapath("proto", Ipv6Mode::Drop);
    let gre = |src| packet::ipv4(src, ip(2), 47, 1, (false, 0), &[0; 24]);
    assert!(passes(&dp, Hook::ToPod, &gre(ip(1))), "other protocol, allowed source");
    assert!(!passes(&dp, Hook::ToPod, &gre(ip(3))), "other protocol, other source");
    assert!(passes(&dp, Hook::ToPod, &packet::icmp_echo(ip(1), ip(2), 42)), "ICMP, allowed source");
    assert!(!passes(&dp, Hook::ToPod, &packet::icmp_echo(ip(3), ip(2), 42)), "ICMP, other source");
    // World sources (not in endpoints) meet the policy as the world identity: denied here.
    assert!(!passes(&dp, Hook::ToPod, &packet::udp(Ipv4Addr::new(192, 0, 2, 1), ip(2), 1, 9090)));
    assert_eq!(dp.counters().unwrap().packets(Counter::DropDenied), 3);
}

#[test]
fn new_tcp_connections_are_cached_mid_stream_packets_are_not() {
    let (dp, _pins) = datapath("syn", Ipv6Mode::Drop);
    let ack = packet::tcp(ip(1), ip(2), 40000, 8080, TCP_ACK);
    assert!(passes(&dp, Hook::ToPod, &ack));
    assert!(passes(&dp, Hook::ToPod, &ack));
    assert_eq!(dp.counters().unwrap().packets(Counter::PassPolicy), 2, "mid-stream: full check each time");
    assert!(passes(&dp, Hook::ToPod, &packet::tcp(ip(1), ip(2), 40000, 8080, TCP_SYN)));
    assert!(passes(&dp, Hook::ToPod, &ack));
    assert_eq!(dp.counters().unwrap().packets(Counter::PassCtEstablished), 1, "after the SYN: conntrack");
}

#[test]
fn arp_passes_other_link_layers_and_truncated_packets_are_dropped() {
    let (dp, _pins) = datapath("l2", Ipv6Mode::Drop);
    assert!(passes(&dp, Hook::ToPod, &packet::arp()), "ARP to a pod");
    // ARP from a pod must claim the pod's own address; the test runner's loopback interface
    // is no registered pod interface, so its ARP fails closed like its IPv4 does.
    assert!(!passes(&dp, Hook::FromPod, &packet::arp()), "ARP from an unregistered interface");
    for hook in [Hook::ToPod, Hook::FromPod] {
        assert!(!passes(&dp, hook, &packet::other_ethertype()), "{hook:?}: LLDP");
        // (The kernel's test runner itself refuses a truncated IPv4 header, so the truncation
        // is in the TCP header.)
        let mut short = packet::tcp(ip(1), ip(2), 1, 8080, TCP_SYN);
        short.truncate(14 + 20 + 10);
        assert!(!passes(&dp, hook, &short), "{hook:?}: truncated TCP header");
    }
    let c = dp.counters().unwrap();
    assert_eq!(
        (
            c.packets(Counter::PassArp),
            c.packets(Counter::DropSpoofed),
            c.packets(Counter::DropUnsupportedL2),
            c.packets(Counter::DropMalformed)
        ),
        (1, 1, 2, 2)
    );
}

#[test]
fn from_pod_on_an_unregistered_interface_fails_closed() {
    // BPF_PROG_TEST_RUN runs on the loopback device, which attach() never registered.
    let (dp, _pins) = datapath("closed", Ipv6Mode::Drop);
    assert!(!passes(&dp, Hook::FromPod, &packet::udp(ip(1), ip(2), 1, 9090)));
    assert_eq!(dp.counters().unwrap().packets(Counter::DropSpoofed), 1);
}

#[test]
fn an_ipv4_ethertype_carrying_another_ip_version_is_dropped() {
    let (dp, _pins) = datapath("ipver", Ipv6Mode::Pass);
    // To pod 3 (not isolated): a real IPv4 packet passes, the same bytes claiming version 6
    // in the IP header (an IPv6 packet smuggled under the IPv4 EtherType) are dropped.
    let good = packet::tcp(ip(1), ip(3), 1, 8080, TCP_SYN);
    assert!(passes(&dp, Hook::ToPod, &good));
    let mut smuggled = good.clone();
    smuggled[14] = 0x65;
    assert!(!passes(&dp, Hook::ToPod, &smuggled), "version 6 under the IPv4 EtherType");
    assert_eq!(dp.counters().unwrap().packets(Counter::DropMalformed), 1);
}
