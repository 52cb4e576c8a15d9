//! Socket cookies: how the kernel relay's eBPF program tells sockets apart.
//!
//! The program finds a socket by the cookie of the socket that the bytes arriving on it
//! belong to. A TCP segment belongs to the socket that received it, but bytes sent over a Unix
//! socket stay charged to the socket that sent them, so for a Unix socket that is its peer's
//! cookie, which only the kernel's sock_diag interface (what `ss -x` reads) tells: first the
//! peer's inode, then the cookie of the socket with that inode.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_sock_diag::unix::nlas::Nla;
use netlink_packet_sock_diag::unix::{ShowFlags, StateFlags, UnixRequest, UnixResponse};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr};
use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

/// The cookie the eBPF program sees on bytes arriving at `socket`, and so finds the socket
/// by: its own for TCP, its peer's for a Unix socket.
pub fn incoming_cookie(socket: impl AsFd) -> io::Result<u64> {
    let socket = socket.as_fd();
    let address: SockaddrStorage = getsockname(socket.as_raw_fd())?;
    match address.family() {
        Some(AddressFamily::Unix) => unix_peer_cookie(socket),
        _ => socket_cookie(socket),
    }
}

/// The socket's own cookie.
fn socket_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut length = std::mem::size_of::<u64>() as nix::libc::socklen_t;
    // SAFETY: SO_COOKIE writes one u64 into `cookie`, whose size `length` gives.
    let result = unsafe {
        nix::libc::getsockopt(
            socket.as_raw_fd(),
            nix::libc::SOL_SOCKET,
            nix::libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut length,
        )
    };
    if result == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The cookie of the socket at the other end of the connected Unix socket `socket`. Fails
/// when the peer is closed, or lives in another network namespace (a server in a container
/// whose socket directory is shared), where sock_diag does not see it.
///
/// Inode numbers wrap, so each answer is checked: the first names our socket by its own
/// cookie too (a socket with our inode but another cookie is refused by the kernel), and the
/// second must name our socket as its peer.
fn unix_peer_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let inode = nix::sys::stat::fstat(socket.as_raw_fd())?.st_ino;
    let inode = u32::try_from(inode).map_err(io::Error::other)?;
    let mut diag = Socket::new(NETLINK_SOCK_DIAG)?;
    diag.bind_auto()?;
    diag.connect(&SocketAddr::new(0, 0))?;
    let own_cookie = cookie_words(socket_cookie(socket)?);
    let ours = describe(&diag, inode, own_cookie)?;
    // A peer that closed is reported as inode 0.
    let peer = peer_inode(&ours)
        .filter(|&peer| peer != 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the socket has no peer"))?;
    let theirs = describe(&diag, peer, ANY_COOKIE)?;
    if theirs.header.inode != peer || peer_inode(&theirs) != Some(inode) {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "the socket's peer changed while it was looked up",
        ));
    }
    Ok(cookie_from_words(theirs.header.cookie))
}

/// sock_diag's "do not check the cookie" value: the request names the socket by inode only.
const ANY_COOKIE: [u8; 8] = [0xff; 8];

/// A cookie as sock_diag writes and reads it: two 32-bit words, the low one first.
fn cookie_words(cookie: u64) -> [u8; 8] {
    let mut words = [0; 8];
    words[..4].copy_from_slice(&(cookie as u32).to_ne_bytes());
    words[4..].copy_from_slice(&((cookie >> 32) as u32).to_ne_bytes());
    words
}

fn cookie_from_words(words: [u8; 8]) -> u64 {
    let [a, b, c, d, e, f, g, h] = words;
    u64::from(u32::from_ne_bytes([a, b, c, d])) | u64::from(u32::from_ne_bytes([e, f, g, h])) << 32
}

fn peer_inode(response: &UnixResponse) -> Option<u32> {
    response.nlas.iter().find_map(|nla| match nla {
        Nla::Peer(peer) => Some(*peer),
        _ => None,
    })
}

/// sock_diag's answer about the Unix socket with inode `inode` and cookie `cookie`, with its
/// peer's inode.
fn describe(diag: &Socket, inode: u32, cookie: [u8; 8]) -> io::Result<UnixResponse> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let request = SockDiagMessage::UnixRequest(UnixRequest {
        state_flags: StateFlags::all(),
        inode,
        show_flags: ShowFlags::PEER,
        cookie,
    });
    let mut request = NetlinkMessage::new(header, request.into());
    request.finalize();
    let mut bytes = vec![0; request.buffer_len()];
    request.serialize(&mut bytes);
    diag.send(&bytes, 0)?;

    // The kernel answers within `send`: the answer is there to read, without waiting.
    let mut answer = Vec::with_capacity(8192);
    diag.recv(&mut answer, nix::libc::MSG_DONTWAIT)?;
    let answer = NetlinkMessage::<SockDiagMessage>::deserialize(&answer)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error.to_string()))?;
    match answer.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::UnixResponse(response)) => Ok(*response),
        NetlinkPayload::Error(error) => Err(error.to_io()),
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected sock_diag answer {other:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_unix_socket_is_known_by_its_peers_cookie_a_tcp_socket_by_its_own() {
        let (one, other) = UnixStream::pair().unwrap();
        let (one_cookie, other_cookie) = (
            socket_cookie(one.as_fd()).unwrap(),
            socket_cookie(other.as_fd()).unwrap(),
        );
        assert_ne!(one_cookie, other_cookie);
        assert_eq!(incoming_cookie(&one).unwrap(), other_cookie);
        assert_eq!(incoming_cookie(&other).unwrap(), one_cookie);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert_eq!(
            incoming_cookie(&client).unwrap(),
            socket_cookie(client.as_fd()).unwrap()
        );
        let cookie = 0x0123_4567_89ab_cdef;
        assert_eq!(cookie_from_words(cookie_words(cookie)), cookie);
        // A peer gone: no cookie, and the hand-over leaves the session to the proxy.
        drop(other);
        assert!(incoming_cookie(&one).is_err());
    }
}
