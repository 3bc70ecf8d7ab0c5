//! Where the datapath lives: the bpffs its pins need (mounted when a fresh machine has none), and
//! the names of the pinned links.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::TcAttachType;

use super::{Datapath, DatapathError};
use crate::config::BPFFS_ROOT;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

impl Datapath {
    pub(super) fn link_path(&self, ifindex: u32, direction: &str) -> PathBuf {
        self.config.pin_dir.join("links").join(format!("{ifindex}-{direction}"))
    }
}

pub(super) fn direction_name(t: TcAttachType) -> &'static str {
    match t {
        TcAttachType::Ingress => "ingress",
        _ => "egress",
    }
}

fn statfs_type(path: &Path) -> Option<i64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf when nothing is mounted
/// there (a fresh machine).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), DatapathError> {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && statfs_type(root) != Some(BPF_FS_MAGIC) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: all pointers are valid C strings; no data argument.
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(DatapathError::Bpffs { path: pin_dir.into(), source: io::Error::last_os_error() });
        }
        tracing::info!("mounted bpffs on {BPFFS_ROOT}");
    }
    // The pin dir may not exist yet: check its closest existing ancestor.
    let mut probe = pin_dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if statfs_type(probe) != Some(BPF_FS_MAGIC) {
        return Err(DatapathError::Bpffs {
            path: pin_dir.into(),
            source: io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not on a bpffs", probe.display())),
        });
    }
    Ok(())
}
