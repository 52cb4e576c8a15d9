//! Relaying a session byte for byte, while following message boundaries in both directions,
//! so the proxy knows when the client says goodbye (Terminate) and whether the server is idle
//! at that moment. An idle server connection is reset and kept for the next client.

use crate::backend::ServerStream;
use crate::metrics::Metrics;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Follows message boundaries in a byte stream of `tag, length, body` messages without
/// buffering whole messages: a COPY of gigabytes passes through in chunks.
#[derive(Default)]
struct Framing {
    header: Vec<u8>,
    body_left: usize,
    /// The tag and first body byte of the last complete message.
    last: Option<(u8, Option<u8>)>,
    current_tag: u8,
    current_first: Option<u8>,
    /// An ErrorResponse went by.
    saw_error: bool,
}

impl Framing {
    /// Feeds bytes; returns the offset of a Terminate message's start, if one begins here.
    fn feed(&mut self, mut bytes: &[u8], mut offset: usize) -> Option<usize> {
        while !bytes.is_empty() {
            if self.body_left == 0 {
                if self.header.is_empty() && bytes[0] == b'X' {
                    return Some(offset);
                }
                let take = (5 - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                offset += take;
                if self.header.len() == 5 {
                    let length = i32::from_be_bytes([
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ]);
                    self.current_tag = self.header[0];
                    self.current_first = None;
                    self.saw_error |= self.current_tag == b'E';
                    self.body_left = (length.max(4) - 4) as usize;
                    self.header.clear();
                    if self.body_left == 0 {
                        self.last = Some((self.current_tag, None));
                    }
                }
            } else {
                let take = self.body_left.min(bytes.len());
                if self.current_first.is_none() {
                    self.current_first = Some(bytes[0]);
                }
                self.body_left -= take;
                bytes = &bytes[take..];
                offset += take;
                if self.body_left == 0 {
                    self.last = Some((self.current_tag, self.current_first));
                }
            }
        }
        None
    }

    fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.body_left == 0
    }

    /// The server's last message was ReadyForQuery with status idle (not in a transaction).
    fn server_idle(&self) -> bool {
        self.at_boundary() && self.last == Some((b'Z', Some(b'I')))
    }
}

/// Bytes read at once in each direction. What a session once touched stays resident while it
/// lives, so this bounds an idle client's memory; large results and COPY stream through in
/// chunks of this size at no measurable cost.
const RELAY_BUFFER: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client terminated while the server was idle: the connection can serve another.
    ServerReusable,
    Closed,
}

pub async fn relay<C>(client: &mut C, server: &mut ServerStream, metrics: &Metrics) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut from_client = Framing::default();
    // The greeting ended with ReadyForQuery(idle).
    let mut from_server = Framing {
        last: Some((b'Z', Some(b'I'))),
        ..Framing::default()
    };
    let mut client_buffer = vec![0u8; RELAY_BUFFER];
    let mut server_buffer = vec![0u8; RELAY_BUFFER];
    loop {
        tokio::select! {
            read = client.read(&mut client_buffer) => {
                let Ok(read) = read else { return Ended::Closed };
                if read == 0 {
                    // The client vanished without Terminate; a half-sent message may be
                    // pending, so the server connection is reusable only at a boundary.
                    return if from_client.at_boundary() && from_server.server_idle() {
                        Ended::ServerReusable
                    } else {
                        Ended::Closed
                    };
                }
                let chunk = &client_buffer[..read];
                if let Some(terminate_at) = from_client.feed(chunk, 0) {
                    if !write_out(server, &chunk[..terminate_at]).await {
                        return Ended::Closed;
                    }
                    return if terminate_at == read - 5 && from_server.server_idle() {
                        Ended::ServerReusable
                    } else {
                        Ended::Closed
                    };
                }
                if !write_out(server, chunk).await {
                    return Ended::Closed;
                }
                Metrics::count(&metrics.bytes_to_server, read as u64);
            }
            read = server.read(&mut server_buffer) => {
                let Ok(read) = read else { return Ended::Closed };
                if read == 0 {
                    return Ended::Closed;
                }
                from_server.feed(&server_buffer[..read], 0);
                if !write_out(client, &server_buffer[..read]).await {
                    return Ended::Closed;
                }
                Metrics::count(&metrics.bytes_to_client, read as u64);
            }
        }
    }
}

/// Writes and flushes: over TLS, written bytes may wait in the session until flushed.
async fn write_out<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> bool {
    stream.write_all(bytes).await.is_ok() && stream.flush().await.is_ok()
}

/// `DISCARD ALL`, so the next client starts with a clean session: no temporary tables,
/// prepared statements, settings, advisory locks or LISTENs of the previous one.
pub async fn reset(server: &mut ServerStream) -> bool {
    let mut query = BytesMut::new();
    if postgres_protocol::message::frontend::query("DISCARD ALL", &mut query).is_err()
        || !write_out(server, &query).await
    {
        return false;
    }
    let mut framing = Framing::default();
    let mut buffer = vec![0u8; 4096];
    loop {
        let read =
            match tokio::time::timeout(std::time::Duration::from_secs(5), server.read(&mut buffer))
                .await
            {
                Ok(Ok(read)) if read > 0 => read,
                _ => return false,
            };
        framing.feed(&buffer[..read], 0);
        if framing.server_idle() {
            // An ErrorResponse means the reset did not happen.
            return !framing.saw_error;
        }
    }
}
