// SPDX-License-Identifier: Apache-2.0
/*
 * meshauth TC programs, attached to the host side of each pod's veth:
 *   to_pod   (tcx egress: traffic on its way into the pod)  policy and authentication
 *   from_pod (tcx ingress: traffic the pod sent)             anti-spoofing, conntrack for replies
 *
 * The logic is deliberately thin: parse, look up, decide, count. Every table is computed in
 * userspace (meshauth_policy::tables), every rule the lookups implement is described there and
 * in the datapath crate's documentation. A pass returns TC_ACT_UNSPEC (TCX_NEXT), not
 * TC_ACT_OK, so other programs on the same hook still get their say; a drop is TC_ACT_SHOT.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/icmpv6.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "meshauth.h"

#define PASS TC_ACT_UNSPEC
#define DROP TC_ACT_SHOT

/* linux/icmp.h drags in glibc headers a BPF target cannot build; these are all we need. */
#define ICMP_ECHOREPLY 0
#define ICMP_ECHO 8
struct icmp_echo_hdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;
	__be16 sequence;
};

/* An ARP packet for IPv4 over Ethernet, up to the sender's protocol address. */
struct arp_ipv4 {
	__be16 hw_type;
	__be16 proto_type;
	__u8 hw_len;
	__u8 proto_len;
	__be16 op;
	__u8 sender_mac[ETH_ALEN];
	__be32 sender_ip;
} __attribute__((packed));

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define NSEC_PER_SEC 1000000000ULL

/* Default sizes; the loader sets the real ones from its configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __be32);
	__type(value, struct ma_endpoint_value);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __be32);
	__type(value, __be32);
} endpoint_nodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ma_policy_key);
	__type(value, struct ma_policy_value);
} policy SEC(".maps");

/* Not preallocated: pairs arrive at handshake rate, and half a million preallocated
 * elements would pin tens of MB of kernel memory on every node whatever its size. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ma_auth_key);
	__type(value, struct ma_auth_value);
} auth SEC(".maps");

/* Source side of connection tags: one entry per (local source, destination, destination's
 * node) this node's agent answered a handshake for. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ma_tag_key);
	__type(value, struct ma_tag_value);
} tag_keys SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ma_syn_key);
	__type(value, struct ma_syn_value);
} syn_origin SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct ma_ct_key);
	__type(value, struct ma_ct_value);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct ma_frag_key);
	__type(value, struct ma_frag_value);
} fragments SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct ma_iface_value);
} interfaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ma_config);
} config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ma_event_budget);
} event_budget SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ma_clock);
} clock SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MA_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, struct ma_counter);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* The node's own IPv4 addresses (value unused): sources the kubelet's probes come from. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __be32);
	__type(value, __u32);
} host_addrs SEC(".maps");

/* Read by userspace only (meshauthctl shows names instead of numbers); the programs never
 * touch it. Living in the same object keeps its pinning and sizing with the other maps. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct ma_spiffe_name);
} spiffe_names SEC(".maps");

/* The parts of an IPv4 packet the decision needs. */
struct flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* ICMP echo: the echo id, in both */
	__be16 dport;
	__be16 frag_id;
	__u8 protocol; /* IP protocol number */
	__u8 table_proto; /* MA_PROTO_* */
	__u8 tracked; /* TCP, UDP, ICMP echo: has a conntrack tuple */
	__u8 tcp_syn; /* SYN without ACK: a new TCP connection */
	__u8 tcp_fin;
	__u8 tcp_rst;
	__u8 icmp_request; /* ICMP echo request (starts a flow; a reply never does) */
	__u8 first_fragment; /* MF set, offset 0 */
	__u8 later_fragment; /* offset != 0: no L4 header */
	__be32 tcp_seq;
	__u16 l4_off; /* from the start of the frame */
	__u16 tcp_hlen; /* TCP header with options, bytes */
};

static __always_inline void count(__u32 idx, __u64 bytes)
{
	struct ma_counter *c = bpf_map_lookup_elem(&counters, &idx);

	if (c) { /* per-CPU: no atomics needed */
		c->packets++;
		c->bytes += bytes;
	}
}

/* CLOCK_BOOTTIME at most one tick old (see struct ma_clock). */
static __always_inline __u64 boot_ns_coarse(void)
{
	__u32 zero = 0;
	struct ma_clock *c = bpf_map_lookup_elem(&clock, &zero);
	__u64 j = bpf_jiffies64();

	if (!c)
		return bpf_ktime_get_boot_ns();
	if (c->jiffies != j) {
		c->boot_ns = bpf_ktime_get_boot_ns();
		c->jiffies = j;
	}
	return c->boot_ns;
}

static __always_inline void emit(const struct ma_config *cfg, __u32 ifindex, __u8 kind, __u8 counter,
				 const struct flow *f, __u32 src_identity, __u32 dst_identity,
				 __u32 src_spiffe, __u32 dst_spiffe, __u8 auth_req)
{
	__u32 zero = 0;
	struct ma_event_budget *b = bpf_map_lookup_elem(&event_budget, &zero);
	struct ma_event *e;
	__u64 now;

	if (!b)
		return;
	/* A fixed one-second window per CPU: a flood of drops costs the ring buffer at most
	 * events_per_sec records per CPU, so the agent always sees the other CPUs' events. */
	now = boot_ns_coarse();
	if (now - b->window_start_ns >= NSEC_PER_SEC) {
		b->window_start_ns = now;
		b->sent = 0;
	}
	if (b->sent >= cfg->events_per_sec) {
		count(MA_C_EVENTS_RATE_LIMITED, 0);
		return;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(MA_C_EVENTS_LOST, 0);
		return;
	}
	b->sent++;
	e->timestamp_ns = now;
	e->saddr = f->saddr;
	e->daddr = f->daddr;
	e->sport = f->sport;
	e->dport = f->dport;
	e->ifindex = ifindex;
	e->src_identity = src_identity;
	e->dst_identity = dst_identity;
	e->src_spiffe_id = src_spiffe;
	e->dst_spiffe_id = dst_spiffe;
	e->kind = kind;
	e->counter = counter;
	e->protocol = f->protocol;
	e->auth = auth_req;
	e->pad = 0;
	bpf_ringbuf_submit(e, 0);
	count(MA_C_EVENTS_SENT, sizeof(*e));
}

static __always_inline int drop(const struct ma_config *cfg, struct __sk_buff *skb, __u8 kind,
				__u8 counter, const struct flow *f)
{
	count(counter, skb->len);
	emit(cfg, skb->ifindex, kind, counter, f, 0, 0, 0, 0, MA_AUTH_NONE);
	return DROP;
}

/* Makes the Ethernet, the largest IPv4 and a TCP header readable with direct packet access
 * (forwarded packets can arrive with only part of them in the linear area). */
static __always_inline void ensure_linear(struct __sk_buff *skb)
{
	__u32 want = ETH_HLEN + 60 + sizeof(struct tcphdr);

	/* Clamp first: a short packet that is already linear must not pay for the helper. */
	if (want > skb->len)
		want = skb->len;
	if ((long)skb->data + want <= (long)skb->data_end)
		return;
	bpf_skb_pull_data(skb, want);
}

/* 0: parsed; -1: truncated. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct flow *f)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u32 ihl;
	__u16 frag;
	void *l4;

	if ((void *)(ip + 1) > data_end)
		return -1;
	/* The EtherType says IPv4; a header that says otherwise is not one we can read. */
	if (ip->version != 4)
		return -1;
	ihl = ip->ihl * 4;
	if (ihl < sizeof(*ip))
		return -1;
	f->saddr = ip->saddr;
	f->daddr = ip->daddr;
	f->protocol = ip->protocol;
	f->frag_id = ip->id;
	frag = bpf_ntohs(ip->frag_off);
	f->later_fragment = (frag & IP_OFFSET) != 0;
	f->first_fragment = (frag & IP_MF) && !f->later_fragment;
	f->table_proto = MA_PROTO_OTHER;
	if (f->later_fragment)
		return 0; /* no L4 header: decided by the fragments map */

	l4 = (void *)ip + ihl;
	switch (ip->protocol) {
	case IPPROTO_TCP: {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > data_end)
			return -1;
		f->sport = th->source;
		f->dport = th->dest;
		f->table_proto = MA_PROTO_TCP;
		f->tracked = 1;
		f->tcp_syn = th->syn && !th->ack;
		f->tcp_fin = th->fin;
		f->tcp_rst = th->rst;
		f->tcp_seq = th->seq;
		f->l4_off = ETH_HLEN + ihl;
		f->tcp_hlen = th->doff * 4;
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > data_end)
			return -1;
		f->sport = uh->source;
		f->dport = uh->dest;
		f->table_proto = MA_PROTO_UDP;
		f->tracked = 1;
		break;
	}
	case IPPROTO_ICMP: {
		struct icmp_echo_hdr *ic = l4;

		if ((void *)(ic + 1) > data_end)
			return -1;
		f->table_proto = MA_PROTO_ICMP;
		/* The echo id is a request's source "port" and a reply's destination "port": a
		 * reply's reversed tuple is its request's, and a request never matches the entry
		 * that a reply (or a request in the other direction) would need. */
		if (ic->type == ICMP_ECHO) {
			f->sport = ic->id;
			f->dport = 0;
			f->tracked = 1;
			f->icmp_request = 1;
		} else if (ic->type == ICMP_ECHOREPLY) {
			f->sport = 0;
			f->dport = ic->id;
			f->tracked = 1;
		}
		break;
	}
	default:
		break;
	}
	return 0;
}

/* IPv6: the tables are IPv4 only, so IPv6 cannot be enforced. By default it is dropped, except
 * neighbour discovery (ICMPv6 133-137, no extension headers) that keeps the link working;
 * MA_IPV6_PASS lets it all through for clusters that accept unenforced IPv6. */
static __always_inline int handle_ipv6(struct __sk_buff *skb, const struct ma_config *cfg)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	struct flow f = {};

	if (cfg->ipv6_mode == MA_IPV6_PASS) {
		count(MA_C_PASS_IPV6, skb->len);
		return PASS;
	}
	if ((void *)(ip6 + 1) > data_end)
		return drop(cfg, skb, MA_EV_IPV6, MA_C_DROP_MALFORMED, &f);
	f.protocol = ip6->nexthdr;
	if (ip6->nexthdr == IPPROTO_ICMPV6) {
		struct icmp6hdr *ic = (void *)(ip6 + 1);

		if ((void *)(ic + 1) > data_end)
			return drop(cfg, skb, MA_EV_IPV6, MA_C_DROP_MALFORMED, &f);
		if (ic->icmp6_type >= 133 && ic->icmp6_type <= 137) {
			count(MA_C_PASS_IPV6, skb->len);
			return PASS;
		}
	}
	return drop(cfg, skb, MA_EV_IPV6, MA_C_DROP_IPV6, &f);
}


/*
 * SipHash-2-4 of the 24-byte tag message (struct ma_tag_msg, three little-endian words):
 * the reference algorithm unrolled for a fixed length, which the verifier takes as straight
 * code (no loops, no helpers).
 */
struct ma_tag_msg {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__be32 seq;
	__u32 slot;
	__u32 zero;
};

#define ROTL(x, b) (__u64)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                  \
	do {                                                                                      \
		v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                          \
		v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                             \
		v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                             \
		v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                          \
	} while (0)

static __always_inline __u64 siphash24(const __u64 key[2], const struct ma_tag_msg *msg)
{
	const __u64 *w = (const __u64 *)msg;
	__u64 v0 = 0x736f6d6570736575ULL ^ key[0];
	__u64 v1 = 0x646f72616e646f6dULL ^ key[1];
	__u64 v2 = 0x6c7967656e657261ULL ^ key[0];
	__u64 v3 = 0x7465646279746573ULL ^ key[1];
	__u64 m, b = ((__u64)sizeof(*msg)) << 56;

	m = w[0]; v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
	m = w[1]; v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
	m = w[2]; v3 ^= m; SIPROUND; SIPROUND; v0 ^= m;
	v3 ^= b; SIPROUND; SIPROUND; v0 ^= b;
	v2 ^= 0xff;
	SIPROUND; SIPROUND; SIPROUND; SIPROUND;
	return v0 ^ v1 ^ v2 ^ v3;
}

static __always_inline __u32 tag_slot_now(void)
{
	return (__u32)(bpf_ktime_get_tai_ns() >> MA_TAG_SLOT_SHIFT);
}

/* Whether `mac` (7 bytes) is the MAC of the flow's SYN under `key` in `slot`. */
static __always_inline int tag_matches(const __u64 key[2], const struct flow *f, __u32 slot,
				       const __u8 *mac)
{
	struct ma_tag_msg m = {
		.saddr = f->saddr, .daddr = f->daddr, .sport = f->sport, .dport = f->dport,
		.seq = f->tcp_seq, .slot = slot,
	};
	__u64 h = siphash24(key, &m);
	__u64 got = 0;

	__builtin_memcpy(&got, mac, MA_TAG_MAC_LEN);
	return (h & 0x00ffffffffffffffULL) == got;
}

/* The tag option of a SYN: 1 and its slot byte and MAC copied out, 0 when there is none, -1
 * when the header cannot be read. The tagger always writes it as the header's last 12 bytes
 * (it appends it), so only those are looked at: no walk over the options, and a tag placed
 * anywhere else is no tag. */
static __always_inline int find_tag(struct __sk_buff *skb, const struct flow *f, __u8 *slot_lo,
				    __u8 *mac)
{
	__u8 opt[MA_TAG_OPT_LEN];
	__u32 hlen = f->tcp_hlen;

	if (hlen < 20 + MA_TAG_OPT_LEN || hlen > 60)
		return 0;
	if (bpf_skb_load_bytes(skb, f->l4_off + hlen - MA_TAG_OPT_LEN, opt, MA_TAG_OPT_LEN) < 0)
		return -1;
	if (opt[0] != MA_TAG_OPT_KIND || opt[1] != MA_TAG_OPT_LEN || opt[2] != (MA_TAG_EXID >> 8) ||
	    opt[3] != (MA_TAG_EXID & 0xff))
		return 0;
	*slot_lo = opt[4];
	__builtin_memcpy(mac, &opt[5], MA_TAG_MAC_LEN);
	return 1;
}

/* The full slot a received slot byte stands for, when it lies within one of ours; -1 if not. */
static __always_inline long tag_slot_of(__u8 slot_lo)
{
	__u32 now = tag_slot_now();

	if ((__u8)now == slot_lo)
		return now;
	if ((__u8)(now - 1) == slot_lo)
		return now - 1;
	if ((__u8)(now + 1) == slot_lo)
		return now + 1;
	return -1;
}

/*
 * A SYN from another node that needs authentication proves its source: 0 when its tag verifies
 * with the pair's key (or the previous one, during its overlap); otherwise the drop counter.
 */
static __always_inline __u32 tag_check(struct __sk_buff *skb, const struct flow *f,
				       const struct ma_auth_value *a, __u64 now)
{
	__u8 slot_lo = 0, mac[MA_TAG_MAC_LEN] = {};
	long slot;
	int found = find_tag(skb, f, &slot_lo, mac);

	if (found == 0)
		return MA_C_DROP_TAG_MISSING;
	if (found < 0)
		return MA_C_DROP_TAG_INVALID;
	slot = tag_slot_of(slot_lo);
	if (slot < 0)
		return MA_C_DROP_TAG_INVALID;
	/* An all-zero key is no key (a pair written without one): anyone could compute its MAC. */
	if ((a->key[0] | a->key[1]) && tag_matches(a->key, f, (__u32)slot, mac))
		return 0;
	if (a->prev_until_ns > now && (a->prev_key[0] | a->prev_key[1]) &&
	    tag_matches(a->prev_key, f, (__u32)slot, mac))
		return 0;
	return MA_C_DROP_TAG_INVALID;
}

/* The link layer, the same in both directions: ARP passes, IPv6 takes its own rule, other
 * protocols and truncated frames are dropped, and an IPv4 packet is parsed into `f`. Returns
 * 1 when the caller goes on with `f`; otherwise `*verdict` is the packet's verdict. */
static __always_inline int link_layer(struct __sk_buff *skb, const struct ma_config *cfg,
				       struct flow *f, int *verdict)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end) {
		*verdict = drop(cfg, skb, MA_EV_UNSUPPORTED, MA_C_DROP_MALFORMED, f);
		return 0;
	}
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		count(MA_C_PASS_ARP, skb->len);
		*verdict = PASS;
		return 0;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		*verdict = handle_ipv6(skb, cfg);
		return 0;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		*verdict = drop(cfg, skb, MA_EV_UNSUPPORTED, MA_C_DROP_UNSUPPORTED_L2, f);
		return 0;
	}
	ensure_linear(skb);
	if (parse_ipv4(skb, f) < 0) {
		*verdict = drop(cfg, skb, MA_EV_UNSUPPORTED, MA_C_DROP_MALFORMED, f);
		return 0;
	}
	return 1;
}

/* How authenticate() treats an audited rule's requirement. */
#define MA_AUDIT_NONE 0
#define MA_AUDIT_REPORT 1
#define MA_AUDIT_COUNT 2

/* How a SYN proves it comes from the pod its source address names. */
#define MA_PROOF_NONE 0 /* not a SYN, or nothing to prove */
#define MA_PROOF_LOCAL 1 /* a local pod's: its own veth sent it (syn_origin) */
#define MA_PROOF_TAG 2 /* another node's pod: the tag */

/* Whether this SYN is one that the veth registered for its source (`ifindex`) sent: not made
 * up on this node (a packet a local socket sends has skb->sk; one forwarded from a pod's
 * namespace has none) and listed by from_pod for that very veth. The clocks may be other
 * CPUs' cached ones, a tick apart. */
static __always_inline int syn_from_pod(struct __sk_buff *skb, const struct flow *f, __u32 ifindex,
					__u64 now)
{
	struct ma_syn_key k = { .saddr = f->saddr, .seq = f->tcp_seq, .sport = f->sport };
	struct ma_syn_value *v;

	if (skb->sk)
		return 0;
	v = bpf_map_lookup_elem(&syn_origin, &k);
	return v && v->ifindex == ifindex && now + MA_CLOCK_SLACK_NS >= v->seen_ns &&
	       now - v->seen_ns < MA_SYN_ORIGIN_TTL_NS;
}

/* 0: the pair is authenticated (and a SYN proved its source); the drop counter otherwise. */
static __always_inline __u32 auth_check(struct __sk_buff *skb, const struct flow *f, __u32 dst_spiffe,
					__u32 src_spiffe, __u32 src_ifindex, __u64 now, int proof)
{
	struct ma_auth_key key = { .dst_spiffe_id = dst_spiffe, .src_spiffe_id = src_spiffe };
	struct ma_auth_value *v;
	__be32 *node;

	if (src_spiffe == MA_NO_SPIFFE_ID || dst_spiffe == MA_NO_SPIFFE_ID)
		return MA_C_DROP_AUTH_MISSING;
	/* Only the proof of the node the source address is on counts: another node hosting the
	 * same identity proved nothing of this packet's sender. */
	node = bpf_map_lookup_elem(&endpoint_nodes, &f->saddr);
	if (!node)
		return MA_C_DROP_AUTH_MISSING;
	key.src_node = *node;
	v = bpf_map_lookup_elem(&auth, &key);
	if (!v)
		return MA_C_DROP_AUTH_MISSING;
	if (v->expiry_ns <= now + MA_CLOCK_SLACK_NS)
		return MA_C_DROP_AUTH_EXPIRED;
	if (proof == MA_PROOF_TAG)
		return tag_check(skb, f, v, now);
	if (proof == MA_PROOF_LOCAL && !syn_from_pod(skb, f, src_ifindex, now))
		return MA_C_DROP_SYN_NOT_FROM_POD;
	return 0;
}

static __always_inline void remember_fragment(const struct flow *f)
{
	struct ma_frag_key key = {
		.saddr = f->saddr, .daddr = f->daddr, .id = f->frag_id, .protocol = f->protocol,
	};
	struct ma_frag_value v = { .seen = 1 };

	if (f->first_fragment)
		bpf_map_update_elem(&fragments, &key, &v, BPF_ANY);
}

/* Authentication outcome for a requirement: PASS or DROP, counted and reported. `audit`: the
 * requirement is an audited rule's, made permissive, and a lack is counted as pass_audit and
 * reported (MA_AUDIT_REPORT, a new flow: an Audit event, or a Tag event when the pair is
 * authenticated but the SYN proved nothing) or only counted (MA_AUDIT_COUNT, a later packet
 * of a flow already reported). */
static __always_inline int authenticate(struct __sk_buff *skb, const struct ma_config *cfg,
					const struct flow *f, __u8 req, __u32 src_identity,
					__u32 dst_identity, __u32 src_spiffe, __u32 dst_spiffe,
					__u32 pass_counter, __u64 now, int proof, __u32 src_ifindex,
					__u8 audit, __u8 *reported)
{
	__u32 failed = auth_check(skb, f, dst_spiffe, src_spiffe, src_ifindex, now, proof);
	/* A pair that is authenticated but whose SYN did not prove its source. */
	int unproven = failed == MA_C_DROP_TAG_MISSING || failed == MA_C_DROP_TAG_INVALID ||
		       failed == MA_C_DROP_SYN_NOT_FROM_POD;
	__u8 kind = unproven ? MA_EV_TAG : MA_EV_AUTH_REQUIRED;

	if (!failed) {
		count(pass_counter, skb->len);
		return PASS;
	}
	*reported = 1;
	if (req == MA_AUTH_REQUIRED) {
		count(failed, skb->len);
		emit(cfg, skb->ifindex, kind, failed, f, src_identity, dst_identity, src_spiffe,
		     dst_spiffe, req);
		return DROP;
	}
	/* Permissive: what Strict would drop is counted and reported, so the agent
	 * authenticates the pair, and it passes. */
	if (audit) {
		count(MA_C_PASS_AUDIT, skb->len);
		if (audit == MA_AUDIT_REPORT)
			emit(cfg, skb->ifindex, unproven ? MA_EV_TAG : MA_EV_AUDIT, MA_C_PASS_AUDIT, f,
			     src_identity, dst_identity, src_spiffe, dst_spiffe, MA_AUTH_REQUIRED);
		return PASS;
	}
	failed = unproven ? MA_C_PASS_UNTAGGED_PERMISSIVE : MA_C_PASS_PERMISSIVE;
	count(failed, skb->len);
	emit(cfg, skb->ifindex, kind, failed, f, src_identity, dst_identity, src_spiffe,
	     dst_spiffe, req);
	return PASS;
}

/* Whether an entry has been idle longer than its protocol's timeout. */
static __always_inline int ct_expired(const struct ma_config *cfg, const struct ma_ct_value *ct,
				      __u8 protocol, __u64 now)
{
	__u64 timeout_s;

	if (ct->closing)
		timeout_s = cfg->ct_closing_s;
	else if (protocol == IPPROTO_TCP)
		timeout_s = cfg->ct_tcp_s;
	else if (protocol == IPPROTO_UDP)
		timeout_s = cfg->ct_udp_s;
	else
		timeout_s = cfg->ct_icmp_s;
	return now > ct->last_seen_ns && now - ct->last_seen_ns > timeout_s * NSEC_PER_SEC;
}

/* A packet of the entry's flow, in either direction, passed: keep the entry alive (written at
 * most once a second, so established flows do not bounce the cache line on every packet); a
 * RST or a FIN starts the closing timeout. A RST does not delete the entry: the program cannot
 * tell an in-window RST from a spoofed one, and deleting would let anyone who can send with
 * the peer's address cut a pod's outbound connection for good (its mid-stream packets are
 * never cached again). A SYN of the pod's own on the tuple starts a new flow: not closing. */
static __always_inline void ct_seen(struct ma_ct_value *ct, const struct flow *f, __u64 now)
{
	if (f->tcp_rst || f->tcp_fin) {
		ct->closing = 1;
		ct->last_seen_ns = now;
		return;
	}
	if (f->tcp_syn)
		ct->closing = 0;
	if (now - ct->last_seen_ns > NSEC_PER_SEC)
		ct->last_seen_ns = now;
}

SEC("classifier")
int to_pod(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct ma_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct ma_endpoint_value *dst, *src;
	struct ma_policy_value *rule;
	struct ma_ct_value *ct = 0;
	struct ma_ct_key ct_key = {};
	struct flow f = {};
	__u32 src_identity = 0, src_spiffe;
	__u8 req = MA_AUTH_NONE;
	/* Audited policies: no rule admits the packet; the requirement is an audited rule's. */
	__u8 audit_denied = 0, audit_auth = 0;
	/* How a passing packet passed, and whether an event already reported it (for sampling). */
	__u32 passed_as = MA_C_PASS_NO_POLICY;
	__u8 reported = 0;
	__u64 now = 0;
	int verdict;

	if (!cfg) /* an array always has its element; keeps the verifier happy */
		return PASS;
	if (!link_layer(skb, cfg, &f, &verdict))
		return verdict;

	/* Conntrack first: most packets belong to established flows, and for them this one
	 * lookup is the whole decision. */
	if (f.tracked) {
		ct_key.saddr = f.saddr;
		ct_key.daddr = f.daddr;
		ct_key.sport = f.sport;
		ct_key.dport = f.dport;
		ct_key.protocol = f.protocol;
		ct = bpf_map_lookup_elem(&conntrack, &ct_key);
		if (ct) {
			now = boot_ns_coarse();
			/* An idle entry is forgotten. A SYN starts a new connection on the tuple: it
			 * is checked in full, whatever the old flow had earned, and replaces the entry
			 * only when it passes (a refused SYN leaves the pod's own flow alone). */
			if (ct_expired(cfg, ct, f.protocol, now)) {
				bpf_map_delete_elem(&conntrack, &ct_key);
				ct = 0;
			} else if (f.tcp_syn) {
				ct = 0;
			}
		}
		/* An entry counts only on the veth it was written on: a frame a bridge floods to
		 * every port, or one routed to the wrong veth, rides no flow of another pod (the
		 * full check below drops it), and a pod's new veth on the same address starts
		 * afresh rather than inheriting (or being refused by) its predecessor's flows. */
		if (ct && ct->ifindex != skb->ifindex)
			ct = 0;
		if (ct && ct->kind == MA_CT_REPLY && ct->policy_epoch != cfg->policy_epoch) {
			/* The tables moved: the answer passes only while the pod and its peer are
			 * still the endpoints the pod spoke to (not a new pod on a reused address). */
			dst = bpf_map_lookup_elem(&endpoints, &f.daddr);
			src = bpf_map_lookup_elem(&endpoints, &f.saddr);
			src_spiffe = src ? src->spiffe_id : MA_NO_SPIFFE_ID;
			if (dst && dst->spiffe_id == ct->dst_spiffe_id && src_spiffe == ct->src_spiffe_id) {
				ct->policy_epoch = cfg->policy_epoch;
			} else {
				bpf_map_delete_elem(&conntrack, &ct_key);
				ct = 0;
			}
		}
		if (ct && ct->kind == MA_CT_REPLY) {
			/* An answer in a flow the pod started. */
			count(MA_C_PASS_CT_REPLY, skb->len);
			ct_seen(ct, &f, now);
			remember_fragment(&f);
			return PASS;
		}
		if (ct && ct->policy_epoch == cfg->policy_epoch) {
			/* A flow admitted under the current tables: only the pair's authentication
			 * can have changed since, so only that is checked again. */
			if (ct->auth == MA_AUTH_NONE) {
				count(MA_C_PASS_CT_ESTABLISHED, skb->len);
				verdict = PASS;
			} else {
				verdict = authenticate(skb, cfg, &f, ct->auth, 0, 0, ct->src_spiffe_id,
						       ct->dst_spiffe_id, MA_C_PASS_CT_ESTABLISHED, now,
						       MA_PROOF_NONE, 0,
						       ct->audit ? MA_AUDIT_COUNT : MA_AUDIT_NONE, &reported);
			}
			if (verdict == PASS) {
				ct_seen(ct, &f, now);
				remember_fragment(&f);
			}
			return verdict;
		}
	}

	dst = bpf_map_lookup_elem(&endpoints, &f.daddr);
	if (!dst) {
		count(MA_C_PASS_NOT_MESH, skb->len);
		return PASS;
	}
	/* A local mesh pod's packets leave only through that pod's own veth: a frame a bridge
	 * floods to every port, or one routed to the wrong veth, is not delivered to another pod.
	 * (Pods of other nodes have no interface here, ifindex 0; the agent writes a local pod's
	 * endpoint only once its veth is registered.) */
	if (dst->ifindex && dst->ifindex != skb->ifindex)
		return drop(cfg, skb, MA_EV_DENIED, MA_C_DROP_WRONG_IFACE, &f);

	if (f.later_fragment) {
		struct ma_frag_key fk = {
			.saddr = f.saddr, .daddr = f.daddr, .id = f.frag_id, .protocol = f.protocol,
		};

		/* An audited destination drops nothing for its policies: as an open one. */
		if (!(dst->flags & MA_EP_ISOLATED) && dst->mutual_auth == MA_AUTH_NONE) {
			count(MA_C_PASS_NO_POLICY, skb->len);
			return PASS;
		}
		if (bpf_map_lookup_elem(&fragments, &fk)) {
			count(MA_C_PASS_FRAGMENT, skb->len);
			return PASS;
		}
		return drop(cfg, skb, MA_EV_FRAGMENT, MA_C_DROP_FRAGMENT, &f);
	}

	if (!(dst->flags & (MA_EP_ISOLATED | MA_EP_AUDIT)) && dst->mutual_auth == MA_AUTH_NONE) {
		count(MA_C_PASS_NO_POLICY, skb->len);
		verdict = PASS;
		src_spiffe = MA_NO_SPIFFE_ID;
		goto admitted;
	}

	/* The full check (meshauth_policy::tables, steps 2-4). */
	src = bpf_map_lookup_elem(&endpoints, &f.saddr);
	src_identity = src ? src->security_identity : MA_WORLD_IDENTITY;
	src_spiffe = src ? src->spiffe_id : MA_NO_SPIFFE_ID;
	passed_as = MA_C_PASS_POLICY;
	/* The node itself (the kubelet's probes): node addresses are never endpoints, and a
	 * packet from a pod with a node's address is dropped as spoofed before it gets here. */
	if (!src && cfg->allow_host && bpf_map_lookup_elem(&host_addrs, &f.saddr)) {
		count(MA_C_PASS_HOST, skb->len);
		passed_as = MA_C_PASS_HOST;
		goto admitted;
	}
	if (dst->flags & (MA_EP_ISOLATED | MA_EP_AUDIT)) {
		struct ma_policy_key pk = {
			.prefixlen = MA_POLICY_FIXED_BITS + 16,
			.dst_identity = dst->security_identity,
			.src_identity = src_identity,
			.protocol = f.table_proto,
			.port = (f.table_proto == MA_PROTO_TCP || f.table_proto == MA_PROTO_UDP) ? f.dport : 0,
		};
		__u8 matched = 0;

		/* Each pointer is tested on its own: clang would otherwise OR the two and the
		 * verifier rejects arithmetic on maybe-null pointers. */
		rule = bpf_map_lookup_elem(&policy, &pk);
		if (rule) {
			matched = 1;
			req = rule->auth;
		}
		/* An exact-source match that already requires authentication is the strictest
		 * answer there is: the "any source" lookup could not change it. */
		if (!matched || req != MA_AUTH_REQUIRED) {
			pk.src_identity = MA_ANY_IDENTITY;
			rule = bpf_map_lookup_elem(&policy, &pk);
			if (rule) {
				matched = 1;
				if (rule->auth > req)
					req = rule->auth;
			}
		}
		if (!matched && (dst->flags & MA_EP_ISOLATED)) {
			count(MA_C_DROP_DENIED, skb->len);
			emit(cfg, skb->ifindex, MA_EV_DENIED, MA_C_DROP_DENIED, &f, src_identity,
			     dst->security_identity, src_spiffe, dst->spiffe_id, MA_AUTH_NONE);
			return DROP;
		}
		/* Audited (only audited policies select the pod): what no rule admits passes
		 * and is reported once it has passed what is enforced (MutualAuth); a rule's
		 * requirement is held permissively. */
		if (!(dst->flags & MA_EP_ISOLATED)) {
			audit_denied = !matched;
			if (req == MA_AUTH_REQUIRED) {
				req = MA_AUTH_PERMISSIVE;
				audit_auth = 1;
			}
		}
	}
	if (dst->mutual_auth > req)
		req = dst->mutual_auth;
	if (req == MA_AUTH_REQUIRED) /* MutualAuth's own: enforced, not audited */
		audit_auth = 0;

	if (req == MA_AUTH_NONE) {
		count(audit_denied ? MA_C_PASS_AUDIT : MA_C_PASS_POLICY, skb->len);
		verdict = PASS;
	} else {
		/* A new TCP connection proves that it comes from the pod its source address names:
		 * an address alone is what anyone can write into a packet. */
		int proof = MA_PROOF_NONE;

		if (f.tcp_syn && src)
			proof = src->ifindex ? MA_PROOF_LOCAL : MA_PROOF_TAG;
		if (!now)
			now = boot_ns_coarse();
		verdict = authenticate(skb, cfg, &f, req, src_identity, dst->security_identity,
				       src_spiffe, dst->spiffe_id, MA_C_PASS_AUTHENTICATED, now, proof,
				       src ? src->ifindex : 0,
				       audit_auth ? MA_AUDIT_REPORT : MA_AUDIT_NONE, &reported);
		passed_as = MA_C_PASS_AUTHENTICATED;
		if (verdict == PASS && audit_denied)
			count(MA_C_PASS_AUDIT, skb->len);
	}
	if (verdict != PASS)
		return verdict;
	if (audit_denied) {
		emit(cfg, skb->ifindex, MA_EV_AUDIT, MA_C_PASS_AUDIT, &f, src_identity,
		     dst->security_identity, src_spiffe, dst->spiffe_id, MA_AUTH_NONE);
		reported = 1;
	}

admitted:
	/* A sample of the new flows that passed without an event of their own, so observe can
	 * show what passes too (off unless asked; the event budget applies as for drops). */
	if (cfg->pass_sample_every && !reported && !ct && (f.protocol != IPPROTO_TCP || f.tcp_syn) &&
	    bpf_get_prandom_u32() % cfg->pass_sample_every == 0)
		emit(cfg, skb->ifindex, MA_EV_PASS, passed_as, &f, src_identity, dst->security_identity,
		     src_spiffe, dst->spiffe_id, req);
	/* Cache the admission: new flows (a TCP SYN, any UDP or ICMP echo) and flows whose entry
	 * an older policy epoch wrote. A mid-stream TCP packet without an entry is checked in full
	 * every time rather than admitted into the cache on its own word; a RST is never cached. */
	if (f.tracked && !f.tcp_rst && (ct || f.protocol != IPPROTO_TCP || f.tcp_syn)) {
		struct ma_ct_value v = {
			.last_seen_ns = now ? now : boot_ns_coarse(),
			.policy_epoch = cfg->policy_epoch,
			.dst_spiffe_id = dst->spiffe_id,
			.src_spiffe_id = src_spiffe,
			.ifindex = skb->ifindex,
			.auth = req,
			.audit = audit_auth,
			.kind = MA_CT_ADMITTED,
			.closing = f.tcp_fin,
		};

		bpf_map_update_elem(&conntrack, &ct_key, &v, BPF_ANY);
	}
	remember_fragment(&f);
	return PASS;
}

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct ma_config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct ma_iface_value *iface;
	struct ma_ct_key key = {};
	struct flow f = {};
	__u32 ifindex = skb->ifindex;
	int verdict;

	if (!cfg)
		return PASS;
	{
		/* ARP from a pod claims only the pod's own address (or none: a probe), so it cannot
		 * take over another pod's or the node's address in a neighbour cache. */
		void *data = (void *)(long)skb->data;
		void *data_end = (void *)(long)skb->data_end;
		struct ethhdr *eth = data;
		struct arp_ipv4 *arp = data + ETH_HLEN;

		if ((void *)(eth + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_ARP)) {
			iface = bpf_map_lookup_elem(&interfaces, &ifindex);
			if ((void *)(arp + 1) > data_end)
				return drop(cfg, skb, MA_EV_UNSUPPORTED, MA_C_DROP_MALFORMED, &f);
			f.saddr = arp->sender_ip;
			if (!iface || (arp->sender_ip != iface->pod_ip && arp->sender_ip != 0))
				return drop(cfg, skb, MA_EV_SPOOFED, MA_C_DROP_SPOOFED, &f);
			count(MA_C_PASS_ARP, skb->len);
			return PASS;
		}
	}
	if (!link_layer(skb, cfg, &f, &verdict))
		return verdict;

	/* Anti-spoofing: a pod speaks only with its own address. An interface the loader did not
	 * register is treated the same way: failing closed beats letting an unknown source ride
	 * another pod's authentication. */
	iface = bpf_map_lookup_elem(&interfaces, &ifindex);
	if (!iface || iface->pod_ip != f.saddr)
		return drop(cfg, skb, MA_EV_SPOOFED, MA_C_DROP_SPOOFED, &f);

	if (f.tcp_syn) {
		/* This SYN is the pod's own: a local destination or the uplink's tagger can tell it
		 * from one that the node or the wire made up with the pod's address. */
		struct ma_syn_key sk = { .saddr = f.saddr, .seq = f.tcp_seq, .sport = f.sport };
		struct ma_syn_value sv = { .seen_ns = boot_ns_coarse(), .ifindex = ifindex };

		bpf_map_update_elem(&syn_origin, &sk, &sv, BPF_ANY);
	}

	if (f.tracked) {
		struct ma_ct_value *ct;
		__u64 now = boot_ns_coarse();

		/* The flow as the peer's answers will arrive at to_pod. An entry already there is
		 * this flow's (an admitted flow the pod answers, or one it started): it is kept as
		 * it is, never turned into a reply, and only its age and TCP state move. */
		key.saddr = f.daddr;
		key.daddr = f.saddr;
		key.sport = f.dport;
		key.dport = f.sport;
		key.protocol = f.protocol;
		ct = bpf_map_lookup_elem(&conntrack, &key);
		/* An idle entry is gone for both directions: the pod's packet must not revive it.
		 * Nor an entry another veth wrote (the pod's predecessor on this address). */
		if (ct && (ct_expired(cfg, ct, f.protocol, now) || ct->ifindex != ifindex)) {
			bpf_map_delete_elem(&conntrack, &key);
			ct = 0;
		}
		if (ct) {
			ct_seen(ct, &f, now);
		} else if (f.tcp_syn || f.protocol == IPPROTO_UDP || f.icmp_request) {
			/* Only a flow the pod itself starts earns a reply entry: its answer to a stray
			 * segment (a RST, an ACK) or to a peer's echo request must not let the peer in. */
			struct ma_endpoint_value *pod = bpf_map_lookup_elem(&endpoints, &f.saddr);
			struct ma_endpoint_value *peer = bpf_map_lookup_elem(&endpoints, &f.daddr);
			struct ma_ct_value v = {
				.last_seen_ns = now,
				.policy_epoch = cfg->policy_epoch,
				.dst_spiffe_id = pod ? pod->spiffe_id : MA_NO_SPIFFE_ID,
				.src_spiffe_id = peer ? peer->spiffe_id : MA_NO_SPIFFE_ID,
				.ifindex = skb->ifindex,
				.kind = MA_CT_REPLY,
			};

			bpf_map_update_elem(&conntrack, &key, &v, BPF_ANY);
		}
	}
	count(MA_C_PASS_FROM_POD, skb->len);
	return PASS;
}


/*
 * tag_syn (tcx egress on the node's uplinks): tags the SYNs of this node's pods after every
 * address translation on the node (a ClusterIP is a backend's address by now), so the MAC covers
 * the 4-tuple the destination sees. It never drops: every failure leaves the SYN untagged, and
 * the destination decides. Only SYNs pay more than the parse.
 */
SEC("classifier")
int tag_syn(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct ma_endpoint_value *src, *dst;
	struct ma_tag_value *tk;
	struct flow f = {};
	__u32 opt_words[MA_TAG_OPT_LEN / 4]; /* bpf_csum_diff reads 32-bit words */
	__u8 *opt = (__u8 *)opt_words;
	__u64 now, h;
	const __u64 *key;
	__u16 old_len, new_len, old_word, new_word, tcp_len;
	__u32 csum_off, ip_len;
	__s64 diff;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return PASS;
	ensure_linear(skb);
	if (parse_ipv4(skb, &f) < 0 || !f.tcp_syn || f.first_fragment || f.later_fragment)
		return PASS;
	src = bpf_map_lookup_elem(&endpoints, &f.saddr);
	if (!src || !src->ifindex || src->spiffe_id == MA_NO_SPIFFE_ID)
		return PASS; /* not from a pod of this node */
	dst = bpf_map_lookup_elem(&endpoints, &f.daddr);
	if (!dst || dst->spiffe_id == MA_NO_SPIFFE_ID)
		return PASS; /* not to a mesh pod: nothing would check a tag */
	now = boot_ns_coarse();
	if (!syn_from_pod(skb, &f, src->ifindex, now))
		return PASS; /* not what the pod sent: left for the destination to drop */
	{
		struct ma_tag_key k = { .src_spiffe_id = src->spiffe_id, .dst_spiffe_id = dst->spiffe_id };
		__be32 *node = bpf_map_lookup_elem(&endpoint_nodes, &f.daddr);

		/* Each node hosting the destination identity proved the pair on its own: its key. */
		if (!node) {
			count(MA_C_TAG_NO_KEY, skb->len);
			return PASS;
		}
		k.dst_node = *node;
		tk = bpf_map_lookup_elem(&tag_keys, &k);
	}
	if (!tk || tk->expiry_ns <= now + MA_CLOCK_SLACK_NS || !(tk->key[0] | tk->key[1])) {
		count(MA_C_TAG_NO_KEY, skb->len);
		return PASS;
	}
	key = (now < tk->key_from_ns && (tk->prev_key[0] | tk->prev_key[1])) ? tk->prev_key : tk->key;

	/* Room: options end the segment (no data: a SYN with data is left alone), and the header
	 * stays within 60 bytes. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	{
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end)
			return PASS;
		ip_len = bpf_ntohs(ip->tot_len);
	}
	if (f.tcp_hlen + MA_TAG_OPT_LEN > 60 || ip_len != f.l4_off - ETH_HLEN + f.tcp_hlen ||
	    skb->len != ETH_HLEN + ip_len) {
		count(MA_C_TAG_NO_ROOM, skb->len);
		return PASS;
	}

	{
		struct ma_tag_msg m = {
			.saddr = f.saddr, .daddr = f.daddr, .sport = f.sport, .dport = f.dport,
			.seq = f.tcp_seq, .slot = tag_slot_now(),
		};

		h = siphash24(key, &m);
		opt[0] = MA_TAG_OPT_KIND;
		opt[1] = MA_TAG_OPT_LEN;
		opt[2] = MA_TAG_EXID >> 8;
		opt[3] = MA_TAG_EXID & 0xff;
		opt[4] = (__u8)m.slot;
		__builtin_memcpy(&opt[5], &h, MA_TAG_MAC_LEN);
	}

	/* Read before the segment grows: a failure after it would send a SYN whose lengths were
	 * already rewritten. */
	if (bpf_skb_load_bytes(skb, f.l4_off + 12, &old_word, 2) < 0)
		return PASS;
	if (bpf_skb_change_tail(skb, skb->len + MA_TAG_OPT_LEN, 0) < 0) {
		count(MA_C_TAG_NO_ROOM, skb->len);
		return PASS;
	}
	csum_off = f.l4_off + 16;
	/* IPv4 total length and its header checksum. */
	old_len = bpf_htons(ip_len);
	new_len = bpf_htons(ip_len + MA_TAG_OPT_LEN);
	bpf_l3_csum_replace(skb, ETH_HLEN + 10, old_len, new_len, 2);
	bpf_skb_store_bytes(skb, ETH_HLEN + 2, &new_len, 2, 0);
	/* TCP: the pseudo-header's length, the data offset, and the option's bytes. The helpers
	 * know the checksum's state (a partial one leaves all but the pseudo-header to the NIC). */
	tcp_len = f.tcp_hlen;
	bpf_l4_csum_replace(skb, csum_off, bpf_htons(tcp_len), bpf_htons(tcp_len + MA_TAG_OPT_LEN),
			    BPF_F_PSEUDO_HDR | 2);
	new_word = bpf_htons((bpf_ntohs(old_word) & 0x0fff) |
			     (((__u16)(tcp_len + MA_TAG_OPT_LEN) / 4) << 12));
	bpf_l4_csum_replace(skb, csum_off, old_word, new_word, 2);
	bpf_skb_store_bytes(skb, f.l4_off + 12, &new_word, 2, 0);
	diff = bpf_csum_diff(0, 0, opt_words, MA_TAG_OPT_LEN, 0);
	if (diff >= 0)
		bpf_l4_csum_replace(skb, csum_off, 0, diff, 0);
	bpf_skb_store_bytes(skb, f.l4_off + tcp_len, opt, MA_TAG_OPT_LEN, 0);
	count(MA_C_TAG_WRITTEN, skb->len);
	return PASS;
}

char LICENSE[] SEC("license") = "Apache-2.0";
