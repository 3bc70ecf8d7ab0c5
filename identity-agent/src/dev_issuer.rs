//! The development SPIFFE issuer: a Workload API server backed by a local CA, for running the
//! agents without SPIRE (the demo, fast tests).
//!
//! Job: serve the same gRPC service SPIRE's agent serves (`SpiffeWorkloadAPI` over a Unix
//! socket; `FetchX509SVID` streaming, `FetchX509Bundles` streaming; JWT methods answer
//! `Unimplemented`), with the same `workload.spiffe.io: true` header check, so neither the
//! meshauth agent nor SPIRE's own client (`spire-agent api fetch x509 -socketPath`) can tell it
//! from SPIRE. It issues an X.509-SVID per configured identity with a configurable short TTL,
//! re-issues each at half its lifetime with a fresh key and pushes the new set on every open
//! stream. Its CA lives in the state directory and survives restarts; SVIDs are re-issued on
//! start (peers treat that as a rotation).
//!
//! What it must not do: pretend to attest workloads. Every caller on the socket gets every
//! configured identity, so the socket's file permissions are the only access control; it is a
//! development tool, never a production identity provider.

pub mod ca;
pub mod proto;
mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_crds::{SpiffeId, TrustDomain};
use tokio::sync::watch;

pub use ca::{DevCa, IssuedSvid};

/// Defaults of [`DevIssuerConfig`].
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(600);
/// Shorter TTLs make rotation storms and clock skew dominate; the Done-when rotation test uses 30 s.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(4);

/// How to run the dev issuer (`meshauth-agent dev-issuer --socket PATH --state-dir DIR
/// [--trust-domain TD] [--svid-ttl SECS] --identity SPIFFE_ID...`).
#[derive(Debug, Clone)]
pub struct DevIssuerConfig {
    /// The Unix socket to serve the Workload API on (a stale file there is replaced).
    pub socket: PathBuf,
    /// Where the CA certificate and key live (`ca.pem`, `ca-key.pem`).
    pub state_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    /// The identities to issue; each must be in `trust_domain`.
    pub identities: Vec<SpiffeId>,
}

impl DevIssuerConfig {
    pub fn new(socket: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            state_dir: state_dir.into(),
            trust_domain: TrustDomain::default(),
            svid_ttl: DEFAULT_SVID_TTL,
            identities: Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), DevIssuerError> {
        if self.svid_ttl < MIN_SVID_TTL {
            return Err(DevIssuerError::Config(format!(
                "--svid-ttl {}s is shorter than the minimum {}s",
                self.svid_ttl.as_secs(),
                MIN_SVID_TTL.as_secs()
            )));
        }
        if let Some(id) = self.identities.iter().find(|id| id.trust_domain() != self.trust_domain.as_str()) {
            return Err(DevIssuerError::Config(format!("--identity {id} is not in trust domain {}", self.trust_domain)));
        }
        Ok(())
    }
}

/// Why the dev issuer cannot run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DevIssuerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("CA: {0}")]
    Ca(String),
    #[error("gRPC server: {0}")]
    Serve(String),
}

/// What every stream serves right now.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The SVIDs of the configured identities.
    pub svids: Vec<IssuedSvid>,
    /// The CA certificate, DER: the trust domain's bundle.
    pub bundle: Vec<u8>,
    pub trust_domain: TrustDomain,
}

/// A running dev issuer: its CA, the issued SVIDs, and the identity set, changeable at run time
/// (the demo adds identities as pods appear).
#[derive(Clone)]
pub struct DevIssuer {
    ca: Arc<DevCa>,
    identities: Arc<watch::Sender<Vec<SpiffeId>>>,
    snapshot: Arc<watch::Sender<Arc<Snapshot>>>,
    ttl: Duration,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer").field("ca", &self.ca).field("ttl", &self.ttl).finish()
    }
}

impl DevIssuer {
    /// Loads (or creates) the CA, issues the first SVIDs and starts rotating them. Serving is
    /// separate ([`DevIssuer::serve`]) so tests and the demo can also read SVIDs in-process.
    pub fn start(config: &DevIssuerConfig) -> Result<Self, DevIssuerError> {
        config.validate()?;
        let ca = Arc::new(DevCa::load_or_create(&config.state_dir, &config.trust_domain, SystemTime::now())?);
        let (identities, _) = watch::channel(config.identities.clone());
        let initial = issue_all(&ca, &config.identities, &HashMap::new(), config.svid_ttl)?;
        let (snapshot, _) = watch::channel(Arc::new(initial));
        let issuer = Self { ca, identities: Arc::new(identities), snapshot: Arc::new(snapshot), ttl: config.svid_ttl };
        tokio::spawn(issuer.clone().rotate());
        Ok(issuer)
    }

    /// The trust domain's CA certificate.
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// Replaces the identity set; new ones are issued at once, removed ones dropped.
    pub fn set_identities(&self, identities: Vec<SpiffeId>) -> Result<(), DevIssuerError> {
        if let Some(id) = identities.iter().find(|id| id.trust_domain() != self.ca.trust_domain().as_str()) {
            return Err(DevIssuerError::Config(format!("identity {id} is not in trust domain {}", self.ca.trust_domain())));
        }
        self.identities.send_replace(identities);
        Ok(())
    }

    /// The SVIDs served right now.
    pub fn svids(&self) -> Vec<IssuedSvid> {
        self.snapshot.borrow().svids.clone()
    }

    /// A receiver that changes on every (re-)issue.
    pub fn watch_svids(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    /// Serves the Workload API on `socket` until the server fails or the task is dropped.
    pub async fn serve(&self, socket: &std::path::Path) -> Result<(), DevIssuerError> {
        service::serve(socket, self.snapshot.subscribe()).await
    }

    /// The rotation loop: re-issues each SVID at half its lifetime and issues/drops SVIDs when
    /// the identity set changes. Ends when every handle is gone.
    async fn rotate(self) {
        let mut identities = self.identities.subscribe();
        let snapshot = self.snapshot.clone();
        let ttl = self.ttl;
        let ca = self.ca.clone();
        // Holding the identity sender would keep this loop alive forever: drop it, so the loop
        // ends when the last handle does.
        drop(self);
        loop {
            let current = snapshot.borrow().clone();
            let due = current.svids.iter().map(|svid| svid.issued + (svid.not_after.duration_since(svid.issued).unwrap_or(ttl)) / 2).min();
            let wait = due.map(|due| due.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)).unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                changed = identities.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
            let wanted = identities.borrow_and_update().clone();
            let now = SystemTime::now();
            let keep: HashMap<SpiffeId, IssuedSvid> = current
                .svids
                .iter()
                .filter(|svid| svid.issued + (svid.not_after.duration_since(svid.issued).unwrap_or(ttl)) / 2 > now)
                .map(|svid| (svid.id.clone(), svid.clone()))
                .collect();
            match issue_all(&ca, &wanted, &keep, ttl) {
                Ok(next) => {
                    let rotated = next.svids.iter().filter(|s| !keep.contains_key(&s.id)).count();
                    tracing::info!(rotated, total = next.svids.len(), "dev issuer issued SVIDs");
                    snapshot.send_replace(Arc::new(next));
                }
                Err(e) => {
                    // Keep serving what we have; try again shortly rather than spin.
                    tracing::error!(error = %e, "dev issuer could not issue SVIDs");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

fn issue_all(ca: &DevCa, identities: &[SpiffeId], keep: &HashMap<SpiffeId, IssuedSvid>, ttl: Duration) -> Result<Snapshot, DevIssuerError> {
    let now = SystemTime::now();
    let mut svids = Vec::with_capacity(identities.len());
    let mut seen = std::collections::HashSet::new();
    for id in identities {
        if !seen.insert(id) {
            continue;
        }
        match keep.get(id) {
            Some(svid) => svids.push(svid.clone()),
            None => svids.push(ca.issue(id, ttl, now)?),
        }
    }
    Ok(Snapshot { svids, bundle: ca.cert().as_ref().to_vec(), trust_domain: ca.trust_domain().clone() })
}

/// Runs the dev issuer from `config` until the server fails (the caller handles signals by
/// dropping the future).
pub async fn run_dev_issuer(config: DevIssuerConfig) -> Result<(), DevIssuerError> {
    let issuer = DevIssuer::start(&config)?;
    tracing::info!(
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        trust_domain = %config.trust_domain,
        ttl_secs = config.svid_ttl.as_secs(),
        identities = config.identities.len(),
        "dev issuer serving the SPIFFE Workload API"
    );
    issuer.serve(&config.socket).await
}

#[cfg(test)]
mod tests;
