//! `netlens top`: a live, top-like view of the transport layer.
pub mod model;

pub mod app;
pub mod batch;
pub mod columns;
pub mod connections;
mod detail;
pub mod feed;
pub mod format;
pub mod header;
pub mod listing;
mod popup;
pub mod render;
pub mod run;
pub mod table;
pub mod terminal;
pub mod view;
#[cfg(test)]
mod tui_tests;
