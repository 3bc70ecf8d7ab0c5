//! `meshauthctl explain` offline: the verdict by name from a directory of manifests, and its
//! exit status (0 allow, 1 deny, 2 no answer).

use std::path::PathBuf;
use std::process::Command;

fn explain(args: &[&str]) -> (Option<i32>, String, String) {
    explain_in(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/examples"), args)
}

fn explain_in(examples: &std::path::Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshauthctl"))
        .arg("explain")
        .arg("--manifests")
        .arg(examples)
        .args(args)
        .output()
        .expect("run meshauthctl explain");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn explain_names_the_mesh_policy_rule_and_the_mutual_auth_that_decide() {
    let (code, stdout, stderr) = explain(&["--from", "shop/order-0", "--to", "shop/payment-0", "--port", "8080", "--output", "json"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(report["verdict"], "allow");
    assert_eq!(report["authentication"], "required");
    assert_eq!(report["allowedBy"][0]["meshPolicy"], "shop/payment-ingress", "{report}");
    assert_eq!(report["allowedBy"][0]["rule"], "spec.ingress[0]", "{report}");
    assert_eq!(report["mutualAuth"]["name"], "shop/default", "{report}");
    assert_eq!(report["mutualAuth"]["mode"], "Strict", "{report}");
}

#[test]
fn a_denied_pair_exits_1_and_says_no_rule_admits_it() {
    let (code, stdout, stderr) = explain(&["--from", "shop/frontend-0", "--to", "shop/payment-0", "--port", "8080"]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("deny") && stdout.contains("no rule of those policies admits this source"), "{stdout}");
}

#[test]
fn an_unknown_pod_exits_2_and_names_it() {
    let (code, stdout, stderr) = explain(&["--from", "shop/nobody", "--to", "shop/payment-0", "--port", "8080"]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stderr.contains("shop/nobody"), "{stderr}");
}

#[test]
fn an_audited_policy_passes_what_it_would_deny_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    meshauth_agent::inputs::examples_with(dir.path(), &[("50-audit.yaml", meshauth_agent::inputs::DEBUG_AUDIT_POLICY)]).expect("manifests");
    let args = ["--from", "shop/order-0", "--to", "tools/debug", "--port", "5353", "--protocol", "udp"];
    let (code, stdout, stderr) = explain_in(dir.path(), &[&args[..], &["--output", "json"]].concat());
    assert_eq!(code, Some(0), "it passes: {stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!((report["verdict"].as_str(), report["audit"].as_str()), (Some("allow"), Some("denied")), "{report}");
    assert_eq!(report["auditedBy"][0], "tools/debug-audit", "{report}");
    let (_, table, _) = explain_in(dir.path(), &args);
    assert!(table.contains("AUDIT") && table.contains("tools/debug-audit"), "{table}");
}
