//! outpost-control placeholder until the control service lands.
fn main() {}
