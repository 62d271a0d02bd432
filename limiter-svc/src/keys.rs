//! Every Redis key limiter-svc touches is named here, and nowhere else.
//!
//! Hash-tag rule: a counter key is `sluice:rl:{<scope>:<subject>}:<policy>:<algorithm>`. The
//! tag is the scope and the (encoded) subject, so every counter of one subject lives in one
//! slot of a Redis Cluster whatever its policy. Scopes are validated to `[A-Za-z0-9_.-]`;
//! subjects are percent-encoded outside `[A-Za-z0-9_.@-]`, so no user-chosen name can contain
//! `{`, `}` or `:` and reach another tenant's keys or break the tag.

use crate::algorithm::Algorithm;

/// The key of one counter.
pub fn counter(scope: &str, subject: &str, policy: &str, algorithm: Algorithm) -> String {
    let mut key = String::with_capacity(24 + scope.len() + subject.len() + policy.len());
    key.push_str("sluice:rl:{");
    key.push_str(scope);
    key.push(':');
    encode_into(subject, &mut key);
    key.push_str("}:");
    key.push_str(policy);
    key.push(':');
    key.push_str(algorithm.short());
    key
}

/// Bytes allowed as they are in scope and policy names.
pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
}

fn encode_into(subject: &str, out: &mut String) {
    for b in subject.bytes() {
        if is_name_byte(b) || b == b'@' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The Redis Cluster slot of `key` (CRC16/XMODEM of its hash tag, mod 16384).
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            bytes[open + 1..]
                .iter()
                .position(|&b| b == b'}')
                .filter(|&len| len > 0)
                .map(|len| &bytes[open + 1..open + 1 + len])
        })
        .unwrap_or(bytes);
    crc16(tagged) % 16384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_cannot_break_the_hash_tag() {
        let key = counter("user", "a}:{b c", "p", Algorithm::Gcra);
        assert_eq!(key, "sluice:rl:{user:a%7D%3A%7Bb%20c}:p:gcra");
        assert_eq!(key.matches('{').count(), 1);
        assert_eq!(key.matches('}').count(), 1);
    }

    #[test]
    fn slots_match_redis() {
        // Values from CLUSTER KEYSLOT.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("a{}b"), slot("a{}b"));
    }
}
