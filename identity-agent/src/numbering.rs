//! The node's security-identity and SPIFFE-ID numbering across agent restarts.
//!
//! Auth entries are keyed by SPIFFE-ID numbers and stay pinned while the agent restarts, so a
//! restarted agent must give every number the meaning it had when the entry was proven: an
//! entry adopted under a new numbering would let a pair that never shook hands ride another
//! pair's proof. The numbering is kept in `numbers.json` in the state directory; the pinned
//! `spiffe_names` map says what each number meant to the maps. At start:
//! - a readable file is the numbering; unreadable or missing, it is rebuilt from the pinned
//!   names (number → SPIFFE ID), so the pinned entries keep their meaning. A file that parses
//!   but that the allocator could not have written (a number or identity listed twice, a
//!   reserved number, a next number not above one listed) counts as unreadable: trusted, it
//!   could give one number to two IDs;
//! - an auth entry survives only when both its numbers mean, in that numbering, exactly the ID
//!   the pinned names give them; the rest are removed before anyone adopts them;
//! - no number seen in the pinned maps is handed out again.

use meshauth_datapath::{Datapath, DatapathError, Maps};
use meshauth_policy::compile::NumberAllocator;
use meshauth_policy::tables::{FIRST_ALLOCATED_IDENTITY, SecurityIdentityKey};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The numbering's file in the state directory.
pub const ALLOCATOR_FILE: &str = "numbers.json";

/// Why the numbering could not be restored or kept.
#[derive(Debug, thiserror::Error)]
pub enum NumberingError {
    #[error("cannot read the pinned maps to check the numbering against: {0}")]
    Pinned(#[source] DatapathError),
    #[error("cannot remove auth entry ({dst}, {src}), whose numbers changed meaning: {error}")]
    RemoveAuth { dst: u32, src: u32, error: DatapathError },
    #[error("state file {path}: {error}")]
    State { path: PathBuf, error: std::io::Error },
    #[error("{kind} number {number} is listed for two identities")]
    DuplicateNumber { kind: &'static str, number: u32 },
    #[error("{kind} {name} is listed twice")]
    DuplicateName { kind: &'static str, name: String },
    #[error("{kind} number {number} is below {first}, the first one the allocator hands out")]
    Reserved { kind: &'static str, number: u32, first: u32 },
    #[error("next {kind} number {next} is not above {highest}, a number already listed")]
    NextNotAbove { kind: &'static str, next: u32, highest: u32 },
    #[error("the numbering does not fit the allocator's form: {0}")]
    Form(#[source] serde_json::Error),
}

/// [`NumberAllocator`]'s serialized form, which is what `numbers.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Numbers {
    security: Vec<(SecurityIdentityKey, u32)>,
    spiffe: Vec<(String, u32)>,
    next_security: u32,
    next_spiffe: u32,
}

impl Numbers {
    fn into_allocator(self) -> Result<NumberAllocator, NumberingError> {
        // Same fields, same serde shape: only a change of NumberAllocator could refuse it,
        // and `the_file_form_is_the_allocators` catches that. Should it happen anyway, the
        // agent must not start: a default allocator would number afresh from 1, while
        // `stale_auth` was decided against this numbering, and the kept entries would change
        // meaning.
        serde_json::to_value(self).and_then(serde_json::from_value).map_err(NumberingError::Form)
    }

    /// Whether the allocator could have written this: every number above the reserved ones
    /// and given to one identity, every identity listed once, each next number above all the
    /// numbers listed. Anything else is damage, and the allocator would take it as it is: a
    /// number given twice (or handed out again by a next number at or below it) lets an auth
    /// entry proven for one SPIFFE ID admit another.
    fn check(&self) -> Result<(), NumberingError> {
        check_kind("security-identity", &self.security, self.next_security, FIRST_ALLOCATED_IDENTITY)?;
        // 1: what `compile` starts SPIFFE-ID numbers at; 0 is NO_SPIFFE_ID.
        check_kind("SPIFFE-ID", &self.spiffe, self.next_spiffe, 1)
    }

    fn of(allocator: &NumberAllocator) -> Option<Self> {
        serde_json::to_value(allocator).and_then(serde_json::from_value).ok()
    }
}

/// [`Numbers::check`] for one kind of number; `first` is the lowest the allocator hands out.
fn check_kind<K: Ord + std::fmt::Debug>(kind: &'static str, listed: &[(K, u32)], next: u32, first: u32) -> Result<(), NumberingError> {
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (name, number) in listed {
        if *number < first {
            return Err(NumberingError::Reserved { kind, number: *number, first });
        }
        if !numbers.insert(*number) {
            return Err(NumberingError::DuplicateNumber { kind, number: *number });
        }
        // Listed twice, the last number wins when the allocator opens the list; the file no
        // longer says which number the maps' entries were proven under.
        if !names.insert(name) {
            return Err(NumberingError::DuplicateName { kind, name: format!("{name:?}") });
        }
    }
    match numbers.last() {
        Some(&highest) if next <= highest => Err(NumberingError::NextNotAbove { kind, next, highest }),
        _ => Ok(()),
    }
}

/// What the pinned maps say about the numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pinned {
    /// `spiffe_names`: number → SPIFFE ID.
    pub spiffe_names: BTreeMap<u32, String>,
    /// The (destination, source) numbers of every auth entry.
    pub auth: Vec<(u32, u32)>,
    /// The highest security identity any endpoint carries.
    pub max_security_identity: u32,
}

impl Pinned {
    pub fn read(maps: &Maps) -> Result<Self, DatapathError> {
        Ok(Self {
            spiffe_names: maps.spiffe_names()?,
            auth: maps.auth_entries()?.into_iter().map(|e| (e.dst_spiffe_id, e.src_spiffe_id)).collect(),
            max_security_identity: maps.endpoints()?.iter().map(|e| e.security_identity).max().unwrap_or(0),
        })
    }
}

/// Where the numbering came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    /// The file was missing or unreadable: rebuilt from the pinned names.
    PinnedNames,
}

/// The restored numbering and the auth entries that must go.
#[derive(Debug, Clone)]
pub struct Restored {
    pub allocator: NumberAllocator,
    pub origin: Origin,
    /// Auth entries whose numbers do not mean what the pinned names say.
    pub stale_auth: Vec<(u32, u32)>,
}

/// Decides the numbering from the file's bytes (`None`: no file) and the pinned maps.
/// Fails only when the numbering cannot be handed to the allocator as decided.
pub fn restore(file: Option<&[u8]>, pinned: &Pinned) -> Result<Restored, NumberingError> {
    let parsed = file.and_then(|bytes| serde_json::from_slice::<NumberAllocator>(bytes).ok()).and_then(|a| Numbers::of(&a));
    // A damaged file is no numbering to trust, however well it parses: rebuilt from the pinned
    // names like a garbage file, the pinned entries keep their meaning and no number is
    // handed out twice.
    let from_file = parsed.filter(|numbers| match numbers.check() {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(%error, "identity numbering inconsistent; treated as unreadable");
            false
        }
    });
    let (mut numbers, origin) = match from_file {
        Some(numbers) => (numbers, Origin::File),
        None => {
            let spiffe = pinned.spiffe_names.iter().map(|(n, id)| (id.clone(), *n)).collect();
            (Numbers { spiffe, ..Numbers::default() }, Origin::PinnedNames)
        }
    };
    // Opened the way the allocator opens it: one number per ID, the last one listed.
    let by_id: BTreeMap<&str, u32> = numbers.spiffe.iter().map(|(id, n)| (id.as_str(), *n)).collect();
    let meaning: BTreeMap<u32, &str> = by_id.iter().map(|(id, n)| (*n, *id)).collect();
    let keeps = |n: u32| meaning.get(&n).is_some_and(|id| pinned.spiffe_names.get(&n).is_some_and(|p| p == id));
    let stale_auth = pinned.auth.iter().copied().filter(|(dst, src)| !(keeps(*dst) && keeps(*src))).collect();
    let seen_spiffe = pinned.spiffe_names.keys().copied().chain(pinned.auth.iter().flat_map(|(d, s)| [*d, *s])).max();
    if let Some(max) = seen_spiffe {
        numbers.next_spiffe = numbers.next_spiffe.max(max.saturating_add(1));
    }
    if pinned.max_security_identity > 0 {
        numbers.next_security = numbers.next_security.max(pinned.max_security_identity.saturating_add(1));
    }
    Ok(Restored { allocator: numbers.into_allocator()?, origin, stale_auth })
}

/// Restores the numbering for a datapath whose maps may be a previous agent's, removing the
/// auth entries that would change meaning. Must run before anything adopts the auth entries.
pub fn load(state_dir: &Path, datapath: &mut Datapath) -> Result<NumberAllocator, NumberingError> {
    let path = state_dir.join(ALLOCATOR_FILE);
    let file = match std::fs::read(&path) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "cannot read the identity numbering; rebuilding it from the pinned names");
            None
        }
    };
    let pinned = Pinned::read(datapath.maps()).map_err(NumberingError::Pinned)?;
    let restored = restore(file.as_deref(), &pinned)?;
    if file.is_some() && restored.origin == Origin::PinnedNames {
        tracing::warn!(path = %path.display(), names = pinned.spiffe_names.len(), "identity numbering unreadable; rebuilt from the pinned SPIFFE names");
    }
    for &(dst, src) in &restored.stale_auth {
        datapath.remove_pair(dst, src).map_err(|error| NumberingError::RemoveAuth { dst, src, error })?;
    }
    if !restored.stale_auth.is_empty() {
        tracing::warn!(
            removed = restored.stale_auth.len(),
            "auth entries whose numbers changed meaning removed; those pairs shake hands again"
        );
    }
    Ok(restored.allocator)
}

/// Writes the numbering (write-then-rename: a crash mid-write leaves the previous one).
pub fn save(state_dir: &Path, allocator: &NumberAllocator) -> Result<(), NumberingError> {
    let path = state_dir.join(ALLOCATOR_FILE);
    let tmp = state_dir.join(format!("{ALLOCATOR_FILE}.tmp"));
    let state_err = |error| NumberingError::State { path: path.clone(), error };
    let bytes = serde_json::to_vec(allocator).map_err(|e| state_err(std::io::Error::other(e)))?;
    std::fs::write(&tmp, bytes).map_err(state_err)?;
    std::fs::rename(&tmp, &path).map_err(state_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshauth_policy::compile::compile;
    use meshauth_policy::model::{Inputs, ModelConfig, PodInfo, PolicyModel};
    use std::collections::BTreeSet;

    /// Compiles one pod per service account with `allocator`; the SPIFFE names the maps get.
    fn names(service_accounts: &[&str], allocator: &mut NumberAllocator) -> BTreeMap<u32, String> {
        let pods = service_accounts
            .iter()
            .zip(1u8..)
            .map(|(sa, i)| PodInfo {
                namespace: "x".into(),
                name: (*sa).into(),
                labels: BTreeMap::new(),
                service_account: (*sa).into(),
                ip: Some(std::net::Ipv4Addr::new(10, 0, 0, i)),
                node: None,
            })
            .collect();
        let model = PolicyModel::new(ModelConfig::default(), Inputs { pods, ..Default::default() });
        compile(&model, allocator).spiffe_ids.into_iter().collect()
    }

    /// Numbers of `a` that `b` gives another meaning.
    fn changed_meanings(a: &BTreeMap<u32, String>, b: &BTreeMap<u32, String>) -> BTreeSet<u32> {
        a.iter().filter(|(n, id)| b.get(n).is_some_and(|other| other != *id)).map(|(n, _)| *n).collect()
    }

    fn id(sa: &str) -> String {
        format!("spiffe://cluster.local/ns/x/sa/{sa}")
    }

    /// The SPIFFE IDs each number means: the pinned names, then what `allocator` gives one pod
    /// per service account. Read off the endpoints, since `spiffe_ids` is keyed by number and
    /// would hide a number given twice.
    fn ids_per_number(pinned: &Pinned, service_accounts: &[&str], allocator: &mut NumberAllocator) -> BTreeMap<u32, BTreeSet<String>> {
        let pods = service_accounts
            .iter()
            .zip(1u8..)
            .map(|(sa, i)| PodInfo {
                namespace: "x".into(),
                name: (*sa).into(),
                labels: BTreeMap::new(),
                service_account: (*sa).into(),
                ip: Some(std::net::Ipv4Addr::new(10, 0, 0, i)),
                node: None,
            })
            .collect();
        let model = PolicyModel::new(ModelConfig::default(), Inputs { pods, ..Default::default() });
        let mut ids: BTreeMap<u32, BTreeSet<String>> = BTreeMap::new();
        for (n, name) in &pinned.spiffe_names {
            ids.entry(*n).or_default().insert(name.clone());
        }
        for e in compile(&model, allocator).endpoints {
            let sa = e.pod.rsplit('/').next().expect("namespace/name");
            ids.entry(e.spiffe_id).or_default().insert(id(sa));
        }
        ids
    }

    /// The numbers that mean more than one SPIFFE ID.
    fn shared(ids: &BTreeMap<u32, BTreeSet<String>>) -> BTreeMap<u32, BTreeSet<String>> {
        ids.iter().filter(|(_, names)| names.len() > 1).map(|(n, names)| (*n, names.clone())).collect()
    }

    /// A file as the allocator writes it, listing only SPIFFE IDs.
    fn spiffe_file(spiffe: &[(&str, u32)], next_spiffe: u32) -> Vec<u8> {
        let spiffe = spiffe.iter().map(|(sa, n)| (id(sa), *n)).collect();
        serde_json::to_vec(&Numbers { spiffe, next_spiffe, ..Numbers::default() }).expect("json")
    }

    #[test]
    fn the_file_form_is_the_allocators() {
        let mut allocator = NumberAllocator::default();
        names(&["a", "b"], &mut allocator);
        let numbers = Numbers::of(&allocator).expect("same shape");
        assert_eq!(numbers.spiffe.len(), 2);
        assert_eq!(numbers.clone().into_allocator().expect("same shape"), allocator);
    }

    #[test]
    fn garbage_or_no_file_rebuilds_the_numbering_from_the_pinned_names() {
        let mut first = NumberAllocator::default();
        let pinned_names = names(&["a", "b"], &mut first);
        let pinned = Pinned { spiffe_names: pinned_names.clone(), auth: vec![(1, 2)], max_security_identity: 257 };
        for file in [None, Some(&b"{\"spiffe\": [garbage"[..]), Some(&b""[..])] {
            let mut restored = restore(file, &pinned).expect("restore");
            assert_eq!(restored.origin, Origin::PinnedNames);
            assert!(restored.stale_auth.is_empty(), "the numbers keep their meaning");
            // Pods that would sort first and take numbers 1 and 2 from a fresh numbering.
            let now = names(&["0c", "0d", "a", "b"], &mut restored.allocator);
            assert!(changed_meanings(&pinned_names, &now).is_empty(), "{now:?}");
            assert_eq!(now.get(&1), Some(&id("a")));
            assert!(now.keys().all(|n| !pinned_names.contains_key(n) || pinned_names[n] == now[n]));
            // What the old code did: restart from 1, and (1, 2) would mean (0c, 0d).
            let fresh = names(&["0c", "0d", "a", "b"], &mut NumberAllocator::default());
            assert_eq!(changed_meanings(&pinned_names, &fresh), BTreeSet::from([1, 2]));
        }
    }

    #[test]
    fn entries_whose_numbers_changed_meaning_are_not_kept() {
        // A readable file that disagrees with the maps (an old copy restored, say).
        let mut stale_file = NumberAllocator::default();
        names(&["0c", "0d"], &mut stale_file);
        let bytes = serde_json::to_vec(&stale_file).expect("json");
        let pinned = Pinned {
            spiffe_names: BTreeMap::from([(1, id("a")), (2, id("b")), (5, id("e"))]),
            auth: vec![(1, 2), (2, 1), (7, 1)],
            max_security_identity: 300,
        };
        let mut restored = restore(Some(&bytes), &pinned).expect("restore");
        assert_eq!(restored.origin, Origin::File);
        assert_eq!(restored.stale_auth, vec![(1, 2), (2, 1), (7, 1)], "1 and 2 mean 0c and 0d now; 7 means nothing");
        // No number the maps have seen is handed out again.
        let now = names(&["0c", "0d", "e2"], &mut restored.allocator);
        assert_eq!(now.get(&8), Some(&id("e2")), "{now:?}");
        let numbers = Numbers::of(&restored.allocator).expect("shape");
        assert!(numbers.next_security > 300);
    }

    #[test]
    fn a_file_giving_one_number_to_two_ids_is_rebuilt_and_no_number_means_two_ids() {
        // a proved itself to b under 1 and 2; the file (damaged) gives b a's number too.
        let pinned = Pinned { spiffe_names: BTreeMap::from([(1, id("a")), (2, id("b"))]), auth: vec![(1, 2)], max_security_identity: 257 };
        let file = spiffe_file(&[("a", 1), ("b", 1)], 3);
        let mut restored = restore(Some(&file), &pinned).expect("restore");
        let ids = ids_per_number(&pinned, &["0c", "0d", "a", "b", "c"], &mut restored.allocator);
        assert!(shared(&ids).is_empty(), "{ids:?}");
        assert_eq!(restored.origin, Origin::PinnedNames, "a number listed twice is damage");
        assert!(restored.stale_auth.is_empty(), "rebuilt from the pinned names, (1, 2) keeps its meaning");
        assert_eq!(ids.get(&1), Some(&BTreeSet::from([id("a")])));
        assert_eq!(ids.get(&2), Some(&BTreeSet::from([id("b")])));
    }

    #[test]
    fn a_file_whose_next_number_is_not_above_a_listed_one_is_rebuilt_and_no_number_means_two_ids() {
        // The review's case: the file lists (a, 7) but would hand out 3 next, and a reboot
        // wiped the pins while the state directory survived.
        let pinned = Pinned::default();
        let file = spiffe_file(&[("a", 7)], 3);
        let mut restored = restore(Some(&file), &pinned).expect("restore");
        // Trusted, the file would have given 3…7 to b…f, and f would share a's 7.
        let ids = ids_per_number(&pinned, &["a", "b", "c", "d", "e", "f"], &mut restored.allocator);
        assert!(shared(&ids).is_empty(), "{ids:?}");
        assert_eq!(ids.len(), 6, "{ids:?}");
        assert_eq!(restored.origin, Origin::PinnedNames);
    }

    #[test]
    fn a_file_the_allocator_could_not_have_written_counts_as_unreadable() {
        let mut allocator = NumberAllocator::default();
        names(&["a", "b"], &mut allocator);
        let good = Numbers::of(&allocator).expect("shape");
        assert!(good.check().is_ok());
        let pinned = Pinned { spiffe_names: BTreeMap::from([(1, id("a")), (2, id("b"))]), auth: vec![(1, 2)], max_security_identity: 257 };
        let bytes = serde_json::to_vec(&good).expect("json");
        assert_eq!(restore(Some(&bytes), &pinned).expect("restore").origin, Origin::File);
        type Damage = (&'static str, fn(&mut Numbers));
        let damage: [Damage; 8] = [
            ("SPIFFE-ID number twice", |n| n.spiffe[1].1 = n.spiffe[0].1),
            ("next SPIFFE-ID number below a listed one", |n| n.next_spiffe = 1),
            ("next SPIFFE-ID number equal to a listed one", |n| n.next_spiffe = 2),
            ("SPIFFE ID twice", |n| n.spiffe.push((n.spiffe[0].0.clone(), 3))),
            ("SPIFFE-ID number 0 (no SPIFFE ID)", |n| n.spiffe[0].1 = 0),
            ("security number twice", |n| n.security[1].1 = n.security[0].1),
            ("next security number not above a listed one", |n| n.next_security = 257),
            ("reserved security number", |n| n.security[0].1 = meshauth_policy::tables::WORLD_IDENTITY),
        ];
        for (what, damage) in damage {
            let mut numbers = good.clone();
            damage(&mut numbers);
            assert!(numbers.check().is_err(), "{what}: {numbers:?}");
            let bytes = serde_json::to_vec(&numbers).expect("json");
            let restored = restore(Some(&bytes), &pinned).expect("restore");
            assert_eq!(restored.origin, Origin::PinnedNames, "{what}");
            assert!(restored.stale_auth.is_empty(), "{what}");
        }
    }
}
