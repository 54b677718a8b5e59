//! The HTTP side: `GET /metrics` and `GET /healthz`, on axum.

use std::sync::{atomic::{AtomicU64, Ordering}, Arc};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use tokio::{net::TcpListener, sync::mpsc};

use super::Scrape;
use crate::source::monotonic_ns;

/// The text exposition format the prometheus crate writes.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The event loop drains at least every 20 ms (its timer); this long
/// without a drain means it is stuck, and events pile up in the kernel.
pub const STALE_AFTER_NS: u64 = 5_000_000_000;

/// When the event loop last drained the ring buffer (CLOCK_MONOTONIC ns),
/// written by the loop, read by `/healthz`.
pub struct LastDrain(pub AtomicU64);

impl LastDrain {
    pub fn now() -> Self {
        Self(AtomicU64::new(monotonic_ns()))
    }
}

#[derive(Clone)]
struct Shared {
    scrapes: mpsc::Sender<Scrape>,
    last_drain: Arc<LastDrain>,
}

pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>, last_drain: Arc<LastDrain>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Shared { scrapes, last_drain });
    if let Err(err) = axum::serve(listener, app).await {
        eprintln!("netlens: the metrics server stopped: {err}");
    }
}

async fn metrics(State(shared): State<Shared>) -> impl IntoResponse {
    let (reply, text) = tokio::sync::oneshot::channel();
    if shared.scrapes.send(reply).await.is_err() {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain")], "shutting down\n".to_string());
    }
    match text.await {
        Ok(text) => (axum::http::StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(_) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain")], "shutting down\n".to_string()),
    }
}

/// Whether the loop drained recently enough to call it alive.
fn draining(last_drain_ns: u64, now_ns: u64) -> bool {
    now_ns.saturating_sub(last_drain_ns) <= STALE_AFTER_NS
}

/// Up when the event loop is running and draining events (a scrape
/// round-trip would be heavier): it stamps every drain.
async fn healthz(State(shared): State<Shared>) -> impl IntoResponse {
    let last = shared.last_drain.0.load(Ordering::Relaxed);
    if shared.scrapes.is_closed() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopping\n".to_string())
    } else if !draining(last, monotonic_ns()) {
        let ago = monotonic_ns().saturating_sub(last) as f64 / 1e9;
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("event loop stalled: no drain for {ago:.1} s\n"))
    } else {
        (axum::http::StatusCode::OK, "ok\n".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_while_the_loop_drains() {
        let now = 100_000_000_000;
        assert!(draining(now - 20_000_000, now), "drained 20 ms ago");
        assert!(draining(now, now));
        assert!(!draining(now - STALE_AFTER_NS - 1, now), "no drain for over 5 s");
        // A stamp from after `now` (read races the loop's store) is fresh.
        assert!(draining(now + 1, now));
    }
}
