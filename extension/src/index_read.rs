//! The hot read path without SPI: unique-index probes straight into the heap, the way
//! PostgreSQL reads its own catalogs. Reading CURRENT, the common case, is one probe of the
//! secret row (which carries a copy of its CURRENT version); another version takes three.
//! No planning and no executor, which is most of what makes it close to a plain lookup.
//!
//! Visibility is what a VOLATILE SPI query would see: the command counter is advanced and
//! the transaction snapshot taken, so rows written earlier in the same transaction are seen.

use crate::errors::{Error, Result};
use pgrx::pg_guard;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::{FromDatum, IntoDatum, Uuid};
use std::cell::RefCell;
use std::ffi::CStr;

/// A key column of a unique index and the value to find.
pub enum Key<'a> {
    Text(&'static CStr, &'a str),
    Uuid(&'static CStr, Uuid),
}

/// A row found by a probe, read by column name while the scan is open. The tuple is
/// deformed once: fetching each column with `heap_getattr` walked the row from its start
/// for every column after the first variable-width one.
pub struct Row {
    table: &'static CStr,
    relation: Oid,
    desc: pg_sys::TupleDesc,
    values: Vec<Datum>,
    nulls: Vec<bool>,
}

/// Whether a catalog name holds `wanted`, compared in place: a read looks up ten columns by
/// name, and measuring each name first was a few percent of it.
pub fn name_is(name: &pg_sys::NameData, wanted: &CStr) -> bool {
    let wanted = wanted.to_bytes_with_nul();
    wanted.len() <= name.data.len()
        && name.data[..wanted.len()]
            .iter()
            .zip(wanted)
            .all(|(&have, &want)| have as u8 == want)
}

/// The table a relation of the extension belongs to, for error messages.
fn qualified(name: &CStr) -> String {
    format!("secrets.{}", name.to_string_lossy())
}

thread_local! {
    /// Where the columns this code names are in their tables: (relation, address of the
    /// column's name, the type it is read as, position), each entry made once its type was
    /// checked. Names are `&'static CStr` literals, so their address identifies them; finding
    /// a column by comparing names was a few percent of a read. Entries of a relation go
    /// whenever its relcache entry is invalidated (ALTER TABLE does that), and all go with the
    /// relation OIDs (`forget_relation_oids`).
    static COLUMN_POSITIONS: RefCell<Vec<(Oid, *const std::ffi::c_char, Oid, usize)>> =
        const { RefCell::new(Vec::new()) };
}

/// The position (from 0) of `column` in `relation`, whose descriptor is `desc`, to be read
/// as `T`: when first found for `T`, the column's type must be `T`'s or one stored the same way.
fn column_position<T: IntoDatum>(
    table: &'static CStr,
    relation: Oid,
    desc: pg_sys::TupleDesc,
    column: &'static CStr,
) -> Result<usize> {
    let read_as = T::type_oid();
    let known = COLUMN_POSITIONS.with(|positions| {
        positions
            .borrow()
            .iter()
            .find(|&&(oid, name, as_type, _)| {
                oid == relation && name == column.as_ptr() && as_type == read_as
            })
            .map(|&(_, _, _, position)| position)
    });
    if let Some(position) = known {
        return Ok(position);
    }
    let position = column_index(table, desc, column)?;
    // SAFETY: position indexes the descriptor's attributes (column_index found it there).
    let type_oid = unsafe { (*desc).attrs.as_slice((*desc).natts as usize)[position].atttypid };
    if !reads_as::<T>(type_oid) {
        // Read as another type, a value would be taken for what it is not: by reference,
        // that reads memory at whatever its bytes say.
        return Err(Error::SchemaMismatch {
            table: qualified(table),
            problem: format!(
                "its column {} is not of the type the library reads",
                column.to_string_lossy()
            ),
        });
    }
    COLUMN_POSITIONS.with(|positions| {
        positions
            .borrow_mut()
            .push((relation, column.as_ptr(), read_as, position))
    });
    Ok(position)
}

/// The position (from 0) of `column` in the descriptor of `table`, found by name.
fn column_index(table: &CStr, desc: pg_sys::TupleDesc, column: &CStr) -> Result<usize> {
    // SAFETY: desc is an open relation's descriptor; attrs has natts entries.
    unsafe {
        let desc = &*desc;
        desc.attrs
            .as_slice(desc.natts as usize)
            .iter()
            .position(|att| !att.attisdropped && name_is(&att.attname, column))
    }
    .ok_or_else(|| Error::SchemaMismatch {
        table: qualified(table),
        problem: format!("it has no column {}", column.to_string_lossy()),
    })
}

/// Whether a column of type `type_oid` may be read as `T`: the same type, or one PostgreSQL
/// stores the same way.
fn reads_as<T: IntoDatum>(type_oid: Oid) -> bool {
    // SAFETY: a catalog lookup of two type OIDs, made inside the reading transaction.
    T::is_compatible_with(type_oid) || unsafe { pg_sys::IsBinaryCoercible(type_oid, T::type_oid()) }
}

impl Row {
    /// The column's value. Its type is checked once per backend, table definition and type
    /// read as (a superuser's `ALTER COLUMN ... TYPE` gives a schema mismatch, not a misread
    /// value).
    pub fn get<T: FromDatum + IntoDatum>(&self, column: &'static CStr) -> Result<Option<T>> {
        let index = column_position::<T>(self.table, self.relation, self.desc, column)?;
        Ok(self.value_at(index))
    }

    /// A column the schema declares NOT NULL: NULL there is a schema mismatch, not a panic.
    pub fn required<T: FromDatum + IntoDatum>(&self, column: &'static CStr) -> Result<T> {
        self.get(column)?.ok_or_else(|| Error::SchemaMismatch {
            table: qualified(self.table),
            problem: format!("column {} holds a NULL", column.to_string_lossy()),
        })
    }

    /// Like `get`, but a column the table lacks (or has with another type) reads as NULL:
    /// tables created by an older build may lack newer columns.
    pub fn get_if_present<T: FromDatum + IntoDatum>(&self, column: &'static CStr) -> Option<T> {
        let index = column_position::<T>(self.table, self.relation, self.desc, column).ok()?;
        self.value_at(index)
    }

    fn value_at<T: FromDatum>(&self, index: usize) -> Option<T> {
        // SAFETY: the values were deformed from a tuple of this descriptor, and the scan
        // that pins the tuple's buffer is still open.
        unsafe { T::from_datum(self.values[index], self.nulls[index]) }
    }
}

thread_local! {
    /// OIDs of the extension's relations by name, looked up once per backend: two syscache
    /// lookups per relation and probe were a few percent of a read. Emptied whenever a
    /// relation is created, renamed or dropped anywhere (`forget_relation_oids`).
    static RELATION_OIDS: RefCell<Vec<(&'static CStr, Oid)>> = const { RefCell::new(Vec::new()) };
}

/// The OID of `secrets.<name>`; an error, not a panic, when a library newer or older than
/// the installed tables looks for one that is not there.
pub fn relation_oid(name: &'static CStr) -> Result<Oid> {
    let cached = RELATION_OIDS.with(|oids| {
        let oids = oids.borrow();
        oids.iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, oid)| oid)
    });
    if let Some(oid) = cached {
        return Ok(oid);
    }
    // SAFETY: plain syscache lookups by name; InvalidOid when either is missing.
    let oid = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"secrets".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            pg_sys::get_relname_relid(name.as_ptr(), namespace)
        }
    };
    if oid == pg_sys::InvalidOid {
        return Err(Error::SchemaMismatch {
            table: qualified(name),
            problem: "it does not exist".into(),
        });
    }
    RELATION_OIDS.with(|oids| oids.borrow_mut().push((name, oid)));
    Ok(oid)
}

thread_local! {
    /// The owner of the extension's tables, looked up once per backend and forgotten with the
    /// relation OIDs (an ALTER ... OWNER changes pg_class).
    static TABLES_OWNER: std::cell::Cell<Option<Oid>> = const { std::cell::Cell::new(None) };
}

/// The role that owns the extension's tables: the one that created the extension.
pub fn tables_owner() -> Result<Oid> {
    if let Some(owner) = TABLES_OWNER.with(|owner| owner.get()) {
        return Ok(owner);
    }
    let relation = relation_oid(c"secret")?;
    // SAFETY: an existing relation's cache entry, held only while its owner is read.
    let owner = unsafe {
        let entry = pg_sys::RelationIdGetRelation(relation);
        if entry.is_null() {
            return Err(Error::SchemaMismatch {
                table: qualified(c"secret"),
                problem: "it cannot be opened".into(),
            });
        }
        let owner = (*(*entry).rd_rel).relowner;
        pg_sys::RelationClose(entry);
        owner
    };
    TABLES_OWNER.with(|cached| cached.set(Some(owner)));
    Ok(owner)
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_relation_oids(_argument: Datum, _cache: i32, _hash: u32) {
    RELATION_OIDS.with(|oids| oids.borrow_mut().clear());
    TABLES_OWNER.with(|owner| owner.set(None));
    COLUMN_POSITIONS.with(|positions| positions.borrow_mut().clear());
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_column_positions(_argument: Datum, relation: Oid) {
    COLUMN_POSITIONS.with(|positions| {
        positions
            .borrow_mut()
            .retain(|&(oid, _, _, _)| relation != pg_sys::InvalidOid && oid != relation)
    });
}

/// Called from `_PG_init`: pg_class's name cache and the relation cache tell every backend
/// when to look again.
pub fn register_invalidation_callbacks() {
    // SAFETY: registers callbacks that only empty backend-local caches.
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::RELNAMENSP as i32,
            Some(forget_relation_oids),
            Datum::from(0),
        );
        pg_sys::CacheRegisterRelcacheCallback(Some(forget_column_positions), Datum::from(0));
    }
}

/// The snapshot the probes of one read share.
pub struct ReadSnapshot(pg_sys::Snapshot);

pub fn begin_read() -> ReadSnapshot {
    // SAFETY: what SPI does before each query of a volatile function. The snapshot stays
    // valid until the next GetTransactionSnapshot, and a read takes no other snapshot.
    unsafe {
        pg_sys::CommandCounterIncrement();
        ReadSnapshot(pg_sys::GetTransactionSnapshot())
    }
}

/// Finds the row of `table` that unique index `index` holds for `keys`, and reads it.
pub fn probe<R>(
    snapshot: &ReadSnapshot,
    table: &'static CStr,
    index: &'static CStr,
    keys: &[Key],
    read: impl FnOnce(&Row) -> Result<R>,
) -> Result<Option<R>> {
    let (table_oid, index_oid) = (relation_oid(table)?, relation_oid(index)?);
    // SAFETY: the relation is opened and locked for the scan, scan keys live until the scan
    // ends, and the tuple is read only while the scan is open; the relation is closed on
    // every way out but an error raised by PostgreSQL, whose abort closes it.
    unsafe {
        let relation = pg_sys::table_open(table_oid, pg_sys::AccessShareLock as i32);
        let desc = (*relation).rd_att;
        let mut scan_keys: Vec<pg_sys::ScanKeyData> = Vec::with_capacity(keys.len());
        for key in keys {
            let (position, procedure, datum, collation): (Result<usize>, u32, Datum, Oid) =
                match key {
                    Key::Text(column, value) => (
                        column_position::<&str>(table, table_oid, desc, column),
                        pg_sys::F_TEXTEQ,
                        value.into_datum().expect("text is never NULL"),
                        pg_sys::DEFAULT_COLLATION_OID,
                    ),
                    Key::Uuid(column, value) => (
                        column_position::<Uuid>(table, table_oid, desc, column),
                        pg_sys::F_UUID_EQ,
                        value.into_datum().expect("uuid is never NULL"),
                        pg_sys::InvalidOid,
                    ),
                };
            let position = match position {
                Ok(position) => position,
                Err(error) => {
                    pg_sys::table_close(relation, pg_sys::AccessShareLock as i32);
                    return Err(error);
                }
            };
            let mut scan_key = std::mem::zeroed::<pg_sys::ScanKeyData>();
            pg_sys::ScanKeyInit(
                &mut scan_key,
                (position + 1) as pg_sys::AttrNumber,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::Oid::from(procedure),
                datum,
            );
            // The index orders text by the column's (default) collation; compare the same way.
            scan_key.sk_collation = collation;
            scan_keys.push(scan_key);
        }
        let scan = pg_sys::systable_beginscan(
            relation,
            index_oid,
            true,
            snapshot.0,
            scan_keys.len() as i32,
            scan_keys.as_mut_ptr(),
        );
        let tuple = pg_sys::systable_getnext(scan);
        let result = if tuple.is_null() {
            None
        } else {
            let columns = (*desc).natts as usize;
            let mut row = Row {
                table,
                relation: table_oid,
                desc,
                values: vec![Datum::from(0); columns],
                nulls: vec![false; columns],
            };
            pg_sys::heap_deform_tuple(tuple, desc, row.values.as_mut_ptr(), row.nulls.as_mut_ptr());
            Some(read(&row))
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(relation, pg_sys::NoLock as i32);
        result.transpose()
    }
}
