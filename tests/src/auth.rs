//! Credentials for tests of services with auth or TLS on: a keys file and a JWT secret, tokens,
//! certificates made by openssl, and channels that present them.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

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

/// Makes a key pair with openssl in `dir`: `{name}.key` (PKCS#8 PEM) and `{name}.pub` (PEM
/// SubjectPublicKeyInfo); `rsa` (2048 bits) or else EC P-256.
pub fn key_pair(dir: &Path, name: &str, rsa: bool) -> anyhow::Result<()> {
    let (key, public) = (format!("{name}.key"), format!("{name}.pub"));
    let kind = if rsa {
        ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    } else {
        ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    };
    let mut generate = vec!["genpkey"];
    generate.extend(kind);
    generate.extend(["-out", key.as_str()]);
    let steps = [
        generate,
        vec![
            "pkey",
            "-in",
            key.as_str(),
            "-pubout",
            "-out",
            public.as_str(),
        ],
    ];
    openssl(dir, steps)
}

/// Runs `openssl` with each of `steps` in `dir`, stopping at the first that fails.
fn openssl<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(
    dir: &Path,
    steps: impl IntoIterator<Item = Vec<S>>,
) -> anyhow::Result<()> {
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .context("running openssl (.ci/run installs it)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A JWT over `claims` signed with the PKCS#8 PEM private key at `key`: RS256 for an RSA key,
/// ES256 for a P-256 one.
pub fn jwt_signed_by(key: &Path, rsa: bool, claims: &serde_json::Value) -> anyhow::Result<String> {
    let pem = std::fs::read_to_string(key)?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(body)?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg = if rsa { "RS256" } else { "ES256" };
    let signed = format!(
        "{}.{}",
        b64.encode(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
        b64.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let signature = if rsa {
        let pair = ring::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| anyhow::anyhow!("RSA key: {e}"))?;
        let mut signature = vec![0; pair.public().modulus_len()];
        pair.sign(
            &ring::signature::RSA_PKCS1_SHA256,
            &rng,
            signed.as_bytes(),
            &mut signature,
        )
        .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        signature
    } else {
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
            &rng,
        )
        .map_err(|e| anyhow::anyhow!("EC key: {e}"))?;
        pair.sign(&rng, signed.as_bytes())
            .map_err(|e| anyhow::anyhow!("signing: {e}"))?
            .as_ref()
            .to_vec()
    };
    Ok(format!("{signed}.{}", b64.encode(signature)))
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

/// Makes a CA (`{ca}.key`, `{ca}.crt`, "Sluice test CA {ca}") in `dir`, and for each of
/// `leaves` a key and a certificate it signs (`{leaf}.key`, `{leaf}.crt`), valid for 127.0.0.1
/// and localhost, as servers and clients, for two days.
pub fn issue_certificates(dir: &Path, ca: &str, leaves: &[&str]) -> anyhow::Result<()> {
    let ext = format!("{ca}-ext.cnf");
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )?;
    let file = |name: &str, suffix: &str| format!("{name}.{suffix}");
    let mut steps: Vec<Vec<String>> = vec![
        vec![
            "genrsa".into(),
            "-out".into(),
            file(ca, "key"),
            "2048".into(),
        ],
        [
            "req", "-x509", "-new", "-nodes", "-sha256", "-days", "2", "-key",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([
            file(ca, "key"),
            "-subj".into(),
            format!("/CN=Sluice test CA {ca}"),
            "-out".into(),
            file(ca, "crt"),
        ])
        .collect(),
    ];
    for leaf in leaves {
        steps.push(vec![
            "genrsa".into(),
            "-out".into(),
            file(leaf, "key"),
            "2048".into(),
        ]);
        steps.push(vec![
            "req".into(),
            "-new".into(),
            "-key".into(),
            file(leaf, "key"),
            "-subj".into(),
            format!("/CN={leaf}"),
            "-out".into(),
            file(leaf, "csr"),
        ]);
        steps.push(vec![
            "x509".into(),
            "-req".into(),
            "-in".into(),
            file(leaf, "csr"),
            "-CA".into(),
            file(ca, "crt"),
            "-CAkey".into(),
            file(ca, "key"),
            "-CAcreateserial".into(),
            "-out".into(),
            file(leaf, "crt"),
            "-days".into(),
            "2".into(),
            "-sha256".into(),
            "-extfile".into(),
            ext.clone(),
        ]);
    }
    openssl(dir, steps)
}

/// A directory of certificates; `file("server.crt")` names one.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// An empty directory.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            dir: tempfile::tempdir()?,
        })
    }

    /// A CA and leaves it signs, see [`issue_certificates`].
    pub fn issue(&self, ca: &str, leaves: &[&str]) -> anyhow::Result<()> {
        issue_certificates(self.dir.path(), ca, leaves)
    }

    /// The path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The same, as a flag's value.
    pub fn arg(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }
}

/// A TLS channel to `url` trusting `ca`, presenting `identity` (cert, key) when given.
pub async fn tls_channel(
    url: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Channel> {
    let tls = sluice::tls::client_config(Some(ca), identity)?;
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await?)
}
