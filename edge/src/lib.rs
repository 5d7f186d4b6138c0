//! outpost-edge: the edge router. Routes HTTP by Host, TLS by SNI (read from the ClientHello
//! before anything else) and TCP by listen port to the instances of a service; follows its routes
//! from control by cursor and keeps serving its last-good table offline and across restarts
//! (E1–E3). Depends on `proto` only.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod accept;
pub mod backend;
pub mod cache;
pub mod certs;
pub mod checker;
pub mod control;
pub mod follow;
pub mod health;
pub mod http;
pub mod io;
pub mod proxy_protocol;
pub mod sni;
pub mod state;
pub mod status;
pub mod table;
pub mod tcp;
pub mod tls;
pub mod workers;
