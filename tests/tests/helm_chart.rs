//! The Helm chart renders, and the real kube-apiserver accepts every object it renders
//! (server-side dry run: schemas, RBAC objects, the webhook configuration), in both
//! certificate modes.

use meshauth_testenv::TestEnv;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The cached helm binary (built by scripts/testenv-build with the other test binaries).
fn helm() -> PathBuf {
    let out = Command::new(repo().join("scripts/testenv-build")).arg("--print-bin-dirs").output().expect("run scripts/testenv-build");
    assert!(out.status.success(), "scripts/testenv-build failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|d| Path::new(d).join("helm"))
        .find(|p| p.exists())
        .expect("helm is among the test binaries")
}

fn render(extra: &[&str]) -> String {
    let out = Command::new(helm())
        .args(["template", "meshauth"])
        .arg(repo().join("config/helm/meshauth"))
        .args(["--namespace", "meshauth-system", "--include-crds"])
        .args(extra)
        .output()
        .expect("run helm");
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_api_server_accepts_everything_the_chart_renders() {
    let env = TestEnv::shared_blocking().expect("test environment");
    let (ok, out) = env.kubectl(&["create", "namespace", "meshauth-system"], "");
    assert!(ok || out.contains("AlreadyExists"), "{out}");
    for (mode, extra) in
        [("self-managed certificates", vec![]), ("certificates from a Secret", vec!["--set", "webhook.existingSecret=my-tls"])]
    {
        let manifests = render(&extra);
        for kind in [
            "kind: DaemonSet",
            "kind: Deployment",
            "kind: ValidatingWebhookConfiguration",
            "kind: CustomResourceDefinition",
            "kind: ClusterRole",
        ] {
            assert!(manifests.contains(kind), "{mode}: no {kind} rendered");
        }
        let (ok, out) = env.kubectl(&["apply", "--dry-run=server", "-f", "-"], &manifests);
        assert!(ok, "{mode}: the API server refused the chart:\n{out}");
        assert!(out.contains("daemonset.apps/meshauth-agent created (server dry run)"), "{out}");
    }
    let manifests = render(&[]);
    assert!(manifests.contains("hostNetwork: true") && manifests.contains("privileged: true"), "the agent needs the host network and BPF");
    assert!(manifests.contains("MESHAUTH_SPIRE_ENTRY_SELECTOR"), "the operator gets its SPIRE entry selectors");
}

#[test]
fn the_grafana_dashboard_renders_only_when_asked_and_is_valid_json() {
    assert!(!render(&[]).contains("meshauth-grafana-dashboard"), "the dashboard is off by default");
    let manifests = render(&["--set", "grafana.dashboard.enabled=true", "--set", "grafana.dashboard.namespace=monitoring"]);
    let doc = manifests.split("\n---").find(|d| d.contains("name: meshauth-grafana-dashboard")).expect("the dashboard ConfigMap");
    let config_map: serde_json::Value = serde_yaml::from_str(doc).expect("a YAML object");
    assert_eq!(config_map["metadata"]["namespace"], "monitoring");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1", "the sidecar's label");
    let dashboard: serde_json::Value =
        serde_json::from_str(config_map["data"]["meshauth.json"].as_str().expect("the dashboard")).expect("dashboard JSON");
    let titles: Vec<&str> = dashboard["panels"].as_array().expect("panels").iter().filter_map(|p| p["title"].as_str()).collect();
    for want in ["Handshakes by result", "Drops by reason", "Auth entries", "Seconds to the soonest SVID expiry"] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
}
