//! Fuzzes the postcard decoders of the agent's hot paths and of every registration body: no
//! frame may panic a decoder, and whatever decodes must survive its own round trip.

#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proto::codec::{Encoding, decode, encode};
use outpost_proto::feed::ChangeBatch;
use outpost_proto::limits::FRAME_MAX_BYTES;
use outpost_proto::node::{HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse};
use outpost_proto::plan::{Plan, decode_postcard_plan};
use outpost_proto::profile::EnvironmentProfile;
use outpost_proto::validate::Validate;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Decodes `frame` as `T`; a value that decodes must encode and decode back to itself.
fn round_trips<T>(frame: &[u8], what: &'static str)
where
    T: DeserializeOwned + Serialize + Validate + PartialEq + std::fmt::Debug,
{
    if let Ok(value) = decode::<T>(Encoding::Postcard, frame, FRAME_MAX_BYTES, what) {
        let bytes = encode(Encoding::Postcard, &value);
        match decode::<T>(Encoding::Postcard, &bytes, FRAME_MAX_BYTES, what) {
            Ok(again) => assert_eq!(again, value, "{what} changed in a round trip"),
            Err(error) => panic!("{what} re-encoded does not decode: {error}"),
        }
    }
}

fuzz_target!(|frame: &[u8]| {
    round_trips::<Plan>(frame, "plan");
    round_trips::<ChangeBatch>(frame, "change batch");
    round_trips::<RegisterRequest>(frame, "register request");
    round_trips::<RegisterResponse>(frame, "register response");
    round_trips::<HeartbeatRequest>(frame, "heartbeat request");
    round_trips::<HeartbeatResponse>(frame, "heartbeat response");
    round_trips::<EnvironmentProfile>(frame, "profile");
    // The agent's cached plans, also those written before the overlay field existed.
    let _ = decode_postcard_plan(frame, FRAME_MAX_BYTES, "cached plan");
});
