//! The rustls certificate verifiers of both sides: the peer's chain against the trust bundles
//! and the exact SPIFFE ID it must have, with what they found read back after the handshake.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use meshauth_crds::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use super::{HandshakeError, HostedIdentities};
use crate::tls::crypto_provider;
use crate::verify::{self, BundleSet, Usage};

/// What a custom verifier found, read back after the handshake: rustls only carries an opaque
/// error, and we want the exact reason and the verified chain's expiry.
#[derive(Default)]
pub(super) struct Outcome {
    pub(super) verified: Option<(verify::VerifiedSvid, Vec<CertificateDer<'static>>)>,
    error: Option<HandshakeError>,
}

pub(super) type OutcomeSlot = Arc<Mutex<Outcome>>;

pub(super) fn lock(slot: &OutcomeSlot) -> std::sync::MutexGuard<'_, Outcome> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records why a peer certificate was refused and returns the error rustls turns into an alert
/// (bad_certificate family), so the peer learns it was refused.
fn refused(slot: &OutcomeSlot, error: HandshakeError) -> rustls::Error {
    tracing::debug!(reason = error.reason(), %error, "peer certificate refused");
    lock(slot).error = Some(error);
    rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure)
}

/// The last check of either side, once the peer's chain verified for the identity it must
/// have: that identity runs on the node the connection is with. Records the verified peer.
fn accept_hosted(
    slot: &OutcomeSlot,
    hosted: &dyn HostedIdentities,
    verified: verify::VerifiedSvid,
    chain: Vec<CertificateDer<'_>>,
    node: IpAddr,
) -> Result<(), rustls::Error> {
    if !hosted.identity_hosted_at(&verified.id, node) {
        return Err(refused(slot, HandshakeError::PeerNotHosted { id: verified.id.to_string(), node }));
    }
    let chain = chain.into_iter().map(CertificateDer::into_owned).collect();
    lock(slot).verified = Some((verified, chain));
    Ok(())
}

fn chain_of<'a>(end_entity: &CertificateDer<'a>, intermediates: &[CertificateDer<'a>]) -> Vec<CertificateDer<'a>> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    chain
}

pub(super) fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &crypto_provider().signature_verification_algorithms)
}

pub(super) fn supported_schemes() -> Vec<SignatureScheme> {
    crypto_provider().signature_verification_algorithms.supported_schemes()
}

/// The client's check of the server: exactly the identity asked for, hosted where we dialed.
pub(super) struct ServerVerifier {
    pub(super) expected: SpiffeId,
    pub(super) node: IpAddr,
    pub(super) bundles: Arc<BundleSet>,
    pub(super) hosted: Arc<dyn HostedIdentities>,
    pub(super) now: SystemTime,
    pub(super) slot: OutcomeSlot,
}

impl fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerVerifier").field("expected", &self.expected.as_str()).finish()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates);
        let verified = verify::verify_svid_for(&chain, &self.bundles, &self.expected, Usage::Server, self.now)
            .map_err(|e| refused(&self.slot, e.into()))?;
        accept_hosted(&self.slot, &*self.hosted, verified, chain, self.node)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The configs allow TLS 1.3 only; reaching this is a bug, so refuse.
        Err(rustls::Error::General("TLS 1.2 is not allowed".to_owned()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

/// The server's check of the client: a valid SVID of a trust domain we hold a bundle for, whose
/// identity is hosted on the node the connection comes from.
pub(super) struct ClientVerifier {
    pub(super) node: IpAddr,
    pub(super) bundles: Arc<BundleSet>,
    pub(super) hosted: Arc<dyn HostedIdentities>,
    pub(super) now: SystemTime,
    pub(super) slot: OutcomeSlot,
}

impl fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientVerifier").field("node", &self.node).finish()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let chain = chain_of(end_entity, intermediates);
        let verified =
            verify::verify_svid(&chain, &self.bundles, None, Usage::Client, self.now).map_err(|e| refused(&self.slot, e.into()))?;
        accept_hosted(&self.slot, &*self.hosted, verified, chain, self.node)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".to_owned()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        supported_schemes()
    }
}

pub(super) fn tls_error(error: std::io::Error, slot: &OutcomeSlot) -> HandshakeError {
    if let Some(ours) = lock(slot).error.take() {
        return ours;
    }
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => HandshakeError::PeerRefused(format!("{alert:?}")),
        Some(other) => HandshakeError::Tls(other.to_string()),
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => HandshakeError::Closed,
        None => HandshakeError::Tls(error.to_string()),
    }
}
