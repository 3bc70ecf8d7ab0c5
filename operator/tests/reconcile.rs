//! The operator binary against the real kube-apiserver and SPIRE server of the test
//! environment: status and conditions follow spec changes, pod label changes and pod
//! deletion; a MutualAuth tie marks the younger one `Conflicted`; SPIRE entries exist for
//! exactly the nodes hosting an identity's pods (read back with `spire-server entry show`),
//! move with pods, go when unneeded, and a hand-made entry is never touched; each node's
//! Workload API hands out exactly the SVIDs of the identities it hosts.
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Api;
use kube::api::{Patch, PatchParams};
use meshauth_crds::{
    Authentication, AuthenticationMode, IngressRule, MeshPolicy, MeshPolicySpec, MutualAuth, MutualAuthMode, MutualAuthSpec, PeerSelector,
};
use meshauth_testenv::EntrySpec;
use serde_json::json;
use support::*;

const T: Duration = Duration::from_secs(30);

fn app(app: &str) -> LabelSelector {
    LabelSelector { match_labels: Some([("app".to_owned(), app.to_owned())].into()), ..Default::default() }
}

fn required_from_anyone(selector: LabelSelector) -> MeshPolicySpec {
    MeshPolicySpec {
        selector,
        ingress: vec![IngressRule {
            from: vec![],
            ports: vec![],
            authentication: Some(Authentication { mode: AuthenticationMode::Required }),
        }],
        ..Default::default()
    }
}

/// (generation, observedGeneration, selectedPods, Accepted, Ready)
async fn mp_state(client: &kube::Client, ns: &str, name: &str) -> Result<(i64, i64, i32, String, String), String> {
    let p = mesh_policy(client, ns, name).await?;
    let s = p.status.ok_or("no status yet")?;
    let c = |t| condition(&s.conditions, t).map(|c| c.0).unwrap_or_default();
    Ok((p.metadata.generation.unwrap_or(0), s.observed_generation.unwrap_or(0), s.selected_pods.unwrap_or(-1), c("Accepted"), c("Ready")))
}

#[tokio::test]
async fn status_follows_spec_changes_pod_labels_and_pod_deletion() {
    let _serial = SERIAL.lock().await;
    let (env, client) = env().await;
    let _op = Operator::start(env, "status");
    let ns = "op-status";
    for (name, a, node) in [("w1", "web", "node-1"), ("w2", "web", "node-2"), ("d1", "db", "node-1")] {
        pod(&client, ns, name, a, a, node).await;
    }
    let mut p = MeshPolicy::new("web", required_from_anyone(app("web")));
    p.metadata.namespace = Some(ns.into());
    create(&client, ns, &p).await;
    wait_for("web Ready with 2 pods", T, || async {
        match mp_state(&client, ns, "web").await? {
            (g, og, 2, a, r) if g == og && a == "True" && r == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Spec change: now selects db. observedGeneration follows, selectedPods too.
    let api: Api<MeshPolicy> = Api::namespaced(client.clone(), ns);
    api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"selector": {"matchLabels": {"app": "db"}}}})))
        .await
        .or_panic("patch spec");
    wait_for("generation 2 observed, 1 pod", T, || async {
        match mp_state(&client, ns, "web").await? {
            (2, 2, 1, a, r) if a == "True" && r == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Pod label change: w1 becomes a db.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    pods.patch("w1", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}}))).await.or_panic("relabel");
    wait_for("2 pods after relabel", T, || async {
        match mp_state(&client, ns, "web").await? {
            (_, _, 2, _, r) if r == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Pod deletion.
    delete_pod(&client, ns, "d1").await;
    wait_for("1 pod after deletion", T, || async {
        match mp_state(&client, ns, "web").await? {
            (_, _, 1, _, r) if r == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Enforcement: the API server defaulted it to Enforce; set to Audit, the status and
    // `kubectl get mp` (the server-side table) say so.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(client.clone(), ns, &kube::api::ApiResource::erase::<MeshPolicy>(&()));
    let stored = raw.get("web").await.or_panic("get");
    assert_eq!(stored.data["spec"]["enforcement"], "Enforce", "the CRD's default");
    api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"enforcement": "Audit"}}))).await.or_panic("audit");
    let message = wait_for("status says Audit", T, || async {
        let p = mesh_policy(&client, ns, "web").await?;
        let s = p.status.ok_or("no status")?;
        match (s.enforcement, condition(&s.conditions, "Accepted")) {
            (Some(meshauth_crds::Enforcement::Audit), Some((a, _, m))) if a == "True" => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(message.contains("audited"), "{message}");
    let table = http::Request::get(format!("/apis/meshauth.io/v1alpha1/namespaces/{ns}/meshpolicies/web"))
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .or_panic("request");
    let table: serde_json::Value = client.request(table).await.or_panic("table");
    let columns = table["columnDefinitions"].as_array().expect("a table with columns");
    let at = columns.iter().position(|c| c["name"] == "Enforcement").expect("an Enforcement column");
    assert_eq!(table["rows"][0]["cells"][at], "Audit", "{table}");
    api.patch("web", &PatchParams::default(), &Patch::Merge(json!({"spec": {"enforcement": "Enforce"}}))).await.or_panic("enforce");

    // A spec the model cannot use (passes the CRD's CEL rule, fails SPIFFE ID validation):
    // Accepted=False naming the field, Ready=False, and a Warning Event.
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ingress": [{"from": [{"identity": "spiffe://Bad.Domain/x"}]}]}})),
    )
    .await
    .or_panic("bad spec");
    let msg = wait_for("Accepted=False", T, || async {
        let p = mesh_policy(&client, ns, "web").await?;
        let s = p.status.ok_or("no status")?;
        match (condition(&s.conditions, "Accepted"), condition(&s.conditions, "Ready")) {
            (Some((a, ar, m)), Some((r, rr, _))) if a == "False" && ar == "InvalidSpec" && r == "False" && rr == "NotAccepted" => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(msg.contains("spec.ingress[0].from[0]"), "{msg}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    wait_for("a Warning event", T, || async {
        let list = events.list(&Default::default()).await.map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| e.reason.as_deref() == Some("InvalidSpec") && e.type_.as_deref() == Some("Warning"))
            .map(|_| ())
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;
}

#[tokio::test]
async fn the_younger_of_two_disagreeing_mutual_auths_is_conflicted() {
    let _serial = SERIAL.lock().await;
    let (env, client) = env().await;
    let _op = Operator::start(env, "tie");
    let ns = "op-tie";
    pod(&client, ns, "p1", "app", "app", "node-1").await;
    let mut old = MutualAuth::new("old", MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict });
    old.metadata.namespace = Some(ns.into());
    create(&client, ns, &old).await;
    // creationTimestamp has one-second resolution: make "older" unambiguous.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut new = MutualAuth::new("new", MutualAuthSpec { selector: None, mode: MutualAuthMode::Permissive });
    new.metadata.namespace = Some(ns.into());
    create(&client, ns, &new).await;
    let msg = wait_for("new is Conflicted", T, || async {
        let m = mutual_auth(&client, ns, "new").await?;
        let s = m.status.ok_or("no status")?;
        match (condition(&s.conditions, "Conflicted"), s.selected_pods) {
            (Some((c, _, msg)), Some(0)) if c == "True" => Ok(msg),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(msg.contains("op-tie/old"), "{msg}");
    wait_for("old decides the pod, not conflicted", T, || async {
        let m = mutual_auth(&client, ns, "old").await?;
        let s = m.status.ok_or("no status")?;
        match (condition(&s.conditions, "Conflicted"), condition(&s.conditions, "Ready"), s.selected_pods) {
            (Some((c, _, _)), Some((r, _, _)), Some(1)) if c == "False" && r == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The tie ends when they agree.
    let api: Api<MutualAuth> = Api::namespaced(client.clone(), ns);
    api.patch("new", &PatchParams::default(), &Patch::Merge(json!({"spec": {"mode": "Strict"}}))).await.or_panic("patch");
    wait_for("new no longer Conflicted", T, || async {
        let s = mutual_auth(&client, ns, "new").await?.status.ok_or("no status")?;
        match condition(&s.conditions, "Conflicted") {
            Some((c, _, _)) if c == "False" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The SVIDs of namespace `ns` a node's Workload API hands to this process.
async fn svids_on(env: &meshauth_testenv::TestEnv, node: &str, ns: &str) -> Result<BTreeSet<String>, String> {
    let n = env.node(node).map_err(|e| e.to_string())?;
    let client = spiffe::WorkloadApiClient::connect_to(&n.workload_api_endpoint()).await.map_err(|e| e.to_string())?;
    let ctx = match client.fetch_x509_context().await {
        Ok(c) => c,
        // "no identity issued": nothing for this process on this node (yet).
        Err(e) => return Err(format!("{e}")),
    };
    let prefix = format!("spiffe://{}/ns/{ns}/sa/", env.trust_domain());
    Ok(ctx.svids().iter().filter_map(|s| s.spiffe_id().to_string().strip_prefix(&prefix).map(str::to_owned)).collect())
}

#[tokio::test]
async fn entries_follow_pods_across_nodes_and_hand_made_entries_are_left_alone() {
    let _serial = SERIAL.lock().await;
    let (env, client) = env().await;
    let ns = "op-entries";
    let node1 = env.node("node-1").or_panic("node-1");
    // Hand-made before the operator starts: one for an identity a pod will need (the same
    // entry the operator would make, minus the mark) and one nobody needs.
    let spire = env.spire();
    let handmade = spire
        .create_entry(&EntrySpec::new(env.workload_id(ns, "batch"), &node1.agent_id).selector("unix:uid:0").x509_svid_ttl(300))
        .await
        .or_panic("hand-made entry");
    let unrelated = spire
        .create_entry(&EntrySpec::new(env.workload_id(ns, "manual"), &node1.agent_id).selector("unix:uid:0"))
        .await
        .or_panic("hand-made entry");
    let op = Operator::start(env, "entries");

    pod(&client, ns, "web-a", "web", "web", "node-1").await;
    pod(&client, ns, "api-a", "api", "api", "node-1").await;
    pod(&client, ns, "api-b", "api", "api", "node-2").await;
    pod(&client, ns, "batch-a", "batch", "batch", "node-1").await;
    // No requirement yet: no entries.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(entries_by_sa(env, ns).await.or_panic("entries"), expect_entries(&[("batch", &["node-1"]), ("manual", &["node-1"])]));

    let mut strict = MutualAuth::new("default", MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict });
    strict.metadata.namespace = Some(ns.into());
    create(&client, ns, &strict).await;
    let want = expect_entries(&[("api", &["node-1", "node-2"]), ("batch", &["node-1"]), ("manual", &["node-1"]), ("web", &["node-1"])]);
    wait_for("entries on exactly the hosting nodes", T, || async {
        let got = entries_by_sa(env, ns).await?;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;

    // The Workload API of each node hands out exactly its identities.
    wait_for("node-1 SVIDs", Duration::from_secs(60), || async {
        let got = svids_on(env, "node-1", ns).await?;
        let want: BTreeSet<String> = ["api", "batch", "manual", "web"].map(String::from).into();
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
    wait_for("node-2 SVIDs", Duration::from_secs(60), || async {
        let got = svids_on(env, "node-2", ns).await?;
        let want: BTreeSet<String> = ["api"].map(String::from).into();
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;

    // web moves to node-2 (a pod's node cannot change: a new pod, then the old one goes).
    pod(&client, ns, "web-b", "web", "web", "node-2").await;
    delete_pod(&client, ns, "web-a").await;
    let want = expect_entries(&[("api", &["node-1", "node-2"]), ("batch", &["node-1"]), ("manual", &["node-1"]), ("web", &["node-2"])]);
    wait_for("web's entry moved to node-2", T, || async {
        let got = entries_by_sa(env, ns).await?;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
    wait_for("node-2 now has web", Duration::from_secs(60), || async {
        let got = svids_on(env, "node-2", ns).await?;
        let want: BTreeSet<String> = ["api", "web"].map(String::from).into();
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;

    // Last api pod leaves node-2: that entry goes.
    delete_pod(&client, ns, "api-b").await;
    let want = expect_entries(&[("api", &["node-1"]), ("batch", &["node-1"]), ("manual", &["node-1"]), ("web", &["node-2"])]);
    wait_for("api's node-2 entry gone", T, || async {
        let got = entries_by_sa(env, ns).await?;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;

    // No longer needed at all: every operator entry goes, the hand-made ones stay as they were.
    delete::<MutualAuth>(&client, ns, "default").await;
    let want = expect_entries(&[("batch", &["node-1"]), ("manual", &["node-1"])]);
    wait_for("only hand-made entries left", T, || async {
        let got = entries_by_sa(env, ns).await?;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
    let all = spire.list_entries().await.or_panic("entries");
    assert_eq!(all.iter().find(|e| e.id == handmade.id), Some(&handmade), "hand-made entry unchanged");
    assert_eq!(all.iter().find(|e| e.id == unrelated.id), Some(&unrelated), "hand-made entry unchanged");
    assert!(op.metric("meshauth_operator_spire_entry_changes_total{operation=\"delete\"}").await.unwrap_or(0.0) >= 4.0);
    assert_eq!(op.get("/readyz").await.map(|r| r.0), Some(200));
    assert_eq!(op.get("/healthz").await.map(|r| r.0), Some(200));
}

#[tokio::test]
async fn identity_peers_of_a_rule_are_registered_too() {
    let _serial = SERIAL.lock().await;
    let (env, client) = env().await;
    let _op = Operator::start(env, "peers");
    let ns = "op-peers";
    pod(&client, ns, "srv", "srv", "srv", "node-2").await;
    pod(&client, ns, "cli", "cli", "cli", "node-1").await;
    pod(&client, ns, "other", "other", "other", "node-1").await;
    // Only cli -> srv needs authentication.
    let mut p = MeshPolicy::new(
        "srv",
        MeshPolicySpec {
            selector: app("srv"),
            ingress: vec![
                IngressRule {
                    from: vec![PeerSelector { pod_selector: Some(app("cli")), ..Default::default() }],
                    ports: vec![],
                    authentication: Some(Authentication { mode: AuthenticationMode::Required }),
                },
                IngressRule {
                    from: vec![PeerSelector { pod_selector: Some(app("other")), ..Default::default() }],
                    ports: vec![],
                    authentication: None,
                },
            ],
            ..Default::default()
        },
    );
    p.metadata.namespace = Some(ns.into());
    create(&client, ns, &p).await;
    let want = expect_entries(&[("cli", &["node-1"]), ("srv", &["node-2"])]);
    wait_for("entries for the pair only", T, || async {
        let got = entries_by_sa(env, ns).await?;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
    delete::<MeshPolicy>(&client, ns, "srv").await;
    wait_for("entries gone", T, || async {
        let got = entries_by_sa(env, ns).await?;
        if got.is_empty() { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
}
