//! The Lua script runner both services use: EVALSHA, and EVAL once when Redis answers
//! NOSCRIPT (after a restart, a failover or `SCRIPT FLUSH`), which also caches the script again.
//!
//! Each script is a `.lua` file beside the Rust that wraps it, loaded with `include_str!` into
//! a [`Script`]. A call declares every key it touches (Redis Cluster routes by the first key;
//! all keys of one call must share a hash tag) and runs inside a `redis.script` span.

use std::time::Duration;

use redis::{Cmd, FromRedisValue, ToRedisArgs};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::pool::RedisPool;

/// A Lua script known by name (for spans and errors) and by SHA1 (for EVALSHA).
#[derive(Debug)]
pub struct Script {
    name: &'static str,
    body: &'static str,
    sha: String,
}

impl Script {
    /// Wraps a script body; `name` shows in spans and error messages.
    pub fn new(name: &'static str, body: &'static str) -> Self {
        let sha = redis::Script::new(body).get_hash().to_owned();
        Self { name, body, sha }
    }

    /// The script's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Starts a call: add keys and arguments, then [`Call::invoke`].
    pub fn call(&self) -> Call<'_> {
        Call {
            script: self,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }
}

/// One invocation of a [`Script`] being assembled.
#[derive(Debug)]
pub struct Call<'s> {
    script: &'s Script,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl Call<'_> {
    /// Appends a key (KEYS[n]).
    pub fn key(mut self, key: impl ToRedisArgs) -> Self {
        // Written in place: `to_redis_args` would allocate a list per key as well.
        key.write_redis_args(&mut self.keys);
        self
    }

    /// Appends an argument (ARGV[n]); a value that encodes to several arguments adds them all.
    pub fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    fn command(&self, verb: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script)
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.args);
        cmd
    }

    /// Runs the script and converts its reply; bounded by the pool's command timeout.
    pub async fn invoke<T: FromRedisValue>(self, pool: &RedisPool) -> Result<T> {
        let span = tracing::info_span!(
            "redis.script",
            otel.name = self.script.name,
            otel.kind = "client",
            db.system.name = "redis",
            db.operation.name = "EVALSHA",
            db.redis.script = self.script.name,
            db.redis.key_count = self.keys.len(),
        );
        let timeout = pool.command_timeout();
        async move {
            let mut conn = pool.get().await?;
            let evalsha = self.command("EVALSHA", &self.script.sha);
            let first = bounded(timeout, evalsha.query_async::<T>(&mut conn)).await?;
            match first {
                Err(err)
                    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    tracing::debug!(script = self.script.name, "NOSCRIPT: sending the body");
                    let eval = self.command("EVAL", self.script.body);
                    bounded(timeout, eval.query_async::<T>(&mut conn))
                        .await?
                        .map_err(|err| script_error(self.script.name, err))
                }
                other => other.map_err(|err| script_error(self.script.name, err)),
            }
        }
        .instrument(span)
        .await
    }
}

async fn bounded<F: std::future::Future>(timeout: Duration, fut: F) -> Result<F::Output> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| Error::Unavailable(format!("Redis did not answer within {timeout:?}")))
}

fn script_error(name: &str, err: redis::RedisError) -> Error {
    match Error::from(err) {
        Error::Internal(msg) => Error::Internal(format!("script {name}: {msg}")),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha_matches_redis() {
        // SHA1 of "return 1", as SCRIPT LOAD reports it.
        let script = Script::new("one", "return 1");
        assert_eq!(script.sha, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }
}
