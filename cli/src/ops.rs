//! The operator's commands: check, read and reset limits; enqueue, inspect and cancel tasks;
//! queue stats, pause and resume; workers; dead letters. Each is one or a few gRPC calls to a
//! running limiter-svc or queue-svc, printed as `key: value` lines.

use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use sluice::auth::{Bearer, BearerLayer};
use sluice::config::parse_duration;
use sluice::proto::sluice::limiter::v1 as lim;
use sluice::proto::sluice::queue::v1 as pb;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Exit status of `sluice limit check` when the request is denied (errors exit 1).
pub const DENIED_EXIT: u8 = 4;

/// Where the services are and how to reach them.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// limiter-svc's gRPC URL (https:// for TLS).
    #[arg(
        long,
        env = "SLUICE_LIMITER_URL",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    limiter_url: String,
    /// queue-svc's gRPC URL (https:// for TLS).
    #[arg(
        long,
        env = "SLUICE_QUEUE_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    queue_url: String,
    #[command(flatten)]
    client: sluice::config::ClientArgs,
    /// Bound on connecting and on each call.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    timeout: Duration,
}

impl Remote {
    async fn channel(&self, url: &str) -> anyhow::Result<Bearer<Channel>> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if url.starts_with("https://") {
            let tls = self.client.tls([url])?;
            endpoint = endpoint
                .tls_config(tls.unwrap_or_else(|| ClientTlsConfig::new().with_native_roots()))?;
        } else {
            // Refuses TLS options with an http:// URL.
            self.client.tls([url])?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
        let credentials = self.client.credentials()?;
        Ok(tower::Layer::layer(&BearerLayer::new(credentials), channel))
    }

    async fn limiter(&self) -> anyhow::Result<lim::limiter_client::LimiterClient<Bearer<Channel>>> {
        Ok(lim::limiter_client::LimiterClient::new(
            self.channel(&self.limiter_url).await?,
        ))
    }

    async fn queue(&self) -> anyhow::Result<pb::queue_client::QueueClient<Bearer<Channel>>> {
        Ok(
            pb::queue_client::QueueClient::new(self.channel(&self.queue_url).await?)
                .max_decoding_message_size(16 << 20),
        )
    }
}

/// `sluice limit …`.
#[derive(Debug, clap::Subcommand)]
pub enum LimitCommand {
    /// Decide one request and spend `--cost` if it may go ahead; exits 4 when denied.
    Check {
        #[command(flatten)]
        check: CheckArgs,
        /// Units the request spends.
        #[arg(long, default_value_t = 1)]
        cost: u64,
    },
    /// Read a limit's state without spending anything: would a request of `--cost` pass?
    Status {
        #[command(flatten)]
        check: CheckArgs,
        /// Units the request would spend.
        #[arg(long, default_value_t = 1)]
        cost: u64,
    },
    /// Forget what a limit has counted for the subject (admin).
    Reset {
        #[command(flatten)]
        check: CheckArgs,
    },
}

/// One check: a scope and subject, and a named policy or an inline limit.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// user, project, ip, endpoint, api_key, or a custom scope.
    #[arg(long, default_value = "user")]
    scope: String,
    /// Who or what is limited (a user id, an address…).
    #[arg(long)]
    subject: String,
    /// A policy of the limits file.
    #[arg(long, required_unless_present = "limit", conflicts_with = "limit")]
    policy: Option<String>,
    /// An inline limit instead of a policy: units per --window.
    #[arg(long, requires = "window")]
    limit: Option<u64>,
    /// The inline limit's window (e.g. 1m, 1h).
    #[arg(long, value_parser = parse_duration)]
    window: Option<Duration>,
    /// The inline limit's algorithm.
    #[arg(long, default_value = "sliding-window-counter", value_parser = [
        "sliding-window-log", "sliding-window-counter", "fixed-window", "token-bucket", "gcra"
    ])]
    algorithm: String,
    /// Token bucket and GCRA: burst (0: the limit).
    #[arg(long, default_value_t = 0)]
    burst: u64,
}

impl CheckArgs {
    fn check(&self) -> anyhow::Result<lim::Check> {
        let limit = match (&self.policy, self.limit, self.window) {
            (Some(policy), _, _) => lim::check::Limit::Policy(policy.clone()),
            (None, Some(limit), Some(window)) => {
                let name = format!(
                    "ALGORITHM_{}",
                    self.algorithm.replace('-', "_").to_uppercase()
                );
                let algorithm = lim::Algorithm::from_str_name(&name)
                    .ok_or_else(|| anyhow::anyhow!("--algorithm {}: unknown", self.algorithm))?;
                lim::check::Limit::Inline(lim::InlineLimit {
                    algorithm: algorithm.into(),
                    limit,
                    window: Some(prost_types::Duration::try_from(window)?),
                    burst: self.burst,
                })
            }
            _ => anyhow::bail!("give --policy, or --limit with --window"),
        };
        Ok(lim::Check {
            scope: self.scope.clone(),
            subject: self.subject.clone(),
            limit: Some(limit),
        })
    }
}

/// Runs a `sluice limit` command; `Ok(false)`: a check was denied.
pub async fn limit(remote: &Remote, command: LimitCommand) -> anyhow::Result<bool> {
    let mut client = remote.limiter().await?;
    match command {
        LimitCommand::Check { check, cost } => {
            let answer = client
                .check_limit(lim::CheckLimitRequest {
                    checks: vec![check.check()?],
                    cost,
                    request_id: String::new(),
                })
                .await?
                .into_inner();
            println!("allowed: {}", answer.allowed);
            if let Some(retry) = answer.retry_after.filter(|_| !answer.allowed) {
                println!("retry_after: {retry}");
            }
            for result in &answer.results {
                print_result(result);
            }
            Ok(answer.allowed)
        }
        LimitCommand::Status { check, cost } => {
            let answer = client
                .get_limit_status(lim::GetLimitStatusRequest {
                    checks: vec![check.check()?],
                    cost,
                })
                .await?
                .into_inner();
            answer.results.iter().for_each(print_result);
            Ok(true)
        }
        LimitCommand::Reset { check } => {
            client
                .reset_limit(lim::ResetLimitRequest {
                    checks: vec![check.check()?],
                })
                .await?;
            println!("reset: true");
            Ok(true)
        }
    }
}

fn print_result(result: &lim::CheckResult) {
    if result.policy.is_empty() {
        println!("policy: (inline)");
    } else {
        println!("policy: {}", result.policy);
    }
    println!(
        "  algorithm: {}",
        short(result.algorithm().as_str_name(), "ALGORITHM_")
    );
    println!("  allowed: {}", result.allowed);
    println!("  limit: {}", result.limit);
    println!("  remaining: {}", result.remaining);
    if let Some(reset) = &result.reset_after {
        println!("  reset_after: {reset}");
    }
    if let Some(retry) = &result.retry_after {
        println!("  retry_after: {retry}");
    }
    if result.shadow {
        println!("  shadow: true");
    }
    println!(
        "  source: {}",
        short(result.source().as_str_name(), "SOURCE_")
    );
}

/// `PRIORITY_NORMAL` → `normal`.
fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_lowercase()
}

/// A project and a queue.
#[derive(Debug, clap::Args)]
pub struct QueueRef {
    /// Project.
    #[arg(long, env = "SLUICE_PROJECT")]
    project: String,
    /// Queue.
    #[arg(long)]
    queue: String,
}

/// `sluice queue …`.
#[derive(Debug, clap::Subcommand)]
pub enum QueueCommand {
    /// Enqueue one task; prints its id.
    Enqueue(Box<EnqueueArgs>),
    /// A task's state, attempts, result and errors.
    Task {
        #[command(flatten)]
        queue: QueueRef,
        /// The task's id.
        id: String,
        /// Also print the payload (as text, lossily).
        #[arg(long)]
        payload: bool,
    },
    /// Cancel a task (a leased one is cancelled when its worker next reports).
    Cancel {
        #[command(flatten)]
        queue: QueueRef,
        /// The task's id.
        id: String,
    },
    /// Depth per state and priority, rates, paused.
    Stats {
        #[command(flatten)]
        queue: QueueRef,
    },
    /// Stop leasing from a queue (admin); enqueues still land.
    Pause {
        #[command(flatten)]
        queue: QueueRef,
    },
    /// Lease from a paused queue again (admin).
    Resume {
        #[command(flatten)]
        queue: QueueRef,
    },
    /// Workers holding a Lease stream for the project (admin).
    Workers {
        /// Project.
        #[arg(long, env = "SLUICE_PROJECT")]
        project: String,
        /// Only those subscribed to this queue.
        #[arg(long, default_value = "")]
        queue: String,
    },
    /// Dead letters: list, redrive, purge (admin).
    #[command(subcommand)]
    Dead(DeadCommand),
}

#[derive(Debug, clap::Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    queue: QueueRef,
    /// The payload, as text; without it (or with --payload-file -) standard input is read.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the payload from this file (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    payload_file: Option<PathBuf>,
    /// critical, high, normal, low, background.
    #[arg(long, default_value = "normal", value_parser = ["critical", "high", "normal", "low", "background"])]
    priority: String,
    /// Ready only after this long (e.g. 30s, 2h).
    #[arg(long, value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Attempts before the task is dead-lettered (default: the queue's).
    #[arg(long)]
    max_attempts: Option<u32>,
    /// While a task with this key is retained, enqueueing again returns it instead.
    #[arg(long, default_value = "")]
    idempotency_key: String,
    /// MIME type of the payload, for the worker.
    #[arg(long, default_value = "")]
    content_type: String,
    /// A header for the worker, NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
}

/// `sluice queue dead …`.
#[derive(Debug, clap::Subcommand)]
pub enum DeadCommand {
    /// One page of dead letters, oldest first.
    List {
        #[command(flatten)]
        queue: QueueRef,
        /// Only this failure category: transient, permanent, timeout.
        #[arg(long, value_parser = ["transient", "permanent", "timeout"])]
        category: Option<String>,
        /// Letters per page (at most 500).
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        /// The page after the one that printed this token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Put dead letters back in the queue with their attempts reset.
    Redrive(Box<DeadSelect>),
    /// Delete dead letters for good.
    Purge(Box<DeadSelect>),
}

/// Which dead letters: one by id, a category, or all of them.
#[derive(Debug, clap::Args)]
pub struct DeadSelect {
    #[command(flatten)]
    queue: QueueRef,
    /// One dead task.
    #[arg(long, conflicts_with_all = ["category", "all"])]
    id: Option<String>,
    /// The dead letters of this failure category: transient, permanent, timeout.
    #[arg(long, conflicts_with = "all", value_parser = ["transient", "permanent", "timeout"])]
    category: Option<String>,
    /// Every dead letter of the queue.
    #[arg(long)]
    all: bool,
}

impl DeadSelect {
    fn selector(&self) -> anyhow::Result<pb::DeadLetterSelector> {
        use pb::dead_letter_selector::Selector;
        let selector = match (&self.id, &self.category, self.all) {
            (Some(id), _, _) => Selector::TaskId(id.clone()),
            (None, Some(category), _) => Selector::Filter(pb::DeadLetterFilter {
                category: category_of(category)?.into(),
                dead_before: None,
            }),
            (None, None, true) => Selector::All(true),
            (None, None, false) => anyhow::bail!("choose --id, --category or --all"),
        };
        Ok(pb::DeadLetterSelector {
            selector: Some(selector),
        })
    }
}

fn category_of(name: &str) -> anyhow::Result<pb::FailureCategory> {
    pb::FailureCategory::from_str_name(&format!("FAILURE_CATEGORY_{}", name.to_uppercase()))
        .ok_or_else(|| anyhow::anyhow!("unknown failure category {name:?}"))
}

/// Runs a `sluice queue` command.
pub async fn queue(remote: &Remote, command: QueueCommand) -> anyhow::Result<()> {
    let mut client = remote.queue().await?;
    match command {
        QueueCommand::Enqueue(args) => {
            let reply = client
                .enqueue(pb::EnqueueRequest {
                    task: Some(spec(*args)?),
                })
                .await?
                .into_inner();
            println!("task_id: {}", reply.task_id);
            println!(
                "state: {}",
                short(reply.state().as_str_name(), "TASK_STATE_")
            );
            if reply.duplicate {
                println!("duplicate: true");
            }
        }
        QueueCommand::Task { queue, id, payload } => {
            let task = client
                .get_task(pb::GetTaskRequest {
                    project: queue.project,
                    queue: queue.queue,
                    task_id: id,
                })
                .await?
                .into_inner()
                .task
                .ok_or_else(|| anyhow::anyhow!("the answer holds no task"))?;
            print_task(&task, payload);
        }
        QueueCommand::Cancel { queue, id } => {
            let reply = client
                .cancel_task(pb::CancelTaskRequest {
                    project: queue.project,
                    queue: queue.queue,
                    task_id: id,
                })
                .await?
                .into_inner();
            println!(
                "state: {}",
                short(reply.state().as_str_name(), "TASK_STATE_")
            );
            println!("cancel_requested: {}", reply.cancel_requested);
        }
        QueueCommand::Stats { queue } => {
            let stats = client
                .get_queue_stats(pb::GetQueueStatsRequest {
                    project: queue.project,
                    queue: queue.queue,
                })
                .await?
                .into_inner()
                .stats
                .ok_or_else(|| anyhow::anyhow!("the answer holds no stats"))?;
            print_stats(&stats);
        }
        QueueCommand::Pause { queue } => {
            let reply = client
                .pause_queue(pb::PauseQueueRequest {
                    project: queue.project,
                    queue: queue.queue,
                })
                .await?;
            println!("paused: {}", reply.into_inner().paused);
        }
        QueueCommand::Resume { queue } => {
            let reply = client
                .resume_queue(pb::ResumeQueueRequest {
                    project: queue.project,
                    queue: queue.queue,
                })
                .await?;
            println!("paused: {}", reply.into_inner().paused);
        }
        QueueCommand::Workers { project, queue } => {
            let reply = client
                .list_workers(pb::ListWorkersRequest { project, queue })
                .await?
                .into_inner();
            for w in &reply.workers {
                println!(
                    "{}  queues={}  in_flight={}  credits={}  instance={}{}",
                    w.worker_id,
                    w.queues.join(","),
                    w.in_flight,
                    w.credits,
                    w.instance,
                    if w.draining { "  draining" } else { "" }
                );
            }
            println!("workers: {}", reply.workers.len());
            if reply.truncated {
                println!("truncated: true");
            }
        }
        QueueCommand::Dead(command) => dead(&mut client, command).await?,
    }
    Ok(())
}

/// Most pages one redrive or purge walks before it stops (each page is up to 1,000 letters).
const MAX_PAGES: usize = 10_000;

/// Calls `page` with each page token until the server says there is no more: (done on this
/// page, more, next token) per call. Returns how many were done in all.
async fn walk<F, Fut>(mut page: F) -> anyhow::Result<u64>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(u32, bool, String)>>,
{
    let (mut total, mut token) = (0u64, String::new());
    for _ in 0..MAX_PAGES {
        let (done, more, next) = page(token).await?;
        total += u64::from(done);
        if !more {
            return Ok(total);
        }
        token = next;
    }
    anyhow::bail!("stopped after {MAX_PAGES} pages ({total} done); run the command again")
}

async fn dead(
    client: &mut pb::queue_client::QueueClient<Bearer<Channel>>,
    command: DeadCommand,
) -> anyhow::Result<()> {
    match command {
        DeadCommand::List {
            queue,
            category,
            page_size,
            page_token,
        } => {
            let category = category.as_deref().map(category_of).transpose()?;
            let reply = client
                .list_dead_letters(pb::ListDeadLettersRequest {
                    project: queue.project,
                    queue: queue.queue,
                    category: category.unwrap_or_default().into(),
                    page_size,
                    page_token,
                    include_payload: false,
                })
                .await?
                .into_inner();
            for task in &reply.tasks {
                let last = task.errors.last();
                println!(
                    "{}  attempts={}  dead_at={}  {}",
                    task.id,
                    task.attempts,
                    task.dead_at
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    last.map(|e| format!(
                        "{}: {}",
                        short(e.category().as_str_name(), "FAILURE_CATEGORY_"),
                        e.message
                    ))
                    .unwrap_or_default()
                );
            }
            println!("listed: {}", reply.tasks.len());
            if !reply.next_page_token.is_empty() {
                println!("next_page_token: {}", reply.next_page_token);
            }
        }
        DeadCommand::Redrive(select) => {
            let total = walk_dead(client, &select, false).await?;
            println!("redriven: {total}");
        }
        DeadCommand::Purge(select) => {
            let total = walk_dead(client, &select, true).await?;
            println!("purged: {total}");
        }
    }
    Ok(())
}

/// Redrives (or with `purge`, deletes) every dead letter `select` names, page by page.
async fn walk_dead(
    client: &pb::queue_client::QueueClient<Bearer<Channel>>,
    select: &DeadSelect,
    purge: bool,
) -> anyhow::Result<u64> {
    let selector = select.selector()?;
    walk(|page_token| {
        let mut client = client.clone();
        let (project, queue) = (select.queue.project.clone(), select.queue.queue.clone());
        let selector = Some(selector.clone());
        async move {
            Ok(if purge {
                let r = client
                    .purge_dead_letters(pb::PurgeDeadLettersRequest {
                        project,
                        queue,
                        selector,
                        limit: 0,
                        page_token,
                    })
                    .await?
                    .into_inner();
                (r.purged, r.more, r.next_page_token)
            } else {
                let r = client
                    .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                        project,
                        queue,
                        selector,
                        limit: 0,
                        page_token,
                    })
                    .await?
                    .into_inner();
                (r.redriven, r.more, r.next_page_token)
            })
        }
    })
    .await
}

fn spec(args: EnqueueArgs) -> anyhow::Result<pb::TaskSpec> {
    let payload = match (args.payload, &args.payload_file) {
        (Some(text), _) => text.into_bytes(),
        (None, Some(path)) if path.as_os_str() != "-" => std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("--payload-file {}: {e}", path.display()))?,
        (None, _) => {
            let mut bytes = Vec::new();
            std::io::stdin().read_to_end(&mut bytes)?;
            bytes
        }
    };
    let priority =
        pb::Priority::from_str_name(&format!("PRIORITY_{}", args.priority.to_uppercase()))
            .ok_or_else(|| anyhow::anyhow!("--priority {}: unknown", args.priority))?;
    let headers = args
        .headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--header {h:?}: write NAME=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(pb::TaskSpec {
        project: args.queue.project,
        queue: args.queue.queue,
        payload,
        content_type: args.content_type,
        priority: priority.into(),
        schedule: args
            .delay
            .map(|d| prost_types::Duration::try_from(d).map(pb::task_spec::Schedule::Delay))
            .transpose()?,
        max_attempts: args.max_attempts,
        retry: None,
        processing_timeout: None,
        idempotency_key: args.idempotency_key,
        headers,
    })
}

fn print_task(task: &pb::Task, payload: bool) {
    println!("id: {}", task.id);
    println!("project: {}", task.project);
    println!("queue: {}", task.queue);
    println!(
        "state: {}",
        short(task.state().as_str_name(), "TASK_STATE_")
    );
    println!(
        "priority: {}",
        short(task.priority().as_str_name(), "PRIORITY_")
    );
    println!("attempts: {}", task.attempts);
    let times = [
        ("enqueued_at", &task.enqueued_at),
        ("scheduled_for", &task.scheduled_for),
        ("leased_at", &task.leased_at),
        ("lease_deadline", &task.lease_deadline),
        ("succeeded_at", &task.succeeded_at),
        ("failed_at", &task.failed_at),
        ("dead_at", &task.dead_at),
        ("cancelled_at", &task.cancelled_at),
    ];
    for (name, at) in times {
        if let Some(at) = at {
            println!("{name}: {at}");
        }
    }
    for e in &task.errors {
        println!(
            "error: attempt {} {}: {}",
            e.attempt,
            short(e.category().as_str_name(), "FAILURE_CATEGORY_"),
            e.message
        );
    }
    if !task.result.is_empty() {
        println!("result: {}", String::from_utf8_lossy(&task.result));
    }
    if payload {
        println!("payload: {}", String::from_utf8_lossy(&task.payload));
    }
}

fn print_stats(s: &pb::QueueStats) {
    println!("ready: {}", s.ready);
    for depth in &s.ready_by_priority {
        println!(
            "  {}: {}",
            short(depth.priority().as_str_name(), "PRIORITY_"),
            depth.ready
        );
    }
    println!("scheduled: {}", s.scheduled);
    println!("leased: {}", s.leased);
    println!("dead: {}", s.dead);
    println!("succeeded_retained: {}", s.succeeded_retained);
    println!("cancelled_retained: {}", s.cancelled_retained);
    println!("paused: {}", s.paused);
    println!("max_size: {}", s.max_size);
    println!("enqueued_per_sec: {:.1}", s.enqueued_per_sec);
    println!("completed_per_sec: {:.1}", s.completed_per_sec);
    println!("failed_per_sec: {:.1}", s.failed_per_sec);
}
