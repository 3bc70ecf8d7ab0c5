//! Benchmark: 3 nodes, 300 pods, 50 MeshPolicies created at once against the real
//! kube-apiserver and SPIRE server, with the operator binary running: the time until every
//! status is `Ready` (at the current generation, with the right `selectedPods`) and every SPIRE
//! entry exists (read back with `spire-server entry show`); then the time until every entry is
//! gone after the policies are deleted. Prints a Markdown table (recorded in
//! docs/performance.md, section "Operator").
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate).

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use meshauth_crds::{Authentication, AuthenticationMode, IngressRule, MeshPolicy, MeshPolicySpec, PeerSelector, PortRule, Protocol};
use meshauth_testenv::{Options, TestEnv, k8s};
use support::*;

const NAMESPACES: usize = 10;
const APPS: usize = 5;
const PODS_PER_APP: usize = 6;
const NODES: usize = 3;

fn app(a: &str) -> LabelSelector {
    LabelSelector { match_labels: Some([("app".to_owned(), a.to_owned())].into()), ..Default::default() }
}

fn policy(ns: &str, k: usize) -> MeshPolicy {
    let mut p = MeshPolicy::new(
        &format!("svc-{k}"),
        MeshPolicySpec {
            selector: app(&format!("svc-{k}")),
            ingress: vec![IngressRule {
                from: vec![PeerSelector { pod_selector: Some(app(&format!("svc-{}", (k + 1) % APPS))), ..Default::default() }],
                ports: vec![PortRule { port: 8080, end_port: None, protocol: Protocol::Tcp }],
                authentication: Some(Authentication { mode: AuthenticationMode::Required }),
            }],
            ..Default::default()
        },
    );
    p.metadata.namespace = Some(ns.into());
    p
}

async fn all_entries(env: &TestEnv) -> Result<BTreeSet<(String, String)>, String> {
    let node_of: BTreeMap<&str, &str> = env.nodes().iter().map(|n| (n.agent_id.as_str(), n.name.as_str())).collect();
    Ok(env
        .spire()
        .list_entries()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|e| (e.spiffe_id, node_of.get(e.parent_id.as_str()).map_or(e.parent_id.clone(), |n| n.to_string())))
        .collect())
}

/// `cargo bench -p meshauth-operator --bench convergence` (root).
fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match runtime {
        Ok(rt) => rt.block_on(benchmark_300_pods_50_policies_3_nodes()),
        Err(e) => eprintln!("cannot start a tokio runtime: {e}"),
    }
}

async fn benchmark_300_pods_50_policies_3_nodes() {
    let env = TestEnv::start(Options { nodes: NODES, ..Default::default() }).await.or_panic("test environment");
    let client = env.client().await.or_panic("client");
    k8s::install_crds(&client, &k8s::crd_dir(), Duration::from_secs(60)).await.or_panic("CRDs");
    k8s::ensure_namespace(&client, "meshauth-system").await.or_panic("namespace");
    // Namespaces and service accounts exist beforehand, as they would in a cluster.
    for n in 0..NAMESPACES {
        for k in 0..APPS {
            k8s::ensure_service_account(&client, &format!("bench-{n}"), &format!("svc-{k}")).await.or_panic("sa");
        }
    }
    let op = Operator::start(&env, "bench");
    wait_leader(&op, Duration::from_secs(30)).await;

    let mut want: BTreeSet<(String, String)> = BTreeSet::new();
    let mut pods = Vec::new();
    for n in 0..NAMESPACES {
        for k in 0..APPS {
            for i in 0..PODS_PER_APP {
                let ns = format!("bench-{n}");
                let node = format!("node-{}", (k * PODS_PER_APP + i) % NODES + 1);
                want.insert((env.workload_id(&ns, &format!("svc-{k}")), node.clone()));
                pods.push((ns, format!("svc-{k}-{i}"), format!("svc-{k}"), node));
            }
        }
    }
    let policies: Vec<MeshPolicy> = (0..NAMESPACES).flat_map(|n| (0..APPS).map(move |k| policy(&format!("bench-{n}"), k))).collect();
    assert_eq!((pods.len(), policies.len(), want.len()), (300, 50, 150));

    // Everything at once: 300 pods (created, then given an IP) and 50 policies, 32 requests
    // in flight.
    let start = Instant::now();
    let pod_jobs = pods.iter().map(|(ns, name, a, node)| {
        let client = client.clone();
        async move { pod(&client, ns, name, a, a, node).await }
    });
    let mp_jobs = policies.iter().map(|p| {
        let client = client.clone();
        async move {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            Api::<MeshPolicy>::namespaced(client, &ns).create(&PostParams::default(), p).await.or_panic("create policy");
        }
    });
    let jobs: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> =
        pod_jobs.map(|f| Box::pin(f) as _).chain(mp_jobs.map(|f| Box::pin(f) as _)).collect();
    stream::iter(jobs).buffer_unordered(32).collect::<Vec<()>>().await;
    let created = start.elapsed();

    let all_mp: Api<MeshPolicy> = Api::all(client.clone());
    let mut ready_at = None;
    let mut entries_at = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = String::new();
    while ready_at.is_none() || entries_at.is_none() {
        assert!(Instant::now() < deadline, "not converged after 300 s: {last}\n{}", op.log_text());
        if ready_at.is_none() {
            let list = all_mp.list(&ListParams::default()).await.or_panic("list policies");
            let ready = list
                .items
                .iter()
                .filter(|p| {
                    p.status.as_ref().is_some_and(|s| {
                        s.observed_generation == p.metadata.generation
                            && s.selected_pods == Some(PODS_PER_APP as i32)
                            && condition(&s.conditions, "Ready").is_some_and(|c| c.0 == "True")
                    })
                })
                .count();
            last = format!("{ready}/50 Ready");
            if ready == 50 {
                ready_at = Some(start.elapsed());
            }
        }
        if entries_at.is_none() {
            let got = all_entries(&env).await.or_panic("entries");
            let have = want.intersection(&got).count();
            last = format!("{last}, {have}/150 entries");
            if got == want {
                entries_at = Some(start.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ready_at = ready_at.unwrap_or_default();
    let entries_at = entries_at.unwrap_or_default();
    let reconciles = op.metric("meshauth_operator_reconciles_total").await.unwrap_or(0.0);
    let reconcile_secs = op.metric("meshauth_operator_reconcile_duration_seconds_sum").await.unwrap_or(0.0);
    let patches = op.metric("meshauth_operator_status_patches_total{kind=\"MeshPolicy\"}").await.unwrap_or(0.0);

    // Teardown of the policies: every entry goes.
    let gone_start = Instant::now();
    for p in &policies {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        Api::<MeshPolicy>::namespaced(client.clone(), &ns)
            .delete(&p.metadata.name.clone().unwrap_or_default(), &DeleteParams::default())
            .await
            .or_panic("delete policy");
    }
    let deleted = gone_start.elapsed();
    let gone = wait_for("entries gone", Duration::from_secs(120), || async {
        let got = all_entries(&env).await?;
        if got.is_empty() { Ok(gone_start.elapsed()) } else { Err(format!("{} left", got.len())) }
    })
    .await;

    println!("\n| measure (3 nodes, 300 pods, 50 MeshPolicies, 150 SPIRE entries) | seconds |");
    println!("|---|---|");
    println!("| all 350 objects created (300 pods with IPs, 50 policies; 32 requests in flight) | {:.2} |", created.as_secs_f64());
    println!("| every SPIRE entry exists (`spire-server entry show`) | {:.2} |", entries_at.as_secs_f64());
    println!("| every MeshPolicy `Ready=True` at its generation with `selectedPods=6` | {:.2} |", ready_at.as_secs_f64());
    println!("| 50 policies deleted (API calls) | {:.2} |", deleted.as_secs_f64());
    println!("| every entry removed, from the first delete | {:.2} |", gone.as_secs_f64());
    println!(
        "\noperator during creation: {reconciles} reconcile passes, {reconcile_secs:.2} s inside them ({:.1} ms per pass), {patches} MeshPolicy status patches",
        1000.0 * reconcile_secs / reconciles.max(1.0)
    );
    assert!(ready_at < Duration::from_secs(120) && entries_at < Duration::from_secs(120));
    drop(op);
}
