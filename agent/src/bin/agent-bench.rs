//! Boot benchmark (filled in later).
fn main() {}
