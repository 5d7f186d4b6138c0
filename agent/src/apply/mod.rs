//! Applying the plan on this node: allocations as supervised processes (`process`), the pure
//! desired-vs-running diff (`diff`), and the environment-profile reconcilers (`profile`).

pub mod diff;
pub mod process;
pub mod profile;
pub mod wireguard;
