//! The environment's own lifecycle: two private environments run at once without colliding,
//! and dropping one stops every process, also when the test holding it panics.
//!
//! Needs root and the Go-built cache (see the `meshauth-testenv` crate docs).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use meshauth_testenv::{Options, TestEnv};

/// The pids recorded under DIR/run.
fn recorded_pids(dir: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let entries = std::fs::read_dir(dir.join("run")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|x| x == "pid") {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let Ok(pid) = text.trim().parse() {
                pids.push(pid);
            }
        }
    }
    pids
}

/// A process that still runs and names `dir` in its command line.
fn runs_in(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy())).unwrap_or(false)
}

fn ports(dir: &Path) -> BTreeSet<u16> {
    let text = std::fs::read_to_string(dir.join("ports")).unwrap_or_else(|e| panic!("{e}"));
    text.lines().filter_map(|l| l.split_once('=')?.1.trim().parse().ok()).collect()
}

#[tokio::test]
async fn two_environments_at_once_do_not_collide() {
    let one = Options { nodes: 1, ..Options::default() };
    let two = Options { nodes: 1, trust_domain: "other.test".into(), ..Options::default() };
    let (a, b) = tokio::join!(TestEnv::start(one), TestEnv::start(two));
    let a = a.unwrap_or_else(|e| panic!("{e}"));
    let b = b.unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(a.dir(), b.dir());
    let (pa, pb) = (ports(a.dir()), ports(b.dir()));
    assert_eq!(pa.len(), 4, "{pa:?}");
    assert!(pa.is_disjoint(&pb), "port collision: {pa:?} / {pb:?}");
    assert_eq!(b.trust_domain(), "other.test");

    // Both APIs answer, each with its own data.
    for env in [&a, &b] {
        let client = env.client().await.unwrap_or_else(|e| panic!("{e}"));
        meshauth_testenv::k8s::ensure_namespace(&client, &format!("only-in-{}", env.trust_domain().replace('.', "-")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let ca = a.client().await.unwrap_or_else(|e| panic!("{e}"));
    let nss: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(ca);
    assert!(nss.get_opt("only-in-other-test").await.unwrap_or_else(|e| panic!("{e}")).is_none());

    let dirs = [a.dir().to_owned(), b.dir().to_owned()];
    let pids: Vec<(u32, std::path::PathBuf)> =
        dirs.iter().flat_map(|d| recorded_pids(d).into_iter().map(move |p| (p, d.clone()))).collect();
    assert!(pids.len() >= 2 * 4, "{pids:?}");
    drop(a);
    drop(b);
    for (pid, dir) in pids {
        assert!(!runs_in(pid, &dir), "pid {pid} of {} still runs after drop", dir.display());
    }
    for d in dirs {
        assert!(!d.exists(), "{} not removed after drop", d.display());
    }
}

#[test]
fn dropping_an_environment_stops_it_even_when_the_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let env = TestEnv::start_blocking(Options { nodes: 1, ..Options::default() }).unwrap_or_else(|e| panic!("{e}"));
        let _ = tx.send((env.dir().to_owned(), recorded_pids(env.dir())));
        panic!("deliberate panic while holding a TestEnv");
    })
    .join();
    assert!(joined.is_err(), "the thread should have panicked");
    let (dir, pids) = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_else(|e| panic!("no pids: {e}"));
    assert!(pids.len() >= 4, "{pids:?}");
    for pid in pids {
        assert!(!runs_in(pid, &dir), "pid {pid} still runs after a panic dropped its TestEnv");
    }
    // While panicking the directory is kept for its logs.
    assert!(dir.join("logs").join("kube-apiserver.log").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
