//! The HTTPS server: `POST /validate`, `GET /healthz`, `GET /metrics`. Bad requests get a clear
//! 4xx with a one-line plain-text reason: wrong method 405, wrong content type 415, oversized
//! body 413, malformed JSON, wrong kind or version, missing object 400, unknown path 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use meshauth_policy::model::ModelConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::{self, Subject};
use crate::cluster::Cluster;
use crate::metrics::{KindLabel, Metrics, OperationLabel, ResultLabel};
use crate::tls::CertStore;

/// How long open connections get to finish after shutdown starts.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the handlers share.
pub struct App {
    pub mesh: ModelConfig,
    pub cluster: Cluster,
    pub metrics: Arc<Metrics>,
    pub store: Arc<CertStore>,
    pub max_body_bytes: usize,
}

/// Every route of the HTTPS listener.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/validate", post(validate).fallback(post_only))
        .merge(ops_routes())
        .fallback(not_found)
        .with_state(app)
}

/// `/healthz` and `/metrics` only, for the optional plain-HTTP listener.
pub fn ops_router(app: Arc<App>) -> Router {
    ops_routes().fallback(not_found).with_state(app)
}

fn ops_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(healthz).fallback(get_only))
        .route("/metrics", get(metrics).fallback(get_only))
}

fn text(status: StatusCode, message: impl Into<String>) -> Response {
    let mut body = message.into();
    body.push('\n');
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

impl App {
    fn refuse(&self, status: StatusCode, message: String, started: Instant) -> Response {
        debug!(%status, reason = %message, "bad admission request");
        self.metrics.bad_request(status.as_u16());
        self.metrics.admission(KindLabel::Unknown, OperationLabel::Unknown, ResultLabel::BadRequest, started.elapsed());
        text(status, message)
    }
}

async fn validate(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    // Refuse what is not JSON, or too big, before reading the body.
    let content_type = match headers.get(header::CONTENT_TYPE).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) => {
            return app.refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the Content-Type header is not text; send application/json".into(), started);
        }
    };
    let wrong_type = match content_type {
        None => Some(admission::DecodeError::NoContentType),
        Some(ct) if !admission::is_json(ct) => Some(admission::DecodeError::ContentType(admission::truncate(ct, 100))),
        Some(_) => None,
    };
    if let Some(err) = wrong_type {
        return app.refuse(err.status(), err.to_string(), started);
    }
    let too_big = || format!("the request body is larger than the limit of {} bytes", app.max_body_bytes);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes as u64) {
        return app.refuse(StatusCode::PAYLOAD_TOO_LARGE, too_big(), started);
    }
    let bytes = match Limited::new(body, app.max_body_bytes).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return app.refuse(StatusCode::PAYLOAD_TOO_LARGE, too_big(), started);
        }
        Err(err) => return app.refuse(StatusCode::BAD_REQUEST, format!("cannot read the request body: {err}"), started),
    };
    let review = match admission::decode(content_type, &bytes) {
        Ok(review) => review,
        Err(err) => return app.refuse(err.status(), err.to_string(), started),
    };

    let mut findings = admission::check(&review.subject, &app.mesh);
    if findings.errors.is_empty() {
        findings.warnings.extend(app.cluster.warnings(&review).await);
    }
    let response = admission::respond(&review, &findings);
    let kind = review.kind.label();
    let operation = review.operation_label();
    let result = if response.allowed { ResultLabel::Allowed } else { ResultLabel::Denied };
    let object = review.object_name();
    match (&review.subject, response.allowed) {
        (Subject::Skip(why), _) => debug!(kind = review.kind.as_str(), %object, ?operation, why, "allowed unchecked"),
        (_, false) => info!(kind = review.kind.as_str(), %object, ?operation, reason = %response.result.message, "denied"),
        (_, true) => info!(
            kind = review.kind.as_str(),
            %object,
            ?operation,
            warnings = response.warnings.as_ref().map_or(0, Vec::len),
            dry_run = review.request.dry_run,
            "allowed"
        ),
    }
    let body = match admission::encode(response) {
        Ok(body) => body,
        Err(err) => {
            warn!(error = %err, "cannot encode the AdmissionReview response");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode the response");
        }
    };
    app.metrics.admission(kind, operation, result, started.elapsed());
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn post_only(State(app): State<Arc<App>>) -> Response {
    let started = Instant::now();
    let mut response = app.refuse(StatusCode::METHOD_NOT_ALLOWED, "/validate takes POST of an AdmissionReview".into(), started);
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

async fn get_only() -> Response {
    let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "this path takes GET");
    response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
    response
}

async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "not found: the webhook serves POST /validate, GET /healthz and GET /metrics")
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.store.is_ready() {
        text(StatusCode::OK, "ok")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "no serving certificate loaded yet")
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    match app.metrics.encode() {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"),
    }
}

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Bound on the TLS handshake.
    pub handshake_timeout: Duration,
    /// After this, a connection is closed gracefully (HTTP/2 GOAWAY, HTTP/1 close after the
    /// current response) so clients reconnect: spreads load over replicas and makes every
    /// client pick up a new serving certificate. `None`: connections live as long as clients
    /// keep them.
    pub max_age: Option<Duration>,
}

/// Accepts TLS connections on `listener` and serves `router` on each (HTTP/1.1 or HTTP/2 by
/// ALPN) until `shutdown`; then stops accepting and gives open connections [`DRAIN_TIMEOUT`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(conn) => conn,
                    Err(err) => {
                        warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                connections.spawn(serve_connection(tcp, peer, acceptor.clone(), router.clone(), limits, shutdown.clone()));
            }
            _ = crate::wait_for_shutdown(&mut shutdown) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        debug!(open = connections.len(), "connections still open after the drain timeout are closed");
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            debug!(%peer, error = %err, "TLS handshake failed");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let aged = async {
        match limits.max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(aged);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = &mut aged, if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = crate::wait_for_shutdown(&mut shutdown), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Serves `router` over plain HTTP until `shutdown`.
pub async fn serve_plain(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move { crate::wait_for_shutdown(&mut shutdown).await })
        .await;
    if let Err(err) = result {
        warn!(error = %err, "metrics listener failed");
    }
}
