//! The Sluice worker SDK: lease tasks from queue-svc over the `Lease` stream and run a
//! [`Handler`] on each.
//!
//! The worker speaks to queue-svc only through the public contract (the generated client in
//! [`sluice::proto`]), as a worker in any other language would. [`run`] keeps one stream
//! open: it grants credits for `concurrency` tasks, runs each task under a timeout, heartbeats
//! the leases it holds, reports each outcome, reconnects with exponential backoff and jitter
//! when queue-svc goes away, and on shutdown drains: it stops taking tasks, lets the running
//! ones finish within a bound and gives back what it could not finish.
//!
//! [`exec`] runs a command per task, so a fleet needs no Rust.

#![forbid(unsafe_code)]

pub mod exec;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sluice::auth::{Bearer, BearerLayer};
use sluice::proto::sluice::queue::v1 as pb;
use sluice::proto::sluice::queue::v1::lease_request::Kind as Up;
use sluice::proto::sluice::queue::v1::lease_response::Kind as Down;
use sluice::proto::sluice::queue::v1::queue_client::QueueClient;
use sluice::telemetry::{GrpcClientTrace, GrpcClientTraceLayer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Most leases in one heartbeat (the contract's bound on `Heartbeat.tasks`); a worker holding
/// more sends several.
const MAX_HEARTBEAT_TASKS: usize = 1000;

/// A queue client whose calls carry the worker's credentials and the caller's trace context.
pub type Client = QueueClient<Bearer<GrpcClientTrace<Channel>>>;

/// How a worker reaches queue-svc.
#[derive(Clone)]
pub struct Transport {
    /// Bound on connecting.
    pub connect_timeout: Duration,
    /// Sent as `authorization` on every call (an API key or JWT with the worker role on the
    /// project, see [`sluice::auth::bearer`]); `None` for a queue-svc with auth off.
    pub credentials: Option<http::HeaderValue>,
    /// TLS for `https://` URLs (see [`sluice::tls::client_config`]); `None`: the defaults of
    /// the system's roots, no client certificate.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The TLS configuration holds the client's private key: only whether there is one.
        f.debug_struct("Transport")
            .field("connect_timeout", &self.connect_timeout)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Transport {
    /// Plaintext or system-trusted TLS, no credentials.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            credentials: None,
            tls: None,
        }
    }

    fn endpoint(&self, url: &str) -> Result<Endpoint, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        // TLS options with an http:// URL are refused where the options are read (the
        // binary's `transport`): a token must not go out in the clear while TLS looks on.
        match (&self.tls, url.starts_with("https://")) {
            (Some(tls), true) => endpoint.tls_config(tls.clone()),
            (None, true) => {
                endpoint.tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
            }
            (_, false) => Ok(endpoint),
        }
    }
}

/// Connects to queue-svc at `url` (e.g. `http://127.0.0.1:50052`, or `https://…` for TLS).
pub async fn connect(url: &str, transport: &Transport) -> Result<Client, tonic::transport::Error> {
    let channel = transport.endpoint(url)?.connect().await?;
    Ok(QueueClient::new(
        tower::ServiceBuilder::new()
            .layer(BearerLayer::new(transport.credentials.clone()))
            .layer(GrpcClientTraceLayer)
            .service(channel),
    ))
}

/// The gRPC health status (`SERVING`, `NOT_SERVING`, …) queue-svc reports for itself.
pub async fn health(url: &str, transport: &Transport) -> anyhow::Result<String> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = transport
        .endpoint(url)?
        .timeout(transport.connect_timeout)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach queue-svc at {url}: {e}"))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response
        .into_inner()
        .status()
        .as_str_name()
        .trim_start_matches("SERVING_STATUS_")
        .to_owned())
}

/// A task handed to a handler.
#[derive(Debug, Clone)]
pub struct Task {
    /// Task id (UUIDv7).
    pub id: String,
    /// Project.
    pub project: String,
    /// Queue.
    pub queue: String,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Payload.
    pub payload: Vec<u8>,
    /// Content type, as the producer set it.
    pub content_type: String,
    /// Headers (trace context among them).
    pub headers: HashMap<String, String>,
}

/// Why a task failed, as the worker reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// Kind of failure.
    pub category: pb::FailureCategory,
    /// For humans.
    pub message: String,
    /// `None`: permanent failures are not retried, others are.
    pub retryable: Option<bool>,
}

impl Failure {
    /// A failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            category: pb::FailureCategory::Transient,
            message: message.into(),
            retryable: None,
        }
    }

    /// A failure that no retry will fix: the task goes to the dead letters.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            category: pb::FailureCategory::Permanent,
            message: message.into(),
            retryable: None,
        }
    }
}

/// Runs tasks. A result is stored on the task; a [`Failure`] is retried or dead-lettered by
/// the queue's policy.
pub trait Handler: Send + Sync + 'static {
    /// Processes one task.
    fn handle(&self, task: Task) -> impl Future<Output = Result<Vec<u8>, Failure>> + Send;
}

/// What a worker consumes and how.
#[derive(Debug, Clone)]
pub struct Options {
    /// queue-svc's gRPC URLs; a lost stream reconnects to the next one.
    pub urls: Vec<String>,
    /// Project.
    pub project: String,
    /// Queues (1 to 16).
    pub queues: Vec<String>,
    /// Shown in ListWorkers and on leased tasks.
    pub worker_id: String,
    /// Tasks run at once.
    pub concurrency: u32,
    /// Lease length; heartbeats renew it every third of it.
    pub lease: Duration,
    /// A task running longer fails with category timeout.
    pub task_timeout: Duration,
    /// On shutdown, how long running tasks may take to finish.
    pub drain: Duration,
    /// How to reach queue-svc: connect timeout, credentials, TLS.
    pub transport: Transport,
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// Runs the worker until `shutdown` is cancelled and it has drained; reconnects with
/// exponential backoff (100 ms to 10 s, with jitter) whenever the stream is lost.
pub async fn run<H: Handler>(
    options: Options,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    anyhow::ensure!(options.concurrency > 0, "concurrency must be at least 1");
    anyhow::ensure!(!options.urls.is_empty(), "name at least one queue-svc URL");
    let mut next_url = 0usize;
    let backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times();
    let mut delays = backon::BackoffBuilder::build(backoff);
    loop {
        let url = &options.urls[next_url % options.urls.len()];
        let ended = session(url, &options, &handler, &shutdown, &mut || {
            delays = backon::BackoffBuilder::build(backoff);
        })
        .await;
        match ended {
            Ok(Ended::Shutdown) => return Ok(()),
            Ok(Ended::Lost(why)) | Err(why) => {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                next_url += 1;
                tracing::warn!(reason = %why, ?delay, next = %options.urls[next_url % options.urls.len()], "lease stream lost; reconnecting");
                metrics::counter!("sluice_worker_reconnects_total").increment(1);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

struct Running {
    queue: String,
    token: String,
    abort: tokio::task::AbortHandle,
}

type Finished = (String, String, String, Result<Vec<u8>, Failure>);

fn up(kind: Up) -> pb::LeaseRequest {
    pb::LeaseRequest { kind: Some(kind) }
}

async fn session<H: Handler>(
    url: &str,
    options: &Options,
    handler: &Arc<H>,
    shutdown: &CancellationToken,
    connected: &mut dyn FnMut(),
) -> Result<Ended, String> {
    let mut client = connect(url, &options.transport)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<pb::LeaseRequest>(1024);
    let send = |kind: Up| {
        let tx = tx.clone();
        async move { tx.send(up(kind)).await.is_ok() }
    };
    send(Up::Subscribe(pb::Subscribe {
        project: options.project.clone(),
        queues: options.queues.clone(),
        worker_id: options.worker_id.clone(),
        labels: HashMap::new(),
        lease_duration: Some(sluice_duration(options.lease)),
    }))
    .await;
    let mut down = client
        .lease(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    match down.message().await {
        Ok(Some(pb::LeaseResponse {
            kind: Some(Down::Subscribed(_)),
        })) => connected(),
        Ok(other) => return Err(format!("expected Subscribed, got {other:?}")),
        Err(status) => return Err(status.to_string()),
    }
    tracing::info!(project = %options.project, queues = ?options.queues, concurrency = options.concurrency, "subscribed");
    send(Up::Credits(pb::Credits {
        add: options.concurrency,
    }))
    .await;

    let mut running: HashMap<String, Running> = HashMap::new();
    let mut tasks: JoinSet<Finished> = JoinSet::new();
    let mut heartbeat = tokio::time::interval((options.lease / 3).max(Duration::from_millis(100)));
    heartbeat.tick().await;
    let mut draining = false;
    let mut drained = false;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut lost: Option<String> = None;
    loop {
        if draining && drained && running.is_empty() {
            break;
        }
        tokio::select! {
            message = down.message(), if lost.is_none() => match message {
                Ok(Some(pb::LeaseResponse { kind: Some(kind) })) => match kind {
                    Down::Task(lease) => {
                        let Some(task) = lease.task else { continue };
                        if draining {
                            send(Up::Release(pb::ReleaseTask { queue: task.queue, task_id: task.id, lease_token: lease.lease_token })).await;
                            continue;
                        }
                        let (id, queue, token) = (task.id.clone(), task.queue.clone(), lease.lease_token.clone());
                        let work = Task {
                            id: task.id,
                            project: task.project,
                            queue: task.queue,
                            attempt: lease.attempt,
                            payload: task.payload,
                            content_type: task.content_type,
                            headers: task.headers,
                        };
                        let abort = tasks.spawn(process(handler.clone(), work, token.clone(), options.task_timeout));
                        running.insert(id, Running { queue, token, abort });
                    }
                    Down::Ack(ack) => {
                        if ack.kind == i32::from(pb::ack::Kind::Rejected) {
                            tracing::warn!(task = %ack.task_id, message = %ack.message, "queue-svc rejected a report");
                        }
                        if !draining {
                            send(Up::Credits(pb::Credits { add: 1 })).await;
                        }
                    }
                    Down::Revoked(revoked) => {
                        if let Some(r) = running.remove(&revoked.task_id) {
                            r.abort.abort();
                            tracing::info!(task = %revoked.task_id, reason = %revoked.reason, "task revoked");
                            send(Up::Fail(pb::FailTask {
                                queue: r.queue,
                                task_id: revoked.task_id,
                                lease_token: r.token,
                                message: format!("revoked: {}", revoked.reason),
                                category: pb::FailureCategory::Unknown.into(),
                                retryable: Some(false),
                            }))
                            .await;
                        }
                    }
                    Down::HeartbeatAck(ack) => {
                        for id in ack.lost {
                            if let Some(r) = running.remove(&id) {
                                r.abort.abort();
                                tracing::warn!(task = %id, "lease lost; stopped the task");
                                if !draining {
                                    send(Up::Credits(pb::Credits { add: 1 })).await;
                                }
                            }
                        }
                    }
                    Down::Drained(d) => {
                        drained = true;
                        if d.server_shutdown {
                            draining = true;
                            lost = Some("queue-svc is shutting down".into());
                            drain_deadline.get_or_insert(tokio::time::Instant::now() + options.drain);
                        }
                    }
                    Down::Keepalive(_) | Down::Subscribed(_) => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    lost = Some("queue-svc closed the stream".into());
                    draining = true;
                    drained = true;
                    drain_deadline.get_or_insert(tokio::time::Instant::now() + options.drain);
                }
                Err(status) => {
                    lost = Some(status.to_string());
                    draining = true;
                    drained = true;
                    drain_deadline.get_or_insert(tokio::time::Instant::now() + options.drain);
                }
            },
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok((id, queue, token, outcome)) = joined else { continue };
                if running.remove(&id).is_none() {
                    continue; // revoked or lost meanwhile: already reported
                }
                report(&mut client, &send, lost.is_some(), &options.project, queue, id, token, outcome).await;
            }
            _ = heartbeat.tick(), if !running.is_empty() && lost.is_none() => {
                let refs: Vec<pb::TaskRef> = running
                    .iter()
                    .map(|(id, r)| pb::TaskRef { queue: r.queue.clone(), task_id: id.clone(), lease_token: r.token.clone() })
                    .collect();
                for tasks in refs.chunks(MAX_HEARTBEAT_TASKS) {
                    send(Up::Heartbeat(pb::Heartbeat { tasks: tasks.to_vec() })).await;
                }
            }
            () = shutdown.cancelled(), if !draining => {
                tracing::info!(running = running.len(), "draining: taking no more tasks");
                draining = true;
                drain_deadline = Some(tokio::time::Instant::now() + options.drain);
                send(Up::Drain(pb::Drain {})).await;
            }
            () = sleep_until(drain_deadline), if draining && drain_deadline.is_some() => {
                tracing::warn!(unfinished = running.len(), "drain bound reached; giving back unfinished tasks");
                for (id, r) in running.drain() {
                    r.abort.abort();
                    if lost.is_none() {
                        send(Up::Release(pb::ReleaseTask { queue: r.queue, task_id: id, lease_token: r.token })).await;
                    }
                }
                drained = true;
            }
        }
    }
    if let Some(why) = lost {
        return Ok(Ended::Lost(why));
    }
    // Half-close, then read until queue-svc closes: it answers everything sent first, so the
    // last reports are applied before the process exits.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = down.message().await {}
    })
    .await;
    Ok(Ended::Shutdown)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn sluice_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Runs one task in a `task.process` span linked to the span that enqueued it.
async fn process<H: Handler>(
    handler: Arc<H>,
    task: Task,
    token: String,
    timeout: Duration,
) -> Finished {
    let span = tracing::info_span!(
        "task.process",
        otel.kind = "consumer",
        messaging.system = "sluice",
        messaging.operation.type = "process",
        messaging.destination.name = %task.queue,
        messaging.message.id = %task.id,
        task.attempt = task.attempt,
    );
    let publish = sluice::telemetry::extract_from_map(&task.headers);
    {
        use opentelemetry::trace::TraceContextExt;
        let context = publish.span().span_context().clone();
        if context.is_valid() {
            span.add_link(context);
        }
    }
    let (id, queue) = (task.id.clone(), task.queue.clone());
    let started = tokio::time::Instant::now();
    let outcome = match tokio::time::timeout(timeout, handler.handle(task))
        .instrument(span)
        .await
    {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure {
            category: pb::FailureCategory::Timeout,
            message: format!("the handler ran longer than {timeout:?}"),
            retryable: Some(true),
        }),
    };
    let label = if outcome.is_ok() {
        "completed"
    } else {
        "failed"
    };
    metrics::counter!("sluice_worker_tasks_total", "queue" => queue.clone(), "outcome" => label)
        .increment(1);
    metrics::histogram!("sluice_worker_task_seconds", "queue" => queue.clone())
        .record(started.elapsed().as_secs_f64());
    (id, queue, token, outcome)
}

/// Reports a finished task on the stream, or by the unary calls when the stream is gone (its
/// lease is still valid until its deadline).
#[allow(clippy::too_many_arguments)]
async fn report<F, Fut>(
    client: &mut Client,
    send: &F,
    stream_lost: bool,
    project: &str,
    queue: String,
    id: String,
    token: String,
    outcome: Result<Vec<u8>, Failure>,
) where
    F: Fn(Up) -> Fut,
    Fut: Future<Output = bool>,
{
    if !stream_lost {
        let kind = match outcome {
            Ok(result) => Up::Complete(pb::CompleteTask {
                queue,
                task_id: id,
                lease_token: token,
                result,
            }),
            Err(f) => Up::Fail(pb::FailTask {
                queue,
                task_id: id,
                lease_token: token,
                message: f.message,
                category: f.category.into(),
                retryable: f.retryable,
            }),
        };
        send(kind).await;
        return;
    }
    let result = match outcome {
        Ok(result) => client
            .complete(pb::CompleteRequest {
                project: project.into(),
                queue,
                task_id: id.clone(),
                lease_token: token,
                result,
            })
            .await
            .map(|_| ()),
        Err(f) => client
            .fail(pb::FailRequest {
                project: project.into(),
                queue,
                task_id: id.clone(),
                lease_token: token,
                message: f.message,
                category: f.category.into(),
                retryable: f.retryable,
            })
            .await
            .map(|_| ()),
    };
    if let Err(status) = result {
        tracing::warn!(task = %id, %status, "could not report the task; its lease will expire and it will be redelivered");
    }
}
