//! The new-connection paths that `BPF_PROG_TEST_RUN` cannot time, timed on real packets: the
//! uplink's tagger writing a SYN's tag, the destination verifying it, and a SYN from a pod of
//! the same node proved by its veth. Two node namespaces joined by an underlay veth, the
//! datapath loaded in each (private pins), and an empty TC program attached after meshauth's on
//! the same hook, so both run on the very same packets. The kernel's own BPF statistics (run
//! time and run count per program, `BPF_ENABLE_STATS`) give nanoseconds per packet for each.
//!
//! The server port has no listener: every SYN is answered by a RST, so each connection is one
//! SYN, a new flow with the full check, and nothing else passes the timed hooks but ARP.

use std::net::Ipv4Addr;
use std::time::Duration;

use aya::Ebpf;
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, ProgramInfo, SchedClassifier, TcAttachType};
use meshauth_policy::tables::{AuthRequirement, CompiledTables, EndpointEntry};
use serde::Serialize;

use super::{BenchError, EMPTY_OBJECT};
use crate::NodeId;
use crate::clock::BootTime;
use crate::config::DatapathConfig;
use crate::loader::{ConnectionKey, Datapath, Hook};
use crate::netns::{Node, PinDir, endpoint, link_nodes};

const PORT: u16 = 8079;
const A_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 93, 1);
const B_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 93, 2);
const A_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 91, 1);
const B_SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 92, 1);
const B_LOCAL_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 92, 2);
const KEY: ConnectionKey = ConnectionKey([0x0bad_cafe_0000_0001, 0x0000_0002_feed_f00d]);

/// One path on real packets: meshauth's program and the empty one on the same hook.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LivePathResult {
    pub path: &'static str,
    /// Where it runs: `tag_syn` on the source node's uplink, `to_pod` at the destination pod.
    pub program: &'static str,
    /// Packets both programs ran on.
    pub packets: u64,
    pub ns_per_packet: f64,
    /// The empty program on the same hook, same packets.
    pub baseline_ns_per_packet: f64,
}

fn tables(endpoints: Vec<EndpointEntry>) -> CompiledTables {
    let spiffe_ids = endpoints.iter().map(|e| (e.spiffe_id, format!("spiffe://bench.local/sa/{}", e.spiffe_id))).collect();
    CompiledTables { endpoints, policy: Vec::new(), spiffe_ids, security_identities: Vec::new() }
}

/// An empty program attached last on a hook of the current namespace: after meshauth's,
/// which passes with TCX_NEXT, so the empty one sees every packet meshauth passed.
fn attach_empty(ifname: &str, attach: TcAttachType) -> Result<Ebpf, BenchError> {
    let baseline = |e: &dyn std::fmt::Display| BenchError::Baseline(e.to_string());
    let mut ebpf = Ebpf::load(EMPTY_OBJECT).map_err(|e| baseline(&e))?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut("empty")
        .ok_or_else(|| BenchError::Baseline("no program named empty".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| baseline(&e))?;
    prog.load().map_err(|e| baseline(&e))?;
    prog.attach_with_options(ifname, attach, TcAttachOptions::TcxOrder(LinkOrder::last())).map_err(|e| baseline(&e))?;
    Ok(ebpf)
}

fn empty_info(ebpf: &Ebpf) -> Result<ProgramInfo, BenchError> {
    let prog: &SchedClassifier = ebpf
        .program("empty")
        .ok_or_else(|| BenchError::Baseline("no program named empty".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| BenchError::Baseline(e.to_string()))?;
    prog.info().map_err(|e| BenchError::Baseline(e.to_string()))
}

/// Run time and run count of a program so far.
fn stats(info: &ProgramInfo) -> (u128, u64) {
    (info.run_time().as_nanos(), info.run_count())
}

/// `connections` SYNs from `pod` to the server; each must be answered (refused), never
/// dropped: a drop would mean the path is not the one measured.
fn refused_connects(pod: &crate::netns::Pod, connections: u32, path: &'static str) -> Result<(), BenchError> {
    let addr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(B_SERVER, PORT));
    let answered = pod
        .ns
        .run(|| {
            (0..connections).all(|_| {
                matches!(
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                )
            })
        })
        .map_err(|e| BenchError::Baseline(format!("entering the client's namespace: {e}")))?;
    if answered {
        Ok(())
    } else {
        Err(BenchError::WrongPath {
            path,
            expected: "every SYN admitted (refused by the server's kernel)".into(),
            got: "dropped one".into(),
        })
    }
}

/// One hook: meshauth's program there and the empty one beside it.
struct Timed<'a> {
    path: &'static str,
    program: &'static str,
    meshauth: Box<dyn Fn() -> Result<ProgramInfo, BenchError> + 'a>,
    empty: &'a Ebpf,
}

impl Timed<'_> {
    fn measure(&self, run: impl FnOnce() -> Result<(), BenchError>) -> Result<LivePathResult, BenchError> {
        let (m0, e0) = (stats(&(self.meshauth)()?), stats(&empty_info(self.empty)?));
        run()?;
        let (m1, e1) = (stats(&(self.meshauth)()?), stats(&empty_info(self.empty)?));
        let per = |(t0, c0): (u128, u64), (t1, c1): (u128, u64)| (t1 - t0) as f64 / (c1 - c0).max(1) as f64;
        Ok(LivePathResult {
            path: self.path,
            program: self.program,
            packets: e1.1 - e0.1,
            ns_per_packet: per(m0, m1),
            baseline_ns_per_packet: per(e0, e1),
        })
    }
}

/// Times the three paths, `connections` SYNs each (root; creates and removes namespaces).
pub fn run(connections: u32) -> Result<Vec<LivePathResult>, BenchError> {
    let setup = |e: std::io::Error| BenchError::Baseline(format!("setting up the bench's nodes: {e}"));
    let tag = format!("mab{}", std::process::id() % 100_000);
    let node_a = Node::new_in(&format!("{tag}a"), 1, 91).map_err(setup)?;
    let node_b = Node::new_in(&format!("{tag}b"), 2, 92).map_err(setup)?;
    link_nodes(&node_a.ns, 91, &node_b.ns, 92, 93, "up0").map_err(setup)?;
    let (pins_a, pins_b) = (PinDir::new(&format!("bench-live-{tag}a")), PinDir::new(&format!("bench-live-{tag}b")));

    let load = |node: &Node, pins: &PinDir, t: &CompiledTables| -> Result<Datapath, BenchError> {
        let _inside = node.ns.enter().map_err(setup)?;
        let mut dp = Datapath::load_or_adopt(DatapathConfig::with_pin_dir(&pins.0))?;
        for pod in &node.pods {
            dp.attach(&pod.host_if, pod.ip)?;
        }
        dp.attach_uplink("up0")?;
        dp.apply_tables(t)?;
        Ok(dp)
    };
    // A's numbers: the client 11, the server 12. B's: A's client 1, the server 2, B's own client 3.
    let mut a = load(
        &node_a,
        &pins_a,
        &tables(vec![
            endpoint(A_CLIENT, 301, 11, AuthRequirement::None, None),
            endpoint(B_SERVER, 302, 12, AuthRequirement::Required, Some(B_NODE)),
        ]),
    )?;
    let mut b = load(
        &node_b,
        &pins_b,
        &tables(vec![
            endpoint(A_CLIENT, 301, 1, AuthRequirement::None, Some(A_NODE)),
            endpoint(B_SERVER, 302, 2, AuthRequirement::Required, None),
            endpoint(B_LOCAL_CLIENT, 303, 3, AuthRequirement::None, None),
        ]),
    )?;
    let expiry = BootTime::after(Duration::from_secs(3600));
    a.set_tag_key(11, 12, NodeId::At(B_NODE), expiry, KEY)?;
    b.set_auth_keyed(2, 1, NodeId::At(A_NODE), expiry, KEY)?;
    b.set_auth(2, 3, NodeId::This, expiry)?;

    let empty_uplink = {
        let _inside = node_a.ns.enter().map_err(setup)?;
        attach_empty("up0", TcAttachType::Egress)?
    };
    let empty_server = {
        let _inside = node_b.ns.enter().map_err(setup)?;
        attach_empty(&node_b.pods[0].host_if, TcAttachType::Egress)?
    };
    // The kernel keeps run times only while a holder of this descriptor lives.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| BenchError::Baseline(format!("enabling the kernel's BPF statistics: {e}")))?;

    // Warm up: neighbours resolved, the paths checked once.
    refused_connects(&node_a.pods[0], 3, "syn-tag-verified")?;
    refused_connects(&node_b.pods[1], 3, "syn-local-proof")?;
    let (written, verified) = (a.counters()?.packets(crate::Counter::TagWritten), b.counters()?.packets(crate::Counter::PassAuthenticated));
    if written < 3 || verified < 6 {
        return Err(BenchError::WrongPath {
            path: "tag-written",
            expected: "tags written at A and the SYNs authenticated at B".into(),
            got: format!("{written} written, {verified} authenticated"),
        });
    }

    let tagger =
        Timed { path: "tag-written", program: "tag_syn", meshauth: Box::new(|| Ok(a.program_info(Hook::TagSyn)?)), empty: &empty_uplink };
    let verifier = Timed {
        path: "syn-tag-verified",
        program: "to_pod",
        meshauth: Box::new(|| Ok(b.program_info(Hook::ToPod)?)),
        empty: &empty_server,
    };
    let local =
        Timed { path: "syn-local-proof", program: "to_pod", meshauth: Box::new(|| Ok(b.program_info(Hook::ToPod)?)), empty: &empty_server };
    // Both hooks of the cross-node SYN are read around the same packets.
    let mut cross_verified = None;
    let cross_written = tagger.measure(|| {
        cross_verified = Some(verifier.measure(|| refused_connects(&node_a.pods[0], connections, "syn-tag-verified")));
        Ok(())
    })?;
    let cross_verified = cross_verified.unwrap_or_else(|| Err(BenchError::Baseline("the cross-node run did not run".into())))?;
    let local_proof = local.measure(|| refused_connects(&node_b.pods[1], connections, "syn-local-proof"))?;
    drop((tagger, verifier, local));
    a.uninstall()?;
    b.uninstall()?;
    Ok(vec![cross_written, cross_verified, local_proof])
}
