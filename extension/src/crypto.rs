//! Envelope encryption. Each version gets a fresh random data key; the value is sealed with it
//! (AES-256-GCM, random 96-bit nonce), and the data key is sealed with a master key. Both
//! seals carry associated data that binds them to where they belong, so a ciphertext copied
//! to another version, secret, value kind or key id fails authentication instead of
//! decrypting to the wrong value.

use crate::keys::{MasterKey, KEY_LEN};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce, Tag};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
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
            master.cipher(),
            &binding.wrap_aad(&master.id),
            &data_key[..],
        ),
        ciphertext: encrypt(&data_cipher(&data_key), &binding.value_aad(), plaintext),
    }
}

/// The plaintext of a sealed version. The value is decrypted where it lies, in `ciphertext`'s
/// buffer, which is returned: reads make no other copy of it.
pub fn open(
    master: &MasterKey,
    binding: &Binding,
    wrapped_key: &[u8],
    ciphertext: Vec<u8>,
) -> Result<Zeroizing<Vec<u8>>, Tampered> {
    let data_key = unwrap_data_key(master, binding, wrapped_key)?;
    decrypt(&data_cipher(&data_key), &binding.value_aad(), ciphertext)
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
        to.cipher(),
        &binding.wrap_aad(&to.id),
        &data_key[..],
    ))
}

pub fn key_check_value(master: &MasterKey) -> Vec<u8> {
    encrypt(master.cipher(), &key_check_aad(&master.id), KEY_CHECK_TEXT)
}

pub fn verify_key_check(master: &MasterKey, check_value: &[u8]) -> bool {
    decrypt(
        master.cipher(),
        &key_check_aad(&master.id),
        check_value.to_vec(),
    )
    .is_ok_and(|text| text.as_slice() == KEY_CHECK_TEXT)
}

fn key_check_aad(key_id: &str) -> Vec<u8> {
    let mut aad = b"pg_secrets/v1/key-check\0".to_vec();
    aad.extend_from_slice(key_id.as_bytes());
    aad
}

/// A cipher for a data key. Its expanded key schedule is wiped when dropped (the `zeroize`
/// feature of `aes`), like the data key itself.
fn data_cipher(data_key: &[u8; KEY_LEN]) -> Aes256Gcm {
    Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(data_key))
}

/// The data key wrapped as `nonce || key || tag`, decrypted in place on the stack.
fn unwrap_data_key(
    master: &MasterKey,
    binding: &Binding,
    wrapped_key: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, Tampered> {
    if wrapped_key.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
        return Err(Tampered);
    }
    let (nonce, rest) = wrapped_key.split_at(NONCE_LEN);
    let (sealed, tag) = rest.split_at(KEY_LEN);
    let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
    data_key.copy_from_slice(sealed);
    master
        .cipher()
        .decrypt_in_place_detached(
            Nonce::from_slice(nonce),
            &binding.wrap_aad(&master.id),
            &mut data_key[..],
            Tag::from_slice(tag),
        )
        .map_err(|_| Tampered)?;
    Ok(data_key)
}

/// `nonce || ciphertext || tag`, built in one buffer.
fn encrypt(cipher: &Aes256Gcm, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    // AES-GCM encryption fails only for inputs over 64 GiB; values are capped at 64 KiB.
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[NONCE_LEN..])
        .expect("AES-GCM encryption of a bounded input cannot fail");
    out.extend_from_slice(&tag);
    out
}

/// Decrypts `nonce || ciphertext || tag` in its own buffer and returns that buffer holding
/// just the plaintext. The buffer is wiped when dropped, whatever happens: on failure too.
fn decrypt(cipher: &Aes256Gcm, aad: &[u8], blob: Vec<u8>) -> Result<Zeroizing<Vec<u8>>, Tampered> {
    let mut buffer = Zeroizing::new(blob);
    if buffer.len() < NONCE_LEN + TAG_LEN {
        return Err(Tampered);
    }
    let (nonce, rest) = buffer.split_at_mut(NONCE_LEN);
    let (sealed, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
    cipher
        .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, sealed, Tag::from_slice(tag))
        .map_err(|_| Tampered)?;
    let length = sealed.len();
    buffer.copy_within(NONCE_LEN..NONCE_LEN + length, 0);
    // What lies past the plaintext (its last bytes, shifted) is wiped now: a caller that takes
    // the plaintext out of its `Zeroizing` takes the buffer's spare room with it.
    buffer[length..].zeroize();
    buffer.truncate(length);
    Ok(buffer)
}
