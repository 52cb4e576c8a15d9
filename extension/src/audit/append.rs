//! Appends the worker's batch to `secrets.audit_record` the way COPY does: rows go to the heap
//! a page at a time (`table_multi_insert`, one WAL record per page rather than per row), then
//! into the indexes, with the table's NOT NULL and CHECK constraints enforced. An INSERT from
//! arrays through SPI spent most of the worker's time building, unnesting and re-reading
//! those arrays; this is the part of the audit trail's cost that every audited read pays for
//! on a busy server.
//!
//! The table has no insert triggers, rules or row-level security for its owner to apply, so
//! the executor would add nothing else; `column_positions` refuses a table that has changed
//! so that it would.

use super::Record;
use crate::errors::{Error, Result};
use pgrx::pg_sys;
use pgrx::{IntoDatum, PgMemoryContexts};
use std::borrow::Cow;
use std::ffi::CStr;

/// One row of the trail: a record with its place in the hash chain.
pub struct ChainedRecord<'a> {
    pub id: i64,
    pub record: Record<'a>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Rows handed to `table_multi_insert` at a time: enough to fill several pages per call, few
/// enough that their slots and datums stay small.
pub const ROWS_PER_CALL: usize = 128;

/// The columns written, in this order, with their types; their positions are looked up by
/// name.
const COLUMNS: [(&CStr, pg_sys::Oid); 18] = [
    (c"id", pg_sys::INT8OID),
    (c"at", pg_sys::TIMESTAMPTZOID),
    (c"session_user", pg_sys::TEXTOID),
    (c"current_user", pg_sys::TEXTOID),
    (c"action", pg_sys::TEXTOID),
    (c"secret_name", pg_sys::TEXTOID),
    (c"secret_id", pg_sys::UUIDOID),
    (c"version_id", pg_sys::UUIDOID),
    (c"version_stage", pg_sys::TEXTOID),
    (c"outcome", pg_sys::TEXTOID),
    (c"sqlstate", pg_sys::TEXTOID),
    (c"client_addr", pg_sys::TEXTOID),
    (c"client_port", pg_sys::INT4OID),
    (c"application_name", pg_sys::TEXTOID),
    (c"backend_pid", pg_sys::INT4OID),
    (c"details", pg_sys::TEXTOID),
    (c"prev_hash", pg_sys::BYTEAOID),
    (c"hash", pg_sys::BYTEAOID),
];

/// The row's values in `COLUMNS` order, as datums allocated in the current memory context
/// (`None` is NULL).
///
/// # Safety
/// The current memory context must outlive the datums' use.
unsafe fn datums(row: &ChainedRecord<'_>) -> [Option<pg_sys::Datum>; 18] {
    let record = &row.record;
    fn text<'a>(value: &'a Option<Cow<'_, str>>) -> Option<&'a [u8]> {
        value.as_deref().map(str::as_bytes)
    }
    let uuid = |value: &Option<Cow<str>>| {
        value
            .as_deref()
            .and_then(|text| uuid::Uuid::try_parse(text).ok())
            .and_then(|id| pgrx::Uuid::from_bytes(*id.as_bytes()).into_datum())
    };
    // SAFETY: this function's own contract.
    let [session_user, current_user, action, secret_name, version_stage, outcome, sqlstate, client_addr, application_name, details, prev_hash, hash] = unsafe {
        varlenas([
            Some(record.session_user.as_bytes()),
            Some(record.current_user.as_bytes()),
            Some(record.action.as_bytes()),
            text(&record.secret_name),
            text(&record.version_stage),
            Some(record.outcome.as_bytes()),
            text(&record.sqlstate),
            text(&record.client_addr),
            text(&record.application_name),
            Some(record.details.as_bytes()),
            Some(&row.prev_hash[..]),
            Some(&row.hash[..]),
        ])
    };
    [
        row.id.into_datum(),
        Some(pg_sys::Datum::from(
            record.at_micros - crate::access::POSTGRES_EPOCH_OFFSET_MICROS,
        )),
        session_user,
        current_user,
        action,
        secret_name,
        uuid(&record.secret_id),
        uuid(&record.version_id),
        version_stage,
        outcome,
        sqlstate,
        client_addr,
        record.client_port.into_datum(),
        application_name,
        record.backend_pid.into_datum(),
        details,
        prev_hash,
        hash,
    ]
}

/// `text` and `bytea` datums for `values`, laid out in one allocation in the current memory
/// context, each a varlena (4-byte header, then the bytes) on a MAXALIGN boundary: a `palloc`
/// per value, each behind pgrx's guard, was most of the cost of building a row.
///
/// # Safety
/// The current memory context must outlive the datums' use.
unsafe fn varlenas<const N: usize>(values: [Option<&[u8]>; N]) -> [Option<pg_sys::Datum>; N] {
    let size = |bytes: &[u8]| (pg_sys::VARHDRSZ + bytes.len()).next_multiple_of(8);
    let total: usize = values.iter().flatten().map(|bytes| size(bytes)).sum();
    // SAFETY: palloc raises an error rather than returning NULL; every varlena written below
    // lies inside the `total` bytes, which hold each value's header and bytes, rounded up.
    // Audit fields are far below the 1 GB varlena limit (a record's slot is 2 KB).
    unsafe {
        let mut next = pg_sys::palloc(total.max(1)).cast::<u8>();
        values.map(|value| {
            value.map(|bytes| {
                let varlena = next;
                pgrx::set_varsize_4b(varlena.cast(), (pg_sys::VARHDRSZ + bytes.len()) as i32);
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    varlena.add(pg_sys::VARHDRSZ),
                    bytes.len(),
                );
                next = next.add(size(bytes));
                pg_sys::Datum::from(varlena)
            })
        })
    }
}

/// Where each of `COLUMNS` is among the table's attributes, once the table is known to be
/// what this code writes: those columns with those types and no other (a column it does not
/// know would get no default), and no insert trigger (which this path would not fire).
///
/// # Safety
/// `relation` must be open.
unsafe fn column_positions(relation: pg_sys::Relation) -> Result<[usize; 18]> {
    let mismatch = |problem: String| Error::SchemaMismatch {
        table: "secrets.audit_record".into(),
        problem,
    };
    // SAFETY: an open relation's descriptor has natts attributes; trigdesc may be null.
    let (attrs, triggers) = unsafe {
        let desc = (*relation).rd_att;
        (
            (*desc).attrs.as_slice((*desc).natts as usize),
            (*relation).trigdesc.as_ref(),
        )
    };
    if triggers.is_some_and(|triggers| {
        triggers.trig_insert_before_row
            || triggers.trig_insert_after_row
            || triggers.trig_insert_before_statement
            || triggers.trig_insert_after_statement
    }) {
        return Err(mismatch(
            "it has an INSERT trigger, which the worker's bulk append would not fire".into(),
        ));
    }
    let mut positions = [0usize; 18];
    for (position, (column, type_oid)) in positions.iter_mut().zip(COLUMNS) {
        let name = column.to_string_lossy();
        *position = attrs
            .iter()
            .position(|att| !att.attisdropped && crate::index_read::name_is(&att.attname, column))
            .ok_or_else(|| mismatch(format!("it lacks column \"{name}\"")))?;
        if attrs[*position].atttypid != type_oid {
            return Err(mismatch(format!("column \"{name}\" has another type")));
        }
    }
    let known = attrs.iter().filter(|att| !att.attisdropped).count();
    if known != COLUMNS.len() {
        return Err(mismatch(format!(
            "it has {} columns this library does not write",
            known - COLUMNS.len()
        )));
    }
    Ok(positions)
}

/// The table open for appending, for the rest of one transaction's batch.
pub struct Appender {
    relation: pg_sys::Relation,
    estate: *mut pg_sys::EState,
    result_relation: *mut pg_sys::ResultRelInfo,
    bulk_state: pg_sys::BulkInsertState,
    command_id: pg_sys::CommandId,
    /// Where each of `COLUMNS` is in the table.
    positions: [usize; 18],
    natts: usize,
    has_constraints: bool,
    slots: Vec<*mut pg_sys::TupleTableSlot>,
    /// Holds one chunk's datums; emptied after each chunk, so a batch of thousands of rows
    /// reuses the same few pages of memory.
    chunk_memory: PgMemoryContexts,
}

impl Appender {
    /// Opens the table in the current transaction. Nothing needs undoing if a later call
    /// fails: the transaction's abort releases what this holds.
    pub fn open() -> Result<Appender> {
        let relation_oid = crate::index_read::relation_oid(c"audit_record")?;
        // SAFETY: the sequence of calls COPY FROM makes (copyfrom.c); the relation stays
        // locked until the transaction ends.
        unsafe {
            let relation = pg_sys::table_open(relation_oid, pg_sys::RowExclusiveLock as i32);
            let desc = (*relation).rd_att;
            let natts = (*desc).natts as usize;
            let positions = match column_positions(relation) {
                Ok(positions) => positions,
                Err(error) => {
                    pg_sys::table_close(relation, pg_sys::RowExclusiveLock as i32);
                    return Err(error);
                }
            };
            let estate = pg_sys::CreateExecutorState();
            let result_relation = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                .cast::<pg_sys::ResultRelInfo>();
            // Range-table index 0: there is no range table, and an error report that describes
            // a failing row must not look for one (with 1 it dereferences a null array).
            pg_sys::InitResultRelInfo(result_relation, relation, 0, std::ptr::null_mut(), 0);
            pg_sys::ExecOpenIndices(result_relation, false);
            Ok(Appender {
                relation,
                estate,
                result_relation,
                bulk_state: pg_sys::GetBulkInsertState(),
                command_id: pg_sys::GetCurrentCommandId(true),
                positions,
                natts,
                has_constraints: !(*desc).constr.is_null(),
                slots: (0..ROWS_PER_CALL)
                    .map(|_| pg_sys::table_slot_create(relation, std::ptr::null_mut()))
                    .collect(),
                chunk_memory: PgMemoryContexts::new("pg_secrets audit append"),
            })
        }
    }

    /// Appends up to `ROWS_PER_CALL` rows.
    pub fn append(&mut self, rows: &[ChainedRecord<'_>]) {
        assert!(
            rows.len() <= ROWS_PER_CALL,
            "chunks are at most ROWS_PER_CALL rows"
        );
        if rows.is_empty() {
            return;
        }
        let slots = &mut self.slots[..rows.len()];
        // SAFETY: the slots belong to the open relation and have `natts` values; the datums
        // are made in `chunk_memory` and live there until the rows are in the heap and
        // indexes, which copy them.
        unsafe {
            self.chunk_memory.switch_to(|_| {
                for (row, &mut slot) in rows.iter().zip(slots.iter_mut()) {
                    pg_sys::ExecClearTuple(slot);
                    let values = std::slice::from_raw_parts_mut((*slot).tts_values, self.natts);
                    let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, self.natts);
                    nulls.fill(true);
                    for (datum, &position) in datums(row).into_iter().zip(&self.positions) {
                        if let Some(datum) = datum {
                            values[position] = datum;
                            nulls[position] = false;
                        }
                    }
                    pg_sys::ExecStoreVirtualTuple(slot);
                    if self.has_constraints {
                        pg_sys::ExecConstraints(self.result_relation, slot, self.estate);
                    }
                }
                pg_sys::table_multi_insert(
                    self.relation,
                    slots.as_mut_ptr(),
                    rows.len() as i32,
                    self.command_id,
                    0,
                    self.bulk_state,
                );
                for &mut slot in slots.iter_mut() {
                    pg_sys::ExecInsertIndexTuples(
                        self.result_relation,
                        slot,
                        self.estate,
                        false,
                        false,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    );
                }
            });
            self.chunk_memory.reset();
            let per_tuple = (*self.estate).es_per_tuple_exprcontext;
            if !per_tuple.is_null() {
                pg_sys::MemoryContextReset((*per_tuple).ecxt_per_tuple_memory);
            }
        }
    }

    /// Releases what the batch used; later statements of the transaction see the rows.
    pub fn finish(self) {
        // SAFETY: everything was created in `open` and is released once, here.
        unsafe {
            for slot in self.slots {
                pg_sys::ExecDropSingleTupleTableSlot(slot);
            }
            pg_sys::FreeBulkInsertState(self.bulk_state);
            pg_sys::ExecCloseIndices(self.result_relation);
            pg_sys::FreeExecutorState(self.estate);
            pg_sys::table_close(self.relation, pg_sys::NoLock as i32);
            pg_sys::CommandCounterIncrement();
        }
    }
}
