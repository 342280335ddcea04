//! Restart safety across changes of the pinned state: a resized connection table keeps its
//! flows, and a map whose layout changed (an upgrade) is replaced without a crash.

use std::{net::SocketAddr, time::Duration};

use nb_tests::{
    netns::{Backend, which_backend},
    require_root,
    topo::{
        Agent, Topology, Wiring, backend_v4, echo, open_greeted, vip, wait_connectable, wait_log,
    },
};

fn ports() -> String {
    let mut s = String::from(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\nalgorithm = \"roundrobin\"\ncheck = \"none\"\n\n",
    );
    for i in 1..=2 {
        s.push_str(&format!(
            "[[port.node]]\nlabel = \"b{i}\"\naddress = \"{}:8080\"\n\n",
            backend_v4(i)
        ));
    }
    s
}

fn backends(t: &Topology) -> Vec<Backend> {
    (1..=2)
        .map(|i| {
            Backend::start(
                &t.backends,
                &format!("b{i}"),
                SocketAddr::new(backend_v4(i).into(), 8080),
            )
        })
        .collect()
}

/// `max_flows` changed between two runs: the new agent carries the flows into the bigger
/// table, and an open connection keeps going to its backend.
#[test]
fn resized_connection_table_keeps_its_flows() {
    require_root();
    let t = Topology::new("u1", Wiring::TwoNic, 2);
    let _b = backends(&t);
    let cfg = t.write_config(&ports());
    let mut agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, _) = open_greeted(&t, vip(80));
    echo(&mut conn, b"before").expect("echo before");
    agent.stop();
    let text = std::fs::read_to_string(&cfg).expect("read config");
    std::fs::write(
        &cfg,
        text.replace("max_flows = 65536", "max_flows = 131072"),
    )
    .expect("rewrite config");
    let agent = Agent::start(&t, &cfg);
    wait_log(&agent, "entries carried over", 1, Duration::from_secs(10));
    echo(&mut conn, b"after the resize").expect("echo on the kept connection");
    for _ in 0..10 {
        which_backend(&t.client, vip(80)).expect("new connection after the resize");
    }
    let log = agent.log_text();
    let carried = |map: &str| -> usize {
        log.lines()
            .find_map(|l| {
                let rest = l.split(&format!("map {map}: ")).nth(1)?;
                rest.strip_suffix(" entries carried over into the resized table")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no carry-over line for {map}:\n{log}"))
    };
    assert!(
        carried("NB_FLOWS") >= 1,
        "the open connection's flow was carried:\n{log}"
    );
    assert!(carried("NB_REV_FLOWS") >= 1, "and its reply entry:\n{log}");
}

/// A pinned map with another layout (as after an upgrade that changed a type) is detected,
/// replaced, and the agent serves; it neither crashes nor misreads the old map.
#[test]
fn changed_map_layout_is_replaced_without_a_crash() {
    require_root();
    let t = Topology::new("u2", Wiring::TwoNic, 2);
    let _b = backends(&t);
    let cfg = t.write_config(&ports());
    let mut agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, _) = open_greeted(&t, vip(80));
    echo(&mut conn, b"before").expect("echo before");
    agent.stop();
    // A counters map as an older or newer program might have laid it out.
    let stats = t.pin_path.join("NB_STATS");
    std::fs::remove_file(&stats).expect("unpin NB_STATS");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stats)
        .args([
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "16",
            "entries",
            "5",
            "name",
            "NB_STATS",
        ])
        .output()
        .expect("run bpftool (apt-get install bpftool)");
    assert!(
        out.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = Agent::start(&t, &cfg);
    wait_log(
        &agent,
        "map NB_STATS: pinned layout",
        1,
        Duration::from_secs(10),
    );
    echo(&mut conn, b"after the upgrade").expect("echo on the kept connection");
    for _ in 0..10 {
        which_backend(&t.client, vip(80)).expect("new connection after the upgrade");
    }
    let info = std::process::Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(&stats)
        .output()
        .expect("bpftool map show");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("value 8B"),
        "NB_STATS re-created with this program's layout: {info}"
    );
}
