//! The manager against in-process doubles of the handshake and the map: on the real clock with
//! short lifetimes, and on tokio's paused clock where the test counts handshakes over time.

use super::fake::{FakeTable, NoObserver};
use super::*;
use crate::svid::TokioClock;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::Notify;

/// Whether the proofs of a [`FakeAuth`] still verify (flipped to play a bundle change).
#[derive(Clone)]
struct FakeEvidence(Arc<AtomicBool>);

impl Evidence for FakeEvidence {
    fn still_trusted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

struct FakeAuth {
    lifetime_ms: u64,
    /// A fixed expiry for every proof (neither SVID rotates), instead of now + lifetime.
    until: Mutex<Option<SystemTime>>,
    calls: Mutex<Vec<(String, String, SocketAddr)>>,
    fail_addrs: Mutex<BTreeSet<SocketAddr>>,
    fail_all: Mutex<bool>,
    /// Failures are refusals (the peer was reached and said no), not outages.
    refuse: AtomicBool,
    /// Failures say that the local identity has no SVID yet.
    no_local_svid: AtomicBool,
    /// Evidence per peer identity (all trusted unless a test says otherwise).
    trusted: Mutex<BTreeMap<String, Arc<AtomicBool>>>,
    clock: Arc<dyn Clock>,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
    /// The next successful handshake, once proven, waits for this before it answers: a peer
    /// holding the handshake open while the agent's SVIDs or bundles change.
    hold: Mutex<Option<Arc<Notify>>>,
}

impl Default for FakeAuth {
    fn default() -> Self {
        Self {
            lifetime_ms: 60_000,
            until: Mutex::default(),
            calls: Mutex::default(),
            fail_addrs: Mutex::default(),
            fail_all: Mutex::default(),
            refuse: AtomicBool::new(false),
            no_local_svid: AtomicBool::new(false),
            trusted: Mutex::default(),
            clock: Arc::new(SystemClock),
            concurrent: AtomicUsize::new(0),
            max_concurrent: AtomicUsize::new(0),
            hold: Mutex::default(),
        }
    }
}

impl FakeAuth {
    fn calls(&self) -> usize {
        self.calls.lock().expect("lock").len()
    }

    fn trust_of(&self, peer: &str) -> Arc<AtomicBool> {
        self.trusted.lock().expect("lock").entry(peer.to_owned()).or_insert_with(|| Arc::new(AtomicBool::new(true))).clone()
    }
}

impl Authenticator for FakeAuth {
    fn authenticate<'a>(&'a self, local: &'a str, peer: &'a str, addr: SocketAddr) -> BoxFuture<'a, Result<Proof, AuthFailure>> {
        Box::pin(async move {
            let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_concurrent.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.concurrent.fetch_sub(1, Ordering::SeqCst);
            let call = {
                let mut calls = self.calls.lock().expect("lock");
                calls.push((local.to_owned(), peer.to_owned(), addr));
                calls.len() as u64
            };
            if *self.fail_all.lock().expect("lock") || self.fail_addrs.lock().expect("lock").contains(&addr) {
                let refused = self.refuse.load(Ordering::SeqCst);
                let until_local_svid = self.no_local_svid.load(Ordering::SeqCst);
                return Err(AuthFailure { reason: "refused", message: format!("{addr} refused"), refused, until_local_svid });
            }
            let expiry = match *self.until.lock().expect("lock") {
                Some(until) if until > self.clock.now() => until,
                Some(_) => {
                    return Err(AuthFailure {
                        reason: "expired",
                        message: "every SVID expired".into(),
                        refused: true,
                        until_local_svid: false,
                    });
                }
                None => self.clock.now() + Duration::from_millis(self.lifetime_ms),
            };
            let proof = Proof {
                expiry,
                evidence: Arc::new(FakeEvidence(self.trust_of(peer))),
                connection_key: meshauth_datapath::ConnectionKey([call, call]),
            };
            // Taken out first: the lock must not be held across the wait.
            let hold = self.hold.lock().expect("lock").take();
            if let Some(gate) = hold {
                gate.notified().await;
            }
            Ok(proof)
        })
    }
}

fn addr(n: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], 4250))
}

/// The node of the agent at `addr(n)`.
fn node(n: u8) -> NodeId {
    NodeId::At(std::net::Ipv4Addr::new(127, 0, 0, n))
}

fn proof(dst: u32, src: u32, n: u8) -> ProofKey {
    ProofKey { pair: (dst, src), node: node(n) }
}

fn pair(dst: u32, src: u32, peers: Vec<SocketAddr>) -> DesiredPair {
    let peers = peers
        .into_iter()
        .map(|addr| match addr.ip() {
            std::net::IpAddr::V4(v4) => Peer { node: NodeId::At(v4), addr },
            std::net::IpAddr::V6(_) => unreachable!("the tests' agents are on 127.0.0.n"),
        })
        .collect();
    DesiredPair { dst_number: dst, src_number: src, dst_id: format!("spiffe://td/d{dst}"), src_id: format!("spiffe://td/s{src}"), peers }
}

fn start(auth: Arc<FakeAuth>, table: FakeTable, config: AuthManagerConfig) -> AuthManagerHandle {
    let clock = auth.clock.clone();
    spawn_with_clock(config, auth, Box::new(table), Arc::new(NoObserver), clock)
}

fn fast() -> AuthManagerConfig {
    AuthManagerConfig {
        refresh_margin: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(30),
        min_reauth_interval: Duration::from_millis(50),
        ..unspread()
    }
}

/// The defaults, rotations bringing their re-authentications at once (what most tests here
/// look at); the spread has its own test.
fn unspread() -> AuthManagerConfig {
    AuthManagerConfig { rotation_spread: Duration::ZERO, ..AuthManagerConfig::default() }
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
    eventually("entry", || table.get((1, 2)).is_some()).await;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let expiry = table.get((1, 2));
        assert!(expiry.is_some_and(|e| e > SystemTime::now()), "entry lapsed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(auth.calls.lock().expect("lock").len() >= 4, "refreshed several times");
}

#[tokio::test]
async fn failures_write_nothing_retry_with_backoff_and_each_node_proves_on_its_own() {
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
    eventually("entry via the second peer", || table.get((1, 2)).is_some()).await;
    assert!(table.proof(proof(1, 2, 3)).is_some());
    assert!(table.proof(proof(1, 2, 2)).is_none(), "the second node's proof counts for the first's pods");
    // Once the first peer answers, its node has a proof of its own, with its own key.
    auth.fail_addrs.lock().expect("lock").clear();
    eventually("entry via the first peer", || table.proof(proof(1, 2, 2)).is_some()).await;
    let (first, second) = (table.key(proof(1, 2, 2)), table.key(proof(1, 2, 3)));
    assert!(first.is_some() && second.is_some() && first != second, "one key for two nodes: {first:?} {second:?}");
}

#[tokio::test]
async fn every_node_hosting_the_source_proves_it_and_loses_it_on_its_own() {
    let auth = Arc::new(FakeAuth { lifetime_ms: 60_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), fast());
    m.set_desired(vec![pair(1, 2, vec![addr(2), addr(3)])]);
    eventually("a proof per node", || table.0.lock().expect("lock").len() == 2).await;
    let asked: BTreeSet<SocketAddr> = auth.calls.lock().expect("lock").iter().map(|c| c.2).collect();
    assert_eq!(asked, BTreeSet::from([addr(2), addr(3)]), "a handshake with each node's agent");
    // Node 3's agent refuses from now on: its proof goes at once, node 2's stays.
    auth.refuse.store(true, Ordering::SeqCst);
    auth.fail_addrs.lock().expect("lock").insert(addr(3));
    m.rotated("spiffe://td/d1".into());
    eventually("node 3's proof removed", || table.proof(proof(1, 2, 3)).is_none()).await;
    assert!(table.proof(proof(1, 2, 2)).is_some(), "one node's refusal took another node's proof");
    // The source's pod leaves node 2: its proof is no longer wanted.
    m.set_desired(vec![pair(1, 2, vec![addr(3)])]);
    eventually("node 2's proof removed", || table.proof(proof(1, 2, 2)).is_none()).await;
    let status = m.status().await;
    assert_eq!(status.iter().map(|s| s.key).collect::<Vec<_>>(), [proof(1, 2, 3)], "{status:?}");
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
    assert!(table.get((1, 3)).is_some());
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
    table.0.lock().expect("lock").insert(proof(1, 2, 2), SystemTime::now() + Duration::from_secs(60));
    table.0.lock().expect("lock").insert(proof(7, 7, 7), SystemTime::now() + Duration::from_secs(60));
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

// ---- on tokio's paused clock: handshakes counted over time ----

/// A fake whose proofs all expire at `now + until` (neither SVID rotates), on the paused clock.
/// From now on each handshake's peer holds its answer until the returned gate is notified.
fn hold_answers(auth: &FakeAuth) -> Arc<Notify> {
    let gate = Arc::new(Notify::new());
    *auth.hold.lock().expect("lock") = Some(gate.clone());
    gate
}

fn frozen_svids(until: Duration) -> Arc<FakeAuth> {
    let clock = Arc::new(TokioClock::new());
    let auth = FakeAuth { clock: clock.clone(), ..FakeAuth::default() };
    *auth.until.lock().expect("lock") = Some(clock.now() + until);
    Arc::new(auth)
}

fn entry(table: &FakeTable, key: PairKey) -> Option<SystemTime> {
    table.get(key)
}

#[tokio::test(start_paused = true)]
async fn pairs_of_an_identity_without_an_svid_wait_for_its_issuance_not_spin() {
    // A node whose SPIRE agent has issued nothing yet: every pair fails the same way, locally.
    let auth = Arc::new(FakeAuth { clock: Arc::new(TokioClock::default()), ..FakeAuth::default() });
    *auth.fail_all.lock().expect("lock") = true;
    auth.refuse.store(true, Ordering::SeqCst);
    auth.no_local_svid.store(true, Ordering::SeqCst);
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    let pairs: Vec<DesiredPair> = (0..50).map(|i| pair(1, 10 + i, vec![addr(2)])).collect();
    m.set_desired(pairs);
    tokio::time::sleep(Duration::from_secs(30)).await;
    // One attempt per pair, then a wait for the issuance (the backoff would have retried from
    // 200 ms, doubling to 5 s: ten attempts per pair in 30 s).
    let calls = auth.calls();
    assert!(calls <= 50, "{calls} handshakes for 50 pairs in 30 s without an SVID");
    // The identity is issued: its pairs are proven at once, not after the backoff.
    *auth.fail_all.lock().expect("lock") = false;
    m.rotated("spiffe://td/d1".into());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(table.0.lock().expect("lock").len(), 50, "every pair proven soon after the issuance");
}

#[tokio::test(start_paused = true)]
async fn short_svids_that_cannot_rotate_yet_do_not_drive_a_handshake_storm() {
    // The demo's 8 s SVIDs: under the 5 s margin, every success used to schedule the next
    // handshake at once.
    let auth = frozen_svids(Duration::from_secs(8));
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    tokio::time::sleep(Duration::from_millis(7_900)).await;
    assert!(entry(&table, (1, 2)).is_some(), "the entry is kept to its end");
    let calls = auth.calls();
    assert!(calls <= 6, "{calls} handshakes for one pair in 8 s");
}

#[tokio::test(start_paused = true)]
async fn a_spire_outage_keeps_the_entry_to_its_end_with_a_handful_of_handshakes() {
    let auth = frozen_svids(Duration::from_secs(30));
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    tokio::time::sleep(Duration::from_millis(29_900)).await;
    assert!(entry(&table, (1, 2)).is_some(), "the entry is kept until every SVID expires");
    let calls = auth.calls();
    assert!(calls <= 8, "{calls} handshakes for one pair in a 30 s outage");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(entry(&table, (1, 2)), None, "the entry outlived the SVIDs");
}

#[tokio::test(start_paused = true)]
async fn rotations_bring_the_next_handshake_but_never_within_the_floor() {
    let auth = frozen_svids(Duration::from_secs(60));
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || entry(&table, (1, 2)).is_some()).await;
    assert_eq!(auth.calls(), 1);
    for _ in 0..50 {
        m.rotated("spiffe://td/d1".into());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(auth.calls(), 2, "one re-authentication for a burst of rotations within the floor");
}

#[tokio::test(start_paused = true)]
async fn auth_required_events_cannot_drive_back_to_back_handshakes() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    *auth.fail_all.lock().expect("lock") = true;
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    // A pod sending (or spoofing) packets of the pair: 200 drops in 2 s.
    for _ in 0..200 {
        m.auth_required((1, 2));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = auth.calls();
    // At most one attempt per 200 ms floor (plus the first).
    assert!(calls <= 11, "{calls} handshakes driven by 200 auth-required events in 2 s");
    assert!(calls >= 5, "auth-required events still cut the backoff short: {calls}");
}

#[tokio::test(start_paused = true)]
async fn syns_refused_for_their_tag_bring_a_new_handshake_at_most_once_per_interval() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || entry(&table, (1, 2)).is_some()).await;
    let first = auth.calls();
    // Just proven: a spoofer's stream of refused SYNs brings nothing.
    for _ in 0..100 {
        m.key_refused((1, 2));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(auth.calls(), first, "refusals right after a handshake bring none");
    tokio::time::sleep(KEY_REFRESH_INTERVAL).await;
    // Proven long enough ago: the next refusal brings one new handshake (new keys), then the
    // interval starts again.
    for _ in 0..300 {
        m.key_refused((1, 2));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(auth.calls(), first + 1, "one handshake for 300 refusals over 3 s");
}

#[tokio::test(start_paused = true)]
async fn a_refused_re_authentication_removes_the_entry_at_once() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || entry(&table, (1, 2)).is_some()).await;
    // The peer now presents another identity: the next handshake is refused.
    auth.refuse.store(true, Ordering::SeqCst);
    *auth.fail_all.lock().expect("lock") = true;
    m.rotated("spiffe://td/d1".into());
    eventually("entry removed", || entry(&table, (1, 2)).is_none()).await;
    let status = m.status().await;
    assert!(status[0].expiry.is_none() && status[0].failures >= 1, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_peer_keeps_the_entry_until_its_expiry() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, lifetime_ms: 20_000, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || entry(&table, (1, 2)).is_some()).await;
    // The peer's agent restarts (an outage, not a refusal).
    *auth.fail_all.lock().expect("lock") = true;
    m.rotated("spiffe://td/d1".into());
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert!(auth.calls() >= 3, "re-authentication retried");
    assert!(entry(&table, (1, 2)).is_some(), "an outage took the entry away before its expiry");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(entry(&table, (1, 2)), None, "the entry outlived its proof");
}

#[tokio::test(start_paused = true)]
async fn a_withdrawn_local_svid_removes_its_pairs_at_once() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)]), pair(5, 2, vec![addr(3)])]);
    eventually("entries", || table.0.lock().expect("lock").len() == 2).await;
    // SPIRE no longer issues d1 here: re-authenticating it fails from now on.
    auth.refuse.store(true, Ordering::SeqCst);
    auth.fail_addrs.lock().expect("lock").insert(addr(2));
    m.withdrawn("spiffe://td/d1".into());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(entry(&table, (1, 2)), None, "the withdrawn identity's pair is still authenticated");
    assert!(entry(&table, (5, 2)).is_some(), "another identity's pair was removed");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(entry(&table, (1, 2)), None, "the withdrawn identity's pair came back");
}

#[tokio::test(start_paused = true)]
async fn a_bundle_change_removes_the_pairs_whose_proof_no_longer_verifies() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)]), pair(1, 3, vec![addr(3)])]);
    eventually("entries", || table.0.lock().expect("lock").len() == 2).await;
    // The CA that signed s2's SVID leaves the bundle: its chain no longer verifies, and its
    // agent cannot prove it again.
    auth.trust_of("spiffe://td/s2").store(false, Ordering::SeqCst);
    auth.refuse.store(true, Ordering::SeqCst);
    auth.fail_addrs.lock().expect("lock").insert(addr(2));
    m.bundles_changed();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(entry(&table, (1, 2)), None, "a pair proven by a removed CA is still authenticated");
    assert!(entry(&table, (1, 3)).is_some(), "a pair whose proof still verifies was removed");
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(entry(&table, (1, 2)), None);
}

#[tokio::test(start_paused = true)]
async fn a_handshake_in_flight_when_the_local_svid_is_withdrawn_does_not_bring_the_pair_back() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || entry(&table, (1, 2)).is_some()).await;
    // A re-authentication proves the pair on the SVID of now, and its peer holds it open.
    let gate = hold_answers(&auth);
    m.rotated("spiffe://td/d1".into());
    eventually("re-authentication proven, its answer held", || auth.calls() == 2).await;
    // Meanwhile SPIRE stops issuing d1 here: from now on its handshakes are refused.
    auth.refuse.store(true, Ordering::SeqCst);
    auth.fail_addrs.lock().expect("lock").insert(addr(2));
    m.withdrawn("spiffe://td/d1".into());
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(entry(&table, (1, 2)), None, "the withdrawn identity's pair is still authenticated");
    gate.notify_one();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(entry(&table, (1, 2)), None, "a handshake started on the withdrawn SVID re-proved the pair");
    // A fresh attempt follows, on what is current (refused), and nothing brings the pair back.
    eventually("a fresh attempt", || auth.calls() == 3).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(entry(&table, (1, 2)), None, "the withdrawn identity's pair came back");
    let status = m.status().await;
    assert!(status[0].expiry.is_none() && status[0].failures >= 1, "{status:?}");
}

#[tokio::test(start_paused = true)]
async fn a_handshake_in_flight_when_the_bundles_change_does_not_prove_the_pair() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let gate = hold_answers(&auth);
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    // The first handshake (no entry yet) verifies s2 against the bundles of now, and its peer
    // holds it open.
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("handshake proven, its answer held", || auth.calls() == 1).await;
    // Meanwhile the CA that signed s2's SVID leaves the bundle: s2 cannot be proven any more.
    auth.trust_of("spiffe://td/s2").store(false, Ordering::SeqCst);
    auth.refuse.store(true, Ordering::SeqCst);
    auth.fail_addrs.lock().expect("lock").insert(addr(2));
    m.bundles_changed();
    tokio::time::sleep(Duration::from_millis(1)).await;
    gate.notify_one();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(entry(&table, (1, 2)), None, "a handshake verified against the bundles of before proved the pair");
    eventually("a fresh attempt", || auth.calls() == 2).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(entry(&table, (1, 2)), None, "a pair proven by a removed CA came back");
}

#[tokio::test(start_paused = true)]
async fn a_handshake_overtaken_by_a_bundle_change_still_leaves_its_key_while_the_entry_stands() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    eventually("entry", || entry(&table, (1, 2)).is_some()).await;
    let proven = entry(&table, (1, 2));
    // A re-authentication whose answering agent installed its key (that node's pods tag with
    // it soon), held open while a CA that did not sign s2 leaves the bundles.
    let gate = hold_answers(&auth);
    m.rotated("spiffe://td/d1".into());
    eventually("re-authentication proven, its answer held", || auth.calls() == 2).await;
    m.bundles_changed();
    tokio::time::sleep(Duration::from_millis(1)).await;
    gate.notify_one();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let key = proof(1, 2, 2);
    assert_eq!(
        table.key(key),
        Some(meshauth_datapath::ConnectionKey([2, 2])),
        "the overtaken handshake's key was thrown away: the source's SYNs would be refused"
    );
    assert_eq!(entry(&table, (1, 2)), proven, "an overtaken handshake extended the entry");
}

#[tokio::test(start_paused = true)]
async fn a_stopping_agent_lets_the_handshakes_under_way_write_their_keys_and_starts_no_other() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { clock, ..FakeAuth::default() });
    let gate = hold_answers(&auth);
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), unspread());
    m.set_desired(vec![pair(1, 2, vec![addr(2)])]);
    // The peer has installed this handshake's key and holds its answer.
    eventually("handshake under way", || auth.calls() == 1).await;
    let draining = tokio::spawn({
        let m = m.clone();
        async move { m.drain(Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!draining.is_finished(), "the drain returned with a handshake under way");
    gate.notify_one();
    assert!(draining.await.expect("drain task"), "the drain timed out");
    assert!(entry(&table, (1, 2)).is_some(), "the finished handshake's entry (and key) was not written");
    // Stopping, nothing new starts, whatever asks for it.
    m.set_desired(vec![pair(1, 2, vec![addr(2)]), pair(3, 2, vec![addr(2)])]);
    m.auth_required((3, 2));
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(auth.calls(), 1, "a handshake started while the agent stops");
}

/// Handshakes per second over `seconds`, sampled on the (paused) clock.
async fn per_second(auth: &FakeAuth, seconds: usize) -> Vec<usize> {
    let mut counts = Vec::new();
    let mut last = auth.calls();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = auth.calls();
        counts.push(now - last);
        last = now;
    }
    counts
}

#[tokio::test(start_paused = true)]
async fn a_rotation_spreads_the_re_authentications_of_its_pairs_and_no_entry_lapses() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { lifetime_ms: 600_000, clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), AuthManagerConfig::default());
    m.set_desired((2..202).map(|src| pair(1, src, vec![addr(2)])).collect());
    eventually("200 entries", || table.0.lock().expect("lock").len() == 200).await;
    let before = auth.calls();
    m.rotated("spiffe://td/d1".into());
    let rates = per_second(&auth, 32).await;
    assert_eq!(auth.calls(), before + 200, "every pair re-authenticated within the spread: {rates:?}");
    let busiest = rates.iter().copied().max().unwrap_or(0);
    assert!(busiest <= 30, "a rotation of 200 pairs brought {busiest} handshakes in one second: {rates:?}");
    assert_eq!(table.0.lock().expect("lock").len(), 200, "an entry lapsed while its re-authentication waited");
}

#[tokio::test(start_paused = true)]
async fn pairs_proven_together_refresh_spread_out_not_in_one_burst() {
    let clock = Arc::new(TokioClock::new());
    let auth = Arc::new(FakeAuth { lifetime_ms: 100_000, clock, ..FakeAuth::default() });
    let table = FakeTable::default();
    let m = start(auth.clone(), table.clone(), AuthManagerConfig::default());
    m.set_desired((2..202).map(|src| pair(1, src, vec![addr(2)])).collect());
    eventually("200 entries", || table.0.lock().expect("lock").len() == 200).await;
    // Refreshes come due at 70 % of the 100 s lifetime, up to a tenth of that earlier.
    let before = auth.calls();
    let rates = per_second(&auth, 72).await;
    assert_eq!(auth.calls(), before + 200, "every pair refreshed once: {rates:?}");
    assert_eq!(rates[..61].iter().sum::<usize>(), 0, "no refresh before 63 s: {rates:?}");
    let busiest = rates.iter().copied().max().unwrap_or(0);
    assert!(busiest <= 80, "{busiest} of 200 refreshes in one second: {rates:?}");
    assert_eq!(table.0.lock().expect("lock").len(), 200);
}
