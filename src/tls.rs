//! TLS on the gRPC port (`--tls-cert`, `--tls-key`) and, with `--tls-client-ca`, mutual TLS:
//! clients must present a certificate that CA signs. HTTP/2 is agreed by ALPN (`h2`), as gRPC
//! clients ask. The files are reread every few seconds, so a renewed certificate is served to
//! new connections without a restart. Also the client side, for Sluice's own clients.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Where the server's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// PEM CA certificates that sign the clients' certificates: mutual TLS when set.
    pub client_ca: Option<PathBuf>,
}

/// The gRPC port's TLS: the acceptor in force, swapped when the files change.
#[derive(Clone)]
pub struct Tls {
    files: Arc<ServerFiles>,
    current: Arc<RwLock<(tokio_rustls::TlsAcceptor, Read)>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Reads `files` now: an error names the option whose file is at fault.
    pub fn load(files: ServerFiles) -> Result<Self, Error> {
        let read = read_files(&files)?;
        let acceptor = acceptor(&files, &read)?;
        Ok(Self {
            files: Arc::new(files),
            current: Arc::new(RwLock::new((acceptor, read))),
        })
    }

    /// The acceptor for a new connection.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        // A poisoned lock still holds a whole acceptor: swaps replace it in one assignment.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// Rereads the files; takes them when they changed and make a working configuration, else
    /// logs why and keeps the one in force.
    pub fn reload(&self) {
        let read = match read_files(&self.files) {
            Ok(read) => read,
            Err(err) => {
                tracing::error!(error = %err, "TLS files unreadable; the certificate in force stays");
                return;
            }
        };
        let same = self.current.read().is_ok_and(|current| current.1 == read);
        if same {
            return;
        }
        match acceptor(&self.files, &read) {
            Ok(acceptor) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = (acceptor, read);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
            }
            Err(err) => {
                tracing::error!(error = %err, "TLS files rejected; the certificate in force stays");
            }
        }
    }

    /// Rereads the files every `interval` until `shutdown`.
    pub async fn watch(self, interval: Duration, shutdown: CancellationToken) {
        crate::shutdown::every(interval, &shutdown, || self.reload()).await;
    }
}

/// The bytes of the certificate, key and client CA files (empty when not set), to tell a change.
type Read = [Vec<u8>; 3];

fn read_files(files: &ServerFiles) -> Result<Read, Error> {
    Ok([
        crate::config::read_pem(&files.cert, "tls-cert")?,
        crate::config::read_pem(&files.key, "tls-key")?,
        match &files.client_ca {
            Some(path) => crate::config::read_pem(path, "tls-client-ca")?,
            None => Vec::new(),
        },
    ])
}

fn acceptor(files: &ServerFiles, read: &Read) -> Result<tokio_rustls::TlsAcceptor, Error> {
    let [cert, key, client_ca] = read;
    let chain = certificates(cert).map_err(|e| invalid("tls-cert", &files.cert, e))?;
    let private = private_key(key).map_err(|e| invalid("tls-key", &files.key, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?;
    let builder = match &files.client_ca {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates(client_ca).map_err(|e| invalid("tls-client-ca", path, e))? {
                roots
                    .add(ca)
                    .map_err(|e| invalid("tls-client-ca", path, e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| invalid("tls-client-ca", path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, private).map_err(|e| {
        invalid(
            "tls-key",
            &files.key,
            format!("does not go with the certificate in --tls-cert: {e}"),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A file given to `option` that is not what it should be.
fn invalid(option: &str, path: &Path, reason: String) -> Error {
    Error::invalid(option, format!("{}: {reason}", path.display()))
}

fn private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"))
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if chain.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(chain)
}

/// TLS for a client that speaks HTTP/2 over rustls itself (the load generator): trust only
/// `ca` and, for mutual TLS, present `identity` (certificate chain, private key). ALPN offers
/// `h2`. Errors name the option whose file is at fault.
pub fn rustls_client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = crate::config::read_pem(ca, "tls-ca")?;
    for cert in certificates(&pem).map_err(|e| invalid("tls-ca", ca, e))? {
        roots
            .add(cert)
            .map_err(|e| invalid("tls-ca", ca, e.to_string()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Internal(format!("TLS protocol versions: {e}")))?
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(&crate::config::read_pem(cert, "tls-cert")?)
                .map_err(|e| invalid("tls-cert", cert, e))?;
            let private = private_key(&crate::config::read_pem(key, "tls-key")?)
                .map_err(|e| invalid("tls-key", key, e))?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                invalid(
                    "tls-key",
                    key,
                    format!("does not go with the certificate in --tls-cert: {e}"),
                )
            })?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// TLS for a Sluice client (`https://` URLs): trust `ca` (absent: the system's roots) and, for
/// mutual TLS, present `cert` with `key`.
pub fn client_config(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<tonic::transport::ClientTlsConfig, Error> {
    let mut config = tonic::transport::ClientTlsConfig::new();
    config = match ca {
        Some(path) => config.ca_certificate(tonic::transport::Certificate::from_pem(
            crate::config::read_pem(path, "tls-ca")?,
        )),
        None => config.with_native_roots(),
    };
    if let Some((cert, key)) = identity {
        config = config.identity(tonic::transport::Identity::from_pem(
            crate::config::read_pem(cert, "tls-cert")?,
            crate::config::read_pem(key, "tls-key")?,
        ));
    }
    Ok(config)
}
