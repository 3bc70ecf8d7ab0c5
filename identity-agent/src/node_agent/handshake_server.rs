//! The handshake server as the agent runs it: its limits, its metrics, and the connection
//! keys it installs.

use super::auth_table::DatapathKeySink;
use super::node_view::ViewHosted;
use crate::handshake::HandshakeServer;
use crate::metrics::AgentMetrics;
use crate::svid::SvidStore;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Limits of the handshake server (agent configuration).
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_concurrent: usize,
    pub max_per_source: usize,
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
