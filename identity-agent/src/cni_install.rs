//! Chaining `meshauth-cni` into the node's existing CNI configuration, and taking it out again,
//! as Cilium's generic-veth chaining mode does: the plugin binary goes into the CNI binary
//! directory and one entry is appended, last, to the `plugins` of the conflist the runtime
//! uses (the first `.conflist` in name order). Both steps are idempotent and every write is
//! atomic (write beside, then rename), so the runtime never reads half a file. Nothing else in
//! the configuration is touched: uninstalling leaves it as it was.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// The plugin's `type` in a conflist.
pub const PLUGIN_TYPE: &str = "meshauth-cni";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";

/// Why the chaining could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CniInstallError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("no .conflist in {0}: meshauth chains onto an existing CNI (bridge, ptp, Calico, flannel, AWS VPC CNI…), which writes one")]
    NoConflist(PathBuf),
    #[error("{path}: not a CNI conflist: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CniInstallError + '_ {
    move |error| CniInstallError::Io { path: path.to_owned(), error }
}

/// The conflist the runtime uses: the first `.conflist` in name order.
pub fn active_conflist(conf_dir: &Path) -> Result<PathBuf, CniInstallError> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    lists.into_iter().next().ok_or_else(|| CniInstallError::NoConflist(conf_dir.to_owned()))
}

/// `conflist` with the meshauth entry last (unchanged when it is already there).
pub fn with_plugin(conflist: &Value, socket: &str) -> Result<Value, String> {
    let mut out = conflist.clone();
    let plugins = out.get_mut("plugins").and_then(Value::as_array_mut).ok_or("no \"plugins\" list")?;
    if plugins.is_empty() {
        return Err("an empty \"plugins\" list: nothing creates the pods' interfaces".into());
    }
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.push(serde_json::json!({"type": PLUGIN_TYPE, "socket": socket}));
    Ok(out)
}

/// `conflist` without the meshauth entry.
pub fn without_plugin(conflist: &Value) -> Value {
    let mut out = conflist.clone();
    if let Some(plugins) = out.get_mut("plugins").and_then(Value::as_array_mut) {
        plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    }
    out
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CniInstallError> {
    // A dot-file without the .conf/.conflist extension: the runtime ignores it while it exists.
    let tmp = path.with_file_name(format!(".{}.meshauth-tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("cni")));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn write_conflist(path: &Path, conf: &Value) -> Result<(), CniInstallError> {
    let text =
        serde_json::to_string_pretty(conf).map_err(|e| CniInstallError::Malformed { path: path.to_owned(), reason: e.to_string() })?;
    write_atomically(path, text.as_bytes())
}

fn read_conflist(path: &Path) -> Result<Value, CniInstallError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| CniInstallError::Malformed { path: path.to_owned(), reason: e.to_string() })
}

/// Copies the plugin into `bin_dir` and chains it last in the active conflist of `conf_dir`.
pub fn install(plugin_binary: &Path, bin_dir: &Path, conf_dir: &Path, socket: &str) -> Result<PathBuf, CniInstallError> {
    let bytes = std::fs::read(plugin_binary).map_err(io(plugin_binary))?;
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    write_atomically(&target, &bytes)?;
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755)).map_err(io(&target))?;
    let list = active_conflist(conf_dir)?;
    let conf = read_conflist(&list)?;
    let chained = with_plugin(&conf, socket).map_err(|reason| CniInstallError::Malformed { path: list.clone(), reason })?;
    if chained != conf {
        write_conflist(&list, &chained)?;
    }
    Ok(list)
}

/// Takes the meshauth entry out of every conflist of `conf_dir` and removes the plugin binary.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, CniInstallError> {
    let mut changed = Vec::new();
    for entry in std::fs::read_dir(conf_dir).map_err(io(conf_dir))?.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "conflist") {
            continue;
        }
        let Ok(conf) = read_conflist(&path) else { continue };
        let cleaned = without_plugin(&conf);
        if cleaned != conf {
            write_conflist(&path, &cleaned)?;
            changed.push(path);
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(CniInstallError::Io { path: bin_dir.join(PLUGIN_TYPE), error }),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn install_appends_last_once_and_uninstall_restores_the_list() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (conf, bin) = (dir.path().join("net.d"), dir.path().join("bin"));
        std::fs::create_dir_all(&conf).expect("dir");
        std::fs::write(conf.join("10-bridge.conflist"), BRIDGE).expect("write");
        std::fs::write(conf.join("20-other.conflist"), BRIDGE).expect("write");
        std::fs::write(dir.path().join("plugin"), b"#!/bin/true\n").expect("plugin");
        for _ in 0..2 {
            let list = install(&dir.path().join("plugin"), &bin, &conf, "/var/run/meshauth/cni.sock").expect("install");
            assert_eq!(list, conf.join("10-bridge.conflist"), "the first conflist is the one the runtime uses");
        }
        let chained: Value = serde_json::from_str(&std::fs::read_to_string(conf.join("10-bridge.conflist")).expect("read")).expect("json");
        let types: Vec<_> =
            chained["plugins"].as_array().expect("plugins").iter().map(|p| p["type"].as_str().expect("type").to_owned()).collect();
        assert_eq!(types, ["bridge", "portmap", "meshauth-cni"]);
        assert!(bin.join("meshauth-cni").exists());
        uninstall(&bin, &conf).expect("uninstall");
        let restored: Value = serde_json::from_str(&std::fs::read_to_string(conf.join("10-bridge.conflist")).expect("read")).expect("json");
        assert_eq!(restored, serde_json::from_str::<Value>(BRIDGE).expect("json"), "the configuration is as it was");
        assert!(!bin.join("meshauth-cni").exists());
        assert!(std::fs::read_dir(&conf).expect("dir").flatten().all(|e| !e.file_name().to_string_lossy().contains("meshauth-tmp")));
    }

    #[test]
    fn a_node_without_a_conflist_or_with_a_broken_one_gets_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("plugin"), b"x").expect("plugin");
        let err = install(&dir.path().join("plugin"), &dir.path().join("bin"), dir.path(), "s").expect_err("no conflist");
        assert!(err.to_string().contains("no .conflist in"), "{err}");
        std::fs::write(dir.path().join("10-x.conflist"), "{\"plugins\": 3}").expect("write");
        let err = install(&dir.path().join("plugin"), &dir.path().join("bin"), dir.path(), "s").expect_err("broken");
        assert!(err.to_string().contains("no \"plugins\" list"), "{err}");
    }
}
