//! End to end, "set and forget": what an operator relies on once nb runs. Backends die and come
//! back, nodes are drained or held in backup, a whole pool goes DOWN, a client floods, a bad
//! config is pushed, the agent crashes; every time nb keeps doing the right thing on its own.
//!
//! Real TCP clients and servers in network namespaces, the real nb-agent, the real XDP program.
//! Timing is checked with deadlines and polling: a wait ends as soon as the state is reached,
//! and a deadline is the contract (check_interval x check_attempts, plus a margin).

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nb_common::{SNAT_PORT_MAX, SNAT_PORT_MIN};
use nb_tests::{
    netns::{Backend, connect_in, which_backend},
    require_root,
    topo::spread,
    topo::{
        Agent, Topology, Wiring, backend_v4, echo, open_greeted, vip, wait_connectable, wait_log,
        wait_until,
    },
};

/// Backends listen here (the public port is 80).
const BACKEND_PORT: u16 = 8080;
/// `check_interval` of every checked port in this file: the minimum the config allows.
const INTERVAL: Duration = Duration::from_secs(2);
/// Slack on top of a deadline the contract sets: scheduling, the data-path write, a slow CI.
const MARGIN: Duration = Duration::from_millis(1500);

/// The longest a node can take to go DOWN after it dies: `attempts` failed checks, each up to
/// one interval (+10% jitter) after the previous one.
fn down_window(attempts: u32) -> Duration {
    INTERVAL.mul_f64(1.1) * attempts + MARGIN
}

/// The longest a dead node can take to come back UP once it answers again: one check.
fn up_window() -> Duration {
    INTERVAL.mul_f64(1.1) + MARGIN
}

/// Connections a backend accepted from clients through the balancer: those from an SNAT port
/// (health checks come from the balancer's ordinary ephemeral ports).
fn client_conns(b: &Backend) -> usize {
    b.peers()
        .iter()
        .filter(|p| (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&p.port()))
        .count()
}

fn backend_addr(i: u8) -> SocketAddr {
    SocketAddr::new(backend_v4(i).into(), BACKEND_PORT)
}

/// Backends `b1..=bn`, each greeting with its label.
fn start_backends(t: &Topology, n: u8) -> Vec<Backend> {
    (1..=n)
        .map(|i| Backend::start(&t.backends, &format!("b{i}"), backend_addr(i)))
        .collect()
}

/// One `[[port.node]]` for backend `i` (label `b{i}`).
fn node(i: u8, mode: &str) -> String {
    format!(
        "[[port.node]]\nlabel = \"b{i}\"\naddress = \"{}\"\nmode = \"{mode}\"\n\n",
        backend_addr(i)
    )
}

/// Nodes `b1..=bn`, all `accept`.
fn accept_nodes(n: u8) -> String {
    (1..=n).map(|i| node(i, "accept")).collect()
}

/// Port 80, tcp, round robin, checked by TCP connect every two seconds.
fn checked_port(attempts: u32, nodes: &str) -> String {
    format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\nalgorithm = \"roundrobin\"\n\
         check = \"connection\"\ncheck_interval = {}\ncheck_timeout = 1\n\
         check_attempts = {attempts}\n\n{nodes}",
        INTERVAL.as_secs()
    )
}

/// The balancer table of `t` with `extra` lines added to it.
fn balancer_with(t: &Topology, extra: &str) -> String {
    let base = t.balancer_toml();
    assert!(base.starts_with("[balancer]\n"), "balancer table: {base}");
    base.replacen("[balancer]\n", &format!("[balancer]\n{extra}"), 1)
}

/// Rewrites the config file in place (what an operator does before `systemctl reload`).
fn rewrite(path: &Path, text: &str) {
    std::fs::write(path, text).expect("rewrite config");
}

/// Sends SIGHUP and waits for the agent to log the outcome: `"reloaded"` or
/// `"reload refused"`, which must then appear `count` times in all.
fn reload(agent: &Agent, outcome: &str, count: usize) {
    agent.signal(libc::SIGHUP);
    wait_log(agent, outcome, count, Duration::from_secs(5));
}

/// True while the agent process exists and has not exited (a zombie has exited).
fn agent_alive(agent: &Agent) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).unwrap_or_default();
    // The state follows the parenthesised command name.
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Makes new connections until `run` consecutive ones all succeed and `ok` accepts every
/// label; returns when the first of them started (measured from `since`). Panics after
/// `timeout` (from `since`).
fn settle(
    t: &Topology,
    agent: &Agent,
    since: Instant,
    timeout: Duration,
    run: usize,
    ok: impl Fn(&str) -> bool,
) -> Duration {
    let mut good = 0;
    let mut run_start = Instant::now();
    let mut last = String::new();
    loop {
        let attempt = Instant::now();
        match which_backend(&t.client, vip(80)) {
            Ok(label) if ok(&label) => {
                if good == 0 {
                    run_start = attempt;
                }
                good += 1;
                if good >= run {
                    return run_start - since;
                }
            }
            other => {
                good = 0;
                last = format!("{other:?}");
            }
        }
        assert!(
            since.elapsed() < timeout,
            "no {run} good connections in a row within {timeout:?} (last bad: {last}); agent log:\n{}",
            agent.log_text()
        );
    }
}

/// 1. A backend that dies is out of rotation within check_interval x check_attempts: after
///    that no new connection reaches it and none fails. When it comes back it is UP again and
///    takes its share.
#[test]
fn dead_backend_leaves_rotation_in_time_and_comes_back() {
    require_root();
    const ATTEMPTS: u32 = 2;
    let t = Topology::new("o1", Wiring::TwoNic, 3);
    let mut backends = start_backends(&t, 3);
    let cfg = t.write_config(&checked_port(ATTEMPTS, &accept_nodes(3)));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    for i in 1..=3 {
        wait_log(&agent, &format!("port 80 node b{i} is UP"), 1, up_window());
    }
    let seen = spread(&t, vip(80), 30);
    assert_eq!(seen.len(), 3, "all three take traffic: {seen:?}");

    let stopped = Instant::now();
    backends[1].stop();
    let window = down_window(ATTEMPTS);
    // Failover: from the kill until the first of 20 new connections in a row that all
    // succeed and avoid b2 (round robin sends every third one to b2 until it is DOWN).
    let failover = settle(
        &t,
        &agent,
        stopped,
        window + Duration::from_secs(5),
        20,
        |l| l != "b2",
    );
    println!(
        "failover after a backend died: {failover:?} (check_interval {INTERVAL:?} x {ATTEMPTS} attempts)"
    );
    assert!(
        agent.log_text().contains("port 80 node b2 is DOWN"),
        "b2 reported DOWN:\n{}",
        agent.log_text()
    );
    assert!(
        failover <= window,
        "failover took {failover:?}, more than {window:?}"
    );
    // From the deadline on: every new connection works and none goes to the dead node.
    if let Some(rest) = window.checked_sub(stopped.elapsed()) {
        std::thread::sleep(rest);
    }
    let after = spread(&t, vip(80), 60);
    assert!(
        !after.contains_key("b2"),
        "the dead b2 got connections: {after:?}"
    );
    assert_eq!(after.len(), 2, "b1 and b3 share the load: {after:?}");

    // b2 comes back on the same address: UP within one check, and in rotation again.
    let restarted = Instant::now();
    backends[1] = Backend::start(&t.backends, "b2", backend_addr(2));
    wait_log(&agent, "port 80 node b2 is UP (was DOWN)", 1, up_window());
    wait_until(
        "b2 takes new connections again",
        &agent,
        MARGIN,
        || matches!(which_backend(&t.client, vip(80)), Ok(l) if l == "b2"),
    );
    println!(
        "recovery after the backend returned: {:?}",
        restarted.elapsed()
    );
    let seen = spread(&t, vip(80), 30);
    assert_eq!(seen.len(), 3, "all three take traffic again: {seen:?}");
    assert!(
        client_conns(&backends[1]) >= 5,
        "b2 got its share: {seen:?}"
    );
}

/// 2. Draining a node (mode = "drain" by a reload) keeps its open connection working and sends
///    it no new ones, also across its later health checks.
#[test]
fn drain_keeps_open_connections_and_takes_no_new_ones() {
    require_root();
    let t = Topology::new("o2", Wiring::TwoNic, 2);
    let backends = start_backends(&t, 2);
    let cfg = t.write_config(&checked_port(1, &accept_nodes(2)));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, mine) = open_greeted(&t, vip(80));
    echo(&mut conn, b"before drain").expect("echo before drain");
    let i: u8 = mine
        .strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("label {mine}"));
    let other = 3 - i;
    let drained = format!("{}{}", node(i, "drain"), node(other, "accept"));
    rewrite(
        &cfg,
        &format!("{}{}", t.balancer_toml(), checked_port(1, &drained)),
    );
    reload(&agent, "reloaded", 1);
    echo(&mut conn, b"right after drain").expect("echo on the drained node's connection");
    let accepted_before = client_conns(&backends[usize::from(i - 1)]);

    // Over more than a check interval (the drained node's check keeps reporting UP): the old
    // connection keeps echoing and every new connection goes to the other node.
    let until = Instant::now() + INTERVAL + MARGIN;
    let mut n = 0;
    while Instant::now() < until {
        let label = which_backend(&t.client, vip(80)).expect("new connection while draining");
        assert_ne!(label, mine, "new connection {n} went to the drained node");
        echo(&mut conn, format!("draining {n}").as_bytes())
            .expect("echo on the drained node's connection");
        n += 1;
    }
    assert!(n >= 20, "only {n} connections made");
    assert_eq!(
        client_conns(&backends[usize::from(i - 1)]),
        accepted_before,
        "the drained backend accepted a new connection"
    );
    assert!(agent_alive(&agent));
}

/// 3. A backup node takes traffic only while no accept node is UP.
#[test]
fn backup_takes_over_only_while_the_accept_node_is_down() {
    require_root();
    const ATTEMPTS: u32 = 1;
    let t = Topology::new("o3", Wiring::TwoNic, 2);
    let mut backends = start_backends(&t, 2);
    let nodes = format!("{}{}", node(1, "accept"), node(2, "backup"));
    let cfg = t.write_config(&checked_port(ATTEMPTS, &nodes));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    wait_log(&agent, "port 80 node b1 is UP", 1, up_window());
    wait_log(&agent, "port 80 node b2 is UP", 1, up_window());
    let seen = spread(&t, vip(80), 20);
    assert_eq!(
        seen.get("b1"),
        Some(&20),
        "all to the accept node: {seen:?}"
    );

    let stopped = Instant::now();
    backends[0].stop();
    let window = down_window(ATTEMPTS);
    let took = settle(
        &t,
        &agent,
        stopped,
        window + Duration::from_secs(5),
        20,
        |l| l == "b2",
    );
    println!("backup took over after {took:?}");
    assert!(
        took <= window,
        "backup took over after {took:?}, not within {window:?}"
    );
    let seen = spread(&t, vip(80), 20);
    assert_eq!(seen.get("b2"), Some(&20), "all to the backup: {seen:?}");

    let restarted = Instant::now();
    backends[0] = Backend::start(&t.backends, "b1", backend_addr(1));
    let window = up_window();
    let took = settle(
        &t,
        &agent,
        restarted,
        window + Duration::from_secs(5),
        20,
        |l| l == "b1",
    );
    println!("accept node took back over after {took:?}");
    assert!(
        took <= window,
        "b1 back after {took:?}, not within {window:?}"
    );
    let seen = spread(&t, vip(80), 20);
    assert_eq!(
        seen.get("b1"),
        Some(&20),
        "all back to the accept node: {seen:?}"
    );
}

/// 4. With every node DOWN a new connection is refused by the balancer at once. The backends
///    lose their addresses (they answer nothing, so a refusal can only come from nb).
#[test]
fn all_nodes_down_refuses_at_once() {
    require_root();
    let t = Topology::new("o4", Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let cfg = t.write_config(&checked_port(1, &accept_nodes(2)));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    wait_log(&agent, "port 80 node b1 is UP", 1, up_window());
    wait_log(&agent, "port 80 node b2 is UP", 1, up_window());

    t.backends.sh("ip -4 addr flush dev bk0");
    wait_log(&agent, "port 80 node b1 is DOWN", 1, down_window(1));
    wait_log(&agent, "port 80 node b2 is DOWN", 1, down_window(1));
    for i in 0..5 {
        let start = Instant::now();
        let err = connect_in(&t.client, vip(80), Duration::from_secs(5))
            .expect_err("no node is UP: the connection must not be made");
        let took = start.elapsed();
        assert_eq!(
            err.kind(),
            ErrorKind::ConnectionRefused,
            "attempt {i}: refused, not {err}"
        );
        assert!(
            took < Duration::from_secs(1),
            "attempt {i}: refused at once, took {took:?}"
        );
    }

    // The backends come back: so does the service, without anyone touching nb.
    t.backends.sh(&format!(
        "ip addr add {}/24 dev bk0 && ip addr add {}/24 dev bk0",
        backend_v4(1),
        backend_v4(2)
    ));
    wait_log(&agent, "port 80 node b1 is UP (was DOWN)", 1, up_window());
    wait_log(&agent, "port 80 node b2 is UP (was DOWN)", 1, up_window());
    wait_connectable(&t.client, vip(80), MARGIN);
    let seen = spread(&t, vip(80), 20);
    assert_eq!(seen.len(), 2, "both back in rotation: {seen:?}");
}

/// `n` connection attempts from the client, all started at the same moment (one thread each),
/// each given `timeout`.
fn burst(t: &Topology, n: usize, timeout: Duration) -> Vec<std::io::Result<TcpStream>> {
    let addr = vip(80);
    t.client.enter(move || {
        // Threads started here inherit this thread's network namespace.
        let gate = Arc::new(Barrier::new(n));
        let threads: Vec<JoinHandle<_>> = (0..n)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || {
                    gate.wait();
                    TcpStream::connect_timeout(&addr, timeout)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|h| h.join().expect("connect thread"))
            .collect()
    })
}

/// 5. `client_conn_throttle = 5`: a burst of 20 connection attempts from one client gets about
///    five through (the SYNs of the rest are dropped, so they time out), and the client is
///    served again once it slows down.
#[test]
fn throttle_limits_a_burst_and_keeps_serving() {
    require_root();
    let t = Topology::new("o5", Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let path = t.dir.join("nb.toml");
    rewrite(
        &path,
        &format!(
            "{}{}",
            balancer_with(&t, "client_conn_throttle = 5\n"),
            checked_port(2, &accept_nodes(2))
        ),
    );
    let agent = Agent::start(&t, &path);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    // Let the bucket refill after the probing above (five tokens in one second).
    std::thread::sleep(Duration::from_millis(1500));

    // 700 ms: less than the first SYN retransmission (1 s), so a dropped SYN is not retried.
    let results = burst(&t, 20, Duration::from_millis(700));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| format!("{:?}", e.kind()))
        .collect();
    println!("throttle 5/s: {ok} of 20 burst connections made; failures: {failed:?}");
    assert!(
        (3..=7).contains(&ok),
        "about 5 of a burst of 20 get through, not {ok}"
    );
    assert!(
        failed.iter().all(|k| k == "TimedOut"),
        "throttled connections time out (SYN dropped), not {failed:?}"
    );
    drop(results);

    // The client slows down: it is served again.
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent_alive(&agent), "agent exited:\n{}", agent.log_text());
    for i in 0..6 {
        which_backend(&t.client, vip(80))
            .unwrap_or_else(|e| panic!("paced connection {i} after the burst: {e}"));
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// 6. SIGHUP with a broken file (a syntax error, then an invalid value next to valid changes)
///    changes nothing: the agent stays up, traffic keeps its nodes, the log says why. A good
///    file then applies.
#[test]
fn broken_reload_changes_nothing() {
    require_root();
    let t = Topology::new("o6", Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let good = checked_port(2, &accept_nodes(2));
    let cfg = t.write_config(&good);
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let seen = spread(&t, vip(80), 20);
    assert_eq!(seen.len(), 2, "both nodes serve: {seen:?}");

    let bad_files = [
        (
            "syntax error",
            format!(
                "{}{}",
                t.balancer_toml(),
                good.replacen("port = 80", "port = = 80", 1)
            ),
        ),
        (
            // Valid changes (throttle to 1/s, b1 rejected) next to an invalid weight: if any of
            // it applied, new connections would fail or avoid b1.
            "invalid value",
            format!(
                "{}{}",
                balancer_with(&t, "client_conn_throttle = 1\n"),
                checked_port(
                    2,
                    &format!(
                        "{}{}",
                        node(1, "reject"),
                        node(2, "accept").replace("mode", "weight = 0\nmode")
                    )
                )
            ),
        ),
    ];
    for (n, (what, text)) in bad_files.iter().enumerate() {
        rewrite(&cfg, text);
        reload(&agent, "reload refused", n + 1);
        assert!(
            agent_alive(&agent),
            "agent exited on a {what}:\n{}",
            agent.log_text()
        );
        // Round robin runs per CPU, so allow some skew; a rejected b1 would get none.
        let seen = spread(&t, vip(80), 20);
        assert!(
            seen.get("b1").is_some_and(|n| *n >= 5) && seen.get("b2").is_some_and(|n| *n >= 5),
            "after a refused reload ({what}) both nodes serve as before: {seen:?}"
        );
    }
    let log = agent.log_text();
    assert!(
        log.contains("weight (0) must be between 1 and 255"),
        "the refusal names the reason:\n{log}"
    );
    assert!(!log.contains("reloaded"), "nothing was reloaded:\n{log}");

    // A good file applies: b1 rejected, everything to b2.
    rewrite(
        &cfg,
        &format!(
            "{}{}",
            t.balancer_toml(),
            checked_port(2, &format!("{}{}", node(1, "reject"), node(2, "accept")))
        ),
    );
    reload(&agent, "reloaded", 1);
    let seen = spread(&t, vip(80), 20);
    assert_eq!(
        seen.get("b2"),
        Some(&20),
        "the good reload applied: {seen:?}"
    );
}

/// What the echo loop of test 7 saw.
#[derive(Default)]
struct EchoLog {
    ok: usize,
    errors: Vec<String>,
    slowest: Duration,
}

/// 7. The agent is killed with SIGKILL while a kept-alive connection keeps sending; a new agent
///    starts with the same config. The connection never notices, and new connections work.
#[test]
fn agent_crash_and_restart_keep_connections() {
    crash_and_restart("o7", false);
}

/// The same with the agent run as operators run it in a network namespace, `ip netns exec`
/// (a mount namespace of its own, whose fresh `/sys` hides the host's bpffs: pins made there
/// died with the agent). The pins go to the host's bpffs, so the connection never notices,
/// the counters keep counting across the restart, and a SIGTERM leaves XDP attached.
#[test]
fn agent_crash_and_restart_under_ip_netns_exec_keep_connections() {
    crash_and_restart("o9", true);
}

/// The sum of `nb_node_connections_total` over the port's nodes.
fn node_connections(t: &Topology) -> u64 {
    let (status, text) = nb_tests::topo::admin_call(t, "GET", "/metrics", None, None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with("nb_node_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn crash_and_restart(tag: &str, netns_exec: bool) {
    require_root();
    let t = Topology::new(tag, Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let cfg = t.write_config(&checked_port(2, &accept_nodes(2)));
    let start = |t: &Topology| {
        if netns_exec {
            Agent::start_by_netns_exec(t, &cfg)
        } else {
            Agent::start(t, &cfg)
        }
    };
    let mut agent = start(&t);
    if netns_exec {
        wait_log(
            &agent,
            "pinning in the host's bpffs",
            1,
            Duration::from_secs(2),
        );
    }
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, mine) = open_greeted(&t, vip(80));
    conn.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("read timeout");

    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let log = Arc::new(Mutex::new(EchoLog::default()));
    let pinger = {
        let (stop, count, log) = (stop.clone(), count.clone(), log.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                let r = echo(&mut conn, format!("ping {n:08}\n").as_bytes());
                let took = start.elapsed();
                let mut l = log.lock().expect("echo log");
                l.slowest = l.slowest.max(took);
                match r {
                    Ok(()) => l.ok += 1,
                    Err(e) => {
                        l.errors.push(format!("echo {n}: {e} after {took:?}"));
                        return;
                    }
                }
                drop(l);
                count.fetch_add(1, Ordering::Relaxed);
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let echoes_after = |n: usize, what: &str, agent: &Agent| {
        let target = count.load(Ordering::Relaxed) + n;
        wait_until(what, agent, Duration::from_secs(10), || {
            count.load(Ordering::Relaxed) >= target || !log.lock().expect("log").errors.is_empty()
        });
    };
    echoes_after(20, "echoes before the crash", &agent);
    let counted = node_connections(&t);
    assert!(counted >= 1, "connections counted before the crash");

    agent.kill9();
    // No agent: the pinned program keeps forwarding, old and new connections alike.
    echoes_after(50, "echoes with no agent running", &agent);
    let label = which_backend(&t.client, vip(80)).expect("new connection with no agent");
    assert!(label.starts_with('b'), "label {label}");

    let mut restarted = start(&t);
    assert!(
        node_connections(&t) > counted,
        "the counters kept counting across the restart (the pinned maps were adopted)"
    );
    // Long enough for the new agent's first flow sweep and health checks.
    let until = Instant::now() + INTERVAL + MARGIN;
    while Instant::now() < until {
        echoes_after(10, "echoes after the restart", &restarted);
    }
    stop.store(true, Ordering::Relaxed);
    pinger.join().expect("echo thread");
    let l = log.lock().expect("echo log");
    println!(
        "{} echoes on the {mine} connection across kill -9 and restart; slowest {:?}",
        l.ok, l.slowest
    );
    assert!(
        l.errors.is_empty(),
        "the connection noticed: {:?}",
        l.errors
    );
    assert!(
        l.slowest < Duration::from_secs(1),
        "an echo took {:?}",
        l.slowest
    );
    assert!(l.ok >= 100, "only {} echoes", l.ok);
    assert!(
        restarted
            .log_text()
            .contains("replaced the program of the pinned XDP link"),
        "the new agent adopted the pinned link:\n{}",
        restarted.log_text()
    );
    let seen = spread(&t, vip(80), 20);
    assert_eq!(seen.len(), 2, "new connections after the restart: {seen:?}");
    // A SIGTERM leaves the program attached and pinned: connections go on without an agent.
    restarted.stop();
    assert!(
        restarted
            .log_text()
            .contains("the XDP program stays attached and pinned"),
        "{}",
        restarted.log_text()
    );
    let seen = spread(&t, vip(80), 10);
    assert_eq!(
        seen.values().sum::<usize>(),
        10,
        "served with no agent: {seen:?}"
    );
}

/// Passive checks on a tcp port: a backend that starts refusing connections is marked DOWN by
/// the connections real clients make (RST seen by the XDP program), long before its next active
/// check; no new connection goes to it after that.
#[test]
fn passive_checks_mark_a_refusing_backend_down_before_the_active_check() {
    require_root();
    let t = Topology::new("o8", Wiring::TwoNic, 2);
    let mut backends = start_backends(&t, 2);
    let port = "[[port]]\nport = 80\nprotocol = \"tcp\"\nalgorithm = \"roundrobin\"\n\
         check = \"connection\"\ncheck_interval = 60\ncheck_timeout = 1\ncheck_attempts = 2\n\
         check_passive = true\n\n"
        .to_string()
        + &accept_nodes(2);
    let cfg = t.write_config(&port);
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    // Both UP from their first active check (within a fifth of the interval).
    wait_log(&agent, "node b1 is UP", 1, Duration::from_secs(15));
    wait_log(&agent, "node b2 is UP", 1, Duration::from_secs(15));
    backends[0].stop();
    let stopped = Instant::now();
    // Clients keep connecting; about half of them are refused by b1 until nb stops sending any.
    let down = wait_until(
        "b1 DOWN by passive checks",
        &agent,
        Duration::from_secs(12),
        || {
            let _ = which_backend(&t.client, vip(80));
            agent.log_text().contains("node b1 is DOWN (passive")
        },
    );
    let took = stopped.elapsed();
    println!("passive failover took {took:?} ({down:?} of polling)");
    assert!(
        took < Duration::from_secs(30),
        "DOWN long before the next active check (60 s): {took:?}"
    );
    for i in 0..20 {
        let label = which_backend(&t.client, vip(80))
            .unwrap_or_else(|e| panic!("connection {i} after DOWN failed: {e}"));
        assert_eq!(label, "b2", "connection {i} after DOWN");
    }
}

/// 9. A reload that stops checking a DOWN node (`check = "none"`) forgets its state in the
///    data path as everywhere else: XDP sends it new connections at once, as the status page
///    (which shows it `unknown`) says, not only after some later health event.
#[test]
fn a_node_no_longer_checked_takes_connections_at_once() {
    require_root();
    let t = Topology::new("o9", Wiring::TwoNic, 2);
    // b2 has its address but nothing listening: its checks are refused.
    let mut backends = vec![Backend::start(&t.backends, "b1", backend_addr(1))];
    let cfg = t.write_config(&checked_port(1, &accept_nodes(2)));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    wait_log(&agent, "port 80 node b2 is DOWN", 1, down_window(1));

    backends.push(Backend::start(&t.backends, "b2", backend_addr(2)));
    let unchecked =
        checked_port(1, &accept_nodes(2)).replace("check = \"connection\"", "check = \"none\"");
    rewrite(&cfg, &format!("{}{unchecked}", t.balancer_toml()));
    reload(&agent, "reloaded", 1);
    let seen = spread(&t, vip(80), 20);
    assert_eq!(
        seen.get("b2").copied().unwrap_or(0),
        10,
        "b2, no longer checked, takes its share at once: {seen:?}\n{}",
        agent.log_text()
    );
}

/// 10. A reload the data path refuses (65 tcp ports: XDP has room for 64 services) after the
///     listeners took theirs leaves everything as it was: the tcp port keeps its node, the
///     http listener the new config asked for is closed again, the old one still serves.
///     The same change without the extra ports then applies.
#[test]
fn a_reload_the_data_path_refuses_changes_nothing() {
    require_root();
    let t = Topology::new("o10", Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let port = |number: u16, protocol: &str, node: u8| {
        format!(
            "[[port]]\nport = {number}\nprotocol = \"{protocol}\"\ncheck = \"none\"\n\n\
             [[port.node]]\nlabel = \"b{node}\"\naddress = \"{}\"\n\n",
            backend_addr(node)
        )
    };
    let cfg = t.write_config(&format!("{}{}", port(80, "tcp", 1), port(8000, "http", 1)));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    wait_connectable(&t.client, vip(8000), Duration::from_secs(10));

    let changed = format!("{}{}", port(80, "tcp", 2), port(8001, "http", 2));
    let crowd: String = (1000..1064).map(|n| port(n, "tcp", 1)).collect();
    rewrite(&cfg, &format!("{}{changed}{crowd}", t.balancer_toml()));
    reload(&agent, "reload refused", 1);
    assert!(
        agent.log_text().contains("too many services (at most 64)"),
        "the refusal names what is full:\n{}",
        agent.log_text()
    );
    for i in 0..6 {
        assert_eq!(
            which_backend(&t.client, vip(80)).expect("port 80 after the refusal"),
            "b1",
            "connection {i}: port 80 keeps its node"
        );
    }
    assert!(
        connect_in(&t.client, vip(8000), Duration::from_secs(2)).is_ok(),
        "the old http listener still serves"
    );
    let err = connect_in(&t.client, vip(8001), Duration::from_secs(2))
        .expect_err("the listener of the refused config is closed");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    rewrite(&cfg, &format!("{}{changed}", t.balancer_toml()));
    reload(&agent, "reloaded", 1);
    assert_eq!(
        which_backend(&t.client, vip(80)).expect("port 80 after the good reload"),
        "b2"
    );
    wait_connectable(&t.client, vip(8001), Duration::from_secs(5));
}

/// 11. `slow_start`: a node that joins a roundrobin port starts with almost no share of new
///     connections and ramps to its weight over `slow_start` seconds, in XDP.
#[test]
fn a_joining_node_ramps_up_over_slow_start() {
    require_root();
    let t = Topology::new("o11", Wiring::TwoNic, 2);
    let _backends = start_backends(&t, 2);
    let port = |nodes: u8| {
        format!(
            "[[port]]\nport = 80\nprotocol = \"tcp\"\nalgorithm = \"roundrobin\"\n\
             check = \"none\"\nslow_start = 10\n\n{}",
            accept_nodes(nodes)
        )
    };
    let cfg = t.write_config(&port(1));
    let agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    rewrite(&cfg, &format!("{}{}", t.balancer_toml(), port(2)));
    reload(&agent, "reloaded", 1);
    let joined = Instant::now();
    // b2's share of 20 new connections, every 2.5 s from its joining until past the ramp.
    let mut shares = Vec::new();
    while joined.elapsed() < Duration::from_secs(13) {
        let seen = spread(&t, vip(80), 20);
        shares.push((
            joined.elapsed().as_secs_f32(),
            seen.get("b2").copied().unwrap_or(0),
        ));
        std::thread::sleep(Duration::from_millis(2500));
    }
    println!("b2's share of 20 connections over its ramp (s, count): {shares:?}");
    let counts: Vec<usize> = shares.iter().map(|s| s.1).collect();
    let (first, last) = (counts[0], counts[counts.len() - 1]);
    assert!(first <= 2, "b2 starts with almost nothing: {shares:?}");
    assert!(
        (9..=11).contains(&last),
        "b2 ends with its half: {shares:?}"
    );
    assert!(
        counts.iter().any(|&c| (3..=8).contains(&c)),
        "b2 passes through a share between: {shares:?}"
    );
    // Over the ramp (10 s); past it, at full weight, 20 connections split 9-11 either way
    // (each CPU keeps its own round-robin position).
    let ramping: Vec<usize> = shares.iter().filter(|s| s.0 < 10.0).map(|s| s.1).collect();
    assert!(
        ramping.windows(2).all(|w| w[1] + 1 >= w[0]),
        "the share only grows over the ramp: {shares:?}\n{}",
        agent.log_text()
    );
}
