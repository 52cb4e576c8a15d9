//! The audit trail end to end: every call recorded (rolled back and denied ones too), never a
//! value, nothing dropped under load, append-only for everyone, tampering detected, retention
//! of whole prefixes, visibility per role, and what survives an immediate-mode stop.

use pg_secrets_e2e::{assert_sql_error, first_column, wait_until, Client, Cluster};
use std::time::{Duration, Instant};

const SECRET_VALUE: &str = "audit-marker-value-0f3a9c";
const MINUTE: Duration = Duration::from_secs(60);

/// Waits until the worker has moved every queued record into the table (`count` rows match).
fn wait_for_records(db: &mut Client, filter: &str, count: i64) {
    let found = |db: &mut Client| -> i64 {
        db.query_one(
            &format!("SELECT count(*) FROM secrets.audit_log WHERE {filter}"),
            &[],
        )
        .unwrap()
        .get(0)
    };
    wait_until(&format!("{count} records for {filter}"), MINUTE, || {
        found(db) >= count
    });
    assert_eq!(found(db), count, "more records than calls for {filter}");
}

/// A cluster whose worker evaluates the alarm rules every second rather than every 10.
fn cluster_evaluating_alarms_every_second() -> Cluster {
    Cluster::start_with(
        pg_secrets_e2e::KeySource::File(pg_secrets_e2e::TEST_KEY.into()),
        &["pg_secrets.alarm_interval = 1"],
    )
}

/// A cluster whose purge_audit_log may remove records of any age (by default the last 30
/// days are kept).
fn cluster_purging_anything() -> Cluster {
    Cluster::start_with(
        pg_secrets_e2e::KeySource::File(pg_secrets_e2e::TEST_KEY.into()),
        &["pg_secrets.audit_min_retention = 0"],
    )
}

fn verify(db: &mut Client) -> (bool, i64, Option<i64>) {
    let row = db
        .query_one(
            "SELECT ok, rows_checked, first_bad_id FROM secrets.verify_audit_log()",
            &[],
        )
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn rolled_back_and_denied_calls_are_recorded_and_no_value_is() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.execute(
        "SELECT secrets.create_secret('prod/db', $1)",
        &[&SECRET_VALUE],
    )
    .unwrap();
    db.batch_execute(
        "CREATE ROLE reader LOGIN PASSWORD 'pw';
         SELECT secrets.grant_access('prod/*', 'reader', '{get}');
         CREATE ROLE stranger LOGIN PASSWORD 'pw' IN ROLE secrets_user;",
    )
    .unwrap();
    let mut reader = Client::connect(
        &format!(
            "{} application_name=billing",
            cluster.connection_string("reader", "pw")
        ),
        pg_secrets_e2e::NoTls,
    )
    .unwrap();
    let mut tx = reader.transaction().unwrap();
    let value: String = tx
        .query_one("SELECT secrets.get_secret_value('prod/db')", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, SECRET_VALUE);
    tx.rollback().unwrap();
    let mut stranger = cluster.connect("stranger", "pw");
    let mut tx = stranger.transaction().unwrap();
    assert_sql_error(
        tx.query("SELECT secrets.get_secret_value('prod/db')", &[]),
        "42501",
        "permission denied",
    );
    tx.rollback().unwrap();

    wait_for_records(&mut db, "secret_name = 'prod/db'", 3);
    type Row = (
        String,
        String,
        String,
        Option<String>,
        String,
        Option<String>,
        bool,
    );
    let rows: Vec<Row> = db
        .query(
            "SELECT action, \"current_user\", outcome, sqlstate, details->>'function', \
                    application_name, version_id IS NOT NULL AND version_stage = 'CURRENT' \
             FROM secrets.audit_log WHERE secret_name = 'prod/db' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| {
            (
                row.get(0),
                row.get(1),
                row.get(2),
                row.get(3),
                row.get(4),
                row.get(5),
                row.get(6),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "create".into(),
                "postgres".into(),
                "allowed".into(),
                None,
                "create_secret".into(),
                None,
                true
            ),
            (
                "get".into(),
                "reader".into(),
                "allowed".into(),
                None,
                "get_secret_value".into(),
                Some("billing".into()),
                true
            ),
            (
                "get".into(),
                "stranger".into(),
                "denied".into(),
                Some("42501".into()),
                "get_secret_value".into(),
                None,
                false
            ),
        ]
    );
    let (client_addr, port, pid): (String, i32, i32) = {
        let row = db
            .query_one(
                "SELECT host(client_addr), client_port, backend_pid FROM secrets.audit_log \
                 WHERE \"current_user\" = 'reader'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(client_addr, "127.0.0.1");
    assert!(port > 0 && pid > 0);
    // Never the value, in any column.
    let leaks: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.audit_record r WHERE row_to_json(r)::text LIKE $1",
            &[&format!("%{SECRET_VALUE}%")],
        )
        .unwrap()
        .get(0);
    assert_eq!(leaks, 0);
    assert_eq!(verify(&mut db), (true, 4, None));
    // A role renamed while its session is open is recorded under its new name: the session's
    // cache of role names is dropped when any role changes.
    db.batch_execute("ALTER ROLE reader RENAME TO reader_renamed")
        .unwrap();
    reader
        .query_one("SELECT secrets.get_secret_value('prod/db')", &[])
        .unwrap();
    wait_for_records(
        &mut db,
        "\"session_user\" = 'reader_renamed' AND \"current_user\" = 'reader_renamed'",
        1,
    );
}

/// A call that a PostgreSQL error ends, here a lock timeout while another session holds the
/// secrets table, is recorded as an error with that SQLSTATE, though its transaction aborts.
#[test]
fn a_call_ended_by_a_postgres_error_is_recorded() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.execute(
        "SELECT secrets.create_secret('prod/locked', $1)",
        &[&SECRET_VALUE],
    )
    .unwrap();
    let mut reader = cluster.superuser();
    // A first call fills what a session caches, so that the second waits inside the call.
    reader
        .query_one("SELECT secrets.get_secret_value('prod/locked')", &[])
        .unwrap();
    let mut locker = cluster.superuser();
    let mut lock = locker.transaction().unwrap();
    lock.batch_execute("LOCK TABLE secrets.secret IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    reader.batch_execute("SET lock_timeout = '200ms'").unwrap();
    assert_sql_error(
        reader.query("SELECT secrets.get_secret_value('prod/locked')", &[]),
        "55P03",
        "lock timeout",
    );
    lock.rollback().unwrap();
    wait_for_records(
        &mut db,
        "secret_name = 'prod/locked' AND action = 'get' AND outcome = 'error'",
        1,
    );
    let row = db
        .query_one(
            "SELECT sqlstate, details->>'error', details->>'function' FROM secrets.audit_log \
             WHERE secret_name = 'prod/locked' AND outcome = 'error'",
            &[],
        )
        .unwrap();
    let (sqlstate, error, function): (String, String, String) =
        (row.get(0), row.get(1), row.get(2));
    assert_eq!(
        (sqlstate.as_str(), function.as_str()),
        ("55P03", "get_secret_value")
    );
    assert!(error.contains("lock timeout"), "{error}");
    // The session goes on, and its next call is recorded as usual.
    reader
        .query_one("SELECT secrets.get_secret_value('prod/locked')", &[])
        .unwrap();
    wait_for_records(
        &mut db,
        "secret_name = 'prod/locked' AND action = 'get' AND outcome = 'allowed'",
        2,
    );
    assert!(verify(&mut db).0);
}

#[test]
fn nothing_is_dropped_under_load() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('load/' || i, 'v' || i) FROM generate_series(1, 100) i",
    )
    .unwrap();
    let script = cluster.dir().join("get.sql");
    std::fs::write(
        &script,
        "\\set i random(1, 100)\nSELECT secrets.get_secret_value('load/' || :i);\n",
    )
    .unwrap();
    let output = cluster
        .client_program("pgbench")
        .args([
            "-n", "-M", "prepared", "-c", "8", "-j", "2", "-t", "2500", "-f",
        ])
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    wait_for_records(
        &mut db,
        "action = 'get' AND secret_name LIKE 'load/%'",
        20_000,
    );
    let (ok, checked, _) = verify(&mut db);
    assert!(ok);
    assert!(checked >= 20_100, "{checked}");
}

/// The worker's audit and alarm transactions commit waiting for the local WAL flush only: a
/// synchronous standby that is configured but down, for which every other commit waits, stops
/// neither the trail nor the alarm rules' evaluation.
#[test]
fn a_synchronous_standby_that_is_down_does_not_stop_the_trail() {
    let cluster = cluster_evaluating_alarms_every_second();
    let mut db = cluster.superuser();
    // From the start, before the worker has stored or evaluated anything; this session's own
    // writes do not wait.
    db.batch_execute("ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    db.batch_execute("SET synchronous_commit = local").unwrap();
    // Proof that other commits now wait: a write from another session hangs in SyncRep, once
    // that session has the setting (a reload reaches each process on its own time).
    let mut writer = cluster.superuser();
    let writer_pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);
    wait_until("the reload to reach the writer", MINUTE, || {
        writer
            .query_one("SHOW synchronous_standby_names", &[])
            .unwrap()
            .get::<_, String>(0)
            == "absent_standby"
    });
    let waiting_writer = std::thread::spawn(move || {
        // Committed locally once cancelled, with a warning: not an error.
        writer.batch_execute("CREATE TABLE waits_for_the_standby ()")
    });
    wait_until("the writer to wait for the standby", MINUTE, || {
        db.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'SyncRep'",
            &[&writer_pid],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
    db.batch_execute(
        "SELECT secrets.create_secret('sync/db', 'v');
         SELECT secrets.create_alarm_rule('sync-first-read', 'first_read');",
    )
    .unwrap();
    for _ in 0..50 {
        db.query_one("SELECT secrets.get_secret_value('sync/db')", &[])
            .unwrap();
    }
    wait_for_records(&mut db, "action = 'get' AND secret_name = 'sync/db'", 50);
    // The rule's evaluation committed past the reads: it records how far it has looked.
    let last_read: i64 = db
        .query_one(
            "SELECT max(id) FROM secrets.audit_log WHERE secret_name = 'sync/db'",
            &[],
        )
        .unwrap()
        .get(0);
    wait_until("the alarm rule to be evaluated", MINUTE, || {
        db.query_one(
            "SELECT checked_through FROM secrets.alarm_rule WHERE name = 'sync-first-read'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            >= last_read
    });
    db.query_one("SELECT pg_cancel_backend($1)", &[&writer_pid])
        .unwrap();
    waiting_writer.join().unwrap().unwrap();
    db.batch_execute("ALTER SYSTEM RESET synchronous_standby_names")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    assert!(verify(&mut db).0);
}

#[test]
fn the_trail_is_append_only_and_tampering_is_found() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('t/' || i, 'v') FROM generate_series(1, 3) i;
         SELECT secrets.get_secret_value('t/' || i) FROM generate_series(1, 3) i, generate_series(1, 3) n;",
    )
    .unwrap();
    wait_for_records(&mut db, "secret_name LIKE 't/%'", 12);
    assert_eq!(verify(&mut db), (true, 12, None));
    // Nobody changes it, not even a superuser replaying as a replica.
    for sql in [
        "UPDATE secrets.audit_record SET outcome = 'denied' WHERE id = 3",
        "DELETE FROM secrets.audit_record WHERE id = 3",
        "TRUNCATE secrets.audit_record",
    ] {
        assert_sql_error(db.execute(sql, &[]), "42501", "append-only");
    }
    db.batch_execute("SET session_replication_role = replica")
        .unwrap();
    assert_sql_error(
        db.execute("DELETE FROM secrets.audit_record WHERE id = 3", &[]),
        "42501",
        "append-only",
    );
    db.batch_execute("RESET session_replication_role").unwrap();

    // A superuser who disables the triggers can tamper; verification finds the first bad row.
    db.batch_execute("ALTER TABLE secrets.audit_record DISABLE TRIGGER ALL")
        .unwrap();
    db.execute(
        "UPDATE secrets.audit_record SET \"current_user\" = 'someone_else' WHERE id = 4",
        &[],
    )
    .unwrap();
    assert_eq!(verify(&mut db), (false, 4, Some(4)), "a changed record");
    db.execute(
        "UPDATE secrets.audit_record SET \"current_user\" = 'postgres' WHERE id = 4",
        &[],
    )
    .unwrap();
    assert!(verify(&mut db).0);
    db.batch_execute(
        "UPDATE secrets.audit_record SET id = -6 WHERE id = 6;
         UPDATE secrets.audit_record SET id = 6 WHERE id = 7;
         UPDATE secrets.audit_record SET id = 7 WHERE id = -6;",
    )
    .unwrap();
    assert_eq!(verify(&mut db), (false, 6, Some(6)), "two records swapped");
    db.batch_execute(
        "UPDATE secrets.audit_record SET id = -6 WHERE id = 6;
         UPDATE secrets.audit_record SET id = 6 WHERE id = 7;
         UPDATE secrets.audit_record SET id = 7 WHERE id = -6;",
    )
    .unwrap();
    assert!(verify(&mut db).0);
    db.execute("DELETE FROM secrets.audit_record WHERE id = 9", &[])
        .unwrap();
    assert_eq!(verify(&mut db), (false, 9, Some(9)), "a removed record");
}

#[test]
fn retention_removes_a_prefix_and_the_rest_still_verifies() {
    let cluster = cluster_purging_anything();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('r/' || i, 'v') FROM generate_series(1, 5) i;
         CREATE ROLE clerk LOGIN PASSWORD 'pw' IN ROLE secrets_user;",
    )
    .unwrap();
    wait_for_records(&mut db, "secret_name LIKE 'r/%'", 5);
    let mut clerk = cluster.connect("clerk", "pw");
    assert_sql_error(
        clerk.query("SELECT secrets.purge_audit_log('0 seconds')", &[]),
        "42501",
        "permission denied: purging the audit log is for superusers and secrets_admin",
    );
    assert_sql_error(
        db.query("SELECT secrets.purge_audit_log('-1 day')", &[]),
        "22023",
        "not negative",
    );
    assert_sql_error(
        db.query("SELECT secrets.purge_audit_log('1 day -30 hours')", &[]),
        "22023",
        "not negative",
    );
    assert_sql_error(
        db.query("SELECT secrets.purge_audit_log('3650000 days')", &[]),
        "22023",
        "older_than must be at most 36500 days",
    );
    let removed: i64 = db
        .query_one("SELECT secrets.purge_audit_log('0 seconds')", &[])
        .unwrap()
        .get(0);
    assert!(removed >= 5, "{removed}");
    // The purge is recorded, after the prefix it removed, and the chain verifies from the anchor.
    let purged = "details->>'function' = 'purge_audit_log' AND outcome = 'allowed'";
    wait_for_records(&mut db, purged, 1);
    db.batch_execute("SELECT secrets.create_secret('r/after', 'v')")
        .unwrap();
    wait_for_records(&mut db, "secret_name = 'r/after'", 1);
    let (ok, checked, bad) = verify(&mut db);
    assert!(ok, "first bad: {bad:?}");
    assert!(checked >= 2);
    let details: String = db
        .query_one(
            &format!("SELECT details::text FROM secrets.audit_log WHERE {purged}"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(details.contains("removed_count"), "{details}");

    // What the retention removed stays on record: its anchor is append-only too.
    for sql in [
        "UPDATE secrets.audit_anchor SET removed_by = 'clerk'",
        "DELETE FROM secrets.audit_anchor",
        "TRUNCATE secrets.audit_anchor",
    ] {
        assert_sql_error(db.execute(sql, &[]), "42501", "append-only");
    }
    // An anchor put in by hand, claiming records removed that are still there (so that the
    // walk would start past them), is found.
    let first_kept: i64 = db
        .query_one("SELECT min(id) FROM secrets.audit_record", &[])
        .unwrap()
        .get(0);
    db.batch_execute(
        "INSERT INTO secrets.audit_anchor (removed_through, anchor_hash, removed_count, removed_by) \
         SELECT max(id), (SELECT hash FROM secrets.audit_record ORDER BY id DESC LIMIT 1), 0, 'postgres' \
         FROM secrets.audit_record",
    )
    .unwrap();
    assert_eq!(verify(&mut db), (false, 0, Some(first_kept)));

    // Without the row that says how far "who read what" was taken from the records, a purge
    // would remove records whose readers were never noted: it is refused, naming the table.
    db.batch_execute("DELETE FROM secrets.audit_reader_progress")
        .unwrap();
    assert_sql_error(
        db.query("SELECT secrets.purge_audit_log('0 seconds')", &[]),
        "55000",
        "table secrets.audit_reader_progress is not as this pg_secrets library writes it: its one row is missing",
    );
}

#[test]
fn a_role_sees_the_records_of_what_it_manages_and_auditors_see_all() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE team_a LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE team_b LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE auditor LOGIN PASSWORD 'pw' IN ROLE secrets_auditor;
         SELECT secrets.grant_access('a/*', 'team_a', '{manage}');
         SELECT secrets.grant_access('b/*', 'team_b', '{manage,get}');",
    )
    .unwrap();
    let mut team_a = cluster.connect("team_a", "pw");
    team_a
        .batch_execute("SELECT secrets.create_secret('a/key', 'v')")
        .unwrap();
    let mut team_b = cluster.connect("team_b", "pw");
    team_b
        .batch_execute(
            "SELECT secrets.create_secret('b/key', 'v'); SELECT secrets.get_secret_value('b/key')",
        )
        .unwrap();
    wait_for_records(&mut db, "secret_name IN ('a/key', 'b/key')", 3);
    let names = |client: &mut Client| -> Vec<String> {
        first_column(client, "SELECT DISTINCT secret_name FROM secrets.audit_log WHERE secret_id IS NOT NULL ORDER BY 1")
    };
    assert_eq!(names(&mut team_a), vec!["a/key"]);
    assert_eq!(names(&mut team_b), vec!["b/key"]);
    // team_b's denied attempt on a/key is team_a's to see (it names the secret), not team_b's.
    assert_sql_error(
        team_b.query("SELECT secrets.get_secret_value('a/key')", &[]),
        "42501",
        "permission denied",
    );
    wait_for_records(&mut db, "secret_name = 'a/key' AND outcome = 'denied'", 1);
    let denied = |client: &mut Client| -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM secrets.audit_log \
                 WHERE outcome = 'denied' AND \"session_user\" = 'team_b'",
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(
        denied(&mut team_a),
        1,
        "the manager sees the denied attempt"
    );
    assert_eq!(denied(&mut team_b), 0);
    // A request names the secret and its decision names the request: both are records of
    // a/key, with its name and id, for its managers, who decide the requests.
    let request = |client: &mut Client| -> String {
        client
            .query_one(
                "SELECT secrets.request_access('a/key', '{get}', '1 hour', 'on call')::text",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let (approved, refused) = (request(&mut team_b), request(&mut team_b));
    for (decision, request) in [("approve", &approved), ("deny", &refused)] {
        team_a
            .execute(
                &format!("SELECT secrets.{decision}_access_request($1::text::uuid)"),
                &[request],
            )
            .unwrap();
    }
    let requests = "details->>'function' \
                    IN ('request_access', 'approve_access_request', 'deny_access_request')";
    wait_for_records(&mut db, requests, 4);
    let seen = first_column(
        &mut team_a,
        &format!(
            "SELECT details->>'function' FROM secrets.audit_log \
             WHERE {requests} AND secret_name = 'a/key' AND secret_id IS NOT NULL ORDER BY id"
        ),
    );
    assert_eq!(
        seen,
        [
            "request_access",
            "request_access",
            "approve_access_request",
            "deny_access_request"
        ]
    );
    // secrets_admin's grant on a/key is a record of a/key: its managers see who handed out
    // access to it. Records of no secret (grants on a pattern) are for secrets_admin.
    let mut boss = cluster.login_role("boss", "IN ROLE secrets_admin");
    boss.batch_execute("SELECT secrets.grant_access('a/key', 'team_b', '{describe}')")
        .unwrap();
    let grants = "details->>'function' = 'grant_access'";
    wait_for_records(&mut db, grants, 3);
    let grant_records = |client: &mut Client, with_id: bool| {
        first_column(
            client,
            &format!(
                "SELECT secret_name || ' by ' || \"session_user\" FROM secrets.audit_log \
                 WHERE {grants} AND (secret_id IS NOT NULL) = {with_id} ORDER BY 1"
            ),
        )
    };
    assert_eq!(grant_records(&mut team_a, true), ["a/key by boss"]);
    assert!(grant_records(&mut team_a, false).is_empty());
    assert_eq!(
        grant_records(&mut boss, false),
        ["a/* by postgres", "b/* by postgres"]
    );
    let mut auditor = cluster.connect("auditor", "pw");
    assert_eq!(names(&mut auditor), vec!["a/key", "b/key"]);
    assert!(verify(&mut auditor).0);
    assert_sql_error(
        team_a.query("SELECT * FROM secrets.verify_audit_log()", &[]),
        "42501",
        "permission denied: verifying the audit log is for superusers, secrets_admin and secrets_auditor",
    );
    // Records outlive their secret, and reading the log is no error for anyone once b/key is
    // purged; its records are then for auditors (and those who manage every secret), since its
    // owner and resource policy went with it.
    team_b
        .batch_execute(
            "SELECT secrets.delete_secret('b/key', force_delete_without_recovery => true)",
        )
        .unwrap();
    assert!(names(&mut team_b).is_empty());
    assert_eq!(names(&mut team_a), vec!["a/key"]);
    assert_eq!(names(&mut auditor), vec!["a/key", "b/key"]);
}

fn superuser_as_application(cluster: &Cluster, application_name: &str) -> Client {
    Client::connect(
        &format!(
            "{} application_name={application_name}",
            cluster.connection_string(
                pg_secrets_e2e::SUPERUSER,
                pg_secrets_e2e::SUPERUSER_PASSWORD
            )
        ),
        pg_secrets_e2e::NoTls,
    )
    .unwrap()
}

/// Each stored record's server-log line carries the id and chain hash of its row, so a log
/// shipper's copy can be matched with the table; a line any role can forge with `RAISE LOG`
/// has no row of that hash.
#[test]
fn server_log_lines_carry_the_id_and_hash_of_their_row() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SET application_name = 'line-check';
         SELECT secrets.create_secret('app/db', 'v');
         SELECT secrets.get_secret_value('app/db');
         DO $$ BEGIN RAISE LOG 'pg_secrets audit: {\"action\":\"get\",\"application_name\":\"line-check\",\"id\":1,\"hash\":\"00\"}'; END $$;",
    )
    .unwrap();
    let lines = || -> Vec<serde_json::Value> {
        cluster
            .server_log()
            .lines()
            .filter_map(|line| line.split_once("pg_secrets audit: "))
            .filter_map(|(_, json)| serde_json::from_str::<serde_json::Value>(json).ok())
            .filter(|json| json["application_name"] == "line-check")
            .collect()
    };
    wait_until("the records' lines", Duration::from_secs(30), || {
        lines().len() == 3
    });
    let mut matched = Vec::new();
    for line in lines() {
        let stored: Option<String> = db
            .query_opt(
                "SELECT encode(hash, 'hex') FROM secrets.audit_record WHERE id = $1",
                &[&line["id"].as_i64().unwrap()],
            )
            .unwrap()
            .map(|row| row.get(0));
        if stored.as_deref() == line["hash"].as_str() {
            matched.push(line["action"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(matched, ["create", "get"], "the forged line matches no row");
}

/// Whether `prefix` is what the server writes before a message with the default
/// `log_line_prefix`, then `LOG:  `: `2026-11-27 22:37:36.123 UTC [4242] LOG:  `.
fn is_log_line_prefix(prefix: &str) -> bool {
    let Some((time, rest)) = prefix.split_once(" UTC [") else {
        return false;
    };
    let Some((pid, level)) = rest.split_once("] ") else {
        return false;
    };
    time.len() == 23
        && time.bytes().enumerate().all(|(at, byte)| match at {
            4 | 7 => byte == b'-',
            10 => byte == b' ',
            13 | 16 => byte == b':',
            19 => byte == b'.',
            _ => byte.is_ascii_digit(),
        })
        && !pid.is_empty()
        && pid.bytes().all(|byte| byte.is_ascii_digit())
        && level == "LOG:  "
}

/// The audit worker sends its lines to the logging collector in the collector's own protocol,
/// as every server process sends its messages: each reaches the file as a line of its own,
/// with no byte of the protocol's headers, next to a message long enough to take the
/// collector several chunks. (A fault in the headers puts their bytes into the file, or holds
/// lines back; lines sent as plain text would pass too.)
#[test]
fn server_log_lines_reach_the_collectors_file_whole() {
    let cluster = Cluster::start();
    let mut db = superuser_as_application(&cluster, "whole-check");
    let long_message = format!("long-start {} long-end", "x".repeat(10_000));
    db.batch_execute(&format!(
        "SELECT secrets.create_secret('app/db', 'v');
         DO $$ BEGIN RAISE LOG '{long_message}'; END $$;
         SELECT secrets.get_secret_value('app/db') FROM generate_series(1, 50);"
    ))
    .unwrap();
    // The create's line and the 50 reads'.
    wait_until("the calls' lines", Duration::from_secs(30), || {
        audit_log_lines(&cluster, "whole-check") == 51
    });
    let log = cluster.server_log();
    assert!(!log.contains('\0'), "no protocol header reaches the file");
    for (line, (prefix, json)) in log
        .lines()
        .filter_map(|line| Some((line, line.split_once("pg_secrets audit: ")?)))
    {
        assert!(
            is_log_line_prefix(prefix) && serde_json::from_str::<serde_json::Value>(json).is_ok(),
            "each audit line is a line of its own: {line:.120}"
        );
    }
    assert!(log.contains(&long_message), "the long message is whole");
}

/// Audit lines of allowed calls by this application in the cluster's server log.
fn audit_log_lines(cluster: &Cluster, application_name: &str) -> usize {
    let application = format!("\"application_name\":\"{application_name}\"");
    cluster
        .server_log()
        .lines()
        .filter(|line| {
            line.contains("pg_secrets audit: ")
                && line.contains(&application)
                && line.contains("\"outcome\":\"allowed\"")
        })
        .count()
}

/// The worker's pid, from pg_stat_activity.
fn worker_pid(db: &mut Client) -> String {
    let pid: i32 = db
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_secrets audit worker'",
            &[],
        )
        .unwrap()
        .get(0);
    pid.to_string()
}

fn signal(pid: &str, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, pid])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

/// `reads` audited reads by application `crash-test`, while the worker is stopped (SIGSTOP),
/// so every record is still queued when the test crashes the server.
fn reads_while_the_worker_is_stopped(cluster: &Cluster, reads: usize) -> String {
    let mut db = cluster.superuser();
    let worker = worker_pid(&mut db);
    signal(&worker, "-STOP");
    let mut app = superuser_as_application(cluster, "crash-test");
    for _ in 0..reads {
        app.query_one("SELECT secrets.get_secret_value('crash/key')", &[])
            .unwrap();
    }
    worker
}

/// A queue file the server cannot open at start (here a directory stands in its place) does
/// not make the trail lossy: every audited call is refused with 58030, nothing changes, and the
/// server log says why. With the file usable again and the server restarted, calls work.
#[test]
fn an_unusable_queue_file_refuses_calls_rather_than_lose_records() {
    let mut cluster = Cluster::start();
    cluster
        .superuser()
        .batch_execute("SELECT secrets.create_secret('app/db', 'v1')")
        .unwrap();
    cluster.stop("fast");
    let queue = cluster.data_dir().join("pg_secrets_audit.queue");
    std::fs::remove_file(&queue).unwrap();
    std::fs::create_dir(&queue).unwrap();
    cluster.restart();
    let mut db = cluster.superuser();
    let before = pg_secrets_e2e::store_state(&mut db);
    for call in [
        "SELECT secrets.get_secret_value('app/db')",
        "SELECT secrets.put_secret_value('app/db', 'v2')::text",
        "SELECT secrets.create_secret('app/other', 'v')::text",
    ] {
        assert_sql_error(
            db.query(call, &[]),
            "58030",
            "pg_secrets_audit.queue in the data directory could not be opened at server start",
        );
    }
    assert_eq!(pg_secrets_e2e::store_state(&mut db), before);
    let log = cluster.server_log();
    assert!(
        log.contains("cannot map the audit queue file pg_secrets_audit.queue: Is a directory"),
        "the server log says why: {log}"
    );
    drop(db);
    cluster.stop("fast");
    std::fs::remove_dir(&queue).unwrap();
    cluster.restart();
    let value: String = cluster
        .superuser()
        .query_one("SELECT secrets.get_secret_value('app/db')", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, "v1");
}

/// A full queue: with the worker stopped, reads fill the queue's 4,096 slots; the next read
/// waits `pg_secrets.audit_queue_wait` and fails with `53400`, and one whose
/// `statement_timeout` ends that wait first fails with `57014`. Neither happens unaudited: both
/// records are in the server log at once. When the worker goes on, every queued record is
/// stored, and the two failed calls are not.
#[test]
fn a_full_queue_fails_calls_and_keeps_their_records_in_the_server_log() {
    let cluster = Cluster::start_with(
        pg_secrets_e2e::KeySource::File(pg_secrets_e2e::TEST_KEY.into()),
        &["pg_secrets.audit_queue_wait = 300"],
    );
    let mut db = cluster.superuser();
    db.batch_execute("SELECT secrets.create_secret('full/key', 'v')")
        .unwrap();
    let worker = worker_pid(&mut db);
    signal(&worker, "-STOP");
    let mut filler = superuser_as_application(&cluster, "filler");
    let read = "SELECT secrets.get_secret_value('full/key')";
    let mut queued = 0i64;
    let refused = loop {
        match filler.query_one(read, &[]) {
            Ok(_) => queued += 1,
            Err(error) => break error,
        }
        assert!(queued <= 4096, "the queue holds 4,096 records");
    };
    assert!(queued > 4000, "{queued} reads before the queue was full");
    assert_sql_error::<()>(Err(refused), "53400", "audit");
    let mut impatient = superuser_as_application(&cluster, "impatient");
    impatient
        .batch_execute("SET statement_timeout = '100ms'")
        .unwrap();
    assert_sql_error(impatient.query(read, &[]), "57014", "statement timeout");
    for application in ["filler", "impatient"] {
        wait_until(
            &format!("the server log line of {application}'s failed read"),
            MINUTE,
            || audit_log_lines(&cluster, application) == 1,
        );
    }
    signal(&worker, "-CONT");
    wait_for_records(&mut db, "application_name = 'filler'", queued);
    wait_for_records(&mut db, "application_name = 'impatient'", 0);
    assert!(verify(&mut db).0);
}

/// Waits until the table holds `expected` records of the crash test (the server restarting
/// after a crash first), and returns how many it holds then.
fn stored_after_restart(cluster: &Cluster, expected: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = Client::connect(
            &cluster.connection_string(
                pg_secrets_e2e::SUPERUSER,
                pg_secrets_e2e::SUPERUSER_PASSWORD,
            ),
            pg_secrets_e2e::NoTls,
        )
        .and_then(|mut db| {
            db.query_one(
                "SELECT count(*) FROM secrets.audit_log WHERE application_name = 'crash-test'",
                &[],
            )
        })
        .map(|row| row.get::<_, i64>(0));
        match stored {
            Ok(stored) if stored >= expected || Instant::now() > deadline => return stored,
            _ if Instant::now() > deadline => panic!("the server did not come back"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The queue is a file: what it held when the server crashed, or stopped in immediate mode,
/// reaches the table after the restart, exactly once, and then the server log.
#[test]
fn a_crash_or_an_immediate_stop_loses_no_record() {
    let mut cluster = Cluster::start();
    cluster
        .superuser()
        .batch_execute("SELECT secrets.create_secret('crash/key', 'v')")
        .unwrap();

    // A crash: the worker killed, so the postmaster resets every process and shared memory.
    let worker = reads_while_the_worker_is_stopped(&cluster, 200);
    let mut db = cluster.superuser();
    let before: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.audit_log WHERE application_name = 'crash-test'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(before, 0, "the stopped worker stored nothing");
    drop(db);
    signal(&worker, "-KILL");
    assert_eq!(stored_after_restart(&cluster, 200), 200);
    // The worker logs records after storing them; the next stop must not catch it in between.
    wait_until("the stored records in the server log", MINUTE, || {
        audit_log_lines(&cluster, "crash-test") >= 200
    });

    // An immediate stop, the worker again unable to drain.
    let worker = reads_while_the_worker_is_stopped(&cluster, 100);
    signal(&worker, "-KILL");
    cluster.stop("immediate");
    cluster.restart();
    assert_eq!(stored_after_restart(&cluster, 300), 300);
    // Exactly once: nothing more arrives later.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored_after_restart(&cluster, 300), 300);
    let mut db = cluster.superuser();
    assert!(verify(&mut db).0, "the chain is intact");
    wait_until("every stored record in the server log", MINUTE, || {
        audit_log_lines(&cluster, "crash-test") >= 300
    });
    assert_eq!(
        audit_log_lines(&cluster, "crash-test"),
        300,
        "the worker logs each record once it is stored"
    );
}

/// The queue file after an operating-system crash: its pages need not have reached the disk
/// together. Simulated by editing the file of a stopped server at the offsets of queue.rs's
/// layout (a 40-byte header whose `head` is at byte 24, then 4,096 slots of 2,048 bytes).
#[test]
fn a_queue_file_left_by_an_operating_system_crash_is_read_for_what_it_holds() {
    const HEAD_OFFSET: usize = 24;
    const HEADER_BYTES: usize = 40;
    const SLOT_SIZE: usize = 2048;
    const SLOTS: usize = 4096;
    let mut cluster = Cluster::start();
    cluster
        .superuser()
        .batch_execute("SELECT secrets.create_secret('crash/key', 'v')")
        .unwrap();
    // Stopped while its worker is frozen: the postmaster kills it after a few seconds, and
    // no crash restart (which a killed worker would start) can drain the records first.
    let _frozen = reads_while_the_worker_is_stopped(&cluster, 10);
    cluster.stop("immediate");
    let queue_file = cluster.data_dir().join("pg_secrets_audit.queue");
    let edit = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = std::fs::read(&queue_file).unwrap();
        assert_eq!(
            bytes.len(),
            HEADER_BYTES + SLOTS * SLOT_SIZE,
            "queue.rs's layout"
        );
        change(&mut bytes);
        std::fs::write(&queue_file, bytes).unwrap();
    };
    let head_of =
        |bytes: &[u8]| u64::from_le_bytes(bytes[HEAD_OFFSET..HEAD_OFFSET + 8].try_into().unwrap());
    let set_head = |bytes: &mut Vec<u8>, head: u64| {
        bytes[HEAD_OFFSET..HEAD_OFFSET + 8].copy_from_slice(&head.to_le_bytes());
    };
    edit(&|bytes| {
        // The header reached the disk before the last 3 records' slots did...
        let head = head_of(bytes);
        set_head(bytes, head - 3);
        // ...and the 5th record's slot only half: one byte of it is not what was written.
        let marker = b"crash-test";
        let fifth = bytes
            .windows(marker.len())
            .enumerate()
            .filter(|(_, window)| window == marker)
            .nth(4)
            .expect("ten queued records")
            .0;
        bytes[fifth] ^= 0xff;
    });
    cluster.restart();
    // All ten take their place: nine as they were, the damaged one as `unreadable`.
    assert_eq!(stored_after_restart(&cluster, 9), 9);
    let mut db = cluster.superuser();
    let unreadable = |db: &mut Client| -> Vec<String> {
        first_column(db, "SELECT details->>'error' FROM secrets.audit_log WHERE action = 'unreadable' ORDER BY id")
    };
    wait_until("the stale slot stored as unreadable", MINUTE, || {
        !unreadable(&mut db).is_empty()
    });
    let found = unreadable(&mut db);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("stale or damaged"), "{found:?}");
    assert!(cluster
        .server_log()
        .contains("3 audit records found in the queue file past its recorded end were taken back"));

    // The header reached the disk, the slots it covers did not: one holds an earlier lap's
    // record (intact, with its own sequence number), the next nothing at all. Neither is
    // stored as if it were the record that belongs there.
    drop(db);
    cluster.stop("fast");
    edit(&|bytes| {
        let head = head_of(bytes) as usize;
        let slot = |sequence: usize| HEADER_BYTES + (sequence % SLOTS) * SLOT_SIZE;
        let earlier = bytes[slot(head - 1)..slot(head - 1) + SLOT_SIZE].to_vec();
        bytes[slot(head)..slot(head) + SLOT_SIZE].copy_from_slice(&earlier);
        set_head(bytes, head as u64 + 2);
    });
    cluster.restart();
    let mut db = cluster.superuser();
    wait_until("three unreadable records", MINUTE, || {
        unreadable(&mut db).len() >= 3
    });
    assert_eq!(unreadable(&mut db).len(), 3);
    assert_eq!(stored_after_restart(&cluster, 9), 9);
    assert!(verify(&mut db).0, "the chain is intact");
}

/// A table the worker cannot append to (here a CHECK constraint an administrator added)
/// stops the trail with an error in the server log, never with a crash, and the records wait
/// in the queue until the table takes them again.
#[test]
fn a_row_the_table_refuses_stops_the_trail_without_a_crash() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('refused/key', 'v');
         ALTER TABLE secrets.audit_record ADD CONSTRAINT no_describe CHECK (action <> 'describe');",
    )
    .unwrap();
    let started: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);
    db.batch_execute("SELECT secrets.describe_secret('refused/key')")
        .unwrap();
    wait_until("the refusal in the server log", MINUTE, || {
        cluster.server_log().contains("no_describe")
    });
    assert!(
        cluster
            .server_log()
            .contains("violates check constraint \"no_describe\""),
        "the worker reports the refusal"
    );
    let still: String = db
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(started, still, "no crash, no restart");
    let describes = |db: &mut Client| -> i64 {
        db.query_one(
            "SELECT count(*) FROM secrets.audit_log WHERE action = 'describe'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(describes(&mut db), 0);
    // An INSERT trigger would not be fired by the bulk append: refused the same way.
    db.batch_execute(
        "ALTER TABLE secrets.audit_record DROP CONSTRAINT no_describe;
         CREATE FUNCTION public.forward() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
         CREATE TRIGGER forward AFTER INSERT ON secrets.audit_record
             FOR EACH ROW EXECUTE FUNCTION public.forward();",
    )
    .unwrap();
    wait_until("the trigger refusal in the server log", MINUTE, || {
        cluster.server_log().contains("INSERT trigger")
    });
    assert!(cluster
        .server_log()
        .contains("it has an INSERT trigger, which the worker's bulk append would not fire"));
    assert_eq!(describes(&mut db), 0);
    db.batch_execute("DROP TRIGGER forward ON secrets.audit_record")
        .unwrap();
    wait_until("the describe record", MINUTE, || describes(&mut db) > 0);
    assert_eq!(describes(&mut db), 1, "stored once the table takes it");
    assert!(verify(&mut db).0);
}

#[test]
fn alarm_rules_raise_notifications_and_anomalies() {
    let cluster = cluster_evaluating_alarms_every_second();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE reader LOGIN PASSWORD 'pw';
         CREATE ROLE stranger LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         SELECT secrets.create_secret('s/' || i, 'v') FROM generate_series(1, 2) i;
         SELECT secrets.grant_access('s/*', 'reader', '{get}');",
    )
    .unwrap();
    // Business hours that exclude now, so every access now is off hours.
    let hour: i32 = db
        .query_one(
            "SELECT extract(hour FROM now() AT TIME ZONE 'UTC')::int",
            &[],
        )
        .unwrap()
        .get(0);
    let (from, to) = if hour <= 20 {
        (format!("{:02}:00", hour + 2), format!("{:02}:00", hour + 3))
    } else {
        ("01:00".to_string(), "02:00".to_string())
    };
    for (name, kind, params) in [
        ("new reader", "first_read", "{}".to_string()),
        (
            "brute force",
            "denials",
            r#"{"count": 3, "window": 60}"#.to_string(),
        ),
        (
            "burst",
            "rate",
            r#"{"factor": 2, "window": 10, "baseline": 60, "min_count": 5}"#.to_string(),
        ),
        (
            "night",
            "off_hours",
            format!(r#"{{"from": "{from}", "to": "{to}", "timezone": "UTC"}}"#),
        ),
        // A shift across midnight that includes now: `from` after `to` (but at midnight).
        (
            "around the clock",
            "off_hours",
            format!(
                r#"{{"from": "{hour:02}:00", "to": "{:02}:00", "timezone": "UTC"}}"#,
                (hour + 23) % 24
            ),
        ),
    ] {
        db.execute(
            "SELECT secrets.create_alarm_rule($1, $2, $3::text::jsonb)",
            &[&name, &kind, &params],
        )
        .unwrap();
    }
    for (sql, sqlstate, words) in [
        ("SELECT secrets.create_alarm_rule('x', 'sometimes')", "22023", "unknown alarm kind"),
        ("SELECT secrets.create_alarm_rule('x', 'rate', '{\"factor\": 0}')", "22023", "between 1 and 1000"),
        ("SELECT secrets.create_alarm_rule('burst', 'first_read')", "42710", "already exists"),
        ("SELECT secrets.create_alarm_rule('x', 'off_hours', '{\"timezone\": \"Mars/Olympus\"}')", "22023", "time zone"),
        ("SELECT secrets.create_alarm_rule('x', 'off_hours', '{\"from\": 8, \"timezone\": 5}')", "22023", "\"from\" must be a string"),
        ("SELECT secrets.create_alarm_rule('x', 'denials', '{\"by\": 1}')", "22023", "\"by\" must be a string"),
        ("SELECT secrets.drop_alarm_rule('nope')", "42704", "no alarm rule"),
    ] {
        assert_sql_error(db.query(sql, &[]), sqlstate, words);
    }
    let mut listener = cluster.superuser();
    listener.batch_execute("LISTEN pg_secrets_alarm").unwrap();

    let mut reader = cluster.connect("reader", "pw");
    for _ in 0..10 {
        reader
            .query_one("SELECT secrets.get_secret_value('s/1')", &[])
            .unwrap();
    }
    let mut stranger = cluster.connect("stranger", "pw");
    for _ in 0..3 {
        assert!(stranger
            .query("SELECT secrets.get_secret_value('s/2')", &[])
            .is_err());
    }
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 4 {
        assert!(Instant::now() < deadline, "alarms seen: {seen:?}");
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_secs(5));
        use postgres::fallible_iterator::FallibleIterator;
        while let Some(notification) = iter.next().unwrap() {
            let payload = notification.payload().to_string();
            for kind in ["first_read", "denials", "rate", "off_hours"] {
                if payload.contains(&format!("\"alarm\":\"{kind}\"")) {
                    seen.insert(kind);
                }
            }
        }
    }
    let anomalies: Vec<(String, Option<String>, Option<String>)> = db
        .query(
            "SELECT kind, role, secret_name FROM secrets.access_anomalies(now() - interval '1 hour') \
             ORDER BY kind, role",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert!(anomalies.contains(&(
        "first_read".into(),
        Some("reader".into()),
        Some("s/1".into())
    )));
    assert!(anomalies.contains(&("denials".into(), Some("stranger".into()), None)));
    assert!(anomalies.contains(&("rate".into(), Some("reader".into()), None)));
    assert!(anomalies.contains(&(
        "off_hours".into(),
        Some("reader".into()),
        Some("s/1".into())
    )));
    let around_the_clock: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.access_anomalies(now() - interval '1 hour') \
             WHERE rule = 'around the clock'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(around_the_clock, 0, "a shift across midnight includes now");
    let first_reads = anomalies.iter().filter(|a| a.0 == "first_read").count();
    assert_eq!(
        first_reads, 1,
        "ten reads of one secret are one first read: {anomalies:?}"
    );
    assert_sql_error(
        stranger.query("SELECT * FROM secrets.access_anomalies()", &[]),
        "42501",
        "permission denied: reading access anomalies is for superusers, secrets_admin and secrets_auditor",
    );
    let rules = first_column(&mut db, "SELECT name FROM secrets.alarm_rule ORDER BY name");
    for sql in [
        "SELECT secrets.create_alarm_rule('mine', 'first_read')".to_string(),
        format!("SELECT secrets.drop_alarm_rule('{}')", rules[0]),
    ] {
        assert_sql_error(
            stranger.query(&sql, &[]),
            "42501",
            "alarm rules is for superusers",
        );
    }
    assert_eq!(
        first_column(&mut db, "SELECT name FROM secrets.alarm_rule ORDER BY name"),
        rules
    );
}

/// A standby cannot write the audit table and its worker does not run: its records go to its
/// server log, and reads go on past the size of the queue (4,096) instead of waiting on it.
#[test]
fn reads_on_a_standby_are_recorded_in_its_server_log() {
    let primary = Cluster::start();
    primary
        .superuser()
        .batch_execute("SELECT secrets.create_secret('replica/key', 'v')")
        .unwrap();
    let standby = primary.start_standby();
    let mut db = superuser_as_application(&standby, "standby-reader");
    // The secret arrives by streaming replication.
    wait_until("the secret to reach the standby", MINUTE, || {
        db.query_one("SELECT secrets.get_secret_value('replica/key')", &[])
            .is_ok()
    });
    let reads = 5000;
    for _ in 0..reads {
        let value: String = db
            .query_one("SELECT secrets.get_secret_value('replica/key')", &[])
            .unwrap()
            .get(0);
        assert_eq!(value, "v");
    }
    // The logging collector writes its file on its own time.
    wait_until("every read in the standby's log", MINUTE, || {
        audit_log_lines(&standby, "standby-reader") >= reads
    });
}

/// A call's own text that would not fit a queue slot (an invalid name of any length) is
/// shortened, not cut into an unreadable record; and offboarding by actual reads, left open in
/// a transaction, does not hold up the worker, which evaluates the first-read rule meanwhile.
#[test]
fn an_oversized_call_is_shortened_and_offboarding_never_stalls_the_trail() {
    let cluster = cluster_evaluating_alarms_every_second();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_alarm_rule('new reader', 'first_read'); \
         SELECT secrets.create_secret('app/db', 'v');",
    )
    .unwrap();
    let long_name = "a".repeat(3000);
    assert_sql_error(
        db.query_one("SELECT secrets.describe_secret($1)", &[&long_name]),
        "22023",
        "",
    );
    wait_for_records(
        &mut db,
        "action = 'describe' AND details->>'truncated' = 'true' \
         AND length(secret_name) < 300 AND outcome = 'error'",
        1,
    );
    let unreadable: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.audit_log WHERE action = 'unreadable'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(unreadable, 0);

    let mut offboarding = cluster.superuser();
    offboarding
        .batch_execute(
            "BEGIN; SELECT * FROM secrets.rotate_secrets_accessible_by('postgres', only_accessed => true)",
        )
        .unwrap();
    // Long enough for the worker to evaluate the rule while the transaction is open.
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..10 {
        db.query_one("SELECT secrets.get_secret_value('app/db')", &[])
            .unwrap();
    }
    wait_for_records(&mut db, "action = 'get' AND secret_name = 'app/db'", 10);
    offboarding.batch_execute("ROLLBACK").unwrap();
}

/// Offboarding by actual reads still finds a read whose audit record has been purged: what
/// each role read is kept when the records go.
#[test]
fn offboarding_by_actual_reads_outlives_the_purge_of_the_records() {
    let cluster = cluster_purging_anything();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE leaver LOGIN PASSWORD 'pw' IN ROLE secrets_reader; \
         SELECT secrets.create_secret('app/db', 'v'); \
         SELECT secrets.create_secret('app/other', 'v');",
    )
    .unwrap();
    let mut leaver = cluster.connect("leaver", "pw");
    leaver
        .query_one("SELECT secrets.get_secret_value('app/db')", &[])
        .unwrap();
    wait_for_records(&mut db, "action = 'get' AND \"current_user\" = 'leaver'", 1);
    db.query_one("SELECT secrets.purge_audit_log('0 seconds')", &[])
        .unwrap();
    let read: Vec<String> = first_column(
        &mut db,
        "SELECT name FROM secrets.rotate_secrets_accessible_by('leaver', only_accessed => true)",
    );
    assert_eq!(read, vec!["app/db".to_string()]);
}

/// A purge_audit_log left in an open transaction holds the readers' progress row, which the
/// worker also updates for first-read rules: the worker skips that evaluation rather than wait,
/// so the queue keeps draining and audited calls keep working.
#[test]
fn a_purge_left_open_does_not_stop_the_trail() {
    let cluster = cluster_evaluating_alarms_every_second();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('open/db', 'v');
         SELECT secrets.create_alarm_rule('open-first-read', 'first_read');",
    )
    .unwrap();
    // Records younger than pg_secrets.audit_min_retention (30 days) are kept whoever asks.
    assert_sql_error(
        db.query("SELECT secrets.purge_audit_log('29 days 23 hours')", &[]),
        "22023",
        "older_than must be at least pg_secrets.audit_min_retention (2592000 s)",
    );
    let mut purger = cluster.superuser();
    purger
        .batch_execute("BEGIN; SELECT secrets.purge_audit_log('30 days');")
        .unwrap();
    // Two evaluations' worth, so the worker has met the lock.
    std::thread::sleep(Duration::from_millis(2500));
    for _ in 0..20 {
        db.query_one("SELECT secrets.get_secret_value('open/db')", &[])
            .unwrap();
    }
    wait_for_records(&mut db, "action = 'get' AND secret_name = 'open/db'", 20);
    purger.batch_execute("COMMIT").unwrap();
    // Once the purge is over, the rule catches up with the reads.
    let last_read: i64 = db
        .query_one(
            "SELECT max(id) FROM secrets.audit_log WHERE secret_name = 'open/db'",
            &[],
        )
        .unwrap()
        .get(0);
    wait_until("the first-read rule to catch up", MINUTE, || {
        db.query_one(
            "SELECT checked_through FROM secrets.alarm_rule WHERE name = 'open-first-read'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            >= last_read
    });
}

/// A burst of denials is found however long after it the rule is evaluated: each new denial
/// counts the window that ends with it, not the window that ends at the evaluation. And a
/// person is counted once whatever group it acts as.
#[test]
fn a_burst_of_denials_trips_its_rule_even_when_evaluated_later() {
    let cluster = cluster_evaluating_alarms_every_second();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE group_a IN ROLE secrets_user;
         CREATE ROLE group_b IN ROLE secrets_user;
         CREATE ROLE prober LOGIN PASSWORD 'pw' IN ROLE group_a, group_b;
         SELECT secrets.create_secret('burst/db', 'v');
         SELECT secrets.create_alarm_rule('burst', 'denials', '{\"count\": 3, \"window\": 5}');",
    )
    .unwrap();
    // The worker skips a rule another transaction holds: it is evaluated only after the
    // window of the burst has long passed.
    let mut holder = cluster.superuser();
    holder
        .batch_execute("BEGIN; SELECT FROM secrets.alarm_rule WHERE name = 'burst' FOR UPDATE;")
        .unwrap();
    let mut prober = cluster.connect("prober", "pw");
    for group in ["group_a", "group_b", "group_a"] {
        prober.batch_execute(&format!("SET ROLE {group}")).unwrap();
        assert!(prober
            .query("SELECT secrets.get_secret_value('burst/db')", &[])
            .is_err());
    }
    wait_for_records(
        &mut db,
        "secret_name = 'burst/db' AND outcome = 'denied'",
        3,
    );
    // Past the window since the last denial (5 s, wide enough for three calls on a loaded
    // machine).
    std::thread::sleep(Duration::from_secs(6));
    holder.batch_execute("COMMIT").unwrap();
    wait_until("the denials alarm", MINUTE, || {
        db.query_one(
            "SELECT count(*) FROM secrets.access_anomalies(now() - interval '1 hour') \
             WHERE rule = 'burst' AND role = 'prober'",
            &[],
        )
        .unwrap()
        .get::<_, i64>(0)
            == 1
    });
}

/// A secret's last access is a UTC date, written by the first read of the day and not again
/// that day (the row is not rewritten: its xmin stays), whatever time zone the reader's
/// session is in; a read in a read-only transaction reads without writing it.
#[test]
fn last_accessed_is_a_utc_date_written_once_a_day() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute("SELECT secrets.create_secret('seen/db', 'v')")
        .unwrap();
    let state = |db: &mut Client| -> (Option<String>, String) {
        let row = db
            .query_one(
                "SELECT last_accessed_on::text, xmin::text FROM secrets.secret WHERE name = 'seen/db'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(state(&mut db).0, None, "never read");
    // A zone whose date differs from UTC's right now: 12 hours behind before noon UTC, 14
    // hours ahead after.
    let zone: String = db
        .query_one(
            "SELECT CASE WHEN extract(hour FROM now() AT TIME ZONE 'UTC') < 12 \
                         THEN 'Etc/GMT+12' ELSE 'Etc/GMT-14' END",
            &[],
        )
        .unwrap()
        .get(0);
    db.batch_execute(&format!("SET TimeZone = '{zone}'"))
        .unwrap();
    db.batch_execute("BEGIN READ ONLY; SELECT secrets.get_secret_value('seen/db'); COMMIT;")
        .unwrap();
    assert_eq!(
        state(&mut db).0,
        None,
        "a read-only transaction writes nothing"
    );
    let utc_today = |db: &mut Client| -> String {
        db.query_one("SELECT ((now() AT TIME ZONE 'UTC')::date)::text", &[])
            .unwrap()
            .get(0)
    };
    let day = utc_today(&mut db);
    db.query_one("SELECT secrets.get_secret_value('seen/db')", &[])
        .unwrap();
    let (accessed, written_by) = state(&mut db);
    for _ in 0..3 {
        db.query_one("SELECT secrets.get_secret_value('seen/db')", &[])
            .unwrap();
    }
    let written_by_now = state(&mut db).1;
    // A run across midnight UTC proves nothing about one day, and is not held against it.
    if utc_today(&mut db) == day {
        assert_eq!(accessed.as_deref(), Some(day.as_str()), "in {zone}");
        assert_eq!(written_by_now, written_by, "not written again the same day");
    }
}

/// The chain's end is also kept outside the database: removing the newest records no longer
/// verifies (the table alone would: what is left is a whole chain), and records stored after
/// the removal do not chain over the gap.
#[test]
fn removing_the_newest_records_or_rewriting_the_end_is_found() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute("SELECT secrets.create_secret('end/' || i, 'v') FROM generate_series(1, 5) i")
        .unwrap();
    wait_for_records(&mut db, "secret_name LIKE 'end/%'", 5);
    let newest = |db: &mut Client| -> i64 {
        db.query_one("SELECT max(id) FROM secrets.audit_record", &[])
            .unwrap()
            .get(0)
    };
    // The worker records the end just after each commit.
    std::thread::sleep(Duration::from_millis(500));
    assert!(verify(&mut db).0);
    wait_for_records(&mut db, "details->>'function' = 'verify_audit_log'", 1);
    std::thread::sleep(Duration::from_millis(500));
    let end = newest(&mut db);
    db.batch_execute("ALTER TABLE secrets.audit_record DISABLE TRIGGER ALL")
        .unwrap();

    // The newest record changed (with a hash of the right length): found where it is.
    db.execute(
        "UPDATE secrets.audit_record SET \"current_user\" = 'nobody', \
                hash = sha256(prev_hash || '\\x00'::bytea) WHERE id = $1",
        &[&end],
    )
    .unwrap();
    let (ok, _, first_bad) = verify(&mut db);
    assert!(!ok);
    assert_eq!(first_bad, Some(end), "found at the recorded end");

    // The two newest records removed: the chain stops short of the recorded end, and the
    // records stored since (verify's own) leave the removed ids unused.
    db.execute(
        "DELETE FROM secrets.audit_record WHERE id > $1",
        &[&(end - 2)],
    )
    .unwrap();
    assert_eq!(verify(&mut db).2, Some(end - 1), "the first removed id");
    wait_until("records after the removal", MINUTE, || {
        newest(&mut db) > end
    });
    let reused: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.audit_record WHERE id IN ($1, $2)",
            &[&(end - 1), &end],
        )
        .unwrap()
        .get(0);
    assert_eq!(reused, 0, "new records took ids after the recorded end");
    assert_eq!(verify(&mut db).2, Some(end - 1));
}
