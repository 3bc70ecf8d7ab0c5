//! Connection keys and the uplink tagger: the loader's side of identity-bound connections.
//!
//! A handshake gives both agents of a pair the same secret (the TLS exporter). The destination's
//! node keeps it beside the pair's auth entry; the source's node keeps it in `tag_keys`, and
//! `tag_syn`, attached to the node's uplinks, tags its pods' SYNs with it. Keys are written and
//! rotated here and never read back out of the maps for display.

use std::time::Duration;

use aya::programs::LinkOrder;
use aya::programs::TcAttachType;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};

use super::{
    Datapath, DatapathError, NodeId, TAG_SYN, if_index, io_err, is_not_found, keys_of, map_err, prog_err, remove_ignoring_missing,
};
use crate::abi::{AuthKey, AuthValue, TagKey, TagValue};
use crate::clock::BootTime;

/// A pair's connection key (SipHash-2-4 key). Its `Debug` never shows it.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnectionKey(pub [u64; 2]);

impl ConnectionKey {
    /// The key of 16 exporter bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        let (lo, hi) = b.split_at(8);
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(s);
            u64::from_le_bytes(w)
        };
        ConnectionKey([word(lo), word(hi)])
    }

    /// An all-zero key is no key: the programs refuse it.
    pub fn is_set(&self) -> bool {
        self.0 != [0, 0]
    }
}

impl std::fmt::Debug for ConnectionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionKey(..)")
    }
}

/// How long the destination still accepts a pair's previous key after a new one arrives.
pub const KEY_OVERLAP: Duration = Duration::from_secs(30);
/// How long the source keeps tagging with the previous key after a new one arrives: the
/// destination, which finishes its handshake after ours, has installed the new key by then.
pub const KEY_SWITCH_DELAY: Duration = Duration::from_secs(2);

/// Where a pin of an uplink's tagger link lives: `links/<ifindex>-uplink`.
pub(super) const UPLINK_SUFFIX: &str = "-uplink";

impl Datapath {
    /// As [`Datapath::set_auth`], with the pair's connection key from the handshake: a SYN from
    /// another node is admitted only when its tag verifies with it. A new key keeps the one it
    /// replaces valid for [`KEY_OVERLAP`], so connections tagged just before a rotation pass.
    pub fn set_auth_keyed(
        &mut self,
        dst_spiffe_id: u32,
        src_spiffe_id: u32,
        src_node: NodeId,
        expiry: BootTime,
        key: ConnectionKey,
    ) -> Result<(), DatapathError> {
        let k = AuthKey { dst_spiffe_id, src_spiffe_id, src_node: src_node.key() };
        let now = BootTime::now();
        let mut v = AuthValue { expiry_ns: expiry.0, key: key.0, ..AuthValue::default() };
        match self.maps.auth.get(&k, 0) {
            Ok(old) if old.key == key.0 => {
                v.prev_key = old.prev_key;
                v.prev_until_ns = old.prev_until_ns;
            }
            Ok(old) if old.key != [0, 0] => {
                v.prev_key = old.key;
                v.prev_until_ns = now.saturating_add(KEY_OVERLAP).0;
            }
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err("auth")(e)),
        }
        self.maps.auth.insert(k, v, 0).map_err(map_err("auth"))
    }

    /// Records the key this node's pods of `src` tag their SYNs to the pods of `dst` on
    /// `dst_node` with, until `expiry` (the agent of every node hosting `dst` proves the pair
    /// on its own, with its own key). A replaced key stays in use for [`KEY_SWITCH_DELAY`];
    /// the first key is used at once.
    pub fn set_tag_key(
        &mut self,
        src_spiffe_id: u32,
        dst_spiffe_id: u32,
        dst_node: NodeId,
        expiry: BootTime,
        key: ConnectionKey,
    ) -> Result<(), DatapathError> {
        let k = TagKey { src_spiffe_id, dst_spiffe_id, dst_node: dst_node.key() };
        let now = BootTime::now();
        let mut v = TagValue { expiry_ns: expiry.0, key: key.0, ..TagValue::default() };
        match self.maps.tag_keys.get(&k, 0) {
            Ok(old) if old.key == key.0 => {
                v.prev_key = old.prev_key;
                v.key_from_ns = old.key_from_ns;
            }
            Ok(old) if old.key != [0, 0] && old.expiry_ns > now.0 => {
                v.prev_key = old.key;
                v.key_from_ns = now.saturating_add(KEY_SWITCH_DELAY).0;
            }
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(map_err("tag_keys")(e)),
        }
        self.maps.tag_keys.insert(k, v, 0).map_err(map_err("tag_keys"))
    }

    /// Forgets the tag keys that expired; returns how many went.
    pub fn sweep_tag_keys(&mut self) -> Result<usize, DatapathError> {
        let now = BootTime::now().0;
        let mut gone = Vec::new();
        for k in keys_of(&self.maps.tag_keys, "tag_keys")? {
            let expired = match self.maps.tag_keys.get(&k, 0) {
                Ok(v) => v.expiry_ns <= now,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => return Err(map_err("tag_keys")(e)),
            };
            if expired {
                gone.push(k);
            }
        }
        for k in &gone {
            remove_ignoring_missing(self.maps.tag_keys.remove(k), "tag_keys")?;
        }
        Ok(gone.len())
    }

    /// The (source, destination, destination's node) this node holds a tag key for, with
    /// their expiry.
    pub fn tag_key_pairs(&self) -> Result<Vec<(u32, u32, NodeId, BootTime)>, DatapathError> {
        let mut out = Vec::new();
        for item in self.maps.tag_keys.iter() {
            let (k, v) = item.map_err(map_err("tag_keys"))?;
            out.push((k.src_spiffe_id, k.dst_spiffe_id, NodeId::from_key(k.dst_node), BootTime(v.expiry_ns)));
        }
        out.sort();
        Ok(out)
    }

    fn uplink_path(&self, ifindex: u32) -> std::path::PathBuf {
        self.config.pin_dir.join("links").join(format!("{ifindex}{UPLINK_SUFFIX}"))
    }

    /// Attaches the tagger to the egress of `ifname`, an interface this node's pods' traffic to
    /// other nodes leaves by. Idempotent. The tagger never drops a packet.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let ifindex = if_index(ifname)?;
        let path = self.uplink_path(ifindex);
        let prog_id = self.tag_syn.info().map_err(prog_err(TAG_SYN))?.id();
        if !self.tcx {
            // A clsact filter leaves no pin to find it by after a restart or an upgrade.
            return Err(DatapathError::UplinkNeedsTcx { name: ifname.into() });
        }
        if path.exists() {
            let (_, attached) = aya::programs::SchedClassifier::query_tcx(ifname, TcAttachType::Egress).map_err(prog_err(TAG_SYN))?;
            if attached.iter().any(|p| p.id() == prog_id) {
                return Ok(());
            }
            std::fs::remove_file(&path).map_err(io_err(format!("removing stale {}", path.display())))?;
        }
        // Last: every other egress program (a CNI's) has rewritten the packet before it is tagged.
        let id = self
            .tag_syn
            .attach_with_options(ifname, TcAttachType::Egress, TcAttachOptions::TcxOrder(LinkOrder::last()))
            .map_err(prog_err(TAG_SYN))?;
        let link = self.tag_syn.take_link(id).map_err(prog_err(TAG_SYN))?;
        let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.clone(), source })?;
        fd_link.pin(&path).map_err(|source| DatapathError::Pin { path: path.clone(), source })?;
        tracing::info!(ifname, ifindex, "connection tagger attached to uplink");
        Ok(())
    }

    /// Detaches the tagger from `ifindex` (an uplink no longer used, or gone).
    pub fn detach_uplink(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        let path = self.uplink_path(ifindex);
        if !path.exists() {
            return Ok(());
        }
        std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))
    }

    /// The interfaces the tagger is attached to (ifindex; name when it still exists).
    pub fn uplinks(&self) -> Result<Vec<(u32, Option<String>)>, DatapathError> {
        let dir = self.config.pin_dir.join("links");
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(index) = name.to_str().and_then(|n| n.strip_suffix(UPLINK_SUFFIX)).and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            out.push((index, super::if_name(index)));
        }
        out.sort();
        Ok(out)
    }

    /// Moves pinned tagger links to this version's program (an upgrade).
    pub(super) fn repoint_uplinks(&mut self) -> Result<(), DatapathError> {
        let want = self.tag_syn.info().map_err(prog_err(TAG_SYN))?.id();
        for (ifindex, name) in self.uplinks()? {
            let path = self.uplink_path(ifindex);
            let Some(name) = name else {
                std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
                continue;
            };
            let _ = name;
            let link_err = |source| DatapathError::Link { path: path.clone(), source };
            let fd_link = FdLink::from(PinnedLink::from_pin(&path).map_err(link_err)?);
            if fd_link.info().map_err(link_err)?.program_id() == want {
                continue;
            }
            let link = SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
            let id = self.tag_syn.attach_to_link(link).map_err(prog_err(TAG_SYN))?;
            drop(self.tag_syn.take_link(id).map_err(prog_err(TAG_SYN))?);
        }
        Ok(())
    }
}
