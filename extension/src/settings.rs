//! Every setting of pg_secrets, registered in one place with a typed accessor each.
//! Key settings are postmaster-only: keys are read once at server start, never from SQL.

use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

static KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static KEY_COMMAND: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static ACTIVE_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static HIDE_STATEMENT_PARAMETERS: GucSetting<bool> = GucSetting::<bool>::new(true);

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

/// With `log_statement = all`, PostgreSQL logs each bind parameter of an extended-protocol
/// statement before the statement runs, which would put secret values in the server log.
/// Forcing the parameter-logging limits to 0 at the highest priority source means no
/// `SET`, `ALTER SYSTEM` or reload can turn that back on while pg_secrets is loaded.
pub fn hide_statement_parameters_if_asked() {
    if !HIDE_STATEMENT_PARAMETERS.get() {
        return;
    }
    for name in [
        c"log_parameter_max_length",
        c"log_parameter_max_length_on_error",
    ] {
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                c"0".as_ptr(),
                pg_sys::GucContext::PGC_POSTMASTER,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }
}
