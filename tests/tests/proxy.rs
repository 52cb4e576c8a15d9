//! secrets-proxy end to end: a real cluster holds the application's credential in pg_secrets,
//! the proxy runs in-process on its own runtime, and clients (the postgres crate, psql,
//! pgbench, raw sockets) connect to it without a password.

use pg_secrets_e2e::{
    cluster_with_app_credential, credential_json, first_column, http_get, startup_packet,
    wait_until, wait_until_listening, wait_until_notified, Cluster, ProxyProcess, SUPERUSER,
    SUPERUSER_PASSWORD,
};
use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use secrets_proxy::{Config, RunningProxy};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Fixture {
    cluster: Cluster,
    proxy: RunningProxy,
}

/// A cluster with login role `app` (password in secret `db/app`), a `proxy` role that may read
/// secrets, and a proxy routing database `appdb` to that secret.
fn fixture(allow: &str) -> Fixture {
    fixture_with(allow, &[], ProxyExtras::default())
}

/// More proxy configuration: lines for `[listen]`, for `[limits]` and for the route.
#[derive(Default)]
struct ProxyExtras {
    /// Lines for `[listen]`.
    listen: String,
    limits: String,
    route: String,
}

fn fixture_with(allow: &str, settings: &[&str], extras: ProxyExtras) -> Fixture {
    proxy_for(cluster_with_app_credential(settings), allow, extras)
}

fn proxy_for(cluster: Cluster, allow: &str, extras: ProxyExtras) -> Fixture {
    let config = Config::parse(&proxy_config(&cluster, "127.0.0.1:0", allow, &extras)).unwrap();
    let proxy = RunningProxy::start(config).unwrap();
    Fixture { cluster, proxy }
}

/// The proxy's configuration: clients on `tcp`, database `appdb` routed to secret `db/app`.
fn proxy_config(cluster: &Cluster, tcp: &str, allow: &str, extras: &ProxyExtras) -> String {
    format!(
        r#"
        [listen]
        tcp = "{tcp}"
        unix_dir = "{dir}"
        admin = "127.0.0.1:0"
        {listen}

        [store]
        host = "127.0.0.1"
        port = {port}
        user = "proxy"
        password = "proxy-pw"

        [limits]
        login_retry_budget_ms = 5000
        {limits}

        [[route]]
        database = "appdb"
        secret = "db/app"
        allow = [{allow}]
        {route}
        "#,
        dir = cluster.dir().display(),
        port = cluster.port,
        listen = extras.listen,
        limits = extras.limits,
        route = extras.route,
    )
}

/// The proxy as its own process, configured as `fixture` configures it (loopback clients
/// trusted), from `<name>.toml` in the cluster's directory: the process, the file and its text.
fn proxy_process(cluster: &Cluster, name: &str) -> (ProxyProcess, std::path::PathBuf, String) {
    let port = pg_secrets_e2e::free_port();
    let config_file = cluster.dir().join(format!("{name}.toml"));
    let config = proxy_config(
        cluster,
        &format!("127.0.0.1:{port}"),
        r#""trust""#,
        &ProxyExtras::default(),
    );
    std::fs::write(&config_file, &config).unwrap();
    (ProxyProcess::start(&config_file, port), config_file, config)
}

impl Fixture {
    fn port(&self) -> u16 {
        self.proxy.tcp_address.unwrap().port()
    }

    fn admin(&self) -> std::net::SocketAddr {
        self.proxy.admin_address.unwrap()
    }

    fn connect(&self) -> Client {
        self.try_connect()
            .unwrap_or_else(|e| panic!("cannot connect through the proxy: {e}"))
    }

    fn try_connect(&self) -> Result<Client, postgres::Error> {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=whoever dbname=appdb",
                self.port()
            ),
            NoTls,
        )
    }

    fn rotate(&self, password: &str) {
        // The order a rotator uses: PENDING first, then the server, then CURRENT.
        let mut db = self.cluster.superuser();
        let pending: String = db
            .query_one(
                "SELECT secrets.put_secret_value('db/app', $1, version_stages => '{PENDING}')::text",
                &[&credential_json(&self.cluster, password)],
            )
            .unwrap()
            .get(0);
        db.batch_execute(&format!("ALTER ROLE app PASSWORD '{password}'"))
            .unwrap();
        let current: String = db
            .query_one("SELECT version_id::text FROM secrets.list_secret_version_ids('db/app') WHERE 'CURRENT' = ANY(version_stages)", &[])
            .unwrap()
            .get(0);
        db.execute(
            "SELECT secrets.update_secret_version_stage('db/app', 'CURRENT', $1::text::uuid, $2::text::uuid)",
            &[&pending, &current],
        )
        .unwrap();
        db.execute(
            "SELECT secrets.update_secret_version_stage('db/app', 'PENDING', remove_from_version_id => $1::text::uuid)",
            &[&pending],
        )
        .unwrap();
    }
}

/// A client that pipelines many large requests while it reads large answers, as libpq's
/// pipeline mode does, is relayed both ways at once: the proxy never stops reading the
/// server's answers while it waits to hand the server more requests (the server, busy
/// writing answers, reads no requests until they are taken).
#[test]
fn large_pipelined_requests_and_answers_flow_both_ways_at_once() {
    let fixture = fixture(r#""trust""#);
    let mut reader = raw_login(&fixture, Duration::from_secs(30));
    // 30 MB of requests (each padded with a comment) for 100 MB of answers: more than the
    // sockets between client, proxy and server can hold in either direction.
    let queries = 100;
    let padding = "-".repeat(300_000);
    let query = format!("SELECT repeat('x', 1000000) /* {padding} */\0");
    let mut writer = reader.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        for _ in 0..queries {
            writer
                .write_all(&protocol_message(b'Q', query.as_bytes()))
                .unwrap();
        }
    });
    for answered in 0..queries {
        let answer = read_until_ready(&mut reader);
        assert!(
            answer
                .iter()
                .any(|(tag, body)| *tag == b'D' && body.len() > 1_000_000),
            "answer {answered} has no row"
        );
    }
    sending.join().unwrap();
}

#[test]
fn clients_connect_without_a_password_and_everything_relays() {
    let fixture = fixture(r#""trust""#);
    let mut client = fixture.connect();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, "app");

    prepared_statements_and_copy_both_ways(&mut client);
    // A large result.
    let big: i64 = client
        .query_one("SELECT sum(length(repeat('x', 1000) || id)) FROM t", &[])
        .unwrap()
        .get(0);
    assert!(big > 10_000_000);

    // LISTEN/NOTIFY across two proxied sessions.
    let mut listener = fixture.connect();
    notification_arrives(&mut listener, &mut client);

    // psql, as a person would.
    let output = std::process::Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &fixture.port().to_string(),
            "-d",
            "appdb",
            "-c",
            "SELECT 40 + 2",
        ])
        .env("PGUSER", "someone")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let metrics = http_get(fixture.proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_logins_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("secrets_proxy_login_seconds_count 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("secrets_proxy_login_seconds_bucket{le=\"+Inf\"} 3"),
        "{metrics}"
    );
    for counter in [
        "secrets_proxy_credential_cache_total{result=\"hit\"} 0",
        "secrets_proxy_relay_bytes_total{direction=\"to_server\"} 0",
        "secrets_proxy_relay_bytes_total{direction=\"to_client\"} 0",
    ] {
        assert!(!metrics.contains(counter), "{metrics}");
    }
    assert!(http_get(fixture.proxy.admin_address.unwrap(), "/health").ends_with("ok\n"));
}

/// The extended protocol with a prepared statement reused, then 10,000 rows copied into a new
/// table `t` and back out: what every relay must carry unchanged.
fn prepared_statements_and_copy_both_ways(client: &mut Client) {
    let statement = client.prepare("SELECT $1::int + 1").unwrap();
    for i in 0..100 {
        let n: i32 = client.query_one(&statement, &[&i]).unwrap().get(0);
        assert_eq!(n, i + 1);
    }
    client
        .batch_execute("CREATE TABLE t (id int, note text)")
        .unwrap();
    let mut writer = client.copy_in("COPY t FROM STDIN").unwrap();
    for i in 0..10_000 {
        writeln!(writer, "{i}\tnote {i}").unwrap();
    }
    writer.finish().unwrap();
    let mut out = String::new();
    client
        .copy_out("COPY t TO STDOUT")
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert_eq!(out.lines().count(), 10_000);
}

/// `listener` listens, `notifier` notifies, and the notification arrives.
fn notification_arrives(listener: &mut Client, notifier: &mut Client) {
    listener.batch_execute("LISTEN proxied").unwrap();
    notifier.batch_execute("NOTIFY proxied, 'hello'").unwrap();
    let notification = listener
        .notifications()
        .timeout_iter(Duration::from_secs(5))
        .next()
        .unwrap()
        .expect("a notification");
    assert_eq!(notification.payload(), "hello");
}

/// The admin port answers `/metrics` and `/health`, and 404 to anything else. It reads at most
/// 8 KiB of a request, and serves 64 requests at once: a 65th connection waits until one of
/// them ends, so a flood of idle connections cannot take tasks or memory without bound.
#[test]
fn the_admin_port_answers_what_it_knows_and_bounds_the_rest() {
    let fixture = fixture(r#""trust""#);
    let admin = fixture.proxy.admin_address.unwrap();
    let answer_of = |stream: &mut TcpStream, within: Duration| -> String {
        stream.set_read_timeout(Some(within)).unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };
    for elsewhere in ["/elsewhere", "/healthz", "/metrics/x"] {
        assert!(http_get(admin, elsewhere).starts_with("HTTP/1.1 404 Not Found"));
    }
    // Headers that do not end within 8 KiB are refused once 8 KiB have come, not after the
    // second a silent client is given.
    let mut endless = TcpStream::connect(admin).unwrap();
    endless
        .write_all(format!("GET /health HTTP/1.1\r\nx: {}", "a".repeat(9000)).as_bytes())
        .unwrap();
    let answer = answer_of(&mut endless, Duration::from_secs(3));
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
        "{answer}"
    );
    // 64 silent connections take every slot; a 65th request waits...
    let mut silent: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    let mut waiting = TcpStream::connect(admin).unwrap();
    waiting.write_all(b"GET /health HTTP/1.1\r\n\r\n").unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let unanswered = waiting.read(&mut [0u8; 1]).unwrap_err();
    assert!(
        matches!(
            unanswered.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "a 65th request was not left waiting while 64 were open: {unanswered}"
    );
    // ...until one of them ends (at once, not when the silent ones are let go, a second after
    // they came)...
    drop(silent.pop());
    assert!(answer_of(&mut waiting, Duration::from_millis(500)).ends_with("ok\n"));
    drop(silent);
    // ...or a second has passed: silent connections are let go, so a liveness probe behind
    // them waits about that long, not the answer's 5 s.
    let silent: Vec<TcpStream> = (0..64)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    let asked = std::time::Instant::now();
    assert!(http_get(admin, "/health").ends_with("ok\n"));
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "a probe behind 64 silent connections waited {:?}",
        asked.elapsed()
    );
    drop(silent);
}

#[test]
fn cancel_requests_reach_the_right_server_session() {
    let fixture = fixture(r#""trust""#);
    cancel_a_sleep(&mut fixture.connect(), &fixture.cluster);

    // A key the proxy never gave out is ignored, as PostgreSQL ignores one: here the pid of a
    // key it gave out, with another secret. The connection closes without an answer and the
    // statement goes on; with the right secret the same request cancels it.
    let mut stream = TcpStream::connect(fixture.proxy.tcp_address.unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(&startup_packet(
            3 << 16,
            &[("user", "app"), ("database", "appdb")],
        ))
        .unwrap();
    let greeting = read_until_ready(&mut stream);
    let key = &greeting.iter().find(|(tag, _)| *tag == b'K').unwrap().1;
    let word = |at: usize| i32::from_be_bytes(key[at..at + 4].try_into().unwrap());
    let (pid, secret) = (word(0), word(4));
    let cancel = |secret: i32| {
        length_prefixed(
            &[80_877_102i32, pid, secret]
                .iter()
                .flat_map(|word| word.to_be_bytes())
                .collect::<Vec<u8>>(),
        )
    };
    stream
        .write_all(&protocol_message(b'Q', b"SELECT pg_sleep(60)\0"))
        .unwrap();
    let mut db = fixture.cluster.superuser();
    let sleeping = |db: &mut Client| running(db, "SELECT pg_sleep(60)");
    wait_until("the sleep to run", Duration::from_secs(30), || {
        sleeping(&mut db)
    });
    assert!(raw_exchange(&fixture, &cancel(secret.wrapping_add(1))).is_empty());
    // Time for a cancel forwarded by mistake to land.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        sleeping(&mut db),
        "a cancel with a wrong secret stopped the statement"
    );
    assert!(raw_exchange(&fixture, &cancel(secret)).is_empty());
    let answer = read_until_ready(&mut stream);
    assert!(
        answer
            .iter()
            .any(|(tag, body)| *tag == b'E' && String::from_utf8_lossy(body).contains("57014")),
        "{answer:?}"
    );
}

/// Whether one server session is running `statement` now.
fn running(db: &mut Client, statement: &str) -> bool {
    db.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'",
        &[&statement],
    )
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// A long query cancelled through the proxy stops with 57014 and the session goes on. The
/// cancel is sent once the query runs on `cluster`: PostgreSQL drops one that finds its
/// session idle, and in transaction mode the client's key points nowhere until then.
fn cancel_a_sleep(client: &mut Client, cluster: &Cluster) {
    let token = client.cancel_token();
    let mut db = cluster.superuser();
    let canceller = std::thread::spawn(move || {
        wait_until("the sleep to run", Duration::from_secs(30), || {
            running(&mut db, "SELECT pg_sleep(30)")
        });
        token.cancel_query(NoTls).unwrap();
    });
    let started = Instant::now();
    // The simple protocol: no named statement, which transaction pooling could not carry.
    let error = client
        .batch_execute("SELECT pg_sleep(30)")
        .expect_err("the query should be cancelled");
    canceller.join().unwrap();
    assert_eq!(error.as_db_error().unwrap().code().code(), "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    client.batch_execute("SELECT 1").unwrap();
}

/// The store reached over its Unix socket, and a credential without a host: the route's
/// server is the store's, over the same socket, cancel requests included, also once the kernel
/// relays the session.
#[test]
fn servers_on_a_unix_socket() {
    let fixture = fixture(r#""trust""#);
    fixture
        .cluster
        .superuser()
        .execute(
            "SELECT secrets.put_secret_value('db/app', $1)",
            &[&r#"{"engine": "postgres", "dbname": "postgres", "username": "app", "password": "pw-0"}"#],
        )
        .unwrap();
    let proxy = RunningProxy::start(
        Config::parse(&format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [store]\nhost = \"{}\"\nport = {}\nuser = \"proxy\"\npassword = \"proxy-pw\"\n\
             [limits]\nkernel_relay_after_ms = 0\n\
             [[route]]\ndatabase = \"appdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n",
            fixture.cluster.socket_dir().display(),
            fixture.cluster.port
        ))
        .unwrap(),
    )
    .unwrap();
    let mut client = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=whoever dbname=appdb",
            proxy.tcp_address.unwrap().port()
        ),
        NoTls,
    )
    .unwrap();
    let row = client
        .query_one(
            "SELECT current_user::text, inet_server_addr() IS NULL AS over_unix_socket",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "app");
    assert!(
        row.get::<_, bool>(1),
        "the session should run over the Unix socket"
    );
    // The kernel relay takes Unix sockets too.
    wait_until(
        "the session to be handed over",
        Duration::from_secs(10),
        || {
            pg_secrets_e2e::metric(
                proxy.admin_address.unwrap(),
                "secrets_proxy_kernel_relay_active_sessions",
            ) == u64::from(may_load_ebpf())
        },
    );
    cancel_a_sleep(&mut client, &fixture.cluster);
    prepared_statements_and_copy_both_ways(&mut client);
}

#[test]
fn logins_ride_through_rotation_and_old_sessions_stay() {
    let fixture = fixture(r#""trust""#);
    let mut before = fixture.connect();

    // The server's password changes before the secret does (a rotator between "set" and
    // "finish"): CURRENT is refused, PENDING logs in.
    fixture.rotate("pw-1");
    let mut db = fixture.cluster.superuser();
    db.execute(
        "SELECT secrets.put_secret_value('db/app', $1, version_stages => '{PENDING}')",
        &[&credential_json(&fixture.cluster, "pw-2")],
    )
    .unwrap();
    db.batch_execute("ALTER ROLE app PASSWORD 'pw-2'").unwrap();
    let mut during = fixture.connect();
    during.query_one("SELECT 1", &[]).unwrap();

    // A password changed with no secret to match yet: the proxy backs off and retries until
    // the secret catches up (within the 5 s budget).
    db.batch_execute("ALTER ROLE app PASSWORD 'pw-3'").unwrap();
    let catch_up = {
        let json = credential_json(&fixture.cluster, "pw-3");
        let port = fixture.cluster.port;
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let mut db = Client::connect(
                &format!("host=127.0.0.1 port={port} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres"),
                NoTls,
            )
            .unwrap();
            db.execute("SELECT secrets.put_secret_value('db/app', $1)", &[&json])
                .unwrap();
        })
    };
    let started = Instant::now();
    let mut after = fixture.connect();
    catch_up.join().unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "the login waited for the new secret"
    );
    after.query_one("SELECT 1", &[]).unwrap();

    // Sessions opened before the rotations are untouched.
    before.query_one("SELECT 1", &[]).unwrap();
    during.query_one("SELECT 1", &[]).unwrap();
    let metrics = http_get(fixture.proxy.admin_address.unwrap(), "/metrics");
    assert!(
        !metrics.contains("login_retries_total{reason=\"refused\"} 0"),
        "{metrics}"
    );
}

/// The value of counter `line` (its name and labels) in the proxy's metrics.
fn counter(fixture: &Fixture, line: &str) -> u64 {
    pg_secrets_e2e::metric(fixture.admin(), line)
}

/// Waits until no client is being served: a session whose client left is back in the pool
/// (reset with DISCARD ALL) or closed.
fn wait_until_pooled(fixture: &Fixture) {
    wait_until("the sessions to be pooled", Duration::from_secs(30), || {
        counter(fixture, "secrets_proxy_active_clients") == 0
    });
}

/// What the proxy keeps ages out: a cached credential is fetched again after
/// `credential_ttl_secs` without any notification, and a pooled server session is not reused
/// past `server_lifetime_secs`, so a session logged in with a rotated-out password ends.
#[test]
fn cached_credentials_and_pooled_sessions_age_out() {
    let fixture = fixture_with(
        r#""trust""#,
        &[],
        ProxyExtras {
            limits: "credential_ttl_secs = 4\nserver_lifetime_secs = 6".into(),
            ..ProxyExtras::default()
        },
    );
    // Once its LISTEN has begun, the proxy empties its cache (a change may have come before):
    // only what it fetches after that stays cached.
    wait_until_listening(fixture.admin());
    let misses = r#"secrets_proxy_credential_cache_total{result="miss"}"#;
    let backend_pid = || scalar(&mut fixture.connect(), "SELECT pg_backend_pid()");
    let first = backend_pid();
    let fetched = counter(&fixture, misses);
    assert!(fetched >= 1);
    wait_until_pooled(&fixture);
    // At once: the same server session, the credential from the cache.
    assert_eq!(backend_pid(), first);
    assert_eq!(counter(&fixture, misses), fetched);
    std::thread::sleep(Duration::from_secs(7));
    // Past both: fetched again, and a new server session.
    assert_ne!(backend_pid(), first);
    assert!(counter(&fixture, misses) > fetched);
}

/// In a rotation's window (the server has the new password, CURRENT still the old one) the
/// first login learns that PENDING works; the logins after it try PENDING first, so the server
/// sees one refused login, not one per client. Once the labels move, CURRENT comes first again.
#[test]
fn a_rotation_window_costs_one_refused_login_not_one_per_client() {
    let fixture = fixture_with(
        r#""trust""#,
        &[],
        ProxyExtras {
            limits: "pool_max_idle = 0".into(),
            ..ProxyExtras::default()
        },
    );
    fixture.connect().query_one("SELECT 1", &[]).unwrap();
    let refused = r#"secrets_proxy_login_retries_total{reason="refused"}"#;
    assert_eq!(counter(&fixture, refused), 0);
    // Each change's notification must have been acted on before the logins that follow it: a
    // late one would end the preference for PENDING in the middle of the window.
    let notified = wait_until_listening(fixture.admin());

    let mut db = fixture.cluster.superuser();
    let pending: String = db
        .query_one(
            "SELECT secrets.put_secret_value('db/app', $1, version_stages => '{PENDING}')::text",
            &[&credential_json(&fixture.cluster, "pw-window")],
        )
        .unwrap()
        .get(0);
    db.batch_execute("ALTER ROLE app PASSWORD 'pw-window'")
        .unwrap();
    wait_until_notified(fixture.admin(), notified + 1);
    for _ in 0..5 {
        fixture.connect().query_one("SELECT 1", &[]).unwrap();
    }
    assert_eq!(counter(&fixture, refused), 1, "one refused login for five");

    // The labels move; the notification ends the preference, and CURRENT (now the new
    // password) logs in first, with no refusal.
    db.execute(
        "SELECT secrets.update_secret_version_stage('db/app', 'CURRENT', $1::text::uuid,
           (SELECT version_id FROM secrets.list_secret_version_ids('db/app')
            WHERE 'CURRENT' = ANY(version_stages)))",
        &[&pending],
    )
    .unwrap();
    let by_pending = r#"secrets_proxy_server_logins_total{stage="PENDING"}"#;
    let pending_logins = counter(&fixture, by_pending);
    assert_eq!(pending_logins, 5, "every login in the window used PENDING");
    wait_until_notified(fixture.admin(), notified + 2);
    for _ in 0..3 {
        fixture.connect().query_one("SELECT 1", &[]).unwrap();
    }
    assert_eq!(counter(&fixture, refused), 1);
    assert_eq!(
        counter(&fixture, by_pending),
        pending_logins,
        "no login used PENDING after the labels moved"
    );
}

/// A server that accepts connections and then says nothing holds a login for at most the
/// retry budget, not for the connect timeout of every stage in turn: CURRENT has its 4.5 s
/// timeout, PENDING and PREVIOUS share the 0.5 s left of the 5 s budget (before, 13.5 s).
#[test]
fn a_silent_server_holds_a_login_no_longer_than_the_retry_budget() {
    let fixture = fixture_with(
        r#""trust""#,
        &[],
        ProxyExtras {
            limits: "backend_connect_timeout_ms = 4500".into(),
            ..ProxyExtras::default()
        },
    );
    // Never accepted: the kernel completes the handshakes, and nothing is ever said.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let credential = format!(
        r#"{{"host": "127.0.0.1", "port": {}, "username": "app", "password": "pw-0"}}"#,
        silent.local_addr().unwrap().port()
    );
    let notified = wait_until_listening(fixture.admin());
    let mut db = fixture.cluster.superuser();
    for stages in ["{CURRENT}", "{CURRENT}", "{PENDING}"] {
        db.execute(
            "SELECT secrets.put_secret_value('db/app', $1, version_stages => $2::text::text[])",
            &[&credential, &stages],
        )
        .unwrap();
    }
    wait_until_notified(fixture.admin(), notified + 3);
    let started = Instant::now();
    let Err(error) = fixture.try_connect() else {
        panic!("a login to a server that says nothing succeeded");
    };
    let waited = started.elapsed();
    let db_error = error.as_db_error();
    assert_eq!(
        db_error.map(|db| db.code().code()),
        Some("08001"),
        "{error}"
    );
    assert!(
        db_error.is_some_and(|db| db.message().contains("no ready session")),
        "{error}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "the login took {waited:?}, past the 5 s budget"
    );
}

/// A client's settings reach the server (`options` and plain startup parameters), except a
/// login delay, which would hold a server connection slot past the proxy's login timeout;
/// refused with 42501, and the proxy serves the next client.
#[test]
fn settings_reach_the_server_but_a_login_delay_is_refused() {
    let fixture = fixture(r#""trust""#);
    let url = |options: &str| {
        format!(
            "host=127.0.0.1 port={} user=whoever dbname=appdb options='{options}'",
            fixture.port()
        )
    };
    let mut client =
        Client::connect(&url("-c statement_timeout=1234 --work-mem=2MB"), NoTls).unwrap();
    let settings: (String, String) = {
        let row = client
            .query_one(
                "SELECT current_setting('statement_timeout'), current_setting('work_mem')",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(settings, ("1234ms".to_string(), "2MB".to_string()));
    for (options, sqlstate) in [
        ("-c post_auth_delay=30", "42501"),
        ("--POST-AUTH-DELAY=30", "42501"),
        ("-W 30", "0A000"),
    ] {
        let Err(error) = Client::connect(&url(options), NoTls) else {
            panic!("{options} was let through");
        };
        assert_eq!(
            error.as_db_error().map(|db| db.code().code()),
            Some(sqlstate),
            "{options}: {error}"
        );
    }
    let mut packet = startup_packet(
        3 << 16,
        &[
            ("user", "whoever"),
            ("database", "appdb"),
            ("post_auth_delay", "30"),
        ],
    );
    let mut raw = TcpStream::connect(("127.0.0.1", fixture.port())).unwrap();
    raw.write_all(&packet).unwrap();
    packet.clear();
    raw.read_to_end(&mut packet).unwrap();
    assert!(String::from_utf8_lossy(&packet).contains("42501"));
    fixture.connect().query_one("SELECT 1", &[]).unwrap();
}

/// The proxy reads the credential JSON as the rotators do (a port given as a string logs in),
/// and a secret the store refuses for good (not credential JSON) ends the login at once with
/// 08006 naming the field, never the value, rather than after the whole retry budget.
#[test]
fn a_credential_is_read_as_the_rotators_read_it_and_a_bad_one_fails_at_once() {
    let fixture = fixture(r#""trust""#);
    let notified = wait_until_listening(fixture.admin());
    let mut db = fixture.cluster.superuser();
    let with_port_text = format!(
        r#"{{"host": "127.0.0.1", "port": "{}", "dbname": "postgres", "username": "app", "password": "pw-0"}}"#,
        fixture.cluster.port
    );
    db.execute(
        "SELECT secrets.put_secret_value('db/app', $1)",
        &[&with_port_text],
    )
    .unwrap();
    wait_until_notified(fixture.admin(), notified + 1);
    fixture.connect().query_one("SELECT 1", &[]).unwrap();

    // Twice, so that PREVIOUS is no credential either (a bad CURRENT alone falls back to it).
    for _ in 0..2 {
        db.execute(
            "SELECT secrets.put_secret_value('db/app', $1)",
            &[&r#"{"username": "app", "password": 31337}"#],
        )
        .unwrap();
    }
    wait_until_notified(fixture.admin(), notified + 3);
    let started = Instant::now();
    let Err(error) = fixture.try_connect() else {
        panic!("logged in with a credential that is not one");
    };
    let waited = started.elapsed();
    let db_error = error.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "08006");
    assert!(
        db_error.message().contains("\"password\" is not a string")
            && !db_error.message().contains("31337"),
        "{error}"
    );
    assert!(
        waited < Duration::from_secs(4),
        "a refusal that cannot change waited {waited:?}, as if for the 5 s budget"
    );
}

/// What goes wrong past the proxy reaches the client with the SQLSTATE that says what it is,
/// and never the password: a secret the store does not have, or one holding bytes rather than
/// a credential, ends the login at once (`08006`),
/// a server that is not listening (perhaps restarting) is `08001` once the retry budget is
/// spent, and the server's own refusals are passed on as they are, a database it does not have
/// (`3D000`) at once and a password it does not take (`28P01`) once the retry budget has found
/// no other. The proxy serves the good route
/// throughout.
#[test]
fn refusals_past_the_proxy_reach_the_client_with_their_own_sqlstates() {
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let route = |database: &str, secret: &str| {
        format!(
            "\n[[route]]\ndatabase = \"{database}\"\nsecret = \"{secret}\"\nallow = [\"trust\"]\n"
        )
    };
    let fixture = fixture_with(
        r#""trust""#,
        &[],
        ProxyExtras {
            route: [
                route("missing", "db/missing"),
                route("closed", "db/closed"),
                route("nodb", "db/nodb"),
                route("wrongpw", "db/wrongpw"),
                route("binary", "db/binary"),
            ]
            .concat(),
            ..ProxyExtras::default()
        },
    );
    let port = fixture.cluster.port;
    let mut db = fixture.cluster.superuser();
    for (secret, credential) in [
        (
            "db/closed",
            format!(
                r#"{{"host": "127.0.0.1", "port": {closed_port}, "username": "app", "password": "pw-0"}}"#
            ),
        ),
        (
            "db/nodb",
            format!(
                r#"{{"host": "127.0.0.1", "port": {port}, "dbname": "nosuchdb", "username": "app", "password": "pw-0"}}"#
            ),
        ),
        (
            "db/wrongpw",
            format!(
                r#"{{"host": "127.0.0.1", "port": {port}, "username": "app", "password": "not-pw-0"}}"#
            ),
        ),
    ] {
        db.execute(
            "SELECT secrets.create_secret($1, $2)",
            &[&secret, &credential],
        )
        .unwrap();
    }
    db.batch_execute("SELECT secrets.create_secret('db/binary', secret_binary => '\\x7b7d')")
        .unwrap();
    for (database, sqlstate, words, at_once) in [
        ("missing", "08006", "db/missing", true),
        ("binary", "08006", "holds a binary value", true),
        (
            "closed",
            "08001",
            "could not reach the database server",
            false,
        ),
        ("nodb", "3D000", "nosuchdb", true),
        ("wrongpw", "28P01", "password authentication failed", false),
    ] {
        let started = Instant::now();
        let Err(error) = Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=whoever dbname={database}",
                fixture.port()
            ),
            NoTls,
        ) else {
            panic!("{database}: logged in");
        };
        let waited = started.elapsed();
        let db_error = error
            .as_db_error()
            .unwrap_or_else(|| panic!("{database}: {error}"));
        assert_eq!(db_error.code().code(), sqlstate, "{database}: {error}");
        assert!(db_error.message().contains(words), "{database}: {error}");
        assert!(!db_error.message().contains("pw-0"), "{database}: {error}");
        if at_once {
            assert!(
                waited < Duration::from_secs(4),
                "{database}: a refusal that cannot change waited {waited:?}, as if for the 5 s budget"
            );
        }
        fixture.connect().query_one("SELECT 1", &[]).unwrap();
    }
}

/// A CURRENT value the server refuses while it accepts PREVIOUS (a rotation whose password
/// change never reached the server) still logs clients in, and the proxy warns, naming the
/// route and the secret but no value (the next label move would break every login), once a
/// minute rather than once per login.
#[test]
fn a_login_with_previous_is_warned_about_once_a_minute() {
    let cluster = cluster_with_app_credential(&[]);
    let (proxy, _, _) = proxy_process(&cluster, "proxy-previous");
    cluster
        .superuser()
        .execute(
            "SELECT secrets.put_secret_value('db/app', $1)",
            &[&credential_json(&cluster, "never-set-on-the-server")],
        )
        .unwrap();
    // Three clients at once, so three server logins, each refused CURRENT: one warning, not
    // one per login.
    let mut clients: Vec<_> = (0..3).map(|_| proxy.connect("appdb").unwrap()).collect();
    for client in &mut clients {
        assert_eq!(scalar(client, "SELECT current_user::text"), "app");
    }
    wait_until("the warning", Duration::from_secs(10), || {
        proxy.log().contains("accepted PREVIOUS")
    });
    let log = proxy.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("accepted PREVIOUS"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("WARN")
            && warnings[0].contains("db/app")
            && warnings[0].contains("appdb"),
        "{}",
        warnings[0]
    );
    assert!(!log.contains("never-set-on-the-server") && !log.contains("pw-0"));
    // Each session is logged at INFO with who connected and through which route.
    let sessions = log
        .lines()
        .filter(|line| line.contains("INFO") && line.contains("session started"))
        .filter(|line| line.contains("trusted client 127.0.0.1:") && line.contains("\"appdb\""))
        .count();
    assert_eq!(sessions, 3, "{log}");
}

/// A new connection per transaction, for four clients.
const RECONNECTING: &[&str] = &["-C", "-c", "4"];

/// Runs pgbench with `clients` (say, `RECONNECTING`) through the proxy for `seconds` while
/// `rotate` runs over and over; returns how many rotations happened. Fails on any failed
/// transaction.
fn pgbench_while(
    fixture: &Fixture,
    seconds: u64,
    clients: &[&str],
    mut rotate: impl FnMut(),
) -> u32 {
    let script = fixture.cluster.dir().join("select.sql");
    std::fs::write(&script, "SELECT 1;\n").unwrap();
    let pgbench = std::process::Command::new("pgbench")
        .args(["-n", "-j", "2", "-T", &(seconds + 1).to_string()])
        .args(clients)
        .arg("-f")
        .arg(&script)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &fixture.port().to_string(),
            "-U",
            "app",
            "appdb",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut rotations = 0;
    while Instant::now() < deadline {
        rotations += 1;
        rotate();
    }
    let output = pgbench.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .expect("pgbench summary");
    assert!(processed > 100, "{stdout}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    rotations
}

/// `pgbench_while`, with the password rotated every 100 ms or so.
fn pgbench_while_rotating(fixture: &Fixture, seconds: u64, clients: &[&str]) -> u32 {
    let mut count = 0;
    pgbench_while(fixture, seconds, clients, || {
        count += 1;
        fixture.rotate(&format!("pw-rotated-{count}"));
        std::thread::sleep(Duration::from_millis(100));
    })
}

#[test]
fn pgbench_sees_no_failure_while_the_password_rotates_over_and_over() {
    // The single-threaded runtime, where every other test has a thread per core: the logins
    // retrying through each change take turns with the relaying of every session.
    let fixture = fixture_with(
        r#""trust""#,
        &[],
        ProxyExtras {
            listen: "threads = 1".into(),
            ..ProxyExtras::default()
        },
    );
    let rotations = pgbench_while_rotating(&fixture, 5, RECONNECTING);
    assert!(rotations >= 5, "only {rotations} rotations");
}

/// The product path: the background worker rotates with `postgres-single-user` (create, set,
/// test, finish, each committed on its own), and between set and finish, when CURRENT is
/// already refused, the proxy logs in with PENDING.
#[test]
fn pgbench_sees_no_failure_while_the_worker_rotates_the_password() {
    let fixture = fixture_with(
        r#""trust""#,
        &[
            "pg_secrets.worker_naptime = 1",
            "pg_secrets.rotation_retry_delay = 1",
            // The credential names 127.0.0.1, served without TLS.
            "pg_secrets.rotator_sslmode = disable",
        ],
        ProxyExtras::default(),
    );
    let mut db = fixture.cluster.superuser();
    let rotated = |db: &mut Client| -> i64 {
        db.query_one(
            "SELECT count(*) FROM secrets.rotation WHERE state = 'succeeded'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    // Each rotation waits for the worker's next round (1 s), on two cores pgbench keeps busy.
    let rotations = pgbench_while(&fixture, 12, RECONNECTING, || {
        let before = rotated(&mut db);
        db.execute(
            "SELECT secrets.rotate_secret('db/app', rotator => 'postgres-single-user')",
            &[],
        )
        .unwrap();
        wait_until(
            "the worker to finish the rotation",
            Duration::from_secs(30),
            || rotated(&mut db) != before,
        );
    });
    assert!(rotations >= 3, "only {rotations} rotations");
    let failures: i64 = db
        .query_one(
            "SELECT coalesce(sum(attempts), 0) FROM secrets.rotation",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(failures, 0, "no rotation step failed");
}

/// A raw protocol connection to the proxy, logged in as `app` to `appdb` and ready for
/// queries, for tests that must send exactly the messages they choose.
fn raw_login(fixture: &Fixture, read_timeout: Duration) -> TcpStream {
    let mut stream = TcpStream::connect(fixture.proxy.tcp_address.unwrap()).unwrap();
    stream.set_read_timeout(Some(read_timeout)).unwrap();
    stream
        .write_all(&startup_packet(
            196608,
            &[("user", "app"), ("database", "appdb")],
        ))
        .unwrap();
    read_until_ready(&mut stream);
    stream
}

/// Sends raw bytes and returns what the proxy answered before closing.
fn raw_exchange(fixture: &Fixture, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(fixture.proxy.tcp_address.unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The proxy may answer (and stop reading) before all bytes are sent.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

/// `body` as a packet: its length (itself included) first.
fn length_prefixed(body: &[u8]) -> Vec<u8> {
    [&((body.len() + 4) as i32).to_be_bytes()[..], body].concat()
}

fn error_code(answer: &[u8]) -> String {
    assert_eq!(
        answer.first(),
        Some(&b'E'),
        "expected an ErrorResponse, got {answer:?}"
    );
    let text = String::from_utf8_lossy(&answer[5..]).into_owned();
    text.split('\0')
        .find_map(|field| field.strip_prefix('C'))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn bad_clients_get_a_clear_error_and_everyone_else_is_served() {
    let fixture = fixture(r#""peer:nobody-here""#);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "huge length",
            1_000_000_000i32.to_be_bytes().to_vec(),
            "08P01",
        ),
        ("negative length", (-5i32).to_be_bytes().to_vec(), "08P01"),
        ("garbage", b"GET / HTTP/1.1\r\n\r\n".to_vec(), "08P01"),
        (
            "parameters without their last NUL",
            length_prefixed(
                &[
                    &(3i32 << 16).to_be_bytes()[..],
                    b"user\0u\0database\0appdb\0",
                ]
                .concat(),
            ),
            "08P01",
        ),
        (
            "a user name that is not UTF-8",
            length_prefixed(
                &[
                    &(3i32 << 16).to_be_bytes()[..],
                    b"user\0\xffu\0database\0appdb\0\0",
                ]
                .concat(),
            ),
            "08P01",
        ),
        (
            "nothing but the protocol version",
            length_prefixed(&(3i32 << 16).to_be_bytes()),
            "08P01",
        ),
        (
            "unknown protocol",
            startup_packet(2 << 16, &[("user", "u")]),
            "0A000",
        ),
        (
            "no user",
            startup_packet(3 << 16, &[("database", "appdb")]),
            "08P01",
        ),
        (
            "unknown route",
            startup_packet(3 << 16, &[("user", "u"), ("database", "nope")]),
            "3D000",
        ),
        (
            "identity not allowed",
            startup_packet(3 << 16, &[("user", "u"), ("database", "appdb")]),
            "28000",
        ),
    ];
    for (what, bytes, sqlstate) in cases {
        let answer = raw_exchange(&fixture, &bytes);
        assert_eq!(error_code(&answer), sqlstate, "{what}");
        let message = String::from_utf8_lossy(&answer);
        assert!(
            !message.contains("pw-0") && !message.contains("proxy-pw"),
            "{what}: {message}"
        );
    }
    // A truncated packet: the proxy closes without hanging.
    let mut truncated = 100i32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0, 3, 0, 0, b'u']);
    let answer = raw_exchange(&fixture, &truncated);
    assert_eq!(error_code(&answer), "08P01");
    // An SSL request is declined with 'N', then the startup goes on in plaintext.
    let mut ssl_then_route = 8i32.to_be_bytes().to_vec();
    ssl_then_route.extend_from_slice(&80_877_103i32.to_be_bytes());
    ssl_then_route.extend_from_slice(&startup_packet(
        3 << 16,
        &[("user", "u"), ("database", "nope")],
    ));
    let answer = raw_exchange(&fixture, &ssl_then_route);
    assert_eq!(answer[0], b'N');
    assert_eq!(error_code(&answer[1..]), "3D000");
    // A GSSENCRequest is declined the same way (libpq's gssencmode=prefer then asks for SSL),
    // and each may come once: a repeated one gets no answer but PostgreSQL's error for a
    // request code it does not serve.
    let request = |code: i32| [8i32.to_be_bytes(), code.to_be_bytes()].concat();
    let (ssl, gss) = (request(80_877_103), request(80_877_104));
    let gss_ssl_then_route = [
        gss.clone(),
        ssl.clone(),
        startup_packet(3 << 16, &[("user", "u"), ("database", "nope")]),
    ]
    .concat();
    let answer = raw_exchange(&fixture, &gss_ssl_then_route);
    assert_eq!(&answer[..2], b"NN");
    assert_eq!(error_code(&answer[2..]), "3D000");
    for (requests, declined, code) in [
        ([ssl.clone(), gss.clone(), ssl.clone()], 2, "1234.5679"),
        ([gss.clone(), gss, ssl], 1, "1234.5680"),
    ] {
        let answer = raw_exchange(&fixture, &requests.concat());
        assert_eq!(&answer[..declined], &b"NN"[..declined]);
        assert_eq!(error_code(&answer[declined..]), "0A000");
        let message = String::from_utf8_lossy(&answer);
        assert!(
            message.contains(&format!("unsupported frontend protocol {code}")),
            "{message}"
        );
    }
    // A client that requires TLS gives up on 'N' with a clear message of its own.
    let error = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=u dbname=appdb sslmode=require",
            fixture.port()
        ),
        NoTls,
    )
    .err()
    .expect("the connection should be refused");
    assert!(
        error.to_string().to_lowercase().contains("tls") || error.to_string().contains("ssl"),
        "{error}"
    );
}

/// The operating-system user this test runs as: what the proxy sees on its Unix socket.
fn os_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| {
            String::from_utf8(
                std::process::Command::new("id")
                    .arg("-un")
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
            .trim()
            .to_string()
        })
}

/// The directory of the proxy's Unix socket, as a libpq host.
fn socket_dir(fixture: &Fixture) -> String {
    fixture
        .proxy
        .unix_path
        .as_ref()
        .unwrap()
        .parent()
        .unwrap()
        .display()
        .to_string()
}

#[test]
fn peer_identity_on_the_unix_socket() {
    let me = os_user();
    let fixture = fixture(&format!("\"peer:{me}\""));
    let dir = socket_dir(&fixture);
    let mut client = Client::connect(
        &format!(
            "host={dir} port={} user=whoever dbname=appdb",
            fixture.port()
        ),
        NoTls,
    )
    .unwrap();
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, "app");
    // Any OS user may open the socket (0o777 by default, as PostgreSQL's): peer identity, not
    // the process's umask, decides who gets in. As root, the postgres user is refused by the
    // proxy, not by the file system.
    let socket = fixture.proxy.unix_path.as_ref().unwrap();
    let mode = std::fs::metadata(socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);
    if pg_secrets_e2e::running_as_root() {
        let psql = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", "psql", "-X", "-w", "-c", "SELECT 1"])
            .arg(format!(
                "host={dir} port={} user=whoever dbname=appdb",
                fixture.port()
            ))
            .output()
            .unwrap();
        let refusal = String::from_utf8_lossy(&psql.stderr);
        assert!(refusal.contains("\"postgres\""), "{refusal}");
    }
    // The same route over TCP: a trusted loopback client is not the allowed peer.
    let error = Client::connect(
        &format!("host=127.0.0.1 port={} user=u dbname=appdb", fixture.port()),
        NoTls,
    )
    .err()
    .expect("the connection should be refused");
    assert_eq!(error.as_db_error().unwrap().code().code(), "28000");
}

#[test]
fn server_connections_are_reused_clean_and_only_when_idle() {
    let fixture = fixture(r#""trust""#);
    let pid_of = |client: &mut Client| -> i32 {
        client
            .query_one("SELECT pg_backend_pid()", &[])
            .unwrap()
            .get(0)
    };
    let mut first = fixture.connect();
    let first_pid = pid_of(&mut first);
    first
        .batch_execute("CREATE TEMP TABLE leftover (x int)")
        .unwrap();
    // COPY over the extended protocol: tokio-postgres sends a Sync that the server ignores.
    let mut copy = first.copy_in("COPY leftover FROM STDIN").unwrap();
    copy.write_all(b"1\n2\n").unwrap();
    copy.finish().unwrap();
    first
        .batch_execute("SET search_path = nowhere; PREPARE p AS SELECT 1;")
        .unwrap();
    drop(first);
    wait_until_pooled(&fixture);

    // The next client gets the same server session, reset: nothing of the first one remains.
    let mut second = fixture.connect();
    assert_eq!(
        pid_of(&mut second),
        first_pid,
        "the server connection was reused"
    );
    let search_path: String = second.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert!(!search_path.contains("nowhere"));
    let temp_tables: i64 = second
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'leftover'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(temp_tables, 0);
    assert!(
        second.batch_execute("EXECUTE p").is_err(),
        "prepared statements are gone"
    );

    // A client that leaves inside a transaction takes its server session with it.
    second.batch_execute("BEGIN; SELECT 1").unwrap();
    drop(second);
    wait_until_pooled(&fixture);
    let mut third = fixture.connect();
    assert_ne!(pid_of(&mut third), first_pid);
    let metrics = http_get(fixture.proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_pool_reuses_total 1"),
        "{metrics}"
    );
}

#[test]
fn the_last_known_credential_serves_for_a_while_when_the_store_is_down() {
    // The application's database and the secrets store are two clusters here, so the store
    // can go away while the database stays.
    let database = Cluster::start();
    database
        .superuser()
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'pw-0'")
        .unwrap();
    let mut store = Cluster::start();
    let mut db = store.superuser();
    db.batch_execute("CREATE ROLE proxy LOGIN PASSWORD 'proxy-pw' IN ROLE secrets_reader")
        .unwrap();
    for secret in ["db/app", "db/other"] {
        db.execute(
            "SELECT secrets.create_secret($1, $2)",
            &[&secret, &credential_json(&database, "pw-0")],
        )
        .unwrap();
    }
    drop(db);
    let proxy = RunningProxy::start(
        Config::parse(&format!(
            "[listen]\ntcp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [store]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"proxy\"\npassword = \"proxy-pw\"\n\
             [limits]\nstale_credential_secs = 10\nlogin_retry_budget_ms = 500\npool_max_idle = 0\n\
             [[route]]\ndatabase = \"appdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n\
             [[route]]\ndatabase = \"otherdb\"\nsecret = \"db/other\"\nallow = [\"trust\"]\n",
            store.port
        ))
        .unwrap(),
    )
    .unwrap();
    let admin = proxy.admin_address.unwrap();
    let connect_to = |database: &str| {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=u dbname={database}",
                proxy.tcp_address.unwrap().port()
            ),
            NoTls,
        )
    };
    let connect = || connect_to("appdb");
    wait_until_listening(admin);
    assert!(http_get(admin, "/ready").starts_with("HTTP/1.1 200 OK"));
    assert!(http_get(admin, "/ready").ends_with("\r\n\r\nready\n"));
    connect().unwrap().query_one("SELECT 1", &[]).unwrap();
    // The credential was fetched before this: the bound ends 10 s after it at the latest.
    let fetched_by = Instant::now();

    // Ready while the store is down only if every route has a credential to go on with.
    store.stop("immediate");
    wait_until(
        "the proxy to notice the store is down",
        Duration::from_secs(60),
        || http_get(admin, "/ready").starts_with("HTTP/1.1 503"),
    );
    let not_ready = http_get(admin, "/ready");
    assert!(
        not_ready.ends_with(
            "not ready: the secrets store is unreachable, and no last known credential serves \
             route \"otherdb\"\n"
        ),
        "{not_ready}"
    );
    let mut during = connect().expect("the last known credential still logs in");
    during.query_one("SELECT 1", &[]).unwrap();
    let metrics = http_get(proxy.admin_address.unwrap(), "/metrics");
    assert!(
        !metrics.contains("secrets_proxy_stale_credentials_served_total 0"),
        "{metrics}"
    );

    // Past the bound, the client is told the store is unreachable.
    std::thread::sleep(
        (fetched_by + Duration::from_secs(10)).saturating_duration_since(Instant::now()),
    );
    let error = connect().err().expect("no credential past the stale bound");
    let refused = error.as_db_error().unwrap();
    assert_eq!(refused.code().code(), "08006", "{error}");
    assert!(http_get(admin, "/ready").contains("serves route \"appdb\", route \"otherdb\"\n"));
    // It says why: the connection to the store was refused (the server is down), not only
    // that connecting failed.
    assert!(
        refused.message().contains("Connection refused"),
        "{}",
        refused.message()
    );
}

/// A secrets store that stops answering (its backends frozen, the connections open) counts as
/// unreachable after a few seconds: the last known credential serves, where the login used to
/// wait on the store for good.
#[test]
fn a_store_that_stops_answering_is_unreachable_and_the_last_credential_serves() {
    let fixture = fixture(r#""trust""#);
    let notified = wait_until_listening(fixture.admin());
    fixture.connect().query_one("SELECT 1", &[]).unwrap();
    let mut db = fixture.cluster.superuser();
    // The proxy's pooled store connections, not the one listening for changes.
    let frozen: Vec<String> = first_column(
        &mut db,
        "SELECT pid::text FROM pg_stat_activity \
             WHERE usename = 'proxy' AND query NOT LIKE 'LISTEN%'",
    );
    assert!(!frozen.is_empty());
    let signal = |name: &str| {
        for pid in &frozen {
            std::process::Command::new("kill")
                .args([name, pid])
                .status()
                .unwrap();
        }
    };
    signal("-STOP");
    // A change (the same credential again) drops the cached one: the next login asks the store.
    db.execute(
        "SELECT secrets.put_secret_value('db/app', $1)",
        &[&credential_json(&fixture.cluster, "pw-0")],
    )
    .unwrap();
    wait_until_notified(fixture.admin(), notified + 1);
    let port = fixture.port();
    let (done, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let connection = format!("host=127.0.0.1 port={port} user=u dbname=appdb");
        let result = Client::connect(&connection, NoTls).map(|mut client| {
            let served: String = client.query_one("SELECT 'served'", &[]).unwrap().get(0);
            served
        });
        let _ = done.send(result.map_err(|e| e.to_string()));
    });
    let answer = answer.recv_timeout(Duration::from_secs(30));
    signal("-CONT");
    assert_eq!(
        answer.expect("the login waited on the frozen store"),
        Ok("served".to_string())
    );
}

/// Servers that ask for cleartext, md5 or nothing at all (trust) are logged in to as they ask,
/// by default and when `[server_login] methods` lists that method alone, and
/// `methods = ["scram-sha-256"]` refuses each of them before the password is used: the client
/// gets `28000` naming the method, never the password.
#[test]
fn password_md5_and_trust_servers_and_the_methods_allowed() {
    let fixture = fixture(r#""trust""#);
    let mut db = fixture.cluster.superuser();
    // An md5 login needs the password stored as md5.
    db.batch_execute("SET password_encryption = 'md5'; ALTER ROLE app PASSWORD 'pw-0';")
        .unwrap();
    let proxy = |methods: &str| {
        RunningProxy::start(
            Config::parse(&format!(
                "[listen]\ntcp = \"127.0.0.1:0\"\n\
                 [store]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"proxy\"\npassword = \"proxy-pw\"\n\
                 [limits]\npool_max_idle = 0\n\
                 [server_login]\nmethods = [{methods}]\n\
                 [[route]]\ndatabase = \"appdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n",
                fixture.cluster.port
            ))
            .unwrap(),
        )
        .unwrap()
    };
    let every_method = proxy(r#""scram-sha-256", "md5", "password", "none""#);
    let scram_only = proxy(r#""scram-sha-256""#);
    let connect = |proxy: &RunningProxy| {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=whoever dbname=appdb",
                proxy.tcp_address.unwrap().port()
            ),
            NoTls,
        )
    };
    let user_through = |proxy: &RunningProxy| -> String {
        connect(proxy)
            .unwrap()
            .query_one("SELECT current_user::text", &[])
            .unwrap()
            .get(0)
    };
    let hba = fixture.cluster.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    for (hba_method, asked) in [("password", "password"), ("md5", "md5"), ("trust", "none")] {
        std::fs::write(
            &hba,
            format!("host all app 127.0.0.1/32 {hba_method}\n{rules}"),
        )
        .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(user_through(&every_method), "app", "{hba_method}");
        // So is a proxy that allows that method alone.
        let only_this = proxy(&format!("\"{asked}\""));
        assert_eq!(user_through(&only_this), "app", "{hba_method} alone");
        let Err(error) = connect(&scram_only) else {
            panic!("{hba_method}: logged in despite [server_login] methods");
        };
        let error = error
            .as_db_error()
            .unwrap_or_else(|| panic!("not an ErrorResponse: {error:?}"));
        assert_eq!(error.code().code(), "28000", "{error:?}");
        assert!(
            error
                .message()
                .contains(&format!("asked for {asked} authentication")),
            "{error:?}"
        );
        assert!(!error.message().contains("pw-0"));
    }
}

/// The first column of the first row of a simple-protocol query.
fn scalar(client: &mut Client, sql: &str) -> String {
    client
        .simple_query(sql)
        .unwrap()
        .into_iter()
        .find_map(|message| match message {
            postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a row")
}

/// Server sessions open as `app`, the route's user: the proxy's, since nothing else logs in
/// as `app`.
fn app_sessions(fixture: &Fixture) -> i64 {
    fixture
        .cluster
        .superuser()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .unwrap()
        .get(0)
}

fn transaction_mode(pool_size: usize, limits: &str) -> Fixture {
    let extras = ProxyExtras {
        limits: limits.into(),
        route: format!("pool_mode = \"transaction\"\npool_size = {pool_size}"),
        ..ProxyExtras::default()
    };
    fixture_with(r#""trust""#, &[], extras)
}

/// Transaction pooling: ten clients share two server sessions, each lent for one transaction
/// (or one statement outside a transaction) at a time.
#[test]
fn transaction_mode_lends_a_few_server_sessions_to_many_clients() {
    let fixture = transaction_mode(2, "pool_wait_timeout_ms = 1500");
    let mut clients: Vec<Client> = (0..10).map(|_| fixture.connect()).collect();
    for round in 0..3 {
        for (index, client) in clients.iter_mut().enumerate() {
            // The extended protocol with an unnamed statement, then the simple protocol.
            let expected = round * 100 + index as i32;
            let rows = client
                .query_typed(
                    "SELECT $1::int4",
                    &[(&expected, postgres::types::Type::INT4)],
                )
                .unwrap();
            assert_eq!(rows[0].get::<_, i32>(0), expected);
            assert_eq!(scalar(client, "SELECT 'ok'"), "ok");
        }
    }
    assert!(
        app_sessions(&fixture) <= 2,
        "more server sessions than pool_size"
    );

    // A transaction keeps its server session from BEGIN to COMMIT; the others share the rest.
    let mut waiting_client = clients.pop().unwrap();
    let (holder, others) = clients.split_first_mut().unwrap();
    holder
        .batch_execute("BEGIN; CREATE TEMP TABLE mine (x int) ON COMMIT DROP")
        .unwrap();
    let held = scalar(holder, "SELECT pg_backend_pid()");
    for client in others.iter_mut() {
        assert_ne!(scalar(client, "SELECT pg_backend_pid()"), held);
    }
    assert_eq!(scalar(holder, "SELECT pg_backend_pid()"), held);
    assert_eq!(scalar(holder, "SELECT count(*) FROM mine"), "0");

    // Both sessions lent: another client waits for one, and gets it at the next COMMIT.
    others[0].batch_execute("BEGIN").unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        sender
            .send(scalar(&mut waiting_client, "SELECT 42"))
            .unwrap();
        waiting_client
    });
    assert!(
        receiver.recv_timeout(Duration::from_millis(300)).is_err(),
        "a client got a server session while both were lent"
    );
    holder.batch_execute("COMMIT").unwrap();
    assert_eq!(receiver.recv_timeout(Duration::from_secs(5)).unwrap(), "42");
    let mut late = waiter.join().unwrap();

    // When none frees within pool_wait_timeout_ms, the client gets 53300 naming the route:
    // here a new client, whose login needs a session too. (A connected client gets the same
    // FATAL error, which the synchronous postgres crate reports only as a closed connection.)
    holder.batch_execute("BEGIN").unwrap();
    let Err(error) = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=app dbname=appdb",
            fixture.port()
        ),
        NoTls,
    ) else {
        panic!("a login got a server session while both were lent");
    };
    let error = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not an ErrorResponse: {error:?}"));
    assert_eq!(error.code().code(), "53300");
    assert!(
        error.message().contains("route \"appdb\"") && error.message().contains("pool_size of 2"),
        "{}",
        error.message()
    );
    assert!(late.simple_query("SELECT 1").is_err());
    holder.batch_execute("COMMIT").unwrap();
    others[0].batch_execute("COMMIT").unwrap();

    // A cancel request reaches whichever session runs the client's statement.
    cancel_a_sleep(&mut others[1], &fixture.cluster);

    // Between its transactions a client's cancel key points nowhere: it cannot stop another
    // client's statement on the session it used last. One session held, so the other client
    // runs on the very session the first one used.
    holder.batch_execute("BEGIN").unwrap();
    let last_used = scalar(&mut others[1], "SELECT pg_backend_pid()");
    let stale = others[1].cancel_token();
    let mut sleeper = fixture.connect();
    let sleeping = std::thread::spawn(move || {
        let pid = scalar(&mut sleeper, "SELECT pg_backend_pid()");
        let slept = sleeper.batch_execute("SELECT pg_sleep(2.5)");
        (pid, slept)
    });
    let mut db = fixture.cluster.superuser();
    wait_until("the sleep to run", Duration::from_secs(30), || {
        running(&mut db, "SELECT pg_sleep(2.5)")
    });
    stale.cancel_query(NoTls).unwrap();
    let (pid, slept) = sleeping.join().unwrap();
    assert_eq!(pid, last_used, "the sleeper ran on another session");
    slept.expect("a stale cancel key stopped another client's statement");
    holder.batch_execute("COMMIT").unwrap();

    // A client that leaves inside a transaction takes its session with it: never lent again
    // half done.
    holder.batch_execute("BEGIN").unwrap();
    let abandoned = scalar(holder, "SELECT pg_backend_pid()");
    drop(clients);
    let mut db = fixture.cluster.superuser();
    wait_until(
        "the abandoned session to close",
        Duration::from_secs(5),
        || {
            db.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1::text::int",
                &[&abandoned],
            )
            .unwrap()
            .get::<_, i64>(0)
                == 0
        },
    );
    let metrics = http_get(fixture.proxy.admin_address.unwrap(), "/metrics");
    let lent: u64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("secrets_proxy_pooled_transactions_total "))
        .and_then(|value| value.parse().ok())
        .expect("the metric");
    assert!(lent >= 60, "{metrics}");
}

/// Transaction pooling shares the route's sessions among clients that differ in user name and
/// application_name, and hands a session back after COPY over the extended protocol as libpq
/// sends it.
#[test]
fn transaction_mode_shares_sessions_across_client_parameters_and_after_copy() {
    let fixture = transaction_mode(2, "pool_wait_timeout_ms = 1500");
    let mut clients: Vec<Client> = (0..6)
        .map(|index| {
            Client::connect(
                &format!(
                    "host=127.0.0.1 port={} user=user{index} dbname=appdb application_name=app{index}",
                    fixture.port()
                ),
                NoTls,
            )
            .unwrap()
        })
        .collect();
    for client in clients.iter_mut() {
        assert_eq!(scalar(client, "SELECT current_user"), "app");
    }
    assert!(
        app_sessions(&fixture) <= 2,
        "more server sessions than pool_size"
    );

    let others = &mut clients;
    others[0]
        .batch_execute("CREATE TABLE copied (x int)")
        .unwrap();
    let (copier, answers) = copy_in_like_libpq(&fixture, "COPY copied FROM STDIN", b"1\n2\n3\n");
    assert!(
        answers
            .iter()
            .any(|(tag, body)| *tag == b'C' && body.starts_with(b"COPY 3")),
        "{answers:?}"
    );
    assert_eq!(scalar(&mut others[0], "SELECT count(*) FROM copied"), "3");
    // The copier, still connected, gave its session back: two others can hold both at once
    // (with the copier still holding one, the second BEGIN would end in 53300).
    others[0].batch_execute("BEGIN").unwrap();
    others[1].batch_execute("BEGIN; SELECT 1").unwrap();
    others[0].batch_execute("COMMIT").unwrap();
    others[1].batch_execute("COMMIT").unwrap();
    drop(copier);
}

fn protocol_message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut message = vec![tag];
    message.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    message.extend_from_slice(body);
    message
}

/// A client asking for protocol 3.2 with an option hears first, with NegotiateProtocolVersion,
/// that the session speaks 3.0 without that option; then the login goes on and queries work.
#[test]
fn a_newer_protocol_version_is_negotiated_down_to_3_0() {
    let fixture = fixture(r#""trust""#);
    let mut stream = TcpStream::connect(fixture.proxy.tcp_address.unwrap()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(&startup_packet(
            (3 << 16) | 2,
            &[
                ("user", "app"),
                ("database", "appdb"),
                ("_pq_.test_option", "1"),
            ],
        ))
        .unwrap();
    let greeting = read_until_ready(&mut stream);
    assert_eq!(
        greeting[0],
        (
            b'v',
            [
                &0i32.to_be_bytes()[..],
                &1i32.to_be_bytes(),
                b"_pq_.test_option\0"
            ]
            .concat()
        )
    );
    assert_eq!(greeting[1], (b'R', 0i32.to_be_bytes().to_vec()));
    stream
        .write_all(&protocol_message(b'Q', b"SELECT 'in 3.0'\0"))
        .unwrap();
    let answer = read_until_ready(&mut stream);
    assert!(
        answer
            .iter()
            .any(|(tag, body)| *tag == b'D' && String::from_utf8_lossy(body).contains("in 3.0")),
        "{answer:?}"
    );
}

/// Reads messages up to and including the first one tagged `last`.
fn read_until(stream: &mut TcpStream, last: u8) -> Vec<(u8, Vec<u8>)> {
    let mut messages = Vec::new();
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).unwrap();
        let length = i32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
        let mut body = vec![0u8; length - 4];
        stream.read_exact(&mut body).unwrap();
        messages.push((header[0], body));
        if header[0] == last {
            return messages;
        }
    }
}

/// Reads messages up to and including ReadyForQuery.
fn read_until_ready(stream: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    read_until(stream, b'Z')
}

/// COPY FROM STDIN the way libpq's `PQexecParams` and `PQputCopyEnd` send it: an unnamed
/// statement with Parse, Bind, Execute and Sync; once the server has asked for the data
/// (CopyInResponse), the data, then CopyDone and a second Sync. The server ignores the first
/// Sync while it reads the copy. Returns the connection, still open, and the server's answers.
fn copy_in_like_libpq(
    fixture: &Fixture,
    sql: &str,
    data: &[u8],
) -> (TcpStream, Vec<(u8, Vec<u8>)>) {
    let mut stream = raw_login(fixture, Duration::from_secs(10));
    let no_formats_or_parameters = [0u8; 6];
    let start = [
        protocol_message(b'P', &[b"\0", sql.as_bytes(), b"\0\0\0"].concat()),
        protocol_message(b'B', &[&b"\0\0"[..], &no_formats_or_parameters].concat()),
        protocol_message(b'E', b"\0\0\0\0\0"),
        protocol_message(b'S', b""),
    ]
    .concat();
    stream.write_all(&start).unwrap();
    let mut answers = read_until(&mut stream, b'G');
    let finish = [
        protocol_message(b'd', data),
        protocol_message(b'c', b""),
        protocol_message(b'S', b""),
    ]
    .concat();
    stream.write_all(&finish).unwrap();
    answers.extend(read_until_ready(&mut stream));
    (stream, answers)
}

/// CopyData outside a COPY, which the server ignores, does not make the proxy take the
/// client's requests for all answered: while a statement pipelined behind it still runs, the
/// session is not lent to another client, who would get that statement's rows for its own.
#[test]
fn transaction_mode_is_not_fooled_by_copy_data_outside_a_copy() {
    let fixture = transaction_mode(2, "pool_wait_timeout_ms = 5000");
    let mut liar = raw_login(&fixture, Duration::from_secs(10));
    let sql = b"SELECT 'forged' || pg_sleep(1)::text";
    let requests = [
        protocol_message(b'Q', b"SELECT 1\0"),
        protocol_message(b'd', b""),
        protocol_message(b'P', &[&b"\0"[..], sql, b"\0\0\0"].concat()),
        protocol_message(b'B', &[0u8; 8]),
        protocol_message(b'E', b"\0\0\0\0\0"),
        protocol_message(b'S', b""),
    ]
    .concat();
    liar.write_all(&requests).unwrap();
    read_until_ready(&mut liar);
    another_client_is_not_lent_the_liars_session(&fixture, &mut liar);
}

/// While a statement pipelined by `liar` sleeps on its session, another client asks and gets
/// its own answer; the liar then gets the statement's rows ('forged').
fn another_client_is_not_lent_the_liars_session(fixture: &Fixture, liar: &mut TcpStream) {
    let mut other = fixture.connect();
    assert_eq!(scalar(&mut other, "SELECT 'mine'"), "mine");
    let late = read_until_ready(liar);
    assert!(
        late.iter()
            .any(|(tag, body)| *tag == b'D' && body.windows(6).any(|w| w == b"forged")),
        "the liar gets its own rows: {late:?}"
    );
}

/// CopyData sent before any COPY, then a real COPY so that the counts of COPYs agree: the
/// Sync sent "inside" the false COPY is answered all the same, so a proxy counting it out
/// would take the session for settled while a statement pipelined behind it still runs, and
/// lend it to another client, who would get the liar's rows as its own.
#[test]
fn transaction_mode_is_not_fooled_by_copy_data_sent_before_a_copy() {
    let fixture = transaction_mode(2, "pool_wait_timeout_ms = 5000");
    fixture
        .connect()
        .batch_execute("CREATE TABLE copied (x int)")
        .unwrap();
    let mut liar = raw_login(&fixture, Duration::from_secs(10));
    let start = [
        protocol_message(b'd', b""),
        protocol_message(b'S', b""),
        protocol_message(b'Q', b"COPY copied FROM STDIN\0"),
    ]
    .concat();
    liar.write_all(&start).unwrap();
    read_until_ready(&mut liar);
    read_until(&mut liar, b'G');
    let rest = [
        protocol_message(b'd', b"1\n"),
        protocol_message(b'c', b""),
        protocol_message(b'Q', b"SELECT 1\0"),
        protocol_message(b'Q', b"SELECT 'forged' || pg_sleep(1)::text\0"),
    ]
    .concat();
    liar.write_all(&rest).unwrap();
    read_until_ready(&mut liar);
    read_until_ready(&mut liar);
    another_client_is_not_lent_the_liars_session(&fixture, &mut liar);
}

/// In transaction mode a client that sends part of a message and stops holds no server
/// session: with a pool of one, another client is served all the same.
#[test]
fn transaction_mode_lends_no_session_for_half_a_message() {
    let fixture = transaction_mode(1, "pool_wait_timeout_ms = 3000");
    let mut stalled: Vec<TcpStream> = (0..3)
        .map(|_| raw_login(&fixture, Duration::from_secs(10)))
        .collect();
    for (stream, part) in stalled
        .iter_mut()
        .zip([&b"Q"[..], b"Q\0\0\0\x22", b"Q\0\0\0\x22SEL"])
    {
        stream.write_all(part).unwrap();
    }
    let mut other = fixture.connect();
    assert_eq!(scalar(&mut other, "SELECT 'served'"), "served");
    // The stalled clients finish their messages and are answered.
    let rest = b"ECT 'finished', 1234567890\0";
    let message = [&b"Q\0\0\0\x22SEL"[..], &rest[..]].concat();
    assert_eq!(message.len(), 1 + 0x22, "the length the parts announce");
    for (stream, sent) in stalled.iter_mut().zip([1, 5, 8]) {
        stream.write_all(&message[sent..]).unwrap();
        let rows = read_until_ready(stream);
        assert!(
            rows.iter()
                .any(|(tag, body)| *tag == b'D' && body.windows(8).any(|w| w == b"finished")),
            "{rows:?}"
        );
    }
}

/// On a dual-stack listener (`[::]`) an IPv4 client on loopback comes as ::ffff:127.0.0.1,
/// and is on loopback all the same: `trust` lets it in.
#[test]
fn trust_knows_loopback_on_a_dual_stack_listener() {
    let cluster = cluster_with_app_credential(&[]);
    let config = proxy_config(&cluster, "[::]:0", r#""trust""#, &ProxyExtras::default());
    let proxy = RunningProxy::start(Config::parse(&config).unwrap()).unwrap();
    let port = proxy.tcp_address.unwrap().port();
    for host in ["127.0.0.1", "::1"] {
        let mut client = Client::connect(
            &format!("host={host} port={port} user=u dbname=appdb"),
            NoTls,
        )
        .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(scalar(&mut client, "SELECT current_user"), "app");
    }
}

/// A COPY the server ends by itself (on a bad row), with a Sync and a statement sent behind
/// the data: the server answers that Sync, which a count of the client's messages takes for
/// one the COPY ignored, so the session looks settled while the statement still runs. A
/// session that carried COPY data serves another client only once DISCARD ALL comes back
/// alone; here it does not (the statement's rows come first), and the session is closed.
#[test]
fn transaction_mode_is_not_fooled_by_a_copy_the_server_ends() {
    let fixture = transaction_mode(1, "pool_wait_timeout_ms = 5000");
    fixture
        .connect()
        .batch_execute("CREATE TABLE copied (x int)")
        .unwrap();
    let mut liar = raw_login(&fixture, Duration::from_secs(10));
    liar.write_all(&protocol_message(b'Q', b"COPY copied FROM STDIN\0"))
        .unwrap();
    read_until(&mut liar, b'G');
    let rest = [
        protocol_message(b'd', b"not a number\n"),
        protocol_message(b'S', b""),
        protocol_message(b'Q', b"SELECT 'forged' || pg_sleep(1)::text\0"),
    ]
    .concat();
    liar.write_all(&rest).unwrap();
    let copy_failed = read_until_ready(&mut liar);
    assert!(
        copy_failed.iter().any(|(tag, _)| *tag == b'E'),
        "{copy_failed:?}"
    );
    read_until_ready(&mut liar);
    // Another client with the liar's settings, so that it would be lent the liar's session.
    let mut other = raw_login(&fixture, Duration::from_secs(10));
    for mine in ["mine", "mine again"] {
        other
            .write_all(&protocol_message(
                b'Q',
                format!("SELECT '{mine}'\0").as_bytes(),
            ))
            .unwrap();
        let rows: Vec<String> = read_until_ready(&mut other)
            .into_iter()
            .filter(|(tag, _)| *tag == b'D')
            .map(|(_, body)| String::from_utf8_lossy(&body[6..]).into_owned())
            .collect();
        assert_eq!(rows, [mine], "the other client gets its own rows");
    }
}

/// Session pooling keeps at most `pool_max_idle_total` idle server connections in all:
/// clients that each send another `application_name` open a pool key each, and without the
/// total every key would park its own connection, until the server ran out of
/// `max_connections`.
#[test]
fn idle_server_connections_are_bounded_in_all_whatever_the_keys() {
    let extras = ProxyExtras {
        limits: "pool_max_idle_total = 3".into(),
        ..ProxyExtras::default()
    };
    let fixture = fixture_with(r#""trust""#, &[], extras);
    for index in 0..8 {
        let mut client = Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=whoever dbname=appdb application_name=churn{index}",
                fixture.port()
            ),
            NoTls,
        )
        .unwrap();
        assert_eq!(scalar(&mut client, "SELECT current_user"), "app");
    }
    wait_until(
        "idle server sessions closed down to the total",
        Duration::from_secs(10),
        || app_sessions(&fixture) == 3,
    );
    // The newest are kept: the last client's parameters find their session.
    let mut again = Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=whoever dbname=appdb application_name=churn7",
            fixture.port()
        ),
        NoTls,
    )
    .unwrap();
    assert_eq!(scalar(&mut again, "SELECT current_user"), "app");
    assert_eq!(app_sessions(&fixture), 3, "a pooled session served it");
}

/// Session pooling keeps at most `pool_max_idle` idle server connections per key (route and
/// startup parameters): five clients at once leave two behind, and the next client with those
/// parameters is served by one of them.
#[test]
fn idle_server_connections_are_bounded_per_key() {
    let extras = ProxyExtras {
        limits: "pool_max_idle = 2".into(),
        ..ProxyExtras::default()
    };
    let fixture = fixture_with(r#""trust""#, &[], extras);
    let mut clients: Vec<Client> = (0..5).map(|_| fixture.connect()).collect();
    for client in &mut clients {
        assert_eq!(scalar(client, "SELECT current_user"), "app");
    }
    assert_eq!(app_sessions(&fixture), 5);
    drop(clients);
    wait_until(
        "idle server sessions closed down to pool_max_idle",
        Duration::from_secs(10),
        || app_sessions(&fixture) == 2,
    );
    let mut again = fixture.connect();
    assert_eq!(scalar(&mut again, "SELECT current_user"), "app");
    assert_eq!(app_sessions(&fixture), 2, "a pooled session served it");
}

/// Clients that connect and say nothing are sent away after `client_login_timeout_ms`, so
/// silent connections cannot hold every one of `max_clients` for good.
#[test]
fn silent_clients_are_sent_away_and_cannot_hold_every_slot() {
    let extras = ProxyExtras {
        limits: "max_clients = 2\nclient_login_timeout_ms = 500".into(),
        ..ProxyExtras::default()
    };
    let fixture = fixture_with(r#""trust""#, &[], extras);
    let silent: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(fixture.proxy.tcp_address.unwrap()).unwrap())
        .collect();
    // Both slots are taken by the silent two: this client is served once they are gone
    // (without the timeout it would wait for good, hence the thread).
    let port = fixture.port();
    let (served, answer) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let connection = format!("host=127.0.0.1 port={port} user=whoever dbname=appdb");
        let mut client = Client::connect(&connection, NoTls).unwrap();
        let _ = served.send(scalar(&mut client, "SELECT 'served'"));
    });
    let answer = answer
        .recv_timeout(Duration::from_secs(30))
        .expect("a client was never served while silent ones held every slot");
    assert_eq!(answer, "served");
    for mut stream in silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert_eq!(error_code(&answer), "57014");
        assert!(String::from_utf8_lossy(&answer).contains("no startup packet within 500 ms"));
    }
}

/// One host's silent connections cannot lock everyone else out: past
/// `max_pending_logins_per_source` connections from one address that have not sent a startup
/// packet, the next from that address is refused at once with 53300, while clients from
/// elsewhere (here the Unix socket) are served, and the address is served again once its
/// silent connections are gone.
#[test]
fn one_source_cannot_hold_every_slot_with_silent_connections() {
    let extras = ProxyExtras {
        limits: "max_clients = 10\nmax_pending_logins_per_source = 3".into(),
        ..ProxyExtras::default()
    };
    let fixture = fixture_with(&format!(r#""trust", "peer:{}""#, os_user()), &[], extras);
    let address = fixture.proxy.tcp_address.unwrap();
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(address).unwrap())
        .collect();
    // Once the proxy has taken the three in, the fourth is refused at once.
    let admin = fixture.proxy.admin_address.unwrap();
    wait_until("the three to be taken in", Duration::from_secs(10), || {
        http_get(admin, "/metrics").contains("secrets_proxy_active_clients 3\n")
    });
    let mut fourth = TcpStream::connect(address).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut refused = Vec::new();
    let _ = fourth.read_to_end(&mut refused);
    assert_eq!(error_code(&refused), "53300");
    let text = String::from_utf8_lossy(&refused);
    assert!(
        text.contains("too many connections from 127.0.0.1"),
        "{text}"
    );
    assert!(text.contains("max_pending_logins_per_source"), "{text}");
    // A libpq client from the same address is refused the same way.
    let error = Client::connect(
        &format!("host=127.0.0.1 port={} user=u dbname=appdb", fixture.port()),
        NoTls,
    )
    .err()
    .expect("a fourth client from 127.0.0.1 should be refused");
    assert_eq!(error.as_db_error().unwrap().code().code(), "53300");
    // So is psql, which opens with an SSLRequest (sslmode=prefer): declined first, it shows
    // the refusal rather than a broken SSL exchange.
    let psql = std::process::Command::new(format!("{}/psql", pg_secrets_e2e::PG_BIN))
        .args(["-X", "-w", "-c", "SELECT 1"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", fixture.port().to_string())
        .env("PGUSER", "u")
        .env("PGDATABASE", "appdb")
        .env("PGSSLMODE", "prefer")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&psql.stderr);
    assert!(
        said.contains("too many connections from 127.0.0.1"),
        "{said}"
    );
    // Another source is served.
    let mut local = Client::connect(
        &format!(
            "host={} port={} user=u dbname=appdb",
            socket_dir(&fixture),
            fixture.port()
        ),
        NoTls,
    )
    .unwrap();
    assert_eq!(scalar(&mut local, "SELECT 'served'"), "served");
    // Once the silent ones leave, the address is served again.
    drop(silent);
    wait_until(
        "127.0.0.1 to be served again",
        Duration::from_secs(10),
        || {
            Client::connect(
                &format!("host=127.0.0.1 port={} user=u dbname=appdb", fixture.port()),
                NoTls,
            )
            .is_ok()
        },
    );
}

/// A client that prepares a named statement (tokio-postgres's `prepare` and `query`) keeps
/// its server session from then on, since the statement lives there; when it leaves, the
/// session is reset before it serves anyone else.
#[test]
fn transaction_mode_keeps_a_session_for_a_client_with_named_statements() {
    let fixture = transaction_mode(2, "pool_wait_timeout_ms = 3000");
    let pid = |client: &mut Client| scalar(client, "SELECT pg_backend_pid()");
    let mut preparer = fixture.connect();
    let mut others: Vec<Client> = (0..4).map(|_| fixture.connect()).collect();
    let statement = preparer.prepare("SELECT $1::int4 + 1").unwrap();
    let kept = pid(&mut preparer);
    for round in 0..5 {
        for other in others.iter_mut() {
            assert_ne!(
                pid(other),
                kept,
                "another client got the preparer's session"
            );
        }
        let row = preparer.query_one(&statement, &[&round]).unwrap();
        assert_eq!(row.get::<_, i32>(0), round + 1);
        assert_eq!(pid(&mut preparer), kept);
    }
    let metrics = http_get(fixture.proxy.admin_address.unwrap(), "/metrics");
    assert!(
        metrics.contains("secrets_proxy_pinned_clients_total 1\n"),
        "counted while it holds the session: {metrics}"
    );
    drop(preparer);
    // Both sessions lent at once: one is the preparer's, without its statement.
    others[0].batch_execute("BEGIN").unwrap();
    others[1].batch_execute("BEGIN").unwrap();
    let mut pids = Vec::new();
    for other in &mut others[..2] {
        pids.push(pid(other));
        assert_eq!(
            scalar(other, "SELECT count(*) FROM pg_prepared_statements"),
            "0"
        );
        other.batch_execute("COMMIT").unwrap();
    }
    assert!(pids.contains(&kept), "{pids:?} should include {kept}");
}

/// Transaction pooling through rotations: steady clients and a new connection per
/// transaction, at most pool_size server sessions, and no failed transaction.
#[test]
fn transaction_mode_sees_no_failure_while_the_password_rotates() {
    let fixture = transaction_mode(3, "");
    let mut count = 0;
    for clients in [&["-c", "8", "-M", "extended"][..], &["-C", "-c", "8"][..]] {
        let rotations = pgbench_while(&fixture, 4, clients, || {
            count += 1;
            fixture.rotate(&format!("pw-rotated-{count}"));
            assert!(
                app_sessions(&fixture) <= 3,
                "more server sessions than pool_size"
            );
            std::thread::sleep(Duration::from_millis(100));
        });
        assert!(rotations >= 5, "only {rotations} rotations");
    }
}

/// The proxy's signals, sent to the real process: SIGHUP reloads the routes without dropping
/// a connected client; SIGTERM turns new clients away, lets connected ones finish and exits
/// when they have left, or closes them when the drain timeout has passed; SIGINT stops at
/// once, drain timeout or not.
#[test]
fn signals_reload_drain_and_stop_the_proxy_process() {
    let cluster = cluster_with_app_credential(&[]);
    let port = pg_secrets_e2e::free_port();
    let config_file = cluster.dir().join("proxy-process.toml");
    let config = |drain_timeout_secs: u64| {
        let extras = ProxyExtras {
            limits: format!("drain_timeout_secs = {drain_timeout_secs}"),
            ..ProxyExtras::default()
        };
        proxy_config(
            &cluster,
            &format!("127.0.0.1:{port}"),
            r#""trust""#,
            &extras,
        )
    };
    let other_route =
        "\n[[route]]\ndatabase = \"otherdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n";

    // SIGHUP: a route added to the file serves new clients; the connected client stays. The
    // listeners and their threads, and the store's connections, stay as they started, and
    // the log says so.
    std::fs::write(&config_file, config(60)).unwrap();
    let mut proxy = ProxyProcess::start(&config_file, port);
    let mut connected = proxy.connect("appdb").unwrap();
    assert!(proxy.connect("otherdb").is_err(), "no such route yet");
    let more_threads = config(60)
        .replace("[listen]", "[listen]\nthreads = 3")
        .replace("[store]", "[store]\npool_size = 3");
    std::fs::write(&config_file, more_threads + other_route).unwrap();
    proxy.signal("HUP");
    wait_until("the new route", Duration::from_secs(30), || {
        proxy.connect("otherdb").is_ok()
    });
    assert_eq!(scalar(&mut connected, "SELECT 'still here'"), "still here");
    let log = proxy.log();
    assert!(
        log.contains("[listen] takes effect at the next start")
            && log.contains("[store] takes effect at the next start"),
        "{log}"
    );

    // A limit the running parts were built with is kept until the next start, and the file
    // is checked against it: a transaction-mode route larger than the pool the proxy has is
    // refused, whatever pool_max_idle the file now asks for.
    let growing = format!(
        "{}\n[[route]]\ndatabase = \"bigdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n\
         pool_mode = \"transaction\"\npool_size = 500\n",
        config(60).replace(
            "drain_timeout_secs = 60",
            "drain_timeout_secs = 60\npool_max_idle = 500\npool_max_idle_total = 1000"
        )
    );
    std::fs::write(&config_file, growing).unwrap();
    proxy.signal("HUP");
    wait_until("the refused reload", Duration::from_secs(30), || {
        proxy.log().contains("configuration not reloaded")
    });
    let log = proxy.log();
    assert!(log.contains("take effect at the next start"), "{log}");
    assert!(
        log.contains("pool_max_idle (now 100) at least its pool_size (500)"),
        "{log}"
    );
    assert!(
        proxy.connect("bigdb").is_err(),
        "the refused file changed nothing"
    );
    assert!(proxy.connect("otherdb").is_ok());

    // A file whose TLS certificate cannot be loaded is refused the same way, and changes
    // nothing: the route it adds does not serve.
    let missing = cluster.dir().join("missing.pem");
    let unloadable = format!(
        "{base}{other_route}\n[[route]]\ndatabase = \"tlsdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n\
         [tls]\ncert_file = \"{missing}\"\nkey_file = \"{missing}\"\n",
        base = config(60),
        missing = missing.display()
    );
    std::fs::write(&config_file, unloadable).unwrap();
    proxy.signal("HUP");
    wait_until(
        "the reload refused for its certificate",
        Duration::from_secs(30),
        || proxy.log().matches("configuration not reloaded").count() == 2,
    );
    assert!(proxy.log().contains("[tls] cert_file"), "{}", proxy.log());
    assert!(
        proxy.connect("tlsdb").is_err(),
        "the refused file changed nothing"
    );
    assert!(proxy.connect("otherdb").is_ok());

    // SIGTERM: new clients are turned away; the connected one finishes its transaction, and
    // once it leaves the proxy exits, long before the 60 s drain timeout.
    connected.batch_execute("BEGIN").unwrap();
    // Accepted by the proxy before the signal (the kernel completes a connection the proxy
    // has not taken yet): its SSLRequest has been declined.
    let mut opening = TcpStream::connect(("127.0.0.1", port)).unwrap();
    opening
        .write_all(&[8i32.to_be_bytes(), 80_877_103i32.to_be_bytes()].concat())
        .unwrap();
    let mut declined = [0u8; 1];
    opening.read_exact(&mut declined).unwrap();
    assert_eq!(&declined, b"N");
    proxy.signal("TERM");
    wait_until(
        "new clients to be turned away",
        Duration::from_secs(30),
        || proxy.connect("appdb").is_err(),
    );
    // A client that connected before and starts up after is told why, with 57P01.
    opening
        .write_all(&startup_packet(
            3 << 16,
            &[("user", "u"), ("database", "appdb")],
        ))
        .unwrap();
    let mut answer = Vec::new();
    let _ = opening.read_to_end(&mut answer);
    assert_eq!(error_code(&answer), "57P01");
    assert_eq!(scalar(&mut connected, "SELECT 'finishing'"), "finishing");
    connected.batch_execute("COMMIT").unwrap();
    drop(connected);
    let status = proxy.exits_within(Duration::from_secs(20), "the proxy to exit once drained");
    assert!(status.success(), "{status}");

    // SIGTERM with a client that stays: closed when the 2 s drain timeout has passed.
    std::fs::write(&config_file, config(2)).unwrap();
    let mut proxy = ProxyProcess::start(&config_file, port);
    let mut staying = proxy.connect("appdb").unwrap();
    proxy.signal("TERM");
    proxy.exits_within(Duration::from_secs(30), "the drain timeout");
    assert!(
        staying.simple_query("SELECT 1").is_err(),
        "closed at the drain timeout"
    );

    // SIGINT: stops at once with a client connected, well before a 60 s drain timeout.
    std::fs::write(&config_file, config(60)).unwrap();
    let mut proxy = ProxyProcess::start(&config_file, port);
    let mut interrupted = proxy.connect("appdb").unwrap();
    proxy.signal("INT");
    proxy.exits_within(Duration::from_secs(20), "SIGINT to stop the proxy");
    assert!(interrupted.simple_query("SELECT 1").is_err());

    // SIGINT during a drain that a client holds up: stops at once too.
    let mut proxy = ProxyProcess::start(&config_file, port);
    let mut draining = proxy.connect("appdb").unwrap();
    proxy.signal("TERM");
    wait_until("the drain to begin", Duration::from_secs(30), || {
        proxy.connect("appdb").is_err()
    });
    proxy.signal("INT");
    proxy.exits_within(Duration::from_secs(20), "SIGINT to stop the drain");
    assert!(draining.simple_query("SELECT 1").is_err());
}

/// `trust` holds for loopback clients only: a client reaching the proxy on another address of
/// the machine is refused with 28000, unless `allow_trust_from_non_loopback` says otherwise.
#[test]
fn trust_is_refused_to_clients_beyond_loopback() {
    // The machine's own address on its default route (a UDP connect sends nothing). A machine
    // with no route out has no such address, and nothing to test.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    if let Err(error) = probe.connect("198.51.100.1:9") {
        eprintln!("skipped: no non-loopback IPv4 address on this machine ({error})");
        return;
    }
    let address = probe.local_addr().unwrap().ip();
    assert!(!address.is_loopback(), "{address}");
    let cluster = cluster_with_app_credential(&[]);
    // The proxy is returned too: dropping it would close the client's connection.
    let connect = |config: &str| {
        let proxy = RunningProxy::start(Config::parse(config).unwrap()).unwrap();
        let client = Client::connect(
            &format!(
                "host={address} port={} user=app dbname=appdb",
                proxy.tcp_address.unwrap().port()
            ),
            NoTls,
        );
        (proxy, client)
    };
    let config = proxy_config(&cluster, "0.0.0.0:0", r#""trust""#, &ProxyExtras::default());
    let error = connect(&config).1.err().expect("trust beyond loopback");
    let db_error = error.as_db_error().expect("a server error");
    assert_eq!(db_error.code().code(), "28000", "{error}");
    let forced = config.replace(
        "[listen]",
        "[listen]\n        allow_trust_from_non_loopback = true",
    );
    let (_proxy, client) = connect(&forced);
    let mut client = client.unwrap();
    assert_eq!(scalar(&mut client, "SELECT current_user::text"), "app");
}

/// `check-config` answers as a deployment script needs: 0 and "ok" for a file the proxy starts
/// with; 1 naming the problem for one it would not start with, a TLS file or the store's
/// password file that cannot be read (the store's CA among them), a key that is not the
/// certificate's (the proxy's own, or its client certificate for servers), or a CA file with
/// no certificate included (before, those passed and the start failed), and for a file that is
/// not there; 2 with the usage for no arguments. `--config` with a bad file exits 1 without listening.
#[test]
fn check_config_says_whether_the_proxy_would_start() {
    let cluster = cluster_with_app_credential(&[]);
    let good = proxy_config(
        &cluster,
        "127.0.0.1:0",
        r#""trust""#,
        &ProxyExtras::default(),
    );
    let missing = cluster.dir().join("missing.pem");
    let empty = cluster.dir().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let pki = pg_secrets_e2e::pki::make_pki(cluster.dir());
    let tls = |cert: &std::path::Path, key: &std::path::Path, extra: &str| {
        format!(
            "{good}\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
            cert.display(),
            key.display()
        )
    };
    let cases = [
        ("good", good.clone(), 0, "ok, 1 routes"),
        (
            "empty-database",
            good.replace("\"appdb\"", "\"\""),
            1,
            "database must not be empty",
        ),
        (
            "tls-missing",
            format!(
                "{good}\n[tls]\ncert_file = \"{0}\"\nkey_file = \"{0}\"\n",
                missing.display()
            ),
            1,
            "[tls] cert_file",
        ),
        (
            "password-file-missing",
            good.replace(
                "password = \"proxy-pw\"",
                &format!("password_file = \"{}\"", missing.display()),
            ),
            1,
            "password_file",
        ),
        (
            "tls-key-of-another-certificate",
            tls(&pki.server_cert, &pki.client_key, ""),
            1,
            "[tls] cert_file/key_file",
        ),
        (
            "client-ca-without-certificates",
            tls(
                &pki.server_cert,
                &pki.server_key,
                &format!("client_ca_file = \"{}\"\n", empty.display()),
            ),
            1,
            "[tls] client_ca_file",
        ),
        (
            "server-ca-without-certificates",
            format!(
                "{good}\n[server_tls]\nsslmode = \"verify-full\"\nca_file = \"{}\"\n",
                empty.display()
            ),
            1,
            "no certificate in the file",
        ),
        (
            "store-ca-missing",
            good.replace(
                "user = \"proxy\"",
                &format!(
                    "user = \"proxy\"\nsslmode = \"verify-full\"\nca_file = \"{}\"",
                    missing.display()
                ),
            ),
            1,
            "[store] ca_file",
        ),
        (
            "server-client-key-of-another-certificate",
            format!(
                "{good}\n[server_tls]\nsslmode = \"require\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                pki.client_cert.display(),
                pki.server_key.display()
            ),
            1,
            "[server_tls] cert_file and key_file",
        ),
        ("config-file-missing", String::new(), 1, "cannot read"),
    ];
    for (name, text, code, words) in cases {
        let file = cluster.dir().join(format!("check-{name}.toml"));
        if !text.is_empty() {
            std::fs::write(&file, text).unwrap();
        }
        let output = std::process::Command::new(pg_secrets_e2e::proxy_binary())
            .arg("check-config")
            .arg(&file)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(if code == 0 {
            &output.stdout
        } else {
            &output.stderr
        })
        .into_owned();
        assert_eq!(output.status.code(), Some(code), "{name}: {said}");
        assert!(said.contains(words), "{name}: {said}");
        assert!(!said.contains("proxy-pw"), "{name}: {said}");
        if code != 0 {
            let started = std::process::Command::new(pg_secrets_e2e::proxy_binary())
                .arg("--config")
                .arg(&file)
                .output()
                .unwrap();
            assert_eq!(started.status.code(), Some(1), "{name}");
        }
    }
    let usage = std::process::Command::new(pg_secrets_e2e::proxy_binary())
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("usage: secrets-proxy"));
}

/// SIGTERM in transaction mode: a client between transactions is told the proxy is shutting
/// down (57P01) and let go, so the drain ends long before its timeout, rather than serving it
/// on until the timeout cuts it off in the middle of a transaction. A client inside one
/// finishes it first, and reads its COMMIT's answer before it is told.
#[test]
fn a_drain_lets_transaction_mode_clients_go_between_transactions() {
    let cluster = cluster_with_app_credential(&[]);
    let port = pg_secrets_e2e::free_port();
    let config_file = cluster.dir().join("draining.toml");
    let extras = ProxyExtras {
        limits: "drain_timeout_secs = 60".into(),
        route: "pool_mode = \"transaction\"\npool_size = 2".into(),
        ..ProxyExtras::default()
    };
    let config = proxy_config(
        &cluster,
        &format!("127.0.0.1:{port}"),
        r#""trust""#,
        &extras,
    );
    std::fs::write(&config_file, config).unwrap();
    let mut proxy = ProxyProcess::start(&config_file, port);
    let mut idle = proxy.connect("appdb").unwrap();
    let mut busy = proxy.connect("appdb").unwrap();
    assert_eq!(scalar(&mut idle, "SELECT 'before'"), "before");
    busy.batch_execute("BEGIN").unwrap();
    proxy.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(scalar(&mut busy, "SELECT 'inside'"), "inside");
    busy.batch_execute("COMMIT").unwrap();
    proxy.exits_within(
        Duration::from_secs(20),
        "the drain to end with its clients let go",
    );
    let error = idle
        .simple_query("SELECT 'after'")
        .expect_err("the idle client was let go");
    if let Some(db_error) = error.as_db_error() {
        assert_eq!(db_error.code().code(), "57P01", "{error}");
    }
    assert!(
        proxy.log().contains("the proxy is shutting down"),
        "{}",
        proxy.log()
    );
}

/// A SIGHUP that changes `[server_tls]` drops the idle pooled sessions, and a session in use
/// at the reload is not pooled when its client leaves: it was opened under the old rules.
#[test]
fn a_server_tls_reload_pools_no_session_opened_under_the_old_rules() {
    let cluster = cluster_with_app_credential(&[]);
    let (proxy, config_file, config) = proxy_process(&cluster, "proxy-process");
    let app_sessions = || -> i64 {
        cluster
            .superuser()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut in_use = proxy.connect("appdb").unwrap();
    assert_eq!(scalar(&mut in_use, "SELECT 'before'"), "before");
    std::fs::write(
        &config_file,
        config + "\n[server_tls]\nsslmode = \"require\"\n",
    )
    .unwrap();
    // Logins in flight while the reload runs: one that read the old rules must not end up
    // in the pool, where the clients after the reload would be served by it.
    let reloaded = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !reloaded.load(Ordering::SeqCst) {
                let _ = proxy.connect("appdb");
            }
        });
        proxy.signal("HUP");
        wait_until("the reload", Duration::from_secs(30), || {
            proxy.connect("appdb").is_err()
        });
        reloaded.store(true, Ordering::SeqCst);
    });
    for _ in 0..5 {
        assert!(
            proxy.connect("appdb").is_err(),
            "a plaintext session after the reload"
        );
    }
    assert_eq!(scalar(&mut in_use, "SELECT 'still here'"), "still here");
    drop(in_use);
    wait_until(
        "the session opened before the reload to be closed, not pooled",
        Duration::from_secs(10),
        || app_sessions() == 0,
    );
}

/// A server on a free port that answers every login with `turns`: the first after the
/// startup packet, each next one after one more message from the proxy. Keeps every byte the
/// proxy sent it. Serves until dropped.
struct HostileServer {
    port: u16,
    stop: Arc<AtomicBool>,
    received: Arc<std::sync::Mutex<Vec<u8>>>,
    serving: Option<std::thread::JoinHandle<()>>,
}

impl HostileServer {
    fn start(turns: Vec<Vec<u8>>) -> HostileServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = received.clone();
        let serving = std::thread::spawn(move || {
            for mut server in listener.incoming().flatten() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                server
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                // The startup packet has no tag; what the proxy sends next has one.
                let read_message = |server: &mut TcpStream, tagged: bool| -> bool {
                    let mut header = vec![0u8; if tagged { 5 } else { 4 }];
                    if server.read_exact(&mut header).is_err() {
                        return false;
                    }
                    let length = &header[header.len() - 4..];
                    let length = i32::from_be_bytes(length.try_into().unwrap());
                    let mut body = vec![0u8; (length as usize).saturating_sub(4)];
                    let whole = server.read_exact(&mut body).is_ok();
                    kept.lock().unwrap().extend(header.iter().chain(&body));
                    whole
                };
                if !read_message(&mut server, false) {
                    continue;
                }
                for (turn, answer) in turns.iter().enumerate() {
                    if turn > 0 && !read_message(&mut server, true) {
                        break;
                    }
                    let _ = server.write_all(answer);
                }
                let mut rest = Vec::new();
                let _ = server.read_to_end(&mut rest);
                kept.lock().unwrap().extend(rest);
            }
        });
        HostileServer {
            port,
            stop,
            received,
            serving: Some(serving),
        }
    }

    /// Points the fixture's route secret at this server, and waits until a client of the proxy
    /// is refused with `08P01` and a message containing `words`.
    fn refuses_logins_with(&self, fixture: &Fixture, words: &str) {
        let credential = format!(
            r#"{{"host": "127.0.0.1", "port": {}, "username": "app", "password": "pw-0"}}"#,
            self.port
        );
        fixture
            .cluster
            .superuser()
            .execute(
                "SELECT secrets.put_secret_value('db/app', $1)",
                &[&credential],
            )
            .unwrap();
        // Once the proxy has heard of the change, logins go to this server.
        let mut refusal = None;
        wait_until(words, Duration::from_secs(30), || {
            refusal = fixture.try_connect().err();
            refusal
                .as_ref()
                .and_then(postgres::Error::as_db_error)
                .is_some_and(|db| db.message().contains(words))
        });
        let error = refusal.unwrap();
        assert_eq!(
            error.as_db_error().map(|db| db.code().code()),
            Some("08P01"),
            "{error}"
        );
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        // One more connection wakes the server up to see that it is done.
        self.stop.store(true, Ordering::SeqCst);
        drop(TcpStream::connect(("127.0.0.1", self.port)));
        if let Some(serving) = self.serving.take() {
            let _ = serving.join();
        }
    }
}

fn authentication(code: i32, data: &[u8]) -> Vec<u8> {
    protocol_message(b'R', &[&code.to_be_bytes()[..], data].concat())
}

/// A server that floods the proxy before its ReadyForQuery (over a thousand messages, a few
/// large ones past 256 KiB, or one that says it is over 1 MiB long) is not believed: the client
/// gets `08P01` naming the limit, and the proxy keeps nothing of it (a message that would pass
/// 256 KiB is refused before anything is allocated for it).
/// Messages before AuthenticationOk may be 64 KiB at most
/// (`a_server_straying_from_the_login_protocol_is_refused`).
#[test]
fn a_server_flooding_its_greeting_is_refused() {
    let fixture = fixture(r#""trust""#);
    for (messages, value_bytes, limit) in [
        (1001, 10, "more than 1000 messages before ReadyForQuery"),
        (5, 60_000, "more than 262144 bytes before ReadyForQuery"),
        // A header alone, its length 1 MiB and a byte: refused before anything is allocated.
        (0, 0, "more than 262144 bytes before ReadyForQuery"),
    ] {
        let parameter = [&b"flood\0"[..], &vec![b'x'; value_bytes], b"\0"].concat();
        let mut greeting = authentication(0, b"");
        for _ in 0..messages {
            greeting.extend(protocol_message(b'S', &parameter));
        }
        if messages == 0 {
            greeting.push(b'S');
            greeting.extend(((1i32 << 20) + 1).to_be_bytes());
        }
        HostileServer::start(vec![greeting]).refuses_logins_with(&fixture, limit);
    }
}

/// A server (or whoever answers in its place) that strays from the login protocol is refused
/// with `08P01`: above all, once SCRAM has begun it can neither switch to a cleartext or md5
/// request to collect the password nor say AuthenticationOk before proving it knows it.
#[test]
fn a_server_straying_from_the_login_protocol_is_refused() {
    let fixture = fixture(r#""trust""#);
    let scram = authentication(10, b"SCRAM-SHA-256\0\0");
    let mut heard = Vec::new();
    for (turns, words) in [
        (
            vec![scram.clone(), authentication(3, b"")],
            "authentication request 3 in the middle of SCRAM",
        ),
        (
            vec![scram.clone(), authentication(5, b"salt")],
            "authentication request 5 in the middle of SCRAM",
        ),
        (
            vec![scram, authentication(0, b"")],
            "authentication request 0 in the middle of SCRAM",
        ),
        (
            vec![authentication(10, b"SCRAM-SHA-1\0\0")],
            "the server offers no SCRAM-SHA-256",
        ),
        (
            vec![authentication(11, b"r=x")],
            "SASL continue without a start",
        ),
        (
            vec![authentication(12, b"v=x")],
            "SASL final without a start",
        ),
        (
            vec![authentication(7, b"")],
            "unsupported authentication request 7",
        ),
        (
            vec![authentication(5, b"sa")],
            "an md5 request without its 4-byte salt",
        ),
        (
            vec![[&b"N"[..], &(64i32 * 1024).to_be_bytes()].concat()],
            "a login message of 65537 bytes, more than 65536",
        ),
        (
            vec![protocol_message(b'R', &[0, 0])],
            "short authentication request",
        ),
        (
            vec![protocol_message(b'Z', b"I")],
            "unexpected message 'Z' during login",
        ),
    ] {
        let server = HostileServer::start(turns);
        server.refuses_logins_with(&fixture, words);
        // Stopped, it has kept all that the proxy sent before closing each connection.
        let received = server.received.clone();
        drop(server);
        heard.extend(received.lock().unwrap().iter());
    }
    // The logins reached these servers (their startup packets did), the password never did.
    let heard = String::from_utf8_lossy(&heard);
    assert!(heard.contains("user\0app\0"), "{heard}");
    assert!(!heard.contains("pw-0"), "{heard}");
}

/// How the proxy reaches the server: the host in the route's credential.
#[derive(Clone, Copy, Debug)]
enum ServerSocket {
    Tcp,
    /// A host that is a directory, as in libpq.
    Unix,
}

/// `fixture` for trusted clients, with sessions handed to the kernel relay after `after_ms`,
/// and the server reached over `server`.
fn kernel_relay_fixture(after_ms: u64, server: ServerSocket) -> Fixture {
    let cluster = cluster_with_app_credential(&[]);
    if let ServerSocket::Unix = server {
        let socket_dir = cluster.socket_dir().display().to_string();
        pg_secrets_e2e::set_app_server(&cluster, &socket_dir, cluster.port);
    }
    // Loopback TCP clients trusted, Unix-socket clients run by this OS user.
    proxy_for(
        cluster,
        &format!(r#""trust", "peer:{}""#, os_user()),
        ProxyExtras {
            limits: format!("kernel_relay_after_ms = {after_ms}"),
            ..ProxyExtras::default()
        },
    )
}

/// Whether this process may load eBPF programs, as the kernel relay must (CAP_BPF and
/// CAP_NET_ADMIN; root here).
fn may_load_ebpf() -> bool {
    pg_secrets_e2e::running_as_root()
}

/// Sessions that last are handed to the kernel relay at a quiet point (here at once), and
/// from then on everything a client does still works: both protocols, COPY both ways, large
/// results, errors, transactions, cancel. A session that listens for notifications is never
/// handed over, and still gets them. When a relayed client leaves, its server session closes
/// and the bytes the kernel relayed are counted. Where eBPF cannot be loaded (not root), the
/// proxy says so and relays everything in user space. The server over TCP, and over its Unix
/// socket; a client on the proxy's own Unix socket is relayed by the proxy.
#[test]
fn long_sessions_are_relayed_in_the_kernel_and_everything_still_works() {
    for server in [ServerSocket::Tcp, ServerSocket::Unix] {
        everything_works_relayed_in_the_kernel(server);
    }
}

fn everything_works_relayed_in_the_kernel(server: ServerSocket) {
    let fixture = kernel_relay_fixture(0, server);
    let kernel = may_load_ebpf();
    assert_eq!(
        counter(&fixture, "secrets_proxy_kernel_relay_available"),
        u64::from(kernel)
    );
    let mut unix_client = Client::connect(
        &format!(
            "host={} port={} user=whoever dbname=appdb",
            socket_dir(&fixture),
            fixture.port()
        ),
        NoTls,
    )
    .unwrap();
    let mut client = fixture.connect();
    assert_eq!(scalar(&mut client, "SELECT current_user::text"), "app");
    let relayed =
        |fixture: &Fixture| counter(fixture, "secrets_proxy_kernel_relay_active_sessions");
    // The gauge goes up once the held answer is written, a moment after the client read it.
    wait_until(
        "the session to be handed over",
        Duration::from_secs(10),
        || relayed(&fixture) == u64::from(kernel),
    );

    prepared_statements_and_copy_both_ways(&mut client);
    let rows = client
        .query("SELECT repeat('x', 1000) || id FROM t", &[])
        .unwrap();
    assert_eq!(rows.len(), 10_000);
    let error = client.batch_execute("SELECT 1/0").unwrap_err();
    assert_eq!(error.as_db_error().unwrap().code().code(), "22012");
    let mut transaction = client.transaction().unwrap();
    transaction
        .batch_execute("INSERT INTO t VALUES (-1, 'rolled back')")
        .unwrap();
    transaction.rollback().unwrap();
    cancel_a_sleep(&mut client, &fixture.cluster);
    let count: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .unwrap()
        .get(0);
    assert_eq!(count, 10_000);
    let server_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);

    // A listening session keeps being relayed by the proxy itself, and so does a client on
    // the proxy's Unix socket (see `ClientStream` for `tokio::net::UnixStream`).
    let mut listener = fixture.connect();
    notification_arrives(&mut listener, &mut client);
    for _ in 0..3 {
        assert_eq!(scalar(&mut unix_client, "SELECT current_user::text"), "app");
    }
    assert_eq!(relayed(&fixture), u64::from(kernel));

    drop(client);
    drop(listener);
    drop(unix_client);
    wait_until_pooled(&fixture);
    assert_eq!(relayed(&fixture), 0);
    let handed_over = counter(&fixture, "secrets_proxy_kernel_relayed_sessions_total");
    assert_eq!(handed_over, u64::from(kernel));
    if kernel {
        // The kernel-relayed bytes are counted when the session ends: the COPY out alone is
        // more than 100 kB.
        assert!(
            counter(
                &fixture,
                "secrets_proxy_relay_bytes_total{direction=\"to_client\"}"
            ) > 100_000
        );
        assert!(
            counter(
                &fixture,
                "secrets_proxy_relay_bytes_total{direction=\"to_server\"}"
            ) > 100_000
        );
    }
    // The relayed session's server connection closed with it.
    if kernel {
        wait_until(
            "the relayed server session to end",
            Duration::from_secs(10),
            || {
                !fixture
                    .cluster
                    .superuser()
                    .query_one(
                        "SELECT $1 IN (SELECT pid FROM pg_stat_activity)",
                        &[&server_pid],
                    )
                    .unwrap()
                    .get::<_, bool>(0)
            },
        );
    }
}

/// The promise, for steady clients relayed in the kernel: pgbench's sessions are handed over
/// while the password rotates over and over, and no transaction fails.
#[test]
fn steady_clients_relayed_in_the_kernel_see_no_failure_through_rotation() {
    let fixture = kernel_relay_fixture(200, ServerSocket::Tcp);
    pgbench_while_rotating(&fixture, 4, &["-c", "4"]);
    // Each session is handed over unless eight hand-overs in a row find pgbench's next
    // request already there.
    let handed_over = counter(&fixture, "secrets_proxy_kernel_relayed_sessions_total");
    assert_eq!(
        handed_over > 0,
        may_load_ebpf(),
        "{handed_over} handed over"
    );
}

/// A relayed session whose server is terminated: the client gets the server's FATAL error
/// (57P01), not a bare end of stream, and the session is gone from the gauge. The server over
/// TCP, and over its Unix socket.
#[test]
fn a_relayed_session_ends_with_the_servers_last_words() {
    for server in [ServerSocket::Tcp, ServerSocket::Unix] {
        a_relayed_session_ends_with_the_servers_last_words_over(server);
    }
}

fn a_relayed_session_ends_with_the_servers_last_words_over(server: ServerSocket) {
    let fixture = kernel_relay_fixture(0, server);
    let mut stream = raw_login(&fixture, Duration::from_secs(10));
    stream
        .write_all(&protocol_message(b'Q', b"SELECT pg_backend_pid()\0"))
        .unwrap();
    let answer = read_until_ready(&mut stream);
    let (_, row) = answer.iter().find(|(tag, _)| *tag == b'D').unwrap();
    let pid: i32 = String::from_utf8_lossy(&row[6..]).parse().unwrap();
    let relayed = || counter(&fixture, "secrets_proxy_kernel_relay_active_sessions");
    wait_until(
        "the session to be handed over",
        Duration::from_secs(10),
        || relayed() == u64::from(may_load_ebpf()),
    );
    fixture
        .cluster
        .superuser()
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    let error = read_until(&mut stream, b'E');
    let (_, fields) = error.last().unwrap();
    assert!(
        fields.windows(6).any(|field| field == b"C57P01"),
        "{}",
        String::from_utf8_lossy(fields)
    );
    wait_until(
        "the relayed session to end",
        Duration::from_secs(10),
        || relayed() == 0,
    );
}

/// A client that sends its next request at any moment around a hand-over to the kernel relay
/// (here: a second request right after the first, at a random delay) gets every answer, in
/// order, and its session goes on: a hand-over that finds the client's bytes already there
/// is called off and the proxy relays them, else the kernel relays them.
#[test]
fn requests_sent_while_a_session_is_handed_over_are_answered_in_order() {
    for server in [ServerSocket::Tcp, ServerSocket::Unix] {
        requests_sent_while_handed_over_are_answered_in_order(server);
    }
}

fn requests_sent_while_handed_over_are_answered_in_order(server: ServerSocket) {
    use rand::Rng;
    let fixture = kernel_relay_fixture(0, server);
    let mut rng = rand::thread_rng();
    let answer_of = |stream: &mut TcpStream| -> String {
        let answer = read_until_ready(stream);
        let (_, row) = answer
            .iter()
            .find(|(tag, _)| *tag == b'D')
            .unwrap_or_else(|| panic!("no row in {answer:?}"));
        // A DataRow: the column count (2 bytes), the value's length (4), the value.
        String::from_utf8_lossy(&row[6..]).into_owned()
    };
    for _ in 0..50 {
        let mut stream = raw_login(&fixture, Duration::from_secs(10));
        for round in 0..4 {
            let (first, second) = (round * 2, round * 2 + 1);
            let query = |n: i32| protocol_message(b'Q', format!("SELECT {n}\0").as_bytes());
            stream.write_all(&query(first)).unwrap();
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..400)));
            stream.write_all(&query(second)).unwrap();
            assert_eq!(answer_of(&mut stream), first.to_string());
            assert_eq!(answer_of(&mut stream), second.to_string());
        }
    }
    wait_until_pooled(&fixture);
    let handed_over = counter(&fixture, "secrets_proxy_kernel_relayed_sessions_total");
    let declined = counter(&fixture, "secrets_proxy_kernel_relay_declined_total");
    eprintln!("{server:?}: {handed_over} sessions handed over, {declined} hand-overs called off");
    assert_eq!(handed_over > 0, may_load_ebpf());
}
