//! Keeps bind parameters (secret values passed as `$1`) out of the server log while
//! `pg_secrets.hide_statement_parameters` is on.
//!
//! PostgreSQL logs a statement's parameters in three places: with its statement
//! (`log_parameter_max_length`, when `log_statement` or `log_min_duration_statement` log it),
//! in the CONTEXT line of any error the statement raises (`log_parameter_max_length_on_error`),
//! and in its plan (`debug_print_plan`: a custom plan holds the bound values as constants).
//! The parse and rewritten trees (`debug_print_parse`, `debug_print_rewritten`) hold no bound
//! value, but every literal of the query text: guarded too, since behind a transaction-pooling
//! proxy one client's `SET` would log the next clients' statements.
//! Each is forced off at server start at the override priority, which `postgresql.conf`,
//! `ALTER SYSTEM`, `ALTER ROLE/DATABASE … SET` and a client's startup options rank below. A
//! session's `SET` ranks above it, and any role may set all but the first; so each setting
//! also gets a check hook that refuses a session's value other than off. The hooks are
//! installed in the postmaster, in the settings' own records, so every backend inherits them.

use crate::settings;
use pgrx::pg_guard;
use pgrx::pg_sys::{self, GucSource};
use std::ffi::{c_int, c_void, CStr};

/// The settings, with the value that keeps parameters out of the log.
const GUARDED: [(&CStr, &CStr); 5] = [
    (c"log_parameter_max_length", c"0"),
    (c"log_parameter_max_length_on_error", c"0"),
    (c"debug_print_plan", c"off"),
    (c"debug_print_parse", c"off"),
    (c"debug_print_rewritten", c"off"),
];

/// Forces the settings off and guards them, if the setting asks for it. Runs in `_PG_init`.
pub fn hide_if_asked() {
    if !settings::hide_statement_parameters() {
        return;
    }
    for (name, off) in GUARDED {
        // SAFETY: the postmaster loading its preloaded libraries, before any backend exists.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                off.as_ptr(),
                pg_sys::GucContext::PGC_POSTMASTER,
                GucSource::PGC_S_OVERRIDE,
            );
            guard(name);
        }
    }
}

/// Installs the check hook of its type on the setting `name`.
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
        // SAFETY: each entry is a valid record, and a record of an integer (a boolean)
        // setting is a `config_int` (a `config_bool`) that starts with its `config_generic`.
        // PostgreSQL 15 gives these settings no check hook of their own; should a later version
        // add one, replacing it would drop its checks, so the override alone stays.
        let hooked = unsafe {
            if CStr::from_ptr((*variable).name) != name {
                continue;
            }
            match (*variable).vartype {
                pg_sys::config_type::PGC_INT => {
                    let hook = &mut (*variable.cast::<pg_sys::config_int>()).check_hook;
                    hook.is_none() && hook.replace(refuse_session_limit).is_none()
                }
                pg_sys::config_type::PGC_BOOL => {
                    let hook = &mut (*variable.cast::<pg_sys::config_bool>()).check_hook;
                    hook.is_none() && hook.replace(refuse_session_switch).is_none()
                }
                _ => false,
            }
        };
        if !hooked {
            pgrx::warning!(
                "{} has a check hook of its own or an unexpected type; a session's SET can still change it",
                name.to_string_lossy()
            );
        }
    }
}

/// The check hook of the two limits: a session may set 0 only.
#[pg_guard]
unsafe extern "C-unwind" fn refuse_session_limit(
    new_value: *mut c_int,
    _extra: *mut *mut c_void,
    source: GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes the value being checked.
    allowed(source, unsafe { *new_value } == 0)
}

/// The check hook of the `debug_print_*` switches: a session may turn them off only.
#[pg_guard]
unsafe extern "C-unwind" fn refuse_session_switch(
    new_value: *mut bool,
    _extra: *mut *mut c_void,
    source: GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes the value being checked.
    allowed(source, unsafe { !*new_value })
}

/// A session's `SET` (also `SET LOCAL`, `set_config` and a function's `SET` clause) is the one
/// source that outranks the override, so it is the one refused. Values from lower sources are
/// accepted as before: the override keeps them from taking effect.
fn allowed(source: GucSource::Type, off: bool) -> bool {
    if source != GucSource::PGC_S_SESSION || off {
        return true;
    }
    // SAFETY: PostgreSQL formats these with "%s" right after the hook returns, and frees
    // nothing of them.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as c_int);
        pg_sys::GUC_check_errmsg_string =
            c"bind parameters are kept out of the server log: they can be secret values"
                .as_ptr()
                .cast_mut();
        pg_sys::GUC_check_errdetail_string =
            c"pg_secrets.hide_statement_parameters holds log_parameter_max_length and log_parameter_max_length_on_error at 0 and debug_print_parse, debug_print_rewritten and debug_print_plan off."
                .as_ptr()
                .cast_mut();
        pg_sys::GUC_check_errhint_string =
            c"Turn pg_secrets.hide_statement_parameters off (it takes a server restart) to log them."
                .as_ptr()
                .cast_mut();
    }
    false
}
