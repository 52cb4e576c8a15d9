//! Small database helpers shared by the modules: SPI results, the read functions' search path,
//! commits that do not wait for standbys.

use crate::errors::{Error, Result};
use pgrx::pg_sys::panic::CaughtError;
use pgrx::prelude::*;
use pgrx::spi::{SpiHeapTupleData, SpiTupleTable};
use pgrx::{FromDatum, IntoDatum};

/// The first column of the first row, or `None` when there is no row (pgrx's `get_one`
/// treats "no row" as an error).
pub fn first_value<T: FromDatum + IntoDatum>(table: SpiTupleTable<'_>) -> Result<Option<T>> {
    match first_row(table) {
        Some(row) => Ok(row.get_one::<T>()?),
        None => Ok(None),
    }
}

/// The table positioned on its first row, or `None` for no row: reading a column of an empty
/// table is pgrx's "invalid position", an internal error rather than "not found".
pub fn first_row(table: SpiTupleTable<'_>) -> Option<SpiTupleTable<'_>> {
    (!table.is_empty()).then(|| table.first())
}

/// The first column of the first row a read-only query returns, or `None` for no row: what
/// `Spi::get_one_with_args` would be if it did not make "no row" an error.
pub fn select_value<T: FromDatum + IntoDatum>(
    query: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Result<Option<T>> {
    Spi::connect(|client| first_value(client.select(query, Some(1), args)?))
}

/// A row of a query's result: what `select` iterates over, or the table positioned on a row.
pub trait ResultRow {
    fn column<T: FromDatum + IntoDatum>(&self, ordinal: usize) -> Result<Option<T>>;
}

impl ResultRow for SpiHeapTupleData<'_> {
    fn column<T: FromDatum + IntoDatum>(&self, ordinal: usize) -> Result<Option<T>> {
        Ok(self.get(ordinal)?)
    }
}

impl ResultRow for SpiTupleTable<'_> {
    fn column<T: FromDatum + IntoDatum>(&self, ordinal: usize) -> Result<Option<T>> {
        Ok(self.get(ordinal)?)
    }
}

/// A column the schema declares NOT NULL, from a row of a query's result. A NULL there means
/// the table was changed behind the library's back: `55000`, as the read path says of the
/// same change, never a panic.
pub fn required<T: FromDatum + IntoDatum>(row: &impl ResultRow, ordinal: usize) -> Result<T> {
    row.column(ordinal)?.ok_or(Error::StoredNull { ordinal })
}

/// Runs `body` with `pg_catalog` as the whole search path, for the queries it makes and the
/// names they look up: neither the caller's schemas nor its temporary tables are searched. It
/// is what `SET search_path = pg_catalog, pg_temp` on a function gives, without its cost on
/// every call: that clause parses the setting on entry, restores every setting on exit and
/// makes the caller's next statement recompute its own search path, about 5 µs a call.
/// The read functions use this; the rest keep the clause.
pub fn with_catalog_search_path<T>(body: impl FnOnce() -> T) -> T {
    /// Pops the override when `body` returns. When an error unwinds through it, the
    /// (sub)transaction's abort discards the override instead, and popping here would fail.
    struct Pushed;
    impl Drop for Pushed {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                // SAFETY: pushed by `with_catalog_search_path` at this transaction level; any
                // subtransaction begun since has ended.
                unsafe { pg_sys::PopOverrideSearchPath() };
            }
        }
    }
    let mut catalog_only = pg_sys::OverrideSearchPath {
        schemas: std::ptr::null_mut(),
        addCatalog: true,
        addTemp: false,
        generation: 0,
    };
    // SAFETY: PushOverrideSearchPath copies what it needs from the struct.
    unsafe { pg_sys::PushOverrideSearchPath(&mut catalog_only) };
    let _pushed = Pushed;
    body()
}

/// Runs `body` in a subtransaction: an error inside it, Rust or PostgreSQL, rolls back only
/// what `body` did and comes back as an `Err`, so the caller can record it and go on. A cancel,
/// a statement timeout or another operator intervention (class 57) is not caught: it rolls
/// back what `body` did and goes on to end the whole statement, as its sender asked, rather
/// than fail one item of a loop that then carries on.
pub fn in_subtransaction<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: the pattern of PL/pgSQL's exception blocks: remember the memory context and
    // resource owner, begin, and restore both after commit or rollback.
    let (memory_context, resource_owner) =
        unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
    let body = std::panic::AssertUnwindSafe(body);
    let outcome = PgTryBuilder::new(move || Ok(body()))
        .catch_others(|caught| Err(Box::new(caught)))
        .execute();
    unsafe {
        if matches!(outcome, Ok(Ok(_))) {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(memory_context);
        pg_sys::CurrentResourceOwner = resource_owner;
    }
    match outcome {
        Ok(result) => result,
        Err(caught) => {
            let (report, from_postgres) = match caught.as_ref() {
                CaughtError::PostgresError(report) => (report, true),
                CaughtError::ErrorReport(report) => (report, false),
                CaughtError::RustPanic { ereport, .. } => (ereport, false),
            };
            let sqlstate = crate::audit::sqlstate_text(report.sql_error_code() as i32);
            if sqlstate.starts_with("57") {
                (*caught).rethrow();
            }
            // The error is recorded and shown again (a rotation's last error, the worker's
            // log): PostgreSQL's own messages can quote input, ours and our panics' never do.
            let code = report.sql_error_code();
            let message = if from_postgres
                && !crate::audit::message_quotes_no_input(&sqlstate, report.domain())
            {
                let condition = format!("{code:?}");
                let condition = condition.strip_prefix("ERRCODE_").unwrap_or(&condition);
                format!(
                    "PostgreSQL error {sqlstate} ({}); its message is left out, since it can \
                     quote input",
                    condition.to_lowercase()
                )
            } else {
                report.message().to_string()
            };
            Err(Error::Caught {
                message,
                code,
                sqlstate,
            })
        }
    }
}

/// Makes the current transaction's commit wait for the local WAL flush only, never for a
/// synchronous standby: `SET LOCAL synchronous_commit TO local`, without parsing a statement.
/// The audit worker's transactions (the drain and the alarms) use it: the worker is one
/// process, so one commit waiting for a standby that is down would stop the trail, and with it
/// every audited read once the queue is full. Each transaction sets it itself, so whoever
/// runs them gets the guarantee.
pub fn commit_locally() {
    // SAFETY: plain NUL-terminated strings; a refusal raises a PostgreSQL error, which aborts
    // the transaction as a failing `SET LOCAL` would.
    unsafe {
        pg_sys::set_config_option(
            c"synchronous_commit".as_ptr(),
            c"local".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
            true,
            0, // the usual report level: ERROR
            false,
        );
    }
}
