//! Relaying a session byte for byte, while following message boundaries in both directions,
//! so the proxy knows when the client says goodbye (Terminate), whether every request it sent
//! has been answered, and whether the server is then idle. An idle server connection is kept
//! for the next client; in transaction mode it goes back to the pool after each transaction.

use crate::backend::ServerStream;
use crate::metrics::Metrics;
use bytes::BytesMut;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;
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
    side: Side,
    /// Complete messages that ask for a ReadyForQuery (from the client: Query, FunctionCall,
    /// and a Sync the server will not ignore) or are one (from the server): when both sides
    /// have counted the same, every request has its answer.
    round_trips: u64,
    /// Client side: Syncs counted since the last Execute or Query, and whether COPY data is
    /// flowing to the server (see `count_request`).
    syncs_since_command: u64,
    in_copy_in: bool,
    /// Client side: Syncs the server ignores because they came while it read COPY data,
    /// if the COPYs the client sent data for were real (see `settled`).
    syncs_ignored_in_copy: u64,
    /// Client side: COPYs into the server it sent data for (or ended).
    copies_with_data: u64,
    /// Server side: COPYs into the server it started (CopyInResponse, or CopyBothResponse).
    copies_started: u64,
    /// Server side: the session may get notifications, which the server sends whenever it
    /// likes: it sent one, or completed a command whose tag starts with L (LISTEN, and LOCK,
    /// LOAD for good measure). Such a session is never handed to the kernel relay.
    may_notify: bool,
    /// Client side: a Parse named its statement. A named statement lives in one server
    /// session, so in transaction mode the client keeps that session from then on.
    prepared_named_statement: bool,
    /// Client side: the COPYs into the server it had started (CopyInResponse or
    /// CopyBothResponse) when these client bytes were fed; set by `Sides::feed_client`. A
    /// client sends COPY data only after the server asked for it.
    copies_started_by_server: u64,
    /// Client side: the client sent what a well-behaved client never sends (COPY data the
    /// server had not asked for, a message type the protocol has no place for), so the proxy
    /// can no longer tell which answers are still to come. Such a session never settles: it is
    /// closed when the client leaves, never lent to anyone else.
    desynced: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Side {
    #[default]
    Client,
    Server,
}

/// Extended-protocol messages the server acts on only once a Sync follows: Parse, Bind,
/// Execute, Describe, Close, Flush.
const BEFORE_SYNC: &[u8] = b"PBEDCH";

/// Every message a client may send once its session has started: those above, Sync, Query,
/// FunctionCall, CopyData, CopyDone, CopyFail and Terminate.
const CLIENT_MESSAGES: &[u8] = b"PBEDCHSQFdcfX";

impl Framing {
    fn client() -> Framing {
        Framing {
            side: Side::Client,
            ..Framing::default()
        }
    }

    /// The server's side of a session whose last message was ReadyForQuery(idle): the end of
    /// its greeting, or of the last transaction.
    fn idle_server() -> Framing {
        Framing {
            last: Some((b'Z', Some(b'I'))),
            side: Side::Server,
            ..Framing::default()
        }
    }

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
                    self.body_left = (length.max(4) - 4) as usize;
                    self.header.clear();
                    if self.body_left == 0 {
                        self.complete();
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
                    self.complete();
                }
            }
        }
        None
    }

    fn complete(&mut self) {
        self.last = Some((self.current_tag, self.current_first));
        match self.side {
            Side::Server if self.current_tag == b'Z' => self.round_trips += 1,
            Side::Server if matches!(self.current_tag, b'G' | b'W') => self.copies_started += 1,
            Side::Server if self.current_tag == b'A' => self.may_notify = true,
            Side::Server if self.current_tag == b'C' => {
                self.may_notify |= self.current_first == Some(b'L');
            }
            Side::Client => {
                // A Parse's body starts with the statement's name; "" is the unnamed one.
                self.prepared_named_statement |=
                    self.current_tag == b'P' && self.current_first.is_some_and(|byte| byte != 0);
                self.count_request(self.current_tag);
            }
            _ => {}
        }
    }

    /// While the server reads COPY data it ignores Sync (PostgreSQL's `CopyGetData`), and
    /// libpq and tokio-postgres send one right after the Execute that starts a COPY FROM
    /// STDIN, before any data: such a Sync gets no ReadyForQuery. Only the client's own
    /// messages say which command began it (it sends CopyData, CopyDone or CopyFail only
    /// then), so the Syncs since that command are set aside when the first of them comes.
    /// They are taken back only when the server did start as many COPYs (`settled`): the
    /// server ignores CopyData outside a COPY but answers those Syncs, so a client sending
    /// it there must not make the proxy miss answers still to come.
    fn count_request(&mut self, tag: u8) {
        match tag {
            b'Q' | b'F' => {
                self.round_trips += 1;
                self.syncs_since_command = 0;
            }
            b'E' => self.syncs_since_command = 0,
            b'S' if !self.in_copy_in => {
                self.round_trips += 1;
                self.syncs_since_command += 1;
            }
            b'd' | b'c' | b'f' => {
                if !self.in_copy_in {
                    // Without the server's CopyInResponse first, the server ignores this and
                    // answers the Syncs that the count below would set aside.
                    self.desynced |= self.copies_with_data >= self.copies_started_by_server;
                    self.copies_with_data += 1;
                    self.syncs_ignored_in_copy += self.syncs_since_command;
                    self.syncs_since_command = 0;
                }
                self.in_copy_in = tag == b'd';
            }
            tag => self.desynced |= !CLIENT_MESSAGES.contains(&tag),
        }
    }

    fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.body_left == 0
    }

    /// The server's last message was ReadyForQuery with status idle (not in a transaction).
    fn server_idle(&self) -> bool {
        self.at_boundary() && self.last == Some((b'Z', Some(b'I')))
    }
}

/// Every request the client sent has been answered, none is half sent or waits for a Sync,
/// and the server is idle outside a transaction: the server session can serve someone else.
/// A client that sent COPY data the server did not ask for never settles: it keeps its
/// server session, which is closed when it leaves.
fn settled(from_client: &Framing, from_server: &Framing) -> bool {
    !from_client.desynced
        && from_client.at_boundary()
        && !from_client
            .last
            .is_some_and(|(tag, _)| BEFORE_SYNC.contains(&tag))
        && from_client.copies_with_data == from_server.copies_started
        && from_client
            .round_trips
            .checked_sub(from_client.syncs_ignored_in_copy)
            == Some(from_server.round_trips)
        && from_server.server_idle()
}

/// Whether `bytes`, a request's start, hold its first message whole, or as much of it as one
/// read takes (a larger message streams to the server as it comes). A length the protocol
/// does not allow counts as arrived: the relay passes it on, and the server refuses it.
fn first_message_arrived(bytes: &[u8]) -> bool {
    if bytes.len() >= RELAY_BUFFER {
        return true;
    }
    let Some(header) = bytes.get(..5) else {
        return false;
    };
    let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    usize::try_from(length)
        .ok()
        .filter(|&length| length >= 4)
        .is_none_or(|length| bytes.len() > length)
}

/// Bytes read at once in each direction. What a session once touched stays resident while it
/// lives, so this bounds an idle client's memory; large results and COPY stream through in
/// chunks of this size at no measurable cost.
const RELAY_BUFFER: usize = 16 * 1024;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Ended {
    /// The client left while the server was settled: the connection can serve another.
    ServerReusable,
    Closed,
    /// Transaction mode: the transaction is over and the server settled; the client stays.
    TransactionDone,
    /// The session is quiet and may be handed to the kernel relay: the server's last answer,
    /// `Relay::held`, is read but not yet written to the client, which waits for it.
    HandOver {
        held: usize,
    },
}

/// How long a relay lasts.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Until {
    /// Session mode.
    EitherSideLeaves,
    /// Transaction mode.
    TransactionEnds,
}

/// A client's relay buffers, kept for the whole session (in transaction mode across the
/// server sessions it borrows).
pub struct Relay {
    client_buffer: Vec<u8>,
    server_buffer: Vec<u8>,
    /// Client bytes read while no server was attached (transaction mode), or while a hand-over
    /// to the kernel relay was called off.
    waiting: Vec<u8>,
    /// The client's side of the current (or last) relay.
    from_client: Framing,
}

impl Default for Relay {
    fn default() -> Relay {
        Relay {
            client_buffer: vec![0u8; RELAY_BUFFER],
            server_buffer: vec![0u8; RELAY_BUFFER],
            waiting: Vec::new(),
            from_client: Framing::client(),
        }
    }
}

impl Relay {
    /// Transaction mode, between transactions: waits, without a server, for the client's next
    /// request, until its first message has arrived whole (or a buffer's worth of it): a client
    /// that sends part of a message and stops holds no server session of the route's few.
    /// False when the client has left (closed, or said Terminate).
    pub async fn next_request<C>(&mut self, client: &mut C) -> bool
    where
        C: AsyncRead + Unpin,
    {
        loop {
            match client.read(&mut self.client_buffer).await {
                // A client between transactions is at a message boundary.
                Ok(read)
                    if read > 0 && !(self.waiting.is_empty() && self.client_buffer[0] == b'X') =>
                {
                    self.waiting.extend_from_slice(&self.client_buffer[..read]);
                    if first_message_arrived(&self.waiting) {
                        return true;
                    }
                }
                _ => return false,
            }
        }
    }

    /// Client bytes to relay before any read from the client.
    pub fn relay_first(&mut self, bytes: &[u8]) {
        self.waiting.extend_from_slice(bytes);
    }

    /// The server's answer held back by `Ended::HandOver`.
    pub fn held(&self, held: usize) -> &[u8] {
        &self.server_buffer[..held]
    }

    /// Whether the last relay's server session needs `reset`, and its answer alone, before it
    /// serves anyone else: it holds a named statement of the client's, or it carried COPY data.
    /// A COPY's Syncs are counted against the answers by rules a client can defeat by timing
    /// (a COPY the server ends by itself, on a bad row or a timeout, answers a Sync that was
    /// meant to be ignored), so such a session may look settled while a statement still runs.
    pub fn needs_reset(&self) -> bool {
        self.from_client.prepared_named_statement || self.from_client.copies_with_data > 0
    }

    /// Relays, the request `next_request` read first if any, until a side leaves or, with
    /// `Until::TransactionEnds`, until the transaction is over (`Ended::TransactionDone`) and
    /// the client has prepared no named statement. With `hand_over_after`, from that instant
    /// on, at the first quiet point (see `Sides::quiet`): `Ended::HandOver`.
    ///
    /// The two directions run at once. A server busy writing answers reads no requests, so a
    /// relay that stopped reading answers while it waited to hand the server a request would
    /// wait for good, with a client that pipelines large requests and reads as it goes.
    pub async fn run<C>(
        &mut self,
        client: &mut C,
        server: &mut ServerStream,
        metrics: &Metrics,
        until: Until,
        hand_over_after: Option<Instant>,
    ) -> Ended
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let sides = Mutex::new(Sides {
            from_client: Framing::client(),
            from_server: Framing::idle_server(),
            pipelined: false,
        });
        let mut waiting = std::mem::take(&mut self.waiting);
        let (client_buffer, server_buffer) = (&mut self.client_buffer, &mut self.server_buffer);
        let (mut client_reader, mut client_writer) = tokio::io::split(client);
        let (mut server_reader, mut server_writer) = tokio::io::split(server);
        let requests = async {
            if !waiting.is_empty() {
                let ended = to_server(&waiting, &sides, &mut server_writer, metrics, until).await;
                waiting.clear();
                if let Some(ended) = ended {
                    return ended;
                }
            }
            loop {
                let Ok(read) = client_reader.read(client_buffer).await else {
                    return Ended::Closed;
                };
                if read == 0 {
                    // The client vanished without Terminate; a half-sent message may be
                    // pending, so the server connection is reusable only when settled.
                    return if lock(&sides).settled() {
                        Ended::ServerReusable
                    } else {
                        Ended::Closed
                    };
                }
                let chunk = &client_buffer[..read];
                if let Some(ended) =
                    to_server(chunk, &sides, &mut server_writer, metrics, until).await
                {
                    return ended;
                }
            }
        };
        let answers = async {
            loop {
                let read = match server_reader.read(server_buffer).await {
                    Ok(read) if read > 0 => read,
                    _ => return Ended::Closed,
                };
                lock(&sides).from_server.feed(&server_buffer[..read], 0);
                if hand_over_after.is_some_and(|at| Instant::now() >= at) && lock(&sides).quiet() {
                    return Ended::HandOver { held: read };
                }
                if write_out(&mut client_writer, &server_buffer[..read])
                    .await
                    .is_err()
                {
                    return Ended::Closed;
                }
                Metrics::count(&metrics.bytes_to_client, read as u64);
                let sides = lock(&sides);
                if until == Until::TransactionEnds
                    && !sides.from_client.prepared_named_statement
                    && sides.settled()
                {
                    return Ended::TransactionDone;
                }
            }
        };
        let ended = tokio::select! {
            ended = requests => ended,
            ended = answers => ended,
        };
        // Keeps the buffer's capacity for the next transaction's first request. Bytes left
        // unrelayed (the server went away first) are not the next relay's.
        waiting.clear();
        self.waiting = waiting;
        self.from_client = sides
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .from_client;
        ended
    }
}

/// Both directions' framing, shared by the two halves of a relay. Locked only between
/// awaits, never across one.
struct Sides {
    from_client: Framing,
    from_server: Framing,
    /// The client sent more bytes while a request of its was still unanswered (requests
    /// sent together in one read are not seen: such a client then waits for their answers).
    pipelined: bool,
}

impl Sides {
    fn settled(&self) -> bool {
        settled(&self.from_client, &self.from_server)
    }

    /// A point where the session can be handed to the kernel relay: settled, with a client
    /// that waits for each answer before it asks again and a server that sends nothing
    /// unasked (no notifications), so that once the answer just read is held back neither
    /// side sends anything.
    fn quiet(&self) -> bool {
        self.settled() && !self.pipelined && !self.from_server.may_notify
    }

    /// Follows bytes from the client, knowing what the server has asked for so far (the
    /// server's bytes are fed before they are relayed, so before the client can answer them).
    fn feed_client(&mut self, bytes: &[u8]) -> Option<usize> {
        self.pipelined |= self
            .from_client
            .round_trips
            .saturating_sub(self.from_client.syncs_ignored_in_copy)
            > self.from_server.round_trips;
        self.from_client.copies_started_by_server = self.from_server.copies_started;
        self.from_client.feed(bytes, 0)
    }
}

fn lock(sides: &Mutex<Sides>) -> MutexGuard<'_, Sides> {
    // A panic elsewhere cannot leave the counts half updated: each update is one call.
    sides.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Forwards a chunk from the client; `Some` when the client said Terminate, which is not
/// forwarded: the server session outlives the client when it is settled.
async fn to_server<W: AsyncWrite + Unpin>(
    chunk: &[u8],
    sides: &Mutex<Sides>,
    server: &mut W,
    metrics: &Metrics,
    until: Until,
) -> Option<Ended> {
    let (terminate_at, newly_pinned) = {
        let mut sides = lock(sides);
        let was_pinned = sides.from_client.prepared_named_statement;
        let terminate_at = sides.feed_client(chunk);
        (
            terminate_at,
            sides.from_client.prepared_named_statement && !was_pinned,
        )
    };
    if let Some(terminate_at) = terminate_at {
        if write_out(server, &chunk[..terminate_at]).await.is_err() {
            return Some(Ended::Closed);
        }
        return Some(
            if terminate_at + 5 == chunk.len() && lock(sides).settled() {
                Ended::ServerReusable
            } else {
                Ended::Closed
            },
        );
    }
    if write_out(server, chunk).await.is_err() {
        return Some(Ended::Closed);
    }
    Metrics::count(&metrics.bytes_to_server, chunk.len() as u64);
    if until == Until::TransactionEnds && newly_pinned {
        Metrics::count(&metrics.pinned_clients, 1);
    }
    None
}

/// Writes and flushes: over TLS, written bytes may wait in the session until flushed.
pub(crate) async fn write_out<W: AsyncWrite + Unpin + ?Sized>(
    stream: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// `DISCARD ALL`, so the next client starts with a clean session: no temporary tables,
/// prepared statements, settings, advisory locks or LISTENs of the previous one.
pub async fn reset(server: &mut ServerStream) -> bool {
    let mut query = BytesMut::new();
    if postgres_protocol::message::frontend::query("DISCARD ALL", &mut query).is_err()
        || write_out(server, &query).await.is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    let mut buffer = vec![0u8; 4096];
    loop {
        let read =
            match tokio::time::timeout(std::time::Duration::from_secs(5), server.read(&mut buffer))
                .await
            {
                Ok(Ok(read)) if read > 0 => read,
                _ => return false,
            };
        answer.extend_from_slice(&buffer[..read]);
        if answer.len() > MAX_RESET_ANSWER {
            return false;
        }
        if let Some(clean) = answer_to_discard_all(&answer) {
            return clean;
        }
    }
}

/// DISCARD ALL's answer is a few dozen bytes, with a ParameterStatus for each reported setting
/// it resets.
const MAX_RESET_ANSWER: usize = 64 * 1024;

/// Whether `answer` is DISCARD ALL's answer and nothing else: its CommandComplete, then
/// ReadyForQuery(idle), with only ParameterStatus and notices around them. Anything else (a
/// row, an error, a ReadyForQuery first) answers something still pending, and the session is
/// not clean. `None` while the answer is incomplete.
fn answer_to_discard_all(mut answer: &[u8]) -> Option<bool> {
    let mut completed = false;
    while answer.len() >= 5 {
        let length = i32::from_be_bytes([answer[1], answer[2], answer[3], answer[4]]);
        let Some(end) = usize::try_from(length).ok().filter(|&length| length >= 4) else {
            return Some(false);
        };
        let end = end + 1;
        if answer.len() < end {
            return None;
        }
        let (tag, body) = (answer[0], &answer[5..end]);
        match tag {
            b'S' | b'N' => {}
            b'C' if !completed && body == b"DISCARD ALL\0" => completed = true,
            b'Z' => return Some(completed && body == b"I" && end == answer.len()),
            _ => return Some(false),
        }
        answer = &answer[end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn a_request_is_taken_once_its_first_message_is_whole() {
        let query = message(b'Q', b"SELECT 1\0");
        for part in 0..query.len() {
            assert!(!first_message_arrived(&query[..part]), "{part} bytes");
        }
        assert!(first_message_arrived(&query));
        assert!(first_message_arrived(
            &[query.clone(), message(b'S', b"")].concat()
        ));
        let large = message(b'Q', &vec![b'x'; 2 * RELAY_BUFFER]);
        assert!(first_message_arrived(&large[..RELAY_BUFFER]), "streams");
        assert!(
            first_message_arrived(&[b'Q', 0, 0, 0, 2]),
            "a length below 4"
        );
        assert!(
            first_message_arrived(&[b'Q', 255, 255, 255, 255]),
            "a negative length"
        );
    }

    /// Feeds one message with an empty body per tag.
    fn feed_empty(framing: &mut Framing, tags: &[u8]) {
        for &tag in tags {
            framing.feed(&message(tag, b""), 0);
        }
    }

    fn ready(status: u8) -> Vec<u8> {
        message(b'Z', &[status])
    }

    /// A client and a server that has just been attached, idle.
    fn pair() -> Sides {
        Sides {
            from_client: Framing::client(),
            from_server: Framing::idle_server(),
            pipelined: false,
        }
    }

    /// Feeds one client message with an empty body per tag.
    fn client_sends_empty(sides: &mut Sides, tags: &[u8]) {
        for &tag in tags {
            sides.feed_client(&message(tag, b""));
        }
    }

    /// Lengths and tags are the sender's word: whatever bytes either side sends, in whatever
    /// pieces, following them and judging a reset's answer never panics. Run on a fixed seed
    /// in every `make test`, as the startup parser's property is.
    #[test]
    fn random_bytes_from_either_side_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5e55_10a5);
        for _ in 0..5_000 {
            let mut sides = pair();
            for _ in 0..8 {
                let length = rng.gen_range(0..48);
                let mut bytes: Vec<u8> = (0..length).map(|_| rng.gen()).collect();
                // Often a known tag, so that the counting paths run too.
                if let Some(first) = bytes.first_mut() {
                    if rng.gen_bool(0.5) {
                        *first = b"QPBESZCGHdcfXTDIsn123tAKN"[rng.gen_range(0..25)];
                    }
                }
                if rng.gen_bool(0.5) {
                    sides.feed_client(&bytes);
                } else {
                    sides.from_server.feed(&bytes, 0);
                }
                let _ = sides.settled();
                let _ = answer_to_discard_all(&bytes);
            }
        }
    }

    #[test]
    fn a_query_is_settled_once_its_ready_for_query_arrives() {
        let mut sides = pair();
        assert!(sides.settled(), "an idle server with nothing asked");
        sides.feed_client(&message(b'Q', b"SELECT 1\0"));
        assert!(!sides.settled(), "asked, not yet answered");
        sides.from_server.feed(&message(b'T', b"..."), 0);
        sides.from_server.feed(&message(b'C', b"SELECT 1\0"), 0);
        assert!(!sides.settled());
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn a_transaction_block_holds_the_server_until_it_ends() {
        let mut sides = pair();
        sides.feed_client(&message(b'Q', b"BEGIN\0"));
        sides.from_server.feed(&ready(b'T'), 0);
        assert!(!sides.settled(), "inside a transaction");
        sides.feed_client(&message(b'Q', b"SELECT x\0"));
        sides.from_server.feed(&message(b'E', b"S..."), 0);
        sides.from_server.feed(&ready(b'E'), 0);
        assert!(!sides.settled(), "inside a failed transaction");
        sides.feed_client(&message(b'Q', b"ROLLBACK\0"));
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn extended_protocol_waits_for_the_sync_and_its_answer() {
        let mut sides = pair();
        for tag in [b'P', b'B', b'D', b'E'] {
            sides.feed_client(&message(tag, b"x"));
            assert!(!sides.settled(), "after {}", tag as char);
        }
        client_sends_empty(&mut sides, b"H");
        feed_empty(&mut sides.from_server, b"1");
        assert!(!sides.settled(), "a Flush is not a Sync");
        client_sends_empty(&mut sides, b"S");
        assert!(!sides.settled());
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn pipelined_requests_are_settled_by_the_last_answer() {
        let mut sides = pair();
        let mut both = message(b'Q', b"SELECT 1\0");
        both.extend(message(b'Q', b"SELECT 2\0"));
        sides.feed_client(&both);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(!sides.settled(), "one of two answered");
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn messages_split_anywhere_are_followed() {
        let mut sides = pair();
        let query = message(b'Q', b"SELECT 1\0");
        sides.feed_client(&query[..3]);
        assert!(!sides.settled(), "half a header");
        sides.feed_client(&query[3..7]);
        assert!(!sides.settled(), "half a body");
        sides.feed_client(&query[7..]);
        let answer = ready(b'I');
        for byte in &answer[..answer.len() - 1] {
            sides.from_server.feed(std::slice::from_ref(byte), 0);
            assert!(!sides.settled());
        }
        sides.from_server.feed(&answer[answer.len() - 1..], 0);
        assert!(sides.settled());
    }

    #[test]
    fn copy_in_is_settled_after_copy_done_and_its_answer() {
        let mut sides = pair();
        sides.feed_client(&message(b'Q', b"COPY t FROM STDIN\0"));
        sides.from_server.feed(&message(b'G', b"\0\0\0"), 0);
        sides.feed_client(&message(b'd', b"1\n"));
        client_sends_empty(&mut sides, b"c");
        assert!(!sides.settled());
        sides.from_server.feed(&message(b'C', b"COPY 1\0"), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn copy_in_over_the_extended_protocol_is_settled_once_the_copy_is_answered() {
        // tokio-postgres and libpq: Bind, Execute, Sync, the data, CopyDone, Sync. The first
        // Sync arrives while the server reads the copy, which ignores it.
        let mut sides = pair();
        client_sends_empty(&mut sides, b"BES");
        feed_empty(&mut sides.from_server, b"2");
        sides.from_server.feed(&message(b'G', b"\0\0\0"), 0);
        sides.feed_client(&message(b'd', b"1\n"));
        client_sends_empty(&mut sides, b"S");
        sides.feed_client(&message(b'd', b"2\n"));
        client_sends_empty(&mut sides, b"cS");
        assert!(!sides.settled());
        sides.from_server.feed(&message(b'C', b"COPY 2\0"), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
        // And the session goes on counting right.
        sides.feed_client(&message(b'Q', b"SELECT 1\0"));
        assert!(!sides.settled());
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn copy_in_failed_by_the_client_is_settled_by_its_answer() {
        let mut sides = pair();
        client_sends_empty(&mut sides, b"BES");
        sides.from_server.feed(&message(b'G', b"\0\0\0"), 0);
        sides.feed_client(&message(b'f', b"changed my mind\0"));
        client_sends_empty(&mut sides, b"S");
        sides.from_server.feed(&message(b'E', b"S..."), 0);
        assert!(!sides.settled());
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn copy_data_the_server_did_not_ask_for_never_settles() {
        // CopyData outside a COPY, then a pipelined Execute and Sync: the server ignores the
        // CopyData but answers the Sync after the Execute. Answered once (the Query), the
        // session must not be taken for settled while that Execute still runs.
        let mut sides = pair();
        sides.feed_client(&message(b'Q', b"SELECT 1\0"));
        sides.feed_client(&message(b'd', b""));
        client_sends_empty(&mut sides, b"PBDES");
        sides.from_server.feed(&message(b'C', b"SELECT 1\0"), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(!sides.settled(), "the Execute is still running");
        sides.from_server.feed(&message(b'C', b"SELECT 1\0"), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(
            !sides.settled(),
            "a client that lied about a COPY keeps its session to the end"
        );
    }

    /// A client that sends COPY data the server never asked for, then starts a real COPY so
    /// that the counts of COPYs agree, must still never settle: its Sync sent "inside" the
    /// false COPY is answered, so counting it out would take the session for settled while
    /// its last query still runs, and lend it, with that query's answer, to another client.
    #[test]
    fn copy_data_before_the_server_asked_desyncs_for_good() {
        let mut sides = pair();
        let mut request = message(b'd', b"");
        request.extend(message(b'S', b""));
        request.extend(message(b'Q', b"COPY t FROM STDIN\0"));
        sides.feed_client(&request);
        sides.from_server.feed(&ready(b'I'), 0);
        sides.from_server.feed(&message(b'G', b"\0\0\0"), 0);
        let mut data = message(b'd', b"1\n");
        data.extend(message(b'c', b""));
        data.extend(message(b'Q', b"SELECT 1\0"));
        data.extend(message(b'Q', b"SELECT pg_sleep(1)\0"));
        sides.feed_client(&data);
        sides.from_server.feed(&message(b'C', b"COPY 1\0"), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(!sides.settled(), "the sleep's answer is still to come");
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(!sides.settled(), "a desynced session never settles");
    }

    #[test]
    fn copy_data_after_the_server_asked_is_a_copy() {
        let mut sides = pair();
        sides.feed_client(&message(b'Q', b"COPY t FROM STDIN\0"));
        sides.from_server.feed(&message(b'G', b"\0\0\0"), 0);
        let mut data = message(b'd', b"1\n");
        data.extend(message(b'c', b""));
        sides.feed_client(&data);
        sides.from_server.feed(&message(b'C', b"COPY 1\0"), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled());
    }

    #[test]
    fn a_message_type_clients_never_send_desyncs() {
        let mut sides = pair();
        sides.feed_client(&message(b'y', b""));
        assert!(!sides.settled());
    }

    #[test]
    fn a_session_is_quiet_for_the_kernel_relay_only_when_nothing_can_arrive_unasked() {
        let mut sides = pair();
        sides.feed_client(&message(b'Q', b"SELECT 1\0"));
        assert!(!sides.quiet(), "asked, not yet answered");
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.quiet());
        sides.feed_client(&message(b'Q', b"BEGIN\0"));
        sides.from_server.feed(&ready(b'T'), 0);
        assert!(!sides.quiet(), "inside a transaction");
        sides.feed_client(&message(b'Q', b"COMMIT\0"));
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.quiet());

        // A request sent before the last one was answered: a client that pipelines.
        sides.feed_client(&message(b'Q', b"SELECT 1\0"));
        sides.feed_client(&message(b'Q', b"SELECT 2\0"));
        sides.from_server.feed(&ready(b'I'), 0);
        sides.from_server.feed(&ready(b'I'), 0);
        assert!(sides.settled() && !sides.quiet(), "pipelined");

        for (tag, body) in [(b'C', &b"LISTEN\0"[..]), (b'A', &b"\0\0\0\x01c\0p\0"[..])] {
            let mut sides = pair();
            sides.feed_client(&message(b'Q', b"LISTEN c\0"));
            sides.from_server.feed(&message(tag, body), 0);
            sides.from_server.feed(&ready(b'I'), 0);
            assert!(sides.settled() && !sides.quiet(), "may get notifications");
        }
    }

    #[test]
    fn only_discard_alls_own_answer_resets_a_session() {
        let complete = message(b'C', b"DISCARD ALL\0");
        let parameter = message(b'S', b"application_name\0\0");
        let answer = |messages: &[&[u8]]| -> Vec<u8> { messages.concat() };
        assert_eq!(
            answer_to_discard_all(&answer(&[&complete, &ready(b'I')])),
            Some(true)
        );
        assert_eq!(
            answer_to_discard_all(&answer(&[&parameter, &complete, &parameter, &ready(b'I')])),
            Some(true)
        );
        assert_eq!(answer_to_discard_all(&complete), None, "incomplete");
        for other in [
            answer(&[&ready(b'I'), &complete, &ready(b'I')]),
            answer(&[&message(b'D', b"\0\0"), &complete, &ready(b'I')]),
            answer(&[&message(b'E', b"S..."), &ready(b'I')]),
            answer(&[&complete, &ready(b'T')]),
            answer(&[&complete, &ready(b'I'), &ready(b'I')]),
            answer(&[&message(b'C', b"SELECT 1\0"), &ready(b'I')]),
            // A length below its own four bytes, and a negative one.
            answer(&[&[b'S', 0, 0, 0, 3], &complete, &ready(b'I')]),
            answer(&[&[b'S', 0xff, 0xff, 0xff, 0xfb], &complete, &ready(b'I')]),
        ] {
            assert_eq!(answer_to_discard_all(&other), Some(false), "{other:?}");
        }
    }

    /// `reset` sends DISCARD ALL and keeps the session only for its own answer, read up to
    /// MAX_RESET_ANSWER bytes: a server that sends more before its answer ends is given up
    /// on, even if the answer would have ended well.
    #[tokio::test]
    async fn reset_reads_a_bounded_answer() {
        use crate::backend::ServerStream;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let discarded = [message(b'C', b"DISCARD ALL\0"), ready(b'I')].concat();
        let setting = message(b'S', &[b'x'; 1000]);
        for (answer, clean) in [
            ([setting.clone(), discarded.clone()].concat(), true),
            (
                [setting.repeat(MAX_RESET_ANSWER / 1000 + 1), discarded].concat(),
                false,
            ),
        ] {
            let (proxy_end, mut server_end) = tokio::net::UnixStream::pair().unwrap();
            let server = tokio::spawn(async move {
                let mut query = [0u8; 17];
                server_end.read_exact(&mut query).await.unwrap();
                assert_eq!(&query[5..], b"DISCARD ALL\0");
                server_end.write_all(&answer).await.unwrap();
                // Held open: the proxy must stop on the answer's size, not on its end.
                let _ = server_end.read(&mut [0u8; 1]).await;
            });
            let mut stream = ServerStream::Unix(proxy_end);
            assert_eq!(reset(&mut stream).await, clean);
            drop(stream);
            server.await.unwrap();
        }
    }

    #[test]
    fn a_named_statement_is_noticed_and_an_unnamed_one_is_not() {
        let mut client = Framing::client();
        client.feed(&message(b'P', b"\0SELECT 1\0\0\0"), 0);
        assert!(!client.prepared_named_statement);
        client.feed(&message(b'P', b"s0\0SELECT 1\0\0\0"), 0);
        assert!(client.prepared_named_statement);
    }

    #[test]
    fn terminate_is_found_at_a_message_start_only() {
        let mut client = Framing::client();
        let mut bytes = message(b'Q', b"X\0");
        let at = bytes.len();
        bytes.extend(message(b'X', b""));
        assert_eq!(client.feed(&bytes, 0), Some(at));
    }
}
