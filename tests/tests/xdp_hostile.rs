//! Packet tables for what the open Internet sends: packets of no connection, SYN floods,
//! forged RSTs and FINs, forged replies from the public side, ICMP errors about connections,
//! VLAN tags, and a fuzz of random and mutated frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nb_agent::dataplane::FlowTimeouts;
use nb_common::{
    ALG_ROUNDROBIN, FAMILY_V4, FLOW_RST, FlowValue, REV_CLIENT_RST, RevValue, VLAN_TAGGED, VlanDev,
    maps,
};
use nb_tests::{
    packet::{self, ACK, FIN, Frame, IcmpFrame, Ip, PSH, RST, SYN},
    rig::*,
};

/// Bare ACKs from random ports (what scanners and broken clients send every day) create no
/// state, never reach a backend, and so never count against one.
#[test]
fn bare_acks_create_no_state_and_reach_no_backend() {
    let rig = Rig::new("ph1");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        for i in 0..2000u16 {
            let mut a = from_client(lb_mac, (CLIENT, 1024 + i * 7), ACK);
            a.tcp.seq = u32::from(i).wrapping_mul(0x9e37_79b9);
            a.tcp.ack = u32::from(i).wrapping_mul(0x85eb_ca6b);
            let frame = a.build();
            assert_eq!(r.run(&frame), (XDP_PASS, frame), "ACK {i}");
        }
        assert_eq!(r.counter("pass_no_flow"), 2000);
        assert_eq!(r.counter("forward"), 0, "nothing went to a backend");
        let counters = r.dp.backend_counters().expect("counters");
        assert!(
            counters
                .values()
                .all(|c| c.stats.refused == 0 && c.stats.packets_in == 0),
            "no backend saw any of them: {counters:?}"
        );
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!((report.flows, report.half_open), (0, 0), "no state");
        assert!(report.unanswered.values().all(|n| *n == 0));
    });
}

/// A flood of spoofed SYNs, more than the half-open table holds and more than the backend has
/// SNAT ports, fills the half-open table only: every established connection keeps its entry,
/// its backend and its port, and the flood shows as dropped SYNs, not as broken connections.
#[test]
fn a_syn_flood_fills_the_half_open_table_and_evicts_no_connection() {
    let rig = Rig::new("ph2");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let live: Vec<(Ipv4Addr, u16)> = (0..50u16).map(|i| (CLIENT, 30000 + i)).collect();
        let ports: Vec<(u16, u16)> = live.iter().map(|c| handshake(r, *c)).collect();
        // 40000 SYNs from addresses never seen (the rig's flow tables hold 65536 entries,
        // the half-open ones 16384; B1 has 22768 SNAT ports).
        for i in 0..40000u32 {
            let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i);
            let mut s = syn_from(lb_mac, (src, 1024 + (i % 60000) as u16));
            s.tcp.seq = i.wrapping_mul(2_654_435_761);
            let (act, _) = r.run(&s.build());
            assert!(act == XDP_TX || act == XDP_DROP, "SYN {i}: {act}");
        }
        assert!(
            r.entries(maps::HALF_FLOWS) <= 16384 && r.entries(maps::HALF_REV) <= 16384,
            "the half-open tables keep their size"
        );
        assert_eq!(
            r.entries(maps::FLOWS),
            50,
            "the connection table holds the live connections only"
        );
        for (c, p) in live.iter().zip(&ports) {
            let (act, out) = r.run(&data_from(lb_mac, *c).build());
            assert_eq!((act, ports_of(&out)), (XDP_TX, *p), "{c:?} lives on");
            let mut back = from_backend(lb_mac, p.0, p.1, ACK | PSH);
            back.tcp.payload = b"still here".to_vec();
            let (act, out) = r.run(&back.build());
            assert_eq!(
                (act, dest(&out)),
                (XDP_TX, (c.0.into(), c.1)),
                "{c:?} answered"
            );
        }
    });
}

fn ports_of(out: &[u8]) -> (u16, u16) {
    ports(out)
}

/// Only the handshake moves a connection into the table: an ACK that does not acknowledge
/// the backend's SYN-ACK (forged, or before it) is dropped, and a client's RST gives the
/// half-open connection up at once (its port is free at the next sweep).
#[test]
fn a_half_open_connection_completes_only_with_the_right_ack() {
    let rig = Rig::new("ph3");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let c = (CLIENT, 40300);
        let (act, out) = r.run(&syn_from(lb_mac, c).build());
        assert_eq!(act, XDP_TX);
        let synack = syn_ack_to(lb_mac, &out);
        let ack = from_client(lb_mac, c, ACK);
        assert_eq!(r.run(&ack.build()).0, XDP_DROP, "an ACK before the SYN-ACK");
        assert_eq!(r.run(&synack.build()).0, XDP_TX, "the SYN-ACK");
        let mut wrong = ack.clone();
        wrong.tcp.ack = BACKEND_ISN + 77;
        assert_eq!(
            r.run(&wrong.build()).0,
            XDP_DROP,
            "an ACK of something else"
        );
        assert_eq!(r.counter("drop_bad_handshake"), 2);
        assert_eq!(r.counter("established"), 0);
        assert_eq!(r.run(&ack.build()).0, XDP_TX, "the right ACK");
        assert_eq!(r.counter("established"), 1);

        let g = (CLIENT, 40301);
        assert_eq!(open_from(r, g).0, XDP_TX);
        let mut far = from_client(lb_mac, g, RST);
        far.tcp.seq = CLIENT_ISN + (1 << 30);
        assert_eq!(
            r.run(&far.build()).0,
            XDP_TX,
            "forwarded: the backend judges it"
        );
        assert_eq!(r.counter("out_of_window"), 1, "but it gives nothing up");
        let rst = from_client(lb_mac, g, RST);
        assert_eq!(r.run(&rst.build()).0, XDP_TX, "the client gives up");
        // A backend that refuses (its first answer a RST): passive checks count it.
        let f = (CLIENT, 40302);
        let (act, out) = r.run(&syn_from(lb_mac, f).build());
        assert_eq!(act, XDP_TX);
        let mut refusal = syn_ack_to(lb_mac, &out);
        refusal.tcp.flags = RST | ACK;
        refusal.tcp.seq = 0;
        assert_eq!(
            r.run(&refusal.build()).0,
            XDP_TX,
            "the refusal reaches the client"
        );
        let refused: u64 =
            r.dp.backend_counters()
                .expect("counters")
                .values()
                .map(|c| c.stats.refused)
                .sum();
        assert_eq!(refused, 1, "counted as refused");
        // The client tries again from the same port: a new attempt, not a resend of the
        // refused one (whose ACK could never complete it).
        let new_flows = r.counter("new_flow");
        let (act, out) = r.run(&syn_from(lb_mac, f).build());
        assert_eq!(act, XDP_TX);
        assert_eq!(r.counter("new_flow"), new_flows + 1, "a new attempt");
        assert_eq!(r.run(&syn_ack_to(lb_mac, &out).build()).0, XDP_TX);
        let established = r.counter("established");
        assert_eq!(r.run(&from_client(lb_mac, f, ACK).build()).0, XDP_TX);
        assert_eq!(
            r.counter("established"),
            established + 1,
            "and it completes"
        );
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!(
            report.expired_half_open, 1,
            "a half-open connection reset by its client goes at once"
        );
        assert!(
            report.unanswered.values().all(|n| *n == 0),
            "and does not count as unanswered"
        );
    });
}

/// RFC 5961's idea, on nb's own state: a RST or FIN far from the client's sequence number is
/// forwarded (the backend's TCP judges it) but changes nothing; a forged RST and SYN cannot
/// move a live connection to another backend; a RST inside the window marks the connection,
/// the connection's next packet clears the mark, and only silence confirms it.
#[test]
fn a_forged_rst_or_fin_outside_the_window_changes_nothing() {
    let rig = Rig::new("ph4");
    let two = service_v4(vec![
        backend("b1", B1.into(), 8080, LB_PRIV.into()),
        backend("b1b", B1.into(), 8081, LB_PRIV.into()),
    ]);
    rig.with(vec![two], move |r| {
        let lb_mac = r.lb0_mac;
        let flow = |r: &Runner, c| {
            flow_table::<FlowValue>(&r.pin, maps::FLOWS)
                .get(&client_key(c), 0)
                .expect("client entry")
        };
        let rev = |r: &Runner, snat: u16, bport: u16| {
            let mut k = reply_key(snat);
            k.sport = bport.to_be();
            flow_table::<RevValue>(&r.pin, maps::REV_FLOWS)
                .get(&k, 0)
                .expect("reply entry")
        };
        let c = (CLIENT, 40400);
        let (bport, snat) = handshake(r, c);
        assert_eq!(r.run(&data_from(lb_mac, c).build()).0, XDP_TX);
        for flags in [RST, RST | ACK, FIN | ACK] {
            let mut forged = from_client(lb_mac, c, flags);
            forged.tcp.seq = CLIENT_ISN.wrapping_add(0x8000_0000);
            let (act, out) = r.run(&forged.build());
            assert_eq!(
                (act, ports(&out)),
                (XDP_TX, (bport, snat)),
                "{flags:#x} forwarded"
            );
        }
        assert_eq!(r.counter("out_of_window"), 3);
        assert_eq!(flow(r, c).flags & (FLOW_RST | 1), 0, "no mark");
        // A forged SYN on the live connection goes to its own backend (which answers with a
        // challenge ACK), not to a new one.
        let new_flows = r.counter("new_flow");
        let (act, out) = r.run(&syn_from(lb_mac, c).build());
        assert_eq!(
            (act, ports(&out)),
            (XDP_TX, (bport, snat)),
            "same backend and port"
        );
        assert_eq!(r.counter("new_flow"), new_flows, "no new connection");

        // Inside the window: marked, both sides.
        let rst = from_client(lb_mac, c, RST | ACK);
        assert_eq!(r.run(&rst.build()).0, XDP_TX);
        assert_ne!(flow(r, c).flags & FLOW_RST, 0);
        assert_ne!(rev(r, snat, bport).flags & REV_CLIENT_RST, 0);
        // The connection's next packet (a backend's challenge ACK, or the client's data)
        // shows it lives: the mark goes.
        let mut challenge = from_backend(lb_mac, bport, snat, ACK);
        challenge.tcp.seq = BACKEND_ISN + 1;
        assert_eq!(r.run(&challenge.build()).0, XDP_TX);
        assert_eq!(rev(r, snat, bport).flags & REV_CLIENT_RST, 0, "cleared");
        assert_eq!(r.run(&data_from(lb_mac, c).build()).0, XDP_TX);
        assert_eq!(flow(r, c).flags & FLOW_RST, 0, "cleared");
        // Marked again, and a SYN within the confirmation time still goes to the connection's
        // own backend; after it, the connection is over and a SYN opens a new one.
        assert_eq!(r.run(&rst.build()).0, XDP_TX);
        let (act, out) = r.run(&syn_from(lb_mac, c).build());
        assert_eq!((act, ports(&out)), (XDP_TX, (bport, snat)));
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::RST_CONFIRM_SECS * 1000 + 1100,
        ));
        let (act, out) = r.run(&syn_from(lb_mac, c).build());
        assert_eq!(act, XDP_TX);
        assert_eq!(r.counter("new_flow"), new_flows + 1, "a new connection");
        assert_ne!(
            ports(&out).0,
            bport,
            "balanced afresh: round robin's other backend"
        );
    });
}

/// A connection reset by its client, or a handshake given up, frees its SNAT port within
/// seconds: nothing at the backend holds it (a reset leaves no TIME_WAIT). The sweep deletes
/// the entries after `RESET_HOLD_SECS` (and a half-open connection `HALF_OPEN_SECS` after its
/// last SYN), and a new connection trying that port first gets it.
#[test]
fn a_reset_or_abandoned_connection_frees_its_port_within_seconds() {
    let rig = Rig::new("ph5");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let a = (Ipv4Addr::new(198, 18, 6, 1), 40500);
        let (_, pa) = handshake(r, a);
        assert_eq!(r.run(&from_client(lb_mac, a, RST | ACK).build()).0, XDP_TX);
        let h = (Ipv4Addr::new(198, 18, 6, 1), 40501);
        let (act, ph) = open_from(r, h);
        assert_eq!(act, XDP_TX, "a handshake that will never complete");
        let ph = ph.unwrap();
        std::thread::sleep(std::time::Duration::from_millis(
            nb_common::RESET_HOLD_SECS.max(nb_common::RST_CONFIRM_SECS) * 1000 + 1100,
        ));
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!(report.expired, 1, "the reset connection's entries went");
        assert_eq!(r.entries(maps::REV_FLOWS), 0, "its port is free");
        let b = client_trying_first(pa, &[a, h]);
        assert_eq!(
            handshake(r, b).1,
            pa,
            "the next connection trying it gets it"
        );
        std::thread::sleep(std::time::Duration::from_millis(
            (nb_common::HALF_OPEN_SECS + 1) * 1000 - nb_common::RESET_HOLD_SECS * 1000,
        ));
        let report = r.dp.sweep(FlowTimeouts::default()).expect("sweep");
        assert_eq!(report.expired_half_open, 1, "the abandoned handshake went");
        let z = client_trying_first(ph, &[a, h, b]);
        assert_eq!(handshake(r, z).1, ph, "and its port is free");
        assert_eq!(r.counter("drop_no_port"), 0);
    });
}

/// Only the backend's side speaks for the backend: a packet to a SNAT port from another
/// interface, or (where one NIC serves both sides) from another MAC than the backend's next
/// hop, reaches no client and changes no state.
#[test]
fn replies_are_taken_only_from_the_backends_side() {
    let rig = Rig::new("ph6");
    let services = vec![
        service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]),
        nb_agent::dataplane::ServiceSpec {
            key: nb_agent::model::PortKey::tcp(82, &[]),
            port: 82,
            family: FAMILY_V4,
            vips: vec![VIP.into()],
            algorithm: ALG_ROUNDROBIN,
            backends: vec![backend("b2", B2.into(), 9090, LB_PRIV2.into())],
        },
    ];
    rig.with(services, move |r| {
        let lb_mac = r.lb0_mac;
        let c = (CLIENT, 40600);
        let (bport, snat) = handshake(r, c);
        let forged = |src_mac: [u8; 6], flags: u8| {
            let mut f = from_backend(lb_mac, bport, snat, flags);
            f.src_mac = src_mac;
            f.build()
        };
        for flags in [RST | ACK, FIN | ACK, ACK | PSH] {
            let frame = forged(ROUTER_MAC, flags);
            assert_eq!(
                r.run(&frame).0,
                XDP_DROP,
                "{flags:#x} from the Internet's router on the shared NIC"
            );
            assert_eq!(
                r.run_on(r.lb1, &forged(B1_MAC, flags)).0,
                XDP_DROP,
                "{flags:#x} on the other NIC"
            );
        }
        assert_eq!(r.counter("drop_wrong_side"), 6);
        let rev = flow_table::<RevValue>(&r.pin, maps::REV_FLOWS)
            .get(&reply_key(snat), 0)
            .expect("reply entry");
        assert_eq!(rev.flags & 2, 0, "not closed by forged packets");
        assert_eq!(
            r.run(&forged(B1_MAC, ACK | PSH)).0,
            XDP_TX,
            "the backend's own"
        );

        // A backend behind a NIC of its own: its answers may come from any MAC there (routers
        // in front of it take turns), never from another interface.
        let mut s = syn(lb_mac, 40601);
        s.tcp.dport = 82;
        let (act, out) = r.run(&s.build());
        assert_eq!(act, XDP_REDIRECT);
        let snat2 = ports(&out).1;
        let mut back = Frame::v4((B2, 9090), (LB_PRIV2, snat2), SYN | ACK);
        back.dst_mac = r.lb1_mac;
        back.src_mac = [0x02, 0, 0, 0, 0, 0x22];
        assert_eq!(r.run(&back.build()).0, XDP_DROP, "on lb0: not B2's side");
        assert_eq!(r.run_on(r.lb1, &back.build()).0, XDP_REDIRECT, "on lb1");
    });
}

/// A backend's segment translated to the client, as `from_backend` then the program made it.
fn translated_reply(r: &mut Runner, bport: u16, snat: u16, len: usize) -> (Vec<u8>, Vec<u8>) {
    let mut b = from_backend(r.lb0_mac, bport, snat, ACK | PSH);
    b.tcp.payload = vec![b'x'; len];
    let original = b.build();
    let (act, out) = r.run(&original);
    assert_eq!(act, XDP_TX);
    (original, out)
}

/// ICMP errors about a connection are translated as its packets are: "fragmentation needed"
/// from a router on the client's path, about a segment the program sent to the client, goes
/// to the backend that sent it, its embedded packet turned back into exactly the backend's
/// original (addresses, ports, checksums); and the other way, an error from the backend's
/// side about a client's segment goes to the client. Errors about anything else pass.
#[test]
fn icmp_errors_about_a_connection_are_translated_both_ways() {
    let rig = Rig::new("ph7");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let c = (CLIENT, 40700);
        let (bport, snat) = handshake(r, c);
        let router = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254));
        for keep in [28usize, 68, 576] {
            let (original, sent) = translated_reply(r, bport, snat, 1400);
            let mut icmp = IcmpFrame::too_big(router, VIP.into(), 1280, &sent, keep);
            icmp.dst_mac = lb_mac;
            icmp.src_mac = ROUTER_MAC;
            let (act, out) = r.run(&icmp.build());
            assert_eq!(act, XDP_TX, "keep {keep}: to the backend");
            let got = packet::parse_icmp(&out).expect("a valid ICMP frame");
            assert_eq!(
                (got.src, got.dst),
                (LB_PRIV.into(), B1.into()),
                "keep {keep}"
            );
            assert_eq!(
                (got.ty, got.code, got.rest),
                (icmp.ty, icmp.code, icmp.rest)
            );
            assert_eq!((got.dst_mac, got.src_mac), (B1_MAC, lb_mac));
            let want =
                &packet::ip_packet(&original)[..keep.min(packet::ip_packet(&original).len())];
            assert_eq!(
                got.embedded, want,
                "keep {keep}: the embedded packet is the backend's own"
            );
        }
        assert_eq!(r.counter("icmp_forward"), 3);

        // From the backend's side, about a client segment the program sent to the backend.
        let mut d = data_from(lb_mac, c);
        d.tcp.payload = vec![b'y'; 1400];
        let original = d.build();
        let (act, sent) = r.run(&original);
        assert_eq!(act, XDP_TX);
        let mut icmp = IcmpFrame::too_big(B1.into(), LB_PRIV.into(), 1400, &sent, 96);
        icmp.dst_mac = lb_mac;
        icmp.src_mac = B1_MAC;
        let frame = icmp.build();
        assert_eq!(
            r.run_on(r.lb1, &frame).0,
            XDP_DROP,
            "not from the backend's side"
        );
        let (act, out) = r.run(&frame);
        assert_eq!(act, XDP_TX, "to the client");
        let got = packet::parse_icmp(&out).expect("a valid ICMP frame");
        assert_eq!((got.src, got.dst), (VIP.into(), CLIENT.into()));
        assert_eq!(got.embedded, &packet::ip_packet(&original)[..96]);
        assert_eq!(r.counter("icmp_reply"), 1);

        // Errors about no connection, and ICMP that is not an error, pass untouched.
        let stranger = from_backend(lb_mac, 8080, 31000, ACK).build();
        let mut lost = IcmpFrame::too_big(router, VIP.into(), 1280, &stranger, 48);
        lost.dst_mac = lb_mac;
        let mut echo = lost.clone();
        echo.ty = 8;
        echo.code = 0;
        for (what, f) in [("about no connection", lost), ("an echo request", echo)] {
            let frame = f.build();
            assert_eq!(r.run(&frame), (XDP_PASS, frame), "{what}");
        }
    });
}

/// The same for IPv6: "packet too big" from the client's path reaches the backend.
#[test]
fn icmpv6_packet_too_big_reaches_the_backend() {
    let rig = Rig::new("ph8");
    rig.with(one_backend(), move |r| {
        let lb_mac = r.lb0_mac;
        let mut s6 = Frame::v6((CLIENT6, 40800), (VIP6, 80), SYN);
        s6.dst_mac = lb_mac;
        s6.src_mac = CLIENT_MAC;
        s6.tcp.seq = CLIENT_ISN;
        let (act, out) = r.run(&s6.build());
        assert_eq!(act, XDP_TX);
        let snat6 = ports(&out).1;
        let b6 = |flags: u8, len: usize| {
            let mut f = Frame::v6((B6, 8080), (LB_PRIV6, snat6), flags);
            f.dst_mac = lb_mac;
            f.src_mac = B6_MAC;
            f.tcp.seq = BACKEND_ISN + u32::from(flags & SYN == 0);
            f.tcp.ack = CLIENT_ISN + 1;
            f.tcp.payload = vec![b'z'; len];
            f
        };
        assert_eq!(r.run(&b6(SYN | ACK, 0).build()).0, XDP_TX);
        let mut ack = Frame::v6((CLIENT6, 40800), (VIP6, 80), ACK);
        ack.dst_mac = lb_mac;
        ack.src_mac = CLIENT_MAC;
        ack.tcp.seq = CLIENT_ISN + 1;
        ack.tcp.ack = BACKEND_ISN + 1;
        assert_eq!(r.run(&ack.build()).0, XDP_TX);
        let original = b6(ACK | PSH, 1400).build();
        let (act, sent) = r.run(&original);
        assert_eq!(act, XDP_TX);
        let router = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0xfe));
        let mut icmp = IcmpFrame::too_big(router, VIP6.into(), 1280, &sent, 1232);
        icmp.dst_mac = lb_mac;
        icmp.src_mac = ROUTER_MAC;
        let (act, out) = r.run(&icmp.build());
        assert_eq!(act, XDP_TX);
        let got = packet::parse_icmp(&out).expect("a valid ICMPv6 frame");
        assert_eq!((got.src, got.dst), (LB_PRIV6.into(), B6.into()));
        assert_eq!((got.ty, got.rest), (2, 1280u32.to_be_bytes()));
        assert_eq!(got.embedded, &packet::ip_packet(&original)[..1232]);
    });
}

/// VLAN tags: the tag a frame leaves with is what its next hop needs, not the one it came
/// with. A client on VLAN 42 reaches an untagged backend (tag removed) and gets its answers
/// tagged 42 (tag added); a backend behind a VLAN interface (this kernel has no 802.1Q
/// interfaces, so the data path is told that lb1 is "VLAN 200 over lb0", as the agent tells
/// it of real ones) gets its frames tagged 200 on lb0, the client's tag rewritten, and its
/// answers are taken only with that tag.
#[test]
fn vlan_tags_follow_the_next_hop_both_ways() {
    let rig = Rig::new("ph9");
    let two = vec![
        service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]),
        nb_agent::dataplane::ServiceSpec {
            key: nb_agent::model::PortKey::tcp(82, &[]),
            port: 82,
            family: FAMILY_V4,
            vips: vec![VIP.into()],
            algorithm: ALG_ROUNDROBIN,
            backends: vec![backend("b2", B2.into(), 9090, LB_PRIV2.into())],
        },
    ];
    rig.with(two, move |r| {
        stay_on_this_cpu();
        let lb_mac = r.lb0_mac;
        let tagged = |mut f: Frame, vlan: Option<u16>| {
            f.vlan = vlan;
            f
        };
        let c = (CLIENT, 40900);
        // Tagged client, untagged backend.
        let s = tagged(syn(lb_mac, c.1), Some(42));
        let (act, out) = r.run(&s.build());
        assert_eq!(act, XDP_TX);
        let to = (B1.into(), 8080, B1_MAC);
        let from = (LB_PRIV.into(), lb_mac);
        let snat = assert_forwarded(&s, &out, to, from);
        assert_eq!(
            packet::parse(&out).unwrap().vlan,
            None,
            "the tag is removed"
        );
        assert_eq!(out.len() + 4, s.build().len());
        let (act, out) = r.run(&syn_ack_to(lb_mac, &out).build());
        assert_eq!(act, XDP_TX);
        let got = packet::parse(&out).expect("SYN-ACK");
        assert_eq!(got.vlan, Some(42), "the client's tag is added");
        packet::verify_checksums(&out).expect("checksums");
        let ack = tagged(from_client(lb_mac, c, ACK), Some(42));
        assert_eq!(r.run(&ack.build()).0, XDP_TX);
        let data = tagged(data_from(lb_mac, c), Some(42));
        for i in 0..2 {
            let (act, out) = r.run(&data.build());
            assert_eq!(act, XDP_TX);
            assert_eq!(assert_forwarded(&data, &out, to, from), snat, "data {i}");
            assert_eq!(
                packet::parse(&out).unwrap().vlan,
                None,
                "data {i}: untagged"
            );
            let mut back = from_backend(lb_mac, 8080, snat, ACK | PSH);
            back.tcp.payload = b"tagged".to_vec();
            let (act, out) = r.run(&back.build());
            assert_eq!(act, XDP_TX);
            assert_eq!(
                packet::parse(&out).unwrap().vlan,
                Some(42),
                "answer {i}: tagged"
            );
        }

        // A backend on "VLAN 200 over lb0".
        let mut vlans = std::collections::BTreeMap::new();
        vlans.insert(
            r.lb1,
            VlanDev {
                lower: r.lb0,
                vlan: VLAN_TAGGED | 200,
                _pad: 0,
            },
        );
        r.dp.write_vlans(vlans).expect("write VLAN_DEVS");
        for (client_vlan, port) in [(None, 40901u16), (Some(42), 40902)] {
            let mut s = tagged(syn(lb_mac, port), client_vlan);
            s.tcp.dport = 82;
            let (act, out) = r.run(&s.build());
            assert_eq!(act, XDP_TX, "{client_vlan:?}: out of lb0 itself, tagged");
            let got = packet::parse(&out).expect("SYN");
            assert_eq!(got.vlan, Some(200), "{client_vlan:?}: tagged for B2's VLAN");
            packet::verify_checksums(&out).expect("checksums");
            let snat = got.tcp.sport;
            let mut back = Frame::v4((B2, 9090), (LB_PRIV2, snat), SYN | ACK);
            back.dst_mac = r.lb1_mac;
            back.src_mac = B2_MAC;
            assert_eq!(r.run(&back.build()).0, XDP_DROP, "untagged: not B2's side");
            back.vlan = Some(200);
            let (act, out) = r.run(&back.build());
            assert_eq!(act, XDP_TX, "{client_vlan:?}: B2's answer on VLAN 200");
            assert_eq!(
                packet::parse(&out).unwrap().vlan,
                client_vlan,
                "and the client's own tag (or none) on the way back"
            );
            packet::verify_checksums(&out).expect("checksums");
        }
    });
}

/// The rig's traffic as the fuzz test models it: the clients of connections (live ones, and
/// those the fuzz's own SYNs opened) and their SNAT ports.
struct Model {
    live: Vec<(IpAddr, u16)>,
    snat: Vec<u16>,
}

impl Model {
    /// Whether `frame` is a well-formed packet of a connection or a service of the rig: a
    /// TCP segment to a service port that opens a connection (or of a live connection), one
    /// from B1 to a live connection's SNAT port, or an ICMP error about a live connection.
    /// Checksums are not asked for: the program does not verify them (the receiver does).
    fn ours(&self, frame: &[u8]) -> bool {
        if let Ok(f) = packet::parse(frame) {
            let (src, dst) = match f.ip {
                Ip::V4 {
                    src,
                    dst,
                    more_fragments,
                    frag_offset,
                    ..
                } => {
                    if more_fragments || frag_offset != 0 {
                        return false;
                    }
                    (IpAddr::V4(src), IpAddr::V4(dst))
                }
                Ip::V6 { src, dst, .. } => (IpAddr::V6(src), IpAddr::V6(dst)),
            };
            let to_service = (dst == IpAddr::V4(VIP) || dst == IpAddr::V6(VIP6))
                && [80, 81].contains(&f.tcp.dport);
            let syn = f.tcp.flags & (SYN | ACK) == SYN;
            let of_live = self.live.contains(&(src, f.tcp.sport));
            let from_backend = (src == IpAddr::V4(B1) || src == IpAddr::V6(B6))
                && self.snat.contains(&f.tcp.dport);
            return (to_service && (syn || of_live)) || from_backend;
        }
        self.icmp_ours(frame).unwrap_or(false)
    }

    /// An IPv4 ICMP error (type 3, 11 or 12) from the client's side about a segment sent to a
    /// live client (from the public address), or from B1's side about one sent to B1.
    fn icmp_ours(&self, frame: &[u8]) -> Option<bool> {
        let l3 = match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
            0x0800 => 14,
            0x8100 if u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]) == 0x0800 => 18,
            _ => return Some(false),
        };
        let ip = frame.get(l3..)?;
        let ihl = usize::from(ip.first()? & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        if ip[0] >> 4 != 4 || ihl < 20 || *ip.get(9)? != 1 || total > ip.len() || total < ihl + 8 {
            return Some(false);
        }
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 || ![3, 11, 12].contains(&ip[ihl]) {
            return Some(false);
        }
        let outer_dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let inner = ip.get(ihl + 8..total)?;
        let iihl = usize::from(inner.first()? & 0x0f) * 4;
        if inner[0] >> 4 != 4 || iihl < 20 || *inner.get(9)? != 6 || inner.len() < iihl + 4 {
            return Some(false);
        }
        let isrc = Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]);
        let idst = Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]);
        let sport = u16::from_be_bytes([inner[iihl], inner[iihl + 1]]);
        let dport = u16::from_be_bytes([inner[iihl + 2], inner[iihl + 3]]);
        if isrc != outer_dst {
            return Some(false);
        }
        let to_client = isrc == VIP && sport == 80 && self.live.contains(&(idst.into(), dport));
        let to_backend =
            isrc == LB_PRIV && idst == B1 && dport == 8080 && self.snat.contains(&sport);
        Some(to_client || to_backend)
    }
}

/// 100,000 random and mutated frames: the program never forwards one that is not a
/// well-formed packet of a connection or a service, never aborts, and what it passes or
/// drops it leaves untouched (the rig has every neighbour, so nothing is passed translated).
#[test]
fn fuzzed_frames_are_never_misforwarded() {
    let rig = Rig::new("pha");
    let mut services = one_backend();
    let mut none = service_v4(vec![backend("b1", B1.into(), 8080, LB_PRIV.into())]);
    none.port = 81;
    none.backends[0].eligible = false;
    services.push(none);
    rig.with(services, move |r| {
        let lb_mac = r.lb0_mac;
        let live: Vec<(Ipv4Addr, u16)> = (0..8u16).map(|i| (CLIENT, 44000 + i)).collect();
        let snat: Vec<u16> = live.iter().map(|c| handshake(r, *c).1).collect();
        let (base_reply, base_sent) = translated_reply(r, 8080, snat[0], 200);
        let mut model = Model {
            live: live.iter().map(|c| (c.0.into(), c.1)).collect(),
            snat: snat.clone(),
        };
        let router = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254));
        let mut icmp = IcmpFrame::too_big(router, VIP.into(), 1280, &base_sent, 68);
        icmp.dst_mac = lb_mac;
        let mut v6 = Frame::v6((CLIENT6, 44100), (VIP6, 80), SYN);
        v6.dst_mac = lb_mac;
        let mut tagged = data_from(lb_mac, live[1]);
        tagged.vlan = Some(42);
        let seeds: Vec<Vec<u8>> = vec![
            syn(lb_mac, 44200).build(),
            data_from(lb_mac, live[0]).build(),
            from_client(lb_mac, live[2], RST | ACK).build(),
            from_client(lb_mac, live[3], FIN | ACK).build(),
            base_reply,
            icmp.build(),
            v6.build(),
            tagged.build(),
            {
                let mut s = syn(lb_mac, 44201);
                s.tcp.dport = 81;
                s.build()
            },
        ];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut forwarded = 0;
        for i in 0..100_000u32 {
            let mut f = if i % 10 == 0 {
                // Wholly random, with an IP ethertype now and then.
                let len = 15 + (next() % 200) as usize;
                let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                if i % 20 == 0 {
                    f[12] = 0x08;
                    f[13] = 0x00;
                    f[14] = 0x45;
                }
                f
            } else {
                seeds[(next() % seeds.len() as u64) as usize].clone()
            };
            // Mutations: a few bytes of the headers, the length, or both.
            for _ in 0..(next() % 4) {
                let at = (next() as usize) % f.len().min(80);
                f[at] = next() as u8;
            }
            if next() % 5 == 0 {
                let len = 14 + (next() as usize) % (f.len() - 13);
                f.truncate(len);
            }
            let (act, out) = r.run(&f);
            assert_ne!(act, XDP_ABORTED, "frame {i} aborted: {f:02x?}");
            match act {
                XDP_TX | XDP_REDIRECT => {
                    forwarded += 1;
                    // A SYN to a service opens a connection: its later packets are ours.
                    if let (Ok(p), Ok(o)) = (packet::parse(&f), packet::parse(&out))
                        && p.tcp.flags & (SYN | ACK) == SYN
                    {
                        let src = match p.ip {
                            Ip::V4 { src, .. } => IpAddr::V4(src),
                            Ip::V6 { src, .. } => IpAddr::V6(src),
                        };
                        model.live.push((src, p.tcp.sport));
                        model.snat.push(o.tcp.sport);
                    }
                    assert!(
                        model.ours(&f),
                        "frame {i} forwarded but not a well-formed packet of a connection or \
                         service: {f:02x?}"
                    );
                }
                _ => assert_eq!(out, f, "frame {i} ({act}) must be left untouched"),
            }
        }
        assert!(
            forwarded > 1000,
            "the mutations kept many frames valid: {forwarded}"
        );
    });
}
