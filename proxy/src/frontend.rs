//! The client's side of the handshake: the startup packet (after declining SSL and GSS
//! encryption), cancel requests, and error responses. A length is checked before anything is
//! allocated for it.

use crate::error::ProxyError;
use bytes::{BufMut, BytesMut};
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{Authentication, Startup};
use pgwire::messages::{DecodeContext, Message};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// What a client connection is read and written through: TCP, Unix socket, or TLS over TCP.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP socket underneath when nothing sits between it and the session's bytes (no
    /// TLS): what the kernel relay can take over.
    fn plain_tcp_socket(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl ClientStream for tokio::net::TcpStream {
    fn plain_tcp_socket(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}
/// Not for the kernel relay: bytes arriving on a Unix socket meet its verdict program outside
/// the socket's lock, so a request sent just as the socket is armed could reach the proxy's
/// queue after the hand-over checked it, and wait there unread. A client may send at any
/// moment; an idle server sends nothing, so a server's Unix socket is taken.
impl ClientStream for tokio::net::UnixStream {}
impl ClientStream for tokio_rustls::server::TlsStream<Box<dyn ClientStream>> {}
/// The placeholder while a stream is moved out (into TLS, or to the kernel relay).
impl ClientStream for tokio::io::Empty {}

/// Startup-phase packets are small; PostgreSQL itself caps them at 10,000 bytes.
pub const MAX_STARTUP_PACKET: usize = 10_000;
const SSL_REQUEST: i32 = 80_877_103;
const GSSENC_REQUEST: i32 = 80_877_104;
const CANCEL_REQUEST: i32 = 80_877_102;

pub enum Opening {
    Startup(StartupPacket),
    Cancel { pid: i32, secret: i32 },
}

/// A startup packet: the client's parameters, and what it asked for of the protocol beyond
/// 3.0, which the proxy does not speak: a newer minor version, options named `_pq_.*`.
#[derive(Debug, PartialEq)]
pub struct StartupPacket {
    /// Without the protocol options, which are not settings for the server.
    pub parameters: BTreeMap<String, String>,
    pub minor_version: u16,
    pub protocol_options: Vec<String>,
}

impl StartupPacket {
    /// NegotiateProtocolVersion, as PostgreSQL answers a client that asked for more than it
    /// speaks: the newest minor version it supports (0) and the options it does not know. The
    /// client then goes on with 3.0 and none of them, or gives up.
    pub fn negotiation(&self) -> Option<BytesMut> {
        if self.minor_version == 0 && self.protocol_options.is_empty() {
            return None;
        }
        let names: usize = self
            .protocol_options
            .iter()
            .map(|name| name.len() + 1)
            .sum();
        let mut message = BytesMut::with_capacity(13 + names);
        message.put_u8(b'v');
        message.put_i32((12 + names) as i32);
        message.put_i32(0);
        message.put_i32(self.protocol_options.len() as i32);
        for name in &self.protocol_options {
            message.put_slice(name.as_bytes());
            message.put_u8(0);
        }
        Some(message)
    }
}

fn closed(what: &str) -> ProxyError {
    ProxyError::Protocol(format!("connection closed {what}"))
}

/// What one startup-phase packet asks for.
#[derive(Debug, PartialEq)]
pub enum Packet {
    /// SSLRequest: 'S' and a TLS handshake when TLS is configured, otherwise 'N'.
    SslRequest,
    /// GSSENCRequest: always 'N' (no GSSAPI here); the client goes on.
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup(StartupPacket),
}

/// Checks a packet's length word before anything is allocated for its body.
pub fn check_length(length: i32) -> Result<usize, ProxyError> {
    if (8..=MAX_STARTUP_PACKET as i32).contains(&length) {
        Ok(length as usize)
    } else {
        Err(ProxyError::Protocol(format!(
            "packet length {length} is outside 8..={MAX_STARTUP_PACKET}"
        )))
    }
}

/// Parses a startup-phase packet body (everything after the length word). Pure, so the fuzz
/// target in `proxy/fuzz` can drive it with arbitrary bytes.
pub fn parse_packet(body: &[u8]) -> Result<Packet, ProxyError> {
    let length = check_length(body.len() as i32 + 4)?;
    let word = |at: usize| i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    match (word(0), length) {
        (SSL_REQUEST, 8) => Ok(Packet::SslRequest),
        (GSSENC_REQUEST, 8) => Ok(Packet::GssEncRequest),
        (CANCEL_REQUEST, 16) => Ok(Packet::Cancel {
            pid: word(4),
            secret: word(8),
        }),
        _ => parse_startup(length as i32, body).map(Packet::Startup),
    }
}

/// How the client's connection ended up: encrypted or not, and the common name of a verified
/// client certificate.
#[derive(Default)]
pub struct Transport {
    pub encrypted: bool,
    pub certificate_name: Option<String>,
}

/// Reads the client's opening, answering encryption requests on the way: with `tls`, an
/// SSLRequest upgrades `stream` in place to TLS.
pub async fn read_opening(
    stream: &mut Box<dyn ClientStream>,
    tls: Option<&TlsAcceptor>,
) -> Result<(Opening, Transport), ProxyError> {
    let mut transport = Transport::default();
    // An SSL and a GSS request may each come once before the startup packet, as PostgreSQL
    // has it: it answers a repeated request code as the protocol version it is not, and so
    // does the proxy, unanswered otherwise.
    let (mut ssl_asked, mut gss_asked) = (false, false);
    loop {
        let length = check_length(
            stream
                .read_i32()
                .await
                .map_err(|_| closed("before the startup packet"))?,
        )?;
        let mut body = vec![0u8; length - 4];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|_| closed("in the middle of a packet"))?;
        let packet = parse_packet(&body)?;
        let repeated = match packet {
            Packet::SslRequest => std::mem::replace(&mut ssl_asked, true).then_some(SSL_REQUEST),
            Packet::GssEncRequest => {
                std::mem::replace(&mut gss_asked, true).then_some(GSSENC_REQUEST)
            }
            _ => None,
        };
        if let Some(code) = repeated {
            return Err(ProxyError::UnsupportedProtocol {
                major: (code >> 16) as u16,
                minor: code as u16,
            });
        }
        match (packet, tls) {
            (Packet::SslRequest, Some(acceptor)) => {
                stream
                    .write_all(b"S")
                    .await
                    .map_err(|_| closed("during negotiation"))?;
                let plain = std::mem::replace(stream, Box::new(tokio::io::empty()));
                let encrypted = acceptor
                    .accept(plain)
                    .await
                    .map_err(|e| ProxyError::Protocol(format!("TLS handshake failed: {e}")))?;
                transport.encrypted = true;
                transport.certificate_name = encrypted
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(crate::tls::common_name);
                *stream = Box::new(encrypted);
            }
            // No encryption of that kind here: 'N' tells the client to go on in plaintext (or
            // to give up, if it requires encryption).
            (Packet::SslRequest | Packet::GssEncRequest, _) => {
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|_| closed("during negotiation"))?;
            }
            (Packet::Cancel { pid, secret }, _) => {
                return Ok((Opening::Cancel { pid, secret }, transport))
            }
            (Packet::Startup(startup), _) => return Ok((Opening::Startup(startup), transport)),
        }
    }
}

fn parse_startup(length: i32, body: &[u8]) -> Result<StartupPacket, ProxyError> {
    let (major, minor) = (
        u16::from_be_bytes([body[0], body[1]]),
        u16::from_be_bytes([body[2], body[3]]),
    );
    if major != 3 {
        return Err(ProxyError::UnsupportedProtocol { major, minor });
    }
    check_layout(&body[4..])?;
    let mut packet = BytesMut::with_capacity(length as usize);
    packet.put_i32(length);
    packet.extend_from_slice(body);
    let startup = Startup::decode(&mut packet, &DecodeContext::default())
        .map_err(|e| ProxyError::Protocol(e.to_string()))?
        .ok_or_else(|| ProxyError::Protocol("incomplete startup packet".into()))?;
    if startup.parameters.get("user").is_none_or(String::is_empty) {
        return Err(ProxyError::Protocol("no user in the startup packet".into()));
    }
    if startup.parameters.contains_key("replication") {
        return Err(ProxyError::Protocol(
            "replication connections are not proxied".into(),
        ));
    }
    let (protocol_options, parameters): (BTreeMap<_, _>, BTreeMap<_, _>) = startup
        .parameters
        .into_iter()
        .partition(|(name, _)| name.starts_with("_pq_."));
    crate::startup_settings::check(&parameters)?;
    Ok(StartupPacket {
        parameters,
        minor_version: minor,
        protocol_options: protocol_options.into_keys().collect(),
    })
}

/// The parameters' layout as PostgreSQL requires it (`ProcessStartupPacket`): names and values,
/// each ending with a NUL, then one more NUL as the packet's last byte, all UTF-8 here since
/// names pick routes. pgwire's decoder takes what it can of anything else: a missing last NUL,
/// bytes after it, a name without a value, bytes that are not UTF-8 made into U+FFFD.
fn check_layout(parameters: &[u8]) -> Result<(), ProxyError> {
    let invalid =
        |what: &str| ProxyError::Protocol(format!("invalid startup packet layout: {what}"));
    let unterminated =
        || invalid("the parameters must end with one more NUL, and nothing may follow it");
    let listed = parameters.strip_suffix(&[0]).ok_or_else(unterminated)?;
    if listed.is_empty() {
        return Ok(());
    }
    let listed = listed.strip_suffix(&[0]).ok_or_else(unterminated)?;
    let strings: Vec<&[u8]> = listed.split(|&byte| byte == 0).collect();
    // Names and values in pairs, no name empty (an empty one would end the list).
    if strings
        .chunks(2)
        .any(|pair| pair.len() != 2 || pair[0].is_empty())
    {
        return Err(invalid(
            "a parameter without a value, or bytes after the terminating NUL",
        ));
    }
    if strings
        .iter()
        .any(|string| std::str::from_utf8(string).is_err())
    {
        return Err(invalid("a parameter that is not UTF-8"));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn startup(version: i32, pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        for (key, value) in pairs {
            body.extend_from_slice(key.as_bytes());
            body.push(0);
            body.extend_from_slice(value.as_bytes());
            body.push(0);
        }
        body.push(0);
        body
    }

    #[test]
    fn packets_of_every_kind() {
        assert_eq!(
            parse_packet(&80_877_103i32.to_be_bytes()).unwrap(),
            Packet::SslRequest
        );
        assert_eq!(
            parse_packet(&80_877_104i32.to_be_bytes()).unwrap(),
            Packet::GssEncRequest
        );
        let mut cancel = 80_877_102i32.to_be_bytes().to_vec();
        cancel.extend_from_slice(&7i32.to_be_bytes());
        cancel.extend_from_slice(&(-9i32).to_be_bytes());
        assert_eq!(
            parse_packet(&cancel).unwrap(),
            Packet::Cancel { pid: 7, secret: -9 }
        );
        let Packet::Startup(packet) =
            parse_packet(&startup(3 << 16, &[("user", "u"), ("database", "d")])).unwrap()
        else {
            panic!("not a startup packet")
        };
        assert_eq!(packet.parameters["database"], "d");
        assert_eq!(packet.negotiation(), None);
    }

    /// A client asking for protocol 3.2 and an option: told 3.0 and that option unknown, the
    /// option kept out of the parameters the server gets.
    #[test]
    fn a_newer_minor_version_or_protocol_options_are_negotiated_down() {
        let Packet::Startup(packet) = parse_packet(&startup(
            (3 << 16) | 2,
            &[("user", "u"), ("_pq_.compression", "on")],
        ))
        .unwrap() else {
            panic!("not a startup packet")
        };
        assert!(!packet.parameters.contains_key("_pq_.compression"));
        assert_eq!(
            &packet.negotiation().unwrap()[..],
            &[
                &b"v"[..],
                &29i32.to_be_bytes(),
                &0i32.to_be_bytes(),
                &1i32.to_be_bytes(),
                b"_pq_.compression\0"
            ]
            .concat()[..]
        );
    }

    #[test]
    fn refusals_have_protocol_sqlstates() {
        for (body, sqlstate) in [
            // A version the proxy does not speak: 0A000, as PostgreSQL answers.
            (startup(2 << 16, &[("user", "u")]), "0A000"),
            // A packet past 10,000 bytes.
            (vec![0u8; MAX_STARTUP_PACKET], "08P01"),
            (startup(3 << 16, &[("database", "d")]), "08P01"),
            (
                startup(3 << 16, &[("user", "u"), ("replication", "true")]),
                "08P01",
            ),
            (vec![0, 3, 0], "08P01"),
        ] {
            let error = parse_packet(&body).unwrap_err();
            assert_eq!(error.sqlstate(), sqlstate, "{error}");
        }
        assert!(
            check_length(-1).is_err() && check_length(7).is_err() && check_length(10_001).is_err()
        );
        assert_eq!(check_length(10_000).unwrap(), 10_000);
    }

    #[test]
    fn parameters_laid_out_otherwise_than_postgresql_requires_are_refused() {
        let well_formed = startup(3 << 16, &[("user", "u"), ("database", "d")]);
        let version_and =
            |parameters: &[u8]| [&(3i32 << 16).to_be_bytes()[..], parameters].concat();
        for (what, body, words) in [
            (
                "no last NUL",
                well_formed[..well_formed.len() - 1].to_vec(),
                "one more NUL",
            ),
            ("nothing but the version", version_and(b""), "one more NUL"),
            (
                "bytes after the end",
                [&well_formed[..], b"x\0"].concat(),
                "nothing may follow",
            ),
            (
                "a name without a value",
                version_and(b"user\0u\0database\0\0"),
                "without a value",
            ),
            (
                "an empty name",
                version_and(b"user\0u\0\0d\0\0"),
                "without a value",
            ),
            ("not UTF-8", version_and(b"user\0\xff\0\0"), "UTF-8"),
            (
                "an empty user",
                version_and(b"user\0\0database\0d\0\0"),
                "no user",
            ),
        ] {
            let error = parse_packet(&body).unwrap_err();
            assert_eq!(error.sqlstate(), "08P01", "{what}: {error}");
            assert!(error.to_string().contains(words), "{what}: {error}");
        }
        assert!(parse_packet(&well_formed).is_ok());
        // No parameters at all is a layout PostgreSQL takes; the user is what is missing.
        let error = parse_packet(&version_and(b"\0")).unwrap_err();
        assert!(error.to_string().contains("no user"), "{error}");
    }

    /// The fuzz target's property, run on a fixed seed in every `make test`: no input panics.
    #[test]
    fn random_bytes_never_panic() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ec2e75);
        for _ in 0..20_000 {
            let length = rng.gen_range(0..64);
            let mut body: Vec<u8> = (0..length).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) && body.len() >= 4 {
                body[..4].copy_from_slice(&(3i32 << 16).to_be_bytes());
            }
            let _ = parse_packet(&body);
        }
    }
}
