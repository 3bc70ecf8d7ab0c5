//! Loading, adopting, upgrading and attaching the TC programs, and writing their maps.
//!
//! Pin layout under [`DatapathConfig::pin_dir`]:
//! ```text
//! maps/<name>                       every map (state survives any number of loader restarts)
//! programs/<version>/{to_pod,from_pod,tag_syn}  the programs of one build (version: hash of the C sources)
//! links/<ifindex>-{ingress,egress}  tcx links of pod veths: attached while pinned, whoever holds them
//! links/<ifindex>-uplink            tcx links of the connection tagger on the node's uplinks
//! ```
//! A restarted loader whose version is pinned adopts it: nothing is loaded or detached, so
//! traffic never sees a gap. A loader with a new version loads its programs, then moves every
//! pinned link to them with `BPF_LINK_UPDATE` (clsact filters: a netlink replace), which swaps
//! the program atomically under running traffic, and removes the old programs.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{EbpfLoader, Pod};
use meshauth_policy::tables::{AuthRequirement, CompiledTables};
use serde::Serialize;

use crate::abi::{
    self, AuthKey, AuthValue, ConfigValue, Counter, CounterValue, CtKey, CtValue, EndpointValue, IfaceValue, PolicyKeyData, PolicyValue,
    SpiffeName, TagKey, TagValue,
};
use crate::clock::BootTime;
use crate::config::{AttachMode, BPFFS_ROOT, ConfigError, DatapathConfig, Ipv6Mode};
use crate::events::{EventError, EventStream};

mod tags;
pub use tags::{ConnectionKey, KEY_OVERLAP, KEY_SWITCH_DELAY};

/// The program object compiled by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshauth.bpf.o"));
/// Names the pinned programs of this build: a hash of the C sources and the compiler.
pub const PROGRAM_VERSION: &str = env!("MESHAUTH_BPF_VERSION");

const TO_POD: &str = "to_pod";
const FROM_POD: &str = "from_pod";
const TAG_SYN: &str = "tag_syn";
/// clsact filters (the netlink fallback) sit at a fixed priority and handle, so a restarted
/// loader can find and replace them without any state of its own.
const NETLINK_PRIORITY: u16 = 1;
/// Entries of `host_addrs`: a node has a handful of addresses (uplink, bridge, ptp gateways).
const HOST_ADDR_ENTRIES: u32 = 256;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0x4d41, 1);
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A map the programs use, as the loader expects to find it pinned.
struct MapSpec {
    name: &'static str,
    kind: MapType,
    key_size: usize,
    value_size: usize,
    entries: fn(&DatapathConfig) -> u32,
    /// A cache or a value the loader writes anew: a pinned map of another layout (an upgrade
    /// that changed it) is replaced by a fresh one instead of stopping the load. Live flows
    /// are then checked in full once, as new ones.
    rebuildable: bool,
}

const MAPS: &[MapSpec] = &[
    MapSpec {
        name: "endpoints",
        kind: MapType::Hash,
        key_size: 4,
        value_size: size_of::<EndpointValue>(),
        entries: |c| c.endpoint_entries,
        rebuildable: false,
    },
    // Not rebuildable: an empty one would leave every pod without a node, so no pair would
    // count as authenticated until the agent's first apply.
    MapSpec {
        name: "endpoint_nodes",
        kind: MapType::Hash,
        key_size: 4,
        value_size: 4,
        entries: |c| c.endpoint_entries,
        rebuildable: false,
    },
    MapSpec {
        name: "policy",
        kind: MapType::LpmTrie,
        key_size: 4 + size_of::<PolicyKeyData>(),
        value_size: size_of::<PolicyValue>(),
        entries: |c| c.policy_entries,
        rebuildable: false,
    },
    // Rebuildable: a pair written before connection keys (or the proving node in the key)
    // existed is not one this version can use, and its agent authenticates it again (what a
    // restart does anyway).
    MapSpec {
        name: "auth",
        kind: MapType::Hash,
        key_size: size_of::<AuthKey>(),
        value_size: size_of::<AuthValue>(),
        entries: |c| c.auth_entries,
        rebuildable: true,
    },
    MapSpec {
        name: "tag_keys",
        kind: MapType::Hash,
        key_size: size_of::<TagKey>(),
        value_size: size_of::<TagValue>(),
        entries: |c| c.auth_entries,
        rebuildable: true,
    },
    MapSpec {
        name: "syn_origin",
        kind: MapType::LruHash,
        key_size: 12,
        value_size: 16,
        entries: |c| c.fragment_entries.max(65536),
        rebuildable: true,
    },
    MapSpec {
        name: "conntrack",
        kind: MapType::LruHash,
        key_size: size_of::<CtKey>(),
        value_size: size_of::<CtValue>(),
        entries: |c| c.conntrack_entries,
        rebuildable: true,
    },
    MapSpec { name: "fragments", kind: MapType::LruHash, key_size: 12, value_size: 4, entries: |c| c.fragment_entries, rebuildable: true },
    MapSpec {
        name: "interfaces",
        kind: MapType::Hash,
        key_size: 4,
        value_size: size_of::<IfaceValue>(),
        entries: |c| c.interface_entries,
        rebuildable: false,
    },
    MapSpec { name: "config", kind: MapType::Array, key_size: 4, value_size: size_of::<ConfigValue>(), entries: |_| 1, rebuildable: true },
    MapSpec { name: "clock", kind: MapType::PerCpuArray, key_size: 4, value_size: 16, entries: |_| 1, rebuildable: true },
    MapSpec { name: "event_budget", kind: MapType::PerCpuArray, key_size: 4, value_size: 16, entries: |_| 1, rebuildable: true },
    MapSpec {
        name: "counters",
        kind: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<CounterValue>(),
        entries: |_| abi::COUNTER_SLOTS,
        rebuildable: false,
    },
    MapSpec { name: "events", kind: MapType::RingBuf, key_size: 0, value_size: 0, entries: |c| c.event_ring_bytes, rebuildable: false },
    MapSpec { name: "host_addrs", kind: MapType::Hash, key_size: 4, value_size: 4, entries: |_| HOST_ADDR_ENTRIES, rebuildable: false },
    MapSpec {
        name: "spiffe_names",
        kind: MapType::Hash,
        key_size: 4,
        value_size: size_of::<SpiffeName>(),
        entries: |c| c.spiffe_name_entries,
        rebuildable: false,
    },
];

/// What went wrong loading, attaching or writing the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path} is not on a bpffs and mounting one at {BPFFS_ROOT} failed: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("loading the BPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error(
        "pinned map {name} is incompatible with this loader ({what}: pinned {pinned}, expected {expected}); \
             remove {path} to recreate it (its state is lost)"
    )]
    IncompatibleMap { name: &'static str, what: &'static str, pinned: String, expected: String, path: PathBuf },
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("interface {name}: {source}")]
    Interface { name: String, source: io::Error },
    #[error("interface {name}: {source}")]
    Tc { name: String, source: TcError },
    #[error("tcx is not available on this kernel and the attach mode is tcx")]
    NoTcx,
    #[error("uplink {name}: the connection tagger needs tcx links (Linux 6.6 or later, attach mode auto or tcx)")]
    UplinkNeedsTcx { name: String },
    #[error("SPIFFE ID number {number} is longer than {max} bytes", max = abi::SPIFFE_ID_MAX)]
    SpiffeIdTooLong { number: u32 },
    #[error(transparent)]
    Events(#[from] EventError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Io { context, source }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// The node a proof is bound to, as the maps name it: this node, or the address of another
/// node's agent as this node's agent reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeId {
    /// This node: its own pods, registered on their veths.
    This,
    /// Another node, by its agent's address.
    At(Ipv4Addr),
}

impl NodeId {
    /// The maps' key of the node ([`abi::THIS_NODE`] for this node).
    pub fn key(self) -> u32 {
        match self {
            NodeId::This => abi::THIS_NODE,
            NodeId::At(ip) => abi::ip_key(ip),
        }
    }

    /// The node a map key names.
    pub fn from_key(key: u32) -> Self {
        if key == abi::THIS_NODE { NodeId::This } else { NodeId::At(abi::key_ip(key)) }
    }
}

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeId::This => f.write_str("this node"),
            NodeId::At(ip) => write!(f, "{ip}"),
        }
    }
}

/// A proof in the auth map: the pair, the node whose agent proved it, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthEntry {
    pub dst_spiffe_id: u32,
    pub src_spiffe_id: u32,
    pub src_node: NodeId,
    pub expiry: BootTime,
}

/// An entry of the endpoints map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub security_identity: u32,
    pub spiffe_id: u32,
    /// Host-side interface of a pod on this node, 0 for other pods.
    pub ifindex: u32,
    pub isolated: bool,
    /// Only audited MeshPolicies select it.
    pub audit: bool,
    pub mutual_auth: AuthRequirement,
}

/// A pod interface the programs are attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub ifindex: u32,
    /// `None` when the interface no longer exists in this network namespace.
    pub name: Option<String>,
    pub pod_ip: Ipv4Addr,
    pub attach: &'static str,
}

/// Packets and bytes per counter, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters(pub BTreeMap<&'static str, CounterValue>);

impl Counters {
    /// Packets counted under `c`.
    pub fn packets(&self, c: Counter) -> u64 {
        self.0.get(c.name()).map_or(0, |v| v.packets)
    }

    /// All packets dropped, whatever the reason.
    pub fn dropped(&self) -> u64 {
        Counter::ALL.iter().filter(|c| c.is_drop()).map(|c| self.packets(*c)).sum()
    }
}

/// What [`Datapath::apply_tables`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyStats {
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    pub policy_written: usize,
    pub policy_removed: usize,
    pub spiffe_names_written: usize,
    pub spiffe_names_removed: usize,
    /// The policy epoch after the change (cached admissions of older epochs are re-checked).
    pub policy_epoch: u32,
    /// Destination security identities whose policy entries did not fit in the map (or could
    /// not be written): none of their entries is in the map and their pods are isolated, so
    /// they accept nothing until the policy shrinks (audited ones stay audited: they pass
    /// everything and report all of it). Empty when the tables were applied whole.
    pub denied_destinations: Vec<u32>,
    /// Endpoints of other nodes (or their nodes, `endpoint_nodes`) left out because a map was
    /// full: their pods are sources without an identity (as the rest of the world), or
    /// without a node whose proofs count, until there is room.
    pub endpoints_left_out: usize,
    /// Conntrack entries flushed because their pod address left or changed hands.
    pub conntrack_flushed: usize,
}

impl ApplyStats {
    /// Whether everything the tables asked for is in the maps.
    pub fn complete(&self) -> bool {
        self.denied_destinations.is_empty() && self.endpoints_left_out == 0
    }
}

/// Typed handles on the pinned maps: what the loader writes and `meshauthctl` reads.
pub struct Maps {
    pin_dir: PathBuf,
    endpoints: HashMap<MapData, u32, EndpointValue>,
    endpoint_nodes: HashMap<MapData, u32, u32>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    auth: HashMap<MapData, AuthKey, AuthValue>,
    tag_keys: HashMap<MapData, TagKey, TagValue>,
    conntrack: HashMap<MapData, CtKey, CtValue>,
    interfaces: HashMap<MapData, u32, IfaceValue>,
    config: Array<MapData, ConfigValue>,
    counters: PerCpuArray<MapData, CounterValue>,
    spiffe_names: HashMap<MapData, u32, SpiffeName>,
    host_addrs: HashMap<MapData, u32, u32>,
    /// What the pinned maps hold at most (a pinned map keeps its size across restarts).
    endpoint_capacity: usize,
    endpoint_node_capacity: usize,
    policy_capacity: usize,
}

fn open_pinned(maps_dir: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(maps_dir.join(name)).map_err(map_err(name))
}

/// Every key of a map, read before changing it (aya's key iterator borrows the map).
fn keys_of<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, name: &'static str) -> Result<Vec<K>, DatapathError> {
    map.keys().collect::<Result<Vec<_>, _>>().map_err(map_err(name))
}

impl Maps {
    /// Opens the maps pinned under `pin_dir` (read and write; root only).
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let dir = pin_dir.join("maps");
        let hash = |name| -> Result<MapData, DatapathError> { open_pinned(&dir, name) };
        let capacity = |name: &'static str| -> Result<usize, DatapathError> {
            let info = MapInfo::from_pin(dir.join(name)).map_err(map_err(name))?;
            Ok(info.max_entries() as usize)
        };
        Ok(Maps {
            endpoint_capacity: capacity("endpoints")?,
            endpoint_node_capacity: capacity("endpoint_nodes")?,
            policy_capacity: capacity("policy")?,
            pin_dir: pin_dir.to_path_buf(),
            endpoints: HashMap::try_from(Map::HashMap(hash("endpoints")?)).map_err(map_err("endpoints"))?,
            endpoint_nodes: HashMap::try_from(Map::HashMap(hash("endpoint_nodes")?)).map_err(map_err("endpoint_nodes"))?,
            policy: LpmTrie::try_from(Map::LpmTrie(hash("policy")?)).map_err(map_err("policy"))?,
            auth: HashMap::try_from(Map::HashMap(hash("auth")?)).map_err(map_err("auth"))?,
            tag_keys: HashMap::try_from(Map::HashMap(hash("tag_keys")?)).map_err(map_err("tag_keys"))?,
            conntrack: HashMap::try_from(Map::LruHashMap(hash("conntrack")?)).map_err(map_err("conntrack"))?,
            interfaces: HashMap::try_from(Map::HashMap(hash("interfaces")?)).map_err(map_err("interfaces"))?,
            config: Array::try_from(Map::Array(hash("config")?)).map_err(map_err("config"))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(hash("counters")?)).map_err(map_err("counters"))?,
            spiffe_names: HashMap::try_from(Map::HashMap(hash("spiffe_names")?)).map_err(map_err("spiffe_names"))?,
            host_addrs: HashMap::try_from(Map::HashMap(hash("host_addrs")?)).map_err(map_err("host_addrs"))?,
        })
    }

    /// Every authenticated pair, expired ones included (the agent removes those).
    pub fn auth_entries(&self) -> Result<Vec<AuthEntry>, DatapathError> {
        let mut out = Vec::new();
        for item in self.auth.iter() {
            let (k, v) = item.map_err(map_err("auth"))?;
            out.push(AuthEntry {
                dst_spiffe_id: k.dst_spiffe_id,
                src_spiffe_id: k.src_spiffe_id,
                src_node: NodeId::from_key(k.src_node),
                expiry: BootTime(v.expiry_ns),
            });
        }
        out.sort_by_key(|e| (e.dst_spiffe_id, e.src_spiffe_id, e.src_node));
        Ok(out)
    }

    /// Every endpoint, by address.
    pub fn endpoints(&self) -> Result<Vec<Endpoint>, DatapathError> {
        let mut out = Vec::new();
        for item in self.endpoints.iter() {
            let (k, v) = item.map_err(map_err("endpoints"))?;
            out.push(Endpoint {
                ip: abi::key_ip(k),
                security_identity: v.security_identity,
                spiffe_id: v.spiffe_id,
                ifindex: v.ifindex,
                isolated: v.flags & abi::EP_ISOLATED != 0,
                audit: v.flags & abi::EP_AUDIT != 0,
                mutual_auth: abi::auth_requirement(v.mutual_auth),
            });
        }
        out.sort_by_key(|e| e.ip);
        Ok(out)
    }

    /// The interfaces the programs guard.
    pub fn interfaces(&self) -> Result<Vec<Interface>, DatapathError> {
        let mut out = Vec::new();
        for item in self.interfaces.iter() {
            let (ifindex, v) = item.map_err(map_err("interfaces"))?;
            out.push(Interface {
                ifindex,
                name: if_name(ifindex),
                pod_ip: abi::key_ip(v.pod_ip),
                attach: match v.attach_mode {
                    abi::ATTACH_TCX => "tcx",
                    abi::ATTACH_NETLINK => "clsact",
                    _ => "detached",
                },
            });
        }
        out.sort_by_key(|i| i.ifindex);
        Ok(out)
    }

    /// SPIFFE-ID number → SPIFFE ID, as the last [`Datapath::apply_tables`] wrote them.
    pub fn spiffe_names(&self) -> Result<BTreeMap<u32, String>, DatapathError> {
        let mut out = BTreeMap::new();
        for item in self.spiffe_names.iter() {
            let (k, v) = item.map_err(map_err("spiffe_names"))?;
            out.insert(k, v.as_string());
        }
        Ok(out)
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let mut out = Counters::default();
        for c in Counter::ALL {
            let per_cpu = self.counters.get(&(*c as u32), 0).map_err(map_err("counters"))?;
            let mut sum = CounterValue::default();
            for v in per_cpu.iter() {
                sum.packets += v.packets;
                sum.bytes += v.bytes;
            }
            out.0.insert(c.name(), sum);
        }
        Ok(out)
    }

    /// Entries in the conntrack map (walks it: slow on a big table).
    pub fn conntrack_entries(&self) -> Result<usize, DatapathError> {
        Ok(keys_of(&self.conntrack, "conntrack")?.len())
    }

    /// The datapath configuration the programs read.
    pub fn runtime_config(&self) -> Result<ConfigValue, DatapathError> {
        self.config.get(&0, 0).map_err(map_err("config"))
    }

    /// Where the maps are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// The loaded datapath: its programs, pinned links and maps.
pub struct Datapath {
    config: DatapathConfig,
    to_pod: SchedClassifier,
    from_pod: SchedClassifier,
    tag_syn: SchedClassifier,
    maps: Maps,
    adopted: bool,
    tcx: bool,
}

impl Datapath {
    /// Adopts the pinned datapath of this version, or loads it (upgrading pinned links of an
    /// older version atomically). Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
    ///
    /// Call it from the network namespace that holds the pod interfaces: stale interfaces are
    /// recognised by their ifindex there.
    pub fn load_or_adopt(config: DatapathConfig) -> Result<Self, DatapathError> {
        Self::load(config, false)
    }

    /// Loads the programs afresh even when this version is pinned, and moves every link to
    /// them atomically: what an upgrade does, on demand.
    pub fn reload_programs(&mut self) -> Result<(), DatapathError> {
        let (Programs { to_pod, from_pod, tag_syn }, _) = install_programs(&self.config, true)?;
        self.to_pod = to_pod;
        self.from_pod = from_pod;
        self.tag_syn = tag_syn;
        self.adopted = false;
        self.forget_vanished_interfaces()?;
        self.repoint_links()
    }

    fn load(config: DatapathConfig, force: bool) -> Result<Self, DatapathError> {
        config.validate()?;
        ensure_bpffs(&config.pin_dir)?;
        for sub in ["maps", "programs", "links"] {
            let dir = config.pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        check_pinned_maps(&config)?;
        let (Programs { to_pod, from_pod, tag_syn }, adopted) = install_programs(&config, force)?;
        let maps = Maps::open(&config.pin_dir)?;
        let tcx = match config.attach_mode {
            AttachMode::Netlink => false,
            AttachMode::Tcx => true,
            AttachMode::Auto => kernel_has_tcx(),
        };
        let mut dp = Datapath { config, to_pod, from_pod, tag_syn, maps, adopted, tcx };
        dp.write_runtime_config()?;
        // Vanished interfaces first: a pin of a deleted veth cannot be repointed.
        dp.forget_vanished_interfaces()?;
        dp.repoint_links()?;
        tracing::info!(version = PROGRAM_VERSION, adopted, pin_dir = %dp.config.pin_dir.display(), "datapath ready");
        Ok(dp)
    }

    /// Whether the programs were adopted from pins (`false`: this loader loaded them).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The configuration.
    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }

    fn write_runtime_config(&mut self) -> Result<(), DatapathError> {
        let mut v = self.maps.runtime_config()?;
        v.events_per_sec = self.config.events_per_sec_per_cpu;
        v.allow_host = u8::from(self.config.allow_host);
        v.pass_sample_every = self.config.pass_sample_every;
        let t = self.config.conntrack_timeouts;
        (v.ct_tcp_s, v.ct_udp_s, v.ct_icmp_s, v.ct_closing_s) = (t.tcp_s, t.udp_s, t.icmp_s, t.closing_s);
        v.ipv6_mode = match self.config.ipv6 {
            Ipv6Mode::Drop => abi::IPV6_DROP,
            Ipv6Mode::Pass => abi::IPV6_PASS,
        };
        self.maps.config.set(0, v, 0).map_err(map_err("config"))
    }

    fn link_path(&self, ifindex: u32, direction: &str) -> PathBuf {
        self.config.pin_dir.join("links").join(format!("{ifindex}-{direction}"))
    }

    /// Guards `ifname`, the host side of the veth of the pod whose address is `pod_ip`:
    /// `from_pod` on ingress (what the pod sends), `to_pod` on egress (what it receives).
    /// Idempotent; a restarted agent calls it again for every pod and nothing is re-attached.
    pub fn attach(&mut self, ifname: &str, pod_ip: Ipv4Addr) -> Result<(), DatapathError> {
        let ifindex = if_index(ifname)?;
        // The pod's address is registered before from_pod runs, which drops (as spoofed)
        // anything from an interface it does not know.
        let mode = if self.tcx { abi::ATTACH_TCX } else { abi::ATTACH_NETLINK };
        let value = IfaceValue { pod_ip: abi::ip_key(pod_ip), attach_mode: mode, pad: [0; 3] };
        self.maps.interfaces.insert(ifindex, value, 0).map_err(map_err("interfaces"))?;
        if let Ok(mut ep) = self.maps.endpoints.get(&abi::ip_key(pod_ip), 0) {
            ep.ifindex = ifindex;
            self.maps.endpoints.insert(abi::ip_key(pod_ip), ep, 0).map_err(map_err("endpoints"))?;
        }
        // Its pods' proofs are this node's from now on, not only from the next apply: a pod
        // whose veth comes after the tables would otherwise be checked against a proof of its
        // node's address, which no handshake writes.
        self.maps.endpoint_nodes.insert(abi::ip_key(pod_ip), NodeId::This.key(), 0).map_err(map_err("endpoint_nodes"))?;
        if self.tcx {
            self.attach_tcx(ifname, ifindex, TcAttachType::Ingress)?;
            self.attach_tcx(ifname, ifindex, TcAttachType::Egress)?;
        } else {
            self.attach_netlink(ifname, TcAttachType::Ingress, false)?;
            self.attach_netlink(ifname, TcAttachType::Egress, false)?;
        }
        tracing::debug!(ifname, ifindex, %pod_ip, "attached");
        Ok(())
    }

    fn program(&mut self, t: TcAttachType) -> (&'static str, &mut SchedClassifier) {
        match t {
            TcAttachType::Ingress => (FROM_POD, &mut self.from_pod),
            _ => (TO_POD, &mut self.to_pod),
        }
    }

    fn attach_tcx(&mut self, ifname: &str, ifindex: u32, t: TcAttachType) -> Result<(), DatapathError> {
        let path = self.link_path(ifindex, direction_name(t));
        let (name, prog) = self.program(t);
        let prog_id = prog.info().map_err(prog_err(name))?.id();
        if path.exists() {
            // A pin whose program is not on the interface any more (the interface was
            // recreated with the same index) is stale: replace it.
            let (_, attached) = SchedClassifier::query_tcx(ifname, t).map_err(prog_err(name))?;
            if attached.iter().any(|p| p.id() == prog_id) {
                return Ok(());
            }
            std::fs::remove_file(&path).map_err(io_err(format!("removing stale {}", path.display())))?;
        }
        // First: meshauth decides before other tcx programs, and passes with TCX_NEXT so
        // they still run.
        let id = prog.attach_with_options(ifname, t, TcAttachOptions::TcxOrder(LinkOrder::first())).map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.clone(), source })?;
        // Dropping the returned PinnedLink closes our descriptor; the pin keeps it attached.
        fd_link.pin(&path).map_err(|source| DatapathError::Pin { path: path.clone(), source })?;
        Ok(())
    }

    fn attach_netlink(&mut self, ifname: &str, t: TcAttachType, replace: bool) -> Result<(), DatapathError> {
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            // "Exists" is the normal case after the first attach.
            tracing::trace!(ifname, error = %e, "clsact qdisc not added");
        }
        let (name, prog) = self.program(t);
        let id = if replace {
            let old = SchedClassifierLink::attached(ifname, t, NETLINK_PRIORITY, NETLINK_HANDLE, None)
                .map_err(|source| DatapathError::Interface { name: ifname.into(), source })?;
            prog.attach_to_link(old).map_err(prog_err(name))?
        } else {
            match prog.attach_with_options(
                ifname,
                t,
                TcAttachOptions::Netlink(NlOptions { priority: NETLINK_PRIORITY, handle: NETLINK_HANDLE, classid: None }),
            ) {
                Ok(id) => id,
                // Already attached by us (an adopted loader): replace keeps it current.
                Err(_) => return self.attach_netlink(ifname, t, true),
            }
        };
        let link = prog.take_link(id).map_err(prog_err(name))?;
        // A clsact filter lives in the kernel on its own; dropping aya's handle would delete
        // it. Forgetting the handle (a few bytes) is what leaves it attached across restarts.
        std::mem::forget(link);
        Ok(())
    }

    /// Stops guarding `ifname`: detaches both programs. The pod's address stays registered
    /// (packets inside the programs at this instant must still find it, or they would be
    /// dropped as spoofed); the entry goes when the interface does.
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let ifindex = if_index(ifname)?;
        self.detach_links(ifindex, Some(ifname))?;
        if let Ok(mut v) = self.maps.interfaces.get(&ifindex, 0) {
            v.attach_mode = abi::ATTACH_NONE;
            self.maps.interfaces.insert(ifindex, v, 0).map_err(map_err("interfaces"))?;
        }
        Ok(())
    }

    fn detach_links(&mut self, ifindex: u32, ifname: Option<&str>) -> Result<(), DatapathError> {
        let iface = self.maps.interfaces.get(&ifindex, 0).ok();
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let path = self.link_path(ifindex, direction_name(t));
            if path.exists() {
                // The pin was the link's last reference: removing it detaches.
                std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
            }
            if let (Some(v), Some(name)) = (iface, ifname)
                && v.attach_mode == abi::ATTACH_NETLINK
                && let Ok(link) = SchedClassifierLink::attached(name, t, NETLINK_PRIORITY, NETLINK_HANDLE, None)
            {
                // Dropping aya's handle of a clsact filter deletes the filter.
                drop(link);
            }
        }
        Ok(())
    }

    /// Makes the `host_addrs` map hold exactly `addrs`: the node's own addresses, whose
    /// traffic reaches local pods when `allow_host` is set.
    pub fn set_host_addresses(&mut self, addrs: &std::collections::BTreeSet<Ipv4Addr>) -> Result<(), DatapathError> {
        let want: std::collections::BTreeSet<u32> = addrs.iter().map(|a| abi::ip_key(*a)).take(HOST_ADDR_ENTRIES as usize).collect();
        for key in &want {
            if self.maps.host_addrs.get(key, 0).is_err() {
                self.maps.host_addrs.insert(*key, 1, 0).map_err(map_err("host_addrs"))?;
            }
        }
        let have = keys_of(&self.maps.host_addrs, "host_addrs")?;
        for key in have.iter().filter(|k| !want.contains(k)) {
            remove_ignoring_missing(self.maps.host_addrs.remove(key), "host_addrs")?;
        }
        Ok(())
    }

    /// Stops guarding the interface `ifindex` for good (its pod is gone): detaches both
    /// programs, removes their pins and its `interfaces` entry. Idempotent.
    pub fn release_interface(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.detach_links(ifindex, None)?;
        remove_ignoring_missing(self.maps.interfaces.remove(&ifindex), "interfaces")
    }

    /// Points every pinned link (and clsact filter) at this loader's programs.
    fn repoint_links(&mut self) -> Result<(), DatapathError> {
        let dir = self.config.pin_dir.join("links");
        let entries = std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?;
        for entry in entries {
            let path = entry.map_err(io_err(format!("reading {}", dir.display())))?.path();
            let t = match path.file_name().and_then(|n| n.to_str()) {
                Some(n) if n.ends_with("-ingress") => TcAttachType::Ingress,
                Some(n) if n.ends_with("-egress") => TcAttachType::Egress,
                _ => continue,
            };
            let link_err = |source| DatapathError::Link { path: path.clone(), source };
            let pinned = PinnedLink::from_pin(&path).map_err(link_err)?;
            let fd_link = FdLink::from(pinned);
            let (name, prog) = self.program(t);
            let want = prog.info().map_err(prog_err(name))?.id();
            if fd_link.info().map_err(link_err)?.program_id() == want {
                continue;
            }
            let link = SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
            // BPF_LINK_UPDATE: the kernel swaps the program in one step under traffic.
            let id = prog.attach_to_link(link).map_err(prog_err(name))?;
            drop(prog.take_link(id).map_err(prog_err(name))?);
            tracing::info!(link = %path.display(), "link moved to program version {PROGRAM_VERSION}");
        }
        self.repoint_uplinks()?;
        for iface in self.maps.interfaces()? {
            if iface.attach == "clsact"
                && let Some(name) = iface.name
            {
                self.attach_netlink(&name, TcAttachType::Ingress, true)?;
                self.attach_netlink(&name, TcAttachType::Egress, true)?;
            }
        }
        Ok(())
    }

    /// Drops pins and entries of interfaces that no longer exist (pods deleted while no agent
    /// ran).
    fn forget_vanished_interfaces(&mut self) -> Result<(), DatapathError> {
        for iface in self.maps.interfaces()? {
            if iface.name.is_none() {
                tracing::info!(ifindex = iface.ifindex, "interface gone, forgetting it");
                self.release_interface(iface.ifindex)?;
            }
        }
        Ok(())
    }

    /// Makes the endpoints, policy and SPIFFE-name maps hold exactly `tables`: writes what is
    /// new or different, then deletes what is gone, so a lookup never meets an empty map.
    /// Bumps the policy epoch when anything changed, so cached admissions are checked again,
    /// and flushes the conntrack entries of addresses that left or now name another pod.
    ///
    /// Fails closed when the tables do not fit: a destination whose policy entries cannot all
    /// be written gets none and its pods are isolated (they accept nothing, never more than
    /// before), this node's pods are written before other nodes' (a missing local endpoint
    /// would pass everything), and [`ApplyStats::complete`] says what was left out. Only a
    /// failure to read or delete is an error.
    pub fn apply_tables(&mut self, tables: &CompiledTables) -> Result<ApplyStats, DatapathError> {
        let mut stats = ApplyStats::default();
        let local: StdHashMap<u32, u32> = self.maps.interfaces()?.into_iter().map(|i| (abi::ip_key(i.pod_ip), i.ifindex)).collect();

        // Policy entries first (written after the endpoints), to know which destinations fit.
        let mut want_policy: BTreeMap<(u32, PolicyKeyData), u8> = BTreeMap::new();
        for p in &tables.policy {
            for (port, bits) in p.prefixes() {
                let data = PolicyKeyData {
                    dst_identity: p.dst_identity,
                    src_identity: p.src_identity,
                    protocol: abi::protocol_number(p.protocol),
                    port: port.to_be(),
                };
                // The compiler's ranges are disjoint; should two entries still land on one
                // key, the stricter authentication wins.
                let slot = want_policy.entry((abi::POLICY_FIXED_BITS + u32::from(bits), data)).or_insert(0);
                *slot = (*slot).max(abi::auth_number(p.auth));
            }
        }
        let mut denied = fit_destinations(&mut want_policy, self.maps.policy_capacity);

        // Endpoints.
        let mut want: StdHashMap<u32, EndpointValue> = StdHashMap::new();
        for e in &tables.endpoints {
            let key = abi::ip_key(e.ip);
            want.insert(
                key,
                EndpointValue {
                    security_identity: e.security_identity,
                    spiffe_id: e.spiffe_id,
                    ifindex: local.get(&key).copied().unwrap_or(0),
                    flags: if e.isolated {
                        abi::EP_ISOLATED
                    } else if e.audit {
                        abi::EP_AUDIT
                    } else {
                        0
                    },
                    mutual_auth: abi::auth_number(e.mutual_auth),
                    pad: 0,
                },
            );
        }
        isolate(&mut want, &denied);
        // The node of every endpoint whose proofs count for it, before any endpoint names a
        // new pod: a pod written without its node would be refused until the next apply.
        let want_nodes: StdHashMap<u32, u32> = tables
            .endpoints
            .iter()
            .filter_map(|e| {
                let key = abi::ip_key(e.ip);
                // An unspecified address would be this node's key: a pod elsewhere must never
                // count this node's proofs as its own.
                let node =
                    if local.contains_key(&key) { NodeId::This } else { NodeId::At(e.node_address.filter(|a| !a.is_unspecified())?) };
                Some((key, node.key()))
            })
            .collect();
        let (stale_nodes, nodes_left_out) = self.write_endpoint_nodes(&want_nodes)?;
        stats.endpoints_left_out += nodes_left_out;
        let have_endpoints: StdHashMap<u32, EndpointValue> =
            self.maps.endpoints.iter().collect::<Result<_, _>>().map_err(map_err("endpoints"))?;
        // Addresses that left, or now name another SPIFFE ID (a new pod on a reused address):
        // no flow cached for the old owner may carry on with the new one.
        let moved: std::collections::BTreeSet<u32> =
            have_endpoints.iter().filter(|(k, v)| want.get(k).is_none_or(|w| w.spiffe_id != v.spiffe_id)).map(|(k, _)| *k).collect();
        // Locals before the rest, and the stale ones out first when both would not fit.
        let mut order: Vec<(&u32, &EndpointValue)> = want.iter().collect();
        order.sort_by_key(|(k, v)| (v.ifindex == 0, **k));
        let stale: Vec<u32> = have_endpoints.keys().filter(|k| !want.contains_key(k)).copied().collect();
        let union = have_endpoints.len() + want.keys().filter(|k| !have_endpoints.contains_key(k)).count();
        let remove_stale_first = union > self.maps.endpoint_capacity;
        if remove_stale_first {
            for k in &stale {
                remove_ignoring_missing(self.maps.endpoints.remove(k), "endpoints")?;
                stats.endpoints_removed += 1;
            }
        }
        for (k, v) in order {
            if have_endpoints.get(k) == Some(v) {
                continue;
            }
            match self.maps.endpoints.insert(*k, *v, 0) {
                Ok(()) => stats.endpoints_written += 1,
                Err(error) if v.ifindex == 0 => {
                    tracing::warn!(%error, ip = %abi::key_ip(*k), "endpoint of another node left out");
                    stats.endpoints_left_out += 1;
                }
                Err(e) => return Err(map_err("endpoints")(e)),
            }
        }
        if !remove_stale_first {
            for k in &stale {
                remove_ignoring_missing(self.maps.endpoints.remove(k), "endpoints")?;
                stats.endpoints_removed += 1;
            }
        }

        for k in &stale_nodes {
            remove_ignoring_missing(self.maps.endpoint_nodes.remove(k), "endpoint_nodes")?;
        }

        // Policy: one trie entry per port block.
        let have: Vec<_> = self.maps.policy.keys().collect::<Result<_, _>>().map_err(map_err("policy"))?;
        let is_stale = |k: &aya::maps::lpm_trie::Key<PolicyKeyData>| !want_policy.contains_key(&(k.prefix_len(), k.data()));
        let union = have.len() + want_policy.len() - have.iter().filter(|k| !is_stale(k)).count();
        // Stale entries only ever allow: removing them first is stricter, never looser.
        let remove_stale_first = union > self.maps.policy_capacity;
        if remove_stale_first {
            for k in have.iter().filter(|k| is_stale(k)) {
                remove_ignoring_missing(self.maps.policy.remove(k), "policy")?;
                stats.policy_removed += 1;
            }
        }
        let mut failed: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
        for ((bits, data), auth) in &want_policy {
            if failed.contains(&data.dst_identity) {
                continue;
            }
            let key = aya::maps::lpm_trie::Key::new(*bits, *data);
            let value = PolicyValue { auth: *auth, pad: [0; 3] };
            // An exact-key get: the trie answers the longest match, so compare the value only
            // when the stored key is this one.
            if self.maps.policy.get(&key, 0).ok() != Some(value) || !have.iter().any(|k| k.prefix_len() == *bits && k.data() == *data) {
                match self.maps.policy.insert(&key, value, 0) {
                    Ok(()) => stats.policy_written += 1,
                    Err(error) => {
                        tracing::error!(%error, dst_identity = data.dst_identity, "policy entry not written: the destination accepts nothing");
                        failed.insert(data.dst_identity);
                    }
                }
            }
        }
        if !failed.is_empty() {
            // Half a destination's rules could deny what another rule was meant to allow,
            // or keep what the policy took away: it gets none, and its pods are isolated.
            want_policy.retain(|(_, d), _| !failed.contains(&d.dst_identity));
            isolate(&mut want, &failed);
            for (k, v) in want.iter().filter(|(_, v)| failed.contains(&v.security_identity)) {
                if v.ifindex != 0 || self.maps.endpoints.get(k, 0).is_ok() {
                    self.maps.endpoints.insert(*k, *v, 0).map_err(map_err("endpoints"))?;
                }
            }
        }
        // A failed destination's entries written before the failure are not in `have`.
        let have: Vec<_> =
            if failed.is_empty() { have } else { self.maps.policy.keys().collect::<Result<_, _>>().map_err(map_err("policy"))? };
        if !remove_stale_first || !failed.is_empty() {
            for k in have.iter().filter(|k| !want_policy.contains_key(&(k.prefix_len(), k.data()))) {
                remove_ignoring_missing(self.maps.policy.remove(k), "policy")?;
                stats.policy_removed += 1;
            }
        }
        denied.extend(failed);
        stats.denied_destinations = denied.into_iter().collect();
        if !moved.is_empty() {
            stats.conntrack_flushed = self.flush_conntrack(&moved)?;
        }

        // SPIFFE names, for people.
        let mut want: StdHashMap<u32, &str> = StdHashMap::new();
        for (n, id) in &tables.spiffe_ids {
            want.insert(*n, id);
        }
        let have = keys_of(&self.maps.spiffe_names, "spiffe_names")?;
        for (n, id) in &want {
            if self.maps.spiffe_names.get(n, 0).ok().map(|v| v.as_string()).as_deref() != Some(*id) {
                let name = SpiffeName::new(id).ok_or(DatapathError::SpiffeIdTooLong { number: *n })?;
                self.maps.spiffe_names.insert(*n, name, 0).map_err(map_err("spiffe_names"))?;
                stats.spiffe_names_written += 1;
            }
        }
        for k in have.iter().filter(|k| !want.contains_key(k)) {
            remove_ignoring_missing(self.maps.spiffe_names.remove(k), "spiffe_names")?;
            stats.spiffe_names_removed += 1;
        }

        let mut cfg = self.maps.runtime_config()?;
        if stats.endpoints_written + stats.endpoints_removed + stats.policy_written + stats.policy_removed > 0 {
            cfg.policy_epoch = cfg.policy_epoch.wrapping_add(1);
            self.maps.config.set(0, cfg, 0).map_err(map_err("config"))?;
        }
        stats.policy_epoch = cfg.policy_epoch;
        tracing::debug!(?stats, "tables applied");
        Ok(stats)
    }

    /// Writes the `endpoint_nodes` entries of `want` that differ; returns the keys to remove
    /// once the endpoints no longer name them, and how many entries did not fit.
    fn write_endpoint_nodes(&mut self, want: &StdHashMap<u32, u32>) -> Result<(Vec<u32>, usize), DatapathError> {
        let have: StdHashMap<u32, u32> = self.maps.endpoint_nodes.iter().collect::<Result<_, _>>().map_err(map_err("endpoint_nodes"))?;
        let stale: Vec<u32> = have.keys().filter(|k| !want.contains_key(k)).copied().collect();
        let mut left_out = 0;
        if have.len() + want.keys().filter(|k| !have.contains_key(k)).count() > self.maps.endpoint_node_capacity {
            // Removing first only takes proofs away from addresses that are leaving.
            for k in &stale {
                remove_ignoring_missing(self.maps.endpoint_nodes.remove(k), "endpoint_nodes")?;
            }
        }
        for (k, node) in want {
            if have.get(k) == Some(node) {
                continue;
            }
            if let Err(error) = self.maps.endpoint_nodes.insert(*k, *node, 0) {
                // The pod has no node whose proof counts: its authenticated traffic is refused.
                tracing::warn!(%error, ip = %abi::key_ip(*k), "node of an endpoint left out");
                left_out += 1;
            }
        }
        Ok((stale, left_out))
    }

    /// Deletes every conntrack entry to or from one of `ips` (keys as [`abi::ip_key`]):
    /// what a pod that left, or a new pod on its address, must not inherit. Returns how many.
    pub fn flush_conntrack(&mut self, ips: &std::collections::BTreeSet<u32>) -> Result<usize, DatapathError> {
        let keys: Vec<CtKey> =
            self.maps.conntrack.keys().filter_map(Result::ok).filter(|k| ips.contains(&k.saddr) || ips.contains(&k.daddr)).collect();
        for k in &keys {
            remove_ignoring_missing(self.maps.conntrack.remove(k), "conntrack")?;
        }
        Ok(keys.len())
    }

    /// Records that `(dst, src)` authenticated each other until `expiry`, proven by the agent
    /// of `src_node`, without a connection key: a SYN from another node for this pair is then
    /// refused (see [`Datapath::set_auth_keyed`]); same-node pairs need none. Only packets
    /// whose source address is on `src_node` (`endpoint_nodes`) count as authenticated by it.
    /// The program stops passing the pair [`abi::CLOCK_SLACK_NS`] (10 ms) before `expiry`: its
    /// clock may be one tick old, and a pair must never pass late.
    pub fn set_auth(&mut self, dst_spiffe_id: u32, src_spiffe_id: u32, src_node: NodeId, expiry: BootTime) -> Result<(), DatapathError> {
        let key = AuthKey { dst_spiffe_id, src_spiffe_id, src_node: src_node.key() };
        self.maps.auth.insert(key, AuthValue { expiry_ns: expiry.0, ..AuthValue::default() }, 0).map_err(map_err("auth"))
    }

    /// Forgets the proof of a pair by one node; `Ok(false)` when it was not there.
    pub fn remove_auth(&mut self, dst_spiffe_id: u32, src_spiffe_id: u32, src_node: NodeId) -> Result<bool, DatapathError> {
        match self.maps.auth.remove(&AuthKey { dst_spiffe_id, src_spiffe_id, src_node: src_node.key() }) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err("auth")(e)),
        }
    }

    /// Forgets every node's proof of a pair; how many there were.
    pub fn remove_pair(&mut self, dst_spiffe_id: u32, src_spiffe_id: u32) -> Result<usize, DatapathError> {
        let keys: Vec<AuthKey> = keys_of(&self.maps.auth, "auth")?
            .into_iter()
            .filter(|k| k.dst_spiffe_id == dst_spiffe_id && k.src_spiffe_id == src_spiffe_id)
            .collect();
        for k in &keys {
            remove_ignoring_missing(self.maps.auth.remove(k), "auth")?;
        }
        Ok(keys.len())
    }

    /// Every proof in the auth map.
    pub fn auth_entries(&self) -> Result<Vec<AuthEntry>, DatapathError> {
        self.maps.auth_entries()
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        self.maps.counters()
    }

    /// The event stream (one reader per node: the agent). Needs a tokio runtime.
    pub fn events(&self) -> Result<EventStream, DatapathError> {
        Ok(EventStream::open(&self.config.pin_dir.join("maps").join("events"))?)
    }

    /// Runs a program on `packet` `repeat` times with `BPF_PROG_TEST_RUN`, against the live
    /// maps (the run counts and may write conntrack like real traffic).
    pub fn test_run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DatapathError> {
        let (name, prog) = match hook {
            Hook::ToPod => (TO_POD, &self.to_pod),
            Hook::FromPod => (FROM_POD, &self.from_pod),
            Hook::TagSyn => (TAG_SYN, &self.tag_syn),
        };
        test_run(prog, name, packet, repeat)
    }

    /// The kernel's record of one of the programs: its run count and run time, which the
    /// kernel keeps while BPF statistics are on (`aya::sys::enable_stats`).
    pub fn program_info(&self, hook: Hook) -> Result<aya::programs::ProgramInfo, DatapathError> {
        let (name, prog) = match hook {
            Hook::ToPod => (TO_POD, &self.to_pod),
            Hook::FromPod => (FROM_POD, &self.from_pod),
            Hook::TagSyn => (TAG_SYN, &self.tag_syn),
        };
        prog.info().map_err(prog_err(name))
    }

    /// Detaches everything and removes every pin: the datapath is gone from the node.
    pub fn uninstall(mut self) -> Result<(), DatapathError> {
        for iface in self.maps.interfaces()? {
            self.detach_links(iface.ifindex, iface.name.as_deref())?;
        }
        let dir = self.config.pin_dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).map_err(io_err(format!("removing {}", dir.display())))
    }
}

/// The two programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Egress of the host-side veth: traffic into the pod.
    ToPod,
    /// Ingress of the host-side veth: traffic from the pod.
    FromPod,
    /// Egress of an uplink: the connection tagger.
    TagSyn,
}

/// What one `BPF_PROG_TEST_RUN` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRunOutcome {
    /// The program's return value: `TC_ACT_UNSPEC` (-1) passes, `TC_ACT_SHOT` (2) drops.
    pub retval: i32,
    /// Kernel-measured time per run, averaged over the repeats (whole nanoseconds).
    pub ns_per_run: u64,
}

impl TestRunOutcome {
    /// Whether the program let the packet through.
    pub fn passed(&self) -> bool {
        self.retval != 2
    }
}

pub(crate) fn test_run(prog: &SchedClassifier, name: &'static str, packet: &[u8], repeat: u32) -> Result<TestRunOutcome, DatapathError> {
    use aya::programs::{TestRun as _, TestRunOptions};
    let r = prog.test_run(TestRunOptions { data_in: Some(packet), repeat, ..TestRunOptions::default() }).map_err(prog_err(name))?;
    Ok(TestRunOutcome { retval: r.return_value as i32, ns_per_run: u64::try_from(r.duration.as_nanos()).unwrap_or(u64::MAX) })
}

/// Keeps the policy entries of whole destinations, in identity order, while they fit in
/// `capacity`; returns the destinations left out (their entries are removed from `want`).
/// Fewer rules for a destination could allow what a missing stricter rule meant to guard,
/// so a destination is in whole or not at all.
fn fit_destinations(want: &mut BTreeMap<(u32, PolicyKeyData), u8>, capacity: usize) -> std::collections::BTreeSet<u32> {
    let mut per_destination: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, data) in want.keys() {
        *per_destination.entry(data.dst_identity).or_default() += 1;
    }
    let mut used = 0usize;
    let mut denied = std::collections::BTreeSet::new();
    for (dst, n) in per_destination {
        if used + n <= capacity {
            used += n;
        } else {
            denied.insert(dst);
        }
    }
    if !denied.is_empty() {
        tracing::error!(
            capacity,
            denied = ?denied,
            "the policy needs more entries than the policy map holds: these destinations accept nothing"
        );
        want.retain(|(_, d), _| !denied.contains(&d.dst_identity));
    }
    denied
}

/// Marks the endpoints of `identities` isolated: with none of their policy entries in the
/// map, they accept nothing (the node's own probes aside, as for any isolated pod). An
/// audited endpoint stays audited: its policies isolate nothing, so the missing entries can
/// only make it report more would-be denials, never drop.
fn isolate(want: &mut StdHashMap<u32, EndpointValue>, identities: &std::collections::BTreeSet<u32>) {
    for v in want.values_mut() {
        if identities.contains(&v.security_identity) && v.flags & abi::EP_AUDIT == 0 {
            v.flags |= abi::EP_ISOLATED;
        }
    }
}

fn remove_ignoring_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), DatapathError> {
    match r {
        Err(e) if !is_not_found(&e) => Err(map_err(name)(e)),
        _ => Ok(()),
    }
}

/// aya reports a missing key as KeyNotFound on lookups and as ENOENT from the syscall on
/// deletes.
fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

fn direction_name(t: TcAttachType) -> &'static str {
    match t {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

/// The programs of one build.
struct Programs {
    to_pod: SchedClassifier,
    from_pod: SchedClassifier,
    tag_syn: SchedClassifier,
}

/// Adopts or loads the programs of this version; returns them and whether they were adopted.
fn install_programs(config: &DatapathConfig, force: bool) -> Result<(Programs, bool), DatapathError> {
    let programs = config.pin_dir.join("programs");
    let current = programs.join(PROGRAM_VERSION);
    let open = |dir: &Path| -> Result<Programs, DatapathError> {
        Ok(Programs {
            to_pod: SchedClassifier::from_pin(dir.join(TO_POD)).map_err(prog_err(TO_POD))?,
            from_pod: SchedClassifier::from_pin(dir.join(FROM_POD)).map_err(prog_err(FROM_POD))?,
            tag_syn: SchedClassifier::from_pin(dir.join(TAG_SYN)).map_err(prog_err(TAG_SYN))?,
        })
    };
    if !force && [TO_POD, FROM_POD, TAG_SYN].iter().all(|p| current.join(p).exists()) {
        return Ok((open(&current)?, true));
    }

    let maps_dir = config.pin_dir.join("maps");
    let mut loader = EbpfLoader::new();
    for spec in MAPS {
        // Pinned maps are reused as they are: the traffic's state (conntrack, auth pairs)
        // survives upgrades. New maps are created at the configured size.
        loader.map_pin_path(spec.name, maps_dir.join(spec.name));
        loader.map_max_entries(spec.name, (spec.entries)(config));
    }
    let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
    // bpffs refuses names with a dot in them.
    let staging = programs.join(format!("staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    for name in [TO_POD, FROM_POD, TAG_SYN] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::Program { name, source: ProgramError::NotLoaded })?
            .try_into()
            .map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))?;
        let path = staging.join(name);
        prog.pin(&path).map_err(|source| DatapathError::Pin { path, source })?;
    }
    drop(ebpf);
    // Older versions stay loaded as long as a link still points at them; the caller moves
    // the links, and then nothing holds them.
    let entries = std::fs::read_dir(&programs).map_err(io_err(format!("reading {}", programs.display())))?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p != staging {
            std::fs::remove_dir_all(&p).map_err(io_err(format!("removing {}", p.display())))?;
        }
    }
    std::fs::rename(&staging, &current).map_err(io_err(format!("renaming {} to {}", staging.display(), current.display())))?;
    Ok((open(&current)?, false))
}

/// Refuses pinned maps whose shape differs from what the programs expect: the verifier checks
/// the program against the map it is given, so a stale layout would load and misbehave.
fn check_pinned_maps(config: &DatapathConfig) -> Result<(), DatapathError> {
    for spec in MAPS {
        let path = config.pin_dir.join("maps").join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(map_err(spec.name))?;
        let incompatible = |what, pinned: String, expected: String| DatapathError::IncompatibleMap {
            name: spec.name,
            what,
            pinned,
            expected,
            path: path.clone(),
        };
        let kind = info.map_type().map_err(map_err(spec.name))?;
        let mismatch = if kind != spec.kind {
            Some(incompatible("type", format!("{kind:?}"), format!("{:?}", spec.kind)))
        } else if spec.kind != MapType::RingBuf && info.key_size() as usize != spec.key_size {
            Some(incompatible("key size", info.key_size().to_string(), spec.key_size.to_string()))
        } else if spec.kind != MapType::RingBuf && info.value_size() as usize != spec.value_size {
            Some(incompatible("value size", info.value_size().to_string(), spec.value_size.to_string()))
        } else {
            None
        };
        if let Some(error) = mismatch {
            if !spec.rebuildable {
                return Err(error);
            }
            tracing::warn!(%error, "replacing the pinned map with one of this loader's layout");
            std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
            // A new config map starts its policy epoch again: conntrack entries stamped with
            // the old epochs must not meet a number they once had.
            if spec.name == "config" {
                let ct = config.pin_dir.join("maps").join("conntrack");
                if ct.exists() {
                    std::fs::remove_file(&ct).map_err(io_err(format!("removing {}", ct.display())))?;
                }
            }
            continue;
        }
        let want = (spec.entries)(config);
        if info.max_entries() != want {
            tracing::warn!(
                map = spec.name,
                pinned = info.max_entries(),
                configured = want,
                "pinned map keeps its size; remove the pin to resize it"
            );
        }
    }
    Ok(())
}

fn statfs_type(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf when nothing is mounted
/// there (a fresh machine).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && statfs_type(root) != Some(BPF_FS_MAGIC) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: all pointers are valid C strings; no data argument.
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(DatapathError::Bpffs { path: pin_dir.into(), source: io::Error::last_os_error() });
        }
        tracing::info!("mounted bpffs on {BPFFS_ROOT}");
    }
    // The pin dir may not exist yet: check its closest existing ancestor.
    let mut probe = pin_dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if statfs_type(probe) != Some(BPF_FS_MAGIC) {
        return Err(DatapathError::Bpffs {
            path: pin_dir.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not on a bpffs", probe.display())),
        });
    }
    Ok(())
}

fn kernel_has_tcx() -> bool {
    // tcx arrived in 6.6; probing the version is what aya's own `attach` does.
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// The index of an interface in the current network namespace.
pub fn if_index(name: &str) -> Result<u32, DatapathError> {
    let c = CString::new(name).map_err(|_| DatapathError::Interface {
        name: name.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"),
    })?;
    // SAFETY: `c` is a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(DatapathError::Interface { name: name.into(), source: io::Error::last_os_error() }),
        i => Ok(i),
    }
}

/// The name of an interface index in the current network namespace, if it exists.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}
