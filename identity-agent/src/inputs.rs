//! Where the agent learns the cluster: Pods, Namespaces, Nodes, MeshPolicies and MutualAuths,
//! either from the Kubernetes API (kube-runtime reflectors) or from a directory of YAML
//! manifests (running without Kubernetes, as the demo does). Both publish a [`Snapshot`] on a
//! `watch` channel each time something changed; the agent rebuilds the policy model from it.
//!
//! This module only observes; it must not write to the API server.

use meshauth_cluster::EndpointRules;
pub use meshauth_cluster::Snapshot;
use meshauth_cluster::manifests::{ManifestError, Manifests};
pub use meshauth_cluster::reflect::DeletedPod;
pub use meshauth_cluster::snapshot::{AGENT_ADDRESS_ANNOTATION, SPIRE_AGENT_ID_ANNOTATION};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Why inputs could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{0} holds no .yaml, .yml or .json file")]
    NoManifests(PathBuf),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Reads every manifest file under `dir` (recursively, in name order).
pub fn read_manifest_dir(dir: &Path) -> Result<Manifests, InputError> {
    let mut files = Vec::new();
    collect_files(dir, &mut files)?;
    if files.is_empty() {
        return Err(InputError::NoManifests(dir.to_owned()));
    }
    files.sort();
    let mut manifests = Manifests::default();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|error| InputError::Read { path: path.clone(), error })?;
        manifests.add_source(&path.display().to_string(), &text)?;
    }
    Ok(manifests)
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), InputError> {
    let entries = std::fs::read_dir(dir).map_err(|error| InputError::Read { path: dir.to_owned(), error })?;
    for entry in entries {
        let path = entry.map_err(|error| InputError::Read { path: dir.to_owned(), error })?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml" || e == "json") {
            out.push(path);
        }
    }
    Ok(())
}

/// A snapshot from a manifest directory.
pub fn snapshot_from_dir(dir: &Path) -> Result<Snapshot, InputError> {
    Ok(read_manifest_dir(dir)?.snapshot())
}

/// Watches a manifest directory: publishes a new snapshot whenever its files change and parse.
/// A directory that stops parsing keeps the last good snapshot (and the error is logged), so a
/// half-written file never empties the maps.
pub fn watch_dir(dir: PathBuf, poll: Duration) -> Result<watch::Receiver<Arc<Snapshot>>, InputError> {
    watch_dir_with(dir, poll, EndpointRules::default())
}

/// [`watch_dir`] with the given endpoint rules.
pub fn watch_dir_with(dir: PathBuf, poll: Duration, rules: EndpointRules) -> Result<watch::Receiver<Arc<Snapshot>>, InputError> {
    let snapshot_from_dir = move |dir: &Path| Ok::<_, InputError>(read_manifest_dir(dir)?.snapshot_with(&rules));
    // Stamp before reading, so a change made while reading is seen as a change.
    let mut last_stamp = dir_stamp(&dir);
    let first = snapshot_from_dir(&dir)?;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(poll).await;
            let stamp = dir_stamp(&dir);
            if stamp == last_stamp {
                continue;
            }
            last_stamp = stamp;
            match snapshot_from_dir(&dir) {
                Ok(s) => {
                    if tx.send(Arc::new(s)).is_err() {
                        return;
                    }
                }
                Err(error) => tracing::warn!(%error, "manifests changed but do not parse; keeping the last good ones"),
            }
        }
    });
    Ok(rx)
}

/// Names, sizes and modification times of the files under `dir`: changes when any file does.
fn dir_stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut files = Vec::new();
    if collect_files(dir, &mut files).is_err() {
        return Vec::new();
    }
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, len, modified)
        })
        .collect()
}

/// Follows the Kubernetes API: a snapshot after each burst of changes (see
/// [`meshauth_cluster::reflect::watch_snapshots`]), and each pod deletion as it is reported.
pub async fn watch_kubernetes(
    client: kube::Client,
    debounce: Duration,
    rules: EndpointRules,
) -> (watch::Receiver<Arc<Snapshot>>, tokio::sync::broadcast::Receiver<DeletedPod>) {
    meshauth_cluster::reflect::watch_snapshots_and_deletions(client, debounce, rules).await
}

/// The example manifests (`config/examples`) copied into `dir`, plus `extra` files (name,
/// text): a mesh for tests that need one more object (feature `testing`).
#[cfg(any(test, feature = "testing"))]
pub fn examples_with(dir: &Path, extra: &[(&str, &str)]) -> std::io::Result<()> {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    for entry in std::fs::read_dir(&examples)? {
        let entry = entry?;
        std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
    }
    for (name, text) in extra {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

/// An audited MeshPolicy `tools/debug-audit` that admits no one to the example's `tools/debug`.
#[cfg(any(test, feature = "testing"))]
pub const DEBUG_AUDIT_POLICY: &str = "apiVersion: meshauth.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: debug-audit, namespace: tools}\nspec:\n  enforcement: Audit\n  selector: {matchLabels: {app: debug}}\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_example_mesh_with_node_addresses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
        let s = snapshot_from_dir(&dir).expect("examples parse");
        assert_eq!(s.inputs.pods.len(), 5);
        assert_eq!(s.node_address("node-2").as_deref(), Some("192.168.77.2"));
        assert_eq!(s.node_address("node-9"), None);
        let ids: Vec<_> = s.node_identities("node-2", &Default::default()).iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["spiffe://cluster.local/ns/shop/sa/payment", "spiffe://cluster.local/ns/tools/sa/default"]);
    }

    #[tokio::test]
    async fn a_directory_that_stops_parsing_keeps_the_last_good_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {serviceAccountName: a, containers: []}\nstatus: {podIP: 10.0.0.1}\n";
        std::fs::write(dir.path().join("a.yaml"), pod).expect("write");
        let mut rx = watch_dir(dir.path().to_owned(), Duration::from_millis(20)).expect("watch");
        assert_eq!(rx.borrow().inputs.pods.len(), 1);
        std::fs::write(dir.path().join("b.yaml"), pod.replace("name: a", "name: b").replace("10.0.0.1", "10.0.0.2")).expect("write");
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("noticed").expect("open");
        assert_eq!(rx.borrow().inputs.pods.len(), 2);
        std::fs::write(dir.path().join("c.yaml"), "kind: [").expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.borrow().inputs.pods.len(), 2, "kept the last good snapshot");
    }
}
