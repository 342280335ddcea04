//! Unit tests of the proxy on loopback: views, counters, drains, timeouts.

use super::*;
use super::{listen::*, serve::*, view::*};
use crate::{config::Node, proxy::stats::ActiveGuard};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming};
use std::{
    collections::HashMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use hyper::{server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::proxy::stats::NodeStats;

fn up(_: &NodeKey) -> NodeState {
    (Health::Up, None)
}

pub(super) fn http_port(nodes: Vec<Node>) -> Port {
    let mut p = Port::new(8000, Protocol::Http);
    p.nodes = nodes;
    p
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A health flip on a port of 1000 nodes whose stick table holds a million clients:
/// requests never wait for it (the view is swapped whole, the table is not touched), and
/// the flipped node's clients are balanced anew as they come back. The time the refresh
/// itself takes is printed (`--nocapture`), not judged: timing belongs to benchmarks.
#[test]
fn a_health_flip_leaves_the_request_path_and_the_stick_table_alone() {
    let nodes: Vec<Node> = (0..1000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0xc612_0000 + i);
            Node::new(format!("n{i}"), SocketAddr::new(ip.into(), 80))
        })
        .collect();
    let mut p = http_port(nodes);
    p.stickiness = Stickiness::Table;
    let rt = PortRuntime::new(PortView::bare(p.clone()));
    let v = node_views(&p, &up, &rt.pools);
    let now = std::time::Instant::now();
    for c in 0..(1u32 << 20) {
        let node = &v[(c % 1000) as usize];
        rt.table.put(IpAddr::from(c.to_be_bytes()), node, now);
    }
    assert_eq!(rt.table.len(), 1 << 20);
    rt.set_view(PortView {
        nodes: v,
        ..PortView::bare(p.clone())
    });
    let before = rt.view();
    let down = |k: &NodeKey| {
        let h = if &*k.label == "n7" {
            Health::Down
        } else {
            Health::Up
        };
        (h, None)
    };
    let started = std::time::Instant::now();
    let flipped = node_views(&p, &down, &rt.pools);
    rt.set_view(PortView {
        nodes: flipped,
        ..PortView::bare(p.clone())
    });
    let took = started.elapsed();
    println!("health flip, 1000 nodes, 2^20 stuck clients: refresh took {took:?}");
    assert_eq!(rt.table.len(), 1 << 20, "the table was not walked");
    let after = rt.view();
    assert!(!Arc::ptr_eq(&before, &after));
    // Client 7 was stuck to n7, client 8 to n8.
    let (c7, c8) = (
        IpAddr::from(7u32.to_be_bytes()),
        IpAddr::from(8u32.to_be_bytes()),
    );
    assert_eq!(rt.table.get(c7, now, &after.nodes), None, "n7 went DOWN");
    assert_eq!(rt.table.get(c8, now, &after.nodes).as_deref(), Some("n8"));
    // n7 back UP: its clients of before stay balanced anew (their entries went at DOWN).
    let back = node_views(&p, &up, &rt.pools);
    let c1007 = IpAddr::from(1007u32.to_be_bytes());
    assert_eq!(rt.table.get(c1007, now, &back), None);
    assert!(back.iter().filter(|n| n.eligible).count() == 1000);
}

#[test]
fn node_counters_follow_the_label_across_refreshes() {
    let shared: SharedNodes = Mutex::new(HashMap::new());
    let p = http_port(vec![
        Node::new("a", sa("127.0.0.1:1")),
        Node::new("b", sa("127.0.0.1:2")),
    ]);
    let v1 = node_views(&p, &up, &shared);
    v1[0].stats.forwarded.store(7, Ordering::Relaxed);
    v1[0].stats.bytes_in.store(100, Ordering::Relaxed);
    let _in_flight = ActiveGuard::new(&v1[0].active);

    // Weight changed and node moved: same counters, new pool.
    let mut p2 = p.clone();
    p2.nodes[0].weight = 5;
    p2.nodes[0].address = sa("127.0.0.1:3");
    let v2 = node_views(&p2, &up, &shared);
    assert!(Arc::ptr_eq(&v1[0].stats, &v2[0].stats));
    assert!(
        !Arc::ptr_eq(&v1[0].pool, &v2[0].pool),
        "a moved node's pool is new"
    );
    assert_eq!(v2[0].pool.addr(), sa("127.0.0.1:3"));
    let c = v2[0].counters();
    assert_eq!((c.connections, c.active, c.bytes_in), (7, 1, 100));

    // Removed, then added again: it starts from zero.
    let p3 = http_port(vec![p.nodes[1].clone()]);
    let v3 = node_views(&p3, &up, &shared);
    assert_eq!(v3.len(), 1);
    let v4 = node_views(&p, &up, &shared);
    assert!(!Arc::ptr_eq(&v1[0].stats, &v4[0].stats));
    assert_eq!(v4[0].counters(), NodeCounters::default());
    assert!(
        Arc::ptr_eq(&v1[1].stats, &v4[1].stats),
        "b stayed throughout"
    );
}

/// An HTTP/1.1 backend on loopback that answers every request with its body's length,
/// and counts the bytes on its own sockets into the returned counters (what it read is
/// what the proxy sent it).
async fn counting_backend() -> (SocketAddr, Arc<NodeStats>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(NodeStats::default());
    let stats = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let io = TokioIo::new(io::Counted::new(s, stats.clone(), None));
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let n = req.into_body().collect().await?.to_bytes().len();
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(format!(
                        "got {n} bytes\n"
                    )))))
                });
                let _ = http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    (addr, seen)
}

/// A loopback listener whose every connection `serve` takes in a task of its own: a node
/// or a peer for a test.
pub(super) async fn loopback_node<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Serves `port` on a loopback listener with every node UP; the runtime and the address.
pub(super) async fn serve(port: Port) -> (Arc<PortRuntime>, SocketAddr) {
    // Dropping the proxy leaves the listener running (its stop is never asked for).
    let (_proxy, rt, addr) = serve_proxy(port).await;
    (rt, addr)
}

/// As [`serve`], with the [`Proxy`] holding the port and its listener.
async fn serve_proxy(port: Port) -> (Proxy, Arc<PortRuntime>, SocketAddr) {
    let k = PortKey::of(&port);
    let rt = Arc::new(PortRuntime::new(PortView::bare(port.clone())));
    let nodes = node_views(&port, &up, &rt.pools);
    rt.set_view(PortView {
        nodes,
        ..PortView::bare(port)
    });
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let handle = tokio::spawn(accept_loop(rt.clone(), l, addr, stop_rx));
    let mut proxy = Proxy::new();
    proxy.ports.insert(k, rt.clone());
    proxy.listeners.insert(
        addr,
        Listener {
            handle: ListenerTasks(vec![handle]),
            stop,
            socket: None,
        },
    );
    (proxy, rt, addr)
}

/// Waits for `f` to hold, checking every 10 ms, for at most `secs` seconds (shared with
/// the user-space tcp tests).
pub(super) async fn eventually_within(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..secs * 100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within {secs} s");
}

async fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(2, what, f).await
}

#[tokio::test]
async fn http_requests_and_bytes_are_counted_per_node() {
    let (backend, seen) = counting_backend().await;
    let (rt, addr) = serve(http_port(vec![Node::new("b1", backend)])).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    const N: usize = 5;
    for i in 0..N {
        let req = Request::post("/up")
            .header("host", "example.test")
            .body(Full::new(Bytes::from(vec![b'x'; 1000 + i])))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, format!("got {} bytes\n", 1000 + i));
    }
    let node = rt.view().nodes[0].clone();
    eventually("no request in flight", || {
        node.active.load(Ordering::Relaxed) == 0
    })
    .await;
    let c = node.counters();
    assert_eq!(
        c.connections, N as u64,
        "one per request, on one client connection"
    );
    // What the proxy counted sending is what the backend read, and the other way round.
    eventually("byte counts agree with the backend's", || {
        let c = node.counters();
        c.bytes_in == seen.bytes_out.load(Ordering::Relaxed)
            && c.bytes_out == seen.bytes_in.load(Ordering::Relaxed)
    })
    .await;
    let c = node.counters();
    assert!(c.bytes_in > (N * 1000) as u64, "bodies and heads: {c:?}");
    assert!(c.bytes_out > (N * "got 1000 bytes\n".len()) as u64, "{c:?}");
}

/// Everything the server sends on `s` until it closes, and how long that took.
async fn read_until_closed(mut s: TcpStream) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let start = tokio::time::Instant::now();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("closed within 5 s")
        .expect("read");
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[tokio::test]
async fn a_stalled_request_head_gets_408_and_silence_gets_a_close() {
    let (backend, _) = counting_backend().await;
    let mut port = http_port(vec![Node::new("b1", backend)]);
    port.timeout_header = 1;
    let (rt, addr) = serve(port).await;

    // Half a request head, then nothing.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow.test\r\nX-Slow: 1")
        .await
        .unwrap();
    let (text, took) = read_until_closed(s).await;
    assert!(
        text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
        "{text:?}"
    );
    assert!(text.contains("\r\nConnection: close\r\n"), "{text:?}");
    assert!(
        text.ends_with("The request was not received in time.\n"),
        "{text:?}"
    );
    assert!(
        took >= Duration::from_millis(900),
        "after the timeout: {took:?}"
    );

    // Nothing at all: closed without an answer.
    let s = TcpStream::connect(addr).await.unwrap();
    let (text, took) = read_until_closed(s).await;
    assert_eq!(text, "", "a silent client gets no answer");
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // One whole request, then idle: its answer, then a close with nothing more.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_until_closed(s).await;
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(!text.contains("408"), "{text:?}");
    assert_eq!(
        rt.view().nodes[0].counters().connections,
        1,
        "the 408 forwarded nothing"
    );
}

/// An HTTP/1.1 backend on loopback that answers every request after `delay`.
async fn slow_backend(delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from("slow\n"))))
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

/// A kept-alive client connection to `addr` that sends one GET in the background; the
/// status, the `Connection` header and the body of the answer.
fn get_in_background(addr: SocketAddr) -> tokio::task::JoinHandle<(u16, Option<String>, Bytes)> {
    tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", "example.test")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let connection = resp
            .headers()
            .get("connection")
            .map(|v| v.to_str().unwrap().to_string());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, connection, body)
    })
}

#[tokio::test]
async fn drain_refuses_new_connections_and_lets_requests_in_flight_finish() {
    let backend = slow_backend(Duration::from_millis(600)).await;
    let (mut proxy, rt, addr) = serve_proxy(http_port(vec![Node::new("b1", backend)])).await;
    let in_flight = get_in_background(addr);
    eventually("the request reached the node", || {
        rt.view().nodes[0].active.load(Ordering::Relaxed) == 1
    })
    .await;
    // A kept-alive connection with nothing in flight closes at once.
    let idle = TcpStream::connect(addr).await.unwrap();
    eventually("both connections open", || {
        rt.open.load(Ordering::Relaxed) == 2
    })
    .await;

    let start = tokio::time::Instant::now();
    let drained = tokio::spawn(async move { proxy.drain(Duration::from_secs(5)).await });
    let (_, idle_took) = read_until_closed(idle).await;
    assert!(
        idle_took < Duration::from_millis(400),
        "idle closed after {idle_took:?}"
    );
    let refused = TcpStream::connect(addr).await;
    assert!(refused.is_err(), "no new connection while draining");

    let (status, connection, body) = in_flight.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"slow\n"[..]));
    assert_eq!(connection.as_deref(), Some("close"), "told to go away");
    let left = drained.await.unwrap();
    let took = start.elapsed();
    assert_eq!(left, 0, "every connection closed");
    assert!(
        took < Duration::from_secs(2),
        "drained after {took:?}, not at the bound"
    );
}

#[tokio::test]
async fn drain_gives_up_at_its_bound() {
    let backend = slow_backend(Duration::from_secs(3)).await;
    let (mut proxy, rt, addr) = serve_proxy(http_port(vec![Node::new("b1", backend)])).await;
    let _in_flight = get_in_background(addr);
    eventually("the request reached the node", || {
        rt.view().nodes[0].active.load(Ordering::Relaxed) == 1
    })
    .await;
    let start = tokio::time::Instant::now();
    let left = proxy.drain(Duration::from_millis(300)).await;
    let took = start.elapsed();
    assert_eq!(left, 1, "the slow request is still open");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1000),
        "{took:?}"
    );
}

/// H2 limits for a unit test: the idle time given, the rest at the port defaults.
fn test_limits(idle: Duration) -> H2Limits {
    H2Limits {
        idle,
        max_header: 16384,
        ..h2_limits(&Port::new(443, Protocol::Https))
    }
}

/// An idle HTTP/2 connection gets GOAWAY after the idle time; a request open for longer
/// than that is not cut and the idle time counts from its end; a reset stream does not
/// hold the connection open.
#[tokio::test]
async fn idle_http2_connections_are_closed_and_open_requests_finish() {
    use http_body_util::Empty;
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let handler = |req: Request<Incoming>| async move {
        let wait = match req.uri().path() {
            "/slow" => 600,
            "/stuck" => 60_000,
            _ => 0,
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
        Ok::<_, std::convert::Infallible>(Response::new(
            Full::new(Bytes::from_static(b"ok"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        ))
    };
    let idle = Duration::from_millis(300);
    let server = tokio::spawn(serve_h2(server_io, handler, test_limits(idle), stop_rx));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
            .await
            .expect("h2 handshake");
    let client = tokio::spawn(conn);
    let get = |path: &str| {
        Request::get(format!("http://nb.test{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request")
    };

    // A request whose client gives up: its stream is reset, the handler dropped.
    let stuck = send.send_request(get("/stuck"));
    let _ = tokio::time::timeout(Duration::from_millis(50), stuck).await;

    let start = std::time::Instant::now();
    let r = send.send_request(get("/slow")).await.expect("slow answer");
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"ok", "the open request finished");
    let answered = start.elapsed();
    assert!(answered >= Duration::from_millis(600), "{answered:?}");

    // Ended by the server: cleanly, or with the client's side already gone after GOAWAY.
    let _served = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the idle connection is closed")
        .expect("server task");
    let closed = start.elapsed();
    assert!(
        closed >= answered + idle - Duration::from_millis(50),
        "idle time counts from the last answer: {answered:?} then {closed:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), client).await;
}

/// An HTTP/2 client that starts a request head and stalls (HEADERS without END_HEADERS,
/// then nothing), and answers no PING, is still closed: GOAWAY at the idle time, then the
/// connection dropped once no request is open, whether or not the client takes part in
/// the graceful close.
#[tokio::test]
async fn stalled_http2_header_block_is_closed() {
    use tokio::io::AsyncReadExt;
    let (mut client, server_io) = tokio::io::duplex(64 * 1024);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let handler = |_req: Request<Incoming>| async move {
        Ok::<_, std::convert::Infallible>(Response::new(
            Full::new(Bytes::from_static(b"ok"))
                .map_err(|never| match never {})
                .boxed_unsync(),
        ))
    };
    let idle = Duration::from_millis(300);
    let start = std::time::Instant::now();
    let server = tokio::spawn(serve_h2(server_io, handler, test_limits(idle), stop_rx));
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("preface");
    // SETTINGS (empty), then HEADERS on stream 1 with END_STREAM but no END_HEADERS,
    // carrying `:method: GET` (HPACK static index 2).
    client
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .expect("settings");
    client
        .write_all(&[0, 0, 1, 1, 0x01, 0, 0, 0, 1, 0x82])
        .await
        .expect("headers");
    // Read (so the server is never blocked writing) and answer nothing.
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = client.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the stalled connection is closed")
        .expect("server task");
    let closed = start.elapsed();
    assert!(
        closed >= idle && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
}
