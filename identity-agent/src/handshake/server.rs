//! The answering side of a handshake: [`HandshakeServer`] turns connections from no node (or
//! beyond a node's limit) away before any TLS work and answers for identities this node hosts.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use meshauth_crds::SpiffeId;
use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{Acceptor, NoServerSessionStorage};
use rustls::sign::CertifiedKey;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::LazyConfigAcceptor;

use super::verifier::{ClientVerifier, OutcomeSlot, lock, tls_error};
use super::{
    ACCEPTED, ALPN, Authenticated, ConnectionKeySink, DEFAULT_HELLO_TIMEOUT, DEFAULT_MAX_CONCURRENT, DEFAULT_MAX_PER_SOURCE,
    DEFAULT_TIMEOUT, HandshakeError, HandshakeObserver, HostedIdentities, OneCert, SNI_SUFFIX, connection_key, no_local_svid, sni_for,
};
use crate::svid::SvidStore;
use crate::tls::crypto_provider;

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
                    // IPv4-mapped IPv6 peers (a dual-stack listener) compare as the IPv4 address they are.
                    let node = peer.ip().to_canonical();
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
        // IPv4-mapped IPv6 peers (a dual-stack listener) compare as the IPv4 address they are.
        let node = peer.ip().to_canonical();
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

/// Convenience form of [`HandshakeServer::serve`].
pub async fn serve(listener: TcpListener, store: SvidStore, hosted: Arc<dyn HostedIdentities>) {
    HandshakeServer::new(store, hosted).serve(listener).await
}
