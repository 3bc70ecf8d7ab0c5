//! SPIRE events against the real pieces: the auth manager with the real handshake client as
//! its authenticator, a real handshake server on loopback, the SVID store fed by an in-process
//! Workload API double, and the store's events forwarded as the agent does. Each test performs
//! the event and watches the pair's entry in the (in-memory) auth map.

use super::*;
use crate::auth_manager::fake::{FakeTable, NoObserver};
use crate::auth_manager::{self, AuthManagerConfig, DesiredPair};
use crate::handshake::HandshakeServer;
use crate::node_agent::forward_svid_events;
use crate::plan::NodeView;
use crate::svid::fake::{FakeSource, materials};
use crate::svid::{StaticSource, StoreConfig, SystemClock, X509Update};
use crate::verify::test_certs::{TestCa, TestSvid};
use std::net::IpAddr;
use std::sync::RwLock;
use std::time::{Instant, SystemTime};
use tokio::net::TcpListener;

const ORDER: &str = "spiffe://cluster.local/ns/shop/sa/order"; // the source, served by the peer
const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment"; // the destination, ours
const TD: &str = "cluster.local";
const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
const KEY: (u32, u32) = (1, 2);

fn view(local: &str, hosts: &[&str]) -> Arc<ViewHosted> {
    let mut view = NodeView::default();
    view.local_identities.insert(local.to_owned());
    for id in hosts {
        view.hosts.entry((*id).to_owned()).or_default().insert(LOOPBACK);
    }
    Arc::new(ViewHosted(Arc::new(RwLock::new(view))))
}

/// The source node's agent: serves ORDER's SVID, trusting `bundle`.
async fn source_node(order: &TestSvid, bundle: Vec<CertificateDer<'static>>) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let update = X509Update { svids: materials(&[(ORDER, order)]), bundles: vec![(TD.to_owned(), bundle)] };
    let (store, _task) = SvidStore::spawn(Arc::new(StaticSource::new(update)), StoreConfig::default(), Arc::new(SystemClock));
    let id = SpiffeId::parse(ORDER).expect("id");
    store.wait_available(&id, Duration::from_secs(5)).await.expect("ORDER's SVID");
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = HandshakeServer::new(store, view(ORDER, &[ORDER, PAYMENT]));
    (addr, tokio::spawn(server.serve(listener)))
}

/// The destination node's agent: its store fed by `source`, its manager proving
/// (PAYMENT ← ORDER) at `peer`, the store's events forwarded.
struct DestinationNode {
    store: SvidStore,
    table: FakeTable,
    manager: auth_manager::AuthManagerHandle,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DestinationNode {
    async fn start(source: &FakeSource, peer: SocketAddr) -> Self {
        let (store, store_task) = SvidStore::spawn(Arc::new(source.clone()), StoreConfig::default(), Arc::new(SystemClock));
        store.wait_available(&SpiffeId::parse(PAYMENT).expect("id"), Duration::from_secs(5)).await.expect("PAYMENT's SVID");
        let table = FakeTable::default();
        let authenticator = HandshakeAuthenticator::new(store.clone(), view(PAYMENT, &[ORDER]), Duration::from_secs(5));
        // A rotation re-authenticates at once here: these tests look at what a proof does.
        let config = AuthManagerConfig {
            min_reauth_interval: Duration::from_millis(100),
            rotation_spread: Duration::ZERO,
            ..AuthManagerConfig::default()
        };
        let manager = auth_manager::spawn(config, Arc::new(authenticator), Box::new(table.clone()), Arc::new(NoObserver));
        let events = forward_svid_events(&store, manager.clone());
        let node = Self { store, table, manager, tasks: vec![store_task, events] };
        node.want(peer);
        node.wait_for("the pair's entry", |e| e.is_some()).await;
        node
    }

    fn want(&self, peer: SocketAddr) {
        self.manager.set_desired(vec![DesiredPair {
            dst_number: KEY.0,
            src_number: KEY.1,
            dst_id: PAYMENT.to_owned(),
            src_id: ORDER.to_owned(),
            peers: vec![crate::auth_manager::Peer { node: meshauth_datapath::NodeId::This, addr: peer }],
        }]);
    }

    /// Waits up to 5 s (far less than the test SVIDs' hour) for the entry to satisfy `what`.
    async fn wait_for(&self, what: &str, f: impl Fn(Option<SystemTime>) -> bool) {
        let start = Instant::now();
        while !f(self.table.get(KEY)) {
            assert!(start.elapsed() < Duration::from_secs(5), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The entry stays as it is for `for_` (or is never back, for a removed one).
    async fn stays(&self, what: &str, for_: Duration, f: impl Fn(Option<SystemTime>) -> bool) {
        let start = Instant::now();
        while start.elapsed() < for_ {
            assert!(f(self.table.get(KEY)), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for DestinationNode {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn update(svids: &[(&str, &TestSvid)], bundle: Vec<CertificateDer<'static>>) -> X509Update {
    X509Update { svids: materials(svids), bundles: vec![(TD.to_owned(), bundle)] }
}

/// One CA for both nodes, and the pair authenticated.
struct Mesh {
    ca: TestCa,
    payment: TestSvid,
    source: FakeSource,
    node: DestinationNode,
    server: tokio::task::JoinHandle<()>,
}

impl Mesh {
    async fn authenticated() -> Self {
        let ca = TestCa::new(TD);
        let (peer, server) = source_node(&ca.svid(ORDER), vec![ca.root_cert()]).await;
        let payment = ca.svid(PAYMENT);
        let source = FakeSource::new();
        source.push(update(&[(PAYMENT, &payment)], vec![ca.root_cert()]));
        let node = DestinationNode::start(&source, peer).await;
        Self { ca, payment, source, node, server }
    }
}

#[tokio::test]
async fn a_bundle_that_loses_the_ca_of_the_peers_svid_removes_the_pair_at_once() {
    // Two CAs of one trust domain: `old` signed the peer's SVID, `new` ours.
    let (old, new) = (TestCa::new(TD), TestCa::new(TD));
    let both = vec![old.root_cert(), new.root_cert()];
    let (peer, server) = source_node(&old.svid(ORDER), both.clone()).await;
    let payment = new.svid(PAYMENT);
    let source = FakeSource::new();
    source.push(update(&[(PAYMENT, &payment)], both));
    let node = DestinationNode::start(&source, peer).await;

    // SPIRE drops the old CA from the bundle.
    source.push(update(&[(PAYMENT, &payment)], vec![new.root_cert()]));
    node.wait_for("the entry to go with the CA that proved it", |e| e.is_none()).await;
    // Proving it again fails (the peer's chain has no anchor now): it stays gone.
    node.stays("the pair came back without its CA", Duration::from_secs(1), |e| e.is_none()).await;
    server.abort();
}

#[tokio::test]
async fn a_bundle_change_that_keeps_the_peers_ca_keeps_the_pair() {
    let m = Mesh::authenticated().await;
    let expiry = m.node.table.get(KEY);

    // A CA is added (SPIRE prepares its next one): nothing proven is taken away.
    m.source.push(update(&[(PAYMENT, &m.payment)], vec![m.ca.root_cert(), TestCa::new(TD).root_cert()]));
    m.node.stays("a CA added took the pair away", Duration::from_secs(1), |e| e == expiry).await;
    m.server.abort();
}

#[tokio::test]
async fn a_peer_that_now_presents_another_identity_loses_the_pair_at_once() {
    let m = Mesh::authenticated().await;

    // The source's agent now answers with another identity's valid SVID.
    let impostor = m.ca.svid("spiffe://cluster.local/ns/shop/sa/orders");
    let (impostor_addr, impostor_server) = crate::handshake::tests::raw_server(impostor.chain.clone(), impostor.key_der.clone()).await;
    m.node.want(impostor_addr);
    m.node.manager.rotated(PAYMENT.to_owned());
    m.node.wait_for("the entry to go after the wrong identity", |e| e.is_none()).await;
    let status = m.node.manager.status().await;
    assert!(status.iter().any(|s| s.last_error.as_deref().is_some_and(|e| e.contains("ns/shop/sa/orders"))), "{status:?}");
    impostor_server.abort();
    m.server.abort();
}

#[tokio::test]
async fn a_peer_that_cannot_be_reached_keeps_the_pair_until_its_expiry() {
    let m = Mesh::authenticated().await;
    let expiry = m.node.table.get(KEY);

    // The source's agent restarts: connections are refused for a while.
    m.server.abort();
    let _ = m.server.await;
    m.node.manager.rotated(PAYMENT.to_owned());
    m.node.stays("an unreachable peer took the pair away", Duration::from_secs(1), |e| e == expiry).await;
    let status = m.node.manager.status().await;
    assert!(status.iter().any(|s| s.failures >= 1), "no re-authentication was tried: {status:?}");
}

#[tokio::test]
async fn an_identity_no_longer_issued_loses_its_pairs_at_once() {
    let m = Mesh::authenticated().await;

    // SPIRE's entry for PAYMENT on this node is deleted: the next answer lacks it.
    m.source.push(update(&[], vec![m.ca.root_cert()]));
    m.node.wait_for("the withdrawn identity's pair to go", |e| e.is_none()).await;
    m.node.stays("the pair came back without its SVID", Duration::from_secs(1), |e| e.is_none()).await;
    m.server.abort();
}

#[tokio::test]
async fn a_short_no_identity_issued_blip_keeps_the_svids_and_the_pair() {
    let m = Mesh::authenticated().await;
    let expiry = m.node.table.get(KEY);

    // The SPIRE agent restarts and says "no identity issued" until it has synced again.
    m.source.issue_nothing();
    m.node.stays("a blip took the pair away", Duration::from_secs(2), |e| e == expiry).await;
    assert!(m.node.store.current(&SpiffeId::parse(PAYMENT).expect("id")).is_some(), "a blip withdrew our SVID");
    // Re-authentication keeps working meanwhile, with the SVID kept.
    m.node.manager.rotated(PAYMENT.to_owned());
    m.node.stays("the pair was lost during the blip", Duration::from_secs(1), |e| e.is_some()).await;
    m.source.push(update(&[(PAYMENT, &m.payment)], vec![m.ca.root_cert()]));
    m.node.stays("the pair was lost after the blip", Duration::from_millis(500), |e| e.is_some()).await;
    m.server.abort();
}
