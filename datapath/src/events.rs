//! The datapath's events: what it dropped (and, under Permissive or an audited MeshPolicy,
//! what it would have dropped; and, when asked, a sample of new flows that passed),
//! read from the pinned ring buffer through tokio's `AsyncFd`.
//!
//! Only one reader may consume a ring buffer (the consumer position is shared), so the agent
//! owns the [`EventStream`]; tools read counters instead.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{Map, MapData, MapError, RingBuf};
use meshauth_policy::tables::AuthRequirement;
use serde::Serialize;
use tokio::io::unix::AsyncFd;

use crate::abi::{self, Counter, RawEvent};
use crate::clock::BootTime;

/// Why an event was written (`MA_EV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum EventKind {
    /// No policy entry allows the packet.
    Denied = 1,
    /// The pair is not authenticated: dropped, or passed under Permissive (see
    /// [`Event::dropped`]). The agent should authenticate the pair.
    AuthRequired = 2,
    /// A pod sent with a source address not its own.
    Spoofed = 3,
    /// A later fragment whose first fragment did not pass.
    Fragment = 4,
    /// IPv6 dropped.
    Ipv6 = 5,
    /// Malformed or unsupported link-layer protocol.
    Unsupported = 6,
    /// A SYN of an authenticated pair did not prove its source (no tag, a wrong tag, or a
    /// local source's SYN its veth never sent): the source identity is the one it claimed.
    Tag = 7,
    /// Passed, but an audited MeshPolicy would have dropped it: no audited rule admits it
    /// (`auth` none), or the pair lacks the authentication such a rule requires (`auth`
    /// required; the agent should authenticate the pair).
    Audit = 8,
    /// A sampled new flow that passed (`counter` says how): what `MESHAUTH_BPF_PASS_SAMPLE_EVERY`
    /// asks for, within the same event budget as drops.
    Pass = 9,
}

impl EventKind {
    /// Every kind.
    pub const ALL: &'static [EventKind] = &[
        EventKind::Denied,
        EventKind::AuthRequired,
        EventKind::Spoofed,
        EventKind::Fragment,
        EventKind::Ipv6,
        EventKind::Unsupported,
        EventKind::Tag,
        EventKind::Audit,
        EventKind::Pass,
    ];

    fn from_number(n: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| *k as u8 == n)
    }

    /// The C constant's name.
    pub fn c_name(self) -> &'static str {
        match self {
            EventKind::Denied => "MA_EV_DENIED",
            EventKind::AuthRequired => "MA_EV_AUTH_REQUIRED",
            EventKind::Spoofed => "MA_EV_SPOOFED",
            EventKind::Fragment => "MA_EV_FRAGMENT",
            EventKind::Ipv6 => "MA_EV_IPV6",
            EventKind::Unsupported => "MA_EV_UNSUPPORTED",
            EventKind::Tag => "MA_EV_TAG",
            EventKind::Audit => "MA_EV_AUDIT",
            EventKind::Pass => "MA_EV_PASS",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub kind: EventKind,
    /// The counter the packet was counted under.
    pub counter: Counter,
    /// Whether the packet was dropped (an AuthRequired event under Permissive was not).
    pub dropped: bool,
    /// When the program wrote it (its clock may be up to one scheduler tick old).
    pub timestamp: BootTime,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Host order; the echo id for ICMP echo, 0 when the packet has no ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// IP protocol number (the next header for IPv6).
    pub protocol: u8,
    /// The interface the program ran on.
    pub ifindex: u32,
    /// Security identities; 0 when the program did not look them up (conntrack path, drops
    /// before the lookup).
    pub src_identity: u32,
    pub dst_identity: u32,
    /// SPIFFE-ID numbers: the pair to authenticate for AuthRequired.
    pub src_spiffe_id: u32,
    pub dst_spiffe_id: u32,
    /// The requirement that applied.
    pub auth: AuthRequirement,
}

/// Reading events failed.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("cannot open the pinned events ring buffer {path}: {source}")]
    Open { path: String, source: MapError },
    #[error("cannot register the ring buffer with tokio: {0}")]
    Register(io::Error),
    #[error("waiting for the ring buffer: {0}")]
    Wait(io::Error),
    #[error("event record of {0} bytes, expected {expected}", expected = std::mem::size_of::<RawEvent>())]
    Size(usize),
    #[error("event of unknown kind {kind} or counter {counter}: is the loader older than the pinned program?")]
    Unknown { kind: u8, counter: u8 },
}

impl Event {
    /// Decodes one ring-buffer record.
    pub fn parse(bytes: &[u8]) -> Result<Event, EventError> {
        if bytes.len() != std::mem::size_of::<RawEvent>() {
            return Err(EventError::Size(bytes.len()));
        }
        // SAFETY: the length is checked, RawEvent is plain integers (any bit pattern is
        // valid), and read_unaligned copes with the record's alignment.
        let raw: RawEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let unknown = || EventError::Unknown { kind: raw.kind, counter: raw.counter };
        let kind = EventKind::from_number(raw.kind).ok_or_else(unknown)?;
        let counter = Counter::from_slot(u32::from(raw.counter)).ok_or_else(unknown)?;
        Ok(Event {
            kind,
            counter,
            dropped: counter.is_drop(),
            timestamp: BootTime(raw.timestamp_ns),
            src: abi::key_ip(raw.saddr),
            dst: abi::key_ip(raw.daddr),
            src_port: u16::from_be(raw.sport),
            dst_port: u16::from_be(raw.dport),
            protocol: raw.protocol,
            ifindex: raw.ifindex,
            src_identity: raw.src_identity,
            dst_identity: raw.dst_identity,
            src_spiffe_id: raw.src_spiffe_id,
            dst_spiffe_id: raw.dst_spiffe_id,
            auth: abi::auth_requirement(raw.auth),
        })
    }
}

/// The ring buffer as an async stream of [`Event`]s.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    /// Opens the ring buffer pinned at `path`. Needs a tokio runtime with IO enabled.
    pub fn open(path: &Path) -> Result<Self, EventError> {
        let open_err = |source| EventError::Open { path: path.display().to_string(), source };
        let data = MapData::from_pin(path).map_err(open_err)?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(open_err)?;
        // SAFETY: RingBuf owns its map descriptor for its whole life and always returns that
        // same descriptor, which is what AsyncFd requires.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| EventError::Register(e.into_parts().1))?;
        Ok(EventStream { ring })
    }

    /// The next event, waiting for one.
    pub async fn next(&mut self) -> Result<Event, EventError> {
        loop {
            if let Some(event) = self.try_next() {
                return event;
            }
            let mut guard = self.ring.readable_mut().await.map_err(EventError::Wait)?;
            // Readiness is edge-triggered: clear it only after finding the buffer empty, then
            // look once more so a record written in between is not left waiting.
            guard.clear_ready();
            drop(guard);
        }
    }

    /// The next event already in the buffer, without waiting.
    pub fn try_next(&mut self) -> Option<Result<Event, EventError>> {
        let ring = self.ring.get_mut();
        let item = ring.next()?;
        Some(Event::parse(&item))
    }
}
