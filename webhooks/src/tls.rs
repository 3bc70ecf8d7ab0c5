//! TLS for the webhook: one explicit crypto provider (ring), and a certificate store that
//! the server resolves each handshake against, so a new serving certificate (from files or from
//! the self-managed CA) takes effect on the next connection without a restart.

pub mod files;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Why a certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no PEM certificate in {0}")]
    NoCertificate(String),
    #[error("cannot read PEM certificates of {what}: {source}")]
    CertificatePem { what: String, source: rustls::pki_types::pem::Error },
    #[error("no usable PEM private key in {what}: {source}")]
    KeyPem { what: String, source: rustls::pki_types::pem::Error },
    #[error("the key does not fit the certificate or cannot be used: {0}")]
    Key(rustls::Error),
    #[error("cannot parse the leaf certificate: {0}")]
    Parse(String),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot build the TLS server configuration: {0}")]
    Config(rustls::Error),
    #[error("the client CA of {what} is unusable: {reason}")]
    ClientCa { what: String, reason: String },
}

/// The crypto provider of every TLS configuration of the webhook.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A loaded serving certificate and when it expires.
#[derive(Clone)]
pub struct ServingCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServingCert").field("not_before", &self.not_before).field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

impl ServingCert {
    /// Parses a PEM chain (leaf first) and a PEM private key, checking that they match.
    /// `what` names the source in errors.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::CertificatePem { what: what.to_owned(), source })?;
        let Some(leaf) = chain.first() else {
            return Err(TlsError::NoCertificate(what.to_owned()));
        };
        let (not_before, not_after) = validity(leaf)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::KeyPem { what: what.to_owned(), source })?;
        let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(TlsError::Key)?;
        Ok(Self { key: Arc::new(certified), not_before, not_after })
    }
}

/// `notBefore` and `notAfter` of a DER certificate.
pub fn validity(cert: &[u8]) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError::Parse(e.to_string()))?;
    let v = parsed.validity();
    Ok((unix(v.not_before.timestamp()), unix(v.not_after.timestamp())))
}

fn unix(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => UNIX_EPOCH,
    }
}

/// The serving certificate now in use; every handshake reads it.
#[derive(Debug, Default)]
pub struct CertStore {
    current: RwLock<Option<ServingCert>>,
}

impl CertStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `cert` from the next handshake on.
    pub fn set(&self, cert: ServingCert) {
        match self.current.write() {
            Ok(mut current) => *current = Some(cert),
            Err(poisoned) => *poisoned.into_inner() = Some(cert),
        }
    }

    /// The certificate now served.
    pub fn current(&self) -> Option<ServingCert> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether a certificate is loaded (the webhook is healthy only then).
    pub fn is_ready(&self) -> bool {
        self.current().is_some()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current().map(|c| c.key)
    }
}

/// Reads the CAs whose client certificates the webhook accepts (PEM, one or more).
pub fn read_client_ca(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let what = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: what.clone(), source })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::CertificatePem { what: what.clone(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// The server configuration: TLS 1.2 and 1.3 with ring, certificates from `store`, ALPN h2 and
/// http/1.1. With `client_ca`, a client must present a certificate chaining to one of those CAs
/// (the API server's, set up through its admission configuration): then nobody else can send
/// the webhook reviews, forged ones included.
pub fn server_config(store: Arc<CertStore>, client_ca: Option<&[CertificateDer<'static>]>) -> Result<rustls::ServerConfig, TlsError> {
    let builder =
        rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().map_err(TlsError::Config)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => {
            let unusable = |reason: String| TlsError::ClientCa { what: "--client-ca".into(), reason };
            let mut roots = rustls::RootCertStore::empty();
            for ca in cas {
                roots.add(ca.clone()).map_err(|e| unusable(e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| unusable(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Throwaway certificates for tests.

    /// A self-signed CA and a leaf for `names` it signed: `(ca_pem, leaf_pem, leaf_key_pem)`.
    pub fn ca_and_leaf(names: &[&str]) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test ca");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        let leaf = params.signed_by(&key, &issuer).expect("leaf");
        (ca.pem(), leaf.pem(), key.serialize_pem())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_matching_pem_and_rejects_mismatch() {
        let (_, leaf, key) = testing::ca_and_leaf(&["localhost"]);
        let cert = ServingCert::from_pem(leaf.as_bytes(), key.as_bytes(), "test").expect("loads");
        assert!(cert.not_after > SystemTime::now());
        let (_, _, other_key) = testing::ca_and_leaf(&["localhost"]);
        let err = ServingCert::from_pem(leaf.as_bytes(), other_key.as_bytes(), "test").expect_err("mismatch");
        assert!(err.to_string().contains("does not fit"), "{err}");
        let err = ServingCert::from_pem(b"", key.as_bytes(), "cert.pem").expect_err("empty");
        assert!(err.to_string().contains("no PEM certificate in cert.pem"), "{err}");
        let err = ServingCert::from_pem(leaf.as_bytes(), b"garbage", "key.pem").expect_err("no key");
        assert!(err.to_string().contains("no usable PEM private key in key.pem"), "{err}");
    }

    #[test]
    fn store_serves_the_latest_certificate() {
        let store = CertStore::new();
        assert!(!store.is_ready());
        let (_, leaf, key) = testing::ca_and_leaf(&["a"]);
        store.set(ServingCert::from_pem(leaf.as_bytes(), key.as_bytes(), "a").expect("a"));
        assert!(store.is_ready());
        server_config(Arc::new(store), None).expect("config");
    }
}
