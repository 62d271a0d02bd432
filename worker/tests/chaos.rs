//! Chaos with real processes: a worker killed with -9 while holding leases, a queue-svc
//! instance killed mid-stream, redis-server restarted mid-run. Nothing acknowledged is lost.

use std::path::PathBuf;
use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice_testkit::queue::{Queue, spec};
use sluice_testkit::{Binary, RedisServer, eventually, probe};

fn worker(
    urls: &str,
    queue: &str,
    extra: &[&str],
    command: &[&str],
) -> anyhow::Result<tokio::process::Child> {
    sluice_testkit::binary::worker_process(
        env!("CARGO_BIN_EXE_sluice-worker"),
        urls,
        queue,
        extra,
        command,
    )
}

/// queue-svc's binary, built beside this one by `cargo nextest run --workspace`.
fn queue_svc_binary() -> anyhow::Result<String> {
    let path = PathBuf::from(env!("CARGO_BIN_EXE_sluice-worker")).with_file_name("queue-svc");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: build the workspace (cargo build --workspace)",
        path.display()
    );
    Ok(path.display().to_string())
}

async fn enqueue_n(
    client: &mut pb::queue_client::QueueClient<tonic::transport::Channel>,
    queue: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let tasks = (0..n)
        .map(|i| spec("", "", format!("{i}").as_bytes(), pb::Priority::Normal))
        .collect();
    let reply = client
        .enqueue_batch(pb::EnqueueBatchRequest {
            project: "p".into(),
            queue: queue.into(),
            tasks,
        })
        .await?;
    Ok(reply
        .into_inner()
        .results
        .into_iter()
        .map(|r| r.task_id)
        .collect())
}

async fn all_succeeded(
    client: &pb::queue_client::QueueClient<tonic::transport::Channel>,
    queue: &str,
    n: u64,
    within: Duration,
) -> anyhow::Result<pb::QueueStats> {
    eventually(within, "every task to succeed", || {
        let mut client = client.clone();
        let queue = queue.to_owned();
        async move {
            let stats = client
                .get_queue_stats(pb::GetQueueStatsRequest {
                    project: "p".into(),
                    queue,
                })
                .await
                .ok()?
                .into_inner()
                .stats?;
            (stats.succeeded_retained == n).then_some(stats)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_of_a_worker_killed_with_9_are_redelivered_and_completed() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::start(Some(&redis.url()), "", &[]).await?;
    let ids = enqueue_n(&mut q.client.clone(), "chaos", 10).await?;
    // The doomed worker holds all 10 (its handler outlives the test's patience).
    let mut doomed = worker(
        &q.service.url(),
        "chaos",
        &["--concurrency", "10", "--lease", "2s"],
        &["sleep", "5"],
    )?;
    eventually(Duration::from_secs(10), "10 tasks leased", || async {
        let stats = q
            .client
            .clone()
            .get_queue_stats(pb::GetQueueStatsRequest {
                project: "p".into(),
                queue: "chaos".into(),
            })
            .await
            .ok()?
            .into_inner()
            .stats?;
        (stats.leased == 10).then_some(())
    })
    .await?;
    doomed.kill().await?;
    let survivor = worker(
        &q.service.url(),
        "chaos",
        &["--concurrency", "4"],
        &["true"],
    )?;
    all_succeeded(&q.client, "chaos", 10, Duration::from_secs(20)).await?;
    for id in ids {
        let task = q
            .client
            .clone()
            .get_task(pb::GetTaskRequest {
                project: "p".into(),
                queue: "chaos".into(),
                task_id: id,
            })
            .await?
            .into_inner()
            .task
            .expect("task");
        assert_eq!(
            task.attempts, 2,
            "redelivered once, after the lease expired"
        );
        assert_eq!(
            task.errors[0].category,
            i32::from(pb::FailureCategory::Timeout)
        );
    }
    drop(survivor);
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_move_to_the_other_instance_when_one_is_killed() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let binary = queue_svc_binary()?;
    let args = ["--redis-url", &redis.url(), "--reaper-interval", "100ms"];
    let mut a = Binary::start(&binary, &args).await?;
    let b = Binary::start(&binary, &args).await?;
    let mut client = pb::queue_client::QueueClient::new(probe::channel(&b.url()).await?);
    enqueue_n(&mut client, "failover", 300).await?;
    let urls = format!("{},{}", a.url(), b.url());
    let workers = [
        worker(
            &urls,
            "failover",
            &["--concurrency", "4", "--lease", "3s"],
            &["sleep", "0.02"],
        )?,
        worker(
            &urls,
            "failover",
            &["--concurrency", "4", "--lease", "3s"],
            &["sleep", "0.02"],
        )?,
    ];
    eventually(Duration::from_secs(20), "some progress", || {
        let mut client = client.clone();
        async move {
            let stats = client
                .get_queue_stats(pb::GetQueueStatsRequest {
                    project: "p".into(),
                    queue: "failover".into(),
                })
                .await
                .ok()?
                .into_inner()
                .stats?;
            (stats.succeeded_retained >= 30).then_some(())
        }
    })
    .await?;
    a.kill().await?;
    let stats = all_succeeded(&client, "failover", 300, Duration::from_secs(60)).await?;
    assert_eq!((stats.ready, stats.leased, stats.dead), (0, 0, 0));
    drop(workers);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_mid_run_loses_no_task() -> anyhow::Result<()> {
    let mut redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ])
    .await?;
    let q = Queue::start(Some(&redis.url()), "", &[]).await?;
    enqueue_n(&mut q.client.clone(), "restart", 200).await?;
    let w = worker(
        &q.service.url(),
        "restart",
        &["--concurrency", "4", "--lease", "3s"],
        &["sleep", "0.02"],
    )?;
    eventually(Duration::from_secs(20), "some progress", || async {
        let stats = q
            .client
            .clone()
            .get_queue_stats(pb::GetQueueStatsRequest {
                project: "p".into(),
                queue: "restart".into(),
            })
            .await
            .ok()?
            .into_inner()
            .stats?;
        (stats.succeeded_retained >= 20).then_some(())
    })
    .await?;
    redis.kill()?;
    redis.restart().await?;
    let stats = all_succeeded(&q.client, "restart", 200, Duration::from_secs(60)).await?;
    assert_eq!((stats.ready, stats.leased, stats.dead), (0, 0, 0));
    drop(w);
    q.service.stop().await
}
