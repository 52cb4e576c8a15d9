//! Server connections kept between clients (session pooling). A connection is keyed by
//! everything that shaped its session: server, database, user and the client's startup
//! parameters. It is reused only within its maximum lifetime, so sessions opened with an old
//! credential age out after a rotation, and only if it is still alive.

use crate::backend::BackendSession;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Pooled {
    pub session: BackendSession,
    born: Instant,
}

pub struct Pool {
    idle: Mutex<HashMap<String, Vec<Pooled>>>,
    lifetime: Duration,
    max_idle_per_key: usize,
}

impl Pool {
    pub fn new(lifetime: Duration, max_idle_per_key: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            lifetime,
            max_idle_per_key,
        }
    }

    /// An idle, live connection for `key`, if there is one; stale ones are dropped on the way.
    pub fn checkout(&self, key: &str) -> Option<(BackendSession, Instant)> {
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let connections = idle.get_mut(key)?;
        while let Some(pooled) = connections.pop() {
            if pooled.born.elapsed() < self.lifetime && pooled.session.stream.is_idle_and_open() {
                return Some((pooled.session, pooled.born));
            }
        }
        None
    }

    /// Drops every idle connection (after a configuration change they were not opened under).
    pub fn clear(&self) {
        self.idle.lock().expect("pool lock poisoned").clear();
    }

    pub fn checkin(&self, key: String, session: BackendSession, born: Instant) {
        if self.max_idle_per_key == 0 || born.elapsed() >= self.lifetime {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        let connections = idle.entry(key).or_default();
        if connections.len() < self.max_idle_per_key {
            connections.push(Pooled { session, born });
        }
    }
}
