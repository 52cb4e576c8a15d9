//! Re-wrapping data keys under another master key: one secret (`update_secret(key_id => ...)`)
//! or, for master-key rotation, every version not yet under the active key
//! (`rewrap_keys`). Values are never re-encrypted; only the wrapped data keys change.

use crate::access::{self, Action};
use crate::crypto::{self, ValueKind};
use crate::db::required;
use crate::errors::{Error, Result};
use crate::keys::{self, MasterKey};
use crate::store::{self, SecretRow};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::Uuid;

/// A version's wrapped data key, as a re-wrap reads it.
struct WrappedVersion {
    secret_id: Uuid,
    secret_name: String,
    version_id: Uuid,
    kind: Option<ValueKind>,
    key_id: String,
    wrapped_key: Vec<u8>,
}

fn wrapped_versions(
    client: &mut SpiClient<'_>,
    query: &str,
    args: &[pgrx::datum::DatumWithOid],
) -> Result<Vec<WrappedVersion>> {
    client
        .update(query, None, args)?
        .map(|row| {
            Ok(WrappedVersion {
                secret_id: required(&row, 1)?,
                secret_name: required(&row, 2)?,
                version_id: required(&row, 3)?,
                kind: row.get::<String>(4)?.as_deref().and_then(ValueKind::parse),
                key_id: required(&row, 5)?,
                wrapped_key: required(&row, 6)?,
            })
        })
        .collect()
}

const VERSION_COLUMNS: &str =
    "SELECT v.secret_id, s.name, v.id, v.value_kind, v.key_id, v.wrapped_key \
     FROM secrets.secret_version v JOIN secrets.secret s ON s.id = v.secret_id";

fn rewrap_all(
    client: &mut SpiClient<'_>,
    versions: &[WrappedVersion],
    to: &MasterKey,
) -> Result<()> {
    for version in versions {
        let integrity = || Error::Integrity(version.secret_name.clone());
        let kind = version.kind.ok_or_else(integrity)?;
        let from = keys::verified_key(&version.key_id, Some(&version.secret_name))?;
        let rewrapped = crypto::rewrap(
            from,
            to,
            &store::binding(version.secret_id, version.version_id, kind),
            &version.wrapped_key,
        )
        .map_err(|_| integrity())?;
        client.update(
            "UPDATE secrets.secret_version SET key_id = $2, wrapped_key = $3 WHERE id = $1",
            None,
            &[
                version.version_id.into(),
                to.id.clone().into(),
                rewrapped.into(),
            ],
        )?;
    }
    Ok(())
}

/// Moves a secret to another master key: new versions use it, and every existing version's
/// data key is re-wrapped under it.
pub fn rewrap_secret(client: &mut SpiClient<'_>, secret: &SecretRow, key_id: &str) -> Result<()> {
    let to = keys::verified_key(key_id, Some(&secret.name))?;
    let versions = wrapped_versions(
        client,
        &format!("{VERSION_COLUMNS} WHERE v.secret_id = $1"),
        &[secret.id.into()],
    )?;
    rewrap_all(client, &versions, to)?;
    client.update(
        "UPDATE secrets.secret SET key_id = $2 WHERE id = $1",
        None,
        &[secret.id.into(), to.id.clone().into()],
    )?;
    Ok(())
}

/// `rewrap_keys`: re-wraps up to `batch_size` versions that are not under the active key and
/// moves secrets to the active key for their new versions. Versions whose secret a concurrent
/// writer has locked are skipped and picked up by the next call: locking the secret with its
/// versions, in the writers' order, keeps the copy-of-CURRENT trigger from deadlocking with
/// them. Returns (re-wrapped now, still to do).
pub fn rewrap_keys(batch_size: i32) -> Result<(i64, i64)> {
    // Master-key work spans every secret, so it needs the right on all of them.
    access::require_on_every_secret(Action::Manage, "rewrapping data keys")?;
    let active = keys::key_for_writing(None)?;
    Spi::connect_mut(|client| {
        let versions = wrapped_versions(
            client,
            &format!(
                "{VERSION_COLUMNS} WHERE v.key_id <> $1 ORDER BY v.id LIMIT $2 \
                 FOR UPDATE OF v, s SKIP LOCKED"
            ),
            &[active.id.clone().into(), i64::from(batch_size).into()],
        )?;
        rewrap_all(client, &versions, active)?;
        client.update(
            "UPDATE secrets.secret SET key_id = $1 WHERE key_id <> $1",
            None,
            &[active.id.clone().into()],
        )?;
        let remaining = crate::db::first_value::<i64>(client.select(
            "SELECT pg_catalog.count(*) FROM secrets.secret_version WHERE key_id <> $1",
            None,
            &[active.id.clone().into()],
        )?)?
        .unwrap_or(0);
        Ok((versions.len() as i64, remaining))
    })
}

/// One row of `key_status`.
pub struct KeyStatus {
    pub key_id: String,
    pub active: bool,
    pub configured: bool,
    pub versions: i64,
    pub secrets: i64,
}

/// `key_status`: every key id that is configured or still wraps something, with how many
/// versions it wraps and how many secrets write new versions with it. A key may be removed
/// from the key file once both counts are zero.
pub fn key_status() -> Result<Vec<KeyStatus>> {
    access::require_on_every_secret(Action::Describe, "reading key status")?;
    let ring = keys::ring()?;
    let configured: Vec<String> = ring.ids().map(str::to_string).collect();
    Spi::connect(|client| {
        client
            .select(
                "SELECT k.key_id, \
                        (SELECT pg_catalog.count(*) FROM secrets.secret_version v \
                         WHERE v.key_id = k.key_id), \
                        (SELECT pg_catalog.count(*) FROM secrets.secret s \
                         WHERE s.key_id = k.key_id) \
                 FROM (SELECT pg_catalog.unnest($1::text[]) AS key_id \
                       UNION SELECT key_id FROM secrets.secret_version \
                       UNION SELECT key_id FROM secrets.master_key) k \
                 ORDER BY 1",
                None,
                &[configured.clone().into()],
            )?
            .map(|row| {
                let key_id: String = required(&row, 1)?;
                Ok(KeyStatus {
                    active: key_id == ring.active().id,
                    configured: configured.contains(&key_id),
                    versions: row.get(2)?.unwrap_or(0),
                    secrets: row.get(3)?.unwrap_or(0),
                    key_id,
                })
            })
            .collect()
    })
}
