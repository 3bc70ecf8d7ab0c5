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
//! 1. destination not in `endpoints`: pass (not a meshauth pod).
//! 2. destination neither isolated nor requiring authentication: pass.
//! 3. a reply of a flow the pod started (conntrack `OUT` entry): pass.
//! 4. a later packet of a flow admitted under the current policy epoch (conntrack `IN`): pass,
//!    after checking the pair's authentication again when the flow needs it — an expired pair
//!    stops established flows too.
//! 5. otherwise the full check of `meshauth_policy::tables`: source endpoint (or world), two
//!    longest-prefix policy lookups (exact source identity and any), the stricter
//!    authentication of the matches and the destination's MutualAuth; `Required` passes only
//!    with an unexpired `auth[(dst SPIFFE number, src SPIFFE number)]`, `Permissive` passes and
//!    counts. Allowed new flows (TCP SYN, UDP, ICMP echo) enter conntrack.
//!
//! `from_pod` (traffic a pod sends): a source address other than the pod's own (registered
//! by [`Datapath::attach`]) is dropped as spoofed; flows the pod starts enter conntrack so
//! their replies pass step 3.
//!
//! # Rules for everything else
//! - ARP passes. Link-layer protocols other than IPv4, IPv6 and ARP are dropped.
//! - IPv6 ([`config::Ipv6Mode`]): the tables are IPv4 only. By default IPv6 is dropped except
//!   ICMPv6 neighbour discovery (types 133–137); `pass` lets all IPv6 through unchecked.
//! - IPv4 fragments: the first fragment carries the ports and is checked like any packet; a
//!   fragment that passes is remembered (source, destination, IP id, protocol) in an LRU map,
//!   and later fragments pass only when their first fragment did. Later fragments arriving
//!   before the first are dropped. Towards pods that are neither isolated nor require
//!   authentication, fragments pass unchecked (step 2).
//! - Protocols other than TCP, UDP and ICMP are checked with the table protocol `Other` and
//!   port 0; ICMP with protocol `Icmp` and port 0 (echo request/reply are tracked by echo id).
//! - Conntrack entries are never expired by time, only evicted by the LRU; a policy change
//!   (new epoch) makes cached admissions go through the full check again.
//! - Every drop is counted ([`Counter`]) and reported as an [`events::Event`], at most
//!   [`config::DatapathConfig::events_per_sec_per_cpu`] events per second per CPU.
//!
//! Time is CLOCK_BOOTTIME everywhere ([`clock::BootTime`]).

pub mod abi;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod events;
pub mod loader;
pub mod packet;
#[cfg(feature = "testing")]
pub mod testing;

pub use abi::Counter;
pub use clock::BootTime;
pub use config::{AttachMode, DatapathConfig, Ipv6Mode};
pub use events::{Event, EventKind, EventStream};
pub use loader::{ApplyStats, AuthEntry, Counters, Datapath, DatapathError, Endpoint, Hook, Interface, Maps, PROGRAM_VERSION, TestRunOutcome};
