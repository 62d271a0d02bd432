//! The shared Redis runtime against real redis-server processes: the script runner through the
//! pool on standalone Redis and on a 3-master cluster, NOSCRIPT recovery, and reconnection
//! after the server is killed and restarted.

use std::time::Duration;

use sluice::pool::{RedisConfig, RedisPool};
use sluice::script::Script;
use sluice_testkit::{RedisCluster, RedisServer, eventually};

/// KEYS[1]: a counter. ARGV[1]: the increment. Returns the counter's new value.
const INCR_BY: &str = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

fn pool(url: String) -> RedisPool {
    RedisPool::new(&RedisConfig {
        url,
        pool_size: 2,
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(500),
        tls_ca: None,
    })
    .expect("valid URL")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_runs_through_the_pool_and_survives_script_flush() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pool = pool(redis.url());
    let script = Script::new("incr_by", INCR_BY);

    let first: i64 = script.call().key("t:counter").arg(2).invoke(&pool).await?;
    assert_eq!(first, 2);

    let mut admin = redis.client().await?;
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut admin)
        .await?;
    let exists: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(redis::Script::new(INCR_BY).get_hash())
        .query_async(&mut admin)
        .await?;
    assert_eq!(exists, vec![false], "the flush removed the script");

    let second: i64 = script.call().key("t:counter").arg(3).invoke(&pool).await?;
    assert_eq!(second, 5, "the runner reloaded the script after NOSCRIPT");
    let exists: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(redis::Script::new(INCR_BY).get_hash())
        .query_async(&mut admin)
        .await?;
    assert_eq!(exists, vec![true], "the reload cached it again for EVALSHA");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_error_is_internal_not_transient() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pool = pool(redis.url());
    let script = Script::new("incr_by", INCR_BY);
    let err = script
        .call()
        .key("t:counter")
        .arg("not-a-number")
        .invoke::<i64>(&pool)
        .await
        .expect_err("INCRBY of a word fails");
    assert!(!err.is_transient(), "{err}");
    assert!(
        err.to_string().contains("incr_by"),
        "names the script: {err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_script_runs_on_a_three_master_cluster() -> anyhow::Result<()> {
    let cluster = RedisCluster::start().await?;
    let pool = pool(cluster.url());
    assert!(pool.is_cluster());
    let script = Script::new("incr_by", INCR_BY);
    // Hash tags chosen to land in each master's slot range (0-5460, 5461-10922, 10923-16383).
    let keys = [
        "{a}:counter",
        "{b}:counter",
        "{c}:counter",
        "{user:42}:counter",
    ];
    let mut slots = Vec::new();
    for key in keys {
        let value: i64 = script.call().key(key).arg(7).invoke(&pool).await?;
        assert_eq!(value, 7, "{key}");
        let again: i64 = script.call().key(key).arg(1).invoke(&pool).await?;
        assert_eq!(again, 8, "{key}");
        let slot: i64 = pool
            .query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
            .await?;
        slots.push(slot);
    }
    let masters: std::collections::BTreeSet<usize> = slots
        .iter()
        .map(|s| match s {
            0..=5460 => 0,
            5461..=10922 => 1,
            _ => 2,
        })
        .collect();
    assert_eq!(
        masters.len(),
        3,
        "keys covered every master: slots {slots:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_reconnects_after_redis_is_killed_and_restarted() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let pool = pool(redis.url());
    let script = Script::new("incr_by", INCR_BY);
    let _: i64 = script.call().key("t:c").arg(1).invoke(&pool).await?;

    redis.kill()?;
    let err = script
        .call()
        .key("t:c")
        .arg(1)
        .invoke::<i64>(&pool)
        .await
        .expect_err("nothing listens");
    assert!(err.is_transient(), "a dead server is transient: {err}");

    redis.restart().await?;
    // The killed server kept nothing (no persistence): the counter starts again at 1.
    let value = eventually(Duration::from_secs(10), "the pool to reconnect", || {
        let call = script.call().key("t:c").arg(1);
        let pool = pool.clone();
        async move { call.invoke::<i64>(&pool).await.ok() }
    })
    .await?;
    assert_eq!(value, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_run_over_tls_with_a_password() -> anyhow::Result<()> {
    let redis = RedisServer::start_tls("s3cret").await?;
    let config = |url: String, tls_ca: Option<Vec<u8>>| RedisConfig {
        url,
        pool_size: 2,
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(500),
        tls_ca,
    };
    let ca = std::fs::read(redis.tls_ca_path())?;
    let pool = RedisPool::new(&config(redis.url(), Some(ca.clone())))?;
    let script = Script::new("incr_by", INCR_BY);
    let value: i64 = script.call().key("t:tls").arg(4).invoke(&pool).await?;
    assert_eq!(value, 4);

    let wrong = RedisPool::new(&config(
        redis.url().replace("s3cret", "nope"),
        Some(ca.clone()),
    ))?;
    assert!(
        script
            .call()
            .key("t:tls")
            .arg(1)
            .invoke::<i64>(&wrong)
            .await
            .is_err(),
        "a wrong password is refused"
    );
    let untrusted = RedisPool::new(&config(redis.url(), None))?;
    assert!(
        script
            .call()
            .key("t:tls")
            .arg(1)
            .invoke::<i64>(&untrusted)
            .await
            .is_err(),
        "a certificate from an unknown CA is refused"
    );
    Ok(())
}
