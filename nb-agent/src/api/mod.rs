//! The admin API and `/metrics`, on `[admin] listen` (README "Admin API, nbctl, metrics").
//!
//! Connections are served by hyper on the agent's runtime, at most [`MAX_CONNECTIONS`] at
//! once, each bounded in time (README "Admin API limits"), so slow or idle clients cannot hold
//! the listener. Every write, and every read that needs live counters, is handed through one
//! channel to the agent loop and answered there, one at a time: writes are serialized with
//! each other and with SIGHUP reloads and health changes, and a read sees one consistent
//! state. What needs only the config (`/v1/ports`, the tokens) is read from what the loop
//! publishes after every change ([`Published`]), and `/v1/status` falls back to the loop's
//! last published status when the loop does not answer within [`LOOP_DEADLINE`].
//!
//! Tokens are checked in the connection task, before a body is read: an unauthenticated
//! write costs the agent its head only. Answers to requests without a valid token show no
//! file paths (README "Redaction").
//!
//! API writes are an overlay on the config file ([`overlay`]): node additions, changes of
//! weight or mode, removals and whole ports rebuilt, kept in `state_dir/api-changes.json`.
//! A path's `{port}` is read by [`crate::model::find`]: `PORT` where the number is used once,
//! else `ADDRESS:PORT`; an ambiguous one is a 409 naming the choices. The running config is always "the file,
//! then the overlay", both at start and at every reload, and it is validated whole by the same
//! rules as the file before the agent applies it; a refused write or reload changes nothing.

mod auth;
mod body;
mod overlay;
mod views;

pub(crate) use self::body::{body_object, mode_field, new_node, weight_field};
pub use self::{overlay::Overlay, views::HIDDEN};

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use serde_json::{Value, json};
use thiserror::Error;
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc, oneshot, watch},
};

use self::{
    auth::{authorize_read, authorize_write},
    views::{config_digest, node_json, port_json, port_value, stats_json},
};
use crate::{
    config::{self, Config, Port},
    fleet::Readiness,
    metrics::{self, NodeSample, Snapshot},
    model::{self, FindError, PortKey, port_names},
    secret_file,
};

/// A refused write: its HTTP status and the reason shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

impl From<FindError> for Refusal {
    fn from(e: FindError) -> Refusal {
        let status = match e {
            FindError::Malformed(_) => StatusCode::BAD_REQUEST,
            FindError::NotFound(_) => StatusCode::NOT_FOUND,
            FindError::Ambiguous { .. } => StatusCode::CONFLICT,
        };
        Refusal::new(status, e.to_string())
    }
}

/// The running port a path's `{port}` names (see [`model::find`]).
fn find_port<'c>(cfg: &'c Config, public: &[IpAddr], text: &str) -> Result<&'c Port, Refusal> {
    Ok(&cfg.ports[model::find(&cfg.ports, public, text)?])
}

/// Largest request body accepted: a node is a few dozen bytes.
const MAX_BODY: usize = 64 * 1024;
/// Largest request head (request line and headers) hyper buffers: the API's are a few
/// hundred bytes. hyper's floor is 8 KiB.
const MAX_HEAD: usize = 16 * 1024;
/// Connections open at once on the admin listener. Past it, a new connection takes the slot
/// of the one that has waited longest for its client; when every one is having a request
/// answered, the new one is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request head, counted from the connection's start or the
/// previous answer: also the longest a kept-alive connection may sit idle.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a client has to send a write's whole body once its head is in (408 after).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection may go without progress while no request of it is being answered:
/// the bound on a client that does not read its answer.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/v1/status` waits for the agent loop before it answers what the loop last
/// published (at most one sweep, 2 s, old).
pub const LOOP_DEADLINE: Duration = Duration::from_millis(500);
/// How long `/metrics` and `/v1/stats` wait for the agent loop before they answer 503: they
/// need live counters, which only the loop has.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// Requests waiting for the agent loop; more wait in their connections.
const QUEUE: usize = 256;
/// The file under `state_dir` holding the API's changes.
pub const STATE_FILE: &str = "api-changes.json";

/// Why the admin API cannot start, or why the file and the API's changes do not fit together.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("admin API: listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a valid record of API changes: {message} (move it away to run on the config file alone)"
    )]
    StateFormat { path: PathBuf, message: String },
    #[error(
        "the config with the API's changes ({path}) applied is invalid:\n{}",
        .problems.join("\n")
    )]
    Composed {
        path: PathBuf,
        problems: Vec<String>,
    },
}

// ---------------------------------------------------------------------------------------
// Requests, as the connection tasks hand them to the agent loop.

/// A request routed, waiting for the agent loop's answer.
pub struct Call {
    op: Op,
    reply: oneshot::Sender<Reply>,
}

/// Where a request is answered.
#[derive(Debug)]
enum Route {
    /// `GET /`: the status page (README "Status page"), static: it holds no data of its
    /// own and fetches everything through the routes below, under their auth.
    Page,
    /// From the published config, in the connection task.
    Ports,
    Port(String),
    /// By the agent loop.
    Loop(Op),
}

/// What the agent loop answers.
#[derive(Debug)]
enum Op {
    Status,
    Stats,
    Metrics,
    /// `GET /v1/ready`: whether this balancer should be sent traffic (see [`Readiness`]).
    Ready,
    /// `GET /v1/history`: the status page's samples (see [`crate::history`]).
    History,
    /// `POST` (true) or `DELETE` (false) `/v1/fleet/drain`; authorized as a write.
    Drain(bool),
    /// Authorized before it gets here: the token is checked before the body is read.
    Write {
        write: WriteOp,
        body: Bytes,
    },
}

#[derive(Debug)]
enum WriteOp {
    Add(String),
    Set(String, String),
    Remove(String, String),
    /// `PUT /v1/ports/{port}`.
    Rebuild(String),
}

/// An answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: String,
    /// Close the connection after this answer: a request body was left unread.
    close: bool,
    /// Set when `/v1/status` came from [`Published`] because the loop was busy: its age.
    snapshot_age: Option<Duration>,
}

impl Reply {
    fn json(status: StatusCode, v: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_string_pretty(v).unwrap_or_default() + "\n",
            close: false,
            snapshot_age: None,
        }
    }

    fn error(status: StatusCode, message: &str) -> Reply {
        Reply::json(status, &json!({ "error": message }))
    }

    fn closing(mut self) -> Reply {
        self.close = true;
        self
    }
}

impl From<Refusal> for Reply {
    fn from(r: Refusal) -> Reply {
        Reply::error(r.status, &r.message)
    }
}

/// What the agent loop last published for the connection tasks: the running config (which
/// `/v1/ports` shows and whose `[admin]` tokens guard every request, so neither waits for the
/// loop) and the last `/v1/status`, answered when the loop is slower than [`LOOP_DEADLINE`].
#[derive(Debug)]
pub struct Published {
    config: Arc<Config>,
    /// The balancer's addresses, which ports without their own serve (for `{port}`).
    public: Vec<IpAddr>,
    status: Value,
    at: Instant,
}

impl Published {
    fn new(config: Config, public: Vec<IpAddr>, status: Value) -> Published {
        Published {
            config: Arc::new(config),
            public,
            status,
            at: Instant::now(),
        }
    }
}

/// Binds `[admin] listen`; done before the data path is touched, so a taken address stops
/// the agent before it changes anything.
pub async fn bind(admin: &config::Admin) -> Result<TcpListener, ApiError> {
    TcpListener::bind(admin.listen)
        .await
        .map_err(|source| ApiError::Listen {
            addr: admin.listen,
            source,
        })
}

/// One admitted connection, as the accept loop sees it when it must make room.
struct Slot {
    /// A request is being answered (the agent loop has it): not to be evicted.
    busy: AtomicBool,
    /// Milliseconds after [`Slots::epoch`] of the connection's last progress: admitted, a
    /// request head read, an answer handed to hyper.
    since: AtomicU64,
    /// Told to close by the accept loop (evicted).
    close: Notify,
}

/// The connections open on the admin listener, at most [`MAX_CONNECTIONS`].
struct Slots {
    epoch: Instant,
    open: Mutex<(u64, HashMap<u64, Arc<Slot>>)>,
}

/// Marks a slot busy while it lives.
struct Busy<'a>(&'a Slots, &'a Slot);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.touch(self.1);
        self.1.busy.store(false, Ordering::Relaxed);
    }
}

impl Slots {
    fn new() -> Slots {
        Slots {
            epoch: Instant::now(),
            open: Mutex::new((0, HashMap::new())),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn touch(&self, s: &Slot) {
        s.since.store(self.now_ms(), Ordering::Relaxed);
    }

    fn busy<'a>(&'a self, s: &'a Slot) -> Busy<'a> {
        s.busy.store(true, Ordering::Relaxed);
        Busy(self, s)
    }

    /// How long `s` has gone without progress, when no request of it is being answered.
    fn stalled(&self, s: &Slot) -> Option<Duration> {
        (!s.busy.load(Ordering::Relaxed)).then(|| {
            Duration::from_millis(
                self.now_ms()
                    .saturating_sub(s.since.load(Ordering::Relaxed)),
            )
        })
    }

    /// A slot for a new connection. When all are taken, the connection that has waited
    /// longest for its client (a head, a body, or the client reading an answer) is closed to
    /// make room: slow or idle clients can hold the listener only until someone else needs
    /// it. `None` when every connection is having a request answered.
    fn admit(&self) -> Option<(u64, Arc<Slot>)> {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (next, open) = &mut *guard;
        if open.len() >= MAX_CONNECTIONS {
            let victim = open
                .iter()
                .filter(|(_, s)| !s.busy.load(Ordering::Relaxed))
                .min_by_key(|(_, s)| s.since.load(Ordering::Relaxed))
                .map(|(id, _)| *id)?;
            if let Some(s) = open.remove(&victim) {
                s.close.notify_one();
            }
        }
        let slot = Arc::new(Slot {
            busy: AtomicBool::new(false),
            since: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        *next += 1;
        open.insert(*next, slot.clone());
        Some((*next, slot))
    }

    fn release(&self, id: u64) {
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        guard.1.remove(&id);
    }
}

/// The answer to a connection that finds every slot busy, written in one go on a fresh
/// socket (its send buffer is empty) so the accept loop never waits on it.
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
Content-Length: 51\r\nConnection: close\r\n\r\n{\"error\": \"too many admin connections, try again\"}\n";

/// Serves HTTP on `listener`; the requests that need the agent come out of the returned
/// channel, for [`Admin::handle`] in the agent loop. `published` is what the loop last
/// published ([`Admin::subscribe`]).
pub fn serve(
    listener: TcpListener,
    published: watch::Receiver<Arc<Published>>,
) -> mpsc::Receiver<Call> {
    serve_until(listener, published, Arc::new(tokio::sync::Notify::new()))
}

/// [`serve`], whose accept loop ends (closing its descriptor of the listener) once `stop` is
/// notified: an upgrade's old agent, whose listener the new one accepts on now.
pub fn serve_until(
    listener: TcpListener,
    published: watch::Receiver<Arc<Published>>,
    stop: Arc<tokio::sync::Notify>,
) -> mpsc::Receiver<Call> {
    let (tx, rx) = mpsc::channel(QUEUE);
    if let Ok(a) = listener.local_addr() {
        info!("admin API and /metrics on http://{a}");
    }
    let slots = Arc::new(Slots::new());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.notified() => return,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    warn!("admin API: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some((id, slot)) = slots.admit() else {
                debug!("admin API: {peer}: every connection busy, 503");
                let _ = stream.try_write(FULL);
                continue;
            };
            let (tx, published, slots) = (tx.clone(), published.clone(), slots.clone());
            tokio::spawn(async move {
                let service = {
                    let (slots, slot) = (slots.clone(), slot.clone());
                    service_fn(move |req| {
                        let (tx, published) = (tx.clone(), published.clone());
                        let (slots, slot) = (slots.clone(), slot.clone());
                        async move {
                            slots.touch(&slot);
                            let r = answer(tx, published, &slots, &slot, req).await;
                            slots.touch(&slot);
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    })
                };
                let mut b = http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD);
                let conn = b.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        r = &mut conn => {
                            if let Err(e) = r {
                                debug!("admin API: {peer}: {e}");
                            }
                            break;
                        }
                        _ = slot.close.notified() => {
                            debug!("admin API: {peer}: closed to make room for a new connection");
                            break;
                        }
                        _ = tick.tick() => {
                            if slots.stalled(&slot).is_some_and(|d| d > STALL_TIMEOUT) {
                                debug!("admin API: {peer}: no progress in {STALL_TIMEOUT:?}, closed");
                                break;
                            }
                        }
                    }
                }
                slots.release(id);
            });
        }
    });
    rx
}

/// A path segment with its `%XX` escapes decoded (`[`, `]` and `:` of an IPv6 `{port}` may
/// come escaped); malformed escapes and non-UTF-8 results are refused.
fn segment(s: &str) -> Result<String, Reply> {
    let bad = || Reply::error(StatusCode::BAD_REQUEST, &format!("bad escape in '{s}'"));
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Routes one request: which operation, or the error for a path or method that has none.
fn route(method: &Method, path: &str) -> Result<Route, Reply> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let not_allowed = || {
        Reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        )
    };
    let get = |r: Route| {
        if method == Method::GET {
            Ok(r)
        } else {
            Err(not_allowed())
        }
    };
    let write = |write: WriteOp| {
        Route::Loop(Op::Write {
            write,
            body: Bytes::new(),
        })
    };
    match segs.as_slice() {
        [] => get(Route::Page),
        ["metrics"] => get(Route::Loop(Op::Metrics)),
        ["v1", "history"] => get(Route::Loop(Op::History)),
        ["v1", "status"] => get(Route::Loop(Op::Status)),
        ["v1", "stats"] => get(Route::Loop(Op::Stats)),
        ["v1", "ready"] => get(Route::Loop(Op::Ready)),
        ["v1", "fleet", "drain"] => match *method {
            Method::POST => Ok(Route::Loop(Op::Drain(true))),
            Method::DELETE => Ok(Route::Loop(Op::Drain(false))),
            _ => Err(not_allowed()),
        },
        ["v1", "ports"] => get(Route::Ports),
        ["v1", "ports", port] => {
            let port = segment(port)?;
            match *method {
                Method::GET => Ok(Route::Port(port)),
                Method::PUT => Ok(write(WriteOp::Rebuild(port))),
                _ => Err(not_allowed()),
            }
        }
        ["v1", "ports", port, "nodes"] => {
            let port = segment(port)?;
            match *method {
                Method::POST => Ok(write(WriteOp::Add(port))),
                _ => Err(not_allowed()),
            }
        }
        ["v1", "ports", port, "nodes", label] => {
            let port = segment(port)?;
            let label = segment(label)?;
            match *method {
                Method::PUT => Ok(write(WriteOp::Set(port, label))),
                Method::DELETE => Ok(write(WriteOp::Remove(port, label))),
                _ => Err(not_allowed()),
            }
        }
        _ => Err(Reply::error(
            StatusCode::NOT_FOUND,
            &format!("no such resource: {path}"),
        )),
    }
}

/// Answers one HTTP request: routes it, checks its token (before any body is read), reads
/// its body (within [`BODY_TIMEOUT`]), and answers from what the loop published or waits
/// for the agent loop.
async fn answer(
    tx: mpsc::Sender<Call>,
    published: watch::Receiver<Arc<Published>>,
    slots: &Slots,
    slot: &Slot,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let reply = async {
        let route = route(req.method(), req.uri().path())?;
        let now = published.borrow().clone();
        let admin = &now.config.admin;
        let authorization = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let mut op = match route {
            Route::Page => {
                return Ok(Reply {
                    status: StatusCode::OK,
                    content_type: "text/html; charset=utf-8",
                    body: PAGE.to_string(),
                    close: false,
                    snapshot_age: None,
                });
            }
            Route::Ports => {
                let reveal = authorize_read(admin, authorization)?;
                let ports: Vec<Value> = now
                    .config
                    .ports
                    .iter()
                    .map(|p| port_json(p, reveal))
                    .collect();
                return Ok(Reply::json(StatusCode::OK, &json!({ "ports": ports })));
            }
            Route::Port(port) => {
                let reveal = authorize_read(admin, authorization)?;
                return Ok(match find_port(&now.config, &now.public, &port) {
                    Ok(p) => Reply::json(StatusCode::OK, &port_json(p, reveal)),
                    Err(r) => r.into(),
                });
            }
            Route::Loop(op) => op,
        };
        if let Op::Drain(_) = op {
            authorize_write(admin, authorization).map_err(|r| Reply::from(r).closing())?;
        } else if let Op::Write { body, .. } = &mut op {
            // A refusal here leaves the body unread, so the connection cannot be reused.
            authorize_write(admin, authorization).map_err(|r| Reply::from(r).closing())?;
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_BODY as u64) {
                return Err(Reply::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!("request body over {MAX_BODY} bytes"),
                )
                .closing());
            }
            let read = Limited::new(req.into_body(), MAX_BODY).collect();
            *body = tokio::time::timeout(BODY_TIMEOUT, read)
                .await
                .map_err(|_| {
                    Reply::error(
                        StatusCode::REQUEST_TIMEOUT,
                        &format!("request body not received within {BODY_TIMEOUT:?}"),
                    )
                    .closing()
                })?
                .map_err(|e| {
                    Reply::error(StatusCode::BAD_REQUEST, &format!("request body: {e}")).closing()
                })?
                .to_bytes();
        } else {
            authorize_read(admin, authorization)?;
        }
        let kind = match op {
            Op::Status => Some(true),
            // A loop that does not answer in time is a balancer not to send traffic to.
            Op::Stats | Op::Metrics | Op::Ready | Op::History => Some(false),
            Op::Write { .. } | Op::Drain(_) => None,
        };
        let _busy = slots.busy(slot);
        let (reply_tx, reply_rx) = oneshot::channel();
        let gone = || Reply::error(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping");
        let ask = async {
            tx.send(Call {
                op,
                reply: reply_tx,
            })
            .await
            .map_err(|_| gone())?;
            reply_rx.await.map_err(|_| gone())
        };
        match kind {
            // A write waits for its outcome: given up on, it might still be applied.
            None => ask.await,
            // The live counters when the loop answers at once; else what it last published.
            Some(true) => match tokio::time::timeout(LOOP_DEADLINE, ask).await {
                Ok(r) => r,
                Err(_) => {
                    let now = published.borrow().clone();
                    let mut r = Reply::json(StatusCode::OK, &now.status);
                    r.snapshot_age = Some(now.at.elapsed());
                    Ok(r)
                }
            },
            // Bounded, so a stuck loop cannot pin every connection slot as busy.
            Some(false) => tokio::time::timeout(READ_DEADLINE, ask)
                .await
                .unwrap_or_else(|_| {
                    Err(Reply::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!("the agent did not answer within {READ_DEADLINE:?}"),
                    ))
                }),
        }
    }
    .await
    .unwrap_or_else(|r: Reply| r);
    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(reply.content_type),
    );
    if reply.close {
        h.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    if let Some(age) = reply.snapshot_age {
        h.insert(
            "x-nb-snapshot-age-ms",
            header::HeaderValue::from(age.as_millis() as u64),
        );
    }
    resp
}

/// What the API needs of the running agent: what runs, read as a whole, and the one way to
/// change it. The API keeps no reference into the agent's state between calls.
pub trait Running {
    type Error: std::fmt::Display + From<ApiError> + From<config::LoadError>;
    /// The config that runs (the file with the API's changes over it).
    fn config(&self) -> &Config;
    /// The addresses ports without their own listen on.
    fn public(&self) -> &[std::net::IpAddr];
    /// Every node's health and counters, read now.
    fn nodes(&self) -> Vec<NodeSample>;
    /// The XDP program's packet counters by verdict, read now (empty without XDP).
    fn xdp_packets(&self) -> Vec<(&'static str, u64)>;
    /// What a scrape or `GET /v1/stats` shows: both of the above.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            nodes: self.nodes(),
            xdp: self.xdp_packets(),
            readiness: self.readiness(),
        }
    }
    /// Makes `cfg` the running config, whole or not at all.
    fn apply(&mut self, cfg: Config) -> Result<(), Self::Error>;
    /// Whether the balancer should be sent traffic, and what it announces.
    fn readiness(&self) -> Readiness;
    /// Withdraws every address (`true`, `nbctl fleet drain`) or announces again what is
    /// ready (`false`); the balancer goes on serving what reaches it either way.
    fn set_drained(&mut self, drained: bool);
    /// The status page's samples (`GET /v1/history`); none by default.
    fn history(&self) -> Value {
        json!({ "fine": [], "coarse": [] })
    }
}

/// The status page: plain HTML and a script, nothing fetched from elsewhere.
const PAGE: &str = include_str!("page.html");

/// The API's side of the agent: the file as last read, the overlay, where it is kept, and
/// what the connection tasks see of the running agent.
pub struct Admin {
    base: Config,
    overlay: Overlay,
    state_path: PathBuf,
    published: watch::Sender<Arc<Published>>,
}

impl Admin {
    /// Reads the API's changes from `state_dir` and lays them over `base` (the file): the
    /// config the agent starts with. Changes whose port or node left the file are dropped with
    /// a warning; a result that breaks a rule stops the start, as a bad file does.
    pub fn open(base: Config) -> Result<(Admin, Config), ApiError> {
        let state_path = base.balancer.state_dir.join(STATE_FILE);
        let mut overlay = Overlay::load(&state_path)?;
        overlay.pin_numbers(&base);
        warn_exposed_tokens(&base.admin);
        let (published, _) = watch::channel(Arc::new(Published::new(
            base.clone(),
            Vec::new(),
            json!({ "ports": [] }),
        )));
        let mut admin = Admin {
            base: base.clone(),
            overlay,
            state_path,
            published,
        };
        let cfg = admin.compose(base)?;
        if !admin.overlay.entries.is_empty() {
            info!(
                "{} API change(s) from {} applied over {}",
                admin.overlay.entries.len(),
                admin.state_path.display(),
                cfg.path.display()
            );
        }
        Ok((admin, cfg))
    }

    /// `base` with the overlay, validated; stale changes are dropped (and the record
    /// rewritten) only once the result is known to be good. Sets `self.base` on success.
    fn compose(&mut self, base: Config) -> Result<Config, ApiError> {
        let (cfg, stale) = self.overlay.compose(&base);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ApiError::Composed {
                path: self.state_path.clone(),
                problems,
            });
        }
        self.base = base;
        if !stale.is_empty() {
            for what in self.overlay.drop_stale(&stale) {
                warn!(
                    "API change dropped ({what}): the config file no longer has that port or node"
                );
            }
            if let Err(e) = self.overlay.persist(&self.state_path) {
                warn!("{}: {e}", self.state_path.display());
            }
        }
        Ok(cfg)
    }

    /// What the connection tasks read, for [`serve`].
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.published.subscribe()
    }

    /// Publishes the running config and status for the connection tasks; the loop calls it
    /// after every change of the config and on every sweep (health and counters move).
    pub fn publish(&self, agent: &impl Running) {
        let p = Published::new(
            agent.config().clone(),
            agent.public().to_vec(),
            self.status(agent.config(), &agent.nodes(), &agent.readiness()),
        );
        self.published.send_replace(Arc::new(p));
    }

    /// The SIGHUP reload: the file read again, the API's changes laid over it, the whole
    /// applied by the agent, or (any error) nothing at all.
    pub fn reload<R: Running>(&mut self, agent: &mut R) -> Result<(), R::Error> {
        let base = config::load(&agent.config().path)?;
        warn_exposed_tokens(&base.admin);
        if base.admin != agent.config().admin
            || base.balancer.state_dir != self.base.balancer.state_dir
        {
            warn!(
                "reload: [admin] listen and balancer.state_dir take effect at the next restart \
                 (token_file and read_token_file at once)"
            );
        }
        let (cfg, stale) = self.overlay.compose(&base);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ApiError::Composed {
                path: self.state_path.clone(),
                problems,
            }
            .into());
        }
        agent.apply(cfg)?;
        // Now known good: record the new base and drop the changes that no longer apply.
        if !stale.is_empty() || self.base != base {
            self.compose(base)?;
        }
        Ok(())
    }

    /// Answers one request in the agent loop.
    pub fn handle(&mut self, agent: &mut impl Running, call: Call) {
        let reply = match call.op {
            Op::Status => Reply::json(
                StatusCode::OK,
                &self.status(agent.config(), &agent.nodes(), &agent.readiness()),
            ),
            Op::Stats => Reply::json(StatusCode::OK, &stats_json(&agent.snapshot())),
            Op::History => Reply::json(StatusCode::OK, &agent.history()),
            Op::Metrics => Reply {
                status: StatusCode::OK,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: metrics::render(&agent.snapshot()),
                close: false,
                snapshot_age: None,
            },
            Op::Ready => {
                let r = agent.readiness();
                let status = if r.ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                Reply::json(status, &readiness_json(&r))
            }
            Op::Drain(on) => {
                agent.set_drained(on);
                self.publish(agent);
                info!(
                    "admin API: {}",
                    if on {
                        "fleet drain: every address withdrawn"
                    } else {
                        "fleet drain ended: ready addresses announced again"
                    }
                );
                Reply::json(StatusCode::OK, &readiness_json(&agent.readiness()))
            }
            Op::Write { write, body } => match self.write(agent, write, &body) {
                Ok(r) => {
                    self.publish(agent);
                    r
                }
                Err(r) => {
                    info!("admin API: write refused ({}): {}", r.status, r.message);
                    r.into()
                }
            },
        };
        let _ = call.reply.send(reply);
    }

    /// `/v1/status`: every port of `cfg` with its nodes' health and open connections as
    /// `nodes` (read from the same running agent) has them.
    fn status(&self, cfg: &Config, nodes: &[NodeSample], readiness: &Readiness) -> Value {
        let by_node: HashMap<(&str, &str), &NodeSample> = nodes
            .iter()
            .map(|n| ((n.port.as_str(), n.node.as_str()), n))
            .collect();
        let names = port_names(&cfg.ports);
        let ports: Vec<Value> = cfg
            .ports
            .iter()
            .zip(&names)
            .map(|(p, name)| {
                let nodes: Vec<Value> = p
                    .nodes
                    .iter()
                    .map(|n| {
                        let sample = by_node.get(&(name.as_str(), n.label.as_str()));
                        let health = sample.map(|s| s.health).unwrap_or_default();
                        let active = sample.and_then(|s| s.counters).map(|c| c.active);
                        let mut v = node_json(n);
                        v["status"] = json!(health.as_str());
                        v["active_connections"] = json!(active);
                        v
                    })
                    .collect();
                json!({
                    "port": p.port,
                    "name": name,
                    "addresses": p.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "protocol": p.protocol.as_str(),
                    "algorithm": p.algorithm.as_str(),
                    "nodes": nodes,
                })
            })
            .collect();
        let mut fleet = readiness_json(readiness);
        fleet["name"] = json!(crate::fleet::name(cfg));
        fleet["config_digest"] = json!(config_digest(&cfg.ports));
        json!({ "ports": ports, "fleet": fleet })
    }

    /// One write (authorized by its connection task): parsed and checked by the file's rules,
    /// applied by the agent whole, then recorded. Any failure leaves the agent and the record
    /// as they were.
    fn write(
        &mut self,
        agent: &mut impl Running,
        write: WriteOp,
        body: &[u8],
    ) -> Result<Reply, Refusal> {
        let mut next = self.overlay.clone();
        let running = agent.config();
        let public = agent.public();
        let bad = |m: String| Refusal::new(StatusCode::BAD_REQUEST, m);
        // The port as it runs, and which node the answer shows (none: the whole port).
        let (at, label, what) = match write {
            WriteOp::Add(port) => {
                let p = find_port(running, public, &port)?;
                let node = new_node(body)?;
                let label = node.label.clone();
                next.add(p, node)?;
                (PortKey::of(p), Some(label), "added")
            }
            WriteOp::Set(port, label) => {
                let p = find_port(running, public, &port)?;
                let map = body_object(body, &["weight", "mode"])?;
                let weight = weight_field(&map)?;
                let mode = mode_field(&map)?;
                if weight.is_none() && mode.is_none() {
                    return Err(bad("nothing to change: give weight and/or mode".into()));
                }
                next.set(p, &label, weight, mode)?;
                (PortKey::of(p), Some(label), "changed")
            }
            WriteOp::Remove(port, label) => {
                let p = find_port(running, public, &port)?;
                next.remove(&self.base, p, &label)?;
                (PortKey::of(p), Some(label), "removed")
            }
            WriteOp::Rebuild(port) => {
                let p = find_port(running, public, &port)?;
                let v: Value = serde_json::from_slice(body)
                    .map_err(|e| bad(format!("body is not valid JSON: {e}")))?;
                let rebuilt = body::port_from_json(&v, Some(p)).map_err(bad)?;
                let key = PortKey::of(&rebuilt);
                next.rebuild(p, rebuilt);
                (key, None, "rebuilt")
            }
        };
        let (cfg, _stale) = next.compose(&self.base);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(bad(problems.join("; ")));
        }
        let old = agent.config().clone();
        if let Err(e) = agent.apply(cfg) {
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("not applied: {e}"),
            ));
        }
        if let Err(e) = next.persist(&self.state_path) {
            // Not recorded means not done: put the running config back.
            if let Err(e2) = agent.apply(old) {
                warn!("admin API: restoring the config after a failed write: {e2}");
            }
            return Err(Refusal::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "not applied: recording it in {}: {e}",
                    self.state_path.display()
                ),
            ));
        }
        self.overlay = next;
        let ports = &agent.config().ports;
        let names = port_names(ports);
        let i = ports.iter().position(|p| PortKey::of(p) == at);
        let name = i.map_or_else(|| at.to_string(), |i| names[i].clone());
        let port = i.map(|i| &ports[i]);
        match &label {
            Some(l) => info!("admin API: port {name} node {l} {what}"),
            None => info!("admin API: port {name} {what}"),
        }
        let status = if what == "added" {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        let answer = match (&label, port) {
            (None, Some(p)) => port_json(p, true),
            (Some(l), p) => match p.and_then(|p| p.node(l)) {
                Some(n) => json!({ "port": port_value(&name), "node": node_json(n) }),
                None => json!({ "port": port_value(&name), "removed": l }),
            },
            (None, None) => json!({ "port": port_value(&name) }),
        };
        Ok(Reply::json(status, &answer))
    }
}

/// The body of `GET /v1/ready` and of the drain calls.
fn readiness_json(r: &Readiness) -> Value {
    json!({
        "ready": r.ready(),
        "drained": r.drained,
        "addresses": r.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "announced": r.announced.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "announce_table": r.announce_table,
        "learning": r.learning,
        "flows": { "owned": r.flows_owned, "learned": r.flows_learned },
        "sync": r.sync.as_ref().map(sync_json),
    })
}

/// The flow sync's part of `/v1/status` and `/v1/ready` (README "Flow sync").
fn sync_json(s: &crate::sync::SyncView) -> Value {
    let rejected: serde_json::Map<String, Value> = crate::sync::wire::REASONS
        .iter()
        .zip(s.rejected)
        .map(|(r, n)| (r.reason().to_string(), json!(n)))
        .collect();
    json!({
        "listen": s.listen.map(|a| a.to_string()),
        "synced": s.synced,
        "peers": s.peers.iter().map(|p| json!({
            "address": p.address.to_string(),
            "up": p.up,
            "last_ms": p.last_ms,
            "flows_learned": p.flows_learned,
        })).collect::<Vec<_>>(),
        "messages_sent": s.messages_sent,
        "messages_received": s.messages_received,
        "bytes_sent": s.bytes_sent,
        "flows_sent": s.flows_sent,
        "flows_installed": s.flows_installed,
        "flows_removed": s.flows_removed,
        "flows_unknown": s.flows_unknown,
        "flows_conflict": s.flows_conflict,
        "rejected": rejected,
        "send_errors": s.send_errors,
    })
}

/// Warns of token files others may read (see [`secret_file::warn_if_exposed`]).
fn warn_exposed_tokens(admin: &config::Admin) {
    secret_file::warn_if_exposed(&admin.token_file, "admin token file");
    if let Some(f) = &admin.read_token_file {
        secret_file::warn_if_exposed(f, "read token file");
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::NodeMode;

    fn cfg(text: &str) -> Config {
        config::parse(Path::new("nb.toml"), text).unwrap_or_else(|e| panic!("{e:?}"))
    }

    const FILE: &str = "[balancer]\ninterfaces = [\"eth0\"]\naddresses = [\"198.18.0.10\"]\n\
        [[port]]\nport = 80\nprotocol = \"tcp\"\n\
        [[port.node]]\nlabel = \"a\"\naddress = \"10.0.0.1:80\"\n";

    #[test]
    fn bodies_are_checked_by_the_file_rules() {
        let err = |b: &str| new_node(b.as_bytes()).expect_err(b).message;
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","weight":0}"#)
                .contains("between 1 and 255")
        );
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","weight":300}"#)
                .contains("between 1 and 255")
        );
        assert!(err(r#"{"label":"x y","address":"10.0.0.1:80"}"#).contains("only letters"));
        assert!(err(r#"{"label":"x","address":"10.0.0.1"}"#).contains("not an IP:port"));
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","mode":"off"}"#).contains("unknown mode")
        );
        assert!(
            err(r#"{"label":"x","address":"10.0.0.1:80","colour":1}"#).contains("unknown field")
        );
        assert!(err("{").contains("not valid JSON"));
        let n =
            new_node(br#"{"label":"x","address":"[2001:db8::1]:80","mode":"backup","weight":5}"#)
                .expect("good");
        assert_eq!((n.weight, n.mode), (5, NodeMode::Backup));
    }

    /// A scratch directory with `token` (the admin token `adm1n`) and `read` (`r3ad`).
    fn token_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nb-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("token"), "adm1n\n").expect("token");
        std::fs::write(dir.join("read"), "r3ad\n").expect("read token");
        dir
    }

    fn admin_of(dir: &Path, read: bool) -> config::Admin {
        config::Admin {
            token_file: dir.join("token"),
            read_token_file: read.then(|| dir.join("read")),
            ..config::Admin::default()
        }
    }

    #[test]
    fn tokens_compare_whole() {
        let dir = token_dir("token");
        let mut a = admin_of(&dir, false);
        a.token_file = dir.join("absent");
        let code = |a: &config::Admin, h: Option<&str>| {
            authorize_write(a, h).err().map(|r| (r.status, r.message))
        };
        let (status, message) = code(&a, Some("Bearer adm1n")).expect("no file");
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(message.contains("writes are disabled"), "{message}");
        assert!(
            !message.contains(&dir.display().to_string()),
            "no path: {message}"
        );
        let a = admin_of(&dir, false);
        assert_eq!(code(&a, Some("Bearer adm1n")), None);
        assert_eq!(code(&a, Some("bearer adm1n")), None);
        for bad in ["Bearer adm1", "Bearer adm1nn", "Basic adm1n", "Bearer r3ad"] {
            assert_eq!(
                code(&a, Some(bad)).map(|c| c.0),
                Some(StatusCode::UNAUTHORIZED),
                "{bad}"
            );
        }
        assert_eq!(code(&a, None).map(|c| c.0), Some(StatusCode::UNAUTHORIZED));
        // The read token, once configured, is known but may not write.
        let r = admin_of(&dir, true);
        assert_eq!(
            code(&r, Some("Bearer r3ad")).map(|c| c.0),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(code(&r, Some("Bearer adm1n")), None);
        std::fs::write(&a.token_file, "\n").expect("write");
        assert_eq!(
            code(&a, Some("Bearer ")).map(|c| c.0),
            Some(StatusCode::UNAUTHORIZED),
            "empty file"
        );
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn reads_are_open_without_a_read_token_and_guarded_with_one() {
        let dir = token_dir("read");
        let open = admin_of(&dir, false);
        let guarded = admin_of(&dir, true);
        let read = |a: &config::Admin, h: Option<&str>| authorize_read(a, h).map_err(|r| r.status);
        assert_eq!(read(&open, None), Ok(false), "open, paths hidden");
        assert_eq!(read(&open, Some("Bearer nope")), Ok(false));
        assert_eq!(read(&open, Some("Bearer adm1n")), Ok(true));
        assert_eq!(read(&guarded, None), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(
            read(&guarded, Some("Bearer nope")),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(read(&guarded, Some("Bearer r3ad")), Ok(true));
        assert_eq!(read(&guarded, Some("Bearer adm1n")), Ok(true));
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn the_busy_answer_declares_its_length() {
        let text = std::str::from_utf8(FULL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{text}"
        );
        serde_json::from_str::<Value>(body).expect("JSON");
    }

    // Real sockets: the listener as `serve` runs it, with a loop that never answers (the
    // requests these tests make must not need it, or must get past it).

    /// An https port with certificate and key paths, and `[admin]` pointing at `dir`.
    fn served_config(dir: &Path, read: bool) -> Config {
        let mut c = cfg(&format!(
            "{FILE}[[port]]\nport = 443\nprotocol = \"https\"\n\
             ssl_cert = [\"/etc/nb/secret/a.crt\"]\nssl_key = [\"/etc/nb/secret/a.key\"]\n\
             [[port.node]]\nlabel = \"w\"\naddress = \"10.0.0.5:80\"\n"
        ));
        c.admin = admin_of(dir, read);
        c
    }

    async fn start(cfg: Config) -> (SocketAddr, mpsc::Receiver<Call>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let status = json!({ "ports": [{ "port": 80, "nodes": [] }] });
        let (tx, rx) = watch::channel(Arc::new(Published::new(cfg, Vec::new(), status)));
        let calls = serve(listener, rx);
        // The sender may go: the receivers keep the last value.
        drop(tx);
        (addr, calls)
    }

    /// Sends `head` (and nothing more), reads the answer to its end: status, head, body.
    async fn ask(addr: SocketAddr, head: &str) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("send");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut raw))
            .await
            .unwrap_or_else(|_| panic!("no answer to {head:?}"))
            .expect("read");
        let text = String::from_utf8(raw).expect("utf-8");
        let (h, b) = text.split_once("\r\n\r\n").expect("HTTP answer");
        let status = h
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, h.to_ascii_lowercase(), b.to_string())
    }

    fn get(path: &str, token: Option<&str>) -> String {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n")
    }

    #[tokio::test]
    async fn a_write_without_the_token_is_refused_before_its_body_is_read() {
        let dir = token_dir("body");
        let (addr, mut calls) = start(served_config(&dir, true)).await;
        let post = |auth: &str, len: usize| {
            format!(
                "POST /v1/ports/80/nodes HTTP/1.1\r\nHost: x\r\n{auth}\
                 Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
            )
        };
        // 64 KiB declared, not one byte sent: the answer comes anyway, and closes.
        for auth in ["", "Authorization: Bearer wrong\r\n"] {
            let t0 = Instant::now();
            let (status, head, body) = ask(addr, &post(auth, 65536)).await;
            assert_eq!(status, 401, "{auth:?}: {body}");
            assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
            assert!(head.contains("connection: close"), "{head}");
            assert!(body.contains("\"error\""), "{body}");
        }
        let (status, _, body) = ask(addr, &post("Authorization: Bearer r3ad\r\n", 65536)).await;
        assert_eq!(status, 403, "the read token may not write: {body}");
        // With the admin token: too big is refused by its declared length, unread.
        let admin = "Authorization: Bearer adm1n\r\n";
        let (status, _, body) = ask(addr, &post(admin, MAX_BODY + 1)).await;
        assert_eq!(status, 413, "{body}");
        // A body that never comes ends in 408 after BODY_TIMEOUT.
        let t0 = Instant::now();
        let (status, _, body) = ask(addr, &post(admin, 20)).await;
        assert_eq!(status, 408, "{body}");
        let took = t0.elapsed();
        assert!(
            took >= BODY_TIMEOUT && took < BODY_TIMEOUT + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(calls.try_recv().is_err(), "nothing reached the agent loop");
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    /// A drain takes a balancer out of its fleet: only the admin token may ask for it.
    #[tokio::test]
    async fn a_drain_needs_the_admin_token() {
        let dir = token_dir("drain");
        let (addr, mut calls) = start(served_config(&dir, true)).await;
        for method in ["POST", "DELETE"] {
            for (auth, want) in [
                ("", 401),
                ("Authorization: Bearer wrong\r\n", 401),
                ("Authorization: Bearer r3ad\r\n", 403),
            ] {
                let head = format!(
                    "{method} /v1/fleet/drain HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
                );
                let (status, _, body) = ask(addr, &head).await;
                assert_eq!(status, want, "{method} {auth:?}: {body}");
            }
        }
        assert!(calls.try_recv().is_err(), "nothing reached the agent loop");
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[tokio::test]
    async fn reads_without_a_token_show_no_paths() {
        let dir = token_dir("redact");
        let (addr, _calls) = start(served_config(&dir, false)).await;
        for path in ["/v1/ports", "/v1/ports/443"] {
            for token in [None, Some("wrong")] {
                let (status, _, body) = ask(addr, &get(path, token)).await;
                assert_eq!(status, 200, "{body}");
                assert!(!body.contains("/etc/nb"), "{path} {token:?}: {body}");
                assert!(body.contains(HIDDEN), "{body}");
                assert!(!body.contains(&dir.display().to_string()), "{body}");
            }
            let (status, _, body) = ask(addr, &get(path, Some("adm1n"))).await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("/etc/nb/secret/a.crt"), "{body}");
            assert!(body.contains("/etc/nb/secret/a.key"), "{body}");
        }
        // A write refused for want of a token file does not say where it looked.
        std::fs::remove_file(dir.join("token")).expect("rm");
        let (status, _, body) = ask(
            addr,
            "DELETE /v1/ports/80/nodes/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer adm1n\r\n\r\n",
        )
        .await;
        assert_eq!(status, 401, "{body}");
        assert!(!body.contains(&dir.display().to_string()), "{body}");
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[tokio::test]
    async fn a_read_token_guards_reads_and_status_answers_though_the_loop_is_stuck() {
        let dir = token_dir("guard");
        let (addr, _calls) = start(served_config(&dir, true)).await;
        for path in [
            "/v1/status",
            "/v1/ports",
            "/v1/ports/80",
            "/metrics",
            "/v1/stats",
        ] {
            let (status, _, body) = ask(addr, &get(path, None)).await;
            assert_eq!(status, 401, "{path}: {body}");
        }
        let (status, _, body) = ask(addr, &get("/v1/ports", Some("r3ad"))).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("/etc/nb/secret/a.crt"), "{body}");
        // The loop never answers: status comes from what it published, within the deadline.
        let t0 = Instant::now();
        let (status, head, body) = ask(addr, &get("/v1/status", Some("r3ad"))).await;
        assert_eq!(status, 200, "{body}");
        assert!(t0.elapsed() < LOOP_DEADLINE + Duration::from_millis(500));
        assert!(head.contains("x-nb-snapshot-age-ms"), "{head}");
        assert!(body.contains("\"port\": 80"), "{body}");
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[tokio::test]
    async fn metrics_give_up_on_a_stuck_loop() {
        let dir = token_dir("stuck");
        let (addr, _calls) = start(served_config(&dir, false)).await;
        let t0 = Instant::now();
        let (status, _, body) = ask(addr, &get("/metrics", None)).await;
        assert_eq!(status, 503, "{body}");
        let took = t0.elapsed();
        assert!(took >= READ_DEADLINE && took < READ_DEADLINE + Duration::from_secs(1));
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[tokio::test]
    async fn a_head_over_its_limit_is_refused() {
        let dir = token_dir("head");
        let (addr, _calls) = start(served_config(&dir, false)).await;
        let big = format!(
            "GET /v1/ports HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        let (status, _, _) = ask(addr, &big).await;
        assert_eq!(status, 431);
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[tokio::test]
    async fn idle_connections_cannot_hold_the_listener() {
        use tokio::io::AsyncReadExt;
        let dir = token_dir("cap");
        let (addr, _calls) = start(served_config(&dir, false)).await;
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        // A reader still gets in, at once.
        let t0 = Instant::now();
        let (status, _, body) = ask(addr, &get("/v1/ports", None)).await;
        assert_eq!(status, 200, "{body}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        // No more than MAX_CONNECTIONS stay open; the oldest were closed to make room.
        let mut closed = 0;
        for s in &mut idle {
            let mut b = [0u8; 1];
            match tokio::time::timeout(Duration::from_millis(20), s.read(&mut b)).await {
                Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
                _ => {}
            }
        }
        assert!(closed >= 200 - MAX_CONNECTIONS, "{closed} closed");
        // And the rest time out as idle.
        tokio::time::sleep(HEAD_TIMEOUT + Duration::from_millis(500)).await;
        for s in &mut idle {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await;
            assert!(
                matches!(r, Ok(Ok(0)) | Ok(Err(_))),
                "closed after {HEAD_TIMEOUT:?}"
            );
        }
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn routes() {
        let r = |m: Method, p: &str| route(&m, p).map(|o| format!("{o:?}")).map_err(|r| r.status);
        assert!(r(Method::GET, "/v1/status").is_ok());
        assert!(r(Method::GET, "/metrics").is_ok());
        assert_eq!(r(Method::GET, "/").as_deref(), Ok("Page"));
        assert_eq!(
            r(Method::GET, "/v1/history").as_deref(),
            Ok("Loop(History)")
        );
        assert!(r(Method::POST, "/").is_err());
        // The page loads nothing from anywhere else.
        for outside in ["http://", "https://", "src=", "href=", "@import", "url("] {
            assert!(!PAGE.contains(outside), "{outside} in the page");
        }
        assert_eq!(
            r(Method::POST, "/v1/status"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(r(Method::GET, "/v2/x"), Err(StatusCode::NOT_FOUND));
        assert_eq!(
            r(Method::GET, "/v1/ports/%zz"),
            Err(StatusCode::BAD_REQUEST)
        );
        assert!(
            r(Method::DELETE, "/v1/ports/80/nodes/web1")
                .expect("route")
                .contains("Remove(\"80\", \"web1\")")
        );
        assert!(
            r(Method::PUT, "/v1/ports/%5B2001:db8::1%5D:80")
                .expect("route")
                .contains("Rebuild(\"[2001:db8::1]:80\")")
        );
        assert_eq!(
            r(Method::POST, "/v1/ports/80"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
        assert_eq!(r(Method::GET, "/v1/ready").as_deref(), Ok("Loop(Ready)"));
        assert_eq!(
            r(Method::POST, "/v1/fleet/drain").as_deref(),
            Ok("Loop(Drain(true))")
        );
        assert_eq!(
            r(Method::DELETE, "/v1/fleet/drain").as_deref(),
            Ok("Loop(Drain(false))")
        );
        assert_eq!(
            r(Method::GET, "/v1/fleet/drain"),
            Err(StatusCode::METHOD_NOT_ALLOWED)
        );
    }
}
