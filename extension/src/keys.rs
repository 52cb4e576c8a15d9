//! Master keys. They are read once in the postmaster at server start and inherited by every
//! backend through fork; SQL can never read them. A key is kept only as its expanded AES-256-GCM
//! cipher, built once here rather than on every read: its key schedule is wiped on drop (the
//! `zeroize` feature of `aes`) and prints as `Aes256 { .. }`.

use crate::crypto;
use crate::db;
use crate::errors::{Error, Result};
use crate::settings;
use aes_gcm::{Aes256Gcm, Key, KeyInit};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::os::unix::fs::PermissionsExt;
use std::sync::OnceLock;
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;

pub struct MasterKey {
    pub id: String,
    cipher: Aes256Gcm,
}

impl MasterKey {
    pub fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }
}

pub struct KeyRing {
    keys: Vec<MasterKey>,
    active: usize,
}

impl KeyRing {
    pub fn get(&self, key_id: &str) -> Option<&MasterKey> {
        self.keys.iter().find(|key| key.id == key_id)
    }

    pub fn active(&self) -> &MasterKey {
        &self.keys[self.active]
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.id.as_str())
    }
}

/// Either the loaded keys or why there are none (a reason that never contains key material).
static KEY_RING: OnceLock<std::result::Result<KeyRing, String>> = OnceLock::new();

pub fn load_at_startup() {
    let loaded = load();
    if let Err(reason) = &loaded {
        pgrx::warning!(
            "pg_secrets: no master key loaded, secrets cannot be read or written: {reason}"
        );
    }
    let _ = KEY_RING.set(loaded);
}

pub fn ring() -> Result<&'static KeyRing> {
    match KEY_RING.get() {
        Some(Ok(ring)) => Ok(ring),
        Some(Err(reason)) => Err(Error::NoMasterKey(reason.clone())),
        None => Err(Error::NoMasterKey(
            "the library was not loaded at server start".into(),
        )),
    }
}

fn load() -> std::result::Result<KeyRing, String> {
    let text = match (settings::key_file(), settings::key_command()) {
        (Some(_), Some(_)) => {
            return Err("set only one of pg_secrets.key_file and pg_secrets.key_command".into())
        }
        (Some(path), None) => read_key_file(&path)?,
        (None, Some(command)) => run_key_command(&command)?,
        (None, None) => {
            return Err("neither pg_secrets.key_file nor pg_secrets.key_command is set".into())
        }
    };
    parse_keys(&text, settings::active_key().as_deref())
}

fn read_key_file(path: &str) -> std::result::Result<Zeroizing<String>, String> {
    let metadata = std::fs::metadata(path)
        .map_err(|e| format!("cannot read pg_secrets.key_file \"{path}\": {e}"))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "pg_secrets.key_file \"{path}\" is readable by group or others; chmod 600 it"
        ));
    }
    std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| format!("cannot read pg_secrets.key_file \"{path}\": {e}"))
}

fn run_key_command(command: &str) -> std::result::Result<Zeroizing<String>, String> {
    let output = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run pg_secrets.key_command: {e}"))?;
    let stdout = Zeroizing::new(output.stdout);
    if !output.status.success() {
        return Err(format!("pg_secrets.key_command failed: {}", output.status));
    }
    String::from_utf8(stdout.to_vec())
        .map(Zeroizing::new)
        .map_err(|_| "pg_secrets.key_command printed something that is not UTF-8".into())
}

/// Parses `<key-id>:<64 hex>` lines (blank lines and `#` comments skipped), or one bare line of
/// 64 hex characters, whose id is `default`. Errors name line numbers, never line contents.
pub fn parse_keys(text: &str, active: Option<&str>) -> std::result::Result<KeyRing, String> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(n, line)| (n + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let mut keys: Vec<MasterKey> = Vec::with_capacity(lines.len());
    for &(number, line) in &lines {
        let (id, hex_key) = match line.split_once(':') {
            Some((id, hex_key)) => (id.trim(), hex_key.trim()),
            None if lines.len() == 1 => ("default", line),
            None => {
                return Err(format!(
                    "key line {number} is not `<key-id>:<64 hex characters>`"
                ))
            }
        };
        if !crate::validate::is_key_id(id) {
            return Err(format!(
                "key line {number}: a key id is 1 to 64 characters of A-Za-z0-9_.-"
            ));
        }
        let mut material = Zeroizing::new([0u8; KEY_LEN]);
        if hex_key.len() != 2 * KEY_LEN || hex::decode_to_slice(hex_key, &mut material[..]).is_err()
        {
            return Err(format!(
                "key line {number}: a key is exactly 64 hex characters"
            ));
        }
        if keys.iter().any(|key| key.id == id) {
            return Err(format!("key id \"{id}\" appears twice"));
        }
        keys.push(MasterKey {
            id: id.to_string(),
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&material[..])),
        });
    }
    if keys.is_empty() {
        return Err("the key source holds no key".into());
    }
    let active = match active {
        None => 0,
        Some(wanted) => keys
            .iter()
            .position(|key| key.id == wanted)
            .ok_or_else(|| {
                format!("pg_secrets.active_key \"{wanted}\" is not among the loaded keys")
            })?,
    };
    Ok(KeyRing { keys, active })
}

thread_local! {
    /// Key ids whose stored check value this backend has already verified. A ring holds a
    /// handful of keys: finding one in a list costs every read less than hashing its id.
    static VERIFIED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

/// The configured key `key_id`, after proving (once per backend) that it is the key the
/// stored data was written with. On first use of a key id its check value is stored.
pub fn verified_key(key_id: &str, secret_name: Option<&str>) -> Result<&'static MasterKey> {
    let key = ring()?.get(key_id).ok_or_else(|| Error::UnknownMasterKey {
        key_id: key_id.to_string(),
        name: secret_name.map(str::to_string),
    })?;
    if VERIFIED.with(|verified| verified.borrow().iter().any(|id| id == key_id)) {
        return Ok(key);
    }
    let stored: Option<Vec<u8>> = Spi::connect(|client| {
        db::first_value(client.select(
            "SELECT check_value FROM secrets.master_key WHERE key_id = $1",
            Some(1),
            &[key_id.into()],
        )?)
    })?;
    match stored {
        Some(check_value) if !crypto::verify_key_check(key, &check_value) => {
            return Err(Error::WrongMasterKey(key_id.to_string()))
        }
        Some(_) => {}
        // Only writers record a new key; a read-only transaction (a standby, say) just reads.
        None if unsafe { pg_sys::XactReadOnly } => return Ok(key),
        None => {
            Spi::run_with_args(
                "INSERT INTO secrets.master_key (key_id, check_value) VALUES ($1, $2) \
                 ON CONFLICT (key_id) DO NOTHING",
                &[key_id.into(), crypto::key_check_value(key).into()],
            )?;
            // If this transaction rolls back, so does the row: forget that it was verified,
            // so the next write in this backend stores it again.
            let forgotten = key_id.to_string();
            pgrx::register_xact_callback(pgrx::PgXactCallbackEvent::Abort, move || {
                VERIFIED.with(|verified| verified.borrow_mut().retain(|id| *id != forgotten));
            });
        }
    }
    VERIFIED.with(|verified| verified.borrow_mut().push(key_id.to_string()));
    Ok(key)
}

/// The key new versions of a secret are wrapped with, verified.
pub fn key_for_writing(requested: Option<&str>) -> Result<&'static MasterKey> {
    match requested {
        Some(key_id) => verified_key(key_id, None),
        None => verified_key(&ring()?.active().id, None),
    }
}
