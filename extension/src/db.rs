//! Small SPI helpers shared by the modules that read tables.

use crate::errors::Result;
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
