//! pg_secrets: encrypted, versioned secrets inside PostgreSQL.
//!
//! This file only declares modules and the load-time entry point; each concern lives in a
//! module of its own.

use pgrx::prelude::*;

mod access;
mod api;
mod api_access;
mod api_audit;
mod api_rotation;
mod audit;
mod audit_worker;
mod channels;
mod crypto;
mod db;
mod errors;
mod grants;
mod index_read;
mod keys;
mod labels;
mod parameter_logging;
mod password;
mod regrole;
mod rewrap;
mod rotation;
mod rotators;
mod schedule;
mod settings;
mod store;
mod threads;
mod validate;
mod worker;

#[cfg(any(test, feature = "pg_test"))]
mod tests;

pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../../sql/privileges.sql", name = "privileges", finalize);

/// Runs in the postmaster (the library must be in `shared_preload_libraries`): registers the
/// settings and loads the master keys once, before any backend is forked, so every backend
/// inherits them and no SQL ever sees them.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        errors::Error::NotPreloaded.report();
    }
    errors::keep_backtraces_out_of_reports();
    settings::init();
    parameter_logging::hide_if_asked();
    keys::load_at_startup();
    access::register_invalidation_callbacks();
    index_read::register_invalidation_callbacks();
    audit::queue::register();
    channels::register();
    worker::register();
}

/// Required by `cargo pgrx test`: the settings its throwaway cluster starts with.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_secrets'",
            // Two keys, so tests can move a secret between them; `unit` writes by default.
            "pg_secrets.key_command = 'printf \"unit:%064d\\nother:%064d\\n\" 1 2'",
            // The worker drains the audit queue into the database the tests run in.
            "pg_secrets.database = 'pgrx_tests'",
        ]
    }
}
