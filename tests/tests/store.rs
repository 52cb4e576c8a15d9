//! The store as a DBA and an application use it: versions, labels, idempotency, deletion,
//! listing, batch reads and notifications, over real connections to a real cluster.

use pg_secrets_e2e::{assert_sql_error, first_column, wait_until, Cluster, KeySource, TEST_KEY};
use postgres::fallible_iterator::FallibleIterator;
use std::time::Duration;

fn get(client: &mut impl postgres::GenericClient, name: &str) -> String {
    client
        .query_one("SELECT secrets.get_secret_value($1)", &[&name])
        .unwrap()
        .get(0)
}

fn get_stage(client: &mut postgres::Client, name: &str, stage: &str) -> String {
    client
        .query_one(
            "SELECT secrets.get_secret_value($1, version_stage => $2)",
            &[&name, &stage],
        )
        .unwrap()
        .get(0)
}

#[test]
fn versions_and_labels_move_like_a_user_expects() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let v1: String = db
        .query_one(
            "SELECT secrets.create_secret($1, $2)::text",
            &[&"prod/db", &"pw-1"],
        )
        .unwrap()
        .get(0);
    assert_eq!(get(&mut db, "prod/db"), "pw-1");

    let v2: String = db
        .query_one(
            "SELECT secrets.put_secret_value($1, $2)::text",
            &[&"prod/db", &"pw-2"],
        )
        .unwrap()
        .get(0);
    assert_eq!(get(&mut db, "prod/db"), "pw-2");
    assert_eq!(get_stage(&mut db, "prod/db", "PREVIOUS"), "pw-1");

    // A PENDING version does not disturb readers of CURRENT.
    let pending: String = db
        .query_one(
            "SELECT secrets.put_secret_value($1, $2, version_stages => '{PENDING}')::text",
            &[&"prod/db", &"pw-3"],
        )
        .unwrap()
        .get(0);
    assert_eq!(get(&mut db, "prod/db"), "pw-2");
    assert_eq!(get_stage(&mut db, "prod/db", "PENDING"), "pw-3");

    // Promote PENDING: CURRENT moves, PREVIOUS follows, then PENDING is taken off.
    db.execute(
        "SELECT secrets.update_secret_version_stage($1, 'CURRENT', $2::text::uuid, $3::text::uuid)",
        &[&"prod/db", &pending, &v2],
    )
    .unwrap();
    db.execute(
        "SELECT secrets.update_secret_version_stage($1, 'PENDING', remove_from_version_id => $2::text::uuid)",
        &[&"prod/db", &pending],
    )
    .unwrap();
    assert_eq!(get(&mut db, "prod/db"), "pw-3");
    assert_eq!(get_stage(&mut db, "prod/db", "PREVIOUS"), "pw-2");

    // v1 lost every label: deprecated, still readable by id, listed only on request.
    let by_id: String = db
        .query_one(
            "SELECT secrets.get_secret_value($1, $2::text::uuid)",
            &[&"prod/db", &v1],
        )
        .unwrap()
        .get(0);
    assert_eq!(by_id, "pw-1");
    let labelled = db
        .query(
            "SELECT version_id FROM secrets.list_secret_version_ids('prod/db')",
            &[],
        )
        .unwrap();
    assert_eq!(labelled.len(), 2);
    let all = db
        .query(
            "SELECT version_id FROM secrets.list_secret_version_ids('prod/db', true)",
            &[],
        )
        .unwrap();
    assert_eq!(all.len(), 3);

    // Custom labels; moving one that sits elsewhere needs remove_from_version_id.
    db.execute(
        "SELECT secrets.update_secret_version_stage($1, 'blue', $2::text::uuid)",
        &[&"prod/db", &v2],
    )
    .unwrap();
    assert_sql_error(
        db.execute(
            "SELECT secrets.update_secret_version_stage($1, 'blue', $2::text::uuid)",
            &[&"prod/db", &pending],
        ),
        "22023",
        "remove_from_version_id",
    );
    assert_sql_error(
        db.execute(
            "SELECT secrets.update_secret_version_stage($1, 'CURRENT', remove_from_version_id => $2::text::uuid)",
            &[&"prod/db", &pending],
        ),
        "22023",
        "only be moved",
    );

    let description: String = db
        .query_one("SELECT secrets.describe_secret('prod/db')::text", &[])
        .unwrap()
        .get(0);
    assert!(
        description.contains("\"name\": \"prod/db\""),
        "{}",
        description
    );
    assert!(description.contains("\"PREVIOUS\""));
    assert!(
        !description.contains("pw-"),
        "describe must never show a value"
    );
}

/// Secrets whose copy of CURRENT (in the secret row, what reads of CURRENT use) differs from
/// what the labels and versions say.
fn stale_current_copies(db: &mut postgres::Client) -> i64 {
    db.query_one(
        "SELECT count(*) FROM secrets.secret s \
         LEFT JOIN secrets.version_label l ON l.secret_id = s.id AND l.label = 'CURRENT' \
         LEFT JOIN secrets.secret_version v ON v.id = l.version_id \
         WHERE (s.current_version_id, s.current_value_kind, s.current_key_id, \
                s.current_wrapped_key, s.current_ciphertext) \
               IS DISTINCT FROM (v.id, v.value_kind, v.key_id, v.wrapped_key, v.ciphertext)",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn reads_of_current_follow_every_change_of_the_label() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let v1: String = db
        .query_one("SELECT secrets.create_secret('copy/a', 'a-1')::text", &[])
        .unwrap()
        .get(0);
    let v2: String = db
        .query_one(
            "SELECT secrets.put_secret_value('copy/a', 'a-2')::text",
            &[],
        )
        .unwrap()
        .get(0);
    db.batch_execute(
        "SELECT secrets.create_secret('copy/b', secret_binary => '\\x0102');
         SELECT secrets.put_secret_value('copy/a', 'a-3', version_stages => '{PENDING}');",
    )
    .unwrap();
    assert_eq!(get(&mut db, "copy/a"), "a-2");
    assert_eq!(stale_current_copies(&mut db), 0);

    // CURRENT moved back by hand, then a change rolled back: reads follow both, and a read
    // in the changing transaction sees its own change.
    db.execute(
        "SELECT secrets.update_secret_version_stage('copy/a', 'CURRENT', $1::text::uuid, $2::text::uuid)",
        &[&v1, &v2],
    )
    .unwrap();
    assert_eq!(get(&mut db, "copy/a"), "a-1");
    let mut transaction = db.transaction().unwrap();
    transaction
        .execute("SELECT secrets.put_secret_value('copy/a', 'a-4')", &[])
        .unwrap();
    assert_eq!(get(&mut transaction, "copy/a"), "a-4");
    transaction.rollback().unwrap();
    assert_eq!(get(&mut db, "copy/a"), "a-1");
    assert_eq!(stale_current_copies(&mut db), 0);

    // A superuser's own edits keep the copy too, triggers disabled or not: CURRENT taken off
    // by hand leaves nothing to read, put back it reads again.
    db.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM secrets.version_label l USING secrets.secret s
          WHERE l.secret_id = s.id AND s.name = 'copy/a' AND l.label = 'CURRENT';
         RESET session_replication_role;",
    )
    .unwrap();
    assert_eq!(stale_current_copies(&mut db), 0);
    assert_sql_error(
        db.query_one("SELECT secrets.get_secret_value('copy/a')", &[]),
        "42704",
        "with stage CURRENT",
    );
    db.execute(
        "INSERT INTO secrets.version_label (secret_id, label, version_id) \
         SELECT secret_id, 'CURRENT', id FROM secrets.secret_version WHERE id = $1::text::uuid",
        &[&v1],
    )
    .unwrap();
    assert_eq!(get(&mut db, "copy/a"), "a-1");
    let binary: Vec<u8> = db
        .query_one("SELECT secrets.get_secret_binary('copy/b')", &[])
        .unwrap()
        .get(0);
    assert_eq!(binary, [1, 2]);
    assert_eq!(stale_current_copies(&mut db), 0);

    // Nobody but the extension reads the copy: it is not among the columns users may select.
    db.batch_execute("CREATE ROLE looker LOGIN IN ROLE secrets_admin")
        .unwrap();
    assert_sql_error(
        db.batch_execute(
            "SET ROLE looker; SELECT current_ciphertext FROM secrets.secret; RESET ROLE;",
        ),
        "42501",
        "permission denied",
    );

    // TRUNCATE fires no row triggers; statement triggers clear every copy.
    db.batch_execute("TRUNCATE secrets.version_label").unwrap();
    assert_eq!(stale_current_copies(&mut db), 0);
    assert_sql_error(
        db.query_one("SELECT secrets.get_secret_value('copy/a')", &[]),
        "42704",
        "with stage CURRENT",
    );
    db.batch_execute("SELECT secrets.put_secret_value('copy/a', 'a-5')")
        .unwrap();
    assert_eq!(get(&mut db, "copy/a"), "a-5");

    // Tables created before the copy existed (no columns, no triggers) are read through the
    // label and the version.
    db.batch_execute(
        "DROP TRIGGER version_label_current_copy ON secrets.version_label;
         DROP TRIGGER version_label_truncated ON secrets.version_label;
         DROP TRIGGER secret_version_current_copy ON secrets.secret_version;
         DROP TRIGGER secret_version_truncated ON secrets.secret_version;
         ALTER TABLE secrets.secret DROP COLUMN current_version_id,
             DROP COLUMN current_value_kind, DROP COLUMN current_key_id,
             DROP COLUMN current_wrapped_key, DROP COLUMN current_ciphertext;
         SELECT secrets.put_secret_value('copy/a', 'a-6');",
    )
    .unwrap();
    assert_eq!(get(&mut db, "copy/a"), "a-6");
    assert_eq!(get_stage(&mut db, "copy/a", "PREVIOUS"), "a-5");
}

#[test]
fn binary_values_and_empty_secrets() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let bytes: Vec<u8> = (0..=255).collect();
    db.execute(
        "SELECT secrets.create_secret('tls/key', secret_binary => $1)",
        &[&bytes],
    )
    .unwrap();
    let back: Vec<u8> = db
        .query_one("SELECT secrets.get_secret_binary('tls/key')", &[])
        .unwrap()
        .get(0);
    assert_eq!(back, bytes);

    // A secret may be created without a value; its first put becomes CURRENT whatever it is
    // labelled.
    let none: Option<String> = db
        .query_one(
            "SELECT secrets.create_secret('later', description => 'filled later')::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(none, None);
    assert_sql_error(
        db.query_one("SELECT secrets.get_secret_value('later')", &[]),
        "42704",
        "no version",
    );
    db.execute(
        "SELECT secrets.put_secret_value('later', 'now', version_stages => '{PENDING}')",
        &[],
    )
    .unwrap();
    assert_eq!(get(&mut db, "later"), "now");
}

#[test]
fn client_request_token_makes_writes_idempotent() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let first: String = db
        .query_one("SELECT secrets.create_secret('api/stripe', 'sk_1', client_request_token => 't-1')::text", &[])
        .unwrap()
        .get(0);
    let again: String = db
        .query_one("SELECT secrets.create_secret('api/stripe', 'sk_1', client_request_token => 't-1')::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(first, again, "a retried create returns the same version");

    let put1: String = db
        .query_one("SELECT secrets.put_secret_value('api/stripe', 'sk_2', client_request_token => 't-2')::text", &[])
        .unwrap()
        .get(0);
    let put2: String = db
        .query_one("SELECT secrets.put_secret_value('api/stripe', 'sk_2', client_request_token => 't-2')::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(put1, put2);
    let versions: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.list_secret_version_ids('api/stripe', true)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(versions, 2);
}

#[test]
fn deletion_recovery_window_restore_and_force() {
    // The worker's round comes once, at its start, not between the steps below that end a
    // recovery window and purge the secret.
    let cluster = Cluster::start_with(
        KeySource::File(TEST_KEY.into()),
        &["pg_secrets.worker_naptime = 3600"],
    );
    let mut db = cluster.superuser();
    db.execute("SELECT secrets.create_secret('old/key', 'v')", &[])
        .unwrap();
    let in_days: f64 = db
        .query_one(
            "SELECT (extract(epoch FROM secrets.delete_secret('old/key', 7) - now()) / 86400)::float8",
            &[],
        )
        .unwrap()
        .get(0);
    assert!((in_days - 7.0).abs() < 0.01, "{in_days}");
    assert_sql_error(
        db.query_one("SELECT secrets.get_secret_value('old/key')", &[]),
        "55000",
        "scheduled for deletion",
    );
    assert!(db
        .query("SELECT * FROM secrets.list_secrets()", &[])
        .unwrap()
        .is_empty());
    assert_eq!(
        db.query(
            "SELECT * FROM secrets.list_secrets(include_planned_deletion => true)",
            &[]
        )
        .unwrap()
        .len(),
        1
    );
    // still describable, so an operator can see when it goes
    db.query_one("SELECT secrets.describe_secret('old/key')", &[])
        .unwrap();

    db.execute("SELECT secrets.restore_secret('old/key')", &[])
        .unwrap();
    assert_eq!(get(&mut db, "old/key"), "v");

    // The default window is 30 days.
    let in_days: f64 = db
        .query_one(
            "SELECT (extract(epoch FROM secrets.delete_secret('old/key') - now()) / 86400)::float8",
            &[],
        )
        .unwrap()
        .get(0);
    assert!((in_days - 30.0).abs() < 0.01, "{in_days}");

    // Forced deletion purges at once: no version row, so no wrapped key, is left.
    db.execute(
        "SELECT secrets.delete_secret('old/key', force_delete_without_recovery => true)",
        &[],
    )
    .unwrap();
    let left: i64 = db
        .query_one("SELECT count(*) FROM secrets.secret_version", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert_sql_error(
        db.query_one("SELECT secrets.get_secret_value('old/key')", &[]),
        "42704",
        "does not exist",
    );

    // A window that has ended is purged by create_secret of that name, by
    // purge_deleted_secrets() or by the worker; not on the way by a call that is then refused,
    // which would leave a record of a removal its rollback undid.
    db.execute("SELECT secrets.create_secret('old/expired', 'v')", &[])
        .unwrap();
    db.execute("SELECT secrets.delete_secret('old/expired', 7)", &[])
        .unwrap();
    db.batch_execute(
        "UPDATE secrets.secret SET purge_at = now() - interval '1 second' WHERE name = 'old/expired'",
    )
    .unwrap();
    db.execute("SELECT secrets.create_secret('old/taken', 'v')", &[])
        .unwrap();
    assert_sql_error(
        db.query_one("SELECT secrets.create_secret('old/taken', 'v2')", &[]),
        "42710",
        "already exists",
    );
    assert_sql_error(
        db.query_one("SELECT secrets.delete_secret('old/expired', 7)", &[]),
        "55000",
        "scheduled for deletion",
    );
    db.execute("SELECT secrets.create_secret('old/expired', 'again')", &[])
        .unwrap();
    // Once the last create's record is stored, every record before it is: one removal, by
    // that create, none by the refused calls.
    let records = |action: &str| -> Vec<String> {
        let mut db = cluster.superuser();
        first_column(
            &mut db,
            &format!(
                "SELECT coalesce(details->>'purged_by', '') FROM secrets.audit_log \
                 WHERE secret_name = 'old/expired' AND action = '{action}' AND outcome = 'allowed' \
                 ORDER BY id"
            ),
        )
    };
    wait_until("the last create's record", Duration::from_secs(30), || {
        records("create").len() == 2
    });
    let purges: Vec<String> = records("delete")
        .into_iter()
        .filter(|purged_by| !purged_by.is_empty())
        .collect();
    assert_eq!(purges, ["create_secret"]);

    db.execute("SELECT secrets.create_secret('old/other', 'v')", &[])
        .unwrap();
    db.execute("SELECT secrets.delete_secret('old/other', 7)", &[])
        .unwrap();
    db.batch_execute(
        "UPDATE secrets.secret SET purge_at = now() - interval '1 second' WHERE name = 'old/other'",
    )
    .unwrap();
    let purged: i64 = db
        .query_one("SELECT secrets.purge_deleted_secrets()", &[])
        .unwrap()
        .get(0);
    assert_eq!(purged, 1);
    // and the name is free again
    db.execute("SELECT secrets.create_secret('old/other', 'v2')", &[])
        .unwrap();
}

#[test]
fn list_filters_tags_and_batch_reads() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('prod/db/a', 'a', tags => '{\"team\": \"payments\", \"env\": \"prod\"}');
         SELECT secrets.create_secret('prod/db/b', 'b', tags => '{\"team\": \"search\"}');
         SELECT secrets.create_secret('dev/db/a', 'c', tags => '{\"env\": \"dev\"}');
         SELECT secrets.create_secret('prod/bin', secret_binary => '\\x0102');",
    )
    .unwrap();
    assert_eq!(
        first_column(&mut db, "SELECT name FROM secrets.list_secrets('prod/db/')"),
        ["prod/db/a", "prod/db/b"]
    );
    assert_eq!(
        first_column(
            &mut db,
            "SELECT name FROM secrets.list_secrets(tag_key => 'env')"
        ),
        ["dev/db/a", "prod/db/a"]
    );
    assert_eq!(
        first_column(
            &mut db,
            "SELECT name FROM secrets.list_secrets(tag_key => 'team', tag_value => 'search')"
        ),
        ["prod/db/b"]
    );
    assert_eq!(
        first_column(
            &mut db,
            "SELECT name FROM secrets.list_secrets(tag_value => 'dev')"
        ),
        ["dev/db/a"]
    );
    // A prefix is a prefix, not a pattern.
    assert!(first_column(&mut db, "SELECT name FROM secrets.list_secrets('%')").is_empty());

    db.execute(
        "SELECT secrets.tag_secret('prod/db/b', '{\"env\": \"prod\"}')",
        &[],
    )
    .unwrap();
    db.execute("SELECT secrets.untag_secret('prod/db/a', '{team}')", &[])
        .unwrap();
    assert_eq!(
        first_column(
            &mut db,
            "SELECT name FROM secrets.list_secrets(tag_key => 'team')"
        ),
        ["prod/db/b"]
    );
    db.execute(
        "SELECT secrets.update_secret('prod/db/a', description => 'the main one')",
        &[],
    )
    .unwrap();
    let description: Option<String> = db
        .query_one(
            "SELECT description FROM secrets.list_secrets('prod/db/a')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(description.as_deref(), Some("the main one"));

    let rows = db
        .query(
            "SELECT name, secret_string, secret_binary, error, sqlstate, version_stages \
             FROM secrets.batch_get_secret_value(ARRAY['prod/db/a', 'missing', 'prod/bin', 'bad name'])",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0].get::<_, Option<String>>(1).as_deref(), Some("a"));
    assert_eq!(
        rows[0].get::<_, Option<Vec<String>>>(5),
        Some(vec!["CURRENT".to_string()])
    );
    assert_eq!(
        rows[1].get::<_, Option<String>>(4).as_deref(),
        Some("42704")
    );
    assert_eq!(rows[2].get::<_, Option<Vec<u8>>>(2), Some(vec![1, 2]));
    assert_eq!(
        rows[3].get::<_, Option<String>>(4).as_deref(),
        Some("22023")
    );
}

#[test]
fn changes_are_notified_after_commit_only() {
    let cluster = Cluster::start();
    let mut listener = cluster.superuser();
    listener.batch_execute("LISTEN pg_secrets_changed").unwrap();
    let mut db = cluster.superuser();
    db.execute("SELECT secrets.create_secret('notify/me', 'v1')", &[])
        .unwrap();
    db.batch_execute(
        "BEGIN; SELECT secrets.put_secret_value('notify/me', 'rolled back'); ROLLBACK;",
    )
    .unwrap();
    let version: String = db
        .query_one(
            "SELECT secrets.put_secret_value('notify/me', 'v2')::text",
            &[],
        )
        .unwrap()
        .get(0);
    listener.batch_execute("SELECT 1").unwrap();
    let payloads: Vec<String> = listener
        .notifications()
        .iter()
        .map(|n| Ok(n.payload().to_string()))
        .collect()
        .unwrap();
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    assert!(payloads[0].contains("\"event\":\"create\""));
    assert!(
        payloads[1].contains(&version) && payloads[1].contains("CURRENT"),
        "{payloads:?}"
    );
    assert!(payloads
        .iter()
        .all(|p| !p.contains("v2") && !p.contains("v1")));
}

#[test]
fn deprecated_versions_beyond_100_are_pruned_after_a_day() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.execute("SELECT secrets.create_secret('busy', 'v0')", &[])
        .unwrap();
    db.batch_execute(
        "SELECT secrets.put_secret_value('busy', 'v' || i) FROM generate_series(1, 110) i",
    )
    .unwrap();
    let count = |db: &mut postgres::Client| -> i64 {
        db.query_one(
            "SELECT count(*) FROM secrets.list_secret_version_ids('busy', true)",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(count(&mut db), 111, "nothing younger than a day is pruned");
    // In one transaction, so that the worker's own pruning round cannot see the aged
    // versions before the put prunes them.
    db.batch_execute(
        "BEGIN;
         UPDATE secrets.secret_version SET created_at = created_at - interval '2 days';
         SELECT secrets.put_secret_value('busy', 'v111');
         COMMIT;",
    )
    .unwrap();
    // CURRENT + PREVIOUS + the newest 100 deprecated
    assert_eq!(count(&mut db), 102);
    assert_eq!(get(&mut db, "busy"), "v111");
    // Each pruned version is a record of its own in the trail, naming the call that pruned it.
    let pruned = |db: &mut postgres::Client| {
        first_column(
            db,
            "SELECT concat_ws(':', secret_name, outcome, details->>'pruned_by', \
                    version_id IN (SELECT id FROM secrets.secret_version)) \
             FROM secrets.audit_log \
             WHERE action = 'delete' AND details->>'function' = 'prune'",
        )
    };
    wait_until("the prune's records", Duration::from_secs(30), || {
        pruned(&mut db).len() >= 10
    });
    assert_eq!(pruned(&mut db), vec!["busy:allowed:put_secret_value:f"; 10]);
}

#[test]
fn random_passwords_from_sql() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let password: String = db
        .query_one("SELECT secrets.get_random_password()", &[])
        .unwrap()
        .get(0);
    assert_eq!(password.chars().count(), 32);
    let digits: String = db
        .query_one(
            "SELECT secrets.get_random_password(20, exclude_punctuation => true, \
             exclude_uppercase => true, exclude_lowercase => true)",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        digits.len() == 20 && digits.chars().all(|c| c.is_ascii_digit()),
        "{digits}"
    );
    let other: String = db
        .query_one("SELECT secrets.get_random_password()", &[])
        .unwrap()
        .get(0);
    assert_ne!(password, other);
}

#[test]
fn admin_and_reader_roles_and_owners() {
    let cluster = Cluster::start();
    let mut admin = cluster.login_role("alice", "IN ROLE secrets_admin");
    let mut reader = cluster.login_role("rita", "IN ROLE secrets_reader");
    let mut stranger = cluster.login_role("sam", "");
    admin
        .execute("SELECT secrets.create_secret('team/a', 'va')", &[])
        .unwrap();
    assert_eq!(get(&mut reader, "team/a"), "va");
    assert_sql_error(
        reader.execute("SELECT secrets.put_secret_value('team/a', 'x')", &[]),
        "42501",
        "permission denied",
    );
    assert_sql_error(
        reader.execute("SELECT secrets.create_secret('team/r', 'x')", &[]),
        "42501",
        "permission denied",
    );
    // A reader is told what does not exist; a stranger cannot tell missing from forbidden.
    assert_sql_error(
        reader.query_one("SELECT secrets.get_secret_value('nope')", &[]),
        "42704",
        "does not exist",
    );
    let forbidden = assert_sql_error(
        stranger.query_one("SELECT secrets.get_secret_value('team/a')", &[]),
        "42501",
        "",
    );
    let missing = assert_sql_error(
        stranger.query_one("SELECT secrets.get_secret_value('nope')", &[]),
        "42501",
        "",
    );
    assert_eq!(
        forbidden.message().replace("team/a", "X"),
        missing.message().replace("nope", "X"),
        "same answer whether the secret exists or not"
    );

    // The owner keeps full rights after leaving secrets_admin; SET ROLE is honoured.
    cluster
        .superuser()
        .batch_execute("REVOKE secrets_admin FROM alice; GRANT secrets_reader TO alice")
        .unwrap();
    admin
        .execute("SELECT secrets.put_secret_value('team/a', 'va2')", &[])
        .unwrap();
    cluster
        .superuser()
        .batch_execute("CREATE ROLE ops NOLOGIN IN ROLE secrets_admin")
        .unwrap();
    let mut olga = cluster.login_role("olga", "NOINHERIT IN ROLE ops");
    assert_sql_error(
        olga.execute("SELECT secrets.put_secret_value('team/a', 'x')", &[]),
        "42501",
        "",
    );
    olga.batch_execute("SET ROLE ops").unwrap();
    olga.execute("SELECT secrets.put_secret_value('team/a', 'by ops')", &[])
        .unwrap();

    // Nobody but the extension owner touches the tables.
    assert_sql_error(
        admin.query("SELECT * FROM secrets.secret_version", &[]),
        "42501",
        "permission denied",
    );
    assert_sql_error(
        admin.execute("DELETE FROM secrets.secret", &[]),
        "42501",
        "permission denied",
    );
}

#[test]
fn the_key_check_value_survives_a_rolled_back_first_write() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute("BEGIN; SELECT secrets.create_secret('gone', 'v'); ROLLBACK;")
        .unwrap();
    db.execute("SELECT secrets.create_secret('kept', 'v')", &[])
        .unwrap();
    let checks: i64 = db
        .query_one("SELECT count(*) FROM secrets.master_key", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        checks, 1,
        "the second write in this backend stored the check value"
    );
}
