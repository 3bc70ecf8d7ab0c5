//! The Kubernetes side: one reflector per kind the model reads, the caches they fill, and the
//! [`Snapshot`] built from those caches. Objects are cached without their managed fields, which
//! nothing here reads and which are often the larger half of an object; Pods and Nodes keep
//! only the fields the model, the agents and the operator read (a real Pod's containers and
//! statuses, a real Node's image list, are kilobytes each that nothing here looks at).

use crate::endpoints::{EndpointRules, MIRROR_POD_ANNOTATION};
use crate::snapshot::Snapshot;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, NodeStatus, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt as _};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::{Inputs, ObjectRef, PodInfo};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, broadcast, watch};

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
    let (deleted, _) = broadcast::channel(1);
    watch_all_with_deletions(client, notify, deleted)
}

/// A pod the API server said was deleted, with the addresses it had: the agents forget
/// another node's pod's address at once rather than at their next apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedPod {
    pub pod: ObjectRef,
    pub ips: Vec<Ipv4Addr>,
}

/// [`watch_all`], also sending every pod deletion the watch reports on `deleted` (a re-list
/// that finds a pod gone reports none: the next snapshot drops it).
pub fn watch_all_with_deletions(
    client: &Client,
    notify: Arc<Notify>,
    deleted: broadcast::Sender<DeletedPod>,
) -> (Stores, impl Future<Output = &'static str> + Send + 'static) {
    let on_delete = move |pod: &Pod| {
        let info = PodInfo::from_pod(pod);
        // Nobody listening (no agent) is no error.
        let _ = deleted.send(DeletedPod { pod: info.object_ref(), ips: info.ip.into_iter().collect() });
    };
    let (pods, pods_w) = watch_with::<Pod>(Api::all(client.clone()), notify.clone(), "pods", pod_as_read, on_delete);
    let (namespaces, ns_w) = watch::<Namespace>(Api::all(client.clone()), notify.clone(), "namespaces");
    let (nodes, nodes_w) = watch_trimmed::<Node>(Api::all(client.clone()), notify.clone(), "nodes", node_as_read);
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

/// Only what is read of a Pod: its name, labels and the mirror-pod annotation; its node,
/// service account and host networking; its phase and addresses.
pub fn pod_as_read(pod: &mut Pod) {
    let meta = std::mem::take(&mut pod.metadata);
    let annotations = meta.annotations.and_then(|a| a.get_key_value(MIRROR_POD_ANNOTATION).map(|(k, v)| [(k.clone(), v.clone())].into()));
    pod.metadata = ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        annotations,
        ..ObjectMeta::default()
    };
    pod.spec = pod.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        service_account_name: s.service_account_name,
        host_network: s.host_network,
        ..PodSpec::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus { phase: s.phase, pod_ip: s.pod_ip, pod_ips: s.pod_ips, ..PodStatus::default() });
}

/// Only what is read of a Node: its name, UID (SPIRE's k8s_psat agent IDs), labels and
/// annotations (agent address and agent ID), pod CIDRs and addresses.
pub fn node_as_read(node: &mut Node) {
    let meta = std::mem::take(&mut node.metadata);
    node.metadata = ObjectMeta {
        name: meta.name,
        uid: meta.uid,
        resource_version: meta.resource_version,
        labels: meta.labels,
        annotations: meta.annotations,
        ..ObjectMeta::default()
    };
    node.spec = node.spec.take().map(|s| NodeSpec { pod_cidr: s.pod_cidr, pod_cidrs: s.pod_cidrs, ..NodeSpec::default() });
    node.status = node.status.take().map(|s| NodeStatus { addresses: s.addresses, ..NodeStatus::default() });
}

/// One reflector: its cache and the future that keeps it current (retrying with backoff).
pub fn watch<K>(api: Api<K>, notify: Arc<Notify>, what: &'static str) -> (Store<K>, impl Future<Output = &'static str> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    watch_trimmed(api, notify, what, |o: &mut K| o.managed_fields_mut().clear())
}

/// [`watch`] caching each object as `trim` leaves it.
pub fn watch_trimmed<K>(
    api: Api<K>,
    notify: Arc<Notify>,
    what: &'static str,
    trim: fn(&mut K),
) -> (Store<K>, impl Future<Output = &'static str> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    watch_with(api, notify, what, trim, |_: &K| {})
}

/// [`watch_trimmed`], calling `on_delete` with each object the watch reports deleted.
fn watch_with<K>(
    api: Api<K>,
    notify: Arc<Notify>,
    what: &'static str,
    trim: fn(&mut K),
    on_delete: impl Fn(&K) + Send + 'static,
) -> (Store<K>, impl Future<Output = &'static str> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let run = async move {
        let stream = watcher(api, watcher::Config::default()).default_backoff().modify(trim).reflect(writer);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Delete(object)) => {
                    on_delete(&object);
                    notify.notify_one();
                }
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
    watch_snapshots_and_deletions(client, debounce, rules).await.0
}

/// [`watch_snapshots_with`], and every pod deletion as the watch reports it, ahead of the
/// snapshot that no longer has the pod.
pub async fn watch_snapshots_and_deletions(
    client: Client,
    debounce: Duration,
    rules: EndpointRules,
) -> (watch::Receiver<Arc<Snapshot>>, broadcast::Receiver<DeletedPod>) {
    let changed = Arc::new(Notify::new());
    // A burst of deletions larger than this is told as "lagged": the snapshots still drop them.
    let (deleted_tx, deleted) = broadcast::channel(4096);
    let (stores, reflectors) = watch_all_with_deletions(&client, changed.clone(), deleted_tx);
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
    (rx, deleted)
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
    fn trimmed_pods_and_nodes_read_as_the_full_objects_do() {
        let pods = vec![
            pod(r#"
metadata:
  name: web
  namespace: shop
  uid: 5f1c
  labels: {app: web}
  annotations: {kubectl.kubernetes.io/last-applied-configuration: '{"big": "blob"}'}
  managedFields: [{manager: kubectl, operation: Apply}]
spec:
  nodeName: node-1
  serviceAccountName: web
  containers: [{name: web, image: nginx, env: [{name: A, value: b}]}]
  volumes: [{name: tmp, emptyDir: {}}]
status: {phase: Running, podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: "fd00::5"}], conditions: [{type: Ready, status: "True"}]}
"#),
            pod(
                "metadata: {name: static, namespace: kube-system, annotations: {kubernetes.io/config.mirror: abc, other: x}}\nspec: {nodeName: node-1, serviceAccountName: s, containers: []}\nstatus: {phase: Running, podIP: 10.244.1.6}",
            ),
            pod(
                "metadata: {name: proxy, namespace: kube-system}\nspec: {hostNetwork: true, nodeName: node-1, serviceAccountName: p, containers: []}\nstatus: {phase: Running, podIP: 10.244.1.7}",
            ),
            pod(
                "metadata: {name: done, namespace: shop}\nspec: {nodeName: node-1, serviceAccountName: web, containers: []}\nstatus: {phase: Succeeded, podIP: 10.244.1.8}",
            ),
        ];
        let node: Node = serde_yaml::from_str(
            "metadata: {name: node-1, uid: n1, annotations: {meshauth.io/agent-address: 192.168.1.10}}\n\
             spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24], providerID: x}\n\
             status: {addresses: [{type: InternalIP, address: 192.168.1.10}], images: [{names: [nginx], sizeBytes: 1}]}",
        )
        .expect("node");
        let mut trimmed_pods = pods.clone();
        trimmed_pods.iter_mut().for_each(pod_as_read);
        let mut trimmed_node = node.clone();
        node_as_read(&mut trimmed_node);
        let stores = |pods: Vec<Pod>, node: Node| Stores {
            pods: store_of(pods),
            namespaces: store_of(vec![]),
            nodes: store_of(vec![node]),
            mesh_policies: store_of(vec![]),
            mutual_auths: store_of(vec![]),
        };
        let (full, trimmed) = (stores(pods, node).snapshot(), stores(trimmed_pods.clone(), trimmed_node.clone()).snapshot());
        // A store lists in no particular order.
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let read = |s: &Snapshot| {
            (
                sorted(s.inputs.pods.iter().map(|p| format!("{p:?}")).collect()),
                sorted(s.not_endpoints.iter().map(|p| format!("{p:?}")).collect()),
            )
        };
        assert_eq!(read(&full), read(&trimmed));
        assert_eq!(full.not_endpoints.len(), 3, "mirror, host network, finished");
        assert_eq!(format!("{:?}", full.nodes), format!("{:?}", trimmed.nodes));
        assert!(trimmed_pods[0].spec.as_ref().is_some_and(|s| s.containers.is_empty() && s.volumes.is_none()), "the containers are gone");
        assert!(trimmed_pods[0].metadata.annotations.is_none() && trimmed_pods[0].metadata.managed_fields.is_none());
        assert_eq!(trimmed_pods[0].metadata.uid.as_deref(), Some("5f1c"));
        assert!(trimmed_node.status.as_ref().is_some_and(|s| s.images.is_none()), "the image list is gone");
        assert_eq!(trimmed_node.metadata.uid.as_deref(), Some("n1"), "k8s_psat agent IDs are made of it");
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
