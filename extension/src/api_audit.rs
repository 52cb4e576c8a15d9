//! The SQL functions of the audit trail. Reading it is a view, `secrets.audit_log`; these
//! verify it, remove old prefixes, and serve its row-level security and append-only trigger.

#![allow(clippy::result_large_err)]
#![allow(clippy::type_complexity)]

use crate::api::sql;
use crate::audit::{self, alarms, trail};
use crate::validate::required;
use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::Uuid;

/// Walks the hash chain: `ok` is false at the first record that was changed, removed or
/// reordered, and `first_bad_id` names it.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn verify_audit_log() -> Result<
    TableIterator<
        'static,
        (
            name!(ok, bool),
            name!(rows_checked, i64),
            name!(first_bad_id, Option<i64>),
        ),
    >,
    ErrorReport,
> {
    let verdict = sql(|| audit::audited("describe", "verify_audit_log", None, trail::verify))?;
    Ok(TableIterator::once(verdict))
}

/// Removes every record older than `older_than` (a whole prefix of the chain), keeps an
/// anchor so the rest still verifies, and records that it did. Needs `secrets_admin`.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn purge_audit_log(older_than: Option<Interval>) -> Result<i64, ErrorReport> {
    sql(|| {
        audit::audited("manage", "purge_audit_log", None, || {
            let older_than = required(older_than, "older_than")?;
            let seconds =
                f64::from(older_than.days()) * 86_400.0 + older_than.micros() as f64 / 1e6;
            if older_than.months() != 0 || seconds < 0.0 {
                return Err(crate::errors::Error::InvalidParameter(
                    "older_than must be an interval of days, hours, minutes or seconds, not \
                     negative"
                        .into(),
                ));
            }
            let youngest = crate::settings::audit_min_retention_seconds();
            if seconds < youngest {
                return Err(crate::errors::Error::InvalidParameter(format!(
                    "older_than must be at least pg_secrets.audit_min_retention ({youngest} s): \
                     recent records are kept whoever asks"
                )));
            }
            // Further back than timestamptz reaches from now would be PostgreSQL's 22008.
            if seconds > trail::MAX_RETENTION_DAYS as f64 * 86_400.0 {
                return Err(crate::errors::Error::InvalidParameter(format!(
                    "older_than must be at most {} days",
                    trail::MAX_RETENTION_DAYS
                )));
            }
            trail::purge(seconds)
        })
    })
}

/// For the append-only trigger: true only while `purge_audit_log` deletes its prefix.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn audit_retention_running() -> bool {
    trail::retention_running()
}

/// The row-level security predicate of `secrets.audit_record`.
#[pg_extern(stable, parallel_restricted)]
#[search_path(pg_catalog, pg_temp)]
fn may_read_audit(secret_id: Option<Uuid>, secret_name: Option<&str>) -> Result<bool, ErrorReport> {
    sql(|| trail::may_read(secret_id, secret_name))
}

/// Adds an alarm rule: `kind` is `first_read`, `rate`, `denials` or `off_hours`, with its
/// parameters (defaults filled in). For `secrets_auditor` and `secrets_admin`.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn create_alarm_rule(
    name: Option<&str>,
    kind: Option<&str>,
    params: default!(Option<pgrx::JsonB>, "'{}'"),
) -> Result<Uuid, ErrorReport> {
    sql(|| {
        audit::audited("manage", "create_alarm_rule", None, || {
            alarms::create_rule(
                required(name, "name")?,
                required(kind, "kind")?,
                &required(params, "params")?.0,
            )
        })
    })
}

#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn drop_alarm_rule(name: Option<&str>) -> Result<(), ErrorReport> {
    sql(|| {
        audit::audited("manage", "drop_alarm_rule", None, || {
            alarms::drop_rule(required(name, "name")?)
        })
    })
}

/// What the alarm rules (and failing rotations) raised since `since`.
#[pg_extern]
#[search_path(pg_catalog, pg_temp)]
fn access_anomalies(
    since: default!(
        Option<TimestampWithTimeZone>,
        "pg_catalog.now() - interval '1 day'"
    ),
) -> Result<
    TableIterator<
        'static,
        (
            name!(at, TimestampWithTimeZone),
            name!(rule, String),
            name!(kind, String),
            name!(role, Option<String>),
            name!(address, Option<String>),
            name!(secret_name, Option<String>),
            name!(details, pgrx::JsonB),
        ),
    >,
    ErrorReport,
> {
    let rows = sql(|| {
        audit::audited("describe", "access_anomalies", None, || {
            alarms::anomalies(required(since, "since")?)
        })
    })?;
    Ok(TableIterator::new(rows))
}
