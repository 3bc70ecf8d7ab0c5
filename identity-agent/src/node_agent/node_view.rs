//! The agent's latest node view as the handshake's oracle of which identity is hosted where.

use super::SharedView;
use crate::handshake::HostedIdentities;
use meshauth_crds::SpiffeId;
use std::net::IpAddr;
use std::sync::PoisonError;

/// The agent's latest [`NodeView`](crate::plan::NodeView) as the handshake's oracle.
pub struct ViewHosted(pub SharedView);

impl HostedIdentities for ViewHosted {
    fn is_hosted_here(&self, id: &SpiffeId) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_hosted_here(id.as_str())
    }

    fn identity_hosted_at(&self, id: &SpiffeId, node: IpAddr) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_hosted_at(id.as_str(), node)
    }

    fn is_node(&self, addr: IpAddr) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_node(addr)
    }
}

impl ViewHosted {
    /// The address other agents know this node by, as the latest snapshot has it.
    pub(super) fn own_address(&self) -> Option<IpAddr> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).own_address
    }
}
