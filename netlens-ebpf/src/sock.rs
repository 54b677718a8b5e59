//! How a program reads the socket it was handed, in one of two ways:
//!
//! - [`Probed`]: the socket's address as a plain number (raw tracepoints,
//!   kprobes): every member is copied out by `bpf_probe_read_kernel`, a
//!   helper call that checks the address each time.
//! - [`Typed`]: a `struct tcp_sock *` the verifier knows by its BTF type
//!   (BTF tracepoints, after a cast: see [`Typed::of`]): members are plain
//!   loads, each checked once, when the program is loaded, against the
//!   kernel's BTF at the offset userspace resolved from that same BTF.
//!   A few nanoseconds each instead of a helper call.
//!
//! The programs that run for every socket state change and every segment
//! are written once over [`Sock`] and built both ways; the loader attaches
//! the typed build where the kernel accepts it.

use netlens_common::AF_INET;

use crate::{
    config::cfg_field,
    kernel::{cast, member, name16, slot, sock_tuple_in, typed_member, Tuple, Windows},
};

/// What a program holds of a socket, as the flow table takes it (flows.rs):
/// its address, and where the program was handed the socket typed by BTF,
/// that pointer as the kernel handed it. Socket storage's helpers take no
/// other: not an address, nor a pointer made by a cast.
pub trait SockRef: Copy {
    /// Members are plain loads (a helper call costs more than a few), and
    /// [`Self::handed`] is the kernel's typed pointer.
    const TYPED: bool;
    /// The socket's address: the flow table's key.
    fn addr(self) -> u64;
    /// The BTF-typed `struct sock *` the program was handed (0 where not
    /// [`Self::TYPED`]).
    fn handed(self) -> u64;
}

/// A socket's BTF-typed pointer as a BTF tracepoint or fentry program was
/// handed it, used only to find its flow.
#[derive(Clone, Copy)]
pub struct Handed(pub u64);

impl SockRef for Handed {
    const TYPED: bool = true;

    #[inline(always)]
    fn addr(self) -> u64 {
        self.0
    }

    #[inline(always)]
    fn handed(self) -> u64 {
        self.0
    }
}

/// A TCP socket a program can read members of. Offsets are from the start
/// of the socket (`struct sock` and `struct tcp_sock` share it).
pub trait Sock: SockRef {
    /// The member of type `T` (at most 8 bytes) at `offset`.
    fn get<T: Copy>(self, offset: u32) -> Result<T, i32>;
    /// Whether the socket is TCP (SCTP and MPTCP's own sockets pass the
    /// same tracepoints).
    fn is_tcp(self) -> bool;
    /// The socket's endpoints.
    fn tuple(self) -> Result<Tuple, i32>;
    /// The tcp_sock members tcp_probe and the close report read; a
    /// [`Probed`] socket copies them into this CPU's window `slot`.
    fn tcp_now(self, slot: u32) -> Result<TcpNow, i32>;

    /// The member of type `T` (at most 8 bytes) at `offset` of a struct
    /// at `pointer`, a pointer member read from this socket (or from a
    /// struct reached that way): probed, or a plain load where the socket
    /// is typed (what it points to is typed too).
    fn follow<T: Copy>(self, pointer: u64, offset: u32) -> Result<T, i32>;

    /// The inode number of the socket's network namespace, or 0.
    #[inline(always)]
    fn netns(self) -> u32 {
        let net: u64 = self.get(cfg_field!(kernel.sock_net)).unwrap_or(0);
        if net == 0 {
            return 0;
        }
        self.follow(net, cfg_field!(kernel.net_inum)).unwrap_or(0)
    }

    /// The name of the socket's congestion control algorithm ("cubic"),
    /// or zeros: a char[16], read as two halves.
    #[inline(always)]
    fn congestion(self) -> [u8; 16] {
        let ops: u64 = self.get(cfg_field!(kernel.icsk_ca_ops)).unwrap_or(0);
        if ops == 0 {
            return [0; 16];
        }
        let name = cfg_field!(kernel.ca_ops_name);
        let (Ok(low), Ok(high)) = (self.follow::<u64>(ops, name), self.follow::<u64>(ops, name + 8)) else {
            return [0; 16];
        };
        name16(low, high)
    }

    /// The id of the cgroup the socket was created in, or 0: followed
    /// through `struct cgroup *` and `struct kernfs_node *` where the
    /// member is a pointer (5.15+; `sock_cgroup` is 0 before, where it is a
    /// tagged union).
    #[inline(always)]
    fn cgroup(self) -> u64 {
        let offset = cfg_field!(kernel.sock_cgroup);
        if offset == 0 {
            return 0;
        }
        let cgroup: u64 = self.get(offset).unwrap_or(0);
        if cgroup == 0 {
            return 0;
        }
        let kn: u64 = self.follow(cgroup, cfg_field!(kernel.cgroup_kn)).unwrap_or(0);
        if kn == 0 {
            return 0;
        }
        self.follow(kn, cfg_field!(kernel.kernfs_node_id)).unwrap_or(0)
    }
}

/// What tcp_probe and the close report read of a `tcp_sock`.
#[derive(Clone, Copy, Default)]
pub struct TcpNow {
    pub snd_cwnd: u32,
    pub snd_ssthresh: u32,
    /// As the kernel keeps it: µs << 3.
    pub srtt_us: u32,
    pub min_rtt_us: u32,
    pub snd_wnd: u32,
    pub rcv_wnd: u32,
    pub rcv_nxt: u32,
    /// The byte holding the `icsk_ca_state` bitfield.
    pub ca_state_byte: u8,
}

const IPPROTO_TCP: u16 = 6;

impl TcpNow {
    /// From this CPU's copies of the socket's windows, where the probe
    /// offsets place each member (see `netlens_common::ProbeOffsets`).
    /// Each offset is read on its own: a read of the whole offsets struct
    /// copies every byte of it, once per segment.
    #[inline(always)]
    fn from_windows(windows: &Windows) -> Result<Self, i32> {
        Ok(Self {
            snd_cwnd: windows.get(cfg_field!(probe.snd_cwnd))?,
            snd_ssthresh: windows.get(cfg_field!(probe.snd_ssthresh))?,
            srtt_us: windows.get(cfg_field!(probe.srtt_us))?,
            min_rtt_us: windows.get(cfg_field!(probe.min_rtt))?,
            snd_wnd: windows.get(cfg_field!(probe.snd_wnd))?,
            rcv_wnd: windows.get(cfg_field!(probe.rcv_wnd))?,
            rcv_nxt: windows.get(cfg_field!(probe.rcv_nxt))?,
            ca_state_byte: windows.get(cfg_field!(probe.ca_state))?,
        })
    }
}

/// A socket known by its address only.
#[derive(Clone, Copy)]
pub struct Probed(pub u64);

impl SockRef for Probed {
    const TYPED: bool = false;

    #[inline(always)]
    fn addr(self) -> u64 {
        self.0
    }

    #[inline(always)]
    fn handed(self) -> u64 {
        0
    }
}

impl Sock for Probed {
    #[inline(always)]
    fn get<T: Copy>(self, offset: u32) -> Result<T, i32> {
        member(self.0, offset)
    }

    #[inline(always)]
    fn follow<T: Copy>(self, pointer: u64, offset: u32) -> Result<T, i32> {
        member(pointer, offset)
    }

    #[inline(always)]
    fn is_tcp(self) -> bool {
        self.get::<u16>(cfg_field!(kernel.sock_protocol)) == Ok(IPPROTO_TCP)
    }

    #[inline(always)]
    fn tuple(self) -> Result<Tuple, i32> {
        sock_tuple_in(self.0, slot::SET_STATE)
    }

    /// One copy per window of the members (one or two on most kernels).
    #[inline(always)]
    fn tcp_now(self, slot: u32) -> Result<TcpNow, i32> {
        TcpNow::from_windows(Windows::copy(self.0, &cfg_field!(probe.windows), slot)?)
    }
}

/// A `struct tcp_sock *` typed by BTF, and the `struct sock *` it was
/// made from (see [`SockRef::handed`]).
#[derive(Clone, Copy)]
pub struct Typed {
    tp: u64,
    handed: u64,
}

impl Typed {
    /// `sk`, a BTF-typed `struct sock *` (a BTF tracepoint's argument), as
    /// a tcp_sock; `None` for sockets that are not TCP (SCTP, MPTCP's own).
    /// Where the kernel has the `bpf_rdonly_cast` kfunc (6.2+), the cast
    /// costs no call: the protocol test is then ours, one load (every
    /// socket these tracepoints pass is a full one, and a TCP socket is a
    /// stream). Elsewhere, `bpf_skc_to_tcp_sock` tests it.
    #[inline(always)]
    pub fn of(sk: u64) -> Option<Self> {
        let tcp_sock_type = cfg_field!(kernel.tcp_sock_btf_id);
        // SAFETY: `sk` is a BTF-typed `struct sock *`, and `sk_protocol` a
        // u16 member of it (checked at load time).
        if tcp_sock_type != 0 && unsafe { typed_member::<u16>(sk, cfg_field!(kernel.sock_protocol)) } != IPPROTO_TCP {
            return None;
        }
        // The kfunc, or `bpf_skc_to_tcp_sock` where the id is 0.
        let tp = cast(sk, tcp_sock_type);
        (tp != 0).then_some(Self { tp, handed: sk })
    }

    /// `sk` as a tcp_sock, from a hook that passes only TCP sockets
    /// (`tcp:tcp_probe`, called from `tcp_rcv_established`): no protocol
    /// test (its load of `sk_protocol`, a line the receive path does not
    /// touch, was about 5 % of tcp_probe's samples in a perf profile).
    #[inline(always)]
    pub fn of_tcp(sk: u64) -> Option<Self> {
        let tp = cast(sk, cfg_field!(kernel.tcp_sock_btf_id));
        (tp != 0).then_some(Self { tp, handed: sk })
    }
}

impl SockRef for Typed {
    const TYPED: bool = true;

    #[inline(always)]
    fn addr(self) -> u64 {
        self.tp
    }

    #[inline(always)]
    fn handed(self) -> u64 {
        self.handed
    }
}

impl Sock for Typed {
    #[inline(always)]
    fn get<T: Copy>(self, offset: u32) -> Result<T, i32> {
        // SAFETY: a `struct tcp_sock *` typed by BTF (see `Typed::of`);
        // `offset` lies inside one of its members (checked at load time).
        Ok(unsafe { typed_member(self.tp, offset) })
    }

    #[inline(always)]
    fn follow<T: Copy>(self, pointer: u64, offset: u32) -> Result<T, i32> {
        // SAFETY: `pointer` was loaded from this typed socket or from a
        // struct reached from it, so the verifier knows its type too.
        Ok(unsafe { typed_member(pointer, offset) })
    }

    /// Checked when it was made ([`Typed::of`]).
    #[inline(always)]
    fn is_tcp(self) -> bool {
        true
    }

    #[inline(always)]
    fn tuple(self) -> Result<Tuple, i32> {
        let sport = u16::from_be(self.get(cfg_field!(kernel.inet_sport))?);
        Ok(common_tuple(self.tp, sport))
    }

    /// One load per member, at its offset in the socket.
    #[inline(always)]
    fn tcp_now(self, _slot: u32) -> Result<TcpNow, i32> {
        Ok(TcpNow {
            snd_cwnd: self.get(cfg_field!(probe.at.snd_cwnd))?,
            snd_ssthresh: self.get(cfg_field!(probe.at.snd_ssthresh))?,
            srtt_us: self.get(cfg_field!(probe.at.srtt_us))?,
            min_rtt_us: self.get(cfg_field!(probe.at.min_rtt))?,
            snd_wnd: self.get(cfg_field!(probe.at.snd_wnd))?,
            rcv_wnd: self.get(cfg_field!(probe.at.rcv_wnd))?,
            rcv_nxt: self.get(cfg_field!(probe.at.rcv_nxt))?,
            ca_state_byte: self.get(cfg_field!(probe.at.ca_state))?,
        })
    }
}

/// The ends in the `sock_common` that `sk`, a BTF-typed pointer to a socket
/// of any kind (full, request), starts with; its local port `sport` is
/// read by the caller, from where that kind keeps it.
#[inline(always)]
pub fn common_tuple(sk: u64, sport: u16) -> Tuple {
    let at = |offset: u16| offset as u32;
    // SAFETY (each load): `sk` is typed by BTF, and every offset lies in
    // the `sock_common` it starts with (checked at load time).
    let mut tuple = Tuple {
        family: unsafe { typed_member(sk, at(cfg_field!(kernel.sock_tuple.family))) },
        sport,
        dport: u16::from_be(unsafe { typed_member(sk, at(cfg_field!(kernel.sock_tuple.dport))) }),
        ..Tuple::default()
    };
    if tuple.family == AF_INET {
        let saddr: u32 = unsafe { typed_member(sk, at(cfg_field!(kernel.sock_tuple.rcv_saddr))) };
        let daddr: u32 = unsafe { typed_member(sk, at(cfg_field!(kernel.sock_tuple.daddr))) };
        tuple.saddr[..4].copy_from_slice(&saddr.to_ne_bytes());
        tuple.daddr[..4].copy_from_slice(&daddr.to_ne_bytes());
    } else {
        // Two loads each: a load is at most 8 bytes.
        for (half, step) in [(0, 0u16), (8, 8)] {
            let saddr: u64 = unsafe { typed_member(sk, at(cfg_field!(kernel.sock_tuple.v6_rcv_saddr) + step)) };
            let daddr: u64 = unsafe { typed_member(sk, at(cfg_field!(kernel.sock_tuple.v6_daddr) + step)) };
            tuple.saddr[half..half + 8].copy_from_slice(&saddr.to_ne_bytes());
            tuple.daddr[half..half + 8].copy_from_slice(&daddr.to_ne_bytes());
        }
    }
    tuple
}
