//! The SVID store: the agent's X.509-SVIDs and trust bundles, kept current from the Workload API.
//!
//! Job (after ztunnel's `SecretManager`): one worker task owns the Workload API stream and all
//! certificate state; callers hold a cloneable [`SvidStore`] handle and read or wait on a
//! per-identity `watch` channel ([`SvidState`]: `Initializing | Available | Unavailable`).
//! - Every update of the stream replaces the set of SVIDs and bundles; an identity whose SVID
//!   changed is announced on a broadcast channel ([`SvidStore::subscribe_rotations`]) so the
//!   auth manager re-authenticates its pairs.
//! - When the Workload API is unreachable the last valid SVID of each identity is kept and
//!   served until it expires (then `Unavailable(Expired)`): a SPIRE agent restart must not tear
//!   down authentication that is still provable.
//! - "No identity issued" while we hold valid SVIDs is an outage (a restarting SPIRE agent says
//!   it until it has synced with its server), not a revocation: the SVIDs are kept until
//!   `no_identity_grace` has passed with no other answer. An identity missing from a real
//!   update is withdrawn at once and announced ([`SvidStore::subscribe_withdrawals`]), so the
//!   auth manager removes its pairs instead of waiting for their expiry.
//! - Reconnection uses capped exponential backoff with full jitter, so a fleet of agents does
//!   not reconnect in lock step after a SPIRE agent restart.
//! - Connecting and receiving the first update is bounded by `initial_sync_timeout`; callers
//!   waiting on an identity learn `Unavailable(SourceUnreachable)` when the very first sync does
//!   not arrive in that time instead of hanging.
//! - Time goes through an injectable [`Clock`] so tests run on tokio's paused clock.
//!
//! What it must not do: mint or sign anything (that is SPIRE's, or the dev issuer's), serve an
//! SVID past its `notAfter`, accept an SVID whose URI SAN differs from the SPIFFE ID it was
//! delivered under or that does not verify against the delivered bundle, or block callers on
//! I/O (all reads are lock-and-clone).

mod worker;
mod workload_api;

#[cfg(test)]
use worker::Backoff;
use worker::Worker;
pub use workload_api::WorkloadApiSource;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use meshauth_crds::SpiffeId;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;

use crate::verify::{self, BundleSet, Usage, VerifyError};

/// Defaults of [`StoreConfig`].
pub const DEFAULT_INITIAL_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Small: the Workload API is a local socket, and while the agent waits every pair it should
/// authenticate stays unproven (fail closed), so a long wait after SPIRE is back costs traffic.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(3);
/// Longer than a SPIRE agent takes to sync with its server after a restart.
pub const DEFAULT_NO_IDENTITY_GRACE: Duration = Duration::from_secs(15);
/// Rotation notifications buffered per subscriber before the slowest one starts losing them.
const ROTATION_CHANNEL_CAPACITY: usize = 1024;

/// A boxed future, so [`SvidSource`] stays object safe.
pub use futures::future::BoxFuture;
/// The update stream of one connection to a source.
pub type UpdateStream = futures::stream::BoxStream<'static, Result<X509Update, SourceError>>;

/// One message of the Workload API's X.509 stream, in our own types.
#[derive(Debug, Clone, Default)]
pub struct X509Update {
    /// Every SVID the agent is entitled to right now (possibly none).
    pub svids: Vec<SvidMaterial>,
    /// Bundles by trust domain name (ours and federated). Empty means "unchanged": a
    /// "no identity issued" answer carries none, and must not make us forget the CAs.
    pub bundles: Vec<(String, Vec<CertificateDer<'static>>)>,
}

/// An SVID as delivered: SPIFFE ID, chain (leaf first), PKCS#8 key.
#[derive(Clone)]
pub struct SvidMaterial {
    pub spiffe_id: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8: Vec<u8>,
    pub hint: Option<String>,
}

impl fmt::Debug for SvidMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("SvidMaterial").field("spiffe_id", &self.spiffe_id).field("chain_len", &self.chain.len()).finish_non_exhaustive()
    }
}

/// Why a source could not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("cannot connect to the workload API at {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("workload API stream failed: {0}")]
    Stream(String),
    #[error("workload API stream closed")]
    Closed,
    #[error("no first update within {0:?}")]
    InitialSyncTimeout(Duration),
    /// The Workload API says no identity is issued to us (SPIRE's PermissionDenied).
    #[error("the workload API issued no identity")]
    NoIdentityIssued,
}

/// Where SVIDs come from: the Workload API in production, a double in tests.
pub trait SvidSource: Send + Sync + 'static {
    /// Opens one stream of updates; the first item is the current state.
    fn connect(&self) -> BoxFuture<'_, Result<UpdateStream, SourceError>>;
}

/// The time the store judges expiry by.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// Wall-clock time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Wall-clock time at creation, advanced by tokio's clock: under
/// `#[tokio::test(start_paused = true)]` it moves exactly as `tokio::time::advance` says.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    wall: SystemTime,
    at: Instant,
}

impl TokioClock {
    pub fn new() -> Self {
        Self { wall: SystemTime::now(), at: Instant::now() }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.at.elapsed()
    }
}

/// One X.509-SVID ready for TLS: the chain, the parsed expiry and the signing key loaded once.
pub struct Svid {
    id: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    hint: Option<String>,
    certified: Arc<CertifiedKey>,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.as_str())
            .field("not_after", &self.not_after)
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl Svid {
    /// Checks `material` against `bundles` at `now` (a valid X.509-SVID whose URI SAN is the
    /// SPIFFE ID it was delivered under) and loads its key with the agent's crypto provider.
    pub fn from_material(material: &SvidMaterial, bundles: &BundleSet, now: SystemTime) -> Result<Self, SvidError> {
        let id =
            SpiffeId::parse(&material.spiffe_id).map_err(|e| SvidError::BadId { id: material.spiffe_id.clone(), reason: e.to_string() })?;
        let verified = verify::verify_svid_for(&material.chain, bundles, &id, Usage::Any, now)
            .map_err(|source| SvidError::Invalid { id: id.to_string(), source })?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(material.key_pkcs8.clone()));
        let signing_key = crate::tls::crypto_provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| SvidError::Key { id: id.to_string(), reason: e.to_string() })?;
        let certified = Arc::new(CertifiedKey::new(material.chain.clone(), signing_key));
        // The key must belong to the leaf: a mismatch would only show as failed handshakes.
        certified.keys_match().map_err(|e| SvidError::Key { id: id.to_string(), reason: e.to_string() })?;
        Ok(Self { id, chain: material.chain.clone(), not_after: verified.not_after, hint: material.hint.clone(), certified })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The earliest `notAfter` of the chain.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// Chain and signing key for rustls.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// Whether `other` is the same certificate (a re-sent, not rotated, SVID).
    fn same_cert(&self, other: &Svid) -> bool {
        self.chain.first() == other.chain.first()
    }
}

/// Why an identity has no usable SVID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The Workload API's latest answer does not include it (not registered for this node).
    NotIssued,
    /// Its last SVID expired while no newer one arrived.
    Expired,
    /// The first sync with the Workload API did not happen in time.
    SourceUnreachable,
    /// What the Workload API delivered for it did not verify (see the logs).
    Invalid,
}

impl Unavailable {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotIssued => "not_issued",
            Self::Expired => "expired",
            Self::SourceUnreachable => "source_unreachable",
            Self::Invalid => "invalid",
        }
    }
}

/// The state of one identity.
#[derive(Debug, Clone)]
pub enum SvidState {
    /// Nothing heard from the Workload API yet.
    Initializing,
    Available(Arc<Svid>),
    Unavailable(Unavailable),
}

/// Why an SVID was refused or a wait failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SvidError {
    #[error("{id:?} is not a valid SPIFFE ID: {reason}")]
    BadId { id: String, reason: String },
    #[error("the SVID of {id} is invalid: {source}")]
    Invalid { id: String, source: VerifyError },
    #[error("the key of the SVID of {id} is unusable: {reason}")]
    Key { id: String, reason: String },
    #[error("no SVID for {id}: {}", reason.reason())]
    Unavailable { id: String, reason: Unavailable },
    #[error("no SVID for {id} within {timeout:?}")]
    Timeout { id: String, timeout: Duration },
}

impl SvidError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadId { .. } => "bad_spiffe_id",
            Self::Invalid { .. } => "invalid_svid",
            Self::Key { .. } => "bad_key",
            Self::Unavailable { reason, .. } => reason.reason(),
            Self::Timeout { .. } => "timeout",
        }
    }
}

/// Tuning of the store; see the `DEFAULT_…` constants.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Bound on connecting plus receiving the first update, per attempt; also how long callers
    /// wait for the very first sync before identities become `Unavailable(SourceUnreachable)`.
    pub initial_sync_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long "no identity issued" may last before the SVIDs we hold are withdrawn.
    pub no_identity_grace: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            initial_sync_timeout: DEFAULT_INITIAL_SYNC_TIMEOUT,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            no_identity_grace: DEFAULT_NO_IDENTITY_GRACE,
        }
    }
}

struct Inner {
    states: Mutex<HashMap<SpiffeId, watch::Sender<SvidState>>>,
    /// Whether a first update arrived (then unknown identities are `NotIssued`, not
    /// `Initializing`) or the first sync timed out (then they are `SourceUnreachable`).
    default_state: Mutex<SvidState>,
    bundles: watch::Sender<Arc<BundleSet>>,
    rotations: broadcast::Sender<SpiffeId>,
    withdrawals: broadcast::Sender<SpiffeId>,
    connected: watch::Sender<bool>,
    clock: Arc<dyn Clock>,
}

impl Inner {
    fn lock_states(&self) -> std::sync::MutexGuard<'_, HashMap<SpiffeId, watch::Sender<SvidState>>> {
        // State is replaced whole under the lock, so a panic elsewhere cannot leave it torn.
        self.states.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn default_state(&self) -> SvidState {
        self.default_state.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A cloneable handle to the SVID store.
#[derive(Clone)]
pub struct SvidStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for SvidStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SvidStore").finish_non_exhaustive()
    }
}

impl SvidStore {
    /// Starts the worker that owns `source`. The worker runs until the returned task is aborted.
    pub fn spawn(source: Arc<dyn SvidSource>, config: StoreConfig, clock: Arc<dyn Clock>) -> (Self, tokio::task::JoinHandle<()>) {
        let (bundles, _) = watch::channel(Arc::new(BundleSet::new()));
        let (rotations, _) = broadcast::channel(ROTATION_CHANNEL_CAPACITY);
        let (withdrawals, _) = broadcast::channel(ROTATION_CHANNEL_CAPACITY);
        let (connected, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            states: Mutex::new(HashMap::new()),
            default_state: Mutex::new(SvidState::Initializing),
            bundles,
            rotations,
            withdrawals,
            connected,
            clock,
        });
        let worker = Worker::new(inner.clone(), source, config);
        let task = tokio::spawn(worker.run());
        (Self { inner }, task)
    }

    /// The current state of `id`.
    pub fn state(&self, id: &SpiffeId) -> SvidState {
        match self.inner.lock_states().get(id) {
            Some(tx) => tx.borrow().clone(),
            None => self.inner.default_state(),
        }
    }

    /// A receiver that sees every change of `id`'s state.
    pub fn watch(&self, id: &SpiffeId) -> watch::Receiver<SvidState> {
        let default = self.inner.default_state();
        let mut states = self.inner.lock_states();
        states.entry(id.clone()).or_insert_with(|| watch::channel(default).0).subscribe()
    }

    /// The SVID of `id` if one is available and not expired by the store's clock.
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        match self.state(id) {
            SvidState::Available(svid) if svid.not_after > self.inner.clock.now() => Some(svid),
            _ => None,
        }
    }

    /// Waits up to `timeout` for `id` to be available; fails at once when the store knows it
    /// is not (after the first sync: not issued, expired, invalid).
    pub async fn wait_available(&self, id: &SpiffeId, timeout: Duration) -> Result<Arc<Svid>, SvidError> {
        let mut rx = self.watch(id);
        let wait = rx.wait_for(|state| !matches!(state, SvidState::Initializing));
        let state = match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(state)) => state.clone(),
            // The sender lives in the store we hold, so a closed channel is not expected; treat
            // it as unavailable rather than trusting anything.
            Ok(Err(_)) => SvidState::Unavailable(Unavailable::SourceUnreachable),
            Err(_) => return Err(SvidError::Timeout { id: id.to_string(), timeout }),
        };
        match state {
            SvidState::Available(svid) if svid.not_after > self.inner.clock.now() => Ok(svid),
            SvidState::Available(_) => Err(SvidError::Unavailable { id: id.to_string(), reason: Unavailable::Expired }),
            SvidState::Unavailable(reason) => Err(SvidError::Unavailable { id: id.to_string(), reason }),
            SvidState::Initializing => Err(SvidError::Timeout { id: id.to_string(), timeout }),
        }
    }

    /// SPIFFE IDs whose SVID was issued or rotated, as they happen.
    pub fn subscribe_rotations(&self) -> broadcast::Receiver<SpiffeId> {
        self.inner.rotations.subscribe()
    }

    /// SPIFFE IDs whose usable SVID went away before its expiry (no longer issued, or what
    /// came instead did not verify), as it happens.
    pub fn subscribe_withdrawals(&self) -> broadcast::Receiver<SpiffeId> {
        self.inner.withdrawals.subscribe()
    }

    /// The trust bundles (ours and federated) as of now.
    pub fn bundles(&self) -> Arc<BundleSet> {
        self.inner.bundles.borrow().clone()
    }

    /// A receiver of bundle changes.
    pub fn watch_bundles(&self) -> watch::Receiver<Arc<BundleSet>> {
        self.inner.bundles.subscribe()
    }

    /// Every identity the store has a state for (for metrics: seconds to expiry).
    pub fn identities(&self) -> Vec<(SpiffeId, SvidState)> {
        let states = self.inner.lock_states();
        let mut all: Vec<_> = states.iter().map(|(id, tx)| (id.clone(), tx.borrow().clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The SVIDs available right now.
    pub fn available(&self) -> Vec<Arc<Svid>> {
        let now = self.inner.clock.now();
        self.identities()
            .into_iter()
            .filter_map(|(_, state)| match state {
                SvidState::Available(svid) if svid.not_after > now => Some(svid),
                _ => None,
            })
            .collect()
    }

    /// Whether the Workload API has answered at least once (or the first sync timed out): only
    /// then does an unknown identity mean "not issued" rather than "not heard of yet".
    pub fn is_synced(&self) -> bool {
        !matches!(self.inner.default_state(), SvidState::Initializing)
    }

    /// Whether the worker holds an open stream right now.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// The store's clock (expiry decisions elsewhere must use the same time).
    pub fn now(&self) -> SystemTime {
        self.inner.clock.now()
    }

    pub fn clock(&self) -> Arc<dyn Clock> {
        self.inner.clock.clone()
    }
}

/// A source that serves one fixed update and then stays open (SVIDs from files, benchmarks).
#[derive(Debug, Clone)]
pub struct StaticSource {
    update: X509Update,
}

impl StaticSource {
    pub fn new(update: X509Update) -> Self {
        Self { update }
    }
}

impl SvidSource for StaticSource {
    fn connect(&self) -> BoxFuture<'_, Result<UpdateStream, SourceError>> {
        let first = futures::stream::iter([Ok(self.update.clone())]);
        let stream: UpdateStream = Box::pin(first.chain(futures::stream::pending()));
        Box::pin(async move { Ok(stream) })
    }
}

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests;
