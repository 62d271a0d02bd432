//! A service binary run as a child process, as an operator would run it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A running binary; killed on drop.
#[derive(Debug)]
pub struct Binary {
    child: Child,
    /// gRPC address from the `listening` log line.
    pub grpc: String,
    /// `/metrics` address from the `listening` log line.
    pub metrics: String,
    log: mpsc::UnboundedReceiver<String>,
}

impl Binary {
    /// Starts `path` with `args` plus `--log-format json` on ports 0 (and `--no-auth` unless
    /// `args` choose auth), and waits (bounded) for its `listening` event.
    pub async fn start(path: &str, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(path)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(args)
            .args(crate::auth_choice(args))
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {path}"))?;
        let stderr = child.stderr.take().context("stderr is piped")?;
        let (tx, mut log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let listening = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = log.recv().await {
                if line.contains("\"listening\"") {
                    return Some(line);
                }
            }
            None
        })
        .await
        .context("no `listening` log line within 10 s")?
        .context("the binary exited before listening")?;
        Ok(Self {
            grpc: json_field(&listening, "grpc").context("`grpc` in the listening line")?,
            metrics: json_field(&listening, "metrics")
                .context("`metrics` in the listening line")?,
            child,
            log,
        })
    }

    /// `http://ADDR` of the gRPC server.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// `kill -9`: the process dies at once, as in a crash.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("already exited")?;
        kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
        Ok(())
    }

    /// Waits for the process to exit within `timeout`; returns its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("still running after {timeout:?}"))??;
        Ok(status.code())
    }

    /// Log lines received so far (drains them).
    pub fn drain_log(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.log.try_recv() {
            lines.push(line);
        }
        lines
    }
}

/// The string value of `"field":"…"` in a JSON log line (flat string fields only).
fn json_field(line: &str, field: &str) -> Option<String> {
    let needle = format!("\"{field}\":\"");
    let start = line.find(&needle)? + needle.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_owned())
}

/// What every service binary must do as an operator runs it: explain each option in `--help`,
/// start, answer health as SERVING, list `services` (plus health and reflection) through both
/// reflection versions, and exit 0 within 5 s of SIGTERM.
pub async fn check_service_binary(path: &str, services: &[&str]) -> anyhow::Result<()> {
    let help = Command::new(path).arg("--help").output().await?;
    anyhow::ensure!(help.status.success(), "--help exits 0");
    let help = String::from_utf8(help.stdout)?;
    for option in [
        "--listen",
        "--metrics-listen",
        "--redis-url",
        "--config",
        "--shutdown-grace",
        "--redis-pool-size",
        "--redis-connect-timeout",
        "--redis-command-timeout",
        "--log-format",
        "--log",
        "--otlp-endpoint",
        "--service-name",
        "--threads",
        "SLUICE_THREADS",
        "SLUICE_LISTEN",
        "SLUICE_METRICS_LISTEN",
        "SLUICE_REDIS_URL",
        "--auth-keys",
        "--auth-jwt-secret",
        "--auth-jwt-public-keys",
        "--no-auth",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
    ] {
        anyhow::ensure!(help.contains(option), "--help mentions {option}:\n{help}");
    }

    // Auth is on unless turned off: a binary told neither refuses to start, saying how.
    let undecided = Command::new(path)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env_remove("SLUICE_NO_AUTH")
        .env_remove("SLUICE_AUTH_KEYS")
        .env_remove("SLUICE_AUTH_JWT_SECRET")
        .env_remove("SLUICE_AUTH_JWT_PUBLIC_KEYS")
        .env_remove("SLUICE_CONFIG")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let undecided = tokio::time::timeout(Duration::from_secs(10), undecided)
        .await
        .context("a binary without an auth choice should exit at once")??;
    let said = String::from_utf8_lossy(&undecided.stderr);
    anyhow::ensure!(
        !undecided.status.success() && said.contains("--no-auth") && said.contains("--auth-keys"),
        "without an auth choice: exits non-zero naming the options; got {:?}: {said}",
        undecided.status
    );

    // Both schedulers: one event-loop thread (the default on small machines) and several.
    for threads in ["1", "2"] {
        let mut binary = Binary::start(path, &["--threads", threads]).await?;
        let url = binary.url();
        anyhow::ensure!(
            crate::probe::health(&url, "").await? == crate::probe::SERVING,
            "SERVING"
        );
        let standard = [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        for listed in [
            crate::probe::reflection_v1(&url).await?,
            crate::probe::reflection_v1alpha(&url).await?,
        ] {
            for expected in standard.iter().chain(services) {
                anyhow::ensure!(
                    listed.iter().any(|s| s == expected),
                    "{expected} listed in {listed:?}"
                );
            }
        }
        binary.sigterm()?;
        let started = tokio::time::Instant::now();
        let code = binary.wait(Duration::from_secs(5)).await?;
        anyhow::ensure!(
            code == Some(0),
            "--threads {threads}: exit code {code:?} after SIGTERM; log: {:?}",
            binary.drain_log()
        );
        tracing::debug!(threads, elapsed = ?started.elapsed(), "stopped");
    }
    Ok(())
}

/// Sends SIGTERM to a child process we started.
pub fn sigterm(child: &tokio::process::Child) -> anyhow::Result<()> {
    let pid = child.id().context("already exited")?;
    kill(Pid::from_raw(i32::try_from(pid)?), Signal::SIGTERM)?;
    Ok(())
}

/// Starts `sluice-worker run` (at `path`) on `urls` for project `p`'s `queue`, running `command`
/// per task; killed on drop.
pub fn worker_process(
    path: &str,
    urls: &str,
    queue: &str,
    extra: &[&str],
    command: &[&str],
) -> anyhow::Result<Child> {
    Ok(Command::new(path)
        .args([
            "--queue-url",
            urls,
            "run",
            "--project",
            "p",
            "--queue",
            queue,
        ])
        .args(["--log-format", "compact", "--log", "warn"])
        .args(extra)
        .arg("--")
        .args(command)
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}
