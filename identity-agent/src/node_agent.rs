//! `meshauth-agent run`: ties the pieces together on one node.
//!
//! Inputs (Kubernetes or manifests) → [`plan`](crate::plan) → datapath maps and attached pod
//! interfaces; the plan's pairs → the auth manager → handshakes → the auth map; the datapath's
//! auth-required events and the SVID store's rotations → the auth manager. The maps and links
//! stay pinned when the agent stops, so traffic keeps flowing while it restarts; the restarted
//! agent adopts them (and the auth entries in them) without a gap.

use crate::auth_manager::{self, AuthManagerConfig, AuthManagerHandle, AuthTable, PairKey};
use crate::config::{AgentConfig, InputMode};
use crate::inputs::{self, Snapshot};
use crate::metrics::{AgentMetrics, IdentityLabels};
use crate::plan::{self, NodeView};
use crate::svid::{StoreConfig, SvidStore, SystemClock, WorkloadApiSource};
use meshauth_datapath::{BootTime, Datapath, DatapathConfig, DatapathError};
use meshauth_policy::compile::NumberAllocator;
use meshauth_policy::model::ModelConfig;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("inputs: {0}")]
    Inputs(#[from] inputs::InputError),
    #[error("kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("cannot listen for handshakes on {addr}: {error}")]
    Listen { addr: std::net::SocketAddr, error: std::io::Error },
    #[error("state directory {path}: {error}")]
    State { path: PathBuf, error: std::io::Error },
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
}

/// The datapath shared by the apply loop and the auth manager.
pub type SharedDatapath = Arc<Mutex<Datapath>>;

fn lock(dp: &SharedDatapath) -> std::sync::MutexGuard<'_, Datapath> {
    // Every map write is a single syscall: a panic elsewhere cannot leave the maps torn.
    dp.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The auth map of the datapath as the auth manager's table.
pub struct DatapathAuthTable(pub SharedDatapath);

impl AuthTable for DatapathAuthTable {
    fn set(&mut self, (dst, src): PairKey, expiry: SystemTime) -> Result<(), String> {
        lock(&self.0).set_auth(dst, src, BootTime::from_system_time(expiry)).map_err(|e| e.to_string())
    }

    fn remove(&mut self, (dst, src): PairKey) -> Result<(), String> {
        lock(&self.0).remove_auth(dst, src).map(|_| ()).map_err(|e| e.to_string())
    }

    fn list(&self) -> Result<Vec<(PairKey, SystemTime)>, String> {
        let entries = lock(&self.0).auth_entries().map_err(|e| e.to_string())?;
        let now = SystemTime::now();
        Ok(entries
            .into_iter()
            .filter_map(|e| Some(((e.dst_spiffe_id, e.src_spiffe_id), now + e.expiry.remaining()?)))
            .collect())
    }
}

/// The latest view of which identity lives where, shared with the handshake server.
pub type SharedView = Arc<RwLock<NodeView>>;

const ALLOCATOR_FILE: &str = "numbers.json";

fn load_allocator(state_dir: &Path) -> NumberAllocator {
    let path = state_dir.join(ALLOCATOR_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            // A corrupt file must not stop the node: renumbering only costs re-handshakes,
            // because the auth entries of numbers nobody holds any more are removed.
            tracing::warn!(%error, path = %path.display(), "identity numbering unreadable; starting afresh");
            NumberAllocator::default()
        }),
        Err(_) => NumberAllocator::default(),
    }
}

fn save_allocator(state_dir: &Path, allocator: &NumberAllocator) -> Result<(), AgentError> {
    let path = state_dir.join(ALLOCATOR_FILE);
    let tmp = state_dir.join(format!("{ALLOCATOR_FILE}.tmp"));
    let state_err = |error| AgentError::State { path: path.clone(), error };
    let bytes = serde_json::to_vec(allocator).map_err(|e| state_err(std::io::Error::other(e)))?;
    // Write-then-rename: a crash mid-write leaves the previous numbering intact.
    std::fs::write(&tmp, bytes).map_err(state_err)?;
    std::fs::rename(&tmp, &path).map_err(state_err)
}

/// Applies one snapshot: maps, interfaces, desired pairs, view.
pub struct Applier {
    pub node_name: String,
    pub model_config: ModelConfig,
    pub peer_port: u16,
    pub state_dir: PathBuf,
    pub allocator: NumberAllocator,
    pub datapath: SharedDatapath,
    pub view: SharedView,
    pub manager: AuthManagerHandle,
    attached: BTreeSet<String>,
}

impl Applier {
    pub fn new(
        node_name: String,
        model_config: ModelConfig,
        peer_port: u16,
        state_dir: PathBuf,
        datapath: SharedDatapath,
        view: SharedView,
        manager: AuthManagerHandle,
    ) -> Self {
        let allocator = load_allocator(&state_dir);
        Self { node_name, model_config, peer_port, state_dir, allocator, datapath, view, manager, attached: BTreeSet::new() }
    }

    /// Makes the node match `snapshot`.
    pub fn apply(&mut self, snapshot: &Snapshot) -> Result<(), AgentError> {
        let plan = plan::plan(snapshot, &self.model_config, &self.node_name, self.peer_port, &mut self.allocator);
        save_allocator(&self.state_dir, &self.allocator)?;
        for problem in &plan.problems {
            tracing::warn!(%problem, "spec problem: the offending part is ignored (fail closed)");
        }
        {
            let mut dp = lock(&self.datapath);
            let stats = dp.apply_tables(&plan.tables)?;
            tracing::debug!(?stats, "tables applied");
            let mut attached = BTreeSet::new();
            for pod in &plan.local_pods {
                let iface = match crate::interfaces::route_interface(pod.ip) {
                    Ok(Some(iface)) => iface,
                    Ok(None) => {
                        tracing::debug!(pod = %pod.pod, ip = %pod.ip, "no route to the pod yet");
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read routes");
                        continue;
                    }
                };
                match dp.attach(&iface, pod.ip) {
                    Ok(()) => {
                        if !self.attached.contains(&iface) {
                            tracing::info!(pod = %pod.pod, %iface, "guarding pod interface");
                        }
                        attached.insert(iface);
                    }
                    Err(error) => tracing::warn!(pod = %pod.pod, %iface, %error, "cannot attach"),
                }
            }
            self.attached = attached;
        }
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = plan.view;
        self.manager.set_desired(plan.desired);
        Ok(())
    }
}

/// Runs the agent until ctrl-c / SIGTERM. The maps and links stay pinned afterwards.
pub async fn run(config: AgentConfig, datapath_config: DatapathConfig) -> Result<(), AgentError> {
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "meshauth-agent starting");
    std::fs::create_dir_all(&config.state_dir).map_err(|error| AgentError::State { path: config.state_dir.clone(), error })?;
    let metrics = AgentMetrics::new();
    let (metrics_addr, _metrics_task) = metrics.clone().serve(config.metrics_addr).await?;
    tracing::info!(%metrics_addr, "serving /metrics and /healthz");

    let datapath: SharedDatapath = Arc::new(Mutex::new(Datapath::load_or_adopt(datapath_config)?));
    let mut events = lock(&datapath).events()?;

    let (store, _store_task) = SvidStore::spawn(
        Arc::new(WorkloadApiSource::new(config.workload_api_socket.display().to_string())),
        StoreConfig::default(),
        Arc::new(SystemClock),
    );
    let view: SharedView = Arc::new(RwLock::new(NodeView::default()));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| AgentError::Listen { addr: config.listen, error })?;
    let hosted = Arc::new(crate::handshake_glue::ViewHosted(view.clone()));
    tokio::spawn(crate::handshake_glue::serve(listener, store.clone(), hosted.clone(), metrics.clone()));

    let authenticator = Arc::new(crate::handshake_glue::HandshakeAuthenticator::new(store.clone(), hosted, config.handshake_timeout));
    let manager = auth_manager::spawn(
        AuthManagerConfig { max_concurrent: config.max_concurrent_handshakes, ..AuthManagerConfig::default() },
        authenticator,
        Box::new(DatapathAuthTable(datapath.clone())),
        metrics.clone(),
    );

    let mut snapshots: watch::Receiver<Arc<Snapshot>> = match &config.inputs {
        InputMode::Manifests(dir) => inputs::watch_dir(dir.clone(), Duration::from_millis(100))?,
        InputMode::Kubernetes => inputs::watch_kubernetes(kube::Client::try_default().await?, Duration::from_millis(50)).await,
    };
    let model_config = ModelConfig { trust_domain: config.trust_domain.clone(), mesh_namespace: config.mesh_namespace.clone() };
    let mut applier = Applier::new(
        config.node_name.clone(),
        model_config,
        config.listen.port(),
        config.state_dir.clone(),
        datapath.clone(),
        view.clone(),
        manager.clone(),
    );
    let first = snapshots.borrow_and_update().clone();
    applier.apply(&first)?;
    metrics.set_healthy(true);
    tracing::info!(node = %config.node_name, "meshauth-agent ready");

    let mut rotations = store.subscribe_rotations();
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(AgentError::Signal)?;
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() { break; }
                let snapshot = snapshots.borrow_and_update().clone();
                if let Err(error) = applier.apply(&snapshot) {
                    tracing::error!(%error, "cannot apply the new cluster state; keeping the previous maps");
                }
            }
            event = events.next() => match event {
                Ok(event) if event.kind == meshauth_datapath::EventKind::AuthRequired => {
                    metrics.auth_required_events.inc();
                    manager.auth_required((event.dst_spiffe_id, event.src_spiffe_id));
                }
                Ok(event) => tracing::debug!(?event, "datapath event"),
                Err(error) => {
                    metrics.events_lost.inc();
                    tracing::warn!(%error, "cannot read a datapath event");
                }
            },
            rotated = rotations.recv() => match rotated {
                Ok(id) => manager.rotated(id.to_string()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "missed rotation notices; the refresh timers still renew every pair");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                if let Ok(counters) = lock(&datapath).counters() {
                    metrics.observe_datapath_counters(counters.0.iter().map(|(k, v)| ((*k).to_owned(), v.packets)));
                }
                let now = SystemTime::now();
                for svid in store.available() {
                    let left = svid.not_after().duration_since(now).map_or(0, |d| d.as_secs());
                    metrics.svid_expiry_seconds
                        .get_or_create(&IdentityLabels { spiffe_id: svid.id().to_string() })
                        .set(i64::try_from(left).unwrap_or(i64::MAX));
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    tracing::info!("meshauth-agent stopping; maps and links stay pinned, traffic keeps flowing");
    Ok(())
}
