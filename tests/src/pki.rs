//! Certificates for the TLS tests, made with rcgen: a CA of the test's own, a server
//! certificate for `localhost` and a client certificate.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn write_private(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}

/// A CA, a server certificate for localhost, and a client certificate for "payments-service".
pub fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pg_secrets test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let server_cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "payments-service");
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let pki = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    fs::write(&pki.ca, ca_cert.pem()).unwrap();
    fs::write(&pki.server_cert, server_cert.pem()).unwrap();
    write_private(&pki.server_key, &server_key.serialize_pem());
    fs::write(&pki.client_cert, client_cert.pem()).unwrap();
    write_private(&pki.client_key, &client_key.serialize_pem());
    pki
}

impl Pki {
    /// The settings of a PostgreSQL server that serves TLS with this server certificate.
    pub fn server_settings(&self) -> Vec<String> {
        vec![
            "ssl = on".to_string(),
            format!("ssl_cert_file = '{}'", self.server_cert.display()),
            format!("ssl_key_file = '{}'", self.server_key.display()),
            format!("ssl_ca_file = '{}'", self.ca.display()),
        ]
    }
}
