//! `--redis-url`: what the Redis behind the service spent during a run, read from `INFO cpu`
//! (`used_cpu_sys` + `used_cpu_user`) and `INFO commandstats` (the `calls` of every command).
//!
//! One node only: against a Redis Cluster give one node's URL and read the figures as that
//! node's share. The counters are server-wide, so anything else using the same Redis during
//! the run counts too. The probe's own `INFO` calls are left out of the command count;
//! commands that Lua scripts run count, as well as the script calls themselves.

use std::time::Duration;

use anyhow::Context as _;
use redis::aio::MultiplexedConnection;
use tokio::time::Instant;

/// Longest wait for one `INFO` answer (or for connecting).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Commands that run a script or a function; counted apart as well.
const SCRIPT_COMMANDS: [&str; 6] = [
    "eval",
    "evalsha",
    "eval_ro",
    "evalsha_ro",
    "fcall",
    "fcall_ro",
];

/// Redis's counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// `used_cpu_sys + used_cpu_user`: CPU seconds of the Redis process (its main thread and
    /// I/O threads, not forked children).
    pub cpu_seconds: f64,
    /// Calls of every command but `INFO`.
    pub commands: u64,
    /// Calls of EVAL, EVALSHA, FCALL and their read-only forms.
    pub script_calls: u64,
}

impl Sample {
    /// What was spent from `before` to `self`.
    pub fn since(&self, before: &Self) -> Usage {
        Usage {
            cpu_seconds: (self.cpu_seconds - before.cpu_seconds).max(0.0),
            // A CONFIG RESETSTAT meanwhile would make these go backwards.
            commands: self.commands.saturating_sub(before.commands),
            script_calls: self.script_calls.saturating_sub(before.script_calls),
        }
    }
}

/// What Redis spent over a period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub commands: u64,
    pub script_calls: u64,
}

/// A connection that reads [`Sample`]s. Cheap to clone (one multiplexed connection).
#[derive(Clone)]
pub struct Probe {
    connection: MultiplexedConnection,
}

impl Probe {
    /// Connects to `url` (`redis://host:port`, `rediss://…`) and reads one sample, so that a
    /// wrong URL or a Redis refusing `INFO` fails before any load is sent.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url)
            .with_context(|| format!("--redis-url `{url}` is not valid"))?;
        let connection = tokio::time::timeout(TIMEOUT, client.get_multiplexed_async_connection())
            .await
            .map_err(|_| anyhow::anyhow!("connecting to Redis at {url}: timed out"))?
            .with_context(|| format!("connecting to Redis at {url}"))?;
        let probe = Self { connection };
        probe
            .sample()
            .await
            .with_context(|| format!("reading INFO from Redis at {url}"))?;
        Ok(probe)
    }

    /// Reads the counters now.
    pub async fn sample(&self) -> anyhow::Result<Sample> {
        let cpu = self.info("cpu").await?;
        let commandstats = self.info("commandstats").await?;
        let (commands, script_calls) = parse_commandstats(&commandstats);
        Ok(Sample {
            cpu_seconds: parse_cpu(&cpu)?,
            commands,
            script_calls,
        })
    }

    async fn info(&self, section: &str) -> anyhow::Result<String> {
        let mut connection = self.connection.clone();
        let mut command = redis::cmd("INFO");
        command.arg(section);
        let query = command.query_async::<String>(&mut connection);
        tokio::time::timeout(TIMEOUT, query)
            .await
            .map_err(|_| anyhow::anyhow!("INFO {section}: timed out"))?
            .with_context(|| format!("INFO {section}"))
    }
}

/// Reads a sample from `probe` at `at`, on a task of its own, while the load runs.
pub fn sample_at(probe: Probe, at: Instant) -> tokio::task::JoinHandle<anyhow::Result<Sample>> {
    tokio::spawn(async move {
        tokio::time::sleep_until(at).await;
        probe.sample().await
    })
}

/// `used_cpu_sys + used_cpu_user` from the text of `INFO cpu`.
fn parse_cpu(info: &str) -> anyhow::Result<f64> {
    let mut sys = None;
    let mut user = None;
    for line in info.lines() {
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let slot = match key {
            "used_cpu_sys" => &mut sys,
            "used_cpu_user" => &mut user,
            _ => continue,
        };
        let seconds: f64 = value
            .trim()
            .parse()
            .with_context(|| format!("INFO cpu: `{key}:{value}` is not a number"))?;
        *slot = Some(seconds);
    }
    match (sys, user) {
        (Some(sys), Some(user)) => Ok(sys + user),
        _ => anyhow::bail!("INFO cpu has no used_cpu_sys and used_cpu_user"),
    }
}

/// The calls of every command but `INFO`, and those of the script commands, from the text of
/// `INFO commandstats` (lines like `cmdstat_get:calls=12,usec=40,usec_per_call=3.33,…`).
fn parse_commandstats(info: &str) -> (u64, u64) {
    let mut commands = 0_u64;
    let mut scripts = 0_u64;
    for line in info.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(command) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let command = command.to_ascii_lowercase();
        if command == "info" {
            continue;
        }
        let calls = fields
            .split(',')
            .find_map(|field| field.strip_prefix("calls="))
            .and_then(|calls| calls.trim().parse::<u64>().ok())
            .unwrap_or(0);
        commands = commands.saturating_add(calls);
        if SCRIPT_COMMANDS.contains(&command.as_str()) {
            scripts = scripts.saturating_add(calls);
        }
    }
    (commands, scripts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_sys_plus_user_without_children() -> anyhow::Result<()> {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\
                    used_cpu_sys_children:9.0\r\nused_cpu_user_children:9.0\r\n";
        assert!((parse_cpu(info)? - 3.75).abs() < 1e-9);
        assert!(parse_cpu("# CPU\r\n").is_err());
        Ok(())
    }

    #[test]
    fn commandstats_sums_calls_but_info_and_counts_scripts() {
        let info = "# Commandstats\r\n\
            cmdstat_evalsha:calls=100,usec=900,usec_per_call=9.00,rejected_calls=0,failed_calls=2\r\n\
            cmdstat_hget:calls=30,usec=30,usec_per_call=1.00,rejected_calls=7,failed_calls=0\r\n\
            cmdstat_info:calls=5,usec=50,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n\
            cmdstat_client|setname:calls=1,usec=1,usec_per_call=1.00,rejected_calls=0,failed_calls=0\r\n";
        assert_eq!(parse_commandstats(info), (131, 100));
    }

    #[test]
    fn usage_is_the_difference_of_two_samples() {
        let before = Sample {
            cpu_seconds: 1.0,
            commands: 10,
            script_calls: 4,
        };
        let after = Sample {
            cpu_seconds: 1.5,
            commands: 110,
            script_calls: 54,
        };
        assert_eq!(
            after.since(&before),
            Usage {
                cpu_seconds: 0.5,
                commands: 100,
                script_calls: 50,
            }
        );
    }
}
