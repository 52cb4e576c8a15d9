//! The client's side of the handshake: the startup packet (after declining SSL and GSS
//! encryption), cancel requests, and error responses. A length is checked before anything is
//! allocated for it.

use crate::error::ProxyError;
use bytes::{BufMut, BytesMut};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{Authentication, Startup};
use pgwire::messages::{DecodeContext, Message};
use std::collections::BTreeMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Startup-phase packets are small; PostgreSQL itself caps them at 10,000 bytes.
pub const MAX_STARTUP_PACKET: usize = 10_000;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;
/// An SSL and a GSS request may each come once before the startup packet.
const MAX_NEGOTIATIONS: usize = 2;

pub enum Opening {
    Startup(BTreeMap<String, String>),
    Cancel { pid: i32, secret: i32 },
}

fn closed(what: &str) -> ProxyError {
    ProxyError::Protocol(format!("connection closed {what}"))
}

pub async fn read_opening<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> Result<Opening, ProxyError> {
    for _ in 0..=MAX_NEGOTIATIONS {
        let length = stream
            .read_i32()
            .await
            .map_err(|_| closed("before the startup packet"))?;
        if !(8..=MAX_STARTUP_PACKET as i32).contains(&length) {
            return Err(ProxyError::Protocol(format!(
                "packet length {length} is outside 8..={MAX_STARTUP_PACKET}"
            )));
        }
        let mut body = vec![0u8; length as usize - 4];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|_| closed("in the middle of a packet"))?;
        let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        match (code, length) {
            (SSL_REQUEST | GSSENC_REQUEST, 8) => {
                // No encryption on this listener: 'N' tells the client to go on in plaintext
                // (or to give up, if it requires encryption).
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|_| closed("during negotiation"))?;
            }
            (CANCEL_REQUEST, 16) => {
                let word = |at: usize| {
                    i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]])
                };
                return Ok(Opening::Cancel {
                    pid: word(4),
                    secret: word(8),
                });
            }
            _ => return parse_startup(length, body).map(Opening::Startup),
        }
    }
    Err(ProxyError::Protocol("too many encryption requests".into()))
}

fn parse_startup(length: i32, body: Vec<u8>) -> Result<BTreeMap<String, String>, ProxyError> {
    let (major, minor) = (
        u16::from_be_bytes([body[0], body[1]]),
        u16::from_be_bytes([body[2], body[3]]),
    );
    if major != 3 {
        return Err(ProxyError::UnsupportedProtocol { major, minor });
    }
    let mut packet = BytesMut::with_capacity(length as usize);
    packet.put_i32(length);
    packet.extend_from_slice(&body);
    let startup = Startup::decode(&mut packet, &DecodeContext::default())
        .map_err(|e| ProxyError::Protocol(e.to_string()))?
        .ok_or_else(|| ProxyError::Protocol("incomplete startup packet".into()))?;
    if !startup.parameters.contains_key("user") {
        return Err(ProxyError::Protocol("no user in the startup packet".into()));
    }
    if startup.parameters.contains_key("replication") {
        return Err(ProxyError::Protocol(
            "replication connections are not proxied".into(),
        ));
    }
    Ok(startup.parameters)
}

/// Sends a FATAL ErrorResponse. Messages name routes and identities, never a credential.
pub async fn send_error<S: AsyncWrite + Unpin>(stream: &mut S, error: &ProxyError) {
    let response = ErrorResponse::new(vec![
        (b'S', "FATAL".into()),
        (b'V', "FATAL".into()),
        (b'C', error.sqlstate().into()),
        (b'M', error.to_string()),
    ]);
    let mut buffer = BytesMut::new();
    if response.encode(&mut buffer).is_ok() {
        let _ = stream.write_all(&buffer).await;
        let _ = stream.flush().await;
    }
}

pub fn authentication_ok() -> BytesMut {
    let mut buffer = BytesMut::new();
    Authentication::Ok
        .encode(&mut buffer)
        .expect("AuthenticationOk always encodes");
    buffer
}
