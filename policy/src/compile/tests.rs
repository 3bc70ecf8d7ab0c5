//! The compiled tables answer every query exactly as the model does (property tests), and
//! numbers stay stable across compilations.

use super::*;
use crate::model::{Inputs, ModelConfig, NamespaceInfo, Resource, Source};
use crate::tables::AuthRequirement;
use proptest::prelude::*;
use serde_json::{Value, json};

#[test]
fn disjoint_takes_the_strictest_and_merges_neighbours() {
    use AuthRequirement::*;
    let out = disjoint(vec![(1, 100, None), (50, 60, Required), (101, 200, None)]);
    assert_eq!(out, vec![(1, 49, None), (50, 60, Required), (61, 200, None)]);
    assert_eq!(disjoint(vec![(0, 65535, None), (0, 65535, None)]), vec![(0, 65535, None)]);
    assert_eq!(disjoint(vec![(5, 5, None), (7, 7, None)]), vec![(5, 5, None), (7, 7, None)]);
}

const NAMESPACES: [&str; 3] = ["a", "b", "meshauth-system"];
const PORTS: [u16; 9] = [0, 1, 79, 80, 81, 443, 8080, 8081, 65535];

fn label_set() -> impl Strategy<Value = Vec<(String, String)>> {
    (prop::option::of(prop::sample::select(vec!["x", "y", "z"])), prop::option::of(prop::sample::select(vec!["1", "2"]))).prop_map(
        |(app, tier)| {
            let mut l = Vec::new();
            if let Some(a) = app {
                l.push(("app".to_owned(), a.to_owned()));
            }
            if let Some(t) = tier {
                l.push(("tier".to_owned(), t.to_owned()));
            }
            l
        },
    )
}

fn selector() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        label_set().prop_map(|l| json!({"matchLabels": l.into_iter().collect::<BTreeMap<_, _>>()})),
        prop::sample::select(vec!["x", "y"])
            .prop_map(|v| json!({"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [v]}]})),
        Just(json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]})),
    ]
}

fn peer() -> impl Strategy<Value = Value> {
    prop_oneof![
        selector().prop_map(|s| json!({"podSelector": s})),
        selector().prop_map(|s| json!({"namespaceSelector": s})),
        (selector(), selector()).prop_map(|(p, n)| json!({"podSelector": p, "namespaceSelector": n})),
        (prop::sample::select(NAMESPACES.to_vec()), prop::sample::select(vec!["s1", "s2"]))
            .prop_map(|(ns, sa)| json!({"identity": format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")})),
    ]
}

fn port() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(vec![1, 80, 443, 8080]),
        prop::option::of(prop::sample::select(vec![0, 1, 400, 65454])),
        prop::sample::select(vec!["TCP", "UDP"]),
    )
        .prop_map(|(p, extra, proto)| match extra {
            Some(e) => json!({"port": p, "endPort": p + e, "protocol": proto}),
            None => json!({"port": p, "protocol": proto}),
        })
}

fn rule() -> impl Strategy<Value = Value> {
    (prop::collection::vec(peer(), 0..3), prop::collection::vec(port(), 0..3), any::<bool>()).prop_map(|(from, ports, required)| {
        json!({"from": from, "ports": ports, "authentication": {"mode": if required { "Required" } else { "Disabled" }}})
    })
}

fn inputs() -> impl Strategy<Value = Inputs> {
    let namespaces = prop::collection::vec(label_set(), 3).prop_map(|labels| {
        NAMESPACES
            .iter()
            .zip(labels)
            .map(|(n, l)| NamespaceInfo { name: n.to_string(), labels: l.into_iter().collect() })
            .collect::<Vec<_>>()
    });
    let pods =
        prop::collection::vec((prop::sample::select(NAMESPACES.to_vec()), label_set(), prop::sample::select(vec!["s1", "s2"])), 1..7)
            .prop_map(|pods| {
                pods.into_iter()
                    .enumerate()
                    .map(|(i, (ns, labels, sa))| PodInfo {
                        namespace: ns.into(),
                        name: format!("p{i}"),
                        labels: labels.into_iter().collect(),
                        service_account: sa.into(),
                        ip: Some(Ipv4Addr::new(10, 0, 0, i as u8 + 1)),
                        node: None,
                    })
                    .collect::<Vec<_>>()
            });
    let policies = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            selector(),
            prop::collection::vec(rule(), 0..3),
            prop::sample::select(vec!["Enforce", "Audit"]),
        ),
        0..4,
    );
    let auths = prop::collection::vec(
        (
            prop::sample::select(NAMESPACES.to_vec()),
            prop::option::of(selector()),
            prop::sample::select(vec!["Strict", "Permissive", "Disabled"]),
            0u8..4,
        ),
        0..4,
    );
    (namespaces, pods, policies, auths).prop_map(|(namespaces, pods, policies, auths)| Inputs {
        namespaces,
        pods,
        mesh_policies: policies
            .into_iter()
            .enumerate()
            .map(|(i, (ns, sel, rules, enforcement))| Resource {
                namespace: ns.into(),
                name: format!("mp{i}"),
                created: Some(format!("2026-01-0{}T00:00:00Z", i + 1)),
                spec: serde_json::from_value(json!({"selector": sel, "ingress": rules, "enforcement": enforcement}))
                    .expect("generated spec"),
            })
            .collect(),
        mutual_auths: auths
            .into_iter()
            .enumerate()
            .map(|(i, (ns, sel, mode, day))| Resource {
                namespace: ns.into(),
                name: format!("ma{i}"),
                created: Some(format!("2026-01-0{}T00:00:00Z", day + 1)),
                spec: serde_json::from_value(json!({"selector": sel, "mode": mode})).expect("generated spec"),
            })
            .collect(),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn compiled_tables_answer_every_query_as_the_model_does(inputs in inputs()) {
        let model = PolicyModel::new(ModelConfig::default(), inputs);
        let tables = compile(&model, &mut NumberAllocator::default());
        let world_ip = Ipv4Addr::new(192, 0, 2, 1);
        let pods: Vec<_> = model.pods().cloned().collect();
        for dst in &pods {
            let dst_ip = dst.ip.expect("generated pods have IPs");
            let sources = pods.iter().map(|p| (Source::Pod(p.object_ref()), p.ip.expect("ip")))
                .chain([(Source::World, world_ip)]);
            for (source, src_ip) in sources {
                for protocol in TableProtocol::ALL {
                    for port in PORTS {
                        let want = model.decide(&source, &dst.object_ref(), protocol, port).expect("known pods");
                        let got = evaluate(&tables, src_ip, dst_ip, protocol, port);
                        prop_assert_eq!(got, Some(want), "{:?} -> {} {:?}/{}\ntables: {:#?}", source, dst.object_ref(), protocol, port, tables.policy);
                    }
                }
            }
        }
        // Policy entries of one key never overlap, so an LPM lookup finds at most one.
        for w in tables.policy.windows(2) {
            if (w[0].dst_identity, w[0].src_identity, w[0].protocol) == (w[1].dst_identity, w[1].src_identity, w[1].protocol) {
                prop_assert!(w[0].port_end < w[1].port_start, "overlap {:?} {:?}", w[0], w[1]);
            }
        }
    }

    #[test]
    fn auth_pairs_are_the_pairs_some_allowed_traffic_authenticates(inputs in inputs()) {
        let model = PolicyModel::new(ModelConfig::default(), inputs);
        let pairs = auth_pairs(&model, |_| true);
        let pods: Vec<_> = model.pods().cloned().collect();
        for dst in &pods {
            for src in pods.iter().filter(|s| s.object_ref() != dst.object_ref()) {
                let strongest = TableProtocol::ALL.iter().flat_map(|&proto| PORTS.iter().map(move |&port| (proto, port)))
                    .filter_map(|(proto, port)| {
                        let d = model.decide(&Source::Pod(src.object_ref()), &dst.object_ref(), proto, port).expect("known");
                        (d.verdict == crate::model::Verdict::Allow).then_some(d.authentication)
                    })
                    .max()
                    .unwrap_or(AuthRequirement::None);
                let listed = pairs.iter().find(|p| p.dst_pod == dst.object_ref() && p.src_pod == src.object_ref());
                // Sampled ports can miss a narrow range; the listed requirement is never weaker.
                prop_assert!(listed.map_or(AuthRequirement::None, |p| p.requirement) >= strongest);
            }
        }
        // The identity-level list is exactly the pod-level one projected onto SPIFFE IDs.
        let mut projected: BTreeMap<(String, String), AuthRequirement> = BTreeMap::new();
        for p in &pairs {
            let slot = projected.entry((p.dst_spiffe_id.clone(), p.src_spiffe_id.clone())).or_default();
            *slot = (*slot).max(p.requirement);
        }
        let identity: BTreeMap<(String, String), AuthRequirement> = auth_identity_pairs(&model, |_| true)
            .into_iter()
            .map(|p| ((p.dst_spiffe_id, p.src_spiffe_id), p.requirement))
            .collect();
        prop_assert_eq!(identity, projected);
    }
}

fn shop_inputs(extra_pod: bool) -> Inputs {
    let mut pods = vec![PodInfo {
        namespace: "a".into(),
        name: "one".into(),
        labels: BTreeMap::new(),
        service_account: "s1".into(),
        ip: Some(Ipv4Addr::new(10, 0, 0, 1)),
        node: None,
    }];
    if extra_pod {
        pods.insert(
            0,
            PodInfo {
                namespace: "a".into(),
                name: "zero".into(),
                labels: [("app".to_owned(), "new".to_owned())].into(),
                service_account: "s0".into(),
                ip: Some(Ipv4Addr::new(10, 0, 0, 2)),
                node: None,
            },
        );
    }
    Inputs { pods, ..Inputs::default() }
}

#[test]
fn numbers_stay_stable_and_are_never_reused() {
    let mut alloc = NumberAllocator::default();
    let first = compile(&PolicyModel::new(ModelConfig::default(), shop_inputs(false)), &mut alloc);
    let again = compile(&PolicyModel::new(ModelConfig::default(), shop_inputs(false)), &mut alloc);
    assert_eq!(first, again);
    let grown = compile(&PolicyModel::new(ModelConfig::default(), shop_inputs(true)), &mut alloc);
    let one = |t: &CompiledTables| t.endpoints.iter().find(|e| e.pod == "a/one").cloned().expect("a/one");
    assert_eq!(one(&first), one(&grown), "a new pod does not renumber existing ones");
    let zero = grown.endpoints.iter().find(|e| e.pod == "a/zero").expect("a/zero").clone();
    // Round-trip through the persisted form, as an agent restart does.
    let mut alloc: NumberAllocator = serde_json::from_str(&serde_json::to_string(&alloc).expect("ser")).expect("de");
    let shrunk = compile(&PolicyModel::new(ModelConfig::default(), shop_inputs(false)), &mut alloc);
    assert_eq!(one(&shrunk), one(&first));
    let back = compile(&PolicyModel::new(ModelConfig::default(), shop_inputs(true)), &mut alloc);
    let zero_again = back.endpoints.iter().find(|e| e.pod == "a/zero").expect("a/zero");
    assert!(zero_again.security_identity > zero.security_identity, "numbers of gone identities are not reused");
    assert!(zero_again.spiffe_id > zero.spiffe_id);
}

fn pod(ns: &str, name: &str, app: &str, ip: u32) -> PodInfo {
    PodInfo {
        namespace: ns.into(),
        name: name.into(),
        labels: [("app".to_owned(), app.to_owned())].into(),
        service_account: "default".into(),
        ip: Some(Ipv4Addr::from(0x0a00_0000 + ip)),
        node: None,
    }
}

fn mesh_policy(ns: &str, name: &str, day: u8, spec: Value) -> Resource<meshauth_crds::MeshPolicySpec> {
    Resource {
        namespace: ns.into(),
        name: name.into(),
        created: Some(format!("2026-01-{day:02}T00:00:00Z")),
        spec: serde_json::from_value(spec).expect("spec"),
    }
}

#[test]
fn a_policy_past_its_namespaces_budget_is_left_out_whole_and_its_pods_stay_isolated() {
    // 100 source identities elsewhere, and a tenant policy from every namespace on 200 ports:
    // 20,400 entries for one destination, more than a namespace's budget.
    let mut pods: Vec<PodInfo> = (0..100).map(|i| pod("other", &format!("src{i}"), &format!("s{i}"), 100 + i)).collect();
    pods.push(pod("tenant", "api", "api", 1));
    pods.push(pod("other", "web", "web", 2));
    // Within every per-object limit of the webhook (4 rules of 50 ports), yet from every pod.
    let rules: Vec<Value> = (0..4)
        .map(|r| {
            let ports: Vec<Value> = (0..50).map(|i| json!({"port": 1000 + 2 * (50 * r + i)})).collect();
            json!({"from": [{"namespaceSelector": {}}], "ports": ports})
        })
        .collect();
    let inputs = Inputs {
        pods,
        mesh_policies: vec![
            mesh_policy("tenant", "small", 1, json!({"selector": {"matchLabels": {"app": "api"}}, "ingress": [{"ports": [{"port": 80}]}]})),
            mesh_policy("tenant", "huge", 2, json!({"selector": {"matchLabels": {"app": "api"}}, "ingress": rules})),
            mesh_policy(
                "other",
                "web",
                3,
                json!({"selector": {"matchLabels": {"app": "web"}}, "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 443}]}]}),
            ),
        ],
        ..Inputs::default()
    };
    let model = PolicyModel::new(ModelConfig::default(), inputs);
    assert!(model.problems().is_empty(), "every object is valid: {:?}", model.problems());
    let (tables, left_out) = compile_with_budget(&model, &mut NumberAllocator::default());
    assert_eq!(left_out.len(), 1, "{left_out:?}");
    assert_eq!(left_out[0].policy, ObjectRef::new("tenant", "huge"));
    assert_eq!(left_out[0].entries, 102 * 200, "every pod of the cluster (102 identities) on 200 ports");
    assert!(left_out[0].to_string().contains("NAMESPACE_POLICY_ENTRY_BUDGET"), "{}", left_out[0]);
    assert!(tables.policy.len() < NAMESPACE_POLICY_ENTRY_BUDGET);
    let (src, api, web) = (Ipv4Addr::from(0x0a00_0000 + 100), Ipv4Addr::from(0x0a00_0001), Ipv4Addr::from(0x0a00_0002));
    let verdict = |dst, port| evaluate(&tables, src, dst, TableProtocol::Tcp, port).map(|d| d.verdict);
    use crate::model::Verdict::{Allow, Deny};
    assert_eq!(verdict(api, 80), Some(Allow), "the older policy of the namespace stays");
    assert_eq!(verdict(api, 1000), Some(Deny), "the policy over budget allows nothing: its pod stays isolated");
    assert_eq!(verdict(web, 443), Some(Allow), "another namespace is not affected");
    assert_eq!(over_budget(&model), left_out);
}
