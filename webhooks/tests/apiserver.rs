//! The webhook behind the real kube-apiserver of the test environment, with a self-managed
//! certificate: the API server calls it over TLS through a ValidatingWebhookConfiguration whose
//! `caBundle` the webhook keeps; invalid objects are refused with the webhook's message, valid
//! ones pass, warnings reach kubectl, and CA + certificate rotations while requests keep coming
//! cause no failed admission.
//!
//! Needs root and the test environment's Go-built cache (see the `meshauth-testenv` docs).

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::api::{Api, DeleteParams, PostParams};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_testenv::{TestEnv, k8s};
use meshauth_webhook::Webhook;
use meshauth_webhook::config::{ApiWarnings, CertSource, Config, SelfManagedCerts};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const NS: &str = "webhook-test";
const MESH_NS: &str = "meshauth-system";
const CONFIGURATION: &str = "meshauth-webhook-test";
const WEBHOOK_NAME: &str = "validate.meshauth.io";

fn fail<T>(what: &str, e: impl std::fmt::Display) -> T {
    panic!("{what}: {e}")
}

fn mesh_policy(name: &str, identity: &str) -> MeshPolicy {
    serde_json::from_value(json!({
        "apiVersion": "meshauth.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{
                "from": [{"identity": identity}, {"podSelector": {"matchLabels": {"app": "order"}}}],
                "ports": [{"port": 8080}],
                "authentication": {"mode": "Required"}
            }]
        }
    }))
    .unwrap_or_else(|e| fail("MeshPolicy JSON", e))
}

fn mutual_auth(name: &str, spec: Value) -> MutualAuth {
    serde_json::from_value(json!({
        "apiVersion": "meshauth.io/v1alpha1",
        "kind": "MutualAuth",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec
    }))
    .unwrap_or_else(|e| fail("MutualAuth JSON", e))
}

fn configuration(addr: SocketAddr) -> ValidatingWebhookConfiguration {
    serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": CONFIGURATION},
        "webhooks": [{
            "name": WEBHOOK_NAME,
            "clientConfig": {"url": format!("https://{addr}/validate")},
            "rules": [{
                "apiGroups": ["meshauth.io"],
                "apiVersions": ["v1alpha1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": ["meshpolicies", "mutualauths"],
                "scope": "Namespaced"
            }],
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10
        }]
    }))
    .unwrap_or_else(|e| fail("configuration JSON", e))
}

fn api_message(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.code),
        other => other.to_string(),
    }
}

/// kubectl with the environment's kubeconfig, `manifest` on stdin: (success, stdout, stderr).
async fn kubectl(env: &TestEnv, args: &[&str], manifest: &Value) -> (bool, String, String) {
    let kubeconfig = env.kubeconfig();
    let mut child = tokio::process::Command::new(env.bin("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| fail("kubectl", e));
    let yaml = serde_yaml::to_string(manifest).unwrap_or_else(|e| fail("yaml", e));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(yaml.as_bytes()).await.unwrap_or_else(|e| fail("kubectl stdin", e));
    }
    let out = child.wait_with_output().await.unwrap_or_else(|e| fail("kubectl", e));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_uses_the_webhook_and_rotation_fails_no_admission() {
    let env = TestEnv::shared().await.unwrap_or_else(|e| fail("test environment", e));
    let client = env.client().await.unwrap_or_else(|e| fail("client", e));
    k8s::install_crds(&client, &k8s::crd_dir(), Duration::from_secs(60)).await.unwrap_or_else(|e| fail("installing CRDs", e));
    for ns in [NS, MESH_NS] {
        k8s::ensure_namespace(&client, ns).await.unwrap_or_else(|e| fail("namespace", e));
    }

    // Short-lived certificates: a rotation every ~15 s, each with a 5 s caBundle overlap.
    let certs = SelfManagedCerts {
        secret_namespace: Some(MESH_NS.into()),
        secret_name: "meshauth-webhook-test-tls".into(),
        webhook_configuration: CONFIGURATION.into(),
        dns_names: vec!["127.0.0.1".into(), "localhost".into()],
        validity: Duration::from_secs(45),
        renew_before: Duration::from_secs(30),
        overlap: Duration::from_secs(5),
        check_interval: Duration::from_secs(1),
    };
    certs.check().unwrap_or_else(|e| fail("certificate settings", e));
    let mut config = Config::new(CertSource::SelfManaged(certs));
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    // The API server keeps its connections; closing them every half second makes it handshake
    // again and again, so every rotation step meets fresh TLS handshakes.
    config.max_connection_age = Some(Duration::from_millis(500));
    // Only this test's API server reaches the loopback port, so the API-based warnings may be
    // given without client certificates.
    config.api_warnings = ApiWarnings::Always;
    let webhook = Webhook::start_with_client(config, Some(client.clone())).await.unwrap_or_else(|e| fail("webhook start", e));

    let configurations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let _ = configurations.delete(CONFIGURATION, &DeleteParams::default()).await;
    configurations
        .create(&PostParams::default(), &configuration(webhook.addr))
        .await
        .unwrap_or_else(|e| fail("creating the ValidatingWebhookConfiguration", api_message(&e)));

    let policies: Api<MeshPolicy> = Api::namespaced(client.clone(), NS);
    let mutual_auths: Api<MutualAuth> = Api::namespaced(client.clone(), NS);
    let dry_run = PostParams { dry_run: true, ..Default::default() };
    // A SPIFFE ID with a trailing slash passes the CRD's CEL rule (startsWith 'spiffe://') but
    // not the webhook.
    let invalid = mesh_policy("invalid", "spiffe://cluster.local/ns/shop/sa/order/");
    let valid = mesh_policy("valid", "spiffe://cluster.local/ns/shop/sa/order");

    // Wait until the API server trusts the webhook (caBundle patched and loaded).
    let started = Instant::now();
    loop {
        match policies.create(&dry_run, &invalid).await {
            Err(e) if api_message(&e).contains("ends with a slash") => break,
            other => {
                let seen = other.map(|_| "created".to_owned()).unwrap_or_else(|e| api_message(&e));
                assert!(started.elapsed() < Duration::from_secs(60), "the API server never used the webhook; last: {seen}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let bundle = configurations.get(CONFIGURATION).await.unwrap_or_else(|e| fail("get", e)).webhooks.unwrap_or_default()[0]
        .client_config
        .ca_bundle
        .clone();
    assert!(bundle.is_some_and(|b| String::from_utf8_lossy(&b.0).contains("BEGIN CERTIFICATE")), "caBundle patched");

    // Invalid objects are refused with the webhook's message, naming field and reason.
    let err = policies.create(&PostParams::default(), &invalid).await.expect_err("invalid MeshPolicy refused");
    let message = api_message(&err);
    for part in [
        &format!("admission webhook \"{WEBHOOK_NAME}\" denied the request"),
        "MeshPolicy webhook-test/invalid is invalid",
        "spec.ingress[0].from[0].identity",
        "is not a valid SPIFFE ID: path ends with a slash",
        "(422)",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    // Another trust domain is valid SPIFFE: admitted, with a warning that nobody can prove it.
    let other_td = serde_json::to_value(mesh_policy("other-td", "spiffe://example.org/ns/shop/sa/order")).unwrap_or_default();
    let (ok, _, stderr) = kubectl(env, &["apply", "--dry-run=server", "-f", "-"], &other_td).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("Warning: spec.ingress[0].from[0].identity: can never match"), "{stderr}");
    assert!(stderr.contains("no peer can prove it until that trust domain is federated"), "{stderr}");
    // The totals over all rules are refused by the CRD's CEL rules already (the webhook's own
    // refusal of them is tested against the HTTP server): five rules of 60 ports are 300 entries.
    let oversized_rules = |ports: &dyn Fn(i32) -> Vec<meshauth_crds::PortRule>| {
        let mut policy = mesh_policy("oversized", "spiffe://cluster.local/ns/shop/sa/order");
        let rule = policy.spec.ingress[0].clone();
        policy.spec.ingress = (0..5)
            .map(|r| {
                let mut rule = rule.clone();
                rule.from[0].identity = Some(format!("spiffe://cluster.local/ns/shop/sa/order-{r}"));
                rule.ports = ports(r);
                rule
            })
            .collect();
        policy
    };
    let port = |port: i32, end_port: Option<i32>| meshauth_crds::PortRule { port, end_port, protocol: Default::default() };
    let many_ports = oversized_rules(&|_| (0..60).map(|p| port(1000 + p, None)).collect());
    let message = api_message(&policies.create(&dry_run, &many_ports).await.expect_err("300 ports"));
    assert!(message.contains("spec.ingress: Invalid value"), "the schema, not the webhook, refuses it: {message}");
    assert!(message.contains("more than the limit of 256 ports entries over all rules of a MeshPolicy"), "{message}");
    // What only the webhook can count: the port blocks that odd ranges split into (5 rules of
    // 10 ranges of about 30 blocks each), within every list limit.
    let odd_ranges = oversized_rules(&|r| (0..10).map(|p| port(1 + r * 10 + p, Some(65534 - r * 10 - p))).collect());
    let message = api_message(&policies.create(&dry_run, &odd_ranges).await.expect_err("too many port blocks"));
    assert!(message.contains("MeshPolicy webhook-test/oversized is invalid: spec.ingress: its ports split into"), "{message}");
    assert!(message.contains("more than the limit of 1024 port blocks per MeshPolicy"), "{message}");
    // One list past its maxItems is refused by the API server's schema already.
    let mut long_list = mesh_policy("long-list", "spiffe://cluster.local/ns/shop/sa/order");
    long_list.spec.ingress[0].ports = (0..65).map(|p| port(1000 + p, None)).collect();
    let message = api_message(&policies.create(&dry_run, &long_list).await.expect_err("65 ports"));
    assert!(message.contains("must have at most 64 items"), "{message}");
    let bad_selector = mutual_auth(
        "bad-selector",
        json!({"mode": "Strict", "selector": {"matchExpressions": [{"key": "app", "operator": "Is", "values": ["x"]}]}}),
    );
    let message = api_message(&mutual_auths.create(&PostParams::default(), &bad_selector).await.expect_err("bad operator"));
    assert!(message.contains("MutualAuth webhook-test/bad-selector is invalid: spec.selector.matchExpressions[0].operator"), "{message}");

    // Valid ones pass, and so does an update of them.
    let created = policies.create(&PostParams::default(), &valid).await.unwrap_or_else(|e| fail("valid MeshPolicy", api_message(&e)));
    let mut updated = created.clone();
    updated.spec.ingress[0].ports[0].port = 8443;
    let updated =
        policies.replace("valid", &PostParams::default(), &updated).await.unwrap_or_else(|e| fail("valid update", api_message(&e)));
    let mut broken = updated.clone();
    // (endPort < port is CEL's to refuse; a duplicate port is the webhook's.)
    let port = broken.spec.ingress[0].ports[0].clone();
    broken.spec.ingress[0].ports.push(port);
    let message = api_message(&policies.replace("valid", &PostParams::default(), &broken).await.expect_err("invalid update"));
    assert!(message.contains("spec.ingress[0].ports[1]: duplicates spec.ingress[0].ports[0]"), "{message}");

    // Warnings reach the client: kubectl prints them.
    let first = json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MutualAuth", "metadata": {"name": "ns-wide-a", "namespace": NS}, "spec": {"mode": "Strict"}});
    let (ok, _, stderr) = kubectl(env, &["apply", "-f", "-"], &first).await;
    assert!(ok, "{stderr}");
    let second = json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MutualAuth", "metadata": {"name": "ns-wide-b", "namespace": NS}, "spec": {"mode": "Permissive"}});
    let (ok, _, stderr) = kubectl(env, &["apply", "-f", "-"], &second).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("Warning: spec: ties with the older MutualAuth webhook-test/ns-wide-a (mode Strict) at the same level: this one will be Conflicted"),
        "{stderr}"
    );
    let lonely = json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MutualAuth", "metadata": {"name": "nobody", "namespace": NS}, "spec": {"mode": "Strict", "selector": {"matchLabels": {"app": "nobody"}}}});
    let (ok, _, stderr) = kubectl(env, &["apply", "-f", "-"], &lonely).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("Warning: spec.selector: selects no pod in namespace webhook-test right now"), "{stderr}");
    // A hostNetwork pod and a finished one are no pods a policy acts on (the agents' rules):
    // a selector that picks only them selects nothing.
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "not-a-workload", "namespace": NS}});
    let (ok, _, stderr) = kubectl(env, &["apply", "-f", "-"], &account).await;
    assert!(ok, "{stderr}");
    for (name, host_network) in [("node-daemon", true), ("batch-done", false)] {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": NS, "labels": {"app": "not-a-workload"}},
            "spec": {"hostNetwork": host_network, "serviceAccountName": "not-a-workload", "automountServiceAccountToken": false,
                     "containers": [{"name": "c", "image": "registry.invalid/c:1"}]}});
        let (ok, _, stderr) = kubectl(env, &["apply", "-f", "-"], &pod).await;
        assert!(ok, "{stderr}");
    }
    let (ok, _, stderr) = kubectl(
        env,
        &["patch", "pod", "batch-done", "-n", NS, "--subresource=status", "--type=merge", "-p", r#"{"status":{"phase":"Succeeded"}}"#],
        &json!({}),
    )
    .await;
    assert!(ok, "{stderr}");
    let not_workloads = json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "not-workloads", "namespace": NS}, "spec": {
        "selector": {"matchLabels": {"app": "not-a-workload"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "order"}}}]}]
    }});
    let (ok, _, stderr) = kubectl(env, &["apply", "--dry-run=server", "-f", "-"], &not_workloads).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("Warning: spec.selector: selects no pod in namespace webhook-test right now"),
        "hostNetwork and finished pods counted: {stderr}"
    );
    let never = json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "never", "namespace": NS}, "spec": {
        "selector": {"matchLabels": {"app": "payment-service"}},
        "ingress": [{"from": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["a"]}, {"key": "app", "operator": "NotIn", "values": ["a"]}]}}]}]
    }});
    let (ok, _, stderr) = kubectl(env, &["apply", "--dry-run=server", "-f", "-"], &never).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("Warning: spec.ingress[0].from[0].podSelector: can never match"), "{stderr}");
    // No oracle across namespaces: a policy in this namespace learns nothing from its warnings
    // about another namespace, neither whether a namespace with some label exists nor which
    // pods run there. The same policy gets the same warnings whether the selectors match a
    // real namespace and pod or nothing at all.
    let hidden_ns = "webhook-test-hidden";
    k8s::label_namespace(&client, hidden_ns, &[("team".to_owned(), "hidden".to_owned())].into())
        .await
        .unwrap_or_else(|e| fail("hidden namespace", e));
    let hidden_pod = k8s::TestPod::new(hidden_ns, "secret").label("app", "secret");
    match k8s::create_pod(&client, &hidden_pod).await {
        Ok(_) => {}
        Err(k8s::K8sError::Api { source, .. }) if k8s::is_already_exists(&source) => {}
        Err(e) => fail("hidden pod", e),
    }
    let probe = |team: &str, app: &str| {
        json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "probe", "namespace": NS}, "spec": {
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"team": team}}},
                {"namespaceSelector": {"matchLabels": {"team": team}}, "podSelector": {"matchLabels": {"app": app}}}
            ]}]
        }})
    };
    let (ok, _, exists) = kubectl(env, &["apply", "--dry-run=server", "-f", "-"], &probe("hidden", "secret")).await;
    assert!(ok, "{exists}");
    let (ok, _, absent) = kubectl(env, &["apply", "--dry-run=server", "-f", "-"], &probe("absent", "nothing")).await;
    assert!(ok, "{absent}");
    let warnings = |stderr: &str| stderr.lines().filter(|l| l.starts_with("Warning:")).map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(warnings(&exists), warnings(&absent), "the warnings tell an existing namespace and pod from absent ones");
    for line in warnings(&exists) {
        assert!(!line.contains("namespaceSelector") && !line.contains(hidden_ns), "{line}");
    }

    let (ok, _, stderr) = kubectl(env, &["create", "-f", "-"], &serde_json::to_value(&invalid).unwrap_or_default()).await;
    assert!(!ok);
    // kubectl renders the 422 with its causes: field and reason.
    assert!(
        stderr.contains("The MeshPolicy \"invalid\" is invalid: spec.ingress[0].from[0].identity: \"spiffe://cluster.local/ns/shop/sa/order/\" is not a valid SPIFFE ID: path ends with a slash"),
        "{stderr}"
    );

    // Rotation under load: two workers send valid and invalid reviews back to back until two
    // rotations have completed; every valid one must pass and every invalid one must be denied
    // by the webhook itself (a failed call would say "failed calling webhook").
    let rotations = || {
        let text = webhook.metrics.encode().unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("meshauth_webhook_certificate_rotations_total "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    };
    let served_at_start = webhook.store.current().map(|c| c.key.cert[0].to_vec());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for w in 0..2 {
        let (policies, stop, sent, failures) = (policies.clone(), stop.clone(), sent.clone(), failures.clone());
        // Dry-run creates of names that do not exist: nothing is stored, every one is admitted
        // or denied afresh.
        let valid = mesh_policy("load-valid", "spiffe://cluster.local/ns/shop/sa/order");
        let invalid = mesh_policy("load-invalid", "spiffe://cluster.local/ns/shop/sa/order/");
        let dry_run = dry_run.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (object, want_ok) = if sent.load(Ordering::Relaxed) % 2 == w { (&valid, true) } else { (&invalid, false) };
                let result = policies.create(&dry_run, object).await;
                sent.fetch_add(1, Ordering::Relaxed);
                let failure = match (result, want_ok) {
                    (Ok(_), true) => None,
                    (Err(e), false) if api_message(&e).contains("ends with a slash") => None,
                    (Ok(_), false) => Some("an invalid MeshPolicy was admitted".to_owned()),
                    (Err(e), _) => Some(api_message(&e)),
                };
                if let Some(f) = failure
                    && let Ok(mut failures) = failures.lock()
                {
                    failures.push(f);
                }
            }
        }));
    }
    let rotations_before = rotations();
    let load_started = Instant::now();
    while rotations() < rotations_before + 2 && load_started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Keep going past the old CA's retirement from the bundle.
    tokio::time::sleep(Duration::from_secs(7)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap_or_else(|e| fail("worker", e));
    }
    let done = rotations() - rotations_before;
    let sent = sent.load(Ordering::Relaxed);
    let failures = failures.lock().map(|f| f.clone()).unwrap_or_default();
    eprintln!(
        "rotation under load: {done} rotations in {:.1}s, {sent} admission requests, {} failed",
        load_started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(done >= 2, "only {done} rotations in {:?}", load_started.elapsed());
    assert_ne!(webhook.store.current().map(|c| c.key.cert[0].to_vec()), served_at_start, "a new certificate is served");
    assert!(sent > 20, "only {sent} requests");
    let distinct: std::collections::BTreeSet<&String> = failures.iter().collect();
    assert!(failures.is_empty(), "{} of {sent} admissions failed: {distinct:#?}", failures.len());

    let _ = configurations.delete(CONFIGURATION, &DeleteParams::default()).await;
    webhook.shutdown().await;
}
