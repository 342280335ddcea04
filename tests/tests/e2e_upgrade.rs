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

/// Pins an agent left for the interfaces of a network namespace that is gone (here: its
/// whole test network was deleted) are recognised, removed with a warning, and the new
/// agent attaches XDP afresh; it neither adopts them into a failing attach nor falls back to
/// user space while claiming XDP.
#[test]
fn pins_of_a_namespace_that_is_gone_are_replaced() {
    require_root();
    let t = Topology::new("u3", Wiring::TwoNic, 2);
    let _b = backends(&t);
    let cfg = t.write_config(&ports());
    {
        let mut old = Topology::new("u3o", Wiring::TwoNic, 2);
        // Its agent pins where `t`'s will (its own pin path back before it goes: its drop
        // must not take the pins with it).
        let own = std::mem::replace(&mut old.pin_path, t.pin_path.clone());
        let old_cfg = old.dir.join("nb.toml");
        std::fs::write(
            &old_cfg,
            std::fs::read_to_string(&cfg)
                .expect("config")
                .replace(&t.admin.to_string(), &old.admin.to_string()),
        )
        .expect("old config");
        let mut a = Agent::start(&old, &old_cfg);
        a.stop();
        assert!(
            t.pin_path.join("link_pub0").exists(),
            "the old agent's pins stay"
        );
        old.pin_path = own;
    }
    // The old network namespaces are gone now; their pins are not.
    let agent = Agent::start(&t, &cfg);
    wait_log(
        &agent,
        "network namespace that no longer exists",
        1,
        Duration::from_secs(5),
    );
    let log = agent.log_text();
    assert!(log.contains("pub0: XDP attached"), "{log}");
    assert!(!log.contains("user space"), "{log}");
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    for _ in 0..10 {
        which_backend(&t.client, vip(80)).expect("served by XDP");
    }
}

/// Pins that belong to an agent of another network namespace that still exists are neither
/// adopted nor taken: the agent refuses to start and says why.
#[test]
fn pins_of_another_live_namespace_are_refused() {
    require_root();
    let t = Topology::new("u4", Wiring::TwoNic, 2);
    let _b = backends(&t);
    let cfg = t.write_config(&ports());
    let mut a = Agent::start(&t, &cfg);
    a.stop();
    let other = Topology::new("u4o", Wiring::TwoNic, 2);
    let other_cfg = other.dir.join("nb.toml");
    std::fs::write(
        &other_cfg,
        std::fs::read_to_string(&cfg)
            .expect("config")
            .replace(&t.admin.to_string(), &other.admin.to_string()),
    )
    .expect("other config");
    let out = other
        .lb
        .command(nb_tests::topo::agent_bin())
        .args(["run", "--config"])
        .arg(&other_cfg)
        .output()
        .expect("run nb-agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused to start: {err}");
    assert!(
        err.contains("holds the XDP state of the agent of another network namespace"),
        "{err}"
    );
    // The first namespace's XDP path still serves, untouched.
    which_backend(&t.client, vip(80)).expect("the owner's connections still work");
}

/// Replaces the pinned connection table `name` of `pin` with one whose values have the
/// layout of the program before this one (the first `old` bytes of today's values), holding
/// the same entries.
fn downgrade_table<const OLD: usize>(pin: &std::path::Path, name: &str) -> usize {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use nb_common::FlowKey;
    let path = pin.join(name);
    let cur: BpfHashMap<MapData, FlowKey, [u8; 88]> =
        BpfHashMap::try_from(Map::LruHashMap(MapData::from_pin(&path).expect("table")))
            .expect("table");
    let entries: Vec<(FlowKey, [u8; 88])> = cur.iter().filter_map(Result::ok).collect();
    drop(cur);
    std::fs::remove_file(&path).expect("unpin");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args(["type", "lru_hash", "key", "40", "value", &OLD.to_string()])
        .args(["entries", "65536", "name", name])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut old: BpfHashMap<MapData, FlowKey, [u8; OLD]> = BpfHashMap::try_from(Map::LruHashMap(
        MapData::from_pin(&path).expect("old table"),
    ))
    .expect("old table");
    for (k, v) in &entries {
        let mut o = [0u8; OLD];
        o.copy_from_slice(&v[..OLD]);
        old.insert(k, o, 0).expect("insert");
    }
    entries.len()
}

/// An upgrade from the program before half-open tables and sequence windows: its connection
/// tables (80- and 72-byte values) are converted, not dropped, so an established connection
/// keeps its backend and its SNAT port across the upgrade.
#[test]
fn connection_tables_of_the_older_layout_are_converted() {
    require_root();
    let t = Topology::new("u5", Wiring::TwoNic, 2);
    let _b = backends(&t);
    let cfg = t.write_config(&ports());
    let mut agent = Agent::start(&t, &cfg);
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    let (mut conn, _) = open_greeted(&t, vip(80));
    echo(&mut conn, b"before").expect("echo before");
    agent.stop();
    assert!(downgrade_table::<80>(&t.pin_path, "NB_FLOWS") >= 1);
    assert!(downgrade_table::<72>(&t.pin_path, "NB_REV_FLOWS") >= 1);
    let agent = Agent::start(&t, &cfg);
    wait_log(
        &agent,
        "entries carried over from the older layout",
        2,
        Duration::from_secs(10),
    );
    for i in 0..5 {
        echo(&mut conn, format!("after the upgrade {i}").as_bytes())
            .expect("the connection keeps its backend");
    }
}
