//! Configuration: flags, then `SLUICE_*` environment variables, then an optional TOML file, then
//! built-in defaults — parsed once into each binary's typed config struct.
//!
//! The file (`--config FILE` or `SLUICE_CONFIG`) uses the flags' long names as keys:
//!
//! ```toml
//! listen = "0.0.0.0:50051"
//! redis-url = "redis://10.0.0.5:6379"
//! redis-command-timeout = "250ms"
//! ```
//!
//! A key no option knows is an error, reported before the service starts.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, FromArgMatches, ValueEnum};

use crate::pool::RedisConfig;

/// Options every service binary takes: flatten this into the binary's own config struct.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// TOML file with default values for any option (keys are the long option names).
    #[arg(long, env = "SLUICE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub redis: RedisArgs,

    #[command(flatten)]
    pub auth: AuthArgs,

    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Shown under every service binary's `--help`.
pub const AFTER_HELP: &str = "Every option can also come from its environment variable (shown \
in brackets) or from the --config file (TOML; keys are the long option names). Precedence: \
flags, then environment, then file, then defaults.";

/// Where a server listens and how it stops.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address the gRPC server listens on (port 0 picks a free port; the bound address is logged).
    #[arg(long, env = "SLUICE_LISTEN", value_name = "ADDR")]
    pub listen: SocketAddr,

    /// Address of the HTTP server for Prometheus `GET /metrics` (port 0 picks a free port).
    #[arg(long, env = "SLUICE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: SocketAddr,

    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish before the server stops
    /// anyway (e.g. 10s, 500ms).
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// After this long without a frame from a client, the server sends it an HTTP/2 PING, and
    /// closes the connection if the answer takes longer than 20 s (or this interval, if
    /// shorter): connections to clients that vanished without closing them do not stay open
    /// for ever. 0 turns the pings off.
    #[arg(long, env = "SLUICE_HTTP2_KEEPALIVE", value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub http2_keepalive: Duration,

    /// Threads running the event loop. 1: a single thread (tokio's current-thread scheduler),
    /// the least CPU per call, as responses finished together leave in one socket write;
    /// N > 1: tokio's work-stealing scheduler with N threads; 0: 1 on machines with up to 2
    /// cores (Redis and the network stack keep the other), else one per core.
    #[arg(long, env = "SLUICE_THREADS", value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub threads: u16,

    /// PEM certificate chain the gRPC port presents; with --tls-key the port speaks TLS only
    /// (HTTP/2 agreed by ALPN). Reread when it changes: a renewed certificate needs no restart.
    #[arg(long, env = "SLUICE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "SLUICE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate(s): clients must present a certificate one of them signs (mutual
    /// TLS). Needs --tls-cert and --tls-key.
    #[arg(long, env = "SLUICE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerArgs {
    /// How the gRPC server treats its connections, its TLS files read now (an error names the
    /// option at fault).
    pub fn connections(&self) -> Result<crate::server::Connections, crate::Error> {
        Ok(crate::server::Connections {
            grace: self.shutdown_grace,
            keepalive: (!self.http2_keepalive.is_zero()).then_some(self.http2_keepalive),
            handshake: crate::server::HANDSHAKE_TIMEOUT,
            tls: self.tls()?,
        })
    }

    /// The gRPC port's TLS, or `None` for plaintext HTTP/2.
    pub fn tls(&self) -> Result<Option<crate::tls::Tls>, crate::Error> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => crate::tls::Tls::load(crate::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            })
            .map(Some),
            (None, None) if self.tls_client_ca.is_none() => Ok(None),
            (None, None) => Err(crate::Error::invalid(
                "tls-client-ca",
                "mutual TLS needs the server's own --tls-cert and --tls-key too",
            )),
            _ => Err(crate::Error::invalid(
                "tls-cert",
                "give --tls-cert and --tls-key together",
            )),
        }
    }

    /// The event-loop threads `--threads` asks for on this machine.
    pub fn event_loop_threads(&self) -> usize {
        event_loop_threads(self.threads)
    }
}

/// What `--threads N` means here: N, or for 0 the default for this machine's core count.
pub fn event_loop_threads(threads: u16) -> usize {
    match threads {
        0 => match std::thread::available_parallelism().map_or(1, std::num::NonZero::get) {
            cores @ 3.. => cores,
            _ => 1,
        },
        n => usize::from(n),
    }
}

/// A tokio runtime with `threads` event-loop threads: the current-thread scheduler for 1, the
/// work-stealing one otherwise. Either way there is a blocking pool and timers and I/O.
pub fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

/// Who may call: credentials mapped to projects and roles (see [`crate::auth`]), or, only
/// when asked for, nobody checked.
#[derive(Debug, Clone, Args)]
pub struct AuthArgs {
    /// API keys file (TOML: one [[keys]] table per key with name, sha256, roles, projects;
    /// `sluice key new` writes an entry). Callers send `authorization: Bearer <key>`. Reread
    /// when it changes; a broken edit is logged and the keys in force stay.
    #[arg(long, env = "SLUICE_AUTH_KEYS", value_name = "FILE")]
    pub auth_keys: Option<PathBuf>,

    /// File holding the HS256 secret (32 bytes or more; one trailing newline is not part of
    /// it) that signs accepted JWTs, sent as `authorization: Bearer <jwt>`. Claims read: sub
    /// (the caller's name), exp (required), nbf, roles, projects, and iss/aud when the options
    /// below are set (set the audience when the secret is shared with other services).
    #[arg(long, env = "SLUICE_AUTH_JWT_SECRET", value_name = "FILE")]
    pub auth_jwt_secret: Option<PathBuf>,

    /// PEM file of public keys (`-----BEGIN PUBLIC KEY-----`; RSA for RS256, EC P-256 for
    /// ES256; several for rotation) whose tokens are accepted: an identity provider's. Same
    /// claims as above; needs --auth-jwt-issuer and --auth-jwt-audience. Reread when it
    /// changes.
    #[arg(long, env = "SLUICE_AUTH_JWT_PUBLIC_KEYS", value_name = "FILE")]
    pub auth_jwt_public_keys: Option<PathBuf>,

    /// A JWT's `iss` must be this.
    #[arg(long, env = "SLUICE_AUTH_JWT_ISSUER", value_name = "ISSUER")]
    pub auth_jwt_issuer: Option<String>,

    /// A JWT's `aud` must name this.
    #[arg(long, env = "SLUICE_AUTH_JWT_AUDIENCE", value_name = "AUDIENCE")]
    pub auth_jwt_audience: Option<String>,

    /// Serve every caller without credentials, as holding every role on every project. Auth
    /// is on unless this is given: use it only where the network itself keeps strangers out.
    #[arg(long, env = "SLUICE_NO_AUTH", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_auth: bool,
}

impl AuthArgs {
    /// The server's auth, its files read now; an error says which option to change.
    pub fn auth(&self) -> Result<crate::auth::Auth, crate::Error> {
        let sources = crate::auth::Sources {
            keys: self.auth_keys.clone(),
            jwt_secret: self.auth_jwt_secret.clone(),
            jwt_public_keys: self.auth_jwt_public_keys.clone(),
            jwt_issuer: self.auth_jwt_issuer.clone(),
            jwt_audience: self.auth_jwt_audience.clone(),
        };
        let jwt = sources.jwt_secret.is_some() || sources.jwt_public_keys.is_some();
        if sources.jwt_public_keys.is_some()
            && (sources.jwt_issuer.is_none() || sources.jwt_audience.is_none())
        {
            // A provider signs tokens for every application it serves: only those it issued
            // for this one may pass.
            return Err(crate::Error::invalid(
                "auth-jwt-public-keys",
                "a provider's keys sign tokens for other applications too: give \
                 --auth-jwt-issuer and --auth-jwt-audience with them",
            ));
        }
        if (sources.jwt_issuer.is_some() || sources.jwt_audience.is_some()) && !jwt {
            return Err(crate::Error::invalid(
                "auth-jwt-issuer",
                "--auth-jwt-issuer and --auth-jwt-audience apply to JWTs: give \
                 --auth-jwt-secret or --auth-jwt-public-keys",
            ));
        }
        if self.no_auth {
            if sources.keys.is_some() || jwt {
                return Err(crate::Error::invalid(
                    "no-auth",
                    "--no-auth contradicts --auth-keys / --auth-jwt-*: give one or the other",
                ));
            }
            return Ok(crate::auth::Auth::Off);
        }
        crate::auth::Auth::load(sources)
    }
}

/// How to reach Redis.
#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis URL: redis://[user:pass@]host:port[/db], rediss://… for TLS, or
    /// redis+cluster://host1:port1,host2:port2 for Redis Cluster. Absent: the embedded
    /// in-process store (one instance only, nothing persisted).
    #[arg(long, env = "SLUICE_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,

    /// Multiplexed Redis connections kept open; concurrent calls pipeline over each.
    #[arg(
        long,
        env = "SLUICE_REDIS_POOL_SIZE",
        value_name = "N",
        default_value_t = 4
    )]
    pub redis_pool_size: u32,

    /// Bound on dialling Redis (and on waiting for a pooled connection).
    #[arg(long, env = "SLUICE_REDIS_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub redis_connect_timeout: Duration,

    /// Bound on one Redis command or script call, reply included.
    #[arg(long, env = "SLUICE_REDIS_COMMAND_TIMEOUT", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub redis_command_timeout: Duration,

    /// PEM file of the CA that signs Redis's certificate (rediss:// URLs); unset: the
    /// system's trusted roots. Passwords go in the URL: rediss://user:pass@host:port.
    #[arg(long, env = "SLUICE_REDIS_TLS_CA", value_name = "FILE")]
    pub redis_tls_ca: Option<PathBuf>,

    /// Consecutive Redis failures (connection errors, timeouts) that open the circuit
    /// breaker; while open, the limiter answers checks by each policy's failure mode and the
    /// queue answers UNAVAILABLE, at once, without going to Redis.
    #[arg(
        long,
        env = "SLUICE_BREAKER_THRESHOLD",
        value_name = "N",
        default_value_t = 3
    )]
    pub breaker_threshold: u32,

    /// While the breaker is open, how often Redis is pinged to close it again.
    #[arg(long, env = "SLUICE_BREAKER_PROBE_INTERVAL", value_name = "DURATION", default_value = "250ms", value_parser = parse_duration)]
    pub breaker_probe_interval: Duration,
}

/// Reads a PEM file named by an option, with an error naming the option.
pub fn read_pem(path: &std::path::Path, option: &str) -> Result<Vec<u8>, crate::Error> {
    std::fs::read(path)
        .map_err(|e| crate::Error::invalid(option, format!("{}: {e}", path.display())))
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisArgs")
            .field(
                "redis_url",
                &self.redis_url.as_deref().map(crate::pool::redact_url),
            )
            .field("redis_pool_size", &self.redis_pool_size)
            .field("redis_connect_timeout", &self.redis_connect_timeout)
            .field("redis_command_timeout", &self.redis_command_timeout)
            .field("redis_tls_ca", &self.redis_tls_ca)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_probe_interval", &self.breaker_probe_interval)
            .finish()
    }
}

impl RedisArgs {
    /// The pool configuration, or `None` for the embedded store.
    pub fn redis_config(&self) -> Result<Option<RedisConfig>, crate::Error> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let tls_ca = match &self.redis_tls_ca {
            Some(path) => Some(read_pem(path, "redis-tls-ca")?),
            None => None,
        };
        Ok(Some(RedisConfig {
            url: url.clone(),
            pool_size: self.redis_pool_size,
            connect_timeout: self.redis_connect_timeout,
            command_timeout: self.redis_command_timeout,
            tls_ca,
        }))
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable when stderr is a terminal, JSON otherwise.
    Auto,
    /// One JSON object per line, with the enclosing spans (and their trace ids).
    Json,
    /// Multi-line, coloured, for a developer's terminal.
    Pretty,
    /// One line per event.
    Compact,
}

/// How Sluice's own clients (`sluice-worker`, `sluice`) present themselves to the services:
/// credentials and, for `https://` URLs, TLS. Flatten into a client's top-level options.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// API key or JWT sent as `authorization: Bearer` on every call (with the roles and
    /// projects the calls need). Prefer the environment variable: flags show in process lists.
    #[arg(long, env = "SLUICE_API_KEY", hide_env_values = true, global = true)]
    pub api_key: Option<crate::auth::Token>,

    /// PEM CA that signs the services' certificates, for https:// URLs; unset: the system's
    /// trusted roots.
    #[arg(long, env = "SLUICE_TLS_CA", value_name = "FILE", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// PEM certificate presented to services that require client certificates (mutual TLS);
    /// with --tls-key.
    #[arg(
        long,
        env = "SLUICE_CLIENT_TLS_CERT",
        value_name = "FILE",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        env = "SLUICE_CLIENT_TLS_KEY",
        value_name = "FILE",
        global = true
    )]
    pub tls_key: Option<PathBuf>,
}

impl ClientArgs {
    /// The `authorization` value to send, if a token was given.
    pub fn credentials(&self) -> Result<Option<http::HeaderValue>, crate::Error> {
        self.api_key
            .as_ref()
            .map(crate::auth::Token::bearer)
            .transpose()
    }

    /// TLS for `urls` when a TLS option was given (`None`: the system's roots for https://).
    /// TLS options with an http:// URL are refused rather than ignored: the token would go
    /// out in the clear.
    pub fn tls<'a>(
        &self,
        urls: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<tonic::transport::ClientTlsConfig>, crate::Error> {
        let identity = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            _ => {
                return Err(crate::Error::invalid(
                    "tls-cert",
                    "--tls-cert and --tls-key go together",
                ));
            }
        };
        if self.tls_ca.is_none() && identity.is_none() {
            return Ok(None);
        }
        if let Some(plain) = urls.into_iter().find(|u| !u.starts_with("https://")) {
            return Err(crate::Error::invalid(
                "tls-ca",
                format!("--tls-ca/--tls-cert/--tls-key apply to https:// URLs; {plain} is not one"),
            ));
        }
        crate::tls::client_config(self.tls_ca.as_deref(), identity).map(Some)
    }
}

/// Logging and tracing options. OTLP export is configured by the standard `OTEL_*` variables.
#[derive(Debug, Clone, Args)]
pub struct TelemetryArgs {
    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `info,sluice=debug`.
    #[arg(
        long,
        env = "SLUICE_LOG",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log: String,

    /// OTLP/gRPC endpoint for traces (e.g. http://127.0.0.1:4317); unset: no export.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// service.name of exported spans; defaults to the binary's name.
    #[arg(long, env = "OTEL_SERVICE_NAME", value_name = "NAME")]
    pub service_name: Option<String>,
}

/// Parses a duration such as `250ms`, `10s`, `5m`, `1h` (a bare number means seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; use e.g. 250ms, 10s, 5m, 1h"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit `{other}`; use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// Parses the process's arguments and environment into `T`, layering the config file and the
/// binary's own defaults (`defaults`: long option name → value) beneath them.
///
/// On `--help`, `--version` or any error the returned `clap::Error` prints itself and exits
/// with the right code via [`clap::Error::exit`].
pub fn parse<T: CommandFactory + FromArgMatches>(
    defaults: &[(&str, &str)],
) -> Result<T, clap::Error> {
    parse_from(
        std::env::args_os(),
        std::env::var_os("SLUICE_CONFIG"),
        defaults,
    )
}

/// [`parse`] with the arguments and the `SLUICE_CONFIG` value given, for tests.
pub fn parse_from<T: CommandFactory + FromArgMatches>(
    args: impl IntoIterator<Item = impl Into<OsString>>,
    env_config: Option<OsString>,
    defaults: &[(&str, &str)],
) -> Result<T, clap::Error> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut cmd = T::command();
    for (long, value) in defaults {
        cmd = set_default(cmd, long, value.to_string())?;
    }
    if let Some(path) = config_path(&args).or(env_config.map(PathBuf::from)) {
        for (key, value) in read_config_file(&path)? {
            cmd = set_default(cmd, &key, value).map_err(|_| {
                clap::Error::raw(
                    ErrorKind::UnknownArgument,
                    format!(
                        "{}: unknown option `{key}` (see --help for the names)\n",
                        path.display()
                    ),
                )
            })?;
        }
    }
    let matches = cmd.try_get_matches_from_mut(args)?;
    T::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

fn set_default(
    cmd: clap::Command,
    long: &str,
    value: String,
) -> Result<clap::Command, clap::Error> {
    let id = cmd
        .get_arguments()
        .find(|arg| arg.get_long() == Some(long))
        .map(|arg| arg.get_id().clone())
        .ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::UnknownArgument,
                format!("unknown option `{long}`\n"),
            )
        })?;
    Ok(cmd.mut_arg(id, |arg| arg.default_value(value).required(false)))
}

/// `--config FILE` or `--config=FILE` from the raw arguments.
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let arg = arg.to_string_lossy();
        if arg == "--config" {
            return iter.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    None
}

fn read_config_file(path: &std::path::Path) -> Result<Vec<(String, String)>, clap::Error> {
    let fail = |reason: String| {
        clap::Error::raw(
            ErrorKind::InvalidValue,
            format!("config file {}: {reason}\n", path.display()),
        )
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(e.to_string()))?;
    table
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(fail(format!(
                        "`{key}` must be a string, number or boolean, not {}",
                        other.type_str()
                    )));
                }
            };
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Demo {
        #[command(flatten)]
        common: CommonArgs,
    }

    const DEFAULTS: &[(&str, &str)] =
        &[("listen", "127.0.0.1:1"), ("metrics-listen", "127.0.0.1:2")];

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn flags_beat_file_beats_defaults() {
        let dir = std::env::temp_dir().join(format!("sluice-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7\"\nredis-pool-size = 9\nredis-command-timeout = \"250ms\"\n",
        )
        .expect("write config");
        let demo: Demo = parse_from(
            [
                "demo",
                "--config",
                file.to_str().expect("utf-8 path"),
                "--redis-pool-size",
                "3",
            ],
            None,
            DEFAULTS,
        )
        .expect("parses");
        assert_eq!(
            demo.common.server.listen.port(),
            7,
            "file beats the built-in default"
        );
        assert_eq!(
            demo.common.server.metrics_listen.port(),
            2,
            "built-in default when nothing else"
        );
        assert_eq!(demo.common.redis.redis_pool_size, 3, "flag beats file");
        assert_eq!(
            demo.common.redis.redis_command_timeout,
            Duration::from_millis(250)
        );

        std::fs::write(&file, "no-such-option = 1\n").expect("write config");
        let err = parse_from::<Demo>(["demo"], Some(file.clone().into()), DEFAULTS)
            .expect_err("unknown keys are errors");
        assert!(err.to_string().contains("no-such-option"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let demo: Demo = parse_from(
            ["demo", "--redis-url", "redis://:hunter2@h:1"],
            None,
            DEFAULTS,
        )
        .expect("parses");
        assert!(!format!("{demo:?}").contains("hunter2"));
    }
}
