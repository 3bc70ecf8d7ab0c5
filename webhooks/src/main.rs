//! `meshauth-webhook --listen ADDR --tls-cert FILE --tls-key FILE`, or with `--cert-secret
//! NAMESPACE/NAME` for a self-managed certificate. See `--help`.

use anyhow::Context;
use clap::Parser;
use meshauth_webhook::Webhook;
use meshauth_webhook::config::{Args, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Args::parse().into_config()?;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format {
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let webhook = Webhook::start(config).await.context("cannot start the webhook")?;
    shutdown_signal().await?;
    tracing::info!("shutting down");
    webhook.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
