//! outpost-control: the control service library — the event log and its store, projections,
//! the scheduler, the change feed, enrollment, and the HTTPS API.
//!
//! Writes flow command → events (one store transaction) → projector → views → plans; the
//! scheduler reads views and appends allocation events; the feed is a filtered view of the log.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admin;
pub mod api;
pub mod app;
pub mod artifact;
pub mod audit;
pub mod bench;
pub mod command;
pub mod config;
pub mod discovery;
pub mod feed;
pub mod init;
pub mod log;
pub mod metrics;
pub mod overlay;
pub mod projection;
pub mod release;
pub mod rollout;
pub mod route;
pub mod scheduler;
pub mod secret;
pub mod server;
pub mod store;
pub mod tls;
pub mod ui;

pub use api::router;
pub use app::{Control, ControlSettings};
pub use config::ServeConfig;
pub use server::serve;
