//! HTTP/1.1 served by nb itself for the request most traffic is made of: no body, nothing
//! that hands the connection over. Its head is read with httparse and rewritten for the node
//! as bytes (the balancer's headers added, hop-by-hop ones and the balancer's cookie taken
//! out), without building a header map, and the node's answer is written back by the same
//! task. Anything else (a body, an Upgrade, `Expect`, HTTP/1.0, an absolute-form target, a
//! head httparse refuses or that is too large) hands the connection, with the bytes read so
//! far, to hyper's server for the rest of its life: the framing of a request that carries a
//! body is hyper's to read, never this module's, so the two cannot disagree on where one
//! request ends (request smuggling).
//!
//! Behaviour matches hyper's path: the same timeouts (`timeout_header` for a head, then a
//! 408 if one was begun, a silent close if not), the same answers, the same counters. One
//! difference: hyper adds a `Date` header to an answer without one; this path passes the
//! node's headers only, as HAProxy does.

use std::{mem::MaybeUninit, net::IpAddr, pin::Pin, sync::Arc, task::Poll, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use http::{
    StatusCode,
    header::{CONTENT_LENGTH, SET_COOKIE},
};
use hyper::{body::Body, server::conn::http1};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::watch,
    time::Instant,
};

use crate::proxy::{
    PortRuntime, PortView,
    forward::{self, Client, Refusal, Sticky},
    h1::{self, RawBody},
    hyper1::{request_timeout, serve_h1, stop_closing},
    io::Rewind,
    pool::Head,
};

/// The most header fields a request may have here; more goes to hyper, which answers 431.
const MAX_FIELDS: usize = 100;
/// What one read asks for.
const READ_CHUNK: usize = 8 * 1024;
/// Answer bytes gathered before they are written: a head and the body bytes at hand go out
/// in one send.
const WRITE_BATCH: usize = 64 * 1024;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1), and the
/// balancer's own, which it sets itself; none of them goes to the node as the client sent it.
const NOT_FORWARDED: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-proto",
    "x-forwarded-port",
    // The client's claims about itself (`forward::UNTRUSTED`).
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
];

/// The longest request target taken: hyper's limit (it answers 414 above), so that both
/// paths take the same targets.
const MAX_TARGET: usize = 65534;

/// Serves HTTP/1.1 on `io`, plain or TLS, as `serve_h1` does (see there for timeouts and
/// stopping), taking bodiless requests itself.
pub(super) async fn serve<I>(
    h1b: &http1::Builder,
    mut io: I,
    rt: Arc<PortRuntime>,
    conn: Client,
    header_timeout: Duration,
    max_header: usize,
    mut stop: watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(READ_CHUNK);
    let requests = rt.view().requests.clone();
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    // Whether a request was answered: a stop closes a kept-alive connection between
    // requests, and one that asked nothing yet unless an upgrade handed its socket on (then
    // its first request is answered, within `timeout_header`).
    let mut answered = false;
    loop {
        timer.as_mut().reset(Instant::now() + header_timeout);
        // How far `buf` was looked through for the end of a head: each byte is looked at
        // once, and the head parsed once it is whole, so a head that comes a byte at a time
        // costs its length, not its length squared.
        // The first bytes are parsed whatever they hold, so that what is no request at all
        // goes to hyper (and its 400) at once.
        let mut scanned = 0;
        let mut parsed = false;
        // Reads until a whole head is in `buf`, or something ends the wait.
        let req = loop {
            let whole = head_ends(&buf, &mut scanned);
            if !buf.is_empty() && (whole || !parsed || buf.len() > max_header) {
                parsed = true;
                let view = rt.view();
                match read_head(&buf, &rt, &view, &conn) {
                    Read::Partial if buf.len() <= max_header => {}
                    Read::Whole(req) if req.len <= max_header => break (req, view),
                    // Too large (hyper answers 431), or not this path's.
                    _ => {
                        let io = Rewind::new(io, buf.freeze());
                        let stop = conn.stop.clone();
                        let conn = Arc::new(conn);
                        return serve_h1(h1b, io, rt, conn, stop).await;
                    }
                }
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 2 {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                r = io.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => {}
                },
                () = &mut timer => {
                    if !buf.is_empty() {
                        request_timeout(io, &requests).await;
                    }
                    return Ok(());
                }
                // A request begun is answered before the connection closes.
                () = stop_closing(&mut stop, !answered), if buf.is_empty() => return Ok(()),
            }
        };
        let (req, view) = req;
        buf.advance(req.len);
        answered = true;
        if !answer(&mut io, &mut out, &rt, &view, &conn, req).await {
            let _ = io.shutdown().await;
            return Ok(());
        }
    }
}

/// Whether `buf` holds the end of a request head (an empty line, after CRLF or a bare LF as
/// httparse takes them), looking only past `scanned` (moved on).
fn head_ends(buf: &[u8], scanned: &mut usize) -> bool {
    // Up to two bytes before the new ones are part of a line end that may finish here.
    let from = scanned.saturating_sub(2);
    *scanned = buf.len();
    let mut at = from;
    while let Some(i) = buf[at..].iter().position(|&b| b == b'\n') {
        let lf = at + i;
        match buf.get(lf + 1) {
            Some(b'\n') => return true,
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return true,
            // The line end may be completed by the next read: look at it again.
            None | Some(b'\r') if lf + 2 >= buf.len() => {
                *scanned = lf;
                return false;
            }
            _ => at = lf + 1,
        }
    }
    false
}

/// A request read from the client, rewritten for the node.
struct Request {
    /// The head's length in the client's bytes.
    len: usize,
    head: Head,
    sticky: Sticky,
    /// The client asked to close after the answer.
    close: bool,
}

/// What `read_head` made of the bytes at hand.
enum Read {
    Partial,
    /// Not a request for this path: hyper's.
    Other,
    Whole(Request),
}

fn is(name: &str, wanted: &str) -> bool {
    name.eq_ignore_ascii_case(wanted)
}

/// Parses the request head at the start of `buf` and, when whole and bodiless, rewrites it for
/// the node as `forward::rewrite_request` does: Host and the target kept, hop-by-hop headers
/// and those `Connection` names dropped, X-Forwarded-For appended to, X-Forwarded-Proto and
/// -Port set, the balancer's cookie taken out of Cookie.
fn read_head(buf: &[u8], rt: &PortRuntime, view: &PortView, conn: &Client) -> Read {
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Read::Partial,
        Err(_) => return Read::Other,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Read::Other;
    };
    // Origin-form targets that hyper would take the same way: anything else is hyper's to
    // accept or refuse, so that both paths answer a target alike.
    if method == "CONNECT" || !target_ok(target) {
        return Read::Other;
    }
    // The tokens of Connection: `close`, and the names of more hop-by-hop headers.
    let mut close = false;
    let mut named: Vec<&str> = Vec::new();
    let mut hosts = 0;
    for f in req.headers.iter() {
        hosts += usize::from(is(f.name, "host"));
        if is(f.name, "content-length")
            || is(f.name, "transfer-encoding")
            || is(f.name, "upgrade")
            || is(f.name, "expect")
        {
            return Read::Other;
        }
        if is(f.name, "connection") {
            let Ok(v) = std::str::from_utf8(f.value) else {
                continue;
            };
            for t in v.split(',').map(str::trim) {
                if is(t, "close") {
                    close = true;
                } else if !t.is_empty() && !forward::is_protected(t) {
                    named.push(t);
                }
            }
        }
    }
    // Not exactly one Host: hyper's path answers 400 (`forward::refusal_of`).
    if hosts != 1 {
        return Read::Other;
    }
    let mut out = Vec::with_capacity(len + 160);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut cookies: Vec<&str> = Vec::new();
    let mut forwarded_for: Vec<&str> = Vec::new();
    for f in req.headers.iter() {
        if NOT_FORWARDED.iter().any(|n| is(f.name, n)) || named.iter().any(|n| is(f.name, n)) {
            continue;
        }
        // Values that are not ASCII are dropped from these two, as on hyper's path.
        if is(f.name, "cookie") {
            cookies.extend(ascii(f.value));
            continue;
        }
        if is(f.name, "x-forwarded-for") {
            forwarded_for.extend(ascii(f.value));
            continue;
        }
        field(&mut out, f.name.as_bytes(), f.value);
    }
    let ip = conn.ip.as_bytes();
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in &forwarded_for {
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(ip);
    out.extend_from_slice(b"\r\n");
    field(
        &mut out,
        b"x-forwarded-proto",
        if conn.secure { b"https" } else { b"http" },
    );
    field(&mut out, b"x-forwarded-port", conn.port.as_bytes());
    let sticky = Sticky::of(
        rt,
        view,
        conn.peer.ip().to_canonical(),
        cookies.iter().copied(),
    );
    let kept: Vec<String> = cookies
        .iter()
        .filter_map(|c| crate::proxy::cookie::strip(c))
        .collect();
    if !kept.is_empty() {
        field(&mut out, b"cookie", kept.join("; ").as_bytes());
    }
    if matches!(method, "POST" | "PUT" | "PATCH") {
        field(&mut out, b"content-length", b"0");
    }
    out.extend_from_slice(b"\r\n");
    let m = http::Method::from_bytes(method.as_bytes());
    Read::Whole(Request {
        len,
        head: Head {
            bytes: Bytes::from(out),
            head_request: method == "HEAD",
            idempotent: m.is_ok_and(|m| h1::idempotent(&m)),
        },
        sticky,
        close,
    })
}

/// Whether `target` is an origin-form target (`/path?query`) that hyper takes as it is: no
/// fragment, nothing the URI parser refuses or changes, within hyper's length.
fn target_ok(target: &str) -> bool {
    target.starts_with('/')
        && target.len() <= MAX_TARGET
        && target.bytes().all(|b| b.is_ascii_graphic() && b != b'#')
        && http::uri::PathAndQuery::from_maybe_shared(Bytes::copy_from_slice(target.as_bytes()))
            .is_ok_and(|p| p.as_str() == target)
}

/// `v` as text, if ASCII (httparse let no control character but tab through).
fn ascii(v: &[u8]) -> Option<&str> {
    v.is_ascii().then(|| std::str::from_utf8(v).ok()).flatten()
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Forwards `req` and writes the answer (the node's, or the balancer's own when no node gave
/// one). Whether the connection may carry another request: not when the client asked to
/// close, the agent is stopping (the answer says `Connection: close`, as hyper's does), the
/// client went, or the node's body broke off (the client sees it cut short, as on hyper's
/// path).
async fn answer<I: AsyncWrite + Unpin>(
    io: &mut I,
    out: &mut Vec<u8>,
    rt: &PortRuntime,
    view: &PortView,
    conn: &Client,
    req: Request,
) -> bool {
    let client: IpAddr = conn.peer.ip().to_canonical();
    let head_request = req.head.head_request;
    let sent = forward::dispatch(rt, view, client, &req.sticky, req.head).await;
    let closing = req.close || *conn.stop.borrow();
    let (idx, (mut parts, reader), guard) = match sent {
        Ok(x) => x,
        Err(r) => {
            view.requests.count(r.status.as_u16());
            refusal(out, r, closing);
            return write(io, out).await && !closing;
        }
    };
    let status = parts.status;
    view.requests.count(status.as_u16());
    let set_cookie = forward::settle(rt, view, idx, &req.sticky, client, conn.secure, status);
    let node = &view.nodes[idx];
    let mut body = RawBody::new(reader, node.pool.clone(), guard);
    forward::strip_hop_by_hop(&mut parts.headers);

    // The framing the client gets: the node's length, or chunks when it gave none (a
    // chunked or close-delimited body); none for answers that have no body.
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = body.size_hint().exact();
    let chunked = !bodiless && length.is_none();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        // The length goes out as the body's own below; a bodiless answer keeps the node's
        // (a HEAD or 304 answer's length describes the resource), except where none may be.
        if name == CONTENT_LENGTH && (!bodiless || forward::no_length(status)) {
            continue;
        }
        field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if let Some(v) = set_cookie {
        field(out, SET_COOKIE.as_str().as_bytes(), v.as_bytes());
    }
    if let (false, Some(n)) = (bodiless, length) {
        field(out, b"content-length", n.to_string().as_bytes());
    }
    if chunked {
        field(out, b"transfer-encoding", b"chunked");
    }
    if closing {
        field(out, b"connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless {
        // The node's body, if it sent one anyway, is not the client's: the connection to the
        // node goes with the body unread.
        drop(body);
        return write(io, out).await && !closing;
    }
    loop {
        // The body's bytes at hand join the head in `out`; when the body must be waited for,
        // what is gathered goes out first.
        let frame = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(Some(f)),
            Poll::Pending if out.is_empty() => Poll::Pending,
            Poll::Pending => Poll::Ready(None),
        })
        .await;
        let data = match frame {
            None => {
                if !write(io, out).await {
                    return false;
                }
                continue;
            }
            Some(None) => break,
            Some(Some(Ok(f))) => match f.into_data() {
                Ok(d) => d,
                Err(_) => continue,
            },
            Some(Some(Err(e))) => {
                log::debug!("{} -> {}: answer body: {e}", conn.peer, conn.local);
                let _ = write(io, out).await;
                return false;
            }
        };
        if data.is_empty() {
            continue;
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if out.len() + data.len() <= WRITE_BATCH {
            out.extend_from_slice(&data);
        } else if !(write(io, out).await && io.write_all(&data).await.is_ok()) {
            return false;
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write(io, out).await && !closing
}

/// The balancer's own short answer, as `forward::plain` makes it.
fn refusal(out: &mut Vec<u8>, r: Refusal, closing: bool) {
    let reason = r.status.canonical_reason().unwrap_or("");
    let body = forward::page(r.status, r.text);
    out.clear();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n\
             cache-control: no-store\r\ncontent-length: {}\r\n{}\r\n{body}",
            r.status.as_str(),
            body.len(),
            if closing { "connection: close\r\n" } else { "" }
        )
        .as_bytes(),
    );
}

/// Writes and empties `out`; false when the client is gone.
async fn write<I: AsyncWrite + Unpin>(io: &mut I, out: &mut Vec<u8>) -> bool {
    let ok = out.is_empty() || io.write_all(out).await.is_ok();
    out.clear();
    ok && io.flush().await.is_ok()
}

/// [`read_head`] on a fixed http port (one node, no stickiness), for the fuzz suite.
#[cfg(test)]
pub(crate) mod fuzzing {
    use std::sync::{Arc, LazyLock};

    use super::{Read, read_head};
    use crate::{
        config::{Node, Port, Protocol},
        proxy::{PortRuntime, PortView, forward::Client},
    };

    /// What `read_head` made of some bytes.
    #[derive(Debug)]
    pub(crate) enum Outcome {
        Partial,
        /// Handed to hyper.
        Other,
        /// Taken: the head's length in the input, and the head sent to the node.
        Whole(usize, Vec<u8>),
    }

    struct Fixture {
        rt: PortRuntime,
        view: Arc<PortView>,
        conn: Client,
    }

    static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
        let mut port = Port::new(8000, Protocol::Http);
        port.nodes = vec![Node::new("b1", "127.0.0.1:9".parse().expect("address"))];
        let rt = PortRuntime::new(PortView::bare(port));
        let view = rt.view();
        let (_stop, rx) = tokio::sync::watch::channel(false);
        let conn = Client::new(
            "192.0.2.1:40000".parse().expect("peer"),
            "198.18.0.1:8000".parse().expect("local"),
            false,
            rx,
        );
        Fixture { rt, view, conn }
    });

    /// `read_head` of `buf`.
    pub(crate) fn read(buf: &[u8]) -> Outcome {
        let f = &*FIXTURE;
        match read_head(buf, &f.rt, &f.view, &f.conn) {
            Read::Partial => Outcome::Partial,
            Read::Other => Outcome::Other,
            Read::Whole(r) => Outcome::Whole(r.len, r.head.bytes.to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::net::TcpStream;

    use super::*;
    use crate::{
        config::Node,
        proxy::tests::{http_port, loopback_node, serve},
    };

    /// Where `needle` starts in `hay`.
    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    /// Reads more of `s` into `buf`; false at the close (or an error).
    async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// The next request head `s` sends (`buf`: bytes read and not used yet), or `None` at
    /// the close.
    async fn next_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !fill(s, buf).await {
                return None;
            }
        };
        Some(buf.drain(..end).collect())
    }

    /// A node that answers each request with the head it received (and the length of the
    /// body that came with it) as its body: with a length, or (`/close`) to the close.
    async fn mirror() -> SocketAddr {
        loopback_node(|mut s| async move {
            let mut buf = Vec::new();
            loop {
                let Some(head) = next_head(&mut s, &mut buf).await else {
                    return;
                };
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let body_len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while buf.len() < body_len {
                    if !fill(&mut s, &mut buf).await {
                        return;
                    }
                }
                buf.drain(..body_len);
                let mut body = head.clone();
                body.extend_from_slice(format!("body {body_len}\n").as_bytes());
                if text.starts_with("get /close") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await;
                    let _ = s.write_all(&body).await;
                    return;
                }
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if s.write_all(answer.as_bytes()).await.is_err()
                    || s.write_all(&body).await.is_err()
                {
                    return;
                }
            }
        })
        .await
    }

    /// Reads one answer from `s` (`buf`: bytes read and not used yet): its head and body, by
    /// its length or its chunks, or to the close.
    async fn answer_of(s: &mut TcpStream, buf: &mut Vec<u8>) -> (String, Vec<u8>) {
        let end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(fill(s, buf).await, "closed before a head");
        };
        let head = String::from_utf8(buf.drain(..end).collect()).unwrap();
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if let Some(n) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let n: usize = n.trim().parse().unwrap();
            while buf.len() < n {
                assert!(fill(s, buf).await, "body cut short");
            }
            body = buf.drain(..n).collect();
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let line = loop {
                    if let Some(i) = find(buf, b"\r\n") {
                        break i;
                    }
                    assert!(fill(s, buf).await, "chunks cut short");
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&buf[..line]).unwrap(), 16).unwrap();
                while buf.len() < line + 2 + size + 2 {
                    assert!(fill(s, buf).await, "chunk cut short");
                }
                body.extend_from_slice(&buf[line + 2..line + 2 + size]);
                buf.drain(..line + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while fill(s, buf).await {}
            body = std::mem::take(buf);
        }
        (head, body)
    }

    /// One request sent on a connection of its own: the status, and the head the node saw
    /// (lower case), if it saw one.
    async fn exchange(addr: SocketAddr, req: &[u8]) -> (u16, Option<String>) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut buf = Vec::new();
        let (head, body) =
            tokio::time::timeout(Duration::from_secs(5), answer_of(&mut s, &mut buf))
                .await
                .expect("an answer");
        let status: u16 = head[9..12].parse().unwrap();
        let seen = String::from_utf8_lossy(&body).to_ascii_lowercase();
        (status, seen.contains(" http/1.1\r\n").then_some(seen))
    }

    /// The request rules, on both paths from one table: each request goes once as it is
    /// (bodiless: this module's path) and once with `Content-Length: 0` (hyper's), and both
    /// must get the same answer and send the node the same things.
    #[tokio::test]
    async fn both_paths_apply_one_request_policy() {
        let mut port = http_port(vec![Node::new("b1", mirror().await)]);
        port.max_header_size = 1_048_576;
        let (_rt, addr) = serve(port).await;
        let long = format!("/{}", "a".repeat(70_000));
        // (request line and fields without the final CRLF, status, in the node's head, not in it)
        let table: Vec<(String, u16, Vec<&str>, Vec<&str>)> = vec![
            (
                "GET /ok HTTP/1.1\r\nHost: h".into(),
                200,
                vec!["host: h"],
                vec![],
            ),
            ("GET /nohost HTTP/1.1".into(), 400, vec![], vec![]),
            (
                "GET /twohosts HTTP/1.1\r\nHost: a\r\nHost: b".into(),
                400,
                vec![],
                vec![],
            ),
            (
                "GET /conn HTTP/1.1\r\nHost: h\r\nConnection: host, x-gone\r\nX-Gone: 1".into(),
                200,
                vec!["host: h"],
                vec!["x-gone"],
            ),
            (
                "GET /claims HTTP/1.1\r\nHost: h\r\nForwarded: for=1.2.3.4\r\n\
                 X-Real-IP: 1.2.3.4\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-For: 192.0.2.7"
                    .into(),
                200,
                vec!["x-forwarded-for: 192.0.2.7, 127.0.0.1"],
                vec![
                    "forwarded:",
                    "x-real-ip",
                    "x-forwarded-host",
                    "1.2.3.4",
                    "evil",
                ],
            ),
            ("GET /a<b HTTP/1.1\r\nHost: h".into(), 400, vec![], vec![]),
            ("GET /a>b HTTP/1.1\r\nHost: h".into(), 400, vec![], vec![]),
            ("GET /a`b HTTP/1.1\r\nHost: h".into(), 400, vec![], vec![]),
            // hyper's URI parser takes a quote and braces, and drops a fragment.
            (
                "GET /a\"b HTTP/1.1\r\nHost: h".into(),
                200,
                vec!["get /a\"b "],
                vec![],
            ),
            (
                "GET /a{b} HTTP/1.1\r\nHost: h".into(),
                200,
                vec!["get /a{b} "],
                vec![],
            ),
            (
                "GET /frag#x HTTP/1.1\r\nHost: h".into(),
                200,
                vec!["get /frag http/1.1"],
                vec!["#x"],
            ),
            (
                format!("GET {long} HTTP/1.1\r\nHost: h"),
                414,
                vec![],
                vec![],
            ),
        ];
        for (req, status, has, lacks) in &table {
            for hyper_path in [false, true] {
                let extra = if hyper_path {
                    "\r\nContent-Length: 0"
                } else {
                    ""
                };
                let raw = format!("{req}{extra}\r\n\r\n");
                let (got, seen) = exchange(addr, raw.as_bytes()).await;
                let what = format!("{} (hyper's path: {hyper_path})", &req[..req.len().min(60)]);
                assert_eq!(got, *status, "{what}");
                if *status != 200 {
                    assert!(seen.is_none(), "{what}: the node saw {seen:?}");
                    continue;
                }
                let seen = seen.unwrap_or_else(|| panic!("{what}: the node saw nothing"));
                for h in has {
                    assert!(seen.contains(h), "{what}: {h:?} not in {seen}");
                }
                for l in lacks {
                    assert!(!seen.contains(l), "{what}: {l:?} in {seen}");
                }
            }
        }
    }

    /// A node's 204 with a Content-Length (which no 204 may have) reaches the client without
    /// it, on both paths.
    #[tokio::test]
    async fn a_204_goes_out_without_a_length_on_both_paths() {
        let node = loopback_node(|mut s| async move {
            let mut buf = Vec::new();
            while next_head(&mut s, &mut buf).await.is_some() {
                let answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nX-N: 1\r\n\r\n";
                if s.write_all(answer).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let (_rt, addr) = serve(http_port(vec![Node::new("b1", node)])).await;
        for extra in ["", "Content-Length: 0\r\n"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("DELETE /x HTTP/1.1\r\nHost: h\r\n{extra}\r\n").as_bytes())
                .await
                .unwrap();
            let mut buf = Vec::new();
            let head = next_head(&mut s, &mut buf).await.expect("a head");
            let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 204"), "{head}");
            assert!(head.contains("x-n: 1"), "{head}");
            assert!(!head.contains("content-length"), "{extra:?}: {head}");
        }
    }

    /// The end of a head is found however the bytes come, looking at each once.
    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        for head in [
            &b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET / HTTP/1.1\nHost: h\n\n",
            b"GET / HTTP/1.1\r\nHost: h\n\r\n",
        ] {
            for split in 1..head.len() {
                let mut buf = Vec::new();
                let mut scanned = 0;
                let mut found = None;
                for (i, chunk) in head.chunks(split).enumerate() {
                    buf.extend_from_slice(chunk);
                    if head_ends(&buf, &mut scanned) {
                        found = Some(i);
                        break;
                    }
                }
                let last = head.len().div_ceil(split) - 1;
                assert_eq!(
                    found,
                    Some(last),
                    "{:?} in pieces of {split}",
                    String::from_utf8_lossy(head)
                );
            }
            let mut scanned = 0;
            assert!(!head_ends(&head[..head.len() - 1], &mut scanned));
        }
    }

    #[tokio::test]
    async fn a_bodiless_request_reaches_the_node_rewritten_as_hyper_would() {
        let (_rt, addr) = serve(http_port(vec![Node::new("b1", mirror().await)])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"GET /a?b=1 HTTP/1.1\r\nHost: Example.Test\r\nConnection: keep-alive, X-Drop\r\n\
              X-Drop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 203.0.113.9\r\n\
              X-Forwarded-Proto: gopher\r\nX-Forwarded-Port: 1\r\nCookie: a=1; NB_SRVID=forged\r\n\
              Cookie: b=2\r\nX-Kept: Yes\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        let (head, body) = answer_of(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        let seen = String::from_utf8(body).unwrap();
        let lines: Vec<&str> = seen.lines().collect();
        assert_eq!(lines[0], "GET /a?b=1 HTTP/1.1");
        for want in [
            "Host: Example.Test",
            "X-Kept: Yes",
            "x-forwarded-for: 203.0.113.9, 127.0.0.1",
            "x-forwarded-proto: http",
            &format!("x-forwarded-port: {}", addr.port()),
            "cookie: a=1; b=2",
        ] {
            assert!(lines.contains(&want), "{want:?} not in {seen}");
        }
        for gone in [
            "X-Drop",
            "Keep-Alive",
            "TE:",
            "Connection",
            "gopher",
            "NB_SRVID",
        ] {
            assert!(!seen.contains(gone), "{gone} in {seen}");
        }
        assert!(lines.contains(&"body 0"), "{seen}");
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_and_a_body_hands_the_connection_to_hyper() {
        let (_rt, addr) = serve(http_port(vec![Node::new("b1", mirror().await)])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Two bodiless requests and one with a body in one write, then a GET after it: the
        // POST and what follows are hyper's.
        s.write_all(
            b"GET /one HTTP/1.1\r\nHost: h\r\n\r\nDELETE /two HTTP/1.1\r\nHost: h\r\n\r\n\
              POST /three HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello\
              GET /four HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        .await
        .unwrap();
        let mut buf = Vec::new();
        for (path, body) in [
            ("GET /one ", "body 0"),
            ("DELETE /two ", "body 0"),
            ("POST /three ", "body 5"),
            ("GET /four ", "body 0"),
        ] {
            let (head, seen) = answer_of(&mut s, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {head}");
            let seen = String::from_utf8(seen).unwrap();
            assert!(seen.starts_with(path), "{path}: {seen}");
            assert!(seen.lines().any(|l| l == body), "{path}: {seen}");
        }
        // A bodiless POST says it has no body, for nodes that want a length.
        s.write_all(b"POST /five HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let (_, seen) = answer_of(&mut s, &mut buf).await;
        let seen = String::from_utf8(seen).unwrap();
        assert!(
            seen.lines()
                .any(|l| l.eq_ignore_ascii_case("content-length: 0")),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn other_requests_are_hyper_s_for_the_rest_of_the_connection() {
        let (_rt, addr) = serve(http_port(vec![Node::new("b1", mirror().await)])).await;
        // hyper's path writes header names in lower case, this one as the client sent them.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        for (req, first_line, host) in [
            (
                &b"GET /mine HTTP/1.1\r\nHost: h\r\n\r\n"[..],
                "GET /mine HTTP/1.1",
                "Host: h",
            ),
            // Absolute form: hyper's, and it goes to the node in origin form.
            (
                &b"GET http://h/abs HTTP/1.1\r\nHost: h\r\n\r\n"[..],
                "GET /abs HTTP/1.1",
                "host: h",
            ),
            (
                &b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n"[..],
                "GET /after HTTP/1.1",
                "host: h",
            ),
        ] {
            s.write_all(req).await.unwrap();
            let (head, body) = answer_of(&mut s, &mut buf).await;
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            let seen = String::from_utf8(body).unwrap();
            let lines: Vec<&str> = seen.lines().collect();
            assert_eq!(lines[0], first_line, "{seen}");
            assert!(lines.contains(&host), "{host:?} not in {seen}");
        }
        // HTTP/1.0 (keep-alive rules of its own) is hyper's too, and closes after its answer.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("closed after the answer")
            .unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");
        assert!(got.contains("GET /old HTTP/1.1\r\nhost: h\r\n"), "{got}");
    }

    #[tokio::test]
    async fn an_answer_to_the_close_goes_out_chunked_and_close_is_honoured() {
        let (_rt, addr) = serve(http_port(vec![Node::new("b1", mirror().await)])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        s.write_all(b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = answer_of(&mut s, &mut buf).await;
        assert!(
            head.to_ascii_lowercase()
                .contains("transfer-encoding: chunked"),
            "{head}"
        );
        assert!(body.starts_with(b"GET /close HTTP/1.1\r\n"));
        assert!(body.ends_with(b"body 0\n"));
        // The connection goes on; a client asking to close gets its answer, then the close.
        s.write_all(b"HEAD /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                fill(&mut s, &mut buf).await,
                "closed before the HEAD answer"
            );
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.contains("connection: close"), "{head}");
        assert!(
            head.contains("content-length: "),
            "HEAD keeps the node's length: {head}"
        );
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("closed after the answer")
            .unwrap();
        assert_eq!(
            buf.len() - end + rest.len(),
            0,
            "no body after a HEAD answer"
        );
    }
}
