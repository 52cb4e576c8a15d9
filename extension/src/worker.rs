//! The background worker, registered when the library is preloaded. It runs on the primary
//! only (it starts when recovery has finished), in the database `pg_secrets.database`. It
//! moves audit records from the queue file into the audit table as they arrive,
//! evaluates the alarm rules every `pg_secrets.alarm_interval`, and every
//! `pg_secrets.worker_naptime` it starts due rotations, advances running ones (resuming
//! any a crash interrupted), purges secrets past their deletion date and prunes deprecated
//! versions. Each unit of work is its own transaction and its errors are logged, so one bad
//! secret never stops the others. Every wait is bounded, so it never holds up shutdown.

use crate::audit::{self, alarms, queue, trail};
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
use std::time::{Duration, Instant};

pub fn register() {
    BackgroundWorkerBuilder::new("pg_secrets worker")
        .set_type("pg_secrets worker")
        .set_library("pg_secrets")
        .set_function("pg_secrets_worker_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether this process is the worker and has been asked to stop. Long waits (rotator
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

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_secrets_worker_main(_argument: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    if let Err(error) = queue::set_worker_latch() {
        warning!("pg_secrets worker: {error}");
    }
    log!("pg_secrets worker started in database \"{database}\"");
    let mut next_round = Instant::now();
    let mut next_alarms = Instant::now();
    let mut installed = false;
    let mut last_drain = Instant::now();
    while !stop_requested() {
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Audit records are moved in batches: at once when many wait, otherwise at most
        // DRAIN_PAUSE after the first one arrived. One transaction per record would cost more
        // than the reads being audited.
        let waiting = queue::waiting().unwrap_or(0);
        if !installed && waiting > 0 && last_drain.elapsed() >= DRAIN_PAUSE {
            // Records arrive: the extension may have been created since the last round.
            installed = extension_installed() == Some(true);
            last_drain = Instant::now();
        }
        if installed
            && waiting > 0
            && (waiting >= DRAIN_AT_ONCE || last_drain.elapsed() >= DRAIN_PAUSE)
        {
            drain_audit_queue();
            last_drain = Instant::now();
        }
        if Instant::now() >= next_round {
            installed = extension_installed() == Some(true);
            if installed {
                run_round();
            }
            next_round = Instant::now() + settings::worker_naptime();
        }
        if installed && Instant::now() >= next_alarms {
            in_transaction("evaluating alarm rules", alarms::evaluate);
            next_alarms = Instant::now() + settings::alarm_interval();
        }
        // Audit records wake the worker through its latch; rounds come on time regardless.
        let mut wake_at = next_round.min(next_alarms);
        if queue::waiting().unwrap_or(0) > 0 {
            wake_at = wake_at.min(last_drain + DRAIN_PAUSE);
        }
        let wait = wake_at.saturating_duration_since(Instant::now());
        if !BackgroundWorker::wait_latch(Some(wait.clamp(MIN_WAIT, MAX_WAIT))) {
            break;
        }
    }
    // What is queued at a clean shutdown still reaches the table.
    if installed {
        drain_audit_queue();
    }
}

const MIN_WAIT: Duration = Duration::from_millis(5);
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Queued records that are moved at once, and the longest a record waits otherwise.
const DRAIN_AT_ONCE: u64 = 1000;
const DRAIN_PAUSE: Duration = Duration::from_millis(100);

/// Moves queued audit records into the table, a batch per transaction, until a batch is not
/// full. Going on while anything at all is queued would, under a steady stream of reads,
/// commit a transaction for every handful of records that arrived during the last one.
fn drain_audit_queue() {
    loop {
        let Some(drained) = in_transaction("recording audit records", trail::drain_batch) else {
            return;
        };
        if drained.count == 0 {
            return;
        }
        // Freed only now that the transaction holding them has committed.
        if let Err(error) = queue::release(drained.count) {
            warning!("pg_secrets worker: {error}");
            return;
        }
        audit::write_to_server_log(&drained.log_lines);
        if drained.count < trail::DRAIN_BATCH {
            return;
        }
    }
}

fn extension_installed() -> Option<bool> {
    in_transaction("checking for the extension", || {
        Ok(Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_extension WHERE extname = 'pg_secrets')",
        )?
        .unwrap_or(false))
    })
}

/// One transaction with errors caught, logged and rolled back.
fn in_transaction<T>(what: &str, body: impl FnOnce() -> Result<T>) -> Option<T> {
    BackgroundWorker::transaction(AssertUnwindSafe(|| match in_subtransaction(body) {
        Ok(value) => Some(value),
        Err(error) => {
            warning!("pg_secrets worker: {what}: {error}");
            None
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
    in_transaction("purging deleted secrets", crate::store::purge_expired);
    in_transaction("pruning deprecated versions", || {
        Spi::connect_mut(|client| crate::labels::prune_deprecated(client, None))
    });
}
