//! netlens: eBPF TCP observability. The pipeline is
//! loader (kernel side) → source (typed events) → views (trace, check).
pub mod check;
pub mod cli;
pub mod event;
pub mod filter;
pub mod jsonl;
pub mod kernel;
pub mod loader;
pub mod source;
pub mod trace;
