//! Finds the host side of a pod's veth the way Cilium's generic-veth chaining does: in the pod's
//! network namespace, the pod interface's peer index and the namespace id of its peer, checked
//! against this agent's namespace and the host interface's own peer index. Never by route:
//! with a bridge CNI every pod address routes to the bridge. Also lists this node's own
//! addresses and reports interfaces as they vanish.
//!
//! Entering a namespace happens on a short-lived thread of its own (`setns` moves only the
//! calling thread), so no other task ever runs in a pod's namespace. This module only reads.

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Where network namespaces are pinned: `ip netns` and container runtimes (containerd's
/// `cni-*` namespaces).
pub const DEFAULT_NETNS_DIRS: &[&str] = &["/var/run/netns", "/run/netns"];

/// Why a pod's interface could not be found or trusted.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("cannot enter the pod's network namespace: {0}")]
    Enter(std::io::Error),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("the pod's network namespace has no interface {0:?}")]
    NoInterface(String),
    #[error("{ifname:?} in the pod's network namespace is a {kind}, not a veth")]
    NotVeth { ifname: String, kind: String },
    #[error("{ifname:?} in the pod's network namespace does not have the address {ip}")]
    NoAddress { ifname: String, ip: Ipv4Addr },
    #[error("the peer of {0:?} is not in this node's network namespace")]
    PeerElsewhere(String),
    #[error("host interface {ifindex} is not a veth whose peer is the pod's {ifname:?}")]
    NotPeer { ifindex: u32, ifname: String },
}

fn nl(e: impl std::fmt::Display) -> PodNetError {
    PodNetError::Netlink(e.to_string())
}

/// The host side of a pod's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVeth {
    pub ifindex: u32,
    pub name: String,
}

/// What netlink says about one interface.
#[derive(Debug, Clone, Default)]
struct Link {
    index: u32,
    name: String,
    kind: Option<String>,
    /// `IFLA_LINK`: the peer's index (in the peer's namespace) for a veth.
    peer_index: Option<u32>,
    /// `IFLA_LINK_NETNSID`: the peer's namespace, as this namespace numbers it.
    peer_netnsid: Option<i32>,
}

impl Link {
    fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

/// One namespace as netlink shows it.
#[derive(Debug, Default)]
struct NamespaceView {
    links: Vec<Link>,
    addresses: Vec<(u32, Ipv4Addr)>,
    /// The id this namespace gives the agent's namespace (-1 or absent: none).
    agent_nsid: Option<i32>,
}

fn socket() -> Result<Socket, PodNetError> {
    let mut s = Socket::new(NETLINK_ROUTE).map_err(nl)?;
    s.bind_auto().map_err(nl)?;
    s.connect(&SocketAddr::new(0, 0)).map_err(nl)?;
    Ok(s)
}

/// Sends one request and collects every answer until the dump (or the single reply) ends.
fn request(sock: &Socket, message: RouteNetlinkMessage, dump: bool) -> Result<Vec<RouteNetlinkMessage>, PodNetError> {
    let mut packet = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(message));
    packet.header.flags = if dump { NLM_F_DUMP | NLM_F_REQUEST } else { NLM_F_REQUEST };
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    sock.send(&buf[..], 0).map_err(nl)?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let size = sock.recv(&mut &mut rx[..], 0).map_err(nl)?;
        let mut offset = 0;
        while offset < size {
            let msg: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&rx[offset..size]).map_err(nl)?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return Err(PodNetError::Netlink(format!("kernel refused the request: {:?}", e.code)));
                }
                NetlinkPayload::InnerMessage(m) => {
                    out.push(m);
                    if !dump {
                        return Ok(out);
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

fn links(sock: &Socket) -> Result<Vec<Link>, PodNetError> {
    let answers = request(sock, RouteNetlinkMessage::GetLink(LinkMessage::default()), true)?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(l) => Some(link_of(&l)),
            _ => None,
        })
        .collect())
}

fn link_of(l: &LinkMessage) -> Link {
    let mut link = Link { index: l.header.index, ..Link::default() };
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Link(i) => link.peer_index = Some(*i),
            LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(*id),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(match kind {
                            InfoKind::Veth => "veth".to_owned(),
                            other => format!("{other:?}").to_lowercase(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn addresses(sock: &Socket) -> Result<Vec<(u32, Ipv4Addr)>, PodNetError> {
    let answers = request(sock, RouteNetlinkMessage::GetAddress(AddressMessage::default()), true)?;
    let mut out = Vec::new();
    for m in answers {
        if let RouteNetlinkMessage::NewAddress(a) = m {
            for attr in &a.attributes {
                if let AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                    out.push((a.header.index, *ip));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The id the current namespace gives the namespace `fd` refers to.
fn nsid_of(sock: &Socket, fd: BorrowedFd<'_>) -> Result<Option<i32>, PodNetError> {
    let Ok(raw) = u32::try_from(fd.as_raw_fd()) else { return Ok(None) };
    let mut msg = NsidMessage::default();
    msg.attributes.push(NsidAttribute::Fd(raw));
    let answers = request(sock, RouteNetlinkMessage::GetNsId(msg), false)?;
    Ok(answers.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewNsId(n) => n.attributes.iter().find_map(|a| match a {
            NsidAttribute::Id(id) if *id >= 0 => Some(*id),
            _ => None,
        }),
        _ => None,
    }))
}

/// Reads a namespace from inside it, on a thread of its own.
fn view_of(netns: BorrowedFd<'_>) -> Result<NamespaceView, PodNetError> {
    let target: OwnedFd = netns.try_clone_to_owned().map_err(PodNetError::Enter)?;
    let agent_ns = File::open("/proc/thread-self/ns/net").map_err(PodNetError::Enter)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(target.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| PodNetError::Enter(e.into()))?;
                let sock = socket()?;
                Ok(NamespaceView { links: links(&sock)?, addresses: addresses(&sock)?, agent_nsid: nsid_of(&sock, agent_ns.as_fd())? })
            })
            .join()
            .unwrap_or_else(|_| Err(PodNetError::Netlink("namespace reader thread panicked".into())))
    })
}

/// The host veth whose peer is `ifname` (holding `ip`) in the namespace `netns`.
pub fn find_pod_veth(netns: BorrowedFd<'_>, ifname: &str, ip: Ipv4Addr) -> Result<HostVeth, PodNetError> {
    let pod = view_of(netns)?;
    let host = links(&socket()?)?;
    match_pod_veth(&pod, &host, ifname, ip)
}

fn match_pod_veth(pod: &NamespaceView, host: &[Link], ifname: &str, ip: Ipv4Addr) -> Result<HostVeth, PodNetError> {
    let link = pod.links.iter().find(|l| l.name == ifname).ok_or_else(|| PodNetError::NoInterface(ifname.to_owned()))?;
    if !link.is_veth() {
        return Err(PodNetError::NotVeth { ifname: ifname.to_owned(), kind: link.kind.clone().unwrap_or_else(|| "device".into()) });
    }
    if !pod.addresses.contains(&(link.index, ip)) {
        return Err(PodNetError::NoAddress { ifname: ifname.to_owned(), ip });
    }
    // Ifindexes repeat across namespaces; the namespace id is what says the peer is ours.
    if pod.agent_nsid.is_none() || link.peer_netnsid != pod.agent_nsid {
        return Err(PodNetError::PeerElsewhere(ifname.to_owned()));
    }
    let peer = link.peer_index.unwrap_or(0);
    let h = host.iter().find(|h| h.index == peer).ok_or(PodNetError::NotPeer { ifindex: peer, ifname: ifname.to_owned() })?;
    if !h.is_veth() || h.peer_index != Some(link.index) || h.peer_netnsid.is_none() {
        return Err(PodNetError::NotPeer { ifindex: peer, ifname: ifname.to_owned() });
    }
    Ok(HostVeth { ifindex: h.index, name: h.name.clone() })
}

/// Every (pod address, host veth) pair found in the network namespaces pinned under `dirs` or
/// held by a process: what the agent uses for pods that started before it. A pod controls its
/// own namespace, so the caller refuses an address found more than once.
pub fn scan(dirs: &[PathBuf]) -> Result<BTreeMap<Ipv4Addr, Vec<HostVeth>>, PodNetError> {
    let own = std::fs::metadata("/proc/thread-self/ns/net").map(|m| (m.dev(), m.ino())).ok();
    let host = links(&socket()?)?;
    let mut seen = HashSet::new();
    let mut found: BTreeMap<Ipv4Addr, Vec<HostVeth>> = BTreeMap::new();
    for path in namespace_files(dirs) {
        let Ok(file) = File::open(&path) else { continue };
        let Ok(meta) = file.metadata() else { continue };
        let id = (meta.dev(), meta.ino());
        if Some(id) == own || !seen.insert(id) {
            continue;
        }
        let Ok(view) = view_of(file.as_fd()) else { continue };
        for link in view.links.iter().filter(|l| l.is_veth()) {
            for (_, ip) in view.addresses.iter().filter(|(i, _)| *i == link.index) {
                if let Ok(veth) = match_pod_veth(&view, &host, &link.name, *ip) {
                    let list = found.entry(*ip).or_default();
                    if !list.contains(&veth) {
                        list.push(veth);
                    }
                }
            }
        }
    }
    Ok(found)
}

fn namespace_files(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            if p.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                out.push(p.path().join("ns/net"));
            }
        }
    }
    out
}

/// This node's own IPv4 addresses (every address in the agent's namespace): where the
/// kubelet's probes come from.
pub fn host_addresses() -> Result<BTreeSet<Ipv4Addr>, PodNetError> {
    Ok(addresses(&socket()?)?.into_iter().map(|(_, ip)| ip).filter(|ip| !ip.is_loopback()).collect())
}

/// The interfaces the connection tagger goes on when none are configured: those the kernel
/// sends by toward `destinations` (other nodes' addresses and pods), never a pod's veth
/// (`pods`) or loopback. The route lookup is a UDP `connect`, which sends nothing; the source
/// address it picks names the interface.
pub fn uplinks_toward(destinations: &BTreeSet<Ipv4Addr>, pods: &BTreeSet<u32>) -> Result<BTreeSet<u32>, PodNetError> {
    let by_address: BTreeMap<Ipv4Addr, u32> = addresses(&socket()?)?.into_iter().map(|(index, ip)| (ip, index)).collect();
    let mut out = BTreeSet::new();
    for dst in destinations {
        let Ok(probe) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else { continue };
        if probe.connect((*dst, 9)).is_err() {
            continue; // no route: nothing leaves toward it
        }
        let Ok(std::net::SocketAddr::V4(local)) = probe.local_addr() else { continue };
        if let Some(index) = by_address.get(local.ip()).filter(|i| !pods.contains(i))
            && meshauth_datapath::loader::if_name(*index).is_some_and(|n| n != "lo")
        {
            out.insert(*index);
        }
    }
    Ok(out)
}

/// Whether an interface with this index exists in the agent's namespace.
pub fn link_exists(ifindex: u32) -> bool {
    meshauth_datapath::loader::if_name(ifindex).is_some()
}

/// Reports the index of every interface deleted in the agent's namespace, from a netlink
/// subscription on a thread of its own, until the receiver is dropped.
pub fn watch_removed_links() -> Result<tokio::sync::mpsc::UnboundedReceiver<u32>, PodNetError> {
    const RTMGRP_LINK: u32 = 1;
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(nl)?;
    sock.bind(&SocketAddr::new(0, RTMGRP_LINK)).map_err(nl)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("meshauth-links".into())
        .spawn(move || {
            let mut rx_buf = vec![0u8; 64 * 1024];
            loop {
                let Ok(size) = sock.recv(&mut &mut rx_buf[..], 0) else {
                    // ENOBUFS: events were lost; the periodic check still finds vanished links.
                    // A pause keeps a socket that keeps failing from spinning a core.
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                };
                let mut offset = 0;
                while offset < size {
                    let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx_buf[offset..size]) else { break };
                    let len = msg.header.length as usize;
                    if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) = msg.payload
                        && tx.send(l.header.index).is_err()
                    {
                        return;
                    }
                    if len == 0 {
                        break;
                    }
                    offset += len;
                }
            }
        })
        .map_err(|e| PodNetError::Netlink(format!("cannot start the link watcher: {e}")))?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(index: u32, name: &str, peer: u32, nsid: i32) -> Link {
        Link { index, name: name.into(), kind: Some("veth".into()), peer_index: Some(peer), peer_netnsid: Some(nsid) }
    }

    fn pod_view() -> NamespaceView {
        NamespaceView {
            links: vec![Link { index: 1, name: "lo".into(), ..Link::default() }, veth(2, "eth0", 15, 0)],
            addresses: vec![(2, Ipv4Addr::new(10, 244, 1, 5))],
            agent_nsid: Some(0),
        }
    }

    #[test]
    fn the_host_peer_is_found_by_index_and_namespace_id() {
        let host = vec![veth(15, "veth1234", 2, 3), veth(16, "veth5678", 2, 4)];
        let found = match_pod_veth(&pod_view(), &host, "eth0", Ipv4Addr::new(10, 244, 1, 5)).expect("found");
        assert_eq!(found, HostVeth { ifindex: 15, name: "veth1234".into() });
    }

    #[test]
    fn a_peer_in_another_namespace_with_the_same_index_is_refused() {
        // Another node's namespace has a veth with index 15 too; the pod's peer is there.
        let mut pod = pod_view();
        pod.agent_nsid = Some(7);
        let host = vec![veth(15, "veth1234", 2, 3)];
        assert!(matches!(match_pod_veth(&pod, &host, "eth0", Ipv4Addr::new(10, 244, 1, 5)), Err(PodNetError::PeerElsewhere(_))));
        pod.agent_nsid = None;
        assert!(matches!(match_pod_veth(&pod, &host, "eth0", Ipv4Addr::new(10, 244, 1, 5)), Err(PodNetError::PeerElsewhere(_))));
    }

    #[test]
    fn non_veths_wrong_addresses_and_unpaired_hosts_are_refused() {
        let host = vec![veth(15, "veth1234", 9, 3)];
        let ip = Ipv4Addr::new(10, 244, 1, 5);
        assert!(matches!(match_pod_veth(&pod_view(), &host, "eth0", ip), Err(PodNetError::NotPeer { .. })), "host peer points elsewhere");
        assert!(matches!(match_pod_veth(&pod_view(), &host, "eth1", ip), Err(PodNetError::NoInterface(_))));
        assert!(matches!(match_pod_veth(&pod_view(), &host, "eth0", Ipv4Addr::new(10, 244, 1, 6)), Err(PodNetError::NoAddress { .. })));
        let mut pod = pod_view();
        pod.links[1].kind = Some("macvlan".into());
        assert!(matches!(match_pod_veth(&pod, &host, "eth0", ip), Err(PodNetError::NotVeth { .. })));
    }
}
