//! The end of the hash chain, kept outside the database: `pg_secrets_audit.head` in the data
//! directory, rewritten by the audit worker after each batch it commits. A role that can
//! rewrite the audit table through SQL (a superuser with its triggers disabled) can make the
//! chain verify from the start to whatever end it leaves, by removing the newest records or by
//! changing records and computing every hash after them anew; `verify_audit_log` holds that end
//! against this file. The file may lag the table (a crash between a commit and its write),
//! never lead it. It names the table by OID: a trail created anew (the extension dropped and
//! created again) is not held to another table's end.

use crate::index_read::relation_oid;
use pgrx::pg_sys;

const FILE_NAME: &str = "pg_secrets_audit.head";

#[derive(Debug, PartialEq)]
pub struct Head {
    /// The audit table's OID, looked up in the transaction that stored the batch: the file is
    /// written after its commit, outside any transaction, where the catalog cannot be read.
    pub table: u32,
    pub id: i64,
    pub hash: [u8; 32],
}

/// The audit table's OID, in a transaction.
pub fn audit_table() -> Option<u32> {
    relation_oid(c"audit_record").ok().map(pg_sys::Oid::to_u32)
}

/// The worker, once the batch ending with `head` has committed. Written to a new file and
/// renamed over the old one, so a reader never sees half of it.
pub fn write(head: &Head) -> std::io::Result<()> {
    let temporary = format!("{FILE_NAME}.new");
    std::fs::write(
        &temporary,
        format!("{} {} {}\n", head.table, head.id, hex::encode(head.hash)),
    )?;
    std::fs::rename(temporary, FILE_NAME)
}

/// The last end the worker wrote for this database's audit table, if any. In a transaction.
pub fn read() -> Option<Head> {
    let text = std::fs::read_to_string(FILE_NAME).ok()?;
    parse(&text, audit_table()?)
}

fn parse(text: &str, table: u32) -> Option<Head> {
    let mut fields = text.split_whitespace();
    if fields.next()?.parse::<u32>().ok()? != table {
        return None;
    }
    let id = fields.next()?.parse().ok()?;
    let hash = hex::decode(fields.next()?).ok()?.try_into().ok()?;
    Some(Head { table, id, hash })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_read_only_for_its_own_table() {
        let hash = [7u8; 32];
        let text = format!("16384 42 {}\n", hex::encode(hash));
        assert_eq!(
            parse(&text, 16384),
            Some(Head {
                table: 16384,
                id: 42,
                hash
            })
        );
        assert_eq!(parse(&text, 16385), None, "another table's");
        for damaged in ["", "16384", "16384 x 00", "16384 42 abcd", "16384 42 zz"] {
            assert_eq!(parse(damaged, 16384), None, "{damaged:?}");
        }
    }
}
