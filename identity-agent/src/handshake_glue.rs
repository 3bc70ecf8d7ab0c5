//! Connects the handshake module to the rest of the agent: the node view answers the
//! handshake's "who is hosted where" questions, the handshake client is the auth manager's
//! [`Authenticator`], and the SVID store's withdrawals and bundle changes reach the manager.

use crate::auth_manager::{AuthFailure, AuthManagerHandle, Authenticator, BoxFuture, Evidence, Proof};
use crate::handshake::{ConnectionKeySink, HandshakeClient, HandshakeServer, HostedIdentities};
use crate::metrics::AgentMetrics;
use crate::node_agent::SharedView;
use crate::svid::SvidStore;
use crate::verify::{self, Usage};
use meshauth_crds::SpiffeId;
use meshauth_datapath::{BootTime, ConnectionKey};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;
use std::time::SystemTime;
use tokio::net::TcpListener;

/// The agent's latest [`NodeView`](crate::plan::NodeView) as the handshake's oracle.
pub struct ViewHosted(pub SharedView);

impl HostedIdentities for ViewHosted {
    fn is_hosted_here(&self, id: &SpiffeId) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_hosted_here(id.as_str())
    }

    fn identity_hosted_at(&self, id: &SpiffeId, node: IpAddr) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_hosted_at(id.as_str(), node)
    }

    fn is_node(&self, addr: IpAddr) -> bool {
        self.0.read().unwrap_or_else(PoisonError::into_inner).is_node(addr)
    }
}

impl ViewHosted {
    /// The address other agents know this node by, as the latest snapshot has it.
    fn own_address(&self) -> Option<IpAddr> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).own_address
    }
}

/// Limits of the handshake server (agent configuration).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_concurrent: usize,
    pub max_per_source: usize,
}

/// The source side's connection keys: `tag_keys`, by this node's numbers for the pair and its
/// name for the destination's node.
pub struct DatapathKeySink {
    pub view: SharedView,
    pub datapath: crate::node_agent::SharedDatapath,
}

impl ConnectionKeySink for DatapathKeySink {
    fn install(
        &self,
        source: &SpiffeId,
        destination: &SpiffeId,
        destination_node: IpAddr,
        key: ConnectionKey,
        expiry: SystemTime,
    ) -> Result<(), String> {
        let (src, dst, node) = {
            let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
            let number =
                |id: &SpiffeId| view.numbers.get(id.as_str()).copied().ok_or_else(|| format!("{id} has no number on this node yet"));
            let node = view
                .node_id(destination_node)
                .ok_or_else(|| format!("node address {destination_node} cannot key the datapath's maps (IPv4 only)"))?;
            (number(source)?, number(destination)?, node)
        };
        let mut dp = self.datapath.lock().unwrap_or_else(PoisonError::into_inner);
        dp.set_tag_key(src, dst, node, BootTime::from_system_time(expiry), key).map_err(|e| e.to_string())
    }
}

/// Answers peers' handshakes until the listener fails, counting each in the metrics and
/// keeping each pair's connection key in `keys`.
pub async fn serve(
    listener: TcpListener,
    store: SvidStore,
    hosted: Arc<ViewHosted>,
    metrics: Arc<AgentMetrics>,
    limits: ServerLimits,
    keys: Arc<DatapathKeySink>,
) {
    HandshakeServer::new(store, hosted)
        .with_observer(metrics)
        .with_key_sink(keys)
        .with_max_concurrent(limits.max_concurrent)
        .with_max_per_source(limits.max_per_source)
        .serve(listener)
        .await;
}

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
                SpiffeId::parse(id).map_err(|e| AuthFailure { reason: "bad_spiffe_id", message: format!("{id:?} {e}"), refused: true })
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

/// Tells `manager` of every SVID the store withdraws and of every change of the trust bundles
/// after the first ones (the first sync takes nothing away that was proven), until the store
/// goes.
pub fn forward_svid_events(store: &SvidStore, manager: AuthManagerHandle) -> tokio::task::JoinHandle<()> {
    use tokio::sync::broadcast::error::RecvError;
    let mut withdrawals = store.subscribe_withdrawals();
    let mut bundles = store.watch_bundles();
    let mut had_bundles = !bundles.borrow_and_update().is_empty();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                withdrawn = withdrawals.recv() => match withdrawn {
                    Ok(id) => manager.withdrawn(id.to_string()),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "missed SVID withdrawals; their pairs' re-authentication fails and removes them");
                    }
                    Err(RecvError::Closed) => return,
                },
                changed = bundles.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if had_bundles {
                        manager.bundles_changed();
                    }
                    had_bundles = !bundles.borrow_and_update().is_empty();
                }
            }
        }
    })
}

#[cfg(test)]
#[path = "handshake_glue/tests.rs"]
mod tests;
