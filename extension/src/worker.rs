//! The background workers, registered when the library is preloaded. Both run on the primary
//! only (they start when recovery has finished), in the database `pg_secrets.database`.
//!
//! - `pg_secrets worker` (this module): every `pg_secrets.worker_naptime` it starts due
//!   rotations, advances running ones (resuming any a crash interrupted), purges secrets past
//!   their deletion date and prunes deprecated versions.
//! - `pg_secrets audit worker` (`audit_worker.rs`): moves audit records from the queue into
//!   the table as they arrive and evaluates the alarm rules.
//!
//! They are two processes so that nothing the rotations wait for (a slow rotator program, a
//! target that does not answer, a commit waiting for a synchronous standby) holds up the
//! trail: while it waits, the queue fills, and audited reads wait and then fail. Each unit of
//! work is its own transaction and its errors are logged, so one bad secret never stops the
//! others. Every wait is bounded, so neither holds up shutdown.

use crate::db::in_subtransaction;
use crate::errors::Result;
use crate::rotation::{self, Outcome};
use crate::settings;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn register() {
    for (name, function) in [
        ("pg_secrets worker", "pg_secrets_worker_main"),
        ("pg_secrets audit worker", "pg_secrets_audit_worker_main"),
    ] {
        BackgroundWorkerBuilder::new(name)
            .set_type(name)
            .set_library("pg_secrets")
            .set_function(function)
            .enable_spi_access()
            .set_start_time(BgWorkerStartTime::RecoveryFinished)
            .set_restart_time(Some(Duration::from_secs(10)))
            .load();
    }
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether this process is one of the workers and has been asked to stop. Long waits (rotator
/// programs) poll it; in ordinary backends a cancel arrives as an interrupt instead.
pub fn stop_requested() -> bool {
    if unsafe { pg_sys::MyBgworkerEntry.is_null() } {
        return false;
    }
    // pgrx's flag resets when read; keep it.
    if BackgroundWorker::sigterm_received() {
        STOPPING.store(true, Ordering::SeqCst);
    }
    STOPPING.load(Ordering::SeqCst)
}

/// This process's worker name, for its log lines.
static NAME: OnceLock<&'static str> = OnceLock::new();

/// Attaches the signal handlers and the database connection.
pub fn start(name: &'static str) {
    let _ = NAME.set(name);
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // The workers run as the bootstrap superuser: no object another role can create (in
    // `public`, where any role may create in a database made before PostgreSQL 15) is found by
    // their queries' names, operators or casts.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
    log!("{name} started in database \"{database}\"");
}

/// Logs a failure of this worker's work as a warning.
pub fn warn(what: &str, error: impl std::fmt::Display) {
    let name = NAME.get().copied().unwrap_or("pg_secrets worker");
    warning!("{name}: {what}: {error}");
}

/// Reloads the configuration when a SIGHUP has come.
pub fn reload_if_asked() {
    if BackgroundWorker::sighup_received() {
        unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
    }
}

/// Waits for the latch or until `until` (within 5 ms to 1 s); false when the server is
/// shutting down.
pub fn wait_until(until: Instant) -> bool {
    const MIN_WAIT: Duration = Duration::from_millis(5);
    const MAX_WAIT: Duration = Duration::from_secs(1);
    let wait = until.saturating_duration_since(Instant::now());
    BackgroundWorker::wait_latch(Some(wait.clamp(MIN_WAIT, MAX_WAIT)))
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_secrets_worker_main(_argument: pg_sys::Datum) {
    start("pg_secrets worker");
    let mut next_round = Instant::now();
    while !stop_requested() {
        reload_if_asked();
        if Instant::now() >= next_round {
            if extension_installed() == Some(true) {
                run_round();
            }
            next_round = Instant::now() + settings::worker_naptime();
        }
        if !wait_until(next_round) {
            break;
        }
    }
}

pub fn extension_installed() -> Option<bool> {
    in_transaction("checking for the extension", || {
        Ok(Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_secrets')",
        )?
        .unwrap_or(false))
    })
}

/// One transaction with errors caught, logged and rolled back. A cancel sent to the worker
/// (`pg_cancel_backend`) stops the work at hand, which `in_subtransaction` has rolled back
/// and passes on: here it is logged like any error, and the worker goes on with the rest.
pub fn in_transaction<T>(what: &str, body: impl FnOnce() -> Result<T>) -> Option<T> {
    BackgroundWorker::transaction(AssertUnwindSafe(|| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| in_subtransaction(body))) {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                warn(what, error);
                None
            }
            Err(_cancelled) => {
                warn(what, "cancelled (pg_cancel_backend)");
                None
            }
        }
    }))
}

fn run_round() {
    in_transaction("starting due rotations", rotation::start_due_rotations);
    for id in in_transaction("listing rotations", rotation::runnable).unwrap_or_default() {
        while !stop_requested() {
            match in_transaction("running a rotation", || rotation::work_on(id)) {
                Some(Outcome::Progressed) => continue,
                _ => break,
            }
        }
    }
    in_transaction("purging deleted secrets", || {
        crate::store::purge_expired("worker")
    });
    in_transaction("pruning deprecated versions", || {
        Spi::connect_mut(|client| crate::labels::prune_deprecated(client, None, "worker"))
    });
}
