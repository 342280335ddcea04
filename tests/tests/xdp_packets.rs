//! Packet tables through BPF_PROG_TEST_RUN: input frame, expected action, expected output
//! frame (built from scratch with full checksums, so every incremental update is checked).
//!
//! The program runs inside a network namespace whose interface, routes and (permanent)
//! neighbours make the kernel's FIB lookup answer exactly as on a real balancer.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use aya::{
    TestRun, TestRunOptions,
    maps::{Array, HashMap as BpfHashMap, Map, MapData},
};
use nb_agent::dataplane::{BackendSpec, Dataplane, FlowTimeouts, ServiceSpec, coarse_now_ns};
use nb_common::{
    ALG_ROUNDROBIN, FAMILY_V4, FAMILY_V6, FlowKey, FlowValue, REV_TW_NONE, REV_TW_SEQ, REV_TW_TS,
    RevValue, SNAT_PORT_MAX, SNAT_PORT_MIN, cfg, maps,
};
use nb_tests::{
    netns::{Netns, veth},
    packet::{self, ACK, FIN, Frame, Ip, PSH, RST, SYN},
    require_root,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x21];
const B6_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x61];

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const LB_PRIV: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
const B1: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
/// On the second NIC: reached by redirect.
const LB_PRIV2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const B2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const LB_PRIV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x11);

/// The balancer namespace with two NICs (`lb0`, `lb1`), and the data path loaded in it.
struct Rig {
    ns: Netns,
    _peer: Netns,
    lb0: u32,
    lb0_mac: [u8; 6],
    lb1_mac: [u8; 6],
    pin: String,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        require_root();
        let ns = Netns::new(tag);
        let peer = Netns::new(&format!("{tag}p"));
        veth(&ns, "lb0", &peer, "cl0");
        veth(&ns, "lb1", &peer, "cl1");
        ns.sh(
            "ip addr add 198.18.0.1/24 dev lb0 && ip addr add 198.18.0.10/32 dev lb0 && \
             ip addr add 198.19.0.1/24 dev lb0 && ip addr add 198.19.1.1/24 dev lb1 && \
             ip -6 addr add 2001:db8:1::1/64 dev lb0 nodad && ip -6 addr add 2001:db8:1::10/128 dev lb0 nodad && \
             ip -6 addr add 2001:db8:2::1/64 dev lb0 nodad && \
             ip neigh add 198.18.0.2 lladdr 02:00:00:00:00:02 dev lb0 nud permanent && \
             ip neigh add 198.19.0.11 lladdr 02:00:00:00:00:11 dev lb0 nud permanent && \
             ip neigh add 198.19.1.11 lladdr 02:00:00:00:00:21 dev lb1 nud permanent && \
             ip -6 neigh add 2001:db8:2::11 lladdr 02:00:00:00:00:61 dev lb0 nud permanent && \
             sysctl -qw net.ipv4.conf.lb0.forwarding=1 net.ipv4.conf.lb1.forwarding=1 \
                net.ipv6.conf.lb0.forwarding=1 net.ipv6.conf.lb1.forwarding=1",
        );
        let lb0: u32 = ns
            .sh("cat /sys/class/net/lb0/ifindex")
            .trim()
            .parse()
            .expect("ifindex");
        let mac = |i: &str| -> [u8; 6] {
            let s = ns.sh(&format!("cat /sys/class/net/{i}/address"));
            let mut m = [0u8; 6];
            for (k, b) in s.trim().split(':').enumerate() {
                m[k] = u8::from_str_radix(b, 16).expect("mac");
            }
            m
        };
        let lb0_mac = mac("lb0");
        let lb1_mac = mac("lb1");
        let pin = format!("/sys/fs/bpf/{}", ns.name());
        Rig {
            ns,
            _peer: peer,
            lb0,
            lb0_mac,
            lb1_mac,
            pin,
        }
    }

    /// Runs `f` in the namespace with a freshly loaded data path programmed with `services`.
    fn with<R: Send + 'static>(
        &self,
        services: Vec<ServiceSpec>,
        f: impl FnOnce(&mut Runner) -> R + Send + 'static,
    ) -> R {
        let pin = self.pin.clone();
        let lb0 = self.lb0;
        self.ns.enter(move || {
            let _ = std::fs::remove_dir_all(&pin);
            // Removes the pins when the test ends, a failing one too.
            let _unpin = Unpin(pin.clone());
            let mut dp = Dataplane::load(std::path::Path::new(&pin), 65536).expect("load XDP");
            dp.apply(&services).expect("apply services");
            let mut r = Runner { dp, lb0 };
            f(&mut r)
        })
    }
}

/// A pin directory, removed on drop.
struct Unpin(String);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Flow table `name` (`maps::FLOWS` or `maps::REV_FLOWS`) of the data path pinned at `pin`.
fn flow_table<V: aya::Pod>(pin: &std::path::Path, name: &str) -> BpfHashMap<MapData, FlowKey, V> {
    let map = MapData::from_pin(pin.join(name)).expect("pinned flow table");
    BpfHashMap::try_from(Map::LruHashMap(map)).expect("flow table")
}

/// Timeouts under which every flow has expired.
const EXPIRE_ALL: FlowTimeouts = FlowTimeouts {
    established_secs: 0,
    closing_secs: 0,
    closed_port_secs: 0,
    unanswered_secs: 0,
};

struct Runner {
    dp: Dataplane,
    lb0: u32,
}

impl Runner {
    /// One BPF_PROG_TEST_RUN on `frame` arriving on lb0: (action, output frame).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes()); // data_end
        ctx[12..16].copy_from_slice(&self.lb0.to_ne_bytes()); // ingress_ifindex
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.program().expect("program");
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(res.data_size_out as usize);
        (res.return_value, out)
    }

    fn counter(&self, name: &str) -> u64 {
        self.dp
            .packet_counters()
            .expect("counters")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }
}

fn backend(key: &str, addr: IpAddr, port: u16, snat: IpAddr) -> BackendSpec {
    BackendSpec {
        key: key.into(),
        addr,
        port,
        snat,
        weight: 100,
        eligible: true,
    }
}

fn service_v4(backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        port: 80,
        family: FAMILY_V4,
        vips: vec![VIP.into()],
        algorithm: ALG_ROUNDROBIN,
        backends,
    }
}

fn one_backend() -> Vec<ServiceSpec> {
    vec![
        service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]),
        ServiceSpec {
            port: 80,
            family: FAMILY_V6,
            vips: vec![VIP6.into()],
            algorithm: ALG_ROUNDROBIN,
            backends: vec![backend("b6", B6.into(), 8080, LB_PRIV6.into())],
        },
    ]
}

fn syn(lb_mac: [u8; 6], sport: u16) -> Frame {
    let mut f = Frame::v4((CLIENT, sport), (VIP, 80), SYN);
    f.dst_mac = lb_mac;
    f.src_mac = CLIENT_MAC;
    f.tcp.seq = 1000;
    f.tcp.options = vec![2, 4, 5, 0xb4, 1, 1, 4, 2]; // MSS 1460, NOP, NOP, SACK permitted
    f
}

/// Sends `f` twice (from the flow table, then from this CPU's copy of its entry) and checks
/// both times that it is forwarded to `to` from `from` on SNAT port `snat`.
fn forwarded_twice(
    r: &mut Runner,
    f: &Frame,
    what: &str,
    to: (IpAddr, u16, [u8; 6]),
    from: (IpAddr, [u8; 6]),
    snat: u16,
) {
    for _ in 0..2 {
        let (act, out) = r.run(&f.build());
        assert_eq!(act, XDP_TX, "{what}");
        assert_eq!(assert_forwarded(f, &out, to, from), snat, "{what}");
    }
}

/// Checks `out` is `input` forwarded to (addr, port, mac) from (snat, mac), with a SNAT port
/// from nb's range, by building the expected frame from scratch. Returns the SNAT port.
fn assert_forwarded(
    input: &Frame,
    out: &[u8],
    to: (IpAddr, u16, [u8; 6]),
    from: (IpAddr, [u8; 6]),
) -> u16 {
    packet::verify_checksums(out).unwrap_or_else(|e| panic!("forwarded frame checksums: {e}"));
    let got = packet::parse(out).expect("parse forwarded frame");
    let sport = got.tcp.sport;
    assert!(
        (SNAT_PORT_MIN..=SNAT_PORT_MAX).contains(&sport),
        "SNAT port {sport} outside nb's range"
    );
    let mut want = input.clone();
    want.dst_mac = to.2;
    want.src_mac = from.1;
    want.ip = match (&input.ip, from.0, to.0) {
        (
            Ip::V4 {
                ttl,
                id,
                options,
                more_fragments,
                frag_offset,
                ..
            },
            IpAddr::V4(s),
            IpAddr::V4(d),
        ) => Ip::V4 {
            src: s,
            dst: d,
            ttl: *ttl,
            id: *id,
            options: options.clone(),
            more_fragments: *more_fragments,
            frag_offset: *frag_offset,
        },
        (Ip::V6 { hop_limit, .. }, IpAddr::V6(s), IpAddr::V6(d)) => Ip::V6 {
            src: s,
            dst: d,
            hop_limit: *hop_limit,
        },
        _ => panic!("family mismatch"),
    };
    want.tcp.sport = sport;
    want.tcp.dport = to.1;
    assert_eq!(
        out,
        &want.build()[..],
        "forwarded frame differs from the expected one"
    );
    sport
}

#[test]
fn syn_established_reply_and_close() {
    let rig = Rig::new("pk1");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        let s = syn(lb_mac, 40000);
        let (act, out) = r.run(&s.build());
        assert_eq!(
            act, XDP_TX,
            "SYN to the service goes back out of lb0 towards the backend"
        );
        let snat = assert_forwarded(
            &s,
            &out,
            (B1.into(), 8080, B1_MAC),
            (LB_PRIV.into(), lb_mac),
        );
        assert_eq!(r.counter("new_flow"), 1);

        // Established: same backend, same SNAT port, payload untouched.
        let mut d = Frame::v4((CLIENT, 40000), (VIP, 80), ACK | PSH);
        d.dst_mac = lb_mac;
        d.src_mac = CLIENT_MAC;
        d.tcp.seq = 1001;
        d.tcp.ack = 5001;
        d.tcp.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (act, out) = r.run(&d.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(
            assert_forwarded(
                &d,
                &out,
                (B1.into(), 8080, B1_MAC),
                (LB_PRIV.into(), lb_mac)
            ),
            snat
        );

        // The backend's SYN-ACK goes back to the client, from the public address and port.
        let mut back = Frame::v4((B1, 8080), (LB_PRIV, snat), SYN | ACK);
        back.dst_mac = lb_mac;
        back.src_mac = B1_MAC;
        back.tcp.seq = 5000;
        back.tcp.ack = 1001;
        let (act, out) = r.run(&back.build());
        assert_eq!(act, XDP_TX, "reply translated back");
        packet::verify_checksums(&out).expect("reply checksums");
        let mut want = back.clone();
        want.dst_mac = CLIENT_MAC;
        want.src_mac = lb_mac;
        if let Ip::V4 { src, dst, .. } = &mut want.ip {
            *src = VIP;
            *dst = CLIENT;
        }
        want.tcp.sport = 80;
        want.tcp.dport = 40000;
        assert_eq!(out, want.build(), "reply frame");
        assert_eq!(r.counter("reply"), 1);

        // FIN keeps going to the same backend.
        let mut fin = d.clone();
        fin.tcp.flags = FIN | ACK;
        fin.tcp.payload.clear();
        let (act, out) = r.run(&fin.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(
            assert_forwarded(
                &fin,
                &out,
                (B1.into(), 8080, B1_MAC),
                (LB_PRIV.into(), lb_mac)
            ),
            snat
        );
    });
}

/// The program stamps flows with the clock the agent writes into its config map (an array
/// read) instead of calling a clock helper per packet; the clock moves, and the sweep ages
/// flows by it.
#[test]
fn flows_are_stamped_with_the_agents_clock() {
    let rig = Rig::new("pk8");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        let open = |name: &str| MapData::from_pin(pin.join(name)).expect("pinned map");
        let config: Array<MapData, u64> =
            Array::try_from(Map::Array(open(maps::CONFIG))).expect("config map");
        let clock = || config.get(&cfg::CLOCK_NS, 0).expect("clock");
        let c0 = clock();
        let real = coarse_now_ns();
        assert!(
            c0 > 0 && c0 <= real && real - c0 < 1_000_000_000,
            "the clock is written at load and current: {c0} vs {real}"
        );
        std::thread::sleep(std::time::Duration::from_millis(400));
        let c1 = clock();
        assert!(
            c1 >= c0 + 200_000_000,
            "the clock moves (100 ms ticks): {c0} then {c1} 400 ms later"
        );
        // A SYN between two equal readings of the clock must carry exactly that time (the
        // kernel's own clock would differ in the nanoseconds).
        let mut stamped = None;
        for port in 40100..40110 {
            let before = clock();
            let (act, _) = r.run(&syn(lb_mac, port).build());
            assert_eq!(act, XDP_TX);
            if clock() == before {
                stamped = Some((port, before));
                break;
            }
        }
        let (port, at) = stamped.expect("ten SYNs all straddled a clock tick");
        let flows = flow_table::<FlowValue>(&pin, maps::FLOWS);
        let stamp = flows
            .iter()
            .filter_map(Result::ok)
            .find(|(k, _)| u16::from_be(k.sport) == port)
            .map(|(_, v)| v.last_seen)
            .expect("the SYN's flow");
        assert_eq!(stamp, at, "the flow carries the agent's clock");
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!(report.expired, 0, "fresh flows are not idle");
    });
}

/// 8000 new connections to one backend (35% of its SNAT ports) all get a port: each flow
/// tries its ports with a stride of its own (with one stride for all, flow 4277 found its 8
/// tries taken). The sweep reads the flow tables in batches (4096 per batch, so two here) and
/// deletes what expired in batches: every flow is seen, and every expired one goes.
#[test]
fn new_flows_get_ports_and_the_sweep_sees_and_expires_every_flow() {
    sweep_sees_and_expires_every_flow("pk9", 8000, true);
}

/// The same through the sweep's path for kernels without batch calls: entry by entry.
#[test]
fn the_sweep_without_batch_calls_sees_and_expires_every_flow() {
    sweep_sees_and_expires_every_flow("pka", 1500, false);
}

fn sweep_sees_and_expires_every_flow(tag: &str, n: u16, batch: bool) {
    let rig = Rig::new(tag);
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        r.dp.set_batch_calls(batch);
        for port in 20000..20000 + n {
            let (act, _) = r.run(&syn(lb_mac, port).build());
            assert_eq!(
                act,
                XDP_TX,
                "port {port}: {} dropped for want of a SNAT port",
                r.counter("drop_no_port")
            );
        }
        let n = u64::from(n);
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!((report.flows, report.expired), (n, 0));
        assert_eq!(report.batched, batch, "the tables were read as asked");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let report = r.dp.sweep(EXPIRE_ALL).expect("sweep");
        assert_eq!((report.flows, report.expired), (n, n));
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!(report.flows, 0);
        assert_eq!(report.batched, batch);
        let flows = flow_table::<FlowValue>(&pin, maps::FLOWS);
        assert_eq!(flows.keys().count(), 0, "the flow table is empty");
        let rev = flow_table::<RevValue>(&pin, maps::REV_FLOWS);
        assert_eq!(rev.keys().count(), 0, "the reply table is empty");
    });
}

/// A sweep reads both tables whole and then deletes what expired; with full tables that takes
/// long. A client reusing its port in between opens a new connection on the expired entries:
/// the sweep must leave them alone (deleted, the connection's next packet would find no entry
/// and be sent by the ring, maybe to another backend).
#[test]
fn the_sweep_spares_entries_a_new_connection_took_while_it_ran() {
    let rig = Rig::new("pkb");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        // Two connections, each reset by its client: both are over.
        for port in [41000, 41001] {
            let (act, _) = r.run(&syn(lb_mac, port).build());
            assert_eq!(act, XDP_TX, "port {port}: SYN");
            let mut rst = syn(lb_mac, port);
            rst.tcp.flags = RST | ACK;
            let (act, _) = r.run(&rst.build());
            assert_eq!(act, XDP_TX, "port {port}: RST");
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let plan = r.dp.sweep_plan(EXPIRE_ALL).expect("sweep plan");
        assert_eq!(plan.expiring(), 2, "both connections are over");
        // While the sweep runs, the first client opens a new connection from the same port.
        let (act, _) = r.run(&syn(lb_mac, 41000).build());
        assert_eq!(act, XDP_TX, "the new connection's SYN");
        let report = r.dp.sweep_apply(plan).expect("sweep apply");
        assert_eq!(report.expired, 1, "only the untouched connection expired");

        let flows = flow_table::<FlowValue>(&pin, maps::FLOWS);
        let ports: Vec<u16> = flows
            .keys()
            .filter_map(Result::ok)
            .map(|k| u16::from_be(k.sport))
            .collect();
        assert_eq!(ports, vec![41000], "the new connection keeps its entry");
        let rev = flow_table::<RevValue>(&pin, maps::REV_FLOWS);
        let clients: Vec<u16> = rev
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| u16::from_be(v.client_port))
            .collect();
        assert_eq!(clients, vec![41000], "and its reply entry");
        // Its next packet is forwarded on that entry, not sent by the ring.
        let mut data = syn(lb_mac, 41000);
        data.tcp.flags = ACK;
        let misses = r.counter("flow_miss");
        let (act, _) = r.run(&data.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(r.counter("flow_miss"), misses, "found its entry");
    });
}

/// The SNAT ports a SYN from `client` to the IPv4 service tries, in order (host order), as
/// the program computes them.
fn snat_tries(client: (Ipv4Addr, u16)) -> Vec<u16> {
    let word = |a: Ipv4Addr| [u32::from_ne_bytes(a.octets()), 0, 0, 0];
    nb_common::hash::snat_tries(&word(client.0), &word(VIP), client.1.to_be(), 80u16.to_be())
        .to_vec()
}

/// A client address and port, none of `taken`, whose first SNAT port try is `port`.
fn client_trying_first(port: u16, taken: &[(Ipv4Addr, u16)]) -> (Ipv4Addr, u16) {
    (1..=250u8)
        .flat_map(|host| (1024..=65535u16).map(move |p| (Ipv4Addr::new(198, 18, 7, host), p)))
        .find(|c| !taken.contains(c) && snat_tries(*c)[0] == port)
        .expect("some client tries that port first")
}

/// `syn` from `client`'s address and port.
fn syn_from(lb_mac: [u8; 6], client: (Ipv4Addr, u16)) -> Frame {
    let mut f = syn(lb_mac, client.1);
    if let Ip::V4 { src, .. } = &mut f.ip {
        *src = client.0;
    }
    f
}

/// A SYN from `client` to the IPv4 service: (action, SNAT port it went out with, if any).
fn open_from(r: &mut Runner, lb_mac: [u8; 6], client: (Ipv4Addr, u16)) -> (u32, Option<u16>) {
    let f = syn_from(lb_mac, client);
    let (act, out) = r.run(&f.build());
    let port = (act == XDP_TX).then(|| packet::parse(&out).expect("forwarded SYN").tcp.sport);
    (act, port)
}

/// A packet from backend B1's port `bport` to the balancer's SNAT port `snat`.
fn from_backend(lb_mac: [u8; 6], bport: u16, snat: u16, flags: u8) -> Frame {
    let mut f = Frame::v4((B1, bport), (LB_PRIV, snat), flags);
    f.dst_mac = lb_mac;
    f.src_mac = B1_MAC;
    f
}

/// A connection from `client` that got its first SNAT port try, then reset both ways: the
/// port it held.
fn open_and_close(r: &mut Runner, lb_mac: [u8; 6], client: (Ipv4Addr, u16)) -> u16 {
    let (act, port) = open_from(r, lb_mac, client);
    assert_eq!(
        (act, port),
        (XDP_TX, Some(snat_tries(client)[0])),
        "{client:?} gets its first port"
    );
    let port = port.unwrap();
    reset_both_ways(r, lb_mac, client, 8080, port);
    port
}

/// Both sides of the connection from `client` to backend port `bport` on SNAT port `snat`
/// reset it.
fn reset_both_ways(
    r: &mut Runner,
    lb_mac: [u8; 6],
    client: (Ipv4Addr, u16),
    bport: u16,
    snat: u16,
) {
    let mut rst = syn_from(lb_mac, client);
    rst.tcp.flags = RST | ACK;
    assert_eq!(r.run(&rst.build()).0, XDP_TX, "client RST");
    let back = from_backend(lb_mac, bport, snat, RST | ACK);
    assert_eq!(r.run(&back.build()).0, XDP_TX, "backend RST");
}

/// A closed connection keeps its SNAT port for `SNAT_HOLD_SECS` (the backend may still hold
/// the old connection in TIME_WAIT, and would answer another client's SYN on those addresses
/// with an ACK for it): a new connection trying that port takes another. Only a connection
/// that finds none of its ports free takes over a closed connection's port, and only once
/// that one has been silent `SNAT_TAKEOVER_SECS`; the closed connection's client entry goes.
#[test]
fn a_closed_connections_snat_port_is_held_and_taken_over_only_when_none_is_free() {
    let rig = Rig::new("pkc");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        let client_entry = |c: (Ipv4Addr, u16)| {
            let flows = flow_table::<FlowValue>(&pin, maps::FLOWS);
            flows.keys().filter_map(Result::ok).any(|k| {
                k.src[0] == u32::from_ne_bytes(c.0.octets()) && u16::from_be(k.sport) == c.1
            })
        };
        let mut used = Vec::new();

        // Held: connection A closes; a sweep drops its client entry (10 s after a close, here
        // at once) but keeps its reply entry, so B, trying A's port first, takes its second.
        let a = (Ipv4Addr::new(198, 18, 6, 1), 40000);
        used.push(a);
        let pa = open_and_close(r, lb_mac, a);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let t = FlowTimeouts {
            closing_secs: 0,
            ..FlowTimeouts::default()
        };
        assert_eq!(r.dp.sweep(t).expect("sweep").expired, 1, "A's client entry");
        assert!(!client_entry(a));
        let b = client_trying_first(pa, &used);
        used.push(b);
        let (act, pb) = open_from(r, lb_mac, b);
        assert_eq!(act, XDP_TX);
        assert_eq!(pb, Some(snat_tries(b)[1]), "B passes over A's held port");

        // Taken over: connection C closes; D tries C's port first and finds its other seven
        // taken by live connections. D is dropped while C is fresh, and gets C's port once C
        // has been silent for SNAT_TAKEOVER_SECS.
        let c = (Ipv4Addr::new(198, 18, 6, 2), 40000);
        used.push(c);
        let pc = open_and_close(r, lb_mac, c);
        let d = client_trying_first(pc, &used);
        used.push(d);
        for &q in &snat_tries(d)[1..] {
            let z = client_trying_first(q, &used);
            used.push(z);
            assert_eq!(
                open_from(r, lb_mac, z),
                (XDP_TX, Some(q)),
                "a live connection on {q}"
            );
        }
        let drops = r.counter("drop_no_port");
        assert_eq!(
            open_from(r, lb_mac, d).0,
            XDP_DROP,
            "C's port is too fresh to take"
        );
        assert_eq!(r.counter("drop_no_port"), drops + 1);
        assert!(client_entry(c), "C's client entry stays");
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::SNAT_TAKEOVER_SECS * 1000 + 1100,
        ));
        assert_eq!(
            open_from(r, lb_mac, d),
            (XDP_TX, Some(pc)),
            "D takes over C's port"
        );
        assert_eq!(r.counter("snat_port_reused"), 1);
        assert_eq!(
            r.counter("snat_port_reused_may_refuse"),
            0,
            "C was reset: its backend holds no TIME_WAIT"
        );
        assert!(!client_entry(c), "C's client entry went with its port");
        // D's replies reach D, not C.
        let (act, out) = r.run(&from_backend(lb_mac, 8080, pc, SYN | ACK).build());
        assert_eq!(act, XDP_TX);
        let got = packet::parse(&out).expect("reply");
        assert_eq!(got.tcp.dport, d.1, "the reply goes to D's port");
        match got.ip {
            Ip::V4 { dst, .. } => assert_eq!(dst, d.0, "and to D's address"),
            _ => panic!("IPv4 expected"),
        }
    });
}

/// TCP options as Linux sends them: a SYN's (MSS, SACK permitted, timestamps, window scale:
/// the timestamp third, at no aligned offset), and every later segment's (two NOPs, then the
/// timestamps).
fn syn_options(tsval: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(0u32.to_be_bytes());
    o.extend([1, 3, 3, 7]);
    o
}

fn ts_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(tsecr.to_be_bytes());
    o
}

/// An IPv6 address as the four network-order words of a `FlowKey`.
fn v6_words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The reply entry of SNAT port `snat` towards B1:8080.
fn rev_entry(pin: &std::path::Path, snat: u16) -> RevValue {
    let rev = flow_table::<RevValue>(pin, maps::REV_FLOWS);
    let key = FlowKey {
        src: [u32::from_ne_bytes(B1.octets()), 0, 0, 0],
        dst: [u32::from_ne_bytes(LB_PRIV.octets()), 0, 0, 0],
        sport: 8080u16.to_be(),
        dport: snat.to_be(),
        family: FAMILY_V4,
        proto: 6,
        _pad: [0; 2],
    };
    rev.get(&key, 0).expect("reply entry")
}

/// A connection from `client` on its first SNAT port, answered, then closed by the backend
/// first as Linux does it (FIN; the client's FIN; the backend's last ACK, from TIME_WAIT),
/// with timestamps if `ts` is given as (client's last TSval, backend's TSval): its port.
fn open_and_close_by_backend(
    r: &mut Runner,
    lb_mac: [u8; 6],
    client: (Ipv4Addr, u16),
    ts: Option<(u32, u32)>,
    last_acked: u32,
) -> u16 {
    let (act, port) = open_from(r, lb_mac, client);
    assert_eq!(
        (act, port),
        (XDP_TX, Some(snat_tries(client)[0])),
        "{client:?} gets its first port"
    );
    let port = port.unwrap();
    let back = |r: &mut Runner, flags: u8, ecr_delta: u32, ack: u32| {
        let mut f = from_backend(lb_mac, 8080, port, flags);
        f.tcp.ack = ack;
        if let Some((client_ts, own_ts)) = ts {
            f.tcp.options = ts_options(own_ts, client_ts.wrapping_sub(ecr_delta));
        }
        assert_eq!(r.run(&f.build()).0, XDP_TX, "backend packet {flags:#x}");
    };
    back(r, SYN | ACK, 30, last_acked.wrapping_sub(200));
    // Answered: plain packets after this may be served from a copy.
    back(r, ACK | PSH, 20, last_acked.wrapping_sub(100));
    back(r, ACK | PSH, 20, last_acked.wrapping_sub(100));
    back(r, FIN | ACK, 10, last_acked.wrapping_sub(1));
    let mut fin = syn_from(lb_mac, client);
    fin.tcp.flags = FIN | ACK;
    assert_eq!(r.run(&fin.build()).0, XDP_TX, "client FIN");
    // The last ACK, plain: it must reach the table, not a copy made before the close.
    back(r, ACK, 0, last_acked);
    port
}

/// The backend's close leaves on the reply entry what its TIME_WAIT will hold against a new
/// SYN on those addresses and ports: the client timestamp its last packet echoed, or without
/// timestamps the sequence number it acknowledged last; a reset leaves no TIME_WAIT.
#[test]
fn a_backends_close_records_what_its_time_wait_holds() {
    let rig = Rig::new("pkt");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        let a = (Ipv4Addr::new(198, 18, 6, 1), 40001);
        let pa = open_and_close_by_backend(r, lb_mac, a, Some((0x8000_0123, 77)), 5000);
        let e = rev_entry(&pin, pa);
        assert_eq!(
            e.flags & (REV_TW_TS | REV_TW_SEQ | REV_TW_NONE),
            REV_TW_TS,
            "timestamps"
        );
        assert_eq!(
            e.tw_mark, 0x8000_0123,
            "the TSecr of the backend's last ACK"
        );

        let b = (Ipv4Addr::new(198, 18, 6, 1), 40002);
        let pb = open_and_close_by_backend(r, lb_mac, b, None, 0xffff_fff0);
        let e = rev_entry(&pin, pb);
        assert_eq!(
            e.flags & (REV_TW_TS | REV_TW_SEQ | REV_TW_NONE),
            REV_TW_SEQ,
            "no timestamps"
        );
        assert_eq!(e.tw_mark, 0xffff_fff0, "the ack of the backend's last ACK");

        let c = (Ipv4Addr::new(198, 18, 6, 1), 40003);
        let pc = open_and_close(r, lb_mac, c);
        let e = rev_entry(&pin, pc);
        assert_ne!(e.flags & REV_TW_NONE, 0, "reset: no TIME_WAIT");
    });
}

/// A new connection that must take over a closed connection's port takes one whose
/// backend's TIME_WAIT will accept its SYN, not merely the oldest: Linux refuses a SYN whose
/// timestamp is older than the old connection's last (PAWS), or without timestamps one whose
/// sequence number is not past the old connection's, and a client's timestamps and sequence
/// numbers start at a random offset for every connection. With none that will, the oldest.
#[test]
fn a_takeover_picks_a_port_whose_time_wait_accepts_the_syn() {
    const FIRST_MARK: u32 = 0x4000_0000;
    const SECOND_MARK: u32 = 0x1000_0000;
    let rig = Rig::new("pku");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        let mut used = Vec::new();
        // For client `d`, whose SYN will try ports q0..q7: q0 closed first, its backend's
        // TIME_WAIT holding FIRST_MARK; q1 closed a second later, holding SECOND_MARK (lower:
        // each connection's numbers start at random); q2..q7 live. With `ts`, the marks are timestamps, else acknowledged sequence numbers.
        let mut scene = |r: &mut Runner, d: (Ipv4Addr, u16), ts: bool| -> Vec<u16> {
            used.push(d);
            let tries = snat_tries(d);
            for (i, mark) in [(0, FIRST_MARK), (1, SECOND_MARK)] {
                let c = client_trying_first(tries[i], &used);
                used.push(c);
                let (ts, acked) = if ts {
                    (Some((mark, 1)), 7)
                } else {
                    (None, mark)
                };
                assert_eq!(open_and_close_by_backend(r, lb_mac, c, ts, acked), tries[i]);
                if i == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1100));
                }
            }
            for &q in &tries[2..] {
                let z = client_trying_first(q, &used);
                used.push(z);
                assert_eq!(open_from(r, lb_mac, z), (XDP_TX, Some(q)), "live on {q}");
            }
            tries
        };
        let d1 = (Ipv4Addr::new(198, 18, 6, 9), 41001);
        let d2 = (Ipv4Addr::new(198, 18, 6, 9), 41002);
        let d3 = (Ipv4Addr::new(198, 18, 6, 9), 41003);
        let d4 = (Ipv4Addr::new(198, 18, 6, 9), 41004);
        let t1 = scene(r, d1, true);
        let t2 = scene(r, d2, true);
        let t3 = scene(r, d3, false);
        let t4 = scene(r, d4, true);
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::SNAT_TAKEOVER_SECS * 1000 + 1100,
        ));
        let open = |r: &mut Runner, c: (Ipv4Addr, u16), seq: u32, tsval: Option<u32>| {
            let mut f = syn_from(lb_mac, c);
            f.tcp.seq = seq;
            f.tcp.options = tsval.map(syn_options).unwrap_or_default();
            let (act, out) = r.run(&f.build());
            assert_eq!(act, XDP_TX);
            let got = packet::parse(&out).expect("forwarded SYN");
            assert_eq!(got.tcp.options, f.tcp.options, "options untouched");
            got.tcp.sport
        };
        let between = SECOND_MARK + (FIRST_MARK - SECOND_MARK) / 2;
        assert_eq!(
            open(r, d1, 1, Some(between)),
            t1[1],
            "a timestamp between the marks: the port whose TIME_WAIT holds the lower mark, not \
             the port closed first"
        );
        assert_eq!(
            open(r, d2, 1, Some(SECOND_MARK / 2)),
            t2[0],
            "a timestamp older than both: the oldest"
        );
        assert_eq!(
            open(r, d3, between, None),
            t3[1],
            "no timestamps, a sequence number between the marks: the port whose TIME_WAIT \
             acknowledged the lower"
        );
        assert_eq!(
            open(r, d4, 1, Some(SECOND_MARK + 1000)),
            t4[0],
            "a timestamp newer than a mark by less than the margin (TIME_WAIT may have taken a \
             later one silently) does not count as accepted: the oldest"
        );
        assert_eq!(r.counter("snat_port_reused"), 4);
        assert_eq!(
            r.counter("snat_port_reused_may_refuse"),
            2,
            "the two taken with no port known to accept"
        );
    });
}

/// A client reconnecting from the same port while its closed connection's reply entry is
/// still held (to another backend: two reply entries name that client) keeps its new
/// connection's entries: the sweep judges each client entry by its own reply entry.
#[test]
fn a_reconnected_client_is_judged_by_its_new_connection() {
    let rig = Rig::new("pkd");
    let lb_mac = rig.lb0_mac;
    let two = service_v4(vec![
        backend("b1", B1.into(), 8080, LB_PRIV.into()),
        backend("b1b", B1.into(), 8081, LB_PRIV.into()),
    ]);
    rig.with(vec![two], move |r| {
        // Opens a connection from `port` and lets the backend answer: (backend port, SNAT).
        let connect = |r: &mut Runner, port: u16| -> (u16, u16) {
            let (act, out) = r.run(&syn(lb_mac, port).build());
            assert_eq!(act, XDP_TX);
            let got = packet::parse(&out).expect("forwarded SYN");
            let back = from_backend(lb_mac, got.tcp.dport, got.tcp.sport, SYN | ACK);
            assert_eq!(r.run(&back.build()).0, XDP_TX, "SYN-ACK");
            (got.tcp.dport, got.tcp.sport)
        };
        let ports: Vec<u16> = (42000..42020).collect();
        let mut first = Vec::new();
        for &p in &ports {
            let (bport, snat) = connect(r, p);
            reset_both_ways(r, lb_mac, (CLIENT, p), bport, snat);
            first.push(bport);
        }
        // One connection more in between shifts the round robin by one: every client now
        // reaches the other backend.
        connect(r, 43000);
        for (&p, &was) in ports.iter().zip(&first) {
            let (bport, _) = connect(r, p);
            assert_ne!(bport, was, "port {p} reconnects to the other backend");
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let t = FlowTimeouts {
            closing_secs: 0,
            ..FlowTimeouts::default()
        };
        let report = r.dp.sweep(t).expect("sweep");
        assert_eq!(
            (report.flows, report.expired),
            (21, 0),
            "no live connection is taken for its closed predecessor"
        );
        let active: u64 = report.active.values().sum();
        assert_eq!(active, 21, "all count as active");
    });
}

#[test]
fn passes_what_is_not_ours_untouched() {
    let rig = Rig::new("pk2");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut other_port = syn(lb_mac, 40001);
        other_port.tcp.dport = 22;
        cases.push((
            "TCP to another port of the public address",
            other_port.build(),
        ));
        let mut other_addr = syn(lb_mac, 40001);
        if let Ip::V4 { dst, .. } = &mut other_addr.ip {
            *dst = Ipv4Addr::new(198, 18, 0, 1);
        }
        cases.push(("TCP to another local address", other_addr.build()));
        cases.push((
            "UDP to the public address",
            packet::udp_v4(CLIENT, VIP, 5000, 80),
        ));
        cases.push(("ARP", packet::arp()));
        let mut frag = syn(lb_mac, 40001);
        if let Ip::V4 { more_fragments, .. } = &mut frag.ip {
            *more_fragments = true;
        }
        cases.push(("IPv4 first fragment", frag.build()));
        let mut frag2 = syn(lb_mac, 40001);
        if let Ip::V4 { frag_offset, .. } = &mut frag2.ip {
            *frag_offset = 8;
        }
        cases.push(("IPv4 later fragment", frag2.build()));
        let mut reply_unknown = Frame::v4((B1, 8080), (LB_PRIV, 20000), ACK);
        reply_unknown.dst_mac = lb_mac;
        cases.push((
            "backend packet to a SNAT port with no flow",
            reply_unknown.build(),
        ));
        let mut rst = Frame::v4((CLIENT, 40002), (VIP, 80), RST);
        rst.dst_mac = lb_mac;
        cases.push(("RST for a service with no flow", rst.build()));
        for (what, frame) in cases {
            let (act, out) = r.run(&frame);
            assert_eq!(act, XDP_PASS, "{what}: must pass to the kernel");
            assert_eq!(out, frame, "{what}: must pass untouched");
        }
        assert!(r.counter("pass_fragment") >= 2);
    });
}

#[test]
fn truncated_at_every_length_passes_untouched() {
    let rig = Rig::new("pk3");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        let mut frames = vec![syn(lb_mac, 40010).build()];
        let mut v6 = Frame::v6((CLIENT6, 40010), (VIP6, 80), SYN);
        v6.dst_mac = lb_mac;
        frames.push(v6.build());
        let mut vlan = syn(lb_mac, 40010);
        vlan.vlan = Some(7);
        frames.push(vlan.build());
        for full in frames {
            // The kernel refuses test input shorter than an Ethernet header.
            for len in 14..full.len() {
                let cut = &full[..len];
                let (act, out) = r.run(cut);
                assert_eq!(act, XDP_PASS, "frame cut at {len} of {} bytes", full.len());
                assert_eq!(out, cut, "frame cut at {len}: must pass untouched");
            }
        }
        assert_eq!(r.counter("new_flow"), 0, "no cut frame may create a flow");
        assert!(r.counter("pass_malformed") > 0);
    });
}

#[test]
fn ipv6_vlan_and_ip_options() {
    let rig = Rig::new("pk4");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        let mut s6 = Frame::v6((CLIENT6, 40020), (VIP6, 80), SYN);
        s6.dst_mac = lb_mac;
        s6.src_mac = CLIENT_MAC;
        let (act, out) = r.run(&s6.build());
        assert_eq!(act, XDP_TX, "IPv6 SYN");
        let snat6 = assert_forwarded(
            &s6,
            &out,
            (B6.into(), 8080, B6_MAC),
            (LB_PRIV6.into(), lb_mac),
        );
        let mut back = Frame::v6((B6, 8080), (LB_PRIV6, snat6), SYN | ACK);
        back.dst_mac = lb_mac;
        let (act, out) = r.run(&back.build());
        assert_eq!(act, XDP_TX, "IPv6 reply");
        packet::verify_checksums(&out).expect("IPv6 reply checksums");
        let got = packet::parse(&out).expect("parse");
        assert_eq!((got.tcp.sport, got.tcp.dport), (80, 40020));

        // Plain packets both ways, twice each: from the table, then from this CPU's copy of
        // the entry; both translate alike.
        stay_on_this_cpu();
        let mut d6 = Frame::v6((CLIENT6, 40020), (VIP6, 80), ACK | PSH);
        d6.dst_mac = lb_mac;
        d6.src_mac = CLIENT_MAC;
        d6.tcp.payload = b"hello".to_vec();
        let to = (B6.into(), 8080, B6_MAC);
        forwarded_twice(r, &d6, "IPv6 data", to, (LB_PRIV6.into(), lb_mac), snat6);
        let mut b6 = Frame::v6((B6, 8080), (LB_PRIV6, snat6), ACK | PSH);
        b6.dst_mac = lb_mac;
        b6.tcp.payload = b"world".to_vec();
        let mut outs = Vec::new();
        for _ in 0..2 {
            let (act, out) = r.run(&b6.build());
            assert_eq!(act, XDP_TX, "IPv6 reply data");
            packet::verify_checksums(&out).expect("IPv6 reply data checksums");
            let got = packet::parse(&out).expect("parse");
            assert_eq!((got.tcp.sport, got.tcp.dport), (80, 40020));
            match got.ip {
                Ip::V6 { src, dst, .. } => assert_eq!((src, dst), (VIP6, CLIENT6)),
                _ => panic!("IPv6 expected"),
            }
            outs.push(out);
        }
        assert_eq!(
            outs[0], outs[1],
            "the copy translates the reply as the table did"
        );
        // The backend closes (its FIN, then its last ACK, plain: past the copy), and the
        // reply entry records the client timestamp it echoed last.
        for (flags, ecr) in [(FIN | ACK, 0x7000_0000u32), (ACK, 0x7000_0005)] {
            let mut c6 = Frame::v6((B6, 8080), (LB_PRIV6, snat6), flags);
            c6.dst_mac = lb_mac;
            c6.tcp.options = ts_options(99, ecr);
            assert_eq!(r.run(&c6.build()).0, XDP_TX, "IPv6 close {flags:#x}");
        }
        let rev = flow_table::<RevValue>(&pin, maps::REV_FLOWS);
        let e = rev
            .get(
                &FlowKey {
                    src: v6_words(B6),
                    dst: v6_words(LB_PRIV6),
                    sport: 8080u16.to_be(),
                    dport: snat6.to_be(),
                    family: FAMILY_V6,
                    proto: 6,
                    _pad: [0; 2],
                },
                0,
            )
            .expect("IPv6 reply entry");
        assert_eq!(
            (e.flags & (REV_TW_TS | REV_TW_SEQ | REV_TW_NONE), e.tw_mark),
            (REV_TW_TS, 0x7000_0005),
            "IPv6: the last echoed timestamp"
        );

        let mut v = syn(lb_mac, 40021);
        v.vlan = Some(42);
        let (act, out) = r.run(&v.build());
        assert_eq!(act, XDP_TX, "VLAN-tagged SYN");
        let snat_v = assert_forwarded(
            &v,
            &out,
            (B1.into(), 8080, B1_MAC),
            (LB_PRIV.into(), lb_mac),
        );
        let mut dv = data_from(lb_mac, (CLIENT, 40021));
        dv.vlan = Some(42);
        let to = (B1.into(), 8080, B1_MAC);
        forwarded_twice(
            r,
            &dv,
            "VLAN-tagged data",
            to,
            (LB_PRIV.into(), lb_mac),
            snat_v,
        );

        let mut o = syn(lb_mac, 40022);
        if let Ip::V4 { options, .. } = &mut o.ip {
            // Record route, then end of options: 12 bytes, keeps the header a multiple of 4.
            *options = vec![7, 11, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        }
        let (act, out) = r.run(&o.build());
        assert_eq!(act, XDP_TX, "SYN with IP options");
        assert_forwarded(
            &o,
            &out,
            (B1.into(), 8080, B1_MAC),
            (LB_PRIV.into(), lb_mac),
        );
    });
}

#[test]
fn no_backend_answers_rst_and_second_nic_redirects() {
    let rig = Rig::new("pk5");
    let lb_mac = rig.lb0_mac;
    let lb1_mac = rig.lb1_mac;
    let mut none = service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]);
    none.backends[0].eligible = false;
    none.port = 81;
    let other = ServiceSpec {
        port: 82,
        family: FAMILY_V4,
        vips: vec![VIP.into()],
        algorithm: ALG_ROUNDROBIN,
        backends: vec![backend("b2", B2.into(), 9090, LB_PRIV2.into())],
    };
    rig.with(vec![none, other], move |r| {
        let mut s = syn(lb_mac, 40030);
        s.tcp.dport = 81;
        s.tcp.seq = 77777;
        let (act, out) = r.run(&s.build());
        assert_eq!(act, XDP_TX, "no backend: the SYN is answered at once");
        packet::verify_checksums(&out).expect("RST checksums");
        let got = packet::parse(&out).expect("parse RST");
        assert_eq!(got.tcp.flags, RST | ACK);
        assert_eq!(got.tcp.ack, 77778, "RST acknowledges the SYN");
        assert_eq!((got.tcp.sport, got.tcp.dport), (81, 40030));
        assert_eq!((got.src_mac, got.dst_mac), (lb_mac, CLIENT_MAC));
        match got.ip {
            Ip::V4 { src, dst, .. } => assert_eq!((src, dst), (VIP, CLIENT)),
            _ => panic!("not IPv4"),
        }
        assert_eq!(r.counter("rst_no_backend"), 1);

        let mut s = syn(lb_mac, 40031);
        s.tcp.dport = 82;
        let (act, out) = r.run(&s.build());
        assert_eq!(act, XDP_REDIRECT, "backend behind the other NIC: redirect");
        assert_forwarded(
            &s,
            &out,
            (B2.into(), 9090, B2_MAC),
            (LB_PRIV2.into(), lb1_mac),
        );
    });
}

#[test]
fn evicted_flow_is_rehashed_not_dropped() {
    let rig = Rig::new("pk6");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        // No SYN was ever seen: an established connection whose entry is gone.
        let mut d = Frame::v4((CLIENT, 40040), (VIP, 80), ACK | PSH);
        d.dst_mac = lb_mac;
        d.src_mac = CLIENT_MAC;
        d.tcp.payload = b"hello".to_vec();
        let (act, out) = r.run(&d.build());
        assert_eq!(act, XDP_TX, "orphan packet routed by the ring");
        let p1 = assert_forwarded(
            &d,
            &out,
            (B1.into(), 8080, B1_MAC),
            (LB_PRIV.into(), lb_mac),
        );
        assert_eq!(r.counter("flow_miss"), 1);
        // The SNAT port comes from the 5-tuple hash: the SYN of the same tuple would have had
        // the same one, so a re-created entry keeps the backend's view of the connection.
        let (act, out) = r.run(&d.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(
            assert_forwarded(
                &d,
                &out,
                (B1.into(), 8080, B1_MAC),
                (LB_PRIV.into(), lb_mac)
            ),
            p1
        );
        assert_ne!(act, XDP_ABORTED);
        assert_ne!(act, XDP_DROP);
    });
}

/// Round robin spreads new flows evenly; weights are honoured.
#[test]
fn round_robin_spread_and_weights() {
    let rig = Rig::new("pk7");
    let lb_mac = rig.lb0_mac;
    let mut two = service_v4(vec![
        backend("b1", B1.into(), 8080, LB_PRIV.into()),
        backend("b1b", B1.into(), 8081, LB_PRIV.into()),
    ]);
    two.backends[1].weight = 300;
    rig.with(vec![two], move |r| {
        let mut per_port = std::collections::HashMap::<u16, u32>::new();
        for i in 0..400u16 {
            let s = syn(lb_mac, 41000 + i);
            let (act, out) = r.run(&s.build());
            assert_eq!(act, XDP_TX);
            let got = packet::parse(&out).expect("parse");
            *per_port.entry(got.tcp.dport).or_default() += 1;
        }
        assert_eq!(
            per_port.get(&8080),
            Some(&100),
            "weight 100 of 400: {per_port:?}"
        );
        assert_eq!(
            per_port.get(&8081),
            Some(&300),
            "weight 300 of 400: {per_port:?}"
        );
    });
    let _ = Arc::new(());
}

/// Keeps the calling thread on the CPU it runs on: the program's copies of flow entries are
/// per CPU, and these tests must meet the copy their earlier packets made.
fn stay_on_this_cpu() {
    // SAFETY: plain libc calls on a zeroed, then filled, `cpu_set_t` owned here.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

/// A plain data packet from `client` to the IPv4 service.
fn data_from(lb_mac: [u8; 6], client: (Ipv4Addr, u16)) -> Frame {
    let mut d = Frame::v4(client, (VIP, 80), ACK | PSH);
    d.dst_mac = lb_mac;
    d.src_mac = CLIENT_MAC;
    d.tcp.payload = b"hello".to_vec();
    d
}

/// (backend port, SNAT port) a forwarded frame went out with.
fn ports(out: &[u8]) -> (u16, u16) {
    let got = packet::parse(out).expect("forwarded frame");
    (got.tcp.dport, got.tcp.sport)
}

/// The program forwards an established connection's plain packets from a per-CPU copy of its
/// entry. The copy serves while fresh even when the entry is gone (as an evicted one), stops
/// serving after a second, and stops at once when the connection's entry gets a new value:
/// here the client reuses its port and round robin gives the new connection the other
/// backend, whose packets must not follow the old copy.
#[test]
fn a_flows_copy_serves_only_until_its_entry_changes() {
    let rig = Rig::new("pkf");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    let two = service_v4(vec![
        backend("b1", B1.into(), 8080, LB_PRIV.into()),
        backend("b1b", B1.into(), 8081, LB_PRIV.into()),
    ]);
    rig.with(vec![two], move |r| {
        stay_on_this_cpu();
        let client = (CLIENT, 40100);
        let forget = || {
            let mut flows = flow_table::<FlowValue>(&pin, maps::FLOWS);
            let keys: Vec<FlowKey> = flows.keys().filter_map(Result::ok).collect();
            assert_eq!(keys.len(), 1, "one client entry");
            flows.remove(&keys[0]).expect("remove the entry");
        };
        let (act, out) = r.run(&syn(lb_mac, client.1).build());
        assert_eq!(act, XDP_TX);
        let first = ports(&out);
        let data = data_from(lb_mac, client).build();
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, first), "the entry serves");

        // The entry goes behind the program's back; the copy still serves, so the packet is
        // not taken for an evicted flow.
        forget();
        let misses = r.counter("flow_miss");
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, first), "the copy serves");
        assert_eq!(r.counter("flow_miss"), misses, "no entry was looked for");

        // Past its second, the copy is done: the packet is an evicted flow's, rehashed.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let (act, _) = r.run(&data);
        assert_eq!(act, XDP_TX);
        assert_eq!(r.counter("flow_miss"), misses + 1, "the copy expired");

        // Copied again, then a new connection from the same port: round robin's turn is the
        // other backend, and its packets go there.
        let (act, out) = r.run(&data);
        assert_eq!(act, XDP_TX);
        let copied = ports(&out);
        forget();
        let (act, out) = r.run(&syn(lb_mac, client.1).build());
        assert_eq!(act, XDP_TX);
        let second = ports(&out);
        assert_ne!(second.0, copied.0, "round robin's next backend");
        let (act, out) = r.run(&data);
        assert_eq!(
            (act, ports(&out)),
            (XDP_TX, second),
            "the new connection's packets follow its entry, not the old copy"
        );
    });
}

/// A connection whose SNAT port is taken over loses its copy with its entry: a late packet of
/// it must not reach the backend on the addresses that now belong to the new connection.
#[test]
fn a_taken_over_connections_copy_stops_serving() {
    let rig = Rig::new("pkg");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        let c = (Ipv4Addr::new(198, 18, 6, 2), 40000);
        let mut used = vec![c];
        let (act, pc) = open_from(r, lb_mac, c);
        assert_eq!(act, XDP_TX);
        let pc = pc.expect("C's port");
        // The backend resets C; D, trying C's port first, finds its other seven taken.
        let back = from_backend(lb_mac, 8080, pc, RST | ACK);
        assert_eq!(r.run(&back.build()).0, XDP_TX, "backend RST");
        let d = client_trying_first(pc, &used);
        used.push(d);
        for &q in &snat_tries(d)[1..] {
            let z = client_trying_first(q, &used);
            used.push(z);
            assert_eq!(open_from(r, lb_mac, z), (XDP_TX, Some(q)));
        }
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::SNAT_TAKEOVER_SECS * 1000 + 1100,
        ));
        // C still sends (its copy is made), then resets too: its port may now be taken.
        let data = data_from(lb_mac, c).build();
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, (8080, pc)));
        let mut rst = data_from(lb_mac, c);
        rst.tcp.flags = RST | ACK;
        rst.tcp.payload.clear();
        assert_eq!(r.run(&rst.build()).0, XDP_TX, "client RST");
        assert_eq!(
            open_from(r, lb_mac, d),
            (XDP_TX, Some(pc)),
            "D takes C's port"
        );
        let (act, out) = r.run(&data);
        assert_eq!(act, XDP_TX);
        assert_ne!(ports(&out).1, pc, "C's late packet does not use D's port");
    });
}

/// Replies are forwarded from per-CPU copies of their reply entries too. A copy serves while
/// fresh even when the entry is gone (as an evicted one), and stops at once when another
/// connection gets the entry's SNAT port: the backend's packets on that port then belong to
/// the new client, never to the old one.
#[test]
fn a_reply_entrys_copy_serves_only_until_the_port_goes_to_another_connection() {
    let rig = Rig::new("pkh");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        let a = (Ipv4Addr::new(198, 18, 6, 3), 40000);
        let (act, pa) = open_from(r, lb_mac, a);
        assert_eq!(act, XDP_TX);
        let pa = pa.expect("A's port");
        let to_client = |r: &mut Runner, flags: u8| -> (u32, Option<(Ipv4Addr, u16)>) {
            let mut f = from_backend(lb_mac, 8080, pa, flags);
            f.tcp.payload = if flags & PSH != 0 {
                b"hi".to_vec()
            } else {
                Vec::new()
            };
            let (act, out) = r.run(&f.build());
            let to = (act == XDP_TX).then(|| {
                let got = packet::parse(&out).expect("reply");
                match got.ip {
                    Ip::V4 { dst, .. } => (dst, got.tcp.dport),
                    _ => panic!("IPv4 expected"),
                }
            });
            (act, to)
        };
        assert_eq!(to_client(r, SYN | ACK), (XDP_TX, Some(a)), "SYN-ACK to A");
        assert_eq!(to_client(r, ACK | PSH), (XDP_TX, Some(a)), "data to A");

        // The reply entry goes behind the program's back (as if evicted); the copy serves.
        let mut rev = flow_table::<RevValue>(&pin, maps::REV_FLOWS);
        let keys: Vec<FlowKey> = rev.keys().filter_map(Result::ok).collect();
        assert_eq!(keys.len(), 1, "one reply entry");
        rev.remove(&keys[0]).expect("remove the reply entry");
        assert_eq!(
            to_client(r, ACK | PSH),
            (XDP_TX, Some(a)),
            "the copy serves A's connection"
        );

        // B, trying A's port first, gets it: the backend's packets on it are B's now.
        let b = client_trying_first(pa, &[a]);
        assert_eq!(
            open_from(r, lb_mac, b),
            (XDP_TX, Some(pa)),
            "B gets A's port"
        );
        assert_eq!(
            to_client(r, ACK | PSH),
            (XDP_TX, Some(b)),
            "the backend's packet on the port goes to B, not to A's copy"
        );
    });
}

/// The client key of a connection from `client` to the IPv4 service.
fn client_key(client: (Ipv4Addr, u16)) -> FlowKey {
    FlowKey {
        src: [u32::from_ne_bytes(client.0.octets()), 0, 0, 0],
        dst: [u32::from_ne_bytes(VIP.octets()), 0, 0, 0],
        sport: client.1.to_be(),
        dport: 80u16.to_be(),
        family: FAMILY_V4,
        proto: 6,
        _pad: [0; 2],
    }
}

/// Two busy connections whose copies would share a slot do not take it from each other on
/// every packet: the first one's copy keeps the slot while fresh, the second is served from
/// the table.
#[test]
fn a_fresh_copy_keeps_its_slot_from_another_flow() {
    let rig = Rig::new("pki");
    let lb_mac = rig.lb0_mac;
    let pin = std::path::PathBuf::from(&rig.pin);
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        use nb_common::hash::{copy, copy_slot};
        let a = (CLIENT, 40200);
        let slot = copy_slot(copy(&client_key(a)));
        let b = (40201..=65535u16)
            .map(|p| (CLIENT, p))
            .find(|c| copy_slot(copy(&client_key(*c))) == slot)
            .expect("a port whose copy shares A's slot");
        for c in [a, b] {
            assert_eq!(r.run(&syn(lb_mac, c.1).build()).0, XDP_TX, "SYN");
            assert_eq!(r.run(&data_from(lb_mac, c).build()).0, XDP_TX, "data");
        }
        let mut flows = flow_table::<FlowValue>(&pin, maps::FLOWS);
        for c in [a, b] {
            flows.remove(&client_key(c)).expect("remove a client entry");
        }
        let misses = r.counter("flow_miss");
        assert_eq!(r.run(&data_from(lb_mac, a).build()).0, XDP_TX);
        assert_eq!(r.counter("flow_miss"), misses, "A's copy kept the slot");
        assert_eq!(r.run(&data_from(lb_mac, b).build()).0, XDP_TX);
        assert_eq!(
            r.counter("flow_miss"),
            misses + 1,
            "B had no copy: its packet looked for its (gone) entry"
        );
    });
}
