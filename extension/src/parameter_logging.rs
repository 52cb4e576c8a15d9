//! Keeps bind parameters (secret values passed as `$1`) out of the server log while
//! `pg_secrets.hide_statement_parameters` is on.
//!
//! PostgreSQL logs a statement's parameters in two places: with its statement
//! (`log_parameter_max_length`, when `log_statement` or `log_min_duration_statement` log it)
//! and in the CONTEXT line of any error the statement raises
//! (`log_parameter_max_length_on_error`). Both limits are forced to 0 at server start at the
//! override priority, which `postgresql.conf`, `ALTER SYSTEM`, `ALTER ROLE/DATABASE … SET`
//! and a client's startup options rank below. A session's `SET` ranks above it, and
//! `log_parameter_max_length_on_error` may be set by any role; so each limit also gets a check
//! hook that refuses a session's non-zero value. The hook is installed in the postmaster, in
//! the settings' own records, so every backend inherits it.

use crate::settings;
use pgrx::pg_guard;
use pgrx::pg_sys::{self, GucSource};
use std::ffi::{c_int, c_void, CStr};

const LIMITS: [&CStr; 2] = [
    c"log_parameter_max_length",
    c"log_parameter_max_length_on_error",
];

/// Forces both limits to 0 and guards them, if the setting asks for it. Runs in `_PG_init`.
pub fn hide_if_asked() {
    if !settings::hide_statement_parameters() {
        return;
    }
    for name in LIMITS {
        // SAFETY: the postmaster loading its preloaded libraries, before any backend exists.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                c"0".as_ptr(),
                pg_sys::GucContext::PGC_POSTMASTER,
                GucSource::PGC_S_OVERRIDE,
            );
            guard(name);
        }
    }
}

/// Installs `refuse_session_value` as the check hook of the integer setting `name`.
///
/// # Safety
/// In the postmaster, while no other code reads the settings' records.
unsafe fn guard(name: &CStr) {
    // SAFETY: PostgreSQL's own array of every setting, `GetNumConfigOptions()` long.
    let variables = unsafe {
        std::slice::from_raw_parts(
            pg_sys::get_guc_variables(),
            pg_sys::GetNumConfigOptions() as usize,
        )
    };
    for &variable in variables {
        // SAFETY: each entry is a valid record, and an integer setting's record is a
        // `config_int` that starts with its `config_generic`.
        unsafe {
            if CStr::from_ptr((*variable).name) != name
                || (*variable).vartype != pg_sys::config_type::PGC_INT
            {
                continue;
            }
            let record = variable.cast::<pg_sys::config_int>();
            // PostgreSQL 15 gives these settings no check hook of their own; should a later
            // version add one, replacing it would drop its checks, so the override alone stays.
            if (*record).check_hook.is_none() {
                (*record).check_hook = Some(refuse_session_value);
            } else {
                pgrx::warning!(
                    "{} has a check hook of its own; a session's SET can still change it",
                    name.to_string_lossy()
                );
            }
        }
    }
}

/// A session's `SET` (also `SET LOCAL` and a function's `SET` clause) is the one source that
/// outranks the override, so it is the one refused. Values from lower sources are accepted as
/// before: the override keeps them from taking effect.
#[pg_guard]
unsafe extern "C-unwind" fn refuse_session_value(
    new_value: *mut c_int,
    _extra: *mut *mut c_void,
    source: GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes the value being checked.
    if source != GucSource::PGC_S_SESSION || unsafe { *new_value } == 0 {
        return true;
    }
    // SAFETY: PostgreSQL reads these right after the hook returns, and frees nothing of them.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as c_int);
        pg_sys::GUC_check_errmsg_string =
            c"bind parameters are kept out of the server log: they can be secret values"
                .as_ptr()
                .cast_mut();
        pg_sys::GUC_check_errdetail_string =
            c"pg_secrets.hide_statement_parameters holds log_parameter_max_length and log_parameter_max_length_on_error at 0."
                .as_ptr()
                .cast_mut();
        pg_sys::GUC_check_errhint_string =
            c"Turn pg_secrets.hide_statement_parameters off (it takes a server restart) to log them."
                .as_ptr()
                .cast_mut();
    }
    false
}
