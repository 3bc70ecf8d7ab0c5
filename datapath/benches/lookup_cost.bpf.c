// SPDX-License-Identifier: Apache-2.0
/* Probe programs for benches/lookup_cost.sh: each does one of the operations the datapath is
 * made of, so their BPF_PROG_TEST_RUN times minus `empty` give the cost of one operation on
 * this machine. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct k16 { __u32 a, b, c, d; };
struct lpm_key { __u32 prefixlen; __u32 dst, src; __u16 proto; __u16 port; };

struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 65536); __type(key, __u32); __type(value, __u64); } h4 SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LRU_HASH); __uint(max_entries, 131072); __type(key, struct k16); __type(value, struct k16); } lru SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_LPM_TRIE); __uint(max_entries, 1024); __uint(map_flags, BPF_F_NO_PREALLOC); __type(key, struct lpm_key); __type(value, __u32); } lpm SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 32); __type(key, __u32); __type(value, __u64); } pc SEC(".maps");

SEC("classifier") int empty(struct __sk_buff *s) { return -1; }
SEC("classifier") int hash_hit(struct __sk_buff *s) { __u32 k = 7; return bpf_map_lookup_elem(&h4, &k) ? 0 : -1; }
SEC("classifier") int hash_miss(struct __sk_buff *s) { __u32 k = s->len; return bpf_map_lookup_elem(&h4, &k) ? 0 : -1; }
SEC("classifier") int lru_miss(struct __sk_buff *s) { struct k16 k = { s->len, 1, 2, 3 }; return bpf_map_lookup_elem(&lru, &k) ? 0 : -1; }
SEC("classifier") int lpm_hit(struct __sk_buff *s) { struct lpm_key k = { 96, 7, 2, 6, 0x901f }; return bpf_map_lookup_elem(&lpm, &k) ? 0 : -1; }
SEC("classifier") int ktime_boot(struct __sk_buff *s) { return bpf_ktime_get_boot_ns() > 5 ? 0 : -1; }
SEC("classifier") int jiffies(struct __sk_buff *s) { return bpf_jiffies64() > 5 ? 0 : -1; }
SEC("classifier") int percpu_count(struct __sk_buff *s) { __u32 k = 3; __u64 *v = bpf_map_lookup_elem(&pc, &k); if (v) *v += 1; return -1; }

char LICENSE[] SEC("license") = "Apache-2.0";
