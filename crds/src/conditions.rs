//! Condition types and reasons that meshauth writes into the status of its resources, shared by
//! the operator (which writes them) and the CLI (which reads them).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::Schema;

/// The spec is understood and used. `False` with a reason when it cannot be used.
pub const ACCEPTED: &str = "Accepted";
/// Enforcement of the resource is in place on every node that hosts a selected pod.
pub const READY: &str = "Ready";
/// A `MutualAuth` that lost a tie with an older one at the same level of specificity.
pub const CONFLICTED: &str = "Conflicted";

/// JSON schema of a `conditions` list: a map keyed on `type`, so server-side apply merges one
/// condition at a time instead of replacing the list.
pub fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}
