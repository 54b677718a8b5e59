//! The HTTP side: `GET /metrics` and `GET /healthz`, on axum.

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use tokio::{net::TcpListener, sync::mpsc};

use super::Scrape;

/// The text exposition format the prometheus crate writes.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let app = Router::new().route("/metrics", get(metrics)).route("/healthz", get(healthz)).with_state(scrapes);
    if let Err(err) = axum::serve(listener, app).await {
        eprintln!("netlens: the metrics server stopped: {err}");
    }
}

async fn metrics(State(scrapes): State<mpsc::Sender<Scrape>>) -> impl IntoResponse {
    let (reply, text) = tokio::sync::oneshot::channel();
    if scrapes.send(reply).await.is_err() {
        return (axum::http::StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain")], "shutting down\n".to_string());
    }
    match text.await {
        Ok(text) => (axum::http::StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
        Err(_) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, [(header::CONTENT_TYPE, "text/plain")], "shutting down\n".to_string()),
    }
}

/// Up when the event loop answers (a scrape round-trip would be heavier).
async fn healthz(State(scrapes): State<mpsc::Sender<Scrape>>) -> impl IntoResponse {
    if scrapes.is_closed() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else {
        (axum::http::StatusCode::OK, "ok\n")
    }
}
