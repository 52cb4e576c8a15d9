//! The proxy's one error type. Every variant knows the SQLSTATE the client sees and whether
//! trying again (another credential, later) can help.

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("invalid startup packet: {0}")]
    Protocol(String),
    #[error("unsupported frontend protocol {major}.{minor}: the proxy speaks 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    // Names a client sent are written escaped ({:?}): one with a line break in it must not
    // forge a line of the proxy's log.
    #[error("no route for database {database:?} and user {user:?}")]
    UnknownRoute { database: String, user: String },
    #[error("{identity} may not use the route for database {database:?}")]
    NotAllowed { identity: String, database: String },
    #[error("the secrets store could not give the credential of \"{secret}\": {reason}")]
    Store { secret: String, reason: String },
    /// The store answered, and the answer will not change by asking again (no such secret,
    /// no `get` on it, not credential JSON, the proxy's own login refused): no retry. Said
    /// to the client as `Store` is.
    #[error("the secrets store could not give the credential of \"{secret}\": {reason}")]
    StoreRefused { secret: String, reason: String },
    #[error("could not reach the database server {address}: {reason}")]
    Unreachable { address: String, reason: String },
    /// The database server refused the login; `sqlstate` and `message` are its own.
    #[error("the database server refused the login for route {route}: {message}")]
    LoginRefused {
        route: String,
        sqlstate: String,
        message: String,
    },
    /// `[server_tls]` asked for TLS and the server could not give it as asked.
    #[error("TLS to the database server {address} failed: {reason}")]
    ServerTls { address: String, reason: String },
    #[error("the database server {address} asked for {method} authentication, which [server_login] methods does not allow")]
    AuthMethodNotAllowed {
        address: String,
        method: crate::config::AuthMethod,
    },
    #[error("the database server sent something unexpected during login: {0}")]
    Backend(String),
    #[error("no server session of route {route} became free within {waited_ms} ms: its pool_size of {pool_size} are all in use")]
    PoolTimeout {
        route: String,
        waited_ms: u64,
        pool_size: usize,
    },
    #[error("no startup packet within {0} ms ([limits] client_login_timeout_ms)")]
    LoginTimeout(u64),
    #[error(
        "too many connections from {from} that have not sent a startup packet yet (at most \
         {limit}: [limits] max_pending_logins_per_source)"
    )]
    TooManyPendingLogins { from: String, limit: usize },
    #[error("the proxy is shutting down")]
    ShuttingDown,
    #[error("this proxy requires TLS: connect with sslmode=require or stronger")]
    TlsRequired,
    #[error("the setting {0:?} is not passed to the server: it would hold a server connection past the proxy's login")]
    RefusedSetting(String),
    #[error("the switch {0:?} in options is not passed to the server: only -c name=value and --name=value are")]
    UnsupportedOption(String),
}

/// A value written to the log on one line: control characters are escaped, so that text the
/// database server or the store returned (a login refusal quotes the setting value a client
/// sent, line breaks included) cannot forge a line of the log.
pub struct OneLine<T>(pub T);

impl<T: std::fmt::Display> std::fmt::Display for OneLine<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for character in self.0.to_string().chars() {
            if character.is_control() {
                write!(f, "{}", character.escape_default())?;
            } else {
                f.write_char(character)?;
            }
        }
        Ok(())
    }
}

impl ProxyError {
    pub fn sqlstate(&self) -> &str {
        match self {
            ProxyError::Protocol(_) => "08P01",
            // As PostgreSQL answers a protocol version (or a request code) it does not serve.
            ProxyError::UnsupportedProtocol { .. } => "0A000",
            ProxyError::UnknownRoute { .. } => "3D000",
            ProxyError::NotAllowed { .. }
            | ProxyError::TlsRequired
            | ProxyError::AuthMethodNotAllowed { .. } => "28000",
            ProxyError::Store { .. } | ProxyError::StoreRefused { .. } => "08006",
            ProxyError::Unreachable { .. } | ProxyError::ServerTls { .. } => "08001",
            ProxyError::LoginRefused { sqlstate, .. } => sqlstate,
            ProxyError::Backend(_) => "08P01",
            ProxyError::PoolTimeout { .. } | ProxyError::TooManyPendingLogins { .. } => "53300",
            ProxyError::ShuttingDown => "57P01",
            ProxyError::RefusedSetting(_) => "42501",
            ProxyError::UnsupportedOption(_) => "0A000",
            // What PostgreSQL says when authentication_timeout passes.
            ProxyError::LoginTimeout(_) => "57014",
        }
    }

    /// A refused login during a rotation, or a store or server that is briefly away: another
    /// credential or a later attempt can succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ProxyError::LoginRefused { sqlstate, .. } => sqlstate == "28P01" || sqlstate == "28000",
            ProxyError::Store { .. } | ProxyError::Unreachable { .. } => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{OneLine, ProxyError};

    #[test]
    fn text_the_server_chose_is_logged_on_one_line() {
        let error = ProxyError::LoginRefused {
            route: "\"demo\"".into(),
            sqlstate: "22023".into(),
            message: "invalid value for parameter \"work_mem\": \"1\n2026-11-28 INFO \
                      session started\r\u{1b}[0m\""
                .into(),
        };
        assert_eq!(
            OneLine(&error).to_string(),
            r#"the database server refused the login for route "demo": invalid value for parameter "work_mem": "1\n2026-11-28 INFO session started\r\u{1b}[0m""#
        );
    }

    #[test]
    fn names_from_clients_cannot_break_a_log_line() {
        let error = ProxyError::UnknownRoute {
            database: "app\n2026-11-26 INFO forged".into(),
            user: "u\r".into(),
        };
        let text = error.to_string();
        assert!(!text.contains('\n') && !text.contains('\r'), "{text}");
        assert_eq!(
            text,
            r#"no route for database "app\n2026-11-26 INFO forged" and user "u\r""#
        );
    }
}
