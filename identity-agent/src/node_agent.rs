//! `meshauth-agent run`: ties the pieces together on one node.
//!
//! Inputs (Kubernetes or manifests) → [`plan`](crate::plan) → datapath maps and attached pod
//! interfaces; the plan's pairs → the auth manager → handshakes → the auth map; the datapath's
//! auth-required events and the SVID store's rotations → the auth manager. The maps and links
//! stay pinned when the agent stops, so traffic keeps flowing while it restarts; the restarted
//! agent adopts them (and the auth entries in them) without a gap.
//!
//! Here: the applier and [`run`], the wiring. The submodules hold the adapters between the
//! pieces (the datapath's maps, the node view, the handshake client and server, the SVID store's
//! events, the metrics as observers) and the applier's CNI requests and housekeeping.

mod auth_table;
mod authenticator;
mod cni;
mod deletions;
mod handshake_server;
mod housekeeping;
mod node_view;
mod observers;
mod svid_events;

pub use auth_table::{DatapathAuthTable, DatapathKeySink};
pub use authenticator::HandshakeAuthenticator;
pub use cni::{CniCall, CniRefusal, serve_cni};
pub use handshake_server::{ServerLimits, serve};
pub use node_view::ViewHosted;
pub use svid_events::forward_svid_events;

use crate::auth_manager::{self, AuthManagerConfig, AuthManagerHandle};
use crate::config::{AgentConfig, InputMode};
use crate::inputs::{self, Snapshot};
use crate::metrics::{AgentMetrics, IdentityLabels};
use crate::plan::LocalPod;
use crate::plan::{self, NodeView};
use crate::pod_net::{self, HostVeth};
use crate::svid::{StoreConfig, SvidStore, SystemClock, WorkloadApiSource};
use meshauth_datapath::{Datapath, DatapathConfig, DatapathError};
use meshauth_policy::compile::NumberAllocator;
use meshauth_policy::model::ObjectRef;
use meshauth_policy::model::{ModelConfig, PolicyModel};
use meshauth_policy::tables::{AuthRequirement, EndpointEntry, NO_SPIFFE_ID, WORLD_IDENTITY};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, watch};

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
    Metrics(#[from] crate::status_port::StatusPortError),
    #[error("cannot listen for handshakes on {addr}: {error}")]
    Listen { addr: std::net::SocketAddr, error: std::io::Error },
    #[error("state directory {path}: {error}")]
    State { path: PathBuf, error: std::io::Error },
    #[error("cannot watch the node's interfaces: {0}")]
    LinkWatch(#[from] pod_net::PodNetError),
    #[error("cannot install the SIGTERM handler: {0}")]
    Signal(std::io::Error),
    #[error("identity numbering: {0}")]
    Numbering(#[from] crate::numbering::NumberingError),
}

/// The datapath shared by the apply loop and the auth manager.
pub type SharedDatapath = Arc<Mutex<Datapath>>;

fn lock(dp: &SharedDatapath) -> std::sync::MutexGuard<'_, Datapath> {
    // Every map write is a single syscall: a panic elsewhere cannot leave the maps torn.
    dp.lock().unwrap_or_else(PoisonError::into_inner)
}

pub use crate::plan::SharedView;

/// A pod interface this agent guards: the host side of the pod's veth.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registration {
    pub ifindex: u32,
    pub ifname: String,
    /// The pod, when the CNI plugin named it (its address may not be in the API yet).
    pub pod: Option<ObjectRef>,
    pub container_id: Option<String>,
}

const REGISTRY_FILE: &str = "interfaces.json";

/// What the pinned `interfaces` map cannot hold: which pod (and container) each guarded
/// interface belongs to. A restarted agent needs it for pods whose address the API does not
/// show yet; without it such a pod would be no endpoint, and its policy would not apply.
fn load_registry_details(state_dir: &Path) -> BTreeMap<Ipv4Addr, Registration> {
    let path = state_dir.join(REGISTRY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            // Only pods the API shows without an address lose their overlay until the kubelet
            // reports it; the guarded interfaces themselves come from the pinned map.
            tracing::warn!(%error, path = %path.display(), "registered pods unreadable; using the pinned interfaces alone");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

fn save_registry(state_dir: &Path, registry: &BTreeMap<Ipv4Addr, Registration>) -> Result<(), std::io::Error> {
    let path = state_dir.join(REGISTRY_FILE);
    let tmp = state_dir.join(format!("{REGISTRY_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(registry).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

/// How often at most the agent looks through network namespaces for pods it does not guard.
const SCAN_INTERVAL: Duration = Duration::from_secs(2);

/// Applies snapshots: maps, guarded interfaces, desired pairs, view. Owns the registry of
/// guarded pod interfaces, which the CNI plugin (ADD/DEL), the namespace scan (pods that
/// started before the agent) and link removals change.
pub struct Applier {
    pub node_name: String,
    pub model_config: ModelConfig,
    pub peer_port: u16,
    pub state_dir: PathBuf,
    pub allocator: NumberAllocator,
    pub datapath: SharedDatapath,
    pub view: SharedView,
    pub manager: AuthManagerHandle,
    pub netns_dirs: Vec<PathBuf>,
    /// Configured uplinks for the connection tagger; `None`: found.
    pub uplinks: Option<Vec<String>>,
    /// The CNI config directory and the agent's socket, when meshauth-cni was chained there at
    /// start: the primary CNI may rewrite its config (flannel, Calico do on restart) and drop the
    /// entry, and new pods would then start unguarded; housekeeping chains it back.
    pub cni_chaining: Option<(PathBuf, String)>,
    registry: BTreeMap<Ipv4Addr, Registration>,
    last: Arc<Snapshot>,
    last_scan: Option<Instant>,
    /// Addresses whose interface the last apply could not attach to.
    failed: BTreeSet<Ipv4Addr>,
    metrics: Option<Arc<AgentMetrics>>,
    /// Other nodes' pods' addresses forgotten on their deletion, until a snapshot without
    /// the pod is applied (an apply of an older one must not bring them back).
    pub forgotten: deletions::Forgotten,
}

impl Applier {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_name: String,
        model_config: ModelConfig,
        peer_port: u16,
        state_dir: PathBuf,
        datapath: SharedDatapath,
        view: SharedView,
        manager: AuthManagerHandle,
        netns_dirs: Vec<PathBuf>,
        allocator: NumberAllocator,
    ) -> Self {
        // The pinned interfaces are the registry a previous agent left: adopt them, with the
        // pods it recorded for them.
        let details = load_registry_details(&state_dir);
        let mut registry = BTreeMap::new();
        match lock(&datapath).maps().interfaces() {
            Ok(interfaces) => {
                for i in interfaces {
                    if let Some(ifname) = i.name {
                        let known = details.get(&i.pod_ip).filter(|d| d.ifindex == i.ifindex);
                        registry.insert(
                            i.pod_ip,
                            Registration {
                                ifindex: i.ifindex,
                                ifname,
                                pod: known.and_then(|d| d.pod.clone()),
                                container_id: known.and_then(|d| d.container_id.clone()),
                            },
                        );
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read the pinned interfaces; pods are found again"),
        }
        Self {
            node_name,
            model_config,
            peer_port,
            state_dir,
            allocator,
            datapath,
            view,
            manager,
            netns_dirs,
            uplinks: None,
            cni_chaining: None,
            registry,
            last: Arc::new(Snapshot::default()),
            last_scan: None,
            failed: BTreeSet::new(),
            metrics: None,
            forgotten: deletions::Forgotten::default(),
        }
    }

    /// Makes the node match `snapshot`.
    pub fn apply(&mut self, snapshot: Arc<Snapshot>) -> Result<(), AgentError> {
        self.last = snapshot;
        self.reapply()
    }

    /// The last snapshot with the addresses the CNI plugin reported for local pods whose
    /// address the API does not show yet.
    fn effective_snapshot(&self) -> Arc<Snapshot> {
        let overlaid =
            |reg: &Registration| reg.pod.as_ref().is_some_and(|pod| self.last.unaddressed.iter().any(|p| &p.object_ref() == pod));
        // Copying the whole view costs memory at a thousand pods: only when a pod needs it.
        if !self.registry.values().any(overlaid) {
            return self.last.clone();
        }
        let mut s = (*self.last).clone();
        for (ip, reg) in &self.registry {
            let Some(pod) = &reg.pod else { continue };
            if let Some(i) = s.unaddressed.iter().position(|p| &p.object_ref() == pod && p.node.as_deref() == Some(self.node_name.as_str()))
            {
                let mut info = s.unaddressed.swap_remove(i);
                info.ip = Some(*ip);
                s.inputs.pods.push(info);
            }
        }
        Arc::new(s)
    }

    /// Applies the last snapshot again (after the registry changed).
    pub fn reapply(&mut self) -> Result<(), AgentError> {
        let snapshot = self.effective_snapshot();
        let mut plan = plan::plan(&snapshot, &self.model_config, &self.node_name, self.peer_port, &mut self.allocator);
        crate::numbering::save(&self.state_dir, &self.allocator)?;
        for problem in &plan.problems {
            tracing::warn!(%problem, "spec problem: the offending part is ignored (fail closed)");
        }
        let unguarded: Vec<&LocalPod> = plan.local_pods.iter().filter(|p| !self.registry.contains_key(&p.ip)).collect();
        if !unguarded.is_empty() && self.last_scan.is_none_or(|t| t.elapsed() >= SCAN_INTERVAL) {
            let wanted: BTreeSet<Ipv4Addr> = unguarded.iter().map(|p| p.ip).collect();
            // Whatever it finds is attached below, in this same apply.
            self.scan(&wanted);
        }
        // A local pod's address names its identity only once its own veth is guarded: until
        // then anything could send with it, so it is no endpoint (no source identity, and
        // no destination this node's programs would see).
        let local: BTreeSet<Ipv4Addr> = plan.local_pods.iter().map(|p| p.ip).collect();
        plan.tables.endpoints.retain(|e| !local.contains(&e.ip) || self.registry.contains_key(&e.ip));
        // An address several pods claim names none of them (a node writes its pods' status):
        // isolated with no identity, whatever pod the CNI laid over it here.
        for s in &snapshot.shared_addresses {
            tracing::warn!(ip = %s.ip, pods = ?s.pods, "several pods claim this address: it is isolated and names no identity (fail closed)");
        }
        snapshot.isolate_shared_addresses(&mut plan.tables.endpoints);
        // A guarded interface whose pod the model does not know (deleted from the API while its
        // sandbox lingers, or named by nobody) is isolated with no identity: it accepts only
        // the node itself, never "not a mesh pod, pass".
        let present: BTreeSet<Ipv4Addr> = plan.tables.endpoints.iter().map(|e| e.ip).collect();
        for (ip, reg) in self.registry.iter().filter(|(ip, _)| !present.contains(ip)) {
            plan.tables.endpoints.push(EndpointEntry {
                ip: *ip,
                security_identity: WORLD_IDENTITY,
                spiffe_id: NO_SPIFFE_ID,
                isolated: true,
                audit: false,
                mutual_auth: AuthRequirement::None,
                pod: format!("(unknown pod on {})", reg.ifname),
                node: Some(self.node_name.clone()),
                node_address: None,
            });
        }
        {
            let mut dp = lock(&self.datapath);
            deletions::leave_out_forgotten(&self.forgotten, &snapshot, &mut plan.tables.endpoints);
            // Attached whatever the apply did: a policy that does not fit (or a map that
            // cannot be written) must never leave a new pod unguarded.
            let applied = dp.apply_tables(&plan.tables);
            match &applied {
                Ok(stats) if stats.complete() => tracing::debug!(?stats, "tables applied"),
                Ok(stats) => tracing::error!(
                    denied_destinations = ?stats.denied_destinations,
                    endpoints_left_out = stats.endpoints_left_out,
                    "the policy does not fit in the maps: the destinations listed accept nothing until it shrinks"
                ),
                Err(error) => tracing::error!(%error, "cannot write the policy tables"),
            }
            if let Some(metrics) = &self.metrics {
                metrics.local_pods.set(i64::try_from(plan.local_pods.len()).unwrap_or(i64::MAX));
                match &applied {
                    Ok(s) => metrics.observe_apply(Ok((s.denied_destinations.len(), s.endpoints_left_out))),
                    Err(e) => metrics.observe_apply(Err(&e.to_string())),
                }
            }
            let mut failed = BTreeSet::new();
            for (ip, reg) in &self.registry {
                match dp.attach(&reg.ifname, *ip) {
                    Ok(()) => {
                        if self.failed.contains(ip) {
                            tracing::info!(%ip, iface = %reg.ifname, "guarding pod interface");
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%ip, iface = %reg.ifname, %error, "cannot attach");
                        failed.insert(*ip);
                    }
                }
            }
            self.failed = failed;
            applied?;
        }
        *self.view.write().unwrap_or_else(PoisonError::into_inner) = plan.view;
        self.manager.set_desired(plan.desired);
        crate::heap::release_free_memory();
        Ok(())
    }

    /// Looks through the node's network namespaces for the veths of `wanted` pod addresses;
    /// how many it registered.
    fn scan(&mut self, wanted: &BTreeSet<Ipv4Addr>) -> usize {
        self.last_scan = Some(Instant::now());
        let found = match pod_net::scan(&self.netns_dirs) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(%error, "cannot look through network namespaces");
                return 0;
            }
        };
        let mut registered = 0;
        for ip in wanted {
            match found.get(ip).map(Vec::as_slice) {
                None | Some([]) => tracing::debug!(%ip, "no veth with this pod address yet"),
                Some([veth]) => {
                    if let Err(reason) = self.register(*ip, veth.clone(), None, None) {
                        tracing::warn!(%ip, %reason, "pod interface found but refused");
                    } else {
                        registered += 1;
                        tracing::info!(%ip, iface = %veth.name, "found the veth of a pod that started before this agent");
                    }
                }
                Some(many) => {
                    tracing::warn!(%ip, interfaces = ?many, "several namespaces claim this pod address: none is guarded (fail closed)");
                }
            }
        }
        registered
    }

    /// Records that `veth` is the interface of the pod with address `ip`, refusing an
    /// interface registered for another address and an address guarded on another live one.
    fn register(&mut self, ip: Ipv4Addr, veth: HostVeth, pod: Option<ObjectRef>, container_id: Option<String>) -> Result<(), String> {
        if let Some((other, _)) = self.registry.iter().find(|(a, r)| r.ifindex == veth.ifindex && **a != ip) {
            return Err(format!("interface {} is already registered for {other}", veth.name));
        }
        if let Some(existing) = self.registry.get(&ip)
            && existing.ifindex != veth.ifindex
        {
            if pod_net::link_exists(existing.ifindex) {
                return Err(format!("{ip} is already guarded on interface {}", existing.ifname));
            }
            self.release(existing.ifindex);
        }
        self.registry.insert(ip, Registration { ifindex: veth.ifindex, ifname: veth.name, pod, container_id });
        self.persist();
        Ok(())
    }

    fn persist(&self) {
        if let Err(error) = save_registry(&self.state_dir, &self.registry) {
            tracing::warn!(%error, "cannot record the registered pods in the state directory");
        }
    }

    fn release(&mut self, ifindex: u32) {
        let before = self.registry.len();
        self.registry.retain(|_, r| r.ifindex != ifindex);
        if self.registry.len() != before {
            self.persist();
        }
        if let Err(error) = lock(&self.datapath).release_interface(ifindex) {
            tracing::warn!(ifindex, %error, "cannot release interface");
        }
    }
}

/// Runs the agent until ctrl-c / SIGTERM. The maps and links stay pinned afterwards.
pub async fn run(config: AgentConfig, datapath_config: DatapathConfig) -> Result<(), AgentError> {
    tracing::info!(config = %serde_json::to_string(&config).unwrap_or_default(), "meshauth-agent starting");
    std::fs::create_dir_all(&config.state_dir).map_err(|error| AgentError::State { path: config.state_dir.clone(), error })?;
    let metrics = AgentMetrics::new();
    let local_api: Arc<crate::status_port::LocalApi> = Arc::default();
    let (metrics_addr, _metrics_task) = crate::status_port::serve(metrics.clone(), config.metrics_addr, local_api.clone()).await?;
    tracing::info!(%metrics_addr, "serving /metrics, /healthz, /readyz, and /explain and /flows (local)");

    let datapath: SharedDatapath = Arc::new(Mutex::new(Datapath::load_or_adopt(datapath_config)?));
    let mut events = lock(&datapath).events()?;
    // Before the auth manager adopts the pinned auth entries: only those whose numbers keep
    // their meaning survive.
    let allocator = crate::numbering::load(&config.state_dir, &mut lock(&datapath))?;

    let (store, _store_task) = SvidStore::spawn(
        Arc::new(WorkloadApiSource::new(config.workload_api_socket.display().to_string())),
        StoreConfig::default(),
        Arc::new(SystemClock),
    );
    let view: SharedView = Arc::new(RwLock::new(NodeView::default()));

    let listener = tokio::net::TcpListener::bind(config.listen).await.map_err(|error| AgentError::Listen { addr: config.listen, error })?;
    let hosted = Arc::new(ViewHosted(view.clone()));
    let limits = ServerLimits { max_concurrent: config.handshake_server_max_concurrent, max_per_source: config.handshake_max_per_source };
    let keys = Arc::new(DatapathKeySink { view: view.clone(), datapath: datapath.clone() });
    tokio::spawn(serve(listener, store.clone(), hosted.clone(), metrics.clone(), limits, keys));

    let authenticator = Arc::new(HandshakeAuthenticator::new(store.clone(), hosted, config.handshake_timeout));
    let manager = auth_manager::spawn(
        AuthManagerConfig { max_concurrent: config.max_concurrent_handshakes, ..AuthManagerConfig::default() },
        authenticator,
        Box::new(DatapathAuthTable(datapath.clone())),
        metrics.clone(),
    );

    let endpoint_rules = meshauth_cluster::EndpointRules {
        check_node_pod_cidrs: config.check_node_pod_cidrs,
        trust_agent_address_annotations: config.trust_agent_address_annotations,
    };
    // Manifests tell no deletions apart: their snapshots are all there is.
    let (mut snapshots, deletions): (watch::Receiver<Arc<Snapshot>>, Option<broadcast::Receiver<inputs::DeletedPod>>) = match &config.inputs
    {
        InputMode::Manifests(dir) => (inputs::watch_dir_with(dir.clone(), Duration::from_millis(100), endpoint_rules)?, None),
        InputMode::Kubernetes => {
            let (snapshots, deletions) =
                inputs::watch_kubernetes(kube::Client::try_default().await?, Duration::from_millis(50), endpoint_rules).await;
            (snapshots, Some(deletions))
        }
    };
    let model_config = ModelConfig { trust_domain: config.trust_domain.clone(), mesh_namespace: config.mesh_namespace.clone() };
    // Set once, before the first apply: `/explain` answers "starting" until then.
    let _ = local_api.explainer.set(crate::explain::Explainer {
        node_name: config.node_name.clone(),
        config: model_config.clone(),
        snapshots: snapshots.clone(),
        view: view.clone(),
        manager: manager.clone(),
        metrics: metrics.clone(),
    });
    let mut applier = Applier::new(
        config.node_name.clone(),
        model_config.clone(),
        config.listen.port(),
        config.state_dir.clone(),
        datapath.clone(),
        view.clone(),
        manager.clone(),
        config.netns_dirs.clone(),
        allocator,
    );
    applier.metrics = Some(metrics.clone());
    applier.uplinks = config.uplinks.clone();
    let _deletions = deletions.map(|d| deletions::follow(d, snapshots.clone(), datapath.clone(), applier.forgotten.clone()));
    // Kept chained only where the chart chained it (its init container runs before the agent):
    // an agent beside another runtime's CNI config, or none, leaves the directory alone.
    if crate::cni_install::is_chained(&config.cni_conf_dir) {
        applier.cni_chaining = Some((config.cni_conf_dir.clone(), config.cni_socket.to_string_lossy().into_owned()));
    }
    let mut removed_links = pod_net::watch_removed_links()?;
    let first = snapshots.borrow_and_update().clone();
    let namer_of = |snapshot: &Snapshot| {
        crate::flows::FlowNamer::new(config.node_name.clone(), PolicyModel::new(model_config.clone(), snapshot.inputs.clone()))
    };
    let mut namer = namer_of(&first);
    applier.housekeeping()?;
    applier.apply(first)?;
    // The tagger on the uplinks as soon as the other nodes are known, not a tick later.
    applier.sync_uplinks();
    let (cni_tx, mut cni_calls) = tokio::sync::mpsc::channel::<CniCall>(64);
    let _cni_task = serve_cni(&config.cni_socket, cni_tx)?;
    tracing::info!(socket = %config.cni_socket.display(), "serving the CNI plugin");
    metrics.set_healthy(true);
    tracing::info!(node = %config.node_name, "meshauth-agent ready");

    let mut rotations = store.subscribe_rotations();
    let _svid_events = forward_svid_events(&store, manager.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(AgentError::Signal)?;
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() { break; }
                let snapshot = snapshots.borrow_and_update().clone();
                namer = namer_of(&snapshot);
                if let Err(error) = applier.apply(snapshot) {
                    tracing::error!(%error, "cannot apply the new cluster state; keeping the previous maps");
                }
            }
            event = events.next() => match event {
                Ok(event) => {
                    let record = namer.record(&event, meshauth_datapath::BootTime::now(), std::time::SystemTime::now());
                    metrics.count_flow(&record);
                    local_api.flows.push(record);
                    let pair = (event.dst_spiffe_id, event.src_spiffe_id);
                    match event.kind {
                        meshauth_datapath::EventKind::Tag => manager.key_refused(pair),
                        meshauth_datapath::EventKind::AuthRequired => {
                            metrics.auth_required_events.inc();
                            manager.auth_required(pair);
                        }
                        // An audited rule's authentication: the handshake still happens.
                        meshauth_datapath::EventKind::Audit if event.auth != meshauth_policy::tables::AuthRequirement::None => {
                            metrics.auth_required_events.inc();
                            manager.auth_required(pair);
                        }
                        _ => tracing::debug!(?event, "datapath event"),
                    }
                }
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
            Some(call) = cni_calls.recv() => {
                let outcome = applier.cni(&call.request, call.netns);
                if let Err(CniRefusal::Final(reason)) = &outcome {
                    tracing::warn!(command = ?call.request.command, container = %call.request.container_id, %reason, "CNI request refused");
                }
                let _ = call.reply.send(outcome);
            }
            Some(ifindex) = removed_links.recv() => {
                if let Err(error) = applier.link_removed(ifindex) {
                    tracing::error!(%error, "cannot apply after an interface vanished");
                }
            }
            _ = tick.tick() => {
                if let Err(error) = applier.housekeeping() {
                    tracing::error!(%error, "housekeeping failed");
                }
                if let Ok(counters) = lock(&datapath).counters() {
                    metrics.observe_datapath_counters(counters.0.iter().map(|(k, v)| ((*k).to_owned(), v.packets)));
                }
                let now = SystemTime::now();
                let svids = store.available();
                metrics.retain_identities(&svids.iter().map(|s| s.id().to_string()).collect());
                for svid in svids {
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
    if !manager.drain(Duration::from_secs(5)).await {
        tracing::warn!("handshakes still under way after 5 s; stopping anyway");
    }
    if let (InputMode::Kubernetes, Some(daemonset)) = (&config.inputs, &config.daemonset) {
        uninstall_if_removed(&config, daemonset).await;
    }
    tracing::info!("meshauth-agent stopping; maps and links stay pinned, traffic keeps flowing");
    Ok(())
}

/// Takes meshauth-cni out of the node's CNI configuration when the agent's DaemonSet is gone
/// or being deleted (the chart was uninstalled), or the agent's access went with it. A restart or an upgrade keeps it: while no
/// agent runs, new pods wait (ADD fails closed) rather than start unguarded.
async fn uninstall_if_removed(config: &AgentConfig, daemonset: &str) {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let removed = match kube::Client::try_default().await {
        Ok(client) => match kube::Api::<DaemonSet>::namespaced(client, &config.mesh_namespace).get_opt(daemonset).await {
            Ok(None) => true,
            Ok(Some(ds)) => ds.metadata.deletion_timestamp.is_some(),
            // `helm uninstall` deletes the agent's ServiceAccount and Role together with the
            // DaemonSet, before its pods stop: losing them means the same. A restart or an
            // upgrade keeps both, so it reads the DaemonSet.
            Err(kube::Error::Api(status)) if matches!(status.code, 401 | 403) => {
                tracing::info!(code = status.code, "the agent's own access is gone with its DaemonSet");
                true
            }
            Err(error) => {
                tracing::warn!(%error, "cannot tell whether the DaemonSet is being removed; the CNI chaining stays");
                false
            }
        },
        Err(error) => {
            tracing::warn!(%error, "no API access; the CNI chaining stays");
            false
        }
    };
    if removed {
        match crate::cni_install::uninstall(&config.cni_bin_dir, &config.cni_conf_dir) {
            Ok(changed) => tracing::info!(?changed, "DaemonSet removed: meshauth-cni taken out of the CNI configuration"),
            Err(error) => tracing::error!(%error, "cannot take meshauth-cni out of the CNI configuration"),
        }
    }
}
