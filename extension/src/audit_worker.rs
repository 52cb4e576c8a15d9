//! The `pg_secrets audit worker`: moves audit records from the queue file into
//! `secrets.audit_record` as they arrive, in batches, and evaluates the alarm rules every
//! `pg_secrets.alarm_interval`. Readers wake it through its latch when records arrive. It has
//! its own process so that nothing the rotation worker waits for holds up the trail
//! (`worker.rs`).

use crate::audit::{self, alarms, queue, trail};
use crate::settings;
use crate::worker::{
    extension_installed, in_transaction, reload_if_asked, start, stop_requested, wait_until, warn,
};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Queued records that are moved at once, and the longest a record waits otherwise.
const DRAIN_AT_ONCE: u64 = 1000;
const DRAIN_PAUSE: Duration = Duration::from_millis(100);

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_secrets_audit_worker_main(_argument: pg_sys::Datum) {
    start("pg_secrets audit worker");
    if let Err(error) = queue::set_worker_latch() {
        warn("waking on new records", error);
    }
    let mut installed = false;
    let mut next_check = Instant::now();
    let mut next_alarms = Instant::now();
    let mut last_drain = Instant::now();
    while !stop_requested() {
        reload_if_asked();
        let waiting = queue::waiting().unwrap_or(0);
        // Whether the extension exists is asked every round (it may have been dropped or
        // created since), and when records arrive while it did not, at most every DRAIN_PAUSE.
        if Instant::now() >= next_check {
            installed = extension_installed() == Some(true);
            next_check = Instant::now() + settings::worker_naptime();
        } else if !installed && waiting > 0 && last_drain.elapsed() >= DRAIN_PAUSE {
            installed = extension_installed() == Some(true);
            last_drain = Instant::now();
        }
        // Records are moved in batches: at once when many wait, otherwise at most
        // DRAIN_PAUSE after the first one arrived. One transaction per record would cost more
        // than the reads being audited.
        if installed
            && waiting > 0
            && (waiting >= DRAIN_AT_ONCE || last_drain.elapsed() >= DRAIN_PAUSE)
        {
            drain_queue();
            last_drain = Instant::now();
        }
        if installed && Instant::now() >= next_alarms {
            in_transaction("evaluating alarm rules", alarms::evaluate);
            next_alarms = Instant::now() + settings::alarm_interval();
        }
        // Without the extension there are neither alarms to evaluate nor records to store:
        // only the next check is due.
        let mut wake_at = next_check;
        if installed {
            wake_at = wake_at.min(next_alarms);
        }
        if installed && queue::waiting().unwrap_or(0) > 0 {
            wake_at = wake_at.min(last_drain + DRAIN_PAUSE);
        }
        if !wait_until(wake_at) {
            break;
        }
    }
    // What is queued at a clean shutdown still reaches the table.
    if installed {
        drain_queue();
    }
}

/// Moves queued audit records into the table, a batch per transaction, until a batch is not
/// full. Going on while anything at all is queued would, under a steady stream of reads,
/// commit a transaction for every handful of records that arrived during the last one.
fn drain_queue() {
    loop {
        let Some(drained) = in_transaction("recording audit records", trail::drain_batch) else {
            return;
        };
        if drained.count == 0 {
            return;
        }
        // Freed only now that the transaction holding them has committed.
        if let Err(error) = queue::release(drained.count) {
            warn("freeing stored records", error);
            return;
        }
        if let Some(head) = &drained.head {
            if let Err(error) = audit::head::write(head) {
                warn("recording the end of the audit chain", error);
            }
        }
        audit::log_pipe::write(&drained.log_lines);
        if drained.count < trail::DRAIN_BATCH {
            return;
        }
    }
}
