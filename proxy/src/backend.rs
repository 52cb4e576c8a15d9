//! The server's side: connect, negotiate TLS when configured, start up as the credential's
//! user, answer the authentication the server asks for (SCRAM-SHA-256, md5 or cleartext),
//! and collect the greeting the client will be shown (ParameterStatus, BackendKeyData,
//! ReadyForQuery).

use crate::config::AuthMethod;
use crate::credentials::Credential;
use crate::error::ProxyError;
use crate::scram::{ChannelBinding, ScramCache, ScramExchange};
use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;

/// Authentication messages from the server are small (a SASL message, an error); anything
/// bigger is not PostgreSQL. Every login in flight may hold one.
const MAX_AUTHENTICATION_MESSAGE: usize = 64 * 1024;

/// Where to log in: resolved from the route, the credential and the store's address.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub route: String,
}

/// How every login reaches its server.
pub struct ConnectSettings<'a> {
    pub timeout: Duration,
    /// TLS to servers (`[server_tls]`); `None` connects in plaintext.
    pub tls: Option<TlsConnector>,
    /// `verify-full`: every server must prove who it is, which a Unix socket cannot.
    pub verify_servers: bool,
    pub scram: &'a ScramCache,
    /// `[server_login] methods`.
    pub auth_methods: &'a [AuthMethod],
}

/// A server connection: TCP in plaintext or TLS, or a Unix socket.
pub enum ServerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl ServerStream {
    /// Channel binding data for SCRAM when the session runs over TLS (`None` otherwise, or
    /// when the certificate's algorithm has none).
    fn server_end_point(&self) -> Option<Vec<u8>> {
        match self {
            ServerStream::Tls(stream) => {
                let certificate = stream.get_ref().1.peer_certificates()?.first()?;
                crate::tls::server_end_point(certificate)
            }
            ServerStream::Plain(_) | ServerStream::Unix(_) => None,
        }
    }

    /// The socket underneath when nothing sits between it and the session's bytes (no TLS):
    /// what the kernel relay can take over, TCP or Unix (see `ClientStream` for
    /// `tokio::net::UnixStream` for why a client's Unix socket is not).
    pub fn plain_socket(&self) -> Option<BorrowedFd<'_>> {
        match self {
            ServerStream::Plain(stream) => Some(stream.as_fd()),
            ServerStream::Unix(stream) => Some(stream.as_fd()),
            ServerStream::Tls(_) => None,
        }
    }

    /// An idle server sends nothing; readable data or end-of-stream on the socket underneath
    /// means it was terminated (server restart, idle timeout) or is in an unexpected state.
    /// Bytes read here (TLS records included) are lost, but such a connection is dropped.
    pub fn is_idle_and_open(&self) -> bool {
        let mut probe = [0u8; 1];
        let read = match self {
            ServerStream::Plain(stream) => stream.try_read(&mut probe),
            ServerStream::Tls(stream) => stream.get_ref().0.try_read(&mut probe),
            ServerStream::Unix(stream) => stream.try_read(&mut probe),
        };
        matches!(read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Where a server session runs, for forwarding cancel requests to it.
#[derive(Clone, Debug)]
pub enum ServerAddress {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            ServerStream::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
            ServerStream::Unix(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            ServerStream::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
            ServerStream::Unix(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            ServerStream::Tls(stream) => Pin::new(stream).poll_flush(cx),
            ServerStream::Unix(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            ServerStream::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
            ServerStream::Unix(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

pub struct BackendSession {
    pub stream: ServerStream,
    /// The messages after AuthenticationOk, up to and including ReadyForQuery, as sent.
    pub greeting: Vec<BytesMut>,
    /// The server's cancel key, from BackendKeyData.
    pub cancel_key: Option<(i32, i32)>,
    pub address: ServerAddress,
}

/// One message of at most `max` bytes (its type byte and length word included): type byte,
/// then the body without the length word. A longer one is refused with `too_long`'s message
/// before anything is allocated for it.
async fn read_message(
    stream: &mut ServerStream,
    max: usize,
    too_long: impl FnOnce(i32) -> String,
) -> Result<(u8, BytesMut), ProxyError> {
    let gone = |e: std::io::Error| ProxyError::Backend(format!("connection lost: {e}"));
    let tag = stream.read_u8().await.map_err(gone)?;
    let length = stream.read_i32().await.map_err(gone)?;
    if length < 4 {
        return Err(ProxyError::Backend(format!("message length {length}")));
    }
    if length as usize + 1 > max {
        return Err(ProxyError::Backend(too_long(length)));
    }
    let mut body = BytesMut::zeroed(length as usize - 4);
    stream.read_exact(&mut body).await.map_err(gone)?;
    Ok((tag, body))
}

/// The server's ErrorResponse during login, with its own SQLSTATE and message.
fn refused(target: &Target, body: BytesMut) -> ProxyError {
    let (sqlstate, message) = error_fields(body);
    ProxyError::LoginRefused {
        route: target.route.clone(),
        sqlstate,
        message,
    }
}

fn error_fields(mut body: BytesMut) -> (String, String) {
    let (mut sqlstate, mut message) = (String::from("08006"), String::new());
    while body.has_remaining() {
        let field = body.get_u8();
        if field == 0 {
            break;
        }
        let end = body.iter().position(|b| *b == 0).unwrap_or(body.len());
        let value = String::from_utf8_lossy(&body[..end]).into_owned();
        body.advance((end + 1).min(body.len()));
        match field {
            b'C' => sqlstate = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (sqlstate, message)
}

/// SSLRequest, then the handshake. The server's certificate is checked as `[server_tls]`
/// says, against the host name the connection was made to.
async fn start_tls(
    mut socket: TcpStream,
    connector: &TlsConnector,
    target: &Target,
) -> Result<ServerStream, ProxyError> {
    let failed = |reason: String| ProxyError::ServerTls {
        address: format!("{}:{}", target.host, target.port),
        reason,
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    socket
        .write_all(&request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    match socket.read_u8().await.map_err(|e| failed(e.to_string()))? {
        b'S' => {}
        b'N' => return Err(failed("the server does not accept TLS (ssl = off)".into())),
        other => {
            return Err(failed(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            )))
        }
    }
    let name = ServerName::try_from(target.host.clone())
        .map_err(|_| failed(format!("{:?} is not a host name", target.host)))?;
    let stream = connector
        .connect(name, socket)
        .await
        .map_err(|e| failed(e.to_string()))?;
    Ok(ServerStream::Tls(Box::new(stream)))
}

/// A host that starts with '/' is a directory holding the server's Unix socket, as in libpq;
/// TLS does not apply there (PostgreSQL declines it on Unix sockets, and libpq does not ask).
async fn connect(
    target: &Target,
    settings: &ConnectSettings<'_>,
) -> Result<(ServerStream, ServerAddress), ProxyError> {
    // No timeout of its own: `login` bounds the whole login, this included.
    let unreachable = |address: String, reason: String| ProxyError::Unreachable { address, reason };
    if target.host.starts_with('/') {
        if settings.verify_servers {
            return Err(ProxyError::ServerTls {
                address: target.host.clone(),
                reason: "[server_tls] sslmode = \"verify-full\" and a Unix socket cannot be \
                         verified; give the server's host name"
                    .into(),
            });
        }
        let path = PathBuf::from(&target.host).join(format!(".s.PGSQL.{}", target.port));
        let shown = path.display().to_string();
        let socket = UnixStream::connect(&path)
            .await
            .map_err(|e| unreachable(shown.clone(), e.to_string()))?;
        return Ok((ServerStream::Unix(socket), ServerAddress::Unix(path)));
    }
    let address = format!("{}:{}", target.host, target.port);
    let socket = TcpStream::connect(&address)
        .await
        .map_err(|e| unreachable(address.clone(), e.to_string()))?;
    socket.set_nodelay(true).ok();
    let peer = socket
        .peer_addr()
        .map_err(|e| unreachable(address.clone(), e.to_string()))?;
    let stream = match &settings.tls {
        Some(connector) => start_tls(socket, connector, target).await?,
        None => ServerStream::Plain(socket),
    };
    Ok((stream, ServerAddress::Tcp(peer)))
}

/// Messages, and bytes, a server may send between AuthenticationOk and ReadyForQuery.
/// PostgreSQL sends a few dozen messages, well under 4 KiB; the greeting is kept for as long
/// as the pooled session lives, so a server that sends more is not believed.
const MAX_GREETING_MESSAGES: usize = 1000;
const MAX_GREETING_BYTES: usize = 256 * 1024;

/// Connects and logs in, all within `settings.timeout` or `budget_left`, whichever ends
/// first: a server that accepts and then stalls (in the TLS handshake, the authentication or
/// the greeting) is as unreachable as one that does not answer, and a client waits no longer
/// than the login retry budget for it.
pub async fn login(
    target: &Target,
    credential: &Credential,
    client_parameters: &BTreeMap<String, String>,
    settings: &ConnectSettings<'_>,
    budget_left: Duration,
) -> Result<BackendSession, ProxyError> {
    let limit = settings.timeout.min(budget_left);
    tokio::time::timeout(
        limit,
        log_in(target, credential, client_parameters, settings),
    )
    .await
    .map_err(|_| ProxyError::Unreachable {
        address: format!("{}:{}", target.host, target.port),
        reason: if limit < settings.timeout {
            "no ready session before the login retry budget ran out".to_string()
        } else {
            format!("no ready session within {} ms", limit.as_millis())
        },
    })?
}

async fn log_in(
    target: &Target,
    credential: &Credential,
    client_parameters: &BTreeMap<String, String>,
    settings: &ConnectSettings<'_>,
) -> Result<BackendSession, ProxyError> {
    let (mut stream, address) = connect(target, settings).await?;

    // The client's session settings go along; who and where come from the route.
    let mut parameters: Vec<(&str, &str)> =
        vec![("user", &credential.username), ("database", &target.dbname)];
    parameters.extend(
        client_parameters
            .iter()
            .filter(|(key, _)| !matches!(key.as_str(), "user" | "database"))
            .map(|(key, value)| (key.as_str(), value.as_str())),
    );
    let mut out = BytesMut::new();
    frontend::startup_message(parameters, &mut out)
        .map_err(|e| ProxyError::Backend(e.to_string()))?;
    send(&mut stream, &mut out).await?;

    let password = credential.password.expose_secret().as_bytes();
    let mut scram: Option<ScramExchange> = None;
    // Whether the server asked for any authentication: AuthenticationOk after none is `none`.
    let mut asked = false;
    loop {
        let (tag, mut body) = read_message(&mut stream, MAX_AUTHENTICATION_MESSAGE, |length| {
            format!(
                "a login message of {} bytes, more than {MAX_AUTHENTICATION_MESSAGE}",
                length as i64 + 1
            )
        })
        .await?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(ProxyError::Backend("short authentication request".into()));
                }
                let code = body.get_i32();
                // Once SCRAM has begun, only its own steps may follow, and success only after
                // the server proved it knows the password: a server (or whoever answers in its
                // place) cannot switch to cleartext to collect the password, nor skip its proof.
                if let Some(exchange) = &scram {
                    let allowed = match code {
                        0 => exchange.server_verified(),
                        11 | 12 => true,
                        _ => false,
                    };
                    if !allowed {
                        return Err(ProxyError::Backend(format!(
                            "authentication request {code} in the middle of SCRAM"
                        )));
                    }
                }
                let method = match code {
                    0 if !asked => Some(AuthMethod::None),
                    3 => Some(AuthMethod::Password),
                    5 => Some(AuthMethod::Md5),
                    10 => Some(AuthMethod::ScramSha256),
                    _ => None,
                };
                asked |= matches!(code, 3 | 5 | 10);
                if let Some(method) = method.filter(|m| !settings.auth_methods.contains(m)) {
                    return Err(ProxyError::AuthMethodNotAllowed {
                        address: format!("{}:{}", target.host, target.port),
                        method,
                    });
                }
                match code {
                    0 => break,
                    3 => frontend::password_message(password, &mut out),
                    5 => {
                        let Some(&[a, b, c, d]) = body.get(..4) else {
                            return Err(ProxyError::Backend(
                                "an md5 request without its 4-byte salt".into(),
                            ));
                        };
                        let salt = [a, b, c, d];
                        let hash = md5_hash(credential.username.as_bytes(), password, salt);
                        frontend::password_message(hash.as_bytes(), &mut out)
                    }
                    10 => {
                        let offers = |mechanism: &str| {
                            body[..]
                                .split(|b| *b == 0)
                                .any(|m| m == mechanism.as_bytes())
                        };
                        if !offers(SCRAM_SHA_256) {
                            return Err(ProxyError::Backend(
                                "the server offers no SCRAM-SHA-256".into(),
                            ));
                        }
                        let binding = match stream.server_end_point() {
                            None => ChannelBinding::Unsupported,
                            Some(_) if !offers(SCRAM_SHA_256_PLUS) => ChannelBinding::NotOffered,
                            Some(data) => ChannelBinding::ServerEndPoint(data),
                        };
                        let exchange = ScramExchange::start(binding);
                        let result = frontend::sasl_initial_response(
                            exchange.mechanism(),
                            &exchange.client_first(),
                            &mut out,
                        );
                        scram = Some(exchange);
                        result
                    }
                    11 => {
                        let exchange = scram.as_mut().ok_or_else(|| {
                            ProxyError::Backend("SASL continue without a start".into())
                        })?;
                        let client_final = exchange
                            .client_final(&body, password, settings.scram)
                            .await
                            .map_err(ProxyError::Backend)?;
                        frontend::sasl_response(&client_final, &mut out)
                    }
                    12 => {
                        let exchange = scram.as_mut().ok_or_else(|| {
                            ProxyError::Backend("SASL final without a start".into())
                        })?;
                        // Proves the server knew the password too.
                        exchange
                            .verify_server_final(&body)
                            .map_err(ProxyError::Backend)?;
                        continue;
                    }
                    code => {
                        return Err(ProxyError::Backend(format!(
                            "unsupported authentication request {code}"
                        )))
                    }
                }
                .map_err(|e| ProxyError::Backend(e.to_string()))?;
                send(&mut stream, &mut out).await?;
            }
            b'E' => return Err(refused(target, body)),
            b'N' | b'v' => {}
            other => {
                return Err(ProxyError::Backend(format!(
                    "unexpected message {:?} during login",
                    other as char
                )))
            }
        }
    }

    let mut greeting = Vec::new();
    let mut greeting_bytes = 0;
    let mut cancel_key = None;
    loop {
        if greeting.len() >= MAX_GREETING_MESSAGES {
            return Err(ProxyError::Backend(format!(
                "more than {MAX_GREETING_MESSAGES} messages before ReadyForQuery"
            )));
        }
        let (tag, body) = read_message(&mut stream, MAX_GREETING_BYTES - greeting_bytes, |_| {
            format!("more than {MAX_GREETING_BYTES} bytes before ReadyForQuery")
        })
        .await?;
        greeting_bytes += body.len() + 5;
        match tag {
            b'E' => return Err(refused(target, body)),
            b'K' if body.len() == 8 => {
                let mut key = body.clone();
                cancel_key = Some((key.get_i32(), key.get_i32()));
            }
            _ => {}
        }
        let mut raw = BytesMut::with_capacity(body.len() + 5);
        raw.put_u8(tag);
        raw.put_i32(body.len() as i32 + 4);
        raw.extend_from_slice(&body);
        greeting.push(raw);
        if tag == b'Z' {
            return Ok(BackendSession {
                stream,
                greeting,
                cancel_key,
                address,
            });
        }
    }
}

async fn send(stream: &mut ServerStream, out: &mut BytesMut) -> Result<(), ProxyError> {
    let lost = |e: std::io::Error| ProxyError::Backend(format!("connection lost: {e}"));
    stream.write_all(out).await.map_err(lost)?;
    stream.flush().await.map_err(lost)?;
    out.clear();
    Ok(())
}
