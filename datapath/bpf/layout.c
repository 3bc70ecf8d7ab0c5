// SPDX-License-Identifier: Apache-2.0
/* Host program run by build.rs: prints the size of every struct meshauth.h shares with Rust
 * and the offset of every field, one per line, for abi::tests::layout_matches_c_header. */
#include <stddef.h>
#include <stdio.h>

#include "meshauth.h"

#define S(t) printf("%s size %zu\n", #t, sizeof(struct t))
#define C(c) printf("%s %d\n", #c, (int)(c))
#define CU(c) printf("%s %llu\n", #c, (unsigned long long)(c))
#define F(t, f) printf("%s.%s %zu\n", #t, #f, offsetof(struct t, f))

int main(void)
{
	S(ma_endpoint_value);
	F(ma_endpoint_value, security_identity);
	F(ma_endpoint_value, spiffe_id);
	F(ma_endpoint_value, ifindex);
	F(ma_endpoint_value, flags);
	F(ma_endpoint_value, mutual_auth);
	S(ma_policy_key);
	F(ma_policy_key, prefixlen);
	F(ma_policy_key, dst_identity);
	F(ma_policy_key, src_identity);
	F(ma_policy_key, protocol);
	F(ma_policy_key, port);
	S(ma_policy_value);
	F(ma_policy_value, auth);
	S(ma_auth_key);
	F(ma_auth_key, dst_spiffe_id);
	F(ma_auth_key, src_spiffe_id);
	F(ma_auth_key, src_node);
	S(ma_auth_value);
	F(ma_auth_value, expiry_ns);
	F(ma_auth_value, key);
	F(ma_auth_value, prev_key);
	F(ma_auth_value, prev_until_ns);
	S(ma_tag_key);
	F(ma_tag_key, src_spiffe_id);
	F(ma_tag_key, dst_spiffe_id);
	F(ma_tag_key, dst_node);
	S(ma_tag_value);
	F(ma_tag_value, expiry_ns);
	F(ma_tag_value, key);
	F(ma_tag_value, prev_key);
	F(ma_tag_value, key_from_ns);
	S(ma_syn_key);
	S(ma_syn_value);
	S(ma_ct_key);
	F(ma_ct_key, saddr);
	F(ma_ct_key, daddr);
	F(ma_ct_key, sport);
	F(ma_ct_key, dport);
	F(ma_ct_key, protocol);
	S(ma_ct_value);
	F(ma_ct_value, last_seen_ns);
	F(ma_ct_value, policy_epoch);
	F(ma_ct_value, dst_spiffe_id);
	F(ma_ct_value, src_spiffe_id);
	F(ma_ct_value, ifindex);
	F(ma_ct_value, auth);
	F(ma_ct_value, kind);
	F(ma_ct_value, closing);
	F(ma_ct_value, audit);
	S(ma_frag_key);
	S(ma_clock);
	S(ma_iface_value);
	F(ma_iface_value, pod_ip);
	F(ma_iface_value, attach_mode);
	S(ma_config);
	F(ma_config, policy_epoch);
	F(ma_config, events_per_sec);
	F(ma_config, ipv6_mode);
	F(ma_config, allow_host);
	F(ma_config, pass_sample_every);
	F(ma_config, ct_tcp_s);
	F(ma_config, ct_udp_s);
	F(ma_config, ct_icmp_s);
	F(ma_config, ct_closing_s);
	S(ma_counter);
	F(ma_counter, packets);
	F(ma_counter, bytes);
	S(ma_event);
	F(ma_event, timestamp_ns);
	F(ma_event, saddr);
	F(ma_event, daddr);
	F(ma_event, sport);
	F(ma_event, dport);
	F(ma_event, ifindex);
	F(ma_event, src_identity);
	F(ma_event, dst_identity);
	F(ma_event, src_spiffe_id);
	F(ma_event, dst_spiffe_id);
	F(ma_event, kind);
	F(ma_event, counter);
	F(ma_event, protocol);
	F(ma_event, auth);
	S(ma_spiffe_name);
	F(ma_spiffe_name, len);
	F(ma_spiffe_name, id);
	C(MA_C_PASS_NOT_MESH);
	C(MA_C_PASS_NO_POLICY);
	C(MA_C_PASS_POLICY);
	C(MA_C_PASS_AUTHENTICATED);
	C(MA_C_PASS_PERMISSIVE);
	C(MA_C_PASS_CT_REPLY);
	C(MA_C_PASS_CT_ESTABLISHED);
	C(MA_C_PASS_FRAGMENT);
	C(MA_C_PASS_FROM_POD);
	C(MA_C_PASS_ARP);
	C(MA_C_PASS_IPV6);
	C(MA_C_DROP_DENIED);
	C(MA_C_DROP_AUTH_MISSING);
	C(MA_C_DROP_AUTH_EXPIRED);
	C(MA_C_DROP_SPOOFED);
	C(MA_C_DROP_FRAGMENT);
	C(MA_C_DROP_IPV6);
	C(MA_C_DROP_MALFORMED);
	C(MA_C_DROP_UNSUPPORTED_L2);
	C(MA_C_EVENTS_SENT);
	C(MA_C_EVENTS_RATE_LIMITED);
	C(MA_C_EVENTS_LOST);
	C(MA_C_PASS_HOST);
	C(MA_C_DROP_WRONG_IFACE);
	C(MA_C_DROP_TAG_MISSING);
	C(MA_C_DROP_TAG_INVALID);
	C(MA_C_DROP_SYN_NOT_FROM_POD);
	C(MA_C_PASS_UNTAGGED_PERMISSIVE);
	C(MA_C_TAG_WRITTEN);
	C(MA_C_TAG_NO_KEY);
	C(MA_C_TAG_NO_ROOM);
	C(MA_C_PASS_AUDIT);
	C(MA_EV_DENIED);
	C(MA_EV_AUTH_REQUIRED);
	C(MA_EV_SPOOFED);
	C(MA_EV_FRAGMENT);
	C(MA_EV_IPV6);
	C(MA_EV_UNSUPPORTED);
	C(MA_EV_TAG);
	C(MA_EV_AUDIT);
	C(MA_EV_PASS);
	C(MA_AUTH_NONE);
	C(MA_AUTH_PERMISSIVE);
	C(MA_AUTH_REQUIRED);
	C(MA_CT_REPLY);
	C(MA_CT_ADMITTED);
	C(MA_CLOCK_SLACK_NS);
	C(MA_ATTACH_NONE);
	C(MA_ATTACH_TCX);
	C(MA_ATTACH_NETLINK);
	C(MA_IPV6_DROP);
	C(MA_IPV6_PASS);
	C(MA_EP_ISOLATED);
	C(MA_EP_AUDIT);
	C(MA_SPIFFE_ID_MAX);
	C(MA_C_COUNT);
	C(MA_COUNTER_SLOTS);
	C(MA_THIS_NODE);
	C(MA_POLICY_FIXED_BITS);
	C(MA_TAG_OPT_KIND);
	C(MA_TAG_OPT_LEN);
	C(MA_TAG_EXID);
	C(MA_TAG_SLOT_SHIFT);
	C(MA_TAG_MAC_LEN);
	CU(MA_SYN_ORIGIN_TTL_NS);
	return 0;
}
