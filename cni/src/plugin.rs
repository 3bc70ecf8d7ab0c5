//! The CNI side: reads what the runtime gives a plugin (environment, network configuration on
//! stdin), asks the agent, and answers in the spec's shapes (the previous result on success, an
//! error object with a code on failure). Pure over its inputs, so every rule is unit-tested;
//! `main.rs` only wires the process to it.

use crate::protocol::{self, AgentRequest, Command, DEFAULT_SOCKET};
use serde_json::{Value, json};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

/// CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// How long ADD waits for the agent to guard the pod.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// CNI error codes (spec "Error"): 4 invalid environment variables, 6 failed to decode
/// content, 7 invalid network config, 11 try again later; 100 and above are the plugin's own.
pub mod code {
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const REFUSED: u32 = 100;
}

/// A CNI error: what the plugin prints on stdout before it exits 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// What one invocation of the plugin was given.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: String,
    pub container_id: String,
    /// `CNI_NETNS`: a path to the pod's network namespace.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: String,
    /// The network configuration on stdin.
    pub config: Value,
}

impl Invocation {
    /// From the process environment and stdin text.
    pub fn from_env(get: impl Fn(&str) -> Option<String>, stdin: &str) -> Result<Self, CniError> {
        let command = get("CNI_COMMAND").ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", ""))?;
        let config = if command == "VERSION" && stdin.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(stdin)
                .map_err(|e| CniError::new(code::DECODE, "the network configuration on stdin is not JSON", e.to_string()))?
        };
        Ok(Self {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").filter(|s| !s.is_empty()).map(PathBuf::from),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: get("CNI_ARGS").unwrap_or_default(),
            config,
        })
    }

    /// The configuration's `cniVersion` (what replies must carry).
    pub fn cni_version(&self) -> String {
        self.config.get("cniVersion").and_then(Value::as_str).unwrap_or("1.0.0").to_owned()
    }

    fn arg(&self, key: &str) -> Option<String> {
        self.args.split(';').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == key).map(|(_, v)| v.to_owned())
    }

    /// The agent's socket: the configuration's `socket`, else [`DEFAULT_SOCKET`].
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(self.config.get("socket").and_then(Value::as_str).unwrap_or(DEFAULT_SOCKET))
    }

    fn timeout(&self) -> Duration {
        self.config.get("timeoutSeconds").and_then(Value::as_u64).map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }

    /// The pod's IPv4 addresses and the interface they are on, from `prevResult`.
    fn pod_addresses(&self) -> Result<(String, Vec<Ipv4Addr>), CniError> {
        let prev = self.config.get("prevResult").ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "meshauth-cni is a chained plugin: it needs a prevResult",
                "put it last in a conflist after the plugin that creates the pod's interface",
            )
        })?;
        let interfaces = prev.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
        let mut ifname = None;
        let mut ips = Vec::new();
        for ip in prev.get("ips").and_then(Value::as_array).into_iter().flatten() {
            let Some(address) = ip.get("address").and_then(Value::as_str) else { continue };
            let Some(v4) = address.split('/').next().and_then(|a| a.parse::<Ipv4Addr>().ok()) else { continue };
            ips.push(v4);
            // The address's interface, when prevResult names one inside the sandbox.
            if let Some(iface) = ip.get("interface").and_then(Value::as_u64).and_then(|i| interfaces.get(usize::try_from(i).ok()?))
                && iface.get("sandbox").and_then(Value::as_str).is_some_and(|s| !s.is_empty())
                && let Some(name) = iface.get("name").and_then(Value::as_str)
            {
                ifname.get_or_insert_with(|| name.to_owned());
            }
        }
        Ok((ifname.unwrap_or_else(|| self.ifname.clone()), ips))
    }

    fn request(&self, command: Command, ifname: String, ips: Vec<Ipv4Addr>) -> AgentRequest {
        AgentRequest {
            command,
            container_id: self.container_id.clone(),
            ifname,
            pod_namespace: self.arg("K8S_POD_NAMESPACE"),
            pod_name: self.arg("K8S_POD_NAME"),
            ips,
        }
    }
}

/// Carries out one invocation: `Ok(stdout)` or the error to print.
pub fn run(inv: &Invocation) -> Result<String, CniError> {
    let version = inv.cni_version();
    match inv.command.as_str() {
        "VERSION" => Ok(json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string()),
        "ADD" => {
            let (ifname, ips) = inv.pod_addresses()?;
            if ips.is_empty() {
                return Err(CniError::new(code::REFUSED, "the pod has no IPv4 address in prevResult", "meshauth guards IPv4 pods only"));
            }
            let netns_path = inv.netns.as_deref().ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set", ""))?;
            let netns = std::fs::File::open(netns_path)
                .map_err(|e| CniError::new(code::INVALID_ENV, format!("cannot open CNI_NETNS {}", netns_path.display()), e.to_string()))?;
            ask(inv, &inv.request(Command::Add, ifname, ips), Some(&netns))?;
            let mut result = inv.config.get("prevResult").cloned().unwrap_or(Value::Null);
            if let Some(obj) = result.as_object_mut() {
                obj.insert("cniVersion".into(), Value::String(version));
            }
            Ok(result.to_string())
        }
        "DEL" => {
            // DEL must succeed whatever is left: the pod is going, and an interface the agent
            // cannot hear about now it forgets when the interface vanishes.
            let (ifname, ips) = inv.pod_addresses().unwrap_or_else(|_| (inv.ifname.clone(), Vec::new()));
            let netns = inv.netns.as_deref().and_then(|p| std::fs::File::open(p).ok());
            if let Err(e) = ask(inv, &inv.request(Command::Del, ifname, ips), netns.as_ref()) {
                eprintln!("meshauth-cni: DEL not confirmed by the agent ({}); it forgets the interface when it vanishes", e.msg);
            }
            Ok(String::new())
        }
        "CHECK" => {
            let (ifname, ips) = inv.pod_addresses()?;
            let netns = inv.netns.as_deref().and_then(|p| std::fs::File::open(p).ok());
            ask(inv, &inv.request(Command::Check, ifname, ips), netns.as_ref())?;
            Ok(String::new())
        }
        "STATUS" => {
            ask(inv, &inv.request(Command::Status, String::new(), Vec::new()), None)?;
            Ok(String::new())
        }
        // Nothing to collect: the agent forgets interfaces that vanish.
        "GC" => Ok(String::new()),
        other => Err(CniError::new(code::INVALID_ENV, format!("unknown CNI_COMMAND {other:?}"), "")),
    }
}

fn ask(inv: &Invocation, request: &AgentRequest, netns: Option<&std::fs::File>) -> Result<(), CniError> {
    let socket = inv.socket();
    match protocol::call(&socket, request, netns.map(|f| f.as_fd()), inv.timeout()) {
        Ok(answer) => match answer.error {
            None => Ok(()),
            Some(reason) => Err(CniError::new(code::REFUSED, format!("the meshauth agent refused {:?}: {reason}", request.command), "")),
        },
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the meshauth agent is unreachable, so the pod cannot be guarded: {e}"),
            format!("is the meshauth-agent DaemonSet pod running on this node? (socket {})", socket.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn inv(command: &str, config: &str) -> Invocation {
        let env: HashMap<&str, String> = [
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", "abc".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_NETNS", "/proc/self/ns/net".to_owned()),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0".to_owned()),
        ]
        .into_iter()
        .collect();
        Invocation::from_env(|k| env.get(k).cloned(), config).expect("invocation")
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshauth-cni","socket":"/nonexistent/cni.sock",
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/x"}],
        "ips":[{"address":"10.244.1.5/24","gateway":"10.244.1.1","interface":2},{"address":"fd00::5/64","interface":2}]}}"#;

    #[test]
    fn version_lists_the_supported_versions() {
        let out = run(&inv("VERSION", "")).expect("version");
        assert!(out.contains("\"1.0.0\"") && out.contains("\"supportedVersions\""), "{out}");
    }

    #[test]
    fn the_pod_addresses_and_interface_come_from_prev_result() {
        let i = inv("ADD", CONF);
        let (ifname, ips) = i.pod_addresses().expect("addresses");
        assert_eq!(ifname, "eth0");
        assert_eq!(ips, vec!["10.244.1.5".parse::<Ipv4Addr>().expect("ip")]);
        let req = i.request(Command::Add, ifname, ips);
        assert_eq!((req.pod_namespace.as_deref(), req.pod_name.as_deref()), (Some("shop"), Some("web-0")));
    }

    #[test]
    fn add_without_an_agent_fails_closed_with_try_again_later() {
        let err = run(&inv("ADD", CONF)).expect_err("no agent");
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert!(err.msg.contains("meshauth agent is unreachable"), "{err:?}");
        assert!(err.to_json("1.0.0").get("msg").is_some());
    }

    #[test]
    fn add_outside_a_chain_is_an_invalid_configuration() {
        let err = run(&inv("ADD", r#"{"cniVersion":"1.0.0","name":"k8s","type":"meshauth-cni"}"#)).expect_err("no prevResult");
        assert_eq!(err.code, code::INVALID_CONFIG);
        assert!(err.msg.contains("chained plugin"), "{err:?}");
    }

    #[test]
    fn del_succeeds_even_without_an_agent() {
        assert_eq!(run(&inv("DEL", CONF)), Ok(String::new()));
    }

    #[test]
    fn bad_input_gets_a_cni_error_not_a_panic() {
        let err = Invocation::from_env(|k| (k == "CNI_COMMAND").then(|| "ADD".to_owned()), "{not json").expect_err("bad json");
        assert_eq!(err.code, code::DECODE);
        let err = Invocation::from_env(|_| None, "{}").expect_err("no command");
        assert_eq!(err.code, code::INVALID_ENV);
        assert_eq!(run(&inv("FROB", CONF)).expect_err("unknown").code, code::INVALID_ENV);
    }
}
