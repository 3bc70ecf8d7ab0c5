//! The agent's `/explain`: one kind of packet's verdict on this node, by name (the policy
//! model over the agent's latest snapshot: which MeshPolicy rule admits it, which MutualAuth
//! sets the mode) and, when the destination runs here and the pair needs authentication, the
//! pair's state on this node: each source node's proof, its expiry, and the last handshake's
//! failure.
//!
//! Reads only: it never changes a table, a proof or a handshake. Served on the metrics port to
//! loopback clients only (the metrics server refuses others): it names pods and policies.

use crate::auth_manager::{AuthManagerHandle, PairStatus};
use crate::inputs::Snapshot;
use crate::plan::SharedView;
use meshauth_cluster::NotEndpoint;
use meshauth_policy::model::{Explanation, ModelConfig, ObjectRef, PolicyModel, Source};
use meshauth_policy::tables::{AuthRequirement, TableProtocol};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, PoisonError};
use std::time::SystemTime;
use tokio::sync::watch;

/// Why a question has no answer (HTTP 400 for the asker's mistakes, 404 for unknown pods).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0:?} is not NS/POD")]
    BadPodRef(String),
    #[error("{0:?} is not a protocol (tcp, udp, icmp, other)")]
    BadProtocol(String),
    #[error("pod {0} is not known to this node's agent")]
    UnknownPod(ObjectRef),
    #[error("pod {0} is not a mesh endpoint: it {1}")]
    NotEndpoint(ObjectRef, NotEndpoint),
}

impl ExplainError {
    /// Whether the question named something the agent does not know (rather than being malformed).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::UnknownPod(_) | Self::NotEndpoint(..))
    }
}

/// `/explain?from=NS/POD&to=NS/POD&port=N&protocol=tcp`.
#[derive(Debug, Clone, Deserialize)]
pub struct ExplainQuery {
    pub from: String,
    pub to: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// One node's proof of the pair on this node.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProofState {
    /// The source's node: `this node` or its agent's address.
    pub node: String,
    /// Seconds until the entry expires; `None`: no entry (never proven, or refused).
    pub expires_in_seconds: Option<u64>,
    /// Handshakes that failed since the last success.
    pub failures: u32,
    /// Why the last handshake failed (no SVID yet, peer unreachable, identity not hosted,
    /// impostor refused).
    pub last_error: Option<String>,
    /// Seconds until the next handshake (a renewal or a retry) starts.
    pub next_handshake_in_seconds: Option<u64>,
}

/// The answer.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainReport {
    /// The node that answered.
    pub node: String,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: TableProtocol,
    #[serde(flatten)]
    pub explanation: Explanation,
    pub source_identity: String,
    pub destination_identity: String,
    /// The destination's node, where its authentication is decided.
    pub destination_node: Option<String>,
    /// The pair's proofs here, when the destination runs on this node and the pair needs
    /// authentication; empty then means no proof at all yet.
    pub proofs: Option<Vec<ProofState>>,
    /// What the answer cannot say from this node, or where the datapath may differ.
    pub notes: Vec<String>,
}

/// Answers `/explain` from the agent's live state.
pub struct Explainer {
    pub node_name: String,
    pub config: ModelConfig,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub view: SharedView,
    pub manager: AuthManagerHandle,
    /// Whether the last apply fit the maps (when not, the datapath denies more).
    pub metrics: Arc<crate::metrics::AgentMetrics>,
}

impl Explainer {
    pub async fn explain(&self, query: &ExplainQuery) -> Result<ExplainReport, ExplainError> {
        let protocol = match query.protocol.as_deref().unwrap_or("tcp").to_ascii_lowercase().as_str() {
            "tcp" => TableProtocol::Tcp,
            "udp" => TableProtocol::Udp,
            "icmp" => TableProtocol::Icmp,
            "other" => TableProtocol::Other,
            other => return Err(ExplainError::BadProtocol(other.to_owned())),
        };
        let snapshot = self.snapshots.borrow().clone();
        let model = PolicyModel::new(self.config.clone(), snapshot.inputs.clone());
        let pod = |s: &str| -> Result<ObjectRef, ExplainError> {
            let r = ObjectRef::parse(s).ok_or_else(|| ExplainError::BadPodRef(s.to_owned()))?;
            if let Some((_, why)) = snapshot.not_endpoints.iter().find(|(p, _)| *p == r) {
                return Err(ExplainError::NotEndpoint(r, *why));
            }
            model.pod(&r).map(|_| r.clone()).ok_or(ExplainError::UnknownPod(r))
        };
        let (from, to) = (pod(&query.from)?, pod(&query.to)?);
        let explanation = model
            .explain(&Source::Pod(from.clone()), &to, protocol, query.port)
            .map_err(|meshauth_policy::model::ModelError::UnknownPod(r)| ExplainError::UnknownPod(r))?;
        let (src, dst) = match (model.pod(&from), model.pod(&to)) {
            (Some(s), Some(d)) => (s, d),
            _ => return Err(ExplainError::UnknownPod(to)),
        };
        let (source_identity, destination_identity) = (model.spiffe_id(src).to_string(), model.spiffe_id(dst).to_string());
        let destination_node = dst.node.clone();
        let needs_auth = explanation.decision.authentication != AuthRequirement::None;
        let here = destination_node.as_deref() == Some(self.node_name.as_str());
        let (proofs, note) = match (needs_auth, here) {
            (false, _) => (None, None),
            (true, false) => (
                None,
                Some(format!(
                    "the destination runs on {}: its agent holds the pair's proofs",
                    destination_node.as_deref().unwrap_or("no node yet")
                )),
            ),
            (true, true) => {
                let numbers = {
                    let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
                    (view.numbers.get(&destination_identity).copied(), view.numbers.get(&source_identity).copied())
                };
                match numbers {
                    (Some(dst_number), Some(src_number)) => {
                        let status = self.manager.status().await;
                        (Some(proof_states((dst_number, src_number), &status, SystemTime::now())), None)
                    }
                    _ => (Some(Vec::new()), Some("the pair has no numbers on this node yet: no proof".into())),
                }
            }
        };
        let mut notes: Vec<String> = note.into_iter().collect();
        if let Some(reason) = self.metrics.not_ready_reason() {
            notes.push(format!(
                "the last policy apply did not fit this node's maps ({reason}): the datapath may deny more than this answer says"
            ));
        }
        Ok(ExplainReport {
            node: self.node_name.clone(),
            from: from.to_string(),
            to: to.to_string(),
            port: if protocol.has_ports() { query.port } else { 0 },
            protocol,
            explanation,
            source_identity,
            destination_identity,
            destination_node,
            proofs,
            notes,
        })
    }
}

/// The proofs of `pair` among the auth manager's records, as of `now`.
fn proof_states(pair: (u32, u32), status: &[PairStatus], now: SystemTime) -> Vec<ProofState> {
    status
        .iter()
        .filter(|s| s.key.pair == pair)
        .map(|s| ProofState {
            node: s.key.node.to_string(),
            expires_in_seconds: s.expiry.and_then(|e| e.duration_since(now).ok()).map(|d| d.as_secs()),
            failures: s.failures,
            last_error: s.last_error.clone(),
            next_handshake_in_seconds: s.next_attempt_in.map(|d| d.as_secs()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth_manager::ProofKey;
    use meshauth_datapath::NodeId;
    use std::time::Duration;

    #[test]
    fn proofs_of_the_pair_only_with_their_time_left_and_last_failure() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let status = [
            PairStatus {
                key: ProofKey { pair: (1, 2), node: NodeId::This },
                desired: true,
                expiry: Some(now + Duration::from_secs(90)),
                failures: 0,
                last_error: None,
                next_attempt_in: Some(Duration::from_secs(60)),
            },
            PairStatus {
                key: ProofKey { pair: (1, 2), node: NodeId::At("192.168.1.2".parse().expect("ip")) },
                desired: true,
                expiry: None,
                failures: 3,
                last_error: Some("peer_unreachable".into()),
                next_attempt_in: Some(Duration::from_secs(4)),
            },
            PairStatus {
                key: ProofKey { pair: (1, 3), node: NodeId::This },
                desired: true,
                expiry: Some(now),
                failures: 0,
                last_error: None,
                next_attempt_in: None,
            },
        ];
        let proofs = proof_states((1, 2), &status, now);
        assert_eq!(proofs.len(), 2);
        assert_eq!((proofs[0].expires_in_seconds, proofs[0].failures), (Some(90), 0));
        assert_eq!((proofs[1].expires_in_seconds, proofs[1].last_error.as_deref()), (None, Some("peer_unreachable")));
        assert_eq!(proofs[1].node, "192.168.1.2");
        assert_eq!((proofs[0].next_handshake_in_seconds, proofs[1].next_handshake_in_seconds), (Some(60), Some(4)));
    }
}
