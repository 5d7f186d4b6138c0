//! outpost-control: the control service library (event log, projections, scheduler, change
//! feed, enrollment and the HTTP API).
pub mod store;
