//! The handshake benchmark (`cargo bench -p meshauth-agent --bench handshake`): meshauth's
//! mutual handshake (SVIDs from the dev CA, both SPIFFE verifiers, the confirmation byte) beside
//! a plain rustls TLS 1.3 mutual handshake (webpki verifiers, same key type, same provider, same
//! confirmation byte) in the same run.
//!
//! Everything runs on one current-thread runtime, so one core does BOTH sides of every
//! handshake: the reported rate is "handshakes per core with client and server on it"; a node
//! agent does one side per handshake. Loopback TCP only.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshauth_agent::dev_issuer::DevCa;
use meshauth_agent::handshake::{HandshakeClient, HandshakeServer, HostedIdentities};
use meshauth_agent::svid::{StaticSource, StoreConfig, SvidMaterial, SvidStore, SystemClock, X509Update};
use meshauth_crds::{SpiffeId, TrustDomain};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// How long each throughput phase runs.
    pub duration: Duration,
    /// Handshakes in flight during the throughput phase.
    pub concurrency: usize,
    /// Sequential handshakes timed for the latency distribution.
    pub latency_samples: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self { duration: Duration::from_secs(5), concurrency: 16, latency_samples: 2000 }
    }
}

/// The result of one kind of handshake.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub name: &'static str,
    pub handshakes: u64,
    pub failures: u64,
    pub elapsed: Duration,
    /// Sequential latencies (client side, connect to confirmation), sorted.
    pub latencies: Vec<Duration>,
}

impl BenchResult {
    pub fn per_second(&self) -> f64 {
        self.handshakes as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        self.latencies[rank.min(self.latencies.len() - 1)]
    }
}

/// Both results.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub options: BenchOptions,
    pub meshauth: BenchResult,
    pub plain: BenchResult,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "mutual TLS 1.3 handshakes, ECDSA P-256, ring, loopback, one core for both sides \
             ({:?} per run, {} in flight; latency over {} sequential handshakes)",
            self.options.duration, self.options.concurrency, self.options.latency_samples
        )?;
        writeln!(f)?;
        writeln!(f, "| handshake | handshakes/s/core (both sides) | failures | p50 | p90 | p99 | max |")?;
        writeln!(f, "|---|---:|---:|---:|---:|---:|---:|")?;
        for r in [&self.meshauth, &self.plain] {
            writeln!(
                f,
                "| {} | {:.0} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs |",
                r.name,
                r.per_second(),
                r.failures,
                micros(r.percentile(50.0)),
                micros(r.percentile(90.0)),
                micros(r.percentile(99.0)),
                micros(r.percentile(100.0)),
            )?;
        }
        let ratio = self.meshauth.per_second() / self.plain.per_second().max(f64::EPSILON);
        writeln!(f)?;
        write!(f, "meshauth / plain rustls: {:.2}", ratio)
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("setup: {0}")]
    Setup(String),
}

fn setup<E: fmt::Display>(what: &'static str) -> impl Fn(E) -> BenchError {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// Everything is on loopback in the benchmark.
struct Loopback;

impl HostedIdentities for Loopback {
    fn is_hosted_here(&self, _id: &SpiffeId) -> bool {
        true
    }

    fn identity_hosted_at(&self, _id: &SpiffeId, node: IpAddr) -> bool {
        node.is_loopback()
    }

    fn is_node(&self, addr: IpAddr) -> bool {
        addr.is_loopback()
    }
}

/// Runs both benchmarks on a fresh current-thread runtime (one core).
pub fn run_handshake_bench(options: BenchOptions) -> Result<BenchReport, BenchError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(setup("runtime"))?;
    runtime.block_on(async move {
        let meshauth = meshauth_bench(&options).await?;
        let plain = plain_bench(&options).await?;
        Ok(BenchReport { options, meshauth, plain })
    })
}

async fn store_with(ca: &DevCa, id: &SpiffeId) -> Result<SvidStore, BenchError> {
    let issued = ca.issue(id, Duration::from_secs(3600), SystemTime::now()).map_err(setup("issue"))?;
    let update = X509Update {
        svids: vec![SvidMaterial { spiffe_id: id.to_string(), chain: issued.chain, key_pkcs8: issued.key_pkcs8, hint: None }],
        bundles: vec![(ca.trust_domain().to_string(), vec![ca.cert().clone()])],
    };
    let (store, _task) = SvidStore::spawn(Arc::new(StaticSource::new(update)), StoreConfig::default(), Arc::new(SystemClock));
    store.wait_available(id, Duration::from_secs(5)).await.map_err(setup("store"))?;
    Ok(store)
}

async fn meshauth_bench(options: &BenchOptions) -> Result<BenchResult, BenchError> {
    let td = TrustDomain::default();
    let ca = DevCa::generate(&td, SystemTime::now()).map_err(setup("CA"))?;
    let dst = td.service_account_id("bench", "dst");
    let src = td.service_account_id("bench", "src");
    let server_store = store_with(&ca, &src).await?;
    let client_store = store_with(&ca, &dst).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(setup("bind"))?;
    let addr = listener.local_addr().map_err(setup("bind"))?;
    let server = tokio::spawn(
        HandshakeServer::new(server_store, Arc::new(Loopback))
            .with_max_concurrent(options.concurrency * 2)
            // Every client of the benchmark is one source, 127.0.0.1.
            .with_max_per_source(options.concurrency * 2)
            .serve(listener),
    );
    let client = HandshakeClient::new(client_store, Arc::new(Loopback));
    let one = move || {
        let client = client.clone();
        let (dst, src) = (dst.clone(), src.clone());
        async move { client.authenticate(addr, &dst, &src).await.is_ok() }
    };
    let result = measure("meshauth (SPIFFE verifiers)", options, one).await;
    server.abort();
    Ok(result)
}

async fn measure<F, Fut>(name: &'static str, options: &BenchOptions, one: F) -> BenchResult
where
    F: Fn() -> Fut + Clone + 'static,
    Fut: std::future::Future<Output = bool> + 'static,
{
    // Warm up (page in code, fill allocator caches).
    for _ in 0..50 {
        one().await;
    }
    let mut latencies = Vec::with_capacity(options.latency_samples);
    let mut failures = 0;
    for _ in 0..options.latency_samples {
        let started = Instant::now();
        if one().await {
            latencies.push(started.elapsed());
        } else {
            failures += 1;
        }
    }
    latencies.sort();

    let deadline = Instant::now() + options.duration;
    let started = Instant::now();
    let local = tokio::task::LocalSet::new();
    let counts = local
        .run_until(async {
            let loops: Vec<_> = (0..options.concurrency.max(1))
                .map(|_| {
                    let one = one.clone();
                    tokio::task::spawn_local(async move {
                        let (mut ok, mut failed) = (0u64, 0u64);
                        while Instant::now() < deadline {
                            if one().await {
                                ok += 1;
                            } else {
                                failed += 1;
                            }
                        }
                        (ok, failed)
                    })
                })
                .collect();
            let mut total = (0u64, 0u64);
            for task in loops {
                if let Ok((ok, failed)) = task.await {
                    total.0 += ok;
                    total.1 += failed;
                }
            }
            total
        })
        .await;
    BenchResult { name, handshakes: counts.0, failures: failures + counts.1, elapsed: started.elapsed(), latencies }
}

/// A plain rustls mutual handshake: webpki verifiers, DNS-name certificates from one CA.
async fn plain_bench(options: &BenchOptions) -> Result<BenchResult, BenchError> {
    let provider = meshauth_agent::tls::crypto_provider();
    let ca_key = KeyPair::generate().map_err(setup("key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(setup("params"))?;
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca_params.distinguished_name.push(DnType::CommonName, "bench CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(setup("CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |name: &str| -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BenchError> {
        let key = KeyPair::generate().map_err(setup("key"))?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(setup("params"))?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).map_err(setup("leaf"))?;
        Ok((vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))))
    };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).map_err(setup("roots"))?;
    let roots = Arc::new(roots);

    let (server_chain, server_key) = leaf("server.bench")?;
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(setup("client verifier"))?;
    let mut server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup("server config"))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(server_chain, server_key)
        .map_err(setup("server cert"))?;
    server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server_config.send_tls13_tickets = 0;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

    let (client_chain, client_key) = leaf("client.bench")?;
    let mut client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(setup("client config"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .map_err(setup("client cert"))?;
    client_config.resumption = rustls::client::Resumption::disabled();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(setup("bind"))?;
    let addr: SocketAddr = listener.local_addr().map_err(setup("bind"))?;
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tls.write_all(&[1]).await;
                    let _ = tls.flush().await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    let one = move || {
        let connector = connector.clone();
        async move {
            let Ok(tcp) = TcpStream::connect(addr).await else { return false };
            let _ = tcp.set_nodelay(true);
            let Ok(name) = ServerName::try_from("server.bench") else { return false };
            let Ok(mut tls) = connector.connect(name, tcp).await else { return false };
            let mut byte = [0u8; 1];
            let ok = tls.read_exact(&mut byte).await.is_ok();
            let _ = tls.shutdown().await;
            ok
        }
    };
    let result = measure("plain rustls (webpki verifiers)", options, one).await;
    server.abort();
    Ok(result)
}
