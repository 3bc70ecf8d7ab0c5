//! SPIRE registration entries: the operator's view of them ([`EntrySpec`], [`Registered`]), the
//! [`EntryApi`] it manages them through (and reads the attested agents from, [`AttestedAgent`]), the real client of the SPIRE Server Entry API
//! ([`client::SpireClient`], gRPC over the server's Unix socket) and an in-memory double for
//! tests ([`fake::FakeSpire`], feature `testing`).
//!
//! Job: create, update, list and delete **the operator's own** entries, in batches. Entries are
//! marked as the operator's by their hint, [`OWNER_HINT_PREFIX`] followed by the entry's SPIFFE
//! ID ([`owner_hint`]); listing returns only marked entries, and updates and deletes are only
//! ever issued for IDs that a listing or a create returned, so an entry made by someone else is
//! never touched. The hint is unique per SPIFFE ID on purpose: SPIRE's Workload API returns only
//! the first of several SVIDs that share a hint, so one hint for all entries would hide every
//! SVID but one from the meshauth agent. This module must not decide which entries
//! should exist (that is [`crate::registration`]).

pub mod client;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod proto;

use std::fmt;
use std::future::Future;

/// The start of the hint that marks an entry as created and owned by the operator.
pub const OWNER_HINT_PREFIX: &str = "meshauth-operator:";

/// The hint of the operator's entry for `spiffe_id`.
pub fn owner_hint(spiffe_id: &str) -> String {
    format!("{OWNER_HINT_PREFIX}{spiffe_id}")
}

/// gRPC status codes that per-item batch results carry.
pub(crate) const CODE_OK: i32 = 0;
pub(crate) const CODE_NOT_FOUND: i32 = 5;
pub(crate) const CODE_ALREADY_EXISTS: i32 = 6;

/// Errors talking to the SPIRE server.
#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    /// The socket path cannot be turned into a channel.
    #[error("cannot set up a gRPC channel to the SPIRE server socket {socket}: {reason}")]
    Channel { socket: String, reason: String },
    /// A whole call failed (server unreachable, refused, timed out).
    #[error("SPIRE server {operation} failed: {}: {}", status.code(), status.message())]
    Call {
        operation: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
    /// The server answered something the operator cannot use.
    #[error("SPIRE server {operation} answered unexpectedly: {reason}")]
    Answer { operation: &'static str, reason: String },
    /// A SPIFFE ID the operator was asked to register is not valid.
    #[error("cannot register {id}: {reason}")]
    BadSpiffeId { id: String, reason: String },
    /// A selector is not `TYPE:VALUE`.
    #[error("selector {0:?} is not TYPE:VALUE with both parts non-empty")]
    BadSelector(String),
}

impl SpireError {
    /// The operation, for metrics.
    pub fn operation(&self) -> &'static str {
        match self {
            SpireError::Call { operation, .. } | SpireError::Answer { operation, .. } => operation,
            SpireError::Channel { .. } => "connect",
            SpireError::BadSpiffeId { .. } | SpireError::BadSelector(_) => "encode",
        }
    }
}

/// A selector `type:value`, e.g. `k8s:ns:meshauth-system` (type `k8s`, value `ns:meshauth-system`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub kind: String,
    pub value: String,
}

impl Selector {
    /// Parses `TYPE:VALUE` (split at the first `:`).
    pub fn parse(s: &str) -> Result<Self, SpireError> {
        match s.split_once(':') {
            Some((kind, value)) if !kind.is_empty() && !value.is_empty() => Ok(Self { kind: kind.to_owned(), value: value.to_owned() }),
            _ => Err(SpireError::BadSelector(s.to_owned())),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// What one entry should say. Selectors are kept sorted so specs compare by value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntrySpec {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: String,
    /// The SPIRE agent ID of the node.
    pub parent_id: String,
    /// Sorted, deduplicated.
    pub selectors: Vec<Selector>,
    /// X.509-SVID TTL in seconds; 0: the server's default.
    pub x509_svid_ttl: i32,
}

impl EntrySpec {
    /// A spec; sorts and deduplicates the selectors.
    pub fn new(spiffe_id: String, parent_id: String, mut selectors: Vec<Selector>, x509_svid_ttl: i32) -> Self {
        selectors.sort();
        selectors.dedup();
        Self { spiffe_id, parent_id, selectors, x509_svid_ttl }
    }

    /// The key entries are matched on: one entry per (SPIFFE ID, parent).
    pub fn key(&self) -> EntryKey {
        EntryKey { spiffe_id: self.spiffe_id.clone(), parent_id: self.parent_id.clone() }
    }
}

/// (SPIFFE ID, parent ID): what the operator keeps exactly one entry of.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntryKey {
    pub spiffe_id: String,
    pub parent_id: String,
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.spiffe_id, self.parent_id)
    }
}

/// An entry that exists on the server and is the operator's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The server-assigned entry ID.
    pub id: String,
    pub spec: EntrySpec,
}

/// A SPIRE agent the server attested: what ties it to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedAgent {
    pub id: String,
    /// The node attestor, e.g. `k8s_psat` or `join_token`.
    pub attestation_type: String,
    /// What attestation found out, e.g. `k8s_psat:agent_node_name:node-1`.
    pub selectors: Vec<Selector>,
    pub banned: bool,
}

pub(crate) fn from_proto_agent(a: &proto::Agent) -> AttestedAgent {
    AttestedAgent {
        id: from_proto_id(a.id.as_ref()),
        attestation_type: a.attestation_type.clone(),
        selectors: a.selectors.iter().map(|s| Selector { kind: s.r#type.clone(), value: s.value.clone() }).collect(),
        banned: a.banned,
    }
}

/// What became of one item of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemResult<T> {
    /// Done; for creates and updates, the entry as the server stored it.
    Done(T),
    /// Create: a similar entry (same SPIFFE ID, parent and selectors) exists already, made by
    /// someone else; it serves the purpose and is left alone.
    AlreadyExists,
    /// Update or delete: the entry is gone already.
    NotFound,
    /// Refused for another reason.
    Failed { code: i32, message: String },
}

impl<T> ItemResult<T> {
    pub(crate) fn from_status(status: Option<&proto::Status>, done: impl FnOnce() -> Option<T>) -> Self {
        let (code, message) = status.map_or((CODE_OK, String::new()), |s| (s.code, s.message.clone()));
        match code {
            CODE_OK => match done() {
                Some(t) => ItemResult::Done(t),
                None => ItemResult::Failed { code, message: "the server returned no entry".into() },
            },
            CODE_ALREADY_EXISTS => ItemResult::AlreadyExists,
            CODE_NOT_FOUND => ItemResult::NotFound,
            _ => ItemResult::Failed { code, message },
        }
    }
}

/// The SPIRE Server Entry API as the operator uses it. Every call is one or a few batched
/// RPCs; implementations must keep results in the order of the inputs.
pub trait EntryApi: Send + Sync + 'static {
    /// Every entry marked as the operator's (see [`owner_hint`]).
    fn list_owned(&self) -> impl Future<Output = Result<Vec<Registered>, SpireError>> + Send;
    /// Creates entries (marked as the operator's).
    fn create(&self, specs: Vec<EntrySpec>) -> impl Future<Output = Result<Vec<ItemResult<Registered>>, SpireError>> + Send;
    /// Rewrites selectors and TTL of the operator's entries.
    fn update(&self, entries: Vec<Registered>) -> impl Future<Output = Result<Vec<ItemResult<Registered>>, SpireError>> + Send;
    /// Every agent the server has attested (the Agent API's ListAgents).
    fn list_agents(&self) -> impl Future<Output = Result<Vec<AttestedAgent>, SpireError>> + Send;
    /// Deletes the operator's entries by ID.
    fn delete(&self, ids: Vec<String>) -> impl Future<Output = Result<Vec<ItemResult<String>>, SpireError>> + Send;
}

/// Splits a SPIFFE ID into the API's (trust domain, path).
pub(crate) fn to_proto_id(id: &str) -> Result<proto::SpiffeId, SpireError> {
    let parsed = meshauth_crds::SpiffeId::parse(id).map_err(|e| SpireError::BadSpiffeId { id: id.to_owned(), reason: e.to_string() })?;
    Ok(proto::SpiffeId { trust_domain: parsed.trust_domain().to_owned(), path: parsed.path().to_owned() })
}

pub(crate) fn from_proto_id(id: Option<&proto::SpiffeId>) -> String {
    id.map(|i| format!("spiffe://{}{}", i.trust_domain, i.path)).unwrap_or_default()
}

/// The API form of a spec, marked as the operator's.
pub(crate) fn to_proto_entry(id: &str, spec: &EntrySpec) -> Result<proto::Entry, SpireError> {
    Ok(proto::Entry {
        id: id.to_owned(),
        spiffe_id: Some(to_proto_id(&spec.spiffe_id)?),
        parent_id: Some(to_proto_id(&spec.parent_id)?),
        selectors: spec.selectors.iter().map(|s| proto::Selector { r#type: s.kind.clone(), value: s.value.clone() }).collect(),
        x509_svid_ttl: spec.x509_svid_ttl,
        admin: false,
        downstream: false,
        hint: owner_hint(&spec.spiffe_id),
    })
}

/// The operator's view of an entry from the API; `None` when it is not the operator's.
pub(crate) fn from_proto_entry(e: &proto::Entry) -> Option<Registered> {
    if !e.hint.starts_with(OWNER_HINT_PREFIX) || e.id.is_empty() {
        return None;
    }
    let selectors = e.selectors.iter().map(|s| Selector { kind: s.r#type.clone(), value: s.value.clone() }).collect();
    Some(Registered {
        id: e.id.clone(),
        spec: EntrySpec::new(from_proto_id(e.spiffe_id.as_ref()), from_proto_id(e.parent_id.as_ref()), selectors, e.x509_svid_ttl),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_differ_per_identity_so_the_workload_api_returns_every_svid() {
        // SPIRE's Workload API returns one SVID per hint.
        assert_ne!(owner_hint("spiffe://td/ns/a/sa/b"), owner_hint("spiffe://td/ns/a/sa/c"));
    }

    #[test]
    fn selectors_split_at_the_first_colon() {
        let s = Selector::parse("k8s:ns:meshauth-system").expect("valid");
        assert_eq!((s.kind.as_str(), s.value.as_str()), ("k8s", "ns:meshauth-system"));
        assert_eq!(s.to_string(), "k8s:ns:meshauth-system");
        for bad in ["unix", ":uid:0", "unix:", ""] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn entries_round_trip_through_the_api_form_and_only_marked_ones_are_ours() {
        let spec = EntrySpec::new(
            "spiffe://td/ns/a/sa/b".into(),
            "spiffe://td/spire/agent/x".into(),
            vec![Selector::parse("unix:uid:0").expect("valid")],
            60,
        );
        let mut e = to_proto_entry("id1", &spec).expect("valid");
        assert_eq!(e.spiffe_id, Some(proto::SpiffeId { trust_domain: "td".into(), path: "/ns/a/sa/b".into() }));
        assert_eq!(from_proto_entry(&e), Some(Registered { id: "id1".into(), spec }));
        assert_eq!(e.hint, "meshauth-operator:spiffe://td/ns/a/sa/b");
        e.hint = "someone-else".into();
        assert_eq!(from_proto_entry(&e), None);
        assert!(to_proto_id("not-an-id").is_err());
    }
}
