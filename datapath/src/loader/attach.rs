//! Guarding pod interfaces: the programs on both directions of a veth (tcx links, or clsact filters
//! on kernels without tcx), their removal, and moving every pinned link to new programs on an upgrade.

use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType};

use super::maps::{NodeId, remove_ignoring_missing};
use super::pins::direction_name;
use super::{Datapath, DatapathError, FROM_POD, PROGRAM_VERSION, TO_POD, io_err, map_err, prog_err};
use crate::abi::{self, IfaceValue};

/// clsact filters (the netlink fallback) sit at a fixed priority and handle, so a restarted
/// loader can find and replace them without any state of its own.
const NETLINK_PRIORITY: u16 = 1;
const NETLINK_HANDLE: TcHandle = TcHandle::new(0x4d41, 1);

impl Datapath {
    /// Guards `ifname`, the host side of the veth of the pod whose address is `pod_ip`:
    /// `from_pod` on ingress (what the pod sends), `to_pod` on egress (what it receives).
    /// Idempotent; a restarted agent calls it again for every pod and nothing is re-attached.
    pub fn attach(&mut self, ifname: &str, pod_ip: Ipv4Addr) -> Result<(), DatapathError> {
        let ifindex = if_index(ifname)?;
        // The pod's address is registered before from_pod runs, which drops (as spoofed)
        // anything from an interface it does not know.
        let mode = if self.tcx { abi::ATTACH_TCX } else { abi::ATTACH_NETLINK };
        let value = IfaceValue { pod_ip: abi::ip_key(pod_ip), attach_mode: mode, pad: [0; 3] };
        self.maps.interfaces.insert(ifindex, value, 0).map_err(map_err("interfaces"))?;
        if let Ok(mut ep) = self.maps.endpoints.get(&abi::ip_key(pod_ip), 0) {
            ep.ifindex = ifindex;
            self.maps.endpoints.insert(abi::ip_key(pod_ip), ep, 0).map_err(map_err("endpoints"))?;
        }
        // Its pods' proofs are this node's from now on, not only from the next apply: a pod
        // whose veth comes after the tables would otherwise be checked against a proof of its
        // node's address, which no handshake writes.
        self.maps.endpoint_nodes.insert(abi::ip_key(pod_ip), NodeId::This.key(), 0).map_err(map_err("endpoint_nodes"))?;
        if self.tcx {
            self.attach_tcx(ifname, ifindex, TcAttachType::Ingress)?;
            self.attach_tcx(ifname, ifindex, TcAttachType::Egress)?;
        } else {
            self.attach_netlink(ifname, TcAttachType::Ingress, false)?;
            self.attach_netlink(ifname, TcAttachType::Egress, false)?;
        }
        tracing::debug!(ifname, ifindex, %pod_ip, "attached");
        Ok(())
    }

    fn program(&mut self, t: TcAttachType) -> (&'static str, &mut SchedClassifier) {
        match t {
            TcAttachType::Ingress => (FROM_POD, &mut self.from_pod),
            _ => (TO_POD, &mut self.to_pod),
        }
    }

    fn attach_tcx(&mut self, ifname: &str, ifindex: u32, t: TcAttachType) -> Result<(), DatapathError> {
        let path = self.link_path(ifindex, direction_name(t));
        let (name, prog) = self.program(t);
        let prog_id = prog.info().map_err(prog_err(name))?.id();
        if path.exists() {
            // A pin whose program is not on the interface any more (the interface was
            // recreated with the same index) is stale: replace it.
            let (_, attached) = SchedClassifier::query_tcx(ifname, t).map_err(prog_err(name))?;
            if attached.iter().any(|p| p.id() == prog_id) {
                return Ok(());
            }
            std::fs::remove_file(&path).map_err(io_err(format!("removing stale {}", path.display())))?;
        }
        // First: meshauth decides before other tcx programs, and passes with TCX_NEXT so
        // they still run.
        let id = prog.attach_with_options(ifname, t, TcAttachOptions::TcxOrder(LinkOrder::first())).map_err(prog_err(name))?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        let fd_link = FdLink::try_from(link).map_err(|source| DatapathError::Link { path: path.clone(), source })?;
        // Dropping the returned PinnedLink closes our descriptor; the pin keeps it attached.
        fd_link.pin(&path).map_err(|source| DatapathError::Pin { path: path.clone(), source })?;
        Ok(())
    }

    fn attach_netlink(&mut self, ifname: &str, t: TcAttachType, replace: bool) -> Result<(), DatapathError> {
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            // "Exists" is the normal case after the first attach.
            tracing::trace!(ifname, error = %e, "clsact qdisc not added");
        }
        let (name, prog) = self.program(t);
        let id = if replace {
            let old = SchedClassifierLink::attached(ifname, t, NETLINK_PRIORITY, NETLINK_HANDLE, None)
                .map_err(|source| DatapathError::Interface { name: ifname.into(), source })?;
            prog.attach_to_link(old).map_err(prog_err(name))?
        } else {
            match prog.attach_with_options(
                ifname,
                t,
                TcAttachOptions::Netlink(NlOptions { priority: NETLINK_PRIORITY, handle: NETLINK_HANDLE, classid: None }),
            ) {
                Ok(id) => id,
                // Already attached by us (an adopted loader): replace keeps it current.
                Err(_) => return self.attach_netlink(ifname, t, true),
            }
        };
        let link = prog.take_link(id).map_err(prog_err(name))?;
        // A clsact filter lives in the kernel on its own; dropping aya's handle would delete
        // it. Forgetting the handle (a few bytes) is what leaves it attached across restarts.
        std::mem::forget(link);
        Ok(())
    }

    /// Stops guarding `ifname`: detaches both programs. The pod's address stays registered
    /// (packets inside the programs at this instant must still find it, or they would be
    /// dropped as spoofed); the entry goes when the interface does.
    pub fn detach(&mut self, ifname: &str) -> Result<(), DatapathError> {
        let ifindex = if_index(ifname)?;
        self.detach_links(ifindex, Some(ifname))?;
        if let Ok(mut v) = self.maps.interfaces.get(&ifindex, 0) {
            v.attach_mode = abi::ATTACH_NONE;
            self.maps.interfaces.insert(ifindex, v, 0).map_err(map_err("interfaces"))?;
        }
        Ok(())
    }

    pub(super) fn detach_links(&mut self, ifindex: u32, ifname: Option<&str>) -> Result<(), DatapathError> {
        let iface = self.maps.interfaces.get(&ifindex, 0).ok();
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let path = self.link_path(ifindex, direction_name(t));
            if path.exists() {
                // The pin was the link's last reference: removing it detaches.
                std::fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
            }
            if let (Some(v), Some(name)) = (iface, ifname)
                && v.attach_mode == abi::ATTACH_NETLINK
                && let Ok(link) = SchedClassifierLink::attached(name, t, NETLINK_PRIORITY, NETLINK_HANDLE, None)
            {
                // Dropping aya's handle of a clsact filter deletes the filter.
                drop(link);
            }
        }
        Ok(())
    }

    /// Stops guarding the interface `ifindex` for good (its pod is gone): detaches both
    /// programs, removes their pins and its `interfaces` entry. Idempotent.
    pub fn release_interface(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        self.detach_links(ifindex, None)?;
        remove_ignoring_missing(self.maps.interfaces.remove(&ifindex), "interfaces")
    }

    /// Points every pinned link (and clsact filter) at this loader's programs.
    pub(super) fn repoint_links(&mut self) -> Result<(), DatapathError> {
        let dir = self.config.pin_dir.join("links");
        let entries = std::fs::read_dir(&dir).map_err(io_err(format!("reading {}", dir.display())))?;
        for entry in entries {
            let path = entry.map_err(io_err(format!("reading {}", dir.display())))?.path();
            let t = match path.file_name().and_then(|n| n.to_str()) {
                Some(n) if n.ends_with("-ingress") => TcAttachType::Ingress,
                Some(n) if n.ends_with("-egress") => TcAttachType::Egress,
                _ => continue,
            };
            let link_err = |source| DatapathError::Link { path: path.clone(), source };
            let pinned = PinnedLink::from_pin(&path).map_err(link_err)?;
            let fd_link = FdLink::from(pinned);
            let (name, prog) = self.program(t);
            let want = prog.info().map_err(prog_err(name))?.id();
            if fd_link.info().map_err(link_err)?.program_id() == want {
                continue;
            }
            let link = SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
            // BPF_LINK_UPDATE: the kernel swaps the program in one step under traffic.
            let id = prog.attach_to_link(link).map_err(prog_err(name))?;
            drop(prog.take_link(id).map_err(prog_err(name))?);
            tracing::info!(link = %path.display(), "link moved to program version {PROGRAM_VERSION}");
        }
        self.repoint_uplinks()?;
        for iface in self.maps.interfaces()? {
            if iface.attach == "clsact"
                && let Some(name) = iface.name
            {
                self.attach_netlink(&name, TcAttachType::Ingress, true)?;
                self.attach_netlink(&name, TcAttachType::Egress, true)?;
            }
        }
        Ok(())
    }

    /// Drops pins and entries of interfaces that no longer exist (pods deleted while no agent
    /// ran).
    pub(super) fn forget_vanished_interfaces(&mut self) -> Result<(), DatapathError> {
        for iface in self.maps.interfaces()? {
            if iface.name.is_none() {
                tracing::info!(ifindex = iface.ifindex, "interface gone, forgetting it");
                self.release_interface(iface.ifindex)?;
            }
        }
        Ok(())
    }
}

pub(super) fn kernel_has_tcx() -> bool {
    // tcx arrived in 6.6; probing the version is what aya's own `attach` does.
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}

/// The index of an interface in the current network namespace.
pub fn if_index(name: &str) -> Result<u32, DatapathError> {
    let c = CString::new(name).map_err(|_| DatapathError::Interface {
        name: name.into(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "name contains NUL"),
    })?;
    // SAFETY: `c` is a valid C string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(DatapathError::Interface { name: name.into(), source: io::Error::last_os_error() }),
        i => Ok(i),
    }
}

/// The name of an interface index in the current network namespace, if it exists.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname writes at most.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}
