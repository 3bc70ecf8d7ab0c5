//! A pair whose entry cannot be extended does not storm handshakes, with real agents, the real datapath and the demo's 8 s SVIDs from the
//! development issuer (the demo's box and example mesh): once less than the 5 s refresh
//! margin of an entry is left, every success used to schedule the next handshake at once,
//! about 700 a second for one pair. Here the pair order-0 → payment-0:8080 is held open for
//! three SVID lifetimes under traffic, then node-1's issuer stops (no SVID can rotate, as in a
//! SPIRE outage) until the entry ends. The handshakes are counted from node-1's agent log
//! (those it answered for the pair) and node-2's agent CPU time is reported. Root only.

#[path = "support/agent_load.rs"]
#[allow(dead_code)] // the box metrics reader is the benches'
mod agent_load;

use agent_load::{agent_bin, answered, cpu_time};
use meshauth_datapath::Maps;
use meshauth_datapath::netns::{require_root, tcp_echo_server, tcp_request};
use meshauthctl::demo::mesh::MeshBox;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const SVID_TTL: Duration = Duration::from_secs(8);
const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order";
const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";
const PORT: u16 = 8080;

/// The demo's box: config/examples, both issuers and agents running.
fn example_box(dir: &Path) -> MeshBox {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap_or_else(|e| panic!("{e}"));
    let mut parsed = meshauth_cluster::manifests::Manifests::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&examples)
        .unwrap_or_else(|e| panic!("{}: {e}", examples.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        parsed.add_source(&name, &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        std::fs::write(manifests.join(&name), text).unwrap_or_else(|e| panic!("{e}"));
    }
    let tag = format!("hs{}", std::process::id() % 100_000);
    let mut mesh = MeshBox::build(&tag, dir.to_path_buf(), manifests, &parsed, agent_bin(), SVID_TTL)
        .unwrap_or_else(|e| panic!("building the box: {e}"));
    for node in ["node-1", "node-2"] {
        mesh.start_issuer(node).unwrap_or_else(|e| panic!("{node} issuer: {e}"));
        mesh.start_agent(node).unwrap_or_else(|e| panic!("{node} agent: {e}"));
    }
    mesh
}

fn logs(mesh: &MeshBox) -> String {
    format!("---- node-1\n{}\n---- node-2\n{}", mesh.agent_log("node-1"), mesh.agent_log("node-2"))
}

fn pid_of(child: Option<&Child>, what: &str) -> u32 {
    child.map(Child::id).unwrap_or_else(|| panic!("no {what}"))
}

#[test]
fn short_svids_cost_a_few_handshakes_per_pair_held_open_and_with_the_issuer_stopped() {
    require_root();
    assert!(agent_bin().exists(), "{} is missing: build it with `cargo build -p meshauth-agent`", agent_bin().display());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut mesh = example_box(dir.path());
    let payment = mesh.pod("shop/payment-0").ip;
    let _server = tcp_echo_server(mesh.pod("shop/payment-0"), PORT).unwrap_or_else(|e| panic!("{e}"));
    let pins = mesh.node("node-2").map(|n| n.pin_dir.clone()).unwrap_or_else(|| panic!("no node-2"));
    let maps = Maps::open(&pins).unwrap_or_else(|e| panic!("{e}"));
    let entries = || maps.auth_entries().map(|e| e.iter().filter(|e| e.expiry.remaining().is_some()).count()).unwrap_or(0);
    let start = Instant::now();
    while entries() == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "no auth entry on node-2 after 20 s\n{}", mesh.agent_log("node-2"));
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent = pid_of(mesh.node("node-2").and_then(|n| n.agent.as_ref()), "node-2 agent");

    // 1. Held open for three SVID lifetimes, a request every 200 ms.
    let (from, cpu) = (mesh.agent_log("node-1").len(), cpu_time(agent));
    let held = Instant::now();
    let (mut sent, mut failed) = (0u32, 0u32);
    while held.elapsed() < SVID_TTL * 3 {
        sent += 1;
        failed += u32::from(!tcp_request(mesh.pod("shop/order-0"), payment, PORT, Duration::from_millis(900)));
        std::thread::sleep(Duration::from_millis(200));
    }
    let held_for = held.elapsed();
    let handshakes = answered(&mesh.agent_log("node-1"), from, ORDER, PAYMENT);
    let used = cpu_time(agent).saturating_sub(cpu);
    eprintln!(
        "held open {held_for:?}: {handshakes} handshakes for (payment <- order), {failed} of {sent} requests failed, node-2's agent used {used:?} of CPU"
    );
    assert!(handshakes >= 3, "the pair was not re-authenticated as its SVIDs rotated: {handshakes}\n{}", logs(&mesh));
    assert!(handshakes <= 40, "{handshakes} handshakes for one pair in {held_for:?}\n{}", logs(&mesh));
    assert_eq!(failed, 0, "requests of the authenticated pair failed across rotations\n{}", logs(&mesh));

    // 2. node-1's issuer stops: its SVIDs cannot rotate; the entry ends with them.
    let (from, cpu) = (mesh.agent_log("node-1").len(), cpu_time(agent));
    if let Some(mut issuer) = mesh.nodes.iter_mut().find(|n| n.name == "node-1").and_then(|n| n.issuer.take()) {
        let _ = issuer.kill();
        let _ = issuer.wait();
    }
    let stopped = Instant::now();
    while entries() > 0 {
        assert!(stopped.elapsed() < SVID_TTL * 3, "an entry outlived every SVID by far\n{}", logs(&mesh));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The entry's last seconds are where the storm was: count a little past them.
    std::thread::sleep(Duration::from_secs(2));
    let outage = stopped.elapsed();
    let handshakes = answered(&mesh.agent_log("node-1"), from, ORDER, PAYMENT);
    let used = cpu_time(agent).saturating_sub(cpu);
    eprintln!(
        "issuer of node-1 stopped for {outage:?}: {handshakes} handshakes for (payment <- order) until the entry ended, node-2's agent used {used:?} of CPU"
    );
    assert!(handshakes <= 8, "{handshakes} handshakes for one pair with no SVID able to rotate, in {outage:?}\n{}", logs(&mesh));
    assert!(!tcp_request(mesh.pod("shop/order-0"), payment, PORT, Duration::from_millis(900)), "the pair passes with its SVIDs expired");
}
