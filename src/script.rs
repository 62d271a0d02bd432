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
            keys: Flat::default(),
            args: Flat::default(),
        }
    }
}

/// One invocation of a [`Script`] being assembled.
#[derive(Debug)]
pub struct Call<'s> {
    script: &'s Script,
    keys: Flat,
    args: Flat,
}

/// Arguments written end to end into one buffer: no allocation per argument (a batched call
/// carries hundreds of them), copied once more into the command.
#[derive(Debug, Default)]
struct Flat {
    bytes: Vec<u8>,
    /// Where each argument ends in `bytes`.
    ends: Vec<usize>,
}

impl Flat {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let arg = &self.bytes[start..end];
            start = end;
            arg
        })
    }
}

impl redis::RedisWrite for Flat {
    fn write_arg(&mut self, arg: &[u8]) {
        self.bytes.extend_from_slice(arg);
        self.ends.push(self.bytes.len());
    }

    fn write_arg_fmt(&mut self, arg: impl std::fmt::Display) {
        use std::io::Write;
        // Writing into a Vec cannot fail.
        let _ = write!(self.writer_for_next_arg(), "{arg}");
    }

    fn writer_for_next_arg(&mut self) -> impl std::io::Write + '_ {
        NextArg(self)
    }
}

/// The argument being written into a [`Flat`]; it ends when this is dropped.
struct NextArg<'a>(&'a mut Flat);

impl std::io::Write for NextArg<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for NextArg<'_> {
    fn drop(&mut self) {
        self.0.ends.push(self.0.bytes.len());
    }
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
        cmd.arg(script).arg(self.keys.len());
        for arg in self.keys.iter().chain(self.args.iter()) {
            cmd.arg(arg);
        }
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
        let epoch = pool.epoch();
        let call = async move {
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
        };
        pool.settle(epoch, call.instrument(span).await)
    }
}

/// A MessagePack array of unsigned integers, for a script to read with `cmsgpack.unpack`: one
/// argument instead of one per number. Redis makes each argument an object and then a Lua
/// string, and the script's `tonumber` parses it with strtod; unpacking hands the script Lua
/// numbers directly. (Lua numbers are doubles: integers past 2^53 lose precision, as they do
/// through `tonumber`.)
#[derive(Debug)]
pub struct PackedNumbers {
    bytes: Vec<u8>,
    announced: usize,
    written: usize,
}

impl PackedNumbers {
    /// An array of exactly `count` numbers, to be pushed one by one.
    pub fn new(count: usize) -> std::result::Result<Self, String> {
        let len = u32::try_from(count).map_err(|_| format!("{count} numbers in one array"))?;
        let mut bytes = Vec::with_capacity(5 + 9 * count);
        // Writing into a Vec cannot fail.
        let _ = rmp::encode::write_array_len(&mut bytes, len);
        Ok(Self {
            bytes,
            announced: count,
            written: 0,
        })
    }

    /// Appends `n` in the fewest bytes MessagePack allows.
    pub fn push(&mut self, n: u64) {
        self.written += 1;
        let _ = rmp::encode::write_uint(&mut self.bytes, n);
    }

    /// The packed array, once exactly the announced count was pushed.
    pub fn finish(self) -> std::result::Result<Vec<u8>, String> {
        if self.written != self.announced {
            return Err(format!(
                "{} numbers packed, {} announced",
                self.written, self.announced
            ));
        }
        Ok(self.bytes)
    }
}

/// The numbers of a script reply packed with `cmsgpack.pack` (a MessagePack array of
/// numbers): one bulk string for the client to parse instead of one RESP value per number,
/// which for replies of many numbers costs the client more than everything else in the call.
/// A number with a fraction is cut toward zero, as Redis cuts a Lua number it replies as an
/// integer.
pub fn unpack_numbers(mut packed: &[u8]) -> std::result::Result<Vec<i64>, String> {
    use rmp::Marker;
    use rmp::decode::RmpRead;
    let bad = |e: &dyn std::fmt::Display| format!("not a MessagePack array of numbers: {e}");
    let rd = &mut packed;
    let n = rmp::decode::read_array_len(rd).map_err(|e| bad(&e))?;
    // Each number takes at least one byte: a length past what is left is corrupt.
    if n as usize > rd.len() {
        return Err(bad(&format!("{n} numbers in {} bytes", rd.len())));
    }
    let mut numbers = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let number = match rmp::decode::read_marker(rd).map_err(|e| bad(&e.0))? {
            Marker::FixPos(v) => i64::from(v),
            Marker::FixNeg(v) => i64::from(v),
            Marker::U8 => i64::from(rd.read_data_u8().map_err(|e| bad(&e))?),
            Marker::U16 => i64::from(rd.read_data_u16().map_err(|e| bad(&e))?),
            Marker::U32 => i64::from(rd.read_data_u32().map_err(|e| bad(&e))?),
            Marker::U64 => {
                let v = rd.read_data_u64().map_err(|e| bad(&e))?;
                i64::try_from(v).map_err(|_| bad(&format!("{v} is out of range")))?
            }
            Marker::I8 => i64::from(rd.read_data_i8().map_err(|e| bad(&e))?),
            Marker::I16 => i64::from(rd.read_data_i16().map_err(|e| bad(&e))?),
            Marker::I32 => i64::from(rd.read_data_i32().map_err(|e| bad(&e))?),
            Marker::I64 => rd.read_data_i64().map_err(|e| bad(&e))?,
            // `as` saturates at the ends and maps NaN to 0.
            Marker::F32 => rd.read_data_f32().map_err(|e| bad(&e))? as i64,
            Marker::F64 => rd.read_data_f64().map_err(|e| bad(&e))? as i64,
            other => return Err(bad(&format!("found {other:?}"))),
        };
        numbers.push(number);
    }
    if !rd.is_empty() {
        return Err(bad(&format!("{} bytes after the array", rd.len())));
    }
    Ok(numbers)
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
    fn packed_numbers_of_every_width_and_fractions_cut_toward_zero() {
        let mut packed = Vec::new();
        let values: [i64; 10] = [
            0,
            127,
            -32,
            -33,
            255,
            65_535,
            1 << 40,
            -(1 << 40),
            i64::MAX,
            i64::MIN,
        ];
        rmp::encode::write_array_len(&mut packed, values.len() as u32 + 2)
            .expect("writing to a Vec");
        for v in values {
            rmp::encode::write_sint(&mut packed, v).expect("writing to a Vec");
        }
        rmp::encode::write_f64(&mut packed, 2.9).expect("writing to a Vec");
        rmp::encode::write_f64(&mut packed, -2.9).expect("writing to a Vec");
        let mut expected = values.to_vec();
        expected.extend([2, -2]);
        assert_eq!(unpack_numbers(&packed), Ok(expected));
        // Unsigned 64-bit values past i64::MAX cannot be answered.
        let mut big = Vec::new();
        rmp::encode::write_array_len(&mut big, 1).expect("writing to a Vec");
        rmp::encode::write_u64(&mut big, u64::MAX).expect("writing to a Vec");
        assert!(unpack_numbers(&big).is_err());
    }

    #[test]
    fn packed_numbers_read_back_and_hold_to_their_count() {
        let values = [
            0,
            1,
            127,
            128,
            255,
            256,
            65_535,
            65_536,
            u64::from(u32::MAX),
            1 << 40,
        ];
        let mut numbers = PackedNumbers::new(values.len()).expect("a small array");
        for v in values {
            numbers.push(v);
        }
        let packed = numbers.finish().expect("all pushed");
        let expected: Vec<i64> = values.iter().map(|&v| v as i64).collect();
        assert_eq!(unpack_numbers(&packed), Ok(expected));
        // Smallest encodings: a one-byte header, one byte for a small number.
        assert_eq!(&packed[..3], &[0x9a, 0x00, 0x01]);
        let mut short = PackedNumbers::new(2).expect("a small array");
        short.push(1);
        assert!(short.finish().is_err(), "fewer numbers than announced");
        let mut long = PackedNumbers::new(0).expect("an empty array");
        long.push(1);
        assert!(long.finish().is_err(), "more numbers than announced");
    }

    #[test]
    fn packed_replies_that_are_not_arrays_of_numbers_are_refused() {
        let mut text = Vec::new();
        rmp::encode::write_array_len(&mut text, 1).expect("writing to a Vec");
        rmp::encode::write_str(&mut text, "1").expect("writing to a Vec");
        let mut short = Vec::new();
        rmp::encode::write_array_len(&mut short, 3).expect("writing to a Vec");
        rmp::encode::write_sint(&mut short, 1).expect("writing to a Vec");
        let mut long = Vec::new();
        rmp::encode::write_array_len(&mut long, 1).expect("writing to a Vec");
        rmp::encode::write_sint(&mut long, 1).expect("writing to a Vec");
        long.push(0);
        for bad in [&b""[..], b"\x01", &text, &short, &long] {
            assert!(unpack_numbers(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_and_arguments_keep_their_boundaries() {
        let script = Script::new("one", "return 1");
        let call = script
            .call()
            .key("k1")
            .key(&b""[..])
            .arg(42u64)
            .arg(-1.5f64)
            .arg(&["a", "bc"][..])
            .arg(&b""[..]);
        let keys: Vec<&[u8]> = call.keys.iter().collect();
        assert_eq!(keys, [&b"k1"[..], b""]);
        let args: Vec<&[u8]> = call.args.iter().collect();
        assert_eq!(args, [&b"42"[..], b"-1.5", b"a", b"bc", b""]);
        let cmd = call.command("EVALSHA", "sha");
        let sent: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => b"<not simple>".to_vec(),
            })
            .collect();
        let expected: [&[u8]; 10] = [
            b"EVALSHA", b"sha", b"2", b"k1", b"", b"42", b"-1.5", b"a", b"bc", b"",
        ];
        assert_eq!(sent, expected);
    }

    #[test]
    fn sha_matches_redis() {
        // SHA1 of "return 1", as SCRIPT LOAD reports it.
        let script = Script::new("one", "return 1");
        assert_eq!(script.sha, "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
    }
}
