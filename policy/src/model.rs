//! The decision model: MISSION.md §3 as code.
//!
//! - A pod selected by no MeshPolicy accepts every source; a pod selected by at least one accepts
//!   only traffic that some rule of some selecting policy matches (source and port).
//! - The authentication a packet needs is the maximum of the strictest matching rule's
//!   (`Required` or none) and the destination's MutualAuth mode (`Strict` → required,
//!   `Permissive` → permissive, `Disabled` or none → none). A MutualAuth never relaxes what a
//!   MeshPolicy rule requires.
//! - The MutualAuth of a pod is the most specific one: with a selector that matches the pod, else
//!   namespace-wide (no selector), else mesh-wide (no selector, in the mesh namespace). Two at
//!   the same level that disagree: the oldest wins, the others are conflicted.
//! - A source that can never authenticate (not a mesh pod) is denied where authentication is
//!   required.
//! - Audit (`spec.enforcement: Audit`): a pod that only audited MeshPolicies select is not
//!   isolated. What their rules would deny passes and is reported ([`AuditFinding::Denied`]);
//!   a rule of theirs that requires authentication makes the pair's traffic permissive (the
//!   handshake happens, nothing is dropped for want of it) and reported when unauthenticated
//!   ([`AuditFinding::AuthenticationRequired`]). MutualAuth is not audited: its mode applies as
//!   it says. A pod that an enforced MeshPolicy selects is isolated by the enforced ones alone;
//!   audited policies selecting it too add nothing.
//!
//! Specs that cannot be used fail closed: a rule with an invalid peer or port loses that peer
//! or port (it matches less, never more), and the policy still isolates the pods it selects. A
//! policy whose own selector is unusable selects nothing and is reported.

use crate::tables::{AuthRequirement, TableProtocol};
use crate::validate::{self, FieldError};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube_core::{Selector, SelectorExt};
use meshauth_crds::{AuthenticationMode, Enforcement, MeshPolicySpec, MutualAuthMode, MutualAuthSpec, Protocol, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The namespace a mesh-wide MutualAuth lives in unless configured otherwise.
pub const DEFAULT_MESH_NAMESPACE: &str = "meshauth-system";
/// The label Kubernetes puts on every namespace with its own name.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Errors of model queries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("unknown pod {0}")]
    UnknownPod(ObjectRef),
}

/// Settings of the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// The mesh's trust domain (default `cluster.local`).
    pub trust_domain: TrustDomain,
    /// Where mesh-wide MutualAuths live (default `meshauth-system`).
    pub mesh_namespace: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { trust_domain: TrustDomain::default(), mesh_namespace: DEFAULT_MESH_NAMESPACE.into() }
    }
}

/// Which kind a reported problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    MeshPolicy,
    MutualAuth,
}

/// A spec problem: which object, which field, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: Kind,
    pub object: ObjectRef,
    pub error: FieldError,
}

/// What a MutualAuth lost: the pods it would have decided and the older one that won them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub loser: ObjectRef,
    pub winner: ObjectRef,
    pub pods: Vec<ObjectRef>,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// What an audited MeshPolicy would have done to traffic that passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuditFinding {
    /// No rule of the audited policies selecting the destination admits it: enforced, they
    /// would drop it.
    Denied,
    /// An audited rule admits it but requires authentication: enforced, it would be dropped
    /// whenever the pair is not authenticated (and always for a source with no identity).
    AuthenticationRequired,
}

/// The model's answer for one kind of packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// For `allow`: what the pair must have to pass. For `deny`: `required` when the source was
    /// denied only because it cannot authenticate, else `none`.
    pub authentication: AuthRequirement,
    /// For `allow` under audited policies: what they would do, enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditFinding>,
}

/// How the MeshPolicies selecting a pod shape what it accepts.
pub(crate) enum Isolation<'a> {
    /// No MeshPolicy selects it: every source.
    Open,
    /// Enforced MeshPolicies select it: only what their rules admit.
    Enforced(Vec<&'a Rule>),
    /// Only audited MeshPolicies select it: every source, and their rules say what to report.
    Audited(Vec<&'a Rule>),
}

/// Where traffic comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A pod of the model.
    Pod(ObjectRef),
    /// A workload known only by its SPIFFE ID (no labels).
    Identity(SpiffeId),
    /// Anything outside the mesh: no identity.
    World,
}

#[derive(Debug, Clone)]
enum Peer {
    Pods { namespace: String, pods: Option<Selector>, namespaces: Option<Selector> },
    Identity(SpiffeId),
}

#[derive(Debug, Clone)]
struct PortMatch {
    protocol: TableProtocol,
    start: u16,
    end: u16,
}

#[derive(Debug, Clone)]
pub(crate) struct Rule {
    /// Its index in the policy's `spec.ingress`.
    pub(crate) ingress: usize,
    /// `None`: any source.
    from: Option<Vec<Peer>>,
    ports: Vec<PortMatch>,
    pub(crate) auth: AuthRequirement,
}

#[derive(Debug, Clone)]
struct Policy {
    object: ObjectRef,
    selector: Selector,
    rules: Vec<Rule>,
    audit: bool,
}

#[derive(Debug, Clone)]
struct MutualAuthEntry {
    resource: Resource<MutualAuthSpec>,
    selector: Option<Selector>,
    level: u8,
}

/// A source as rules see it.
pub(crate) struct SourceView<'a> {
    pub(crate) namespace: Option<&'a str>,
    pub(crate) labels: Option<&'a BTreeMap<String, String>>,
    pub(crate) spiffe_id: Option<String>,
}

/// The policy model built from one snapshot of inputs.
#[derive(Debug, Clone)]
pub struct PolicyModel {
    config: ModelConfig,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pods: BTreeMap<ObjectRef, PodInfo>,
    policies: Vec<Policy>,
    mutual_auths: Vec<MutualAuthEntry>,
    problems: Vec<Problem>,
}

impl PolicyModel {
    /// Builds the model. Never fails: problems of single objects are kept in [`Self::problems`]
    /// and the objects are used as far as they safely can be (see the module doc).
    pub fn new(config: ModelConfig, inputs: Inputs) -> Self {
        let mut namespaces: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for ns in inputs.namespaces {
            let mut labels = ns.labels;
            labels.insert(NAMESPACE_NAME_LABEL.into(), ns.name.clone());
            namespaces.insert(ns.name, labels);
        }
        let pods: BTreeMap<_, _> = inputs.pods.into_iter().map(|p| (p.object_ref(), p)).collect();
        for pod in pods.values() {
            namespaces
                .entry(pod.namespace.clone())
                .or_insert_with(|| BTreeMap::from([(NAMESPACE_NAME_LABEL.to_owned(), pod.namespace.clone())]));
        }
        let mut model = Self { config, namespaces, pods, policies: Vec::new(), mutual_auths: Vec::new(), problems: Vec::new() };
        let mut mesh_policies = inputs.mesh_policies;
        mesh_policies.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        for p in &mesh_policies {
            model.add_mesh_policy(p);
        }
        let mut mutual_auths = inputs.mutual_auths;
        mutual_auths.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        for m in mutual_auths {
            model.add_mutual_auth(m);
        }
        model
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Spec problems found while building the model.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Every pod, by `namespace/name`.
    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    pub fn pod(&self, pod: &ObjectRef) -> Option<&PodInfo> {
        self.pods.get(pod)
    }

    /// Labels of a namespace (with `kubernetes.io/metadata.name`).
    pub(crate) fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns)
    }

    /// The SPIFFE ID of a pod.
    pub fn spiffe_id(&self, pod: &PodInfo) -> SpiffeId {
        self.config.trust_domain.service_account_id(&pod.namespace, &pod.service_account)
    }

    fn report(&mut self, kind: Kind, object: &ObjectRef, field: String, reason: String) {
        self.problems.push(Problem { kind, object: object.clone(), error: FieldError { field, reason } });
    }

    fn add_mesh_policy(&mut self, p: &Resource<MeshPolicySpec>) {
        let object = p.object_ref();
        let errors = validate::validate_mesh_policy(&p.spec, &self.config.trust_domain);
        let selector = match parse_selector(&p.spec.selector) {
            Ok(s) => s,
            Err(reason) => {
                self.report(Kind::MeshPolicy, &object, "spec.selector".into(), reason);
                return;
            }
        };
        // Fields the validator rejects are dropped below: a rule keeps only what is valid,
        // so it can match less but never more than the author meant.
        let bad = |field: &str| {
            errors
                .iter()
                .any(|e| e.field == field || e.field.starts_with(&format!("{field}.")) || e.field.starts_with(&format!("{field}[")))
        };
        let mut rules = Vec::new();
        // A policy past the per-object limits (which only the webhook and the CRD would have
        // refused) keeps its selector and none of its rules: its pods are isolated and accept
        // nothing, rather than compiling whatever it multiplies into.
        let within_limits = validate::mesh_policy_limits(&p.spec).is_empty();
        for (ri, rule) in p.spec.ingress.iter().enumerate().filter(|_| within_limits) {
            let mut from = Vec::new();
            for (fi, peer) in rule.from.iter().enumerate() {
                let field = format!("spec.ingress[{ri}].from[{fi}]");
                if bad(&field) {
                    continue;
                }
                match self.parse_peer(peer, &p.namespace) {
                    Ok(peer) => from.push(peer),
                    Err(reason) => self.report(Kind::MeshPolicy, &object, field, reason),
                }
            }
            let mut ports = Vec::new();
            for (pi, port) in rule.ports.iter().enumerate() {
                let field = format!("spec.ingress[{ri}].ports[{pi}]");
                if bad(&field) {
                    continue;
                }
                match parse_port(port.port, port.end_port, port.protocol) {
                    Ok(m) => ports.push(m),
                    Err(reason) => self.report(Kind::MeshPolicy, &object, field, reason),
                }
            }
            if (!rule.from.is_empty() && from.is_empty()) || (!rule.ports.is_empty() && ports.is_empty()) {
                // Every peer or every port was invalid: the rule matches nothing.
                continue;
            }
            if ports.is_empty() {
                ports = every_port();
            }
            let auth = match rule.authentication.as_ref().map(|a| a.mode) {
                Some(AuthenticationMode::Required) => AuthRequirement::Required,
                _ => AuthRequirement::None,
            };
            rules.push(Rule { ingress: ri, from: (!rule.from.is_empty()).then_some(from), ports, auth });
        }
        for e in errors {
            if !self.problems.iter().any(|p| p.object == object && p.error == e) {
                self.problems.push(Problem { kind: Kind::MeshPolicy, object: object.clone(), error: e });
            }
        }
        let audit = p.spec.enforcement == Enforcement::Audit;
        self.policies.push(Policy { object, selector, rules, audit });
    }

    fn parse_peer(&self, peer: &meshauth_crds::PeerSelector, namespace: &str) -> Result<Peer, String> {
        match (&peer.identity, &peer.pod_selector, &peer.namespace_selector) {
            (Some(id), None, None) => SpiffeId::parse(id).map(Peer::Identity).map_err(|e| format!("identity {e}")),
            (None, None, None) => Err("names no podSelector, namespaceSelector or identity".into()),
            (Some(_), _, _) => Err("has both an identity and a selector".into()),
            (None, pods, namespaces) => Ok(Peer::Pods {
                namespace: namespace.to_owned(),
                pods: pods.as_ref().map(parse_selector).transpose()?,
                namespaces: namespaces.as_ref().map(parse_selector).transpose()?,
            }),
        }
    }

    fn add_mutual_auth(&mut self, m: Resource<MutualAuthSpec>) {
        let object = m.object_ref();
        for e in validate::validate_mutual_auth(&m.spec) {
            self.problems.push(Problem { kind: Kind::MutualAuth, object: object.clone(), error: e });
        }
        let selector = match m.spec.selector.as_ref().map(parse_selector).transpose() {
            Ok(s) => s.filter(|s| !s.selects_all()),
            Err(reason) => {
                self.report(Kind::MutualAuth, &object, "spec.selector".into(), reason);
                return;
            }
        };
        let level = match (&selector, m.namespace == self.config.mesh_namespace) {
            (Some(_), _) => 3,
            (None, false) => 2,
            (None, true) => 1,
        };
        self.mutual_auths.push(MutualAuthEntry { resource: m, selector, level });
    }

    /// The MeshPolicies whose selector picks the pod (enforced and audited).
    pub fn selecting_policies(&self, pod: &PodInfo) -> Vec<ObjectRef> {
        self.policies_for(pod).map(|p| p.object.clone()).collect()
    }

    /// The audited MeshPolicies whose selector picks the pod.
    pub fn auditing_policies(&self, pod: &PodInfo) -> Vec<ObjectRef> {
        self.policies_for(pod).filter(|p| p.audit).map(|p| p.object.clone()).collect()
    }

    /// Whether the MeshPolicy is audited rather than enforced (`None`: no such policy).
    pub fn is_audited(&self, policy: &ObjectRef) -> Option<bool> {
        self.policies.iter().find(|p| &p.object == policy).map(|p| p.audit)
    }

    /// Where `policy` stands among the MeshPolicies, oldest first (`usize::MAX`: unknown).
    pub(crate) fn policy_age_rank(&self, policy: &ObjectRef) -> usize {
        self.policies.iter().position(|p| &p.object == policy).unwrap_or(usize::MAX)
    }

    /// The MeshPolicies whose rules shape `pod`'s tables, oldest first, each with its rules
    /// (for compile's per-namespace entry budget, which must know whose rules are whose): the
    /// enforced ones selecting it, or the audited ones when no enforced one does.
    pub(crate) fn policy_rules_for<'a>(&'a self, pod: &'a PodInfo) -> impl Iterator<Item = (&'a ObjectRef, &'a [Rule])> + 'a {
        let enforced = self.policies_for(pod).any(|p| !p.audit);
        self.policies_for(pod).filter(move |p| p.audit != enforced).map(|p| (&p.object, p.rules.as_slice()))
    }

    fn policies_for<'a>(&'a self, pod: &'a PodInfo) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies.iter().filter(move |p| p.object.namespace == pod.namespace && p.selector.matches(&pod.labels))
    }

    /// Candidates of the most specific level that has any, oldest first.
    fn mutual_auth_candidates(&self, pod: &PodInfo) -> Vec<&MutualAuthEntry> {
        let applies = |m: &&MutualAuthEntry| match m.level {
            3 => m.resource.namespace == pod.namespace && m.selector.as_ref().is_some_and(|s| s.matches(&pod.labels)),
            2 => m.resource.namespace == pod.namespace,
            _ => true,
        };
        // `mutual_auths` is sorted oldest first, so each level's candidates are too.
        for level in [3, 2, 1] {
            let found: Vec<_> = self.mutual_auths.iter().filter(|m| m.level == level).filter(applies).collect();
            if !found.is_empty() {
                return found;
            }
        }
        Vec::new()
    }

    /// The MutualAuth that decides the pod's mode, if any.
    pub fn mutual_auth_for(&self, pod: &PodInfo) -> Option<(ObjectRef, MutualAuthMode)> {
        self.mutual_auth_candidates(pod).first().map(|m| (m.resource.object_ref(), m.resource.spec.mode))
    }

    /// The pod's MutualAuth requirement.
    pub fn mutual_auth_requirement(&self, pod: &PodInfo) -> AuthRequirement {
        match self.mutual_auth_candidates(pod).first().map(|m| m.resource.spec.mode) {
            Some(MutualAuthMode::Strict) => AuthRequirement::Required,
            Some(MutualAuthMode::Permissive) => AuthRequirement::Permissive,
            Some(MutualAuthMode::Disabled) | None => AuthRequirement::None,
        }
    }

    /// MutualAuths that lost a tie: for each, which older one won and on which pods.
    pub fn conflicts(&self) -> Vec<Conflict> {
        let mut lost: BTreeMap<(ObjectRef, ObjectRef), Vec<ObjectRef>> = BTreeMap::new();
        for pod in self.pods.values() {
            let candidates = self.mutual_auth_candidates(pod);
            let Some(winner) = candidates.first() else { continue };
            for loser in &candidates[1..] {
                if loser.resource.spec.mode != winner.resource.spec.mode {
                    lost.entry((loser.resource.object_ref(), winner.resource.object_ref())).or_default().push(pod.object_ref());
                }
            }
        }
        // Namespace- and mesh-wide ties conflict even before any pod exists. The list is
        // sorted oldest first, so the first of each scope is its winner.
        for (i, a) in self.mutual_auths.iter().enumerate() {
            if a.level == 3 {
                continue;
            }
            let same_scope = |b: &&MutualAuthEntry| b.level == a.level && (a.level == 1 || a.resource.namespace == b.resource.namespace);
            if self.mutual_auths[..i].iter().any(|b| same_scope(&b)) {
                continue;
            }
            for b in self.mutual_auths[i + 1..].iter().filter(same_scope) {
                if b.resource.spec.mode != a.resource.spec.mode {
                    lost.entry((b.resource.object_ref(), a.resource.object_ref())).or_default();
                }
            }
        }
        lost.into_iter().map(|((loser, winner), pods)| Conflict { loser, winner, pods }).collect()
    }

    /// How many pods each MeshPolicy selects.
    pub fn mesh_policy_selected_pods(&self, policy: &ObjectRef) -> usize {
        self.policies
            .iter()
            .find(|p| &p.object == policy)
            .map(|p| self.pods.values().filter(|pod| pod.namespace == p.object.namespace && p.selector.matches(&pod.labels)).count())
            .unwrap_or(0)
    }

    /// How many pods each MutualAuth decides the mode of.
    pub fn mutual_auth_selected_pods(&self, mutual_auth: &ObjectRef) -> usize {
        self.pods
            .values()
            .filter(|pod| self.mutual_auth_candidates(pod).first().is_some_and(|m| &m.resource.object_ref() == mutual_auth))
            .count()
    }

    pub(crate) fn source_view<'a>(&'a self, source: &'a Source) -> Result<SourceView<'a>, ModelError> {
        Ok(match source {
            Source::Pod(r) => {
                let pod = self.pods.get(r).ok_or_else(|| ModelError::UnknownPod(r.clone()))?;
                SourceView { namespace: Some(&pod.namespace), labels: Some(&pod.labels), spiffe_id: Some(self.spiffe_id(pod).to_string()) }
            }
            Source::Identity(id) => SourceView { namespace: None, labels: None, spiffe_id: Some(id.to_string()) },
            Source::World => SourceView { namespace: None, labels: None, spiffe_id: None },
        })
    }

    fn peer_matches(&self, peer: &Peer, src: &SourceView<'_>) -> bool {
        match peer {
            Peer::Identity(id) => src.spiffe_id.as_deref() == Some(id.as_str()),
            Peer::Pods { namespace, pods, namespaces } => {
                let (Some(src_ns), Some(labels)) = (src.namespace, src.labels) else { return false };
                let ns_ok = match namespaces {
                    None => src_ns == namespace,
                    Some(sel) => self.namespace_labels(src_ns).is_some_and(|l| sel.matches(l)),
                };
                ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(labels))
            }
        }
    }

    /// Whether a rule admits the source (ignoring ports).
    pub(crate) fn rule_matches_source(&self, rule: &Rule, src: &SourceView<'_>) -> bool {
        match &rule.from {
            None => true,
            Some(peers) => peers.iter().any(|p| self.peer_matches(p, src)),
        }
    }

    /// Port intervals of a rule for one protocol.
    pub(crate) fn rule_ports(rule: &Rule, protocol: TableProtocol) -> impl Iterator<Item = (u16, u16)> + '_ {
        rule.ports.iter().filter(move |p| p.protocol == protocol).map(|p| (p.start, p.end))
    }

    /// The pod's isolation and the rules that shape it.
    pub(crate) fn isolation<'a>(&'a self, pod: &'a PodInfo) -> Isolation<'a> {
        let mut selected = false;
        let mut rules = Vec::new();
        for (_, r) in self.policy_rules_for(pod) {
            selected = true;
            rules.extend(r.iter());
        }
        match (selected, self.policies_for(pod).any(|p| !p.audit)) {
            (false, _) => Isolation::Open,
            (true, true) => Isolation::Enforced(rules),
            (true, false) => Isolation::Audited(rules),
        }
    }

    /// The decision for traffic from `source` to `dst` on `protocol`/`port` (port ignored for
    /// ICMP and other protocols).
    pub fn decide(&self, source: &Source, dst: &ObjectRef, protocol: TableProtocol, port: u16) -> Result<Decision, ModelError> {
        let dst_pod = self.pods.get(dst).ok_or_else(|| ModelError::UnknownPod(dst.clone()))?;
        let src = self.source_view(source)?;
        let port = if protocol.has_ports() { port } else { 0 };
        let matched = |rules: Vec<&Rule>| {
            let matching = rules
                .into_iter()
                .filter(|r| self.rule_matches_source(r, &src) && Self::rule_ports(r, protocol).any(|(s, e)| s <= port && port <= e));
            matching.fold(None, |auth: Option<AuthRequirement>, r| Some(auth.unwrap_or_default().max(r.auth)))
        };
        let rules = match self.isolation(dst_pod) {
            Isolation::Open => RuleOutcome::Open,
            Isolation::Enforced(rules) => RuleOutcome::Enforced(matched(rules)),
            Isolation::Audited(rules) => RuleOutcome::Audited(matched(rules)),
        };
        Ok(finish(rules, self.mutual_auth_requirement(dst_pod), src.spiffe_id.is_some()))
    }
}

/// What the rules of a destination's policies say of a packet: `Some(authentication)` when
/// some rule admits it (the strictest of them), `None` when none does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RuleOutcome {
    Open,
    Enforced(Option<AuthRequirement>),
    Audited(Option<AuthRequirement>),
}

/// The last step shared by the model and the table evaluator, so both end the same way.
pub(crate) fn finish(rules: RuleOutcome, mutual_auth: AuthRequirement, src_has_identity: bool) -> Decision {
    let decide = |allowed: bool, rule_auth: AuthRequirement| {
        let auth = rule_auth.max(mutual_auth);
        if !allowed {
            Decision { verdict: Verdict::Deny, authentication: AuthRequirement::None, audit: None }
        } else if auth == AuthRequirement::Required && !src_has_identity {
            Decision { verdict: Verdict::Deny, authentication: AuthRequirement::Required, audit: None }
        } else {
            Decision { verdict: Verdict::Allow, authentication: auth, audit: None }
        }
    };
    match rules {
        RuleOutcome::Open => decide(true, AuthRequirement::None),
        RuleOutcome::Enforced(matched) => decide(matched.is_some(), matched.unwrap_or_default()),
        RuleOutcome::Audited(matched) => {
            // What is enforced: MutualAuth alone. What the audited rules add is reported only.
            let enforced = decide(true, AuthRequirement::None);
            if enforced.verdict == Verdict::Deny {
                return enforced;
            }
            match matched {
                None => Decision { audit: Some(AuditFinding::Denied), ..enforced },
                Some(AuthRequirement::Required) if mutual_auth < AuthRequirement::Required => {
                    Decision { authentication: AuthRequirement::Permissive, audit: Some(AuditFinding::AuthenticationRequired), ..enforced }
                }
                Some(_) => enforced,
            }
        }
    }
}

fn parse_selector(s: &LabelSelector) -> Result<Selector, String> {
    Selector::try_from(s.clone()).map_err(|e| format!("invalid label selector: {}", e.0))
}

fn parse_port(port: i32, end_port: Option<i32>, protocol: Protocol) -> Result<PortMatch, String> {
    let start = u16::try_from(port).ok().filter(|p| *p >= 1).ok_or_else(|| format!("port {port} is not in 1-65535"))?;
    let end = match end_port {
        None => start,
        Some(e) => u16::try_from(e).ok().filter(|e| *e >= start).ok_or_else(|| format!("endPort {e} is not in {start}-65535"))?,
    };
    let protocol = match protocol {
        Protocol::Tcp => TableProtocol::Tcp,
        Protocol::Udp => TableProtocol::Udp,
    };
    Ok(PortMatch { protocol, start, end })
}

fn every_port() -> Vec<PortMatch> {
    TableProtocol::ALL
        .iter()
        .map(|&protocol| {
            let end = if protocol.has_ports() { u16::MAX } else { 0 };
            PortMatch { protocol, start: 0, end }
        })
        .collect()
}

mod explain;
mod inputs;

pub use explain::{Explanation, ModeFrom, RuleRef};
pub use inputs::{Inputs, NamespaceInfo, ObjectRef, PodInfo, Resource};

#[cfg(test)]
mod tests;
