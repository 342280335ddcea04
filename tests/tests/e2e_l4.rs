//! End to end: real TCP clients and servers in network namespaces, the real nb-agent, the real
//! XDP program attached to the balancer's interfaces.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use nb_tests::{
    netns::{Backend, connect_in, which_backend},
    require_root,
    topo::spread,
    topo::{
        Agent, LB_PRIVATE, LB_PRIVATE6, Topology, Wiring, backend_v4, backend_v6, echo,
        open_greeted, vip, vip6, wait_connectable,
    },
};

fn start_backends(t: &Topology, n: u8, port: u16, v6: bool) -> Vec<Backend> {
    (1..=n)
        .map(|i| {
            let ip: IpAddr = if v6 {
                backend_v6(i).into()
            } else {
                backend_v4(i).into()
            };
            Backend::start(&t.backends, &format!("b{i}"), SocketAddr::new(ip, port))
        })
        .collect()
}

fn nodes_toml(n: u8, port: u16, v6: bool) -> String {
    (1..=n)
        .map(|i| {
            let addr = if v6 {
                format!("[{}]:{port}", backend_v6(i))
            } else {
                format!("{}:{port}", backend_v4(i))
            };
            format!("[[port.node]]\nlabel = \"b{i}\"\naddress = \"{addr}\"\n\n")
        })
        .collect()
}

fn tcp_port(port: u16, algorithm: &str, nodes: &str) -> String {
    format!(
        "[[port]]\nport = {port}\nprotocol = \"tcp\"\nalgorithm = \"{algorithm}\"\ncheck = \"none\"\n\n{nodes}"
    )
}

fn assert_even(seen: &HashMap<String, usize>, backends: usize, total: usize) {
    assert_eq!(
        seen.len(),
        backends,
        "every backend gets connections: {seen:?}"
    );
    let fair = total / backends;
    for (b, n) in seen {
        // Round robin runs per CPU, so the interleaving of two CPUs may skew it a little.
        assert!(
            *n >= fair * 6 / 10 && *n <= fair * 14 / 10,
            "{b} got {n} of {total} connections: {seen:?}"
        );
    }
}

fn even_spread(wiring: Wiring, tag: &str) {
    require_root();
    let t = Topology::new(tag, wiring, 3);
    let backends = start_backends(&t, 3, 8080, false);
    let cfg = t.write_config(&tcp_port(80, "roundrobin", &nodes_toml(3, 8080, false)));
    let _agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let seen = spread(&t, vip(80), 60);
    assert_even(&seen, 3, 60);
    for b in &backends {
        for peer in b.peers() {
            assert_eq!(
                peer.ip(),
                IpAddr::V4(LB_PRIVATE),
                "backends see the balancer's private address"
            );
            let p = peer.port();
            assert!(
                (10000..=32767).contains(&p),
                "SNAT port {p} from nb's range"
            );
        }
    }
}

#[test]
fn two_nic_spreads_evenly_with_full_nat() {
    even_spread(Wiring::TwoNic, "e1");
}

#[test]
fn one_nic_spreads_evenly_with_full_nat() {
    even_spread(Wiring::OneNic, "e2");
}

#[test]
fn ipv6_spreads_with_full_nat() {
    require_root();
    let t = Topology::new("e3", Wiring::TwoNic, 3);
    let backends = start_backends(&t, 3, 8080, true);
    let cfg = t.write_config(&tcp_port(80, "roundrobin", &nodes_toml(3, 8080, true)));
    let _agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip6(80), Duration::from_secs(10));
    let seen = spread(&t, vip6(80), 30);
    assert_even(&seen, 3, 30);
    for b in &backends {
        for peer in b.peers() {
            assert_eq!(peer.ip(), IpAddr::V6(LB_PRIVATE6));
        }
    }
}

/// One connection stays on its backend while backends are added and removed around it (and
/// even when its own backend leaves the config: existing flows are left alone).
#[test]
fn connection_keeps_its_backend_while_backends_change() {
    require_root();
    let t = Topology::new("e4", Wiring::TwoNic, 5);
    let _backends = start_backends(&t, 5, 8080, false);
    let cfg = t.write_config(&tcp_port(80, "source", &nodes_toml(3, 8080, false)));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, mine) = open_greeted(&t, vip(80));
    echo(&mut conn, b"before").expect("echo before");

    let reloads = [
        nodes_toml(5, 8080, false),                     // two added
        nodes_toml(2, 8080, false),                     // three removed
        nodes_toml(5, 8080, false).replace("b1", "x1"), // renamed: a different node
    ];
    for (i, nodes) in reloads.iter().enumerate() {
        std::fs::write(
            &cfg,
            format!("{}{}", t.balancer_toml(), tcp_port(80, "source", nodes)),
        )
        .expect("rewrite config");
        agent.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(5);
        while agent.log_text().matches("reloaded").count() < i + 1 {
            assert!(
                Instant::now() < deadline,
                "no reload logged:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        echo(&mut conn, format!("after reload {i}").as_bytes())
            .expect("echo on the kept connection");
        // New connections keep working through every change.
        which_backend(&t.client, vip(80)).expect("new connection after reload");
    }
    assert!(mine.starts_with('b'), "label {mine}");
}

/// A reload that removes a tcp port lets the port's running connections finish on their
/// backends (a reload drops no connection) while new connections to it reach the balancer's
/// own stack; once the last of them is over, the program stops looking at the port.
#[test]
fn removed_port_lets_running_connections_finish() {
    require_root();
    let t = Topology::new("e7", Wiring::TwoNic, 2);
    let mut backends = start_backends(&t, 2, 8080, false);
    let both = format!(
        "{}{}",
        tcp_port(80, "roundrobin", &nodes_toml(2, 8080, false)),
        tcp_port(81, "roundrobin", &nodes_toml(2, 8080, false))
    );
    let cfg = t.write_config(&both);
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(81), Duration::from_secs(10));
    let (mut conn, _) = open_greeted(&t, vip(81));
    echo(&mut conn, b"before").expect("echo before");
    assert!(port_bit(&t, 81), "a served port has its bit");

    std::fs::write(
        &cfg,
        format!(
            "{}{}",
            t.balancer_toml(),
            tcp_port(80, "roundrobin", &nodes_toml(2, 8080, false))
        ),
    )
    .expect("rewrite config");
    agent.signal(libc::SIGHUP);
    nb_tests::topo::wait_log(&agent, "reloaded", 1, Duration::from_secs(5));
    for i in 0..5 {
        echo(&mut conn, format!("after removal {i}").as_bytes())
            .expect("the running connection of the removed port goes on");
        std::thread::sleep(Duration::from_millis(500));
    }
    let err = connect_in(&t.client, vip(81), Duration::from_secs(5))
        .expect_err("nothing listens on the balancer's own port 81");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    which_backend(&t.client, vip(80)).expect("port 80 still served");

    // Both sides close (the test backends keep every socket until stopped; a client's FIN
    // alone leaves a connection half open, which expires only after 120 s of silence).
    drop(conn);
    for b in &mut backends {
        b.stop();
    }
    // Closed flows expire after 10 s; the sweep (every 2 s) then clears the bit.
    nb_tests::topo::wait_until(
        "port 81's bit cleared",
        &agent,
        Duration::from_secs(30),
        || !port_bit(&t, 81),
    );
    assert!(port_bit(&t, 80), "port 80 keeps its bit");
}

/// Whether the program's port bitmap has `port`.
fn port_bit(t: &Topology, port: u16) -> bool {
    use aya::maps::{Array, Map, MapData};
    let data = MapData::from_pin(t.pin_path.join(nb_common::maps::SVC_PORTS)).expect("bitmap pin");
    let a: Array<MapData, u64> = Array::try_from(Map::Array(data)).expect("bitmap");
    a.get(&u32::from(port / 64), 0).expect("bitmap word") & (1 << (port % 64)) != 0
}

/// A port with no usable backend refuses a new connection at once (RST), no timeout.
#[test]
fn no_backend_refuses_at_once() {
    require_root();
    let t = Topology::new("e5", Wiring::TwoNic, 1);
    let _backends = start_backends(&t, 1, 8080, false);
    let nodes = format!(
        "[[port.node]]\nlabel = \"b1\"\naddress = \"{}:8080\"\nmode = \"reject\"\n",
        backend_v4(1)
    );
    let ports = format!(
        "{}{}",
        tcp_port(81, "roundrobin", &nodes),
        tcp_port(80, "roundrobin", &nodes_toml(1, 8080, false))
    );
    let cfg = t.write_config(&ports);
    let _agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let start = Instant::now();
    let err =
        connect_in(&t.client, vip(81), Duration::from_secs(5)).expect_err("port 81 has no backend");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "refused, not {err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "refused at once, took {:?}",
        start.elapsed()
    );
}

/// Traffic that is not for a tcp port reaches the balancer's own stack untouched.
#[test]
fn other_traffic_reaches_the_kernel() {
    require_root();
    let t = Topology::new("e6", Wiring::TwoNic, 1);
    let cfg = t.write_config(&tcp_port(80, "roundrobin", &nodes_toml(1, 8080, false)));
    let _agent = Agent::start(&t, &cfg);
    // A listener on the balancer itself, on another port of the public address.
    let own = Backend::start(&t.lb, "lb-itself", vip(2222));
    assert_eq!(
        which_backend(&t.client, vip(2222)).expect("connect to the balancer's own port"),
        "lb-itself"
    );
    assert!(
        t.client.sh_ok("ping -c 1 -W 2 198.18.0.10"),
        "ICMP to the public address answered by the kernel"
    );
    drop(own);
}

/// `nb-agent check` names file and line of each error and exits 1; a good file exits 0.
#[test]
fn check_reports_file_and_line() {
    let dir = std::env::temp_dir().join(format!("nb-check-{}", nb_tests::netns::unique_suffix()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[balancer]\ninterfaces = [\"eth0\"]\n\n[[port]]\nport = 80\nprotocol = \"tcp\"\ncheck_interval = 1\n",
    )
    .expect("write");
    let out = std::process::Command::new(nb_tests::topo::agent_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("run nb-agent check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit 1 on a bad file: {err}");
    assert!(
        err.contains(&format!("{}:7:", bad.display())),
        "error names file and line 7: {err}"
    );
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[balancer]\ninterfaces = [\"eth0\"]\n\n[[port]]\nport = 80\nprotocol = \"tcp\"\n",
    )
    .expect("write");
    let out = std::process::Command::new(nb_tests::topo::agent_bin())
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("run nb-agent check");
    assert!(
        out.status.success(),
        "good file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TcpStream from `ns` to `to`, bound first to client port `from` of the client's address
/// (std has no bind-before-connect).
fn connect_from_port(
    ns: &nb_tests::netns::Netns,
    from: u16,
    to: SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only");
    };
    ns.enter(move || {
        let sa = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: plain socket(2) call; the descriptor is handed to a TcpStream at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket owned by nothing else; the stream closes it.
        let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        let local = sa(nb_tests::topo::CLIENT, from);
        // SAFETY: `local` is a valid sockaddr_in of `len` bytes for the duration of the call.
        if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sa(*to.ip(), to.port());
        // SAFETY: as above.
        if unsafe { libc::connect(fd, (&raw const remote).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    })
}

/// A new connection that must take over the SNAT port of a closed connection meets a backend
/// that still holds that connection in TIME_WAIT (the backend closed first). Linux accepts its
/// SYN there only with a newer timestamp than the old connection's last (PAWS), and a client's
/// timestamps start at a random offset for every connection: taking the oldest port, half the
/// new connections were refused (an ACK for the old connection, the client's reset, a resent
/// SYN: 1-3 s on many systems). nb takes a port whose TIME_WAIT accepts the SYN.
#[test]
fn taken_over_ports_meet_no_time_wait_refusal() {
    takeover_scene("e8", false);
}

/// The same with no agent running once the old connections are closed: port takeover counts
/// time by the program's own clock (which used to stand still with the agent stopped, so no
/// port was ever old enough to take over).
#[test]
fn ports_are_taken_over_with_no_agent_running() {
    takeover_scene("e9", true);
}

fn takeover_scene(tag: &str, stop_agent: bool) {
    require_root();
    let t = Topology::new(tag, Wiring::TwoNic, 1);
    // A backend that closes first: greets, then closes.
    let listener = t
        .backends
        .enter(|| {
            let l = std::net::TcpListener::bind(SocketAddr::new(backend_v4(1).into(), 8080))?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .expect("bind backend");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = std::io::Write::write_all(&mut s, b"bye\n");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        })
    };
    struct StopServer(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        Option<std::thread::JoinHandle<()>>,
    );
    impl Drop for StopServer {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(h) = self.1.take() {
                let _ = h.join();
            }
        }
    }
    let _server = StopServer(stop, Some(server));
    let cfg = t.write_config(&tcp_port(80, "roundrobin", &nodes_toml(1, 8080, false)));
    let mut agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));

    // Clients (ports of the client's address) whose SYNs try eight SNAT ports none of the
    // others tries, and for each of those ports a client that tries it first.
    let word = |a: std::net::Ipv4Addr| [u32::from_ne_bytes(a.octets()), 0, 0, 0];
    let tries = |port: u16| {
        nb_common::hash::snat_tries(
            &word(nb_tests::topo::CLIENT),
            &word(nb_tests::topo::VIP),
            port.to_be(),
            80u16.to_be(),
        )
    };
    let mut first_try: HashMap<u16, Vec<u16>> = HashMap::new();
    for p in (1024..=65535u16).filter(|p| !(40000..50000).contains(p)) {
        first_try.entry(tries(p)[0]).or_default().push(p);
    }
    let mut taken_snat = std::collections::HashSet::new();
    let mut used_ports = std::collections::HashSet::new();
    let mut scenes: Vec<(u16, Vec<u16>)> = Vec::new();
    for b in 40000..50000u16 {
        if scenes.len() == 16 {
            break;
        }
        let qs = tries(b);
        if qs.iter().any(|q| taken_snat.contains(q)) {
            continue;
        }
        let olds: Option<Vec<u16>> = qs
            .iter()
            .map(|q| {
                first_try
                    .get(q)?
                    .iter()
                    .copied()
                    .find(|p| !used_ports.contains(p))
            })
            .collect();
        let Some(olds) = olds else { continue };
        taken_snat.extend(qs.iter().copied());
        used_ports.extend(olds.iter().copied());
        scenes.push((b, olds));
    }
    assert_eq!(scenes.len(), 16, "found 16 clients to stage");

    // The old connections: each gets its first port; the backend closes first, the client
    // after it, so the backend holds each in TIME_WAIT (60 s).
    for (_, olds) in &scenes {
        for &p in olds {
            let mut s = connect_from_port(&t.client, p, vip(80)).expect("old connection");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut s, &mut buf).expect("greeting, then the close");
            assert_eq!(buf, b"bye\n");
        }
    }
    // The last closes may still be on their way (FIN_WAIT2 until the client's FIN lands).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let time_wait: usize = t
            .backends
            .sh("ss -Htan state time-wait | wc -l")
            .trim()
            .parse()
            .expect("count");
        if time_wait >= 128 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the backend holds the old connections in TIME_WAIT: {time_wait} of 128"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if stop_agent {
        // Its pins and program stay; nothing sweeps the closed connections' entries now.
        agent.stop();
    }
    // Closed ports may be taken over once silent for SNAT_TAKEOVER_SECS.
    std::thread::sleep(Duration::from_millis(
        nb_common::SNAT_TAKEOVER_SECS * 1000 + 1500,
    ));

    let refused_before = t.backends.tcp_ext("PAWSTimewait").expect("PAWSTimewait");
    let resent_before = t.client.tcp_ext("TCPSynRetrans").expect("TCPSynRetrans");
    for (b, _) in &scenes {
        let mut s = connect_from_port(&t.client, *b, vip(80)).expect("new connection");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut s, &mut buf).expect("greeting");
        assert_eq!(buf, b"bye\n", "client port {b}");
    }
    let refused = t.backends.tcp_ext("PAWSTimewait").expect("PAWSTimewait") - refused_before;
    let resent = t.client.tcp_ext("TCPSynRetrans").expect("TCPSynRetrans") - resent_before;
    // Each new connection tries eight ports, each in TIME_WAIT with an even chance of
    // refusing it: all eight refuse 1 time in 256, when nb has no better port to take. Taking
    // the oldest, about 8 of the 16 were refused.
    assert!(
        refused <= 1 && resent <= 1,
        "{refused} SYNs refused by TIME_WAIT (PAWS), {resent} resent, of 16"
    );
}
