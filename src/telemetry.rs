//! Logs, traces and W3C trace context.
//!
//! [`init`] installs one tracing subscriber: logs (JSON with the enclosing spans, or human
//! formats) and an OpenTelemetry layer whose spans are exported over OTLP/gRPC when an endpoint
//! is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`). Trace context crosses gRPC hops as W3C
//! `traceparent`/`tracestate` metadata: [`GrpcClientTraceLayer`] injects it into outgoing
//! calls, the server layer in [`crate::server`] extracts it, and [`inject_into_map`] /
//! [`extract_from_map`] carry it through task headers.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, TelemetryArgs};

/// Flushes and stops span export; call [`TelemetryGuard::shutdown`] before the process exits.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl TelemetryGuard {
    /// Exports what is buffered (bounded to 5 s) and stops the exporter.
    pub async fn shutdown(self) {
        // The SDK's shutdown blocks its thread while the exporter, which runs on this runtime,
        // finishes: run it on a blocking thread so the runtime stays free to do that work.
        let provider = self.provider;
        let flushed = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::task::spawn_blocking(move || provider.shutdown()),
        )
        .await;
        match flushed {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                tracing::warn!(error = %err, "span export did not shut down cleanly")
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "span export shutdown panicked"),
            Err(_) => tracing::warn!("span export did not finish within 5s"),
        }
    }
}

/// A tracer provider exporting to `endpoint` (OTLP/gRPC), or exporting nothing when `None`.
pub fn tracer_provider(
    service_name: &str,
    endpoint: Option<&str>,
) -> Result<SdkTracerProvider, opentelemetry_otlp::ExporterBuildError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name.to_owned())
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    if let Some(endpoint) = endpoint {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// Installs the global subscriber and propagator. Must run inside a multi-threaded Tokio
/// runtime (the OTLP exporter lives on it). Fails if a subscriber is already installed.
pub fn init(default_service_name: &str, args: &TelemetryArgs) -> anyhow::Result<TelemetryGuard> {
    let service_name = args.service_name.as_deref().unwrap_or(default_service_name);
    let provider = tracer_provider(service_name, args.otlp_endpoint.as_deref())?;
    let filter =
        EnvFilter::try_new(&args.log).map_err(|e| anyhow::anyhow!("--log `{}`: {e}", args.log))?;
    let format = match args.log_format {
        LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Compact,
        LogFormat::Auto => LogFormat::Json,
        other => other,
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match format {
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .boxed(),
        LogFormat::Pretty => fmt.pretty().boxed(),
        _ => fmt.compact().boxed(),
    };
    // Spans are built only when they go somewhere: without an endpoint the OpenTelemetry layer
    // would cost every call span bookkeeping for nothing (logs then take the caller's trace id
    // from its `traceparent`, see `crate::server`).
    EXPORTING.store(
        args.otlp_endpoint.is_some(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let otel = args.otlp_endpoint.is_some().then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("sluice"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    // The log filter applies to logs only: `--log warn` must not silence exported traces.
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel)
        .try_init()?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    opentelemetry::global::set_tracer_provider(provider.clone());
    if let Some(endpoint) = &args.otlp_endpoint {
        tracing::info!(%endpoint, service_name, "exporting traces over OTLP/gRPC");
    }
    Ok(TelemetryGuard { provider })
}

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is set): only then do span fields that only
/// the exporter reads need recording.
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The trace id of `span` as 32 hex digits, or `None` when it has no valid trace.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_ref = context.span();
    let span_context = span_ref.span_context();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct MapReader<'a>(&'a HashMap<String, String>);

impl Extractor for MapReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The trace id of a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id_from_headers(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get("traceparent")?.to_str().ok()?;
    let trace_id = value.split('-').nth(1)?;
    (trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace_id)
}

/// Writes `span`'s trace context into HTTP/gRPC headers.
pub fn inject_into_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Reads a trace context from HTTP/gRPC headers (empty context when there is none).
pub fn extract_from_headers(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Writes `span`'s trace context into a string map (a task's headers).
pub fn inject_into_map(span: &tracing::Span, map: &mut HashMap<String, String>) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut MapCarrier(map));
}

/// Makes the trace context in `map` (a task's "traceparent") the parent of `span`, which must
/// not have been entered yet. A map without a valid one leaves `span` as it is.
pub fn adopt_parent_from_map(span: &tracing::Span, map: &HashMap<String, String>) {
    let cx = extract_from_map(map);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Reads a trace context from a string map (a task's headers).
pub fn extract_from_map(map: &HashMap<String, String>) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MapReader(map))
}

/// Tower layer for gRPC clients: one `grpc.client` span per call, its context injected into
/// the request metadata so the server's span joins the same trace.
///
/// ```ignore
/// let channel = tower::ServiceBuilder::new()
///     .layer(sluice::telemetry::GrpcClientTraceLayer)
///     .service(endpoint.connect().await?);
/// let client = LimiterClient::new(channel);
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcClientTraceLayer;

impl<S> tower::Layer<S> for GrpcClientTraceLayer {
    type Service = GrpcClientTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcClientTrace { inner }
    }
}

/// The service [`GrpcClientTraceLayer`] builds.
#[derive(Debug, Clone)]
pub struct GrpcClientTrace<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcClientTrace<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let (service, method) = rpc_names(request.uri().path());
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %request.uri().path().trim_start_matches('/'),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        if !span.is_disabled() {
            inject_into_headers(&span, request.headers_mut());
        }
        self.inner.call(request).instrument(span)
    }
}

/// `(service, method)` of a gRPC path `/pkg.Service/Method`.
pub(crate) fn rpc_names(path: &str) -> (&str, &str) {
    path.trim_start_matches('/')
        .split_once('/')
        .unwrap_or((path, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_split_service_and_method() {
        assert_eq!(
            rpc_names("/sluice.limiter.v1.Limiter/CheckLimit"),
            ("sluice.limiter.v1.Limiter", "CheckLimit")
        );
        assert_eq!(rpc_names("odd"), ("odd", ""));
    }

    #[test]
    fn context_round_trips_through_a_map() {
        let mut map = HashMap::new();
        map.insert(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        let cx = extract_from_map(&map);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
