//! SPIFFE ID and trust domain parsing per the SPIFFE ID specification.
//!
//! Written here rather than taken from the `spiffe` crate because this crate must stay free of
//! gRPC/TLS dependencies (the webhook's fuzz target and the CRD generator link it), and because
//! admission denials must name the exact rule an ID breaks, which `spiffe`'s errors do not.

use std::fmt;
use std::str::FromStr;

/// The longest SPIFFE ID the specification allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
const SCHEME: &str = "spiffe://";

/// Why a string is not a valid SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("is empty")]
    Empty,
    #[error("is {0} bytes long, more than the {MAX_SPIFFE_ID_LEN} a SPIFFE ID may have")]
    TooLong(usize),
    #[error("must start with the scheme \"spiffe://\"")]
    WrongScheme,
    #[error("has an empty trust domain")]
    EmptyTrustDomain,
    #[error(
        "trust domain has character {0:?}; only lower-case letters, digits, '.', '-' and '_' are allowed (no port, user info or upper case)"
    )]
    BadTrustDomainChar(char),
    #[error("path has an empty segment (\"//\")")]
    EmptySegment,
    #[error("path has a \".\" or \"..\" segment")]
    DotSegment,
    #[error("path ends with a slash")]
    TrailingSlash,
    #[error("path has character {0:?}; only letters, digits, '.', '-' and '_' are allowed (no query, fragment or percent-encoding)")]
    BadPathChar(char),
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        if name.is_empty() {
            return Err(SpiffeIdError::EmptyTrustDomain);
        }
        if let Some(c) = name.chars().find(|c| !is_trust_domain_char(*c)) {
            return Err(SpiffeIdError::BadTrustDomainChar(c));
        }
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of a Kubernetes service account in this trust domain.
    pub fn service_account_id(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId { id: format!("{SCHEME}{}/ns/{namespace}/sa/{service_account}", self.0), trust_domain_len: self.0.len() }
    }
}

/// The trust domain of a cluster that names none: the Kubernetes cluster domain, as SPIRE's
/// and Istio's defaults. Every component's default comes from here.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

impl Default for TrustDomain {
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A valid SPIFFE ID, e.g. `spiffe://cluster.local/ns/shop/sa/order`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: String,
    trust_domain_len: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(id: &str) -> Result<Self, SpiffeIdError> {
        if id.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong(id.len()));
        }
        let rest = id.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::new(trust_domain)?;
        if !path.is_empty() {
            // `path` starts with '/': every segment after it must be non-empty.
            let segments: Vec<&str> = path[1..].split('/').collect();
            for (i, segment) in segments.iter().enumerate() {
                let segment = *segment;
                if segment.is_empty() {
                    return Err(if i + 1 == segments.len() { SpiffeIdError::TrailingSlash } else { SpiffeIdError::EmptySegment });
                }
                if segment == "." || segment == ".." {
                    return Err(SpiffeIdError::DotSegment);
                }
                if let Some(c) = segment.chars().find(|c| !is_path_char(*c)) {
                    return Err(SpiffeIdError::BadPathChar(c));
                }
            }
        }
        Ok(Self { id: id.to_owned(), trust_domain_len: trust_domain.len() })
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.id[SCHEME.len()..SCHEME.len() + self.trust_domain_len]
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.id[SCHEME.len() + self.trust_domain_len..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// `(namespace, service account)` when the path is `/ns/<ns>/sa/<sa>`.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn is_trust_domain_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for id in ["spiffe://cluster.local/ns/shop/sa/order", "spiffe://example.org", "spiffe://a_b-c.d/x/Y.z/-_", "spiffe://td/..a/a.."] {
            let parsed = SpiffeId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
            assert_eq!(parsed.as_str(), id);
        }
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/order").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/order");
        assert_eq!(id.service_account(), Some(("shop", "order")));
    }

    #[test]
    fn rejects_each_rule_of_the_spec() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let cases: &[(&str, SpiffeIdError)] = &[
            ("", SpiffeIdError::Empty),
            (&long, SpiffeIdError::TooLong(long.len())),
            ("http://td/x", SpiffeIdError::WrongScheme),
            ("SPIFFE://td/x", SpiffeIdError::WrongScheme),
            ("spiffe:/td/x", SpiffeIdError::WrongScheme),
            ("spiffe:///x", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://", SpiffeIdError::EmptyTrustDomain),
            ("spiffe://Cluster.local/x", SpiffeIdError::BadTrustDomainChar('C')),
            ("spiffe://td:8080/x", SpiffeIdError::BadTrustDomainChar(':')),
            ("spiffe://user@td/x", SpiffeIdError::BadTrustDomainChar('@')),
            ("spiffe://td/a//b", SpiffeIdError::EmptySegment),
            ("spiffe://td//", SpiffeIdError::EmptySegment),
            ("spiffe://td/a/./b", SpiffeIdError::DotSegment),
            ("spiffe://td/a/..", SpiffeIdError::DotSegment),
            ("spiffe://td/a/", SpiffeIdError::TrailingSlash),
            ("spiffe://td/", SpiffeIdError::TrailingSlash),
            ("spiffe://td/a?x=1", SpiffeIdError::BadPathChar('?')),
            ("spiffe://td/a#frag", SpiffeIdError::BadPathChar('#')),
            ("spiffe://td/a%20b", SpiffeIdError::BadPathChar('%')),
            ("spiffe://td?x", SpiffeIdError::BadTrustDomainChar('?')),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref().err(), Some(want), "{input}");
        }
    }

    #[test]
    fn builds_service_account_ids() {
        let td = TrustDomain::new("cluster.local").expect("valid");
        let id = td.service_account_id("prod", "payment");
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/prod/sa/payment");
        assert_eq!(SpiffeId::parse(id.as_str()), Ok(id));
    }
}
