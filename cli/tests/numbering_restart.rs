//! An agent restart with a damaged `numbers.json` (the SPIFFE-ID numbering) and live, pinned
//! auth entries: no pinned entry may pass a pair it did not prove. Real pinned maps, and the
//! real agent binary restarted on them; run as root.

use meshauth_agent::numbering::{self, ALLOCATOR_FILE};
use meshauth_datapath::netns::{Netns, PinDir, require_root};
use meshauth_datapath::{BootTime, Datapath, DatapathConfig, Maps};
use meshauth_policy::compile::{NumberAllocator, compile};
use meshauth_policy::model::{Inputs, ModelConfig, PodInfo, PolicyModel};
use meshauth_policy::tables::CompiledTables;
use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    dp.set_auth(pair.0, pair.1, meshauth_datapath::NodeId::This, BootTime::after(Duration::from_secs(3600))).expect("auth");
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
fn assert_no_entry_passes_an_unproven_pair(maps: &Maps, proven: (&str, &str)) {
    let names = maps.spiffe_names().expect("names");
    for e in maps.auth_entries().expect("auth") {
        let pair = (names.get(&e.dst_spiffe_id).cloned(), names.get(&e.src_spiffe_id).cloned());
        assert_eq!(
            pair,
            (Some(id(proven.0)), Some(id(proven.1))),
            "entry ({}, {}) passes a pair nobody proved",
            e.dst_spiffe_id,
            e.src_spiffe_id
        );
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
        assert_no_entry_passes_an_unproven_pair(dp.maps(), ("payment", "order"));
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
    assert_no_entry_passes_an_unproven_pair(dp.maps(), ("payment", "order"));
    assert!(dp.auth_entries().expect("auth").is_empty(), "the entry would have meant audit <- refund: removed");
}

/// The restarted agent's mesh: Strict, so every pair of it is one the agent keeps proven, and
/// two new pods that sort first.
const RESTARTED_MESH: &str = "\
apiVersion: meshauth.io/v1alpha1
kind: MutualAuth
metadata: {name: default, namespace: shop}
spec: {mode: Strict}
";

fn pod_manifest(sa: &str, i: u8) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {sa}-0, namespace: shop}}\nspec: {{serviceAccountName: {sa}, nodeName: node-1, containers: []}}\nstatus: {{podIP: 10.244.1.{i}}}\n"
    )
}

/// The agent process, stopped (SIGTERM) when dropped, also when an assertion fails.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SAFETY: a pid we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn meshauth_bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshauthctl")).with_file_name(name)
}

#[test]
fn a_restarted_agent_with_a_garbage_numbering_adopts_no_entry_under_a_new_meaning() {
    require_root();
    let pins = PinDir::new("numbering-agent");
    let dir = tempfile::tempdir().expect("dir");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    first_run(&pins.0, &state);
    std::fs::write(state.join(ALLOCATOR_FILE), b"\xff not json").expect("garbage");
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifests");
    let pods: String = ["aa-audit", "ab-refund", "payment", "order"].iter().zip(1u8..).map(|(sa, i)| pod_manifest(sa, i)).collect();
    std::fs::write(manifests.join("mesh.yaml"), format!("{RESTARTED_MESH}{pods}")).expect("write");

    let ns = Netns::new("numbering-agent").expect("netns");
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let netns = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("open netns");
    let mut cmd = Command::new(meshauth_bin("meshauth-agent"));
    cmd.args(["run", "--node-name", "node-1", "--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--manifests"])
        .arg(&manifests)
        .arg("--workload-api-socket")
        .arg(dir.path().join("no-workload-api.sock"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--pin-dir")
        .arg(&pins.0)
        .env("MESHAUTH_CNI_SOCKET", dir.path().join("cni.sock"))
        .env("MESHAUTH_NETNS_DIRS", dir.path().join("no-netns"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    // SAFETY: setns is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut agent = Agent(cmd.spawn().expect("start the agent"));
    let agent_log = || std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
    // The restarted agent has applied its mesh once the new pods' names are pinned.
    let started = Instant::now();
    // Read through the pins alone: the agent owns the datapath.
    let maps = loop {
        let maps = Maps::open(&pins.0).expect("pinned maps");
        if maps.spiffe_names().expect("names").values().any(|n| *n == id("aa-audit")) {
            break maps;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the agent did not apply its mesh:\n{}", agent_log());
        assert!(agent.0.try_wait().expect("agent").is_none(), "the agent stopped:\n{}", agent_log());
        std::thread::sleep(Duration::from_millis(100));
    };
    // Long enough for the auth manager to have adopted (or dropped) the pinned entries.
    std::thread::sleep(Duration::from_secs(2));
    assert_no_entry_passes_an_unproven_pair(&maps, ("payment", "order"));
    assert_eq!(maps.auth_entries().expect("auth").len(), 1, "the proven pair's entry adopted, under its own meaning");
    drop(agent);
    assert!(agent_log().contains("rebuilt from the pinned SPIFFE names"), "{}", agent_log());
}
