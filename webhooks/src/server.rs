//! The HTTPS server: `POST /validate`, `GET /healthz`, `GET /metrics`. Bad requests get a clear
//! 4xx with a one-line plain-text reason: wrong method 405, wrong content type 415, oversized
//! body 413, malformed JSON, wrong kind or version, missing object 400, unknown path 404.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use meshauth_policy::model::ModelConfig;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
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
    /// Bound on receiving a request body; a slower one gets 408.
    pub body_timeout: Duration,
}

/// Every route of the HTTPS listener.
pub fn router(app: Arc<App>) -> Router {
    Router::new().route("/validate", post(validate).fallback(post_only)).merge(ops_routes()).fallback(not_found).with_state(app)
}

/// `/healthz` and `/metrics` only, for the optional plain-HTTP listener.
pub fn ops_router(app: Arc<App>) -> Router {
    ops_routes().fallback(not_found).with_state(app)
}

fn ops_routes() -> Router<Arc<App>> {
    Router::new().route("/healthz", get(healthz).fallback(get_only)).route("/metrics", get(metrics).fallback(get_only))
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

async fn validate(State(app): State<Arc<App>>, activity: Option<Extension<Arc<Activity>>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    // Refuse what is not JSON, or too big, before reading the body.
    let content_type = match headers.get(header::CONTENT_TYPE).map(HeaderValue::to_str) {
        None => None,
        Some(Ok(ct)) => Some(ct),
        Some(Err(_)) => {
            return app.refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the Content-Type header is not text; send application/json".into(),
                started,
            );
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
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > app.max_body_bytes as u64) {
        return app.refuse(StatusCode::PAYLOAD_TOO_LARGE, too_big(), started);
    }
    let collected = tokio::time::timeout(app.body_timeout, Limited::new(body, app.max_body_bytes).collect()).await;
    let bytes = match collected {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
            return app.refuse(StatusCode::PAYLOAD_TOO_LARGE, too_big(), started);
        }
        Ok(Err(err)) => return app.refuse(StatusCode::BAD_REQUEST, format!("cannot read the request body: {err}"), started),
        Err(_) => {
            let message = format!("the request body did not arrive within {:?}", app.body_timeout);
            let mut response = app.refuse(StatusCode::REQUEST_TIMEOUT, message, started);
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    // From here on the request is answered at full speed: its connection keeps its slot.
    let _answering = activity.map(|Extension(a)| a.answering());
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
        Ok(body) => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics"),
    }
}

/// How long a connection that was told to close (age, idleness, shutdown) gets before it is
/// dropped: an HTTP/2 client that never acknowledges the GOAWAY must not keep its slot.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most concurrent HTTP/2 streams on one connection; each holds a body of up to the body limit.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// Connection limits of the HTTPS listener. Every pod can reach the webhook's port, and the API
/// server's admission calls go through the same port: no number of idle, slow or flooding
/// connections may keep those calls from being answered.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Bound on the TLS handshake.
    pub handshake_timeout: Duration,
    /// After this, a connection is closed gracefully (HTTP/2 GOAWAY, HTTP/1 close after the
    /// current response) so clients reconnect: spreads load over replicas and makes every
    /// client pick up a new serving certificate. `None`: connections live as long as clients
    /// keep them.
    pub max_age: Option<Duration>,
    /// Most open connections. At the limit a new connection takes the slot of the oldest one
    /// that is not answering a request (those that never sent a complete request first), so a
    /// flood of idle or slow connections cannot lock a new client out; when every connection is
    /// answering one, the new one is closed.
    pub max_connections: usize,
    /// Bound on receiving a request's headers (HTTP/1).
    pub header_timeout: Duration,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
}

/// What a connection's requests tell the accept loop: whether it is answering one (then it is
/// not evicted), whether it ever completed one, and since when it is idle.
#[derive(Debug)]
pub struct Activity {
    /// Requests received and not yet answered.
    requests: AtomicUsize,
    /// Requests whose body has arrived and that are being answered.
    answering: AtomicUsize,
    served: AtomicBool,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            requests: AtomicUsize::new(0),
            answering: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    /// How long no request has been in progress; zero while one is.
    fn idle_for(&self) -> Duration {
        if self.requests.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.idle_since.lock().map(|since| since.elapsed()).unwrap_or(Duration::ZERO)
    }

    /// Marks a request whose body has arrived as being answered until the guard drops.
    pub fn answering(self: &Arc<Self>) -> Answering {
        self.answering.fetch_add(1, Ordering::AcqRel);
        Answering(self.clone())
    }
}

/// A request's hold on its connection's slot while it is being answered.
pub struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answering.fetch_sub(1, Ordering::AcqRel);
        self.0.served.store(true, Ordering::Release);
    }
}

struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        if let Ok(mut since) = self.0.idle_since.lock() {
            *since = Instant::now();
        }
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request as in progress on its connection and hands the handler the [`Activity`]
/// (as a request extension) so it can say when the body has arrived.
async fn track(State(activity): State<Arc<Activity>>, mut request: axum::extract::Request, next: Next) -> Response {
    activity.requests.fetch_add(1, Ordering::AcqRel);
    let _in_progress = InProgress(activity.clone());
    request.extensions_mut().insert(activity);
    next.run(request).await
}

/// The open connections by age (ids grow), each with what its requests report and the sender
/// that evicts it.
#[derive(Default)]
struct Slots {
    next_id: u64,
    open: BTreeMap<u64, (Arc<Activity>, oneshot::Sender<()>)>,
}

impl Slots {
    /// Frees one slot for a new connection: evicts the oldest connection that is not answering
    /// a request, preferring those that never completed one. `false`: every one is answering.
    fn evict_one(&mut self) -> bool {
        let evictable = |a: &Activity| a.answering.load(Ordering::Acquire) == 0;
        let victim = self
            .open
            .iter()
            .find(|(_, (a, _))| evictable(a) && !a.served.load(Ordering::Acquire))
            .or_else(|| self.open.iter().find(|(_, (a, _))| evictable(a)))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.open.remove(&id)) {
            Some((_, evict)) => {
                // Err: the connection has ended on its own meanwhile, which frees the slot too.
                let _ = evict.send(());
                true
            }
            None => false,
        }
    }
}

/// Removes a connection's slot when its task ends (a no-op after an eviction removed it).
struct SlotGuard {
    slots: Arc<Mutex<Slots>>,
    id: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.open.remove(&self.id);
        }
    }
}

/// Accepts TLS connections on `listener` and serves `router` on each (HTTP/1.1 or HTTP/2 by
/// ALPN) until `shutdown`; then stops accepting and gives open connections [`DRAIN_TIMEOUT`].
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let mut connections = JoinSet::new();
    let slots = Arc::new(Mutex::new(Slots::default()));
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
                let Ok(mut open) = slots.lock() else {
                    warn!("connection slots poisoned; connection closed");
                    continue;
                };
                if open.open.len() >= limits.max_connections.max(1) {
                    if open.evict_one() {
                        metrics.connection_evicted();
                    } else {
                        debug!(%peer, limit = limits.max_connections, "every connection is answering a request; new connection closed");
                        metrics.connection_refused();
                        continue;
                    }
                }
                let activity = Arc::new(Activity::new());
                let (evict, evicted) = oneshot::channel();
                let id = open.next_id;
                open.next_id += 1;
                open.open.insert(id, (activity.clone(), evict));
                drop(open);
                let guard = SlotGuard { slots: slots.clone(), id };
                let router = router.clone().layer(axum::middleware::from_fn_with_state(activity.clone(), track));
                let conn = serve_connection(tcp, peer, acceptor.clone(), router, limits, activity, evicted, shutdown.clone());
                connections.spawn(async move {
                    let _guard = guard;
                    conn.await
                });
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

#[allow(clippy::too_many_arguments)] // one connection's parts, passed once from the accept loop
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    router: Router,
    limits: ConnectionLimits,
    activity: Arc<Activity>,
    mut evicted: oneshot::Receiver<()>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
    let tls = tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                debug!(%peer, error = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        _ = &mut evicted => {
            debug!(%peer, "evicted during the TLS handshake: the connection limit is reached");
            return;
        }
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let conn = builder.serve_connection(TokioIo::new(tls), TowerToHyperService::new(router));
    tokio::pin!(conn);
    let aged = async {
        match limits.max_age {
            Some(age) => tokio::time::sleep(age).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(aged);
    let mut idle_check = tokio::time::interval((limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    debug!(%peer, error = %err, "connection ended with an error");
                }
                return;
            }
            _ = &mut evicted => {
                debug!(%peer, "evicted while idle: the connection limit is reached");
                return;
            }
            _ = idle_check.tick() => match closing {
                Some(since) if since.elapsed() >= CLOSE_GRACE => {
                    debug!(%peer, "connection did not close within the grace period; dropped");
                    return;
                }
                Some(_) => {}
                None if activity.idle_for() >= limits.idle_timeout => {
                    debug!(%peer, "idle connection closed");
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
                None => {}
            },
            _ = &mut aged, if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
            _ = crate::wait_for_shutdown(&mut shutdown), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
        }
    }
}

/// Serves `router` over plain HTTP until `shutdown`.
pub async fn serve_plain(listener: TcpListener, router: Router, mut shutdown: watch::Receiver<bool>) {
    let result = axum::serve(listener, router).with_graceful_shutdown(async move { crate::wait_for_shutdown(&mut shutdown).await }).await;
    if let Err(err) = result {
        warn!(error = %err, "metrics listener failed");
    }
}
