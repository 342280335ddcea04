//! One request through the proxy: pick the node (stickiness first, then the algorithm),
//! rewrite the headers, send it on a pooled connection, and stream the answer back; Upgrade
//! (WebSocket) becomes a byte tunnel. Failures become 502/503/504 answers and passive checks.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version,
    header::{self, CONNECTION, COOKIE, HOST, SET_COOKIE, UPGRADE},
    uri::PathAndQuery,
};
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use log::{debug, warn};
use tokio::sync::watch;

use crate::{
    config::Stickiness,
    proxy::{
        PortRuntime, PortView,
        balance::NodeView,
        cookie,
        h1::{RawBody, Reader},
        limits::ClientBody,
        pool::{BackendBody, ForwardError, Head, NodePool, Sender, Sent},
        stats::ActiveGuard,
        view::ConnGuard,
    },
};

/// Why an answer's body broke off: hyper's error, or the bodiless path's (`h1`).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// What the proxy answers clients with.
pub type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1).
static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    UPGRADE,
];

/// Headers a client may send that claim to say who the client is, or which host it asked
/// for, as a proxy in front would: nb is the edge, so they are the client's own words, and a
/// node that trusted them could be lied to. They are removed (X-Forwarded-For is kept and
/// appended to, as proxies do, and nodes are told the address nb saw last in it).
static UNTRUSTED: [HeaderName; 3] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-host"),
];

/// The most `NB_SRVID` values of one request that are checked (an HMAC each): a browser sends
/// one; a client sending a thousand in a 64 KiB Cookie header gets the first few looked at.
const MAX_STICKY_COOKIES: usize = 4;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// One client connection, as its requests are forwarded: the addresses, and the header
/// values made from them once per connection rather than once per request.
#[derive(Debug)]
pub struct Client {
    pub(super) peer: SocketAddr,
    pub(super) local: SocketAddr,
    pub(super) secure: bool,
    /// The client's address, as X-Forwarded-For names it.
    pub(super) ip: HeaderValue,
    /// The port the client came to, for X-Forwarded-Port.
    pub(super) port: HeaderValue,
    /// The connection's share of its listener's stop signal: an upgraded tunnel keeps a copy,
    /// so a stopping agent waits for it as for a request in flight.
    pub(super) stop: watch::Receiver<bool>,
}

impl Client {
    /// The connection from `peer` to `local` (`secure`: over TLS), stopped by `stop`.
    pub fn new(
        peer: SocketAddr,
        local: SocketAddr,
        secure: bool,
        stop: watch::Receiver<bool>,
    ) -> Client {
        let ip = HeaderValue::from_str(&peer.ip().to_canonical().to_string())
            .expect("an address is a valid header value");
        Client {
            peer,
            local,
            secure,
            ip,
            port: HeaderValue::from(local.port()),
            stop,
        }
    }
}

/// The body of the balancer's own short answers: the status, then `text`.
pub(super) fn page(status: StatusCode, text: &str) -> String {
    let reason = status.canonical_reason().unwrap_or("");
    format!("{} {reason}\n\n{text}\n", status.as_u16())
}

/// A short plain-text answer made by the balancer itself.
fn plain(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let body = page(status, text);
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Which of the headers the proxy looks at a message carries, found in one pass over its
/// names: a lookup hashes the name, and the dozen lookups a request took (nine of them for
/// hop-by-hop headers that are rarely there) cost more than the pass.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The hop-by-hop headers present, as bits by their index in `HOP_BY_HOP`.
    hop_by_hop: u16,
    connection: bool,
    host: bool,
    /// More than one Host field.
    hosts: bool,
    forwarded_for: bool,
    cookie: bool,
    /// One of [`UNTRUSTED`] is present.
    untrusted: bool,
}

impl Seen {
    fn of(h: &HeaderMap) -> Seen {
        let mut s = Seen::default();
        for name in h.keys() {
            if name == HOST {
                // Names come once each, with all their values.
                s.hosts = h.get_all(HOST).iter().nth(1).is_some();
                s.host = true;
            } else if name == COOKIE {
                s.cookie = true;
            } else if name == X_FORWARDED_FOR {
                s.forwarded_for = true;
            } else if let Some(i) = HOP_BY_HOP.iter().position(|n| n == name) {
                s.hop_by_hop |= 1 << i;
                s.connection |= name == CONNECTION;
            } else if UNTRUSTED.contains(name) {
                s.untrusted = true;
            }
        }
        s
    }
}

/// Removes hop-by-hop headers, and those the `Connection` header names.
pub(super) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let seen = Seen::of(h);
    strip_seen_hop_by_hop(h, seen);
}

/// As [`strip_hop_by_hop`], for a message whose names were looked at already; what the
/// message carries afterwards.
fn strip_seen_hop_by_hop(h: &mut HeaderMap, seen: Seen) -> Seen {
    if seen.hop_by_hop == 0 {
        return seen;
    }
    let mut named = Vec::new();
    if seen.connection {
        // Tokens naming a hop-by-hop header (`keep-alive`, `upgrade`: the usual ones) are
        // skipped, as those go below anyway: the common message allocates nothing here.
        named = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !HOP_BY_HOP
                    .iter()
                    .any(|n| t.eq_ignore_ascii_case(n.as_str()))
                    && !is_protected(t)
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate() {
        if seen.hop_by_hop & (1 << i) != 0 {
            h.remove(n);
        }
    }
    if named.is_empty() {
        return Seen {
            hop_by_hop: 0,
            connection: false,
            ..seen
        };
    }
    // `Connection` may name any header, Host or Cookie too: look again.
    for n in named {
        h.remove(n);
    }
    Seen::of(h)
}

/// Header names `Connection` may not remove: Host (the node must see the host the client
/// asked for; `Connection: host` would otherwise strip it) and the framing headers, which
/// are hyper's to handle.
pub(super) fn is_protected(name: &str) -> bool {
    ["host", "content-length", "transfer-encoding"]
        .iter()
        .any(|p| name.eq_ignore_ascii_case(p))
}

/// The request rules both HTTP/1.1 paths (hyper's and the bodiless relay's) and HTTP/2
/// apply, as RFC 9112 §3.2 and RFC 9113 §8.3.1 say: exactly one Host in an HTTP/1.1
/// request (none in HTTP/1.0 is allowed), at most one in HTTP/1.0 and HTTP/2, and a host
/// (Host or `:authority`) in HTTP/2. A request that breaks them gets 400 and is not sent.
fn refusal_of(version: Version, seen: Seen, authority: bool) -> Option<Refusal> {
    let bad = seen.hosts
        || match version {
            Version::HTTP_11 => !seen.host,
            Version::HTTP_2 => !seen.host && !authority,
            _ => false,
        };
    bad.then_some(Refusal {
        status: StatusCode::BAD_REQUEST,
        text: "A request needs exactly one Host header.",
    })
}

/// The protocol an HTTP/1.1 request asks to switch to, if it asks.
fn upgrade_of(req: &Request<Incoming>, seen: Seen) -> Option<HeaderValue> {
    if req.version() != Version::HTTP_11 || !seen.connection {
        return None;
    }
    let wants = req
        .headers()
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    wants.then(|| req.headers().get(UPGRADE).cloned()).flatten()
}

/// Rewrites a client's request for a node: Host kept (made from `:authority` for HTTP/2),
/// X-Forwarded-* added, hop-by-hop headers and the balancer's cookie removed, origin-form
/// target, HTTP/1.1.
fn rewrite_request(
    req: &mut Request<Incoming>,
    conn: &Client,
    upgrade: Option<HeaderValue>,
    seen: Seen,
) {
    let authority = req.uri().authority().cloned();
    // Origin-form already (HTTP/1.1 clients): nothing to rebuild.
    if authority.is_some() || req.uri().scheme().is_some() || req.uri().path_and_query().is_none() {
        let target = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(target);
    }
    *req.version_mut() = Version::HTTP_11;
    let h = req.headers_mut();
    let seen = strip_seen_hop_by_hop(h, seen);
    if let Some(up) = upgrade {
        h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(UPGRADE, up);
    }
    if !seen.host
        && let Some(a) = authority
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        h.insert(HOST, v);
    }
    let prior: Vec<&str> = if seen.forwarded_for {
        h.get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let xff = if prior.is_empty() {
        Some(conn.ip.clone())
    } else {
        let client = conn.ip.to_str().expect("an address is visible ASCII");
        HeaderValue::from_str(&format!("{}, {client}", prior.join(", "))).ok()
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    h.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.secure { "https" } else { "http" }),
    );
    h.insert(X_FORWARDED_PORT.clone(), conn.port.clone());
    if seen.untrusted {
        for n in &UNTRUSTED {
            h.remove(n);
        }
    }
    if seen.cookie {
        let cookies: Vec<String> = h
            .get_all(COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(cookie::strip)
            .collect();
        h.remove(COOKIE);
        if !cookies.is_empty()
            && let Ok(v) = HeaderValue::from_str(&cookies.join("; "))
        {
            h.insert(COOKIE, v);
        }
    }
}

/// Serves one client request; never fails (errors become answers). Every answer is counted
/// in `nb_port_requests_total`.
pub async fn handle(
    rt: Arc<PortRuntime>,
    req: Request<Incoming>,
    conn: Arc<Client>,
) -> Result<Response<ProxyBody>, Infallible> {
    let resp = serve(&rt, req, &conn).await;
    rt.view().requests.count(resp.status().as_u16());
    Ok(resp)
}

async fn serve(rt: &PortRuntime, mut req: Request<Incoming>, conn: &Client) -> Response<ProxyBody> {
    let view = rt.view();
    let seen = Seen::of(req.headers());
    if let Some(r) = refusal_of(req.version(), seen, req.uri().authority().is_some()) {
        return plain(r.status, r.text);
    }
    let client = conn.peer.ip().to_canonical();
    let cookies = req.headers().get_all(COOKIE);
    let sticky = Sticky::of(
        rt,
        &view,
        client,
        cookies.iter().filter_map(|v| v.to_str().ok()),
    );
    let upgrade = upgrade_of(&req, seen);
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    rewrite_request(&mut req, conn, upgrade, seen);
    let client_timeout = Duration::from_secs(view.port.timeout_client as u64);
    let req = req.map(|body| ClientBody::new(body, client_timeout));

    let (idx, sent, guard) = match dispatch(rt, &view, client, &sticky, req).await {
        Ok(x) => x,
        Err(refusal) => return plain(refusal.status, refusal.text),
    };
    let node = &view.nodes[idx];
    let set_cookie = settle(rt, &view, idx, &sticky, client, conn.secure, sent.status());
    let mut out = match sent {
        Sent::Raw(mut parts, reader) => {
            strip_hop_by_hop(&mut parts.headers);
            let body = RawBody::new(reader, node.pool.clone(), guard).map_err(BodyError::from);
            Response::from_parts(parts, body.boxed_unsync())
        }
        Sent::Hyper(resp, sender) => {
            let stall = Duration::from_secs(view.port.timeout_server as u64);
            hyper_answer(rt, conn, node, (resp, sender), guard, client_upgrade, stall)
        }
    };
    if no_length(out.status()) {
        out.headers_mut().remove(header::CONTENT_LENGTH);
    }
    if let Some(v) = set_cookie {
        out.headers_mut().append(SET_COOKIE, v);
    }
    out
}

/// Whether an answer with `status` may not carry Content-Length (RFC 9110 §8.6: 1xx and
/// 204; a node that sends one anyway would have the client wait for a body that never comes).
pub(super) fn no_length(status: StatusCode) -> bool {
    status.is_informational() || status == StatusCode::NO_CONTENT
}

/// The node the first valid `NB_SRVID` among the first [`MAX_STICKY_COOKIES`] of `cookies`
/// names.
fn cookie_label<'a>(
    key: &cookie::CookieKey,
    port: u16,
    cookies: impl Iterator<Item = &'a str>,
) -> Option<String> {
    cookie::find(cookies)
        .into_iter()
        .take(MAX_STICKY_COOKIES)
        .find_map(|v| key.verify(port, v))
        .map(str::to_string)
}

/// Where a client's stickiness points: the node its valid cookie names (`http_cookie`), or
/// the one the port's table keeps for its address (`table`).
#[derive(Debug, Default)]
pub(super) struct Sticky {
    cookie: Option<String>,
    table: Option<String>,
}

impl Sticky {
    /// The stickiness of a request from `client` carrying the Cookie header values `cookies`.
    pub(super) fn of<'a>(
        rt: &PortRuntime,
        view: &PortView,
        client: IpAddr,
        cookies: impl Iterator<Item = &'a str>,
    ) -> Sticky {
        let port = &view.port;
        match port.stickiness {
            Stickiness::HttpCookie => Sticky {
                cookie: view
                    .key
                    .as_ref()
                    .and_then(|key| cookie_label(key, port.port, cookies)),
                table: None,
            },
            Stickiness::Table => Sticky {
                cookie: None,
                table: rt.table.get(client, Instant::now(), &view.nodes),
            },
            Stickiness::None => Sticky::default(),
        }
    }

    fn label(&self) -> Option<&str> {
        self.cookie.as_deref().or(self.table.as_deref())
    }
}

/// What a request is sent to a node as: a request hyper sends, or the encoded head of one
/// without a body (read by nb's own HTTP/1.1 server, `relay`).
pub(super) trait Outgoing: Sized + Send {
    type Answer: Send;
    fn send<'a>(
        self,
        pool: &'a Arc<NodePool>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> impl Future<Output = Result<Self::Answer, (ForwardError, Option<Self>)>> + Send + 'a;
}

impl Outgoing for Request<ClientBody> {
    type Answer = Sent;
    fn send<'a>(
        self,
        pool: &'a Arc<NodePool>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> impl Future<Output = Result<Sent, (ForwardError, Option<Self>)>> + Send + 'a {
        pool.send(self, connect_timeout, response_timeout)
    }
}

impl Outgoing for Head {
    type Answer = (http::response::Parts, Reader);
    async fn send(
        self,
        pool: &Arc<NodePool>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Self::Answer, (ForwardError, Option<Self>)> {
        pool.send_head(&self, connect_timeout, response_timeout)
            .await
            .map_err(|(e, unsent)| (e, unsent.then_some(self)))
    }
}

/// Why a request got no node's answer, as the answer the balancer gives instead.
#[derive(Debug, Clone, Copy)]
pub(super) struct Refusal {
    pub status: StatusCode,
    pub text: &'static str,
}

const NO_NODE: Refusal = Refusal {
    status: StatusCode::SERVICE_UNAVAILABLE,
    text: "No server is available to handle this request.",
};

const NODE_FULL: Refusal = Refusal {
    status: StatusCode::SERVICE_UNAVAILABLE,
    text: "The server is busy, try again later.",
};

/// The answer to a request that failed on nb's side or the client's, not the node's: the
/// client's body timed out (408) or broke off (400), or nb ran out of descriptors (503).
fn local_refusal(port: &str, label: &str, e: &ForwardError) -> Refusal {
    match e {
        ForwardError::ClientBody {
            timed_out: true, ..
        } => {
            debug!("port {port}: node {label}: {e}");
            Refusal {
                status: StatusCode::REQUEST_TIMEOUT,
                text: "The request body was not received in time.",
            }
        }
        ForwardError::ClientBody { .. } => {
            debug!("port {port}: node {label}: {e}");
            Refusal {
                status: StatusCode::BAD_REQUEST,
                text: "The request body broke off.",
            }
        }
        _ => {
            warn!("port {port}: node {label}: {e}");
            Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                text: "The balancer is out of resources, try again later.",
            }
        }
    }
}

/// Sends `out` to the client's sticky node if it takes sticky clients, else to the one the
/// port's algorithm picks; a node that cannot be reached gets one retry on another. The
/// node's index, its answer, and the in-flight count the answer's body holds until it ends.
pub(super) async fn dispatch<O: Outgoing>(
    rt: &PortRuntime,
    view: &PortView,
    client: IpAddr,
    sticky: &Sticky,
    mut out: O,
) -> Result<(usize, O::Answer, ActiveGuard), Refusal> {
    let port = &view.port;
    let mut idx = sticky.label().and_then(|l| {
        view.nodes
            .iter()
            .position(|n| n.label == l && n.takes_sticky())
    });
    if idx.is_none() {
        idx = pick(rt, view, client, None);
    }
    let mut idx = idx.ok_or(NO_NODE)?;
    let connect_timeout = Duration::from_secs(port.timeout_connect as u64);
    let server_timeout = Duration::from_secs(port.timeout_server as u64);
    let mut retried = false;
    loop {
        let node = &view.nodes[idx];
        let permit = match node.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            // Full: wait for a request to the node to end, as HAProxy queues for a server at
            // its `maxconn`, for as long as a connect may take.
            Err(_) => {
                match tokio::time::timeout(connect_timeout, node.slots.clone().acquire_owned())
                    .await
                {
                    Ok(Ok(p)) => p,
                    _ => {
                        warn!(
                            "port {}: node {}: {} requests in flight (max_node_connections), \
                         none ended within {connect_timeout:?}: 503",
                            view.name, node.label, port.max_node_connections
                        );
                        return Err(NODE_FULL);
                    }
                }
            }
        };
        let guard = ActiveGuard::holding(&node.active, permit);
        let sent = out.send(&node.pool, connect_timeout, server_timeout).await;
        // Forwarded = the request left for the node (answered or not); a failed connect
        // forwarded nothing, and its retry counts on the node that takes it.
        if !matches!(&sent, Err((e, _)) if e.is_connect() || e.is_local()) {
            node.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
        let (e, back) = match sent {
            Ok(answer) => return Ok((idx, answer, guard)),
            Err(x) => x,
        };
        if e.is_local() {
            return Err(local_refusal(&view.name, &node.label, &e));
        }
        node.passive_failure(format!("passive: {e}"));
        match (back, e.is_connect() && !retried) {
            (Some(o), true) => {
                warn!(
                    "port {}: node {}: {e}; retrying on another node",
                    view.name, node.label
                );
                retried = true;
                out = o;
                idx = pick(rt, view, client, Some(&node.label)).ok_or(NO_NODE)?;
            }
            _ => {
                warn!("port {}: node {}: {e}", view.name, node.label);
                return Err(match e {
                    ForwardError::ResponseTimeout { .. } => Refusal {
                        status: StatusCode::GATEWAY_TIMEOUT,
                        text: "The server did not answer in time.",
                    },
                    ForwardError::Connect { .. } | ForwardError::ConnectTimeout { .. } => NO_NODE,
                    ForwardError::LocalResources { .. } | ForwardError::ClientBody { .. } => {
                        local_refusal(&view.name, &node.label, &e)
                    }
                    ForwardError::Protocol { .. } | ForwardError::Answer { .. } => Refusal {
                        status: StatusCode::BAD_GATEWAY,
                        text: "The server sent an invalid response.",
                    },
                });
            }
        }
    }
}

/// What follows node `idx`'s answer with `status`: a 5xx counts as a passive check failure,
/// and the client's stickiness moves to the node; the Set-Cookie value to send, if any.
pub(super) fn settle(
    rt: &PortRuntime,
    view: &PortView,
    idx: usize,
    sticky: &Sticky,
    client: IpAddr,
    secure: bool,
    status: StatusCode,
) -> Option<HeaderValue> {
    let node = &view.nodes[idx];
    let port = &view.port;
    if status.is_server_error()
        && status != StatusCode::NOT_IMPLEMENTED
        && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED
    {
        node.passive_failure(format!("passive: HTTP {}", status.as_u16()));
    }
    match port.stickiness {
        Stickiness::HttpCookie if sticky.cookie.as_deref() != Some(node.label.as_str()) => {
            let key = view.key.as_ref()?;
            node.set_cookie.get(key, port.port, &node.label, secure)
        }
        Stickiness::Table if sticky.table.as_deref() != Some(node.label.as_str()) => {
            rt.table.put(client, node, Instant::now());
            None
        }
        _ => None,
    }
}

/// The answer hyper brought back: a body streamed to the client, or (a node that agreed to an
/// Upgrade) an empty 101 answer and, once both sides have switched, a byte tunnel. `stall`:
/// how long the node may leave the body stalled (`timeout_server`).
fn hyper_answer(
    rt: &PortRuntime,
    conn: &Client,
    node: &NodeView,
    (mut resp, sender): (Response<Incoming>, Sender),
    guard: ActiveGuard,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    stall: Duration,
) -> Response<ProxyBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        // The node agreed to switch: from now on the two connections are one byte pipe.
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        let (mut parts, _empty) = resp.into_parts();
        let label = node.label.clone();
        // Until the tunnel ends: counted as a client connection of the port (against
        // `max_connections`, and by a stopping agent, which waits for it).
        let open = ConnGuard::new(&rt.open);
        let stop = conn.stop.clone();
        tokio::spawn(async move {
            let _held = (guard, open, stop);
            match tokio::try_join!(client_upgrade, backend_upgrade) {
                Ok((c, b)) => {
                    let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
                        debug!("upgraded tunnel to {label}: {e}");
                    }
                }
                Err(e) => debug!("upgrade to {label}: {e}"),
            }
        });
        drop(sender);
        let upgrade = parts.headers.get(UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = upgrade {
            parts.headers.insert(UPGRADE, u);
        }
        Response::from_parts(
            parts,
            Empty::new().map_err(|never| match never {}).boxed_unsync(),
        )
    } else {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = BackendBody::new(body, node.pool.clone(), Some(sender), guard, stall)
            .map_err(BodyError::from);
        Response::from_parts(parts, body.boxed_unsync())
    }
}

/// The node index the port's algorithm picks, not counting `exclude`.
fn pick(
    rt: &PortRuntime,
    view: &PortView,
    client: std::net::IpAddr,
    exclude: Option<&str>,
) -> Option<usize> {
    let n = rt
        .balancer
        .pick(view.port.algorithm, &view.nodes, client, exclude)?;
    view.nodes.iter().position(|x| std::ptr::eq(x, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in list {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go_the_rest_stay() {
        let mut h = headers(&[
            ("Content-Type", "text/plain"),
            ("Connection", "keep-alive, X-Hop"),
            ("connection", "Close, TE"),
            ("X-Hop", "a"),
            // Named by `Close` above: a reserved field name, removed like any other.
            ("Close", "x"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Proxy-Connection", "keep-alive"),
            ("Upgrade", "websocket"),
            ("X-Kept", "b"),
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "set-cookie", "x-kept"]);
        assert_eq!(h.get_all("set-cookie").iter().count(), 2);
    }

    #[test]
    fn connection_removes_what_it_names_but_host_and_framing_and_what_is_left_is_seen_again() {
        let mut h = headers(&[
            ("Host", "a.test"),
            ("Cookie", "x=1"),
            ("Content-Length", "0"),
            ("Connection", "host, cookie, content-length"),
            ("X-Forwarded-For", "203.0.113.1"),
        ]);
        let before = Seen::of(&h);
        assert!(before.host && before.cookie && before.connection);
        let seen = strip_seen_hop_by_hop(&mut h, before);
        assert_eq!(names(&h), ["content-length", "host", "x-forwarded-for"]);
        assert!(seen.host && !seen.cookie && seen.forwarded_for && seen.hop_by_hop == 0);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_alone() {
        let list = [
            ("Host", "a.test"),
            ("Cookie", "x=1"),
            ("X-Forwarded-For", "203.0.113.1"),
        ];
        let mut h = headers(&list);
        let seen = Seen::of(&h);
        assert_eq!(seen.hop_by_hop, 0);
        assert!(seen.host && seen.cookie && seen.forwarded_for && !seen.connection);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["cookie", "host", "x-forwarded-for"]);
    }

    #[test]
    fn only_the_first_few_sticky_cookies_are_checked() {
        let key = cookie::CookieKey::from_bytes([7; 32]);
        let good = key.sign(80, "b2");
        let forged: Vec<String> = (0..1000).map(|i| format!("NB_SRVID=forged{i}")).collect();
        let header = |at: usize| {
            let mut v = forged.clone();
            v.insert(at, format!("NB_SRVID={good}"));
            v.join("; ")
        };
        let first = header(MAX_STICKY_COOKIES - 1);
        assert_eq!(
            cookie_label(&key, 80, std::iter::once(first.as_str())).as_deref(),
            Some("b2")
        );
        let late = header(MAX_STICKY_COOKIES);
        assert_eq!(cookie_label(&key, 80, std::iter::once(late.as_str())), None);
    }

    #[test]
    fn a_connection_header_alone_is_seen_and_removed() {
        let mut h = headers(&[("Connection", "close"), ("Content-Length", "0")]);
        let seen = Seen::of(&h);
        assert!(seen.connection && seen.hop_by_hop == 1);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-length"]);
    }
}
