//! End to end: tcp ports served by the agent in user space, without XDP (`xdp_mode = "off"`)
//! and with a PROXY protocol header (`proxy_protocol = "v1"` / `"v2"`, which XDP leaves to
//! the kernel even when it is attached).

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nb_tests::{
    netns::{Backend, connect_in, which_backend},
    require_root,
    topo::spread,
    topo::{
        Agent, CLIENT, LB_PRIVATE, Topology, VIP, Wiring, backend_v4, echo, open_greeted, vip,
        wait_connectable, wait_log,
    },
};

fn nodes_toml(labels: &[u8], port: u16) -> String {
    labels
        .iter()
        .map(|i| {
            format!(
                "[[port.node]]\nlabel = \"b{i}\"\naddress = \"{}:{port}\"\n\n",
                backend_v4(*i)
            )
        })
        .collect()
}

fn tcp_port(port: u16, extra: &str, nodes: &str) -> String {
    format!("[[port]]\nport = {port}\nprotocol = \"tcp\"\ncheck = \"none\"\n{extra}\n{nodes}")
}

/// Writes a config with `xdp_mode = "off"` and `ports`; returns its path.
fn write_config_no_xdp(t: &Topology, ports: &str) -> std::path::PathBuf {
    let path = t.dir.join("nb.toml");
    let balancer = t
        .balancer_toml()
        .replace("[balancer]\n", "[balancer]\nxdp_mode = \"off\"\n");
    assert!(balancer.contains("xdp_mode = \"off\""));
    std::fs::write(&path, format!("{balancer}{ports}")).expect("write config");
    path
}

fn reload(agent: &Agent, cfg: &std::path::Path, contents: String, n: usize) {
    std::fs::write(cfg, contents).expect("write config");
    agent.signal(libc::SIGHUP);
    wait_log(agent, "reloaded", n, Duration::from_secs(10));
}

#[test]
fn xdp_off_serves_tcp_in_user_space() {
    require_root();
    let t = Topology::new("u1", Wiring::TwoNic, 3);
    let backends: Vec<Backend> = (1..=3)
        .map(|i| {
            Backend::start(
                &t.backends,
                &format!("b{i}"),
                SocketAddr::new(backend_v4(i).into(), 8080),
            )
        })
        .collect();
    let port80 = tcp_port(
        80,
        "algorithm = \"roundrobin\"",
        &nodes_toml(&[1, 2, 3], 8080),
    );
    let cfg = write_config_no_xdp(&t, &port80);
    let agent = Agent::start_without_xdp(&t, &cfg);
    for i in &t.interfaces {
        assert!(
            !t.pin_path.join(format!("link_{i}")).exists(),
            "xdp_mode = off attaches nothing to {i}"
        );
    }
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));

    // Round robin in user space: an exact rotation.
    let seen = spread(&t, vip(80), 30);
    assert_eq!(seen.len(), 3, "every backend gets connections: {seen:?}");
    for (b, n) in &seen {
        assert_eq!(*n, 10, "{b}: {seen:?}");
    }
    for b in &backends {
        assert!(b.connections() > 0);
        for peer in b.peers() {
            assert_eq!(
                peer.ip(),
                IpAddr::V4(LB_PRIVATE),
                "backends see the balancer's private address"
            );
        }
    }

    // Data flows both ways, also more than any one buffer holds.
    let (mut conn, label) = open_greeted(&t, vip(80));
    assert!(label.starts_with('b'), "greeting {label:?}");
    echo(&mut conn, b"hello through user space").expect("echo");
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    {
        let mut w = conn.try_clone().expect("clone");
        let data = big.clone();
        let writer = std::thread::spawn(move || w.write_all(&data));
        let mut back = vec![0u8; big.len()];
        conn.read_exact(&mut back)
            .expect("read back the large echo");
        writer.join().expect("writer").expect("write");
        assert!(back == big, "the large echo comes back intact");
    }

    // Reloads: a new port gets a listener; a removed port stops accepting while its open
    // connection keeps flowing.
    let (mut kept, _) = open_greeted(&t, vip(80));
    let port81 = tcp_port(81, "", &nodes_toml(&[2], 8080));
    reload(
        &agent,
        &cfg,
        std::fs::read_to_string(&cfg).unwrap() + &port81,
        1,
    );
    wait_connectable(&t.client, vip(81), Duration::from_secs(5));
    for _ in 0..3 {
        assert_eq!(which_backend(&t.client, vip(81)).expect("port 81"), "b2");
    }
    let only81 = t
        .balancer_toml()
        .replace("[balancer]\n", "[balancer]\nxdp_mode = \"off\"\n")
        + &port81;
    reload(&agent, &cfg, only81, 2);
    let err = connect_in(&t.client, vip(80), Duration::from_secs(2))
        .expect_err("port 80 is no longer served");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    echo(&mut kept, b"still here after the reload").expect("existing connection untouched");
}

/// A connection to a node that refuses is retried once on another node: the client never
/// sees the refusal. With every node refusing, the client gets a reset, not a hang.
#[test]
fn refused_node_is_retried_and_none_left_resets() {
    require_root();
    let t = Topology::new("u2", Wiring::TwoNic, 2);
    // b2's address exists but nothing listens there: it refuses.
    let _b1 = Backend::start(
        &t.backends,
        "b1",
        SocketAddr::new(backend_v4(1).into(), 8080),
    );
    let cfg = write_config_no_xdp(
        &t,
        &tcp_port(80, "algorithm = \"roundrobin\"", &nodes_toml(&[1, 2], 8080)),
    );
    let agent = Agent::start_without_xdp(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    for _ in 0..10 {
        assert_eq!(which_backend(&t.client, vip(80)).expect("connect"), "b1");
    }
    assert!(
        agent.log_text().contains("retrying on another node"),
        "log:\n{}",
        agent.log_text()
    );

    // Only the refusing node: the agent accepts, fails to connect twice, and resets.
    let only_b2 = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&nodes_toml(&[1, 2], 8080), &nodes_toml(&[2], 8080));
    reload(&agent, &cfg, only_b2, 1);
    let start = Instant::now();
    let r = which_backend(&t.client, vip(80));
    assert!(r.is_err(), "no backend: {r:?}");
    let e = r.unwrap_err();
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        ),
        "{e}"
    );
    assert!(start.elapsed() < Duration::from_secs(3), "no timeout");
}

/// What [`header_backend`] sends after the client's half-close.
const AFTER_EOF: &[u8] = b"sent after your FIN";

/// A std listener in the backends namespace that accepts one connection, reads the PROXY
/// header with `read_header`, reports it (and the peer it saw), then echoes; at the client's
/// half-close it still sends [`AFTER_EOF`], then closes.
fn header_backend(
    t: &Topology,
    addr: SocketAddr,
    read_header: fn(&mut TcpStream) -> io::Result<Vec<u8>>,
) -> (mpsc::Receiver<(SocketAddr, Vec<u8>)>, JoinHandle<()>) {
    let listener = t
        .backends
        .enter(move || {
            let l = TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok::<_, io::Error>(l)
        })
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        };
        s.set_nonblocking(false).expect("blocking");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let header = match read_header(&mut s) {
            Ok(h) => h,
            Err(_) => return,
        };
        let _ = tx.send((peer, header));
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    let _ = s.write_all(AFTER_EOF);
                    return;
                }
                Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (rx, h)
}

/// The v1 line, up to and with its CRLF (at most 107 bytes, as the spec bounds it).
fn read_v1(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") && line.len() < 107 {
        s.read_exact(&mut b)?;
        line.push(b[0]);
    }
    Ok(line)
}

/// The v2 header: 16 fixed bytes, then as many as its length field says.
fn read_v2(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut h = vec![0u8; 16];
    s.read_exact(&mut h)?;
    let len = u16::from_be_bytes([h[14], h[15]]) as usize;
    let mut rest = vec![0u8; len];
    s.read_exact(&mut rest)?;
    h.extend_from_slice(&rest);
    Ok(h)
}

/// A client connection through a PROXY-protocol port: echoes, and returns the client's
/// source port and what the backend got.
fn through_proxy_port(
    tag: &str,
    version: &str,
    read_header: fn(&mut TcpStream) -> io::Result<Vec<u8>>,
) -> (u16, SocketAddr, Vec<u8>) {
    require_root();
    let t = Topology::new(tag, Wiring::TwoNic, 1);
    let (rx, backend) =
        header_backend(&t, SocketAddr::new(backend_v4(1).into(), 8080), read_header);
    let cfg = t.write_config(&tcp_port(
        80,
        &format!("proxy_protocol = \"{version}\""),
        &nodes_toml(&[1], 8080),
    ));
    // XDP is attached (default xdp_mode): the port must still reach the agent's listener.
    let agent = Agent::start(&t, &cfg);
    let mut c = connect_in(&t.client, vip(80), Duration::from_secs(5)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let client_port = c.local_addr().expect("local addr").port();
    echo(&mut c, b"data after the header").unwrap_or_else(|e| {
        panic!("echo: {e}; agent log:\n{}", agent.log_text());
    });
    let (peer, header) = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the backend got a header");
    // Half-close: the backend sees EOF, and what it sends after that still arrives, followed
    // by its own close.
    c.shutdown(Shutdown::Write).expect("half-close");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest)
        .expect("the backend's last words, then EOF");
    assert_eq!(rest, AFTER_EOF, "half-close propagated both ways");
    backend.join().expect("backend thread");
    (client_port, peer, header)
}

#[test]
fn proxy_protocol_v1_header_reaches_the_backend() {
    let (client_port, peer, header) = through_proxy_port("u3", "v1", read_v1);
    assert_eq!(
        String::from_utf8_lossy(&header),
        format!("PROXY TCP4 {CLIENT} {VIP} {client_port} 80\r\n"),
    );
    assert_eq!(
        String::from_utf8_lossy(&header),
        format!("PROXY TCP4 198.18.0.2 198.18.0.10 {client_port} 80\r\n"),
    );
    assert_eq!(peer.ip(), IpAddr::V4(LB_PRIVATE));
}

#[test]
fn proxy_protocol_v2_header_reaches_the_backend() {
    let (client_port, peer, h) = through_proxy_port("u4", "v2", read_v2);
    assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n", "signature");
    assert_eq!(h[12], 0x21, "version 2, PROXY command");
    assert_eq!(h[13], 0x11, "TCP over IPv4");
    assert_eq!(
        u16::from_be_bytes([h[14], h[15]]),
        12,
        "address block length"
    );
    assert_eq!(h.len(), 28);
    assert_eq!(&h[16..20], &CLIENT.octets(), "source address");
    assert_eq!(&h[20..24], &VIP.octets(), "destination address");
    assert_eq!(
        u16::from_be_bytes([h[24], h[25]]),
        client_port,
        "source port"
    );
    assert_eq!(u16::from_be_bytes([h[26], h[27]]), 80, "destination port");
    assert_eq!(peer.ip(), IpAddr::V4(LB_PRIVATE));
}

/// Health in user space: both nodes come UP from their active checks; one stops, and the
/// connect failures of proxied connections (passive checks, through the node's check task)
/// mark it DOWN long before its next active check, after which no connection goes there.
#[test]
fn passive_checks_mark_a_refusing_node_down_in_user_space() {
    require_root();
    let t = Topology::new("u5", Wiring::TwoNic, 2);
    let mut backends: Vec<Backend> = (1..=2)
        .map(|i| {
            Backend::start(
                &t.backends,
                &format!("b{i}"),
                SocketAddr::new(backend_v4(i).into(), 8080),
            )
        })
        .collect();
    let port = "[[port]]\nport = 80\nprotocol = \"tcp\"\nalgorithm = \"roundrobin\"\n\
         check = \"connection\"\ncheck_interval = 60\ncheck_timeout = 1\ncheck_attempts = 2\n\
         check_passive = true\n\n"
        .to_string()
        + &nodes_toml(&[1, 2], 8080);
    let cfg = write_config_no_xdp(&t, &port);
    let agent = Agent::start_without_xdp(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    wait_log(&agent, "node b1 is UP", 1, Duration::from_secs(15));
    wait_log(&agent, "node b2 is UP", 1, Duration::from_secs(15));
    backends[0].stop();
    let stopped = Instant::now();
    // Every client connection still succeeds (a refusal is retried on b2) while nb learns.
    nb_tests::topo::wait_until(
        "b1 DOWN by passive checks",
        &agent,
        Duration::from_secs(12),
        || {
            assert_eq!(
                which_backend(&t.client, vip(80)).expect("retried on b2"),
                "b2"
            );
            agent.log_text().contains("node b1 is DOWN (passive")
        },
    );
    assert!(stopped.elapsed() < Duration::from_secs(30));
    let retries = agent.log_text().matches("retrying on another node").count();
    for _ in 0..10 {
        assert_eq!(which_backend(&t.client, vip(80)).expect("connect"), "b2");
    }
    assert_eq!(
        agent.log_text().matches("retrying on another node").count(),
        retries,
        "a DOWN node is no longer tried"
    );
}

/// `xdp_mode = "auto"` and attaching fails (here: an interface that does not exist, after one
/// that does): the agent warns, leaves nothing attached, and serves tcp ports in user space.
#[test]
fn failed_attach_in_auto_mode_falls_back_to_user_space() {
    require_root();
    let t = Topology::new("u6", Wiring::TwoNic, 1);
    let _b1 = Backend::start(
        &t.backends,
        "b1",
        SocketAddr::new(backend_v4(1).into(), 8080),
    );
    let path = t.dir.join("nb.toml");
    let balancer = t.balancer_toml().replace(
        "interfaces = [\"pub0\", \"priv0\"]",
        "interfaces = [\"pub0\", \"nbnosuch0\"]\nxdp_mode = \"auto\"",
    );
    assert!(balancer.contains("nbnosuch0"));
    let port = tcp_port(80, "", &nodes_toml(&[1], 8080));
    std::fs::write(&path, format!("{balancer}{port}")).expect("write config");
    let agent = Agent::start_without_xdp(&t, &path);
    assert!(
        agent.log_text().contains("served in user space"),
        "log:\n{}",
        agent.log_text()
    );
    assert!(
        !t.pin_path.join("link_pub0").exists(),
        "the interface attached before the failure is detached again"
    );
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut c, label) = open_greeted(&t, vip(80));
    assert_eq!(label, "b1");
    echo(&mut c, b"fallback").expect("echo");
}

/// Reads from `s` until the balancer closes it (EOF or reset); how long that took from now.
fn time_to_close(s: &mut TcpStream) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => start.elapsed(),
        Ok(n) => panic!("unexpected {n} bytes: {:?}", &buf[..n]),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => start.elapsed(),
        Err(e) => panic!("not closed after {:?}: {e}", start.elapsed()),
    }
}

/// A user-space tcp connection with no byte either way for the idle timeout (an hour;
/// 2 s here through the test override) is closed at both ends: a quiet one, a half-closed one
/// whose backend never closes its side, but not one that keeps talking.
#[test]
fn idle_connections_are_closed_after_the_idle_timeout() {
    require_root();
    let t = Topology::new("u7", Wiring::TwoNic, 1);
    let _b1 = Backend::start(
        &t.backends,
        "b1",
        SocketAddr::new(backend_v4(1).into(), 8080),
    );
    let cfg = write_config_no_xdp(&t, &tcp_port(80, "", &nodes_toml(&[1], 8080)));
    let idle = Duration::from_secs(2);
    let agent =
        Agent::start_without_xdp_with_env(&t, &cfg, &[("NB_TEST_TCP_IDLE_TIMEOUT_SECS", "2")]);
    wait_log(
        &agent,
        "idle timeout 2 s (test override)",
        1,
        Duration::from_secs(5),
    );
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));

    // Quiet after one exchange: closed one timeout after its last byte.
    let (mut quiet, _) = open_greeted(&t, vip(80));
    echo(&mut quiet, b"one exchange").expect("echo");
    // Half-closed: the client's FIN goes through, the backend never closes its side (the
    // test backend keeps every socket), so only the idle timeout ends it.
    let (mut half, _) = open_greeted(&t, vip(80));
    half.shutdown(Shutdown::Write).expect("half-close");
    let (half_tx, half_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = half_tx.send(time_to_close(&mut half));
    });

    let took = time_to_close(&mut quiet);
    println!("quiet connection closed after {took:?}");
    assert!(
        took >= idle - Duration::from_millis(200) && took < idle * 2,
        "quiet connection closed after {took:?}"
    );
    // Busy: an exchange every 500 ms for 5 s (2.5 timeouts) keeps it open. Opened only now:
    // left alone while the quiet one was timed, it would have been idle just as long.
    let (mut busy, _) = open_greeted(&t, vip(80));
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        echo(&mut busy, b"still here").expect("a busy connection stays open");
        std::thread::sleep(Duration::from_millis(500));
    }
    let took = time_to_close(&mut busy);
    assert!(
        took < idle * 2,
        "busy connection closed {took:?} after it went quiet"
    );
    let took = half_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("half-closed connection ended");
    println!("half-closed connection closed after {took:?}");
    assert!(
        took >= idle - Duration::from_millis(200) && took < idle * 2,
        "half-closed connection closed after {took:?}"
    );
}

/// SIGTERM: the listeners close at once, and a connection already copying keeps working
/// until it ends (here by the idle timeout, 2 s through the test override, after its client
/// went away); the agent exits then, inside its 10 s bound, not before.
#[test]
fn sigterm_lets_user_space_connections_finish() {
    require_root();
    let t = Topology::new("u8", Wiring::TwoNic, 1);
    let _b1 = Backend::start(
        &t.backends,
        "b1",
        SocketAddr::new(backend_v4(1).into(), 8080),
    );
    let cfg = write_config_no_xdp(&t, &tcp_port(80, "", &nodes_toml(&[1], 8080)));
    let mut agent =
        Agent::start_without_xdp_with_env(&t, &cfg, &[("NB_TEST_TCP_IDLE_TIMEOUT_SECS", "2")]);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, _) = open_greeted(&t, vip(80));
    echo(&mut conn, b"before the signal").expect("echo");

    let signalled = Instant::now();
    agent.signal(libc::SIGTERM);
    // This one, and maybe the readiness probe's, which the backend never closes (it ends by
    // the idle timeout).
    wait_log(
        &agent,
        "user-space tcp connection(s) finishing",
        1,
        Duration::from_secs(2),
    );
    let e = connect_in(&t.client, vip(80), Duration::from_secs(2))
        .expect_err("no new connection while stopping");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    // Still copying after the signal: an exchange every 500 ms for 2.5 s (past the idle
    // timeout, so only the exchanges keep it open), then the client goes.
    while signalled.elapsed() < Duration::from_millis(2500) {
        echo(&mut conn, b"after the signal").expect("the connection is not cut");
        std::thread::sleep(Duration::from_millis(500));
    }
    let last = signalled.elapsed();
    drop(conn);
    wait_log(&agent, "stopping; ", 1, Duration::from_secs(8));
    let took = signalled.elapsed();
    println!("agent stopped {took:?} after SIGTERM (last exchange at {last:?})");
    assert!(
        took >= last + Duration::from_millis(1500) && took < Duration::from_secs(9),
        "waited for the connection to end, within the bound: {took:?}"
    );
    let status = agent.stop().expect("exit status");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
}
