//! Whole-fleet test helpers: start the real binaries on loopback and in namespaces.
