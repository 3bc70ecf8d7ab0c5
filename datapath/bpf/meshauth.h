/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The meshauth datapath ABI: every map key, map value, event and constant that the TC programs
 * share with the Rust loader. This header is the one definition. `src/abi.rs` mirrors it field
 * for field, and `abi::tests::layout_matches_c_header` compares the Rust sizes and offsets with
 * what the C compiler lays out for the structs below (build.rs compiles bpf/layout.c, which
 * prints them). Change a struct here, change it there, and the test tells you if they differ.
 *
 * Byte order: IPv4 addresses and L4 ports are network order (__be*), as they sit in the packet,
 * so the programs never swap bytes. Everything else is host order.
 *
 * Time: every timestamp and expiry is CLOCK_BOOTTIME in nanoseconds (bpf_ktime_get_boot_ns in
 * the program, clock_gettime(CLOCK_BOOTTIME) in userspace), so the agent can compute expiries
 * the program checks, and a suspended machine does not extend an authentication.
 */
#ifndef MESHAUTH_H
#define MESHAUTH_H

#include <linux/types.h>

/* Mirrors meshauth_policy::tables. */
#define MA_ANY_IDENTITY 0
#define MA_WORLD_IDENTITY 1
#define MA_NO_SPIFFE_ID 0

/* Authentication requirement, ordered: the stricter one is the larger number. */
#define MA_AUTH_NONE 0
#define MA_AUTH_PERMISSIVE 1
#define MA_AUTH_REQUIRED 2

/* Table protocol numbers (meshauth_policy::tables::TableProtocol). */
#define MA_PROTO_OTHER 0
#define MA_PROTO_ICMP 1
#define MA_PROTO_TCP 6
#define MA_PROTO_UDP 17

/* endpoints: pod IPv4 address (__be32) -> ma_endpoint_value. */
#define MA_EP_ISOLATED (1 << 0) /* some enforced MeshPolicy selects the pod */
#define MA_EP_AUDIT (1 << 1) /* only audited MeshPolicies select it: nothing dropped, reported */
struct ma_endpoint_value {
	__u32 security_identity;
	__u32 spiffe_id;
	__u32 ifindex; /* host-side interface of a pod on this node; 0 for other pods */
	__u8 flags;
	__u8 mutual_auth; /* MA_AUTH_* */
	__u16 pad;
};

/*
 * endpoint_nodes: pod IPv4 address -> the address of the agent of the node the pod runs on, as
 * this node's agent reaches it (MA_THIS_NODE for this node's own pods, which the loader writes
 * for every registered interface). A pod with no entry has no node whose proof could count.
 */
#define MA_THIS_NODE 0

/*
 * policy: LPM trie. The prefix covers dst_identity, src_identity and protocol completely (80
 * bits) and then the leading bits of the big-endian port, so a port range is stored as the
 * aligned blocks of meshauth_policy::tables::port_range_prefixes.
 */
#define MA_POLICY_FIXED_BITS 80
struct ma_policy_key {
	__u32 prefixlen;
	__u32 dst_identity;
	__u32 src_identity; /* or MA_ANY_IDENTITY */
	__u16 protocol; /* MA_PROTO_* */
	__be16 port; /* 0 for ICMP and other protocols */
};
struct ma_policy_value {
	__u8 auth; /* MA_AUTH_*; every entry allows, absence denies */
	__u8 pad[3];
};

/* auth: a pair proven by a handshake with the agent of one node hosting the source identity,
 * when that proof ends, and its connection keys. A packet from a pod counts as authenticated
 * only by the proof of the node its source address is on (endpoint_nodes), and a TCP SYN from
 * another node only when its tag verifies with that proof's key. */
struct ma_auth_key {
	__u32 dst_spiffe_id;
	__u32 src_spiffe_id;
	__be32 src_node; /* endpoint_nodes[source address]; MA_THIS_NODE for this node's pods */
};
struct ma_auth_value {
	__u64 expiry_ns; /* CLOCK_BOOTTIME */
	__u64 key[2]; /* SipHash key from the latest handshake (TLS exporter) */
	__u64 prev_key[2]; /* the key before it, accepted until prev_until_ns */
	__u64 prev_until_ns; /* CLOCK_BOOTTIME; 0: no previous key */
};

/*
 * tag_keys: on the source's node, (source, destination) SPIFFE-ID numbers and the destination's
 * node -> the key its pods' SYNs to that destination on that node are tagged with (each node
 * hosting the destination identity handshakes on its own, so each has its own key). `prev_key` is used until `key_from_ns`, so the
 * destination has installed the new key (it keeps the old one a while longer) before any SYN
 * carries it.
 */
struct ma_tag_key {
	__u32 src_spiffe_id;
	__u32 dst_spiffe_id;
	__be32 dst_node; /* endpoint_nodes[destination address] */
};
struct ma_tag_value {
	__u64 expiry_ns; /* CLOCK_BOOTTIME: no tag after it */
	__u64 key[2];
	__u64 prev_key[2];
	__u64 key_from_ns; /* CLOCK_BOOTTIME: key is used from then on, prev_key before */
};

/*
 * The connection tag: a TCP option in a SYN, RFC 6994 experimental (kind 253, ExID), 12 bytes:
 *   253, 12, ExID (2 bytes), slot (1 byte: low bits of the time slot), MAC (7 bytes)
 * MAC = the first 7 bytes (little-endian) of SipHash-2-4(key, m), m the 24 bytes
 *   saddr daddr sport dport seq (as in the packet, network order), slot (u32 LE), 0 (u32)
 * The slot is CLOCK_TAI seconds >> MA_TAG_SLOT_SHIFT (about half a minute); the destination
 * takes the slot within one of its own whose low byte the option carries.
 */
#define MA_TAG_OPT_KIND 253
#define MA_TAG_OPT_LEN 12
#define MA_TAG_EXID 0x4d41 /* "MA"; not IANA-registered */
#define MA_TAG_SLOT_SHIFT 35 /* 2^35 ns = 34.4 s */
#define MA_TAG_MAC_LEN 7

/* syn_origin: LRU, SYNs that left a local pod through its own veth (written by from_pod),
 * keyed on what no address translation on the way changes: a local source's SYN reaches a
 * local pod, or is tagged on the uplink, only when listed. */
struct ma_syn_key {
	__be32 saddr;
	__be32 seq;
	__be16 sport;
	__u16 pad;
};
struct ma_syn_value {
	__u64 seen_ns; /* CLOCK_BOOTTIME */
	__u32 ifindex; /* the veth it came in on: must be the one registered for saddr */
	__u32 pad;
};
#define MA_SYN_ORIGIN_TTL_NS (10ULL * 1000000000ULL) /* covers a SYN's retransmissions */

/*
 * conntrack: LRU, keyed on the tuple as it arrives at the pod's to_pod hook (source = the
 * peer, destination = the pod), so to_pod needs one lookup whichever side started the flow.
 *   MA_CT_REPLY: written by from_pod only for a flow the pod itself starts (a TCP SYN, a UDP
 *   datagram or an ICMP echo request with no entry yet); the peer's answers pass while the
 *   pod and the peer are still the endpoints they were (checked again when the epoch moves).
 *   MA_CT_ADMITTED: written by to_pod for a flow it admitted; later packets pass after the
 *   pair's authentication is checked again, as long as the policy epoch is unchanged.
 * from_pod never writes over an entry, so an admission is never turned into a reply. A TCP
 * SYN is checked in full (and replaces the entry only when it passes), a RST or a FIN shortens
 * the idle timeout to ct_closing_s (a RST is not trusted to delete: it may be spoofed); an
 * entry idle longer than its timeout is deleted by whichever hook meets it first. The loader flushes the entries of a pod address when the pod goes.
 * A key's destination is always the pod that owns the entry, so the two pods of a same-node
 * connection never share one. ICMP echo: the id is the source "port" of a request and the
 * destination "port" of a reply, so a pod's echo reply never admits the peer's requests.
 */
#define MA_CT_REPLY 1
#define MA_CT_ADMITTED 2
struct ma_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 protocol; /* IP protocol number */
	__u8 pad[3];
};
struct ma_ct_value {
	__u64 last_seen_ns; /* CLOCK_BOOTTIME (coarse), refreshed at most once a second */
	__u32 policy_epoch; /* ma_config.policy_epoch when written; stale -> checked again */
	__u32 dst_spiffe_id; /* the pair: the pod's and the peer's SPIFFE-ID numbers */
	__u32 src_spiffe_id;
	__u32 ifindex; /* the pod's veth the flow's packets to the pod leave through */
	__u8 auth; /* MA_AUTH_* the admission required (MA_AUTH_NONE for replies) */
	__u8 kind; /* MA_CT_* */
	__u8 closing; /* a FIN was seen: the closing timeout applies */
	__u8 audit; /* an audited rule required the authentication: a lack of it is MA_C_PASS_AUDIT */
	__u32 pad2;
};

/* fragments: LRU, IPv4 first fragments that passed; later fragments pass only when listed. */
struct ma_frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 protocol;
	__u8 pad;
};
struct ma_frag_value {
	__u32 seen;
};

/* interfaces: host-side ifindex -> the only source address its pod may use. An interface
 * stays listed (MA_ATTACH_NONE) after its programs are detached: packets already inside a
 * program when it is detached must still find their pod's address. */
#define MA_ATTACH_NONE 0
#define MA_ATTACH_TCX 1
#define MA_ATTACH_NETLINK 2
struct ma_iface_value {
	__be32 pod_ip;
	__u8 attach_mode; /* MA_ATTACH_* */
	__u8 pad[3];
};

/* config: a one-element array the loader writes. */
#define MA_IPV6_DROP 0 /* drop IPv6 except neighbour discovery (the default) */
#define MA_IPV6_PASS 1 /* pass all IPv6 unchecked */
struct ma_config {
	__u32 policy_epoch; /* bumped by the loader whenever endpoints or policy change */
	__u32 events_per_sec; /* per CPU; 0 = no events */
	__u8 ipv6_mode; /* MA_IPV6_* */
	__u8 allow_host; /* 1: this node's own addresses reach its pods (kubelet probes) */
	__u16 pass_sample_every; /* 1 in N new flows that pass unreported is sent as MA_EV_PASS; 0: none */
	/* conntrack idle timeouts, seconds */
	__u32 ct_tcp_s;
	__u32 ct_udp_s;
	__u32 ct_icmp_s;
	__u32 ct_closing_s; /* TCP after a FIN */
};

/*
 * clock: per-CPU cache of CLOCK_BOOTTIME, refreshed when jiffies move. Reading the clock
 * costs more than any map lookup on a virtual machine; a value at most one tick old is read
 * for free. Authentications are therefore treated as expired MA_CLOCK_SLACK_NS early (a tick
 * is at most 10 ms, HZ >= 100), so a pair never passes after its expiry.
 */
#define MA_CLOCK_SLACK_NS 10000000ULL
struct ma_clock {
	__u64 jiffies;
	__u64 boot_ns;
};

/* event_budget: per-CPU rate limit of the ring buffer. */
struct ma_event_budget {
	__u64 window_start_ns;
	__u32 sent;
	__u32 pad;
};

/* counters: per-CPU array indexed by MA_C_*, what happened to how many packets. */
#define MA_C_PASS_NOT_MESH 0 /* destination is not a meshauth pod */
#define MA_C_PASS_NO_POLICY 1 /* destination neither isolated nor requiring auth */
#define MA_C_PASS_POLICY 2 /* allowed by policy, no authentication needed */
#define MA_C_PASS_AUTHENTICATED 3 /* allowed, authenticated pair present */
#define MA_C_PASS_PERMISSIVE 4 /* would be dropped for missing auth, passed (Permissive) */
#define MA_C_PASS_CT_REPLY 5 /* reply of a flow the pod started */
#define MA_C_PASS_CT_ESTABLISHED 6 /* later packet of an admitted flow */
#define MA_C_PASS_FRAGMENT 7 /* later fragment of a passed first fragment */
#define MA_C_PASS_FROM_POD 8 /* from the pod, source address is its own */
#define MA_C_PASS_ARP 9
#define MA_C_PASS_IPV6 10
#define MA_C_DROP_DENIED 11 /* no policy entry allows it */
#define MA_C_DROP_AUTH_MISSING 12 /* authentication required, pair not authenticated */
#define MA_C_DROP_AUTH_EXPIRED 13 /* authentication required, pair's entry expired */
#define MA_C_DROP_SPOOFED 14 /* from a pod with a source address not its own */
#define MA_C_DROP_FRAGMENT 15 /* later fragment whose first fragment did not pass */
#define MA_C_DROP_IPV6 16
#define MA_C_DROP_MALFORMED 17 /* truncated headers */
#define MA_C_DROP_UNSUPPORTED_L2 18 /* neither IPv4, IPv6 nor ARP */
#define MA_C_EVENTS_SENT 19
#define MA_C_EVENTS_RATE_LIMITED 20
#define MA_C_EVENTS_LOST 21 /* ring buffer full */
#define MA_C_PASS_HOST 22 /* from this node's own address (allow_host) */
#define MA_C_DROP_WRONG_IFACE 23 /* leaving through an interface not registered for the destination */
#define MA_C_DROP_TAG_MISSING 24 /* a SYN from another node that needs authentication carries no tag */
#define MA_C_DROP_TAG_INVALID 25 /* ... carries a tag that does not verify with the pair's keys */
#define MA_C_DROP_SYN_NOT_FROM_POD 26 /* a SYN with a local pod's source that its veth never sent */
#define MA_C_PASS_UNTAGGED_PERMISSIVE 27 /* untagged or bad tag, passed under Permissive */
#define MA_C_TAG_WRITTEN 28 /* uplink: a local pod's SYN tagged */
#define MA_C_TAG_NO_KEY 29 /* uplink: a local pod's SYN to a mesh pod, no key for the pair */
#define MA_C_TAG_NO_ROOM 30 /* uplink: no room for the option (or a SYN with data) */
#define MA_C_PASS_AUDIT 31 /* an audited policy would deny it, or its rule's authentication is missing (packets) */
#define MA_C_COUNT 32
#define MA_COUNTER_SLOTS 32 /* map size; full: a new counter needs a bigger map (a layout change) */
struct ma_counter {
	__u64 packets;
	__u64 bytes;
};

/* events: ring buffer records. */
#define MA_EV_DENIED 1
#define MA_EV_AUTH_REQUIRED 2 /* pair not authenticated (dropped, or passed when Permissive) */
#define MA_EV_SPOOFED 3
#define MA_EV_FRAGMENT 4
#define MA_EV_IPV6 5
#define MA_EV_UNSUPPORTED 6
#define MA_EV_TAG 7 /* a SYN's tag missing or wrong: src_* name the identity it claimed */
#define MA_EV_AUDIT 8 /* passed, counted MA_C_PASS_AUDIT: auth is MA_AUTH_NONE when no audited
		       * rule admits it, MA_AUTH_REQUIRED when the pair lacks what one requires */
#define MA_EV_PASS 9 /* a sampled new flow that passed (counter: how); within the event budget */
struct ma_event {
	__u64 timestamp_ns; /* CLOCK_BOOTTIME */
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 ifindex;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 src_spiffe_id;
	__u32 dst_spiffe_id;
	__u8 kind; /* MA_EV_* */
	__u8 counter; /* MA_C_* the packet was counted under: tells drop from permissive pass */
	__u8 protocol;
	__u8 auth; /* the requirement that applied */
	__u32 pad;
};

/* spiffe_names: SPIFFE-ID number -> the ID, for people reading the maps (unused by the programs). */
#define MA_SPIFFE_ID_MAX 2048 /* the SPIFFE ID spec's limit */
struct ma_spiffe_name {
	__u32 len;
	__u8 id[MA_SPIFFE_ID_MAX];
};

#endif /* MESHAUTH_H */
