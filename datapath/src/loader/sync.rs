//! Writing what the agent decided into the maps (the compiled tables, the node's own addresses, the
//! authenticated pairs), so that the programs only ever look things up.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::Ipv4Addr;

use meshauth_policy::tables::CompiledTables;
use serde::Serialize;

use super::maps::{HOST_ADDR_ENTRIES, NodeId, is_not_found, keys_of, remove_ignoring_missing};
use super::{Datapath, DatapathError, map_err};
use crate::abi::{self, AuthKey, AuthValue, CtKey, EndpointValue, PolicyKeyData, PolicyValue, SpiffeName};
use crate::clock::BootTime;

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

impl Datapath {
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
        // The nodes of departed sources go last, after the epoch moved: until then, flows
        // admitted under the old tables are re-checked against these very entries on their
        // established path, and a source's node missing there drops them as unauthenticated.
        for k in &stale_nodes {
            remove_ignoring_missing(self.maps.endpoint_nodes.remove(k), "endpoint_nodes")?;
        }
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

    /// Removes the entry of another node's pod at `ip` and the conntrack entries to or from
    /// it, at once, ahead of the next apply (which would remove them too): from then on a
    /// packet from the address names no identity and is dropped where authentication is
    /// required. An entry of a pod of this node (it has an interface) is left to the apply,
    /// which also looks after the interface. `Ok(false)` when there was no such entry.
    pub fn forget_remote_endpoint(&mut self, ip: Ipv4Addr) -> Result<bool, DatapathError> {
        let key = abi::ip_key(ip);
        match self.maps.endpoints.get(&key, 0) {
            Ok(v) if v.ifindex == 0 => {}
            Ok(_) => return Ok(false),
            Err(e) if is_not_found(&e) => return Ok(false),
            Err(e) => return Err(map_err("endpoints")(e)),
        }
        remove_ignoring_missing(self.maps.endpoints.remove(&key), "endpoints")?;
        self.flush_conntrack(&std::collections::BTreeSet::from([key]))?;
        Ok(true)
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
