//! The load generator's HTTP/2 connection for unary gRPC calls, on the `h2` crate directly.
//!
//! The generated tonic clients run on it unchanged (`LimiterClient::new(conn)`): it is a tower
//! service from `http::Request` to `http::Response`, as tonic's `Channel` is. What it leaves
//! out is what a load generator on the service's own cores should not pay for on every call:
//! `Channel`'s request queue (a `tower::buffer` task every call passes through), its reconnect
//! and origin layers, and hyper's client, which spawns a task per request to copy the request
//! body into the stream. Here a call sends its headers and its one message from the caller's
//! own task, the message with END_STREAM as one DATA frame, and reads the answer and its
//! trailers from the stream.
//!
//! On the wire a call is what any gRPC client sends: `POST` to `/<service>/<method>` with
//! `content-type: application/grpc` and `te: trailers` (both set by tonic's codec), a
//! `user-agent`, the length-prefixed message, and the same HTTP/2 settings as hyper's client
//! (tonic's): 2 MiB stream and 5 MiB connection windows, 16 KiB of headers, 1 MiB send
//! buffer per stream, 100 streams assumed before the server's settings arrive, no server push.
//!
//! `https://` targets are reached over TLS (rustls, ALPN `h2`), trusting only the CA given
//! with `--tls-ca` and presenting `--tls-cert` for mutual TLS: what TLS costs the service can
//! be measured with the same load generator.
//!
//! A connection is dialled once: if it fails (the service restarts, say), every later call on
//! it fails and counts as an error; nothing reconnects in the middle of a measurement.
//!
//! Unary calls only: the request body is read to its end before the call returns. The Lease
//! stream's workloads ([`crate::lease`]) use tonic's `Channel`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http_body::{Body, Frame};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the service learns of its caller.
const USER_AGENT: http::HeaderValue =
    http::HeaderValue::from_static(concat!("sluice-bench/", env!("CARGO_PKG_VERSION")));

/// One HTTP/2 connection. Clones share it; a call takes one stream of it.
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    /// `http` or `https`, as the target said.
    scheme: Scheme,
    authority: Authority,
    /// Sent as `authorization` on every call, for services with auth on.
    credentials: Option<http::HeaderValue>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Dials `target` (`http://host:port`, or `https://host:port` with `tls`), within
    /// `timeout`, and starts the connection's task on the current runtime. The connection
    /// lives as long as a clone of the returned value.
    pub async fn connect(
        target: &str,
        timeout: Duration,
        tls: Option<&tokio_rustls::TlsConnector>,
    ) -> anyhow::Result<Self> {
        let uri: Uri = target
            .parse()
            .with_context(|| format!("--target `{target}` is not a valid URL"))?;
        let scheme = uri.scheme().cloned();
        let tls = match (&scheme, tls) {
            (Some(s), None) if *s == Scheme::HTTP => None,
            (Some(s), Some(tls)) if *s == Scheme::HTTPS => Some(tls),
            (Some(s), Some(_)) if *s == Scheme::HTTP => {
                anyhow::bail!("--target `{target}`: the TLS options apply to https:// targets")
            }
            (Some(s), None) if *s == Scheme::HTTPS => anyhow::bail!(
                "--target `{target}`: an https:// target needs --tls-ca (the CA that signs the service's certificate)"
            ),
            _ => anyhow::bail!("--target `{target}`: give an http:// or https:// URL"),
        };
        let authority = uri
            .authority()
            .cloned()
            .with_context(|| format!("--target `{target}` names no host"))?;
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let dial = async {
            let tcp = tokio::net::TcpStream::connect((authority.host(), port)).await?;
            tcp.set_nodelay(true)?;
            match tls {
                None => handshake(tcp).await,
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(authority.host().to_owned())
                        .with_context(|| {
                            format!("`{}` is not a host name for TLS", authority.host())
                        })?;
                    handshake(tls.connect(name, tcp).await?).await
                }
            }
        };
        let send = tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| anyhow::anyhow!("no connection within {timeout:?}"))?
            .with_context(|| format!("connecting to {target}"))?;
        Ok(Self {
            send,
            scheme: scheme.unwrap_or(Scheme::HTTP),
            authority,
            credentials: None,
        })
    }

    /// This connection, sending `credentials` as every call's `authorization`.
    #[must_use]
    pub fn with_credentials(self, credentials: Option<http::HeaderValue>) -> Self {
        Self {
            credentials,
            ..self
        }
    }
}

/// The HTTP/2 handshake over `io`, with hyper's client settings (see the module's text); the
/// connection's task is spawned: when the connection fails, it ends and every call on it
/// fails with the cause.
async fn handshake<T>(io: T) -> anyhow::Result<h2::client::SendRequest<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .initial_max_send_streams(100)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    tokio::spawn(async move {
        let _closed = connection.await;
    });
    Ok(send)
}

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<Incoming>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Ready when the server's limit on concurrent streams leaves room for one more.
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (mut head, body) = request.into_parts();
        let path = head
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path)
            .build();
        let sent = uri.map_err(BoxError::from).and_then(|uri| {
            head.uri = uri;
            head.headers.insert(http::header::USER_AGENT, USER_AGENT);
            if let Some(credentials) = &self.credentials {
                head.headers
                    .insert(http::header::AUTHORIZATION, credentials.clone());
            }
            self.send
                .send_request(http::Request::from_parts(head, ()), false)
                .map_err(BoxError::from)
        });
        Box::pin(async move {
            let (response, mut stream) = sent?;
            // A unary request body is one message: it goes out as one DATA frame carrying
            // END_STREAM, found by looking one frame ahead.
            let mut body = std::pin::pin!(body);
            let mut pending: Option<Bytes> = None;
            while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                if let Ok(data) = frame?.into_data()
                    && let Some(earlier) = pending.replace(data)
                {
                    stream.send_data(earlier, false)?;
                }
            }
            stream.send_data(pending.unwrap_or_default(), true)?;
            let response = response.await?;
            Ok(response.map(|stream| Incoming {
                stream,
                data_done: false,
            }))
        })
    }
}

/// A response body: the stream's DATA frames, then its trailers (where gRPC puts the status).
/// Received data is handed back to flow control as it is read.
pub struct Incoming {
    stream: h2::RecvStream,
    data_done: bool,
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    this.stream.flow_control().release_capacity(data.len())?;
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(
            ready!(this.stream.poll_trailers(cx))
                .transpose()
                .map(|t| t.map(Frame::trailers)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    /// A real tonic server on a free loopback port, serving gRPC health with one service
    /// marked serving.
    async fn health_server() -> anyhow::Result<String> {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("bench.Up", tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        tokio::spawn(async move {
            // Kept alive by the reporter: the server answers while the test runs.
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        Ok(format!("http://{address}"))
    }

    #[tokio::test]
    async fn tonic_clients_call_a_real_server_over_it() -> anyhow::Result<()> {
        let target = health_server().await?;
        let conn = Conn::connect(&target, Duration::from_secs(5), None).await?;
        let mut client = HealthClient::new(conn.clone());
        // The request's message reaches the server: the answer depends on the name it carries.
        for _ in 0..3 {
            let up = client
                .check(HealthCheckRequest {
                    service: "bench.Up".to_owned(),
                })
                .await?;
            assert_eq!(up.get_ref().status, ServingStatus::Serving as i32);
        }
        // An error answered in the headers alone (trailers-only) comes back as its status.
        let unknown = HealthClient::new(conn)
            .check(HealthCheckRequest {
                service: "bench.Unknown".to_owned(),
            })
            .await;
        let status = unknown.err().map(|status| status.code());
        assert_eq!(status, Some(tonic::Code::NotFound));
        Ok(())
    }

    #[tokio::test]
    async fn many_calls_in_flight_share_one_connection() -> anyhow::Result<()> {
        let target = health_server().await?;
        let conn = Conn::connect(&target, Duration::from_secs(5), None).await?;
        let calls = (0..500).map(|_| {
            let mut client = HealthClient::new(conn.clone());
            async move {
                client
                    .check(HealthCheckRequest {
                        service: "bench.Up".to_owned(),
                    })
                    .await
                    .map(|answer| answer.into_inner().status)
            }
        });
        let answers = futures::future::join_all(calls).await;
        let serving = answers
            .iter()
            .filter(|answer| matches!(answer, Ok(s) if *s == ServingStatus::Serving as i32))
            .count();
        assert_eq!(serving, 500, "{:?}", answers.iter().find(|a| a.is_err()));
        Ok(())
    }

    /// limiter-svc over TLS (mutual TLS when `mutual`), with a CA and leaves made by
    /// openssl: the service, a client the CA signed, and one signed by another CA.
    async fn tls_limiter(
        pki: &sluice_testkit::auth::Pki,
        mutual: bool,
    ) -> anyhow::Result<(sluice_testkit::Service, String)> {
        pki.issue("ca", &["server", "client"])?;
        pki.issue("other", &["stranger"])?;
        let mut args = vec![
            "limiter-svc".to_owned(),
            "--no-auth".to_owned(),
            "--tls-cert".to_owned(),
            pki.arg("server.crt"),
            "--tls-key".to_owned(),
            pki.arg("server.key"),
        ];
        if mutual {
            args.extend(["--tls-client-ca".to_owned(), pki.arg("ca.crt")]);
        }
        let config = limiter_svc::Config::from_args(args)?;
        let service = sluice_testkit::Service::start(|l, s| limiter_svc::run(l, config, s)).await?;
        let url = format!("https://127.0.0.1:{}", service.grpc.port());
        Ok((service, url))
    }

    /// One CheckLimit over `conn`: allowed, or the failure.
    async fn check(conn: Conn) -> anyhow::Result<()> {
        use sluice::proto::sluice::limiter::v1 as pb;
        let request = pb::CheckLimitRequest {
            checks: vec![pb::Check {
                scope: "user".to_owned(),
                subject: "tls".to_owned(),
                limit: Some(pb::check::Limit::Inline(pb::InlineLimit {
                    algorithm: pb::Algorithm::Gcra as i32,
                    limit: 10,
                    window: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                    burst: 0,
                })),
            }],
            cost: 1,
            request_id: String::new(),
        };
        let answer = pb::limiter_client::LimiterClient::new(conn)
            .check_limit(request)
            .await?;
        anyhow::ensure!(answer.get_ref().allowed, "{answer:?}");
        Ok(())
    }

    fn connector(
        pki: &sluice_testkit::auth::Pki,
        ca: &str,
        identity: Option<&str>,
    ) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let (cert, key) = identity.map_or((None, None), |name| {
            (
                Some(pki.file(&format!("{name}.crt"))),
                Some(pki.file(&format!("{name}.key"))),
            )
        });
        let config =
            sluice::tls::rustls_client_config(&pki.file(ca), cert.as_deref().zip(key.as_deref()))?;
        Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
            config,
        )))
    }

    #[tokio::test]
    async fn https_targets_are_reached_over_tls_trusting_only_the_given_ca() -> anyhow::Result<()> {
        let pki = sluice_testkit::auth::Pki::new()?;
        let (service, url) = tls_limiter(&pki, false).await?;
        let timeout = Duration::from_secs(5);
        let trusted = connector(&pki, "ca.crt", None)?;
        check(Conn::connect(&url, timeout, Some(&trusted)).await?).await?;
        // A CA that did not sign the service's certificate: the handshake fails.
        let other = connector(&pki, "other.crt", None)?;
        let refused = Conn::connect(&url, timeout, Some(&other)).await;
        assert!(refused.is_err(), "{refused:?}");
        // TLS options with an http:// target are refused, not ignored.
        let plain = url.replace("https://", "http://");
        let err = Conn::connect(&plain, timeout, Some(&trusted)).await.err();
        assert!(
            format!("{err:?}").contains("apply to https:// targets"),
            "{err:?}"
        );
        service.stop().await
    }

    #[tokio::test]
    async fn mutual_tls_presents_the_client_certificate() -> anyhow::Result<()> {
        let pki = sluice_testkit::auth::Pki::new()?;
        let (service, url) = tls_limiter(&pki, true).await?;
        let timeout = Duration::from_secs(5);
        let client = connector(&pki, "ca.crt", Some("client"))?;
        check(Conn::connect(&url, timeout, Some(&client)).await?).await?;
        // Without a certificate, or with one the service's CA did not sign, no call is served
        // (TLS 1.3 may finish the client's side of the handshake before the server refuses).
        for identity in [None, Some("stranger")] {
            let tls = connector(&pki, "ca.crt", identity)?;
            let outcome = async { check(Conn::connect(&url, timeout, Some(&tls)).await?).await };
            assert!(outcome.await.is_err(), "{identity:?} was served");
        }
        service.stop().await
    }

    #[tokio::test]
    async fn targets_it_cannot_reach_are_refused_with_the_reason() {
        let refused = |target: &'static str| async move {
            Conn::connect(target, Duration::from_secs(5), None)
                .await
                .err()
                .map(|err| format!("{err:#}"))
                .unwrap_or_default()
        };
        assert!(
            refused("https://127.0.0.1:1")
                .await
                .contains("needs --tls-ca")
        );
        assert!(refused("not a url").await.contains("not a valid URL"));
        // A port nothing listens on: bind one, then close it.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| format!("http://{address}"))
            .unwrap_or_default();
        let err = Conn::connect(&closed, Duration::from_secs(5), None)
            .await
            .err();
        assert!(
            err.is_some_and(|err| format!("{err:#}").contains("connecting to")),
            "a closed port fails to connect"
        );
    }
}
