//! One Redis connection pool for standalone Redis and Redis Cluster.
//!
//! The pool holds a few multiplexed connections (bb8 manages their lifecycle). A caller checks
//! one out, clones its handle and gives it straight back: clones of a multiplexed connection
//! share one socket, so concurrent requests are pipelined onto it instead of queueing for an
//! exclusive connection. A connection that saw a connection-level error is flagged broken,
//! which makes bb8 drop it and dial a new one on the next checkout.
//!
//! URLs: `redis://[user:pass@]host:port[/db]` and `rediss://…` (TLS) for one server;
//! `redis+cluster://[user:pass@]host1:port1,host2:port2` (or `rediss+cluster://`) for a
//! cluster, naming any subset of its nodes as seeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, Value};

use crate::breaker::{BREAKER_OPEN, Breaker};
use crate::error::{Error, Result};

/// How to reach Redis and how long to wait for it.
#[derive(Clone)]
pub struct RedisConfig {
    /// A Redis URL (see the module docs); may embed a password.
    pub url: String,
    /// Multiplexed connections kept open (per node, for a cluster: per pool slot).
    pub pool_size: u32,
    /// Bound on dialling a connection (and on waiting for one from the pool).
    pub connect_timeout: Duration,
    /// Bound on one command or script call, reply included.
    pub command_timeout: Duration,
    /// PEM root certificate(s) that sign the server's certificate, for `rediss://` with a
    /// private CA; `None` trusts the system's roots.
    pub tls_ca: Option<Vec<u8>>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("tls_ca", &self.tls_ca.as_ref().map(|_| "<pem>"))
            .finish()
    }
}

/// `url` with any password replaced by `***`, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:***@{hosts}")
        }
        None => url.to_owned(),
    }
}

/// Which kind of deployment a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One server (or a proxy in front of many).
    Standalone(String),
    /// Seed nodes of a Redis Cluster, each as a `redis://` or `rediss://` URL.
    Cluster(Vec<String>),
}

impl Topology {
    /// Parses a Redis URL; errors name the `redis-url` option.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |reason: &str| {
            Error::invalid("redis-url", format!("{reason} (got {})", redact_url(url)))
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected a URL such as redis://127.0.0.1:6379"))?;
        match scheme {
            "redis" | "rediss" => Ok(Self::Standalone(url.to_owned())),
            "redis+cluster" | "rediss+cluster" => {
                let node_scheme = scheme.trim_end_matches("+cluster");
                let (userinfo, hosts) = match rest.rsplit_once('@') {
                    Some((userinfo, hosts)) => (Some(userinfo), hosts),
                    None => (None, rest),
                };
                let hosts = hosts.trim_end_matches('/');
                let nodes: Vec<String> = hosts
                    .split(',')
                    .filter(|h| !h.is_empty())
                    .map(|host| match userinfo {
                        Some(userinfo) => format!("{node_scheme}://{userinfo}@{host}"),
                        None => format!("{node_scheme}://{host}"),
                    })
                    .collect();
                if nodes.is_empty() {
                    return Err(bad("a cluster URL lists at least one host:port"));
                }
                Ok(Self::Cluster(nodes))
            }
            _ => Err(bad(
                "the scheme must be redis, rediss, redis+cluster or rediss+cluster",
            )),
        }
    }
}

enum Backend {
    Standalone {
        client: redis::Client,
        config: redis::AsyncConnectionConfig,
    },
    Cluster(ClusterClient),
}

/// bb8's view of a Redis deployment: how to dial it and how to tell a dead connection.
struct Manager {
    backend: Backend,
    /// Connections made before the current generation are discarded (see `RedisPool::renew`).
    generation: Arc<AtomicU64>,
}

#[derive(Clone)]
enum Raw {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// A handle on a pooled multiplexed connection; cheap to clone, all clones share its socket.
#[derive(Clone)]
pub struct Connection {
    raw: Raw,
    broken: Arc<AtomicBool>,
    /// The pool's generation when it was made.
    born: u64,
    generation: Arc<AtomicU64>,
}

impl Connection {
    /// Failed in a way that leaves it unusable, or made before the pool was renewed.
    fn dead(&self) -> bool {
        self.broken.load(Ordering::Relaxed) || self.born < self.generation.load(Ordering::Relaxed)
    }

    fn note<T>(&self, result: &std::result::Result<T, RedisError>) {
        if let Err(err) = result
            && (err.is_unrecoverable_error() || err.is_connection_dropped() || err.is_io_error())
        {
            self.broken.store(true, Ordering::Relaxed);
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let result = match &mut self.raw {
                Raw::Standalone(conn) => conn.req_packed_command(cmd).await,
                Raw::Cluster(conn) => conn.req_packed_command(cmd).await,
            };
            self.note(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let result = match &mut self.raw {
                Raw::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count).await,
                Raw::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count).await,
            };
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        match &self.raw {
            Raw::Standalone(conn) => conn.get_db(),
            Raw::Cluster(conn) => conn.get_db(),
        }
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = Connection;
    type Error = RedisError;

    async fn connect(&self) -> std::result::Result<Connection, RedisError> {
        let raw = match &self.backend {
            Backend::Standalone { client, config } => Raw::Standalone(
                client
                    .get_multiplexed_async_connection_with_config(config)
                    .await?,
            ),
            Backend::Cluster(client) => Raw::Cluster(client.get_async_connection().await?),
        };
        Ok(Connection {
            raw,
            broken: Arc::new(AtomicBool::new(false)),
            born: self.generation.load(Ordering::Relaxed),
            generation: Arc::clone(&self.generation),
        })
    }

    async fn is_valid(&self, conn: &mut Connection) -> std::result::Result<(), RedisError> {
        redis::cmd("PING").query_async::<()>(conn).await
    }

    fn has_broken(&self, conn: &mut Connection) -> bool {
        conn.dead()
    }
}

/// The pool both services use; clone it freely.
#[derive(Clone)]
pub struct RedisPool {
    pool: bb8::Pool<Manager>,
    command_timeout: Duration,
    cluster: bool,
    /// Shared with the manager: see [`RedisPool::renew`].
    generation: Arc<AtomicU64>,
    /// [`RedisPool::guarded`]: the breaker this pool's calls report to, and that stops them
    /// while open.
    breaker: Option<Arc<Breaker>>,
}

impl std::fmt::Debug for RedisPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPool")
            .field("cluster", &self.cluster)
            .field("state", &self.pool.state())
            .field("guarded", &self.breaker.is_some())
            .finish()
    }
}

/// Socket options of every connection to Redis: TCP_NODELAY, so that a command written while
/// an earlier one is unanswered leaves at once. (The client's default leaves Nagle's algorithm
/// on, which holds such a write until the earlier segment is acknowledged: calls meant to
/// overlap on one connection would go one after another.)
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// `url` parsed, with [`tcp_settings`].
fn connection_info(url: &str) -> Result<redis::ConnectionInfo> {
    use redis::IntoConnectionInfo as _;
    Ok(url
        .into_connection_info()
        .map_err(|e| Error::invalid("redis-url", e.to_string()))?
        .set_tcp_settings(tcp_settings()))
}

impl RedisPool {
    /// Builds the pool without dialling: a service starts while Redis is down and reports
    /// itself degraded until the first connection succeeds.
    pub fn new(config: &RedisConfig) -> Result<Self> {
        // rustls needs one process-wide crypto provider; a second install is a no-op error.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = || redis::TlsCertificates {
            client_tls: None,
            root_cert: config.tls_ca.clone(),
        };
        let (backend, cluster) = match Topology::parse(&config.url)? {
            Topology::Standalone(url) => {
                let info = connection_info(&url)?;
                let client = match &config.tls_ca {
                    Some(_) => redis::Client::build_with_tls(info, certs()),
                    None => redis::Client::open(info),
                }
                .map_err(|e| Error::invalid("redis-url", e.to_string()))?;
                let conn_config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(config.connect_timeout))
                    .set_response_timeout(Some(config.command_timeout));
                (
                    Backend::Standalone {
                        client,
                        config: conn_config,
                    },
                    false,
                )
            }
            Topology::Cluster(nodes) => {
                let tls = nodes.iter().any(|n| n.starts_with("rediss://"));
                let mut builder = ClusterClient::builder(nodes);
                if tls {
                    builder = builder.tls(redis::TlsMode::Secure);
                    if config.tls_ca.is_some() {
                        builder = builder.certs(certs());
                    }
                }
                let client = builder
                    .tcp_settings(tcp_settings())
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.command_timeout)
                    .retries(2)
                    .build()
                    .map_err(|e| Error::invalid("redis-url", e.to_string()))?;
                (Backend::Cluster(client), true)
            }
        };
        let generation = Arc::new(AtomicU64::new(0));
        let pool = bb8::Pool::builder()
            .max_size(config.pool_size.max(1))
            .connection_timeout(config.connect_timeout)
            // A PING per checkout would double the round trips; broken connections are
            // flagged by the errors they return instead.
            .test_on_check_out(false)
            .build_unchecked(Manager {
                backend,
                generation: Arc::clone(&generation),
            });
        Ok(Self {
            pool,
            command_timeout: config.command_timeout,
            cluster,
            generation,
            breaker: None,
        })
    }

    /// The same pool, its calls guarded by `breaker`: each call's outcome counts towards
    /// opening it (a connection failure or a timeout) or resets it (any answer), and while it
    /// is open every call fails at once with UNAVAILABLE instead of waiting out the timeouts.
    /// The breaker's prober must ping through an unguarded pool.
    #[must_use]
    pub fn guarded(&self, breaker: Arc<Breaker>) -> Self {
        Self {
            breaker: Some(breaker),
            ..self.clone()
        }
    }

    /// Retires every connection made so far: each is discarded when next checked out or
    /// returned, and new ones are dialled. For when Redis comes back after an outage: the
    /// connections that sat idle through it are dead, and would fail the first calls that
    /// take them.
    pub fn renew(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    /// True when the URL named a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Bound on one command, as configured.
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// A connection handle; concurrent holders share (and pipeline over) the same socket.
    /// Fails at once while the pool's breaker is open.
    pub async fn get(&self) -> Result<Connection> {
        if self.breaker.as_ref().is_some_and(|b| b.is_open()) {
            return Err(Error::Unavailable(BREAKER_OPEN.into()));
        }
        // Bounded: every broken connection we meet is discarded, so at most max_size skips.
        for _ in 0..=self.pool.state().connections {
            let pooled = self.pool.get().await.map_err(|e| match e {
                bb8::RunError::User(err) => Error::from(err),
                bb8::RunError::TimedOut => {
                    Error::Unavailable("timed out waiting for a Redis connection".into())
                }
            })?;
            if !pooled.dead() {
                return Ok(pooled.clone());
            }
        }
        Err(Error::Unavailable("no healthy Redis connection".into()))
    }

    /// Runs one command with the configured timeout.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let epoch = self.epoch();
        self.settle(
            epoch,
            async {
                let mut conn = self.get().await?;
                match tokio::time::timeout(self.command_timeout, cmd.query_async::<T>(&mut conn))
                    .await
                {
                    Ok(result) => Ok(result?),
                    Err(_) => Err(Error::Unavailable(format!(
                        "Redis did not answer within {:?}",
                        self.command_timeout
                    ))),
                }
            }
            .await,
        )
    }
}

impl RedisPool {
    /// The guarding breaker's epoch, to take as a call starts and give to
    /// [`RedisPool::settle`] (0 on an unguarded pool).
    pub fn epoch(&self) -> u64 {
        self.breaker.as_ref().map_or(0, |b| b.epoch())
    }

    /// Takes note of the outcome of a call that started in `epoch`: counted if it failed (see
    /// [`counted`]) and, on a guarded pool, reported to the breaker. A call the open breaker
    /// stopped touched no Redis: it is neither.
    pub fn settle<T>(&self, epoch: u64, result: Result<T>) -> Result<T> {
        if matches!(&result, Err(Error::Unavailable(why)) if why == BREAKER_OPEN) {
            return result;
        }
        if let Some(breaker) = &self.breaker {
            match &result {
                Err(Error::Unavailable(_)) => breaker.failure_since(epoch),
                _ => breaker.success(),
            }
        }
        counted(result)
    }
}

/// Counts a failed Redis call in `sluice_redis_errors_total{kind}`: `unavailable` (no
/// connection, a timeout, a cluster that cannot serve) or `reply` (an error Redis answered).
pub fn counted<T>(result: Result<T>) -> Result<T> {
    if let Err(err) = &result {
        let kind = if matches!(err, Error::Unavailable(_)) {
            "unavailable"
        } else {
            "reply"
        };
        metrics::counter!("sluice_redis_errors_total", "kind" => kind).increment(1);
    }
    result
}

/// A stream of the messages published on `channel`, on its own connection. On a cluster it
/// subscribes on the first seed node that answers: Redis Cluster forwards every PUBLISH to
/// every node, so one node hears them all. Ends when the connection drops; the caller
/// subscribes again.
pub async fn subscribe(config: &RedisConfig, channel: &str) -> Result<redis::aio::PubSubStream> {
    let nodes = match Topology::parse(&config.url)? {
        Topology::Standalone(url) => vec![url],
        Topology::Cluster(nodes) => nodes,
    };
    let mut last = None;
    for url in nodes {
        match subscribe_on(config, &url, channel).await {
            Ok(stream) => return Ok(stream),
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| Error::Unavailable("no Redis node to subscribe on".into())))
}

async fn subscribe_on(
    config: &RedisConfig,
    url: &str,
    channel: &str,
) -> Result<redis::aio::PubSubStream> {
    let info = connection_info(url)?;
    let client = match &config.tls_ca {
        Some(ca) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.clone()),
            },
        ),
        None => redis::Client::open(info),
    }
    .map_err(|e| Error::invalid("redis-url", e.to_string()))?;
    let mut pubsub = tokio::time::timeout(config.connect_timeout, client.get_async_pubsub())
        .await
        .map_err(|_| Error::Unavailable("timed out connecting for pub/sub".into()))??;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.into_on_message())
}

/// The Redis pool `args` configure, or `None` for the embedded store; logs which it is.
pub fn from_args(args: &crate::config::RedisArgs) -> Result<Option<RedisPool>> {
    match args.redis_config()? {
        Some(config) => {
            let pool = RedisPool::new(&config)?;
            tracing::info!(redis = ?config, cluster = pool.is_cluster(), "store: Redis");
            Ok(Some(pool))
        }
        None => {
            tracing::info!("store: embedded (in-process: this instance only, nothing persisted)");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_disable_nagle() -> Result<()> {
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://:pw@redis.internal:6380/0",
        ] {
            assert!(connection_info(url)?.tcp_settings().nodelay(), "{url}");
        }
        Ok(())
    }

    #[test]
    fn parses_standalone_and_cluster_urls() {
        assert_eq!(
            Topology::parse("redis://127.0.0.1:6379/0").ok(),
            Some(Topology::Standalone("redis://127.0.0.1:6379/0".into()))
        );
        assert_eq!(
            Topology::parse("rediss+cluster://:pw@10.0.0.1:7000,10.0.0.2:7001/").ok(),
            Some(Topology::Cluster(vec![
                "rediss://:pw@10.0.0.1:7000".into(),
                "rediss://:pw@10.0.0.2:7001".into()
            ]))
        );
    }

    #[test]
    fn rejects_unknown_schemes_and_empty_clusters_without_leaking_passwords() {
        let err = Topology::parse("http://:secret@x:1").expect_err("http is not Redis");
        assert!(err.to_string().starts_with("redis-url:"), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert!(Topology::parse("redis+cluster://").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact_url("redis://u:p@h:1"), "redis://u:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
