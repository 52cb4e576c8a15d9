//! The SQL functions of rotation and master-key rotation. Like those in `api.rs`, each acts as
//! the extension's owner on behalf of its caller with a fixed search_path, checks its
//! arguments, and leaves the work to `rotation.rs` and `rewrap.rs`.

#![allow(clippy::result_large_err)]
#![allow(clippy::type_complexity)]

use crate::access;
use crate::api::{sql, valid_name};
use crate::audit;
use crate::errors::{Error, Result as StoreResult};
use crate::regrole::RegRole;
use crate::rewrap;
use crate::rotation::{self, Request};
use crate::validate::required;
use pgrx::datum::Interval;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::Uuid;

fn window_seconds(window: Option<Interval>) -> StoreResult<Option<i64>> {
    window
        .map(|window| {
            if window.months() != 0 {
                return Err(Error::InvalidParameter(
                    "rotation_window must be given in days, hours, minutes or seconds".into(),
                ));
            }
            Ok(i64::from(window.days()) * 86_400 + window.micros() / 1_000_000)
        })
        .transpose()
}

/// Sets rotation (rotator, schedule, window) and, unless `rotate_immediately` is false,
/// rotates now; returns the pending version of the rotation started (or joined). Naming the
/// rotator pins the target CURRENT names; `new_target` allows pinning another than before.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn rotate_secret(
    name: Option<&str>,
    rotator: default!(Option<&str>, "NULL"),
    schedule: default!(Option<&str>, "NULL"),
    rotation_window: default!(Option<Interval>, "NULL"),
    rotate_immediately: default!(Option<bool>, "true"),
    new_target: default!(Option<bool>, "false"),
) -> Result<Option<Uuid>, ErrorReport> {
    sql(|| {
        audit::audited("rotate", "rotate_secret", name, || {
            let name = valid_name(name)?;
            rotation::rotate_secret(
                name,
                Request {
                    rotator,
                    schedule,
                    window_seconds: window_seconds(rotation_window)?,
                    immediately: required(rotate_immediately, "rotate_immediately")?,
                    new_target: required(new_target, "new_target")?,
                },
            )
        })
    })
}

/// Turns scheduled rotation off and cancels a rotation that has not changed its target yet.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn cancel_rotate_secret(name: Option<&str>) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "cancel_rotate_secret", name, || {
            valid_name(name).and_then(rotation::cancel_rotate_secret)
        })
    })
}

/// Every rotation of a secret, newest first: how each ended and why.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn rotation_history(
    name: Option<&str>,
    max_results: default!(Option<i32>, 100),
) -> Result<
    TableIterator<
        'static,
        (
            name!(rotation_id, Uuid),
            name!(rotator, String),
            name!(state, String),
            name!(step, String),
            name!(pending_version_id, Option<Uuid>),
            name!(failures, i32),
            name!(last_error, Option<String>),
            name!(note, Option<String>),
            name!(started_at, TimestampWithTimeZone),
            name!(finished_at, Option<TimestampWithTimeZone>),
        ),
    >,
    ErrorReport,
> {
    let entries = sql(|| {
        audit::audited("describe", "rotation_history", name, || {
            let name = valid_name(name)?;
            rotation::history(name, required(max_results, "max_results")?)
        })
    })?;
    Ok(TableIterator::new(entries.into_iter().map(|entry| {
        (
            entry.id,
            entry.rotator,
            entry.state,
            entry.step,
            entry.pending_version_id,
            entry.failures,
            entry.last_error,
            entry.note,
            entry.started_at,
            entry.finished_at,
        )
    })))
}

/// Offboarding: rotates every secret `role` can read; one row per secret with its status.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn rotate_secrets_accessible_by(
    role: Option<RegRole>,
    only_accessed: default!(Option<bool>, "false"),
) -> Result<TableIterator<'static, (name!(name, String), name!(status, String))>, ErrorReport> {
    let rows = sql(|| {
        audit::audited("rotate", "rotate_secrets_accessible_by", None, || {
            let role = access::existing_role(required(role, "role")?.0)?;
            rotation::rotate_accessible_by(role, required(only_accessed, "only_accessed")?)
        })
    })?;
    Ok(TableIterator::new(rows))
}

/// Re-wraps up to `batch_size` data keys under the active master key; call until
/// `remaining` is 0.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn rewrap_keys(
    batch_size: default!(Option<i32>, 1000),
) -> Result<TableIterator<'static, (name!(rewrapped, i64), name!(remaining, i64))>, ErrorReport> {
    let counts = sql(|| {
        audit::audited("manage", "rewrap_keys", None, || {
            let batch_size = required(batch_size, "batch_size")?;
            if !(1..=100_000).contains(&batch_size) {
                return Err(Error::InvalidParameter(format!(
                    "batch_size must be between 1 and 100000, not {batch_size}"
                )));
            }
            rewrap::rewrap_keys(batch_size)
        })
    })?;
    Ok(TableIterator::once(counts))
}

/// Every master key id, whether it is configured and active, and what it still wraps.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn key_status() -> Result<
    TableIterator<
        'static,
        (
            name!(key_id, String),
            name!(active, bool),
            name!(configured, bool),
            name!(versions, i64),
            name!(secrets, i64),
        ),
    >,
    ErrorReport,
> {
    let keys = sql(|| audit::audited("describe", "key_status", None, rewrap::key_status))?;
    Ok(TableIterator::new(keys.into_iter().map(|key| {
        (
            key.key_id,
            key.active,
            key.configured,
            key.versions,
            key.secrets,
        )
    })))
}
