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
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;

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
/// length, so each write covers the whole of the last one (and the shorter line an earlier
/// release wrote). The file is opened for each write, so one removed or replaced meanwhile is
/// written anew; PostgreSQL's umask gives it the data directory's mode.
pub fn write(head: &Head) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(FILE_NAME)?
        .write_all_at(line(head).as_bytes(), 0)
}

/// The last end the worker wrote for this database's audit table, if any. In a transaction.
/// A line that stays damaged (a power loss tore it; the worker's next batch writes it whole)
/// counts as none, with a warning: the newest records then go unchecked against it.
pub fn read() -> Option<Head> {
    let table = audit_table()?;
    for attempt in 0..READ_ATTEMPTS {
        let text = match std::fs::read_to_string(FILE_NAME) {
            Ok(text) => text,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return None,
            Err(_) => String::new(),
        };
        match parse(&text, table) {
            Ok(head) => return head,
            // Perhaps caught while the worker rewrites it: a write of 106 bytes is soon done.
            Err(()) if attempt + 1 < READ_ATTEMPTS => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            Err(()) => {}
        }
    }
    pgrx::warning!(
        "the end of the audit chain recorded in {FILE_NAME} in the data directory cannot be \
         read; the newest audit records are not checked against it until the audit worker \
         stores its next batch"
    );
    None
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

/// The end a line records for `table`: `Ok(None)` when it records another table's, `Err` when
/// it is damaged. A line without a CRC is one written before the file was rewritten in place.
fn parse(text: &str, table: u32) -> Result<Option<Head>, ()> {
    let line = text.lines().next().ok_or(())?;
    let fields: Vec<&str> = line.split(' ').collect();
    let (recorded, id, hash) = match fields[..] {
        [recorded, id, hash, crc] => {
            let fields_text = &line[..line.len() - crc.len() - 1];
            if u32::from_str_radix(crc, 16).map_err(|_| ())?
                != crc32fast::hash(fields_text.as_bytes())
            {
                return Err(());
            }
            (recorded, id, hash)
        }
        [recorded, id, hash] => (recorded, id, hash),
        _ => return Err(()),
    };
    let recorded: u32 = recorded.parse().map_err(|_| ())?;
    let id = id.parse().map_err(|_| ())?;
    let hash = hex::decode(hash)
        .ok()
        .and_then(|hash| hash.try_into().ok())
        .ok_or(())?;
    Ok((recorded == table).then_some(Head { table, id, hash }))
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
        assert_eq!(parse(&text, 16384), Ok(Some(head)));
        assert_eq!(parse(&text, 16385), Ok(None), "another table's");
        let longest = line(&Head {
            table: u32::MAX,
            id: i64::MAX,
            hash: [0xff; 32],
        });
        assert_eq!(text.len(), longest.len(), "every line has the same length");
        let changed = text.replacen("42", "43", 1);
        assert_eq!(
            parse(&changed, 16384),
            Err(()),
            "a changed id fails the CRC"
        );
        for damaged in ["", "16384", "16384 42 abcd", &text[..text.len() / 2]] {
            assert_eq!(parse(damaged, 16384), Err(()), "{damaged:?}");
        }
    }

    #[test]
    fn a_line_from_before_the_crc_is_still_read() {
        let hash = [9u8; 32];
        let old = format!("16384 42 {}\n", hex::encode(hash));
        assert_eq!(
            parse(&old, 16384),
            Ok(Some(Head {
                table: 16384,
                id: 42,
                hash
            }))
        );
        assert!(
            old.len()
                < line(&Head {
                    table: 16384,
                    id: 42,
                    hash
                })
                .len()
        );
    }
}
