//! The Rust mirror of `bpf/meshauth.h`: map keys, values, events and constants.
//!
//! The C header is the one definition; every struct here repeats it field for field, and
//! [`tests::layout_matches_c_header`] compares sizes, offsets and constant values with what
//! the C compiler produced (build.rs runs `bpf/layout.c`). Addresses and ports are kept in
//! network byte order, exactly as the program reads them from the packet.

use std::net::Ipv4Addr;

use meshauth_policy::tables::{AuthRequirement, TableProtocol};

/// `MA_EP_ISOLATED`: some MeshPolicy selects the pod.
pub const EP_ISOLATED: u8 = 1;
/// `MA_EP_AUDIT`: only audited MeshPolicies select the pod.
pub const EP_AUDIT: u8 = 2;
/// `MA_POLICY_FIXED_BITS`: the prefix bits of a policy key before the port.
pub const POLICY_FIXED_BITS: u32 = 80;
/// `MA_CT_REPLY`: a conntrack entry of a flow a pod started.
pub const CT_REPLY: u8 = 1;
/// `MA_CT_ADMITTED`: a conntrack entry of a flow `to_pod` admitted.
pub const CT_ADMITTED: u8 = 2;
/// `MA_CLOCK_SLACK_NS`: authentications count as expired this much early (the program's
/// clock may be one tick old).
pub const CLOCK_SLACK_NS: u64 = 10_000_000;
/// `MA_ATTACH_NONE`: listed, programs detached.
pub const ATTACH_NONE: u8 = 0;
/// `MA_ATTACH_TCX`.
pub const ATTACH_TCX: u8 = 1;
/// `MA_ATTACH_NETLINK`.
pub const ATTACH_NETLINK: u8 = 2;
/// `MA_IPV6_DROP`.
pub const IPV6_DROP: u8 = 0;
/// `MA_IPV6_PASS`.
pub const IPV6_PASS: u8 = 1;
/// `MA_SPIFFE_ID_MAX`.
pub const SPIFFE_ID_MAX: usize = 2048;
/// `MA_COUNTER_SLOTS`: entries of the counters map.
pub const COUNTER_SLOTS: u32 = 32;

/// `MA_THIS_NODE`: the node of this node's own pods in `endpoint_nodes` and the auth map.
pub const THIS_NODE: u32 = 0;

/// The map key of an IPv4 address: its bytes in network order, read as a native `u32`.
pub fn ip_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The inverse of [`ip_key`].
pub fn key_ip(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

/// `struct ma_endpoint_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointValue {
    pub security_identity: u32,
    pub spiffe_id: u32,
    /// Host-side interface of a pod on this node; 0 for other pods.
    pub ifindex: u32,
    pub flags: u8,
    pub mutual_auth: u8,
    pub pad: u16,
}

/// The data of `struct ma_policy_key` after `prefixlen` (aya's `lpm_trie::Key` adds it).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyData {
    pub dst_identity: u32,
    pub src_identity: u32,
    pub protocol: u16,
    /// Network byte order.
    pub port: u16,
}

/// `struct ma_policy_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyValue {
    pub auth: u8,
    pub pad: [u8; 3],
}

/// `struct ma_auth_key`: the pair, and the node whose agent proved it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthKey {
    pub dst_spiffe_id: u32,
    pub src_spiffe_id: u32,
    /// [`ip_key`] of the source's node address; [`THIS_NODE`] for this node's pods.
    pub src_node: u32,
}

/// `struct ma_auth_value`. Its `Debug` leaves the keys out.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthValue {
    /// CLOCK_BOOTTIME nanoseconds.
    pub expiry_ns: u64,
    /// The pair's connection key from the latest handshake.
    pub key: [u64; 2],
    /// The key before it, accepted until `prev_until_ns`.
    pub prev_key: [u64; 2],
    /// CLOCK_BOOTTIME nanoseconds; 0: no previous key.
    pub prev_until_ns: u64,
}

impl std::fmt::Debug for AuthValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthValue").field("expiry_ns", &self.expiry_ns).field("prev_until_ns", &self.prev_until_ns).finish_non_exhaustive()
    }
}

/// `struct ma_tag_key`: (local source, destination) SPIFFE-ID numbers on the source's node,
/// and the destination's node.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TagKey {
    pub src_spiffe_id: u32,
    pub dst_spiffe_id: u32,
    /// [`ip_key`] of the destination's node address.
    pub dst_node: u32,
}

/// `struct ma_tag_value`.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct TagValue {
    /// CLOCK_BOOTTIME nanoseconds: no tag after it.
    pub expiry_ns: u64,
    pub key: [u64; 2],
    pub prev_key: [u64; 2],
    /// CLOCK_BOOTTIME nanoseconds: `key` is used from then on, `prev_key` before.
    pub key_from_ns: u64,
}

impl std::fmt::Debug for TagValue {
    /// Keys are secrets: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagValue").field("expiry_ns", &self.expiry_ns).field("key_from_ns", &self.key_from_ns).finish_non_exhaustive()
    }
}

/// `MA_TAG_OPT_KIND`: the experimental TCP option kind (RFC 6994) carrying a connection tag.
pub const TAG_OPT_KIND: u8 = 253;
/// `MA_TAG_OPT_LEN`: the tag option's length in bytes.
pub const TAG_OPT_LEN: usize = 12;
/// `MA_TAG_EXID`: the option's experiment ID ("MA"; not IANA-registered).
pub const TAG_EXID: u16 = 0x4d41;
/// `MA_TAG_SLOT_SHIFT`: a tag's time slot is CLOCK_TAI nanoseconds shifted right this much.
pub const TAG_SLOT_SHIFT: u32 = 35;
/// `MA_TAG_MAC_LEN`: MAC bytes in the option.
pub const TAG_MAC_LEN: usize = 7;
/// `MA_SYN_ORIGIN_TTL_NS`.
pub const SYN_ORIGIN_TTL_NS: u64 = 10_000_000_000;

/// The tag option a SYN `saddr:sport -> daddr:dport` with sequence number `seq` carries in
/// time slot `slot` under `key` (what `tag_syn` writes; tests and benchmarks build SYNs with it).
pub fn tag_option(key: [u64; 2], saddr: Ipv4Addr, daddr: Ipv4Addr, sport: u16, dport: u16, seq: u32, slot: u32) -> [u8; TAG_OPT_LEN] {
    use std::hash::Hasher as _;
    let mut m = [0u8; 24];
    m[0..4].copy_from_slice(&saddr.octets());
    m[4..8].copy_from_slice(&daddr.octets());
    m[8..10].copy_from_slice(&sport.to_be_bytes());
    m[10..12].copy_from_slice(&dport.to_be_bytes());
    m[12..16].copy_from_slice(&seq.to_be_bytes());
    m[16..20].copy_from_slice(&slot.to_le_bytes());
    let mut h = siphasher::sip::SipHasher24::new_with_keys(key[0], key[1]);
    h.write(&m);
    let mac = h.finish().to_le_bytes();
    let mut opt = [0u8; TAG_OPT_LEN];
    opt[0] = TAG_OPT_KIND;
    opt[1] = TAG_OPT_LEN as u8;
    opt[2..4].copy_from_slice(&TAG_EXID.to_be_bytes());
    opt[4] = slot as u8;
    opt[5..].copy_from_slice(&mac[..TAG_MAC_LEN]);
    opt
}

/// The current tag time slot (CLOCK_TAI, as the programs read it).
pub fn tag_slot_now() -> u32 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_TAI, &mut ts) };
    let ns = (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64);
    (ns >> TAG_SLOT_SHIFT) as u32
}

/// `struct ma_ct_key`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub pad: [u8; 3],
}

/// `struct ma_ct_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtValue {
    pub last_seen_ns: u64,
    pub policy_epoch: u32,
    pub dst_spiffe_id: u32,
    pub src_spiffe_id: u32,
    /// The pod's veth the flow's packets to the pod leave through.
    pub ifindex: u32,
    pub auth: u8,
    pub kind: u8,
    pub closing: u8,
    /// An audited rule required the admission's authentication.
    pub audit: u8,
    pub pad2: u32,
}

/// `struct ma_iface_value`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IfaceValue {
    /// Network byte order, see [`ip_key`].
    pub pod_ip: u32,
    pub attach_mode: u8,
    pub pad: [u8; 3],
}

/// `struct ma_config`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConfigValue {
    pub policy_epoch: u32,
    pub events_per_sec: u32,
    pub ipv6_mode: u8,
    pub allow_host: u8,
    /// 1 in N new flows that pass unreported is sent as a pass event; 0: none.
    pub pass_sample_every: u16,
    pub ct_tcp_s: u32,
    pub ct_udp_s: u32,
    pub ct_icmp_s: u32,
    pub ct_closing_s: u32,
}

/// `struct ma_counter`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CounterValue {
    pub packets: u64,
    pub bytes: u64,
}

/// `struct ma_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawEvent {
    pub timestamp_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub ifindex: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_spiffe_id: u32,
    pub dst_spiffe_id: u32,
    pub kind: u8,
    pub counter: u8,
    pub protocol: u8,
    pub auth: u8,
    pub pad: u32,
}

/// `struct ma_spiffe_name`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SpiffeName {
    pub len: u32,
    pub id: [u8; SPIFFE_ID_MAX],
}

impl SpiffeName {
    /// `None` when `id` is longer than the SPIFFE limit.
    pub fn new(id: &str) -> Option<Self> {
        let bytes = id.as_bytes();
        if bytes.len() > SPIFFE_ID_MAX {
            return None;
        }
        let mut name = SpiffeName { len: bytes.len() as u32, id: [0; SPIFFE_ID_MAX] };
        name.id[..bytes.len()].copy_from_slice(bytes);
        Some(name)
    }

    /// The ID, lossily decoded; a corrupt length is clamped.
    pub fn as_string(&self) -> String {
        let len = (self.len as usize).min(SPIFFE_ID_MAX);
        String::from_utf8_lossy(&self.id[..len]).into_owned()
    }
}

// SAFETY: every type is repr(C), made of integers only, and has no implicit padding (the
// explicit `pad` fields fill it), so any bit pattern is valid and all bytes are initialised.
unsafe impl aya::Pod for EndpointValue {}
unsafe impl aya::Pod for PolicyKeyData {}
unsafe impl aya::Pod for PolicyValue {}
unsafe impl aya::Pod for AuthKey {}
unsafe impl aya::Pod for AuthValue {}
unsafe impl aya::Pod for TagKey {}
unsafe impl aya::Pod for TagValue {}
unsafe impl aya::Pod for CtKey {}
unsafe impl aya::Pod for CtValue {}
unsafe impl aya::Pod for IfaceValue {}
unsafe impl aya::Pod for ConfigValue {}
unsafe impl aya::Pod for CounterValue {}
unsafe impl aya::Pod for RawEvent {}
unsafe impl aya::Pod for SpiffeName {}

/// `MA_AUTH_*` of a requirement.
pub fn auth_number(req: AuthRequirement) -> u8 {
    req as u8
}

/// The requirement of an `MA_AUTH_*` number; unknown numbers read as the strictest.
pub fn auth_requirement(n: u8) -> AuthRequirement {
    match n {
        0 => AuthRequirement::None,
        1 => AuthRequirement::Permissive,
        _ => AuthRequirement::Required,
    }
}

/// `MA_PROTO_*` of a table protocol.
pub fn protocol_number(p: TableProtocol) -> u16 {
    p as u16
}

macro_rules! counters {
    ($($variant:ident = $value:literal, $c:literal, $name:literal, $doc:literal;)+) => {
        /// What the programs count packets under (`MA_C_*`), one slot of the counters map each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u32)]
        pub enum Counter {
            $(#[doc = $doc] $variant = $value,)+
        }

        impl Counter {
            /// Every counter, in slot order.
            pub const ALL: &'static [Counter] = &[$(Counter::$variant,)+];

            /// The counter's name in `meshauthctl status` and in metrics.
            pub fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name,)+ }
            }

            /// The C constant's name.
            pub fn c_name(self) -> &'static str {
                match self { $(Counter::$variant => $c,)+ }
            }

            /// The counter of a slot number, if it is one.
            pub fn from_slot(slot: u32) -> Option<Counter> {
                match slot { $($value => Some(Counter::$variant),)+ _ => None }
            }

            /// Whether packets counted here were dropped.
            pub fn is_drop(self) -> bool {
                self.name().starts_with("drop_")
            }
        }
    };
}

impl serde::Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

counters! {
    PassNotMesh = 0, "MA_C_PASS_NOT_MESH", "pass_not_mesh", "Destination is not a meshauth pod.";
    PassNoPolicy = 1, "MA_C_PASS_NO_POLICY", "pass_no_policy", "Destination neither isolated nor requiring authentication.";
    PassPolicy = 2, "MA_C_PASS_POLICY", "pass_policy", "Allowed by policy, no authentication needed.";
    PassAuthenticated = 3, "MA_C_PASS_AUTHENTICATED", "pass_authenticated", "Allowed, the pair is authenticated.";
    PassPermissive = 4, "MA_C_PASS_PERMISSIVE", "pass_permissive_unauthenticated", "Would be dropped for missing authentication; passed under Permissive.";
    PassCtReply = 5, "MA_C_PASS_CT_REPLY", "pass_ct_reply", "Reply of a flow the pod started.";
    PassCtEstablished = 6, "MA_C_PASS_CT_ESTABLISHED", "pass_ct_established", "Later packet of an admitted flow.";
    PassFragment = 7, "MA_C_PASS_FRAGMENT", "pass_fragment", "Later fragment of a first fragment that passed.";
    PassFromPod = 8, "MA_C_PASS_FROM_POD", "pass_from_pod", "Sent by a pod with its own source address.";
    PassArp = 9, "MA_C_PASS_ARP", "pass_arp", "ARP.";
    PassIpv6 = 10, "MA_C_PASS_IPV6", "pass_ipv6", "IPv6 passed (neighbour discovery, or the pass setting).";
    DropDenied = 11, "MA_C_DROP_DENIED", "drop_denied", "No policy entry allows it.";
    DropAuthMissing = 12, "MA_C_DROP_AUTH_MISSING", "drop_auth_missing", "Authentication required, the pair is not authenticated.";
    DropAuthExpired = 13, "MA_C_DROP_AUTH_EXPIRED", "drop_auth_expired", "Authentication required, the pair's authentication expired.";
    DropSpoofed = 14, "MA_C_DROP_SPOOFED", "drop_spoofed", "A pod sent with a source address not its own.";
    DropFragment = 15, "MA_C_DROP_FRAGMENT", "drop_fragment", "Later fragment whose first fragment did not pass.";
    DropIpv6 = 16, "MA_C_DROP_IPV6", "drop_ipv6", "IPv6 other than neighbour discovery, under the drop setting.";
    DropMalformed = 17, "MA_C_DROP_MALFORMED", "drop_malformed", "Truncated headers.";
    DropUnsupportedL2 = 18, "MA_C_DROP_UNSUPPORTED_L2", "drop_unsupported_l2", "Neither IPv4, IPv6 nor ARP.";
    EventsSent = 19, "MA_C_EVENTS_SENT", "events_sent", "Events written to the ring buffer.";
    EventsRateLimited = 20, "MA_C_EVENTS_RATE_LIMITED", "events_rate_limited", "Events not written: the per-CPU budget was spent.";
    EventsLost = 21, "MA_C_EVENTS_LOST", "events_lost", "Events not written: the ring buffer was full.";
    PassHost = 22, "MA_C_PASS_HOST", "pass_host", "From this node's own address to its pod (the kubelet's probes).";
    DropWrongIface = 23, "MA_C_DROP_WRONG_IFACE", "drop_wrong_interface", "Leaving through an interface not registered for the destination pod.";
    DropTagMissing = 24, "MA_C_DROP_TAG_MISSING", "drop_tag_missing", "A SYN from another node that needs authentication carries no connection tag.";
    DropTagInvalid = 25, "MA_C_DROP_TAG_INVALID", "drop_tag_invalid", "A SYN from another node carries a connection tag that does not verify with the pair's keys.";
    DropSynNotFromPod = 26, "MA_C_DROP_SYN_NOT_FROM_POD", "drop_syn_not_from_pod", "A SYN with a local pod's source address that the pod's veth never sent.";
    PassUntaggedPermissive = 27, "MA_C_PASS_UNTAGGED_PERMISSIVE", "pass_untagged_permissive", "A SYN without a valid proof of its source, passed under Permissive.";
    TagWritten = 28, "MA_C_TAG_WRITTEN", "tag_written", "Uplink: a local pod's SYN was tagged.";
    TagNoKey = 29, "MA_C_TAG_NO_KEY", "tag_no_key", "Uplink: a local pod's SYN to a mesh pod left untagged, no key for the pair.";
    TagNoRoom = 30, "MA_C_TAG_NO_ROOM", "tag_no_room", "Uplink: a local pod's SYN left untagged, no room for the option (or it carries data).";
    PassAudit = 31, "MA_C_PASS_AUDIT", "pass_audit", "An audited MeshPolicy would deny it (no rule admits it, or the authentication its rule requires is missing); passed.";
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;
    use std::mem::{offset_of, size_of};

    const C_LAYOUT: &str = include_str!(concat!(env!("OUT_DIR"), "/c_layout.txt"));

    /// Renders the Rust side in the format of `bpf/layout.c`.
    fn rust_layout() -> String {
        let mut s = String::new();
        macro_rules! size {
            ($c:literal, $t:ty) => {
                writeln!(s, "{} size {}", $c, size_of::<$t>()).unwrap()
            };
        }
        macro_rules! field {
            ($c:literal, $t:ty, $f:ident) => {
                field!($c, $t, $f, 0)
            };
            ($c:literal, $t:ty, $f:ident, $shift:expr) => {
                writeln!(s, "{}.{} {}", $c, stringify!($f), offset_of!($t, $f) + $shift).unwrap()
            };
        }
        macro_rules! constant {
            ($c:literal, $v:expr) => {
                writeln!(s, "{} {}", $c, $v).unwrap()
            };
        }
        size!("ma_endpoint_value", EndpointValue);
        field!("ma_endpoint_value", EndpointValue, security_identity);
        field!("ma_endpoint_value", EndpointValue, spiffe_id);
        field!("ma_endpoint_value", EndpointValue, ifindex);
        field!("ma_endpoint_value", EndpointValue, flags);
        field!("ma_endpoint_value", EndpointValue, mutual_auth);
        // aya's lpm_trie::Key<PolicyKeyData> is { u32 prefix_len; PolicyKeyData data } packed.
        size!("ma_policy_key", aya::maps::lpm_trie::Key<PolicyKeyData>);
        writeln!(s, "ma_policy_key.prefixlen 0").unwrap();
        field!("ma_policy_key", PolicyKeyData, dst_identity, 4);
        field!("ma_policy_key", PolicyKeyData, src_identity, 4);
        field!("ma_policy_key", PolicyKeyData, protocol, 4);
        field!("ma_policy_key", PolicyKeyData, port, 4);
        size!("ma_policy_value", PolicyValue);
        field!("ma_policy_value", PolicyValue, auth);
        size!("ma_auth_key", AuthKey);
        field!("ma_auth_key", AuthKey, dst_spiffe_id);
        field!("ma_auth_key", AuthKey, src_spiffe_id);
        field!("ma_auth_key", AuthKey, src_node);
        size!("ma_auth_value", AuthValue);
        field!("ma_auth_value", AuthValue, expiry_ns);
        field!("ma_auth_value", AuthValue, key);
        field!("ma_auth_value", AuthValue, prev_key);
        field!("ma_auth_value", AuthValue, prev_until_ns);
        size!("ma_tag_key", TagKey);
        field!("ma_tag_key", TagKey, src_spiffe_id);
        field!("ma_tag_key", TagKey, dst_spiffe_id);
        field!("ma_tag_key", TagKey, dst_node);
        size!("ma_tag_value", TagValue);
        field!("ma_tag_value", TagValue, expiry_ns);
        field!("ma_tag_value", TagValue, key);
        field!("ma_tag_value", TagValue, prev_key);
        field!("ma_tag_value", TagValue, key_from_ns);
        writeln!(s, "ma_syn_key size 12").unwrap();
        writeln!(s, "ma_syn_value size 16").unwrap();
        size!("ma_ct_key", CtKey);
        field!("ma_ct_key", CtKey, saddr);
        field!("ma_ct_key", CtKey, daddr);
        field!("ma_ct_key", CtKey, sport);
        field!("ma_ct_key", CtKey, dport);
        field!("ma_ct_key", CtKey, protocol);
        size!("ma_ct_value", CtValue);
        field!("ma_ct_value", CtValue, last_seen_ns);
        field!("ma_ct_value", CtValue, policy_epoch);
        field!("ma_ct_value", CtValue, dst_spiffe_id);
        field!("ma_ct_value", CtValue, src_spiffe_id);
        field!("ma_ct_value", CtValue, ifindex);
        field!("ma_ct_value", CtValue, auth);
        field!("ma_ct_value", CtValue, kind);
        field!("ma_ct_value", CtValue, closing);
        field!("ma_ct_value", CtValue, audit);
        // The fragments map is the program's alone; only its size matters to the loader.
        writeln!(s, "ma_frag_key size 12").unwrap();
        writeln!(s, "ma_clock size 16").unwrap();
        size!("ma_iface_value", IfaceValue);
        field!("ma_iface_value", IfaceValue, pod_ip);
        field!("ma_iface_value", IfaceValue, attach_mode);
        size!("ma_config", ConfigValue);
        field!("ma_config", ConfigValue, policy_epoch);
        field!("ma_config", ConfigValue, events_per_sec);
        field!("ma_config", ConfigValue, ipv6_mode);
        field!("ma_config", ConfigValue, allow_host);
        field!("ma_config", ConfigValue, pass_sample_every);
        field!("ma_config", ConfigValue, ct_tcp_s);
        field!("ma_config", ConfigValue, ct_udp_s);
        field!("ma_config", ConfigValue, ct_icmp_s);
        field!("ma_config", ConfigValue, ct_closing_s);
        size!("ma_counter", CounterValue);
        field!("ma_counter", CounterValue, packets);
        field!("ma_counter", CounterValue, bytes);
        size!("ma_event", RawEvent);
        field!("ma_event", RawEvent, timestamp_ns);
        field!("ma_event", RawEvent, saddr);
        field!("ma_event", RawEvent, daddr);
        field!("ma_event", RawEvent, sport);
        field!("ma_event", RawEvent, dport);
        field!("ma_event", RawEvent, ifindex);
        field!("ma_event", RawEvent, src_identity);
        field!("ma_event", RawEvent, dst_identity);
        field!("ma_event", RawEvent, src_spiffe_id);
        field!("ma_event", RawEvent, dst_spiffe_id);
        field!("ma_event", RawEvent, kind);
        field!("ma_event", RawEvent, counter);
        field!("ma_event", RawEvent, protocol);
        field!("ma_event", RawEvent, auth);
        size!("ma_spiffe_name", SpiffeName);
        field!("ma_spiffe_name", SpiffeName, len);
        field!("ma_spiffe_name", SpiffeName, id);
        for c in Counter::ALL {
            writeln!(s, "{} {}", c.c_name(), *c as u32).unwrap();
        }
        use crate::events::EventKind;
        for k in EventKind::ALL {
            writeln!(s, "{} {}", k.c_name(), *k as u8).unwrap();
        }
        constant!("MA_AUTH_NONE", auth_number(AuthRequirement::None));
        constant!("MA_AUTH_PERMISSIVE", auth_number(AuthRequirement::Permissive));
        constant!("MA_AUTH_REQUIRED", auth_number(AuthRequirement::Required));
        constant!("MA_CT_REPLY", CT_REPLY);
        constant!("MA_CT_ADMITTED", CT_ADMITTED);
        constant!("MA_CLOCK_SLACK_NS", CLOCK_SLACK_NS);
        constant!("MA_ATTACH_NONE", ATTACH_NONE);
        constant!("MA_ATTACH_TCX", ATTACH_TCX);
        constant!("MA_ATTACH_NETLINK", ATTACH_NETLINK);
        constant!("MA_IPV6_DROP", IPV6_DROP);
        constant!("MA_IPV6_PASS", IPV6_PASS);
        constant!("MA_EP_ISOLATED", EP_ISOLATED);
        constant!("MA_EP_AUDIT", EP_AUDIT);
        constant!("MA_SPIFFE_ID_MAX", SPIFFE_ID_MAX);
        constant!("MA_C_COUNT", Counter::ALL.len());
        constant!("MA_COUNTER_SLOTS", COUNTER_SLOTS);
        constant!("MA_THIS_NODE", THIS_NODE);
        constant!("MA_POLICY_FIXED_BITS", POLICY_FIXED_BITS);
        constant!("MA_TAG_OPT_KIND", TAG_OPT_KIND);
        constant!("MA_TAG_OPT_LEN", TAG_OPT_LEN);
        constant!("MA_TAG_EXID", TAG_EXID);
        constant!("MA_TAG_SLOT_SHIFT", TAG_SLOT_SHIFT);
        constant!("MA_TAG_MAC_LEN", TAG_MAC_LEN);
        constant!("MA_SYN_ORIGIN_TTL_NS", SYN_ORIGIN_TTL_NS);
        s
    }

    #[test]
    fn layout_matches_c_header() {
        let rust = rust_layout();
        for (c, r) in C_LAYOUT.lines().zip(rust.lines()) {
            assert_eq!(c, r, "C layout (left) and Rust layout (right) differ");
        }
        assert_eq!(C_LAYOUT.lines().count(), rust.lines().count(), "C:\n{C_LAYOUT}\nRust:\n{rust}");
    }

    #[test]
    fn protocol_numbers_match_the_tables() {
        assert_eq!(protocol_number(TableProtocol::Tcp), 6);
        assert_eq!(protocol_number(TableProtocol::Udp), 17);
        assert_eq!(protocol_number(TableProtocol::Icmp), 1);
        assert_eq!(protocol_number(TableProtocol::Other), 0);
    }

    #[test]
    fn ip_keys_are_network_order() {
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(ip_key(ip).to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(key_ip(ip_key(ip)), ip);
    }
}
