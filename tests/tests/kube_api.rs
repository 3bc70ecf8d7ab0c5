//! The real kube-apiserver of the test environment: meshauth's CRDs from `config/crds/`
//! install and are enforced (schema and CEL), printer columns come back in Table requests,
//! and the environment's own promises (annotated Node objects, pods without a kubelet) hold.
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate docs). One environment
//! is shared by every test of this binary.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use meshauth_testenv::k8s::{self, TestPod};
use meshauth_testenv::{NODE_AGENT_ID_ANNOTATION, TestEnv};
use serde_json::{Value, json};

const GROUP: &str = "meshauth.io";
const VERSION: &str = "v1alpha1";

async fn env_and_client() -> (&'static TestEnv, kube::Client) {
    let env = match TestEnv::shared().await {
        Ok(env) => env,
        Err(e) => panic!("{e}"),
    };
    let client = match env.client().await {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    (env, client)
}

/// The CRDs, installed and Established (idempotent: every test may call it).
async fn with_crds(client: &kube::Client) -> Vec<String> {
    match k8s::install_crds(client, &k8s::crd_dir(), Duration::from_secs(60)).await {
        Ok(names) => names,
        Err(e) => panic!("installing the CRDs of {}: {e}", k8s::crd_dir().display()),
    }
}

async fn namespace(client: &kube::Client, name: &str) {
    if let Err(e) = k8s::ensure_namespace(client, name).await {
        panic!("{e}");
    }
}

fn mesh_policies(client: &kube::Client, ns: &str) -> Api<kube::core::DynamicObject> {
    k8s::dynamic_api(client, GROUP, VERSION, "MeshPolicy", "meshpolicies", ns)
}

fn mutual_auths(client: &kube::Client, ns: &str) -> Api<kube::core::DynamicObject> {
    k8s::dynamic_api(client, GROUP, VERSION, "MutualAuth", "mutualauths", ns)
}

/// The MISSION §3 MeshPolicy, with `name` and `namespace`.
fn valid_mesh_policy(name: &str, ns: &str) -> Value {
    json!({
        "apiVersion": "meshauth.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": "order-service"}},
                     "namespaceSelector": {"matchLabels": {"team": "shop"}}},
                    {"identity": "spiffe://cluster.local/ns/shop/sa/order"}
                ],
                "ports": [{"port": 8080, "protocol": "TCP"}, {"port": 9000, "endPort": 9010}],
                "authentication": {"mode": "Required"}
            }]
        }
    })
}

fn valid_mutual_auth(name: &str, ns: &str, mode: &str) -> Value {
    json!({
        "apiVersion": "meshauth.io/v1alpha1",
        "kind": "MutualAuth",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": "payment-service"}}, "mode": mode}
    })
}

/// Asserts that the API server refuses `manifest` with 422 Invalid and a message containing
/// every string of `all` and at least one of `any` (when given).
async fn assert_refused(api: &Api<kube::core::DynamicObject>, manifest: Value, all: &[&str], any: &[&str]) {
    let name = manifest["metadata"]["name"].as_str().unwrap_or("?").to_owned();
    match k8s::create_dynamic(api, manifest).await {
        Ok(_) => panic!("{name}: the API server accepted an invalid object"),
        Err(kube::Error::Api(status)) => {
            let msg = &status.message;
            assert_eq!(status.code, 422, "{name}: expected 422 Invalid, got {status:?}");
            for want in all {
                assert!(msg.contains(want), "{name}: refusal lacks {want:?}: {msg}");
            }
            if !any.is_empty() {
                assert!(any.iter().any(|w| msg.contains(w)), "{name}: refusal has none of {any:?}: {msg}");
            }
        }
        Err(e) => panic!("{name}: expected a 422 refusal, got {e}"),
    }
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let (_env, client) = env_and_client().await;
    let mut names = with_crds(&client).await;
    names.sort();
    assert_eq!(names, ["meshpolicies.meshauth.io", "mutualauths.meshauth.io"]);

    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> = Api::all(client.clone());
    for (name, kind, short) in [("meshpolicies.meshauth.io", "MeshPolicy", "mp"), ("mutualauths.meshauth.io", "MutualAuth", "ma")] {
        let crd = crds.get(name).await.unwrap_or_else(|e| panic!("get CRD {name}: {e}"));
        assert_eq!(crd.spec.scope, "Namespaced", "{name}");
        let accepted = crd.status.and_then(|s| s.accepted_names).unwrap_or_else(|| panic!("{name}: no acceptedNames"));
        assert_eq!(accepted.kind, kind);
        assert!(accepted.short_names.unwrap_or_default().iter().any(|s| s == short), "{name}: short name {short} not accepted");
    }
    // Served: an empty list works in a fresh namespace.
    namespace(&client, "crd-served").await;
    for api in [mesh_policies(&client, "crd-served"), mutual_auths(&client, "crd-served")] {
        let list = api.list(&Default::default()).await.unwrap_or_else(|e| panic!("list: {e}"));
        assert!(list.items.is_empty());
    }
}

#[tokio::test]
async fn valid_objects_are_accepted() {
    let (_env, client) = env_and_client().await;
    with_crds(&client).await;
    let ns = "valid-objects";
    namespace(&client, ns).await;

    let mp = mesh_policies(&client, ns);
    let created =
        k8s::create_dynamic(&mp, valid_mesh_policy("payment-ingress", ns)).await.unwrap_or_else(|e| panic!("MeshPolicy refused: {e}"));
    assert_eq!(created.data["spec"]["ingress"][0]["authentication"]["mode"], "Required");
    assert_eq!(created.data["spec"]["ingress"][0]["ports"][1]["endPort"], 9010);

    // Minimal MeshPolicy: only a selector; `from`/`ports` omitted mean any source, every port.
    let minimal = json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MeshPolicy",
        "metadata": {"name": "minimal", "namespace": ns},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "ingress": [{}]}
    });
    k8s::create_dynamic(&mp, minimal).await.unwrap_or_else(|e| panic!("minimal MeshPolicy refused: {e}"));

    let ma = mutual_auths(&client, ns);
    for mode in ["Strict", "Permissive", "Disabled"] {
        let name = format!("mode-{}", mode.to_lowercase());
        let got =
            k8s::create_dynamic(&ma, valid_mutual_auth(&name, ns, mode)).await.unwrap_or_else(|e| panic!("MutualAuth {mode} refused: {e}"));
        assert_eq!(got.data["spec"]["mode"], mode);
    }
    // Namespace-wide: no selector.
    let wide = json!({
        "apiVersion": "meshauth.io/v1alpha1", "kind": "MutualAuth",
        "metadata": {"name": "default", "namespace": ns}, "spec": {"mode": "Strict"}
    });
    k8s::create_dynamic(&ma, wide).await.unwrap_or_else(|e| panic!("namespace-wide MutualAuth refused: {e}"));
}

#[tokio::test]
async fn invalid_objects_are_refused_with_the_schema_or_cel_message() {
    let (_env, client) = env_and_client().await;
    with_crds(&client).await;
    let ns = "invalid-objects";
    namespace(&client, ns).await;
    let mp = mesh_policies(&client, ns);
    let ma = mutual_auths(&client, ns);

    // Bad enum.
    assert_refused(&ma, valid_mutual_auth("sometimes", ns, "Sometimes"), &["spec.mode", "Sometimes"], &["Unsupported value"]).await;

    // endPort < port (CEL).
    let mut bad = valid_mesh_policy("endport-below-port", ns);
    bad["spec"]["ingress"][0]["ports"] = json!([{"port": 9000, "endPort": 8000}]);
    assert_refused(&mp, bad, &["endPort must be greater than or equal to port"], &[]).await;

    // Port 0 (schema minimum and/or CEL range rule).
    let mut bad = valid_mesh_policy("port-zero", ns);
    bad["spec"]["ingress"][0]["ports"] = json!([{"port": 0}]);
    assert_refused(
        &mp,
        bad,
        &["spec.ingress[0].ports[0].port"],
        &["should be greater than or equal to 1", "port must be between 1 and 65535"],
    )
    .await;

    // Identity without spiffe:// (CEL).
    let mut bad = valid_mesh_policy("identity-without-scheme", ns);
    bad["spec"]["ingress"][0]["from"] = json!([{"identity": "cluster.local/ns/shop/sa/order"}]);
    assert_refused(&mp, bad, &["identity must be a SPIFFE ID starting with spiffe://"], &[]).await;

    // Nothing of the above was stored.
    let left = mp.list(&Default::default()).await.unwrap_or_else(|e| panic!("list: {e}"));
    assert!(left.items.is_empty(), "refused MeshPolicies were stored");
}

#[tokio::test]
async fn printer_columns_come_back_in_a_table() {
    let (_env, client) = env_and_client().await;
    with_crds(&client).await;
    let ns = "printer-columns";
    namespace(&client, ns).await;
    k8s::create_dynamic(&mesh_policies(&client, ns), valid_mesh_policy("payment-ingress", ns)).await.unwrap_or_else(|e| panic!("{e}"));
    k8s::create_dynamic(&mutual_auths(&client, ns), valid_mutual_auth("strict", ns, "Strict")).await.unwrap_or_else(|e| panic!("{e}"));

    let t =
        k8s::get_table(&client, &format!("/apis/{GROUP}/{VERSION}/namespaces/{ns}/mutualauths")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.columns, ["Name", "Mode", "Selected", "Ready", "Age"], "MutualAuth columns");
    assert_eq!(t.cell("strict", "Mode"), Some(&json!("Strict")), "{t:?}");

    let t =
        k8s::get_table(&client, &format!("/apis/{GROUP}/{VERSION}/namespaces/{ns}/meshpolicies")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.columns, ["Name", "Selector", "Enforcement", "Selected", "Ready", "Age"], "MeshPolicy columns");
    assert_eq!(t.cell("payment-ingress", "Enforcement"), Some(&json!("Enforce")), "the CRD's default: {t:?}");
    let selector = t.cell("payment-ingress", "Selector").unwrap_or_else(|| panic!("no Selector cell: {t:?}"));
    assert!(selector.to_string().contains("payment-service"), "Selector cell {selector}");
}

#[tokio::test]
async fn nodes_carry_their_spire_agent_id() {
    let (env, client) = env_and_client().await;
    let api: Api<Node> = Api::all(client);
    assert_eq!(env.nodes().len(), 2);
    for node in env.nodes() {
        let n = api.get(&node.name).await.unwrap_or_else(|e| panic!("Node {}: {e}", node.name));
        let ann = n.metadata.annotations.unwrap_or_default();
        assert_eq!(ann.get(NODE_AGENT_ID_ANNOTATION), Some(&node.agent_id), "Node {}", node.name);
        assert!(node.agent_id.starts_with(&format!("spiffe://{}/spire/agent/join_token/", env.trust_domain())), "{}", node.agent_id);
    }
    let agents = env.spire().list_agents().await.unwrap_or_else(|e| panic!("{e}"));
    for node in env.nodes() {
        assert!(agents.contains(&node.agent_id), "agent {} not attested: {agents:?}", node.agent_id);
    }
}

#[tokio::test]
async fn pods_get_ip_and_phase_without_a_kubelet() {
    let (_env, client) = env_and_client().await;
    let ns = "pods";
    let pod = TestPod::new(ns, "payment-0").label("app", "payment-service").service_account("payment").node("node-1");
    k8s::create_pod(&client, &pod).await.unwrap_or_else(|e| panic!("{e}"));
    let got = k8s::set_pod_status(&client, ns, "payment-0", "Running", Some("10.244.1.5")).await.unwrap_or_else(|e| panic!("{e}"));
    let status = got.status.unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.5"));

    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let read = api.get("payment-0").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read.spec.and_then(|s| s.node_name).as_deref(), Some("node-1"));
    assert_eq!(read.status.and_then(|s| s.pod_ip).as_deref(), Some("10.244.1.5"));

    k8s::delete_pod(&client, ns, "payment-0").await.unwrap_or_else(|e| panic!("{e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match api.get_opt("payment-0").await {
            Ok(None) => break,
            Ok(Some(_)) if std::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Ok(Some(_)) => {
                panic!("bound pod still present 10 s after a gracePeriodSeconds=0 delete")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
