//! TLS with rustls (ring), both ways.
//!
//! For clients: a client that sends SSLRequest gets 'S' and a handshake; with
//! `client_ca_file`, a certificate it presents is verified against that CA and its subject's
//! common name becomes a `cert:<name>` identity.
//!
//! To servers: `[server_tls]` (route servers) and `[store] sslmode` (the secrets store) choose
//! plaintext, encryption alone, or encryption with the server's certificate verified against
//! a CA and the host name.

use crate::config::{ServerSslMode, ServerTls, Store, Tls};
use pg_secrets_tls::{encryption_only, load_roots, verifying};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub fn acceptor(tls: &Tls) -> Result<TlsAcceptor, String> {
    let provider = pg_secrets_tls::provider();
    let (certificates, key) = load_identity(&tls.cert_file, &tls.key_file, "[tls]")?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_file {
        Some(path) => {
            let roots = load_roots(path, "[tls] client_ca_file")?;
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

/// A certificate chain and its private key, from PEM files.
fn load_identity(
    cert_file: &Path,
    key_file: &Path,
    section: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let certificates = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certificates| certificates.collect())
        .map_err(|e| format!("{section} cert_file {}: {e}", cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{section} key_file {}: {e}", key_file.display()))?;
    Ok((certificates, key))
}

/// The connector for `[server_tls]`; `None` when it says plaintext.
pub fn server_connector(tls: &ServerTls) -> Result<Option<TlsConnector>, String> {
    Ok(client_config(tls, "[server_tls]")?.map(|config| TlsConnector::from(Arc::new(config))))
}

/// The connector for `[store]`: the proxy's own connections to the secrets store, checked as
/// `[server_tls]` checks route servers; `None` for plaintext.
pub fn store_connector(store: &Store) -> Result<Option<MakeRustlsConnect>, String> {
    Ok(client_config(&store.tls(), "[store]")?.map(MakeRustlsConnect::new))
}

/// The rustls configuration a sslmode asks for; `None` for plaintext. `section` names the
/// configuration section in errors.
fn client_config(tls: &ServerTls, section: &str) -> Result<Option<ClientConfig>, String> {
    let builder = match tls.sslmode {
        ServerSslMode::Disable => return Ok(None),
        ServerSslMode::Require => encryption_only()?,
        ServerSslMode::VerifyFull => {
            let path = tls
                .ca_file
                .as_deref()
                .expect("validated: verify-full has a CA");
            verifying(load_roots(path, &format!("{section} ca_file"))?)?
        }
    };
    Ok(Some(match (&tls.cert_file, &tls.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let (chain, key) = load_identity(cert_file, key_file, section)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{section} cert_file and key_file: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    }))
}

/// SCRAM channel binding data of type `tls-server-end-point` (RFC 5929 §4.1): the hash of the
/// server's certificate, with the hash of its signature algorithm (MD5 and SHA-1 become
/// SHA-256). `None` for another algorithm (Ed25519, RSA-PSS, SHA-224): the login then goes
/// unbound, which the server accepts.
pub fn server_end_point(certificate: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use sha2::Digest;
    use x509_parser::oid_registry as oids;
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let algorithm = &parsed.signature_algorithm.algorithm;
    let bytes = certificate.as_ref();
    if [
        oids::OID_PKCS1_SHA256WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA256,
        oids::OID_PKCS1_SHA1WITHRSA,
        oids::OID_PKCS1_MD5WITHRSAENC,
    ]
    .contains(algorithm)
    {
        Some(sha2::Sha256::digest(bytes).to_vec())
    } else if [
        oids::OID_PKCS1_SHA384WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA384,
    ]
    .contains(algorithm)
    {
        Some(sha2::Sha384::digest(bytes).to_vec())
    } else if [
        oids::OID_PKCS1_SHA512WITHRSA,
        oids::OID_SIG_ECDSA_WITH_SHA512,
    ]
    .contains(algorithm)
    {
        Some(sha2::Sha512::digest(bytes).to_vec())
    } else {
        None
    }
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
