//! A MeshPolicy rule naming an identity of another trust domain is admitted (valid SPIFFE), and
//! the compiled tables never let anybody through as that identity: no SPIFFE number is handed out
//! for it, no policy entry admits a source for it, and no pair with it is pre-authenticated —
//! not even the mesh pod whose identity has the same path in the mesh's own trust domain.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use meshauth_crds::{Authentication, AuthenticationMode, IngressRule, MeshPolicySpec, PeerSelector, PortRule, Protocol};
use meshauth_policy::compile::{NumberAllocator, auth_identity_pairs, compile};
use meshauth_policy::model::{Inputs, ModelConfig, ObjectRef, PodInfo, PolicyModel, Resource, Source, Verdict};
use meshauth_policy::tables::TableProtocol;

const FOREIGN: &str = "spiffe://example.org/ns/shop/sa/order";

fn pod(namespace: &str, name: &str, app: &str, service_account: &str, ip: [u8; 4]) -> PodInfo {
    PodInfo {
        namespace: namespace.into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), app.to_string())]),
        service_account: service_account.into(),
        ip: Some(ip.into()),
        node: Some("node-a".into()),
    }
}

#[test]
fn a_foreign_trust_domain_identity_gets_no_number_no_entry_and_no_pair() {
    let spec = MeshPolicySpec {
        selector: LabelSelector { match_labels: Some([("app".to_string(), "payment".to_string())].into()), match_expressions: None },
        ingress: vec![IngressRule {
            from: vec![PeerSelector { identity: Some(FOREIGN.into()), ..Default::default() }],
            ports: vec![PortRule { port: 8080, end_port: None, protocol: Protocol::Tcp }],
            authentication: Some(Authentication { mode: AuthenticationMode::Required }),
        }],
        ..Default::default()
    };
    let inputs = Inputs {
        pods: vec![
            // Same namespace and service account as the foreign ID, in the mesh's trust domain.
            pod("shop", "order-1", "order", "order", [10, 0, 0, 1]),
            pod("prod", "payment-1", "payment", "payment", [10, 0, 0, 2]),
        ],
        mesh_policies: vec![Resource { namespace: "prod".into(), name: "foreign".into(), created: None, spec }],
        ..Default::default()
    };
    let model = PolicyModel::new(ModelConfig::default(), inputs);
    assert!(model.problems().is_empty(), "valid SPIFFE is admitted: {:?}", model.problems());

    let tables = compile(&model, &mut NumberAllocator::default());
    assert!(
        tables.spiffe_ids.iter().all(|(_, id)| id.starts_with("spiffe://cluster.local/")),
        "only mesh identities are numbered: {:?}",
        tables.spiffe_ids
    );
    let payment = tables.endpoints.iter().find(|e| e.pod == "prod/payment-1").expect("payment endpoint");
    assert!(payment.isolated, "the policy still selects payment");
    assert!(
        tables.policy.iter().all(|p| p.dst_identity != payment.security_identity),
        "no source is admitted to payment through the foreign identity: {:?}",
        tables.policy
    );
    let to = ObjectRef::new("prod", "payment-1");
    let decision = model.decide(&Source::Pod(ObjectRef::new("shop", "order-1")), &to, TableProtocol::Tcp, 8080).expect("decides");
    assert_eq!(decision.verdict, Verdict::Deny, "the mesh pod with the same path is not the foreign identity");
    let pairs = auth_identity_pairs(&model, |_| true);
    assert!(pairs.iter().all(|p| p.src_spiffe_id != FOREIGN && p.dst_spiffe_id != FOREIGN), "{pairs:?}");
}
