//! The dialing side of a handshake: [`HandshakeClient`] presents our identity's SVID to the
//! peer node's agent and requires the identity it asked for.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshauth_crds::SpiffeId;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::verifier::{OutcomeSlot, ServerVerifier, lock, tls_error};
use super::{
    ACCEPTED, ALPN, Authenticated, DEFAULT_TIMEOUT, HandshakeError, HostedIdentities, OneCert, connection_key, no_local_svid, sni_for,
};
use crate::svid::SvidStore;
use crate::tls::crypto_provider;

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
        // IPv4-mapped IPv6 peers (a dual-stack listener) compare as the IPv4 address they are.
        let node = peer.ip().to_canonical();
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
