//! Fuzzes the parsers of every HTTP command body and query value control accepts
//! (`outpost_control::command::parse_*`), exactly as the API calls them after its body limit.
//! The first byte picks the parser (`a` register … `k` wait, counted modulo 11 from `a`, in the
//! order of the match below); the rest is the body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_control::command::{
    DocumentFormat, parse_cursor, parse_define_service, parse_heartbeat,
    parse_issue_enrollment_token, parse_issue_operator_token, parse_limit, parse_register,
    parse_report_bootstrap, parse_set_node_role, parse_set_wireguard_key, parse_wait,
};
use outpost_proto::limits::REQUEST_BODY_MAX_BYTES;

fuzz_target!(|input: &[u8]| {
    let Some((&parser, body)) = input.split_first() else {
        return;
    };
    if body.len() > REQUEST_BODY_MAX_BYTES {
        return; // the API refuses these before any parser sees them
    }
    let text = std::str::from_utf8(body).ok();
    let _accepted = match parser.wrapping_sub(b'a') % 11 {
        0 => parse_register(body).is_ok(),
        1 => parse_heartbeat("n1", body).is_ok(),
        2 => parse_define_service(body, DocumentFormat::Json).is_ok(),
        3 => parse_define_service(body, DocumentFormat::Yaml).is_ok(),
        4 => parse_issue_enrollment_token(body).is_ok(),
        5 => parse_issue_operator_token(body).is_ok(),
        6 => parse_set_node_role("n1", body).is_ok(),
        7 => parse_set_wireguard_key("n1", body).is_ok(),
        8 => parse_report_bootstrap(body).is_ok(),
        9 => text.is_some_and(|text| parse_cursor(text).is_ok() | parse_limit(Some(text)).is_ok()),
        _ => text.is_some_and(|text| parse_wait(Some(text)).is_ok()),
    };
});
