//! Spec validation beyond what the CRD schema and CEL rules can say.
//! (Being written: see the webhook work.)

use meshauth_crds::{MeshPolicySpec, MutualAuthSpec, TrustDomain};

/// One problem in a spec: the field path (e.g. `spec.ingress[0].from[1].identity`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

/// Every problem of a MeshPolicy spec.
pub fn validate_mesh_policy(_spec: &MeshPolicySpec, _trust_domain: &TrustDomain) -> Vec<FieldError> {
    Vec::new()
}

/// Every problem of a MutualAuth spec.
pub fn validate_mutual_auth(_spec: &MutualAuthSpec) -> Vec<FieldError> {
    Vec::new()
}
