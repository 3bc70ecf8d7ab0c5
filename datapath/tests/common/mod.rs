//! A node with three pods, the datapath loaded in the test's own pin directory and attached to
//! every pod, and table builders. Pod `i` (1-based) has security identity `255 + i` and
//! SPIFFE-ID number `i`.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::time::Duration;

use meshauth_datapath::testing::{Netns, NetnsGuard, Node, PinDir, require_root};
use meshauth_datapath::{Counter, Counters, Datapath, DatapathConfig, Event, EventKind, EventStream};
use meshauth_policy::tables::{AuthRequirement, CompiledTables, EndpointEntry, PolicyEntry, TableProtocol};

pub const SHORT: Duration = Duration::from_millis(700);
pub const LONG: Duration = Duration::from_secs(3);

pub struct Fixture {
    // Field order is drop order: detach and unpin, leave the node, then delete namespaces.
    pub dp: Option<Datapath>,
    pub pins: PinDir,
    _guard: NetnsGuard,
    pub node: Node,
}

impl Fixture {
    /// `prefix`: a short name unique to the test (namespaces and pins are named after it).
    pub fn new(prefix: &str) -> Self {
        Self::with_config(prefix, |_| {})
    }

    /// [`Fixture::new`] with a changed configuration.
    pub fn with_config(prefix: &str, change: impl FnOnce(&mut DatapathConfig)) -> Self {
        require_root();
        let node = Node::new(&format!("ma-{prefix}"), 3).expect("creating namespaces");
        // The test thread lives in the node namespace: the loader attaches by interface name.
        let guard = node.ns.enter().expect("entering the node namespace");
        let pins = PinDir::new(prefix);
        let mut config = DatapathConfig::with_pin_dir(&pins.0);
        change(&mut config);
        let mut dp = Datapath::load_or_adopt(config).expect("loading the datapath");
        for pod in &node.pods {
            dp.attach(&pod.host_if, pod.ip).expect("attaching");
        }
        Fixture { dp: Some(dp), pins, _guard: guard, node }
    }

    pub fn dp(&mut self) -> &mut Datapath {
        self.dp.as_mut().expect("datapath loaded")
    }

    pub fn pod(&self, i: usize) -> &meshauth_datapath::testing::Pod {
        &self.node.pods[i - 1]
    }

    pub fn ip(&self, i: usize) -> Ipv4Addr {
        self.pod(i).ip
    }

    pub fn ns(&self, i: usize) -> &Netns {
        &self.pod(i).ns
    }

    pub fn counters(&self) -> Counters {
        self.dp.as_ref().expect("datapath").counters().expect("counters")
    }

    /// Whether `counter` rises above `before` within `LONG`. A refused client gives up after its
    /// own timeout, but its packet is counted only when it reaches the program, which on a
    /// loaded machine (CI's two cores, a test binary's tests in parallel) can come later.
    pub fn counted_above(&self, counter: Counter, before: u64) -> bool {
        let deadline = std::time::Instant::now() + LONG;
        loop {
            if self.counters().packets(counter) > before {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn events(&self) -> EventStream {
        self.dp.as_ref().expect("datapath").events().expect("event stream")
    }
}

/// Pod `i`'s endpoint entry.
pub fn endpoint(i: usize, isolated: bool, mutual_auth: AuthRequirement) -> EndpointEntry {
    EndpointEntry {
        ip: Ipv4Addr::new(10, 77, 0, i as u8),
        security_identity: identity(i),
        spiffe_id: i as u32,
        isolated,
        audit: false,
        mutual_auth,
        pod: format!("test/pod-{i}"),
        node: Some("node".into()),
        node_address: None,
    }
}

pub fn identity(i: usize) -> u32 {
    255 + i as u32
}

/// A rule: traffic from pod `src` to pod `dst` on `protocol`/`port`.
pub fn rule(dst: usize, src: usize, protocol: TableProtocol, port: u16, auth: AuthRequirement) -> PolicyEntry {
    PolicyEntry { dst_identity: identity(dst), src_identity: identity(src), protocol, port_start: port, port_end: port, auth }
}

pub fn tables(endpoints: Vec<EndpointEntry>, policy: Vec<PolicyEntry>) -> CompiledTables {
    let spiffe_ids = endpoints.iter().map(|e| (e.spiffe_id, format!("spiffe://cluster.local/ns/test/sa/pod-{}", e.spiffe_id))).collect();
    CompiledTables { endpoints, policy, spiffe_ids, security_identities: Vec::new() }
}

/// Every event already written.
pub fn drain_all(events: &mut EventStream) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = events.try_next() {
        out.push(e.expect("event parses"));
    }
    out
}

/// Every event already written, of the given kind.
pub fn drain(events: &mut EventStream, kind: EventKind) -> Vec<Event> {
    let mut out = Vec::new();
    while let Some(e) = events.try_next() {
        let e = e.expect("event parses");
        if e.kind == kind {
            out.push(e);
        }
    }
    out
}
