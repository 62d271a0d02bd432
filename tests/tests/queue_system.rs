//! queue-svc against real redis-server processes (standalone, and the 3-master cluster for the
//! behaviours that must hold there), through real gRPC.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice_testkit::queue::{Queue, dequeue, spec};
use sluice_testkit::{RedisCluster, RedisServer, eventually};
use tonic::Code;

const PRIORITIES: [pb::Priority; 5] = [
    pb::Priority::Critical,
    pb::Priority::High,
    pb::Priority::Normal,
    pb::Priority::Low,
    pb::Priority::Background,
];

fn prio_rank(p: i32) -> usize {
    PRIORITIES
        .iter()
        .position(|x| i32::from(*x) == p)
        .unwrap_or(usize::MAX)
}

async fn ordering(url: Option<String>) -> anyhow::Result<()> {
    let mut q = Queue::start(url.as_deref(), "", &[]).await?;
    // 5,000 tasks across 5 priorities and 3 projects, enqueued in batches with mixed priorities.
    let projects = ["alpha", "beta", "gamma"];
    let mut order: HashMap<String, (usize, usize)> = HashMap::new(); // id -> (priority, enqueue index)
    for (pi, project) in projects.iter().enumerate() {
        let count = if pi == 0 { 1666 } else { 1667 };
        let mut index = 0;
        for batch in [1000, count - 1000] {
            let tasks: Vec<pb::TaskSpec> = (0..batch)
                .map(|j| {
                    spec(
                        "",
                        "",
                        format!("{project}-{index}-{j}").as_bytes(),
                        PRIORITIES[(j * 7 + pi) % 5],
                    )
                })
                .collect();
            let reply = q
                .client
                .enqueue_batch(pb::EnqueueBatchRequest {
                    project: project.to_string(),
                    queue: "work".into(),
                    tasks: tasks.clone(),
                })
                .await?
                .into_inner();
            for (r, t) in reply.results.iter().zip(&tasks) {
                order.insert(r.task_id.clone(), (prio_rank(t.priority), index));
                index += 1;
            }
        }
    }
    assert_eq!(order.len(), 5000);
    // Isolation: a call for one project sees only that project's tasks.
    let alpha_only = q
        .client
        .dequeue(dequeue("alpha", "work", 50))
        .await?
        .into_inner()
        .leases;
    assert!(
        alpha_only
            .iter()
            .all(|l| l.task.as_ref().is_some_and(|t| t.project == "alpha"))
    );
    for lease in &alpha_only {
        let task = lease.task.as_ref().expect("task");
        q.client
            .fail(pb::FailRequest {
                project: "alpha".into(),
                queue: "work".into(),
                task_id: task.id.clone(),
                lease_token: lease.lease_token.clone(),
                message: "put back".into(),
                category: pb::FailureCategory::Transient.into(),
                retryable: Some(false),
            })
            .await?;
    }
    for lease in &alpha_only {
        order.remove(&lease.task.as_ref().expect("task").id);
    }
    // One worker fleet serving the three projects: most urgent priority first, FIFO within a
    // priority per project, and the projects in turn.
    let mut all = dequeue("alpha", "work", 256);
    all.also_projects = vec!["beta".into(), "gamma".into()];
    let mut seen: Vec<(usize, String, usize)> = Vec::new(); // (priority, project, enqueue index)
    loop {
        let leases = q.client.dequeue(all.clone()).await?.into_inner().leases;
        if leases.is_empty() {
            break;
        }
        for lease in leases {
            let task = lease.task.expect("a task");
            let (priority, index) = order[&task.id];
            seen.push((priority, task.project, index));
        }
    }
    assert_eq!(seen.len(), order.len(), "every task leased once");
    for pair in seen.windows(2) {
        assert!(
            pair[0].0 <= pair[1].0,
            "most urgent priority first: {pair:?}"
        );
    }
    for project in projects {
        let mine: Vec<&(usize, String, usize)> = seen.iter().filter(|t| t.1 == project).collect();
        for pair in mine.windows(2) {
            assert!(
                pair[0].0 < pair[1].0 || pair[0].2 < pair[1].2,
                "{project}: FIFO within a priority: {pair:?}"
            );
        }
    }
    for level in 0..5 {
        let at_level: Vec<&String> = seen.iter().filter(|t| t.0 == level).map(|t| &t.1).collect();
        let fewest = projects
            .iter()
            .map(|p| at_level.iter().filter(|x| x.as_str() == *p).count())
            .min()
            .unwrap_or(0);
        // While every project still has tasks at this level, each round serves each project
        // once (rounds rotate their first project); a Dequeue call can end mid-round, so any 7
        // consecutive leases include all three projects.
        // (Rounds rotate their starting project, so the last rounds before one project runs
        // out are left out.)
        let prefix = (3 * fewest).saturating_sub(9);
        for window in at_level[..prefix].windows(7) {
            let distinct: HashSet<&&String> = window.iter().collect();
            assert_eq!(
                distinct.len(),
                3,
                "priority {level}: projects take turns: {window:?}"
            );
        }
    }
    q.service.stop().await
}

async fn lease_expiry_fences_the_old_holder(url: Option<String>) -> anyhow::Result<()> {
    let mut q = Queue::start(url.as_deref(), "", &[]).await?;
    let id = q
        .client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "q", b"job", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    let mut first = dequeue("p", "q", 1);
    first.lease_duration = Some(prost_types::Duration {
        seconds: 1,
        nanos: 0,
    });
    let old = q.client.dequeue(first).await?.into_inner().leases.remove(0);
    assert_eq!(old.attempt, 1);
    // The holder goes silent; the reaper returns the task once its lease expires.
    let client = q.client.clone();
    let new = eventually(
        Duration::from_secs(10),
        "the task to be redelivered",
        || {
            let mut client = client.clone();
            async move {
                client
                    .dequeue(dequeue("p", "q", 1))
                    .await
                    .ok()?
                    .into_inner()
                    .leases
                    .pop()
            }
        },
    )
    .await?;
    assert_eq!(new.attempt, 2);
    assert_eq!(new.task.as_ref().map(|t| t.id.as_str()), Some(id.as_str()));
    let complete = |token: &str| pb::CompleteRequest {
        project: "p".into(),
        queue: "q".into(),
        task_id: id.clone(),
        lease_token: token.into(),
        result: b"done".to_vec(),
    };
    let refused = q
        .client
        .complete(complete(&old.lease_token))
        .await
        .expect_err("the old holder is fenced");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    q.client.complete(complete(&new.lease_token)).await?;
    q.client
        .complete(complete(&new.lease_token))
        .await
        .map_err(|e| anyhow::anyhow!("a repeated complete is answered ok: {e}"))?;
    let task = q
        .client
        .get_task(pb::GetTaskRequest {
            project: "p".into(),
            queue: "q".into(),
            task_id: id.clone(),
        })
        .await?
        .into_inner()
        .task
        .expect("task");
    assert_eq!(task.state, i32::from(pb::TaskState::Succeeded));
    assert_eq!(task.attempts, 2);
    assert_eq!(task.result, b"done");
    assert_eq!(task.errors.len(), 1, "the expired lease is recorded");
    assert_eq!(
        task.errors[0].category,
        i32::from(pb::FailureCategory::Timeout)
    );
    q.service.stop().await
}

async fn retries_follow_the_policy_then_dead_letters_and_redrive(
    url: Option<String>,
) -> anyhow::Result<()> {
    let mut q = Queue::start(url.as_deref(), "", &[]).await?;
    let mut s = spec("p", "retry", b"flaky", pb::Priority::High);
    s.max_attempts = Some(5);
    s.retry = Some(pb::RetryPolicy {
        kind: pb::BackoffKind::Exponential.into(),
        initial_delay: Some(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        }),
        max_delay: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        multiplier: Some(2.0),
        jitter: Some(0.0),
    });
    let id = q
        .client
        .enqueue(pb::EnqueueRequest { task: Some(s) })
        .await?
        .into_inner()
        .task_id;
    let client = q.client.clone();
    let next = || {
        let client = client.clone();
        eventually(
            Duration::from_secs(10),
            "the retry to become ready",
            move || {
                let mut client = client.clone();
                async move {
                    client
                        .dequeue(dequeue("p", "retry", 1))
                        .await
                        .ok()?
                        .into_inner()
                        .leases
                        .pop()
                }
            },
        )
    };
    for (attempt, expected_delay_ms) in [(1u32, 100i64), (2, 200)] {
        let lease = next().await?;
        assert_eq!(lease.attempt, attempt);
        let failed = q
            .client
            .fail(pb::FailRequest {
                project: "p".into(),
                queue: "retry".into(),
                task_id: id.clone(),
                lease_token: lease.lease_token,
                message: format!("boom {attempt}"),
                category: pb::FailureCategory::Transient.into(),
                retryable: None,
            })
            .await?
            .into_inner();
        assert_eq!(
            failed.outcome,
            i32::from(pb::fail_response::Outcome::RetryScheduled)
        );
        let task = q
            .client
            .get_task(pb::GetTaskRequest {
                project: "p".into(),
                queue: "retry".into(),
                task_id: id.clone(),
            })
            .await?
            .into_inner()
            .task
            .expect("task");
        let ms = |t: &prost_types::Timestamp| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000;
        let delay = ms(task.scheduled_for.as_ref().expect("scheduled"))
            - ms(task.failed_at.as_ref().expect("failed"));
        assert_eq!(
            delay, expected_delay_ms,
            "exponential 100 ms × 2^(n-1), no jitter"
        );
        assert_eq!(task.state, i32::from(pb::TaskState::Scheduled));
    }
    let third = next().await?;
    assert_eq!(third.attempt, 3);
    q.client
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: "retry".into(),
            task_id: id.clone(),
            lease_token: third.lease_token,
            result: vec![],
        })
        .await?;
    let task = q
        .client
        .get_task(pb::GetTaskRequest {
            project: "p".into(),
            queue: "retry".into(),
            task_id: id.clone(),
        })
        .await?
        .into_inner()
        .task
        .expect("task");
    assert_eq!(
        (task.state, task.attempts),
        (i32::from(pb::TaskState::Succeeded), 3)
    );

    // A permanent failure goes straight to the dead letters; redrive brings it back.
    let doomed = q
        .client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "retry", b"bad", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    let lease = next().await?;
    let failed = q
        .client
        .fail(pb::FailRequest {
            project: "p".into(),
            queue: "retry".into(),
            task_id: doomed.clone(),
            lease_token: lease.lease_token,
            message: "malformed input".into(),
            category: pb::FailureCategory::Permanent.into(),
            retryable: None,
        })
        .await?
        .into_inner();
    assert_eq!(
        failed.outcome,
        i32::from(pb::fail_response::Outcome::DeadLettered)
    );
    let dead = q
        .client
        .list_dead_letters(pb::ListDeadLettersRequest {
            project: "p".into(),
            queue: "retry".into(),
            category: pb::FailureCategory::Permanent.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        dead.tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        vec![doomed.as_str()]
    );
    assert_eq!(dead.tasks[0].errors[0].message, "malformed input");
    let redriven = q
        .client
        .redrive_dead_letters(pb::RedriveDeadLettersRequest {
            project: "p".into(),
            queue: "retry".into(),
            selector: Some(pb::DeadLetterSelector {
                selector: Some(pb::dead_letter_selector::Selector::TaskId(doomed.clone())),
            }),
            limit: 0,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(redriven.redriven, 1);
    let again = next().await?;
    assert_eq!(again.attempt, 1, "redrive resets attempts");
    q.client
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: "retry".into(),
            task_id: doomed.clone(),
            lease_token: again.lease_token,
            result: vec![],
        })
        .await?;
    let stats = q.stats("p", "retry").await?;
    assert_eq!(
        (stats.ready, stats.scheduled, stats.leased, stats.dead),
        (0, 0, 0, 0)
    );
    q.service.stop().await
}

/// Auto-redrive: a transient dead letter comes back by itself after the queue's cool-down,
/// attempts reset, at most `max` times; a permanent one never does.
async fn auto_redrive_brings_back_transient_dead_letters(
    url: Option<String>,
) -> anyhow::Result<()> {
    let q = Queue::start(
        url.as_deref(),
        "[queues.auto]\nauto_redrive = { after = \"1s\", categories = [\"transient\"], max = 1 }\n",
        &[],
    )
    .await?;
    let client = q.client.clone();
    let enqueue = |payload: &'static [u8]| {
        let mut client = client.clone();
        async move {
            let mut s = spec("p", "auto", payload, pb::Priority::Normal);
            s.max_attempts = Some(1);
            anyhow::Ok(
                client
                    .enqueue(pb::EnqueueRequest { task: Some(s) })
                    .await?
                    .into_inner()
                    .task_id,
            )
        }
    };
    // Leases the one ready task and fails it with `category`.
    let lease_and_fail = |category: pb::FailureCategory| {
        let mut client = client.clone();
        async move {
            let lease = client
                .dequeue(dequeue("p", "auto", 1))
                .await?
                .into_inner()
                .leases
                .pop()
                .ok_or_else(|| anyhow::anyhow!("a ready task"))?;
            let task = lease.task.expect("task");
            let outcome = client
                .fail(pb::FailRequest {
                    project: "p".into(),
                    queue: "auto".into(),
                    task_id: task.id.clone(),
                    lease_token: lease.lease_token,
                    message: "boom".into(),
                    category: category.into(),
                    retryable: None,
                })
                .await?
                .into_inner()
                .outcome;
            anyhow::ensure!(outcome == i32::from(pb::fail_response::Outcome::DeadLettered));
            anyhow::Ok(task.id)
        }
    };
    let state = |id: String| {
        let mut client = client.clone();
        async move {
            let task = client
                .get_task(pb::GetTaskRequest {
                    project: "p".into(),
                    queue: "auto".into(),
                    task_id: id,
                })
                .await?
                .into_inner()
                .task
                .expect("task");
            anyhow::Ok((pb::TaskState::try_from(task.state)?, task.attempts))
        }
    };
    let until_ready = |id: String| {
        eventually(Duration::from_secs(10), "auto-redrive", move || {
            let id = id.clone();
            async move {
                match state(id).await {
                    Ok((pb::TaskState::Ready, attempts)) => Some(attempts),
                    _ => None,
                }
            }
        })
    };

    let permanent = enqueue(b"permanent").await?;
    lease_and_fail(pb::FailureCategory::Permanent).await?;
    let transient = enqueue(b"transient").await?;
    let before_death = tokio::time::Instant::now();
    lease_and_fail(pb::FailureCategory::Transient).await?;
    assert_eq!(state(transient.clone()).await?.0, pb::TaskState::Dead);
    let attempts = until_ready(transient.clone()).await?;
    assert!(
        before_death.elapsed() >= Duration::from_secs(1),
        "not before the cool-down"
    );
    assert_eq!(attempts, 0, "attempts reset");

    // Its second death is its last: max = 1. A task dying after it shows the reaper has
    // looked past it.
    lease_and_fail(pb::FailureCategory::Transient).await?;
    let later = enqueue(b"later").await?;
    lease_and_fail(pb::FailureCategory::Transient).await?;
    until_ready(later).await?;
    assert_eq!(state(transient).await?.0, pb::TaskState::Dead, "max = 1");
    assert_eq!(state(permanent).await?.0, pb::TaskState::Dead);
    q.service.stop().await
}

/// Redriven tasks count against the queue's max_size: only as many as fit move, none fitting
/// is RESOURCE_EXHAUSTED, and the dead letters stay where they are.
async fn redrive_respects_max_size(url: Option<String>) -> anyhow::Result<()> {
    let mut q = Queue::start(url.as_deref(), "[queues.tight]\nmax_size = 2\n", &[]).await?;
    // Two dead letters.
    for i in 0..2 {
        let mut s = spec(
            "p",
            "tight",
            format!("d{i}").as_bytes(),
            pb::Priority::Normal,
        );
        s.max_attempts = Some(1);
        q.client
            .enqueue(pb::EnqueueRequest { task: Some(s) })
            .await?;
        let lease = q
            .client
            .dequeue(dequeue("p", "tight", 1))
            .await?
            .into_inner()
            .leases
            .pop()
            .ok_or_else(|| anyhow::anyhow!("a lease"))?;
        q.client
            .fail(pb::FailRequest {
                project: "p".into(),
                queue: "tight".into(),
                task_id: lease.task.expect("task").id,
                lease_token: lease.lease_token,
                message: "no".into(),
                category: pb::FailureCategory::Permanent.into(),
                retryable: None,
            })
            .await?;
    }
    let redrive_all = || pb::RedriveDeadLettersRequest {
        project: "p".into(),
        queue: "tight".into(),
        selector: Some(pb::DeadLetterSelector {
            selector: Some(pb::dead_letter_selector::Selector::All(true)),
        }),
        limit: 0,
        page_token: String::new(),
    };
    // Room for one of them.
    q.client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "tight", b"live", pb::Priority::Normal)),
        })
        .await?;
    let first = q
        .client
        .redrive_dead_letters(redrive_all())
        .await?
        .into_inner();
    assert_eq!((first.redriven, first.more), (1, true), "only what fits");
    let err = q
        .client
        .redrive_dead_letters(redrive_all())
        .await
        .expect_err("the queue is full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_size"), "{err:?}");
    let stats = q.stats("p", "tight").await?;
    assert_eq!(
        (stats.ready, stats.dead),
        (2, 1),
        "the refused one stays dead"
    );
    q.service.stop().await
}

/// Retention: a succeeded task is removed once the queue's retention has passed, and its
/// idempotency key with it, so the same key then makes a new task.
async fn finished_tasks_and_idempotency_keys_expire(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "[queues.short]\nretention = \"1s\"\n", &[]).await?;
    let mut client = q.client.clone();
    let mut task = spec("p", "short", b"x", pb::Priority::Normal);
    task.idempotency_key = "once".into();
    let first = client
        .enqueue(pb::EnqueueRequest {
            task: Some(task.clone()),
        })
        .await?
        .into_inner();
    let lease = client
        .dequeue(dequeue("p", "short", 1))
        .await?
        .into_inner()
        .leases;
    let [lease] = lease.as_slice() else {
        anyhow::bail!("one lease, got {lease:?}")
    };
    client
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: "short".into(),
            task_id: first.task_id.clone(),
            lease_token: lease.lease_token.clone(),
            result: vec![],
        })
        .await?;
    let again = client
        .enqueue(pb::EnqueueRequest {
            task: Some(task.clone()),
        })
        .await?
        .into_inner();
    assert!(
        again.duplicate,
        "within retention the key answers the first task"
    );
    assert_eq!(again.task_id, first.task_id);

    eventually(Duration::from_secs(10), "the finished task removed", || {
        let mut client = client.clone();
        let id = first.task_id.clone();
        async move {
            let status = client
                .get_task(pb::GetTaskRequest {
                    project: "p".into(),
                    queue: "short".into(),
                    task_id: id,
                })
                .await
                .err()?;
            (status.code() == Code::NotFound).then_some(())
        }
    })
    .await?;
    let fresh = client
        .enqueue(pb::EnqueueRequest { task: Some(task) })
        .await?
        .into_inner();
    assert!(!fresh.duplicate, "after retention the key makes a new task");
    assert_ne!(fresh.task_id, first.task_id);
    q.service.stop().await
}

macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(None).await
                }
            )*
        }
        mod standalone {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let redis = RedisServer::start().await?;
                    super::$name(Some(redis.url())).await
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    let cluster = RedisCluster::start().await?;
                    super::$name(Some(cluster.url())).await
                }
            )*
        }
    };
}

/// A waiting Dequeue call's answer: exactly the task `id` (within 15 s).
async fn answered_with(
    waiting: tokio::task::JoinHandle<Result<tonic::Response<pb::DequeueResponse>, tonic::Status>>,
    id: &str,
) -> anyhow::Result<()> {
    let leases = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await???
        .into_inner()
        .leases;
    let leased: Vec<&str> = leases
        .iter()
        .filter_map(|l| l.task.as_ref().map(|t| t.id.as_str()))
        .collect();
    assert_eq!(leased, [id]);
    Ok(())
}

/// Dequeue's long poll answers with a task enqueued while it waits; a caller whose deadline
/// is nearer than its wait gets an empty answer before the deadline, not DEADLINE_EXCEEDED.
async fn long_polls_answer_with_arrivals_and_before_the_callers_deadline(
    url: Option<String>,
) -> anyhow::Result<()> {
    let mut q = Queue::start(url.as_deref(), "", &[]).await?;
    let long_poll = |queue: &str| pb::DequeueRequest {
        wait: Some(prost_types::Duration {
            seconds: 20,
            nanos: 0,
        }),
        ..dequeue("p", queue, 1)
    };

    let mut hurried = tonic::Request::new(long_poll("quiet"));
    hurried.set_timeout(Duration::from_secs(3));
    let answer = q.client.dequeue(hurried).await;
    assert!(
        answer.as_ref().is_ok_and(|a| a.get_ref().leases.is_empty()),
        "an empty answer within the 3 s deadline: {answer:?}"
    );

    let mut client = q.client.clone();
    let waiting = tokio::spawn(async move { client.dequeue(long_poll("arrivals")).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "a long poll on an empty queue is still waiting"
    );
    let id = q
        .client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "arrivals", b"here", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    answered_with(waiting, &id).await?;
    q.service.stop().await
}

/// A task with `not_before` in the past is ready at once; one two seconds ahead is scheduled
/// and is leased only once its time has come.
async fn not_before_holds_a_task_until_its_time(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    let mut client = q.client.clone();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let at = |d: Duration| prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    };
    let due = now + Duration::from_secs(2);
    let mut answers = Vec::new();
    for (payload, when) in [
        ("past", at(now - Duration::from_secs(60))),
        ("ahead", at(due)),
    ] {
        let mut task = spec("p", "nb", payload.as_bytes(), pb::Priority::Normal);
        task.schedule = Some(pb::task_spec::Schedule::NotBefore(when));
        answers.push(
            client
                .enqueue(pb::EnqueueRequest { task: Some(task) })
                .await?
                .into_inner(),
        );
    }
    assert_eq!(answers[0].state, i32::from(pb::TaskState::Ready));
    assert_eq!(answers[1].state, i32::from(pb::TaskState::Scheduled));
    let first = client
        .dequeue(dequeue("p", "nb", 2))
        .await?
        .into_inner()
        .leases;
    let payloads: Vec<&[u8]> = first
        .iter()
        .filter_map(|l| l.task.as_ref().map(|t| t.payload.as_slice()))
        .collect();
    assert_eq!(payloads, [b"past".as_slice()]);
    let ahead = eventually(Duration::from_secs(10), "the scheduled task leased", || {
        let mut client = client.clone();
        async move {
            let leases = client
                .dequeue(dequeue("p", "nb", 1))
                .await
                .ok()?
                .into_inner()
                .leases;
            leases.into_iter().next()
        }
    })
    .await?;
    let leased_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    // Due to the millisecond, as the store keeps it.
    assert!(
        leased_at.as_millis() >= due.as_millis(),
        "leased at {leased_at:?}, due {due:?}"
    );
    assert_eq!(ahead.task.map(|t| t.payload), Some(b"ahead".to_vec()));
    q.service.stop().await
}

/// Enqueues one task into `queue` of project "p" and cancels it while it is ready.
async fn cancel_one(client: &mut Client, queue: &str) -> anyhow::Result<()> {
    let id = client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", queue, b"x", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    client
        .cancel_task(pb::CancelTaskRequest {
            project: "p".into(),
            queue: queue.into(),
            task_id: id,
        })
        .await?;
    Ok(())
}

/// GetQueueStats counts retained succeeded and cancelled tasks apart, and both fall to zero
/// when retention removes them.
async fn stats_tell_succeeded_from_cancelled(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "[queues.st]\nretention = \"3s\"\n", &[]).await?;
    let mut client = q.client.clone();
    run_one(&mut client, "st").await?;
    for _ in 0..2 {
        cancel_one(&mut client, "st").await?;
    }
    let stats = q.stats("p", "st").await?;
    assert_eq!(
        (stats.succeeded_retained, stats.cancelled_retained),
        (1, 2),
        "{stats:?}"
    );
    assert!(stats.sampled_at.is_some(), "{stats:?}");
    eventually(Duration::from_secs(10), "retention to remove both", || {
        let q = &q;
        async move {
            let stats = q.stats("p", "st").await.ok()?;
            (stats.succeeded_retained == 0 && stats.cancelled_retained == 0).then_some(())
        }
    })
    .await?;
    // The count went down with them (not merely capped at the finished tasks retained): with
    // one succeeded and one cancelled task retained again, it says one of each.
    run_one(&mut client, "st").await?;
    cancel_one(&mut client, "st").await?;
    let stats = q.stats("p", "st").await?;
    assert_eq!(
        (stats.succeeded_retained, stats.cancelled_retained),
        (1, 1),
        "{stats:?}"
    );
    q.service.stop().await
}

/// ListDeadLetters pages by position: a dead letter redriven between pages shifts nothing,
/// so every other one is listed exactly once, in the order they died.
async fn dead_letter_pages_skip_nothing_when_letters_leave(
    url: Option<String>,
) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    let mut client = q.client.clone();
    let mut died = Vec::new();
    for _ in 0..7 {
        died.push(dead_letter(&mut client, "pages", pb::FailureCategory::Permanent).await?);
    }
    let mut listed = Vec::new();
    let mut token = String::new();
    for page in 0.. {
        anyhow::ensure!(page < 10, "the pages never ended: {listed:?}");
        let answer = client
            .list_dead_letters(pb::ListDeadLettersRequest {
                project: "p".into(),
                queue: "pages".into(),
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        listed.extend(answer.tasks.iter().map(|t| t.id.clone()));
        if page == 0 {
            client
                .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                    project: "p".into(),
                    queue: "pages".into(),
                    selector: Some(pb::DeadLetterSelector {
                        selector: Some(pb::dead_letter_selector::Selector::TaskId(died[0].clone())),
                    }),
                    limit: 0,
                    page_token: String::new(),
                })
                .await?;
        }
        token = answer.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(listed, died);
    let bad = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            project: "p".into(),
            queue: "pages".into(),
            page_token: "3".into(),
            ..Default::default()
        })
        .await
        .expect_err("a token this service did not issue");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_token"), "{bad:?}");
    q.service.stop().await
}

/// ExtendLease moves a lease's deadline out (never in), and a stale token changes nothing;
/// PurgeDeadLetters deletes the dead letters a filter selects and leaves the others.
async fn extend_lease_and_purge_dead_letters(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    let mut client = q.client.clone();
    let seconds = |s: i64| prost_types::Duration {
        seconds: s,
        nanos: 0,
    };
    let ms = |t: Option<prost_types::Timestamp>| {
        t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
    };
    client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "ext", b"x", pb::Priority::Normal)),
        })
        .await?;
    let mut ask = dequeue("p", "ext", 1);
    ask.lease_duration = Some(seconds(60));
    let leases = client.dequeue(ask).await?.into_inner().leases;
    let [lease] = leases.as_slice() else {
        anyhow::bail!("one lease, got {leases:?}")
    };
    let id = lease
        .task
        .as_ref()
        .map(|t| t.id.clone())
        .unwrap_or_default();
    let extend = |token: &str, by: i64| pb::ExtendLeaseRequest {
        project: "p".into(),
        queue: "ext".into(),
        task_id: id.clone(),
        lease_token: token.into(),
        extend_by: Some(seconds(by)),
    };
    let first = ms(lease.deadline);
    let longer = client
        .extend_lease(extend(&lease.lease_token, 600))
        .await?
        .into_inner();
    assert!(
        ms(longer.deadline) >= first + 500_000,
        "{longer:?} from {first}"
    );
    let shorter = client
        .extend_lease(extend(&lease.lease_token, 1))
        .await?
        .into_inner();
    assert_eq!(ms(shorter.deadline), ms(longer.deadline), "never shortened");
    let stale = client
        .extend_lease(extend("not-the-token", 600))
        .await
        .expect_err("a stale token");
    assert_eq!(stale.code(), Code::FailedPrecondition, "{stale:?}");

    // Two dead letters: one permanent, one transient; purge the permanent ones.
    for category in [
        pb::FailureCategory::Permanent,
        pb::FailureCategory::Transient,
    ] {
        dead_letter(&mut client, "purge", category).await?;
    }
    assert_eq!(q.stats("p", "purge").await?.dead, 2);
    let purged = client
        .purge_dead_letters(pb::PurgeDeadLettersRequest {
            project: "p".into(),
            queue: "purge".into(),
            selector: Some(pb::DeadLetterSelector {
                selector: Some(pb::dead_letter_selector::Selector::Filter(
                    pb::DeadLetterFilter {
                        category: pb::FailureCategory::Permanent.into(),
                        ..Default::default()
                    },
                )),
            }),
            limit: 0,
            page_token: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!((purged.purged, purged.more), (1, false), "{purged:?}");
    let left = client
        .list_dead_letters(pb::ListDeadLettersRequest {
            project: "p".into(),
            queue: "purge".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .tasks;
    let categories: Vec<i32> = left
        .iter()
        .filter_map(|t| t.errors.last().map(|e| e.category))
        .collect();
    assert_eq!(categories, [i32::from(pb::FailureCategory::Transient)]);
    q.service.stop().await
}

on_every_store!(
    extend_lease_and_purge_dead_letters,
    dead_letter_pages_skip_nothing_when_letters_leave,
    stats_tell_succeeded_from_cancelled,
    not_before_holds_a_task_until_its_time,
    long_polls_answer_with_arrivals_and_before_the_callers_deadline,
    ordering,
    lease_expiry_fences_the_old_holder,
    retries_follow_the_policy_then_dead_letters_and_redrive,
    auto_redrive_brings_back_transient_dead_letters,
    redrive_respects_max_size,
    finished_tasks_and_idempotency_keys_expire
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_32_dequeuers_20000_tasks_each_succeeds_once() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let a = Queue::start(Some(&redis.url()), "", &[]).await?;
    let b = Queue::start(Some(&redis.url()), "", &[]).await?;
    let mut producer = a.client.clone();
    for _ in 0..20 {
        let tasks = (0..1000)
            .map(|i| spec("", "", format!("t{i}").as_bytes(), PRIORITIES[i % 5]))
            .collect();
        producer
            .enqueue_batch(pb::EnqueueBatchRequest {
                project: "p".into(),
                queue: "bulk".into(),
                tasks,
            })
            .await?;
    }
    let leased: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..32 {
        let mut client = if w % 2 == 0 {
            a.client.clone()
        } else {
            b.client.clone()
        };
        let leased = leased.clone();
        workers.push(tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                let leases = client
                    .dequeue(dequeue("p", "bulk", 16))
                    .await?
                    .into_inner()
                    .leases;
                if leases.is_empty() {
                    return anyhow::Ok(done);
                }
                for lease in leases {
                    let task = lease.task.expect("task");
                    let fresh = leased
                        .lock()
                        .map(|mut s| s.insert(task.id.clone()))
                        .unwrap_or(false);
                    anyhow::ensure!(fresh, "task {} leased twice", task.id);
                    client
                        .complete(pb::CompleteRequest {
                            project: "p".into(),
                            queue: "bulk".into(),
                            task_id: task.id,
                            lease_token: lease.lease_token,
                            result: vec![],
                        })
                        .await?;
                    done += 1;
                }
            }
        }));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    assert_eq!(total, 20_000, "every task completed exactly once");
    let stats = a.stats("p", "bulk").await?;
    assert_eq!(
        (
            stats.ready,
            stats.scheduled,
            stats.leased,
            stats.dead,
            stats.succeeded_retained
        ),
        (0, 0, 0, 0, 20_000)
    );
    a.service.stop().await?;
    b.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enqueues_survive_kill_9_with_appendfsync_always() -> anyhow::Result<()> {
    let mut redis = RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ])
    .await?;
    let mut q = Queue::start(Some(&redis.url()), "", &[]).await?;
    let mut ids = Vec::new();
    for i in 0..1000 {
        let reply = q
            .client
            .enqueue(pb::EnqueueRequest {
                task: Some(spec(
                    "p",
                    "durable",
                    format!("job {i}").as_bytes(),
                    pb::Priority::Normal,
                )),
            })
            .await?;
        ids.push(reply.into_inner().task_id);
    }
    redis.kill()?;
    redis.restart().await?;
    let client = q.client.clone();
    let stats = eventually(
        Duration::from_secs(10),
        "queue-svc to reach the restarted Redis",
        || {
            let mut client = client.clone();
            async move {
                client
                    .get_queue_stats(pb::GetQueueStatsRequest {
                        project: "p".into(),
                        queue: "durable".into(),
                    })
                    .await
                    .ok()?
                    .into_inner()
                    .stats
            }
        },
    )
    .await?;
    assert_eq!(stats.ready, 1000, "every acknowledged enqueue is there");
    for id in ids.iter().step_by(97) {
        let task = q
            .client
            .get_task(pb::GetTaskRequest {
                project: "p".into(),
                queue: "durable".into(),
                task_id: id.clone(),
            })
            .await?
            .into_inner()
            .task
            .expect("task");
        assert_eq!(task.state, i32::from(pb::TaskState::Ready));
    }
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut q = Queue::start(Some(&redis.url()), "[queues.small]\nmax_size = 2\n", &[]).await?;
    let ok = || spec("p", "q", b"x", pb::Priority::Normal);
    let id = q
        .client
        .enqueue(pb::EnqueueRequest { task: Some(ok()) })
        .await?
        .into_inner()
        .task_id;
    let with = |f: &dyn Fn(&mut pb::TaskSpec)| {
        let mut s = ok();
        f(&mut s);
        pb::EnqueueRequest { task: Some(s) }
    };
    let cases: Vec<(pb::EnqueueRequest, Code, &str)> = vec![
        (
            with(&|s| s.payload.clear()),
            Code::InvalidArgument,
            "task.payload",
        ),
        (
            with(&|s| s.payload = vec![0; 1024 * 1024 + 1]),
            Code::InvalidArgument,
            "task.payload",
        ),
        (
            with(&|s| s.project = "a/b".into()),
            Code::InvalidArgument,
            "task.project",
        ),
        (
            with(&|s| s.queue = String::new()),
            Code::InvalidArgument,
            "task.queue",
        ),
        (
            with(&|s| s.queue = "{x}".into()),
            Code::InvalidArgument,
            "task.queue",
        ),
        (
            with(&|s| s.priority = 42),
            Code::InvalidArgument,
            "task.priority",
        ),
        (
            with(&|s| s.max_attempts = Some(1000)),
            Code::InvalidArgument,
            "task.max_attempts",
        ),
        (
            with(&|s| s.max_attempts = Some(0)),
            Code::InvalidArgument,
            "task.max_attempts",
        ),
        (
            with(&|s| {
                s.schedule = Some(pb::task_spec::Schedule::Delay(prost_types::Duration {
                    seconds: 31 * 24 * 3600,
                    nanos: 0,
                }))
            }),
            Code::InvalidArgument,
            "task.delay",
        ),
        (
            with(&|s| {
                s.schedule = Some(pb::task_spec::Schedule::NotBefore(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }))
            }),
            Code::InvalidArgument,
            "task.not_before",
        ),
        (
            with(&|s| {
                s.schedule = Some(pb::task_spec::Schedule::NotBefore(prost_types::Timestamp {
                    seconds: 4_102_444_800, // 2100-01-01
                    nanos: 0,
                }))
            }),
            Code::InvalidArgument,
            "task.not_before",
        ),
        (
            with(&|s| {
                s.schedule = Some(pb::task_spec::Schedule::NotBefore(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }))
            }),
            Code::InvalidArgument,
            "task.not_before",
        ),
        (
            pb::EnqueueRequest { task: None },
            Code::InvalidArgument,
            "task",
        ),
    ];
    for (request, code, field) in cases {
        let err = q.client.enqueue(request).await.expect_err(field);
        assert_eq!(err.code(), code, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field} named in: {}",
            err.message()
        );
    }
    let mut odd_worker = dequeue("p", "q", 1);
    odd_worker.worker_id = "host:1 (pid 7)".into();
    let err = q.client.dequeue(odd_worker).await.expect_err("worker_id");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("worker_id"), "{err:?}");
    let lease = q
        .client
        .dequeue(dequeue("p", "q", 1))
        .await?
        .into_inner()
        .leases
        .remove(0);
    let complete = |task_id: &str, token: &str| pb::CompleteRequest {
        project: "p".into(),
        queue: "q".into(),
        task_id: task_id.into(),
        lease_token: token.into(),
        result: vec![],
    };
    let err = q
        .client
        .complete(complete(&id, "not-the-token"))
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let unknown = "01890a5d-ac96-774b-bcce-b302099a8057";
    let err = q
        .client
        .complete(complete(unknown, "t"))
        .await
        .expect_err("unknown task");
    assert_eq!(err.code(), Code::NotFound);
    let err = q
        .client
        .complete(complete("nope", "t"))
        .await
        .expect_err("malformed id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("task_id"));
    // Nothing changed: the task is still leased under the real token, which still works.
    q.client.complete(complete(&id, &lease.lease_token)).await?;

    // A full queue is backpressure: RESOURCE_EXHAUSTED, and nothing stored.
    for _ in 0..2 {
        q.client
            .enqueue(pb::EnqueueRequest {
                task: Some(spec("p", "small", b"x", pb::Priority::Normal)),
            })
            .await?;
    }
    let err = q
        .client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "small", b"x", pb::Priority::Normal)),
        })
        .await
        .expect_err("full");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let stats = q.stats("p", "small").await?;
    assert_eq!(stats.ready, 2);
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dequeue_answer_stays_under_4_mib_and_gives_back_the_rest() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut q = Queue::start(Some(&redis.url()), "", &[]).await?;
    let big = vec![7u8; 1024 * 1024];
    for _ in 0..6 {
        q.client
            .enqueue(pb::EnqueueRequest {
                task: Some(spec("p", "big", &big, pb::Priority::Normal)),
            })
            .await?;
    }
    let leases = q
        .client
        .dequeue(dequeue("p", "big", 10))
        .await?
        .into_inner()
        .leases;
    assert_eq!(
        leases.len(),
        3,
        "three 1 MiB payloads fit under 4 MiB, a fourth does not"
    );
    let stats = q.stats("p", "big").await?;
    assert_eq!(
        (stats.leased, stats.ready),
        (3, 3),
        "the rest went back to ready"
    );
    let again = q
        .client
        .dequeue(dequeue("p", "big", 10))
        .await?
        .into_inner()
        .leases;
    assert!(
        again.iter().all(|l| l.attempt == 1),
        "giving back is not an attempt"
    );
    q.service.stop().await
}

/// Concurrent single-task Enqueues (which queue-svc gathers into shared script calls on Redis)
/// are each judged on their own: a queue with room for 10 takes exactly 10 of 40 sent at
/// once and refuses the rest with RESOURCE_EXHAUSTED; 20 sent at once with one idempotency
/// key store one task and all answer its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_are_judged_one_by_one() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let q = Queue::start(Some(&redis.url()), "[queues.ten]\nmax_size = 10\n", &[]).await?;
    let send = |queue: &'static str, key: &'static str| {
        let mut client = q.client.clone();
        async move {
            let mut task = spec("p", queue, b"x", pb::Priority::Normal);
            task.idempotency_key = key.into();
            client
                .enqueue(pb::EnqueueRequest { task: Some(task) })
                .await
                .map(|r| r.into_inner())
        }
    };
    let answers = futures::future::join_all((0..40).map(|_| send("ten", ""))).await;
    let stored = answers.iter().filter(|a| a.is_ok()).count();
    assert_eq!(stored, 10, "exactly the room left");
    for answer in &answers {
        if let Err(status) = answer {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        }
    }
    let answers = futures::future::join_all((0..20).map(|_| send("idem", "k1"))).await;
    let answers: Vec<pb::EnqueueResponse> = answers.into_iter().collect::<Result<_, _>>()?;
    let ids: HashSet<&str> = answers.iter().map(|a| a.task_id.as_str()).collect();
    assert_eq!(ids.len(), 1, "one task for one key: {ids:?}");
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
    // Duplicates answer the first task's state, also when it is stored by the same script
    // call: here three delayed tasks with one key in one batch.
    let mut task = spec("", "", b"x", pb::Priority::Normal);
    task.idempotency_key = "k2".into();
    task.schedule = Some(pb::task_spec::Schedule::Delay(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    }));
    let batch = q
        .client
        .clone()
        .enqueue_batch(pb::EnqueueBatchRequest {
            project: "p".into(),
            queue: "later".into(),
            tasks: vec![task; 3],
        })
        .await?
        .into_inner()
        .results;
    let duplicates: Vec<bool> = batch.iter().map(|r| r.duplicate).collect();
    assert_eq!(duplicates, [false, true, true], "{batch:?}");
    for answer in &batch {
        assert_eq!(answer.task_id, batch[0].task_id);
        assert_eq!(answer.state(), pb::TaskState::Scheduled, "{answer:?}");
    }
    for (queue, expected) in [("ten", 10), ("idem", 1), ("later", 0)] {
        let stats = q.stats("p", queue).await?;
        assert_eq!(stats.ready, expected, "{queue}");
    }
    assert_eq!(q.stats("p", "later").await?.scheduled, 1);
    q.service.stop().await
}

/// max_size counts ready, scheduled and leased tasks: finished ones, whose records stay for
/// their retention, and dead letters leave room for new tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_and_dead_tasks_do_not_count_against_max_size() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut q = Queue::start(Some(&redis.url()), "[queues.three]\nmax_size = 3\n", &[]).await?;
    let enqueue = |q: &mut Queue| {
        let mut client = q.client.clone();
        async move {
            client
                .enqueue(pb::EnqueueRequest {
                    task: Some(spec("p", "three", b"x", pb::Priority::Normal)),
                })
                .await
        }
    };
    for _ in 0..3 {
        enqueue(&mut q).await?;
    }
    let full = enqueue(&mut q).await.err().map(|s| s.code());
    assert_eq!(full, Some(Code::ResourceExhausted), "3 of 3");
    // Two succeed, one dies: their records stay, the queue is empty.
    let leases = q
        .client
        .dequeue(dequeue("p", "three", 3))
        .await?
        .into_inner()
        .leases;
    assert_eq!(leases.len(), 3);
    for (i, lease) in leases.into_iter().enumerate() {
        let task_id = lease.task.map(|t| t.id).unwrap_or_default();
        if i < 2 {
            q.client
                .complete(pb::CompleteRequest {
                    project: "p".into(),
                    queue: "three".into(),
                    task_id,
                    lease_token: lease.lease_token,
                    result: Vec::new(),
                })
                .await?;
        } else {
            q.client
                .fail(pb::FailRequest {
                    project: "p".into(),
                    queue: "three".into(),
                    task_id,
                    lease_token: lease.lease_token,
                    message: "no".into(),
                    category: pb::FailureCategory::Permanent.into(),
                    retryable: None,
                })
                .await?;
        }
    }
    for _ in 0..3 {
        enqueue(&mut q).await?;
    }
    let full = enqueue(&mut q).await.err().map(|s| s.code());
    assert_eq!(full, Some(Code::ResourceExhausted), "3 of 3 again");
    let stats = q.stats("p", "three").await?;
    assert_eq!((stats.ready, stats.dead), (3, 1));
    q.service.stop().await
}

/// Payloads of up to 1 KiB (a single byte too) are stored inside the task's record, larger ones
/// beside it; either way every byte (all 256 values, invalid UTF-8 included) comes back from
/// GetTask, Dequeue and ListDeadLetters, and again after a redrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_come_back_byte_for_byte_inside_the_record_or_beside_it() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut q = Queue::start(Some(&redis.url()), "", &[]).await?;
    let bytes = |n: usize| (0..n).map(|i| (i % 256) as u8).rev().collect::<Vec<u8>>();
    let payloads = [bytes(1), bytes(256), bytes(1024), bytes(1025)];
    let reply = q
        .client
        .enqueue_batch(pb::EnqueueBatchRequest {
            project: "p".into(),
            queue: "bytes".into(),
            // Idempotency keys on some tasks only: each task's arguments to the script vary
            // (key or none, payload beside the record or inside it).
            tasks: payloads
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut task = spec("", "", p, pb::Priority::Normal);
                    if i % 2 == 1 {
                        task.idempotency_key = format!("key-{i}");
                    }
                    task
                })
                .collect(),
        })
        .await?
        .into_inner();
    let ids: Vec<String> = reply.results.into_iter().map(|r| r.task_id).collect();
    let expected: HashMap<&str, &Vec<u8>> = ids.iter().map(String::as_str).zip(&payloads).collect();
    let mut admin = redis.client().await?;
    let beside: Vec<String> = redis::cmd("HKEYS")
        .arg("sluice:q:{p/bytes}:payloads")
        .query_async(&mut admin)
        .await?;
    assert_eq!(
        beside,
        [ids[3].clone()],
        "only the 1,025-byte payload is stored beside its record"
    );
    for id in &ids {
        let task = q
            .client
            .get_task(pb::GetTaskRequest {
                project: "p".into(),
                queue: "bytes".into(),
                task_id: id.clone(),
            })
            .await?
            .into_inner()
            .task
            .ok_or_else(|| anyhow::anyhow!("GetTask {id}"))?;
        assert_eq!(&&task.payload, &expected[id.as_str()], "GetTask {id}");
    }
    for round in ["leased", "leased after a redrive"] {
        let leases = q
            .client
            .dequeue(dequeue("p", "bytes", 10))
            .await?
            .into_inner()
            .leases;
        assert_eq!(leases.len(), ids.len(), "{round}");
        for lease in leases {
            let task = lease.task.expect("task");
            assert_eq!(
                &&task.payload,
                &expected[task.id.as_str()],
                "{round}: {}",
                task.id
            );
            q.client
                .fail(pb::FailRequest {
                    project: "p".into(),
                    queue: "bytes".into(),
                    task_id: task.id,
                    lease_token: lease.lease_token,
                    message: "keep it".into(),
                    category: pb::FailureCategory::Permanent.into(),
                    retryable: None,
                })
                .await?;
        }
        let dead = q
            .client
            .list_dead_letters(pb::ListDeadLettersRequest {
                project: "p".into(),
                queue: "bytes".into(),
                include_payload: true,
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(dead.tasks.len(), ids.len());
        for task in dead.tasks {
            assert_eq!(
                &&task.payload,
                &expected[task.id.as_str()],
                "dead letter {}",
                task.id
            );
        }
        let redriven = q
            .client
            .redrive_dead_letters(pb::RedriveDeadLettersRequest {
                project: "p".into(),
                queue: "bytes".into(),
                selector: Some(pb::DeadLetterSelector {
                    selector: Some(pb::dead_letter_selector::Selector::All(true)),
                }),
                limit: 0,
                page_token: String::new(),
            })
            .await?
            .into_inner();
        assert_eq!(redriven.redriven as usize, ids.len());
    }
    q.service.stop().await
}

/// Task records are stored as MessagePack; a record stored as JSON with its payload beside it
/// (as earlier versions did) is still leased, completed and read, and is written back as
/// MessagePack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stored_as_json_are_still_served() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut q = Queue::start(Some(&redis.url()), "", &[]).await?;
    let id = q
        .client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "legacy", b"old", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    let mut admin = redis.client().await?;
    let key = "sluice:q:{p/legacy}:tasks";
    let stored: Vec<u8> = redis::cmd("HGET")
        .arg(key)
        .arg(&id)
        .query_async(&mut admin)
        .await?;
    assert_ne!(stored.first(), Some(&b'{'), "stored as MessagePack");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let json = format!(
        r#"{{"p":2,"st":"ready","att":0,"max":3,"to":600000,"enq":{now_ms},"hd":{{"origin":"json"}}}}"#
    );
    let _: i64 = redis::cmd("HSET")
        .arg(key)
        .arg(&id)
        .arg(&json)
        .query_async(&mut admin)
        .await?;
    let _: i64 = redis::cmd("HSET")
        .arg("sluice:q:{p/legacy}:payloads")
        .arg(&id)
        .arg("old")
        .query_async(&mut admin)
        .await?;
    let lease = q
        .client
        .dequeue(dequeue("p", "legacy", 1))
        .await?
        .into_inner()
        .leases
        .pop()
        .ok_or_else(|| anyhow::anyhow!("the JSON record leased"))?;
    let task = lease.task.expect("task");
    assert_eq!((task.id.as_str(), lease.attempt), (id.as_str(), 1));
    assert_eq!(task.payload, b"old");
    assert_eq!(task.headers.get("origin").map(String::as_str), Some("json"));
    q.client
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: "legacy".into(),
            task_id: id.clone(),
            lease_token: lease.lease_token,
            result: b"done".to_vec(),
        })
        .await?;
    let stored: Vec<u8> = redis::cmd("HGET")
        .arg(key)
        .arg(&id)
        .query_async(&mut admin)
        .await?;
    assert_ne!(stored.first(), Some(&b'{'), "written back as MessagePack");
    let task = q
        .client
        .get_task(pb::GetTaskRequest {
            project: "p".into(),
            queue: "legacy".into(),
            task_id: id,
        })
        .await?
        .into_inner()
        .task
        .expect("task");
    assert_eq!(task.state, i32::from(pb::TaskState::Succeeded));
    assert_eq!(task.result, b"done");
    q.service.stop().await
}

/// A filtered redrive looks at no more than 10,000 dead letters per call and hands back a
/// token to go on from there: 10,000 permanent dead letters ahead of one transient one cost
/// two bounded calls, not one unbounded scan. (The dead letters are written straight into
/// Redis, as JSON records, the format earlier versions stored.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_redrive_pages_through_many_dead_letters() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut q = Queue::start(Some(&redis.url()), "", &[]).await?;
    let mut admin = redis.client().await?;
    let mut pipe = redis::pipe();
    for i in 0..10_001u64 {
        let id = format!("00000000-0000-7000-8000-{i:012}");
        let category = if i == 10_000 {
            "transient"
        } else {
            "permanent"
        };
        let at = 1_000_000 + i;
        let record = format!(
            r#"{{"p":2,"st":"dead","att":1,"max":1,"to":60000,"dd":{at},"err":[{{"a":1,"c":"{category}","m":"boom","r":false,"t":{at}}}]}}"#
        );
        pipe.hset("sluice:q:{p/many}:tasks", &id, record).ignore();
        pipe.hset("sluice:q:{p/many}:payloads", &id, "x").ignore();
        pipe.zadd("sluice:q:{p/many}:dead", &id, at).ignore();
    }
    let () = pipe.query_async(&mut admin).await?;
    let redrive = |page_token: String| pb::RedriveDeadLettersRequest {
        project: "p".into(),
        queue: "many".into(),
        selector: Some(pb::DeadLetterSelector {
            selector: Some(pb::dead_letter_selector::Selector::Filter(
                pb::DeadLetterFilter {
                    category: pb::FailureCategory::Transient.into(),
                    dead_before: None,
                },
            )),
        }),
        limit: 0,
        page_token,
    };
    let first = q
        .client
        .redrive_dead_letters(redrive(String::new()))
        .await?
        .into_inner();
    assert_eq!((first.redriven, first.more), (0, true), "{first:?}");
    assert!(!first.next_page_token.is_empty());
    let second = q
        .client
        .redrive_dead_letters(redrive(first.next_page_token))
        .await?
        .into_inner();
    assert_eq!(
        (
            second.redriven,
            second.more,
            second.next_page_token.as_str()
        ),
        (1, false, "")
    );
    let stats = q.stats("p", "many").await?;
    assert_eq!((stats.ready, stats.dead), (1, 10_000));
    let err = q
        .client
        .redrive_dead_letters(redrive("not a token".into()))
        .await
        .expect_err("a made-up token");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("page_token"), "{err:?}");
    q.service.stop().await
}

/// The queue's metrics count what happened to tasks: enqueues, leases, completions, failures
/// by category, retries, dead letters, wait and run times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happens_to_tasks() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    // (The harness runs the reaper every 100 ms.)
    let mut q = Queue::start(Some(&redis.url()), "", &[]).await?;
    for i in 0..3 {
        let task = spec("p", "m", format!("t{i}").as_bytes(), pb::Priority::Normal);
        q.client
            .enqueue(pb::EnqueueRequest { task: Some(task) })
            .await?;
    }
    let leases = q
        .client
        .dequeue(dequeue("p", "m", 3))
        .await?
        .into_inner()
        .leases;
    assert_eq!(leases.len(), 3);
    let id = |i: usize| {
        leases[i]
            .task
            .as_ref()
            .map(|t| t.id.clone())
            .unwrap_or_default()
    };
    q.client
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: "m".into(),
            task_id: id(0),
            lease_token: leases[0].lease_token.clone(),
            result: Vec::new(),
        })
        .await?;
    for (i, category) in [
        (1, pb::FailureCategory::Transient),
        (2, pb::FailureCategory::Permanent),
    ] {
        q.client
            .fail(pb::FailRequest {
                project: "p".into(),
                queue: "m".into(),
                task_id: id(i),
                lease_token: leases[i].lease_token.clone(),
                message: "boom".into(),
                category: category.into(),
                retryable: None,
            })
            .await?;
    }
    // Each test runs in its own process (nextest), so these counts are this test's.
    let text = sluice::server::metrics_handle().render();
    let value = |series: &str| -> f64 {
        text.lines()
            .filter_map(|line| line.strip_prefix(series))
            .filter_map(|rest| rest.trim().parse::<f64>().ok())
            .sum()
    };
    for (series, expected) in [
        ("sluice_queue_enqueued_total{queue=\"m\"}", 3.0),
        ("sluice_queue_leased_total ", 3.0),
        ("sluice_queue_completed_total{queue=\"m\"}", 1.0),
        (
            "sluice_queue_failed_total{queue=\"m\",category=\"transient\"}",
            1.0,
        ),
        (
            "sluice_queue_failed_total{queue=\"m\",category=\"permanent\"}",
            1.0,
        ),
        ("sluice_queue_retries_total{queue=\"m\"}", 1.0),
        ("sluice_queue_dead_lettered_total{queue=\"m\"}", 1.0),
        ("sluice_queue_task_wait_seconds_count{queue=\"m\"}", 3.0),
        ("sluice_queue_task_run_seconds_count{queue=\"m\"}", 1.0),
    ] {
        assert_eq!(value(series), expected, "{series}\n{text}");
    }
    // Depth gauges come from the reaper's passes: nothing leased, one dead, and the retried
    // task scheduled (or ready, if its jittered backoff was that short).
    let depth = |state: &str, priority: &str| {
        let series = format!(
            "sluice_queue_depth{{project=\"p\",queue=\"m\",state=\"{state}\",priority=\"{priority}\"}}"
        );
        let text = sluice::server::metrics_handle().render();
        text.lines()
            .filter_map(|line| line.strip_prefix(series.as_str()))
            .find_map(|rest| rest.trim().parse::<f64>().ok())
    };
    eventually(Duration::from_secs(5), "the depth gauges", || async {
        let (Some(leased), Some(dead), Some(scheduled), Some(ready)) = (
            depth("leased", "all"),
            depth("dead", "all"),
            depth("scheduled", "all"),
            depth("ready", "normal"),
        ) else {
            return None;
        };
        (leased == 0.0 && dead == 1.0 && scheduled + ready == 1.0).then_some(())
    })
    .await?;
    q.service.stop().await
}

type Client = pb::queue_client::QueueClient<tonic::transport::Channel>;

/// Leases the one task `queue` of project "p" has ready.
async fn lease_one(client: &mut Client, queue: &str) -> anyhow::Result<pb::TaskLease> {
    let mut leases = client
        .dequeue(dequeue("p", queue, 1))
        .await?
        .into_inner()
        .leases;
    match leases.pop() {
        Some(lease) if leases.is_empty() => Ok(lease),
        other => anyhow::bail!("one lease from {queue}, got {other:?} and {leases:?}"),
    }
}

/// Enqueues one ready task into `queue` of project "p", leases it and completes it.
async fn run_one(client: &mut Client, queue: &str) -> anyhow::Result<()> {
    client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", queue, b"x", pb::Priority::Normal)),
        })
        .await?;
    let lease = lease_one(client, queue).await?;
    client
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: queue.into(),
            task_id: lease.task.map(|t| t.id).unwrap_or_default(),
            lease_token: lease.lease_token,
            result: vec![],
        })
        .await?;
    Ok(())
}

/// Enqueues one task (one attempt) into `queue` of project "p", leases it and fails it with
/// `category`, which makes it a dead letter. Its id.
async fn dead_letter(
    client: &mut Client,
    queue: &str,
    category: pb::FailureCategory,
) -> anyhow::Result<String> {
    let mut task = spec("p", queue, b"x", pb::Priority::Normal);
    task.max_attempts = Some(1);
    client
        .enqueue(pb::EnqueueRequest { task: Some(task) })
        .await?;
    let lease = lease_one(client, queue).await?;
    let id = lease.task.map(|t| t.id).unwrap_or_default();
    client
        .fail(pb::FailRequest {
            project: "p".into(),
            queue: queue.into(),
            task_id: id.clone(),
            lease_token: lease.lease_token,
            message: "no".into(),
            category: category.into(),
            retryable: None,
        })
        .await?;
    Ok(id)
}

/// An empty queue nothing has enqueued into for `--retire-idle-after` is forgotten: out of the
/// reaper's registry, no key of it left. A queue holding a scheduled task, a paused one, and a
/// queue in use (often empty, as its tasks finish and go at once) are kept; the forgotten
/// queue's next enqueue brings it back. A queue an earlier version registered (in its plain
/// set, which such instances write once per process) is copied into the registry and kept
/// while that set lists it; with the set gone, it is forgotten in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_idle_queues_are_forgotten_and_come_back_on_enqueue() -> anyhow::Result<()> {
    use redis::AsyncCommands;
    let redis = RedisServer::start().await?;
    let mut conn = redis.client().await?;
    let mut file = String::new();
    for queue in ["gone", "paused", "old", "busy"] {
        file.push_str(&format!("[queues.{queue}]\nretention = \"0s\"\n"));
    }
    let q = Queue::start(Some(&redis.url()), &file, &["--retire-idle-after", "1s"]).await?;
    let mut client = q.client.clone();
    for queue in ["gone", "paused", "old"] {
        run_one(&mut client, queue).await?;
    }
    client
        .pause_queue(pb::PauseQueueRequest {
            project: "p".into(),
            queue: "paused".into(),
        })
        .await?;
    let mut later = spec("p", "later", b"x", pb::Priority::Normal);
    later.schedule = Some(pb::task_spec::Schedule::Delay(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    }));
    client
        .enqueue(pb::EnqueueRequest { task: Some(later) })
        .await?;
    let _: i64 = conn.zrem("sluice:q:queues", "p/old").await?;
    let _: i64 = conn.sadd("sluice:q:registry", "p/old").await?;

    let registry = |conn: &redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let members: Vec<String> = conn.zrange("sluice:q:queues", 0, -1).await?;
            Ok::<_, anyhow::Error>(members)
        }
    };
    let keys_of = |conn: &redis::aio::MultiplexedConnection, queue: &str| {
        let mut conn = conn.clone();
        let pattern = format!("sluice:q:{{p/{queue}}}:*");
        async move {
            let keys: Vec<String> = conn.keys(pattern).await?;
            Ok::<_, anyhow::Error>(keys)
        }
    };
    // Meanwhile "busy" runs a task at every look; the reaper must never drop it.
    let busy_rounds = Arc::new(Mutex::new((0_u32, Vec::<String>::new())));
    let forgotten = eventually(
        Duration::from_secs(20),
        "the idle empty queues forgotten",
        || {
            let (conn, mut client) = (conn.clone(), client.clone());
            let (registry, keys_of, busy_rounds) = (&registry, &keys_of, busy_rounds.clone());
            async move {
                let busy = run_one(&mut client, "busy").await;
                let members = registry(&conn).await.ok()?;
                if let Ok(mut rounds) = busy_rounds.lock() {
                    rounds.0 += 1;
                    if let Err(err) = busy {
                        rounds.1.push(err.to_string());
                    } else if !members.iter().any(|m| m == "p/busy") {
                        rounds.1.push("p/busy left the registry".into());
                    }
                }
                let gone = keys_of(&conn, "gone").await.ok()?;
                (!members.iter().any(|m| m == "p/gone") && gone.is_empty()).then_some(())
            }
        },
    )
    .await;
    if let Err(err) = forgotten {
        let members: Vec<(String, f64)> = conn.zrange_withscores("sluice:q:queues", 0, -1).await?;
        let keys: Vec<String> = conn.keys("sluice:q:*").await?;
        anyhow::bail!("{err}: registry {members:?}, keys {keys:?}");
    }
    let (rounds, problems) = busy_rounds
        .lock()
        .map(|r| r.clone())
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert!(rounds > 10, "{rounds} busy rounds");
    assert!(problems.is_empty(), "{problems:?}");
    let legacy: Vec<String> = conn.smembers("sluice:q:registry").await?;
    assert_eq!(
        legacy,
        ["p/old"],
        "the plain set stays for earlier versions"
    );
    let members = registry(&conn).await?;
    for kept in ["p/paused", "p/later", "p/busy", "p/old"] {
        assert!(
            members.iter().any(|m| m == kept),
            "{kept} kept: {members:?}"
        );
    }
    assert!(!keys_of(&conn, "later").await?.is_empty());
    let paused = q.stats("p", "paused").await?;
    assert!(paused.paused, "the pause survives: {paused:?}");

    assert!(!keys_of(&conn, "old").await?.is_empty());

    // The forgotten queue comes back with its next task, which is served as ever.
    run_one(&mut client, "gone").await?;
    assert!(registry(&conn).await?.iter().any(|m| m == "p/gone"));

    // Once no earlier version runs, the plain set can go, and with it the last hold.
    let _: i64 = conn.del("sluice:q:registry").await?;
    eventually(
        Duration::from_secs(20),
        "the earlier version's queue forgotten",
        || {
            let (conn, registry, keys_of) = (conn.clone(), &registry, &keys_of);
            async move {
                let members = registry(&conn).await.ok()?;
                let old = keys_of(&conn, "old").await.ok()?;
                (!members.iter().any(|m| m == "p/old") && old.is_empty()).then_some(())
            }
        },
    )
    .await?;
    q.service.stop().await
}

/// Queue names come from clients, so per-queue metrics are bounded: past the first 1,000
/// names an instance sees, enqueues are counted under `queue="~other"` and no new depth
/// gauges appear, while the queues admitted before keep their own series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_queue_metrics_stay_bounded_whatever_names_clients_use() -> anyhow::Result<()> {
    let q = Queue::start(None, "", &[]).await?;
    let max = queue_svc::labels::MAX_QUEUES;
    for i in 0..max + 20 {
        let mut client = q.client.clone();
        client
            .enqueue(pb::EnqueueRequest {
                task: Some(spec("p", &format!("n{i}"), b"x", pb::Priority::Normal)),
            })
            .await?;
    }
    let mut client = q.client.clone();
    client
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "n0", b"x", pb::Priority::Normal)),
        })
        .await?;
    let text = eventually(
        Duration::from_secs(10),
        "depth gauges of admitted queues",
        || {
            let text = sluice::server::metrics_handle().render();
            let gauges = text
                .lines()
                .filter(|l| l.starts_with("sluice_queue_depth{") && l.contains("state=\"ready\""))
                .count();
            std::future::ready((gauges == 5 * max).then_some(text))
        },
    )
    .await?;
    let enqueued = |queue: &str| {
        text.lines()
            .find(|l| {
                l.starts_with("sluice_queue_enqueued_total{")
                    && l.contains(&format!("queue=\"{queue}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    };
    // (Exact under nextest, a process per test; bounds hold whatever else shares it.)
    let other: u64 = enqueued("~other").and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(other >= 20, "{other} under ~other");
    if let Some(n0) = enqueued("n0") {
        assert_eq!(n0, "2", "an admitted name keeps its own series");
    }
    assert_eq!(enqueued(&format!("n{max}")), None);
    let series = text
        .lines()
        .filter(|l| l.starts_with("sluice_queue_enqueued_total{"))
        .count();
    assert_eq!(series, max + 1);
    q.service.stop().await
}

/// Waits (at most 10 s) for queue-svc at `url` to report its store SERVING again.
async fn store_serving_again(url: &str) -> anyhow::Result<()> {
    use sluice_testkit::probe;
    eventually(
        Duration::from_secs(10),
        "health to report the store back",
        || {
            let url = url.to_owned();
            async move {
                (probe::health(&url, queue_svc::STORE_HEALTH).await.ok()? == probe::SERVING)
                    .then_some(())
            }
        },
    )
    .await?;
    Ok(())
}

/// While Redis is down, health reports the queue's store NOT_SERVING, calls answer
/// UNAVAILABLE and the failures are counted; once Redis is back, health says SERVING again and
/// calls succeed, with no restart of queue-svc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_health_follows_redis_and_failures_are_counted() -> anyhow::Result<()> {
    use sluice_testkit::probe;
    let mut redis = RedisServer::start().await?;
    let q = Queue::start(
        Some(&redis.url()),
        "",
        &[
            "--redis-connect-timeout",
            "200ms",
            "--redis-command-timeout",
            "200ms",
        ],
    )
    .await?;
    let url = q.service.url();
    let mut client = q.client.clone();
    let task = || pb::EnqueueRequest {
        task: Some(spec("p", "h", b"x", pb::Priority::Normal)),
    };
    client.enqueue(task()).await?;
    assert_eq!(
        probe::health(&url, queue_svc::STORE_HEALTH).await?,
        probe::SERVING
    );
    redis.kill()?;
    let refused = client.enqueue(task()).await.expect_err("Redis is down");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    eventually(
        Duration::from_secs(10),
        "health to report the store down",
        || {
            let url = url.clone();
            async move {
                (probe::health(&url, queue_svc::STORE_HEALTH).await.ok()? != probe::SERVING)
                    .then_some(())
            }
        },
    )
    .await?;
    let text = sluice::server::metrics_handle().render();
    assert!(
        text.lines().any(
            |l| l.starts_with("sluice_redis_errors_total{kind=\"unavailable\"}")
                && !l.ends_with(" 0")
        ),
        "{text}"
    );
    redis.restart().await?;
    store_serving_again(&url).await?;
    client.enqueue(task()).await?;
    q.service.stop().await
}

/// Enqueues sent as Redis dies answer UNAVAILABLE, each after waiting out the timeouts at
/// most about once: once the breaker opens, the ones queued behind them fail at once instead
/// of going to Redis batch after batch. Once Redis is back, enqueues succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueues_queued_when_redis_dies_fail_fast_once_the_breaker_opens() -> anyhow::Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(1);
    const CALLS: usize = 6000;
    let mut redis = RedisServer::start().await?;
    let timeout = format!("{}ms", TIMEOUT.as_millis());
    let mut q = Queue::start(
        Some(&redis.url()),
        "",
        &[
            "--redis-connect-timeout",
            &timeout,
            "--redis-command-timeout",
            &timeout,
        ],
    )
    .await?;
    let task = || pb::EnqueueRequest {
        task: Some(spec("p", "fast", b"x", pb::Priority::Normal)),
    };
    q.client.enqueue(task()).await?;
    // Six connections: the calls exceed one connection's stream limit.
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(pb::queue_client::QueueClient::new(
            q.service.channel().await?,
        ));
    }

    redis.kill()?;
    let (answers, slowest) = sluice_testkit::all_timed((0..CALLS).map(|i| {
        let mut client = clients[i % clients.len()].clone();
        let req = task();
        async move { client.enqueue(req).await }
    }))
    .await;
    for (_, answer) in &answers {
        let status = answer.as_ref().err().map(tonic::Status::code);
        assert_eq!(status, Some(Code::Unavailable), "{answer:?}");
    }
    println!("{CALLS} enqueues as Redis died: slowest answered after {slowest:?}");
    // A behavioural bound, not a benchmark: one round of timeouts, then however long a loaded
    // machine takes to answer 6,000 calls. With the queue drained 512 enqueues per round of
    // timeouts it would be about 6,000 / 512 rounds of 1 s.
    assert!(
        slowest < 6 * TIMEOUT,
        "the slowest enqueue took {slowest:?}, more than the timeouts' worth"
    );
    let text = sluice::server::metrics_handle().render();
    let gauge = text
        .lines()
        .find(|l| l.starts_with("sluice_queue_breaker_open "));
    assert_eq!(gauge, Some("sluice_queue_breaker_open 1"));

    redis.restart().await?;
    store_serving_again(&q.service.url()).await?;
    q.client.enqueue(task()).await?;
    q.service.stop().await
}

/// A long poll waits on wake-ups, not by polling: while it waits on an empty queue Redis runs
/// about one lease call a second for it, and a task enqueued through another instance reaches
/// it (announced over Redis pub/sub).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_waits_on_wake_ups_from_every_instance() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let mut conn = redis.client().await?;
    let a = Queue::start(Some(&redis.url()), "", &[]).await?;
    let b = Queue::start(Some(&redis.url()), "", &[]).await?;
    let mut client = a.client.clone();
    let idle = sluice_testkit::redis_server::script_calls(&mut conn).await?;
    let waiting = tokio::spawn(async move {
        client
            .dequeue(pb::DequeueRequest {
                wait: Some(prost_types::Duration {
                    seconds: 20,
                    nanos: 0,
                }),
                ..dequeue("p", "woken", 1)
            })
            .await
    });
    // Two seconds of waiting, counted once the poll has made its first look.
    let before = eventually(Duration::from_secs(10), "the poll's first look", || {
        let mut conn = conn.clone();
        async move {
            let calls = sluice_testkit::redis_server::script_calls(&mut conn)
                .await
                .ok()?;
            (calls > idle).then_some(calls)
        }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let looks = sluice_testkit::redis_server::script_calls(&mut conn).await? - before;
    assert!(!waiting.is_finished(), "still waiting");
    assert!(looks <= 4, "{looks} script calls in 2 s of waiting");
    let id = b
        .client
        .clone()
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "woken", b"x", pb::Priority::Normal)),
        })
        .await?
        .into_inner()
        .task_id;
    answered_with(waiting, &id).await?;
    a.service.stop().await?;
    b.service.stop().await
}
