//! What the model is built from: namespaces, pods, MeshPolicies and MutualAuths reduced to the
//! fields it reads, each readable from its Kubernetes object.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use meshauth_crds::{MeshPolicy, MeshPolicySpec, MutualAuth, MutualAuthSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    /// Parses `NS/NAME`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = s.split_once('/')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| Self::new(ns, name))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A namespace as the model needs it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    pub fn from_namespace(ns: &Namespace) -> Self {
        Self { name: ns.metadata.name.clone().unwrap_or_default(), labels: ns.metadata.labels.clone().unwrap_or_default() }
    }
}

/// A pod as the model needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ip: Option<Ipv4Addr>,
    pub node: Option<String>,
}

impl PodInfo {
    /// Reads a Kubernetes Pod. The IP is the first IPv4 of `status.podIPs`/`status.podIP`.
    pub fn from_pod(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .map(|ip| ip.ip.as_str())
            .chain(status.and_then(|s| s.pod_ip.as_deref()));
        let ip = ips.filter_map(|ip| ip.parse::<Ipv4Addr>().ok()).next();
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            service_account: spec.and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into()),
            ip,
            node: spec.and_then(|s| s.node_name.clone()),
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }
}

/// A namespaced resource with what ordering ties needs: when it was created.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource<S> {
    pub namespace: String,
    pub name: String,
    /// RFC 3339 creation time; `None` sorts as the newest (not yet created).
    pub created: Option<String>,
    pub spec: S,
}

impl<S> Resource<S> {
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::new(&self.namespace, &self.name)
    }

    /// Oldest first; name breaks ties so the order never depends on input order.
    pub(super) fn age_key(&self) -> (bool, Option<&str>, &str, &str) {
        (self.created.is_none(), self.created.as_deref(), &self.namespace, &self.name)
    }
}

impl Resource<MeshPolicySpec> {
    pub fn from_mesh_policy(p: &MeshPolicy) -> Self {
        Self {
            namespace: p.metadata.namespace.clone().unwrap_or_default(),
            name: p.metadata.name.clone().unwrap_or_default(),
            created: p.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            spec: p.spec.clone(),
        }
    }
}

impl Resource<MutualAuthSpec> {
    pub fn from_mutual_auth(m: &MutualAuth) -> Self {
        Self {
            namespace: m.metadata.namespace.clone().unwrap_or_default(),
            name: m.metadata.name.clone().unwrap_or_default(),
            created: m.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
            spec: m.spec.clone(),
        }
    }
}

/// Everything the model is built from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub namespaces: Vec<NamespaceInfo>,
    pub pods: Vec<PodInfo>,
    pub mesh_policies: Vec<Resource<MeshPolicySpec>>,
    pub mutual_auths: Vec<Resource<MutualAuthSpec>>,
}
