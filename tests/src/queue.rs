//! Helpers for queue tests: start queue-svc on a Redis with a queues file, build specs.

use sluice::proto::sluice::queue::v1 as pb;
use tonic::transport::Channel;

use crate::Service;

/// A queue-svc started in-process.
#[derive(Debug)]
pub struct Queue {
    /// The running service.
    pub service: Service,
    /// A client on it.
    pub client: pb::queue_client::QueueClient<Channel>,
    _queues: tempfile::NamedTempFile,
}

impl Queue {
    /// Starts queue-svc on `redis_url` (`None`: the embedded store) with the queues file
    /// `queues` (TOML) and extra flags.
    pub async fn start(
        redis_url: Option<&str>,
        queues: &str,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let file = tempfile::Builder::new().suffix(".toml").tempfile()?;
        std::fs::write(file.path(), queues)?;
        let mut args = vec![
            "queue-svc".to_owned(),
            "--queues".to_owned(),
            file.path().display().to_string(),
            "--reaper-interval".to_owned(),
            "100ms".to_owned(),
        ];
        if let Some(url) = redis_url {
            args.push("--redis-url".to_owned());
            args.push(url.to_owned());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.extend(crate::auth_choice(extra).iter().map(|s| (*s).to_owned()));
        let config = queue_svc::Config::from_args(args)?;
        let mut service = Service::start(|l, s| queue_svc::run(l, config, s)).await?;
        let client = pb::queue_client::QueueClient::new(service.channel().await?)
            .max_decoding_message_size(16 * 1024 * 1024);
        Ok(Self {
            service,
            client,
            _queues: file,
        })
    }

    /// The stats of `project`'s `queue`.
    pub async fn stats(&self, project: &str, queue: &str) -> anyhow::Result<pb::QueueStats> {
        self.client
            .clone()
            .get_queue_stats(pb::GetQueueStatsRequest {
                project: project.into(),
                queue: queue.into(),
            })
            .await?
            .into_inner()
            .stats
            .ok_or_else(|| anyhow::anyhow!("GetQueueStats answered no stats"))
    }
}

/// A task spec with a payload and a priority.
pub fn spec(project: &str, queue: &str, payload: &[u8], priority: pb::Priority) -> pb::TaskSpec {
    pb::TaskSpec {
        project: project.to_owned(),
        queue: queue.to_owned(),
        payload: payload.to_vec(),
        priority: priority.into(),
        ..Default::default()
    }
}

/// A Dequeue of up to `n` tasks from one queue, no waiting.
pub fn dequeue(project: &str, queue: &str, n: u32) -> pb::DequeueRequest {
    pb::DequeueRequest {
        project: project.to_owned(),
        queues: vec![queue.to_owned()],
        max_tasks: n,
        ..Default::default()
    }
}
