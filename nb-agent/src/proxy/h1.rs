//! A small HTTP/1.1 client for requests without a body (most of a web application's
//! traffic: GET, HEAD, DELETE), run inside the request's own task on a kept-alive connection
//! of its own.
//!
//! hyper's client runs every backend connection as a task of its own, fed through channels:
//! a request wakes that task, which writes it, reads the answer and wakes the request's task
//! again, and the body comes through one more channel. Under kept-alive load that task and
//! its hand-offs cost about a tenth of the balancer's CPU. Here the request's task writes the
//! head and reads the answer itself, and the response body reads straight from the socket.
//!
//! Requests with a body, and Upgrade requests, keep going through hyper (`pool::Sender`),
//! which streams request bodies and hands over upgraded connections.
//!
//! The answer is read as RFC 9112 §6.3 says, strictly: interim (1xx) answers are skipped, a
//! Transfer-Encoding overrides Content-Length (and then the connection is not reused),
//! conflicting lengths are an error, anything else runs to the connection's close. A
//! connection goes back to its pool only after a complete answer that leaves nothing unread.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use hyper::body::{Body, Frame, SizeHint};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{Instant, Sleep},
};

use crate::proxy::stats::{ActiveGuard, NodeStats};

/// The largest response head taken (status line and fields), as HAProxy's default buffer.
const MAX_HEAD: usize = 64 * 1024;
/// The most header fields a response head may have (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// What one read asks for.
const READ_CHUNK: usize = 16 * 1024;
/// The longest chunk-size line.
const MAX_CHUNK_LINE: usize = 4096;
/// The most trailer bytes read (and dropped) after a chunked body.
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a request on this path failed.
#[derive(Debug, Error)]
pub enum Error {
    /// The connection closed or was reset before a byte of an answer came: on a kept-alive
    /// connection, the node closing it just as the request left.
    #[error("connection closed before an answer")]
    ClosedEarly,
    #[error("no response head within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("response head larger than {MAX_HEAD} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("malformed response head: {0}")]
    Parse(httparse::Error),
    #[error("invalid response header field {0:?}")]
    Field(String),
    #[error("invalid or conflicting Content-Length")]
    ContentLength,
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    Switched,
    #[error("response body cut short")]
    Truncated,
    #[error("the node sent nothing for {0:?} mid-answer (timeout_server)")]
    Stalled(Duration),
    #[error("malformed chunked response body")]
    Chunked,
}

/// Whether `req` can go this way: no body, and nothing that hands the connection over.
pub fn eligible<B: Body>(req: &Request<B>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && !req.headers().contains_key(header::UPGRADE)
}

/// Methods whose request may be sent again when a kept-alive connection closed under it
/// (RFC 9110 §9.2.2).
pub fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The request head as it goes to the node: `req` was already rewritten (origin-form target,
/// the balancer's headers). A POST, PUT or PATCH without a length says it has none, as
/// hyper's client does, for nodes that refuse such a request without one.
pub fn encode_request<B>(req: &Request<B>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        && !req.headers().contains_key(header::CONTENT_LENGTH)
    {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A kept-alive connection to a node, with what was read from it and not yet used, and the
/// timer of its requests' response timeout: one timer kept for the connection's life and
/// moved forward per request, which tokio does with one atomic operation, where a timer per
/// request is registered in and removed from the runtime's timer wheel each time.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    timer: Pin<Box<Sleep>>,
    stats: Arc<NodeStats>,
}

impl Conn {
    /// A connection just made to a node whose counters are `stats`.
    pub fn new(stream: TcpStream, stats: Arc<NodeStats>) -> Conn {
        Conn {
            stream,
            buf: BytesMut::new(),
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            stats,
        }
    }

    /// Whether an idle connection can carry a request: nothing came on it while idle (a
    /// FIN, a reset or stray bytes each end it). Asks the socket only when its readiness
    /// says something may have come.
    pub fn idle_usable(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                matches!(self.stream.try_read(&mut byte), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads once into the buffer; 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_CHUNK);
        let mut rb = ReadBuf::uninit(self.buf.spare_capacity_mut());
        ready!(Pin::new(&mut self.stream).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        // SAFETY: `poll_read` initialised the first `n` bytes of the spare capacity.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        if n > 0 {
            self.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        }
        Poll::Ready(Ok(n))
    }

    /// Sends `head` and reads the answer's head, all within `timeout`.
    /// `head_request`: the request was HEAD (its answer has no body, whatever it says).
    pub async fn exchange(
        mut self,
        head: &[u8],
        head_request: bool,
        timeout: Duration,
    ) -> Result<(http::response::Parts, Reader), Error> {
        // The timeout covers the head's way out too: a node that reads nothing must not hold
        // a head larger than the socket buffers forever.
        self.timer.as_mut().reset(Instant::now() + timeout);
        let mut sent = 0;
        while sent < head.len() {
            let wrote = poll_fn(|cx| {
                let r = Pin::new(&mut self.stream).poll_write(cx, &head[sent..]);
                unless_late(r, &mut self.timer, cx)
            })
            .await;
            match wrote {
                None => return Err(Error::Timeout(timeout)),
                Some(Ok(n)) if n > 0 => {
                    sent += n;
                    self.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                }
                Some(_) => return Err(Error::ClosedEarly),
            }
        }
        let mut answered = false;
        loop {
            match parse(&mut self.buf, head_request)? {
                Parsed::Final(parts, framing, keep) => {
                    let reader = Reader {
                        conn: self,
                        framing,
                        keep,
                        stall: timeout,
                        stalling: false,
                    };
                    return Ok((parts, reader));
                }
                Parsed::Interim(len) => {
                    let _ = self.buf.split_to(len);
                    answered = true;
                    continue;
                }
                Parsed::Partial => {}
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
            answered |= !self.buf.is_empty();
            let read = poll_fn(|cx| {
                let r = self.poll_fill(cx);
                unless_late(r, &mut self.timer, cx)
            })
            .await;
            match read {
                None => return Err(Error::Timeout(timeout)),
                Some(Ok(0)) if !answered => return Err(Error::ClosedEarly),
                Some(Ok(0)) => return Err(Error::Truncated),
                Some(Ok(_)) => {}
                Some(Err(_)) if !answered => return Err(Error::ClosedEarly),
                Some(Err(e)) => return Err(Error::Io(e)),
            }
        }
    }
}

/// `r` once ready, `None` once `timer` has run out first.
fn unless_late<T>(
    r: Poll<T>,
    timer: &mut Pin<Box<Sleep>>,
    cx: &mut Context<'_>,
) -> Poll<Option<T>> {
    match r {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
    }
}

/// What `parse` found in the buffer.
pub(crate) enum Parsed {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) answer of this many bytes, to skip.
    Interim(usize),
    /// The final answer's head (taken out of the buffer), how its body ends, and whether
    /// the connection may carry another request after it.
    Final(http::response::Parts, Framing, bool),
}

/// How a response body ends.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// After this many more bytes.
    Length(u64),
    /// At the last chunk, in this state.
    Chunked(Chunk),
    /// When the node closes the connection.
    Close,
}

/// Where a chunked body's decoding is.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub(crate) enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the line end after a chunk's data.
    DataEnd,
    /// In the trailer section, this many bytes of it read.
    Trailers(usize),
    /// Past the end.
    Done,
}

/// Parses the response head at the start of `buf`, taking it out when whole.
pub(crate) fn parse(buf: &mut BytesMut, head_request: bool) -> Result<Parsed, Error> {
    if buf.is_empty() {
        return Ok(Parsed::Partial);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut fields);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
        Err(e) => return Err(Error::Parse(e)),
    };
    let code = res.code.unwrap_or(0);
    if code == 101 {
        return Err(Error::Switched);
    }
    if (100..200).contains(&code) {
        return Ok(Parsed::Interim(len));
    }
    let status = StatusCode::from_u16(code).map_err(|_| Error::Parse(httparse::Error::Status))?;
    let version = if res.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // Where each field lies in the head, so that the values can be slices of it.
    let base = buf.as_ptr() as usize;
    let n = res.headers.len();
    let mut at = [(0usize, 0usize, 0usize, 0usize); MAX_HEADERS];
    let mut length: Option<u64> = None;
    let mut lengths_differ = false;
    let mut transfer_encoding = false;
    let mut chunked_last = false;
    let (mut close, mut keep_alive) = (false, false);
    for (i, f) in res.headers.iter().enumerate() {
        let name_at = f.name.as_ptr() as usize - base;
        let value_at = f.value.as_ptr() as usize - base;
        at[i] = (name_at, f.name.len(), value_at, f.value.len());
        let name = f.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            for v in f.value.split(|&b| b == b',') {
                match parse_length(v) {
                    Some(l) if length.is_none_or(|p| p == l) => length = Some(l),
                    Some(_) => lengths_differ = true,
                    None => return Err(Error::ContentLength),
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_encoding = true;
            // The final coding is the last one of the last field.
            if let Some(last) = f.value.split(|&b| b == b',').next_back() {
                chunked_last = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in f.value.split(|&b| b == b',') {
                let t = t.trim_ascii();
                close |= t.eq_ignore_ascii_case(b"close");
                keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(n);
    for &(na, nl, va, vl) in &at[..n] {
        let name = HeaderName::from_bytes(&head[na..na + nl])
            .map_err(|_| Error::Field(String::from_utf8_lossy(&head[na..na + nl]).into()))?;
        let value = HeaderValue::from_maybe_shared(head.slice(va..va + vl))
            .map_err(|_| Error::Field(name.as_str().into()))?;
        headers.append(name, value);
    }
    let mut keep = match version {
        Version::HTTP_11 => !close,
        _ => keep_alive && !close,
    };
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Length(0)
        } else if transfer_encoding {
            // Both: the Transfer-Encoding counts, the length goes (the client must not frame
            // the decoded body by it), and the connection is not trusted after (§6.3).
            if length.is_some() || lengths_differ {
                keep = false;
                headers.remove(header::CONTENT_LENGTH);
            }
            if chunked_last && version == Version::HTTP_11 {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else if lengths_differ {
            return Err(Error::ContentLength);
        } else {
            match length {
                Some(l) => Framing::Length(l),
                None => Framing::Close,
            }
        };
    keep &= framing != Framing::Close;
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Parsed::Final(parts, framing, keep))
}

/// A Content-Length value: digits only (no sign, no spaces inside), at most 19 of them.
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A response body's source: the connection, and how far through the body it is.
#[derive(Debug)]
pub struct Reader {
    conn: Conn,
    framing: Framing,
    keep: bool,
    /// How long the node may leave the body stalled (`timeout_server`, as for the head).
    stall: Duration,
    /// The connection's timer runs for a stall that has begun.
    stalling: bool,
}

/// What the buffer gave towards the body.
pub(crate) enum Step {
    Data(Bytes),
    /// The body is over.
    Done,
    /// Nothing more without a read.
    More,
}

impl Reader {
    fn done(&self) -> bool {
        matches!(
            self.framing,
            Framing::Length(0) | Framing::Chunked(Chunk::Done)
        )
    }

    /// The next piece of body the buffer holds.
    fn step(&mut self) -> Result<Step, Error> {
        let buf = &mut self.conn.buf;
        match &mut self.framing {
            Framing::Length(0) => Ok(Step::Done),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                Ok(Step::Data(buf.split_to(n as usize).freeze()))
            }
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                Ok(Step::Data(buf.split().freeze()))
            }
            Framing::Chunked(state) => chunked_step(buf, state),
        }
    }
}

/// One line of `buf` (without its LF, and without a CR before it), if whole, and its length
/// with the line end.
fn line(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, Error> {
    match buf.iter().take(max).position(|&b| b == b'\n') {
        Some(lf) => {
            let l = &buf[..lf];
            Ok(Some((l.strip_suffix(b"\r").unwrap_or(l), lf + 1)))
        }
        None if buf.len() >= max => Err(Error::Chunked),
        None => Ok(None),
    }
}

/// Decodes a chunked body from `buf` up to the next data, the end, or the buffer's end.
pub(crate) fn chunked_step(buf: &mut BytesMut, state: &mut Chunk) -> Result<Step, Error> {
    loop {
        match *state {
            Chunk::Size => {
                let Some((l, used)) = line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Step::More);
                };
                let digits = l.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > 15 {
                    return Err(Error::Chunked);
                }
                // After the size, only extensions (";name=value") or whitespace before them.
                let rest = l[digits..].trim_ascii_start();
                if !rest.is_empty() && rest[0] != b';' {
                    return Err(Error::Chunked);
                }
                let hex = std::str::from_utf8(&l[..digits]).map_err(|_| Error::Chunked)?;
                let size = u64::from_str_radix(hex, 16).map_err(|_| Error::Chunked)?;
                let _ = buf.split_to(used);
                *state = if size == 0 {
                    Chunk::Trailers(0)
                } else {
                    Chunk::Data(size)
                };
            }
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::More);
                }
                let n = left.min(buf.len() as u64);
                *state = if n == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - n)
                };
                return Ok(Step::Data(buf.split_to(n as usize).freeze()));
            }
            Chunk::DataEnd => {
                let Some((l, used)) = line(buf, 2)? else {
                    return Ok(Step::More);
                };
                if !l.is_empty() {
                    return Err(Error::Chunked);
                }
                let _ = buf.split_to(used);
                *state = Chunk::Size;
            }
            Chunk::Trailers(seen) => {
                let room = MAX_TRAILERS.saturating_sub(seen).max(2);
                let Some((l, used)) = line(buf, room)? else {
                    return Ok(Step::More);
                };
                let last = l.is_empty();
                let _ = buf.split_to(used);
                *state = if last {
                    Chunk::Done
                } else {
                    Chunk::Trailers(seen + used)
                };
            }
            Chunk::Done => return Ok(Step::Done),
        }
    }
}

/// Where a connection goes back once its answer is read whole: the node's pool. A trait, so
/// that this parser knows nothing of pools (`pool::NodePool` implements it).
pub trait ConnHome: Send + Sync {
    /// Takes `conn` back as an idle connection (or closes it, when enough are idle).
    fn take_back(self: Arc<Self>, conn: Conn);
}

/// A node's response body on its way to the client, read from the connection as the client
/// takes it. When it ends the connection goes back to the pool (if it may carry another
/// request) and the node's in-flight count drops.
pub struct RawBody {
    reader: Option<Reader>,
    home: Option<Arc<dyn ConnHome>>,
    _active: Option<ActiveGuard>,
}

impl RawBody {
    pub fn new(reader: Reader, home: Arc<dyn ConnHome>, active: ActiveGuard) -> RawBody {
        let mut b = RawBody {
            reader: Some(reader),
            home: Some(home),
            _active: Some(active),
        };
        if b.reader.as_ref().is_some_and(Reader::done) {
            b.finish();
        }
        b
    }

    /// The body is over: the connection goes back if whole and reusable.
    fn finish(&mut self) {
        if let Some(r) = self.reader.take()
            && r.keep
            && r.conn.buf.is_empty()
            && let Some(home) = self.home.take()
        {
            home.take_back(r.conn);
        }
        self._active = None;
    }

    /// The body broke: the connection is dropped (closed).
    fn fail(&mut self) {
        self.reader = None;
        self._active = None;
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(r) = this.reader.as_mut() else {
                return Poll::Ready(None);
            };
            match r.step() {
                Ok(Step::Data(b)) => {
                    if r.done() {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                Ok(Step::Done) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let filled = match r.conn.poll_fill(cx) {
                Poll::Ready(x) => {
                    r.stalling = false;
                    x
                }
                Poll::Pending => {
                    // The node is silent mid-body: the connection's timer (the head's, done
                    // with) bounds the stall.
                    if !r.stalling {
                        r.stalling = true;
                        let at = Instant::now() + r.stall;
                        r.conn.timer.as_mut().reset(at);
                    }
                    if r.conn.timer.as_mut().poll(cx).is_ready() {
                        let stall = r.stall;
                        this.fail();
                        return Poll::Ready(Some(Err(Error::Stalled(stall))));
                    }
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) if r.framing == Framing::Close => {
                    r.keep = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::Truncated)));
                }
                Ok(_) => {}
                Err(e) => {
                    this.fail();
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.as_ref().is_none_or(Reader::done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.reader.as_ref().map(|r| &r.framing) {
            None => SizeHint::with_exact(0),
            Some(Framing::Length(n)) => SizeHint::with_exact(*n),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str, head_request: bool) -> (http::response::Parts, Framing, bool, usize) {
        let mut buf = BytesMut::from(text.as_bytes());
        match parse(&mut buf, head_request).unwrap() {
            Parsed::Final(p, f, k) => (p, f, k, buf.len()),
            _ => panic!("not a final head: {text:?}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let (p, f, keep, left) = parsed(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
        );
        assert_eq!(
            (p.status, f, keep, left),
            (StatusCode::OK, Framing::Length(5), true, 5)
        );
        assert_eq!(p.headers["x-a"], "b");
        // HEAD, 204 and 304 have no body whatever they say.
        for (text, head) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
            ),
        ] {
            let (_, f, keep, _) = parsed(text, head);
            assert_eq!((f, keep), (Framing::Length(0), true), "{text:?}");
        }
        // Chunked wins over a length, and then the connection is not reused.
        let (p, f, keep, _) = parsed(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!((f, keep), (Framing::Chunked(Chunk::Size), false));
        assert!(p.headers.get("content-length").is_none(), "the length goes");
        let (_, f, keep, _) = parsed(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!((f, keep), (Framing::Chunked(Chunk::Size), true));
        // A coding other than chunked last, or no length at all: until the close.
        for text in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\n",
        ] {
            let (_, f, keep, _) = parsed(text, false);
            assert_eq!((f, keep), (Framing::Close, false), "{text:?}");
        }
        // Connection: close, and HTTP/1.0 without keep-alive, end the connection.
        let (_, _, keep, _) = parsed(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(!keep);
        let (_, _, keep, _) = parsed("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false);
        assert!(!keep);
        let (p, _, keep, _) = parsed(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        );
        assert!(keep);
        assert_eq!(p.version, Version::HTTP_10);
        // The same length twice is one length.
        let (_, f, _, _) = parsed(
            "HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\nContent-Length: 3\r\n\r\n",
            false,
        );
        assert_eq!(f, Framing::Length(3));
    }

    #[test]
    fn bad_heads_are_errors() {
        for text in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(text.as_bytes());
            assert!(parse(&mut buf, false).is_err(), "{text:?}");
        }
    }

    #[tokio::test]
    async fn a_node_that_reads_nothing_times_the_head_out() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accepts and never reads: the head (far larger than both sockets' buffers can
        // hold) stalls on its way out.
        let held = tokio::spawn(async move { l.accept().await.unwrap() });
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_send_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let conn = Conn::new(stream, Arc::default());
        let head = vec![b'x'; 64 << 20];
        let began = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            conn.exchange(&head, false, Duration::from_millis(300)),
        )
        .await
        .expect("the exchange ends by itself");
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert!(
            began.elapsed() < Duration::from_secs(3),
            "{:?}",
            began.elapsed()
        );
        drop(held);
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Le"[..]);
        let Parsed::Interim(n) = parse(&mut buf, false).unwrap() else {
            panic!("100 is interim");
        };
        let _ = buf.split_to(n);
        assert!(matches!(parse(&mut buf, false).unwrap(), Parsed::Partial));
        buf.extend_from_slice(b"ngth: 0\r\n\r\n");
        assert!(matches!(parse(&mut buf, false).unwrap(), Parsed::Final(..)));
    }

    /// Decodes `wire` fed in pieces of `piece` bytes; the data, and the bytes left after
    /// the end.
    fn dechunk(wire: &[u8], piece: usize) -> Result<(Vec<u8>, Vec<u8>), Error> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        let mut pieces = wire.chunks(piece);
        loop {
            match chunked_step(&mut buf, &mut state)? {
                Step::Data(b) => out.extend_from_slice(&b),
                Step::Done => return Ok((out, buf.to_vec())),
                Step::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err(Error::Truncated),
                },
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_pieces() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for piece in [1, 2, 3, 7, wire.len()] {
            let (data, left) = dechunk(wire, piece).unwrap();
            assert_eq!(data, b"hello 0123456789", "pieces of {piece}");
            // Only what follows the body is left, whatever was read with it.
            assert!(b"NEXT".starts_with(&left), "pieces of {piece}: {left:?}");
        }
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"-1\r\n",
            b"ffffffffffffffff\r\n",
            b"5 junk\r\nhello\r\n",
        ] {
            assert!(
                !matches!(dechunk(bad, 3), Ok(_) | Err(Error::Truncated)),
                "{bad:?}"
            );
        }
        assert!(matches!(dechunk(b"5\r\nhel", 2), Err(Error::Truncated)));
    }
}
