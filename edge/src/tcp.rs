//! TCP routes (E2): one listener per route's `listen_port`, started and stopped as the table
//! changes. Stopping a listener stops accepting; connections already proxied keep going.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::accept::accept_upstream;
use crate::backend::connect;
use crate::state::Shared;

/// The running TCP route listeners, by port.
#[derive(Default)]
pub struct TcpListeners {
    running: HashMap<u16, JoinHandle<()>>,
}

impl TcpListeners {
    /// Starts listeners for new ports and stops those of ports no route claims any more.
    /// Returns the ports that could not be bound, with why.
    pub async fn reconcile(&mut self, shared: &Arc<Shared>) -> Vec<String> {
        let wanted = shared.table.load().tcp_ports();
        self.running.retain(|port, task| {
            let keep = wanted.contains(port);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut failures = Vec::new();
        for port in wanted {
            if self.running.contains_key(&port) {
                continue;
            }
            let address = SocketAddr::new(shared.tcp_listen_ip, port);
            match TcpListener::bind(address).await {
                Ok(listener) => {
                    let shared = Arc::clone(shared);
                    self.running
                        .insert(port, tokio::spawn(serve(listener, port, shared)));
                }
                Err(error) => failures.push(format!("cannot listen on {address}: {error}")),
            }
        }
        failures
    }
}

async fn serve(listener: TcpListener, port: u16, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(
                    component = "tcp",
                    action = "accept",
                    "tcp :{port} accept failed: {error}"
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
            let Some(route) = shared.table.load().for_port(port).cloned() else {
                return;
            };
            match connect(&route, &shared.health, addresses.client, addresses.edge).await {
                Ok((mut backend, _)) => {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut backend).await;
                }
                Err(no_backend) => tracing::debug!(
                    component = "tcp",
                    action = "connect_backend",
                    "{}",
                    no_backend.message().trim_end()
                ),
            }
        });
    }
}
