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
    idle_since: Instant,
}

/// The idle connections, by key, and how many there are in all.
#[derive(Default)]
struct Idle {
    by_key: HashMap<String, Vec<Pooled>>,
    count: usize,
    /// The last `clear`: connections logged in before it are not taken back.
    cleared_at: Option<Instant>,
}

impl Idle {
    /// Drops the connection that has been idle longest, whatever its key.
    fn evict_longest_idle(&mut self) {
        let longest = self
            .by_key
            .iter()
            .filter_map(|(key, connections)| Some((key, connections.first()?.idle_since)))
            .min_by_key(|(_, since)| *since)
            .map(|(key, _)| key.clone());
        if let Some(key) = longest {
            self.take_first(&key);
        }
    }

    fn take_first(&mut self, key: &str) {
        if let Some(connections) = self.by_key.get_mut(key) {
            connections.remove(0);
            self.count -= 1;
            if connections.is_empty() {
                self.by_key.remove(key);
            }
        }
    }
}

pub struct Pool {
    idle: Mutex<Idle>,
    lifetime: Duration,
    max_idle_per_key: usize,
    /// Idle connections in all: each key is bounded, but keys are as many as the startup
    /// parameters clients send, and every idle connection holds one of the server's
    /// `max_connections`.
    max_idle_total: usize,
    /// Per route: its pool_size and the slots left.
    slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

impl Pool {
    pub fn new(lifetime: Duration, max_idle_per_key: usize, max_idle_total: usize) -> Pool {
        Pool {
            idle: Mutex::new(Idle::default()),
            lifetime,
            max_idle_per_key,
            max_idle_total,
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
        let connections = idle.by_key.get_mut(key)?;
        let mut taken = 0;
        let mut found = None;
        while let Some(pooled) = connections.pop() {
            taken += 1;
            if pooled.born.elapsed() < self.lifetime && pooled.session.stream.is_idle_and_open() {
                found = Some((pooled.session, pooled.born));
                break;
            }
        }
        if connections.is_empty() {
            idle.by_key.remove(key);
        }
        idle.count -= taken;
        found
    }

    /// Drops every idle connection, and refuses those in use when they come back: they were
    /// opened under a configuration that has changed since (the TLS rules to servers).
    pub fn clear(&self) {
        *self.idle.lock().expect("pool lock poisoned") = Idle {
            cleared_at: Some(Instant::now()),
            ..Idle::default()
        };
    }

    /// Keeps a connection for the next client with the same key: the newest of its key are
    /// reused first; past `max_idle_total`, the one idle longest, of any key, makes room.
    /// `born` is when the server TLS rules its login followed were read.
    pub fn checkin(&self, key: String, session: BackendSession, born: Instant) {
        if self.max_idle_per_key == 0 || self.max_idle_total == 0 || born.elapsed() >= self.lifetime
        {
            return;
        }
        let mut idle = self.idle.lock().expect("pool lock poisoned");
        if idle.cleared_at.is_some_and(|cleared| born <= cleared) {
            return;
        }
        if idle
            .by_key
            .get(&key)
            .is_some_and(|connections| connections.len() >= self.max_idle_per_key)
        {
            return;
        }
        if idle.count >= self.max_idle_total {
            idle.evict_longest_idle();
        }
        idle.by_key.entry(key).or_default().push(Pooled {
            session,
            born,
            idle_since: Instant::now(),
        });
        idle.count += 1;
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
