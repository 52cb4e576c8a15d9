//! The kernel relay: a long-lived session's bytes passed between client and server by the
//! kernel (a sockmap and the eBPF program in `bpf/kernel_relay.bpf.c`), without waking the
//! proxy for each message.
//!
//! Relaying in user space costs two wake-ups, two reads and two writes per round trip; on a
//! machine the proxy shares with the database that costs about four in ten of the
//! transactions a client would get directly. In the kernel a message crosses from one socket
//! to the other in the receiving softirq and a kernel worker.
//!
//! What the proxy gives up for such a session: it no longer follows the session's messages,
//! so the server connection closes with the client rather than going back to the pool. That
//! is why only sessions that have lasted `[limits] kernel_relay_after_ms` are handed over:
//! a client that connects for one transaction keeps its pooled, already logged-in server.
//!
//! The hand-over keeps the byte order of both directions. It happens at a quiet point: every
//! request answered, the server idle, and its last answer (ending with ReadyForQuery) read
//! but not yet passed on, so the client waits and sends nothing (see `relay.rs`). The held
//! answer is written first; then each socket, the server's and then the client's, is armed
//! (what arrives on it from then on is relayed by the kernel) and checked for bytes that
//! arrived before. Bytes found call the hand-over off (`Handover::Declined`): the proxy
//! relays them, and what follows, itself until the next quiet point, where the caller may try
//! again. Only if the kernel had also relayed bytes after them, which would then be out of
//! order, is the session closed (`Handover::Broken`).

use crate::backend::ServerStream;
use crate::cookies::incoming_cookie;
use crate::frontend::ClientStream;
use crate::hang_ups::HangUps;
use crate::metrics::Metrics;
use crate::relay::write_out;
use aya::maps::{Array, HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use nix::sys::socket::{recv, MsgFlags};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// After a hang-up, how long the surviving socket stays open: a kernel worker may still be
/// passing it the last bytes relayed (a server's FATAL error before it closed), which
/// closing it would drop.
const LAST_BYTES_GRACE: Duration = Duration::from_millis(20);

/// A hand-over that cannot start is logged at most this often: one cause (every slot taken,
/// a kernel without sock_diag for Unix sockets) would otherwise log a line for every session.
const UNAVAILABLE_WARNING_INTERVAL: Duration = Duration::from_secs(60);

pub struct KernelRelay {
    maps: Mutex<Maps>,
    /// Free indexes into `REDIRECTED`, the longest free first. A slot released goes to the
    /// back: on a server's Unix socket the verdict runs outside the socket's lock, so one
    /// still counting when its session ends must not count into the next session's bytes.
    free_slots: Mutex<VecDeque<u32>>,
    hang_ups: Arc<HangUps>,
    /// When a hand-over that could not start was last logged, and how many did not start
    /// since.
    unavailable: Mutex<(Option<Instant>, u64)>,
    /// Keeps the program loaded and attached to `PEERS`.
    _ebpf: Ebpf,
}

struct Maps {
    peers: SockHash<MapData, u64>,
    armed: HashMap<MapData, u64, u32>,
    redirected: Array<MapData, u64>,
}

/// How a hand-over went.
pub enum Handover {
    /// The kernel relays the session until `KernelRelay::wait` returns.
    Relayed(RelayedSession),
    /// The held answer (and any server bytes after it) is written, and the proxy relays the
    /// session from here, starting with `from_client`.
    Declined {
        from_client: Vec<u8>,
        /// The sockets are (or, after a pairing that failed half way, one may be) paired in
        /// PEERS, where they stay until they close: taking a socket out would drop what the
        /// kernel queued on it for the proxy, and a socket cannot be put in twice. Such a
        /// server connection is never pooled, and the next hand-over skips the pairing.
        paired: bool,
        /// False when trying again would fail again, or after the server sent something
        /// nobody asked for (which the proxy's view of the session may not follow).
        try_again: bool,
    },
    /// Bytes arrived both before and after a socket was armed: their order can no longer be
    /// kept, and the session must close.
    Broken,
}

/// One side of a session as the kernel relay holds it.
struct Side {
    socket: OwnedFd,
    /// What the eBPF program finds the socket by (`incoming_cookie`).
    cookie: u64,
    slot: u32,
}

/// A session the kernel relays: its sockets, until either side hangs up.
pub struct RelayedSession {
    client: Side,
    server: Side,
    hung_up: oneshot::Receiver<()>,
}

impl KernelRelay {
    /// Loads the eBPF program and its maps. Fails without the privileges to do so (CAP_BPF
    /// and CAP_NET_ADMIN) or on a kernel without sockmap verdict programs.
    pub fn load() -> Result<KernelRelay, String> {
        // Without the kernel's BTF type information, which the program does not use and
        // which would cost the proxy 15 MB of memory to parse.
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/kernel_relay.bpf.o"
            )))
            .map_err(|error| format!("loading the eBPF maps: {error}"))?;
        let map = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| format!("the eBPF object has no map {name}"))
        };
        let peers = SockHash::try_from(map(&mut ebpf, "PEERS")?)
            .map_err(|error| format!("the PEERS map: {error}"))?;
        let armed = HashMap::try_from(map(&mut ebpf, "ARMED")?)
            .map_err(|error| format!("the ARMED map: {error}"))?;
        let redirected: Array<MapData, u64> = Array::try_from(map(&mut ebpf, "REDIRECTED")?)
            .map_err(|error| format!("the REDIRECTED map: {error}"))?;
        let program: &mut SkSkb = ebpf
            .program_mut("relay")
            .ok_or("the eBPF object has no program \"relay\"")?
            .try_into()
            .map_err(|error| format!("the relay program: {error}"))?;
        program
            .load()
            .map_err(|error| format!("loading the relay program: {error}"))?;
        program
            .attach(peers.fd())
            .map_err(|error| format!("attaching the relay program: {error}"))?;
        let slots = redirected.len();
        Ok(KernelRelay {
            maps: Mutex::new(Maps {
                peers,
                armed,
                redirected,
            }),
            free_slots: Mutex::new((0..slots).collect()),
            hang_ups: HangUps::start()?,
            unavailable: Mutex::new((None, 0)),
            _ebpf: ebpf,
        })
    }

    /// Hands a session over at a quiet point (see the module's comment). `held` is the
    /// server's last answer, not yet written to the client; it is written first. `paired`:
    /// an earlier hand-over of this session paired its sockets (`Handover::Declined`). On
    /// `Relayed` the caller drops its streams: the relay holds duplicates of the sockets.
    pub async fn hand_over(
        &self,
        client: &mut Box<dyn ClientStream>,
        server: &ServerStream,
        paired: bool,
        held: &[u8],
        metrics: &Metrics,
    ) -> std::io::Result<Handover> {
        write_out(client, held).await?;
        Metrics::count(&metrics.bytes_to_client, held.len() as u64);
        let (client_side, server_side) = match self.sides(client.as_ref(), server) {
            Ok(sides) => sides,
            Err(error) => return Ok(self.stays_in_user_space(&error, false, metrics)),
        };
        if !paired {
            if let Err(error) = self.pair(&client_side, &server_side) {
                self.release(&client_side, &server_side);
                // One of the two sockets may be paired already.
                return Ok(self.stays_in_user_space(&error, true, metrics));
            }
        }
        match self.arm_and_check(&client_side, &server_side) {
            Ok(true) => {}
            Ok(false) => {
                return self
                    .call_off(client_side, server_side, client, true, metrics)
                    .await
            }
            Err(error) => {
                tracing::warn!(%error, "could not arm a session's sockets for the kernel relay");
                return self
                    .call_off(client_side, server_side, client, false, metrics)
                    .await;
            }
        }
        match self
            .hang_ups
            .watch(&client_side.socket, &server_side.socket)
        {
            Ok(hung_up) => {
                Metrics::count(&metrics.kernel_relayed_sessions, 1);
                metrics.kernel_relay_active.fetch_add(1, Ordering::Relaxed);
                Ok(Handover::Relayed(RelayedSession {
                    client: client_side,
                    server: server_side,
                    hung_up,
                }))
            }
            // Armed, the kernel may have relayed bytes already: there is no going back.
            Err(error) => {
                self.disarm(&client_side, &server_side);
                self.release(&client_side, &server_side);
                Err(error)
            }
        }
    }

    /// Waits until either side of a relayed session hangs up, then closes both and counts
    /// the bytes the kernel relayed.
    pub async fn wait(&self, session: RelayedSession, metrics: &Metrics) {
        let RelayedSession {
            client,
            server,
            hung_up,
        } = session;
        // A closed channel (the watcher stopped) ends the session too.
        let _ = hung_up.await;
        tokio::time::sleep(LAST_BYTES_GRACE).await;
        self.disarm(&client, &server);
        // Peeking takes each socket's lock: a verdict on a TCP socket that found it armed has
        // finished counting before the slots go back (see `free_slots` for Unix sockets).
        for side in [&client, &server] {
            let _ = has_unread_bytes(&side.socket);
        }
        Metrics::count(&metrics.bytes_to_server, self.relayed_bytes(&client));
        Metrics::count(&metrics.bytes_to_client, self.relayed_bytes(&server));
        self.release(&client, &server);
        metrics.kernel_relay_active.fetch_sub(1, Ordering::Relaxed);
    }

    /// Both sockets duplicated, with their cookies and two slots whose counts are zeroed.
    fn sides(
        &self,
        client: &dyn ClientStream,
        server: &ServerStream,
    ) -> std::io::Result<(Side, Side)> {
        let not_plain = || std::io::Error::other("not a plain socket");
        let client = client.plain_tcp_socket().ok_or_else(not_plain)?;
        let server = server.plain_socket().ok_or_else(not_plain)?;
        let (client, server) = (client.try_clone_to_owned()?, server.try_clone_to_owned()?);
        let (client_cookie, server_cookie) = (incoming_cookie(&client)?, incoming_cookie(&server)?);
        let (client_slot, server_slot) = self
            .take_slots()
            .ok_or_else(|| std::io::Error::other("every kernel relay slot is taken"))?;
        let sides = (
            Side {
                socket: client,
                cookie: client_cookie,
                slot: client_slot,
            },
            Side {
                socket: server,
                cookie: server_cookie,
                slot: server_slot,
            },
        );
        // A slot's count may still hold its last session's bytes.
        let mut maps = self.maps();
        for slot in [client_slot, server_slot] {
            if let Err(error) = maps.redirected.set(slot, 0, 0) {
                drop(maps);
                self.release(&sides.0, &sides.1);
                return Err(std::io::Error::other(error));
            }
        }
        Ok(sides)
    }

    /// Puts each socket in PEERS under the other's cookie: from here the eBPF program sees
    /// what arrives on them, and passes it to the proxy until they are armed.
    fn pair(&self, client: &Side, server: &Side) -> std::io::Result<()> {
        let mut maps = self.maps();
        for (side, other) in [(client, server), (server, client)] {
            maps.peers
                .insert(side.cookie, other.socket.as_raw_fd(), 0)
                .map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Arms the server's socket, then the client's, each checked right after for bytes that
    /// reached the proxy before it was armed. True when both are armed and none had.
    ///
    /// Peeking takes the socket's lock, so on a TCP socket a verdict that found it unarmed has
    /// queued its bytes for the proxy by then. A Unix socket's verdict runs outside that lock:
    /// that is why only a server's Unix socket is taken, since an idle server sends nothing
    /// while it is armed (and client bytes reach it only after it is).
    fn arm_and_check(&self, client: &Side, server: &Side) -> std::io::Result<bool> {
        for side in [server, client] {
            self.maps()
                .armed
                .insert(side.cookie, side.slot, 0)
                .map_err(std::io::Error::other)?;
            if has_unread_bytes(&side.socket)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A hand-over that cannot start: counted, logged at most once a minute, and the
    /// session goes on in user space.
    fn stays_in_user_space(
        &self,
        reason: &dyn std::fmt::Display,
        paired: bool,
        metrics: &Metrics,
    ) -> Handover {
        Metrics::count(&metrics.kernel_relay_declined, 1);
        let mut unavailable = self
            .unavailable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (last_warning, since) = &mut *unavailable;
        if last_warning.is_none_or(|at| at.elapsed() >= UNAVAILABLE_WARNING_INTERVAL) {
            tracing::warn!(%reason, also_since_last_warning = *since, "a session stays relayed in user space");
            (*last_warning, *since) = (Some(Instant::now()), 0);
        } else {
            *since += 1;
        }
        Handover::Declined {
            from_client: Vec::new(),
            paired,
            try_again: false,
        }
    }

    /// Disarms both sockets and reads (up to 16 KiB each) what reached the proxy: the
    /// server's bytes are written to the client, the client's returned to be relayed. Unless
    /// the kernel relayed anything meanwhile: what the proxy holds came first but would go
    /// after, and the session is `Broken`.
    async fn call_off(
        &self,
        client_side: Side,
        server_side: Side,
        client: &mut Box<dyn ClientStream>,
        try_again: bool,
        metrics: &Metrics,
    ) -> std::io::Result<Handover> {
        Metrics::count(&metrics.kernel_relay_declined, 1);
        self.disarm(&client_side, &server_side);
        // Reading takes each socket's lock, so every verdict that found a TCP socket armed has
        // finished counting by the time the counts are read. (A server's Unix socket may
        // still be counting, but a server answers only what the client's TCP socket, counted
        // exactly, relayed.) What is not read now stays queued for the proxy, in order, after
        // what is.
        let from_client = read_available(&client_side.socket);
        let from_server = read_available(&server_side.socket);
        let relayed = self.relayed_bytes(&client_side) + self.relayed_bytes(&server_side);
        self.release(&client_side, &server_side);
        let (from_client, from_server) = (from_client?, from_server?);
        if relayed > 0 {
            return Ok(Handover::Broken);
        }
        write_out(client, &from_server).await?;
        Metrics::count(&metrics.bytes_to_client, from_server.len() as u64);
        Ok(Handover::Declined {
            from_client,
            paired: true,
            try_again: try_again && from_server.is_empty(),
        })
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_slots(&self) -> Option<(u32, u32)> {
        let mut free = self
            .free_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if free.len() < 2 {
            return None;
        }
        Some((free.pop_front()?, free.pop_front()?))
    }

    /// Disarms both sockets: what arrives from then on is the proxy's to read.
    fn disarm(&self, client: &Side, server: &Side) {
        let mut maps = self.maps();
        for side in [client, server] {
            // Absent when it was never armed.
            let _ = maps.armed.remove(&side.cookie);
        }
    }

    fn relayed_bytes(&self, side: &Side) -> u64 {
        self.maps().redirected.get(&side.slot, 0).unwrap_or(0)
    }

    fn release(&self, client: &Side, server: &Side) {
        self.free_slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend([client.slot, server.slot]);
    }
}

impl Drop for KernelRelay {
    fn drop(&mut self) {
        // The relay goes with the proxy (or the test) that started it; so does its thread.
        self.hang_ups.stop();
    }
}

/// Whether the proxy has bytes to read on a socket (or its end), without taking them.
fn has_unread_bytes(socket: &OwnedFd) -> std::io::Result<bool> {
    let mut probe = [0u8; 1];
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_PEEK;
    match recv(socket.as_raw_fd(), &mut probe, flags) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// One read, without waiting, of what the proxy can read on a socket now (at most 16 KiB;
/// the rest stays queued).
fn read_available(socket: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match recv(socket.as_raw_fd(), &mut buffer, MsgFlags::MSG_DONTWAIT) {
            Ok(read) => {
                buffer.truncate(read);
                return Ok(buffer);
            }
            Err(nix::errno::Errno::EAGAIN) => return Ok(Vec::new()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
}
