//! From one snapshot of the cluster to what this node must do: the tables its datapath loads,
//! the local pods whose interfaces it guards, the pairs it must authenticate (and at which
//! peer agents), and which identities live where (what the handshake checks on both sides).
//!
//! Pure: no I/O, so every rule here is unit-tested.

use crate::auth_manager::{DesiredPair, Peer};
use crate::inputs::Snapshot;
use meshauth_datapath::NodeId;
use meshauth_policy::compile::{self, NumberAllocator};
use meshauth_policy::model::{ModelConfig, PolicyModel};
use meshauth_policy::tables::CompiledTables;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};

/// The latest view of which identity lives where, shared by the agent's loop (which writes it),
/// the handshake server and the explainer (which read it).
pub type SharedView = Arc<RwLock<NodeView>>;

/// Which identities are hosted where, as this agent sees the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// SPIFFE IDs of the pods on this node.
    pub local_identities: BTreeSet<String>,
    /// SPIFFE ID → addresses of the agents of the nodes hosting a pod with it.
    pub hosts: BTreeMap<String, BTreeSet<IpAddr>>,
    /// SPIFFE ID → this node's number for it (the maps' keys).
    pub numbers: BTreeMap<String, u32>,
    /// This node's own agent address (what the other agents reach it at).
    pub own_address: Option<IpAddr>,
}

impl NodeView {
    /// Whether a pod with this identity runs on this node: only then does the agent present
    /// that identity's SVID.
    pub fn is_hosted_here(&self, spiffe_id: &str) -> bool {
        self.local_identities.contains(spiffe_id)
    }

    /// Whether a pod with this identity runs on the node whose agent has address `ip`.
    /// Loopback is this node only while no Node object gives it an address: it proves its own
    /// pods over loopback then. With an address, loopback is refused: a port-forward into a
    /// hostNetwork pod also arrives from it.
    pub fn is_hosted_at(&self, spiffe_id: &str, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.is_unaddressed_loopback(ip) && self.is_hosted_here(spiffe_id)) || self.hosts.get(spiffe_id).is_some_and(|h| h.contains(&ip))
    }

    fn is_unaddressed_loopback(&self, ip: IpAddr) -> bool {
        ip.is_loopback() && self.own_address.is_none()
    }

    /// Whether `ip` is the agent address of a node hosting some identity (loopback: this node,
    /// when it hosts any and has no address).
    pub fn is_node(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        (self.is_unaddressed_loopback(ip) && !self.local_identities.is_empty()) || self.hosts.values().any(|nodes| nodes.contains(&ip))
    }

    /// How the datapath's maps name the node whose agent has address `ip`: this node's own
    /// address is this node. `None` for what they cannot name (IPv6: the datapath is IPv4).
    pub fn node_id(&self, ip: IpAddr) -> Option<NodeId> {
        node_id(ip.to_canonical(), self.own_address)
    }
}

fn node_id(ip: IpAddr, own: Option<IpAddr>) -> Option<NodeId> {
    match ip {
        ip if Some(ip) == own || (ip.is_loopback() && own.is_none()) => Some(NodeId::This),
        IpAddr::V4(v4) if !v4.is_unspecified() => Some(NodeId::At(v4)),
        _ => None,
    }
}

/// A pod of this node with an address: the datapath guards its interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub pod: String,
    pub ip: Ipv4Addr,
}

/// Everything this node must do for one snapshot.
#[derive(Debug, Clone)]
pub struct NodePlan {
    pub tables: CompiledTables,
    pub local_pods: Vec<LocalPod>,
    pub desired: Vec<DesiredPair>,
    pub view: NodeView,
    /// Spec problems, for logs.
    pub problems: Vec<String>,
}

/// Plans the node `node_name`. `peer_port` is where other agents listen.
pub fn plan(snapshot: &Snapshot, config: &ModelConfig, node_name: &str, peer_port: u16, allocator: &mut NumberAllocator) -> NodePlan {
    let model = PolicyModel::new(config.clone(), snapshot.inputs.clone());
    let mut tables = compile::compile(&model, allocator);
    let numbers: BTreeMap<&str, u32> = tables.spiffe_ids.iter().map(|(n, id)| (id.as_str(), *n)).collect();

    // Each node's agent address, once per node rather than once per pod.
    let node_addresses: BTreeMap<&str, IpAddr> = snapshot
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.as_str(), snapshot.node_address(&n.name)?.parse::<IpAddr>().ok()?.to_canonical())))
        .collect();
    let mut view = NodeView {
        numbers: numbers.iter().map(|(id, n)| ((*id).to_owned(), *n)).collect(),
        own_address: node_addresses.get(node_name).copied(),
        ..NodeView::default()
    };
    for pod in model.pods() {
        let Some(node) = pod.node.as_deref() else { continue };
        let id = model.spiffe_id(pod).to_string();
        if node == node_name {
            view.local_identities.insert(id.clone());
        }
        if let Some(addr) = node_addresses.get(node) {
            view.hosts.entry(id).or_default().insert(*addr);
        }
    }
    for e in &mut tables.endpoints {
        // Whose handshakes prove the pod: its node's agent. (This node's own pods are named by
        // their veths, whatever this says.)
        e.node_address = e.node.as_deref().and_then(|n| match node_addresses.get(n) {
            Some(IpAddr::V4(v4)) => Some(*v4),
            _ => None,
        });
    }

    let local_pods = snapshot
        .inputs
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(node_name))
        .filter_map(|p| Some(LocalPod { pod: p.object_ref().to_string(), ip: p.ip? }))
        .collect();

    let mut desired: BTreeMap<(u32, u32), DesiredPair> = BTreeMap::new();
    for pair in compile::auth_identity_pairs(&model, |p| p.node.as_deref() == Some(node_name)) {
        let (Some(&dst_number), Some(&src_number)) = (numbers.get(pair.dst_spiffe_id.as_str()), numbers.get(pair.src_spiffe_id.as_str()))
        else {
            continue;
        };
        // Every node hosting the source proves it on its own: its pods' connections carry
        // that node's key.
        let mut peers: Vec<Peer> = view
            .hosts
            .get(&pair.src_spiffe_id)
            .into_iter()
            .flatten()
            .filter_map(|ip| Some(Peer { node: view.node_id(*ip)?, addr: SocketAddr::new(*ip, peer_port) }))
            .collect();
        // This node proves its own pods even when no Node object gives it an address (a
        // manifests-only agent): its proof is named by its pods' veths, not by an address, and
        // an entry a previous agent left for it is adopted rather than dropped.
        if view.local_identities.contains(&pair.src_spiffe_id) && !peers.iter().any(|p| p.node == NodeId::This) {
            let own = view.own_address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
            peers.push(Peer { node: NodeId::This, addr: SocketAddr::new(own, peer_port) });
        }
        desired.entry((dst_number, src_number)).or_insert(DesiredPair {
            dst_number,
            src_number,
            dst_id: pair.dst_spiffe_id,
            src_id: pair.src_spiffe_id,
            peers,
        });
    }

    let mut problems: Vec<String> =
        model.problems().iter().map(|p| format!("{:?} {}: {}: {}", p.kind, p.object, p.error.field, p.error.reason)).collect();
    // A node that reports addresses but has none of its own: its pods' proofs count nowhere.
    problems.extend(snapshot.nodes.iter().filter(|n| !n.addresses.is_empty() && !node_addresses.contains_key(n.name.as_str())).map(|n| {
        format!(
            "Node {}: status.addresses: no address of its own (unspecified, or another node's too): its pods are proven by no node",
            n.name
        )
    }));
    NodePlan { tables, local_pods, desired: desired.into_values().collect(), view, problems }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn examples() -> Snapshot {
        crate::inputs::snapshot_from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")).expect("examples")
    }

    #[test]
    fn node_2_authenticates_payment_from_order_at_node_1() {
        let plan = plan(&examples(), &ModelConfig::default(), "node-2", 4250, &mut NumberAllocator::default());
        let pods: Vec<_> = plan.local_pods.iter().map(|p| p.pod.as_str()).collect();
        assert_eq!(pods, ["shop/payment-0", "tools/debug"]);
        let pairs: Vec<_> = plan.desired.iter().map(|d| (d.dst_id.as_str(), d.src_id.as_str())).collect();
        assert!(pairs.contains(&("spiffe://cluster.local/ns/shop/sa/payment", "spiffe://cluster.local/ns/shop/sa/order")), "{pairs:?}");
        let order = plan.desired.iter().find(|d| d.src_id.ends_with("/sa/order")).expect("pair");
        let node_1 = Ipv4Addr::new(192, 168, 77, 1);
        assert_eq!(order.peers, vec![Peer { node: NodeId::At(node_1), addr: SocketAddr::new(node_1.into(), 4250) }]);
        // The datapath learns which node proves each pod: node-1's for its pods, this node's
        // own for the local ones.
        let node_of = |pod: &str| plan.tables.endpoints.iter().find(|e| e.pod == pod).map(|e| e.node_address);
        assert_eq!(node_of("shop/order-0"), Some(Some(node_1)));
        assert_eq!(node_of("shop/payment-0"), Some(Some(Ipv4Addr::new(192, 168, 77, 2))));
        // Payment denies everything but order: no other pair for it.
        assert!(plan.desired.iter().filter(|d| d.dst_id.ends_with("/sa/payment")).all(|d| d.src_id.ends_with("/sa/order")));
        // tools/debug is Disabled: nothing to authenticate for it.
        assert!(plan.desired.iter().all(|d| !d.dst_id.contains("/ns/tools/")));
    }

    #[test]
    fn without_node_addresses_this_node_still_proves_its_own_pods() {
        let mut snapshot = examples();
        snapshot.nodes.clear();
        let plan = plan(&snapshot, &ModelConfig::default(), "node-1", 4250, &mut NumberAllocator::default());
        let local = plan
            .desired
            .iter()
            .find(|d| d.dst_id.ends_with("/sa/order") && d.src_id.ends_with("/sa/frontend"))
            .expect("order <- frontend, both on node-1");
        assert_eq!(local.peers, vec![Peer { node: NodeId::This, addr: SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 4250) }]);
    }

    #[test]
    fn the_view_says_which_identity_lives_where() {
        let plan = plan(&examples(), &ModelConfig::default(), "node-1", 4250, &mut NumberAllocator::default());
        let order = "spiffe://cluster.local/ns/shop/sa/order";
        assert!(plan.view.is_hosted_here(order));
        assert!(!plan.view.is_hosted_here("spiffe://cluster.local/ns/shop/sa/payment"));
        assert!(plan.view.is_hosted_at(order, "192.168.77.1".parse().expect("ip")));
        assert!(plan.view.is_hosted_at(order, "::ffff:192.168.77.1".parse().expect("ip")), "mapped IPv4");
        assert!(!plan.view.is_hosted_at(order, "192.168.77.2".parse().expect("ip")));
        // With an address of its own, loopback is not this node (a port-forward into a
        // hostNetwork pod arrives from it); without one, it is, for this node's identities only.
        let loopback: IpAddr = "127.0.0.1".parse().expect("ip");
        assert!(!plan.view.is_hosted_at(order, loopback) && !plan.view.is_node(loopback));
        assert!(plan.view.is_node("192.168.77.2".parse().expect("ip")));
        let unaddressed = NodeView { own_address: None, ..plan.view.clone() };
        assert!(unaddressed.is_hosted_at(order, loopback) && unaddressed.is_node(loopback));
        assert!(!unaddressed.is_hosted_at("spiffe://cluster.local/ns/shop/sa/payment", loopback));
        assert_eq!(unaddressed.node_id(loopback), Some(NodeId::This));
        assert!(!plan.view.is_node("10.244.1.5".parse().expect("ip")), "a pod is no node");
        assert_eq!(plan.view.node_id("192.168.77.1".parse().expect("ip")), Some(NodeId::This), "its own address");
        assert_eq!(plan.view.node_id("192.168.77.2".parse().expect("ip")), Some(NodeId::At(Ipv4Addr::new(192, 168, 77, 2))));
        assert_eq!(plan.view.node_id("fd00::2".parse().expect("ip")), None, "the maps are IPv4");
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    }
}
