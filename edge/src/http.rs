//! The HTTP listener: routes by Host to a route's backends (E2). Requests of one client
//! connection reuse one backend connection per backend (so a route's PROXY header, sent when the
//! backend connection opens, describes that client). Bounded header size and header time keep
//! garbage and slowloris clients out; a route whose backends are all down answers 503 with a
//! body that says so.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use outpost_proto::route::TlsMode;
use tokio::net::TcpListener;

use crate::accept::accept_upstream;
use crate::backend::{NoBackend, dial, usable};
use crate::state::{ConnectionAddresses, Shared};
use crate::table::{BackendAddress, CompiledRoute};

/// Largest request head (line and headers) a client may send.
pub const REQUEST_HEAD_MAX_BYTES: usize = 64 * 1024;
/// Time a client has to send a whole request head.
pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// The edge's own short answers, or a backend's body streamed through untouched.
type ProxyBody = Either<Full<Bytes>, Incoming>;

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

fn plain(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Accepts HTTP connections until the task is dropped.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(
                    component = "http",
                    action = "accept",
                    "http accept failed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let serving = Arc::clone(&shared);
        shared.workers.serve(stream, move |stream| async move {
            let Some((stream, addresses)) =
                accept_upstream(stream, peer, serving.upstream_proxy).await
            else {
                return;
            };
            serve_connection(stream, addresses, Arrival::Plain, serving).await;
        });
    }
}

/// How a client connection arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arrival {
    /// On the HTTP listener.
    Plain,
    /// On the HTTPS listener, TLS terminated for the route the SNI named: its requests must name
    /// one of that route's hosts.
    Tls { route: String },
}

/// Serves one client connection (plain, or TLS already terminated).
pub async fn serve_connection<S>(
    stream: S,
    addresses: ConnectionAddresses,
    arrival: Arrival,
    shared: Arc<Shared>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = Arc::new(ClientConnection {
        addresses,
        client_ip: HeaderValue::from_str(&addresses.client.ip().to_string()).ok(),
        arrival,
        upstreams: Upstreams::default(),
    });
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        let connection = Arc::clone(&connection);
        async move { Ok::<_, Infallible>(proxy(request, &connection, &shared).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_HEAD_TIMEOUT)
        .max_buf_size(REQUEST_HEAD_MAX_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(
            component = "http",
            action = "serve",
            "client {} connection ended: {error}",
            addresses.client
        );
    }
}

/// What the requests of one client connection share.
struct ClientConnection {
    addresses: ConnectionAddresses,
    /// The client's IP as a header value (for `X-Forwarded-For`), made once per connection.
    client_ip: Option<HeaderValue>,
    arrival: Arrival,
    upstreams: Upstreams,
}

/// Backend connections of one client connection, by backend address.
#[derive(Default)]
struct Upstreams {
    senders: Mutex<HashMap<SocketAddr, SendRequest<Incoming>>>,
}

impl Upstreams {
    fn take(&self, address: SocketAddr) -> Option<SendRequest<Incoming>> {
        let mut senders = self.senders.lock().unwrap_or_else(|p| p.into_inner());
        let sender = senders.remove(&address)?;
        (!sender.is_closed()).then_some(sender)
    }

    fn put(&self, address: SocketAddr, sender: SendRequest<Incoming>) {
        self.senders
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(address, sender);
    }
}

fn host_of(request: &Request<Incoming>) -> Option<&str> {
    match request.headers().get(HOST) {
        Some(host) => host.to_str().ok(),
        None => request.uri().authority().map(|a| a.as_str()),
    }
}

async fn proxy(
    request: Request<Incoming>,
    connection: &ClientConnection,
    shared: &Shared,
) -> Response<ProxyBody> {
    let arrival = &connection.arrival;
    let Some(host) = host_of(&request) else {
        return plain(
            StatusCode::BAD_REQUEST,
            "400 bad request: no Host header\n".into(),
        );
    };
    let route = {
        let table = shared.table.load();
        match table.for_host(host) {
            Some(route) => Arc::clone(route),
            None => {
                return plain(
                    StatusCode::NOT_FOUND,
                    format!(
                        "404 not found: no route for host {}\n",
                        outpost_proto::validate::shorten(host)
                    ),
                );
            }
        }
    };
    match (arrival, route.spec.tls) {
        (Arrival::Plain, TlsMode::Passthrough) => {
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "421 misdirected request: route {} is TLS passthrough; use https\n",
                    route.spec.name
                ),
            );
        }
        (Arrival::Plain, TlsMode::Terminate) => {
            return redirect_to_https(&request, host, shared.https_port);
        }
        (Arrival::Tls { route: sni_route }, _) if *sni_route != route.spec.name.as_str() => {
            return plain(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "421 misdirected request: host {} is not served by this TLS connection (route {sni_route})\n",
                    outpost_proto::validate::shorten(host)
                ),
            );
        }
        _ => {}
    }
    let proto = match arrival {
        Arrival::Plain => "http",
        Arrival::Tls { .. } => "https",
    };
    forward(request, &route, connection, proto, shared).await
}

/// A terminating route reached over plain HTTP: 308 to the same path over HTTPS.
fn redirect_to_https(
    request: &Request<Incoming>,
    host: &str,
    https_port: u16,
) -> Response<ProxyBody> {
    let name = crate::table::normalize_host(host);
    let authority = if https_port == 443 {
        name
    } else {
        format!("{name}:{https_port}")
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{authority}{path}");
    let mut response = plain(
        StatusCode::PERMANENT_REDIRECT,
        format!("308 permanent redirect: this route is served over https: {location}\n"),
    );
    if let Ok(value) = HeaderValue::from_str(&location) {
        response
            .headers_mut()
            .insert(hyper::header::LOCATION, value);
    }
    response
}

/// Sends the request to a usable backend of the route, reusing this client's connection to it.
async fn forward(
    mut request: Request<Incoming>,
    route: &Arc<CompiledRoute>,
    connection: &ClientConnection,
    proto: &'static str,
    shared: &Shared,
) -> Response<ProxyBody> {
    let name = &route.spec.name;
    prepare_upstream_request(&mut request, connection.client_ip.as_ref(), proto);
    let upstreams = &connection.upstreams;
    let mut last_error = None;
    let attempts = route.backends.len().clamp(1, 3);
    for _ in 0..attempts {
        let Some(backend) = route.pick(|b| usable(&shared.health, &route.spec, b)) else {
            break;
        };
        let sender = match upstreams.take(backend.address) {
            Some(sender) => Ok(sender),
            None => open(route, backend, connection.addresses).await,
        };
        let mut sender = match sender {
            Ok(sender) => sender,
            Err(error) => {
                shared
                    .health
                    .record_for_route(backend.address, &route.spec, false);
                last_error = Some(error);
                continue;
            }
        };
        if sender.ready().await.is_err() {
            last_error = Some(format!("backend {} closed the connection", backend.address));
            continue;
        }
        return match sender.send_request(request).await {
            Ok(response) => {
                if response.status().is_server_error() {
                    shared
                        .health
                        .record_for_route(backend.address, &route.spec, false);
                }
                upstreams.put(backend.address, sender);
                response.map(Either::Right)
            }
            Err(error) => {
                shared
                    .health
                    .record_for_route(backend.address, &route.spec, false);
                plain(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "502 bad gateway: backend {} of route {name} failed: {error}\n",
                        backend.address
                    ),
                )
            }
        };
    }
    let no_backend = match last_error {
        Some(last_error) => NoBackend::ConnectFailed {
            route: name.to_string(),
            last_error,
        },
        None => NoBackend::AllDown {
            route: name.to_string(),
            known: route.backends.len(),
        },
    };
    plain(StatusCode::SERVICE_UNAVAILABLE, no_backend.message())
}

async fn open(
    route: &CompiledRoute,
    backend: &BackendAddress,
    addresses: ConnectionAddresses,
) -> Result<SendRequest<Incoming>, String> {
    let stream = dial(route, backend, addresses.client, addresses.edge).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("http handshake with {}: {e}", backend.address))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Origin-form URI, no hop-by-hop headers, and the forwarded-for/proto headers.
fn prepare_upstream_request(
    request: &mut Request<Incoming>,
    client_ip: Option<&HeaderValue>,
    proto: &'static str,
) {
    let absolute = request.uri().scheme().is_some() || request.uri().authority().is_some();
    if absolute
        && let Some(path) = request.uri().path_and_query().cloned()
        && let Ok(uri) = hyper::Uri::builder().path_and_query(path).build()
    {
        *request.uri_mut() = uri;
    }
    let headers = request.headers_mut();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let x_forwarded_for = HeaderName::from_static("x-forwarded-for");
    let forwarded = match (headers.get(&x_forwarded_for), client_ip) {
        (_, None) => None,
        (None, Some(ip)) => Some(ip.clone()),
        (Some(earlier), Some(ip)) => {
            let mut joined = Vec::with_capacity(earlier.len() + 2 + ip.len());
            joined.extend_from_slice(earlier.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip.as_bytes());
            HeaderValue::from_bytes(&joined).ok()
        }
    };
    if let Some(value) = forwarded {
        headers.insert(x_forwarded_for, value);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
}
