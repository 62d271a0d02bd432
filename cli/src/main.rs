//! `sluice`: the operator's command line. `sluice dev` runs limiter-svc and queue-svc in one
//! process on the embedded store — the one command a newcomer needs.

use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use sluice::config::{AFTER_HELP, TelemetryArgs, parse_duration};
use sluice::server::Listeners;

/// Sluice command line.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run limiter-svc and queue-svc together in this process. Without --redis-url they use
    /// the embedded in-process store: nothing else to install.
    Dev(DevArgs),
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    /// gRPC address of the limiter.
    #[arg(long, env = "SLUICE_LIMITER_LISTEN", default_value = "127.0.0.1:50051")]
    limiter_listen: SocketAddr,
    /// /metrics address of the limiter.
    #[arg(
        long,
        env = "SLUICE_LIMITER_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    limiter_metrics_listen: SocketAddr,
    /// gRPC address of the queue.
    #[arg(long, env = "SLUICE_QUEUE_LISTEN", default_value = "127.0.0.1:50052")]
    queue_listen: SocketAddr,
    /// /metrics address of the queue (both services share one process, so one registry:
    /// each endpoint shows every metric).
    #[arg(
        long,
        env = "SLUICE_QUEUE_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    queue_metrics_listen: SocketAddr,
    /// Redis URL shared by both services; absent: the embedded store.
    #[arg(long, env = "SLUICE_REDIS_URL", value_name = "URL")]
    redis_url: Option<String>,
    /// Bound on draining in-flight calls after SIGTERM/SIGINT.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: std::time::Duration,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev(args) => dev(args).await,
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    let telemetry = sluice::telemetry::init("sluice-dev", &args.telemetry)?;
    let shutdown = sluice::shutdown::on_signal();
    let result = async {
        let service_args = |listen: SocketAddr, metrics: SocketAddr| {
            let mut argv = vec![
                "sluice-dev".to_owned(),
                format!("--listen={listen}"),
                format!("--metrics-listen={metrics}"),
                format!("--shutdown-grace={}ms", args.shutdown_grace.as_millis()),
            ];
            if let Some(url) = &args.redis_url {
                argv.push(format!("--redis-url={url}"));
            }
            argv
        };
        let limiter = limiter_svc::Config::from_args(service_args(
            args.limiter_listen,
            args.limiter_metrics_listen,
        ))?;
        let queue = queue_svc::Config::from_args(service_args(
            args.queue_listen,
            args.queue_metrics_listen,
        ))?;
        let limiter_listeners = Listeners::bind(&limiter.common.server).await?;
        let queue_listeners = Listeners::bind(&queue.common.server).await?;
        tokio::try_join!(
            limiter_svc::run(limiter_listeners, limiter, shutdown.clone()),
            queue_svc::run(queue_listeners, queue, shutdown.clone()),
        )
        .map(|_| ())
    }
    .await;
    if let Err(err) = &result {
        tracing::error!(error = %err, "sluice dev failed");
    }
    telemetry.shutdown().await;
    result
}
