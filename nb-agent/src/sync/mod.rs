//! Flow sync (README "A fleet of balancers", "Flow sync"): every connection this balancer's
//! XDP program opens is sent to the fleet's peers, and theirs installed here, so that a
//! client packet the router sends to this balancer (ECMP moved it, or its balancer died) is
//! forwarded with its owner's translation: the backend sees the same connection.
//!
//! One thread per agent does all of it, so that a slow agent loop delays no sync:
//! - reads the program's `SYNC_EVENTS` ring (a connection completed its handshake) and the
//!   closes the agent's sweep reports, and sends them in signed batches ([`wire`]) to every
//!   peer, with an empty one each second when there is nothing else (the peer's "last sync");
//! - takes the peers' batches: checks signature, sender and replay window, and installs each
//!   opened connection (client and reply entry, marked `FLOW_LEARNED`) or removes a closed
//!   one that is still only learned here;
//! - at start, asks every peer for the connections it carries, and answers the same question
//!   from a peer that starts. The balancer announces nothing before the answers came (or
//!   [`RESYNC_WAIT`] passed: the first balancer of a fleet has nobody to ask).
//!
//! UDP, and loss-tolerant by design: a lost message costs at most the survival of the
//! connections it carried; nothing here can make a packet go to a backend its connection does
//! not use, because an entry is only ever a copy of one the owner made.

pub mod wire;

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use log::{info, warn};
use nb_common::{
    FLOW_CLOSING, FLOW_LEARNED, FLOW_RST, FlowKey, FlowValue, PROTO_TCP, REV_LEARNED, REV_REPLIED,
    RevValue, ServiceKey, SyncEvent, maps,
};
use thiserror::Error;

use crate::{
    config::Fleet,
    dataplane::{client_of, coarse_now_ns},
};
use wire::{Kind, Message, Op, Record, Refused};

/// How long a starting balancer waits for its peers' connections before it announces anyway.
pub const RESYNC_WAIT: Duration = Duration::from_secs(3);
/// An empty message goes to each peer this often when nothing else did.
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A peer is up while a message of its came within this.
const PEER_UP_FOR: Duration = Duration::from_secs(3);
/// Pending records go out when this old, or at once when a message is full.
const LINGER: Duration = Duration::from_millis(2);

/// Errors starting the flow sync; each names the file or address.
#[derive(Debug, Error)]
pub enum SyncError {
    #[error("[fleet] sync_key_file {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "[fleet] sync_key_file {path}: {len} bytes, at least {} needed (for example \
         `head -c 32 /dev/urandom | base64 > {path}`, the same file on every balancer)",
        wire::MIN_KEY
    )]
    ShortKey { path: PathBuf, len: usize },
    #[error("[fleet] sync_listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("flow sync: starting its thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("flow sync: pinned map {path}: {source}")]
    Map {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// What the flow sync runs with: from `[fleet]`, with the key read.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncSettings {
    pub listen: SocketAddr,
    pub peers: Vec<SocketAddr>,
    key: Vec<u8>,
}

impl std::fmt::Debug for SyncSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSettings")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl SyncSettings {
    /// The settings of `fleet`, its key file read; `None` without `sync_listen`.
    pub fn of(fleet: &Fleet) -> Result<Option<SyncSettings>, SyncError> {
        let (Some(listen), Some(path)) = (fleet.sync_listen, fleet.sync_key_file.as_ref()) else {
            return Ok(None);
        };
        crate::secret_file::warn_if_exposed(path, "[fleet] sync_key_file");
        let text = std::fs::read(path).map_err(|source| SyncError::Key {
            path: path.clone(),
            source,
        })?;
        let key = text.trim_ascii().to_vec();
        if key.len() < wire::MIN_KEY {
            return Err(SyncError::ShortKey {
                path: path.clone(),
                len: key.len(),
            });
        }
        Ok(Some(SyncSettings {
            listen,
            peers: fleet.sync_peers.clone(),
            key,
        }))
    }
}

/// Where a peer's connections are looked up here: this balancer's service id of a public
/// address and port, and its backend id of a node address and port under that service. A
/// connection whose service or node this balancer does not have (its config differs) is not
/// installed, and counted.
#[derive(Debug, Default, Clone)]
pub struct Index {
    pub services: HashMap<ServiceKey, u32>,
    pub backends: HashMap<(u32, [u32; 4], u16), u32>,
}

impl Index {
    /// (service id, backend id) of connection `f`.
    fn ids(&self, f: &SyncEvent) -> Option<(u32, u32)> {
        let svc = *self.services.get(&ServiceKey {
            addr: f.key.dst,
            port: f.key.dport,
            family: f.key.family,
            proto: PROTO_TCP,
        })?;
        let id = *self.backends.get(&(svc, f.backend_addr, f.backend_port))?;
        Some((svc, id))
    }
}

/// What one peer's sync looks like from here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub address: SocketAddr,
    /// Whether a message of its came within the last 3 s.
    pub up: bool,
    /// Milliseconds since its last message, if one came.
    pub last_ms: Option<u64>,
    /// Connections it sent that were installed here.
    pub flows_learned: u64,
}

/// The counters of the flow sync (`/metrics`, `/v1/status`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncView {
    pub listen: Option<SocketAddr>,
    /// Whether the peers' connections were learned (or [`RESYNC_WAIT`] passed): this
    /// balancer announces nothing before.
    pub synced: bool,
    pub peers: Vec<PeerView>,
    pub messages_sent: u64,
    pub messages_received: u64,
    pub bytes_sent: u64,
    pub flows_sent: u64,
    /// Records of opened connections taken from peers and installed.
    pub flows_installed: u64,
    /// Records of closed connections that removed a learned one.
    pub flows_removed: u64,
    /// Records of connections whose service or node this balancer does not have.
    pub flows_unknown: u64,
    /// Records that met a live connection of this balancer's own on the same key (kept).
    pub flows_conflict: u64,
    /// Refused messages by reason (`wire::REASONS` order).
    pub rejected: [u64; 5],
    /// Sends that failed (a peer's address unreachable).
    pub send_errors: u64,
}

#[derive(Default)]
struct Counters {
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    bytes_sent: AtomicU64,
    flows_sent: AtomicU64,
    flows_installed: AtomicU64,
    flows_removed: AtomicU64,
    flows_unknown: AtomicU64,
    flows_conflict: AtomicU64,
    rejected: [AtomicU64; 5],
    send_errors: AtomicU64,
    synced: AtomicBool,
}

/// What the sync thread shares with the agent.
struct Shared {
    counters: Counters,
    /// Per peer (`sync_peers` order): when its last message came, and its installed flows.
    peers: Mutex<Vec<(SocketAddr, Option<Instant>, u64)>>,
    index: ArcSwap<Index>,
}

enum Command {
    Closed(Vec<SyncEvent>),
    Stop,
}

/// The running flow sync: the agent's handle on its thread.
pub struct Sync {
    settings: SyncSettings,
    shared: Arc<Shared>,
    tx: mpsc::Sender<Command>,
    thread: Option<JoinHandle<()>>,
    /// A second descriptor of its socket, for an upgrade to hand over.
    socket: UdpSocket,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn open_map(pin_dir: &Path, name: &str) -> Result<Map, SyncError> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path)
        .and_then(Map::from_map_data)
        .map_err(|source| SyncError::Map { path, source })
}

impl Sync {
    /// Binds `settings.listen` and starts the thread on the maps pinned in `pin_dir`; with
    /// `learn`, it first asks the peers for their connections (see [`RESYNC_WAIT`]). The
    /// caller turns the program's reports on (`Dataplane::set_sync`) once this succeeded.
    pub fn start(
        settings: SyncSettings,
        pin_dir: &Path,
        learn: bool,
        inherited: Option<UdpSocket>,
    ) -> Result<Sync, SyncError> {
        // An upgrade hands over the running agent's socket (see `crate::upgrade`).
        let socket = match inherited {
            Some(s) if s.local_addr().ok() == Some(settings.listen) => s,
            _ => UdpSocket::bind(settings.listen).map_err(|source| SyncError::Bind {
                addr: settings.listen,
                source,
            })?,
        };
        let dup = socket.try_clone().map_err(|source| SyncError::Bind {
            addr: settings.listen,
            source,
        })?;
        socket
            .set_nonblocking(true)
            .map_err(|source| SyncError::Bind {
                addr: settings.listen,
                source,
            })?;
        let map_err = |name: &str| {
            let path = pin_dir.join(name);
            move |source| SyncError::Map { path, source }
        };
        let ring = RingBuf::try_from(open_map(pin_dir, maps::SYNC_EVENTS)?)
            .map_err(map_err(maps::SYNC_EVENTS))?;
        let flows =
            BpfHashMap::try_from(open_map(pin_dir, maps::FLOWS)?).map_err(map_err(maps::FLOWS))?;
        let rev = BpfHashMap::try_from(open_map(pin_dir, maps::REV_FLOWS)?)
            .map_err(map_err(maps::REV_FLOWS))?;
        // A second handle on the client table, for reading it in batches.
        let flows_raw =
            MapData::from_pin(pin_dir.join(maps::FLOWS)).map_err(map_err(maps::FLOWS))?;
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            peers: Mutex::new(settings.peers.iter().map(|p| (*p, None, 0)).collect()),
            index: ArcSwap::from_pointee(Index::default()),
        });
        let (tx, rx) = mpsc::channel();
        let epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let mut worker = Worker {
            settings: settings.clone(),
            socket,
            ring,
            flows,
            flows_raw,
            rev,
            shared: shared.clone(),
            rx,
            epoch,
            seq: 0,
            pending: Vec::new(),
            pending_since: None,
            last_sent: HashMap::new(),
            windows: HashMap::new(),
            waiting: if learn {
                settings.peers.iter().copied().collect()
            } else {
                Default::default()
            },
            started: Instant::now(),
            asked: None,
        };
        if worker.waiting.is_empty() {
            shared.counters.synced.store(true, Ordering::Relaxed);
        }
        let thread = std::thread::Builder::new()
            .name("nb-sync".into())
            .spawn(move || worker.run())
            .map_err(SyncError::Thread)?;
        info!(
            "flow sync on {} with {} peer(s)",
            settings.listen,
            settings.peers.len()
        );
        Ok(Sync {
            settings,
            shared,
            tx,
            thread: Some(thread),
            socket: dup,
        })
    }

    /// A second descriptor of its socket (an upgrade hands it to the new agent).
    pub fn socket(&self) -> std::io::Result<UdpSocket> {
        self.socket.try_clone()
    }

    /// The settings it runs with (a reload that changes them starts a new one).
    pub fn settings(&self) -> &SyncSettings {
        &self.settings
    }

    /// Where peers' connections are looked up from now on (after every change of services
    /// or nodes).
    pub fn set_index(&self, index: Index) {
        self.shared.index.store(Arc::new(index));
    }

    /// Connections of this balancer's own that its sweep removed: the peers remove their
    /// copies.
    pub fn closed(&self, flows: Vec<SyncEvent>) {
        if !flows.is_empty() {
            let _ = self.tx.send(Command::Closed(flows));
        }
    }

    /// Whether the peers' connections were learned (see [`RESYNC_WAIT`]).
    pub fn synced(&self) -> bool {
        self.shared.counters.synced.load(Ordering::Relaxed)
    }

    /// Its counters and peers, now.
    pub fn view(&self) -> SyncView {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let peers = self
            .shared
            .peers
            .lock()
            .expect("sync peers")
            .iter()
            .map(|(address, last, flows)| PeerView {
                address: *address,
                up: last.is_some_and(|t| t.elapsed() < PEER_UP_FOR),
                last_ms: last.map(|t| t.elapsed().as_millis() as u64),
                flows_learned: *flows,
            })
            .collect();
        SyncView {
            listen: Some(self.settings.listen),
            synced: c.synced.load(Ordering::Relaxed),
            peers,
            messages_sent: get(&c.messages_sent),
            messages_received: get(&c.messages_received),
            bytes_sent: get(&c.bytes_sent),
            flows_sent: get(&c.flows_sent),
            flows_installed: get(&c.flows_installed),
            flows_removed: get(&c.flows_removed),
            flows_unknown: get(&c.flows_unknown),
            flows_conflict: get(&c.flows_conflict),
            rejected: core::array::from_fn(|i| get(&c.rejected[i])),
            send_errors: get(&c.send_errors),
        }
    }
}

impl Drop for Sync {
    fn drop(&mut self) {
        let _ = self.tx.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The sync thread's state.
struct Worker {
    settings: SyncSettings,
    socket: UdpSocket,
    ring: RingBuf<MapData>,
    flows: BpfHashMap<MapData, FlowKey, FlowValue>,
    flows_raw: MapData,
    rev: BpfHashMap<MapData, FlowKey, RevValue>,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    epoch: u64,
    seq: u64,
    /// Records not sent yet, and since when the oldest waits.
    pending: Vec<Record>,
    pending_since: Option<Instant>,
    /// When each peer was last sent a message.
    last_sent: HashMap<SocketAddr, Instant>,
    /// Replay windows by sender.
    windows: HashMap<SocketAddr, wire::Window>,
    /// Peers whose connections have not come yet (start).
    waiting: std::collections::HashSet<SocketAddr>,
    started: Instant,
    /// When the peers were last asked for their connections.
    asked: Option<Instant>,
}

impl Worker {
    fn run(&mut self) {
        let mut buf = vec![0u8; 2048];
        loop {
            self.resync_step();
            let timeout = if self.pending.is_empty() { 50 } else { 1 };
            let mut fds = [
                libc::pollfd {
                    fd: self.socket.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.ring.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the length given, and lives
            // across the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Closed(flows)) => {
                        for flow in flows {
                            self.push(Record {
                                op: Op::Closed,
                                flow,
                            });
                        }
                    }
                    Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            let mut opened = Vec::new();
            while let Some(item) = self.ring.next() {
                if item.len() >= size_of::<SyncEvent>() {
                    // SAFETY: the program writes whole `SyncEvent`s (plain integers, valid
                    // for any bits); the length was checked, and the read is unaligned-safe.
                    opened.push(unsafe {
                        std::ptr::read_unaligned(item.as_ptr() as *const SyncEvent)
                    });
                }
            }
            for flow in opened {
                self.push(Record {
                    op: Op::Opened,
                    flow,
                });
            }
            loop {
                match self.socket.recv_from(&mut buf) {
                    Ok((n, from)) => self.receive(&buf[..n], from),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => break,
                }
            }
            if self
                .pending_since
                .is_some_and(|t| t.elapsed() >= LINGER || self.pending.len() >= wire::MAX_RECORDS)
            {
                self.flush();
            }
            self.heartbeat();
        }
    }

    fn push(&mut self, r: Record) {
        self.pending.push(r);
        self.pending_since.get_or_insert_with(Instant::now);
        if self.pending.len() >= 64 * wire::MAX_RECORDS {
            self.flush();
        }
    }

    /// Sends what is pending to every peer.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_since = None;
        for chunk in pending.chunks(wire::MAX_RECORDS) {
            let peers = self.settings.peers.clone();
            let m = self.message(Kind::Flows, chunk.to_vec());
            for p in &peers {
                self.send(&m, *p);
            }
        }
    }

    fn message(&mut self, kind: Kind, records: Vec<Record>) -> Vec<u8> {
        self.seq += 1;
        add(
            &self.shared.counters.flows_sent,
            records.iter().filter(|r| r.op == Op::Opened).count() as u64,
        );
        wire::encode(
            &Message {
                kind,
                sender: self.settings.listen,
                epoch: self.epoch,
                seq: self.seq,
                sent_ms: now_ms(),
                records,
            },
            &self.settings.key,
        )
    }

    fn send(&mut self, m: &[u8], to: SocketAddr) {
        let c = &self.shared.counters;
        match self.socket.send_to(m, to) {
            Ok(n) => {
                add(&c.messages_sent, 1);
                add(&c.bytes_sent, n as u64);
                self.last_sent.insert(to, Instant::now());
            }
            Err(_) => add(&c.send_errors, 1),
        }
    }

    /// An empty message to each peer not sent anything for a second.
    fn heartbeat(&mut self) {
        let due: Vec<SocketAddr> = self
            .settings
            .peers
            .iter()
            .filter(|p| {
                self.last_sent
                    .get(p)
                    .is_none_or(|t| t.elapsed() >= HEARTBEAT)
            })
            .copied()
            .collect();
        for p in due {
            let m = self.message(Kind::Flows, Vec::new());
            self.send(&m, p);
        }
    }

    /// At start: asks the peers not yet answered for their connections, every second, until
    /// all answered or [`RESYNC_WAIT`] passed.
    fn resync_step(&mut self) {
        let c = &self.shared.counters;
        if c.synced.load(Ordering::Relaxed) {
            return;
        }
        if self.waiting.is_empty() || self.started.elapsed() >= RESYNC_WAIT {
            if !self.waiting.is_empty() {
                warn!(
                    "flow sync: no connections learned from {:?} within {RESYNC_WAIT:?}; \
                     announcing without them",
                    self.waiting
                );
            }
            c.synced.store(true, Ordering::Relaxed);
            return;
        }
        if self
            .asked
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.asked = Some(Instant::now());
            let waiting: Vec<SocketAddr> = self.waiting.iter().copied().collect();
            for p in waiting {
                let m = self.message(Kind::Resync, Vec::new());
                self.send(&m, p);
            }
        }
    }

    /// One datagram from `from`: refused (and counted) or taken.
    fn receive(&mut self, datagram: &[u8], from: SocketAddr) {
        match self.accept(datagram) {
            Ok(m) => self.take(m),
            Err(r) => {
                let i = wire::REASONS.iter().position(|x| *x == r).unwrap_or(0);
                add(&self.shared.counters.rejected[i], 1);
                log::debug!("flow sync: a message from {from} refused: {r}");
            }
        }
    }

    fn accept(&mut self, datagram: &[u8]) -> Result<Message, Refused> {
        let m = wire::decode(datagram, &self.settings.key)?;
        if !self.settings.peers.contains(&m.sender) {
            return Err(Refused::UnknownSender);
        }
        self.windows
            .entry(m.sender)
            .or_default()
            .accept(m.epoch, m.seq, m.sent_ms, now_ms())?;
        Ok(m)
    }

    fn take(&mut self, m: Message) {
        let c = &self.shared.counters;
        add(&c.messages_received, 1);
        let mut installed = 0;
        let index = self.shared.index.load_full();
        for r in &m.records {
            match r.op {
                Op::Opened => installed += u64::from(self.install(&index, &r.flow)),
                Op::Closed => self.remove(&r.flow),
            }
        }
        if let Some(p) = self
            .shared
            .peers
            .lock()
            .expect("sync peers")
            .iter_mut()
            .find(|p| p.0 == m.sender)
        {
            p.1 = Some(Instant::now());
            p.2 += installed;
        }
        match m.kind {
            Kind::Flows => {}
            Kind::Resync => self.dump(m.sender),
            Kind::ResyncDone => {
                if self.waiting.remove(&m.sender) {
                    info!("flow sync: learned the connections of {}", m.sender);
                }
            }
        }
    }

    /// Installs a peer's connection (client and reply entry, learned); whether it did.
    fn install(&mut self, index: &Index, f: &SyncEvent) -> bool {
        let c = &self.shared.counters;
        let Some((svc, id)) = index.ids(f) else {
            add(&c.flows_unknown, 1);
            return false;
        };
        if let Ok(own) = self.flows.get(&f.key, 0)
            && own.flags & (FLOW_LEARNED | FLOW_CLOSING | FLOW_RST) == 0
        {
            // A live connection of this balancer's own on the key: the client's packets
            // came here, so this balancer's entry is the one in use.
            add(&c.flows_conflict, 1);
            return false;
        }
        let rkey = reply_key(f);
        // The port held by another (older) connection here: its learned client entry goes,
        // so that no stray packet of it is sent out on the new connection's port.
        if let Ok(old) = self.rev.get(&rkey, 0) {
            let old_client = client_of(&rkey, &old);
            if old_client != f.key
                && let Ok(of) = self.flows.get(&old_client, 0)
                && of.flags & FLOW_LEARNED != 0
            {
                let _ = self.flows.remove(&old_client);
            }
        }
        let now = coarse_now_ns();
        let rv = RevValue {
            client_addr: f.key.src,
            vip_addr: f.key.dst,
            client_port: f.key.sport,
            vip_port: f.key.dport,
            backend_id: id,
            flags: REV_REPLIED | REV_LEARNED,
            last_seen: now,
            ..RevValue::default()
        };
        let fv = FlowValue {
            backend_addr: f.backend_addr,
            snat_addr: f.snat_addr,
            backend_port: f.backend_port,
            snat_port: f.snat_port,
            backend_id: id,
            last_seen: now,
            flags: FLOW_LEARNED,
            svc_id: svc,
            ..FlowValue::default()
        };
        if self.rev.insert(rkey, rv, 0).is_err() || self.flows.insert(f.key, fv, 0).is_err() {
            return false;
        }
        add(&c.flows_installed, 1);
        true
    }

    /// A peer's connection closed: its copy here goes, unless this balancer carries it now.
    fn remove(&mut self, f: &SyncEvent) {
        let Ok(v) = self.flows.get(&f.key, 0) else {
            return;
        };
        if v.flags & FLOW_LEARNED == 0
            || v.snat_addr != f.snat_addr
            || v.snat_port != f.snat_port
            || v.backend_addr != f.backend_addr
            || v.backend_port != f.backend_port
        {
            return;
        }
        let _ = self.flows.remove(&f.key);
        let rkey = reply_key(f);
        if let Ok(r) = self.rev.get(&rkey, 0)
            && client_of(&rkey, &r) == f.key
        {
            let _ = self.rev.remove(&rkey);
        }
        add(&self.shared.counters.flows_removed, 1);
    }

    /// Sends peer `to` (which just started) every connection this balancer carries, then
    /// says it is done.
    fn dump(&mut self, to: SocketAddr) {
        let entries: Vec<(FlowKey, FlowValue)> = match crate::map_batch::read_all(&self.flows_raw) {
            Ok(v) => v,
            Err(_) => self.flows.iter().filter_map(|e| e.ok()).collect(),
        };
        let records: Vec<Record> = entries
            .into_iter()
            .filter(|(_, v)| v.flags & (FLOW_LEARNED | FLOW_RST) == 0)
            .map(|(key, v)| Record {
                op: Op::Opened,
                flow: SyncEvent {
                    key,
                    backend_addr: v.backend_addr,
                    snat_addr: v.snat_addr,
                    backend_port: v.backend_port,
                    snat_port: v.snat_port,
                },
            })
            .collect();
        let n = records.len();
        for (i, chunk) in records.chunks(wire::MAX_RECORDS).enumerate() {
            let m = self.message(Kind::Flows, chunk.to_vec());
            self.send(&m, to);
            // Paced: a burst of thousands of datagrams overflows the peer's socket buffer.
            if i % 64 == 63 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let m = self.message(Kind::ResyncDone, Vec::new());
        self.send(&m, to);
        info!("flow sync: sent {n} connection(s) to {to}, which is starting");
    }
}

/// The reply-table key of connection `f`: its backend's packets to the SNAT address.
pub fn reply_key(f: &SyncEvent) -> FlowKey {
    FlowKey {
        src: f.backend_addr,
        dst: f.snat_addr,
        sport: f.backend_port,
        dport: f.snat_port,
        family: f.key.family,
        proto: PROTO_TCP,
        _pad: [0; 2],
    }
}
