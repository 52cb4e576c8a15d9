//! Checks on every argument that comes from SQL, before anything is read or written.
//! Messages name the argument and the limit, never a value.

use crate::errors::{Error, Result};
use pgrx::JsonB;

pub const MAX_NAME_CHARS: usize = 512;
pub const MAX_DESCRIPTION_CHARS: usize = 2048;
pub const MAX_TAGS: usize = 50;
pub const MAX_TAG_KEY_CHARS: usize = 128;
pub const MAX_TAG_VALUE_CHARS: usize = 256;
pub const MAX_VALUE_BYTES: usize = 65_536;
pub const MAX_LABEL_CHARS: usize = 256;
pub const MAX_LABELS_PER_VERSION: usize = 20;
pub const MAX_TOKEN_CHARS: usize = 64;
pub const MAX_BATCH_NAMES: usize = 100;
pub const RECOVERY_WINDOW_DAYS: std::ops::RangeInclusive<i32> = 7..=30;
pub const DEFAULT_RECOVERY_WINDOW_DAYS: i32 = 30;

pub fn required<T>(value: Option<T>, argument: &'static str) -> Result<T> {
    value.ok_or(Error::NullArgument(argument))
}

pub fn secret_name(name: &str) -> Result<()> {
    // Every allowed character is ASCII, so a good name's length in bytes is its length in
    // characters: one pass over the bytes accepts it. The rest is for saying what is wrong.
    let allowed = |byte: &u8| byte.is_ascii_alphanumeric() || b"/_+=.@-".contains(byte);
    if (1..=MAX_NAME_CHARS).contains(&name.len()) && name.as_bytes().iter().all(allowed) {
        return Ok(());
    }
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(Error::InvalidParameter(format!(
            "a secret name is 1 to {MAX_NAME_CHARS} characters, this one has {chars}"
        )));
    }
    if let Some((position, bad)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || "/_+=.@-".contains(*c)))
    {
        return Err(Error::InvalidParameter(format!(
            "secret name has {bad:?} at position {}; allowed are A-Za-z0-9/_+=.@-",
            position + 1
        )));
    }
    Ok(())
}

pub fn description(description: Option<&str>) -> Result<()> {
    match description.map(|d| d.chars().count()) {
        Some(chars) if chars > MAX_DESCRIPTION_CHARS => Err(Error::InvalidParameter(format!(
            "a description is at most {MAX_DESCRIPTION_CHARS} characters, this one has {chars}"
        ))),
        _ => Ok(()),
    }
}

/// The value to store: exactly one of the two, at most 64 KiB.
pub enum Value<'a> {
    String(&'a str),
    Binary(&'a [u8]),
}

impl Value<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Value::String(text) => text.as_bytes(),
            Value::Binary(bytes) => bytes,
        }
    }
}

pub fn value<'a>(
    secret_string: Option<&'a str>,
    secret_binary: Option<&'a [u8]>,
    required: bool,
) -> Result<Option<Value<'a>>> {
    let value = match (secret_string, secret_binary) {
        (Some(_), Some(_)) => {
            return Err(Error::InvalidParameter(
                "give secret_string or secret_binary, not both".into(),
            ))
        }
        (Some(text), None) => Value::String(text),
        (None, Some(bytes)) => Value::Binary(bytes),
        (None, None) if required => {
            return Err(Error::InvalidParameter(
                "give secret_string or secret_binary".into(),
            ))
        }
        (None, None) => return Ok(None),
    };
    // The error says only that the value is too long: its length is something about it, and
    // the message reaches the audit trail and the server log.
    if value.bytes().len() > MAX_VALUE_BYTES {
        return Err(Error::LimitExceeded(format!(
            "a secret value is at most {MAX_VALUE_BYTES} bytes, this one is longer"
        )));
    }
    Ok(Some(value))
}

/// Tags as a JSON object of string values; returns the object to store.
pub fn tags(tags: &JsonB) -> Result<serde_json::Map<String, serde_json::Value>> {
    let serde_json::Value::Object(map) = &tags.0 else {
        return Err(Error::InvalidParameter(
            "tags must be a JSON object of string values, like {\"team\": \"payments\"}".into(),
        ));
    };
    for (key, value) in map {
        tag_key(key)?;
        let Some(text) = value.as_str() else {
            return Err(Error::InvalidParameter(format!(
                "tag \"{key}\" must have a string value"
            )));
        };
        let value_chars = text.chars().count();
        if value_chars > MAX_TAG_VALUE_CHARS {
            return Err(Error::InvalidParameter(format!(
                "a tag value is at most {MAX_TAG_VALUE_CHARS} characters, tag \"{key}\" has {value_chars}"
            )));
        }
    }
    tag_count(map.len())?;
    Ok(map.clone())
}

/// A tag key, set or removed.
pub fn tag_key(key: &str) -> Result<()> {
    let key_chars = key.chars().count();
    if key_chars == 0 || key_chars > MAX_TAG_KEY_CHARS {
        return Err(Error::InvalidParameter(format!(
            "a tag key is 1 to {MAX_TAG_KEY_CHARS} characters, one has {key_chars}"
        )));
    }
    Ok(())
}

pub fn tag_count(count: usize) -> Result<()> {
    if count > MAX_TAGS {
        return Err(Error::LimitExceeded(format!(
            "a secret has at most {MAX_TAGS} tags, this would make {count}"
        )));
    }
    Ok(())
}

pub fn label(label: &str) -> Result<()> {
    let chars = label.chars().count();
    if chars == 0
        || chars > MAX_LABEL_CHARS
        || !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err(Error::InvalidParameter(format!(
            "a version stage is 1 to {MAX_LABEL_CHARS} characters of A-Za-z0-9_.-"
        )));
    }
    Ok(())
}

/// The stages of a new version: valid, without duplicates, at most 20 (none stores a version
/// that is deprecated at once, to be labelled later). The limit is checked as the stages are
/// read, so a huge array costs no more than 21 of them (finding duplicates compares each stage
/// with those kept).
pub fn stages(stages: &[Option<String>]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for stage in stages {
        let stage = required(stage.as_deref(), "version_stages element")?;
        label(stage)?;
        if !out.iter().any(|seen| seen == stage) {
            if out.len() == MAX_LABELS_PER_VERSION {
                return Err(Error::LimitExceeded(format!(
                    "a version carries at most {MAX_LABELS_PER_VERSION} stages, more were given"
                )));
            }
            out.push(stage.to_string());
        }
    }
    Ok(out)
}

pub fn client_request_token(token: Option<&str>) -> Result<()> {
    match token {
        Some(token)
            if token.is_empty()
                || token.len() > MAX_TOKEN_CHARS
                || !token.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Err(Error::InvalidParameter(format!(
                "client_request_token is 1 to {MAX_TOKEN_CHARS} printable ASCII characters, space excluded"
            )))
        }
        _ => Ok(()),
    }
}

/// What a master key's id may be, in the key file and as an argument.
pub fn is_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

pub fn key_id(key_id: Option<&str>) -> Result<()> {
    match key_id {
        Some(id) if !is_key_id(id) => Err(Error::InvalidParameter(
            "key_id is 1 to 64 characters of A-Za-z0-9_.-".into(),
        )),
        _ => Ok(()),
    }
}

/// The recovery window of a deletion; `None` means the default of 30 days.
pub fn recovery_window(days: Option<i32>, force: bool) -> Result<i32> {
    match (days, force) {
        (Some(_), true) => Err(Error::InvalidParameter(
            "give recovery_window_days or force_delete_without_recovery, not both".into(),
        )),
        (Some(days), false) if !RECOVERY_WINDOW_DAYS.contains(&days) => {
            Err(Error::InvalidParameter(format!(
                "recovery_window_days must be between {} and {}, not {days}",
                RECOVERY_WINDOW_DAYS.start(),
                RECOVERY_WINDOW_DAYS.end()
            )))
        }
        (Some(days), false) => Ok(days),
        (None, _) => Ok(DEFAULT_RECOVERY_WINDOW_DAYS),
    }
}
