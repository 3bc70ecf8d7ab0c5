//! Ethernet frames built by hand, for `BPF_PROG_TEST_RUN` (the benchmark and the rule tests).
//! Checksums are left zero: the programs never verify them.

use std::net::Ipv4Addr;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;

/// TCP flags.
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

/// An IPv4 packet; `fragment` is `(more fragments, offset in 8-byte units)`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, id: u16, fragment: (bool, u16), payload: &[u8]) -> Vec<u8> {
    let mut p = ethernet(ETH_P_IP);
    let total = (20 + payload.len()) as u16;
    let frag = (u16::from(fragment.0) << 13) | (fragment.1 & 0x1fff);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&frag.to_be_bytes());
    p.extend_from_slice(&[64, protocol, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

/// A TCP segment header (20 bytes) plus `payload`.
pub fn tcp_header(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(payload);
    h
}

/// A UDP header (8 bytes) plus `payload`.
pub fn udp_header(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(8 + payload.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(payload);
    h
}

/// An IPv4 TCP packet.
pub fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, 6, 1, (false, 0), &tcp_header(sport, dport, flags, &[0; 32]))
}

/// An IPv4 TCP SYN with sequence number `seq`, TCP `options` (a multiple of 4 bytes) and no
/// data, as a pod's stack sends it.
pub fn tcp_syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32, options: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20 + options.len());
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, (((20 + options.len()) / 4) as u8) << 4, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
    h.extend_from_slice(options);
    ipv4(src, dst, 6, 1, (false, 0), &h)
}

/// The options of a Linux SYN: MSS, SACK permitted, timestamps, window scale (20 bytes).
pub const LINUX_SYN_OPTIONS: [u8; 20] = [2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7];

/// An IPv4 UDP packet.
pub fn udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, 17, 1, (false, 0), &udp_header(sport, dport, &[0; 32]))
}

/// An ICMP echo request.
pub fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    ipv4(src, dst, 1, 1, (false, 0), &m)
}

/// An IPv6 packet with `next_header` and `payload` (addresses are fixed link-local ones).
pub fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = ethernet(ETH_P_IPV6);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next_header, 64]);
    let mut src = [0u8; 16];
    src[0] = 0xfe;
    src[1] = 0x80;
    src[15] = 1;
    let mut dst = src;
    dst[15] = 2;
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(payload);
    p
}

/// An ICMPv6 message of `icmp_type`.
pub fn icmpv6(icmp_type: u8) -> Vec<u8> {
    ipv6(58, &[icmp_type, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
}

/// An ARP request.
pub fn arp() -> Vec<u8> {
    let mut p = ethernet(ETH_P_ARP);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0; 20]);
    p
}

/// A frame of any other ethertype (LLDP here).
pub fn other_ethertype() -> Vec<u8> {
    let mut p = ethernet(0x88cc);
    p.extend_from_slice(&[0; 46]);
    p
}
