//! Packet tables through BPF_PROG_TEST_RUN: connections opened by a handshake, forwarded both
//! ways, closed; SNAT ports held and taken over; the sweep; the per-CPU copies of entries.
//! Each case gives the input frame, the expected XDP action and the expected output frame
//! (built from scratch with full checksums, so every incremental update is checked).
//! Rude and hostile packets are in `xdp_hostile.rs`.

use std::net::Ipv4Addr;

use nb_agent::dataplane::{FlowTimeouts, ServiceSpec, coarse_now_ns};
use nb_common::{
    ALG_ROUNDROBIN, FAMILY_V6, FlowKey, FlowValue, REV_TW_NONE, REV_TW_SEQ, REV_TW_TS, RevValue,
    maps,
};
use nb_tests::{
    packet::{self, ACK, FIN, Frame, Ip, PSH, RST, SYN},
    rig::*,
};

/// A connection exists once its handshake completes: the SYN makes only half-open entries
/// (a client packet before the backend's SYN-ACK is dropped), the SYN-ACK goes back to the
/// client, the client's ACK of it moves the connection into the connection tables, and its
/// packets go to the same backend from the same SNAT port both ways until it closes.
#[test]
fn a_handshake_opens_a_connection_and_its_packets_flow_both_ways() {
    let rig = Rig::new("pk1");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        let s = syn(lb_mac, 40000);
        let (act, out) = r.run(&s.build());
        assert_eq!(
            act, XDP_TX,
            "SYN to the service goes back out of lb0 towards the backend"
        );
        let to = (B1.into(), 8080, B1_MAC);
        let from = (LB_PRIV.into(), lb_mac);
        let snat = assert_forwarded(&s, &out, to, from);
        assert_eq!(r.counter("new_flow"), 1);
        assert_eq!(
            (
                r.entries(maps::FLOWS),
                r.entries(maps::HALF_FLOWS),
                r.entries(maps::HALF_REV)
            ),
            (0, 1, 1),
            "a SYN makes half-open entries only"
        );
        let early = data_from(lb_mac, (CLIENT, 40000));
        assert_eq!(
            r.run(&early.build()).0,
            XDP_DROP,
            "data before the backend answered cannot belong to the handshake"
        );
        assert_eq!(r.counter("drop_bad_handshake"), 1);

        // The backend's SYN-ACK goes back to the client, from the public address and port.
        let back = syn_ack_to(lb_mac, &out);
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

        // The client's ACK of it completes the handshake.
        let ack = from_client(lb_mac, (CLIENT, 40000), ACK);
        let (act, out) = r.run(&ack.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(assert_forwarded(&ack, &out, to, from), snat);
        assert_eq!(r.counter("established"), 1);
        assert_eq!(
            (
                r.entries(maps::FLOWS),
                r.entries(maps::REV_FLOWS),
                r.entries(maps::HALF_FLOWS),
                r.entries(maps::HALF_REV)
            ),
            (1, 1, 0, 0),
            "the connection moved into the connection tables"
        );

        // Established: same backend, same SNAT port, payload untouched.
        let mut d = data_from(lb_mac, (CLIENT, 40000));
        d.tcp.payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let (act, out) = r.run(&d.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(assert_forwarded(&d, &out, to, from), snat);
        let mut answer = from_backend(lb_mac, 8080, snat, ACK | PSH);
        answer.tcp.payload = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        let (act, out) = r.run(&answer.build());
        assert_eq!(act, XDP_TX);
        packet::verify_checksums(&out).expect("answer checksums");
        assert_eq!(dest(&out), (CLIENT.into(), 40000));

        // FIN keeps going to the same backend.
        let mut fin = d.clone();
        fin.tcp.flags = FIN | ACK;
        fin.tcp.payload.clear();
        let (act, out) = r.run(&fin.build());
        assert_eq!(act, XDP_TX);
        assert_eq!(assert_forwarded(&fin, &out, to, from), snat);
    });
}

/// The program keeps its own clock, `CLOCK_MONOTONIC_COARSE` read once per tick: flows are
/// stamped with it whether or not an agent runs (none runs here), it moves, and the sweep
/// ages flows by it.
#[test]
fn the_program_stamps_flows_with_its_own_clock() {
    let rig = Rig::new("pk8");
    rig.with(one_backend(), move |r| {
        let stamp = |r: &Runner, port: u16| {
            flow_table::<FlowValue>(&r.pin, maps::HALF_FLOWS)
                .iter()
                .filter_map(Result::ok)
                .find(|(k, _)| u16::from_be(k.sport) == port)
                .map(|(_, v)| v.last_seen)
                .expect("the SYN's entry")
        };
        let before = coarse_now_ns();
        let (act, _) = open_from(r, (CLIENT, 40100));
        let after = coarse_now_ns();
        assert_eq!(act, XDP_TX);
        let s1 = stamp(r, 40100);
        // The coarse clock moves once per tick (at most 10 ms); the program's reading may be
        // the tick before.
        assert!(
            s1 + 10_000_000 >= before && s1 <= after,
            "stamped with the kernel's coarse clock: {s1}, between {before} and {after}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
        let (act, _) = open_from(r, (CLIENT, 40101));
        assert_eq!(act, XDP_TX);
        let s2 = stamp(r, 40101);
        assert!(
            s2 >= s1 + 280_000_000,
            "the clock moves with no agent writing it: {s1} then {s2} 300 ms later"
        );
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!(
            (report.half_open, report.expired_half_open),
            (2, 0),
            "fresh half-open connections are not idle"
        );
    });
}

/// 8000 connections to one backend (35% of its SNAT ports) all get a port: each flow tries
/// its ports with a stride of its own (with one stride for all, flow 4277 found its 8 tries
/// taken). The sweep reads the flow tables in batches (4096 per batch, so two here) and
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
    rig.with(one_backend(), move |r| {
        r.dp.set_batch_calls(batch);
        for port in 20000..20000 + n {
            handshake(r, (CLIENT, port));
        }
        assert_eq!(r.counter("drop_no_port"), 0, "every connection got a port");
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
        assert_eq!(r.entries(maps::FLOWS), 0, "the flow table is empty");
        assert_eq!(r.entries(maps::REV_FLOWS), 0, "the reply table is empty");
    });
}

/// A sweep reads the tables whole and then deletes what expired; with full tables that takes
/// long. A client reusing its port in between opens a new connection on the expired entries:
/// the sweep must leave them alone (deleted, the connection's next packet would find no entry
/// and be refused by the kernel).
#[test]
fn the_sweep_spares_entries_a_new_connection_took_while_it_ran() {
    let rig = Rig::new("pkb");
    rig.with(one_backend(), move |r| {
        // Two connections, each reset by both sides: both are over.
        for port in [41000, 41001] {
            let (bport, snat) = handshake(r, (CLIENT, port));
            reset_both_ways(r, (CLIENT, port), bport, snat);
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let plan = r.dp.sweep_plan(EXPIRE_ALL).expect("sweep plan");
        assert_eq!(plan.expiring(), 2, "both connections are over");
        // While the sweep runs, the first client opens a new connection from the same port.
        handshake(r, (CLIENT, 41000));
        let report = r.dp.sweep_apply(plan).expect("sweep apply");
        assert_eq!(report.expired, 1, "only the untouched connection expired");

        let flows = flow_table::<FlowValue>(&r.pin, maps::FLOWS);
        let ports: Vec<u16> = flows
            .keys()
            .filter_map(Result::ok)
            .map(|k| u16::from_be(k.sport))
            .collect();
        assert_eq!(ports, vec![41000], "the new connection keeps its entry");
        let rev = flow_table::<RevValue>(&r.pin, maps::REV_FLOWS);
        let clients: Vec<u16> = rev
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| u16::from_be(v.client_port))
            .collect();
        assert_eq!(clients, vec![41000], "and its reply entry");
        // Its next packet is forwarded on that entry.
        let (act, _) = r.run(&data_from(r.lb0_mac, (CLIENT, 41000)).build());
        assert_eq!(act, XDP_TX, "found its entry");
    });
}

/// A connection from `client` that got its first SNAT port try, then reset both ways: the
/// port it held.
fn open_and_reset(r: &mut Runner, client: (Ipv4Addr, u16)) -> u16 {
    let (bport, port) = handshake(r, client);
    assert_eq!(
        port,
        snat_tries(client)[0],
        "{client:?} gets its first port"
    );
    reset_both_ways(r, client, bport, port);
    port
}

/// A reset connection keeps its SNAT port for `RESET_HOLD_SECS` (late packets of it must not
/// reach another connection): a new connection trying that port takes another. Only a
/// connection that finds none of its ports free takes over a finished connection's port, and
/// only once that one has been silent `SNAT_TAKEOVER_SECS`; the old client entry goes.
#[test]
fn a_finished_connections_snat_port_is_held_and_taken_over_only_when_none_is_free() {
    let rig = Rig::new("pkc");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let client_entry = |r: &Runner, c: (Ipv4Addr, u16)| {
            flow_table::<FlowValue>(&r.pin, maps::FLOWS)
                .keys()
                .filter_map(Result::ok)
                .any(|k| k == client_key(c))
        };
        let mut used = Vec::new();

        // Held: connection A is reset; B, trying A's port first, takes its second.
        let a = (Ipv4Addr::new(198, 18, 6, 1), 40000);
        used.push(a);
        let pa = open_and_reset(r, a);
        let b = client_trying_first(pa, &used);
        used.push(b);
        let (act, pb) = open_from(r, b);
        assert_eq!(act, XDP_TX);
        assert_eq!(pb, Some(snat_tries(b)[1]), "B passes over A's held port");

        // Taken over: connection C is reset; D tries C's port first and finds its other
        // seven taken by live connections. D is dropped while C is fresh, and gets C's port
        // once C has been silent for SNAT_TAKEOVER_SECS.
        let c = (Ipv4Addr::new(198, 18, 6, 2), 40000);
        used.push(c);
        let pc = open_and_reset(r, c);
        let d = client_trying_first(pc, &used);
        used.push(d);
        for &q in &snat_tries(d)[1..] {
            let z = client_trying_first(q, &used);
            used.push(z);
            assert_eq!(handshake(r, z).1, q, "a live connection on {q}");
        }
        let drops = r.counter("drop_no_port");
        assert_eq!(open_from(r, d).0, XDP_DROP, "C's port is too fresh to take");
        assert_eq!(r.counter("drop_no_port"), drops + 1);
        let no_port: u64 =
            r.dp.backend_counters()
                .expect("counters")
                .values()
                .map(|c| c.stats.no_port)
                .sum();
        assert_eq!(
            no_port, 1,
            "counted against the backend (the agent logs it by name)"
        );
        assert!(client_entry(r, c), "C's client entry stays");
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::SNAT_TAKEOVER_SECS * 1000 + 1100,
        ));
        assert_eq!(open_from(r, d), (XDP_TX, Some(pc)), "D takes over C's port");
        assert_eq!(r.counter("snat_port_reused"), 1);
        assert_eq!(
            r.counter("snat_port_reused_may_refuse"),
            0,
            "C was reset: its backend holds no TIME_WAIT"
        );
        assert!(!client_entry(r, c), "C's client entry went with its port");
        // D's replies reach D, not C.
        let (act, out) = r.run(&from_backend(lb_mac, 8080, pc, SYN | ACK).build());
        assert_eq!(act, XDP_TX);
        assert_eq!(dest(&out), (d.0.into(), d.1), "the reply goes to D");
    });
}

/// The reply entry of SNAT port `snat` towards B1:8080.
fn rev_entry(r: &Runner, snat: u16) -> RevValue {
    flow_table::<RevValue>(&r.pin, maps::REV_FLOWS)
        .get(&reply_key(snat), 0)
        .expect("reply entry")
}

/// A connection from `client` on its first SNAT port, answered, then closed by the backend
/// first as Linux does it (FIN; the client's FIN; the backend's last ACK, from TIME_WAIT),
/// with timestamps if `ts` is given as (client's last TSval, backend's TSval): its port.
fn open_and_close_by_backend(
    r: &mut Runner,
    client: (Ipv4Addr, u16),
    ts: Option<(u32, u32)>,
    last_acked: u32,
) -> u16 {
    let lb_mac = r.lb0_mac;
    let (act, port) = open_from(r, client);
    assert_eq!(
        (act, port),
        (XDP_TX, Some(snat_tries(client)[0])),
        "{client:?} gets its first port"
    );
    let port = port.unwrap();
    let back = |r: &mut Runner, flags: u8, ecr_delta: u32, ack: u32| {
        let mut f = from_backend(lb_mac, 8080, port, flags);
        if flags & SYN != 0 {
            f.tcp.seq = BACKEND_ISN;
        }
        f.tcp.ack = ack;
        if let Some((client_ts, own_ts)) = ts {
            f.tcp.options = ts_options(own_ts, client_ts.wrapping_sub(ecr_delta));
        }
        assert_eq!(r.run(&f.build()).0, XDP_TX, "backend packet {flags:#x}");
    };
    back(r, SYN | ACK, 30, CLIENT_ISN + 1);
    let ack = from_client(lb_mac, client, ACK);
    assert_eq!(r.run(&ack.build()).0, XDP_TX, "client ACK");
    // Answered: plain packets after this may be served from a copy.
    back(r, ACK | PSH, 20, last_acked.wrapping_sub(100));
    back(r, ACK | PSH, 20, last_acked.wrapping_sub(100));
    back(r, FIN | ACK, 10, last_acked.wrapping_sub(1));
    let fin = from_client(lb_mac, client, FIN | ACK);
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
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        let a = (Ipv4Addr::new(198, 18, 6, 1), 40001);
        let pa = open_and_close_by_backend(r, a, Some((0x8000_0123, 77)), 5000);
        let e = rev_entry(r, pa);
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
        let pb = open_and_close_by_backend(r, b, None, 0xffff_fff0);
        let e = rev_entry(r, pb);
        assert_eq!(
            e.flags & (REV_TW_TS | REV_TW_SEQ | REV_TW_NONE),
            REV_TW_SEQ,
            "no timestamps"
        );
        assert_eq!(e.tw_mark, 0xffff_fff0, "the ack of the backend's last ACK");

        let c = (Ipv4Addr::new(198, 18, 6, 1), 40003);
        let pc = open_and_reset(r, c);
        let e = rev_entry(r, pc);
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
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let mut used = Vec::new();
        // For client `d`, whose SYN will try ports q0..q7: q0 closed first, its backend's
        // TIME_WAIT holding FIRST_MARK; q1 closed a second later, holding SECOND_MARK (lower:
        // each connection's numbers start at random); q2..q7 live. With `ts`, the marks are
        // timestamps, else acknowledged sequence numbers.
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
                assert_eq!(open_and_close_by_backend(r, c, ts, acked), tries[i]);
                if i == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1100));
                }
            }
            for &q in &tries[2..] {
                let z = client_trying_first(q, &used);
                used.push(z);
                assert_eq!(handshake(r, z).1, q, "live on {q}");
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

/// A client reconnecting from the same port while its finished connection's reply entry is
/// still held (to another backend: two reply entries name that client) keeps its new
/// connection's entries: the sweep judges each client entry by its own reply entry.
#[test]
fn a_reconnected_client_is_judged_by_its_new_connection() {
    let rig = Rig::new("pkd");
    let two = service_v4(vec![
        backend("b1", B1.into(), 8080, LB_PRIV.into()),
        backend("b1b", B1.into(), 8081, LB_PRIV.into()),
    ]);
    rig.with(vec![two], move |r| {
        let ports: Vec<u16> = (42000..42020).collect();
        let mut first = Vec::new();
        for &p in &ports {
            let (bport, snat) = handshake(r, (CLIENT, p));
            reset_both_ways(r, (CLIENT, p), bport, snat);
            first.push(bport);
        }
        // One connection more in between shifts the round robin by one: every client now
        // reaches the other backend.
        handshake(r, (CLIENT, 43000));
        for (&p, &was) in ports.iter().zip(&first) {
            let (bport, _) = handshake(r, (CLIENT, p));
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
            "no live connection is taken for its finished predecessor"
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
            "backend packet to a SNAT port with no connection",
            reply_unknown.build(),
        ));
        let mut rst = Frame::v4((CLIENT, 40002), (VIP, 80), RST);
        rst.dst_mac = lb_mac;
        cases.push(("RST for a service with no connection", rst.build()));
        let mut qinq = syn(lb_mac, 40003);
        qinq.vlan = Some(5);
        let mut qinq = qinq.build();
        qinq.splice(12..12, [0x81, 0x00, 0x00, 0x06]);
        cases.push(("two VLAN tags (QinQ)", qinq));
        for (what, frame) in cases {
            let (act, out) = r.run(&frame);
            assert_eq!(act, XDP_PASS, "{what}: must pass to the kernel");
            assert_eq!(out, frame, "{what}: must pass untouched");
        }
        assert!(r.counter("pass_fragment") >= 2);
        assert_eq!(
            r.entries(maps::HALF_FLOWS) + r.entries(maps::FLOWS),
            0,
            "nothing made state"
        );
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
        let about = from_backend(lb_mac, 8080, 20000, ACK).build();
        frames
            .push(packet::IcmpFrame::too_big(B1.into(), LB_PRIV.into(), 1400, &about, 48).build());
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
fn ipv6_and_ip_options() {
    let rig = Rig::new("pk4");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        let mut s6 = Frame::v6((CLIENT6, 40020), (VIP6, 80), SYN);
        s6.dst_mac = lb_mac;
        s6.src_mac = CLIENT_MAC;
        s6.tcp.seq = CLIENT_ISN;
        let (act, out) = r.run(&s6.build());
        assert_eq!(act, XDP_TX, "IPv6 SYN");
        let to = (B6.into(), 8080, B6_MAC);
        let from = (LB_PRIV6.into(), lb_mac);
        let snat6 = assert_forwarded(&s6, &out, to, from);
        let b6 = |flags: u8| {
            let mut f = Frame::v6((B6, 8080), (LB_PRIV6, snat6), flags);
            f.dst_mac = lb_mac;
            f.src_mac = B6_MAC;
            f.tcp.seq = BACKEND_ISN + u32::from(flags & SYN == 0);
            f.tcp.ack = CLIENT_ISN + 1;
            f
        };
        let (act, out) = r.run(&b6(SYN | ACK).build());
        assert_eq!(act, XDP_TX, "IPv6 SYN-ACK");
        packet::verify_checksums(&out).expect("IPv6 reply checksums");
        assert_eq!(dest(&out), (CLIENT6.into(), 40020));
        let c6 = |flags: u8| {
            let mut f = Frame::v6((CLIENT6, 40020), (VIP6, 80), flags);
            f.dst_mac = lb_mac;
            f.src_mac = CLIENT_MAC;
            f.tcp.seq = CLIENT_ISN + 1;
            f.tcp.ack = BACKEND_ISN + 1;
            f
        };
        let (act, _) = r.run(&c6(ACK).build());
        assert_eq!(act, XDP_TX, "IPv6 ACK");
        assert_eq!(r.counter("established"), 1, "the IPv6 handshake completed");

        // Plain packets both ways, twice each: from the table, then from this CPU's copy of
        // the entry; both translate alike.
        stay_on_this_cpu();
        let mut d6 = c6(ACK | PSH);
        d6.tcp.payload = b"hello".to_vec();
        forwarded_twice(r, &d6, "IPv6 data", to, from, snat6);
        let mut back = b6(ACK | PSH);
        back.tcp.payload = b"world".to_vec();
        let mut outs = Vec::new();
        for _ in 0..2 {
            let (act, out) = r.run(&back.build());
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
            let mut c = b6(flags);
            c.tcp.options = ts_options(99, ecr);
            assert_eq!(r.run(&c.build()).0, XDP_TX, "IPv6 close {flags:#x}");
        }
        let e = flow_table::<RevValue>(&r.pin, maps::REV_FLOWS)
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

/// A port whose nodes all are DOWN answers a SYN with a RST at once; a backend behind the
/// second NIC is reached by redirect, and its answers, which arrive on that NIC, go back to
/// the client by redirect too.
#[test]
fn no_backend_answers_rst_and_second_nic_redirects() {
    let rig = Rig::new("pk5");
    let lb_mac = rig.lb0_mac;
    let lb1_mac = rig.lb1_mac;
    let mut none = service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]);
    none.backends[0].eligible = false;
    none.port = 81;
    let other = ServiceSpec {
        key: nb_agent::model::PortKey::tcp(82, &[]),
        port: 82,
        family: nb_common::FAMILY_V4,
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
        assert_eq!(
            r.entries(maps::HALF_FLOWS),
            0,
            "a refused SYN makes no state"
        );

        let mut s = syn(lb_mac, 40031);
        s.tcp.dport = 82;
        let (act, out) = r.run(&s.build());
        assert_eq!(act, XDP_REDIRECT, "backend behind the other NIC: redirect");
        let snat = assert_forwarded(
            &s,
            &out,
            (B2.into(), 9090, B2_MAC),
            (LB_PRIV2.into(), lb1_mac),
        );
        let mut back = Frame::v4((B2, 9090), (LB_PRIV2, snat), SYN | ACK);
        back.dst_mac = lb1_mac;
        back.src_mac = B2_MAC;
        let (act, out) = r.run_on(r.lb1, &back.build());
        assert_eq!(act, XDP_REDIRECT, "its SYN-ACK goes back out of lb0");
        assert_eq!(dest(&out), (CLIENT.into(), 40031));
    });
}

/// A packet of no connection (no SYN opened one: an attacker's, or one whose entry is gone)
/// creates nothing and goes to the kernel, which answers it with a RST; it is not forwarded
/// to a backend, which would count its refusal against the node.
#[test]
fn a_packet_of_no_connection_makes_no_state_and_passes() {
    let rig = Rig::new("pk6");
    let lb_mac = rig.lb0_mac;
    rig.with(one_backend(), move |r| {
        for (i, flags) in [ACK, ACK | PSH, FIN | ACK, RST | ACK, ACK]
            .into_iter()
            .enumerate()
        {
            let mut d = from_client(lb_mac, (CLIENT, 40040 + i as u16), flags);
            if flags & PSH != 0 {
                d.tcp.payload = b"hello".to_vec();
            }
            let frame = d.build();
            let (act, out) = r.run(&frame);
            assert_eq!(
                (act, out),
                (XDP_PASS, frame),
                "flags {flags:#x}: passed untouched"
            );
        }
        assert_eq!(r.counter("pass_no_flow"), 5);
        assert_eq!(
            r.entries(maps::FLOWS)
                + r.entries(maps::REV_FLOWS)
                + r.entries(maps::HALF_FLOWS)
                + r.entries(maps::HALF_REV),
            0,
            "nothing was created"
        );
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
            *per_port.entry(ports(&out).0).or_default() += 1;
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
}

/// Removes `client`'s connection entry behind the program's back (as an eviction would).
fn forget(r: &Runner, client: (Ipv4Addr, u16)) {
    flow_table::<FlowValue>(&r.pin, maps::FLOWS)
        .remove(&client_key(client))
        .expect("remove the client entry");
}

/// The program forwards an established connection's plain packets from a per-CPU copy of its
/// entry. The copy serves while fresh even when the entry is gone (as an evicted one), stops
/// serving after a second, and stops at once when the connection's entry gets a new value:
/// here the client reuses its port and round robin gives the new connection the other
/// backend, whose packets must not follow the old copy.
#[test]
fn a_flows_copy_serves_only_until_its_entry_changes() {
    let rig = Rig::new("pkf");
    let two = service_v4(vec![
        backend("b1", B1.into(), 8080, LB_PRIV.into()),
        backend("b1b", B1.into(), 8081, LB_PRIV.into()),
    ]);
    rig.with(vec![two], move |r| {
        stay_on_this_cpu();
        let client = (CLIENT, 40100);
        let first = handshake(r, client);
        let data = data_from(r.lb0_mac, client).build();
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, first), "the entry serves");

        // The entry goes behind the program's back; the copy still serves.
        forget(r, client);
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, first), "the copy serves");

        // Past its second, the copy is done: the packet belongs to no connection now.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let (act, _) = r.run(&data);
        assert_eq!(act, XDP_PASS, "the copy expired");

        // A new connection, copied; its entry goes; then another connection from the same
        // port: round robin's turn is the other backend, and its packets go there.
        let copied = handshake(r, client);
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, copied));
        forget(r, client);
        let second = handshake(r, client);
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
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        let lb_mac = r.lb0_mac;
        let c = (Ipv4Addr::new(198, 18, 6, 2), 40000);
        let mut used = vec![c];
        let (_, pc) = handshake(r, c);
        // The backend resets C; D, trying C's port first, finds its other seven taken.
        let back = from_backend(lb_mac, 8080, pc, RST | ACK);
        assert_eq!(r.run(&back.build()).0, XDP_TX, "backend RST");
        let d = client_trying_first(pc, &used);
        used.push(d);
        for &q in &snat_tries(d)[1..] {
            let z = client_trying_first(q, &used);
            used.push(z);
            assert_eq!(handshake(r, z).1, q);
        }
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::SNAT_TAKEOVER_SECS * 1000 + 1100,
        ));
        // C still sends (its copy is made), then resets too: its port may now be taken.
        let data = data_from(lb_mac, c).build();
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, (8080, pc)));
        let (act, out) = r.run(&data);
        assert_eq!((act, ports(&out)), (XDP_TX, (8080, pc)), "from the copy");
        let rst = from_client(lb_mac, c, RST | ACK);
        assert_eq!(r.run(&rst.build()).0, XDP_TX, "client RST");
        assert_eq!(open_from(r, d), (XDP_TX, Some(pc)), "D takes C's port");
        let (act, _) = r.run(&data);
        assert_eq!(
            act, XDP_PASS,
            "C's late packet is of no connection now: it does not reach D's backend port"
        );
    });
}

/// Replies are forwarded from per-CPU copies of their reply entries too. A copy serves while
/// fresh even when the entry is gone (as an evicted one), and stops at once when another
/// connection gets the entry's SNAT port: the backend's packets on that port then belong to
/// the new client, never to the old one.
#[test]
fn a_reply_entrys_copy_serves_only_until_the_port_goes_to_another_connection() {
    let rig = Rig::new("pkh");
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        let lb_mac = r.lb0_mac;
        let a = (Ipv4Addr::new(198, 18, 6, 3), 40000);
        let (_, pa) = handshake(r, a);
        let to_client = |r: &mut Runner| -> (u32, Option<(std::net::IpAddr, u16)>) {
            let mut f = from_backend(lb_mac, 8080, pa, ACK | PSH);
            f.tcp.payload = b"hi".to_vec();
            let (act, out) = r.run(&f.build());
            (act, (act == XDP_TX).then(|| dest(&out)))
        };
        let a_addr = Some((a.0.into(), a.1));
        assert_eq!(to_client(r), (XDP_TX, a_addr), "data to A");
        assert_eq!(to_client(r), (XDP_TX, a_addr), "data to A, copied");

        // The reply entry goes behind the program's back (as if evicted); the copy serves.
        flow_table::<RevValue>(&r.pin, maps::REV_FLOWS)
            .remove(&reply_key(pa))
            .expect("remove the reply entry");
        assert_eq!(
            to_client(r),
            (XDP_TX, a_addr),
            "the copy serves A's connection"
        );

        // B, trying A's port first, gets it: the backend's packets on it are B's now.
        let b = client_trying_first(pa, &[a]);
        assert_eq!(open_from(r, b), (XDP_TX, Some(pa)), "B gets A's port");
        assert_eq!(
            to_client(r),
            (XDP_TX, Some((b.0.into(), b.1))),
            "the backend's packet on the port goes to B, not to A's copy"
        );
    });
}

/// Two busy connections whose copies would share a slot do not take it from each other on
/// every packet: the first one's copy keeps the slot while fresh, the second is served from
/// the table.
#[test]
fn a_fresh_copy_keeps_its_slot_from_another_flow() {
    let rig = Rig::new("pki");
    rig.with(one_backend(), move |r| {
        stay_on_this_cpu();
        use nb_common::hash::{copy, copy_slot};
        let lb_mac = r.lb0_mac;
        let a = (CLIENT, 40200);
        let slot = copy_slot(copy(&client_key(a)));
        let b = (40201..=65535u16)
            .map(|p| (CLIENT, p))
            .find(|c| copy_slot(copy(&client_key(*c))) == slot)
            .expect("a port whose copy shares A's slot");
        for c in [a, b] {
            handshake(r, c);
            assert_eq!(r.run(&data_from(lb_mac, c).build()).0, XDP_TX, "data");
        }
        for c in [a, b] {
            forget(r, c);
        }
        assert_eq!(
            r.run(&data_from(lb_mac, a).build()).0,
            XDP_TX,
            "A's copy kept the slot"
        );
        assert_eq!(
            r.run(&data_from(lb_mac, b).build()).0,
            XDP_PASS,
            "B had no copy: its packet looked for its (gone) entry"
        );
    });
}
