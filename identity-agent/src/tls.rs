//! The agent's rustls crypto provider: one explicit provider (ring), never the process default.
//! A leaf module: it depends on nothing else in the crate.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The agent's one crypto provider (ring), shared by all handshakes and SVID key loading.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())).clone()
}
