//! outpostctl placeholder until the client lands.
fn main() {}
