//! Every setting of pg_secrets, registered in one place with a typed accessor each.
//! Key settings are postmaster-only: keys are read once at server start, never from SQL.

use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::ffi::CString;

static KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ACTIVE_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static HIDE_STATEMENT_PARAMETERS: GucSetting<bool> = GucSetting::<bool>::new(true);
static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
static WORKER_NAPTIME: GucSetting<i32> = GucSetting::<i32>::new(5);
static MIN_ROTATION_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);
static ROTATION_RETRY_DELAY: GucSetting<i32> = GucSetting::<i32>::new(60);
static AUDIT_MIN_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);
static ROTATOR_DIR: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ROTATOR_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(30);
static ROTATOR_SSLMODE: GucSetting<RotatorSslMode> =
    GucSetting::<RotatorSslMode>::new(RotatorSslMode::VerifyFull);
static ROTATOR_SSL_ROOT_CERT: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"system"));
static AUDIT: GucSetting<bool> = GucSetting::<bool>::new(true);
static AUDIT_SERVER_LOG: GucSetting<bool> = GucSetting::<bool>::new(true);
static AUDIT_QUEUE_WAIT: GucSetting<i32> = GucSetting::<i32>::new(5000);
static ALARM_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);

pub fn init() {
    GucRegistry::define_string_guc(
        c"pg_secrets.key_file",
        c"File with the master keys, one `<key-id>:<64 hex characters>` per line.",
        c"Read once at server start. Must not be readable by group or others.",
        &KEY_FILE,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_secrets.key_command",
        c"Shell command that prints the master keys, in the key file's format.",
        c"Run once at server start, instead of reading pg_secrets.key_file.",
        &KEY_COMMAND,
        GucContext::Postmaster,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"pg_secrets.active_key",
        c"Id of the master key that wraps new versions (default: the first key).",
        c"",
        &ACTIVE_KEY,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_secrets.hide_statement_parameters",
        c"Keep bind parameters (secret values) out of the server log.",
        c"When on, log_parameter_max_length and log_parameter_max_length_on_error are forced to 0.",
        &HIDE_STATEMENT_PARAMETERS,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_secrets.database",
        c"Database in which the background worker rotates, purges and prunes.",
        c"The extension must be created in this database for scheduled work to happen.",
        &DATABASE,
        GucContext::Postmaster,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.worker_naptime",
        c"Seconds between two rounds of the background worker.",
        c"",
        &WORKER_NAPTIME,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.min_rotation_interval",
        c"Shortest interval a rotation schedule may ask for.",
        c"",
        &MIN_ROTATION_INTERVAL,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.rotation_retry_delay",
        c"Wait before retrying a failed rotation step; doubles with each failure, up to an hour.",
        c"",
        &ROTATION_RETRY_DELAY,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.audit_min_retention",
        c"Youngest records purge_audit_log may remove: a secrets_admin cannot erase recent reads.",
        c"",
        &AUDIT_MIN_RETENTION,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_secrets.rotator_dir",
        c"Directory holding the programs of `command:<program>` rotators.",
        c"Unset: command rotators are refused. Only programs directly inside it can run.",
        &ROTATOR_DIR,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.rotator_timeout",
        c"Time a rotator program may take, and a rotation step's network work on its target.",
        c"",
        &ROTATOR_TIMEOUT,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_enum_guc(
        c"pg_secrets.rotator_sslmode",
        c"TLS on the database rotators' connections to servers over TCP.",
        c"verify-full: encrypted, the certificate chains to pg_secrets.rotator_ssl_root_cert and names the host; require: encrypted, SCRAM with channel binding, md5 and cleartext refused; disable: plaintext. Unix sockets never use TLS.",
        &ROTATOR_SSLMODE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_secrets.rotator_ssl_root_cert",
        c"CA certificates (PEM file) that rotation targets' certificates must chain to.",
        c"`system`: the operating system's trusted certificates. Used by rotator_sslmode = verify-full.",
        &ROTATOR_SSL_ROOT_CERT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_secrets.audit",
        c"Record every call of a function that touches a secret in the audit trail.",
        c"Settable only in the server configuration, so no session can turn it off.",
        &AUDIT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"pg_secrets.audit_server_log",
        c"Also write each audit record to the server log as one JSON line.",
        c"The worker writes the lines as it stores the records, for log shippers; records of calls in other databases than pg_secrets.database are written at once.",
        &AUDIT_SERVER_LOG,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.audit_queue_wait",
        c"How long a call waits for room in a full audit queue before it fails.",
        c"",
        &AUDIT_QUEUE_WAIT,
        0,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_secrets.alarm_interval",
        c"Time between two evaluations of the alarm rules by the worker.",
        c"",
        &ALARM_INTERVAL,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    unsafe { pg_sys::MarkGUCPrefixReserved(c"pg_secrets".as_ptr()) };
}

fn string_setting(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|value| value.to_string_lossy().into_owned())
        .filter(|value| !value.trim().is_empty())
}

pub fn key_file() -> Option<String> {
    string_setting(&KEY_FILE)
}

pub fn key_command() -> Option<String> {
    string_setting(&KEY_COMMAND)
}

pub fn active_key() -> Option<String> {
    string_setting(&ACTIVE_KEY)
}

pub fn database() -> String {
    string_setting(&DATABASE).unwrap_or_else(|| "postgres".into())
}

pub fn worker_naptime() -> std::time::Duration {
    std::time::Duration::from_secs(WORKER_NAPTIME.get() as u64)
}

pub fn min_rotation_interval() -> i64 {
    MIN_ROTATION_INTERVAL.get().into()
}

pub fn rotation_retry_delay() -> i64 {
    ROTATION_RETRY_DELAY.get().into()
}

pub fn audit_min_retention_seconds() -> f64 {
    AUDIT_MIN_RETENTION.get().into()
}

pub fn rotator_dir() -> Option<String> {
    string_setting(&ROTATOR_DIR)
}

pub fn audit() -> bool {
    AUDIT.get()
}

pub fn audit_server_log() -> bool {
    AUDIT_SERVER_LOG.get()
}

pub fn audit_queue_wait() -> std::time::Duration {
    std::time::Duration::from_millis(AUDIT_QUEUE_WAIT.get() as u64)
}

pub fn alarm_interval() -> std::time::Duration {
    std::time::Duration::from_secs(ALARM_INTERVAL.get() as u64)
}

/// `pg_secrets.rotator_sslmode`: libpq's sslmode names, and what each requires of a server.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Debug)]
pub enum RotatorSslMode {
    #[name = c"disable"]
    Disable,
    #[name = c"require"]
    Require,
    #[name = c"verify-full"]
    VerifyFull,
}

impl RotatorSslMode {
    /// The setting's value as written, for errors built on a rotation's connection thread,
    /// where the setting itself must not be read.
    pub fn name(self) -> &'static str {
        match self {
            RotatorSslMode::Disable => "disable",
            RotatorSslMode::Require => "require",
            RotatorSslMode::VerifyFull => "verify-full",
        }
    }
}

pub fn rotator_sslmode() -> RotatorSslMode {
    ROTATOR_SSLMODE.get()
}

/// A file, or `system` for the operating system's trusted certificates.
pub fn rotator_ssl_root_cert() -> String {
    string_setting(&ROTATOR_SSL_ROOT_CERT).unwrap_or_else(|| "system".to_string())
}

pub fn rotator_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(ROTATOR_TIMEOUT.get() as u64)
}

pub fn hide_statement_parameters() -> bool {
    HIDE_STATEMENT_PARAMETERS.get()
}
