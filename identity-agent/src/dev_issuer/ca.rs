//! The development CA: a self-signed ECDSA P-256 root for one trust domain, persisted in the
//! state directory, issuing X.509-SVIDs per the SPIFFE X509-SVID profile (one URI SAN,
//! `cA=false`, key usage `digitalSignature` (+ `keyEncipherment`/`keyAgreement` are not needed
//! for ECDSA), EKU serverAuth + clientAuth like SPIRE's).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshauth_crds::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::DevIssuerError;

/// How long a newly created CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this much in the past, so a peer whose clock is a little behind accepts
/// them (SPIRE backdates by 10 s too).
const BACKDATE: Duration = Duration::from_secs(10);
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";

/// An SVID as issued: chain (leaf only: the root signs directly), PKCS#8 key and validity.
#[derive(Clone)]
pub struct IssuedSvid {
    pub id: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key_pkcs8: Vec<u8>,
    /// When it was issued (not the backdated notBefore): rotation is due at `issued + ttl / 2`.
    pub issued: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for IssuedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedSvid").field("id", &self.id.as_str()).field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

/// The CA of one trust domain.
pub struct DevCa {
    trust_domain: TrustDomain,
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").field("trust_domain", &self.trust_domain.as_str()).finish()
    }
}

fn ca_params(trust_domain: &TrustDomain, now: SystemTime) -> Result<CertificateParams, DevIssuerError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshauth dev issuer");
    dn.push(DnType::CommonName, format!("meshauth dev CA {}", trust_domain.as_str()));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = vec![uri_san(&format!("spiffe://{}", trust_domain.as_str()))?];
    params.serial_number = Some(random_serial());
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_VALIDITY).into();
    Ok(params)
}

fn uri_san(uri: &str) -> Result<SanType, DevIssuerError> {
    let ia5 = uri.try_into().map_err(|e: rcgen::Error| DevIssuerError::Ca(format!("URI SAN {uri}: {e}")))?;
    Ok(SanType::URI(ia5))
}

fn random_serial() -> SerialNumber {
    // 16 random bytes, top bit clear so the DER INTEGER stays positive.
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> DevIssuerError + '_ {
    move |e| DevIssuerError::Ca(format!("{what}: {e}"))
}

impl DevCa {
    /// A new CA, not persisted.
    pub fn generate(trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, DevIssuerError> {
        let key = KeyPair::generate().map_err(rcgen_error("generating the CA key"))?;
        let params = ca_params(trust_domain, now)?;
        let cert = params.self_signed(&key).map_err(rcgen_error("self-signing the CA"))?;
        Ok(Self { trust_domain: trust_domain.clone(), cert: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    /// Loads the CA from `dir`, or creates and saves one when there is none. A stored CA of
    /// another trust domain, or one that has expired, is an error rather than silently replaced:
    /// replacing it would invalidate every SVID peers hold.
    pub fn load_or_create(dir: &Path, trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, DevIssuerError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return Self::load(&cert_path, &key_path, trust_domain, now);
        }
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let key = KeyPair::generate().map_err(rcgen_error("generating the CA key"))?;
        let params = ca_params(trust_domain, now)?;
        let cert = params.self_signed(&key).map_err(rcgen_error("self-signing the CA"))?;
        // Key first: a crash between the writes leaves a key without a cert, which `load`
        // reports, rather than a cert whose key is lost.
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        write_private(&cert_path, cert.pem().as_bytes())?;
        tracing::info!(dir = %dir.display(), trust_domain = %trust_domain, "created the dev issuer CA");
        Ok(Self { trust_domain: trust_domain.clone(), cert: cert.der().clone(), issuer: Issuer::new(params, key) })
    }

    fn load(cert_path: &Path, key_path: &Path, trust_domain: &TrustDomain, now: SystemTime) -> Result<Self, DevIssuerError> {
        let key_pem = fs::read_to_string(key_path).map_err(io_error(key_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(rcgen_error("reading the CA key"))?;
        let cert_pem = fs::read(cert_path).map_err(io_error(cert_path))?;
        let cert = CertificateDer::from_pem_slice(&cert_pem).map_err(|e| DevIssuerError::Ca(format!("{}: {e}", cert_path.display())))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| DevIssuerError::Ca(format!("{}: {e}", cert_path.display())))?;
        let want = format!("spiffe://{}", trust_domain.as_str());
        let has_td = parsed.subject_alternative_name().ok().flatten().is_some_and(|san| {
            san.value.general_names.iter().any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if *u == want))
        });
        if !has_td {
            return Err(DevIssuerError::Ca(format!(
                "the CA in {} is not for trust domain {trust_domain}; use another --state-dir",
                cert_path.display()
            )));
        }
        let not_after = parsed.validity().not_after.timestamp();
        let now_secs = now.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if u64::try_from(not_after).unwrap_or(0) <= now_secs {
            return Err(DevIssuerError::Ca(format!("the CA in {} has expired", cert_path.display())));
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(DevIssuerError::Ca(format!("{} does not hold the key of {}", key_path.display(), cert_path.display())));
        }
        let issuer = Issuer::from_ca_cert_der(&cert, key).map_err(rcgen_error("loading the CA"))?;
        Ok(Self { trust_domain: trust_domain.clone(), cert: cert.into_owned(), issuer })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The CA certificate: the trust domain's bundle.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Issues an X.509-SVID for `id` valid for `ttl` from `now`, with a fresh key.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration, now: SystemTime) -> Result<IssuedSvid, DevIssuerError> {
        if id.trust_domain() != self.trust_domain.as_str() {
            return Err(DevIssuerError::Ca(format!("{id} is not in this CA's trust domain {}", self.trust_domain)));
        }
        let key = KeyPair::generate().map_err(rcgen_error("generating an SVID key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshauth dev issuer");
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![uri_san(id.as_str())?];
        params.serial_number = Some(random_serial());
        params.not_before = (now - BACKDATE).into();
        let not_after = now + ttl;
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_error("signing an SVID"))?;
        // notAfter is stored with one-second precision: report what peers will see.
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(not_after.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
        Ok(IssuedSvid { id: id.clone(), chain: vec![cert.der().clone()], key_pkcs8: key.serialize_der(), issued: now, not_after })
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> DevIssuerError {
    let path: PathBuf = path.to_owned();
    move |source| DevIssuerError::Io { path: path.clone(), reason: source.to_string() }
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), DevIssuerError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_error(path))?;
    file.write_all(contents).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}
