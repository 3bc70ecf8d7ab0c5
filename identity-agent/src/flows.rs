//! Flow records: the datapath's events (every drop it reports, what Permissive passes that
//! Strict would drop, and what audited MeshPolicies would drop) with names: both pods, both
//! SPIFFE IDs, the reason, the MeshPolicies that select the destination, the rule that admits
//! the pair, the MutualAuth that set its mode, and the policies the verdict counts against.
//! Kept in a bounded ring and sent to followers (`meshauthctl observe`).
//!
//! Bounded whatever the traffic: the ring holds the last [`DEFAULT_CAPACITY`] records, and a
//! follower that falls behind loses records (counted) rather than the agent holding them. The
//! datapath's own event budget limits how many events reach the agent per second. Never
//! decides anything: the verdict is the datapath's.

use meshauth_datapath::{BootTime, Counter, Event, EventKind};
use meshauth_policy::model::{ObjectRef, PolicyModel, Source};
use meshauth_policy::tables::{AuthRequirement, TableProtocol};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Records the ring keeps.
pub const DEFAULT_CAPACITY: usize = 4096;
/// Records a follower may fall behind by before it loses some.
const FOLLOWER_BACKLOG: usize = 1024;

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowEnd {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// `namespace/name`, when the address is a pod this agent knows.
    pub pod: Option<String>,
    /// Its SPIFFE ID, when it is a mesh pod.
    pub identity: Option<String>,
}

/// One verdict of the datapath, named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowRecord {
    /// When the datapath wrote the event (milliseconds since the Unix epoch).
    pub time_unix_ms: u64,
    pub node: String,
    /// `DROPPED`; `PERMISSIVE` for what passed only because the mode is Permissive; `AUDIT`
    /// for what passed only because the MeshPolicies that would drop it are audited;
    /// `FORWARDED` for a sampled pass (`MESHAUTH_BPF_PASS_SAMPLE_EVERY`).
    pub verdict: String,
    /// The datapath counter it was counted under (`drop_auth_missing`, `drop_denied`, …).
    pub reason: String,
    /// `TCP`, `UDP`, `ICMP` or the IP protocol number.
    pub protocol: String,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    /// The MeshPolicies selecting the destination pod.
    pub policies: Vec<String>,
    /// The rule that admits the pair (when it needed authentication it did not have), as
    /// `namespace/policy spec.ingress[N]`.
    pub rule: Option<String>,
    /// The MutualAuth that set the destination's mode.
    pub mutual_auth: Option<String>,
    /// The MeshPolicies the verdict counts against: for `DROPPED`, those whose rules denied it
    /// or whose rule required the missing authentication; for `AUDIT`, the audited ones that
    /// would have dropped it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub by_policies: Vec<String>,
}

/// Names events with one snapshot's pods and policies (rebuilt when the snapshot changes).
pub struct FlowNamer {
    node: String,
    model: PolicyModel,
    pods: HashMap<Ipv4Addr, ObjectRef>,
}

impl FlowNamer {
    pub fn new(node: String, model: PolicyModel) -> Self {
        let pods = model.pods().filter_map(|p| Some((p.ip?, p.object_ref()))).collect();
        Self { node, model, pods }
    }

    /// The record of `event`, read when the clocks say `now_boot` and `now`.
    pub fn record(&self, event: &Event, now_boot: BootTime, now: SystemTime) -> FlowRecord {
        let end = |ip: Ipv4Addr, port: u16| {
            let pod = self.pods.get(&ip).and_then(|r| self.model.pod(r));
            FlowEnd { ip, port, pod: pod.map(|p| p.object_ref().to_string()), identity: pod.map(|p| self.model.spiffe_id(p).to_string()) }
        };
        let protocol = TableProtocol::from_ip_protocol(event.protocol);
        let source = self.pods.get(&event.src).map_or(Source::World, |r| Source::Pod(r.clone()));
        let explanation = self.pods.get(&event.dst).and_then(|dst| self.model.explain(&source, dst, protocol, event.dst_port).ok());
        let audit = event.counter == Counter::PassAudit;
        let asked_authentication = match event.kind {
            EventKind::AuthRequired | EventKind::Tag => true,
            EventKind::Audit => event.auth != AuthRequirement::None,
            _ => false,
        };
        // The strictest admitting rule: the one whose requirement the packet failed. A drop is
        // never an audited rule's (at an audited destination MutualAuth made it), and an
        // audit finding is only an audited rule's.
        let strictest = explanation
            .as_ref()
            .and_then(|e| e.allowed_by.iter().filter(|r| e.audited_by.contains(&r.mesh_policy) == audit).max_by_key(|r| r.authentication))
            .filter(|_| asked_authentication);
        let rule = strictest.map(|r| format!("{} {}", r.mesh_policy, r.rule));
        let by_policies = match &explanation {
            None => Vec::new(),
            // The rule counts when it asked for the authentication (else MutualAuth did).
            Some(_) if asked_authentication => {
                strictest.filter(|r| r.authentication == AuthRequirement::Required).map(|r| r.mesh_policy.to_string()).into_iter().collect()
            }
            Some(e) if event.counter == Counter::DropDenied => {
                e.selected_by.iter().filter(|p| !e.audited_by.contains(p)).map(ToString::to_string).collect()
            }
            Some(e) if event.kind == EventKind::Audit => e.audited_by.iter().map(ToString::to_string).collect(),
            _ => Vec::new(),
        };
        let verdict = match event.kind {
            _ if audit => "AUDIT",
            EventKind::Pass => "FORWARDED",
            _ if event.dropped => "DROPPED",
            _ => "PERMISSIVE",
        };
        let written = event.timestamp.to_system_time(now_boot, now);
        FlowRecord {
            time_unix_ms: written.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            node: self.node.clone(),
            verdict: verdict.to_owned(),
            reason: event.counter.name().to_owned(),
            protocol: match protocol {
                TableProtocol::Tcp => "TCP".to_owned(),
                TableProtocol::Udp => "UDP".to_owned(),
                TableProtocol::Icmp => "ICMP".to_owned(),
                TableProtocol::Other => event.protocol.to_string(),
            },
            source: end(event.src, event.src_port),
            destination: end(event.dst, event.dst_port),
            policies: explanation.as_ref().map(|e| e.selected_by.iter().map(ToString::to_string).collect()).unwrap_or_default(),
            rule,
            mutual_auth: explanation.and_then(|e| e.mutual_auth).map(|m| m.name.to_string()),
            by_policies,
        }
    }
}

/// The last records and their followers.
pub struct FlowLog {
    capacity: usize,
    ring: Mutex<VecDeque<Arc<FlowRecord>>>,
    followers: broadcast::Sender<Arc<FlowRecord>>,
}

impl Default for FlowLog {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl FlowLog {
    pub fn with_capacity(capacity: usize) -> Self {
        let (followers, _) = broadcast::channel(FOLLOWER_BACKLOG);
        Self { capacity: capacity.max(1), ring: Mutex::default(), followers }
    }

    pub fn push(&self, record: FlowRecord) {
        let record = Arc::new(record);
        {
            let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(record.clone());
        }
        // No follower: nothing to send.
        let _ = self.followers.send(record);
    }

    /// The last `n` records, oldest first.
    pub fn last(&self, n: usize) -> Vec<Arc<FlowRecord>> {
        let ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().skip(ring.len().saturating_sub(n)).cloned().collect()
    }

    /// Records from now on (subscribe before reading [`Self::last`]: a record in between is
    /// sent twice rather than lost).
    pub fn follow(&self) -> broadcast::Receiver<Arc<FlowRecord>> {
        self.followers.subscribe()
    }

    pub fn len(&self) -> usize {
        self.ring.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshauth_datapath::BootTime;
    use meshauth_policy::model::ModelConfig;
    use meshauth_policy::tables::AuthRequirement;

    fn event(kind: EventKind, counter: Counter, src: [u8; 4], dst: [u8; 4], port: u16) -> Event {
        Event {
            kind,
            counter,
            dropped: true,
            timestamp: BootTime::now(),
            src: src.into(),
            dst: dst.into(),
            src_port: 40000,
            dst_port: port,
            protocol: 6,
            ifindex: 7,
            src_identity: 0,
            dst_identity: 0,
            src_spiffe_id: 0,
            dst_spiffe_id: 0,
            auth: AuthRequirement::Required,
        }
    }

    fn namer() -> FlowNamer {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
        let snapshot = crate::inputs::snapshot_from_dir(&examples).expect("examples");
        FlowNamer::new("node-2".into(), PolicyModel::new(ModelConfig::default(), snapshot.inputs))
    }

    fn ip_of(namer: &FlowNamer, pod: &str) -> [u8; 4] {
        namer.pods.iter().find(|(_, r)| r.to_string() == pod).map(|(ip, _)| ip.octets()).expect("pod IP")
    }

    #[test]
    fn a_strict_drop_is_named_with_both_pods_the_reason_and_the_rule() {
        let namer = namer();
        let (order, payment) = (ip_of(&namer, "shop/order-0"), ip_of(&namer, "shop/payment-0"));
        let r = namer.record(&event(EventKind::AuthRequired, Counter::DropAuthMissing, order, payment, 8080), BootTime::now(), UNIX_EPOCH);
        assert_eq!((r.verdict.as_str(), r.reason.as_str(), r.protocol.as_str()), ("DROPPED", "drop_auth_missing", "TCP"));
        assert_eq!(r.source.pod.as_deref(), Some("shop/order-0"));
        assert_eq!(r.destination.pod.as_deref(), Some("shop/payment-0"));
        assert_eq!(r.source.identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/order"));
        assert_eq!(r.rule.as_deref(), Some("shop/payment-ingress spec.ingress[0]"));
        assert_eq!(r.mutual_auth.as_deref(), Some("shop/default"));
        // A denied source: the policies that select the destination, and no admitting rule.
        let frontend = ip_of(&namer, "shop/frontend-0");
        let d = namer.record(&event(EventKind::Denied, Counter::DropDenied, frontend, payment, 8080), BootTime::now(), UNIX_EPOCH);
        assert_eq!((d.policies.as_slice(), d.rule.as_deref()), (["shop/payment-ingress".to_owned()].as_slice(), None));
        // An address nobody has: no names, still a record.
        let w = namer.record(&event(EventKind::Denied, Counter::DropDenied, [192, 0, 2, 9], payment, 8080), BootTime::now(), UNIX_EPOCH);
        assert_eq!((w.source.pod.as_deref(), w.source.identity.as_deref()), (None, None));
    }

    #[test]
    fn an_audited_would_be_drop_is_an_audit_record_counted_against_the_audited_policy() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::inputs::examples_with(dir.path(), &[("50-audit.yaml", crate::inputs::DEBUG_AUDIT_POLICY)]).expect("manifests");
        let snapshot = crate::inputs::snapshot_from_dir(dir.path()).expect("manifests");
        let namer = FlowNamer::new("node-2".into(), PolicyModel::new(ModelConfig::default(), snapshot.inputs));
        let (order, debug) = (ip_of(&namer, "shop/order-0"), ip_of(&namer, "tools/debug"));
        let mut audit = event(EventKind::Audit, Counter::PassAudit, order, debug, 5353);
        (audit.dropped, audit.auth, audit.protocol) = (false, AuthRequirement::None, 17);
        let r = namer.record(&audit, BootTime::now(), UNIX_EPOCH);
        assert_eq!((r.verdict.as_str(), r.reason.as_str(), r.protocol.as_str()), ("AUDIT", "pass_audit", "UDP"));
        assert_eq!(r.by_policies, ["tools/debug-audit"]);
        assert_eq!(r.destination.pod.as_deref(), Some("tools/debug"));
        // The record's time is the event's, not the reading's.
        let written = BootTime(audit.timestamp.0 + 2_000_000_000);
        let later = namer.record(&audit, written, UNIX_EPOCH + std::time::Duration::from_secs(10));
        assert_eq!(later.time_unix_ms, 8_000);
    }

    #[tokio::test]
    async fn a_flood_keeps_the_ring_bounded_and_counts_what_a_slow_follower_missed() {
        let namer = namer();
        let log = FlowLog::with_capacity(100);
        let mut slow = log.follow();
        let e = event(EventKind::Denied, Counter::DropDenied, [192, 0, 2, 9], [10, 0, 0, 1], 80);
        for _ in 0..50_000 {
            log.push(namer.record(&e, BootTime::now(), UNIX_EPOCH));
        }
        assert_eq!(log.len(), 100, "the ring holds its capacity, not the flood");
        assert_eq!(log.last(10).len(), 10);
        match slow.recv().await {
            Err(broadcast::error::RecvError::Lagged(missed)) => assert!(missed >= 50_000 - FOLLOWER_BACKLOG as u64, "{missed}"),
            other => panic!("a follower 50,000 records behind did not lag: {other:?}"),
        }
        assert!(slow.recv().await.is_ok(), "it goes on with what is left");
    }
}
