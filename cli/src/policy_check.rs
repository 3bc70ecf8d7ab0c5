//! `meshauthctl policy check`: what the datapath would do for one packet, decided offline from
//! a directory of YAML manifests by the same model the agents compile into their maps.

use meshauth_agent::inputs::InputError;
use meshauth_cluster::manifests::Manifests;
use meshauth_crds::TrustDomain;
use meshauth_policy::model::{AuditFinding, Decision, Inputs, Kind, ModelConfig, ObjectRef, PolicyModel, Source, Verdict};
use meshauth_policy::tables::{AuthRequirement, TableProtocol};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why a check could not be answered. Every variant exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("{0:?} is not NS/POD")]
    BadPodRef(String),
    #[error("pod {0} is not in the manifests")]
    UnknownPod(ObjectRef),
    #[error("pod {0} has no status.podIP: the datapath only sees pods with an IP")]
    NoPodIp(ObjectRef),
    #[error("pod {0} is not a mesh endpoint: it {1}")]
    NotEndpoint(ObjectRef, meshauth_cluster::NotEndpoint),
    #[error(
        "pod {pod} is not a mesh endpoint: its IP {ip} is claimed by {claimants} too; the address is isolated and names no identity (it is a source without identity, and only the node reaches it)"
    )]
    SharedAddress { pod: ObjectRef, ip: std::net::Ipv4Addr, claimants: String },
    #[error("{}", .0.join("\n"))]
    InvalidSpecs(Vec<String>),
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// One check.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub manifests: PathBuf,
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: TableProtocol,
    pub trust_domain: TrustDomain,
    pub mesh_namespace: String,
}

/// The answer, in the JSON shape of MISSION.md §4.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub verdict: Verdict,
    pub authentication: AuthRequirement,
    /// What audited MeshPolicies would do to it, enforced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditFinding>,
    #[serde(skip)]
    pub explanation: Vec<String>,
}

/// Reads every manifest file under `dir` (recursively, in name order).
pub fn load_manifests(dir: &Path) -> Result<Manifests, CheckError> {
    Ok(meshauth_agent::inputs::read_manifest_dir(dir)?)
}

/// Builds the model from the manifests' `inputs`, refusing any spec problem (naming file,
/// object and field).
pub fn build_model(manifests: &Manifests, inputs: Inputs, config: ModelConfig) -> Result<PolicyModel, CheckError> {
    let model = PolicyModel::new(config, inputs);
    if !model.problems().is_empty() {
        let lines = model
            .problems()
            .iter()
            .map(|p| {
                let kind = match p.kind {
                    Kind::MeshPolicy => "MeshPolicy",
                    Kind::MutualAuth => "MutualAuth",
                };
                let file = manifests.origin(kind, &p.object).unwrap_or("(unknown file)");
                format!("{file}: {kind} {}: {}: {}", p.object, p.error.field, p.error.reason)
            })
            .collect();
        return Err(CheckError::InvalidSpecs(lines));
    }
    Ok(model)
}

/// Answers one check.
pub fn check(req: &CheckRequest) -> Result<CheckResult, CheckError> {
    let manifests = load_manifests(&req.manifests)?;
    let config = ModelConfig { trust_domain: req.trust_domain.clone(), mesh_namespace: req.mesh_namespace.clone() };
    let snapshot = manifests.snapshot();
    let model = build_model(&manifests, snapshot.inputs, config)?;
    let excluded = snapshot.not_endpoints;
    let shared = snapshot.shared_addresses;
    let pod_with_ip = |s: &str| {
        let r = ObjectRef::parse(s).ok_or_else(|| CheckError::BadPodRef(s.to_owned()))?;
        match excluded.iter().find(|(p, _)| *p == r) {
            Some((_, meshauth_cluster::NotEndpoint::NoAddress)) => return Err(CheckError::NoPodIp(r)),
            Some((_, meshauth_cluster::NotEndpoint::SharedAddress)) => {
                if let Some(address) = shared.iter().find(|a| a.pods.contains(&r)) {
                    let others: Vec<String> = address.pods.iter().filter(|p| **p != r).map(ToString::to_string).collect();
                    return Err(CheckError::SharedAddress { pod: r, ip: address.ip, claimants: others.join(", ") });
                }
            }
            Some((_, why)) => return Err(CheckError::NotEndpoint(r, *why)),
            None => {}
        }
        let pod = model.pod(&r).ok_or_else(|| CheckError::UnknownPod(r.clone()))?;
        if pod.ip.is_none() {
            return Err(CheckError::NoPodIp(r));
        }
        Ok(r)
    };
    let from = pod_with_ip(&req.from)?;
    let to = pod_with_ip(&req.to)?;
    let Decision { verdict, authentication, audit } =
        model.decide(&Source::Pod(from.clone()), &to, req.protocol, req.port).map_err(|e| match e {
            meshauth_policy::model::ModelError::UnknownPod(r) => CheckError::UnknownPod(r),
        })?;
    let mut explanation = explain(&model, &from, &to);
    // A policy past its namespace's entry budget is not in the datapath's tables: answer from
    // the tables the agent would write, and say why.
    let (tables, left_out) = meshauth_policy::compile::compile_with_budget(&model, &mut Default::default());
    let selecting = model.pod(&to).map(|p| model.selecting_policies(p)).unwrap_or_default();
    let relevant: Vec<_> = left_out.iter().filter(|o| selecting.contains(&o.policy)).collect();
    if relevant.is_empty() {
        return Ok(CheckResult { verdict, authentication, audit, explanation });
    }
    for o in &relevant {
        explanation.push(format!("MeshPolicy {} is left out of the datapath: it {o}", o.policy));
    }
    let (src_ip, dst_ip) = match (model.pod(&from).and_then(|p| p.ip), model.pod(&to).and_then(|p| p.ip)) {
        (Some(s), Some(d)) => (s, d),
        _ => return Err(CheckError::NoPodIp(to)),
    };
    let Decision { verdict, authentication, audit } = meshauth_policy::compile::evaluate(&tables, src_ip, dst_ip, req.protocol, req.port)
        .unwrap_or(Decision { verdict: Verdict::Allow, authentication: AuthRequirement::None, audit: None });
    Ok(CheckResult { verdict, authentication, audit, explanation })
}

fn explain(model: &PolicyModel, from: &ObjectRef, to: &ObjectRef) -> Vec<String> {
    let mut lines = Vec::new();
    let (Some(src), Some(dst)) = (model.pod(from), model.pod(to)) else { return lines };
    lines.push(format!("source identity: {}", model.spiffe_id(src)));
    lines.push(format!("destination identity: {}", model.spiffe_id(dst)));
    let policies = model.selecting_policies(dst);
    if policies.is_empty() {
        lines.push(format!("{to} is selected by no MeshPolicy: it accepts every source"));
    } else {
        let names: Vec<_> = policies.iter().map(ToString::to_string).collect();
        lines.push(format!("{to} is selected by MeshPolicy {}", names.join(", ")));
    }
    let audited: Vec<_> = model.auditing_policies(dst).iter().map(ToString::to_string).collect();
    if !audited.is_empty() {
        lines.push(format!("in Audit (what they would deny passes and is counted): {}", audited.join(", ")));
    }
    match model.mutual_auth_for(dst) {
        Some((ma, mode)) => lines.push(format!("{to} takes its mode from MutualAuth {ma}: {mode:?}")),
        None => lines.push(format!("no MutualAuth applies to {to}")),
    }
    lines
}

/// Renders a result.
pub fn render(req: &CheckRequest, result: &CheckResult, output: Output) -> String {
    match output {
        // Two plain enums: serialization cannot fail.
        Output::Json => serde_json::to_string(result).unwrap_or_default(),
        Output::Table => {
            let proto = match req.protocol {
                TableProtocol::Tcp => "TCP",
                TableProtocol::Udp => "UDP",
                TableProtocol::Icmp => "ICMP",
                TableProtocol::Other => "OTHER",
            };
            let verdict = match result.verdict {
                Verdict::Allow => "allow",
                Verdict::Deny => "deny",
            };
            let auth = match result.authentication {
                AuthRequirement::None => "none",
                AuthRequirement::Permissive => "permissive",
                AuthRequirement::Required => "required",
            };
            let meaning = match (result.audit, result.verdict, result.authentication) {
                (Some(AuditFinding::Denied), _, _) => {
                    "passes, reported as AUDIT: an audited MeshPolicy would drop it (no rule of it matches)"
                }
                (Some(AuditFinding::AuthenticationRequired), _, _) => {
                    "passes, reported as AUDIT while the pair is unauthenticated: an audited MeshPolicy rule requires authentication"
                }
                (None, verdict, authentication) => match (verdict, authentication) {
                    (Verdict::Allow, AuthRequirement::Required) => "passes once the pair is mutually authenticated",
                    (Verdict::Allow, AuthRequirement::Permissive) => "passes; handshakes happen and would-be drops are counted",
                    (Verdict::Allow, AuthRequirement::None) => "passes",
                    (Verdict::Deny, AuthRequirement::Required) => "dropped: authentication is required and the source has no identity",
                    (Verdict::Deny, _) => "dropped: no rule of the destination's MeshPolicies matches",
                },
            };
            let port = format!("{}/{proto}", req.port);
            let mut out = format!(
                "{:<24} {:<24} {:<10} {:<8} AUTHENTICATION\n{:<24} {:<24} {:<10} {:<8} {auth}\n\n{meaning}\n",
                "FROM", "TO", "PORT", "VERDICT", req.from, req.to, port, verdict
            );
            for line in &result.explanation {
                out.push_str(&format!("  {line}\n"));
            }
            out
        }
    }
}
