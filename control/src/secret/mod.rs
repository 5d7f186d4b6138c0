//! Secrets (P11, DESIGN "Secrets"): versions sealed at rest under per-version data keys wrapped
//! by a master key kept outside the store (`master_key`, `at_rest`), the views of them
//! (`views`), their endpoints (`api`) and their delivery, sealed for the X25519 key of each node
//! whose allocations reference them (`delivery`). The CA key and credentials are sealed under
//! the same master key (`sealed_records`). No value is ever logged, stored in the clear,
//! or put in an error.

pub mod api;
pub mod at_rest;
pub mod delivery;
pub mod master_key;
pub mod rotate;
pub mod sealed_records;
pub mod views;

pub use master_key::{MasterKey, MasterKeySource, MasterKeyring};
