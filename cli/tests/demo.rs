//! The main job end to end: `meshauthctl demo` builds the mesh in a box with real agents, the
//! real eBPF datapath and development issuers, and passes every one of its checks. Root only.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_demo_passes_every_check() {
    let ctl = PathBuf::from(env!("CARGO_BIN_EXE_meshauthctl"));
    // `cargo test --workspace` builds every binary of the workspace into the same directory.
    let agent = ctl.with_file_name("meshauth-agent");
    assert!(agent.exists(), "{} is missing: build it with `cargo build -p meshauth-agent`", agent.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(&ctl)
        .args(["demo", "--svid-ttl", "6", "--agent-bin"])
        .arg(&agent)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run meshauthctl demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed ({:?})\n{stdout}\n{stderr}", out.status.code());
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    for check in [
        "unauthenticated pair dropped under Strict",
        "observe shows the drop with both pods, the reason and the rule",
        "explain names the rule and the missing authentication",
        "explain shows the pair's proof and its expiry",
        "spoofed source dropped",
        "zero failed requests across rotation and restart",
    ] {
        assert!(stdout.contains(&format!("[PASS] {check}")), "{check} did not pass:\n{stdout}");
    }
}
