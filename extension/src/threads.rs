//! Threads in a server process, for work that touches no PostgreSQL state (a rotation's
//! network work, a rotator program's pipes). The kernel hands a signal sent to the process to
//! any thread that does not block it, and the handlers PostgreSQL and pgrx install must run on
//! the thread they were written for: pgrx's SIGHUP handler in a background worker checks that
//! it runs on the main thread and panics otherwise, which aborted the rotation worker, and the
//! postmaster then restarted every process of the server, when a reload came during a
//! rotation. So these threads block every signal, and the main thread gets them all.

use std::io;
use std::mem::MaybeUninit;
use std::thread::JoinHandle;

/// `std::thread::Builder::spawn`, with every signal blocked in the new thread. A thread
/// inherits the signal mask of the thread that creates it, so the mask is set to block all
/// for the spawn only: a thread that blocked them itself, first thing, could still take a
/// signal that came before. A signal that arrives during the spawn waits, and the main
/// thread takes it once its own mask is back.
pub fn spawn<T, F>(work: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let _restore = BlockAllSignals::new();
    #[allow(clippy::disallowed_methods)] // the one place threads are started
    std::thread::Builder::new().spawn(work)
}

/// Blocks every signal in the calling thread until dropped, then restores its mask.
struct BlockAllSignals(libc::sigset_t);

impl BlockAllSignals {
    fn new() -> BlockAllSignals {
        // SAFETY: sigfillset initialises the set; pthread_sigmask only changes this thread's
        // mask and writes the previous one, and cannot fail with valid arguments.
        unsafe {
            let mut all = MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigfillset(all.as_mut_ptr());
            let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
            libc::pthread_sigmask(libc::SIG_SETMASK, all.as_ptr(), previous.as_mut_ptr());
            BlockAllSignals(previous.assume_init())
        }
    }
}

impl Drop for BlockAllSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new` on the same thread.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut());
        }
    }
}
