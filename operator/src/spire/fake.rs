//! An in-memory SPIRE Entry API for tests: stores entries like the server does (refusing a
//! create that is similar to an existing entry), can hold foreign entries, and can be made
//! unavailable to test retries. Test support only.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{AttestedAgent, EntryApi, EntrySpec, ItemResult, Registered, SpireError};

/// A stored entry: its spec and whether it carries the operator's mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub spec: EntrySpec,
    pub owned: bool,
}

/// The in-memory server.
#[derive(Debug, Default)]
pub struct FakeSpire {
    entries: Mutex<BTreeMap<String, Stored>>,
    next_id: AtomicU64,
    down: AtomicBool,
    calls: AtomicU64,
    agents: Mutex<Vec<AttestedAgent>>,
}

impl FakeSpire {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an entry that someone else made (no operator mark); returns its ID.
    pub fn add_foreign(&self, spec: EntrySpec) -> String {
        let id = format!("foreign-{}", self.next_id.fetch_add(1, Ordering::SeqCst));
        self.lock().insert(id.clone(), Stored { spec, owned: false });
        id
    }

    /// Records an attested agent.
    pub fn add_agent(&self, agent: AttestedAgent) {
        self.agents.lock().unwrap_or_else(|p| p.into_inner()).push(agent);
    }

    /// Makes every call fail as if the server were gone (`true`) or answer again (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Every entry, by ID.
    pub fn entries(&self) -> BTreeMap<String, Stored> {
        self.lock().clone()
    }

    /// The specs of the operator's entries, sorted.
    pub fn owned_specs(&self) -> Vec<EntrySpec> {
        let mut v: Vec<_> = self.lock().values().filter(|s| s.owned).map(|s| s.spec.clone()).collect();
        v.sort();
        v
    }

    /// How many RPCs were made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Stored>> {
        // A test that panicked while holding the lock has failed already.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, operation: &'static str) -> Result<(), SpireError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SpireError::Call { operation, status: Box::new(tonic::Status::unavailable("fake SPIRE server is down")) });
        }
        Ok(())
    }
}

impl EntryApi for FakeSpire {
    async fn list_owned(&self) -> Result<Vec<Registered>, SpireError> {
        self.enter("ListEntries")?;
        Ok(self.lock().iter().filter(|(_, s)| s.owned).map(|(id, s)| Registered { id: id.clone(), spec: s.spec.clone() }).collect())
    }

    async fn create(&self, specs: Vec<EntrySpec>) -> Result<Vec<ItemResult<Registered>>, SpireError> {
        self.enter("BatchCreateEntry")?;
        let mut entries = self.lock();
        Ok(specs
            .into_iter()
            .map(|spec| {
                let similar = entries.values().any(|s| {
                    s.spec.spiffe_id == spec.spiffe_id && s.spec.parent_id == spec.parent_id && s.spec.selectors == spec.selectors
                });
                if similar {
                    return ItemResult::AlreadyExists;
                }
                let id = format!("e-{}", self.next_id.fetch_add(1, Ordering::SeqCst));
                entries.insert(id.clone(), Stored { spec: spec.clone(), owned: true });
                ItemResult::Done(Registered { id, spec })
            })
            .collect())
    }

    async fn update(&self, updates: Vec<Registered>) -> Result<Vec<ItemResult<Registered>>, SpireError> {
        self.enter("BatchUpdateEntry")?;
        let mut entries = self.lock();
        Ok(updates
            .into_iter()
            .map(|r| match entries.get_mut(&r.id) {
                None => ItemResult::NotFound,
                Some(s) => {
                    s.spec.selectors = r.spec.selectors.clone();
                    s.spec.x509_svid_ttl = r.spec.x509_svid_ttl;
                    s.owned = true;
                    ItemResult::Done(Registered { id: r.id, spec: s.spec.clone() })
                }
            })
            .collect())
    }

    async fn list_agents(&self) -> Result<Vec<AttestedAgent>, SpireError> {
        self.enter("ListAgents")?;
        Ok(self.agents.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    async fn delete(&self, ids: Vec<String>) -> Result<Vec<ItemResult<String>>, SpireError> {
        self.enter("BatchDeleteEntry")?;
        let mut entries = self.lock();
        Ok(ids
            .into_iter()
            .map(|id| match entries.remove(&id) {
                Some(_) => ItemResult::Done(id),
                None => ItemResult::NotFound,
            })
            .collect())
    }
}
