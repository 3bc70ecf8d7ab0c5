//! The flat lookup tables the datapath loads, compiled from the policy model.
//!
//! The datapath answers a packet (source IP, destination IP, protocol, destination port) with:
//! 1. `endpoints[dst ip]` → the destination's security identity, SPIFFE-ID number and flags
//!    (`isolated`: some enforced MeshPolicy selects it; `audit`: only audited ones do;
//!    `mutual_auth`: its MutualAuth mode). A destination IP not in the table is not a meshauth
//!    pod: pass.
//! 2. `endpoints[src ip]` → the source's security identity and SPIFFE-ID number, or
//!    [`WORLD_IDENTITY`] and no SPIFFE-ID number when the source is not a known pod.
//! 3. When the destination is `isolated`: two longest-prefix lookups in `policy`, one with the
//!    source's identity and one with [`ANY_IDENTITY`]; the packet is allowed when either matches
//!    with `allow`, and the rule authentication is the stricter of the two matches. Not isolated:
//!    allowed, rule authentication [`AuthRequirement::None`].
//!    `audit`: the same lookups, but no match passes (reported as a would-be denial), and a
//!    `Required` rule authentication counts as `Permissive` (reported when unauthenticated).
//! 4. authentication = max(rule authentication, `mutual_auth`). `Required`: the packet passes only
//!    when `auth[(dst spiffe number, src spiffe number)]` holds an expiry in the future (a source
//!    with no SPIFFE-ID number can never pass). `Permissive`: passes, and the would-be drop is
//!    counted.
//!
//! For every (destination identity, source identity or any, protocol) the compiler emits
//! disjoint port ranges, so a longest-prefix lookup finds at most one entry, and the
//! per-range answer is already the combination (allow if any rule allows, strictest
//! authentication) of every rule covering that range. [`PolicyEntry::prefixes`] splits a range
//! into the port prefixes an LPM trie stores.

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Security identity number meaning "any source" in a policy key.
pub const ANY_IDENTITY: u32 = 0;
/// Security identity of every source that is not a known pod (outside the mesh).
pub const WORLD_IDENTITY: u32 = 1;
/// The first number handed to a real security identity.
pub const FIRST_ALLOCATED_IDENTITY: u32 = 256;
/// SPIFFE-ID number meaning "no SPIFFE ID" (world sources).
pub const NO_SPIFFE_ID: u32 = 0;

/// The protocols a policy entry is keyed on. Values are the IP protocol numbers, except
/// [`TableProtocol::Other`], which stands for every protocol that is not TCP, UDP or ICMP.
/// ICMP and `Other` carry port 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum TableProtocol {
    Other = 0,
    Icmp = 1,
    Tcp = 6,
    Udp = 17,
}

impl TableProtocol {
    /// All protocols, in table order.
    pub const ALL: [TableProtocol; 4] = [TableProtocol::Other, TableProtocol::Icmp, TableProtocol::Tcp, TableProtocol::Udp];

    /// The table protocol of an IP protocol number.
    pub fn from_ip_protocol(number: u8) -> Self {
        match number {
            1 => TableProtocol::Icmp,
            6 => TableProtocol::Tcp,
            17 => TableProtocol::Udp,
            _ => TableProtocol::Other,
        }
    }

    /// Whether packets of this protocol carry a destination port.
    pub fn has_ports(self) -> bool {
        matches!(self, TableProtocol::Tcp | TableProtocol::Udp)
    }
}

/// How strongly traffic must be authenticated. Ordered: `None < Permissive < Required`, and
/// combining two requirements takes the maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum AuthRequirement {
    #[default]
    None = 0,
    Permissive = 1,
    Required = 2,
}

/// One pod as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointEntry {
    pub ip: Ipv4Addr,
    /// The pod's security identity (namespace + labels + service account).
    pub security_identity: u32,
    /// The number of the pod's SPIFFE ID in [`CompiledTables::spiffe_ids`].
    pub spiffe_id: u32,
    /// Some enforced MeshPolicy selects the pod: it accepts only what a rule allows.
    pub isolated: bool,
    /// Only audited MeshPolicies select the pod: it accepts everything, and what their rules
    /// would deny (or require authentication for) is counted and reported.
    #[serde(default)]
    pub audit: bool,
    /// The pod's MutualAuth requirement.
    pub mutual_auth: AuthRequirement,
    /// `namespace/name` of the pod, for people reading the tables.
    pub pod: String,
    /// The node hosting the pod, when known.
    pub node: Option<String>,
    /// The address of that node's agent, which the agent fills in from the Nodes (the model
    /// does not read them): only its handshakes prove this pod's identity to other nodes. A
    /// pod of another node with none is authenticated by no one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_address: Option<Ipv4Addr>,
}

/// A policy entry: for traffic to `dst_identity` from `src_identity` (or [`ANY_IDENTITY`]) over
/// `protocol` to a port in `port_start..=port_end`, the combined answer of the matching rules.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub dst_identity: u32,
    pub src_identity: u32,
    pub protocol: TableProtocol,
    pub port_start: u16,
    pub port_end: u16,
    /// Authentication the matching rules require. Every entry allows: absence means deny.
    pub auth: AuthRequirement,
}

impl PolicyEntry {
    /// The `(port, prefix length in bits)` blocks that exactly cover `port_start..=port_end`,
    /// for an LPM trie keyed on the big-endian port. A full range is one block of length 0.
    pub fn prefixes(&self) -> Vec<(u16, u8)> {
        port_range_prefixes(self.port_start, self.port_end)
    }
}

/// Splits `start..=end` into maximal aligned power-of-two blocks `(first port, prefix bits)`.
pub fn port_range_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let mut blocks = Vec::new();
    if start > end {
        return blocks;
    }
    let (mut lo, hi) = (u32::from(start), u32::from(end));
    while lo <= hi {
        // The largest block aligned at `lo` that does not pass `hi`.
        let mut size_bits = if lo == 0 { 16 } else { lo.trailing_zeros().min(16) };
        while lo + (1 << size_bits) - 1 > hi {
            size_bits -= 1;
        }
        // `lo` fits in u16 here: it is at most `hi`, which came from a u16.
        blocks.push((lo as u16, 16 - size_bits as u8));
        lo += 1 << size_bits;
    }
    blocks
}

/// Everything the datapath of one node loads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledTables {
    pub endpoints: Vec<EndpointEntry>,
    pub policy: Vec<PolicyEntry>,
    /// SPIFFE-ID number → SPIFFE ID, for every number used in `endpoints`.
    pub spiffe_ids: Vec<(u32, String)>,
    /// Security identity number → `namespace`, `service account` and sorted labels.
    pub security_identities: Vec<(u32, SecurityIdentityKey)>,
}

/// What makes two pods the same security identity: they get the same policy verdicts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SecurityIdentityKey {
    pub namespace: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_prefixes_cover_exactly_the_range() {
        assert_eq!(port_range_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_range_prefixes(1, 65535).len(), 16);
        assert_eq!(port_range_prefixes(8080, 8080), vec![(8080, 16)]);
        assert_eq!(port_range_prefixes(8080, 8083), vec![(8080, 14)]);
        for (start, end) in [(1u16, 1u16), (3, 17), (1000, 2000), (65535, 65535), (0, 0), (1, 65535)] {
            let mut covered = Vec::new();
            for (port, bits) in port_range_prefixes(start, end) {
                let size = 1u32 << (16 - u32::from(bits));
                assert_eq!(u32::from(port) % size, 0, "block {port}/{bits} unaligned");
                covered.extend(u32::from(port)..u32::from(port) + size);
            }
            let want: Vec<u32> = (u32::from(start)..=u32::from(end)).collect();
            assert_eq!(covered, want, "{start}..={end}");
        }
    }
}
