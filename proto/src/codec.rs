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
pub const WIRE_VERSION: u32 = 1;
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
mod tests {
    use super::*;
    use crate::cursor::Cursor;
    use crate::feed::ChangeBatch;

    #[test]
    fn negotiation_needs_accept_and_the_same_wire_version() {
        assert_eq!(
            Encoding::negotiate(Some(POSTCARD_CONTENT_TYPE), Some("1")),
            Encoding::Postcard
        );
        assert_eq!(
            Encoding::negotiate(Some(POSTCARD_CONTENT_TYPE), Some("2")),
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
}
