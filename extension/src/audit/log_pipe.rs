//! Writing lines to the server log as PostgreSQL's own processes write their messages.
//!
//! With the logging collector running, stderr is the collector's pipe, and every process sends
//! its messages through it in chunks of the collector's protocol: a header with the writer's
//! pid, the chunk's length and whether it ends a message, then at most `PIPE_BUF` bytes in
//! all, so that no write is ever interleaved with another process's. The collector writes
//! each whole message to its file in one write.
//!
//! Plain text written to the pipe reaches the file too, but as stray output: the collector
//! writes what each read brought, cut wherever its 4 KB stdio buffer fills, and after the cut
//! it writes every line with a write of its own. Audit lines sent that way cost the collector
//! 8.5 µs each under load, more than storing the record cost the audit worker, and that CPU
//! was taken from the readers. So lines are sent as messages of as many whole lines as fit in
//! a chunk.
//!
//! Without the collector stderr is a file or a terminal, and gets the lines as they are.

use pgrx::pg_sys;
use std::io::Write;

/// What one write to a pipe may hold and still never be interleaved with another's.
const PIPE_BUF: usize = 4096;
/// The protocol's chunk: `PIPE_CHUNK_SIZE`, which is `PIPE_BUF`.
const CHUNK_BYTES: usize = std::mem::size_of::<pg_sys::PipeProtoChunk>();
const HEADER_BYTES: usize = std::mem::offset_of!(pg_sys::PipeProtoHeader, data);
const PAYLOAD_BYTES: usize = CHUNK_BYTES - HEADER_BYTES;
// The header as `chunks` lays it out: two NULs, the length, the pid, the flags.
const _: () = assert!(
    std::mem::offset_of!(pg_sys::PipeProtoHeader, len) == 2
        && std::mem::offset_of!(pg_sys::PipeProtoHeader, pid) == 4
        && std::mem::offset_of!(pg_sys::PipeProtoHeader, flags) == 8
        && HEADER_BYTES == 9
        && CHUNK_BYTES == PIPE_BUF
);

// Set by the postmaster once stderr goes to the collector, and inherited by every process it
// starts (postmaster/postmaster.h; pgrx's bindings leave it out). What PostgreSQL's own
// `send_message_to_server_log` asks before using the protocol.
extern "C" {
    static redirection_done: bool;
}

/// Writes whole lines to the server log, each batch of them in as few writes as can be whole.
pub fn write(lines: &[Vec<u8>]) {
    let mut stderr = std::io::stderr().lock();
    // SAFETY: a plain bool the postmaster sets before starting any process that runs this.
    if unsafe { redirection_done } {
        let pid = unsafe { pg_sys::MyProcPid };
        for message in groups(lines, PAYLOAD_BYTES) {
            for chunk in chunks(&message, pid) {
                let _ = stderr.write_all(&chunk);
            }
        }
    } else {
        for group in groups(lines, PIPE_BUF) {
            let _ = stderr.write_all(&group);
        }
    }
}

/// Consecutive lines joined up to `limit` bytes; a longer line is a group of its own.
pub(crate) fn groups(lines: &[Vec<u8>], limit: usize) -> Vec<Vec<u8>> {
    let mut groups: Vec<Vec<u8>> = Vec::new();
    for line in lines {
        match groups.last_mut() {
            Some(group) if group.len() + line.len() <= limit => group.extend_from_slice(line),
            _ => groups.push(line.clone()),
        }
    }
    groups
}

/// A message as the collector's protocol chunks: its payload cut into pieces that fit a chunk,
/// each with the header, the last one marked as ending the message.
pub(crate) fn chunks(message: &[u8], pid: i32) -> Vec<Vec<u8>> {
    let pieces: Vec<&[u8]> = message.chunks(PAYLOAD_BYTES).collect();
    let last = pieces.len().saturating_sub(1);
    pieces
        .iter()
        .enumerate()
        .map(|(index, piece)| {
            let mut flags = pg_sys::PIPE_PROTO_DEST_STDERR as u8;
            if index == last {
                flags |= pg_sys::PIPE_PROTO_IS_LAST as u8;
            }
            let mut chunk = Vec::with_capacity(HEADER_BYTES + piece.len());
            chunk.extend_from_slice(&[0, 0]);
            // At most PAYLOAD_BYTES, so it fits the header's u16.
            chunk.extend_from_slice(&(piece.len() as u16).to_ne_bytes());
            chunk.extend_from_slice(&pid.to_ne_bytes());
            chunk.push(flags);
            chunk.extend_from_slice(piece);
            chunk
        })
        .collect()
}
