//! In-process doubles of the auth map and the observer, for the manager's tests and the
//! node agent's authenticator tests.

use super::{AuthFailure, AuthObserver, AuthTable, PairKey, ProofKey};
use meshauth_datapath::ConnectionKey;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The auth map in memory (expiries, and the connection keys beside them); clones share it.
#[derive(Clone, Default)]
pub(crate) struct FakeTable(pub Arc<Mutex<BTreeMap<ProofKey, SystemTime>>>, pub Arc<Mutex<BTreeMap<ProofKey, ConnectionKey>>>);

impl FakeTable {
    /// The latest expiry among the pair's proofs (any node's).
    pub fn get(&self, pair: PairKey) -> Option<SystemTime> {
        self.0.lock().ok().and_then(|t| t.iter().filter(|(k, _)| k.pair == pair).map(|(_, e)| *e).max())
    }

    /// The proof of one node.
    pub fn proof(&self, key: ProofKey) -> Option<SystemTime> {
        self.0.lock().ok().and_then(|t| t.get(&key).copied())
    }

    /// The connection key of one node's proof.
    pub fn key(&self, key: ProofKey) -> Option<ConnectionKey> {
        self.1.lock().ok().and_then(|t| t.get(&key).copied())
    }
}

impl AuthTable for FakeTable {
    fn set(&mut self, key: ProofKey, expiry: SystemTime, connection_key: ConnectionKey) -> Result<(), String> {
        self.0.lock().map_err(|e| e.to_string())?.insert(key, expiry);
        self.1.lock().map_err(|e| e.to_string())?.insert(key, connection_key);
        Ok(())
    }
    fn remove(&mut self, key: ProofKey) -> Result<(), String> {
        self.0.lock().map_err(|e| e.to_string())?.remove(&key);
        self.1.lock().map_err(|e| e.to_string())?.remove(&key);
        Ok(())
    }
    fn list(&self) -> Result<Vec<(ProofKey, SystemTime)>, String> {
        Ok(self.0.lock().map_err(|e| e.to_string())?.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

pub(crate) struct NoObserver;

impl AuthObserver for NoObserver {
    fn handshake(&self, _: Result<(), &AuthFailure>, _: Duration) {}
    fn entries(&self, _: usize) {}
}
