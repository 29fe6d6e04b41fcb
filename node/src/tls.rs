//! TLS (rustls, ring) for the node's gRPC port and for calls to peers.
//!
//! The server's certificate and key are read from their PEM files at start
//! and again whenever either file changes (checked every few seconds), so a
//! certificate renewed by cert-manager or by hand takes effect without a
//! restart; a pair that no longer loads keeps the one in force. With
//! `tls_peer_mtls`, clients may present a certificate: one that the
//! cluster's authority (`tls_ca_file`) did not sign fails the handshake, and
//! the auth layer takes peer calls only over connections that presented one.
//! Calls to peers trust `tls_ca_file` and, with mutual TLS, present the
//! node's own certificate; they are set up when a peer is first dialled.

use crate::config::NodeConfig;
use crate::reload::Reloading;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, warn};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field} {path}: {reason}")]
    File { field: &'static str, path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::File { field, path: path.into(), reason: e.to_string() })
}

fn certificates(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::File { field, path: path.into(), reason };
    let certs = CertificateDer::pem_slice_iter(&read(field, path)?).collect::<Result<Vec<_>, _>>().map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// rustls over *ring*, the provider tonic's `tls-ring` uses too. rustls
/// 0.23.48 deprecates it for lacking post-quantum key exchange; aws-lc-rs
/// has it but builds AWS-LC's C sources in every clean build (CI included),
/// which the ring build does not. Noted in `docs/operations.md`.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node's certificate, read again when its files change.
pub struct ServerCertificate {
    cert: PathBuf,
    key: PathBuf,
    current: Reloading<CertifiedKey>,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate").field("cert", &self.cert).field("key", &self.key).finish_non_exhaustive()
    }
}

impl ServerCertificate {
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerCertificate>, TlsError> {
        let current = Reloading::load("TLS certificate", vec![cert.into(), key.into()], || Self::read_pair(cert, key))?;
        Ok(Arc::new(ServerCertificate { cert: cert.into(), key: key.into(), current }))
    }

    fn read_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
        let chain = certificates("tls_cert_file", cert)?;
        let bad_key = |reason: String| TlsError::File { field: "tls_key_file", path: key.into(), reason };
        let der = PrivateKeyDer::from_pem_slice(&read("tls_key_file", key)?).map_err(|e| bad_key(e.to_string()))?;
        let signing = provider().key_provider.load_private_key(der).map_err(|e| bad_key(e.to_string()))?;
        let certified = CertifiedKey::new(chain, signing);
        certified.keys_match().map_err(|e| bad_key(format!("does not match tls_cert_file: {e}")))?;
        Ok(certified)
    }

    /// Reads the pair again if either file changed.
    pub fn reload(&self) {
        self.current.reload(|_| Self::read_pair(&self.cert, &self.key))
    }

    /// Checks the files every `every` until dropped.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        crate::reload::spawn_reloads(self, every, ServerCertificate::reload)
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.current())
    }
}

/// The server side: rustls configuration over the reloading certificate.
pub fn server_config(config: &NodeConfig, cert: Arc<ServerCertificate>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&config.tls_ca_file, config.tls_peer_mtls) {
        (Some(ca), true) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates("tls_ca_file", ca)? {
                roots.add(c).map_err(|e| TlsError::File { field: "tls_ca_file", path: ca.clone(), reason: e.to_string() })?;
            }
            // Clients without a certificate are served (their tokens decide);
            // a certificate the authority did not sign fails the handshake.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(cert);
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(server))
}

/// Connections accepted on `listener`, after their TLS handshake (each in
/// its own task, so that a slow or failing handshake holds up no other).
pub fn incoming(
    listener: TcpListener,
    server: Arc<rustls::ServerConfig>,
) -> ReceiverStream<std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, sender) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = sender.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// How the node dials its peers: TLS settings (none: plain text) and the
/// credentials it sends.
#[derive(Clone, Default)]
pub struct PeerSecurity {
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    pub token: crate::auth::PeerCredentials,
}

impl PeerSecurity {
    /// From the node's configuration and its tokens.
    pub fn from_config(config: &NodeConfig, token: crate::auth::PeerCredentials) -> Result<PeerSecurity, TlsError> {
        if !config.tls() {
            return Ok(PeerSecurity { tls: None, token });
        }
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = &config.tls_ca_file {
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read("tls_ca_file", ca)?));
        }
        if config.tls_peer_mtls {
            let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) else {
                return Err(TlsError::Config("tls_peer_mtls needs tls_cert_file and tls_key_file".into()));
            };
            tls = tls.identity(tonic::transport::Identity::from_pem(read("tls_cert_file", cert)?, read("tls_key_file", key)?));
        }
        Ok(PeerSecurity { tls: Some(tls), token })
    }

    /// The endpoint of a peer advertised as `advertised` and dialled at
    /// `dial` (a route may differ): the certificate is checked against the
    /// advertised host name.
    pub fn endpoint(&self, advertised: &str, dial: &str) -> Result<tonic::transport::Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = tonic::transport::Endpoint::from_shared(format!("{scheme}://{dial}")).map_err(|e| e.to_string())?;
        if let Some(tls) = &self.tls {
            let host = advertised.rsplit_once(':').map_or(advertised, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
            ep = ep.tls_config(tls.clone().domain_name(host)).map_err(|e| e.to_string())?;
        }
        Ok(ep)
    }
}
