//! Evidence built from events, for the rules' unit tests.

pub use super::Severity;
pub use crate::{
    aggregate::endpoint::EndpointKey,
    doctor::evidence::{Evidence, Watch, WindowStalls},
    event::{sample, ConnEvent, Detail, Direction, Dynamics, FailReason},
};

pub const CLIENT: &str = "[::1]:40000";

pub fn remote() -> EndpointKey {
    EndpointKey::Remote(CLIENT.parse().unwrap())
}

pub fn active(ts_ns: u64, detail: Detail) -> ConnEvent {
    let mut event = sample(detail);
    event.direction = Some(Direction::Active);
    event.ts_ns = ts_ns;
    event.pid = Some(42);
    event
}

pub fn close(lifetime_ns: u64, bytes: u64, segs_out: u32, retransmits: u32, spurious: u32) -> Detail {
    Detail::Close {
        direction: Some(Direction::Active),
        lifetime_ns: Some(lifetime_ns),
        bytes_sent: bytes / 2,
        bytes_received: bytes - bytes / 2,
        retransmits,
        spurious_retransmits: spurious,
        transport: Dynamics { segs_out, ..Dynamics::default() },
    }
}

/// `n` connections over `window_s`, each with `handshake_ns`, living
/// `lifetime_ns` and moving `bytes`.
pub fn connections(n: u64, window_s: f64, handshake_ns: u64, lifetime_ns: u64, bytes: u64) -> Evidence {
    let mut watch = Watch::default();
    let step = (window_s * 1e9) as u64 / n.max(1);
    for i in 0..n {
        watch.record(&active(i * step, Detail::Handshake { direction: Direction::Active, handshake_ns }));
        watch.record(&active(i * step + lifetime_ns, close(lifetime_ns, bytes, 10, 0, 0)));
    }
    watch.finish();
    watch.endpoints.remove(&remote()).unwrap_or_default()
}
