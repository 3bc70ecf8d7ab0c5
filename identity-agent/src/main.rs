//! `meshauth-agent`: argument parsing, logging set-up and dispatch only.

use clap::{Parser, Subcommand, ValueEnum};
use meshauth_agent::config::{self, AgentConfig};
use meshauth_agent::dev_issuer::{DevIssuer, DevIssuerConfig};
use meshauth_agent::inputs;
use meshauth_crds::{SpiffeId, TrustDomain};
use meshauth_datapath::DatapathConfig;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "meshauth-agent", version, about = "meshauth per-node identity agent")]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "MESHAUTH_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent. Every flag can also be set as MESHAUTH_<FLAG>.
    Run {
        /// The node this agent runs on (env MESHAUTH_NODE_NAME).
        #[arg(long)]
        node_name: Option<String>,
        /// Read the cluster from this manifest directory instead of the Kubernetes API.
        #[arg(long)]
        manifests: Option<String>,
        /// Handshake listen address (default 0.0.0.0:4250).
        #[arg(long)]
        listen: Option<String>,
        /// /metrics and /healthz address (default 0.0.0.0:4251).
        #[arg(long)]
        metrics_addr: Option<String>,
        /// SPIFFE Workload API socket.
        #[arg(long)]
        workload_api_socket: Option<String>,
        /// Directory that survives restarts.
        #[arg(long)]
        state_dir: Option<String>,
        #[arg(long)]
        trust_domain: Option<String>,
        #[arg(long)]
        mesh_namespace: Option<String>,
        /// BPF pin directory (default /sys/fs/bpf/meshauth).
        #[arg(long)]
        pin_dir: Option<String>,
    },
    /// Chain meshauth-cni into the node's CNI configuration (the DaemonSet's init container).
    CniInstall {
        /// The plugin binary to install.
        #[arg(long, default_value = "/usr/local/bin/meshauth-cni")]
        plugin: PathBuf,
        #[arg(long, default_value = meshauth_agent::cni_install::DEFAULT_BIN_DIR, env = "MESHAUTH_CNI_BIN_DIR")]
        bin_dir: PathBuf,
        #[arg(long, default_value = meshauth_agent::cni_install::DEFAULT_CONF_DIR, env = "MESHAUTH_CNI_CONF_DIR")]
        conf_dir: PathBuf,
        /// The agent's CNI socket, written into the plugin's configuration.
        #[arg(long, default_value = meshauth_agent::config::DEFAULT_CNI_SOCKET, env = "MESHAUTH_CNI_SOCKET")]
        socket: String,
    },
    /// Take meshauth-cni out of the node's CNI configuration again.
    CniUninstall {
        #[arg(long, default_value = meshauth_agent::cni_install::DEFAULT_BIN_DIR, env = "MESHAUTH_CNI_BIN_DIR")]
        bin_dir: PathBuf,
        #[arg(long, default_value = meshauth_agent::cni_install::DEFAULT_CONF_DIR, env = "MESHAUTH_CNI_CONF_DIR")]
        conf_dir: PathBuf,
    },
    /// Serve the SPIFFE Workload API from a local development CA (no SPIRE needed).
    DevIssuer {
        /// Unix socket to serve on.
        #[arg(long)]
        socket: PathBuf,
        /// Keeps the CA across restarts.
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long, default_value = meshauth_crds::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// SVID lifetime in seconds; SVIDs rotate at half of it.
        #[arg(long, default_value_t = 3600)]
        svid_ttl: u64,
        /// An identity to issue (repeatable).
        #[arg(long = "identity")]
        identities: Vec<String>,
        /// Also issue the identities of the pods of `--node` in this manifest directory,
        /// following changes.
        #[arg(long, requires = "node")]
        manifests: Option<PathBuf>,
        #[arg(long)]
        node: Option<String>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist: the allocator's arenas are set once.
    meshauth_agent::heap::configure();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run {
            node_name,
            manifests,
            listen,
            metrics_addr,
            workload_api_socket,
            state_dir,
            trust_domain,
            mesh_namespace,
            pin_dir,
        } => {
            // Flags win over the environment.
            let flags: HashMap<&str, String> = [
                (config::MANIFESTS, manifests),
                (config::LISTEN, listen),
                (config::METRICS_ADDR, metrics_addr),
                (config::WORKLOAD_API_SOCKET, workload_api_socket),
                (config::STATE_DIR, state_dir),
                (config::TRUST_DOMAIN, trust_domain),
                (config::MESH_NAMESPACE, mesh_namespace),
                (meshauth_datapath::config::PIN_DIR, pin_dir),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
            let lookup = |k: &str| flags.get(k).cloned().or_else(|| std::env::var(k).ok());
            let node_name = node_name.or_else(|| std::env::var("NODE_NAME").ok());
            let agent = AgentConfig::from_lookup(node_name, lookup)?;
            let datapath = DatapathConfig::from_lookup(lookup)?;
            meshauth_agent::node_agent::run(agent, datapath).await?;
        }
        Command::CniInstall { plugin, bin_dir, conf_dir, socket } => {
            let list = meshauth_agent::cni_install::install(&plugin, &bin_dir, &conf_dir, &socket)?;
            tracing::info!(conflist = %list.display(), "meshauth-cni chained last");
        }
        Command::CniUninstall { bin_dir, conf_dir } => {
            let changed = meshauth_agent::cni_install::uninstall(&bin_dir, &conf_dir)?;
            tracing::info!(?changed, "meshauth-cni taken out of the CNI configuration");
        }
        Command::DevIssuer { socket, state_dir, trust_domain, svid_ttl, identities, manifests, node } => {
            let trust_domain = TrustDomain::new(&trust_domain).map_err(|e| anyhow::anyhow!("--trust-domain {trust_domain:?} {e}"))?;
            let fixed = identities
                .iter()
                .map(|i| SpiffeId::parse(i).map_err(|e| anyhow::anyhow!("--identity {i:?} {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            let mut config = DevIssuerConfig::new(socket.clone(), state_dir);
            config.trust_domain = trust_domain.clone();
            config.svid_ttl = Duration::from_secs(svid_ttl);
            config.identities = fixed.clone();
            let issuer = DevIssuer::start(&config)?;
            if let (Some(dir), Some(node)) = (manifests, node) {
                let mut snapshots = inputs::watch_dir(dir, Duration::from_millis(500))?;
                let issuer = issuer.clone();
                let set = move |s: &inputs::Snapshot| {
                    let mut ids = fixed.clone();
                    ids.extend(s.node_identities(&node, &trust_domain));
                    ids.sort();
                    ids.dedup();
                    if let Err(error) = issuer.set_identities(ids) {
                        tracing::error!(%error, "cannot issue the node's identities");
                    }
                };
                set(&snapshots.borrow_and_update());
                tokio::spawn(async move {
                    while snapshots.changed().await.is_ok() {
                        set(&snapshots.borrow_and_update());
                    }
                });
            }
            tracing::info!(socket = %socket.display(), "dev issuer serving the SPIFFE Workload API");
            tokio::select! {
                served = issuer.serve(&socket) => served?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
    }
    Ok(())
}
