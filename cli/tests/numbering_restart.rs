//! An agent restart with a damaged `numbers.json` (the SPIFFE-ID numbering) and live, pinned
//! auth entries: no pinned entry may pass a pair it did not prove. Real pinned maps; run as
//! root.

use meshauth_agent::numbering::{self, ALLOCATOR_FILE};
use meshauth_datapath::testing::{PinDir, require_root};
use meshauth_datapath::{BootTime, Datapath, DatapathConfig};
use meshauth_policy::compile::{NumberAllocator, compile};
use meshauth_policy::model::{Inputs, ModelConfig, PodInfo, PolicyModel};
use meshauth_policy::tables::CompiledTables;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/shop/sa/{sa}")
}

/// The tables of one pod per service account, numbered by `allocator`.
fn tables(service_accounts: &[&str], allocator: &mut NumberAllocator) -> CompiledTables {
    let pods = service_accounts
        .iter()
        .zip(1u8..)
        .map(|(sa, i)| PodInfo {
            namespace: "shop".into(),
            name: format!("{sa}-0"),
            labels: BTreeMap::new(),
            service_account: (*sa).into(),
            ip: Some(std::net::Ipv4Addr::new(10, 244, 1, i)),
            node: Some("node-1".into()),
        })
        .collect();
    let model = PolicyModel::new(ModelConfig::default(), Inputs { pods, ..Default::default() });
    compile(&model, allocator)
}

fn number(tables: &CompiledTables, sa: &str) -> u32 {
    tables.spiffe_ids.iter().find(|(_, i)| *i == id(sa)).map(|(n, _)| *n).unwrap_or_else(|| panic!("no number for {sa}"))
}

/// The first agent run: order-0 proved itself to payment-0, and the entry stays pinned.
fn first_run(pins: &Path, state: &Path) -> (u32, u32) {
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(pins)).expect("load");
    let mut allocator = numbering::load(state, &mut dp).expect("numbering");
    let t = tables(&["payment", "order"], &mut allocator);
    dp.apply_tables(&t).expect("apply");
    let pair = (number(&t, "payment"), number(&t, "order"));
    dp.set_auth(pair.0, pair.1, BootTime::after(Duration::from_secs(3600))).expect("auth");
    numbering::save(state, &allocator).expect("save");
    pair
}

/// The restarted agent: adopts the pins, restores the numbering, and compiles a mesh whose new
/// pods would take numbers 1 and 2 from a numbering started afresh.
fn second_run(pins: &Path, state: &Path) -> (Datapath, CompiledTables) {
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(pins)).expect("adopt");
    assert!(dp.adopted(), "the maps are the first run's");
    let mut allocator = numbering::load(state, &mut dp).expect("numbering");
    let t = tables(&["aa-audit", "ab-refund", "payment", "order"], &mut allocator);
    dp.apply_tables(&t).expect("apply");
    (dp, t)
}

/// Every pinned auth entry names, through the maps as they are now, the pair that proved it.
fn assert_no_entry_passes_an_unproven_pair(dp: &Datapath, proven: (&str, &str)) {
    let names = dp.maps().spiffe_names().expect("names");
    for e in dp.auth_entries().expect("auth") {
        let pair = (names.get(&e.dst_spiffe_id).cloned(), names.get(&e.src_spiffe_id).cloned());
        assert_eq!(pair, (Some(id(proven.0)), Some(id(proven.1))), "entry ({}, {}) passes a pair nobody proved", e.dst_spiffe_id, e.src_spiffe_id);
    }
}

#[test]
fn a_garbage_or_deleted_numbering_is_rebuilt_from_the_pinned_names_and_entries_keep_their_meaning() {
    require_root();
    for damage in ["garbage", "deleted"] {
        let pins = PinDir::new(&format!("numbering-{damage}"));
        let state = tempfile::tempdir().expect("state dir");
        let proven = first_run(&pins.0, state.path());
        let file = state.path().join(ALLOCATOR_FILE);
        match damage {
            "garbage" => std::fs::write(&file, b"{\"security\": [[{\"namespace\"\0\xff").expect("garbage"),
            _ => std::fs::remove_file(&file).expect("delete"),
        }
        let (dp, t) = second_run(&pins.0, state.path());
        assert_no_entry_passes_an_unproven_pair(&dp, ("payment", "order"));
        let entries: Vec<_> = dp.auth_entries().expect("auth").iter().map(|e| (e.dst_spiffe_id, e.src_spiffe_id)).collect();
        assert_eq!(entries, vec![proven], "{damage}: the proven pair keeps its entry, no re-handshake");
        assert_eq!((number(&t, "payment"), number(&t, "order")), proven, "{damage}: the numbers kept their meaning");
        assert!(!entries.contains(&(number(&t, "aa-audit"), number(&t, "ab-refund"))), "{damage}");
    }
}

#[test]
fn a_numbering_that_disagrees_with_the_pinned_names_drops_the_entries_it_would_change() {
    require_root();
    let pins = PinDir::new("numbering-stale");
    let state = tempfile::tempdir().expect("state dir");
    first_run(&pins.0, state.path());
    // A readable numbering in which 1 and 2 name other identities (an old copy put back).
    let mut stale = NumberAllocator::default();
    tables(&["aa-audit", "ab-refund"], &mut stale);
    std::fs::write(state.path().join(ALLOCATOR_FILE), serde_json::to_vec(&stale).expect("json")).expect("write");
    let (dp, _) = second_run(&pins.0, state.path());
    assert_no_entry_passes_an_unproven_pair(&dp, ("payment", "order"));
    assert!(dp.auth_entries().expect("auth").is_empty(), "the entry would have meant audit <- refund: removed");
}
