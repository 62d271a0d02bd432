//! `sluice-bench`: a load generator for Sluice's gRPC services.
//!
//! Modules:
//!
//! - [`driver`]: what every workload shares: the connections, the closed loop (`--concurrency`)
//!   and the open loop (`--rate`), warm-up, the per-second progress line;
//! - [`conn`]: the HTTP/2 connection unary calls go over (h2 directly, under tonic's clients);
//! - [`report`]: counts and the latency histogram, printed as a block of text and a JSON line;
//! - [`limiter`]: the `check-limit` workload (`sluice.limiter.v1.Limiter/CheckLimit`);
//! - [`envoy`]: the `should-rate-limit` workload (Envoy's `RateLimitService/ShouldRateLimit`);
//! - [`queue`]: the task queue's `enqueue`, `enqueue-batch`, `drain` and `cycle` workloads
//!   (`sluice.queue.v1.Queue`), which count tasks as well as requests;
//! - [`lease`]: the Lease stream's `lease-drain` and `push-latency` workloads, which run
//!   long-lived worker streams instead of the driver's request loop but report the same way;
//! - [`redis_info`]: `--redis-url`, Redis CPU time and commands per task over a run.
//!
//! A run flows: parse the subcommand → build its [`driver::Workload`] → [`driver::run`] calls it
//! once per request with a sequence number and a connection → [`report::Report`].
//!
//! A new workload is one more module implementing [`driver::Workload`] and one more variant of
//! [`Command`].

#![forbid(unsafe_code)]

mod conn;
mod driver;
mod envoy;
mod lease;
mod limiter;
mod queue;
mod redis_info;
mod report;

use clap::{Parser, Subcommand};

/// mimalloc, as in the services: the load generator's own CPU per call is part of every figure
/// on a shared machine, and with the system allocator it spent ≈ 11 % more per call.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for Sluice's gRPC services.
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", version)]
struct Cli {
    /// Event-loop threads of the load generator: 1 (the default) runs it on one thread, the
    /// least CPU per call, leaving the rest of a small machine to the service and Redis; 0 is
    /// one per core.
    #[arg(long, global = true, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=1024))]
    threads: u16,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the limiter's CheckLimit with inline limits on many subjects.
    CheckLimit {
        #[command(flatten)]
        run: driver::RunArgs,
        #[command(flatten)]
        workload: limiter::CheckLimitArgs,
    },
    /// Load the Envoy rate limit service's ShouldRateLimit with one descriptor per request.
    ShouldRateLimit {
        #[command(flatten)]
        run: driver::RunArgs,
        #[command(flatten)]
        workload: envoy::ShouldRateLimitArgs,
    },
    /// Enqueue one task per request (Queue/Enqueue), priorities spread over the five levels.
    Enqueue {
        #[command(flatten)]
        run: driver::RunArgs,
        #[command(flatten)]
        queue: queue::QueueArgs,
        #[command(flatten)]
        workload: queue::EnqueueArgs,
    },
    /// Enqueue --batch tasks per request (Queue/EnqueueBatch); reports tasks/s and the latency
    /// of each batch call.
    EnqueueBatch {
        #[command(flatten)]
        run: driver::RunArgs,
        #[command(flatten)]
        queue: queue::QueueArgs,
        #[command(flatten)]
        workload: queue::EnqueueBatchArgs,
    },
    /// Dequeue up to --batch tasks and Complete them all, per request; reports tasks
    /// completed per second. With --stop-when-empty, measures draining a pre-filled queue.
    Drain {
        #[command(flatten)]
        run: driver::RunArgs,
        #[command(flatten)]
        queue: queue::QueueArgs,
        #[command(flatten)]
        workload: queue::DrainArgs,
    },
    /// Producers and consumers at once: half the --concurrency workers enqueue, half drain;
    /// reports tasks completed per second and the enqueue latency.
    Cycle {
        #[command(flatten)]
        run: driver::RunArgs,
        #[command(flatten)]
        queue: queue::QueueArgs,
        #[command(flatten)]
        workload: queue::CycleArgs,
    },
    /// Drain a pre-filled queue through the Lease stream: --workers streams, each granting
    /// --credits, completing every lease on the stream at once and granting one credit per
    /// Ack. Reports tasks completed per second and, per task, the time from receiving the
    /// lease to its Ack. Ends when every worker got no task for --idle, or at --duration.
    LeaseDrain {
        #[command(flatten)]
        run: lease::StreamArgs,
        #[command(flatten)]
        queue: queue::QueueArgs,
        #[command(flatten)]
        workload: lease::LeaseDrainArgs,
    },
    /// Push latency of the Lease stream: --workers idle streams (one credit each), then
    /// --tasks enqueued at --rate, each carrying its send time; reports the time from the
    /// Enqueue to the lease reaching a worker. With --redis-url, first reads Redis's
    /// commands/s over --idle-sample while the workers wait with nothing to do.
    PushLatency {
        #[command(flatten)]
        run: lease::StreamArgs,
        #[command(flatten)]
        queue: queue::QueueArgs,
        #[command(flatten)]
        workload: lease::PushLatencyArgs,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let threads = match cli.threads {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => usize::from(n),
    };
    sluice::config::runtime(threads)?.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let (json, report) = match cli.command {
        Command::CheckLimit { run, workload } => {
            let workload = limiter::CheckLimit::new(&workload)?;
            let report = driver::run(&run, workload).await?;
            (run.json, report)
        }
        Command::ShouldRateLimit { run, workload } => {
            let workload = envoy::ShouldRateLimit::new(&workload);
            let report = driver::run(&run, workload).await?;
            (run.json, report)
        }
        Command::Enqueue {
            run,
            queue,
            workload,
        } => {
            let workload = queue::Enqueue::new(&queue, &workload)?;
            let report = driver::run_probed(&run, workload, queue.probe().await?).await?;
            (run.json, report)
        }
        Command::EnqueueBatch {
            run,
            queue,
            workload,
        } => {
            let workload = queue::EnqueueBatch::new(&queue, &workload)?;
            let report = driver::run_probed(&run, workload, queue.probe().await?).await?;
            (run.json, report)
        }
        Command::Drain {
            run,
            queue,
            workload,
        } => {
            let workload = queue::Drain::new(&queue, &workload, &run)?;
            let report = driver::run_probed(&run, workload, queue.probe().await?).await?;
            (run.json, report)
        }
        Command::Cycle {
            run,
            queue,
            workload,
        } => {
            let workload = queue::Cycle::new(&queue, &workload, &run)?;
            let report = driver::run_probed(&run, workload, queue.probe().await?).await?;
            (run.json, report)
        }
        Command::LeaseDrain {
            run,
            queue,
            workload,
        } => (run.json, lease::lease_drain(&run, &queue, &workload).await?),
        Command::PushLatency {
            run,
            queue,
            workload,
        } => (
            run.json,
            lease::push_latency(&run, &queue, &workload).await?,
        ),
    };
    if json {
        // stdout carries only the JSON line, so `sluice-bench … --json | jq` works; the human
        // block still goes to the terminal.
        eprint!("{report}");
        println!("{}", report.json());
    } else {
        print!("{report}");
    }
    Ok(())
}
