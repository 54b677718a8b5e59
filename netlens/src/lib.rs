//! netlens: eBPF TCP observability. The pipeline is
//! loader (kernel side) → source (typed events) → aggregate → views (trace,
//! top, daemon metrics, check).
pub mod aggregate;
pub mod census;
pub mod check;
pub mod daemon;
pub mod doctor;
pub mod cli;
pub mod event;
pub mod features;
pub mod filter;
pub mod jsonl;
pub mod lastgood;
pub mod kernel;
pub mod known_connections;
pub mod loader;
pub mod optional;
pub mod service;
pub mod short_name;
pub mod source;
pub mod top;
pub mod trace;
mod trace_drops;
