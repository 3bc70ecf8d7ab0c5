#!/usr/bin/env bash
# What one map lookup, one clock read, one counter costs on this machine, measured like
# `meshauthctl bench datapath` (BPF_PROG_TEST_RUN): explains its numbers, which are sums of
# these. Root; needs clang, bpftool and bpffs on /sys/fs/bpf.
#   datapath/benches/lookup_cost.sh [repeat]
set -euo pipefail
cd "$(dirname "$0")"
repeat="${1:-2000000}"
work="$(mktemp -d)"
pins="/sys/fs/bpf/meshauth-lookup-cost-$$"
trap 'rm -rf "$work" "$pins" "$pins-maps"' EXIT
clang -O2 -g -target bpf -I/usr/include/"$(uname -m)"-linux-gnu -c lookup_cost.bpf.c -o "$work/p.o"
bpftool prog loadall "$work/p.o" "$pins" type classifier pinmaps "$pins-maps"
bpftool map update pinned "$pins-maps/h4" key 7 0 0 0 value 1 0 0 0 0 0 0 0
for src in 2 0; do  # the exact-source and any-source entries of one destination
    bpftool map update pinned "$pins-maps/lpm" key 96 0 0 0 7 0 0 0 "$src" 0 0 0 6 0 0x1f 0x90 value 1 0 0 0
done
for i in $(seq 1 40); do
    bpftool map update pinned "$pins-maps/lpm" key 96 0 0 0 "$i" 0 0 0 3 0 0 0 6 0 0x1f 0x90 value 1 0 0 0
done
# An Ethernet + IPv4 frame; the probes never look at it.
printf '%b' "$(printf '\\x%02x' $(seq 1 64 | sed 's/.*/0/'))" >"$work/pkt"
run() { bpftool prog run pinned "$pins/$1" data_in "$work/pkt" repeat "$repeat" | sed -n 's/.*duration (average): \([0-9]*\)ns.*/\1/p'; }
base="$(run empty)"
printf '%-14s %5s ns\n' empty "$base"
for p in percpu_count jiffies hash_miss hash_hit lru_miss lpm_hit ktime_boot; do
    t="$(run "$p")"
    printf '%-14s %5s ns  (+%s)\n' "$p" "$t" "$((t - base))"
done
