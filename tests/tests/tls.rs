//! TLS and mutual TLS on the gRPC port, with certificates made for the test by openssl:
//! trusted clients are served, plaintext and untrusted ones refused, a renewed certificate is
//! served without a restart, and bad files stop the service naming the option.

use std::time::Duration;

use sluice::proto::sluice::queue::v1 as pb;
use sluice::server::Listeners;
use sluice_testkit::auth::{Pki, tls_channel};
use sluice_testkit::queue::spec;
use sluice_testkit::{Service, eventually, probe};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

async fn start(args: &[String]) -> anyhow::Result<(Service, String)> {
    let mut argv = vec!["queue-svc".to_owned(), "--no-auth".to_owned()];
    argv.extend(args.iter().cloned());
    let config = queue_svc::Config::from_args(argv)?;
    let service = Service::start(|l, s| queue_svc::run(l, config, s)).await?;
    let url = format!("https://127.0.0.1:{}", service.grpc.port());
    Ok((service, url))
}

/// Health over `channel`, then one enqueue: what a client needs to work.
async fn served(channel: Channel) -> anyhow::Result<()> {
    let status = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    anyhow::ensure!(status == probe::SERVING, "health {status}");
    pb::queue_client::QueueClient::new(channel)
        .enqueue(pb::EnqueueRequest {
            task: Some(spec("p", "tls", b"x", pb::Priority::Normal)),
        })
        .await?;
    Ok(())
}

/// Connecting with `connect` and calling fails, at either step.
async fn refused(
    what: &str,
    connect: impl std::future::Future<Output = anyhow::Result<Channel>>,
) -> anyhow::Result<()> {
    let outcome = async { served(connect.await?).await }.await;
    anyhow::ensure!(outcome.is_err(), "{what} should be refused");
    Ok(())
}

fn handshake_failures() -> u64 {
    let text = sluice::server::metrics_handle().render();
    text.lines()
        .find_map(|l| l.strip_prefix("sluice_tls_handshake_failures_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_speaks_tls_refuses_others_and_takes_a_renewed_certificate()
-> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.issue("ca", &["server"])?;
    pki.issue("rogue", &["renewed"])?;
    let (service, url) = start(&[
        "--tls-cert".into(),
        pki.arg("server.crt"),
        "--tls-key".into(),
        pki.arg("server.key"),
    ])
    .await?;

    served(tls_channel(&url, &pki.file("ca.crt"), None).await?).await?;
    let failures = handshake_failures();
    refused("a plaintext client", async {
        probe::channel(&service.url()).await
    })
    .await?;
    refused("a client that does not trust the CA", async {
        tls_channel(&url, &pki.file("rogue.crt"), None).await
    })
    .await?;
    // The server counts a failure once its side of the handshake ends, which may be just
    // after the client has given up.
    eventually(
        Duration::from_secs(5),
        "both failed handshakes to be counted",
        || async { (handshake_failures() >= failures + 2).then_some(()) },
    )
    .await?;

    // A renewed certificate (here from another CA, to tell them apart) is served to new
    // connections without a restart.
    for (from, to) in [("renewed.key", "server.key"), ("renewed.crt", "server.crt")] {
        std::fs::copy(pki.file(from), pki.file(to))?;
    }
    eventually(
        Duration::from_secs(10),
        "the renewed certificate to be served",
        || async {
            let channel = tls_channel(&url, &pki.file("rogue.crt"), None).await.ok()?;
            served(channel).await.ok()
        },
    )
    .await?;
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_only_clients_with_a_certificate_its_ca_signed() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.issue("ca", &["server", "client"])?;
    pki.issue("rogue", &["intruder"])?;
    let (service, url) = start(&[
        "--tls-cert".into(),
        pki.arg("server.crt"),
        "--tls-key".into(),
        pki.arg("server.key"),
        "--tls-client-ca".into(),
        pki.arg("ca.crt"),
    ])
    .await?;
    let ca = pki.file("ca.crt");
    let (cert, key) = (pki.file("client.crt"), pki.file("client.key"));
    served(tls_channel(&url, &ca, Some((&cert, &key))).await?).await?;
    refused("a client without a certificate", async {
        tls_channel(&url, &ca, None).await
    })
    .await?;
    let (cert, key) = (pki.file("intruder.crt"), pki.file("intruder.key"));
    refused("a client whose certificate another CA signed", async {
        tls_channel(&url, &ca, Some((&cert, &key))).await
    })
    .await?;
    service.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_the_service_naming_the_option() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    pki.issue("ca", &["server", "other"])?;
    let cases: [(Vec<String>, &str); 4] = [
        (
            vec![
                "--tls-cert".into(),
                pki.arg("server.crt"),
                "--tls-key".into(),
                pki.arg("other.key"),
            ],
            "tls-key",
        ),
        (
            vec![
                "--tls-cert".into(),
                pki.arg("missing.crt"),
                "--tls-key".into(),
                pki.arg("server.key"),
            ],
            "tls-cert",
        ),
        (vec!["--tls-cert".into(), pki.arg("server.crt")], "tls-cert"),
        (
            vec!["--tls-client-ca".into(), pki.arg("ca.crt")],
            "tls-client-ca",
        ),
    ];
    for (args, option) in cases {
        let mut argv = vec!["queue-svc".to_owned(), "--no-auth".to_owned()];
        argv.extend(args.iter().cloned());
        let config = queue_svc::Config::from_args(argv)?;
        let run = queue_svc::run(
            Listeners::ephemeral().await?,
            config,
            CancellationToken::new(),
        );
        let outcome = tokio::time::timeout(Duration::from_secs(5), run).await?;
        let Err(err) = outcome else {
            anyhow::bail!("{args:?} should stop the service");
        };
        anyhow::ensure!(
            err.to_string().contains(option),
            "{args:?}: the error should name --{option}: {err}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalling_in_the_tls_handshake_is_disconnected() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new()?;
    pki.issue("ca", &["server"])?;
    let tls = sluice::tls::Tls::load(sluice::tls::ServerFiles {
        cert: pki.file("server.crt"),
        key: pki.file("server.key"),
        client_ca: None,
    })?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let shutdown = CancellationToken::new();
    let (router, _health) = sluice::server::router(&[], &[], sluice::auth::Auth::Off)?;
    let server = tokio::spawn(sluice::server::serve(
        router,
        listener,
        shutdown.clone(),
        sluice::server::Connections {
            grace: Duration::from_millis(200),
            keepalive: None,
            handshake: Duration::from_millis(500),
            tls: Some(tls),
        },
    ));
    // A TLS record header announcing a 200-byte ClientHello, one byte of it, then silence.
    let mut stalled = tokio::net::TcpStream::connect(addr).await?;
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01])
        .await?;
    let mut buf = [0; 64];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stalled.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    anyhow::ensure!(
        closed.is_ok(),
        "the connection is closed once the handshake deadline passes"
    );
    shutdown.cancel();
    server.await??;
    Ok(())
}
