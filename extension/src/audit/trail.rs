//! The stored trail: `secrets.audit_record`, append-only (a trigger refuses UPDATE, DELETE and
//! TRUNCATE, for the owner too), each row chained to the one before by
//! `hash = SHA-256(prev_hash || canonical JSON of (id, record))`. Only the worker appends, so
//! ids have no gaps; retention removes a whole prefix and leaves an anchor with the hash of
//! the last removed row, so verification still starts from a known hash.

use super::append::{Appender, ChainedRecord, ROWS_PER_CALL};
use super::{queue, Record};
use crate::access::{self, Action, Context, Secret};
use crate::db::required;
use crate::errors::{Error, Result};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};
use pgrx::{PgOid, Uuid};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::cell::Cell;

/// Records moved from the queue to the table per transaction.
pub const DRAIN_BATCH: usize = 4000;
const GENESIS: [u8; 32] = [0; 32];

/// `SHA-256(previous || [id,record])`: the record's JSON (`Record::to_json`, which the server
/// log line reuses) inside the compact JSON array `[id,…]`, so that anyone can recompute it.
pub fn chain_hash(previous: &[u8], id: i64, record_json: &[u8]) -> [u8; 32] {
    use std::io::Write;
    let mut prefix = [0u8; 24];
    let mut cursor = &mut prefix[..];
    write!(cursor, "[{id},").expect("an i64 and two bytes fit in 24");
    let written = 24 - cursor.len();
    let mut hasher = Sha256::new();
    hasher.update(previous);
    hasher.update(&prefix[..written]);
    hasher.update(record_json);
    hasher.update(b"]");
    hasher.finalize().into()
}

/// The statements every drain runs, prepared by the worker's first drain and kept for the
/// life of the process: parsing, analysing and planning them in every batch's transaction
/// took 7% of the worker's time. PostgreSQL plans a kept statement again by itself
/// when a table it reads changes, or is dropped and created again.
struct DrainStatements {
    stored_through: OwnedPreparedStatement,
    newest_record: OwnedPreparedStatement,
    record_progress: OwnedPreparedStatement,
}

thread_local! {
    static DRAIN_STATEMENTS: Cell<Option<&'static DrainStatements>> = const { Cell::new(None) };
}

/// The kept statements, prepared on first use. They are leaked on purpose: they live as long
/// as the worker, and freeing them as its thread ends would call into a server process that
/// is shutting down.
fn drain_statements(client: &SpiClient<'_>) -> Result<&'static DrainStatements> {
    if let Some(statements) = DRAIN_STATEMENTS.with(Cell::get) {
        return Ok(statements);
    }
    let (uuid, int8) = (
        PgOid::from_untagged(pg_sys::UUIDOID),
        PgOid::from_untagged(pg_sys::INT8OID),
    );
    let statements = DrainStatements {
        stored_through: client
            .prepare(
                "SELECT through FROM secrets.audit_queue_progress WHERE ring_id = $1",
                &[uuid],
            )?
            .keep(),
        newest_record: client
            .prepare(
                "SELECT id, hash FROM secrets.audit_record ORDER BY id DESC LIMIT 1",
                &[],
            )?
            .keep(),
        record_progress: client
            .prepare_mut(
                "INSERT INTO secrets.audit_queue_progress (ring_id, through) VALUES ($1, $2) \
                 ON CONFLICT (ring_id) DO UPDATE SET through = excluded.through",
                &[uuid, int8],
            )?
            .keep(),
    };
    let statements: &'static DrainStatements = Box::leak(Box::new(statements));
    DRAIN_STATEMENTS.with(|kept| kept.set(Some(statements)));
    Ok(statements)
}

/// The last stored id and hash: the newest row, else the newest retention anchor, else the
/// start of the chain; but never short of the end recorded outside the database (`head`).
/// Records removed from the end of the table leave their ids unused, so `verify_audit_log`
/// finds the gap, rather than new records chaining cleanly over it.
fn chain_end(client: &SpiClient<'_>, statements: &DrainStatements) -> Result<(i64, Vec<u8>)> {
    let newest = client
        .select(&statements.newest_record, None, &[])?
        .next()
        .map(|row| -> Result<_> { Ok((required(&row, 1)?, required(&row, 2)?)) })
        .transpose()?;
    let stored = match newest {
        Some(end) => end,
        None => latest_anchor(client)?.unwrap_or((0, GENESIS.to_vec())),
    };
    Ok(match super::head::read() {
        Some(head) if head.id > stored.0 => (head.id, head.hash.to_vec()),
        _ => stored,
    })
}

fn latest_anchor(client: &SpiClient<'_>) -> Result<Option<(i64, Vec<u8>)>> {
    client
        .select(
            "SELECT removed_through, anchor_hash FROM secrets.audit_anchor \
             ORDER BY removed_through DESC LIMIT 1",
            None,
            &[],
        )?
        .next()
        .map(|row| Ok((required(&row, 1)?, required(&row, 2)?)))
        .transpose()
}

/// Dated when it is stored: its own time is lost, and a record dated before the ones around
/// it would make retention take them too.
fn unreadable(why: &str) -> Record<'static> {
    Record {
        at_micros: access::now_micros(),
        action: "unreadable".into(),
        outcome: "error".into(),
        details: serde_json::json!({ "error": why }).to_string().into(),
        ..Record::default()
    }
}

/// What one drain moved: how many records, and their server-log lines when
/// `pg_secrets.audit_server_log` is on (written once the batch is committed).
pub struct Drained {
    pub count: usize,
    pub log_lines: Vec<Vec<u8>>,
    /// The chain's new end, for `head::write` once committed.
    pub head: Option<super::head::Head>,
}

/// The worker: moves up to one batch from the queue to the table, in the current transaction,
/// with the queue position it reaches. The queue is released by the worker after the commit.
pub fn drain_batch() -> Result<Drained> {
    let (ring_id, _) = queue::position()?;
    Spi::connect_mut(|client| {
        let statements = drain_statements(client)?;
        // Records a crash left queued after their batch had committed are not stored twice.
        let stored_through = client
            .select(&statements.stored_through, None, &[ring_id.into()])?
            .next()
            .map(|row| row.get::<i64>(1))
            .transpose()?
            .flatten();
        if let Some(through) = stored_through {
            queue::skip_through(through as u64)?;
        }
        let (ring_id, tail) = queue::position()?;
        let queued = queue::peek(DRAIN_BATCH)?;
        if queued.is_empty() {
            return Ok(Drained {
                count: 0,
                log_lines: Vec::new(),
                head: None,
            });
        }
        // The commit waits for its local WAL flush (whatever synchronous_commit says elsewhere):
        // the slots are freed right after it, and a batch lost from the WAL would be lost for
        // good. Not for a synchronous standby: one that is down must not stop the trail, and
        // with it every audited read once the queue is full.
        crate::db::commit_locally();
        let (mut id, stored_previous) = chain_end(client, statements)?;
        // A stored hash of another length was tampered with (verify_audit_log says where);
        // the chain goes on from its digest.
        let mut previous: [u8; 32] = stored_previous
            .try_into()
            .unwrap_or_else(|bytes: Vec<u8>| Sha256::digest(bytes).into());
        let mut appender = Appender::open()?;
        let mut rows = Vec::with_capacity(ROWS_PER_CALL);
        let mut log_lines = Vec::new();
        let log = crate::settings::audit_server_log();
        for bytes in &queued {
            // A slot that did not hold its record intact, or a record that does not decode
            // (truncated at the slot size), still takes its place in the trail.
            let record = match bytes.as_deref().map(Record::from_queued) {
                Some(Some(record)) => record,
                damaged => unreadable(if damaged.is_some() {
                    "the queued record was truncated"
                } else {
                    "the queued record's slot was stale or damaged, as an operating-system crash \
                     can leave the queue file"
                }),
            };
            let json = record.to_json();
            id += 1;
            let hash = chain_hash(&previous, id, &json);
            if log {
                log_lines.push(super::server_log_line(&record, &json, Some((id, &hash))));
            }
            rows.push(ChainedRecord {
                id,
                record,
                prev_hash: std::mem::replace(&mut previous, hash),
                hash,
            });
            if rows.len() == ROWS_PER_CALL {
                appender.append(&rows);
                rows.clear();
            }
        }
        appender.append(&rows);
        appender.finish();
        client.update(
            &statements.record_progress,
            None,
            &[ring_id.into(), ((tail + queued.len() as u64) as i64).into()],
        )?;
        Ok(Drained {
            count: queued.len(),
            log_lines,
            head: super::head::audit_table().map(|table| super::head::Head {
                table,
                id,
                hash: previous,
            }),
        })
    })
}

/// `verify_audit_log()`: walks the chain; returns (ok, rows checked, first bad id). The
/// chain must reach the end the worker last recorded outside the database (`head`), with the
/// hash it recorded there: the newest records removed, or records changed with every hash
/// after them computed anew, are found too.
pub fn verify() -> Result<(bool, i64, Option<i64>)> {
    require_auditor("verifying the audit log")?;
    let head = super::head::read();
    Spi::connect(|client| {
        let anchor = latest_anchor(client)?;
        if let Some((through, _)) = &anchor {
            // An anchor says the records up to it were removed: one still there means the
            // anchor is false, put in to start the walk past records that were changed.
            let still_there: Option<i64> = crate::db::first_value(client.select(
                "SELECT min(id) FROM secrets.audit_record WHERE id <= $1",
                None,
                &[(*through).into()],
            )?)?;
            if let Some(id) = still_there {
                return Ok((false, 0, Some(id)));
            }
        }
        let (mut expected_id, mut expected_prev) = match &anchor {
            Some((through, hash)) => (through + 1, hash.clone()),
            None => (1, GENESIS.to_vec()),
        };
        let mut checked = 0i64;
        let mut after = expected_id - 1;
        // Whether the walk has met the recorded end with the recorded hash (an end the
        // retention has since removed says nothing).
        let head_reached = |id: i64, hash: &[u8]| {
            head.as_ref()
                .is_none_or(|head| head.id < id || (head.id == id && head.hash[..] == *hash))
        };
        let mut reached = head_reached(expected_id - 1, &expected_prev);
        loop {
            let rows = client.select(
                "SELECT id, (EXTRACT(epoch FROM at) * 1000000)::int8, \"session_user\", \
                        \"current_user\", action, secret_name, secret_id::text, version_id::text, \
                        version_stage, outcome, sqlstate, client_addr, client_port, \
                        application_name, backend_pid, details::text, prev_hash, hash \
                 FROM secrets.audit_record WHERE id > $1 ORDER BY id LIMIT 10000",
                None,
                &[after.into()],
            )?;
            if rows.is_empty() {
                return Ok(match head.as_ref().filter(|_| !reached) {
                    None => (true, checked, None),
                    // Short of the recorded end: the records after the last one are gone.
                    Some(head) if head.id >= expected_id => (false, checked, Some(expected_id)),
                    // The recorded end is there, with another hash: changed at or before it.
                    Some(head) => (false, checked, Some(head.id)),
                });
            }
            for row in rows {
                let id: i64 = required(&row, 1)?;
                let text = |column| -> Result<Option<Cow<'static, str>>> {
                    Ok(row.get::<String>(column)?.map(Cow::Owned))
                };
                let record = Record {
                    at_micros: row.get(2)?.unwrap_or_default(),
                    session_user: text(3)?.unwrap_or_default(),
                    current_user: text(4)?.unwrap_or_default(),
                    action: text(5)?.unwrap_or_default(),
                    secret_name: text(6)?,
                    secret_id: text(7)?,
                    version_id: text(8)?,
                    version_stage: text(9)?,
                    outcome: text(10)?.unwrap_or_default(),
                    sqlstate: text(11)?,
                    client_addr: text(12)?,
                    client_port: row.get(13)?,
                    application_name: text(14)?,
                    backend_pid: row.get(15)?.unwrap_or_default(),
                    details: text(16)?.unwrap_or_default(),
                };
                let prev_hash: Vec<u8> = row.get(17)?.unwrap_or_default();
                let hash: Vec<u8> = row.get(18)?.unwrap_or_default();
                checked += 1;
                // A gap (removed rows), a different predecessor (removed or reordered), or a
                // hash that does not match the content (changed).
                if id != expected_id
                    || prev_hash != expected_prev
                    || chain_hash(&prev_hash, id, &record.to_json())[..] != hash[..]
                {
                    let first_bad = if id != expected_id { expected_id } else { id };
                    return Ok((false, checked, Some(first_bad)));
                }
                if head.as_ref().is_some_and(|head| head.id == id) {
                    reached = head_reached(id, &hash);
                }
                expected_id = id + 1;
                expected_prev = hash;
                after = id;
            }
        }
    })
}

thread_local! {
    /// Set only while `purge_audit_log` deletes its prefix: the append-only trigger lets
    /// exactly that through.
    static RETENTION_RUNNING: Cell<bool> = const { Cell::new(false) };
}

pub fn retention_running() -> bool {
    RETENTION_RUNNING.with(Cell::get)
}

/// Lowers the flag however the deletion ends, an error included.
struct RetentionRunning;

impl RetentionRunning {
    fn start() -> RetentionRunning {
        RETENTION_RUNNING.with(|running| running.set(true));
        RetentionRunning
    }
}

impl Drop for RetentionRunning {
    fn drop(&mut self) {
        RETENTION_RUNNING.with(|running| running.set(false));
    }
}

/// The longest `older_than` `purge_audit_log` takes: a hundred years.
pub const MAX_RETENTION_DAYS: i64 = 36_500;

/// `purge_audit_log(older_than)`: removes the whole prefix of records older than that, keeps
/// an anchor so the rest still verifies, and returns how many it removed.
pub fn purge(older_than_seconds: f64) -> Result<i64> {
    access::require_on_every_secret(Action::Manage, "purging the audit log")?;
    Spi::connect_mut(|client| {
        // Who read what outlives the records it was read from: offboarding by actual reads
        // looks there and at the records still kept.
        update_readers(client)?;
        // The prefix ends before the first record inside the window, not at the last record
        // outside it: records are dated by the backends that made them, so an early-dated one
        // after recent ones must not take those with it.
        let through = crate::db::first_value::<i64>(client.select(
            "SELECT coalesce((SELECT min(id) - 1 FROM secrets.audit_record \
                              WHERE at >= pg_catalog.now() - pg_catalog.make_interval(secs => $1)), \
                             (SELECT max(id) FROM secrets.audit_record))",
            None,
            &[older_than_seconds.into()],
        )?)?;
        let Some(through) = through else {
            return Ok(0);
        };
        // None when nothing precedes the window, or a concurrent purge removed it already.
        let Some(anchor_hash) = crate::db::first_value::<Vec<u8>>(client.select(
            "SELECT hash FROM secrets.audit_record WHERE id = $1",
            None,
            &[through.into()],
        )?)?
        else {
            return Ok(0);
        };
        let removed = {
            let _running = RetentionRunning::start();
            client
                .update(
                    "DELETE FROM secrets.audit_record WHERE id <= $1",
                    None,
                    &[through.into()],
                )?
                .len() as i64
        };
        client.update(
            "INSERT INTO secrets.audit_anchor (removed_through, anchor_hash, removed_count, removed_by) \
             VALUES ($1, $2, $3, $4::oid::regrole)",
            None,
            &[through.into(), anchor_hash.into(), removed.into(), access::caller().into()],
        )?;
        super::note("removed_through_id", through.into());
        super::note("removed_count", removed.into());
        Ok(removed)
    })
}

/// Work on the whole trail: `secrets_auditor` or `secrets_admin` (superusers are both).
pub fn require_auditor(what: &'static str) -> Result<()> {
    let caller = access::caller();
    if access::is_member(caller, "secrets_auditor")? || access::may_on_any(caller, Action::Manage)?
    {
        Ok(())
    } else {
        Err(Error::StoreWideDenied {
            what,
            who: "superusers, secrets_admin and secrets_auditor",
        })
    }
}

/// Secrets `role` read (a `get` that was allowed), according to the trail: for offboarding.
/// The readers table, and the records stored since it was last brought up to date. It only
/// reads: bringing the table up to date locks its progress row, and a caller that kept that
/// lock in an open transaction would stop the audit worker, which takes it too.
pub fn secrets_read_by(role: pg_sys::Oid) -> Result<Vec<Uuid>> {
    let name = access::role_name(role);
    Spi::connect(|client| {
        client
            .select(
                "SELECT secret_id FROM secrets.audit_reader WHERE role = $1 \
                 UNION \
                 SELECT a.secret_id FROM secrets.audit_record a \
                 WHERE a.id > (SELECT through_id FROM secrets.audit_reader_progress) \
                   AND a.action = 'get' AND a.outcome = 'allowed' AND a.secret_id IS NOT NULL \
                   AND $1 IN (a.\"current_user\", a.\"session_user\")",
                None,
                &[name.into()],
            )?
            .map(|row| required(&row, 1))
            .collect()
    })
}

/// Adds to `secrets.audit_reader` the (role, secret) pairs of allowed reads stored since the
/// last update. Returns the range of record ids examined, `(after, upto]`. The audit worker
/// calls it, and `purge_audit_log` before removing records.
pub(super) fn update_readers(client: &mut SpiClient<'_>) -> Result<(i64, i64)> {
    // Its one row is made with the table; only a superuser can have deleted it.
    let Some(range) = crate::db::first_row(client.update(
        "UPDATE secrets.audit_reader_progress p \
             SET through_id = (SELECT coalesce(max(id), 0) FROM secrets.audit_record) \
             FROM (SELECT through_id AS before FROM secrets.audit_reader_progress FOR UPDATE) b \
             RETURNING b.before, p.through_id",
        None,
        &[],
    )?) else {
        return Err(Error::SchemaMismatch {
            table: "secrets.audit_reader_progress".into(),
            problem: "its one row is missing".into(),
        });
    };
    let (after, upto): (i64, i64) = (range.get(1)?.unwrap_or(0), range.get(2)?.unwrap_or(0));
    if upto > after {
        client.update(
            "INSERT INTO secrets.audit_reader (role, secret_id, secret_name, first_at, first_audit_id) \
             SELECT u.role, a.secret_id, min(a.secret_name), min(a.at), min(a.id) \
             FROM secrets.audit_record a \
             CROSS JOIN LATERAL (VALUES (a.\"current_user\"), (a.\"session_user\")) AS u(role) \
             WHERE a.id > $1 AND a.id <= $2 AND a.action = 'get' AND a.outcome = 'allowed' \
               AND a.secret_id IS NOT NULL \
             GROUP BY u.role, a.secret_id \
             ON CONFLICT (role, secret_id) DO NOTHING",
            None,
            &[after.into(), upto.into()],
        )?;
    }
    Ok((after, upto))
}

/// The row-level security predicate of the audit table: `secrets_auditor` sees everything;
/// anyone else the records of secrets it may manage.
pub fn may_read(secret_id: Option<Uuid>, secret_name: Option<&str>) -> Result<bool> {
    let caller = access::caller();
    if access::is_member(caller, "secrets_auditor")? {
        return Ok(true);
    }
    // A record of no secret (store-wide work, a name no secret had, a pattern) is for those who
    // may manage every secret.
    let (Some(secret_id), Some(name)) = (secret_id, secret_name) else {
        return access::may_on_any(caller, Action::Manage);
    };
    let owner = crate::db::select_value::<pg_sys::Oid>(
        "SELECT owner_role::oid FROM secrets.secret WHERE id = $1",
        &[secret_id.into()],
    )?;
    // A secret since purged took its owner and its resource policy (and the policy's denials)
    // with it: what remains cannot say who managed it, so its records are for those who
    // manage every secret.
    let Some(owner) = owner else {
        return access::may_on_any(caller, Action::Manage);
    };
    let secret = Secret {
        id: secret_id,
        owner,
    };
    access::shown(caller, Action::Manage, name, secret, Context::Session)
}
