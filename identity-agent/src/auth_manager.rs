//! The auth manager keeps the auth map true: every pair the policy model says needs
//! authentication (destination pod on this node, source anywhere) is handshaken before any
//! traffic, re-authenticated before its entry expires and whenever a local SVID rotates, and
//! removed when the pair is no longer needed. Pairs the datapath reports as "auth required"
//! that the model also wants are handshaken at once.
//!
//! A pair is proven once per node hosting the source identity, with that node's agent: each
//! proof is its own entry ([`ProofKey`]) with its own connection key, and counts only for the
//! pods of its node. So a replicated source is admitted on every node it runs on, one node's
//! refusal or outage touches only that node's pods, and the source side keeps one key per
//! destination node.
//!
//! One task owns all state; callers talk to it through a cloneable [`AuthManagerHandle`].
//! Handshakes and the map are behind traits so the logic is unit-tested with in-process doubles.
//! Fails closed: an entry is only ever written with the expiry a successful handshake proved.
//! It is removed at once, not left to expire, when the peer was reached and the proof failed
//! (it presented another identity, its chain no longer verifies, it refused us), when the local
//! identity's SVID is withdrawn, and when a trust bundle change leaves its proof unverifiable.
//! A peer that cannot be reached (an agent restarting, a SPIRE outage) is an outage, not a
//! refusal: the entry stays until its expiry, which no SVID outlives. A handshake overtaken by
//! such a removal (or by a bundle change) writes nothing: it ran on the SVID and bundles of
//! before, so only a handshake started afterwards may prove the pair again.
//!
//! No handshake storm: a re-authentication comes no sooner than `min_reauth_interval` after
//! the last success, and one that could not extend the entry (neither SVID rotated, which is
//! what short-lived SVIDs and a SPIRE outage look like) waits for a local rotation, the entry's
//! end, or a probe for the peer's rotation (which only a handshake can see) whose delay doubles.
//! Auth-required events from the datapath cut a failure's backoff short, but never below
//! `initial_backoff` after the last attempt: spoofed drops cannot drive back-to-back handshakes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::svid::{Clock, SystemClock};

use meshauth_datapath::NodeId;

/// (destination SPIFFE-ID number, source SPIFFE-ID number): a pair.
pub type PairKey = (u32, u32);

/// One proof of a pair: by the agent of one node hosting the source identity. The auth map's
/// key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProofKey {
    pub pair: PairKey,
    /// The source's node, as the maps name it.
    pub node: NodeId,
}

/// The agent of a node hosting a pod of the source identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub node: NodeId,
    pub addr: SocketAddr,
}

/// A pair that needs authentication, with where to reach the source's agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPair {
    pub dst_number: u32,
    pub src_number: u32,
    /// The local identity presented (the destination pod's).
    pub dst_id: String,
    /// The identity the peer must prove (the source pod's).
    pub src_id: String,
    /// Agents of the nodes hosting a pod of the source identity: each proves it on its own.
    pub peers: Vec<Peer>,
}

impl DesiredPair {
    pub fn key(&self) -> PairKey {
        (self.dst_number, self.src_number)
    }
}

/// Why a handshake failed, with a short reason for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AuthFailure {
    pub reason: &'static str,
    pub message: String,
    /// The peer was reached and the proof failed (not an outage): the pair's entry goes at once.
    pub refused: bool,
    /// Nothing can change until the local identity is issued an SVID: the pair waits for the
    /// identity's issuance ([`AuthManagerHandle::rotated`]), retrying only once a minute. A node
    /// whose SPIRE agent has issued nothing yet must not spin on every pair.
    pub until_local_svid: bool,
}

/// What a proof rested on, checked again when the trust bundles change.
pub trait Evidence: Send + Sync + 'static {
    /// Whether the peer's chain of the proof still verifies against the current trust bundles.
    /// The local chain is not checked here: the SVID store withdraws a local SVID that fails
    /// the new bundles, and the withdrawal removes its pairs ([`AuthManagerHandle::withdrawn`]).
    fn still_trusted(&self) -> bool;
}

/// A successful handshake.
#[derive(Clone)]
pub struct Proof {
    /// No later than either certificate.
    pub expiry: SystemTime,
    pub evidence: Arc<dyn Evidence>,
    /// The pair's connection key: SYNs from the source's node are tagged with it.
    pub connection_key: meshauth_datapath::ConnectionKey,
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proof").field("expiry", &self.expiry).finish_non_exhaustive()
    }
}

/// A boxed future, so the traits stay object safe.
pub use futures::future::BoxFuture;

/// Proves a pair by a mutual handshake with the peer's agent.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate<'a>(&'a self, local: &'a str, peer: &'a str, addr: SocketAddr) -> BoxFuture<'a, Result<Proof, AuthFailure>>;
}

/// The auth map.
pub trait AuthTable: Send + 'static {
    fn set(&mut self, key: ProofKey, expiry: SystemTime, connection_key: meshauth_datapath::ConnectionKey) -> Result<(), String>;
    fn remove(&mut self, key: ProofKey) -> Result<(), String>;
    /// Entries already in the map (after an agent restart, the pinned map's).
    fn list(&self) -> Result<Vec<(ProofKey, SystemTime)>, String>;
}

/// What happened to a handshake, for metrics and logs.
pub trait AuthObserver: Send + Sync + 'static {
    fn handshake(&self, result: Result<(), &AuthFailure>, duration: Duration);
    fn entries(&self, count: usize);
}

/// The least time between two handshakes of a pair that dropped SYNs for their tag bring.
pub const KEY_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// Tuning of the manager.
#[derive(Debug, Clone)]
pub struct AuthManagerConfig {
    /// Handshakes in flight at once.
    pub max_concurrent: usize,
    /// Re-authenticate when this fraction of an entry's lifetime has passed.
    pub refresh_fraction: f64,
    /// ...and in any case this long before it expires.
    pub refresh_margin: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`. Also the floor between
    /// attempts that auth-required events cannot go under.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No re-authentication of a pair sooner than this after its last success; also the first
    /// delay of the probes for a peer's rotation when a success could not extend the entry.
    pub min_reauth_interval: Duration,
    /// After an SVID rotates, the re-authentications of its pairs that still hold a valid
    /// entry are spread at random over this long (at most half the time their entries have
    /// left before the refresh margin): an identity with thousands of pairs would otherwise
    /// bring thousands of handshakes in the same second. Pairs without an entry go at once.
    pub rotation_spread: Duration,
}

impl Default for AuthManagerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 64,
            // Later than the half-life at which SPIRE rotates an SVID: the rotation, spread
            // over `rotation_spread`, renews the pairs; the timer is for what no rotation
            // renews (a peer's rotation, an entry bounded by the peer's SVID).
            refresh_fraction: 0.7,
            refresh_margin: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(200),
            // Short: a pair waiting here is unproven and, under Strict, dropped.
            max_backoff: Duration::from_secs(5),
            min_reauth_interval: Duration::from_secs(1),
            rotation_spread: Duration::from_secs(30),
        }
    }
}

enum Command {
    SetDesired(Vec<DesiredPair>),
    Rotated(String),
    AuthRequired(PairKey),
    KeyRefused(PairKey),
    Withdrawn(String),
    BundlesChanged,
    Done { key: ProofKey, generation: u64, started: SystemTime, result: Result<Proof, AuthFailure>, took: Duration },
    Snapshot(tokio::sync::oneshot::Sender<Vec<PairStatus>>),
    Drain(tokio::sync::oneshot::Sender<()>),
}

/// What the manager knows of one proof of a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairStatus {
    pub key: ProofKey,
    pub desired: bool,
    pub expiry: Option<SystemTime>,
    pub failures: u32,
    pub last_error: Option<String>,
    /// When the next handshake for it starts (zero: due now or under way); `None` when the
    /// proof is no longer wanted.
    pub next_attempt_in: Option<Duration>,
}

/// A cloneable handle to the manager task.
#[derive(Clone)]
pub struct AuthManagerHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl AuthManagerHandle {
    /// Replaces the set of pairs that need authentication.
    pub fn set_desired(&self, pairs: Vec<DesiredPair>) {
        let _ = self.tx.send(Command::SetDesired(pairs));
    }

    /// A local SVID rotated: re-authenticate every pair it is part of.
    pub fn rotated(&self, spiffe_id: String) {
        let _ = self.tx.send(Command::Rotated(spiffe_id));
    }

    /// A local SVID went away before its expiry (no longer issued): its pairs' entries go.
    pub fn withdrawn(&self, spiffe_id: String) {
        let _ = self.tx.send(Command::Withdrawn(spiffe_id));
    }

    /// The trust bundles changed: entries whose proof no longer verifies go.
    pub fn bundles_changed(&self) {
        let _ = self.tx.send(Command::BundlesChanged);
    }

    /// Starts no new handshake and waits (at most `timeout`) for those under way to finish
    /// and write their entries: the answering agent installed each one's key before it
    /// confirmed, and its pods tag with that key after the switch delay, so an agent that
    /// stopped between the two would leave the pair refusing those SYNs until its next proof.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let (reply, done) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::Drain(reply)).is_err() {
            return true;
        }
        matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(())))
    }

    /// The datapath dropped a packet of this pair for lack of authentication (every node's
    /// proof of it is asked for: the event does not say which node's pod sent it).
    pub fn auth_required(&self, key: PairKey) {
        let _ = self.tx.send(Command::AuthRequired(key));
    }

    /// The datapath dropped a SYN of this authenticated pair for its tag: the source's node
    /// may hold no key (an agent that could not keep it, a rebuilt map). A new handshake gives
    /// both sides a new key, at most once per [`KEY_REFRESH_INTERVAL`]: anyone who can write
    /// the pair's address into packets can cause these drops.
    pub fn key_refused(&self, key: PairKey) {
        let _ = self.tx.send(Command::KeyRefused(key));
    }

    /// The state of every known pair.
    pub async fn status(&self) -> Vec<PairStatus> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Command::Snapshot(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

struct PairState {
    /// Shared by the proofs of one pair (a pair may have a proof per node in the cluster).
    desired: Option<Arc<DesiredPair>>,
    /// Where the proving node's agent listens.
    addr: Option<SocketAddr>,
    expiry: Option<SystemTime>,
    /// What the entry's proof rested on (none for an entry adopted from a previous agent).
    evidence: Option<Arc<dyn Evidence>>,
    refresh_at: Option<Instant>,
    in_flight: bool,
    failures: u32,
    next_attempt: Instant,
    last_error: Option<String>,
    last_success: Option<Instant>,
    /// When the last attempt ended, successful or not.
    last_done: Option<Instant>,
    /// Delay of the next probe after a success that could not extend the entry.
    probe_delay: Duration,
    /// Bumped whenever what a handshake in flight rests on is taken away (a revocation, a
    /// bundle change); a handshake's result counts only if the generation it started in is
    /// still current, or a stale proof would undo the revocation.
    generation: u64,
}

impl PairState {
    fn new(now: Instant, config: &AuthManagerConfig) -> Self {
        Self {
            desired: None,
            addr: None,
            expiry: None,
            evidence: None,
            refresh_at: None,
            in_flight: false,
            failures: 0,
            next_attempt: now,
            last_error: None,
            last_success: None,
            last_done: None,
            probe_delay: config.min_reauth_interval,
            generation: 0,
        }
    }

    /// The earliest a re-authentication may start: the floor after the last success.
    fn reauth_floor(&self, config: &AuthManagerConfig, now: Instant) -> Instant {
        self.last_success.map_or(now, |s| now.max(s + config.min_reauth_interval))
    }

    /// The earliest an attempt asked for from outside (a rotation, a datapath drop) may start.
    fn attempt_floor(&self, config: &AuthManagerConfig, now: Instant) -> Instant {
        self.last_done.map_or(now, |d| now.max(d + config.initial_backoff))
    }

    /// Removes the entry now and asks for a new proof (subject to the floors).
    fn revoke(&mut self, key: ProofKey, table: &mut dyn AuthTable, config: &AuthManagerConfig, now: Instant, why: &str) {
        if self.expiry.take().is_some() {
            tracing::warn!(?key, why, "auth entry removed before its expiry");
            if let Err(error) = table.remove(key) {
                tracing::warn!(%error, ?key, "cannot remove auth entry");
            }
        }
        self.evidence = None;
        self.probe_delay = config.min_reauth_interval;
        self.supersede(config, now);
    }

    /// Voids the handshake in flight, if any (it started on the SVID and bundles of before),
    /// and asks for a new proof (subject to the floor after the last success).
    fn supersede(&mut self, config: &AuthManagerConfig, now: Instant) {
        self.generation = self.generation.wrapping_add(1);
        self.refresh_at = Some(self.reauth_floor(config, now));
    }
}

/// Starts the manager. Entries already in `table` are adopted with their expiries, so a
/// restarted agent does not re-handshake (or drop) pairs that are still proven.
pub fn spawn(
    config: AuthManagerConfig,
    authenticator: Arc<dyn Authenticator>,
    table: Box<dyn AuthTable>,
    observer: Arc<dyn AuthObserver>,
) -> AuthManagerHandle {
    spawn_with_clock(config, authenticator, table, observer, Arc::new(SystemClock))
}

/// As [`spawn`], judging expiries by `clock` (tests run it on tokio's paused clock).
pub fn spawn_with_clock(
    config: AuthManagerConfig,
    authenticator: Arc<dyn Authenticator>,
    mut table: Box<dyn AuthTable>,
    observer: Arc<dyn AuthObserver>,
    clock: Arc<dyn Clock>,
) -> AuthManagerHandle {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let handle = AuthManagerHandle { tx: tx.clone() };
    tokio::spawn(async move {
        let mut pairs: BTreeMap<ProofKey, PairState> = BTreeMap::new();
        let now = Instant::now();
        match table.list() {
            Ok(existing) => {
                for (key, expiry) in existing {
                    let mut state = PairState::new(now, &config);
                    state.expiry = Some(expiry);
                    state.refresh_at = Some(refresh_instant(&config, clock.now(), expiry, now));
                    pairs.insert(key, state);
                }
            }
            Err(error) => tracing::warn!(%error, "cannot list existing auth entries"),
        }
        // Adopted entries stay until the first desired set says whether they are still needed.
        let mut have_desired = false;
        let mut in_flight = 0usize;
        // Set once the agent stops: no new handshake, and the reply once none is under way.
        let mut draining: Option<Option<tokio::sync::oneshot::Sender<()>>> = None;
        loop {
            // Draining, only the handshakes under way can bring something: no timer.
            let wake = if draining.is_some() { None } else { next_wake(&pairs, in_flight < config.max_concurrent, clock.now()) };
            let command = tokio::select! {
                c = rx.recv() => match c { Some(c) => Some(c), None => return },
                _ = sleep_until(wake) => None,
            };
            let now = Instant::now();
            match command {
                Some(Command::SetDesired(list)) => {
                    have_desired = true;
                    let mut wanted: BTreeSet<ProofKey> = BTreeSet::new();
                    for p in list {
                        let p = Arc::new(p);
                        for peer in &p.peers {
                            let key = ProofKey { pair: p.key(), node: peer.node };
                            wanted.insert(key);
                            let state = pairs.entry(key).or_insert_with(|| PairState::new(now, &config));
                            state.desired = Some(p.clone());
                            state.addr = Some(peer.addr);
                        }
                    }
                    for (key, state) in pairs.iter_mut() {
                        if !wanted.contains(key) {
                            state.desired = None;
                        }
                    }
                }
                Some(Command::Rotated(id)) => {
                    let wall = clock.now();
                    for state in pairs.values_mut() {
                        if state.desired.as_ref().is_some_and(|d| d.dst_id == id || d.src_id == id) {
                            state.probe_delay = config.min_reauth_interval;
                            let spread = state.expiry.map_or(Duration::ZERO, |e| rotation_window(&config, wall, e));
                            state.refresh_at = Some(state.reauth_floor(&config, now).max(now + spread.mul_f64(fastrand::f64())));
                            state.next_attempt = state.attempt_floor(&config, now);
                        }
                    }
                }
                Some(Command::Withdrawn(id)) => {
                    for (key, state) in pairs.iter_mut() {
                        if state.desired.as_ref().is_some_and(|d| d.dst_id == id) {
                            state.revoke(*key, &mut *table, &config, now, "local SVID withdrawn");
                        }
                    }
                }
                Some(Command::BundlesChanged) => {
                    for state in pairs.values_mut().filter(|s| s.in_flight) {
                        // Its verifier holds the bundles of before: even a pair with no entry yet,
                        // or one whose entry still verifies, must not be proven by it.
                        state.supersede(&config, now);
                    }
                    for (key, state) in pairs.iter_mut().filter(|(_, s)| s.expiry.is_some()) {
                        match &state.evidence {
                            Some(evidence) if !evidence.still_trusted() => {
                                state.revoke(*key, &mut *table, &config, now, "its proof no longer verifies against the trust bundles");
                            }
                            Some(_) => {}
                            // Adopted from a previous agent: nothing to check, so prove it again
                            // now (a refusal removes it).
                            None => state.refresh_at = Some(now),
                        }
                    }
                }
                Some(Command::AuthRequired(key)) => {
                    for (_, state) in proofs_of(&mut pairs, key).filter(|(_, s)| s.desired.is_some()) {
                        // The datapath is dropping this pair's packets: cut the backoff short,
                        // down to a floor (the events come from whatever a pod sends).
                        state.next_attempt = state.next_attempt.min(state.attempt_floor(&config, now));
                        if state.expiry.is_none_or(|e| e <= clock.now()) {
                            state.refresh_at = Some(state.reauth_floor(&config, now));
                        }
                    }
                }
                Some(Command::KeyRefused(key)) => {
                    for (_, state) in proofs_of(&mut pairs, key).filter(|(_, s)| s.desired.is_some() && !s.in_flight) {
                        let proven_long_ago = state.last_success.is_none_or(|t| now.saturating_duration_since(t) >= KEY_REFRESH_INTERVAL);
                        if proven_long_ago && state.refresh_at.is_none_or(|r| r > now) {
                            state.refresh_at = Some(state.reauth_floor(&config, now));
                        }
                    }
                }
                Some(Command::Done { key, generation, started, result, took }) => {
                    in_flight = in_flight.saturating_sub(1);
                    observer.handshake(result.as_ref().map(|_| ()), took);
                    if let Some(state) = pairs.get_mut(&key) {
                        state.in_flight = false;
                        state.last_done = Some(now);
                        match result {
                            // A revocation or bundle change came while it ran: a success would
                            // re-prove the pair on a withdrawn SVID or a removed CA, and a failure
                            // says nothing of the current ones, so neither writes nor backs off.
                            // supersede() already asked for the new proof the loop below starts.
                            _ if generation != state.generation => {
                                tracing::debug!(?key, "dropping the result of a handshake overtaken by a revocation");
                                // The answering agent installed this handshake's key before it
                                // confirmed, and its pods tag with it after the switch delay.
                                // While the entry stands (no revocation removed it) and the peer's
                                // chain still verifies, keep the key, never the expiry, or those
                                // SYNs are refused until the next proof.
                                if let Ok(proof) = &result
                                    && state.desired.is_some()
                                    && let Some(expiry) = state.expiry.filter(|e| *e > clock.now())
                                    && proof.evidence.still_trusted()
                                    && let Err(error) = table.set(key, expiry, proof.connection_key)
                                {
                                    tracing::warn!(%error, ?key, "cannot keep the key of an overtaken handshake");
                                }
                            }
                            Ok(proof) if state.desired.is_some() => {
                                let expiry = proof.expiry;
                                match table.set(key, expiry, proof.connection_key) {
                                    Ok(()) => {
                                        let extended = state.expiry.is_none_or(|old| expiry > old);
                                        state.expiry = Some(expiry);
                                        state.evidence = Some(proof.evidence);
                                        state.last_success = Some(now);
                                        state.failures = 0;
                                        state.last_error = None;
                                        let floor = now + config.min_reauth_interval;
                                        state.refresh_at = Some(if extended {
                                            state.probe_delay = config.min_reauth_interval;
                                            refresh_instant(&config, started, expiry, now).max(floor)
                                        } else {
                                            // Neither SVID rotated: a local rotation or the entry's
                                            // end brings the next handshake; meanwhile probe for
                                            // the peer's rotation, ever less often, once more at
                                            // the margin before the end if that is still ahead.
                                            let left = expiry.duration_since(clock.now()).unwrap_or_default();
                                            let last_chance = now + left.saturating_sub(config.refresh_margin);
                                            let wanted = now + state.probe_delay;
                                            let probe = if last_chance >= floor { wanted.min(last_chance) } else { wanted };
                                            state.probe_delay = state.probe_delay.saturating_mul(2);
                                            probe.max(floor)
                                        });
                                    }
                                    Err(error) => {
                                        tracing::error!(%error, ?key, "cannot write auth entry");
                                        state.last_error = Some(error);
                                        backoff(&config, state, now);
                                    }
                                }
                            }
                            Ok(_) => {}
                            Err(failure) => {
                                // The same failure again is news only at debug level: thousands of
                                // pairs failing alike must not flood the log.
                                if state.last_error.as_deref() == Some(failure.message.as_str()) {
                                    tracing::debug!(?key, reason = failure.reason, refused = failure.refused, error = %failure.message, "handshake failed again");
                                } else {
                                    tracing::warn!(?key, reason = failure.reason, refused = failure.refused, error = %failure.message, "handshake failed");
                                }
                                if failure.refused {
                                    state.revoke(key, &mut *table, &config, now, failure.reason);
                                }
                                state.last_error = Some(failure.message);
                                backoff(&config, state, now);
                                if failure.until_local_svid {
                                    state.next_attempt = state.next_attempt.max(now + UNTIL_LOCAL_SVID_RETRY);
                                }
                            }
                        }
                    }
                }
                Some(Command::Snapshot(reply)) => {
                    let status = pairs
                        .iter()
                        .map(|(key, s)| PairStatus {
                            key: *key,
                            desired: s.desired.is_some(),
                            expiry: s.expiry,
                            failures: s.failures,
                            last_error: s.last_error.clone(),
                            next_attempt_in: s.desired.is_some().then(|| {
                                let due = s.refresh_at.map_or(s.next_attempt, |r| r.max(s.next_attempt));
                                if s.in_flight { Duration::ZERO } else { due.saturating_duration_since(now) }
                            }),
                        })
                        .collect();
                    let _ = reply.send(status);
                }
                Some(Command::Drain(reply)) => draining = Some(Some(reply)),
                None => {}
            }
            if let Some(waiting) = draining.as_mut() {
                if in_flight == 0
                    && let Some(reply) = waiting.take()
                {
                    let _ = reply.send(());
                }
                continue;
            }

            // Garbage-collect: pairs no longer wanted, and entries that expired.
            if have_desired {
                let wall = clock.now();
                pairs.retain(|key, state| {
                    let expired = state.expiry.is_some_and(|e| e <= wall);
                    if state.desired.is_none() && !state.in_flight {
                        if state.expiry.is_some()
                            && let Err(error) = table.remove(*key)
                        {
                            tracing::warn!(%error, ?key, "cannot remove auth entry");
                        }
                        return false;
                    }
                    if expired {
                        if let Err(error) = table.remove(*key) {
                            tracing::warn!(%error, ?key, "cannot remove expired auth entry");
                        }
                        state.expiry = None;
                        state.evidence = None;
                        state.probe_delay = config.min_reauth_interval;
                        state.refresh_at = Some(state.reauth_floor(&config, now));
                    }
                    true
                });
            }
            observer.entries(pairs.values().filter(|s| s.expiry.is_some()).count());

            // Start what is due, within the concurrency bound.
            for (key, state) in pairs.iter_mut() {
                if in_flight >= config.max_concurrent {
                    break;
                }
                let (Some(desired), Some(addr)) = (state.desired.clone(), state.addr) else { continue };
                let due = state.refresh_at.is_none_or(|r| r <= now) && state.next_attempt <= now;
                if state.in_flight || !due {
                    continue;
                }
                state.in_flight = true;
                in_flight += 1;
                let tx = tx.clone();
                let authenticator = authenticator.clone();
                let clock = clock.clone();
                let key = *key;
                let generation = state.generation;
                tokio::spawn(async move {
                    let started = clock.now();
                    let clock = Instant::now();
                    let result = authenticator.authenticate(&desired.dst_id, &desired.src_id, addr).await;
                    let _ = tx.send(Command::Done { key, generation, started, result, took: clock.elapsed() });
                });
            }
        }
    });
    handle
}

/// The proofs of one pair, one per node.
fn proofs_of(pairs: &mut BTreeMap<ProofKey, PairState>, pair: PairKey) -> impl Iterator<Item = (&ProofKey, &mut PairState)> {
    let first = ProofKey { pair, node: NodeId::This };
    pairs.range_mut(first..).take_while(move |(k, _)| k.pair == pair)
}

fn refresh_instant(config: &AuthManagerConfig, started: SystemTime, expiry: SystemTime, now: Instant) -> Instant {
    let lifetime = expiry.duration_since(started).unwrap_or_default();
    let by_fraction = lifetime.mul_f64(config.refresh_fraction.clamp(0.0, 1.0));
    let by_margin = lifetime.saturating_sub(config.refresh_margin);
    // Pairs proven together (a scale-up, a restart) would all come due together, every
    // lifetime again: each refreshes up to REFRESH_JITTER earlier, at random.
    now + by_fraction.min(by_margin).mul_f64(1.0 - REFRESH_JITTER * fastrand::f64())
}

/// The share of the time until a refresh by which it may come earlier.
const REFRESH_JITTER: f64 = 0.1;

/// How long the re-authentication of a pair whose entry expires at `expiry` may wait after a
/// rotation: never into the refresh margin, so the entry cannot lapse meanwhile.
fn rotation_window(config: &AuthManagerConfig, wall: SystemTime, expiry: SystemTime) -> Duration {
    let left = expiry.duration_since(wall).unwrap_or_default().saturating_sub(config.refresh_margin);
    config.rotation_spread.min(left / 2)
}

/// The next attempt of a pair whose local identity has no SVID: the identity's issuance starts
/// it at once ([`Command::Rotated`]), so this only guards against a missed announcement.
const UNTIL_LOCAL_SVID_RETRY: Duration = Duration::from_secs(60);

fn backoff(config: &AuthManagerConfig, state: &mut PairState, now: Instant) {
    state.failures = state.failures.saturating_add(1);
    let exp = config.initial_backoff.saturating_mul(1u32 << state.failures.min(16).saturating_sub(1));
    let capped = exp.min(config.max_backoff);
    // Up to 20% jitter so many pairs failing together do not retry in lockstep.
    let jitter = capped.mul_f64(fastrand::f64() * 0.2);
    state.next_attempt = now + capped + jitter;
}

fn next_wake(pairs: &BTreeMap<ProofKey, PairState>, can_start: bool, wall: SystemTime) -> Option<Instant> {
    let now = Instant::now();
    pairs
        .values()
        .flat_map(|s| {
            let start =
                (can_start && s.desired.is_some() && !s.in_flight).then(|| s.refresh_at.map_or(s.next_attempt, |r| r.max(s.next_attempt)));
            let expire = s.expiry.map(|e| now + e.duration_since(wall).unwrap_or_default());
            [start, expire]
        })
        .flatten()
        .min()
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
pub(crate) mod fake;

#[cfg(test)]
mod tests;
