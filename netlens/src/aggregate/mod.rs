//! Aggregation: turns the event stream into per-endpoint and host-wide
//! statistics that the views (daemon metrics, top) render. Memory is bounded
//! whatever the traffic: at most `top_k` endpoints are tracked, the rest is
//! "other".

pub mod buckets;
pub mod endpoint;
pub mod recent;
pub mod stats;
pub mod topk;

use crate::event::{ConnEvent, Detail, Direction};
use endpoint::{EndpointBy, EndpointKey};
use recent::Recent;
use stats::ConnStats;
use topk::TopK;

pub struct Aggregator {
    by: EndpointBy,
    /// Everything, whichever endpoint.
    pub host: ConnStats,
    pub endpoints: TopK<EndpointKey, ConnStats>,
    /// Last minute's handshakes (active, passive) and HOL stalls.
    pub recent_handshake: [Recent; 2],
    pub recent_hol_stall: Recent,
    /// Events seen, and the newest timestamp (CLOCK_MONOTONIC ns).
    pub events: u64,
    pub last_ts_ns: u64,
}

impl Aggregator {
    pub fn new(by: EndpointBy, top_k: usize) -> Self {
        Self {
            by,
            host: ConnStats::default(),
            endpoints: TopK::new(if by == EndpointBy::None { 0 } else { top_k }),
            recent_handshake: Default::default(),
            recent_hol_stall: Recent::default(),
            events: 0,
            last_ts_ns: 0,
        }
    }

    pub fn record(&mut self, event: &ConnEvent) {
        self.events += 1;
        self.last_ts_ns = self.last_ts_ns.max(event.ts_ns);
        self.host.record(event);
        match &event.detail {
            Detail::Handshake { direction, handshake_ns } => {
                let slot = usize::from(*direction == Direction::Passive);
                self.recent_handshake[slot].record(event.ts_ns, *handshake_ns);
            }
            Detail::HolStall { stall_ns, .. } => self.recent_hol_stall.record(event.ts_ns, *stall_ns),
            _ => {}
        }
        if let Some(key) = self.by.key(event) {
            // Traffic weight: connections opened (and listeners dropping
            // them). Other events only update an endpoint already tracked,
            // or rank a waiting one.
            let weight = u64::from(matches!(event.detail, Detail::Handshake { .. } | Detail::ListenOverflow { .. }));
            if let Some(stats) = self.endpoints.get_or_admit(&key, weight) {
                stats.record(event);
            }
        }
    }

    /// Ends an epoch of the endpoint table (see [`TopK::end_epoch`]).
    pub fn end_epoch(&mut self) {
        self.endpoints.end_epoch();
    }

    /// Everything not in a tracked endpoint.
    pub fn other(&self) -> ConnStats {
        let mut other = self.host.clone();
        for (_, stats) in self.endpoints.iter() {
            other.subtract(stats);
        }
        other
    }

    pub fn endpoint_by(&self) -> EndpointBy {
        self.by
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::sample;

    fn handshake_from(remote_port: u16) -> ConnEvent {
        let mut event = sample(Detail::Handshake { direction: Direction::Active, handshake_ns: 50_000 });
        event.direction = Some(Direction::Active);
        event.remote.set_port(remote_port);
        event
    }

    #[test]
    fn five_thousand_endpoints_stay_bounded_and_add_up() {
        let mut aggregator = Aggregator::new(EndpointBy::Auto, 50);
        for port in 0..5_000u16 {
            aggregator.record(&handshake_from(10_000 + port));
        }
        assert_eq!(aggregator.endpoints.len(), 50);
        let tracked: u64 = aggregator.endpoints.iter().map(|(_, s)| s.opened_total()).sum();
        assert_eq!(tracked + aggregator.other().opened_total(), 5_000);
        assert_eq!(aggregator.host.handshake[stats::ACTIVE].count(), 5_000);
    }

    #[test]
    fn no_dimension_tracks_nothing() {
        let mut aggregator = Aggregator::new(EndpointBy::None, 50);
        aggregator.record(&handshake_from(1));
        assert!(aggregator.endpoints.is_empty());
        assert_eq!(aggregator.other().opened_total(), 1);
    }
}
