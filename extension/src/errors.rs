//! The one error type of the extension. Every variant has a deliberate SQLSTATE, names the
//! secret it is about, and never carries a secret value: messages are built only from names,
//! ids, limits and setting names.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pg_secrets must be loaded via shared_preload_libraries")]
    NotPreloaded,
    #[error("argument {0} must not be NULL")]
    NullArgument(&'static str),
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("secret \"{0}\" does not exist")]
    NotFound(String),
    /// A secret that work begun earlier knows by id (a rotation), removed for good since.
    #[error("the secret with id {0} does not exist any more")]
    GoneById(pgrx::Uuid),
    #[error("secret \"{name}\" has no version {what}")]
    VersionNotFound { name: String, what: String },
    #[error("permission denied: {action} on secret \"{name}\"")]
    AccessDenied { name: String, action: &'static str },
    #[error("permission denied: secret \"{name}\": {reason}")]
    BeyondOwnAccess { name: String, reason: String },
    /// Work on the whole store or the whole trail, refused to a role without the right for it.
    #[error("permission denied: {what} is for {who}")]
    StoreWideDenied {
        what: &'static str,
        who: &'static str,
    },
    #[error("secret \"{0}\" already exists")]
    AlreadyExists(String),
    /// Something other than a secret that is not there: an alarm rule, a grant, a request.
    #[error("{0}")]
    NoSuchObject(String),
    /// Something other than a secret whose name is taken: an alarm rule.
    #[error("{0}")]
    NameTaken(String),
    #[error("secret \"{name}\" is scheduled for deletion at {purge_at}")]
    ScheduledForDeletion { name: String, purge_at: String },
    #[error("secret \"{0}\" is not scheduled for deletion")]
    NotDeleted(String),
    #[error("client_request_token was already used for a different value of secret \"{0}\"")]
    IdempotencyConflict(String),
    /// A reused token from a role that may not read the secret, which is not told whether its
    /// value is the stored one.
    #[error("client_request_token was already used for secret \"{0}\"")]
    TokenTaken(String),
    #[error("secret \"{0}\" holds a binary value, not a string")]
    NotString(String),
    #[error("secret \"{0}\" holds a string value, not a binary one")]
    NotBinary(String),
    #[error(
        "integrity check failed for secret \"{0}\": its stored ciphertext was altered or moved"
    )]
    Integrity(String),
    #[error("no master key is loaded: {0}")]
    NoMasterKey(String),
    #[error("the configured master key \"{0}\" is not the one these secrets were encrypted with")]
    WrongMasterKey(String),
    #[error("master key \"{key_id}\" is not configured{}", for_secret(.name))]
    UnknownMasterKey {
        key_id: String,
        name: Option<String>,
    },
    #[error("rotation of secret \"{name}\" failed at step {step}: {reason}")]
    RotationFailed {
        name: String,
        step: &'static str,
        reason: String,
    },
    #[error("the audit queue is full and the audit worker is not draining it; the call was refused so that nothing happens unaudited")]
    AuditQueueFull,
    #[error("the audit queue file pg_secrets_audit.queue in the data directory could not be opened at server start; the call was refused so that nothing happens unaudited")]
    AuditQueueUnavailable,
    #[error("table {table} is not as this pg_secrets library writes it: {problem}")]
    SchemaMismatch { table: String, problem: String },
    /// A stored resource policy this library cannot parse: what it denies cannot be told, so
    /// no role but a superuser gets past it.
    #[error(
        "the resource policy of the secret with id {secret_id} cannot be read ({problem}); \
         access to the secret is refused until it is replaced"
    )]
    UnreadablePolicy {
        secret_id: pgrx::Uuid,
        problem: String,
    },
    #[error("access request {id} is already {state}")]
    RequestDecided { id: String, state: String },
    #[error(
        "stage PENDING of secret \"{name}\" belongs to its rotation in progress (at step {step})"
    )]
    PendingOfRotation { name: String, step: String },
    /// A PostgreSQL error caught in a subtransaction, kept with its own SQLSTATE to be
    /// recorded: a rotation step that fails on a unique violation is recorded as `23505`.
    #[error("{message}")]
    Caught {
        message: String,
        code: PgSqlErrorCode,
        sqlstate: String,
    },
    /// A query's column read as another type than it has: a table changed under the library.
    #[error("the extension's tables are not as this pg_secrets library reads them: {0}")]
    ColumnType(pgrx::datum::TryFromDatumError),
    /// A NULL in a query's column whose table declares it NOT NULL: a constraint dropped and a
    /// row written behind the library's back.
    #[error(
        "the extension's tables are not as this pg_secrets library reads them: a stored row \
         has NULL in column {ordinal} of a pg_secrets query, where its table does not allow one"
    )]
    StoredNull { ordinal: usize },
    #[error("pg_secrets internal SPI failure: {0}")]
    Spi(pgrx::spi::SpiError),
}

impl From<pgrx::spi::SpiError> for Error {
    fn from(error: pgrx::spi::SpiError) -> Error {
        match error {
            pgrx::spi::SpiError::DatumError(problem) => Error::ColumnType(problem),
            other => Error::Spi(other),
        }
    }
}

fn for_secret(name: &Option<String>) -> String {
    name.as_ref()
        .map(|n| format!(" (needed by secret \"{n}\")"))
        .unwrap_or_default()
}

impl Error {
    /// The SQLSTATE as PostgreSQL's code and as the five characters users see.
    pub fn sqlstate(&self) -> (PgSqlErrorCode, &str) {
        use PgSqlErrorCode::*;
        match self {
            Error::NotPreloaded
            | Error::ScheduledForDeletion { .. }
            | Error::NotDeleted(_)
            | Error::RequestDecided { .. }
            | Error::PendingOfRotation { .. }
            | Error::SchemaMismatch { .. }
            | Error::UnreadablePolicy { .. }
            | Error::ColumnType(_)
            | Error::StoredNull { .. } => (ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "55000"),
            Error::NullArgument(_) => (ERRCODE_NULL_VALUE_NOT_ALLOWED, "22004"),
            Error::InvalidParameter(_) => (ERRCODE_INVALID_PARAMETER_VALUE, "22023"),
            Error::LimitExceeded(_) => (ERRCODE_PROGRAM_LIMIT_EXCEEDED, "54000"),
            Error::NotFound(_)
            | Error::GoneById(_)
            | Error::VersionNotFound { .. }
            | Error::NoSuchObject(_) => (ERRCODE_UNDEFINED_OBJECT, "42704"),
            Error::AccessDenied { .. }
            | Error::BeyondOwnAccess { .. }
            | Error::StoreWideDenied { .. } => (ERRCODE_INSUFFICIENT_PRIVILEGE, "42501"),
            Error::AlreadyExists(_) | Error::NameTaken(_) => (ERRCODE_DUPLICATE_OBJECT, "42710"),
            Error::IdempotencyConflict(_) | Error::TokenTaken(_) => {
                (ERRCODE_UNIQUE_VIOLATION, "23505")
            }
            Error::NotString(_) | Error::NotBinary(_) => (ERRCODE_DATATYPE_MISMATCH, "42804"),
            Error::Integrity(_) => (ERRCODE_DATA_CORRUPTED, "XX001"),
            Error::NoMasterKey(_) | Error::WrongMasterKey(_) | Error::UnknownMasterKey { .. } => {
                (ERRCODE_CONFIG_FILE_ERROR, "F0000")
            }
            Error::RotationFailed { .. } => (ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, "55000"),
            Error::AuditQueueFull => (ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "53400"),
            Error::AuditQueueUnavailable => (ERRCODE_IO_ERROR, "58030"),
            Error::Caught { code, sqlstate, .. } => (*code, sqlstate),
            Error::Spi(_) => (ERRCODE_INTERNAL_ERROR, "XX000"),
        }
    }

    fn hint(&self) -> Option<&'static str> {
        Some(match self {
            Error::NotPreloaded => "Add pg_secrets to shared_preload_libraries in postgresql.conf and restart the server.",
            Error::NoMasterKey(_) => "Set pg_secrets.key_file (a file of `<key-id>:<64 hex characters>` lines, mode 0600) or pg_secrets.key_command in postgresql.conf and restart the server.",
            Error::WrongMasterKey(_) => "Configure the key file these secrets were written with and restart the server.",
            Error::UnknownMasterKey { .. } => "Add the key to pg_secrets.key_file (or key_command's output) and restart the server.",
            Error::ScheduledForDeletion { .. } => "Call secrets.restore_secret(name) to cancel the deletion.",
            Error::NotString(_) => "Read it with secrets.get_secret_binary(name).",
            Error::NotBinary(_) => "Read it with secrets.get_secret_value(name).",
            Error::IdempotencyConflict(_) => "Use a new client_request_token for a new value.",
            Error::TokenTaken(_) => "A retry is compared with the stored value only for a role that may get the secret; use a new client_request_token for a new value.",
            Error::AuditQueueUnavailable => "The server log says why (permissions, disk space); fix it and restart the server.",
            Error::AuditQueueFull => "Check that the pg_secrets audit worker runs (pg_stat_activity) in the database named by pg_secrets.database.",
            Error::RotationFailed { step: "configure", .. } => "Nothing changed: the secret's rotation settings are as they were.",
            Error::RotationFailed { .. } => "Nothing changed: the CURRENT version is the one before the rotation.",
            Error::PendingOfRotation { .. } => "Let the rotation finish, or take over from it by labelling your version CURRENT (put_secret_value or update_secret_version_stage).",
            Error::SchemaMismatch { .. } | Error::ColumnType(_) | Error::StoredNull { .. } => "Undo the change to the table; if the library and the extension's tables come from different versions, reinstall the extension.",
            Error::UnreadablePolicy { .. } => "A superuser can read it with secrets.get_resource_policy(name), and replace it (secrets.put_resource_policy) or remove it (secrets.delete_resource_policy).",
            Error::Integrity(_) => "Restore the secret's rows from a backup; the stored data cannot be trusted.",
            _ => return None,
        })
    }

    /// Raise this error as a PostgreSQL ERROR. Never returns.
    pub fn report(self) -> ! {
        ErrorReport::from(self).report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

/// pgrx attaches a Rust backtrace to the DETAIL of every error that passes through Rust code
/// (a PostgreSQL error raised under an SPI call included) when `RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE` is set where the server was started, as it often is in a developer's
/// shell. Any role could then have thirty frames of the extension's internals printed to it
/// and to the server log at will (a statement timeout is enough). Removed from the
/// postmaster's environment at load, before anything could capture a backtrace, so that no
/// server process inherits them.
pub fn keep_backtraces_out_of_reports() {
    // The postmaster is single-threaded while it loads preloaded libraries.
    std::env::remove_var("RUST_BACKTRACE");
    std::env::remove_var("RUST_LIB_BACKTRACE");
}

impl From<Error> for ErrorReport {
    fn from(error: Error) -> Self {
        let (code, _) = error.sqlstate();
        let hint = error.hint();
        let report = ErrorReport::new(code, error.to_string(), "pg_secrets");
        match hint {
            Some(hint) => report.set_hint(hint),
            None => report,
        }
    }
}
