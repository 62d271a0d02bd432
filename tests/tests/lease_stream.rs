//! The Lease stream against queue-svc on the embedded store and on a real redis-server:
//! flow control by credits, push dispatch, acks, release, heartbeats and revocation, drain,
//! broken streams, ListWorkers.

use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice::proto::sluice::queue::v1::lease_request::Kind as Up;
use sluice::proto::sluice::queue::v1::lease_response::Kind as Down;
use sluice_testkit::queue::{Queue, spec};
use sluice_testkit::{RedisCluster, RedisServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

struct Worker {
    up: mpsc::Sender<pb::LeaseRequest>,
    down: tonic::Streaming<pb::LeaseResponse>,
}

impl Worker {
    async fn subscribe(q: &Queue, queues: &[&str], worker_id: &str) -> anyhow::Result<Self> {
        let (up, rx) = mpsc::channel(64);
        up.send(pb::LeaseRequest {
            kind: Some(Up::Subscribe(pb::Subscribe {
                project: "p".into(),
                queues: queues.iter().map(|q| (*q).to_owned()).collect(),
                worker_id: worker_id.into(),
                labels: Default::default(),
                lease_duration: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
            })),
        })
        .await?;
        let mut down = q
            .client
            .clone()
            .lease(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = Self::next_of(&mut down).await?;
        anyhow::ensure!(
            matches!(first, Down::Subscribed(_)),
            "Subscribed first, got {first:?}"
        );
        Ok(Self { up, down })
    }

    async fn next_of(down: &mut tonic::Streaming<pb::LeaseResponse>) -> anyhow::Result<Down> {
        let message = tokio::time::timeout(Duration::from_secs(10), down.message())
            .await
            .map_err(|_| anyhow::anyhow!("no message within 10 s"))??
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))?;
        message
            .kind
            .ok_or_else(|| anyhow::anyhow!("a message without kind"))
    }

    /// The next message that is not a keepalive.
    async fn next(&mut self) -> anyhow::Result<Down> {
        loop {
            match Self::next_of(&mut self.down).await? {
                Down::Keepalive(_) => continue,
                other => return Ok(other),
            }
        }
    }

    async fn send(&self, kind: Up) -> anyhow::Result<()> {
        Ok(self.up.send(pb::LeaseRequest { kind: Some(kind) }).await?)
    }

    async fn credits(&self, add: u32) -> anyhow::Result<()> {
        self.send(Up::Credits(pb::Credits { add })).await
    }

    /// The next `n` messages, which must all be tasks.
    async fn tasks(&mut self, n: usize) -> anyhow::Result<Vec<pb::TaskLease>> {
        let mut leases = Vec::with_capacity(n);
        while leases.len() < n {
            match self.next().await? {
                Down::Task(lease) => leases.push(lease),
                other => anyhow::bail!("unexpected {other:?}"),
            }
        }
        Ok(leases)
    }
}

async fn enqueue(q: &Queue, queue: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut left = n;
    while left > 0 {
        let batch = left.min(1000);
        let tasks = (0..batch)
            .map(|i| spec("", "", format!("t{i}").as_bytes(), pb::Priority::Normal))
            .collect();
        let reply = q
            .client
            .clone()
            .enqueue_batch(pb::EnqueueBatchRequest {
                project: "p".into(),
                queue: queue.into(),
                tasks,
            })
            .await?;
        ids.extend(reply.into_inner().results.into_iter().map(|r| r.task_id));
        left -= batch;
    }
    Ok(ids)
}

async fn credits_bound_what_a_worker_holds(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    enqueue(&q, "flow", 1000).await?;
    let mut w = Worker::subscribe(&q, &["flow"], "w-flow").await?;
    w.credits(3).await?;
    let (mut granted, mut received, mut held, mut completed, mut most) =
        (3u64, 0u64, 0u64, 0u64, 0u64);
    while completed < 1000 {
        let got = w.next().await?;
        match got {
            Down::Task(lease) => {
                received += 1;
                held += 1;
                most = most.max(held);
                anyhow::ensure!(
                    received <= granted,
                    "{received} leases sent for {granted} credits"
                );
                anyhow::ensure!(held <= 3, "the worker holds {held} tasks on 3 credits");
                let task = lease.task.expect("task");
                w.send(Up::Complete(pb::CompleteTask {
                    queue: task.queue,
                    task_id: task.id,
                    lease_token: lease.lease_token,
                    result: vec![],
                }))
                .await?;
            }
            Down::Ack(ack) => {
                anyhow::ensure!(ack.kind == i32::from(pb::ack::Kind::Completed), "{ack:?}");
                held -= 1;
                completed += 1;
                granted += 1;
                w.credits(1).await?;
            }
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert_eq!(most, 3, "the worker was kept busy up to its credit");
    drop(w); // a worker that hangs up; otherwise shutdown waits out its grace for the stream
    let stats = q.stats("p", "flow").await?;
    assert_eq!(
        (stats.ready, stats.leased, stats.succeeded_retained),
        (0, 0, 1000)
    );
    q.service.stop().await
}

async fn push_release_heartbeat_revoke_drain_and_broken_streams(
    url: Option<String>,
) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    let mut w = Worker::subscribe(&q, &["push"], "w-push").await?;
    w.credits(1).await?;
    // Listed while connected.
    let workers = q
        .client
        .clone()
        .list_workers(pb::ListWorkersRequest {
            project: "p".into(),
            queue: "push".into(),
        })
        .await?
        .into_inner()
        .workers;
    assert_eq!(workers.len(), 1);
    assert_eq!(workers[0].worker_id, "w-push");
    // Push: an idle worker gets a task enqueued after it subscribed.
    let sent = tokio::time::Instant::now();
    let id = enqueue(&q, "push", 1).await?.remove(0);
    let Down::Task(lease) = w.next().await? else {
        anyhow::bail!("a task")
    };
    println!(
        "enqueue -> lease on an idle stream: {:?} (debug build)",
        sent.elapsed()
    );
    assert_eq!(
        lease.task.as_ref().map(|t| t.id.as_str()),
        Some(id.as_str())
    );
    // Release: back to ready, the attempt does not count.
    w.send(Up::Release(pb::ReleaseTask {
        queue: "push".into(),
        task_id: id.clone(),
        lease_token: lease.lease_token,
    }))
    .await?;
    let Down::Ack(ack) = w.next().await? else {
        anyhow::bail!("an ack")
    };
    assert_eq!(ack.kind, i32::from(pb::ack::Kind::Released));
    w.credits(1).await?;
    let Down::Task(again) = w.next().await? else {
        anyhow::bail!("the released task again")
    };
    assert_eq!(again.attempt, 1, "a release is not an attempt");
    // Heartbeat extends; a cancel while leased is revoked on the next heartbeat.
    let task_ref = || pb::TaskRef {
        queue: "push".into(),
        task_id: id.clone(),
        lease_token: again.lease_token.clone(),
    };
    w.send(Up::Heartbeat(pb::Heartbeat {
        tasks: vec![task_ref()],
    }))
    .await?;
    let Down::HeartbeatAck(hb) = w.next().await? else {
        anyhow::bail!("a heartbeat ack")
    };
    assert_eq!(hb.extended.len(), 1);
    let cancel = q
        .client
        .clone()
        .cancel_task(pb::CancelTaskRequest {
            project: "p".into(),
            queue: "push".into(),
            task_id: id.clone(),
        })
        .await?
        .into_inner();
    assert!(cancel.cancel_requested);
    w.send(Up::Heartbeat(pb::Heartbeat {
        tasks: vec![task_ref()],
    }))
    .await?;
    let Down::Revoked(revoked) = w.next().await? else {
        anyhow::bail!("a revocation")
    };
    assert_eq!(revoked.task_id, id);
    let Down::HeartbeatAck(_) = w.next().await? else {
        anyhow::bail!("a heartbeat ack")
    };
    w.send(Up::Fail(pb::FailTask {
        queue: "push".into(),
        task_id: id.clone(),
        lease_token: again.lease_token.clone(),
        message: "stopped".into(),
        category: 0,
        retryable: None,
    }))
    .await?;
    let Down::Ack(ack) = w.next().await? else {
        anyhow::bail!("an ack")
    };
    assert_eq!(ack.kind, i32::from(pb::ack::Kind::Cancelled));
    // A stale token is rejected on the stream, which goes on.
    w.send(Up::Complete(pb::CompleteTask {
        queue: "push".into(),
        task_id: id.clone(),
        lease_token: "stale".into(),
        result: vec![],
    }))
    .await?;
    let Down::Ack(ack) = w.next().await? else {
        anyhow::bail!("an ack")
    };
    assert_eq!(ack.kind, i32::from(pb::ack::Kind::Rejected));
    assert_eq!(ack.code, tonic::Code::FailedPrecondition as i32);
    // Drain: Drained, and no more tasks even with credit and work.
    w.credits(5).await?;
    w.send(Up::Drain(pb::Drain {})).await?;
    match w.next().await? {
        Down::Drained(d) => assert!(!d.server_shutdown),
        other => anyhow::bail!("Drained expected (no work was queued), got {other:?}"),
    }
    enqueue(&q, "push", 3).await?;
    tokio::time::sleep(Duration::from_millis(1200)).await; // longer than the safety poll
    assert!(
        tokio::time::timeout(Duration::from_millis(50), w.down.message())
            .await
            .is_err(),
        "nothing after Drained"
    );
    drop(w);

    // A broken stream loses nothing: its delivered lease stays valid for the unary Complete.
    let w2 = Worker::subscribe(&q, &["push"], "w-broken").await?;
    w2.credits(1).await?;
    let mut w2 = w2;
    let Down::Task(lease) = w2.next().await? else {
        anyhow::bail!("a task")
    };
    drop(w2);
    let task = lease.task.expect("task");
    q.client
        .clone()
        .complete(pb::CompleteRequest {
            project: "p".into(),
            queue: "push".into(),
            task_id: task.id,
            lease_token: lease.lease_token,
            result: vec![],
        })
        .await?;
    q.service.stop().await
}

/// Completions sent back to back (which the server gathers into one script call per queue)
/// are each judged on their own and acknowledged in the order sent: a stale token or a bad id
/// among them refuses that one only.
async fn completions_sent_together_are_judged_one_by_one(
    url: Option<String>,
) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    enqueue(&q, "ga", 10).await?;
    enqueue(&q, "gb", 10).await?;
    let mut w = Worker::subscribe(&q, &["ga", "gb"], "w-gather").await?;
    w.credits(20).await?;
    let leases = w.tasks(20).await?;
    // Every fourth with a wrong token, then a bad id, then a repeat of the first.
    let mut sent = Vec::new();
    for (i, lease) in leases.iter().enumerate() {
        let task = lease.task.clone().expect("task");
        let token = if i % 4 == 3 {
            "not-the-token".to_owned()
        } else {
            lease.lease_token.clone()
        };
        sent.push((task.queue, task.id, token));
    }
    sent.push(("ga".into(), "nope".into(), "t".into()));
    sent.push(sent[0].clone());
    for (queue, task_id, lease_token) in &sent {
        w.send(Up::Complete(pb::CompleteTask {
            queue: queue.clone(),
            task_id: task_id.clone(),
            lease_token: lease_token.clone(),
            result: vec![],
        }))
        .await?;
    }
    for (i, (_, task_id, _)) in sent.iter().enumerate() {
        let Down::Ack(ack) = w.next().await? else {
            anyhow::bail!("an Ack for each completion")
        };
        assert_eq!(&ack.task_id, task_id, "acks come in the order sent");
        let expected = if i == 20 {
            (pb::ack::Kind::Rejected, tonic::Code::InvalidArgument)
        } else if i < 20 && i % 4 == 3 {
            (pb::ack::Kind::Rejected, tonic::Code::FailedPrecondition)
        } else {
            (pb::ack::Kind::Completed, tonic::Code::Ok)
        };
        assert_eq!(
            (ack.kind, ack.code),
            (i32::from(expected.0), expected.1 as i32),
            "completion {i}: {ack:?}"
        );
    }
    let (mut succeeded, mut leased) = (0, 0);
    for queue in ["ga", "gb"] {
        let stats = q.stats("p", queue).await?;
        succeeded += stats.succeeded_retained;
        leased += stats.leased;
    }
    assert_eq!(
        (succeeded, leased),
        (15, 5),
        "the refused completions changed nothing"
    );
    drop(w);
    q.service.stop().await
}

/// A heartbeat over leases of two queues extends each valid lease on its own: a wrong token,
/// an unknown task and a malformed id are reported lost, the rest extended and still leased;
/// a heartbeat over more leases than the contract allows is refused, naming the field.
async fn a_heartbeat_extends_each_lease_on_its_own(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    enqueue(&q, "ha", 3).await?;
    enqueue(&q, "hb", 3).await?;
    let mut w = Worker::subscribe(&q, &["ha", "hb"], "w-heartbeat").await?;
    w.credits(6).await?;
    let leases = w.tasks(6).await?;
    let mut refs: Vec<pb::TaskRef> = leases
        .iter()
        .map(|lease| {
            let task = lease.task.clone().unwrap_or_default();
            pb::TaskRef {
                queue: task.queue,
                task_id: task.id,
                lease_token: lease.lease_token.clone(),
            }
        })
        .collect();
    refs[1].lease_token = "not-the-token".into();
    let unknown = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".to_owned();
    refs.push(pb::TaskRef {
        queue: "hb".into(),
        task_id: unknown.clone(),
        lease_token: "t".into(),
    });
    refs.push(pb::TaskRef {
        queue: "ha".into(),
        task_id: "nope".into(),
        lease_token: "t".into(),
    });
    w.send(Up::Heartbeat(pb::Heartbeat {
        tasks: refs.clone(),
    }))
    .await?;
    let Down::HeartbeatAck(ack) = w.next().await? else {
        anyhow::bail!("a heartbeat ack")
    };
    let mut lost = ack.lost.clone();
    lost.sort();
    let mut expected_lost = vec![refs[1].task_id.clone(), unknown, "nope".to_owned()];
    expected_lost.sort();
    assert_eq!(lost, expected_lost, "{ack:?}");
    assert_eq!(ack.extended.len(), 5, "{ack:?}");
    for extended in &ack.extended {
        let lease = leases
            .iter()
            .find(|l| l.task.as_ref().is_some_and(|t| t.id == extended.task_id))
            .ok_or_else(|| anyhow::anyhow!("extended a task it did not lease"))?;
        let (before, after) = (
            lease.deadline.unwrap_or_default(),
            extended.deadline.unwrap_or_default(),
        );
        assert!(
            (after.seconds, after.nanos) >= (before.seconds, before.nanos),
            "a heartbeat never shortens a lease: {before:?} -> {after:?}"
        );
    }
    let (ha, hb) = (q.stats("p", "ha").await?, q.stats("p", "hb").await?);
    assert_eq!((ha.leased, hb.leased), (3, 3), "every lease still held");
    // The task the worker was told it lost no longer counts as in flight.
    let listed = q
        .client
        .clone()
        .list_workers(pb::ListWorkersRequest {
            project: "p".into(),
            queue: "ha".into(),
        })
        .await?
        .into_inner()
        .workers;
    let in_flight: Vec<u32> = listed.iter().map(|w| w.in_flight).collect();
    assert_eq!(in_flight, [5], "{listed:?}");

    let many = (0..1001).map(|_| refs[0].clone()).collect();
    w.send(Up::Heartbeat(pb::Heartbeat { tasks: many })).await?;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), w.down.message()).await? {
            Ok(Some(pb::LeaseResponse {
                kind: Some(Down::Keepalive(_)),
            })) => continue,
            Ok(other) => anyhow::bail!("expected the stream to fail, got {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("heartbeat.tasks"), "{status:?}");
    drop(w);
    q.service.stop().await
}

/// A paused queue leases nothing to a waiting stream; resuming it wakes the stream at once
/// (not at its next safety poll, 10 s while Redis pub/sub flows).
async fn resuming_a_queue_wakes_its_idle_streams(url: Option<String>) -> anyhow::Result<()> {
    let q = Queue::start(url.as_deref(), "", &[]).await?;
    let mut client = q.client.clone();
    client
        .pause_queue(pb::PauseQueueRequest {
            project: "p".into(),
            queue: "pz".into(),
        })
        .await?;
    let mut w = Worker::subscribe(&q, &["pz"], "w-resume").await?;
    w.credits(1).await?;
    let ids = enqueue(&q, "pz", 1).await?;
    let early = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    assert!(early.is_err(), "a paused queue leases nothing: {early:?}");
    client
        .resume_queue(pb::ResumeQueueRequest {
            project: "p".into(),
            queue: "pz".into(),
        })
        .await?;
    let leased = tokio::time::timeout(Duration::from_secs(3), w.next())
        .await
        .map_err(|_| anyhow::anyhow!("no lease within 3 s of ResumeQueue"))??;
    let Down::Task(lease) = leased else {
        anyhow::bail!("a task, got {leased:?}")
    };
    assert_eq!(lease.task.map(|t| t.id), ids.first().cloned());
    drop(w);
    q.service.stop().await
}

macro_rules! on_stores {
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
    };
}

on_stores!(
    credits_bound_what_a_worker_holds,
    push_release_heartbeat_revoke_drain_and_broken_streams,
    completions_sent_together_are_judged_one_by_one,
    a_heartbeat_extends_each_lease_on_its_own,
    resuming_a_queue_wakes_its_idle_streams
);

/// Connections subscribed to the wake-up channel on the node behind `admin`.
async fn wake_subscribers(admin: &mut redis::aio::MultiplexedConnection) -> Option<i64> {
    let reply: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg("sluice:q:wake")
        .query_async(admin)
        .await
        .ok()?;
    Some(reply.1)
}

/// A task enqueued on one instance reaches a worker streaming from another at once, through
/// the Redis wake-up channel (the safety poll runs every 10 s while it flows). `admins` are
/// connections to every node, to see both instances subscribed.
async fn a_task_enqueued_on_another_instance_is_pushed(
    url: String,
    admins: Vec<redis::aio::MultiplexedConnection>,
) -> anyhow::Result<()> {
    let a = Queue::start(Some(&url), "", &[]).await?;
    let b = Queue::start(Some(&url), "", &[]).await?;
    let mut w = Worker::subscribe(&a, &["cross"], "w-cross").await?;
    w.credits(1).await?;
    // The instance whose stream waits for work listens on the wake-up channel: its streams
    // then poll only every 10 s, so delivery within the 5 s below is the push. The other
    // instance, with no stream, does not listen (a wake-up to no subscriber costs nothing).
    let subscribers = || {
        let admins = admins.clone();
        async move {
            let mut subscribers = 0;
            for mut admin in admins {
                subscribers += wake_subscribers(&mut admin).await?;
            }
            Some(subscribers)
        }
    };
    sluice_testkit::eventually(
        Duration::from_secs(10),
        "the stream's instance subscribed",
        || {
            let subscribers = subscribers();
            async move { (subscribers.await? >= 1).then_some(()) }
        },
    )
    .await?;
    // The stream started before the subscription: its first, 1 s, poll must have passed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for round in 0..3 {
        let id = enqueue(&b, "cross", 1).await?.remove(0);
        let got = tokio::time::timeout(Duration::from_secs(5), w.next()).await??;
        let Down::Task(lease) = got else {
            anyhow::bail!("a task, got {got:?}")
        };
        assert_eq!(
            lease.task.as_ref().map(|t| t.id.as_str()),
            Some(id.as_str()),
            "round {round}"
        );
        w.send(Up::Complete(pb::CompleteTask {
            queue: "cross".into(),
            task_id: id,
            lease_token: lease.lease_token,
            result: vec![],
        }))
        .await?;
        let Down::Ack(_) = w.next().await? else {
            anyhow::bail!("an ack")
        };
        w.credits(1).await?;
    }
    assert_eq!(
        subscribers().await,
        Some(1),
        "only the instance with a waiting stream listens"
    );
    drop(w);
    a.service.stop().await?;
    b.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_enqueued_on_another_instance_is_pushed_on_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let admin = redis.client().await?;
    a_task_enqueued_on_another_instance_is_pushed(redis.url(), vec![admin]).await
}

/// On a cluster the scripts publish on whichever node holds the queue, and each instance
/// listens on one node: Redis Cluster forwards every PUBLISH to every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_enqueued_on_another_instance_is_pushed_on_a_cluster() -> anyhow::Result<()> {
    let mut cluster = RedisCluster::start().await?;
    let url = cluster.url();
    let mut admins = Vec::new();
    for node in cluster.nodes() {
        admins.push(node.client().await?);
    }
    a_task_enqueued_on_another_instance_is_pushed(url, admins).await
}

/// ListWorkers answers from any instance: a worker streaming from one instance shows on the
/// other (through the roster in Redis) with its queues and in-flight count, and leaves it when
/// its stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_workers_sees_the_workers_of_every_instance() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let a = Queue::start(Some(&redis.url()), "", &[]).await?;
    let b = Queue::start(Some(&redis.url()), "", &[]).await?;
    enqueue(&a, "roster", 2).await?;
    let mut w = Worker::subscribe(&a, &["roster", "other"], "w-roster").await?;
    w.credits(2).await?;
    for _ in 0..2 {
        let got = w.next().await?;
        anyhow::ensure!(matches!(got, Down::Task(_)), "a task, got {got:?}");
    }
    let list = |queue: &'static str| {
        let mut client = b.client.clone();
        async move {
            client
                .list_workers(pb::ListWorkersRequest {
                    project: "p".into(),
                    queue: queue.into(),
                })
                .await
                .map(|r| r.into_inner().workers)
        }
    };
    let seen = sluice_testkit::eventually(
        Duration::from_secs(10),
        "the worker listed by the other instance",
        || async {
            let workers = list("roster").await.ok()?;
            workers
                .into_iter()
                .find(|w| w.worker_id == "w-roster" && w.in_flight == 2)
        },
    )
    .await?;
    assert_eq!(seen.queues, ["roster", "other"]);
    assert!(!seen.instance.is_empty());
    assert!(list("elsewhere").await?.is_empty(), "filtered by queue");
    drop(w);
    sluice_testkit::eventually(
        Duration::from_secs(10),
        "the worker gone from the list",
        || async { list("").await.ok()?.is_empty().then_some(()) },
    )
    .await?;
    a.service.stop().await?;
    b.service.stop().await
}

/// An instance listens for wake-ups only while a stream of its own waits for work (and a
/// while after): once its last stream is gone it unsubscribes, and a new waiting stream gets
/// it subscribed again and is pushed a task enqueued on another instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_listens_for_wakeups_only_while_streams_wait() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let url = redis.url();
    let a = Queue::start(Some(&url), "", &[]).await?;
    let b = Queue::start(Some(&url), "", &[]).await?;
    let subscribers = || {
        let redis = &redis;
        async move {
            let mut admin = redis.client().await.ok()?;
            wake_subscribers(&mut admin).await
        }
    };
    let listening = |n: i64, what: &'static str| {
        sluice_testkit::eventually(Duration::from_secs(15), what, move || {
            let count = subscribers();
            async move { (count.await? == n).then_some(()) }
        })
    };
    // No stream anywhere: enqueues publish to no one.
    enqueue(&b, "idle", 3).await?;
    assert_eq!(subscribers().await, Some(0));
    let w = Worker::subscribe(&a, &["idle2"], "w-idle").await?;
    w.credits(1).await?;
    listening(1, "the waiting stream's instance to subscribe").await?;
    drop(w);
    listening(0, "the instance to unsubscribe after its stream ended").await?;
    let mut w = Worker::subscribe(&a, &["idle2"], "w-idle-again").await?;
    w.credits(1).await?;
    listening(1, "a new waiting stream to subscribe its instance again").await?;
    // The stream's first wait may have begun before the subscription: past its 1 s poll,
    // only the push delivers within the 5 s below (the subscribed poll is 10 s).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let id = enqueue(&b, "idle2", 1).await?.remove(0);
    let got = tokio::time::timeout(Duration::from_secs(5), w.next()).await??;
    let Down::Task(lease) = got else {
        anyhow::bail!("a task, got {got:?}")
    };
    assert_eq!(lease.task.map(|t| t.id), Some(id));
    drop(w);
    a.service.stop().await?;
    b.service.stop().await
}
