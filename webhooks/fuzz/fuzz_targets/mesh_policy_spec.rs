//! Structure-aware: arbitrary MeshPolicy and MutualAuth specs (selectors, identities, ports)
//! wrapped in a well-formed AdmissionReview, through decoder, validation and response. Reaches
//! the validation rules far more often than raw bytes do.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshauth_policy::model::ModelConfig;
use meshauth_webhook::admission;
use serde_json::{Map, Value, json};

#[derive(Debug, Arbitrary)]
struct Selector {
    labels: Vec<(String, String)>,
    expressions: Vec<(String, u8, Vec<String>)>,
}

#[derive(Debug, Arbitrary)]
struct Peer {
    pods: Option<Selector>,
    namespaces: Option<Selector>,
    identity: Option<String>,
}

#[derive(Debug, Arbitrary)]
struct Rule {
    from: Vec<Peer>,
    ports: Vec<(i32, Option<i32>, bool)>,
    required: Option<bool>,
}

#[derive(Debug, Arbitrary)]
enum Input {
    MeshPolicy { selector: Selector, ingress: Vec<Rule>, update: bool },
    MutualAuth { selector: Option<Selector>, mode: u8, update: bool },
}

fn selector(s: &Selector) -> Value {
    const OPERATORS: [&str; 5] = ["In", "NotIn", "Exists", "DoesNotExist", "Has"];
    let labels: Map<String, Value> = s.labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let expressions: Vec<Value> = s
        .expressions
        .iter()
        .map(|(key, op, values)| json!({"key": key, "operator": OPERATORS[*op as usize % OPERATORS.len()], "values": values}))
        .collect();
    json!({"matchLabels": labels, "matchExpressions": expressions})
}

fn object(input: &Input) -> (Value, bool) {
    match input {
        Input::MeshPolicy { selector: s, ingress, update } => {
            let ingress: Vec<Value> = ingress
                .iter()
                .map(|r| {
                    let from: Vec<Value> = r
                        .from
                        .iter()
                        .map(|p| {
                            let mut peer = Map::new();
                            if let Some(s) = &p.pods {
                                peer.insert("podSelector".into(), selector(s));
                            }
                            if let Some(s) = &p.namespaces {
                                peer.insert("namespaceSelector".into(), selector(s));
                            }
                            if let Some(id) = &p.identity {
                                peer.insert("identity".into(), json!(id));
                            }
                            Value::Object(peer)
                        })
                        .collect();
                    let ports: Vec<Value> = r
                        .ports
                        .iter()
                        .map(|(port, end, udp)| {
                            let mut v = json!({"port": port, "protocol": if *udp { "UDP" } else { "TCP" }});
                            if let Some(end) = end {
                                v["endPort"] = json!(end);
                            }
                            v
                        })
                        .collect();
                    let mut rule = json!({"from": from, "ports": ports});
                    if let Some(required) = r.required {
                        rule["authentication"] = json!({"mode": if required { "Required" } else { "Disabled" }});
                    }
                    rule
                })
                .collect();
            let spec = json!({"selector": selector(s), "ingress": ingress});
            (json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MeshPolicy", "metadata": {"name": "p", "namespace": "ns"}, "spec": spec}), *update)
        }
        Input::MutualAuth { selector: s, mode, update } => {
            const MODES: [&str; 3] = ["Strict", "Permissive", "Disabled"];
            let mut spec = json!({"mode": MODES[*mode as usize % MODES.len()]});
            if let Some(s) = s {
                spec["selector"] = selector(s);
            }
            (json!({"apiVersion": "meshauth.io/v1alpha1", "kind": "MutualAuth", "metadata": {"name": "m", "namespace": "ns"}, "spec": spec}), *update)
        }
    }
}

fuzz_target!(|input: Input| {
    let (object, update) = object(&input);
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u",
            "kind": {"group": "meshauth.io", "version": "v1alpha1", "kind": object["kind"]},
            "resource": {"group": "meshauth.io", "version": "v1alpha1", "resource": "x"},
            "name": object["metadata"]["name"],
            "namespace": "ns",
            "operation": if update { "UPDATE" } else { "CREATE" },
            "userInfo": {},
            "object": object
        }
    });
    let body = serde_json::to_vec(&review).expect("encodes");
    let review = admission::decode(Some("application/json"), &body).expect("a well-formed review decodes");
    let findings = admission::check(&review.subject, &ModelConfig::default());
    for e in findings.errors.iter().chain(&findings.warnings) {
        assert!(e.field.is_empty() || e.field.starts_with("spec"), "{e}");
        assert!(!e.reason.is_empty());
    }
    let response = admission::respond(&review, &findings);
    assert_eq!(response.allowed, findings.errors.is_empty());
    admission::encode(response).expect("a response always encodes");
});
