//! Types shared by the eBPF programs and userspace.
//!
//! Everything here is `#[repr(C)]` and plain old data: the kernel side writes
//! these bytes, userspace reads them back. `aya::Pod` impls live behind the
//! `user` feature so the eBPF build stays `no_std` and dependency-free.
#![no_std]

pub mod config;
pub mod event;
pub mod histogram;

pub use config::*;
pub use event::*;
pub use histogram::*;

/// Linux TCP states (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// The kernel's name for a state, without the `TCP_` prefix.
    pub fn name(state: u8) -> &'static str {
        match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
}

/// Address families as the kernel reports them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Counters kept per CPU in the `COUNTERS` map, indexed by these constants.
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 0;
    /// New entries in the flow table.
    pub const FLOW_INSERTS: u32 = 1;
    /// Entries removed because their connection ended. Inserts - removals -
    /// live entries = entries the LRU evicted.
    pub const FLOW_REMOVES: u32 = 2;
    /// `sock:sock_rcvqueue_full`: segments dropped because a socket's
    /// receive queue was full.
    pub const RCVQUEUE_FULL: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// Capacity of the in-kernel flow table (an LRU hash keyed by socket).
pub const FLOW_TABLE_ENTRIES: u32 = 65_536;
/// Capacity of the SYN-ACK start table (an LRU hash keyed by 4-tuple).
pub const SYNACK_TABLE_ENTRIES: u32 = 8_192;
/// The longest block the programs copy in one read: a tracepoint record,
/// a socket's head or the per-packet window of `tcp_sock`.
pub const RECORD_MAX: usize = 512;

/// Capacity of the listener tables (listeners by port, overflows by
/// listener, accept() calls in progress).
pub const LISTENER_TABLE_ENTRIES: u32 = 4_096;
/// Drop reasons counted per CPU by `skb:kfree_skb` (values of `enum
/// skb_drop_reason` below this; subsystem reasons above are not counted).
pub const DROP_REASONS: u32 = 256;
/// Bits of the `MODES` map (set by userspace once it chose the hooks).
pub mod mode {
    /// Listen overflows come from tracepoints: `kfree_skb` counts the
    /// final-ACK ones (reason TCP_LISTEN_OVERFLOW).
    pub const OVERFLOWS_FROM_TRACEPOINTS: u32 = 1;
}

/// Size of the event ring buffer in bytes (a power of two, page aligned).
pub const RING_BYTES: u32 = 8 << 20;
