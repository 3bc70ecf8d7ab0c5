//! `MutualAuth`: whether the selected pods require authenticated peers, like Istio's
//! PeerAuthentication.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The authentication requirement for the pods `selector` picks (every pod of the namespace
/// when omitted; every pod of the mesh when omitted in the operator's namespace).
// Clippy reads two printer columns of the same type as a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "meshauth.io",
    version = "v1alpha1",
    kind = "MutualAuth",
    plural = "mutualauths",
    singular = "mutualauth",
    shortname = "ma",
    namespaced,
    status = "MutualAuthStatus",
    derive = "PartialEq",
    doc = "Whether the selected pods require authenticated peers.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Selected", type_ = "integer", json_path = ".status.selectedPods", description = "pods selected"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct MutualAuthSpec {
    /// Pods of this namespace it applies to. Omitted: every pod of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// `Strict`, `Permissive` or `Disabled`.
    pub mode: MutualAuthMode,
}

/// How strictly selected pods require authenticated peers.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MutualAuthMode {
    /// Only authenticated mesh peers get through.
    Strict,
    /// Handshakes happen; nothing is dropped for lack of them, but it is counted.
    Permissive,
    /// No requirement.
    Disabled,
}

impl MutualAuthMode {
    /// The spelling in the resource.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "Strict",
            Self::Permissive => "Permissive",
            Self::Disabled => "Disabled",
        }
    }
}

/// What the operator observed of a `MutualAuth`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MutualAuthStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many pods this resource decides the mode of right now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i32>,
    /// `Accepted`, `Ready` and, when it lost a tie, `Conflicted`.
    #[serde(default)]
    #[schemars(schema_with = "crate::conditions::conditions_schema")]
    pub conditions: Vec<Condition>,
}
