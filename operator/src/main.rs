//! `meshauth-operator`: parses the configuration, sets up logging and runs [`meshauth_operator::app::run`].

use anyhow::Context as _;
use clap::Parser as _;
use meshauth_operator::config::{Args, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse()).context("configuration")?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if config.log_json {
        tracing_subscriber::fmt().json().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    meshauth_operator::app::run(config).await?;
    Ok(())
}
