//! The maps the programs share with the loader: the layout each must have when pinned, and typed
//! handles on them for the loader to write and `meshauthctl` to read.

use std::collections::BTreeMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::Pod;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, MapInfo, MapType, PerCpuArray};
use meshauth_policy::tables::AuthRequirement;
use serde::Serialize;

use super::{Datapath, DatapathError, if_name, io_err, map_err};
use crate::abi::{
    self, AuthKey, AuthValue, ConfigValue, Counter, CounterValue, CtKey, CtValue, EndpointValue, IfaceValue, PolicyKeyData, PolicyValue,
    SpiffeName, TagKey, TagValue,
};
use crate::clock::BootTime;
use crate::config::DatapathConfig;

/// Entries of `host_addrs`: a node has a handful of addresses (uplink, bridge, ptp gateways).
pub(super) const HOST_ADDR_ENTRIES: u32 = 256;

/// A map the programs use, as the loader expects to find it pinned.
pub(super) struct MapSpec {
    pub(super) name: &'static str,
    kind: MapType,
    key_size: usize,
    value_size: usize,
    pub(super) entries: fn(&DatapathConfig) -> u32,
    /// A cache or a value the loader writes anew: a pinned map of another layout (an upgrade
    /// that changed it) is replaced by a fresh one instead of stopping the load. Live flows
    /// are then checked in full once, as new ones.
    rebuildable: bool,
}

pub(super) const MAPS: &[MapSpec] = &[
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

impl Endpoint {
    fn from_map(key: u32, v: &abi::EndpointValue) -> Self {
        Endpoint {
            ip: abi::key_ip(key),
            security_identity: v.security_identity,
            spiffe_id: v.spiffe_id,
            ifindex: v.ifindex,
            isolated: v.flags & abi::EP_ISOLATED != 0,
            audit: v.flags & abi::EP_AUDIT != 0,
            mutual_auth: abi::auth_requirement(v.mutual_auth),
        }
    }
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

/// Typed handles on the pinned maps: what the loader writes and `meshauthctl` reads.
pub struct Maps {
    pin_dir: PathBuf,
    pub(super) endpoints: HashMap<MapData, u32, EndpointValue>,
    pub(super) endpoint_nodes: HashMap<MapData, u32, u32>,
    pub(super) policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    pub(super) auth: HashMap<MapData, AuthKey, AuthValue>,
    pub(super) tag_keys: HashMap<MapData, TagKey, TagValue>,
    pub(super) conntrack: HashMap<MapData, CtKey, CtValue>,
    pub(super) interfaces: HashMap<MapData, u32, IfaceValue>,
    pub(super) config: Array<MapData, ConfigValue>,
    counters: PerCpuArray<MapData, CounterValue>,
    pub(super) spiffe_names: HashMap<MapData, u32, SpiffeName>,
    pub(super) host_addrs: HashMap<MapData, u32, u32>,
    /// What the pinned maps hold at most (a pinned map keeps its size across restarts).
    pub(super) endpoint_capacity: usize,
    pub(super) endpoint_node_capacity: usize,
    pub(super) policy_capacity: usize,
}

fn open_pinned(maps_dir: &Path, name: &'static str) -> Result<MapData, DatapathError> {
    MapData::from_pin(maps_dir.join(name)).map_err(map_err(name))
}

/// Every key of a map, read before changing it (aya's key iterator borrows the map).
pub(super) fn keys_of<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, name: &'static str) -> Result<Vec<K>, DatapathError> {
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
            out.push(Endpoint::from_map(k, &v));
        }
        out.sort_by_key(|e| e.ip);
        Ok(out)
    }

    /// One address's endpoint, by a single lookup (`None` when the datapath does not know it).
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<Endpoint>, DatapathError> {
        let key = abi::ip_key(ip);
        match self.endpoints.get(&key, 0) {
            Ok(v) => Ok(Some(Endpoint::from_map(key, &v))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("endpoints")(e)),
        }
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

impl Datapath {
    /// Every proof in the auth map.
    pub fn auth_entries(&self) -> Result<Vec<AuthEntry>, DatapathError> {
        self.maps.auth_entries()
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        self.maps.counters()
    }
}

pub(super) fn remove_ignoring_missing(r: Result<(), MapError>, name: &'static str) -> Result<(), DatapathError> {
    match r {
        Err(e) if !is_not_found(&e) => Err(map_err(name)(e)),
        _ => Ok(()),
    }
}

/// aya reports a missing key as KeyNotFound on lookups and as ENOENT from the syscall on
/// deletes.
pub(super) fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.kind() == io::ErrorKind::NotFound,
        _ => false,
    }
}

/// Refuses pinned maps whose shape differs from what the programs expect: the verifier checks
/// the program against the map it is given, so a stale layout would load and misbehave.
pub(super) fn check_pinned_maps(config: &DatapathConfig) -> Result<(), DatapathError> {
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
