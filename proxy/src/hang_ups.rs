//! One thread that waits, for every session the kernel relays, until either side hangs up.
//!
//! It asks the kernel for hang-ups only (EPOLLRDHUP, and the errors epoll always reports):
//! readiness to read fires for every message the kernel relays, which is what the kernel
//! relay exists to avoid, so the runtime's own reactor cannot watch these sockets.

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::oneshot;

pub struct HangUps {
    epoll: Epoll,
    /// The session of each token: told when one of its sockets hangs up.
    sessions: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_token: AtomicU64,
    /// Written by `stop`: the thread ends.
    stop: EventFd,
    /// False once the thread has ended: nothing would tell a new session's hang-up.
    running: AtomicBool,
}

/// The epoll token of `HangUps::stop`; sessions count up from 0.
const STOP: u64 = u64::MAX;

impl HangUps {
    pub fn start() -> Result<Arc<HangUps>, String> {
        let fail = |error: nix::errno::Errno| format!("creating the hang-up watcher: {error}");
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(fail)?;
        let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).map_err(fail)?;
        epoll
            .add(stop.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, STOP))
            .map_err(fail)?;
        let hang_ups = Arc::new(HangUps {
            epoll,
            sessions: Mutex::default(),
            next_token: AtomicU64::new(0),
            stop,
            running: AtomicBool::new(true),
        });
        let running = Arc::clone(&hang_ups);
        std::thread::Builder::new()
            .name("kernel-relay-hang-ups".into())
            .spawn(move || running.run())
            .map_err(|error| format!("starting the hang-up watcher: {error}"))?;
        Ok(hang_ups)
    }

    /// Resolves once either socket hangs up (or the watcher stops).
    pub fn watch(
        &self,
        client: &OwnedFd,
        server: &OwnedFd,
    ) -> std::io::Result<oneshot::Receiver<()>> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        {
            let mut sessions = self.sessions();
            // Checked under the lock `end` clears under: a session added after that would
            // never be told.
            if !self.running.load(Ordering::Acquire) {
                return Err(std::io::Error::other("the hang-up watcher has stopped"));
            }
            sessions.insert(token, sender);
        }
        let interest = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT;
        for socket in [client, server] {
            if let Err(error) = self
                .epoll
                .add(socket.as_fd(), EpollEvent::new(interest, token))
            {
                self.tell(token);
                return Err(error.into());
            }
        }
        Ok(receiver)
    }

    /// Ends the thread.
    pub fn stop(&self) {
        let _ = self.stop.write(1);
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<()>>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tell(&self, token: u64) {
        if let Some(sender) = self.sessions().remove(&token) {
            let _ = sender.send(());
        }
    }

    fn run(&self) {
        let mut events = [EpollEvent::empty(); 64];
        loop {
            match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(ready) => {
                    for event in &events[..ready] {
                        if event.data() == STOP {
                            self.end();
                            return;
                        }
                        self.tell(event.data());
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(error) => {
                    tracing::error!(%error, "the kernel relay's hang-up watcher stopped");
                    self.end();
                    return;
                }
            }
        }
    }

    /// Dropping the senders ends every session still watched, rather than leaving it
    /// unwatched for good.
    fn end(&self) {
        let mut sessions = self.sessions();
        self.running.store(false, Ordering::Release);
        sessions.clear();
    }
}
