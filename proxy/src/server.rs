//! Listeners, client sessions, shutdown and reload.
//!
//! Each accepted client becomes a task: identify it, read its startup packet, find its
//! route, log in to the server through `login`, show the client the server's greeting with
//! the proxy's own cancel key, then relay bytes both ways until either side closes. On a
//! transaction-mode route the client holds a server session only from the start of each
//! transaction to its end, and the route's slots bound how many it lends at once.
//! A semaphore caps clients. On shutdown the listeners stop and sessions are given a drain
//! timeout.

use crate::backend::{BackendSession, ConnectSettings};
use crate::cancel::CancelRegistry;
use crate::config::{Config, PoolMode, Route, ServerSslMode, ServerTls};
use crate::credentials::CredentialCache;
use crate::error::{OneLine, ProxyError};
use crate::frontend::{self, ClientStream, Opening};
use crate::kernel_relay::{Handover, KernelRelay};
use crate::login::{self, LoginSettings};
use crate::metrics::Metrics;
use crate::pending::PendingLogins;
use crate::pool::Pool;
use crate::relay::{self, Ended, Relay, Until};
use crate::scram::ScramCache;
use bytes::BufMut;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Who a client is, established without a password.
#[derive(Debug, Clone)]
pub enum Identity {
    /// A TCP client on a loopback address (or anywhere, when explicitly allowed).
    Trust(SocketAddr),
    /// A Unix-socket client, by its OS user (SO_PEERCRED).
    Peer(String),
    /// A TCP client from elsewhere with no way to prove who it is.
    Unknown(SocketAddr),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Trust(address) => write!(f, "trusted client {address}"),
            Identity::Peer(user) => write!(f, "peer user \"{user}\""),
            Identity::Unknown(address) => write!(f, "unauthenticated client {address}"),
        }
    }
}

impl Identity {
    /// Where the client comes from, as `[limits] max_pending_logins_per_source` counts it:
    /// its IPv4 address (not the port, which each connection changes), its IPv6 /64 (one host
    /// commonly holds a whole one), or its OS user.
    fn source(&self) -> String {
        match self {
            Identity::Trust(address) | Identity::Unknown(address) => {
                match address.ip().to_canonical() {
                    std::net::IpAddr::V4(address) => address.to_string(),
                    std::net::IpAddr::V6(address) => {
                        let [a, b, c, d, ..] = address.segments();
                        format!("{a:x}:{b:x}:{c:x}:{d:x}::/64")
                    }
                }
            }
            Identity::Peer(user) => format!("peer user \"{user}\""),
        }
    }

    /// Whether the route lets this client in, by its transport identity or by the common name
    /// of the TLS client certificate it presented.
    fn allowed_on(&self, certificate: Option<&str>, route: &Route) -> bool {
        route.allow.iter().any(|entry| {
            let by_transport = match self {
                Identity::Trust(_) => entry == "trust",
                Identity::Peer(user) => {
                    entry == "peer:*" || entry.strip_prefix("peer:") == Some(user.as_str())
                }
                Identity::Unknown(_) => false,
            };
            let by_certificate = certificate
                .is_some_and(|name| entry == "cert:*" || entry.strip_prefix("cert:") == Some(name));
            by_transport || by_certificate
        })
    }
}

/// What logins to route servers follow from `[server_tls]`. A reload swaps them as one, and a
/// login reads them as one (see `LoginSettings::rules_read_at`).
#[derive(Clone)]
struct ServerTlsRules {
    /// `None` for plaintext.
    connector: Option<TlsConnector>,
    /// `verify-full`.
    verify_servers: bool,
}

impl ServerTlsRules {
    fn new(tls: &ServerTls) -> Result<ServerTlsRules, String> {
        Ok(ServerTlsRules {
            connector: crate::tls::server_connector(tls)?,
            verify_servers: tls.sslmode == ServerSslMode::VerifyFull,
        })
    }
}

pub struct Shared {
    config: RwLock<Arc<Config>>,
    tls: RwLock<Option<TlsAcceptor>>,
    server_tls: RwLock<ServerTlsRules>,
    scram: ScramCache,
    credentials: Arc<CredentialCache>,
    cancels: Arc<CancelRegistry>,
    pool: Pool,
    pending_logins: PendingLogins,
    /// Loaded at start when `[limits] kernel_relay` is on and the kernel lets the proxy.
    kernel_relay: Option<KernelRelay>,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    fn config(&self) -> Arc<Config> {
        Arc::clone(&self.config.read().expect("config lock poisoned"))
    }
}

pub struct Proxy {
    shared: Arc<Shared>,
    tcp: Option<TcpListener>,
    unix: Option<(UnixListener, PathBuf)>,
    admin: Option<TcpListener>,
    /// The configuration file SIGHUP reloads, and the signal's stream: registered before the
    /// listeners are bound, so that a SIGHUP sent once the proxy answers is never the default
    /// action, which would end the process.
    reload: Option<(PathBuf, Signal)>,
}

impl Proxy {
    /// Reads what `bind` reads besides its sockets (the store's password file, every TLS
    /// certificate, key and CA), for `check-config`: a file it passes does not fail at start
    /// on a missing or unreadable file.
    pub fn check_files(config: &Config) -> Result<(), String> {
        config.store_password()?;
        config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        crate::tls::server_connector(&config.server_tls)?;
        crate::tls::store_connector(&config.store)?;
        Ok(())
    }

    /// Binds every listener the configuration names; nothing is served until `serve`.
    pub async fn bind(config: Config, config_path: Option<PathBuf>) -> Result<Proxy, String> {
        let reload = match config_path {
            Some(path) => Some((
                path,
                signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?,
            )),
            None => None,
        };
        let store_password = config.store_password()?;
        let metrics = Arc::new(Metrics::default());
        let credentials = CredentialCache::new(
            config.store.clone(),
            store_password,
            Duration::from_secs(config.limits.credential_ttl_secs),
            Duration::from_secs(config.limits.stale_credential_secs),
            Arc::clone(&metrics),
        )?;
        let tcp = match config.listen.tcp {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|e| format!("cannot listen on {address}: {e}"))?,
            ),
            None => None,
        };
        let unix = match &config.listen.unix_dir {
            Some(dir) => {
                let port = match &tcp {
                    Some(listener) => listener.local_addr().map_err(|e| e.to_string())?.port(),
                    None => config.listen.unix_port.expect("validated"),
                };
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path)
                    .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
                let mode = config.listen.unix_socket_mode;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
                Some((listener, path))
            }
            None => None,
        };
        let admin = match config.listen.admin {
            Some(address) => Some(
                TcpListener::bind(address)
                    .await
                    .map_err(|e| format!("cannot listen on {address}: {e}"))?,
            ),
            None => None,
        };
        let pool = Pool::new(
            Duration::from_secs(config.limits.server_lifetime_secs),
            config.limits.pool_max_idle,
            config.limits.pool_max_idle_total,
        );
        let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
        let server_tls = ServerTlsRules::new(&config.server_tls)?;
        let kernel_relay = config.limits.kernel_relay.then(load_kernel_relay).flatten();
        metrics
            .kernel_relay_available
            .store(kernel_relay.is_some().into(), Ordering::Relaxed);
        let shared = Arc::new(Shared {
            tls: RwLock::new(tls),
            server_tls: RwLock::new(server_tls),
            scram: ScramCache::new(Arc::clone(&metrics)),
            pool,
            config: RwLock::new(Arc::new(config)),
            credentials,
            cancels: Arc::new(CancelRegistry::default()),
            pending_logins: PendingLogins::default(),
            kernel_relay,
            metrics,
        });
        Ok(Proxy {
            shared,
            tcp,
            unix,
            admin,
            reload,
        })
    }

    pub fn tcp_address(&self) -> Option<SocketAddr> {
        self.tcp
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    pub fn unix_path(&self) -> Option<PathBuf> {
        self.unix.as_ref().map(|(_, path)| path.clone())
    }

    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|listener| listener.local_addr().ok())
    }

    /// Serves until `shutdown` turns true, then stops accepting and lets sessions finish
    /// for up to the drain timeout.
    pub async fn serve(self, mut shutdown: watch::Receiver<bool>) {
        let config = self.shared.config();
        let permits = Arc::new(Semaphore::new(config.limits.max_clients));
        let listener_task = self.shared.credentials.spawn_listener();
        let mut tasks = Vec::new();
        if let Some(listener) = self.tcp {
            tasks.push(tokio::spawn(accept_clients(
                ClientListener::Tcp(listener),
                Arc::clone(&self.shared),
                Arc::clone(&permits),
                shutdown.clone(),
            )));
        }
        let unix_path = self.unix.as_ref().map(|(_, path)| path.clone());
        if let Some((listener, _)) = self.unix {
            tasks.push(tokio::spawn(accept_clients(
                ClientListener::Unix(listener),
                Arc::clone(&self.shared),
                Arc::clone(&permits),
                shutdown.clone(),
            )));
        }
        if let Some(listener) = self.admin {
            tasks.push(tokio::spawn(serve_admin(
                listener,
                Arc::clone(&self.shared),
            )));
        }
        if let Some((path, hangups)) = self.reload {
            tasks.push(tokio::spawn(reload_on_sighup(
                path,
                hangups,
                Arc::clone(&self.shared),
            )));
        }
        let _ = shutdown.wait_for(|stop| *stop).await;
        for task in &tasks {
            task.abort();
        }
        listener_task.abort();
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        let drain = Duration::from_secs(config.limits.drain_timeout_secs);
        let all = config.limits.max_clients as u32;
        if tokio::time::timeout(drain, permits.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; closing the remaining sessions");
        }
    }
}

fn load_kernel_relay() -> Option<KernelRelay> {
    match KernelRelay::load() {
        Ok(kernel_relay) => {
            tracing::info!("long-lived sessions will be relayed in the kernel");
            Some(kernel_relay)
        }
        Err(error) => {
            tracing::warn!(%error, "the kernel relay is unavailable; every session is relayed in user space");
            None
        }
    }
}

enum ClientListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// How long a Unix-socket client's OS user name is looked up for.
const PEER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Who a client is, as the accept loop knows it: a Unix-socket client's user name is looked up
/// afterwards, in the client's own task, since the lookup (NSS: LDAP, sssd) can block, and
/// in the accept loop it would hold every other client up.
enum Accepted {
    Known(Identity),
    PeerUid(Option<u32>),
}

impl Accepted {
    async fn identity(self) -> Identity {
        let uid = match self {
            Accepted::Known(identity) => return identity,
            Accepted::PeerUid(uid) => uid,
        };
        let Some(uid) = uid else {
            return Identity::Peer("?".into());
        };
        let lookup = tokio::task::spawn_blocking(move || {
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|user| user.name)
        });
        // A lookup that hangs (an unreachable directory server) leaves its thread behind,
        // but not the client: it gets the identity of a uid without a name.
        let name = match tokio::time::timeout(PEER_LOOKUP_TIMEOUT, lookup).await {
            Ok(found) => found.ok().flatten(),
            Err(_) => {
                tracing::warn!(
                    uid,
                    "the OS user name of a Unix-socket client was not found in time"
                );
                None
            }
        };
        Identity::Peer(name.unwrap_or_else(|| "?".into()))
    }
}

impl ClientListener {
    /// The next client and who it is.
    async fn accept(&self, shared: &Shared) -> std::io::Result<(Box<dyn ClientStream>, Accepted)> {
        match self {
            ClientListener::Tcp(listener) => {
                let (stream, address) = listener.accept().await?;
                stream.set_nodelay(true).ok();
                // On a dual-stack listener an IPv4 client comes as ::ffff:a.b.c.d.
                let trusted = address.ip().to_canonical().is_loopback()
                    || shared.config().listen.allow_trust_from_non_loopback;
                let identity = if trusted {
                    Identity::Trust(address)
                } else {
                    Identity::Unknown(address)
                };
                Ok((Box::new(stream), Accepted::Known(identity)))
            }
            ClientListener::Unix(listener) => {
                let (stream, _) = listener.accept().await?;
                let uid = stream.peer_cred().ok().map(|cred| cred.uid());
                Ok((Box::new(stream), Accepted::PeerUid(uid)))
            }
        }
    }
}

/// After a failed accept (out of file descriptors and the like): a warning and a pause, so
/// the loop does not spin on an error that persists.
async fn back_off_after_accept(error: &std::io::Error, listener: &str) {
    tracing::warn!(%error, listener, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn accept_clients(
    listener: ClientListener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
            return;
        };
        let (stream, accepted) = match listener.accept(&shared).await {
            Ok(accepted) => accepted,
            Err(error) => {
                back_off_after_accept(&error, "clients").await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let identity = accepted.identity().await;
            serve_client(stream, identity, shared, shutdown).await;
            drop(permit);
        });
    }
}

async fn serve_client(
    mut client: Box<dyn ClientStream>,
    identity: Identity,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    shared.metrics.connections.fetch_add(1, Ordering::Relaxed);
    shared.metrics.active.fetch_add(1, Ordering::Relaxed);
    let result = session(&mut client, &identity, &shared, shutdown).await;
    shared.metrics.active.fetch_sub(1, Ordering::Relaxed);
    if let Err(error) = result {
        shared
            .metrics
            .rejected_clients
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(%identity, error = %OneLine(&error), sqlstate = error.sqlstate(), "client refused");
        frontend::send_error(&mut client, &error).await;
        // Closing with unread bytes from the client would reset the connection, and a reset
        // can destroy the error message before the client reads it: say goodbye first, then
        // drain briefly.
        let _ = client.shutdown().await;
        let mut sink = [0u8; 4096];
        let drain = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_millis(200), drain).await;
    }
}

async fn session(
    client: &mut Box<dyn ClientStream>,
    identity: &Identity,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    let tls = shared.tls.read().expect("tls lock poisoned").clone();
    let limits = shared.config().limits.clone();
    let pending = match shared
        .pending_logins
        .enter(identity.source(), limits.max_pending_logins_per_source)
    {
        Ok(pending) => pending,
        Err(refusal) => {
            // As PostgreSQL says "too many clients": once the client has sent its startup
            // packet, its SSLRequest answered (with TLS, when the proxy has it). Sent before,
            // the refusal reaches libpq as a broken encryption exchange.
            let opening = frontend::read_opening(client, tls.as_ref());
            let _ = tokio::time::timeout(Duration::from_millis(500), opening).await;
            return Err(refusal);
        }
    };
    let login_timeout = limits.client_login_timeout_ms;
    let opening = frontend::read_opening(client, tls.as_ref());
    let (opening, transport) = tokio::time::timeout(Duration::from_millis(login_timeout), opening)
        .await
        .map_err(|_| ProxyError::LoginTimeout(login_timeout))??;
    drop(pending);
    let startup = match opening {
        Opening::Cancel { pid, secret } => {
            shared.cancels.forward(pid, secret).await;
            return Ok(());
        }
        Opening::Startup(startup) => startup,
    };
    if *shutdown.borrow() {
        return Err(ProxyError::ShuttingDown);
    }
    if let Some(negotiation) = startup.negotiation() {
        client.write_all(&negotiation).await.map_err(client_gone)?;
    }
    let parameters = startup.parameters;
    let user = parameters.get("user").cloned().unwrap_or_default();
    let database = parameters
        .get("database")
        .cloned()
        .unwrap_or_else(|| user.clone());
    let config = shared.config();
    let local = matches!(identity, Identity::Peer(_));
    if config.tls.as_ref().is_some_and(|tls| tls.require) && !transport.encrypted && !local {
        return Err(ProxyError::TlsRequired);
    }
    let route = config
        .route(&database, &user)
        .ok_or_else(|| ProxyError::UnknownRoute {
            database: database.clone(),
            user: user.clone(),
        })?;
    let certificate = transport.certificate_name.as_deref();
    // Who the client is, as the log and a refusal name it. A verified certificate names a
    // TCP client from elsewhere, which is no longer unauthenticated then.
    let client_named = match (certificate, &identity) {
        (Some(name), Identity::Unknown(address)) => {
            format!("client {address} with certificate {name:?}")
        }
        (Some(name), _) => format!("{identity} with certificate {name:?}"),
        (None, _) => identity.to_string(),
    };
    if !identity.allowed_on(certificate, route) {
        return Err(ProxyError::NotAllowed {
            identity: client_named,
            database,
        });
    }
    let shared_parameters;
    let parameters = match route.pool_mode {
        PoolMode::Session => &parameters,
        PoolMode::Transaction => {
            shared_parameters = crate::pool::shared_session_parameters(&parameters);
            &shared_parameters
        }
    };
    let wanted = Wanted {
        route,
        parameters,
        database: &database,
        config: &config,
    };
    // In transaction mode the login holds one of the route's slots too, so that a thousand
    // clients connecting at once do not open a thousand server sessions.
    let slots = (route.pool_mode == PoolMode::Transaction).then(|| shared.pool.route_slots(route));
    let login_slot = match &slots {
        Some(slots) => Some(take_slot(slots, &wanted).await?),
        None => None,
    };
    let login_started = std::time::Instant::now();
    let (mut server, pool_key, born) = server_session(&wanted, shared).await?;
    shared.metrics.logins.fetch_add(1, Ordering::Relaxed);
    shared
        .metrics
        .login_seconds
        .observe(login_started.elapsed());
    let registration = greet(client, &mut server, shared).await?;
    // One line per session, as PgBouncer logs its connections: with the trail of the
    // proxy's own reads in the store, it says who used a route's credential, and when.
    tracing::info!(client = %client_named, route = %route.name(), mode = ?route.pool_mode, "session started");
    let Some(slots) = slots else {
        let end = relay_session(client, server, shared).await;
        if let SessionEnd::RelayedInKernel = end {
            return Ok(());
        }
        // Before the session can serve anyone else: a cancel request on its way for this
        // client must not reach the next one.
        if let Some(registration) = &registration {
            registration.retarget(None).await;
        }
        drop(registration);
        if let SessionEnd::ServerReusable(mut server) = end {
            if relay::reset(&mut server.stream).await {
                shared.pool.checkin(pool_key, server, born);
            }
        }
        return Ok(());
    };
    let mut relay = Relay::default();
    // Transaction mode: the session the login opened waits in the pool, like every other,
    // until a transaction needs it.
    if let Some(registration) = &registration {
        registration.retarget(None).await;
    }
    shared.pool.checkin(pool_key, server, born);
    drop(login_slot);
    lend_per_transaction(
        client,
        &mut relay,
        &slots,
        &wanted,
        registration,
        shared,
        shutdown,
    )
    .await
}

/// How a session-mode session ended, for its server connection.
enum SessionEnd {
    /// The client left with the server settled: reset it and pool it.
    ServerReusable(BackendSession),
    ServerClosed,
    /// The kernel relayed the session; its server connection closed with it.
    RelayedInKernel,
}

/// Hand-overs to the kernel relay tried per session: each one called off (bytes arrived while
/// it was made) costs a few system calls, so a client that keeps sending at the wrong moment
/// is left to the proxy.
const HAND_OVER_ATTEMPTS: u32 = 8;

/// Session mode: relays until either side leaves (SIGTERM's drain waits for that), and hands
/// the session to the kernel relay once it has lasted `[limits] kernel_relay_after_ms`, if
/// it can.
async fn relay_session(
    client: &mut Box<dyn ClientStream>,
    mut server: BackendSession,
    shared: &Shared,
) -> SessionEnd {
    let metrics = &shared.metrics;
    let mut relay = Relay::default();
    let after = Duration::from_millis(shared.config().limits.kernel_relay_after_ms);
    let mut hand_over_after = shared
        .kernel_relay
        .as_ref()
        .filter(|_| client.plain_tcp_socket().is_some())
        .filter(|_| server.stream.plain_socket().is_some())
        .map(|_| std::time::Instant::now() + after);
    let (mut attempts, mut paired) = (0, false);
    loop {
        let ended = relay
            .run(
                client,
                &mut server.stream,
                metrics,
                Until::EitherSideLeaves,
                hand_over_after,
            )
            .await;
        let (Ended::HandOver { held }, Some(kernel_relay)) = (ended, &shared.kernel_relay) else {
            // A server socket paired for the kernel relay stays paired: not for anyone else.
            return if ended == Ended::ServerReusable && !paired {
                SessionEnd::ServerReusable(server)
            } else {
                SessionEnd::ServerClosed
            };
        };
        let held = relay.held(held);
        match kernel_relay
            .hand_over(client, &server.stream, paired, held, metrics)
            .await
        {
            Ok(Handover::Relayed(session)) => {
                // The kernel relay holds duplicates of both sockets: the streams go, and with
                // them the runtime's interest in bytes it will no longer read.
                *client = Box::new(tokio::io::empty());
                drop(server);
                kernel_relay.wait(session, metrics).await;
                return SessionEnd::RelayedInKernel;
            }
            Ok(Handover::Declined {
                from_client,
                paired: now_paired,
                try_again,
            }) => {
                relay.relay_first(&from_client);
                paired |= now_paired;
                attempts += 1;
                if !try_again || attempts == HAND_OVER_ATTEMPTS {
                    hand_over_after = None;
                }
            }
            Ok(Handover::Broken) => {
                tracing::warn!("a session was closed: bytes arrived on both sides of its hand-over to the kernel relay, whose order could not be kept");
                return SessionEnd::ServerClosed;
            }
            Err(error) => {
                tracing::warn!(%error, "a session was closed: its hand-over to the kernel relay failed");
                return SessionEnd::ServerClosed;
            }
        }
    }
}

/// How long a transaction-mode client between transactions is given, once a drain has begun,
/// before it is told the proxy is shutting down.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Transaction mode: for each transaction the client starts, a server session from the pool
/// (or a new login), held until the transaction is over. Once a drain has begun (SIGTERM), a
/// client between transactions is told so (`57P01`, after `DRAIN_GRACE`, or in answer to its
/// next request) and let go, rather than served on until the drain timeout cuts it off in the
/// middle of a transaction.
async fn lend_per_transaction(
    client: &mut Box<dyn ClientStream>,
    relay: &mut Relay,
    slots: &Arc<Semaphore>,
    wanted: &Wanted<'_>,
    registration: Option<crate::cancel::Registration>,
    shared: &Shared,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    loop {
        let draining = async {
            if shutdown.wait_for(|stop| *stop).await.is_err() {
                std::future::pending::<()>().await;
            }
            // Not at once: the answer just relayed (a COMMIT's) is the client's to read first,
            // and a client library can take a FATAL read with it for that statement's.
            tokio::time::sleep(DRAIN_GRACE).await;
        };
        let asked = tokio::select! {
            asked = relay.next_request(client) => asked,
            () = draining => return Err(ProxyError::ShuttingDown),
        };
        if !asked {
            break;
        }
        // A request that comes once the drain has begun is refused, not run.
        if *shutdown.borrow() {
            return Err(ProxyError::ShuttingDown);
        }
        let _slot = take_slot(slots, wanted).await?;
        let (mut server, pool_key, born) = server_session(wanted, shared).await?;
        shared
            .metrics
            .pooled_transactions
            .fetch_add(1, Ordering::Relaxed);
        let cancel_target = server.cancel_key.map(|key| (server.address.clone(), key));
        if let Some(registration) = &registration {
            registration.retarget(cancel_target).await;
        }
        let ended = relay
            .run(
                client,
                &mut server.stream,
                &shared.metrics,
                Until::TransactionEnds,
                None,
            )
            .await;
        // Before the session can be lent to anyone else: a cancel request on its way for this
        // client must not reach the next one.
        if let Some(registration) = &registration {
            registration.retarget(None).await;
        }
        match ended {
            Ended::TransactionDone | Ended::ServerReusable => {
                // Named statements must not meet the next client, nor the answer to a
                // statement a COPY's count missed: DISCARD ALL's answer must come back alone.
                if !relay.needs_reset() || relay::reset(&mut server.stream).await {
                    shared.pool.checkin(pool_key, server, born);
                }
                if ended == Ended::ServerReusable {
                    break;
                }
            }
            // A transaction-mode relay is never handed over.
            Ended::Closed | Ended::HandOver { .. } => break,
        }
    }
    Ok(())
}

/// What a client asked for, once its route is known: what finds it a server session.
struct Wanted<'a> {
    route: &'a Route,
    parameters: &'a BTreeMap<String, String>,
    database: &'a str,
    config: &'a Config,
}

/// A server session for the client: an idle pooled one, else a new login (through a
/// rotation if need be).
async fn server_session(
    wanted: &Wanted<'_>,
    shared: &Shared,
) -> Result<(BackendSession, String, std::time::Instant), ProxyError> {
    let config = wanted.config;
    // Before the TLS rules are read: see `LoginSettings::rules_read_at`.
    let rules_read_at = std::time::Instant::now();
    let server_tls = shared
        .server_tls
        .read()
        .expect("server tls lock poisoned")
        .clone();
    let settings = LoginSettings {
        budget: Duration::from_millis(config.limits.login_retry_budget_ms),
        connect: ConnectSettings {
            timeout: Duration::from_millis(config.limits.backend_connect_timeout_ms),
            tls: server_tls.connector,
            verify_servers: server_tls.verify_servers,
            scram: &shared.scram,
            auth_methods: &config.server_login.methods,
        },
        rules_read_at,
    };
    login::connect(
        wanted.route,
        &config.store,
        &shared.credentials,
        &shared.pool,
        wanted.parameters,
        wanted.database,
        &settings,
        &shared.metrics,
    )
    .await
    .inspect_err(|_| {
        shared
            .metrics
            .login_failures
            .fetch_add(1, Ordering::Relaxed);
    })
}

/// One of the route's slots, waiting at most `pool_wait_timeout_ms` for one to free.
async fn take_slot(
    slots: &Arc<Semaphore>,
    wanted: &Wanted<'_>,
) -> Result<OwnedSemaphorePermit, ProxyError> {
    let waited_ms = wanted.config.limits.pool_wait_timeout_ms;
    match tokio::time::timeout(
        Duration::from_millis(waited_ms),
        Arc::clone(slots).acquire_owned(),
    )
    .await
    {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ProxyError::PoolTimeout {
            route: wanted.route.name(),
            waited_ms,
            pool_size: wanted.route.pool_size,
        }),
    }
}

/// AuthenticationOk, then the server's greeting with BackendKeyData replaced by the proxy's
/// own key, so a cancel request comes to the proxy.
async fn greet<S>(
    client: &mut S,
    server: &mut BackendSession,
    shared: &Shared,
) -> Result<Option<crate::cancel::Registration>, ProxyError>
where
    S: AsyncWrite + Unpin,
{
    let mut out = frontend::authentication_ok();
    let registration = server
        .cancel_key
        .map(|key| shared.cancels.register(server.address.clone(), key));
    for message in &server.greeting {
        match (message[0], &registration) {
            (b'K', Some(registration)) => {
                out.put_u8(b'K');
                out.put_i32(12);
                out.put_i32(registration.key.0);
                out.put_i32(registration.key.1);
            }
            _ => out.extend_from_slice(message),
        }
    }
    client.write_all(&out).await.map_err(client_gone)?;
    client.flush().await.map_err(client_gone)?;
    Ok(registration)
}

/// A write to a client that failed before its session began.
fn client_gone(_: std::io::Error) -> ProxyError {
    ProxyError::Protocol("client went away during login".into())
}

/// The configuration a reload runs with: the file's, but the listeners, the store connection
/// and the limits the running parts were built with stay as they are, and the rest is checked
/// as it will run (a transaction-mode route against the pool the proxy has, not the one the
/// file asks for).
fn as_reloaded(mut new: Config, running: &Config) -> Result<Config, String> {
    if new.listen != running.listen {
        tracing::warn!("[listen] takes effect at the next start, not on reload");
        // A route the file's own [listen] would allow (a `peer:` entry with a new unix_dir)
        // is refused against the listeners the proxy has: say why.
        let with_running_listeners = Config {
            listen: running.listen.clone(),
            ..new.clone()
        };
        with_running_listeners.validate().map_err(|error| {
            format!(
                "{error}, with the listeners the proxy runs: the file's [listen] takes effect \
                 at the next start"
            )
        })?;
    }
    new.listen = running.listen.clone();
    if new.store != running.store {
        tracing::warn!("[store] takes effect at the next start, not on reload");
    }
    new.store = running.store.clone();
    let at_restart = new.limits.keep_startup_only(&running.limits);
    if !at_restart.is_empty() {
        tracing::warn!(limits = ?at_restart, "these [limits] take effect at the next start, not on reload");
    }
    new.validate()?;
    Ok(new)
}

async fn reload_on_sighup(path: PathBuf, mut hangups: Signal, shared: Arc<Shared>) {
    while hangups.recv().await.is_some() {
        let merged = Config::from_file(&path).and_then(|new| as_reloaded(new, &shared.config()));
        match merged {
            Ok(new) => {
                let certificates = new
                    .tls
                    .as_ref()
                    .map(crate::tls::acceptor)
                    .transpose()
                    .and_then(|acceptor| Ok((acceptor, ServerTlsRules::new(&new.server_tls)?)));
                match certificates {
                    Ok((acceptor, server_tls)) => {
                        *shared.tls.write().expect("tls lock poisoned") = acceptor;
                        *shared.server_tls.write().expect("server tls lock poisoned") = server_tls;
                        // Idle server connections were opened under the old rules.
                        if new.server_tls != shared.config().server_tls {
                            shared.pool.clear();
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "configuration not reloaded");
                        continue;
                    }
                }
                let routes = new.routes.len();
                *shared.config.write().expect("config lock poisoned") = Arc::new(new);
                tracing::info!(routes, "configuration reloaded");
            }
            Err(error) => tracing::error!(%error, "configuration not reloaded"),
        }
    }
}

/// Admin requests served at once: scrapes and health checks are few, and a flood of
/// connections to the admin port must not take memory or tasks without bound.
const ADMIN_REQUESTS_AT_ONCE: usize = 64;
/// Bytes of an admin request read for its request line and headers.
const ADMIN_REQUEST_BYTES: usize = 8192;

async fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    let requests = Arc::new(Semaphore::new(ADMIN_REQUESTS_AT_ONCE));
    loop {
        let Ok(permit) = Arc::clone(&requests).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                back_off_after_accept(&error, "admin").await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            answer_admin_request(stream, &shared).await;
        });
    }
}

/// Time an admin client has to send its request: probes and scrapers send it at once, and a
/// silent connection holds one of the few slots, in which a liveness probe would wait.
const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Time an admin client has to take the answer.
const ADMIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

async fn answer_admin_request(mut stream: TcpStream, shared: &Shared) {
    // The request line is all that matters; read until the headers end, within the bounds.
    let headers_end = |bytes: &[u8]| bytes.windows(4).any(|w| w == b"\r\n\r\n");
    let mut request = vec![0u8; ADMIN_REQUEST_BYTES];
    let mut received = 0;
    let _ = tokio::time::timeout(ADMIN_REQUEST_TIMEOUT, async {
        while received < request.len() && !headers_end(&request[..received]) {
            match stream.read(&mut request[received..]).await {
                Ok(read) if read > 0 => received += read,
                _ => break,
            }
        }
    })
    .await;
    let request = &request[..received];
    let (status, body) = if received == ADMIN_REQUEST_BYTES && !headers_end(request) {
        (
            "431 Request Header Fields Too Large",
            "request too large\n".to_string(),
        )
    } else {
        match get_path(request) {
            Some("/metrics") => ("200 OK", shared.metrics.render()),
            Some("/health") => ("200 OK", "ok\n".to_string()),
            Some("/ready") => readiness(shared),
            _ => ("404 Not Found", "not found\n".to_string()),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(ADMIN_ANSWER_TIMEOUT, stream.write_all(response.as_bytes())).await;
    // Closed with unread bytes, the socket would be reset, and the client could lose the
    // answer: end our side, then read what is left (briefly) until the client closes.
    let _ = stream.shutdown().await;
    let mut rest = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_millis(200), async {
        while matches!(stream.read(&mut rest).await, Ok(read) if read > 0) {}
    })
    .await;
}

/// `/ready`: whether new clients can log in, for a load balancer or an orchestrator to send
/// them elsewhere when not. Ready while the store answers on the listening connection; while it
/// does not (and before it first did), only if every route's credential came from the store
/// within `stale_credential_secs`, since those routes go on logging in on it.
fn readiness(shared: &Shared) -> (&'static str, String) {
    if shared.metrics.store_listening.load(Ordering::Relaxed) == 1 {
        return ("200 OK", "ready\n".to_string());
    }
    let config = shared.config();
    let unserved: Vec<String> = config
        .routes
        .iter()
        .filter(|route| !shared.credentials.has_fallback(&route.secret))
        .map(Route::name)
        .collect();
    if unserved.is_empty() {
        return (
            "200 OK",
            "ready: the secrets store is unreachable; every route logs in on its last known \
             credential\n"
                .to_string(),
        );
    }
    (
        "503 Service Unavailable",
        format!(
            "not ready: the secrets store is unreachable, and no last known credential serves \
             route {}\n",
            unserved.join(", route ")
        ),
    )
}

/// The path of a `GET` request line, without its query string.
fn get_path(request: &[u8]) -> Option<&str> {
    let line = request.split(|&byte| byte == b'\r').next()?;
    let mut words = std::str::from_utf8(line).ok()?.split(' ');
    if words.next()? != "GET" {
        return None;
    }
    words.next()?.split('?').next()
}

#[cfg(test)]
mod tests {
    use super::{as_reloaded, get_path, Identity};
    use crate::config::Config;

    #[test]
    fn a_reload_is_checked_against_the_listeners_the_proxy_runs() {
        let store = "[store]\nhost = \"h\"\nuser = \"u\"\n";
        let running = Config::parse(&format!("[listen]\ntcp = \"127.0.0.1:1\"\n{store}")).unwrap();
        let peer_route = "[[route]]\ndatabase = \"d\"\nsecret = \"s\"\nallow = [\"peer:app\"]\n";
        let file = Config::parse(&format!(
            "[listen]\ntcp = \"127.0.0.1:1\"\nunix_dir = \"/tmp\"\n{store}{peer_route}"
        ))
        .unwrap();
        let refusal = as_reloaded(file, &running).unwrap_err();
        assert!(
            refusal.ends_with(
                "needs [listen] unix_dir: peer identity is the OS user on the Unix socket, with \
                 the listeners the proxy runs: the file's [listen] takes effect at the next start"
            ),
            "{refusal}"
        );
        let trust_route = peer_route.replace("peer:app", "trust");
        let file = Config::parse(&format!(
            "[listen]\ntcp = \"127.0.0.1:1\"\nunix_dir = \"/tmp\"\n{store}{trust_route}"
        ))
        .unwrap();
        let reloaded = as_reloaded(file, &running).unwrap();
        assert_eq!(
            reloaded.listen, running.listen,
            "listeners wait for a restart"
        );
        assert_eq!(reloaded.routes.len(), 1);
    }

    #[test]
    fn an_admin_request_is_routed_by_its_exact_path() {
        assert_eq!(
            get_path(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
            Some("/metrics")
        );
        assert_eq!(
            get_path(b"GET /metrics?debug=1 HTTP/1.1\r\n"),
            Some("/metrics")
        );
        assert_eq!(get_path(b"GET /healthz HTTP/1.1\r\n"), Some("/healthz"));
        assert_eq!(get_path(b"POST /health HTTP/1.1\r\n"), None);
        assert_eq!(get_path(b"GET"), None);
        assert_eq!(get_path(b"\xff\xfe"), None);
        assert_eq!(get_path(b""), None);
    }

    #[test]
    fn a_source_is_an_ipv4_address_an_ipv6_slash_64_or_a_peer_user() {
        let source = |address: &str| Identity::Unknown(address.parse().unwrap()).source();
        assert_eq!(source("10.1.2.3:5432"), "10.1.2.3");
        assert_eq!(source("[::ffff:10.1.2.3]:5432"), "10.1.2.3");
        assert_eq!(source("[2001:db8:1:2:aaaa::1]:5432"), "2001:db8:1:2::/64");
        assert_eq!(source("[2001:db8:1:2:bbbb::9]:1"), "2001:db8:1:2::/64");
        assert_eq!(Identity::Peer("app".into()).source(), "peer user \"app\"");
    }
}
