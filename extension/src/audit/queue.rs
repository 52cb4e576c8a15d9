//! The audit queue: a ring of fixed-size slots in shared memory. Any backend appends a record
//! (outside its own transaction, so a rollback or an error cannot take the record back); the
//! background worker copies records into `secrets.audit_record` and only then frees them. When
//! the ring is full a caller waits for the worker rather than dropping a record, and gives up
//! with an error (so the audited operation does not happen unaudited) after
//! `pg_secrets.audit_queue_wait`.

use crate::errors::{Error, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Slots in the ring, and the bytes a serialized record may take.
pub const CAPACITY: usize = 4096;
pub const SLOT_BYTES: usize = 2040;

#[repr(C)]
struct Slot {
    len: u32,
    bytes: [u8; SLOT_BYTES],
}

#[repr(C)]
struct Ring {
    lock: *mut pg_sys::LWLock,
    /// The worker's latch, set when a record arrives in an empty ring or the ring fills.
    worker_latch: *mut pg_sys::Latch,
    /// Sequence numbers: the next slot to write, and the next to hand to the worker.
    head: u64,
    tail: u64,
    slots: [Slot; CAPACITY],
}

const RING_NAME: &std::ffi::CStr = c"pg_secrets audit queue";

static mut RING: *mut Ring = std::ptr::null_mut();
static mut PREVIOUS_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Called from `_PG_init` in the postmaster: asks for the ring's memory and lock.
pub fn register() {
    unsafe {
        PREVIOUS_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(request_memory);
        PREVIOUS_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(attach_memory);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn request_memory() {
    unsafe {
        if let Some(previous) = PREVIOUS_REQUEST_HOOK {
            previous();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Ring>());
        pg_sys::RequestNamedLWLockTranche(RING_NAME.as_ptr(), 1);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn attach_memory() {
    unsafe {
        if let Some(previous) = PREVIOUS_STARTUP_HOOK {
            previous();
        }
        // AddinShmemInitLock, as the C macro spells it.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ring =
            pg_sys::ShmemInitStruct(RING_NAME.as_ptr(), std::mem::size_of::<Ring>(), &mut found)
                .cast::<Ring>();
        if !found {
            // Zeroed in place: the ring is megabytes, far too big for a stack temporary.
            std::ptr::write_bytes(ring.cast::<u8>(), 0, std::mem::size_of::<Ring>());
            (*ring).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(RING_NAME.as_ptr())).lock;
        }
        RING = ring;
        pg_sys::LWLockRelease(init_lock);
    }
}

fn ring() -> Result<*mut Ring> {
    let ring = unsafe { RING };
    if ring.is_null() {
        return Err(Error::NotPreloaded);
    }
    Ok(ring)
}

struct Locked(*mut pg_sys::LWLock);

impl Locked {
    fn new(ring: *mut Ring, mode: pg_sys::LWLockMode::Type) -> Locked {
        let lock = unsafe { (*ring).lock };
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Locked(lock)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.0) };
    }
}

fn wake_worker(ring: *mut Ring) {
    let latch = unsafe { (*ring).worker_latch };
    if !latch.is_null() {
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// Appends one serialized record, waiting up to `wait` for room.
pub fn push(record: &[u8], wait: Duration) -> Result<()> {
    let ring = ring()?;
    let record = &record[..record.len().min(SLOT_BYTES)];
    let deadline = Instant::now() + wait;
    loop {
        let filled = {
            let _locked = Locked::new(ring, pg_sys::LWLockMode::LW_EXCLUSIVE);
            // SAFETY: the exclusive lock is held; the slot is inside the ring.
            unsafe {
                let (head, tail) = ((*ring).head, (*ring).tail);
                if head - tail < CAPACITY as u64 {
                    let slot = &mut (*ring).slots[(head % CAPACITY as u64) as usize];
                    slot.bytes[..record.len()].copy_from_slice(record);
                    slot.len = record.len() as u32;
                    (*ring).head = head + 1;
                    Some(head + 1 - tail)
                } else {
                    None
                }
            }
        };
        match filled {
            // The worker sleeps when the ring is empty: wake it for the first record, and
            // again whenever a quarter of the ring waits.
            Some(filled) => {
                if filled == 1 || filled % (CAPACITY as u64 / 4) == 0 {
                    wake_worker(ring);
                }
                return Ok(());
            }
            None => {
                wake_worker(ring);
                if Instant::now() >= deadline {
                    return Err(Error::AuditQueueFull);
                }
                pgrx::check_for_interrupts!();
                unsafe { pg_sys::pg_usleep(1000) };
            }
        }
    }
}

/// The worker: copies up to `max` records without removing them.
pub fn peek(max: usize) -> Result<Vec<Vec<u8>>> {
    let ring = ring()?;
    let _locked = Locked::new(ring, pg_sys::LWLockMode::LW_SHARED);
    // SAFETY: the lock is held; only the worker moves `tail`, so these slots stay put.
    unsafe {
        let (head, tail) = ((*ring).head, (*ring).tail);
        Ok((tail..head.min(tail + max as u64))
            .map(|sequence| {
                let slot = &(*ring).slots[(sequence % CAPACITY as u64) as usize];
                slot.bytes[..slot.len as usize].to_vec()
            })
            .collect())
    }
}

/// The worker: frees the `count` oldest records, once they are committed to the table.
pub fn release(count: usize) -> Result<()> {
    let ring = ring()?;
    let _locked = Locked::new(ring, pg_sys::LWLockMode::LW_EXCLUSIVE);
    unsafe { (*ring).tail += count as u64 };
    Ok(())
}

/// The worker: records where to wake it.
pub fn set_worker_latch() -> Result<()> {
    let ring = ring()?;
    let _locked = Locked::new(ring, pg_sys::LWLockMode::LW_EXCLUSIVE);
    unsafe { (*ring).worker_latch = pg_sys::MyLatch };
    Ok(())
}

/// Records waiting in the ring.
pub fn waiting() -> Result<u64> {
    let ring = ring()?;
    let _locked = Locked::new(ring, pg_sys::LWLockMode::LW_SHARED);
    Ok(unsafe { (*ring).head - (*ring).tail })
}
