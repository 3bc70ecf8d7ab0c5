//! Which pods are endpoints: the pods the datapath guards, authenticates and names by their
//! IP. A pod that shares its node's network (hostNetwork, or any pod whose IP is a node's
//! address) is the node, not a pod: treating it as one would attach the datapath to the node's
//! uplink and hand SVIDs to whatever runs there. A finished pod's IP may already belong to
//! another pod; a mirror pod's status is written by its node alone, so a compromised node could
//! claim any IP with one.
//!
//! A node writes the status of every pod bound to it, so a compromised node can make one of its
//! pods claim another node's pod's IP. Where nodes carry `spec.podCIDRs` (node IPAM) an IP
//! outside the pod's own node's CIDRs is refused; an IP that two pods still claim names
//! neither of them ([`NotEndpoint::SharedAddress`]), since nothing tells which one is lying.
//! A pod without a service account has no SPIFFE ID to be named by.

use k8s_openapi::api::core::v1::{Node, Pod};
use meshauth_policy::model::{ObjectRef, PodInfo};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

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
    /// No `spec.serviceAccountName` (or one that cannot be a SPIFFE ID segment): no identity.
    NoServiceAccount,
    /// Its IP lies outside every `spec.podCIDRs` of its node (or its node has none while
    /// other nodes do).
    OutsideNodePodCidrs,
    /// Another pod claims the same IP: the address names no identity and is isolated.
    SharedAddress,
}

impl fmt::Display for NotEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NotEndpoint::HostNetwork => "uses the host network",
            NotEndpoint::NodeAddress => "uses a node's address as its IP",
            NotEndpoint::Finished => "has finished",
            NotEndpoint::NoAddress => "has no IPv4 address",
            NotEndpoint::Mirror => "is a mirror pod",
            NotEndpoint::NoServiceAccount => "has no service account, so no SPIFFE ID",
            NotEndpoint::OutsideNodePodCidrs => "has an IP outside its node's pod CIDRs",
            NotEndpoint::SharedAddress => "shares its IP with another pod (the address is isolated and names no identity)",
        })
    }
}

/// How strictly the cluster is read: which pods are endpoints, which node annotations count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointRules {
    /// Refuse pod IPs outside their node's `spec.podCIDRs`. On by default (node IPAM, the
    /// Kubernetes default); turn it off for IPAMs that do not hand out the node CIDRs, such as
    /// Calico's or the AWS VPC CNI. It only acts when some node carries pod CIDRs.
    pub check_node_pod_cidrs: bool,
    /// Take every `meshauth.io/agent-address` annotation as it is; off by default, when an
    /// annotation must name one of its node's own addresses ([`crate::Snapshot::node_address`]).
    pub trust_agent_address_annotations: bool,
}

impl Default for EndpointRules {
    fn default() -> Self {
        Self { check_node_pod_cidrs: true, trust_agent_address_annotations: false }
    }
}

/// An IPv4 network `address/prefix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ipv4Cidr {
    network: u32,
    mask: u32,
}

impl Ipv4Cidr {
    /// `None` for IPv6 and anything that does not parse (the API server validates podCIDRs).
    fn parse(s: &str) -> Option<Self> {
        let (addr, len) = s.trim().split_once('/')?;
        let addr: Ipv4Addr = addr.parse().ok()?;
        let len: u32 = len.parse().ok().filter(|l| *l <= 32)?;
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        Some(Self { network: u32::from(addr) & mask, mask })
    }

    fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask == self.network
    }
}

/// What the endpoint rules need to know about the nodes.
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// Every address of every node.
    pub addresses: BTreeSet<IpAddr>,
    /// Each node's IPv4 pod CIDRs, for the nodes that carry any.
    pod_cidrs: BTreeMap<String, Vec<Ipv4Cidr>>,
}

impl NodeFacts {
    pub fn new<'a>(nodes: impl IntoIterator<Item = &'a Node> + Clone) -> Self {
        let pod_cidrs = nodes
            .clone()
            .into_iter()
            .filter_map(|n| {
                let spec = n.spec.as_ref()?;
                let cidrs: Vec<Ipv4Cidr> =
                    spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.as_ref()).filter_map(|c| Ipv4Cidr::parse(c)).collect();
                (!cidrs.is_empty()).then(|| (n.metadata.name.clone().unwrap_or_default(), cidrs))
            })
            .collect();
        Self { addresses: node_addresses(nodes), pod_cidrs }
    }

    /// Whether `ip` may be a pod IP of `node`. With node IPAM in use (some node carries pod
    /// CIDRs) a pod on a node without any, or on a node nobody knows, cannot be vouched for.
    fn in_pod_cidrs(&self, node: Option<&str>, ip: Ipv4Addr) -> bool {
        if self.pod_cidrs.is_empty() {
            return true;
        }
        node.and_then(|n| self.pod_cidrs.get(n)).is_some_and(|cidrs| cidrs.iter().any(|c| c.contains(ip)))
    }
}

/// Every address of every node (`status.addresses` that parse as IPs).
pub fn node_addresses<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> BTreeSet<IpAddr> {
    nodes.into_iter().filter_map(|n| n.status.as_ref()?.addresses.as_ref()).flatten().filter_map(|a| a.address.parse().ok()).collect()
}

/// A service account name usable as a SPIFFE ID path segment: a DNS subdomain, as the API
/// server requires (manifests are not validated by anyone else).
fn usable_service_account(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name != "."
        && name != ".."
}

/// What the rules make of one pod: an endpoint or why not, and the IP it claims as its own
/// whether or not it is an endpoint (what two pods must not both hold). Pods that are the
/// node, finished pods and IPs their node cannot hand out claim nothing, so they cannot take
/// an address away from the pod that holds it; mirror pods and pods without a service account
/// do claim theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub endpoint: Result<PodInfo, NotEndpoint>,
    pub claim: Option<Ipv4Addr>,
}

/// [`Classified`] for one pod, shared addresses aside (they need every pod: [`classify_all`]).
/// Pending pods that already have an address are endpoints: their sandbox is up and their
/// containers may already send.
pub fn classify(pod: &Pod, nodes: &NodeFacts, rules: &EndpointRules) -> Classified {
    let refused = |why| Classified { endpoint: Err(why), claim: None };
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return refused(NotEndpoint::HostNetwork);
    }
    if matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
        return refused(NotEndpoint::Finished);
    }
    let info = PodInfo::from_pod(pod);
    let address = match info.ip {
        None => Err(NotEndpoint::NoAddress),
        Some(ip) if nodes.addresses.contains(&IpAddr::V4(ip)) => Err(NotEndpoint::NodeAddress),
        Some(ip) if rules.check_node_pod_cidrs && !nodes.in_pod_cidrs(info.node.as_deref(), ip) => Err(NotEndpoint::OutsideNodePodCidrs),
        Some(ip) => Ok(ip),
    };
    let claim = address.ok();
    let mirror = pod.metadata.annotations.as_ref().is_some_and(|a| a.contains_key(MIRROR_POD_ANNOTATION));
    let service_account = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref());
    // Checked before the address, so such a pod never waits among the unaddressed: an agent
    // laying the CNI's address over it would give it an identity after all.
    let endpoint = if mirror {
        Err(NotEndpoint::Mirror)
    } else if !service_account.is_some_and(usable_service_account) {
        Err(NotEndpoint::NoServiceAccount)
    } else {
        address.map(|_| info)
    };
    Classified { endpoint, claim }
}

/// An address more than one pod claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedAddress {
    pub ip: Ipv4Addr,
    /// `namespace/name` of every claimant, sorted.
    pub pods: Vec<ObjectRef>,
}

/// Each pod with what the rules made of it.
pub type PodVerdicts<'a> = Vec<(&'a Pod, Result<PodInfo, NotEndpoint>)>;

/// Classifies every pod; endpoints whose address another pod claims too become
/// [`NotEndpoint::SharedAddress`]. Also returns every shared address.
pub fn classify_all<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    nodes: &NodeFacts,
    rules: &EndpointRules,
) -> (PodVerdicts<'a>, Vec<SharedAddress>) {
    let classified: Vec<(&Pod, Classified)> = pods.into_iter().map(|p| (p, classify(p, nodes, rules))).collect();
    let mut claimants: BTreeMap<Ipv4Addr, Vec<ObjectRef>> = BTreeMap::new();
    for (pod, c) in &classified {
        if let Some(ip) = c.claim {
            claimants
                .entry(ip)
                .or_default()
                .push(ObjectRef::new(pod.metadata.namespace.clone().unwrap_or_default(), pod.metadata.name.clone().unwrap_or_default()));
        }
    }
    claimants.retain(|_, pods| pods.len() > 1);
    let out = classified
        .into_iter()
        .map(|(pod, c)| {
            let endpoint = match c.endpoint {
                Ok(info) if info.ip.is_some_and(|ip| claimants.contains_key(&ip)) => Err(NotEndpoint::SharedAddress),
                other => other,
            };
            (pod, endpoint)
        })
        .collect();
    let shared = claimants
        .into_iter()
        .map(|(ip, mut pods)| {
            pods.sort();
            SharedAddress { ip, pods }
        })
        .collect();
    (out, shared)
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

    fn node_with_cidr(name: &str, cidr: &str) -> Node {
        serde_yaml::from_str(&format!("metadata: {{name: {name}}}\nspec: {{podCIDR: '{cidr}', podCIDRs: ['{cidr}']}}")).expect("node yaml")
    }

    fn endpoint(p: &Pod, nodes: &NodeFacts) -> Result<PodInfo, NotEndpoint> {
        classify(p, nodes, &EndpointRules::default()).endpoint
    }

    fn facts(nodes: &[Node]) -> NodeFacts {
        NodeFacts::new(nodes)
    }

    #[test]
    fn a_pod_network_pod_is_an_endpoint() {
        let nodes = facts(&[node("192.168.1.10")]);
        let p = pod(
            "metadata: {name: web, namespace: shop}\nspec: {containers: [], nodeName: node-1, serviceAccountName: web}\nstatus: {phase: Running, podIP: 10.244.1.5}",
        );
        let info = endpoint(&p, &nodes).expect("endpoint");
        assert_eq!(info.ip, Some("10.244.1.5".parse().expect("ip")));
    }

    #[test]
    fn a_host_network_pod_is_not_an_endpoint() {
        let nodes = facts(&[node("192.168.1.10")]);
        let p = pod(
            "metadata: {name: kube-proxy-x, namespace: kube-system}\nspec: {hostNetwork: true, containers: [], nodeName: node-1, serviceAccountName: kube-proxy}\nstatus: {phase: Running, podIP: 192.168.1.10}",
        );
        assert_eq!(endpoint(&p, &nodes), Err(NotEndpoint::HostNetwork));
    }

    #[test]
    fn a_pod_using_a_node_address_is_not_an_endpoint() {
        let nodes = facts(&[node("192.168.1.10")]);
        // No hostNetwork flag, yet the node's own address (a CNI that hands pods the node IP).
        let p = pod(
            "metadata: {name: odd, namespace: shop}\nspec: {containers: [], nodeName: node-1, serviceAccountName: odd}\nstatus: {phase: Running, podIP: 192.168.1.10}",
        );
        assert_eq!(endpoint(&p, &nodes), Err(NotEndpoint::NodeAddress));
    }

    #[test]
    fn finished_unaddressed_and_mirror_pods_are_not_endpoints() {
        let nodes = NodeFacts::default();
        let done = pod(
            "metadata: {name: job, namespace: shop}\nspec: {containers: [], serviceAccountName: job}\nstatus: {phase: Succeeded, podIP: 10.244.1.6}",
        );
        assert_eq!(endpoint(&done, &nodes), Err(NotEndpoint::Finished));
        let failed = pod(
            "metadata: {name: job, namespace: shop}\nspec: {containers: [], serviceAccountName: job}\nstatus: {phase: Failed, podIP: 10.244.1.6}",
        );
        assert_eq!(endpoint(&failed, &nodes), Err(NotEndpoint::Finished));
        let pending =
            pod("metadata: {name: new, namespace: shop}\nspec: {containers: [], serviceAccountName: new}\nstatus: {phase: Pending}");
        assert_eq!(endpoint(&pending, &nodes), Err(NotEndpoint::NoAddress));
        let v6 = pod(
            "metadata: {name: v6, namespace: shop}\nspec: {containers: [], serviceAccountName: v6}\nstatus: {phase: Running, podIP: 'fd00::5'}",
        );
        assert_eq!(endpoint(&v6, &nodes), Err(NotEndpoint::NoAddress));
        let mirror = pod(
            "metadata: {name: etcd-node-1, namespace: kube-system, annotations: {kubernetes.io/config.mirror: abc}}\nspec: {containers: []}\nstatus: {phase: Running, podIP: 10.244.1.7}",
        );
        assert_eq!(endpoint(&mirror, &nodes), Err(NotEndpoint::Mirror));
        let starting = pod(
            "metadata: {name: new, namespace: shop}\nspec: {containers: [], serviceAccountName: new}\nstatus: {phase: Pending, podIP: 10.244.1.8}",
        );
        assert!(endpoint(&starting, &nodes).is_ok(), "a pending pod with an address can already send");
    }

    #[test]
    fn a_pod_without_a_service_account_gets_no_spiffe_id() {
        let nodes = NodeFacts::default();
        for spec in [
            "{containers: []}",
            "{containers: [], serviceAccountName: ''}",
            "{containers: [], serviceAccountName: 'a/b'}",
            "{containers: [], serviceAccountName: '..'}",
        ] {
            let p = pod(&format!("metadata: {{name: anon, namespace: shop}}\nspec: {spec}\nstatus: {{phase: Running, podIP: 10.244.1.9}}"));
            assert_eq!(endpoint(&p, &nodes), Err(NotEndpoint::NoServiceAccount), "{spec}");
            // It still holds its address: another pod cannot take it by claiming it too.
            assert_eq!(classify(&p, &nodes, &EndpointRules::default()).claim, Some(Ipv4Addr::new(10, 244, 1, 9)));
        }
        // Not waiting among the unaddressed either, where a CNI address would be laid over it.
        let pending = pod("metadata: {name: anon, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Pending}");
        assert_eq!(endpoint(&pending, &nodes), Err(NotEndpoint::NoServiceAccount));
    }

    #[test]
    fn a_pod_ip_outside_its_nodes_pod_cidr_is_not_an_endpoint() {
        let nodes = facts(&[node_with_cidr("node-1", "10.244.1.0/24"), node_with_cidr("node-2", "10.244.2.0/24")]);
        let on = |node: &str, ip: &str| {
            pod(&format!(
                "metadata: {{name: p, namespace: shop}}\nspec: {{containers: [], nodeName: {node}, serviceAccountName: p}}\nstatus: {{phase: Running, podIP: {ip}}}"
            ))
        };
        assert!(endpoint(&on("node-1", "10.244.1.5"), &nodes).is_ok());
        // node-2 (compromised) writes node-1's pod's address into its own pod's status.
        let forged = on("node-2", "10.244.1.5");
        assert_eq!(endpoint(&forged, &nodes), Err(NotEndpoint::OutsideNodePodCidrs));
        assert_eq!(classify(&forged, &nodes, &EndpointRules::default()).claim, None, "the forgery takes nothing from the owner");
        // With node IPAM in use, a node without CIDRs or one nobody knows vouches for nothing.
        assert_eq!(endpoint(&on("node-9", "10.244.9.5"), &nodes), Err(NotEndpoint::OutsideNodePodCidrs));
        // IPAMs that do not use node CIDRs (Calico's, AWS VPC CNI) turn the check off.
        let off = EndpointRules { check_node_pod_cidrs: false, ..EndpointRules::default() };
        assert!(classify(&forged, &nodes, &off).endpoint.is_ok());
        // Nodes without CIDRs: nothing to check against.
        assert!(endpoint(&on("node-1", "10.1.2.3"), &facts(&[node("192.168.1.10")])).is_ok());
    }

    #[test]
    fn two_pods_claiming_one_ip_are_neither_an_endpoint() {
        let nodes = NodeFacts::default();
        let owner = pod(
            "metadata: {name: payment-0, namespace: shop}\nspec: {containers: [], nodeName: node-1, serviceAccountName: payment}\nstatus: {phase: Running, podIP: 10.244.1.5}",
        );
        // A compromised node-2 patches its mirror pod's status with the same address.
        let mirror = pod(
            "metadata: {name: static-node-2, namespace: kube-system, annotations: {kubernetes.io/config.mirror: x}}\nspec: {containers: [], nodeName: node-2}\nstatus: {phase: Running, podIP: 10.244.1.5}",
        );
        // ... or a pod of its own.
        let thief = pod(
            "metadata: {name: thief, namespace: evil}\nspec: {containers: [], nodeName: node-2, serviceAccountName: payment}\nstatus: {phase: Running, podIP: 10.244.1.6}",
        );
        let twin = pod(
            "metadata: {name: twin, namespace: shop}\nspec: {containers: [], nodeName: node-2, serviceAccountName: order}\nstatus: {phase: Running, podIP: 10.244.1.6}",
        );
        let bystander = pod(
            "metadata: {name: web, namespace: shop}\nspec: {containers: [], nodeName: node-1, serviceAccountName: web}\nstatus: {phase: Running, podIP: 10.244.1.7}",
        );
        let (out, shared) = classify_all([&owner, &mirror, &thief, &twin, &bystander], &nodes, &EndpointRules::default());
        let verdicts: Vec<_> = out.iter().map(|(p, r)| (p.metadata.name.clone().unwrap_or_default(), r.as_ref().err().copied())).collect();
        assert_eq!(
            verdicts,
            vec![
                ("payment-0".into(), Some(NotEndpoint::SharedAddress)),
                ("static-node-2".into(), Some(NotEndpoint::Mirror)),
                ("thief".into(), Some(NotEndpoint::SharedAddress)),
                ("twin".into(), Some(NotEndpoint::SharedAddress)),
                ("web".into(), None),
            ]
        );
        assert_eq!(
            shared,
            vec![
                SharedAddress {
                    ip: Ipv4Addr::new(10, 244, 1, 5),
                    pods: vec![ObjectRef::new("kube-system", "static-node-2"), ObjectRef::new("shop", "payment-0")],
                },
                SharedAddress {
                    ip: Ipv4Addr::new(10, 244, 1, 6),
                    pods: vec![ObjectRef::new("evil", "thief"), ObjectRef::new("shop", "twin")]
                },
            ]
        );
        // A finished pod's old address is free for the next pod.
        let done = pod(
            "metadata: {name: job, namespace: shop}\nspec: {containers: [], serviceAccountName: job}\nstatus: {phase: Succeeded, podIP: 10.244.1.7}",
        );
        let (out, shared) = classify_all([&bystander, &done], &nodes, &EndpointRules::default());
        assert!(out[0].1.is_ok() && shared.is_empty());
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let c = Ipv4Cidr::parse("10.244.1.0/24").expect("cidr");
        assert!(c.contains(Ipv4Addr::new(10, 244, 1, 255)) && !c.contains(Ipv4Addr::new(10, 244, 2, 0)));
        assert!(Ipv4Cidr::parse("0.0.0.0/0").expect("cidr").contains(Ipv4Addr::new(1, 2, 3, 4)));
        assert!(Ipv4Cidr::parse("10.0.0.1/32").expect("cidr").contains(Ipv4Addr::new(10, 0, 0, 1)));
        for bad in ["fd00::/64", "10.0.0.0/33", "10.0.0.0", "x/8"] {
            assert_eq!(Ipv4Cidr::parse(bad), None, "{bad}");
        }
    }
}
