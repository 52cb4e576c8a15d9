//! Managing access: identity-based grants, resource policies, requests with approval, and the
//! policy simulator. Deciding access is `access`; this module writes what it reads.

use crate::access::{self, policy, Action, Actions, Context, HandedOn, Secret};
use crate::db;
use crate::db::required;
use crate::errors::{Error, Result};
use crate::store::{self, OnDeleted};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, Uuid};

pub const MAX_PATTERN_CHARS: usize = 512;
pub const MAX_REASON_CHARS: usize = 2048;
/// Longest time an approved request grants access for.
pub const MAX_REQUEST_DAYS: i64 = 30;

pub fn validate_pattern(pattern: &str) -> Result<()> {
    let chars = pattern.chars().count();
    if chars == 0 || chars > MAX_PATTERN_CHARS {
        return Err(Error::InvalidParameter(format!(
            "name_pattern must be 1 to {MAX_PATTERN_CHARS} characters, not {chars}"
        )));
    }
    if let Some((position, c)) = pattern
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || "/_+=.@-*?".contains(*c)))
    {
        return Err(Error::InvalidParameter(format!(
            "name_pattern has {c:?} at position {}; allowed are A-Za-z0-9/_+=.@- and the \
             wildcards * and ?",
            position + 1
        )));
    }
    Ok(())
}

pub fn validate_actions(actions: &[Option<String>]) -> Result<Vec<String>> {
    let names = actions
        .iter()
        .map(|name| crate::validate::required(name.clone(), "actions element"))
        .collect::<Result<Vec<String>>>()?;
    if names.is_empty() {
        return Err(Error::InvalidParameter(
            "actions must name at least one action".into(),
        ));
    }
    let set = Actions::parse(&names).map_err(Error::InvalidParameter)?;
    Ok(set.names().into_iter().map(str::to_string).collect())
}

/// Who may grant on a pattern: a superuser or `secrets_admin` on any pattern; anyone else only
/// on the exact name of a secret they may `manage`.
/// Returns the secret whose `manage` right allowed it, `None` for a role that may manage
/// every secret: what a grant may hand on is bounded by that right
/// (`access::within_own_manage`).
fn authorize_grant(client: &mut SpiClient<'_>, pattern: &str) -> Result<Option<Secret>> {
    let caller = access::caller();
    if access::may_on_any(caller, Action::Manage)? {
        // A grant on one secret is recorded with its id, as any other role's is, so that the
        // secret's owner and managers see in the trail who handed out access to it.
        if !access::pattern::has_wildcard(pattern) {
            if let Some(secret) = store::find_secret(client, pattern, false)? {
                crate::audit::found_secret(secret.id, pattern);
            }
        }
        return Ok(None);
    }
    if access::pattern::has_wildcard(pattern) {
        return Err(Error::AccessDenied {
            name: pattern.to_string(),
            action: "grant on a wildcard pattern (needs secrets_admin)",
        });
    }
    store::authorize(client, pattern, Action::Manage, OnDeleted::Allow)
        .map(|row| Some(row.subject()))
}

/// A grantee must exist (`regrole` takes a number as it is, and a requester may have been
/// dropped since asking) and be able to call the functions to use a grant.
fn ensure_function_access(client: &mut SpiClient<'_>, grantee: pg_sys::Oid) -> Result<()> {
    let member = db::first_value::<bool>(client.select(
        "SELECT pg_catalog.pg_has_role(oid, 'secrets_user', 'USAGE') \
         FROM pg_catalog.pg_roles WHERE oid = $1",
        None,
        &[grantee.into()],
    )?)?;
    let Some(member) = member else {
        return Err(Error::InvalidParameter(format!(
            "the grantee, role with OID {grantee}, does not exist"
        )));
    };
    if !member {
        let role = access::role_name(grantee);
        client.update(
            &format!("GRANT secrets_user TO {}", quote_ident(&role)),
            None,
            &[],
        )?;
        pgrx::notice!(
            "role \"{role}\" was made a member of secrets_user to call pg_secrets functions"
        );
    }
    Ok(())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn grant_access(
    pattern: &str,
    grantee: pg_sys::Oid,
    actions: Vec<String>,
    valid_until: Option<TimestampWithTimeZone>,
) -> Result<Uuid> {
    Spi::connect_mut(|client| {
        let bounded_by = authorize_grant(client, pattern)?;
        // One question for both bounds. The upper one: the access cache keeps expiries as
        // microseconds since 1970 in an i64, which 'infinity' and the last millennia of
        // timestamptz's range do not fit (a grant without an end is one without valid_until).
        let (expired, beyond, ends) = client
            .select(
                "SELECT $1 <= pg_catalog.now(), $1 >= '10000-01-01'::timestamptz, \
                        CASE WHEN pg_catalog.isfinite($1) AND $1 < '10000-01-01'::timestamptz \
                             THEN (pg_catalog.date_part('epoch', $1) * 1000000)::int8 END",
                None,
                &[valid_until.into()],
            )?
            .first()
            .get_three::<bool, bool, i64>()?;
        if expired == Some(true) {
            return Err(Error::InvalidParameter("valid_until is in the past".into()));
        }
        if beyond == Some(true) {
            return Err(Error::InvalidParameter(
                "valid_until must be before the year 10000; leave it NULL for a grant without \
                 an end"
                    .into(),
            ));
        }
        if let Some(secret) = bounded_by {
            access::within_own_manage(pattern, Some(secret), HandedOn::Access { ends })?;
        }
        let id = db::first_value::<Uuid>(client.update(
            "INSERT INTO secrets.access_grant \
                    (id, name_pattern, grantee, actions, valid_until, granted_by) \
             VALUES ($1, $2, $3::oid::regrole, $4, $5, $6::oid::regrole) \
             ON CONFLICT (name_pattern, grantee) WHERE request_id IS NULL DO UPDATE \
               SET actions = ARRAY(SELECT DISTINCT a FROM pg_catalog.unnest( \
                                 secrets.access_grant.actions || EXCLUDED.actions) a ORDER BY a), \
                   valid_until = EXCLUDED.valid_until, granted_by = EXCLUDED.granted_by, \
                   granted_at = pg_catalog.now() \
               WHERE secrets.access_grant.valid_until IS NOT DISTINCT FROM EXCLUDED.valid_until \
                  OR secrets.access_grant.actions OPERATOR(pg_catalog.<@) EXCLUDED.actions \
             RETURNING id",
            None,
            &[
                store::new_uuid().into(),
                pattern.into(),
                grantee.into(),
                actions.into(),
                valid_until.into(),
                access::caller().into(),
            ],
        )?)?
        // Granting again adds actions and sets the end of them all: not for actions the
        // caller did not name, whose end it would change silently (a 30-minute `get` made
        // permanent by a grant of `describe`, or a permanent one cut short).
        .ok_or_else(|| {
            Error::InvalidParameter(format!(
                "\"{pattern}\" is already granted to role {} with other actions and another \
                 valid_until, which this grant would change: give the same valid_until, name \
                 all of its actions, or revoke it first",
                access::role_name(grantee)
            ))
        })?;
        ensure_function_access(client, grantee)?;
        access::invalidate_grants();
        Ok(id)
    })
}

/// Takes `actions` (all when `None`) away from every grant of `pattern` to `grantee`,
/// including those made by approved requests; a grant left with none is removed.
pub fn revoke_access(
    pattern: &str,
    grantee: pg_sys::Oid,
    actions: Option<Vec<String>>,
) -> Result<()> {
    Spi::connect_mut(|client| {
        authorize_grant(client, pattern)?;
        let matched = db::first_value::<i64>(client.update(
            "WITH matched AS ( \
                 SELECT id, ARRAY(SELECT a FROM pg_catalog.unnest(actions) a \
                                  WHERE $3::text[] IS NOT NULL AND NOT a = ANY($3) \
                                  ORDER BY a) AS kept \
                 FROM secrets.access_grant \
                 WHERE name_pattern = $1 AND grantee = $2::oid::regrole), \
             removed AS ( \
                 DELETE FROM secrets.access_grant g USING matched m \
                 WHERE g.id = m.id AND pg_catalog.cardinality(m.kept) = 0), \
             kept AS ( \
                 UPDATE secrets.access_grant g SET actions = m.kept FROM matched m \
                 WHERE g.id = m.id AND pg_catalog.cardinality(m.kept) > 0) \
             SELECT pg_catalog.count(*) FROM matched",
            None,
            &[pattern.into(), grantee.into(), actions.into()],
        )?)?;
        if matched.unwrap_or(0) == 0 {
            return Err(Error::NoSuchObject(format!(
                "there is no grant on \"{pattern}\" to {}",
                access::role_name(grantee)
            )));
        }
        access::invalidate_grants();
        Ok(())
    })
}

/// The grants the caller may see: all for `secrets_admin`; otherwise those to roles it belongs
/// to and those on the exact names of secrets it may manage.
pub type GrantRow = (
    Uuid,
    String,
    String,
    Vec<String>,
    Option<TimestampWithTimeZone>,
    String,
    TimestampWithTimeZone,
    Option<Uuid>,
);

pub fn list_grants() -> Result<Vec<GrantRow>> {
    let caller = access::caller();
    let everything = access::may_on_any(caller, Action::Manage)?;
    Spi::connect_mut(|client| {
        let rows: Vec<(GrantRow, pg_sys::Oid)> = client
            .select(
                "SELECT id, name_pattern, grantee::text, actions, valid_until, granted_by::text, \
                        granted_at, request_id, grantee::oid \
                 FROM secrets.access_grant ORDER BY name_pattern, grantee::text",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    (
                        required(&row, 1)?,
                        required(&row, 2)?,
                        required(&row, 3)?,
                        required(&row, 4)?,
                        row.get(5)?,
                        required(&row, 6)?,
                        required(&row, 7)?,
                        row.get(8)?,
                    ),
                    required(&row, 9)?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut visible = Vec::new();
        for (row, grantee) in rows {
            let shown = everything
                || unsafe { pg_sys::has_privs_of_role(caller, grantee) }
                || (!access::pattern::has_wildcard(&row.1)
                    && store::may(client, &row.1, Action::Manage)?);
            if shown {
                visible.push(row);
            }
        }
        Ok(visible)
    })
}

fn resolve(name: &str) -> Option<pg_sys::Oid> {
    let name = std::ffi::CString::new(name).ok()?;
    let oid = unsafe { pg_sys::get_role_oid(name.as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The largest resource policy, as compact JSON (AWS Secrets Manager's limit): every backend
/// that decides on the secret keeps it parsed.
pub const MAX_POLICY_BYTES: usize = 20_480;

/// `validate_resource_policy`: everything wrong with a policy, as (statement, problem) rows;
/// statement 0 is the document itself.
pub fn validate_policy(document: &serde_json::Value) -> Vec<(i32, String)> {
    let size = document.to_string().len();
    if size > MAX_POLICY_BYTES {
        return vec![(
            0,
            format!("a policy is at most {MAX_POLICY_BYTES} bytes of JSON, this one has {size}"),
        )];
    }
    let mut findings = Vec::new();
    if let Err(fatal) = policy::parse(document, &mut resolve, &mut findings) {
        findings.push(fatal);
        findings.sort_by_key(|finding| finding.statement);
    }
    findings
        .into_iter()
        .map(|finding| (finding.statement, finding.problem))
        .collect()
}

pub fn put_policy(name: &str, document: JsonB, block_public_policy: bool) -> Result<()> {
    let findings: Vec<(i32, String)> = validate_policy(&document.0)
        .into_iter()
        .filter(|(_, problem)| {
            block_public_policy || !problem.starts_with("grants get to everyone")
        })
        .collect();
    if let Some((statement, problem)) = findings.first() {
        let hint = if problem.starts_with("grants get to everyone") {
            "; pass block_public_policy => false to allow it"
        } else {
            ""
        };
        return Err(Error::InvalidParameter(format!(
            "resource policy for secret \"{name}\" refused: statement {statement}: {problem}{hint}"
        )));
    }
    Spi::connect_mut(|client| {
        let secret = store::authorize(client, name, Action::Manage, OnDeleted::Refuse)?;
        access::within_own_manage(name, Some(secret.subject()), HandedOn::Policy)?;
        let binding = access::denials_binding_caller(secret.subject())?;
        if !binding.is_empty() {
            let current: Option<JsonB> = db::first_value(client.select(
                "SELECT policy FROM secrets.resource_policy WHERE secret_id = $1",
                None,
                &[secret.id.into()],
            )?)?;
            let statements = |policy: &serde_json::Value| policy["statements"].as_array().cloned();
            let (before, after) = (
                current
                    .and_then(|policy| statements(&policy.0))
                    .unwrap_or_default(),
                statements(&document.0).unwrap_or_default(),
            );
            // A binding statement must stay, word for word (JSON equality: key order and
            // spacing aside); where it stands in the new policy does not matter.
            if let Some(&lifted) = binding
                .iter()
                .find(|&&index| before.get(index).is_none_or(|kept| !after.contains(kept)))
            {
                return Err(access::lifts_own_denial(name, lifted));
            }
        }
        client.update(
            "INSERT INTO secrets.resource_policy (secret_id, policy, changed_by) \
             VALUES ($1, $2, $3::oid::regrole) \
             ON CONFLICT (secret_id) DO UPDATE SET policy = EXCLUDED.policy, \
                 changed_by = EXCLUDED.changed_by, changed_at = pg_catalog.now()",
            None,
            &[secret.id.into(), document.into(), access::caller().into()],
        )?;
        access::invalidate_policies();
        Ok(())
    })
}

pub fn get_policy(name: &str) -> Result<Option<JsonB>> {
    Spi::connect_mut(|client| {
        let secret = store::authorize(client, name, Action::Describe, OnDeleted::Allow)?;
        db::first_value(client.select(
            "SELECT policy FROM secrets.resource_policy WHERE secret_id = $1",
            None,
            &[secret.id.into()],
        )?)
    })
}

pub fn delete_policy(name: &str) -> Result<()> {
    Spi::connect_mut(|client| {
        let secret = store::authorize(client, name, Action::Manage, OnDeleted::Allow)?;
        // A policy's deny statements are access too: lifting them hands it on.
        access::within_own_manage(name, Some(secret.subject()), HandedOn::Policy)?;
        if let Some(&lifted) = access::denials_binding_caller(secret.subject())?.first() {
            return Err(access::lifts_own_denial(name, lifted));
        }
        client.update(
            "DELETE FROM secrets.resource_policy WHERE secret_id = $1",
            None,
            &[secret.id.into()],
        )?;
        access::invalidate_policies();
        Ok(())
    })
}

/// `check_access`: what the predicate says for `role`, and why. Anyone may ask about
/// themselves; about another role, only who may manage the secret.
pub fn check(role: pg_sys::Oid, action: Action, name: &str) -> Result<(bool, String)> {
    let caller = access::caller();
    Spi::connect_mut(|client| {
        let asks_about_self = unsafe { pg_sys::has_privs_of_role(caller, role) };
        let secret = if asks_about_self {
            store::find_secret(client, name, false)?
        } else {
            Some(store::authorize(
                client,
                name,
                Action::Manage,
                OnDeleted::Allow,
            )?)
        }
        .map(|s| Secret {
            id: s.id,
            owner: s.owner,
        });
        let basis = access::decide(role, action, name, secret, Context::Session)?;
        // Which statement denies is shown only to a caller that may describe the secret: a
        // deny statement naming the caller would otherwise tell it that a secret it may not
        // see exists, which `get` and `describe` do not (they refuse a missing secret and a
        // forbidden one alike). Without `describe`, both denials read as a missing secret's.
        let may_describe = || {
            access::decide(caller, Action::Describe, name, secret, Context::Session)
                .map(|basis| basis.allows())
        };
        let reason = if asks_about_self && !basis.allows() && !may_describe()? {
            NOT_ALLOWED_UNEXPLAINED.to_string()
        } else {
            basis.describe()
        };
        Ok((basis.allows(), reason))
    })
}

/// `check_access`'s reason for a denial the caller may not see the details of.
const NOT_ALLOWED_UNEXPLAINED: &str = "no grant, resource policy statement or ownership allows \
     it, or the secret's resource policy denies it (the statement is shown to roles that may \
     describe the secret)";

fn interval_seconds(duration: &pgrx::datum::Interval) -> Result<i64> {
    if duration.months() != 0 {
        return Err(Error::InvalidParameter(
            "duration must be given in days, hours, minutes or seconds".into(),
        ));
    }
    Ok(i64::from(duration.days()) * 86_400 + duration.micros() / 1_000_000)
}

pub fn request_access(
    name: &str,
    actions: Vec<String>,
    duration: pgrx::datum::Interval,
    reason: &str,
) -> Result<Uuid> {
    // With manage a requester could grant itself lasting access, outliving the approval.
    if actions
        .iter()
        .any(|action| action == Action::Manage.as_str())
    {
        return Err(Error::InvalidParameter(
            "manage cannot be requested: it would let the requester grant itself lasting \
             access; ask an administrator for a grant"
                .into(),
        ));
    }
    let seconds = interval_seconds(&duration)?;
    if !(60..=MAX_REQUEST_DAYS * 86_400).contains(&seconds) {
        return Err(Error::InvalidParameter(format!(
            "duration must be between 1 minute and {MAX_REQUEST_DAYS} days"
        )));
    }
    let reason_chars = reason.trim().chars().count();
    if reason_chars == 0 || reason.chars().count() > MAX_REASON_CHARS {
        return Err(Error::InvalidParameter(format!(
            "reason must be 1 to {MAX_REASON_CHARS} characters"
        )));
    }
    Spi::connect_mut(|client| {
        // The request's record names an existing secret by id too, so its managers, who
        // decide the request, see it in the trail.
        if let Some(secret) = store::find_secret(client, name, false)? {
            crate::audit::found_secret(secret.id, name);
        }
        let id = store::new_uuid();
        client.update(
            "INSERT INTO secrets.access_request \
                    (id, secret_name, requester, actions, duration, reason) \
             VALUES ($1, $2, $3::oid::regrole, $4, pg_catalog.make_interval(secs => $5), $6)",
            None,
            &[
                id.into(),
                name.into(),
                access::caller().into(),
                actions.into(),
                (seconds as f64).into(),
                reason.into(),
            ],
        )?;
        Ok(id)
    })
}

/// Approves (`approve`) or denies a pending request. The decider needs `manage` on the secret
/// and can never be the requester, a role the requester can act as, or the requester's session.
pub fn decide_request(id: Uuid, approve: bool) -> Result<Option<Uuid>> {
    let caller = access::caller();
    Spi::connect_mut(|client| {
        let request = client
            .update(
                "SELECT secret_name, requester::oid, actions, state, \
                        pg_catalog.date_part('epoch', duration)::float8 \
                 FROM secrets.access_request WHERE id = $1 FOR UPDATE",
                Some(1),
                &[id.into()],
            )?
            .next()
            .map(|row| -> Result<_> {
                Ok((
                    required::<String>(&row, 1)?,
                    required::<pg_sys::Oid>(&row, 2)?,
                    required::<Vec<String>>(&row, 3)?,
                    required::<String>(&row, 4)?,
                    required::<f64>(&row, 5)?,
                ))
            })
            .transpose()?;
        let Some((name, requester, actions, state, seconds)) = request else {
            return Err(Error::NoSuchObject(format!(
                "there is no access request {id}"
            )));
        };
        let secret = store::authorize(client, &name, Action::Manage, OnDeleted::Refuse)?;
        // Nor anyone the requester can act as (SET ROLE to a group it belongs to, INHERIT or
        // not) or who can act as the requester, nor a session the requester logged in as. A
        // superuser can act as every role, yet may decide: it could grant the access outright.
        let session_user = unsafe { pg_sys::GetSessionUserId() };
        let same_person = caller == requester
            || session_user == requester
            || unsafe {
                (!pg_sys::superuser_arg(caller) && pg_sys::is_member_of_role(caller, requester))
                    || pg_sys::is_member_of_role(requester, caller)
                    // A person who asked as one of its groups and decides as another.
                    || (!pg_sys::superuser_arg(session_user)
                        && pg_sys::is_member_of_role(session_user, requester))
            };
        if same_person {
            return Err(Error::AccessDenied {
                name,
                action: "decide on your own access request",
            });
        }
        if state != "pending" {
            return Err(Error::RequestDecided {
                id: id.to_string(),
                state,
            });
        }
        let grant_id = if approve {
            let ends = access::now_micros() + (seconds * 1e6) as i64;
            access::within_own_manage(
                &name,
                Some(secret.subject()),
                HandedOn::Access { ends: Some(ends) },
            )?;
            let grant_id = store::new_uuid();
            client.update(
                "INSERT INTO secrets.access_grant \
                        (id, name_pattern, grantee, actions, valid_until, granted_by, request_id) \
                 VALUES ($1, $2, $3::oid::regrole, $4, \
                         pg_catalog.now() + pg_catalog.make_interval(secs => $5), \
                         $6::oid::regrole, $7)",
                None,
                &[
                    grant_id.into(),
                    name.clone().into(),
                    requester.into(),
                    actions.into(),
                    seconds.into(),
                    caller.into(),
                    id.into(),
                ],
            )?;
            ensure_function_access(client, requester)?;
            access::invalidate_grants();
            Some(grant_id)
        } else {
            None
        };
        client.update(
            "UPDATE secrets.access_request SET state = $2, decided_by = $3::oid::regrole, \
                    decided_at = pg_catalog.now(), grant_id = $4 WHERE id = $1",
            None,
            &[
                id.into(),
                if approve { "approved" } else { "denied" }.into(),
                caller.into(),
                grant_id.into(),
            ],
        )?;
        Ok(grant_id)
    })
}

pub type RequestRow = (
    Uuid,
    String,
    String,
    Vec<String>,
    pgrx::datum::Interval,
    String,
    String,
    TimestampWithTimeZone,
    Option<String>,
    Option<TimestampWithTimeZone>,
    Option<Uuid>,
);

/// The requests the caller made (or a role it belongs to made), and those on secrets it may
/// manage.
pub fn list_requests(state: Option<&str>) -> Result<Vec<RequestRow>> {
    const STATES: [&str; 3] = ["pending", "approved", "denied"];
    if let Some(state) = state.filter(|state| !STATES.contains(state)) {
        return Err(Error::InvalidParameter(format!(
            "unknown request state \"{state}\"; states are pending, approved and denied"
        )));
    }
    let caller = access::caller();
    Spi::connect_mut(|client| {
        let rows: Vec<(RequestRow, pg_sys::Oid)> = client
            .select(
                "SELECT id, secret_name, requester::text, actions, duration, reason, state, \
                        requested_at, decided_by::text, decided_at, grant_id, requester::oid \
                 FROM secrets.access_request WHERE $1::text IS NULL OR state = $1 \
                 ORDER BY requested_at",
                None,
                &[state.into()],
            )?
            .map(|row| {
                Ok((
                    (
                        required(&row, 1)?,
                        required(&row, 2)?,
                        required(&row, 3)?,
                        required(&row, 4)?,
                        required(&row, 5)?,
                        required(&row, 6)?,
                        required(&row, 7)?,
                        required(&row, 8)?,
                        row.get(9)?,
                        row.get(10)?,
                        row.get(11)?,
                    ),
                    required(&row, 12)?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut visible = Vec::new();
        for (row, requester) in rows {
            if unsafe { pg_sys::has_privs_of_role(caller, requester) }
                || store::may(client, &row.1, Action::Manage)?
            {
                visible.push(row);
            }
        }
        Ok(visible)
    })
}

/// For the row-level security policy: may the caller describe this secret?
pub fn may_describe(id: Uuid, name: &str, owner: pg_sys::Oid) -> Result<bool> {
    access::shown(
        access::caller(),
        Action::Describe,
        name,
        Secret { id, owner },
        Context::Session,
    )
}
