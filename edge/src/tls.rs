//! The HTTPS listener: reads the ClientHello first (bounded in size and time), takes its SNI,
//! and chooses by route: passthrough replays the buffered bytes to a backend untouched and then
//! copies both ways; a terminating route replays them into `tokio-rustls`'s
//! `LazyConfigAcceptor`, answers with the certificate opened from the route's `tls_secret`
//! (`certs`), and serves the decrypted HTTP like the HTTP listener, held to the SNI's route.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outpost_proto::route::TlsMode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::LazyConfigAcceptor;

use crate::accept::accept_upstream;
use crate::backend::connect;
use crate::http::{Arrival, serve_connection};
use crate::io::{Opening, Prefixed, read_opening};
use crate::sni::{CLIENT_HELLO_MAX_BYTES, ClientHelloRead, read_server_name};
use crate::state::Shared;

/// Time a client has to send its whole ClientHello.
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(
                    component = "tls",
                    action = "accept",
                    "https accept failed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let serving = Arc::clone(&shared);
        shared.workers.serve(stream, move |stream| async move {
            let shared = serving;
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
                        component = "tls",
                        action = "serve",
                        "closed a TLS connection from {}: {reason}",
                        addresses.client
                    );
                    return;
                }
            };
            let Some(server_name) = server_name else {
                tracing::debug!(
                    component = "tls",
                    action = "serve",
                    "closed a TLS connection from {} without SNI",
                    addresses.client
                );
                return;
            };
            let route = match shared.table.load().for_host(&server_name) {
                Some(route) => Arc::clone(route),
                None => {
                    tracing::debug!(
                        component = "tls",
                        action = "route",
                        "no route for SNI {server_name}"
                    );
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
                                tracing::debug!(
                                    component = "tls",
                                    action = "connect_backend",
                                    "{}",
                                    no_backend.message().trim_end()
                                );
                                return;
                            }
                        };
                    if backend.write_all(&hello).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut backend).await;
                }
                TlsMode::Terminate => {
                    let config = route
                        .spec
                        .tls_secret
                        .as_ref()
                        .and_then(|secret| shared.table.load().certificates.config(secret));
                    let Some(config) = config else {
                        tracing::debug!(
                            component = "tls",
                            action = "serve",
                            "route {} has no usable certificate (see the edge's tls_problems); closed the TLS connection from {}",
                            route.spec.name,
                            addresses.client
                        );
                        return;
                    };
                    let replayed = Prefixed::new(Bytes::from(hello), stream);
                    let handshake = async {
                        let start =
                            LazyConfigAcceptor::new(rustls::server::Acceptor::default(), replayed)
                                .await?;
                        start.into_stream(config).await
                    };
                    let tls = match tokio::time::timeout(CLIENT_HELLO_TIMEOUT, handshake).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(
                                component = "tls",
                                action = "serve",
                                "TLS handshake with {} for route {} failed: {error}",
                                addresses.client,
                                route.spec.name
                            );
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(
                                component = "tls",
                                action = "serve",
                                "TLS handshake with {} for route {} took longer than {} s",
                                addresses.client,
                                route.spec.name,
                                CLIENT_HELLO_TIMEOUT.as_secs()
                            );
                            return;
                        }
                    };
                    let arrival = Arrival::Tls {
                        route: route.spec.name.to_string(),
                    };
                    serve_connection(tls, addresses, arrival, shared).await;
                }
                TlsMode::None => {
                    tracing::debug!(
                        component = "tls",
                        action = "serve",
                        "route {} is plain HTTP; closed a TLS connection for it",
                        route.spec.name
                    );
                }
            }
        });
    }
}
