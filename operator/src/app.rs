//! Wires the operator together: the Kubernetes client, start-up checks (CRDs installed, SPIRE
//! server answering), the HTTP endpoints, and leader election on a Lease
//! (kube-lease-manager) that starts the reconciler while this replica leads and stops it when
//! the lease is lost, so only the leader writes. A SIGTERM or Ctrl-C releases the lease.
//!
//! It must not reconcile anything itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use kube::Client;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::Reporter;
use kube_lease_manager::LeaseManagerBuilder;
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::ModelConfig;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::controller::{self, Context, ControllerError};
use crate::http::{self, Health, HttpError};
use crate::metrics::Metrics;
use crate::spire::SpireError;
use crate::spire::client::SpireClient;

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot load the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("cannot find Kubernetes configuration (no --kubeconfig, no in-cluster service account, no $KUBECONFIG): {0}")]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error(
        "the CustomResourceDefinition {crd} is not installed in the cluster; install the meshauth CRDs first \
         (kubectl apply -f config/crds/)"
    )]
    CrdMissing { crd: &'static str },
    #[error("cannot check that the CRD {crd} is installed: {source}")]
    CrdCheck {
        crd: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the SPIRE server is unreachable at its socket {socket} (--spire-server-socket / \
         MESHAUTH_SPIRE_SERVER_SOCKET): {reason}"
    )]
    SpireUnreachable { socket: String, reason: String },
    #[error("SPIRE client: {0}")]
    Spire(#[from] SpireError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("leader election on Lease {namespace}/{name} failed: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error("the leader election task ended unexpectedly")]
    LeaseEnded,
    #[error("the reconciler stopped: {0}")]
    Controller(#[from] ControllerError),
}

/// A Kubernetes client from `--kubeconfig`, else in-cluster configuration or `$KUBECONFIG`.
pub async fn kube_client(config: &Config) -> Result<Client, AppError> {
    install_crypto_provider();
    let kc = match &config.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| AppError::Kubeconfig { path: path.display().to_string(), source })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| AppError::Kubeconfig { path: path.display().to_string(), source })?
        }
        None => kube::Config::infer().await.map_err(AppError::InferConfig)?,
    };
    Client::try_from(kc).map_err(AppError::Client)
}

/// Installs rustls' ring provider as the process default unless one is installed already.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // An error means another thread installed one in between: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Fails with [`AppError::CrdMissing`] unless both CRDs are served.
pub async fn check_crds(client: &Client) -> Result<(), AppError> {
    let lp = ListParams::default().limit(1);
    let checks = [
        ("meshpolicies.meshauth.io", Api::<MeshPolicy>::all(client.clone()).list_metadata(&lp).await.map(|_| ())),
        ("mutualauths.meshauth.io", Api::<MutualAuth>::all(client.clone()).list_metadata(&lp).await.map(|_| ())),
    ];
    for (crd, result) in checks {
        match result {
            Ok(()) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Err(AppError::CrdMissing { crd }),
            Err(source) => return Err(AppError::CrdCheck { crd, source }),
        }
    }
    Ok(())
}

/// A SPIRE client that has answered once.
pub async fn connect_spire(config: &Config) -> Result<SpireClient, AppError> {
    let socket = config.spire_server_socket.display().to_string();
    let unreachable = |reason: String| AppError::SpireUnreachable { socket: socket.clone(), reason };
    match std::fs::metadata(&config.spire_server_socket) {
        Ok(_) => {}
        Err(e) => return Err(unreachable(e.to_string())),
    }
    let client = SpireClient::new(&config.spire_server_socket, config.spire_timeout)?;
    client.probe().await.map_err(|e| unreachable(e.to_string()))?;
    Ok(client)
}

/// Runs the operator until SIGTERM/Ctrl-C (then `Ok`) or a fatal error.
pub async fn run(config: Config) -> Result<(), AppError> {
    info!(?config, "starting meshauth-operator");
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let (addr, server) = http::bind(config.metrics_addr, metrics.clone(), health.clone()).await?;
    info!(%addr, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(server);

    let client = kube_client(&config).await?;
    check_crds(&client).await?;
    let spire = Arc::new(connect_spire(&config).await?);
    info!(socket = %config.spire_server_socket.display(), "SPIRE server answers");

    let lease_err = |source| AppError::Lease { namespace: config.namespace.clone(), name: config.lease_name.clone(), source };
    let duration = config.lease_duration.as_secs();
    let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(&config.leader_id)
        .with_duration(duration)
        .with_grace((duration / 3).max(1))
        .build()
        .await
        .map_err(lease_err)?;
    health.started.store(true, Ordering::SeqCst);
    let (mut leading, lease_task) = manager.watch().await;
    info!(identity = %config.leader_id, lease = %config.lease_name, "waiting for the leader lease");

    let ctx = Arc::new(
        Context::new(
            client,
            spire,
            metrics.clone(),
            Reporter { controller: "meshauth-operator".into(), instance: Some(config.leader_id.clone()) },
            ModelConfig { trust_domain: config.entries.trust_domain.clone(), mesh_namespace: config.namespace.clone() },
            config.entries.clone(),
            config.resync_interval,
        )
        .with_node_checks(config.endpoint_rules, config.trust_node_agent_annotations),
    );
    let mut reconciler: Option<JoinHandle<ControllerError>> = None;
    let mut server = server;
    let outcome = loop {
        let reconciler_done = async {
            match reconciler.as_mut() {
                Some(h) => h.await.unwrap_or(ControllerError::WatchEnded("reconciler task")),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = leading.changed() => {
                if changed.is_err() {
                    break Err(AppError::LeaseEnded);
                }
                let is_leader = *leading.borrow_and_update();
                metrics.leader.set(i64::from(is_leader));
                health.leader.store(is_leader, Ordering::SeqCst);
                if is_leader && reconciler.is_none() {
                    info!(identity = %config.leader_id, "became leader; starting the reconciler");
                    health.synced.store(false, Ordering::SeqCst);
                    reconciler = Some(tokio::spawn(controller::run(ctx.clone(), health.synced.clone())));
                } else if !is_leader && let Some(h) = reconciler.take() {
                    warn!(identity = %config.leader_id, "lost the leader lease; stopping the reconciler");
                    h.abort();
                }
            }
            e = reconciler_done => break Err(AppError::Controller(e)),
            r = &mut server => break match r {
                Ok(Err(e)) => Err(AppError::Http(e)),
                _ => Err(AppError::Http(HttpError::Serve(std::io::Error::other("server task ended")))),
            },
            _ = shutdown_signal() => {
                info!("shutting down");
                break Ok(());
            }
        }
    };
    if let Some(h) = reconciler.take() {
        h.abort();
    }
    // Dropping the receiver makes the lease task release the lease and end.
    drop(leading);
    match tokio::time::timeout(std::time::Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => info!("released the leader lease"),
        Ok(Ok(Err(e))) => warn!(error = %e, "releasing the leader lease failed"),
        Ok(Err(e)) => warn!(error = %e, "the lease task failed"),
        Err(_) => warn!("releasing the leader lease timed out"),
    }
    if let Err(e) = &outcome {
        error!(error = %e, "meshauth-operator stops");
    }
    outcome
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
