//! The real SPIRE server and agents of the test environment: a process registered under a
//! node's agent receives an X.509-SVID over that node's Workload API (the `spiffe` crate)
//! that verifies against the bundle, only that node hands it out, and a 30-second SVID rotates
//! with the new one arriving on the stream.
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate docs). One environment
//! is shared by every test of this binary; each test uses its own SPIFFE IDs.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_testenv::svid::{self, SvidWatch};
use meshauth_testenv::{EntrySpec, TestEnv};

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

async fn env() -> &'static TestEnv {
    match TestEnv::shared().await {
        Ok(env) => env,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_registered_process_gets_an_svid_that_verifies_against_the_bundle() {
    let env = env().await;
    let node1 = env.node("node-1").unwrap_or_else(|e| panic!("{e}"));
    let node2 = env.node("node-2").unwrap_or_else(|e| panic!("{e}"));
    let id = env.workload_id("svid-basic", "payment");
    let entry = env
        .spire()
        .create_entry(&EntrySpec::new(&id, &node1.agent_id).selector(svid::uid_selector()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(entry.spiffe_id, id);
    assert_eq!(entry.parent_id, node1.agent_id);

    let (got, bundle) =
        svid::wait_for_svid(&node1.workload_api_endpoint(), &id, Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e}"));
    let verified = svid::verify_svid(&got, &bundle).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(verified.spiffe_id, id);
    assert!(verified.not_before <= now() && now() < verified.not_after);

    // The Workload API's bundle is the server's bundle (as `up` wrote it).
    let pem = std::fs::read(env.spire_bundle_pem()).unwrap_or_else(|e| panic!("{e}"));
    let server: Vec<Vec<u8>> = x509_parser::pem::Pem::iter_from_buffer(&pem)
        .map(|p| p.map(|p| p.contents).unwrap_or_else(|e| panic!("{}: {e}", env.spire_bundle_pem().display())))
        .collect();
    let served: Vec<Vec<u8>> = bundle.authorities().iter().map(|a| a.as_bytes().to_vec()).collect();
    assert!(!served.is_empty(), "empty bundle over the Workload API");
    assert_eq!(served, server, "Workload API bundle differs from `spire-server bundle show`");

    // Against a bundle whose only "authority" did not sign the chain, it does not verify.
    let mut wrong = spiffe::X509Bundle::new(bundle.trust_domain().clone());
    wrong.add_authority(got.leaf().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svid::verify_svid(&got, &wrong).is_err(), "an SVID verified against a bundle that did not sign it");

    // Node-scoped: node-2's agent never hands this identity out. Give it time to sync
    // (agents sync every second here) before looking.
    tokio::time::sleep(Duration::from_secs(4)).await;
    match svid::wait_for_svid(&node2.workload_api_endpoint(), &id, Duration::from_secs(3)).await {
        Err(meshauth_testenv::SvidError::Timeout { .. }) => {}
        Err(e) => panic!("node-2: unexpected error {e}"),
        Ok(_) => panic!("node-2's agent issued {id}, an entry parented to node-1's agent"),
    }
}

#[tokio::test]
async fn a_30_second_svid_rotates_and_the_new_one_arrives_on_the_stream() {
    let env = env().await;
    let node = env.node("node-2").unwrap_or_else(|e| panic!("{e}"));
    let id = env.workload_id("svid-rotation", "order");
    env.spire()
        .create_entry(&EntrySpec::new(&id, &node.agent_id).selector(svid::uid_selector()).x509_svid_ttl(30))
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    let mut watch = SvidWatch::new(&node.workload_api_endpoint(), &id);
    let (first, bundle) = watch.next(Duration::from_secs(60)).await.unwrap_or_else(|e| panic!("{e}"));
    let first_v = svid::verify_svid(&first, &bundle).unwrap_or_else(|e| panic!("{e}"));
    // SPIRE backdates notBefore by a few seconds for clock skew; what counts is the lifetime
    // left: at most the 30 s TTL.
    let left = first_v.not_after - now();
    assert!((1..=31).contains(&left), "expected a 30 s SVID, it expires in {left} s");
    assert!(first_v.not_after - first_v.not_before <= 45, "{first_v:?}");

    // The agent rotates well before expiry; the new SVID must arrive on the same stream
    // before the first expires.
    let until_expiry = Duration::from_secs(u64::try_from(first_v.not_after - now()).unwrap_or(0) + 5);
    let (second, bundle) = watch.next(until_expiry).await.unwrap_or_else(|e| panic!("no rotation: {e}"));
    let second_v = svid::verify_svid(&second, &bundle).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(second_v.spiffe_id, id);
    assert_ne!(second_v.serial, first_v.serial, "rotation kept the serial");
    assert!(second_v.not_after > first_v.not_after, "rotated SVID does not expire later");
    assert!(now() < first_v.not_after, "the rotated SVID arrived only after the first had expired");
}

#[tokio::test]
async fn entries_can_be_listed_and_deleted() {
    let env = env().await;
    let node = env.node("node-1").unwrap_or_else(|e| panic!("{e}"));
    let id = env.workload_id("svid-crud", "tmp");
    let spire = env.spire();
    let entry = spire.create_entry(&EntrySpec::new(&id, &node.agent_id).selector("unix:uid:4242")).await.unwrap_or_else(|e| panic!("{e}"));
    let all = spire.list_entries().await.unwrap_or_else(|e| panic!("{e}"));
    let listed = all.iter().find(|e| e.id == entry.id).unwrap_or_else(|| panic!("{} not listed", entry.id));
    assert_eq!(listed.selectors, ["unix:uid:4242"]);
    spire.delete_entry(&entry.id).await.unwrap_or_else(|e| panic!("{e}"));
    let all = spire.list_entries().await.unwrap_or_else(|e| panic!("{e}"));
    assert!(all.iter().all(|e| e.id != entry.id), "entry still listed after delete");
}
