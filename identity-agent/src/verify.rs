//! X.509-SVID verification per the SPIFFE X509-SVID specification.
//!
//! Job: decide whether a presented certificate chain (leaf first) is a valid X.509-SVID of a
//! trust domain we hold a bundle for, and return its SPIFFE ID and the instant it stops being
//! valid. The handshakes (both directions) and `meshauthctl svid verify` use this one function,
//! so what the CLI accepts is exactly what the agents accept.
//!
//! What it checks, in order (cheap structural checks first, signatures last):
//! - the chain is not empty and every certificate parses as DER X.509 with nothing trailing;
//! - exactly one leaf (a certificate without `cA=true`) and it is the first one: a chain with two
//!   leaves, or whose first certificate is a CA, is a substituted chain and is refused (the bug
//!   Cilium had to fix: a verifier that picks "some" leaf lets an attacker bring someone else's);
//! - the leaf has exactly one URI SAN and it is a valid SPIFFE ID (`meshauth_crds::SpiffeId`)
//!   with a path: `spiffe://cluster.local` alone names the trust domain, which X509-SVID §5.2
//!   allows only for signing certificates, so a leaf carrying it is refused;
//! - the leaf has key usage `digitalSignature` and neither `keyCertSign` nor `cRLSign`;
//! - signing certificates (the rest of the chain) carry `keyCertSign` when they have key usage;
//! - the SPIFFE ID belongs to the expected trust domain (when one is expected) and we hold a
//!   bundle for its trust domain;
//! - the chain verifies to that bundle with webpki (signatures, validity times of every
//!   certificate on the path, basic constraints, path length, name constraints, EKU if present).
//!
//! What it must not do: pick a trust bundle by anything but the SPIFFE ID's trust domain; accept
//! an ID match by prefix; look at the subject/CN; read the clock itself (the caller passes `now`,
//! so tests and the injectable clock of the SVID store control time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshauth_crds::{SpiffeId, SpiffeIdError};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, TrustAnchor, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Which side of a TLS handshake the SVID authenticates; selects the extended key usage that
/// must be present *if* the certificate has an EKU extension (SPIRE's SVIDs carry both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// The peer is a TLS client (`id-kp-clientAuth`).
    Client,
    /// The peer is a TLS server (`id-kp-serverAuth`).
    Server,
    /// No particular use (the CLI): any EKU is accepted.
    Any,
}

/// Why a chain is not a valid X.509-SVID for us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("certificate {index} of the chain is not valid DER X.509: {reason}")]
    Malformed { index: usize, reason: String },
    #[error("the chain has no leaf: every certificate is a CA")]
    NoLeaf,
    #[error("the first certificate is a CA; the leaf (certificate {leaf_index}) must come first")]
    LeafNotFirst { leaf_index: usize },
    #[error("the chain has more than one leaf (certificates 0 and {second}): a substituted chain")]
    MultipleLeaves { second: usize },
    #[error("the leaf has {0} URI SANs; an X.509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("the leaf's URI SAN {uri:?} is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: SpiffeIdError },
    #[error("the leaf's SPIFFE ID {0} has no path; a leaf X.509-SVID must name a workload, not only its trust domain (X509-SVID §5.2)")]
    NoPath(String),
    #[error("the leaf's key usage {0}")]
    LeafKeyUsage(&'static str),
    #[error("signing certificate {0} lacks key usage keyCertSign")]
    SignerKeyUsage(usize),
    #[error("SPIFFE ID {id} is not in the expected trust domain {expected}")]
    WrongTrustDomain { id: String, expected: String },
    #[error("SPIFFE ID {got} is not the expected {expected}")]
    WrongSpiffeId { got: String, expected: String },
    #[error("no trust bundle for trust domain {0}")]
    NoBundle(String),
    #[error("a certificate of the chain expired at {0} (unix seconds)")]
    Expired(u64),
    #[error("a certificate of the chain is not valid before {0} (unix seconds)")]
    NotYetValid(u64),
    #[error("the chain does not lead to a CA of the trust domain's bundle")]
    UnknownIssuer,
    #[error("a signature in the chain does not verify")]
    BadSignature,
    #[error("the chain is invalid: {0}")]
    Chain(String),
}

impl VerifyError {
    /// A short, stable label for metrics (`reason` label) and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::EmptyChain => "empty_chain",
            Self::Malformed { .. } => "malformed_certificate",
            Self::NoLeaf => "no_leaf",
            Self::LeafNotFirst { .. } => "leaf_not_first",
            Self::MultipleLeaves { .. } => "multiple_leaves",
            Self::UriSanCount(_) | Self::BadSpiffeId { .. } | Self::NoPath(_) => "bad_spiffe_id",
            Self::LeafKeyUsage(_) | Self::SignerKeyUsage(_) => "bad_key_usage",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::WrongSpiffeId { .. } => "wrong_spiffe_id",
            Self::NoBundle(_) => "unknown_trust_domain",
            Self::Expired(_) => "expired",
            Self::NotYetValid(_) => "not_yet_valid",
            Self::UnknownIssuer => "unknown_ca",
            Self::BadSignature => "bad_signature",
            Self::Chain(_) => "invalid_chain",
        }
    }
}

/// The X.509 authorities of one trust domain, with webpki trust anchors prepared once (parsing
/// them per handshake would cost more than the signature checks).
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: String,
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl TrustBundle {
    /// A bundle from DER authorities. Fails when one is not a usable trust anchor.
    pub fn new(trust_domain: &str, certs: Vec<CertificateDer<'static>>) -> Result<Self, VerifyError> {
        let anchors = certs
            .iter()
            .enumerate()
            .map(|(index, cert)| {
                webpki::anchor_from_trusted_cert(cert)
                    .map(|anchor| anchor.to_owned())
                    .map_err(|e| VerifyError::Malformed { index, reason: e.to_string() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { trust_domain: trust_domain.to_owned(), certs, anchors })
    }

    /// The trust domain name (no scheme).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The authorities, DER.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }
}

/// Bundles by trust domain name: ours plus federated ones.
#[derive(Debug, Clone, Default)]
pub struct BundleSet {
    bundles: HashMap<String, Arc<TrustBundle>>,
}

impl BundleSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces the bundle of its trust domain.
    pub fn insert(&mut self, bundle: TrustBundle) {
        self.bundles.insert(bundle.trust_domain.clone(), Arc::new(bundle));
    }

    /// The bundle of a trust domain.
    pub fn get(&self, trust_domain: &str) -> Option<&Arc<TrustBundle>> {
        self.bundles.get(trust_domain)
    }

    /// Every bundle.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<TrustBundle>> {
        self.bundles.values()
    }

    /// Number of trust domains.
    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    /// Whether there is no bundle at all.
    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }
}

/// A chain that passed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// The SPIFFE ID of the leaf's URI SAN.
    pub id: SpiffeId,
    /// The earliest `notAfter` of the presented certificates (leaf and intermediates): past it
    /// the chain no longer verifies, so nothing derived from it may outlive it.
    pub not_after: SystemTime,
}

/// The signature algorithms of the one crypto provider the agent uses (ring), so the CLI and
/// the handshakes accept the same algorithms.
pub fn signature_algorithms() -> &'static [&'static dyn SignatureVerificationAlgorithm] {
    rustls::crypto::ring::default_provider().signature_verification_algorithms.all
}

/// Verifies `chain` (leaf first) as an X.509-SVID against `bundles` at time `now`.
///
/// `trust_domain`, when given, is the only trust domain accepted.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    trust_domain: Option<&str>,
    usage: Usage,
    now: SystemTime,
) -> Result<VerifiedSvid, VerifyError> {
    let leaf = check_structure(chain)?;
    if let Some(expected) = trust_domain
        && leaf.id.trust_domain() != expected
    {
        return Err(VerifyError::WrongTrustDomain { id: leaf.id.to_string(), expected: expected.to_owned() });
    }
    let bundle = bundles.get(leaf.id.trust_domain()).ok_or_else(|| VerifyError::NoBundle(leaf.id.trust_domain().to_owned()))?;
    verify_path(chain, &bundle.anchors, usage, now)?;
    Ok(VerifiedSvid { id: leaf.id, not_after: leaf.not_after })
}

/// Like [`verify_svid`] and also requires the SPIFFE ID to be exactly `expected`.
pub fn verify_svid_for(
    chain: &[CertificateDer<'_>],
    bundles: &BundleSet,
    expected: &SpiffeId,
    usage: Usage,
    now: SystemTime,
) -> Result<VerifiedSvid, VerifyError> {
    let verified = verify_svid(chain, bundles, Some(expected.trust_domain()), usage, now)?;
    if &verified.id != expected {
        return Err(VerifyError::WrongSpiffeId { got: verified.id.to_string(), expected: expected.to_string() });
    }
    Ok(verified)
}

struct Leaf {
    id: SpiffeId,
    not_after: SystemTime,
}

/// The SPIFFE rules that webpki does not know about: leaf position, SAN, key usage.
fn check_structure(chain: &[CertificateDer<'_>]) -> Result<Leaf, VerifyError> {
    if chain.is_empty() {
        return Err(VerifyError::EmptyChain);
    }
    let mut parsed = Vec::with_capacity(chain.len());
    for (index, der) in chain.iter().enumerate() {
        let (rest, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| VerifyError::Malformed { index, reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(VerifyError::Malformed { index, reason: "trailing bytes".to_owned() });
        }
        parsed.push(cert);
    }
    let is_ca = |index: usize, cert: &X509Certificate<'_>| -> Result<bool, VerifyError> {
        cert.basic_constraints()
            .map(|bc| bc.is_some_and(|bc| bc.value.ca))
            .map_err(|e| VerifyError::Malformed { index, reason: e.to_string() })
    };
    let mut leaves = Vec::new();
    for (index, cert) in parsed.iter().enumerate() {
        if !is_ca(index, cert)? {
            leaves.push(index);
        }
    }
    match leaves.as_slice() {
        [] => return Err(VerifyError::NoLeaf),
        [0] => {}
        [0, second, ..] => return Err(VerifyError::MultipleLeaves { second: *second }),
        [first, ..] => return Err(VerifyError::LeafNotFirst { leaf_index: *first }),
    }

    let leaf = &parsed[0];
    let malformed = |index: usize| move |e: x509_parser::error::X509Error| VerifyError::Malformed { index, reason: e.to_string() };
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .map_err(malformed(0))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let [uri] = uris.as_slice() else {
        return Err(VerifyError::UriSanCount(uris.len()));
    };
    let id = SpiffeId::parse(uri).map_err(|reason| VerifyError::BadSpiffeId { uri: (*uri).to_owned(), reason })?;
    if id.path().is_empty() {
        return Err(VerifyError::NoPath(id.to_string()));
    }

    match leaf.key_usage().map_err(malformed(0))? {
        None => return Err(VerifyError::LeafKeyUsage("extension is missing")),
        Some(ku) if !ku.value.digital_signature() => {
            return Err(VerifyError::LeafKeyUsage("lacks digitalSignature"));
        }
        Some(ku) if ku.value.key_cert_sign() || ku.value.crl_sign() => {
            return Err(VerifyError::LeafKeyUsage("has keyCertSign or cRLSign"));
        }
        Some(_) => {}
    }
    for (index, cert) in parsed.iter().enumerate().skip(1) {
        if let Some(ku) = cert.key_usage().map_err(malformed(index))?
            && !ku.value.key_cert_sign()
        {
            return Err(VerifyError::SignerKeyUsage(index));
        }
    }

    // The earliest notAfter of what was presented: webpki checks every certificate of the path
    // at `now`, so the chain stops verifying at the first expiry.
    let not_after = parsed.iter().map(|cert| cert.validity().not_after.timestamp()).min().map(unix_to_system_time).unwrap_or(UNIX_EPOCH);
    Ok(Leaf { id, not_after })
}

fn verify_path(chain: &[CertificateDer<'_>], anchors: &[TrustAnchor<'_>], usage: Usage, now: SystemTime) -> Result<(), VerifyError> {
    let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| VerifyError::Malformed { index: 0, reason: e.to_string() })?;
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let time = UnixTime::since_unix_epoch(since_epoch);
    let intermediates = &chain[1..];
    let result = match usage {
        Usage::Client => {
            leaf.verify_for_usage(signature_algorithms(), anchors, intermediates, time, webpki::KeyUsage::client_auth(), None, None)
        }
        Usage::Server => {
            leaf.verify_for_usage(signature_algorithms(), anchors, intermediates, time, webpki::KeyUsage::server_auth(), None, None)
        }
        Usage::Any => leaf.verify_for_usage(signature_algorithms(), anchors, intermediates, time, AnyUsage, None, None),
    };
    result.map(|_| ()).map_err(map_webpki_error)
}

/// Accepts any extended key usage: `svid verify` has no TLS role to check.
struct AnyUsage;

impl webpki::ExtendedKeyUsageValidator for AnyUsage {
    fn validate(&self, _iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        Ok(())
    }
}

fn map_webpki_error(error: webpki::Error) -> VerifyError {
    match error {
        webpki::Error::CertExpired { not_after, .. } => VerifyError::Expired(not_after.as_secs()),
        webpki::Error::CertNotValidYet { not_before, .. } => VerifyError::NotYetValid(not_before.as_secs()),
        webpki::Error::UnknownIssuer => VerifyError::UnknownIssuer,
        webpki::Error::InvalidSignatureForPublicKey
        | webpki::Error::UnsupportedSignatureAlgorithmForPublicKeyContext(_)
        | webpki::Error::UnsupportedSignatureAlgorithmContext(_) => VerifyError::BadSignature,
        other => VerifyError::Chain(format!("{other:?}")),
    }
}

fn unix_to_system_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => UNIX_EPOCH,
    }
}

/// Why `svid verify` could not even start verifying.
#[derive(Debug, thiserror::Error)]
pub enum VerifyFileError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not valid PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{0} is not a valid trust domain: {1}")]
    TrustDomain(String, SpiffeIdError),
    #[error("the bundle is unusable: {0}")]
    Bundle(VerifyError),
    #[error(transparent)]
    Invalid(#[from] VerifyError),
}

impl VerifyFileError {
    /// A short, stable label, as [`VerifyError::reason`].
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } | Self::NoCertificate { .. } | Self::Pem { .. } => "unreadable_input",
            Self::TrustDomain(..) => "bad_trust_domain",
            Self::Bundle(_) => "bad_bundle",
            Self::Invalid(e) => e.reason(),
        }
    }
}

/// Reads every PEM `CERTIFICATE` of a file, in order.
pub fn read_pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, VerifyFileError> {
    let bytes = std::fs::read(path).map_err(|source| VerifyFileError::Read { path: path.to_owned(), source })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| VerifyFileError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(VerifyFileError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

/// `meshauthctl svid verify`: verifies the chain in `chain_pem` (leaf first) against the CAs in
/// `bundle_pem`, which are taken as the bundle of `trust_domain` (when given; then only that
/// trust domain is accepted) or of the chain's own trust domain.
pub fn verify_svid_files(
    bundle_pem: &Path,
    chain_pem: &Path,
    trust_domain: Option<&str>,
    now: SystemTime,
) -> Result<VerifiedSvid, VerifyFileError> {
    if let Some(td) = trust_domain {
        meshauth_crds::TrustDomain::new(td).map_err(|e| VerifyFileError::TrustDomain(td.to_owned(), e))?;
    }
    let authorities = read_pem_certificates(bundle_pem)?;
    let chain = read_pem_certificates(chain_pem)?;
    // The bundle file says nothing about its trust domain: bind it to the one asked for, or to
    // the leaf's own (the structure check runs first, so this reads a validated SPIFFE ID).
    let td = match trust_domain {
        Some(td) => td.to_owned(),
        None => check_structure(&chain)?.id.trust_domain().to_owned(),
    };
    let mut bundles = BundleSet::new();
    bundles.insert(TrustBundle::new(&td, authorities).map_err(VerifyFileError::Bundle)?);
    Ok(verify_svid(&chain, &bundles, Some(&td), Usage::Any, now)?)
}

#[cfg(test)]
mod tests;

/// rcgen-made CAs and SVIDs, good and malformed (feature `testing`, shared with other crates'
/// tests).
#[cfg(any(test, feature = "testing"))]
pub mod test_certs;
