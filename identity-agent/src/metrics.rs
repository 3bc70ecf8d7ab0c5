//! The agent's Prometheus metrics and its `/metrics` + `/healthz` endpoint.
//!
//! Handshake latency and results, auth entries, datapath verdicts and drops by reason, seconds
//! to SVID expiry per identity, and events lost — what Cilium's mutual auth did not show.

use crate::auth_manager::{AuthFailure, AuthObserver};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr} for metrics: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

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
    last_datapath: Mutex<BTreeMap<String, u64>>,
    healthy: AtomicBool,
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
            last_datapath: Mutex::new(BTreeMap::new()),
            healthy: AtomicBool::new(false),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register("handshakes", "Mutual handshakes by result and reason", m.handshakes.clone());
            r.register("handshake_duration_seconds", "Duration of mutual handshakes", m.handshake_duration.clone());
            r.register("auth_entries", "Authenticated pairs in the auth map", m.auth_entries.clone());
            r.register("datapath_packets", "Packets by datapath verdict and drop reason", m.datapath_packets.clone());
            r.register("svid_expiry_seconds", "Seconds until each local SVID expires", m.svid_expiry_seconds.clone());
            r.register("auth_required_events", "Auth-required events read from the datapath", m.auth_required_events.clone());
            r.register("events_lost", "Datapath events that could not be read", m.events_lost.clone());
        }
        Arc::new(m)
    }

    /// Marks the agent healthy (maps loaded, inputs synced) or not.
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::Relaxed);
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

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }

    /// Serves `/metrics` and `/healthz`; returns the bound address.
    pub async fn serve(self: Arc<Self>, addr: SocketAddr) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), MetricsError> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|error| MetricsError::Bind { addr, error })?;
        let bound = listener.local_addr().map_err(|error| MetricsError::Bind { addr, error })?;
        let metrics = self.clone();
        let health = self;
        let app = Router::new()
            .route(
                "/metrics",
                get(move || {
                    let body = metrics.encode();
                    async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body) }
                }),
            )
            .route(
                "/healthz",
                get(move || {
                    let ok = health.healthy.load(Ordering::Relaxed);
                    async move {
                        if ok { (StatusCode::OK, "ok").into_response() } else { (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response() }
                    }
                }),
            );
        Ok((bound, tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::error!(%error, "metrics server stopped");
            }
        })))
    }
}

impl crate::handshake::HandshakeObserver for AgentMetrics {
    fn served(&self, result: &Result<crate::handshake::Authenticated, crate::handshake::HandshakeError>, took: Duration) {
        let labels = match result {
            Ok(_) => HandshakeLabels { side: "server", result: "success", reason: "" },
            Err(e) => HandshakeLabels { side: "server", result: "failure", reason: e.reason() },
        };
        self.handshakes.get_or_create(&labels).inc();
        self.handshake_duration.observe(took.as_secs_f64());
    }
}

impl AuthObserver for AgentMetrics {
    fn handshake(&self, result: Result<(), &AuthFailure>, duration: Duration) {
        let labels = match result {
            Ok(()) => HandshakeLabels { side: "client", result: "success", reason: "" },
            Err(f) => HandshakeLabels { side: "client", result: "failure", reason: f.reason },
        };
        self.handshakes.get_or_create(&labels).inc();
        self.handshake_duration.observe(duration.as_secs_f64());
    }

    fn entries(&self, count: usize) {
        self.auth_entries.set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_the_metrics_a_user_looks_for() {
        let m = AgentMetrics::new();
        m.handshake(Ok(()), Duration::from_millis(2));
        m.handshake(Err(&AuthFailure { reason: "wrong_identity", message: "x".into() }), Duration::from_millis(1));
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

        let (addr, _server) = m.clone().serve("127.0.0.1:0".parse().expect("addr")).await.expect("serve");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 503"), "not healthy before start-up ends");
        m.set_healthy(true);
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/metrics").await.contains("meshauth_agent_auth_entries 3"));
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
