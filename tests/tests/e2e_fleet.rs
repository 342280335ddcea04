//! End to end: two balancers announce one public address through BIRD to a router that
//! spreads flows over both (ECMP). Each announces only while it can serve, withdraws at
//! `nbctl fleet drain` and when it stops, and a restarted agent clears what a crashed one
//! left in the announce table (README "A fleet of balancers").

use std::{collections::HashMap, io::Write, net::TcpStream, time::Duration};

use nb_tests::{
    fleet::{ANNOUNCE_TABLE, Engine, Fleet, VIP, VIP6},
    netns::{Backend, connect_in, which_backend},
    require_root,
    topo::wait_log,
};

/// `nbctl` adding a draining node `b9` to port 80.
const ADD_B9: &[&str] = &[
    "node",
    "add",
    "80",
    "b9",
    "198.18.2.29:8080",
    "--mode",
    "drain",
];

/// BGP sessions come up and routes travel within a few seconds here (hold time 3 s).
const ROUTING: Duration = Duration::from_secs(20);

fn tcp_port() -> String {
    nb_tests::fleet::tcp_port(1)
}

/// Opens `n` connections from the client to the public address; each must reach the
/// backend. Each with the balancer that carried it (the backend's peer: connections are
/// opened one after the other, so the backend accepts them in that order), and how many each
/// balancer carried.
fn connect_many(
    f: &Fleet,
    b: &Backend,
    n: usize,
) -> (Vec<(TcpStream, String)>, HashMap<String, usize>) {
    let before = b.peers().len();
    let mut open = Vec::new();
    for i in 0..n {
        let mut s = connect_in(&f.client, Fleet::vip(80), Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut greeting = [0u8; 3];
        std::io::Read::read_exact(&mut s, &mut greeting)
            .unwrap_or_else(|e| panic!("connection {i}: no greeting: {e}"));
        assert_eq!(&greeting, b"b1\n");
        open.push(s);
    }
    // Health checks connect to the backend too, and close at once: only the open ones are
    // these connections.
    let peers = b.peers_open();
    let via: Vec<String> = peers[before..]
        .iter()
        .filter(|(_, open)| *open)
        .map(|(p, _)| p.ip().to_string())
        .collect();
    assert_eq!(via.len(), n, "the backend saw every connection");
    let mut by = HashMap::new();
    for v in &via {
        *by.entry(v.clone()).or_insert(0) += 1;
    }
    (open.into_iter().zip(via).collect(), by)
}

fn echo_ok(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping\n").is_err() {
        return false;
    }
    let mut back = [0u8; 5];
    std::io::Read::read_exact(s, &mut back).is_ok() && &back == b"ping\n"
}

#[test]
fn a_fleet_announces_what_it_can_serve_and_withdraws_before_it_stops() {
    require_root();
    let f = Fleet::new("fa", 2, Engine::Bgp);
    let mut backend = f.backend();
    for i in 0..2 {
        f.write_config(i, &tcp_port());
    }
    let mut a1 = f.start_agent(0);
    let mut a2 = f.start_agent(1);
    for a in [&a1, &a2] {
        wait_log(a, "198.18.100.1: announced", 1, ROUTING);
    }
    let took = f.wait_next_hops(&[0, 1], ROUTING);
    println!("both balancers announced and in the router's ECMP route {took:?} after the checks");
    let took = f.wait_next_hops6(&[0, 1], ROUTING);
    println!("and in its IPv6 ECMP route {took:?} later");
    let v6 = std::net::SocketAddr::new(VIP6.into(), 80);
    assert_eq!(which_backend(&f.client, v6).expect("over IPv6"), "b1");
    for i in 0..2 {
        assert!(
            f.announced(i).contains(&VIP.to_string()),
            "{}",
            f.announced(i)
        );
        let ready = f.nbctl(i, &["ready"]);
        assert!(ready.status.success(), "{ready:?}");
        let metrics = f.lbs[i]
            .ns
            .sh(&format!("curl -sS http://{}:9110/metrics", f.lbs[i].addr));
        for line in [
            "nb_ready 1",
            "nb_fleet_announced{address=\"198.18.100.1\"} 1",
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }
    }

    // Both run the same ports and nodes: one config digest.
    let out = f.nbctl(0, &["fleet", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text.lines().count(),
        3,
        "a header and both balancers:\n{text}"
    );
    assert!(
        text.contains("lb1") && text.contains("lb2") && !text.contains("DIFFERS"),
        "{text}"
    );
    // A node added through lb2's API only: lb1 sees lb2 run another config.
    let add = f.nbctl(1, ADD_B9);
    assert!(add.status.success(), "{add:?}");
    let out = f.nbctl(0, &["fleet", "status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("lb2") && l.contains("DIFFERS")),
        "{text}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lb2 (198.18.2.12:9110) runs another config"),
        "{out:?}"
    );
    // `--fleet` runs a write on every balancer in turn, and is not atomic: lb1 refuses to
    // remove a node it does not have, lb2 removes it, and the two agree again.
    let rm = f.nbctl(0, &["--fleet", "node", "rm", "80", "b9"]);
    let text = String::from_utf8_lossy(&rm.stdout).to_string();
    assert_eq!(rm.status.code(), Some(1), "{rm:?}");
    assert!(
        text.contains("== 198.18.2.11:9110\nfailed: refused (404)"),
        "{text}"
    );
    assert!(text.contains("== 198.18.2.12:9110\n"), "{text}");
    assert!(f.nbctl(0, &["fleet", "status"]).status.success());
    // A node added to the fleet through one nbctl: both balancers run it.
    let add = f.nbctl(0, &[&["--fleet"], ADD_B9].concat());
    assert!(add.status.success(), "{add:?}");
    assert!(f.nbctl(0, &["fleet", "status"]).status.success());
    for i in 0..2 {
        let nodes = f.nbctl(i, &["nodes", "80"]);
        assert!(
            String::from_utf8_lossy(&nodes.stdout).contains("b9"),
            "{nodes:?}"
        );
    }
    let rm = f.nbctl(1, &["--fleet", "node", "rm", "80", "b9"]);
    assert!(rm.status.success(), "{rm:?}");
    assert!(f.nbctl(0, &["fleet", "status"]).status.success());

    // ECMP spreads new connections over both.
    let (mut held, by) = connect_many(&f, &backend, 40);
    assert_eq!(by.len(), 2, "both balancers carry connections: {by:?}");
    let lb1_held = by["198.18.2.11"];

    // Drain lb1: it withdraws and says it is not ready; new connections go through lb2 only,
    // and lb2's connections go on. lb1's move to lb2 with the route, which has no state for
    // them (they break until flows are synced between balancers).
    let out = f.nbctl(0, &["fleet", "drain"]);
    assert!(out.status.success(), "{out:?}");
    let took = f.wait_next_hops(&[1], ROUTING);
    println!("drained lb1 out of the route in {took:?}");
    f.wait_next_hops6(&[1], ROUTING);
    let ready = f.nbctl(0, &["ready"]);
    assert_eq!(ready.status.code(), Some(1), "{ready:?}");
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("drained"),
        "{ready:?}"
    );
    assert_eq!(
        f.announced(0).trim(),
        "",
        "nothing in table {ANNOUNCE_TABLE}"
    );
    let (_more, by) = connect_many(&f, &backend, 20);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["198.18.2.12"], "{by:?}");
    let mut moved_broke = 0;
    for (i, (s, via)) in held.iter_mut().enumerate() {
        let ok = echo_ok(s);
        if via == "198.18.2.12" {
            assert!(ok, "connection {i} through lb2 broke at lb1's drain");
        } else if !ok {
            moved_broke += 1;
        }
    }
    println!(
        "at the drain, {moved_broke} of lb1's {lb1_held} connections broke (no flow sync yet)"
    );
    let out = f.nbctl(0, &["fleet", "undrain"]);
    assert!(out.status.success(), "{out:?}");
    f.wait_next_hops(&[0, 1], ROUTING);

    // lb2 stops: it withdraws first, so the router has lb1 alone before lb2 is gone.
    a2.stop();
    assert!(
        a2.log_text().contains("198.18.100.1: withdrawn"),
        "{}",
        a2.log_text()
    );
    assert_eq!(f.announced(1).trim(), "");
    let took = f.wait_next_hops(&[0], ROUTING);
    println!("a stopped agent out of the route {took:?} after it exited");
    let out = f.nbctl(0, &["fleet", "status"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("198.18.2.12:9110 cannot be asked"),
        "{out:?}"
    );
    assert_eq!(
        which_backend(&f.client, Fleet::vip(80)).expect("via lb1"),
        "b1"
    );

    // lb1 crashes: its route stays (as its data path would), and the next agent clears it
    // before announcing anew once its check passes.
    a1.kill9();
    assert!(
        f.announced(0).contains(&VIP.to_string()),
        "a crash leaves the route"
    );
    a1 = f.start_agent(0);
    wait_log(
        &a1,
        "route left in table 100 by an earlier agent removed",
        1,
        ROUTING,
    );
    wait_log(&a1, "198.18.100.1: announced", 1, ROUTING);

    // The only node goes away: nothing can be served, nothing is announced.
    backend.stop();
    wait_log(&a1, "198.18.100.1: withdrawn", 1, ROUTING);
    let ready = f.nbctl(0, &["ready"]);
    assert_eq!(ready.status.code(), Some(1), "{ready:?}");
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("no public address"),
        "{ready:?}"
    );
    let took = f.wait_next_hops(&[], ROUTING);
    println!("no node UP anywhere: the route left the router in {took:?}");
}

/// Active/passive: keepalived holds the address on the balancer whose `nbctl ready` passes,
/// the higher priority first; a drained or dead agent hands it to the other.
#[test]
fn keepalived_moves_the_address_to_the_balancer_that_is_ready() {
    require_root();
    let f = Fleet::new("fk", 2, Engine::Vrrp);
    let backend = f.backend();
    for i in 0..2 {
        f.write_config(i, &tcp_port());
    }
    let mut a1 = f.start_agent(0);
    let _a2 = f.start_agent(1);
    f.start_keepalived(0, 150);
    f.start_keepalived(1, 100);
    let took = f.wait_holder(Some(0), ROUTING);
    println!("lb1 (priority 150) holds the address {took:?} after keepalived started");
    let via = |f: &Fleet| {
        let (_s, by) = connect_many(f, &backend, 5);
        by.into_keys().collect::<Vec<_>>()
    };
    assert_eq!(via(&f), ["198.18.2.11"]);

    let out = f.nbctl(0, &["fleet", "drain"]);
    assert!(out.status.success(), "{out:?}");
    let took = f.wait_holder(Some(1), ROUTING);
    println!("lb1 drained: the address moved to lb2 in {took:?}");
    assert_eq!(via(&f), ["198.18.2.12"]);
    let out = f.nbctl(0, &["fleet", "undrain"]);
    assert!(out.status.success(), "{out:?}");
    let took = f.wait_holder(Some(0), ROUTING);
    println!("lb1 ready again: the address came back in {took:?}");

    a1.kill9();
    let took = f.wait_holder(Some(1), ROUTING);
    println!("lb1's agent killed: the address moved to lb2 in {took:?}");
    assert_eq!(via(&f), ["198.18.2.12"]);
}

/// A minimal HTTP/1.1 server in `ns` on `addr`: every request gets `200` with `label` as its
/// body, and the connection closes. Runs until the namespace goes.
fn http_backend(ns: &nb_tests::netns::Netns, label: &'static str, addr: std::net::SocketAddr) {
    let listener = ns
        .enter(move || std::net::TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match std::io::Read::read(&mut s, &mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{label}",
                        label.len()
                    )
                    .as_bytes(),
                );
            });
        }
    });
}

/// The node that answered and the `NB_SRVID` cookie set, for a GET through the public
/// address with `cookie` (or none).
fn get_with(f: &Fleet, cookie: Option<&str>) -> (String, Option<String>) {
    let header = cookie
        .map(|c| format!("-H 'Cookie: {c}'"))
        .unwrap_or_default();
    let out = f
        .client
        .sh(&format!("curl -sS -i --max-time 3 {header} http://{VIP}/"));
    let body = out
        .rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let set = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|v| v.split(';').next())
        .map(str::to_string);
    (body, set)
}

/// Cookie stickiness across the fleet: two balancers that share the stickiness key honour
/// each other's cookies, so a client keeps its node when the address moves (keepalived here,
/// after a drain).
#[test]
fn a_cookie_from_one_balancer_is_honoured_by_the_other() {
    require_root();
    let f = Fleet::new("fc", 2, Engine::Vrrp);
    f.backends.sh("ip addr add 198.18.2.21/24 dev eth0");
    http_backend(&f.backends, "b1", "198.18.2.20:8080".parse().unwrap());
    http_backend(&f.backends, "b2", "198.18.2.21:8080".parse().unwrap());
    let port = "[[port]]\nport = 80\nprotocol = \"http\"\nstickiness = \"http_cookie\"\n\
                check = \"connection\"\ncheck_interval = 2\ncheck_timeout = 1\n\n\
                [[port.node]]\nlabel = \"b1\"\naddress = \"198.18.2.20:8080\"\n\n\
                [[port.node]]\nlabel = \"b2\"\naddress = \"198.18.2.21:8080\"\n";
    // One secret for the fleet, as the README says to copy it.
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    for (i, m) in f.lbs.iter().enumerate() {
        f.write_config(i, port);
        let state = m.dir.join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let file = state.join("stickiness.key");
        std::fs::write(&file, &key).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }
    let _a1 = f.start_agent(0);
    let _a2 = f.start_agent(1);
    f.start_keepalived(0, 150);
    f.start_keepalived(1, 100);
    f.wait_holder(Some(0), ROUTING);
    // Both nodes UP on lb1 before the first request: no 503 while checks run.
    let deadline = std::time::Instant::now() + ROUTING;
    let (node, cookie) = loop {
        let (node, cookie) = get_with(&f, None);
        if let (true, Some(c)) = (node == "b1" || node == "b2", cookie) {
            break (node, c);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no answer with a cookie via lb1"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for _ in 0..5 {
        assert_eq!(
            get_with(&f, Some(&cookie)).0,
            node,
            "the cookie holds via lb1"
        );
    }

    let out = f.nbctl(0, &["fleet", "drain"]);
    assert!(out.status.success(), "{out:?}");
    f.wait_holder(Some(1), ROUTING);
    // Without a cookie, lb2 balances over both nodes; with lb1's cookie, always its node.
    let deadline = std::time::Instant::now() + ROUTING;
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "lb2 balances: {seen:?}"
        );
        seen.insert(get_with(&f, None).0);
    }
    for i in 0..10 {
        let (answered, set) = get_with(&f, Some(&cookie));
        assert_eq!(answered, node, "request {i} via lb2 with lb1's cookie");
        assert_eq!(set, None, "lb2 took the cookie as its own: nothing to set");
    }
}
