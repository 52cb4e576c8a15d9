//! The end-to-end test harness: real PostgreSQL 15 clusters with pg_secrets preloaded, each in
//! its own temporary directory on a free port, with scram-sha-256 authentication and a master
//! key file. A cluster stops when its `Cluster` is dropped, also when a test fails.
//!
//! As root, every server program runs as the `postgres` system user (initdb refuses root);
//! as anyone else, as that user. The proxy and rotation tests build on the same harness.

use rand::Rng;
use std::collections::BTreeSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

pub mod pki;

pub use postgres::{Client, NoTls};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "harness-superuser";
/// The key every cluster starts with unless a test asks for another.
pub const TEST_KEY: &str = "test:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A command for a server program, run as `postgres` when we are root.
fn server_command(program: &str) -> Command {
    let path = format!("{PG_BIN}/{program}");
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--", &path]);
        command
    } else {
        Command::new(path)
    }
}

fn give_to_server_user(path: &Path) {
    if running_as_root() {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path));
    }
}

/// An empty temporary directory the server programs may write in (as root: owned by
/// `postgres`).
pub fn server_temp_dir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    give_to_server_user(dir.path());
    dir
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A TCP port of 127.0.0.1 that nothing listens on, for a server a test is about to start.
///
/// Chosen outside the kernel's ephemeral range, not by binding port 0: a port of that range
/// can become the local port of any outgoing connection (pgbench `-C` opens thousands) between
/// the moment it is chosen and the moment the server binds it, and the server then cannot
/// start. Below the range if there is room (Linux's default starts at 32768), else above it,
/// else anywhere from 10000. Each port is handed out once per test process, so two tests
/// never share one.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let ephemeral: Vec<u16> = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|port| port.parse().ok())
        .collect();
    let (first, last) = match ephemeral[..] {
        [first, last] => (first, last),
        _ => (32768, 60999),
    };
    let outside = if first >= 12_000 {
        10_000..first
    } else if last <= 63_000 {
        last + 1..u16::MAX
    } else {
        10_000..u16::MAX
    };
    let mut handed_out = HANDED_OUT.lock().unwrap();
    loop {
        let port = rand::thread_rng().gen_range(outside.clone());
        if !handed_out.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.insert(port);
            return port;
        }
    }
}

/// One initdb, kept under `target/` and reused by every test process of every run; each
/// cluster starts from a copy, which takes a fraction of the time initdb does.
fn template() -> &'static Path {
    static TEMPLATE: OnceLock<PathBuf> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
        let template = root.join(format!("pg15-template-{}", SUPERUSER_PASSWORD.len()));
        if template.join("data/PG_VERSION").exists() {
            return template;
        }
        fs::create_dir_all(&root).unwrap();
        // Built aside and renamed into place, so concurrent test processes never see half of it.
        let building = tempfile::Builder::new()
            .prefix("pg15-template-")
            .tempdir_in(&root)
            .unwrap();
        let pwfile = building.path().join("pwfile");
        fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        give_to_server_user(building.path());
        run(server_command("initdb")
            .args([
                "--auth=scram-sha-256",
                "-U",
                SUPERUSER,
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("-D")
            .arg(building.path().join("data")));
        let building = building.keep();
        if fs::rename(&building, &template).is_err() {
            // Another process won the race; its template is as good as ours.
            let _ = fs::remove_dir_all(&building);
        }
        template
    })
}

/// How a cluster gets its master key.
#[derive(Clone)]
pub enum KeySource {
    /// `pg_secrets.key_file` pointing at a 0600 file with these lines.
    File(String),
    /// No key setting at all.
    None,
}

pub struct Cluster {
    dir: tempfile::TempDir,
    pub port: u16,
    running: bool,
}

impl Cluster {
    /// A running cluster with the extension created in database `postgres`.
    pub fn start() -> Cluster {
        Cluster::start_with(KeySource::File(TEST_KEY.into()), &[])
    }

    pub fn start_with(key: KeySource, extra_settings: &[&str]) -> Cluster {
        let cluster = Cluster::start_bare(key, extra_settings);
        cluster
            .superuser()
            .batch_execute("CREATE EXTENSION pg_secrets")
            .unwrap();
        cluster
    }

    /// A running cluster without the extension created.
    pub fn start_bare(key: KeySource, extra_settings: &[&str]) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pg_secrets-e2e-")
            .tempdir()
            .unwrap();
        run(Command::new("cp")
            .arg("-a")
            .arg(template().join("data"))
            .arg(dir.path()));
        fs::create_dir(dir.path().join("run")).unwrap();
        let mut cluster = Cluster {
            dir,
            port: free_port(),
            running: false,
        };
        let data = cluster.data_dir();
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'pg_secrets'\nshared_buffers = 32MB\n\
             max_connections = 40\nfsync = off\nlogging_collector = on\n\
             log_directory = 'log'\ninclude_if_exists = 'pg_secrets_test.conf'",
            cluster.port,
            cluster.socket_dir().display()
        )
        .unwrap();
        cluster.configure(key, extra_settings);
        cluster.start_server();
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Rewrites the key and test settings; they take effect at the next (re)start.
    pub fn configure(&self, key: KeySource, extra_settings: &[&str]) {
        let mut settings: Vec<String> = extra_settings.iter().map(|s| s.to_string()).collect();
        if let KeySource::File(lines) = key {
            let key_file = self.dir.path().join("master.key");
            fs::write(&key_file, lines).unwrap();
            fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
            settings.push(format!("pg_secrets.key_file = '{}'", key_file.display()));
        }
        fs::write(
            self.data_dir().join("pg_secrets_test.conf"),
            settings.join("\n") + "\n",
        )
        .unwrap();
        give_to_server_user(self.dir.path());
    }

    fn start_server(&mut self) {
        run(server_command("pg_ctl")
            // As a developer's shell often has it: the extension keeps Rust backtraces out of
            // error reports all the same (a test checks).
            .env("RUST_BACKTRACE", "1")
            .args(["start", "-w", "-t", "60", "-s", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("server.log")));
        self.running = true;
    }

    pub fn stop(&mut self, mode: &str) {
        if self.running {
            run(server_command("pg_ctl")
                .args(["stop", "-w", "-s", "-m", mode, "-D"])
                .arg(self.data_dir()));
            self.running = false;
        }
    }

    pub fn restart(&mut self) {
        self.stop("fast");
        self.start_server();
    }

    pub fn connection_string(&self, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
            self.port
        )
    }

    pub fn connect(&self, user: &str, password: &str) -> Client {
        Client::connect(&self.connection_string(user, password), NoTls)
            .unwrap_or_else(|e| panic!("cannot connect as {user}: {e}"))
    }

    pub fn superuser(&self) -> Client {
        self.connect(SUPERUSER, SUPERUSER_PASSWORD)
    }

    /// A login role with the given extra SQL (e.g. `IN ROLE secrets_admin`), connected.
    pub fn login_role(&self, name: &str, options: &str) -> Client {
        self.superuser()
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}' {options}"
            ))
            .unwrap();
        self.connect(name, &format!("pw-{name}"))
    }

    /// Runs a client program (psql, pg_dump, pgbench...) against this cluster as the superuser.
    pub fn client_program(&self, program: &str) -> Command {
        let mut command = Command::new(format!("{PG_BIN}/{program}"));
        command
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .env("PGDATABASE", "postgres");
        command
    }

    pub fn psql(&self, sql: &str) -> Output {
        self.client_program("psql")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap()
    }

    /// A hot standby streaming from this cluster: a base backup with `-R`, on its own port and
    /// socket directory, reading the same master-key file.
    pub fn start_standby(&self) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("pg_secrets-e2e-standby-")
            .tempdir()
            .unwrap();
        fs::create_dir(dir.path().join("run")).unwrap();
        give_to_server_user(dir.path());
        let mut standby = Cluster {
            dir,
            port: free_port(),
            running: false,
        };
        run(server_command("pg_basebackup")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                SUPERUSER,
                "-R",
                "-X",
                "stream",
                "-D",
            ])
            .arg(standby.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .env("PGPASSWORD", SUPERUSER_PASSWORD));
        // Later lines win: the copied configuration keeps everything but where to listen.
        let mut conf = fs::OpenOptions::new()
            .append(true)
            .open(standby.data_dir().join("postgresql.conf"))
            .unwrap();
        use std::io::Write;
        writeln!(
            conf,
            "port = {}\nunix_socket_directories = '{}'",
            standby.port,
            standby.socket_dir().display()
        )
        .unwrap();
        standby.start_server();
        standby
    }

    /// Waits until the server log holds every line sent to it before this call: a line logged
    /// now reaches the logging collector after them, and it writes lines in the order they came.
    pub fn wait_for_server_log(&self) {
        let sentinel = format!("log-sentinel-{}", rand::random::<u64>());
        self.superuser()
            .batch_execute(&format!("DO $$ BEGIN RAISE LOG '{sentinel}'; END $$"))
            .unwrap();
        wait_until(
            "the server log to catch up",
            Duration::from_secs(60),
            || self.server_log().contains(&sentinel),
        );
    }

    /// Waits until `sessions` statements whose text contains `fragment` wait on a lock.
    pub fn wait_for_lock_waiters(&self, fragment: &str, sessions: i64) {
        let mut observer = self.superuser();
        wait_until(
            "statements to wait on a lock",
            Duration::from_secs(30),
            || {
                observer
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0",
                        &[&fragment],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
                    == sessions
            },
        );
    }

    /// Everything the server wrote: the pg_ctl log and the collector's log files.
    pub fn server_log(&self) -> String {
        let mut log = fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        if let Ok(entries) = fs::read_dir(self.data_dir().join("log")) {
            for entry in entries.flatten() {
                log += &fs::read_to_string(entry.path()).unwrap_or_default();
            }
        }
        log
    }
}

/// The end of a log, for a failing test's output.
fn print_tail(whose: &str, log: &str) {
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(200)..];
    eprintln!(
        "--- the last {} lines of {whose}:\n{}",
        tail.len(),
        tail.join("\n")
    );
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A failing test's clusters are deleted with it: what their servers said (a crash,
        // a worker's error) is shown with the failure.
        if std::thread::panicking() {
            print_tail(
                &format!("the server log of the cluster on port {}", self.port),
                &self.server_log(),
            );
        }
        if self.running {
            let _ = server_command("pg_ctl")
                .args(["stop", "-w", "-s", "-m", "immediate", "-D"])
                .arg(self.data_dir())
                .output();
        }
    }
}

/// A fingerprint of everything the store holds (secrets, versions, labels, rotation settings,
/// grants, policies, requests, alarm rules; not what the workers advance on their own), to
/// show that a refused call changed nothing.
pub fn store_state(client: &mut Client) -> String {
    client
        .query_one(
            "SELECT concat_ws(' | ', \
               (SELECT string_agg(concat_ws(',', name, description, tags, owner_role, key_id, \
                                            changed_at, last_accessed_on, purge_at, \
                                            rotation_enabled, rotator, rotation_schedule, \
                                            rotation_window), \
                                  ';' ORDER BY name) \
                FROM secrets.secret), \
               (SELECT string_agg(concat_ws(',', name_pattern, grantee, actions, valid_until), ';' \
                                  ORDER BY name_pattern, grantee::text) FROM secrets.access_grant), \
               (SELECT string_agg(concat_ws(',', secret_id, policy), ';' ORDER BY secret_id) \
                FROM secrets.resource_policy), \
               (SELECT string_agg(concat_ws(',', id, state), ';' ORDER BY id) \
                FROM secrets.access_request), \
               (SELECT string_agg(concat_ws(',', name, kind, params, enabled), ';' ORDER BY name) \
                FROM secrets.alarm_rule), \
               (SELECT string_agg(concat_ws(',', id, secret_id, key_id, md5(ciphertext), \
                                            client_request_token), ';' ORDER BY id) \
                FROM secrets.secret_version), \
               (SELECT string_agg(concat_ws(',', secret_id, label, version_id), ';' \
                                  ORDER BY secret_id, label) FROM secrets.version_label))",
            &[],
        )
        .unwrap()
        .get(0)
}

/// The first column of every row `sql` returns, as text, read in a session or a transaction.
pub fn first_column(client: &mut impl postgres::GenericClient, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Polls `condition` every 50 ms until it holds, and fails the test naming `what` when it
/// still does not after `timeout`: how a test waits for a background worker or a server.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The credential JSON of login role `app` on `cluster`, as a pg_secrets secret holds it.
pub fn credential_json(cluster: &Cluster, password: &str) -> String {
    credential_json_for("127.0.0.1", cluster.port, password)
}

/// The same credential for the server at `host` (an address or name, or the directory of its
/// Unix socket, as in libpq) and `port`.
pub fn credential_json_for(host: &str, port: u16, password: &str) -> String {
    format!(
        r#"{{"engine": "postgres", "host": "{host}", "port": {port}, "dbname": "postgres", "username": "app", "password": "{password}"}}"#
    )
}

/// Points secret `db/app` (see `cluster_with_app_credential`) at the server at `host` and
/// `port`, password unchanged.
pub fn set_app_server(cluster: &Cluster, host: &str, port: u16) {
    cluster
        .superuser()
        .execute(
            "SELECT secrets.put_secret_value('db/app', $1)",
            &[&credential_json_for(host, port, "pw-0")],
        )
        .unwrap();
}

/// For the proxy tests: a cluster with login role `app` (password `pw-0`, kept in secret
/// `db/app`) and a `proxy` role that may read secrets (password `proxy-pw`).
pub fn cluster_with_app_credential(settings: &[&str]) -> Cluster {
    let cluster = Cluster::start_with(KeySource::File(TEST_KEY.into()), settings);
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE app LOGIN PASSWORD 'pw-0';
         CREATE ROLE proxy LOGIN PASSWORD 'proxy-pw' IN ROLE secrets_reader;
         GRANT CREATE ON SCHEMA public TO app;",
    )
    .unwrap();
    db.execute(
        "SELECT secrets.create_secret('db/app', $1)",
        &[&credential_json(&cluster, "pw-0")],
    )
    .unwrap();
    cluster
}

/// secrets-proxy as its own process: the binary `make test` builds, next to this test's own
/// directory. Killed when dropped, so a failing test leaves no proxy behind.
pub struct ProxyProcess {
    child: std::process::Child,
    port: u16,
    log: PathBuf,
}

/// The `secrets-proxy` binary of this build (`make test` builds it before the tests).
pub fn proxy_binary() -> std::path::PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(std::path::Path::parent)
        .unwrap()
        .join("secrets-proxy")
}

impl ProxyProcess {
    /// Starts it with `config_file`, whose clients listen on TCP `port`, and waits until it listens.
    pub fn start(config_file: &Path, port: u16) -> ProxyProcess {
        let binary = proxy_binary();
        let log = config_file.with_extension("log");
        let child = Command::new(&binary)
            .arg("--config")
            .arg(config_file)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{} (make test builds it): {e}", binary.display()));
        let proxy = ProxyProcess { child, port, log };
        wait_until("the proxy to listen", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        proxy
    }

    /// A client of route `database`, over TCP, as user `whoever`.
    pub fn connect(&self, database: &str) -> Result<Client, postgres::Error> {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=whoever dbname={database}",
                self.port
            ),
            NoTls,
        )
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`HUP`, `TERM`, `INT`).
    pub fn signal(&self, name: &str) {
        let sent = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name}");
    }

    /// Waits for the process to exit, for `within` at most.
    pub fn exits_within(&mut self, within: Duration, why: &str) -> std::process::ExitStatus {
        let mut status = None;
        wait_until(why, within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        // Its log lives in the cluster's directory, deleted with a failing test.
        if std::thread::panicking() {
            print_tail(
                &format!("the log of the proxy on port {}", self.port),
                &self.log(),
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that a statement failed with this SQLSTATE and a message containing `words`.
#[track_caller]
pub fn assert_sql_error<T: std::fmt::Debug>(
    result: Result<T, postgres::Error>,
    sqlstate: &str,
    words: &str,
) -> postgres::error::DbError {
    let error = result.expect_err("the statement should have failed");
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {error}"))
        .clone();
    assert_eq!(
        db.code().code(),
        sqlstate,
        "wrong SQLSTATE for: {}",
        db.message()
    );
    assert!(
        db.message().contains(words),
        "message {:?} lacks {words:?}",
        db.message()
    );
    db
}

/// The body and headers of a plain HTTP GET (the proxy's admin port).
pub fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The value of metric `line` (its name and labels) at a proxy's admin `address`.
pub fn metric(address: std::net::SocketAddr, line: &str) -> u64 {
    let metrics = http_get(address, "/metrics");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in {metrics}"))
}

/// Waits until the proxy at admin `address` listens to the store's change notifications, its
/// cache emptied of what it fetched before. Returns how many it has acted on so far, what
/// `wait_until_notified` counts from.
pub fn wait_until_listening(address: std::net::SocketAddr) -> u64 {
    wait_until("the proxy to listen", Duration::from_secs(30), || {
        metric(address, "secrets_proxy_store_listening") == 1
    });
    metric(address, "secrets_proxy_store_notifications_total")
}

/// Waits until the proxy at admin `address` has acted on `notifications` change
/// notifications in all.
pub fn wait_until_notified(address: std::net::SocketAddr, notifications: u64) {
    wait_until("the change notification", Duration::from_secs(30), || {
        metric(address, "secrets_proxy_store_notifications_total") >= notifications
    });
}

/// A StartupMessage (or, with another version code, what a client sends first).
pub fn startup_packet(version: i32, parameters: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (key, value) in parameters {
        body.extend_from_slice(key.as_bytes());
        body.push(0);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}
