//! Every rejected input: a clear error with a deliberate SQLSTATE, and nothing changed.

use pg_secrets_e2e::{assert_sql_error, store_state, Cluster, KeySource};
use postgres::types::ToSql;

/// The id of the version `name`'s CURRENT label is on.
fn current_version_id(db: &mut postgres::Client, name: &str) -> String {
    db.query_one(
        "SELECT version_id::text FROM secrets.list_secret_version_ids($1) \
         WHERE 'CURRENT' = ANY(version_stages)",
        &[&name],
    )
    .unwrap()
    .get(0)
}

/// Runs `sql` with `params`, expects `sqlstate` and `words`, and checks the store is untouched.
#[track_caller]
fn refused(
    db: &mut postgres::Client,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    sqlstate: &str,
    words: &str,
) {
    let before = store_state(db);
    assert_sql_error(db.query(sql, params), sqlstate, words);
    assert_eq!(
        store_state(db),
        before,
        "a refused call changed the store: {sql}"
    );
}

fn fixture() -> (Cluster, postgres::Client) {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('app/db', 'pw', tags => '{\"team\": \"a\"}');
         SELECT secrets.create_secret('app/bin', secret_binary => '\\x00');
         SELECT secrets.put_secret_value('app/db', 'pw2', client_request_token => 'tok');",
    )
    .unwrap();
    (cluster, db)
}

#[test]
fn values_names_descriptions_and_tags() {
    let (_cluster, mut db) = fixture();
    let just_fits = "x".repeat(65_536);
    let too_big = "x".repeat(65_537);
    db.execute("SELECT secrets.create_secret('big/ok', $1)", &[&just_fits])
        .unwrap();
    refused(
        &mut db,
        "SELECT secrets.create_secret('big/no', $1)",
        &[&too_big],
        "54000",
        "at most 65536 bytes, this one is longer",
    );
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', $1)",
        &[&too_big],
        "54000",
        "at most 65536 bytes",
    );
    let too_big_binary = vec![0u8; 65_537];
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', secret_binary => $1)",
        &[&too_big_binary],
        "54000",
        "65536",
    );

    refused(
        &mut db,
        "SELECT secrets.create_secret('both', 'a', '\\x00')",
        &[],
        "22023",
        "not both",
    );
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'a', '\\x00')",
        &[],
        "22023",
        "not both",
    );
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db')",
        &[],
        "22023",
        "give secret_string or secret_binary",
    );

    refused(
        &mut db,
        "SELECT secrets.create_secret('bad name', 'v')",
        &[],
        "22023",
        "position 4",
    );
    refused(
        &mut db,
        "SELECT secrets.create_secret('bad;drop', 'v')",
        &[],
        "22023",
        "allowed are",
    );
    refused(
        &mut db,
        "SELECT secrets.create_secret('', 'v')",
        &[],
        "22023",
        "1 to 512 characters",
    );
    let long_name = "n".repeat(513);
    refused(
        &mut db,
        "SELECT secrets.create_secret($1, 'v')",
        &[&long_name],
        "22023",
        "1 to 512",
    );
    db.execute("SELECT secrets.create_secret($1, 'v')", &[&"n".repeat(512)])
        .unwrap();
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('bad*name')",
        &[],
        "22023",
        "allowed are",
    );

    let long_description = "d".repeat(2049);
    refused(
        &mut db,
        "SELECT secrets.create_secret('d', 'v', description => $1)",
        &[&long_description],
        "22023",
        "2048",
    );
    refused(
        &mut db,
        "SELECT secrets.update_secret('app/db', description => $1)",
        &[&long_description],
        "22023",
        "2048",
    );
    refused(
        &mut db,
        "SELECT secrets.update_secret('app/db')",
        &[],
        "22023",
        "give description, key_id or both",
    );

    let long_key = format!("{{\"{}\": \"v\"}}", "k".repeat(129));
    let long_value = format!("{{\"k\": \"{}\"}}", "v".repeat(257));
    refused(
        &mut db,
        "SELECT secrets.create_secret('t', 'v', tags => $1::text::jsonb)",
        &[&long_key],
        "22023",
        "tag key",
    );
    refused(
        &mut db,
        "SELECT secrets.tag_secret('app/db', $1::text::jsonb)",
        &[&long_value],
        "22023",
        "tag value",
    );
    refused(
        &mut db,
        "SELECT secrets.tag_secret('app/db', '[\"a\"]')",
        &[],
        "22023",
        "JSON object",
    );
    refused(
        &mut db,
        "SELECT secrets.tag_secret('app/db', '{\"a\": 1}')",
        &[],
        "22023",
        "string value",
    );
    let fifty_one: String = format!(
        "{{{}}}",
        (0..51)
            .map(|i| format!("\"k{i}\": \"v\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    refused(
        &mut db,
        "SELECT secrets.create_secret('t', 'v', tags => $1::text::jsonb)",
        &[&fifty_one],
        "54000",
        "at most 50 tags",
    );
    // 49 new tags plus the one the secret has is 50: fine; two more is 52: refused.
    let forty_nine: String = format!(
        "{{{}}}",
        (0..49)
            .map(|i| format!("\"n{i}\": \"v\""))
            .collect::<Vec<_>>()
            .join(",")
    );
    db.execute(
        "SELECT secrets.tag_secret('app/db', $1::text::jsonb)",
        &[&forty_nine],
    )
    .unwrap();
    refused(
        &mut db,
        "SELECT secrets.tag_secret('app/db', '{\"x1\": \"v\", \"x2\": \"v\"}')",
        &[],
        "54000",
        "at most 50 tags",
    );
}

#[test]
fn deletion_versions_labels_and_tokens() {
    let (_cluster, mut db) = fixture();
    for days in [6, 31, 0, -1] {
        refused(
            &mut db,
            "SELECT secrets.delete_secret('app/db', $1)",
            &[&days],
            "22023",
            "between 7 and 30",
        );
    }
    refused(
        &mut db,
        "SELECT secrets.delete_secret('app/db', 7, true)",
        &[],
        "22023",
        "not both",
    );
    refused(
        &mut db,
        "SELECT secrets.restore_secret('app/db')",
        &[],
        "55000",
        "not scheduled for deletion",
    );

    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/db', '00000000-0000-4000-8000-000000000000')",
        &[],
        "42704",
        "has no version",
    );
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/db', version_stage => 'NOPE')",
        &[],
        "42704",
        "with stage NOPE",
    );
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/db', version_stage => 'bad stage')",
        &[],
        "22023",
        "version stage",
    );
    // Both a version id and a stage: the stage must be on that version.
    let current = current_version_id(&mut db, "app/db");
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/db', $1::text::uuid, 'PREVIOUS')",
        &[&current],
        "42704",
        &format!("has no version {current} with stage PREVIOUS"),
    );
    refused(&mut db, "SELECT secrets.update_secret_version_stage('app/db', 'X', '00000000-0000-4000-8000-000000000000')", &[], "42704", "has no version");
    refused(
        &mut db,
        "SELECT secrets.update_secret_version_stage('app/db', 'X')",
        &[],
        "22023",
        "give move_to_version_id",
    );
    // A version id of one secret is unknown to another.
    let other: String = db
        .query_one(
            "SELECT version_id::text FROM secrets.list_secret_version_ids('app/bin')",
            &[],
        )
        .unwrap()
        .get(0);
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/db', $1::text::uuid)",
        &[&other],
        "42704",
        "has no version",
    );

    // A version carries at most 20 labels.
    let twenty: Vec<String> = (1..=20).map(|i| format!("L{i}")).collect();
    let version: String = db
        .query_one(
            "SELECT secrets.put_secret_value('app/db', 'v', version_stages => $1)::text",
            &[&twenty],
        )
        .unwrap()
        .get(0);
    refused(
        &mut db,
        "SELECT secrets.update_secret_version_stage('app/db', 'L21', $1::text::uuid)",
        &[&version],
        "54000",
        "already carries 20 stages",
    );
    let twenty_one: Vec<String> = (1..=21).map(|i| format!("M{i}")).collect();
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'v', version_stages => $1)",
        &[&twenty_one],
        "54000",
        "at most 20 stages",
    );
    // A huge array is refused at its 21st distinct stage, not compared pairwise in full.
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'v', \
                version_stages => ARRAY(SELECT 'S' || g FROM generate_series(1, 1000000) g))",
        &[],
        "54000",
        "at most 20 stages",
    );
    // regrole takes a number as it is: a role that does not exist (or was dropped).
    refused(
        &mut db,
        "SELECT secrets.grant_access('app/db', '999999', '{get}')",
        &[],
        "22023",
        "role with OID 999999, does not exist",
    );

    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'different', client_request_token => 'tok')",
        &[],
        "23505",
        "client_request_token",
    );
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'pw2', client_request_token => '')",
        &[],
        "22023",
        "client_request_token",
    );
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'pw2', client_request_token => 'has space')",
        &[],
        "22023",
        "printable",
    );
    refused(
        &mut db,
        "SELECT secrets.create_secret('app/db', 'x')",
        &[],
        "42710",
        "already exists",
    );

    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/bin')",
        &[],
        "42804",
        "binary value",
    );
    refused(
        &mut db,
        "SELECT secrets.get_secret_binary('app/db')",
        &[],
        "42804",
        "string value",
    );

    db.execute("SELECT secrets.delete_secret('app/db', 7)", &[])
        .unwrap();
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('app/db')",
        &[],
        "55000",
        "scheduled for deletion",
    );
    refused(
        &mut db,
        "SELECT secrets.put_secret_value('app/db', 'x')",
        &[],
        "55000",
        "scheduled for deletion",
    );
    refused(
        &mut db,
        "SELECT secrets.delete_secret('app/db', 7)",
        &[],
        "55000",
        "scheduled for deletion",
    );
    refused(
        &mut db,
        "SELECT secrets.create_secret('app/db', 'x')",
        &[],
        "55000",
        "scheduled for deletion",
    );
    refused(
        &mut db,
        "SELECT secrets.get_secret_value('nope')",
        &[],
        "42704",
        "does not exist",
    );
}

#[test]
fn null_arguments_and_password_rules() {
    let (_cluster, mut db) = fixture();
    // NULL arguments themselves: `every_required_argument_refuses_null`.
    for (sql, argument) in [
        (
            "SELECT secrets.put_secret_value('app/db', 'v', version_stages => '{NULL}')",
            "version_stages element",
        ),
        (
            "SELECT secrets.untag_secret('app/db', '{NULL}')",
            "tag_keys element",
        ),
        (
            "SELECT secrets.grant_access('app/db', 'secrets_user', '{get,NULL}')",
            "actions element",
        ),
        (
            "SELECT secrets.request_access('app/db', '{NULL}', '1 hour', 'why')",
            "actions element",
        ),
    ] {
        refused(
            &mut db,
            sql,
            &[],
            "22004",
            &format!("argument {argument} must not be NULL"),
        );
    }
    refused(
        &mut db,
        "SELECT secrets.get_random_password(0)",
        &[],
        "22023",
        "between 1 and 4096",
    );
    refused(
        &mut db,
        "SELECT secrets.get_random_password(4097)",
        &[],
        "22023",
        "between 1 and 4096",
    );
    refused(
        &mut db,
        "SELECT secrets.get_random_password(3)",
        &[],
        "22023",
        "too short",
    );
    refused(
        &mut db,
        "SELECT secrets.get_random_password(8, exclude_numbers => true, exclude_punctuation => true, exclude_uppercase => true, exclude_lowercase => true)",
        &[],
        "22023",
        "no character",
    );
    let too_many: Vec<String> = (0..101).map(|i| format!("n{i}")).collect();
    refused(
        &mut db,
        "SELECT * FROM secrets.batch_get_secret_value($1)",
        &[&too_many],
        "54000",
        "at most 100 names",
    );
    // A NULL element is one failed row, not a failed batch.
    let rows = db
        .query(
            "SELECT error, sqlstate FROM secrets.batch_get_secret_value(ARRAY[NULL, 'app/db'])",
            &[],
        )
        .unwrap();
    assert_eq!(
        rows[0].get::<_, Option<String>>(1).as_deref(),
        Some("22004")
    );
    assert_eq!(rows[1].get::<_, Option<String>>(1), None);
}

/// A value of `sql_type` that passes every check but the one under test.
fn sample(argument: &str, sql_type: &str) -> &'static str {
    match (argument, sql_type) {
        ("action", _) => "'get'",
        ("kind", _) => "'first_read'",
        ("version_stage", _) => "'CURRENT'",
        ("tag_keys", _) => "'{team}'",
        (_, "text") => "'app/db'",
        (_, "text[]") => "'{get}'",
        (_, "regrole") => "'secrets_user'",
        (_, "uuid") => "gen_random_uuid()",
        (_, "jsonb") => "'{}'",
        (_, "interval") => "'1 hour'",
        (_, "integer") => "7",
        (_, "boolean") => "false",
        (_, "timestamp with time zone") => "now() + interval '1 hour'",
        (_, "bytea") => "'\\x00'",
        other => panic!("no sample for {other:?}"),
    }
}

/// Every argument of every function in the schema refuses NULL with 22004 naming it, unless
/// NULL is its default (an optional argument), and nothing changes: found in the catalog, so
/// a function added later is covered without a line here.
#[test]
fn every_required_argument_refuses_null() {
    let (_cluster, mut db) = fixture();
    let arguments = db
        .query(
            "SELECT p.proname::text, a.name, format_type(a.type, NULL),
                    pg_get_function_arg_default(p.oid, a.position::int)
             FROM pg_proc p,
                  unnest(p.proargnames[1:p.pronargs], p.proargtypes::oid[])
                      WITH ORDINALITY AS a(name, type, position)
             WHERE p.pronamespace = 'secrets'::regnamespace
               -- View predicates: NULL reads as no access, as SQL's three-valued logic has it.
               AND p.proname NOT IN ('may_describe', 'may_read_audit')
             ORDER BY 1, a.position",
            &[],
        )
        .unwrap();
    let arguments: Vec<(String, String, String, Option<String>)> = arguments
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
        .collect();
    let mut checked = 0;
    for (function, argument, sql_type, default) in &arguments {
        if default.as_deref().is_some_and(|d| d.starts_with("NULL")) {
            continue;
        }
        // The function's other required arguments get a sample; those with defaults keep them.
        // A write needs exactly one of its two optional values.
        let value = ["create_secret", "put_secret_value"]
            .contains(&function.as_str())
            .then(|| "secret_string => 'v'".to_string());
        let others: Vec<String> = arguments
            .iter()
            .filter(|(f, a, _, d)| f == function && a != argument && d.is_none())
            .map(|(_, a, t, _)| format!("{a} => {}::{t}", sample(a, t)))
            .chain(value)
            .collect();
        let call = format!(
            "SELECT secrets.{function}({})",
            others
                .into_iter()
                .chain([format!("{argument} => NULL::{sql_type}")])
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Shown when the test fails: which call it was.
        eprintln!("{call}");
        refused(
            &mut db,
            &call,
            &[],
            "22004",
            &format!("argument {argument} must not be NULL"),
        );
        checked += 1;
    }
    assert!(checked >= 60, "only {checked} arguments found");
}

/// Each length or range limit just inside and just beyond: the value inside is taken, the one
/// beyond refused with 22023 and nothing changed.
#[test]
fn limits_just_inside_and_just_beyond() {
    let (_cluster, mut db) = fixture();
    let long = |chars: usize| "a".repeat(chars);
    let put_with_token =
        "SELECT secrets.put_secret_value('app/db', 'v3', client_request_token => $1)";
    db.execute(put_with_token, &[&long(64)]).unwrap();
    let too_long = "client_request_token is 1 to 64";
    refused(&mut db, put_with_token, &[&long(65)], "22023", too_long);

    // A key id of 64 characters is looked up (and names no key here); 65 or none is refused.
    let create_with_key = "SELECT secrets.create_secret('k/1', 'v', key_id => $1)";
    refused(
        &mut db,
        create_with_key,
        &[&long(64)],
        "F0000",
        "not configured",
    );
    for key_id in [long(65), String::new(), "a b".into(), "k/1".into()] {
        refused(
            &mut db,
            create_with_key,
            &[&key_id],
            "22023",
            "key_id is 1 to 64",
        );
    }

    let put_with_stage =
        "SELECT secrets.put_secret_value('app/db', 'v4', version_stages => ARRAY[$1])";
    db.execute(put_with_stage, &[&long(256)]).unwrap();
    for stage in [long(257), String::new()] {
        refused(
            &mut db,
            put_with_stage,
            &[&stage],
            "22023",
            "a version stage is 1 to 256",
        );
    }
    refused(
        &mut db,
        "SELECT secrets.tag_secret('app/db', '{\"\": \"v\"}')",
        &[],
        "22023",
        "a tag key is 1 to 128 characters, one has 0",
    );
    // Removing a tag names it as setting one does.
    for (key, chars) in [(String::new(), 0), (long(129), 129)] {
        refused(
            &mut db,
            "SELECT secrets.untag_secret('app/db', ARRAY[$1])",
            &[&key],
            "22023",
            &format!("a tag key is 1 to 128 characters, one has {chars}"),
        );
    }
    db.execute(
        "SELECT secrets.untag_secret('app/db', ARRAY[$1])",
        &[&long(128)],
    )
    .unwrap();

    let grant = "SELECT secrets.grant_access($1, 'secrets_user', '{get}')";
    db.execute(grant, &[&long(512)]).unwrap();
    refused(
        &mut db,
        grant,
        &[&long(513)],
        "22023",
        "1 to 512 characters, not 513",
    );

    let request = "SELECT secrets.request_access('app/db', '{get}', '1 hour', $1)";
    db.execute(request, &[&long(2048)]).unwrap();
    refused(
        &mut db,
        request,
        &[&long(2049)],
        "22023",
        "reason must be 1 to 2048",
    );

    let create_rule = "SELECT secrets.create_alarm_rule($1, 'first_read')";
    db.execute(create_rule, &[&long(128)]).unwrap();
    for name in [long(129), String::new()] {
        refused(
            &mut db,
            create_rule,
            &[&name],
            "22023",
            "name is 1 to 128 characters",
        );
    }

    for (sql, words) in [
        (
            "SELECT * FROM secrets.rotation_history('app/db', 1001)",
            "max_results must be between 1 and 1000, not 1001",
        ),
        (
            "SELECT * FROM secrets.rewrap_keys(100001)",
            "batch_size must be between 1 and 100000, not 100001",
        ),
        (
            "SELECT secrets.purge_audit_log('1 month')",
            "an interval of days, hours, minutes or seconds",
        ),
    ] {
        refused(&mut db, sql, &[], "22023", words);
    }
    db.execute(
        "SELECT * FROM secrets.rotation_history('app/db', 1000)",
        &[],
    )
    .unwrap();

    let password = "SELECT secrets.get_random_password(exclude_characters => $1)";
    db.execute(password, &[&"!".repeat(4096)]).unwrap();
    refused(
        &mut db,
        password,
        &[&"!".repeat(4097)],
        "22023",
        "at most 4096 characters, not 4097",
    );

    for (filter, most) in [("name_prefix", 512), ("tag_key", 128), ("tag_value", 256)] {
        let list = format!("SELECT count(*) FROM secrets.list_secrets({filter} => $1)");
        db.query_one(&list, &[&long(most)]).unwrap();
        refused(
            &mut db,
            &list,
            &[&long(most + 1)],
            "22023",
            &format!("{filter} is at most {most} characters, not {}", most + 1),
        );
    }

    // Each limit's own value is accepted (its side beyond is refused in the tests above and
    // in rotation.rs).
    db.execute(
        "SELECT secrets.create_secret('edge/description', 'v', description => $1)",
        &[&long(2048)],
    )
    .unwrap();
    db.execute(
        "SELECT secrets.tag_secret('edge/description', jsonb_build_object($1::text, $2::text))",
        &[&long(128), &long(256)],
    )
    .unwrap();
    let password: String = db
        .query_one("SELECT secrets.get_random_password(4096)", &[])
        .unwrap()
        .get(0);
    assert_eq!(password.len(), 4096);
    let names: Vec<String> = (0..100).map(|i| format!("edge/missing/{i}")).collect();
    let rows = db
        .query(
            "SELECT * FROM secrets.batch_get_secret_value($1)",
            &[&names],
        )
        .unwrap();
    assert_eq!(rows.len(), 100);
    for duration in ["60 seconds", "30 days"] {
        db.execute(
            "SELECT secrets.request_access('app/db', '{get}', $1::text::interval, 'edge')",
            &[&duration],
        )
        .unwrap();
    }
    db.execute("SELECT secrets.purge_audit_log('36500 days')", &[])
        .unwrap();

    // A resource policy of 20,480 bytes of JSON is stored; one byte more is refused.
    let policy = |bytes: usize| {
        let frame = r#"{"statements":[{"effect":"allow","principals":["secrets_user"],"actions":["get"],"conditions":{"application_name":"PAD"}}]}"#;
        frame.replace("PAD", &"a".repeat(bytes + 3 - frame.len()))
    };
    let put_policy = "SELECT secrets.put_resource_policy('app/db', $1::text::jsonb)";
    db.execute(put_policy, &[&policy(20_480)]).unwrap();
    refused(
        &mut db,
        put_policy,
        &[&policy(20_481)],
        "22023",
        "at most 20480 bytes of JSON, this one has 20481",
    );
}

/// Settings out of their range are refused by PostgreSQL before they are stored, so a typo in
/// `ALTER SYSTEM` cannot stop the worker or the trail; a session cannot turn the trail off or
/// invent a `pg_secrets.` setting.
#[test]
fn settings_out_of_range_are_refused() {
    let (_cluster, mut db) = fixture();
    for (setting, value) in [
        ("worker_naptime", "0"),
        ("worker_naptime", "3601"),
        ("min_rotation_interval", "0"),
        ("rotation_retry_delay", "0"),
        ("rotation_retry_delay", "3601"),
        ("audit_min_retention", "-1"),
        ("rotator_timeout", "0"),
        ("rotator_timeout", "3601"),
        ("audit_queue_wait", "-1"),
        ("audit_queue_wait", "600001"),
        ("alarm_interval", "0"),
        ("alarm_interval", "3601"),
        ("rotator_sslmode", "sometimes"),
        ("audit", "maybe"),
    ] {
        assert_sql_error(
            db.batch_execute(&format!(
                "ALTER SYSTEM SET pg_secrets.{setting} = '{value}'"
            )),
            "22023",
            &format!("pg_secrets.{setting}"),
        );
    }
    let auto_conf: String = db
        .query_one("SELECT pg_read_file('postgresql.auto.conf')", &[])
        .unwrap()
        .get(0);
    assert!(!auto_conf.contains("pg_secrets."), "{auto_conf}");
    assert_sql_error(
        db.batch_execute("SET pg_secrets.audit = off"),
        "55P02",
        "cannot be changed now",
    );
    assert_sql_error(
        db.batch_execute("SET pg_secrets.nonsense = 1"),
        "42602",
        "invalid configuration parameter name",
    );
}

#[test]
fn unknown_master_key_id_and_missing_preload() {
    let (_cluster, mut db) = fixture();
    refused(
        &mut db,
        "SELECT secrets.create_secret('k', 'v', key_id => 'nope')",
        &[],
        "F0000",
        "master key \"nope\" is not configured",
    );
    refused(
        &mut db,
        "SELECT secrets.update_secret('app/db', key_id => 'nope')",
        &[],
        "F0000",
        "not configured",
    );

    let bare = Cluster::start_bare(
        KeySource::File(pg_secrets_e2e::TEST_KEY.into()),
        &["shared_preload_libraries = ''"],
    );
    let db_error = assert_sql_error(
        bare.superuser()
            .batch_execute("CREATE EXTENSION pg_secrets"),
        "55000",
        "must be loaded via shared_preload_libraries",
    );
    assert!(db_error
        .hint()
        .unwrap_or_default()
        .contains("postgresql.conf"));
}

/// A library and tables that disagree (a superuser's edit, or a library installed over tables
/// of another version): reads name the table and what is missing, as `55000`, never a panic.
#[test]
fn tables_the_library_does_not_recognise() {
    let (_cluster, mut db) = fixture();
    let version: String = db
        .query_one(
            "SELECT version_id::text FROM secrets.list_secret_version_ids('app/db') LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    let by_version = format!("SELECT secrets.get_secret_value('app/db', '{version}')");
    for (change, undo, read, words) in [
        (
            "ALTER TABLE secrets.secret RENAME COLUMN current_ciphertext TO elsewhere",
            "ALTER TABLE secrets.secret RENAME COLUMN elsewhere TO current_ciphertext",
            "SELECT secrets.get_secret_value('app/db')",
            "table secrets.secret is not as this pg_secrets library writes it: it has no column current_ciphertext",
        ),
        (
            "ALTER TABLE secrets.secret_version RENAME TO moved_away",
            "ALTER TABLE secrets.moved_away RENAME TO secret_version",
            by_version.as_str(),
            "table secrets.secret_version is not as this pg_secrets library writes it: it does not exist",
        ),
        // Read as text, a `name` (64 bytes in place) or a number would be taken for a pointer.
        (
            "ALTER TABLE secrets.secret ALTER COLUMN current_key_id TYPE name",
            "ALTER TABLE secrets.secret ALTER COLUMN current_key_id TYPE text",
            "SELECT secrets.get_secret_value('app/db')",
            "table secrets.secret is not as this pg_secrets library writes it: its column current_key_id is not of the type the library reads",
        ),
        (
            "ALTER TABLE secrets.secret_version ALTER COLUMN key_id TYPE bigint USING 0",
            "ALTER TABLE secrets.secret_version ALTER COLUMN key_id TYPE text USING 'test'",
            by_version.as_str(),
            "table secrets.secret_version is not as this pg_secrets library writes it: its column key_id is not of the type the library reads",
        ),
    ] {
        // Read first, so that this session has the table's columns cached: the change must
        // reach that cache.
        assert_eq!(db.query(read, &[]).unwrap().len(), 1, "{read}");
        db.batch_execute(change).unwrap();
        assert_sql_error(db.query(read, &[]), "55000", words);
        db.batch_execute(undo).unwrap();
        assert_eq!(db.query(read, &[]).unwrap().len(), 1, "{read}");
    }

    // Read by a query rather than the read path, a column of another type is the same
    // mismatch: 55000, not an internal error.
    db.batch_execute("ALTER TABLE secrets.version_label ALTER COLUMN label TYPE name")
        .unwrap();
    let row = db
        .query_one(
            "SELECT sqlstate, error FROM secrets.batch_get_secret_value(ARRAY['app/db'])",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, Option<&str>>(0), Some("55000"));
    let error: String = row.get(1);
    assert!(
        error.starts_with("the extension's tables are not as this pg_secrets library reads them"),
        "{error}"
    );
    db.batch_execute("ALTER TABLE secrets.version_label ALTER COLUMN label TYPE text")
        .unwrap();

    // A NULL where the schema says NOT NULL, written by a superuser who dropped the
    // constraint: 55000 naming what is wrong, never a panic. The read path names the table and
    // column; a query's row says which of its columns.
    db.batch_execute(
        "ALTER TABLE secrets.secret ALTER COLUMN owner_role DROP NOT NULL;
         UPDATE secrets.secret SET owner_role = NULL WHERE name = 'app/db';",
    )
    .unwrap();
    assert_sql_error(
        db.query("SELECT secrets.get_secret_value('app/db')", &[]),
        "55000",
        "table secrets.secret is not as this pg_secrets library writes it: column owner_role holds a NULL",
    );
    db.batch_execute(
        "CREATE ROLE nulled_grantee;
         SELECT secrets.grant_access('app/*', 'nulled_grantee', '{get}');
         ALTER TABLE secrets.access_grant ALTER COLUMN granted_at DROP NOT NULL;
         UPDATE secrets.access_grant SET granted_at = NULL;",
    )
    .unwrap();
    assert_sql_error(
        db.query("SELECT * FROM secrets.list_access_grants()", &[]),
        "55000",
        "the extension's tables are not as this pg_secrets library reads them: a stored row has \
         NULL in column 7 of a pg_secrets query, where its table does not allow one",
    );
}

/// A role given as a number no role has is refused, not judged as a role without
/// memberships; an unknown request state is refused, not an empty list.
#[test]
fn roles_that_do_not_exist_and_unknown_request_states() {
    let (_cluster, mut db) = fixture();
    for sql in [
        "SELECT * FROM secrets.check_access(999999::oid::regrole, 'get', 'app/db')",
        "SELECT * FROM secrets.rotate_secrets_accessible_by(999999::oid::regrole)",
    ] {
        refused(
            &mut db,
            sql,
            &[],
            "22023",
            "role with OID 999999 does not exist",
        );
    }
    refused(
        &mut db,
        "SELECT * FROM secrets.list_access_requests('Pending')",
        &[],
        "22023",
        "unknown request state \"Pending\"; states are pending, approved and denied",
    );
}

/// Store-wide functions are refused to a role that does not hold every secret, and requests
/// that name nothing, or a requester since dropped, are refused; nothing changes.
#[test]
fn store_wide_functions_and_requests_that_name_nothing() {
    let (cluster, mut db) = fixture();
    db.batch_execute(
        "CREATE ROLE plain_user LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE gone LOGIN PASSWORD 'pw' IN ROLE secrets_user;",
    )
    .unwrap();
    let mut plain = cluster.connect("plain_user", "pw");
    for (sql, words) in [
        (
            "SELECT secrets.purge_deleted_secrets()",
            "purging deleted secrets is for superusers and secrets_admin",
        ),
        (
            "SELECT * FROM secrets.rewrap_keys()",
            "rewrapping data keys is for superusers and secrets_admin",
        ),
        (
            "SELECT * FROM secrets.key_status()",
            "reading key status is for superusers, secrets_admin and secrets_reader",
        ),
    ] {
        let before = store_state(&mut db);
        assert_sql_error(
            plain.query(sql, &[]),
            "42501",
            &format!("permission denied: {words}"),
        );
        assert_eq!(store_state(&mut db), before, "{sql}");
    }
    refused(
        &mut db,
        "SELECT secrets.approve_access_request('00000000-0000-0000-0000-000000000001')",
        &[],
        "42704",
        "there is no access request 00000000-0000-0000-0000-000000000001",
    );
    let mut gone = cluster.connect("gone", "pw");
    let request: String = gone
        .query_one(
            "SELECT secrets.request_access('app/db', '{get}', '1 hour', 'on call')::text",
            &[],
        )
        .unwrap()
        .get(0);
    drop(gone);
    db.batch_execute("DROP ROLE gone").unwrap();
    refused(
        &mut db,
        &format!("SELECT secrets.approve_access_request('{request}')"),
        &[],
        "22023",
        "does not exist",
    );
    let current = current_version_id(&mut db, "app/db");
    refused(
        &mut db,
        &format!(
            "SELECT secrets.update_secret_version_stage('app/db', 'CURRENT', '{current}', \
             remove_from_version_id => '00000000-0000-0000-0000-000000000002')"
        ),
        &[],
        "22023",
        "stage CURRENT of secret \"app/db\" is not on version 00000000-0000-0000-0000-000000000002",
    );
}

/// Two sessions creating one name at once: the second, which waits for the first's row,
/// gets `42710` as if it had come after, not a unique violation (`23505`, which is
/// `client_request_token`'s code).
#[test]
fn a_name_created_by_two_sessions_at_once_is_42710_for_the_second() {
    let (cluster, mut first) = fixture();
    first
        .batch_execute("BEGIN; SELECT secrets.create_secret('race/name', 'one')")
        .unwrap();
    let mut second = cluster.superuser();
    let waiting = std::thread::spawn(move || {
        second
            .query_one("SELECT secrets.create_secret('race/name', 'two')", &[])
            .map(|_| ())
    });
    cluster.wait_for_lock_waiters("race/name", 1);
    first.batch_execute("COMMIT").unwrap();
    assert_sql_error(waiting.join().unwrap(), "42710", "already exists");
    let value: String = first
        .query_one("SELECT secrets.get_secret_value('race/name')", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, "one");
}

/// A PostgreSQL error raised under the extension's Rust code (here a write refused in a
/// read-only transaction, raised inside an SPI call) reaches the client as PostgreSQL raised
/// it: no Rust backtrace in its DETAIL, although the harness starts every server with
/// `RUST_BACKTRACE=1`, as a developer's shell often has it.
#[test]
fn errors_raised_through_rust_carry_no_backtrace() {
    let (_cluster, mut db) = fixture();
    db.batch_execute("SELECT secrets.create_secret('ro/db', 'v1')")
        .unwrap();
    let before = store_state(&mut db);
    let mut tx = db.build_transaction().read_only(true).start().unwrap();
    let error = tx
        .query_one("SELECT secrets.put_secret_value('ro/db', 'v2')::text", &[])
        .expect_err("a write in a read-only transaction");
    let error = error.as_db_error().expect("a server error");
    assert_eq!(error.code().code(), "25006", "{error:?}");
    assert!(
        error.detail().is_none_or(|detail| !detail.contains("pgrx")),
        "{:?}",
        error.detail()
    );
    drop(tx);
    assert_eq!(store_state(&mut db), before);
}
