//! `cargo xtask bench fleet`: what flow sync costs and what a fleet's failover takes. Two
//! balancers in XDP behind a BIRD router's ECMP (the end-to-end tests' fleet), nginx behind
//! them: new connections per second (wrk, `Connection: close`) with flow sync on and off,
//! taking turns in the same run (the same agents, reloaded between the two), the sync's bytes
//! per connection, and the failover time of a balancer killed hard behind BGP and behind a
//! keepalived pair.

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use nb_tests::{
    fleet::{BACKENDS, Engine, Fleet, Shape},
    netns::connect_in,
    topo::Agent,
};

use super::{Key, Target, check_interrupt, require_tools, start_nginx_on, wrk_at};

const ROUNDS: usize = 3;
const ROUND_SECONDS: u64 = 5;
const ROUTING: Duration = Duration::from_secs(20);

fn port() -> String {
    nb_tests::fleet::tcp_port(1)
}

/// A fleet of two in XDP with flow sync, each holding its SNAT address, serving port 80.
fn fleet(tag: &str, engine: Engine) -> Result<(Fleet, Vec<Agent>)> {
    let f = Fleet::new(tag, 2, engine);
    let b1 = SocketAddr::new(BACKENDS.into(), 8080);
    start_nginx_on(&f.backends, &f.dir, &[(b1, "b1".to_string())])?;
    let shape = Shape {
        xdp: true,
        sync: true,
    };
    for i in 0..2 {
        f.write_config_with(i, &port(), shape);
        f.start_snat_vrrp(i);
    }
    f.wait_snat_holders(&[Some(0), Some(1)], ROUTING);
    let agents: Vec<Agent> = (0..2).map(|i| f.start_agent(i)).collect();
    match engine {
        Engine::Bgp => {
            f.wait_next_hops(&[0, 1], ROUTING);
        }
        Engine::Vrrp => {
            f.start_keepalived(0, 150);
            f.start_keepalived(1, 140);
            f.wait_holder(Some(0), ROUTING);
        }
    }
    Ok((f, agents))
}

/// Rewrites both members' configs with flow sync on or off (nothing else differs) and
/// reloads their agents.
fn set_sync(f: &Fleet, agents: &[Agent], on: bool) -> Result<()> {
    let shape = Shape {
        xdp: true,
        sync: true,
    };
    for (i, a) in agents.iter().enumerate() {
        let path = f.write_config_with(i, &port(), shape);
        if !on {
            let text = std::fs::read_to_string(&path)?;
            let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("sync_")).collect();
            std::fs::write(&path, kept.join("\n") + "\n")?;
        }
        a.signal(libc::SIGHUP);
    }
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// `(sync bytes sent, connections sent)` of member `i`, from its metrics.
fn sync_sent(f: &Fleet, i: usize) -> (u64, u64) {
    let m = f.metrics(i);
    let get = |series: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (
        get("nb_fleet_sync_bytes_sent_total"),
        get("nb_fleet_sync_flows_total{result=\"sent\"}"),
    )
}

/// How long after a hard kill of member 0 (agent killed, link down) new connections succeed
/// ten times in a row.
fn failover(f: &Fleet, agents: &mut [Agent]) -> Result<Duration> {
    agents[0].kill9();
    f.lbs[0].ns.sh("ip link set eth0 down");
    let died = Instant::now();
    let mut in_row = 0;
    while in_row < 10 {
        check_interrupt()?;
        ensure!(
            died.elapsed() < Duration::from_secs(30),
            "no failover within 30 s"
        );
        match connect_in(&f.client, Fleet::vip(80), Duration::from_millis(300)) {
            Ok(_) => in_row += 1,
            Err(_) => in_row = 0,
        }
    }
    Ok(died.elapsed())
}

pub fn run(_out: &Path) -> Result<Vec<Key>> {
    require_tools(&["wrk", "nginx", "bird", "keepalived", "ethtool", "ip"])?;
    println!(
        "== fleet: new connections/s with flow sync on vs off ({ROUNDS} rounds of \
         {ROUND_SECONDS} s each, taking turns), failover times"
    );
    let (f, mut agents) = fleet("bf", Engine::Bgp)?;
    let url = format!("http://{}/", Fleet::vip(80).ip());
    let (mut on, mut off) = (Vec::new(), Vec::new());
    let (mut bytes, mut sent) = (0u64, 0u64);
    for round in 0..ROUNDS {
        for sync in [round % 2 == 0, round % 2 != 0] {
            check_interrupt()?;
            set_sync(&f, &agents, sync)?;
            let before: Vec<(u64, u64)> = (0..2).map(|i| sync_sent(&f, i)).collect();
            let load = wrk_at(
                &f.client,
                &url,
                &["-H", "Connection: close"],
                None,
                ROUND_SECONDS,
            )?;
            ensure!(load.errors == 0, "{} errors under load", load.errors);
            println!(
                "   round {round}: sync {}: {:.0} new connections/s",
                if sync { "on " } else { "off" },
                load.rps
            );
            if sync {
                on.push(load.rps);
                for (i, b) in before.iter().enumerate() {
                    let (by, n) = sync_sent(&f, i);
                    bytes += by - b.0;
                    sent += n - b.1;
                }
            } else {
                off.push(load.rps);
            }
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (on, off) = (mean(&on), mean(&off));
    // Every message went to one peer: the bytes per connection a peer costs.
    let per_conn = bytes as f64 / sent.max(1) as f64;
    let bgp = failover(&f, &mut agents)?;
    drop(agents);
    drop(f);
    let (f, mut agents) = fleet("bk", Engine::Vrrp)?;
    let vrrp = failover(&f, &mut agents)?;
    drop(agents);
    drop(f);
    println!(
        "   new connections/s: sync on {on:.0}, off {off:.0} = {:.2}x; sync {per_conn:.0} bytes \
         per connection per peer (heartbeats included); failover (hard kill -> 10 new \
         connections in a row): BGP (hold time 3 s) {bgp:.2?}, keepalived (advert_int 1) \
         {vrrp:.2?}",
        on / off
    );
    Ok(vec![
        Key {
            part: "fleet",
            what: "new connections/s, flow sync on vs off".into(),
            nb: on,
            other: Some(off),
            target: Target::AtLeast(0.9),
            assumed: false,
        },
        Key {
            part: "fleet",
            what: "flow sync bytes per connection per peer".into(),
            nb: per_conn,
            other: None,
            target: Target::None,
            assumed: true,
        },
        Key {
            part: "fleet",
            what: "failover s, BGP (hold time 3 s)".into(),
            nb: bgp.as_secs_f64(),
            other: None,
            target: Target::None,
            assumed: true,
        },
        Key {
            part: "fleet",
            what: "failover s, keepalived (advert_int 1)".into(),
            nb: vrrp.as_secs_f64(),
            other: None,
            target: Target::None,
            assumed: true,
        },
    ])
}
