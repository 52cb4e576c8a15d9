//! TLS to PostgreSQL servers, with rustls and ring, as the extension's rotators and
//! secrets-proxy both make it: encryption with the server's certificate verified against a
//! set of roots (libpq's `verify-full`), or encryption alone (`require`).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WantsClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ConfigBuilder, DigitallySignedStruct, RootCertStore, SignatureScheme,
    WantsVerifier,
};
use std::path::Path;
use std::sync::Arc;

/// The certificates of a PEM file, as roots to verify servers or clients against. `setting`
/// names where the path came from, for errors.
pub fn load_roots(path: &Path, setting: &str) -> Result<RootCertStore, String> {
    let failed = |e: &dyn std::fmt::Display| format!("{setting} {}: {e}", path.display());
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(path).map_err(|e| failed(&e))? {
        roots
            .add(certificate.map_err(|e| failed(&e))?)
            .map_err(|e| failed(&e))?;
    }
    if roots.is_empty() {
        return Err(failed(&"no certificate in the file"));
    }
    Ok(roots)
}

/// The operating system's trusted roots (libpq's `sslrootcert=system`).
pub fn system_roots(setting: &str) -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(format!(
            "{setting} = system: the operating system's trusted certificates could not be \
             loaded ({why}); name a CA file instead"
        ));
    }
    Ok(roots)
}

fn client_builder() -> Result<ConfigBuilder<ClientConfig, WantsVerifier>, String> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
}

/// The cryptography every configuration here uses: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Encryption, with the server's certificate chained to `roots` and naming the host connected
/// to.
pub fn verifying(
    roots: RootCertStore,
) -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, String> {
    Ok(client_builder()?.with_root_certificates(roots))
}

/// Encryption alone: any certificate is accepted, as libpq's `require` does, but the
/// handshake's own signatures are still checked so the session keys are the server's. A
/// SCRAM login with channel binding over it cannot be relayed by someone in the middle.
pub fn encryption_only() -> Result<ConfigBuilder<ClientConfig, WantsClientCert>, String> {
    Ok(client_builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptionOnly(provider()))))
}

#[derive(Debug)]
struct EncryptionOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptionOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
