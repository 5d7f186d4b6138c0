//! Outpost's wire contract: the types control, agent and edge exchange, and their bounded codecs.
//!
//! This crate does no I/O: no sockets, no files, no clocks, no tokio. Every decoder of untrusted
//! bytes is bounded by the constants in [`limits`] and returns an error instead of panicking.
//! Values that cross the wire are validated once, at decode time, through [`validate::Validate`].

// Tests may unwrap: a failing unwrap is the test failing.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod artifact;
pub mod backoff;
pub mod bootstrap;
pub mod codec;
pub mod cursor;
pub mod enroll;
pub mod feed;
pub mod hash;
pub mod limits;
pub mod name;
pub mod node;
pub mod overlay;
pub mod plan;
mod plan_v1;
pub mod profile;
pub mod release;
pub mod rollout;
pub mod route;
pub mod secret;
pub mod service;
pub mod site;
pub mod time;
pub mod validate;

pub use cursor::Cursor;
pub use name::Name;
pub use validate::{Validate, ValidationError};
