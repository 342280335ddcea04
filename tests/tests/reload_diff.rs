//! Property test: whatever sequence of config changes the agent applies, the maps then hold
//! exactly the new config, and they change only where the config did. A service whose nodes
//! did not change keeps its Maglev ring byte for byte; when nodes only leave a service, no slot
//! moves from one surviving node to another. Services share port numbers on two public
//! addresses: each (address, number) is a service of its own, with its own ring.
//!
//! The sequence is random (xorshift, seed from `NB_PROPTEST_SEED` or a fixed default so a
//! failure can be replayed), and read back from the pinned maps as the kernel holds them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData};
use nb_agent::dataplane::{BackendSpec, Dataplane, ServiceSpec, addr_words};
use nb_common::{
    ALG_LEASTCONN, ALG_ROUNDROBIN, ALG_SOURCE, Backend, FAMILY_V4, MAGLEV_SIZE, PROTO_TCP,
    ServiceInfo, ServiceKey, maps,
};
use nb_tests::{netns::unique_suffix, require_root};

/// Two public addresses: a port number may be a service on either, or on both.
const VIPS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 10), Ipv4Addr::new(198, 18, 0, 11)];
const PORTS: [u16; 2] = [80, 81];
const NODES: u8 = 6;
const STEPS: usize = 40;

/// A service: port number and index into [`VIPS`].
type Svc = (u16, usize);

/// One node of the model: label index, weight, eligible.
type Model = BTreeMap<Svc, (u32, BTreeMap<u8, (u32, bool)>)>;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn node_addr(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10 + i))
}

fn specs(model: &Model) -> Vec<ServiceSpec> {
    model
        .iter()
        .map(|((port, vip), (alg, nodes))| ServiceSpec {
            key: nb_agent::model::PortKey::tcp(*port, &[VIPS[*vip].into()]),
            port: *port,
            family: FAMILY_V4,
            vips: vec![VIPS[*vip].into()],
            algorithm: *alg,
            backends: nodes
                .iter()
                .map(|(i, (w, eligible))| BackendSpec {
                    key: format!("n{i}"),
                    addr: node_addr(*i),
                    port: 8080,
                    snat: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1)),
                    weight: *w,
                    eligible: *eligible,
                })
                .collect(),
        })
        .collect()
}

/// One random change: a port added or removed, a node added or removed, a node's
/// eligibility or weight flipped, a port's algorithm changed.
fn mutate(model: &mut Model, rng: &mut Rng) -> String {
    let port = (
        PORTS[rng.below(PORTS.len() as u64) as usize],
        rng.below(VIPS.len() as u64) as usize,
    );
    let node = 1 + rng.below(NODES as u64) as u8;
    match rng.below(7) {
        0 if !model.contains_key(&port) => {
            let mut nodes = BTreeMap::new();
            nodes.insert(node, (100, true));
            model.insert(port, (ALG_ROUNDROBIN, nodes));
            format!("add port {port:?} with n{node}")
        }
        1 if model.len() > 1 => {
            model.remove(&port);
            format!("remove port {port:?}")
        }
        2 | 3 => {
            let Some((_, nodes)) = model.get_mut(&port) else {
                return "nothing".into();
            };
            if nodes.contains_key(&node) && nodes.len() > 1 {
                nodes.remove(&node);
                format!("port {port:?}: remove n{node}")
            } else {
                nodes.insert(node, (50 + 50 * rng.below(4) as u32, true));
                format!("port {port:?}: add n{node}")
            }
        }
        4 => match model.get_mut(&port).and_then(|(_, n)| n.get_mut(&node)) {
            Some(n) => {
                n.1 = !n.1;
                format!("port {port:?}: n{node} eligible = {}", n.1)
            }
            None => "nothing".into(),
        },
        5 => match model.get_mut(&port).and_then(|(_, n)| n.get_mut(&node)) {
            Some(n) => {
                n.0 = 1 + rng.below(255) as u32;
                format!("port {port:?}: n{node} weight {}", n.0)
            }
            None => "nothing".into(),
        },
        _ => match model.get_mut(&port) {
            Some(p) => {
                p.0 = [ALG_ROUNDROBIN, ALG_LEASTCONN, ALG_SOURCE][rng.below(3) as usize];
                format!("port {port:?}: algorithm {}", p.0)
            }
            None => "nothing".into(),
        },
    }
}

/// What the kernel holds, per port: service info and the Maglev ring as backend addresses.
struct Seen {
    info: ServiceInfo,
    ring: Vec<Option<IpAddr>>,
}

fn read(pin: &Path) -> BTreeMap<Svc, Seen> {
    let open = |name: &str| MapData::from_pin(pin.join(name)).expect("open pinned map");
    let services: BpfHashMap<MapData, ServiceKey, u32> =
        BpfHashMap::try_from(Map::HashMap(open(maps::SERVICES))).expect("services");
    let info: Array<MapData, ServiceInfo> =
        Array::try_from(Map::Array(open(maps::SVC_INFO))).expect("svc info");
    let ring: Array<MapData, u32> =
        Array::try_from(Map::Array(open(maps::MAGLEV))).expect("maglev");
    let backends: Array<MapData, Backend> =
        Array::try_from(Map::Array(open(maps::BACKENDS))).expect("backends");
    let ports: Array<MapData, u64> =
        Array::try_from(Map::Array(open(maps::SVC_PORTS))).expect("port bitmap");
    let mut out = BTreeMap::new();
    for item in services.iter() {
        let (k, id) = item.expect("service entry");
        let vip = VIPS
            .iter()
            .position(|v| k.addr == addr_words((*v).into()))
            .expect("only the VIPs are served");
        assert_eq!(k.proto, PROTO_TCP);
        let port = u16::from_be(k.port);
        assert!(
            !out.contains_key(&(port, vip)),
            "one service key per address and port"
        );
        let word = ports.get(&u32::from(port / 64), 0).expect("port bitmap");
        assert!(
            word & (1 << (port % 64)) != 0,
            "port {port} is served but its SVC_PORTS bit is clear: the program would pass it"
        );
        let slots = (0..MAGLEV_SIZE)
            .map(|i| {
                let b = ring.get(&(id * MAGLEV_SIZE + i), 0).expect("ring slot");
                (b != 0).then(|| {
                    let be = backends.get(&b, 0).expect("backend");
                    IpAddr::V4(Ipv4Addr::from(be.addr[0].to_ne_bytes()))
                })
            })
            .collect();
        out.insert(
            (port, vip),
            Seen {
                info: info.get(&id, 0).expect("info"),
                ring: slots,
            },
        );
    }
    out
}

#[test]
fn applying_changes_writes_exactly_the_difference() {
    require_root();
    let seed = std::env::var("NB_PROPTEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026_u64);
    let mut rng = Rng(seed | 1);
    let pin = std::path::PathBuf::from(format!("/sys/fs/bpf/nb-rd-{}", unique_suffix()));
    let _ = std::fs::remove_dir_all(&pin);
    let mut dp = Dataplane::load(&pin, 4096).expect("load the data path");
    let mut model: Model = BTreeMap::new();
    let mut first = BTreeMap::new();
    first.insert(1, (100, true));
    first.insert(2, (100, true));
    first.insert(3, (100, true));
    model.insert((80, 0), (ALG_ROUNDROBIN, first.clone()));
    // The same number on the other address, with other nodes: a service of its own.
    first.remove(&1);
    first.insert(4, (100, true));
    model.insert((80, 1), (ALG_ROUNDROBIN, first));
    dp.apply(&specs(&model)).expect("apply");
    let mut prev_model = model.clone();
    let mut prev = read(&pin);
    let mut log = Vec::new();
    for step in 0..STEPS {
        let change = mutate(&mut model, &mut rng);
        log.push(change.clone());
        dp.apply(&specs(&model)).expect("apply");
        let seen = read(&pin);
        let ctx = || format!("seed {seed}, step {step}: {change}\nhistory: {log:#?}");
        assert_eq!(
            seen.keys().copied().collect::<BTreeSet<_>>(),
            model.keys().copied().collect::<BTreeSet<_>>(),
            "services in the map = ports in the config; {}",
            ctx()
        );
        for (port, (alg, nodes)) in &model {
            let s = &seen[port];
            let eligible: BTreeSet<IpAddr> = nodes
                .iter()
                .filter(|(_, (_, e))| *e)
                .map(|(i, _)| node_addr(*i))
                .collect();
            assert_eq!(s.info.algorithm, *alg, "port {port:?} algorithm; {}", ctx());
            assert_eq!(
                s.info.backends as usize,
                eligible.len(),
                "port {port:?} eligible count; {}",
                ctx()
            );
            if !eligible.is_empty() {
                let in_ring: BTreeSet<IpAddr> = s.ring.iter().flatten().copied().collect();
                assert_eq!(
                    in_ring,
                    eligible,
                    "port {port:?}: the ring holds exactly the eligible nodes; {}",
                    ctx()
                );
            }
            let Some(p) = prev.get(port) else { continue };
            let before = prev_model.get(port);
            let same_nodes = before.map(|b| &b.1) == Some(nodes);
            if same_nodes {
                assert!(
                    p.ring == s.ring,
                    "port {port:?} unchanged: its ring must not change; {}",
                    ctx()
                );
            }
            let before_eligible: BTreeSet<IpAddr> = before
                .map(|b| {
                    b.1.iter()
                        .filter(|(_, (_, e))| *e)
                        .map(|(i, _)| node_addr(*i))
                        .collect()
                })
                .unwrap_or_default();
            let weights_same = before.is_some_and(|b| {
                nodes
                    .iter()
                    .all(|(i, (w, _))| b.1.get(i).is_none_or(|(bw, _)| bw == w))
            });
            if weights_same && eligible.is_subset(&before_eligible) && !eligible.is_empty() {
                let moved = p
                    .ring
                    .iter()
                    .zip(&s.ring)
                    .filter(|(a, b)| match (a, b) {
                        (Some(a), Some(b)) => eligible.contains(a) && a != b,
                        _ => false,
                    })
                    .count();
                assert_eq!(
                    moved,
                    0,
                    "port {port:?}: nodes only left, yet {moved} slots moved between survivors; {}",
                    ctx()
                );
            }
        }
        prev = seen;
        prev_model = model.clone();
    }
    drop(dp);
    let _ = std::fs::remove_dir_all(&pin);
}

/// Two balancers of a fleet with the same config and health hold the same rings, whatever
/// each one went through before: one applies a long random history, the other only its
/// end, and every service's ring names the same node in every slot.
#[test]
fn fleet_rings_do_not_depend_on_history() {
    require_root();
    let mut rng = Rng(0x000f_1ee7 | 1);
    let pins: Vec<std::path::PathBuf> = (0..2)
        .map(|i| std::path::PathBuf::from(format!("/sys/fs/bpf/nb-rf{i}-{}", unique_suffix())))
        .collect();
    let mut dps: Vec<Dataplane> = pins
        .iter()
        .map(|p| {
            let _ = std::fs::remove_dir_all(p);
            let mut dp = Dataplane::load(p, 4096).expect("load the data path");
            dp.set_fleet_rings(true);
            dp
        })
        .collect();
    let mut model: Model = BTreeMap::new();
    let nodes: BTreeMap<u8, (u32, bool)> = (1..=4).map(|i| (i, (100, true))).collect();
    model.insert((80, 0), (ALG_SOURCE, nodes));
    dps[0].apply(&specs(&model)).expect("apply");
    for _ in 0..STEPS {
        mutate(&mut model, &mut rng);
        dps[0].apply(&specs(&model)).expect("apply");
    }
    dps[1].apply(&specs(&model)).expect("apply");
    let (a, b) = (read(&pins[0]), read(&pins[1]));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (svc, seen) in &a {
        let moved = seen
            .ring
            .iter()
            .zip(&b[svc].ring)
            .filter(|(x, y)| x != y)
            .count();
        assert_eq!(
            moved, 0,
            "service {svc:?}: {moved} slots differ between the balancers"
        );
    }
    drop(dps);
    for p in pins {
        let _ = std::fs::remove_dir_all(&p);
    }
}
