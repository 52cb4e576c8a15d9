//! The server's side: connect, start up as the credential's user, answer the authentication
//! the server asks for (SCRAM-SHA-256, md5 or cleartext), and collect the greeting the client
//! will be shown (ParameterStatus, BackendKeyData, ReadyForQuery).

use crate::credentials::Credential;
use crate::error::ProxyError;
use bytes::{Buf, BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use secrecy::ExposeSecret;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Login-phase messages from the server are small; anything bigger is not PostgreSQL.
const MAX_LOGIN_MESSAGE: usize = 1 << 20;

/// Where to log in: resolved from the route, the credential and the store's address.
pub struct Target {
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub route: String,
}

pub struct BackendSession {
    pub stream: TcpStream,
    /// The messages after AuthenticationOk, up to and including ReadyForQuery, as sent.
    pub greeting: Vec<BytesMut>,
    /// The server's cancel key, from BackendKeyData.
    pub cancel_key: Option<(i32, i32)>,
    pub address: std::net::SocketAddr,
}

/// One message: type byte, then the body without the length word.
async fn read_message(stream: &mut TcpStream) -> Result<(u8, BytesMut), ProxyError> {
    let gone = |e: std::io::Error| ProxyError::Backend(format!("connection lost: {e}"));
    let tag = stream.read_u8().await.map_err(gone)?;
    let length = stream.read_i32().await.map_err(gone)?;
    if !(4..=MAX_LOGIN_MESSAGE as i32).contains(&length) {
        return Err(ProxyError::Backend(format!("message length {length}")));
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

pub async fn login(
    target: &Target,
    credential: &Credential,
    client_parameters: &BTreeMap<String, String>,
    connect_timeout: Duration,
) -> Result<BackendSession, ProxyError> {
    let address = format!("{}:{}", target.host, target.port);
    let unreachable = |reason: String| ProxyError::Unreachable {
        address: address.clone(),
        reason,
    };
    let mut stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&address))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    stream.set_nodelay(true).ok();
    let peer = stream.peer_addr().map_err(|e| unreachable(e.to_string()))?;

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
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, mut body) = read_message(&mut stream).await?;
        match tag {
            b'R' => {
                if body.len() < 4 {
                    return Err(ProxyError::Backend("short authentication request".into()));
                }
                match body.get_i32() {
                    0 => break,
                    3 => frontend::password_message(password, &mut out),
                    5 if body.len() >= 4 => {
                        let salt = [body[0], body[1], body[2], body[3]];
                        let hash = md5_hash(credential.username.as_bytes(), password, salt);
                        frontend::password_message(hash.as_bytes(), &mut out)
                    }
                    10 => {
                        let offers_scram = body[..]
                            .split(|b| *b == 0)
                            .any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(ProxyError::Backend(
                                "the server offers no SCRAM-SHA-256".into(),
                            ));
                        }
                        let exchange = ScramSha256::new(password, ChannelBinding::unsupported());
                        let result = frontend::sasl_initial_response(
                            SCRAM_SHA_256,
                            exchange.message(),
                            &mut out,
                        );
                        scram = Some(exchange);
                        result
                    }
                    11 => {
                        let exchange = scram.as_mut().ok_or_else(|| {
                            ProxyError::Backend("SASL continue without a start".into())
                        })?;
                        exchange
                            .update(&body)
                            .map_err(|e| ProxyError::Backend(e.to_string()))?;
                        frontend::sasl_response(exchange.message(), &mut out)
                    }
                    12 => {
                        let exchange = scram.as_mut().ok_or_else(|| {
                            ProxyError::Backend("SASL final without a start".into())
                        })?;
                        // Proves the server knew the password too.
                        exchange
                            .finish(&body)
                            .map_err(|e| ProxyError::Backend(e.to_string()))?;
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
    let mut cancel_key = None;
    loop {
        let (tag, body) = read_message(&mut stream).await?;
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
                address: peer,
            });
        }
    }
}

async fn send(stream: &mut TcpStream, out: &mut BytesMut) -> Result<(), ProxyError> {
    stream
        .write_all(out)
        .await
        .map_err(|e| ProxyError::Backend(format!("connection lost: {e}")))?;
    out.clear();
    Ok(())
}
