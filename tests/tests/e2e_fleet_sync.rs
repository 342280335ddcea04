//! End to end: flow sync between the balancers of a fleet (README "Flow sync"). Two
//! balancers forward a tcp port in XDP behind a BGP router's ECMP; each sends the
//! connections it opens to the other, and keepalived holds each one's SNAT address. When one
//! dies hard (agent killed, links down), the router moves its connections to the survivor,
//! which forwards them with the dead one's translation, and the backend's replies reach it
//! once keepalived moved the dead one's SNAT address: no connection breaks.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use nb_agent::sync::wire::{self, Kind, Message, Op, Record};
use nb_common::{FAMILY_V4, FlowKey, PROTO_TCP, SyncEvent};
use nb_tests::{
    fleet::{BACKENDS, BACKENDS6, Engine, Fleet, SYNC_PORT, Shape, VIP, VIP6, snat, snat6},
    netns::{Backend, connect_in},
    require_root,
};

/// BGP sessions come up and routes travel within a few seconds here (hold time 3 s).
const ROUTING: Duration = Duration::from_secs(20);

const SHAPE: Shape = Shape {
    xdp: true,
    sync: true,
};

fn tcp_port() -> String {
    nb_tests::fleet::tcp_port(2)
}

/// Opens `n` connections to the public address, each greeted by the backend; with the
/// balancer that carried each (the SNAT address the backend saw).
fn open(f: &Fleet, b: &Backend, n: usize) -> Vec<(TcpStream, usize)> {
    open_via(f, b, Fleet::vip(80), "b1", n)
}

/// [`open`] to `to` (IPv4 or IPv6) on backend `b`, which greets as `label`.
fn open_via(
    f: &Fleet,
    b: &Backend,
    to: SocketAddr,
    label: &str,
    n: usize,
) -> Vec<(TcpStream, usize)> {
    let snat_of = |j: usize| -> std::net::IpAddr {
        if to.is_ipv4() {
            snat(j).into()
        } else {
            snat6(j).into()
        }
    };
    let mut out = Vec::new();
    for i in 0..n {
        let before = b.peers().len();
        let mut s = connect_in(&f.client, to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut greeting = vec![0u8; label.len() + 1];
        s.read_exact(&mut greeting)
            .unwrap_or_else(|e| panic!("connection {i}: no greeting: {e}"));
        assert_eq!(greeting, format!("{label}\n").as_bytes());
        // The first connection from a SNAT address since (health checks come from the
        // balancers' own addresses).
        let peers = b.peers();
        let by = peers[before..]
            .iter()
            .find_map(|p| (0..f.lbs.len()).find(|&j| p.ip() == snat_of(j)))
            .unwrap_or_else(|| panic!("connection {i}: no SNAT address in {peers:?}"));
        out.push((s, by));
    }
    out
}

fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::other("wrong echo"));
    }
    Ok(())
}

/// Waits until `ok` holds, panicking with `what` after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A number in member `i`'s metrics: the value of the line starting with `series`.
fn metric(f: &Fleet, i: usize, series: &str) -> u64 {
    f.metrics(i)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Builds a fleet of `n` behind `engine`, each member in XDP with flow sync and holding its
/// own SNAT address; starts the agents of the first `running` and waits until the router (or
/// keepalived) sends them traffic.
fn in_sync(
    tag: &str,
    n: u8,
    running: usize,
    engine: Engine,
) -> (Fleet, Backend, Vec<nb_tests::topo::Agent>) {
    in_sync_with(tag, n, running, engine, &tcp_port())
}

/// [`in_sync`] with `port` as every member's ports.
fn in_sync_with(
    tag: &str,
    n: u8,
    running: usize,
    engine: Engine,
    port: &str,
) -> (Fleet, Backend, Vec<nb_tests::topo::Agent>) {
    let f = Fleet::new(tag, n, engine);
    let backend = f.backend();
    for i in 0..n as usize {
        f.write_config_with(i, port, SHAPE);
        f.start_snat_vrrp(i);
    }
    let own: Vec<Option<usize>> = (0..n as usize).map(Some).collect();
    let took = f.wait_snat_holders(&own, ROUTING);
    println!("each balancer holds its own SNAT address {took:?} after keepalived started");
    let agents: Vec<_> = (0..running).map(|i| f.start_agent(i)).collect();
    match engine {
        Engine::Bgp => {
            f.wait_next_hops(&(0..running).collect::<Vec<_>>(), ROUTING);
        }
        Engine::Vrrp => {
            for i in 0..running {
                f.start_keepalived(i, 150 - 10 * i as u8);
            }
            f.wait_holder(Some(0), ROUTING);
        }
    }
    (f, backend, agents)
}

fn two_in_sync(tag: &str) -> (Fleet, Backend, Vec<nb_tests::topo::Agent>) {
    in_sync(tag, 2, 2, Engine::Bgp)
}

/// Echoes a line on every connection; panics naming the first that fails.
fn echo_every(conns: &mut [(TcpStream, usize)], what: &str) {
    for (i, (s, b)) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        echo(s, format!("{what} {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} (lb{}) {what}: {e}", *b + 1));
    }
}

#[test]
fn over_ipv6_a_balancers_hard_death_breaks_none_of_its_connections() {
    require_root();
    let port = format!(
        "{}\n[[port.node]]\nlabel = \"b6\"\naddress = \"[{BACKENDS6}]:8080\"\n",
        tcp_port()
    );
    let (f, _b1, mut agents) = in_sync_with("f6", 2, 2, Engine::Bgp, &port);
    let b6 = Backend::start(&f.backends, "b6", SocketAddr::new(BACKENDS6.into(), 8080));
    f.wait_next_hops6(&[0, 1], ROUTING);
    let vip6 = SocketAddr::new(VIP6.into(), 80);
    // Started after the agents: UP at each one's next check.
    wait_for("the IPv6 node UP on both balancers", ROUTING, || {
        (0..2).all(|i| f.metrics(i).contains("node=\"b6\"} 1"))
    });
    let conns = open_via(&f, &b6, vip6, "b6", 32);
    let on0 = conns.iter().filter(|c| c.1 == 0).count();
    println!("32 IPv6 connections, {on0} through lb1");
    assert!(on0 > 0 && on0 < 32, "ECMP spread them: {on0} of 32 on lb1");
    wait_for(
        "lb2 learned lb1's IPv6 connections",
        Duration::from_secs(10),
        || metric(&f, 1, "nb_fleet_sync_flows_total{result=\"installed\"}") >= on0 as u64,
    );
    agents[0].kill9();
    f.lbs[0].ns.sh("ip link set eth0 down");
    let died = Instant::now();
    let echoes = echo_all(conns, died);
    f.wait_next_hops6(&[1], ROUTING);
    f.wait_snat_holders(&[Some(1), Some(1)], ROUTING);
    let (broken, slowest) = echoes.join().unwrap();
    println!(
        "IPv6, lb1 killed: {} of 32 broken; the slowest echo {slowest:?}",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "broken: {broken:#?}\n{}\n{}",
        f.fleet_status(1),
        f.metrics(1)
    );
}

#[test]
fn a_third_balancer_joins_and_no_connection_breaks() {
    require_root();
    let (f, backend, mut agents) = in_sync("fj", 3, 2, Engine::Bgp);
    let mut conns = open(&f, &backend, 64);
    echo_every(&mut conns, "before");
    wait_for(
        "both balancers learned each other's connections",
        Duration::from_secs(10),
        || {
            metric(&f, 0, "nb_fleet_sync_flows_total{result=\"installed\"}")
                + metric(&f, 1, "nb_fleet_sync_flows_total{result=\"installed\"}")
                >= 64
        },
    );
    // lb3 starts: it learns the 64 from lb1 and lb2 before it announces.
    let joined = Instant::now();
    agents.push(f.start_agent(2));
    f.wait_next_hops(&[0, 1, 2], ROUTING);
    let learned = metric(&f, 2, "nb_fleet_sync_flows_total{result=\"installed\"}");
    println!(
        "lb3 in the router's ECMP route {:?} after its agent started, having learned {learned} \
         connections first",
        joined.elapsed()
    );
    assert!(
        learned >= 64,
        "lb3 learned {learned} of 64:\n{}",
        f.fleet_status(2)
    );
    // Every connection goes on, although the router sends some of them to lb3 now.
    echo_every(&mut conns, "after the join");
    wait_for("lb3 swept its tables", Duration::from_secs(10), || {
        f.metrics(2).contains("nb_fleet_flows{owner=\"self\"}")
    });
    std::thread::sleep(Duration::from_secs(3));
    let carried = metric(&f, 2, "nb_fleet_flows{owner=\"self\"}");
    println!("lb3 carries {carried} of the 64 connections (ECMP moved them), none broke");
    assert!(
        carried > 0,
        "ECMP moved none of the 64 to lb3:\n{}",
        f.metrics(2)
    );
}

#[test]
fn a_drained_balancers_connections_go_on_through_the_other_then_it_stops() {
    require_root();
    let (f, backend, mut agents) = two_in_sync("fd");
    let mut conns = open(&f, &backend, 40);
    let on_lb1 = conns.iter().filter(|c| c.1 == 0).count();
    wait_for(
        "lb2 learned lb1's connections",
        Duration::from_secs(10),
        || metric(&f, 1, "nb_fleet_sync_flows_total{result=\"installed\"}") >= on_lb1 as u64,
    );
    let out = f.nbctl(0, &["fleet", "drain"]);
    assert!(out.status.success(), "{out:?}");
    let took = f.wait_next_hops(&[1], ROUTING);
    println!("lb1 drained: out of the router's route {took:?} later; it carried {on_lb1} of 40");
    echo_every(&mut conns, "drained");
    // Its agent stops (its XDP program stays and translates the backend's replies to lb1's
    // SNAT address), then the host goes away and keepalived moves the address.
    agents[0].stop();
    echo_every(&mut conns, "stopped");
    f.lbs[0].ns.sh("ip link set eth0 down");
    let gone = Instant::now();
    echo_every(&mut conns, "gone");
    println!(
        "every connection went on: drained, its agent stopped, the host gone (the last echo \
         round {:?})",
        gone.elapsed()
    );
    f.wait_snat_holders(&[Some(1), Some(1)], ROUTING);
}

#[test]
fn an_upgraded_balancer_keeps_its_routes_its_connections_and_its_sync() {
    require_root();
    let (f, backend, mut agents) = two_in_sync("fu");
    let mut conns = open(&f, &backend, 20);
    let installed = |i| metric(&f, i, "nb_fleet_sync_flows_total{result=\"installed\"}");
    wait_for(
        "lb2 learned lb1's connections",
        Duration::from_secs(10),
        || installed(1) >= conns.iter().filter(|c| c.1 == 0).count() as u64,
    );
    // lb1's agent is upgraded in place while the router keeps sending it traffic.
    let new = f.upgrade_agent(0);
    nb_tests::topo::wait_log(&new, "upgrade: told the old agent", 1, ROUTING);
    let status = agents[0].wait_exit(Duration::from_secs(20));
    let old_log = agents[0].log_text();
    assert!(status.is_some_and(|s| s.success()), "{old_log}");
    assert!(
        !old_log.contains("withdrawn"),
        "the old agent withdrew:\n{old_log}"
    );
    agents[0] = new;
    let log = agents[0].log_text();
    assert!(
        !log.contains("withdrawn"),
        "the routes stayed announced:\n{log}"
    );
    f.wait_next_hops(&[0, 1], Duration::from_secs(1));
    echo_every(&mut conns, "after the upgrade");
    // The new agent reads the program's ring and sends on the socket it took over.
    let before = installed(1);
    let more = open(&f, &backend, 20);
    let on_lb1 = more.iter().filter(|c| c.1 == 0).count() as u64;
    wait_for(
        "lb2 learned the new agent's connections",
        Duration::from_secs(10),
        || installed(1) >= before + on_lb1,
    );
    println!(
        "lb1 upgraded: routes kept, 20 connections went on, {on_lb1} new ones synced by the new \
         agent"
    );
}

#[test]
fn a_keepalived_pairs_active_balancer_dies_and_no_connection_breaks() {
    require_root();
    let (f, backend, mut agents) = in_sync("fk", 2, 2, Engine::Vrrp);
    let conns = open(&f, &backend, 64);
    assert!(
        conns.iter().all(|c| c.1 == 0),
        "the active balancer carries all"
    );
    wait_for(
        "lb2 learned lb1's connections",
        Duration::from_secs(10),
        || metric(&f, 1, "nb_fleet_sync_flows_total{result=\"installed\"}") >= 64,
    );
    agents[0].kill9();
    f.lbs[0].ns.sh("ip link set eth0 down");
    let died = Instant::now();
    let echoes = echo_all(conns, died);
    let new_after = new_connections_through(&f, died);
    f.wait_holder(Some(1), ROUTING);
    let (broken, slowest) = echoes.join().unwrap();
    println!(
        "keepalived pair, the active one killed: new connections through the other {new_after:?} \
         later; {} of 64 broken; the slowest echo {slowest:?}",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "broken: {broken:#?}\n{}\n{}",
        f.fleet_status(1),
        f.metrics(1)
    );
}

#[test]
fn a_balancers_hard_death_breaks_none_of_its_connections() {
    require_root();
    let (f, backend, mut agents) = two_in_sync("fy");
    let mut conns = open(&f, &backend, 64);
    let mut by: HashMap<usize, usize> = HashMap::new();
    for (_, b) in &conns {
        *by.entry(*b).or_default() += 1;
    }
    println!("64 connections: {by:?} by balancer");
    assert!(
        by.get(&0).copied().unwrap_or(0) > 0 && by.get(&1).copied().unwrap_or(0) > 0,
        "ECMP spread the connections over both: {by:?}"
    );
    for (i, (s, _)) in conns.iter_mut().enumerate() {
        echo(s, b"before\n").unwrap_or_else(|e| panic!("connection {i} before: {e}"));
    }
    // Each balancer installed the other's connections.
    let on0 = by[&0] as u64;
    let on1 = by[&1] as u64;
    wait_for(
        "both balancers learned each other's connections",
        Duration::from_secs(10),
        || {
            metric(&f, 1, "nb_fleet_sync_flows_total{result=\"installed\"}") >= on0
                && metric(&f, 0, "nb_fleet_sync_flows_total{result=\"installed\"}") >= on1
        },
    );
    let status = f.fleet_status(1);
    println!("lb2's fleet status: {status}");

    // lb1 dies hard: its agent killed, its link down (its XDP program, BIRD and keepalived
    // reach nobody any more). Every connection has data in flight across the death.
    agents[0].kill9();
    f.lbs[0].ns.sh("ip link set eth0 down");
    let died = Instant::now();
    let echoes = echo_all(conns, died);
    let new_after = new_connections_through(&f, died);
    f.wait_snat_holders(&[Some(1), Some(1)], ROUTING);
    let snat_moved = died.elapsed();
    println!(
        "after lb1's death: 10 new connections in a row {new_after:?} later; lb1's SNAT \
         address on lb2 {snat_moved:?} later (measured from {new_after:?} on)"
    );
    let (broken, slowest_echo) = echoes.join().unwrap();
    println!(
        "{} of 64 connections broken; the slowest echo across the death took {slowest_echo:?}",
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "broken: {broken:#?}\n{}",
        f.fleet_status(1)
    );
    f.wait_next_hops(&[1], ROUTING);
}

/// Writes a line of its own on every connection now, then reads each back in a thread:
/// the connections that broke (or answered wrong), and the longest wait since `since`.
fn echo_all(
    conns: Vec<(TcpStream, usize)>,
    since: Instant,
) -> std::thread::JoinHandle<(Vec<String>, Duration)> {
    let mut sent = Vec::new();
    let mut broken = Vec::new();
    for (i, (mut s, b)) in conns.into_iter().enumerate() {
        let line = format!("after {i}\n").into_bytes();
        match s.write_all(&line) {
            Ok(()) => sent.push((i, b, s, line)),
            Err(e) => broken.push(format!("connection {i} (lb{}): write: {e}", b + 1)),
        }
    }
    std::thread::spawn(move || {
        let mut slowest = Duration::ZERO;
        for (i, b, mut s, line) in sent {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut back = vec![0u8; line.len()];
            match s.read_exact(&mut back) {
                Ok(()) if back == line => slowest = slowest.max(since.elapsed()),
                Ok(()) => broken.push(format!("connection {i} (lb{}): wrong answer", b + 1)),
                Err(e) => broken.push(format!("connection {i} (lb{}): {e}", b + 1)),
            }
        }
        (broken, slowest)
    })
}

/// How long after `since` new connections to the public address succeed 10 times in a row.
fn new_connections_through(f: &Fleet, since: Instant) -> Duration {
    let mut ok_in_row = 0;
    while ok_in_row < 10 {
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "new connections still fail 30 s after the death"
        );
        match connect_in(&f.client, Fleet::vip(80), Duration::from_millis(500)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut g = [0u8; 3];
                if s.read_exact(&mut g).is_ok() && &g == b"b1\n" {
                    ok_in_row += 1;
                } else {
                    ok_in_row = 0;
                }
            }
            Err(_) => ok_in_row = 0,
        }
    }
    since.elapsed()
}

/// A flow sync message from `from` (in member 1's namespace, whose address is a peer of
/// member 0) to member 0.
fn send_from_peer(f: &Fleet, datagram: Vec<u8>) {
    let to = f.sync_addr(0);
    let from = f.sync_addr(1);
    f.lbs[1].ns.enter(move || {
        let s = UdpSocket::bind(SocketAddr::new(from.ip(), 0)).expect("bind");
        s.send_to(&datagram, to).expect("send");
    });
}

fn record(port: u16) -> Record {
    let word = |a: [u8; 4]| u32::from_ne_bytes(a);
    Record {
        op: Op::Opened,
        flow: SyncEvent {
            key: FlowKey {
                src: [word([198, 18, 1, 2]), 0, 0, 0],
                dst: [word(VIP.octets()), 0, 0, 0],
                sport: port.to_be(),
                dport: 80u16.to_be(),
                family: FAMILY_V4,
                proto: PROTO_TCP,
                _pad: [0; 2],
            },
            backend_addr: [word(BACKENDS.octets()), 0, 0, 0],
            snat_addr: [word(snat(1).octets()), 0, 0, 0],
            backend_port: 8080u16.to_be(),
            snat_port: (20000 + port % 1000).to_be(),
        },
    }
}

#[test]
fn a_forged_replayed_or_truncated_sync_message_installs_nothing() {
    require_root();
    let f = Fleet::new("fz", 2, Engine::Bgp);
    let _backend = f.backend();
    // Only lb1 runs an agent; the test speaks for lb2 from lb2's address.
    f.write_config_with(0, &tcp_port(), SHAPE);
    let agent = f.start_agent(0);
    let key = std::fs::read(f.sync_key()).unwrap();
    let key = key.trim_ascii().to_vec();
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let msg = |seq: u64, sender: SocketAddr, port: u16, sent_ms: u64| Message {
        kind: Kind::Flows,
        sender,
        epoch: 1000,
        seq,
        sent_ms,
        records: vec![record(port)],
    };
    let peer = f.sync_addr(1);
    let stranger = SocketAddr::new(f.lbs[1].addr.into(), SYNC_PORT + 1);
    let installed = |f: &Fleet| metric(f, 0, "nb_fleet_sync_flows_total{result=\"installed\"}");
    let rejected = |f: &Fleet, why: &str| {
        metric(
            f,
            0,
            &format!("nb_fleet_sync_rejected_total{{reason=\"{why}\"}}"),
        )
    };
    // Forged: signed with another key.
    send_from_peer(
        &f,
        wire::encode(
            &msg(1, peer, 40001, now_ms()),
            b"not the fleet's key, but 32 bytes long",
        ),
    );
    // Truncated: a good message cut short, at several lengths.
    let good = wire::encode(&msg(2, peer, 40002, now_ms()), &key);
    for len in [0, 10, wire::HEADER, good.len() - 1] {
        send_from_peer(&f, good[..len].to_vec());
    }
    // From a balancer not in sync_peers, though signed with the key.
    send_from_peer(&f, wire::encode(&msg(3, stranger, 40003, now_ms()), &key));
    // Too old.
    send_from_peer(
        &f,
        wire::encode(&msg(4, peer, 40004, now_ms() - 60_000), &key),
    );
    wait_for("every bad message counted", Duration::from_secs(5), || {
        rejected(&f, "signature") == 1
            && rejected(&f, "malformed") == 4
            && rejected(&f, "unknown_sender") == 1
            && rejected(&f, "stale") == 1
    });
    assert_eq!(installed(&f), 0, "{}", f.metrics(0));
    // A good one installs its connection; the same bytes again are a replay.
    send_from_peer(&f, good.clone());
    wait_for("the good message installed", Duration::from_secs(5), || {
        installed(&f) == 1
    });
    send_from_peer(&f, good);
    wait_for("the replay refused", Duration::from_secs(5), || {
        rejected(&f, "replayed") == 1
    });
    assert_eq!(installed(&f), 1, "{}", f.metrics(0));
    // The status says the same, and which peer it came from.
    let status: serde_json::Value = serde_json::from_str(&f.fleet_status(0)).expect("json");
    let sync = &status["fleet"]["sync"];
    assert_eq!(sync["flows_installed"], 1, "{status:#}");
    assert_eq!(sync["peers"][0]["address"], peer.to_string(), "{status:#}");
    assert_eq!(sync["peers"][0]["flows_learned"], 1, "{status:#}");

    // An operator's mistake: a reload naming a key too short is refused, and the sync runs
    // on with the key it had.
    let short = f.dir.join("short.key");
    std::fs::write(&short, "too short\n").unwrap();
    let config = std::fs::read_to_string(&f.lbs[0].config).unwrap();
    let key_path = f.sync_key().display().to_string();
    std::fs::write(
        &f.lbs[0].config,
        config.replace(&key_path, &short.display().to_string()),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    nb_tests::topo::wait_log(&agent, "reload refused", 1, Duration::from_secs(5));
    assert!(
        agent.log_text().contains("9 bytes, at least 32 needed"),
        "{}",
        agent.log_text()
    );
    send_from_peer(&f, wire::encode(&msg(5, peer, 40005, now_ms()), &key));
    wait_for(
        "a good message installed after the refused reload",
        Duration::from_secs(5),
        || installed(&f) == 2,
    );
}
