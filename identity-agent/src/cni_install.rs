//! Chaining `meshauth-cni` into the node's existing CNI configuration, and taking it out again,
//! as Cilium's generic-veth chaining mode does: the plugin binary goes into the CNI binary
//! directory and one entry is appended, last, to the `plugins` of the network config the runtime
//! uses.
//!
//! The config the runtime uses is the one containerd (go-cni) and CRI-O (ocicni) pick with
//! libcni's `ConfFiles(dir, [".conf", ".conflist", ".json"])`: of the directory's entries that
//! are not directories (dot-files included), those whose extension, taken from the last dot, is
//! one of the three, the first in byte order of the name. A `.conflist` is a list; a `.conf` or a
//! `.json` is taken by its content: a `plugins` array makes it a list, a top-level `type` a single
//! plugin.
//!
//! A list is chained in place, its bytes kept first in `<file name>.meshauth-original` so that
//! uninstalling puts back the very bytes, not a re-serialisation. A single plugin cannot take a
//! second entry, so it is converted as libcni's `ConfListFromConf` does (the whole object becomes
//! the first plugin, under the original's `name` and `cniVersion`, "1.0.0" when it names none)
//! into `<stem>-meshauth.conflist`, and the original is renamed to
//! `<file name>.meshauth-original`, which the runtime does not read. The new name takes the
//! original's place: it shares the original's stem and `-` sorts before `.`, so it sorts before
//! the original, which sorted before every other config file. `<stem>.conflist` would not:
//! `10-flannel.conf-old.json` sorts between `10-flannel.conf` and `10-flannel.conflist`, and a
//! `10-flannel.conflist` an older primary left behind would be overwritten.
//!
//! Every step is idempotent and every write is atomic (write beside, then rename), so the runtime
//! never reads half a file. Uninstalling leaves the directory as it was before installing.

use serde_json::Value;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The plugin's `type` in a conflist.
pub const PLUGIN_TYPE: &str = "meshauth-cni";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";

/// The extensions, from the last dot of the name, of the files the runtime reads as network configs.
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// Appended to a config file's name for the bytes meshauth replaced; not an extension the runtime reads.
const BACKUP_SUFFIX: &str = ".meshauth-original";
/// Takes the place of the `.conf` or `.json` of a converted single-plugin config.
const CONVERTED_SUFFIX: &str = "-meshauth.conflist";
/// A conflist needs a version; a single-plugin config may name none.
const DEFAULT_CNI_VERSION: &str = "1.0.0";

/// Why the chaining could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum CniInstallError {
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error(
        "no CNI network config (.conf, .conflist or .json) in {0}: meshauth chains onto an existing CNI (bridge, ptp, Calico, flannel, AWS VPC CNI…), which writes one"
    )]
    NoConfig(PathBuf),
    #[error("{path}: not a CNI network config meshauth can chain onto: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CniInstallError + '_ {
    move |error| CniInstallError::Io { path: path.to_owned(), error }
}

fn malformed(path: &Path, reason: impl Into<String>) -> CniInstallError {
    CniInstallError::Malformed { path: path.to_owned(), reason: reason.into() }
}

/// The extension as Go's `filepath.Ext` finds it (from the last dot, so `.conf` alone has one), without the dot.
fn extension(name: &OsStr) -> Option<&[u8]> {
    let bytes = name.as_bytes();
    bytes.iter().rposition(|&b| b == b'.').map(|dot| &bytes[dot + 1..])
}

fn is_config_name(name: &OsStr) -> bool {
    extension(name).is_some_and(|ext| CONFIG_EXTENSIONS.iter().any(|c| c.as_bytes() == ext))
}

/// The extensions a single-plugin config can have: the runtime reads a `.conflist` as a list whatever it holds.
fn is_convertible_name(name: &OsStr) -> bool {
    extension(name).is_some_and(|ext| ext == b"conf" || ext == b"json")
}

fn backup_name(original: &OsStr) -> OsString {
    OsString::from_vec([original.as_bytes(), BACKUP_SUFFIX.as_bytes()].concat())
}

fn original_of_backup(backup: &OsStr) -> Option<OsString> {
    let original = backup.as_bytes().strip_suffix(BACKUP_SUFFIX.as_bytes())?;
    Some(OsString::from_vec(original.to_vec())).filter(|o| is_config_name(o))
}

/// `<stem>-meshauth.conflist` for `<stem>.conf` or `<stem>.json`.
fn converted_name(original: &OsStr) -> OsString {
    let bytes = original.as_bytes();
    let stem = bytes.iter().rposition(|&b| b == b'.').map_or(bytes, |dot| &bytes[..dot]);
    OsString::from_vec([stem, CONVERTED_SUFFIX.as_bytes()].concat())
}

/// The names of the originals a converted list can stand for, in the runtime's order.
fn originals_of_converted(converted: &OsStr) -> Option<[OsString; 2]> {
    let stem = converted.as_bytes().strip_suffix(CONVERTED_SUFFIX.as_bytes())?;
    Some(["conf", "json"].map(|ext| OsString::from_vec([stem, b".".as_slice(), ext.as_bytes()].concat())))
}

/// The names of the entries of `conf_dir` that are not directories, in the runtime's order (bytes).
fn file_names(conf_dir: &Path) -> Result<Vec<OsString>, CniInstallError> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(conf_dir).map_err(io(conf_dir))? {
        let entry = entry.map_err(io(conf_dir))?;
        // The entry's own type, as the runtime's `os.ReadDir` reports it: a symlink is not followed.
        if !entry.file_type().map_err(io(&entry.path()))?.is_dir() {
            names.push(entry.file_name());
        }
    }
    names.sort();
    Ok(names)
}

fn first_config<'a>(conf_dir: &Path, sorted_names: &'a [OsString]) -> Result<&'a OsString, CniInstallError> {
    sorted_names.iter().find(|n| is_config_name(n)).ok_or_else(|| CniInstallError::NoConfig(conf_dir.to_owned()))
}

/// The network config the runtime uses: the first file in name order whose extension is `.conf`,
/// `.conflist` or `.json`.
pub fn active_config(conf_dir: &Path) -> Result<PathBuf, CniInstallError> {
    let names = file_names(conf_dir)?;
    Ok(conf_dir.join(first_config(conf_dir, &names)?))
}

/// Whether the config the runtime uses now chains meshauth-cni.
pub fn is_chained(conf_dir: &Path) -> bool {
    let Ok(path) = active_config(conf_dir) else { return false };
    let Ok((_, conf)) = read_config(&path) else { return false };
    conf.get("plugins")
        .and_then(Value::as_array)
        .is_some_and(|p| p.iter().any(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)))
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

/// How the runtime reads a network config.
enum Shape {
    List,
    SinglePlugin,
}

fn shape(name: &OsStr, conf: &Value) -> Result<Shape, &'static str> {
    // A `.conflist` is a list whatever it holds; `with_plugin` then says what is wrong with it.
    if !is_convertible_name(name) || conf.get("plugins").is_some_and(Value::is_array) {
        Ok(Shape::List)
    } else if conf.get("type").is_some_and(Value::is_string) {
        Ok(Shape::SinglePlugin)
    } else {
        Err("neither a \"plugins\" list nor a plugin \"type\"")
    }
}

/// A single-plugin config as a conflist, as libcni's `ConfListFromConf` builds it: the whole object is the plugin.
fn list_from_plugin(plugin: &Value) -> Result<Value, &'static str> {
    // libcni refuses a conflist without a name, and inventing one would move host-local's IPAM
    // state, which is kept under the network's name.
    let name = plugin
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or("no \"name\", which a conflist needs: convert it to a .conflist by hand")?;
    let version = plugin.get("cniVersion").and_then(Value::as_str).unwrap_or(DEFAULT_CNI_VERSION);
    Ok(serde_json::json!({"cniVersion": version, "name": name, "plugins": [plugin]}))
}

fn permissions(path: &Path) -> Option<std::fs::Permissions> {
    std::fs::metadata(path).ok().map(|m| m.permissions())
}

fn write_atomically(path: &Path, bytes: &[u8], permissions: Option<std::fs::Permissions>) -> Result<(), CniInstallError> {
    // A dot-file with an extension the runtime does not read: ignored while it exists.
    let name = path.file_name().map_or(&[][..], |n| n.as_bytes());
    let tmp = path.with_file_name(OsString::from_vec([b".".as_slice(), name, b".meshauth-tmp".as_slice()].concat()));
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    if let Some(permissions) = permissions {
        std::fs::set_permissions(&tmp, permissions).map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn write_config(path: &Path, conf: &Value, permissions: Option<std::fs::Permissions>) -> Result<(), CniInstallError> {
    let text = serde_json::to_string_pretty(conf).map_err(|e| malformed(path, e.to_string()))?;
    write_atomically(path, text.as_bytes(), permissions)
}

/// A config file's bytes, kept for the backup, and what they parse to.
fn read_config(path: &Path) -> Result<(Vec<u8>, Value), CniInstallError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let conf = serde_json::from_slice(&bytes).map_err(|e| malformed(path, e.to_string()))?;
    Ok((bytes, conf))
}

fn remove_if_present(path: &Path) -> Result<(), CniInstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(CniInstallError::Io { path: path.to_owned(), error }),
    }
}

/// The config the runtime uses once chained, and whether chaining wrote anything.
struct Chained {
    config: PathBuf,
    changed: bool,
}

/// One directory read and one file read when the entry is already there.
fn chain(conf_dir: &Path, socket: &str) -> Result<Chained, CniInstallError> {
    let names = file_names(conf_dir)?;
    let first = first_config(conf_dir, &names)?;
    // A list meshauth converted sorts before its original. An original beside it again (the
    // primary wrote its file anew, or a conversion stopped between its two steps) is the
    // primary's current config, which the stale conversion hides from the runtime.
    let reappeared = originals_of_converted(first).and_then(|originals| originals.into_iter().find(|o| names.contains(o)));
    let source = reappeared.as_ref().unwrap_or(first);
    let path = conf_dir.join(source);
    let (bytes, conf) = read_config(&path)?;
    match shape(source, &conf).map_err(|reason| malformed(&path, reason))? {
        Shape::List => {
            let chained = with_plugin(&conf, socket).map_err(|reason| malformed(&path, reason))?;
            let mut changed = false;
            if chained != conf {
                // Only the primary's own bytes are worth putting back; a list meshauth converted
                // goes away on uninstall and needs none.
                if without_plugin(&conf) == conf && originals_of_converted(source).is_none() {
                    write_atomically(&conf_dir.join(backup_name(source)), &bytes, permissions(&path))?;
                }
                write_config(&path, &chained, permissions(&path))?;
                changed = true;
            }
            if reappeared.is_some() {
                remove_if_present(&conf_dir.join(first))?;
                changed = true;
            }
            Ok(Chained { config: path, changed })
        }
        Shape::SinglePlugin => {
            let list = list_from_plugin(&conf).map_err(|reason| malformed(&path, reason))?;
            let chained = with_plugin(&list, socket).map_err(|reason| malformed(&path, reason))?;
            let converted = conf_dir.join(converted_name(source));
            // The list first: it sorts before the original, so from then on the runtime uses it,
            // and at no moment has neither.
            write_config(&converted, &chained, permissions(&path))?;
            std::fs::rename(&path, conf_dir.join(backup_name(source))).map_err(io(&path))?;
            Ok(Chained { config: converted, changed: true })
        }
    }
}

/// Copies the plugin into `bin_dir` and chains it last in the config the runtime uses in
/// `conf_dir`, converting a single-plugin config to a conflist; returns that config's path.
pub fn install(plugin_binary: &Path, bin_dir: &Path, conf_dir: &Path, socket: &str) -> Result<PathBuf, CniInstallError> {
    let bytes = std::fs::read(plugin_binary).map_err(io(plugin_binary))?;
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    // The binary before the config: the runtime never calls a plugin that is not there.
    let target = bin_dir.join(PLUGIN_TYPE);
    write_atomically(&target, &bytes, Some(std::os::unix::fs::PermissionsExt::from_mode(0o755)))?;
    Ok(chain(conf_dir, socket)?.config)
}

/// For the running agent: chains into the config the runtime uses now if the meshauth entry is
/// not there (the primary rewrote its config, or a new one sorts first). `Some(path)` when it
/// wrote something, `None` when already chained. The binary is the caller's business.
pub fn ensure_chained(conf_dir: &Path, socket: &str) -> Result<Option<PathBuf>, CniInstallError> {
    let chained = chain(conf_dir, socket)?;
    Ok(chained.changed.then_some(chained.config))
}

/// Puts back the primary's bytes of a list chained in place, unless the primary rewrote it since;
/// then only the entry comes out. Whether the file changed.
fn restore_in_place(path: &Path, backup: &Path) -> Result<bool, CniInstallError> {
    let Ok((_, current)) = read_config(path) else {
        // meshauth never writes a broken file: the primary wrote this one, after the backup.
        remove_if_present(backup)?;
        return Ok(false);
    };
    let cleaned = without_plugin(&current);
    if read_config(backup).is_ok_and(|(_, kept)| kept == cleaned) {
        std::fs::rename(backup, path).map_err(io(path))?;
        return Ok(cleaned != current);
    }
    remove_if_present(backup)?;
    if cleaned != current {
        write_config(path, &cleaned, permissions(path))?;
        return Ok(true);
    }
    Ok(false)
}

/// Takes the meshauth entry out of every config of `conf_dir`, puts the primary's files back as
/// they were, and removes the plugin binary. Returns the configs it changed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, CniInstallError> {
    let mut changed = Vec::new();
    let names = file_names(conf_dir)?;
    for backup in &names {
        let Some(original) = original_of_backup(backup) else { continue };
        let (backup_path, original_path) = (conf_dir.join(backup), conf_dir.join(&original));
        let converted = Some(converted_name(&original)).filter(|c| is_convertible_name(&original) && names.contains(c));
        if let Some(converted) = converted {
            if names.contains(&original) {
                // The primary wrote its file again since the conversion: that one is current.
                remove_if_present(&backup_path)?;
            } else {
                // Back before the conversion goes: it sorts first until then, so the runtime
                // always has this network.
                std::fs::rename(&backup_path, &original_path).map_err(io(&original_path))?;
            }
            remove_if_present(&conf_dir.join(converted))?;
            changed.push(original_path);
        } else if names.contains(&original) {
            if restore_in_place(&original_path, &backup_path)? {
                changed.push(original_path);
            }
        } else {
            // The primary removed the file it belonged to.
            remove_if_present(&backup_path)?;
        }
    }
    // Left: a conversion that stopped before the original was renamed, and lists chained
    // without a backup (by an agent from before backups were kept).
    let names = file_names(conf_dir)?;
    for name in names.iter().filter(|n| is_config_name(n)) {
        let path = conf_dir.join(name);
        if originals_of_converted(name).is_some_and(|originals| originals.iter().any(|o| names.contains(o))) {
            remove_if_present(&path)?;
            changed.push(path);
            continue;
        }
        let Ok((_, conf)) = read_config(&path) else { continue };
        let cleaned = without_plugin(&conf);
        if cleaned != conf {
            write_config(&path, &cleaned, permissions(&path))?;
            changed.push(path);
        }
    }
    remove_if_present(&bin_dir.join(PLUGIN_TYPE))?;
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const SOCKET: &str = "/var/run/meshauth/cni.sock";
    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;
    const FLANNEL: &str =
        r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;
    const PTP: &str = r#"{"name":"ptp-net","type":"ptp","ipam":{"type":"host-local","subnet":"10.1.0.0/16"}}"#;
    const LOOPBACK: &str = r#"{"cniVersion":"1.0.0","name":"lo","type":"loopback"}"#;

    /// Every file of `dir` by name, with its bytes.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .filter(|e| e.file_type().expect("type").is_file())
            .map(|e| (e.file_name().into_string().expect("utf-8"), std::fs::read(e.path()).expect("read")))
            .collect()
    }

    /// The file the runtime uses, found by its rule independently of the code under test.
    fn runtime_first(dir: &Path) -> PathBuf {
        let mut configs: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .flatten()
            .filter(|e| !e.file_type().expect("type").is_dir())
            .map(|e| e.file_name().into_string().expect("utf-8"))
            .filter(|n| n.rsplit_once('.').is_some_and(|(_, ext)| ["conf", "conflist", "json"].contains(&ext)))
            .collect();
        configs.sort();
        dir.join(configs.first().expect("a config file"))
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json")
    }

    fn plugin_types(path: &Path) -> Vec<String> {
        read_json(path)["plugins"].as_array().expect("plugins").iter().map(|p| p["type"].as_str().expect("type").to_owned()).collect()
    }

    fn json(text: &str) -> Value {
        serde_json::from_str(text).expect("json")
    }

    /// A config dir with `files` and a plugin binary beside it: (tempdir, conf dir, bin dir, plugin).
    fn node(files: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (conf, bin, plugin) = (dir.path().join("net.d"), dir.path().join("bin"), dir.path().join("plugin"));
        std::fs::create_dir_all(&conf).expect("dir");
        for (name, text) in files {
            std::fs::write(conf.join(name), text).expect("write");
        }
        std::fs::write(&plugin, b"#!/bin/true\n").expect("plugin");
        (dir, conf, bin, plugin)
    }

    #[test]
    fn install_appends_last_once_and_uninstall_restores_the_very_bytes() {
        let (_dir, conf, bin, plugin) = node(&[("10-bridge.conflist", BRIDGE), ("20-other.conflist", BRIDGE)]);
        let before = snapshot(&conf);
        let list = install(&plugin, &bin, &conf, SOCKET).expect("install");
        assert_eq!(list, conf.join("10-bridge.conflist"), "the first conflist is the one the runtime uses");
        assert_eq!(runtime_first(&conf), list);
        let installed = snapshot(&conf);
        assert_eq!(install(&plugin, &bin, &conf, SOCKET).expect("again"), list);
        assert_eq!(snapshot(&conf), installed, "installing twice changes nothing");
        assert_eq!(plugin_types(&list), ["bridge", "portmap", "meshauth-cni"]);
        assert_eq!(read_json(&list)["plugins"][2]["socket"], SOCKET);
        assert_eq!(installed["20-other.conflist"], BRIDGE.as_bytes(), "only the runtime's config is chained");
        assert!(bin.join("meshauth-cni").exists());
        uninstall(&bin, &conf).expect("uninstall");
        assert_eq!(snapshot(&conf), before, "the directory is byte for byte as it was");
        assert!(!bin.join("meshauth-cni").exists());
    }

    /// Installs into a node whose first config is the single plugin `original`, checks the
    /// conversion, and that uninstalling restores every byte.
    fn converts_a_single_plugin(files: &[(&str, &str)], original: &str, converted: &str, version: &str) {
        let (_dir, conf, bin, plugin) = node(files);
        assert_eq!(runtime_first(&conf), conf.join(original), "the test's premise: the single plugin sorts first");
        let plugin_text = files.iter().find(|(n, _)| *n == original).map(|(_, t)| *t).expect("original among files");
        let before = snapshot(&conf);
        let list = install(&plugin, &bin, &conf, SOCKET).expect("install");
        assert_eq!(list, conf.join(converted));
        assert_eq!(runtime_first(&conf), list, "the conversion takes the original's place in the runtime's order");
        let chained = read_json(&list);
        assert_eq!(chained["cniVersion"], version);
        assert_eq!(chained["name"], json(plugin_text)["name"]);
        assert_eq!(chained["plugins"][0], json(plugin_text), "the original object is the first plugin, as it was");
        assert_eq!(plugin_types(&list).last().map(String::as_str), Some("meshauth-cni"));
        assert!(!conf.join(original).exists(), "the original no longer is a config file");
        let installed = snapshot(&conf);
        assert_eq!(installed[&format!("{original}.meshauth-original")], plugin_text.as_bytes());
        for (name, text) in files.iter().filter(|(n, _)| *n != original) {
            assert_eq!(installed[*name], text.as_bytes(), "{name} is not touched");
        }
        install(&plugin, &bin, &conf, SOCKET).expect("again");
        assert_eq!(snapshot(&conf), installed, "installing twice changes nothing");
        uninstall(&bin, &conf).expect("uninstall");
        assert_eq!(snapshot(&conf), before, "the directory is byte for byte as it was");
    }

    #[test]
    fn a_conf_sorting_first_is_converted_to_a_conflist_that_takes_its_place() {
        // `10-flannel.conf-old.json` sorts between `10-flannel.conf` and `10-flannel.conflist`:
        // a conversion named `10-flannel.conflist` would leave the runtime using it, and would
        // overwrite the primary's own `10-flannel.conflist`.
        converts_a_single_plugin(
            &[
                ("10-flannel.conf", FLANNEL),
                ("10-flannel.conf-old.json", BRIDGE),
                ("10-flannel.conflist", BRIDGE),
                ("99-loopback.conf", LOOPBACK),
            ],
            "10-flannel.conf",
            "10-flannel-meshauth.conflist",
            "0.3.1",
        );
    }

    #[test]
    fn a_single_plugin_json_without_a_version_is_converted_as_1_0_0() {
        converts_a_single_plugin(
            &[("10-ptp.json", PTP), ("20-bridge.conflist", BRIDGE)],
            "10-ptp.json",
            "10-ptp-meshauth.conflist",
            "1.0.0",
        );
    }

    #[test]
    fn a_json_holding_a_list_is_chained_in_place() {
        let (_dir, conf, bin, plugin) = node(&[("10-net.json", BRIDGE), ("20-ptp.conf", PTP)]);
        let before = snapshot(&conf);
        let list = install(&plugin, &bin, &conf, SOCKET).expect("install");
        assert_eq!(list, conf.join("10-net.json"));
        assert_eq!(runtime_first(&conf), list);
        assert_eq!(plugin_types(&list), ["bridge", "portmap", "meshauth-cni"]);
        assert!(snapshot(&conf).keys().all(|n| !n.ends_with("-meshauth.conflist")), "nothing converted");
        uninstall(&bin, &conf).expect("uninstall");
        assert_eq!(snapshot(&conf), before);
    }

    #[test]
    fn ensure_chained_repairs_what_the_primary_rewrites_and_is_quiet_otherwise() {
        let (_dir, conf, bin, _plugin) = node(&[("10-bridge.conflist", BRIDGE)]);
        let bridge = conf.join("10-bridge.conflist");
        assert_eq!(ensure_chained(&conf, SOCKET).expect("chain"), Some(bridge.clone()));
        assert_eq!(ensure_chained(&conf, SOCKET).expect("again"), None);
        assert!(!bin.exists(), "the binary is the caller's business");

        // The primary writes its list again, without our entry.
        std::fs::write(&bridge, BRIDGE).expect("rewrite");
        assert_eq!(ensure_chained(&conf, SOCKET).expect("repair"), Some(bridge.clone()));
        assert_eq!(plugin_types(&bridge), ["bridge", "portmap", "meshauth-cni"]);
        assert_eq!(ensure_chained(&conf, SOCKET).expect("again"), None);

        // A single-plugin config that sorts first appears.
        std::fs::write(conf.join("05-flannel.conf"), FLANNEL).expect("new");
        let converted = conf.join("05-flannel-meshauth.conflist");
        assert_eq!(ensure_chained(&conf, SOCKET).expect("convert"), Some(converted.clone()));
        assert_eq!(runtime_first(&conf), converted);
        assert_eq!(plugin_types(&converted), ["flannel", "meshauth-cni"]);
        assert_eq!(ensure_chained(&conf, SOCKET).expect("again"), None);

        // The primary writes its single plugin again, changed: the conversion must follow it
        // rather than hide it from the runtime.
        let newer = FLANNEL.replace("\"hairpinMode\":true", "\"hairpinMode\":false");
        std::fs::write(conf.join("05-flannel.conf"), &newer).expect("rewrite");
        assert_eq!(ensure_chained(&conf, SOCKET).expect("follow"), Some(converted.clone()));
        assert_eq!(read_json(&converted)["plugins"][0], json(&newer));
        assert!(!conf.join("05-flannel.conf").exists());
        assert_eq!(ensure_chained(&conf, SOCKET).expect("again"), None);

        uninstall(&bin, &conf).expect("uninstall");
        let expected: BTreeMap<String, Vec<u8>> =
            [("05-flannel.conf".to_owned(), newer.into_bytes()), ("10-bridge.conflist".to_owned(), BRIDGE.as_bytes().to_vec())].into();
        assert_eq!(snapshot(&conf), expected, "the primary's latest files, as it wrote them");
    }

    #[test]
    fn the_active_config_is_the_first_by_the_runtimes_rule() {
        let (_dir, conf, _bin, _plugin) = node(&[("20-b.conflist", BRIDGE), ("10-a.json", BRIDGE), ("01-notes.md", "x")]);
        std::fs::create_dir(conf.join("00-dir.conflist")).expect("dir");
        std::fs::write(conf.join(".00-a.json.meshauth-tmp"), "x").expect("tmp");
        std::fs::write(conf.join("00-a.conf.meshauth-original"), FLANNEL).expect("backup");
        assert_eq!(active_config(&conf).expect("active"), conf.join("10-a.json"));
        // The runtime does not skip dot-files, and `.` sorts before digits.
        std::fs::write(conf.join(".hidden.conf"), FLANNEL).expect("hidden");
        assert_eq!(active_config(&conf).expect("active"), conf.join(".hidden.conf"));
        assert_eq!(active_config(&conf).expect("active"), runtime_first(&conf));
    }

    #[test]
    fn a_node_without_a_config_or_with_a_broken_one_gets_a_clear_error() {
        let (_dir, conf, bin, plugin) = node(&[]);
        let err = install(&plugin, &bin, &conf, "s").expect_err("no config");
        assert!(err.to_string().contains("no CNI network config"), "{err}");
        assert!(err.to_string().contains(&conf.display().to_string()), "{err}");

        let list = conf.join("10-x.conflist");
        std::fs::write(&list, "{\"plugins\": 3}").expect("write");
        for err in [install(&plugin, &bin, &conf, "s").expect_err("broken"), ensure_chained(&conf, "s").expect_err("broken")] {
            assert!(err.to_string().contains("no \"plugins\" list"), "{err}");
            assert!(err.to_string().contains(&list.display().to_string()), "{err}");
        }

        let single = conf.join("05-x.conf");
        for (text, reason) in [
            ("not json", "expected"),
            (r#"{"name":"n","cniVersion":"1.0.0"}"#, "neither a \"plugins\" list nor a plugin \"type\""),
            (r#"{"type":"bridge"}"#, "no \"name\""),
        ] {
            std::fs::write(&single, text).expect("write");
            let before = snapshot(&conf);
            let err = ensure_chained(&conf, "s").expect_err(text);
            assert!(err.to_string().contains(reason), "{text}: {err}");
            assert!(err.to_string().contains(&single.display().to_string()), "{err}");
            assert_eq!(snapshot(&conf), before, "{text}: nothing written");
        }
    }
}
