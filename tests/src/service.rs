//! A Sluice service started in-process on ephemeral ports, stopped through its shutdown token.

use std::future::Future;
use std::net::SocketAddr;

use sluice::server::Listeners;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running in-process service.
#[derive(Debug)]
pub struct Service {
    /// gRPC address.
    pub grpc: SocketAddr,
    /// `/metrics` address.
    pub metrics: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    /// Binds 127.0.0.1:0 twice and spawns `run(listeners, shutdown)`.
    pub async fn start<F, Fut>(run: F) -> anyhow::Result<Self>
    where
        F: FnOnce(Listeners, CancellationToken) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listeners = Listeners::ephemeral().await?;
        let grpc = listeners.grpc.local_addr()?;
        let metrics = listeners.metrics.local_addr()?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listeners, shutdown.clone()));
        Ok(Self {
            grpc,
            metrics,
            shutdown,
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`, for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A channel to the service; if the service already stopped (its `run` failed), its
    /// error instead of a bare connection failure.
    pub async fn channel(&mut self) -> anyhow::Result<tonic::transport::Channel> {
        match crate::probe::channel(&self.url()).await {
            Ok(channel) => Ok(channel),
            Err(err) => match self.task.take() {
                Some(task) if task.is_finished() => match task.await? {
                    Err(run_error) => Err(run_error.context("the service stopped")),
                    Ok(()) => Err(err.context("the service stopped without an error")),
                },
                task => {
                    self.task = task;
                    Err(err)
                }
            },
        }
    }

    /// Cancels the service and waits for `run` to return its result.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
