//! Reading the TLS ClientHello before anything else (E2), sans-IO: rustls parses the bytes
//! buffered so far and says "need more", "this server name" or "invalid". The bytes stay
//! buffered, so a passthrough route replays them to the backend untouched and a terminating route
//! hands them to the TLS acceptor.

use rustls::server::Acceptor;

/// The most ClientHello bytes the edge buffers before giving up on a connection.
pub const CLIENT_HELLO_MAX_BYTES: usize = 16 * 1024 + 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientHelloRead {
    NeedMore,
    /// The SNI name, if the client sent one.
    ServerName(Option<String>),
    Invalid(String),
}

/// Parses the ClientHello at the start of `bytes`.
pub fn read_server_name(bytes: &[u8]) -> ClientHelloRead {
    if bytes.len() > CLIENT_HELLO_MAX_BYTES {
        return ClientHelloRead::Invalid(format!(
            "no complete ClientHello within {CLIENT_HELLO_MAX_BYTES} bytes"
        ));
    }
    let mut acceptor = Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) => {
                return ClientHelloRead::Invalid(format!("not a TLS ClientHello: {error}"));
            }
        }
    }
    match acceptor.accept() {
        Ok(None) => ClientHelloRead::NeedMore,
        Ok(Some(accepted)) => ClientHelloRead::ServerName(
            accepted
                .client_hello()
                .server_name()
                .map(|name| name.to_ascii_lowercase()),
        ),
        Err((error, _alert)) => ClientHelloRead::Invalid(format!("not a TLS ClientHello: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn client_hello(server_name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
        let mut connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut bytes = Vec::new();
        connection.write_tls(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn the_server_name_is_read_from_a_whole_hello_and_partial_ones_need_more() {
        let hello = client_hello("shop.example.com");
        assert_eq!(
            read_server_name(&hello),
            ClientHelloRead::ServerName(Some("shop.example.com".into()))
        );
        for cut in [0, 1, 5, hello.len() / 2, hello.len() - 1] {
            assert_eq!(
                read_server_name(&hello[..cut]),
                ClientHelloRead::NeedMore,
                "{cut}"
            );
        }
    }

    #[test]
    fn plain_http_is_not_a_client_hello() {
        assert!(matches!(
            read_server_name(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            ClientHelloRead::Invalid(_)
        ));
    }
}
