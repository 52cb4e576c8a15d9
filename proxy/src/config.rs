//! `proxy.toml`: what the proxy listens on, how it reaches the secrets store, and the routes.
//! Parsed with serde, unknown keys refused, then checked as a whole by `validate`.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: Listen,
    pub store: Store,
    #[serde(default)]
    pub limits: Limits,
    pub tls: Option<Tls>,
    #[serde(default)]
    pub server_tls: ServerTls,
    #[serde(default)]
    pub server_login: ServerLogin,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
}

/// TLS for clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CA for client certificates; a verified certificate's common name is `cert:<name>`.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse TCP clients that do not encrypt (Unix-socket clients are local).
    #[serde(default)]
    pub require: bool,
}

/// TLS to PostgreSQL servers (route backends; the secrets store connection is separate).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    #[serde(default)]
    pub sslmode: ServerSslMode,
    /// The CA the servers' certificates must chain to; required by `verify-full`.
    pub ca_file: Option<PathBuf>,
    /// A certificate chain and key (PEM) the proxy presents, for servers that ask for one
    /// (`clientcert=verify-ca` or `cert` authentication in pg_hba.conf).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl ServerTls {
    /// What is wrong with this combination, if anything; `section` names it in the message.
    fn check(&self, section: &str) -> Result<(), String> {
        if self.sslmode == ServerSslMode::VerifyFull && self.ca_file.is_none() {
            return Err(format!("{section} sslmode = \"verify-full\" needs ca_file"));
        }
        if self.ca_file.is_some() && self.sslmode != ServerSslMode::VerifyFull {
            return Err(format!(
                "{section} ca_file is used by sslmode = \"verify-full\" only; set that sslmode or remove ca_file"
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(format!("{section} cert_file and key_file go together"));
        }
        if self.cert_file.is_some() && self.sslmode == ServerSslMode::Disable {
            return Err(format!(
                "{section} a client certificate needs TLS: set sslmode to \"require\" or \"verify-full\""
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerSslMode {
    /// Plaintext.
    #[default]
    Disable,
    /// Encrypted, the certificate not checked (as libpq's `require`).
    Require,
    /// Encrypted, the certificate chains to `ca_file` and names the host connected to.
    VerifyFull,
}

/// How the proxy may log in to route servers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerLogin {
    /// The authentication methods a server may ask for, as libpq's `require_auth`: a login
    /// asked for another ends before the password is used. Limited to `scram-sha-256`, a
    /// server (or whoever answers in its place) cannot make the proxy send the password
    /// itself, or a hash that stands for it.
    #[serde(default = "ServerLogin::all_methods")]
    pub methods: Vec<AuthMethod>,
}

impl ServerLogin {
    fn all_methods() -> Vec<AuthMethod> {
        vec![
            AuthMethod::ScramSha256,
            AuthMethod::Md5,
            AuthMethod::Password,
            AuthMethod::None,
        ]
    }
}

impl Default for ServerLogin {
    fn default() -> Self {
        ServerLogin {
            methods: ServerLogin::all_methods(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    /// Cleartext.
    #[serde(rename = "password")]
    Password,
    /// None asked for: the server lets the user in (`trust`).
    #[serde(rename = "none")]
    None,
}

impl std::fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Md5 => "md5",
            AuthMethod::Password => "password",
            AuthMethod::None => "none",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// TCP address for clients, e.g. "127.0.0.1:6432".
    pub tcp: Option<SocketAddr>,
    /// Directory for the Unix socket `.s.PGSQL.<port>` (port of `tcp`, or `unix_port`).
    pub unix_dir: Option<PathBuf>,
    /// Port number in the Unix socket's name when there is no TCP listener.
    pub unix_port: Option<u16>,
    /// Permissions of the Unix socket (who may connect), 0o777 by default as PostgreSQL's
    /// and PgBouncer's: `peer` identifies each OS user, and a socket that only the proxy's own
    /// user may open (what the process's umask would leave) serves no one else.
    #[serde(default = "default_unix_socket_mode")]
    pub unix_socket_mode: u32,
    /// Allow `trust` routes for clients that are not on a loopback address.
    #[serde(default)]
    pub allow_trust_from_non_loopback: bool,
    /// HTTP address for `/metrics` and `/health`.
    pub admin: Option<SocketAddr>,
    /// Threads that relay the sessions and serve the admin port; one per core when absent.
    /// One thread, as PgBouncer has, used 13 to 16% less CPU a transaction on two cores
    /// shared with the database (no wake-up crosses threads), but served 10 to 14% fewer
    /// transactions to 50 busy clients.
    pub threads: Option<usize>,
}

fn default_unix_socket_mode() -> u32 {
    0o777
}

/// The most `[listen] threads`: far beyond any core count a proxy is given, low enough that a
/// typo does not start a thousand threads.
pub const MAX_THREADS: usize = 256;

/// The PostgreSQL server where pg_secrets lives, and the role the proxy reads credentials as
/// (it needs `get` on the route secrets).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_dbname")]
    pub dbname: String,
    pub user: String,
    /// Password of `user`, if the store asks for one; prefer `password_file`.
    pub password: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Connections kept open for credential fetches (the notification listener has its own).
    #[serde(default = "default_store_pool_size")]
    pub pool_size: usize,
    /// TLS to the store, which sends credentials in the clear otherwise: as `[server_tls]`.
    /// With a client certificate the store can authenticate the proxy by it (`cert` in
    /// pg_hba.conf), and no store password is kept anywhere.
    #[serde(default)]
    pub sslmode: ServerSslMode,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Store {
    pub fn tls(&self) -> ServerTls {
        ServerTls {
            sslmode: self.sslmode,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }
}

/// The password never reaches a log line, even through `{:?}`.
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("dbname", &self.dbname)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("pool_size", &self.pool_size)
            .field("sslmode", &self.sslmode)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Total time a login may spend retrying through a rotation before the client is told.
    pub login_retry_budget_ms: u64,
    /// A cached credential is re-fetched after this long even without a notification.
    pub credential_ttl_secs: u64,
    /// While the secrets store is unreachable, the last credential it gave keeps serving for
    /// this long (with a warning and a metric); 0 turns that off.
    pub stale_credential_secs: u64,
    pub backend_connect_timeout_ms: u64,
    /// Clients served at once; more wait in the kernel's accept queue.
    pub max_clients: usize,
    /// How long a new client may take to send its startup packet (and finish TLS): a client
    /// that connects and stays silent would otherwise hold one of `max_clients` for good.
    pub client_login_timeout_ms: u64,
    /// Clients of one source (IP address, or OS user on the Unix socket) that may be waiting
    /// to send their startup packet at once: one host's silent connections cannot take every
    /// `max_clients` slot.
    pub max_pending_logins_per_source: usize,
    /// How long SIGTERM waits for sessions to finish.
    pub drain_timeout_secs: u64,
    /// Idle server connections kept per (server, database, user, client parameters) for the
    /// next client; 0 turns session pooling off.
    pub pool_max_idle: usize,
    /// Idle server connections kept in all, whatever their key: past it, the one idle longest
    /// is closed to make room. Clients that each send other startup parameters would
    /// otherwise park up to `pool_max_idle` connections per combination.
    pub pool_max_idle_total: usize,
    /// A server connection is not reused after this long, so sessions logged in with a
    /// credential that has since rotated age out.
    pub server_lifetime_secs: u64,
    /// In transaction mode, how long a client waits for a free server session of its route.
    pub pool_wait_timeout_ms: u64,
    /// Hand long-lived plain (not TLS) session-mode sessions to the kernel to relay (eBPF
    /// sockmap; needs CAP_BPF and CAP_NET_ADMIN, else the proxy says so and relays in user
    /// space). See `kernel_relay.rs`.
    pub kernel_relay: bool,
    /// How long a session is relayed in user space before it is handed to the kernel: its
    /// server connection then closes with it instead of returning to the pool, so a client
    /// that connects per transaction must not be handed over.
    pub kernel_relay_after_ms: u64,
}

impl Limits {
    /// For a reload: keeps `running`'s values of the limits the proxy built its parts from at
    /// start (the client slots, the pool, the credential cache, the drain), and names those
    /// the new file changed; they take effect at the next start.
    pub fn keep_startup_only(&mut self, running: &Limits) -> Vec<&'static str> {
        fn keep<T: PartialEq + Copy>(
            name: &'static str,
            new: &mut T,
            running: T,
        ) -> Option<&'static str> {
            let changed = *new != running;
            *new = running;
            changed.then_some(name)
        }
        [
            keep("max_clients", &mut self.max_clients, running.max_clients),
            keep(
                "drain_timeout_secs",
                &mut self.drain_timeout_secs,
                running.drain_timeout_secs,
            ),
            keep(
                "pool_max_idle",
                &mut self.pool_max_idle,
                running.pool_max_idle,
            ),
            keep(
                "pool_max_idle_total",
                &mut self.pool_max_idle_total,
                running.pool_max_idle_total,
            ),
            keep(
                "server_lifetime_secs",
                &mut self.server_lifetime_secs,
                running.server_lifetime_secs,
            ),
            keep("kernel_relay", &mut self.kernel_relay, running.kernel_relay),
            keep(
                "credential_ttl_secs",
                &mut self.credential_ttl_secs,
                running.credential_ttl_secs,
            ),
            keep(
                "stale_credential_secs",
                &mut self.stale_credential_secs,
                running.stale_credential_secs,
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            login_retry_budget_ms: 10_000,
            credential_ttl_secs: 300,
            stale_credential_secs: 300,
            backend_connect_timeout_ms: 5_000,
            max_clients: 10_000,
            client_login_timeout_ms: 60_000,
            max_pending_logins_per_source: 100,
            drain_timeout_secs: 30,
            pool_max_idle: 100,
            pool_max_idle_total: 200,
            server_lifetime_secs: 3600,
            pool_wait_timeout_ms: 10_000,
            kernel_relay: true,
            kernel_relay_after_ms: 1_000,
        }
    }
}

/// What a client asks for (database, optionally user) mapped to the secret with the
/// credentials, and who may use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub database: String,
    pub user: Option<String>,
    pub secret: String,
    /// Identities allowed: "trust" (loopback TCP), "peer:<os user>" / "peer:*" (Unix socket),
    /// "cert:<common name>" / "cert:*" (verified TLS client certificate).
    pub allow: Vec<String>,
    /// Overrides of the credential JSON's host, port and dbname.
    pub host: Option<String>,
    pub port: Option<u16>,
    pub dbname: Option<String>,
    #[serde(default)]
    pub pool_mode: PoolMode,
    /// In transaction mode, how many server sessions the route's clients use at once at most.
    #[serde(default = "default_route_pool_size")]
    pub pool_size: usize,
}

impl Route {
    /// How messages and logs name the route: its database, and its user when it has one,
    /// since a database can have a route per user.
    pub fn name(&self) -> String {
        match &self.user {
            Some(user) => format!("{:?} (user {user:?})", self.database),
            None => format!("{:?}", self.database),
        }
    }
}

/// How long a client holds a server session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// From login to goodbye: every session feature works.
    #[default]
    Session,
    /// For one transaction (or one statement outside a transaction) at a time, so many clients
    /// share a few server sessions; what a session keeps between transactions does not carry
    /// over (PgBouncer's transaction mode).
    Transaction,
}

fn default_route_pool_size() -> usize {
    20
}

fn default_port() -> u16 {
    5432
}

fn default_store_pool_size() -> usize {
    4
}

fn default_dbname() -> String {
    "postgres".into()
}

/// A TOML error with where it is, never with the store's password. The parser's syntax errors
/// quote nothing of the file, but its type errors quote the value (``invalid type: integer
/// `12345` ``), which for `[store] password` is the password, however its key is spelled
/// (a section, an inline table, a dotted or a quoted key): a password that is not a string is
/// reported first, at its own place, in words of ours.
fn parse_error(text: &str, error: &toml::de::Error) -> String {
    let (span, message) = match store_password_not_text(text) {
        Some(span) => (Some(span), "[store] password must be a quoted string"),
        None => (error.span(), error.message()),
    };
    let Some(span) = span else {
        return message.to_string();
    };
    let before = &text[..span.start.min(text.len())];
    let line_number = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    format!("line {line_number}, column {column}: {message}")
}

/// Where the store's password is in `text`, when the file gives one that is not a string.
fn store_password_not_text(text: &str) -> Option<std::ops::Range<usize>> {
    // Only the password is read; every other key is left to the real parse.
    #[derive(Deserialize)]
    struct File {
        store: Option<StorePassword>,
    }
    #[derive(Deserialize)]
    struct StorePassword {
        password: Option<toml::Spanned<toml::Value>>,
    }
    let password = toml::from_str::<File>(text).ok()?.store?.password?;
    (!password.get_ref().is_str()).then(|| password.span())
}

impl Config {
    pub fn from_file(path: &std::path::Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let config: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.listen.tcp.is_none() && self.listen.unix_dir.is_none() {
            return Err("[listen] needs tcp, unix_dir or both".into());
        }
        if self.listen.unix_dir.is_some()
            && self.listen.tcp.is_none()
            && self.listen.unix_port.is_none()
        {
            return Err("[listen] unix_dir without tcp needs unix_port".into());
        }
        if self.listen.unix_socket_mode > 0o777 {
            return Err(format!(
                "[listen] unix_socket_mode must be permission bits, 0o000 to 0o777, not 0o{:o}",
                self.listen.unix_socket_mode
            ));
        }
        if self
            .listen
            .threads
            .is_some_and(|threads| !(1..=MAX_THREADS).contains(&threads))
        {
            return Err(format!("[listen] threads must be 1 to {MAX_THREADS}"));
        }
        self.server_tls.check("[server_tls]")?;
        if self.server_login.methods.is_empty() {
            return Err(
                "[server_login] methods lists none: no server could be logged in to".into(),
            );
        }
        self.store.tls().check("[store]")?;
        if self.store.sslmode != ServerSslMode::Disable && self.store.host.starts_with('/') {
            return Err(
                "[store] TLS needs a TCP host: PostgreSQL offers no TLS on a Unix socket".into(),
            );
        }
        // The bounds keep counts within what a semaphore can hold (and 0 from serving no one).
        const MOST: usize = 1_000_000;
        if !(1..=MOST).contains(&self.limits.max_clients) {
            return Err(format!("[limits] max_clients must be 1 to {MOST}"));
        }
        if self.limits.client_login_timeout_ms == 0 {
            return Err("[limits] client_login_timeout_ms must be at least 1".into());
        }
        if self.limits.backend_connect_timeout_ms == 0 {
            return Err("[limits] backend_connect_timeout_ms must be at least 1".into());
        }
        if self.limits.max_pending_logins_per_source == 0 {
            return Err("[limits] max_pending_logins_per_source must be at least 1".into());
        }
        if self.store.pool_size == 0 {
            return Err("[store] pool_size must be at least 1".into());
        }
        if self.store.password.is_some() && self.store.password_file.is_some() {
            return Err("[store] give password or password_file, not both".into());
        }
        for (index, route) in self.routes.iter().enumerate() {
            let place = format!("route {} (database {:?})", index + 1, route.database);
            // An empty name matches no client and names no secret: a typo, not a wish.
            let names = [
                ("database", Some(&route.database)),
                ("secret", Some(&route.secret)),
                ("user", route.user.as_ref()),
                ("host", route.host.as_ref()),
                ("dbname", route.dbname.as_ref()),
            ];
            if let Some((key, _)) = names
                .iter()
                .find(|(_, name)| name.is_some_and(|name| name.is_empty()))
            {
                return Err(format!("{place}: {key} must not be empty"));
            }
            if route.allow.is_empty() {
                return Err(format!("{place}: allow lists nobody"));
            }
            for entry in &route.allow {
                let known = entry == "trust"
                    || ["peer:", "cert:"].iter().any(|prefix| {
                        entry
                            .strip_prefix(prefix)
                            .is_some_and(|name| !name.is_empty())
                    });
                if !known {
                    return Err(format!(
                        "{place}: allow entry {entry:?} is not \"trust\", \"peer:<user>\", \"cert:<name>\" or a * form"
                    ));
                }
                // An entry no client could ever match is a mistake the file should not hide.
                if entry.starts_with("peer:") && self.listen.unix_dir.is_none() {
                    return Err(format!(
                        "{place}: allow entry {entry:?} needs [listen] unix_dir: peer identity is the OS user on the Unix socket"
                    ));
                }
                let verifies_certificates = self
                    .tls
                    .as_ref()
                    .is_some_and(|tls| tls.client_ca_file.is_some());
                if entry.starts_with("cert:") && !verifies_certificates {
                    return Err(format!(
                        "{place}: allow entry {entry:?} needs [tls] client_ca_file: without it no client certificate is asked for"
                    ));
                }
            }
            if !(1..=MOST).contains(&route.pool_size) {
                return Err(format!("{place}: pool_size must be 1 to {MOST}"));
            }
            // Each transaction hands its server session back to the idle pool; one the pool
            // may not keep would be closed, and the next transaction would log in anew.
            if route.pool_mode == PoolMode::Transaction {
                let keeps = [
                    ("pool_max_idle", self.limits.pool_max_idle),
                    ("pool_max_idle_total", self.limits.pool_max_idle_total),
                ];
                for (key, kept) in keeps {
                    if route.pool_size > kept {
                        return Err(format!(
                            "{place}: pool_mode \"transaction\" needs [limits] {key} (now {kept}) at least its pool_size ({})",
                            route.pool_size
                        ));
                    }
                }
                if self.limits.server_lifetime_secs == 0 {
                    return Err(format!(
                        "{place}: pool_mode \"transaction\" needs [limits] server_lifetime_secs above 0: a session that may not be kept logs in again for every transaction"
                    ));
                }
            }
            let duplicate = self.routes[..index]
                .iter()
                .any(|other| other.database == route.database && other.user == route.user);
            if duplicate {
                return Err(format!(
                    "{place}: another route has the same database and user"
                ));
            }
        }
        Ok(())
    }

    /// The route for what a client asked: an exact (database, user) route first, then the
    /// database's route without a user.
    pub fn route(&self, database: &str, user: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| r.database == database && r.user.as_deref() == Some(user))
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| r.database == database && r.user.is_none())
            })
    }

    pub fn store_password(&self) -> Result<Option<String>, String> {
        match (&self.store.password, &self.store.password_file) {
            (Some(password), _) => Ok(Some(password.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|text| Some(text.trim_end_matches('\n').to_string()))
                .map_err(|e| format!("cannot read [store] password_file {}: {e}", path.display())),
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Config;

    const BASE: &str = r#"
        [listen]
        tcp = "127.0.0.1:6432"
        [store]
        host = "127.0.0.1"
        user = "proxy"
    "#;

    fn with(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}\n{extra}"))
    }

    #[test]
    fn parse_errors_never_quote_the_store_password() {
        let listen = "[listen]\ntcp = \"127.0.0.1:6432\"\n";
        // Every spelling of the key, with values of every type that is not a string, and
        // values that are not TOML at all.
        for store in [
            "[store]\npassword = 12345",
            "[store]\npassword = 12345.5",
            "[store]\npassword = +inf",
            "[store]\npassword = true",
            "[store]\n\"password\" = 12345",
            "store.password = 12345",
            "store = { host = \"h\", password = 12345 }",
            "store = {\n  host = \"h\",\n  password = 12345,\n}",
            "[store]\npassword = [\"hunter2\", 1]",
            "[store]\npassword = { a = \"hunter2\" }",
            "[store]\npassword = hunter2",
            "[store]\npassword = \"hunt\\qer2\"",
            "[store]\npassword = \"hunter2\" hunter3",
            "[store]\npassword = 'hunter2",
        ] {
            let error = Config::parse(&format!("{listen}{store}")).unwrap_err();
            assert!(
                !error.contains("hunt") && !error.contains("12345") && !error.contains("inf"),
                "{store}: {error}"
            );
            assert!(error.starts_with("line "), "{store}: {error}");
        }
        let error = with("password = 12345").unwrap_err();
        assert!(
            error.contains("[store] password must be a quoted string"),
            "{error}"
        );
        // At the password's own place, also when another key fails before it.
        let error = Config::parse(
            "[listen]\ntcp = 5\n[store]\nhost = \"h\"\nuser = \"u\"\npassword = 12345",
        )
        .unwrap_err();
        assert_eq!(
            error,
            "line 6, column 12: [store] password must be a quoted string"
        );
        // Other values keep the parser's message, with where it is.
        let error = with("port = \"x\"").unwrap_err();
        assert!(error.starts_with("line "), "{error}");
        assert!(error.contains("invalid type"), "{error}");
    }

    #[test]
    fn debug_output_hides_the_store_password() {
        let config = with("password = \"hunter2\"").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn defaults_and_route_matching() {
        let with_a_unix_socket = BASE.replace("[store]", "unix_dir = \"/tmp\"\n[store]");
        let config = Config::parse(&format!(
            r#"{with_a_unix_socket}
            [[route]]
            database = "app"
            secret = "db/app"
            allow = ["trust"]
            [[route]]
            database = "app"
            user = "reporting"
            secret = "db/app-ro"
            allow = ["peer:*"]
            "#
        ))
        .unwrap();
        // A database with a route per user: messages name both.
        assert_eq!(config.route("app", "anyone").unwrap().name(), r#""app""#);
        assert_eq!(
            config.route("app", "reporting").unwrap().name(),
            r#""app" (user "reporting")"#
        );
        assert_eq!(config.listen.threads, None);
        assert_eq!(config.store.port, 5432);
        assert_eq!(config.limits.login_retry_budget_ms, 10_000);
        assert_eq!(config.server_login.methods.len(), 4);
        let route = config.route("app", "anyone").unwrap();
        assert_eq!(
            (route.pool_mode, route.pool_size),
            (super::PoolMode::Session, 20)
        );
        assert_eq!(config.limits.pool_wait_timeout_ms, 10_000);
        assert_eq!(config.limits.client_login_timeout_ms, 60_000);
        assert_eq!(config.limits.max_pending_logins_per_source, 100);
        assert_eq!(
            config.route("app", "reporting").unwrap().secret,
            "db/app-ro"
        );
        assert_eq!(config.route("app", "anyone").unwrap().secret, "db/app");
        assert!(config.route("other", "anyone").is_none());
    }

    #[test]
    fn every_rejected_configuration_says_why() {
        let route = |allow: &str| {
            format!("[[route]]\ndatabase = \"d\"\nsecret = \"s\"\nallow = [{allow}]\n")
        };
        let cases = [
            (
                "[listen]\n[store]\nhost = \"h\"\nuser = \"u\"".to_string(),
                "needs tcp, unix_dir or both",
            ),
            (
                "[listen]\nunix_dir = \"/tmp\"\n[store]\nhost = \"h\"\nuser = \"u\"".to_string(),
                "needs unix_port",
            ),
            (
                format!("{BASE}\npassword = \"a\"\npassword_file = \"/f\""),
                "not both",
            ),
            (format!("{BASE}\n{}", route("")), "allow lists nobody"),
            (
                format!("{BASE}\n{}", route("\"trust\"").replace("\"d\"", "\"\"")),
                "database must not be empty",
            ),
            (
                format!("{BASE}\n{}", route("\"trust\"").replace("\"s\"", "\"\"")),
                "secret must not be empty",
            ),
            (
                format!("{BASE}\n{}user = \"\"", route("\"trust\"")),
                "user must not be empty",
            ),
            (
                format!("{BASE}\n{}host = \"\"", route("\"trust\"")),
                "host must not be empty",
            ),
            (
                format!("{BASE}\n{}dbname = \"\"", route("\"trust\"")),
                "dbname must not be empty",
            ),
            (format!("{BASE}\n{}", route("\"md5\"")), "is not \"trust\""),
            (
                format!("{BASE}\n{}", route("\"peer:\"")),
                "is not \"trust\"",
            ),
            (
                format!("{BASE}\n{}", route("\"trust\", \"peer:app\"")),
                "needs [listen] unix_dir",
            ),
            (
                format!("{BASE}\n{}", route("\"cert:billing\"")),
                "needs [tls] client_ca_file",
            ),
            (
                format!("{BASE}\n{}{}", route("\"trust\""), route("\"trust\"")),
                "same database and user",
            ),
            (format!("{BASE}\nbogus = 1"), "unknown field"),
            (
                BASE.replace("[store]", "unix_socket_mode = 0o1777\n[store]"),
                "unix_socket_mode must be permission bits",
            ),
            (
                format!("{BASE}\npool_size = 0"),
                "pool_size must be at least 1",
            ),
            (
                format!("{BASE}\n[server_tls]\nsslmode = \"verify-full\""),
                "needs ca_file",
            ),
            (
                format!("{BASE}\n[server_tls]\nsslmode = \"prefer\""),
                "unknown variant `prefer`",
            ),
            (
                format!("{BASE}\nsslmode = \"verify-full\""),
                "[store] sslmode = \"verify-full\" needs ca_file",
            ),
            (
                "[listen]\ntcp = \"127.0.0.1:1\"\n[store]\nhost = \"/run/postgresql\"\n\
                 user = \"u\"\nsslmode = \"require\""
                    .to_string(),
                "TLS needs a TCP host",
            ),
            (
                format!("{BASE}\n[server_tls]\nsslmode = \"require\"\ncert_file = \"/c.pem\""),
                "[server_tls] cert_file and key_file go together",
            ),
            (
                format!("{BASE}\ncert_file = \"/c.pem\"\nkey_file = \"/c.key\""),
                "[store] a client certificate needs TLS",
            ),
            (
                format!("{BASE}\n[server_tls]\nsslmode = \"require\"\nca_file = \"/ca.pem\""),
                "[server_tls] ca_file is used by sslmode = \"verify-full\" only",
            ),
            (
                format!("{BASE}\n[[route]]\ndatabase = \"d\"\nallow = [\"trust\"]"),
                "missing field `secret`",
            ),
            (
                format!("{BASE}\n[server_login]\nmethods = []"),
                "[server_login] methods lists none",
            ),
            (
                format!("{BASE}\n[server_login]\nmethods = [\"scram-sha-256\", \"gss\"]"),
                "unknown variant `gss`",
            ),
            (
                format!("{BASE}\n{}pool_size = 0", route("\"trust\"")),
                "route 1 (database \"d\"): pool_size must be 1 to 1000000",
            ),
            (
                format!(
                    "{BASE}\n[limits]\npool_max_idle = 9223372036854775807\n{}pool_size = 9223372036854775807",
                    route("\"trust\"")
                ),
                "route 1 (database \"d\"): pool_size must be 1 to 1000000",
            ),
            (
                BASE.replace("[store]", "threads = 0\n[store]"),
                "[listen] threads must be 1 to 256",
            ),
            (
                BASE.replace("[store]", "threads = 257\n[store]"),
                "[listen] threads must be 1 to 256",
            ),
            (
                format!("{BASE}\n[limits]\nmax_clients = 0"),
                "[limits] max_clients must be 1 to 1000000",
            ),
            (
                format!("{BASE}\n[limits]\nmax_clients = 4294967297"),
                "[limits] max_clients must be 1 to 1000000",
            ),
            (
                format!("{BASE}\n[limits]\nclient_login_timeout_ms = 0"),
                "[limits] client_login_timeout_ms must be at least 1",
            ),
            (
                format!("{BASE}\n[limits]\nbackend_connect_timeout_ms = 0"),
                "[limits] backend_connect_timeout_ms must be at least 1",
            ),
            (
                format!("{BASE}\n[limits]\nmax_pending_logins_per_source = 0"),
                "[limits] max_pending_logins_per_source must be at least 1",
            ),
            (
                format!("{BASE}\n{}pool_mode = \"statement\"", route("\"trust\"")),
                "unknown variant `statement`",
            ),
            (
                format!(
                    "{BASE}\n[limits]\npool_max_idle = 5\n{}pool_mode = \"transaction\"",
                    route("\"trust\"")
                ),
                "needs [limits] pool_max_idle (now 5) at least its pool_size (20)",
            ),
            (
                format!(
                    "{BASE}\n[limits]\npool_max_idle_total = 0\n{}pool_mode = \"transaction\"",
                    route("\"trust\"")
                ),
                "needs [limits] pool_max_idle_total (now 0) at least its pool_size (20)",
            ),
            (
                format!(
                    "{BASE}\n[limits]\nserver_lifetime_secs = 0\n{}pool_mode = \"transaction\"",
                    route("\"trust\"")
                ),
                "needs [limits] server_lifetime_secs above 0",
            ),
        ];
        for (text, words) in cases {
            let error = Config::parse(&text).expect_err(&text);
            assert!(error.contains(words), "{error:?} should say {words:?}");
        }
    }
}
