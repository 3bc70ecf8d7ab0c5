//! Loading, adopting, upgrading and attaching the TC programs, and writing their maps.
//!
//! Pin layout under [`DatapathConfig::pin_dir`]:
//! ```text
//! maps/<name>                       every map (state survives any number of loader restarts)
//! programs/<version>/{to_pod,from_pod,tag_syn}  the programs of one build (version: hash of the C sources)
//! links/<ifindex>-{ingress,egress}  tcx links of pod veths: attached while pinned, whoever holds them
//! links/<ifindex>-uplink            tcx links of the connection tagger on the node's uplinks
//! ```
//! A restarted loader whose version is pinned adopts it: nothing is loaded or detached, so
//! traffic never sees a gap. A loader with a new version loads its programs, then moves every
//! pinned link to them with `BPF_LINK_UPDATE` (clsact filters: a netlink replace), which swaps
//! the program atomically under running traffic, and removes the old programs.

use std::io;
use std::path::{Path, PathBuf};

use aya::EbpfLoader;
use aya::maps::MapError;
use aya::programs::links::LinkError;
use aya::programs::tc::TcError;
use aya::programs::{ProgramError, SchedClassifier};

use crate::abi;
use crate::config::{AttachMode, BPFFS_ROOT, ConfigError, DatapathConfig, Ipv6Mode};
use crate::events::{EventError, EventStream};

mod attach;
mod maps;
mod pins;
mod sync;
mod tags;
mod test_run;

pub use attach::{if_index, if_name};
pub use maps::{AuthEntry, Counters, Endpoint, Interface, Maps, NodeId};
pub use pins::ensure_bpffs;
pub use sync::ApplyStats;
pub use tags::{ConnectionKey, KEY_OVERLAP, KEY_SWITCH_DELAY};
pub use test_run::{Hook, TestRunOutcome};

pub(crate) use test_run::test_run;

// What the load below needs from the submodules, and the map helpers `tags` names as `super::…`.
use attach::kernel_has_tcx;
use maps::{MAPS, check_pinned_maps, is_not_found, keys_of, remove_ignoring_missing};

/// The program object compiled by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshauth.bpf.o"));
/// Names the pinned programs of this build: a hash of the C sources and the compiler.
pub const PROGRAM_VERSION: &str = env!("MESHAUTH_BPF_VERSION");

const TO_POD: &str = "to_pod";
const FROM_POD: &str = "from_pod";
const TAG_SYN: &str = "tag_syn";

/// What went wrong loading, attaching or writing the datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{path} is not on a bpffs and mounting one at {BPFFS_ROOT} failed: {source}")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("loading the BPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: ProgramError },
    #[error("map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error(
        "pinned map {name} is incompatible with this loader ({what}: pinned {pinned}, expected {expected}); \
             remove {path} to recreate it (its state is lost)"
    )]
    IncompatibleMap { name: &'static str, what: &'static str, pinned: String, expected: String, path: PathBuf },
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: aya::pin::PinError },
    #[error("interface {name}: {source}")]
    Interface { name: String, source: io::Error },
    #[error("interface {name}: {source}")]
    Tc { name: String, source: TcError },
    #[error("tcx is not available on this kernel and the attach mode is tcx")]
    NoTcx,
    #[error("uplink {name}: the connection tagger needs tcx links (Linux 6.6 or later, attach mode auto or tcx)")]
    UplinkNeedsTcx { name: String },
    #[error("SPIFFE ID number {number} is longer than {max} bytes", max = abi::SPIFFE_ID_MAX)]
    SpiffeIdTooLong { number: u32 },
    #[error(transparent)]
    Events(#[from] EventError),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> DatapathError {
    let context = context.into();
    move |source| DatapathError::Io { context, source }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

fn prog_err(name: &'static str) -> impl Fn(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { name, source }
}

/// The loaded datapath: its programs, pinned links and maps.
pub struct Datapath {
    config: DatapathConfig,
    to_pod: SchedClassifier,
    from_pod: SchedClassifier,
    tag_syn: SchedClassifier,
    maps: Maps,
    adopted: bool,
    tcx: bool,
}

impl Datapath {
    /// Adopts the pinned datapath of this version, or loads it (upgrading pinned links of an
    /// older version atomically). Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
    ///
    /// Call it from the network namespace that holds the pod interfaces: stale interfaces are
    /// recognised by their ifindex there.
    pub fn load_or_adopt(config: DatapathConfig) -> Result<Self, DatapathError> {
        Self::load(config, false)
    }

    /// Loads the programs afresh even when this version is pinned, and moves every link to
    /// them atomically: what an upgrade does, on demand.
    pub fn reload_programs(&mut self) -> Result<(), DatapathError> {
        let (Programs { to_pod, from_pod, tag_syn }, _) = install_programs(&self.config, true)?;
        self.to_pod = to_pod;
        self.from_pod = from_pod;
        self.tag_syn = tag_syn;
        self.adopted = false;
        self.forget_vanished_interfaces()?;
        self.repoint_links()
    }

    fn load(config: DatapathConfig, force: bool) -> Result<Self, DatapathError> {
        config.validate()?;
        ensure_bpffs(&config.pin_dir)?;
        for sub in ["maps", "programs", "links"] {
            let dir = config.pin_dir.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        }
        check_pinned_maps(&config)?;
        let (Programs { to_pod, from_pod, tag_syn }, adopted) = install_programs(&config, force)?;
        let maps = Maps::open(&config.pin_dir)?;
        let tcx = match config.attach_mode {
            AttachMode::Netlink => false,
            AttachMode::Tcx => true,
            AttachMode::Auto => kernel_has_tcx(),
        };
        let mut dp = Datapath { config, to_pod, from_pod, tag_syn, maps, adopted, tcx };
        dp.write_runtime_config()?;
        // Vanished interfaces first: a pin of a deleted veth cannot be repointed.
        dp.forget_vanished_interfaces()?;
        dp.repoint_links()?;
        tracing::info!(version = PROGRAM_VERSION, adopted, pin_dir = %dp.config.pin_dir.display(), "datapath ready");
        Ok(dp)
    }

    /// Whether the programs were adopted from pins (`false`: this loader loaded them).
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The configuration.
    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }

    fn write_runtime_config(&mut self) -> Result<(), DatapathError> {
        let mut v = self.maps.runtime_config()?;
        v.events_per_sec = self.config.events_per_sec_per_cpu;
        v.allow_host = u8::from(self.config.allow_host);
        v.pass_sample_every = self.config.pass_sample_every;
        let t = self.config.conntrack_timeouts;
        (v.ct_tcp_s, v.ct_udp_s, v.ct_icmp_s, v.ct_closing_s) = (t.tcp_s, t.udp_s, t.icmp_s, t.closing_s);
        v.ipv6_mode = match self.config.ipv6 {
            Ipv6Mode::Drop => abi::IPV6_DROP,
            Ipv6Mode::Pass => abi::IPV6_PASS,
        };
        self.maps.config.set(0, v, 0).map_err(map_err("config"))
    }

    /// The event stream (one reader per node: the agent). Needs a tokio runtime.
    pub fn events(&self) -> Result<EventStream, DatapathError> {
        Ok(EventStream::open(&self.config.pin_dir.join("maps").join("events"))?)
    }

    /// Detaches everything and removes every pin: the datapath is gone from the node.
    pub fn uninstall(mut self) -> Result<(), DatapathError> {
        for iface in self.maps.interfaces()? {
            self.detach_links(iface.ifindex, iface.name.as_deref())?;
        }
        let dir = self.config.pin_dir.clone();
        drop(self);
        std::fs::remove_dir_all(&dir).map_err(io_err(format!("removing {}", dir.display())))
    }
}

/// The programs of one build.
struct Programs {
    to_pod: SchedClassifier,
    from_pod: SchedClassifier,
    tag_syn: SchedClassifier,
}

/// Adopts or loads the programs of this version; returns them and whether they were adopted.
fn install_programs(config: &DatapathConfig, force: bool) -> Result<(Programs, bool), DatapathError> {
    let programs = config.pin_dir.join("programs");
    let current = programs.join(PROGRAM_VERSION);
    let open = |dir: &Path| -> Result<Programs, DatapathError> {
        Ok(Programs {
            to_pod: SchedClassifier::from_pin(dir.join(TO_POD)).map_err(prog_err(TO_POD))?,
            from_pod: SchedClassifier::from_pin(dir.join(FROM_POD)).map_err(prog_err(FROM_POD))?,
            tag_syn: SchedClassifier::from_pin(dir.join(TAG_SYN)).map_err(prog_err(TAG_SYN))?,
        })
    };
    if !force && [TO_POD, FROM_POD, TAG_SYN].iter().all(|p| current.join(p).exists()) {
        return Ok((open(&current)?, true));
    }

    let maps_dir = config.pin_dir.join("maps");
    let mut loader = EbpfLoader::new();
    // No kernel BTF: the programs use no CO-RE relocations, and aya would otherwise read and
    // parse all of /sys/kernel/btf/vmlinux (~8 MB of heap at start, the agent's memory peak).
    loader.btf(None);
    for spec in MAPS {
        // Pinned maps are reused as they are: the traffic's state (conntrack, auth pairs)
        // survives upgrades. New maps are created at the configured size.
        loader.map_pin_path(spec.name, maps_dir.join(spec.name));
        loader.map_max_entries(spec.name, (spec.entries)(config));
    }
    let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
    // bpffs refuses names with a dot in them.
    let staging = programs.join(format!("staging-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_err(format!("creating {}", staging.display())))?;
    for name in [TO_POD, FROM_POD, TAG_SYN] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(DatapathError::Program { name, source: ProgramError::NotLoaded })?
            .try_into()
            .map_err(prog_err(name))?;
        prog.load().map_err(prog_err(name))?;
        let path = staging.join(name);
        prog.pin(&path).map_err(|source| DatapathError::Pin { path, source })?;
    }
    drop(ebpf);
    // Older versions stay loaded as long as a link still points at them; the caller moves
    // the links, and then nothing holds them.
    let entries = std::fs::read_dir(&programs).map_err(io_err(format!("reading {}", programs.display())))?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p != staging {
            std::fs::remove_dir_all(&p).map_err(io_err(format!("removing {}", p.display())))?;
        }
    }
    std::fs::rename(&staging, &current).map_err(io_err(format!("renaming {} to {}", staging.display(), current.display())))?;
    Ok((open(&current)?, false))
}
