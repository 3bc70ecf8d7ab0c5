//! The reconciler: watches Pods, Namespaces, Nodes, MeshPolicies and MutualAuths into caches
//! and, on every change (debounced), builds one policy model from them and brings two things in
//! line with it: the SPIRE registration entries the mesh needs ([`crate::registration`]) and
//! the status of every MeshPolicy and MutualAuth ([`crate::status`]), written by server-side
//! apply and skipped when it would change nothing, with Events for what a user must act on.
//! Failures are counted and retried with capped exponential backoff; a full resync (SPIRE
//! listing and every status) runs periodically.
//!
//! It runs only while this replica leads (the caller starts and stops it). It must not decide
//! policy (the model does), must not touch SPIRE entries it did not create, and must never
//! delete entries because SPIRE or the API server failed: entries are only deleted when a
//! successful reconcile finds them unneeded.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt as _};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::{ModelConfig, ObjectRef, PolicyModel};
use serde::Serialize;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::registration::{self, Desired, EntrySettings, RegistrationError};
use crate::spire::{EntryApi, EntryKey, ItemResult, Registered, SpireError};
use crate::status::{self, Computed, EventSpec, RegistrationState, Selection};

/// The field manager of every status the operator writes.
pub const FIELD_MANAGER: &str = "meshauth-operator";
/// How long to wait after a change for more changes before reconciling.
const DEBOUNCE: Duration = Duration::from_millis(50);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Status patches in flight at once.
const PATCH_CONCURRENCY: usize = 16;

/// Errors of one reconcile pass.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("SPIRE registration failed: {0}")]
    Spire(#[from] SpireError),
    #[error("SPIRE refused {failed} of the {operation} items; first: code {code}: {message}")]
    SpireItems { operation: &'static str, failed: usize, code: i32, message: String },
    #[error("{failed} status patches failed; first: {first}")]
    Status { failed: usize, first: String },
    #[error("the {0} watch stopped")]
    WatchEnded(&'static str),
}

/// What a reconcile needs.
pub struct Context<S> {
    pub client: Client,
    pub spire: Arc<S>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub model_config: ModelConfig,
    pub entries: EntrySettings,
    pub resync_interval: Duration,
    /// Which pods are endpoints: the agents' rules (podCIDR check), so entries match them.
    pub endpoint_rules: meshauth_cluster::EndpointRules,
    /// Take a node's `meshauth.io/spire-agent-id` annotation for an attested agent whose
    /// attestation names no node (join tokens); see [`registration::verified_node_agent_id`].
    pub trust_node_agent_annotations: bool,
}

impl<S: EntryApi> Context<S> {
    pub fn new(
        client: Client,
        spire: Arc<S>,
        metrics: Metrics,
        reporter: Reporter,
        model_config: ModelConfig,
        entries: EntrySettings,
        resync_interval: Duration,
    ) -> Self {
        let recorder = Recorder::new(client.clone(), reporter);
        Self {
            client,
            spire,
            metrics,
            recorder,
            model_config,
            entries,
            resync_interval,
            endpoint_rules: meshauth_cluster::EndpointRules::default(),
            trust_node_agent_annotations: false,
        }
    }

    /// The node checks of the operator's configuration.
    pub fn with_node_checks(mut self, endpoint_rules: meshauth_cluster::EndpointRules, trust_node_agent_annotations: bool) -> Self {
        self.endpoint_rules = endpoint_rules;
        self.trust_node_agent_annotations = trust_node_agent_annotations;
        self
    }
}

/// The caches the reconciler reads (shared with the agent: the same endpoint rules).
pub use meshauth_cluster::reflect::Stores;

/// Registration helpers over the caches.
pub trait StoresExt {
    fn agents(&self, settings: &EntrySettings) -> BTreeMap<String, Result<String, RegistrationError>>;
}

impl StoresExt for Stores {
    /// Each node's SPIRE agent ID, or why it has none.
    fn agents(&self, settings: &EntrySettings) -> BTreeMap<String, Result<String, RegistrationError>> {
        self.nodes.state().iter().map(|n| (n.name_any(), registration::node_agent_id(n, settings))).collect()
    }
}

/// What the reconciler remembers between passes.
#[derive(Debug, Default)]
pub struct State {
    /// The operator's entries as last known; `None` before the first listing.
    entries: Option<Vec<Registered>>,
    /// Keys whose create was refused as similar to an entry someone else made (which serves).
    satisfied_elsewhere: BTreeSet<EntryKey>,
    /// List entries again before the next plan (after errors and on resync).
    relist: bool,
    /// The last SPIRE error, until a pass succeeds.
    spire_error: Option<String>,
    /// Statuses written, to skip re-patching before the cache shows them.
    applied: HashMap<(&'static str, ObjectRef), serde_json::Value>,
    /// The SPIRE server's attested agents as last listed (read only while some node names its
    /// agent by annotation); `None` before the first listing.
    attested: Option<Vec<crate::spire::AttestedAgent>>,
}

impl State {
    /// Forget shortcuts: list SPIRE again and compare statuses against the caches only.
    pub fn force_full(&mut self) {
        self.relist = true;
        self.applied.clear();
    }

    /// The operator's entries as last known.
    pub fn entries(&self) -> &[Registered] {
        self.entries.as_deref().unwrap_or_default()
    }
}

/// Starts the watches; the returned future runs them all and ends (with an error) only when
/// one ends. Every change notifies `notify`.
pub fn watch_all(client: &Client, notify: Arc<Notify>) -> (Stores, impl Future<Output = ControllerError> + Send + 'static) {
    let (stores, all) = meshauth_cluster::reflect::watch_all(client, notify);
    (stores, async move { ControllerError::WatchEnded(all.await) })
}

/// Runs the reconciler until `stop` fires or a watch ends. `ready` becomes true once the caches
/// are filled.
pub async fn run<S: EntryApi>(ctx: Arc<Context<S>>, ready: Arc<AtomicBool>) -> ControllerError {
    let notify = Arc::new(Notify::new());
    let (stores, watches) = watch_all(&ctx.client, notify.clone());
    let watches = tokio::spawn(watches);
    let abort_watches = watches.abort_handle();
    let _guard = AbortOnDrop(abort_watches);
    let wait = async {
        for (what, r) in [
            ("pods", stores.pods.wait_until_ready().await),
            ("namespaces", stores.namespaces.wait_until_ready().await),
            ("nodes", stores.nodes.wait_until_ready().await),
            ("meshpolicies", stores.mesh_policies.wait_until_ready().await),
            ("mutualauths", stores.mutual_auths.wait_until_ready().await),
        ] {
            if r.is_err() {
                return Err(ControllerError::WatchEnded(what));
            }
        }
        Ok(())
    };
    tokio::select! {
        r = wait => if let Err(e) = r { return e },
        r = watches => return r.unwrap_or(ControllerError::WatchEnded("all")),
    }
    info!("caches filled; reconciling");
    ready.store(true, Ordering::SeqCst);
    let mut state = State::default();
    let mut backoff = BACKOFF_MIN;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut next_resync = tokio::time::Instant::now() + ctx.resync_interval;
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            _ = notify.notified() => {}
            _ = tokio::time::sleep_until(retry_at.unwrap_or(far)) => {}
            _ = tokio::time::sleep_until(next_resync) => {
                state.force_full();
                next_resync = tokio::time::Instant::now() + ctx.resync_interval;
            }
        }
        tokio::time::sleep(DEBOUNCE).await;
        match reconcile(&ctx, &stores, &mut state).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                retry_at = None;
            }
            Err(error) => {
                warn!(%error, retry_in = ?backoff, "reconcile failed; retrying");
                retry_at = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One pass: SPIRE entries, then every status. Both halves run even when the other fails.
pub async fn reconcile<S: EntryApi>(ctx: &Context<S>, stores: &Stores, state: &mut State) -> Result<(), ControllerError> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let model = PolicyModel::new(ctx.model_config.clone(), stores.inputs_with(&ctx.endpoint_rules));
    let (agents, attested) = node_agents(ctx, stores, state).await;
    let desired = registration::desired(&model, &agents, &ctx.entries);
    // Without the attested agents the annotated nodes' entries cannot be told right from
    // wrong: SPIRE is left as it is this pass (computing from the failure would delete them).
    let spire = match attested {
        Ok(()) => sync_spire(ctx, &desired, state).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &spire {
        ctx.metrics.failure("spire");
        state.spire_error = Some(e.to_string());
        state.relist = true;
    } else {
        state.spire_error = None;
    }
    let in_place = in_place(&desired, state);
    let spire_error = state.spire_error.clone();
    let reg = RegistrationState { desired: &desired, in_place: &in_place, spire_error: spire_error.as_deref() };
    let statuses = write_statuses(ctx, stores, &model, &reg, state).await;
    if statuses.is_err() {
        ctx.metrics.failure("status");
    }
    ctx.metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
    debug!(elapsed = ?started.elapsed(), entries = desired.entries.len(), "reconciled");
    spire.and(statuses)
}

/// Each node's SPIRE agent ID, annotated ones checked against the agents SPIRE attested
/// (listed with the entries, and again whenever a node names an agent not in the last list).
async fn node_agents<S: EntryApi>(
    ctx: &Context<S>,
    stores: &Stores,
    state: &mut State,
) -> (BTreeMap<String, Result<String, RegistrationError>>, Result<(), ControllerError>) {
    let nodes = stores.nodes.state();
    let named: Vec<String> = nodes
        .iter()
        .filter_map(|n| n.metadata.annotations.as_ref()?.get(registration::NODE_AGENT_ID_ANNOTATION))
        .map(|id| id.trim().to_owned())
        .collect();
    if named.is_empty() {
        return (stores.agents(&ctx.entries), Ok(()));
    }
    let unknown = |cached: &Vec<crate::spire::AttestedAgent>| named.iter().any(|id| !cached.iter().any(|a| &a.id == id));
    let listed = if state.attested.is_none() || state.relist || state.attested.as_ref().is_some_and(unknown) {
        match ctx.spire.list_agents().await {
            Ok(agents) => {
                state.attested = Some(agents);
                Ok(())
            }
            Err(e) => {
                ctx.metrics.spire_error(e.operation());
                Err(e)
            }
        }
    } else {
        Ok(())
    };
    // While SPIRE is away the last list still answers for the statuses (entries stay as they
    // are: the caller skips the sync on the error).
    let (attested, error) = match (listed, &state.attested) {
        (Ok(()), cached) => (Ok(cached.clone().unwrap_or_default()), None),
        (Err(e), Some(cached)) => (Ok(cached.clone()), Some(e)),
        (Err(e), None) => (Err(e), None),
    };
    let agents =
        registration::verified_node_agents(nodes.iter().map(|n| n.as_ref()), &ctx.entries, &attested, ctx.trust_node_agent_annotations);
    let outcome = match (error, attested) {
        (Some(e), _) | (None, Err(e)) => Err(ControllerError::from(e)),
        (None, Ok(_)) => Ok(()),
    };
    (agents, outcome)
}

/// Keys whose entry exists as desired.
fn in_place(desired: &Desired, state: &State) -> BTreeSet<EntryKey> {
    let mut keys: BTreeSet<EntryKey> =
        state.entries().iter().filter(|e| desired.entries.get(&e.spec.key()) == Some(&e.spec)).map(|e| e.spec.key()).collect();
    keys.extend(state.satisfied_elsewhere.iter().filter(|k| desired.entries.contains_key(*k)).cloned());
    keys
}

async fn sync_spire<S: EntryApi>(ctx: &Context<S>, desired: &Desired, state: &mut State) -> Result<(), ControllerError> {
    for problem in desired.problems() {
        warn!(%problem, "pods on this node cannot get SPIRE entries");
    }
    if state.entries.is_none() || state.relist {
        let listed = ctx.spire.list_owned().await.inspect_err(|e| ctx.metrics.spire_error(e.operation()))?;
        state.entries = Some(listed);
        state.relist = false;
        state.satisfied_elsewhere.clear();
    }
    let plan = registration::plan(&desired.entries, state.entries());
    if plan.is_empty() {
        ctx.metrics.spire_entries_managed.set(state.entries().len() as i64);
        return Ok(());
    }
    info!(create = plan.create.len(), update = plan.update.len(), delete = plan.delete.len(), "changing SPIRE entries");
    let mut entries: Vec<Registered> = state.entries().to_vec();
    let mut refused: Option<ControllerError> = None;
    let mut refuse = |operation: &'static str, code: i32, message: String, failed: &mut usize| {
        ctx.metrics.spire_error(operation);
        *failed += 1;
        if refused.is_none() {
            refused = Some(ControllerError::SpireItems { operation, failed: 0, code, message });
        }
    };
    let mut failed = 0usize;
    // Create and update before deleting, so an identity that moves is never without an entry.
    if !plan.create.is_empty() {
        let specs = plan.create.clone();
        let results = ctx.spire.create(specs.clone()).await.inspect_err(|e| ctx.metrics.spire_error(e.operation()))?;
        let mut done = 0;
        for (spec, r) in specs.iter().zip(results) {
            match r {
                ItemResult::Done(e) => {
                    done += 1;
                    entries.push(e);
                }
                ItemResult::AlreadyExists => {
                    info!(key = %spec.key(), "a similar entry made by someone else exists; leaving it alone");
                    state.satisfied_elsewhere.insert(spec.key());
                }
                ItemResult::NotFound => refuse("BatchCreateEntry", 5, "not found".into(), &mut failed),
                ItemResult::Failed { code, message } => refuse("BatchCreateEntry", code, message, &mut failed),
            }
        }
        ctx.metrics.entry_changes("create", done);
    }
    if !plan.update.is_empty() {
        let results = ctx.spire.update(plan.update.clone()).await.inspect_err(|e| ctx.metrics.spire_error(e.operation()))?;
        let mut done = 0;
        for (want, r) in plan.update.iter().zip(results) {
            match r {
                ItemResult::Done(e) => {
                    done += 1;
                    entries.retain(|x| x.id != want.id);
                    entries.push(e);
                }
                ItemResult::NotFound => {
                    // Deleted behind our back: list again and create it next pass.
                    entries.retain(|x| x.id != want.id);
                    state.relist = true;
                }
                ItemResult::AlreadyExists => refuse("BatchUpdateEntry", 6, "already exists".into(), &mut failed),
                ItemResult::Failed { code, message } => refuse("BatchUpdateEntry", code, message, &mut failed),
            }
        }
        ctx.metrics.entry_changes("update", done);
    }
    if !plan.delete.is_empty() {
        let results = ctx.spire.delete(plan.delete.clone()).await.inspect_err(|e| ctx.metrics.spire_error(e.operation()))?;
        let mut done = 0;
        for (id, r) in plan.delete.iter().zip(results) {
            match r {
                ItemResult::Done(_) | ItemResult::NotFound => {
                    done += 1;
                    entries.retain(|x| &x.id != id);
                }
                ItemResult::AlreadyExists => refuse("BatchDeleteEntry", 6, "already exists".into(), &mut failed),
                ItemResult::Failed { code, message } => refuse("BatchDeleteEntry", code, message, &mut failed),
            }
        }
        ctx.metrics.entry_changes("delete", done);
    }
    ctx.metrics.spire_entries_managed.set(entries.len() as i64);
    state.entries = Some(entries);
    match refused {
        None => Ok(()),
        Some(ControllerError::SpireItems { operation, code, message, .. }) => {
            Err(ControllerError::SpireItems { operation, failed, code, message })
        }
        Some(other) => Err(other),
    }
}

/// A status patch to make, with the events it calls for.
struct Patch1 {
    kind: &'static str,
    object: ObjectRef,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    body: serde_json::Value,
    events: Vec<EventSpec>,
}

fn patch_for<K, S>(kind: &'static str, obj: &K, computed: Computed<S>, current: Option<&S>, state: &State) -> Option<Patch1>
where
    K: Resource<DynamicType = ()>,
    S: Serialize + PartialEq,
{
    let object = ObjectRef::new(obj.namespace().unwrap_or_default(), obj.name_any());
    if current == Some(&computed.status) {
        return None;
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": computed.status,
    });
    if state.applied.get(&(kind, object.clone())) == Some(&body) {
        return None;
    }
    Some(Patch1 { kind, object, reference: obj.object_ref(&()), body, events: computed.events })
}

async fn write_statuses<S: EntryApi>(
    ctx: &Context<S>,
    stores: &Stores,
    model: &PolicyModel,
    reg: &RegistrationState<'_>,
    state: &mut State,
) -> Result<(), ControllerError> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let selection = Selection::of(model);
    let conflicts = model.conflicts();
    let mut patches = Vec::new();
    for p in stores.mesh_policies.state() {
        let object = ObjectRef::new(p.namespace().unwrap_or_default(), p.name_any());
        let c = status::mesh_policy(model, &selection, reg, &object, p.metadata.generation, p.status.as_ref(), &now);
        patches.extend(patch_for("MeshPolicy", p.as_ref(), c, p.status.as_ref(), state));
    }
    for m in stores.mutual_auths.state() {
        let object = ObjectRef::new(m.namespace().unwrap_or_default(), m.name_any());
        let c = status::mutual_auth(model, &selection, &conflicts, reg, &object, m.metadata.generation, m.status.as_ref(), &now);
        patches.extend(patch_for("MutualAuth", m.as_ref(), c, m.status.as_ref(), state));
    }
    if patches.is_empty() {
        return Ok(());
    }
    debug!(patches = patches.len(), "writing statuses");
    let results: Vec<(Patch1, Result<(), kube::Error>)> = stream::iter(patches)
        .map(|p| async move {
            let r = apply_status(ctx, &p).await;
            (p, r)
        })
        .buffer_unordered(PATCH_CONCURRENCY)
        .collect()
        .await;
    let mut failed = 0;
    let mut first = None;
    for (p, r) in results {
        match r {
            Ok(()) => {
                ctx.metrics.status_patch(p.kind);
                state.applied.insert((p.kind, p.object), p.body);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {
                debug!(object = %p.object, kind = p.kind, "gone before its status was written");
            }
            Err(e) => {
                warn!(object = %p.object, kind = p.kind, error = %e, "status patch failed");
                failed += 1;
                first.get_or_insert_with(|| format!("{} {}: {e}", p.kind, p.object));
            }
        }
    }
    match first {
        None => Ok(()),
        Some(first) => Err(ControllerError::Status { failed, first }),
    }
}

async fn apply_status<S>(ctx: &Context<S>, p: &Patch1) -> Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match p.kind {
        "MeshPolicy" => {
            let api: Api<MeshPolicy> = Api::namespaced(ctx.client.clone(), &p.object.namespace);
            api.patch_status(&p.object.name, &params, &Patch::Apply(&p.body)).await?;
        }
        _ => {
            let api: Api<MutualAuth> = Api::namespaced(ctx.client.clone(), &p.object.namespace);
            api.patch_status(&p.object.name, &params, &Patch::Apply(&p.body)).await?;
        }
    }
    for e in &p.events {
        let event = Event {
            type_: if e.warning { EventType::Warning } else { EventType::Normal },
            reason: e.reason.clone(),
            note: Some(e.note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(error) = ctx.recorder.publish(&event, &p.reference).await {
            warn!(object = %p.object, %error, "cannot record event");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
