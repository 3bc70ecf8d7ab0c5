//! One generation: a fresh CA and a serving certificate it signed, both ECDSA P-256.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use rustls::pki_types::pem::PemObject;

use super::{CertError, unix_secs};
use crate::tls::{ServingCert, validity};

/// How far back `notBefore` is set, for clocks that lag ours.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// A CA and the serving certificate it signed, as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Generation {
    pub ca_cert: String,
    pub ca_key: String,
    pub tls_cert: String,
    pub tls_key: String,
    /// The earlier expiry of the CA and the serving certificate.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

impl Generation {
    /// A new CA and serving certificate for `dns_names` (DNS names or IP addresses), valid from
    /// `now` (less [`CLOCK_SKEW`]) for `validity`.
    pub fn new(dns_names: &[String], now: SystemTime, validity: Duration) -> Result<Self, CertError> {
        // Whole seconds, as a certificate stores them, so a stored generation reads back equal.
        let whole = |t: SystemTime| UNIX_EPOCH + Duration::from_secs(unix_secs(t));
        let not_before = whole(now.checked_sub(CLOCK_SKEW).unwrap_or(now));
        let not_after = whole(now + validity);

        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        // A distinct subject per generation, so that two CAs in one bundle never look alike.
        ca.distinguished_name.push(DnType::CommonName, format!("meshauth-webhook CA {}", unix_secs(now)));
        ca.distinguished_name.push(DnType::OrganizationName, format!("meshauth {:016x}", rand_u64(&ca_key)));
        ca.not_before = not_before.into();
        ca.not_after = not_after.into();
        let ca_cert = ca.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(ca, ca_key);

        let key = KeyPair::generate()?;
        let mut leaf = CertificateParams::new(dns_names.to_vec())?;
        if let Some(first) = dns_names.first() {
            leaf.distinguished_name.push(DnType::CommonName, first.clone());
        }
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.not_before = not_before.into();
        leaf.not_after = not_after.into();
        let tls_cert = leaf.signed_by(&key, &issuer)?;

        Ok(Self { ca_cert: ca_cert.pem(), ca_key: ca_key_pem, tls_cert: tls_cert.pem(), tls_key: key.serialize_pem(), not_after })
    }

    /// Reads a stored generation, checking that the serving certificate and key fit.
    pub fn from_pem(ca_cert: String, ca_key: String, tls_cert: String, tls_key: String) -> Result<Self, CertError> {
        let serving = ServingCert::from_pem(tls_cert.as_bytes(), tls_key.as_bytes(), "the certificate Secret")?;
        let ca_der = rustls::pki_types::CertificateDer::pem_slice_iter(ca_cert.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or_else(|| CertError::BadSecret("the CA certificate is not PEM".into()))?;
        let (_, ca_not_after) = validity(&ca_der)?;
        Ok(Self { ca_cert, ca_key, tls_cert, tls_key, not_after: serving.not_after.min(ca_not_after) })
    }
}

/// 64 bits from a fresh key's public key: enough to tell generations made in one second apart.
fn rand_u64(key: &KeyPair) -> u64 {
    key.public_key_raw().iter().rev().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}
