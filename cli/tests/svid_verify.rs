//! `meshauthctl svid verify` as a user runs it: exit 0 and the SPIFFE ID for a valid chain,
//! exit 1 and the reason for each way a chain can be wrong.

use meshauth_agent::verify::test_certs::{TestCa, pem_certs};
use std::path::Path;
use std::process::Command;

fn verify(dir: &Path, bundle: &str, chain: &str, extra: &[&str]) -> (i32, String, String) {
    std::fs::write(dir.join("bundle.pem"), bundle).expect("write bundle");
    std::fs::write(dir.join("chain.pem"), chain).expect("write chain");
    let out = Command::new(env!("CARGO_BIN_EXE_meshauthctl"))
        .args(["svid", "verify", "--bundle"])
        .arg(dir.join("bundle.pem"))
        .args(extra)
        .arg(dir.join("chain.pem"))
        .output()
        .expect("run meshauthctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_valid_chain_prints_its_spiffe_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local");
    let id = "spiffe://cluster.local/ns/shop/sa/order";
    let bundle = pem_certs(&[ca.root_cert()]);
    let chain = pem_certs(&ca.svid(id).chain);
    assert_eq!(verify(dir.path(), &bundle, &chain, &[]), (0, id.to_owned(), String::new()));
    let (code, stdout, _) = verify(dir.path(), &bundle, &chain, &["--trust-domain", "cluster.local"]);
    assert_eq!((code, stdout.as_str()), (0, id));
    // Through an intermediate, sent after the leaf as SPIRE does.
    let chain = pem_certs(&ca.intermediate().svid(id).chain);
    assert_eq!(verify(dir.path(), &bundle, &chain, &[]).0, 0);
}

#[test]
fn a_bad_chain_exits_1_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local");
    let other = TestCa::new("cluster.local");
    let id = "spiffe://cluster.local/ns/shop/sa/order";
    let bundle = pem_certs(&[ca.root_cert()]);
    let good = ca.svid(id).chain;
    let mut two_leaves = good.clone();
    two_leaves.extend(ca.svid("spiffe://cluster.local/ns/shop/sa/payment").chain);
    let mut ca_first = vec![ca.intermediate().root_cert()];
    ca_first.extend(good.clone());
    let cases: [(&str, String, String, &[&str]); 5] = [
        ("unknown CA", bundle.clone(), pem_certs(&other.svid(id).chain), &[]),
        ("other trust domain", bundle.clone(), pem_certs(&good), &["--trust-domain", "example.org"]),
        ("substituted chain: two leaves", bundle.clone(), pem_certs(&two_leaves), &[]),
        ("leaf not first", bundle.clone(), pem_certs(&ca_first), &[]),
        ("not PEM", bundle.clone(), "hello".to_owned(), &[]),
    ];
    for (what, bundle, chain, extra) in cases {
        let (code, stdout, stderr) = verify(dir.path(), &bundle, &chain, extra);
        assert_eq!(code, 1, "{what}: stdout {stdout:?} stderr {stderr:?}");
        assert!(stdout.is_empty(), "{what}: {stdout}");
        assert!(stderr.contains("invalid X.509-SVID") || stderr.contains("meshauthctl"), "{what}: {stderr}");
    }
}

#[test]
fn a_leaf_naming_only_the_trust_domain_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("cluster.local");
    let bundle = pem_certs(&[ca.root_cert()]);
    let chain = pem_certs(&ca.svid("spiffe://cluster.local").chain);
    for extra in [&[][..], &["--trust-domain", "cluster.local"][..]] {
        let (code, stdout, stderr) = verify(dir.path(), &bundle, &chain, extra);
        assert_eq!(code, 1, "{extra:?}: stdout {stdout:?} stderr {stderr:?}");
        assert!(stdout.is_empty(), "{stdout}");
        assert!(stderr.contains("SPIFFE ID spiffe://cluster.local has no path"), "{stderr}");
    }
}
