//! Credentials for tests of services with auth on: a keys file and a JWT secret, tokens, and
//! channels that present them.

use std::path::PathBuf;

use base64::Engine as _;
use sluice::auth::{Bearer, BearerLayer};
use tonic::transport::Channel;

/// The JWT secret [`Credentials`] writes.
pub const SECRET: &str = "a test secret that is longer than thirty-two bytes";

/// A keys file and a JWT secret file in a directory of their own.
pub struct Credentials {
    dir: tempfile::TempDir,
}

impl Credentials {
    /// (name, key, roles, projects) per key.
    pub fn new(entries: &[(&str, &str, &[&str], &[&str])]) -> anyhow::Result<Self> {
        let this = Self {
            dir: tempfile::tempdir()?,
        };
        this.write_keys(entries)?;
        std::fs::write(this.secret(), SECRET)?;
        Ok(this)
    }

    /// Rewrites the keys file: (name, key, roles, projects) per entry.
    pub fn write_keys(&self, entries: &[(&str, &str, &[&str], &[&str])]) -> anyhow::Result<()> {
        let quoted = |items: &[&str]| {
            items
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let text: String = entries
            .iter()
            .map(|(name, key, roles, projects)| {
                format!(
                    "[[keys]]\nname = {name:?}\nsha256 = {:?}\nroles = [{}]\nprojects = [{}]\n\n",
                    sluice::auth::key_hash(key),
                    quoted(roles),
                    quoted(projects)
                )
            })
            .collect();
        // Written aside and renamed in, as an operator's tooling would: never half a file.
        let staged = self.dir.path().join("keys.toml.new");
        std::fs::write(&staged, text)?;
        std::fs::rename(staged, self.keys())?;
        Ok(())
    }

    /// The keys file.
    pub fn keys(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// The JWT secret file.
    pub fn secret(&self) -> PathBuf {
        self.dir.path().join("jwt.secret")
    }

    /// The keys file, as a flag's value.
    pub fn keys_arg(&self) -> String {
        self.keys().display().to_string()
    }

    /// The secret file, as a flag's value.
    pub fn secret_arg(&self) -> String {
        self.secret().display().to_string()
    }
}

/// An HS256 JWT over `claims`, signed with `secret`.
pub fn jwt(secret: &str, claims: &serde_json::Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let signed = format!(
        "{}.{}",
        b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(claims.to_string())
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, signed.as_bytes());
    format!("{signed}.{}", b64.encode(tag.as_ref()))
}

/// Seconds since the epoch, as JWT claims count them.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A channel to `url` whose calls present `token`.
pub async fn channel_as(url: &str, token: &str) -> anyhow::Result<Bearer<Channel>> {
    let layer = BearerLayer::new(Some(sluice::auth::bearer(token)?));
    Ok(tower::Layer::layer(
        &layer,
        crate::probe::channel(url).await?,
    ))
}
