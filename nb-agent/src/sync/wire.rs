//! The flow sync's messages on the wire, their signature and their replay window.
//!
//! One UDP datagram is one message: a 56-byte header, up to [`MAX_RECORDS`] records of 76
//! bytes, and an HMAC-SHA256 of everything before it (32 bytes) under the key the fleet
//! shares. Datagrams stay under 1400 bytes, so no IP fragment is ever needed.
//!
//! ```text
//! header:  "NBFS" | version 1 | kind | records (u16 BE) | sender address (16) | sender port
//!          (u16 BE) | sender family (4 or 6) | 5 zero bytes | epoch (u64 BE) | sequence
//!          (u64 BE) | sent, ms since the Unix epoch (u64 BE)
//! record:  op (1 opened, 2 closed) | family | 2 zero bytes | client address | public address
//!          | backend address | SNAT address (16 each) | client port | public port | backend
//!          port | SNAT port (2 each, network order)
//! ```
//!
//! The sender is named inside the signed part (its `sync_listen`), so a receiver keys its
//! replay window by who signed, not by where the datagram came from. A sender's epoch is its
//! start time (ns); its sequence numbers rise from 1 within it. A receiver takes a message
//! once: newer epochs replace older ones, and within an epoch a 64-message window lets
//! reordered messages in and refuses repeats. Messages more than [`MAX_AGE_MS`] away from the
//! receiver's clock are refused too, which bounds what a receiver that restarted (and forgot
//! its windows) can be made to take again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use nb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, SyncEvent};
use sha2::Sha256;
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"NBFS";
const VERSION: u8 = 1;
/// Header bytes.
pub const HEADER: usize = 56;
/// Bytes of one record.
pub const RECORD: usize = 76;
/// Bytes of the signature.
pub const TAG: usize = 32;
/// Records in one message: 56 + 16 x 76 + 32 = 1304 bytes.
pub const MAX_RECORDS: usize = 16;
/// The largest message.
pub const MAX_MESSAGE: usize = HEADER + MAX_RECORDS * RECORD + TAG;
// Never an IP fragment, even over IPv6 with a 1400-byte path.
const _: () = assert!(MAX_MESSAGE < 1400);
/// How far a message's send time may be from the receiver's clock.
pub const MAX_AGE_MS: u64 = 30_000;
/// The shortest key the fleet may share (bytes): 256 bits, as the HMAC's output.
pub const MIN_KEY: usize = 32;

/// What a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Connections opened or closed at the sender.
    Flows = 1,
    /// The sender (just started) asks for every connection the receiver carries.
    Resync = 2,
    /// The last message of an answer to `Resync`.
    ResyncDone = 3,
}

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Opened = 1,
    Closed = 2,
}

/// One connection in a message: its client key and translation, as the XDP program reports
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub op: Op,
    pub flow: SyncEvent,
}

/// A message as read (or to be written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    /// The sender's `sync_listen`.
    pub sender: SocketAddr,
    pub epoch: u64,
    pub seq: u64,
    pub sent_ms: u64,
    pub records: Vec<Record>,
}

/// Why a datagram was refused. Each is counted; none installs anything.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Refused {
    #[error("truncated or malformed")]
    Malformed,
    #[error("bad signature")]
    Signature,
    #[error("from a balancer not in sync_peers")]
    UnknownSender,
    #[error("sent too long ago or in the future")]
    Stale,
    #[error("replayed")]
    Replayed,
}

impl Refused {
    /// The label of its counter (`nb_fleet_sync_rejected_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::Signature => "signature",
            Refused::UnknownSender => "unknown_sender",
            Refused::Stale => "stale",
            Refused::Replayed => "replayed",
        }
    }
}

/// Every reason, in the order metrics list them.
pub const REASONS: [Refused; 5] = [
    Refused::Malformed,
    Refused::Signature,
    Refused::UnknownSender,
    Refused::Stale,
    Refused::Replayed,
];

fn addr_bytes(words: &[u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn addr_words(b: &[u8]) -> [u32; 4] {
    core::array::from_fn(|i| u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().expect("4 bytes")))
}

fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Signs and writes `m` (at most [`MAX_RECORDS`] records).
pub fn encode(m: &Message, key: &[u8]) -> Vec<u8> {
    assert!(
        m.records.len() <= MAX_RECORDS,
        "at most {MAX_RECORDS} records"
    );
    let mut out = Vec::with_capacity(HEADER + m.records.len() * RECORD + TAG);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(m.kind as u8);
    out.extend_from_slice(&(m.records.len() as u16).to_be_bytes());
    let (addr, family) = ip_bytes(m.sender.ip());
    out.extend_from_slice(&addr);
    out.extend_from_slice(&m.sender.port().to_be_bytes());
    out.push(family);
    out.extend_from_slice(&[0; 5]);
    out.extend_from_slice(&m.epoch.to_be_bytes());
    out.extend_from_slice(&m.seq.to_be_bytes());
    out.extend_from_slice(&m.sent_ms.to_be_bytes());
    debug_assert_eq!(out.len(), HEADER);
    for r in &m.records {
        let f = &r.flow;
        out.push(r.op as u8);
        out.push(f.key.family);
        out.extend_from_slice(&[0; 2]);
        for a in [&f.key.src, &f.key.dst, &f.backend_addr, &f.snat_addr] {
            out.extend_from_slice(&addr_bytes(a));
        }
        for p in [f.key.sport, f.key.dport, f.backend_port, f.snat_port] {
            out.extend_from_slice(&p.to_ne_bytes());
        }
    }
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// Checks the signature of `b` and reads it. Only the signature check comes before
/// anything in the message is believed.
pub fn decode(b: &[u8], key: &[u8]) -> Result<Message, Refused> {
    if b.len() < HEADER + TAG || !(b.len() - HEADER - TAG).is_multiple_of(RECORD) {
        return Err(Refused::Malformed);
    }
    let (body, tag) = b.split_at(b.len() - TAG);
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| Refused::Signature)?;
    if &body[..4] != MAGIC || body[4] != VERSION {
        return Err(Refused::Malformed);
    }
    let kind = match body[5] {
        1 => Kind::Flows,
        2 => Kind::Resync,
        3 => Kind::ResyncDone,
        _ => return Err(Refused::Malformed),
    };
    let count = u16::from_be_bytes([body[6], body[7]]) as usize;
    if count > MAX_RECORDS || body.len() != HEADER + count * RECORD {
        return Err(Refused::Malformed);
    }
    let port = u16::from_be_bytes([body[24], body[25]]);
    let sender_ip = match body[26] {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::new(body[8], body[9], body[10], body[11])),
        FAMILY_V6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(&body[8..24]).expect("16 bytes"),
        )),
        _ => return Err(Refused::Malformed),
    };
    let be64 = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let mut records = Vec::with_capacity(count);
    for r in body[HEADER..].chunks_exact(RECORD) {
        let op = match r[0] {
            1 => Op::Opened,
            2 => Op::Closed,
            _ => return Err(Refused::Malformed),
        };
        let family = r[1];
        if family != FAMILY_V4 && family != FAMILY_V6 {
            return Err(Refused::Malformed);
        }
        let port = |at: usize| u16::from_ne_bytes([r[at], r[at + 1]]);
        records.push(Record {
            op,
            flow: SyncEvent {
                key: FlowKey {
                    src: addr_words(&r[4..20]),
                    dst: addr_words(&r[20..36]),
                    sport: port(68),
                    dport: port(70),
                    family,
                    proto: PROTO_TCP,
                    _pad: [0; 2],
                },
                backend_addr: addr_words(&r[36..52]),
                snat_addr: addr_words(&r[52..68]),
                backend_port: port(72),
                snat_port: port(74),
            },
        });
    }
    Ok(Message {
        kind,
        sender: SocketAddr::new(sender_ip, port),
        epoch: be64(32),
        seq: be64(40),
        sent_ms: be64(48),
        records,
    })
}

/// What a receiver remembers of one sender: its epoch, the highest sequence number taken,
/// and which of the 64 below it were taken too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    epoch: u64,
    top: u64,
    seen: u64,
}

impl Window {
    /// Takes message (`epoch`, `seq`) sent at `sent_ms` if it is new and `now_ms` is near
    /// its time; the window moves only for a message taken.
    pub fn accept(
        &mut self,
        epoch: u64,
        seq: u64,
        sent_ms: u64,
        now_ms: u64,
    ) -> Result<(), Refused> {
        if sent_ms.abs_diff(now_ms) > MAX_AGE_MS {
            return Err(Refused::Stale);
        }
        if seq == 0 || epoch < self.epoch {
            return Err(Refused::Replayed);
        }
        if epoch > self.epoch {
            *self = Window {
                epoch,
                top: seq,
                seen: 1,
            };
            return Ok(());
        }
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.top = seq;
            return Ok(());
        }
        let back = self.top - seq;
        if back >= 64 || self.seen & (1 << back) != 0 {
            return Err(Refused::Replayed);
        }
        self.seen |= 1 << back;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn flow(i: u16) -> SyncEvent {
        SyncEvent {
            key: FlowKey {
                src: [u32::from_ne_bytes([198, 18, 1, 2]), 0, 0, 0],
                dst: [u32::from_ne_bytes([198, 18, 100, 1]), 0, 0, 0],
                sport: (40000 + i).to_be(),
                dport: 80u16.to_be(),
                family: FAMILY_V4,
                proto: PROTO_TCP,
                _pad: [0; 2],
            },
            backend_addr: [u32::from_ne_bytes([198, 18, 2, 20]), 0, 0, 0],
            snat_addr: [u32::from_ne_bytes([198, 18, 2, 111]), 0, 0, 0],
            backend_port: 8080u16.to_be(),
            snat_port: (10000 + i).to_be(),
        }
    }

    fn message(n: usize) -> Message {
        Message {
            kind: Kind::Flows,
            sender: "198.18.2.11:9111".parse().unwrap(),
            epoch: 7,
            seq: 3,
            sent_ms: 1_000_000,
            records: (0..n)
                .map(|i| Record {
                    op: if i % 2 == 0 { Op::Opened } else { Op::Closed },
                    flow: flow(i as u16),
                })
                .collect(),
        }
    }

    #[test]
    fn a_message_reads_back_as_written_and_fits_a_datagram() {
        for n in [0, 1, MAX_RECORDS] {
            let m = message(n);
            let b = encode(&m, KEY);
            assert_eq!(b.len(), HEADER + n * RECORD + TAG);
            assert_eq!(decode(&b, KEY), Ok(m));
        }
        let mut v6 = message(1);
        v6.sender = "[2001:db8:2::11]:9111".parse().unwrap();
        assert_eq!(decode(&encode(&v6, KEY), KEY), Ok(v6));
    }

    #[test]
    fn a_forged_changed_or_truncated_message_is_refused() {
        let b = encode(&message(3), KEY);
        assert_eq!(
            decode(&b, b"another key, also 32 bytes long!"),
            Err(Refused::Signature)
        );
        for at in [0, 6, 30, HEADER + 5, b.len() - 1] {
            let mut c = b.clone();
            c[at] ^= 1;
            assert_eq!(
                decode(&c, KEY),
                Err(Refused::Signature),
                "byte {at} flipped"
            );
        }
        for len in 0..b.len() {
            assert!(decode(&b[..len], KEY).is_err(), "cut at {len}");
        }
        // Signed with the right key but nonsense inside: refused as malformed.
        let mut bad = encode(&message(1), KEY);
        bad.truncate(bad.len() - TAG);
        bad[HEADER] = 9;
        let mut mac = HmacSha256::new_from_slice(KEY).unwrap();
        mac.update(&bad);
        bad.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(decode(&bad, KEY), Err(Refused::Malformed));
    }

    #[test]
    fn the_window_takes_each_message_once_and_no_older_epoch() {
        let now = 1_000_000;
        let mut w = Window::default();
        assert_eq!(w.accept(5, 1, now, now), Ok(()));
        assert_eq!(w.accept(5, 1, now, now), Err(Refused::Replayed));
        assert_eq!(w.accept(5, 3, now, now), Ok(()));
        // Reordered: 2 comes after 3, once.
        assert_eq!(w.accept(5, 2, now, now), Ok(()));
        assert_eq!(w.accept(5, 2, now, now), Err(Refused::Replayed));
        assert_eq!(w.accept(5, 100, now, now), Ok(()));
        assert_eq!(
            w.accept(5, 36, now, now),
            Err(Refused::Replayed),
            "below the window"
        );
        assert_eq!(w.accept(5, 37, now, now), Ok(()));
        // A restart of the sender: a newer epoch starts afresh; the old one is over.
        assert_eq!(w.accept(6, 1, now, now), Ok(()));
        assert_eq!(w.accept(5, 101, now, now), Err(Refused::Replayed));
        assert_eq!(w.accept(6, 0, now, now), Err(Refused::Replayed));
        // Too old or from the future, whatever its numbers.
        assert_eq!(
            w.accept(7, 1, now - MAX_AGE_MS - 1, now),
            Err(Refused::Stale)
        );
        assert_eq!(
            w.accept(7, 1, now + MAX_AGE_MS + 1, now),
            Err(Refused::Stale)
        );
        assert_eq!(w.accept(7, 1, now - MAX_AGE_MS, now), Ok(()));
    }
}
