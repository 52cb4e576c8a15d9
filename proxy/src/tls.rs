//! TLS for clients (rustls, ring). A client that sends SSLRequest gets 'S' and a handshake;
//! with `client_ca_file`, a certificate it presents is verified against that CA and its
//! subject's common name becomes a `cert:<name>` identity.

use crate::config::Tls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

pub fn acceptor(tls: &Tls) -> Result<TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certificates| certificates.collect())
        .map_err(|e| format!("[tls] cert_file {}: {e}", tls.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| format!("[tls] key_file {}: {e}", tls.key_file.display()))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?
            {
                let certificate = certificate
                    .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?;
            }
            // Certificates are optional: a client without one keeps its other identities.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("[tls] client_ca_file {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certificates, key)
        .map_err(|e| format!("[tls] cert_file/key_file: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The common name of a verified client certificate's subject.
pub fn common_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}
