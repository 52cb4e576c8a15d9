//! Cancel requests. Each client gets a key pair of the proxy's own; a CancelRequest bearing
//! it is forwarded, with the server's real key, to the server that runs the client's session.
//! Server keys never reach clients. In transaction pooling a client's key stays the same while
//! the server session behind it changes, and points nowhere between transactions.

use crate::backend::ServerAddress;
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

#[derive(Clone)]
struct ServerKey {
    address: ServerAddress,
    pid: i32,
    secret: i32,
}

#[derive(Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<(i32, i32), Option<ServerKey>>>,
}

/// Removes its key from the registry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: (i32, i32),
}

impl Registration {
    /// The server session the client's cancel requests go to from now on; `None` while it has
    /// none (a cancel request then has nothing to stop).
    pub fn retarget(&self, server: Option<(ServerAddress, (i32, i32))>) {
        if let Some(entry) = self
            .registry
            .keys
            .lock()
            .expect("cancel registry poisoned")
            .get_mut(&self.key)
        {
            *entry = server.map(|(address, key)| ServerKey::new(address, key));
        }
    }
}

impl ServerKey {
    fn new(address: ServerAddress, (pid, secret): (i32, i32)) -> ServerKey {
        ServerKey {
            address,
            pid,
            secret,
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .keys
            .lock()
            .expect("cancel registry poisoned")
            .remove(&self.key);
    }
}

impl CancelRegistry {
    pub fn register(
        self: &Arc<Self>,
        address: ServerAddress,
        server_key: (i32, i32),
    ) -> Registration {
        let mut keys = self.keys.lock().expect("cancel registry poisoned");
        let mut rng = rand::thread_rng();
        let key = loop {
            let candidate = (rng.gen_range(1..i32::MAX), rng.gen::<i32>());
            if !keys.contains_key(&candidate) {
                break candidate;
            }
        };
        keys.insert(key, Some(ServerKey::new(address, server_key)));
        Registration {
            registry: Arc::clone(self),
            key,
        }
    }

    /// Forwards a client's cancel request; unknown keys are ignored, as PostgreSQL does.
    pub async fn forward(&self, pid: i32, secret: i32) {
        let target = self
            .keys
            .lock()
            .expect("cancel registry poisoned")
            .get(&(pid, secret))
            .cloned()
            .flatten();
        let Some(target) = target else {
            tracing::debug!(
                "cancel request ignored: unknown key, or a client between transactions"
            );
            return;
        };
        let mut packet = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(
            target.pid,
            target.secret,
            &mut packet,
        );
        let sent = match &target.address {
            ServerAddress::Tcp(address) => match tokio::net::TcpStream::connect(address).await {
                Ok(mut stream) => stream.write_all(&packet).await,
                Err(error) => Err(error),
            },
            ServerAddress::Unix(path) => match tokio::net::UnixStream::connect(path).await {
                Ok(mut stream) => stream.write_all(&packet).await,
                Err(error) => Err(error),
            },
        };
        if let Err(error) = sent {
            tracing::warn!(%error, "could not forward a cancel request");
        }
    }
}
