//! AMQP 0-9-1 framing, sans-IO: encode the few methods the broker adapter sends and parse the
//! frames it receives from `&[u8]` ("need more", "here is a frame", or "invalid").
//!
//! Only what declaring, binding, publishing with confirms and basic.get need is modelled; other
//! methods parse as [`Method::Other`].

/// Sent first on a new connection.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
pub const FRAME_END: u8 = 0xCE;
pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
/// Largest frame this client accepts (also offered in tune-ok).
pub const FRAME_MAX_BYTES: u32 = 131_072;

pub const REPLY_NOT_FOUND: u16 = 404;
pub const REPLY_PRECONDITION_FAILED: u16 = 406;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is over the limit of {FRAME_MAX_BYTES}")]
    TooLarge { size: u32 },
    #[error("frame does not end with 0xCE (found {found:#04x})")]
    BadEnd { found: u8 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("{0} ends early")]
    Truncated(&'static str),
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// A parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub channel: u16,
    pub payload: Payload,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Method(Method),
    Header {
        body_size: u64,
        message_id: Option<String>,
    },
    Body(Vec<u8>),
    Heartbeat,
}

/// Methods the client receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    ConnectionStart,
    ConnectionTune {
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    },
    ConnectionOpenOk,
    ConnectionClose {
        code: u16,
        text: String,
    },
    ConnectionCloseOk,
    ChannelOpenOk,
    ChannelClose {
        code: u16,
        text: String,
    },
    ChannelCloseOk,
    ExchangeDeclareOk,
    ExchangeDeleteOk,
    QueueDeclareOk,
    QueueBindOk,
    QueueDeleteOk,
    ConfirmSelectOk,
    BasicGetOk {
        routing_key: String,
    },
    BasicGetEmpty,
    BasicAck {
        delivery_tag: u64,
        multiple: bool,
    },
    BasicNack {
        delivery_tag: u64,
        multiple: bool,
    },
    Other {
        class: u16,
        method: u16,
    },
}

/// Outcome of trying to parse one frame from a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet.
    Incomplete,
    /// A frame and how many bytes it used.
    Frame(Frame, usize),
}

struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], FrameError> {
        if self.bytes.len() < count {
            return Err(FrameError::Truncated(self.what));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(b);
        Ok(u64::from_be_bytes(array))
    }
    fn short_string(&mut self) -> Result<String, FrameError> {
        let length = self.u8()? as usize;
        let bytes = self.take(length)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::NotUtf8(self.what))
    }
    fn skip_long(&mut self) -> Result<(), FrameError> {
        let length = self.u32()? as usize;
        self.take(length).map(|_| ())
    }
}

/// Parses one frame from the front of `buffer`.
pub fn parse_frame(buffer: &[u8]) -> Result<Parsed, FrameError> {
    if buffer.len() < 7 {
        return Ok(Parsed::Incomplete);
    }
    let kind = buffer[0];
    let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
    let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]);
    if size > FRAME_MAX_BYTES {
        return Err(FrameError::TooLarge { size });
    }
    let total = 7 + size as usize + 1;
    if buffer.len() < total {
        return Ok(Parsed::Incomplete);
    }
    if buffer[total - 1] != FRAME_END {
        return Err(FrameError::BadEnd {
            found: buffer[total - 1],
        });
    }
    let body = &buffer[7..total - 1];
    let payload = match kind {
        FRAME_METHOD => Payload::Method(parse_method(body)?),
        FRAME_HEADER => parse_header(body)?,
        FRAME_BODY => Payload::Body(body.to_vec()),
        FRAME_HEARTBEAT => Payload::Heartbeat,
        other => return Err(FrameError::UnknownType(other)),
    };
    Ok(Parsed::Frame(Frame { channel, payload }, total))
}

fn parse_method(body: &[u8]) -> Result<Method, FrameError> {
    let mut reader = Reader {
        bytes: body,
        what: "method frame",
    };
    let class = reader.u16()?;
    let method = reader.u16()?;
    Ok(match (class, method) {
        (10, 10) => Method::ConnectionStart,
        (10, 30) => Method::ConnectionTune {
            channel_max: reader.u16()?,
            frame_max: reader.u32()?,
            heartbeat: reader.u16()?,
        },
        (10, 41) => Method::ConnectionOpenOk,
        (10, 50) => Method::ConnectionClose {
            code: reader.u16()?,
            text: reader.short_string()?,
        },
        (10, 51) => Method::ConnectionCloseOk,
        (20, 11) => Method::ChannelOpenOk,
        (20, 40) => Method::ChannelClose {
            code: reader.u16()?,
            text: reader.short_string()?,
        },
        (20, 41) => Method::ChannelCloseOk,
        (40, 11) => Method::ExchangeDeclareOk,
        (40, 21) => Method::ExchangeDeleteOk,
        (50, 11) => Method::QueueDeclareOk,
        (50, 21) => Method::QueueBindOk,
        (50, 41) => Method::QueueDeleteOk,
        (85, 11) => Method::ConfirmSelectOk,
        (60, 71) => {
            let _delivery_tag = reader.u64()?;
            let _redelivered = reader.u8()?;
            let _exchange = reader.short_string()?;
            Method::BasicGetOk {
                routing_key: reader.short_string()?,
            }
        }
        (60, 72) => Method::BasicGetEmpty,
        (60, 80) => Method::BasicAck {
            delivery_tag: reader.u64()?,
            multiple: reader.u8()? & 1 == 1,
        },
        (60, 120) => Method::BasicNack {
            delivery_tag: reader.u64()?,
            multiple: reader.u8()? & 1 == 1,
        },
        _ => Method::Other { class, method },
    })
}

fn parse_header(body: &[u8]) -> Result<Payload, FrameError> {
    let mut reader = Reader {
        bytes: body,
        what: "content header",
    };
    let _class = reader.u16()?;
    let _weight = reader.u16()?;
    let body_size = reader.u64()?;
    let flags = reader.u16()?;
    let mut message_id = None;
    // Properties in flag order, highest bit first.
    for bit in (2..=15u16).rev() {
        if flags & (1 << bit) == 0 {
            continue;
        }
        match bit {
            13 => reader.skip_long()?,     // headers (table)
            12 | 11 => drop(reader.u8()?), // delivery-mode, priority
            6 => drop(reader.u64()?),      // timestamp
            7 => message_id = Some(reader.short_string()?),
            _ => drop(reader.short_string()?), // the short-string properties
        }
    }
    Ok(Payload::Header {
        body_size,
        message_id,
    })
}

/// Builds method arguments.
#[derive(Debug, Default)]
pub struct Args(Vec<u8>);

impl Args {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(mut self, value: u8) -> Self {
        self.0.push(value);
        self
    }
    pub fn u16(mut self, value: u16) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    pub fn u32(mut self, value: u32) -> Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }
    /// A short string: at most 255 bytes (names are checked before they get here).
    pub fn short_string(mut self, value: &str) -> Self {
        let bytes = &value.as_bytes()[..value.len().min(255)];
        self.0.push(bytes.len() as u8);
        self.0.extend_from_slice(bytes);
        self
    }
    pub fn long_bytes(mut self, value: &[u8]) -> Self {
        self.0
            .extend_from_slice(&(value.len() as u32).to_be_bytes());
        self.0.extend_from_slice(value);
        self
    }
    pub fn table(self, entries: &[(&str, FieldValue)]) -> Self {
        let mut table = Vec::new();
        for (key, value) in entries {
            table.push(key.len() as u8);
            table.extend_from_slice(key.as_bytes());
            match value {
                FieldValue::LongLong(number) => {
                    table.push(b'l');
                    table.extend_from_slice(&number.to_be_bytes());
                }
                FieldValue::LongString(text) => {
                    table.push(b'S');
                    table.extend_from_slice(&(text.len() as u32).to_be_bytes());
                    table.extend_from_slice(text.as_bytes());
                }
            }
        }
        self.long_bytes(&table)
    }
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// Field-table values this client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldValue {
    LongLong(i64),
    LongString(String),
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
    out
}

/// A method frame: class, method, then `args`.
pub fn method_frame(channel: u16, class: u16, method: u16, args: Args) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&class.to_be_bytes());
    payload.extend_from_slice(&method.to_be_bytes());
    payload.extend_from_slice(&args.into_bytes());
    frame(FRAME_METHOD, channel, &payload)
}

/// The content header and body frames of a persistent message carrying `message_id`.
pub fn content_frames(channel: u16, body: &[u8], message_id: &str, frame_max: u32) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&((1u16 << 12) | (1u16 << 7)).to_be_bytes());
    header.push(2); // delivery-mode: persistent
    header.push(message_id.len().min(255) as u8);
    header.extend_from_slice(&message_id.as_bytes()[..message_id.len().min(255)]);
    let mut out = frame(FRAME_HEADER, channel, &header);
    let chunk = (frame_max.max(4096) - 8) as usize;
    for piece in body.chunks(chunk) {
        out.extend_from_slice(&frame(FRAME_BODY, channel, piece));
    }
    out
}

/// Bits packed into one octet, first flag lowest.
pub fn bits(flags: &[bool]) -> u8 {
    flags.iter().enumerate().fold(
        0u8,
        |acc, (index, flag)| if *flag { acc | (1 << index) } else { acc },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tune_and_needs_more_bytes_for_a_partial_frame() {
        let bytes = method_frame(0, 10, 30, Args::new().u16(2047).u32(131_072).u16(60));
        assert_eq!(parse_frame(&bytes[..5]).unwrap(), Parsed::Incomplete);
        assert_eq!(
            parse_frame(&bytes[..bytes.len() - 1]).unwrap(),
            Parsed::Incomplete
        );
        let Parsed::Frame(frame, used) = parse_frame(&bytes).unwrap() else {
            panic!("no frame")
        };
        assert_eq!(used, bytes.len());
        assert_eq!(
            frame.payload,
            Payload::Method(Method::ConnectionTune {
                channel_max: 2047,
                frame_max: 131_072,
                heartbeat: 60
            })
        );
    }

    #[test]
    fn rejects_bad_frames() {
        let mut bytes = method_frame(1, 20, 11, Args::new().long_bytes(b""));
        let last = bytes.len() - 1;
        bytes[last] = 0;
        assert_eq!(
            parse_frame(&bytes).unwrap_err(),
            FrameError::BadEnd { found: 0 }
        );
        let huge = [1u8, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            parse_frame(&huge).unwrap_err(),
            FrameError::TooLarge { .. }
        ));
        let short_close = method_frame(1, 20, 40, Args::new().u16(406));
        assert_eq!(
            parse_frame(&short_close).unwrap_err(),
            FrameError::Truncated("method frame")
        );
    }

    #[test]
    fn channel_close_carries_code_and_text() {
        let bytes = method_frame(
            3,
            20,
            40,
            Args::new()
                .u16(406)
                .short_string("PRECONDITION_FAILED - x")
                .u16(50)
                .u16(10),
        );
        let Parsed::Frame(frame, _) = parse_frame(&bytes).unwrap() else {
            panic!("no frame")
        };
        assert_eq!(frame.channel, 3);
        assert_eq!(
            frame.payload,
            Payload::Method(Method::ChannelClose {
                code: 406,
                text: "PRECONDITION_FAILED - x".into()
            })
        );
    }

    #[test]
    fn content_header_round_trips_the_message_id_and_splits_bodies() {
        let body = vec![7u8; 10_000];
        let bytes = content_frames(1, &body, "key-1", 4096);
        let Parsed::Frame(header, used) = parse_frame(&bytes).unwrap() else {
            panic!("no header")
        };
        assert_eq!(
            header.payload,
            Payload::Header {
                body_size: 10_000,
                message_id: Some("key-1".into())
            }
        );
        let mut offset = used;
        let mut received = Vec::new();
        while offset < bytes.len() {
            let Parsed::Frame(frame, used) = parse_frame(&bytes[offset..]).unwrap() else {
                panic!("no body")
            };
            let Payload::Body(piece) = frame.payload else {
                panic!("not a body")
            };
            assert!(piece.len() <= 4088);
            received.extend(piece);
            offset += used;
        }
        assert_eq!(received, body);
    }

    #[test]
    fn tables_encode_typed_values() {
        let args = Args::new()
            .table(&[("x-message-ttl", FieldValue::LongLong(1000))])
            .into_bytes();
        assert_eq!(&args[..4], &(1 + 13 + 1 + 8u32).to_be_bytes());
        assert_eq!(args[4], 13);
        assert_eq!(&args[5..18], b"x-message-ttl");
        assert_eq!(args[18], b'l');
        assert_eq!(bits(&[false, true, false, false, false]), 0b10);
    }

    proptest::proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = parse_frame(&bytes);
        }

        #[test]
        fn method_frames_with_arbitrary_arguments_never_panic(
            class in 0u16..100,
            method in 0u16..130,
            args in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let mut payload = class.to_be_bytes().to_vec();
            payload.extend_from_slice(&method.to_be_bytes());
            payload.extend_from_slice(&args);
            let _ = parse_frame(&frame(FRAME_METHOD, 1, &payload));
            let _ = parse_frame(&frame(FRAME_HEADER, 1, &payload));
        }
    }
}
