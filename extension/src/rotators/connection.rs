//! The connections the database rotators make to their targets: how a credential becomes a
//! login, TLS to servers over TCP (`pg_secrets.rotator_sslmode`), the rule that a login is
//! made only where the server checks its password, and the thread each connection runs on.

use super::Credential;
use crate::settings::{self, RotatorSslMode};
use pgrx::prelude::*;
use postgres::config::{ChannelBinding, SslMode};
use postgres::error::SqlState;
use std::fmt;
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

/// A user and password on the server a credential names.
pub struct Login {
    /// Everything but the password, which `connect` adds only once the server asks for it.
    config: postgres::Config,
    /// `None`: plaintext, on a Unix socket or where `rotator_sslmode = disable`.
    tls: Option<MakeRustlsConnect>,
    /// What was asked of a server over TCP, for errors; `None` on a Unix socket.
    sslmode: Option<RotatorSslMode>,
    user: String,
    password: Zeroizing<String>,
}

impl Login {
    /// `login`'s user and password on the server `target` names; an empty host is this
    /// cluster, reached through its own Unix socket. Built here, where settings and SPI may be
    /// read, and used on the connection thread. Fails only when the TLS settings cannot be
    /// used (a CA file that cannot be read).
    pub fn new(login: &Credential, target: &Credential) -> Result<Login, String> {
        let timeout = settings::rotator_timeout();
        let mut config = postgres::Config::new();
        config
            .user(login.username())
            .dbname(target.dbname())
            .application_name("pg_secrets rotation")
            .connect_timeout(timeout)
            .options(&format!("-c statement_timeout={}", timeout.as_millis()));
        let (mut tls, mut sslmode) = (None, None);
        match target.host() {
            Some(host) => {
                config
                    .host(host)
                    .port(target.port().expect("checked by parse"));
                // A host that is a directory is a Unix socket, where TLS has nothing to add.
                if !host.starts_with('/') {
                    let mode = settings::rotator_sslmode();
                    tls = tls_over_tcp(&mut config, mode)?;
                    sslmode = Some(mode);
                }
            }
            None => {
                let (socket_dir, port) = own_socket();
                config.host(&socket_dir).port(port);
            }
        }
        Ok(Login {
            config,
            tls,
            sslmode,
            user: login.username().to_string(),
            password: Zeroizing::new(login.password().to_string()),
        })
    }

    /// Connects, but only where the server checks the password. It first connects without
    /// one: a server that lets that in (trust, peer or ident authentication) would let anyone
    /// who can write a credential act there as its user from this server's network position
    /// (its own Unix socket, as the operating system's postgres user), so it is refused. This
    /// is the rule dblink and postgres_fdw apply to non-superusers. PostgreSQL logs nothing
    /// when a client leaves as it is asked for a password (psql does that too).
    pub fn connect(&self) -> Result<postgres::Client, ConnectError> {
        match self.open(&self.config) {
            Ok(_) => {
                return Err(ConnectError::PasswordNotChecked {
                    user: self.user.clone(),
                })
            }
            Err(ConnectError::Server(error)) if asked_for_password(&error) => {}
            Err(error) => return Err(error),
        }
        let mut config = self.config.clone();
        config.password(self.password.as_str());
        // Under `require`: any certificate, but SCRAM bound to this TLS session, so a login
        // someone in the middle relays fails, and md5 or cleartext, which cannot be bound, are
        // refused before the password is sent. Not for the probe above: without a password
        // there is nothing to bind, and a server that lets it in must be told apart.
        if self.sslmode == Some(RotatorSslMode::Require) {
            config.channel_binding(ChannelBinding::Require);
        }
        self.open(&config)
    }

    fn open(&self, config: &postgres::Config) -> Result<postgres::Client, ConnectError> {
        let opened = match &self.tls {
            Some(tls) => config.connect(tls.clone()),
            None => config.connect(postgres::NoTls),
        };
        opened.map_err(|error| match self.sslmode {
            Some(sslmode) if is_tls_failure(&error) => ConnectError::Tls { error, sslmode },
            _ => ConnectError::Server(error),
        })
    }
}

/// What `pg_secrets.rotator_sslmode` asks of a server reached over TCP. A rotation sends the
/// target its admin's or its user's password (if the server asks for it in cleartext or md5)
/// and learns the new one's verifier: in plaintext, anyone on the path could take either.
fn tls_over_tcp(
    config: &mut postgres::Config,
    sslmode: RotatorSslMode,
) -> Result<Option<MakeRustlsConnect>, String> {
    let builder = match sslmode {
        RotatorSslMode::Disable => {
            config.ssl_mode(SslMode::Disable);
            return Ok(None);
        }
        // The login binds SCRAM to the session (`connect`).
        RotatorSslMode::Require => pg_secrets_tls::encryption_only()?,
        RotatorSslMode::VerifyFull => {
            const SETTING: &str = "pg_secrets.rotator_ssl_root_cert";
            let roots = match settings::rotator_ssl_root_cert().as_str() {
                "system" => pg_secrets_tls::system_roots(SETTING)?,
                file => pg_secrets_tls::load_roots(std::path::Path::new(file), SETTING)?,
            };
            pg_secrets_tls::verifying(roots)?
        }
    };
    config.ssl_mode(SslMode::Require);
    Ok(Some(MakeRustlsConnect::new(builder.with_no_client_auth())))
}

/// Whether a connection made without a password failed because the server asked for one:
/// the client library gives up then, before sending anything.
fn asked_for_password(error: &postgres::Error) -> bool {
    error.as_db_error().is_none()
        && std::error::Error::source(error)
            .is_some_and(|cause| cause.to_string() == "password missing")
}

pub enum ConnectError {
    Server(postgres::Error),
    /// No TLS where `sslmode` asked for it, or a certificate it does not accept.
    Tls {
        error: postgres::Error,
        sslmode: RotatorSslMode,
    },
    PasswordNotChecked {
        user: String,
    },
}

impl ConnectError {
    /// The server refused the user or its password.
    pub fn is_login_refused(&self) -> bool {
        matches!(self, ConnectError::Server(error) if matches!(
            error.code(),
            Some(code) if *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        ))
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Server(error) => formatter.write_str(&describe(error)),
            ConnectError::Tls { error, sslmode } => write!(
                formatter,
                "{} (pg_secrets.rotator_sslmode is {}: a target reached over TCP must offer \
                 TLS{}; see the README's Rotation section)",
                describe(error),
                sslmode.name(),
                match sslmode {
                    RotatorSslMode::VerifyFull => {
                        " with a certificate that chains to pg_secrets.rotator_ssl_root_cert \
                         and names the host"
                    }
                    _ => "",
                }
            ),
            ConnectError::PasswordNotChecked { user } => write!(
                formatter,
                "the server let user \"{user}\" in without asking for its password (trust, \
                 peer or ident authentication); a rotation logs in only where the password is \
                 checked, so require scram-sha-256 for it in pg_hba.conf"
            ),
        }
    }
}

/// A handshake that failed, or a server without TLS: the client library tells these from other
/// failures only in its message. It reports the failure at the host's last address only (a
/// certificate refused at 127.0.0.1 reads "connection refused" if `::1` came after it).
fn is_tls_failure(error: &postgres::Error) -> bool {
    error.as_db_error().is_none() && error.to_string().starts_with("error performing TLS")
}

/// The server's message or the connection failure; neither ever holds the password.
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        // The client library keeps the cause (the TLS alert, the refused connection) apart.
        None => {
            let mut text = error.to_string();
            let mut cause = std::error::Error::source(error);
            while let Some(reason) = cause {
                let said = reason.to_string();
                if !text.contains(&said) {
                    text = format!("{text}: {said}");
                }
                cause = reason.source();
            }
            text
        }
    }
}

/// Network work on a thread of its own, so the backend can give up on it: after
/// `pg_secrets.rotator_timeout`, at shutdown (the worker must never hold it up) or on a query
/// cancel. The client library bounds only the TCP connect, and the statement timeout needs a
/// server that answers: a target that accepts the connection and then says nothing (in the
/// TLS handshake, the login or a statement) would otherwise hold the step, and the worker
/// with it, for good. The thread touches no PostgreSQL state; an abandoned one ends when the
/// target answers or closes the connection, and `work` checks `StillWanted` before each change
/// it commits, so a target that answers late is not changed after the step was given up (and
/// perhaps taken over by a put).
pub fn off_thread<T: Send + 'static>(
    work: impl FnOnce(&StillWanted) -> std::result::Result<T, String> + Send + 'static,
) -> std::result::Result<T, String> {
    let timeout = settings::rotator_timeout();
    let deadline = std::time::Instant::now() + timeout;
    let wanted = StillWanted::default();
    // Set on every way out of this function: an answer, a deadline, a shutdown, or the
    // PostgreSQL error a cancel raises from check_for_interrupts.
    let _given_up = GiveUpOnDrop(wanted.clone());
    let (done, outcome) = std::sync::mpsc::channel();
    crate::threads::spawn(move || {
        let _ = done.send(work(&wanted));
    })
    .map_err(|error| format!("cannot start the connection's thread: {error}"))?;
    loop {
        match outcome.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if crate::worker::stop_requested() {
                    return Err("stopped: the server is shutting down".into());
                }
                if std::time::Instant::now() >= deadline {
                    return Err(format!(
                        "the target did not answer within pg_secrets.rotator_timeout ({} s)",
                        timeout.as_secs()
                    ));
                }
                pgrx::check_for_interrupts!();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the connection thread ended without an answer".into())
            }
        }
    }
}

/// Whether the backend still waits for the connection thread's answer.
#[derive(Clone, Default)]
pub struct StillWanted(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl StillWanted {
    /// An error once the backend has given up on this work.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("given up: the step ended before the target answered".into());
        }
        Ok(())
    }
}

struct GiveUpOnDrop(StillWanted);

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        (self.0).0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn own_socket() -> (String, u16) {
    let directories =
        Spi::get_one::<String>("SELECT pg_catalog.current_setting('unix_socket_directories')")
            .ok()
            .flatten()
            .unwrap_or_default();
    let socket_dir = directories
        .split(',')
        .map(str::trim)
        .find(|dir| !dir.is_empty())
        .unwrap_or("/var/run/postgresql")
        .to_string();
    let port = unsafe { pg_sys::PostPortNumber } as u16;
    (socket_dir, port)
}
