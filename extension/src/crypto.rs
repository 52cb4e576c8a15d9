//! Envelope encryption. Each version gets a fresh random data key; the value is sealed with it
//! (AES-256-GCM, random 96-bit nonce), and the data key is sealed with a master key. Both
//! seals carry associated data that binds them to where they belong, so a ciphertext copied
//! to another version, secret, value kind or key id fails authentication instead of
//! decrypting to the wrong value.

use crate::keys::{MasterKey, KEY_LEN};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

const NONCE_LEN: usize = 12;
const KEY_CHECK_TEXT: &[u8] = b"pg_secrets master key check v1";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ValueKind {
    String,
    Binary,
}

impl ValueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueKind::String => "string",
            ValueKind::Binary => "binary",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "string" => Some(ValueKind::String),
            "binary" => Some(ValueKind::Binary),
            _ => None,
        }
    }
}

/// Where a version belongs; every field is authenticated.
pub struct Binding {
    pub secret_id: [u8; 16],
    pub version_id: [u8; 16],
    pub kind: ValueKind,
}

impl Binding {
    fn value_aad(&self) -> Vec<u8> {
        let mut aad = b"pg_secrets/v1/value\0".to_vec();
        aad.extend_from_slice(&self.secret_id);
        aad.extend_from_slice(&self.version_id);
        aad.extend_from_slice(self.kind.as_str().as_bytes());
        aad
    }

    fn wrap_aad(&self, key_id: &str) -> Vec<u8> {
        let mut aad = b"pg_secrets/v1/data-key\0".to_vec();
        aad.extend_from_slice(key_id.as_bytes());
        aad.push(0);
        aad.extend_from_slice(&self.secret_id);
        aad.extend_from_slice(&self.version_id);
        aad
    }
}

/// A sealed version as stored: the id of the wrapping master key, the wrapped data key and
/// the encrypted value, each blob being `nonce || ciphertext || tag`.
pub struct Sealed {
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// Authentication failed: the data was altered, moved, or sealed under another key.
#[derive(Debug)]
pub struct Tampered;

pub fn seal(master: &MasterKey, binding: &Binding, plaintext: &[u8]) -> Sealed {
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    OsRng.fill_bytes(&mut data_key[..]);
    Sealed {
        key_id: master.id.clone(),
        wrapped_key: encrypt(
            master.material(),
            &binding.wrap_aad(&master.id),
            &data_key[..],
        ),
        ciphertext: encrypt(&data_key, &binding.value_aad(), plaintext),
    }
}

pub fn open(
    master: &MasterKey,
    binding: &Binding,
    wrapped_key: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, Tampered> {
    let data_key = unwrap_data_key(master, binding, wrapped_key)?;
    decrypt(&data_key, &binding.value_aad(), ciphertext)
}

/// Re-wraps a version's data key under another master key; the value ciphertext is untouched.
pub fn rewrap(
    from: &MasterKey,
    to: &MasterKey,
    binding: &Binding,
    wrapped_key: &[u8],
) -> Result<Vec<u8>, Tampered> {
    let data_key = unwrap_data_key(from, binding, wrapped_key)?;
    Ok(encrypt(
        to.material(),
        &binding.wrap_aad(&to.id),
        &data_key[..],
    ))
}

pub fn key_check_value(master: &MasterKey) -> Vec<u8> {
    encrypt(
        master.material(),
        &key_check_aad(&master.id),
        KEY_CHECK_TEXT,
    )
}

pub fn verify_key_check(master: &MasterKey, check_value: &[u8]) -> bool {
    decrypt(master.material(), &key_check_aad(&master.id), check_value)
        .is_ok_and(|text| text.as_slice() == KEY_CHECK_TEXT)
}

fn key_check_aad(key_id: &str) -> Vec<u8> {
    let mut aad = b"pg_secrets/v1/key-check\0".to_vec();
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

fn unwrap_data_key(
    master: &MasterKey,
    binding: &Binding,
    wrapped_key: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, Tampered> {
    let bytes = decrypt(
        master.material(),
        &binding.wrap_aad(&master.id),
        wrapped_key,
    )?;
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(Tampered);
    }
    data_key.copy_from_slice(&bytes);
    Ok(data_key)
}

fn encrypt(key: &[u8; KEY_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    // AES-GCM encryption fails only for inputs over 64 GiB; values are capped at 64 KiB.
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of a bounded input cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn decrypt(key: &[u8; KEY_LEN], aad: &[u8], blob: &[u8]) -> Result<Zeroizing<Vec<u8>>, Tampered> {
    if blob.len() < NONCE_LEN {
        return Err(Tampered);
    }
    let (nonce, sealed) = blob.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key));
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map(Zeroizing::new)
        .map_err(|_| Tampered)
}
