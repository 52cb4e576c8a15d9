//! Alarms on unusual access, evaluated by the worker over the audit trail. Four kinds of rule,
//! each configured in SQL with JSON parameters:
//!
//! - `first_read`: a role reads a secret it has never read before (`secrets.audit_reader`);
//! - `rate`: a role's reads in the last `window` seconds exceed `factor` times its average
//!   over the trailing `baseline` (and at least `min_count`);
//! - `denials`: `count` denied attempts from one login role (or one address, `"by":
//!   "address"`) within `window` seconds of each other;
//! - `off_hours`: an allowed access outside `from`..`to` (`HH:MM`, in `timezone`; a `from`
//!   after `to` is a night shift across midnight).
//!
//! A rule looks at records newer than the last ones it examined, so each access is judged once.
//! A tripped rule becomes a row of `secrets.alarm_event` and a `NOTIFY pg_secrets_alarm`.

use crate::access;
use crate::db::required;
use crate::errors::{Error, Result};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, Uuid};
use serde_json::{json, Map, Value};

pub const KINDS: [&str; 4] = ["first_read", "rate", "denials", "off_hours"];

fn invalid(why: String) -> Error {
    Error::InvalidParameter(why)
}

fn number(params: &Map<String, Value>, key: &str, default: f64, range: (f64, f64)) -> Result<f64> {
    let value = match params.get(key) {
        None => default,
        Some(value) => value
            .as_f64()
            .ok_or_else(|| invalid(format!("alarm parameter \"{key}\" must be a number")))?,
    };
    if !(range.0..=range.1).contains(&value) {
        return Err(invalid(format!(
            "alarm parameter \"{key}\" must be between {} and {}",
            range.0, range.1
        )));
    }
    Ok(value)
}

/// A text parameter, `default` when absent; another type is an error, not the default.
fn text<'a>(params: &'a Map<String, Value>, key: &str, default: &'a str) -> Result<&'a str> {
    match params.get(key) {
        None => Ok(default),
        Some(value) => value
            .as_str()
            .ok_or_else(|| invalid(format!("alarm parameter \"{key}\" must be a string"))),
    }
}

fn clock(params: &Map<String, Value>, key: &str, default: &str) -> Result<String> {
    let text = text(params, key, default)?;
    chrono::NaiveTime::parse_from_str(text, "%H:%M")
        .map(|_| text.to_string())
        .map_err(|_| {
            invalid(format!(
                "alarm parameter \"{key}\" must be a time such as 08:00"
            ))
        })
}

/// Checks a rule's parameters and returns them with every default filled in.
pub fn normalize(kind: &str, params: &Value) -> Result<Value> {
    let params = params
        .as_object()
        .ok_or_else(|| invalid("alarm parameters must be a JSON object".into()))?;
    let allowed: &[&str] = match kind {
        "first_read" => &[],
        "rate" => &["factor", "window", "baseline", "min_count"],
        "denials" => &["count", "window", "by"],
        "off_hours" => &["from", "to", "timezone"],
        _ => {
            return Err(invalid(format!(
                "unknown alarm kind \"{kind}\"; kinds are {}",
                KINDS.join(", ")
            )))
        }
    };
    if let Some(key) = params.keys().find(|key| !allowed.contains(&key.as_str())) {
        return Err(invalid(format!(
            "unknown parameter \"{key}\" for a {kind} alarm"
        )));
    }
    Ok(match kind {
        "first_read" => json!({}),
        "rate" => {
            let window = number(params, "window", 300.0, (10.0, 86_400.0))?;
            let baseline = number(params, "baseline", 86_400.0, (60.0, 90.0 * 86_400.0))?;
            if baseline <= window {
                return Err(invalid(
                    "alarm parameter \"baseline\" must be longer than \"window\"".into(),
                ));
            }
            json!({
                "factor": number(params, "factor", 5.0, (1.0, 1000.0))?,
                "window": window,
                "baseline": baseline,
                "min_count": number(params, "min_count", 20.0, (1.0, 1e9))?,
            })
        }
        "denials" => {
            let by = text(params, "by", "role")?;
            if by != "role" && by != "address" {
                return Err(invalid(
                    "alarm parameter \"by\" must be \"role\" or \"address\"".into(),
                ));
            }
            json!({
                "count": number(params, "count", 5.0, (1.0, 1e6))?,
                "window": number(params, "window", 300.0, (1.0, 86_400.0))?,
                "by": by,
            })
        }
        _ => json!({
            "from": clock(params, "from", "08:00")?,
            "to": clock(params, "to", "18:00")?,
            "timezone": text(params, "timezone", "UTC")?,
        }),
    })
}

/// `create_alarm_rule`: starts watching from the newest record, so only new accesses trip it.
pub fn create_rule(name: &str, kind: &str, params: &Value) -> Result<Uuid> {
    super::trail::require_auditor("creating alarm rules")?;
    if name.is_empty() || name.chars().count() > 128 {
        return Err(invalid(
            "an alarm rule's name is 1 to 128 characters".into(),
        ));
    }
    let params = normalize(kind, params)?;
    Spi::connect_mut(|client| {
        if kind == "off_hours" {
            let zone = params["timezone"].as_str().unwrap_or("UTC");
            let known = crate::db::first_value::<bool>(client.select(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_timezone_names WHERE name = $1) \
                     OR EXISTS (SELECT FROM pg_catalog.pg_timezone_abbrevs WHERE abbrev = $1)",
                None,
                &[zone.into()],
            )?)?;
            if known != Some(true) {
                return Err(invalid(format!(
                    "unknown time zone \"{zone}\" in alarm parameters"
                )));
            }
        }
        let id = crate::store::new_uuid();
        let inserted = client.update(
            "INSERT INTO secrets.alarm_rule (id, name, kind, params, checked_through, created_by) \
             VALUES ($1, $2, $3, $4, \
                     (SELECT coalesce(max(id), 0) FROM secrets.audit_record), $5::oid::regrole) \
             ON CONFLICT (name) DO NOTHING RETURNING id",
            None,
            &[
                id.into(),
                name.into(),
                kind.into(),
                JsonB(params).into(),
                access::caller().into(),
            ],
        )?;
        if inserted.is_empty() {
            return Err(Error::NameTaken(format!(
                "an alarm rule named \"{name}\" already exists"
            )));
        }
        Ok(id)
    })
}

pub fn drop_rule(name: &str) -> Result<()> {
    super::trail::require_auditor("dropping alarm rules")?;
    Spi::connect_mut(|client| {
        if client
            .update(
                "DELETE FROM secrets.alarm_rule WHERE name = $1",
                None,
                &[name.into()],
            )?
            .is_empty()
        {
            return Err(Error::NoSuchObject(format!(
                "there is no alarm rule named \"{name}\""
            )));
        }
        Ok(())
    })
}

pub type AnomalyRow = (
    pgrx::datum::TimestampWithTimeZone,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    JsonB,
);

/// `access_anomalies(since)`: what tripped, newest last.
pub fn anomalies(since: pgrx::datum::TimestampWithTimeZone) -> Result<Vec<AnomalyRow>> {
    super::trail::require_auditor("reading access anomalies")?;
    Spi::connect(|client| {
        client
            .select(
                "SELECT at, rule_name, kind, role, address, secret_name, details \
                 FROM secrets.alarm_event WHERE at >= $1 ORDER BY at, id",
                None,
                &[since.into()],
            )?
            .map(|row| {
                Ok((
                    required(&row, 1)?,
                    required(&row, 2)?,
                    required(&row, 3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                    required(&row, 7)?,
                ))
            })
            .collect()
    })
}

/// One tripped rule, before it is stored.
struct Trip {
    role: Option<String>,
    address: Option<String>,
    secret_name: Option<String>,
    details: Value,
}

/// What each kind finds among the records `(after, upto]`. Parameters were normalized on
/// creation; every query is fixed text with bind parameters.
fn find_trips(
    client: &SpiClient<'_>,
    kind: &str,
    params: &Value,
    rule_id: Uuid,
    after: i64,
    upto: i64,
) -> Result<Vec<Trip>> {
    let rows = match kind {
        "first_read" => client.select(
            "SELECT role, NULL::text, secret_name, \
                    pg_catalog.json_build_object('first_read_at', first_at, 'audit_id', first_audit_id) \
             FROM secrets.audit_reader WHERE first_audit_id > $1 AND first_audit_id <= $2",
            None,
            &[after.into(), upto.into()],
        )?,
        "rate" => client.select(
            "WITH recent AS ( \
                 SELECT \"current_user\" AS role, \
                        pg_catalog.count(*) FILTER (WHERE at > pg_catalog.now() - pg_catalog.make_interval(secs => $3)) AS now_count, \
                        pg_catalog.count(*) FILTER (WHERE at <= pg_catalog.now() - pg_catalog.make_interval(secs => $3)) AS before_count \
                 FROM secrets.audit_record \
                 WHERE action = 'get' AND at > pg_catalog.now() - pg_catalog.make_interval(secs => $4) \
                 GROUP BY 1) \
             SELECT role, NULL::text, NULL::text, \
                    pg_catalog.json_build_object('reads', now_count, 'window_seconds', $3, \
                        'baseline_per_window', before_count * $3 / ($4 - $3), 'factor', $5) \
             FROM recent \
             WHERE now_count >= $6 AND now_count > $5 * GREATEST(before_count * $3 / ($4 - $3), 1) \
               AND EXISTS (SELECT FROM secrets.audit_record n WHERE n.id > $1 AND n.id <= $2 \
                           AND n.\"current_user\" = recent.role AND n.action = 'get') \
               AND NOT EXISTS (SELECT FROM secrets.alarm_event e WHERE e.rule_id = $7 \
                               AND e.role = recent.role \
                               AND e.at > pg_catalog.now() - pg_catalog.make_interval(secs => $3))",
            None,
            &[
                after.into(),
                upto.into(),
                params["window"].as_f64().into(),
                params["baseline"].as_f64().into(),
                params["factor"].as_f64().into(),
                params["min_count"].as_f64().into(),
                rule_id.into(),
            ],
        )?,
        // Each new denial counts the denials from its source in the window that ends with it,
        // so a burst is found however long after it the rule is evaluated. A role is the
        // session's login role: SET ROLE from group to group does not spread the attempts.
        "denials" => client.select(
            "WITH new_denials AS ( \
                 SELECT min(at) AS since FROM secrets.audit_record \
                 WHERE id > $1 AND id <= $2 AND outcome = 'denied'), \
             denied AS ( \
                 SELECT a.id, a.at, CASE WHEN $3 = 'address' THEN coalesce(a.client_addr, 'local') \
                                         ELSE a.\"session_user\" END AS who \
                 FROM secrets.audit_record a, new_denials n \
                 WHERE a.outcome = 'denied' AND a.id <= $2 \
                   AND a.at >= n.since - pg_catalog.make_interval(secs => $4)), \
             counted AS ( \
                 SELECT id, who, pg_catalog.count(*) OVER (PARTITION BY who ORDER BY at \
                     RANGE BETWEEN pg_catalog.make_interval(secs => $4) PRECEDING AND CURRENT ROW) \
                     AS attempts \
                 FROM denied), \
             tripped AS ( \
                 SELECT who, max(attempts) AS attempts FROM counted WHERE id > $1 GROUP BY who) \
             SELECT CASE WHEN $3 = 'role' THEN who END, CASE WHEN $3 = 'address' THEN who END, \
                    NULL::text, \
                    pg_catalog.json_build_object('denied_attempts', attempts, 'window_seconds', $4) \
             FROM tripped \
             WHERE attempts >= $5 \
               AND NOT EXISTS (SELECT FROM secrets.alarm_event e WHERE e.rule_id = $6 \
                               AND coalesce(e.role, e.address) = tripped.who \
                               AND e.at > pg_catalog.now() - pg_catalog.make_interval(secs => $4))",
            None,
            &[
                after.into(),
                upto.into(),
                params["by"].as_str().into(),
                params["window"].as_f64().into(),
                params["count"].as_f64().into(),
                rule_id.into(),
            ],
        )?,
        _ => client.select(
            "SELECT \"current_user\", client_addr, secret_name, \
                    pg_catalog.json_build_object('accesses', pg_catalog.count(*), \
                        'first_at', min(at), 'hours', $3 || '-' || $4 || ' ' || $5) \
             FROM secrets.audit_record \
             WHERE id > $1 AND id <= $2 AND outcome = 'allowed' AND secret_id IS NOT NULL \
               AND NOT CASE WHEN $3::time <= $4::time \
                            THEN (at AT TIME ZONE $5)::time >= $3::time \
                                 AND (at AT TIME ZONE $5)::time < $4::time \
                            ELSE (at AT TIME ZONE $5)::time >= $3::time \
                                 OR (at AT TIME ZONE $5)::time < $4::time END \
             GROUP BY 1, 2, 3",
            None,
            &[
                after.into(),
                upto.into(),
                params["from"].as_str().into(),
                params["to"].as_str().into(),
                params["timezone"].as_str().into(),
            ],
        )?,
    };
    rows.map(|row| {
        let details: Option<pgrx::Json> = row.get(4)?;
        Ok(Trip {
            role: row.get(1)?,
            address: row.get(2)?,
            secret_name: row.get(3)?,
            details: details.map(|json| json.0).unwrap_or(Value::Null),
        })
    })
    .collect()
}

/// Tells listeners that an alarm was raised. PostgreSQL lets any role `LISTEN` on any channel,
/// so the payload names only the event, its kind and its rule: who read what from where is in
/// `access_anomalies`, for the roles that may see it.
pub fn notify_alarm(
    client: &SpiClient<'_>,
    event_id: Option<i64>,
    kind: &str,
    rule: &str,
) -> Result<()> {
    let payload = json!({"alarm": kind, "rule": rule, "event_id": event_id});
    client.select(
        "SELECT pg_catalog.pg_notify('pg_secrets_alarm', $1)",
        None,
        &[payload.to_string().into()],
    )?;
    Ok(())
}

/// The worker: evaluates every enabled rule over the records since its last look. Returns
/// how many alarms it raised.
pub fn evaluate() -> Result<usize> {
    // Locking the rules and recording what tripped are writes: with a synchronous standby
    // down, their commit would hold the worker, and the trail with it.
    crate::db::commit_locally();
    Spi::connect_mut(|client| {
        // Who-read-what is kept up to date only when a rule needs it (offboarding by actual
        // reads also looks at the records stored since).
        let first_read_rules = crate::db::first_value::<bool>(client.select(
            "SELECT EXISTS (SELECT FROM secrets.alarm_rule WHERE enabled AND kind = 'first_read')",
            None,
            &[],
        )?)?;
        if first_read_rules == Some(true) {
            // A purge_audit_log in a transaction still open holds the progress row: the
            // worker does not wait for it (draining the queue waits on this loop, and every
            // audited call on the queue), and evaluates next round instead.
            let free = !client
                .update(
                    "SELECT FROM secrets.audit_reader_progress FOR UPDATE SKIP LOCKED",
                    None,
                    &[],
                )?
                .is_empty();
            // No row at all is not a lock: `update_readers` says what is wrong.
            let held = !free
                && crate::db::first_value::<bool>(client.select(
                    "SELECT EXISTS (SELECT FROM secrets.audit_reader_progress)",
                    None,
                    &[],
                )?)? == Some(true);
            if held {
                return Ok(0);
            }
            super::trail::update_readers(client)?;
        }
        let upto = crate::db::first_value::<i64>(client.select(
            "SELECT coalesce(max(id), 0) FROM secrets.audit_record",
            None,
            &[],
        )?)?
        .unwrap_or(0);
        let rules: Vec<(Uuid, String, String, JsonB, i64)> = client
            .update(
                "SELECT id, name, kind, params, checked_through FROM secrets.alarm_rule \
                 WHERE enabled FOR UPDATE SKIP LOCKED",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    required(&row, 1)?,
                    required(&row, 2)?,
                    required(&row, 3)?,
                    required(&row, 4)?,
                    required(&row, 5)?,
                ))
            })
            .collect::<Result<_>>()?;
        let mut raised = 0;
        for (rule_id, name, kind, params, after) in rules {
            if after >= upto {
                continue;
            }
            for trip in find_trips(client, &kind, &params.0, rule_id, after, upto)? {
                let event_id = crate::db::first_value::<i64>(client.update(
                    "INSERT INTO secrets.alarm_event \
                            (rule_id, rule_name, kind, role, address, secret_name, details) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
                    None,
                    &[
                        rule_id.into(),
                        name.clone().into(),
                        kind.clone().into(),
                        trip.role.clone().into(),
                        trip.address.clone().into(),
                        trip.secret_name.clone().into(),
                        JsonB(trip.details).into(),
                    ],
                )?)?;
                notify_alarm(client, event_id, &kind, &name)?;
                raised += 1;
            }
            client.update(
                "UPDATE secrets.alarm_rule SET checked_through = $2 WHERE id = $1",
                None,
                &[rule_id.into(), upto.into()],
            )?;
        }
        Ok(raised)
    })
}

#[cfg(test)]
mod tests {
    use super::normalize;
    use serde_json::json;

    #[test]
    fn parameters_get_defaults_and_limits() {
        assert_eq!(
            normalize("rate", &json!({"factor": 3})).unwrap(),
            json!({"factor": 3.0, "window": 300.0, "baseline": 86400.0, "min_count": 20.0})
        );
        assert_eq!(
            normalize("denials", &json!({"by": "address", "count": 3})).unwrap()["by"],
            "address"
        );
        assert_eq!(normalize("off_hours", &json!({})).unwrap()["from"], "08:00");
        for (kind, params, words) in [
            ("sometimes", json!({}), "unknown alarm kind"),
            ("rate", json!({"factor": 0}), "between 1 and 1000"),
            (
                "rate",
                json!({"window": 600, "baseline": 300}),
                "longer than",
            ),
            ("rate", json!({"speed": 1}), "unknown parameter \"speed\""),
            ("denials", json!({"by": "planet"}), "\"by\""),
            ("off_hours", json!({"from": "25:00"}), "a time such as"),
            ("first_read", json!([]), "JSON object"),
            (
                "rate",
                json!({"factor": "x"}),
                "\"factor\" must be a number",
            ),
            ("rate", json!({"factor": 1001}), "between 1 and 1000"),
            (
                "rate",
                json!({"window": 9}),
                "\"window\" must be between 10 and 86400",
            ),
            ("rate", json!({"window": 86401}), "between 10 and 86400"),
            (
                "rate",
                json!({"baseline": 59}),
                "\"baseline\" must be between 60 and 7776000",
            ),
            (
                "rate",
                json!({"baseline": 7776001}),
                "between 60 and 7776000",
            ),
            (
                "rate",
                json!({"min_count": 0}),
                "\"min_count\" must be between 1 and 1000000000",
            ),
            (
                "rate",
                json!({"min_count": 1e9 + 1.0}),
                "between 1 and 1000000000",
            ),
            (
                "denials",
                json!({"count": 0}),
                "\"count\" must be between 1 and 1000000",
            ),
            (
                "denials",
                json!({"count": 1000001}),
                "between 1 and 1000000",
            ),
            (
                "denials",
                json!({"window": 0}),
                "\"window\" must be between 1 and 86400",
            ),
            ("denials", json!({"window": 86401}), "between 1 and 86400"),
            (
                "off_hours",
                json!({"timezone": 5}),
                "\"timezone\" must be a string",
            ),
        ] {
            let error = normalize(kind, &params).unwrap_err().to_string();
            assert!(error.contains(words), "{kind}: {error}");
        }
    }
}
