//! One consistent view of the cluster: the policy model's inputs plus the nodes, built the same
//! way from the API's caches and from manifests.

use crate::endpoints::{self, EndpointRules, NodeFacts, NotEndpoint, SharedAddress};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use meshauth_crds::{MeshPolicy, MutualAuth, SpiffeId, TrustDomain};
use meshauth_policy::model::{Inputs, NamespaceInfo, ObjectRef, PodInfo, Resource};
use meshauth_policy::tables::{AuthRequirement, EndpointEntry, NO_SPIFFE_ID, WORLD_IDENTITY};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The annotation on a Node that names its SPIRE agent's SPIFFE ID.
pub const SPIRE_AGENT_ID_ANNOTATION: &str = "meshauth.io/spire-agent-id";
/// The annotation on a Node that overrides the address its meshauth agent listens on.
pub const AGENT_ADDRESS_ANNOTATION: &str = "meshauth.io/agent-address";

/// A node as the agent needs it: its name, the address its agent listens on (the first IPv4
/// InternalIP, else the first InternalIP, else the first address), every address it reports
/// and its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub address: Option<String>,
    pub addresses: Vec<String>,
    pub annotations: BTreeMap<String, String>,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let addresses = node.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            // IPv4 first: the datapath's maps name nodes by IPv4 address, so a dual-stack node
            // whose first InternalIP is IPv6 is still a node its pods' proofs can name.
            address: addresses
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .min_by_key(|a| a.address.parse::<IpAddr>().map_or(2, |ip| u8::from(!ip.is_ipv4())))
                .or_else(|| addresses.first())
                .map(|a| a.address.clone()),
            addresses: addresses.iter().map(|a| a.address.clone()).collect(),
            annotations: node.metadata.annotations.clone().unwrap_or_default(),
        }
    }
}

/// `a` as an IP address, IPv4-mapped IPv6 as IPv4; `None` for what is no IP (a hostname).
fn canonical_ip(a: &str) -> Option<IpAddr> {
    a.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// One consistent view of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub inputs: Inputs,
    pub nodes: Vec<NodeInfo>,
    /// Pods that are not endpoints, and why (for logs and `meshauthctl`).
    pub not_endpoints: Vec<(ObjectRef, NotEndpoint)>,
    /// Pods that would be endpoints but for their address, which the API does not show yet:
    /// a node's agent that has just set up such a pod's network knows it first.
    pub unaddressed: Vec<PodInfo>,
    /// Addresses several pods claim: none of them is an endpoint, and the address is an
    /// isolated non-identity ([`Snapshot::isolated_endpoints`]).
    pub shared_addresses: Vec<SharedAddress>,
    /// `meshauth.io/agent-address` annotations are taken as they are
    /// ([`EndpointRules::trust_agent_address_annotations`]).
    pub trust_agent_address_annotations: bool,
}

impl Snapshot {
    /// Builds the view from the objects themselves; only pods that are endpoints under `rules`
    /// ([`endpoints::classify_all`]) reach the model.
    pub fn from_objects<'a>(
        rules: &EndpointRules,
        namespaces: impl IntoIterator<Item = &'a Namespace>,
        pods: impl IntoIterator<Item = &'a Pod>,
        nodes: &[&'a Node],
        mesh_policies: impl IntoIterator<Item = &'a MeshPolicy>,
        mutual_auths: impl IntoIterator<Item = &'a MutualAuth>,
    ) -> Self {
        let facts = NodeFacts::new(nodes.iter().copied());
        let (classified, shared_addresses) = endpoints::classify_all(pods, &facts, rules);
        let mut snapshot = Snapshot {
            inputs: Inputs {
                namespaces: namespaces.into_iter().map(NamespaceInfo::from_namespace).collect(),
                pods: Vec::new(),
                mesh_policies: mesh_policies.into_iter().map(Resource::from_mesh_policy).collect(),
                mutual_auths: mutual_auths.into_iter().map(Resource::from_mutual_auth).collect(),
            },
            nodes: nodes.iter().map(|n| NodeInfo::from_node(n)).collect(),
            not_endpoints: Vec::new(),
            unaddressed: Vec::new(),
            shared_addresses,
            trust_agent_address_annotations: rules.trust_agent_address_annotations,
        };
        for (pod, endpoint) in classified {
            match endpoint {
                Ok(info) => snapshot.inputs.pods.push(info),
                Err(why) => {
                    if why == NotEndpoint::NoAddress {
                        snapshot.unaddressed.push(PodInfo::from_pod(pod));
                    }
                    let pod_ref =
                        ObjectRef::new(pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default());
                    snapshot.not_endpoints.push((pod_ref, why));
                }
            }
        }
        snapshot
    }

    /// The datapath entries of the shared addresses: isolated, with no security identity and
    /// no SPIFFE ID, so a packet from one is a world source (dropped where authentication is
    /// required) and a packet to one passes only what the node itself sends, never as the
    /// identity of either claimant.
    pub fn isolated_endpoints(&self) -> Vec<EndpointEntry> {
        self.shared_addresses
            .iter()
            .map(|shared| EndpointEntry {
                ip: shared.ip,
                security_identity: WORLD_IDENTITY,
                spiffe_id: NO_SPIFFE_ID,
                isolated: true,
                audit: false,
                mutual_auth: AuthRequirement::None,
                pod: format!("(shared by {})", shared.pods.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
                node: None,
                node_address: None,
            })
            .collect()
    }

    /// Lays the shared addresses over compiled endpoints: whatever entry an address had (a pod
    /// an agent laid its CNI address over, say) becomes the isolated non-identity.
    pub fn isolate_shared_addresses(&self, endpoints: &mut Vec<EndpointEntry>) {
        let shared = self.isolated_endpoints();
        endpoints.retain(|e| !shared.iter().any(|s| s.ip == e.ip));
        endpoints.extend(shared);
    }

    /// The address of a node's agent: the `meshauth.io/agent-address` annotation, else the
    /// node's InternalIP. A node writes its own annotations: unless they are trusted, the
    /// annotation counts only when it names one of the node's own addresses that no other node
    /// reports, so a node cannot have its identities hosted at a pod's or another node's
    /// address.
    ///
    /// `None` when the address is unspecified (`0.0.0.0`, `::`) or another node claims it too:
    /// the datapath names nodes by address, and two nodes under one name would count each
    /// other's proofs (fail closed: pods of such a node have no node whose proofs count).
    pub fn node_address(&self, node: &str) -> Option<String> {
        let n = self.nodes.iter().find(|n| n.name == node)?;
        // As IP addresses, not strings: `::ffff:192.168.1.7` is 192.168.1.7 to the datapath.
        let reports = |addresses: &[String], ip: IpAddr| addresses.iter().any(|a| canonical_ip(a) == Some(ip));
        let claimed_elsewhere = |ip: IpAddr| {
            self.nodes.iter().any(|o| {
                o.name != n.name
                    && (reports(&o.addresses, ip)
                        || (self.trust_agent_address_annotations
                            && o.annotations.get(AGENT_ADDRESS_ANNOTATION).and_then(|a| canonical_ip(a)) == Some(ip)))
            })
        };
        let annotated = n
            .annotations
            .get(AGENT_ADDRESS_ANNOTATION)
            .and_then(|a| canonical_ip(a))
            .filter(|ip| self.trust_agent_address_annotations || (reports(&n.addresses, *ip) && !claimed_elsewhere(*ip)));
        let ip = annotated.or_else(|| n.address.as_deref().and_then(canonical_ip))?;
        // Unspecified is the maps' name for this node, loopback is every node's own.
        (!ip.is_unspecified() && !ip.is_loopback() && !claimed_elsewhere(ip)).then(|| ip.to_string())
    }

    /// The SPIFFE IDs of the pods on `node` (what a node-scoped issuer may hand that node).
    pub fn node_identities(&self, node: &str, trust_domain: &TrustDomain) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self
            .inputs
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(node))
            .map(|p| trust_domain.service_account_id(&p.namespace, &p.service_account))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::Manifests;
    use meshauth_policy::compile::{NumberAllocator, auth_identity_pairs, compile, evaluate};
    use meshauth_policy::model::{ModelConfig, PolicyModel, Verdict};
    use meshauth_policy::tables::TableProtocol;
    use std::net::Ipv4Addr;

    const MESH: &str = include_str!("../testdata/forged-address/mesh.yaml");
    const FORGED_MIRROR: &str = include_str!("../testdata/forged-address/mirror.yaml");

    /// The tables a node's agent loads: the compiled ones and the isolated shared addresses.
    fn tables(text: &str) -> (Snapshot, meshauth_policy::tables::CompiledTables) {
        let mut manifests = Manifests::default();
        manifests.add_source("mesh.yaml", text).expect("manifests");
        let snapshot = manifests.snapshot();
        let model = PolicyModel::new(ModelConfig::default(), snapshot.inputs.clone());
        let mut tables = compile(&model, &mut NumberAllocator::default());
        snapshot.isolate_shared_addresses(&mut tables.endpoints);
        (snapshot, tables)
    }

    #[test]
    fn an_agent_address_annotation_names_one_of_the_nodes_own_addresses_or_is_ignored() {
        let nodes = "\
apiVersion: v1
kind: Node
metadata: {name: node-1, annotations: {meshauth.io/agent-address: 10.0.0.11}}
status: {addresses: [{type: InternalIP, address: 192.168.1.1}, {type: InternalIP, address: 10.0.0.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, annotations: {meshauth.io/agent-address: 192.168.1.1}}
status: {addresses: [{type: InternalIP, address: 192.168.1.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-3, annotations: {meshauth.io/agent-address: 10.244.1.5}}
status: {addresses: [{type: InternalIP, address: 192.168.1.3}]}
";
        let mut manifests = Manifests::default();
        manifests.add_source("nodes.yaml", nodes).expect("manifests");
        let s = manifests.snapshot();
        assert_eq!(s.node_address("node-1").as_deref(), Some("10.0.0.11"), "its own second address");
        // node-2 (compromised) names node-1's address, node-3 a pod's: both fall back to their own.
        assert_eq!(s.node_address("node-2").as_deref(), Some("192.168.1.2"));
        assert_eq!(s.node_address("node-3").as_deref(), Some("192.168.1.3"));
        let trusted = manifests.snapshot_with(&EndpointRules { trust_agent_address_annotations: true, ..EndpointRules::default() });
        assert_eq!(trusted.node_address("node-3").as_deref(), Some("10.244.1.5"), "the explicit opt-in");
    }

    #[test]
    fn a_node_address_that_is_unspecified_or_claimed_by_two_nodes_names_neither() {
        let nodes = "\
apiVersion: v1
kind: Node
metadata: {name: node-1}
status: {addresses: [{type: InternalIP, address: 0.0.0.0}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
status: {addresses: [{type: InternalIP, address: 192.168.1.7}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-3}
status: {addresses: [{type: InternalIP, address: 192.168.1.7}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-4}
status: {addresses: [{type: InternalIP, address: 'fd00::4'}, {type: InternalIP, address: 192.168.1.4}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-5, annotations: {meshauth.io/agent-address: 192.168.1.4}}
status: {addresses: [{type: InternalIP, address: 192.168.1.5}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-6}
status: {addresses: [{type: InternalIP, address: '::ffff:192.168.1.5'}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-7}
status: {addresses: [{type: InternalIP, address: '::ffff:127.0.0.1'}]}
";
        let mut manifests = Manifests::default();
        manifests.add_source("nodes.yaml", nodes).expect("manifests");
        let s = manifests.snapshot();
        // 0.0.0.0 is the maps' name for this node: another node must never be it.
        assert_eq!(s.node_address("node-1"), None);
        // Two nodes under one address would count each other's proofs.
        assert_eq!((s.node_address("node-2"), s.node_address("node-3")), (None, None));
        assert_eq!(s.node_address("node-4").as_deref(), Some("192.168.1.4"), "the IPv4 InternalIP of a dual-stack node");
        // node-6 writes node-5's address IPv4-mapped: still one address for two nodes.
        assert_eq!((s.node_address("node-5"), s.node_address("node-6")), (None, None));
        assert_eq!(s.node_address("node-7"), None, "loopback is every node's own");
        // Trusted, node-5's annotation takes node-4's address: both lose it rather than share it.
        let trusted = manifests.snapshot_with(&EndpointRules { trust_agent_address_annotations: true, ..EndpointRules::default() });
        assert_eq!((trusted.node_address("node-4"), trusted.node_address("node-5")), (None, None));
    }

    #[test]
    fn an_address_two_pods_claim_is_an_isolated_non_identity() {
        let (payment, order) = (Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 1, 6));
        let (_, honest) = tables(MESH);
        let d = evaluate(&honest, payment, order, TableProtocol::Tcp, 80).expect("order is a mesh pod");
        assert_eq!(d.verdict, Verdict::Allow, "before the forgery the pair only needs its handshake");

        let (snapshot, forged) = tables(&format!("{MESH}---\n{FORGED_MIRROR}"));
        assert_eq!(snapshot.shared_addresses.len(), 1);
        assert!(snapshot.not_endpoints.contains(&(ObjectRef::new("shop", "payment-0"), NotEndpoint::SharedAddress)));
        // From the shared address: a world source, dropped by the Strict destination.
        let from = evaluate(&forged, payment, order, TableProtocol::Tcp, 80).expect("order is a mesh pod");
        assert_eq!(from.verdict, Verdict::Deny);
        // To it: isolated, so nothing from a pod passes, and no entry names payment's identity.
        let to = evaluate(&forged, order, payment, TableProtocol::Tcp, 80).expect("the address is isolated, not unknown");
        assert_eq!(to.verdict, Verdict::Deny);
        let entry = forged.endpoints.iter().find(|e| e.ip == payment).expect("entry");
        assert_eq!((entry.security_identity, entry.spiffe_id), (WORLD_IDENTITY, NO_SPIFFE_ID));
        assert!(!forged.spiffe_ids.iter().any(|(_, id)| id.ends_with("/sa/payment")), "no SPIFFE number for the contested pod");
        let model = PolicyModel::new(ModelConfig::default(), snapshot.inputs.clone());
        assert!(
            auth_identity_pairs(&model, |_| true)
                .iter()
                .all(|p| !p.dst_spiffe_id.ends_with("/sa/payment") && !p.src_spiffe_id.ends_with("/sa/payment")),
            "no handshake, no SVID for it"
        );
        assert!(snapshot.node_identities("node-1", &TrustDomain::default()).iter().all(|id| !id.as_str().ends_with("/sa/payment")));
    }
}
