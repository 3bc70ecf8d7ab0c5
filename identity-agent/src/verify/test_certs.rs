//! rcgen-made CAs and SVIDs for unit tests, including the malformed ones impostors would bring.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use rustls_pki_types::CertificateDer;

use super::{BundleSet, TrustBundle};

/// A test CA of one trust domain.
pub struct TestCa {
    pub trust_domain: String,
    pub cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// The CAs above this one up to and including the root, nearest first (empty for a root).
    pub chain_above: Vec<CertificateDer<'static>>,
}

/// A certificate chain (leaf first) and its key.
#[derive(Clone)]
pub struct TestSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn ca_params(trust_domain: &str, name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshauth tests");
    // Unique names: path building matches issuers by name, and two CAs named alike would
    // turn "unknown CA" into "bad signature".
    static SERIAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dn.push(DnType::CommonName, format!("{name} {n} {}", fastrand::u64(..)));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![uri(&format!("spiffe://{trust_domain}"))];
    params.not_before = offset(now() - Duration::from_secs(3600));
    params.not_after = offset(now() + Duration::from_secs(24 * 3600));
    params
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap_or_else(|e| panic!("bad test URI {s}: {e}")))
}

/// Parameters of a well-formed leaf SVID valid from an hour ago for an hour.
pub fn leaf_params(id: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.subject_alt_names = vec![uri(id)];
    params.not_before = offset(now() - Duration::from_secs(3600));
    params.not_after = offset(now() + Duration::from_secs(3600));
    params
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let params = ca_params(trust_domain, "root");
        let cert = params.self_signed(&key).expect("self-sign CA").der().clone();
        Self { trust_domain: trust_domain.to_owned(), cert, issuer: Issuer::new(params, key), chain_above: Vec::new() }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self) -> Self {
        let key = KeyPair::generate().expect("generate intermediate key");
        let params = ca_params(&self.trust_domain, "intermediate");
        let cert = params.signed_by(&key, &self.issuer).expect("sign intermediate").der().clone();
        let mut chain_above = vec![self.cert.clone()];
        chain_above.extend(self.chain_above.iter().cloned());
        Self { trust_domain: self.trust_domain.clone(), cert, issuer: Issuer::new(params, key), chain_above }
    }

    /// A valid SVID for `id`.
    pub fn svid(&self, id: &str) -> TestSvid {
        self.svid_with(leaf_params(id))
    }

    /// An SVID from custom leaf parameters (for malformed ones).
    pub fn svid_with(&self, params: CertificateParams) -> TestSvid {
        let key = KeyPair::generate().expect("generate leaf key");
        let leaf = params.signed_by(&key, &self.issuer).expect("sign leaf").der().clone();
        let mut chain = vec![leaf];
        // A root signs leaves directly and is not sent; an intermediate sends itself and those
        // above it, as SPIRE does.
        if !self.chain_above.is_empty() {
            chain.push(self.cert.clone());
            chain.extend(self.chain_above.iter().take(self.chain_above.len() - 1).cloned());
        }
        TestSvid { chain, key_der: key.serialize_der() }
    }

    /// The trust bundle of this CA's root.
    pub fn root_cert(&self) -> CertificateDer<'static> {
        self.chain_above.last().cloned().unwrap_or_else(|| self.cert.clone())
    }

    pub fn bundle(&self) -> TrustBundle {
        TrustBundle::new(&self.trust_domain, vec![self.root_cert()]).expect("bundle")
    }

    pub fn bundle_set(&self) -> BundleSet {
        let mut set = BundleSet::new();
        set.insert(self.bundle());
        set
    }
}

pub fn pem_certs(certs: &[CertificateDer<'_>]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for cert in certs {
        let b64 = base64_encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            let _ = writeln!(out, "{}", String::from_utf8_lossy(line));
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn base64_encode(data: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}
