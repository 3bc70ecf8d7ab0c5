//! `meshauthctl observe`: the datapath's verdicts on this node with names (both pods, both
//! SPIFFE IDs, the reason, the rule, the MutualAuth), from the agent's `/flows` on its metrics
//! port (loopback only: run it on the node or with `kubectl exec` in the agent pod), filtered
//! as `hubble observe` filters.

use meshauth_agent::flows::FlowRecord;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why observing stopped short (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("cannot reach the agent at {addr}: {error} (it answers on its metrics port, to this node only)")]
    Unreachable { addr: SocketAddr, error: std::io::Error },
    #[error("the agent at {addr} answered {status}: {body}")]
    Refused { addr: SocketAddr, status: String, body: String },
    #[error("{0:?} is not a duration (like 30s, 5m, 2h)")]
    BadDuration(String),
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

/// Which records to show: each set filter must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `DROPPED`, `PERMISSIVE`, `AUDIT` or `FORWARDED` (any case).
    pub verdict: Option<String>,
    /// A reason (`drop_auth_missing`), or its part after `drop_` or `pass_` (`auth_missing`).
    pub reason: Option<String>,
    /// Either end's namespace.
    pub namespace: Option<String>,
    /// Either end, `NS/POD`.
    pub pod: Option<String>,
    /// Either end's SPIFFE ID.
    pub identity: Option<String>,
    /// Only records younger than this.
    pub since: Option<Duration>,
}

impl Filter {
    pub fn matches(&self, r: &FlowRecord, now: SystemTime) -> bool {
        let ends = [&r.source, &r.destination];
        let reason_ok = self
            .reason
            .as_deref()
            .is_none_or(|want| r.reason == want || r.reason.strip_prefix("drop_").or_else(|| r.reason.strip_prefix("pass_")) == Some(want));
        let namespace_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| ends.iter().any(|e| e.pod.as_deref().and_then(|p| p.split_once('/')).is_some_and(|(n, _)| n == ns)));
        let since_ok = self.since.is_none_or(|d| {
            let cutoff = now.checked_sub(d).and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |c| c.as_millis());
            u128::from(r.time_unix_ms) >= cutoff
        });
        self.verdict.as_deref().is_none_or(|v| r.verdict.eq_ignore_ascii_case(v))
            && reason_ok
            && namespace_ok
            && self.pod.as_deref().is_none_or(|p| ends.iter().any(|e| e.pod.as_deref() == Some(p)))
            && self.identity.as_deref().is_none_or(|id| ends.iter().any(|e| e.identity.as_deref() == Some(id)))
            && since_ok
    }
}

/// `30s`, `5m`, `2h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ObserveError> {
    let bad = || ObserveError::BadDuration(s.to_owned());
    let (number, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = number.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(secs))
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// What to ask the agent for.
#[derive(Debug, Clone)]
pub struct Request {
    pub agent: SocketAddr,
    pub filter: Filter,
    /// At most this many of the records the agent holds (the newest); `None`: all.
    pub last: Option<usize>,
    pub follow: bool,
    pub format: Format,
}

/// The table header.
pub const HEADER: &str =
    "TIME          VERDICT     REASON                 SOURCE                         DESTINATION                    RULE / MODE";

/// One record for people.
pub fn render_row(r: &FlowRecord) -> String {
    let end = |e: &meshauth_agent::flows::FlowEnd| format!("{}:{}", e.pod.clone().unwrap_or_else(|| e.ip.to_string()), e.port);
    let decided = match (&r.rule, &r.mutual_auth, r.policies.is_empty()) {
        _ if r.verdict == "AUDIT" && r.rule.is_none() => format!("audited, no rule of {}", r.by_policies.join(", ")),
        (Some(rule), Some(ma), _) => format!("{rule}; {ma}"),
        (Some(rule), None, _) => rule.clone(),
        (None, ma, false) => format!("no rule of {}{}", r.policies.join(", "), ma.as_ref().map(|m| format!("; {m}")).unwrap_or_default()),
        (None, Some(ma), true) => ma.clone(),
        (None, None, true) => "-".into(),
    };
    let ms = r.time_unix_ms % 86_400_000;
    let time = format!("{:02}:{:02}:{:02}.{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{time:<13} {:<11} {:<22} {:<30} {:<30} {decided} ({})", r.verdict, r.reason, end(&r.source), end(&r.destination), r.protocol)
}

/// Streams the matching records to `out` until the agent closes (or, not following, the
/// held records are written); how many were written.
pub fn observe(req: &Request, out: &mut dyn Write) -> Result<usize, ObserveError> {
    let addr = req.agent;
    let unreachable = |error| ObserveError::Unreachable { addr, error };
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
    if !req.follow {
        conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(unreachable)?;
    }
    write!(conn, "GET /flows?follow={} HTTP/1.0\r\nHost: {addr}\r\n\r\n", req.follow).map_err(unreachable)?;
    let mut reader = BufReader::new(conn);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(unreachable)?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(unreachable)? == 0 || line == "\r\n" {
            break;
        }
    }
    if status.split_whitespace().nth(1) != Some("200") {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        return Err(ObserveError::Refused { addr, status: status.trim().to_owned(), body: body.trim().to_owned() });
    }
    if req.format == Format::Table {
        writeln!(out, "{HEADER}").map_err(ObserveError::Output)?;
    }
    let emit = |out: &mut dyn Write, r: &FlowRecord, raw: &str| -> Result<(), ObserveError> {
        match req.format {
            Format::Json => writeln!(out, "{}", raw.trim_end()),
            Format::Table => writeln!(out, "{}", render_row(r)),
        }
        .map_err(ObserveError::Output)?;
        out.flush().map_err(ObserveError::Output)
    };
    // The held records come first (up to the agent's `{"following":true}` when following, else
    // to the end): keep the matching ones and show the last N of them; then each new one.
    let mut held: Vec<(FlowRecord, String)> = Vec::new();
    let mut written = 0;
    let mut following = false;
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(unreachable)? == 0 {
            break;
        }
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        if value.get("following").is_some() {
            written += flush_held(&mut held, req.last, out, &emit)?;
            following = true;
            continue;
        }
        if let Some(lost) = value.get("lost").and_then(serde_json::Value::as_u64) {
            eprintln!("meshauthctl observe: {lost} records lost (this follower fell behind)");
            continue;
        }
        let Ok(record) = serde_json::from_value::<FlowRecord>(value) else { continue };
        if !req.filter.matches(&record, SystemTime::now()) {
            continue;
        }
        if following {
            emit(out, &record, &line)?;
            written += 1;
        } else {
            held.push((record, line.clone()));
        }
    }
    written += flush_held(&mut held, req.last, out, &emit)?;
    Ok(written)
}

/// Writes one record (the parsed one for the table, the raw line for JSON).
type Emit<'a> = dyn Fn(&mut dyn Write, &FlowRecord, &str) -> Result<(), ObserveError> + 'a;

fn flush_held(
    held: &mut Vec<(FlowRecord, String)>,
    last: Option<usize>,
    out: &mut dyn Write,
    emit: &Emit<'_>,
) -> Result<usize, ObserveError> {
    let skip = last.map_or(0, |n| held.len().saturating_sub(n));
    let shown = held.len() - skip;
    for (r, raw) in held.drain(..).skip(skip) {
        emit(out, &r, &raw)?;
    }
    Ok(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshauth_agent::flows::FlowEnd;

    fn record(reason: &str, from: &str, to: &str, time_unix_ms: u64) -> FlowRecord {
        let end = |pod: &str| FlowEnd {
            ip: [10, 0, 0, 1].into(),
            port: 8080,
            pod: Some(pod.to_owned()),
            identity: Some(format!("spiffe://cluster.local/ns/{}/sa/x", pod.split('/').next().unwrap_or_default())),
        };
        FlowRecord {
            time_unix_ms,
            node: "node-2".into(),
            verdict: "DROPPED".into(),
            reason: reason.into(),
            protocol: "TCP".into(),
            source: end(from),
            destination: end(to),
            policies: vec!["shop/payment-ingress".into()],
            rule: Some("shop/payment-ingress spec.ingress[0]".into()),
            mutual_auth: Some("shop/default".into()),
            by_policies: vec!["shop/payment-ingress".into()],
        }
    }

    #[test]
    fn filters_match_either_end_and_reasons_with_or_without_their_prefix() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let r = record("drop_auth_missing", "shop/order-0", "shop/payment-0", 995_000);
        let f = |filter: Filter| filter.matches(&r, now);
        assert!(f(Filter::default()));
        assert!(f(Filter { reason: Some("auth_missing".into()), ..Filter::default() }));
        assert!(f(Filter { reason: Some("drop_auth_missing".into()), ..Filter::default() }));
        assert!(!f(Filter { reason: Some("denied".into()), ..Filter::default() }));
        assert!(f(Filter { pod: Some("shop/payment-0".into()), verdict: Some("dropped".into()), ..Filter::default() }));
        assert!(!f(Filter { namespace: Some("tools".into()), ..Filter::default() }));
        assert!(f(Filter { identity: Some("spiffe://cluster.local/ns/shop/sa/x".into()), ..Filter::default() }));
        assert!(f(Filter { since: Some(Duration::from_secs(10)), ..Filter::default() }));
        assert!(!f(Filter { since: Some(Duration::from_secs(2)), ..Filter::default() }));
        assert!(render_row(&r).contains("shop/order-0:8080"));
    }

    #[test]
    fn durations_take_seconds_minutes_and_hours() {
        assert_eq!(parse_duration("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m").ok(), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h").ok(), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("45").ok(), Some(Duration::from_secs(45)));
        assert!(parse_duration("5 minutes").is_err() && parse_duration("m").is_err());
    }
}
