//! From one snapshot of the cluster to what this node must do: the tables its datapath loads,
//! the local pods whose interfaces it guards, the pairs it must authenticate (and at which
//! peer agents), and which identities live where (what the handshake checks on both sides).
//!
//! Pure: no I/O, so every rule here is unit-tested.

use crate::auth_manager::DesiredPair;
use crate::inputs::Snapshot;
use meshauth_policy::compile::{self, NumberAllocator};
use meshauth_policy::model::{ModelConfig, PolicyModel};
use meshauth_policy::tables::CompiledTables;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Which identities are hosted where, as this agent sees the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    /// SPIFFE IDs of the pods on this node.
    pub local_identities: BTreeSet<String>,
    /// SPIFFE ID → addresses of the agents of the nodes hosting a pod with it.
    pub hosts: BTreeMap<String, BTreeSet<IpAddr>>,
    /// SPIFFE ID → this node's number for it (the maps' keys).
    pub numbers: BTreeMap<String, u32>,
}

impl NodeView {
    /// Whether a pod with this identity runs on this node: only then does the agent present
    /// that identity's SVID.
    pub fn is_hosted_here(&self, spiffe_id: &str) -> bool {
        self.local_identities.contains(spiffe_id)
    }

    /// Whether a pod with this identity runs on the node whose agent has address `ip`.
    pub fn is_hosted_at(&self, spiffe_id: &str, ip: IpAddr) -> bool {
        self.hosts.get(spiffe_id).is_some_and(|h| h.contains(&canonical(ip)))
    }
}

/// IPv4-mapped IPv6 peers (dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
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
    let tables = compile::compile(&model, allocator);
    let numbers: BTreeMap<&str, u32> = tables.spiffe_ids.iter().map(|(n, id)| (id.as_str(), *n)).collect();

    let mut view = NodeView { numbers: numbers.iter().map(|(id, n)| ((*id).to_owned(), *n)).collect(), ..NodeView::default() };
    for pod in model.pods() {
        let Some(node) = pod.node.as_deref() else { continue };
        let id = model.spiffe_id(pod).to_string();
        if node == node_name {
            view.local_identities.insert(id.clone());
        }
        if let Some(addr) = snapshot.node_address(node).and_then(|a| a.parse::<IpAddr>().ok()) {
            view.hosts.entry(id).or_default().insert(canonical(addr));
        }
    }

    let local_pods = snapshot
        .inputs
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(node_name))
        .filter_map(|p| {
            Some(LocalPod { pod: p.object_ref().to_string(), ip: p.ip? })
        })
        .collect();

    let mut desired: BTreeMap<(u32, u32), DesiredPair> = BTreeMap::new();
    for pair in compile::auth_identity_pairs(&model, |p| p.node.as_deref() == Some(node_name)) {
        let (Some(&dst_number), Some(&src_number)) =
            (numbers.get(pair.dst_spiffe_id.as_str()), numbers.get(pair.src_spiffe_id.as_str()))
        else {
            continue;
        };
        let peers = view
            .hosts
            .get(&pair.src_spiffe_id)
            .into_iter()
            .flatten()
            .map(|ip| SocketAddr::new(*ip, peer_port))
            .collect();
        desired.entry((dst_number, src_number)).or_insert(DesiredPair {
            dst_number,
            src_number,
            dst_id: pair.dst_spiffe_id,
            src_id: pair.src_spiffe_id,
            peers,
        });
    }

    let problems = model
        .problems()
        .iter()
        .map(|p| format!("{:?} {}: {}: {}", p.kind, p.object, p.error.field, p.error.reason))
        .collect();
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
        assert!(
            pairs.contains(&("spiffe://cluster.local/ns/shop/sa/payment", "spiffe://cluster.local/ns/shop/sa/order")),
            "{pairs:?}"
        );
        let order = plan.desired.iter().find(|d| d.src_id.ends_with("/sa/order")).expect("pair");
        assert_eq!(order.peers, vec!["192.168.77.1:4250".parse::<SocketAddr>().expect("addr")]);
        // Payment denies everything but order: no other pair for it.
        assert!(plan.desired.iter().filter(|d| d.dst_id.ends_with("/sa/payment")).all(|d| d.src_id.ends_with("/sa/order")));
        // tools/debug is Disabled: nothing to authenticate for it.
        assert!(plan.desired.iter().all(|d| !d.dst_id.contains("/ns/tools/")));
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
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
    }
}
