//! The first step of every accepted connection: with `--accept-proxy-protocol`, read and check
//! the upstream load balancer's PROXY v1/v2 header (bounded in size and time; a malformed one
//! closes the connection with a logged reason) and take the client's address from it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::io::{Opening, Prefixed, read_opening};
use crate::proxy_protocol::{UPSTREAM_HEADER_MAX_BYTES, UpstreamHeader, parse_upstream_header};
use crate::state::{ConnectionAddresses, UpstreamProxy};

/// Time an upstream has to send its PROXY header.
pub const UPSTREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection ready for the listener's protocol, or `None` when it was refused.
pub async fn accept_upstream(
    mut stream: TcpStream,
    peer: SocketAddr,
    mode: UpstreamProxy,
) -> Option<(Prefixed<TcpStream>, ConnectionAddresses)> {
    let _ = stream.set_nodelay(true);
    let edge = stream.local_addr().ok()?;
    if mode == UpstreamProxy::None {
        return Some((
            Prefixed::new(Bytes::new(), stream),
            ConnectionAddresses { client: peer, edge },
        ));
    }
    let opening = read_opening(
        &mut stream,
        UPSTREAM_HEADER_MAX_BYTES,
        UPSTREAM_HEADER_TIMEOUT,
        "PROXY header",
        |bytes| match parse_upstream_header(bytes) {
            UpstreamHeader::NeedMore => None,
            UpstreamHeader::Parsed { length, client } => Some(Ok((length, client))),
            UpstreamHeader::Invalid(reason) => Some(Err(reason)),
        },
    )
    .await;
    match opening {
        Opening::Done {
            value: (length, client),
            buffered,
        } => Some((
            Prefixed::new(Bytes::from(buffered).slice(length..), stream),
            ConnectionAddresses {
                client: client.unwrap_or(peer),
                edge,
            },
        )),
        Opening::Refused(reason) => {
            tracing::warn!(
                component = "proxy",
                action = "accept_upstream",
                "closed a connection from upstream {peer}: {reason}"
            );
            None
        }
    }
}
