//! Server connections kept between clients (session pooling). A connection is keyed by
//! everything that shaped its session: server, database, user and the client's startup
//! parameters. It is reused only within its maximum lifetime, so sessions opened with an old
//! credential age out after a rotation, and only if it is still alive.
//!
//! In transaction pooling a route's clients also share a fixed number of slots: a client
//! holds one from the start of a transaction to its end, and waits for one when all are taken.

use crate::backend::BackendSession;
use crate::config::Route;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

pub struct Pooled {
    pub session: BackendSession,
    born: Instant,
}

pub struct Pool {
    idle: Mutex<HashMap<String, Vec<Pooled>>>,
    lifetime: Duration,
    max_idle_per_key: usize,
    /// Per route: its pool_size and the slots left.
    slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

impl Pool {
    pub fn new(lifetime: Duration, max_idle_per_key: usize) -> Pool {
        Pool {
            idle: Mutex::new(HashMap::new()),
            lifetime,
            max_idle_per_key,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The slots of a route in transaction mode, shared by the route's clients whoever they are.
    ///
    /// A reload that changes the route's size starts a new set for the clients that connect
    /// after it; those connected before keep the old one, with the rest of the route's
    /// settings, until they leave.
    pub fn route_slots(&self, route: &Route) -> Arc<Semaphore> {
        let size = route.pool_size;
        let key = format!(
            "{}\0{}",
            route.database,
            route.user.as_deref().unwrap_or_default()
        );
        let mut slots = self.slots.lock().expect("pool lock poisoned");
        let entry = slots
            .entry(key)
            .or_insert_with(|| (size, Arc::new(Semaphore::new(size))));
        if entry.0 != size {
            *entry = (size, Arc::new(Semaphore::new(size)));
        }
        Arc::clone(&entry.1)
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

/// Transaction mode: the startup parameters a shared server session is opened with. Only
/// those that shape how values are written and read go along, so that clients that differ in
/// anything else (`application_name`, `options`, the user name they gave) share one set of
/// sessions, and `pool_size` bounds them.
pub fn shared_session_parameters(client: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    const SHAPING: [&str; 5] = [
        "client_encoding",
        "datestyle",
        "intervalstyle",
        "timezone",
        "extra_float_digits",
    ];
    client
        .iter()
        .filter(|(name, _)| SHAPING.contains(&name.to_ascii_lowercase().as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}
