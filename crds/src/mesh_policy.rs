//! `MeshPolicy`: NetworkPolicy-style ingress rules for the pods it selects, each rule optionally
//! requiring an authenticated peer.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Ingress rules for the pods that `selector` picks in the policy's namespace.
// Clippy reads two printer columns of the same type as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "meshauth.io",
    version = "v1alpha1",
    kind = "MeshPolicy",
    plural = "meshpolicies",
    singular = "meshpolicy",
    shortname = "mp",
    namespaced,
    status = "MeshPolicyStatus",
    derive = "PartialEq",
    doc = "Ingress rules, optionally requiring authenticated peers, for the pods a selector picks.",
    printcolumn(
        name = "Selector",
        type_ = "string",
        json_path = ".spec.selector.matchLabels",
        description = "labels of the selected pods"
    ),
    printcolumn(
        name = "Enforcement",
        type_ = "string",
        json_path = ".spec.enforcement",
        description = "Enforce, or Audit: what it would deny passes and is counted"
    ),
    printcolumn(name = "Selected", type_ = "integer", json_path = ".status.selectedPods", description = "pods selected"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicySpec {
    /// `Enforce` (default): the selected pods accept only what the rules allow. `Audit`: the
    /// policy isolates nothing; what it would deny passes, is counted and reported as AUDIT,
    /// and the handshakes its rules require still happen. A pod that an enforced MeshPolicy
    /// selects is isolated by that one, and the audited ones add nothing to it.
    #[serde(default)]
    pub enforcement: Enforcement,
    /// Pods of this namespace the policy applies to. Required; `{}` selects every pod.
    pub selector: LabelSelector,
    /// Allowed ingress. A selected pod accepts only traffic some rule matches. At most 64 rules.
    // The size limits are `meshauth_policy::validate::MAX_*` (a test there keeps these equal).
    // The totals over all rules are checked here too, so that the API server refuses an
    // oversized object even while the webhook is unreachable; the port blocks they split into
    // are the webhook's alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(
        validation = Rule::new("self.map(r, has(r.from) ? size(r.from) : 0).sum() <= 256")
            .message("more than the limit of 256 from entries over all rules of a MeshPolicy"),
        validation = Rule::new("self.map(r, has(r.ports) ? size(r.ports) : 0).sum() <= 256")
            .message("more than the limit of 256 ports entries over all rules of a MeshPolicy")
    )]
    pub ingress: Vec<IngressRule>,
}

/// One ingress rule: which sources, which ports, and whether they must authenticate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// Sources this rule admits. Omitted or empty: any source. At most 64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub from: Vec<PeerSelector>,
    /// Destination ports this rule admits. Omitted or empty: every port and protocol. At most 64.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ports: Vec<PortRule>,
    /// Whether traffic this rule admits must come from an authenticated peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<Authentication>,
}

/// A set of source pods (by labels, in this or selected namespaces) or one exact SPIFFE ID.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.identity) != (has(self.podSelector) || has(self.namespaceSelector))"
).message("a from entry has either podSelector/namespaceSelector or identity, not both and not neither"))]
pub struct PeerSelector {
    /// Source pods by labels; in the policy's namespace unless `namespaceSelector` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces whose pods are sources (combined with `podSelector` when both are set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// One exact source SPIFFE ID, e.g. `spiffe://cluster.local/ns/shop/sa/order`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('spiffe://')").message("identity must be a SPIFFE ID starting with spiffe://"))]
    #[schemars(length(max = 2048))]
    pub identity: Option<String>,
}

/// A destination port or port range.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.endPort) || self.endPort >= self.port").message("endPort must be greater than or equal to port"))]
pub struct PortRule {
    /// The destination port (1–65535), or the first of a range when `endPort` is set.
    #[schemars(range(min = 1, max = 65535))]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 65535").message("port must be between 1 and 65535"))]
    pub port: i32,
    /// The last port of the range, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
    /// `TCP` (default) or `UDP`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// Whether a MeshPolicy is enforced or only audited.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Enforcement {
    /// Traffic no rule allows is dropped.
    #[default]
    Enforce,
    /// Traffic no rule allows (or that lacks the authentication a rule requires) passes, and
    /// is counted and reported as AUDIT.
    Audit,
}

impl std::fmt::Display for Enforcement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Enforcement::Enforce => "Enforce",
            Enforcement::Audit => "Audit",
        })
    }
}

/// A transport protocol a port rule applies to.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

/// Whether the sources of a rule must authenticate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Authentication {
    /// `Required` or `Disabled` (default).
    #[serde(default)]
    pub mode: AuthenticationMode,
}

/// A rule's authentication requirement.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthenticationMode {
    Required,
    #[default]
    Disabled,
}

impl AuthenticationMode {
    /// The spelling in the resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "Required",
            Self::Disabled => "Disabled",
        }
    }
}

/// What the operator observed of a `MeshPolicy`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many pods the selector picks right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i32>,
    /// The enforcement the agents apply (`spec.enforcement` of the observed generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// `Accepted` and `Ready`.
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}
