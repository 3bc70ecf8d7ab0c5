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

mod client;
mod server;
mod sni;
mod verifier;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshauth_crds::SpiffeId;
use rustls::SignatureScheme;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::svid::{SvidError, SvidStore};
use crate::verify::VerifyError;
use meshauth_datapath::ConnectionKey;

pub use client::{HandshakeClient, authenticate};
pub use server::{HandshakeServer, serve};
pub use sni::sni_for;

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

#[cfg(test)]
pub(crate) mod tests;
