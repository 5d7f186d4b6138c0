//! PROXY protocol v1/v2 (E2), sans-IO: the header the edge sends to a route's backends, and the
//! bounded parse of a header an upstream load balancer sends (`--accept-proxy-protocol`), which
//! says "need more", "here is a header of N bytes from this client" or "invalid".

use std::net::SocketAddr;

use outpost_proto::route::ProxyProtocol;
use ppp::v2;

/// The longest header accepted from upstream (a v1 line is at most 107 bytes; a v2 header with
/// its TLVs is bounded here).
pub const UPSTREAM_HEADER_MAX_BYTES: usize = 1024;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_SIGNATURE: &[u8] = b"PROXY ";

/// The header to send to a backend before any byte of the client's, if the route asks for one.
pub fn header_for_backend(
    version: ProxyProtocol,
    client: SocketAddr,
    edge: SocketAddr,
) -> Option<Vec<u8>> {
    // Both addresses must be of one family; map the edge's into the client's when they differ.
    let edge = match (client, edge) {
        (SocketAddr::V4(_), SocketAddr::V6(e)) => match e.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(ip.into(), e.port()),
            None => SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), e.port()),
        },
        (SocketAddr::V6(_), SocketAddr::V4(e)) => {
            SocketAddr::new(e.ip().to_ipv6_mapped().into(), e.port())
        }
        _ => edge,
    };
    match version {
        ProxyProtocol::None => None,
        ProxyProtocol::V1 => {
            let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
            Some(
                format!(
                    "PROXY {family} {} {} {} {}\r\n",
                    client.ip(),
                    edge.ip(),
                    client.port(),
                    edge.port()
                )
                .into_bytes(),
            )
        }
        ProxyProtocol::V2 => v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, edge),
        )
        .build()
        .ok(),
    }
}

/// What the bytes read so far from an upstream connection hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamHeader {
    /// Not a whole header yet; read more (up to [`UPSTREAM_HEADER_MAX_BYTES`]).
    NeedMore,
    /// A header of `length` bytes; `client` is the original client (None for LOCAL/UNKNOWN).
    Parsed {
        length: usize,
        client: Option<SocketAddr>,
    },
    Invalid(String),
}

/// Parses the PROXY header at the start of `bytes`.
pub fn parse_upstream_header(bytes: &[u8]) -> UpstreamHeader {
    let prefix = |signature: &[u8]| {
        let n = bytes.len().min(signature.len());
        bytes[..n] == signature[..n]
    };
    if bytes.is_empty() {
        return UpstreamHeader::NeedMore;
    }
    if prefix(V2_SIGNATURE) {
        if bytes.len() < 16 {
            return UpstreamHeader::NeedMore;
        }
        let length = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        if length > UPSTREAM_HEADER_MAX_BYTES {
            return UpstreamHeader::Invalid(format!(
                "PROXY v2 header of {length} bytes is longer than {UPSTREAM_HEADER_MAX_BYTES}"
            ));
        }
        if bytes.len() < length {
            return UpstreamHeader::NeedMore;
        }
        return match v2::Header::try_from(&bytes[..length]) {
            Ok(header) => UpstreamHeader::Parsed {
                length,
                client: match header.addresses {
                    v2::Addresses::IPv4(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    v2::Addresses::IPv6(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    _ => None,
                },
            },
            Err(error) => UpstreamHeader::Invalid(format!("malformed PROXY v2 header: {error}")),
        };
    }
    if prefix(V1_SIGNATURE) {
        let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
            if bytes.len() > 107 {
                return UpstreamHeader::Invalid(
                    "PROXY v1 line longer than 107 bytes without CRLF".into(),
                );
            }
            return UpstreamHeader::NeedMore;
        };
        let line = &bytes[..end];
        let text = match std::str::from_utf8(line) {
            Ok(text) => text,
            Err(_) => return UpstreamHeader::Invalid("PROXY v1 line is not text".into()),
        };
        let fields: Vec<&str> = text.split(' ').collect();
        let client = match fields.as_slice() {
            ["PROXY", "UNKNOWN", ..] => None,
            [
                "PROXY",
                "TCP4" | "TCP6",
                source,
                _destination,
                source_port,
                _destination_port,
            ] => {
                let ip: std::net::IpAddr = match source.parse() {
                    Ok(ip) => ip,
                    Err(_) => {
                        return UpstreamHeader::Invalid(format!(
                            "PROXY v1 source address {source:?} is not an IP"
                        ));
                    }
                };
                let port: u16 = match source_port.parse() {
                    Ok(port) => port,
                    Err(_) => {
                        return UpstreamHeader::Invalid(format!(
                            "PROXY v1 source port {source_port:?} is not a port"
                        ));
                    }
                };
                Some(SocketAddr::new(ip, port))
            }
            _ => {
                return UpstreamHeader::Invalid(format!(
                    "malformed PROXY v1 line {:?}",
                    outpost_proto::validate::shorten(text)
                ));
            }
        };
        return UpstreamHeader::Parsed {
            length: end + 2,
            client,
        };
    }
    UpstreamHeader::Invalid(format!(
        "expected a PROXY v1 or v2 header, got {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(16)])
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn client() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }
    fn edge() -> SocketAddr {
        "127.0.0.1:80".parse().unwrap()
    }

    #[test]
    fn what_we_send_we_can_read_back_in_both_versions() {
        for version in [ProxyProtocol::V1, ProxyProtocol::V2] {
            let header = header_for_backend(version, client(), edge()).unwrap();
            let mut bytes = header.clone();
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse_upstream_header(&bytes),
                UpstreamHeader::Parsed {
                    length: header.len(),
                    client: Some(client())
                },
                "{version:?}"
            );
            for cut in 0..header.len() {
                assert_eq!(
                    parse_upstream_header(&header[..cut]),
                    UpstreamHeader::NeedMore
                );
            }
        }
        assert!(header_for_backend(ProxyProtocol::None, client(), edge()).is_none());
    }

    #[test]
    fn garbage_and_malformed_headers_are_invalid() {
        assert!(matches!(
            parse_upstream_header(b"GET / HTTP/1.1\r\n"),
            UpstreamHeader::Invalid(_)
        ));
        assert!(matches!(
            parse_upstream_header(b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n"),
            UpstreamHeader::Invalid(reason) if reason.contains("not-an-ip")
        ));
        let mut long_v2 = V2_SIGNATURE.to_vec();
        long_v2.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            parse_upstream_header(&long_v2),
            UpstreamHeader::Invalid(_)
        ));
        assert!(matches!(
            parse_upstream_header(&[b'P'; 200]),
            UpstreamHeader::Invalid(_)
        ));
    }

    proptest! {
        /// No input panics the parser, and a parsed length never passes the input.
        #[test]
        fn the_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let UpstreamHeader::Parsed { length, .. } = parse_upstream_header(&bytes) {
                prop_assert!(length <= bytes.len());
            }
        }
    }
}
