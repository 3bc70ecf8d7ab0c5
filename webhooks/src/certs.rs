//! The self-managed serving certificate: a CA and a serving certificate it signed (one
//! "generation"), kept in a Secret, with the `caBundle` of the ValidatingWebhookConfiguration
//! kept matching, rotated before expiry without one failed admission call.
//!
//! A rotation never makes the API server see a certificate it does not trust yet:
//! 1. a new generation is made and stored as `next`; the active one keeps being served;
//! 2. the `caBundle` is patched to hold both CAs; the time is recorded once it is written;
//! 3. after `overlap` (time for the API server to load the new bundle) the new generation
//!    becomes active and is served; the old CA stays in the bundle as `previous`;
//! 4. after another `overlap` (time for other replicas to switch) the old CA leaves the bundle.
//!
//! Every step is decided from the Secret and the clock alone and written with optimistic
//! concurrency, so several replicas and restarts at any step agree. The API is behind the
//! [`Backend`] trait; [`kube_backend`] talks to the real one, tests use an in-memory double.

pub mod generation;
pub mod kube_backend;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::ByteString;
use tokio::sync::watch;
use tracing::{error, info, warn};

pub use generation::Generation;

use crate::config::SelfManagedCerts;
use crate::metrics::Metrics;
use crate::tls::{CertStore, ServingCert, TlsError};

/// Secret keys of the active generation (the `tls.*` pair is what any consumer can mount).
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// Secret keys of the generation being rolled out.
pub const NEXT_CA_CERT: &str = "next-ca.crt";
pub const NEXT_CA_KEY: &str = "next-ca.key";
pub const NEXT_TLS_CERT: &str = "next-tls.crt";
pub const NEXT_TLS_KEY: &str = "next-tls.key";
/// The retired CA, still in the bundle for a while.
pub const PREVIOUS_CA_CERT: &str = "previous-ca.crt";
/// Annotations: unix seconds.
pub const NEXT_PUBLISHED_AT: &str = "meshauth.io/next-ca-published-at";
pub const PREVIOUS_CA_UNTIL: &str = "meshauth.io/previous-ca-until";
/// Annotation: the DNS names the active generation was made for, comma-separated.
pub const DNS_NAMES: &str = "meshauth.io/dns-names";

/// Why a certificate step failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate Secret is unusable: {0}")]
    BadSecret(String),
    #[error("a generated certificate does not load: {0}")]
    Tls(#[from] TlsError),
    #[error("{what} failed: {source}")]
    Api { what: String, source: kube::Error },
}

/// Everything kept in the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertState {
    pub active: Generation,
    pub next: Option<Generation>,
    /// When a `caBundle` holding the next CA was written.
    pub next_published_at: Option<SystemTime>,
    /// A retired CA still in the bundle, and until when.
    pub previous_ca: Option<(String, SystemTime)>,
    /// The names the active generation was made for.
    pub dns_names: Vec<String>,
}

impl CertState {
    pub fn new(active: Generation, dns_names: Vec<String>) -> Self {
        Self { active, next: None, next_published_at: None, previous_ca: None, dns_names }
    }

    /// The CAs the API server must trust now, oldest first.
    pub fn bundle(&self) -> String {
        let mut bundle = String::new();
        let cas = self.previous_ca.iter().map(|(ca, _)| ca).chain([&self.active.ca_cert]).chain(self.next.iter().map(|g| &g.ca_cert));
        for ca in cas {
            bundle.push_str(ca.trim_end());
            bundle.push('\n');
        }
        bundle
    }

    /// Secret data and annotations.
    pub fn to_secret(&self) -> (BTreeMap<String, ByteString>, BTreeMap<String, String>) {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            data.insert(k.to_owned(), ByteString(v.as_bytes().to_vec()));
        };
        put(CA_CERT, &self.active.ca_cert);
        put(CA_KEY, &self.active.ca_key);
        put(TLS_CERT, &self.active.tls_cert);
        put(TLS_KEY, &self.active.tls_key);
        if let Some(next) = &self.next {
            put(NEXT_CA_CERT, &next.ca_cert);
            put(NEXT_CA_KEY, &next.ca_key);
            put(NEXT_TLS_CERT, &next.tls_cert);
            put(NEXT_TLS_KEY, &next.tls_key);
        }
        if let Some((ca, _)) = &self.previous_ca {
            put(PREVIOUS_CA_CERT, ca);
        }
        let mut annotations = BTreeMap::new();
        annotations.insert(DNS_NAMES.to_owned(), self.dns_names.join(","));
        if let Some(at) = self.next_published_at {
            annotations.insert(NEXT_PUBLISHED_AT.to_owned(), unix_secs(at).to_string());
        }
        if let Some((_, until)) = &self.previous_ca {
            annotations.insert(PREVIOUS_CA_UNTIL.to_owned(), unix_secs(*until).to_string());
        }
        (data, annotations)
    }

    /// Reads what [`Self::to_secret`] wrote.
    pub fn from_secret(data: &BTreeMap<String, ByteString>, annotations: &BTreeMap<String, String>) -> Result<Self, CertError> {
        let get = |k: &str| -> Result<Option<String>, CertError> {
            data.get(k)
                .map(|v| String::from_utf8(v.0.clone()).map_err(|_| CertError::BadSecret(format!("{k} is not UTF-8 PEM"))))
                .transpose()
        };
        let need = |k: &str| get(k)?.ok_or_else(|| CertError::BadSecret(format!("{k} is missing")));
        let time = |k: &str| -> Result<Option<SystemTime>, CertError> {
            annotations
                .get(k)
                .map(|v| {
                    v.parse::<u64>()
                        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
                        .map_err(|_| CertError::BadSecret(format!("annotation {k} is not unix seconds: {v:?}")))
                })
                .transpose()
        };
        let active = Generation::from_pem(need(CA_CERT)?, need(CA_KEY)?, need(TLS_CERT)?, need(TLS_KEY)?)?;
        let next = match get(NEXT_CA_CERT)? {
            Some(ca) => Some(Generation::from_pem(ca, need(NEXT_CA_KEY)?, need(NEXT_TLS_CERT)?, need(NEXT_TLS_KEY)?)?),
            None => None,
        };
        let previous_ca = match (get(PREVIOUS_CA_CERT)?, time(PREVIOUS_CA_UNTIL)?) {
            (Some(ca), Some(until)) => Some((ca, until)),
            (Some(ca), None) => Some((ca, UNIX_EPOCH)),
            (None, _) => None,
        };
        let dns_names =
            annotations.get(DNS_NAMES).map(|n| n.split(',').filter(|s| !s.is_empty()).map(str::to_owned).collect()).unwrap_or_default();
        Ok(Self { active, next_published_at: next.as_ref().and(time(NEXT_PUBLISHED_AT)?), next, previous_ca, dns_names })
    }
}

pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// An opaque version for optimistic concurrency (the Secret's `resourceVersion`).
pub type Version = String;

/// What [`Backend::load`] finds: nothing, or a state (unusable when it does not parse) and its
/// version.
pub type Stored = Option<(Result<CertState, CertError>, Version)>;

/// Where the state and the `caBundle` live.
pub trait Backend: Send + Sync {
    /// The stored state and its version, `None` when there is none yet.
    fn load(&self) -> impl Future<Output = Result<Stored, CertError>> + Send;
    /// Stores a first state; `None` when another writer was first.
    fn create(&self, state: &CertState) -> impl Future<Output = Result<Option<Version>, CertError>> + Send;
    /// Replaces the state if it is still at `version`; `None` on a conflict.
    fn replace(&self, state: &CertState, version: &Version) -> impl Future<Output = Result<Option<Version>, CertError>> + Send;
    /// Makes every webhook of the configuration trust exactly `bundle`. `false` when the
    /// configuration does not exist (yet) or changed under us.
    fn publish_bundle(&self, bundle: &[u8]) -> impl Future<Output = Result<bool, CertError>> + Send;
}

/// What one check did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tick {
    pub created: bool,
    pub rotation_started: bool,
    pub published: bool,
    pub promoted: bool,
    pub previous_retired: bool,
    /// Another writer changed the Secret first; the next check continues.
    pub conflict: bool,
}

/// Keeps the Secret, the `caBundle` and the served certificate in step.
pub struct CertManager<B> {
    backend: B,
    config: SelfManagedCerts,
    store: Arc<CertStore>,
    metrics: Arc<Metrics>,
    served: Option<String>,
}

impl<B: Backend> CertManager<B> {
    pub fn new(backend: B, config: SelfManagedCerts, store: Arc<CertStore>, metrics: Arc<Metrics>) -> Self {
        Self { backend, config, store, metrics, served: None }
    }

    fn generate(&self, now: SystemTime) -> Result<Generation, CertError> {
        Generation::new(&self.config.dns_names, now, self.config.validity)
    }

    fn rotation_due(&self, state: &CertState, now: SystemTime) -> bool {
        let renew_at = state.active.not_after.checked_sub(self.config.renew_before).unwrap_or(UNIX_EPOCH);
        let mut want = self.config.dns_names.clone();
        let mut have = state.dns_names.clone();
        want.sort();
        have.sort();
        now >= renew_at || want != have
    }

    /// One check at time `now`.
    pub async fn tick(&mut self, now: SystemTime) -> Result<Tick, CertError> {
        let mut tick = Tick::default();
        let conflict = Tick { conflict: true, ..Tick::default() };
        let (mut state, mut version) = match self.backend.load().await? {
            Some((Ok(state), version)) => (state, version),
            Some((Err(err), version)) => {
                error!(error = %err, "certificate Secret is unusable; replacing it with a new CA and certificate");
                let state = CertState::new(self.generate(now)?, self.config.dns_names.clone());
                match self.backend.replace(&state, &version).await? {
                    Some(v) => (state, v),
                    None => return Ok(conflict),
                }
            }
            None => {
                let state = CertState::new(self.generate(now)?, self.config.dns_names.clone());
                match self.backend.create(&state).await? {
                    Some(v) => {
                        info!("certificate Secret created with a new CA and serving certificate");
                        tick.created = true;
                        (state, v)
                    }
                    None => return Ok(conflict),
                }
            }
        };

        if state.next.is_none() && now >= state.active.not_after {
            // Expired (the webhook was down): nothing trusts the old one any more, so no overlap.
            warn!("serving certificate expired; replacing it at once");
            let old = std::mem::replace(&mut state.active, self.generate(now)?);
            state.previous_ca = Some((old.ca_cert, now + self.config.overlap));
            state.dns_names = self.config.dns_names.clone();
            if !self.store(&state, &mut version).await? {
                return Ok(conflict);
            }
            tick.promoted = true;
        } else if state.next.is_none() && self.rotation_due(&state, now) {
            state.next = Some(self.generate(now)?);
            state.next_published_at = None;
            if !self.store(&state, &mut version).await? {
                return Ok(conflict);
            }
            info!("rotation started: new CA made, publishing it in the caBundle before serving its certificate");
            tick.rotation_started = true;
        }

        let published = self.backend.publish_bundle(state.bundle().as_bytes()).await?;
        tick.published = published;
        if published && state.next.is_some() && state.next_published_at.is_none() {
            state.next_published_at = Some(now);
            if !self.store(&state, &mut version).await? {
                return Ok(conflict);
            }
        }

        // Promote once the API server has had `overlap` to load the bundle with the new CA.
        if state.next_published_at.is_some_and(|at| now >= at + self.config.overlap)
            && let Some(next) = state.next.take()
        {
            let old = std::mem::replace(&mut state.active, next);
            state.previous_ca = Some((old.ca_cert, now + self.config.overlap));
            state.next_published_at = None;
            state.dns_names = self.config.dns_names.clone();
            if !self.store(&state, &mut version).await? {
                return Ok(conflict);
            }
            info!(not_after = ?state.active.not_after, "rotation: serving the certificate of the new CA; the old CA stays trusted for the overlap");
            self.metrics.certificate_rotated();
            tick.promoted = true;
        }

        // Retire the old CA once every replica has had `overlap` to switch.
        if state.previous_ca.as_ref().is_some_and(|(_, until)| now >= *until) {
            state.previous_ca = None;
            if !self.store(&state, &mut version).await? {
                return Ok(conflict);
            }
            self.backend.publish_bundle(state.bundle().as_bytes()).await?;
            info!("rotation finished: old CA removed from the caBundle");
            tick.previous_retired = true;
        }

        self.serve(&state.active)?;
        Ok(tick)
    }

    /// Writes `state` if the Secret is still at `version`. `false` when another writer was
    /// first: then nothing new is served and the next check decides again.
    async fn store(&self, state: &CertState, version: &mut Version) -> Result<bool, CertError> {
        match self.backend.replace(state, version).await? {
            Some(v) => {
                *version = v;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn serve(&mut self, active: &Generation) -> Result<(), CertError> {
        if self.served.as_deref() == Some(active.tls_cert.as_str()) {
            return Ok(());
        }
        let cert = ServingCert::from_pem(active.tls_cert.as_bytes(), active.tls_key.as_bytes(), "the certificate Secret")
            .inspect_err(|_| self.metrics.certificate_load_failed())?;
        self.metrics.certificate_loaded(cert.not_after);
        self.store.set(cert);
        self.served = Some(active.tls_cert.clone());
        Ok(())
    }

    /// Checks every `check_interval` until shutdown; a failed check is logged and retried.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(self.config.check_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval.tick().await;
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    if let Err(err) = self.tick(SystemTime::now()).await {
                        warn!(error = %err, "certificate check failed; retrying at the next check");
                    }
                }
                _ = crate::wait_for_shutdown(&mut shutdown) => return,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory [`Backend`] that records every `caBundle` it was given, with a clock the test
    //! sets, so tests can check what a lagging API server would have trusted.

    use super::*;
    use std::sync::Mutex;

    type SecretContents = (BTreeMap<String, ByteString>, BTreeMap<String, String>);

    #[derive(Default)]
    pub struct Memory {
        pub secret: Mutex<Option<(SecretContents, u64)>>,
        /// `None`: the webhook configuration does not exist.
        pub bundle: Mutex<Option<Vec<u8>>>,
        /// Every bundle written, with the time of the clock then.
        pub history: Mutex<Vec<(SystemTime, Vec<u8>)>>,
        pub now: Mutex<Option<SystemTime>>,
    }

    impl Memory {
        pub fn with_configuration() -> Arc<Self> {
            let m = Self::default();
            *m.bundle.lock().expect("lock") = Some(Vec::new());
            Arc::new(m)
        }
    }

    impl Backend for Arc<Memory> {
        async fn load(&self) -> Result<Stored, CertError> {
            let secret = self.secret.lock().expect("lock").clone();
            Ok(secret.map(|((data, annotations), v)| (CertState::from_secret(&data, &annotations), v.to_string())))
        }

        async fn create(&self, state: &CertState) -> Result<Option<Version>, CertError> {
            let mut secret = self.secret.lock().expect("lock");
            if secret.is_some() {
                return Ok(None);
            }
            *secret = Some((state.to_secret(), 1));
            Ok(Some("1".into()))
        }

        async fn replace(&self, state: &CertState, version: &Version) -> Result<Option<Version>, CertError> {
            let mut secret = self.secret.lock().expect("lock");
            match secret.as_ref() {
                Some((_, v)) if v.to_string() == *version => {
                    let v = v + 1;
                    *secret = Some((state.to_secret(), v));
                    Ok(Some(v.to_string()))
                }
                _ => Ok(None),
            }
        }

        async fn publish_bundle(&self, bundle: &[u8]) -> Result<bool, CertError> {
            let mut current = self.bundle.lock().expect("lock");
            let Some(current) = current.as_mut() else { return Ok(false) };
            if current.as_slice() != bundle {
                *current = bundle.to_vec();
                let now = self.now.lock().expect("lock").unwrap_or(UNIX_EPOCH);
                self.history.lock().expect("lock").push((now, bundle.to_vec()));
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::Memory;
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    fn config() -> SelfManagedCerts {
        SelfManagedCerts {
            dns_names: vec!["meshauth-webhook.meshauth-system.svc".into(), "127.0.0.1".into()],
            validity: Duration::from_secs(3600),
            renew_before: Duration::from_secs(1200),
            overlap: Duration::from_secs(60),
            check_interval: Duration::from_secs(10),
            ..Default::default()
        }
    }

    fn manager(backend: Arc<Memory>) -> (CertManager<Arc<Memory>>, Arc<CertStore>) {
        let store = Arc::new(CertStore::new());
        (CertManager::new(backend, config(), store.clone(), Arc::new(Metrics::new())), store)
    }

    /// Whether the served leaf is valid at `now` and signed by a CA of `bundle`.
    fn trusted(store: &CertStore, bundle: &[u8], now: SystemTime) -> bool {
        let served = store.current().expect("serving");
        let leaf_der = served.key.cert[0].clone();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).expect("leaf");
        let t = unix_secs(now) as i64;
        if leaf.validity().not_before.timestamp() > t || leaf.validity().not_after.timestamp() < t {
            return false;
        }
        CertificateDer::pem_slice_iter(bundle).filter_map(Result::ok).any(|ca_der| {
            let Ok((_, ca)) = x509_parser::parse_x509_certificate(&ca_der) else { return false };
            ca.subject() == leaf.issuer() && leaf.verify_signature(Some(ca.public_key())).is_ok()
        })
    }

    /// What an API server that loads bundles `lag` late trusts at `now`.
    fn lagged_bundle(backend: &Memory, now: SystemTime, lag: Duration) -> Vec<u8> {
        let history = backend.history.lock().expect("lock");
        history.iter().rev().find(|(at, _)| *at + lag <= now).or(history.first()).map(|(_, b)| b.clone()).unwrap_or_default()
    }

    #[tokio::test]
    async fn first_check_creates_secret_publishes_bundle_and_serves() {
        let backend = Memory::with_configuration();
        let (mut m, store) = manager(backend.clone());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let tick = m.tick(t0).await.expect("tick");
        assert!(tick.created && tick.published, "{tick:?}");
        let bundle = backend.bundle.lock().expect("lock").clone().expect("bundle");
        assert!(trusted(&store, &bundle, t0));
        // A second check changes nothing.
        let tick = m.tick(t0 + Duration::from_secs(10)).await.expect("tick");
        assert_eq!(tick, Tick { published: true, ..Default::default() });
    }

    /// Two replicas check every 10 s across three rotations, while an API server that loads
    /// caBundle changes up to 50 s late (less than the 60 s overlap) keeps calling: every served
    /// certificate must be trusted by what that API server trusts at that moment.
    #[tokio::test]
    async fn rotations_never_serve_an_untrusted_certificate() {
        let backend = Memory::with_configuration();
        let (mut a, store_a) = manager(backend.clone());
        let (mut b, store_b) = manager(backend.clone());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let lag = Duration::from_secs(50);
        let mut served = std::collections::BTreeSet::new();
        let mut promotions = 0;
        let mut retirements = 0;
        for step in 0..1200u64 {
            let now = t0 + Duration::from_secs(step * 5);
            *backend.now.lock().expect("lock") = Some(now);
            // The replicas alternate, each checking every 10 s.
            let (m, store) = if step % 2 == 0 { (&mut a, &store_a) } else { (&mut b, &store_b) };
            let tick = m.tick(now).await.expect("tick");
            promotions += usize::from(tick.promoted);
            retirements += usize::from(tick.previous_retired);
            for store in [&store_a, &store_b] {
                if store.current().is_none() {
                    continue;
                }
                let current = backend.bundle.lock().expect("lock").clone().expect("bundle");
                assert!(trusted(store, &current, now), "step {step}: served certificate not in the current bundle");
                let stale = lagged_bundle(&backend, now, lag);
                assert!(trusted(store, &stale, now), "step {step}: an API server {lag:?} behind would reject the served certificate");
            }
            served.insert(store.current().expect("serving").key.cert[0].to_vec());
        }
        // 100 minutes with 60-minute certificates renewed 20 minutes before expiry: a rotation
        // every ~40 minutes.
        assert!(promotions >= 2, "promotions {promotions}");
        assert!(retirements >= 2, "retirements {retirements}");
        assert!(served.len() >= 3, "served {} certificates", served.len());
    }

    #[tokio::test]
    async fn rotation_waits_for_the_webhook_configuration() {
        let backend = Arc::new(Memory::default());
        let (mut m, store) = manager(backend.clone());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        m.tick(t0).await.expect("tick");
        assert!(store.is_ready(), "serves even without a configuration");
        let first = store.current().expect("cert").key.cert[0].to_vec();
        // Rotation due, but the new CA cannot be published: keep serving the old certificate.
        let due = t0 + Duration::from_secs(2500);
        let tick = m.tick(due).await.expect("tick");
        assert!(tick.rotation_started && !tick.published);
        let tick = m.tick(due + Duration::from_secs(600)).await.expect("tick");
        assert!(!tick.promoted);
        assert_eq!(store.current().expect("cert").key.cert[0].to_vec(), first);
        // The configuration appears: publish, then promote after the overlap.
        *backend.bundle.lock().expect("lock") = Some(Vec::new());
        let at = due + Duration::from_secs(700);
        let tick = m.tick(at).await.expect("tick");
        assert!(tick.published && !tick.promoted);
        let tick = m.tick(at + Duration::from_secs(60)).await.expect("tick");
        assert!(tick.promoted);
        assert_ne!(store.current().expect("cert").key.cert[0].to_vec(), first);
    }

    #[tokio::test]
    async fn a_changed_dns_name_list_rotates_and_an_expired_certificate_is_replaced_at_once() {
        let backend = Memory::with_configuration();
        let (mut m, _) = manager(backend.clone());
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        m.tick(t0).await.expect("tick");
        m.config.dns_names.push("other.svc".into());
        assert!(m.tick(t0 + Duration::from_secs(10)).await.expect("tick").rotation_started);

        let backend = Memory::with_configuration();
        let (mut m, store) = manager(backend.clone());
        m.tick(t0).await.expect("tick");
        let later = t0 + Duration::from_secs(7200);
        let tick = m.tick(later).await.expect("tick");
        assert!(tick.promoted, "{tick:?}");
        let bundle = backend.bundle.lock().expect("lock").clone().expect("bundle");
        assert!(trusted(&store, &bundle, later));
    }

    #[test]
    fn state_round_trips_through_the_secret() {
        let now = SystemTime::now();
        let g1 = Generation::new(&["a.svc".into()], now, Duration::from_secs(3600)).expect("gen");
        let g2 = Generation::new(&["a.svc".into()], now, Duration::from_secs(3600)).expect("gen");
        let state = CertState {
            active: g1.clone(),
            next: Some(g2),
            next_published_at: Some(UNIX_EPOCH + Duration::from_secs(100)),
            previous_ca: Some((g1.ca_cert.clone(), UNIX_EPOCH + Duration::from_secs(200))),
            dns_names: vec!["a.svc".into()],
        };
        let (data, annotations) = state.to_secret();
        assert_eq!(CertState::from_secret(&data, &annotations).expect("parses"), state);
        let mut broken = data.clone();
        broken.remove(TLS_KEY);
        let err = CertState::from_secret(&broken, &annotations).expect_err("broken");
        assert!(err.to_string().contains("tls.key is missing"), "{err}");
    }
}
