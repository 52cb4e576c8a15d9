//! Access control end to end: the matrix of every action against every way of holding (or not
//! holding) access, `check_access` agreeing with what happened, row-level security on the list
//! view, the approval flow, policy validation and security-definer hygiene.

use pg_secrets_e2e::{assert_sql_error, first_column, store_state, wait_until, Client, Cluster};
use std::time::Duration;

const ACTIONS: [&str; 6] = ["get", "describe", "put", "rotate", "delete", "manage"];

/// The statement that exercises each action on secret `$1`.
fn statement(action: &str) -> &'static str {
    match action {
        "get" => "SELECT secrets.get_secret_value($1)",
        "describe" => "SELECT secrets.describe_secret($1)::text",
        "put" => {
            "SELECT secrets.put_secret_value($1, '{\"username\":\"x\",\"password\":\"y\"}')::text"
        }
        "rotate" => "SELECT secrets.rotate_secret($1)::text",
        "delete" => "SELECT secrets.delete_secret($1, 7)::text",
        "manage" => "SELECT secrets.tag_secret($1, '{\"checked\": \"yes\"}')::text",
        _ => unreachable!(),
    }
}

/// Runs `action` on `secret` as `role` in a transaction that is rolled back, so every cell of
/// the matrix starts from the same state. Returns the SQLSTATE of the failure, if any.
fn attempt(db: &mut Client, role: &str, action: &str, secret: &str) -> Option<String> {
    let mut tx = db.transaction().unwrap();
    tx.batch_execute(&format!("SET LOCAL ROLE {role}")).unwrap();
    let outcome = tx
        .query_one(statement(action), &[&secret])
        .err()
        .map(|error| {
            error
                .as_db_error()
                .map(|db| db.code().code().to_string())
                .unwrap_or_else(|| error.to_string())
        });
    tx.rollback().unwrap();
    outcome
}

fn check_access(db: &mut Client, role: &str, action: &str, secret: &str) -> (bool, String) {
    let row = db
        .query_one(
            "SELECT allowed, reason FROM secrets.check_access($1::text::regrole, $2, $3)",
            &[&role, &action, &secret],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

struct Scenario {
    name: &'static str,
    role: &'static str,
    allowed: bool,
    reason: &'static str,
}

const SCENARIOS: [Scenario; 12] = [
    Scenario {
        name: "owner",
        role: "m_owner",
        allowed: true,
        reason: "owner role",
    },
    Scenario {
        name: "direct",
        role: "r_direct",
        allowed: true,
        reason: "grant",
    },
    Scenario {
        name: "group",
        role: "r_group",
        allowed: true,
        reason: "to g_team",
    },
    Scenario {
        name: "policy_allow",
        role: "r_policy",
        allowed: true,
        reason: "allowed by statement 1",
    },
    Scenario {
        name: "policy_deny",
        role: "r_deny",
        allowed: false,
        reason: "denied by statement 1",
    },
    Scenario {
        name: "expired",
        role: "r_expired",
        allowed: false,
        reason: "no grant",
    },
    Scenario {
        name: "condition_met",
        role: "r_cond_met",
        allowed: true,
        reason: "allowed by statement 1",
    },
    Scenario {
        name: "condition_not_met",
        role: "r_cond_not",
        allowed: false,
        reason: "no grant",
    },
    Scenario {
        name: "approved",
        role: "r_approved",
        allowed: true,
        reason: "grant",
    },
    Scenario {
        name: "denied_request",
        role: "r_refused",
        allowed: false,
        reason: "no grant",
    },
    Scenario {
        name: "superuser",
        role: "postgres",
        allowed: true,
        reason: "superuser",
    },
    Scenario {
        name: "stranger",
        role: "r_stranger",
        allowed: false,
        reason: "no grant",
    },
];

/// One secret per scenario, `m/<scenario>`, owned by `m_owner`, holding the credential of a
/// role of its own so that `rotate` really rotates; and each scenario's role set up.
fn matrix_cluster() -> Cluster {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE m_owner LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE g_team;
         CREATE ROLE r_direct IN ROLE secrets_user; CREATE ROLE r_group IN ROLE g_team;
         CREATE ROLE r_policy IN ROLE secrets_user; CREATE ROLE r_deny IN ROLE secrets_user;
         CREATE ROLE r_expired IN ROLE secrets_user; CREATE ROLE r_cond_met IN ROLE secrets_user;
         CREATE ROLE r_cond_not IN ROLE secrets_user; CREATE ROLE r_approved IN ROLE secrets_user;
         CREATE ROLE r_refused IN ROLE secrets_user; CREATE ROLE r_stranger IN ROLE secrets_user;
         SELECT secrets.grant_access('m/*', 'm_owner', '{manage}')",
    )
    .unwrap();
    for scenario in &SCENARIOS {
        let app = format!("m_app_{}", scenario.name);
        db.batch_execute(&format!(
            "CREATE ROLE {app} LOGIN PASSWORD 'pw-{app}'; GRANT {app} TO m_owner"
        ))
        .unwrap();
        let mut owner = cluster.connect("m_owner", "pw");
        let name = format!("m/{}", scenario.name);
        owner
            .execute(
                "SELECT secrets.create_secret($1, $2)",
                &[
                    &name,
                    &format!(r#"{{"username":"{app}","password":"pw-{app}"}}"#),
                ],
            )
            .unwrap();
        owner
            .execute(
                "SELECT secrets.rotate_secret($1, 'postgres-single-user', rotate_immediately => false)",
                &[&name],
            )
            .unwrap();
    }
    let all = "'{get,describe,put,rotate,delete,manage}'";
    let policy = |role: &str, effect: &str, conditions: &str| {
        format!(
            r#"{{"statements": [{{"effect": "{effect}", "principals": ["{role}"], "actions": ["get", "describe", "put", "rotate", "delete", "manage"]{conditions}}}]}}"#
        )
    };
    let mut owner = cluster.connect("m_owner", "pw");
    owner
        .batch_execute(&format!(
            "SELECT secrets.grant_access('m/direct', 'r_direct', {all});
             SELECT secrets.grant_access('m/policy_deny', 'r_deny', {all});
             SELECT secrets.grant_access('m/expired', 'r_expired', {all}, now() + interval '1 second');"
        ))
        .unwrap();
    // Wildcard patterns need secrets_admin: the superuser grants the group.
    db.batch_execute(&format!(
        "SELECT secrets.grant_access('m/gro?p*', 'g_team', {all})"
    ))
    .unwrap();
    for (secret, document) in [
        ("m/policy_allow", policy("r_policy", "allow", "")),
        ("m/policy_deny", policy("r_deny", "deny", "")),
        (
            "m/condition_met",
            policy(
                "r_cond_met",
                "allow",
                r#", "conditions": {"source_cidr": ["127.0.0.0/8", "local"]}"#,
            ),
        ),
        (
            "m/condition_not_met",
            policy(
                "r_cond_not",
                "allow",
                r#", "conditions": {"source_cidr": "10.0.0.0/8"}"#,
            ),
        ),
    ] {
        owner
            .execute(
                "SELECT secrets.put_resource_policy($1, $2::text::jsonb)",
                &[&secret, &document],
            )
            .unwrap();
    }
    // Requests: one approved by the owner, one denied.
    for (role, secret) in [
        ("r_approved", "m/approved"),
        ("r_refused", "m/denied_request"),
    ] {
        db.batch_execute(&format!("SET ROLE {role}")).unwrap();
        let id: String = db
            .query_one(
                "SELECT secrets.request_access($1, '{get,describe,put,rotate,delete}', \
                        '1 hour', 'incident 42')::text",
                &[&secret],
            )
            .unwrap()
            .get(0);
        db.batch_execute("RESET ROLE").unwrap();
        let decision = if role == "r_approved" {
            "approve"
        } else {
            "deny"
        };
        owner
            .execute(
                &format!("SELECT secrets.{decision}_access_request($1::text::uuid)"),
                &[&id],
            )
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(1100));
    cluster
}

#[test]
fn every_action_against_every_way_of_holding_access() {
    let cluster = matrix_cluster();
    let mut db = cluster.superuser();
    let mut failures = Vec::new();
    for scenario in &SCENARIOS {
        let secret = format!("m/{}", scenario.name);
        for action in ACTIONS {
            let outcome = attempt(&mut db, scenario.role, action, &secret);
            // A request cannot ask for manage, so an approved one never gives it.
            let allowed = scenario.allowed && !(scenario.name == "approved" && action == "manage");
            let expected = if allowed {
                None
            } else {
                Some("42501".to_string())
            };
            let reason = if allowed == scenario.allowed {
                scenario.reason
            } else {
                "no grant"
            };
            if outcome != expected {
                failures.push(format!(
                    "{} {action}: expected {expected:?}, got {outcome:?}",
                    scenario.name
                ));
            }
            let (said, said_why) = check_access(&mut db, scenario.role, action, &secret);
            if said != outcome.is_none() || !said_why.contains(reason) {
                failures.push(format!(
                    "{} {action}: check_access said ({said}, {said_why:?}) but the call gave {outcome:?}",
                    scenario.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A missing secret: the same 42501 as a forbidden one, for everyone but those who would be
    // allowed on that name.
    assert_eq!(
        attempt(&mut db, "r_stranger", "get", "m/does-not-exist"),
        Some("42501".into())
    );
    assert_eq!(
        attempt(&mut db, "m_owner", "manage", "m/does-not-exist"),
        Some("42704".into()),
        "m_owner may manage m/*, so it may know"
    );
}

#[test]
fn the_list_view_shows_exactly_what_a_role_may_describe() {
    let cluster = matrix_cluster();
    let mut db = cluster.superuser();
    let visible = |db: &mut Client, role: &str, query: &str| -> Vec<String> {
        let mut tx = db.transaction().unwrap();
        tx.batch_execute(&format!("SET LOCAL ROLE {role}")).unwrap();
        let names = first_column(&mut tx, query);
        tx.rollback().unwrap();
        names
    };
    let view = "SELECT name FROM secrets.secret_list ORDER BY name";
    // Every role that may describe sees its one secret, and the others nothing.
    for scenario in SCENARIOS
        .iter()
        .filter(|s| s.role != "postgres" && s.role != "m_owner")
    {
        let expected: Vec<String> = if scenario.allowed {
            vec![format!("m/{}", scenario.name)]
        } else {
            vec![]
        };
        assert_eq!(
            visible(&mut db, scenario.role, view),
            expected,
            "{}",
            scenario.role
        );
        let functions = "SELECT name FROM secrets.list_secrets() ORDER BY name";
        assert_eq!(
            visible(&mut db, scenario.role, functions),
            expected,
            "{}",
            scenario.role
        );
    }
    assert_eq!(visible(&mut db, "m_owner", view).len(), SCENARIOS.len());
    // EXPLAIN ANALYZE of the view shows only what the role sees: nothing counts the rows of
    // the secrets it may not describe, whose names it could otherwise probe one by one.
    let plan = visible(
        &mut db,
        "r_direct",
        "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) \
         SELECT * FROM secrets.secret_list WHERE name >= 'm/'",
    )
    .join("\n");
    assert!(plan.contains("rows=1 "), "{plan}");
    assert!(!plan.contains("Removed"), "{plan}");
    // The tables themselves are out of reach: the metadata and the values.
    for table in ["secrets.secret", "secrets.secret_version"] {
        let mut tx = db.transaction().unwrap();
        tx.batch_execute("SET LOCAL ROLE r_direct").unwrap();
        assert_sql_error(
            tx.query(&format!("SELECT * FROM {table}"), &[]),
            "42501",
            "permission denied",
        );
    }
}

#[test]
fn grants_patterns_expiry_and_their_refusals() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE payments LOGIN PASSWORD 'pw'; CREATE ROLE team_lead LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         SELECT secrets.create_secret('prod/stripe/key', 'sk_live');
         SELECT secrets.create_secret('prod/stripe/eu/key', 'sk_eu');
         SELECT secrets.create_secret('prod/db', 'pw');",
    )
    .unwrap();
    let id: String = db
        .query_one(
            "SELECT secrets.grant_access('prod/stripe/*', 'payments', '{get}')::text",
            &[],
        )
        .unwrap()
        .get(0);
    // The grantee was made a member of secrets_user so it can call the functions.
    let mut payments = cluster.connect("payments", "pw");
    assert_eq!(
        payments
            .query_one("SELECT secrets.get_secret_value('prod/stripe/eu/key')", &[])
            .unwrap()
            .get::<_, String>(0),
        "sk_eu"
    );
    assert_sql_error(
        payments.query("SELECT secrets.get_secret_value('prod/db')", &[]),
        "42501",
        "permission denied: get on secret \"prod/db\"",
    );
    assert_sql_error(
        payments.query("SELECT secrets.describe_secret('prod/stripe/key')", &[]),
        "42501",
        "describe",
    );
    // Granting again adds actions to the same grant.
    let again: String = db
        .query_one(
            "SELECT secrets.grant_access('prod/stripe/*', 'payments', '{describe}')::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(again, id);
    payments
        .query_one("SELECT secrets.describe_secret('prod/stripe/key')", &[])
        .unwrap();
    let listed: Vec<String> = first_column(&mut payments, "SELECT name_pattern || ' ' || array_to_string(actions, ',') FROM secrets.list_access_grants()");
    assert_eq!(listed, vec!["prod/stripe/* describe,get".to_string()]);
    // Revoking one action keeps the other; revoking the rest removes the grant.
    db.execute(
        "SELECT secrets.revoke_access('prod/stripe/*', 'payments', '{get}')",
        &[],
    )
    .unwrap();
    assert_sql_error(
        payments.query("SELECT secrets.get_secret_value('prod/stripe/key')", &[]),
        "42501",
        "get",
    );
    db.execute(
        "SELECT secrets.revoke_access('prod/stripe/*', 'payments')",
        &[],
    )
    .unwrap();
    assert_eq!(
        payments
            .query("SELECT * FROM secrets.list_access_grants()", &[])
            .unwrap()
            .len(),
        0
    );

    let before = store_state(&mut db);
    for (sql, sqlstate, words) in [
        (
            "SELECT secrets.grant_access('prod/$tripe', 'payments', '{get}')",
            "22023",
            "name_pattern has '$'",
        ),
        (
            "SELECT secrets.grant_access('', 'payments', '{get}')",
            "22023",
            "1 to 512",
        ),
        (
            "SELECT secrets.grant_access('x'' OR ''1''=''1', 'payments', '{get}')",
            "22023",
            "name_pattern has '\\''",
        ),
        (
            "SELECT secrets.grant_access('prod/*', 'payments', '{read}')",
            "22023",
            "unknown action \"read\"",
        ),
        (
            "SELECT secrets.grant_access('prod/*', 'payments', '{}')",
            "22023",
            "at least one action",
        ),
        (
            "SELECT secrets.grant_access('prod/*', 'payments', '{get}', now() - interval '1 hour')",
            "22023",
            "in the past",
        ),
        // An end the access cache cannot hold would break every access decision: refused.
        (
            "SELECT secrets.grant_access('prod/*', 'payments', '{get}', 'infinity')",
            "22023",
            "before the year 10000",
        ),
        (
            "SELECT secrets.grant_access('prod/*', 'payments', '{get}', '294000-01-01')",
            "22023",
            "before the year 10000",
        ),
        // Past what microseconds since 1970 fit in a bigint: still this error, not 22003.
        (
            "SELECT secrets.grant_access('prod/*', 'payments', '{get}', '294270-01-01')",
            "22023",
            "before the year 10000",
        ),
        (
            "SELECT secrets.grant_access('prod/*', 'nobody', '{get}')",
            "42704",
            "role \"nobody\" does not exist",
        ),
        (
            "SELECT secrets.grant_access(NULL, 'payments', '{get}')",
            "22004",
            "name_pattern",
        ),
        (
            "SELECT secrets.revoke_access('prod/none', 'payments')",
            "42704",
            "there is no grant",
        ),
        (
            "SELECT * FROM secrets.check_access('payments', 'read', 'prod/db')",
            "22023",
            "unknown action",
        ),
    ] {
        assert_sql_error(db.query(sql, &[]), sqlstate, words);
    }
    assert_eq!(store_state(&mut db), before);
    // Only secrets_admin grants wildcards; others grant exact names of secrets they manage.
    let mut lead = cluster.connect("team_lead", "pw");
    assert_sql_error(
        lead.query(
            "SELECT secrets.grant_access('prod/*', 'team_lead', '{get}')",
            &[],
        ),
        "42501",
        "wildcard",
    );
    assert_sql_error(
        lead.query(
            "SELECT secrets.grant_access('prod/db', 'team_lead', '{get}')",
            &[],
        ),
        "42501",
        "manage on secret \"prod/db\"",
    );
}

#[test]
fn requests_are_decided_by_managers_never_by_the_requester() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE owner_team LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE other_team LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         SELECT secrets.grant_access('team/*', 'owner_team', '{manage}');",
    )
    .unwrap();
    let mut owner = cluster.connect("owner_team", "pw");
    owner
        .execute("SELECT secrets.create_secret('team/db', 'pw-1')", &[])
        .unwrap();
    let mut other = cluster.connect("other_team", "pw");
    let request = |client: &mut Client, name: &str| -> String {
        client
            .query_one(
                "SELECT secrets.request_access($1, '{get}', '2 hours', 'on call for INC-7')::text",
                &[&name],
            )
            .unwrap()
            .get(0)
    };
    // Requesting reveals nothing: a name that does not exist is accepted the same way.
    request(&mut other, "team/ghost");
    let id = request(&mut other, "team/db");
    assert_sql_error(
        other.query("SELECT secrets.get_secret_value('team/db')", &[]),
        "42501",
        "get",
    );
    assert_sql_error(
        other.query(
            "SELECT secrets.approve_access_request($1::text::uuid)",
            &[&id],
        ),
        "42501",
        "manage",
    );
    // The owner approves; the requester reads until the grant expires.
    owner
        .execute(
            "SELECT secrets.approve_access_request($1::text::uuid)",
            &[&id],
        )
        .unwrap();
    assert_eq!(
        other
            .query_one("SELECT secrets.get_secret_value('team/db')", &[])
            .unwrap()
            .get::<_, String>(0),
        "pw-1"
    );
    let expires_in: f64 = other
        .query_one(
            "SELECT extract(epoch FROM valid_until - now())::float8 FROM secrets.list_access_grants()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!((7000.0..=7200.0).contains(&expires_in), "{expires_in}");
    assert_sql_error(
        owner.query("SELECT secrets.deny_access_request($1::text::uuid)", &[&id]),
        "55000",
        "already approved",
    );
    // Manage cannot be requested: it would let the requester grant itself lasting access.
    assert_sql_error(
        other.query(
            "SELECT secrets.request_access('team/db', '{get,manage}', '1 hour', 'x')",
            &[],
        ),
        "22023",
        "manage cannot be requested",
    );
    // A manager cannot approve their own request, nor as a group it can act as.
    db.batch_execute("CREATE ROLE leads; GRANT leads TO owner_team; SELECT secrets.grant_access('team/*', 'leads', '{manage}')")
        .unwrap();
    let own = request(&mut owner, "team/db");
    assert_sql_error(
        owner.query(
            "SELECT secrets.approve_access_request($1::text::uuid)",
            &[&own],
        ),
        "42501",
        "your own access request",
    );
    owner.batch_execute("SET ROLE leads").unwrap();
    assert_sql_error(
        owner.query(
            "SELECT secrets.approve_access_request($1::text::uuid)",
            &[&own],
        ),
        "42501",
        "your own access request",
    );
    owner.batch_execute("RESET ROLE").unwrap();
    // Both sides see the requests and decisions.
    let states = |client: &mut Client| -> Vec<String> {
        first_column(client, "SELECT secret_name || ':' || state || ':' || requester FROM secrets.list_access_requests() ORDER BY requested_at")
    };
    assert_eq!(
        states(&mut other),
        vec![
            "team/ghost:pending:other_team",
            "team/db:approved:other_team"
        ]
    );
    assert_eq!(
        states(&mut owner),
        vec!["team/db:approved:other_team", "team/db:pending:owner_team"]
    );
    // A superuser, who has the privileges of every role, still decides others' requests.
    db.execute(
        "SELECT secrets.approve_access_request($1::text::uuid)",
        &[&own],
    )
    .unwrap();
    for (sql, words) in [
        (
            "SELECT secrets.request_access('team/db', '{get}', '10 seconds', 'x')",
            "between 1 minute",
        ),
        (
            "SELECT secrets.request_access('team/db', '{get}', '31 days', 'x')",
            "between 1 minute",
        ),
        (
            "SELECT secrets.request_access('team/db', '{get}', '1 month', 'x')",
            "days, hours",
        ),
        (
            "SELECT secrets.request_access('team/db', '{get}', '1 hour', '  ')",
            "reason",
        ),
        (
            "SELECT secrets.request_access('team/db', '{steal}', '1 hour', 'x')",
            "unknown action",
        ),
    ] {
        assert_sql_error(other.query(sql, &[]), "22023", words);
    }
}

#[test]
fn resource_policies_are_validated_and_deny_beats_every_allow() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE app LOGIN PASSWORD 'pw' IN ROLE secrets_admin;
         SELECT secrets.create_secret('svc/key', 'k');",
    )
    .unwrap();
    let findings: Vec<(i32, String)> = db
        .query(
            r#"SELECT statement, problem FROM secrets.validate_resource_policy('{"statements": [
                 {"effect": "allow", "principals": ["app", "ghost"], "actions": ["get"]},
                 {"effect": "allow", "principals": "*", "actions": ["get", "describe"]}]}')"#,
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        findings,
        vec![
            (1, "unknown role \"ghost\"".to_string()),
            (
                2,
                "grants get to everyone (\"principals\": \"*\")".to_string()
            ),
        ]
    );
    // Every malformed statement is reported, in order, not only the first.
    let malformed: Vec<String> = first_column(
        &mut db,
        r#"SELECT statement || ': ' || problem FROM secrets.validate_resource_policy('{"statements": [
             {"effect": "allow", "principals": "*", "actions": ["read"]},
             {"effect": "allow", "principals": ["ghost"], "actions": ["get"]},
             {"effect": "maybe", "principals": "*", "actions": ["get"]}]}')"#,
    );
    assert_eq!(malformed.len(), 3, "{malformed:?}");
    assert!(malformed[0].starts_with("1: unknown action \"read\""));
    assert_eq!(malformed[1], "2: unknown role \"ghost\"");
    assert_eq!(malformed[2], "3: effect must be \"allow\" or \"deny\"");
    // put refuses whatever validate reports, naming the statement, and stores nothing.
    for (policy, words) in [
        (
            r#"{"statements": [{"effect": "allow", "principals": ["app"], "actions": ["get"]},
                               {"effect": "deny", "principals": ["ghost"], "actions": ["get"]}]}"#,
            "statement 2: unknown role \"ghost\"",
        ),
        (
            r#"{"statements": [{"effect": "allow", "principals": ["app"], "actions": ["read"]}]}"#,
            "statement 1: unknown action \"read\"",
        ),
        (r#"{"statements": {}}"#, "nothing else"),
    ] {
        assert_sql_error(
            db.query(
                "SELECT secrets.put_resource_policy('svc/key', $1::text::jsonb)",
                &[&policy],
            ),
            "22023",
            words,
        );
    }
    let stored: Option<String> = db
        .query_one("SELECT secrets.get_resource_policy('svc/key')::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, None);
    let public = r#"{"statements": [{"effect": "allow", "principals": "*", "actions": ["get"]}]}"#;
    assert_sql_error(
        db.query(
            "SELECT secrets.put_resource_policy('svc/key', $1::text::jsonb)",
            &[&public],
        ),
        "22023",
        "block_public_policy => false",
    );
    db.execute(
        "SELECT secrets.put_resource_policy('svc/key', $1::text::jsonb, block_public_policy => false)",
        &[&public],
    )
    .unwrap();
    // An explicit deny beats secrets_admin membership and every allow.
    let deny = r#"{"statements": [{"effect": "deny", "principals": ["app"], "actions": ["get"]},
                                  {"effect": "allow", "principals": ["app"], "actions": ["get"]}]}"#;
    db.execute(
        "SELECT secrets.put_resource_policy('svc/key', $1::text::jsonb)",
        &[&deny],
    )
    .unwrap();
    let mut app = cluster.connect("app", "pw");
    assert_sql_error(
        app.query("SELECT secrets.get_secret_value('svc/key')", &[]),
        "42501",
        "get",
    );
    app.query_one("SELECT secrets.describe_secret('svc/key')", &[])
        .unwrap();
    let stored: String = db
        .query_one("SELECT secrets.get_resource_policy('svc/key')::text", &[])
        .unwrap()
        .get(0);
    assert!(stored.contains("deny"));
    db.execute("SELECT secrets.delete_resource_policy('svc/key')", &[])
        .unwrap();
    app.query_one("SELECT secrets.get_secret_value('svc/key')", &[])
        .unwrap();
}

/// Whatever the caller does to its own search_path, schemas, operators and temporary objects,
/// the functions do the same thing.
#[test]
fn a_callers_search_path_and_objects_change_nothing() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE tricky LOGIN PASSWORD 'pw' IN ROLE secrets_admin;
         GRANT CREATE ON SCHEMA public TO tricky;",
    )
    .unwrap();
    let mut tricky = cluster.connect("tricky", "pw");
    tricky
        .batch_execute(
            "CREATE FUNCTION public.evil_eq(text, text) RETURNS boolean
                 LANGUAGE sql AS 'SELECT 1/0 = 1';
             CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.evil_eq);
             CREATE FUNCTION public.evil_uuid_eq(uuid, uuid) RETURNS boolean
                 LANGUAGE sql AS 'SELECT 1/0 = 1';
             CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid,
                 FUNCTION = public.evil_uuid_eq);
             CREATE FUNCTION public.length(text) RETURNS integer LANGUAGE sql AS 'SELECT 1/0';
             CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql
                 AS 'SELECT pg_catalog.now() + (1/0) * interval ''1 second''';
             CREATE FUNCTION public.pg_notify(text, text) RETURNS void LANGUAGE sql AS 'SELECT 1/0';
             CREATE TEMP TABLE secret (id uuid, name text);
             CREATE TEMP TABLE version_label (secret_id uuid, label text, version_id uuid);
             SET search_path = public, pg_temp, pg_catalog;",
        )
        .unwrap();
    // The caller's own queries do see the evil operator...
    assert!(tricky.query("SELECT 'a'::text = 'a'::text", &[]).is_err());
    // ...the extension's functions do not.
    tricky
        .batch_execute(
            "SELECT secrets.create_secret('t/one', 'v1', tags => '{\"a\": \"b\"}');
             SELECT secrets.put_secret_value('t/one', 'v2');
             SELECT secrets.tag_secret('t/one', '{\"c\": \"d\"}');
             SELECT secrets.grant_access('t/*', 'tricky', '{get}');
             SELECT secrets.put_resource_policy('t/one', '{\"statements\": []}');
             SELECT secrets.delete_secret('t/one', 7);
             SELECT secrets.restore_secret('t/one');",
        )
        .unwrap();
    let value: String = tricky
        .query_one("SELECT secrets.get_secret_value('t/one')", &[])
        .unwrap()
        .get(0);
    assert_eq!(value, "v2");
    // The read functions set their search path another way than the rest (db.rs); every way
    // through them ignores the caller's objects too.
    let previous: String = tricky
        .query_one(
            "SELECT secrets.get_secret_value('t/one', version_stage => 'PREVIOUS')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(previous, "v1");
    let batch: Vec<(Option<String>, Option<String>)> = tricky
        .query(
            "SELECT secret_string, error FROM secrets.batch_get_secret_value(ARRAY['t/one', 't/none'])",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(batch[0], (Some("v2".to_string()), None));
    assert!(batch[1].1.is_some());
    tricky
        .batch_execute("SELECT secrets.create_secret('t/bytes', secret_binary => '\\x0102')")
        .unwrap();
    let bytes: Vec<u8> = tricky
        .query_one("SELECT secrets.get_secret_binary('t/bytes')", &[])
        .unwrap()
        .get(0);
    assert_eq!(bytes, [1, 2]);
    let listed: i64 = tricky
        .query_one("SELECT count(*) FROM secrets.list_secrets('t/')", &[])
        .unwrap()
        .get(0);
    assert_eq!(listed, 2);
    let (allowed, _) = check_access(&mut tricky, "tricky", "get", "t/one");
    assert!(allowed);
}

/// A secret is read with the rights of the role PostgreSQL runs the code as: inside another
/// role's SECURITY DEFINER function that role, and in ANALYZE (autovacuum's, or a superuser's)
/// the owner of the table whose index expression runs, never the superuser who started it.
#[test]
fn another_roles_code_reads_with_that_roles_rights() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.execute(
        "SELECT secrets.create_secret('prod/db', 'the-production-password')",
        &[],
    )
    .unwrap();
    let mut mallory = cluster.login_role("mallory", "IN ROLE secrets_user");
    db.batch_execute("GRANT CREATE ON SCHEMA public TO mallory")
        .unwrap();
    mallory
        .batch_execute(
            "CREATE FUNCTION public.borrowed() RETURNS text SECURITY DEFINER LANGUAGE sql \
               AS $$ SELECT secrets.get_secret_value('prod/db') $$; \
             CREATE FUNCTION public.peek(int) RETURNS text IMMUTABLE LANGUAGE plpgsql AS $$ \
               BEGIN RETURN secrets.get_secret_value('prod/db'); \
               EXCEPTION WHEN insufficient_privilege THEN RETURN 'denied'; END $$; \
             CREATE TABLE public.bait (x int); \
             CREATE INDEX bait_peek ON public.bait (public.peek(x)); \
             INSERT INTO public.bait SELECT 1 FROM generate_series(1, 100);",
        )
        .unwrap();
    // The superuser calls mallory's function: it runs as mallory, and so does the read.
    assert_sql_error(
        db.query_one("SELECT public.borrowed()", &[]),
        "42501",
        "permission denied: get on secret \"prod/db\"",
    );
    // The superuser analyzes mallory's table: her index expression runs as her.
    db.batch_execute("ANALYZE public.bait").unwrap();
    let statistics: String = db
        .query_one(
            "SELECT coalesce(string_agg(most_common_vals::text, ' '), '') FROM pg_stats \
             WHERE tablename = 'bait_peek'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(statistics.contains("denied"), "{statistics}");
    assert!(!statistics.contains("the-production-password"));
    // Her own calls are hers, as before.
    assert_sql_error(
        mallory.query_one("SELECT public.borrowed()", &[]),
        "42501",
        "permission denied",
    );
}

/// A session of role `reader`, granted `get` on a new secret `name` and having read it once,
/// so its grants are cached; and the statement that reads it.
fn reader_granted_get(cluster: &Cluster, db: &mut Client, name: &str) -> (Client, String) {
    db.execute("SELECT secrets.create_secret($1, 'v')", &[&name])
        .unwrap();
    let mut reader = cluster.login_role("reader", "IN ROLE secrets_user");
    db.execute(
        "SELECT secrets.grant_access($1, 'reader', '{get}')",
        &[&name],
    )
    .unwrap();
    let read = format!("SELECT secrets.get_secret_value('{name}')");
    reader.query_one(&read, &[]).unwrap();
    (reader, read)
}

/// A revoke reaches a session that reloaded its grants inside a REPEATABLE READ transaction:
/// what that transaction's snapshot showed serves only the rest of it.
#[test]
fn a_revoke_reaches_a_session_that_read_in_repeatable_read() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let (mut reader, read) = reader_granted_get(&cluster, &mut db, "rr/x");
    reader
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1")
        .unwrap();
    db.execute("SELECT secrets.revoke_access('rr/x', 'reader')", &[])
        .unwrap();
    // Inside the transaction its snapshot still shows the grant; either answer is consistent.
    for _ in 0..2 {
        let _ = reader.query_one(&read, &[]);
    }
    reader.batch_execute("ROLLBACK").unwrap();
    assert_sql_error(reader.query_one(&read, &[]), "42501", "permission denied");
}

/// Grants on a secret's exact name go when the secret is removed for good, so a later secret
/// of that name does not inherit them.
#[test]
fn a_new_secret_does_not_inherit_the_grants_of_a_removed_one_of_its_name() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let mut bob = cluster.login_role("bob", "IN ROLE secrets_user");
    for force in [true, false] {
        db.batch_execute(
            "SELECT secrets.create_secret('team/x', 'old'); \
             SELECT secrets.grant_access('team/x', 'bob', '{get}');",
        )
        .unwrap();
        bob.query_one("SELECT secrets.get_secret_value('team/x')", &[])
            .unwrap();
        if force {
            db.batch_execute(
                "SELECT secrets.delete_secret('team/x', force_delete_without_recovery => true)",
            )
            .unwrap();
        } else {
            // Past its recovery window, purged by the next deletion.
            db.batch_execute(
                "SELECT secrets.delete_secret('team/x', 7); \
                 UPDATE secrets.secret SET purge_at = now() - interval '1 second', \
                        deleted_at = now() - interval '8 days' WHERE name = 'team/x'; \
                 SELECT secrets.purge_deleted_secrets();",
            )
            .unwrap();
        }
        db.execute("SELECT secrets.create_secret('team/x', 'new')", &[])
            .unwrap();
        assert_sql_error(
            bob.query_one("SELECT secrets.get_secret_value('team/x')", &[]),
            "42501",
            "permission denied",
        );
        db.execute(
            "SELECT secrets.delete_secret('team/x', force_delete_without_recovery => true)",
            &[],
        )
        .unwrap();
    }
}

/// A policy names roles; a session that loaded it before a role of that name was created again
/// applies it to the new role.
#[test]
fn a_policy_applies_to_a_role_created_again_under_its_name() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE carol IN ROLE secrets_admin; \
         SELECT secrets.create_secret('svc/key', 'k'); \
         SELECT secrets.put_resource_policy('svc/key', \
           '{\"statements\": [{\"effect\": \"deny\", \"principals\": [\"carol\"], \"actions\": [\"get\"]}]}');",
    )
    .unwrap();
    let mut boss = cluster.login_role("boss", "IN ROLE secrets_admin");
    boss.query_one("SELECT secrets.get_secret_value('svc/key')", &[])
        .unwrap();
    db.batch_execute(
        "DROP ROLE carol; CREATE ROLE carol IN ROLE secrets_admin; GRANT carol TO boss",
    )
    .unwrap();
    boss.batch_execute("SET ROLE carol").unwrap();
    assert_sql_error(
        boss.query_one("SELECT secrets.get_secret_value('svc/key')", &[]),
        "42501",
        "permission denied",
    );
}

/// A revoke committed while a reader's statement runs reaches the reader's next statement:
/// grants are loaded under a snapshot taken when they are loaded, not the statement's.
#[test]
fn a_revoke_during_a_readers_statement_reaches_its_next_one() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    let (mut reader, read) = reader_granted_get(&cluster, &mut db, "rc/x");
    let slow = std::thread::spawn(move || {
        // Either answer is consistent for this statement; what it caches is the point.
        let _ = reader.query_one("SELECT pg_sleep(2), secrets.get_secret_value('rc/x')", &[]);
        reader
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    db.execute("SELECT secrets.revoke_access('rc/x', 'reader')", &[])
        .unwrap();
    let mut reader = slow.join().unwrap();
    assert_sql_error(reader.query_one(&read, &[]), "42501", "permission denied");
}

/// `check_access` about oneself names the resource-policy statement that denies only to a role
/// that may describe the secret. To anyone else a denial on a secret that exists and a name no
/// secret has read the same, as they do for `get`: the simulator tells no one which secrets
/// exist.
#[test]
fn check_access_does_not_tell_a_role_which_secrets_exist() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        r#"CREATE ROLE prober LOGIN PASSWORD 'pw' IN ROLE secrets_user;
           CREATE ROLE watcher LOGIN PASSWORD 'pw' IN ROLE secrets_user;
           SELECT secrets.create_secret('hidden/db', 'v');
           SELECT secrets.grant_access('hidden/*', 'watcher', '{describe}');
           SELECT secrets.put_resource_policy('hidden/db', '{"statements": [{"effect": "deny",
             "principals": ["prober", "watcher"], "actions": ["get"]}]}');"#,
    )
    .unwrap();
    let mut prober = cluster.connect("prober", "pw");
    let existing = check_access(&mut prober, "prober", "get", "hidden/db");
    let missing = check_access(&mut prober, "prober", "get", "hidden/none");
    assert!(!existing.0);
    assert_eq!(existing, missing);
    assert!(!existing.1.contains("statement 1"), "{}", existing.1);
    for name in ["hidden/db", "hidden/none"] {
        assert_sql_error(
            prober.query(statement("get"), &[&name]),
            "42501",
            "permission denied",
        );
    }
    let mut watcher = cluster.connect("watcher", "pw");
    assert_eq!(
        check_access(&mut watcher, "watcher", "get", "hidden/db"),
        (
            false,
            "denied by statement 1 of the resource policy".to_string()
        )
    );
}

/// A resource policy's deny on a group covers every member, also one that holds the membership
/// without inheriting it (NOINHERIT: it may SET ROLE to the group): such a member cannot step
/// out of the deny with a grant of its own. Allows stay with inheritance: the group's grant
/// does not reach it.
#[test]
fn a_group_deny_covers_members_that_do_not_inherit() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE contractors;
         CREATE ROLE temp LOGIN PASSWORD 'pw' NOINHERIT IN ROLE contractors;
         -- On PostgreSQL 15 NOINHERIT covers every membership, secrets_user's too.
         GRANT USAGE ON SCHEMA secrets TO temp;
         GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA secrets TO temp;
         SELECT secrets.create_secret('prod/db', 'v1');
         SELECT secrets.create_secret('prod/report', 'v2');
         SELECT secrets.grant_access('prod/db', 'temp', '{get}');
         SELECT secrets.grant_access('prod/report', 'contractors', '{get}');
         SELECT secrets.put_resource_policy('prod/db', '{\"statements\": [{\"effect\": \"deny\",
           \"principals\": [\"contractors\"], \"actions\": [\"get\"]}]}');",
    )
    .unwrap();
    let mut temp = cluster.connect("temp", "pw");
    for name in ["prod/db", "prod/report"] {
        assert_sql_error(
            temp.query(statement("get"), &[&name]),
            "42501",
            "permission denied",
        );
    }
    assert_eq!(
        check_access(&mut db, "temp", "get", "prod/db"),
        (
            false,
            "denied by statement 1 of the resource policy".to_string()
        )
    );
    // Without the deny, its own grant applies.
    db.batch_execute("SELECT secrets.delete_resource_policy('prod/db')")
        .unwrap();
    let value: String = temp
        .query_one(statement("get"), &[&"prod/db"])
        .unwrap()
        .get(0);
    assert_eq!(value, "v1");
}

/// A deny that names a person follows it into the groups it acts as: `SET ROLE` to a group
/// holding a grant does not step out of it. It binds the person's own session only: the group
/// itself, logged in by someone else, keeps its grant.
#[test]
fn a_deny_on_a_person_follows_it_through_set_role() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE billing_team LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE alice LOGIN PASSWORD 'pw' IN ROLE billing_team;
         SELECT secrets.create_secret('prod/billing/db', 'v1');
         SELECT secrets.grant_access('prod/billing/*', 'billing_team', '{get}');
         SELECT secrets.put_resource_policy('prod/billing/db', '{\"statements\": [{\"effect\": \"deny\",
           \"principals\": [\"alice\"], \"actions\": [\"get\"]}]}');",
    )
    .unwrap();
    let mut alice = cluster.connect("alice", "pw");
    assert_sql_error(
        alice.query(statement("get"), &[&"prod/billing/db"]),
        "42501",
        "permission denied",
    );
    alice.batch_execute("SET ROLE billing_team").unwrap();
    assert_sql_error(
        alice.query(statement("get"), &[&"prod/billing/db"]),
        "42501",
        "permission denied",
    );
    let mut team = cluster.connect("billing_team", "pw");
    let value: String = team
        .query_one(statement("get"), &[&"prod/billing/db"])
        .unwrap()
        .get(0);
    assert_eq!(value, "v1");
}

/// A person who asked for access as one of its groups cannot approve it as another group
/// that manages the secret: the four-eyes rule follows the session's user.
#[test]
fn a_request_cannot_be_approved_by_its_requester_through_another_group() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE asking_group IN ROLE secrets_user;
         CREATE ROLE managing_group IN ROLE secrets_user;
         CREATE ROLE mallory LOGIN PASSWORD 'pw' IN ROLE asking_group, managing_group;
         SELECT secrets.create_secret('team/db', 'v');
         SELECT secrets.grant_access('team/db', 'managing_group', '{manage}');",
    )
    .unwrap();
    let mut mallory = cluster.connect("mallory", "pw");
    mallory.batch_execute("SET ROLE asking_group").unwrap();
    let id: String = mallory
        .query_one(
            "SELECT secrets.request_access('team/db', '{get}', '1 hour', 'me')::text",
            &[],
        )
        .unwrap()
        .get(0);
    mallory.batch_execute("SET ROLE managing_group").unwrap();
    assert_sql_error(
        mallory.query(
            "SELECT secrets.approve_access_request($1::text::uuid)",
            &[&id],
        ),
        "42501",
        "decide on your own access request",
    );
}

/// Offboarding lists what the leaving role can read only to those who manage it: a role that
/// may merely describe every secret (secrets_reader) learns nothing about who reads what.
#[test]
fn offboarding_lists_only_what_the_caller_manages() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE payments_app LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE curious LOGIN PASSWORD 'pw' IN ROLE secrets_reader;
         SELECT secrets.create_secret('prod/payments/key', 'v');
         SELECT secrets.grant_access('prod/payments/*', 'payments_app', '{get}');",
    )
    .unwrap();
    let listed = |client: &mut Client| -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM secrets.rotate_secrets_accessible_by('payments_app')",
                &[],
            )
            .unwrap()
            .get(0)
    };
    let mut curious = cluster.connect("curious", "pw");
    assert_eq!(listed(&mut curious), 0);
    assert_eq!(listed(&mut db), 1);
}

/// A role that may manage a secret only for a while, or only under a policy's conditions,
/// cannot hand on more than that: not a grant without an end (to itself or anyone), not an
/// approval outlasting its own access, not a resource policy. A refused call changes nothing.
#[test]
fn a_manager_hands_on_no_more_than_its_own_manage_right() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE temp_manager LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE cond_manager LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE perm_manager LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE asker LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE friend;
         SELECT secrets.create_secret('team/db', 'v');
         SELECT secrets.grant_access('team/db', 'temp_manager', '{manage,rotate}', now() + interval '1 hour');
         SELECT secrets.grant_access('team/db', 'perm_manager', '{manage}');
         SELECT secrets.put_resource_policy('team/db', '{\"statements\": [{\"effect\": \"allow\",
           \"principals\": [\"cond_manager\"], \"actions\": [\"manage\"],
           \"conditions\": {\"source_cidr\": \"127.0.0.0/8\"}}]}');",
    )
    .unwrap();
    let grants = |db: &mut Client| -> Vec<String> {
        first_column(
            db,
            "SELECT grantee || ':' || array_to_string(actions, ',') || ':' || (valid_until IS NULL)
             FROM secrets.list_access_grants() ORDER BY 1",
        )
    };
    let before = grants(&mut db);
    let policy = "SELECT secrets.put_resource_policy('team/db', '{\"statements\": [{\"effect\": \
                  \"allow\", \"principals\": [\"friend\"], \"actions\": [\"get\"]}]}')";

    let mut temp = cluster.connect("temp_manager", "pw");
    for (statement, expected) in [
        (
            "SELECT secrets.grant_access('team/db', 'temp_manager', '{manage}')",
            "ends at",
        ),
        (
            "SELECT secrets.grant_access('team/db', 'friend', '{get}')",
            "must end by then",
        ),
        (
            "SELECT secrets.grant_access('team/db', 'friend', '{get}', now() + interval '2 hours')",
            "must end by then",
        ),
        (policy, "a resource policy has no end"),
        (
            "SELECT secrets.delete_resource_policy('team/db')",
            "ends at",
        ),
    ] {
        assert_sql_error(temp.query(statement, &[]), "42501", expected);
    }
    assert_sql_error(
        temp.query(
            "SELECT secrets.rotate_secret('team/db', 'postgres-single-user', 'rate(1 days)',
                                          rotate_immediately => false)",
            &[],
        ),
        "42501",
        "a rotation schedule runs on with the owner's rights",
    );
    assert_eq!(grants(&mut db), before, "a refused grant changed nothing");
    temp.batch_execute(
        "SELECT secrets.grant_access('team/db', 'friend', '{get}', now() + interval '30 minutes')",
    )
    .unwrap();

    // Approving: only a request whose access ends before the approver's does.
    let mut asker = cluster.connect("asker", "pw");
    let mut request = |duration: &str| -> String {
        asker
            .query_one(
                "SELECT secrets.request_access('team/db', '{get}', $1::text::interval, 'on call')::text",
                &[&duration],
            )
            .unwrap()
            .get(0)
    };
    let (long, short) = (request("2 hours"), request("20 minutes"));
    let approve = "SELECT secrets.approve_access_request($1::text::uuid)";
    assert_sql_error(temp.query(approve, &[&long]), "42501", "must end by then");
    temp.query(approve, &[&short]).unwrap();

    // Manage only under a policy's conditions: usable, not delegable.
    let mut conditional = cluster.connect("cond_manager", "pw");
    conditional
        .batch_execute("SELECT secrets.tag_secret('team/db', '{\"checked\": \"yes\"}')")
        .unwrap();
    assert_sql_error(
        conditional.query(
            "SELECT secrets.grant_access('team/db', 'friend', '{get}', now() + interval '1 minute')",
            &[],
        ),
        "42501",
        "only under the conditions of resource policy statements",
    );
    assert_sql_error(
        conditional.query(approve, &[&long]),
        "42501",
        "under the conditions",
    );

    // Manage on a pattern for a while does not make a permanent owner of a new secret.
    db.batch_execute(
        "SELECT secrets.grant_access('team/*', 'temp_manager', '{manage}', now() + interval '1 hour')",
    )
    .unwrap();
    assert_sql_error(
        temp.query("SELECT secrets.create_secret('team/new', 'v')", &[]),
        "42501",
        "creating it would make you its owner for good",
    );
    let created: i64 = db
        .query_one("SELECT count(*) FROM secrets.list_secrets('team/new')", &[])
        .unwrap()
        .get(0);
    assert_eq!(created, 0);

    // Manage without an end hands on without one; granting again does not change the end of
    // actions the grant does not name (friend's get for 30 minutes).
    let mut permanent = cluster.connect("perm_manager", "pw");
    let before = grants(&mut db);
    assert_sql_error(
        permanent.query(
            "SELECT secrets.grant_access('team/db', 'friend', '{describe}')",
            &[],
        ),
        "22023",
        "already granted to role friend with other actions and another valid_until",
    );
    assert_eq!(grants(&mut db), before);
    permanent
        .batch_execute("SELECT secrets.grant_access('team/db', 'friend', '{describe,get}')")
        .unwrap();
    permanent.query(approve, &[&long]).unwrap();
    permanent.batch_execute(policy).unwrap();
    let after = grants(&mut db);
    assert!(
        after.contains(&"friend:describe,get:true".to_string()),
        "{after:?}"
    );
}

/// A policy's deny binds the managers it names: a role with `manage` that a policy denies
/// `get` cannot lift the deny by replacing or deleting the policy, as itself or through a
/// group it acts as; it may change the rest. A manager the policy does not name changes it,
/// and so does `secrets_admin`.
#[test]
fn a_manager_cannot_lift_a_deny_that_binds_it() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE ops LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE contractor LOGIN PASSWORD 'pw' IN ROLE ops;
         CREATE ROLE lead LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE security LOGIN PASSWORD 'pw' IN ROLE secrets_admin;
         SELECT secrets.create_secret('prod/db', 'v1');
         SELECT secrets.grant_access('prod/db', 'ops', '{get,manage}');
         SELECT secrets.grant_access('prod/db', 'lead', '{manage}');
         SELECT secrets.put_resource_policy('prod/db', '{\"statements\": [{\"effect\": \"deny\",
           \"principals\": [\"contractor\"], \"actions\": [\"get\"],
           \"conditions\": {\"source_cidr\": \"10.0.0.0/8\"}},
           {\"effect\": \"deny\", \"principals\": [\"ops\"], \"actions\": [\"get\"]}]}');",
    )
    .unwrap();
    let policy = |db: &mut Client| -> String {
        db.query_one("SELECT secrets.get_resource_policy('prod/db')::text", &[])
            .unwrap()
            .get(0)
    };
    let before = policy(&mut db);
    let replace = "SELECT secrets.put_resource_policy('prod/db', '{\"statements\": [{\"effect\": \
                   \"allow\", \"principals\": [\"lead\"], \"actions\": [\"get\"]}]}')";
    let delete = "SELECT secrets.delete_resource_policy('prod/db')";
    let mut ops = cluster.connect("ops", "pw");
    assert_sql_error(
        ops.query(statement("get"), &[&"prod/db"]),
        "42501",
        "permission denied",
    );
    for attempt in [replace, delete] {
        assert_sql_error(
            ops.query(attempt, &[]),
            "42501",
            "statement 2 of its resource policy denies you",
        );
    }
    // A conditional deny binds too (a new policy would drop its condition), and so does a
    // deny on the person acting as its group.
    let mut contractor = cluster.connect("contractor", "pw");
    contractor.batch_execute("SET ROLE ops").unwrap();
    assert_sql_error(
        contractor.query(delete, &[]),
        "42501",
        "statement 1 of its resource policy denies you",
    );
    assert_eq!(policy(&mut db), before, "a refused change changed nothing");
    // A change that keeps every statement binding the caller (word for word, wherever it
    // stands) is its to make: ops drops the contractor's deny and adds an allow.
    ops.batch_execute(
        "SELECT secrets.put_resource_policy('prod/db', '{\"statements\": [
           {\"effect\": \"allow\", \"principals\": [\"lead\"], \"actions\": [\"describe\"]},
           {\"actions\": [\"get\"], \"principals\": [\"ops\"], \"effect\": \"deny\"}]}')",
    )
    .unwrap();
    assert_sql_error(
        ops.query(statement("get"), &[&"prod/db"]),
        "42501",
        "permission denied",
    );

    let mut lead = cluster.connect("lead", "pw");
    lead.batch_execute(replace).unwrap();
    assert!(policy(&mut db).contains("lead"));
    db.batch_execute(
        "SELECT secrets.put_resource_policy('prod/db', '{\"statements\": [{\"effect\": \"deny\",
           \"principals\": [\"lead\", \"security\"], \"actions\": [\"get\"]}]}')",
    )
    .unwrap();
    let mut security = cluster.connect("security", "pw");
    security.batch_execute(delete).unwrap();
    let value: String = ops
        .query_one(statement("get"), &[&"prod/db"])
        .unwrap()
        .get(0);
    assert_eq!(value, "v1", "without the policy, ops's grant applies");
}

/// A stored policy this library cannot parse (edited in the table, or written by another
/// version) fails closed: what it denies cannot be told, so acting on its secret is refused
/// to every role but a superuser, `secrets_admin` included, with the reason for a role that
/// would be allowed but for it, and as any refusal for one that would not. Listings leave the
/// secret out rather than failing, offboarding counts it as readable, and a superuser replaces
/// the policy.
#[test]
fn a_stored_policy_that_does_not_parse_fails_closed() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE intern LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE boss LOGIN PASSWORD 'pw' IN ROLE secrets_admin;
         CREATE ROLE outsider;
         CREATE ROLE stranger LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         SELECT secrets.create_secret('svc/broken', 'b');
         SELECT secrets.create_secret('svc/fine', 'f');
         SELECT secrets.grant_access('svc/broken', 'intern', '{get,describe,manage}');
         SELECT secrets.grant_access('svc/fine', 'intern', '{get,describe,manage}');
         SELECT secrets.grant_access('svc/broken', 'outsider', '{describe}');
         SELECT secrets.grant_access('svc/fine', 'outsider', '{describe}');
         SELECT secrets.put_resource_policy('svc/broken', '{\"statements\": [{\"effect\": \"deny\",
           \"principals\": [\"intern\"], \"actions\": [\"get\"]}]}');
         UPDATE secrets.resource_policy SET policy = '{\"statements\": [{\"effect\": \"deny\",
           \"principals\": [\"intern\"], \"actions\": [\"get\"], \"unless\": \"weekend\"}]}';",
    )
    .unwrap();
    let refusal = "the resource policy of the secret with id";
    for role in ["intern", "boss"] {
        let mut client = cluster.connect(role, "pw");
        for action in ["get", "describe", "manage"] {
            let error = client
                .query_one(statement(action), &[&"svc/broken"])
                .expect_err("refused");
            let db_error = error.as_db_error().expect("a server error");
            assert_eq!(
                db_error.code().code(),
                "55000",
                "{role} {action}: {db_error:?}"
            );
            assert!(
                db_error.message().contains(refusal)
                    && db_error
                        .message()
                        .contains("statement 1: unknown field \"unless\""),
                "{}",
                db_error.message()
            );
            assert!(db_error.hint().unwrap_or_default().contains("superuser"));
        }
        client
            .query_one(statement("get"), &[&"svc/fine"])
            .unwrap_or_else(|e| panic!("{role} reads the other secret: {e}"));
        assert_eq!(
            first_column(
                &mut client,
                "SELECT name FROM secrets.secret_list ORDER BY name"
            ),
            ["svc/fine"],
            "{role} lists the other secret only"
        );
        // secrets_admin sees every grant; a manager, the grants on what it may manage.
        let others_grants = first_column(
            &mut client,
            "SELECT name_pattern FROM secrets.list_access_grants() WHERE grantee = 'outsider' \
             ORDER BY 1",
        );
        let expected: &[&str] = match role {
            "boss" => &["svc/broken", "svc/fine"],
            _ => &["svc/fine"],
        };
        assert_eq!(others_grants, expected, "{role} lists grants");
    }
    // A role with no right to it is refused as for a secret that does not exist.
    let mut stranger = cluster.connect("stranger", "pw");
    for name in ["svc/broken", "svc/none"] {
        assert_sql_error(
            stranger.query(statement("get"), &[&name]),
            "42501",
            &format!("permission denied: get on secret \"{name}\""),
        );
    }
    // Offboarding intern counts the secret as one it could read; secrets_admin is told that
    // only a superuser can go on.
    let mut boss = cluster.connect("boss", "pw");
    let offboarding = first_column(
        &mut boss,
        "SELECT name || ': ' || status FROM secrets.rotate_secrets_accessible_by('intern') \
         ORDER BY name",
    );
    assert_eq!(offboarding.len(), 2, "{offboarding:?}");
    assert!(
        offboarding[0].starts_with("svc/broken: needs a superuser: the resource policy"),
        "{offboarding:?}"
    );
    assert!(offboarding[1].starts_with("svc/fine: "), "{offboarding:?}");
    // The refused calls were recorded; a manager's view of the trail leaves them out without
    // failing, a superuser's shows them.
    let records = "secret_name = 'svc/broken' AND sqlstate = '55000'";
    wait_until("the refusals recorded", Duration::from_secs(60), || {
        first_column(
            &mut db,
            &format!("SELECT count(*)::text FROM secrets.audit_log WHERE {records}"),
        ) == ["6"]
    });
    assert_eq!(
        first_column(
            &mut boss,
            &format!("SELECT count(*)::text FROM secrets.audit_log WHERE {records}")
        ),
        ["0"]
    );

    let stored: String = db
        .query_one(
            "SELECT secrets.get_resource_policy('svc/broken')::text",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(stored.contains("unless"), "a superuser reads it: {stored}");
    db.batch_execute("SELECT secrets.delete_resource_policy('svc/broken')")
        .unwrap();
    let mut intern = cluster.connect("intern", "pw");
    let value: String = intern
        .query_one(statement("get"), &[&"svc/broken"])
        .unwrap()
        .get(0);
    assert_eq!(value, "b", "without the policy, the grant applies");
}

/// A retry with a used `client_request_token` is answered by comparing the value with the
/// stored one, which tells whether a guess is right: a role that may `put` but not `get` gets
/// the same refusal for the stored value and for any other, and nothing is written. A role
/// that may `get` has its retry answered.
#[test]
fn a_writer_that_may_not_read_cannot_test_guesses_through_a_token() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE writer LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE deployer LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         SELECT secrets.create_secret('svc/pin', 'PIN-4817', client_request_token => 'deploy-1');
         SELECT secrets.grant_access('svc/pin', 'writer', '{put}');
         SELECT secrets.grant_access('svc/pin', 'deployer', '{put,get}');",
    )
    .unwrap();
    let first: String = db
        .query_one(
            "SELECT version_id::text FROM secrets.list_secret_version_ids('svc/pin')",
            &[],
        )
        .unwrap()
        .get(0);
    let before = store_state(&mut db);
    let put =
        "SELECT secrets.put_secret_value('svc/pin', $1, client_request_token => 'deploy-1')::text";
    let mut writer = cluster.connect("writer", "pw");
    for guess in ["PIN-0000", "PIN-4817"] {
        assert_sql_error(
            writer.query_one(put, &[&guess]),
            "23505",
            "client_request_token was already used for secret \"svc/pin\"",
        );
    }
    assert_eq!(store_state(&mut db), before, "nothing was written");
    let mut deployer = cluster.connect("deployer", "pw");
    let retried: String = deployer.query_one(put, &[&"PIN-4817"]).unwrap().get(0);
    assert_eq!(retried, first, "a reader's retry returns the first version");
    assert_sql_error(
        deployer.query_one(put, &[&"PIN-0000"]),
        "23505",
        "already used for a different value of secret \"svc/pin\"",
    );
}

/// PostgreSQL has no privileges on channels: the extension refuses `LISTEN` on its own, whose
/// payloads name secrets (and, for alarms, roles and addresses), to roles outside the product.
#[test]
fn only_the_products_roles_listen_to_its_channels() {
    let cluster = Cluster::start();
    let mut db = cluster.superuser();
    db.batch_execute(
        "CREATE ROLE stranger LOGIN PASSWORD 'pw';
         CREATE ROLE member LOGIN PASSWORD 'pw' IN ROLE secrets_user;
         CREATE ROLE auditor LOGIN PASSWORD 'pw' IN ROLE secrets_auditor;
         CREATE ROLE admin LOGIN PASSWORD 'pw' IN ROLE secrets_admin;",
    )
    .unwrap();
    let listens = |role: &str, channel: &str| -> Result<(), String> {
        let mut client = cluster.connect(role, "pw");
        client
            .batch_execute(&format!("LISTEN {channel}"))
            .map_err(|error| {
                let error = error.as_db_error().expect("a server error");
                assert_eq!(error.code().code(), "42501", "{error:?}");
                error.message().to_string()
            })
    };
    let changed =
        "permission denied: listening to pg_secrets_changed is for members of secrets_user";
    let alarms =
        "permission denied: listening to pg_secrets_alarm is for secrets_auditor and secrets_admin";
    assert_eq!(
        listens("stranger", "pg_secrets_changed"),
        Err(changed.into())
    );
    assert_eq!(listens("stranger", "pg_secrets_alarm"), Err(alarms.into()));
    assert_eq!(listens("stranger", "elsewhere"), Ok(()));
    assert_eq!(listens("member", "pg_secrets_changed"), Ok(()));
    assert_eq!(listens("member", "pg_secrets_alarm"), Err(alarms.into()));
    for role in ["auditor", "admin"] {
        assert_eq!(listens(role, "pg_secrets_alarm"), Ok(()), "{role}");
        assert_eq!(listens(role, "pg_secrets_changed"), Ok(()), "{role}");
    }
    // Nor through a function's dynamic SQL.
    db.batch_execute(
        "CREATE FUNCTION public.listen_for(channel text) RETURNS void LANGUAGE plpgsql
           AS $$ BEGIN EXECUTE pg_catalog.format('LISTEN %I', channel); END $$;",
    )
    .unwrap();
    let mut stranger = cluster.connect("stranger", "pw");
    assert_sql_error(
        stranger.query("SELECT public.listen_for('pg_secrets_changed')", &[]),
        "42501",
        changed,
    );
}
