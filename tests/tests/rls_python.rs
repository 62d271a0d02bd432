//! Envoy RLS against a client that shares no code with Sluice: Python's grpcio with Envoy's
//! protos from the `xds-protos` package (tests/python/test_rls.py), in the venv `.ci/run`
//! creates at `.venv` (or the interpreter named by `SLUICE_PYTHON`).

use std::path::PathBuf;
use std::time::Duration;

use sluice_testkit::auth::Credentials;
use sluice_testkit::limiter::{Limiter, StoreKind};
use sluice_testkit::{RedisCluster, RedisServer};

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs test_rls.py against limiter-svc on `store`; with `auth`, the server has auth on and the
/// client sends its key.
async fn run_python_suite(store: StoreKind, auth: bool) -> anyhow::Result<()> {
    let python = sluice_testkit::python()?;
    let limits = std::fs::read_to_string(python_dir().join("rls_limits.toml"))?;
    let creds = Credentials::new(&[("envoy", "sk_envoy", &["producer"], &["*"])])?;
    let keys = creds.keys_arg();
    let extra: &[&str] = if auth { &["--auth-keys", &keys] } else { &[] };
    let limiter = Limiter::start(&store, &limits, extra).await?;
    let run_id = format!("{}-{}", std::process::id(), limiter.service.grpc.port());
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(&python)
            .arg(python_dir().join("test_rls.py"))
            .arg(limiter.service.grpc.to_string())
            .arg(&run_id)
            .args(auth.then_some("sk_envoy"))
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    anyhow::ensure!(
        output.status.success(),
        "test_rls.py failed:\n{stdout}\n{stderr}"
    );
    anyhow::ensure!(
        stdout.contains(" 0 failed"),
        "unexpected summary:\n{stdout}"
    );
    limiter.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_envoy_client_on_the_embedded_store() -> anyhow::Result<()> {
    run_python_suite(StoreKind::Embedded, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_envoy_client_with_credentials_on_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    run_python_suite(StoreKind::Redis(redis.url()), true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_envoy_client_on_a_cluster() -> anyhow::Result<()> {
    let cluster = RedisCluster::start().await?;
    run_python_suite(StoreKind::Redis(cluster.url()), false).await
}
