//! The end of the hash chain, kept outside the database: `pg_secrets_audit.head` in the data
//! directory, rewritten by the audit worker after each batch it commits. A role that can
//! rewrite the audit table through SQL (a superuser with its triggers disabled) can make the
//! chain verify from the start to whatever end it leaves, by removing the newest records or by
//! changing records and computing every hash after them anew; `verify_audit_log` holds that end
//! against this file. The file may lag the table (a crash between a commit and its write),
//! never lead it. It names the table by OID: a trail created anew (the extension dropped and
//! created again) is not held to another table's end.
//!
//! The file is one fixed-width line, overwritten in place with a single write and checked by
//! its CRC. Writing a new file and renaming it over the old one for each batch spent more of
//! the worker's time allocating inodes in the file system than storing the batch; a line
//! that a reader catches half rewritten (or that a power loss tore) fails its CRC instead.

use crate::index_read::relation_oid;
use pgrx::pg_sys;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

const FILE_NAME: &str = "pg_secrets_audit.head";

/// Tries at reading a line that fails its CRC before giving up: the worker may be rewriting
/// it at that moment.
const READ_ATTEMPTS: usize = 3;

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

/// The worker, once the batch ending with `head` has committed. Every line has the same
/// length, so each write covers the whole of the last one (and of a shorter line an earlier
/// release wrote by renaming).
pub fn write(head: &Head) -> io::Result<()> {
    thread_local! {
        static FILE: std::cell::OnceCell<File> = const { std::cell::OnceCell::new() };
    }
    FILE.with(|file| {
        let file = match file.get() {
            Some(file) => file,
            None => {
                let opened = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(FILE_NAME)?;
                file.get_or_init(|| opened)
            }
        };
        file.write_all_at(line(head).as_bytes(), 0)
    })
}

/// The last end the worker wrote for this database's audit table, if any. In a transaction.
pub fn read() -> Option<Head> {
    let table = audit_table()?;
    (0..READ_ATTEMPTS).find_map(|_| parse(&std::fs::read_to_string(FILE_NAME).ok()?, table))
}

fn line(head: &Head) -> String {
    let fields = format!(
        "{:010} {:020} {}",
        head.table,
        head.id,
        hex::encode(head.hash)
    );
    format!("{fields} {:08x}\n", crc32fast::hash(fields.as_bytes()))
}

fn parse(text: &str, table: u32) -> Option<Head> {
    let (fields, crc) = text.lines().next()?.rsplit_once(' ')?;
    if u32::from_str_radix(crc, 16).ok()? != crc32fast::hash(fields.as_bytes()) {
        return None;
    }
    let mut fields = fields.split(' ');
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
    fn a_head_is_read_only_for_its_own_table_and_intact() {
        let head = Head {
            table: 16384,
            id: 42,
            hash: [7u8; 32],
        };
        let text = line(&head);
        assert_eq!(parse(&text, 16384), Some(head));
        assert_eq!(parse(&text, 16385), None, "another table's");
        let longest = line(&Head {
            table: u32::MAX,
            id: i64::MAX,
            hash: [0xff; 32],
        });
        assert_eq!(text.len(), longest.len(), "every line has the same length");
        let changed = text.replacen("42", "43", 1);
        assert_eq!(parse(&changed, 16384), None, "a changed id fails the CRC");
        for damaged in ["", "16384", "16384 42 abcd", &text[..text.len() / 2]] {
            assert_eq!(parse(damaged, 16384), None, "{damaged:?}");
        }
    }
}
