//! Cancel requests. Each client gets a key pair of the proxy's own; a CancelRequest bearing
//! it is forwarded, with the server's real key, to the server that runs the client's session.
//! Server keys never reach clients. In transaction pooling a client's key stays the same while
//! the server session behind it changes, and points nowhere between transactions.

use crate::backend::ServerAddress;
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Clone)]
struct ServerKey {
    address: ServerAddress,
    pid: i32,
    secret: i32,
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

struct Entry {
    server: Option<ServerKey>,
    /// Held while a cancel request is delivered, and to retarget: a server session is not
    /// handed to another client while a cancel meant for this one can still reach it.
    gate: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    keys: Mutex<HashMap<(i32, i32), Entry>>,
}

/// Removes its key from the registry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub key: (i32, i32),
}

impl Registration {
    /// The server session the client's cancel requests go to from now on; `None` while it has
    /// none (a cancel request then has nothing to stop). Waits for a cancel request being
    /// delivered to the previous one.
    pub async fn retarget(&self, server: Option<(ServerAddress, (i32, i32))>) {
        let Some(gate) = self.registry.gate(self.key) else {
            return;
        };
        let _delivered = gate.lock().await;
        if let Some(entry) = self.registry.lock().get_mut(&self.key) {
            entry.server = server.map(|(address, key)| ServerKey::new(address, key));
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.key);
    }
}

/// How long a server may take to confirm a cancel request by closing the connection.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i32, i32), Entry>> {
        self.keys.lock().expect("cancel registry poisoned")
    }

    fn gate(&self, key: (i32, i32)) -> Option<Arc<tokio::sync::Mutex<()>>> {
        self.lock().get(&key).map(|entry| Arc::clone(&entry.gate))
    }

    pub fn register(
        self: &Arc<Self>,
        address: ServerAddress,
        server_key: (i32, i32),
    ) -> Registration {
        let mut keys = self.lock();
        let mut rng = rand::thread_rng();
        let key = loop {
            let candidate = (rng.gen_range(1..i32::MAX), rng.gen::<i32>());
            if !keys.contains_key(&candidate) {
                break candidate;
            }
        };
        keys.insert(
            key,
            Entry {
                server: Some(ServerKey::new(address, server_key)),
                gate: Arc::default(),
            },
        );
        Registration {
            registry: Arc::clone(self),
            key,
        }
    }

    /// Forwards a client's cancel request; unknown keys are ignored, as PostgreSQL does.
    pub async fn forward(&self, pid: i32, secret: i32) {
        let Some(gate) = self.gate((pid, secret)) else {
            tracing::debug!("cancel request with an unknown key ignored");
            return;
        };
        let _delivering = gate.lock().await;
        let target = self
            .lock()
            .get(&(pid, secret))
            .and_then(|entry| entry.server.clone());
        let Some(target) = target else {
            tracing::debug!("cancel request for a client between transactions ignored");
            return;
        };
        let mut packet = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(
            target.pid,
            target.secret,
            &mut packet,
        );
        let delivered = tokio::time::timeout(DELIVERY_TIMEOUT, async {
            match &target.address {
                ServerAddress::Tcp(address) => {
                    deliver(tokio::net::TcpStream::connect(address).await?, &packet).await
                }
                ServerAddress::Unix(path) => {
                    deliver(tokio::net::UnixStream::connect(path).await?, &packet).await
                }
            }
        })
        .await;
        match delivered {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not forward a cancel request"),
            Err(_) => tracing::warn!("the server did not confirm a cancel request in time"),
        }
    }
}

/// Sends the request and waits for the server to close the connection, which it does once it
/// has signalled the session (libpq's `PQcancel` waits the same way).
async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    packet: &[u8],
) -> std::io::Result<()> {
    stream.write_all(packet).await?;
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).await? > 0 {}
    Ok(())
}
