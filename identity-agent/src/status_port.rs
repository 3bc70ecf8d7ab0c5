//! The agent's status port (4251): `/metrics`, `/healthz` and `/readyz` to anyone, and to
//! this node's own clients only `/explain` and `/flows`, which name pods, identities and
//! policies. It reads the metrics, the explainer and the flow log; it changes nothing.

use crate::explain::{ExplainQuery, Explainer};
use crate::flows::{DEFAULT_CAPACITY, FlowLog, FlowRecord};
use crate::metrics::AgentMetrics;
use axum::Router;
use axum::extract::{ConnectInfo, Query};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

/// Why the status port could not start.
#[derive(Debug, thiserror::Error)]
pub enum StatusPortError {
    #[error("cannot listen on {addr} for metrics: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
}

/// Serves `/metrics`, `/readyz`, `/healthz` and, to loopback clients, `local`'s
/// `/explain` (once set) and `/flows`; returns the bound address.
pub async fn serve(
    metrics: Arc<AgentMetrics>,
    addr: SocketAddr,
    local: Arc<LocalApi>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), StatusPortError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|error| StatusPortError::Bind { addr, error })?;
    let bound = listener.local_addr().map_err(|error| StatusPortError::Bind { addr, error })?;
    let readiness = metrics.clone();
    let health = metrics.clone();
    let flow_metrics = metrics.clone();
    let flows = local.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics.encode();
                async move { ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body) }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let healthy = readiness.is_healthy();
                let reason = readiness.not_ready_reason();
                async move {
                    match (healthy, reason) {
                        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting".to_owned()).into_response(),
                        (true, Some(reason)) => (StatusCode::SERVICE_UNAVAILABLE, reason).into_response(),
                        (true, None) => (StatusCode::OK, "ok".to_owned()).into_response(),
                    }
                }
            }),
        )
        .route(
            "/explain",
            get(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, Query(query): Query<ExplainQuery>| async move {
                // It names pods, identities and policies: this node's own processes only
                // (`meshauthctl explain` on the node, or through `kubectl exec`).
                if !peer.ip().to_canonical().is_loopback() {
                    return (StatusCode::FORBIDDEN, "/explain answers clients on this node only\n").into_response();
                }
                let Some(explainer) = local.explainer.get() else {
                    return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
                };
                match explainer.explain(&query).await {
                    Ok(report) => axum::Json(report).into_response(),
                    Err(e) if e.is_not_found() => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
                    Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
                }
            }),
        )
        .route(
            "/flows",
            get(move |ConnectInfo(peer): ConnectInfo<SocketAddr>, Query(query): Query<FlowsQuery>| {
                let (flows, metrics) = (flows.clone(), flow_metrics.clone());
                async move {
                    if !peer.ip().to_canonical().is_loopback() {
                        return (StatusCode::FORBIDDEN, "/flows answers clients on this node only\n").into_response();
                    }
                    flow_lines(&flows.flows, metrics, &query).into_response()
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let ok = health.is_healthy();
                async move {
                    if ok { (StatusCode::OK, "ok").into_response() } else { (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response() }
                }
            }),
        );
    Ok((
        bound,
        tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await {
                tracing::error!(%error, "metrics server stopped");
            }
        }),
    ))
}

/// What the metrics port serves to this node's own clients only: it names pods, identities
/// and policies.
#[derive(Default)]
pub struct LocalApi {
    /// Set once the agent has its inputs.
    pub explainer: OnceLock<Explainer>,
    pub flows: FlowLog,
}

/// `/flows?last=N&follow=true`.
#[derive(Debug, Clone, Deserialize)]
pub struct FlowsQuery {
    #[serde(default)]
    pub last: Option<usize>,
    #[serde(default)]
    pub follow: bool,
}

/// The flow records as JSON lines: the last ones, then (following) `{"following":true}` and
/// each new one; a follower that fell behind gets `{"lost":N}` where records are missing.
fn flow_lines(log: &FlowLog, metrics: Arc<AgentMetrics>, query: &FlowsQuery) -> axum::body::Body {
    fn line(record: &FlowRecord) -> String {
        // Plain data with string keys: serialization cannot fail.
        let mut l = serde_json::to_string(record).unwrap_or_default();
        l.push('\n');
        l
    }
    let follower = query.follow.then(|| log.follow());
    let mut backlog: Vec<Result<String, std::convert::Infallible>> =
        log.last(query.last.unwrap_or(DEFAULT_CAPACITY)).iter().map(|r| Ok(line(r))).collect();
    if follower.is_some() {
        // Where the held records end and the new ones begin.
        backlog.push(Ok("{\"following\":true}\n".to_owned()));
    }
    let head = futures::stream::iter(backlog);
    let Some(follower) = follower else { return axum::body::Body::from_stream(head) };
    let tail = futures::stream::unfold((follower, metrics), |(mut rx, metrics)| async move {
        match rx.recv().await {
            Ok(record) => Some((Ok(line(&record)), (rx, metrics))),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                metrics.flow_records_lost.inc_by(n);
                Some((Ok(format!("{{\"lost\":{n}}}\n")), (rx, metrics)))
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    axum::body::Body::from_stream(futures::StreamExt::chain(head, tail))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth_manager::fake::{FakeTable, NoObserver};
    use crate::auth_manager::{self, AuthFailure, AuthManagerConfig, Authenticator, BoxFuture, Proof};
    use crate::explain::Explainer;
    use crate::plan::NodeView;
    use meshauth_policy::model::ModelConfig;
    use std::sync::RwLock;
    use std::time::Duration;

    /// Never asked: the test wants no pair authenticated.
    struct NoHandshakes;

    impl Authenticator for NoHandshakes {
        fn authenticate<'a>(&'a self, _: &'a str, _: &'a str, addr: SocketAddr) -> BoxFuture<'a, Result<Proof, AuthFailure>> {
            Box::pin(async move {
                Err(AuthFailure { reason: "unreachable", message: format!("{addr}"), refused: false, until_local_svid: false })
            })
        }
    }

    async fn get_from(peer: std::net::IpAddr, addr: SocketAddr, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(peer, 0)).expect("bind");
        let mut s = socket.connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn explain_answers_this_node_only_and_names_the_rule() {
        let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
        let snapshot = crate::inputs::snapshot_from_dir(&examples).expect("examples");
        let (_tx, snapshots) = tokio::sync::watch::channel(Arc::new(snapshot));
        let manager =
            auth_manager::spawn(AuthManagerConfig::default(), Arc::new(NoHandshakes), Box::new(FakeTable::default()), Arc::new(NoObserver));
        let local: Arc<LocalApi> = Arc::default();
        let m = AgentMetrics::new();
        let (bound, _server) = serve(m.clone(), "0.0.0.0:0".parse().expect("addr"), local.clone()).await.expect("serve");
        let here = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port());
        let path = "/explain?from=shop/order-0&to=shop/payment-0&port=8080";
        assert!(get_from(here.ip(), here, path).await.starts_with("HTTP/1.1 503"), "answers before the agent is ready");
        let _ = local.explainer.set(Explainer {
            node_name: "node-2".into(),
            config: ModelConfig::default(),
            snapshots,
            view: Arc::new(RwLock::new(NodeView::default())),
            manager,
            metrics: m.clone(),
        });
        let answer = get_from(here.ip(), here, path).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let body: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)).expect("JSON");
        assert_eq!(body["allowedBy"][0]["meshPolicy"], "shop/payment-ingress", "{body}");
        assert_eq!(body["proofs"], serde_json::json!([]), "payment runs on node-2, and the pair has no proof: {body}");
        assert!(get_from(here.ip(), here, "/explain?from=shop/nobody&to=shop/payment-0&port=80").await.starts_with("HTTP/1.1 404"));
        assert!(
            get_from(here.ip(), here, "/explain?from=shop/order-0&to=shop/payment-0&port=80&protocol=sctp")
                .await
                .starts_with("HTTP/1.1 400")
        );
        // From another address of this machine (what another host's connection looks like):
        // refused, it names pods and policies.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        probe.connect("192.0.2.1:9").expect("a route off this machine");
        let outside = probe.local_addr().expect("local address").ip();
        assert!(!outside.is_loopback(), "{outside}");
        let refused = get_from(outside, SocketAddr::new(outside, bound.port()), path).await;
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(get_from(outside, SocketAddr::new(outside, bound.port()), "/flows").await.starts_with("HTTP/1.1 403"));

        // /flows: the last records as JSON lines, then (following) each new one.
        let record = |reason: &str| crate::flows::FlowRecord {
            time_unix_ms: 1,
            node: "node-2".into(),
            verdict: "DROPPED".into(),
            reason: reason.into(),
            protocol: "TCP".into(),
            source: crate::flows::FlowEnd { ip: [10, 0, 0, 1].into(), port: 1, pod: Some("shop/order-0".into()), identity: None },
            destination: crate::flows::FlowEnd { ip: [10, 0, 0, 2].into(), port: 8080, pod: Some("shop/payment-0".into()), identity: None },
            policies: vec![],
            rule: None,
            mutual_auth: None,
            by_policies: vec![],
        };
        local.flows.push(record("drop_auth_missing"));
        let listed = get_from(here.ip(), here, "/flows?last=10").await;
        let body = listed.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(body.contains("\"reason\":\"drop_auth_missing\""), "{listed}");
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut follower = tokio::io::BufReader::new(tokio::net::TcpStream::connect(here).await.expect("connect"));
        follower.get_mut().write_all(b"GET /flows?last=0&follow=true HTTP/1.0\r\n\r\n").await.expect("write");
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            follower.read_line(&mut line).await.expect("header");
        }
        line.clear();
        follower.read_line(&mut line).await.expect("marker");
        assert_eq!(line, "{\"following\":true}\n");
        local.flows.push(record("drop_denied"));
        line.clear();
        tokio::time::timeout(Duration::from_secs(5), follower.read_line(&mut line)).await.expect("a followed record").expect("read");
        let followed: crate::flows::FlowRecord = serde_json::from_str(&line).expect("a JSON line");
        assert_eq!(followed.reason, "drop_denied");
    }
}
