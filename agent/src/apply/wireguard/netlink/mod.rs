//! Netlink written by hand, sans-IO: the message framing and attributes (this file), the
//! rtnetlink messages for links, addresses and routes (`route`), the generic-netlink messages of
//! the kernel's WireGuard family (`genl`), and the thin socket that sends them (`socket`).
//!
//! Why by hand rather than the `netlink-packet-*` crates with `netlink-sys` (MIT) or
//! `defguard_wireguard_rs` (Apache-2.0): the agent needs eleven requests (get/new/del link, set
//! up, get/new/del address, get/new/del route, and the WireGuard family lookup, get and set
//! device), and the static agent had 0.29 MiB left of its 4 MiB budget. Those crates model every
//! rtnetlink message and attribute kind (several crates and their own error types), and defguard
//! also carries its userspace and other-OS paths; none of that is used here. These files need no
//! dependency beyond `nix` (already in the agent), add no crate to audit, and keep every decoder
//! bounded and panic-free, as every decoder of bytes from outside the process must be. The cost
//! is ours to keep: the layouts below are stable kernel ABI, and the tests build each message and
//! read it back.
//!
//! Layouts follow `linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_link.h`, `linux/genetlink.h`
//! and `linux/wireguard.h`. Numbers are host-endian except ports and addresses in `sockaddr`.

pub mod genl;
pub mod route;
pub mod socket;

/// Size of `struct nlmsghdr`.
pub const HEADER_BYTES: usize = 16;
/// Size of `struct nlattr`.
pub const ATTRIBUTE_HEADER_BYTES: usize = 4;

pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;

pub const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Rounds up to the 4-byte alignment of netlink messages and attributes.
pub fn align4(length: usize) -> usize {
    (length + 3) & !3
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink {what} is truncated: needs {needed} bytes, has {seen}")]
    Truncated {
        what: &'static str,
        needed: usize,
        seen: usize,
    },
    #[error("netlink {what} is invalid: {reason}")]
    Invalid { what: &'static str, reason: String },
    #[error("the kernel refused {request}: {message} (errno {errno})")]
    Kernel {
        request: String,
        errno: i32,
        message: String,
    },
    #[error("netlink socket: {operation}: {reason}")]
    Socket {
        operation: &'static str,
        reason: String,
    },
    #[error("the kernel did not answer {request} within {timeout_ms} ms")]
    Timeout { request: String, timeout_ms: u128 },
}

impl NetlinkError {
    /// The errno of a kernel refusal (positive, like `libc::ENODEV`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    pub fn kernel(request: &str, errno: i32) -> Self {
        NetlinkError::Kernel {
            request: request.to_string(),
            errno,
            message: std::io::Error::from_raw_os_error(errno).to_string(),
        }
    }
}

/// Builds one netlink request: the header, the family header (`ifinfomsg`, `rtmsg`, …) and
/// attributes, nested ones included. The length and sequence number are written by
/// [`MessageBuilder::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBuilder {
    /// What the request is, for errors (`RTM_NEWADDR 10.232.0.1/24 on outpost0`).
    pub description: String,
    bytes: Vec<u8>,
    nests: Vec<usize>,
}

impl MessageBuilder {
    pub fn new(message_type: u16, flags: u16, description: impl Into<String>) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&message_type.to_ne_bytes());
        bytes.extend_from_slice(&flags.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        bytes.extend_from_slice(&0u32.to_ne_bytes());
        Self {
            description: description.into(),
            bytes,
            nests: Vec::new(),
        }
    }

    pub fn message_type(&self) -> u16 {
        u16::from_ne_bytes([self.bytes[4], self.bytes[5]])
    }

    pub fn flags(&self) -> u16 {
        u16::from_ne_bytes([self.bytes[6], self.bytes[7]])
    }

    /// Whether the kernel answers with a multipart dump ending in `NLMSG_DONE`.
    pub fn is_dump(&self) -> bool {
        self.flags() & NLM_F_DUMP == NLM_F_DUMP
    }

    /// Bytes so far (header included).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= HEADER_BYTES
    }

    /// Appends a fixed family header, padded to 4 bytes.
    pub fn push_raw(&mut self, raw: &[u8]) {
        self.bytes.extend_from_slice(raw);
        self.pad();
    }

    fn pad(&mut self) {
        let padded = align4(self.bytes.len());
        self.bytes.resize(padded, 0);
    }

    pub fn attribute(&mut self, kind: u16, payload: &[u8]) {
        let length = (ATTRIBUTE_HEADER_BYTES + payload.len()) as u16;
        self.bytes.extend_from_slice(&length.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        self.pad();
    }

    pub fn attribute_u8(&mut self, kind: u16, value: u8) {
        self.attribute(kind, &[value]);
    }

    pub fn attribute_u16(&mut self, kind: u16, value: u16) {
        self.attribute(kind, &value.to_ne_bytes());
    }

    pub fn attribute_u32(&mut self, kind: u16, value: u32) {
        self.attribute(kind, &value.to_ne_bytes());
    }

    /// A NUL-terminated string attribute.
    pub fn attribute_string(&mut self, kind: u16, text: &str) {
        let mut payload = Vec::with_capacity(text.len() + 1);
        payload.extend_from_slice(text.as_bytes());
        payload.push(0);
        self.attribute(kind, &payload);
    }

    /// Opens a nested attribute; close it with [`MessageBuilder::end_nested`].
    pub fn begin_nested(&mut self, kind: u16) {
        self.nests.push(self.bytes.len());
        self.bytes.extend_from_slice(&0u16.to_ne_bytes());
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end_nested(&mut self) {
        if let Some(start) = self.nests.pop() {
            let length = (self.bytes.len() - start) as u16;
            self.bytes[start..start + 2].copy_from_slice(&length.to_ne_bytes());
        }
    }

    /// The finished request with its length and sequence number. It may hold the private key
    /// (`WG_CMD_SET_DEVICE`): the caller zeroizes it once sent.
    pub fn finish(mut self, sequence: u32) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nested();
        }
        let length = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&length.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&sequence.to_ne_bytes());
        std::mem::take(&mut self.bytes)
    }
}

impl Drop for MessageBuilder {
    /// A set-device request carries the private key; an unsent one leaves no copy behind.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.bytes);
    }
}

/// One message read from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub sequence: u32,
    /// Everything after the header.
    pub payload: &'a [u8],
}

/// Splits a datagram into messages. Stops at the first malformed header.
pub fn parse_messages(datagram: &[u8]) -> Result<Vec<Message<'_>>, NetlinkError> {
    let mut messages = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        if rest.len() < HEADER_BYTES {
            return Err(NetlinkError::Truncated {
                what: "message header",
                needed: HEADER_BYTES,
                seen: rest.len(),
            });
        }
        let length = read_u32(rest, 0) as usize;
        if length < HEADER_BYTES || length > rest.len() {
            return Err(NetlinkError::Invalid {
                what: "message header",
                reason: format!("length {length} is outside {HEADER_BYTES}..={}", rest.len()),
            });
        }
        messages.push(Message {
            message_type: read_u16(rest, 4),
            flags: read_u16(rest, 6),
            sequence: read_u32(rest, 8),
            payload: &rest[HEADER_BYTES..length],
        });
        rest = &rest[align4(length).min(rest.len())..];
    }
    Ok(messages)
}

/// What one message means for a request waiting on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A data message (a link, an address, a route, a device).
    Data(&'a [u8]),
    /// `NLMSG_ERROR` with 0: the request was done.
    Ack,
    /// `NLMSG_ERROR` with an errno (positive here).
    Refused(i32),
    /// The end of a dump.
    Done,
    /// Nothing to act on (`NLMSG_NOOP`).
    Skip,
}

/// Classifies a message.
pub fn classify<'a>(message: &Message<'a>) -> Result<Reply<'a>, NetlinkError> {
    match message.message_type {
        NLMSG_ERROR => {
            if message.payload.len() < 4 {
                return Err(NetlinkError::Truncated {
                    what: "error message",
                    needed: 4,
                    seen: message.payload.len(),
                });
            }
            let code = i32::from_ne_bytes([
                message.payload[0],
                message.payload[1],
                message.payload[2],
                message.payload[3],
            ]);
            Ok(if code == 0 {
                Reply::Ack
            } else {
                Reply::Refused(code.saturating_neg())
            })
        }
        NLMSG_DONE => Ok(Reply::Done),
        NLMSG_NOOP => Ok(Reply::Skip),
        NLMSG_OVERRUN => Err(NetlinkError::Invalid {
            what: "reply",
            reason: "the kernel's socket buffer overran".to_string(),
        }),
        _ => Ok(Reply::Data(message.payload)),
    }
}

/// Iterates over the attributes in `bytes` as `(type, payload)`, the nested and byte-order
/// flags masked off. A malformed attribute ends the walk with an error.
pub fn attributes(bytes: &[u8]) -> Attributes<'_> {
    Attributes { rest: bytes }
}

pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < ATTRIBUTE_HEADER_BYTES {
            return None;
        }
        let length = read_u16(self.rest, 0) as usize;
        let kind = read_u16(self.rest, 2) & NLA_TYPE_MASK;
        if length < ATTRIBUTE_HEADER_BYTES || length > self.rest.len() {
            let seen = self.rest.len();
            self.rest = &[];
            return Some(Err(NetlinkError::Invalid {
                what: "attribute",
                reason: format!("type {kind} has length {length}, {seen} bytes remain"),
            }));
        }
        let payload = &self.rest[ATTRIBUTE_HEADER_BYTES..length];
        self.rest = &self.rest[align4(length).min(self.rest.len())..];
        Some(Ok((kind, payload)))
    }
}

/// The fixed family header at the start of a payload, and the attributes after it.
pub fn split_family_header<'a>(
    payload: &'a [u8],
    header_bytes: usize,
    what: &'static str,
) -> Result<(&'a [u8], &'a [u8]), NetlinkError> {
    if payload.len() < header_bytes {
        return Err(NetlinkError::Truncated {
            what,
            needed: header_bytes,
            seen: payload.len(),
        });
    }
    let attributes_at = align4(header_bytes).min(payload.len());
    Ok((&payload[..header_bytes], &payload[attributes_at..]))
}

pub fn read_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

pub fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An attribute payload of exactly `N` bytes.
pub fn fixed<const N: usize>(payload: &[u8], what: &'static str) -> Result<[u8; N], NetlinkError> {
    payload.try_into().map_err(|_| NetlinkError::Invalid {
        what,
        reason: format!("{} bytes, expected {N}", payload.len()),
    })
}

/// A NUL-terminated (or unterminated) string attribute.
pub fn string(payload: &[u8], what: &'static str) -> Result<String, NetlinkError> {
    let text = payload.split(|byte| *byte == 0).next().unwrap_or_default();
    String::from_utf8(text.to_vec()).map_err(|_| NetlinkError::Invalid {
        what,
        reason: "not UTF-8".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_message_has_its_length_sequence_and_padded_attributes() {
        let mut builder = MessageBuilder::new(18, NLM_F_REQUEST | NLM_F_ACK, "test");
        builder.push_raw(&[1, 2, 3]);
        builder.attribute_string(3, "wg0");
        builder.begin_nested(18);
        builder.attribute_string(1, "wireguard");
        builder.end_nested();
        let bytes = builder.finish(7);
        assert_eq!(read_u32(&bytes, 0) as usize, bytes.len());
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(read_u16(&bytes, 4), 18);
        assert_eq!(read_u16(&bytes, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(read_u32(&bytes, 8), 7);
        // Header, 3 bytes padded to 4, "wg0\0" (4+4), nested (4 + "wireguard\0" padded 4+12).
        assert_eq!(bytes.len(), 16 + 4 + 8 + 4 + 16);
        let messages = parse_messages(&bytes).unwrap();
        assert_eq!(messages.len(), 1);
        let (family, rest) = split_family_header(messages[0].payload, 3, "test header").unwrap();
        assert_eq!(family, [1, 2, 3]);
        let found: Vec<(u16, Vec<u8>)> = attributes(rest)
            .map(|a| a.map(|(k, p)| (k, p.to_vec())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(found[0], (3, b"wg0\0".to_vec()));
        assert_eq!(found[1].0, 18, "the nested flag is masked off");
        let inner: Vec<(u16, String)> = attributes(&found[1].1)
            .map(|a| a.map(|(k, p)| (k, string(p, "kind").unwrap())))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(inner, [(1, "wireguard".to_string())]);
        // The nested attribute's header carries the flag on the wire.
        assert_eq!(read_u16(&bytes, 16 + 4 + 8 + 2), 18 | NLA_F_NESTED);
    }

    #[test]
    fn errors_acks_and_done_are_classified() {
        let mut error = MessageBuilder::new(NLMSG_ERROR, 0, "reply");
        error.push_raw(&(-19i32).to_ne_bytes());
        let bytes = error.finish(1);
        let messages = parse_messages(&bytes).unwrap();
        assert_eq!(classify(&messages[0]).unwrap(), Reply::Refused(19));
        let mut ack = MessageBuilder::new(NLMSG_ERROR, 0, "reply");
        ack.push_raw(&0i32.to_ne_bytes());
        let mut both = ack.finish(2);
        both.extend(MessageBuilder::new(NLMSG_DONE, NLM_F_MULTI, "done").finish(2));
        let messages = parse_messages(&both).unwrap();
        assert_eq!(classify(&messages[0]).unwrap(), Reply::Ack);
        assert_eq!(classify(&messages[1]).unwrap(), Reply::Done);
        assert!(
            NetlinkError::kernel("RTM_GETLINK", 19)
                .to_string()
                .contains("errno 19")
        );
    }

    #[test]
    fn malformed_bytes_are_errors_never_panics() {
        assert!(parse_messages(&[1, 2, 3]).is_err());
        let mut bad = MessageBuilder::new(16, 0, "x").finish(0);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_messages(&bad).is_err());
        let broken_attribute = [200u8, 0, 1, 0, 0, 0];
        let walked: Vec<_> = attributes(&broken_attribute).collect();
        assert_eq!(walked.len(), 1);
        assert!(walked[0].is_err());
        assert!(fixed::<4>(&[1, 2], "u32").is_err());
    }

    proptest::proptest! {
        #[test]
        fn no_bytes_make_the_decoders_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(messages) = parse_messages(&bytes) {
                for message in &messages {
                    let _ = classify(message);
                    for attribute in attributes(message.payload).flatten() {
                        let _ = attributes(attribute.1).count();
                    }
                    let _ = route::parse_link(message.payload);
                    let _ = route::parse_address(message.payload);
                    let _ = route::parse_route(message.payload);
                    let _ = genl::parse_family_id(message.payload);
                }
                let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload).collect();
                let _ = genl::parse_device(&payloads);
            }
        }
    }
}
