//! The datapath's maps as the stores of authentication results: the auth map as the auth
//! manager's table, `tag_keys` as the handshake's connection-key sink.

use super::{SharedDatapath, SharedView, lock};
use crate::auth_manager::{AuthTable, ProofKey};
use crate::handshake::ConnectionKeySink;
use meshauth_crds::SpiffeId;
use meshauth_datapath::{BootTime, ConnectionKey};
use std::net::IpAddr;
use std::sync::PoisonError;
use std::time::SystemTime;

/// The auth map of the datapath as the auth manager's table.
pub struct DatapathAuthTable(pub SharedDatapath);

impl AuthTable for DatapathAuthTable {
    fn set(&mut self, ProofKey { pair: (dst, src), node }: ProofKey, expiry: SystemTime, key: ConnectionKey) -> Result<(), String> {
        lock(&self.0).set_auth_keyed(dst, src, node, BootTime::from_system_time(expiry), key).map_err(|e| e.to_string())
    }

    fn remove(&mut self, ProofKey { pair: (dst, src), node }: ProofKey) -> Result<(), String> {
        lock(&self.0).remove_auth(dst, src, node).map(|_| ()).map_err(|e| e.to_string())
    }

    fn list(&self) -> Result<Vec<(ProofKey, SystemTime)>, String> {
        let entries = lock(&self.0).auth_entries().map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        Ok(entries
            .into_iter()
            .filter_map(|e| {
                let key = ProofKey { pair: (e.dst_spiffe_id, e.src_spiffe_id), node: e.src_node };
                Some((key, now + e.expiry.remaining()?))
            })
            .collect())
    }
}

/// The source side's connection keys: `tag_keys`, by this node's numbers for the pair and its
/// name for the destination's node.
pub struct DatapathKeySink {
    pub view: SharedView,
    pub datapath: crate::node_agent::SharedDatapath,
}

impl ConnectionKeySink for DatapathKeySink {
    fn install(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        destination_node: IpAddr,
        key: ConnectionKey,
        expiry: SystemTime,
    ) -> Result<(), String> {
        let (src, dst, node) = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            let number =
                |id: &SpiffeId| view.numbers.get(id.as_str()).copied().ok_or_else(|| format!("{id} has no number on this node yet"));
            let node = view
                .node_id(destination_node)
                .ok_or_else(|| format!("node address {destination_node} cannot key the datapath's maps (IPv4 only)"))?;
            (number(source)?, number(destination)?, node)
        };
        let mut dp = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        dp.set_tag_key(src, dst, node, BootTime::from_system_time(expiry), key).map_err(|e| e.to_string())
    }
}
