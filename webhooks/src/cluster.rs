//! Warnings that need the API: a policy that selects no pod of its own namespace right now, and
//! a MutualAuth that ties with an existing one of its namespace (it or the other will be
//! `Conflicted`). Lookups are bounded in time; one that fails or times out only loses its
//! warning, never the admission. Without API access (standalone) these warnings are skipped.
//!
//! Every lookup stays inside the namespace of the object under review: a tenant may write
//! MeshPolicies in its own namespace only, and a warning about what exists elsewhere (which
//! namespaces carry a label, which pods run there) would let it map other tenants' namespaces
//! through the webhook. So `namespaceSelector`s and peers in other namespaces get no API-based
//! warning at all, whether they match or not.
//!
//! Fetching is here; deciding is in pure functions ([`tie_warnings`]) over what was fetched, and
//! ties are decided by the shared policy model, not by a copy of its rules.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams};
use kube::core::Selector;
use kube::{Client, ResourceExt};
use meshauth_cluster::endpoints::{self, EndpointRules, NodeFacts, NotEndpoint};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::{Inputs, ModelConfig, ObjectRef, PodInfo, PolicyModel, Resource};
use meshauth_policy::validate::{self, FieldError};
use tracing::{debug, warn};

use crate::admission::{Review, Subject};

/// Most pods fetched to decide MutualAuth ties on pods, or whether a selector picks any.
pub const MAX_PODS: u32 = 500;

/// Why a lookup gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("{what} failed: {source}")]
    Api { what: String, source: kube::Error },
    #[error("selector cannot be sent to the API: {0}")]
    Selector(String),
}

/// API access for warnings, or none (standalone).
#[derive(Clone)]
pub struct Cluster {
    client: Option<Client>,
    timeout: Duration,
    mesh: ModelConfig,
}

impl Cluster {
    pub fn new(client: Option<Client>, timeout: Duration, mesh: ModelConfig) -> Self {
        Self { client, timeout, mesh }
    }

    /// Whether API-based warnings are on.
    pub fn has_api(&self) -> bool {
        self.client.is_some()
    }

    /// The API-based warnings for a review that passed the static checks.
    pub async fn warnings(&self, review: &Review) -> Vec<FieldError> {
        let Some(client) = &self.client else {
            debug!("no API access: API-based warnings skipped");
            return Vec::new();
        };
        // The namespace the API server authorized the request for is the only one looked into.
        let requested = review.request.namespace.as_deref().unwrap_or_default();
        let object_namespace = match &review.subject {
            Subject::MeshPolicy(p) => p.namespace(),
            Subject::MutualAuth(m) => m.namespace(),
            Subject::Skip(_) | Subject::Unreadable(_) => None,
        };
        if object_namespace.as_deref().is_some_and(|ns| ns != requested) {
            debug!(requested, object = ?object_namespace, "object and request name different namespaces: API-based warnings skipped");
            return Vec::new();
        }
        match &review.subject {
            Subject::MeshPolicy(p) => self.mesh_policy_warnings(client, p).await,
            Subject::MutualAuth(m) => self.mutual_auth_warnings(client, m).await,
            Subject::Skip(_) | Subject::Unreadable(_) => Vec::new(),
        }
    }

    async fn bounded<T>(&self, what: String, f: impl Future<Output = Result<T, kube::Error>>) -> Result<T, LookupError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(LookupError::Api { what, source }),
            Err(_) => Err(LookupError::Timeout { what, after: self.timeout }),
        }
    }

    /// Pods of `namespace` that `selector` picks and that are or will be meshauth endpoints
    /// ([`policy_pods`]), out of at most `limit` listed, and whether more were left unlisted.
    async fn pods(
        &self,
        client: &Client,
        namespace: &str,
        selector: &LabelSelector,
        limit: u32,
    ) -> Result<(Vec<PodInfo>, bool), LookupError> {
        let selector = selector_string(selector)?;
        let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let params = ListParams::default().labels(&selector).limit(limit);
        let list = self.bounded(format!("listing pods of {namespace}"), api.list(&params)).await?;
        let more = list.metadata.continue_.as_deref().is_some_and(|c| !c.is_empty());
        Ok((policy_pods(&list.items), more))
    }

    async fn mesh_policy_warnings(&self, client: &Client, policy: &MeshPolicy) -> Vec<FieldError> {
        let namespace = policy.namespace().unwrap_or_default();
        let mut warnings = Vec::new();
        // Only the policy's own selector, in its own namespace: see the module doc.
        if usable(&policy.spec.selector) {
            // Not the first pod alone: it may be one no policy acts on (a hostNetwork pod).
            match self.pods(client, &namespace, &policy.spec.selector, MAX_PODS).await {
                // Pods past the first page may be workloads: no warning rather than a false one.
                Ok((pods, more)) if pods.is_empty() && !more => {
                    warnings.push(FieldError::new("spec.selector", format!("selects no pod in namespace {namespace} right now")))
                }
                Ok(_) => {}
                Err(err) => warn!(error = %err, "lookup for a warning failed; warning skipped"),
            }
        }
        warnings
    }

    async fn mutual_auth_warnings(&self, client: &Client, me: &MutualAuth) -> Vec<FieldError> {
        let namespace = me.namespace().unwrap_or_default();
        let mut warnings = Vec::new();
        let selector = me.spec.selector.as_ref().filter(|s| !selects_all(s));
        let pods = match selector {
            Some(s) if usable(s) => match self.pods(client, &namespace, s, MAX_PODS).await {
                Ok((pods, more)) => {
                    if pods.is_empty() && !more {
                        warnings.push(FieldError::new("spec.selector", format!("selects no pod in namespace {namespace} right now")));
                    }
                    pods
                }
                Err(err) => {
                    warn!(error = %err, "lookup for a warning failed; warning skipped");
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        let api: Api<MutualAuth> = Api::namespaced(client.clone(), &namespace);
        match self.bounded(format!("listing MutualAuths of {namespace}"), api.list(&ListParams::default())).await {
            Ok(existing) => warnings.extend(tie_warnings(me, &existing.items, &pods, &self.mesh)),
            Err(err) => warn!(error = %err, "lookup for a warning failed; warning skipped"),
        }
        warnings
    }
}

/// The pods a policy can act on, decided by the rules the agents use
/// ([`meshauth_cluster::endpoints::classify`]): not hostNetwork, finished, mirror or without a
/// usable service account. A pod still waiting for its address counts (it will be an endpoint
/// once it has one). The node rules are left out: Nodes are cluster-scoped and the webhook
/// looks only into the namespace under review, and only a hostNetwork pod (refused above)
/// gets a node's address.
pub fn policy_pods(pods: &[Pod]) -> Vec<PodInfo> {
    let no_nodes = NodeFacts::new(std::iter::empty::<&Node>());
    let rules = EndpointRules { check_node_pod_cidrs: false, ..EndpointRules::default() };
    pods.iter()
        .filter_map(|pod| match endpoints::classify(pod, &no_nodes, &rules).endpoint {
            Ok(info) => Some(info),
            Err(NotEndpoint::NoAddress) => Some(PodInfo::from_pod(pod)),
            Err(_) => None,
        })
        .collect()
}

fn selector_string(selector: &LabelSelector) -> Result<String, LookupError> {
    Selector::try_from(selector.clone()).map(|s| s.to_string()).map_err(|e| LookupError::Selector(e.to_string()))
}

/// A selector worth asking the API about: valid and satisfiable.
fn usable(selector: &LabelSelector) -> bool {
    validate::validate_label_selector(selector, "").is_empty() && validate::selector_contradiction(selector).is_none()
}

fn selects_all(selector: &LabelSelector) -> bool {
    validate::same_selector(selector, &LabelSelector::default())
}

/// The level a MutualAuth decides at, for same-scope ties the model reports only through pods.
#[derive(Debug, PartialEq)]
enum Scope<'a> {
    Mesh,
    Namespace,
    Selector(&'a LabelSelector),
}

fn scope<'a>(m: &'a MutualAuth, mesh: &ModelConfig) -> Scope<'a> {
    match m.spec.selector.as_ref().filter(|s| !selects_all(s)) {
        Some(s) => Scope::Selector(s),
        None if m.namespace().as_deref() == Some(mesh.mesh_namespace.as_str()) => Scope::Mesh,
        None => Scope::Namespace,
    }
}

fn same_scope(a: &Scope<'_>, b: &Scope<'_>) -> bool {
    match (a, b) {
        (Scope::Selector(a), Scope::Selector(b)) => validate::same_selector(a, b),
        (a, b) => a == b,
    }
}

/// Warnings for a MutualAuth `me` (being created or updated) against the `existing` ones of its
/// namespace and the `pods` its selector picks: ties that make it or another `Conflicted`
/// (decided by the policy model), and same-scope duplicates.
pub fn tie_warnings(me: &MutualAuth, existing: &[MutualAuth], pods: &[PodInfo], mesh: &ModelConfig) -> Vec<FieldError> {
    let me_res = Resource::from_mutual_auth(me);
    let me_ref = me_res.object_ref();
    let others: Vec<&MutualAuth> =
        existing.iter().filter(|o| ObjectRef::new(o.namespace().unwrap_or_default(), o.name_any()) != me_ref).collect();
    let mode_of = |r: &ObjectRef| {
        others
            .iter()
            .find(|o| o.name_any() == r.name && o.namespace().unwrap_or_default() == r.namespace)
            .map(|o| o.spec.mode.as_str())
            .unwrap_or("?")
    };
    let mut inputs = Inputs { pods: pods.to_vec(), ..Default::default() };
    inputs.mutual_auths = others.iter().map(|o| Resource::from_mutual_auth(o)).collect();
    inputs.mutual_auths.push(me_res.clone());
    let model = PolicyModel::new(mesh.clone(), inputs);

    let mut warnings = Vec::new();
    let mut reported = BTreeSet::new();
    let on_pods = |pods: &[ObjectRef]| match pods.len() {
        0 => String::new(),
        1..=3 => format!(" on pods {}", pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")),
        n => format!(" on {n} pods"),
    };
    for conflict in model.conflicts() {
        if conflict.loser == me_ref && reported.insert(conflict.winner.clone()) {
            warnings.push(FieldError::new(
                "spec",
                format!(
                    "ties with the older MutualAuth {} (mode {}) at the same level{}: this one will be Conflicted and not used there",
                    conflict.winner,
                    mode_of(&conflict.winner),
                    on_pods(&conflict.pods)
                ),
            ));
        } else if conflict.winner == me_ref && reported.insert(conflict.loser.clone()) {
            warnings.push(FieldError::new(
                "spec",
                format!(
                    "ties with the newer MutualAuth {} (mode {}) at the same level{}: that one will be Conflicted",
                    conflict.loser,
                    mode_of(&conflict.loser),
                    on_pods(&conflict.pods)
                ),
            ));
        }
    }
    // Same scope, not reported above: identical selectors with no pod yet, or the same mode.
    let my_scope = scope(me, mesh);
    for other in &others {
        let other_ref = ObjectRef::new(other.namespace().unwrap_or_default(), other.name_any());
        if reported.contains(&other_ref) || !same_scope(&my_scope, &scope(other, mesh)) {
            continue;
        }
        let other_mode = other.spec.mode.as_str();
        let reason = if other.spec.mode == me.spec.mode {
            format!("has the same scope and mode ({other_mode}) as MutualAuth {other_ref}: one of them is redundant")
        } else if older(&me_res, &Resource::from_mutual_auth(other)) {
            format!("ties with the newer MutualAuth {other_ref} (mode {other_mode}) at the same level: that one will be Conflicted")
        } else {
            format!(
                "ties with the older MutualAuth {other_ref} (mode {other_mode}) at the same level: this one will be Conflicted and not used"
            )
        };
        warnings.push(FieldError::new("spec", reason));
    }
    warnings
}

/// Whether `a` was created before `b` (not yet created is newest; name breaks ties), as the
/// model orders them.
fn older<S>(a: &Resource<S>, b: &Resource<S>) -> bool {
    let key = |r: &Resource<S>| (r.created.is_none(), r.created.clone(), r.namespace.clone(), r.name.clone());
    key(a) < key(b)
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // the case tables
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use meshauth_crds::{MutualAuthMode, MutualAuthSpec};
    use std::collections::BTreeMap;

    fn ma(ns: &str, name: &str, created: Option<&str>, selector: Option<&[(&str, &str)]>, mode: MutualAuthMode) -> MutualAuth {
        let mut m = MutualAuth::new(
            name,
            MutualAuthSpec {
                selector: selector.map(|pairs| LabelSelector {
                    match_labels: Some(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                    match_expressions: None,
                }),
                mode,
            },
        );
        m.metadata.namespace = Some(ns.into());
        m.metadata.creation_timestamp = created.map(|t| Time(t.parse().expect("timestamp")));
        m
    }

    fn pod(ns: &str, name: &str, labels: &[(&str, &str)]) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
            service_account: "default".into(),
            ip: None,
            node: None,
        }
    }

    const T1: Option<&str> = Some("2025-01-01T00:00:00Z");
    const T2: Option<&str> = Some("2025-02-01T00:00:00Z");
    use MutualAuthMode::{Disabled, Permissive, Strict};

    #[test]
    fn ties() {
        let app_a: &[(&str, &str)] = &[("app", "a")];
        let team: &[(&str, &str)] = &[("team", "x")];
        let pods = [pod("prod", "a-1", &[("app", "a"), ("team", "x")])];
        let cases: Vec<(&str, MutualAuth, Vec<MutualAuth>, &[PodInfo], Vec<&str>)> = vec![
            ("alone", ma("prod", "new", None, None, Strict), vec![], &[], vec![]),
            ("update of itself", ma("prod", "x", T1, None, Strict), vec![ma("prod", "x", T1, None, Permissive)], &[], vec![]),
            (
                "new namespace-wide loses to the older one",
                ma("prod", "new", None, None, Strict),
                vec![ma("prod", "old", T1, None, Permissive)],
                &[],
                vec!["ties with the older MutualAuth prod/old (mode Permissive) at the same level: this one will be Conflicted"],
            ),
            (
                "older namespace-wide being updated wins",
                ma("prod", "old", T1, None, Disabled),
                vec![ma("prod", "old", T1, None, Strict), ma("prod", "newer", T2, None, Strict)],
                &[],
                vec!["ties with the newer MutualAuth prod/newer (mode Strict) at the same level: that one will be Conflicted"],
            ),
            (
                "mesh-wide ties",
                ma("meshauth-system", "new", None, None, Strict),
                vec![ma("meshauth-system", "old", T1, None, Disabled)],
                &[],
                vec!["ties with the older MutualAuth meshauth-system/old (mode Disabled)"],
            ),
            (
                "empty selector is namespace-wide",
                ma("prod", "new", None, Some(&[]), Strict),
                vec![ma("prod", "old", T1, None, Permissive)],
                &[],
                vec!["this one will be Conflicted"],
            ),
            (
                "namespace-wide and selector do not tie",
                ma("prod", "new", None, Some(app_a), Strict),
                vec![ma("prod", "old", T1, None, Permissive)],
                &pods,
                vec![],
            ),
            (
                "same selector, no pods yet",
                ma("prod", "new", None, Some(app_a), Strict),
                vec![ma("prod", "old", T1, Some(app_a), Permissive)],
                &[],
                vec!["ties with the older MutualAuth prod/old (mode Permissive) at the same level: this one will be Conflicted"],
            ),
            (
                "overlapping selectors on a pod",
                ma("prod", "new", None, Some(app_a), Strict),
                vec![ma("prod", "old", T1, Some(team), Disabled)],
                &pods,
                vec!["ties with the older MutualAuth prod/old (mode Disabled) at the same level on pods a-1: this one will be Conflicted"],
            ),
            (
                "overlapping selectors, same mode",
                ma("prod", "new", None, Some(app_a), Strict),
                vec![ma("prod", "old", T1, Some(team), Strict)],
                &pods,
                vec![],
            ),
            (
                "same scope and mode",
                ma("prod", "new", None, None, Strict),
                vec![ma("prod", "old", T1, None, Strict)],
                &[],
                vec!["has the same scope and mode (Strict) as MutualAuth prod/old: one of them is redundant"],
            ),
        ];
        let mesh = ModelConfig::default();
        for (name, me, existing, pods, want) in cases {
            let got = tie_warnings(&me, &existing, pods, &mesh);
            assert_eq!(got.len(), want.len(), "{name}: {got:#?}");
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.field, "spec", "{name}");
                assert!(g.reason.contains(w), "{name}: {:?} lacks {w:?}", g.reason);
            }
        }
    }

    #[test]
    fn only_pods_a_policy_can_act_on_count_as_selected() {
        let pod = |name: &str, extra: &str| -> Pod {
            serde_yaml::from_str(&format!(
                "metadata: {{name: {name}, namespace: prod}}\nspec: {{serviceAccountName: app, containers: [{{name: c, image: i}}]{extra}}}"
            ))
            .expect("pod")
        };
        let mut finished = pod("finished", "");
        finished.status = serde_yaml::from_str("{phase: Succeeded, podIP: 10.244.1.9}").expect("status");
        let mut running = pod("running", "");
        running.status = serde_yaml::from_str("{phase: Running, podIP: 10.244.1.8}").expect("status");
        let mut mirror = pod("mirror", "");
        mirror.metadata.annotations = Some([("kubernetes.io/config.mirror".to_owned(), "x".to_owned())].into());
        let pods = [pod("host", ", hostNetwork: true"), finished, mirror, pod("pending", ""), running];
        let names: Vec<String> = policy_pods(&pods).into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["pending", "running"]);
    }

    #[test]
    fn selectors_become_api_strings() {
        let s = LabelSelector { match_labels: Some([("app".to_string(), "a".to_string())].into()), match_expressions: None };
        assert_eq!(selector_string(&s).expect("valid"), "app=a");
    }
}
