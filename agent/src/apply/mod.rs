//! Applying the plan on this node: allocations as supervised processes (`process`), the pure
//! desired-vs-running diff (`diff`), the environment-profile reconcilers (`profile`; the crate's
//! `profile_runner` wires them into the running agent), secrets handed to processes (`secret`)
//! and the WireGuard overlay's devices (`wireguard`).

pub mod diff;
pub mod process;
pub mod profile;
pub mod secret;
pub mod wireguard;
