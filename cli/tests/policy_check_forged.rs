//! `meshauthctl policy check` on forged and unusable endpoints: an address two pods claim, a
//! pod IP outside its node's pod CIDR, a pod without a service account. Each says why.

use std::process::Command;

fn check(files: &[(&str, &str)], from: &str, to: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshauthctl"))
        .args(["policy", "check", "--manifests"])
        .arg(dir.path())
        .args(["--from", from, "--to", to, "--port", "8080"])
        .output()
        .expect("run meshauthctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

const MESH: &str = include_str!("../../cluster/testdata/forged-address/mesh.yaml");
/// Node IPAM: each node carries its pod CIDR.
const NODES: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-1}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2}
spec: {podCIDR: 10.244.2.0/24, podCIDRs: [10.244.2.0/24]}
";

#[test]
fn an_address_two_pods_claim_is_reported_with_its_claimants() {
    // A mirror pod's status is its node's word alone; within the node's own range it passes
    // the CIDR check, so the address is contested.
    let twin = "apiVersion: v1\nkind: Pod\nmetadata: {name: static-web-node-1, namespace: kube-system, annotations: {kubernetes.io/config.mirror: x}}\nspec: {nodeName: node-1, containers: []}\nstatus: {podIP: 10.244.1.5}\n";
    let (code, stderr) = check(&[("mesh.yaml", MESH), ("nodes.yaml", NODES), ("twin.yaml", twin)], "shop/order-0", "shop/payment-0");
    assert_eq!(code, 2, "{stderr}");
    for want in
        ["pod shop/payment-0 is not a mesh endpoint", "10.244.1.5", "kube-system/static-web-node-1", "isolated and names no identity"]
    {
        assert!(stderr.contains(want), "{stderr:?} lacks {want:?}");
    }
    let (code, stderr) = check(&[("mesh.yaml", MESH), ("nodes.yaml", NODES)], "shop/order-0", "shop/payment-0");
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn a_pod_outside_its_nodes_cidr_and_a_pod_without_a_service_account_are_not_endpoints() {
    let forged = "apiVersion: v1\nkind: Pod\nmetadata: {name: thief, namespace: shop}\nspec: {serviceAccountName: payment, nodeName: node-2, containers: []}\nstatus: {podIP: 10.244.1.9}\n";
    let (code, stderr) = check(&[("mesh.yaml", MESH), ("nodes.yaml", NODES), ("thief.yaml", forged)], "shop/thief", "shop/payment-0");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pod shop/thief is not a mesh endpoint: it has an IP outside its node's pod CIDRs"), "{stderr}");
    let anonymous = "apiVersion: v1\nkind: Pod\nmetadata: {name: anon, namespace: shop}\nspec: {nodeName: node-2, containers: []}\nstatus: {podIP: 10.244.2.9}\n";
    let (code, stderr) = check(&[("mesh.yaml", MESH), ("nodes.yaml", NODES), ("anon.yaml", anonymous)], "shop/anon", "shop/payment-0");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("pod shop/anon is not a mesh endpoint: it has no service account, so no SPIFFE ID"), "{stderr}");
}
