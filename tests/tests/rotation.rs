//! Rotation end to end: each rotator against real clusters (the store's own, and a second
//! private cluster as a remote target), the background worker, crashes, failures, schedules,
//! offboarding and master-key rotation.

use pg_secrets_e2e::pki::make_pki;
use pg_secrets_e2e::{
    assert_sql_error, first_column, free_port, store_state, wait_until, Client, Cluster, KeySource,
    NoTls,
};
use postgres::fallible_iterator::FallibleIterator;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The store's settings in these tests: a worker that wakes every second, retries quickly,
/// and reaches the targets these tests start on 127.0.0.1 without TLS (the TLS test sets its
/// own sslmode after these).
const FAST_WORKER: &[&str] = &[
    "pg_secrets.worker_naptime = 1",
    "pg_secrets.rotation_retry_delay = 1",
    "pg_secrets.rotator_sslmode = disable",
];

fn store_cluster(extra: &[&str]) -> Cluster {
    let mut settings = FAST_WORKER.to_vec();
    settings.extend_from_slice(extra);
    Cluster::start_with(KeySource::File(pg_secrets_e2e::TEST_KEY.into()), &settings)
}

/// A second cluster, without pg_secrets in use, standing for a database server elsewhere.
fn target_cluster() -> Cluster {
    Cluster::start_bare(KeySource::None, &["log_statement = 'all'"])
}

fn credential(host: &str, port: u16, username: &str, password: &str, extra: &str) -> String {
    format!(
        r#"{{"engine":"postgres","host":"{host}","port":{port},"dbname":"postgres","username":"{username}","password":"{password}"{extra}}}"#
    )
}

/// Role `app` of the store's own cluster, and secret `db/app` holding its credential.
fn local_app_secret(db: &mut Client) {
    db.batch_execute("CREATE ROLE app LOGIN PASSWORD 'first-password'")
        .unwrap();
    create_secret(
        db,
        "db/app",
        r#"{"username":"app","password":"first-password"}"#,
    );
}

fn create_secret(db: &mut Client, name: &str, value: &str) {
    db.execute("SELECT secrets.create_secret($1, $2)", &[&name, &value])
        .unwrap();
}

fn current(db: &mut Client, name: &str) -> String {
    stage(db, name, "CURRENT")
}

fn stage(db: &mut Client, name: &str, stage: &str) -> String {
    db.query_one(
        "SELECT secrets.get_secret_value($1, version_stage => $2)",
        &[&name, &stage],
    )
    .unwrap()
    .get(0)
}

/// A field of the secret's `describe_secret(...)->'rotation'`, as text.
fn rotation_field(db: &mut Client, name: &str, path: &[&str]) -> Option<String> {
    let path: Vec<String> = path.iter().map(|p| p.to_string()).collect();
    db.query_one(
        "SELECT secrets.describe_secret($1)->'rotation' #>> $2",
        &[&name, &path],
    )
    .unwrap()
    .get(0)
}

fn wait_for_rotation(db: &mut Client, name: &str) {
    wait_until("the rotation to succeed", Duration::from_secs(60), || {
        rotation_field(db, name, &["in_progress"]).is_none()
            && rotation_field(db, name, &["last", "state"]).as_deref() == Some("succeeded")
    });
}

/// Logs in to `cluster` with the user and password of a credential JSON.
fn login(cluster: &Cluster, credential_json: &str) -> Result<Client, postgres::Error> {
    let field = |name: &str| -> String {
        let start = credential_json.find(&format!("\"{name}\":\"")).unwrap() + name.len() + 4;
        let end = start + credential_json[start..].find('"').unwrap();
        credential_json[start..end].to_string()
    };
    Client::connect(
        &cluster.connection_string(&field("username"), &field("password")),
        NoTls,
    )
}

fn password_of(credential_json: &str) -> String {
    let start = credential_json.find("\"password\":\"").unwrap() + 12;
    let end = start + credential_json[start..].find('"').unwrap();
    credential_json[start..end].to_string()
}

#[test]
fn a_role_of_this_cluster_rotates_in_one_transaction_and_the_password_is_never_logged() {
    let cluster = store_cluster(&[
        "log_statement = 'all'",
        "shared_preload_libraries = 'pg_secrets,pg_stat_statements'",
    ]);
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE EXTENSION pg_stat_statements; \
         CREATE ROLE app LOGIN PASSWORD 'first-password'",
    )
    .unwrap();
    let first = r#"{"engine":"postgres","host":"","username":"app","password":"first-password"}"#;
    create_secret(&mut db, "db/app", first);

    let pending: String = db
        .query_one(
            "SELECT secrets.rotate_secret('db/app', rotator => 'postgres-single-user')::text",
            &[],
        )
        .unwrap()
        .get(0);
    // Done when the call returns: CURRENT is the new version and logs in; the old one does not.
    let now = current(&mut db, "db/app");
    let version: String = db
        .query_one(
            "SELECT version_id::text FROM secrets.list_secret_version_ids('db/app') \
             WHERE 'CURRENT' = ANY(version_stages)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, pending);
    assert_eq!(stage(&mut db, "db/app", "PREVIOUS"), first);
    let new_password = password_of(&now);
    assert_ne!(new_password, "first-password");
    assert_eq!(new_password.len(), 32);
    login(&cluster, &now).expect("CURRENT logs in");
    assert!(login(&cluster, first).is_err(), "the old password is gone");
    assert_eq!(
        rotation_field(&mut db, "db/app", &["last", "state"]).as_deref(),
        Some("succeeded")
    );
    assert_eq!(
        rotation_field(&mut db, "db/app", &["enabled"]).as_deref(),
        Some("false")
    );
    let pending_label: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.list_secret_version_ids('db/app') \
             WHERE 'PENDING' = ANY(version_stages)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pending_label, 0, "finish takes PENDING off");

    // The password reached the server only as a verifier: not in the log, not in statistics.
    let statements: String = db
        .query_one(
            "SELECT coalesce(string_agg(query, ' '), '') FROM pg_stat_statements",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!statements.contains(&new_password));
    // The logging collector writes its file on its own time.
    cluster.wait_for_server_log();
    let log = cluster.server_log();
    assert!(log.contains("rotate_secret"), "log_statement=all is on");
    assert!(
        !log.contains(&new_password),
        "the new password is in the server log"
    );
    let stored: String = db
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"));
}

#[test]
fn refused_local_rotations_change_nothing() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE boss SUPERUSER LOGIN PASSWORD 'boss-pw'; \
         CREATE ROLE victim LOGIN PASSWORD 'victim-pw'; \
         CREATE ROLE team LOGIN PASSWORD 'team-pw'",
    )
    .unwrap();
    create_secret(
        &mut db,
        "db/boss",
        r#"{"username":"boss","password":"boss-pw"}"#,
    );
    create_secret(
        &mut db,
        "db/ghost",
        r#"{"username":"ghost","password":"x"}"#,
    );
    create_secret(&mut db, "api/not-json", "plain-api-key");
    create_secret(
        &mut db,
        "db/team",
        r#"{"username":"team","password":"team-pw"}"#,
    );
    let before = store_state(&mut db);
    for (name, rotator, sqlstate, words) in [
        ("db/boss", "postgres-single-user", "55000", "is a superuser"),
        (
            "db/ghost",
            "postgres-single-user",
            "55000",
            "does not exist",
        ),
        (
            "api/not-json",
            "postgres-single-user",
            "55000",
            "not a credential JSON",
        ),
        (
            "db/team",
            "postgres-alternating-users",
            "55000",
            "needs \"master_secret\" in the credential",
        ),
        ("db/boss", "lambda", "22023", "unknown rotator"),
        (
            "db/boss",
            "command:anything",
            "22023",
            "pg_secrets.rotator_dir is not set",
        ),
    ] {
        assert_sql_error(
            db.execute(
                "SELECT secrets.rotate_secret($1, rotator => $2)",
                &[&name, &rotator],
            ),
            sqlstate,
            words,
        );
    }
    assert_sql_error(
        db.execute("SELECT secrets.rotate_secret('db/boss')", &[]),
        "22023",
        "has no rotator",
    );
    assert_eq!(store_state(&mut db), before);

    // A role's secret may rotate only roles that role could change itself.
    let mut team = cluster.login_role("team_app", "IN ROLE secrets_admin");
    team.execute(
        "SELECT secrets.create_secret('db/victim', $1)",
        &[&r#"{"username":"victim","password":"victim-pw"}"#],
    )
    .unwrap();
    let before = store_state(&mut db);
    assert_sql_error(
        team.execute(
            "SELECT secrets.rotate_secret('db/victim', rotator => 'postgres-single-user')",
            &[],
        ),
        "55000",
        "may not change the password of role \"victim\"",
    );
    assert_eq!(store_state(&mut db), before);
    Client::connect(&cluster.connection_string("victim", "victim-pw"), NoTls).unwrap();
}

/// The id of the version of `name` carrying `stage`.
fn version_with(db: &mut Client, name: &str, stage: &str) -> String {
    db.query_one(
        "SELECT version_id::text FROM secrets.list_secret_version_ids($1) \
         WHERE $2 = ANY(version_stages)",
        &[&name, &stage],
    )
    .unwrap()
    .get(0)
}

/// Rotations act with the owner's rights on what the credential names, so configuring rotation
/// pins that target: a `put` naming another role or admin secret is not rotated until a role
/// with `manage`, which may itself act on the new target, configures rotation again.
#[test]
fn a_put_cannot_steer_a_rotation_away_from_its_pinned_target() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE app LOGIN PASSWORD 'app-pw'; \
         CREATE ROLE app2 LOGIN PASSWORD 'app2-pw'; \
         CREATE ROLE victim LOGIN PASSWORD 'victim-pw'",
    )
    .unwrap();
    let app = r#"{"username":"app","password":"app-pw"}"#;
    create_secret(&mut db, "db/app", app);
    let admin = format!(
        r#"{{"username":"{}","password":"{}"}}"#,
        pg_secrets_e2e::SUPERUSER,
        pg_secrets_e2e::SUPERUSER_PASSWORD
    );
    create_secret(&mut db, "db/admin", &admin);
    create_secret(&mut db, "db/admin2", &admin);
    create_secret(
        &mut db,
        "db/alt",
        r#"{"username":"app2","password":"app2-pw","master_secret":"db/admin"}"#,
    );
    for (name, rotator) in [
        ("db/app", "postgres-single-user"),
        ("db/alt", "postgres-alternating-users"),
    ] {
        db.execute(
            "SELECT secrets.rotate_secret($1, rotator => $2, rotate_immediately => false)",
            &[&name, &rotator],
        )
        .unwrap();
    }
    let pinned = version_with(&mut db, "db/app", "CURRENT");
    assert_eq!(
        rotation_field(&mut db, "db/app", &["target_version_id"]).as_deref(),
        Some(pinned.as_str())
    );
    let mut writer = cluster.login_role("writer", "IN ROLE secrets_user");
    let mut manager = cluster.login_role("manager", "IN ROLE secrets_user");
    db.batch_execute(
        "SELECT secrets.grant_access('db/app', 'writer', '{put,rotate}'); \
         SELECT secrets.grant_access('db/alt', 'writer', '{put,rotate}'); \
         SELECT secrets.grant_access('db/app', 'manager', '{rotate,manage}'); \
         SELECT secrets.grant_access('db/alt', 'manager', '{rotate,manage}')",
    )
    .unwrap();

    // Rotating is not configuring: `rotate` alone starts a rotation with the rotator, schedule
    // and window the secret has, and may not set them.
    let before = store_state(&mut db);
    for configures in [
        "rotator => 'postgres-single-user'",
        "schedule => 'rate(1 days)'",
        "rotation_window => '1 hour'",
    ] {
        assert_sql_error(
            writer.execute(
                &format!("SELECT secrets.rotate_secret('db/app', {configures})"),
                &[],
            ),
            "42501",
            "permission denied: manage on secret \"db/app\"",
        );
    }
    assert_eq!(store_state(&mut db), before);

    // A writer names another role, or another admin secret the owner may read: the rotation
    // refuses, names the field, and changes nothing.
    for (name, value, field) in [
        (
            "db/app",
            r#"{"username":"victim","password":"guess"}"#,
            "username",
        ),
        (
            "db/alt",
            r#"{"username":"app2","password":"app2-pw","master_secret":"db/admin2"}"#,
            "master_secret",
        ),
    ] {
        writer
            .execute("SELECT secrets.put_secret_value($1, $2)", &[&name, &value])
            .unwrap();
        let before = store_state(&mut db);
        assert_sql_error(
            writer.execute("SELECT secrets.rotate_secret($1)", &[&name]),
            "55000",
            &format!("the CURRENT value names another \"{field}\" than version"),
        );
        assert_eq!(store_state(&mut db), before, "{name}");
    }
    Client::connect(&cluster.connection_string("victim", "victim-pw"), NoTls)
        .expect("the victim's password is unchanged");

    // Configuring again keeps the pin unless asked for a new target, and pins one only for a
    // caller that may act on it itself.
    for (name, rotator, sqlstate, words) in [
        (
            "db/app",
            "postgres-single-user",
            "55000",
            "role \"manager\" may not change the password of role \"victim\"",
        ),
        (
            "db/alt",
            "postgres-alternating-users",
            "42501",
            "permission denied: get on secret \"db/admin2\"",
        ),
    ] {
        assert_sql_error(
            manager.execute(
                "SELECT secrets.rotate_secret($1, rotator => $2)",
                &[&name, &rotator],
            ),
            "55000",
            "the target pinned before; to rotate the new target, pass new_target => true",
        );
        assert_sql_error(
            manager.execute(
                "SELECT secrets.rotate_secret($1, rotator => $2, new_target => true)",
                &[&name, &rotator],
            ),
            sqlstate,
            words,
        );
    }
    assert_sql_error(
        manager.execute(
            "SELECT secrets.rotate_secret('db/app', new_target => true)",
            &[],
        ),
        "22023",
        "pass rotator with it",
    );
    assert_eq!(
        rotation_field(&mut db, "db/app", &["target_version_id"]).as_deref(),
        Some(pinned.as_str())
    );

    // No pinned target (the column cleared by a superuser): the rotation stops at its first
    // step rather than act on whatever CURRENT names. And a secret without a value has nothing
    // to pin or rotate.
    db.batch_execute(
        "UPDATE secrets.secret SET rotation_target_version_id = NULL WHERE name = 'db/app'",
    )
    .unwrap();
    let before = store_state(&mut db);
    assert_sql_error(
        writer.execute("SELECT secrets.rotate_secret('db/app')", &[]),
        "55000",
        "no target is pinned for it",
    );
    assert_eq!(store_state(&mut db), before);
    db.execute(
        "UPDATE secrets.secret SET rotation_target_version_id = $1::text::uuid \
         WHERE name = 'db/app'",
        &[&pinned],
    )
    .unwrap();
    db.batch_execute("SELECT secrets.create_secret('db/novalue')")
        .unwrap();
    let before = store_state(&mut db);
    let refusal = assert_sql_error(
        db.execute(
            "SELECT secrets.rotate_secret('db/novalue', 'postgres-single-user')",
            &[],
        ),
        "55000",
        "failed at step configure: the secret has no CURRENT version to rotate",
    );
    assert_eq!(
        refusal.hint(),
        Some("Nothing changed: the secret's rotation settings are as they were.")
    );
    assert_eq!(store_state(&mut db), before);

    // The pinned version outlives pruning: back on its target (a password set by hand), with
    // more than a hundred deprecated versions over a day old, the rotation proceeds.
    writer
        .execute("SELECT secrets.put_secret_value('db/app', $1)", &[&app])
        .unwrap();
    db.batch_execute(
        "DO $$ BEGIN FOR i IN 1..101 LOOP \
           PERFORM secrets.put_secret_value('db/app', '{\"username\":\"app\",\"password\":\"app-pw\"}', \
                                            version_stages => '{}'); \
         END LOOP; END $$; \
         UPDATE secrets.secret_version SET created_at = now() - interval '2 days'",
    )
    .unwrap();
    writer
        .execute("SELECT secrets.put_secret_value('db/app', $1)", &[&app])
        .unwrap();
    let (kept, deprecated): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE id::text = $1), \
                        count(*) FILTER (WHERE NOT EXISTS (SELECT FROM secrets.version_label l \
                                                           WHERE l.version_id = v.id)) \
                 FROM secrets.secret_version v \
                 WHERE secret_id = (SELECT id FROM secrets.secret WHERE name = 'db/app')",
                &[&pinned],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        (kept, deprecated),
        (1, 101),
        "pruned down to 100 and the pin"
    );
    writer
        .execute("SELECT secrets.rotate_secret('db/app')", &[])
        .unwrap();
    let rotated = current(&mut db, "db/app");
    login(&cluster, &rotated).expect("app rotated");
    assert_ne!(password_of(&rotated), "app-pw");
    Client::connect(&cluster.connection_string("victim", "victim-pw"), NoTls)
        .expect("the victim's password is unchanged");
    // Each rotation's result is the new pin.
    assert_eq!(
        rotation_field(&mut db, "db/app", &["target_version_id"]),
        Some(version_with(&mut db, "db/app", "CURRENT"))
    );

    // A superuser, who may read db/admin2, re-pins: the rotation acts with the new admin.
    db.execute(
        "SELECT secrets.rotate_secret('db/alt', rotator => 'postgres-alternating-users', \
                new_target => true)",
        &[],
    )
    .unwrap();
    wait_for_rotation(&mut db, "db/alt");
    let alternated = current(&mut db, "db/alt");
    assert!(alternated.contains(r#""username":"app2_clone""#));
    login(&cluster, &alternated).expect("the clone logs in");
}

/// A rotation logs in only where the server checks the password: with trust on this
/// cluster's own socket, a credential naming that socket (or an admin secret with any password,
/// reached through it) would otherwise let whoever wrote it act as that role.
#[test]
fn a_rotation_logs_in_only_where_the_password_is_checked() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE victim LOGIN PASSWORD 'victim-pw'; \
         CREATE ROLE app2 LOGIN PASSWORD 'app2-pw'",
    )
    .unwrap();
    let hba = cluster.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local all all trust\n{rules}")).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let socket = cluster.socket_dir().display().to_string();
    create_secret(
        &mut db,
        "db/through-socket",
        &credential(&socket, cluster.port, "victim", "not-the-password", ""),
    );
    create_secret(
        &mut db,
        "db/any-admin",
        &format!(
            r#"{{"username":"{}","password":"not-the-password"}}"#,
            pg_secrets_e2e::SUPERUSER
        ),
    );
    create_secret(
        &mut db,
        "db/alt",
        r#"{"username":"app2","password":"app2-pw","master_secret":"db/any-admin"}"#,
    );
    for (name, rotator) in [
        ("db/through-socket", "postgres-single-user"),
        ("db/alt", "postgres-alternating-users"),
    ] {
        db.execute(
            "SELECT secrets.rotate_secret($1, rotator => $2)",
            &[&name, &rotator],
        )
        .unwrap();
        wait_until("the set step to fail", Duration::from_secs(30), || {
            rotation_field(&mut db, name, &["in_progress", "last_error"]).is_some_and(|error| {
                error.contains("failed at step set")
                    && error.contains("without asking for its password")
            })
        });
        db.execute("SELECT secrets.cancel_rotate_secret($1)", &[&name])
            .unwrap();
    }
    // Nothing happened on the server: the victim's password and the roles are as they were.
    std::fs::write(&hba, rules).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    Client::connect(&cluster.connection_string("victim", "victim-pw"), NoTls)
        .expect("the victim's password is unchanged");
    let clones: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'app2_clone'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(clones, 0);
}

#[test]
fn schedules_are_checked_and_a_rate_rotates_on_its_own() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    local_app_secret(&mut db);
    let before = store_state(&mut db);
    // pg_secrets.min_rotation_interval is an hour by default.
    for (schedule, window, words) in [
        (
            "rate(30 seconds)",
            None,
            "unit must be minutes, hours or days",
        ),
        (
            "rate(59 minutes)",
            None,
            "more often than pg_secrets.min_rotation_interval",
        ),
        (
            "cron(*/5 * * * *)",
            None,
            "more often than pg_secrets.min_rotation_interval",
        ),
        ("rate(2 hours)", Some("3 hours"), "rotation_window must be"),
        // The 24-hour cap on its own: the interval would leave room for it.
        ("rate(30 days)", Some("25 hours"), "between 0 and 24 hours"),
        ("cron(0 0 30 2 *)", None, "cron schedule never fires"),
        ("rate(2 hours)", Some("-1 hours"), "rotation_window must be"),
        (
            "rate(2 hours)",
            Some("1 month"),
            "days, hours, minutes or seconds",
        ),
        ("cron(not a cron)", None, "is not valid"),
        // Five fields only: with a year a schedule fires a few times and then never again
        // (and a sixth field would be seconds).
        ("cron(0 0 1 1 * 2027)", None, "is not valid"),
        ("cron(0 0 3 * * *)", None, "is not valid"),
        ("weekly", None, "is not valid"),
    ] {
        assert_sql_error(
            db.execute(
                "SELECT secrets.rotate_secret('db/app', 'postgres-single-user', $1, $2::text::interval)",
                &[&schedule, &window],
            ),
            "22023",
            words,
        );
    }
    assert_sql_error(
        db.execute(
            "SELECT secrets.rotate_secret('db/app', 'postgres-single-user', NULL, '1 hour', false)",
            &[],
        ),
        "22023",
        "give a schedule with it",
    );
    assert_eq!(store_state(&mut db), before);

    // A cron schedule is accepted and gives a next rotation inside the coming day.
    db.execute(
        "SELECT secrets.rotate_secret('db/app', 'postgres-single-user', 'cron(0 3 * * *)', \
                rotate_immediately => false)",
        &[],
    )
    .unwrap();
    let hours: f64 = db
        .query_one(
            "SELECT extract(epoch FROM ((secrets.describe_secret('db/app')->'rotation'->>'next_rotation_at')::timestamptz - now()))::float8 / 3600",
            &[],
        )
        .unwrap()
        .get(0);
    assert!((0.0..=25.0).contains(&hours), "next rotation in {hours} h");

    // With the minimum lowered, rate(1 minutes) and no window: the worker rotates within
    // about a minute, unasked.
    let default_minimum = first_column(&mut db, "SHOW pg_secrets.min_rotation_interval");
    db.batch_execute("ALTER SYSTEM SET pg_secrets.min_rotation_interval = 60")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the reload", Duration::from_secs(30), || {
        first_column(&mut db, "SHOW pg_secrets.min_rotation_interval") != default_minimum
    });
    db.execute(
        "SELECT secrets.rotate_secret('db/app', 'postgres-single-user', 'rate(1 minutes)', \
                '0 seconds', rotate_immediately => false)",
        &[],
    )
    .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/app", &["enabled"]).as_deref(),
        Some("true")
    );
    wait_until("the scheduled rotation", Duration::from_secs(120), || {
        rotation_field(&mut db, "db/app", &["last", "state"]).as_deref() == Some("succeeded")
    });
    login(&cluster, &current(&mut db, "db/app")).expect("the rotated CURRENT logs in");
    let next_in: f64 = db
        .query_one(
            "SELECT extract(epoch FROM ((secrets.describe_secret('db/app')->'rotation'->>'next_rotation_at')::timestamptz - now()))::float8",
            &[],
        )
        .unwrap()
        .get(0);
    assert!((0.0..=61.0).contains(&next_in), "next in {next_in} s");

    // Cancelling turns the schedule off and keeps the settings.
    db.execute("SELECT secrets.cancel_rotate_secret('db/app')", &[])
        .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/app", &["enabled"]).as_deref(),
        Some("false")
    );
    assert_eq!(
        rotation_field(&mut db, "db/app", &["schedule"]).as_deref(),
        Some("rate(1 minutes)")
    );

    // The limits' own values are accepted: the longest rate, the longest window.
    db.execute(
        "SELECT secrets.rotate_secret('db/app', 'postgres-single-user', 'rate(100000 days)', \
                '24 hours', rotate_immediately => false)",
        &[],
    )
    .unwrap();
    // A new schedule alone keeps the stored window; one the window does not fit in is
    // refused, saying the window is the stored one.
    assert_sql_error(
        db.execute(
            "SELECT secrets.rotate_secret('db/app', schedule => 'rate(2 hours)', \
                    rotate_immediately => false)",
            &[],
        ),
        "22023",
        "the secret's rotation_window of 86400 s, set before",
    );
}

#[test]
fn a_remote_single_user_rotates_through_the_worker() {
    let store = store_cluster(&[]);
    let target = target_cluster();
    target
        .superuser()
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'first-password'")
        .unwrap();
    let mut db = store.superuser();
    let first = credential("127.0.0.1", target.port, "app", "first-password", "");
    create_secret(&mut db, "db/remote", &first);
    db.execute(
        "SELECT secrets.rotate_secret('db/remote', rotator => 'postgres-single-user')",
        &[],
    )
    .unwrap();
    wait_for_rotation(&mut db, "db/remote");
    let now = current(&mut db, "db/remote");
    login(&target, &now).expect("CURRENT logs in to the target");
    assert!(login(&target, &first).is_err());
    assert_eq!(stage(&mut db, "db/remote", "PREVIOUS"), first);
    // The target saw a verifier, never the password.
    wait_until(
        "the target's log of the change",
        Duration::from_secs(30),
        || {
            target
                .server_log()
                .contains("ALTER ROLE CURRENT_USER PASSWORD 'SCRAM-SHA-256$4096:")
        },
    );
    let log = target.server_log();
    assert!(!log.contains(&password_of(&now)));
    assert!(!store.server_log().contains(&password_of(&now)));
}

/// How many versions of secret `name` carry `label` (0 or 1).
fn versions_labelled(db: &mut Client, name: &str, label: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM secrets.list_secret_version_ids($1, include_deprecated => true) \
         WHERE $2 = ANY (version_stages)",
        &[&name, &label],
    )
    .unwrap()
    .get(0)
}

/// A rotation at `set` is not cancelled even before any attempt is recorded: a crash during
/// `set` rolls back the record of the attempt, not the change on the target. Cancelling turns
/// the schedule off; the rotation, and its PENDING, stay.
#[test]
fn cancelling_leaves_a_rotation_at_set_to_finish() {
    // The workers serve another database, so no attempt is made here during the test.
    let store = store_cluster(&["pg_secrets.database = 'elsewhere'"]);
    let mut db = store.superuser();
    let first = credential("127.0.0.1", free_port(), "app", "first-password", "");
    create_secret(&mut db, "db/held", &first);
    db.execute(
        "SELECT secrets.rotate_secret('db/held', rotator => 'postgres-single-user', \
                schedule => 'rate(1 days)')",
        &[],
    )
    .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/held", &["in_progress", "step"]).as_deref(),
        Some("set")
    );
    assert_eq!(
        rotation_field(&mut db, "db/held", &["in_progress", "failures"]).as_deref(),
        Some("0")
    );
    db.execute("SELECT secrets.cancel_rotate_secret('db/held')", &[])
        .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/held", &["in_progress", "step"]).as_deref(),
        Some("set")
    );
    assert_eq!(versions_labelled(&mut db, "db/held", "PENDING"), 1);
    assert_eq!(
        rotation_field(&mut db, "db/held", &["enabled"]).as_deref(),
        Some("false")
    );
    assert_eq!(current(&mut db, "db/held"), first);
}

/// Waits until a step of the rotation has failed with an error naming every one of `words`. An
/// earlier attempt may have failed otherwise (the worker had not yet reloaded its settings,
/// or the target went away after the attempt the test arranged).
fn wait_for_rotation_error(db: &mut Client, name: &str, words: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let error = rotation_field(db, name, &["in_progress", "last_error"]);
        if let Some(error) = &error {
            if words.iter().all(|word| error.contains(word)) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the rotation of {name} did not fail naming {words:?}; its last error: {error:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_rotator_sslmode(db: &mut Client, mode: &str) {
    db.batch_execute(&format!(
        "ALTER SYSTEM SET pg_secrets.rotator_sslmode = '{mode}'"
    ))
    .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// A target reached over TCP gets the TLS `pg_secrets.rotator_sslmode` asks for:
/// `verify-full` (the default) checks the certificate against the configured CA and the host
/// name and refuses a server without TLS; `require` takes any certificate but binds SCRAM to
/// the TLS session, so it refuses a server that asks for the password in cleartext.
#[test]
fn remote_rotations_use_tls_as_rotator_sslmode_asks() {
    // The certificates live in the target's directory, which its server may read.
    let mut tls_target = target_cluster();
    let pki = make_pki(tls_target.dir());
    let mut settings = pki.server_settings();
    settings.extend([
        "log_statement = 'all'".into(),
        "log_connections = on".into(),
    ]);
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    tls_target.configure(KeySource::None, &settings);
    tls_target.restart();
    tls_target
        .superuser()
        .batch_execute(
            "CREATE ROLE app LOGIN PASSWORD 'first-password';
             CREATE ROLE app_by_ip LOGIN PASSWORD 'first-password';
             CREATE ROLE app_bound LOGIN PASSWORD 'first-password';
             CREATE ROLE clear LOGIN PASSWORD 'clear-password';
             CREATE ROLE trusted LOGIN PASSWORD 'trusted-password';",
        )
        .unwrap();
    // `clear` is asked for its password in cleartext over TLS, `trusted` for none.
    let hba = tls_target.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all clear 127.0.0.1/32 password\n\
             hostssl all trusted 127.0.0.1/32 trust\n{rules}"
        ),
    )
    .unwrap();
    tls_target
        .superuser()
        .batch_execute("SELECT pg_reload_conf()")
        .unwrap();
    let plain_target = target_cluster();
    plain_target
        .superuser()
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'first-password'")
        .unwrap();
    let store = store_cluster(&[
        "pg_secrets.rotator_sslmode = 'verify-full'",
        &format!("pg_secrets.rotator_ssl_root_cert = '{}'", pki.ca.display()),
    ]);
    let mut db = store.superuser();
    let rotate =
        |db: &mut Client, name: &str, host: &str, port: u16, user: &str, password: &str| {
            let first = credential(host, port, user, password, "");
            create_secret(db, name, &first);
            db.execute(
                "SELECT secrets.rotate_secret($1, rotator => 'postgres-single-user')",
                &[&name],
            )
            .unwrap();
            first
        };

    // verify-full: the certificate names localhost and chains to the CA.
    rotate(
        &mut db,
        "db/tls",
        "localhost",
        tls_target.port,
        "app",
        "first-password",
    );
    wait_for_rotation(&mut db, "db/tls");
    login(&tls_target, &current(&mut db, "db/tls")).expect("CURRENT logs in");
    // Not at 127.0.0.1, which the certificate does not name; nor where there is no TLS.
    let by_ip = rotate(
        &mut db,
        "db/by-ip",
        "127.0.0.1",
        tls_target.port,
        "app_by_ip",
        "first-password",
    );
    wait_for_rotation_error(
        &mut db,
        "db/by-ip",
        &[
            "invalid peer certificate",
            "pg_secrets.rotator_sslmode is verify-full",
        ],
    );
    assert_eq!(current(&mut db, "db/by-ip"), by_ip);
    let plain = rotate(
        &mut db,
        "db/plain",
        "127.0.0.1",
        plain_target.port,
        "app",
        "first-password",
    );
    wait_for_rotation_error(
        &mut db,
        "db/plain",
        &["server does not support TLS", "must offer TLS"],
    );
    assert_eq!(current(&mut db, "db/plain"), plain);

    // require: any certificate, SCRAM bound to the session; cleartext is refused before the
    // password is sent.
    set_rotator_sslmode(&mut db, "require");
    rotate(
        &mut db,
        "db/bound",
        "127.0.0.1",
        tls_target.port,
        "app_bound",
        "first-password",
    );
    wait_for_rotation(&mut db, "db/bound");
    login(&tls_target, &current(&mut db, "db/bound")).expect("CURRENT logs in");
    let clear = rotate(
        &mut db,
        "db/clear",
        "127.0.0.1",
        tls_target.port,
        "clear",
        "clear-password",
    );
    wait_for_rotation_error(&mut db, "db/clear", &["channel binding"]);
    assert_eq!(current(&mut db, "db/clear"), clear);
    // A server that lets the login in without a password is still refused for that reason.
    rotate(
        &mut db,
        "db/trusted",
        "127.0.0.1",
        tls_target.port,
        "trusted",
        "trusted-password",
    );
    wait_for_rotation_error(&mut db, "db/trusted", &["without asking for its password"]);

    // Every connection a rotation made was encrypted, and `clear` never got in.
    let log = tls_target.server_log();
    let rotations: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("application_name=pg_secrets rotation"))
        .collect();
    assert!(rotations.len() >= 4, "{log}");
    assert!(
        rotations.iter().all(|line| line.contains("SSL enabled")),
        "{rotations:#?}"
    );
    assert!(!log.contains("connection authorized: user=clear"), "{log}");

    // verify-full with a CA file that holds no certificate: the step names the setting.
    let empty_ca = store.dir().join("empty-ca.pem");
    std::fs::write(&empty_ca, "").unwrap();
    db.batch_execute(&format!(
        "ALTER SYSTEM SET pg_secrets.rotator_ssl_root_cert = '{}'",
        empty_ca.display()
    ))
    .unwrap();
    set_rotator_sslmode(&mut db, "verify-full");
    let no_roots = rotate(
        &mut db,
        "db/no-roots",
        "localhost",
        tls_target.port,
        "app",
        "first-password",
    );
    wait_for_rotation_error(
        &mut db,
        "db/no-roots",
        &[
            "pg_secrets.rotator_ssl_root_cert",
            "no certificate in the file",
        ],
    );
    assert_eq!(current(&mut db, "db/no-roots"), no_roots);

    // disable: plaintext, as the administrator asked; the failed rotation resumes.
    set_rotator_sslmode(&mut db, "disable");
    // Due now rather than after its doubling delay.
    db.batch_execute(
        "UPDATE secrets.rotation SET next_attempt_at = now() WHERE state = 'running' \
           AND secret_id = (SELECT id FROM secrets.secret WHERE name = 'db/plain')",
    )
    .unwrap();
    wait_for_rotation(&mut db, "db/plain");
    login(&plain_target, &current(&mut db, "db/plain")).expect("CURRENT logs in");
}

#[test]
fn alternating_users_keep_the_old_login_and_object_ownership() {
    let store = store_cluster(&[]);
    let target = target_cluster();
    target
        .superuser()
        .batch_execute(
            "CREATE ROLE app LOGIN PASSWORD 'first-password'; GRANT CREATE ON SCHEMA public TO app",
        )
        .unwrap();
    let mut db = store.superuser();
    create_secret(
        &mut db,
        "db/admin",
        &credential(
            "127.0.0.1",
            target.port,
            pg_secrets_e2e::SUPERUSER,
            pg_secrets_e2e::SUPERUSER_PASSWORD,
            "",
        ),
    );
    let first = credential(
        "127.0.0.1",
        target.port,
        "app",
        "first-password",
        r#","master_secret":"db/admin""#,
    );
    create_secret(&mut db, "db/alt", &first);

    db.execute(
        "SELECT secrets.rotate_secret('db/alt', rotator => 'postgres-alternating-users')",
        &[],
    )
    .unwrap();
    wait_for_rotation(&mut db, "db/alt");
    let second = current(&mut db, "db/alt");
    assert!(second.contains(r#""username":"app_clone""#));
    assert!(second.contains(r#""master_secret":"db/admin""#));
    let mut clone = login(&target, &second).expect("the clone logs in");
    login(&target, &first).expect("the previous login stays valid");
    // Whatever the clone creates belongs to the main role.
    clone
        .batch_execute("CREATE TABLE made_by_clone (id int)")
        .unwrap();
    let owner: String = target
        .superuser()
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'made_by_clone'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, "app");

    // The next rotation goes back to the main user; the clone keeps its password until then.
    db.execute("SELECT secrets.rotate_secret('db/alt')", &[])
        .unwrap();
    wait_until("the second rotation", Duration::from_secs(60), || {
        current(&mut db, "db/alt").contains(r#""username":"app""#)
    });
    let third = current(&mut db, "db/alt");
    login(&target, &third).expect("the main user logs in with its new password");
    login(&target, &second).expect("the clone still logs in");
    assert!(login(&target, &first).is_err());

    // Every read of the admin secret the rotations made is in the audit trail, naming the
    // role whose rights it used (the rotated secret's owner).
    wait_until(
        "the admin secret's reads in the trail",
        Duration::from_secs(60),
        || {
            db.query_one(
                "SELECT count(*) FROM secrets.audit_log WHERE secret_name = 'db/admin' \
               AND action = 'get' AND outcome = 'allowed' AND version_stage = 'CURRENT' \
               AND details->>'function' = 'rotation' \
               AND details->>'on_behalf_of' = $1",
                &[&pg_secrets_e2e::SUPERUSER],
            )
            .unwrap()
            .get::<_, i64>(0)
                >= 2
        },
    );
}

/// A stand-in for a payment provider's key API: issues, checks and revokes keys over a line
/// protocol on TCP, and remembers what it was asked.
struct FakeKeyService {
    port: u16,
    events: Arc<Mutex<Vec<String>>>,
}

impl FakeKeyService {
    fn start(first_key: &str) -> FakeKeyService {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let events = Arc::new(Mutex::new(Vec::new()));
        let valid = Arc::new(Mutex::new(vec![first_key.to_string()]));
        let log = events.clone();
        std::thread::spawn(move || {
            for (issued, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { continue };
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                let request = line.trim().to_string();
                let mut valid = valid.lock().unwrap();
                let reply = match request.split_once(' ') {
                    None if request == "ISSUE" => {
                        let key = format!("key-{issued}-{}", free_port());
                        valid.push(key.clone());
                        key
                    }
                    Some(("CHECK", key)) => if valid.iter().any(|k| k == key) {
                        "valid"
                    } else {
                        "invalid"
                    }
                    .to_string(),
                    Some(("REVOKE", key)) => {
                        valid.retain(|k| k != key);
                        "ok".to_string()
                    }
                    _ => "error".to_string(),
                };
                log.lock().unwrap().push(format!("{request} -> {reply}"));
                let _ = writeln!(stream, "{reply}");
            }
        });
        FakeKeyService { port, events }
    }

    fn ask(&self, request: &str) -> String {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        reply.trim().to_string()
    }
}

/// The rotator program: issue at create, check the new key at set and test (and that the old
/// one still works at test), revoke the old key at finish.
fn write_rotator(dir: &std::path::Path, port: u16) {
    let script = format!(
        r#"#!/bin/bash
set -euo pipefail
input=$(cat)
field() {{ printf '%s' "$input" | sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p"; }}
call() {{
    exec 3<>/dev/tcp/127.0.0.1/{port}
    echo "$1" >&3
    read -r reply <&3
    exec 3>&-
    echo "$reply"
}}
case "$1" in
    create) call ISSUE ;;
    set) [ "$(call "CHECK $(field pending)")" = valid ] ;;
    test) [ "$(call "CHECK $(field pending)")" = valid ] && [ "$(call "CHECK $(field current)")" = valid ] ;;
    finish) [ "$(call "REVOKE $(field current)")" = ok ] ;;
esac
"#
    );
    let path = dir.join("payments-key");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.join("not-executable"), "#!/bin/sh\n").unwrap();
    std::os::unix::fs::symlink("/bin/true", dir.join("escape")).unwrap();
}

fn rotator_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("rotators-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn a_command_rotator_rotates_an_api_key_and_the_old_key_works_until_finish() {
    let service = FakeKeyService::start("key-original");
    let dir = rotator_dir();
    write_rotator(dir.path(), service.port);
    let setting = format!("pg_secrets.rotator_dir = '{}'", dir.path().display());
    let store = store_cluster(&[&setting]);
    let mut db = store.superuser();
    create_secret(&mut db, "api/payments", "key-original");

    let before = store_state(&mut db);
    for (program, words) in [
        ("../payments-key", "a program is named by a file name"),
        ("missing", "no such program"),
        ("not-executable", "not an executable file"),
        ("escape", "outside pg_secrets.rotator_dir"),
        ("", "a program is named by a file name"),
    ] {
        assert_sql_error(
            db.execute(
                "SELECT secrets.rotate_secret('api/payments', rotator => $1)",
                &[&format!("command:{program}")],
            ),
            "22023",
            words,
        );
    }
    assert_eq!(store_state(&mut db), before);

    // A name starting with '-' would reach the program as an option.
    create_secret(&mut db, "-rf", "key-original");
    let before = store_state(&mut db);
    assert_sql_error(
        db.execute(
            "SELECT secrets.rotate_secret('-rf', rotator => 'command:payments-key')",
            &[],
        ),
        "55000",
        "starting with '-' is not passed to a rotator program",
    );
    assert_eq!(store_state(&mut db), before);
    // A program reads and prints text: a binary value is not handed to it.
    db.execute(
        "SELECT secrets.create_secret('api/binary', secret_binary => '\\x00ff')",
        &[],
    )
    .unwrap();
    let before = store_state(&mut db);
    assert_sql_error(
        db.execute(
            "SELECT secrets.rotate_secret('api/binary', rotator => 'command:payments-key')",
            &[],
        ),
        "55000",
        "cannot rotate a binary value",
    );
    assert_eq!(store_state(&mut db), before);

    db.execute(
        "SELECT secrets.rotate_secret('api/payments', rotator => 'command:payments-key')",
        &[],
    )
    .unwrap();
    wait_for_rotation(&mut db, "api/payments");
    let new_key = current(&mut db, "api/payments");
    assert!(new_key.starts_with("key-"), "{new_key}");
    assert_eq!(stage(&mut db, "api/payments", "PREVIOUS"), "key-original");
    let events = service.events.lock().unwrap().clone();
    assert_eq!(service.ask(&format!("CHECK {new_key}")), "valid");
    assert_eq!(
        service.ask("CHECK key-original"),
        "invalid",
        "revoked at finish"
    );
    let revoked_at = events
        .iter()
        .position(|e| e.starts_with("REVOKE key-original"))
        .expect("the old key was revoked");
    let last_old_check = events
        .iter()
        .rposition(|e| e == "CHECK key-original -> valid")
        .expect("the test step saw the old key working");
    assert!(last_old_check < revoked_at, "{events:?}");
    assert!(!store.server_log().contains(&new_key));
}

/// A rotator program that leaves a background job holding its output: the step ends when
/// the program exits (the job is killed with the program's process group) rather than when
/// the job would have, and nothing the program started outlives the step.
#[test]
fn a_rotator_programs_background_job_neither_holds_up_nor_outlives_the_step() {
    let dir = rotator_dir();
    let script = "#!/bin/sh\nsleep 301 &\nif [ \"$1\" = create ]; then echo key-from-a-lingering-program; fi\n";
    let path = dir.path().join("lingering");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let setting = format!("pg_secrets.rotator_dir = '{}'", dir.path().display());
    let store = store_cluster(&[&setting]);
    let mut db = store.superuser();
    create_secret(&mut db, "api/lingering", "key-original");
    db.execute(
        "SELECT secrets.rotate_secret('api/lingering', rotator => 'command:lingering')",
        &[],
    )
    .unwrap();
    wait_for_rotation(&mut db, "api/lingering");
    assert_eq!(
        current(&mut db, "api/lingering"),
        "key-from-a-lingering-program"
    );
    // Every process's command line, from /proc, for the job's own. A process just killed
    // keeps its command line until it has exited.
    let jobs_left = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
            .filter(|command| command == b"sleep\x00301\x00")
            .count()
    };
    wait_until(
        "the program's background job to be gone",
        Duration::from_secs(10),
        || jobs_left() == 0,
    );
}

/// A rotator program that fails, is killed or outlasts `pg_secrets.rotator_timeout` fails the
/// rotation with what happened, and nothing changes; a `pg_secrets.rotator_dir` that does not
/// exist refuses command rotators when they are configured.
#[test]
fn a_rotator_program_that_fails_is_killed_hangs_or_cannot_start_changes_nothing() {
    let dir = rotator_dir();
    for (program, script) in [
        ("fails", "#!/bin/sh\nexit 3\n"),
        ("killed", "#!/bin/sh\nkill -9 $$\n"),
        ("hangs", "#!/bin/sh\nexec sleep 30\n"),
        // A script for an interpreter this machine does not have.
        ("uninterpreted", "#!/nonexistent/python\nprint('new-key')\n"),
    ] {
        let path = dir.path().join(program);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let setting = format!("pg_secrets.rotator_dir = '{}'", dir.path().display());
    let store = store_cluster(&[&setting, "pg_secrets.rotator_timeout = 2"]);
    let mut db = store.superuser();
    for (program, error) in [
        ("fails", "exited with status 3"),
        ("killed", "was killed by a signal"),
        ("hangs", "timed out after 2 s"),
        ("uninterpreted", "cannot start: entity not found"),
    ] {
        let name = format!("api/{program}");
        create_secret(&mut db, &name, "key-original");
        let before = store_state(&mut db);
        // The first step runs in the call, so the caller hears what went wrong.
        assert_sql_error(
            db.execute(
                "SELECT secrets.rotate_secret($1, rotator => $2)",
                &[&name, &format!("command:{program}")],
            ),
            "55000",
            &format!("failed at step create: program \"{program}\" {error}"),
        );
        assert_eq!(store_state(&mut db), before, "{program}");
        assert_eq!(current(&mut db, &name), "key-original");
    }

    db.batch_execute("ALTER SYSTEM SET pg_secrets.rotator_dir = '/nonexistent/rotators'")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until("the reload", Duration::from_secs(30), || {
        first_column(&mut db, "SHOW pg_secrets.rotator_dir") == ["/nonexistent/rotators"]
    });
    create_secret(&mut db, "api/nowhere", "key-original");
    let before = store_state(&mut db);
    assert_sql_error(
        db.execute(
            "SELECT secrets.rotate_secret('api/nowhere', rotator => 'command:fails')",
            &[],
        ),
        "22023",
        "pg_secrets.rotator_dir does not exist",
    );
    assert_eq!(store_state(&mut db), before);
}

#[test]
fn a_target_that_is_down_fails_cleanly_alarms_and_recovers() {
    let store = store_cluster(&[]);
    let mut target = target_cluster();
    target
        .superuser()
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'first-password'")
        .unwrap();
    let mut db = store.superuser();
    let first = credential("127.0.0.1", target.port, "app", "first-password", "");
    create_secret(&mut db, "db/down", &first);
    let mut listener = store.superuser();
    listener.batch_execute("LISTEN pg_secrets_alarm").unwrap();
    target.stop("fast");

    db.execute(
        "SELECT secrets.rotate_secret('db/down', rotator => 'postgres-single-user')",
        &[],
    )
    .unwrap();
    // Repeated failures raise an alarm with a JSON payload.
    let mut notifications = listener.notifications();
    let alarm = notifications
        .timeout_iter(Duration::from_secs(60))
        .next()
        .unwrap()
        .expect("an alarm after repeated failures");
    assert!(alarm.payload().contains(r#""alarm":"rotation_failing""#));
    // The payload names the event, not the secret or the error: those are in the event's row,
    // for the roles that may read it.
    assert!(!alarm.payload().contains("db/down"), "{}", alarm.payload());
    let event: String = db
        .query_one(
            "SELECT secret_name || ' ' || (details->>'step') FROM secrets.alarm_event \
             WHERE id = ($1::text::jsonb->>'event_id')::bigint",
            &[&alarm.payload()],
        )
        .unwrap()
        .get(0);
    assert_eq!(event, "db/down set");
    let error = rotation_field(&mut db, "db/down", &["in_progress", "last_error"]).unwrap();
    assert!(error.contains("failed at step set"), "{error}");
    assert_eq!(
        rotation_field(&mut db, "db/down", &["in_progress", "step"]).as_deref(),
        Some("set")
    );
    // CURRENT is untouched.
    assert_eq!(current(&mut db, "db/down"), first);
    // Cancelling now turns the schedule off but leaves the rotation running: a set that
    // failed may have changed the target before its answer was lost.
    db.execute("SELECT secrets.cancel_rotate_secret('db/down')", &[])
        .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/down", &["in_progress", "step"]).as_deref(),
        Some("set")
    );
    // Nor does it give up at set after eight failures, for the same reason: the eighth failure
    // (made due at once here) leaves it running, to be retried.
    db.batch_execute(
        "UPDATE secrets.rotation SET attempts = 7, next_attempt_at = now() \
         WHERE state = 'running' \
           AND secret_id = (SELECT id FROM secrets.secret WHERE name = 'db/down')",
    )
    .unwrap();
    wait_until("the eighth failure", Duration::from_secs(60), || {
        rotation_field(&mut db, "db/down", &["in_progress", "failures"]).as_deref() == Some("8")
    });
    assert_eq!(
        rotation_field(&mut db, "db/down", &["in_progress", "step"]).as_deref(),
        Some("set"),
        "still running after eight failures at set"
    );
    // Weeks of a target down: past a thousand failures the doubling delay must not overflow
    // (2^1024 does in float8), or the failure could not be recorded at all.
    db.batch_execute(
        "UPDATE secrets.rotation SET attempts = 1100, next_attempt_at = now() \
         WHERE state = 'running' \
           AND secret_id = (SELECT id FROM secrets.secret WHERE name = 'db/down')",
    )
    .unwrap();
    wait_until("failure 1101", Duration::from_secs(60), || {
        rotation_field(&mut db, "db/down", &["in_progress", "failures"]).as_deref() == Some("1101")
    });
    let retry_in: f64 = db
        .query_one(
            "SELECT extract(epoch FROM next_attempt_at - now())::float8 FROM secrets.rotation \
             WHERE state = 'running' \
               AND secret_id = (SELECT id FROM secrets.secret WHERE name = 'db/down')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        retry_in > 60.0,
        "the retry waits the longest delay, not {retry_in} s"
    );

    // A put under another label leaves the rotation running, and its PENDING in place.
    db.execute(
        "SELECT secrets.put_secret_value('db/down', $1, version_stages => '{STAGING}')",
        &[&first],
    )
    .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/down", &["in_progress", "step"]).as_deref(),
        Some("set")
    );
    assert_eq!(versions_labelled(&mut db, "db/down", "PENDING"), 1);
    // PENDING is the rotation's: neither a put nor a stage move may take it, and nothing
    // changes.
    assert_sql_error(
        db.execute(
            "SELECT secrets.put_secret_value('db/down', $1, version_stages => '{PENDING}')",
            &[&first],
        ),
        "55000",
        "stage PENDING of secret \"db/down\" belongs to its rotation in progress (at step set)",
    );
    let staging = version_with(&mut db, "db/down", "STAGING");
    assert_sql_error(
        db.execute(
            "SELECT secrets.update_secret_version_stage('db/down', 'PENDING', \
                    move_to_version_id => $1::text::uuid, \
                    remove_from_version_id => (secrets.describe_secret('db/down') \
                        #>> '{rotation,in_progress,pending_version_id}')::uuid)",
            &[&staging],
        ),
        "55000",
        "belongs to its rotation in progress",
    );
    // Nor does a stage move that changes nothing (CURRENT onto the version holding it).
    let current_version = version_with(&mut db, "db/down", "CURRENT");
    db.execute(
        "SELECT secrets.update_secret_version_stage('db/down', 'CURRENT', \
                move_to_version_id => $1::text::uuid)",
        &[&current_version],
    )
    .unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/down", &["in_progress", "step"]).as_deref(),
        Some("set")
    );
    assert_eq!(versions_labelled(&mut db, "db/down", "PENDING"), 1);

    // A manual put during the rotation wins, and the record says so and who put.
    db.batch_execute("CREATE ROLE fixer IN ROLE secrets_admin; SET ROLE fixer")
        .unwrap();
    db.execute("SELECT secrets.put_secret_value('db/down', $1)", &[&first])
        .unwrap();
    db.batch_execute("RESET ROLE").unwrap();
    assert_eq!(
        rotation_field(&mut db, "db/down", &["last", "state"]).as_deref(),
        Some("abandoned")
    );
    let note = rotation_field(&mut db, "db/down", &["last", "note"]).unwrap();
    assert!(note.contains("put_secret_value wrote version"), "{note}");
    assert!(note.contains("(by fixer)"), "{note}");
    assert!(rotation_field(&mut db, "db/down", &["in_progress"]).is_none());
    // The abandoned version no longer claims to be on its way in.
    assert_eq!(versions_labelled(&mut db, "db/down", "PENDING"), 0);

    // With the target back, CURRENT logs in as before and a new rotation succeeds.
    target.restart();
    login(&target, &first).expect("CURRENT still logs in once the target is back");
    db.execute("SELECT secrets.rotate_secret('db/down')", &[])
        .unwrap();
    wait_for_rotation(&mut db, "db/down");
    login(&target, &current(&mut db, "db/down")).expect("the rotated CURRENT logs in");

    // The history: the success, then the abandoned attempt with its failures and error.
    // (state, step, failures, last_error, note)
    type Entry = (String, String, i32, Option<String>, Option<String>);
    let history: Vec<Entry> = db
        .query(
            "SELECT state, step, failures, last_error, note FROM secrets.rotation_history('db/down')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4)))
        .collect();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(
        (history[0].0.as_str(), history[0].1.as_str()),
        ("succeeded", "done")
    );
    assert_eq!(history[1].0, "abandoned");
    assert!(history[1].2 >= 3, "{history:?}");
    assert!(history[1]
        .3
        .as_deref()
        .unwrap()
        .contains("failed at step set"));
    assert!(history[1]
        .4
        .as_deref()
        .unwrap()
        .contains("put_secret_value"));
    let newest: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.rotation_history('db/down', max_results => 1)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(newest, 1);
    for (sql, sqlstate, words) in [
        (
            "SELECT * FROM secrets.rotation_history('db/down', max_results => 0)",
            "22023",
            "max_results must be between 1 and 1000",
        ),
        (
            "SELECT * FROM secrets.rotation_history(NULL)",
            "22004",
            "must not be NULL",
        ),
    ] {
        assert_sql_error(db.query(sql, &[]), sqlstate, words);
    }
    let mut stranger = store.login_role("stranger", "IN ROLE secrets_user");
    assert_sql_error(
        stranger.query("SELECT * FROM secrets.rotation_history('db/down')", &[]),
        "42501",
        "permission denied",
    );
}

#[test]
fn an_immediate_stop_between_set_and_finish_resumes_after_restart() {
    let mut store = store_cluster(&[]);
    let target = target_cluster();
    target
        .superuser()
        .batch_execute("CREATE ROLE app LOGIN PASSWORD 'first-password'")
        .unwrap();
    let mut db = store.superuser();
    let first = credential("127.0.0.1", target.port, "app", "first-password", "");
    create_secret(&mut db, "db/crash", &first);
    assert_eq!(current(&mut db, "db/crash"), first);

    // Hold the CURRENT label row: set and test go through, finish cannot move CURRENT.
    let mut holder = store.superuser();
    let mut hold = holder.transaction().unwrap();
    hold.execute(
        "SELECT FROM secrets.version_label l JOIN secrets.secret s ON s.id = l.secret_id \
         WHERE s.name = 'db/crash' AND l.label = 'CURRENT' FOR UPDATE OF l",
        &[],
    )
    .unwrap();
    db.execute(
        "SELECT secrets.rotate_secret('db/crash', rotator => 'postgres-single-user')",
        &[],
    )
    .unwrap();
    wait_until(
        "set and test to be recorded",
        Duration::from_secs(60),
        || {
            rotation_field(&mut db, "db/crash", &["in_progress", "step"]).as_deref()
                == Some("finish")
        },
    );
    // The target already has the new password: CURRENT no longer logs in, PENDING does.
    // Read in a read-only transaction, which never writes the secret's access date: the
    // worker holds the secret's row while it waits on `hold`, so a write (the first read of a
    // new day) would wait on it, and the test for good.
    let pending: String = {
        let mut read_only = db.build_transaction().read_only(true).start().unwrap();
        read_only
            .query_one(
                "SELECT secrets.get_secret_value('db/crash', version_stage => 'PENDING')",
                &[],
            )
            .unwrap()
            .get(0)
    };
    login(&target, &pending).expect("PENDING logs in between set and finish");
    drop(hold);
    drop(holder);
    drop(db);
    store.stop("immediate");
    store.restart();

    let mut db = store.superuser();
    wait_for_rotation(&mut db, "db/crash");
    assert_eq!(current(&mut db, "db/crash"), pending, "no version was lost");
    assert_eq!(stage(&mut db, "db/crash", "PREVIOUS"), first);
    login(&target, &current(&mut db, "db/crash")).expect("CURRENT logs in after the restart");
    let rotations: i64 = db
        .query_one("SELECT count(*) FROM secrets.rotation", &[])
        .unwrap()
        .get(0);
    assert_eq!(rotations, 1);
}

#[test]
fn two_concurrent_rotate_calls_make_one_rotation() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    local_app_secret(&mut db);
    db.execute(
        "SELECT secrets.rotate_secret('db/app', rotator => 'postgres-single-user', \
                rotate_immediately => false)",
        &[],
    )
    .unwrap();
    // Both calls queue behind one lock, then race.
    let mut holder = cluster.superuser();
    let mut hold = holder.transaction().unwrap();
    hold.execute(
        "SELECT FROM secrets.secret WHERE name = 'db/app' FOR UPDATE",
        &[],
    )
    .unwrap();
    let callers: Vec<_> = (0..2)
        .map(|_| {
            let mut client = cluster.superuser();
            std::thread::spawn(move || -> String {
                client
                    .query_one("SELECT secrets.rotate_secret('db/app')::text", &[])
                    .unwrap()
                    .get(0)
            })
        })
        .collect();
    cluster.wait_for_lock_waiters("rotate_secret('db/app')", 2);
    hold.commit().unwrap();
    let versions: Vec<String> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(versions[0], versions[1]);
    let (rotations, stored_versions): (i64, i64) = {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM secrets.rotation), \
                        (SELECT count(*) FROM secrets.secret_version)",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((rotations, stored_versions), (1, 2));
    login(&cluster, &current(&mut db, "db/app")).expect("CURRENT logs in");
}

/// Whether a process runs whose command line holds `arguments` in a row (read from /proc).
fn running_with_arguments(arguments: &[&str]) -> bool {
    let wanted: Vec<u8> = arguments.join("\0").into_bytes();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
            cmdline
                .windows(wanted.len())
                .any(|window| window == wanted.as_slice())
        })
    })
}

/// The rotation worker's pid, from pg_stat_activity.
fn rotation_worker_pid(db: &mut Client) -> i32 {
    db.query_one(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_secrets worker'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// A cancel sent to the rotation worker (`pg_cancel_backend`) stops the step at hand, which
/// is logged, and the worker goes on: it neither exits nor stops serving other work.
#[test]
fn a_cancelled_worker_step_is_logged_and_the_worker_goes_on() {
    let dir = rotator_dir();
    let slow = dir.path().join("slow");
    std::fs::write(&slow, "#!/bin/sh\nsleep 30\n").unwrap();
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = store_cluster(&[&format!(
        "pg_secrets.rotator_dir = '{}'",
        dir.path().display()
    )]);
    let mut db = store.superuser();
    create_secret(&mut db, "api/slow", "key");
    db.execute(
        "SELECT secrets.rotate_secret('api/slow', rotator => 'command:slow', \
                schedule => 'rate(1 days)', rotate_immediately => false)",
        &[],
    )
    .unwrap();
    // Due now: the worker starts it and waits on the program.
    db.batch_execute("UPDATE secrets.secret SET next_rotation_at = now() WHERE name = 'api/slow'")
        .unwrap();
    let pid = rotation_worker_pid(&mut db);
    wait_until(
        "the worker to run the program",
        Duration::from_secs(30),
        || running_with_arguments(&["create", "api/slow"]),
    );
    db.execute("SELECT pg_cancel_backend($1)", &[&pid]).unwrap();
    wait_until("the cancel to be logged", Duration::from_secs(30), || {
        store.server_log().contains("cancelled (pg_cancel_backend)")
    });
    assert_eq!(rotation_worker_pid(&mut db), pid, "the worker went on");
}

/// A cancel or a statement timeout ends offboarding as a whole, as its sender asked, rather
/// than failing the one secret being rotated while the loop goes on to the next.
#[test]
fn a_statement_timeout_ends_offboarding_rather_than_one_secret() {
    let dir = rotator_dir();
    let slow = dir.path().join("slow");
    std::fs::write(&slow, "#!/bin/sh\nsleep 30\n").unwrap();
    std::fs::set_permissions(&slow, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = store_cluster(&[&format!(
        "pg_secrets.rotator_dir = '{}'",
        dir.path().display()
    )]);
    let mut db = store.superuser();
    db.batch_execute("CREATE ROLE leaver LOGIN PASSWORD 'leaver-pw' IN ROLE secrets_reader")
        .unwrap();
    for name in ["api/one", "api/two"] {
        create_secret(&mut db, name, "key");
        db.execute(
            "SELECT secrets.rotate_secret($1, rotator => 'command:slow', \
                    rotate_immediately => false)",
            &[&name],
        )
        .unwrap();
    }
    // Before, the call went on for both programs' 30 s and returned two "failed" rows.
    db.batch_execute("SET statement_timeout = '1s'").unwrap();
    assert_sql_error(
        db.query(
            "SELECT * FROM secrets.rotate_secrets_accessible_by('leaver')",
            &[],
        ),
        "57014",
        "statement timeout",
    );
    db.batch_execute("RESET statement_timeout").unwrap();
    let rotations: i64 = db
        .query_one("SELECT count(*) FROM secrets.rotation", &[])
        .unwrap()
        .get(0);
    assert_eq!(rotations, 0, "the call was rolled back as a whole");
}

#[test]
fn offboarding_rotates_what_the_role_could_read() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    db.batch_execute("CREATE ROLE leaver LOGIN PASSWORD 'leaver-pw' IN ROLE secrets_reader")
        .unwrap();
    local_app_secret(&mut db);
    db.execute(
        "SELECT secrets.rotate_secret('db/app', rotator => 'postgres-single-user', \
                rotate_immediately => false)",
        &[],
    )
    .unwrap();
    create_secret(&mut db, "api/manual", "typed-by-hand");
    let rows: Vec<(String, String)> = db
        .query(
            "SELECT name, status FROM secrets.rotate_secrets_accessible_by('leaver')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                "api/manual".to_string(),
                "needs manual rotation: no rotator is configured".to_string()
            ),
            ("db/app".to_string(), "rotated".to_string()),
        ]
    );
    login(&cluster, &current(&mut db, "db/app")).expect("rotated");
    // The rotation it started is recorded under the secret, naming the leaver; the call's own
    // record names no secret (before, it carried the id of the last secret it looked at).
    let offboarding_records = |db: &mut Client| {
        first_column(
            db,
            "SELECT concat_ws(':', coalesce(secret_name, '-'), secret_id IS NOT NULL, outcome,
                              details->>'offboarded_role')
             FROM secrets.audit_log
             WHERE details->>'function' = 'rotate_secrets_accessible_by' ORDER BY id",
        )
    };
    wait_until("the records", Duration::from_secs(30), || {
        offboarding_records(&mut db).len() == 2
    });
    assert_eq!(
        offboarding_records(&mut db),
        ["db/app:t:allowed:leaver", "-:f:allowed"]
    );
    // only_accessed: what the leaver actually read, according to the audit trail.
    let accessed = |db: &mut Client| -> Vec<String> {
        first_column(db, "SELECT name FROM secrets.rotate_secrets_accessible_by('leaver', only_accessed => true)")
    };
    assert!(accessed(&mut db).is_empty(), "the leaver has read nothing");
    db.batch_execute("SET ROLE leaver; SELECT secrets.get_secret_value('api/manual'); RESET ROLE")
        .unwrap();
    wait_until(
        "the read to reach the audit trail",
        Duration::from_secs(30),
        || accessed(&mut db) == vec!["api/manual".to_string()],
    );
    assert_sql_error(
        db.query(
            "SELECT * FROM secrets.rotate_secrets_accessible_by('nobody_by_that_name')",
            &[],
        ),
        "42704",
        "does not exist",
    );
    // A caller is shown only the secrets it may describe: the names are not a probe.
    db.batch_execute("CREATE ROLE nosy IN ROLE secrets_user; SET ROLE nosy")
        .unwrap();
    let shown: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.rotate_secrets_accessible_by('leaver')",
            &[],
        )
        .unwrap()
        .get(0);
    db.batch_execute("RESET ROLE").unwrap();
    assert_eq!(shown, 0, "nosy may describe none of the leaver's secrets");
    // A role that can read nothing gets nothing rotated.
    db.batch_execute("CREATE ROLE stranger").unwrap();
    let none: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.rotate_secrets_accessible_by('stranger')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(none, 0);
}

#[test]
fn the_worker_purges_secrets_whose_recovery_window_ended() {
    let cluster = store_cluster(&[]);
    let mut db = cluster.superuser();
    create_secret(&mut db, "old/key", "v");
    db.batch_execute(
        "SELECT secrets.delete_secret('old/key', 7); \
         UPDATE secrets.secret SET purge_at = now() WHERE name = 'old/key'",
    )
    .unwrap();
    wait_until("the purge", Duration::from_secs(30), || {
        db.query_one("SELECT count(*) FROM secrets.secret_version", &[])
            .unwrap()
            .get::<_, i64>(0)
            == 0
    });
    // The removal for good is in the trail, under the secret, by the worker.
    let purge_record = |db: &mut Client| -> Option<String> {
        db.query_opt(
            "SELECT concat_ws(':', secret_name, secret_id IS NOT NULL, outcome,
                              details->>'purged_by')
             FROM secrets.audit_log WHERE action = 'delete' AND details->>'function' = 'purge'",
            &[],
        )
        .unwrap()
        .map(|row| row.get(0))
    };
    wait_until("the purge's record", Duration::from_secs(30), || {
        purge_record(&mut db).is_some()
    });
    assert_eq!(purge_record(&mut db).unwrap(), "old/key:t:allowed:worker");
}

#[test]
fn rewrapping_ten_thousand_versions_keeps_every_value_readable() {
    const OLD: &str = "old:1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "new:2222222222222222222222222222222222222222222222222222222222222222";
    let mut cluster = Cluster::start_with(KeySource::File(OLD.into()), &[]);
    let mut db = cluster.superuser();
    db.batch_execute(
        "DO $$ BEGIN \
           FOR s IN 1..1000 LOOP \
             PERFORM secrets.create_secret('bulk/' || s, 'value-' || s || '-1'); \
             FOR v IN 2..10 LOOP \
               PERFORM secrets.put_secret_value('bulk/' || s, 'value-' || s || '-' || v, version_stages => '{}'); \
             END LOOP; \
           END LOOP; END $$",
    )
    .unwrap();
    drop(db);

    // Step 1: add the new key, make it active, restart.
    cluster.configure(
        KeySource::File(format!("{NEW}\n{OLD}\n")),
        &["pg_secrets.active_key = 'new'"],
    );
    cluster.restart();
    let mut db = cluster.superuser();
    let status = |db: &mut Client| -> Vec<(String, bool, i64)> {
        db.query(
            "SELECT key_id, active, versions FROM secrets.key_status() ORDER BY key_id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
    };
    assert_eq!(
        status(&mut db),
        vec![("new".into(), true, 0), ("old".into(), false, 10_000)]
    );
    // Step 2: rewrap in batches until nothing remains.
    let mut batches = 0;
    loop {
        let row = db
            .query_one(
                "SELECT rewrapped, remaining FROM secrets.rewrap_keys(3000)",
                &[],
            )
            .unwrap();
        let (rewrapped, remaining): (i64, i64) = (row.get(0), row.get(1));
        batches += 1;
        assert!(rewrapped <= 3000);
        if remaining == 0 {
            break;
        }
        assert!(batches < 10, "rewrap makes no progress");
    }
    assert_eq!(batches, 4);
    assert_eq!(
        status(&mut db),
        vec![("new".into(), true, 10_000), ("old".into(), false, 0)]
    );
    assert_sql_error(
        db.query("SELECT * FROM secrets.rewrap_keys(0)", &[]),
        "22023",
        "batch_size",
    );
    drop(db);

    // Step 4: the old key is gone; every version still reads back.
    cluster.configure(KeySource::File(format!("{NEW}\n")), &[]);
    cluster.restart();
    let mut db = cluster.superuser();
    let wrong: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.secret s \
             CROSS JOIN LATERAL secrets.list_secret_version_ids(s.name, true) v \
             WHERE secrets.get_secret_value(s.name, v.version_id) \
                   NOT LIKE 'value-' || split_part(s.name, '/', 2) || '-%'",
            &[],
        )
        .unwrap()
        .get(0);
    // CURRENT is read from the secret row's copy, rewrapped along with its version.
    let wrong_current: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.secret s \
             WHERE secrets.get_secret_value(s.name) <> 'value-' || split_part(s.name, '/', 2) || '-1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong_current, 0);
    let total: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.secret s \
             CROSS JOIN LATERAL secrets.list_secret_version_ids(s.name, true) v",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!((wrong, total), (0, 10_000));
}

/// Starts a rotation of `db/silent` against a target that accepts connections and never
/// answers, and returns once the rotation worker has connected to it: the worker then waits
/// in that step for as long as the returned connection stays open. The listener comes back
/// too: kept, it makes the step's retries meet the same silence rather than a refusal.
fn rotation_waiting_on_a_silent_target(db: &mut Client) -> (TcpListener, std::net::TcpStream) {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    create_secret(
        db,
        "db/silent",
        &credential("127.0.0.1", port, "app", "pw", ""),
    );
    db.execute(
        "SELECT secrets.rotate_secret('db/silent', rotator => 'postgres-single-user')",
        &[],
    )
    .unwrap();
    let connection = silent.accept().unwrap().0;
    (silent, connection)
}

/// A target that accepts connections and never answers fails the step after
/// `pg_secrets.rotator_timeout`: the client library bounds only the TCP connect, so without
/// the step's own deadline the rotation worker would wait on it for good.
#[test]
fn a_silent_target_fails_the_step_after_rotator_timeout() {
    let store = store_cluster(&["pg_secrets.rotator_timeout = 2"]);
    let mut db = store.superuser();
    let _silent = rotation_waiting_on_a_silent_target(&mut db);
    wait_for_rotation_error(
        &mut db,
        "db/silent",
        &["did not answer within pg_secrets.rotator_timeout (2 s)"],
    );
}

/// A target that accepts connections and never answers: the worker waits on it in a step, and
/// a fast shutdown still completes at once instead of after `pg_secrets.rotator_timeout`.
#[test]
fn a_hanging_target_does_not_hold_up_shutdown() {
    let mut store = store_cluster(&["pg_secrets.rotator_timeout = 600"]);
    let mut db = store.superuser();
    let _silent = rotation_waiting_on_a_silent_target(&mut db);
    drop(db);
    let started = Instant::now();
    store.stop("fast");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "shutdown waited {:?} for the rotation's connection",
        started.elapsed()
    );
}

/// While the rotation worker waits on a target that never answers, the audit trail goes on:
/// the audit worker is its own process. More reads than the audit queue holds (4,096) are all
/// served and all stored; with one worker for both, the queue would fill and the reads past it
/// would fail with `53400` after `pg_secrets.audit_queue_wait`.
#[test]
fn a_hanging_target_does_not_hold_up_the_audit_trail() {
    let store = store_cluster(&["pg_secrets.rotator_timeout = 600"]);
    let mut db = store.superuser();
    create_secret(&mut db, "api/read-me", "v");
    let _silent = rotation_waiting_on_a_silent_target(&mut db);
    let reads = 5_000;
    for _ in 0..reads {
        db.query_one("SELECT secrets.get_secret_value('api/read-me')", &[])
            .unwrap();
    }
    wait_until("every read stored", Duration::from_secs(60), || {
        let stored: i64 = db
            .query_one(
                "SELECT count(*) FROM secrets.audit_log \
                 WHERE action = 'get' AND secret_name = 'api/read-me'",
                &[],
            )
            .unwrap()
            .get(0);
        stored == reads
    });
}

/// Signals that reach the rotation worker while its connection thread waits on a target are
/// handled by the worker's main thread. The kernel gives a process's signal to any thread that
/// does not block it; pgrx's SIGHUP handler, run on the connection thread, panicked, which
/// aborted the worker, and the postmaster then ended every session and restarted the server:
/// a reload during a rotation did that. Hundreds of reload and wake-up signals now leave the
/// same worker, and this session, running.
#[test]
fn signals_during_a_rotation_are_handled_by_the_worker_not_its_connection_thread() {
    let store = store_cluster(&["pg_secrets.rotator_timeout = 600"]);
    let mut db = store.superuser();
    let _silent = rotation_waiting_on_a_silent_target(&mut db);
    let worker = rotation_worker_pid(&mut db);
    let threads = std::fs::read_dir(format!("/proc/{worker}/task"))
        .unwrap()
        .count();
    assert!(threads > 1, "the worker waits in its connection thread");
    let storm = std::process::Command::new("sh")
        .args([
            "-c",
            "for i in $(seq 300); do kill -HUP $0; kill -USR1 $0; done",
            &worker.to_string(),
        ])
        .status()
        .unwrap();
    assert!(storm.success());
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rotation_worker_pid(&mut db), worker);
    let log = store.server_log();
    assert!(
        !log.contains("panicked") && !log.contains("terminated by signal"),
        "{log}"
    );
}
