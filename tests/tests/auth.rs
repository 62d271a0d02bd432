//! Auth on both services, through real gRPC on a real Redis: API keys and JWTs mapped to roles
//! and projects, refused calls that store nothing, and keys rotated without a restart.

use std::time::Duration;

use sluice::auth::Bearer;
use sluice::proto::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use sluice::proto::envoy::service::ratelimit::v3 as rls;
use sluice::proto::sluice::limiter::v1 as pb_limiter;
use sluice::proto::sluice::queue::v1 as pb;
use sluice_testkit::auth::{
    Credentials, Pki, SECRET, channel_as, jwt, jwt_signed_by, key_pair, unix_now,
};
use sluice_testkit::limiter::{Limiter, StoreKind, policy_check, request};
use sluice_testkit::queue::{Queue, dequeue, spec};
use sluice_testkit::{RedisServer, eventually, probe};
use tonic::Code;
use tonic::transport::Channel;

type QueueClient = pb::queue_client::QueueClient<Bearer<Channel>>;

async fn queue_as(url: &str, token: &str) -> anyhow::Result<QueueClient> {
    Ok(pb::queue_client::QueueClient::new(
        channel_as(url, token).await?,
    ))
}

fn enqueue(project: &str, queue: &str) -> pb::EnqueueRequest {
    pb::EnqueueRequest {
        task: Some(spec(project, queue, b"x", pb::Priority::Normal)),
    }
}

/// Opens a Lease stream on `project`'s queue "q": the sender for further messages, and the
/// stream of answers.
async fn subscribe(
    worker: &mut QueueClient,
    project: &str,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<pb::LeaseRequest>,
    tonic::Streaming<pb::LeaseResponse>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::LeaseRequest {
        kind: Some(pb::lease_request::Kind::Subscribe(pb::Subscribe {
            project: project.into(),
            queues: vec!["q".into()],
            worker_id: "w1".into(),
            ..Default::default()
        })),
    })
    .await?;
    let stream = worker
        .lease(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// The status of a refused call, with its message checked for `words`.
fn refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    words: &[&str],
) -> anyhow::Result<()> {
    let status = match result {
        Ok(reply) => anyhow::bail!("expected {code:?}, got {reply:?}"),
        Err(status) => status,
    };
    anyhow::ensure!(status.code() == code, "expected {code:?}: {status:?}");
    for word in words {
        anyhow::ensure!(
            status.message().contains(word),
            "the message should say {word:?}: {}",
            status.message()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_calls_need_their_role_and_project() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let creds = Credentials::new(&[
        ("shop-web", "sk_producer", &["producer"], &["shop"]),
        ("shop-fleet", "sk_worker", &["worker"], &["shop"]),
        ("shop-ops", "sk_admin", &["admin"], &["shop"]),
        ("root", "sk_root", &["admin"], &["*"]),
    ])?;
    let q = Queue::start(Some(&redis.url()), "", &["--auth-keys", &creds.keys_arg()]).await?;
    let url = q.service.url();

    // Health and reflection answer anyone; calls without (good) credentials are refused.
    anyhow::ensure!(probe::health(&url, "").await? == probe::SERVING);
    anyhow::ensure!(
        probe::reflection_v1(&url)
            .await?
            .contains(&"sluice.queue.v1.Queue".to_owned())
    );
    refused(
        q.client.clone().enqueue(enqueue("shop", "q")).await,
        Code::Unauthenticated,
        &["authorization", "Bearer"],
    )?;
    let mut stranger = queue_as(&url, "sk_unknown").await?;
    refused(
        stranger.enqueue(enqueue("shop", "q")).await,
        Code::Unauthenticated,
        &["API key"],
    )?;

    // A producer enqueues into its project only, and cannot lease.
    let mut producer = queue_as(&url, "sk_producer").await?;
    let id = producer
        .enqueue(enqueue("shop", "q"))
        .await?
        .into_inner()
        .task_id;
    refused(
        producer.enqueue(enqueue("other", "q")).await,
        Code::PermissionDenied,
        &["task.project", "\"other\"", "shop-web"],
    )?;
    refused(
        producer
            .enqueue_batch(pb::EnqueueBatchRequest {
                project: "other".into(),
                queue: "q".into(),
                tasks: vec![spec("", "", b"x", pb::Priority::Normal)],
            })
            .await,
        Code::PermissionDenied,
        &["project"],
    )?;
    refused(
        producer.dequeue(dequeue("shop", "q", 1)).await,
        Code::PermissionDenied,
        &["Dequeue", "worker"],
    )?;
    refused(
        producer
            .pause_queue(pb::PauseQueueRequest {
                project: "shop".into(),
                queue: "q".into(),
            })
            .await,
        Code::PermissionDenied,
        &["admin"],
    )?;
    let task = producer
        .get_task(pb::GetTaskRequest {
            project: "shop".into(),
            queue: "q".into(),
            task_id: id.clone(),
        })
        .await?;
    anyhow::ensure!(task.into_inner().task.is_some());

    // A worker leases from its project only, on either path, and cannot enqueue.
    let mut worker = queue_as(&url, "sk_worker").await?;
    refused(
        worker.enqueue(enqueue("shop", "q")).await,
        Code::PermissionDenied,
        &["producer"],
    )?;
    let mut wide = dequeue("shop", "q", 1);
    wide.also_projects = vec!["other".into()];
    refused(
        worker.dequeue(wide).await,
        Code::PermissionDenied,
        &["also_projects[0]"],
    )?;
    let (_tx, mut stream) = subscribe(&mut worker, "other").await?;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await?;
    match first {
        Err(status) => anyhow::ensure!(
            status.code() == Code::PermissionDenied
                && status.message().contains("subscribe.project"),
            "{status:?}"
        ),
        Ok(other) => anyhow::bail!("a stream on another project was served: {other:?}"),
    }
    let leased = worker
        .dequeue(dequeue("shop", "q", 1))
        .await?
        .into_inner()
        .leases;
    let [leased] = leased.as_slice() else {
        anyhow::bail!("the worker should lease the one task: {leased:?}");
    };
    anyhow::ensure!(leased.task.as_ref().map(|t| t.id.as_str()) == Some(id.as_str()));
    worker
        .complete(pb::CompleteRequest {
            project: "shop".into(),
            queue: "q".into(),
            task_id: id.clone(),
            lease_token: leased.lease_token.clone(),
            result: Vec::new(),
        })
        .await?;

    // An admin is still bound to its projects.
    let mut admin = queue_as(&url, "sk_admin").await?;
    let pause = |project: &str| pb::PauseQueueRequest {
        project: project.into(),
        queue: "q".into(),
    };
    anyhow::ensure!(admin.pause_queue(pause("shop")).await?.into_inner().paused);
    refused(
        admin.pause_queue(pause("other")).await,
        Code::PermissionDenied,
        &["\"other\""],
    )?;

    // None of the refused calls stored anything.
    let mut root = queue_as(&url, "sk_root").await?;
    let other = root
        .dequeue(dequeue("other", "q", 10))
        .await?
        .into_inner()
        .leases;
    anyhow::ensure!(other.is_empty(), "refused enqueues stored {other:?}");
    let stats = root
        .get_queue_stats(pb::GetQueueStatsRequest {
            project: "shop".into(),
            queue: "q".into(),
        })
        .await?
        .into_inner()
        .stats
        .ok_or_else(|| anyhow::anyhow!("stats"))?;
    let ready: u64 = stats.ready_by_priority.iter().map(|d| d.ready).sum();
    anyhow::ensure!(ready == 0 && stats.paused, "{stats:?}");
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_honoured_and_rotated_keys_take_effect_without_a_restart() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let creds = Credentials::new(&[("old", "sk_old", &["admin"], &["*"])])?;
    let q = Queue::start(
        Some(&redis.url()),
        "",
        &[
            "--auth-keys",
            &creds.keys_arg(),
            "--auth-jwt-secret",
            &creds.secret_arg(),
            "--auth-jwt-issuer",
            "idp",
        ],
    )
    .await?;
    let url = q.service.url();

    let claims = |exp: u64, iss: &str| {
        serde_json::json!({"sub": "fleet-7", "exp": exp, "iss": iss,
            "roles": ["worker"], "projects": ["shop"]})
    };
    let mut fleet = queue_as(&url, &jwt(SECRET, &claims(unix_now() + 300, "idp"))).await?;
    let leased = fleet.dequeue(dequeue("shop", "q", 1)).await?.into_inner();
    anyhow::ensure!(leased.leases.is_empty());
    refused(
        fleet.enqueue(enqueue("shop", "q")).await,
        Code::PermissionDenied,
        &["fleet-7"],
    )?;
    for (token, why) in [
        (jwt(SECRET, &claims(unix_now() - 600, "idp")), "expired"),
        (jwt(SECRET, &claims(unix_now() + 300, "elsewhere")), "iss"),
        (
            jwt(
                "another secret, also longer than thirty-two bytes",
                &claims(unix_now() + 300, "idp"),
            ),
            "signature",
        ),
    ] {
        let mut client = queue_as(&url, &token).await?;
        refused(
            client.dequeue(dequeue("shop", "q", 1)).await,
            Code::Unauthenticated,
            &[why],
        )?;
    }

    // Rotation: the old key goes, a new one comes, with the service running.
    let mut old = queue_as(&url, "sk_old").await?;
    old.enqueue(enqueue("shop", "q")).await?;
    creds.write_keys(&[("new", "sk_new", &["producer"], &["shop"])])?;
    let mut new = queue_as(&url, "sk_new").await?;
    eventually(Duration::from_secs(10), "the new key to be taken", || {
        let (mut old, mut new) = (old.clone(), new.clone());
        async move {
            let old_refused = old
                .enqueue(enqueue("shop", "q"))
                .await
                .is_err_and(|s| s.code() == Code::Unauthenticated);
            let new_taken = new.enqueue(enqueue("shop", "q")).await.is_ok();
            (old_refused && new_taken).then_some(())
        }
    })
    .await?;
    // A broken edit is refused and the keys in force stay. Nothing a client sees changes, so
    // there is no condition to await: the test lets two rereads pass.
    std::fs::write(creds.keys(), "[[keys]]\nname = \"half")?;
    tokio::time::sleep(sluice::auth::RELOAD_EVERY * 2).await;
    new.enqueue(enqueue("shop", "q")).await?;
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_provider_tokens_are_checked_with_its_public_keys() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new()?;
    for (name, rsa) in [("idp-rsa", true), ("idp-ec", false), ("rogue", true)] {
        key_pair(pki.file("").as_path(), name, rsa)?;
    }
    // Both of the provider's keys in one file, as during a rotation.
    let mut keys = std::fs::read(pki.file("idp-rsa.pub"))?;
    keys.extend(std::fs::read(pki.file("idp-ec.pub"))?);
    std::fs::write(pki.file("idp.pub"), &keys)?;
    // A provider's keys alone are refused: its tokens for other applications would pass.
    let loose =
        queue_svc::Config::from_args(["queue-svc", "--auth-jwt-public-keys", &pki.arg("idp.pub")])?;
    let stopped = queue_svc::run(
        sluice::server::Listeners::ephemeral().await?,
        loose,
        tokio_util::sync::CancellationToken::new(),
    );
    let stopped = tokio::time::timeout(Duration::from_secs(5), stopped).await?;
    anyhow::ensure!(
        stopped.is_err_and(|e| e.to_string().contains("--auth-jwt-issuer")),
        "public keys need an issuer and an audience"
    );

    // The provider's keys beside a shared secret of this service's own.
    let creds = Credentials::new(&[])?;
    let q = Queue::start(
        Some(&redis.url()),
        "",
        &[
            "--auth-jwt-public-keys",
            &pki.arg("idp.pub"),
            "--auth-jwt-secret",
            &creds.secret_arg(),
            "--auth-jwt-issuer",
            "idp",
            "--auth-jwt-audience",
            "sluice",
        ],
    )
    .await?;
    let url = q.service.url();
    let claims = |aud: &str| {
        serde_json::json!({"sub": "fleet-9", "exp": unix_now() + 300, "iss": "idp", "aud": aud,
            "roles": ["worker"], "projects": ["shop"]})
    };
    for (key, rsa) in [("idp-rsa.key", true), ("idp-ec.key", false)] {
        let token = jwt_signed_by(&pki.file(key), rsa, &claims("sluice"))?;
        let mut fleet = queue_as(&url, &token).await?;
        fleet.dequeue(dequeue("shop", "q", 1)).await?;
        refused(
            fleet.dequeue(dequeue("other", "q", 1)).await,
            Code::PermissionDenied,
            &["fleet-9"],
        )?;
    }
    let mut own = queue_as(&url, &jwt(SECRET, &claims("sluice"))).await?;
    own.dequeue(dequeue("shop", "q", 1)).await?;
    // Another key's signature; a token for another application; an HS256 token keyed with the
    // provider's public key (the classic algorithm confusion).
    let public_pem = std::fs::read_to_string(pki.file("idp-rsa.pub"))?;
    for (token, why) in [
        (
            jwt_signed_by(&pki.file("rogue.key"), true, &claims("sluice"))?,
            "signature",
        ),
        (
            jwt_signed_by(&pki.file("idp-rsa.key"), true, &claims("billing"))?,
            "aud",
        ),
        (jwt(&public_pem, &claims("sluice")), "signature"),
    ] {
        let mut client = queue_as(&url, &token).await?;
        refused(
            client.dequeue(dequeue("shop", "q", 1)).await,
            Code::Unauthenticated,
            &[why],
        )?;
    }
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_lease_stream_ends_once_its_key_is_revoked() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let creds = Credentials::new(&[("fleet", "sk_fleet", &["worker"], &["shop"])])?;
    let q = Queue::start(Some(&redis.url()), "", &["--auth-keys", &creds.keys_arg()]).await?;
    let mut worker = queue_as(&q.service.url(), "sk_fleet").await?;
    let (tx, mut stream) = subscribe(&mut worker, "shop").await?;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.message()).await??;
    anyhow::ensure!(
        matches!(
            first.and_then(|m| m.kind),
            Some(pb::lease_response::Kind::Subscribed(_))
        ),
        "the stream opens"
    );

    // Revoked: the first message the stream gets once the keys file is reread ends it.
    creds.write_keys(&[("other", "sk_other", &["worker"], &["shop"])])?;
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let credit = pb::LeaseRequest {
                kind: Some(pb::lease_request::Kind::Credits(pb::Credits { add: 0 })),
            };
            if tx.send(credit).await.is_err() {
                anyhow::bail!("the stream closed without a status");
            }
            tokio::select! {
                message = stream.message() => match message {
                    Err(status) => return Ok(status),
                    Ok(None) => anyhow::bail!("the stream ended without a status"),
                    Ok(Some(_)) => {}
                },
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    })
    .await??;
    anyhow::ensure!(ended.code() == Code::Unauthenticated, "{ended:?}");
    q.service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_checks_take_any_credentials_and_resets_need_admin() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let creds = Credentials::new(&[
        ("gateway", "sk_gateway", &["producer"], &["edge"]),
        ("ops", "sk_ops", &["admin"], &["*"]),
    ])?;
    let limits = r#"
[policies.api]
algorithm = "fixed_window"
limit = 5
window = "1h"

[[rls]]
domain = "edge"
rules = [{ match = ["api"], policy = "api" }]
"#;
    let mut limiter = Limiter::start(
        &StoreKind::Redis(redis.url()),
        limits,
        &["--auth-keys", &creds.keys_arg()],
    )
    .await?;
    let url = limiter.service.url();
    let check = || request(vec![policy_check("user", "u1", "api")], 1);
    refused(
        limiter.client.check_limit(check()).await,
        Code::Unauthenticated,
        &["authorization"],
    )?;
    let rls_request = || rls::RateLimitRequest {
        domain: "edge".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![rate_limit_descriptor::Entry {
                key: "api".into(),
                value: "k1".into(),
            }],
            ..Default::default()
        }],
        hits_addend: 0,
    };
    let mut envoy_stranger = rls::rate_limit_service_client::RateLimitServiceClient::new(
        limiter.service.channel().await?,
    );
    refused(
        envoy_stranger.should_rate_limit(rls_request()).await,
        Code::Unauthenticated,
        &[],
    )?;

    let mut gateway =
        pb_limiter::limiter_client::LimiterClient::new(channel_as(&url, "sk_gateway").await?);
    let answer = gateway.check_limit(check()).await?.into_inner();
    anyhow::ensure!(answer.allowed, "{answer:?}");
    let mut envoy = rls::rate_limit_service_client::RateLimitServiceClient::new(
        channel_as(&url, "sk_gateway").await?,
    );
    let answer = envoy.should_rate_limit(rls_request()).await?.into_inner();
    anyhow::ensure!(
        answer.overall_code == i32::from(rls::rate_limit_response::Code::Ok),
        "{answer:?}"
    );
    let reset = || pb_limiter::ResetLimitRequest {
        checks: vec![policy_check("user", "u1", "api")],
    };
    refused(
        gateway.reset_limit(reset()).await,
        Code::PermissionDenied,
        &["ResetLimit", "admin"],
    )?;
    let mut ops = pb_limiter::limiter_client::LimiterClient::new(channel_as(&url, "sk_ops").await?);
    ops.reset_limit(reset()).await?;
    limiter.service.stop().await
}
