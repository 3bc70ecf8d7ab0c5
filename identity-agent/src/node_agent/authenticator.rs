//! The handshake client as the auth manager's [`Authenticator`]: each proof keeps the peer
//! chain it rested on, to be verified again when the trust bundles change.

use super::node_view::ViewHosted;
use crate::auth_manager::{AuthFailure, Authenticator, BoxFuture, Evidence, Proof};
use crate::handshake::{HandshakeClient, HandshakeError};
use crate::svid::SvidStore;
use crate::verify::{self, Usage};
use meshauth_crds::SpiffeId;
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

type Chain = Arc<[CertificateDer<'static>]>;

/// The peer chain a proof rested on, verified again against the store's bundles when asked.
struct PeerChain {
    store: SvidStore,
    peer: SpiffeId,
    chain: Chain,
}

impl Evidence for PeerChain {
    fn still_trusted(&self) -> bool {
        let bundles = self.store.bundles();
        verify::verify_svid_for(&self.chain, &bundles, &self.peer, Usage::Server, self.store.now()).is_ok()
    }
}

/// The handshake client as the auth manager's authenticator.
pub struct HandshakeAuthenticator {
    client: HandshakeClient,
    store: SvidStore,
    hosted: Arc<ViewHosted>,
    /// Peer chains by leaf: the many pairs proven with one peer SVID share one copy.
    chains: Mutex<HashMap<Vec<u8>, Weak<[CertificateDer<'static>]>>>,
}

impl HandshakeAuthenticator {
    pub fn new(store: SvidStore, hosted: Arc<ViewHosted>, timeout: Duration) -> Self {
        Self { client: HandshakeClient::new(store.clone(), hosted.clone()).with_timeout(timeout), store, hosted, chains: Mutex::default() }
    }

    fn intern(&self, chain: Vec<CertificateDer<'static>>) -> Chain {
        let mut chains = self.chains.lock().unwrap_or_else(PoisonError::into_inner);
        let leaf = chain.first().map(|c| c.as_ref().to_vec()).unwrap_or_default();
        if let Some(shared) = chains.get(&leaf).and_then(Weak::upgrade) {
            return shared;
        }
        // Chains no proof holds any more go as new ones come.
        chains.retain(|_, weak| weak.strong_count() > 0);
        let shared: Chain = chain.into();
        chains.insert(leaf, Arc::downgrade(&shared));
        shared
    }
}

impl Authenticator for HandshakeAuthenticator {
    fn authenticate<'a>(&'a self, local: &'a str, peer: &'a str, addr: SocketAddr) -> BoxFuture<'a, Result<Proof, AuthFailure>> {
        Box::pin(async move {
            let parse = |id: &str| {
                SpiffeId::parse(id).map_err(|e| AuthFailure {
                    reason: "bad_spiffe_id",
                    message: format!("{id:?} {e}"),
                    refused: true,
                    until_local_svid: false,
                })
            };
            let (local, peer) = (parse(local)?, parse(peer)?);
            // From the address the peers know this node by: the peer checks that our identity
            // runs on the node the connection comes from, and on a multi-homed node (or one
            // named by its agent-address annotation) the kernel's own choice may be another.
            // Loopback (this node proving its own pods without an address) needs none.
            let source = self.hosted.own_address().filter(|_| !addr.ip().is_loopback());
            let auth = self.client.authenticate_from(source, addr, &local, &peer).await.map_err(|e| AuthFailure {
                reason: e.reason(),
                message: format!("{local} <- {peer} at {addr}: {e}"),
                refused: e.is_refusal(),
                until_local_svid: matches!(e, HandshakeError::NoLocalSvid(_)),
            })?;
            let chain = self.intern(auth.peer_chain);
            Ok(Proof {
                expiry: auth.expiry,
                evidence: Arc::new(PeerChain { store: self.store.clone(), peer, chain }),
                connection_key: auth.connection_key,
            })
        })
    }
}

#[cfg(test)]
mod tests;
