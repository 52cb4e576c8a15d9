//! Staging labels: moving them, the automatic CURRENT -> PREVIOUS shift, pruning of versions
//! that lost every label, and the change notification.

use crate::audit;
use crate::db::{self, required};
use crate::errors::{Error, Result};
use crate::validate::MAX_LABELS_PER_VERSION;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

pub const CURRENT: &str = "CURRENT";
pub const PREVIOUS: &str = "PREVIOUS";

/// Deprecated (label-less) versions kept per secret, and the age below which none is pruned.
/// A version a rotation's target is pinned to is never pruned.
const KEEP_DEPRECATED: i64 = 100;

pub fn holder(client: &SpiClient<'_>, secret_id: Uuid, label: &str) -> Result<Option<Uuid>> {
    db::first_value(client.select(
        "SELECT version_id FROM secrets.version_label WHERE secret_id = $1 AND label = $2",
        Some(1),
        &[secret_id.into(), label.into()],
    )?)
}

pub fn labels_of(client: &SpiClient<'_>, version_id: Uuid) -> Result<Vec<String>> {
    Ok(db::first_value(client.select(
        "SELECT pg_catalog.array_agg(label ORDER BY label) FROM secrets.version_label \
         WHERE version_id = $1",
        None,
        &[version_id.into()],
    )?)?
    .unwrap_or_default())
}

/// Puts `label` on `version_id` (taking it off whichever version had it). Moving CURRENT puts
/// PREVIOUS on the version it left.
pub fn move_label(
    client: &mut SpiClient<'_>,
    secret_name: &str,
    secret_id: Uuid,
    label: &str,
    version_id: Uuid,
) -> Result<()> {
    let previous_holder = holder(client, secret_id, label)?;
    if previous_holder == Some(version_id) {
        return Ok(());
    }
    if labels_of(client, version_id)?.len() >= MAX_LABELS_PER_VERSION {
        return Err(Error::LimitExceeded(format!(
            "version {version_id} of secret \"{secret_name}\" already carries \
             {MAX_LABELS_PER_VERSION} stages"
        )));
    }
    client.update(
        "INSERT INTO secrets.version_label (secret_id, label, version_id) VALUES ($1, $2, $3) \
         ON CONFLICT (secret_id, label) DO UPDATE SET version_id = EXCLUDED.version_id",
        None,
        &[secret_id.into(), label.into(), version_id.into()],
    )?;
    if label == CURRENT {
        if let Some(left) = previous_holder {
            move_label(client, secret_name, secret_id, PREVIOUS, left)?;
        }
    }
    Ok(())
}

pub fn remove_label(client: &mut SpiClient<'_>, secret_id: Uuid, label: &str) -> Result<()> {
    client.update(
        "DELETE FROM secrets.version_label WHERE secret_id = $1 AND label = $2",
        None,
        &[secret_id.into(), label.into()],
    )?;
    Ok(())
}

/// Deletes deprecated versions beyond the newest 100 of a secret (of every secret when
/// `secret_id` is `None`), never one younger than 24 hours. Each removal is an audit record of
/// its own (`delete` of that version, `details.function = "prune"`), naming what pruned it:
/// the worker's round, or the call during which it was pruned.
pub fn prune_deprecated(
    client: &mut SpiClient<'_>,
    secret_id: Option<Uuid>,
    pruned_by: &str,
) -> Result<()> {
    let pruned: Vec<(String, Uuid, Uuid)> = client
        .update(
            "DELETE FROM secrets.secret_version v USING secrets.secret s \
             WHERE s.id = v.secret_id AND v.id IN ( \
                 SELECT id FROM ( \
                     SELECT d.id, pg_catalog.row_number() OVER ( \
                                PARTITION BY d.secret_id ORDER BY d.created_at DESC) AS newest \
                     FROM secrets.secret_version d \
                     WHERE ($1::uuid IS NULL OR d.secret_id = $1) \
                       AND NOT EXISTS (SELECT FROM secrets.version_label l \
                                       WHERE l.version_id = d.id) \
                       AND NOT EXISTS (SELECT FROM secrets.secret p \
                                       WHERE p.rotation_target_version_id = d.id)) deprecated \
                 WHERE newest > $2) \
             AND v.created_at < pg_catalog.now() - interval '24 hours' \
             RETURNING s.name, s.id, v.id",
            None,
            &[secret_id.into(), KEEP_DEPRECATED.into()],
        )?
        .map(|row| Ok((required(&row, 1)?, required(&row, 2)?, required(&row, 3)?)))
        .collect::<Result<_>>()?;
    let details = serde_json::json!({"function": "prune", "pruned_by": pruned_by});
    for (name, secret_id, version_id) in pruned {
        audit::removed_for_good(&name, secret_id, Some(version_id), &details)?;
    }
    Ok(())
}

/// Tells listeners (the proxy's credential caches) that a secret's values or labels changed.
/// NOTIFY is delivered only if the transaction commits.
pub fn notify_changed(
    client: &SpiClient<'_>,
    event: &str,
    secret_name: &str,
    version_id: Option<Uuid>,
) -> Result<()> {
    let labels = match version_id {
        Some(version_id) => labels_of(client, version_id)?,
        None => Vec::new(),
    };
    let payload = serde_json::json!({
        "event": event,
        "name": secret_name,
        "version_id": version_id.map(|id| id.to_string()),
        "labels": labels,
    });
    client.select(
        "SELECT pg_catalog.pg_notify('pg_secrets_changed', $1)",
        None,
        &[payload.to_string().into()],
    )?;
    Ok(())
}
