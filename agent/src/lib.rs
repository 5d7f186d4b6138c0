//! outpost-agent: the edge-box agent. Offline-first: it boots from the last-good plan in its redb
//! store, applies allocations as supervised processes, and follows the control service's change
//! feed by cursor when the link is up.
//!
//! Synchronous by design: std threads, ureq, redb, nix. No tokio, no async.

pub mod apply;
pub mod artifact;
pub mod boot;
pub mod config;
pub mod discovery;
pub mod election;
pub mod enroll;
pub mod leader;
pub mod link;
pub mod logging;
pub mod node;
pub mod os;
pub mod overlay;
pub mod profile_runner;
pub mod status;
pub mod store;
pub mod sync;
pub mod upgrade;
