//! End to end, http and https ports: the real nb-agent proxying between a client namespace and
//! real HTTP backends (hyper servers started in the backends namespace), driven by curl and by
//! a small raw HTTP/1.1 client written here.
//!
//! What is checked: the headers a backend sees, the spread, cookie and table stickiness
//! (forgery, redispatch when the node dies), 503 when all are down, 502/504 on bad or slow
//! backends, passive checks, HTTP/2 by ALPN, TLS versions and SNI, certificate reloads, 100 MB
//! streams both ways with the agent's memory measured, WebSocket-style Upgrade, slow clients,
//! and the connection limit.

use std::{
    collections::HashMap,
    convert::Infallible,
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use nb_agent::proxy::cookie::CookieKey;
use nb_tests::{
    netns::{Netns, connect_in},
    require_root,
    topo::{
        Agent, LB_PRIVATE6, Topology, VIP, Wiring, agent_bin, backend_v4, backend_v6, vip, vip6,
        wait_log, wait_until,
    },
};

/// Backends listen here.
const BACKEND_PORT: u16 = 8080;

// ---------------------------------------------------------------------------------------
// A real HTTP backend.

type Body = BoxBody<Bytes, Infallible>;

/// The http suite runs with `workers = 1`: a single-threaded serving runtime (the one the L7
/// benchmark measures); the user-space tcp suite keeps the multi-thread default.
fn one_worker(tag: &str, wiring: Wiring, n: u8) -> Topology {
    let mut t = Topology::new(tag, wiring, n);
    t.workers = 1;
    t
}

fn full(s: impl Into<Bytes>) -> Body {
    Full::new(s.into()).boxed()
}

/// An HTTP/1.1 server (hyper) in the backends namespace. Every answer names the backend
/// (`X-Backend` and the first body line). Paths:
/// - `/echo` (and anything else): the request line and headers, one per line;
/// - `/download?n=N`: N bytes, streamed in 64 KiB chunks; `/chunked?n=N` the same without a
///   length (chunked);
/// - `/upload`: reads the body as it comes and answers `bytes=N`;
/// - `/ws`: answers an Upgrade with 101 and then echoes bytes;
/// - `/status/NNN`: that status; `/slow?ms=N`: answers after N ms.
struct HttpBackend {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    accepted: Arc<AtomicUsize>,
}

impl HttpBackend {
    fn start(ns: &Netns, label: &str, addr: SocketAddr) -> HttpBackend {
        let listener = ns
            .enter(move || {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(l)
            })
            .unwrap_or_else(|e| panic!("backend {label} bind {addr}: {e}"));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let label = label.to_string();
        let thread = {
            let (peers, accepted) = (peers.clone(), accepted.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("backend runtime");
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(listener).expect("listener");
                    loop {
                        tokio::select! {
                            _ = &mut rx => break,
                            r = l.accept() => {
                                let Ok((s, peer)) = r else { continue };
                                accepted.fetch_add(1, Ordering::Relaxed);
                                peers.lock().expect("peers").push(peer);
                                let label = label.clone();
                                tokio::spawn(async move {
                                    let svc = service_fn(move |req| answer(label.clone(), req));
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(s), svc)
                                        .with_upgrades()
                                        .await;
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime closes the listener and every open connection.
                rt.shutdown_timeout(Duration::from_millis(100));
            })
        };
        HttpBackend {
            stop: Some(tx),
            thread: Some(thread),
            peers,
            accepted,
        }
    }

    /// Closes the listener and every connection: the backend is gone.
    fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn query_num(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn answer(label: String, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let mut resp = if path == "/download" || path == "/chunked" {
        let n = query_num(&req, "n");
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let exact = path == "/download";
        Response::new(
            GenBody {
                left: n,
                chunk,
                exact,
            }
            .boxed(),
        )
    } else if path == "/stall" {
        // n bytes of a 2n-byte answer, then nothing: a node that stalls mid-body.
        let n = query_num(&req, "n");
        Response::new(
            StallBody {
                first: Some(Bytes::from(vec![b's'; n as usize])),
                len: 2 * n,
            }
            .boxed(),
        )
    } else if path == "/upload" {
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            match f {
                Ok(f) => n += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(_) => break,
            }
        }
        Response::new(full(format!("{label}\nbytes={n}\n")))
    } else if path == "/ws" && req.headers().contains_key("upgrade") {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(full(""));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("upgrade", "websocket".parse().expect("hv"));
        r.headers_mut()
            .insert("connection", "upgrade".parse().expect("hv"));
        r
    } else if let Some(code) = path.strip_prefix("/status/") {
        let mut r = Response::new(full(format!("{label}\nstatus {code}\n")));
        *r.status_mut() = StatusCode::from_u16(code.parse().unwrap_or(500)).expect("status");
        r
    } else {
        if path == "/slow" {
            tokio::time::sleep(Duration::from_millis(query_num(&req, "ms"))).await;
        }
        let mut text = format!(
            "{label}\n{} {} {:?}\n",
            req.method(),
            req.uri(),
            req.version()
        );
        for (k, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        Response::new(full(text))
    };
    resp.headers_mut()
        .insert("x-backend", label.parse().expect("label"));
    Ok(resp)
}

/// The first bytes of an answer of `len`, then nothing, ever.
struct StallBody {
    first: Option<Bytes>,
    len: u64,
}

impl hyper::body::Body for StallBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut().first.take() {
            Some(b) => std::task::Poll::Ready(Some(Ok(Frame::data(b)))),
            None => std::task::Poll::Pending,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len)
    }
}

/// `n` bytes in `chunk`-sized frames, made as the reader asks for them (nothing buffered).
struct GenBody {
    left: u64,
    chunk: Bytes,
    /// Whether the length is told (Content-Length) or not (chunked).
    exact: bool,
}

impl hyper::body::Body for GenBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = this.left.min(this.chunk.len() as u64) as usize;
        this.left -= n as u64;
        std::task::Poll::Ready(Some(Ok(Frame::data(this.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        if self.exact {
            hyper::body::SizeHint::with_exact(self.left)
        } else {
            hyper::body::SizeHint::default()
        }
    }
}

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client (keep-alive under the test's control) and curl.

/// One HTTP response as the client got it.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The backend that answered (`X-Backend`), or "" for an answer made by the balancer.
    fn backend(&self) -> String {
        self.header("x-backend").unwrap_or("").to_string()
    }

    /// The `NB_SRVID` value of a `Set-Cookie`, with the whole header.
    fn srvid(&self) -> Option<(String, String)> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
            .find_map(|(_, v)| {
                let first = v.split(';').next()?;
                let val = first.strip_prefix("NB_SRVID=")?;
                Some((val.to_string(), v.clone()))
            })
    }
}

/// A kept-alive client connection from the client namespace.
struct Client {
    r: BufReader<TcpStream>,
}

impl Client {
    fn connect(t: &Topology, addr: SocketAddr) -> Client {
        let s = connect_in(&t.client, addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        Client {
            r: BufReader::new(s),
        }
    }

    /// Sends a request (Host: example.test unless given) and reads the whole answer.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<Resp> {
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req.push_str("Host: example.test\r\n");
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.r.get_mut().write_all(req.as_bytes())?;
        if method == "HEAD" {
            let (status, headers) = read_head(&mut self.r)?;
            return Ok(Resp {
                status,
                headers,
                body: Vec::new(),
            });
        }
        read_response(&mut self.r)
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request("GET", path, headers)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let status_line = read_line(r)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let l = read_line(r)?;
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

fn read_response(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let (status, headers) = read_head(r)?;
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(n) = resp.header("content-length") {
        let n: usize = n.parse().map_err(std::io::Error::other)?;
        resp.body = vec![0; n];
        r.read_exact(&mut resp.body)?;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let size =
                usize::from_str_radix(read_line(r)?.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; size];
            r.read_exact(&mut chunk)?;
            read_line(r)?;
            if size == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk);
        }
    } else if status != 101 && status != 204 && status != 304 {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// One GET on a new connection.
fn get(t: &Topology, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Resp {
    Client::connect(t, addr).get(path, headers)
}

/// Runs curl in the client namespace; returns its output, panics if it fails.
fn curl(t: &Topology, args: &str) -> String {
    t.client.sh(&format!("curl -sS --max-time 60 {args}"))
}

/// Runs curl in the client namespace; true if it exited 0.
fn curl_ok(t: &Topology, args: &str) -> bool {
    t.client.sh_ok(&format!("curl -sS --max-time 20 {args}"))
}

// ---------------------------------------------------------------------------------------
// Configs, waiting, and the agent's memory.

fn backend_addr(i: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(backend_v4(i)), BACKEND_PORT)
}

fn start_backends(t: &Topology, n: u8) -> Vec<HttpBackend> {
    (1..=n)
        .map(|i| HttpBackend::start(&t.backends, &format!("b{i}"), backend_addr(i)))
        .collect()
}

fn node(i: u8, mode: &str) -> String {
    format!(
        "[[port.node]]\nlabel = \"b{i}\"\naddress = \"{}\"\nmode = \"{mode}\"\n\n",
        backend_addr(i)
    )
}

fn accept_nodes(n: u8) -> String {
    (1..=n).map(|i| node(i, "accept")).collect()
}

/// An http(s) port checked by `GET /echo` every 2 s; `extra` goes into the `[[port]]` table.
fn port_toml(port: u16, protocol: &str, extra: &str, nodes: &str) -> String {
    format!(
        "[[port]]\nport = {port}\nprotocol = \"{protocol}\"\ncheck = \"http\"\n\
         check_interval = 2\ncheck_timeout = 1\ncheck_attempts = 2\ncheck_path = \"/echo\"\n\
         {extra}\n\n{nodes}"
    )
}

fn wait_up(agent: &Agent, port: u16, labels: &[&str]) {
    for l in labels {
        wait_log(
            agent,
            &format!("port {port} node {l} is UP"),
            1,
            Duration::from_secs(8),
        );
    }
}

fn reload(agent: &Agent, outcome: &str, count: usize) {
    agent.signal(libc::SIGHUP);
    wait_log(agent, outcome, count, Duration::from_secs(5));
}

/// The agent's resident memory in KiB.
fn rss_kib(agent: &Agent) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Samples the agent's RSS every 20 ms while `f` runs; returns f's result and the peak.
fn peak_rss_during<R>(agent: &Agent, f: impl FnOnce() -> R) -> (R, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let pid = agent.pid();
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    && let Some(kb) = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse::<u64>().ok())
                {
                    peak = peak.max(kb);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let r = f();
    stop.store(true, Ordering::Relaxed);
    (r, sampler.join().expect("sampler"))
}

/// Writes a self-signed certificate and key for `name` into `dir`.
fn make_cert(dir: &Path, name: &str, tag: &str) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("rcgen");
    let cert = dir.join(format!("{name}{tag}.crt"));
    let key = dir.join(format!("{name}{tag}.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key");
    (cert, key)
}

// ---------------------------------------------------------------------------------------
// The tests.

/// Headers as the backend sees them, the round-robin spread over one kept-alive client
/// connection, kept-alive backend connections from the private address, IPv6, a reload that
/// drops no connection, and 503 once every node is gone.
#[test]
fn http_headers_spread_keepalive_reload_and_503() {
    require_root();
    let t = one_worker("h1", Wiring::TwoNic, 3);
    let mut backends = start_backends(&t, 3);
    let cfg = t.write_config(&port_toml(80, "http", "", &accept_nodes(3)));
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1", "b2", "b3"]);

    let mut c = Client::connect(&t, vip(80));
    let r = c.get(
        "/echo?x=1",
        &[
            ("Host", "shop.example.test:80"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "secret"),
            ("Keep-Alive", "timeout=5"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    let seen = r.text();
    println!("backend saw:\n{seen}");
    assert!(seen.contains("GET /echo?x=1 HTTP/1.1"), "{seen}");
    assert!(
        seen.contains("host: shop.example.test:80\n"),
        "Host untouched: {seen}"
    );
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 198.18.0.2\n"),
        "XFF appended: {seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-port: 80\n"), "{seen}");
    assert!(
        !seen.contains("x-hop"),
        "Connection-named header removed: {seen}"
    );
    assert!(!seen.contains("keep-alive"), "hop-by-hop removed: {seen}");

    // On the same client connection: a HEAD answer (a length, no body) and a chunked one
    // keep its framing, and the request after them is answered.
    let r = c.request("HEAD", "/echo", &[]).expect("HEAD");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-length").is_some(), "{r:?}");
    let r = c.get("/chunked?n=200000", &[]);
    assert_eq!((r.status, r.body.len()), (200, 200_000));
    assert_eq!(
        r.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        r.headers
    );
    assert_eq!(c.get("/echo", &[]).status, 200);

    // Round robin over one kept-alive client connection: every request is balanced.
    let before: usize = backends.iter().map(|b| b.connections()).sum();
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..60 {
        let r = c.get("/echo", &[]);
        assert_eq!(r.status, 200);
        *count.entry(r.backend()).or_default() += 1;
    }
    let after: usize = backends.iter().map(|b| b.connections()).sum();
    println!(
        "spread of 60 requests: {count:?}; new backend connections: {}",
        after - before
    );
    for l in ["b1", "b2", "b3"] {
        assert_eq!(count.get(l), Some(&20), "even spread: {count:?}");
    }
    // Backend connections are kept alive: far fewer than requests (health checks add a few).
    assert!(
        after - before < 15,
        "{} new backend connections for 60 requests",
        after - before
    );
    for b in &backends {
        for p in b.peers() {
            assert_eq!(
                p.ip(),
                IpAddr::from([198, 19, 0, 1]),
                "from the private address"
            );
        }
    }

    // IPv6 public address.
    let r = get(&t, vip6(80), "/echo", &[]);
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("x-forwarded-for: 2001:db8:1::2\n"),
        "{}",
        r.text()
    );
    // curl, too.
    let out = curl(&t, &format!("http://{VIP}/echo -H 'Host: c.test'"));
    assert!(out.contains("host: c.test\n"), "{out}");

    // A reload (b1's weight changes, a port is added) drops no open connection.
    let text = std::fs::read_to_string(&cfg).expect("cfg");
    let text = text.replacen("mode = \"accept\"", "mode = \"accept\"\nweight = 200", 1)
        + &port_toml(8081, "http", "", &accept_nodes(1));
    std::fs::write(&cfg, text).expect("rewrite");
    reload(&agent, "reloaded", 1);
    for _ in 0..6 {
        assert_eq!(
            c.get("/echo", &[]).status,
            200,
            "kept connection after reload"
        );
    }
    wait_up(&agent, 8081, &["b1"]);
    let r = get(&t, SocketAddr::new(IpAddr::V4(VIP), 8081), "/echo", &[]);
    assert_eq!((r.status, r.backend().as_str()), (200, "b1"));
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..40 {
        *count.entry(c.get("/echo", &[]).backend()).or_default() += 1;
    }
    let b1 = count.get("b1").copied().unwrap_or(0);
    assert!((19..=21).contains(&b1), "weight 200 of 400: {count:?}");

    // Every node gone: a short plain 503 at once (connects are refused), then also once the
    // checks have marked them DOWN.
    for b in &mut backends {
        b.stop();
    }
    let r = get(&t, vip(80), "/echo", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain")
    );
    assert!(r.text().contains("503 Service Unavailable"), "{}", r.text());
    for l in ["b1", "b2", "b3"] {
        wait_log(
            &agent,
            &format!("port 80 node {l} is DOWN"),
            1,
            Duration::from_secs(8),
        );
    }
    let r = get(&t, vip(80), "/echo", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.len() < 200, "short page");
}

/// Cookie stickiness: set with the right attributes and signed under the secret in state_dir,
/// holds for 100 requests, hidden from backends; a forged cookie is ignored (and replaced);
/// drain keeps sticky clients only; a dead sticky node sends its clients elsewhere with a new
/// cookie.
/// IPv6 backends behind an http port: health checks over IPv6, requests from IPv4 and IPv6
/// clients spread over them, the backends see the balancer's private IPv6 address, and the
/// client's address arrives in X-Forwarded-For.
#[test]
fn ipv6_backends_behind_an_http_port() {
    require_root();
    let t = one_worker("hv", Wiring::TwoNic, 2);
    let backends: Vec<HttpBackend> = (1..=2u8)
        .map(|i| {
            let addr = SocketAddr::new(IpAddr::V6(backend_v6(i)), BACKEND_PORT);
            HttpBackend::start(&t.backends, &format!("b{i}"), addr)
        })
        .collect();
    let nodes: String = (1..=2u8)
        .map(|i| {
            format!(
                "[[port.node]]\nlabel = \"b{i}\"\naddress = \"[{}]:{BACKEND_PORT}\"\n\n",
                backend_v6(i)
            )
        })
        .collect();
    let cfg = t.write_config(&port_toml(80, "http", "", &nodes));
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1", "b2"]);
    let mut count: HashMap<String, usize> = HashMap::new();
    for (i, addr) in [vip(80), vip6(80)].into_iter().cycle().take(20).enumerate() {
        let r = get(&t, addr, "/echo", &[]);
        assert_eq!(r.status, 200, "request {i} to {addr}: {}", r.text());
        let client = if addr.is_ipv6() {
            "2001:db8:1::2"
        } else {
            "198.18.0.2"
        };
        assert!(
            r.text().contains(&format!("x-forwarded-for: {client}\n")),
            "{}",
            r.text()
        );
        *count.entry(r.backend()).or_default() += 1;
    }
    assert_eq!(count.get("b1"), Some(&10), "spread: {count:?}");
    assert_eq!(count.get("b2"), Some(&10), "spread: {count:?}");
    for b in &backends {
        let peers = b.peers();
        assert!(!peers.is_empty(), "checks and requests reached the backend");
        for p in peers {
            assert_eq!(p.ip(), IpAddr::V6(LB_PRIVATE6), "from the private address");
        }
    }
}

#[test]
fn cookie_stickiness_forgery_drain_and_redispatch() {
    require_root();
    let t = one_worker("h2", Wiring::TwoNic, 3);
    let mut backends = start_backends(&t, 3);
    let cfg = t.write_config(&port_toml(
        80,
        "http",
        "stickiness = \"http_cookie\"",
        &accept_nodes(3),
    ));
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1", "b2", "b3"]);

    let key_path = t.dir.join("state").join("stickiness.key");
    let meta = std::fs::metadata(&key_path).expect("secret created in state_dir");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let key: [u8; 32] = std::fs::read(&key_path)
        .expect("read secret")
        .try_into()
        .expect("32 bytes");
    let key = CookieKey::from_bytes(key);

    let first = get(&t, vip(80), "/echo", &[("Cookie", "a=1")]);
    let sticky = first.backend();
    let (value, header) = first.srvid().expect("Set-Cookie NB_SRVID");
    println!("Set-Cookie: {header}");
    for attr in ["Path=/", "HttpOnly", "SameSite=Lax"] {
        assert!(header.contains(attr), "{attr} in {header}");
    }
    assert!(!header.contains("Secure"), "no Secure on http: {header}");
    assert_eq!(
        key.verify(80, &value),
        Some(sticky.as_str()),
        "signed with the secret"
    );

    let cookie = format!("a=1; NB_SRVID={value}");
    let mut c = Client::connect(&t, vip(80));
    for i in 0..100 {
        let r = c.get("/echo", &[("Cookie", &cookie)]);
        assert_eq!(r.backend(), sticky, "request {i} left the sticky node");
        assert!(r.srvid().is_none(), "no new cookie while it holds");
        assert!(
            r.text().contains("cookie: a=1\n"),
            "backend sees its cookies only: {}",
            r.text()
        );
    }

    // Forged: another node's label with this MAC, and garbage. Balanced normally, re-set.
    let other = if sticky == "b1" { "b2" } else { "b1" };
    let forged = value.replacen(&sticky, other, 1);
    let mut went = HashMap::<String, usize>::new();
    for v in [
        forged.as_str(),
        "garbage",
        "b1.00000000000000000000000000000000",
    ] {
        for _ in 0..6 {
            let r = get(
                &t,
                vip(80),
                "/echo",
                &[("Cookie", &format!("NB_SRVID={v}"))],
            );
            assert_eq!(r.status, 200, "a bad cookie is never an error");
            let (nv, _) = r.srvid().expect("a bad cookie is replaced");
            assert_eq!(key.verify(80, &nv), Some(r.backend().as_str()));
            *went.entry(r.backend()).or_default() += 1;
        }
    }
    assert_eq!(went.len(), 3, "forged cookies steer nothing: {went:?}");

    // Drain the sticky node: its sticky client stays, new clients never go there.
    let text = std::fs::read_to_string(&cfg).expect("cfg");
    let drained = text.replacen(
        &format!(
            "label = \"{sticky}\"\naddress = \"{}\"\nmode = \"accept\"",
            backend_addr(sticky[1..].parse().unwrap())
        ),
        &format!(
            "label = \"{sticky}\"\naddress = \"{}\"\nmode = \"drain\"",
            backend_addr(sticky[1..].parse().unwrap())
        ),
        1,
    );
    assert_ne!(drained, text);
    std::fs::write(&cfg, drained).expect("rewrite");
    reload(&agent, "reloaded", 1);
    for _ in 0..20 {
        assert_eq!(
            c.get("/echo", &[("Cookie", &cookie)]).backend(),
            sticky,
            "drain keeps sticky"
        );
        let fresh = get(&t, vip(80), "/echo", &[]);
        assert_ne!(fresh.backend(), sticky, "drain takes no new client");
    }
    std::fs::write(&cfg, text).expect("restore");
    reload(&agent, "reloaded", 2);

    // The sticky node dies: at once (its connect is refused) its clients go elsewhere and get
    // a new cookie, which then holds.
    let i: usize = sticky[1..].parse().unwrap();
    backends[i - 1].stop();
    let r = get(&t, vip(80), "/echo", &[("Cookie", &cookie)]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_ne!(r.backend(), sticky);
    let (nv, _) = r.srvid().expect("cookie re-set after redispatch");
    assert_eq!(key.verify(80, &nv), Some(r.backend().as_str()));
    let moved = r.backend();
    let new_cookie = format!("NB_SRVID={nv}");
    for _ in 0..20 {
        let r = c.get("/echo", &[("Cookie", &new_cookie)]);
        assert_eq!(r.backend(), moved);
    }
    // Also after the checks marked it DOWN.
    wait_log(
        &agent,
        &format!("port 80 node {sticky} is DOWN"),
        1,
        Duration::from_secs(8),
    );
    let r = get(&t, vip(80), "/echo", &[("Cookie", &cookie)]);
    assert_ne!(r.backend(), sticky);
    assert!(r.srvid().is_some());
}

/// `stickiness = "table"`: a client address keeps its node on new connections;
/// `algorithm = "source"` does the same without state; leastconn spreads an idle port; a
/// `backup` node takes traffic only once the `accept` node is DOWN.
#[test]
fn table_source_leastconn_and_backup() {
    require_root();
    let t = one_worker("h3", Wiring::TwoNic, 3);
    let mut backends = start_backends(&t, 3);
    let cfg = t.write_config(
        &(port_toml(80, "http", "stickiness = \"table\"", &accept_nodes(3))
            + &port_toml(81, "http", "algorithm = \"source\"", &accept_nodes(3))
            + &port_toml(82, "http", "algorithm = \"leastconn\"", &accept_nodes(3))
            + &port_toml(83, "http", "", &(node(1, "accept") + &node(2, "backup")))),
    );
    let agent = Agent::start(&t, &cfg);
    for p in [80, 81, 82] {
        wait_up(&agent, p, &["b1", "b2", "b3"]);
    }
    for p in [80, 81] {
        let addr = SocketAddr::new(IpAddr::V4(VIP), p);
        let first = get(&t, addr, "/echo", &[]).backend();
        for _ in 0..20 {
            assert_eq!(get(&t, addr, "/echo", &[]).backend(), first, "port {p}");
        }
    }
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..30 {
        *seen
            .entry(get(&t, SocketAddr::new(IpAddr::V4(VIP), 82), "/echo", &[]).backend())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "leastconn spreads: {seen:?}");

    let p83 = SocketAddr::new(IpAddr::V4(VIP), 83);
    wait_up(&agent, 83, &["b1", "b2"]);
    for _ in 0..10 {
        assert_eq!(get(&t, p83, "/echo", &[]).backend(), "b1", "backup idle");
    }
    backends[0].stop();
    wait_log(&agent, "port 83 node b1 is DOWN", 1, Duration::from_secs(8));
    for _ in 0..10 {
        assert_eq!(
            get(&t, p83, "/echo", &[]).backend(),
            "b2",
            "backup took over"
        );
    }
}

/// https: HTTP/2 by ALPN and HTTP/1.1, the certificate chosen by SNI, TLS 1.1 refused and 1.2
/// and 1.3 served, `Secure` cookies, certificates reloaded by SIGHUP, and a reload with a key
/// that does not match its certificate refused while the old certificate keeps serving.
#[test]
fn https_h2_sni_tls_versions_and_cert_reload() {
    require_root();
    let t = one_worker("h4", Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let (a_crt, a_key) = make_cert(&t.dir, "a.test", "");
    let (b_crt, b_key) = make_cert(&t.dir, "b.test", "");
    let extra = format!(
        "stickiness = \"http_cookie\"\nssl_cert = [\"{}\", \"{}\"]\nssl_key = [\"{}\", \"{}\"]",
        a_crt.display(),
        b_crt.display(),
        a_key.display(),
        b_key.display()
    );
    let cfg = t.write_config(&port_toml(443, "https", &extra, &accept_nodes(2)));
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 443, &["b1", "b2"]);
    let resolve = format!("--resolve a.test:443:{VIP} --resolve b.test:443:{VIP}");
    let ca = |p: &Path| format!("--cacert {}", p.display());

    let out = curl(
        &t,
        &format!(
            "{resolve} {} --http2 -D - https://a.test/echo -w '\\nversion=%{{http_version}}'",
            ca(&a_crt)
        ),
    );
    println!("{out}");
    assert!(out.contains("version=2"), "HTTP/2 by ALPN: {out}");
    assert!(out.contains("x-forwarded-proto: https\n"), "{out}");
    assert!(out.contains("x-forwarded-port: 443\n"), "{out}");
    assert!(
        out.contains("host: a.test\n"),
        "Host from :authority: {out}"
    );
    assert!(
        out.contains("GET /echo HTTP/1.1"),
        "HTTP/1.1 to the backend: {out}"
    );
    let cookie_line = out
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie: nb_srvid="))
        .unwrap_or_else(|| panic!("cookie: {out}"));
    assert!(
        cookie_line.contains("Secure"),
        "Secure on https: {cookie_line}"
    );

    let out = curl(
        &t,
        &format!(
            "{resolve} {} --http1.1 https://a.test/echo -w '\\nversion=%{{http_version}}'",
            ca(&a_crt)
        ),
    );
    assert!(out.contains("version=1.1"), "{out}");
    // SNI: b.test gets b's certificate (it verifies against b's alone), a.test a's.
    assert!(curl_ok(
        &t,
        &format!("{resolve} {} https://b.test/echo", ca(&b_crt))
    ));
    // Protocol versions.
    assert!(
        !curl_ok(
            &t,
            &format!(
                "{resolve} {} --tlsv1.1 --tls-max 1.1 --ciphers 'DEFAULT@SECLEVEL=0' https://a.test/echo",
                ca(&a_crt)
            )
        ),
        "TLS 1.1 refused (by the balancer: the client here allows it)"
    );
    assert!(
        !curl_ok(
            &t,
            &format!(
                "{resolve} {} --tls-max 1.2 --ciphers AES128-GCM-SHA256 https://a.test/echo",
                ca(&a_crt)
            )
        ),
        "TLS 1.2 without ECDHE refused"
    );
    assert!(curl_ok(
        &t,
        &format!(
            "{resolve} {} --tlsv1.2 --tls-max 1.2 https://a.test/echo",
            ca(&a_crt)
        )
    ));
    assert!(curl_ok(
        &t,
        &format!("{resolve} {} --tlsv1.3 https://a.test/echo", ca(&a_crt))
    ));

    // A renewed certificate in the same files, then SIGHUP.
    let old_crt = t.dir.join("a.test-old.crt");
    std::fs::copy(&a_crt, &old_crt).expect("copy");
    let (n_crt, n_key) = make_cert(&t.dir, "a.test", "-new");
    std::fs::copy(&n_crt, &a_crt).expect("copy");
    std::fs::copy(&n_key, &a_key).expect("copy");
    let served_by = |ca_file: &Path| {
        curl_ok(
            &t,
            &format!(
                "{resolve} --cacert {} https://a.test/echo",
                ca_file.display()
            ),
        )
    };
    assert!(!served_by(&n_crt), "not before the reload");
    assert!(served_by(&old_crt));
    reload(&agent, "reloaded", 1);
    assert!(served_by(&n_crt), "new cert served after SIGHUP");
    assert!(!served_by(&old_crt), "old cert gone");

    // A key that does not match: the reload is refused with the reason, the old cert serves.
    std::fs::copy(&b_key, &a_key).expect("copy");
    reload(&agent, "reload refused", 1);
    assert!(
        agent.log_text().contains("does not match the certificate"),
        "{}",
        agent.log_text()
    );
    assert!(
        curl_ok(&t, &format!("{resolve} {} https://a.test/echo", ca(&n_crt))),
        "still served"
    );
}

/// A start with a missing certificate file or an encrypted key fails with a clear message.
#[test]
fn start_refuses_missing_and_encrypted_tls_files() {
    require_root();
    let t = one_worker("h5", Wiring::TwoNic, 1);
    let (crt, key) = make_cert(&t.dir, "a.test", "");
    let enc = t.dir.join("enc.key");
    t.lb.sh(&format!(
        "openssl pkcs8 -topk8 -in {} -passout pass:secret -out {}",
        key.display(),
        enc.display()
    ));
    let missing = t.dir.join("missing.crt");
    for (cert, key, expect) in [
        (&missing, &key, format!("{}", missing.display())),
        (&crt, &enc, "encrypted".to_string()),
    ] {
        let extra = format!(
            "ssl_cert = \"{}\"\nssl_key = \"{}\"",
            cert.display(),
            key.display()
        );
        let text =
            t.balancer_toml()
                .replacen("[balancer]\n", "[balancer]\nxdp_mode = \"off\"\n", 1)
                + &port_toml(443, "https", &extra, &accept_nodes(1));
        let path = t.dir.join("bad.toml");
        std::fs::write(&path, text).expect("write");
        let out =
            t.lb.command(agent_bin())
                .args(["run", "--config"])
                .arg(&path)
                .output()
                .expect("run agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "must not start: {err}");
        assert!(err.contains(&expect), "{expect:?} in:\n{err}");
        println!("refused as expected: {}", err.lines().last().unwrap_or(""));
    }
}

/// 100 MB down and 100 MB up through the proxy (http, and https with HTTP/2; down also with
/// HTTP/1.1 over TLS) stream through without the agent's memory growing by more than a few MB.
#[test]
fn large_streams_keep_memory_flat() {
    require_root();
    const SIZE: u64 = 100 * 1024 * 1024;
    const MAX_GROWTH_KIB: u64 = 8 * 1024;
    let t = one_worker("h6", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let (crt, key) = make_cert(&t.dir, "a.test", "");
    let extra = format!(
        "ssl_cert = \"{}\"\nssl_key = \"{}\"",
        crt.display(),
        key.display()
    );
    let cfg = t.write_config(
        &(port_toml(80, "http", "", &accept_nodes(1))
            + &port_toml(443, "https", &extra, &accept_nodes(1))),
    );
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    wait_up(&agent, 443, &["b1"]);
    // Warm up both paths (TLS, pools, buffers), then take the baseline.
    assert_eq!(
        get(&t, vip(80), "/download?n=1000000", &[]).body.len(),
        1_000_000
    );
    let tls = format!("--resolve a.test:443:{VIP} --cacert {}", crt.display());
    curl(
        &t,
        &format!("{tls} --http2 -o /dev/null https://a.test/download?n=1000000"),
    );
    let base = rss_kib(&agent);
    let cases = [
        (
            "http download",
            format!("-o /dev/null -w '%{{size_download}}' 'http://{VIP}/download?n={SIZE}'"),
        ),
        ("http upload", format!("-T - http://{VIP}/upload")),
        (
            "https h2 download",
            format!(
                "{tls} --http2 -o /dev/null -w '%{{size_download}}' 'https://a.test/download?n={SIZE}'"
            ),
        ),
        (
            "https h2 upload",
            format!("{tls} --http2 -T - https://a.test/upload"),
        ),
        (
            "https HTTP/1.1 download",
            format!(
                "{tls} --http1.1 -o /dev/null -w '%{{size_download}}' 'https://a.test/download?n={SIZE}'"
            ),
        ),
    ];
    for (what, args) in cases {
        let cmd = if what.ends_with("upload") {
            format!("head -c {SIZE} /dev/zero | curl -sS --max-time 120 {args}")
        } else {
            format!("curl -sS --max-time 120 {args}")
        };
        let started = Instant::now();
        let (out, peak) = peak_rss_during(&agent, || t.client.sh(&cmd));
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{what}: {SIZE} bytes in {secs:.2} s ({:.0} MB/s); agent RSS {base} KiB before, peak {peak} KiB (+{} KiB)",
            SIZE as f64 / secs / 1e6,
            peak.saturating_sub(base)
        );
        if what.ends_with("upload") {
            assert!(out.contains(&format!("bytes={SIZE}")), "{what}: {out}");
        } else {
            assert_eq!(out.trim(), SIZE.to_string(), "{what}");
        }
        assert!(
            peak.saturating_sub(base) < MAX_GROWTH_KIB,
            "{what}: RSS grew {} KiB (from {base} to {peak})",
            peak - base
        );
    }
}

/// Upgrade (WebSocket-style) passes through as a byte tunnel; a client that sends its header
/// too slowly is answered 408 and cut off at timeout_header, one that sits idle is closed
/// silently; the connection limit answers 503.
#[test]
fn upgrade_slow_client_and_connection_limit() {
    require_root();
    let t = one_worker("h7", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let cfg = t.write_config(
        &(port_toml(80, "http", "timeout_header = 2", &accept_nodes(1))
            + &port_toml(81, "http", "max_connections = 2", &accept_nodes(1))),
    );
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    wait_up(&agent, 81, &["b1"]);

    // Upgrade: 101 through, then bytes both ways.
    let s = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .expect("write");
    let (status, headers) = read_head(&mut r).expect("101");
    assert_eq!(status, 101, "{headers:?}");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("upgrade") && v == "websocket"),
        "{headers:?}"
    );
    for msg in [&b"hello through nb"[..], &[0u8, 1, 2, 255, 254][..]] {
        r.get_mut().write_all(msg).expect("write");
        let mut back = vec![0; msg.len()];
        r.read_exact(&mut back).expect("echo");
        assert_eq!(back, msg);
    }

    // A header larger than max_header_size (64 KiB by default): 431.
    let big = "x".repeat(70 * 1024);
    let r = get(&t, vip(80), "/echo", &[("X-Big", &big)]);
    assert_eq!(r.status, 431, "{:?}", (r.status, &r.headers));

    // Slowloris: half a header, then nothing. Answered 408 and cut off at 2 s (plus a
    // margin), as HAProxy does.
    let mut slow = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    slow.write_all(b"GET /echo HTTP/1.1\r\nHost: slow.test\r\nX-Slow: 1")
        .expect("write");
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let took = started.elapsed();
    println!(
        "slow client cut off after {took:?}: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(4),
        "slow client cut off after {took:?}"
    );
    let answer = read_response(&mut BufReader::new(&rest[..])).expect("an HTTP answer");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(answer.text().contains("Request Timeout"), "{answer:?}");
    // An idle kept-alive connection is closed without an answer: it asked nothing.
    let mut c = Client::connect(&t, vip(80));
    assert_eq!(c.get("/echo", &[]).status, 200);
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let n = c.r.get_mut().read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "idle connection closed after {took:?}"
    );

    // max_connections = 2 on port 81: the third connection is answered 503, until one closes.
    let p81 = SocketAddr::new(IpAddr::V4(VIP), 81);
    let mut c1 = Client::connect(&t, p81);
    let mut c2 = Client::connect(&t, p81);
    assert_eq!(c1.get("/echo", &[]).status, 200);
    assert_eq!(c2.get("/echo", &[]).status, 200);
    let r = get(&t, p81, "/echo", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.text().contains("Too many connections"), "{}", r.text());
    drop(c1);
    wait_until("a slot frees", &agent, Duration::from_secs(3), || {
        get(&t, p81, "/echo", &[]).status == 200
    });
    assert_eq!(c2.get("/echo", &[]).status, 200);
}

/// 504 when a node answers too late, 502 when it does not speak HTTP, and passive checks:
/// 5xx answers (not 501) mark a node DOWN without waiting for an active check.
#[test]
fn gateway_errors_and_passive_checks() {
    require_root();
    let t = one_worker("h8", Wiring::TwoNic, 2);
    let _b1 = HttpBackend::start(&t.backends, "b1", backend_addr(1));
    // b2 answers every connection with garbage.
    let garbage = t
        .backends
        .enter(|| std::net::TcpListener::bind(backend_addr(2)))
        .expect("bind garbage");
    std::thread::spawn(move || {
        for s in garbage.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        }
    });
    let no_check = "check = \"none\"\ntimeout_server = 1";
    let cfg = t.write_config(
        &(port_toml(80, "http", no_check, &node(1, "accept")).replace("check = \"http\"\n", "")
            + &port_toml(81, "http", no_check, &node(2, "accept"))
                .replace("check = \"http\"\n", "")
            + &port_toml(
                82,
                "http",
                "check_interval = 60\ncheck_timeout = 5",
                &node(1, "accept"),
            )
            .replace("check_interval = 2\ncheck_timeout = 1\n", "")),
    );
    let agent = Agent::start(&t, &cfg);

    let started = Instant::now();
    let r = get(&t, vip(80), "/slow?ms=2500", &[]);
    assert_eq!(r.status, 504, "{r:?}");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2000),
        "504 after timeout_server (1 s), took {took:?}"
    );
    assert_eq!(get(&t, vip(80), "/slow?ms=10", &[]).status, 200);

    let r = get(&t, SocketAddr::new(IpAddr::V4(VIP), 81), "/echo", &[]);
    assert_eq!(r.status, 502, "{r:?}");

    // Port 82: active checks every 60 s; passive ones count at once. 501 is not a failure.
    // The first active check comes within 12 s of the start; waiting for it keeps it from
    // landing just after the passive DOWN below and bringing the node straight back UP.
    let p82 = SocketAddr::new(IpAddr::V4(VIP), 82);
    wait_log(&agent, "port 82 node b1 is UP", 1, Duration::from_secs(15));
    for _ in 0..3 {
        let r = get(&t, p82, "/status/501", &[]);
        assert_eq!((r.status, r.backend().as_str()), (501, "b1"));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !agent.log_text().contains("port 82 node b1 is DOWN"),
        "501 counted"
    );
    // check_attempts = 2: two 500s in a row. (The first active check comes within 12 s and
    // resets the count if it lands between them: then a third one does it.)
    let needle = "port 82 node b1 is DOWN (passive: HTTP 500)";
    let mut sent = 0;
    while !agent.log_text().contains(needle) {
        assert!(
            sent < 4,
            "not DOWN after {sent} 500s:\n{}",
            agent.log_text()
        );
        let r = get(&t, p82, "/status/500", &[]);
        assert_eq!(
            (r.status, r.backend().as_str()),
            (500, "b1"),
            "the node's own 500 passes"
        );
        sent += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        sent >= 2,
        "DOWN after {sent} failure(s), check_attempts is 2"
    );
    let r = get(&t, p82, "/echo", &[]);
    assert_eq!(
        (r.status, r.backend().as_str()),
        (503, ""),
        "DOWN by passive checks: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Node counters (metrics, status, nbctl) for http ports and user-space tcp ports.

/// A GET to the admin API from inside the balancer namespace: status and body.
fn admin_get(t: &Topology, path: &str) -> (u16, String) {
    nb_tests::topo::admin_call(t, "GET", path, None, None)
}

/// The `nb_node_*` samples of a `/metrics` scrape, by (metric with its labels as scraped).
fn node_metrics(t: &Topology) -> HashMap<String, f64> {
    let (status, body) = admin_get(t, "/metrics");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| l.starts_with("nb_node_"))
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("line {l}"));
            (k.to_string(), v.parse().unwrap_or_else(|_| panic!("{l}")))
        })
        .collect()
}

/// A node counter from [`node_metrics`]; panics naming the scrape when the series is absent.
fn node_metric(m: &HashMap<String, f64>, name: &str, port: u16, node: &str, dir: &str) -> f64 {
    let key = if dir.is_empty() {
        format!("{name}{{port=\"{port}\",node=\"{node}\"}}")
    } else {
        format!("{name}{{port=\"{port}\",node=\"{node}\",direction=\"{dir}\"}}")
    };
    *m.get(&key)
        .unwrap_or_else(|| panic!("{key} not scraped; have {:?}", m.keys()))
}

/// The sums over `nodes` of port `port`: (connections, active, bytes in, bytes out).
fn node_sums(m: &HashMap<String, f64>, port: u16, nodes: &[&str]) -> (f64, f64, f64, f64) {
    let sum = |name: &str, dir: &str| -> f64 {
        nodes
            .iter()
            .map(|n| node_metric(m, name, port, n, dir))
            .sum()
    };
    (
        sum("nb_node_connections_total", ""),
        sum("nb_node_active_connections", ""),
        sum("nb_node_bytes_total", "in"),
        sum("nb_node_bytes_total", "out"),
    )
}

/// `active_connections` of every node of `port` in `/v1/status`, summed.
fn status_active(t: &Topology, port: u16) -> u64 {
    let (status, body) = admin_get(t, "/v1/status");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    let p = v["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["port"] == port)
        .unwrap_or_else(|| panic!("port {port} in {body}"));
    p["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            n["active_connections"]
                .as_u64()
                .unwrap_or_else(|| panic!("active_connections of {n}"))
        })
        .sum()
}

/// Every port type carries the node counters: on an http port, requests forwarded (exactly
/// one per request, whether kept alive or not), requests in flight and bytes each way; on a
/// user-space tcp port (`xdp_mode = "off"`), connections forwarded, open and bytes, shown
/// while the connections are still open. `/v1/status` and `nbctl stats` show the same. The
/// counts survive a reload that keeps the node and go with a removed node.
#[test]
fn node_counters_on_http_and_user_space_tcp_ports() {
    require_root();
    let t = one_worker("h9", Wiring::TwoNic, 2);
    let _http = start_backends(&t, 2);
    let mut tcp_backends: Vec<nb_tests::netns::Backend> = (1..=2)
        .map(|i| {
            nb_tests::netns::Backend::start(
                &t.backends,
                &format!("t{i}"),
                SocketAddr::new(IpAddr::V4(backend_v4(i)), 9000),
            )
        })
        .collect();
    let tcp_nodes: String = (1..=2)
        .map(|i| {
            format!(
                "[[port.node]]\nlabel = \"t{i}\"\naddress = \"{}:9000\"\n\n",
                backend_v4(i)
            )
        })
        .collect();
    let ports = |http_nodes: &str, b1_weight: u8| {
        port_toml(
            80,
            "http",
            "",
            &http_nodes.replace(
                "label = \"b1\"\n",
                &format!("label = \"b1\"\nweight = {b1_weight}\n"),
            ),
        ) + &format!("[[port]]\nport = 90\nprotocol = \"tcp\"\ncheck = \"none\"\n\n{tcp_nodes}")
    };
    let write = |ports: String| {
        let balancer = t
            .balancer_toml()
            .replace("[balancer]\n", "[balancer]\nxdp_mode = \"off\"\n");
        let path = t.dir.join("nb.toml");
        std::fs::write(&path, balancer + &ports).expect("write config");
        path
    };
    let cfg = write(ports(&accept_nodes(2), 100));
    let agent = Agent::start_without_xdp(&t, &cfg);
    wait_up(&agent, 80, &["b1", "b2"]);
    let http = ["b1", "b2"];
    let tcp = ["t1", "t2"];

    // http: N requests, some on one kept-alive connection, some on a connection each.
    let before = node_metrics(&t);
    let (c0, a0, in0, out0) = node_sums(&before, 80, &http);
    assert_eq!(a0, 0.0, "nothing in flight yet");
    const N: usize = 12;
    let mut kept = Client::connect(&t, vip(80));
    for i in 0..N {
        let r = if i % 2 == 0 {
            kept.get("/echo", &[])
        } else {
            get(&t, vip(80), "/echo", &[])
        };
        assert_eq!(r.status, 200, "{r:?}");
    }
    let after = node_metrics(&t);
    let (c1, a1, in1, out1) = node_sums(&after, 80, &http);
    println!(
        "http: {N} requests: connections +{}, bytes in +{}, out +{}",
        c1 - c0,
        in1 - in0,
        out1 - out0
    );
    assert_eq!(c1 - c0, N as f64, "one per request forwarded");
    for n in http {
        assert!(
            node_metric(&after, "nb_node_connections_total", 80, n, "")
                > node_metric(&before, "nb_node_connections_total", 80, n, ""),
            "round robin: {n} got requests"
        );
    }
    assert_eq!(a1, 0.0, "all answered");
    // Each request head is over 60 bytes, each answer (the echo of the headers) more.
    assert!(
        in1 - in0 >= (N * 60) as f64,
        "bytes to the nodes: {}",
        in1 - in0
    );
    assert!(
        out1 - out0 > in1 - in0,
        "bytes from the nodes: {}",
        out1 - out0
    );

    // A request in flight is active, in the metrics and in the status, until it is answered.
    let slow = {
        let addr = vip(80);
        let client = t.client.name().to_string();
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &client, "curl", "-sS", "--max-time", "20"])
                .arg(format!("http://{addr}/slow?ms=2000"))
                .output()
                .expect("curl");
            assert!(out.status.success(), "{out:?}");
        })
    };
    wait_until(
        "one request in flight",
        &agent,
        Duration::from_secs(2),
        || node_sums(&node_metrics(&t), 80, &http).1 == 1.0,
    );
    assert_eq!(status_active(&t, 80), 1);
    slow.join().expect("slow request");
    wait_until("nothing in flight", &agent, Duration::from_secs(2), || {
        node_sums(&node_metrics(&t), 80, &http).1 == 0.0
    });
    assert_eq!(status_active(&t, 80), 0);

    // User-space tcp: M connections with data both ways, counted while they are open.
    const M: usize = 6;
    let p90 = SocketAddr::new(IpAddr::V4(VIP), 90);
    let before = node_metrics(&t);
    let (c0, _, in0, out0) = node_sums(&before, 90, &tcp);
    let mut open = Vec::new();
    for _ in 0..M {
        let (mut s, label) = nb_tests::topo::open_greeted(&t, p90);
        assert!(label.starts_with('t'), "{label}");
        nb_tests::topo::echo(&mut s, &[b'q'; 1000]).expect("echo");
        open.push(s);
    }
    let mid = node_metrics(&t);
    let (c1, a1, in1, out1) = node_sums(&mid, 90, &tcp);
    println!(
        "tcp: {M} connections: connections +{}, active {a1}, bytes in +{}, out +{}",
        c1 - c0,
        in1 - in0,
        out1 - out0
    );
    assert_eq!(c1 - c0, M as f64, "one per connection");
    assert_eq!(a1, M as f64, "all open");
    assert_eq!(status_active(&t, 90), M as u64);
    assert_eq!(in1 - in0, (M * 1000) as f64, "exactly what the client sent");
    assert_eq!(
        out1 - out0,
        (M * (1000 + 3)) as f64,
        "the echo and the greeting \"tN\\n\""
    );
    for n in tcp {
        assert!(
            node_metric(&mid, "nb_node_active_connections", 90, n, "") > 0.0,
            "{n}"
        );
    }
    // The test backend keeps its side open after the client's FIN (it holds a clone of each
    // socket), so the connections end when the backends close them.
    drop(open);
    for b in &mut tcp_backends {
        b.stop();
    }
    wait_until(
        "tcp connections closed",
        &agent,
        Duration::from_secs(3),
        || node_sums(&node_metrics(&t), 90, &tcp).1 == 0.0,
    );

    // nbctl stats shows the counters of both kinds of port.
    let o =
        t.lb.command(agent_bin().with_file_name("nbctl"))
            .arg("--config")
            .arg(&cfg)
            .arg("stats")
            .output()
            .expect("nbctl");
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let row = |port: &str, node: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|c| c.len() > 6 && c[0] == port && c[1] == node)
            .unwrap_or_else(|| panic!("row {port} {node} in\n{text}"))
    };
    for (port, node) in [("80", "b1"), ("90", "t1")] {
        let r = row(port, node);
        for (i, col) in ["CONNECTIONS", "ACTIVE", "BYTES_IN", "BYTES_OUT"]
            .iter()
            .enumerate()
        {
            assert!(
                r[3 + i].parse::<u64>().is_ok(),
                "{col} of {port} {node}: {r:?}\n{text}"
            );
        }
    }

    // A reload that keeps the nodes (b1's weight changes) keeps their counts; removing b2
    // removes its series.
    let kept_counts = node_metrics(&t);
    let cfg = write(ports(&accept_nodes(2), 50));
    reload(&agent, "reloaded", 1);
    let same = node_metrics(&t);
    for (port, n) in [(80, "b1"), (80, "b2"), (90, "t1"), (90, "t2")] {
        for (name, dir) in [
            ("nb_node_connections_total", ""),
            ("nb_node_bytes_total", "in"),
            ("nb_node_bytes_total", "out"),
        ] {
            assert_eq!(
                node_metric(&same, name, port, n, dir),
                node_metric(&kept_counts, name, port, n, dir),
                "{name} {port} {n} {dir} across the reload"
            );
        }
    }
    let _ = write(ports(&node(1, "accept"), 50));
    reload(&agent, "reloaded", 2);
    let gone = node_metrics(&t);
    assert!(
        !gone.keys().any(|k| k.contains("node=\"b2\"")),
        "b2 removed: {:?}",
        gone.keys()
    );
    assert_eq!(
        node_metric(&gone, "nb_node_connections_total", 80, "b1", ""),
        node_metric(&kept_counts, "nb_node_connections_total", 80, "b1", "")
    );
    drop(cfg);
    drop(tcp_backends);
}

/// A reload that removes an http port, and SIGTERM for all of them, drain the listeners: new
/// connections are refused at once, idle kept-alive ones are closed, requests in flight (a
/// slow backend) finish and are answered, HTTP/1.1 with `Connection: close` and HTTP/2 after
/// a GOAWAY, and at SIGTERM the agent exits cleanly once they have.
#[test]
fn sigterm_lets_requests_in_flight_finish_and_refuses_new_connections() {
    require_root();
    let t = one_worker("ha", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let (crt, key) = make_cert(&t.dir, "a.test", "");
    let tls = format!(
        "ssl_cert = \"{}\"\nssl_key = \"{}\"",
        crt.display(),
        key.display()
    );
    let kept_ports = port_toml(80, "http", "", &accept_nodes(1))
        + &port_toml(443, "https", &tls, &accept_nodes(1));
    let cfg = t.write_config(&(kept_ports.clone() + &port_toml(81, "http", "", &accept_nodes(1))));
    let mut agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    wait_up(&agent, 443, &["b1"]);
    wait_up(&agent, 81, &["b1"]);

    // Port 81 removed by a reload while one request is in flight and one connection idles.
    let p81 = SocketAddr::new(IpAddr::V4(VIP), 81);
    let mut idle = Client::connect(&t, p81);
    assert_eq!(idle.get("/echo", &[]).status, 200);
    let slow81 = {
        let mut c = Client::connect(&t, p81);
        std::thread::spawn(move || c.get("/slow?ms=2000", &[]))
    };
    std::thread::sleep(Duration::from_millis(500));
    t.write_config(&kept_ports);
    reload(&agent, "reloaded", 1);
    let e = connect_in(&t.client, p81, Duration::from_secs(2))
        .expect_err("port 81 is no longer served");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let mut one = [0u8; 1];
    let started = Instant::now();
    let n = idle.r.get_mut().read(&mut one).unwrap_or(0);
    assert_eq!(n, 0, "the idle kept-alive connection is closed");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed by the reload, not by timeout_header (10 s): {:?}",
        started.elapsed()
    );
    let r = slow81.join().expect("slow request on port 81");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");

    // An upgraded tunnel open across the signal: it keeps working, and the agent waits for
    // it as for a request in flight.
    let ws = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
    ws.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut ws = BufReader::new(ws);
    ws.get_mut()
        .write_all(b"GET /ws HTTP/1.1\r\nHost: ws.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .expect("write");
    let (status, headers) = read_head(&mut ws).expect("101");
    assert_eq!(status, 101, "{headers:?}");

    // Two slow requests in flight: HTTP/1.1 on port 80, HTTP/2 on port 443.
    let h1 = {
        let mut c = Client::connect(&t, vip(80));
        std::thread::spawn(move || c.get("/slow?ms=3000", &[]))
    };
    let h2 = {
        let client = t.client.name().to_string();
        let (resolve, ca) = (format!("a.test:443:{VIP}"), crt.display().to_string());
        std::thread::spawn(move || {
            std::process::Command::new("ip")
                .args(["netns", "exec", &client, "curl", "-sS", "-v", "--http2"])
                .args(["--max-time", "20", "--resolve", &resolve, "--cacert", &ca])
                .args(["-w", "\nversion=%{http_version} code=%{http_code}\n"])
                .arg("https://a.test/slow?ms=3000")
                .output()
                .expect("curl")
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    let signalled = Instant::now();
    agent.signal(libc::SIGTERM);
    wait_log(
        &agent,
        "3 http/https connection(s) finishing",
        1,
        Duration::from_secs(2),
    );
    // The tunnel echoes after the signal and is closed by its client 3.5 s after it, later
    // than the slow requests end.
    let tunnel = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        ws.get_mut().write_all(b"after the signal").expect("write");
        let mut back = [0u8; 16];
        ws.read_exact(&mut back).expect("the tunnel is not cut");
        assert_eq!(&back, b"after the signal");
        std::thread::sleep(Duration::from_millis(3500).saturating_sub(signalled.elapsed()));
        // Taken before the close, so a late wake-up of this thread cannot make it later.
        let closing = signalled.elapsed();
        drop(ws);
        closing
    });
    for addr in [vip(80), vip(443)] {
        let e = connect_in(&t.client, addr, Duration::from_secs(2))
            .expect_err("no new connection while stopping");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr}: {e}"
        );
    }

    let r = h1.join().expect("h1 thread");
    assert_eq!((r.status, r.backend().as_str()), (200, "b1"), "{r:?}");
    assert_eq!(r.header("connection"), Some("close"), "{r:?}");
    let out = h2.join().expect("h2 thread");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    println!("curl: {stdout}\n{stderr}");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("version=2 code=200"), "{stdout}");
    assert!(stdout.starts_with("b1\n"), "the node's answer: {stdout}");
    // curl -v logs the frame ("received GOAWAY", spelt "recveived" by some versions).
    assert!(
        stderr.contains("GOAWAY"),
        "HTTP/2 told to go away: {stderr}"
    );

    wait_log(
        &agent,
        "stopping; the XDP program stays",
        1,
        Duration::from_secs(3),
    );
    let took = signalled.elapsed();
    let tunnel_closed = tunnel.join().expect("tunnel thread");
    println!("agent stopped {took:?} after SIGTERM, tunnel closed at {tunnel_closed:?}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "waited for the requests, not for the 10 s bound: {took:?}"
    );
    assert!(took >= tunnel_closed, "waited for the tunnel too: {took:?}");
    let status = agent.stop().expect("exit status");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
}

/// Port 80 as http with node b1, served by a started agent with XDP off, and the same port
/// as a user-space tcp one: the balancer table, both port tables, the config path, the agent.
fn serving_80_as_http(t: &Topology) -> (String, String, String, PathBuf, Agent) {
    let http = port_toml(80, "http", "", &accept_nodes(1));
    let tcp = format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\ncheck = \"none\"\n\n{}",
        node(1, "accept")
    );
    let balancer = t
        .balancer_toml()
        .replace("[balancer]\n", "[balancer]\nxdp_mode = \"off\"\n");
    let cfg = t.dir.join("nb.toml");
    std::fs::write(&cfg, balancer.clone() + &http).expect("write config");
    let agent = Agent::start_without_xdp(t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    (balancer, http, tcp, cfg, agent)
}

/// One reload turns an http port into a user-space tcp port on the same address, and another
/// turns it back: the listening socket passes from one proxy to the other. Binding anew would
/// fail while the other still listens (the reload was refused with "address in use").
#[test]
fn reload_moves_an_address_between_http_and_user_space_tcp() {
    require_root();
    let t = one_worker("hm", Wiring::TwoNic, 1);
    let _b = start_backends(&t, 1);
    let (balancer, http, tcp, cfg, agent) = serving_80_as_http(&t);
    // Through the http proxy the backend sees X-Forwarded-For; through tcp, the client's
    // request as it was sent.
    let forwarded = |r: &Resp| r.text().to_ascii_lowercase().contains("x-forwarded-for:");
    let r = get(&t, vip(80), "/echo", &[]);
    assert_eq!((r.status, forwarded(&r)), (200, true), "http: {}", r.text());

    std::fs::write(&cfg, balancer.clone() + &tcp).expect("write config");
    reload(&agent, "reloaded", 1);
    let r = get(&t, vip(80), "/echo", &[]);
    assert_eq!((r.status, forwarded(&r)), (200, false), "tcp: {}", r.text());

    std::fs::write(&cfg, balancer + &http).expect("write config");
    reload(&agent, "reloaded", 2);
    let r = get(&t, vip(80), "/echo", &[]);
    assert_eq!(
        (r.status, forwarded(&r)),
        (200, true),
        "http again: {}",
        r.text()
    );

    let log = agent.log_text();
    assert_eq!(
        log.matches(&format!("{}: listening socket handed over", vip(80)))
            .count(),
        2,
        "{log}"
    );
    assert!(!log.contains("reload refused"), "{log}");
}

/// Sockets listening on `addr` in the balancer's namespace.
fn listening_sockets(t: &Topology, addr: SocketAddr) -> usize {
    t.lb.sh(&format!("ss -Hltn 'src {addr}'"))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// `workers = 2`: every worker accepts on a socket of its own (SO_REUSEPORT), the pair moves
/// between the http and the user-space tcp proxy as one, and another program already
/// listening on an address with SO_REUSEPORT (a second agent, say) gets the reload refused
/// instead of a silent share of the address's connections.
#[test]
fn each_worker_listens_on_its_own_socket_and_a_squatter_is_refused() {
    require_root();
    let mut t = Topology::new("hw", Wiring::TwoNic, 1);
    t.workers = 2;
    let _b = start_backends(&t, 1);
    let (balancer, http, tcp, cfg, agent) = serving_80_as_http(&t);
    assert_eq!(listening_sockets(&t, vip(80)), 2, "one socket per worker");
    for i in 0..40 {
        let r = get(&t, vip(80), "/echo", &[]);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }

    // To user-space tcp and back: both sockets go across.
    std::fs::write(&cfg, balancer.clone() + &tcp).expect("write config");
    reload(&agent, "reloaded", 1);
    assert_eq!(
        listening_sockets(&t, vip(80)),
        2,
        "tcp: one socket per worker"
    );
    for i in 0..20 {
        let mut s = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        assert!(out.starts_with("HTTP/1.1 200"), "tcp request {i}: {out}");
    }
    std::fs::write(&cfg, balancer.clone() + &http).expect("write config");
    reload(&agent, "reloaded", 2);
    assert_eq!(
        listening_sockets(&t, vip(80)),
        2,
        "http again: one socket per worker"
    );

    // A squatter on 198.18.0.1:8001, with SO_REUSEPORT as a second agent's sockets have.
    let squat = vip(8001);
    let squatter =
        t.lb.enter(move || {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.bind(&squat.into())?;
            s.listen(16)?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("squatter");
    let with_8001 = http.clone() + &port_toml(8001, "http", "", &accept_nodes(1));
    std::fs::write(&cfg, balancer.clone() + &with_8001).expect("write config");
    reload(&agent, "reload refused", 1);
    let log = agent.log_text();
    assert!(
        log.contains(&squat.to_string()) && log.to_ascii_lowercase().contains("in use"),
        "the refusal names the address and why:\n{log}"
    );
    assert_eq!(listening_sockets(&t, squat), 1, "only the squatter listens");
    assert_eq!(
        get(&t, vip(80), "/echo", &[]).status,
        200,
        "port 80 as it was"
    );

    drop(squatter);
    reload(&agent, "reloaded", 3);
    assert_eq!(listening_sockets(&t, squat), 2);
    assert_eq!(get(&t, squat, "/echo", &[]).status, 200);
}

/// Connections established to the backends' port, as the backends' namespace counts them.
fn backend_connections(t: &Topology) -> usize {
    t.backends
        .sh(&format!(
            "ss -Htn state established '( sport = :{BACKEND_PORT} )' | wc -l"
        ))
        .trim()
        .parse()
        .expect("ss count")
}

/// Reads what `s` gives until it closes or `limit` passes; the bytes, and whether it closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (usize, bool) {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (n, false);
        }
        s.set_read_timeout(Some(left)).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return (n, true),
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (n, false),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return (n, false),
            Err(_) => return (n, true),
        }
    }
}

/// Every wait on a client or a node ends: a client that stops reading a 100 MB answer is cut
/// after `timeout_client` (its node connection released, the agent's memory flat); a request
/// body that stops mid-way is answered 408 after `timeout_client` and releases its node
/// connection; a node that stalls mid-body is cut after `timeout_server`, on both HTTP/1.1
/// paths (bodiless requests, and hyper's); `max_node_connections` queues a request for
/// `timeout_connect`, then answers 503, and counts against no node.
#[test]
fn slow_and_stalled_peers_are_cut_by_their_timeouts() {
    require_root();
    let t = one_worker("h11", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let cfg = t.write_config(
        &(port_toml(
            80,
            "http",
            "timeout_client = 2\ntimeout_server = 2",
            &accept_nodes(1),
        ) + &port_toml(
            81,
            "http",
            "max_node_connections = 2\ntimeout_connect = 1",
            &accept_nodes(1),
        )),
    );
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    wait_up(&agent, 81, &["b1"]);
    let base = rss_kib(&agent);

    // A client that asks for 100 MB and reads nothing.
    let mut greedy = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
    greedy
        .write_all(b"GET /download?n=100000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        .expect("write");
    wait_until("the node sends", &agent, Duration::from_secs(5), || {
        status_active(&t, 80) == 1
    });
    let started = Instant::now();
    wait_until(
        "the stalled answer released",
        &agent,
        Duration::from_secs(10),
        || status_active(&t, 80) == 0,
    );
    let took = started.elapsed();
    let (got, closed) = read_until_closed(&mut greedy, Duration::from_secs(10));
    let grown = rss_kib(&agent).saturating_sub(base);
    println!(
        "non-reading client: released after {took:?}; it then read {got} bytes, closed {closed}; RSS +{grown} KiB"
    );
    assert!(
        closed && got < 100_000_000,
        "cut: {got} bytes, closed {closed}"
    );
    assert!(took < Duration::from_secs(8), "released after {took:?}");
    assert!(grown < 16 * 1024, "RSS grew {grown} KiB");

    // A body that stops mid-way: 408 after timeout_client, the node's connection released.
    let mut up = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
    up.write_all(b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
        .expect("write");
    up.write_all(&[b'u'; 1000]).expect("write");
    let started = Instant::now();
    up.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let answer = read_response(&mut BufReader::new(&mut up)).expect("an answer");
    let took = started.elapsed();
    println!("stalled upload answered {} after {took:?}", answer.status);
    assert_eq!(answer.status, 408, "{answer:?}");
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
        "{took:?}"
    );
    wait_until(
        "the upload's node connection released",
        &agent,
        Duration::from_secs(3),
        || status_active(&t, 80) == 0,
    );

    // A node that stalls mid-body, on the bodiless path and on hyper's (a request with a
    // body): the client's answer is cut after timeout_server.
    for req in [
        &b"GET /stall?n=1000 HTTP/1.1\r\nHost: h\r\n\r\n"[..],
        b"POST /stall?n=1000 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
    ] {
        let mut s = connect_in(&t.client, vip(80), Duration::from_secs(3)).expect("connect");
        s.write_all(req).expect("write");
        let started = Instant::now();
        let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10));
        let took = started.elapsed();
        println!("stalled node: {got} bytes, closed {closed} after {took:?}");
        assert!(closed, "not cut after {took:?}");
        assert!(
            took >= Duration::from_millis(1800) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert!(
            got > 1000 && got < 2000,
            "{got} bytes: the head and the first 1000"
        );
    }
    wait_until(
        "stalled answers released",
        &agent,
        Duration::from_secs(3),
        || status_active(&t, 80) == 0,
    );

    // max_node_connections = 2 on port 81: two slow requests in flight, a third waits
    // timeout_connect (1 s) and is answered 503; the node stays UP.
    let p81 = SocketAddr::new(IpAddr::V4(VIP), 81);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let mut c = Client::connect(&t, p81);
            std::thread::spawn(move || c.get("/slow?ms=3000", &[]).status)
        })
        .collect();
    wait_until("two in flight", &agent, Duration::from_secs(3), || {
        status_active(&t, 81) == 2
    });
    let started = Instant::now();
    let third = get(&t, p81, "/echo", &[]);
    let took = started.elapsed();
    println!("third request: {} after {took:?}", third.status);
    assert_eq!(third.status, 503, "{third:?}");
    assert!(third.text().contains("busy"), "{}", third.text());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    for s in slow {
        assert_eq!(s.join().expect("slow request"), 200);
    }
    assert_eq!(get(&t, p81, "/echo", &[]).status, 200);
    assert!(
        !agent.log_text().contains("is DOWN"),
        "no node went DOWN:\n{}",
        agent.log_text()
    );
}

/// A TLS client that takes any certificate: the test's own, against its own agent.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTP/2 client on a connection of its own to port 443 that gives no flow-control window
/// (SETTINGS_INITIAL_WINDOW_SIZE = 0), opens `streams` streams for 1 MB answers and answers
/// PINGs and SETTINGS, reading nothing; `opened` counts the streams it got open. The thread
/// ends when nb cuts the connection (true) or after 30 s (false).
fn zero_window_h2(
    t: &Topology,
    streams: usize,
    opened: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<bool> {
    let wanted = streams;
    let tcp = connect_in(&t.client, vip(443), Duration::from_secs(3)).expect("connect");
    tcp.set_nonblocking(true).expect("nonblocking");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    {
        std::thread::spawn(move || {
            rt.block_on(async move {
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .expect("versions")
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                    .with_no_client_auth();
                tls.alpn_protocols = vec![b"h2".to_vec()];
                let tcp = tokio::net::TcpStream::from_std(tcp).expect("tokio stream");
                let name = rustls::pki_types::ServerName::try_from("a.test").expect("name");
                let io = tokio_rustls::TlsConnector::from(Arc::new(tls))
                    .connect(name, tcp)
                    .await
                    .expect("TLS");
                let (send, conn) = h2::client::Builder::new()
                    .initial_window_size(0)
                    .handshake::<_, Bytes>(io)
                    .await
                    .expect("h2 handshake");
                // The connection task answers PINGs and SETTINGS, and ends when nb cuts it.
                let conn = tokio::spawn(conn);
                let mut streams = Vec::new();
                for _ in 0..wanted {
                    let Ok(mut s) = send.clone().ready().await else {
                        break;
                    };
                    let req = http::Request::get("https://a.test/download?n=1000000")
                        .body(())
                        .expect("request");
                    match s.send_request(req, true) {
                        Ok((resp, _)) => {
                            opened.fetch_add(1, Ordering::Relaxed);
                            streams.push(tokio::spawn(resp));
                        }
                        Err(_) => break,
                    }
                }
                let t0 = Instant::now();
                let ended = tokio::time::timeout(Duration::from_secs(30), conn).await;
                println!(
                    "zero-window client: connection ended after {:?}: {}",
                    t0.elapsed(),
                    if ended.is_ok() {
                        "cut by nb"
                    } else {
                        "not cut"
                    }
                );
                drop(streams);
                ended.is_ok()
            })
        })
    }
}

/// An HTTP/2 client that gives no flow-control window (SETTINGS_INITIAL_WINDOW_SIZE = 0),
/// opens 150 streams for 1 MB answers and answers PINGs: at most `h2_max_streams` (100) of
/// them reach nodes at once, and once an answer has waited `timeout_client` for the client
/// the connection is cut and every node connection it held is released.
#[test]
fn an_http2_client_that_opens_no_window_holds_nothing_for_long() {
    require_root();
    let t = one_worker("h12", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let (crt, key) = make_cert(&t.dir, "a.test", "");
    let extra = format!(
        "ssl_cert = \"{}\"\nssl_key = \"{}\"\ntimeout_client = 3",
        crt.display(),
        key.display()
    );
    let cfg = t.write_config(&port_toml(443, "https", &extra, &accept_nodes(1)));
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 443, &["b1"]);
    let idle = backend_connections(&t);

    let opened = Arc::new(AtomicUsize::new(0));
    let client = zero_window_h2(&t, 150, opened.clone());
    let mut peak = 0;
    let started = Instant::now();
    let released = loop {
        let n = backend_connections(&t).saturating_sub(idle);
        peak = peak.max(n);
        if peak > 0 && n == 0 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(3 + 3),
            "{n} node connections still held after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let cut = client.join().expect("client");
    println!(
        "zero-window h2 client: {} streams opened, at most {peak} node connections, all released after {released:?}; connection cut: {cut}",
        opened.load(Ordering::Relaxed)
    );
    assert!(peak > 0 && peak <= 100, "node connections at most {peak}");
    assert!(cut, "nb cut the connection");
    // The port still serves.
    let tls = format!("--resolve a.test:443:{VIP} --cacert {}", crt.display());
    assert!(curl(&t, &format!("{tls} --http2 https://a.test/echo")).contains("b1"));
}

/// With a low descriptor limit (1024), 5000 idle client connections take only the client
/// share of it: the rest are answered 503 and closed at once; health checks keep working,
/// so no node goes DOWN; the XDP tcp port keeps serving; and once the idle clients go, new
/// ones are served again.
#[test]
fn a_descriptor_budget_refuses_clients_before_it_fails_nodes() {
    require_root();
    nb_tests::raw::raise_fd_limit();
    let t = one_worker("h13", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let tcp80 = format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\ncheck = \"connection\"\ncheck_interval = 2\n\
         check_timeout = 1\ncheck_attempts = 2\n\n{}",
        accept_nodes(1)
    );
    let cfg =
        t.write_config(&(tcp80 + &port_toml(81, "http", "timeout_header = 120", &accept_nodes(1))));
    let agent = Agent::start_with_fd_limit(&t, &cfg, 1024);
    wait_up(&agent, 81, &["b1"]);
    assert!(
        agent.log_text().contains("at most 384 client connections"),
        "{}",
        agent.log_text()
    );
    let p81 = SocketAddr::new(IpAddr::V4(VIP), 81);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..5000 {
        match connect_in(&t.client, p81, Duration::from_secs(3)) {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    // The connections nb refused were answered 503 and closed: find them among those held.
    std::thread::sleep(Duration::from_millis(500));
    let mut answered_503 = 0;
    let mut open = Vec::new();
    for mut s in held {
        s.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 512];
        match s.read(&mut buf) {
            Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 503") => answered_503 += 1,
            Ok(0) => refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open.push(s),
            _ => refused += 1,
        }
    }
    println!(
        "5000 connections: {} held open by nb, {answered_503} answered 503, {refused} refused or reset",
        open.len()
    );
    assert!(
        open.len() >= 300 && open.len() <= 384,
        "{} held",
        open.len()
    );
    assert!(answered_503 > 4000, "{answered_503} answered 503");
    // A new client now: 503 at once, not a hang.
    let r = get(&t, p81, "/echo", &[]);
    assert_eq!(r.status, 503, "{r:?}");
    // Checks go on: wait three check intervals, no node DOWN.
    std::thread::sleep(Duration::from_secs(6));
    let log = agent.log_text();
    assert!(!log.contains("is DOWN"), "a node went DOWN:\n{log}");
    // The XDP tcp port serves.
    let via_xdp = get(&t, vip(80), "/echo", &[]);
    assert_eq!(via_xdp.status, 200, "{via_xdp:?}");
    // The idle clients go: new ones are served.
    drop(open);
    wait_until(
        "clients served again",
        &agent,
        Duration::from_secs(5),
        || get(&t, p81, "/echo", &[]).status == 200,
    );
}

/// The agent's CPU time (user + system) so far.
fn cpu_time(agent: &Agent) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).expect("stat");
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    Duration::from_secs_f64(ticks / hz)
}

/// Out of descriptors for real (limit 512, budget 128 clients): six HTTP/2 clients with 100
/// zero-window streams each ask for 600 node connections. Connects that fail with EMFILE are
/// answered 503 and count against no node, health checks that cannot get a socket are not
/// failures, and the accept loop at EMFILE neither spins nor floods the log; once nb cuts the
/// stalled clients (`timeout_client`), everything serves again.
#[test]
fn running_out_of_descriptors_fails_no_node_and_floods_nothing() {
    require_root();
    let t = one_worker("h14", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1);
    let (crt, key) = make_cert(&t.dir, "a.test", "");
    let extra = format!(
        "ssl_cert = \"{}\"\nssl_key = \"{}\"\ntimeout_client = 12",
        crt.display(),
        key.display()
    );
    let cfg = t.write_config(&port_toml(443, "https", &extra, &accept_nodes(1)));
    let agent = Agent::start_with_fd_limit(&t, &cfg, 512);
    wait_up(&agent, 443, &["b1"]);
    let opened = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|_| zero_window_h2(&t, 100, opened.clone()))
        .collect();
    wait_until(
        "descriptors run out",
        &agent,
        Duration::from_secs(10),
        || agent.log_text().contains("Too many open files"),
    );
    // New clients meanwhile: they wait in the backlog or are refused, nb does not spin.
    let waiting: Vec<_> = (0..20)
        .filter_map(|_| connect_in(&t.client, vip(443), Duration::from_secs(1)).ok())
        .collect();
    let cpu0 = cpu_time(&agent);
    std::thread::sleep(Duration::from_secs(4));
    let cpu = cpu_time(&agent) - cpu0;
    let log = agent.log_text();
    let accept_lines = log.lines().filter(|l| l.contains("accept:")).count();
    println!(
        "{} streams opened; agent CPU {cpu:?} over 4 s at the limit; {accept_lines} accept log line(s)",
        opened.load(Ordering::Relaxed)
    );
    assert!(cpu < Duration::from_secs(1), "CPU {cpu:?} in 4 s at EMFILE");
    assert!(accept_lines <= 4, "{accept_lines} accept lines:\n{log}");
    assert!(!log.contains("is DOWN"), "a node went DOWN:\n{log}");
    drop(waiting);
    for c in clients {
        assert!(c.join().expect("client"), "nb cut the stalled client");
    }
    let tls = format!("--resolve a.test:443:{VIP} --cacert {}", crt.display());
    wait_until("served again", &agent, Duration::from_secs(10), || {
        curl_ok(&t, &format!("{tls} --http2 https://a.test/echo"))
    });
    let log = agent.log_text();
    assert!(!log.contains("is DOWN"), "a node went DOWN:\n{log}");
}

// ---------------------------------------------------------------------------------------
// One port number on two public addresses.

/// The second public address of the identity tests.
const VIP_B: &str = "198.18.0.11";

/// A topology with [`VIP_B`] on the balancer beside [`VIP`], and a config whose
/// `balancer.addresses` holds both; `ports` are appended.
fn two_vips(t: &Topology, ports: &str) -> PathBuf {
    t.lb.sh(&format!("ip addr add {VIP_B}/32 dev pub0"));
    let balancer = t.balancer_toml().replacen(
        &format!("addresses = [\"{VIP}\""),
        &format!("addresses = [\"{VIP}\", \"{VIP_B}\""),
        1,
    );
    let path = t.dir.join("nb.toml");
    std::fs::write(&path, format!("{balancer}{ports}")).expect("write config");
    std::fs::write(t.dir.join("admin.token"), "t0ken\n").expect("token");
    path
}

use nb_tests::topo::nbctl;

/// Two tcp ports (XDP) and two http ports share a number each, on two addresses; each
/// address reaches only its own nodes, though a node label repeats on the other port. The
/// API and nbctl name each by `ADDRESS:PORT`, refuse the bare number as ambiguous (409 naming
/// both), and a write to one leaves the other as it was; metrics tell them apart.
/// (Before ports were keyed by address, both addresses answered from the last port's nodes.)
#[test]
fn one_number_on_two_addresses_serves_each_addresss_own_nodes() {
    require_root();
    let t = one_worker("id1", Wiring::TwoNic, 4);
    let _http = start_backends(&t, 4);
    let tcp_addr = |i: u8| SocketAddr::new(IpAddr::V4(backend_v4(i)), 9000);
    let _tcp: Vec<nb_tests::netns::Backend> = (1..=2)
        .map(|i| nb_tests::netns::Backend::start(&t.backends, &format!("t{i}"), tcp_addr(i)))
        .collect();
    let http_port = |address: &str, nodes: &[(&str, u8)]| {
        let nodes: String = nodes
            .iter()
            .map(|(label, i)| {
                format!(
                    "[[port.node]]\nlabel = \"{label}\"\naddress = \"{}\"\n\n",
                    backend_addr(*i)
                )
            })
            .collect();
        port_toml(80, "http", &format!("address = \"{address}\""), &nodes)
    };
    let tcp_port = |address: &str, i: u8| {
        format!(
            "[[port]]\nport = 7000\nprotocol = \"tcp\"\naddress = \"{address}\"\n\
             check_interval = 2\ncheck_timeout = 1\n\n\
             [[port.node]]\nlabel = \"t\"\naddress = \"{}\"\n\n",
            tcp_addr(i)
        )
    };
    let cfg = two_vips(
        &t,
        &format!(
            "{}{}{}{}",
            http_port(&VIP.to_string(), &[("b1", 1), ("b2", 2)]),
            http_port(VIP_B, &[("b1", 3)]),
            tcp_port(&VIP.to_string(), 1),
            tcp_port(VIP_B, 2),
        ),
    );
    let agent = Agent::start(&t, &cfg);
    for (port, label) in [
        ("198.18.0.10:80", "b1"),
        ("198.18.0.10:80", "b2"),
        ("198.18.0.11:80", "b1"),
        ("198.18.0.10:7000", "t"),
        ("198.18.0.11:7000", "t"),
    ] {
        wait_log(
            &agent,
            &format!("port {port} node {label} is UP"),
            1,
            Duration::from_secs(10),
        );
    }
    let vip_b = |port: u16| SocketAddr::new(VIP_B.parse().expect("ip"), port);

    // Each address, its own nodes.
    let mut seen_a = std::collections::BTreeSet::new();
    let mut a = Client::connect(&t, vip(80));
    let mut b = Client::connect(&t, vip_b(80));
    for i in 0..20 {
        seen_a.insert(a.get("/echo", &[]).backend());
        assert_eq!(
            b.get("/echo", &[]).backend(),
            "b3",
            "request {i} on {VIP_B}"
        );
    }
    assert_eq!(
        seen_a,
        ["b1", "b2"].iter().map(|s| s.to_string()).collect(),
        "{VIP} spreads over its own two nodes only"
    );
    for i in 0..10 {
        let (_s, on_a) = nb_tests::topo::open_greeted(&t, vip(7000));
        let (_s, on_b) = nb_tests::topo::open_greeted(&t, vip_b(7000));
        assert_eq!(
            (on_a.as_str(), on_b.as_str()),
            ("t1", "t2"),
            "tcp connection {i}"
        );
    }

    // The API: the bare number is ambiguous, each address names one port.
    let (status, body) = admin_get(&t, "/v1/ports/80");
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("198.18.0.10:80") && body.contains("198.18.0.11:80"),
        "{body}"
    );
    let port_of = |name: &str| -> serde_json::Value {
        let (status, body) = admin_get(&t, &format!("/v1/ports/{name}"));
        assert_eq!(status, 200, "{name}: {body}");
        serde_json::from_str(&body).expect("JSON")
    };
    assert_eq!(
        port_of("198.18.0.11:80")["nodes"][0]["address"],
        backend_addr(3).to_string()
    );
    let token = Some("t0ken");
    let (status, body) = nb_tests::topo::admin_call(
        &t,
        "PUT",
        "/v1/ports/80/nodes/b1",
        token,
        Some(r#"{"weight":5}"#),
    );
    assert_eq!(status, 409, "a write to the bare number is refused: {body}");
    let o = nbctl(
        &t,
        &cfg,
        &["node", "set", "198.18.0.10:80", "b1", "--weight", "5"],
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(port_of("198.18.0.10:80")["nodes"][0]["weight"], 5);
    assert_eq!(
        port_of("198.18.0.11:80")["nodes"][0]["weight"],
        100,
        "the other port's b1 is untouched"
    );
    let o = nbctl(&t, &cfg, &["nodes", "198.18.0.11:7000"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && text.contains(&tcp_addr(2).to_string()),
        "{o:?}"
    );
    assert!(!text.contains(&tcp_addr(1).to_string()), "{text}");
    let o = nbctl(&t, &cfg, &["nodes", "7000"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("ambiguous"),
        "{o:?}"
    );
    let o = nbctl(&t, &cfg, &["status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("198.18.0.10:7000/tcp") && text.contains("198.18.0.11:7000/tcp"),
        "{text}"
    );

    // Metrics keep the two apart.
    let m = node_metrics(&t);
    for port in [
        "198.18.0.10:80",
        "198.18.0.11:80",
        "198.18.0.10:7000",
        "198.18.0.11:7000",
    ] {
        let node = if port.ends_with(":80") { "b1" } else { "t" };
        let key = format!("nb_node_up{{port=\"{port}\",node=\"{node}\"}}");
        assert_eq!(m.get(&key), Some(&1.0), "{key} in {:?}", m.keys());
    }
    let b_count = m["nb_node_connections_total{port=\"198.18.0.11:80\",node=\"b1\"}"];
    assert!(b_count >= 20.0, "20 requests on {VIP_B}: {b_count}");
    let t_count = m["nb_node_connections_total{port=\"198.18.0.11:7000\",node=\"t\"}"];
    assert!(t_count >= 10.0, "10 connections on {VIP_B}: {t_count}");
}

/// `PUT /v1/ports/{port}` (the NodeBalancer "rebuild") replaces a port's config and nodes in
/// one call, applied as a difference: a node that stays keeps its open connections (a tcp
/// connection through XDP, a kept-alive http client), its counters and its cookie clients,
/// while another node is changed and a third added. A body that would move the port, or
/// breaks a rule, is refused and changes nothing.
#[test]
fn a_rebuild_keeps_the_nodes_it_keeps() {
    require_root();
    let t = one_worker("id2", Wiring::TwoNic, 3);
    let _http = start_backends(&t, 3);
    let tcp_addr = |i: u8| SocketAddr::new(IpAddr::V4(backend_v4(i)), 9000);
    let _tcp: Vec<nb_tests::netns::Backend> = (1..=2)
        .map(|i| nb_tests::netns::Backend::start(&t.backends, &format!("t{i}"), tcp_addr(i)))
        .collect();
    let ports = format!(
        "{}[[port]]\nport = 7000\nprotocol = \"tcp\"\ncheck_interval = 2\ncheck_timeout = 1\n\n\
         [[port.node]]\nlabel = \"t1\"\naddress = \"{}\"\n\n",
        port_toml(80, "http", "stickiness = \"http_cookie\"", &accept_nodes(2)),
        tcp_addr(1)
    );
    let cfg = two_vips(&t, &ports);
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b1", "b2"]);
    wait_log(
        &agent,
        "port 7000 node t1 is UP",
        1,
        Duration::from_secs(10),
    );

    let first = get(&t, vip(80), "/echo", &[]);
    let sticky = first.backend();
    let (value, _) = first.srvid().expect("a cookie");
    let cookie = format!("NB_SRVID={value}");
    let other = if sticky == "b1" { "b2" } else { "b1" };
    let mut kept = Client::connect(&t, vip(80));
    for _ in 0..5 {
        assert_eq!(kept.get("/echo", &[("Cookie", &cookie)]).backend(), sticky);
    }
    let (mut tcp_conn, greeted) = nb_tests::topo::open_greeted(&t, vip(7000));
    assert_eq!(greeted, "t1");
    let before = node_metrics(&t);
    let count = |m: &HashMap<String, f64>, port: u16, node: &str| {
        node_metric(m, "nb_node_connections_total", port, node, "")
    };

    // The http port: the sticky node as it was, the other re-weighted, a third added.
    let node_json = |label: &str, i: u8, weight: u8| {
        format!(
            r#"{{"label":"{label}","address":"{}","weight":{weight}}}"#,
            backend_addr(i)
        )
    };
    let sticky_i: u8 = sticky[1..].parse().expect("bN");
    let other_i: u8 = other[1..].parse().expect("bN");
    let body = format!(
        r#"{{"stickiness":"http_cookie","check":"http","check_interval":2,"check_timeout":1,
            "check_path":"/echo","nodes":[{},{},{}]}}"#,
        node_json(&sticky, sticky_i, 100),
        node_json(other, other_i, 7),
        node_json("b3", 3, 100),
    );
    let token = Some("t0ken");
    let put =
        |path: &str, body: &str| nb_tests::topo::admin_call(&t, "PUT", path, token, Some(body));
    // Refused first, with nothing changed: a body moving the port, one breaking a rule.
    for bad in [
        body.replacen('{', r#"{"port":81,"#, 1),
        body.replacen('{', r#"{"check_interval":1,"#, 1)
            .replacen(r#""check_interval":2,"#, "", 1),
    ] {
        let (status, answer) = put("/v1/ports/80", &bad);
        assert_eq!(status, 400, "{bad}: {answer}");
    }
    let (status, answer) = put("/v1/ports/80", &body);
    assert_eq!(status, 200, "{answer}");
    let shown: serde_json::Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(shown["nodes"].as_array().map(Vec::len), Some(3), "{answer}");
    wait_up(&agent, 80, &["b3"]);
    for i in 0..20 {
        let r = kept.get("/echo", &[("Cookie", &cookie)]);
        assert_eq!(
            r.backend(),
            sticky,
            "request {i} after the rebuild left the cookie's node"
        );
        assert!(r.srvid().is_none(), "the cookie still holds");
    }
    let weights: HashMap<String, u64> =
        serde_json::from_str::<serde_json::Value>(&admin_get(&t, "/v1/ports/80").1).expect("JSON")
            ["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| {
                (
                    n["label"].as_str().expect("label").to_string(),
                    n["weight"].as_u64().expect("w"),
                )
            })
            .collect();
    assert_eq!(weights[other], 7);

    // The tcp port: t1 kept, t2 added; the open connection through XDP goes on.
    let (status, answer) = put(
        "/v1/ports/7000",
        &format!(
            r#"{{"check_interval":2,"check_timeout":1,"nodes":[
                {{"label":"t1","address":"{}"}},{{"label":"t2","address":"{}"}}]}}"#,
            tcp_addr(1),
            tcp_addr(2)
        ),
    );
    assert_eq!(status, 200, "{answer}");
    wait_log(
        &agent,
        "port 7000 node t2 is UP",
        1,
        Duration::from_secs(10),
    );
    nb_tests::topo::echo(&mut tcp_conn, b"still here").expect("the kept tcp connection runs on");
    let seen = nb_tests::topo::spread(&t, vip(7000), 40);
    assert!(
        seen.contains_key("t1") && seen.contains_key("t2"),
        "{seen:?}"
    );

    // Counters of the kept nodes went on from where they were.
    let after = node_metrics(&t);
    assert!(count(&after, 80, &sticky) >= count(&before, 80, &sticky) + 20.0);
    assert!(count(&after, 7000, "t1") >= count(&before, 7000, "t1"));
    // And the rebuild survives a restart (it is in the state file).
    drop(agent);
    let agent = Agent::start(&t, &cfg);
    wait_up(&agent, 80, &["b3"]);
    assert_eq!(
        get(&t, vip(80), "/echo", &[("Cookie", &cookie)]).backend(),
        sticky
    );
}

/// `slow_start` on an http port: a node that joins starts with almost no share of the
/// requests and ramps to its weight over `slow_start` seconds, as in XDP.
#[test]
fn a_joining_node_ramps_up_on_an_http_port() {
    require_root();
    let t = one_worker("hs", Wiring::TwoNic, 2);
    let _b = start_backends(&t, 2);
    let cfg = t.write_config(&port_toml(80, "http", "slow_start = 8", &accept_nodes(1)));
    let agent = Agent::start_without_xdp(&t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    std::fs::write(
        &cfg,
        t.balancer_toml() + &port_toml(80, "http", "slow_start = 8", &accept_nodes(2)),
    )
    .expect("write config");
    reload(&agent, "reloaded", 1);
    let joined = Instant::now();
    let mut shares = Vec::new();
    while joined.elapsed() < Duration::from_secs(11) {
        let b2 = (0..20)
            .filter(|_| get(&t, vip(80), "/echo", &[]).backend() == "b2")
            .count();
        shares.push((joined.elapsed().as_secs_f32(), b2));
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("b2's share of 20 requests over its ramp (s, count): {shares:?}");
    let counts: Vec<usize> = shares.iter().map(|s| s.1).collect();
    assert!(counts[0] <= 2, "b2 starts with almost nothing: {shares:?}");
    assert!(
        (9..=11).contains(&counts[counts.len() - 1]),
        "then its half: {shares:?}"
    );
    assert!(
        counts.iter().any(|&c| (3..=8).contains(&c)),
        "a share between on the way: {shares:?}"
    );
}

/// Operators' way: `workers = 2` under `ip netns exec`, killed with `kill -9` and started
/// again. The new agent binds its own pair of sockets (the dead one's closed with it) and
/// serves at once; nothing of the old group lingers.
#[test]
fn workers_listen_again_after_kill_9_and_a_restart_under_ip_netns_exec() {
    require_root();
    let mut t = Topology::new("hk", Wiring::TwoNic, 1);
    t.workers = 2;
    let _b = start_backends(&t, 1);
    let cfg = t.write_config(&port_toml(80, "http", "", &accept_nodes(1)));
    let mut agent = Agent::start_by_netns_exec(&t, &cfg);
    wait_up(&agent, 80, &["b1"]);
    assert_eq!(get(&t, vip(80), "/echo", &[]).status, 200);
    assert_eq!(listening_sockets(&t, vip(80)), 2);
    agent.kill9();
    assert_eq!(
        listening_sockets(&t, vip(80)),
        0,
        "the group died with the agent"
    );
    let restarted = Agent::start_by_netns_exec(&t, &cfg);
    wait_up(&restarted, 80, &["b1"]);
    assert_eq!(
        listening_sockets(&t, vip(80)),
        2,
        "one new socket per worker"
    );
    for i in 0..20 {
        let r = get(&t, vip(80), "/echo", &[]);
        assert_eq!(r.status, 200, "request {i} after the restart: {}", r.text());
    }
}
