//! The proofs the store's promises rest on: tampering is detected, a wrong or missing master
//! key is named as such, no plaintext reaches disk, it scales to 10,000 secrets, and a
//! pg_dump restores into a fresh cluster with the same key.

use pg_secrets_e2e::{assert_sql_error, Cluster, KeySource, TEST_KEY};
use std::fs;
use std::path::Path;

fn get(db: &mut postgres::Client, name: &str) -> Result<String, postgres::Error> {
    db.query_one("SELECT secrets.get_secret_value($1)", &[&name])
        .map(|row| row.get(0))
}

#[test]
fn tampered_ciphertext_fails_with_an_integrity_error() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('flip/value', 'v');
         SELECT secrets.create_secret('flip/key', 'v');",
    )
    .unwrap();
    // One bit of the value's ciphertext, and one bit of the wrapped data key.
    db.batch_execute(
        "UPDATE secrets.secret_version v SET ciphertext = set_byte(ciphertext, 20, get_byte(ciphertext, 20) # 1)
           FROM secrets.secret s WHERE s.id = v.secret_id AND s.name = 'flip/value';
         UPDATE secrets.secret_version v SET wrapped_key = set_byte(wrapped_key, 15, get_byte(wrapped_key, 15) # 1)
           FROM secrets.secret s WHERE s.id = v.secret_id AND s.name = 'flip/key';",
    )
    .unwrap();
    let error = assert_sql_error(
        get(&mut db, "flip/value"),
        "XX001",
        "integrity check failed for secret \"flip/value\"",
    );
    assert!(error.hint().is_some());
    assert_sql_error(get(&mut db, "flip/key"), "XX001", "integrity check failed");

    // Reads of CURRENT use the secret row's copy of the version: flipped there alone, with
    // the triggers that keep it off, or copied from another secret, it fails the same way.
    db.batch_execute(
        "SELECT secrets.create_secret('flip/copy', 'v');
         SELECT secrets.create_secret('flip/source', 'v');
         SELECT secrets.create_secret('flip/target', 'v');
         SET session_replication_role = replica;
         UPDATE secrets.secret SET current_ciphertext =
                set_byte(current_ciphertext, 3, get_byte(current_ciphertext, 3) # 1)
          WHERE name = 'flip/copy';
         RESET session_replication_role;
         UPDATE secrets.secret sb SET current_wrapped_key = sa.current_wrapped_key,
                current_ciphertext = sa.current_ciphertext
           FROM secrets.secret sa WHERE sa.name = 'flip/source' AND sb.name = 'flip/target';",
    )
    .unwrap();
    assert_sql_error(get(&mut db, "flip/copy"), "XX001", "integrity check failed");
    assert_sql_error(
        get(&mut db, "flip/target"),
        "XX001",
        "integrity check failed",
    );
    assert_eq!(get(&mut db, "flip/source").unwrap(), "v");
}

#[test]
fn a_version_moved_or_copied_to_another_secret_fails() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('a', 'value of a');
         SELECT secrets.create_secret('b', 'value of b');
         SELECT secrets.create_secret('c', 'value of c');",
    )
    .unwrap();
    // Copy a's sealed columns over b's current version.
    db.batch_execute(
        "UPDATE secrets.secret_version vb SET wrapped_key = va.wrapped_key, ciphertext = va.ciphertext
           FROM secrets.secret_version va, secrets.secret sa, secrets.secret sb
          WHERE sa.name = 'a' AND va.secret_id = sa.id AND sb.name = 'b' AND vb.secret_id = sb.id",
    )
    .unwrap();
    assert_sql_error(
        get(&mut db, "b"),
        "XX001",
        "integrity check failed for secret \"b\"",
    );

    // Move a's version row, labels and all, under c (with triggers off, as only a superuser can).
    db.batch_execute(
        "SET session_replication_role = replica;
         DELETE FROM secrets.version_label l USING secrets.secret s WHERE l.secret_id = s.id AND s.name = 'c';
         UPDATE secrets.version_label l SET secret_id = (SELECT id FROM secrets.secret WHERE name = 'c')
           FROM secrets.secret s WHERE l.secret_id = s.id AND s.name = 'a';
         UPDATE secrets.secret_version v SET secret_id = (SELECT id FROM secrets.secret WHERE name = 'c')
           FROM secrets.secret s WHERE v.secret_id = s.id AND s.name = 'a';
         RESET session_replication_role;",
    )
    .unwrap();
    assert_sql_error(
        get(&mut db, "c"),
        "XX001",
        "integrity check failed for secret \"c\"",
    );
}

/// `pg_secrets.key_command`: the key printed by a program run at server start (a secret
/// manager's command line, a KMS decrypt). A program that fails or prints no UTF-8, or the
/// setting given together with `key_file`, leaves no key loaded, and every call says why.
#[test]
fn a_key_command_loads_the_key_and_its_failures_are_named() {
    let mut cluster = Cluster::start();
    cluster
        .superuser()
        .batch_execute("SELECT secrets.create_secret('k', 'v')")
        .unwrap();
    let script = |name: &str, body: &str| -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = cluster.dir().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        path.display().to_string()
    };
    let printing = script("print-key.sh", &format!("echo '{TEST_KEY}'"));
    let not_utf8 = script("print-garbage.sh", "printf '\\377\\376'");
    let setting = |command: &str| format!("pg_secrets.key_command = '{command}'");

    // configure() gives the directory, scripts included, to the server's user.
    cluster.configure(KeySource::None, &[&setting(&printing)]);
    cluster.restart();
    assert_eq!(get(&mut cluster.superuser(), "k").unwrap(), "v");

    for (command, why) in [
        (
            "exit 3".to_string(),
            "pg_secrets.key_command failed: exit status: 3",
        ),
        (
            not_utf8,
            "pg_secrets.key_command printed something that is not UTF-8",
        ),
    ] {
        cluster.configure(KeySource::None, &[&setting(&command)]);
        cluster.restart();
        assert_sql_error(get(&mut cluster.superuser(), "k"), "F0000", why);
    }
    cluster.configure(KeySource::File(TEST_KEY.into()), &[&setting(&printing)]);
    cluster.restart();
    assert_sql_error(
        get(&mut cluster.superuser(), "k"),
        "F0000",
        "set only one of pg_secrets.key_file and pg_secrets.key_command",
    );
    let hex_key = TEST_KEY.split(':').nth(1).unwrap();
    assert!(
        !cluster.server_log().contains(hex_key),
        "the key never reaches the server log"
    );
}

#[test]
fn wrong_missing_and_unreadable_master_keys_are_named() {
    let mut cluster = Cluster::start();
    cluster
        .superuser()
        .batch_execute("SELECT secrets.create_secret('k', 'v')")
        .unwrap();

    let other_key = "test:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
    cluster.configure(KeySource::File(other_key.into()), &[]);
    cluster.restart();
    let error = assert_sql_error(
        get(&mut cluster.superuser(), "k"),
        "F0000",
        "the configured master key \"test\" is not the one these secrets were encrypted with",
    );
    assert!(error.hint().unwrap_or_default().contains("restart"));
    // Writing under the wrong key is refused just the same, before anything is stored.
    assert_sql_error(
        cluster
            .superuser()
            .query("SELECT secrets.put_secret_value('k', 'v2')", &[]),
        "F0000",
        "not the one",
    );

    // A key file without the key a secret's versions were written under (the old key dropped
    // too early in a key rotation) names the key and the secret that needs it.
    let only_a_new_key = "new:ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";
    cluster.configure(KeySource::File(only_a_new_key.into()), &[]);
    cluster.restart();
    let error = assert_sql_error(
        get(&mut cluster.superuser(), "k"),
        "F0000",
        "master key \"test\" is not configured (needed by secret \"k\")",
    );
    assert!(error
        .hint()
        .unwrap_or_default()
        .contains("pg_secrets.key_file"));

    cluster.configure(KeySource::None, &[]);
    cluster.restart();
    let error = assert_sql_error(
        get(&mut cluster.superuser(), "k"),
        "F0000",
        "no master key is loaded",
    );
    assert!(error
        .hint()
        .unwrap_or_default()
        .contains("pg_secrets.key_file"));
    assert!(cluster.server_log().contains("no master key loaded"));

    // A key file that is not there is named.
    let absent = cluster.dir().join("absent.key");
    cluster.configure(
        KeySource::None,
        &[&format!("pg_secrets.key_file = '{}'", absent.display())],
    );
    cluster.restart();
    assert_sql_error(
        get(&mut cluster.superuser(), "k"),
        "F0000",
        &format!("cannot read pg_secrets.key_file \"{}\"", absent.display()),
    );

    // A key file others can read is refused, with the reason.
    cluster.configure(KeySource::File(TEST_KEY.into()), &[]);
    let key_file = cluster.dir().join("master.key");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
    cluster.restart();
    assert_sql_error(
        get(&mut cluster.superuser(), "k"),
        "F0000",
        "readable by group or others",
    );

    // And with the right key everything is back.
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    cluster.restart();
    assert_eq!(get(&mut cluster.superuser(), "k").unwrap(), "v");
    // SQL never shows the key: the settings are superuser-only and hold a path, not a key.
    let shown: String = cluster
        .superuser()
        .query_one(
            "SELECT string_agg(setting, ',') FROM pg_settings WHERE name LIKE 'pg_secrets.%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!shown.contains("00112233"), "{shown}");
}

fn files_containing(root: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = fs::read(&path) {
                if bytes.windows(needle.len()).any(|window| window == needle) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

#[test]
fn no_plaintext_reaches_heap_wal_or_logs() {
    let cluster = Cluster::start_with(
        KeySource::File(TEST_KEY.into()),
        &[
            "log_statement = 'all'",
            "log_min_duration_statement = 0",
            "log_min_error_statement = 'info'",
        ],
    );
    let marker = format!("PLAINTEXT-MARKER-{}", std::process::id());
    let name_marker = format!("NAME-MARKER-{}", std::process::id());
    let mut db = cluster.superuser();
    // An application passes values as bind parameters, as the README asks.
    db.execute(
        "SELECT secrets.create_secret($1, $2)",
        &[&name_marker, &marker],
    )
    .unwrap();
    db.execute(
        "SELECT secrets.put_secret_value($1, $2)",
        &[&name_marker, &format!("{marker}-2")],
    )
    .unwrap();
    assert_eq!(get(&mut db, &name_marker).unwrap(), format!("{marker}-2"));
    // Neither postgresql.conf, ALTER SYSTEM nor ALTER ROLE brings parameter logging back: the
    // values are accepted and have no effect.
    for statement in [
        "ALTER SYSTEM SET log_parameter_max_length = -1",
        "ALTER SYSTEM SET log_parameter_max_length_on_error = -1",
        "ALTER SYSTEM SET debug_print_plan = on",
        "CREATE ROLE app LOGIN PASSWORD 'pw-app' IN ROLE secrets_admin",
        "ALTER ROLE app SET log_parameter_max_length_on_error = -1",
        "SELECT pg_reload_conf(), pg_sleep(0.5)",
    ] {
        db.batch_execute(statement).unwrap();
    }
    let mut app = cluster.connect("app", "pw-app");
    // A session's SET outranks them, and any role may set the limit on error: refused, for
    // a superuser too, however it is set; 0 is still accepted.
    for (as_superuser, statement) in [
        (false, "SET log_parameter_max_length_on_error = 100"),
        (
            false,
            "SELECT set_config('log_parameter_max_length_on_error', '-1', true)",
        ),
        // A custom plan holds the bound values as constants.
        (false, "SET debug_print_plan = on"),
        (false, "SET debug_print_parse = on"),
        (true, "SET debug_print_rewritten = on"),
        (true, "SET log_parameter_max_length = -1"),
        (true, "SET log_parameter_max_length_on_error = -1"),
    ] {
        let client = if as_superuser { &mut db } else { &mut app };
        let refused = assert_sql_error(
            client.batch_execute(statement),
            "42501",
            "bind parameters are kept out of the server log",
        );
        assert!(
            refused
                .hint()
                .is_some_and(|hint| hint.contains("pg_secrets.hide_statement_parameters")),
            "{refused:?}"
        );
    }
    app.batch_execute("SET log_parameter_max_length_on_error = 0; SET debug_print_plan = off")
        .unwrap();
    for client in [&mut app, &mut db] {
        for (setting, off) in [
            ("log_parameter_max_length", "0"),
            ("log_parameter_max_length_on_error", "0"),
            ("debug_print_plan", "off"),
            ("debug_print_parse", "off"),
            ("debug_print_rewritten", "off"),
        ] {
            let shown: String = client
                .query_one(&format!("SHOW {setting}"), &[])
                .unwrap()
                .get(0);
            assert_eq!(shown, off, "{setting}");
        }
    }
    // A failing statement does not log its parameters either: not in a CONTEXT line.
    for client in [&mut app, &mut db] {
        let _ = client.execute(
            "SELECT secrets.create_secret($1, $2)",
            &[&name_marker, &marker],
        );
    }
    let mut db = cluster.superuser();
    db.execute(
        "SELECT secrets.put_secret_value($1, $2)",
        &[&name_marker, &format!("{marker}-3")],
    )
    .unwrap();
    db.batch_execute("CHECKPOINT; SELECT pg_switch_wal(); CHECKPOINT;")
        .unwrap();

    // The scan works: names are not secret, so the name marker is in the heap, WAL and log
    // (once the logging collector has written every statement's line).
    cluster.wait_for_server_log();
    let with_name = files_containing(cluster.dir(), name_marker.as_bytes());
    assert!(
        with_name.iter().any(|f| f.contains("pg_wal")),
        "{with_name:?}"
    );
    assert!(
        with_name.iter().any(|f| f.contains("/log/")),
        "{with_name:?}"
    );
    assert!(
        cluster.server_log().contains("execute"),
        "log_statement logged the statements"
    );
    let with_value = files_containing(cluster.dir(), marker.as_bytes());
    for file in &with_value {
        let text = String::from_utf8_lossy(&fs::read(file).unwrap()).into_owned();
        for line in text.lines().filter(|line| line.contains(&marker)) {
            eprintln!("{file}: {line}");
        }
    }
    assert!(with_value.is_empty(), "plaintext found in {with_value:?}");
}

#[test]
fn ten_thousand_secrets_with_five_versions_each() {
    let cluster = Cluster::start_with(
        KeySource::File(TEST_KEY.into()),
        &["shared_buffers = 128MB"],
    );
    let mut db = cluster.superuser();
    db.batch_execute(
        "SELECT secrets.create_secret('bulk/' || i, 'v1-' || i) FROM generate_series(1, 10000) i;
         SELECT secrets.put_secret_value('bulk/' || i, 'v' || n || '-' || i)
           FROM generate_series(2, 5) n, generate_series(1, 10000) i ORDER BY n, i;",
    )
    .unwrap();
    let counts = db
        .query_one(
            "SELECT (SELECT count(*) FROM secrets.secret), (SELECT count(*) FROM secrets.secret_version)",
            &[],
        )
        .unwrap();
    assert_eq!(
        (counts.get::<_, i64>(0), counts.get::<_, i64>(1)),
        (10_000, 50_000)
    );
    let wrong: i64 = db
        .query_one(
            "SELECT count(*) FROM generate_series(1, 10000) i
              WHERE secrets.get_secret_value('bulk/' || i) <> 'v5-' || i
                 OR secrets.get_secret_value('bulk/' || i, version_stage => 'PREVIOUS') <> 'v4-' || i",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong, 0);
    // Every one of the 50,000 versions decrypts to what was written, read by version id.
    let wrong_versions: i64 = db
        .query_one(
            "SELECT count(*) FROM secrets.secret s
               CROSS JOIN LATERAL secrets.list_secret_version_ids(s.name, true) v
              WHERE secrets.get_secret_value(s.name, v.version_id) NOT LIKE 'v_-' || substr(s.name, 6)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(wrong_versions, 0);
}

#[test]
fn pg_dump_restores_into_a_fresh_cluster_with_the_same_key() {
    let source = Cluster::start();
    let mut db = source.superuser();
    db.batch_execute(
        "CREATE ROLE team_a NOLOGIN IN ROLE secrets_admin;
         SET ROLE team_a;
         SELECT secrets.create_secret('dump/a', 'a1', tags => '{\"t\": \"1\"}');
         SELECT secrets.put_secret_value('dump/a', 'a2');
         SELECT secrets.put_secret_value('dump/a', 'a3', version_stages => '{PENDING}');
         RESET ROLE;
         SELECT secrets.create_secret('dump/bin', secret_binary => '\\xdeadbeef');",
    )
    .unwrap();
    let dump = source.dir().join("secrets.dump");
    let output = source
        .client_program("pg_dump")
        .args(["-Fc", "-f"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let target = Cluster::start_bare(KeySource::File(TEST_KEY.into()), &[]);
    target
        .superuser()
        .batch_execute("CREATE ROLE team_a NOLOGIN")
        .unwrap();
    let output: std::process::Output = target
        .client_program("pg_restore")
        .args(["--exit-on-error", "-d", "postgres"])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut restored = target.superuser();
    assert_eq!(get(&mut restored, "dump/a").unwrap(), "a2");
    let previous: String = restored
        .query_one(
            "SELECT secrets.get_secret_value('dump/a', version_stage => 'PREVIOUS')",
            &[],
        )
        .unwrap()
        .get(0);
    let pending: String = restored
        .query_one(
            "SELECT secrets.get_secret_value('dump/a', version_stage => 'PENDING')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!((previous.as_str(), pending.as_str()), ("a1", "a3"));
    let binary: Vec<u8> = restored
        .query_one("SELECT secrets.get_secret_binary('dump/bin')", &[])
        .unwrap()
        .get(0);
    assert_eq!(binary, vec![0xde, 0xad, 0xbe, 0xef]);
    let described = |db: &mut postgres::Client| -> String {
        db.query_one(
            "SELECT (secrets.describe_secret('dump/a') - 'last_accessed_on')::text",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(
        described(&mut restored),
        described(&mut db),
        "labels, tags and owner survive"
    );
    assert!(described(&mut restored).contains("\"owner\": \"team_a\""));
}
