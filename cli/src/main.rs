//! `sluice`: the operator's command line. `sluice dev` runs limiter-svc and queue-svc in one
//! process on the embedded store — the one command a newcomer needs; `sluice limit` and
//! `sluice queue` talk to running services (see `ops`); `sluice key` makes API keys.

mod ops;

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
    #[command(flatten)]
    remote: ops::Remote,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run limiter-svc and queue-svc together in this process. Without --redis-url they use
    /// the embedded in-process store: nothing else to install.
    Dev(DevArgs),
    /// API keys for services with auth on (`--auth-keys FILE`).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Check, read or reset a limit on a running limiter-svc.
    #[command(subcommand)]
    Limit(ops::LimitCommand),
    /// Enqueue, inspect and cancel tasks; stats, pause, workers and dead letters of a running
    /// queue-svc.
    #[command(subcommand)]
    Queue(ops::QueueCommand),
}

#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make a new random API key: prints the key on stderr (give it to the caller; it is not
    /// stored anywhere) and on stdout the keys-file entry that admits it (append it to the
    /// services' file).
    New(NewKeyArgs),
    /// Print the SHA-256 of a key read from standard input, as a keys file lists it.
    Hash,
}

#[derive(Debug, clap::Args)]
struct NewKeyArgs {
    /// Name of the credentials, shown in logs and in PERMISSION_DENIED messages.
    #[arg(long)]
    name: String,
    /// Roles the key holds: producer, worker, admin (repeat or comma-separate).
    #[arg(long = "role", required = true, value_delimiter = ',', value_parser = ["producer", "worker", "admin"])]
    roles: Vec<String>,
    /// Projects the key may touch (repeat or comma-separate); "*" for every project.
    #[arg(long = "project", required = true, value_delimiter = ',')]
    projects: Vec<String>,
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
    /// API keys file for both services (see `sluice key new`); absent: auth off, every caller
    /// holds every role (the listen addresses default to loopback).
    #[arg(long, env = "SLUICE_AUTH_KEYS", value_name = "FILE")]
    auth_keys: Option<std::path::PathBuf>,
    /// Bound on draining in-flight calls after SIGTERM/SIGINT.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    shutdown_grace: std::time::Duration,
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(err) => {
            // A refused call prints as its code and the server's message, which says what to
            // change.
            match err.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {err:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.command {
        Command::Dev(args) => dev(args).await?,
        Command::Key(KeyCommand::New(args)) => new_key(&args)?,
        Command::Key(KeyCommand::Hash) => {
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            println!("{}", sluice::auth::key_hash(key.trim()));
        }
        Command::Limit(command) => {
            if !ops::limit(&cli.remote, command).await? {
                return Ok(std::process::ExitCode::from(ops::DENIED_EXIT));
            }
        }
        Command::Queue(command) => ops::queue(&cli.remote, command).await?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Prints a new key and the keys-file entry that admits it.
fn new_key(args: &NewKeyArgs) -> anyhow::Result<()> {
    let (key, hash) = sluice::auth::new_key()?;
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let entry = format!(
        "[[keys]]\nname = {:?}\nsha256 = \"{hash}\"\nroles = [{}]\nprojects = [{}]\n",
        args.name,
        list(&args.roles),
        list(&args.projects)
    );
    // Read back as the services will: an entry they would refuse is not printed.
    sluice::auth::check_keys_file(&entry).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The key on stderr, the entry on stdout: `sluice key new … >> keys.toml` keeps the
    // plaintext key out of the file the services read.
    eprintln!("the key (give it to the caller; it is shown only now and stored nowhere):");
    eprintln!("{key}");
    print!("{entry}");
    Ok(())
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
            match &args.auth_keys {
                Some(path) => argv.push(format!("--auth-keys={}", path.display())),
                None => argv.push("--no-auth".to_owned()),
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
