//! Compiles a [`PolicyModel`] into the datapath's [`CompiledTables`], evaluates tables the way
//! the datapath does (so tests can prove the two agree), and lists the pairs that need
//! authentication, for the agent to pre-authenticate.

use crate::model::{Decision, ObjectRef, PodInfo, PolicyModel, SourceView, finish};
use crate::tables::{
    ANY_IDENTITY, AuthRequirement, CompiledTables, EndpointEntry, FIRST_ALLOCATED_IDENTITY,
    NO_SPIFFE_ID, PolicyEntry, SecurityIdentityKey, TableProtocol, WORLD_IDENTITY,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// Hands out security-identity and SPIFFE-ID numbers that stay the same across compilations,
/// so map entries written earlier (auth pairs above all) keep their meaning. Numbers are never
/// reused: a number freed by an identity that left is not given to a new identity, which
/// could otherwise ride an auth entry the old one earned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberAllocator {
    security: Vec<(SecurityIdentityKey, u32)>,
    spiffe: Vec<(String, u32)>,
    next_security: u32,
    next_spiffe: u32,
}

#[derive(Default)]
struct Allocations {
    security: BTreeMap<SecurityIdentityKey, u32>,
    spiffe: BTreeMap<String, u32>,
}

impl NumberAllocator {
    fn open(&self) -> Allocations {
        Allocations {
            security: self.security.iter().cloned().collect(),
            spiffe: self.spiffe.iter().cloned().collect(),
        }
    }

    fn next(counter: &mut u32, first: u32) -> u32 {
        *counter = (*counter).max(first);
        let n = *counter;
        *counter = counter.saturating_add(1);
        n
    }
}

type PolicyKey = (u32, u32, TableProtocol);
/// First port, last port, the rule's authentication.
type PortRange = (u16, u16, AuthRequirement);

/// Key of the security identity of a pod.
pub fn security_identity_key(pod: &PodInfo) -> SecurityIdentityKey {
    SecurityIdentityKey {
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Compiles the model into tables. `allocator` keeps numbers stable between calls; identities
/// that are gone are dropped from it (their numbers are not reused).
pub fn compile(model: &PolicyModel, allocator: &mut NumberAllocator) -> CompiledTables {
    let mut alloc = allocator.open();
    let mut used_security = BTreeMap::new();
    let mut used_spiffe = BTreeMap::new();
    let mut representative: BTreeMap<u32, &PodInfo> = BTreeMap::new();
    let mut endpoints = Vec::new();
    for pod in model.pods() {
        let key = security_identity_key(pod);
        let sec = *alloc
            .security
            .entry(key.clone())
            .or_insert_with(|| NumberAllocator::next(&mut allocator.next_security, FIRST_ALLOCATED_IDENTITY));
        used_security.insert(sec, key);
        let spiffe_id = model.spiffe_id(pod).to_string();
        let spiffe = *alloc
            .spiffe
            .entry(spiffe_id.clone())
            .or_insert_with(|| NumberAllocator::next(&mut allocator.next_spiffe, 1));
        used_spiffe.insert(spiffe, spiffe_id);
        representative.entry(sec).or_insert(pod);
        if let Some(ip) = pod.ip {
            endpoints.push(EndpointEntry {
                ip,
                security_identity: sec,
                spiffe_id: spiffe,
                isolated: model.rules_for(pod).is_some(),
                mutual_auth: model.mutual_auth_requirement(pod),
                pod: pod.object_ref().to_string(),
                node: pod.node.clone(),
            });
        }
    }
    endpoints.sort_by_key(|e| e.ip);
    endpoints.dedup_by_key(|e| e.ip);

    let views: Vec<(u32, SourceView<'_>)> = representative
        .iter()
        .map(|(sec, pod)| {
            (*sec, SourceView {
                namespace: Some(&pod.namespace),
                labels: Some(&pod.labels),
                spiffe_id: Some(model.spiffe_id(pod).to_string()),
            })
        })
        .collect();

    // (dst identity, src identity or any, protocol) → the port ranges of every rule, overlapping.
    let mut intervals: BTreeMap<PolicyKey, Vec<PortRange>> = BTreeMap::new();
    for (dst, pod) in &representative {
        let Some(rules) = model.rules_for(pod) else { continue };
        for rule in rules {
            let sources: Vec<u32> = if model.rule_matches_source(rule, &SourceView { namespace: None, labels: None, spiffe_id: None }) {
                vec![ANY_IDENTITY]
            } else {
                views.iter().filter(|(_, v)| model.rule_matches_source(rule, v)).map(|(s, _)| *s).collect()
            };
            for src in sources {
                for protocol in TableProtocol::ALL {
                    for (start, end) in PolicyModel::rule_ports(rule, protocol) {
                        intervals.entry((*dst, src, protocol)).or_default().push((start, end, rule.auth));
                    }
                }
            }
        }
    }
    let mut policy = Vec::new();
    for ((dst_identity, src_identity, protocol), list) in intervals {
        for (port_start, port_end, auth) in disjoint(list) {
            policy.push(PolicyEntry { dst_identity, src_identity, protocol, port_start, port_end, auth });
        }
    }

    allocator.security = alloc.security.into_iter().filter(|(_, n)| used_security.contains_key(n)).collect();
    allocator.spiffe = alloc.spiffe.into_iter().filter(|(_, n)| used_spiffe.contains_key(n)).collect();
    CompiledTables {
        endpoints,
        policy,
        spiffe_ids: used_spiffe.into_iter().collect(),
        security_identities: used_security.into_iter().collect(),
    }
}

/// Splits overlapping intervals into disjoint ones, each with the strictest requirement of the
/// intervals covering it, and merges neighbours with the same requirement.
fn disjoint(list: Vec<PortRange>) -> Vec<PortRange> {
    let mut bounds: BTreeSet<u32> = BTreeSet::new();
    for (s, e, _) in &list {
        bounds.insert(u32::from(*s));
        bounds.insert(u32::from(*e) + 1);
    }
    let bounds: Vec<u32> = bounds.into_iter().collect();
    let mut out: Vec<PortRange> = Vec::new();
    for w in bounds.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let covering = list.iter().filter(|(s, e, _)| u32::from(*s) <= lo && hi <= u32::from(*e));
        let Some(auth) = covering.map(|(_, _, a)| *a).max() else { continue };
        // lo and hi are within one interval's u16 bounds.
        let (lo, hi) = (lo as u16, hi as u16);
        match out.last_mut() {
            Some(last) if last.2 == auth && u32::from(last.1) + 1 == u32::from(lo) => last.1 = hi,
            _ => out.push((lo, hi, auth)),
        }
    }
    out
}

/// Answers a packet from the tables alone, exactly as the BPF program does (the algorithm in
/// [`crate::tables`]). `None`: the destination is not a mesh pod, and the packet passes.
pub fn evaluate(tables: &CompiledTables, src_ip: Ipv4Addr, dst_ip: Ipv4Addr, protocol: TableProtocol, port: u16) -> Option<Decision> {
    let dst = tables.endpoints.iter().find(|e| e.ip == dst_ip)?;
    let (src_identity, src_spiffe) = tables
        .endpoints
        .iter()
        .find(|e| e.ip == src_ip)
        .map_or((WORLD_IDENTITY, NO_SPIFFE_ID), |e| (e.security_identity, e.spiffe_id));
    let port = if protocol.has_ports() { port } else { 0 };
    let lookup = |src: u32| {
        tables.policy.iter().find(|p| {
            p.dst_identity == dst.security_identity
                && p.src_identity == src
                && p.protocol == protocol
                && p.port_start <= port
                && port <= p.port_end
        })
    };
    let (allowed, rule_auth) = if dst.isolated {
        let hits = [lookup(src_identity), lookup(ANY_IDENTITY)];
        let auth = hits.iter().flatten().map(|p| p.auth).max();
        (auth.is_some(), auth.unwrap_or_default())
    } else {
        (true, AuthRequirement::None)
    };
    Some(finish(allowed, rule_auth, dst.mutual_auth, src_spiffe != NO_SPIFFE_ID))
}

/// A pair of pods whose traffic needs (or, permissive, would like) authentication.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AuthPair {
    pub dst_pod: ObjectRef,
    pub src_pod: ObjectRef,
    pub dst_spiffe_id: String,
    pub src_spiffe_id: String,
    pub requirement: AuthRequirement,
}

/// Every pair of distinct pods with IPs where some traffic the policy allows needs
/// authentication (required or permissive). `dst_filter` narrows the destinations (e.g. to the
/// pods of one node). Quadratic in pods: for people and tests; the agent and operator use
/// [`auth_identity_pairs`].
pub fn auth_pairs(model: &PolicyModel, dst_filter: impl Fn(&PodInfo) -> bool) -> Vec<AuthPair> {
    let mut evaluator = PairEvaluator::new(model);
    let sources: Vec<&PodInfo> = model.pods().filter(|p| p.ip.is_some()).collect();
    let mut pairs = Vec::new();
    for dst in model.pods().filter(|p| p.ip.is_some() && dst_filter(p)) {
        for src in &sources {
            if src.object_ref() == dst.object_ref() {
                continue;
            }
            let requirement = evaluator.requirement(dst, src);
            if requirement != AuthRequirement::None {
                pairs.push(AuthPair {
                    dst_pod: dst.object_ref(),
                    src_pod: src.object_ref(),
                    dst_spiffe_id: model.spiffe_id(dst).to_string(),
                    src_spiffe_id: model.spiffe_id(src).to_string(),
                    requirement,
                });
            }
        }
    }
    pairs
}

/// A pair of SPIFFE IDs to authenticate: what an auth-map entry binds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityPair {
    pub dst_spiffe_id: String,
    pub src_spiffe_id: String,
    /// The strictest requirement over the pod pairs behind it.
    pub requirement: AuthRequirement,
}

/// [`auth_pairs`] projected onto SPIFFE IDs, computed once per pair of security identities
/// rather than per pair of pods, so a node with a thousand pods stays cheap.
pub fn auth_identity_pairs(model: &PolicyModel, dst_filter: impl Fn(&PodInfo) -> bool) -> Vec<IdentityPair> {
    // One representative pod per security identity; a pod's pair with itself is the only
    // case where identity and pod pairs differ, so count how many pods share each key.
    let mut dsts: BTreeMap<SecurityIdentityKey, (&PodInfo, usize)> = BTreeMap::new();
    for p in model.pods().filter(|p| p.ip.is_some() && dst_filter(p)) {
        dsts.entry(security_identity_key(p)).or_insert((p, 0)).1 += 1;
    }
    let mut srcs: BTreeMap<SecurityIdentityKey, (&PodInfo, usize)> = BTreeMap::new();
    for p in model.pods().filter(|p| p.ip.is_some()) {
        srcs.entry(security_identity_key(p)).or_insert((p, 0)).1 += 1;
    }
    let mut evaluator = PairEvaluator::new(model);
    let mut out: BTreeMap<(String, String), AuthRequirement> = BTreeMap::new();
    for (dst_key, (dst, _)) in &dsts {
        for (src_key, (src, src_count)) in &srcs {
            // A lone pod is not its own peer (its traffic to itself never leaves it).
            if dst_key == src_key && *src_count == 1 {
                continue;
            }
            let requirement = evaluator.requirement(dst, src);
            if requirement != AuthRequirement::None {
                let key = (model.spiffe_id(dst).to_string(), model.spiffe_id(src).to_string());
                let slot = out.entry(key).or_default();
                *slot = (*slot).max(requirement);
            }
        }
    }
    out.into_iter()
        .map(|((dst_spiffe_id, src_spiffe_id), requirement)| IdentityPair { dst_spiffe_id, src_spiffe_id, requirement })
        .collect()
}

/// The strongest requirement of any allowed traffic between two pods, cached per pair of
/// security identities (pods of one identity get the same answer).
struct PairEvaluator<'a> {
    model: &'a PolicyModel,
    cache: BTreeMap<(SecurityIdentityKey, SecurityIdentityKey), AuthRequirement>,
}

impl<'a> PairEvaluator<'a> {
    fn new(model: &'a PolicyModel) -> Self {
        Self { model, cache: BTreeMap::new() }
    }

    fn requirement(&mut self, dst: &PodInfo, src: &PodInfo) -> AuthRequirement {
        let model = self.model;
        *self.cache.entry((security_identity_key(dst), security_identity_key(src))).or_insert_with(|| {
            let mutual_auth = model.mutual_auth_requirement(dst);
            let view = SourceView {
                namespace: Some(&src.namespace),
                labels: Some(&src.labels),
                spiffe_id: Some(model.spiffe_id(src).to_string()),
            };
            match model.rules_for(dst) {
                None => mutual_auth,
                Some(rules) => rules
                    .iter()
                    .filter(|r| model.rule_matches_source(r, &view))
                    .map(|r| r.auth.max(mutual_auth))
                    .max()
                    .unwrap_or(AuthRequirement::None),
            }
        })
    }
}

#[cfg(test)]
mod tests;
