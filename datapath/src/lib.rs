//! The meshauth datapath: TC eBPF programs on the host side of every pod's veth that enforce
//! the compiled policy tables and the authenticated pairs, and the loader that keeps them
//! attached across agent restarts and upgrades.
//!
//! Its job: compile (build.rs, clang) and load the C programs in `bpf/`; pin maps, programs and
//! links under `/sys/fs/bpf/meshauth/`; attach to pod interfaces; write the tables
//! ([`meshauth_policy::tables::CompiledTables`]) and authenticated pairs into the maps; report
//! counters and events; measure itself ([`bench`]).
//!
//! What it must not do: decide policy (the tables arrive decided; the program only looks
//! them up), authenticate anyone (the agent does the handshakes and calls
//! [`Datapath::set_auth`]), or detach programs on its own shutdown (pins keep the datapath
//! enforcing while no agent runs).
//!
//! # What the programs do
//! `to_pod` (traffic into a pod), on an IPv4 packet:
//! 1. conntrack (one lookup, keyed on the tuple as it arrives): an entry written on another
//!    veth than the one the packet leaves through is dropped (`drop_wrong_interface`: a
//!    bridge's flood or a wrong route rides no cached flow); an answer in a flow the pod
//!    started passes (after a policy-epoch change only while the pod and its peer still have
//!    the SPIFFE IDs they had: no new pod on a reused address inherits it); a later packet of a
//!    flow admitted under the current policy epoch passes, after the pair's authentication is
//!    checked again when the flow needs it (an expired pair stops established flows too). A
//!    TCP SYN never rides an entry (a new connection is checked in full), a RST or FIN closes
//!    the entry (closing timeout; a RST may be spoofed, so it never deletes at once), and an
//!    entry idle longer than its protocol's timeout
//!    ([`config::ConntrackTimeouts`]; shorter after a FIN) is forgotten.
//! 2. destination not in `endpoints`: pass (not a meshauth pod). A destination registered on
//!    another interface of this node (its `ifindex`) is dropped: a bridge's flood or a wrong
//!    route never delivers one pod's traffic to another.
//! 3. destination neither isolated nor requiring authentication: pass.
//! 4. otherwise the full check of `meshauth_policy::tables`: source endpoint (or world; a
//!    source that is no endpoint but one of this node's own addresses in `host_addrs` passes
//!    when [`config::DatapathConfig::allow_host`] is set: the kubelet's probes), the
//!    longest-prefix policy lookups (exact source identity, then any source unless the first
//!    already answered `Required`), the stricter authentication of the matches and the
//!    destination's MutualAuth; `Required` passes only with an unexpired
//!    `auth[(dst SPIFFE number, src SPIFFE number)]`, `Permissive` passes and counts.
//!
//! Allowed new flows (TCP SYN, UDP, ICMP echo) to meshauth pods enter conntrack; a mid-stream
//! TCP segment without an entry (a flow older than the program, an evicted entry) takes the
//! full check every time instead of being admitted on its own word.
//!
//! `from_pod` (traffic a pod sends): a source address other than the pod's own (registered
//! by [`Datapath::attach`]) is dropped as spoofed, and so is anything from an interface the
//! loader never registered; flows the pod itself starts (a TCP SYN, a UDP datagram or an
//! ICMP echo request with no entry yet) enter conntrack so their answers pass — its answer to
//! someone else's packet (a RST to a stray segment, an echo reply) never does, and an entry
//! already there (an admission) is never turned into a reply. ARP
//! from a pod must claim the pod's own address (or none: a probe), or it is dropped as spoofed.
//!
//! # Rules for everything else
//! - ARP to a pod passes; ARP from a pod follows the anti-spoofing rule. Link-layer protocols other than IPv4, IPv6 and ARP are dropped.
//! - IPv6 ([`config::Ipv6Mode`]): the tables are IPv4 only. By default IPv6 is dropped except
//!   ICMPv6 neighbour discovery (types 133–137, no extension headers); `pass` lets all IPv6
//!   through unchecked. Both directions.
//! - IPv4 fragments: the first fragment carries the ports and is checked like any packet; a
//!   fragment that passes is remembered (source, destination, IP id, protocol) in an LRU map,
//!   and later fragments pass only when their first fragment did. Later fragments arriving
//!   before the first are dropped. Towards pods that are neither isolated nor require
//!   authentication, fragments pass unchecked.
//! - Protocols other than TCP, UDP and ICMP are checked with the table protocol `Other` and
//!   port 0; ICMP with protocol `Icmp` and port 0 (echo request/reply are tracked by echo id;
//!   ICMP errors about a flow are not related to it, so under Strict a peer's "unreachable"
//!   needs an authenticated pair too).
//! - Truncated headers, and IPv4 EtherType frames whose IP header is not version 4, are
//!   dropped.
//! - Conntrack entries idle out per protocol (10 s after a RST or FIN), and are evicted by the LRU when the
//!   map is full; a policy change (new epoch) makes cached admissions go through the full check
//!   again; [`Datapath::apply_tables`] flushes the entries of an address whose pod left or
//!   changed. ICMP echo: the id is a request's source "port" and a reply's destination
//!   "port", so a request never matches the entry a reply would need.
//! - Every drop is counted ([`Counter`]) and reported as an [`events::Event`], at most
//!   [`config::DatapathConfig::events_per_sec_per_cpu`] events per second per CPU; the rest
//!   are counted as rate-limited.
//!
//! Time is CLOCK_BOOTTIME everywhere ([`clock::BootTime`]). The program reads it through a
//! per-CPU cache refreshed once per scheduler tick (a clock read costs more than a map lookup
//! on a VM), and counts an authentication as expired 10 ms early so it never passes late.

pub mod abi;
pub mod bench;
pub mod clock;
pub mod config;
pub mod events;
pub mod loader;
#[cfg(feature = "netns")]
pub mod netns;
pub mod packet;

pub use abi::{Counter, tag_option, tag_slot_now};
pub use clock::BootTime;
pub use config::{AttachMode, DatapathConfig, Ipv6Mode};
pub use events::{Event, EventKind, EventStream};
pub use loader::{
    ApplyStats, AuthEntry, ConnectionKey, Counters, Datapath, DatapathError, Endpoint, Hook, Interface, KEY_OVERLAP, KEY_SWITCH_DELAY,
    Maps, NodeId, PROGRAM_VERSION, TestRunOutcome,
};
