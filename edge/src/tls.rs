//! The HTTPS listener: reads the ClientHello first (bounded in size and time), takes its SNI,
//! and chooses by route: passthrough replays the buffered bytes to a backend untouched and then
//! copies both ways. Terminating routes need the route's certificate and key from its
//! `tls_secret`; until secrets reach the edge (issue 12), such a connection is closed and the
//! reason logged.

use std::sync::Arc;
use std::time::Duration;

use outpost_proto::route::TlsMode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::accept::accept_upstream;
use crate::backend::connect;
use crate::io::{Opening, read_opening};
use crate::sni::{CLIENT_HELLO_MAX_BYTES, ClientHelloRead, read_server_name};
use crate::state::Shared;

/// Time a client has to send its whole ClientHello.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!("https accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let Some((mut stream, addresses)) =
                accept_upstream(stream, peer, shared.upstream_proxy).await
            else {
                return;
            };
            let opening = read_opening(
                &mut stream,
                CLIENT_HELLO_MAX_BYTES,
                CLIENT_HELLO_TIMEOUT,
                "TLS ClientHello",
                |bytes| match read_server_name(bytes) {
                    ClientHelloRead::NeedMore => None,
                    ClientHelloRead::ServerName(name) => Some(Ok(name)),
                    ClientHelloRead::Invalid(reason) => Some(Err(reason)),
                },
            )
            .await;
            let (server_name, hello) = match opening {
                Opening::Done { value, buffered } => (value, buffered),
                Opening::Refused(reason) => {
                    tracing::debug!(
                        "closed a TLS connection from {}: {reason}",
                        addresses.client
                    );
                    return;
                }
            };
            let Some(server_name) = server_name else {
                tracing::debug!(
                    "closed a TLS connection from {} without SNI",
                    addresses.client
                );
                return;
            };
            let route = match shared.table.load().for_host(&server_name) {
                Some(route) => Arc::clone(route),
                None => {
                    tracing::debug!("no route for SNI {server_name}");
                    return;
                }
            };
            match route.spec.tls {
                TlsMode::Passthrough => {
                    let (mut backend, _) =
                        match connect(&route, &shared.health, addresses.client, addresses.edge)
                            .await
                        {
                            Ok(connected) => connected,
                            Err(no_backend) => {
                                tracing::debug!("{}", no_backend.message().trim_end());
                                return;
                            }
                        };
                    if backend.write_all(&hello).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut backend).await;
                }
                TlsMode::Terminate => {
                    tracing::warn!(
                        "route {} terminates TLS, but its tls_secret has not reached this edge (secret delivery to edges is not built yet); closed the connection from {}",
                        route.spec.name,
                        addresses.client
                    );
                }
                TlsMode::None => {
                    tracing::debug!(
                        "route {} is plain HTTP; closed a TLS connection for it",
                        route.spec.name
                    );
                }
            }
        });
    }
}
