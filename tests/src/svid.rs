//! X.509-SVIDs from a node's SPIFFE Workload API (the `spiffe` crate), and an independent
//! check of an SVID against a trust bundle (chain signatures, validity, SPIFFE ID).
//!
//! Test support only: the check is strict enough for assertions about what SPIRE hands out,
//! not a replacement for the verifier the product uses.

use std::os::unix::fs::MetadataExt as _;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt as _};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Bundle, X509Context, X509Svid};
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// Errors of fetching and checking SVIDs.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    /// No SVID for the SPIFFE ID arrived in time.
    #[error("no X.509-SVID for {spiffe_id} from {endpoint} within {waited:?} (last Workload API answer: {last})")]
    Timeout { spiffe_id: String, endpoint: String, waited: Duration, last: String },
    /// The Workload API returned an error that retrying will not fix.
    #[error("Workload API {endpoint}: {source}")]
    WorkloadApi {
        endpoint: String,
        #[source]
        source: WorkloadApiError,
    },
    /// The response had the SVID but no bundle for its trust domain.
    #[error("the Workload API returned no X.509 bundle for trust domain {0}")]
    NoBundle(String),
    /// A certificate of the chain or bundle does not parse.
    #[error("{what} is not a valid X.509 certificate: {reason}")]
    Parse { what: String, reason: String },
    /// The SVID does not satisfy the X509-SVID rules or does not chain to the bundle.
    #[error("X.509-SVID {spiffe_id} is invalid: {reason}")]
    Invalid { spiffe_id: String, reason: String },
}

/// What a successful [`verify_svid`] established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The SPIFFE ID (the leaf's only URI SAN).
    pub spiffe_id: String,
    /// The leaf's serial number (hex).
    pub serial: String,
    /// The leaf's notBefore, Unix seconds.
    pub not_before: i64,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
}

/// The effective uid of this process (the `unix` workload attestor's `uid` selector).
pub fn current_uid() -> u32 {
    std::fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

/// `unix:uid:<uid of this process>`, the selector that makes SPIRE issue an entry to it.
pub fn uid_selector() -> String {
    format!("unix:uid:{}", current_uid())
}

/// Waits until the Workload API at `endpoint` (`unix:/path`) delivers an SVID for
/// `spiffe_id`; returns it with the bundle of its trust domain. Errors the agent gives while
/// no entry matches yet (`PermissionDenied: no identity issued`) are retried until `timeout`.
pub async fn wait_for_svid(endpoint: &str, spiffe_id: &str, timeout: Duration) -> Result<(X509Svid, X509Bundle), SvidError> {
    let mut watch = SvidWatch::new(endpoint, spiffe_id);
    watch.next(timeout).await
}

type ContextStream = Pin<Box<dyn Stream<Item = Result<X509Context, WorkloadApiError>> + Send>>;

/// Follows one SPIFFE ID on a Workload API stream: each [`SvidWatch::next`] returns an SVID for
/// it that differs from the one returned before (the first, then each rotation).
pub struct SvidWatch {
    endpoint: String,
    spiffe_id: String,
    stream: Option<ContextStream>,
    last_leaf: Option<Vec<u8>>,
    last_answer: String,
}

impl SvidWatch {
    /// A watch; it connects on the first [`SvidWatch::next`].
    pub fn new(endpoint: &str, spiffe_id: &str) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            spiffe_id: spiffe_id.to_owned(),
            stream: None,
            last_leaf: None,
            last_answer: "none yet".to_owned(),
        }
    }

    /// The next SVID for the SPIFFE ID whose leaf differs from the last one returned, with the
    /// bundle of its trust domain; reconnects when the stream ends or fails.
    pub async fn next(&mut self, timeout: Duration) -> Result<(X509Svid, X509Bundle), SvidError> {
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(self.timeout(start));
            }
            let left = deadline - now;
            let item = match &mut self.stream {
                None => match tokio::time::timeout(left, self.connect()).await {
                    Err(_) => return Err(self.timeout(start)),
                    Ok(Ok(s)) => {
                        self.stream = Some(s);
                        continue;
                    }
                    Ok(Err(e)) => Err(e),
                },
                Some(s) => match tokio::time::timeout(left, s.next()).await {
                    Err(_) => return Err(self.timeout(start)),
                    Ok(None) => Err(WorkloadApiError::EmptyResponse),
                    Ok(Some(r)) => r,
                },
            };
            match item {
                Ok(ctx) => {
                    self.last_answer =
                        format!("SVIDs for [{}]", ctx.svids().iter().map(|s| s.spiffe_id().to_string()).collect::<Vec<_>>().join(", "));
                    let Some(svid) = ctx.svids().iter().find(|s| s.spiffe_id().to_string() == self.spiffe_id) else {
                        continue;
                    };
                    let leaf = svid.leaf().as_bytes().to_vec();
                    if self.last_leaf.as_ref() == Some(&leaf) {
                        continue;
                    }
                    let td = svid.spiffe_id().trust_domain();
                    let bundle = ctx.bundle_set().get(td).ok_or_else(|| SvidError::NoBundle(td.to_string()))?;
                    self.last_leaf = Some(leaf);
                    return Ok(((**svid).clone(), (*bundle).clone()));
                }
                Err(e) => {
                    if !retryable(&e) {
                        return Err(SvidError::WorkloadApi { endpoint: self.endpoint.clone(), source: e });
                    }
                    self.last_answer = e.to_string();
                    self.stream = None;
                    tokio::time::sleep(Duration::from_millis(300).min(deadline.saturating_duration_since(Instant::now()))).await;
                }
            }
        }
    }

    async fn connect(&self) -> Result<ContextStream, WorkloadApiError> {
        let client = WorkloadApiClient::connect_to(&self.endpoint).await?;
        let stream = client.stream_x509_contexts().await?;
        Ok(Box::pin(stream))
    }

    fn timeout(&self, start: Instant) -> SvidError {
        SvidError::Timeout {
            spiffe_id: self.spiffe_id.clone(),
            endpoint: self.endpoint.clone(),
            waited: start.elapsed(),
            last: self.last_answer.clone(),
        }
    }
}

/// Errors worth retrying while an agent starts or has not synced an entry yet.
fn retryable(e: &WorkloadApiError) -> bool {
    // Connection failures, "no identity issued" (PermissionDenied), stream ends: all transient
    // here. Only a malformed answer is final.
    !matches!(e, WorkloadApiError::MissingRequiredField { .. } | WorkloadApiError::InvalidResponseField { .. })
}

fn parse<'a>(der: &'a [u8], what: &str) -> Result<X509Certificate<'a>, SvidError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse { what: what.to_owned(), reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(SvidError::Parse { what: what.to_owned(), reason: "trailing bytes".into() });
    }
    Ok(cert)
}

/// Checks `svid` against `bundle`: the leaf carries exactly one URI SAN, equal to the SVID's
/// SPIFFE ID, in the bundle's trust domain; the leaf is not a CA; every certificate is valid
/// now; each is signed by the next, and the last by an authority of the bundle.
pub fn verify_svid(svid: &X509Svid, bundle: &X509Bundle) -> Result<VerifiedSvid, SvidError> {
    let id = svid.spiffe_id().to_string();
    let invalid = |reason: String| SvidError::Invalid { spiffe_id: id.clone(), reason };

    if svid.spiffe_id().trust_domain() != bundle.trust_domain() {
        return Err(invalid(format!("not in the bundle's trust domain {}", bundle.trust_domain())));
    }
    let chain: Vec<X509Certificate<'_>> = svid
        .cert_chain()
        .iter()
        .enumerate()
        .map(|(i, c)| parse(c.as_bytes(), &format!("certificate {i} of the chain of {id}")))
        .collect::<Result<_, _>>()?;
    let leaf = chain.first().ok_or_else(|| invalid("empty chain".into()))?;

    let san = leaf
        .subject_alternative_name()
        .map_err(|e| invalid(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| invalid("the leaf has no subjectAltName".into()))?;
    let uris: Vec<&str> =
        san.value.general_names.iter().filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None }).collect();
    if uris != [id.as_str()] {
        return Err(invalid(format!("the leaf's URI SANs are {uris:?}, expected exactly [{id}]")));
    }
    if leaf.is_ca() {
        return Err(invalid("the leaf is a CA certificate".into()));
    }

    for (i, cert) in chain.iter().enumerate() {
        if !cert.validity().is_valid() {
            return Err(invalid(format!(
                "certificate {i} is not valid now (notBefore {}, notAfter {})",
                cert.validity().not_before,
                cert.validity().not_after
            )));
        }
        if let Some(issuer) = chain.get(i + 1) {
            if !issuer.is_ca() {
                return Err(invalid(format!("certificate {} signs but is not a CA", i + 1)));
            }
            cert.verify_signature(Some(issuer.public_key()))
                .map_err(|e| invalid(format!("certificate {i} is not signed by certificate {}: {e}", i + 1)))?;
        }
    }
    let top = chain.last().ok_or_else(|| invalid("empty chain".into()))?;
    let authorities: Vec<X509Certificate<'_>> = bundle
        .authorities()
        .iter()
        .enumerate()
        .map(|(i, c)| parse(c.as_bytes(), &format!("authority {i} of the bundle")))
        .collect::<Result<_, _>>()?;
    let signed = authorities.iter().any(|a| a.validity().is_valid() && top.verify_signature(Some(a.public_key())).is_ok());
    if !signed {
        return Err(invalid(format!("the chain does not end at any of the bundle's {} authorities", authorities.len())));
    }
    Ok(VerifiedSvid {
        spiffe_id: id.clone(),
        serial: leaf.raw_serial_as_string(),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
    })
}
