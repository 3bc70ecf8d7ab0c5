//! Reads the cluster from Kubernetes YAML manifests (multi-document text): Namespaces, Pods,
//! MeshPolicies, MutualAuths and Nodes. Used offline by `meshauthctl policy check` and by the
//! agent when it runs without an API server. The caller reads the files; this module only
//! parses text, so every error names the source it was given, the object and the field. The
//! objects become a [`Snapshot`] by the same rules as the API's ([`Manifests::snapshot`]).

use crate::endpoints::EndpointRules;
use crate::snapshot::Snapshot;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::ObjectRef;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// Why manifests could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{source_name}: document {document}: not valid YAML: {error}")]
    Yaml { source_name: String, document: usize, error: serde_yaml::Error },
    #[error("{source_name}: document {document}: has no `kind`")]
    MissingKind { source_name: String, document: usize },
    #[error("{source_name}: {kind} {name}: unknown kind (expected Namespace, Pod, Node, MeshPolicy or MutualAuth)")]
    UnknownKind { source_name: String, kind: String, name: String },
    #[error("{source_name}: {kind} {name}: apiVersion {api_version:?} is not {expected:?}")]
    WrongApiVersion { source_name: String, kind: String, name: String, api_version: String, expected: &'static str },
    #[error("{source_name}: {kind} {name}: {error}")]
    Invalid { source_name: String, kind: String, name: String, error: String },
    #[error("{source_name}: {kind} {name}: defined twice (also in {first})")]
    Duplicate { source_name: String, kind: String, name: String, first: String },
}

/// Parsed manifests: the objects, and where each came from.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub namespaces: Vec<Namespace>,
    pub pods: Vec<Pod>,
    pub nodes: Vec<Node>,
    pub mesh_policies: Vec<MeshPolicy>,
    pub mutual_auths: Vec<MutualAuth>,
    /// `(kind, namespace/name)` → the source name it was read from.
    pub origins: BTreeMap<(String, String), String>,
}

impl Manifests {
    /// The cluster these manifests describe, pods that are not endpoints left out.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_with(&EndpointRules::default())
    }

    /// [`Manifests::snapshot`] with the given endpoint rules.
    pub fn snapshot_with(&self, rules: &EndpointRules) -> Snapshot {
        let nodes: Vec<&Node> = self.nodes.iter().collect();
        Snapshot::from_objects(rules, &self.namespaces, &self.pods, &nodes, &self.mesh_policies, &self.mutual_auths)
    }

    /// Where an object was defined, for error messages.
    pub fn origin(&self, kind: &str, object: &ObjectRef) -> Option<&str> {
        self.origins.get(&(kind.to_owned(), object.to_string())).map(String::as_str)
    }

    /// Parses one source (a file's text) and adds its objects.
    pub fn add_source(&mut self, source_name: &str, text: &str) -> Result<(), ManifestError> {
        use serde::Deserialize;
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let document = i + 1;
            let value = serde_yaml::Value::deserialize(doc).map_err(|error| ManifestError::Yaml {
                source_name: source_name.to_owned(),
                document,
                error,
            })?;
            if value.is_null() {
                continue;
            }
            self.add_value(source_name, document, value)?;
        }
        Ok(())
    }

    fn add_value(&mut self, source_name: &str, document: usize, value: serde_yaml::Value) -> Result<(), ManifestError> {
        let str_at = |v: &serde_yaml::Value, path: &[&str]| -> Option<String> {
            path.iter().try_fold(v, |v, k| v.get(*k)).and_then(|v| v.as_str()).map(str::to_owned)
        };
        let kind = str_at(&value, &["kind"]).ok_or_else(|| ManifestError::MissingKind { source_name: source_name.to_owned(), document })?;
        if kind == "List" {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                for item in items.clone() {
                    self.add_value(source_name, document, item)?;
                }
            }
            return Ok(());
        }
        let name = str_at(&value, &["metadata", "name"]).unwrap_or_else(|| format!("(document {document})"));
        let namespace = str_at(&value, &["metadata", "namespace"]).unwrap_or_else(|| "default".into());
        let api_version = str_at(&value, &["apiVersion"]).unwrap_or_default();
        let display = match kind.as_str() {
            "Namespace" | "Node" => name.clone(),
            _ => format!("{namespace}/{name}"),
        };
        let ctx = |error| ManifestError::Invalid { source_name: source_name.to_owned(), kind: kind.clone(), name: display.clone(), error };
        let expect_version = |expected: &'static str| {
            if api_version == expected {
                Ok(())
            } else {
                Err(ManifestError::WrongApiVersion {
                    source_name: source_name.to_owned(),
                    kind: kind.clone(),
                    name: display.clone(),
                    api_version: api_version.clone(),
                    expected,
                })
            }
        };
        let key = (kind.clone(), display.clone());
        if let Some(first) = self.origins.get(&key) {
            return Err(ManifestError::Duplicate { source_name: source_name.to_owned(), kind, name: display, first: first.clone() });
        }
        match kind.as_str() {
            "Namespace" => {
                expect_version("v1")?;
                let ns: Namespace = from_value(value).map_err(ctx)?;
                self.namespaces.push(ns);
            }
            "Pod" => {
                expect_version("v1")?;
                let mut pod: Pod = from_value(value).map_err(ctx)?;
                pod.metadata.namespace = Some(namespace);
                self.pods.push(pod);
            }
            "Node" => {
                expect_version("v1")?;
                let node: Node = from_value(value).map_err(ctx)?;
                self.nodes.push(node);
            }
            "MeshPolicy" => {
                expect_version("meshauth.io/v1alpha1")?;
                let mut p: MeshPolicy = from_value(value).map_err(ctx)?;
                p.metadata.namespace = Some(namespace);
                self.mesh_policies.push(p);
            }
            "MutualAuth" => {
                expect_version("meshauth.io/v1alpha1")?;
                let mut m: MutualAuth = from_value(value).map_err(ctx)?;
                m.metadata.namespace = Some(namespace);
                self.mutual_auths.push(m);
            }
            _ => {
                return Err(ManifestError::UnknownKind { source_name: source_name.to_owned(), kind, name: display });
            }
        }
        self.origins.insert(key, source_name.to_owned());
        Ok(())
    }
}

/// Deserializes with the path of the offending field in the error (`spec.mode: unknown ...`).
fn from_value<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_multi_document_sources() {
        let mut m = Manifests::default();
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {serviceAccountName: web, nodeName: node-1, containers: []}
status: {podIP: 10.0.0.5}
---
apiVersion: meshauth.io/v1alpha1
kind: MutualAuth
metadata: {name: default, namespace: shop}
spec: {mode: Strict}
"#;
        m.add_source("a.yaml", text).expect("parses");
        let s = m.snapshot();
        assert_eq!(s.inputs.namespaces.len(), 1);
        assert_eq!(s.inputs.pods[0].ip, Some("10.0.0.5".parse().expect("ip")));
        assert_eq!(s.inputs.pods[0].service_account, "web");
        assert_eq!(s.inputs.mutual_auths.len(), 1);
        assert_eq!(m.origin("Pod", &ObjectRef::new("shop", "web")), Some("a.yaml"));
    }

    #[test]
    fn errors_name_the_source_the_object_and_the_field() {
        let cases = [
            ("kind: Gadget\nmetadata: {name: g}\n", "bad.yaml: Gadget default/g: unknown kind"),
            ("metadata: {name: g}\n", "bad.yaml: document 1: has no `kind`"),
            ("a: [\n", "bad.yaml: document 1: not valid YAML"),
            (
                "apiVersion: meshauth.io/v1alpha1\nkind: MutualAuth\nmetadata: {name: m, namespace: x}\nspec: {mode: Sometimes}\n",
                "bad.yaml: MutualAuth x/m: spec.mode: unknown variant `Sometimes`",
            ),
            (
                "apiVersion: meshauth.io/v1\nkind: MutualAuth\nmetadata: {name: m}\nspec: {mode: Strict}\n",
                "apiVersion \"meshauth.io/v1\" is not \"meshauth.io/v1alpha1\"",
            ),
        ];
        for (text, want) in cases {
            let err = Manifests::default().add_source("bad.yaml", text).expect_err(text).to_string();
            assert!(err.contains(want), "{err:?} does not contain {want:?}");
        }
    }
}
