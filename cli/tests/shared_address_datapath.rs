//! Two pods claiming one IP (a compromised node patched its mirror pod's status), enforced by
//! the real TC program: the tables the agent loads, run with BPF_PROG_TEST_RUN against pinned
//! maps that still hold the honest pair's authentication. Run as root.

use meshauth_cluster::manifests::Manifests;
use meshauth_datapath::netns::{PinDir, require_root};
use meshauth_datapath::packet::{self, TCP_ACK};
use meshauth_datapath::{BootTime, Datapath, DatapathConfig, Hook};
use meshauth_policy::compile::{NumberAllocator, compile};
use meshauth_policy::model::{ModelConfig, PolicyModel};
use meshauth_policy::tables::CompiledTables;
use std::net::Ipv4Addr;
use std::time::Duration;

const MESH: &str = include_str!("../../cluster/testdata/forged-address/mesh.yaml");
/// A compromised node-2 gives its mirror pod payment-0's address.
const FORGED_MIRROR: &str = include_str!("../../cluster/testdata/forged-address/mirror.yaml");

/// The node the pods live on, as the agent that runs these tables knows it (its agent proved
/// the pair).
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// The tables an agent writes for `text`: compiled, plus the isolated shared addresses.
fn tables(text: &str, allocator: &mut NumberAllocator) -> CompiledTables {
    let mut manifests = Manifests::default();
    manifests.add_source("mesh.yaml", text).expect("manifests");
    let snapshot = manifests.snapshot();
    let mut t = compile(&PolicyModel::new(ModelConfig::default(), snapshot.inputs.clone()), allocator);
    snapshot.isolate_shared_addresses(&mut t.endpoints);
    for e in &mut t.endpoints {
        e.node_address = Some(NODE);
    }
    t
}

/// A mid-stream segment: it takes the pair's check every time (a SYN from another node would
/// also need its connection tag, which this test is not about).
fn passes(dp: &Datapath, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    dp.test_run(Hook::ToPod, &packet::tcp(src, dst, 40000, 8080, TCP_ACK), 1).expect("test run").passed()
}

#[test]
fn an_address_two_pods_claim_is_isolated_and_rides_no_authentication() {
    require_root();
    let pins = PinDir::new("shared-address");
    let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pins.0)).expect("load");
    let (payment, order) = (Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 1, 6));
    let mut allocator = NumberAllocator::default();
    let honest = tables(MESH, &mut allocator);
    dp.apply_tables(&honest).expect("apply");
    let number = |sa: &str| honest.spiffe_ids.iter().find(|(_, id)| id.ends_with(&format!("/sa/{sa}"))).map(|(n, _)| *n).expect("number");
    let until = BootTime::after(Duration::from_secs(3600));
    dp.set_auth(number("order"), number("payment"), meshauth_datapath::NodeId::At(NODE), until).expect("auth");
    dp.set_auth(number("payment"), number("order"), meshauth_datapath::NodeId::At(NODE), until).expect("auth");
    assert!(passes(&dp, payment, order) && passes(&dp, order, payment), "the proven pair passes both ways");

    dp.apply_tables(&tables(&format!("{MESH}---\n{FORGED_MIRROR}"), &mut allocator)).expect("apply");
    assert!(!passes(&dp, payment, order), "from the shared address: no identity, so the Strict pod drops it");
    assert!(!passes(&dp, order, payment), "to the shared address: isolated, nothing passes as payment's identity");
    assert_eq!(dp.auth_entries().expect("auth").len(), 2, "dropped although the old proofs are still pinned");
}
