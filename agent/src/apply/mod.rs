//! Applying the plan on this node: allocations as supervised processes (`process`), the pure
//! desired-vs-running diff (`diff`), the environment-profile reconcilers (`profile`) and their
//! wiring into the running agent (`profile_runner`), and secrets handed to processes (`secret`).

pub mod diff;
pub mod process;
pub mod profile;
pub mod profile_runner;
pub mod secret;
pub mod wireguard;
