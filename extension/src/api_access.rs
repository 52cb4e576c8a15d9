//! The SQL functions of access control: grants, resource policies, requests with approval and
//! the policy simulator, plus the predicate the row-level security policy calls. Like those in
//! `api.rs`, each acts as the extension's owner on behalf of its caller with a fixed
//! search_path; patterns and names only ever travel as bind parameters.

#![allow(clippy::result_large_err)]
#![allow(clippy::type_complexity)]

use crate::access::{self, Action};
use crate::api::{sql, valid_name};
use crate::audit;
use crate::errors::Error;
use crate::grants;
use crate::regrole::RegRole;
use crate::validate::required;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

/// Grants `actions` on every secret whose name matches `name_pattern` to `grantee` and its
/// members, until `valid_until` (forever when NULL). Granting again adds actions.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn grant_access(
    name_pattern: Option<&str>,
    grantee: Option<RegRole>,
    actions: Option<Vec<Option<String>>>,
    valid_until: default!(Option<TimestampWithTimeZone>, "NULL"),
) -> Result<Uuid, ErrorReport> {
    sql(|| {
        audit::audited("manage", "grant_access", name_pattern, || {
            let pattern = required(name_pattern, "name_pattern")?;
            grants::validate_pattern(pattern)?;
            let grantee = required(grantee, "grantee")?;
            let actions = grants::validate_actions(&required(actions, "actions")?)?;
            grants::grant_access(pattern, grantee.0, actions, valid_until)
        })
    })
}

/// Takes `actions` (all of them when NULL) away from the grants of `name_pattern` to `grantee`.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn revoke_access(
    name_pattern: Option<&str>,
    grantee: Option<RegRole>,
    actions: default!(Option<Vec<Option<String>>>, "NULL"),
) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "revoke_access", name_pattern, || {
            let pattern = required(name_pattern, "name_pattern")?;
            grants::validate_pattern(pattern)?;
            let grantee = required(grantee, "grantee")?;
            let actions = actions
                .map(|actions| grants::validate_actions(&actions))
                .transpose()?;
            grants::revoke_access(pattern, grantee.0, actions)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn list_access_grants() -> Result<
    TableIterator<
        'static,
        (
            name!(id, Uuid),
            name!(name_pattern, String),
            name!(grantee, String),
            name!(actions, Vec<String>),
            name!(valid_until, Option<TimestampWithTimeZone>),
            name!(granted_by, String),
            name!(granted_at, TimestampWithTimeZone),
            name!(request_id, Option<Uuid>),
        ),
    >,
    ErrorReport,
> {
    Ok(TableIterator::new(sql(|| {
        audit::audited("describe", "list_access_grants", None, grants::list_grants)
    })?))
}

/// Puts (replaces) a secret's resource policy. Refused when it names unknown roles or actions,
/// and when it lets everyone `get` unless `block_public_policy` is false.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn put_resource_policy(
    name: Option<&str>,
    policy: Option<JsonB>,
    block_public_policy: default!(Option<bool>, "true"),
) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "put_resource_policy", name, || {
            let name = valid_name(name)?;
            grants::put_policy(
                name,
                required(policy, "policy")?,
                required(block_public_policy, "block_public_policy")?,
            )
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn get_resource_policy(name: Option<&str>) -> Result<Option<JsonB>, ErrorReport> {
    sql(|| {
        audit::audited("describe", "get_resource_policy", name, || {
            valid_name(name).and_then(grants::get_policy)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn delete_resource_policy(name: Option<&str>) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "delete_resource_policy", name, || {
            valid_name(name).and_then(grants::delete_policy)
        })
    })
}

/// Every problem of a policy: unknown roles and actions, malformed statements, and
/// statements that let everyone `get`. No rows: the policy is fine.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn validate_resource_policy(
    policy: Option<JsonB>,
) -> Result<TableIterator<'static, (name!(statement, i32), name!(problem, String))>, ErrorReport> {
    let problems = sql(|| Ok(grants::validate_policy(&required(policy, "policy")?.0)))?;
    Ok(TableIterator::new(problems))
}

/// The policy simulator: would `role` be allowed `action` on secret `name`, and what decides.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn check_access(
    role: Option<RegRole>,
    action: Option<&str>,
    name: Option<&str>,
) -> Result<TableIterator<'static, (name!(allowed, bool), name!(reason, String))>, ErrorReport> {
    let answer = sql(|| {
        audit::audited("describe", "check_access", name, || {
            let role = access::existing_role(required(role, "role")?.0)?;
            let action = required(action, "action")?;
            let action = Action::parse(action).ok_or_else(|| {
                Error::InvalidParameter(format!(
                    "unknown action \"{action}\"; actions are get, describe, put, rotate, delete \
                 and manage"
                ))
            })?;
            grants::check(role, action, valid_name(name)?)
        })
    })?;
    Ok(TableIterator::once(answer))
}

/// Asks for time-bound access to a secret; a role that may manage it approves or denies.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn request_access(
    name: Option<&str>,
    actions: Option<Vec<Option<String>>>,
    duration: Option<Interval>,
    reason: Option<&str>,
) -> Result<Uuid, ErrorReport> {
    sql(|| {
        audit::audited("request", "request_access", name, || {
            let name = valid_name(name)?;
            let actions = grants::validate_actions(&required(actions, "actions")?)?;
            grants::request_access(
                name,
                actions,
                required(duration, "duration")?,
                required(reason, "reason")?,
            )
        })
    })
}

/// Approves a pending request: a grant of its actions on the secret, expiring after its
/// duration. Returns the grant's id.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn approve_access_request(id: Option<Uuid>) -> Result<Option<Uuid>, ErrorReport> {
    sql(|| {
        audit::audited("manage", "approve_access_request", None, || {
            required(id, "id").and_then(|id| grants::decide_request(id, true))
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn deny_access_request(id: Option<Uuid>) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "deny_access_request", None, || {
            required(id, "id").and_then(|id| grants::decide_request(id, false).map(drop))
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn list_access_requests(
    state: default!(Option<&str>, "NULL"),
) -> Result<
    TableIterator<
        'static,
        (
            name!(id, Uuid),
            name!(secret_name, String),
            name!(requester, String),
            name!(actions, Vec<String>),
            name!(duration, Interval),
            name!(reason, String),
            name!(state, String),
            name!(requested_at, TimestampWithTimeZone),
            name!(decided_by, Option<String>),
            name!(decided_at, Option<TimestampWithTimeZone>),
            name!(grant_id, Option<Uuid>),
        ),
    >,
    ErrorReport,
> {
    Ok(TableIterator::new(sql(|| {
        audit::audited("describe", "list_access_requests", None, || {
            grants::list_requests(state)
        })
    })?))
}

/// The row-level security predicate of `secrets.secret`: may the caller describe this secret.
#[pg_extern(stable, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
fn may_describe(
    id: Option<Uuid>,
    name: Option<&str>,
    owner: Option<RegRole>,
) -> Result<bool, ErrorReport> {
    match (id, name, owner) {
        (Some(id), Some(name), Some(owner)) => sql(|| grants::may_describe(id, name, owner.0)),
        _ => Ok(false),
    }
}
