//! SPIRE goes away while the operator runs: it keeps retrying with backoff, reports
//! `Ready=False` with the reason, drops no entry, and catches up when SPIRE is back. The
//! outage is a Unix-socket relay between the operator and the real SPIRE server that the test
//! stops (closing every connection) and starts again.
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate).

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshauth_crds::{MutualAuth, MutualAuthMode, MutualAuthSpec};
use support::*;
use tokio::net::{UnixListener, UnixStream};

/// Relays `listen` to `target` until the task is aborted (which drops every connection).
fn relay(listen: &Path, target: &Path) -> tokio::task::JoinHandle<()> {
    let _ = std::fs::remove_file(listen);
    let listener = UnixListener::bind(listen).or_panic("bind relay");
    let target = target.to_owned();
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((mut a, _)) = listener.accept().await {
            let target = target.clone();
            conns.spawn(async move {
                if let Ok(mut b) = UnixStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_survive_a_spire_outage_and_catch_up_afterwards() {
    let (env, client) = env().await;
    let sock: PathBuf = env.dir().join("relay.sock");
    let mut up = relay(&sock, &env.spire_server_socket());

    // The operator talks to SPIRE through the relay only.
    let mut op = Operator::start_with(env, "outage", &["--spire-server-socket", &sock.display().to_string()]);
    let ns = "op-outage";
    pod(&client, ns, "a", "a", "a", "node-1").await;
    pod(&client, ns, "b", "b", "b", "node-2").await;
    let mut strict = MutualAuth::new("default", MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict });
    strict.metadata.namespace = Some(ns.into());
    create(&client, ns, &strict).await;
    let before = expect_entries(&[("a", &["node-1"]), ("b", &["node-2"])]);
    wait_for("entries", Duration::from_secs(30), || async {
        let got = entries_by_sa(env, ns).await?;
        if got == before { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;

    // SPIRE goes away; a moves to node-2.
    up.abort();
    let _ = (&mut up).await;
    let _ = std::fs::remove_file(&sock);
    pod(&client, ns, "a2", "a", "a", "node-2").await;
    delete_pod(&client, ns, "a").await;
    let message = wait_for("Ready=False RegistrationPending", Duration::from_secs(40), || async {
        let s = mutual_auth(&client, ns, "default").await?.status.ok_or("no status")?;
        match condition(&s.conditions, "Ready") {
            Some((r, reason, m)) if r == "False" && reason == "RegistrationPending" => Ok(m),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!("while SPIRE is away: {message}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(entries_by_sa(env, ns).await.or_panic("entries"), before, "no entry dropped while SPIRE was away");
    assert!(
        op.metric("meshauth_operator_spire_api_errors_total{operation=\"ListEntries\"}").await.unwrap_or(0.0)
            + op.metric("meshauth_operator_spire_api_errors_total{operation=\"BatchCreateEntry\"}").await.unwrap_or(0.0)
            >= 1.0
    );

    // Back: the operator catches up by itself.
    let _up = relay(&sock, &env.spire_server_socket());
    let after = expect_entries(&[("a", &["node-2"]), ("b", &["node-2"])]);
    wait_for("caught up", Duration::from_secs(60), || async {
        let got = entries_by_sa(env, ns).await?;
        let s = mutual_auth(&client, ns, "default").await?.status.ok_or("no status")?;
        let ready = condition(&s.conditions, "Ready").map(|c| c.0);
        if got == after && ready.as_deref() == Some("True") { Ok(()) } else { Err(format!("{got:?} {ready:?}")) }
    })
    .await;
    op.terminate();
}
