use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use meshauth_crds::{SpiffeId, TrustDomain};

use super::*;
use crate::svid::{StoreConfig, SvidStore, SystemClock, WorkloadApiSource};

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid id")
}

fn config(dir: &Path, ttl: Duration, ids: &[&str]) -> DevIssuerConfig {
    let mut config = DevIssuerConfig::new(dir.join("api.sock"), dir.join("state"));
    config.svid_ttl = ttl;
    config.identities = ids.iter().map(|s| id(s)).collect();
    config
}

/// Starts an issuer serving on its socket; waits until the socket accepts.
async fn serving(config: &DevIssuerConfig) -> (DevIssuer, tokio::task::JoinHandle<()>) {
    let issuer = DevIssuer::start(config).expect("start");
    let server = {
        let issuer = issuer.clone();
        let socket = config.socket.clone();
        tokio::spawn(async move {
            if let Err(e) = issuer.serve(&socket).await {
                panic!("serve: {e}");
            }
        })
    };
    for _ in 0..100 {
        if tokio::net::UnixStream::connect(&config.socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (issuer, server)
}

fn endpoint(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

#[tokio::test]
async fn the_spiffe_client_receives_svids_and_bundle_and_sees_rotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(4), &[ORDER, PAYMENT]);
    let (issuer, server) = serving(&config).await;

    let client = spiffe::WorkloadApiClient::connect_to(endpoint(&config.socket)).await.expect("connect");
    let mut stream = client.stream_x509_contexts().await.expect("stream");
    let first =
        tokio::time::timeout(Duration::from_secs(5), stream.next()).await.expect("first in time").expect("an item").expect("valid context");
    let ids: Vec<String> = first.svids().iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, vec![ORDER.to_owned(), PAYMENT.to_owned()]);
    let td = spiffe::TrustDomain::new("cluster.local").expect("td");
    let bundle = first.bundle_set().get(&td).expect("our bundle");
    assert_eq!(bundle.authorities()[0].as_bytes(), issuer.ca().cert().as_ref());

    // TTL 4 s: re-issued at 2 s with new keys, pushed on the open stream.
    let second = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("rotation in time")
        .expect("an item")
        .expect("valid context");
    assert_ne!(first.svids()[0].leaf().as_bytes(), second.svids()[0].leaf().as_bytes(), "rotated certificate");
    assert_ne!(first.svids()[0].private_key().as_bytes(), second.svids()[0].private_key().as_bytes());

    // The bundle API answers too.
    let bundles = client.fetch_x509_bundles().await.expect("bundles");
    assert!(bundles.get(&td).is_some());
    server.abort();
}

#[tokio::test]
async fn the_agent_store_tracks_the_dev_issuer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(4), &[ORDER]);
    let (_issuer, server) = serving(&config).await;
    let (store, task) = SvidStore::spawn(
        Arc::new(WorkloadApiSource::new(config.socket.display().to_string())),
        StoreConfig::default(),
        Arc::new(SystemClock),
    );
    let mut rotations = store.subscribe_rotations();
    let svid = store.wait_available(&id(ORDER), Duration::from_secs(5)).await.expect("available");
    assert_eq!(rotations.recv().await.expect("issued"), id(ORDER));
    let rotated = tokio::time::timeout(Duration::from_secs(5), rotations.recv()).await.expect("rotation in time").expect("rotation");
    assert_eq!(rotated, id(ORDER));
    let next = store.current(&id(ORDER)).expect("current");
    assert_ne!(next.chain()[0], svid.chain()[0]);
    assert!(store.bundles().get("cluster.local").is_some());
    task.abort();
    server.abort();
}

#[tokio::test]
async fn identities_can_change_at_run_time_and_none_means_permission_denied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(600), &[]);
    let (issuer, server) = serving(&config).await;
    let client = spiffe::WorkloadApiClient::connect_to(endpoint(&config.socket)).await.expect("connect");
    let err = client.fetch_x509_context().await.expect_err("no identity");
    assert!(matches!(err, spiffe::WorkloadApiError::NoIdentityIssued), "{err:?}");

    issuer.set_identities(vec![id(ORDER)]).expect("set");
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(context) = client.fetch_x509_context().await {
            ok = Some(context);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let context = ok.expect("issued after set_identities");
    assert_eq!(context.svids()[0].spiffe_id().to_string(), ORDER);
    assert!(issuer.set_identities(vec![id("spiffe://other.td/x")]).is_err());
    server.abort();
}

#[tokio::test]
async fn the_ca_survives_restarts_and_is_bound_to_its_trust_domain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(600), &[ORDER]);
    let first = DevIssuer::start(&config).expect("start").ca().cert().clone();
    let second = DevIssuer::start(&config).expect("restart").ca().cert().clone();
    assert_eq!(first, second, "same CA after a restart");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(config.state_dir.join("ca-key.pem")).expect("key").permissions().mode();
    assert_eq!(mode & 0o077, 0, "CA key readable by its owner only");

    let mut other = config.clone();
    other.trust_domain = TrustDomain::new("other.td").expect("td");
    other.identities = vec![id("spiffe://other.td/x")];
    let err = DevIssuer::start(&other).expect_err("other trust domain");
    assert!(err.to_string().contains("not for trust domain"), "{err}");

    let mut bad = config.clone();
    bad.identities = vec![id("spiffe://other.td/x")];
    assert!(DevIssuer::start(&bad).is_err());
    bad.identities = vec![id(ORDER)];
    bad.svid_ttl = Duration::from_secs(1);
    assert!(DevIssuer::start(&bad).is_err());
}

#[test]
fn issued_svids_follow_the_x509_svid_profile() {
    let td = TrustDomain::default();
    let ca = DevCa::generate(&td, std::time::SystemTime::now()).expect("ca");
    let svid = ca.issue(&id(ORDER), Duration::from_secs(60), std::time::SystemTime::now()).expect("issue");
    let mut bundles = crate::verify::BundleSet::new();
    bundles.insert(crate::verify::TrustBundle::new("cluster.local", vec![ca.cert().clone()]).expect("bundle"));
    for usage in [crate::verify::Usage::Client, crate::verify::Usage::Server] {
        let verified =
            crate::verify::verify_svid_for(&svid.chain, &bundles, &id(ORDER), usage, std::time::SystemTime::now()).expect("a valid SVID");
        assert_eq!(verified.not_after, svid.not_after);
    }
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.chain[0].as_ref()).expect("parse");
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().expect("ku").expect("present");
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    assert!(ca.issue(&id("spiffe://other.td/x"), Duration::from_secs(60), std::time::SystemTime::now()).is_err());
}

fn spire_agent() -> Option<PathBuf> {
    let base = Path::new("/var/cache/meshauth-testenv");
    let entries = std::fs::read_dir(base).ok()?;
    entries.filter_map(Result::ok).map(|e| e.path().join("bin/spire-agent")).find(|p| p.is_file())
}

/// SPIRE's own client cannot tell the dev issuer from SPIRE. Skipped (with a note) where the
/// test environment's SPIRE binaries are not built.
#[tokio::test]
async fn spire_agent_api_fetch_x509_receives_the_svids() {
    let Some(spire_agent) = spire_agent() else {
        eprintln!("skipped: no spire-agent under /var/cache/meshauth-testenv (run tests/testenv build)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(600), &[ORDER, PAYMENT]);
    let (_issuer, server) = serving(&config).await;
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    let output = tokio::process::Command::new(&spire_agent)
        .args(["api", "fetch", "x509", "-socketPath"])
        .arg(&config.socket)
        .arg("-write")
        .arg(&out_dir)
        .output()
        .await
        .expect("run spire-agent");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "spire-agent failed: {stdout}\n{stderr}");
    assert!(stdout.contains(ORDER) && stdout.contains(PAYMENT), "{stdout}");
    assert!(stdout.contains("Received 2 svid"), "{stdout}");
    // It wrote svid.N.pem / svid.N.key / bundle.N.pem; the chain verifies with our verifier.
    let now = std::time::SystemTime::now();
    let verified = crate::verify::verify_svid_files(&out_dir.join("bundle.0.pem"), &out_dir.join("svid.0.pem"), Some("cluster.local"), now)
        .expect("spire-agent's files verify");
    assert_eq!(verified.id, id(ORDER));
    server.abort();
}
