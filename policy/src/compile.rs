//! Compiles a [`PolicyModel`] into the datapath's [`CompiledTables`], evaluates tables the way
//! the datapath does (so tests can prove the two agree), and lists the pairs that need
//! authentication, for the agent to pre-authenticate.

use crate::model::{Decision, Isolation, ObjectRef, PodInfo, PolicyModel, RuleOutcome, SourceView, finish};
use crate::tables::{
    ANY_IDENTITY, AuthRequirement, CompiledTables, EndpointEntry, FIRST_ALLOCATED_IDENTITY, NO_SPIFFE_ID, PolicyEntry, SecurityIdentityKey,
    TableProtocol, WORLD_IDENTITY,
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
        Allocations { security: self.security.iter().cloned().collect(), spiffe: self.spiffe.iter().cloned().collect() }
    }

    fn next(counter: &mut u32, first: u32) -> u32 {
        *counter = (*counter).max(first);
        let n = *counter;
        *counter = counter.saturating_add(1);
        n
    }
}

/// The policy-map entries the MeshPolicies of one namespace may compile into (a tenant's
/// share of the 65,536-entry default map). A policy that would take its namespace past it,
/// counted oldest policy first and before overlapping ranges merge, is left out of the tables
/// whole: the pods it selects stay isolated, so they lose what it would allow, never more, and
/// the operator marks it with a condition naming this limit.
pub const NAMESPACE_POLICY_ENTRY_BUDGET: usize = 16_384;

/// A MeshPolicy left out of the tables because of [`NAMESPACE_POLICY_ENTRY_BUDGET`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverBudget {
    pub policy: ObjectRef,
    /// The entries the policy alone compiles into.
    pub entries: usize,
    /// The entries of the namespace's older policies that fit.
    pub namespace_entries: usize,
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "compiles into {} policy-map entries, and the namespace's older policies already take {} of its budget of {} (limit NAMESPACE_POLICY_ENTRY_BUDGET); the pods it selects stay isolated (audited: stay audited) without its rules",
            self.entries, self.namespace_entries, NAMESPACE_POLICY_ENTRY_BUDGET
        )
    }
}

type PolicyKey = (u32, u32, TableProtocol);
/// First port, last port, the rule's authentication.
type PortRange = (u16, u16, AuthRequirement);
/// What one MeshPolicy compiles into on its own: its entry count and its ranges per key.
type PolicyAsk = (usize, Vec<(PolicyKey, PortRange)>);

/// Key of the security identity of a pod.
pub fn security_identity_key(pod: &PodInfo) -> SecurityIdentityKey {
    SecurityIdentityKey {
        namespace: pod.namespace.clone(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    }
}

/// Compiles the model into tables. `allocator` keeps numbers stable between calls; identities
/// that are gone are dropped from it (their numbers are not reused). Policies over their
/// namespace's budget are left out ([`compile_with_budget`] says which).
pub fn compile(model: &PolicyModel, allocator: &mut NumberAllocator) -> CompiledTables {
    compile_with_budget(model, allocator).0
}

/// The MeshPolicies that [`compile`] leaves out for their namespace's entry budget.
pub fn over_budget(model: &PolicyModel) -> Vec<OverBudget> {
    compile_with_budget(model, &mut NumberAllocator::default()).1
}

/// [`compile`], and the policies it left out for [`NAMESPACE_POLICY_ENTRY_BUDGET`].
pub fn compile_with_budget(model: &PolicyModel, allocator: &mut NumberAllocator) -> (CompiledTables, Vec<OverBudget>) {
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
        let spiffe = *alloc.spiffe.entry(spiffe_id.clone()).or_insert_with(|| NumberAllocator::next(&mut allocator.next_spiffe, 1));
        used_spiffe.insert(spiffe, spiffe_id);
        representative.entry(sec).or_insert(pod);
        if let Some(ip) = pod.ip {
            let isolation = model.isolation(pod);
            endpoints.push(EndpointEntry {
                ip,
                security_identity: sec,
                spiffe_id: spiffe,
                isolated: matches!(isolation, Isolation::Enforced(_)),
                audit: matches!(isolation, Isolation::Audited(_)),
                mutual_auth: model.mutual_auth_requirement(pod),
                pod: pod.object_ref().to_string(),
                node: pod.node.clone(),
                node_address: None,
            });
        }
    }
    endpoints.sort_by_key(|e| e.ip);
    endpoints.dedup_by_key(|e| e.ip);

    let views: Vec<(u32, SourceView<'_>)> = representative
        .iter()
        .map(|(sec, pod)| {
            (
                *sec,
                SourceView {
                    namespace: Some(&pod.namespace),
                    labels: Some(&pod.labels),
                    spiffe_id: Some(model.spiffe_id(pod).to_string()),
                },
            )
        })
        .collect();

    // What each policy asks for: (dst identity, src identity or any, protocol) and a port
    // range, overlapping, with the entries it would take on its own.
    let mut asks: BTreeMap<&ObjectRef, PolicyAsk> = BTreeMap::new();
    let mut age: Vec<&ObjectRef> = Vec::new();
    for (dst, pod) in &representative {
        for (policy, rules) in model.policy_rules_for(pod) {
            if !age.contains(&policy) {
                age.push(policy);
            }
            let (entries, list) = asks.entry(policy).or_default();
            for rule in rules {
                let sources: Vec<u32> = if model.rule_matches_source(rule, &SourceView { namespace: None, labels: None, spiffe_id: None }) {
                    vec![ANY_IDENTITY]
                } else {
                    views.iter().filter(|(_, v)| model.rule_matches_source(rule, v)).map(|(s, _)| *s).collect()
                };
                for src in sources {
                    for protocol in TableProtocol::ALL {
                        for (start, end) in PolicyModel::rule_ports(rule, protocol) {
                            *entries += crate::tables::port_range_prefixes(start, end).len();
                            list.push(((*dst, src, protocol), (start, end, rule.auth)));
                        }
                    }
                }
            }
        }
    }
    // Oldest first per namespace (the model keeps policies in age order, and representatives
    // meet them in that order for each pod; sort to be independent of which pod came first).
    age.sort_by_key(|p| model.policy_age_rank(p));
    let mut namespace_used: BTreeMap<&str, usize> = BTreeMap::new();
    let mut left_out = Vec::new();
    let mut intervals: BTreeMap<PolicyKey, Vec<PortRange>> = BTreeMap::new();
    for policy in age {
        let Some((entries, list)) = asks.remove(policy) else { continue };
        let used = namespace_used.entry(policy.namespace.as_str()).or_default();
        if *used + entries > NAMESPACE_POLICY_ENTRY_BUDGET {
            left_out.push(OverBudget { policy: policy.clone(), entries, namespace_entries: *used });
            continue;
        }
        *used += entries;
        for (key, range) in list {
            intervals.entry(key).or_default().push(range);
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
    let tables = CompiledTables {
        endpoints,
        policy,
        spiffe_ids: used_spiffe.into_iter().collect(),
        security_identities: used_security.into_iter().collect(),
    };
    (tables, left_out)
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
    let (src_identity, src_spiffe) =
        tables.endpoints.iter().find(|e| e.ip == src_ip).map_or((WORLD_IDENTITY, NO_SPIFFE_ID), |e| (e.security_identity, e.spiffe_id));
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
    let matched = || [lookup(src_identity), lookup(ANY_IDENTITY)].iter().flatten().map(|p| p.auth).max();
    let rules = if dst.isolated {
        RuleOutcome::Enforced(matched())
    } else if dst.audit {
        RuleOutcome::Audited(matched())
    } else {
        RuleOutcome::Open
    };
    Some(finish(rules, dst.mutual_auth, src_spiffe != NO_SPIFFE_ID))
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
    // Per source once, not per pair: its view and SPIFFE ID.
    let sources: Vec<(&SecurityIdentityKey, usize, SourceView, String)> =
        srcs.iter().map(|(key, (src, count))| (key, *count, source_view(model, src), model.spiffe_id(src).to_string())).collect();
    let mut out: BTreeMap<(String, String), AuthRequirement> = BTreeMap::new();
    for (dst_key, (dst, _)) in &dsts {
        // Per destination once: which rules admit it and its MutualAuth. At thousands of
        // identities this is what keeps an apply in milliseconds: the policies that select a
        // pod are looked up once, not once per source.
        let target = Target::of(model, dst);
        if target.needs_nothing() {
            continue;
        }
        let dst_spiffe_id = model.spiffe_id(dst).to_string();
        for (src_key, src_count, view, src_spiffe_id) in &sources {
            // A lone pod is not its own peer (its traffic to itself never leaves it).
            if dst_key == *src_key && *src_count == 1 {
                continue;
            }
            let requirement = target.requirement(model, view);
            if requirement != AuthRequirement::None {
                let slot = out.entry((dst_spiffe_id.clone(), src_spiffe_id.clone())).or_default();
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
        *self
            .cache
            .entry((security_identity_key(dst), security_identity_key(src)))
            .or_insert_with(|| Target::of(model, dst).requirement(model, &source_view(model, src)))
    }
}

fn source_view<'a>(model: &PolicyModel, src: &'a PodInfo) -> SourceView<'a> {
    SourceView { namespace: Some(&src.namespace), labels: Some(&src.labels), spiffe_id: Some(model.spiffe_id(src).to_string()) }
}

/// What a destination pod admits, read from the model once: the rules of the MeshPolicies
/// that select it and its MutualAuth requirement.
struct Target<'a> {
    mutual_auth: AuthRequirement,
    isolation: Isolation<'a>,
}

impl<'a> Target<'a> {
    fn of(model: &'a PolicyModel, dst: &'a PodInfo) -> Self {
        Self { mutual_auth: model.mutual_auth_requirement(dst), isolation: model.isolation(dst) }
    }

    /// No source needs authentication to reach it: nothing selects it and no MutualAuth asks.
    fn needs_nothing(&self) -> bool {
        matches!(self.isolation, Isolation::Open) && self.mutual_auth == AuthRequirement::None
    }

    /// The strongest requirement of any allowed traffic from `view`.
    fn requirement(&self, model: &PolicyModel, view: &SourceView) -> AuthRequirement {
        let mutual_auth = self.mutual_auth;
        match &self.isolation {
            Isolation::Open => mutual_auth,
            Isolation::Enforced(rules) => rules
                .iter()
                .filter(|r| model.rule_matches_source(r, view))
                .map(|r| r.auth.max(mutual_auth))
                .max()
                .unwrap_or(AuthRequirement::None),
            // Everything passes; an audited rule that requires authentication still has the
            // pair authenticated, permissively.
            Isolation::Audited(rules) => rules
                .iter()
                .filter(|r| model.rule_matches_source(r, view))
                .map(|r| r.auth.min(AuthRequirement::Permissive))
                .fold(mutual_auth, AuthRequirement::max),
        }
    }
}

#[cfg(test)]
mod tests;
