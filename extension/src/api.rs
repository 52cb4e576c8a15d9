//! The SQL functions of schema `secrets`. Each one checks its arguments, calls the store as the
//! extension's owner on behalf of its caller (`sql`, see `access::as_owner` for why they are
//! SECURITY INVOKER), and turns errors into PostgreSQL errors with their SQLSTATE. All run with
//! a fixed search path (`pg_catalog, pg_temp`; `pg_catalog` alone for the read functions), so
//! a caller's schemas, operators, functions or temporary tables cannot change what they do.
//!
//! Pass secret values as bind parameters: a literal in the query text can reach the server
//! log (log_statement) before any function runs.

// pgrx reports errors from the ErrorReport in the Err variant; its size is pgrx's choice and it
// is returned at most once per call.
#![allow(clippy::result_large_err)]
// Set-returning functions spell their columns with name!() in the signature, where pgrx reads
// them; a type alias would hide them from the SQL generator.
#![allow(clippy::type_complexity)]

use crate::access;
use crate::audit;
use crate::crypto::ValueKind;
use crate::db::with_catalog_search_path;
use crate::errors::{Error, Result as StoreResult};
use crate::password::{self, PasswordRules};
use crate::store::{self, NewSecret};
use crate::validate::{self, required};
use pgrx::datum::{Date, TimestampWithTimeZone};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

/// Runs a SQL function's body as the extension's owner on behalf of its caller
/// (`access::as_owner`), and turns its error into a PostgreSQL error with its SQLSTATE.
pub fn sql<T>(body: impl FnOnce() -> StoreResult<T>) -> Result<T, ErrorReport> {
    access::as_owner(body).map_err(ErrorReport::from)
}

pub fn valid_name(name: Option<&str>) -> StoreResult<&str> {
    let name = required(name, "name")?;
    validate::secret_name(name)?;
    Ok(name)
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn create_secret(
    name: Option<&str>,
    secret_string: default!(Option<&str>, "NULL"),
    secret_binary: default!(Option<&[u8]>, "NULL"),
    description: default!(Option<&str>, "NULL"),
    tags: default!(Option<JsonB>, "NULL"),
    key_id: default!(Option<&str>, "NULL"),
    client_request_token: default!(Option<&str>, "NULL"),
) -> Result<Option<Uuid>, ErrorReport> {
    sql(|| {
        audit::audited("create", "create_secret", name, || {
            let name = valid_name(name)?;
            let value = validate::value(secret_string, secret_binary, false)?;
            validate::description(description)?;
            let tags = match &tags {
                Some(tags) => validate::tags(tags)?,
                None => Default::default(),
            };
            validate::key_id(key_id)?;
            validate::client_request_token(client_request_token)?;
            store::create_secret(NewSecret {
                name,
                value,
                description,
                tags,
                key_id,
                token: client_request_token,
            })
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn put_secret_value(
    name: Option<&str>,
    secret_string: default!(Option<&str>, "NULL"),
    secret_binary: default!(Option<&[u8]>, "NULL"),
    version_stages: default!(Option<Vec<Option<String>>>, "'{CURRENT}'"),
    client_request_token: default!(Option<&str>, "NULL"),
) -> Result<Uuid, ErrorReport> {
    sql(|| {
        audit::audited("put", "put_secret_value", name, || {
            let name = valid_name(name)?;
            let value = validate::value(secret_string, secret_binary, true)?.expect("required");
            let stages = validate::stages(&required(version_stages, "version_stages")?)?;
            validate::client_request_token(client_request_token)?;
            store::put_secret_value(name, value, stages, client_request_token)
        })
    })
}

fn fetch(
    name: Option<&str>,
    version_id: Option<Uuid>,
    version_stage: Option<&str>,
    expect: Option<ValueKind>,
) -> StoreResult<store::Fetched> {
    let name = valid_name(name)?;
    if let Some(stage) = version_stage {
        validate::label(stage)?;
    }
    store::get_secret(name, version_id, version_stage, expect)
}

// The read functions set their search path with `db::with_catalog_search_path` rather than a
// `#[search_path]` clause, whose cost on every call slowed reads by 15% (README, Access control).
#[pg_extern]
fn get_secret_value(
    name: Option<&str>,
    version_id: default!(Option<Uuid>, "NULL"),
    version_stage: default!(Option<&str>, "NULL"),
) -> Result<String, ErrorReport> {
    sql(|| {
        with_catalog_search_path(|| {
            audit::audited("get", "get_secret_value", name, || {
                let mut fetched = fetch(name, version_id, version_stage, Some(ValueKind::String))?;
                as_string(fetched.take_plaintext(), name.unwrap_or_default())
            })
        })
    })
}

/// Strings are stored from `text`, so they are UTF-8 unless the row was tampered with.
fn as_string(bytes: Vec<u8>, name: &str) -> StoreResult<String> {
    String::from_utf8(bytes).map_err(|_| Error::Integrity(name.to_string()))
}

#[pg_extern]
fn get_secret_binary(
    name: Option<&str>,
    version_id: default!(Option<Uuid>, "NULL"),
    version_stage: default!(Option<&str>, "NULL"),
) -> Result<Vec<u8>, ErrorReport> {
    sql(|| {
        with_catalog_search_path(|| {
            audit::audited("get", "get_secret_binary", name, || {
                fetch(name, version_id, version_stage, Some(ValueKind::Binary))
                    .map(|mut fetched| fetched.take_plaintext())
            })
        })
    })
}

type BatchRow = (
    Option<String>,
    Option<Uuid>,
    Option<Vec<String>>,
    Option<String>,
    Option<Vec<u8>>,
    Option<String>,
    Option<String>,
);

/// One row per name; a failure becomes a row with `error` and `sqlstate` instead of aborting
/// the whole batch.
#[pg_extern]
fn batch_get_secret_value(
    names: Option<Vec<Option<String>>>,
) -> Result<
    TableIterator<
        'static,
        (
            name!(name, Option<String>),
            name!(version_id, Option<Uuid>),
            name!(version_stages, Option<Vec<String>>),
            name!(secret_string, Option<String>),
            name!(secret_binary, Option<Vec<u8>>),
            name!(error, Option<String>),
            name!(sqlstate, Option<String>),
        ),
    >,
    ErrorReport,
> {
    let names = sql(|| required(names, "names"))?;
    if names.len() > validate::MAX_BATCH_NAMES {
        return sql(|| {
            Err(Error::LimitExceeded(format!(
                "batch_get_secret_value reads at most {} names at once, {} were given",
                validate::MAX_BATCH_NAMES,
                names.len()
            )))
        });
    }
    let rows: Vec<BatchRow> = sql(|| {
        Ok(with_catalog_search_path(|| {
            names.into_iter().map(batch_row).collect()
        }))
    })?;
    Ok(TableIterator::new(rows))
}

fn batch_row(name: Option<String>) -> BatchRow {
    let fetched = audit::audited("get", "batch_get_secret_value", name.as_deref(), || {
        let mut fetched = fetch(name.as_deref(), None, None, None)?;
        let (string, binary) = match fetched.kind {
            ValueKind::String => (
                Some(as_string(
                    fetched.take_plaintext(),
                    name.as_deref().unwrap_or(""),
                )?),
                None,
            ),
            ValueKind::Binary => (None, Some(fetched.take_plaintext())),
        };
        Ok((
            fetched.version_id,
            store::stages_of(fetched.version_id)?,
            string,
            binary,
        ))
    });
    match fetched {
        Ok((version_id, stages, string, binary)) => (
            name,
            Some(version_id),
            Some(stages),
            string,
            binary,
            None,
            None,
        ),
        Err(error) => {
            let sqlstate = error.sqlstate().1.to_string();
            (
                name,
                None,
                None,
                None,
                None,
                Some(error.to_string()),
                Some(sqlstate),
            )
        }
    }
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn update_secret(
    name: Option<&str>,
    description: default!(Option<&str>, "NULL"),
    key_id: default!(Option<&str>, "NULL"),
) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "update_secret", name, || {
            let name = valid_name(name)?;
            if description.is_none() && key_id.is_none() {
                return Err(Error::InvalidParameter(
                    "give description, key_id or both".into(),
                ));
            }
            validate::description(description)?;
            validate::key_id(key_id)?;
            store::update_secret(name, description, key_id)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn update_secret_version_stage(
    name: Option<&str>,
    version_stage: Option<&str>,
    move_to_version_id: default!(Option<Uuid>, "NULL"),
    remove_from_version_id: default!(Option<Uuid>, "NULL"),
) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("put", "update_secret_version_stage", name, || {
            let name = valid_name(name)?;
            let stage = required(version_stage, "version_stage")?;
            validate::label(stage)?;
            store::update_version_stage(name, stage, move_to_version_id, remove_from_version_id)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn describe_secret(name: Option<&str>) -> Result<JsonB, ErrorReport> {
    sql(|| {
        audit::audited("describe", "describe_secret", name, || {
            valid_name(name).and_then(store::describe_secret)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn list_secrets(
    name_prefix: default!(Option<&str>, "NULL"),
    tag_key: default!(Option<&str>, "NULL"),
    tag_value: default!(Option<&str>, "NULL"),
    include_planned_deletion: default!(Option<bool>, "false"),
) -> Result<
    TableIterator<
        'static,
        (
            name!(name, String),
            name!(id, Uuid),
            name!(description, Option<String>),
            name!(tags, JsonB),
            name!(owner, String),
            name!(created_at, TimestampWithTimeZone),
            name!(last_changed_at, TimestampWithTimeZone),
            name!(last_accessed_on, Option<Date>),
            name!(deleted_at, Option<TimestampWithTimeZone>),
            name!(purge_at, Option<TimestampWithTimeZone>),
        ),
    >,
    ErrorReport,
> {
    let include = sql(|| required(include_planned_deletion, "include_planned_deletion"))?;
    let listed = sql(|| {
        audit::audited("describe", "list_secrets", None, || {
            store::list_secrets(name_prefix, tag_key, tag_value, include)
        })
    })?;
    Ok(TableIterator::new(listed.into_iter().map(|s| {
        (
            s.name,
            s.id,
            s.description,
            s.tags,
            s.owner,
            s.created_at,
            s.last_changed_at,
            s.last_accessed_on,
            s.deleted_at,
            s.purge_at,
        )
    })))
}

/// The rows of the view `secret_list`: every secret the caller may describe, deleted ones
/// included, with its rotation settings. The view reads them through this function, not from
/// the table behind its row-level security policy: `EXPLAIN ANALYZE` of a query on a table
/// counts the rows a policy removed, which would tell any role which names exist.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn secret_list_rows() -> Result<
    TableIterator<
        'static,
        (
            name!(id, Uuid),
            name!(name, String),
            name!(description, Option<String>),
            name!(tags, JsonB),
            name!(owner_oid, pg_sys::Oid),
            name!(key_id, String),
            name!(created_at, TimestampWithTimeZone),
            name!(last_changed_at, TimestampWithTimeZone),
            name!(last_accessed_on, Option<Date>),
            name!(deleted_at, Option<TimestampWithTimeZone>),
            name!(purge_at, Option<TimestampWithTimeZone>),
            name!(rotation_enabled, bool),
            name!(rotator, Option<String>),
            name!(rotation_schedule, Option<String>),
            name!(next_rotation_at, Option<TimestampWithTimeZone>),
            name!(last_rotated_at, Option<TimestampWithTimeZone>),
        ),
    >,
    ErrorReport,
> {
    let listed = sql(|| {
        audit::audited("describe", "secret_list", None, || {
            store::list_secrets(None, None, None, true)
        })
    })?;
    Ok(TableIterator::new(listed.into_iter().map(|s| {
        (
            s.id,
            s.name,
            s.description,
            s.tags,
            s.owner_oid,
            s.key_id,
            s.created_at,
            s.last_changed_at,
            s.last_accessed_on,
            s.deleted_at,
            s.purge_at,
            s.rotation_enabled,
            s.rotator,
            s.rotation_schedule,
            s.next_rotation_at,
            s.last_rotated_at,
        )
    })))
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn list_secret_version_ids(
    name: Option<&str>,
    include_deprecated: default!(Option<bool>, "false"),
) -> Result<
    TableIterator<
        'static,
        (
            name!(version_id, Uuid),
            name!(version_stages, Vec<String>),
            name!(created_at, TimestampWithTimeZone),
        ),
    >,
    ErrorReport,
> {
    let versions = sql(|| {
        audit::audited("describe", "list_secret_version_ids", name, || {
            let name = valid_name(name)?;
            store::list_version_ids(name, required(include_deprecated, "include_deprecated")?)
        })
    })?;
    Ok(TableIterator::new(versions))
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn tag_secret(name: Option<&str>, tags: Option<JsonB>) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "tag_secret", name, || {
            let name = valid_name(name)?;
            let tags = validate::tags(&required(tags, "tags")?)?;
            store::tag_secret(name, tags)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn untag_secret(
    name: Option<&str>,
    tag_keys: Option<Vec<Option<String>>>,
) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "untag_secret", name, || {
            let name = valid_name(name)?;
            let keys = required(tag_keys, "tag_keys")?
                .into_iter()
                .map(|key| required(key, "tag_keys element"))
                .collect::<StoreResult<Vec<String>>>()?;
            keys.iter().try_for_each(|key| validate::tag_key(key))?;
            store::untag_secret(name, keys)
        })
    })
}

/// `recovery_window_days` NULL means the default of 30 days; giving it together with
/// `force_delete_without_recovery` is refused, since the two contradict each other.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn delete_secret(
    name: Option<&str>,
    recovery_window_days: default!(Option<i32>, "NULL"),
    force_delete_without_recovery: default!(Option<bool>, "false"),
) -> Result<TimestampWithTimeZone, ErrorReport> {
    sql(|| {
        audit::audited("delete", "delete_secret", name, || {
            let name = valid_name(name)?;
            let force = required(
                force_delete_without_recovery,
                "force_delete_without_recovery",
            )?;
            let window = validate::recovery_window(recovery_window_days, force)?;
            store::delete_secret(name, window, force)
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn restore_secret(name: Option<&str>) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("delete", "restore_secret", name, || {
            valid_name(name).and_then(store::restore_secret)
        })
    })
}

/// Removes the secrets whose recovery window has ended; returns how many.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn purge_deleted_secrets() -> Result<i64, ErrorReport> {
    sql(|| {
        audit::audited("delete", "purge_deleted_secrets", None, || {
            crate::access::require_on_every_secret(
                crate::access::Action::Delete,
                "purging deleted secrets",
            )?;
            store::purge_expired("purge_deleted_secrets")
        })
    })
}

#[allow(clippy::too_many_arguments)]
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn get_random_password(
    password_length: default!(Option<i32>, 32),
    exclude_characters: default!(Option<&str>, "''"),
    exclude_numbers: default!(Option<bool>, false),
    exclude_punctuation: default!(Option<bool>, false),
    exclude_uppercase: default!(Option<bool>, false),
    exclude_lowercase: default!(Option<bool>, false),
    include_space: default!(Option<bool>, false),
    require_each_included_type: default!(Option<bool>, true),
) -> Result<String, ErrorReport> {
    sql(|| {
        password::random_password(&PasswordRules {
            length: required(password_length, "password_length")?,
            exclude_characters: required(exclude_characters, "exclude_characters")?,
            exclude_numbers: required(exclude_numbers, "exclude_numbers")?,
            exclude_punctuation: required(exclude_punctuation, "exclude_punctuation")?,
            exclude_uppercase: required(exclude_uppercase, "exclude_uppercase")?,
            exclude_lowercase: required(exclude_lowercase, "exclude_lowercase")?,
            include_space: required(include_space, "include_space")?,
            require_each_included_type: required(
                require_each_included_type,
                "require_each_included_type",
            )?,
        })
    })
}
