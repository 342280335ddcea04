//! Active health checks shared by every port type: the probes (`connection`, `http`,
//! `http_body`), the UP/DOWN state machine, and the jittered per-node schedule.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use regex::Regex;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpSocket,
    sync::mpsc,
    time::{Instant, timeout},
};

use crate::{
    config::{CheckKind, Port},
    model::NodeKey,
};

/// Defined with the model (the API and metrics read it too); named here for the checks.
pub use crate::model::Health;

/// Why one probe failed.
#[derive(Debug, Error)]
pub enum CheckError {
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The balancer itself is out of descriptors or socket memory: says nothing about the
    /// node, so it is not counted (see `fds`).
    #[error("no probe made, the balancer is out of resources: {0}")]
    Local(#[source] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("i/o: {0}")]
    Io(#[source] std::io::Error),
    #[error("not an HTTP response")]
    NotHttp,
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("body does not match {0:?}")]
    Body(String),
}

/// What to probe and how often: the check fields of a port.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub attempts: u32,
    pub path: String,
    pub body: Option<Regex>,
}

impl PartialEq for CheckSpec {
    fn eq(&self, o: &Self) -> bool {
        self.kind == o.kind
            && self.interval == o.interval
            && self.timeout == o.timeout
            && self.attempts == o.attempts
            && self.path == o.path
            && self.body.as_ref().map(|r| r.as_str()) == o.body.as_ref().map(|r| r.as_str())
    }
}

impl CheckSpec {
    /// The check settings of `port`; `None` when the port checks nothing.
    pub fn of(port: &Port) -> Option<CheckSpec> {
        if port.check == CheckKind::None {
            return None;
        }
        let body = (port.check == CheckKind::HttpBody)
            .then(|| Regex::new(&port.check_body).ok())
            .flatten();
        Some(CheckSpec {
            kind: port.check,
            interval: Duration::from_secs(port.check_interval as u64),
            timeout: Duration::from_secs(port.check_timeout as u64),
            attempts: port.check_attempts.max(1),
            path: port.check_path.clone(),
            body,
        })
    }
}

/// Flips state only after `attempts` consecutive failures (DOWN) or one success (UP): counting
/// consecutive, not cumulative, failures is what keeps a flaky node from flapping.
#[derive(Debug, Clone)]
pub struct StateMachine {
    state: Health,
    failures: u32,
    attempts: u32,
}

impl StateMachine {
    pub fn new(attempts: u32) -> Self {
        Self {
            state: Health::Unknown,
            failures: 0,
            attempts: attempts.max(1),
        }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        let before = self.state;
        if ok {
            self.failures = 0;
            self.state = Health::Up;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.attempts {
                self.state = Health::Down;
            }
        }
        (self.state != before).then_some(self.state)
    }
}

/// Largest response read: status line, headers and the 16 KiB of body `http_body` matches.
const MAX_RESPONSE: usize = 64 * 1024;
const MAX_BODY: usize = 16 * 1024;

/// A failed socket, bind or connect: the node's failure, or the balancer's own (`Local`).
fn connect_error(e: std::io::Error) -> CheckError {
    if crate::fds::is_exhaustion(&e) {
        CheckError::Local(e)
    } else {
        CheckError::Connect(e)
    }
}

/// One probe of `addr`, leaving from `source` (the balancer's private address) when given.
pub async fn probe(
    spec: &CheckSpec,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<(), CheckError> {
    match timeout(spec.timeout, probe_inner(spec, addr, source)).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout(spec.timeout)),
    }
}

async fn probe_inner(
    spec: &CheckSpec,
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<(), CheckError> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(connect_error)?;
    if let Some(src) = source.filter(|s| s.is_ipv4() == addr.is_ipv4()) {
        sock.bind(SocketAddr::new(src, 0)).map_err(connect_error)?;
    }
    let mut stream = sock.connect(addr).await.map_err(connect_error)?;
    if spec.kind == CheckKind::Connection {
        return Ok(());
    }
    let req = format!(
        "GET {} HTTP/1.0\r\nHost: {}\r\nUser-Agent: nb-health-check\r\nConnection: close\r\n\r\n",
        spec.path, addr
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(CheckError::Io)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.map_err(CheckError::Io)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= MAX_RESPONSE {
            break;
        }
        // Status-only checks need no more than the status line.
        if spec.kind == CheckKind::Http && buf.windows(2).any(|w| w == b"\r\n") {
            break;
        }
    }
    let status = parse_status(&buf).ok_or(CheckError::NotHttp)?;
    if !(200..400).contains(&status) {
        return Err(CheckError::Status(status));
    }
    if let Some(re) = &spec.body {
        let start = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
            .unwrap_or(buf.len());
        let end = (start + MAX_BODY).min(buf.len());
        let body = String::from_utf8_lossy(&buf[start..end]);
        if !re.is_match(&body) {
            return Err(CheckError::Body(re.as_str().to_string()));
        }
    }
    Ok(())
}

fn parse_status(buf: &[u8]) -> Option<u16> {
    let line_end = buf
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(buf.len());
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// A state change (or a result, for latency metrics) reported by a node's check task.
#[derive(Debug, Clone)]
pub struct CheckEvent {
    pub node: NodeKey,
    /// The new state, when it changed.
    pub changed: Option<Health>,
    pub ok: bool,
    pub latency: Duration,
    pub error: Option<String>,
}

/// A small xorshift generator: enough to spread check times, no dependency.
fn jitter_source(seed: u64) -> impl FnMut() -> f64 {
    let mut x = seed | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Runs the checks of one node until the task is aborted: the first after a random part of the
/// interval, then every interval +-10%, so that checks of many nodes never align.
///
/// `passive` brings failures seen by real traffic (the proxy's connect failures, timeouts and
/// 5xx answers, each with its reason): they count in the same state machine as failed probes,
/// so `check_attempts` of them in a row (with no successful probe between) mark the node DOWN.
pub async fn run_node(
    node: NodeKey,
    name: Arc<str>,
    addr: SocketAddr,
    source: Option<IpAddr>,
    spec: CheckSpec,
    events: mpsc::UnboundedSender<CheckEvent>,
    mut passive: mpsc::UnboundedReceiver<String>,
) {
    let label = node.label.clone();
    let seed = label
        .bytes()
        .fold(node.port.port as u64 ^ std::process::id() as u64, |h, b| {
            h.wrapping_mul(31).wrapping_add(b as u64)
        })
        ^ Instant::now().elapsed().as_nanos() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
    let mut rand = jitter_source(seed);
    let mut sm = StateMachine::new(spec.attempts);
    // Waits until `deadline`, recording passive failures meanwhile; false when the agent is gone.
    let mut wait = async |deadline: Instant, sm: &mut StateMachine| -> bool {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return true,
                Some(why) = passive.recv() => {
                    let changed = sm.record(false);
                    let event = CheckEvent {
                        node: node.clone(),
                        changed,
                        ok: false,
                        latency: Duration::ZERO,
                        error: Some(why),
                    };
                    if events.send(event).is_err() {
                        return false;
                    }
                }
            }
        }
    };
    // The first check soon (within a fifth of the interval), so a start or a new node is known
    // quickly; the spread still keeps nodes apart.
    if !wait(
        Instant::now() + spec.interval.mul_f64(rand() * 0.2),
        &mut sm,
    )
    .await
    {
        return;
    }
    loop {
        let started = Instant::now();
        let result = probe(&spec, addr, source).await;
        let latency = started.elapsed();
        if let Err(e @ CheckError::Local(_)) = &result {
            // Not the node's result: it keeps its state, and the next interval tries again.
            log::warn!("port {name}: node {label}: {e}");
            let next = spec.interval.mul_f64(0.9 + 0.2 * rand());
            if !wait(Instant::now() + next, &mut sm).await {
                return;
            }
            continue;
        }
        crate::metrics::observe_check(&name, &label, latency);
        let ok = result.is_ok();
        let changed = sm.record(ok);
        let event = CheckEvent {
            node: node.clone(),
            changed,
            ok,
            latency,
            error: result.err().map(|e| e.to_string()),
        };
        if events.send(event).is_err() {
            return;
        }
        let next = spec.interval.mul_f64(0.9 + 0.2 * rand());
        if !wait(Instant::now() + next.saturating_sub(latency), &mut sm).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeKey {
        let p = Port::new(80, crate::config::Protocol::Tcp);
        NodeKey::new(&crate::model::PortKey::of(&p), "n1")
    }
    use tokio::{net::TcpListener, time::sleep};

    #[test]
    fn down_after_attempts_consecutive_failures_up_after_one_success() {
        let mut sm = StateMachine::new(3);
        assert_eq!(sm.state(), Health::Unknown);
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(true), Some(Health::Up), "one success: UP");
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(true), None, "a success resets the count");
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(false), Some(Health::Down), "three in a row: DOWN");
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(true), Some(Health::Up));
    }

    #[test]
    fn unknown_goes_down_without_ever_being_up() {
        let mut sm = StateMachine::new(2);
        assert_eq!(sm.record(false), None);
        assert_eq!(sm.record(false), Some(Health::Down));
    }

    fn spec(kind: CheckKind, body: Option<&str>) -> CheckSpec {
        CheckSpec {
            kind,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            attempts: 2,
            path: "/health".into(),
            body: body.map(|b| Regex::new(b).expect("regex")),
        }
    }

    /// A one-shot HTTP server on loopback answering every request with `response`.
    async fn server(response: &'static str) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.expect("read");
            req.truncate(n);
            s.write_all(response.as_bytes()).await.expect("write");
            req
        });
        (addr, h)
    }

    #[tokio::test]
    async fn http_check_sends_http10_with_host_and_judges_status() {
        let (addr, h) = server("HTTP/1.0 204 No Content\r\n\r\n").await;
        probe(&spec(CheckKind::Http, None), addr, None)
            .await
            .expect("2xx is healthy");
        let req = String::from_utf8(h.await.expect("server")).expect("utf8");
        assert!(req.starts_with("GET /health HTTP/1.0\r\n"), "{req}");
        assert!(req.contains(&format!("Host: {addr}\r\n")), "{req}");

        let (addr, _h) = server("HTTP/1.1 302 Found\r\nLocation: /\r\n\r\n").await;
        probe(&spec(CheckKind::Http, None), addr, None)
            .await
            .expect("3xx is healthy");
        let (addr, _h) = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let e = probe(&spec(CheckKind::Http, None), addr, None)
            .await
            .expect_err("5xx");
        assert!(matches!(e, CheckError::Status(503)), "{e}");
        let (addr, _h) = server("SSH-2.0-OpenSSH\r\n").await;
        assert!(matches!(
            probe(&spec(CheckKind::Http, None), addr, None).await,
            Err(CheckError::NotHttp)
        ));
    }

    #[tokio::test]
    async fn http_body_matches_regex() {
        let (addr, _h) = server("HTTP/1.0 200 OK\r\n\r\nstatus: ok, db: up").await;
        probe(&spec(CheckKind::HttpBody, Some("db: up")), addr, None)
            .await
            .expect("matches");
        let (addr, _h) = server("HTTP/1.0 200 OK\r\n\r\nstatus: ok, db: down").await;
        let e = probe(&spec(CheckKind::HttpBody, Some("db: up")), addr, None)
            .await
            .expect_err("no match");
        assert!(matches!(e, CheckError::Body(_)), "{e}");
    }

    #[tokio::test]
    async fn connection_check_and_refusal() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        probe(&spec(CheckKind::Connection, None), addr, None)
            .await
            .expect("listening");
        drop(l);
        let e = probe(&spec(CheckKind::Connection, None), addr, None)
            .await
            .expect_err("closed");
        assert!(matches!(e, CheckError::Connect(_)), "{e}");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.expect("accept");
            sleep(Duration::from_secs(5)).await;
        });
        let e = probe(&spec(CheckKind::Http, None), addr, None)
            .await
            .expect_err("silent");
        assert!(matches!(e, CheckError::Timeout(_)), "{e}");
    }

    /// The schedule: with paused time, a node that stops answering is DOWN after `attempts`
    /// intervals, and reported UP again after it comes back.
    #[tokio::test(start_paused = true)]
    async fn schedule_reports_down_then_up() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let s = spec(CheckKind::Connection, None);
        let (_passive_tx, passive_rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run_node(node(), "80".into(), addr, None, s, tx, passive_rx));
        let first = rx.recv().await.expect("event");
        assert_eq!(first.changed, Some(Health::Up));
        drop(l);
        let mut downs = 0;
        let mut results = 0;
        while downs == 0 {
            let e = rx.recv().await.expect("event");
            results += 1;
            if e.changed == Some(Health::Down) {
                downs += 1;
            }
        }
        assert_eq!(results, 2, "DOWN after exactly check_attempts failures");
        let l = std::net::TcpListener::bind(addr).expect("rebind");
        loop {
            let e = rx.recv().await.expect("event");
            if e.changed == Some(Health::Up) {
                break;
            }
        }
        drop(l);
        task.abort();
    }

    /// Passive failures (from the proxy) count in the same state machine as probes: with
    /// `attempts` = 2, two of them mark a node DOWN long before its next probe, and the next
    /// successful probe brings it back UP.
    #[tokio::test(start_paused = true)]
    async fn passive_failures_count_like_failed_probes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (passive_tx, passive_rx) = mpsc::unbounded_channel();
        let mut s = spec(CheckKind::Connection, None);
        s.interval = Duration::from_secs(60);
        let task = tokio::spawn(run_node(node(), "80".into(), addr, None, s, tx, passive_rx));
        assert_eq!(rx.recv().await.expect("event").changed, Some(Health::Up));
        let t0 = Instant::now();
        passive_tx.send("passive: HTTP 500".into()).expect("send");
        let e = rx.recv().await.expect("event");
        assert_eq!((e.ok, e.changed), (false, None), "one failure of two");
        passive_tx.send("passive: HTTP 502".into()).expect("send");
        let e = rx.recv().await.expect("event");
        assert_eq!(e.changed, Some(Health::Down));
        assert_eq!(e.error.as_deref(), Some("passive: HTTP 502"));
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "no probe was waited for"
        );
        // The next probe (the node still listens) succeeds: UP again.
        let e = rx.recv().await.expect("event");
        assert_eq!(e.changed, Some(Health::Up));
        drop(l);
        task.abort();
    }
}
