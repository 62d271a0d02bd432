//! Sluice's test harness: real parts on loopback, started and owned by the test.
//!
//! - [`RedisServer`]: a `redis-server` process on a free port with its own directory; stop,
//!   kill (-9) and restart it on the same port and data.
//! - [`RedisCluster`]: three such servers joined into a 3-master Redis Cluster.
//! - [`Service`]: a service's `run` started in-process on ephemeral ports.
//! - [`Binary`]: a service binary started as a child process, its bound address read from its
//!   JSON `listening` log line.
//! - [`OtlpReceiver`]: an OTLP/gRPC trace collector that keeps the spans it receives.
//! - [`eventually`]: await a condition with a bound instead of sleeping.
//! - [`probe`]: gRPC health and reflection clients.
//!
//! Every process is killed on drop; a test that panics gets the tail of redis-server's log.

#![forbid(unsafe_code)]

pub mod auth;
pub mod binary;
pub mod limiter;
pub mod otlp;
pub mod probe;
pub mod queue;
pub mod redis_server;
pub mod service;

use std::future::Future;
use std::time::Duration;

pub use binary::Binary;
pub use otlp::{CollectedSpan, OtlpReceiver};
pub use redis_server::{RedisCluster, RedisServer};
pub use service::Service;

/// Runs `calls` all at once; answers each one's output with how long it took, in order, and
/// the longest of those times.
pub async fn all_timed<F: Future>(
    calls: impl IntoIterator<Item = F>,
) -> (Vec<(Duration, F::Output)>, Duration) {
    let answers = futures::future::join_all(calls.into_iter().map(|call| async move {
        let sent = tokio::time::Instant::now();
        let output = call.await;
        (sent.elapsed(), output)
    }))
    .await;
    let slowest = answers
        .iter()
        .map(|(took, _)| *took)
        .max()
        .unwrap_or_default();
    (answers, slowest)
}

/// Polls `condition` every 20 ms until it yields `Some`, or fails after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The flags that make a service's auth choice explicit for a test: `--no-auth`, unless
/// `args` already choose (`--auth-keys`, `--auth-jwt-secret`, `--no-auth`).
pub fn auth_choice(args: &[&str]) -> &'static [&'static str] {
    let chosen = args
        .iter()
        .any(|a| a.starts_with("--auth-") || a.starts_with("--no-auth"));
    if chosen { &[] } else { &["--no-auth"] }
}

/// The Python interpreter of the tests' venv (`.venv`, which `.ci/run` creates with
/// tests/python/requirements.txt), or the one `SLUICE_PYTHON` names.
pub fn python() -> anyhow::Result<std::path::PathBuf> {
    let python = std::env::var_os("SLUICE_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
        });
    anyhow::ensure!(
        python.exists(),
        "{} is missing: run .ci/run once (it creates the venv with tests/python/requirements.txt)",
        python.display()
    );
    Ok(python)
}

/// A free TCP port on 127.0.0.1 (free when asked; the OS may hand it out again later).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
