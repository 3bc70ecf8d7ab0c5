//! Connects the handshake module to the rest of the agent: the node view answers the
//! handshake's "who is hosted where" questions, and the handshake client is the auth manager's
//! [`Authenticator`].

use crate::auth_manager::{AuthFailure, Authenticator, BoxFuture};
use crate::handshake::{HandshakeClient, HandshakeServer, HostedIdentities};
use crate::metrics::AgentMetrics;
use crate::node_agent::SharedView;
use crate::svid::SvidStore;
use meshauth_crds::SpiffeId;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};
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
}

/// Answers peers' handshakes until the listener fails, counting each in the metrics.
pub async fn serve(listener: TcpListener, store: SvidStore, hosted: Arc<ViewHosted>, metrics: Arc<AgentMetrics>) {
    HandshakeServer::new(store, hosted).with_observer(metrics).serve(listener).await;
}

/// The handshake client as the auth manager's authenticator.
pub struct HandshakeAuthenticator {
    client: HandshakeClient,
}

impl HandshakeAuthenticator {
    pub fn new(store: SvidStore, hosted: Arc<ViewHosted>, timeout: Duration) -> Self {
        Self { client: HandshakeClient::new(store, hosted).with_timeout(timeout) }
    }
}

impl Authenticator for HandshakeAuthenticator {
    fn authenticate<'a>(&'a self, local: &'a str, peer: &'a str, addr: SocketAddr) -> BoxFuture<'a, Result<SystemTime, AuthFailure>> {
        Box::pin(async move {
            let parse = |id: &str| {
                SpiffeId::parse(id).map_err(|e| AuthFailure { reason: "bad_spiffe_id", message: format!("{id:?} {e}") })
            };
            let (local, peer) = (parse(local)?, parse(peer)?);
            self.client
                .authenticate(addr, &local, &peer)
                .await
                .map(|a| a.expiry)
                .map_err(|e| AuthFailure { reason: e.reason(), message: format!("{local} <- {peer} at {addr}: {e}") })
        })
    }
}
