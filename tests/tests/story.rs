//! The customer story the product started from, end to end on real clusters: an application
//! with 20 databases whose passwords leave its configuration and rotate on their own, API keys
//! only some roles may read, another team's access on approval, a full audit trail with an
//! alarm, and a developer who leaves.

use pg_secrets_e2e::{
    assert_sql_error, first_column, wait_until, Client, Cluster, KeySource, NoTls, TEST_KEY,
};
use postgres::fallible_iterator::FallibleIterator;
use std::time::Duration;

const DATABASES: usize = 20;
/// How long the story waits for the workers (twenty rotations take a while on a busy machine).
const WAIT: Duration = Duration::from_secs(90);

fn value(client: &mut Client, name: &str) -> String {
    client
        .query_one("SELECT secrets.get_secret_value($1)", &[&name])
        .unwrap()
        .get(0)
}

fn password(json: &str) -> String {
    let start = json.find("\"password\":\"").unwrap() + 12;
    json[start..start + json[start..].find('"').unwrap()].to_string()
}

#[test]
fn twenty_databases_api_keys_cross_team_access_audit_and_offboarding() {
    let store = Cluster::start_with(
        KeySource::File(TEST_KEY.into()),
        &[
            "pg_secrets.worker_naptime = 1",
            "pg_secrets.rotation_retry_delay = 1",
            "pg_secrets.alarm_interval = 1",
            // The twenty databases are a cluster on 127.0.0.1 without TLS.
            "pg_secrets.rotator_sslmode = disable",
        ],
    );
    let databases = Cluster::start_bare(KeySource::None, &[]);
    let mut admin = store.superuser();
    admin
        .batch_execute(
            "CREATE ROLE platform LOGIN PASSWORD 'pw' IN ROLE secrets_user;
             CREATE ROLE payments_app LOGIN PASSWORD 'pw';
             CREATE ROLE dev_lambda LOGIN PASSWORD 'pw' IN ROLE secrets_user;
             CREATE ROLE security LOGIN PASSWORD 'pw' IN ROLE secrets_auditor;
             SELECT secrets.grant_access('prod/*', 'platform', '{manage}');
             SELECT secrets.create_alarm_rule('new reader', 'first_read');",
        )
        .unwrap();
    let mut platform = store.connect("platform", "pw");

    // 1. Twenty database passwords move out of the configuration files and rotate by
    //    themselves every 30 days, starting now.
    for i in 1..=DATABASES {
        databases
            .superuser()
            .batch_execute(&format!(
                "CREATE ROLE app_{i} LOGIN PASSWORD 'from-config-{i}'"
            ))
            .unwrap();
        let credential = format!(
            r#"{{"engine":"postgres","host":"127.0.0.1","port":{},"dbname":"postgres","username":"app_{i}","password":"from-config-{i}"}}"#,
            databases.port
        );
        platform
            .execute(
                "SELECT secrets.create_secret($1, $2, description => 'payments shard')",
                &[&format!("prod/db/{i}"), &credential],
            )
            .unwrap();
        platform
            .execute(
                "SELECT secrets.rotate_secret($1, 'postgres-single-user', 'rate(30 days)')",
                &[&format!("prod/db/{i}")],
            )
            .unwrap();
    }
    wait_until("twenty rotations", WAIT, || {
        admin
            .query_one(
                "SELECT count(*) FROM secrets.rotation WHERE state = 'succeeded'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == DATABASES as i64
    });
    for i in 1..=DATABASES {
        let now = value(&mut platform, &format!("prod/db/{i}"));
        assert!(!now.contains("from-config"), "prod/db/{i} was rotated");
        Client::connect(
            &databases.connection_string(&format!("app_{i}"), &password(&now)),
            NoTls,
        )
        .unwrap_or_else(|e| panic!("app_{i} logs in with CURRENT: {e}"));
        assert!(Client::connect(
            &databases.connection_string(&format!("app_{i}"), &format!("from-config-{i}")),
            NoTls
        )
        .is_err());
    }

    // 2. API keys: only the payments service reads the Stripe key, and nothing else.
    platform
        .batch_execute(
            "SELECT secrets.create_secret('prod/stripe/key', 'sk_live_example');
             SELECT secrets.create_secret('prod/twilio/key', 'tw_live_example');
             SELECT secrets.grant_access('prod/stripe/key', 'payments_app', '{get}');",
        )
        .unwrap();
    let mut payments = store.connect("payments_app", "pw");
    assert_eq!(value(&mut payments, "prod/stripe/key"), "sk_live_example");
    assert_sql_error(
        payments.query("SELECT secrets.get_secret_value('prod/twilio/key')", &[]),
        "42501",
        "permission denied",
    );

    // 3. Another team's function reads a production database, after approval, for an hour.
    let mut dev = store.connect("dev_lambda", "pw");
    assert_sql_error(
        dev.query("SELECT secrets.get_secret_value('prod/db/1')", &[]),
        "42501",
        "permission denied",
    );
    let request: String = dev
        .query_one(
            "SELECT secrets.request_access('prod/db/1', '{get}', '1 hour', 'nightly export')::text",
            &[],
        )
        .unwrap()
        .get(0);
    let mut alarms = store.connect("security", "pw");
    alarms.batch_execute("LISTEN pg_secrets_alarm").unwrap();
    platform
        .execute(
            "SELECT secrets.approve_access_request($1::text::uuid)",
            &[&request],
        )
        .unwrap();
    let read_by_dev = value(&mut dev, "prod/db/1");
    assert!(read_by_dev.contains("app_1"));

    // 4. The audit trail shows every access, and a first read by a new role raises an alarm.
    alarms
        .notifications()
        .timeout_iter(Duration::from_secs(60))
        .find(|n| Ok(n.payload().contains("\"alarm\":\"first_read\"")))
        .unwrap()
        .expect("a first-read alarm");
    let mut security = store.connect("security", "pw");
    // The payload names the event; who read what is for the auditor to see.
    wait_until("dev_lambda's first-read alarm", WAIT, || {
        security
            .query_one(
                "SELECT count(*) FROM secrets.access_anomalies() WHERE kind = 'first_read' \
                 AND role = 'dev_lambda' AND secret_name = 'prod/db/1'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 1
    });
    wait_until("the audit records", WAIT, || {
        security
            .query_one(
                "SELECT count(*) FROM secrets.audit_log WHERE secret_name = 'prod/db/1' \
                 AND \"current_user\" = 'dev_lambda' AND action = 'get'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
            == 2
    });
    let outcomes: Vec<String> = first_column(
        &mut security,
        "SELECT outcome FROM secrets.audit_log WHERE secret_name = 'prod/db/1' \
             AND \"current_user\" = 'dev_lambda' AND action = 'get' ORDER BY id",
    );
    assert_eq!(outcomes, vec!["denied", "allowed"]);
    let (ok,): (bool,) = {
        let row = security
            .query_one("SELECT ok FROM secrets.verify_audit_log()", &[])
            .unwrap();
        (row.get(0),)
    };
    assert!(ok);

    // 5. The developer leaves: what they actually read is rotated, and the copy they saw no
    //    longer opens the database.
    let rotated: Vec<(String, String)> = admin
        .query(
            "SELECT name, status FROM secrets.rotate_secrets_accessible_by('dev_lambda', only_accessed => true)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        rotated,
        vec![("prod/db/1".to_string(), "rotation started".to_string())]
    );
    wait_until("the offboarding rotation", WAIT, || {
        value(&mut platform, "prod/db/1") != read_by_dev
    });
    wait_until("the old password to stop working", WAIT, || {
        Client::connect(
            &databases.connection_string("app_1", &password(&read_by_dev)),
            NoTls,
        )
        .is_err()
    });
    let now = value(&mut platform, "prod/db/1");
    Client::connect(
        &databases.connection_string("app_1", &password(&now)),
        NoTls,
    )
    .expect("the application's CURRENT logs in");
}
