//! `make bench`: side-by-side throughput against the peers the issues name, in one run on one
//! private cluster, with pgbench. Ratios are what to read: the machine is shared and noisy,
//! absolute numbers are not comparable between runs.
//!
//! 1. Reading a 1 KB secret: `secrets.get_secret_value` against a plain table lookup and
//!    pgcrypto's `pgp_sym_decrypt`, with custom scripts; and, for access control, a read by a
//!    member of a group holding a grant (among 1,000 other grants and 100 policies) against
//!    the same read by the secret's owner; and the same read with the audit trail off, on, and
//!    on without its server-log line.
//!    Then how many audit records per second the worker drains to the table under load.
//! 2. Connecting through secrets-proxy against connecting directly and through PgBouncer in
//!    session mode: `pgbench -S` with 10 and 50 clients, and with a new connection per
//!    transaction (`-C`).
//! 3. The memory of 2,000 idle clients: secrets-proxy as its own process against PgBouncer.
//!
//! The rows of a table run in turn, round after round; each ratio compares a row's run with
//! a run of its baseline just before it, and the median over rounds is reported, which keeps
//! a noisy neighbour from deciding the result. Environment: BENCH_SECONDS (per run, default
//! 4), BENCH_ROUNDS (default 5), BENCH_ONLY (comma-separated parts: read, audit, proxy, idle;
//! default all).

use pg_secrets_e2e::{free_port, startup_packet, Cluster, KeySource, TEST_KEY};
use secrets_proxy::{Config, RunningProxy};
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const ROWS: i32 = 1000;
const APP_PASSWORD: &str = "bench-app-password";

fn env_number(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One line of a table: a label and the pgbench command that measures it.
struct Row {
    label: String,
    pgbench: Box<dyn Fn() -> Command>,
}

fn tps_of(mut pgbench: Command, label: &str) -> f64 {
    let output = pgbench.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "pgbench for {label} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find(|line| line.starts_with("tps = "))
        .and_then(|line| line.split_whitespace().nth(2))
        .and_then(|tps| tps.parse::<f64>().ok())
        .expect("pgbench printed no tps line")
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Runs every row once per round and prints the medians; `baseline[i]` is the row that row
/// `i` is compared with. Each ratio compares two runs back to back: when the baseline was not
/// the run just before, it is run again first (and counts towards its own median), since a
/// neighbour's load on this shared machine changes over tens of seconds.
fn measure(title: &str, rows: &[Row], baseline: &[usize], rounds: u32) {
    let mut tps: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); rows.len()];
    for round in 1..=rounds {
        let mut run = |index: usize| {
            let row = &rows[index];
            let measured = tps_of((row.pgbench)(), &row.label);
            eprintln!("round {round}: {:<60} {measured:>10.0} tps", row.label);
            tps[index].push(measured);
            measured
        };
        let mut previous: Option<(usize, f64)> = None;
        for (index, &base) in baseline.iter().enumerate() {
            let base_tps = match previous {
                _ if base == index => None,
                Some((ran, measured)) if ran == base => Some(measured),
                _ => Some(run(base)),
            };
            let measured = run(index);
            ratios[index].push(base_tps.map_or(1.0, |base_tps| measured / base_tps));
            previous = Some((index, measured));
        }
    }
    println!("\n{title}, median of {rounds} rounds");
    println!("| what | tps | ratio |");
    println!("| --- | ---: | ---: |");
    for (index, row) in rows.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2} |",
            row.label,
            median(&tps[index]),
            median(&ratios[index])
        );
    }
}

fn main() {
    let seconds = env_number("BENCH_SECONDS", 4).to_string();
    let rounds = env_number("BENCH_ROUNDS", 5);
    let mut cluster =
        Cluster::start_with(KeySource::File(TEST_KEY.into()), &["max_connections = 400"]);
    let scripts = cluster.dir().join("bench");
    fs::create_dir_all(&scripts).unwrap();
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |part: &str| only.is_empty() || only.split(',').any(|p| p == part);
    if wanted("read") {
        read_benchmark(&cluster, &scripts, &seconds, rounds);
    }
    if wanted("audit") {
        settle(&cluster);
        audit_drain_benchmark(&cluster, &scripts, &seconds);
    }
    if wanted("proxy") || wanted("idle") {
        proxy_setup(&cluster);
    }
    if wanted("proxy") {
        settle(&cluster);
        proxy_benchmark(&cluster, &seconds, rounds);
    }
    if wanted("idle") {
        idle_clients_benchmark(&mut cluster);
    }
}

fn read_benchmark(cluster: &Cluster, scripts: &Path, seconds: &str, rounds: u32) {
    let mut db = cluster.superuser();
    db.batch_execute(&format!(
        "CREATE EXTENSION pgcrypto;
         CREATE TABLE plain_values (name text PRIMARY KEY, value text NOT NULL);
         INSERT INTO plain_values SELECT 'bench/' || i, repeat(md5(i::text), 32) FROM generate_series(1, {ROWS}) i;
         CREATE TABLE pgcrypto_values (name text PRIMARY KEY, value bytea NOT NULL);
         INSERT INTO pgcrypto_values SELECT name, pgp_sym_encrypt(value, 'bench-passphrase') FROM plain_values;
         SELECT secrets.create_secret(name, value) FROM plain_values;"
    ))
    .unwrap();
    // Access control at scale: secrets acl/* owned by a plain role, read by the owner and by a
    // member of a group granted `get` on acl/*, while 1,000 other grants (to 100 other roles)
    // and 100 resource policies (on acl/1..100) exist.
    db.batch_execute(&format!(
        "CREATE ROLE bench_owner LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE secrets_user;
         CREATE ROLE bench_team;
         CREATE ROLE bench_member LOGIN PASSWORD '{APP_PASSWORD}' IN ROLE bench_team;
         SELECT secrets.create_secret('acl/' || i, value)
           FROM plain_values, LATERAL (SELECT split_part(name, '/', 2)::int AS i) n;
         UPDATE secrets.secret SET owner_role = 'bench_owner' WHERE name LIKE 'acl/%';
         SELECT secrets.grant_access('acl/*', 'bench_team', '{{get}}');
         DO $$ BEGIN FOR k IN 1..100 LOOP EXECUTE format('CREATE ROLE noise_%s', k); END LOOP; END $$;
         SELECT secrets.grant_access('noise/' || i || '/*', ('noise_' || (i % 100 + 1))::regrole,
                                     '{{get,describe}}') FROM generate_series(1, 1000) i;
         SELECT secrets.put_resource_policy('acl/' || i, pg_catalog.jsonb_build_object('statements',
                  pg_catalog.jsonb_build_array(pg_catalog.jsonb_build_object(
                    'effect', 'allow', 'principals', pg_catalog.jsonb_build_array('noise_' || i),
                    'actions', pg_catalog.jsonb_build_array('describe'),
                    'conditions', pg_catalog.jsonb_build_object('source_cidr', '10.0.0.0/8')))))
           FROM generate_series(1, 100) i;"
    ))
    .unwrap();
    db.batch_execute("VACUUM ANALYZE").unwrap();
    let get_acl = "SELECT secrets.get_secret_value('acl/' || :i);";
    let get_bench = "SELECT secrets.get_secret_value('bench/' || :i);";
    let plain = "SELECT value FROM plain_values WHERE name = 'bench/' || :i;";
    // Two clients saturate this machine's two cores; with one, a core is left for the audit
    // worker, as a server with headroom has.
    let read = |label, sql, role, clients, trail, baseline| ReadRow {
        label,
        sql,
        role,
        clients,
        trail,
        baseline,
    };
    use Trail::{Off, On, WithoutLogLine};
    let reads = [
        read("plain SELECT value FROM t WHERE name = $1", plain, None, "2", On, 0),
        read("secrets.get_secret_value(name), as superuser", get_bench, None, "2", On, 0),
        read(
            "pgcrypto pgp_sym_decrypt(value, key)",
            "SELECT pgp_sym_decrypt(value, 'bench-passphrase') FROM pgcrypto_values WHERE name = 'bench/' || :i;",
            None,
            "2",
            On,
            0,
        ),
        read("get_secret_value by the owner role", get_acl, Some("bench_owner"), "2", On, 0),
        read(
            "get_secret_value via a group grant; 1,000 other grants, 100 policies (ratio: vs owner)",
            get_acl,
            Some("bench_member"),
            "2",
            On,
            3,
        ),
        read("get_secret_value, as superuser, audit off", get_bench, None, "2", Off, 0),
        read("get_secret_value, as superuser, audit on (ratio: vs audit off)", get_bench, None, "2", On, 5),
        read(
            "get_secret_value, audit on without its server-log line (ratio: vs audit off)",
            get_bench,
            None,
            "2",
            WithoutLogLine,
            5,
        ),
        read("1 client: plain SELECT", plain, None, "1", On, 8),
        read("1 client: get_secret_value, audit off (ratio: vs plain, 1 client)", get_bench, None, "1", Off, 8),
        read("1 client: get_secret_value, audit on (ratio: vs audit off, 1 client)", get_bench, None, "1", On, 9),
    ];
    let rows: Vec<Row> = reads
        .iter()
        .enumerate()
        .map(
            |(
                index,
                &ReadRow {
                    label,
                    sql,
                    role,
                    clients,
                    trail,
                    ..
                },
            )| {
                let script = scripts.join(format!("read-{index}.sql"));
                fs::write(&script, format!("\\set i random(1, {ROWS})\n{sql}\n")).unwrap();
                let (seconds, port) = (seconds.to_string(), cluster.port);
                Row {
                    label: label.to_string(),
                    pgbench: Box::new(move || {
                        set_trail(port, trail);
                        let mut command = Command::new("pgbench");
                        command
                            .args(["-n", "-M", "prepared", "-c", clients, "-j", clients, "-T"])
                            .args([&seconds, "-f"])
                            .arg(&script);
                        let mut command = with_superuser(command, port);
                        if let Some(role) = role {
                            command.env("PGUSER", role).env("PGPASSWORD", APP_PASSWORD);
                        }
                        command
                    }),
                }
            },
        )
        .collect();
    let baselines: Vec<usize> = reads.iter().map(|read| read.baseline).collect();
    measure(
        &format!("Reading a 1 KB value: pgbench -M prepared, 2 clients (1 where the row says), {seconds} s per run"),
        &rows,
        &baselines,
        rounds,
    );
}

/// One row of the read benchmark: a pgbench script run as `role` (the superuser when `None`)
/// by `clients` clients, with the audit trail as `trail` says; its ratio is to row `baseline`.
#[derive(Clone, Copy)]
struct ReadRow {
    label: &'static str,
    sql: &'static str,
    role: Option<&'static str>,
    clients: &'static str,
    trail: Trail,
    baseline: usize,
}

/// The audit trail as a read row runs with. Without the server-log line the trail's cost is
/// the capture and the worker's table writes alone, which shows how much of it the logging
/// collector takes.
#[derive(Clone, Copy)]
enum Trail {
    Off,
    On,
    WithoutLogLine,
}

/// Sets the audit trail for new sessions (both settings are reload-time ones).
fn set_trail(port: u16, trail: Trail) {
    let (audit, server_log) = match trail {
        Trail::Off => (false, true),
        Trail::On => (true, true),
        Trail::WithoutLogLine => (true, false),
    };
    let mut psql = Command::new("psql");
    psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!("ALTER SYSTEM SET pg_secrets.audit = {audit}"))
        .arg("-c")
        .arg(format!(
            "ALTER SYSTEM SET pg_secrets.audit_server_log = {server_log}"
        ))
        .args(["-c", "SELECT pg_reload_conf()"]);
    let output = with_superuser(psql, port).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
}

/// How fast the worker moves audit records from the queue to the table under load: 4
/// clients each making calls that leave 100 records each, for `seconds`, then the time until
/// the last record is in the table. Twice: reading 100 real values per call (what an
/// application does), and looking up 100 names that do not exist (an error record each: the
/// cheapest records to produce, so the queue and the worker, not the readers, set the pace).
fn audit_drain_benchmark(cluster: &Cluster, scripts: &Path, seconds: &str) {
    set_trail(cluster.port, Trail::On);
    let mut db = cluster.superuser();
    // Its own secrets, so it reads real values whatever other parts ran.
    db.batch_execute(
        "SELECT secrets.create_secret('drain/' || i, repeat(md5(i::text), 32)) \
         FROM generate_series(1, 100) i",
    )
    .unwrap();
    let batch = |prefix: &str| {
        let names: Vec<String> = (1..=100).map(|i| format!("'{prefix}/{i}'")).collect();
        format!(
            "SELECT count(*) FROM secrets.batch_get_secret_value(ARRAY[{}]) WHERE error IS NULL",
            names.join(",")
        )
    };
    println!("\nAudit trail under load: 4 clients, 100 records per call, {seconds} s");
    println!("| calls | records | first call to last record stored | records drained per second | worker CPU | records per second of the worker's CPU |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (label, prefix, values) in [
        ("reading 100 values", "drain", 100),
        (
            "looking up 100 names that do not exist",
            "no-such-secret",
            0,
        ),
    ] {
        let sql = batch(prefix);
        let found: i64 = db.query_one(&sql, &[]).unwrap().get(0);
        assert_eq!(found, values, "each call finds {values} values");
        let script = scripts.join(format!("batch-{prefix}.sql"));
        fs::write(&script, format!("{sql};\n")).unwrap();
        let (records, elapsed, worker_cpu) = drain_run(cluster, &script, seconds);
        println!(
            "| {label} | {records} | {elapsed:.1} s | {:.0} | {worker_cpu:.2} s | {:.0} |",
            records as f64 / elapsed,
            records as f64 / worker_cpu
        );
        settle(cluster);
    }
}

/// One load of `script` (100 records per call): the records it left, the seconds from the
/// first call until the last of them was in the table, and the worker's CPU seconds meanwhile.
fn drain_run(cluster: &Cluster, script: &Path, seconds: &str) -> (i64, f64, f64) {
    let mut db = cluster.superuser();
    let count = |db: &mut postgres::Client| -> i64 {
        db.query_one("SELECT count(*) FROM secrets.audit_record", &[])
            .unwrap()
            .get(0)
    };
    let before = count(&mut db);
    let worker: i32 = db
        .query_one(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_secrets audit worker'",
            &[],
        )
        .unwrap()
        .get(0);
    let worker_cpu_before = cpu_seconds(worker as u32);
    let started = std::time::Instant::now();
    let mut command = Command::new("pgbench");
    command
        .args([
            "-n", "-M", "prepared", "-c", "4", "-j", "2", "-T", seconds, "-f",
        ])
        .arg(script);
    let output = with_superuser(command, cluster.port).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let calls: i64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next()?.trim().parse().ok())
        .expect("pgbench summary");
    let expected = calls * 100;
    while count(&mut db) - before < expected {
        assert!(
            started.elapsed().as_secs() < 600,
            "the audit queue does not drain"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (
        expected,
        started.elapsed().as_secs_f64(),
        cpu_seconds(worker as u32) - worker_cpu_before,
    )
}

/// User plus system CPU time of a process so far, from /proc/<pid>/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// Does the work one part left behind before the next is measured, rather than let autovacuum
/// and the checkpointer do it in the middle of the next (the reads leave a million audit
/// records to vacuum): VACUUM ANALYZE, a checkpoint, and no autovacuum worker running.
fn settle(cluster: &Cluster) {
    let mut db = cluster.superuser();
    db.batch_execute("VACUUM ANALYZE").unwrap();
    db.batch_execute("CHECKPOINT").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        let vacuuming: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity \
                 WHERE backend_type = 'autovacuum worker'",
                &[],
            )
            .unwrap()
            .get(0);
        if vacuuming == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn with_superuser(mut command: Command, port: u16) -> Command {
    command
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", port.to_string())
        .env("PGUSER", pg_secrets_e2e::SUPERUSER)
        .env("PGPASSWORD", pg_secrets_e2e::SUPERUSER_PASSWORD)
        .env("PGDATABASE", "postgres");
    command
}

/// PgBouncer from Debian, session mode, trusting loopback clients like the proxy does, logging
/// no line per connection (the proxy runs in this process, where nothing is logged), reaching
/// the server at `server_host` (an address, or the directory of its Unix socket); as root it
/// runs as the postgres system user, since it refuses to run as root.
fn start_pgbouncer(cluster: &Cluster, port: u16, server_host: &str) -> PgBouncer {
    let dir = cluster.dir().join(format!("pgbouncer-{port}"));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("userlist.txt"), "\"app\" \"\"\n").unwrap();
    fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\nappdb = host={server_host} port={} dbname=postgres user=app password={APP_PASSWORD}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {}/userlist.txt\npool_mode = session\n\
             max_client_conn = 2500\ndefault_pool_size = 60\nlogfile = {}/pgbouncer.log\n\
             log_connections = 0\nlog_disconnections = 0\n\
             pidfile = {}/pgbouncer.pid\n",
            cluster.port,
            dir.display(),
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    let as_root = Command::new("id")
        .arg("-u")
        .output()
        .unwrap()
        .stdout
        .starts_with(b"0");
    if as_root {
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()
            .unwrap();
    }
    let ini = dir.join("pgbouncer.ini");
    let mut command = if as_root {
        // runuser's login limits leave 1,024 open files; the idle-clients run needs more.
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--", "sh", "-c"])
            .arg("ulimit -n \"$(ulimit -Hn)\" && exec /usr/sbin/pgbouncer \"$0\"")
            .arg(&ini);
        command
    } else {
        let mut command = Command::new("/usr/sbin/pgbouncer");
        command.arg("-q").arg(&ini);
        command
    };
    // It logs to its own file; its console copy would bury the tables.
    let child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("pgbouncer (Debian package pgbouncer)");
    let bouncer = PgBouncer {
        child,
        pid_file: dir.join("pgbouncer.pid"),
    };
    wait_for_port(
        port,
        &format!("pgbouncer (see {})", dir.join("pgbouncer.log").display()),
    );
    bouncer
}

fn wait_for_port(port: u16, what: &str) {
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} did not start listening on port {port}");
}

/// A running PgBouncer, stopped when dropped (also when the bench panics).
struct PgBouncer {
    child: std::process::Child,
    pid_file: std::path::PathBuf,
}

impl PgBouncer {
    fn pid(&self) -> u32 {
        fs::read_to_string(&self.pid_file)
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
            .expect("pgbouncer's pid file")
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // Through its pid file: as root the child is `runuser`, not pgbouncer itself.
        if let Ok(pid) = fs::read_to_string(&self.pid_file) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Login role `app` (its password in secret `db/app`), role `proxy` that reads it, and
/// pgbench's tables.
fn proxy_setup(cluster: &Cluster) {
    let mut db = cluster.superuser();
    db.batch_execute(&format!(
        "CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';
         CREATE ROLE proxy LOGIN PASSWORD 'proxy-pw' IN ROLE secrets_reader;
         GRANT CREATE ON SCHEMA public TO app;"
    ))
    .unwrap();
    let credential = format!(
        r#"{{"engine": "postgres", "host": "127.0.0.1", "port": {}, "dbname": "postgres", "username": "app", "password": "{APP_PASSWORD}"}}"#,
        cluster.port
    );
    db.execute("SELECT secrets.create_secret('db/app', $1)", &[&credential])
        .unwrap();
    let init = Command::new("pgbench")
        .args([
            "-i",
            "-q",
            "-s",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            &cluster.port.to_string(),
            "-U",
            "app",
            "postgres",
        ])
        .env("PGPASSWORD", APP_PASSWORD)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// The bench's proxy configuration: listening on loopback `listen_port` (0: any), one route
/// from database `appdb` to secret `db/app` for trusted clients, with more `limits` and
/// `route` keys in TOML.
fn proxy_config(cluster: &Cluster, listen_port: u16, limits: &str, route: &str) -> String {
    format!(
        "[listen]\ntcp = \"127.0.0.1:{listen_port}\"\n[store]\nhost = \"127.0.0.1\"\nport = {}\n\
         user = \"proxy\"\npassword = \"proxy-pw\"\n[limits]\n{limits}\n[[route]]\n\
         database = \"appdb\"\nsecret = \"db/app\"\nallow = [\"trust\"]\n{route}\n",
        cluster.port
    )
}

/// Each pooler twice: reaching the server over TCP (a pooler on another host; loopback here)
/// and through the server's Unix socket (a pooler on the database host), which saves the
/// kernel's TCP work on every server round trip.
fn proxy_benchmark(cluster: &Cluster, seconds: &str, rounds: u32) {
    let socket_dir = cluster.socket_dir().display().to_string();
    let mut paths: Vec<(String, u16, &str)> = vec![("direct".into(), cluster.port, "postgres")];
    let mut poolers = Vec::new();
    let start_proxy = |server_host: &str, route_extra: &str| {
        RunningProxy::start(
            Config::parse(&proxy_config(
                cluster,
                0,
                "pool_max_idle = 60",
                &format!("host = \"{server_host}\"\n{route_extra}"),
            ))
            .unwrap(),
        )
        .unwrap()
    };
    for (placement, server_host) in [("TCP", "127.0.0.1"), ("Unix socket", socket_dir.as_str())] {
        let proxy = start_proxy(server_host, "");
        let bouncer_port = free_port();
        let bouncer = start_pgbouncer(cluster, bouncer_port, server_host);
        paths.push((
            format!("PgBouncer (session), server over {placement}"),
            bouncer_port,
            "appdb",
        ));
        paths.push((
            format!("secrets-proxy, server over {placement}"),
            proxy.tcp_address.unwrap().port(),
            "appdb",
        ));
        poolers.push((proxy, Some(bouncer)));
    }
    // Transaction pooling: every client shares 10 server sessions.
    let transactions = start_proxy(&socket_dir, "pool_mode = \"transaction\"\npool_size = 10");
    paths.push((
        "secrets-proxy (transaction mode, 10 server sessions), server over Unix socket".into(),
        transactions.tcp_address.unwrap().port(),
        "appdb",
    ));
    poolers.push((transactions, None));
    let modes: [(&str, &[&str]); 3] = [
        ("-S -c 10", &["-c", "10"]),
        ("-S -c 50", &["-c", "50"]),
        ("-S -C -c 10", &["-C", "-c", "10"]),
    ];
    let mut rows = Vec::new();
    let mut baseline = Vec::new();
    for (mode, mode_args) in modes {
        let first_of_mode = rows.len();
        for (path, port, database) in &paths {
            let (port, database) = (*port, *database);
            let mode_args: Vec<String> = mode_args.iter().map(|a| a.to_string()).collect();
            let seconds = seconds.to_string();
            rows.push(Row {
                label: format!("{mode} {path}"),
                pgbench: Box::new(move || {
                    let mut command = Command::new("pgbench");
                    command
                        .args(["-n", "-S", "-j", "2", "-T", &seconds])
                        .args(&mode_args)
                        .args([
                            "-h",
                            "127.0.0.1",
                            "-p",
                            &port.to_string(),
                            "-U",
                            "app",
                            database,
                        ])
                        .env("PGPASSWORD", APP_PASSWORD);
                    command
                }),
            });
            baseline.push(first_of_mode);
        }
    }
    measure(
        &format!("pgbench -S (select only), {seconds} s per run; ratio to direct"),
        &rows,
        &baseline,
        rounds,
    );
    drop(poolers);
}

const IDLE_CLIENTS: usize = 2000;

/// 2,000 clients that log in and stay idle, through secrets-proxy running as its own process
/// (the binary `make bench` builds) in each pool mode and through PgBouncer: the growth of
/// each one's resident memory, and the server sessions open. In session mode each proxy client
/// holds its own server session, since it is shown the server's own greeting; in transaction
/// mode the clients share the route's pool_size; a PgBouncer client in session mode gets a
/// server only when it sends a query.
fn idle_clients_benchmark(cluster: &mut Cluster) {
    cluster.configure(
        KeySource::File(TEST_KEY.into()),
        &[&format!("max_connections = {}", IDLE_CLIENTS + 100)],
    );
    cluster.restart();
    let binary = std::env::current_exe()
        .unwrap()
        .with_file_name("secrets-proxy");
    // The proxy as its own process, in each pool mode.
    let start_proxy = |name: &str, route_extra: &str| {
        let port = free_port();
        let config = cluster.dir().join(format!("proxy-{name}.toml"));
        fs::write(&config, proxy_config(cluster, port, "", route_extra)).unwrap();
        let log = fs::File::create(cluster.dir().join(format!("proxy-{name}.log"))).unwrap();
        let proxy = Command::new(&binary)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} (scripts/bench.sh builds it): {e}", binary.display()));
        wait_for_port(port, "secrets-proxy");
        (proxy, port)
    };
    let mut session_proxy = start_proxy("session", "");
    let mut transaction_proxy = start_proxy("transaction", "pool_mode = \"transaction\"");
    let bouncer_port = free_port();
    let bouncer = start_pgbouncer(cluster, bouncer_port, "127.0.0.1");
    let mut db = cluster.superuser();

    println!(
        "\n{IDLE_CLIENTS} idle clients (logged in, then silent): resident memory of the pooler, \
         and the server sessions open for them"
    );
    println!("| what | before | with the clients | per client | server sessions |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, pid, port) in [
        (
            "secrets-proxy (session)",
            session_proxy.0.id(),
            session_proxy.1,
        ),
        (
            "secrets-proxy (transaction, pool_size 20)",
            transaction_proxy.0.id(),
            transaction_proxy.1,
        ),
        ("PgBouncer (session)", bouncer.pid(), bouncer_port),
    ] {
        // One client first, so the route's credential and the pooler's warm-up are in `before`.
        let warm_up = idle_clients(port, 1);
        let before = resident_kib(pid);
        let clients = idle_clients(port, IDLE_CLIENTS);
        std::thread::sleep(Duration::from_secs(1));
        let after = resident_kib(pid);
        let server_sessions: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app'",
                &[],
            )
            .unwrap()
            .get(0);
        println!(
            "| {name} | {:.1} MB | {:.1} MB | {:.1} KB | {server_sessions} |",
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            after.saturating_sub(before) as f64 / IDLE_CLIENTS as f64
        );
        drop(clients);
        drop(warm_up);
        // The next pooler starts from no server sessions.
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
            &[],
        )
        .unwrap();
    }
    drop(bouncer);
    for proxy in [&mut session_proxy.0, &mut transaction_proxy.0] {
        let _ = proxy.kill();
        let _ = proxy.wait();
    }
}

/// VmRSS of a process, in KiB.
fn resident_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// `count` connections that log in as `app` to `appdb` and wait for ReadyForQuery, opened
/// from four threads.
fn idle_clients(port: u16, count: usize) -> Vec<TcpStream> {
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let share = count / 4 + usize::from(thread < count % 4);
            std::thread::spawn(move || (0..share).map(|_| idle_client(port)).collect::<Vec<_>>())
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|thread| thread.join().unwrap())
        .collect()
}

fn idle_client(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(&startup_packet(
            3 << 16,
            &[("user", "app"), ("database", "appdb")],
        ))
        .unwrap();
    loop {
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).unwrap();
        let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let mut body = vec![0u8; (length - 4) as usize];
        stream.read_exact(&mut body).unwrap();
        match header[0] {
            b'Z' => return stream,
            b'E' => panic!("login refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}
