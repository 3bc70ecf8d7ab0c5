//! `meshauth-webhook`: the validating admission webhook for `MeshPolicy` and `MutualAuth`.
//!
//! - [`admission`]: AdmissionReview v1 decoding, the shared policy crate's checks, responses.
//! - [`cluster`]: warnings that need the API (selectors that select nothing, MutualAuth ties).
//! - [`server`]: HTTPS (rustls, ring) with `POST /validate`, `/healthz`, `/metrics`.
//! - [`tls`]: the certificate store every handshake reads; [`tls::files`] reloads PEM files.
//! - [`certs`]: the self-managed CA and serving certificate, rotated with a `caBundle` overlap.
//! - [`config`], [`metrics`].
//!
//! The spec rules themselves live in `meshauth_policy::validate`, shared with the policy model
//! and the operator: this crate must not keep rules of its own, and never writes to the API
//! server beyond its certificate Secret and its webhook configuration's `caBundle`.

pub mod admission;
pub mod certs;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use meshauth_policy::model::ModelConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::certs::CertManager;
use crate::certs::kube_backend::KubeBackend;
use crate::cluster::Cluster;
use crate::config::{CertSource, Config, KubeApi};
use crate::metrics::Metrics;
use crate::tls::CertStore;
use crate::tls::files::FileWatcher;

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("serving certificate: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("self-managed certificate: {0}")]
    Certs(#[from] certs::CertError),
    #[error("a self-managed certificate needs the Kubernetes API, and there is no client: {0}")]
    NoClient(String),
}

/// Resolves when `shutdown` turns true or its sender is dropped.
pub async fn wait_for_shutdown(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// The webhook's own TLS names its provider ([`tls::provider`]); kube's client takes the
/// process default, which is set to the same (ring) when nothing set one, so that no build with
/// several providers compiled in can leave the client without one.
pub fn install_default_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err: another thread installed one in between, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A running webhook.
pub struct Webhook {
    /// The HTTPS address actually bound (useful with port 0).
    pub addr: SocketAddr,
    /// The plain-HTTP metrics address actually bound, if any.
    pub metrics_addr: Option<SocketAddr>,
    pub store: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Webhook {
    /// Starts with a Kubernetes client found the usual way (in-cluster, then kubeconfig) unless
    /// `kube_api` is off; without one, API-based warnings are skipped.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let client = match config.kube_api {
            KubeApi::Off => {
                info!(
                    "Kubernetes API off (--kube-api off): warnings that need it (MutualAuth ties, selectors that select nothing) are skipped"
                );
                None
            }
            KubeApi::Auto => {
                install_default_crypto_provider();
                match kube::Client::try_default().await {
                    Ok(client) => Some(client),
                    Err(err) => {
                        if matches!(config.certs, CertSource::SelfManaged(_)) {
                            return Err(Error::NoClient(err.to_string()));
                        }
                        warn!(error = %err, "no Kubernetes API access: running standalone; warnings that need the API (MutualAuth ties, selectors that select nothing) are skipped");
                        None
                    }
                }
            }
        };
        Self::start_with_client(config, client).await
    }

    /// Starts with the given client (or none: standalone).
    pub async fn start_with_client(config: Config, client: Option<kube::Client>) -> Result<Self, Error> {
        info!(?config, api = client.is_some(), "starting meshauth-webhook");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(CertStore::new());
        let mut tasks = Vec::new();

        match &config.certs {
            CertSource::Files(files) => {
                let watcher = FileWatcher::start(files.clone(), store.clone(), metrics.clone())?;
                tasks.push(tokio::spawn(watcher.run(shutdown_rx.clone())));
            }
            CertSource::SelfManaged(managed) => {
                let client = client.clone().ok_or_else(|| Error::NoClient("none was given".into()))?;
                let backend = KubeBackend::new(client, managed);
                let mut manager = CertManager::new(backend, managed.clone(), store.clone(), metrics.clone());
                // Serve only once a certificate is in place: retry a conflicting first check.
                for _ in 0..5 {
                    manager.tick(SystemTime::now()).await?;
                    if store.is_ready() {
                        break;
                    }
                }
                if !store.is_ready() {
                    return Err(Error::Certs(certs::CertError::BadSecret(
                        "no serving certificate after five checks (other writers keep changing the Secret)".into(),
                    )));
                }
                tasks.push(tokio::spawn(manager.run(shutdown_rx.clone())));
            }
        }

        let client_ca = config.client_ca.as_deref().map(tls::read_client_ca).transpose()?;
        let api_warnings = config.api_warnings.enabled(client_ca.is_some());
        if client.is_some() && !api_warnings {
            info!(
                "warnings that need the Kubernetes API are off: without --client-ca anyone who reaches the port could ask them about any namespace (--api-warnings always turns them on)"
            );
        }
        let mesh = ModelConfig { trust_domain: config.trust_domain.clone(), mesh_namespace: config.mesh_namespace.clone() };
        let app = Arc::new(server::App {
            cluster: Cluster::new(client.filter(|_| api_warnings), config.lookup_timeout, mesh.clone()),
            mesh,
            metrics: metrics.clone(),
            store: store.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
        });
        let listener = TcpListener::bind(config.listen).await.map_err(|source| Error::Bind { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind { addr: config.listen, source })?;
        let tls_config = Arc::new(tls::server_config(store.clone(), client_ca.as_deref())?);
        tasks.push(tokio::spawn(server::serve_tls(
            listener,
            tls_config,
            server::router(app.clone()),
            server::ConnectionLimits {
                handshake_timeout: config.handshake_timeout,
                max_age: config.max_connection_age,
                max_connections: config.max_connections,
                header_timeout: config.header_timeout,
                idle_timeout: config.idle_timeout,
            },
            metrics.clone(),
            shutdown_rx.clone(),
        )));
        let metrics_addr = match config.metrics_listen {
            Some(metrics_listen) => {
                let listener = TcpListener::bind(metrics_listen).await.map_err(|source| Error::Bind { addr: metrics_listen, source })?;
                let bound = listener.local_addr().map_err(|source| Error::Bind { addr: metrics_listen, source })?;
                tasks.push(tokio::spawn(server::serve_plain(listener, server::ops_router(app), shutdown_rx.clone())));
                Some(bound)
            }
            None => None,
        };
        info!(%addr, ?metrics_addr, "serving POST /validate, /healthz and /metrics");
        Ok(Self { addr, metrics_addr, store, metrics, shutdown, tasks })
    }

    /// Stops accepting, lets open connections finish (bounded), and stops the certificate task.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}
