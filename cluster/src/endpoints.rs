//! Which pods are endpoints: the pods the datapath guards, authenticates and names by their
//! IP. A pod that shares its node's network (hostNetwork, or any pod whose IP is a node's
//! address) is the node, not a pod: treating it as one would attach the datapath to the node's
//! uplink and hand SVIDs to whatever runs there. A finished pod's IP may already belong to
//! another pod; a mirror pod's status is written by its node alone, so a compromised node could
//! claim any IP with one.

use k8s_openapi::api::core::v1::{Node, Pod};
use meshauth_policy::model::PodInfo;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

/// The annotation the kubelet puts on the API copy of a static pod.
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod is not an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NotEndpoint {
    /// `spec.hostNetwork: true`: the pod is the node.
    HostNetwork,
    /// Its IP is an address of a node.
    NodeAddress,
    /// `Succeeded` or `Failed`: it no longer sends or receives, and its IP may be reused.
    Finished,
    /// No IPv4 address yet (or at all).
    NoAddress,
    /// A mirror pod (the API copy of a static pod).
    Mirror,
}

impl fmt::Display for NotEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotEndpoint::HostNetwork => "uses the host network",
            NotEndpoint::NodeAddress => "its IP is a node's address",
            NotEndpoint::Finished => "has finished",
            NotEndpoint::NoAddress => "has no IPv4 address",
            NotEndpoint::Mirror => "is a mirror pod",
        })
    }
}

/// Every address of every node (`status.addresses` that parse as IPs).
pub fn node_addresses<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<IpAddr> {
    nodes
        .into_iter()
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

/// The pod as the model sees it, or why it is not an endpoint. Pending pods that already have
/// an address are endpoints: their sandbox is up and their containers may already send.
pub fn endpoint(pod: &Pod, node_addresses: &BTreeSet<IpAddr>) -> Result<PodInfo, NotEndpoint> {
    if pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION)) {
        return Err(NotEndpoint::Mirror);
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return Err(NotEndpoint::HostNetwork);
    }
    if matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return Err(NotEndpoint::Finished);
    }
    let info = PodInfo::from_pod(pod);
    let Some(ip) = info.ip else { return Err(NotEndpoint::NoAddress) };
    if node_addresses.contains(&IpAddr::V4(ip)) {
        return Err(NotEndpoint::NodeAddress);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("pod yaml")
    }

    fn node(address: &str) -> Node {
        serde_yaml::from_str(&format!(
            "metadata: {{name: node-1}}\nstatus: {{addresses: [{{type: InternalIP, address: '{address}'}}, {{type: Hostname, address: node-1}}]}}"
        ))
        .expect("node yaml")
    }

    #[test]
    fn a_pod_network_pod_is_an_endpoint() {
        let addrs = node_addresses(&[node("192.168.1.10")]);
        let p = pod("metadata: {name: web, namespace: shop}\nspec: {containers: [], nodeName: node-1}\nstatus: {phase: Running, podIP: 10.244.1.5}");
        let info = endpoint(&p, &addrs).expect("endpoint");
        assert_eq!(info.ip, Some("10.244.1.5".parse().expect("ip")));
    }

    #[test]
    fn a_host_network_pod_is_not_an_endpoint() {
        let addrs = node_addresses(&[node("192.168.1.10")]);
        let p = pod("metadata: {name: kube-proxy-x, namespace: kube-system}\nspec: {hostNetwork: true, containers: [], nodeName: node-1}\nstatus: {phase: Running, podIP: 192.168.1.10}");
        assert_eq!(endpoint(&p, &addrs), Err(NotEndpoint::HostNetwork));
    }

    #[test]
    fn a_pod_using_a_node_address_is_not_an_endpoint() {
        let addrs = node_addresses(&[node("192.168.1.10")]);
        // No hostNetwork flag, yet the node's own address (a CNI that hands pods the node IP).
        let p = pod("metadata: {name: odd, namespace: shop}\nspec: {containers: [], nodeName: node-1}\nstatus: {phase: Running, podIP: 192.168.1.10}");
        assert_eq!(endpoint(&p, &addrs), Err(NotEndpoint::NodeAddress));
    }

    #[test]
    fn finished_unaddressed_and_mirror_pods_are_not_endpoints() {
        let addrs = BTreeSet::new();
        let done = pod("metadata: {name: job, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Succeeded, podIP: 10.244.1.6}");
        assert_eq!(endpoint(&done, &addrs), Err(NotEndpoint::Finished));
        let failed = pod("metadata: {name: job, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Failed, podIP: 10.244.1.6}");
        assert_eq!(endpoint(&failed, &addrs), Err(NotEndpoint::Finished));
        let pending = pod("metadata: {name: new, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Pending}");
        assert_eq!(endpoint(&pending, &addrs), Err(NotEndpoint::NoAddress));
        let v6 = pod("metadata: {name: v6, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Running, podIP: 'fd00::5'}");
        assert_eq!(endpoint(&v6, &addrs), Err(NotEndpoint::NoAddress));
        let mirror = pod("metadata: {name: etcd-node-1, namespace: kube-system, annotations: {kubernetes.io/config.mirror: abc}}\nspec: {containers: []}\nstatus: {phase: Running, podIP: 10.244.1.7}");
        assert_eq!(endpoint(&mirror, &addrs), Err(NotEndpoint::Mirror));
        let starting = pod("metadata: {name: new, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Pending, podIP: 10.244.1.8}");
        assert!(endpoint(&starting, &addrs).is_ok(), "a pending pod with an address can already send");
    }
}
