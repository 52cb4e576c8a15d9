//! secrets-proxy with TLS: for clients, psql with sslmode verify-full against the proxy's
//! certificate, client certificates as identities, and plaintext refused when TLS is required;
//! to servers, each `[server_tls]` mode against a server with TLS, one with another CA's
//! certificate, one without TLS; and the SCRAM keys derived once per password.

use pg_secrets_e2e::pki::{make_pki, Pki};
use pg_secrets_e2e::{
    cluster_with_app_credential, free_port, http_get, set_app_server, wait_until,
    wait_until_listening, wait_until_notified, Cluster, KeySource, ProxyProcess, TEST_KEY,
};
use secrets_proxy::{Config, RunningProxy};
use std::fs;
use std::process::Command;

fn psql(port: u16, connection: &str) -> (bool, String) {
    let output = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-c",
            "SELECT current_user || ' ' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ])
        .arg(format!(
            "host=localhost port={port} dbname=appdb user=someone {connection}"
        ))
        .env("PGSSLCERT", "/nonexistent")
        .env("PGSSLKEY", "/nonexistent")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn tls_clients_certificates_and_required_encryption() {
    let cluster = cluster_with_app_credential(&[]);
    let pki = make_pki(cluster.dir());
    let proxy = RunningProxy::start(
        Config::parse(&format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\n\
             [store]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"proxy\"\npassword = \"proxy-pw\"\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\nrequire = true\n\
             [[route]]\ndatabase = \"appdb\"\nsecret = \"db/app\"\nallow = [\"cert:payments-service\"]\n",
            cluster.port,
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display()
        ))
        .unwrap(),
    )
    .unwrap();
    let port = proxy.tcp_address.unwrap().port();
    let ca = pki.ca.display();
    // psql verifying the proxy against our CA and presenting the client certificate of `client`.
    let with_certificate_of = |client: &Pki| {
        psql(
            port,
            &format!(
                "sslmode=verify-full sslrootcert={ca} sslcert={} sslkey={}",
                client.client_cert.display(),
                client.client_key.display()
            ),
        )
    };

    // The payments service, verifying the proxy and presenting its certificate, gets in.
    let (ok, text) = with_certificate_of(&pki);
    assert!(ok, "{text}");
    // The proxy speaks plaintext to this server; what matters is who logged in.
    assert!(text.starts_with("app"), "{text}");

    // Encrypted but without a certificate: not the allowed identity.
    let (ok, text) = psql(port, &format!("sslmode=verify-full sslrootcert={ca}"));
    assert!(!ok && text.contains("may not use the route"), "{text}");

    // Plaintext where TLS is required: a clear refusal.
    let (ok, text) = psql(port, "sslmode=disable");
    assert!(!ok && text.contains("requires TLS"), "{text}");

    // A client that checks the proxy's certificate against another CA refuses to go on.
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    let (ok, text) = psql(
        port,
        &format!("sslmode=verify-full sslrootcert={}", other_pki.ca.display()),
    );
    assert!(
        !ok && (text.contains("certificate") || text.contains("SSL error")),
        "{text}"
    );

    // A client certificate from another CA fails the handshake (with TLS 1.3 the client may
    // see the alert, or only the connection closed), and the proxy goes on serving the others.
    let (ok, text) = with_certificate_of(&other_pki);
    assert!(
        !ok && (text.contains("alert") || text.contains("SSL") || text.contains("closed")),
        "{text}"
    );
    let (ok, text) = with_certificate_of(&pki);
    assert!(ok, "{text}");
}

/// SIGHUP reloads the proxy's certificate: once the files hold one from another CA, new
/// clients see it, and a client connected before is not dropped.
#[test]
fn sighup_reloads_the_certificate_without_dropping_clients() {
    let cluster = cluster_with_app_credential(&[]);
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (first, second) = (make_pki(first_dir.path()), make_pki(second_dir.path()));
    let (cert, key) = (
        cluster.dir().join("proxy.pem"),
        cluster.dir().join("proxy.key"),
    );
    let install = |pki: &Pki| {
        fs::copy(&pki.server_cert, &cert).unwrap();
        fs::copy(&pki.server_key, &key).unwrap();
    };
    install(&first);
    let port = free_port();
    let config_file = cluster.dir().join("proxy-tls.toml");
    fs::write(
        &config_file,
        format!(
            "[listen]\ntcp = \"127.0.0.1:{port}\"\n\
             [store]\nhost = \"127.0.0.1\"\nport = {}\n{STORE_LOGIN}\n\
             [tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
             [[route]]\ndatabase = \"appdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n",
            cluster.port,
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let proxy = ProxyProcess::start(&config_file, port);
    let verified_by = |pki: &Pki| {
        psql(
            port,
            &format!("sslmode=verify-full sslrootcert={}", pki.ca.display()),
        )
    };
    let (ok, text) = verified_by(&first);
    assert!(ok, "{text}");
    let mut connected = proxy.connect("appdb").unwrap();

    install(&second);
    proxy.signal("HUP");
    wait_until(
        "the new certificate",
        std::time::Duration::from_secs(30),
        || verified_by(&second).0,
    );
    let (ok, text) = verified_by(&first);
    assert!(!ok, "the old certificate is gone: {text}");
    assert!(
        connected.simple_query("SELECT 1").is_ok(),
        "the client connected before the reload stays"
    );
}

/// The store login of these tests: role `proxy` with its password.
const STORE_LOGIN: &str = "user = \"proxy\"\npassword = \"proxy-pw\"";

/// A proxy for route `appdb` → secret `db/app` with `[server_tls]` as given, no session
/// pooling (every client is a new server login), and an admin port.
fn proxy_with_server_tls(cluster: &Cluster, server_tls: &str) -> RunningProxy {
    proxy_with_tls(
        cluster,
        &format!("host = \"127.0.0.1\"\n{STORE_LOGIN}"),
        server_tls,
    )
}

/// The same proxy with its `[store]` section (but the port) as given.
fn proxy_with_tls(cluster: &Cluster, store: &str, server_tls: &str) -> RunningProxy {
    RunningProxy::start(
        Config::parse(&format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [store]\n{store}\nport = {}\n\
             [limits]\npool_max_idle = 0\n\
             [server_tls]\n{server_tls}\n\
             [[route]]\ndatabase = \"appdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n",
            cluster.port
        ))
        .unwrap(),
    )
    .unwrap()
}

/// A cluster serving TLS with a certificate for `localhost` signed by its own CA, a login
/// role `app` whose credential is secret `db/app` (server: this cluster, at localhost), and
/// the proxy's store role `proxy`.
fn tls_cluster() -> (Cluster, Pki, postgres::Client) {
    let mut cluster = Cluster::start();
    let pki = make_pki(cluster.dir());
    let settings = pki.server_settings();
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    cluster.configure(KeySource::File(TEST_KEY.into()), &settings);
    cluster.restart();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE app LOGIN PASSWORD 'pw-0';
         CREATE ROLE proxy LOGIN PASSWORD 'proxy-pw' IN ROLE secrets_reader;",
    )
    .unwrap();
    db.execute(
        "SELECT secrets.create_secret('db/app', $1)",
        &[&"{\"username\": \"app\", \"password\": \"pw-0\"}"],
    )
    .unwrap();
    set_app_server(&cluster, "localhost", cluster.port);
    (cluster, pki, db)
}

#[test]
fn tls_to_servers_verified_against_the_configured_ca() {
    let (cluster, pki, mut db) = tls_cluster();
    let ca = pki.ca.display().to_string();
    let verify_full = format!("sslmode = \"verify-full\"\nca_file = \"{ca}\"");

    // verify-full: the server's certificate names localhost and chains to the CA. Every
    // client is a new SCRAM login; the keys are derived once and then come from the cache.
    let proxy = proxy_with_server_tls(&cluster, &verify_full);
    let port = proxy.tcp_address.unwrap().port();
    for _ in 0..3 {
        let (ok, text) = psql(port, "sslmode=disable");
        assert!(ok && text.trim() == "app true", "{text}");
    }
    let metrics = http_get(proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_scram_keys_total{result=\"derived\"} 1\n")
            && metrics.contains("secrets_proxy_scram_keys_total{result=\"cached\"} 2\n"),
        "{metrics}"
    );
    // Each login was bound to its TLS session (SCRAM-SHA-256-PLUS, tls-server-end-point):
    // the server checked the binding, or it would have refused.
    assert!(
        metrics.contains("secrets_proxy_scram_channel_bound_logins_total 3\n"),
        "{metrics}"
    );
    // A new password is a new derivation, once (the proxy told of the change before the next
    // login, or it would first try the cached password against the new salt).
    let admin = proxy.admin_address.unwrap();
    let notified = wait_until_listening(admin);
    db.batch_execute("ALTER ROLE app PASSWORD 'pw-1'").unwrap();
    db.execute(
        "SELECT secrets.put_secret_value('db/app', $1)",
        &[&format!(
            r#"{{"host": "localhost", "port": {}, "dbname": "postgres", "username": "app", "password": "pw-1"}}"#,
            cluster.port
        )],
    )
    .unwrap();
    wait_until_notified(admin, notified + 1);
    for _ in 0..2 {
        let (ok, text) = psql(port, "sslmode=disable");
        assert!(ok && text.trim() == "app true", "{text}");
    }
    let metrics = http_get(proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_scram_keys_total{result=\"derived\"} 2\n"),
        "{metrics}"
    );
    db.batch_execute("ALTER ROLE app PASSWORD 'pw-0'").unwrap();
    set_app_server(&cluster, "localhost", cluster.port);
    drop(proxy);

    // The certificate does not name 127.0.0.1: verify-full refuses, with a clear error.
    set_app_server(&cluster, "127.0.0.1", cluster.port);
    let proxy = proxy_with_server_tls(&cluster, &verify_full);
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(
        !ok && text.contains("TLS to the database server 127.0.0.1")
            && text.contains("certificate"),
        "{text}"
    );
    drop(proxy);

    // A Unix socket cannot prove who listens on it: refused under verify-full.
    set_app_server(
        &cluster,
        &cluster.socket_dir().display().to_string(),
        cluster.port,
    );
    let proxy = proxy_with_server_tls(&cluster, &verify_full);
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(
        !ok && text.contains("a Unix socket cannot be verified"),
        "{text}"
    );
    drop(proxy);
    set_app_server(&cluster, "127.0.0.1", cluster.port);

    // require: encrypted, the certificate not checked, so the address form is fine; the
    // login is still bound to the session, so it could not be relayed through another.
    let proxy = proxy_with_server_tls(&cluster, "sslmode = \"require\"");
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(ok && text.trim() == "app true", "{text}");
    let metrics = http_get(proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_scram_channel_bound_logins_total 1\n"),
        "{metrics}"
    );
    drop(proxy);

    // disable (the default): plaintext, so nothing to bind to.
    let proxy = proxy_with_server_tls(&cluster, "");
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(ok && text.trim() == "app false", "{text}");
    let metrics = http_get(proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_scram_channel_bound_logins_total 0\n"),
        "{metrics}"
    );
    drop(proxy);

    // A CA that did not sign the server's certificate.
    set_app_server(&cluster, "localhost", cluster.port);
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    let proxy = proxy_with_server_tls(
        &cluster,
        &format!(
            "sslmode = \"verify-full\"\nca_file = \"{}\"",
            other_pki.ca.display()
        ),
    );
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(
        !ok && text.contains("TLS to the database server localhost")
            && text.contains("certificate"),
        "{text}"
    );
    drop(proxy);

    // A server that declines SSLRequest ('N'), as PostgreSQL with ssl = off does.
    let declining = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let declining_port = declining.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut stream in declining.incoming().flatten() {
            let mut request = [0u8; 8];
            if stream.read_exact(&mut request).is_ok() {
                let _ = stream.write_all(b"N");
            }
        }
    });
    set_app_server(&cluster, "localhost", declining_port);
    let proxy = proxy_with_server_tls(&cluster, "sslmode = \"require\"");
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(!ok && text.contains("does not accept TLS"), "{text}");
}

/// The proxy's own connections to the secrets store carry credentials: with `[store] sslmode`
/// they are encrypted, and under verify-full the store's certificate must chain to the CA and
/// name the host.
#[test]
fn tls_to_the_store_verified_against_the_configured_ca() {
    let (cluster, pki, mut db) = tls_cluster();
    let store_ssl = |db: &mut postgres::Client| -> (i64, bool) {
        let row = db
            .query_one(
                "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'secrets-proxy'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    // verify-full, and require: encrypted, the certificate not checked (it does not name
    // 127.0.0.1).
    let verify_full = format!(
        "host = \"localhost\"\n{STORE_LOGIN}\nsslmode = \"verify-full\"\nca_file = \"{}\"",
        pki.ca.display()
    );
    let require = format!("host = \"127.0.0.1\"\n{STORE_LOGIN}\nsslmode = \"require\"");
    for store in [verify_full, require] {
        let proxy = proxy_with_tls(&cluster, &store, "");
        let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
        assert!(ok && text.trim() == "app false", "{store}: {text}");
        let (connections, all_encrypted) = store_ssl(&mut db);
        assert!(
            connections >= 1 && all_encrypted,
            "{store}: {connections} {all_encrypted}"
        );
    }

    // A store whose certificate does not chain to the configured CA gives no credential, nor
    // one whose certificate does not name the host connected to (it names localhost).
    let other = tempfile::tempdir().unwrap();
    let other_pki = make_pki(other.path());
    for (host, ca) in [("localhost", &other_pki.ca), ("127.0.0.1", &pki.ca)] {
        let proxy = proxy_with_tls(
            &cluster,
            &format!(
                "host = \"{host}\"\n{STORE_LOGIN}\nsslmode = \"verify-full\"\nca_file = \"{}\"",
                ca.display()
            ),
            "",
        );
        let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
        assert!(
            !ok && text.contains("the secrets store could not give the credential of \"db/app\""),
            "{host}: {text}"
        );
    }
}

/// The proxy presents a client certificate where servers ask for one: the store authenticates
/// it by the certificate alone (`cert`, no store password anywhere), and a server requiring a
/// certificate besides the password (`clientcert=verify-ca`) lets the route's login in.
#[test]
fn client_certificates_to_the_store_and_to_servers() {
    let (cluster, pki, mut db) = tls_cluster();
    // The client certificate's common name is the store role.
    db.batch_execute("CREATE ROLE \"payments-service\" LOGIN IN ROLE secrets_reader")
        .unwrap();
    let hba = cluster.data_dir().join("pg_hba.conf");
    let rules = fs::read_to_string(&hba).unwrap();
    fs::write(
        &hba,
        format!(
            "hostssl all payments-service 127.0.0.1/32 cert\n\
             hostnossl all app 127.0.0.1/32 reject\n\
             hostssl all app 127.0.0.1/32 scram-sha-256 clientcert=verify-ca\n{rules}"
        ),
    )
    .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until(
        "the new pg_hba.conf",
        std::time::Duration::from_secs(30),
        || {
            postgres::Client::connect(&cluster.connection_string("app", "pw-0"), postgres::NoTls)
                .is_err()
        },
    );
    let certificate = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let verify_full = format!(
        "sslmode = \"verify-full\"\nca_file = \"{}\"",
        pki.ca.display()
    );
    let store = format!("host = \"localhost\"\nuser = \"payments-service\"\n{verify_full}");

    let proxy = proxy_with_tls(
        &cluster,
        &format!("{store}\n{certificate}"),
        &format!("{verify_full}\n{certificate}"),
    );
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(ok && text.trim() == "app true", "{text}");
    drop(proxy);

    // Without a certificate for the servers, the route's server refuses the login.
    let proxy = proxy_with_tls(&cluster, &format!("{store}\n{certificate}"), &verify_full);
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(!ok && text.contains("certificate"), "{text}");
    drop(proxy);

    // Without a certificate for the store, no credential.
    let proxy = proxy_with_tls(&cluster, &store, &format!("{verify_full}\n{certificate}"));
    let (ok, text) = psql(proxy.tcp_address.unwrap().port(), "sslmode=disable");
    assert!(
        !ok && text.contains("the secrets store could not give the credential of \"db/app\""),
        "{text}"
    );
}
