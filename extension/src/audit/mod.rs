//! The audit trail. Every call of a function that touches a secret leaves a record of who,
//! what, which secret and version, from where, and how it ended (`allowed`, `denied`,
//! `error` with its SQLSTATE). Never a value, nor anything derived from one.
//!
//! A record is captured when the call ends and appended to a queue shared by all backends
//! (`queue.rs`, a file mapped into memory, so it outlives a crash), outside the caller's
//! transaction: a rollback, or the error of a denied call, cannot take it back. The background
//! worker drains the queue into `secrets.audit_record`, chaining each record to the previous
//! one with SHA-256 (`trail.rs`), and then writes each record to the server log as one
//! structured line (`pg_secrets.audit_server_log`, on by default) for log shippers. Records
//! that cannot reach the table (calls in another database than `pg_secrets.database`, or on a
//! standby) are written to the server log at once, whatever that setting says. Alarm rules
//! over the trail are `alarms.rs`.

pub mod alarms;
mod append;
pub mod head;
pub mod log_pipe;
pub mod queue;
pub mod trail;

use crate::access;
use crate::errors::{Error, Result};
use crate::settings;
use pgrx::pg_sys;
use pgrx::Uuid;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::time::Duration;

/// One audit record as queued, stored and hashed. Field order is the canonical order of the
/// hash chain: change it and old records stop verifying.
///
/// Its text borrows where it can: a caller's record borrows the call's own strings, and the
/// worker's records borrow the queued bytes they are decoded from, so that neither copies
/// every field (those copies were a tenth of the worker's time). Borrowed or owned, the text
/// is queued, stored and hashed the same.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Record<'a> {
    pub at_micros: i64,
    #[serde(borrow)]
    pub session_user: Cow<'a, str>,
    #[serde(borrow)]
    pub current_user: Cow<'a, str>,
    #[serde(borrow)]
    pub action: Cow<'a, str>,
    #[serde(borrow)]
    pub secret_name: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub secret_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub version_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub version_stage: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub outcome: Cow<'a, str>,
    #[serde(borrow)]
    pub sqlstate: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub client_addr: Option<Cow<'a, str>>,
    pub client_port: Option<i32>,
    #[serde(borrow)]
    pub application_name: Option<Cow<'a, str>>,
    pub backend_pid: i32,
    /// A JSON object: the function called, the error message, what else the action concerns.
    #[serde(borrow)]
    pub details: Cow<'a, str>,
}

impl<'a> Record<'a> {
    /// The record as it waits in the queue: postcard, a compact binary form that costs the
    /// caller a few copies (JSON's escaping and number formatting cost a tenth of a read).
    pub fn to_queued(&self) -> Vec<u8> {
        // Room for a typical record up front: grown from empty, the buffer's reallocations
        // were a fifth of the capture.
        postcard::to_extend(self, Vec::with_capacity(512)).expect("plain data serializes")
    }

    pub fn from_queued(bytes: &'a [u8]) -> Option<Record<'a>> {
        postcard::from_bytes(bytes).ok()
    }

    /// The record as JSON, the form the hash chain covers and the server log shows.
    pub fn to_json(&self) -> Vec<u8> {
        // Room for a typical record: growing the buffer step by step costs more than the JSON.
        let mut json = Vec::with_capacity(512);
        serde_json::to_writer(&mut json, self).expect("plain data serializes");
        json
    }
}

/// A uuid as text, the way PostgreSQL writes it.
fn uuid_text(id: Uuid) -> String {
    uuid::Uuid::from_bytes(*id.as_bytes())
        .hyphenated()
        .to_string()
}

/// What the store learned about the secret while serving the call.
#[derive(Default)]
pub struct Touched {
    pub secret_id: Option<Uuid>,
    /// The secret's name, for a call that named it otherwise (an access request's id).
    pub secret_name: Option<String>,
    pub version_id: Option<Uuid>,
    pub version_stage: Option<String>,
    /// More for the record's details (never a value).
    pub notes: serde_json::Map<String, serde_json::Value>,
}

thread_local! {
    static TOUCHED: RefCell<Touched> = RefCell::new(Touched::default());
    static NOTED_LOG_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Called by the store: the secret (and version) the current call is about.
pub fn touched(secret_id: Uuid, version_id: Option<Uuid>, version_stage: Option<&str>) {
    TOUCHED.with(|touched| {
        let mut touched = touched.borrow_mut();
        touched.secret_id = Some(secret_id);
        if version_id.is_some() {
            touched.version_id = version_id;
            touched.version_stage = version_stage.map(str::to_string);
        }
    });
}

/// Called by the store once it has found the secret a call is about: its record then names
/// the secret by id and name, which is what lets the secret's managers see it, also for a
/// call that named it otherwise (deciding an access request names the request).
pub fn found_secret(secret_id: Uuid, secret_name: &str) {
    TOUCHED.with(|touched| {
        let mut touched = touched.borrow_mut();
        touched.secret_id = Some(secret_id);
        touched.secret_name = Some(secret_name.to_string());
    });
}

/// Called while serving a call: something the record's details should say.
pub fn note(key: &str, value: serde_json::Value) {
    TOUCHED.with(|touched| touched.borrow_mut().notes.insert(key.to_string(), value));
}

/// Runs one call of a SQL function and records it. A call whose record cannot be queued
/// fails, so nothing happens unaudited. A call that a PostgreSQL error ends (a cancel, a
/// timeout, a statement that failed) or a panic is recorded as an `error` with that error's
/// SQLSTATE before the error goes on to abort the caller's transaction.
pub fn audited<T>(
    action: &str,
    function: &str,
    secret_name: Option<&str>,
    body: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if !settings::audit() {
        return body();
    }
    // Before the call: once an error has ended it, the catalogs (role names, the client
    // address) may not be readable until the transaction aborts.
    let caller = Caller::capture()?;
    TOUCHED.with(|touched| touched.take());
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(outcome) => outcome,
        Err(unwinding) => {
            let (sqlstate, message) = unwinding_error(unwinding.as_ref());
            let mut touched = TOUCHED.with(|touched| touched.take());
            let details = details_json(function, std::mem::take(&mut touched.notes), Some(message));
            // Queuing touches only the queue's memory and lock, and does not wait for room: the
            // call has failed already, and sleeping in its error would hold what the error left
            // locked. If the record cannot be queued, it is in the server log
            // (`Caller::record`), and the error that ended the call is the one to report.
            let _ = caller.record(
                action,
                secret_name,
                touched,
                "error",
                Some(&sqlstate),
                details,
                Duration::ZERO,
            );
            std::panic::resume_unwind(unwinding)
        }
    };
    let mut touched = TOUCHED.with(|touched| touched.take());
    let (result, sqlstate) = outcome_of(outcome.as_ref().err());
    let error = outcome.as_ref().err().map(Error::to_string);
    let details = details_json(function, std::mem::take(&mut touched.notes), error);
    let recorded = caller.record(
        action,
        secret_name,
        touched,
        result,
        sqlstate,
        details,
        settings::audit_queue_wait(),
    );
    match (outcome, recorded) {
        (Err(error), _) => Err(error),
        (Ok(_), Err(error)) => Err(error),
        (Ok(value), Ok(())) => Ok(value),
    }
}

/// The SQLSTATE and message of what is unwinding a call: a PostgreSQL error, or an `ERROR`
/// raised from Rust; any other panic is an internal error (`XX000`). The message is kept only
/// where it cannot quote data (`message_quotes_no_input`); the detail never is.
fn unwinding_error(unwinding: &(dyn std::any::Any + Send)) -> (String, String) {
    use pgrx::pg_sys::panic::{CaughtError, ErrorReportWithLevel};
    let report = match unwinding.downcast_ref::<CaughtError>() {
        Some(CaughtError::PostgresError(report) | CaughtError::ErrorReport(report)) => Some(report),
        // An ERROR raised from Rust inside the call, not yet converted by pgrx.
        _ => unwinding.downcast_ref::<ErrorReportWithLevel>(),
    };
    let Some(report) = report else {
        return (
            "XX000".to_string(),
            "the call ended with an internal error".to_string(),
        );
    };
    let sqlstate = sqlstate_text(report.sql_error_code() as i32);
    let message = if message_quotes_no_input(&sqlstate, report.domain()) {
        report.message().to_string()
    } else {
        "the call ended with this PostgreSQL error; its message is not recorded, since it \
         can quote what the call was given"
            .to_string()
    };
    (sqlstate, message)
}

/// Errors whose PostgreSQL messages never quote data: a cancel, a timeout or a shutdown
/// (class 57), insufficient resources (53), a deadlock or a serialization failure (40), a lock
/// not available (55P03), and a constraint violated (23: the message names the relation and
/// the constraint; the values are in the detail, which is never kept). Other messages can
/// quote input (an invalid value, bytes in the wrong encoding), so only their SQLSTATE is
/// recorded. That holds for PostgreSQL's own messages (message domain `postgres-<major>`, or
/// none for an error raised from Rust), not for a procedural language's: a PL/pgSQL `RAISE`
/// may give any SQLSTATE to any text.
pub fn message_quotes_no_input(sqlstate: &str, domain: Option<&str>) -> bool {
    domain.is_none_or(|domain| domain.starts_with("postgres-"))
        && (["57", "53", "40", "23"]
            .iter()
            .any(|class| sqlstate.starts_with(class))
            || sqlstate == "55P03")
}

/// A SQLSTATE's five characters from PostgreSQL's packed form (`MAKE_SQLSTATE`: six bits per
/// character, the first lowest), as `unpack_sql_state` writes them.
pub fn sqlstate_text(mut packed: i32) -> String {
    (0..5)
        .map(|_| {
            let character = char::from(b'0' + (packed & 0x3F) as u8);
            packed >>= 6;
            character
        })
        .collect()
}

/// A record's details, a JSON object: what the call noted, the function called and the error
/// if any.
pub fn details_json(
    function: &str,
    mut notes: serde_json::Map<String, serde_json::Value>,
    error: Option<String>,
) -> String {
    if notes.is_empty() && error.is_none() {
        // Most calls: the text the map below would make, without building it. Function names
        // are Rust identifiers, with nothing to escape.
        debug_assert!(function
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        return format!("{{\"function\":\"{function}\"}}");
    }
    notes.insert("function".into(), function.into());
    if let Some(error) = error {
        notes.insert("error".into(), error.into());
    }
    serde_json::Value::Object(notes).to_string()
}

/// A record's outcome and SQLSTATE for a call that ended with `error` (`None`: it succeeded).
pub fn outcome_of(error: Option<&Error>) -> (&'static str, Option<&str>) {
    match error {
        None => ("allowed", None),
        Some(Error::AccessDenied { .. } | Error::BeyondOwnAccess { .. }) => {
            ("denied", Some("42501"))
        }
        Some(error) => ("error", Some(error.sqlstate().1)),
    }
}

/// Captures a record with this session's particulars and queues it. `details` is a JSON
/// object.
pub fn record(
    action: &str,
    secret_name: Option<&str>,
    touched: Touched,
    outcome: &str,
    sqlstate: Option<&str>,
    details: String,
) -> Result<()> {
    if !settings::audit() {
        return Ok(());
    }
    Caller::capture()?.record(
        action,
        secret_name,
        touched,
        outcome,
        sqlstate,
        details,
        settings::audit_queue_wait(),
    )
}

/// Records a removal for good that no caller asked for by name: a secret purged once its
/// recovery window ended (`version_id` `None`), or a deprecated version pruned. `details` says
/// which and by what.
pub fn removed_for_good(
    secret_name: &str,
    secret_id: Uuid,
    version_id: Option<Uuid>,
    details: &serde_json::Value,
) -> Result<()> {
    let touched = Touched {
        secret_id: Some(secret_id),
        version_id,
        ..Default::default()
    };
    record(
        "delete",
        Some(secret_name),
        touched,
        "allowed",
        None,
        details.to_string(),
    )
}

/// Who makes a call and from where: what each of its records says besides the call itself.
struct Caller {
    session_user: String,
    current_user: String,
    session: std::rc::Rc<access::SessionInfo>,
    application_name: String,
    out_of_reach: Option<OutOfReach>,
}

impl Caller {
    fn capture() -> Result<Caller> {
        Ok(Caller {
            session_user: access::role_name(unsafe { pg_sys::GetSessionUserId() }),
            current_user: access::role_name(access::caller()),
            session: access::session()?,
            application_name: access::application_name(),
            out_of_reach: table_out_of_reach(),
        })
    }

    /// Queues the record of a call, waiting up to `wait` for room, or writes it to the server
    /// log where the table is out of reach.
    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        action: &str,
        secret_name: Option<&str>,
        touched: Touched,
        outcome: &str,
        sqlstate: Option<&str>,
        details: String,
        wait: Duration,
    ) -> Result<()> {
        let mut record = Record {
            at_micros: access::now_micros(),
            session_user: self.session_user.as_str().into(),
            current_user: self.current_user.as_str().into(),
            action: action.into(),
            secret_name: secret_name
                .map(Cow::from)
                .or_else(|| touched.secret_name.map(Cow::from)),
            secret_id: touched.secret_id.map(|id| uuid_text(id).into()),
            version_id: touched.version_id.map(|id| uuid_text(id).into()),
            version_stage: touched.version_stage.map(Cow::from),
            outcome: outcome.into(),
            sqlstate: sqlstate.map(Cow::from),
            client_addr: self.session.address.as_deref().map(Cow::from),
            client_port: self.session.port,
            application_name: Some(self.application_name.as_str())
                .filter(|name| !name.is_empty())
                .map(Cow::from),
            backend_pid: unsafe { pg_sys::MyProcPid },
            details: details.into(),
        };
        match &self.out_of_reach {
            // The server log is then the only place the record can go, whatever
            // pg_secrets.audit_server_log says.
            Some(reason) => {
                log_only(&record);
                if !NOTED_LOG_ONLY.with(|noted| noted.replace(true)) {
                    let message = format!(
                        "pg_secrets: {reason}, so this session's audit records go to the server log only"
                    );
                    match reason {
                        // Reading from a replica is normal; the client need not hear about it.
                        OutOfReach::Standby => pgrx::log!("{message}"),
                        OutOfReach::OtherDatabase => pgrx::warning!("{message}"),
                    }
                }
                Ok(())
            }
            None => {
                let queued = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    queue::push(&fit_in_slot(&mut record), wait)
                }));
                // The call fails, or had failed already (then its own error is what the caller
                // sees): the server log keeps the record of the attempt. So it does when a
                // cancel or a timeout ends the wait for room in the queue.
                if !matches!(queued, Ok(Ok(()))) {
                    log_only(&record);
                }
                queued.unwrap_or_else(|unwinding| std::panic::resume_unwind(unwinding))
            }
        }
    }
}

/// Writes a record that will not reach the table to the server log at once.
fn log_only(record: &Record) {
    log_pipe::write(&[server_log_line(record, &record.to_json(), None)]);
}

/// The record as queued, shortened to fit a queue slot: a slot cuts what is longer, and a cut
/// record is stored as unreadable. Only the caller's free-form text can be that long (an
/// invalid secret name of any length, and error messages that repeat it), so the name is
/// shortened and the details keep only the function, with `"truncated": true`.
fn fit_in_slot(record: &mut Record) -> Vec<u8> {
    let queued = record.to_queued();
    if queued.len() <= queue::SLOT_BYTES {
        return queued;
    }
    const KEPT_NAME_BYTES: usize = 256;
    if let Some(name) = &record.secret_name {
        let mut end = name.len().min(KEPT_NAME_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        record.secret_name = Some(format!("{}…", &name[..end]).into());
    }
    let function = serde_json::from_str::<serde_json::Value>(&record.details)
        .ok()
        .and_then(|details| details.get("function").cloned());
    record.details = serde_json::json!({"function": function, "truncated": true})
        .to_string()
        .into();
    record.to_queued()
}

/// Why a session's records cannot reach `secrets.audit_record`: the worker drains the queue
/// into one database, on the primary. A standby's records would only fill its queue until
/// every audited call failed.
enum OutOfReach {
    OtherDatabase,
    Standby,
}

impl std::fmt::Display for OutOfReach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OutOfReach::OtherDatabase => write!(
                f,
                "this database is not pg_secrets.database (\"{}\")",
                settings::database()
            ),
            OutOfReach::Standby => {
                write!(
                    f,
                    "this server is a standby, where the audit table cannot be written"
                )
            }
        }
    }
}

fn table_out_of_reach() -> Option<OutOfReach> {
    if !in_audit_database() {
        return Some(OutOfReach::OtherDatabase);
    }
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Some(OutOfReach::Standby);
    }
    None
}

/// A record as one line of the server log: the server's own line prefix, then its JSON. A
/// record stored in the table carries its `id` and chain `hash` (hex) there too, so the line
/// can be matched with its row: any role can `RAISE LOG` a line that looks like one, but not
/// give it the id and hash of a stored record of that content.
pub fn server_log_line(record: &Record, json: &[u8], stored: Option<(i64, &[u8; 32])>) -> Vec<u8> {
    use std::io::Write;
    let mut line = Vec::with_capacity(json.len() + 160);
    write_log_time(record.at_micros, &mut line);
    let _ = write!(line, "[{}] LOG:  pg_secrets audit: ", record.backend_pid);
    match (stored, json.split_last()) {
        (Some((id, hash)), Some((b'}', fields))) => {
            line.extend_from_slice(fields);
            let _ = write!(line, ",\"id\":{id},\"hash\":\"{}\"}}", hex::encode(hash));
        }
        _ => line.extend_from_slice(json),
    }
    line.push(b'\n');
    line
}

thread_local! {
    /// The second the last line was written in, and its text up to the seconds: the worker
    /// writes thousands of lines a second, and formatting a date for each cost more than the
    /// rest of the line.
    static LOG_SECOND: RefCell<(i64, Vec<u8>)> = const { RefCell::new((i64::MIN, Vec::new())) };
}

/// `2026-11-26 18:04:05.123 UTC ` (nothing for a time chrono cannot represent).
fn write_log_time(at_micros: i64, line: &mut Vec<u8>) {
    use chrono::{Datelike, Timelike};
    use std::io::Write;
    let (second, micros) = (
        at_micros.div_euclid(1_000_000),
        at_micros.rem_euclid(1_000_000),
    );
    LOG_SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            cached.1.clear();
            if let Some(at) = chrono::DateTime::from_timestamp(second, 0) {
                let _ = write!(
                    cached.1,
                    "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                    at.year(),
                    at.month(),
                    at.day(),
                    at.hour(),
                    at.minute(),
                    at.second()
                );
            }
            cached.0 = second;
        }
        if !cached.1.is_empty() {
            let millis = (micros / 1000) as u32;
            line.extend_from_slice(&cached.1);
            line.extend_from_slice(&[
                b'.',
                b'0' + (millis / 100) as u8,
                b'0' + (millis / 10 % 10) as u8,
                b'0' + (millis % 10) as u8,
            ]);
            line.extend_from_slice(b" UTC ");
        }
    });
}

/// Whether the worker drains this database's queue into a table: it works in one database.
/// A backend's database never changes, and the setting is postmaster-only: asked once.
fn in_audit_database() -> bool {
    thread_local! {
        static ANSWER: std::cell::OnceCell<bool> = const { std::cell::OnceCell::new() };
    }
    ANSWER.with(|answer| {
        *answer.get_or_init(|| {
            let name = unsafe { pg_sys::get_database_name(pg_sys::MyDatabaseId) };
            !name.is_null()
                && unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy()
                    == settings::database()
        })
    })
}
