//! The sluice-worker binary in exec mode against a real queue-svc (in-process, embedded
//! store): a Python one-liner as the handler, retries and dead letters of a failing command,
//! and a graceful drain on SIGTERM.

use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice_testkit::eventually;
use sluice_testkit::queue::{Queue, spec};

fn worker(
    q: &Queue,
    queue: &str,
    extra: &[&str],
    command: &[&str],
) -> anyhow::Result<tokio::process::Child> {
    sluice_testkit::binary::worker_process(
        env!("CARGO_BIN_EXE_sluice-worker"),
        &q.service.url(),
        queue,
        extra,
        command,
    )
}

async fn enqueue(
    q: &Queue,
    queue: &str,
    payloads: &[&str],
    tweak: impl Fn(&mut pb::TaskSpec),
) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    for payload in payloads {
        let mut s = spec("p", queue, payload.as_bytes(), pb::Priority::Normal);
        tweak(&mut s);
        ids.push(
            q.client
                .clone()
                .enqueue(pb::EnqueueRequest { task: Some(s) })
                .await?
                .into_inner()
                .task_id,
        );
    }
    Ok(ids)
}

async fn task(q: &Queue, queue: &str, id: &str) -> Option<pb::Task> {
    q.client
        .clone()
        .get_task(pb::GetTaskRequest {
            project: "p".into(),
            queue: queue.into(),
            task_id: id.into(),
        })
        .await
        .ok()?
        .into_inner()
        .task
}

/// The task `id` of project p's `queue` once it has succeeded (bounded wait).
async fn succeeded(
    client: &pb::queue_client::QueueClient<sluice::auth::Bearer<tonic::transport::Channel>>,
    queue: &str,
    id: &str,
) -> anyhow::Result<pb::Task> {
    eventually(Duration::from_secs(20), "the task to succeed", || {
        let mut client = client.clone();
        let request = pb::GetTaskRequest {
            project: "p".into(),
            queue: queue.into(),
            task_id: id.into(),
        };
        async move {
            client
                .get_task(request)
                .await
                .ok()?
                .into_inner()
                .task
                .filter(|t| t.state == i32::from(pb::TaskState::Succeeded))
        }
    })
    .await
}

async fn stop(mut child: tokio::process::Child) -> anyhow::Result<()> {
    sluice_testkit::binary::sigterm(&child)?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    anyhow::ensure!(status.success(), "worker exited with {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_one_liner_processes_tasks() -> anyhow::Result<()> {
    let q = Queue::start(None, "", &[]).await?;
    let ids = enqueue(
        &q,
        "upper",
        &["alpha", "beta", "gamma", "delta", "epsilon"],
        |_| {},
    )
    .await?;
    let child = worker(
        &q,
        "upper",
        &["--concurrency", "2"],
        &[
            "python3",
            "-c",
            "import sys; sys.stdout.write(sys.stdin.read().upper())",
        ],
    )?;
    for (id, word) in ids
        .iter()
        .zip(["ALPHA", "BETA", "GAMMA", "DELTA", "EPSILON"])
    {
        let done = eventually(Duration::from_secs(20), "the task to succeed", || async {
            task(&q, "upper", id)
                .await
                .filter(|t| t.state == i32::from(pb::TaskState::Succeeded))
        })
        .await?;
        assert_eq!(done.result, word.as_bytes());
        assert_eq!(done.attempts, 1);
    }
    // Without --worker-id the worker shows as host-pid.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    let expected = format!("{}-{}", host.trim(), child.id().unwrap_or_default());
    let workers = q
        .client
        .clone()
        .list_workers(pb::ListWorkersRequest {
            project: "p".into(),
            queue: String::new(),
        })
        .await?
        .into_inner()
        .workers;
    assert!(
        workers.iter().any(|w| w.worker_id == expected),
        "{expected} in {workers:?}"
    );
    stop(child).await?;
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_presents_its_api_key() -> anyhow::Result<()> {
    let creds = sluice_testkit::auth::Credentials::new(&[
        ("web", "sk_web", &["producer"], &["p"]),
        ("fleet", "sk_fleet", &["worker"], &["p"]),
    ])?;
    let q = Queue::start(None, "", &["--auth-keys", &creds.keys_arg()]).await?;
    let url = q.service.url();
    let mut producer =
        pb::queue_client::QueueClient::new(sluice_testkit::auth::channel_as(&url, "sk_web").await?);
    let id = producer
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "keyed", b"ok", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    let child = worker(&q, "keyed", &["--api-key", "sk_fleet"], &["cat"])?;
    let done = succeeded(&producer, "keyed", &id).await?;
    assert_eq!(done.result, b"ok");
    stop(child).await?;
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_connects_over_mutual_tls() -> anyhow::Result<()> {
    let pki = sluice_testkit::auth::Pki::new()?;
    pki.issue("ca", &["server", "worker"])?;
    let config = queue_svc::Config::from_args([
        "queue-svc".to_owned(),
        "--no-auth".to_owned(),
        "--tls-cert".to_owned(),
        pki.arg("server.crt"),
        "--tls-key".to_owned(),
        pki.arg("server.key"),
        "--tls-client-ca".to_owned(),
        pki.arg("ca.crt"),
    ])?;
    let service = sluice_testkit::Service::start(|l, s| queue_svc::run(l, config, s)).await?;
    let url = format!("https://127.0.0.1:{}", service.grpc.port());
    let (cert, key) = (pki.file("worker.crt"), pki.file("worker.key"));
    let channel =
        sluice_testkit::auth::tls_channel(&url, &pki.file("ca.crt"), Some((&cert, &key))).await?;
    let mut client = pb::queue_client::QueueClient::new(tower::Layer::layer(
        &sluice::auth::BearerLayer::new(None),
        channel,
    ));
    let id = client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "sealed", b"over tls", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    let child = sluice_testkit::binary::worker_process(
        env!("CARGO_BIN_EXE_sluice-worker"),
        &url,
        "sealed",
        &[
            "--tls-ca",
            &pki.arg("ca.crt"),
            "--tls-cert",
            &pki.arg("worker.crt"),
            "--tls-key",
            &pki.arg("worker.key"),
        ],
        &["cat"],
    )?;
    let done = succeeded(&client, "sealed", &id).await?;
    assert_eq!(done.result, b"over tls");
    stop(child).await?;
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_command_retries_then_dead_letters() -> anyhow::Result<()> {
    let q = Queue::start(None, "", &[]).await?;
    let fast = |s: &mut pb::TaskSpec| {
        s.max_attempts = Some(3);
        s.retry = Some(pb::RetryPolicy {
            kind: pb::BackoffKind::Fixed.into(),
            initial_delay: Some(prost_types::Duration {
                seconds: 0,
                nanos: 50_000_000,
            }),
            max_delay: None,
            multiplier: None,
            jitter: Some(0.0),
        });
    };
    let transient = enqueue(&q, "flaky", &["x"], fast).await?.remove(0);
    let permanent = enqueue(&q, "flaky", &["exit 3"], fast).await?.remove(0);
    // Exit 3 (the permanent code) for payload "exit 3", exit 1 otherwise.
    let script = "import sys; data = sys.stdin.read(); sys.stderr.write('bad ' + data); sys.exit(3 if data == 'exit 3' else 1)";
    let child = worker(&q, "flaky", &[], &["python3", "-c", script])?;
    let dead = eventually(
        Duration::from_secs(20),
        "the failing task to be dead-lettered",
        || async {
            task(&q, "flaky", &transient)
                .await
                .filter(|t| t.state == i32::from(pb::TaskState::Dead))
        },
    )
    .await?;
    assert_eq!(dead.attempts, 3, "retried per policy until max attempts");
    assert_eq!(dead.errors.len(), 3);
    assert!(
        dead.errors[0].message.contains("exit 1") && dead.errors[0].message.contains("bad x"),
        "{:?}",
        dead.errors[0]
    );
    let dead = eventually(
        Duration::from_secs(20),
        "the permanent failure to be dead-lettered",
        || async {
            task(&q, "flaky", &permanent)
                .await
                .filter(|t| t.state == i32::from(pb::TaskState::Dead))
        },
    )
    .await?;
    assert_eq!(dead.attempts, 1, "a permanent failure is not retried");
    assert_eq!(
        dead.errors[0].category,
        i32::from(pb::FailureCategory::Permanent)
    );
    stop(child).await?;
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_running_tasks_and_leaves_nothing_leased() -> anyhow::Result<()> {
    let q = Queue::start(None, "", &[]).await?;
    let ids = enqueue(&q, "slow", &["1", "2", "3", "4", "5", "6"], |_| {}).await?;
    let child = worker(
        &q,
        "slow",
        &["--concurrency", "2", "--drain-timeout", "5s"],
        &[
            "python3",
            "-c",
            "import sys, time; time.sleep(1); sys.stdout.write('done')",
        ],
    )?;
    let stats = || async {
        q.client
            .clone()
            .get_queue_stats(pb::GetQueueStatsRequest {
                project: "p".into(),
                queue: "slow".into(),
            })
            .await
            .ok()?
            .into_inner()
            .stats
    };
    eventually(Duration::from_secs(10), "two tasks running", || async {
        stats().await.filter(|s| s.leased == 2)
    })
    .await?;
    let signalled = tokio::time::Instant::now();
    stop(child).await?;
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "exited within the drain bound: {:?}",
        signalled.elapsed()
    );
    let after = stats().await.expect("stats");
    assert_eq!(
        after.leased, 0,
        "nothing is left leased to the stopped worker"
    );
    assert_eq!(after.succeeded_retained + after.ready, 6, "{after:?}");
    assert!(
        after.succeeded_retained >= 2,
        "the running tasks finished: {after:?}"
    );
    for id in ids {
        let t = task(&q, "slow", &id).await.expect("task");
        assert!(
            t.state == i32::from(pb::TaskState::Succeeded)
                || (t.state == i32::from(pb::TaskState::Ready) && t.attempts == 0),
            "{t:?}"
        );
    }
    q.service.stop().await
}
