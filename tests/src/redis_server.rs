//! Real `redis-server` processes for tests: standalone and a 3-master cluster.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{eventually, free_port};

/// One `redis-server` process on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
    /// For a TLS server: the CA that signed its certificate, and its password.
    tls: Option<(Vec<u8>, String)>,
}

impl RedisServer {
    /// A standalone server that keeps nothing on disk.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&["--save", "", "--appendonly", "no"]).await
    }

    /// A server started with extra configuration, e.g. `["--appendonly", "yes",
    /// "--appendfsync", "always"]`.
    pub async fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        Self::start_on(port, args.iter().map(|s| (*s).to_owned()).collect()).await
    }

    async fn start_on(port: u16, args: Vec<String>) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("sluice-redis-").tempdir()?;
        let mut server = Self {
            port,
            dir,
            args,
            child: None,
            tls: None,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// A server that speaks only TLS (certificate signed by a CA made for the test, see
    /// [`RedisServer::tls_ca_path`]) and requires `password`.
    pub async fn start_tls(password: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-redis-tls-")
            .tempdir()?;
        make_certificates(dir.path())?;
        let path = |name: &str| dir.path().join(name).display().to_string();
        let args = vec![
            "--save".to_owned(),
            String::new(),
            "--appendonly".to_owned(),
            "no".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            path("redis.crt"),
            "--tls-key-file".to_owned(),
            path("redis.key"),
            "--tls-ca-cert-file".to_owned(),
            path("ca.crt"),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
            "--requirepass".to_owned(),
            password.to_owned(),
        ];
        let ca = std::fs::read(dir.path().join("ca.crt"))?;
        let mut server = Self {
            port: 0,
            dir,
            args,
            child: None,
            tls: Some((ca, password.to_owned())),
        };
        server.port = port;
        server.spawn().await?;
        Ok(server)
    }

    /// The CA certificate (PEM) of a TLS server, for `--redis-tls-ca`.
    pub fn tls_ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        // A TLS server listens on --tls-port only.
        let plain_port = if self.tls.is_some() { 0 } else { self.port };
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(plain_port.to_string())
            .args([
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed? .ci/run installs it)")?;
        self.child = Some(child);
        let url = self.url();
        let ca = self.tls.as_ref().map(|(ca, _)| ca.clone());
        let ready = eventually(
            Duration::from_secs(10),
            "redis-server to answer PING",
            || {
                let (url, ca) = (url.clone(), ca.clone());
                async move { ping(&url, ca).await.then_some(()) }
            },
        )
        .await;
        if let Err(err) = ready {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                anyhow::bail!(
                    "{err}; redis-server exited with {status}:\n{}",
                    self.log_tail(20)
                );
            }
            anyhow::bail!("{err}:\n{}", self.log_tail(20));
        }
        Ok(())
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://:PASSWORD@127.0.0.1:PORT` for a TLS server.
    pub fn url(&self) -> String {
        match &self.tls {
            Some((_, password)) => format!("rediss://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's working directory (its AOF and RDB files live here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A direct connection for test assertions (not through Sluice's pool).
    pub async fn client(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        Ok(redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?)
    }

    /// `kill -9`: the process dies at once, as in a crash.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGKILL)
    }

    /// SIGTERM: redis-server shuts down cleanly (and writes its AOF/RDB if configured).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGTERM)
    }

    fn signal(&mut self, signal: Signal) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = i32::try_from(child.id()).context("pid out of range")?;
            kill(Pid::from_raw(pid), signal)?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the server again on the same port, directory and configuration.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn().await
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- redis-server :{} log tail ---\n{}",
                self.port,
                self.log_tail(30)
            );
        }
        if let Some(mut child) = self.child.take() {
            // Only our own child, by PID.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn ping(url: &str, ca: Option<Vec<u8>>) -> bool {
    let client = match ca {
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        ),
        None => redis::Client::open(url),
    };
    let Ok(client) = client else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    matches!(
        redis::cmd("PING").query_async::<String>(&mut conn).await,
        Ok(pong) if pong == "PONG"
    )
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl command line.
fn make_certificates(dir: &Path) -> anyhow::Result<()> {
    crate::auth::issue_certificates(dir, "ca", &["redis"])
}

/// A 3-master Redis Cluster (no replicas) of [`RedisServer`]s, slots split evenly.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, assigns slots and joins them; returns once every
    /// node reports `cluster_state:ok` with all three masters known.
    pub async fn start() -> anyhow::Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let (port, bus) = free_port_pair()?;
            let args = vec![
                "--save".to_owned(),
                String::new(),
                "--appendonly".to_owned(),
                "no".to_owned(),
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                "nodes.conf".to_owned(),
                "--cluster-node-timeout".to_owned(),
                "2000".to_owned(),
                "--cluster-port".to_owned(),
                bus.to_string(),
            ];
            nodes.push(RedisServer::start_on(port, args).await?);
        }
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (node, (first, last)) in nodes.iter().zip(ranges) {
            let mut conn = node.client().await?;
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async::<()>(&mut conn)
                .await?;
        }
        let mut first = nodes[0].client().await?;
        for node in &nodes[1..] {
            let bus = cluster_bus_port(node).await?;
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port())
                .arg(bus)
                .query_async::<()>(&mut first)
                .await?;
        }
        let cluster = Self { nodes };
        for node in &cluster.nodes {
            let url = node.url();
            eventually(Duration::from_secs(20), "the cluster to converge", || {
                let url = url.clone();
                async move { cluster_ok(&url).await.then_some(()) }
            })
            .await?;
        }
        Ok(cluster)
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`, as Sluice's pool takes it.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The nodes, e.g. to kill one.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }
}

/// Two free ports: the client port and the cluster bus port (set explicitly, not port+10000).
fn free_port_pair() -> anyhow::Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

async fn cluster_bus_port(node: &RedisServer) -> anyhow::Result<u16> {
    let mut conn = node.client().await?;
    let reply: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("cluster-port")
        .query_async(&mut conn)
        .await?;
    reply
        .get(1)
        .and_then(|p| p.parse().ok())
        .context("CONFIG GET cluster-port")
}

async fn cluster_ok(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let Ok(info) = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async::<String>(&mut conn)
        .await
    else {
        return false;
    };
    info.contains("cluster_state:ok")
        && info.contains("cluster_known_nodes:3")
        && info.contains("cluster_slots_ok:16384")
}

/// Script calls Redis has run so far (`INFO commandstats`).
pub async fn script_calls(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum())
}
