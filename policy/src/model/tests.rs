//! Table tests: one per rule of MISSION.md §3.

use super::*;
use crate::tables::AuthRequirement::{None as NoAuth, Permissive, Required};
use crate::tables::TableProtocol::{Icmp, Tcp, Udp};
use serde_json::json;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pod(ns: &str, name: &str, sa: &str, l: &[(&str, &str)]) -> PodInfo {
    PodInfo { namespace: ns.into(), name: name.into(), labels: labels(l), service_account: sa.into(), ip: None, node: None }
}

fn mesh_policy(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> Resource<MeshPolicySpec> {
    Resource {
        namespace: ns.into(),
        name: name.into(),
        created: Some(created.into()),
        spec: serde_json::from_value(spec).expect("valid MeshPolicy spec"),
    }
}

fn mutual_auth(ns: &str, name: &str, created: &str, spec: serde_json::Value) -> Resource<MutualAuthSpec> {
    Resource {
        namespace: ns.into(),
        name: name.into(),
        created: Some(created.into()),
        spec: serde_json::from_value(spec).expect("valid MutualAuth spec"),
    }
}

/// shop: web (sa web), order (sa order), payment (sa payment); other: client (sa client).
fn base() -> Inputs {
    Inputs {
        namespaces: vec![
            NamespaceInfo { name: "shop".into(), labels: labels(&[("team", "shop")]) },
            NamespaceInfo { name: "other".into(), labels: labels(&[("team", "other")]) },
        ],
        pods: vec![
            pod("shop", "web", "web", &[("app", "web")]),
            pod("shop", "order", "order", &[("app", "order")]),
            pod("shop", "payment", "payment", &[("app", "payment")]),
            pod("other", "client", "client", &[("app", "order")]),
        ],
        ..Inputs::default()
    }
}

/// The whole decision for traffic from `from` (`world`, a SPIFFE ID or `ns/pod`) to `to`.
fn decision(model: &PolicyModel, from: &str, to: &str, protocol: TableProtocol, port: u16) -> Decision {
    let source = match from {
        "world" => Source::World,
        id if id.starts_with("spiffe://") => Source::Identity(SpiffeId::parse(id).expect("id")),
        pod => Source::Pod(ObjectRef::parse(pod).expect("ns/pod")),
    };
    model.decide(&source, &ObjectRef::parse(to).expect("ns/pod"), protocol, port).expect("known pods")
}

fn decide(model: &PolicyModel, from: &str, to: &str, protocol: TableProtocol, port: u16) -> (Verdict, AuthRequirement) {
    let d = decision(model, from, to, protocol, port);
    (d.verdict, d.authentication)
}

fn model_with(policies: Vec<Resource<MeshPolicySpec>>, auths: Vec<Resource<MutualAuthSpec>>) -> PolicyModel {
    let mut inputs = base();
    inputs.mesh_policies = policies;
    inputs.mutual_auths = auths;
    PolicyModel::new(ModelConfig::default(), inputs)
}

const T1: &str = "2026-01-01T00:00:00Z";
const T2: &str = "2026-01-02T00:00:00Z";

#[test]
fn a_pod_selected_by_no_policy_accepts_every_source() {
    let m = model_with(vec![], vec![]);
    assert_eq!(decide(&m, "other/client", "shop/payment", Tcp, 1), (Verdict::Allow, NoAuth));
    assert_eq!(decide(&m, "world", "shop/payment", Udp, 53), (Verdict::Allow, NoAuth));
}

#[test]
fn a_selected_pod_accepts_only_what_a_rule_matches() {
    let p = mesh_policy(
        "shop",
        "pay",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "order"}}}], "ports": [{"port": 8080}]}]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 8080), (Verdict::Allow, NoAuth));
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 8081), (Verdict::Deny, NoAuth), "other port");
    assert_eq!(decide(&m, "shop/order", "shop/payment", Udp, 8080), (Verdict::Deny, NoAuth), "TCP is the default");
    assert_eq!(decide(&m, "shop/web", "shop/payment", Tcp, 8080), (Verdict::Deny, NoAuth), "other labels");
    assert_eq!(
        decide(&m, "other/client", "shop/payment", Tcp, 8080),
        (Verdict::Deny, NoAuth),
        "a podSelector alone picks pods of the policy's namespace only"
    );
    assert_eq!(decide(&m, "world", "shop/payment", Tcp, 8080), (Verdict::Deny, NoAuth));
    assert_eq!(decide(&m, "shop/web", "shop/order", Tcp, 1), (Verdict::Allow, NoAuth), "unselected pod");
}

#[test]
fn a_policy_with_no_rules_isolates_its_pods_completely() {
    let p = mesh_policy("shop", "deny-all", T1, json!({"selector": {}}));
    let m = model_with(vec![p], vec![]);
    for dst in ["shop/web", "shop/order", "shop/payment"] {
        assert_eq!(decide(&m, "shop/web", dst, Tcp, 80), (Verdict::Deny, NoAuth), "{dst}");
    }
    assert_eq!(decide(&m, "shop/web", "other/client", Tcp, 80), (Verdict::Allow, NoAuth));
}

#[test]
fn a_policy_past_the_per_object_limits_isolates_its_pods_and_allows_nothing() {
    // What the webhook and the CRD refuse, should it reach the model anyway (a webhook that
    // was down with failurePolicy Ignore): every source on 10,000 ports.
    let ports: Vec<_> = (0..10_000).map(|i| json!({"port": 1 + i})).collect();
    let p = mesh_policy(
        "shop",
        "huge",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"from": [{"namespaceSelector": {}}], "ports": ports}]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert!(m.problems().iter().any(|p| p.error.reason.contains("limit")), "{:?}", m.problems());
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 1), (Verdict::Deny, NoAuth), "isolated, no rule kept");
    assert_eq!(decide(&m, "shop/order", "shop/web", Tcp, 1), (Verdict::Allow, NoAuth), "unselected pods unaffected");
}

#[test]
fn omitted_from_and_ports_mean_any_source_and_every_port_and_protocol() {
    let p = mesh_policy("shop", "open", T1, json!({"selector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}));
    let m = model_with(vec![p], vec![]);
    for (proto, port) in [(Tcp, 1), (Tcp, 65535), (Udp, 53), (Icmp, 0), (TableProtocol::Other, 0)] {
        assert_eq!(decide(&m, "world", "shop/web", proto, port), (Verdict::Allow, NoAuth), "{proto:?}");
    }
}

#[test]
fn port_ranges_include_both_ends_and_udp_is_separate() {
    let p = mesh_policy(
        "shop",
        "range",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "ingress": [{"ports": [{"port": 8000, "endPort": 8010, "protocol": "UDP"}]}]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert_eq!(decide(&m, "shop/order", "shop/web", Udp, 8000).0, Verdict::Allow);
    assert_eq!(decide(&m, "shop/order", "shop/web", Udp, 8010).0, Verdict::Allow);
    assert_eq!(decide(&m, "shop/order", "shop/web", Udp, 8011).0, Verdict::Deny);
    assert_eq!(decide(&m, "shop/order", "shop/web", Tcp, 8005).0, Verdict::Deny);
    assert_eq!(decide(&m, "shop/order", "shop/web", Icmp, 0).0, Verdict::Deny, "rules with ports do not admit ICMP");
}

#[test]
fn namespace_selector_alone_and_with_pod_selector() {
    let p = mesh_policy(
        "shop",
        "ns",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "other"}}}], "ports": [{"port": 1}]},
                {"from": [{"namespaceSelector": {"matchLabels": {"team": "shop"}}, "podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 2}]}
            ]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert_eq!(decide(&m, "other/client", "shop/payment", Tcp, 1).0, Verdict::Allow);
    assert_eq!(decide(&m, "shop/web", "shop/payment", Tcp, 1).0, Verdict::Deny);
    assert_eq!(decide(&m, "shop/web", "shop/payment", Tcp, 2).0, Verdict::Allow);
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 2).0, Verdict::Deny, "both selectors must match");
    assert_eq!(decide(&m, "other/client", "shop/payment", Tcp, 2).0, Verdict::Deny);
}

#[test]
fn an_identity_peer_matches_exactly_that_spiffe_id() {
    let p = mesh_policy(
        "shop",
        "id",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"from": [{"identity": "spiffe://cluster.local/ns/other/sa/client"}]}]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert_eq!(decide(&m, "other/client", "shop/payment", Tcp, 9).0, Verdict::Allow);
    assert_eq!(decide(&m, "spiffe://cluster.local/ns/other/sa/client", "shop/payment", Tcp, 9).0, Verdict::Allow);
    assert_eq!(decide(&m, "spiffe://cluster.local/ns/other/sa/client2", "shop/payment", Tcp, 9).0, Verdict::Deny);
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 9).0, Verdict::Deny);
}

#[test]
fn the_strictest_matching_rule_wins_and_rules_of_several_policies_add_up() {
    let open = mesh_policy(
        "shop",
        "open",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"ports": [{"port": 8080}, {"port": 9000}]}]
        }),
    );
    let strict = mesh_policy(
        "shop",
        "strict",
        T2,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "order"}}}], "ports": [{"port": 8080}], "authentication": {"mode": "Required"}}]
        }),
    );
    let m = model_with(vec![open, strict], vec![]);
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 8080), (Verdict::Allow, Required));
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 9000), (Verdict::Allow, NoAuth));
    assert_eq!(decide(&m, "shop/web", "shop/payment", Tcp, 8080), (Verdict::Allow, NoAuth));
    assert_eq!(decide(&m, "world", "shop/payment", Tcp, 8080), (Verdict::Allow, NoAuth));
}

#[test]
fn required_authentication_denies_sources_without_identity() {
    let p = mesh_policy(
        "shop",
        "auth",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"authentication": {"mode": "Required"}}]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 1), (Verdict::Allow, Required));
    assert_eq!(decide(&m, "world", "shop/payment", Tcp, 1), (Verdict::Deny, Required));
}

#[test]
fn mutual_auth_modes_set_the_requirement_whatever_the_policy_says() {
    let strict = mutual_auth("shop", "default", T1, json!({"mode": "Strict"}));
    let m = model_with(vec![], vec![strict]);
    assert_eq!(decide(&m, "other/client", "shop/payment", Tcp, 1), (Verdict::Allow, Required));
    assert_eq!(decide(&m, "world", "shop/payment", Tcp, 1), (Verdict::Deny, Required), "no identity under Strict");
    assert_eq!(decide(&m, "shop/web", "other/client", Tcp, 1), (Verdict::Allow, NoAuth), "other namespace");

    let permissive = mutual_auth("shop", "default", T1, json!({"mode": "Permissive"}));
    let m = model_with(vec![], vec![permissive]);
    assert_eq!(decide(&m, "world", "shop/payment", Tcp, 1), (Verdict::Allow, Permissive));

    let deny = mesh_policy("shop", "deny", T1, json!({"selector": {}}));
    let strict = mutual_auth("shop", "default", T1, json!({"mode": "Strict"}));
    let m = model_with(vec![deny], vec![strict]);
    assert_eq!(decide(&m, "shop/web", "shop/payment", Tcp, 1), (Verdict::Deny, NoAuth), "MutualAuth does not allow");
}

#[test]
fn disabled_mutual_auth_does_not_relax_a_required_rule() {
    let p = mesh_policy(
        "shop",
        "auth",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"authentication": {"mode": "Required"}}]
        }),
    );
    let off = mutual_auth("shop", "default", T1, json!({"mode": "Disabled"}));
    let m = model_with(vec![p], vec![off]);
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 1), (Verdict::Allow, Required));
}

#[test]
fn the_most_specific_mutual_auth_wins() {
    let mesh = mutual_auth(DEFAULT_MESH_NAMESPACE, "mesh", T1, json!({"mode": "Strict"}));
    let ns = mutual_auth("shop", "ns", T2, json!({"mode": "Permissive"}));
    let web = mutual_auth("shop", "web", T2, json!({"selector": {"matchLabels": {"app": "web"}}, "mode": "Disabled"}));
    let m = model_with(vec![], vec![mesh, ns, web]);
    assert_eq!(decide(&m, "world", "shop/web", Tcp, 1), (Verdict::Allow, NoAuth), "selector beats namespace");
    assert_eq!(decide(&m, "world", "shop/order", Tcp, 1), (Verdict::Allow, Permissive), "namespace beats mesh");
    assert_eq!(decide(&m, "world", "other/client", Tcp, 1), (Verdict::Deny, Required), "mesh-wide");
    let client = m.pod(&ObjectRef::new("other", "client")).expect("pod");
    assert_eq!(m.mutual_auth_for(client).map(|(o, _)| o.name), Some("mesh".into()));
    assert!(m.conflicts().is_empty());
}

#[test]
fn a_selector_mutual_auth_outside_the_mesh_namespace_is_not_mesh_wide() {
    let mesh_selector =
        mutual_auth(DEFAULT_MESH_NAMESPACE, "x", T1, json!({"selector": {"matchLabels": {"app": "order"}}, "mode": "Strict"}));
    let m = model_with(vec![], vec![mesh_selector]);
    assert_eq!(decide(&m, "world", "other/client", Tcp, 1), (Verdict::Allow, NoAuth));
}

#[test]
fn the_oldest_wins_a_tie_and_the_others_are_conflicted() {
    let older = mutual_auth("shop", "older", T1, json!({"mode": "Strict"}));
    let newer = mutual_auth("shop", "newer", T2, json!({"mode": "Permissive"}));
    let agree = mutual_auth("shop", "agree", T2, json!({"mode": "Strict"}));
    let m = model_with(vec![], vec![newer, agree, older]);
    assert_eq!(decide(&m, "world", "shop/web", Tcp, 1), (Verdict::Deny, Required));
    let conflicts = m.conflicts();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0].loser, ObjectRef::new("shop", "newer"));
    assert_eq!(conflicts[0].winner, ObjectRef::new("shop", "older"));
    assert_eq!(conflicts[0].pods.len(), 3);
    assert_eq!(m.mutual_auth_selected_pods(&ObjectRef::new("shop", "older")), 3);
    assert_eq!(m.mutual_auth_selected_pods(&ObjectRef::new("shop", "newer")), 0);

    let a = mutual_auth("shop", "a", T1, json!({"selector": {"matchLabels": {"app": "web"}}, "mode": "Strict"}));
    let b = mutual_auth(
        "shop",
        "b",
        T2,
        json!({"selector": {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "order"]}]}, "mode": "Disabled"}),
    );
    let m = model_with(vec![], vec![b, a]);
    assert_eq!(decide(&m, "world", "shop/web", Tcp, 1).1, Required, "older selector wins");
    assert_eq!(decide(&m, "world", "shop/order", Tcp, 1).1, NoAuth, "only b selects order");
    let conflicts = m.conflicts();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].pods, vec![ObjectRef::new("shop", "web")]);
}

#[test]
fn invalid_parts_fail_closed_and_are_reported() {
    let p = mesh_policy(
        "shop",
        "bad",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [
                {"from": [{"identity": "spiffe://cluster.local/ns/shop/sa/web/"}]},
                {"from": [{"podSelector": {"matchLabels": {"app": "order"}}}], "ports": [{"port": 70000}]}
            ]
        }),
    );
    let m = model_with(vec![p], vec![]);
    assert_eq!(decide(&m, "shop/web", "shop/payment", Tcp, 1).0, Verdict::Deny, "bad identity matches nobody");
    assert_eq!(decide(&m, "shop/order", "shop/payment", Tcp, 4464).0, Verdict::Deny, "bad port matches nothing");
    let fields: Vec<_> = m.problems().iter().map(|p| p.error.field.as_str()).collect();
    assert!(fields.iter().any(|f| f.starts_with("spec.ingress[0].from[0]")), "{fields:?}");
    assert!(fields.iter().any(|f| f.starts_with("spec.ingress[1].ports[0]")), "{fields:?}");

    let bad_selector = mesh_policy(
        "shop",
        "sel",
        T1,
        json!({
            "selector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]}
        }),
    );
    let m = model_with(vec![bad_selector], vec![]);
    assert!(m.problems().iter().any(|p| p.error.field == "spec.selector"));
}

#[test]
fn unknown_pods_are_errors() {
    let m = model_with(vec![], vec![]);
    let err = m.decide(&Source::World, &ObjectRef::new("shop", "nope"), Tcp, 1).expect_err("unknown");
    assert_eq!(err.to_string(), "unknown pod shop/nope");
}

#[test]
fn selected_pod_counts() {
    let p = mesh_policy("shop", "all", T1, json!({"selector": {}}));
    let m = model_with(vec![p], vec![]);
    assert_eq!(m.mesh_policy_selected_pods(&ObjectRef::new("shop", "all")), 3);
}

#[test]
fn an_audited_policy_isolates_nothing_and_says_what_it_would_deny() {
    let audited = mesh_policy(
        "shop",
        "pay-audit",
        T1,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "enforcement": "Audit",
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "order"}}}], "ports": [{"port": 8080}], "authentication": {"mode": "Required"}},
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 9090}]}
            ]
        }),
    );
    let m = model_with(vec![audited.clone()], vec![]);
    let full = |from: &str, port| decision(&m, from, "shop/payment", Tcp, port);
    let pass = |authentication, audit| Decision { verdict: Verdict::Allow, authentication, audit };
    assert_eq!(full("shop/web", 9090), pass(NoAuth, None), "what a rule admits passes unreported");
    assert_eq!(full("shop/web", 8080), pass(NoAuth, Some(AuditFinding::Denied)), "what no rule admits passes, reported");
    assert_eq!(full("world", 8080), pass(NoAuth, Some(AuditFinding::Denied)));
    assert_eq!(full("shop/order", 8080), pass(Permissive, Some(AuditFinding::AuthenticationRequired)), "authenticated permissively");
    assert_eq!(m.auditing_policies(m.pod(&ObjectRef::new("shop", "payment")).expect("pod")), [ObjectRef::new("shop", "pay-audit")]);
    assert_eq!(m.is_audited(&ObjectRef::new("shop", "pay-audit")), Some(true));

    let full_in = |m: &PolicyModel, from: &str, port| decision(m, from, "shop/payment", Tcp, port);
    // MutualAuth is not audited: Strict still drops a source that cannot authenticate, and
    // what Strict requires is no audit finding.
    let strict = mutual_auth("shop", "strict", T1, json!({"mode": "Strict"}));
    let m = model_with(vec![audited.clone()], vec![strict]);
    assert_eq!(full_in(&m, "world", 8080), Decision { verdict: Verdict::Deny, authentication: Required, audit: None });
    assert_eq!(full_in(&m, "shop/order", 8080), Decision { verdict: Verdict::Allow, authentication: Required, audit: None });
    assert_eq!(
        full_in(&m, "shop/web", 8080),
        Decision { verdict: Verdict::Allow, authentication: Required, audit: Some(AuditFinding::Denied) }
    );
    // Permissive MutualAuth and an audited Required rule: permissive, reported when unauthenticated.
    let permissive = mutual_auth("shop", "permissive", T1, json!({"mode": "Permissive"}));
    let m = model_with(vec![audited.clone()], vec![permissive]);
    assert_eq!(full_in(&m, "shop/order", 8080), pass(Permissive, Some(AuditFinding::AuthenticationRequired)));
    assert_eq!(full_in(&m, "shop/web", 9090), pass(Permissive, None));

    // An enforced policy on the same pod isolates it alone; the audited one adds nothing.
    let enforced = mesh_policy(
        "shop",
        "pay",
        T2,
        json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 9090}]}]
        }),
    );
    let m = model_with(vec![audited, enforced], vec![]);
    let deny = Decision { verdict: Verdict::Deny, authentication: NoAuth, audit: None };
    assert_eq!(full_in(&m, "shop/order", 8080), deny, "the audited rule admits nothing");
    assert_eq!(full_in(&m, "shop/web", 9090), pass(NoAuth, None));
}
