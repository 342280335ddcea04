//! The packet-table rig: a balancer namespace whose interfaces, routes and (permanent)
//! neighbours make the kernel's FIB lookup answer exactly as on a real balancer, nb's data path
//! loaded in it, and the program run on frames with BPF_PROG_TEST_RUN.
//!
//! `lb0` faces the client and backend B1 (one NIC for both, as a one-NIC balancer); `lb1`
//! faces backend B2 (a NIC of its own). Frames are built from fields with full checksums
//! (`packet`), so every incremental update the program makes is checked byte for byte.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    TestRun, TestRunOptions,
    maps::{HashMap as BpfHashMap, Map, MapData},
};
use nb_agent::dataplane::{BackendSpec, Dataplane, FlowTimeouts, ServiceSpec};
use nb_common::{ALG_ROUNDROBIN, FAMILY_V4, FAMILY_V6, FlowKey, SNAT_PORT_MAX, SNAT_PORT_MIN};

use crate::{
    netns::{Netns, veth},
    packet::{self, ACK, Frame, Ip, PSH, RST, SYN},
    require_root,
};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const B1_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
pub const B2_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x21];
pub const B6_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x61];
/// A router on the client side of lb0 (where the Internet comes from).
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const LB_PRIV: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const B1: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
/// On the second NIC: reached by redirect.
pub const LB_PRIV2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
pub const B2: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 11);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const LB_PRIV6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const B6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x11);

/// The client's initial sequence number in the frames built here, and a backend's.
pub const CLIENT_ISN: u32 = 1000;
pub const BACKEND_ISN: u32 = 5000;

/// The balancer namespace with two NICs (`lb0`, `lb1`), and the data path loaded in it.
pub struct Rig {
    pub ns: Netns,
    _peer: Netns,
    pub lb0: u32,
    pub lb1: u32,
    pub lb0_mac: [u8; 6],
    pub lb1_mac: [u8; 6],
    pub pin: String,
}

impl Rig {
    pub fn new(tag: &str) -> Rig {
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
        let ifindex = |i: &str| -> u32 {
            ns.sh(&format!("cat /sys/class/net/{i}/ifindex"))
                .trim()
                .parse()
                .expect("ifindex")
        };
        let mac = |i: &str| -> [u8; 6] {
            let s = ns.sh(&format!("cat /sys/class/net/{i}/address"));
            let mut m = [0u8; 6];
            for (k, b) in s.trim().split(':').enumerate() {
                m[k] = u8::from_str_radix(b, 16).expect("mac");
            }
            m
        };
        let (lb0, lb1) = (ifindex("lb0"), ifindex("lb1"));
        let (lb0_mac, lb1_mac) = (mac("lb0"), mac("lb1"));
        let pin = format!("/sys/fs/bpf/{}", ns.name());
        Rig {
            ns,
            _peer: peer,
            lb0,
            lb1,
            lb0_mac,
            lb1_mac,
            pin,
        }
    }

    /// Runs `f` in the namespace with a freshly loaded data path programmed with `services`.
    pub fn with<R: Send + 'static>(
        &self,
        services: Vec<ServiceSpec>,
        f: impl FnOnce(&mut Runner) -> R + Send + 'static,
    ) -> R {
        let pin = self.pin.clone();
        let (lb0, lb1, lb0_mac, lb1_mac) = (self.lb0, self.lb1, self.lb0_mac, self.lb1_mac);
        self.ns.enter(move || {
            let _ = std::fs::remove_dir_all(&pin);
            // Removes the pins when the test ends, a failing one too.
            let _unpin = Unpin(pin.clone());
            let mut dp = Dataplane::load(std::path::Path::new(&pin), 65536).expect("load XDP");
            dp.apply(&services).expect("apply services");
            let mut r = Runner {
                dp,
                lb0,
                lb1,
                lb0_mac,
                lb1_mac,
                pin: pin.into(),
            };
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

/// Flow table `name` (a `maps::*` connection table) of the data path pinned at `pin`.
pub fn flow_table<V: aya::Pod>(
    pin: &std::path::Path,
    name: &str,
) -> BpfHashMap<MapData, FlowKey, V> {
    let map = MapData::from_pin(pin.join(name)).expect("pinned flow table");
    BpfHashMap::try_from(Map::LruHashMap(map)).expect("flow table")
}

/// Timeouts under which every flow has expired.
pub const EXPIRE_ALL: FlowTimeouts = FlowTimeouts {
    established_secs: 0,
    closing_secs: 0,
    half_closed_secs: 0,
    closed_port_secs: 0,
    unanswered_secs: 0,
    reset_secs: 0,
    half_open_secs: 0,
};

/// The loaded data path and what running frames through it needs.
pub struct Runner {
    pub dp: Dataplane,
    pub lb0: u32,
    pub lb1: u32,
    pub lb0_mac: [u8; 6],
    pub lb1_mac: [u8; 6],
    pub pin: std::path::PathBuf,
}

impl Runner {
    /// One BPF_PROG_TEST_RUN on `frame` arriving on lb0: (action, output frame).
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(self.lb0, frame)
    }

    /// One BPF_PROG_TEST_RUN on `frame` arriving on interface `ifindex`.
    pub fn run_on(&mut self, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes()); // data_end
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes()); // ingress_ifindex
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

    /// A packet counter by its `nb_xdp_packets_total` label.
    pub fn counter(&self, name: &str) -> u64 {
        self.dp
            .packet_counters()
            .expect("counters")
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Entries of connection table `name`.
    pub fn entries(&self, name: &str) -> usize {
        flow_table::<[u8; 88]>(&self.pin, name).keys().count()
    }
}

pub fn backend(key: &str, addr: IpAddr, port: u16, snat: IpAddr) -> BackendSpec {
    BackendSpec {
        key: key.into(),
        addr,
        port,
        snat,
        weight: 100,
        eligible: true,
    }
}

pub fn service_v4(backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec {
        key: nb_agent::model::PortKey::tcp(80, &[]),
        port: 80,
        family: FAMILY_V4,
        vips: vec![VIP.into()],
        algorithm: ALG_ROUNDROBIN,
        backends,
    }
}

/// Port 80 on both public addresses, B1:8080 behind the IPv4 one and B6:8080 behind the
/// IPv6 one.
pub fn one_backend() -> Vec<ServiceSpec> {
    vec![
        service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]),
        ServiceSpec {
            key: nb_agent::model::PortKey::tcp(80, &[]),
            port: 80,
            family: FAMILY_V6,
            vips: vec![VIP6.into()],
            algorithm: ALG_ROUNDROBIN,
            backends: vec![backend("b6", B6.into(), 8080, LB_PRIV6.into())],
        },
    ]
}

/// A SYN from the client's `sport` to the IPv4 service.
pub fn syn(lb_mac: [u8; 6], sport: u16) -> Frame {
    syn_from(lb_mac, (CLIENT, sport))
}

/// A SYN from `client`'s address and port to the IPv4 service.
pub fn syn_from(lb_mac: [u8; 6], client: (Ipv4Addr, u16)) -> Frame {
    let mut f = Frame::v4(client, (VIP, 80), SYN);
    f.dst_mac = lb_mac;
    f.src_mac = CLIENT_MAC;
    f.tcp.seq = CLIENT_ISN;
    f.tcp.options = vec![2, 4, 5, 0xb4, 1, 1, 4, 2]; // MSS 1460, NOP, NOP, SACK permitted
    f
}

/// A packet from `client` to the IPv4 service in the middle of its connection (sequence
/// numbers just past the handshake of [`handshake`]).
pub fn from_client(lb_mac: [u8; 6], client: (Ipv4Addr, u16), flags: u8) -> Frame {
    let mut f = Frame::v4(client, (VIP, 80), flags);
    f.dst_mac = lb_mac;
    f.src_mac = CLIENT_MAC;
    f.tcp.seq = CLIENT_ISN + 1;
    f.tcp.ack = BACKEND_ISN + 1;
    f
}

/// A plain data packet from `client` to the IPv4 service.
pub fn data_from(lb_mac: [u8; 6], client: (Ipv4Addr, u16)) -> Frame {
    let mut d = from_client(lb_mac, client, ACK | PSH);
    d.tcp.payload = b"hello".to_vec();
    d
}

/// A packet from backend B1's port `bport` to the balancer's SNAT port `snat`.
pub fn from_backend(lb_mac: [u8; 6], bport: u16, snat: u16, flags: u8) -> Frame {
    let mut f = Frame::v4((B1, bport), (LB_PRIV, snat), flags);
    f.dst_mac = lb_mac;
    f.src_mac = B1_MAC;
    f.tcp.seq = BACKEND_ISN + 1;
    f.tcp.ack = CLIENT_ISN + 1;
    f
}

/// B1's SYN-ACK for the SYN `syn_out` (as the program forwarded it).
pub fn syn_ack_to(lb_mac: [u8; 6], syn_out: &[u8]) -> Frame {
    let got = packet::parse(syn_out).expect("forwarded SYN");
    let (src, dst) = match got.ip {
        Ip::V4 { src, dst, .. } => (src, dst),
        _ => panic!("IPv4 expected"),
    };
    let mut f = Frame::v4((dst, got.tcp.dport), (src, got.tcp.sport), SYN | ACK);
    f.dst_mac = lb_mac;
    f.src_mac = B1_MAC;
    f.tcp.seq = BACKEND_ISN;
    f.tcp.ack = got.tcp.seq.wrapping_add(1);
    f
}

/// The SNAT ports a SYN from `client` to the IPv4 service tries, in order (host order), as
/// the program computes them.
pub fn snat_tries(client: (Ipv4Addr, u16)) -> Vec<u16> {
    let word = |a: Ipv4Addr| [u32::from_ne_bytes(a.octets()), 0, 0, 0];
    nb_common::hash::snat_tries(&word(client.0), &word(VIP), client.1.to_be(), 80u16.to_be())
        .to_vec()
}

/// A client address and port, none of `taken`, whose first SNAT port try is `port`.
pub fn client_trying_first(port: u16, taken: &[(Ipv4Addr, u16)]) -> (Ipv4Addr, u16) {
    (1..=250u8)
        .flat_map(|host| (1024..=65535u16).map(move |p| (Ipv4Addr::new(198, 18, 7, host), p)))
        .find(|c| !taken.contains(c) && snat_tries(*c)[0] == port)
        .expect("some client tries that port first")
}

/// A SYN from `client` to the IPv4 service: (action, SNAT port it went out with, if any).
pub fn open_from(r: &mut Runner, client: (Ipv4Addr, u16)) -> (u32, Option<u16>) {
    let f = syn_from(r.lb0_mac, client);
    let (act, out) = r.run(&f.build());
    let port = (act == XDP_TX).then(|| packet::parse(&out).expect("forwarded SYN").tcp.sport);
    (act, port)
}

/// A whole handshake from `client` to the IPv4 service with backend B1 on lb0: the client's
/// SYN, B1's SYN-ACK, the client's ACK. Returns (backend port, SNAT port).
pub fn handshake(r: &mut Runner, client: (Ipv4Addr, u16)) -> (u16, u16) {
    let lb_mac = r.lb0_mac;
    let (act, out) = r.run(&syn_from(lb_mac, client).build());
    assert_eq!(act, XDP_TX, "{client:?}: SYN forwarded");
    let back = syn_ack_to(lb_mac, &out);
    let (bport, snat) = (back.tcp.sport, back.tcp.dport);
    let (act, _) = r.run(&back.build());
    assert_eq!(act, XDP_TX, "{client:?}: SYN-ACK translated");
    let established = r.counter("established");
    let (act, _) = r.run(&from_client(lb_mac, client, ACK).build());
    assert_eq!(act, XDP_TX, "{client:?}: ACK forwarded");
    assert_eq!(
        r.counter("established"),
        established + 1,
        "{client:?}: the handshake completed"
    );
    (bport, snat)
}

/// Sends `f` twice (from the flow table, then from this CPU's copy of its entry) and checks
/// both times that it is forwarded to `to` from `from` on SNAT port `snat`.
pub fn forwarded_twice(
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
pub fn assert_forwarded(
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
    let mut want = translated(input, from, to);
    want.tcp.sport = sport;
    want.vlan = got.vlan;
    assert_eq!(
        out,
        &want.build()[..],
        "forwarded frame differs from the expected one"
    );
    sport
}

/// `input` with its addresses, destination port and MACs as the program sends it on: to
/// (addr, port, mac), from (addr, mac); the source port is left for the caller.
pub fn translated(input: &Frame, from: (IpAddr, [u8; 6]), to: (IpAddr, u16, [u8; 6])) -> Frame {
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
    want.tcp.dport = to.1;
    want
}

/// (destination address, destination port) of a frame the program sent.
pub fn dest(out: &[u8]) -> (IpAddr, u16) {
    let got = packet::parse(out).expect("a TCP frame");
    let dst = match got.ip {
        Ip::V4 { dst, .. } => IpAddr::V4(dst),
        Ip::V6 { dst, .. } => IpAddr::V6(dst),
    };
    (dst, got.tcp.dport)
}

/// (backend port, SNAT port) a forwarded frame went out with.
pub fn ports(out: &[u8]) -> (u16, u16) {
    let got = packet::parse(out).expect("forwarded frame");
    (got.tcp.dport, got.tcp.sport)
}

/// Keeps the calling thread on the CPU it runs on: the program's copies of flow entries are
/// per CPU, and tests that meet the copy their earlier packets made need this.
pub fn stay_on_this_cpu() {
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

/// The client key of a connection from `client` to the IPv4 service.
pub fn client_key(client: (Ipv4Addr, u16)) -> FlowKey {
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

/// The reply key of the connection on SNAT port `snat` towards B1:8080.
pub fn reply_key(snat: u16) -> FlowKey {
    FlowKey {
        src: [u32::from_ne_bytes(B1.octets()), 0, 0, 0],
        dst: [u32::from_ne_bytes(LB_PRIV.octets()), 0, 0, 0],
        sport: 8080u16.to_be(),
        dport: snat.to_be(),
        family: FAMILY_V4,
        proto: 6,
        _pad: [0; 2],
    }
}

/// An IPv6 address as the four network-order words of a `FlowKey`.
pub fn v6_words(a: Ipv6Addr) -> [u32; 4] {
    let o = a.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// Both sides of the connection from `client` to backend port `bport` on SNAT port `snat`
/// reset it.
pub fn reset_both_ways(r: &mut Runner, client: (Ipv4Addr, u16), bport: u16, snat: u16) {
    let lb_mac = r.lb0_mac;
    let rst = from_client(lb_mac, client, RST | ACK);
    assert_eq!(r.run(&rst.build()).0, XDP_TX, "client RST");
    let back = from_backend(lb_mac, bport, snat, RST | ACK);
    assert_eq!(r.run(&back.build()).0, XDP_TX, "backend RST");
}

/// Reads a frame's TCP flags.
pub fn flags_of(out: &[u8]) -> u8 {
    packet::parse(out).expect("a TCP frame").tcp.flags
}

/// TCP options as Linux sends them: a SYN's (MSS, SACK permitted, timestamps, window scale:
/// the timestamp third, at no aligned offset), and every later segment's (two NOPs, then the
/// timestamps).
pub fn syn_options(tsval: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(0u32.to_be_bytes());
    o.extend([1, 3, 3, 7]);
    o
}

pub fn ts_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend(tsval.to_be_bytes());
    o.extend(tsecr.to_be_bytes());
    o
}

/// A data packet's payload flag, for tests that pick flags.
pub const DATA: u8 = ACK | PSH;
