//! The main job end to end: `meshauthctl demo` builds the mesh in a box with real agents, the
//! real eBPF datapath and development issuers, and passes every one of its checks. Root only.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_demo_passes_every_check_and_keeps_its_mesh_until_demo_down() {
    let ctl = PathBuf::from(env!("CARGO_BIN_EXE_meshauthctl"));
    // `cargo test --workspace` builds every binary of the workspace into the same directory.
    let agent = ctl.with_file_name("meshauth-agent");
    assert!(agent.exists(), "{} is missing: build it with `cargo build -p meshauth-agent`", agent.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(&ctl)
        .args(["demo", "--keep", "--svid-ttl", "6", "--agent-bin"])
        .arg(&agent)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("run meshauthctl demo");
    // Whatever happens below, the kept mesh goes.
    let _down = Down(ctl.clone(), dir.path().to_path_buf());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed ({:?})\n{stdout}\n{stderr}", out.status.code());
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
    for check in [
        "unauthenticated pair dropped under Strict",
        "observe shows the drop with both pods, the reason and the rule",
        "explain names the rule and the missing authentication",
        "explain shows the pair's proof and its expiry",
        "audit passes and names what a policy would deny; Enforce drops it",
        "spoofed source dropped",
        "zero failed requests across rotation and restarts",
        "spoofed source from another node dropped",
        "reused pod IP with another identity dropped",
    ] {
        assert!(stdout.contains(&format!("[PASS] {check}")), "{check} did not pass:\n{stdout}");
    }

    // --keep: the mesh is still up, and the printed commands reach its agents.
    let observe = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ip netns exec") && l.contains("meshauthctl observe"))
        .unwrap_or_else(|| panic!("no observe command printed:\n{stdout}"));
    let words: Vec<&str> = observe.split_whitespace().filter(|w| *w != "--follow").collect();
    let (netns, args) = (words[3], &words[5..]);
    let seen = Command::new("ip").args(["netns", "exec", netns]).arg(&ctl).args(args).args(["--output", "json"]).output().expect("observe");
    assert!(seen.status.success(), "{}", String::from_utf8_lossy(&seen.stderr));
    let kept = std::fs::read_to_string(dir.path().join("kept.json")).expect("kept.json");
    let kept: serde_json::Value = serde_json::from_str(&kept).expect("kept JSON");
    let namespaces: Vec<String> =
        kept["namespaces"].as_array().expect("namespaces").iter().filter_map(|n| n.as_str().map(str::to_owned)).collect();
    assert!(namespaces.iter().all(|ns| std::path::Path::new("/run/netns").join(ns).exists()), "{namespaces:?}");

    // demo down: nothing of it is left.
    let down = Command::new(&ctl).args(["demo", "down", "--dir"]).arg(dir.path()).output().expect("demo down");
    assert!(down.status.success(), "{}", String::from_utf8_lossy(&down.stderr));
    assert!(namespaces.iter().all(|ns| !std::path::Path::new("/run/netns").join(ns).exists()), "namespaces left: {namespaces:?}");
    for pid in kept["processes"].as_array().expect("processes").iter().filter_map(|p| p["pid"].as_u64()) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(stat.is_empty() || stat.rsplit_once(')').is_some_and(|(_, s)| s.trim_start().starts_with('Z')), "process {pid} still runs");
    }
    for root in kept["pin_roots"].as_array().expect("pin roots").iter().filter_map(|r| r.as_str()) {
        assert!(!std::path::Path::new(root).exists(), "pins left in {root}");
    }
    let again = Command::new(&ctl).args(["demo", "down", "--dir"]).arg(dir.path()).output().expect("demo down again");
    assert_eq!(again.status.code(), Some(2), "a second down has nothing to take down");
}

/// Takes a kept demo down when the test ends, passed or not.
struct Down(PathBuf, PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(&self.0).args(["demo", "down", "--dir"]).arg(&self.1).output();
    }
}
