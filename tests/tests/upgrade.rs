//! Upgrading: a cluster that runs an earlier release of the extension updates in place with
//! `ALTER EXTENSION pg_secrets UPDATE`, keeps every secret, grant and record, and ends with the
//! schema a fresh install of the current version has, object for object.

use pg_secrets_e2e::{assert_sql_error, first_column, Client, Cluster, KeySource, TEST_KEY};

/// Every object of the extension as text, names instead of OIDs, so that two clusters can be
/// compared: functions (arguments with names and defaults, result, symbol or body, settings,
/// privileges, kind, volatility, parallel safety, strictness, cost, comment), relations
/// (privileges, options, row-level security, persistence, comment), the initial privileges
/// pg_dump compares with, columns (type, NOT NULL, privileges, default), constraints, indexes,
/// views, policies, triggers, what pg_dump dumps, extension membership, and the extension's
/// roles with their attributes and memberships.
const SCHEMA_FINGERPRINT: &str = r#"
SELECT kind || ': ' || what FROM (
  SELECT 'function', p.proname || '(' || pg_get_function_arguments(p.oid) || ') -> '
           || pg_get_function_result(p.oid) || ' ' || p.prosrc || ' '
           || coalesce(p.proconfig::text, '') || ' ' || coalesce(p.proacl::text, '') || ' '
           || p.prokind::text || p.prosecdef::text || p.provolatile::text
           || p.proparallel::text || p.proisstrict::text || p.proleakproof::text || ' '
           || p.procost || ' ' || p.prorows || ' '
           || coalesce(obj_description(p.oid, 'pg_proc'), '')
    FROM pg_proc p WHERE p.pronamespace = 'secrets'::regnamespace
  UNION ALL
  SELECT 'relation', c.relname || ' ' || c.relkind::text || ' ' || coalesce(c.relacl::text, '') || ' '
           || coalesce(c.reloptions::text, '') || ' ' || c.relrowsecurity::text || c.relforcerowsecurity::text
           || ' ' || c.relpersistence::text || ' ' || coalesce(obj_description(c.oid, 'pg_class'), '')
    FROM pg_class c WHERE c.relnamespace = 'secrets'::regnamespace
  UNION ALL
  SELECT 'initial privileges', pg_describe_object(i.classoid, i.objoid, i.objsubid) || ' '
           || i.privtype::text || ' ' || i.initprivs::text
    FROM pg_init_privs i
    WHERE i.classoid = 'pg_proc'::regclass
          AND i.objoid IN (SELECT oid FROM pg_proc WHERE pronamespace = 'secrets'::regnamespace)
       OR i.classoid = 'pg_class'::regclass
          AND i.objoid IN (SELECT oid FROM pg_class WHERE relnamespace = 'secrets'::regnamespace)
       OR i.classoid = 'pg_namespace'::regclass AND i.objoid = 'secrets'::regnamespace
  UNION ALL
  SELECT 'column', c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
           || ' ' || a.attnotnull::text || ' ' || coalesce(a.attacl::text, '') || ' '
           || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relnamespace = 'secrets'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'constraint', conrelid::regclass::text || ' ' || conname || ' ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace = 'secrets'::regnamespace
  UNION ALL
  SELECT 'index', pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
    WHERE c.relnamespace = 'secrets'::regnamespace
  UNION ALL
  SELECT 'view', c.relname || ' ' || pg_get_viewdef(c.oid)
    FROM pg_class c WHERE c.relnamespace = 'secrets'::regnamespace AND c.relkind = 'v'
  UNION ALL
  SELECT 'policy', tablename || ' ' || policyname || ' ' || permissive || ' ' || cmd || ' '
           || roles::text || ' ' || coalesce(qual, '') || ' ' || coalesce(with_check, '')
    FROM pg_policies WHERE schemaname = 'secrets'
  UNION ALL
  SELECT 'trigger', pg_get_triggerdef(t.oid) || ' ' || t.tgenabled::text
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
    WHERE c.relnamespace = 'secrets'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT 'dumped', unnest(extconfig)::regclass::text || ' ' || unnest(extcondition)
    FROM pg_extension WHERE extname = 'pg_secrets'
  UNION ALL
  SELECT 'member', pg_describe_object(classid, objid, objsubid)
    FROM pg_depend
    WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
      AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_secrets')
  UNION ALL
  SELECT 'schema', coalesce(nspacl::text, '') FROM pg_namespace WHERE nspname = 'secrets'
  UNION ALL
  SELECT 'role', r.rolname || ' ' || r.rolcanlogin::text || r.rolinherit::text
           || r.rolsuper::text || r.rolcreaterole::text || r.rolcreatedb::text
           || r.rolreplication::text || r.rolbypassrls::text || ' ' || array(
           SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
           WHERE m.member = r.oid ORDER BY 1)::text
    FROM pg_roles r WHERE r.rolname LIKE 'secrets\_%'
) objects(kind, what) ORDER BY 1
"#;

fn fingerprint(db: &mut Client) -> Vec<String> {
    first_column(db, SCHEMA_FINGERPRINT)
}

fn version(db: &mut Client) -> String {
    db.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_secrets'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn an_earlier_release_updates_in_place_to_the_current_schema() {
    let fresh = Cluster::start();
    let current = version(&mut fresh.superuser());
    let expected = fingerprint(&mut fresh.superuser());

    let cluster = Cluster::start_bare(KeySource::File(TEST_KEY.into()), &[]);
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE EXTENSION pg_secrets VERSION '0.1.0';
         CREATE ROLE app LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         SELECT secrets.create_secret('prod/db', 'first');
         SELECT secrets.put_secret_value('prod/db', 'second');
         SELECT secrets.create_secret('prod/other', 'hidden');
         SELECT secrets.grant_access('prod/db', 'app', '{get,describe}');",
    )
    .unwrap();
    assert_eq!(version(&mut db), "0.1.0");
    let before_update: String = db
        .query_one("SELECT secrets.get_secret_value('prod/db')", &[])
        .unwrap()
        .get(0);
    assert_eq!(before_update, "second");
    assert_ne!(
        fingerprint(&mut db),
        expected,
        "0.1.0 differs from the current version"
    );

    db.batch_execute("ALTER EXTENSION pg_secrets UPDATE")
        .unwrap();
    assert_eq!(version(&mut db), current);
    let updated = fingerprint(&mut db);
    let missing: Vec<&String> = expected.iter().filter(|o| !updated.contains(o)).collect();
    let extra: Vec<&String> = updated.iter().filter(|o| !expected.contains(o)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "after the update, the schema differs from a fresh install's.\n\
         missing: {missing:#?}\nextra: {extra:#?}"
    );

    // Secrets, versions, grants and the trail survive, and the new behaviour is in place.
    let mut app = cluster.connect("app", "pw");
    let read = |client: &mut Client, stage: &str| -> String {
        client
            .query_one(
                "SELECT secrets.get_secret_value('prod/db', version_stage => $1)",
                &[&stage],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(read(&mut app, "CURRENT"), "second");
    assert_eq!(read(&mut db, "PREVIOUS"), "first");
    let listed: Vec<String> = first_column(&mut app, "SELECT name FROM secrets.secret_list");
    assert_eq!(listed, vec!["prod/db".to_string()]);
    assert_sql_error(
        app.query("SELECT name FROM secrets.secret", &[]),
        "42501",
        "permission denied",
    );
    let verified: bool = db
        .query_one("SELECT ok FROM secrets.verify_audit_log()", &[])
        .unwrap()
        .get(0);
    assert!(verified);
}
