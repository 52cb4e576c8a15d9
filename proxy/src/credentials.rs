//! Database credentials from the secrets store, cached per (secret, stage).
//!
//! Entries are dropped when `pg_secrets_changed` names their secret, and re-fetched after a
//! TTL in case a notification was missed. Concurrent fetches of one entry collapse into one
//! query: waiters share a `OnceCell`. Fetches run on a small deadpool-postgres pool of store
//! connections; notifications arrive on one dedicated connection outside the pool.

use crate::config::{Route, Store};
use crate::error::{OneLine, ProxyError};
use crate::metrics::Metrics;
use futures_util::StreamExt;
use secrecy::SecretString;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::AsyncMessage;
use tokio_postgres::{NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

/// The staging labels a login tries, in order: during a rotation the database may already
/// accept the pending password, or still the previous one.
pub const STAGES: [&str; 3] = ["CURRENT", "PENDING", "PREVIOUS"];

/// How long PENDING goes first once a login found CURRENT refused and PENDING accepted
/// (see `CredentialCache::pending_first`), unless a change notification or a refusal ends it
/// sooner. Counted from that login, not renewed by the logins it spares.
const PENDING_FIRST_FOR: Duration = Duration::from_secs(10);
const PENDING_FIRST: [&str; 3] = ["PENDING", "CURRENT", "PREVIOUS"];

/// The warning that a route's server refused CURRENT and accepted PREVIOUS is logged at most
/// this often per route: until the secret is fixed every new server login finds it
/// so, and the logins metric counts each one.
const PREVIOUS_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What the per-route lessons are kept under: the route's secret, database and user (routes
/// are told apart by database and user, and two may share a secret but not a server).
type RouteKey = (String, String, Option<String>);

fn route_key(route: &Route) -> RouteKey {
    (
        route.secret.clone(),
        route.database.clone(),
        route.user.clone(),
    )
}

/// The fields of the credential JSON of DESIGN.md that a login needs.
struct CredentialJson {
    host: Option<String>,
    port: Option<u16>,
    dbname: Option<String>,
    username: String,
    password: String,
}

/// The credential in `text`, read as the extension's rotators read it (`port` a number or a
/// string of one, `username` not empty: a secret that rotates must also log in), or why it is
/// not one. The reason names fields, never quotes a value.
fn parse_credential(text: &str) -> Result<CredentialJson, String> {
    use serde_json::Value;
    let not = |why: String| format!("not credential JSON ({why})");
    let value: Value =
        serde_json::from_str(text).map_err(|_| not("it does not parse as JSON".into()))?;
    let fields = value
        .as_object()
        .ok_or_else(|| not("it is not a JSON object".into()))?;
    let text = |name: &str| -> Result<Option<String>, String> {
        match fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(not(format!("\"{name}\" is not a string"))),
        }
    };
    let port_number = |value: &Value| -> Option<u16> {
        match value {
            Value::Number(number) => number.as_u64().and_then(|n| u16::try_from(n).ok()),
            Value::String(text) => text.parse().ok(),
            _ => None,
        }
        .filter(|port| *port != 0)
    };
    let port = match fields.get("port") {
        None | Some(Value::Null) => None,
        Some(value) => {
            Some(port_number(value).ok_or_else(|| not("\"port\" is not a port number".into()))?)
        }
    };
    match text("engine")?.as_deref() {
        None | Some("postgres") | Some("postgresql") => {}
        Some(_) => return Err(not("its \"engine\" is not postgres".into())),
    }
    let username = text("username")?
        .filter(|name| !name.is_empty())
        .ok_or_else(|| not("no \"username\"".into()))?;
    let password = text("password")?
        .filter(|password| !password.is_empty())
        .ok_or_else(|| not("no \"password\"".into()))?;
    // Empty is absent, as the rotators read it: no host is the store's server, no dbname the
    // database the client asked for.
    let non_empty = |name: &str| Ok::<_, String>(text(name)?.filter(|text| !text.is_empty()));
    Ok(CredentialJson {
        host: non_empty("host")?,
        port,
        dbname: non_empty("dbname")?,
        username,
        password,
    })
}

pub struct Credential {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    pub username: String,
    pub password: SecretString,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Why a fetch failed: the store could not be reached (then the last known credential may
/// serve for a while), or it answered with an error (access revoked, say: then it may not).
#[derive(Clone, Debug)]
enum FetchError {
    Unreachable(String),
    Refused(String),
}

/// How long the secrets store may take to give a connection, and then to answer the query.
const STORE_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// An error followed by its causes: tokio-postgres says "error connecting to server" and keeps
/// why (connection refused, no such host, a TLS certificate refused) in its source.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

/// A store error as refused (the store said no: access, login or the secret itself; the last
/// known credential must not serve) or unreachable (the store could not answer now: a
/// connection failure, a shutdown, a cancel, a full audit queue; the last known credential
/// serves for a while).
fn classify(error: &tokio_postgres::Error) -> FetchError {
    let Some(db) = error.as_db_error() else {
        return FetchError::Unreachable(with_causes(error));
    };
    let code = db.code().code();
    let described = format!("{} ({code})", db.message());
    if ["08", "40", "53", "57", "58"]
        .iter()
        .any(|class| code.starts_with(class))
    {
        FetchError::Unreachable(described)
    } else {
        FetchError::Refused(described)
    }
}

/// A cache key: secret name and staging label.
type Key = (String, &'static str);

/// `None`: the secret has no version with that stage (no rotation under way, say).
type Fetched = Result<Option<Arc<Credential>>, FetchError>;

struct Entry {
    cell: Arc<OnceCell<Fetched>>,
    created: Instant,
}

pub struct CredentialCache {
    store: Store,
    store_password: Option<String>,
    /// `None`: plaintext (`[store] sslmode = "disable"`).
    tls: Option<MakeRustlsConnect>,
    ttl: Duration,
    stale_limit: Duration,
    entries: Mutex<HashMap<Key, Entry>>,
    /// The last credential the store gave for each (secret, stage), and when.
    last_known: Mutex<HashMap<Key, (Arc<Credential>, Instant)>>,
    /// Per route, since when PENDING goes first. In a rotation's window (the server
    /// has the new password, the labels have not moved yet) CURRENT is refused: trying it
    /// first would cost every new login a refused login at the server, which its log and any
    /// lockout count, and a store fetch. Only PENDING: a login that fell back to PREVIOUS says
    /// the server lags the secret, not that the next login should.
    pending_first: Mutex<HashMap<RouteKey, Instant>>,
    /// Per route, when the last PREVIOUS warning was logged, and the logins that
    /// found the same since without one.
    previous_warned: Mutex<HashMap<RouteKey, (Instant, u64)>>,
    /// Counts invalidations, so that a login that began before one does not record what it
    /// learned after it.
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    connections: deadpool_postgres::Pool,
}

impl CredentialCache {
    pub fn new(
        store: Store,
        store_password: Option<String>,
        ttl: Duration,
        stale_limit: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let tls = crate::tls::store_connector(&store)?;
        let config = store_config(&store, store_password.as_deref(), tls.is_some());
        let manager_config = deadpool_postgres::ManagerConfig {
            // A closed connection is dropped; a live one needs no round trip to reuse.
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        };
        let manager = match &tls {
            Some(tls) => {
                deadpool_postgres::Manager::from_config(config, tls.clone(), manager_config)
            }
            None => deadpool_postgres::Manager::from_config(config, NoTls, manager_config),
        };
        // A login waits at most this long for a free store connection; a stalled store then
        // counts as unreachable, and the last known credential can serve.
        let connections = deadpool_postgres::Pool::builder(manager)
            .max_size(store.pool_size)
            .wait_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| format!("[store] connection pool: {e}"))?;
        Ok(Arc::new(CredentialCache {
            store,
            store_password,
            tls,
            ttl,
            stale_limit,
            entries: Mutex::new(HashMap::new()),
            last_known: Mutex::new(HashMap::new()),
            pending_first: Mutex::new(HashMap::new()),
            previous_warned: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            metrics,
            connections,
        }))
    }

    /// The stages a login for `route` tries, in order: `STAGES`, or PENDING
    /// first for a while after a login found CURRENT refused and PENDING accepted.
    pub fn stage_order(&self, route: &Route) -> [&'static str; 3] {
        let pending_first = self.pending_first.lock().expect("cache lock poisoned");
        match pending_first.get(&route_key(route)) {
            Some(since) if since.elapsed() < PENDING_FIRST_FOR => PENDING_FIRST,
            _ => STAGES,
        }
    }

    /// Where invalidations stand: read before fetching the credential a login tries.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// A login for `route` found CURRENT refused and PENDING accepted, with a
    /// PENDING credential fetched at `generation`: PENDING goes first from now on, unless
    /// something was invalidated since (the labels may have moved) or it already does.
    pub fn pending_accepted(&self, route: &Route, generation: u64) {
        let mut pending_first = self.pending_first.lock().expect("cache lock poisoned");
        if self.generation() != generation {
            return;
        }
        let key = route_key(route);
        if pending_first
            .get(&key)
            .is_none_or(|since| since.elapsed() >= PENDING_FIRST_FOR)
        {
            pending_first.insert(key, Instant::now());
        }
    }

    /// A login for `route` found CURRENT refused and PREVIOUS accepted: whether to
    /// warn now (`Some` with the logins that found the same since the last warning) or not yet.
    pub fn previous_accepted(&self, route: &Route) -> Option<u64> {
        let mut warned = self.previous_warned.lock().expect("cache lock poisoned");
        let key = route_key(route);
        match warned.get_mut(&key) {
            Some((at, unwarned)) if at.elapsed() < PREVIOUS_WARNING_EVERY => {
                *unwarned += 1;
                None
            }
            Some((at, unwarned)) => {
                *at = Instant::now();
                Some(std::mem::take(unwarned))
            }
            None => {
                warned.insert(key, (Instant::now(), 0));
                Some(0)
            }
        }
    }

    /// The credential of `secret` at `stage`, from the cache or the store.
    pub async fn get(
        &self,
        secret: &str,
        stage: &'static str,
    ) -> Result<Option<Arc<Credential>>, ProxyError> {
        let cell = {
            let mut entries = self.entries.lock().expect("cache lock poisoned");
            let key = (secret.to_string(), stage);
            let fresh = entries
                .get(&key)
                .is_some_and(|entry| entry.created.elapsed() < self.ttl);
            let counter = if fresh {
                &self.metrics.cache_hits
            } else {
                &self.metrics.cache_misses
            };
            Metrics::count(counter, 1);
            if !fresh {
                entries.insert(
                    key.clone(),
                    Entry {
                        cell: Arc::new(OnceCell::new()),
                        created: Instant::now(),
                    },
                );
            }
            entries[&key].cell.clone()
        };
        let key = (secret.to_string(), stage);
        match cell.get_or_init(|| self.fetch(secret, stage)).await.clone() {
            Ok(found) => Ok(found),
            Err(error) => {
                // A failed fetch is not cached: the next login asks the store again.
                self.forget_entry(secret, stage, &cell);
                match error {
                    FetchError::Unreachable(reason) => {
                        if let Some(credential) = self.stale(&key) {
                            tracing::warn!(secret, stage, %reason, "secrets store unreachable; using the last known credential");
                            return Ok(Some(credential));
                        }
                        Err(ProxyError::Store {
                            secret: secret.to_string(),
                            reason,
                        })
                    }
                    FetchError::Refused(reason) => Err(ProxyError::StoreRefused {
                        secret: secret.to_string(),
                        reason,
                    }),
                }
            }
        }
    }

    /// Whether logins for `secret` can go on while the store is unreachable: the store gave its
    /// CURRENT credential less than the stale limit ago.
    pub fn has_fallback(&self, secret: &str) -> bool {
        let last_known = self.last_known.lock().expect("cache lock poisoned");
        last_known
            .get(&(secret.to_string(), STAGES[0]))
            .is_some_and(|(_, at)| at.elapsed() < self.stale_limit)
    }

    /// The last credential the store gave, if it is younger than the stale limit.
    fn stale(&self, key: &Key) -> Option<Arc<Credential>> {
        let last_known = self.last_known.lock().expect("cache lock poisoned");
        let (credential, at) = last_known.get(key)?;
        if at.elapsed() >= self.stale_limit {
            return None;
        }
        Metrics::count(&self.metrics.stale_credentials, 1);
        Some(Arc::clone(credential))
    }

    fn forget_entry(&self, secret: &str, stage: &'static str, cell: &Arc<OnceCell<Fetched>>) {
        let mut entries = self.entries.lock().expect("cache lock poisoned");
        let key = (secret.to_string(), stage);
        if entries
            .get(&key)
            .is_some_and(|entry| Arc::ptr_eq(&entry.cell, cell))
        {
            entries.remove(&key);
        }
    }

    /// Drops what is cached for `secret`, so the next login fetches afresh. Logins that fail
    /// together call this together; only the first drop matters, and the re-fetch that
    /// follows is shared.
    pub fn invalidate_if_used(&self, secret: &str, used: &Arc<Credential>) {
        let mut entries = self.entries.lock().expect("cache lock poisoned");
        let holds_used = entries.iter().any(|((name, _), entry)| {
            name == secret
                && entry
                    .cell
                    .get()
                    .is_some_and(|f| matches!(f, Ok(Some(c)) if Arc::ptr_eq(c, used)))
        });
        if holds_used {
            entries.retain(|(name, _), _| name != secret);
            self.forget_preferred_stage(Some(secret));
        }
    }

    pub fn invalidate(&self, secret: &str) {
        self.entries
            .lock()
            .expect("cache lock poisoned")
            .retain(|(name, _), _| name != secret);
        self.forget_preferred_stage(Some(secret));
    }

    fn invalidate_all(&self) {
        self.entries.lock().expect("cache lock poisoned").clear();
        self.forget_preferred_stage(None);
    }

    /// A change or a refusal ends what past logins taught about `secret` (every secret for
    /// `None`). The count moves under the lock `pending_accepted` checks it under.
    fn forget_preferred_stage(&self, secret: Option<&str>) {
        let mut pending_first = self.pending_first.lock().expect("cache lock poisoned");
        self.generation.fetch_add(1, Ordering::SeqCst);
        match secret {
            Some(secret) => pending_first.retain(|(name, _, _), _| name != secret),
            None => pending_first.clear(),
        }
    }

    async fn fetch(&self, secret: &str, stage: &'static str) -> Fetched {
        // The pool bounds only the wait for a free connection and the client library only the
        // TCP connect: a store that stops answering (in the TLS handshake, the login or the
        // query) would hold every login of the secret, past the retry budget and without the
        // last known credential serving.
        let unanswered = || {
            FetchError::Unreachable(format!(
                "the secrets store did not answer within {} s",
                STORE_ANSWER_TIMEOUT.as_secs()
            ))
        };
        let client = tokio::time::timeout(STORE_ANSWER_TIMEOUT, self.connections.get())
            .await
            .map_err(|_| unanswered())?
            .map_err(|e| match e {
                deadpool_postgres::PoolError::Backend(error) => classify(&error),
                other => FetchError::Unreachable(with_causes(&other)),
            })?;
        let parameters: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&secret, &stage];
        let query = client.query_one(
            "SELECT secrets.get_secret_value($1, version_stage => $2)",
            &parameters,
        );
        let Ok(result) = tokio::time::timeout(STORE_ANSWER_TIMEOUT, query).await else {
            // Not back into the pool: the connection may be one whose peer is gone.
            drop(deadpool_postgres::Object::take(client));
            return Err(unanswered());
        };
        match result {
            Ok(row) => {
                let text: String = row.try_get(0).map_err(|_| {
                    FetchError::Refused(format!("secret \"{secret}\" read as no text"))
                })?;
                let json = parse_credential(&text)
                    .map_err(|why| FetchError::Refused(format!("secret \"{secret}\" is {why}")))?;
                let credential = Arc::new(Credential {
                    host: json.host.filter(|h| !h.is_empty()),
                    port: json.port,
                    dbname: json.dbname,
                    username: json.username,
                    password: SecretString::from(json.password),
                });
                // What the store last confirmed; serves while the store is unreachable.
                let mut last_known = self.last_known.lock().expect("cache lock poisoned");
                last_known.insert(
                    (secret.to_string(), stage),
                    (Arc::clone(&credential), Instant::now()),
                );
                Ok(Some(credential))
            }
            // The secret exists but no version carries this stage.
            Err(e)
                if e.as_db_error().is_some_and(|db| {
                    db.code().code() == "42704" && db.message().contains("has no version")
                }) =>
            {
                Ok(None)
            }
            Err(e) => Err(classify(&e)),
        }
    }

    /// Keeps a connection that listens to `pg_secrets_changed` and drops cached credentials
    /// of every secret named there. Reconnects with backoff; the TTL covers the gaps.
    pub fn spawn_listener(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            loop {
                let ended = cache.listen_once().await;
                cache.metrics.store_listening.store(0, Ordering::Relaxed);
                match ended {
                    Ok(()) => delay = Duration::from_millis(100),
                    Err(error) => {
                        tracing::warn!(error = %OneLine(&error), "listening to pg_secrets_changed failed")
                    }
                }
                // Whatever was cached may have changed while nobody listened.
                cache.invalidate_all();
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        })
    }

    async fn listen_once(&self) -> Result<(), tokio_postgres::Error> {
        match &self.tls {
            Some(tls) => self.listen_with(tls.clone()).await,
            None => self.listen_with(NoTls).await,
        }
    }

    async fn listen_with<T>(&self, tls: T) -> Result<(), tokio_postgres::Error>
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Unpin,
    {
        let (client, mut connection) = store_config(
            &self.store,
            self.store_password.as_deref(),
            self.tls.is_some(),
        )
        .connect(tls)
        .await?;
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        let listen = client.batch_execute("LISTEN pg_secrets_changed");
        // The LISTEN is answered through the connection, so drive both.
        let mut listen = std::pin::pin!(listen);
        let mut listening = false;
        loop {
            tokio::select! {
                result = &mut listen, if !listening => {
                    result?;
                    listening = true;
                    // A change committed after the last clear but before this LISTEN took
                    // effect was announced to nobody.
                    self.invalidate_all();
                    self.metrics.store_listening.store(1, Ordering::Relaxed);
                }
                message = messages.next() => match message {
                    Some(Ok(AsyncMessage::Notification(notification))) => {
                        self.on_notification(notification.payload());
                        Metrics::count(&self.metrics.store_notifications, 1);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(error),
                    None => return Ok(()),
                }
            }
        }
    }

    fn on_notification(&self, payload: &str) {
        match serde_json::from_str::<serde_json::Value>(payload) {
            Ok(value) => match value.get("name").and_then(|n| n.as_str()) {
                Some(name) => {
                    tracing::debug!(secret = name, "credential changed; cache entry dropped");
                    self.invalidate(name);
                }
                None => self.invalidate_all(),
            },
            Err(_) => self.invalidate_all(),
        }
    }
}

fn store_config(store: &Store, password: Option<&str>, tls: bool) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .ssl_mode(if tls {
            SslMode::Require
        } else {
            SslMode::Disable
        })
        .host(&store.host)
        .port(store.port)
        .dbname(&store.dbname)
        .user(&store.user)
        .application_name("secrets-proxy")
        .connect_timeout(Duration::from_secs(5))
        // The listening connection is idle between changes: a store host that goes away
        // without a word (powered off, a network partition) is noticed within about 25 s
        // rather than the kernel's two hours, so `/ready` and the metric tell it.
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    if let Some(password) = password {
        config.password(password);
        // Over TLS, SCRAM binds the login to the TLS session (tls-server-end-point): someone
        // in the middle with another certificate cannot relay it, even under `require`.
        if tls {
            config.channel_binding(ChannelBinding::Require);
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_as_the_rotators_read_them() {
        let port = |json: &str| parse_credential(json).map(|c| c.port).ok();
        let login = r#""username": "app", "password": "pw""#;
        assert_eq!(port(&format!("{{{login}}}")), Some(None));
        assert_eq!(
            port(&format!("{{{login}, \"engine\": \"postgresql\"}}")),
            Some(None)
        );
        let empty = parse_credential(&format!("{{{login}, \"host\": \"\", \"dbname\": \"\"}}"));
        let empty = empty.unwrap();
        assert_eq!((empty.host, empty.dbname), (None, None));
        assert_eq!(
            port(&format!("{{{login}, \"port\": 6432}}")),
            Some(Some(6432))
        );
        assert_eq!(
            port(&format!("{{{login}, \"port\": \"6432\"}}")),
            Some(Some(6432))
        );
        for bad in ["0", "\"0\"", "70000", "\"x\"", "true", "-1"] {
            let why = parse_credential(&format!("{{{login}, \"port\": {bad}}}")).err();
            assert_eq!(
                why.as_deref(),
                Some("not credential JSON (\"port\" is not a port number)"),
                "{bad}"
            );
        }
        for (json, why) in [
            (r#"{"username": "", "password": "pw"}"#, "no \"username\""),
            (r#"{"password": "pw"}"#, "no \"username\""),
            (r#"{"username": "app"}"#, "no \"password\""),
            (r#"{"username": "app", "password": ""}"#, "no \"password\""),
            (
                r#"{"engine": "mysql", "username": "app", "password": "pw"}"#,
                "its \"engine\" is not postgres",
            ),
            (
                r#"{"username": "app", "password": 12345678}"#,
                "\"password\" is not a string",
            ),
            (r#"["app", "s3cr3t"]"#, "it is not a JSON object"),
            (r#"{"password": "s3cr3t""#, "it does not parse as JSON"),
        ] {
            let error = parse_credential(json).err().unwrap();
            assert_eq!(error, format!("not credential JSON ({why})"));
        }
    }
}
