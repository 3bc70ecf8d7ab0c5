//! Kubernetes objects in a cluster without kubelet or controller-manager: namespaces and
//! service accounts created on demand, pods whose IP and phase are set through the `status`
//! subresource, CRDs installed from `config/crds/` and waited for, dynamic objects for
//! custom resources and Table requests for printer columns.
//!
//! Test support only: nothing here runs containers; a "pod" is an API object.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind, ObjectMeta};
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The field manager of this crate's server-side applies.
pub const FIELD_MANAGER: &str = "meshauth-testenv";

/// Errors of the Kubernetes helpers.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The API server refused or failed a request.
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// A CRD manifest could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A CRD manifest is not a CustomResourceDefinition.
    #[error("{path}: not a CustomResourceDefinition manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    /// A CRD did not become Established in time.
    #[error("CRD {name} not Established after {waited:?} (last conditions: {conditions})")]
    NotEstablished { name: String, waited: Duration, conditions: String },
    /// A request could not be built.
    #[error("cannot build the request for {path}: {source}")]
    Request {
        path: String,
        #[source]
        source: http::Error,
    },
    /// The server's answer is not what the request asks for.
    #[error("unexpected answer to {path}: {reason}")]
    Answer { path: String, reason: String },
}

fn api_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> K8sError {
    let action = action.into();
    move |source| K8sError::Api { action, source }
}

/// `true` when the error is the API server's 409 AlreadyExists.
pub fn is_already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// `true` when the error is the API server's 404 NotFound.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The repository's `config/crds/` directory.
pub fn crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("config").join("crds")
}

/// Creates the namespace unless it exists.
pub async fn ensure_namespace(client: &kube::Client, name: &str) -> Result<(), K8sError> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace { metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() }, ..Default::default() };
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(e) if is_already_exists(&e) => Ok(()),
        Err(e) => Err(api_err(format!("create Namespace {name}"))(e)),
    }
}

/// Gives the Node object `name` the InternalIP `address`, as its kubelet reports it, and the
/// `meshauth.io/agent-address` annotation naming the same address (as the chart sets it), so
/// agents take it for that node's own.
pub async fn set_node_address(client: &kube::Client, name: &str, address: &str) -> Result<(), K8sError> {
    let nodes = Api::<Node>::all(client.clone());
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": address}]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(api_err(format!("set the address of Node {name}")))?;
    let annotation = json!({"metadata": {"annotations": {"meshauth.io/agent-address": address}}});
    nodes.patch(name, &PatchParams::default(), &Patch::Merge(&annotation)).await.map_err(api_err(format!("annotate Node {name}")))?;
    Ok(())
}

/// Creates the namespace with these labels, or sets the labels on the existing one.
pub async fn label_namespace(client: &kube::Client, name: &str, labels: &BTreeMap<String, String>) -> Result<(), K8sError> {
    ensure_namespace(client, name).await?;
    let api: Api<Namespace> = Api::all(client.clone());
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": labels}})))
        .await
        .map_err(api_err(format!("label Namespace {name}")))?;
    Ok(())
}

/// Creates the service account (and its namespace) unless it exists. Without a
/// controller-manager nothing creates `default` accounts, and the ServiceAccount admission
/// plugin refuses pods whose account is missing.
pub async fn ensure_service_account(client: &kube::Client, namespace: &str, name: &str) -> Result<(), K8sError> {
    ensure_namespace(client, namespace).await?;
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa = ServiceAccount { metadata: ObjectMeta { name: Some(name.to_owned()), ..Default::default() }, ..Default::default() };
    match api.create(&PostParams::default(), &sa).await {
        Ok(_) => Ok(()),
        Err(e) if is_already_exists(&e) => Ok(()),
        Err(e) => Err(api_err(format!("create ServiceAccount {namespace}/{name}"))(e)),
    }
}

/// A pod to create.
#[derive(Clone, Debug, Default)]
pub struct TestPod {
    /// Namespace (created if missing).
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Service account (created if missing); `default` when empty.
    pub service_account: String,
    /// `spec.nodeName` (a node of the environment, e.g. `node-1`).
    pub node: Option<String>,
}

impl TestPod {
    /// A pod `namespace/name` with no labels, service account `default`, unscheduled.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into(), ..Default::default() }
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the service account.
    pub fn service_account(mut self, name: impl Into<String>) -> Self {
        self.service_account = name.into();
        self
    }

    /// Binds the pod to a node.
    pub fn node(mut self, node: impl Into<String>) -> Self {
        self.node = Some(node.into());
        self
    }
}

/// Creates the pod (and its namespace and service account). It never runs: set its IP and
/// phase with [`set_pod_status`].
pub async fn create_pod(client: &kube::Client, pod: &TestPod) -> Result<Pod, K8sError> {
    let sa = if pod.service_account.is_empty() { "default" } else { pod.service_account.as_str() };
    ensure_service_account(client, &pod.namespace, sa).await?;
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let object = Pod {
        metadata: ObjectMeta {
            name: Some(pod.name.clone()),
            namespace: Some(pod.namespace.clone()),
            labels: Some(pod.labels.clone()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            service_account_name: Some(sa.to_owned()),
            automount_service_account_token: Some(false),
            node_name: pod.node.clone(),
            containers: vec![Container { name: "main".into(), image: Some("meshauth.invalid/never-runs:0".into()), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    api.create(&PostParams::default(), &object).await.map_err(api_err(format!("create Pod {}/{}", pod.namespace, pod.name)))
}

/// Sets a pod's `status.phase` and (when given) `status.podIP`/`podIPs` through the status
/// subresource, as a kubelet would.
pub async fn set_pod_status(client: &kube::Client, namespace: &str, name: &str, phase: &str, ip: Option<&str>) -> Result<Pod, K8sError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut status = json!({"phase": phase});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
        status["hostIP"] = json!("127.0.0.1");
        status["hostIPs"] = json!([{"ip": "127.0.0.1"}]);
    }
    if phase == "Running" {
        status["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(json!({"status": status})))
        .await
        .map_err(api_err(format!("set status of Pod {namespace}/{name}")))
}

/// Deletes a pod at once (`gracePeriodSeconds=0`: no kubelet would ever confirm a graceful
/// delete). A missing pod is not an error.
pub async fn delete_pod(client: &kube::Client, namespace: &str, name: &str) -> Result<(), K8sError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    match api.delete(name, &DeleteParams::default().grace_period(0)).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(api_err(format!("delete Pod {namespace}/{name}"))(e)),
    }
}

/// Reads every CustomResourceDefinition in the `*.yaml`/`*.yml` files of `dir` (multi-document
/// files allowed), sorted by file name.
pub fn read_crds(dir: &Path) -> Result<Vec<CustomResourceDefinition>, K8sError> {
    let read_err = |source| K8sError::Read { path: dir.to_owned(), source };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut crds = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| K8sError::Read { path: path.clone(), source })?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).map_err(|e| K8sError::Manifest { path: path.clone(), reason: e.to_string() })?;
            if value.is_null() {
                continue;
            }
            if value.get("kind").and_then(Value::as_str) != Some("CustomResourceDefinition") {
                return Err(K8sError::Manifest { path: path.clone(), reason: format!("kind is {}", value["kind"]) });
            }
            let crd: CustomResourceDefinition =
                serde_json::from_value(value).map_err(|e| K8sError::Manifest { path: path.clone(), reason: e.to_string() })?;
            crds.push(crd);
        }
    }
    if crds.is_empty() {
        return Err(K8sError::Manifest { path: dir.to_owned(), reason: "no CustomResourceDefinition found".into() });
    }
    Ok(crds)
}

/// Installs (server-side apply) every CRD of `dir` and waits until each is Established.
/// Returns their names.
pub async fn install_crds(client: &kube::Client, dir: &Path, timeout: Duration) -> Result<Vec<String>, K8sError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for crd in read_crds(dir)? {
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| K8sError::Manifest { path: dir.to_owned(), reason: "a CRD without metadata.name".into() })?;
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
            .await
            .map_err(api_err(format!("apply CRD {name}")))?;
        names.push(name);
    }
    for name in &names {
        wait_crd_established(client, name, timeout).await?;
    }
    Ok(names)
}

/// Waits until the CRD has condition `Established=True`.
pub async fn wait_crd_established(client: &kube::Client, name: &str, timeout: Duration) -> Result<(), K8sError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let crd = api.get(name).await.map_err(api_err(format!("get CRD {name}")))?;
        let conditions = crd.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
        if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            let conditions = conditions
                .iter()
                .map(|c| format!("{}={} ({})", c.type_, c.status, c.message.clone().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(K8sError::NotEstablished { name: name.to_owned(), waited: start.elapsed(), conditions });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A dynamic API for a namespaced custom resource, so tests need no Rust types for it.
pub fn dynamic_api(client: &kube::Client, group: &str, version: &str, kind: &str, plural: &str, namespace: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    Api::namespaced_with(client.clone(), namespace, &ar)
}

/// Creates a custom resource from its JSON manifest (`apiVersion`, `kind`, `metadata`, …)
/// through `api`.
pub async fn create_dynamic(api: &Api<DynamicObject>, manifest: Value) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(manifest).map_err(kube::Error::SerdeError)?;
    api.create(&PostParams::default(), &obj).await
}

/// A Table (`meta.k8s.io/v1`) answer: column names and each row's cells.
#[derive(Clone, Debug)]
pub struct Table {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Each row's object name and cells (aligned with `columns`).
    pub rows: Vec<(String, Vec<Value>)>,
}

impl Table {
    /// The cell of `column` in the row of object `name`.
    pub fn cell(&self, name: &str, column: &str) -> Option<&Value> {
        let i = self.columns.iter().position(|c| c == column)?;
        self.rows.iter().find(|(n, _)| n == name)?.1.get(i)
    }
}

/// GETs `path` (e.g. `/apis/meshauth.io/v1alpha1/namespaces/x/meshpolicies`) as a Table,
/// the way `kubectl get` asks, so the printer columns come back.
pub async fn get_table(client: &kube::Client, path: &str) -> Result<Table, K8sError> {
    let req = http::Request::get(path)
        .header(http::header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .map_err(|source| K8sError::Request { path: path.to_owned(), source })?;
    let v: Value = client.request(req).await.map_err(api_err(format!("GET {path} as Table")))?;
    let answer = |reason: &str| K8sError::Answer { path: path.to_owned(), reason: reason.to_owned() };
    if v.get("kind").and_then(Value::as_str) != Some("Table") {
        return Err(answer(&format!("kind is {}, not Table", v["kind"])));
    }
    let columns = v
        .get("columnDefinitions")
        .and_then(Value::as_array)
        .ok_or_else(|| answer("no columnDefinitions"))?
        .iter()
        .map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| answer("a column without a name")))
        .collect::<Result<Vec<_>, _>>()?;
    let rows = v
        .get("rows")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|r| {
            let cells = r.get("cells").and_then(Value::as_array).cloned().ok_or_else(|| answer("a row without cells"))?;
            // Without includeObject the row carries PartialObjectMetadata; the Name column is
            // the first cell either way.
            let name = r
                .pointer("/object/metadata/name")
                .and_then(Value::as_str)
                .or_else(|| cells.first().and_then(Value::as_str))
                .unwrap_or_default()
                .to_owned();
            Ok((name, cells))
        })
        .collect::<Result<Vec<_>, K8sError>>()?;
    Ok(Table { columns, rows })
}
