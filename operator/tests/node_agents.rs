//! A Node annotated to point at another node's SPIRE agent, against the real SPIRE server and
//! kube-apiserver of the test environment: the attested agents come from the server's Agent
//! API, and no entry of the forging node's pods is parented to the other node's agent.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use meshauth_crds::{MutualAuthMode, MutualAuthSpec, TrustDomain};
use meshauth_operator::registration::{EntrySettings, NODE_AGENT_ID_ANNOTATION, RegistrationError, desired, verified_node_agents};
use meshauth_operator::spire::client::SpireClient;
use meshauth_operator::spire::{EntryApi, Selector};
use meshauth_policy::model::{Inputs, ModelConfig, PodInfo, PolicyModel, Resource};
use serde_json::json;
use support::{OrPanic, env};

fn settings(trust_domain: &str) -> EntrySettings {
    EntrySettings {
        trust_domain: TrustDomain::new(trust_domain).or_panic("trust domain"),
        cluster_name: "kubernetes".into(),
        selectors: vec![Selector::parse("unix:uid:0").or_panic("selector")],
        x509_svid_ttl: 300,
    }
}

fn pod(name: &str, node: &str, ip: u8) -> PodInfo {
    PodInfo {
        namespace: "shop".into(),
        name: name.into(),
        labels: BTreeMap::new(),
        service_account: name.into(),
        ip: Some(std::net::Ipv4Addr::new(10, 244, 9, ip)),
        node: Some(node.into()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_pointing_at_another_nodes_spire_agent_gets_no_entries_parented_to_it() {
    let (env, client) = env().await;
    let [node1, node2] = env.nodes() else { panic!("two nodes expected") };
    let spire = SpireClient::new(&env.spire_server_socket(), Duration::from_secs(10)).or_panic("client");
    let attested = spire.list_agents().await;
    let agents = attested.as_ref().or_panic("ListAgents");
    for n in [node1, node2] {
        let agent = agents.iter().find(|a| a.id == n.agent_id).unwrap_or_else(|| panic!("{} not among {agents:?}", n.agent_id));
        assert_eq!(agent.attestation_type, "join_token");
    }

    // node-2, compromised, writes node-1's agent into its own Node's annotation.
    let nodes: Api<Node> = Api::all(client.clone());
    let patch = json!({"metadata": {"annotations": {NODE_AGENT_ID_ANNOTATION: node1.agent_id}}});
    nodes.patch(&node2.name, &PatchParams::default(), &Patch::Merge(&patch)).await.or_panic("annotate node-2");
    let listed = nodes.list(&ListParams::default()).await.or_panic("list nodes").items;
    let s = settings(env.trust_domain());
    let inputs = Inputs {
        pods: vec![pod("payment", &node1.name, 1), pod("refund", &node2.name, 2)],
        mutual_auths: vec![Resource {
            namespace: "shop".into(),
            name: "default".into(),
            created: Some("2024-01-01T00:00:00Z".into()),
            spec: MutualAuthSpec { selector: None, mode: MutualAuthMode::Strict },
        }],
        ..Default::default()
    };
    let model = PolicyModel::new(ModelConfig { trust_domain: s.trust_domain.clone(), ..Default::default() }, inputs);
    for trust_annotations in [false, true] {
        let verified = verified_node_agents(&listed, &s, &attested, trust_annotations);
        let d = desired(&model, &verified, &s);
        assert!(
            d.entries.keys().all(|k| !k.spiffe_id.ends_with("/sa/refund")),
            "trust {trust_annotations}: node-2's pod parented to node-1's agent: {:?}",
            d.entries.keys().collect::<Vec<_>>()
        );
        assert!(
            matches!(
                &verified[&node2.name],
                Err(RegistrationError::AgentOfAnotherNode { .. } | RegistrationError::AgentOfSeveralNodes { .. })
            ),
            "{verified:?}"
        );
    }

    // Named by node-2 alone again, with the opt-in for join tokens: node-2's own agent serves.
    let patch = json!({"metadata": {"annotations": {NODE_AGENT_ID_ANNOTATION: node2.agent_id}}});
    nodes.patch(&node2.name, &PatchParams::default(), &Patch::Merge(&patch)).await.or_panic("restore node-2");
    let listed = nodes.list(&ListParams::default()).await.or_panic("list nodes").items;
    let verified = verified_node_agents(&listed, &s, &attested, true);
    assert_eq!(verified[&node2.name], Ok(node2.agent_id.clone()));
    let d = desired(&model, &verified, &s);
    assert!(
        d.entries.keys().any(|k| k.spiffe_id.ends_with("/sa/refund") && k.parent_id == node2.agent_id),
        "{:?}",
        d.entries.keys().collect::<Vec<_>>()
    );

    // An agent SPIRE never attested is refused however far annotations are trusted.
    let patch = json!({"metadata": {"annotations": {NODE_AGENT_ID_ANNOTATION: format!("spiffe://{}/spire/agent/join_token/made-up", env.trust_domain())}}});
    nodes.patch(&node2.name, &PatchParams::default(), &Patch::Merge(&patch)).await.or_panic("forge node-2");
    let listed = nodes.list(&ListParams::default()).await.or_panic("list nodes").items;
    let verified = verified_node_agents(&listed, &s, &attested, true);
    assert!(matches!(&verified[&node2.name], Err(RegistrationError::UnattestedAgent { .. })), "{verified:?}");
    let patch = json!({"metadata": {"annotations": {NODE_AGENT_ID_ANNOTATION: node2.agent_id}}});
    nodes.patch(&node2.name, &PatchParams::default(), &Patch::Merge(&patch)).await.or_panic("restore node-2");
}
