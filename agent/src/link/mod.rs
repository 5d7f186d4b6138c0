//! The HTTPS link to control: CA pinning at enrollment (`pinning`), the HTTP client
//! (`client`) and the session slot with its single registration in flight (`session`).
//! No state of the agent lives here; `enroll` and the sync threads use it.

pub mod client;
pub mod pinning;
pub mod session;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tls_tests;
