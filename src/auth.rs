//! Who may call what: credentials in a call's metadata, mapped to projects and roles.
//!
//! A caller sends `authorization: Bearer <token>`. The token is either an API key, listed by
//! its SHA-256 in the keys file (`--auth-keys`), or a JWT: signed with HS256 under the secret in
//! `--auth-jwt-secret`, or with RS256 / ES256 by a key whose public half is in
//! `--auth-jwt-public-keys` (an identity provider's). Either way it stands for an [`Identity`]: a name, the roles it holds
//! (producer, worker, admin) and the projects it may touch (`*`: every project).
//!
//! The server checks the role a method needs before the call reaches its handler (each service
//! gives an [`Access`] per method); handlers check the projects a request names with
//! [`Identity::grant`]. Health checking and reflection need no credentials. With `--no-auth` every call
//! acts as [`Identity::anyone`].
//!
//! The keys file:
//!
//! ```toml
//! [[keys]]
//! name = "checkout-web"                  # shown in logs and in PERMISSION_DENIED messages
//! sha256 = "9f86d081884c7d65...0f00a08"  # of the key; `sluice key new` makes both
//! roles = ["producer"]                   # producer, worker, admin
//! projects = ["checkout"]                # or ["*"]
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// A role credentials may hold; admin holds every other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Submits and inspects tasks, checks limits.
    Producer,
    /// Leases and finishes tasks.
    Worker,
    /// Everything, including operator calls (pause, dead letters, limit resets).
    Admin,
}

impl Role {
    const ALL: [Self; 3] = [Self::Producer, Self::Worker, Self::Admin];

    /// The role's name in keys files, tokens and messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Producer => "producer",
            Self::Worker => "worker",
            Self::Admin => "admin",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == name)
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: health checking and reflection answer anyone.
    Open,
    /// Valid credentials, whatever their roles.
    Authenticated,
    /// Credentials holding one of these roles (or admin).
    Roles(&'static [Role]),
}

/// How a service says what each of its methods (by name, e.g. `Enqueue`) needs; `None` for a
/// name that is none of its methods, which the server answers UNIMPLEMENTED before any auth
/// check (so a method left out of the list is refused, never served unchecked, and callers
/// probing made-up names all count under one metric label).
pub type AccessFn = fn(&str) -> Option<Access>;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Projects {
    All,
    Only(HashSet<String>),
}

/// Who is calling: the name of their credentials, their roles and their projects. The server
/// puts an `Arc<Identity>` in every authenticated call's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    name: String,
    roles: u8,
    projects: Projects,
}

impl Identity {
    /// Credentials named `name` holding `roles` on `projects` (`*` among them: every project).
    pub fn new<'a>(
        name: impl Into<String>,
        roles: impl IntoIterator<Item = Role>,
        projects: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut only = HashSet::new();
        let mut all = false;
        for project in projects {
            if project == "*" {
                all = true;
            } else {
                only.insert(project.to_owned());
            }
        }
        Self {
            name: name.into(),
            roles: roles.into_iter().fold(0, |bits, r| bits | r.bit()),
            projects: if all {
                Projects::All
            } else {
                Projects::Only(only)
            },
        }
    }

    /// Every role on every project: what each call is when auth is off.
    pub fn anyone() -> Arc<Self> {
        static ANYONE: std::sync::OnceLock<Arc<Identity>> = std::sync::OnceLock::new();
        Arc::clone(
            ANYONE.get_or_init(|| Arc::new(Self::new("anyone (auth off)", Role::ALL, ["*"]))),
        )
    }

    /// The credentials' name (never the secret).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether these credentials hold `role` (admin holds them all).
    pub fn holds(&self, role: Role) -> bool {
        self.roles & (role.bit() | Role::Admin.bit()) != 0
    }

    /// Whether these credentials may touch `project`.
    pub fn may_use(&self, project: &str) -> bool {
        match &self.projects {
            Projects::All => true,
            Projects::Only(projects) => projects.contains(project),
        }
    }

    /// PERMISSION_DENIED, naming the request's `field`, unless these credentials may touch
    /// `project`. Handlers call it once the name itself is valid.
    pub fn grant(&self, field: &str, project: &str) -> Result<(), Status> {
        if self.may_use(project) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{field}: the credentials {:?} do not grant project {project:?}; use credentials \
             that list it",
            self.name
        )))
    }

    /// PERMISSION_DENIED unless these credentials meet `access` for `method`.
    pub(crate) fn admit(&self, access: Access, method: &str) -> Result<(), Status> {
        match access {
            Access::Open | Access::Authenticated => Ok(()),
            Access::Roles(roles) if roles.iter().any(|r| self.holds(*r)) => Ok(()),
            Access::Roles(roles) => {
                let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
                // The caller authenticated: the fix is other credentials, not a retry.
                Err(Status::permission_denied(format!(
                    "{method} needs the {} role; the credentials {:?} do not hold it",
                    names.join(" or "),
                    self.name
                )))
            }
        }
    }
}

/// A call's credentials as presented, kept so that a long-lived call (a Lease stream) can check
/// them again: a key removed from the file or a token past its `exp` ends it. The server puts
/// one in every guarded call's extensions.
#[derive(Debug, Clone)]
pub struct Presented {
    auth: Auth,
    authorization: Option<http::HeaderValue>,
}

impl Presented {
    /// Checks the credentials again, as for a new call to `method` needing one of `roles`, on
    /// `project` (named by the request's `field`).
    pub fn recheck(
        &self,
        method: &str,
        roles: &'static [Role],
        field: &str,
        project: &str,
    ) -> Result<(), Status> {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = &self.authorization {
            headers.insert(http::header::AUTHORIZATION, value.clone());
        }
        let who = self.auth.authenticate(&headers)?;
        who.admit(Access::Roles(roles), method)?;
        who.grant(field, project)
    }
}

/// The identity the server found for `request`. A call that reached a handler without one did
/// not come through the server's guard: refused, never let through.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Arc<Identity>, Status> {
    request
        .extensions()
        .get::<Arc<Identity>>()
        .cloned()
        .ok_or_else(|| Status::permission_denied("the call carries no identity"))
}

/// How often the services reread their credential files.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Longest `authorization` value read; API keys and tokens are far shorter.
const MAX_CREDENTIALS: usize = 8 * 1024;

/// Clock skew allowed on a JWT's `exp` and `nbf`.
const JWT_LEEWAY_SECS: f64 = 30.0;

/// Shortest HS256 secret accepted (the hash's output size, as RFC 7518 asks).
const MIN_JWT_SECRET: usize = 32;

/// The server's side of auth: off, or the credentials it accepts (reloaded from their files).
#[derive(Debug, Clone)]
pub enum Auth {
    /// Every call is [`Identity::anyone`] (`--no-auth`).
    Off,
    /// Calls need credentials.
    On(Arc<Verifier>),
}

/// The accepted credentials, swapped whole when their files change.
#[derive(Debug)]
pub struct Verifier {
    sources: Sources,
    current: RwLock<Arc<Credentials>>,
}

/// Where the credentials come from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The API keys file.
    pub keys: Option<PathBuf>,
    /// The HS256 secret file.
    pub jwt_secret: Option<PathBuf>,
    /// PEM public keys (RSA, EC P-256) of RS256 / ES256 tokens.
    pub jwt_public_keys: Option<PathBuf>,
    /// A JWT's `iss` must be this, when set.
    pub jwt_issuer: Option<String>,
    /// A JWT's `aud` must name this, when set.
    pub jwt_audience: Option<String>,
}

struct Credentials {
    /// SHA-256 of each key → who it is.
    keys: HashMap<[u8; 32], Arc<Identity>>,
    /// `None`: no JWT is accepted.
    jwt: Option<JwtKeys>,
    /// JWTs already verified against these credentials (an RSA signature costs tens of
    /// microseconds; a client sends the same token on every call): SHA-256 of the token → who
    /// it is and its `exp`. Dropped with the credentials on a reload.
    verified: std::sync::Mutex<Verified>,
    /// The files' bytes these were read from, to tell a change.
    read: Read,
}

/// SHA-256 of a verified JWT → who it is and its `exp`.
type Verified = HashMap<[u8; 32], (Arc<Identity>, f64)>;

/// Most verified JWTs remembered; past it the memory starts over.
const MAX_VERIFIED: usize = 10_000;

/// The keys, secret, and public keys files' bytes (empty when not set).
type Read = [Vec<u8>; 3];

/// What JWT signatures are checked with. Each `alg` has its own keys, so a token cannot pass
/// one kind of key off as another (an HS256 token is never checked against a public key).
#[derive(Default)]
struct JwtKeys {
    hs256: Option<ring::hmac::Key>,
    /// RSAPublicKey DER of each RSA key (RS256).
    rs256: Vec<Vec<u8>>,
    /// Uncompressed points of each P-256 key (ES256).
    es256: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("keys", &self.keys.len())
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Auth on with the credentials in `sources` (read now: a bad file is an error here).
    pub fn load(sources: Sources) -> Result<Self, crate::Error> {
        if sources.keys.is_none()
            && sources.jwt_secret.is_none()
            && sources.jwt_public_keys.is_none()
        {
            return Err(crate::Error::invalid(
                "auth-keys",
                "auth is on unless --no-auth is given: name an API keys file (--auth-keys) \
                 and/or JWT keys (--auth-jwt-secret, --auth-jwt-public-keys)",
            ));
        }
        let credentials = Credentials::read(&sources)?;
        Ok(Self::On(Arc::new(Verifier {
            sources,
            current: RwLock::new(Arc::new(credentials)),
        })))
    }

    /// What a guarded call carries for [`Presented::recheck`].
    pub(crate) fn presented(&self, headers: &http::HeaderMap) -> Presented {
        Presented {
            auth: self.clone(),
            authorization: match self {
                Self::Off => None,
                Self::On(_) => headers.get(http::header::AUTHORIZATION).cloned(),
            },
        }
    }

    /// Who sent `headers`: [`Identity::anyone`] when auth is off, else the identity of the
    /// bearer token, or UNAUTHENTICATED saying what is wrong with it.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Arc<Identity>, Status> {
        let Self::On(verifier) = self else {
            return Ok(Identity::anyone());
        };
        let value = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
            Status::unauthenticated(
                "this server needs credentials: send `authorization: Bearer <API key or JWT>` \
                 metadata",
            )
        })?;
        if value.len() > MAX_CREDENTIALS {
            return Err(Status::unauthenticated(format!(
                "the authorization metadata is longer than {MAX_CREDENTIALS} bytes"
            )));
        }
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("the authorization metadata must read `Bearer <token>`")
            })?;
        let credentials = verifier.credentials();
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut hash = [0; 32];
        hash.copy_from_slice(digest.as_ref());
        if token.bytes().filter(|b| *b == b'.').count() == 2
            && let Some(keys) = &credentials.jwt
        {
            return credentials.jwt_identity(keys, &verifier.sources, token, hash);
        }
        credentials
            .keys
            .get(&hash)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the API key is not known here"))
    }

    /// Rereads the credential files every `interval` until `shutdown`, taking what changed. A
    /// file that no longer reads or parses is logged and the credentials in force stay.
    pub async fn watch(self, interval: Duration, shutdown: CancellationToken) {
        if let Self::On(verifier) = self {
            crate::shutdown::every(interval, &shutdown, || verifier.reload()).await;
        }
    }
}

impl Verifier {
    fn credentials(&self) -> Arc<Credentials> {
        // A poisoned lock still holds a whole set of credentials: swaps replace the Arc only.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads the files again; swaps the credentials in when they changed and parse.
    pub fn reload(&self) {
        let before = self.credentials();
        let read = match read_sources(&self.sources) {
            Ok(read) if read == before.read => return,
            Ok(read) => read,
            Err(err) => {
                tracing::error!(error = %err, "credential files unreadable; the credentials in force stay");
                return;
            }
        };
        match Credentials::parse(&self.sources, read) {
            Ok(credentials) => {
                tracing::info!(
                    keys = credentials.keys.len(),
                    jwt = credentials.jwt.is_some(),
                    "credentials reloaded"
                );
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(credentials);
            }
            Err(err) => {
                tracing::error!(error = %err, "credential files rejected; the credentials in force stay");
            }
        }
    }
}

fn read_sources(sources: &Sources) -> Result<Read, crate::Error> {
    let read = |path: &Option<PathBuf>, option: &str| match path {
        Some(path) => std::fs::read(path)
            .map_err(|e| crate::Error::invalid(option, format!("{}: {e}", path.display()))),
        None => Ok(Vec::new()),
    };
    Ok([
        read(&sources.keys, "auth-keys")?,
        read(&sources.jwt_secret, "auth-jwt-secret")?,
        read(&sources.jwt_public_keys, "auth-jwt-public-keys")?,
    ])
}

impl Credentials {
    /// Who the JWT `token` (whose SHA-256 is `hash`) stands for: remembered once verified, its
    /// `exp` checked on every call.
    fn jwt_identity(
        &self,
        keys: &JwtKeys,
        sources: &Sources,
        token: &str,
        hash: [u8; 32],
    ) -> Result<Arc<Identity>, Status> {
        let now = unix_now();
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((who, exp)) = verified.get(&hash) {
            if now <= exp + JWT_LEEWAY_SECS {
                return Ok(Arc::clone(who));
            }
            verified.remove(&hash);
            return Err(Status::unauthenticated("JWT refused: it has expired (exp)"));
        }
        // Verified without the lock held: other calls' tokens are not kept waiting.
        drop(verified);
        let (who, exp) = verify_jwt(keys, sources, token)?;
        let who = Arc::new(who);
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= MAX_VERIFIED {
            verified.clear();
        }
        verified.insert(hash, (Arc::clone(&who), exp));
        Ok(who)
    }

    fn read(sources: &Sources) -> Result<Self, crate::Error> {
        Self::parse(sources, read_sources(sources)?)
    }

    fn parse(sources: &Sources, read: Read) -> Result<Self, crate::Error> {
        let keys = match &sources.keys {
            Some(path) => parse_keys(path, &read[0])?,
            None => HashMap::new(),
        };
        let hs256 = match &sources.jwt_secret {
            Some(path) => {
                // A file written by a text editor or `echo` ends in a newline that is not part
                // of the secret; every other byte is.
                let secret = read[1].as_slice();
                let secret = secret
                    .strip_suffix(b"\r\n")
                    .or_else(|| secret.strip_suffix(b"\n"))
                    .unwrap_or(secret);
                if secret.len() < MIN_JWT_SECRET {
                    return Err(crate::Error::invalid(
                        "auth-jwt-secret",
                        format!(
                            "{}: an HS256 secret needs at least {MIN_JWT_SECRET} bytes, this \
                             one has {}",
                            path.display(),
                            secret.len()
                        ),
                    ));
                }
                Some(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret))
            }
            None => None,
        };
        let mut jwt = JwtKeys {
            hs256,
            ..JwtKeys::default()
        };
        if let Some(path) = &sources.jwt_public_keys {
            parse_public_keys(&read[2], &mut jwt).map_err(|reason| {
                crate::Error::invalid(
                    "auth-jwt-public-keys",
                    format!("{}: {reason}", path.display()),
                )
            })?;
        }
        let any = jwt.hs256.is_some() || !jwt.rs256.is_empty() || !jwt.es256.is_empty();
        Ok(Self {
            keys,
            jwt: any.then_some(jwt),
            verified: std::sync::Mutex::new(HashMap::new()),
            read,
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    roles: Vec<String>,
    projects: Vec<String>,
}

/// Longest credentials name.
const MAX_NAME: usize = 128;

fn parse_keys(path: &Path, text: &[u8]) -> Result<HashMap<[u8; 32], Arc<Identity>>, crate::Error> {
    let fail = |reason: String| {
        crate::Error::invalid("auth-keys", format!("{}: {reason}", path.display()))
    };
    let text = std::str::from_utf8(text).map_err(|e| fail(e.to_string()))?;
    let file: KeysFile = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
    let mut keys = HashMap::new();
    let mut names = HashSet::new();
    for (i, entry) in file.keys.iter().enumerate() {
        let at = |field: &str, reason: String| fail(format!("keys[{i}].{field}: {reason}"));
        if entry.name.is_empty() || entry.name.len() > MAX_NAME {
            return Err(at("name", format!("must be 1 to {MAX_NAME} bytes")));
        }
        if !names.insert(entry.name.as_str()) {
            return Err(at("name", format!("{:?} is listed twice", entry.name)));
        }
        let hash = parse_sha256(&entry.sha256).ok_or_else(|| {
            at(
                "sha256",
                "must be 64 hex digits: the SHA-256 of the key (`sluice key hash`)".into(),
            )
        })?;
        let roles = parse_roles(&entry.roles).map_err(|reason| at("roles", reason))?;
        let projects = parse_projects(&entry.projects).map_err(|reason| at("projects", reason))?;
        let identity = Identity::new(entry.name.clone(), roles, projects);
        if keys.insert(hash, Arc::new(identity)).is_some() {
            return Err(at("sha256", "the same key is listed twice".into()));
        }
    }
    Ok(keys)
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| char::from(c).to_digit(16);
        *byte = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// Most roles or projects one set of credentials lists.
const MAX_LISTED: usize = 1024;

fn parse_roles(names: &[String]) -> Result<Vec<Role>, String> {
    if names.is_empty() || names.len() > MAX_LISTED {
        return Err("list 1 or more of producer, worker, admin".into());
    }
    names
        .iter()
        .map(|n| {
            Role::parse(n).ok_or_else(|| {
                format!("unknown role {n:?}; the roles are producer, worker and admin")
            })
        })
        .collect()
}

fn parse_projects(names: &[String]) -> Result<Vec<&str>, String> {
    if names.is_empty() || names.len() > MAX_LISTED {
        return Err(format!(
            "list 1 to {MAX_LISTED} project names, or \"*\" for every project"
        ));
    }
    names
        .iter()
        .map(|n| {
            let fits = n == "*"
                || (!n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
            if fits {
                Ok(n.as_str())
            } else {
                Err(format!(
                    "{n:?} is not a project name (1 to 64 of A-Z a-z 0-9 _ . -) nor \"*\""
                ))
            }
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct JwtHeader {
    alg: String,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
    nbf: Option<f64>,
    iss: Option<String>,
    aud: Option<Audience>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    projects: Vec<String>,
}

/// Reads the PEM public keys (SubjectPublicKeyInfo, `-----BEGIN PUBLIC KEY-----`) of `pem`:
/// RSA keys of 2048 to 8192 bits for RS256, P-256 keys for ES256. Any other PEM block (a
/// certificate, a PKCS#1 `RSA PUBLIC KEY`), key kind or malformed key is an error, so a bad
/// file never replaces working keys.
fn parse_public_keys(pem: &[u8], jwt: &mut JwtKeys) -> Result<(), String> {
    use rustls::pki_types::pem::{PemObject as _, SectionKind};
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    const EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    for (i, section) in <(SectionKind, Vec<u8>)>::pem_slice_iter(pem).enumerate() {
        let (kind, spki) = section.map_err(|e| format!("block {i}: not PEM: {e}"))?;
        if kind != SectionKind::PublicKey {
            return Err(format!(
                "block {i} is a {kind:?}: write each key as a `PUBLIC KEY` block \
                 (openssl pkey -pubout)"
            ));
        }
        let malformed = || format!("block {i}: malformed SubjectPublicKeyInfo");
        let element = |input, tag| match der(input) {
            Some((found, contents, rest)) if found == tag => Ok((contents, rest)),
            _ => Err(malformed()),
        };
        let (body, after) = element(&spki, 0x30)?;
        let (algorithm, rest) = element(body, 0x30)?;
        let (bits, trailing) = element(rest, 0x03)?;
        let (oid, params) = element(algorithm, 0x06)?;
        let key = match bits.split_first() {
            Some((0, key)) if after.is_empty() && trailing.is_empty() => key.to_vec(),
            _ => return Err(malformed()),
        };
        match oid {
            RSA => {
                // RSAPublicKey: SEQUENCE { modulus INTEGER, publicExponent INTEGER }.
                let (fields, rest) = element(&key, 0x30)?;
                let (modulus, exponent) = element(fields, 0x02)?;
                let (_, end) = element(exponent, 0x02)?;
                let bits = modulus.iter().skip_while(|b| **b == 0).count() * 8;
                if !rest.is_empty() || !end.is_empty() || !(2048..=8192).contains(&bits) {
                    return Err(format!("block {i}: an RSA key must have 2048 to 8192 bits"));
                }
                jwt.rs256.push(key);
            }
            EC if element(params, 0x06)
                .is_ok_and(|(curve, rest)| curve == P256 && rest.is_empty()) =>
            {
                if key.len() != 65 || key[0] != 4 {
                    return Err(format!(
                        "block {i}: a P-256 key must be an uncompressed point"
                    ));
                }
                jwt.es256.push(key);
            }
            _ => {
                return Err(format!(
                    "block {i}: only RSA and EC P-256 public keys are read"
                ));
            }
        }
    }
    if jwt.rs256.is_empty() && jwt.es256.is_empty() {
        return Err("holds no PEM public key".into());
    }
    Ok(())
}

/// One DER element of `input`: (tag, contents, what follows). Definite lengths up to 4 bytes.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(n)?;
        let len = bytes
            .iter()
            .fold(0usize, |len, b| (len << 8) | usize::from(*b));
        (len, rest)
    };
    let (contents, rest) = rest.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// Seconds since the epoch by this host's clock, as JWT claims count them.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The identity a JWT stands for, and its `exp`: `sub` names it, `roles` and `projects` list
/// what it holds; `exp` is required. The signature is checked with the keys of its `alg` only.
fn verify_jwt(keys: &JwtKeys, sources: &Sources, token: &str) -> Result<(Identity, f64), Status> {
    let refuse = |why: &str| Status::unauthenticated(format!("JWT refused: {why}"));
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let Some((signed, signature)) = token.rsplit_once('.') else {
        return Err(refuse("not three dot-separated parts"));
    };
    let Some((header, claims)) = signed.split_once('.') else {
        return Err(refuse("not three dot-separated parts"));
    };
    let header: JwtHeader = b64
        .decode(header)
        .ok()
        .and_then(|h| serde_json::from_slice(&h).ok())
        .ok_or_else(|| refuse("the header is not base64url JSON"))?;
    let signature = b64
        .decode(signature)
        .map_err(|_| refuse("the signature is not base64url"))?;
    let public = |algorithm: &'static dyn ring::signature::VerificationAlgorithm,
                  keys: &[Vec<u8>]| {
        keys.iter().any(|key| {
            ring::signature::UnparsedPublicKey::new(algorithm, key)
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        })
    };
    let verified = match header.alg.as_str() {
        "HS256" => match &keys.hs256 {
            Some(key) => ring::hmac::verify(key, signed.as_bytes(), &signature).is_ok(),
            None => return Err(refuse("HS256 is not accepted here (no --auth-jwt-secret)")),
        },
        "RS256" if !keys.rs256.is_empty() => {
            public(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &keys.rs256)
        }
        "ES256" if !keys.es256.is_empty() => {
            public(&ring::signature::ECDSA_P256_SHA256_FIXED, &keys.es256)
        }
        "RS256" | "ES256" => return Err(refuse("no public key of that kind is configured")),
        _ => return Err(refuse("alg must be HS256, RS256 or ES256")),
    };
    if !verified {
        return Err(refuse("the signature does not match"));
    }
    let claims: Claims = b64
        .decode(claims)
        .ok()
        .and_then(|c| serde_json::from_slice(&c).ok())
        .ok_or_else(|| refuse("the claims are not base64url JSON of the expected shape"))?;
    let now = unix_now();
    let exp = claims
        .exp
        .ok_or_else(|| refuse("the exp claim is required"))?;
    if now > exp + JWT_LEEWAY_SECS {
        return Err(refuse("it has expired (exp)"));
    }
    if claims.nbf.is_some_and(|nbf| now + JWT_LEEWAY_SECS < nbf) {
        return Err(refuse("it is not valid yet (nbf)"));
    }
    if let Some(issuer) = &sources.jwt_issuer
        && claims.iss.as_ref() != Some(issuer)
    {
        return Err(refuse("the iss claim is not the issuer this server trusts"));
    }
    if let Some(audience) = &sources.jwt_audience {
        let named = match &claims.aud {
            Some(Audience::One(aud)) => aud == audience,
            Some(Audience::Many(auds)) => auds.contains(audience),
            None => false,
        };
        if !named {
            return Err(refuse("the aud claim does not name this server"));
        }
    }
    let sub = claims
        .sub
        .filter(|s| !s.is_empty() && s.len() <= MAX_NAME)
        .ok_or_else(|| refuse("the sub claim must name the caller (1 to 128 bytes)"))?;
    let roles = parse_roles(&claims.roles).map_err(|why| refuse(&format!("roles: {why}")))?;
    let projects =
        parse_projects(&claims.projects).map_err(|why| refuse(&format!("projects: {why}")))?;
    Ok((Identity::new(sub, roles, projects), exp))
}

/// A bearer token (an API key or a JWT) taken from a flag or the environment; `Debug` shows no
/// secret.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// The `authorization` value that presents this token.
    pub fn bearer(&self) -> Result<http::HeaderValue, crate::Error> {
        bearer(&self.0)
    }
}

impl std::str::FromStr for Token {
    type Err = std::convert::Infallible;

    fn from_str(token: &str) -> Result<Self, Self::Err> {
        Ok(Self(token.to_owned()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Checks a keys file's text as the services would read it; the number of keys it lists.
pub fn check_keys_file(text: &str) -> Result<usize, crate::Error> {
    parse_keys(Path::new("keys file"), text.as_bytes()).map(|keys| keys.len())
}

/// The `authorization` value that presents `token`; an error when the token cannot be sent as
/// metadata.
pub fn bearer(token: &str) -> Result<http::HeaderValue, crate::Error> {
    let mut value = http::HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| crate::Error::invalid("api-key", "must be visible ASCII"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Tower layer for gRPC clients: sends the credentials on every call.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:50052").connect().await?;
/// let channel = tower::ServiceBuilder::new()
///     .layer(sluice::auth::BearerLayer::new(Some(sluice::auth::bearer("sk_...")?)))
///     .service(channel);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct BearerLayer {
    value: Option<http::HeaderValue>,
}

impl BearerLayer {
    /// Sends `value` as `authorization` (`None`: sends nothing, for servers with auth off).
    pub fn new(value: Option<http::HeaderValue>) -> Self {
        Self { value }
    }
}

impl<S> tower::Layer<S> for BearerLayer {
    type Service = Bearer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Bearer {
            inner,
            value: self.value.clone(),
        }
    }
}

/// The service [`BearerLayer`] builds.
#[derive(Debug, Clone)]
pub struct Bearer<S> {
    inner: S,
    value: Option<http::HeaderValue>,
}

impl<S, B> tower::Service<http::Request<B>> for Bearer<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(value) = &self.value {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        self.inner.call(request)
    }
}

/// A new random API key (32 bytes from the system's secure generator, base64url, prefixed
/// `sk_` so secret scanners can spot it) and its SHA-256 in hex, as the keys file lists it.
pub fn new_key() -> Result<(String, String), crate::Error> {
    let mut bytes = [0; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| crate::Error::Internal("the system's random generator failed".into()))?;
    let key = format!(
        "sk_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = key_hash(&key);
    Ok((key, hash))
}

/// The SHA-256 of `key` in lowercase hex: its `sha256` in the keys file.
pub fn key_hash(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).expect("ascii"),
        );
        headers
    }

    fn sign(secret: &[u8], header: &str, claims: &serde_json::Value) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signed = format!("{}.{}", b64.encode(header), b64.encode(claims.to_string()));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, signed.as_bytes());
        format!("{signed}.{}", b64.encode(tag.as_ref()))
    }

    fn unix_now() -> f64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64()
    }

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().expect("temp dir"),
            }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    #[test]
    fn api_keys_map_to_their_roles_and_projects() {
        let files = Files::new();
        let (key, hash) = new_key().expect("key");
        let keys = files.write(
            "keys.toml",
            &format!(
                "[[keys]]\nname = \"web\"\nsha256 = \"{hash}\"\nroles = [\"producer\"]\nprojects = [\"shop\"]\n"
            ),
        );
        let auth = Auth::load(Sources {
            keys: Some(keys),
            ..Sources::default()
        })
        .expect("loads");
        let who = auth
            .authenticate(&headers(&format!("Bearer {key}")))
            .expect("known key");
        assert_eq!(who.name(), "web");
        assert!(who.holds(Role::Producer) && !who.holds(Role::Worker));
        assert!(who.may_use("shop") && !who.may_use("other"));
        assert!(
            who.admit(Access::Roles(&[Role::Worker]), "Dequeue")
                .is_err()
        );
        for bad in ["", "Bearer ", "Basic abc", "Bearer sk_unknown"] {
            let status = if bad.is_empty() {
                auth.authenticate(&http::HeaderMap::new())
            } else {
                auth.authenticate(&headers(bad))
            }
            .expect_err(bad);
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad}");
        }
    }

    #[test]
    fn bad_keys_files_are_refused_with_the_entry_named() {
        let files = Files::new();
        let cases = [
            (
                "sha256 = \"abc\"\nroles = [\"producer\"]\nprojects = [\"p\"]",
                "keys[0].sha256",
            ),
            (
                "sha256 = \"{h}\"\nroles = [\"boss\"]\nprojects = [\"p\"]",
                "keys[0].roles",
            ),
            (
                "sha256 = \"{h}\"\nroles = [\"admin\"]\nprojects = []",
                "keys[0].projects",
            ),
            (
                "sha256 = \"{h}\"\nroles = [\"admin\"]\nprojects = [\"no spaces\"]",
                "keys[0].projects",
            ),
        ];
        let hash = key_hash("k");
        for (entry, field) in cases {
            let text = format!("[[keys]]\nname = \"n\"\n{}\n", entry.replace("{h}", &hash));
            let path = files.write("bad.toml", &text);
            let err = Auth::load(Sources {
                keys: Some(path),
                ..Sources::default()
            })
            .expect_err(entry);
            assert!(err.to_string().contains(field), "{err} should name {field}");
        }
        assert!(
            Auth::load(Sources::default()).is_err(),
            "auth needs a source"
        );
        // Public keys: none at all, not DER inside, a kind that is neither RSA nor P-256
        // (an Ed25519 SubjectPublicKeyInfo), a block that is not a public key.
        for (text, says) in [
            ("nothing here\n", "no PEM public key"),
            (
                "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                "malformed",
            ),
            (
                "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n-----END PUBLIC KEY-----\n",
                "only RSA and EC P-256",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                "PUBLIC KEY",
            ),
        ] {
            let path = files.write("keys.pub", text);
            let err = Auth::load(Sources {
                jwt_public_keys: Some(path),
                ..Sources::default()
            })
            .expect_err(text)
            .to_string();
            assert!(
                err.contains("auth-jwt-public-keys") && err.contains(says),
                "{err} should say {says}"
            );
        }
    }

    #[test]
    fn jwts_are_checked_for_signature_expiry_issuer_and_audience() {
        let files = Files::new();
        let secret = "0123456789abcdef0123456789abcdef";
        let auth = Auth::load(Sources {
            jwt_secret: Some(files.write("secret", secret)),
            jwt_issuer: Some("idp".into()),
            jwt_audience: Some("sluice".into()),
            ..Sources::default()
        })
        .expect("loads");
        let header = r#"{"alg":"HS256","typ":"JWT"}"#;
        let claims = |exp: f64, iss: &str, aud: &str| {
            serde_json::json!({"sub": "fleet-a", "exp": exp, "iss": iss, "aud": [aud],
                "roles": ["worker"], "projects": ["shop"]})
        };
        let good = sign(
            secret.as_bytes(),
            header,
            &claims(unix_now() + 60.0, "idp", "sluice"),
        );
        let who = auth
            .authenticate(&headers(&format!("Bearer {good}")))
            .expect("valid token");
        assert_eq!(who.name(), "fleet-a");
        assert!(who.holds(Role::Worker) && who.may_use("shop") && !who.may_use("x"));

        let refused = [
            sign(
                b"another secret of thirty-two bytes!",
                header,
                &claims(unix_now() + 60.0, "idp", "sluice"),
            ),
            sign(
                secret.as_bytes(),
                header,
                &claims(unix_now() - 120.0, "idp", "sluice"),
            ),
            sign(
                secret.as_bytes(),
                header,
                &claims(unix_now() + 60.0, "other", "sluice"),
            ),
            sign(
                secret.as_bytes(),
                header,
                &claims(unix_now() + 60.0, "idp", "other"),
            ),
            sign(
                secret.as_bytes(),
                r#"{"alg":"none"}"#,
                &claims(unix_now() + 60.0, "idp", "sluice"),
            ),
            // No exp; valid only from an hour on.
            sign(
                secret.as_bytes(),
                header,
                &serde_json::json!({"sub": "s", "iss": "idp", "aud": "sluice",
                    "roles": ["worker"], "projects": ["shop"]}),
            ),
            sign(
                secret.as_bytes(),
                header,
                &serde_json::json!({"sub": "s", "iss": "idp", "aud": "sluice",
                    "exp": unix_now() + 7200.0, "nbf": unix_now() + 3600.0,
                    "roles": ["worker"], "projects": ["shop"]}),
            ),
        ];
        for token in refused {
            let status = auth
                .authenticate(&headers(&format!("Bearer {token}")))
                .expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
        let short = files.write("short", "too short");
        assert!(
            Auth::load(Sources {
                jwt_secret: Some(short),
                ..Sources::default()
            })
            .is_err()
        );
    }

    #[test]
    fn remembered_jwts_still_expire_and_are_forgotten_when_the_secret_changes() {
        let files = Files::new();
        let secret = "0123456789abcdef0123456789abcdef";
        let path = files.write("secret", secret);
        let auth = Auth::load(Sources {
            jwt_secret: Some(path),
            ..Sources::default()
        })
        .expect("loads");
        let Auth::On(verifier) = &auth else {
            panic!("auth is on");
        };
        let header = r#"{"alg":"HS256"}"#;
        let claims = |exp: f64| serde_json::json!({"sub": "s", "exp": exp, "roles": ["worker"], "projects": ["p"]});
        // Within the 30 s of leeway for one more second.
        let ending = sign(secret.as_bytes(), header, &claims(unix_now() - 29.0));
        let lasting = sign(secret.as_bytes(), header, &claims(unix_now() + 600.0));
        for token in [&ending, &lasting, &ending] {
            auth.authenticate(&headers(&format!("Bearer {token}")))
                .expect("valid, then remembered");
        }
        // Awaited with a bound: the token's last second of leeway runs out.
        let expired = (0..100)
            .find_map(|_| {
                let answer = auth.authenticate(&headers(&format!("Bearer {ending}")));
                if answer.is_ok() {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                answer.err()
            })
            .expect("a remembered token expires all the same");
        assert_eq!(expired.code(), tonic::Code::Unauthenticated);
        files.write("secret", "another secret, also thirty-two bytes long");
        verifier.reload();
        assert!(
            auth.authenticate(&headers(&format!("Bearer {lasting}")))
                .is_err(),
            "a token of the old secret is not remembered past the change"
        );
    }

    #[test]
    fn a_changed_keys_file_is_taken_and_a_broken_one_ignored() {
        let files = Files::new();
        let entry = |name: &str, key: &str| {
            format!(
                "[[keys]]\nname = \"{name}\"\nsha256 = \"{}\"\nroles = [\"admin\"]\nprojects = [\"*\"]\n",
                key_hash(key)
            )
        };
        let path = files.write("keys.toml", &entry("old", "k1"));
        let auth = Auth::load(Sources {
            keys: Some(path),
            ..Sources::default()
        })
        .expect("loads");
        let Auth::On(verifier) = &auth else {
            panic!("auth is on");
        };
        files.write("keys.toml", &entry("new", "k2"));
        verifier.reload();
        assert!(
            auth.authenticate(&headers("Bearer k1")).is_err(),
            "old key revoked"
        );
        assert_eq!(
            auth.authenticate(&headers("Bearer k2"))
                .expect("new key")
                .name(),
            "new"
        );
        files.write("keys.toml", "[[keys]]\nname = 1\n");
        verifier.reload();
        assert!(
            auth.authenticate(&headers("Bearer k2")).is_ok(),
            "broken file ignored"
        );
    }
}
