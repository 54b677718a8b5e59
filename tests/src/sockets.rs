//! Sockets made or tuned through libc where std has no call for it: a
//! listener with a chosen backlog, TCP_INFO's retransmission count, an
//! abortive close.

use std::net::{TcpListener, TcpStream};

use anyhow::Result;

/// An IPv4 listener on 127.0.0.1:`port` with accept-queue limit `backlog`
/// (std's TcpListener always asks for 128), made in the calling thread's
/// namespace.
pub fn listener_with_backlog(port: u16, backlog: i32) -> Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is
    // fully initialised and its size passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            anyhow::bail!("socket: {}", std::io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be() },
            sin_zero: [0; 8],
        };
        if libc::bind(fd, (&raw const addr).cast(), size_of::<libc::sockaddr_in>() as u32) != 0
            || libc::listen(fd, backlog) != 0
        {
            anyhow::bail!("bind/listen: {}", std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// `tcpi_total_retrans` of `stream`'s TCP_INFO: what the kernel retransmitted
/// on it, whatever the cause (a loss rule, or a tail-loss probe fired while a
/// busy CPU kept the receiver from running).
pub fn total_retrans(stream: &TcpStream) -> Result<u32> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: tcp_info is plain integers; the kernel writes at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    if rc != 0 {
        anyhow::bail!("getsockopt(TCP_INFO): {}", std::io::Error::last_os_error());
    }
    Ok(info.tcpi_total_retrans)
}

/// Closes `stream` abortively: SO_LINGER on with a zero timeout makes
/// close() reset the connection instead of sending a FIN.
pub fn abort(stream: TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and a plain struct of its declared size.
    let rc = unsafe {
        libc::setsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, (&raw const linger).cast(), size_of::<libc::linger>() as libc::socklen_t)
    };
    if rc != 0 {
        anyhow::bail!("setsockopt(SO_LINGER): {}", std::io::Error::last_os_error());
    }
    drop(stream);
    Ok(())
}
