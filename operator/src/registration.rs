//! Which SPIRE registration entries should exist, and what to change to get there.
//!
//! Job: from the policy model and the nodes, the node-scoped entries the mesh needs — for every
//! SPIFFE ID on either side of a pair that needs authentication
//! ([`meshauth_policy::compile::auth_identity_pairs`]), one entry per node that hosts a pod of that
//! identity, parented to the node's SPIRE agent — and the create/update/delete plan that turns
//! the operator's current entries into those. Pure: it must not talk to SPIRE or Kubernetes,
//! and it must not decide policy itself (the model does).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Node;
use meshauth_crds::{SpiffeId, TrustDomain};
use meshauth_policy::compile::auth_identity_pairs;
use meshauth_policy::model::{ObjectRef, PolicyModel};

use crate::spire::{AttestedAgent, EntryKey, EntrySpec, Registered, Selector, SpireError};

/// The Node annotation that names the node's SPIRE agent SPIFFE ID.
pub const NODE_AGENT_ID_ANNOTATION: &str = "meshauth.io/spire-agent-id";

/// Why a node's pods cannot get entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistrationError {
    #[error("node {node} has annotation {NODE_AGENT_ID_ANNOTATION}={value:?}, which is not a SPIFFE ID: {reason}")]
    BadAnnotation { node: String, value: String, reason: String },
    #[error("node {node} has no {NODE_AGENT_ID_ANNOTATION} annotation and no UID to derive its k8s_psat agent ID from")]
    NoAgentId { node: String },
    #[error("node {node} does not exist (yet)")]
    UnknownNode { node: String },
    #[error("node {node} has annotation {NODE_AGENT_ID_ANNOTATION}={agent_id:?}, but SPIRE has attested no such agent (or banned it)")]
    UnattestedAgent { node: String, agent_id: String },
    #[error(
        "node {node} has annotation {NODE_AGENT_ID_ANNOTATION}={agent_id:?}, but SPIRE's attestation of that agent ({attestation}: {selectors}) does not name this node; --trust-node-agent-annotations accepts it anyway"
    )]
    AgentOfAnotherNode { node: String, agent_id: String, attestation: String, selectors: String },
    #[error("node {node} has annotation {NODE_AGENT_ID_ANNOTATION}={agent_id:?}, which nodes {nodes} all name: it serves none of them")]
    AgentOfSeveralNodes { node: String, agent_id: String, nodes: String },
    #[error("cannot check node {node}'s {NODE_AGENT_ID_ANNOTATION} annotation: the SPIRE server's attested agents are unknown: {reason}")]
    AgentsUnknown { node: String, reason: String },
}

/// What every entry the operator makes has in common.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySettings {
    pub trust_domain: TrustDomain,
    /// The cluster name of SPIRE's k8s_psat node attestor, for agent IDs derived from Node UIDs.
    pub cluster_name: String,
    /// Selectors that match the meshauth agent workload (sorted when entries are built).
    pub selectors: Vec<Selector>,
    /// X.509-SVID TTL in seconds; 0: the server's default.
    pub x509_svid_ttl: i32,
}

/// The SPIRE agent ID of a node: its `meshauth.io/spire-agent-id` annotation when present, else
/// the k8s_psat convention `spiffe://<td>/spire/agent/k8s_psat/<cluster>/<node-uid>`.
pub fn node_agent_id(node: &Node, settings: &EntrySettings) -> Result<String, RegistrationError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    if let Some(value) = node.metadata.annotations.as_ref().and_then(|a| a.get(NODE_AGENT_ID_ANNOTATION)) {
        return match SpiffeId::parse(value.trim()) {
            Ok(id) => Ok(id.to_string()),
            Err(e) => Err(RegistrationError::BadAnnotation { node: name, value: value.clone(), reason: e.to_string() }),
        };
    }
    match node.metadata.uid.as_deref().filter(|u| !u.is_empty()) {
        Some(uid) => {
            let id = format!("spiffe://{}/spire/agent/k8s_psat/{}/{uid}", settings.trust_domain, settings.cluster_name);
            SpiffeId::parse(&id).map(|id| id.to_string()).map_err(|e| RegistrationError::BadAnnotation {
                node: name,
                value: id,
                reason: e.to_string(),
            })
        }
        None => Err(RegistrationError::NoAgentId { node: name }),
    }
}

/// The selector type of SPIRE's k8s_psat node attestor, and the values that name the node.
const PSAT: &str = "k8s_psat";
const PSAT_NODE_NAME: &str = "agent_node_name:";
const PSAT_NODE_UID: &str = "agent_node_uid:";

/// [`node_agent_id`], with an annotated agent checked against what SPIRE attested. A node can
/// write its own annotations, so an unchecked one moves its pods' entries (and their SVIDs)
/// to whichever agent it names. The annotated agent must be one the server attested and did
/// not ban, and its attestation must name this node (k8s_psat's `agent_node_name` or
/// `agent_node_uid` selector); attestors that name no node (join tokens, x509pop) need the
/// explicit opt-in `trust_annotations`, which waives that last check only. IDs derived from
/// the Node's UID need no check: the API server assigns the UID.
pub fn verified_node_agent_id(
    node: &Node,
    settings: &EntrySettings,
    attested: Result<&[AttestedAgent], &SpireError>,
    trust_annotations: bool,
) -> Result<String, RegistrationError> {
    let id = node_agent_id(node, settings)?;
    if !is_annotated(node) {
        return Ok(id);
    }
    let name = node.metadata.name.clone().unwrap_or_default();
    let agents = attested.map_err(|e| RegistrationError::AgentsUnknown { node: name.clone(), reason: e.to_string() })?;
    let Some(agent) = agents.iter().find(|a| a.id == id && !a.banned) else {
        return Err(RegistrationError::UnattestedAgent { node: name, agent_id: id });
    };
    let uid = node.metadata.uid.as_deref().filter(|u| !u.is_empty());
    let names_node = agent.selectors.iter().filter(|s| s.kind == PSAT).any(|s| {
        s.value.strip_prefix(PSAT_NODE_NAME) == Some(name.as_str()) || (uid.is_some() && s.value.strip_prefix(PSAT_NODE_UID) == uid)
    });
    if names_node || trust_annotations {
        Ok(id)
    } else {
        let selectors = agent.selectors.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
        Err(RegistrationError::AgentOfAnotherNode { node: name, agent_id: id, attestation: agent.attestation_type.clone(), selectors })
    }
}

fn is_annotated(node: &Node) -> bool {
    node.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(NODE_AGENT_ID_ANNOTATION))
}

/// Each node's verified SPIRE agent ID ([`verified_node_agent_id`]), or why it has none. An
/// agent that several nodes' annotations name serves none of them: which node is lying cannot
/// be told, and the agent must not get SVIDs for pods it does not host.
pub fn verified_node_agents<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    settings: &EntrySettings,
    attested: &Result<Vec<AttestedAgent>, SpireError>,
    trust_annotations: bool,
) -> BTreeMap<String, Result<String, RegistrationError>> {
    let verified: Vec<(String, bool, Result<String, RegistrationError>)> = nodes
        .into_iter()
        .map(|n| {
            let id = verified_node_agent_id(n, settings, attested.as_ref().map(Vec::as_slice), trust_annotations);
            (n.metadata.name.clone().unwrap_or_default(), is_annotated(n), id)
        })
        .collect();
    let mut named: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (node, annotated, id) in &verified {
        if let (true, Ok(id)) = (annotated, id) {
            named.entry(id.as_str()).or_default().push(node.as_str());
        }
    }
    let shared: BTreeMap<String, String> =
        named.into_iter().filter(|(_, nodes)| nodes.len() > 1).map(|(id, nodes)| (id.to_owned(), nodes.join(", "))).collect();
    verified
        .into_iter()
        .map(|(node, _, id)| {
            let id = match id {
                Ok(id) if shared.contains_key(&id) => {
                    Err(RegistrationError::AgentOfSeveralNodes { node: node.clone(), nodes: shared[&id].clone(), agent_id: id })
                }
                other => other,
            };
            (node, id)
        })
        .collect()
}

/// The entries the mesh needs right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// One spec per (SPIFFE ID, node agent).
    pub entries: BTreeMap<EntryKey, EntrySpec>,
    /// Every scheduled pod whose identity needs authentication, with the entry it needs (an
    /// error when its node's agent ID is unknown).
    pub pods: BTreeMap<ObjectRef, Result<EntryKey, RegistrationError>>,
}

impl Desired {
    /// Node problems, each once.
    pub fn problems(&self) -> BTreeSet<RegistrationError> {
        self.pods.values().filter_map(|r| r.as_ref().err().cloned()).collect()
    }
}

impl PartialOrd for RegistrationError {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RegistrationError {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.to_string().cmp(&other.to_string())
    }
}

/// The SPIFFE IDs some pod needs authenticated: both sides of every pair that needs
/// authentication (required or permissive).
pub fn identities_needing_auth(model: &PolicyModel) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for pair in auth_identity_pairs(model, |_| true) {
        ids.insert(pair.dst_spiffe_id);
        ids.insert(pair.src_spiffe_id);
    }
    ids
}

/// The entries the model needs. `agents` maps node name to its agent ID (or why it has none).
pub fn desired(model: &PolicyModel, agents: &BTreeMap<String, Result<String, RegistrationError>>, settings: &EntrySettings) -> Desired {
    let needed = identities_needing_auth(model);
    let mut out = Desired::default();
    for pod in model.pods() {
        let Some(node) = pod.node.as_deref() else { continue };
        let spiffe_id = model.spiffe_id(pod).to_string();
        if !needed.contains(&spiffe_id) {
            continue;
        }
        let key = match agents.get(node) {
            None => Err(RegistrationError::UnknownNode { node: node.to_owned() }),
            Some(Err(e)) => Err(e.clone()),
            Some(Ok(parent)) => {
                let spec = EntrySpec::new(spiffe_id, parent.clone(), settings.selectors.clone(), settings.x509_svid_ttl);
                let key = spec.key();
                out.entries.entry(key.clone()).or_insert(spec);
                Ok(key)
            }
        };
        out.pods.insert(pod.object_ref(), key);
    }
    out
}

/// What to change on the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub create: Vec<EntrySpec>,
    pub update: Vec<Registered>,
    /// IDs of the operator's entries to delete (never any other entry's).
    pub delete: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.create.is_empty() && self.update.is_empty() && self.delete.is_empty()
    }
}

/// The changes that turn `current` (the operator's own entries) into `desired`: keep one
/// entry per key (an exact one if there is one, else the first, rewritten), delete the rest
/// and every entry of a key no longer needed, create what is missing.
pub fn plan(desired: &BTreeMap<EntryKey, EntrySpec>, current: &[Registered]) -> Plan {
    let mut by_key: BTreeMap<EntryKey, Vec<&Registered>> = BTreeMap::new();
    for r in current {
        by_key.entry(r.spec.key()).or_default().push(r);
    }
    let mut out = Plan::default();
    for (key, entries) in &by_key {
        match desired.get(key) {
            None => out.delete.extend(entries.iter().map(|e| e.id.clone())),
            Some(want) => {
                let keep = entries.iter().position(|e| &e.spec == want);
                let keep_index = keep.unwrap_or(0);
                for (i, e) in entries.iter().enumerate() {
                    if i == keep_index {
                        if keep.is_none() {
                            out.update.push(Registered { id: e.id.clone(), spec: want.clone() });
                        }
                    } else {
                        out.delete.push(e.id.clone());
                    }
                }
            }
        }
    }
    out.create = desired.iter().filter(|(k, _)| !by_key.contains_key(k)).map(|(_, s)| s.clone()).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use meshauth_crds::{MutualAuthMode, MutualAuthSpec};
    use meshauth_policy::model::{Inputs, ModelConfig, PodInfo, Resource};

    fn settings() -> EntrySettings {
        EntrySettings {
            trust_domain: TrustDomain::default(),
            cluster_name: "c1".into(),
            selectors: vec![Selector::parse("unix:uid:0").expect("valid")],
            x509_svid_ttl: 300,
        }
    }

    fn node(name: &str, uid: Option<&str>, annotation: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: uid.map(Into::into),
                annotations: annotation.map(|a| [(NODE_AGENT_ID_ANNOTATION.to_owned(), a.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(ns: &str, name: &str, sa: &str, node: Option<&str>, ip: u8) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            service_account: sa.into(),
            ip: Some(std::net::Ipv4Addr::new(10, 0, 0, ip)),
            node: node.map(Into::into),
        }
    }

    fn strict(ns: &str) -> Resource<MutualAuthSpec> {
        Resource {
            namespace: ns.into(),
            name: "default".into(),
            created: Some("2024-01-01T00:00:00Z".into()),
            spec: MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict },
        }
    }

    fn agents(nodes: &[&str]) -> BTreeMap<String, Result<String, RegistrationError>> {
        nodes.iter().map(|n| (n.to_string(), Ok(format!("spiffe://cluster.local/agent/{n}")))).collect()
    }

    #[test]
    fn agent_id_comes_from_the_annotation_else_from_the_psat_convention() {
        let s = settings();
        let n = node("n1", Some("u-1"), Some("spiffe://cluster.local/spire/agent/join_token/x"));
        assert_eq!(node_agent_id(&n, &s), Ok("spiffe://cluster.local/spire/agent/join_token/x".into()));
        let n = node("n1", Some("u-1"), None);
        assert_eq!(node_agent_id(&n, &s), Ok("spiffe://cluster.local/spire/agent/k8s_psat/c1/u-1".into()));
        let n = node("n1", Some("u-1"), Some("http://nope"));
        assert!(matches!(node_agent_id(&n, &s), Err(RegistrationError::BadAnnotation { .. })));
        let n = node("n1", None, None);
        assert_eq!(node_agent_id(&n, &s), Err(RegistrationError::NoAgentId { node: "n1".into() }));
    }

    fn psat_agent(id: &str, node: &str, uid: &str) -> AttestedAgent {
        AttestedAgent {
            id: id.into(),
            attestation_type: "k8s_psat".into(),
            selectors: vec![
                Selector::parse("k8s_psat:cluster:c1").expect("valid"),
                Selector::parse(&format!("k8s_psat:agent_node_name:{node}")).expect("valid"),
                Selector::parse(&format!("k8s_psat:agent_node_uid:{uid}")).expect("valid"),
            ],
            banned: false,
        }
    }

    #[test]
    fn a_node_annotated_with_another_nodes_agent_gets_no_entries() {
        let s = settings();
        let (a1, a2) = ("spiffe://cluster.local/spire/agent/k8s_psat/c1/u-1", "spiffe://cluster.local/spire/agent/k8s_psat/c1/u-2");
        let attested = Ok(vec![psat_agent(a1, "n1", "u-1"), psat_agent(a2, "n2", "u-2")]);
        // n2 (compromised) names n1's agent, so that n1's agent would get n2's pods' SVIDs.
        let nodes = [node("n1", Some("u-1"), Some(a1)), node("n2", Some("u-2"), Some(a1)), node("n3", Some("u-3"), None)];
        let agents = verified_node_agents(&nodes, &s, &attested, false);
        assert_eq!(agents["n1"], Ok(a1.to_owned()));
        assert!(matches!(&agents["n2"], Err(RegistrationError::AgentOfAnotherNode { node, .. }) if node == "n2"), "{:?}", agents["n2"]);
        assert_eq!(
            agents["n3"],
            Ok("spiffe://cluster.local/spire/agent/k8s_psat/c1/u-3".to_owned()),
            "derived from the UID: no check needed"
        );
        let inputs = Inputs {
            pods: vec![pod("shop", "a1", "a", Some("n1"), 1), pod("shop", "b1", "b", Some("n2"), 2)],
            mutual_auths: vec![strict("shop")],
            ..Default::default()
        };
        let model = PolicyModel::new(ModelConfig::default(), inputs);
        let d = desired(&model, &agents, &s);
        let keys: Vec<String> = d.entries.keys().map(ToString::to_string).collect();
        assert_eq!(keys, vec![format!("spiffe://cluster.local/ns/shop/sa/a on {a1}")], "nothing of n2 parented to n1's agent");
        assert_eq!(d.problems().len(), 1);

        // An agent SPIRE never attested (or banned), and a server that cannot be asked.
        let forged = [node("n2", Some("u-2"), Some("spiffe://cluster.local/spire/agent/join_token/made-up"))];
        assert!(matches!(verified_node_agents(&forged, &s, &attested, false)["n2"], Err(RegistrationError::UnattestedAgent { .. })));
        let mut banned = psat_agent(a2, "n2", "u-2");
        banned.banned = true;
        let n2 = [node("n2", Some("u-2"), Some(a2))];
        assert!(matches!(verified_node_agents(&n2, &s, &Ok(vec![banned]), false)["n2"], Err(RegistrationError::UnattestedAgent { .. })));
        let down = Err(SpireError::BadSelector("x".into()));
        assert!(matches!(verified_node_agents(&n2, &s, &down, false)["n2"], Err(RegistrationError::AgentsUnknown { .. })));
        // The explicit opt-in (join tokens, whose attestation names no node) waives the node
        // check only: the agent must still be attested, and named by one node alone.
        let join = |id: &str| AttestedAgent { id: id.into(), attestation_type: "join_token".into(), selectors: vec![], banned: false };
        let (j1, j2) = ("spiffe://cluster.local/spire/agent/join_token/t1", "spiffe://cluster.local/spire/agent/join_token/t2");
        let joined = Ok(vec![join(j1), join(j2)]);
        let honest = [node("n1", Some("u-1"), Some(j1)), node("n2", Some("u-2"), Some(j2))];
        let trusted = verified_node_agents(&honest, &s, &joined, true);
        assert_eq!((trusted["n1"].clone(), trusted["n2"].clone()), (Ok(j1.to_owned()), Ok(j2.to_owned())));
        assert!(matches!(verified_node_agents(&honest, &s, &joined, false)["n1"], Err(RegistrationError::AgentOfAnotherNode { .. })));
        let forging = [node("n1", Some("u-1"), Some(j1)), node("n2", Some("u-2"), Some(j1))];
        let trusted = verified_node_agents(&forging, &s, &joined, true);
        assert!(trusted.values().all(|r| matches!(r, Err(RegistrationError::AgentOfSeveralNodes { .. }))), "{trusted:?}");
        assert!(matches!(verified_node_agents(&n2, &s, &down, true)["n2"], Err(RegistrationError::AgentsUnknown { .. })));
    }

    #[test]
    fn one_entry_per_identity_and_node_for_identities_that_need_auth_only() {
        let inputs = Inputs {
            pods: vec![
                // shop is strict: both its identities need entries, on each node hosting them.
                pod("shop", "a1", "a", Some("n1"), 1),
                pod("shop", "a2", "a", Some("n1"), 2),
                pod("shop", "a3", "a", Some("n2"), 3),
                pod("shop", "b1", "b", Some("n2"), 4),
                // free has no requirement of its own but talks to shop: its identity is needed too.
                pod("free", "c1", "c", Some("n3"), 5),
                // unscheduled: no node, no entry.
                pod("shop", "a4", "a", None, 6),
            ],
            mutual_auths: vec![strict("shop")],
            ..Default::default()
        };
        let model = PolicyModel::new(ModelConfig::default(), inputs);
        let d = desired(&model, &agents(&["n1", "n2", "n3"]), &settings());
        let keys: Vec<String> = d.entries.keys().map(ToString::to_string).collect();
        assert_eq!(
            keys,
            vec![
                "spiffe://cluster.local/ns/free/sa/c on spiffe://cluster.local/agent/n3",
                "spiffe://cluster.local/ns/shop/sa/a on spiffe://cluster.local/agent/n1",
                "spiffe://cluster.local/ns/shop/sa/a on spiffe://cluster.local/agent/n2",
                "spiffe://cluster.local/ns/shop/sa/b on spiffe://cluster.local/agent/n2",
            ]
        );
        assert!(d.entries.values().all(|e| e.x509_svid_ttl == 300 && e.selectors.len() == 1));
        assert_eq!(d.pods.len(), 5);
        assert!(d.problems().is_empty());
    }

    #[test]
    fn nothing_needed_without_a_requirement_and_unknown_nodes_are_reported() {
        let pods = vec![pod("shop", "a1", "a", Some("n1"), 1), pod("shop", "b1", "b", Some("gone"), 2)];
        let model = PolicyModel::new(ModelConfig::default(), Inputs { pods: pods.clone(), ..Default::default() });
        assert_eq!(desired(&model, &agents(&["n1"]), &settings()), Desired::default());
        let model = PolicyModel::new(ModelConfig::default(), Inputs { pods, mutual_auths: vec![strict("shop")], ..Default::default() });
        let d = desired(&model, &agents(&["n1"]), &settings());
        assert_eq!(d.entries.len(), 1);
        assert_eq!(d.problems().into_iter().collect::<Vec<_>>(), vec![RegistrationError::UnknownNode { node: "gone".into() }]);
    }

    fn spec(id: &str, parent: &str, ttl: i32) -> EntrySpec {
        EntrySpec::new(
            format!("spiffe://td/{id}"),
            format!("spiffe://td/{parent}"),
            vec![Selector::parse("unix:uid:0").expect("valid")],
            ttl,
        )
    }

    #[test]
    fn plan_creates_missing_rewrites_changed_and_deletes_extra_and_unneeded() {
        let want: BTreeMap<_, _> =
            [spec("a", "n1", 60), spec("a", "n2", 60), spec("b", "n1", 60)].into_iter().map(|s| (s.key(), s)).collect();
        let current = vec![
            Registered { id: "1".into(), spec: spec("a", "n1", 60) }, // exact: kept
            Registered { id: "2".into(), spec: spec("a", "n1", 30) }, // duplicate: deleted
            Registered { id: "3".into(), spec: spec("b", "n1", 30) }, // wrong TTL: updated
            Registered { id: "4".into(), spec: spec("c", "n1", 60) }, // not needed: deleted
        ];
        let p = plan(&want, &current);
        assert_eq!(p.create, vec![spec("a", "n2", 60)]);
        assert_eq!(p.update, vec![Registered { id: "3".into(), spec: spec("b", "n1", 60) }]);
        assert_eq!(p.delete, vec!["2".to_owned(), "4".to_owned()]);
        let after: Vec<Registered> = vec![
            Registered { id: "1".into(), spec: spec("a", "n1", 60) },
            Registered { id: "3".into(), spec: spec("b", "n1", 60) },
            Registered { id: "5".into(), spec: spec("a", "n2", 60) },
        ];
        assert!(plan(&want, &after).is_empty());
        assert_eq!(plan(&BTreeMap::new(), &after).delete.len(), 3);
    }
}
