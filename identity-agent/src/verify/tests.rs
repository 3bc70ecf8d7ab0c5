use std::time::Duration;

use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};

use super::test_certs::{TestCa, leaf_params, now, pem_certs};
use super::*;

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).expect("valid id")
}

#[test]
fn accepts_a_valid_svid_signed_by_the_root() {
    let ca = TestCa::new("cluster.local");
    let svid = ca.svid(ORDER);
    let verified = verify_svid_for(&svid.chain, &ca.bundle_set(), &id(ORDER), Usage::Client, now()).expect("valid");
    assert_eq!(verified.id, id(ORDER));
    let left = verified.not_after.duration_since(now()).expect("in the future");
    assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600), "{left:?}");
}

#[test]
fn accepts_a_chain_through_intermediates() {
    let root = TestCa::new("cluster.local");
    let inter = root.intermediate().intermediate();
    let svid = inter.svid(ORDER);
    assert_eq!(svid.chain.len(), 3);
    let verified = verify_svid(&svid.chain, &root.bundle_set(), None, Usage::Server, now()).expect("valid");
    assert_eq!(verified.id, id(ORDER));
}

#[test]
fn refuses_another_trust_domain() {
    let ours = TestCa::new("cluster.local");
    let theirs = TestCa::new("evil.example");
    let svid = theirs.svid("spiffe://evil.example/ns/shop/sa/order");
    let mut bundles = ours.bundle_set();
    // Even with their bundle at hand, a peer expected in our trust domain is refused.
    bundles.insert(theirs.bundle());
    let err = verify_svid_for(&svid.chain, &bundles, &id(ORDER), Usage::Client, now()).expect_err("other trust domain");
    assert_eq!(err.reason(), "wrong_trust_domain", "{err}");
    let err = verify_svid(&svid.chain, &ours.bundle_set(), None, Usage::Client, now()).expect_err("no bundle");
    assert_eq!(err.reason(), "unknown_trust_domain", "{err}");
}

#[test]
fn refuses_a_wrong_spiffe_id_even_by_prefix() {
    let ca = TestCa::new("cluster.local");
    for other in [
        "spiffe://cluster.local/ns/shop/sa/payment",
        "spiffe://cluster.local/ns/shop/sa/order2",
        "spiffe://cluster.local/ns/shop/sa/order/x",
    ] {
        let svid = ca.svid(other);
        let err = verify_svid_for(&svid.chain, &ca.bundle_set(), &id(ORDER), Usage::Client, now()).expect_err(other);
        assert_eq!(err.reason(), "wrong_spiffe_id", "{err}");
    }
}

#[test]
fn refuses_expired_and_not_yet_valid() {
    let ca = TestCa::new("cluster.local");
    let mut params = leaf_params(ORDER);
    params.not_before = time::OffsetDateTime::from(now() - Duration::from_secs(7200));
    params.not_after = time::OffsetDateTime::from(now() - Duration::from_secs(60));
    let expired = ca.svid_with(params);
    let err = verify_svid(&expired.chain, &ca.bundle_set(), None, Usage::Client, now()).expect_err("expired");
    assert_eq!(err.reason(), "expired", "{err}");

    // A valid SVID checked at a later instant expires too: the caller's clock rules.
    let svid = ca.svid(ORDER);
    let later = now() + Duration::from_secs(7200);
    let err = verify_svid(&svid.chain, &ca.bundle_set(), None, Usage::Client, later).expect_err("expired later");
    assert_eq!(err.reason(), "expired");
    let earlier = now() - Duration::from_secs(7200);
    let err = verify_svid(&svid.chain, &ca.bundle_set(), None, Usage::Client, earlier).expect_err("not yet valid");
    assert_eq!(err.reason(), "not_yet_valid");
}

#[test]
fn refuses_an_unknown_ca_of_the_same_trust_domain() {
    let ours = TestCa::new("cluster.local");
    let rogue = TestCa::new("cluster.local");
    let svid = rogue.svid(ORDER);
    let err = verify_svid_for(&svid.chain, &ours.bundle_set(), &id(ORDER), Usage::Client, now()).expect_err("unknown CA");
    assert_eq!(err.reason(), "unknown_ca", "{err}");
}

#[test]
fn refuses_substituted_chains() {
    let ca = TestCa::new("cluster.local");
    let inter = ca.intermediate();
    let mine = inter.svid("spiffe://cluster.local/ns/evil/sa/evil");
    let victim = inter.svid(ORDER);

    // Two leaves: the victim's leaf appended to a valid chain of mine.
    let mut two_leaves = mine.chain.clone();
    two_leaves.push(victim.chain[0].clone());
    let err = verify_svid(&two_leaves, &ca.bundle_set(), None, Usage::Client, now()).expect_err("two leaves");
    assert_eq!(err.reason(), "multiple_leaves", "{err}");

    // The leaf not first: intermediate, then leaf.
    let swapped = vec![victim.chain[1].clone(), victim.chain[0].clone()];
    let err = verify_svid(&swapped, &ca.bundle_set(), None, Usage::Client, now()).expect_err("leaf not first");
    assert_eq!(err.reason(), "leaf_not_first", "{err}");

    // Only CAs.
    let err = verify_svid(std::slice::from_ref(&inter.cert), &ca.bundle_set(), None, Usage::Client, now()).expect_err("no leaf");
    assert_eq!(err.reason(), "no_leaf", "{err}");

    let err = verify_svid(&[], &ca.bundle_set(), None, Usage::Client, now()).expect_err("empty");
    assert_eq!(err.reason(), "empty_chain");
}

#[test]
fn refuses_leaves_that_break_the_svid_profile() {
    let ca = TestCa::new("cluster.local");
    let bundles = ca.bundle_set();
    let check = |params: rcgen::CertificateParams, reason: &str| {
        let svid = ca.svid_with(params);
        let err = verify_svid(&svid.chain, &bundles, None, Usage::Client, now()).expect_err(reason);
        assert_eq!(err.reason(), reason, "{err}");
    };

    let mut no_san = leaf_params(ORDER);
    no_san.subject_alt_names.clear();
    check(no_san, "bad_spiffe_id");

    let mut two_sans = leaf_params(ORDER);
    two_sans.subject_alt_names.push(rcgen::SanType::URI("spiffe://cluster.local/ns/a/sa/b".try_into().expect("uri")));
    check(two_sans, "bad_spiffe_id");

    let mut not_spiffe = leaf_params(ORDER);
    not_spiffe.subject_alt_names = vec![rcgen::SanType::URI("https://cluster.local/x".try_into().expect("uri"))];
    check(not_spiffe, "bad_spiffe_id");

    let mut upper = leaf_params(ORDER);
    upper.subject_alt_names = vec![rcgen::SanType::URI("spiffe://Cluster.local/x".try_into().expect("uri"))];
    check(upper, "bad_spiffe_id");

    let mut no_ds = leaf_params(ORDER);
    no_ds.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    check(no_ds, "bad_key_usage");

    let mut no_ku = leaf_params(ORDER);
    no_ku.key_usages.clear();
    check(no_ku, "bad_key_usage");

    let mut signs = leaf_params(ORDER);
    signs.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign];
    check(signs, "bad_key_usage");

    // A "leaf" that is a CA: there is no leaf at all.
    let mut ca_leaf = leaf_params(ORDER);
    ca_leaf.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    check(ca_leaf, "no_leaf");

    // EKU present but for clients only, presented by a server.
    let mut client_only = leaf_params(ORDER);
    client_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let svid = ca.svid_with(client_only);
    verify_svid(&svid.chain, &bundles, None, Usage::Client, now()).expect("client use is fine");
    let err = verify_svid(&svid.chain, &bundles, None, Usage::Server, now()).expect_err("server use");
    assert_eq!(err.reason(), "invalid_chain", "{err}");
}

/// An SVID whose SPIFFE ID is only the trust domain would, if accepted by the server side
/// (which takes any ID of a trust domain it has a bundle for), authenticate a peer as the
/// trust domain itself. Both sides refuse it, before any signature is looked at.
#[test]
fn refuses_a_leaf_whose_spiffe_id_has_no_path_on_both_sides() {
    let ca = TestCa::new("cluster.local");
    let bundles = ca.bundle_set();
    let pathless = ca.svid("spiffe://cluster.local");
    for usage in [Usage::Client, Usage::Server, Usage::Any] {
        let err = verify_svid(&pathless.chain, &bundles, None, usage, now()).expect_err("no path");
        assert_eq!(err, VerifyError::NoPath("spiffe://cluster.local".into()), "{usage:?}");
        assert_eq!(err.reason(), "bad_spiffe_id");
        assert!(err.to_string().contains("has no path"), "{err}");
    }
    // The side that expects an exact ID refuses it even when told to expect that very ID.
    let expected = id("spiffe://cluster.local");
    let err = verify_svid_for(&pathless.chain, &bundles, &expected, Usage::Server, now()).expect_err("no path, expected");
    assert_eq!(err.reason(), "bad_spiffe_id", "{err}");
    // The same CA's leaf with a path still verifies: it is the path that is refused.
    verify_svid(&ca.svid(ORDER).chain, &bundles, None, Usage::Server, now()).expect("with a path");
}

#[test]
fn not_after_is_the_earliest_of_the_chain() {
    let ca = TestCa::new("cluster.local");
    let svid = ca.svid(ORDER);
    let verified = verify_svid(&svid.chain, &ca.bundle_set(), None, Usage::Any, now()).expect("valid");
    let leaf_after = now() + Duration::from_secs(3600);
    assert!(verified.not_after <= leaf_after);
}

#[test]
fn svid_files_verify_like_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local");
    let inter = ca.intermediate();
    let svid = inter.svid(ORDER);
    let bundle = dir.path().join("bundle.pem");
    let chain = dir.path().join("chain.pem");
    std::fs::write(&bundle, pem_certs(&[ca.root_cert()])).expect("write");
    std::fs::write(&chain, pem_certs(&svid.chain)).expect("write");

    let verified = verify_svid_files(&bundle, &chain, None, now()).expect("valid");
    assert_eq!(verified.id, id(ORDER));
    verify_svid_files(&bundle, &chain, Some("cluster.local"), now()).expect("valid in td");
    let err = verify_svid_files(&bundle, &chain, Some("other.td"), now()).expect_err("td");
    assert_eq!(err.reason(), "wrong_trust_domain");

    let reversed: Vec<_> = svid.chain.iter().rev().cloned().collect();
    std::fs::write(&chain, pem_certs(&reversed)).expect("write");
    let err = verify_svid_files(&bundle, &chain, None, now()).expect_err("reversed");
    assert_eq!(err.reason(), "leaf_not_first");

    std::fs::write(&chain, "not pem").expect("write");
    let err = verify_svid_files(&bundle, &chain, None, now()).expect_err("garbage");
    assert_eq!(err.reason(), "unreadable_input");
    let err = verify_svid_files(&bundle, &dir.path().join("missing.pem"), None, now()).expect_err("missing");
    assert_eq!(err.reason(), "unreadable_input");
}
