use std::time::Duration;

use super::fake::{FakeSource, update};
use super::*;
use crate::verify::test_certs::TestCa;

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid id")
}

fn config() -> StoreConfig {
    StoreConfig {
        initial_sync_timeout: Duration::from_secs(5),
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(30),
        no_identity_grace: Duration::from_secs(20),
    }
}

fn start(source: &FakeSource) -> (SvidStore, tokio::task::JoinHandle<()>) {
    SvidStore::spawn(Arc::new(source.clone()), config(), Arc::new(TokioClock::new()))
}

/// Lets the worker run until it waits on something again. Yielding alone is not enough: the
/// current-thread scheduler polls the timer driver only when it parks (or every few dozen
/// ticks), so sleep a paused millisecond to make it process expired timers.
async fn settle() {
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn identities_become_available_and_rotations_are_announced() {
    let ca = TestCa::new("cluster.local");
    let source = FakeSource::new();
    let (store, task) = start(&source);
    let mut rotations = store.subscribe_rotations();
    assert!(matches!(store.state(&id(ORDER)), SvidState::Initializing));
    let order = store.watch(&id(ORDER));

    let first = ca.svid(ORDER);
    source.push(update(&ca, &[(ORDER, &first)]));
    let svid = store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect("available");
    assert_eq!(svid.chain()[0], first.chain[0]);
    assert_eq!(rotations.recv().await.expect("rotation"), id(ORDER));
    assert!(order.has_changed().expect("open"));
    assert!(store.is_connected());
    assert_eq!(store.bundles().get("cluster.local").map(|b| b.certs().len()), Some(1));
    // After the first sync an identity that was not delivered is known not to be issued.
    let err = store.wait_available(&id(PAYMENT), Duration::from_secs(1)).await.expect_err("none");
    assert_eq!(err.reason(), "not_issued");

    // Re-sending the same SVID is not a rotation; a new certificate is.
    source.push(update(&ca, &[(ORDER, &first)]));
    settle().await;
    assert!(rotations.try_recv().is_err());
    let second = ca.svid(ORDER);
    source.push(update(&ca, &[(ORDER, &second)]));
    assert_eq!(rotations.recv().await.expect("rotation"), id(ORDER));
    let current = store.current(&id(ORDER)).expect("current");
    assert_eq!(current.chain()[0], second.chain[0]);

    // Dropped from the answer: not issued any more.
    source.push(update(&ca, &[]));
    settle().await;
    assert!(matches!(store.state(&id(ORDER)), SvidState::Unavailable(Unavailable::NotIssued)));
    assert!(store.current(&id(ORDER)).is_none());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn the_last_svid_is_kept_while_the_source_is_down_until_it_expires() {
    let ca = TestCa::new("cluster.local");
    let source = FakeSource::new();
    let (store, task) = start(&source);
    source.push(update(&ca, &[(ORDER, &ca.svid(ORDER))]));
    let svid = store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect("available");

    source.go_down();
    settle().await;
    assert!(!store.is_connected());
    tokio::time::advance(Duration::from_secs(600)).await;
    settle().await;
    assert!(store.current(&id(ORDER)).is_some(), "still valid: still served");

    let left = svid.not_after().duration_since(store.now()).expect("not expired yet");
    tokio::time::advance(left + Duration::from_secs(1)).await;
    settle().await;
    let state = store.state(&id(ORDER));
    assert!(
        matches!(state, SvidState::Unavailable(Unavailable::Expired)),
        "{state:?} now={:?} not_after={:?} connects={}",
        store.now(),
        svid.not_after(),
        source.connects()
    );
    assert!(store.current(&id(ORDER)).is_none());

    // Back up with a fresh SVID: available again.
    source.go_up();
    let fresh = ca.svid(ORDER);
    // The CA's certs were made with the real clock; a fresh one is valid at the store's time
    // only if it is still within the test CA's window, which `svid()` gives an hour each side.
    source.push(update(&ca, &[(ORDER, &fresh)]));
    tokio::time::advance(Duration::from_secs(31)).await;
    settle().await;
    assert!(store.is_connected());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn reconnects_with_capped_exponential_backoff() {
    let ca = TestCa::new("cluster.local");
    let source = FakeSource::new();
    source.go_down();
    let (store, task) = start(&source);
    settle().await;
    assert_eq!(source.connects(), 1);

    // Delays are uniform in [d/2, d] with d = 1, 2, 4, 8, 16, 30, 30... seconds.
    let mut at = Vec::new();
    let begin = Instant::now();
    for _ in 0..400 {
        tokio::time::advance(Duration::from_millis(250)).await;
        settle().await;
        if source.connects() > at.len() + 1 {
            at.push(begin.elapsed());
        }
    }
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 5, "{at:?}");
    for gap in &gaps {
        assert!(*gap <= Duration::from_millis(30_500), "capped: {gaps:?}");
    }
    assert!(gaps[gaps.len() - 1] >= Duration::from_secs(14), "grows: {gaps:?}");
    assert!(at[0] <= Duration::from_millis(1250), "first retry soon: {at:?}");

    // The first sync never came: waiters are told, not left hanging.
    let err = store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect_err("down");
    assert_eq!(err.reason(), "source_unreachable");

    // Coming back: picked up within the cap, and served.
    source.go_up();
    source.push(update(&ca, &[(ORDER, &ca.svid(ORDER))]));
    tokio::time::advance(Duration::from_secs(31)).await;
    settle().await;
    assert!(store.current(&id(ORDER)).is_some());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_hung_first_sync_times_out_and_is_retried() {
    let source = FakeSource::new(); // up, but never sends anything
    let (store, task) = start(&source);
    let err = store.wait_available(&id(ORDER), Duration::from_secs(60)).await.expect_err("none");
    assert_eq!(err.reason(), "source_unreachable");
    tokio::time::advance(Duration::from_secs(10)).await;
    settle().await;
    assert!(source.connects() >= 2, "retried after the sync timeout");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn svids_that_do_not_verify_are_refused_and_do_not_displace_good_ones() {
    let ca = TestCa::new("cluster.local");
    let rogue = TestCa::new("cluster.local");
    let source = FakeSource::new();
    let (store, task) = start(&source);
    let good = ca.svid(ORDER);
    source.push(update(&ca, &[(ORDER, &good)]));
    store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect("available");

    // Signed by a CA not in the bundle; and delivered under another identity's name.
    let payment_as_order = ca.svid(ORDER);
    source.push(update(&ca, &[(ORDER, &rogue.svid(ORDER)), (PAYMENT, &payment_as_order)]));
    settle().await;
    let current = store.current(&id(ORDER)).expect("old one kept");
    assert_eq!(current.chain()[0], good.chain[0]);
    assert!(matches!(store.state(&id(PAYMENT)), SvidState::Unavailable(Unavailable::Invalid)));
    task.abort();
}

#[test]
fn backoff_is_jittered_and_capped() {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
    assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
    for d in &delays {
        assert!(*d <= Duration::from_secs(2));
    }
    assert!(delays[9] >= Duration::from_secs(1));
    backoff.reset();
    assert!(backoff.next_delay() <= Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_short_no_identity_issued_blip_keeps_the_svids_and_withdraws_nothing() {
    let ca = TestCa::new("cluster.local");
    let source = FakeSource::new();
    let (store, task) = start(&source);
    let mut withdrawals = store.subscribe_withdrawals();
    let svid = ca.svid(ORDER);
    source.push(update(&ca, &[(ORDER, &svid)]));
    store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect("available");

    // A restarting SPIRE agent says "no identity issued" until it has synced: an outage.
    source.issue_nothing();
    settle().await;
    // Short of the 20 s grace even with the next reconnect (backoff 1, 2, 4, 8 s) after it.
    tokio::time::advance(Duration::from_secs(5)).await;
    settle().await;
    assert!(store.current(&id(ORDER)).is_some(), "a blip withdrew a valid SVID");
    assert!(withdrawals.try_recv().is_err(), "a blip announced a withdrawal");
    source.push(update(&ca, &[(ORDER, &svid)]));
    // Time flows (one jump past the grace end would fire the grace timer before the reconnect).
    for _ in 0..31 {
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
    }
    assert!(store.is_connected());
    assert!(store.current(&id(ORDER)).is_some());
    assert!(withdrawals.try_recv().is_err());

    // Past the grace period it is a revocation: withdrawn and announced.
    source.issue_nothing();
    settle().await;
    tokio::time::advance(Duration::from_secs(21)).await;
    settle().await;
    assert!(matches!(store.state(&id(ORDER)), SvidState::Unavailable(Unavailable::NotIssued)));
    assert_eq!(withdrawals.try_recv().expect("withdrawal"), id(ORDER));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn an_identity_no_longer_issued_is_withdrawn_at_once_and_announced() {
    let ca = TestCa::new("cluster.local");
    let source = FakeSource::new();
    let (store, task) = start(&source);
    let mut withdrawals = store.subscribe_withdrawals();
    source.push(update(&ca, &[(ORDER, &ca.svid(ORDER)), (PAYMENT, &ca.svid(PAYMENT))]));
    store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect("available");
    source.push(update(&ca, &[(PAYMENT, &ca.svid(PAYMENT))]));
    settle().await;
    assert_eq!(withdrawals.try_recv().expect("withdrawal"), id(ORDER));
    assert!(withdrawals.try_recv().is_err(), "only the identity that went");
    assert!(store.current(&id(ORDER)).is_none());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn no_identity_issued_at_start_is_an_answer_not_a_wait() {
    let source = FakeSource::new();
    source.issue_nothing();
    let (store, task) = start(&source);
    let err = store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect_err("none");
    assert_eq!(err.reason(), "not_issued");
    assert!(store.is_synced());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn bundles_are_announced_only_when_they_change() {
    let ca = TestCa::new("cluster.local");
    let other = TestCa::new("cluster.local");
    let source = FakeSource::new();
    let (store, task) = start(&source);
    let svid = ca.svid(ORDER);
    source.push(update(&ca, &[(ORDER, &svid)]));
    store.wait_available(&id(ORDER), Duration::from_secs(1)).await.expect("available");
    let mut bundles = store.watch_bundles();
    bundles.borrow_and_update();
    source.push(update(&ca, &[(ORDER, &ca.svid(ORDER))]));
    settle().await;
    assert!(!bundles.has_changed().expect("open"), "a rotation with the same bundle announced a bundle change");
    let mut both = update(&ca, &[(ORDER, &svid)]);
    both.bundles[0].1.push(other.root_cert());
    source.push(both);
    settle().await;
    assert!(bundles.has_changed().expect("open"), "a new CA was not announced");
    task.abort();
}
