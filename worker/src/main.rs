//! sluice-worker: run tasks from queue-svc. `sluice-worker run … -- COMMAND ARGS…` runs a
//! command per task (exec mode); `sluice-worker check` verifies queue-svc is serving.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sluice::config::{TelemetryArgs, parse_duration};
use sluice_worker::exec::Exec;
use sluice_worker::{Options, Transport};

/// Sluice worker.
#[derive(Debug, Parser)]
#[command(name = "sluice-worker", version)]
struct Cli {
    /// queue-svc's gRPC URL; several, comma-separated, for failover (a lost stream
    /// reconnects to the next).
    #[arg(
        long,
        env = "SLUICE_QUEUE_URL",
        default_value = "http://127.0.0.1:50052",
        value_delimiter = ',',
        global = true
    )]
    queue_url: Vec<String>,
    /// Bound on connecting to queue-svc.
    #[arg(long, env = "SLUICE_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration, global = true)]
    connect_timeout: Duration,
    #[command(flatten)]
    client: sluice::config::ClientArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to queue-svc and report its gRPC health; exits non-zero unless SERVING.
    Check,
    /// Lease tasks and run COMMAND for each: payload on stdin, metadata in SLUICE_TASK_*
    /// variables; exit 0 completes with stdout as the result, the permanent exit code
    /// dead-letters, any other exit is retried by the queue's policy.
    Run(Box<RunArgs>),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Project of the queues.
    #[arg(long, env = "SLUICE_PROJECT")]
    project: String,
    /// Queue to consume (repeat for several).
    #[arg(
        long = "queue",
        env = "SLUICE_QUEUES",
        value_delimiter = ',',
        required = true
    )]
    queues: Vec<String>,
    /// Tasks run at once.
    #[arg(long, env = "SLUICE_CONCURRENCY", default_value_t = 4)]
    concurrency: u32,
    /// Worker id shown in ListWorkers (default: host-pid).
    #[arg(long, env = "SLUICE_WORKER_ID")]
    worker_id: Option<String>,
    /// Lease length; heartbeats renew it every third of it.
    #[arg(long, env = "SLUICE_LEASE", default_value = "60s", value_parser = parse_duration)]
    lease: Duration,
    /// A task running longer fails with category timeout (its process is killed).
    #[arg(long, env = "SLUICE_TASK_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    task_timeout: Duration,
    /// On SIGTERM, how long running tasks may take to finish; the rest are given back.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Exit code of COMMAND that means "never retry" (the task is dead-lettered).
    #[arg(long, env = "SLUICE_PERMANENT_EXIT_CODE", default_value_t = 3)]
    permanent_exit_code: i32,
    /// HTTP address for GET /metrics and /healthz; unset: none.
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let transport = transport(&cli)?;
    match cli.command {
        Command::Check => {
            let mut all_serving = true;
            for url in &cli.queue_url {
                let status = sluice_worker::health(url, &transport).await?;
                println!("{url}: {status}");
                all_serving &= status == "SERVING";
            }
            anyhow::ensure!(all_serving, "queue-svc is not serving");
            Ok(())
        }
        Command::Run(args) => run(cli.queue_url, transport, *args).await,
    }
}

/// `host-pid`: the machine's (or the pod's) host name and this process's id, so replicas that
/// all run as pid 1 in their containers still differ; `worker-pid` where no name is found.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        // A worker id is at most 128 bytes of A-Z a-z 0-9 _ . -.
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 100
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        })
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

/// How to reach queue-svc, from the options every subcommand shares.
fn transport(cli: &Cli) -> anyhow::Result<Transport> {
    Ok(Transport {
        connect_timeout: cli.connect_timeout,
        credentials: cli.client.credentials()?,
        tls: cli.client.tls(cli.queue_url.iter().map(String::as_str))?,
    })
}

async fn run(urls: Vec<String>, transport: Transport, args: RunArgs) -> anyhow::Result<()> {
    let telemetry = sluice::telemetry::init("sluice-worker", &args.telemetry)?;
    let shutdown = sluice::shutdown::on_signal();
    let result = async {
        let metrics = match args.metrics_listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
                tracing::info!(metrics = %listener.local_addr()?, "metrics listening");
                Some(tokio::spawn(sluice::server::serve_metrics(
                    listener,
                    shutdown.clone(),
                )))
            }
            None => None,
        };
        let (program, rest) = args
            .command
            .split_first()
            .ok_or_else(|| anyhow::anyhow!("COMMAND is required after --"))?;
        let handler = Arc::new(Exec {
            program: program.clone(),
            args: rest.to_vec(),
            permanent_exit_code: args.permanent_exit_code,
        });
        let options = Options {
            urls,
            project: args.project,
            queues: args.queues,
            worker_id: args.worker_id.unwrap_or_else(default_worker_id),
            concurrency: args.concurrency,
            lease: args.lease,
            task_timeout: args.task_timeout,
            drain: args.drain_timeout,
            transport,
        };
        sluice_worker::run(options, handler, shutdown.clone()).await?;
        shutdown.cancel();
        if let Some(metrics) = metrics {
            metrics.await??;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = &result {
        tracing::error!(error = %err, "sluice-worker failed");
    }
    telemetry.shutdown().await;
    result
}
