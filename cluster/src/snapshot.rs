//! One consistent view of the cluster: the policy model's inputs plus the nodes, built the same
//! way from the API's caches and from manifests.

use crate::endpoints::{self, NotEndpoint};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use meshauth_crds::{MeshPolicy, MutualAuth, SpiffeId, TrustDomain};
use meshauth_policy::model::{Inputs, NamespaceInfo, ObjectRef, PodInfo, Resource};
use std::collections::BTreeMap;

/// The annotation on a Node that names its SPIRE agent's SPIFFE ID.
pub const SPIRE_AGENT_ID_ANNOTATION: &str = "meshauth.io/spire-agent-id";
/// The annotation on a Node that overrides the address its meshauth agent listens on.
pub const AGENT_ADDRESS_ANNOTATION: &str = "meshauth.io/agent-address";

/// A node as the agent needs it: its name, the address its agent listens on (the first
/// InternalIP, else the first address) and its annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub address: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

impl NodeInfo {
    pub fn from_node(node: &Node) -> Self {
        let addresses = node.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
        Self {
            name: node.metadata.name.clone().unwrap_or_default(),
            address: addresses
                .iter()
                .find(|a| a.type_ == "InternalIP")
                .or_else(|| addresses.first())
                .map(|a| a.address.clone()),
            annotations: node.metadata.annotations.clone().unwrap_or_default(),
        }
    }
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
}

impl Snapshot {
    /// Builds the view from the objects themselves; only pods that are endpoints
    /// ([`endpoints::endpoint`]) reach the model.
    pub fn from_objects<'a>(
        namespaces: impl IntoIterator<Item = &'a Namespace>,
        pods: impl IntoIterator<Item = &'a Pod>,
        nodes: &[&'a Node],
        mesh_policies: impl IntoIterator<Item = &'a MeshPolicy>,
        mutual_auths: impl IntoIterator<Item = &'a MutualAuth>,
    ) -> Self {
        let node_addresses = endpoints::node_addresses(nodes.iter().copied());
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
        };
        for pod in pods {
            match endpoints::endpoint(pod, &node_addresses) {
                Ok(info) => snapshot.inputs.pods.push(info),
                Err(why) => {
                    if why == NotEndpoint::NoAddress {
                        snapshot.unaddressed.push(PodInfo::from_pod(pod));
                    }
                    let pod_ref = ObjectRef::new(
                        pod.metadata.namespace.clone().unwrap_or_default(),
                        pod.metadata.name.clone().unwrap_or_default(),
                    );
                    snapshot.not_endpoints.push((pod_ref, why));
                }
            }
        }
        snapshot
    }

    /// The address of a node's agent: the `meshauth.io/agent-address` annotation, else the
    /// node's InternalIP.
    pub fn node_address(&self, node: &str) -> Option<String> {
        let n = self.nodes.iter().find(|n| n.name == node)?;
        n.annotations.get(AGENT_ADDRESS_ANNOTATION).cloned().or_else(|| n.address.clone())
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
