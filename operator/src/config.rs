//! The operator's settings: command-line flags, each also read from `MESHAUTH_<FLAG>`, their
//! defaults, and validation with errors that name the setting, the value and the reason.
//!
//! This module only parses and checks; it must not connect to anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use meshauth_crds::TrustDomain;

use crate::registration::EntrySettings;
use crate::spire::Selector;

pub const DEFAULT_SPIRE_SERVER_SOCKET: &str = "/tmp/spire-server/private/api.sock";
pub use meshauth_crds::DEFAULT_TRUST_DOMAIN;
pub const DEFAULT_ENTRY_SELECTORS: &[&str] = &["k8s:ns:meshauth-system", "k8s:sa:meshauth-agent"];
pub const DEFAULT_SVID_TTL_SECONDS: u32 = 3600;
/// The operator runs in the mesh namespace.
pub const DEFAULT_NAMESPACE: &str = meshauth_policy::model::DEFAULT_MESH_NAMESPACE;
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:9090";
pub const DEFAULT_CLUSTER_NAME: &str = "kubernetes";
pub const DEFAULT_LEASE_NAME: &str = "meshauth-operator";
pub const DEFAULT_LEASE_DURATION_SECONDS: u64 = 15;
pub const DEFAULT_RESYNC_SECONDS: u64 = 60;
pub const DEFAULT_SPIRE_TIMEOUT_SECONDS: u64 = 10;

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting} {value:?}: {reason}")]
pub struct ConfigError {
    /// The flag and its environment variable.
    pub setting: &'static str,
    pub value: String,
    pub reason: String,
}

/// `meshauth-operator`: reconciles MeshPolicy and MutualAuth status and the node-scoped SPIRE
/// registration entries of the identities that need authentication.
#[derive(Debug, Clone, Parser)]
#[command(name = "meshauth-operator", version, about)]
pub struct Args {
    /// Kubeconfig to use; else in-cluster configuration or $KUBECONFIG.
    #[arg(long, env = "MESHAUTH_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The SPIRE server API socket.
    #[arg(long, env = "MESHAUTH_SPIRE_SERVER_SOCKET", value_name = "PATH", default_value = DEFAULT_SPIRE_SERVER_SOCKET)]
    pub spire_server_socket: PathBuf,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, env = "MESHAUTH_TRUST_DOMAIN", value_name = "TD", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Selector of the meshauth agent workload put on every entry (repeatable; the variable
    /// takes a comma-separated list).
    #[arg(long = "spire-entry-selector", env = "MESHAUTH_SPIRE_ENTRY_SELECTOR", value_name = "TYPE:VALUE",
          value_delimiter = ',', default_values_t = DEFAULT_ENTRY_SELECTORS.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub spire_entry_selectors: Vec<String>,
    /// X.509-SVID TTL of the entries, in seconds (0: the SPIRE server's default).
    #[arg(long, env = "MESHAUTH_SVID_TTL", value_name = "SECONDS", default_value_t = DEFAULT_SVID_TTL_SECONDS)]
    pub svid_ttl: u32,
    /// The operator's own namespace: its Lease, and where mesh-wide MutualAuths live.
    #[arg(long, env = "MESHAUTH_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Where to serve /metrics, /healthz and /readyz.
    #[arg(long, env = "MESHAUTH_METRICS_ADDR", value_name = "ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: String,
    /// The cluster name of SPIRE's k8s_psat node attestor, for agent IDs of nodes without the
    /// meshauth.io/spire-agent-id annotation.
    #[arg(long, env = "MESHAUTH_SPIRE_CLUSTER_NAME", default_value = DEFAULT_CLUSTER_NAME)]
    pub spire_cluster_name: String,
    /// Name of the leader-election Lease in the operator's namespace.
    #[arg(long, env = "MESHAUTH_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// How long a leader's lease lasts without renewal, in seconds.
    #[arg(long, env = "MESHAUTH_LEASE_DURATION", value_name = "SECONDS", default_value_t = DEFAULT_LEASE_DURATION_SECONDS)]
    pub lease_duration: u64,
    /// This replica's identity in the Lease; default: $POD_NAME, else hostname and process ID.
    #[arg(long, env = "MESHAUTH_LEADER_ID")]
    pub leader_id: Option<String>,
    /// Full resynchronisation interval (SPIRE listing and every status), in seconds.
    #[arg(long, env = "MESHAUTH_RESYNC_INTERVAL", value_name = "SECONDS", default_value_t = DEFAULT_RESYNC_SECONDS)]
    pub resync_interval: u64,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "MESHAUTH_LOG_JSON", default_value_t = false)]
    pub log_json: bool,
    /// Take each Node's meshauth.io/spire-agent-id annotation as it is. Without it an annotated
    /// agent must be one the SPIRE server attested with a k8s_psat selector naming the node
    /// (a node writes its own annotations); attestors that name no node, such as join tokens,
    /// need this.
    #[arg(long, env = "MESHAUTH_TRUST_NODE_AGENT_ANNOTATIONS", default_value_t = false)]
    pub trust_node_agent_annotations: bool,
    /// Pod IPs outside their node's spec.podCIDRs are no endpoints (no SPIRE entries). Set it
    /// to false for IPAMs that do not use the node CIDRs (Calico's, AWS VPC CNI), as on the agents.
    #[arg(long, env = "MESHAUTH_CHECK_NODE_POD_CIDRS", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub check_node_pod_cidrs: bool,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub kubeconfig: Option<PathBuf>,
    pub spire_server_socket: PathBuf,
    pub spire_timeout: Duration,
    pub entries: EntrySettings,
    pub namespace: String,
    pub metrics_addr: SocketAddr,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub leader_id: String,
    pub resync_interval: Duration,
    pub log_json: bool,
    /// Node agent annotations are not checked against SPIRE's attested agents.
    pub trust_node_agent_annotations: bool,
    /// Which pods are endpoints (the agents' setting of the same name must agree).
    pub endpoint_rules: meshauth_cluster::EndpointRules,
}

fn invalid(setting: &'static str, value: impl ToString, reason: impl ToString) -> ConfigError {
    ConfigError { setting, value: value.to_string(), reason: reason.to_string() }
}

impl Config {
    /// Validates parsed flags.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let trust_domain =
            TrustDomain::new(&args.trust_domain).map_err(|e| invalid("--trust-domain (MESHAUTH_TRUST_DOMAIN)", &args.trust_domain, e))?;
        let selectors = args
            .spire_entry_selectors
            .iter()
            .map(|s| Selector::parse(s.trim()).map_err(|e| invalid("--spire-entry-selector (MESHAUTH_SPIRE_ENTRY_SELECTOR)", s, e)))
            .collect::<Result<Vec<_>, _>>()?;
        if selectors.is_empty() {
            return Err(invalid("--spire-entry-selector (MESHAUTH_SPIRE_ENTRY_SELECTOR)", "", "at least one selector is needed"));
        }
        let x509_svid_ttl = i32::try_from(args.svid_ttl)
            .map_err(|_| invalid("--svid-ttl (MESHAUTH_SVID_TTL)", args.svid_ttl, "must be at most 2147483647"))?;
        if args.spire_server_socket.as_os_str().is_empty() {
            return Err(invalid("--spire-server-socket (MESHAUTH_SPIRE_SERVER_SOCKET)", "", "must not be empty"));
        }
        if !is_dns_label(&args.namespace) {
            return Err(invalid("--namespace (MESHAUTH_NAMESPACE)", &args.namespace, "must be a Kubernetes namespace name"));
        }
        let metrics_addr: SocketAddr =
            args.metrics_addr.parse().map_err(|e| invalid("--metrics-addr (MESHAUTH_METRICS_ADDR)", &args.metrics_addr, e))?;
        if args.spire_cluster_name.is_empty() || args.spire_cluster_name.contains('/') {
            return Err(invalid(
                "--spire-cluster-name (MESHAUTH_SPIRE_CLUSTER_NAME)",
                &args.spire_cluster_name,
                "must be a non-empty name without '/'",
            ));
        }
        if args.lease_duration < 3 {
            return Err(invalid("--lease-duration (MESHAUTH_LEASE_DURATION)", args.lease_duration, "must be at least 3 seconds"));
        }
        if args.resync_interval == 0 {
            return Err(invalid("--resync-interval (MESHAUTH_RESYNC_INTERVAL)", 0, "must be at least 1 second"));
        }
        let leader_id = match args.leader_id.filter(|s| !s.is_empty()) {
            Some(id) => id,
            None => default_leader_id(),
        };
        Ok(Self {
            kubeconfig: args.kubeconfig,
            spire_server_socket: args.spire_server_socket,
            spire_timeout: Duration::from_secs(DEFAULT_SPIRE_TIMEOUT_SECONDS),
            entries: EntrySettings { trust_domain, cluster_name: args.spire_cluster_name, selectors, x509_svid_ttl },
            namespace: args.namespace,
            metrics_addr,
            lease_name: args.lease_name,
            lease_duration: Duration::from_secs(args.lease_duration),
            leader_id,
            resync_interval: Duration::from_secs(args.resync_interval),
            log_json: args.log_json,
            trust_node_agent_annotations: args.trust_node_agent_annotations,
            endpoint_rules: meshauth_cluster::EndpointRules {
                check_node_pod_cidrs: args.check_node_pod_cidrs,
                ..meshauth_cluster::EndpointRules::default()
            },
        })
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn default_leader_id() -> String {
    if let Ok(pod) = std::env::var("POD_NAME")
        && !pod.is_empty()
    {
        return pod;
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "meshauth-operator".to_owned() } else { host };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let args = Args::try_parse_from(std::iter::once("meshauth-operator").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        Config::from_args(args).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_those_of_the_issue() {
        let c = parse(&[]).expect("defaults are valid");
        assert_eq!(c.entries.trust_domain.as_str(), "cluster.local");
        let sel: Vec<String> = c.entries.selectors.iter().map(ToString::to_string).collect();
        assert_eq!(sel, vec!["k8s:ns:meshauth-system", "k8s:sa:meshauth-agent"]);
        assert_eq!(c.namespace, "meshauth-system");
        assert_eq!(c.entries.x509_svid_ttl, 3600);
        assert_eq!(c.lease_duration, Duration::from_secs(15));
        assert!(!c.trust_node_agent_annotations, "annotations are checked unless opted out");
        assert!(parse(&["--trust-node-agent-annotations"]).expect("valid").trust_node_agent_annotations);
        assert!(c.endpoint_rules.check_node_pod_cidrs);
        assert!(!parse(&["--check-node-pod-cidrs", "false"]).expect("valid").endpoint_rules.check_node_pod_cidrs);
        let e = parse(&["--check-node-pod-cidrs", "maybe"]).expect_err("invalid");
        assert!(e.contains("--check-node-pod-cidrs"), "{e}");
    }

    #[test]
    fn flags_repeat_and_errors_name_the_setting() {
        let c =
            parse(&["--spire-entry-selector", "unix:uid:0", "--spire-entry-selector", "unix:gid:0", "--svid-ttl", "60"]).expect("valid");
        assert_eq!(c.entries.selectors.len(), 2);
        assert_eq!(c.entries.x509_svid_ttl, 60);
        let e = parse(&["--trust-domain", "Bad.Domain"]).expect_err("invalid");
        assert!(e.contains("--trust-domain") && e.contains("MESHAUTH_TRUST_DOMAIN") && e.contains("Bad.Domain"), "{e}");
        let e = parse(&["--spire-entry-selector", "nocolon"]).expect_err("invalid");
        assert!(e.contains("--spire-entry-selector"), "{e}");
        let e = parse(&["--metrics-addr", "here"]).expect_err("invalid");
        assert!(e.contains("--metrics-addr"), "{e}");
        let e = parse(&["--svid-ttl=abc"]).expect_err("invalid");
        assert!(e.contains("--svid-ttl"), "{e}");
    }
}
