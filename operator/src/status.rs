//! The status each `MeshPolicy` and `MutualAuth` should have, computed from one policy model and
//! the registration state: `observedGeneration`, `selectedPods` and the conditions `Accepted`,
//! `Ready` and (MutualAuth) `Conflicted`, plus the Events a user must act on.
//!
//! Pure: the answers come from the model (`problems`, `conflicts`, selected pods), never from
//! rules of its own, and nothing here talks to the API server. A condition keeps its
//! `lastTransitionTime` while its status stays the same, so computing twice gives the same
//! status and the caller can skip patches that would change nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use meshauth_crds::conditions::{ACCEPTED, CONFLICTED, READY};
use meshauth_crds::{Enforcement, MeshPolicyStatus, MutualAuthStatus};
use meshauth_policy::model::{Conflict, Kind, ObjectRef, PolicyModel};

use crate::registration::Desired;
use crate::spire::EntryKey;

/// Condition reasons.
pub mod reason {
    pub const ACCEPTED: &str = "Accepted";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NOT_ACCEPTED: &str = "NotAccepted";
    pub const REGISTERED: &str = "Registered";
    pub const REGISTRATION_PENDING: &str = "RegistrationPending";
    pub const REGISTRATION_BLOCKED: &str = "RegistrationBlocked";
    pub const CONFLICTED: &str = "Conflicted";
    pub const NO_CONFLICT: &str = "NoConflict";
    /// The policy would take its namespace past the policy-entry budget: not in the tables.
    pub const OVER_BUDGET: &str = "OverBudget";
}

/// A Kubernetes Event to record on an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

/// Which pods each resource selects (MeshPolicy) or decides the mode of (MutualAuth).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub mesh_policies: BTreeMap<ObjectRef, Vec<ObjectRef>>,
    pub mutual_auths: BTreeMap<ObjectRef, Vec<ObjectRef>>,
    /// MeshPolicies the agents leave out for their namespace's entry budget, and why.
    pub over_budget: BTreeMap<ObjectRef, String>,
}

impl Selection {
    /// One pass over the pods, asking the model what selects each.
    pub fn of(model: &PolicyModel) -> Self {
        let mut s = Selection::default();
        for pod in model.pods() {
            for p in model.selecting_policies(pod) {
                s.mesh_policies.entry(p).or_default().push(pod.object_ref());
            }
            if let Some((m, _)) = model.mutual_auth_for(pod) {
                s.mutual_auths.entry(m).or_default().push(pod.object_ref());
            }
        }
        s.over_budget = meshauth_policy::compile::over_budget(model).into_iter().map(|o| (o.policy.clone(), o.to_string())).collect();
        s
    }
}

/// How far registration of the needed entries has come.
#[derive(Debug, Clone, Copy)]
pub struct RegistrationState<'a> {
    pub desired: &'a Desired,
    /// Keys whose entry exists on the SPIRE server as desired.
    pub in_place: &'a BTreeSet<EntryKey>,
    /// The last SPIRE error, while registration is failing.
    pub spire_error: Option<&'a str>,
}

impl RegistrationState<'_> {
    /// `None` when every entry the pods need is in place, else the reason and a message.
    fn missing(&self, pods: &[ObjectRef]) -> Option<(&'static str, String)> {
        let mut blocked = BTreeSet::new();
        let mut pending = 0usize;
        for pod in pods {
            match self.desired.pods.get(pod) {
                None => {}
                Some(Err(e)) => {
                    blocked.insert(e.to_string());
                }
                Some(Ok(key)) if !self.in_place.contains(key) => pending += 1,
                Some(Ok(_)) => {}
            }
        }
        if !blocked.is_empty() {
            let list: Vec<String> = blocked.into_iter().collect();
            return Some((reason::REGISTRATION_BLOCKED, list.join("; ")));
        }
        (pending > 0).then(|| {
            let why = self.spire_error.map(|e| format!(": {e}")).unwrap_or_default();
            (reason::REGISTRATION_PENDING, format!("SPIRE entries for {pending} selected pods are not registered yet{why}"))
        })
    }
}

/// What a condition should say (the caller's `lastTransitionTime` handling comes after).
struct Want {
    type_: &'static str,
    status: bool,
    reason: &'static str,
    message: String,
}

fn finish(wants: Vec<Want>, generation: Option<i64>, current: &[Condition], now: &Time) -> Vec<Condition> {
    wants
        .into_iter()
        .map(|w| {
            let status = if w.status { "True" } else { "False" }.to_owned();
            let last_transition_time = current
                .iter()
                .find(|c| c.type_ == w.type_ && c.status == status)
                .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
            Condition {
                type_: w.type_.to_owned(),
                status,
                reason: w.reason.to_owned(),
                message: w.message,
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// Warnings for conditions that turned bad (or changed while bad).
fn warnings(old: &[Condition], new: &[Condition]) -> Vec<EventSpec> {
    let bad = |c: &Condition| {
        (c.type_ == ACCEPTED && c.status == "False")
            || (c.type_ == CONFLICTED && c.status == "True")
            || (c.type_ == READY && c.reason == reason::REGISTRATION_BLOCKED)
    };
    new.iter()
        .filter(|c| bad(c))
        .filter(|c| !old.iter().any(|o| o.type_ == c.type_ && o.status == c.status && o.reason == c.reason && o.message == c.message))
        .map(|c| EventSpec { warning: true, reason: c.reason.clone(), note: c.message.clone() })
        .collect()
}

fn accepted(model: &PolicyModel, kind: Kind, object: &ObjectRef) -> Want {
    let problems: Vec<String> = model
        .problems()
        .iter()
        .filter(|p| p.kind == kind && &p.object == object)
        .map(|p| format!("{}: {}", p.error.field, p.error.reason))
        .collect();
    if problems.is_empty() {
        Want { type_: ACCEPTED, status: true, reason: reason::ACCEPTED, message: "the spec is valid and in use".into() }
    } else {
        Want { type_: ACCEPTED, status: false, reason: reason::INVALID_SPEC, message: problems.join("; ") }
    }
}

fn ready(accepted: &Want, pods: &[ObjectRef], reg: &RegistrationState<'_>) -> Want {
    if !accepted.status {
        return Want { type_: READY, status: false, reason: reason::NOT_ACCEPTED, message: "the spec is not accepted".into() };
    }
    match reg.missing(pods) {
        Some((reason, message)) => Want { type_: READY, status: false, reason, message },
        None => Want {
            type_: READY,
            status: true,
            reason: reason::REGISTERED,
            message: format!("{} selected pods; every SPIFFE identity they need is registered on their nodes", pods.len()),
        },
    }
}

/// A computed status and the Events its changes call for.
#[derive(Debug, Clone, PartialEq)]
pub struct Computed<S> {
    pub status: S,
    pub events: Vec<EventSpec>,
}

/// The status of one MeshPolicy.
pub fn mesh_policy(
    model: &PolicyModel,
    selection: &Selection,
    reg: &RegistrationState<'_>,
    object: &ObjectRef,
    generation: Option<i64>,
    current: Option<&MeshPolicyStatus>,
    now: &Time,
) -> Computed<MeshPolicyStatus> {
    let pods = selection.mesh_policies.get(object).map(Vec::as_slice).unwrap_or_default();
    let mut accepted = accepted(model, Kind::MeshPolicy, object);
    if let (true, Some(why)) = (accepted.status, selection.over_budget.get(object)) {
        accepted = Want { type_: ACCEPTED, status: false, reason: reason::OVER_BUDGET, message: format!("not enforced: the policy {why}") };
    }
    let audited = model.is_audited(object) == Some(true);
    if audited && accepted.status {
        accepted.message =
            "the spec is valid and audited: the selected pods drop nothing for it; what it would deny passes and is counted as pass_audit"
                .into();
    }
    let ready = ready(&accepted, pods, reg);
    let old = current.map(|c| c.conditions.as_slice()).unwrap_or_default();
    let conditions = finish(vec![accepted, ready], generation, old, now);
    let events = warnings(old, &conditions);
    let selected = i32::try_from(model.mesh_policy_selected_pods(object)).unwrap_or(i32::MAX);
    let enforcement = model.is_audited(object).map(|audit| if audit { Enforcement::Audit } else { Enforcement::Enforce });
    Computed {
        status: MeshPolicyStatus { observed_generation: generation, selected_pods: Some(selected), enforcement, conditions },
        events,
    }
}

/// The status of one MutualAuth. `conflicts` is [`PolicyModel::conflicts`].
#[allow(clippy::too_many_arguments)]
pub fn mutual_auth(
    model: &PolicyModel,
    selection: &Selection,
    conflicts: &[Conflict],
    reg: &RegistrationState<'_>,
    object: &ObjectRef,
    generation: Option<i64>,
    current: Option<&MutualAuthStatus>,
    now: &Time,
) -> Computed<MutualAuthStatus> {
    let pods = selection.mutual_auths.get(object).map(Vec::as_slice).unwrap_or_default();
    let accepted = accepted(model, Kind::MutualAuth, object);
    let lost: Vec<&Conflict> = conflicts.iter().filter(|c| &c.loser == object).collect();
    let conflicted = if lost.is_empty() {
        Want {
            type_: CONFLICTED,
            status: false,
            reason: reason::NO_CONFLICT,
            message: "no older MutualAuth at the same level disagrees".into(),
        }
    } else {
        let parts: Vec<String> = lost
            .iter()
            .map(|c| format!("the older MutualAuth {} at the same level disagrees and wins ({} pods)", c.winner, c.pods.len()))
            .collect();
        Want { type_: CONFLICTED, status: true, reason: reason::CONFLICTED, message: parts.join("; ") }
    };
    let ready = if conflicted.status && accepted.status {
        Want { type_: READY, status: false, reason: reason::CONFLICTED, message: conflicted.message.clone() }
    } else {
        ready(&accepted, pods, reg)
    };
    let old = current.map(|c| c.conditions.as_slice()).unwrap_or_default();
    let conditions = finish(vec![accepted, ready, conflicted], generation, old, now);
    let events = warnings(old, &conditions);
    let selected = i32::try_from(model.mutual_auth_selected_pods(object)).unwrap_or(i32::MAX);
    Computed { status: MutualAuthStatus { observed_generation: generation, selected_pods: Some(selected), conditions }, events }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use meshauth_crds::{Authentication, AuthenticationMode, IngressRule, MeshPolicySpec, MutualAuthMode, MutualAuthSpec, PeerSelector};
    use meshauth_policy::model::{Inputs, ModelConfig, PodInfo, Resource};

    fn pod(ns: &str, name: &str, app: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_owned(), app.to_owned())].into(),
            service_account: app.into(),
            ip: Some(std::net::Ipv4Addr::new(10, 0, 0, name.len() as u8)),
            node: Some("n1".into()),
        }
    }

    fn labels(app: &str) -> LabelSelector {
        LabelSelector { match_labels: Some([("app".to_owned(), app.to_owned())].into()), ..Default::default() }
    }

    fn policy(name: &str, app: &str, identity: Option<&str>) -> Resource<MeshPolicySpec> {
        Resource {
            namespace: "shop".into(),
            name: name.into(),
            created: Some("2024-01-01T00:00:00Z".into()),
            spec: MeshPolicySpec {
                selector: labels(app),
                ingress: vec![IngressRule {
                    from: identity.map(|i| vec![PeerSelector { identity: Some(i.into()), ..Default::default() }]).unwrap_or_default(),
                    ports: vec![],
                    authentication: Some(Authentication { mode: AuthenticationMode::Required }),
                }],
                ..Default::default()
            },
        }
    }

    fn ma(name: &str, created: &str, mode: MutualAuthMode) -> Resource<MutualAuthSpec> {
        Resource {
            namespace: "shop".into(),
            name: name.into(),
            created: Some(created.into()),
            spec: MutualAuthSpec { selector: None, mode },
        }
    }

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).expect("valid"))
    }

    fn cond<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap_or_else(|| panic!("no {t} in {c:?}"))
    }

    #[test]
    fn a_policy_past_its_namespaces_entry_budget_is_not_accepted_and_says_why() {
        let mut pods: Vec<PodInfo> = (0..100).map(|i| pod("shop", &format!("p{i}"), &format!("app{i}"))).collect();
        pods.push(pod("shop", "api", "api"));
        // Within every per-object limit (4 rules of 50 ports), but from every pod of the
        // cluster: 101 identities x 200 ports.
        let rules: Vec<serde_json::Value> = (0..4)
            .map(|r| {
                let ports: Vec<_> = (0..50).map(|i| serde_json::json!({"port": 1000 + 50 * r + i})).collect();
                serde_json::json!({"from": [{"namespaceSelector": {}}], "ports": ports})
            })
            .collect();
        let huge: MeshPolicySpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "api"}},
            "ingress": rules,
        }))
        .expect("spec");
        let model = PolicyModel::new(
            ModelConfig::default(),
            Inputs {
                pods,
                mesh_policies: vec![
                    policy("pay", "api", None),
                    Resource { namespace: "shop".into(), name: "huge".into(), created: Some("2024-02-01T00:00:00Z".into()), spec: huge },
                ],
                ..Default::default()
            },
        );
        let sel = Selection::of(&model);
        let desired = crate::registration::Desired::default();
        let none = BTreeSet::new();
        let reg = RegistrationState { desired: &desired, in_place: &none, spire_error: None };
        let c = mesh_policy(&model, &sel, &reg, &ObjectRef::new("shop", "huge"), Some(1), None, &now());
        let a = cond(&c.status.conditions, ACCEPTED);
        assert_eq!((a.status.as_str(), a.reason.as_str()), ("False", reason::OVER_BUDGET));
        assert!(a.message.contains("NAMESPACE_POLICY_ENTRY_BUDGET") && a.message.contains("20200"), "{}", a.message);
        assert!(c.events.iter().any(|e| e.warning), "the user gets a warning Event");
        let older = mesh_policy(&model, &sel, &reg, &ObjectRef::new("shop", "pay"), Some(1), None, &now());
        assert_eq!(cond(&older.status.conditions, ACCEPTED).status, "True", "the older policy stays in force");
    }

    #[test]
    fn a_valid_policy_is_accepted_and_ready_once_its_entries_are_in_place() {
        let model = PolicyModel::new(
            ModelConfig::default(),
            Inputs {
                pods: vec![pod("shop", "p1", "pay"), pod("shop", "p22", "pay"), pod("shop", "o1", "order")],
                mesh_policies: vec![policy("pay", "pay", None)],
                ..Default::default()
            },
        );
        let settings = crate::registration::EntrySettings {
            trust_domain: Default::default(),
            cluster_name: "c".into(),
            selectors: vec![],
            x509_svid_ttl: 0,
        };
        let agents = [("n1".to_owned(), Ok("spiffe://cluster.local/agent/n1".to_owned()))].into();
        let desired = crate::registration::desired(&model, &agents, &settings);
        assert!(!desired.entries.is_empty());
        let sel = Selection::of(&model);
        let obj = ObjectRef::new("shop", "pay");
        let none = BTreeSet::new();
        let reg = RegistrationState { desired: &desired, in_place: &none, spire_error: Some("unavailable") };
        let c = mesh_policy(&model, &sel, &reg, &obj, Some(3), None, &now());
        assert_eq!(c.status.selected_pods, Some(2));
        assert_eq!(c.status.observed_generation, Some(3));
        assert_eq!(cond(&c.status.conditions, ACCEPTED).status, "True");
        let r = cond(&c.status.conditions, READY);
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", reason::REGISTRATION_PENDING));
        assert!(r.message.contains("unavailable"), "{}", r.message);
        assert!(c.events.is_empty());

        let all: BTreeSet<EntryKey> = desired.entries.keys().cloned().collect();
        let reg = RegistrationState { desired: &desired, in_place: &all, spire_error: None };
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_100).expect("valid"));
        let c2 = mesh_policy(&model, &sel, &reg, &obj, Some(3), Some(&c.status), &later);
        let r = cond(&c2.status.conditions, READY);
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("True", reason::REGISTERED));
        assert_eq!(r.last_transition_time, later, "Ready changed status");
        assert_eq!(cond(&c2.status.conditions, ACCEPTED).last_transition_time, now(), "Accepted did not");
        // Computing again changes nothing: the caller can skip the patch.
        let c3 = mesh_policy(&model, &sel, &reg, &obj, Some(3), Some(&c2.status), &later);
        assert_eq!(c3.status, c2.status);
    }

    #[test]
    fn an_invalid_spec_is_not_accepted_with_field_and_reason_and_a_warning() {
        let model = PolicyModel::new(
            ModelConfig::default(),
            Inputs {
                pods: vec![pod("shop", "p1", "pay")],
                mesh_policies: vec![policy("pay", "pay", Some("spiffe://Bad/x"))],
                ..Default::default()
            },
        );
        let desired = Desired::default();
        let none = BTreeSet::new();
        let reg = RegistrationState { desired: &desired, in_place: &none, spire_error: None };
        let c = mesh_policy(&model, &Selection::of(&model), &reg, &ObjectRef::new("shop", "pay"), Some(1), None, &now());
        let a = cond(&c.status.conditions, ACCEPTED);
        assert_eq!((a.status.as_str(), a.reason.as_str()), ("False", reason::INVALID_SPEC));
        assert!(a.message.contains("spec.ingress[0].from[0]"), "{}", a.message);
        assert_eq!(cond(&c.status.conditions, READY).reason, reason::NOT_ACCEPTED);
        assert_eq!(c.events.len(), 1);
        assert!(c.events[0].warning);
        // The same problem again is not a new event.
        let again = mesh_policy(&model, &Selection::of(&model), &reg, &ObjectRef::new("shop", "pay"), Some(1), Some(&c.status), &now());
        assert!(again.events.is_empty());
    }

    #[test]
    fn the_younger_of_two_disagreeing_namespace_wide_mutual_auths_is_conflicted() {
        let model = PolicyModel::new(
            ModelConfig::default(),
            Inputs {
                pods: vec![pod("shop", "p1", "pay")],
                mutual_auths: vec![
                    ma("old", "2024-01-01T00:00:00Z", MutualAuthMode::Strict),
                    ma("new", "2024-02-01T00:00:00Z", MutualAuthMode::Disabled),
                ],
                ..Default::default()
            },
        );
        let sel = Selection::of(&model);
        let conflicts = model.conflicts();
        let desired = Desired::default();
        let none = BTreeSet::new();
        let reg = RegistrationState { desired: &desired, in_place: &none, spire_error: None };
        let new = mutual_auth(&model, &sel, &conflicts, &reg, &ObjectRef::new("shop", "new"), Some(1), None, &now());
        let c = cond(&new.status.conditions, CONFLICTED);
        assert_eq!(c.status, "True");
        assert!(c.message.contains("shop/old"), "{}", c.message);
        assert_eq!(cond(&new.status.conditions, READY).reason, reason::CONFLICTED);
        assert_eq!(new.status.selected_pods, Some(0));
        assert!(new.events.iter().any(|e| e.reason == reason::CONFLICTED));
        let old = mutual_auth(&model, &sel, &conflicts, &reg, &ObjectRef::new("shop", "old"), Some(1), None, &now());
        assert_eq!(cond(&old.status.conditions, CONFLICTED).status, "False");
        assert_eq!(old.status.selected_pods, Some(1));
    }
}
