//! Two operator processes on one Lease: only the leader writes (statuses, SPIRE entries), and
//! when the leader is killed (SIGKILL, no release) the other takes over within the lease time.
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use meshauth_crds::{MutualAuth, MutualAuthMode, MutualAuthSpec};
use support::*;

async fn holder(client: &kube::Client) -> Result<String, String> {
    let lease = Api::<Lease>::namespaced(client.clone(), "meshauth-system").get("meshauth-operator").await.map_err(|e| e.to_string())?;
    lease.spec.and_then(|s| s.holder_identity).filter(|h| !h.is_empty()).ok_or_else(|| "no holder".to_owned())
}

async fn writes(op: &Operator) -> f64 {
    let mut n = 0.0;
    for m in [
        "meshauth_operator_reconciles_total",
        "meshauth_operator_status_patches_total{kind=\"MutualAuth\"}",
        "meshauth_operator_spire_entry_changes_total{operation=\"create\"}",
    ] {
        n += op.metric(m).await.unwrap_or(0.0);
    }
    n
}

#[tokio::test]
async fn only_the_leader_writes_and_the_other_takes_over_within_the_lease_time() {
    let (env, client) = env().await;
    let mut a = Operator::start(env, "replica-a");
    let mut b = Operator::start(env, "replica-b");
    let first = wait_for("a leader", Duration::from_secs(30), || holder(&client)).await;
    let (leader, standby) = if first == a.id { (&mut a, &mut b) } else { (&mut b, &mut a) };
    wait_leader(leader, Duration::from_secs(10)).await;

    let ns = "op-leader";
    pod(&client, ns, "p1", "one", "one", "node-1").await;
    pod(&client, ns, "p2", "two", "two", "node-2").await;
    let mut strict = MutualAuth::new("default", MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict });
    strict.metadata.namespace = Some(ns.into());
    create(&client, ns, &strict).await;
    wait_for("Ready and entries", Duration::from_secs(30), || async {
        let s = mutual_auth(&client, ns, "default").await?.status.ok_or("no status")?;
        let ready = condition(&s.conditions, "Ready").map(|c| c.0);
        let entries = entries_by_sa(env, ns).await?;
        if ready.as_deref() == Some("True") && entries == expect_entries(&[("one", &["node-1"]), ("two", &["node-2"])]) {
            Ok(())
        } else {
            Err(format!("{ready:?} {entries:?}"))
        }
    })
    .await;
    assert!(writes(leader).await > 0.0, "the leader reconciled and wrote");
    assert_eq!(writes(standby).await, 0.0, "the standby wrote nothing");
    assert_eq!(standby.metric("meshauth_operator_leader").await, Some(0.0));
    assert_eq!(standby.get("/readyz").await.map(|r| r.0), Some(200), "a standby is ready to take over");

    // Kill the leader without a chance to release the lease; change something right away.
    leader.kill();
    let killed = Instant::now();
    pod(&client, ns, "p3", "three", "three", "node-1").await;
    wait_leader(standby, Duration::from_secs(3 * LEASE_SECONDS)).await;
    let took_over = killed.elapsed();
    let converged = wait_for("the new leader registers the new pod", Duration::from_secs(30), || async {
        let entries = entries_by_sa(env, ns).await?;
        if entries == expect_entries(&[("one", &["node-1"]), ("three", &["node-1"]), ("two", &["node-2"])]) {
            Ok(killed.elapsed())
        } else {
            Err(format!("{entries:?}"))
        }
    })
    .await;
    println!("takeover after leader SIGKILL: leader after {took_over:?}, new pod registered after {converged:?} (lease {LEASE_SECONDS}s)");
    assert!(took_over <= Duration::from_secs(LEASE_SECONDS + 2), "took over after {took_over:?}");
    assert_eq!(holder(&client).await.as_deref(), Ok(standby.id.as_str()));
    assert!(writes(standby).await > 0.0);

    // A graceful stop releases the lease at once: the killed replica, restarted, leads soon.
    let mut c = Operator::start(env, "replica-c");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(c.metric("meshauth_operator_leader").await, Some(0.0));
    standby.terminate();
    let handed = Instant::now();
    wait_leader(&c, Duration::from_secs(LEASE_SECONDS)).await;
    println!("handover after SIGTERM: {:?}", handed.elapsed());
    c.terminate();
}
