//! Why the model decides as it does, by name: the MeshPolicies that select the destination,
//! the rules that admit the packet, and the MutualAuth that sets the destination's mode. What
//! `meshauthctl explain` and the agent's `/explain` report; the decision is [`PolicyModel::decide`]'s.

use super::{Decision, ModelError, ObjectRef, PolicyModel, Source};
use crate::tables::{AuthRequirement, TableProtocol};
use meshauth_crds::MutualAuthMode;
use serde::{Serialize, Serializer};

/// Object references as `namespace/name`, as people write them.
fn as_name<S: Serializer>(r: &ObjectRef, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(r)
}

fn as_names<S: Serializer>(refs: &[ObjectRef], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(refs.iter().map(ToString::to_string))
}

/// A MeshPolicy rule: the policy and the rule's place in its `spec.ingress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleRef {
    #[serde(serialize_with = "as_name")]
    pub mesh_policy: ObjectRef,
    /// `spec.ingress[N]`.
    pub rule: String,
    /// What the rule requires of the pair.
    pub authentication: AuthRequirement,
}

/// The MutualAuth that sets a pod's mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeFrom {
    #[serde(serialize_with = "as_name")]
    pub name: ObjectRef,
    pub mode: MutualAuthMode,
}

/// A decision with its reasons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    #[serde(flatten)]
    pub decision: Decision,
    /// The MeshPolicies selecting the destination; none: it accepts every source.
    #[serde(serialize_with = "as_names")]
    pub selected_by: Vec<ObjectRef>,
    /// Those of them in Audit: what they would deny passes (see `audit`).
    #[serde(serialize_with = "as_names", skip_serializing_if = "Vec::is_empty")]
    pub audited_by: Vec<ObjectRef>,
    /// The rules that admit this source on this port: of the enforced policies, or of the
    /// audited ones when only those select the destination.
    pub allowed_by: Vec<RuleRef>,
    /// Where the destination's mode comes from; `None`: no MutualAuth applies.
    pub mutual_auth: Option<ModeFrom>,
}

impl PolicyModel {
    /// [`PolicyModel::decide`], with the objects that make the decision.
    pub fn explain(&self, source: &Source, dst: &ObjectRef, protocol: TableProtocol, port: u16) -> Result<Explanation, ModelError> {
        let decision = self.decide(source, dst, protocol, port)?;
        let dst_pod = self.pods.get(dst).ok_or_else(|| ModelError::UnknownPod(dst.clone()))?;
        let src = self.source_view(source)?;
        let port = if protocol.has_ports() { port } else { 0 };
        let allowed_by = self
            .policy_rules_for(dst_pod)
            .flat_map(|(policy, rules)| rules.iter().map(move |r| (policy, r)))
            .filter(|(_, r)| self.rule_matches_source(r, &src) && Self::rule_ports(r, protocol).any(|(s, e)| s <= port && port <= e))
            .map(|(policy, r)| RuleRef {
                mesh_policy: policy.clone(),
                rule: format!("spec.ingress[{}]", r.ingress),
                authentication: r.auth,
            })
            .collect();
        Ok(Explanation {
            decision,
            selected_by: self.selecting_policies(dst_pod),
            audited_by: self.auditing_policies(dst_pod),
            allowed_by,
            mutual_auth: self.mutual_auth_for(dst_pod).map(|(name, mode)| ModeFrom { name, mode }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Inputs, ModelConfig, PodInfo, Resource, Verdict};
    use serde_json::json;

    fn pod(name: &str, app: &str) -> PodInfo {
        PodInfo {
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            service_account: app.into(),
            ip: None,
            node: None,
        }
    }

    fn model() -> PolicyModel {
        let payment_ingress = json!({
            "selector": {"matchLabels": {"app": "payment"}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": "web"}}}], "ports": [{"port": 9090}]},
                {"from": [{"podSelector": {"matchLabels": {"app": "order"}}}], "ports": [{"port": 8080}], "authentication": {"mode": "Required"}}
            ]
        });
        let inputs = Inputs {
            pods: vec![pod("payment-0", "payment"), pod("order-0", "order"), pod("web-0", "web")],
            mesh_policies: vec![Resource {
                namespace: "shop".into(),
                name: "payment-ingress".into(),
                created: Some("2025-01-01T00:00:00Z".into()),
                spec: serde_json::from_value(payment_ingress).expect("MeshPolicy spec"),
            }],
            mutual_auths: vec![Resource {
                namespace: "shop".into(),
                name: "shop-strict".into(),
                created: Some("2025-01-01T00:00:00Z".into()),
                spec: serde_json::from_value(json!({"mode": "Strict"})).expect("MutualAuth spec"),
            }],
            ..Inputs::default()
        };
        PolicyModel::new(ModelConfig::default(), inputs)
    }

    #[test]
    fn names_the_rule_that_admits_and_the_mutual_auth_that_sets_the_mode() {
        let model = model();
        let (order, payment, web) =
            (ObjectRef::new("shop", "order-0"), ObjectRef::new("shop", "payment-0"), ObjectRef::new("shop", "web-0"));
        let e = model.explain(&Source::Pod(order.clone()), &payment, TableProtocol::Tcp, 8080).expect("explain");
        assert_eq!(e.decision, model.decide(&Source::Pod(order.clone()), &payment, TableProtocol::Tcp, 8080).expect("decide"));
        assert_eq!(e.decision.authentication, AuthRequirement::Required);
        assert_eq!(e.selected_by, [ObjectRef::new("shop", "payment-ingress")]);
        assert_eq!(
            e.allowed_by,
            [RuleRef {
                mesh_policy: ObjectRef::new("shop", "payment-ingress"),
                rule: "spec.ingress[1]".into(),
                authentication: AuthRequirement::Required
            }]
        );
        assert_eq!(e.mutual_auth, Some(ModeFrom { name: ObjectRef::new("shop", "shop-strict"), mode: MutualAuthMode::Strict }));
        let json = serde_json::to_value(&e).expect("json");
        assert_eq!(json["verdict"], "allow");
        assert_eq!(json["allowedBy"][0]["meshPolicy"], "shop/payment-ingress");
        assert_eq!(json["mutualAuth"]["name"], "shop/shop-strict");
        assert_eq!(json["selectedBy"][0], "shop/payment-ingress");
        // The web pod on order's port: no rule admits it.
        let denied = model.explain(&Source::Pod(web), &payment, TableProtocol::Tcp, 8080).expect("explain");
        assert!(denied.allowed_by.is_empty());
        assert_eq!(denied.decision.verdict, Verdict::Deny);
        // A pod no policy selects accepts every source, and says so.
        let open = model.explain(&Source::Pod(payment), &order, TableProtocol::Tcp, 80).expect("explain");
        assert!(open.selected_by.is_empty() && open.allowed_by.is_empty());
        assert_eq!(open.decision.verdict, Verdict::Allow);
    }
}
