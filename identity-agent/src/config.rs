//! The agent's configuration: one typed struct with defaults, each setting also readable from
//! an environment variable `MESHAUTH_<NAME>`, and errors that name the setting, the value and
//! the reason. The whole configuration is logged once at start.

use meshauth_crds::TrustDomain;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const NODE_NAME: &str = "MESHAUTH_NODE_NAME";
pub const LISTEN: &str = "MESHAUTH_LISTEN";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:4250";
pub const METRICS_ADDR: &str = "MESHAUTH_METRICS_ADDR";
/// 4251, beside the handshake port: clear of Prometheus (9090), node-exporter (9100),
/// Cilium (9962–9965), the kubelet (10248/10250) and kube-proxy (10249/10256).
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:4251";
pub const WORKLOAD_API_SOCKET: &str = "MESHAUTH_WORKLOAD_API_SOCKET";
pub const DEFAULT_WORKLOAD_API_SOCKET: &str = "/run/spire/sockets/agent.sock";
pub const STATE_DIR: &str = "MESHAUTH_STATE_DIR";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshauth";
pub const TRUST_DOMAIN: &str = "MESHAUTH_TRUST_DOMAIN";
pub const MESH_NAMESPACE: &str = "MESHAUTH_MESH_NAMESPACE";
pub const MANIFESTS: &str = "MESHAUTH_MANIFESTS";
pub const MAX_CONCURRENT_HANDSHAKES: &str = "MESHAUTH_MAX_CONCURRENT_HANDSHAKES";
pub const DEFAULT_MAX_CONCURRENT_HANDSHAKES: usize = 64;
pub const CNI_SOCKET: &str = "MESHAUTH_CNI_SOCKET";
pub const DEFAULT_CNI_SOCKET: &str = meshauth_cni::protocol::DEFAULT_SOCKET;
/// Colon-separated directories of pinned network namespaces, looked through for pods that
/// started before the agent (beside every process's namespace).
pub const NETNS_DIRS: &str = "MESHAUTH_NETNS_DIRS";
/// The agent's DaemonSet: when it is gone as the agent stops (the chart was uninstalled, not
/// restarted), the agent takes meshauth-cni out of the node's CNI configuration.
pub const DAEMONSET: &str = "MESHAUTH_DAEMONSET";
pub const CNI_BIN_DIR: &str = "MESHAUTH_CNI_BIN_DIR";
pub const CNI_CONF_DIR: &str = "MESHAUTH_CNI_CONF_DIR";
pub const HANDSHAKE_TIMEOUT: &str = "MESHAUTH_HANDSHAKE_TIMEOUT_MS";
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes this agent's server answers at once (more wait for a slot).
pub const HANDSHAKE_SERVER_MAX_CONCURRENT: &str = "MESHAUTH_HANDSHAKE_SERVER_MAX_CONCURRENT";
/// Connections one node address may hold open to the handshake server at once.
pub const HANDSHAKE_MAX_PER_SOURCE: &str = "MESHAUTH_HANDSHAKE_MAX_PER_SOURCE";
/// `false` for IPAMs that do not hand out the nodes' `spec.podCIDRs` (Calico's, AWS VPC CNI):
/// otherwise a pod IP outside its node's pod CIDRs is no endpoint.
pub const CHECK_NODE_POD_CIDRS: &str = "MESHAUTH_CHECK_NODE_POD_CIDRS";
/// Interfaces the connection tagger is attached to, comma-separated; unset: the interfaces the
/// node routes toward the other nodes and their pods.
pub const UPLINKS: &str = "MESHAUTH_UPLINKS";
/// `true` takes each Node's `meshauth.io/agent-address` annotation as it is; otherwise it
/// counts only when it names one of the node's own addresses (a node writes its annotations).
pub const TRUST_AGENT_ADDRESS_ANNOTATIONS: &str = "MESHAUTH_TRUST_AGENT_ADDRESS_ANNOTATIONS";

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}={value:?}: {reason}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub value: String,
    pub reason: String,
}

/// Where the agent learns the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum InputMode {
    /// The Kubernetes API (in-cluster, or `KUBECONFIG`).
    Kubernetes,
    /// A directory of YAML manifests, re-read when it changes.
    Manifests(PathBuf),
}

/// Everything `meshauth-agent run` needs.
#[derive(Debug, Clone, Serialize)]
pub struct AgentConfig {
    /// The node this agent runs on; its pods are the destinations it authenticates for.
    pub node_name: String,
    pub inputs: InputMode,
    /// Where peers' agents reach this one for handshakes.
    pub listen: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub workload_api_socket: PathBuf,
    /// Survives restarts: the security-identity and SPIFFE-ID numbering.
    pub state_dir: PathBuf,
    #[serde(serialize_with = "display")]
    pub trust_domain: TrustDomain,
    pub mesh_namespace: String,
    pub max_concurrent_handshakes: usize,
    pub handshake_timeout: Duration,
    pub handshake_server_max_concurrent: usize,
    pub handshake_max_per_source: usize,
    /// Where the CNI plugin reaches this agent.
    pub cni_socket: PathBuf,
    pub netns_dirs: Vec<PathBuf>,
    pub daemonset: Option<String>,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// Pod IPs must lie in their node's `spec.podCIDRs` (where nodes carry any).
    pub check_node_pod_cidrs: bool,
    pub trust_agent_address_annotations: bool,
    /// Interfaces to tag pods' SYNs on; `None`: found by [`crate::pod_net::uplinks_toward`].
    pub uplinks: Option<Vec<String>>,
}

fn display<S: serde::Serializer>(v: &TrustDomain, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.as_str())
}

impl AgentConfig {
    /// The defaults for `node_name`, overridden by the `MESHAUTH_*` variables `get` knows.
    pub fn from_lookup(node_name: Option<String>, get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let node_name = node_name.or_else(|| get(NODE_NAME)).unwrap_or_default();
        if node_name.is_empty() {
            return Err(ConfigError { setting: NODE_NAME, value: String::new(), reason: "the node name is required".into() });
        }
        let addr = |setting: &'static str, default: &str| -> Result<SocketAddr, ConfigError> {
            let value = get(setting).unwrap_or_else(|| default.to_owned());
            value.parse().map_err(|e| ConfigError { setting, value: value.clone(), reason: format!("not an address: {e}") })
        };
        let trust_domain = match get(TRUST_DOMAIN) {
            None => TrustDomain::default(),
            Some(v) => TrustDomain::new(&v).map_err(|e| ConfigError { setting: TRUST_DOMAIN, value: v.clone(), reason: e.to_string() })?,
        };
        let count = |setting: &'static str, default: usize| match get(setting) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| ConfigError {
                setting,
                value: v.clone(),
                reason: "expected a whole number above 0".into(),
            }),
        };
        let max_concurrent_handshakes = count(MAX_CONCURRENT_HANDSHAKES, DEFAULT_MAX_CONCURRENT_HANDSHAKES)?;
        let handshake_server_max_concurrent = count(HANDSHAKE_SERVER_MAX_CONCURRENT, crate::handshake::DEFAULT_MAX_CONCURRENT)?;
        let handshake_max_per_source = count(HANDSHAKE_MAX_PER_SOURCE, crate::handshake::DEFAULT_MAX_PER_SOURCE)?;
        let handshake_timeout = match get(HANDSHAKE_TIMEOUT) {
            None => DEFAULT_HANDSHAKE_TIMEOUT,
            Some(v) => v.parse::<u64>().ok().filter(|n| *n > 0).map(Duration::from_millis).ok_or_else(|| ConfigError {
                setting: HANDSHAKE_TIMEOUT,
                value: v.clone(),
                reason: "expected milliseconds above 0".into(),
            })?,
        };
        let flag = |setting: &'static str, default: bool| match get(setting).as_deref() {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(ConfigError { setting, value: v.to_owned(), reason: "expected true or false".into() }),
        };
        let check_node_pod_cidrs = flag(CHECK_NODE_POD_CIDRS, true)?;
        let trust_agent_address_annotations = flag(TRUST_AGENT_ADDRESS_ANNOTATIONS, false)?;
        Ok(Self {
            check_node_pod_cidrs,
            trust_agent_address_annotations,
            node_name,
            inputs: get(MANIFESTS).map_or(InputMode::Kubernetes, |d| InputMode::Manifests(PathBuf::from(d))),
            listen: addr(LISTEN, DEFAULT_LISTEN)?,
            metrics_addr: addr(METRICS_ADDR, DEFAULT_METRICS_ADDR)?,
            workload_api_socket: PathBuf::from(get(WORKLOAD_API_SOCKET).unwrap_or_else(|| DEFAULT_WORKLOAD_API_SOCKET.into())),
            state_dir: PathBuf::from(get(STATE_DIR).unwrap_or_else(|| DEFAULT_STATE_DIR.into())),
            trust_domain,
            mesh_namespace: get(MESH_NAMESPACE).unwrap_or_else(|| meshauth_policy::model::DEFAULT_MESH_NAMESPACE.into()),
            max_concurrent_handshakes,
            handshake_timeout,
            handshake_server_max_concurrent,
            handshake_max_per_source,
            cni_socket: PathBuf::from(get(CNI_SOCKET).unwrap_or_else(|| DEFAULT_CNI_SOCKET.into())),
            daemonset: get(DAEMONSET).filter(|d| !d.is_empty()),
            cni_bin_dir: PathBuf::from(get(CNI_BIN_DIR).unwrap_or_else(|| crate::cni_install::DEFAULT_BIN_DIR.into())),
            cni_conf_dir: PathBuf::from(get(CNI_CONF_DIR).unwrap_or_else(|| crate::cni_install::DEFAULT_CONF_DIR.into())),
            uplinks: get(UPLINKS).map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()),
            netns_dirs: match get(NETNS_DIRS) {
                Some(v) => v.split(':').filter(|d| !d.is_empty()).map(PathBuf::from).collect(),
                None => crate::pod_net::DEFAULT_NETNS_DIRS.iter().map(PathBuf::from).collect(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let c = AgentConfig::from_lookup(Some("node-1".into()), lookup(&[])).expect("valid");
        assert_eq!(c.listen.port(), 4250);
        // On the host network: clear of what nodes commonly run (Prometheus, node-exporter,
        // Cilium's agent and operator, the kubelet, kube-proxy).
        assert_eq!(c.metrics_addr.port(), 4251);
        let taken = [9090, 9100, 9962, 9963, 9964, 9965, 10248, 10249, 10250, 10256];
        assert!(!taken.contains(&c.listen.port()) && !taken.contains(&c.metrics_addr.port()));
        assert_eq!(c.trust_domain.as_str(), "cluster.local");
        assert_eq!(c.inputs, InputMode::Kubernetes);
        assert_eq!(c.mesh_namespace, "meshauth-system");
    }

    #[test]
    fn errors_name_the_setting_the_value_and_the_reason() {
        let cases: [(&[(&str, &str)], &str); 8] = [
            (&[(LISTEN, "4250")], "MESHAUTH_LISTEN=\"4250\": not an address"),
            (&[(TRUST_DOMAIN, "Cluster.Local")], "MESHAUTH_TRUST_DOMAIN=\"Cluster.Local\": trust domain has character 'C'"),
            (&[(MAX_CONCURRENT_HANDSHAKES, "0")], "MESHAUTH_MAX_CONCURRENT_HANDSHAKES=\"0\": expected a whole number above 0"),
            (&[(HANDSHAKE_TIMEOUT, "soon")], "MESHAUTH_HANDSHAKE_TIMEOUT_MS=\"soon\""),
            (&[(METRICS_ADDR, "::9090")], "MESHAUTH_METRICS_ADDR"),
            (&[(HANDSHAKE_MAX_PER_SOURCE, "0")], "MESHAUTH_HANDSHAKE_MAX_PER_SOURCE=\"0\": expected a whole number above 0"),
            (&[(HANDSHAKE_SERVER_MAX_CONCURRENT, "many")], "MESHAUTH_HANDSHAKE_SERVER_MAX_CONCURRENT=\"many\""),
            (&[(CHECK_NODE_POD_CIDRS, "no")], "MESHAUTH_CHECK_NODE_POD_CIDRS=\"no\": expected true or false"),
        ];
        for (vars, want) in cases {
            let err = AgentConfig::from_lookup(Some("n".into()), lookup(vars)).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        let err = AgentConfig::from_lookup(None, lookup(&[])).expect_err("no node").to_string();
        assert!(err.contains("MESHAUTH_NODE_NAME"), "{err}");
    }
}
