//! Mutual TLS 1.3 handshakes between node agents, on behalf of pod identities.
//!
//! Job: prove a pair (destination identity, source identity). The agent on the destination
//! pod's node dials the source pod's node agent (port 4250 by default), presents the
//! destination identity's SVID and names the source identity it expects inside the
//! ClientHello: the SNI is `<base32(sha256(spiffe id))>.id.meshauth.invalid` (a SPIFFE ID may be
//! 2048 bytes, more than a DNS name holds; hashing keeps one round trip). The peer answers with
//! that identity's SVID only if a pod with that identity runs on its node. Each side verifies
//! the other with [`crate::verify`] against the trust bundle and the exact SPIFFE ID it expects
//! (the client: the identity it asked for; the server: the client's identity must be hosted on
//! the node the connection comes from), so chain substitution, other trust domains, unknown CAs
//! and expired SVIDs are refused on both sides. TLS 1.3 finishes on the client before the
//! server has checked the client's certificate, so the server confirms with one byte after its
//! checks pass; only then is the pair authenticated, with an expiry no later than either chain.
//!
//! Both sides derive the pair's connection key from the session (the TLS exporter, RFC 8446
//! §7.5, label [`EXPORTER_LABEL`], the pair in the context). The server hands it to its
//! [`ConnectionKeySink`] (the source side's `tag_keys`) before it confirms, so by the time the
//! client's pair is authenticated, the source's SYNs can already be tagged. The key is never
//! logged.
//!
//! One explicit rustls `CryptoProvider` (ring) is used, never the process default, and no
//! session resumption: every handshake re-verifies both chains against the current bundle.
//!
//! The server survives a flood of connections (pods reach node addresses): a connection from
//! an address that is no node's (hosts no identity, by the agent's view) is closed before any
//! TLS work; each node address holds at most `max_per_source` connections, so one source
//! cannot take every slot; and a connection gets `hello_timeout` to send its ClientHello. While
//! the SVID store has not synced yet (the agent is starting) connections are closed without an
//! alert, which the client takes as an outage, not a refusal.
//!
//! What it must not do: write the auth map (the auth manager does, from [`Authenticated`]);
//! trust anything the peer says outside the verified certificate; answer for an identity this
//! node does not host.

#[path = "handshake/bench.rs"]
pub mod bench;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use meshauth_crds::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{Acceptor, ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::svid::{SvidError, SvidStore};
use crate::verify::{self, BundleSet, Usage, VerifyError};
use meshauth_datapath::ConnectionKey;

/// The port agents listen on for handshakes.
pub const DEFAULT_PORT: u16 = 4250;
/// Bound on a whole handshake, connect to confirmation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes a server runs at once; more wait for a slot.
pub const DEFAULT_MAX_CONCURRENT: usize = 256;
/// Connections one node address may hold open at once: the client's default concurrency, so an
/// honest peer never meets it.
pub const DEFAULT_MAX_PER_SOURCE: usize = 64;
/// How long a connection may take to send its ClientHello (an honest peer sends it at once).
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(1);
/// ALPN protocol of the meshauth handshake: refuses cross-protocol use of the port/certs.
pub const ALPN: &[u8] = b"meshauth-auth/1";
/// The SNI suffix carrying the expected identity's digest (`.invalid` never resolves).
pub const SNI_SUFFIX: &str = ".id.meshauth.invalid";
/// The server's confirmation that it verified the client.
const ACCEPTED: u8 = 0xA5;
/// The TLS exporter label of the pair's connection key.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshauth-connection-key-v1";

/// The connection key of the pair (`source` = the server's identity, whose pods' SYNs are
/// tagged; `destination` = the client's) from a finished TLS session.
fn connection_key<D>(
    conn: &rustls::ConnectionCommon<D>,
    source: &SpiffeId,
    destination: &SpiffeId,
) -> Result<ConnectionKey, HandshakeError> {
    let mut context = Vec::with_capacity(source.as_str().len() + destination.as_str().len() + 1);
    context.extend_from_slice(source.as_str().as_bytes());
    context.push(0);
    context.extend_from_slice(destination.as_str().as_bytes());
    let out = conn
        .export_keying_material([0u8; 16], EXPORTER_LABEL, Some(&context))
        .map_err(|e| HandshakeError::Tls(format!("exporting the connection key: {e}")))?;
    Ok(ConnectionKey::from_bytes(out))
}

/// Where the answering side keeps a pair's connection key: (our identity = the source of the
/// connections it tags, the peer's = their destination, on the node whose agent at
/// `destination_node` proved it). Every node hosting the destination proves the pair on its
/// own, so each has its own key.
pub trait ConnectionKeySink: Send + Sync {
    fn install(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        destination_node: IpAddr,
        key: ConnectionKey,
        expiry: SystemTime,
    ) -> Result<(), String>;
}

/// The agent's one crypto provider (ring), shared by all handshakes and SVID key loading.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}

/// Where identities run: the caller's view of pods and nodes.
pub trait HostedIdentities: Send + Sync + 'static {
    /// Whether a pod with identity `id` runs on this node.
    fn is_hosted_here(&self, id: &SpiffeId) -> bool;
    /// Whether a pod with identity `id` runs on the node whose agent has address `node`.
    fn identity_hosted_at(&self, id: &SpiffeId, node: IpAddr) -> bool;
    /// Whether `addr` is the agent address of a node hosting some identity: only such a node
    /// can ever pass the server's check of the client, so anything else is closed unread.
    fn is_node(&self, addr: IpAddr) -> bool;
}

/// Reports handshake outcomes (metrics, logs).
pub trait HandshakeObserver: Send + Sync + 'static {
    /// A handshake this node's server answered.
    fn served(&self, result: &Result<Authenticated, HandshakeError>, took: Duration);
    /// A connection the server closed before any TLS work (`reason`: `not_a_node`,
    /// `source_limit`).
    fn turned_away(&self, reason: &'static str);
}

/// A proven pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// Our identity (the one we presented).
    pub local: SpiffeId,
    /// The peer's verified identity.
    pub peer: SpiffeId,
    /// No later than either side's certificate chain.
    pub expiry: SystemTime,
    /// The chain the peer presented, leaf first (to check again when the bundles change).
    pub peer_chain: Vec<CertificateDer<'static>>,
    /// The pair's connection key (the same on both sides).
    pub connection_key: ConnectionKey,
}

/// Why a handshake did not authenticate the pair.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("no usable SVID for our identity: {0}")]
    NoLocalSvid(SvidError),
    #[error("{id} is not hosted on node {node} (by our view)")]
    PeerNotHosted { id: String, node: IpAddr },
    #[error("the client asked for an identity this node has no SVID for")]
    UnknownIdentity,
    #[error("{0} is not hosted on this node")]
    NotHostedHere(String),
    #[error("the peer's certificate was refused: {0}")]
    PeerCertificate(#[from] VerifyError),
    #[error("the peer refused the handshake ({0})")]
    PeerRefused(String),
    #[error("the peer closed the connection")]
    Closed,
    #[error("the server is not ready (no SVIDs synced yet)")]
    NotReady,
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("protocol: {0}")]
    Protocol(&'static str),
    #[error("cannot keep the connection key: {0}")]
    KeyNotKept(String),
}

impl HandshakeError {
    /// A short, stable label for the `reason` label of metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoLocalSvid(_) => "no_local_svid",
            Self::PeerNotHosted { .. } => "peer_not_hosted",
            Self::UnknownIdentity => "unknown_identity",
            Self::NotHostedHere(_) => "not_hosted_here",
            Self::PeerCertificate(e) => e.reason(),
            Self::PeerRefused(_) => "peer_refused",
            Self::Closed => "connection_closed",
            Self::NotReady => "not_ready",
            Self::Connect { .. } => "connect_failed",
            Self::Timeout(_) => "timeout",
            Self::Tls(_) => "tls_error",
            Self::Protocol(_) => "protocol_error",
            Self::KeyNotKept(_) => "key_not_kept",
        }
    }

    /// Whether the peer was reached and the pair is not provable now (its identity, chain or
    /// hosting is wrong, it refused us, our own SVID is gone), as opposed to an outage (no
    /// connection, a timeout, a closed connection, an agent or SPIRE not ready): only a refusal
    /// may take an entry away before its expiry.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::NoLocalSvid(SvidError::Unavailable { reason, .. }) => !matches!(reason, crate::svid::Unavailable::SourceUnreachable),
            Self::NoLocalSvid(_) => false,
            Self::PeerNotHosted { .. }
            | Self::UnknownIdentity
            | Self::NotHostedHere(_)
            | Self::PeerCertificate(_)
            | Self::PeerRefused(_)
            | Self::Protocol(_) => true,
            Self::Closed | Self::NotReady | Self::Connect { .. } | Self::Timeout(_) | Self::Tls(_) | Self::KeyNotKept(_) => false,
        }
    }
}

/// Why `store` has no usable SVID for `id` (nothing heard from SPIRE yet counts as unreachable,
/// not as "not issued").
fn no_local_svid(store: &SvidStore, id: &SpiffeId) -> HandshakeError {
    use crate::svid::{SvidState, Unavailable};
    HandshakeError::NoLocalSvid(SvidError::Unavailable {
        id: id.to_string(),
        reason: match store.state(id) {
            SvidState::Unavailable(reason) => reason,
            SvidState::Initializing => Unavailable::SourceUnreachable,
            SvidState::Available(_) => Unavailable::Expired,
        },
    })
}

/// The SNI that asks a peer for `id`'s SVID.
pub fn sni_for(id: &SpiffeId) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.as_str().as_bytes());
    format!("{}{SNI_SUFFIX}", base32_lower(digest.as_ref()))
}

fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

/// What a custom verifier found, read back after the handshake: rustls only carries an opaque
/// error, and we want the exact reason and the verified chain's expiry.
#[derive(Default)]
struct Outcome {
    verified: Option<(verify::VerifiedSvid, Vec<CertificateDer<'static>>)>,
    error: Option<HandshakeError>,
}

type OutcomeSlot = Arc<Mutex<Outcome>>;

fn lock(slot: &OutcomeSlot) -> std::sync::MutexGuard<'_, Outcome> {
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

fn verify_signature(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(message, cert, dss, &crypto_provider().signature_verification_algorithms)
}

fn supported_schemes() -> Vec<SignatureScheme> {
    crypto_provider().signature_verification_algorithms.supported_schemes()
}

/// The client's check of the server: exactly the identity asked for, hosted where we dialed.
struct ServerVerifier {
    expected: SpiffeId,
    node: IpAddr,
    bundles: Arc<BundleSet>,
    hosted: Arc<dyn HostedIdentities>,
    now: SystemTime,
    slot: OutcomeSlot,
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
struct ClientVerifier {
    node: IpAddr,
    bundles: Arc<BundleSet>,
    hosted: Arc<dyn HostedIdentities>,
    now: SystemTime,
    slot: OutcomeSlot,
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

/// Presents one SVID (both as client and as server).
#[derive(Debug)]
struct OneCert(Option<Arc<CertifiedKey>>);

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }
}

impl rustls::client::ResolvesClientCert for OneCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

fn tls_error(error: std::io::Error, slot: &OutcomeSlot) -> HandshakeError {
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

/// The dialing side: proves (our `local` identity, the peer's `expected_peer` identity).
#[derive(Clone)]
pub struct HandshakeClient {
    store: SvidStore,
    hosted: Arc<dyn HostedIdentities>,
    timeout: Duration,
    source_ip: Option<IpAddr>,
}

impl fmt::Debug for HandshakeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeClient").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl HandshakeClient {
    pub fn new(store: SvidStore, hosted: Arc<dyn HostedIdentities>) -> Self {
        Self { store, hosted, timeout: DEFAULT_TIMEOUT, source_ip: None }
    }

    /// Dials from `ip` (the node address peers know this agent by).
    pub fn with_source_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.source_ip = ip;
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Dials the agent at `peer`, presents `local`'s SVID and requires `expected_peer`'s.
    pub async fn authenticate(
        &self,
        peer: SocketAddr,
        local: &SpiffeId,
        expected_peer: &SpiffeId,
    ) -> Result<Authenticated, HandshakeError> {
        self.authenticate_from(self.source_ip, peer, local, expected_peer).await
    }

    /// As [`Self::authenticate`], from source address `source` (the peer checks that our
    /// identity runs on the node the connection comes from, so a multi-homed node binds the
    /// address its peers know it by).
    pub async fn authenticate_from(
        &self,
        source: Option<IpAddr>,
        peer: SocketAddr,
        local: &SpiffeId,
        expected_peer: &SpiffeId,
    ) -> Result<Authenticated, HandshakeError> {
        let work = self.authenticate_inner(source, peer, local, expected_peer);
        tokio::time::timeout(self.timeout, work).await.unwrap_or(Err(HandshakeError::Timeout(self.timeout)))
    }

    async fn authenticate_inner(
        &self,
        source: Option<IpAddr>,
        peer: SocketAddr,
        local: &SpiffeId,
        expected_peer: &SpiffeId,
    ) -> Result<Authenticated, HandshakeError> {
        // Fail closed before any I/O: no SVID of ours, or a peer we would refuse anyway.
        let svid = self.store.current(local).ok_or_else(|| no_local_svid(&self.store, local))?;
        let node = canonical(peer.ip());
        if !self.hosted.identity_hosted_at(expected_peer, node) {
            return Err(HandshakeError::PeerNotHosted { id: expected_peer.to_string(), node });
        }
        let slot = OutcomeSlot::default();
        let verifier = ServerVerifier {
            expected: expected_peer.clone(),
            node,
            bundles: self.store.bundles(),
            hosted: self.hosted.clone(),
            now: self.store.now(),
            slot: slot.clone(),
        };
        let config = client_config(Arc::new(verifier), svid.certified_key().clone())?;
        let server_name = ServerName::try_from(sni_for(expected_peer)).map_err(|_| HandshakeError::Protocol("cannot encode the SNI"))?;

        let tcp = connect(source, peer).await.map_err(|source| HandshakeError::Connect { addr: peer, source })?;
        // Small handshake records: do not let Nagle hold them back.
        let _ = tcp.set_nodelay(true);
        let mut tls = TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await.map_err(|e| tls_error(e, &slot))?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            return Err(HandshakeError::Protocol("the peer did not agree on the meshauth ALPN"));
        }
        let connection_key = connection_key(tls.get_ref().1, expected_peer, local)?;
        let mut confirmation = [0u8; 1];
        match tls.read_exact(&mut confirmation).await {
            Ok(_) if confirmation[0] == ACCEPTED => {}
            Ok(_) => return Err(HandshakeError::Protocol("unexpected confirmation byte")),
            Err(e) => return Err(tls_error(e, &slot)),
        }
        // Best effort: the result is decided; a failing close_notify changes nothing.
        let _ = tls.shutdown().await;
        let (peer_verified, peer_chain) =
            lock(&slot).verified.take().ok_or(HandshakeError::Protocol("the peer certificate was not verified"))?;
        Ok(Authenticated {
            local: local.clone(),
            peer: peer_verified.id,
            expiry: svid.not_after().min(peer_verified.not_after),
            peer_chain,
            connection_key,
        })
    }
}

async fn connect(source: Option<IpAddr>, peer: SocketAddr) -> std::io::Result<TcpStream> {
    match source.filter(|ip| ip.is_ipv4() == peer.is_ipv4()) {
        None => TcpStream::connect(peer).await,
        Some(ip) => {
            let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
            bind_address_only(&socket);
            match socket.bind(SocketAddr::new(ip, 0)) {
                Ok(()) => socket.connect(peer).await,
                // The node's known address is not on this host (a stale Node status, an address
                // that only NAT knows): the kernel's own choice may still be the right one, and
                // the peer's hosted check refuses it if not.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::warn!(source = %ip, %peer, "this node's address is not on this host; dialing from the kernel's choice");
                    TcpStream::connect(peer).await
                }
                Err(e) => Err(e),
            }
        }
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: binding only the address leaves the port to `connect`, so
/// handshakes to many peers share ephemeral ports instead of each holding one of its own
/// through TIME_WAIT. Best effort: without it the bind still works.
fn bind_address_only(socket: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and an int option of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "IP_BIND_ADDRESS_NO_PORT not set");
    }
}

/// Convenience form of [`HandshakeClient::authenticate`].
pub async fn authenticate(
    peer: SocketAddr,
    local: &SpiffeId,
    expected_peer: &SpiffeId,
    store: &SvidStore,
    hosted: Arc<dyn HostedIdentities>,
    timeout: Duration,
) -> Result<Authenticated, HandshakeError> {
    HandshakeClient::new(store.clone(), hosted).with_timeout(timeout).authenticate(peer, local, expected_peer).await
}

fn client_config(verifier: Arc<ServerVerifier>, key: Arc<CertifiedKey>) -> Result<ClientConfig, HandshakeError> {
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| HandshakeError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(OneCert(Some(key))));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

fn server_config(verifier: Arc<dyn ClientCertVerifier>, key: Option<Arc<CertifiedKey>>) -> Result<ServerConfig, HandshakeError> {
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| HandshakeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(OneCert(key)));
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The answering side.
#[derive(Clone)]
pub struct HandshakeServer {
    store: SvidStore,
    hosted: Arc<dyn HostedIdentities>,
    observer: Option<Arc<dyn HandshakeObserver>>,
    keys: Option<Arc<dyn ConnectionKeySink>>,
    timeout: Duration,
    hello_timeout: Duration,
    max_concurrent: usize,
    max_per_source: usize,
    /// SNI label → identity, for every identity the store has had: saves hashing them all per
    /// handshake.
    by_sni: Arc<Mutex<SniIndex>>,
}

#[derive(Default)]
struct SniIndex {
    labels: HashMap<String, SpiffeId>,
    known: HashSet<SpiffeId>,
}

impl fmt::Debug for HandshakeServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeServer").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

impl HandshakeServer {
    pub fn new(store: SvidStore, hosted: Arc<dyn HostedIdentities>) -> Self {
        Self {
            store,
            hosted,
            observer: None,
            keys: None,
            timeout: DEFAULT_TIMEOUT,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            by_sni: Arc::default(),
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn HandshakeObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Keeps each pair's connection key in `keys` before confirming the handshake.
    pub fn with_key_sink(mut self, keys: Arc<dyn ConnectionKeySink>) -> Self {
        self.keys = Some(keys);
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn with_max_concurrent(mut self, max: usize) -> Self {
        self.max_concurrent = max.max(1);
        self
    }

    pub fn with_max_per_source(mut self, max: usize) -> Self {
        self.max_per_source = max.max(1);
        self
    }

    pub fn with_hello_timeout(mut self, timeout: Duration) -> Self {
        self.hello_timeout = timeout;
        self
    }

    /// Counted, not logged: a flood would write a line per connection.
    fn turned_away(&self, reason: &'static str) {
        if let Some(observer) = &self.observer {
            observer.turned_away(reason);
        }
    }

    /// Accepts and answers handshakes until the task is dropped. Accept errors (e.g. out of
    /// file descriptors) are logged and retried after a pause rather than ending the server.
    /// Accepting never stops: connections from no node are closed at once, a node over its
    /// own limit has the new connection closed, and the rest wait for one of `max_concurrent`
    /// slots (at most nodes × `max_per_source` of them wait).
    pub async fn serve(self, listener: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.max_concurrent));
        let per_source: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => {
                    let node = canonical(peer.ip());
                    if !self.hosted.is_node(node) {
                        self.turned_away("not_a_node");
                        continue;
                    }
                    let Some(source) = SourceSlot::take(&per_source, node, self.max_per_source) else {
                        self.turned_away("source_limit");
                        continue;
                    };
                    let server = self.clone();
                    let slots = slots.clone();
                    tokio::spawn(async move {
                        let Ok(permit) = slots.acquire_owned().await else { return };
                        let started = Instant::now();
                        let result = server.answer(tcp, peer).await;
                        match &result {
                            Ok(auth) => tracing::debug!(peer = %auth.peer, local = %auth.local, %peer, "handshake answered"),
                            Err(e) => tracing::info!(%peer, reason = e.reason(), error = %e, "handshake refused"),
                        }
                        if let Some(observer) = &server.observer {
                            observer.served(&result, started.elapsed());
                        }
                        drop(permit);
                        drop(source);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Answers one connection.
    pub async fn answer(&self, tcp: TcpStream, peer: SocketAddr) -> Result<Authenticated, HandshakeError> {
        tokio::time::timeout(self.timeout, self.answer_inner(tcp, peer)).await.unwrap_or(Err(HandshakeError::Timeout(self.timeout)))
    }

    async fn answer_inner(&self, tcp: TcpStream, peer: SocketAddr) -> Result<Authenticated, HandshakeError> {
        let _ = tcp.set_nodelay(true);
        let node = canonical(peer.ip());
        let start = tokio::time::timeout(self.hello_timeout, LazyConfigAcceptor::new(Acceptor::default(), tcp))
            .await
            .map_err(|_| HandshakeError::Timeout(self.hello_timeout))?
            .map_err(|e| HandshakeError::Tls(e.to_string()))?;
        if !self.store.is_synced() {
            // Starting: an alert would read as a refusal and cost the peer its entries.
            return Err(HandshakeError::NotReady);
        }
        let hello = start.client_hello();
        let offers_alpn = hello.alpn().is_some_and(|mut protocols| protocols.any(|p| p == ALPN));
        let wanted = hello.server_name().and_then(|sni| self.identity_for_sni(sni));
        let slot = OutcomeSlot::default();
        let verifier = Arc::new(ClientVerifier {
            node,
            bundles: self.store.bundles(),
            hosted: self.hosted.clone(),
            now: self.store.now(),
            slot: slot.clone(),
        });

        // Decide what to present before any certificate is sent. A refusal goes out as a TLS
        // alert (no certificate resolves → access_denied) so the client learns it at once.
        let decision = if !offers_alpn {
            Err(HandshakeError::Protocol("the client did not offer the meshauth ALPN"))
        } else {
            match wanted {
                None => Err(HandshakeError::UnknownIdentity),
                Some(id) if !self.hosted.is_hosted_here(&id) => Err(HandshakeError::NotHostedHere(id.to_string())),
                Some(id) => match self.store.current(&id) {
                    Some(svid) => Ok((id, svid)),
                    // Known, hosted, but its SVID expired or was withdrawn: fail closed.
                    None => Err(no_local_svid(&self.store, &id)),
                },
            }
        };
        let (local, svid) = match decision {
            Ok(found) => found,
            Err(error) => {
                let config = server_config(verifier, None)?;
                // Drive the handshake just far enough to send the alert; its error is expected.
                let _ = start.into_stream(Arc::new(config)).await;
                return Err(error);
            }
        };
        let config = server_config(verifier, Some(svid.certified_key().clone()))?;
        let mut tls = start.into_stream(Arc::new(config)).await.map_err(|e| tls_error(e, &slot))?;
        let (client, peer_chain) =
            lock(&slot).verified.take().ok_or(HandshakeError::Protocol("the client certificate was not verified"))?;
        let expiry = svid.not_after().min(client.not_after);
        let key = connection_key(tls.get_ref().1, &local, &client.id)?;
        // Kept before the confirmation: once the client's pair is authenticated, our pods'
        // SYNs to it are tagged.
        if let Some(keys) = &self.keys {
            keys.install(&local, &client.id, node, key, expiry).map_err(HandshakeError::KeyNotKept)?;
        }
        tls.write_all(&[ACCEPTED]).await.map_err(|e| tls_error(e, &slot))?;
        tls.flush().await.map_err(|e| tls_error(e, &slot))?;
        let _ = tls.shutdown().await;
        Ok(Authenticated { local, peer: client.id, expiry, peer_chain, connection_key: key })
    }

    fn identity_for_sni(&self, sni: &str) -> Option<SpiffeId> {
        let label = sni.strip_suffix(SNI_SUFFIX)?;
        let mut index = self.by_sni.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = index.labels.get(label) {
            return Some(id.clone());
        }
        // Unknown label: index identities the store learned since (hashing only new ones).
        for (id, _) in self.store.identities() {
            if index.known.insert(id.clone()) {
                let sni = sni_for(&id);
                if let Some(l) = sni.strip_suffix(SNI_SUFFIX) {
                    index.labels.insert(l.to_owned(), id);
                }
            }
        }
        index.labels.get(label).cloned()
    }
}

/// One of a node address's `max_per_source` connections, given back when dropped.
struct SourceSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    node: IpAddr,
}

impl SourceSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, node: IpAddr, max: usize) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(PoisonError::into_inner);
        let held = map.entry(node).or_insert(0);
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(Self { counts: counts.clone(), node })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = map.get_mut(&self.node) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                map.remove(&self.node);
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener) compare as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Convenience form of [`HandshakeServer::serve`].
pub async fn serve(listener: TcpListener, store: SvidStore, hosted: Arc<dyn HostedIdentities>) {
    HandshakeServer::new(store, hosted).serve(listener).await
}

#[cfg(test)]
#[path = "handshake/tests.rs"]
pub(crate) mod tests;
