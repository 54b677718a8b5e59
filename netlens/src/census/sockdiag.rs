//! The netlink side of the census and of top's connection list: one
//! SOCK_DIAG_BY_FAMILY dump of the TCP sockets of a family, read to its end.

use std::io;

use anyhow::{anyhow, Context as _, Result};
use netlens_common::tcp_state::NEW_SYN_RECV as TCP_NEW_SYN_RECV;
use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, Parseable as _, NLMSG_DONE, NLMSG_ERROR,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
    SockDiagMessage, SOCK_DIAG_BY_FAMILY,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// Receive buffer for the dump. The kernel fills dump datagrams of at most
/// ~32 KiB; twice that leaves room, and a truncated datagram is detected anyway.
const RECEIVE_BUFFER_LEN: usize = 64 * 1024;

/// Netlink messages inside a datagram start on 4-byte boundaries.
const NLMSG_ALIGN: usize = 4;

/// `struct inet_diag_msg`: the fixed part of each socket record; the
/// attributes asked for (INET_DIAG_INFO, ...) follow it.
const INET_DIAG_MSG_LEN: usize = 72;

/// What one dump asks the kernel for.
#[derive(Clone, Debug)]
pub(crate) struct DumpRequest {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    /// Bits `1 << state` of the TCP states wanted.
    pub states: StateFlags,
    /// Attributes wanted with each socket (INET_DIAG_INFO: `tcp_info`).
    pub extensions: ExtensionFlags,
}

impl DumpRequest {
    /// Every TCP state, no attributes: what the census counts.
    pub(crate) fn census(family: u8) -> Self {
        // StateFlags::all() stops at TCP_CLOSING; ask for TCP_NEW_SYN_RECV too.
        // (Not TCP_BOUND_INACTIVE, 13: bound-but-unused sockets are not connections.)
        let states = StateFlags::from_bits_retain(StateFlags::all().bits() | 1 << TCP_NEW_SYN_RECV);
        Self { family, states, extensions: ExtensionFlags::empty() }
    }
}

/// A NETLINK_SOCK_DIAG socket plus the buffer its dumps are read into.
pub(crate) struct SockDiag {
    socket: Socket,
    receive_buffer: Vec<u8>,
}

impl SockDiag {
    /// A socket for the calling thread's network namespace (the kernel
    /// binds it to the namespace it is created in, for good).
    pub(crate) fn open() -> Result<Self> {
        let socket = Socket::new(NETLINK_SOCK_DIAG).context(
            "socket census: cannot open a NETLINK_SOCK_DIAG socket; \
             is the kernel built with CONFIG_INET_DIAG?",
        )?;
        // Connected to the kernel (port 0), the socket refuses datagrams from
        // other processes, so every reply we read is the kernel's. The kernel
        // autobinds our end on connect.
        socket.connect(&netlink_sys::SocketAddr::new(0, 0)).context(
            "socket census: cannot connect the NETLINK_SOCK_DIAG socket to the kernel; \
             is netlink restricted here (seccomp, LSM)?",
        )?;
        Ok(Self { socket, receive_buffer: vec![0; RECEIVE_BUFFER_LEN] })
    }

    /// Dumps the TCP sockets `request` asks for, calling `on_socket` with
    /// each one's fixed part and its attributes (netlink attributes, as
    /// the kernel sent them). Reads the multi-part reply until NLMSG_DONE.
    pub(crate) fn dump_tcp(
        &mut self,
        request: &DumpRequest,
        sequence: u32,
        mut on_socket: impl FnMut(&InetResponseHeader, &[u8]),
    ) -> Result<()> {
        let family_name = if request.family == AF_INET { "IPv4" } else { "IPv6" };
        let fail = |what: String| {
            anyhow!(
                "socket census: netlink sock_diag dump of {family_name} TCP sockets failed: \
                 {what}; is CONFIG_INET_DIAG (tcp_diag) enabled?"
            )
        };

        let request = dump_request(request, sequence);
        self.socket.send(&request, 0).map_err(|e| fail(format!("send: {e}")))?;

        loop {
            let received = receive_datagram(&self.socket, &mut self.receive_buffer)
                .map_err(|e| fail(format!("receive: {e}")))?;
            if received > self.receive_buffer.len() {
                return Err(fail(format!(
                    "a {received}-byte reply did not fit the {}-byte buffer",
                    self.receive_buffer.len()
                )));
            }

            let mut rest = &self.receive_buffer[..received];
            while !rest.is_empty() {
                // new_checked guarantees header <= length <= rest.len(), so
                // payload() below cannot go out of bounds.
                let message = NetlinkBuffer::new_checked(rest)
                    .map_err(|e| fail(format!("malformed reply: {e}")))?;
                let length = message.length() as usize;

                if message.sequence_number() == sequence {
                    match message.message_type() {
                        SOCK_DIAG_BY_FAMILY => {
                            let socket = InetResponseHeader::parse(message.payload())
                                .map_err(|e| fail(format!("malformed socket record: {e}")))?;
                            let attributes = message.payload().get(INET_DIAG_MSG_LEN..).unwrap_or_default();
                            on_socket(&socket, attributes);
                        }
                        NLMSG_DONE => {
                            // The payload of a dump's DONE is the dump's
                            // return value: negative errno if it broke off.
                            return match leading_i32(message.payload()) {
                                Some(errno) if errno < 0 => Err(fail(format!(
                                    "kernel ended the dump with: {}",
                                    io::Error::from_raw_os_error(errno.saturating_neg())
                                ))),
                                _ => Ok(()),
                            };
                        }
                        NLMSG_ERROR => match leading_i32(message.payload()) {
                            // 0 is an acknowledgement, not an error.
                            Some(0) => {}
                            Some(errno) => {
                                return Err(fail(format!(
                                    "kernel refused the dump: {}",
                                    io::Error::from_raw_os_error(errno.saturating_neg())
                                )))
                            }
                            None => return Err(fail("truncated error reply".to_owned())),
                        },
                        // NLMSG_NOOP and anything else carry no socket.
                        _ => {}
                    }
                }

                let aligned_length = length.next_multiple_of(NLMSG_ALIGN);
                rest = rest.get(aligned_length..).unwrap_or_default();
            }
        }
    }
}

/// The serialized SOCK_DIAG_BY_FAMILY dump request.
fn dump_request(request: &DumpRequest, sequence: u32) -> Vec<u8> {
    let DumpRequest { family, states, extensions } = request.clone();
    let socket_id = if family == AF_INET { SocketId::new_v4() } else { SocketId::new_v6() };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = sequence;
    let mut message = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions,
            states,
            socket_id,
        })
        .into(),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// Receives one datagram into `buffer`, retrying when a signal interrupts.
/// With MSG_TRUNC the result is the datagram's full length, which exceeds
/// `buffer.len()` if it was cut short.
fn receive_datagram(socket: &Socket, buffer: &mut [u8]) -> io::Result<usize> {
    loop {
        match socket.recv(&mut &mut buffer[..], libc::MSG_TRUNC) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result,
        }
    }
}

/// The native-endian i32 at the start of a NLMSG_DONE / NLMSG_ERROR payload.
fn leading_i32(payload: &[u8]) -> Option<i32> {
    let bytes = payload.get(..4)?.try_into().ok()?;
    Some(i32::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use netlink_packet_sock_diag::constants::AF_INET6;

    use super::*;

    #[test]
    fn dump_request_asks_for_all_states_and_no_extensions() {
        let bytes = dump_request(&DumpRequest::census(AF_INET6), 7);
        // nlmsghdr (16) + inet_diag_req_v2 (56)
        assert_eq!(bytes.len(), 72);
        let message = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        assert_eq!(message.message_type(), SOCK_DIAG_BY_FAMILY);
        assert_eq!(message.flags(), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(message.sequence_number(), 7);
        let payload = message.payload();
        assert_eq!(payload[0], AF_INET6);
        assert_eq!(payload[1], IPPROTO_TCP);
        assert_eq!(payload[2], 0, "no INET_DIAG extensions");
        let states = u32::from_ne_bytes(payload[4..8].try_into().unwrap());
        assert_eq!(states, 0b1_1111_1111_1110, "TCP states 1..=12");
    }

    #[test]
    fn dump_request_carries_states_and_extensions() {
        let request = DumpRequest {
            family: AF_INET,
            states: StateFlags::ESTABLISHED | StateFlags::CLOSE_WAIT,
            extensions: ExtensionFlags::INFO,
        };
        let bytes = dump_request(&request, 1);
        let message = NetlinkBuffer::new_checked(&bytes[..]).unwrap();
        let payload = message.payload();
        assert_eq!(payload[2], 1 << (2 - 1), "INET_DIAG_INFO");
        let states = u32::from_ne_bytes(payload[4..8].try_into().unwrap());
        assert_eq!(states, 1 << 1 | 1 << 8);
    }
}
