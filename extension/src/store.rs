//! The secret store: each public operation is one function here, run inside the caller's
//! transaction through SPI. Values are sealed in Rust before any row exists.

use crate::access::{self, Action, Context};
use crate::audit;
use crate::crypto::{self, Binding, ValueKind};
use crate::db;
use crate::db::required;
use crate::errors::{Error, Result};
use crate::index_read::{self, Key};
use crate::keys;
use crate::labels::{self, CURRENT};
use crate::rotation;
use crate::validate::{self, Value};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{JsonB, Uuid};
use rand::rngs::OsRng;
use rand::RngCore;
use std::ffi::CStr;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

pub fn new_uuid() -> Uuid {
    let mut bytes = [0u8; 16];
    OsRng.fill_bytes(&mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    Uuid::from_bytes(bytes)
}

fn read_only_transaction() -> bool {
    unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() }
}

/// A secret's row, as far as the store needs it to decide and act.
pub struct SecretRow {
    pub id: Uuid,
    pub name: String,
    pub owner: pg_sys::Oid,
    pub key_id: String,
    pub purge_at: Option<String>,
}

impl SecretRow {
    pub fn subject(&self) -> access::Secret {
        access::Secret {
            id: self.id,
            owner: self.owner,
        }
    }
}

/// Whether an operation may act on a secret that is scheduled for deletion.
#[derive(PartialEq)]
pub enum OnDeleted {
    Refuse,
    Allow,
}

/// Writers lock the row (FOR UPDATE), so label moves on one secret never interleave;
/// describing does not, so it also works in a read-only transaction or on a standby.
pub fn find_secret(
    client: &mut SpiClient<'_>,
    name: &str,
    lock: bool,
) -> Result<Option<SecretRow>> {
    const FIND: &str =
        "SELECT id, owner_role::oid, key_id, purge_at::text FROM secrets.secret WHERE name = $1";
    const FIND_FOR_UPDATE: &str = "SELECT id, owner_role::oid, key_id, purge_at::text \
         FROM secrets.secret WHERE name = $1 FOR UPDATE";
    let mut rows = client.update(
        if lock { FIND_FOR_UPDATE } else { FIND },
        Some(1),
        &[name.into()],
    )?;
    let Some(row) = rows.next() else {
        return Ok(None);
    };
    Ok(Some(SecretRow {
        id: required(&row, 1)?,
        name: name.to_string(),
        owner: required(&row, 2)?,
        key_id: required(&row, 3)?,
        purge_at: row.get(4)?,
    }))
}

/// A secret's row by id, for work that was authorized when it began (a rotation's steps).
pub fn secret_by_id(client: &SpiClient<'_>, id: Uuid) -> Result<SecretRow> {
    // Gone since the work began (removed for good, say): not found.
    let row = db::first_row(client.select(
        "SELECT name, owner_role::oid, key_id, purge_at::text FROM secrets.secret \
         WHERE id = $1",
        Some(1),
        &[id.into()],
    )?)
    .ok_or(Error::GoneById(id))?;
    Ok(SecretRow {
        id,
        name: required(&row, 1)?,
        owner: required(&row, 2)?,
        key_id: required(&row, 3)?,
        purge_at: row.get(4)?,
    })
}

/// The caller's right to `action` on secret `name`, decided before anything else is revealed:
/// a secret the caller may not see is "permission denied" whether it exists or not.
pub fn authorize(
    client: &mut SpiClient<'_>,
    name: &str,
    action: Action,
    on_deleted: OnDeleted,
) -> Result<SecretRow> {
    let caller = access::caller();
    let row = find_secret(client, name, action != Action::Describe)?;
    // Named in the record before the decision: a denied attempt is then visible to the
    // secret's managers in the trail (never to the caller, who may not manage it).
    if let Some(row) = &row {
        audit::found_secret(row.id, name);
    }
    check_access(caller, name, action, row.as_ref().map(SecretRow::subject))?;
    let row = row.expect("check_access refuses a missing secret");
    match (&row.purge_at, on_deleted) {
        (Some(purge_at), OnDeleted::Refuse) => Err(Error::ScheduledForDeletion {
            name: name.to_string(),
            purge_at: purge_at.clone(),
        }),
        _ => Ok(row),
    }
}

/// Whether the caller may do `action` on secret `name` (false for a missing one), without
/// locking anything: for listings.
pub fn may(client: &mut SpiClient<'_>, name: &str, action: Action) -> Result<bool> {
    Ok(match find_secret(client, name, false)? {
        Some(secret) => access::shown(
            access::caller(),
            action,
            name,
            secret.subject(),
            Context::Session,
        )?,
        None => false,
    })
}

/// Allowed, or the error for it: `42501` both for a secret the caller may not act on and for
/// a missing one, unless the caller would be allowed on a secret of that name.
fn check_access(
    caller: pg_sys::Oid,
    name: &str,
    action: Action,
    secret: Option<access::Secret>,
) -> Result<()> {
    let allowed = access::decide(caller, action, name, secret, Context::Session)?.allows();
    match (secret, allowed) {
        (_, false) => Err(Error::AccessDenied {
            name: name.to_string(),
            action: action.as_str(),
        }),
        (None, true) => Err(Error::NotFound(name.to_string())),
        (Some(_), true) => Ok(()),
    }
}

pub fn binding(secret_id: Uuid, version_id: Uuid, kind: ValueKind) -> Binding {
    Binding {
        secret_id: *secret_id.as_bytes(),
        version_id: *version_id.as_bytes(),
        kind,
    }
}

fn value_kind(value: &Value) -> ValueKind {
    match value {
        Value::String(_) => ValueKind::String,
        Value::Binary(_) => ValueKind::Binary,
    }
}

pub fn insert_version(
    client: &mut SpiClient<'_>,
    secret: &SecretRow,
    value: &Value,
    token: Option<&str>,
    version_id: Uuid,
) -> Result<Uuid> {
    let key = keys::verified_key(&secret.key_id, Some(&secret.name))?;
    let kind = value_kind(value);
    let sealed = crypto::seal(key, &binding(secret.id, version_id, kind), value.bytes());
    client.update(
        "INSERT INTO secrets.secret_version \
           (id, secret_id, value_kind, key_id, wrapped_key, ciphertext, client_request_token) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        None,
        &[
            version_id.into(),
            secret.id.into(),
            kind.as_str().into(),
            sealed.key_id.into(),
            sealed.wrapped_key.into(),
            sealed.ciphertext.into(),
            token.into(),
        ],
    )?;
    Ok(version_id)
}

/// A retried write: the version written with `token`, if the value is the same one.
fn version_for_token(
    client: &SpiClient<'_>,
    secret: &SecretRow,
    value: &Value,
    token: Option<&str>,
) -> Result<Option<Uuid>> {
    let Some(token) = token else { return Ok(None) };
    let Some(version_id) = db::first_value::<Uuid>(client.select(
        "SELECT id FROM secrets.secret_version WHERE secret_id = $1 AND client_request_token = $2",
        Some(1),
        &[secret.id.into(), token.into()],
    )?)?
    else {
        return Ok(None);
    };
    // Pruned since the query above (the worker prunes without the secret's lock): as if no
    // version had the token.
    let Some(stored) = stored_version(client, version_id)? else {
        return Ok(None);
    };
    // Whether a retry carries the stored value is an answer about the value: a role that may
    // write but not read could test guesses (a PIN) with a known token. It gets the same
    // refusal for the same value and for another.
    let may_get = access::decide(
        access::caller(),
        Action::Get,
        &secret.name,
        Some(secret.subject()),
        Context::Session,
    )?
    .allows();
    if !may_get {
        return Err(Error::TokenTaken(secret.name.clone()));
    }
    let kind = stored.kind;
    let plaintext = stored.open(secret.id, &secret.name)?;
    let same =
        kind == Some(value_kind(value)) && bool::from(plaintext.as_slice().ct_eq(value.bytes()));
    if same {
        Ok(Some(version_id))
    } else {
        Err(Error::IdempotencyConflict(secret.name.clone()))
    }
}

struct StoredVersion {
    id: Uuid,
    kind: Option<ValueKind>,
    key_id: String,
    wrapped_key: Vec<u8>,
    ciphertext: Vec<u8>,
}

/// Where a version's sealed columns are: in its own `secret_version` row, or in the secret
/// row's copy of its CURRENT version.
struct SealedColumns {
    kind: &'static CStr,
    key_id: &'static CStr,
    wrapped_key: &'static CStr,
    ciphertext: &'static CStr,
}

const VERSION_ROW: SealedColumns = SealedColumns {
    kind: c"value_kind",
    key_id: c"key_id",
    wrapped_key: c"wrapped_key",
    ciphertext: c"ciphertext",
};

const CURRENT_COPY: SealedColumns = SealedColumns {
    kind: c"current_value_kind",
    key_id: c"current_key_id",
    wrapped_key: c"current_wrapped_key",
    ciphertext: c"current_ciphertext",
};

impl StoredVersion {
    /// Version `id` as a probe found it. A missing part (only tampering makes one) fails to
    /// open as an integrity error.
    fn from_row(row: &index_read::Row, id: Uuid, columns: &SealedColumns) -> Result<Self> {
        Ok(StoredVersion {
            id,
            kind: row.get::<&str>(columns.kind)?.and_then(ValueKind::parse),
            key_id: row.get(columns.key_id)?.unwrap_or_default(),
            wrapped_key: row.get(columns.wrapped_key)?.unwrap_or_default(),
            ciphertext: row.get(columns.ciphertext)?.unwrap_or_default(),
        })
    }

    /// The plaintext, decrypted in the ciphertext's own buffer.
    fn open(self, secret_id: Uuid, secret_name: &str) -> Result<Zeroizing<Vec<u8>>> {
        let kind = self
            .kind
            .ok_or_else(|| Error::Integrity(secret_name.to_string()))?;
        let key = keys::verified_key(&self.key_id, Some(secret_name))?;
        crypto::open(
            key,
            &binding(secret_id, self.id, kind),
            &self.wrapped_key,
            self.ciphertext,
        )
        .map_err(|_| Error::Integrity(secret_name.to_string()))
    }
}

fn stored_version(client: &SpiClient<'_>, version_id: Uuid) -> Result<Option<StoredVersion>> {
    let mut rows = client.select(
        "SELECT value_kind, key_id, wrapped_key, ciphertext FROM secrets.secret_version \
         WHERE id = $1",
        Some(1),
        &[version_id.into()],
    )?;
    let Some(row) = rows.next() else {
        return Ok(None);
    };
    Ok(Some(StoredVersion {
        id: version_id,
        kind: row.get::<String>(1)?.as_deref().and_then(ValueKind::parse),
        key_id: required(&row, 2)?,
        wrapped_key: required(&row, 3)?,
        ciphertext: required(&row, 4)?,
    }))
}

/// The plaintext of one version of `secret`, for the rotation engine.
pub fn version_value(
    client: &SpiClient<'_>,
    secret: &SecretRow,
    version_id: Uuid,
) -> Result<Zeroizing<Vec<u8>>> {
    stored_version(client, version_id)?
        .ok_or_else(|| Error::VersionNotFound {
            name: secret.name.clone(),
            what: version_id.to_string(),
        })?
        .open(secret.id, &secret.name)
}

/// The plaintext of the version carrying `label`, if any.
pub fn labelled_value(
    client: &SpiClient<'_>,
    secret: &SecretRow,
    label: &str,
) -> Result<Option<Zeroizing<Vec<u8>>>> {
    labels::holder(client, secret.id, label)?
        .map(|version_id| version_value(client, secret, version_id))
        .transpose()
}

/// The CURRENT value of secret `name` on behalf of `role` (not the caller): a rotation reads
/// the admin credential named by `master_secret` with the rights of the rotated secret's
/// owner, so naming someone else's admin secret gains nothing. The read is recorded in the
/// audit trail as a read of that secret, allowed or not, naming the role whose rights it used.
pub fn read_current_as(role: pg_sys::Oid, name: &str) -> Result<Zeroizing<Vec<u8>>> {
    Spi::connect_mut(|client| {
        let secret = find_secret(client, name, false)?;
        let read = check_access(
            role,
            name,
            Action::Get,
            secret.as_ref().map(SecretRow::subject),
        )
        .and_then(|()| {
            let secret = secret
                .as_ref()
                .expect("check_access refuses a missing secret");
            labels::holder(client, secret.id, CURRENT)?.ok_or_else(|| Error::VersionNotFound {
                name: name.to_string(),
                what: format!("with stage {CURRENT}"),
            })
        });
        let (outcome, sqlstate) = audit::outcome_of(read.as_ref().err());
        let mut details = serde_json::json!({
            "function": "rotation",
            "on_behalf_of": access::role_name(role),
        });
        if let Err(error) = &read {
            details["error"] = error.to_string().into();
        }
        let version_id = read.as_ref().ok().copied();
        audit::record(
            "get",
            Some(name),
            audit::Touched {
                secret_id: secret.as_ref().map(|secret| secret.id),
                version_id,
                version_stage: version_id.map(|_| CURRENT.to_string()),
                ..Default::default()
            },
            outcome,
            sqlstate,
            details.to_string(),
        )?;
        let version_id = read?;
        let secret = secret.expect("check_access refuses a missing secret");
        version_value(client, &secret, version_id)
    })
}

fn touch_changed(client: &mut SpiClient<'_>, secret_id: Uuid) -> Result<()> {
    client.update(
        "UPDATE secrets.secret SET changed_at = pg_catalog.now() WHERE id = $1",
        None,
        &[secret_id.into()],
    )?;
    Ok(())
}

/// Removes for good the secrets whose recovery window has ended, their versions and wrapped
/// keys with them. Each removal is an audit record of its own under the secret (`delete`,
/// `details` naming `purged_by`: the worker, or the function that purged on its way): the
/// moment a value became unrecoverable is what its managers will ask for.
pub fn purge_expired(purged_by: &str) -> Result<i64> {
    Spi::connect_mut(|client| purge(client, purged_by, None))
}

/// `purge_expired`, of the secret named `only` when given. Like every record, a removal's is
/// written when the call runs: a transaction that rolls back undoes the removal, not the
/// record. So a call purges on its way only the secret it needs gone (the name
/// `create_secret` takes again), once nothing is left that could refuse the call.
fn purge(client: &mut SpiClient<'_>, purged_by: &str, only: Option<&str>) -> Result<i64> {
    let purged: Vec<(String, Uuid)> = client
        .update(
            "DELETE FROM secrets.secret WHERE purge_at <= pg_catalog.now() \
                AND ($1::text IS NULL OR name = $1) RETURNING name, id",
            None,
            &[only.into()],
        )?
        .map(|row| Ok((required(&row, 1)?, required(&row, 2)?)))
        .collect::<Result<_>>()?;
    let details = serde_json::json!({"function": "purge", "purged_by": purged_by});
    for (name, id) in &purged {
        audit::removed_for_good(name, *id, None, &details)?;
    }
    let count = purged.len() as i64;
    forget_exact_grants(client, purged.into_iter().map(|(name, _)| name).collect())?;
    Ok(count)
}

/// Grants on the exact names of secrets removed for good go with them: a later secret of the
/// same name, perhaps another team's, must not inherit them. Wildcard patterns stay.
fn forget_exact_grants(client: &mut SpiClient<'_>, names: Vec<String>) -> Result<()> {
    if names.is_empty() {
        return Ok(());
    }
    let forgotten = client.update(
        "DELETE FROM secrets.access_grant WHERE name_pattern = ANY($1)",
        None,
        &[names.into()],
    )?;
    if !forgotten.is_empty() {
        access::invalidate_grants();
    }
    Ok(())
}

pub struct NewSecret<'a> {
    pub name: &'a str,
    pub value: Option<Value<'a>>,
    pub description: Option<&'a str>,
    pub tags: serde_json::Map<String, serde_json::Value>,
    pub key_id: Option<&'a str>,
    pub token: Option<&'a str>,
}

pub fn create_secret(new: NewSecret<'_>) -> Result<Option<Uuid>> {
    let caller = access::caller();
    if !access::decide(caller, Action::Create, new.name, None, Context::Session)?.allows() {
        return Err(Error::AccessDenied {
            name: new.name.to_string(),
            action: "create",
        });
    }
    let key = keys::key_for_writing(new.key_id)?;
    Spi::connect_mut(|client| {
        let existing = find_secret(client, new.name, true)?;
        // A secret of this name whose recovery window has ended is gone but for the purge: the
        // name is free again, whether the worker came by or not. Asked only of a deleted one.
        let expired = match &existing {
            Some(row) if row.purge_at.is_some() => db::first_value::<bool>(client.select(
                "SELECT purge_at <= pg_catalog.now() FROM secrets.secret WHERE id = $1",
                None,
                &[row.id.into()],
            )?)?
            .unwrap_or(false),
            _ => false,
        };
        if let Some(existing) = existing.filter(|_| !expired) {
            if let Some(purge_at) = existing.purge_at {
                return Err(Error::ScheduledForDeletion {
                    name: existing.name,
                    purge_at,
                });
            }
            // A retried create_secret returns what the first attempt made.
            if let Some(value) = &new.value {
                let may_put = access::decide(
                    caller,
                    Action::Put,
                    new.name,
                    Some(existing.subject()),
                    Context::Session,
                )?;
                if may_put.allows() {
                    if let Some(version) = version_for_token(client, &existing, value, new.token)? {
                        return Ok(Some(version));
                    }
                }
            }
            return Err(Error::AlreadyExists(new.name.to_string()));
        }
        access::within_own_manage(new.name, None, access::HandedOn::Ownership)?;
        if expired {
            purge(client, "create_secret", Some(new.name))?;
        }
        let secret = SecretRow {
            id: new_uuid(),
            name: new.name.to_string(),
            owner: caller,
            key_id: key.id.clone(),
            purge_at: None,
        };
        // A concurrent create of the same name that committed first (its row invisible to the
        // check above) is the same conflict, not a unique violation: at READ COMMITTED. Under
        // REPEATABLE READ PostgreSQL makes it a serialization failure (40001), to retry.
        let inserted = client.update(
            "INSERT INTO secrets.secret (id, name, description, tags, owner_role, key_id) \
             VALUES ($1, $2, $3, $4, $5::oid::regrole, $6) ON CONFLICT (name) DO NOTHING",
            None,
            &[
                secret.id.into(),
                new.name.into(),
                new.description.into(),
                JsonB(serde_json::Value::Object(new.tags)).into(),
                secret.owner.into(),
                secret.key_id.clone().into(),
            ],
        )?;
        if inserted.is_empty() {
            return Err(Error::AlreadyExists(new.name.to_string()));
        }
        let version = match &new.value {
            Some(value) => {
                let version = insert_version(client, &secret, value, new.token, new_uuid())?;
                labels::move_label(client, new.name, secret.id, CURRENT, version)?;
                Some(version)
            }
            None => None,
        };
        audit::touched(secret.id, version, version.map(|_| CURRENT));
        labels::notify_changed(client, "create", new.name, version)?;
        Ok(version)
    })
}

pub fn put_secret_value(
    name: &str,
    value: Value<'_>,
    stages: Vec<String>,
    token: Option<&str>,
) -> Result<Uuid> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Put, OnDeleted::Refuse)?;
        if let Some(version) = version_for_token(client, &secret, &value, token)? {
            return Ok(version);
        }
        let version = insert_version(client, &secret, &value, token, new_uuid())?;
        audit::touched(secret.id, Some(version), stages.first().map(String::as_str));
        let mut moved: Vec<&str> = stages.iter().map(String::as_str).collect();
        // The first version of a secret is what readers get, whatever else it is labelled.
        if !moved.contains(&CURRENT) && labels::holder(client, secret.id, CURRENT)?.is_none() {
            moved.push(CURRENT);
        }
        rotation::labels_moved_during_rotation(
            client,
            secret.id,
            name,
            &moved,
            &format!("put_secret_value wrote version {version}"),
        )?;
        for stage in moved {
            labels::move_label(client, name, secret.id, stage, version)?;
        }
        labels::prune_deprecated(client, Some(secret.id), "put_secret_value")?;
        touch_changed(client, secret.id)?;
        labels::notify_changed(client, "put", name, Some(version))?;
        Ok(version)
    })
}

/// What `get_secret_value` and friends return: the version read and its plaintext.
pub struct Fetched {
    pub version_id: Uuid,
    pub kind: ValueKind,
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl Fetched {
    /// The plaintext, moved out to be returned to the caller. PostgreSQL copies a function's
    /// result into its own memory, so the buffer is then freed unwiped, as a copy of it would
    /// have been; what lay past the plaintext was wiped when it was decrypted.
    pub fn take_plaintext(&mut self) -> Vec<u8> {
        std::mem::take(&mut *self.plaintext)
    }
}

/// The secret row as the read path needs it.
struct ReadHead {
    id: Uuid,
    owner: pg_sys::Oid,
    deleted: bool,
    access_is_stale: bool,
    /// The row's copy of its CURRENT version, read only when CURRENT is asked for.
    current: Option<StoredVersion>,
}

/// Reads one version: by id, by stage, or CURRENT. With `expect` set, a value of the other
/// kind is refused before it is decrypted. Hot path: index probes, no SPI unless the day's
/// first read records the access date. CURRENT comes from the secret row's own copy, so the
/// common read is one probe; other versions take two more (label, then version).
pub fn get_secret(
    name: &str,
    version_id: Option<Uuid>,
    stage: Option<&str>,
    expect: Option<ValueKind>,
) -> Result<Fetched> {
    let snapshot = index_read::begin_read();
    // The transaction's day in UTC (PostgreSQL's date: days since 2000-01-01), compared with
    // the stored one and written by the UPDATE below: the session's TimeZone, which any client
    // sets, must not move a secret's last access to another day.
    let today = {
        const MICROS_PER_DAY: i64 = 86_400_000_000;
        let started = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        started.div_euclid(MICROS_PER_DAY) as i32
    };
    let wants_current = version_id.is_none() && stage.unwrap_or(CURRENT) == CURRENT;
    let head = index_read::probe(
        &snapshot,
        c"secret",
        c"secret_name_key",
        &[Key::Text(c"name", name)],
        |row| {
            Ok(ReadHead {
                id: row.required(c"id")?,
                owner: row.required(c"owner_role")?,
                deleted: row
                    .get::<pgrx::datum::TimestampWithTimeZone>(c"purge_at")?
                    .is_some(),
                access_is_stale: row
                    .get::<pgrx::datum::Date>(c"last_accessed_on")?
                    .map(|day| day.to_pg_epoch_days())
                    != Some(today),
                current: if wants_current {
                    current_copy(row)?
                } else {
                    None
                },
            })
        },
    )?;
    if let Some(head) = &head {
        audit::touched(head.id, None, None);
    }
    check_access(
        access::caller(),
        name,
        Action::Get,
        head.as_ref().map(|h| access::Secret {
            id: h.id,
            owner: h.owner,
        }),
    )?;
    let mut head = head.expect("check_access refuses a missing secret");
    if head.deleted {
        return Err(scheduled_for_deletion(name, head.id)?);
    }
    let (stored, staged) = match head.current.take() {
        Some(current) => (current, Some(CURRENT)),
        None => find_version(&snapshot, name, head.id, version_id, stage)?,
    };
    match (expect, stored.kind) {
        (Some(ValueKind::String), Some(ValueKind::Binary)) => {
            return Err(Error::NotString(name.to_string()))
        }
        (Some(ValueKind::Binary), Some(ValueKind::String)) => {
            return Err(Error::NotBinary(name.to_string()))
        }
        _ => {}
    }
    audit::touched(head.id, Some(stored.id), staged);
    let (version_id, kind) = (stored.id, stored.kind);
    let plaintext = stored.open(head.id, name)?;
    if head.access_is_stale && !read_only_transaction() {
        Spi::run_with_args(
            "UPDATE secrets.secret SET last_accessed_on = $2 WHERE id = $1",
            &[
                head.id.into(),
                pgrx::datum::Date::saturating_from_raw(today).into(),
            ],
        )?;
    }
    Ok(Fetched {
        version_id,
        kind: kind.expect("checked by open"),
        plaintext,
    })
}

/// The secret row's copy of its CURRENT version: `None` when no version is CURRENT, and when
/// the table was created by a build before the copy existed (such tables are read the slower
/// way, through the label and the version).
fn current_copy(row: &index_read::Row) -> Result<Option<StoredVersion>> {
    row.get_if_present(c"current_version_id")
        .map(|id| StoredVersion::from_row(row, id, &CURRENT_COPY))
        .transpose()
}

/// The version a read asks for, found through its label (unless only an id is given) and
/// then its own row; with both, the label must be on that version. Also returns the stage it
/// was found by.
fn find_version<'a>(
    snapshot: &index_read::ReadSnapshot,
    name: &str,
    secret_id: Uuid,
    version_id: Option<Uuid>,
    stage: Option<&'a str>,
) -> Result<(StoredVersion, Option<&'a str>)> {
    let not_found = || Error::VersionNotFound {
        name: name.to_string(),
        what: match (version_id, stage) {
            (Some(id), Some(stage)) => format!("{id} with stage {stage}"),
            (Some(id), None) => id.to_string(),
            (None, stage) => format!("with stage {}", stage.unwrap_or(CURRENT)),
        },
    };
    let staged = match (version_id, stage) {
        (Some(_), None) => None,
        (_, stage) => Some(
            index_read::probe(
                snapshot,
                c"version_label",
                c"version_label_pkey",
                &[
                    Key::Uuid(c"secret_id", secret_id),
                    Key::Text(c"label", stage.unwrap_or(CURRENT)),
                ],
                |row| row.required::<Uuid>(c"version_id"),
            )?
            .ok_or_else(not_found)?,
        ),
    };
    let wanted = match (version_id, staged) {
        (Some(id), Some(staged)) if id != staged => return Err(not_found()),
        (Some(id), _) => id,
        (None, staged) => staged.expect("a stage was looked up"),
    };
    let stored = index_read::probe(
        snapshot,
        c"secret_version",
        c"secret_version_pkey",
        &[Key::Uuid(c"id", wanted)],
        |row| {
            Ok((
                row.get::<Uuid>(c"secret_id")?,
                StoredVersion::from_row(row, wanted, &VERSION_ROW)?,
            ))
        },
    )?;
    match stored {
        Some((Some(owner_secret), stored)) if owner_secret == secret_id => {
            Ok((stored, staged.map(|_| stage.unwrap_or(CURRENT))))
        }
        _ => Err(not_found()),
    }
}

fn scheduled_for_deletion(name: &str, secret_id: Uuid) -> Result<Error> {
    let purge_at = crate::db::select_value::<String>(
        "SELECT purge_at::text FROM secrets.secret WHERE id = $1",
        &[secret_id.into()],
    )?;
    Ok(Error::ScheduledForDeletion {
        name: name.to_string(),
        purge_at: purge_at.unwrap_or_default(),
    })
}

/// The stages on a version, for batch reads.
pub fn stages_of(version_id: Uuid) -> Result<Vec<String>> {
    Spi::connect(|client| labels::labels_of(client, version_id))
}

pub fn update_secret(name: &str, description: Option<&str>, key_id: Option<&str>) -> Result<()> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Manage, OnDeleted::Refuse)?;
        if let Some(description) = description {
            client.update(
                "UPDATE secrets.secret SET description = NULLIF($2, '') WHERE id = $1",
                None,
                &[secret.id.into(), description.into()],
            )?;
        }
        if let Some(key_id) = key_id {
            crate::rewrap::rewrap_secret(client, &secret, key_id)?;
        }
        touch_changed(client, secret.id)
    })
}

pub fn update_version_stage(
    name: &str,
    stage: &str,
    move_to: Option<Uuid>,
    remove_from: Option<Uuid>,
) -> Result<()> {
    if move_to.is_none() && remove_from.is_none() {
        return Err(Error::InvalidParameter(
            "give move_to_version_id, remove_from_version_id or both".into(),
        ));
    }
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Put, OnDeleted::Refuse)?;
        let holder = labels::holder(client, secret.id, stage)?;
        if let Some(remove_from) = remove_from.filter(|id| Some(*id) != holder) {
            return Err(Error::InvalidParameter(format!(
                "stage {stage} of secret \"{name}\" is not on version {remove_from}"
            )));
        }
        // A move onto the version that holds the stage changes nothing, rotation included.
        if move_to.is_none() || move_to != holder {
            let did = match move_to {
                Some(target) => {
                    format!("update_secret_version_stage moved {stage} to version {target}")
                }
                None => format!("update_secret_version_stage removed {stage}"),
            };
            rotation::labels_moved_during_rotation(client, secret.id, name, &[stage], &did)?;
        }
        match move_to {
            Some(target) => {
                if !version_exists(client, secret.id, target)? {
                    return Err(Error::VersionNotFound {
                        name: name.to_string(),
                        what: target.to_string(),
                    });
                }
                if let Some(holder) = holder.filter(|id| *id != target && remove_from.is_none()) {
                    return Err(Error::InvalidParameter(format!(
                        "stage {stage} of secret \"{name}\" is on version {holder}; pass it as \
                         remove_from_version_id to move the stage"
                    )));
                }
                labels::move_label(client, name, secret.id, stage, target)?;
            }
            None if stage == CURRENT => {
                return Err(Error::InvalidParameter(
                    "stage CURRENT can only be moved to another version, not removed".into(),
                ))
            }
            None => labels::remove_label(client, secret.id, stage)?,
        }
        labels::prune_deprecated(client, Some(secret.id), "update_secret_version_stage")?;
        touch_changed(client, secret.id)?;
        labels::notify_changed(client, "stage", name, move_to.or(remove_from))
    })
}

fn version_exists(client: &SpiClient<'_>, secret_id: Uuid, version_id: Uuid) -> Result<bool> {
    Ok(!client
        .select(
            "SELECT FROM secrets.secret_version WHERE secret_id = $1 AND id = $2",
            Some(1),
            &[secret_id.into(), version_id.into()],
        )?
        .is_empty())
}

pub fn describe_secret(name: &str) -> Result<JsonB> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Describe, OnDeleted::Allow)?;
        let description = db::first_value::<JsonB>(client.select(
                "SELECT pg_catalog.jsonb_build_object( \
                   'id', s.id, 'name', s.name, 'description', s.description, 'tags', s.tags, \
                   'owner', s.owner_role::text, 'key_id', s.key_id, \
                   'created_at', s.created_at, 'last_changed_at', s.changed_at, \
                   'last_accessed_on', s.last_accessed_on, \
                   'deleted_at', s.deleted_at, 'purge_at', s.purge_at, \
                   'versions', COALESCE((SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object( \
                        'version_id', v.id, 'stages', st.stages, 'created_at', v.created_at) \
                        ORDER BY v.created_at DESC) \
                      FROM secrets.secret_version v \
                      CROSS JOIN LATERAL (SELECT pg_catalog.array_agg(l.label ORDER BY l.label) \
                                          AS stages FROM secrets.version_label l \
                                          WHERE l.version_id = v.id) st \
                      WHERE v.secret_id = s.id AND st.stages IS NOT NULL), '[]'), \
                   'deprecated_versions', (SELECT pg_catalog.count(*) \
                      FROM secrets.secret_version v WHERE v.secret_id = s.id \
                      AND NOT EXISTS (SELECT FROM secrets.version_label l \
                                      WHERE l.version_id = v.id))) \
                 FROM secrets.secret s WHERE s.id = $1",
                Some(1),
                &[secret.id.into()],
            )?)?;
        // Each query has its own snapshot: a forced deletion may have committed in between.
        let gone = || Error::NotFound(name.to_string());
        let mut description = description.ok_or_else(gone)?;
        let rotation = rotation::describe(client, secret.id)?.ok_or_else(gone)?;
        if let serde_json::Value::Object(fields) = &mut description.0 {
            fields.insert("rotation".into(), rotation.0);
        }
        Ok(description)
    })
}

/// A secret's metadata as `list_secrets` and the view `secret_list` show it.
pub struct Listed {
    pub name: String,
    pub id: Uuid,
    pub description: Option<String>,
    pub tags: JsonB,
    pub owner: String,
    pub owner_oid: pg_sys::Oid,
    pub key_id: String,
    pub created_at: TimestampWithTimeZone,
    pub last_changed_at: TimestampWithTimeZone,
    pub last_accessed_on: Option<pgrx::datum::Date>,
    pub deleted_at: Option<TimestampWithTimeZone>,
    pub purge_at: Option<TimestampWithTimeZone>,
    pub rotation_enabled: bool,
    pub rotator: Option<String>,
    pub rotation_schedule: Option<String>,
    pub next_rotation_at: Option<TimestampWithTimeZone>,
    pub last_rotated_at: Option<TimestampWithTimeZone>,
}

pub fn list_secrets(
    name_prefix: Option<&str>,
    tag_key: Option<&str>,
    tag_value: Option<&str>,
    include_planned_deletion: bool,
) -> Result<Vec<Listed>> {
    // A filter longer than anything it compares with would match nothing: a mistake.
    let filters = [
        ("name_prefix", name_prefix, validate::MAX_NAME_CHARS),
        ("tag_key", tag_key, validate::MAX_TAG_KEY_CHARS),
        ("tag_value", tag_value, validate::MAX_TAG_VALUE_CHARS),
    ];
    for (argument, filter, most) in filters {
        let chars = filter.map_or(0, |filter| filter.chars().count());
        if chars > most {
            return Err(Error::InvalidParameter(format!(
                "{argument} is at most {most} characters, not {chars}"
            )));
        }
    }
    let caller = access::caller();
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT name, id, description, tags, owner_role::text, created_at, changed_at, \
                    last_accessed_on, deleted_at, purge_at, owner_role::oid, key_id, \
                    rotation_enabled, rotator, rotation_schedule, next_rotation_at, \
                    last_rotated_at \
             FROM secrets.secret \
             WHERE ($1::text IS NULL OR pg_catalog.left(name, pg_catalog.length($1)) = $1) \
               AND ($2::text IS NULL OR tags ? $2) \
               AND ($3::text IS NULL OR EXISTS (SELECT FROM pg_catalog.jsonb_each_text(tags) t \
                                               WHERE t.value = $3 \
                                                 AND ($2::text IS NULL OR t.key = $2))) \
               AND ($4 OR deleted_at IS NULL) \
             ORDER BY name",
            None,
            &[
                name_prefix.into(),
                tag_key.into(),
                tag_value.into(),
                include_planned_deletion.into(),
            ],
        )?;
        let mut listed = Vec::new();
        for row in rows {
            let name: String = required(&row, 1)?;
            let id: Uuid = required(&row, 2)?;
            let owner: pg_sys::Oid = required(&row, 11)?;
            let secret = access::Secret { id, owner };
            if !access::shown(caller, Action::Describe, &name, secret, Context::Session)? {
                continue;
            }
            listed.push(Listed {
                name,
                id,
                description: row.get(3)?,
                tags: required(&row, 4)?,
                owner: required(&row, 5)?,
                created_at: required(&row, 6)?,
                last_changed_at: required(&row, 7)?,
                last_accessed_on: row.get(8)?,
                deleted_at: row.get(9)?,
                purge_at: row.get(10)?,
                owner_oid: owner,
                key_id: required(&row, 12)?,
                rotation_enabled: required(&row, 13)?,
                rotator: row.get(14)?,
                rotation_schedule: row.get(15)?,
                next_rotation_at: row.get(16)?,
                last_rotated_at: row.get(17)?,
            });
        }
        Ok(listed)
    })
}

pub fn list_version_ids(
    name: &str,
    include_deprecated: bool,
) -> Result<Vec<(Uuid, Vec<String>, TimestampWithTimeZone)>> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Describe, OnDeleted::Allow)?;
        let rows = client.select(
            "SELECT v.id, COALESCE(st.stages, '{}'), v.created_at \
             FROM secrets.secret_version v \
             CROSS JOIN LATERAL (SELECT pg_catalog.array_agg(l.label ORDER BY l.label) AS stages \
                                 FROM secrets.version_label l WHERE l.version_id = v.id) st \
             WHERE v.secret_id = $1 AND ($2 OR st.stages IS NOT NULL) \
             ORDER BY v.created_at DESC",
            None,
            &[secret.id.into(), include_deprecated.into()],
        )?;
        rows.map(|row| {
            Ok((
                required(&row, 1)?,
                row.get(2)?.unwrap_or_default(),
                required(&row, 3)?,
            ))
        })
        .collect()
    })
}

pub fn tag_secret(name: &str, tags: serde_json::Map<String, serde_json::Value>) -> Result<()> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Manage, OnDeleted::Refuse)?;
        let merged = db::first_value::<i64>(client.update(
                "UPDATE secrets.secret SET tags = tags || $2, changed_at = pg_catalog.now() \
                 WHERE id = $1 RETURNING (SELECT pg_catalog.count(*) FROM pg_catalog.jsonb_object_keys(tags))",
                None,
                &[secret.id.into(), JsonB(serde_json::Value::Object(tags)).into()],
            )?)?
            .unwrap_or(0);
        validate::tag_count(merged as usize)
    })
}

pub fn untag_secret(name: &str, keys: Vec<String>) -> Result<()> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Manage, OnDeleted::Refuse)?;
        client.update(
            "UPDATE secrets.secret SET tags = tags - $2::text[], changed_at = pg_catalog.now() \
             WHERE id = $1",
            None,
            &[secret.id.into(), keys.into()],
        )?;
        Ok(())
    })
}

pub fn delete_secret(name: &str, window_days: i32, force: bool) -> Result<TimestampWithTimeZone> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Delete, OnDeleted::Allow)?;
        let when = if force {
            // Removing the rows removes the wrapped data keys: no copy of a ciphertext
            // (a backup, a replica) can be decrypted with the master key alone any more.
            let when = db::first_value::<TimestampWithTimeZone>(client.update(
                "DELETE FROM secrets.secret WHERE id = $1 RETURNING pg_catalog.now()",
                None,
                &[secret.id.into()],
            )?)?;
            forget_exact_grants(client, vec![name.to_string()])?;
            when
        } else {
            if let Some(purge_at) = secret.purge_at {
                return Err(Error::ScheduledForDeletion {
                    name: name.to_string(),
                    purge_at,
                });
            }
            db::first_value::<TimestampWithTimeZone>(client.update(
                "UPDATE secrets.secret SET deleted_at = pg_catalog.now(), \
                            purge_at = pg_catalog.now() + pg_catalog.make_interval(days => $2), \
                            changed_at = pg_catalog.now() \
                     WHERE id = $1 RETURNING purge_at",
                None,
                &[secret.id.into(), window_days.into()],
            )?)?
        };
        labels::notify_changed(client, "delete", name, None)?;
        Ok(when.expect("RETURNING gives one row"))
    })
}

pub fn restore_secret(name: &str) -> Result<()> {
    Spi::connect_mut(|client| {
        let secret = authorize(client, name, Action::Delete, OnDeleted::Allow)?;
        if secret.purge_at.is_none() {
            return Err(Error::NotDeleted(name.to_string()));
        }
        client.update(
            "UPDATE secrets.secret SET deleted_at = NULL, purge_at = NULL, \
                    changed_at = pg_catalog.now() WHERE id = $1",
            None,
            &[secret.id.into()],
        )?;
        labels::notify_changed(client, "restore", name, None)
    })
}
