//! The manager against in-process doubles of the handshake and the map, on the real clock with
//! short lifetimes.

use super::*;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Default)]
struct FakeAuth {
    lifetime_ms: u64,
    calls: Mutex<Vec<(String, String, SocketAddr)>>,
    fail_addrs: Mutex<BTreeSet<SocketAddr>>,
    fail_all: Mutex<bool>,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
}

impl Authenticator for FakeAuth {
    fn authenticate<'a>(&'a self, local: &'a str, peer: &'a str, addr: SocketAddr) -> BoxFuture<'a, Result<SystemTime, AuthFailure>> {
        Box::pin(async move {
            let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_concurrent.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            self.calls.lock().expect("lock").push((local.to_owned(), peer.to_owned(), addr));
            if *self.fail_all.lock().expect("lock") || self.fail_addrs.lock().expect("lock").contains(&addr) {
                return Err(AuthFailure { reason: "refused", message: format!("{addr} refused") });
            }
            Ok(SystemTime::now() + Duration::from_millis(self.lifetime_ms))
        })
    }
}

#[derive(Clone, Default)]
struct FakeTable(Arc<Mutex<BTreeMap<PairKey, SystemTime>>>);

impl AuthTable for FakeTable {
    fn set(&mut self, key: PairKey, expiry: SystemTime) -> Result<(), String> {
        self.0.lock().map_err(|e| e.to_string())?.insert(key, expiry);
        Ok(())
    }
    fn remove(&mut self, key: PairKey) -> Result<(), String> {
        self.0.lock().map_err(|e| e.to_string())?.remove(&key);
        Ok(())
    }
    fn list(&self) -> Result<Vec<(PairKey, SystemTime)>, String> {
        Ok(self.0.lock().map_err(|e| e.to_string())?.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

struct NoObserver;
impl AuthObserver for NoObserver {
    fn handshake(&self, _: Result<(), &AuthFailure>, _: Duration) {}
    fn entries(&self, _: usize) {}
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 4250))
}

fn pair(dst: u32, src: u32, peers: Vec<SocketAddr>) -> DesiredPair {
    DesiredPair { dst_number: dst, src_number: src, dst_id: format!("spiffe://td/d{dst}"), src_id: format!("spiffe://td/s{src}"), peers }
}

fn start(auth: Arc<FakeAuth>, table: FakeTable, config: AuthManagerConfig) -> AuthManagerHandle {
    spawn(config, auth, Box::new(table), Arc::new(NoObserver))
}

fn fast() -> AuthManagerConfig {
    AuthManagerConfig { refresh_margin: Duration::from_millis(50), initial_backoff: Duration::from_millis(30), ..AuthManagerConfig::default() }
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn pre_authenticates_desired_pairs_before_any_traffic() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![pair(1, 2, vec![addr(2)]), pair(1, 3, vec![addr(3)])]);
    eventually("both entries", || table.0.lock().expect("lock").len() == 2).await;
    let calls = auth.calls.lock().expect("lock").clone();
    assert!(calls.contains(&("spiffe://td/d1".into(), "spiffe://td/s2".into(), addr(2))), "{calls:?}");
}

#[tokio::test]
async fn re_authenticates_before_expiry_so_the_entry_never_lapses() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 400, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || table.0.lock().expect("lock").contains_key(&(1, 2))).await;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let expiry = table.0.lock().expect("lock").get(&(1, 2)).copied();
        assert!(expiry.is_some_and(|e| e > SystemTime::now()), "entry lapsed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(auth.calls.lock().expect("lock").len() >= 4, "refreshed several times");
}

#[tokio::test]
async fn failures_write_nothing_retry_with_backoff_and_try_every_peer() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    *auth.fail_all.lock().expect("lock") = true;
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![pair(1, 2, vec![addr(2), addr(3)])]);
    eventually("a few retries", || auth.calls.lock().expect("lock").len() >= 4).await;
    assert!(table.0.lock().expect("lock").is_empty(), "fails closed");
    let status = m.status().await;
    assert!(status[0].failures >= 1 && status[0].last_error.is_some(), "{status:?}");
    // The first peer keeps refusing; the second one answers once it is healthy.
    auth.fail_addrs.lock().expect("lock").insert(addr(2));
    *auth.fail_all.lock().expect("lock") = false;
    eventually("entry via the second peer", || table.0.lock().expect("lock").contains_key(&(1, 2))).await;
}

#[tokio::test]
async fn pairs_no_longer_needed_are_removed() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![pair(1, 2, vec![addr(2)]), pair(1, 3, vec![addr(3)])]);
    eventually("two entries", || table.0.lock().expect("lock").len() == 2).await;
    m.set_desired(vec![pair(1, 3, vec![addr(3)])]);
    eventually("one entry", || table.0.lock().expect("lock").len() == 1).await;
    assert!(table.0.lock().expect("lock").contains_key(&(1, 3)));
}

#[tokio::test]
async fn a_rotation_re_authenticates_the_pairs_of_that_identity() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![pair(1, 2, vec![addr(2)]), pair(5, 2, vec![addr(2)])]);
    eventually("entries", || table.0.lock().expect("lock").len() == 2).await;
    let before = auth.calls.lock().expect("lock").len();
    m.rotated("spiffe://td/d1".into());
    eventually("re-handshake", || auth.calls.lock().expect("lock").len() == before + 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(auth.calls.lock().expect("lock").len(), before + 1, "only the rotated identity's pair");
}

#[tokio::test]
async fn a_restarted_manager_adopts_valid_entries_without_a_handshake() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    table.0.lock().expect("lock").insert((1, 2), SystemTime::now() + Duration::from_secs(60));
    table.0.lock().expect("lock").insert((7, 7), SystemTime::now() + Duration::from_secs(60));
    let m = start(auth.clone(), table.clone(), fast());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(table.0.lock().expect("lock").len(), 2, "nothing removed before the first desired set");
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("stale entry removed", || table.0.lock().expect("lock").len() == 1).await;
    assert!(auth.calls.lock().expect("lock").is_empty(), "the adopted entry needed no handshake");
}

#[tokio::test]
async fn handshakes_in_flight_are_bounded_and_pairs_deduplicated() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let config = AuthManagerConfig { max_concurrent: 2, ..fast() };
    let m = start(auth.clone(), table.clone(), config);
    let pairs: Vec<_> = (10..20).map(|s| pair(1, s, vec![addr(2)])).collect();
    m.set_desired(pairs.clone());
    for _ in 0..5 {
        m.auth_required((1, 10));
        m.set_desired(pairs.clone());
    }
    eventually("all ten", || table.0.lock().expect("lock").len() == 10).await;
    assert_eq!(auth.max_concurrent.load(Ordering::SeqCst), 2);
    assert_eq!(auth.calls.lock().expect("lock").len(), 10, "one handshake per pair");
}

#[tokio::test]
async fn auth_required_for_a_pair_the_policy_does_not_want_does_nothing() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![]);
    m.auth_required((3, 4));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(auth.calls.lock().expect("lock").is_empty());
    assert!(table.0.lock().expect("lock").is_empty());
}
