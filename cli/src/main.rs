//! `meshauthctl`: argument parsing and dispatch only; each subcommand lives in the library.

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshauth_crds::TrustDomain;
use meshauth_policy::tables::TableProtocol;
use meshauthctl::datapath::{self as datapath_cli, OutputFormat};
use meshauthctl::demo::{self, DemoOptions};
use meshauthctl::explain;
use meshauthctl::observe;
use meshauthctl::policy_check::{self, CheckRequest, Output};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "meshauthctl", version, about = "Sidecar-less mutual authentication for Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline policy questions.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// X.509-SVID tools.
    Svid {
        #[command(subcommand)]
        command: SvidCommand,
    },
    /// What this node's auth map holds.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
    },
    /// This node's datapath: endpoints, interfaces, counters by reason.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
    },
    /// Why a packet from one pod to another is allowed or dropped: the MeshPolicy rule and the
    /// MutualAuth by name and, live, the pair's proofs on this node. Exit status 0 allow,
    /// 1 deny, 2 no answer.
    Explain {
        #[command(flatten)]
        packet: PacketArgs,
        /// Decide offline from this directory of manifests instead of asking this node's agent.
        #[arg(long, conflicts_with = "agent")]
        manifests: Option<PathBuf>,
        /// This node's agent: its metrics address (it answers loopback clients only).
        #[arg(long, default_value = "127.0.0.1:4251")]
        agent: std::net::SocketAddr,
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
        /// The mesh's trust domain (offline).
        #[arg(long, default_value = meshauth_crds::DEFAULT_TRUST_DOMAIN, value_parser = parse_trust_domain)]
        trust_domain: TrustDomain,
        /// Where mesh-wide MutualAuths live (offline).
        #[arg(long, default_value = meshauth_policy::model::DEFAULT_MESH_NAMESPACE)]
        mesh_namespace: String,
    },
    /// The datapath's verdicts on this node with names (pods, identities, reason, rule), from
    /// this node's agent: drops, and what Permissive lets through that Strict would drop.
    Observe {
        /// This node's agent: its metrics address (it answers loopback clients only).
        #[arg(long, default_value = "127.0.0.1:4251")]
        agent: std::net::SocketAddr,
        /// DROPPED, PERMISSIVE, AUDIT or FORWARDED (sampled passes).
        #[arg(long)]
        verdict: Option<String>,
        /// A reason, as `meshauthctl status` names them (drop_auth_missing or auth_missing).
        #[arg(long)]
        reason: Option<String>,
        /// Either end's namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Either end, NS/POD.
        #[arg(long)]
        pod: Option<String>,
        /// Either end's SPIFFE ID.
        #[arg(long)]
        identity: Option<String>,
        /// Only records younger than this (30s, 5m, 2h).
        #[arg(long)]
        since: Option<String>,
        /// The newest N matching records the agent holds.
        #[arg(long)]
        last: Option<usize>,
        /// Then keep printing new ones.
        #[arg(long, short)]
        follow: bool,
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// A mesh in a box: two nodes and five pods as network namespaces, real agents and
    /// datapath, live checks and a summary (root).
    #[command(args_conflicts_with_subcommands = true)]
    Demo {
        #[command(subcommand)]
        action: Option<DemoAction>,
        /// Directory for logs and state (default: a new one under the temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the nodes, pods and agents running afterwards, and print how to reach them.
        #[arg(long)]
        keep: bool,
        /// The meshauth-agent binary (default: next to meshauthctl, else on PATH).
        #[arg(long)]
        agent_bin: Option<PathBuf>,
        /// SVID lifetime in seconds (a rotation happens during the demo).
        #[arg(long, default_value_t = 8)]
        svid_ttl: u64,
    },
}

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/meshauth";

#[derive(Subcommand)]
enum DemoAction {
    /// Remove a mesh that `demo --keep` left running: its agents, issuers, namespaces, pins.
    Down {
        /// The kept demo's directory (as `demo --keep` printed it).
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum SvidCommand {
    /// Validate an X.509-SVID chain (leaf first) per the SPIFFE X509-SVID spec.
    Verify {
        /// PEM trust bundle of the trust domain.
        #[arg(long)]
        bundle: PathBuf,
        /// Require this trust domain.
        #[arg(long)]
        trust_domain: Option<String>,
        /// PEM chain, leaf first.
        chain: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Authenticated pairs with their remaining lifetime.
    List {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// ns/packet of the TC program through BPF_PROG_TEST_RUN, against an empty program.
    Datapath {
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Decide, from YAML manifests, what the datapath would do for one packet.
    Check {
        /// Directory of manifests: Namespaces, Pods, MeshPolicies, MutualAuths.
        #[arg(long)]
        manifests: PathBuf,
        #[command(flatten)]
        packet: PacketArgs,
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
        /// The mesh's trust domain.
        #[arg(long, default_value = meshauth_crds::DEFAULT_TRUST_DOMAIN, value_parser = parse_trust_domain)]
        trust_domain: TrustDomain,
        /// Where mesh-wide MutualAuths live.
        #[arg(long, default_value = meshauth_policy::model::DEFAULT_MESH_NAMESPACE)]
        mesh_namespace: String,
    },
}

/// One kind of packet between two pods.
#[derive(Args)]
struct PacketArgs {
    /// Source pod, NS/POD.
    #[arg(long)]
    from: String,
    /// Destination pod, NS/POD.
    #[arg(long)]
    to: String,
    /// Destination port.
    #[arg(long)]
    port: u16,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Tcp, ignore_case = true)]
    protocol: ProtocolArg,
}

impl PacketArgs {
    fn request(self, manifests: PathBuf, trust_domain: TrustDomain, mesh_namespace: String) -> CheckRequest {
        CheckRequest {
            manifests,
            from: self.from,
            to: self.to,
            port: self.port,
            protocol: match self.protocol {
                ProtocolArg::Tcp => TableProtocol::Tcp,
                ProtocolArg::Udp => TableProtocol::Udp,
            },
            trust_domain,
            mesh_namespace,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    #[value(name = "TCP")]
    Tcp,
    #[value(name = "UDP")]
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputArg {
    Table,
    Json,
}

impl From<OutputArg> for OutputFormat {
    fn from(o: OutputArg) -> Self {
        match o {
            OutputArg::Table => OutputFormat::Table,
            OutputArg::Json => OutputFormat::Json,
        }
    }
}

impl From<OutputArg> for Output {
    fn from(o: OutputArg) -> Self {
        match o {
            OutputArg::Table => Output::Table,
            OutputArg::Json => Output::Json,
        }
    }
}

fn parse_trust_domain(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| format!("trust domain {s:?} {e}"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Observe { agent, verdict, reason, namespace, pod, identity, since, last, follow, output } => {
            let since = match since.as_deref().map(observe::parse_duration).transpose() {
                Ok(since) => since,
                Err(e) => {
                    eprintln!("meshauthctl observe: --since {e}");
                    return ExitCode::from(2);
                }
            };
            let req = observe::Request {
                agent,
                filter: observe::Filter { verdict, reason, namespace, pod, identity, since },
                last,
                follow,
                format: match output {
                    OutputArg::Table => observe::Format::Table,
                    OutputArg::Json => observe::Format::Json,
                },
            };
            match observe::observe(&req, &mut std::io::stdout().lock()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshauthctl observe: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Explain { packet, manifests, agent, output, trust_domain, mesh_namespace } => {
            let target = match &manifests {
                Some(dir) => explain::Target::Manifests(dir.clone()),
                None => explain::Target::Agent(agent),
            };
            let req = packet.request(manifests.unwrap_or_default(), trust_domain, mesh_namespace);
            match explain::explain(&req, &target) {
                Ok(report) => {
                    match output {
                        OutputArg::Json => println!("{report}"),
                        OutputArg::Table => print!("{}", explain::render_table(&report)),
                    }
                    if explain::allows(&report) { ExitCode::SUCCESS } else { ExitCode::from(1) }
                }
                Err(e) => {
                    eprintln!("meshauthctl explain: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Policy { command: PolicyCommand::Check { manifests, packet, output, trust_domain, mesh_namespace } } => {
            let req = packet.request(manifests, trust_domain, mesh_namespace);
            match policy_check::check(&req) {
                Ok(result) => {
                    print!("{}", policy_check::render(&req, &result, output.into()));
                    if matches!(output, OutputArg::Json) {
                        println!();
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("meshauthctl policy check: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Svid { command: SvidCommand::Verify { bundle, trust_domain, chain } } => {
            ExitCode::from(meshauthctl::svid_verify::svid_verify(&bundle, &chain, trust_domain.as_deref()))
        }
        Command::Auth { command: AuthCommand::List { pin_dir, output } } => {
            report("auth list", datapath_cli::auth_list(&pin_dir, output.into(), &mut std::io::stdout()))
        }
        Command::Status { pin_dir, output } => report("status", datapath_cli::status(&pin_dir, output.into(), &mut std::io::stdout())),
        Command::Bench { command: BenchCommand::Datapath { output } } => {
            report("bench datapath", datapath_cli::bench_datapath(&Default::default(), output.into(), &mut std::io::stdout()).map(|_| ()))
        }
        Command::Demo { action: Some(DemoAction::Down { dir }), .. } => match demo::mesh::take_down(&dir) {
            Ok(kept) => {
                println!(
                    "took down the kept mesh: {} processes, {} network namespaces, {} pin directories",
                    kept.processes.len(),
                    kept.namespaces.len(),
                    kept.pin_roots.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshauthctl demo down: {e}");
                ExitCode::from(2)
            }
        },
        Command::Demo { action: None, dir, keep, agent_bin, svid_ttl } => {
            let mut options = DemoOptions { agent_bin, svid_ttl: std::time::Duration::from_secs(svid_ttl), keep, ..DemoOptions::default() };
            if let Some(dir) = dir {
                options.dir = dir;
            }
            match demo::run(options, &mut std::io::stdout()) {
                Ok(checks) if checks.iter().all(|c| c.passed) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("meshauthctl demo: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn report<E: std::fmt::Display>(what: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshauthctl {what}: {e}");
            ExitCode::from(2)
        }
    }
}
