//! Small SPI helpers shared by the modules that read tables.

use crate::errors::{Error, Result};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::SpiTupleTable;
use pgrx::{FromDatum, IntoDatum};

/// The first column of the first row, or `None` when there is no row (pgrx's `get_one`
/// treats "no row" as an error).
pub fn first_value<T: FromDatum + IntoDatum>(table: SpiTupleTable<'_>) -> Result<Option<T>> {
    if table.is_empty() {
        return Ok(None);
    }
    Ok(table.first().get_one::<T>()?)
}

/// Runs `body` in a subtransaction: an error inside it, Rust or PostgreSQL, rolls back only
/// what `body` did and comes back as an `Err`, so the caller can record it and go on.
pub fn in_subtransaction<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: the pattern of PL/pgSQL's exception blocks: remember the memory context and
    // resource owner, begin, and restore both after commit or rollback.
    let (memory_context, resource_owner) =
        unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
    let body = std::panic::AssertUnwindSafe(body);
    let outcome = PgTryBuilder::new(body)
        .catch_others(|caught| {
            Err(Error::Caught(match caught {
                CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => {
                    report.message().to_string()
                }
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            }))
        })
        .execute();
    unsafe {
        if outcome.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(memory_context);
        pg_sys::CurrentResourceOwner = resource_owner;
    }
    outcome
}
