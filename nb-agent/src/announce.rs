//! Announcing the public addresses for a fleet (README "A fleet of balancers"): nb puts a
//! host route (`/32`, `/128`) for every public address it is ready to serve into a kernel
//! routing table of the operator's choice (`[fleet] announce_table`), and takes it out when
//! the address is no longer ready, at `nbctl fleet drain` and when the agent stops. A BGP
//! speaker (BIRD, FRR) learns that table and announces what is in it; nb never speaks BGP
//! itself. The table is only read by the speaker: no `ip rule` points at it, so the routes
//! change nothing in this host's own forwarding.
//!
//! The routes are written over rtnetlink and carry their own protocol number
//! ([`RTPROT_NB`]), so that a starting agent removes what an earlier one left (a crash
//! leaves its routes, as it leaves its XDP program) and never touches anyone else's routes.

use std::{
    collections::BTreeSet,
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use thiserror::Error;

/// The protocol number of nb's routes (`ip route show table N proto 211`); a speaker may
/// filter on it too (BIRD: `krt_source = 211`).
pub const RTPROT_NB: u8 = 211;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const RTN_UNICAST: u8 = 1;
const RT_SCOPE_UNIVERSE: u8 = 0;
/// `rtm_table` when the table number is in `RTA_TABLE` (numbers above 255 fit only there).
const RT_TABLE_UNSPEC: u8 = 0;
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;

/// Why a route could not be written or read.
#[derive(Debug, Error)]
pub enum AnnounceError {
    #[error("announcing the public addresses: netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("announcing the public addresses: no loopback interface `lo`")]
    NoLoopback,
    #[error("route {addr} in table {table}: {source}")]
    Route {
        addr: IpAddr,
        table: u32,
        #[source]
        source: io::Error,
    },
    #[error("listing the routes of table {table}: {source}")]
    List {
        table: u32,
        #[source]
        source: io::Error,
    },
}

/// The routes this agent has put into the announce table.
#[derive(Debug)]
pub struct Announcer {
    fd: OwnedFd,
    table: u32,
    lo: u32,
    seq: u32,
    announced: BTreeSet<IpAddr>,
}

impl Announcer {
    /// Opens rtnetlink and removes the routes an earlier agent left in `table`: until this
    /// agent is ready, nothing is announced.
    pub fn open(table: u32) -> Result<Announcer, AnnounceError> {
        Announcer::open_with(table, false)
    }

    /// As [`Announcer::open`], but the routes found are kept as this announcer's own: an
    /// upgrade, whose old agent announced them and stops without withdrawing.
    pub fn adopt(table: u32) -> Result<Announcer, AnnounceError> {
        Announcer::open_with(table, true)
    }

    fn open_with(table: u32, adopt: bool) -> Result<Announcer, AnnounceError> {
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(AnnounceError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a descriptor socket(2) just returned, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the name is a NUL-terminated literal.
        let lo = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if lo == 0 {
            return Err(AnnounceError::NoLoopback);
        }
        let mut a = Announcer {
            fd,
            table,
            lo,
            seq: 0,
            announced: BTreeSet::new(),
        };
        let left = a
            .list()
            .map_err(|source| AnnounceError::List { table, source })?;
        for addr in left {
            if adopt {
                a.announced.insert(addr);
                continue;
            }
            a.route(RTM_DELROUTE, addr)?;
            log::info!("{addr}: route left in table {table} by an earlier agent removed");
        }
        Ok(a)
    }

    /// The table the routes go into.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The addresses announced now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        &self.announced
    }

    /// Announces exactly `wanted`: withdraws first, then adds. On an error the routes
    /// written so far stay, and [`Announcer::announced`] says which they are.
    pub fn set(&mut self, wanted: &BTreeSet<IpAddr>) -> Result<(), AnnounceError> {
        let table = self.table;
        let gone: Vec<IpAddr> = self.announced.difference(wanted).copied().collect();
        for addr in gone {
            match self.route(RTM_DELROUTE, addr) {
                // Already gone (an operator's `ip route flush`): withdrawn all the same.
                Err(AnnounceError::Route { source, .. })
                    if source.raw_os_error() == Some(libc::ESRCH) => {}
                r => r?,
            }
            self.announced.remove(&addr);
            log::info!("{addr}: withdrawn (route removed from table {table})");
        }
        let new: Vec<IpAddr> = wanted.difference(&self.announced).copied().collect();
        for addr in new {
            self.route(RTM_NEWROUTE, addr)?;
            self.announced.insert(addr);
            log::info!("{addr}: announced (route in table {table})");
        }
        Ok(())
    }

    /// Writes (`RTM_NEWROUTE`; never over a route that is there, which is someone else's:
    /// `EEXIST`) or removes (`RTM_DELROUTE`, only a route of nb's protocol) the host route of
    /// `addr` via `lo`, and waits for the kernel's answer.
    fn route(&mut self, kind: u16, addr: IpAddr) -> Result<(), AnnounceError> {
        let flags = if kind == RTM_NEWROUTE {
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        } else {
            NLM_F_REQUEST | NLM_F_ACK
        };
        let (family, bits, octets): (u8, u8, Vec<u8>) = match addr {
            IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
        };
        let mut m = Message::new(kind, flags, self.next_seq());
        m.rtmsg(family, bits, RTN_UNICAST);
        m.attr(RTA_DST, &octets);
        m.attr(RTA_OIF, &self.lo.to_ne_bytes());
        m.attr(RTA_TABLE, &self.table.to_ne_bytes());
        self.send(&m.finish())
            .and_then(|()| self.ack())
            .map_err(|source| AnnounceError::Route {
                addr,
                table: self.table,
                source,
            })
    }

    /// The host routes of nb's protocol in the table, both families.
    fn list(&mut self) -> io::Result<Vec<IpAddr>> {
        let mut out = Vec::new();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let mut m = Message::new(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, self.next_seq());
            m.rtmsg(family, 0, 0);
            self.send(&m.finish())?;
            self.dump(|route| {
                if route.protocol == RTPROT_NB && route.table == self.table {
                    out.extend(route.dst);
                }
            })?;
        }
        Ok(out)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl is valid; family set, pid and groups 0 (the kernel).
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` is a live buffer of `msg.len()` bytes and `to` a live sockaddr_nl
        // whose size is passed with it.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Reads the kernel's acknowledgement of the last request: its error, if any.
    fn ack(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, body) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR {
                    return error_of(body);
                }
            }
        }
    }

    /// Reads a dump's messages until its end, handing each route to `f`.
    fn dump(&self, mut f: impl FnMut(Route)) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, body) in messages(&buf[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(()),
                    NLMSG_ERROR => return error_of(body),
                    RTM_NEWROUTE => {
                        if let Some(r) = Route::parse(body) {
                            f(r)
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// One netlink request being built.
struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32) -> Message {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it in
        Message(b)
    }

    /// The route header: a host route of nb's protocol, in the table `RTA_TABLE` names.
    fn rtmsg(&mut self, family: u8, dst_len: u8, kind: u8) {
        let protocol = if kind == 0 { 0 } else { RTPROT_NB };
        self.0.extend_from_slice(&[
            family,
            dst_len,
            0, // src_len
            0, // tos
            RT_TABLE_UNSPEC,
            protocol,
            RT_SCOPE_UNIVERSE,
            kind,
        ]);
        self.0.extend_from_slice(&0u32.to_ne_bytes()); // flags
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

/// The messages in one datagram: their type and what follows their header. A truncated or
/// malformed one ends the walk.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = u32::from_ne_bytes(buf.get(..4)?.try_into().ok()?) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(buf.get(4..6)?.try_into().ok()?);
        let body = &buf[NLMSG_HDR..len];
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, body))
    })
}

/// The error an `NLMSG_ERROR` carries (0 is the acknowledgement of success).
fn error_of(body: &[u8]) -> io::Result<()> {
    let code = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "short netlink error"))?;
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(-code))
    }
}

/// What a dump says of one route: enough to know nb's own host routes.
struct Route {
    protocol: u8,
    table: u32,
    dst: Option<IpAddr>,
}

impl Route {
    fn parse(body: &[u8]) -> Option<Route> {
        let head = body.get(..RTMSG)?;
        let (family, dst_len, protocol) = (head[0], head[1], head[5]);
        let mut table = u32::from(head[4]);
        let mut dst = None;
        let mut rest = &body[RTMSG..];
        while rest.len() >= 4 {
            let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
            let kind = u16::from_ne_bytes([rest[2], rest[3]]);
            if len < 4 || len > rest.len() {
                break;
            }
            let data = &rest[4..len];
            match kind {
                RTA_TABLE if data.len() == 4 => {
                    table = u32::from_ne_bytes(data.try_into().ok()?);
                }
                RTA_DST => {
                    dst = match (family as i32, dst_len, data.len()) {
                        (libc::AF_INET, 32, 4) => {
                            Some(IpAddr::from(<[u8; 4]>::try_from(data).ok()?))
                        }
                        (libc::AF_INET6, 128, 16) => {
                            Some(IpAddr::from(<[u8; 16]>::try_from(data).ok()?))
                        }
                        _ => None,
                    }
                }
                _ => {}
            }
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        }
        Some(Route {
            protocol,
            table,
            dst,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as built here reads back as the route it asks for (the kernel's dump
    /// messages share the layout), and a truncated one is refused, not misread.
    #[test]
    fn a_route_message_reads_back_and_a_short_one_is_refused() {
        for addr in ["198.18.100.1", "2001:db8::1"] {
            let addr: IpAddr = addr.parse().unwrap();
            let (family, bits, octets) = match addr {
                IpAddr::V4(a) => (libc::AF_INET as u8, 32, a.octets().to_vec()),
                IpAddr::V6(a) => (libc::AF_INET6 as u8, 128, a.octets().to_vec()),
            };
            let mut m = Message::new(RTM_NEWROUTE, NLM_F_REQUEST, 7);
            m.rtmsg(family, bits, RTN_UNICAST);
            m.attr(RTA_DST, &octets);
            m.attr(RTA_OIF, &1u32.to_ne_bytes());
            m.attr(RTA_TABLE, &300u32.to_ne_bytes());
            let bytes = m.finish();
            assert_eq!(bytes.len() % 4, 0);
            let all: Vec<_> = messages(&bytes).collect();
            assert_eq!(all.len(), 1);
            let (kind, body) = all[0];
            assert_eq!(kind, RTM_NEWROUTE);
            let r = Route::parse(body).expect("route");
            assert_eq!((r.protocol, r.table, r.dst), (RTPROT_NB, 300, Some(addr)));
            for cut in 0..bytes.len() {
                assert!(messages(&bytes[..cut]).next().is_none(), "cut at {cut}");
            }
        }
    }

    #[test]
    fn an_acknowledgement_carries_the_kernels_error() {
        assert!(error_of(&0i32.to_ne_bytes()).is_ok());
        let e = error_of(&(-libc::EPERM).to_ne_bytes()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(error_of(&[0, 0]).is_err(), "short");
    }
}
