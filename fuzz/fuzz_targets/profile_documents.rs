//! Fuzzes EnvironmentProfile documents as control reads them from an operator (YAML or JSON,
//! strict) and as an agent reads them from control (JSON, lenient). The first byte picks the
//! reader (`a` YAML, `b` strict JSON, `c` lenient JSON, counted modulo 3 from `a`); the rest is
//! the document.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_control::command::{DocumentFormat, parse_set_profile};
use outpost_proto::codec::{Encoding, decode};
use outpost_proto::limits::PROFILE_MAX_BYTES;
use outpost_proto::profile::EnvironmentProfile;

fuzz_target!(|input: &[u8]| {
    let Some((&reader, document)) = input.split_first() else {
        return;
    };
    let _accepted = match reader.wrapping_sub(b'a') % 3 {
        0 => parse_set_profile(document, DocumentFormat::Yaml).is_ok(),
        1 => parse_set_profile(document, DocumentFormat::Json).is_ok(),
        _ => decode::<EnvironmentProfile>(Encoding::Json, document, PROFILE_MAX_BYTES, "profile")
            .is_ok(),
    };
});
