//! The applier's upkeep of the node: interfaces that vanished, the node's own addresses, the
//! connection tagger's uplinks, expired connection keys and the CNI chaining.

use super::{AgentError, Applier, SCAN_INTERVAL, lock};
use crate::pod_net;
use std::collections::BTreeSet;
use std::net::Ipv4Addr;

impl Applier {
    /// Chains meshauth-cni back into the config the runtime uses if it is no longer there.
    fn keep_cni_chained(&self) {
        let Some((conf_dir, socket)) = &self.cni_chaining else { return };
        match crate::cni_install::ensure_chained(conf_dir, socket) {
            Ok(Some(config)) => {
                tracing::warn!(config = %config.display(), "meshauth-cni was no longer chained (the primary CNI rewrote its config?): chained again")
            }
            Ok(None) => {}
            Err(error) => tracing::error!(%error, "meshauth-cni is not chained and cannot be: new pods may start unguarded"),
        }
    }

    /// The connection tagger on every uplink, and off interfaces that stopped being one.
    pub fn sync_uplinks(&mut self) {
        let pods: BTreeSet<u32> = self.registry.values().map(|r| r.ifindex).collect();
        let destinations = self.remote_destinations();
        if self.uplinks.is_none() && destinations.is_empty() {
            // No other node known yet (a first snapshot still empty): keep the pinned taggers.
            return;
        }
        let wanted: BTreeSet<u32> = match &self.uplinks {
            Some(names) => names.iter().filter_map(|n| meshauth_datapath::loader::if_index(n).ok()).collect(),
            None => match pod_net::uplinks_toward(&destinations, &pods) {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(%error, "cannot list the node's interfaces; the tagger stays where it is");
                    return;
                }
            },
        };
        let mut dp = lock(&self.datapath);
        let mut problems = Vec::new();
        for ifindex in &wanted {
            let Some(name) = meshauth_datapath::loader::if_name(*ifindex) else { continue };
            if let Err(error) = dp.attach_uplink(&name) {
                tracing::error!(uplink = %name, %error, "cannot attach the connection tagger: this node's pods' connections to other nodes carry no tag and fail closed under Strict");
                problems.push(format!("connection tagger not on uplink {name}: {error}"));
            }
        }
        if let Some(metrics) = &self.metrics {
            metrics.set_tagger_problem((!problems.is_empty()).then(|| {
                format!("{}: Strict MutualAuth cannot be enforced for this node's connections to other nodes", problems.join("; "))
            }));
        }
        match dp.uplinks() {
            Ok(attached) => {
                for (ifindex, _) in attached.into_iter().filter(|(i, _)| !wanted.contains(i)) {
                    if let Err(error) = dp.detach_uplink(ifindex) {
                        tracing::warn!(ifindex, %error, "cannot detach the connection tagger");
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot list the tagger's uplinks"),
        }
    }

    /// Other nodes' addresses and one pod address per other node: where this node's pods'
    /// connections to other nodes go (the pod address covers an overlay device).
    fn remote_destinations(&self) -> BTreeSet<Ipv4Addr> {
        let snapshot = &self.last;
        let mut out = BTreeSet::new();
        for node in snapshot.nodes.iter().filter(|n| n.name != self.node_name) {
            if let Some(ip) = snapshot.node_address(&node.name).and_then(|a| a.parse().ok()) {
                out.insert(ip);
            }
            if let Some(ip) = snapshot.inputs.pods.iter().find(|p| p.node.as_deref() == Some(node.name.as_str())).and_then(|p| p.ip) {
                out.insert(ip);
            }
        }
        out
    }

    /// Connection keys of pairs that expired go.
    fn sweep_tag_keys(&self) {
        if let Err(error) = lock(&self.datapath).sweep_tag_keys() {
            tracing::warn!(%error, "cannot sweep the connection keys");
        }
    }

    pub(super) fn sync_host_addresses(&self) {
        match pod_net::host_addresses() {
            Ok(addrs) => {
                if let Err(error) = lock(&self.datapath).set_host_addresses(&addrs) {
                    tracing::warn!(%error, "cannot write the node's addresses");
                }
            }
            Err(error) => tracing::warn!(%error, "cannot list the node's addresses"),
        }
    }

    /// An interface vanished: forget it.
    pub fn link_removed(&mut self, ifindex: u32) -> Result<(), AgentError> {
        let registered = self.registry.values().any(|r| r.ifindex == ifindex);
        self.release(ifindex);
        if registered {
            tracing::info!(ifindex, "pod interface vanished; released");
            self.reapply()?;
        }
        Ok(())
    }

    /// Periodic work: interfaces that vanished unnoticed, the node's own addresses, and pods
    /// still waiting to be found.
    pub fn housekeeping(&mut self) -> Result<(), AgentError> {
        let vanished: Vec<u32> = self.registry.values().map(|r| r.ifindex).filter(|i| !pod_net::link_exists(*i)).collect();
        for ifindex in &vanished {
            self.release(*ifindex);
        }
        self.sync_host_addresses();
        self.sync_uplinks();
        self.sweep_tag_keys();
        self.keep_cni_chained();
        // Local pods still unguarded: only a scan that finds their veths is worth a new apply
        // (a pod whose veth cannot be found costs a scan every SCAN_INTERVAL, not a compile).
        let waiting: BTreeSet<Ipv4Addr> = self
            .last
            .inputs
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(self.node_name.as_str()))
            .filter_map(|p| p.ip)
            .filter(|ip| !self.registry.contains_key(ip))
            .collect();
        let found = !waiting.is_empty() && self.last_scan.is_none_or(|t| t.elapsed() >= SCAN_INTERVAL) && self.scan(&waiting) > 0;
        if !vanished.is_empty() || found || !self.failed.is_empty() {
            self.reapply()?;
        }
        Ok(())
    }
}
