//! Writing lines to the server log as PostgreSQL's own processes write their messages.
//!
//! With the logging collector running, stderr is the collector's pipe, and every process sends
//! its messages through it in chunks of the collector's protocol: a header with the writer's
//! pid, the chunk's length and whether it ends a message, then at most `PIPE_BUF` bytes in
//! all, so that no write is ever interleaved with another process's (`write_pipe_chunks` in
//! PostgreSQL's elog.c). The collector writes each whole message to its file in one write.
//!
//! Plain text written to the pipe reaches the file too, but as stray output, which the
//! collector writes as each read of the pipe brought it. Audit lines sent that way cost the
//! collector 8.5 µs each under load (fourteenth session), more than storing the record cost the
//! audit worker; as messages of as many whole lines as fit in a chunk, 4.4 to 5.7 µs, most of it
//! in rotating its files (see the README's benchmarks).
//!
//! Without the collector stderr is a file or a terminal, and gets the lines as they are.

use pgrx::pg_sys;
use std::io::Write;

/// The protocol's chunk, `PIPE_CHUNK_SIZE`: `PIPE_BUF`, what one write to a pipe may hold and
/// still never be interleaved with another's.
pub(crate) const CHUNK_BYTES: usize = std::mem::size_of::<pg_sys::PipeProtoChunk>();
pub(crate) const HEADER_BYTES: usize = std::mem::offset_of!(pg_sys::PipeProtoHeader, data);
pub(crate) const PAYLOAD_BYTES: usize = CHUNK_BYTES - HEADER_BYTES;
// The header as `send_message` lays it out: two NULs, the length, the pid, the flags.
const _: () = assert!(
    std::mem::offset_of!(pg_sys::PipeProtoHeader, len) == 2
        && std::mem::offset_of!(pg_sys::PipeProtoHeader, pid) == 4
        && std::mem::offset_of!(pg_sys::PipeProtoHeader, flags) == 8
        && HEADER_BYTES == 9
        && CHUNK_BYTES == libc::PIPE_BUF
);

// Set by the postmaster once its stderr goes to the collector, and inherited by every process
// it starts; what elog.c asks before using the protocol. PostgreSQL 15 declares it only inside
// elog.c and syslogger.c (postmaster.h has it from 16 on), so pgrx's bindings leave it out.
extern "C" {
    static mut redirection_done: bool;
}

/// Writes whole lines to the server log, as few writes as can each be whole.
pub fn write(lines: &[Vec<u8>]) {
    // SAFETY: a bool the postmaster sets once, before it starts the processes that run this.
    let to_collector = unsafe { std::ptr::addr_of!(redirection_done).read() };
    let pid = unsafe { pg_sys::MyProcPid };
    write_lines(
        &mut std::io::stderr().lock(),
        lines,
        to_collector.then_some(pid),
    );
}

/// `lines` to `out`: as protocol messages of the process `collector_pid` when given, else as
/// they are.
pub(crate) fn write_lines(out: &mut impl Write, lines: &[Vec<u8>], collector_pid: Option<i32>) {
    match collector_pid {
        Some(pid) => in_groups(lines, PAYLOAD_BYTES, |message| {
            send_message(out, message, pid)
        }),
        None => in_groups(lines, libc::PIPE_BUF, |group| {
            let _ = out.write_all(group);
        }),
    }
}

/// Calls `send` with consecutive whole lines joined up to `limit` bytes; a longer line goes
/// alone.
fn in_groups(lines: &[Vec<u8>], limit: usize, mut send: impl FnMut(&[u8])) {
    let mut group = Vec::with_capacity(limit);
    for line in lines {
        if !group.is_empty() && group.len() + line.len() > limit {
            send(&group);
            group.clear();
        }
        group.extend_from_slice(line);
    }
    if !group.is_empty() {
        send(&group);
    }
}

/// One message as protocol chunks, each written whole, the last marked as ending it.
fn send_message(out: &mut impl Write, message: &[u8], pid: i32) {
    let mut chunk = [0u8; CHUNK_BYTES];
    chunk[4..8].copy_from_slice(&pid.to_ne_bytes());
    let mut pieces = message.chunks(PAYLOAD_BYTES).peekable();
    while let Some(piece) = pieces.next() {
        let mut flags = pg_sys::PIPE_PROTO_DEST_STDERR as u8;
        if pieces.peek().is_none() {
            flags |= pg_sys::PIPE_PROTO_IS_LAST as u8;
        }
        // At most PAYLOAD_BYTES, so it fits the header's u16.
        chunk[2..4].copy_from_slice(&(piece.len() as u16).to_ne_bytes());
        chunk[8] = flags;
        chunk[HEADER_BYTES..HEADER_BYTES + piece.len()].copy_from_slice(piece);
        let _ = out.write_all(&chunk[..HEADER_BYTES + piece.len()]);
    }
}
