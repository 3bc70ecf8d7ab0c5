//! `meshauthctl policy check` as a user runs it: on the example mesh, and on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples")
}

fn run(manifests: &Path, from: &str, to: &str, port: &str, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshauthctl"))
        .args(["policy", "check", "--manifests"])
        .arg(manifests)
        .args(["--from", from, "--to", to, "--port", port])
        .args(extra)
        .output()
        .expect("run meshauthctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn json(from: &str, to: &str, port: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--output", "json"];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = run(&examples(), from, to, port, &args);
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{stdout:?} is not JSON: {e}"))
}

#[test]
fn answers_the_example_mesh() {
    let cases = [
        ("shop/order-0", "shop/payment-0", "8080", &[][..], "allow", "required"),
        ("shop/frontend-0", "shop/payment-0", "8080", &[], "deny", "none"),
        ("shop/order-0", "shop/payment-0", "8081", &[], "deny", "none"),
        ("shop/order-0", "shop/payment-0", "8080", &["--protocol", "UDP"], "deny", "none"),
        ("shop/frontend-0", "shop/order-0", "8080", &[], "allow", "required"),
        ("tools/metrics", "shop/order-0", "9090", &[], "allow", "required"),
        ("tools/debug", "shop/order-0", "9090", &[], "deny", "none"),
        ("tools/debug", "shop/frontend-0", "80", &[], "allow", "permissive"),
        ("shop/payment-0", "tools/metrics", "9100", &[], "allow", "none"),
    ];
    for (from, to, port, extra, verdict, auth) in cases {
        let got = json(from, to, port, extra);
        assert_eq!(got, serde_json::json!({"verdict": verdict, "authentication": auth}), "{from} -> {to}:{port} {extra:?}");
    }
}

#[test]
fn the_table_explains_the_decision() {
    let (code, stdout, _) = run(&examples(), "shop/order-0", "shop/payment-0", "8080", &[]);
    assert_eq!(code, 0);
    assert!(stdout.contains("allow"), "{stdout}");
    assert!(stdout.contains("MeshPolicy shop/payment-ingress"), "{stdout}");
    assert!(stdout.contains("MutualAuth shop/default: Strict"), "{stdout}");
}

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).expect("write");
    }
    dir
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}\n";

#[test]
fn bad_input_exits_2_and_names_the_problem() {
    let missing = Path::new("/nonexistent/meshauth");
    let unknown_kind = dir_with(&[("k.yaml", "apiVersion: v1\nkind: Gadget\nmetadata: {name: g}\n")]);
    let no_ip = dir_with(&[
        ("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x}\nspec: {serviceAccountName: b, containers: []}\n"),
        ("a.yaml", POD),
    ]);
    let host_network = dir_with(&[
        (
            "p.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: h, namespace: x}\nspec: {hostNetwork: true, containers: []}\nstatus: {podIP: 192.168.1.10}\n",
        ),
        ("a.yaml", POD),
    ]);
    let bad_spec = dir_with(&[
        ("a.yaml", POD),
        (
            "mp.yaml",
            "apiVersion: meshauth.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: bad, namespace: x}\nspec:\n  selector: {}\n  ingress:\n  - from: [{identity: 'spiffe://cluster.local/ns/x/sa/'}]\n",
        ),
    ]);
    let bad_enum = dir_with(&[
        ("a.yaml", POD),
        ("ma.yaml", "apiVersion: meshauth.io/v1alpha1\nkind: MutualAuth\nmetadata: {name: m, namespace: x}\nspec: {mode: Sometimes}\n"),
    ]);
    let cases: [(&Path, &str, &str, &[&str]); 7] = [
        (missing, "x/a", "x/a", &["cannot read /nonexistent/meshauth"]),
        (unknown_kind.path(), "x/a", "x/a", &["k.yaml", "Gadget default/g", "unknown kind"]),
        (no_ip.path(), "x/b", "x/a", &["pod x/b has no status.podIP"]),
        (host_network.path(), "x/h", "x/a", &["pod x/h is not a mesh endpoint: it uses the host network"]),
        (&examples(), "shop/nope", "shop/order-0", &["pod shop/nope is not in the manifests"]),
        (bad_spec.path(), "x/a", "x/a", &["mp.yaml", "MeshPolicy x/bad", "spec.ingress[0].from[0].identity"]),
        (bad_enum.path(), "x/a", "x/a", &["ma.yaml", "MutualAuth x/m", "spec.mode", "Sometimes"]),
    ];
    for (dir, from, to, wants) in cases {
        let (code, stdout, stderr) = run(dir, from, to, "80", &["--output", "json"]);
        assert_eq!(code, 2, "{dir:?}: stdout {stdout} stderr {stderr}");
        assert!(stdout.is_empty(), "{stdout}");
        for want in wants {
            assert!(stderr.contains(want), "{stderr:?} lacks {want:?}");
        }
    }
    let (code, _, stderr) = run(&examples(), "shop", "shop/order-0", "80", &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("\"shop\" is not NS/POD"), "{stderr}");
}

/// One namespaced MeshPolicy with every namespace as source and 10,000 ports would multiply into
/// more policy entries than the map holds: refused, naming the limit, before anything is decided.
#[test]
fn an_oversized_policy_is_refused_naming_the_limit() {
    let ports: String = (1..=10_000).map(|p| format!("    - {{port: {p}}}\n")).collect();
    let policy = format!(
        "apiVersion: meshauth.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: flood, namespace: x}}\nspec:\n  selector: {{}}\n  ingress:\n  - from: [{{namespaceSelector: {{}}}}]\n    ports:\n{ports}"
    );
    let dir = dir_with(&[("a.yaml", POD), ("mp.yaml", &policy)]);
    let (code, stdout, stderr) = run(dir.path(), "x/a", "x/a", "80", &["--output", "json"]);
    assert_eq!(code, 2, "stdout {stdout} stderr {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    for want in [
        "mp.yaml: MeshPolicy x/flood: spec.ingress[0].ports: has 10000 entries, more than the limit of 64 entries per rule",
        "more than the limit of 1024 port blocks per MeshPolicy",
    ] {
        assert!(stderr.contains(want), "{stderr:?} lacks {want:?}");
    }
}
