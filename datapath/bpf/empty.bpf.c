// SPDX-License-Identifier: Apache-2.0
/* The benchmark baseline: a TC program that does nothing, measured in the same run as
 * meshauth's programs so the difference is what meshauth costs. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("classifier")
int empty(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Apache-2.0";
