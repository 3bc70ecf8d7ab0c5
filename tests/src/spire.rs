//! Registration entries on the environment's SPIRE server, through the `spire-server` CLI
//! and its API socket (`entry create/show/delete -output json`).
//!
//! Test support only: the operator manages entries through the SPIRE server API itself; this
//! module lets tests arrange or inspect entries without depending on that code.

use std::path::PathBuf;

use serde_json::Value;
use tokio::process::Command;

/// Errors of the `spire-server` CLI.
#[derive(Debug, thiserror::Error)]
pub enum SpireError {
    /// The CLI could not be executed.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The CLI exited non-zero.
    #[error("`spire-server {args}` failed ({status}): {output}")]
    Failed { args: String, status: String, output: String },
    /// The CLI printed something that is not the expected JSON.
    #[error("`spire-server {args}` printed unexpected output ({reason}): {output}")]
    Output { args: String, reason: String, output: String },
    /// The server refused the request (a per-entry status in the JSON answer).
    #[error("SPIRE server refused `{args}`: code {code}: {message}")]
    Refused { args: String, code: i64, message: String },
}

/// A registration entry to create.
#[derive(Clone, Debug)]
pub struct EntrySpec {
    /// The SPIFFE ID the entry issues.
    pub spiffe_id: String,
    /// The parent: for a node-scoped entry, the node's SPIRE agent ID.
    pub parent_id: String,
    /// Selectors such as `unix:uid:0`.
    pub selectors: Vec<String>,
    /// X.509-SVID TTL in seconds (server default when `None`).
    pub x509_svid_ttl: Option<u32>,
    /// Optional hint returned with the SVID over the Workload API.
    pub hint: Option<String>,
}

impl EntrySpec {
    /// An entry for `spiffe_id` under `parent_id` with no selectors yet.
    pub fn new(spiffe_id: impl Into<String>, parent_id: impl Into<String>) -> Self {
        Self { spiffe_id: spiffe_id.into(), parent_id: parent_id.into(), selectors: Vec::new(), x509_svid_ttl: None, hint: None }
    }

    /// Adds a selector (`type:value`, e.g. `unix:uid:0`).
    pub fn selector(mut self, selector: impl Into<String>) -> Self {
        self.selectors.push(selector.into());
        self
    }

    /// Sets the X.509-SVID TTL in seconds.
    pub fn x509_svid_ttl(mut self, seconds: u32) -> Self {
        self.x509_svid_ttl = Some(seconds);
        self
    }

    /// Sets the hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// A registration entry as the server reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The server-assigned entry ID.
    pub id: String,
    /// `spiffe://…` of the entry.
    pub spiffe_id: String,
    /// `spiffe://…` of the parent.
    pub parent_id: String,
    /// Selectors as `type:value`.
    pub selectors: Vec<String>,
    /// X.509-SVID TTL in seconds (0: server default).
    pub x509_svid_ttl: i64,
}

/// The `spire-server` CLI bound to one server's API socket.
#[derive(Clone, Debug)]
pub struct SpireServer {
    bin: PathBuf,
    socket: PathBuf,
    trust_domain: String,
}

impl SpireServer {
    /// A CLI handle; [`crate::TestEnv::spire`] makes the one of an environment.
    pub fn new(bin: PathBuf, socket: PathBuf, trust_domain: String) -> Self {
        Self { bin, socket, trust_domain }
    }

    /// The server API socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Creates an entry and returns it with its ID.
    pub async fn create_entry(&self, spec: &EntrySpec) -> Result<Entry, SpireError> {
        let mut args: Vec<String> =
            vec!["entry".into(), "create".into(), "-spiffeID".into(), spec.spiffe_id.clone(), "-parentID".into(), spec.parent_id.clone()];
        for s in &spec.selectors {
            args.push("-selector".into());
            args.push(s.clone());
        }
        if let Some(ttl) = spec.x509_svid_ttl {
            args.push("-x509SVIDTTL".into());
            args.push(ttl.to_string());
        }
        if let Some(hint) = &spec.hint {
            args.push("-hint".into());
            args.push(hint.clone());
        }
        let v = self.run_json(&args).await?;
        let result = first_result(&args, &v)?;
        check_status(&args, result)?;
        let entry = result.get("entry").ok_or_else(|| output_err(&args, "no `entry` in the result", &v))?;
        parse_entry(&args, entry, &v)
    }

    /// Every entry of the server.
    pub async fn list_entries(&self) -> Result<Vec<Entry>, SpireError> {
        let args: Vec<String> = vec!["entry".into(), "show".into()];
        let v = self.run_json(&args).await?;
        let Some(entries) = v.get("entries") else {
            // An empty server answers `{}`.
            return Ok(Vec::new());
        };
        let entries = entries.as_array().ok_or_else(|| output_err(&args, "`entries` is not a list", &v))?;
        entries.iter().map(|e| parse_entry(&args, e, &v)).collect()
    }

    /// Deletes an entry by ID.
    pub async fn delete_entry(&self, id: &str) -> Result<(), SpireError> {
        let args: Vec<String> = vec!["entry".into(), "delete".into(), "-entryID".into(), id.into()];
        let v = self.run_json(&args).await?;
        let result = first_result(&args, &v)?;
        check_status(&args, result)
    }

    /// The SPIFFE IDs of the attested agents.
    pub async fn list_agents(&self) -> Result<Vec<String>, SpireError> {
        let args: Vec<String> = vec!["agent".into(), "list".into()];
        let v = self.run_json(&args).await?;
        let Some(agents) = v.get("agents").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        agents.iter().map(|a| spiffe_id_of(a.get("id")).ok_or_else(|| output_err(&args, "an agent without an id", &v))).collect()
    }

    async fn run_json(&self, args: &[String]) -> Result<Value, SpireError> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("-socketPath")
            .arg(&self.socket)
            .arg("-output")
            .arg("json")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|source| SpireError::Spawn { bin: self.bin.clone(), source })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(SpireError::Failed {
                args: args.join(" "),
                status: out.status.to_string(),
                output: format!("{stdout}{stderr}").trim().to_owned(),
            });
        }
        serde_json::from_str(stdout.trim()).map_err(|e| SpireError::Output { args: args.join(" "), reason: e.to_string(), output: stdout })
    }
}

fn output_err(args: &[String], reason: &str, v: &Value) -> SpireError {
    SpireError::Output { args: args.join(" "), reason: reason.to_owned(), output: v.to_string() }
}

fn first_result<'a>(args: &[String], v: &'a Value) -> Result<&'a Value, SpireError> {
    v.get("results").and_then(Value::as_array).and_then(|r| r.first()).ok_or_else(|| output_err(args, "no `results`", v))
}

fn check_status(args: &[String], result: &Value) -> Result<(), SpireError> {
    let code = result.pointer("/status/code").and_then(Value::as_i64).unwrap_or(0);
    if code != 0 {
        let message = result.pointer("/status/message").and_then(Value::as_str).unwrap_or("").to_owned();
        return Err(SpireError::Refused { args: args.join(" "), code, message });
    }
    Ok(())
}

/// `{"trust_domain": "td", "path": "/p"}` → `spiffe://td/p`.
fn spiffe_id_of(v: Option<&Value>) -> Option<String> {
    let v = v?;
    let td = v.get("trust_domain")?.as_str()?;
    let path = v.get("path").and_then(Value::as_str).unwrap_or("");
    Some(format!("spiffe://{td}{path}"))
}

fn parse_entry(args: &[String], e: &Value, whole: &Value) -> Result<Entry, SpireError> {
    let id = e.get("id").and_then(Value::as_str).ok_or_else(|| output_err(args, "an entry without an id", whole))?.to_owned();
    let spiffe_id = spiffe_id_of(e.get("spiffe_id")).ok_or_else(|| output_err(args, "an entry without a spiffe_id", whole))?;
    let parent_id = spiffe_id_of(e.get("parent_id")).ok_or_else(|| output_err(args, "an entry without a parent_id", whole))?;
    let selectors = e
        .get("selectors")
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(|s| Some(format!("{}:{}", s.get("type")?.as_str()?, s.get("value")?.as_str()?))).collect())
        .unwrap_or_default();
    let x509_svid_ttl = e.get("x509_svid_ttl").and_then(Value::as_i64).unwrap_or(0);
    Ok(Entry { id, spiffe_id, parent_id, selectors, x509_svid_ttl })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_cli_json_of_an_entry() {
        let v: Value = serde_json::json!({"results": [{"status": {"code": 0, "message": "OK"}, "entry": {
            "id": "abc", "spiffe_id": {"trust_domain": "td", "path": "/ns/a/sa/b"},
            "parent_id": {"trust_domain": "td", "path": "/spire/agent/join_token/x"},
            "selectors": [{"type": "unix", "value": "uid:0"}], "x509_svid_ttl": 30}}]});
        let args = vec!["entry".to_owned(), "create".to_owned()];
        let r = first_result(&args, &v).expect("result");
        check_status(&args, r).expect("status ok");
        let e = parse_entry(&args, &r["entry"], &v).expect("entry");
        assert_eq!(e.id, "abc");
        assert_eq!(e.spiffe_id, "spiffe://td/ns/a/sa/b");
        assert_eq!(e.parent_id, "spiffe://td/spire/agent/join_token/x");
        assert_eq!(e.selectors, vec!["unix:uid:0"]);
        assert_eq!(e.x509_svid_ttl, 30);
    }

    #[test]
    fn a_refused_entry_is_an_error() {
        let v: Value = serde_json::json!({"results": [{"status": {"code": 6, "message": "similar entry already exists"}}]});
        let args = vec!["entry".to_owned()];
        let r = first_result(&args, &v).expect("result");
        let err = check_status(&args, r).expect_err("refused");
        assert!(err.to_string().contains("similar entry already exists"), "{err}");
    }
}
