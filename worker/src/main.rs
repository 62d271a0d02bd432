//! sluice-worker binary. `sluice-worker check` verifies that queue-svc is reachable and
//! serving; running handlers from configuration arrives with the `Lease` stream.

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Sluice worker.
#[derive(Debug, Parser)]
#[command(name = "sluice-worker", version)]
struct Cli {
    /// queue-svc's gRPC URL.
    #[arg(
        long,
        env = "SLUICE_QUEUE_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    queue_url: String,
    /// Bound on connecting to queue-svc.
    #[arg(long, default_value = "5s", value_parser = sluice::config::parse_duration, global = true)]
    connect_timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to queue-svc and report its gRPC health; exits non-zero unless SERVING.
    Check,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check => {
            let status = sluice_worker::health(&cli.queue_url, cli.connect_timeout).await?;
            println!("{}: {status}", cli.queue_url);
            anyhow::ensure!(status == "SERVING", "queue-svc is not serving");
            Ok(())
        }
    }
}
