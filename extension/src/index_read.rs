//! The hot read path without SPI: unique-index probes straight into the heap, the way
//! PostgreSQL reads its own catalogs. A `get_secret_value` costs three index probes instead of
//! planning and running a three-way join through the executor, which is most of what makes
//! it close to a plain table lookup.
//!
//! Visibility is what a VOLATILE SPI query would see: the command counter is advanced and
//! the transaction snapshot taken, so rows written earlier in the same transaction are seen.

use pgrx::pg_guard;
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::{FromDatum, IntoDatum, Uuid};
use std::cell::RefCell;
use std::ffi::CStr;

/// A key column of a unique index and the value to find.
pub enum Key<'a> {
    Text(&'a CStr, &'a str),
    Uuid(&'a CStr, Uuid),
}

/// A row found by a probe, readable by column name while the scan is open.
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
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

impl Row {
    fn attnum(&self, column: &CStr) -> i32 {
        // SAFETY: desc is the open relation's descriptor; attrs has natts entries.
        unsafe {
            let desc = &*self.desc;
            let attrs = desc.attrs.as_slice(desc.natts as usize);
            attrs
                .iter()
                .position(|att| !att.attisdropped && name_is(&att.attname, column))
                .map(|index| index as i32 + 1)
                .unwrap_or_else(|| panic!("secrets schema lacks column {column:?}"))
        }
    }

    /// The column's value, converted without a type check: callers name columns whose
    /// types the schema fixes.
    pub fn get<T: FromDatum>(&self, column: &CStr) -> Option<T> {
        let attnum = self.attnum(column);
        let mut is_null = false;
        // SAFETY: tuple and desc belong together and the scan holding the tuple is open.
        unsafe {
            let datum = pg_sys::heap_getattr(self.tuple, attnum, self.desc, &mut is_null);
            T::from_datum(datum, is_null)
        }
    }
}

thread_local! {
    /// OIDs of the extension's relations by name, looked up once per backend: two syscache
    /// lookups per relation and probe were a few percent of a read. Emptied whenever a
    /// relation is created, renamed or dropped anywhere (`forget_relation_oids`).
    static RELATION_OIDS: RefCell<Vec<(&'static CStr, Oid)>> = const { RefCell::new(Vec::new()) };
}

pub fn relation_oid(name: &'static CStr) -> Oid {
    let cached = RELATION_OIDS.with(|oids| {
        let oids = oids.borrow();
        oids.iter()
            .find(|(known, _)| *known == name)
            .map(|&(_, oid)| oid)
    });
    if let Some(oid) = cached {
        return oid;
    }
    // SAFETY: plain syscache lookups by name.
    let oid = unsafe {
        let namespace = pg_sys::get_namespace_oid(c"secrets".as_ptr(), false);
        pg_sys::get_relname_relid(name.as_ptr(), namespace)
    };
    if oid == pg_sys::InvalidOid {
        panic!("relation secrets.{name:?} is missing; reinstall the extension");
    }
    RELATION_OIDS.with(|oids| oids.borrow_mut().push((name, oid)));
    oid
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_relation_oids(_argument: Datum, _cache: i32, _hash: u32) {
    RELATION_OIDS.with(|oids| oids.borrow_mut().clear());
}

/// Called from `_PG_init`: pg_class's name cache tells every backend when to look again.
pub fn register_invalidation_callback() {
    // SAFETY: registers a callback that only empties a backend-local cache.
    unsafe {
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::RELNAMENSP as i32,
            Some(forget_relation_oids),
            Datum::from(0),
        );
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
    read: impl FnOnce(&Row) -> R,
) -> Option<R> {
    // SAFETY: the relation is opened and locked for the scan, scan keys live until the scan
    // ends, and the tuple is read only while the scan is open.
    unsafe {
        let relation = pg_sys::table_open(relation_oid(table), pg_sys::AccessShareLock as i32);
        let mut scan_keys: Vec<pg_sys::ScanKeyData> = Vec::with_capacity(keys.len());
        let key_row = Row {
            tuple: std::ptr::null_mut(),
            desc: (*relation).rd_att,
        };
        for key in keys {
            let (column, procedure, datum, collation): (&CStr, u32, Datum, Oid) = match key {
                Key::Text(column, value) => (
                    column,
                    pg_sys::F_TEXTEQ,
                    value.into_datum().expect("text is never NULL"),
                    pg_sys::DEFAULT_COLLATION_OID,
                ),
                Key::Uuid(column, value) => (
                    column,
                    pg_sys::F_UUID_EQ,
                    value.into_datum().expect("uuid is never NULL"),
                    pg_sys::InvalidOid,
                ),
            };
            let mut scan_key = std::mem::zeroed::<pg_sys::ScanKeyData>();
            pg_sys::ScanKeyInit(
                &mut scan_key,
                key_row.attnum(column) as pg_sys::AttrNumber,
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
            relation_oid(index),
            true,
            snapshot.0,
            scan_keys.len() as i32,
            scan_keys.as_mut_ptr(),
        );
        let tuple = pg_sys::systable_getnext(scan);
        let result = if tuple.is_null() {
            None
        } else {
            Some(read(&Row {
                tuple,
                desc: (*relation).rd_att,
            }))
        };
        pg_sys::systable_endscan(scan);
        pg_sys::table_close(relation, pg_sys::NoLock as i32);
        result
    }
}
