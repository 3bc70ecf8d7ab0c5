//! Where the agent learns the cluster: Pods, Namespaces, Nodes, MeshPolicies and MutualAuths,
//! either from the Kubernetes API (kube-runtime reflectors) or from a directory of YAML
//! manifests (running without Kubernetes, as the demo does). Both publish a [`Snapshot`] on a
//! `watch` channel each time something changed; the agent rebuilds the policy model from it.
//!
//! This module only observes; it must not write to the API server.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::manifests::{ManifestError, Manifests, NodeInfo};
use meshauth_policy::model::{Inputs, NamespaceInfo, PodInfo, Resource};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The annotation on a Node that names its SPIRE agent's SPIFFE ID.
pub const SPIRE_AGENT_ID_ANNOTATION: &str = "meshauth.io/spire-agent-id";
/// The annotation on a Node that overrides the address its meshauth agent listens on.
pub const AGENT_ADDRESS_ANNOTATION: &str = "meshauth.io/agent-address";

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

/// One consistent view of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub inputs: Inputs,
    pub nodes: Vec<NodeInfo>,
}

impl Snapshot {
    /// The address of a node's agent: the `meshauth.io/agent-address` annotation, else the
    /// node's InternalIP.
    pub fn node_address(&self, node: &str) -> Option<String> {
        let n = self.nodes.iter().find(|n| n.name == node)?;
        n.annotations.get(AGENT_ADDRESS_ANNOTATION).cloned().or_else(|| n.address.clone())
    }
}

/// The SPIFFE IDs of the pods on `node` (what a node-scoped issuer may hand that node).
pub fn node_identities(snapshot: &Snapshot, node: &str, trust_domain: &meshauth_crds::TrustDomain) -> Vec<meshauth_crds::SpiffeId> {
    let mut ids: Vec<_> = snapshot
        .inputs
        .pods
        .iter()
        .filter(|p| p.node.as_deref() == Some(node))
        .map(|p| trust_domain.service_account_id(&p.namespace, &p.service_account))
        .collect();
    ids.sort();
    ids.dedup();
    ids
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
    let m = read_manifest_dir(dir)?;
    Ok(Snapshot { inputs: m.inputs, nodes: m.nodes })
}

/// Watches a manifest directory: publishes a new snapshot whenever its files change and parse.
/// A directory that stops parsing keeps the last good snapshot (and the error is logged), so a
/// half-written file never empties the maps.
pub fn watch_dir(dir: PathBuf, poll: Duration) -> Result<watch::Receiver<Arc<Snapshot>>, InputError> {
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

/// The reflector stores of everything the agent reads from Kubernetes.
#[derive(Clone)]
struct Stores {
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    mesh_policies: Store<MeshPolicy>,
    mutual_auths: Store<MutualAuth>,
}

impl Stores {
    fn snapshot(&self) -> Snapshot {
        let nodes = self
            .nodes
            .state()
            .iter()
            .map(|n| {
                let addresses = n.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
                NodeInfo {
                    name: n.metadata.name.clone().unwrap_or_default(),
                    address: addresses
                        .iter()
                        .find(|a| a.type_ == "InternalIP")
                        .or_else(|| addresses.first())
                        .map(|a| a.address.clone()),
                    annotations: n.metadata.annotations.clone().unwrap_or_default(),
                }
            })
            .collect();
        Snapshot {
            inputs: Inputs {
                namespaces: self.namespaces.state().iter().map(|n| NamespaceInfo::from_namespace(n)).collect(),
                pods: self
                    .pods
                    .state()
                    .iter()
                    // Pods that finished no longer send or receive: their IP may be reused.
                    .filter(|p| {
                        !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
                    })
                    .map(|p| PodInfo::from_pod(p))
                    .collect(),
                mesh_policies: self.mesh_policies.state().iter().map(|p| Resource::from_mesh_policy(p)).collect(),
                mutual_auths: self.mutual_auths.state().iter().map(|m| Resource::from_mutual_auth(m)).collect(),
            },
            nodes,
        }
    }
}

/// Starts reflectors for every input kind and publishes a snapshot after each burst of
/// changes (changes within `debounce` of each other make one snapshot). The first snapshot is
/// published once every reflector has listed its kind, so the agent never compiles maps from
/// a partial view.
pub async fn watch_kubernetes(client: Client, debounce: Duration) -> watch::Receiver<Arc<Snapshot>> {
    let changed = Arc::new(Notify::new());
    let (pods, pods_w) = reflector::store();
    let (namespaces, namespaces_w) = reflector::store();
    let (nodes, nodes_w) = reflector::store();
    let (mesh_policies, mesh_policies_w) = reflector::store();
    let (mutual_auths, mutual_auths_w) = reflector::store();
    let stores = Stores {
        pods: pods.clone(),
        namespaces: namespaces.clone(),
        nodes: nodes.clone(),
        mesh_policies: mesh_policies.clone(),
        mutual_auths: mutual_auths.clone(),
    };
    spawn_reflector(Api::<Pod>::all(client.clone()), pods_w, changed.clone());
    spawn_reflector(Api::<Namespace>::all(client.clone()), namespaces_w, changed.clone());
    spawn_reflector(Api::<Node>::all(client.clone()), nodes_w, changed.clone());
    spawn_reflector(Api::<MeshPolicy>::all(client.clone()), mesh_policies_w, changed.clone());
    spawn_reflector(Api::<MutualAuth>::all(client), mutual_auths_w, changed.clone());

    // Every store must have listed once before the first snapshot.
    let ready = futures::future::join5(
        pods.wait_until_ready(),
        namespaces.wait_until_ready(),
        nodes.wait_until_ready(),
        mesh_policies.wait_until_ready(),
        mutual_auths.wait_until_ready(),
    );
    let _ = ready.await;
    let (tx, rx) = watch::channel(Arc::new(stores.snapshot()));
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(debounce).await;
            if tx.send(Arc::new(stores.snapshot())).is_err() {
                return;
            }
        }
    });
    rx
}

fn spawn_reflector<K>(api: Api<K>, writer: reflector::store::Writer<K>, changed: Arc<Notify>)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    tokio::spawn(async move {
        let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()))
            .default_backoff()
            .touched_objects();
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(_) => changed.notify_one(),
                Err(error) => tracing::warn!(%error, kind = std::any::type_name::<K>(), "watch error; retrying"),
            }
        }
    });
}

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
        let ids: Vec<_> = node_identities(&s, "node-2", &Default::default()).iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["spiffe://cluster.local/ns/shop/sa/payment", "spiffe://cluster.local/ns/tools/sa/default"]);
    }

    #[tokio::test]
    async fn a_directory_that_stops_parsing_keeps_the_last_good_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x}\nspec: {containers: []}\n";
        std::fs::write(dir.path().join("a.yaml"), pod).expect("write");
        let mut rx = watch_dir(dir.path().to_owned(), Duration::from_millis(20)).expect("watch");
        assert_eq!(rx.borrow().inputs.pods.len(), 1);
        std::fs::write(dir.path().join("b.yaml"), pod.replace("name: a", "name: b")).expect("write");
        tokio::time::timeout(Duration::from_secs(5), rx.changed()).await.expect("noticed").expect("open");
        assert_eq!(rx.borrow().inputs.pods.len(), 2);
        std::fs::write(dir.path().join("c.yaml"), "kind: [").expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(rx.borrow().inputs.pods.len(), 2, "kept the last good snapshot");
    }
}
