//! `sluice limit` and `sluice queue`, the real binary, against limiter-svc and queue-svc on a
//! real Redis with auth on: what an operator types and what it prints.

use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice_testkit::RedisServer;
use sluice_testkit::auth::{Credentials, channel_as};
use sluice_testkit::limiter::{Limiter, StoreKind};
use sluice_testkit::queue::{Queue, dequeue};

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `sluice args` with `env`, bounded.
async fn sluice(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Run> {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_API_KEY")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output).await??;
    Ok(Run {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout)?,
        stderr: String::from_utf8(output.stderr)?,
    })
}

/// `args` on the queue `shop/mail`.
fn with<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let at = ["--project", "shop", "--queue", "mail"];
    args.iter().copied().chain(at).collect()
}

/// The value of `key: value` in `text`.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_check_limits_from_the_command_line() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let creds = Credentials::new(&[
        ("ops", "sk_ops", &["admin"], &["*"]),
        ("web", "sk_web", &["producer"], &["shop"]),
    ])?;
    let limits = "[policies.api]\nalgorithm = \"fixed_window\"\nlimit = 2\nwindow = \"1h\"\n";
    let limiter = Limiter::start(
        &StoreKind::Redis(redis.url()),
        limits,
        &["--auth-keys", &creds.keys_arg()],
    )
    .await?;
    let url = limiter.service.url();
    let ops = [
        ("SLUICE_LIMITER_URL", url.as_str()),
        ("SLUICE_API_KEY", "sk_ops"),
    ];
    let check = ["limit", "check", "--subject", "alice", "--policy", "api"];

    for remaining in ["1", "0"] {
        let run = sluice(&check, &ops).await?;
        anyhow::ensure!(run.code == Some(0), "allowed exits 0: {}", run.stderr);
        anyhow::ensure!(
            field(&run.stdout, "allowed") == Some("true"),
            "{}",
            run.stdout
        );
        anyhow::ensure!(
            field(&run.stdout, "  remaining") == Some(remaining),
            "{}",
            run.stdout
        );
    }
    let denied = sluice(&check, &ops).await?;
    anyhow::ensure!(denied.code == Some(4), "denied exits 4: {:?}", denied.code);
    anyhow::ensure!(field(&denied.stdout, "allowed") == Some("false"));
    anyhow::ensure!(
        field(&denied.stdout, "retry_after").is_some(),
        "{}",
        denied.stdout
    );

    // Reading spends nothing; resetting needs admin; an inline limit needs no policy.
    let status = sluice(
        &["limit", "status", "--subject", "alice", "--policy", "api"],
        &ops,
    )
    .await?;
    anyhow::ensure!(
        field(&status.stdout, "  remaining") == Some("0"),
        "{}",
        status.stdout
    );
    let producer = [
        ("SLUICE_LIMITER_URL", url.as_str()),
        ("SLUICE_API_KEY", "sk_web"),
    ];
    let reset = ["limit", "reset", "--subject", "alice", "--policy", "api"];
    let refused = sluice(&reset, &producer).await?;
    anyhow::ensure!(
        refused.code == Some(1)
            && refused.stderr.contains("PermissionDenied")
            && refused.stderr.contains("admin"),
        "{:?} {}",
        refused.code,
        refused.stderr
    );
    anyhow::ensure!(sluice(&reset, &ops).await?.code == Some(0));
    anyhow::ensure!(
        sluice(&check, &ops).await?.code == Some(0),
        "reset frees the limit"
    );
    let inline = sluice(
        &[
            "limit",
            "check",
            "--subject",
            "bob",
            "--limit",
            "1",
            "--window",
            "1m",
            "--algorithm",
            "gcra",
        ],
        &ops,
    )
    .await?;
    anyhow::ensure!(
        field(&inline.stdout, "  algorithm") == Some("gcra"),
        "{}",
        inline.stdout
    );

    // Without credentials: refused, saying what to send.
    let anonymous = sluice(&check, &[("SLUICE_LIMITER_URL", url.as_str())]).await?;
    anyhow::ensure!(
        anonymous.code == Some(1) && anonymous.stderr.contains("Unauthenticated"),
        "{}",
        anonymous.stderr
    );
    limiter.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_tend_queues_from_the_command_line() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let creds = Credentials::new(&[("ops", "sk_ops", &["admin"], &["*"])])?;
    let q = Queue::start(Some(&redis.url()), "", &["--auth-keys", &creds.keys_arg()]).await?;
    let url = q.service.url();
    let ops = [
        ("SLUICE_QUEUE_URL", url.as_str()),
        ("SLUICE_API_KEY", "sk_ops"),
    ];

    let enqueued = sluice(
        &with(&["queue", "enqueue", "--payload", "hello", "--header", "k=v"]),
        &ops,
    )
    .await?;
    anyhow::ensure!(enqueued.code == Some(0), "{}", enqueued.stderr);
    let id = field(&enqueued.stdout, "task_id")
        .ok_or_else(|| anyhow::anyhow!("no task_id in {}", enqueued.stdout))?
        .to_owned();
    let task = sluice(&with(&["queue", "task", "--payload", &id]), &ops).await?;
    anyhow::ensure!(
        field(&task.stdout, "state") == Some("ready"),
        "{}",
        task.stdout
    );
    anyhow::ensure!(
        field(&task.stdout, "payload") == Some("hello"),
        "{}",
        task.stdout
    );

    // A task that fails for good lands in the dead letters; the operator lists and redrives it.
    let mut client = pb::queue_client::QueueClient::new(channel_as(&url, "sk_ops").await?);
    let lease = client
        .dequeue(dequeue("shop", "mail", 1))
        .await?
        .into_inner()
        .leases
        .pop()
        .ok_or_else(|| anyhow::anyhow!("nothing leased"))?;
    client
        .fail(pb::FailRequest {
            project: "shop".into(),
            queue: "mail".into(),
            task_id: id.clone(),
            lease_token: lease.lease_token,
            message: "bad address".into(),
            category: pb::FailureCategory::Permanent.into(),
            retryable: Some(false),
        })
        .await?;
    let dead = sluice(&with(&["queue", "dead", "list"]), &ops).await?;
    anyhow::ensure!(
        dead.stdout.contains(&id) && dead.stdout.contains("permanent: bad address"),
        "{}",
        dead.stdout
    );
    let redriven = sluice(&with(&["queue", "dead", "redrive", "--all"]), &ops).await?;
    anyhow::ensure!(
        field(&redriven.stdout, "redriven") == Some("1"),
        "{}",
        redriven.stdout
    );
    let stats = sluice(&with(&["queue", "stats"]), &ops).await?;
    anyhow::ensure!(
        field(&stats.stdout, "ready") == Some("1") && field(&stats.stdout, "dead") == Some("0"),
        "{}",
        stats.stdout
    );

    let paused = sluice(&with(&["queue", "pause"]), &ops).await?;
    anyhow::ensure!(
        field(&paused.stdout, "paused") == Some("true"),
        "{}",
        paused.stdout
    );
    let resumed = sluice(&with(&["queue", "resume"]), &ops).await?;
    anyhow::ensure!(field(&resumed.stdout, "paused") == Some("false"));
    let cancelled = sluice(&with(&["queue", "cancel", &id]), &ops).await?;
    anyhow::ensure!(
        field(&cancelled.stdout, "state") == Some("cancelled"),
        "{}",
        cancelled.stdout
    );

    // Bad input comes back as the server's message naming the field.
    let bad = sluice(
        &[
            "queue",
            "stats",
            "--project",
            "no spaces",
            "--queue",
            "mail",
        ],
        &ops,
    )
    .await?;
    anyhow::ensure!(
        bad.code == Some(1)
            && bad.stderr.contains("InvalidArgument")
            && bad.stderr.contains("project"),
        "{}",
        bad.stderr
    );
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_come_with_an_entry_the_services_accept() -> anyhow::Result<()> {
    let made = sluice(
        &[
            "key",
            "new",
            "--name",
            "web",
            "--role",
            "producer",
            "--project",
            "shop,mail",
        ],
        &[],
    )
    .await?;
    anyhow::ensure!(made.code == Some(0), "{}", made.stderr);
    let key = made
        .stderr
        .lines()
        .find(|l| l.starts_with("sk_"))
        .ok_or_else(|| anyhow::anyhow!("no key in {}", made.stderr))?;
    anyhow::ensure!(!made.stdout.contains(key), "the key stays out of the entry");
    anyhow::ensure!(key.starts_with("sk_") && key.len() == 46, "{key}");
    let entry = &made.stdout;
    anyhow::ensure!(sluice::auth::check_keys_file(entry)? == 1, "{entry}");
    anyhow::ensure!(
        entry.contains(&sluice::auth::key_hash(key)),
        "the entry admits the key printed: {entry}"
    );
    let refused = sluice(
        &[
            "key",
            "new",
            "--name",
            "web",
            "--role",
            "admin",
            "--project",
            "no spaces",
        ],
        &[],
    )
    .await?;
    anyhow::ensure!(
        refused.code == Some(1) && refused.stderr.contains("projects"),
        "{}",
        refused.stderr
    );
    Ok(())
}
