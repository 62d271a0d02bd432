//! Server scaffolding every Sluice binary shares: the gRPC stack (span + metrics per call),
//! health checking, reflection (v1 and v1alpha), bounded graceful shutdown, and the
//! Prometheus `/metrics` endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::{Access, AccessFn, Auth};
use crate::config::{CommonArgs, ServerArgs};
use crate::telemetry;

/// What a gRPC handler here is given and answers: hyper's request body as it arrives (the
/// generated servers read any body type, so it is not boxed again), tonic's response body.
type Call = http::Request<hyper::body::Incoming>;
type Reply = http::Response<tonic::body::Body>;
type Route = tower::util::BoxCloneSyncService<Call, Reply, Infallible>;

/// The gRPC services a server answers, by name, each behind the per-call layer
/// ([`GrpcServer`]), the caller's deadline and the auth guard. Calls go from hyper's HTTP/2
/// connection straight to the service their path names: no HTTP router, no per-connection
/// tower stack.
#[derive(Clone)]
pub struct Router {
    routes: Vec<(&'static str, Route)>,
    /// Answers calls to services not served here.
    unknown: Route,
    auth: Auth,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.routes.iter().map(|(name, _)| name))
            .finish()
    }
}

impl Router {
    /// A router serving nothing yet, whose services check callers with `auth`.
    pub fn new(auth: Auth) -> Self {
        let unknown = tower::service_fn(|call: Call| async move {
            let service = service_name(call.uri().path());
            Ok::<_, Infallible>(
                tonic::Status::unimplemented(format!("no service {service:?} here")).into_http(),
            )
        });
        Self {
            routes: Vec::new(),
            unknown: Route::new(tower::Layer::layer(&GrpcServerLayer, unknown)),
            auth,
        }
    }

    /// Serves `service` (a generated tonic server) under its gRPC name; `access` says what
    /// each of its methods asks of callers.
    #[must_use]
    pub fn add_service<S>(mut self, service: S, access: AccessFn) -> Self
    where
        S: tower::Service<Call, Response = Reply, Error = Infallible>
            + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let guarded = Guarded {
            inner: service,
            auth: self.auth.clone(),
            access,
        };
        let service = tower::Layer::layer(&GrpcServerLayer, WithDeadline(guarded));
        self.routes.push((S::NAME, Route::new(service)));
        self
    }

    /// Answers one call: its service's answer, or UNIMPLEMENTED for a service not served here.
    async fn call(&self, call: Call) -> Reply {
        let service = service_name(call.uri().path());
        let route = self
            .routes
            .iter()
            .find_map(|(name, route)| (*name == service).then_some(route))
            .unwrap_or(&self.unknown);
        match tower::ServiceExt::oneshot(route.clone(), call).await {
            Ok(reply) => reply,
            Err(never) => match never {},
        }
    }
}

/// A service whose calls first pass the auth check its method asks for: UNAUTHENTICATED or
/// PERMISSION_DENIED otherwise, before the request is read. Calls that pass carry the
/// caller's `Arc<Identity>` in their extensions.
#[derive(Clone)]
struct Guarded<S> {
    inner: S,
    auth: Auth,
    access: AccessFn,
}

impl<S> tower::Service<Call> for Guarded<S>
where
    S: tower::Service<Call, Response = Reply, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = futures::future::Either<S::Future, std::future::Ready<Result<Reply, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let method = call.uri().path().rsplit('/').next().unwrap_or_default();
        let Some(access) = (self.access)(method) else {
            let status = tonic::Status::unimplemented(format!("no method {method:?} here"));
            return futures::future::Either::Right(std::future::ready(Ok(status.into_http())));
        };
        if access != Access::Open {
            let admitted = self
                .auth
                .authenticate(call.headers())
                .and_then(|who| who.admit(access, method).map(|()| who));
            match admitted {
                Ok(who) => {
                    let presented = self.auth.presented(call.headers());
                    call.extensions_mut().insert(who);
                    call.extensions_mut().insert(presented);
                }
                Err(status) => {
                    return futures::future::Either::Right(std::future::ready(Ok(
                        status.into_http()
                    )));
                }
            }
        }
        futures::future::Either::Left(self.inner.call(call))
    }
}

/// The service part of a gRPC path (`/package.Service/Method`); empty if there is none.
fn service_name(path: &str) -> &str {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .map_or("", |(service, _)| service)
}

/// A service whose calls answer DEADLINE_EXCEEDED once the caller's `grpc-timeout` passes.
#[derive(Clone)]
struct WithDeadline<S>(S);

impl<S> tower::Service<Call> for WithDeadline<S>
where
    S: tower::Service<Call, Response = Reply, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Reply;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Reply, Infallible>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> Self::Future {
        let deadline = call
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.as_bytes()));
        if let Some(timeout) = deadline
            && let Some(at) = Instant::now().checked_add(timeout)
        {
            call.extensions_mut().insert(CallDeadline { at, timeout });
        }
        let answer = self.0.call(call);
        Box::pin(async move {
            let Some(limit) = deadline else {
                return answer.await;
            };
            match tokio::time::timeout(limit, answer).await {
                Ok(reply) => reply,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call's grpc-timeout of {limit:?} passed"
                ))
                .into_http()),
            }
        })
    }
}

/// A call's deadline, from its `grpc-timeout` as the call arrived. The server puts it in the
/// request's extensions (`request.extensions().get::<CallDeadline>()`) and answers
/// DEADLINE_EXCEEDED when it passes, so a handler that waits (a long poll) answers before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline {
    /// When the deadline passes.
    pub at: Instant,
    /// The caller's timeout, measured from the call's arrival.
    pub timeout: Duration,
}

/// A `grpc-timeout` header's value (gRPC over HTTP/2: at most 8 digits and a unit, H M S m u
/// n); `None` when absent or malformed, as if the caller had set no deadline.
fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// gRPC health service name of the server as a whole.
pub const WHOLE_SERVER: &str = "";

/// A router already serving `grpc.health.v1.Health` and both reflection versions (open to
/// anyone), advertising `services` (fully-qualified names found in `descriptor_sets`), whose
/// further services check callers with `auth`. Returns the health reporter
/// so the service can flip its status (e.g. degraded when its store is unreachable).
pub fn router(
    descriptor_sets: &[&'static [u8]],
    services: &[&str],
    auth: Auth,
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
    // Their own servers answer names they do not have.
    let open: AccessFn = |_| Some(Access::Open);
    let router = Router::new(auth)
        .add_service(health, open)
        .add_service(reflection().build_v1()?, open)
        .add_service(reflection().build_v1alpha()?, open);
    Ok((router, reporter))
}

/// Most calls (lease streams included) one client connection carries at once. A client past it
/// waits for one of its calls to finish; some clients open another connection instead.
pub const MAX_CALLS_PER_CONNECTION: u32 = 1024;

/// How a gRPC server treats its connections (`--shutdown-grace`, `--http2-keepalive`,
/// `--tls-*`).
#[derive(Debug, Clone)]
pub struct Connections {
    /// How long in-flight calls may run after shutdown begins.
    pub grace: Duration,
    /// After this long without a frame from the client, a PING; `None`: no pings.
    pub keepalive: Option<Duration>,
    /// How long a new connection has to send the HTTP/2 client preface. Clients send it as soon
    /// as they connect; a connection that sends nothing, or only part of it, for this long is
    /// closed. (Once the preface is in, keep-alive PINGs find clients that stop answering.)
    /// With TLS the TLS handshake counts within it.
    pub handshake: Duration,
    /// TLS (mutual when it names a client CA); `None`: plaintext HTTP/2.
    pub tls: Option<crate::tls::Tls>,
}

/// [`Connections::handshake`] of the service binaries.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Length of the HTTP/2 client connection preface (`PRI * HTTP/2.0...`).
const PREFACE_LEN: usize = 24;

/// A new connection's socket, telling the connection's task once the client's preface has been
/// read. hyper arms keep-alive only after it, so without this a client could hold a connection
/// by sending a few bytes and stopping.
struct PrefaceWatch<T> {
    io: T,
    /// Preface bytes still to come; 0 once it is in.
    awaited: usize,
    arrived: Option<tokio::sync::oneshot::Sender<()>>,
}

impl<T> PrefaceWatch<T> {
    fn new(io: T) -> (Self, tokio::sync::oneshot::Receiver<()>) {
        let (arrived, watch) = tokio::sync::oneshot::channel();
        let io = Self {
            io,
            awaited: PREFACE_LEN,
            arrived: Some(arrived),
        };
        (io, watch)
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for PrefaceWatch<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if this.awaited > 0 {
            this.awaited = this
                .awaited
                .saturating_sub(buf.filled().len().saturating_sub(before));
            if this.awaited == 0
                && let Some(arrived) = this.arrived.take()
            {
                let _ = arrived.send(());
            }
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for PrefaceWatch<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A connection's socket: plain TCP, or TLS over it.
enum Socket {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Socket {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Socket {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Longest wait for a keep-alive PING's answer.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `router` over HTTP/2 on `listener` until `shutdown` is cancelled: then the listener
/// closes, every connection is told to finish (GOAWAY), and in-flight calls get at most
/// `grace`. Connections still open then are dropped, which resets their streams and ends the
/// calls (long polls, lease streams) that were still running.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: CancellationToken,
    settings: Connections,
) -> std::io::Result<()> {
    let Connections {
        grace,
        keepalive,
        handshake,
        tls,
    } = settings;
    let router = Arc::new(router);
    let mut http2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    http2
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(MAX_CALLS_PER_CONNECTION);
    if let Some(interval) = keepalive {
        http2
            .keep_alive_interval(interval)
            .keep_alive_timeout(interval.min(KEEPALIVE_TIMEOUT));
    }
    let connections = tokio_util::task::TaskTracker::new();
    // Cancelled when the grace has passed: connections still open are dropped.
    let cut = CancellationToken::new();
    let accepted = async {
        loop {
            let (stream, _) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    // Out of file descriptors, a connection reset before it was taken: the
                    // listener itself stays usable.
                    Err(err) => {
                        tracing::warn!(error = %err, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            // Responses and Redis calls are small and latency-bound.
            let _ = stream.set_nodelay(true);
            let router = Arc::clone(&router);
            let calls = hyper::service::service_fn(move |request: Call| {
                let router = Arc::clone(&router);
                async move { Ok::<_, Infallible>(router.call(request).await) }
            });
            let (http2, stop, cut) = (http2.clone(), shutdown.clone(), cut.clone());
            let tls = tls.as_ref().map(crate::tls::Tls::acceptor);
            connections.spawn(async move {
                // Until a connection's first bytes arrive it costs a task and a socket, not
                // yet an HTTP/2 connection's buffers: port probes and TCP health checks end
                // here.
                let deadline = Instant::now() + handshake;
                let mut first = [0; 1];
                tokio::select! {
                    waited = tokio::time::timeout_at(deadline, stream.peek(&mut first)) => {
                        if waited.is_err() {
                            tracing::debug!(?handshake, "a connection sent nothing; closing it");
                            return;
                        }
                    }
                    () = stop.cancelled() => return,
                }
                let stream = match tls {
                    None => Socket::Plain(stream),
                    Some(acceptor) => {
                        let accepted = tokio::select! {
                            accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => accepted,
                            () = stop.cancelled() => return,
                        };
                        match accepted {
                            Ok(Ok(stream)) => Socket::Tls(Box::new(stream)),
                            // A client that does not trust the certificate, has none to show
                            // (mutual TLS), or speaks plaintext.
                            Ok(Err(err)) => {
                                metrics::counter!("sluice_tls_handshake_failures_total").increment(1);
                                tracing::debug!(error = %err, "TLS handshake failed; closing the connection");
                                return;
                            }
                            Err(_) => {
                                metrics::counter!("sluice_tls_handshake_failures_total").increment(1);
                                tracing::debug!(?handshake, "TLS handshake not done in time; closing the connection");
                                return;
                            }
                        }
                    }
                };
                let (io, preface) = PrefaceWatch::new(stream);
                let connection = http2.serve_connection(hyper_util::rt::TokioIo::new(io), calls);
                tokio::pin!(connection);
                let preface = tokio::time::timeout_at(deadline, preface);
                tokio::pin!(preface);
                let mut handshaken = false;
                let finished = loop {
                    tokio::select! {
                        finished = &mut connection => break Some(finished),
                        // An error from the channel means the connection (and its socket) is
                        // gone: the branch above ends the loop.
                        waited = &mut preface, if !handshaken => match waited {
                            Ok(_) => handshaken = true,
                            Err(_) => {
                                tracing::debug!(?handshake, "a connection did not send its HTTP/2 preface in time; closing it");
                                return;
                            }
                        },
                        // A connection that has not said a word yet has no calls to finish.
                        () = stop.cancelled(), if !handshaken => return,
                        () = stop.cancelled(), if handshaken => {
                            connection.as_mut().graceful_shutdown();
                            break tokio::select! {
                                finished = &mut connection => Some(finished),
                                () = cut.cancelled() => None,
                            };
                        }
                    }
                };
                if let Some(Err(err)) = finished {
                    tracing::debug!(error = %err, "connection ended with an error");
                }
            });
        }
    };
    accepted.await;
    // New clients are refused at once instead of hanging.
    drop(listener);
    connections.close();
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "in-flight calls did not finish within the shutdown grace; cutting them"
        );
        cut.cancel();
        // Dropping a connection takes no I/O; the bound only guards against a stuck task.
        let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    }
    Ok(())
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
    connections: Connections,
) -> anyhow::Result<()> {
    let grpc = listeners.grpc.local_addr()?;
    let metrics = listeners.metrics.local_addr()?;
    tracing::info!(service, %grpc, %metrics, tls = connections.tls.is_some(), "listening");
    let reload_tls = connections
        .tls
        .clone()
        .map(|tls| tls.watch(crate::auth::RELOAD_EVERY, shutdown.clone()));
    let grpc_server = async {
        serve(router, listeners.grpc, shutdown.clone(), connections)
            .await
            .map_err(|e| anyhow::anyhow!("gRPC server on {grpc}: {e}"))
    };
    let metrics_server = async {
        serve_metrics(listeners.metrics, shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("metrics server on {metrics}: {e}"))
    };
    let reload_tls = async {
        if let Some(watch) = reload_tls {
            watch.await;
        }
        Ok(())
    };
    let result = tokio::try_join!(grpc_server, metrics_server, reload_tls).map(|_| ());
    // Either server failing stops the other: a half-up binary is worse than a restart.
    shutdown.cancel();
    tracing::info!(service, "stopped");
    result
}

/// `grpc-status` of UNIMPLEMENTED.
const UNIMPLEMENTED: &str = "12";

/// The `method` label of calls to paths that name no method served here.
pub const UNKNOWN_METHOD: &str = "unknown";

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
                    // UNIMPLEMENTED answers a path naming no method served here, which the
                    // caller picks freely: such calls share one label, so that probing cannot
                    // grow the metrics without bound.
                    let method = if code == UNIMPLEMENTED {
                        UNKNOWN_METHOD.to_owned()
                    } else {
                        path
                    };
                    metrics::counter!("sluice_grpc_requests_total", "method" => method.clone(), "code" => code)
                        .increment(1);
                    metrics::histogram!("sluice_grpc_request_duration_seconds", "method" => method)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_reads_every_unit_and_refuses_malformed_values() {
        assert_eq!(grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(b"10S"), Some(Duration::from_secs(10)));
        assert_eq!(grpc_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(
            grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(b"0n"), Some(Duration::ZERO));
        for malformed in [
            &b""[..],
            b"m",
            b"10",
            b"10s",
            b"123456789m",
            b"-5S",
            b"1.5S",
            b" 5S",
        ] {
            assert_eq!(
                grpc_timeout(malformed),
                None,
                "{:?}",
                String::from_utf8_lossy(malformed)
            );
        }
    }

    /// A service whose calls never answer; it counts the calls it was given (`.0`) and those
    /// that ended, dropped by the server (`.1`).
    #[derive(Clone, Default)]
    struct Silent(
        Arc<tokio::sync::watch::Sender<usize>>,
        Arc<tokio::sync::watch::Sender<usize>>,
    );

    /// Counts one ended call when dropped.
    struct Ended(Arc<tokio::sync::watch::Sender<usize>>);

    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.send_modify(|ended| *ended += 1);
        }
    }

    impl tonic::server::NamedService for Silent {
        const NAME: &'static str = "sluice.test.Silent";
    }

    impl tower::Service<Call> for Silent {
        type Response = Reply;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Reply, Infallible>>;

        fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Call) -> Self::Future {
            self.0.send_modify(|calls| *calls += 1);
            let ended = Ended(Arc::clone(&self.1));
            Box::pin(async move {
                let _ended = ended;
                std::future::pending().await
            })
        }
    }

    async fn call(channel: &tonic::transport::Channel, path: &'static str) -> tonic::Status {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        if let Err(err) = grpc.ready().await {
            return tonic::Status::unavailable(err.to_string());
        }
        let request = tonic::Request::new(());
        let codec = tonic_prost::ProstCodec::<(), ()>::default();
        match grpc
            .unary(request, http::uri::PathAndQuery::from_static(path), codec)
            .await
        {
            Ok(_) => tonic::Status::ok("answered"),
            Err(status) => status,
        }
    }

    /// One unary call with an empty message and `grpc-timeout: timeout`, over HTTP/2 alone;
    /// the status of its (trailers-only) answer.
    async fn call_without_client_deadline(
        addr: SocketAddr,
        path: &str,
        timeout: &str,
    ) -> anyhow::Result<tonic::Status> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (client, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(connection);
        let request = http::Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", timeout)
            .body(())?;
        let (answer, mut body) = client.ready().await?.send_request(request, false)?;
        body.send_data(tonic::codegen::Bytes::from_static(&[0; 5]), true)?;
        let answer = answer.await?;
        tonic::Status::from_header_map(answer.headers())
            .ok_or_else(|| anyhow::anyhow!("no grpc-status in {:?}", answer.headers()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadlines_unknown_services_and_shutdown_are_answered() -> anyhow::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let silent = Silent::default();
        let mut calls = silent.0.subscribe();
        let mut ended = silent.1.subscribe();
        let server = tokio::spawn(serve(
            Router::new(Auth::Off).add_service(silent, |_| Some(Access::Open)),
            listener,
            shutdown.clone(),
            Connections {
                grace: Duration::from_millis(200),
                keepalive: None,
                handshake: HANDSHAKE_TIMEOUT,
                tls: None,
            },
        ));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;

        // The server, not the client, ends a call whose grpc-timeout passed (tonic's client
        // would also stop waiting, so the call goes out over bare HTTP/2).
        let late = tokio::time::timeout(
            Duration::from_secs(10),
            call_without_client_deadline(addr, "/sluice.test.Silent/Wait", "50m"),
        )
        .await??;
        assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");
        assert!(late.message().contains("grpc-timeout"), "{late:?}");
        // The server does not end a call because of a grpc-timeout it cannot read.
        let unread = tokio::time::timeout(
            Duration::from_millis(300),
            call_without_client_deadline(addr, "/sluice.test.Silent/Wait", "50 ms"),
        )
        .await;
        assert!(unread.is_err(), "{unread:?}");

        let unknown = call(&channel, "/sluice.test.Absent/Call").await;
        assert_eq!(unknown.code(), tonic::Code::Unimplemented, "{unknown:?}");
        assert!(
            unknown.message().contains("sluice.test.Absent"),
            "{unknown:?}"
        );

        // A call that never finishes holds shutdown for the grace, no longer; then its
        // connection is dropped, which ends the call on both sides.
        let hanging = tokio::spawn({
            let channel = channel.clone();
            async move { call(&channel, "/sluice.test.Silent/Wait").await }
        });
        tokio::time::timeout(Duration::from_secs(10), calls.wait_for(|n| *n == 3)).await??;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server).await???;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "the listener is closed once serve returns"
        );
        tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|n| *n == 3)).await??;
        let cut = tokio::time::timeout(Duration::from_secs(10), hanging).await??;
        assert_ne!(cut.code(), tonic::Code::Ok, "{cut:?}");
        Ok(())
    }

    /// A connection that never sends its preface, or only part of it, is closed; a client that opens a
    /// connection and then answers nothing (a vanished peer) is disconnected once a keep-alive
    /// PING goes unanswered; a client that answers keeps its connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_and_vanished_clients_are_disconnected_and_answering_ones_kept()
    -> anyhow::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let interval = Duration::from_millis(200);
        let server = tokio::spawn(serve(
            Router::new(Auth::Off).add_service(Silent::default(), |_| Some(Access::Open)),
            listener,
            shutdown.clone(),
            Connections {
                grace: Duration::from_millis(200),
                keepalive: Some(interval),
                handshake: interval,
                tls: None,
            },
        ));
        // A connection that sends nothing at all is closed, with nothing said.
        let mut mute = tokio::net::TcpStream::connect(addr).await?;
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), mute.read_to_end(&mut received)).await??;
        assert!(received.is_empty(), "{received:?}");

        // Nor may a client hold a connection by sending part of its preface and stopping.
        let mut dribbler = tokio::net::TcpStream::connect(addr).await?;
        dribbler.write_all(b"PRI * HTTP/2.0\r\n").await?;
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), dribbler.read_to_end(&mut received))
            .await??;

        let mut peer = tokio::net::TcpStream::connect(addr).await?;
        // The client preface and an empty SETTINGS frame; then silence.
        peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await?;
        let mut received = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), peer.read_to_end(&mut received)).await??;
        // The server's SETTINGS, the PING, and the GOAWAY, at least.
        assert!(received.len() >= 3 * 9, "{received:?}");

        // A client that answers (h2 answers PINGs while its connection task runs) keeps its
        // connection through idle spells many intervals long.
        let (client, connection) =
            h2::client::handshake(tokio::net::TcpStream::connect(addr).await?).await?;
        let connection = tokio::spawn(connection);
        for _ in 0..2 {
            tokio::time::sleep(5 * interval).await;
            let request = http::Request::post(format!("http://{addr}/sluice.test.Absent/Call"))
                .header("content-type", "application/grpc")
                .body(())?;
            let (answer, _body) = client.clone().ready().await?.send_request(request, true)?;
            let answer = answer.await?;
            assert_eq!(
                answer.headers().get("grpc-status").map(|v| v.as_bytes()),
                Some(&b"12"[..]),
                "{answer:?}"
            );
        }
        assert!(!connection.is_finished());
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), server).await???;
        Ok(())
    }
}
