//! AdmissionReview v1 in, AdmissionResponse out: the request decoder (strict about what it
//! accepts, never panicking on what it gets — it is fuzzed), the static checks of the shared
//! policy crate, and the response with a denial message that names each bad field and why.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::response::{StatusCause, StatusDetails, StatusSummary};
use meshauth_crds::{MeshPolicy, MutualAuth};
use meshauth_policy::model::{Inputs, ModelConfig, PolicyModel, Resource};
use meshauth_policy::validate::{self, FieldError};

use crate::metrics::{KindLabel, OperationLabel};

/// The only AdmissionReview version served.
pub const ADMISSION_API_VERSION: &str = "admission.k8s.io/v1";
/// The kind of the envelope.
pub const ADMISSION_KIND: &str = "AdmissionReview";
/// At most this many warnings go back to the client; the rest are summarised in one line.
pub const MAX_WARNINGS: usize = 10;
/// At most this many errors are listed in a denial; the rest are counted.
pub const MAX_ERRORS: usize = 20;

/// Why a request is not an AdmissionReview this webhook answers. Each maps to a 4xx.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the Content-Type header is missing; send application/json")]
    NoContentType,
    #[error("Content-Type {0:?} is not supported; send application/json")]
    ContentType(String),
    #[error("the body is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("expected kind {ADMISSION_KIND:?} of apiVersion {ADMISSION_API_VERSION:?}, got kind {kind:?} of apiVersion {api_version:?}")]
    WrongType { kind: String, api_version: String },
    #[error("malformed AdmissionReview: {0}")]
    Review(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("request.uid is empty")]
    NoUid,
    #[error("this webhook validates MeshPolicy and MutualAuth of meshauth.io/v1alpha1, not {0}")]
    WrongKind(String),
    #[error("a {0} request must carry request.object")]
    NoObject(&'static str),
}

impl DecodeError {
    /// The HTTP status the request gets.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::NoContentType | Self::ContentType(_) => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// The two kinds this webhook validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    MeshPolicy,
    MutualAuth,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MeshPolicy => "MeshPolicy",
            Self::MutualAuth => "MutualAuth",
        }
    }

    pub fn label(self) -> KindLabel {
        match self {
            Self::MeshPolicy => KindLabel::MeshPolicy,
            Self::MutualAuth => KindLabel::MutualAuth,
        }
    }
}

/// What a review asks to check.
#[derive(Debug, Clone)]
pub enum Subject {
    /// Nothing to check: a delete, a connect, or a write to a subresource such as `status`.
    Skip(&'static str),
    MeshPolicy(Box<MeshPolicy>),
    MutualAuth(Box<MutualAuth>),
    /// The object does not fit the CRD's types (the field and why).
    Unreadable(FieldError),
}

/// A decoded admission request.
#[derive(Debug, Clone)]
pub struct Review {
    pub request: AdmissionRequest<DynamicObject>,
    pub kind: ResourceKind,
    pub subject: Subject,
}

impl Review {
    pub fn operation_label(&self) -> OperationLabel {
        operation_label(&self.request.operation)
    }

    /// `namespace/name`, for messages and logs.
    pub fn object_name(&self) -> String {
        let name = if self.request.name.is_empty() {
            self.request
                .object
                .as_ref()
                .and_then(|o| o.metadata.generate_name.as_deref())
                .map(|g| format!("{g}<generated>"))
                .unwrap_or_else(|| "<unnamed>".into())
        } else {
            self.request.name.clone()
        };
        match self.request.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
            _ => name,
        }
    }
}

pub fn operation_label(op: &Operation) -> OperationLabel {
    match op {
        Operation::Create => OperationLabel::CREATE,
        Operation::Update => OperationLabel::UPDATE,
        Operation::Delete => OperationLabel::DELETE,
        Operation::Connect => OperationLabel::CONNECT,
    }
}

/// Whether a Content-Type header value is JSON (`application/json`, any parameters).
pub fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Decodes an AdmissionReview v1 request body.
pub fn decode(content_type: Option<&str>, body: &[u8]) -> Result<Review, DecodeError> {
    match content_type {
        None => return Err(DecodeError::NoContentType),
        Some(ct) if !is_json(ct) => return Err(DecodeError::ContentType(truncate(ct, 100))),
        Some(_) => {}
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(DecodeError::Json)?;
    let Some(envelope) = value.as_object() else {
        return Err(DecodeError::NotAnObject);
    };
    let text = |key: &str| envelope.get(key).and_then(|v| v.as_str()).unwrap_or_default();
    let (kind, api_version) = (text("kind"), text("apiVersion"));
    if kind != ADMISSION_KIND || api_version != ADMISSION_API_VERSION {
        return Err(DecodeError::WrongType { kind: truncate(kind, 100), api_version: truncate(api_version, 100) });
    }
    let review: AdmissionReview<DynamicObject> =
        serde_path_to_error::deserialize(value).map_err(|e| DecodeError::Review(truncate(&e.to_string(), 300)))?;
    let request: AdmissionRequest<DynamicObject> = review.try_into().map_err(|_| DecodeError::NoRequest)?;
    if request.uid.is_empty() {
        return Err(DecodeError::NoUid);
    }
    let gvk = &request.kind;
    let kind = match (gvk.group.as_str(), gvk.version.as_str(), gvk.kind.as_str()) {
        (meshauth_crds::GROUP, meshauth_crds::VERSION, "MeshPolicy") => ResourceKind::MeshPolicy,
        (meshauth_crds::GROUP, meshauth_crds::VERSION, "MutualAuth") => ResourceKind::MutualAuth,
        (group, version, kind) => {
            return Err(DecodeError::WrongKind(truncate(&format!("{kind} of {group}/{version}"), 200)));
        }
    };
    let subject = match (&request.operation, request.sub_resource.as_deref()) {
        (Operation::Delete, _) => Subject::Skip("a delete has nothing to validate"),
        (Operation::Connect, _) => Subject::Skip("a connect has nothing to validate"),
        (_, Some(sub)) if !sub.is_empty() => Subject::Skip("subresource writes (status) are not validated"),
        (Operation::Create | Operation::Update, _) => {
            let op = if request.operation == Operation::Create { "CREATE" } else { "UPDATE" };
            let object = request.object.as_ref().ok_or(DecodeError::NoObject(op))?;
            typed(kind, object)
        }
    };
    Ok(Review { request, kind, subject })
}

fn typed(kind: ResourceKind, object: &DynamicObject) -> Subject {
    let value = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return Subject::Unreadable(FieldError::new("", e.to_string())),
    };
    let unreadable = |e: serde_path_to_error::Error<serde_json::Error>| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        Subject::Unreadable(FieldError::new(field, truncate(&e.into_inner().to_string(), 200)))
    };
    match kind {
        ResourceKind::MeshPolicy => {
            serde_path_to_error::deserialize::<_, MeshPolicy>(value).map(|p| Subject::MeshPolicy(Box::new(p))).unwrap_or_else(unreadable)
        }
        ResourceKind::MutualAuth => {
            serde_path_to_error::deserialize::<_, MutualAuth>(value).map(|m| Subject::MutualAuth(Box::new(m))).unwrap_or_else(unreadable)
        }
    }
}

/// What the checks found: errors deny, warnings pass to the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<FieldError>,
    pub warnings: Vec<FieldError>,
}

/// The checks that need no API: the shared validation rules and whatever the shared policy
/// model reports about the object on its own.
pub fn check(subject: &Subject, mesh: &ModelConfig) -> Findings {
    match subject {
        Subject::Skip(_) => Findings::default(),
        Subject::Unreadable(e) => {
            Findings { errors: vec![FieldError::new(e.field.clone(), format!("cannot be read: {}", e.reason))], warnings: Vec::new() }
        }
        Subject::MeshPolicy(p) => {
            let limits = validate::mesh_policy_limits(&p.spec);
            if !limits.is_empty() {
                // Refused whole: the model is not built from an object of any size.
                return Findings { errors: limits, warnings: Vec::new() };
            }
            let mut errors = validate::validate_mesh_policy(&p.spec, &mesh.trust_domain);
            let inputs = Inputs { mesh_policies: vec![Resource::from_mesh_policy(p)], ..Default::default() };
            add_model_problems(&mut errors, mesh, inputs);
            Findings { errors, warnings: validate::mesh_policy_warnings(&p.spec, &mesh.trust_domain) }
        }
        Subject::MutualAuth(m) => {
            let mut errors = validate::validate_mutual_auth(&m.spec);
            let inputs = Inputs { mutual_auths: vec![Resource::from_mutual_auth(m)], ..Default::default() };
            add_model_problems(&mut errors, mesh, inputs);
            Findings { errors, warnings: validate::mutual_auth_warnings(&m.spec) }
        }
    }
}

/// The model reports the validator's errors too; add only what it finds beyond them.
fn add_model_problems(errors: &mut Vec<FieldError>, mesh: &ModelConfig, inputs: Inputs) {
    let model = PolicyModel::new(mesh.clone(), inputs);
    for problem in model.problems() {
        let covered = errors
            .iter()
            .any(|e| e == &problem.error || e.field.starts_with(&problem.error.field) || problem.error.field.starts_with(&e.field));
        if !covered {
            errors.push(problem.error.clone());
        }
    }
}

/// The response to a review: denied with every error, or allowed with the warnings.
pub fn respond(review: &Review, findings: &Findings) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(&review.request);
    if !findings.errors.is_empty() {
        let mut listed: Vec<String> = findings.errors.iter().take(MAX_ERRORS).map(ToString::to_string).collect();
        if findings.errors.len() > MAX_ERRORS {
            listed.push(format!("and {} more errors", findings.errors.len() - MAX_ERRORS));
        }
        let message = format!("{} {} is invalid: {}", review.kind.as_str(), review.object_name(), listed.join("; "));
        response = response.deny(message);
        response.result.status = Some(StatusSummary::Failure);
        response.result.code = 422;
        response.result.reason = "Invalid".into();
        response.result.details = Some(StatusDetails {
            name: review.request.name.clone(),
            group: meshauth_crds::GROUP.into(),
            kind: review.kind.as_str().into(),
            uid: String::new(),
            causes: findings
                .errors
                .iter()
                .take(MAX_ERRORS)
                .map(|e| StatusCause { reason: "FieldValueInvalid".into(), message: e.reason.clone(), field: e.field.clone() })
                .collect(),
            retry_after_seconds: 0,
        });
    }
    if !findings.warnings.is_empty() {
        let mut warnings: Vec<String> = findings.warnings.iter().take(MAX_WARNINGS).map(|w| truncate(&w.to_string(), 250)).collect();
        if findings.warnings.len() > MAX_WARNINGS {
            warnings.push(format!("and {} more warnings", findings.warnings.len() - MAX_WARNINGS));
        }
        response.warnings = Some(warnings);
    }
    response
}

/// The response body.
pub fn encode(response: AdmissionResponse) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&response.into_review())
}

pub use meshauth_policy::validate::truncate;

#[cfg(test)]
pub(crate) mod testing {
    //! AdmissionReview bodies for tests.
    use serde_json::{Value, json};

    /// A review of `object` (a MeshPolicy or MutualAuth as JSON).
    pub fn review(operation: &str, object: Value) -> Value {
        let kind = object["kind"].as_str().unwrap_or("MeshPolicy").to_owned();
        let resource = if kind == "MutualAuth" { "mutualauths" } else { "meshpolicies" };
        let name = object["metadata"]["name"].clone();
        let namespace = object["metadata"]["namespace"].clone();
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "meshauth.io", "version": "v1alpha1", "kind": kind},
                "resource": {"group": "meshauth.io", "version": "v1alpha1", "resource": resource},
                "name": name,
                "namespace": namespace,
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false
            }
        })
    }

    pub fn mesh_policy(spec: Value) -> Value {
        json!({
            "apiVersion": "meshauth.io/v1alpha1",
            "kind": "MeshPolicy",
            "metadata": {"name": "payment-ingress", "namespace": "production"},
            "spec": spec
        })
    }

    pub fn mutual_auth(name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "meshauth.io/v1alpha1",
            "kind": "MutualAuth",
            "metadata": {"name": name, "namespace": "production"},
            "spec": spec
        })
    }

    pub fn body(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)] // the case tables
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::json;

    const JSON: Option<&str> = Some("application/json");

    fn valid_policy() -> serde_json::Value {
        mesh_policy(json!({
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{
                "from": [
                    {"podSelector": {"matchLabels": {"app": "order-service"}}, "namespaceSelector": {"matchLabels": {"team": "shop"}}},
                    {"identity": "spiffe://cluster.local/ns/shop/sa/order"}
                ],
                "ports": [{"port": 8080, "protocol": "TCP"}],
                "authentication": {"mode": "Required"}
            }]
        }))
    }

    fn run(body: &[u8]) -> AdmissionResponse {
        let review = decode(JSON, body).expect("decodes");
        respond(&review, &check(&review.subject, &ModelConfig::default()))
    }

    #[test]
    fn decode_errors() {
        let good = body(&review("CREATE", valid_policy()));
        let mut no_request = review("CREATE", valid_policy());
        no_request.as_object_mut().map(|o| o.remove("request"));
        let mut no_object = review("UPDATE", valid_policy());
        no_object["request"].as_object_mut().map(|o| o.remove("object"));
        let mut no_uid = review("CREATE", valid_policy());
        no_uid["request"]["uid"] = json!("");
        let mut pod = review("CREATE", valid_policy());
        pod["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Pod"});
        let mut other_version = review("CREATE", valid_policy());
        other_version["request"]["kind"]["version"] = json!("v1beta1");
        let mut v1beta1 = review("CREATE", valid_policy());
        v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let mut bad_operation = review("CREATE", valid_policy());
        bad_operation["request"]["operation"] = json!("PATCH");
        let cases: Vec<(&str, Option<&str>, Vec<u8>, u16, &str)> = vec![
            ("no content type", None, good.clone(), 415, "Content-Type header is missing"),
            ("form content type", Some("application/x-www-form-urlencoded"), good.clone(), 415, "not supported"),
            ("yaml content type", Some("application/yaml"), good.clone(), 415, "not supported"),
            ("malformed JSON", JSON, b"{\"apiVersion\": ".to_vec(), 400, "not valid JSON"),
            ("empty body", JSON, Vec::new(), 400, "not valid JSON"),
            ("not an object", JSON, b"[1,2]".to_vec(), 400, "not a JSON object"),
            ("other kind", JSON, br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec(), 400, "got kind \"Pod\" of apiVersion \"v1\""),
            ("v1beta1", JSON, body(&v1beta1), 400, "apiVersion \"admission.k8s.io/v1beta1\""),
            ("no request", JSON, body(&no_request), 400, "has no request"),
            ("no object", JSON, body(&no_object), 400, "a UPDATE request must carry request.object"),
            ("no uid", JSON, body(&no_uid), 400, "request.uid is empty"),
            ("pod", JSON, body(&pod), 400, "not Pod of /v1"),
            ("other CRD version", JSON, body(&other_version), 400, "not MeshPolicy of meshauth.io/v1beta1"),
            ("unknown operation", JSON, body(&bad_operation), 400, "malformed AdmissionReview: request.operation"),
        ];
        for (name, content_type, body, status, message) in cases {
            let err = decode(content_type, &body).expect_err(name);
            assert_eq!(err.status().as_u16(), status, "{name}: {err}");
            assert!(err.to_string().contains(message), "{name}: {err:?} lacks {message:?}");
        }
    }

    #[test]
    fn content_type_parameters_are_accepted() {
        let good = body(&review("CREATE", valid_policy()));
        for ct in ["application/json", "application/json; charset=utf-8", "Application/JSON"] {
            decode(Some(ct), &good).unwrap_or_else(|e| panic!("{ct}: {e}"));
        }
    }

    #[test]
    fn valid_objects_are_allowed_and_echo_the_uid() {
        for op in ["CREATE", "UPDATE"] {
            let response = run(&body(&review(op, valid_policy())));
            assert!(response.allowed, "{op}: {response:?}");
            assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
            assert_eq!(response.warnings, None);
            let ma = mutual_auth("default", json!({"mode": "Strict"}));
            assert!(run(&body(&review(op, ma))).allowed);
        }
        let encoded = encode(run(&body(&review("CREATE", valid_policy())))).expect("encode");
        let v: serde_json::Value = serde_json::from_slice(&encoded).expect("json");
        assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(v["kind"], "AdmissionReview");
        assert_eq!(v["response"]["allowed"], true);
        assert_eq!(v["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    }

    #[test]
    fn an_audited_policy_is_allowed_with_a_warning_that_says_it_drops_nothing() {
        let mut audited = valid_policy();
        audited["spec"]["enforcement"] = json!("Audit");
        let response = run(&body(&review("CREATE", audited)));
        assert!(response.allowed, "{response:?}");
        let warnings = response.warnings.unwrap_or_default();
        assert!(
            warnings.iter().any(|w| w.contains("spec.enforcement") && w.contains("drop nothing") && w.contains("AUDIT")),
            "{warnings:?}"
        );
        let mut bad = valid_policy();
        bad["spec"]["enforcement"] = json!("DryRun");
        let response = run(&body(&review("CREATE", bad)));
        assert!(!response.allowed, "an unknown enforcement passed: {response:?}");
    }

    #[test]
    fn invalid_objects_are_denied_with_field_and_reason() {
        let policy = mesh_policy(json!({
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{"from": [{"identity": "spiffe://cluster.local/ns/shop/sa/order/"}], "ports": [{"port": 8080, "endPort": 80}]}]
        }));
        let response = run(&body(&review("CREATE", policy)));
        assert!(!response.allowed);
        let msg = &response.result.message;
        assert!(msg.starts_with("MeshPolicy production/payment-ingress is invalid: "), "{msg}");
        assert!(msg.contains("spec.ingress[0].from[0].identity: \"spiffe://cluster.local/ns/shop/sa/order/\" is not a valid SPIFFE ID: path ends with a slash"), "{msg}");
        assert!(msg.contains("spec.ingress[0].ports[0].endPort: must be greater than or equal to port (8080), not 80"), "{msg}");
        assert_eq!(response.result.code, 422);
        let causes = &response.result.details.as_ref().expect("details").causes;
        assert_eq!(causes.len(), 2);
        assert_eq!(causes[0].field, "spec.ingress[0].from[0].identity");

        let ma = mutual_auth("x", json!({"mode": "Strict", "selector": {"matchExpressions": [{"key": "app", "operator": "Is"}]}}));
        let response = run(&body(&review("UPDATE", ma)));
        assert!(!response.allowed);
        assert!(
            response.result.message.contains("spec.selector.matchExpressions[0].operator: \"Is\" is not a label selector operator"),
            "{}",
            response.result.message
        );
    }

    /// A tenant's one namespaced policy that would multiply into more entries than the policy
    /// map holds: every namespace as source and 10,000 ports.
    #[test]
    fn an_oversized_policy_is_denied_naming_the_limit() {
        let ports: Vec<serde_json::Value> = (0..10_000).map(|i| json!({"port": 1 + i})).collect();
        let policy = mesh_policy(json!({
            "selector": {},
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": ports}]
        }));
        let response = run(&body(&review("CREATE", policy)));
        assert!(!response.allowed);
        let msg = &response.result.message;
        assert!(msg.contains("spec.ingress[0].ports: has 10000 entries, more than the limit of 64 entries per rule"), "{msg}");
        assert!(msg.contains("more than the limit of 1024 port blocks per MeshPolicy"), "{msg}");
        assert!(msg.len() < 2000, "the denial stays short: {} bytes", msg.len());
    }

    #[test]
    fn a_denial_lists_a_bounded_number_of_errors() {
        let ports: Vec<serde_json::Value> = (0..60).map(|_| json!({"port": 0})).collect();
        let policy = mesh_policy(json!({"selector": {}, "ingress": [{"ports": ports}]}));
        let response = run(&body(&review("CREATE", policy)));
        assert!(!response.allowed);
        assert!(response.result.message.ends_with(&format!("and {} more errors", 60 - MAX_ERRORS)), "{}", response.result.message);
        assert_eq!(response.result.details.as_ref().expect("details").causes.len(), MAX_ERRORS);
    }

    #[test]
    fn an_identity_of_another_trust_domain_is_allowed_with_a_warning() {
        let policy = mesh_policy(json!({
            "selector": {"matchLabels": {"app": "payment-service"}},
            "ingress": [{"from": [{"identity": "spiffe://example.org/ns/shop/sa/order"}], "authentication": {"mode": "Required"}}]
        }));
        let response = run(&body(&review("CREATE", policy)));
        assert!(response.allowed, "{}", response.result.message);
        let warnings = response.warnings.expect("warnings");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("spec.ingress[0].from[0].identity: can never match"), "{warnings:?}");
        assert!(warnings[0].contains("no peer can prove it until that trust domain is federated"), "{warnings:?}");
    }

    #[test]
    fn objects_that_do_not_fit_the_types_are_denied_with_the_path() {
        let policy = mesh_policy(json!({"selector": {}, "ingress": [{"ports": [{"port": "http"}]}]}));
        let response = run(&body(&review("CREATE", policy)));
        assert!(!response.allowed);
        assert!(response.result.message.contains("spec.ingress[0].ports[0].port: cannot be read"), "{}", response.result.message);
        let ma = mutual_auth("x", json!({"mode": "Sometimes"}));
        let response = run(&body(&review("CREATE", ma)));
        assert!(response.result.message.contains("spec.mode: cannot be read: unknown variant `Sometimes`"), "{}", response.result.message);
    }

    #[test]
    fn warnings_reach_the_response() {
        let ma = mutual_auth("x", json!({"mode": "Strict", "selector": {}}));
        let response = run(&body(&review("CREATE", ma)));
        assert!(response.allowed);
        let warnings = response.warnings.expect("warnings");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("spec.selector: is empty"), "{warnings:?}");
    }

    #[test]
    fn deletes_and_status_writes_are_allowed_unchecked() {
        let mut delete = review("DELETE", valid_policy());
        delete["request"]["object"] = json!(null);
        let review_ = decode(JSON, &body(&delete)).expect("decodes");
        assert!(matches!(review_.subject, Subject::Skip(_)));
        let mut status = review("UPDATE", mesh_policy(json!({"selector": {"matchLabels": {"bad key": "x"}}})));
        status["request"]["subResource"] = json!("status");
        assert!(run(&body(&status)).allowed);
    }

    #[test]
    fn generated_names_are_shown() {
        let mut obj = valid_policy();
        obj["metadata"] = json!({"generateName": "p-", "namespace": "production"});
        let mut r = review("CREATE", obj);
        r["request"]["name"] = json!("");
        let review_ = decode(JSON, &body(&r)).expect("decodes");
        assert_eq!(review_.object_name(), "production/p-<generated>");
    }
}
