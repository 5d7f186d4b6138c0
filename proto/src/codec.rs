//! JSON and postcard codecs with size limits and validation.
//!
//! JSON is for people and tools and ignores unknown fields, so old agents survive new controls.
//! Postcard is for the agent's hot paths (plan, change feed). Postcard is positional, so it is
//! used only when both sides speak the same [`WIRE_VERSION`]: a client asks for it with
//! `Accept: application/x-postcard` plus the `x-outpost-wire` header, and a server that speaks
//! another version answers JSON instead. Types that travel as postcard never use
//! `skip_serializing_if`.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::validate::{Validate, ValidationError};

/// Version of the postcard encoding of every type in this crate. Bump on any change to a type
/// that travels as postcard.
pub const WIRE_VERSION: u32 = 2;
pub const WIRE_VERSION_HEADER: &str = "x-outpost-wire";
pub const POSTCARD_CONTENT_TYPE: &str = "application/x-postcard";
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// Which codec a body uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Postcard,
}

impl Encoding {
    /// The encoding named by a `Content-Type` value; anything but postcard is treated as JSON.
    pub fn from_content_type(content_type: &str) -> Self {
        if content_type.trim_start().starts_with(POSTCARD_CONTENT_TYPE) {
            Encoding::Postcard
        } else {
            Encoding::Json
        }
    }

    /// What a server answers for an `Accept` header and the client's wire version header.
    pub fn negotiate(accept: Option<&str>, client_wire_version: Option<&str>) -> Self {
        let wants_postcard = accept.is_some_and(|accept| accept.contains(POSTCARD_CONTENT_TYPE));
        let same_wire = client_wire_version
            .and_then(|version| version.trim().parse::<u32>().ok())
            .is_some_and(|version| version == WIRE_VERSION);
        if wants_postcard && same_wire {
            Encoding::Postcard
        } else {
            Encoding::Json
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON_CONTENT_TYPE,
            Encoding::Postcard => POSTCARD_CONTENT_TYPE,
        }
    }
}

/// Why bytes could not be turned into a value.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{what} is {size_bytes} bytes, over the limit of {limit_bytes} bytes")]
    TooLarge {
        what: &'static str,
        size_bytes: usize,
        limit_bytes: usize,
    },
    #[error("{what} is not valid postcard: {source}")]
    Postcard {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{what} is not valid json: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: {source}")]
    Invalid {
        what: &'static str,
        #[source]
        source: ValidationError,
    },
}

/// Decodes and validates `bytes`, refusing more than `limit_bytes`.
pub fn decode<T: DeserializeOwned + Validate>(
    encoding: Encoding,
    bytes: &[u8],
    limit_bytes: usize,
    what: &'static str,
) -> Result<T, DecodeError> {
    if bytes.len() > limit_bytes {
        return Err(DecodeError::TooLarge {
            what,
            size_bytes: bytes.len(),
            limit_bytes,
        });
    }
    let value: T =
        match encoding {
            Encoding::Json => serde_json::from_slice(bytes)
                .map_err(|source| DecodeError::Json { what, source })?,
            Encoding::Postcard => postcard::from_bytes(bytes)
                .map_err(|source| DecodeError::Postcard { what, source })?,
        };
    value
        .validate()
        .map_err(|source| DecodeError::Invalid { what, source })?;
    Ok(value)
}

/// Encodes a value. Encoding types of this crate cannot fail; a failure means a bug in a
/// `Serialize` impl and is reported as an empty body rather than a panic.
pub fn encode<T: Serialize>(encoding: Encoding, value: &T) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::to_vec(value).unwrap_or_default(),
        Encoding::Postcard => postcard::to_allocvec(value).unwrap_or_default(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cursor::Cursor;
    use crate::feed::ChangeBatch;
    use proptest::prelude::*;

    #[test]
    fn negotiation_needs_accept_and_the_same_wire_version() {
        let same = WIRE_VERSION.to_string();
        let other = (WIRE_VERSION + 1).to_string();
        assert_eq!(
            Encoding::negotiate(Some(POSTCARD_CONTENT_TYPE), Some(&same)),
            Encoding::Postcard
        );
        assert_eq!(
            Encoding::negotiate(Some(POSTCARD_CONTENT_TYPE), Some(&other)),
            Encoding::Json
        );
        assert_eq!(
            Encoding::negotiate(Some(POSTCARD_CONTENT_TYPE), None),
            Encoding::Json
        );
        assert_eq!(
            Encoding::negotiate(Some("application/json"), Some("1")),
            Encoding::Json
        );
    }

    #[test]
    fn oversized_input_is_refused_before_parsing() {
        let bytes = vec![0u8; 100];
        let error =
            decode::<ChangeBatch>(Encoding::Postcard, &bytes, 10, "change batch").unwrap_err();
        assert!(error.to_string().contains("100 bytes"), "{error}");
    }

    #[test]
    fn huge_length_prefix_is_an_error_not_an_allocation() {
        // A batch claiming u32::MAX events in a handful of bytes.
        let mut bytes = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(decode::<ChangeBatch>(Encoding::Postcard, &bytes, 1024, "change batch").is_err());
    }

    #[test]
    fn both_encodings_round_trip() {
        let batch = ChangeBatch {
            events: Vec::new(),
            bookmark: Cursor {
                log_epoch: 7,
                event_id: 42,
            },
        };
        for encoding in [Encoding::Json, Encoding::Postcard] {
            let bytes = encode(encoding, &batch);
            let back: ChangeBatch = decode(encoding, &bytes, 1024, "change batch").unwrap();
            assert_eq!(back, batch);
        }
    }

    /// Valid encodings (both codecs) of every type decoded from outside a process, for the
    /// mutation property below: a mutated valid frame reaches far deeper than random bytes.
    fn seed_frames() -> Vec<Vec<u8>> {
        use crate::feed::{FeedEvent, NodeChange};
        use crate::name::Name;
        use crate::node::{Capacity, NodeFacts, RegisterRequest, RegisterResponse, Role};
        use crate::plan::{Plan, sample_allocation};
        use crate::profile::EnvironmentProfile;
        let name = |text: &str| Name::try_from(text).unwrap();
        let mut plan = Plan::empty(name("n1"));
        plan.allocations = vec![
            sample_allocation("n1", "a", 1),
            sample_allocation("n1", "b", 2),
        ];
        let batch = ChangeBatch {
            events: vec![
                FeedEvent {
                    event_id: 5,
                    aggregate: "allocation/a".into(),
                    seq: 3,
                    change: NodeChange::AllocationUpserted(sample_allocation("n1", "a", 3)),
                },
                FeedEvent {
                    event_id: 6,
                    aggregate: "allocation/b".into(),
                    seq: 4,
                    change: NodeChange::AllocationRemoved {
                        allocation_id: name("b"),
                        seq: 4,
                    },
                },
            ],
            bookmark: Cursor::new(7, 6),
        };
        let profile: EnvironmentProfile =
            serde_json::from_str(crate::profile::SEED_SHAPED_PROFILE_JSON).unwrap();
        let register = RegisterRequest {
            enrollment_token: Some("opt1.00ff".into()),
            node_credential: Some("opn.n1.secret".into()),
            facts: NodeFacts {
                node_id: name("n1"),
                hostname: "edge-1".into(),
                arch: "aarch64".into(),
                capacity: Capacity {
                    memory_bytes: 1 << 30,
                    cpu_millis: 4000,
                },
                labels: [(name("site"), "north".to_string())].into(),
            },
            wireguard_public_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()),
            endpoints: vec!["10.0.0.1:51820".into()],
            wireguard_listen_port: Some(51820),
            sealing_public_key: None,
            agent: None,
        };
        let registered = RegisterResponse {
            node_id: name("n1"),
            node_credential: "opn.n1.secret".into(),
            role: Role::Worker,
            control_url: "https://10.0.0.1:7443".into(),
            gateway_url: String::new(),
            ttl_secs: 30,
            epoch: 1,
            release_public_key: None,
        };
        let mut frames = Vec::new();
        push_valid(&mut frames, &plan);
        push_valid(&mut frames, &batch);
        push_valid(&mut frames, &profile);
        push_valid(&mut frames, &register);
        push_valid(&mut frames, &registered);
        frames
    }

    /// Adds `value`'s encodings in both codecs, checking that each decodes back to it.
    fn push_valid<T>(frames: &mut Vec<Vec<u8>>, value: &T)
    where
        T: DeserializeOwned + Serialize + Validate + PartialEq + std::fmt::Debug,
    {
        for encoding in [Encoding::Json, Encoding::Postcard] {
            let bytes = encode(encoding, value);
            let back: T = decode(encoding, &bytes, crate::limits::FRAME_MAX_BYTES, "seed").unwrap();
            assert_eq!(&back, value, "{encoding:?}");
            frames.push(bytes);
        }
    }

    /// Decodes `bytes` as `T` in both codecs: never a panic, and whatever decodes survives its
    /// own round trip unchanged.
    fn decodes_safely<T>(bytes: &[u8], what: &'static str) -> Result<(), TestCaseError>
    where
        T: DeserializeOwned + Serialize + Validate + PartialEq + std::fmt::Debug,
    {
        use crate::limits::FRAME_MAX_BYTES;
        for encoding in [Encoding::Json, Encoding::Postcard] {
            if let Ok(value) = decode::<T>(encoding, bytes, FRAME_MAX_BYTES, what) {
                let again: T = decode(encoding, &encode(encoding, &value), FRAME_MAX_BYTES, what)
                    .map_err(|error| {
                    TestCaseError::fail(format!("{what} re-encoded does not decode: {error}"))
                })?;
                prop_assert_eq!(again, value);
            }
        }
        Ok(())
    }

    fn decode_every_type(bytes: &[u8]) -> Result<(), TestCaseError> {
        use crate::node::{HeartbeatRequest, RegisterRequest, RegisterResponse};
        use crate::plan::{Plan, decode_postcard_plan};
        use crate::profile::EnvironmentProfile;
        decodes_safely::<Plan>(bytes, "plan")?;
        decodes_safely::<ChangeBatch>(bytes, "change batch")?;
        decodes_safely::<EnvironmentProfile>(bytes, "profile")?;
        decodes_safely::<RegisterRequest>(bytes, "register request")?;
        decodes_safely::<RegisterResponse>(bytes, "register response")?;
        decodes_safely::<HeartbeatRequest>(bytes, "heartbeat request")?;
        let _ = decode_postcard_plan(bytes, crate::limits::FRAME_MAX_BYTES, "cached plan");
        Ok(())
    }

    /// One edit of a byte string: overwrite, insert, remove, or cut it off.
    fn mutate(bytes: &mut Vec<u8>, (op, at, byte): (u8, usize, u8)) {
        if bytes.is_empty() {
            bytes.push(byte);
            return;
        }
        let at = at % bytes.len();
        match op % 4 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic_a_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            decode_every_type(&bytes)?;
        }

        #[test]
        fn mutated_valid_frames_never_panic_a_decoder(
            seed in any::<prop::sample::Index>(),
            edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..12),
        ) {
            let frames = seed_frames();
            let mut bytes = frames[seed.index(frames.len())].clone();
            for edit in edits {
                mutate(&mut bytes, edit);
            }
            decode_every_type(&bytes)?;
        }
    }
}
