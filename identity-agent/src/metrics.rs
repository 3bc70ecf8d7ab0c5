//! The agent's Prometheus metrics and the health and readiness they imply (alive: maps loaded,
//! inputs synced; ready: also the last policy apply put everything into the maps); served by
//! [`crate::status_port`].
//!
//! Handshake latency and results, auth entries, datapath verdicts and drops by reason, seconds
//! to SVID expiry per identity, and events lost — what Cilium's mutual auth did not show.

use crate::flows::FlowRecord;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `client`: this agent dialed (for its destination pod); `server`: a peer dialed it.
    pub side: &'static str,
    pub result: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CounterLabels {
    pub counter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub spiffe_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `namespace/name` of the MeshPolicy, or [`OTHER_POLICIES`] past [`MAX_POLICY_LABELS`].
    pub policy: String,
}

/// MeshPolicies named in the per-policy series; the rest are counted under [`OTHER_POLICIES`],
/// so a tenant creating policies cannot grow the agent's memory or the scrape without bound.
pub const MAX_POLICY_LABELS: usize = 512;
/// The `policy` label of everything past [`MAX_POLICY_LABELS`].
pub const OTHER_POLICIES: &str = "(other)";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    /// `complete`, `degraded` (some destinations denied or endpoints left out: fail closed)
    /// or `failed` (the maps could not be read or written).
    pub result: &'static str,
}

/// Every metric of the agent.
pub struct AgentMetrics {
    registry: Mutex<Registry>,
    pub handshakes: Family<HandshakeLabels, Counter>,
    pub handshake_duration: Histogram,
    pub auth_entries: Gauge,
    pub datapath_packets: Family<CounterLabels, Counter>,
    pub svid_expiry_seconds: Family<IdentityLabels, Gauge>,
    pub auth_required_events: Counter,
    pub events_lost: Counter,
    pub flow_records_lost: Counter,
    /// Flow records of drops, by the MeshPolicy they count against.
    pub policy_drops: Family<PolicyLabels, Counter>,
    /// Flow records of what an audited MeshPolicy would have dropped, by that policy.
    pub audit_would_deny: Family<PolicyLabels, Counter>,
    /// The label values of `policy_drops` and `audit_would_deny` in use.
    policies: Mutex<std::collections::BTreeSet<String>>,
    pub policy_applies: Family<ApplyLabels, Counter>,
    pub policy_denied_destinations: Gauge,
    /// Pods of this node with an address in the last applied plan, guarded or not yet.
    pub local_pods: Gauge,
    last_datapath: Mutex<BTreeMap<String, u64>>,
    healthy: AtomicBool,
    /// Why the agent is not ready although healthy (the last apply was not complete).
    not_ready: Mutex<Option<String>>,
    /// Why the connection tagger is not on every uplink (a kernel without tcx links): this
    /// node's pods cannot prove their connections to other nodes, so the agent says it is not
    /// ready to enforce Strict rather than pass for ready.
    tagger_problem: Mutex<Option<String>>,
    /// The label values of `svid_expiry_seconds` in use.
    identities: Mutex<std::collections::BTreeSet<String>>,
}

impl AgentMetrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("meshauth_agent")),
            handshakes: Family::default(),
            handshake_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            auth_entries: Gauge::default(),
            datapath_packets: Family::default(),
            svid_expiry_seconds: Family::default(),
            auth_required_events: Counter::default(),
            events_lost: Counter::default(),
            flow_records_lost: Counter::default(),
            policy_drops: Family::default(),
            audit_would_deny: Family::default(),
            policies: Mutex::new(std::collections::BTreeSet::new()),
            policy_applies: Family::default(),
            policy_denied_destinations: Gauge::default(),
            local_pods: Gauge::default(),
            last_datapath: Mutex::new(BTreeMap::new()),
            healthy: AtomicBool::new(false),
            not_ready: Mutex::new(None),
            tagger_problem: Mutex::new(None),
            identities: Mutex::new(std::collections::BTreeSet::new()),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register("handshakes", "Mutual handshakes by result and reason", m.handshakes.clone());
            r.register("handshake_duration_seconds", "Duration of mutual handshakes", m.handshake_duration.clone());
            r.register("auth_entries", "Authenticated pairs in the auth map", m.auth_entries.clone());
            r.register("datapath_packets", "Packets by datapath verdict and drop reason", m.datapath_packets.clone());
            r.register("svid_expiry_seconds", "Seconds until each local SVID expires", m.svid_expiry_seconds.clone());
            r.register("auth_required_events", "Auth-required events read from the datapath", m.auth_required_events.clone());
            r.register("events_lost", "Datapath events that could not be read", m.events_lost.clone());
            r.register("flow_records_lost", "Flow records a follower of /flows fell too far behind to get", m.flow_records_lost.clone());
            r.register("policy_applies", "Policy applies to the maps by result", m.policy_applies.clone());
            r.register(
                "policy_drops",
                "Reported drops by the MeshPolicy they count against (from flow records: the datapath's event budget applies)",
                m.policy_drops.clone(),
            );
            r.register(
                "audit_would_deny",
                "Connections an audited MeshPolicy would have dropped, passed, by policy (from flow records)",
                m.audit_would_deny.clone(),
            );
            r.register(
                "policy_denied_destinations",
                "Destination identities whose policy did not fit in the map: denied everything (audited ones: everything reported)",
                m.policy_denied_destinations.clone(),
            );
            r.register("local_pods", "Pods of this node with an address in the last applied policy", m.local_pods.clone());
        }
        Arc::new(m)
    }

    /// Counts a flow record against the MeshPolicies it names.
    pub fn count_flow(&self, record: &FlowRecord) {
        let family = match record.verdict.as_str() {
            "DROPPED" => &self.policy_drops,
            "AUDIT" => &self.audit_would_deny,
            _ => return,
        };
        for policy in &record.by_policies {
            let label = {
                let mut known = self.policies.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if known.contains(policy) || known.len() < MAX_POLICY_LABELS {
                    known.insert(policy.clone());
                    policy.clone()
                } else {
                    OTHER_POLICIES.to_owned()
                }
            };
            family.get_or_create(&PolicyLabels { policy: label }).inc();
        }
    }

    /// Marks the agent healthy (maps loaded, inputs synced) or not.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
    }

    /// Records one policy apply: `Ok(denied)` wrote the tables, denying `denied` destinations
    /// whole when they did not fit (`left_out` endpoints of other nodes missing); `Err` could
    /// not. Anything but a complete apply makes `/readyz` fail with the reason.
    pub fn observe_apply(&self, outcome: Result<(usize, usize), &str>) {
        let (result, reason) = match outcome {
            Ok((0, 0)) => ("complete", None),
            Ok((denied, left_out)) => (
                "degraded",
                Some(format!(
                    "policy did not fit in the maps: {denied} destinations deny everything, {left_out} endpoints of other nodes left out"
                )),
            ),
            Err(error) => ("failed", Some(format!("policy apply failed: {error}"))),
        };
        self.policy_applies.get_or_create(&ApplyLabels { result }).inc();
        if let Ok((denied, _)) = outcome {
            self.policy_denied_destinations.set(i64::try_from(denied).unwrap_or(i64::MAX));
        }
        if let Ok(mut r) = self.not_ready.lock() {
            *r = reason;
        }
    }

    /// Keeps the per-identity series of identities still on this node only: a pod's SPIFFE ID
    /// that left must not stay a label value forever (nor grow the exposition without bound).
    pub fn retain_identities(&self, present: &std::collections::BTreeSet<String>) {
        let Ok(mut known) = self.identities.lock() else { return };
        known.retain(|id| {
            let keep = present.contains(id);
            if !keep {
                self.svid_expiry_seconds.remove(&IdentityLabels { spiffe_id: id.clone() });
            }
            keep
        });
        known.extend(present.iter().cloned());
    }

    /// Folds the datapath's cumulative counters in (they only grow; a smaller value means the
    /// maps were recreated, and the new value counts from zero).
    pub fn observe_datapath_counters(&self, counters: impl IntoIterator<Item = (String, u64)>) {
        let Ok(mut last) = self.last_datapath.lock() else { return };
        for (name, value) in counters {
            let previous = last.insert(name.clone(), value).unwrap_or(0);
            let delta = if value >= previous { value - previous } else { value };
            self.datapath_packets.get_or_create(&CounterLabels { counter: name }).inc_by(delta);
        }
    }

    /// Records why the connection tagger is missing from an uplink (`None`: it is on all).
    pub fn set_tagger_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.tagger_problem.lock() {
            *p = problem;
        }
    }

    /// Why the agent is not ready although alive: the last apply did not fit the maps, or the
    /// connection tagger could not be attached.
    pub fn not_ready_reason(&self) -> Option<String> {
        let apply = self.not_ready.lock().ok().and_then(|r| r.clone());
        let tagger = self.tagger_problem.lock().ok().and_then(|r| r.clone());
        match (apply, tagger) {
            (Some(a), Some(t)) => Some(format!("{a}; {t}")),
            (a, t) => a.or(t),
        }
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }

    /// Alive: maps loaded, inputs synced.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth_manager::{AuthFailure, AuthObserver};
    use std::net::SocketAddr;
    use std::time::Duration;

    #[tokio::test]
    async fn serves_the_metrics_a_user_looks_for() {
        let m = AgentMetrics::new();
        m.handshake(Ok(()), Duration::from_millis(2));
        m.handshake(
            Err(&AuthFailure { reason: "wrong_identity", message: "x".into(), refused: true, until_local_svid: false }),
            Duration::from_millis(1),
        );
        m.entries(3);
        m.observe_datapath_counters([("drop_auth_missing".to_owned(), 5)]);
        m.observe_datapath_counters([("drop_auth_missing".to_owned(), 7)]);
        m.svid_expiry_seconds.get_or_create(&IdentityLabels { spiffe_id: "spiffe://td/a".into() }).set(30);
        let text = m.encode();
        for want in [
            "meshauth_agent_handshakes_total{side=\"client\",result=\"success\",reason=\"\"} 1",
            "meshauth_agent_handshakes_total{side=\"client\",result=\"failure\",reason=\"wrong_identity\"} 1",
            "meshauth_agent_auth_entries 3",
            "meshauth_agent_datapath_packets_total{counter=\"drop_auth_missing\"} 7",
            "meshauth_agent_svid_expiry_seconds{spiffe_id=\"spiffe://td/a\"} 30",
            "meshauth_agent_handshake_duration_seconds_count 2",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }

        let (addr, _server) =
            crate::status_port::serve(m.clone(), "127.0.0.1:0".parse().expect("addr"), Arc::default()).await.expect("serve");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"), "not healthy before start-up ends");
        m.set_healthy(true);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.contains("meshauth_agent_auth_entries 3"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    }

    /// Every metric the chart's Grafana dashboard queries is one the agent exports.
    #[test]
    fn the_dashboard_queries_only_metrics_the_agent_exports() {
        let dashboard = include_str!("../../config/helm/meshauth/dashboards/meshauth.json");
        let m = AgentMetrics::new();
        m.handshake(Ok(()), Duration::from_millis(2));
        m.entries(1);
        m.observe_datapath_counters([("drop_denied".to_owned(), 1)]);
        m.svid_expiry_seconds.get_or_create(&IdentityLabels { spiffe_id: "spiffe://td/a".into() }).set(30);
        m.observe_apply(Ok((0, 0)));
        m.policy_drops.get_or_create(&PolicyLabels { policy: "shop/payment-ingress".into() }).inc();
        m.audit_would_deny.get_or_create(&PolicyLabels { policy: "tools/debug-audit".into() }).inc();
        let text = m.encode();
        let mut names: Vec<&str> = dashboard
            .match_indices("meshauth_agent_")
            .map(|(i, _)| {
                let rest = &dashboard[i..];
                &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        assert!(names.len() >= 8, "{names:?}");
        for name in names {
            assert!(text.lines().any(|l| l.starts_with(name)), "the dashboard queries {name}, which the agent does not export:\n{text}");
        }
    }

    #[tokio::test]
    async fn an_apply_that_did_not_fit_fails_readiness_and_is_counted() {
        let m = AgentMetrics::new();
        m.set_healthy(true);
        let (addr, _server) =
            crate::status_port::serve(m.clone(), "127.0.0.1:0".parse().expect("addr"), Arc::default()).await.expect("serve");
        m.observe_apply(Ok((2, 0)));
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("2 destinations deny everything"), "{ready}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"), "alive: the kubelet must not restart it");
        let text = m.encode();
        assert!(text.contains("meshauth_agent_policy_applies_total{result=\"degraded\"} 1"), "{text}");
        assert!(text.contains("meshauth_agent_policy_denied_destinations 2"), "{text}");
        m.observe_apply(Err("endpoints: operation not permitted"));
        assert!(get(addr, "/readyz").await.contains("policy apply failed"));
        m.observe_apply(Ok((0, 0)));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert_eq!(m.policy_denied_destinations.get(), 0);
    }

    #[tokio::test]
    async fn a_tagger_missing_from_an_uplink_fails_readiness_naming_the_kernel_feature() {
        let m = AgentMetrics::new();
        m.set_healthy(true);
        let (addr, _server) =
            crate::status_port::serve(m.clone(), "127.0.0.1:0".parse().expect("addr"), Arc::default()).await.expect("serve");
        let missing = meshauth_datapath::loader::DatapathError::UplinkNeedsTcx { name: "eth0".into() };
        m.set_tagger_problem(Some(format!("connection tagger not on uplink eth0: {missing}")));
        let ready = get(addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503") && ready.contains("needs tcx links (Linux 6.6 or later"), "{ready}");
        m.observe_apply(Ok((1, 0)));
        let both = get(addr, "/readyz").await;
        assert!(both.contains("1 destinations deny everything") && both.contains("tcx"), "both reasons named: {both}");
        m.observe_apply(Ok((0, 0)));
        m.set_tagger_problem(None);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
    }

    #[test]
    fn drops_and_audited_would_be_drops_are_counted_by_policy_within_a_bounded_label_set() {
        let m = AgentMetrics::new();
        let record = |verdict: &str, policy: String| crate::flows::FlowRecord {
            time_unix_ms: 1,
            node: "node-2".into(),
            verdict: verdict.into(),
            reason: "pass_audit".into(),
            protocol: "TCP".into(),
            source: crate::flows::FlowEnd { ip: [10, 0, 0, 1].into(), port: 1, pod: None, identity: None },
            destination: crate::flows::FlowEnd { ip: [10, 0, 0, 2].into(), port: 8080, pod: None, identity: None },
            policies: vec![policy.clone()],
            rule: None,
            mutual_auth: None,
            by_policies: vec![policy],
        };
        m.count_flow(&record("AUDIT", "shop/pay-audit".into()));
        m.count_flow(&record("AUDIT", "shop/pay-audit".into()));
        m.count_flow(&record("DROPPED", "shop/payment-ingress".into()));
        m.count_flow(&record("PERMISSIVE", "shop/ignored".into()));
        let text = m.encode();
        assert!(text.contains("meshauth_agent_audit_would_deny_total{policy=\"shop/pay-audit\"} 2"), "{text}");
        assert!(text.contains("meshauth_agent_policy_drops_total{policy=\"shop/payment-ingress\"} 1"), "{text}");
        assert!(!text.contains("shop/ignored"), "{text}");
        // A flood of policy names: the label set stops growing, the rest counts as other.
        for i in 0..2 * MAX_POLICY_LABELS {
            m.count_flow(&record("AUDIT", format!("t/p{i}")));
        }
        let text = m.encode();
        let series = text.lines().filter(|l| l.starts_with("meshauth_agent_audit_would_deny_total{")).count();
        assert!(series <= MAX_POLICY_LABELS + 1, "{series} series: at most the named policies plus the other one");
        assert!(text.contains(&format!("policy=\"{OTHER_POLICIES}\"")), "{text}");
    }

    #[test]
    fn identities_that_left_the_node_leave_the_metrics() {
        let m = AgentMetrics::new();
        let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<std::collections::BTreeSet<_>>();
        for id in ["spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"] {
            m.svid_expiry_seconds.get_or_create(&IdentityLabels { spiffe_id: id.into() }).set(30);
        }
        m.retain_identities(&ids(&["spiffe://td/ns/a/sa/x", "spiffe://td/ns/b/sa/y"]));
        m.retain_identities(&ids(&["spiffe://td/ns/a/sa/x"]));
        let text = m.encode();
        assert!(text.contains("spiffe://td/ns/a/sa/x"), "{text}");
        assert!(!text.contains("spiffe://td/ns/b/sa/y"), "a departed identity is still a label value:\n{text}");
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }
}
