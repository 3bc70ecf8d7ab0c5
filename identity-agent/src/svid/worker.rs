//! The store's one worker task: it owns the Workload API stream, reconnects with jittered
//! backoff, and turns each update into per-identity states, rotations and withdrawals.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use meshauth_crds::SpiffeId;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Inner, SourceError, StoreConfig, Svid, SvidError, SvidSource, SvidState, Unavailable, X509Update};
use crate::verify::{BundleSet, TrustBundle};

/// Capped exponential backoff with full jitter: the n-th delay is uniform in
/// `[base·2ⁿ / 2, base·2ⁿ]`, capped at `max` (half-jitter keeps a floor so a flapping source
/// is not hammered).
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0 }
    }

    pub(super) fn reset(&mut self) {
        self.attempt = 0;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let floor = ceiling / 2;
        floor + ceiling.saturating_sub(floor).mul_f64(fastrand::f64())
    }
}

pub(super) struct Worker {
    inner: Arc<Inner>,
    source: Arc<dyn SvidSource>,
    config: StoreConfig,
    backoff: Backoff,
    /// When the first sync must have happened by (cleared once it did or it was declared late).
    initial_deadline: Option<Instant>,
    /// When "no identity issued" began, while it lasts and we still hold SVIDs.
    no_identity_since: Option<Instant>,
}

impl Worker {
    pub(super) fn new(inner: Arc<Inner>, source: Arc<dyn SvidSource>, config: StoreConfig) -> Self {
        let backoff = Backoff::new(config.initial_backoff, config.max_backoff);
        let initial_deadline = Some(Instant::now() + config.initial_sync_timeout);
        Self { inner, source, config, backoff, initial_deadline, no_identity_since: None }
    }

    pub(super) async fn run(mut self) {
        loop {
            let sync_timeout = self.config.initial_sync_timeout;
            let source = self.source.clone();
            let attempt = async move {
                let mut stream = source.connect().await?;
                let first = stream.next().await.ok_or(SourceError::Closed)??;
                Ok::<_, SourceError>((stream, first))
            };
            let attempt = async move {
                tokio::time::timeout(sync_timeout, attempt).await.unwrap_or(Err(SourceError::InitialSyncTimeout(sync_timeout)))
            };
            match self.drive(attempt).await {
                Ok((mut stream, first)) => {
                    self.inner.connected.send_replace(true);
                    tracing::info!("connected to the workload API");
                    self.apply(first);
                    let end = loop {
                        match self.drive(stream.next()).await {
                            Some(Ok(update)) => self.apply(update),
                            Some(Err(e)) => break e,
                            None => break SourceError::Closed,
                        }
                    };
                    self.inner.connected.send_replace(false);
                    if end == SourceError::NoIdentityIssued {
                        self.no_identity_issued();
                    } else {
                        tracing::warn!(error = %end, "workload API stream ended; keeping SVIDs until they expire");
                    }
                }
                Err(SourceError::NoIdentityIssued) => self.no_identity_issued(),
                Err(e) => {
                    tracing::warn!(error = %e, "workload API unavailable");
                }
            }
            let delay = self.backoff.next_delay();
            tracing::debug!(?delay, "reconnecting to the workload API after backoff");
            self.drive(tokio::time::sleep(delay)).await;
        }
    }

    /// Runs `fut` while handling the timers that must fire meanwhile: SVID expiry and the
    /// first-sync deadline.
    async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        tokio::pin!(fut);
        loop {
            let timer = self.next_timer();
            tokio::select! {
                out = &mut fut => return out,
                () = sleep_until(timer) => self.on_timer(),
            }
        }
    }

    /// "No identity issued": an empty answer when there is nothing to keep, else an outage
    /// until the grace period ends (then the empty answer withdraws everything).
    fn no_identity_issued(&mut self) {
        let now = self.inner.clock.now();
        let holding =
            self.inner.lock_states().values().any(|tx| matches!(&*tx.borrow(), SvidState::Available(svid) if svid.not_after > now));
        if !holding {
            self.no_identity_since = None;
            self.apply(X509Update::default());
            return;
        }
        let since = *self.no_identity_since.get_or_insert_with(Instant::now);
        if since.elapsed() >= self.config.no_identity_grace {
            self.withdraw_all_after_grace();
        } else {
            tracing::warn!(grace = ?self.config.no_identity_grace, "workload API issues no identity; keeping SVIDs through the grace period");
        }
    }

    fn withdraw_all_after_grace(&mut self) {
        tracing::warn!(grace = ?self.config.no_identity_grace, "workload API issued no identity for the whole grace period; withdrawing every SVID");
        self.no_identity_since = None;
        self.apply(X509Update::default());
    }

    fn next_timer(&self) -> Option<Instant> {
        let now_wall = self.inner.clock.now();
        let now = Instant::now();
        let expiry = self
            .inner
            .lock_states()
            .values()
            .filter_map(|tx| match &*tx.borrow() {
                SvidState::Available(svid) => Some(now + svid.not_after.duration_since(now_wall).unwrap_or(Duration::ZERO)),
                _ => None,
            })
            .min();
        let grace_end = self.no_identity_since.map(|since| since + self.config.no_identity_grace);
        [expiry, self.initial_deadline, grace_end].into_iter().flatten().min()
    }

    fn on_timer(&mut self) {
        if self.no_identity_since.is_some_and(|since| since.elapsed() >= self.config.no_identity_grace) {
            self.withdraw_all_after_grace();
        }
        if self.initial_deadline.is_some_and(|d| d <= Instant::now()) {
            self.initial_deadline = None;
            tracing::warn!(timeout = ?self.config.initial_sync_timeout, "no SVIDs from the workload API in time");
            let unreachable = SvidState::Unavailable(Unavailable::SourceUnreachable);
            *self.inner.default_state.lock().unwrap_or_else(PoisonError::into_inner) = unreachable.clone();
            for tx in self.inner.lock_states().values() {
                tx.send_if_modified(|state| {
                    let waiting = matches!(state, SvidState::Initializing);
                    if waiting {
                        *state = unreachable.clone();
                    }
                    waiting
                });
            }
        }
        let now = self.inner.clock.now();
        for (id, tx) in self.inner.lock_states().iter() {
            tx.send_if_modified(|state| match state {
                SvidState::Available(svid) if svid.not_after <= now => {
                    tracing::warn!(%id, "SVID expired with no newer one");
                    *state = SvidState::Unavailable(Unavailable::Expired);
                    true
                }
                _ => false,
            });
        }
    }

    fn apply(&mut self, update: X509Update) {
        let now = self.inner.clock.now();
        if !update.svids.is_empty() {
            self.no_identity_since = None;
        }
        if !update.bundles.is_empty() {
            let mut set = BundleSet::new();
            for (td, certs) in update.bundles {
                match TrustBundle::new(&td, certs) {
                    Ok(bundle) => set.insert(bundle),
                    Err(e) => tracing::warn!(trust_domain = %td, error = %e, "ignoring unusable bundle"),
                }
            }
            // Every update carries the bundles; only a real change makes the auth manager
            // check its proofs again.
            let same = same_bundles(&self.inner.bundles.borrow(), &set);
            if !same {
                self.inner.bundles.send_replace(Arc::new(set));
            }
        }
        let bundles = self.bundles();
        let mut fresh: HashMap<SpiffeId, Result<Svid, SvidError>> = HashMap::new();
        for material in &update.svids {
            match Svid::from_material(material, &bundles, now) {
                Ok(svid) => {
                    fresh.insert(svid.id.clone(), Ok(svid));
                }
                Err(e) => {
                    tracing::error!(spiffe_id = %material.spiffe_id, error = %e, "refusing SVID from the workload API");
                    if let Ok(id) = SpiffeId::parse(&material.spiffe_id) {
                        fresh.entry(id).or_insert(Err(e));
                    }
                }
            }
        }
        if !update.svids.is_empty() {
            self.backoff.reset();
        }
        self.initial_deadline = None;
        *self.inner.default_state.lock().unwrap_or_else(PoisonError::into_inner) = SvidState::Unavailable(Unavailable::NotIssued);

        let mut rotated = Vec::new();
        let mut withdrawn = Vec::new();
        let mut states = self.inner.lock_states();
        for (id, tx) in states.iter() {
            let next = fresh.remove(id);
            tx.send_if_modified(|state| {
                let was_usable = matches!(&*state, SvidState::Available(svid) if svid.not_after > now);
                let changed = transition(id, state, next, now, &mut rotated);
                if was_usable && !matches!(&*state, SvidState::Available(_)) {
                    withdrawn.push(id.clone());
                }
                changed
            });
        }
        for (id, next) in fresh {
            let mut state = SvidState::Initializing;
            transition(&id, &mut state, Some(next), now, &mut rotated);
            states.insert(id, watch::channel(state).0);
        }
        drop(states);
        for id in rotated {
            tracing::info!(%id, "SVID issued or rotated");
            // No subscriber is fine: nobody needs to re-authenticate yet.
            let _ = self.inner.rotations.send(id);
        }
        for id in withdrawn {
            tracing::warn!(%id, "SVID withdrawn before its expiry");
            let _ = self.inner.withdrawals.send(id);
        }
    }

    fn bundles(&self) -> Arc<BundleSet> {
        self.inner.bundles.borrow().clone()
    }
}

/// The next state of one identity given what the latest update says about it.
fn transition(
    id: &SpiffeId,
    state: &mut SvidState,
    next: Option<Result<Svid, SvidError>>,
    now: SystemTime,
    rotated: &mut Vec<SpiffeId>,
) -> bool {
    match (next, &*state) {
        (Some(Ok(svid)), SvidState::Available(old)) if old.same_cert(&svid) => false,
        (Some(Ok(svid)), _) => {
            *state = SvidState::Available(Arc::new(svid));
            rotated.push(id.clone());
            true
        }
        // A bad SVID does not displace a good one that is still valid: keep serving it.
        (Some(Err(_)), SvidState::Available(old)) if old.not_after > now => false,
        (Some(Err(_)), _) => replace(state, SvidState::Unavailable(Unavailable::Invalid)),
        (None, _) => replace(state, SvidState::Unavailable(Unavailable::NotIssued)),
    }
}

fn same_bundles(a: &BundleSet, b: &BundleSet) -> bool {
    a.len() == b.len() && b.iter().all(|bundle| a.get(bundle.trust_domain()).is_some_and(|old| old.certs() == bundle.certs()))
}

fn replace(state: &mut SvidState, next: SvidState) -> bool {
    let changed = !matches!(
        (&*state, &next),
        (SvidState::Unavailable(a), SvidState::Unavailable(b)) if a == b
    );
    *state = next;
    changed
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
