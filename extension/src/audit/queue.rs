//! The audit queue: a ring of fixed-size slots that every backend shares. Any backend appends a
//! record (outside its own transaction, so a rollback or an error cannot take the record back);
//! the background worker copies records into `secrets.audit_record` and only then frees them.
//! When the ring is full a caller waits for the worker rather than dropping a record, and gives
//! up with an error (so the audited operation does not happen unaudited) after
//! `pg_secrets.audit_queue_wait`.
//!
//! The ring lives in a file of the data directory, `pg_secrets_audit.queue`, mapped shared
//! into every process, not in PostgreSQL's shared memory: a crash or an immediate stop kills
//! the processes but not the operating system's copy of the file, so what was queued is still
//! there when the server starts again, and the worker drains it. Only the lock and the worker's
//! latch live in shared memory. An operating-system crash can lose the pages the kernel had not
//! yet written back (as `synchronous_commit = off` can lose the last commits), and the pages
//! that did reach the disk need not agree with each other. So each slot carries its record's
//! sequence number and a CRC: a slot left from an earlier lap or half written is stored as an
//! `unreadable` record in its place rather than as a wrong one, and records whose slots reached
//! the disk after the header did are found again when the server starts.

use crate::errors::{Error, Result};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Slots in the ring, and the bytes a serialized record may take (a slot is 2 KiB).
pub const CAPACITY: usize = 4096;
pub const SLOT_BYTES: usize = 2032;

const FILE_NAME: &str = "pg_secrets_audit.queue";
/// Format marker at the start of the file (version 3: records in postcard, slots with sequence
/// numbers and CRCs); a file without it is set aside and a new one started.
const MAGIC: u64 = u64::from_le_bytes(*b"PGSAUDQ3");

#[repr(C)]
struct Slot {
    /// The record's sequence number in the ring: tells this lap's record from an older one.
    sequence: u64,
    len: u32,
    /// CRC-32 of the sequence number, the length and the record.
    crc: u32,
    bytes: [u8; SLOT_BYTES],
}

impl Slot {
    fn checksum(sequence: u64, record: &[u8]) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&sequence.to_le_bytes());
        hasher.update(&(record.len() as u32).to_le_bytes());
        hasher.update(record);
        hasher.finalize()
    }

    fn write(&mut self, sequence: u64, record: &[u8]) {
        self.bytes[..record.len()].copy_from_slice(record);
        self.len = record.len() as u32;
        self.sequence = sequence;
        self.crc = Slot::checksum(sequence, record);
    }

    /// The record, if this slot holds record `sequence` intact.
    fn read(&self, sequence: u64) -> Option<&[u8]> {
        let record = self.bytes.get(..self.len as usize)?;
        (self.sequence == sequence && self.crc == Slot::checksum(sequence, record))
            .then_some(record)
    }
}

/// The file's layout.
#[repr(C)]
struct Ring {
    magic: u64,
    /// Chosen when the file is created: the worker's progress in the table is kept per ring,
    /// so a new file (a restored backup, a cluster built anew) never inherits another's.
    ring_id: [u8; 16],
    /// Sequence numbers: the next slot to write, and the next to hand to the worker.
    head: u64,
    tail: u64,
    slots: [Slot; CAPACITY],
}

/// In PostgreSQL's shared memory: what only means something while the server runs.
#[repr(C)]
struct Control {
    lock: *mut pg_sys::LWLock,
    /// The worker's latch, set when a record arrives in an empty ring or the ring fills.
    worker_latch: *mut pg_sys::Latch,
}

const CONTROL_NAME: &std::ffi::CStr = c"pg_secrets audit queue";

static mut CONTROL: *mut Control = std::ptr::null_mut();
static mut RING: *mut Ring = std::ptr::null_mut();
/// The mapping behind RING; replaced (and the old one unmapped) when the postmaster
/// reinitializes shared memory after a crash.
static mut MAPPING: Option<memmap2::MmapRaw> = None;
static mut PREVIOUS_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Called from `_PG_init` in the postmaster: asks for the control block and lock.
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
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Control>());
        pg_sys::RequestNamedLWLockTranche(CONTROL_NAME.as_ptr(), 1);
    }
}

/// Runs in the postmaster at start and after each crash; children inherit the mapping.
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
        let control = pg_sys::ShmemInitStruct(
            CONTROL_NAME.as_ptr(),
            std::mem::size_of::<Control>(),
            &mut found,
        )
        .cast::<Control>();
        if !found {
            (*control).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(CONTROL_NAME.as_ptr())).lock;
            (*control).worker_latch = std::ptr::null_mut();
        }
        CONTROL = control;
        pg_sys::LWLockRelease(init_lock);
        match map_ring_file() {
            Ok((mapping, ring)) => {
                RING = ring;
                MAPPING = Some(mapping);
            }
            // Without the file there is no queue: audited calls fail with the error below
            // rather than run unaudited.
            Err(error) => {
                RING = std::ptr::null_mut();
                pgrx::log!("pg_secrets: cannot map the audit queue file {FILE_NAME}: {error}");
            }
        }
    }
}

/// Opens (or creates) the ring file in the data directory, the postmaster's working
/// directory, and maps it shared. A file that is not a ring of this layout, or whose positions
/// make no sense, is moved aside (never silently emptied) and a new one starts.
fn map_ring_file() -> std::io::Result<(memmap2::MmapRaw, *mut Ring)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let size = std::mem::size_of::<Ring>();
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(FILE_NAME)
    };
    let mut file = open()?;
    let length = file.metadata()?.len();
    if length != 0 && length != size as u64 {
        set_aside(&format!("its size is {length} bytes, not {size}"))?;
        file = open()?;
    }
    let fresh = file.metadata()?.len() == 0;
    if fresh {
        // Written out, not merely sized: a sparse file would turn a full disk into SIGBUS in
        // whichever process first touched an unallocated page.
        file.write_all(&vec![0u8; size])?;
        file.sync_all()?;
    }
    let mapping = memmap2::MmapOptions::new().len(size).map_raw(&file)?;
    let ring = mapping.as_mut_ptr().cast::<Ring>();
    // SAFETY: the mapping is `size` bytes, the size of a Ring, and no other process runs yet.
    unsafe {
        if !fresh && !header_is_sane(&*ring) {
            drop(mapping);
            set_aside(
                "its header is not a pg_secrets audit queue's, or its positions are damaged",
            )?;
            return map_ring_file();
        }
        if fresh {
            start_new_ring(ring);
        } else {
            recover_records_past_head(ring);
        }
    }
    Ok((mapping, ring))
}

/// # Safety
/// `ring` must point at a mapped Ring that no other process uses yet.
unsafe fn start_new_ring(ring: *mut Ring) {
    unsafe {
        (*ring).ring_id = rand::random();
        (*ring).tail = (*ring).head;
        (*ring).magic = MAGIC;
    }
}

/// After an operating-system crash the header can be older than the slots that follow it:
/// records written after the header last reached the disk are taken back, as far as the slots
/// hold them intact and in sequence.
///
/// # Safety
/// `ring` must point at a mapped Ring that no other process uses yet.
unsafe fn recover_records_past_head(ring: *mut Ring) {
    unsafe {
        let found_from = (*ring).head;
        while (*ring).head - (*ring).tail < CAPACITY as u64
            && (*ring).slots[((*ring).head % CAPACITY as u64) as usize]
                .read((*ring).head)
                .is_some()
        {
            (*ring).head += 1;
        }
        let found = (*ring).head - found_from;
        if found > 0 {
            pgrx::log!("pg_secrets: {found} audit records found in the queue file past its recorded end were taken back");
        }
    }
}

fn header_is_sane(ring: &Ring) -> bool {
    ring.magic == MAGIC && ring.head >= ring.tail && ring.head - ring.tail <= CAPACITY as u64
}

/// Renames the file so that a new ring can start, keeping what it held for inspection.
fn set_aside(why: &str) -> std::io::Result<()> {
    // Named by the time, so that a file set aside earlier is never overwritten.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let aside = format!("{FILE_NAME}.damaged.{}", now.as_micros());
    std::fs::rename(FILE_NAME, &aside)?;
    pgrx::log!("pg_secrets: the audit queue file {FILE_NAME} was renamed to {aside} and a new one started: {why}");
    Ok(())
}

fn ring() -> Result<*mut Ring> {
    let (control, ring) = unsafe { (CONTROL, RING) };
    if control.is_null() {
        return Err(Error::NotPreloaded);
    }
    if ring.is_null() {
        return Err(Error::AuditQueueUnavailable);
    }
    Ok(ring)
}

struct Locked(*mut pg_sys::LWLock);

impl Locked {
    fn new(mode: pg_sys::LWLockMode::Type) -> Locked {
        // SAFETY: CONTROL is set whenever RING is (attach_memory).
        let lock = unsafe { (*CONTROL).lock };
        unsafe { pg_sys::LWLockAcquire(lock, mode) };
        Locked(lock)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        unsafe { pg_sys::LWLockRelease(self.0) };
    }
}

fn wake_worker() {
    let latch = unsafe { (*CONTROL).worker_latch };
    if !latch.is_null() {
        unsafe { pg_sys::SetLatch(latch) };
    }
}

/// Appends one serialized record, waiting up to `wait` for room.
pub fn push(record: &[u8], wait: Duration) -> Result<()> {
    let ring = ring()?;
    let record = &record[..record.len().min(SLOT_BYTES)];
    // Set when the ring is first found full: reading the clock on every append was a twelfth
    // of the capture.
    let mut deadline = None;
    loop {
        let filled = {
            let _locked = Locked::new(pg_sys::LWLockMode::LW_EXCLUSIVE);
            // SAFETY: the exclusive lock is held; the slot is inside the ring.
            unsafe {
                let (head, tail) = ((*ring).head, (*ring).tail);
                if head - tail < CAPACITY as u64 {
                    (*ring).slots[(head % CAPACITY as u64) as usize].write(head, record);
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
                    wake_worker();
                }
                return Ok(());
            }
            None => {
                wake_worker();
                let now = Instant::now();
                if now >= *deadline.get_or_insert(now + wait) {
                    return Err(Error::AuditQueueFull);
                }
                pgrx::check_for_interrupts!();
                unsafe { pg_sys::pg_usleep(1000) };
            }
        }
    }
}

/// The worker: copies up to `max` records without removing them; `None` for a slot that does
/// not hold its record intact (see the top of this file). The copy is made without
/// the lock, which callers appending records would otherwise wait on: slots between the tail
/// and the head read under the lock are complete (written before the head moved past them,
/// under the same lock), and nobody writes them again until the worker releases them.
pub fn peek(max: usize) -> Result<Vec<Option<Vec<u8>>>> {
    let ring = ring()?;
    let (head, tail) = {
        let _locked = Locked::new(pg_sys::LWLockMode::LW_SHARED);
        // SAFETY: the lock is held.
        unsafe { ((*ring).head, (*ring).tail) }
    };
    // SAFETY: see above; only this process moves `tail`, so these slots stay put.
    unsafe {
        Ok((tail..head.min(tail + max as u64))
            .map(|sequence| {
                (*ring).slots[(sequence % CAPACITY as u64) as usize]
                    .read(sequence)
                    .map(<[u8]>::to_vec)
            })
            .collect())
    }
}

/// The worker: frees the `count` oldest records, once they are committed to the table.
pub fn release(count: usize) -> Result<()> {
    let ring = ring()?;
    let _locked = Locked::new(pg_sys::LWLockMode::LW_EXCLUSIVE);
    unsafe { (*ring).tail += count as u64 };
    Ok(())
}

/// The worker: records where to wake it.
pub fn set_worker_latch() -> Result<()> {
    ring()?;
    let _locked = Locked::new(pg_sys::LWLockMode::LW_EXCLUSIVE);
    unsafe { (*CONTROL).worker_latch = pg_sys::MyLatch };
    Ok(())
}

/// The ring's identity and the sequence number of its oldest queued record: the worker keeps
/// its progress in the table under this identity.
pub fn position() -> Result<(pgrx::Uuid, u64)> {
    let ring = ring()?;
    let _locked = Locked::new(pg_sys::LWLockMode::LW_SHARED);
    unsafe { Ok((pgrx::Uuid::from_bytes((*ring).ring_id), (*ring).tail)) }
}

/// The worker: frees what the table already holds. A crash between the commit of a batch and
/// `release` leaves those records queued; they must not be stored twice. A table that claims
/// more than this ring ever held (a data directory restored from a backup, a table restored
/// without its file) proves nothing about the records here: the ring takes a new identity and
/// keeps them, since a record stored twice can be explained and one dropped cannot.
pub fn skip_through(stored_through: u64) -> Result<()> {
    let ring = ring()?;
    let _locked = Locked::new(pg_sys::LWLockMode::LW_EXCLUSIVE);
    unsafe {
        if stored_through > (*ring).head {
            (*ring).ring_id = rand::random();
            pgrx::warning!(
                "pg_secrets: the audit table has stored records this queue never held (through \
                 {stored_through}, the queue is at {}); the queue takes a new identity and its \
                 {} waiting records are stored",
                (*ring).head,
                (*ring).head - (*ring).tail
            );
        } else if stored_through > (*ring).tail {
            (*ring).tail = stored_through;
        }
    }
    Ok(())
}

/// Records waiting in the ring.
pub fn waiting() -> Result<u64> {
    let ring = ring()?;
    let _locked = Locked::new(pg_sys::LWLockMode::LW_SHARED);
    Ok(unsafe { (*ring).head - (*ring).tail })
}
