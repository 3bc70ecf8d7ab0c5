//! `meshauthctl`: argument parsing and dispatch only; each subcommand lives in the library.

use clap::{Parser, Subcommand, ValueEnum};
use meshauth_crds::TrustDomain;
use meshauth_policy::tables::TableProtocol;
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
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Decide, from YAML manifests, what the datapath would do for one packet.
    Check {
        /// Directory of manifests: Namespaces, Pods, MeshPolicies, MutualAuths.
        #[arg(long)]
        manifests: PathBuf,
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
        #[arg(long, value_enum, default_value_t = OutputArg::Table)]
        output: OutputArg,
        /// The mesh's trust domain.
        #[arg(long, default_value = "cluster.local", value_parser = parse_trust_domain)]
        trust_domain: TrustDomain,
        /// Where mesh-wide MutualAuths live.
        #[arg(long, default_value = meshauth_policy::model::DEFAULT_MESH_NAMESPACE)]
        mesh_namespace: String,
    },
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
        Command::Policy { command: PolicyCommand::Check { manifests, from, to, port, protocol, output, trust_domain, mesh_namespace } } => {
            let req = CheckRequest {
                manifests,
                from,
                to,
                port,
                protocol: match protocol {
                    ProtocolArg::Tcp => TableProtocol::Tcp,
                    ProtocolArg::Udp => TableProtocol::Udp,
                },
                trust_domain,
                mesh_namespace,
            };
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
    }
}
