//! The connections the database rotators make to their targets: how a credential becomes a
//! login, the rule that a login is made only where the server checks its password, and the
//! thread each connection runs on.

use super::Credential;
use crate::settings;
use pgrx::prelude::*;
use postgres::error::SqlState;
use std::fmt;
use zeroize::Zeroizing;

/// A user and password on the server a credential names.
pub struct Login {
    /// Everything but the password, which `connect` adds only once the server asks for it.
    config: postgres::Config,
    user: String,
    password: Zeroizing<String>,
}

impl Login {
    /// `login`'s user and password on the server `target` names; an empty host is this
    /// cluster, reached through its own Unix socket. Built here, where settings and SPI may be
    /// read, and used on the connection thread.
    pub fn new(login: &Credential, target: &Credential) -> Login {
        let timeout = settings::rotator_timeout();
        let mut config = postgres::Config::new();
        config
            .user(login.username())
            .dbname(target.dbname())
            .application_name("pg_secrets rotation")
            .connect_timeout(timeout)
            .options(&format!("-c statement_timeout={}", timeout.as_millis()));
        match target.host() {
            Some(host) => {
                config
                    .host(host)
                    .port(target.port().expect("checked by parse"));
            }
            None => {
                let (socket_dir, port) = own_socket();
                config.host(&socket_dir).port(port);
            }
        }
        Login {
            config,
            user: login.username().to_string(),
            password: Zeroizing::new(login.password().to_string()),
        }
    }

    /// Connects, but only where the server checks the password. It first connects without
    /// one: a server that lets that in (trust, peer or ident authentication) would let anyone
    /// who can write a credential act there as its user from this server's network position
    /// (its own Unix socket, as the operating system's postgres user), so it is refused. This
    /// is the rule dblink and postgres_fdw apply to non-superusers. PostgreSQL logs nothing
    /// when a client leaves as it is asked for a password (psql does that too).
    pub fn connect(&self) -> Result<postgres::Client, ConnectError> {
        match self.config.connect(postgres::NoTls) {
            Ok(_) => {
                return Err(ConnectError::PasswordNotChecked {
                    user: self.user.clone(),
                })
            }
            Err(error) if asked_for_password(&error) => {}
            Err(error) => return Err(ConnectError::Server(error)),
        }
        let mut config = self.config.clone();
        config.password(self.password.as_str());
        config
            .connect(postgres::NoTls)
            .map_err(ConnectError::Server)
    }
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
    PasswordNotChecked { user: String },
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
            ConnectError::PasswordNotChecked { user } => write!(
                formatter,
                "the server let user \"{user}\" in without asking for its password (trust, \
                 peer or ident authentication); a rotation logs in only where the password is \
                 checked, so require scram-sha-256 for it in pg_hba.conf"
            ),
        }
    }
}

/// The server's message or the connection failure; neither ever holds the password.
pub fn describe(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// Network work on a thread of its own, so the backend can give up on it: at shutdown (the
/// worker must never hold it up) or on a query cancel. The thread touches no PostgreSQL
/// state; an abandoned one ends at its own connect or statement timeout.
pub fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> std::result::Result<T, String> + Send + 'static,
) -> std::result::Result<T, String> {
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(work());
    });
    loop {
        match outcome.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if crate::worker::stop_requested() {
                    return Err("stopped: the server is shutting down".into());
                }
                pgrx::check_for_interrupts!();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the connection thread ended without an answer".into())
            }
        }
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
