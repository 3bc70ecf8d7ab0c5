//! The Kubernetes side: one reflector per kind the model reads, the caches they fill, and the
//! [`Snapshot`] built from those caches. Objects are cached without their managed fields, which
//! nothing here reads and which are often the larger half of an object.

use crate::endpoints::EndpointRules;
use crate::snapshot::Snapshot;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::Inputs;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// The caches of every kind the model reads.
#[derive(Clone)]
pub struct Stores {
    pub pods: Store<Pod>,
    pub namespaces: Store<Namespace>,
    pub nodes: Store<Node>,
    pub mesh_policies: Store<MeshPolicy>,
    pub mutual_auths: Store<MutualAuth>,
}

impl Stores {
    /// The cluster as the caches hold it now.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with(&EndpointRules::default())
    }

    /// [`Stores::snapshot`] with the given endpoint rules.
    pub fn snapshot_with(&self, rules: &EndpointRules) -> Snapshot {
        let nodes = self.nodes.state();
        let node_refs: Vec<&Node> = nodes.iter().map(|n| &**n).collect();
        Snapshot::from_objects(
            rules,
            self.namespaces.state().iter().map(|n| &**n),
            self.pods.state().iter().map(|p| &**p),
            &node_refs,
            self.mesh_policies.state().iter().map(|p| &**p),
            self.mutual_auths.state().iter().map(|m| &**m),
        )
    }

    /// The model's inputs for the control plane (status, SPIRE entries): the endpoints, and
    /// the pods that will be endpoints as soon as the kubelet reports their address, so their
    /// SVIDs are ready by the time they first send.
    pub fn inputs(&self) -> Inputs {
        self.inputs_with(&EndpointRules::default())
    }

    /// [`Stores::inputs`] with the given endpoint rules.
    pub fn inputs_with(&self, rules: &EndpointRules) -> Inputs {
        let snapshot = self.snapshot_with(rules);
        let mut inputs = snapshot.inputs;
        inputs.pods.extend(snapshot.unaddressed);
        inputs
    }

    /// Waits until every cache has listed its kind once; `Err` names a kind whose reflector
    /// ended first.
    pub async fn wait_until_ready(&self) -> Result<(), &'static str> {
        self.pods.wait_until_ready().await.map_err(|_| "pods")?;
        self.namespaces.wait_until_ready().await.map_err(|_| "namespaces")?;
        self.nodes.wait_until_ready().await.map_err(|_| "nodes")?;
        self.mesh_policies.wait_until_ready().await.map_err(|_| "meshpolicies")?;
        self.mutual_auths.wait_until_ready().await.map_err(|_| "mutualauths")?;
        Ok(())
    }
}

/// Starts the reflectors of every kind. The returned future runs them and ends only when one
/// of them ends, with the name of its kind. Every change notifies `notify`.
pub fn watch_all(client: &Client, notify: Arc<Notify>) -> (Stores, impl Future<Output = &'static str> + Send + 'static) {
    let (pods, pods_w) = watch::<Pod>(Api::all(client.clone()), notify.clone(), "pods");
    let (namespaces, ns_w) = watch::<Namespace>(Api::all(client.clone()), notify.clone(), "namespaces");
    let (nodes, nodes_w) = watch::<Node>(Api::all(client.clone()), notify.clone(), "nodes");
    let (mesh_policies, mp_w) = watch::<MeshPolicy>(Api::all(client.clone()), notify.clone(), "meshpolicies");
    let (mutual_auths, ma_w) = watch::<MutualAuth>(Api::all(client.clone()), notify, "mutualauths");
    let stores = Stores { pods, namespaces, nodes, mesh_policies, mutual_auths };
    let all = async move {
        tokio::select! {
            e = pods_w => e,
            e = ns_w => e,
            e = nodes_w => e,
            e = mp_w => e,
            e = ma_w => e,
        }
    };
    (stores, all)
}

/// One reflector: its cache and the future that keeps it current (retrying with backoff).
pub fn watch<K>(api: Api<K>, notify: Arc<Notify>, what: &'static str) -> (Store<K>, impl Future<Output = &'static str> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let run = async move {
        let stream =
            watcher(api, watcher::Config::default()).default_backoff().modify(|o: &mut K| o.managed_fields_mut().clear()).reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => notify.notify_one(),
                Err(error) => tracing::warn!(%error, resource = what, "watch failed; retrying"),
            }
        }
        what
    };
    (reader, run)
}

/// Publishes a snapshot after each burst of changes (changes within `debounce` of each other
/// make one snapshot). The first is published once every cache has listed its kind, so nobody
/// compiles maps from a partial view.
pub async fn watch_snapshots(client: Client, debounce: Duration) -> watch::Receiver<Arc<Snapshot>> {
    watch_snapshots_with(client, debounce, EndpointRules::default()).await
}

/// [`watch_snapshots`] with the given endpoint rules.
pub async fn watch_snapshots_with(client: Client, debounce: Duration, rules: EndpointRules) -> watch::Receiver<Arc<Snapshot>> {
    let changed = Arc::new(Notify::new());
    let (stores, reflectors) = watch_all(&client, changed.clone());
    tokio::spawn(async move {
        let kind = reflectors.await;
        tracing::error!(kind, "a reflector ended; the snapshot stops following the cluster");
    });
    if let Err(kind) = stores.wait_until_ready().await {
        tracing::error!(kind, "a reflector ended before it listed");
    }
    let (tx, rx) = watch::channel(Arc::new(stores.snapshot_with(&rules)));
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            tokio::time::sleep(debounce).await;
            if tx.send(Arc::new(stores.snapshot_with(&rules))).is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher::Event;

    fn store_of<K>(items: Vec<K>) -> Store<K>
    where
        K: Resource + Clone + 'static,
        K::DynamicType: Default + Eq + Hash + Clone,
    {
        let (reader, mut writer) = reflector::store();
        for item in items {
            writer.apply_watcher_event(&Event::Apply(item));
        }
        reader
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).expect("pod")
    }

    #[test]
    fn the_control_plane_counts_pods_about_to_get_an_address_the_datapath_does_not() {
        let stores = Stores {
            pods: store_of(vec![
                pod(
                    "metadata: {name: web, namespace: shop}\nspec: {nodeName: node-1, serviceAccountName: web, containers: []}\nstatus: {phase: Running, podIP: 10.244.1.5}",
                ),
                pod(
                    "metadata: {name: new, namespace: shop}\nspec: {nodeName: node-1, serviceAccountName: new, containers: []}\nstatus: {phase: Pending}",
                ),
                pod(
                    "metadata: {name: proxy, namespace: kube-system}\nspec: {hostNetwork: true, nodeName: node-1, containers: []}\nstatus: {phase: Running, podIP: 192.168.1.10}",
                ),
            ]),
            namespaces: store_of(vec![]),
            nodes: store_of(vec![]),
            mesh_policies: store_of(vec![]),
            mutual_auths: store_of(vec![]),
        };
        let names = |pods: &[meshauth_policy::model::PodInfo]| pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&stores.snapshot().inputs.pods), ["web"]);
        let mut control = names(&stores.inputs().pods);
        control.sort();
        assert_eq!(control, ["new", "web"], "never the hostNetwork pod");
    }
}
