//! Compiles the TC programs in `bpf/` with clang (the machine's stable Rust cannot build Rust
//! eBPF), measures the C layout of the shared structs for the ABI test, and derives the program
//! version the loader pins programs under.
//!
//! Outputs in `OUT_DIR`: `meshauth.bpf.o`, `empty.bpf.o`, `c_layout.txt`; and the env variable
//! `MESHAUTH_BPF_VERSION` (a hash of the C sources and the compiler version).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};

const APT_HINT: &str = "install them with: apt-get install -y clang llvm libbpf-dev linux-libc-dev \
     (or run scripts/setup as root)";

fn fail(msg: &str) -> ! {
    // A panic would bury the message in a backtrace; this is what people should read.
    eprintln!("error: meshauth-datapath: {msg}");
    println!("cargo::error=meshauth-datapath: {msg}");
    exit(1);
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into()));
    let bpf_dir = manifest.join("bpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR is not set")));
    for file in ["meshauth.h", "meshauth.bpf.c", "empty.bpf.c", "layout.c"] {
        println!("cargo::rerun-if-changed=bpf/{file}");
    }
    println!("cargo::rerun-if-env-changed=MESHAUTH_CLANG");

    let clang = env::var("MESHAUTH_CLANG").unwrap_or_else(|_| "clang".into());
    let clang_version = match Command::new(&clang).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => fail(&format!("`{clang}` was not found or does not run: the TC programs are compiled with clang; {APT_HINT}")),
    };

    // The per-architecture include directory holds <asm/types.h>, which <linux/types.h> needs.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");
    for (header, package) in [("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"), ("/usr/include/linux/bpf.h", "linux-libc-dev")] {
        if !Path::new(header).exists() {
            fail(&format!("{header} is missing (package {package}); {APT_HINT}"));
        }
    }
    if !Path::new(&multiarch).join("asm/types.h").exists() {
        fail(&format!("{multiarch}/asm/types.h is missing (package linux-libc-dev); {APT_HINT}"));
    }

    for name in ["meshauth", "empty"] {
        let src = bpf_dir.join(format!("{name}.bpf.c"));
        let obj = out.join(format!("{name}.bpf.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{multiarch}"))
            .arg(format!("-I{}", bpf_dir.display()))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => fail(&format!("clang failed ({s}) compiling {}", src.display())),
            Err(e) => fail(&format!("cannot run {clang}: {e}; {APT_HINT}")),
        }
    }

    // The C side of the ABI test: a host program printing sizeof/offsetof of every shared
    // struct. Running it here means the test compares against the real compiler layout.
    let layout_exe = out.join("c_layout");
    let status =
        Command::new(&clang).arg(format!("-I{}", bpf_dir.display())).arg(bpf_dir.join("layout.c")).arg("-o").arg(&layout_exe).status();
    if !matches!(status, Ok(s) if s.success()) {
        fail("clang failed compiling bpf/layout.c for the host (is libc6-dev installed?)");
    }
    match Command::new(&layout_exe).output() {
        Ok(o) if o.status.success() => {
            if let Err(e) = fs::write(out.join("c_layout.txt"), &o.stdout) {
                fail(&format!("cannot write c_layout.txt: {e}"));
            }
        }
        _ => fail("bpf/layout.c did not run"),
    }

    // The version names the pinned programs: same sources and compiler, same version, so a
    // restarted loader adopts what is pinned; anything else is an upgrade and replaces it.
    let mut hash = Fnv::new();
    hash.write(clang_version.as_bytes());
    for file in ["meshauth.h", "meshauth.bpf.c"] {
        match fs::read(bpf_dir.join(file)) {
            Ok(bytes) => hash.write(&bytes),
            Err(e) => fail(&format!("cannot read bpf/{file}: {e}")),
        }
    }
    println!("cargo::rustc-env=MESHAUTH_BPF_VERSION={:016x}", hash.0);
}

/// FNV-1a 64: a stable content hash without a dependency.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
