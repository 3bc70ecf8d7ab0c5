//! The reconciler against a scripted API server (`tower_test::mock`, in the controller-rs
//! style: every request is asserted by method, path and body) and the in-memory SPIRE.

use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::client::Body;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use meshauth_crds::{
    Authentication, AuthenticationMode, IngressRule, MeshPolicy, MeshPolicySpec, MutualAuth, MutualAuthMode, MutualAuthSpec, PeerSelector,
};
use meshauth_policy::model::ModelConfig;
use serde_json::Value;
use tower_test::mock::Handle;

use super::*;
use crate::registration::NODE_AGENT_ID_ANNOTATION;
use crate::spire::fake::FakeSpire;
use crate::spire::{EntrySpec, Selector};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// The scripted API server: each `expect` takes the next request, checks it, answers.
struct ApiServer(ApiHandle);

impl ApiServer {
    async fn expect(&mut self, method: Method, path: &str, answer: impl FnOnce(&Value) -> Value) -> Value {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("no {method} {path} request arrived"))
            .expect("client alive");
        assert_eq!(req.method(), method, "{}", req.uri());
        let uri = req.uri().to_string();
        assert!(uri.starts_with(path), "expected {path}, got {uri}");
        let bytes = req.into_body().collect_bytes().await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let out = answer(&body);
        send.send_response(Response::builder().body(Body::from(serde_json::to_vec(&out).expect("json"))).expect("response"));
        body
    }

    async fn expect_nothing(&mut self) {
        if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), self.0.next_request()).await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    }
}

fn settings() -> EntrySettings {
    EntrySettings {
        trust_domain: Default::default(),
        cluster_name: "c".into(),
        selectors: vec![Selector::parse("unix:uid:0").expect("valid")],
        x509_svid_ttl: 120,
    }
}

fn context(spire: Arc<FakeSpire>) -> (Context<FakeSpire>, ApiServer) {
    // The nodes' annotated agents are ones SPIRE attested on those very nodes (k8s_psat).
    for n in ["n1", "n2"] {
        spire.add_agent(crate::spire::AttestedAgent {
            id: format!("spiffe://cluster.local/agent/{n}"),
            attestation_type: "k8s_psat".into(),
            selectors: vec![Selector { kind: "k8s_psat".into(), value: format!("agent_node_name:{n}") }],
            banned: false,
        });
    }
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::new(
        client,
        spire,
        Metrics::new(),
        Reporter { controller: "meshauth-operator".into(), instance: Some("test".into()) },
        ModelConfig::default(),
        settings(),
        Duration::from_secs(60),
    );
    (ctx, ApiServer(handle))
}

fn store_of<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let (reader, mut writer) = reflector::store();
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::Apply(o));
    }
    reader
}

fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: ns.map(Into::into),
        name: Some(name.into()),
        generation: Some(2),
        creation_timestamp: Some(Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).expect("valid"))),
        ..Default::default()
    }
}

fn pod(name: &str, app: &str, node: &str, ip: &str) -> Pod {
    let mut m = meta(Some("shop"), name);
    m.labels = Some([("app".to_owned(), app.to_owned())].into());
    Pod {
        metadata: m,
        spec: Some(PodSpec { service_account_name: Some(app.into()), node_name: Some(node.into()), ..Default::default() }),
        status: Some(PodStatus { pod_ip: Some(ip.into()), phase: Some("Running".into()), ..Default::default() }),
    }
}

fn node(name: &str) -> Node {
    let mut m = meta(None, name);
    m.annotations = Some([(NODE_AGENT_ID_ANNOTATION.to_owned(), format!("spiffe://cluster.local/agent/{name}"))].into());
    Node { metadata: m, ..Default::default() }
}

fn policy(identity: Option<&str>) -> MeshPolicy {
    let mut p = MeshPolicy::new(
        "pay",
        MeshPolicySpec {
            selector: LabelSelector { match_labels: Some([("app".to_owned(), "pay".to_owned())].into()), ..Default::default() },
            ingress: vec![IngressRule {
                from: identity.map(|i| vec![PeerSelector { identity: Some(i.into()), ..Default::default() }]).unwrap_or_default(),
                ports: vec![],
                authentication: Some(Authentication { mode: AuthenticationMode::Required }),
            }],
            ..Default::default()
        },
    );
    p.metadata = meta(Some("shop"), "pay");
    p
}

fn stores(policies: Vec<MeshPolicy>, mutual_auths: Vec<MutualAuth>) -> Stores {
    Stores {
        pods: store_of(vec![pod("pay-1", "pay", "n1", "10.0.0.1"), pod("order-1", "order", "n2", "10.0.0.2")]),
        namespaces: store_of(vec![Namespace { metadata: meta(None, "shop"), ..Default::default() }]),
        nodes: store_of(vec![node("n1"), node("n2")]),
        mesh_policies: store_of(policies),
        mutual_auths: store_of(mutual_auths),
    }
}

fn entry(id: &str, node: &str) -> EntrySpec {
    EntrySpec::new(
        format!("spiffe://cluster.local/ns/shop/sa/{id}"),
        format!("spiffe://cluster.local/agent/{node}"),
        vec![Selector::parse("unix:uid:0").expect("valid")],
        120,
    )
}

fn condition<'a>(status: &'a Value, t: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == t))
        .unwrap_or_else(|| panic!("no {t} condition in {status}"))
}

const MP_STATUS: &str = "/apis/meshauth.io/v1alpha1/namespaces/shop/meshpolicies/pay/status?";

#[tokio::test]
async fn registers_both_identities_of_an_authenticated_pair_and_writes_ready_once() {
    let spire = Arc::new(FakeSpire::new());
    // A hand-made entry for an identity the mesh does not need: never touched.
    let foreign = spire.add_foreign(entry("someone", "n1"));
    let (ctx, mut api) = context(spire.clone());
    let s = stores(vec![policy(None)], vec![]);
    let mut state = State::default();
    let server = async {
        let body = api
            .expect(Method::PATCH, MP_STATUS, |b| {
                let mut p = serde_json::to_value(policy(None)).expect("json");
                p["status"] = b["status"].clone();
                p
            })
            .await;
        assert_eq!(body["apiVersion"], "meshauth.io/v1alpha1");
        assert_eq!(body["kind"], "MeshPolicy");
        body
    };
    let (result, body) = tokio::join!(reconcile(&ctx, &s, &mut state), server);
    result.expect("reconcile succeeds");
    let status = &body["status"];
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["selectedPods"], 1);
    assert_eq!(condition(status, "Accepted")["status"], "True");
    assert_eq!(condition(status, "Ready")["status"], "True", "{status}");
    assert_eq!(condition(status, "Ready")["observedGeneration"], 2);
    // pay requires authentication from any pod: pay (on n1) and order (on n2) are the pair.
    assert_eq!(spire.owned_specs(), vec![entry("order", "n2"), entry("pay", "n1")]);
    assert!(spire.entries().contains_key(&foreign));

    // The same state again: no SPIRE call beyond nothing-to-do, no patch.
    let calls = spire.calls();
    let (result, ()) = tokio::join!(reconcile(&ctx, &s, &mut state), api.expect_nothing());
    result.expect("reconcile succeeds");
    assert_eq!(spire.calls(), calls, "nothing to change on SPIRE");
}

#[tokio::test]
async fn a_status_that_already_says_the_same_is_not_patched() {
    let spire = Arc::new(FakeSpire::new());
    let (ctx, mut api) = context(spire.clone());
    let mut state = State::default();
    // First pass computes the status; put it into the cache as the API server would.
    let s = stores(vec![policy(None)], vec![]);
    let server = api.expect(Method::PATCH, MP_STATUS, |b| {
        let mut p = serde_json::to_value(policy(None)).expect("json");
        p["status"] = b["status"].clone();
        p
    });
    let (r, body) = tokio::join!(reconcile(&ctx, &s, &mut state), server);
    r.expect("reconcile");
    let mut with_status = policy(None);
    with_status.status = Some(serde_json::from_value(body["status"].clone()).expect("status"));
    let s = stores(vec![with_status], vec![]);
    // A fresh state: only the cached object can tell the status is current.
    let mut state = State::default();
    let (r, ()) = tokio::join!(reconcile(&ctx, &s, &mut state), api.expect_nothing());
    r.expect("reconcile");
}

#[tokio::test]
async fn an_invalid_spec_is_reported_with_the_field_and_a_warning_event() {
    let spire = Arc::new(FakeSpire::new());
    let (ctx, mut api) = context(spire);
    let s = stores(vec![policy(Some("spiffe://Bad/x"))], vec![]);
    let mut state = State::default();
    let server = async {
        let patch = api
            .expect(Method::PATCH, MP_STATUS, |b| {
                let mut p = serde_json::to_value(policy(None)).expect("json");
                p["status"] = b["status"].clone();
                p
            })
            .await;
        let event = api.expect(Method::POST, "/apis/events.k8s.io/v1/namespaces/shop/events?", |b| b.clone()).await;
        (patch, event)
    };
    let (r, (patch, event)) = tokio::join!(reconcile(&ctx, &s, &mut state), server);
    r.expect("reconcile");
    let accepted = condition(&patch["status"], "Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "InvalidSpec");
    assert!(accepted["message"].as_str().unwrap_or("").contains("spec.ingress[0].from[0]"), "{accepted}");
    assert_eq!(condition(&patch["status"], "Ready")["reason"], "NotAccepted");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reason"], "InvalidSpec");
    assert_eq!(event["regarding"]["kind"], "MeshPolicy");
    assert_eq!(event["regarding"]["name"], "pay");
}

#[tokio::test]
async fn spire_outage_keeps_entries_reports_pending_and_recovers() {
    let spire = Arc::new(FakeSpire::new());
    let (ctx, mut api) = context(spire.clone());
    let mut state = State::default();
    // Registered while SPIRE was up.
    let s = stores(vec![], vec![]);
    let strict = |name: &str| {
        let mut m = MutualAuth::new(name, MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict });
        m.metadata = meta(Some("shop"), name);
        m
    };
    let s_strict = Stores { mutual_auths: store_of(vec![strict("default")]), ..s.clone() };
    const MA_STATUS: &str = "/apis/meshauth.io/v1alpha1/namespaces/shop/mutualauths/default/status?";
    let echo = |b: &Value| {
        let mut m = serde_json::to_value(strict("default")).expect("json");
        m["status"] = b["status"].clone();
        m
    };
    let (r, _) = tokio::join!(reconcile(&ctx, &s_strict, &mut state), api.expect(Method::PATCH, MA_STATUS, echo));
    r.expect("reconcile");
    let before = spire.owned_specs();
    assert_eq!(before, vec![entry("order", "n2"), entry("pay", "n1")]);

    // SPIRE goes away and the pay pod moves to n2: the error is returned (the caller backs
    // off), nothing is deleted, Ready says why.
    spire.set_down(true);
    let moved = Stores {
        pods: store_of(vec![pod("pay-1", "pay", "n2", "10.0.0.1"), pod("order-1", "order", "n2", "10.0.0.2")]),
        ..s_strict.clone()
    };
    state.force_full();
    let (r, body) = tokio::join!(reconcile(&ctx, &moved, &mut state), api.expect(Method::PATCH, MA_STATUS, echo));
    assert!(matches!(r, Err(ControllerError::Spire(_))), "{r:?}");
    let ready = condition(&body["status"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "RegistrationPending");
    assert!(ready["message"].as_str().unwrap_or("").contains("down"), "{ready}");
    spire.set_down(false);
    assert_eq!(spire.owned_specs(), before, "no entry dropped while SPIRE was away");

    // Back: the entry moves (created on n2 before the n1 one goes) and Ready returns.
    let (r, body) = tokio::join!(reconcile(&ctx, &moved, &mut state), api.expect(Method::PATCH, MA_STATUS, echo));
    r.expect("reconcile");
    assert_eq!(condition(&body["status"], "Ready")["status"], "True");
    assert_eq!(spire.owned_specs(), vec![entry("order", "n2"), entry("pay", "n2")]);
}

#[tokio::test]
async fn a_similar_hand_made_entry_serves_and_is_left_alone() {
    let spire = Arc::new(FakeSpire::new());
    let foreign = spire.add_foreign(entry("pay", "n1"));
    let (ctx, mut api) = context(spire.clone());
    let s = stores(vec![policy(None)], vec![]);
    let mut state = State::default();
    let (r, body) = tokio::join!(
        reconcile(&ctx, &s, &mut state),
        api.expect(Method::PATCH, MP_STATUS, |b| {
            let mut p = serde_json::to_value(policy(None)).expect("json");
            p["status"] = b["status"].clone();
            p
        })
    );
    r.expect("reconcile");
    assert_eq!(condition(&body["status"], "Ready")["status"], "True");
    assert_eq!(spire.owned_specs(), vec![entry("order", "n2")]);
    assert_eq!(spire.entries().get(&foreign).map(|s| s.owned), Some(false));
}

#[tokio::test]
async fn a_node_annotated_with_an_agent_attested_elsewhere_gets_no_entries_from_the_controller() {
    let spire = Arc::new(FakeSpire::new());
    let (ctx, mut api) = context(spire.clone());
    // SPIRE attested agent "x" on n1; n2 (where the order pod runs) claims it.
    spire.add_agent(crate::spire::AttestedAgent {
        id: "spiffe://cluster.local/agent/x".into(),
        attestation_type: "k8s_psat".into(),
        selectors: vec![Selector { kind: "k8s_psat".into(), value: "agent_node_name:n1".into() }],
        banned: false,
    });
    let mut forged = node("n2");
    forged.metadata.annotations = Some([(NODE_AGENT_ID_ANNOTATION.to_owned(), "spiffe://cluster.local/agent/x".to_owned())].into());
    let s = Stores { nodes: store_of(vec![node("n1"), forged]), ..stores(vec![policy(None)], vec![]) };
    let mut state = State::default();
    let (r, body) = tokio::join!(
        reconcile(&ctx, &s, &mut state),
        api.expect(Method::PATCH, MP_STATUS, |b| {
            let mut p = serde_json::to_value(policy(None)).expect("json");
            p["status"] = b["status"].clone();
            p
        })
    );
    r.expect("reconcile");
    assert!(
        spire.owned_specs().iter().all(|e| !e.parent_id.ends_with("/agent/x")),
        "an entry was parented to the agent n2 named: {:?}",
        spire.owned_specs()
    );
    assert_eq!(spire.owned_specs(), vec![entry("pay", "n1")], "the honest node still gets its entry");
    assert_eq!(condition(&body["status"], "Ready")["status"], "True", "the policy's own pod (on n1) is served");
}
