//! `meshauthctl explain`: why one kind of packet from one pod to another is allowed or
//! dropped, by name (the MeshPolicy rule, the MutualAuth), and on a live node the pair's
//! proofs there. Live answers come from the node's agent (`/explain` on its metrics port,
//! loopback only: run it on the node or through `kubectl exec` in the agent pod); offline ones
//! from a directory of manifests, by the same model.

use crate::policy_check::{self, CheckError, CheckRequest};
use meshauth_policy::model::{Explanation, ObjectRef, Source, Verdict};
use meshauth_policy::tables::TableProtocol;
use serde::Serialize;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

/// Why there is no answer (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Offline(#[from] CheckError),
    #[error("cannot reach the agent at {addr}: {error} (it answers on its metrics port, to this node only)")]
    Unreachable { addr: SocketAddr, error: std::io::Error },
    #[error("the agent at {addr} answered {status}: {body}")]
    Refused { addr: SocketAddr, status: u16, body: String },
    #[error("the agent at {addr} sent no readable answer: {source}")]
    Unreadable {
        addr: SocketAddr,
        #[source]
        source: UnreadableAnswer,
    },
}

/// What was wrong with an agent's answer.
#[derive(Debug, thiserror::Error)]
pub enum UnreadableAnswer {
    #[error("no HTTP status line")]
    NoStatus,
    #[error("not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Where the answer comes from.
#[derive(Debug, Clone)]
pub enum Target {
    /// A directory of manifests, decided here.
    Manifests(PathBuf),
    /// The agent of this node at its metrics address.
    Agent(SocketAddr),
}

/// The offline answer, in the agent's shape less the node's live state.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct OfflineReport {
    from: String,
    to: String,
    port: u16,
    protocol: TableProtocol,
    #[serde(flatten)]
    explanation: Explanation,
    source_identity: String,
    destination_identity: String,
    destination_node: Option<String>,
    /// Where the datapath's tables differ from the model (a policy left out of them).
    notes: Vec<String>,
}

/// Answers one question; the JSON report (the agent's, or the offline one).
pub fn explain(req: &CheckRequest, target: &Target) -> Result<Value, ExplainError> {
    match target {
        Target::Manifests(_) => offline(req),
        Target::Agent(addr) => ask_agent(*addr, req),
    }
}

fn offline(req: &CheckRequest) -> Result<Value, ExplainError> {
    // The check refuses what the datapath never sees (pods without an IP, non-endpoints) and
    // answers from the tables when a policy is past its budget: its verdict is the datapath's.
    let checked = policy_check::check(req)?;
    let manifests = policy_check::load_manifests(&req.manifests)?;
    let config = meshauth_policy::model::ModelConfig { trust_domain: req.trust_domain.clone(), mesh_namespace: req.mesh_namespace.clone() };
    let model = policy_check::build_model(&manifests, manifests.snapshot().inputs, config)?;
    let pod = |s: &str| ObjectRef::parse(s).ok_or_else(|| CheckError::BadPodRef(s.to_owned()));
    let (from, to) = (pod(&req.from)?, pod(&req.to)?);
    let mut explanation = model
        .explain(&Source::Pod(from.clone()), &to, req.protocol, req.port)
        .map_err(|meshauth_policy::model::ModelError::UnknownPod(r)| CheckError::UnknownPod(r))?;
    explanation.decision.verdict = checked.verdict;
    explanation.decision.authentication = checked.authentication;
    let (Some(src), Some(dst)) = (model.pod(&from), model.pod(&to)) else { return Err(CheckError::UnknownPod(to).into()) };
    let notes = checked.explanation.iter().filter(|l| l.contains("left out of the datapath")).cloned().collect();
    let report = OfflineReport {
        notes,
        source_identity: model.spiffe_id(src).to_string(),
        destination_identity: model.spiffe_id(dst).to_string(),
        destination_node: dst.node.clone(),
        from: from.to_string(),
        to: to.to_string(),
        port: if req.protocol.has_ports() { req.port } else { 0 },
        protocol: req.protocol,
        explanation,
    };
    // Plain data with string keys: serialization cannot fail.
    Ok(serde_json::to_value(report).unwrap_or_default())
}

fn ask_agent(addr: SocketAddr, req: &CheckRequest) -> Result<Value, ExplainError> {
    let protocol = match req.protocol {
        TableProtocol::Tcp => "tcp",
        TableProtocol::Udp => "udp",
        TableProtocol::Icmp => "icmp",
        TableProtocol::Other => "other",
    };
    // Pod references are DNS labels and a slash: nothing to escape once they parse.
    for pod in [&req.from, &req.to] {
        if ObjectRef::parse(pod).is_none_or(|r| !r.to_string().chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '/'))) {
            return Err(CheckError::BadPodRef(pod.clone()).into());
        }
    }
    let path = format!("/explain?from={}&to={}&port={}&protocol={protocol}", req.from, req.to, req.port);
    let unreachable = |error| ExplainError::Unreachable { addr, error };
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(unreachable)?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(unreachable)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).map_err(unreachable)?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer.as_str(), ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(ExplainError::Unreadable { addr, source: UnreadableAnswer::NoStatus })?;
    if status != 200 {
        return Err(ExplainError::Refused { addr, status, body: body.trim().to_owned() });
    }
    serde_json::from_str(body).map_err(|e| ExplainError::Unreadable { addr, source: e.into() })
}

/// Whether the report's verdict is allow (the exit status: 0 allow, 1 deny). What passes
/// under audit is an allow: it passes.
pub fn allows(report: &Value) -> bool {
    report["verdict"] == serde_json::json!(Verdict::Allow)
}

/// The report for people.
pub fn render_table(report: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let mut out = format!("{:<24} {:<24} {:<10} {:<8} AUTHENTICATION\n", "FROM", "TO", "PORT", "VERDICT");
    out.push_str(&format!(
        "{:<24} {:<24} {:<10} {:<8} {}\n\n",
        s(&report["from"]),
        s(&report["to"]),
        format!("{}/{}", report["port"], s(&report["protocol"]).to_uppercase()),
        s(&report["verdict"]),
        s(&report["authentication"]),
    ));
    let selected = report["selectedBy"].as_array().cloned().unwrap_or_default();
    if selected.is_empty() {
        out.push_str(&format!("  {} is selected by no MeshPolicy: it accepts every source\n", s(&report["to"])));
    } else {
        let names: Vec<String> = selected.iter().map(s).collect();
        out.push_str(&format!("  selected by MeshPolicy {}\n", names.join(", ")));
        let rules = report["allowedBy"].as_array().cloned().unwrap_or_default();
        if rules.is_empty() {
            out.push_str("  no rule of those policies admits this source on this port\n");
        }
        for r in rules {
            out.push_str(&format!(
                "  allowed by MeshPolicy {} {} (authentication {})\n",
                s(&r["meshPolicy"]),
                s(&r["rule"]),
                s(&r["authentication"])
            ));
        }
    }
    let audited: Vec<String> = report["auditedBy"].as_array().into_iter().flatten().map(s).collect();
    if !audited.is_empty() {
        out.push_str(&format!("  in Audit (they drop nothing): MeshPolicy {}\n", audited.join(", ")));
    }
    match report["audit"].as_str() {
        Some("denied") => out.push_str("  AUDIT: passes, and is reported: enforced, the audited policies would drop it\n"),
        Some("authenticationRequired") => out.push_str(
            "  AUDIT: passes; reported while the pair is unauthenticated: enforced, an audited rule would require authentication\n",
        ),
        _ => {}
    }
    match report["mutualAuth"].as_object() {
        Some(m) => out.push_str(&format!("  mode {} from MutualAuth {}\n", s(&m["mode"]), s(&m["name"]))),
        None => out.push_str("  no MutualAuth applies to the destination\n"),
    }
    out.push_str(&format!(
        "  source identity: {}\n  destination identity: {}\n",
        s(&report["sourceIdentity"]),
        s(&report["destinationIdentity"])
    ));
    if let Some(proofs) = report["proofs"].as_array() {
        let node = s(&report["node"]);
        if proofs.is_empty() {
            out.push_str(&format!("  on {node}: the pair has no proof yet\n"));
        }
        for p in proofs {
            let state = match p["expiresInSeconds"].as_u64() {
                Some(secs) => format!("authenticated, expires in {secs} s"),
                None => "no entry".to_owned(),
            };
            let failure = match p["lastError"].as_str() {
                Some(e) => format!("; last handshake failed ({} failures): {e}", p["failures"]),
                None => String::new(),
            };
            let next = p["nextHandshakeInSeconds"].as_u64().map(|n| format!("; next handshake in {n} s")).unwrap_or_default();
            out.push_str(&format!("  on {node}, proof by {}: {state}{failure}{next}\n", s(&p["node"])));
        }
    }
    for note in report["notes"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        out.push_str(&format!("  {note}\n"));
    }
    out
}
