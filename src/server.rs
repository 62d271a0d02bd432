//! Server scaffolding every Sluice binary shares: the gRPC stack (span + metrics per call),
//! health checking, reflection (v1 and v1alpha), bounded graceful shutdown, and the
//! Prometheus `/metrics` endpoint.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tower::layer::util::{Identity, Stack};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::{CommonArgs, ServerArgs};
use crate::telemetry;

/// A tonic router with Sluice's per-call layer applied.
pub type Router = tonic::transport::server::Router<Stack<GrpcServerLayer, Identity>>;

/// gRPC health service name of the server as a whole.
pub const WHOLE_SERVER: &str = "";

/// A router already serving `grpc.health.v1.Health` and both reflection versions, advertising
/// `services` (fully-qualified names found in `descriptor_sets`). Returns the health reporter
/// so the service can flip its status (e.g. degraded when its store is unreachable).
pub fn router(
    descriptor_sets: &[&'static [u8]],
    services: &[&str],
) -> Result<(Router, tonic_health::server::HealthReporter), tonic_reflection::server::Error> {
    // Installed before any call is served: the per-call layer keeps the handles it gets.
    metrics_handle();
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for set in descriptor_sets {
            builder = builder.register_encoded_file_descriptor_set(set);
        }
        for name in services {
            builder = builder.with_service_name(*name);
        }
        builder
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(GrpcServerLayer)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, reporter))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then lets in-flight calls
/// finish for at most `grace` (streams that would outlive it are cut).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), tonic::transport::Error> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let signal = shutdown.clone().cancelled_owned();
    let serving = router.serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => result,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight calls did not finish within the shutdown grace; stopping anyway");
            Ok(())
        }
    }
}

/// The sockets a server binary listens on, bound before `run` so tests can use port 0.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC.
    pub grpc: TcpListener,
    /// HTTP `/metrics`.
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds `--listen` and `--metrics-listen`.
    pub async fn bind(args: &ServerArgs) -> anyhow::Result<Self> {
        Ok(Self {
            grpc: bind(args.listen, "listen").await?,
            metrics: bind(args.metrics_listen, "metrics-listen").await?,
        })
    }

    /// Both on `127.0.0.1:0`, for tests.
    pub async fn ephemeral() -> anyhow::Result<Self> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        Ok(Self {
            grpc: bind(any, "listen").await?,
            metrics: bind(any, "metrics-listen").await?,
        })
    }
}

async fn bind(addr: SocketAddr, option: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--{option} {addr}: cannot listen: {e}"))
}

/// Serves `router` and `/metrics` until `shutdown`, logging the bound addresses first (the
/// `listening` event carries `grpc` and `metrics` fields; tools starting a binary on port 0
/// read them from there).
pub async fn run(
    service: &str,
    router: Router,
    listeners: Listeners,
    shutdown: CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    let grpc = listeners.grpc.local_addr()?;
    let metrics = listeners.metrics.local_addr()?;
    tracing::info!(service, %grpc, %metrics, "listening");
    let grpc_server = async {
        serve(router, listeners.grpc, shutdown.clone(), grace)
            .await
            .map_err(|e| anyhow::anyhow!("gRPC server on {grpc}: {e}"))
    };
    let metrics_server = async {
        serve_metrics(listeners.metrics, shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("metrics server on {metrics}: {e}"))
    };
    let result = tokio::try_join!(grpc_server, metrics_server).map(|_| ());
    // Either server failing stops the other: a half-up binary is worse than a restart.
    shutdown.cancel();
    tracing::info!(service, "stopped");
    result
}

/// Tower layer for gRPC servers: one `grpc.server` span per call, parented on the caller's W3C
/// trace context, plus request count and latency metrics per method and status.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcServerLayer;

impl<S> tower::Layer<S> for GrpcServerLayer {
    type Service = GrpcServer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcServer { inner }
    }
}

/// The service [`GrpcServerLayer`] builds.
#[derive(Debug, Clone)]
pub struct GrpcServer<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcServer<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let (service, method) = telemetry::rpc_names(&path);
        // Logs take the caller's trace id from its `traceparent`; set when the span is made,
        // since recording a field later makes the JSON log layer rewrite the span's fields.
        let caller_trace = telemetry::trace_id_from_headers(request.headers()).unwrap_or("");
        let exporting = telemetry::exporting();
        let span = if exporting {
            tracing::info_span!(
                "grpc.server",
                otel.name = %path.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
                rpc.grpc.status_code = tracing::field::Empty,
                trace_id = caller_trace,
            )
        } else {
            // Only for the logs: each field is formatted when the span is made, on every call,
            // so the span carries what a log line needs and no OpenTelemetry attributes.
            tracing::info_span!(
                "grpc.server",
                rpc.service = %service,
                rpc.method = %method,
                trace_id = caller_trace,
            )
        };
        if exporting && !span.is_disabled() {
            // A malformed traceparent yields an empty context: the call starts a new trace.
            let _ = span.set_parent(telemetry::extract_from_headers(request.headers()));
            if let Some(trace_id) = telemetry::trace_id(&span)
                && trace_id != caller_trace
            {
                span.record("trace_id", trace_id.as_str());
            }
        }
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(
            async move {
                let result = future.await;
                // Unary errors travel as trailers-only responses (status in the headers); a
                // status that arrives in trailers after a body is counted as "0" here.
                let code = match &result {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0")
                        .to_owned(),
                    Err(_) => "transport".to_owned(),
                };
                if exporting {
                    tracing::Span::current().record("rpc.grpc.status_code", code.as_str());
                }
                let elapsed = started.elapsed().as_secs_f64();
                if code == "0" {
                    CallMetrics::with(&path, |m| {
                        m.ok.increment(1);
                        m.duration.record(elapsed);
                    });
                } else {
                    metrics::counter!("sluice_grpc_requests_total", "method" => path.clone(), "code" => code)
                        .increment(1);
                    metrics::histogram!("sluice_grpc_request_duration_seconds", "method" => path)
                        .record(elapsed);
                }
                result
            }
            .instrument(span),
        )
    }
}

/// The metric handles of one method's successful calls, kept per thread.
struct CallMetrics {
    ok: metrics::Counter,
    duration: metrics::Histogram,
}

impl CallMetrics {
    /// Methods kept per thread; calls to others (a client probing unknown paths) look their
    /// metrics up each time.
    const MAX_METHODS: usize = 256;

    fn with(path: &str, f: impl FnOnce(&Self)) {
        thread_local! {
            static KNOWN: std::cell::RefCell<KeptHandles<CallMetrics>> =
                std::cell::RefCell::default();
        }
        let lookup = || Self {
            ok: metrics::counter!("sluice_grpc_requests_total", "method" => path.to_owned(), "code" => "0"),
            duration: metrics::histogram!("sluice_grpc_request_duration_seconds", "method" => path.to_owned()),
        };
        KNOWN.with_borrow_mut(|known| known.with(path, Self::MAX_METHODS, lookup, f));
    }
}

/// Metric handles kept by key (their labels), for a thread-local: looking a labelled metric
/// up in the registry costs more than the update itself, on every call.
pub struct KeptHandles<T> {
    by_key: std::collections::HashMap<Box<str>, T>,
}

impl<T> Default for KeptHandles<T> {
    fn default() -> Self {
        Self {
            by_key: std::collections::HashMap::new(),
        }
    }
}

impl<T> KeptHandles<T> {
    /// Runs `f` on the handles kept for `key`, made by `make` the first time. Past `max` keys
    /// (unbounded label values) the handles are made afresh each time and not kept.
    pub fn with(&mut self, key: &str, max: usize, make: impl FnOnce() -> T, f: impl FnOnce(&T)) {
        if let Some(handles) = self.by_key.get(key) {
            f(handles);
        } else if self.by_key.len() < max {
            f(self.by_key.entry(key.into()).or_insert_with(make));
        } else {
            f(&make());
        }
    }
}

/// Latency buckets (seconds) for every Sluice histogram: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = match builder.set_buckets(LATENCY_BUCKETS) {
                Ok(with_buckets) => with_buckets,
                Err(err) => {
                    tracing::warn!(error = %err, "histogram buckets rejected; using summaries");
                    PrometheusBuilder::new()
                }
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// Serves `GET /metrics` (Prometheus text format) and `GET /healthz` on `listener` until
/// `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let handle = metrics_handle();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move {
                    handle.run_upkeep();
                    (
                        [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// The body of every service binary's `main`: telemetry, signals, listeners, `run`, flush.
pub async fn main<F, Fut>(service: &str, common: &CommonArgs, run: F) -> anyhow::Result<()>
where
    F: FnOnce(Listeners, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let telemetry = telemetry::init(service, &common.telemetry)?;
    let shutdown = crate::shutdown::on_signal();
    let result = async {
        let listeners = Listeners::bind(&common.server).await?;
        run(listeners, shutdown).await
    }
    .await;
    if let Err(err) = &result {
        tracing::error!(error = %err, "{service} failed");
    }
    telemetry.shutdown().await;
    result
}
