//! A fleet in namespaces: a client, a router that runs BIRD and spreads flows over equal BGP
//! paths (ECMP, hashed on the 5-tuple), two balancers on one L2 segment with the router and
//! the backends, each running nb and its own BIRD, which learns nb's announce table and
//! announces it to the router over eBGP.
//!
//! ```text
//! client 198.18.1.2 -- 198.18.1.1 router (BIRD, AS 65000) 198.18.2.1 -- br0 --+-- lb1 198.18.2.11 (nb, BIRD, AS 65001)
//!                                                                            +-- lb2 198.18.2.12 (nb, BIRD, AS 65002)
//!                                                                            +-- backends 198.18.2.20
//! ```
//! The public address 198.18.100.1 sits on each balancer's loopback; the router reaches it
//! only through what BGP tells it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    netns::{Backend, Netns, unique_suffix, veth},
    topo::{Agent, agent_bin},
};

/// What moves the public address between the balancers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Active/active: each balancer's BIRD announces what nb puts in its announce table,
    /// the router spreads flows over them (ECMP).
    Bgp,
    /// Active/passive: keepalived (VRRP) holds the address on one balancer's `eth0`, and
    /// `nbctl ready` is its `track_script`; the router reaches the address on its segment.
    Vrrp,
}

/// The fleet's public address.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// Its IPv6 public address (announced behind BGP only).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1);
/// The routing table nb announces from.
pub const ANNOUNCE_TABLE: u32 = 100;
/// Where each balancer's admin API listens, on its address on the shared segment (so that
/// `nbctl fleet status` reaches the others).
pub const ADMIN_PORT: u16 = 9110;
/// The backends' address on the shared segment.
pub const BACKENDS: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 20);
/// Their IPv6 address there.
pub const BACKENDS6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x20);

/// One balancer of the fleet: its namespace, address and files.
pub struct Member {
    pub ns: Netns,
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    pub config: PathBuf,
}

pub struct Fleet {
    pub client: Netns,
    pub router: Netns,
    pub backends: Netns,
    pub lbs: Vec<Member>,
    pub dir: PathBuf,
    pub engine: Engine,
    /// Names this fleet's pins (`/sys/fs/bpf/nb-fleet-SUFFIX-lbN`).
    suffix: String,
}

/// How a member's agent runs (see [`Fleet::write_config_with`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// tcp ports in XDP on `eth0` (else the user-space tcp path).
    pub xdp: bool,
    /// Flow sync with every other member, and the member's own SNAT address
    /// ([`Fleet::snat`]), which keepalived moves ([`Fleet::start_snat_vrrp`]).
    pub sync: bool,
}

/// The UDP port of the flow sync on each member's address.
pub const SYNC_PORT: u16 = 9111;

/// Port 80 as a tcp port to node `b1` at [`BACKENDS`]`:8080`, checked every 2 s, DOWN after
/// `attempts` failed checks.
pub fn tcp_port(attempts: u32) -> String {
    format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\ncheck = \"connection\"\ncheck_interval = 2\n\
         check_timeout = 1\ncheck_attempts = {attempts}\n\n[[port.node]]\nlabel = \"b1\"\n\
         address = \"{BACKENDS}:8080\"\n"
    )
}

/// Member `i`'s (from 0) SNAT address: its connections' source towards the backends, held
/// by that member's keepalived while it lives and by another's when it does not.
pub fn snat(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, 111 + i as u8)
}

/// Member `i`'s IPv6 SNAT address (behind BGP, where the public addresses are IPv6 too).
pub fn snat6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x111 + i as u16)
}

/// Fails with the package to install when a tool the fleet runs is missing.
fn require(tool: &str, package: &str) {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "`{tool}` is missing: apt-get install {package}");
}

impl Fleet {
    /// Builds the namespaces, links, addresses and BIRD daemons of a fleet of `n` balancers
    /// (no agents yet).
    pub fn new(tag: &str, n: u8, engine: Engine) -> Fleet {
        match engine {
            Engine::Bgp => require("bird", "bird2"),
            Engine::Vrrp => require("keepalived", "keepalived"),
        }
        let suffix = unique_suffix();
        let dir = std::env::temp_dir().join(format!("nb-{tag}-{suffix}"));
        fs::create_dir_all(&dir).expect("scratch dir");
        let client = Netns::new(&format!("{tag}c"));
        let router = Netns::new(&format!("{tag}r"));
        let backends = Netns::new(&format!("{tag}b"));
        veth(&client, "c0", &router, "r0");
        client.sh("ip addr add 198.18.1.2/24 dev c0 && ip route add default via 198.18.1.1");
        router.sh(
            "ip addr add 198.18.1.1/24 dev r0 && ip link add br0 type bridge && \
             ip link set br0 up && ip addr add 198.18.2.1/24 dev br0 && \
             sysctl -qw net.ipv4.ip_forward=1 && \
             sysctl -qw net.ipv4.fib_multipath_hash_policy=1",
        );
        veth(&router, "rb", &backends, "eth0");
        router.sh("ip link set rb master br0");
        backends.sh(&format!(
            "ip addr add {BACKENDS}/24 dev eth0 && ip route add default via 198.18.2.1 && \
             ip -6 addr add {BACKENDS6}/64 dev eth0 nodad"
        ));
        let mut lbs = Vec::new();
        let mut neighbors = String::new();
        for i in 1..=n {
            let ns = Netns::new(&format!("{tag}l{i}"));
            let addr = Ipv4Addr::new(198, 18, 2, 10 + i);
            let port = format!("r{i}");
            veth(&router, &port, &ns, "eth0");
            router.sh(&format!("ip link set {port} master br0"));
            ns.sh(&format!(
                "ip addr add {addr}/24 dev eth0 && ip route add default via 198.18.2.1"
            ));
            let mdir = dir.join(format!("lb{i}"));
            fs::create_dir_all(&mdir).expect("member dir");
            if engine == Engine::Bgp {
                // Every balancer accepts the addresses; BGP decides who gets them.
                let addr6 = member6(i);
                ns.sh(&format!(
                    "ip addr add {VIP}/32 dev lo && ip -6 addr add {VIP6}/128 dev lo && \
                     ip -6 addr add {addr6}/64 dev eth0 nodad && \
                     ip -6 route add default via 2001:db8:2::1"
                ));
                let asn = 65000 + u32::from(i);
                let conf = mdir.join("bird.conf");
                fs::write(&conf, balancer_bird(addr, addr6, asn)).expect("bird.conf");
                start_bird(&ns, &mdir, &conf);
                neighbors.push_str(&format!(
                    "protocol bgp lb{i} from balancers {{\n  neighbor {addr} as {asn};\n}}\n\
                     protocol bgp lb{i}v6 from balancers6 {{\n  neighbor {addr6} as {asn};\n}}\n"
                ));
            }
            lbs.push(Member {
                config: mdir.join("nb.toml"),
                dir: mdir,
                ns,
                addr,
            });
        }
        match engine {
            Engine::Bgp => {
                client.sh("ip -6 addr add 2001:db8:1::2/64 dev c0 nodad && \
                     ip -6 route add default via 2001:db8:1::1");
                router.sh("ip -6 addr add 2001:db8:1::1/64 dev r0 nodad && \
                     ip -6 addr add 2001:db8:2::1/64 dev br0 nodad && \
                     sysctl -qw net.ipv6.conf.all.forwarding=1 && \
                     sysctl -qw net.ipv6.fib_multipath_hash_policy=1");
                let conf = dir.join("router-bird.conf");
                fs::write(&conf, router_bird() + &neighbors).expect("router bird.conf");
                start_bird(&router, &dir, &conf);
            }
            // Whoever holds the address answers ARP for it on the segment.
            Engine::Vrrp => {
                router.sh(&format!("ip route add {VIP}/32 dev br0"));
            }
        }
        Fleet {
            client,
            router,
            backends,
            lbs,
            dir,
            engine,
            suffix,
        }
    }

    /// Starts keepalived on member `i` with one VRRP instance per member's SNAT address, its
    /// own at a higher priority: a dead member's SNAT address moves to a survivor (no
    /// `track_script`: the address stays with the host while its links live, whatever its
    /// agent does, since its XDP program forwards without one). What the README's flow sync
    /// section shows.
    pub fn start_snat_vrrp(&self, i: usize) {
        let m = &self.lbs[i];
        let mut conf = String::from("global_defs {\n  enable_script_security\n}\n");
        for j in 0..self.lbs.len() {
            let priority = if i == j { 150 } else { 100 };
            conf.push_str(&format!(
                "vrrp_instance snat{j} {{\n  state BACKUP\n  interface eth0\n  \
                 virtual_router_id {}\n  priority {priority}\n  advert_int 1\n  \
                 virtual_ipaddress {{\n    {}/32\n  }}\n}}\n",
                61 + j,
                snat(j)
            ));
            if self.engine == Engine::Bgp {
                conf.push_str(&format!(
                    "vrrp_instance snat6_{j} {{\n  state BACKUP\n  interface eth0\n  \
                     virtual_router_id {}\n  priority {priority}\n  advert_int 1\n  \
                     virtual_ipaddress {{\n    {}/128\n  }}\n}}\n",
                    71 + j,
                    snat6(j)
                ));
            }
        }
        spawn_keepalived(m, "snat-", &conf);
    }

    /// Which member holds each member's SNAT address now.
    pub fn snat_holders(&self) -> Vec<Option<usize>> {
        let held: Vec<String> = self
            .lbs
            .iter()
            .map(|m| m.ns.sh("ip -o addr show dev eth0"))
            .collect();
        (0..self.lbs.len())
            .map(|j| {
                let a = format!("{}/32", snat(j));
                let a6 = format!("{}/128", snat6(j));
                // Behind BGP a member holds both of its SNAT addresses, or it does not count.
                held.iter()
                    .position(|h| h.contains(&a) && (self.engine != Engine::Bgp || h.contains(&a6)))
            })
            .collect()
    }

    /// Waits until the SNAT addresses are held as `want` says; how long that took.
    pub fn wait_snat_holders(&self, want: &[Option<usize>], timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let now = self.snat_holders();
            if now == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "SNAT addresses held by {now:?}, wanted {want:?} within {timeout:?}\n{}",
                self.lbs
                    .iter()
                    .map(|m| fs::read_to_string(m.dir.join("snat-keepalived.log"))
                        .unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The fleet's flow sync key file (the same for every member).
    pub fn sync_key(&self) -> PathBuf {
        let key = self.dir.join("fleet.key");
        if !key.exists() {
            fs::write(
                &key,
                "bmItZmxlZXQtdGVzdC1rZXktb2YtMzItYnl0ZXMtb3ItbW9yZQ==\n",
            )
            .expect("fleet key");
        }
        key
    }

    /// Member `i`'s flow sync address.
    pub fn sync_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lbs[i].addr), SYNC_PORT)
    }

    /// Member `i`'s `/v1/status` `fleet` object, asked from inside its namespace.
    pub fn fleet_status(&self, i: usize) -> String {
        let m = &self.lbs[i];
        m.ns.sh(&format!(
            "curl -sS -H 'Authorization: Bearer fleet-test-token' http://{}:{ADMIN_PORT}/v1/status",
            m.addr
        ))
    }

    /// Member `i`'s `/metrics`.
    pub fn metrics(&self, i: usize) -> String {
        let m = &self.lbs[i];
        m.ns.sh(&format!("curl -sS http://{}:{ADMIN_PORT}/metrics", m.addr))
    }

    /// Starts keepalived on member `i` with `priority`, tracking `nbctl ready` against its
    /// agent (the README's keepalived config).
    pub fn start_keepalived(&self, i: usize, priority: u8) {
        let m = &self.lbs[i];
        let nbctl = agent_bin().with_file_name("nbctl");
        let conf = keepalived_conf(
            &format!("{} --config {} ready", nbctl.display(), m.config.display()),
            priority,
        );
        spawn_keepalived(m, "", &conf);
    }

    /// Backend `b1` at [`BACKENDS`]`:8080` (greets with its label, then echoes).
    pub fn backend(&self) -> Backend {
        Backend::start(
            &self.backends,
            "b1",
            SocketAddr::new(IpAddr::V4(BACKENDS), 8080),
        )
    }

    /// The member that holds the public address on its `eth0` now, if one does.
    pub fn holder(&self) -> Option<usize> {
        self.lbs.iter().position(|m| {
            m.ns.sh("ip -4 -o addr show dev eth0")
                .contains(&format!("{VIP}/32"))
        })
    }

    /// Waits until member `want` (or nobody) holds the address; how long that took.
    pub fn wait_holder(&self, want: Option<usize>, timeout: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let now = self.holder();
            if now == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{VIP} held by {now:?}, wanted {want:?} within {timeout:?}\n{}",
                self.lbs
                    .iter()
                    .map(|m| fs::read_to_string(m.dir.join("keepalived.log")).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes member `i`'s config (the agent in user space; `[fleet] announce_table` behind
    /// BGP) with `ports` after it.
    pub fn write_config(&self, i: usize, ports: &str) -> PathBuf {
        self.write_config_with(i, ports, Shape::default())
    }

    /// As [`Fleet::write_config`], the agent shaped by `shape`.
    pub fn write_config_with(&self, i: usize, ports: &str, shape: Shape) -> PathBuf {
        let m = &self.lbs[i];
        let token = m.dir.join("admin.token");
        fs::write(&token, "fleet-test-token\n").expect("token");
        let peers: Vec<String> = self
            .lbs
            .iter()
            .filter(|o| o.addr != m.addr)
            .map(|o| format!("\"{}:{ADMIN_PORT}\"", o.addr))
            .collect();
        let (announce, addresses) = match self.engine {
            Engine::Bgp => (
                format!("announce_table = {ANNOUNCE_TABLE}\n"),
                format!("\"{VIP}\", \"{VIP6}\""),
            ),
            Engine::Vrrp => (String::new(), format!("\"{VIP}\"")),
        };
        let sync = if shape.sync {
            let others: Vec<String> = (0..self.lbs.len())
                .filter(|&j| j != i)
                .map(|j| format!("\"{}\"", self.sync_addr(j)))
                .collect();
            format!(
                "sync_listen = \"{}\"\nsync_peers = [{}]\nsync_key_file = \"{}\"\n\
                 snat_addresses = [\"{}\"{}]\n",
                self.sync_addr(i),
                others.join(", "),
                self.sync_key().display(),
                snat(i),
                if self.engine == Engine::Bgp {
                    format!(", \"{}\"", snat6(i))
                } else {
                    String::new()
                }
            )
        } else {
            String::new()
        };
        let xdp_mode = if shape.xdp { "native" } else { "off" };
        let text = format!(
            "[balancer]\ninterfaces = [\"eth0\"]\naddresses = [{addresses}]\nxdp_mode = \"{xdp_mode}\"\n\
             state_dir = \"{}\"\nbpf_pin_path = \"{}\"\n\n\
             [admin]\nlisten = \"{}:{ADMIN_PORT}\"\ntoken_file = \"{}\"\n\n\
             [fleet]\nname = \"lb{}\"\n{announce}peers = [{}]\n{sync}\n{ports}",
            m.dir.join("state").display(),
            self.pin_path(i).display(),
            m.addr,
            token.display(),
            i + 1,
            peers.join(", "),
        );
        fs::write(&m.config, text).expect("config");
        m.config.clone()
    }

    /// Where member `i`'s agent pins its XDP program and maps.
    pub fn pin_path(&self, i: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/nb-fleet-{}-lb{}", self.suffix, i + 1))
    }

    /// Starts member `i`'s agent on its config.
    pub fn start_agent(&self, i: usize) -> Agent {
        let m = &self.lbs[i];
        Agent::start_in(&m.ns, &m.dir, &m.config)
    }

    /// Starts member `i`'s agent with `--upgrade`: it takes over from the one running there.
    pub fn upgrade_agent(&self, i: usize) -> Agent {
        let m = &self.lbs[i];
        Agent::start_upgrade_in(&m.ns, &m.dir, &m.config)
    }

    /// `nbctl ARGS` against member `i`'s agent.
    pub fn nbctl(&self, i: usize, args: &[&str]) -> std::process::Output {
        let m = &self.lbs[i];
        let bin = agent_bin().with_file_name("nbctl");
        m.ns.command(&bin)
            .arg("--config")
            .arg(&m.config)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
    }

    /// The next hops (balancer addresses) of the router's route to `vip` now, sorted.
    fn next_hops(&self, vip: IpAddr) -> Vec<IpAddr> {
        let (family, bits) = if vip.is_ipv4() {
            ("-4", 32)
        } else {
            ("-6", 128)
        };
        let out = self
            .router
            .sh(&format!("ip {family} route show {vip}/{bits}"));
        let mut hops: Vec<IpAddr> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok())
            .collect();
        hops.sort();
        hops
    }

    /// Waits until the router's next hops to the public address are exactly `want`'s
    /// addresses (members by index); how long that took.
    pub fn wait_next_hops(&self, want: &[usize], timeout: Duration) -> Duration {
        let want = want.iter().map(|&i| IpAddr::V4(self.lbs[i].addr)).collect();
        self.wait_hops(VIP.into(), want, timeout)
    }

    /// As [`Fleet::wait_next_hops`], for the IPv6 public address.
    pub fn wait_next_hops6(&self, want: &[usize], timeout: Duration) -> Duration {
        let want = want
            .iter()
            .map(|&i| IpAddr::V6(member6(i as u8 + 1)))
            .collect();
        self.wait_hops(VIP6.into(), want, timeout)
    }

    fn wait_hops(&self, vip: IpAddr, mut want: Vec<IpAddr>, timeout: Duration) -> Duration {
        want.sort();
        let start = Instant::now();
        loop {
            let now = self.next_hops(vip);
            if now == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "the router's next hops to {vip}: {now:?}, wanted {want:?} within {timeout:?}\n\
                 router: {}\n{}",
                self.router.sh(&format!(
                    "birdc -s {} show protocols 2>&1 || true; ip route; ip -6 route",
                    self.dir.join("bird.ctl").display()
                )),
                self.lbs
                    .iter()
                    .map(|m| format!(
                        "{}: table {ANNOUNCE_TABLE}: {}",
                        m.addr,
                        m.ns.sh(&format!(
                            "ip route show table {ANNOUNCE_TABLE}; ip -6 route show table {ANNOUNCE_TABLE}"
                        ))
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// nb's routes in member `i`'s announce table.
    pub fn announced(&self, i: usize) -> String {
        self.lbs[i]
            .ns
            .sh(&format!("ip route show table {ANNOUNCE_TABLE} proto 211"))
    }

    /// The public address, port `port`.
    pub fn vip(port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(VIP), port)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in 0..self.lbs.len() {
            let _ = fs::remove_dir_all(self.pin_path(i));
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs keepalived in the foreground in member `m`'s namespace on config `conf`, its files
/// (`{prefix}keepalived.conf`, pid files and log) in the member's directory.
fn spawn_keepalived(m: &Member, prefix: &str, conf: &str) {
    let path = m.dir.join(format!("{prefix}keepalived.conf"));
    fs::write(&path, conf).expect("keepalived.conf");
    let pid = m.dir.join(format!("{prefix}keepalived.pid"));
    let vrrp = m.dir.join(format!("{prefix}vrrp.pid"));
    m.ns.spawn(
        "keepalived",
        &[
            "-f",
            &path.display().to_string(),
            "-p",
            &pid.display().to_string(),
            "-r",
            &vrrp.display().to_string(),
            "-n",
            "-l",
            "-D",
        ],
        Some(&m.dir.join(format!("{prefix}keepalived.log"))),
    );
}

/// Runs BIRD in the foreground in `ns`, its control socket and pid file in `dir`.
fn start_bird(ns: &Netns, dir: &Path, conf: &Path) {
    let sock = dir.join("bird.ctl");
    let pid = dir.join("bird.pid");
    let log = dir.join("bird.log");
    ns.spawn(
        "bird",
        &[
            "-f",
            "-c",
            &conf.display().to_string(),
            "-s",
            &sock.display().to_string(),
            "-P",
            &pid.display().to_string(),
        ],
        Some(&log),
    );
}

/// Member `i`'s (from 1) IPv6 address on the shared segment.
fn member6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10 + u16::from(i))
}

/// A balancer's BIRD: learns nb's routes from the announce table (and nothing else) and
/// announces them to the router, next hop itself, IPv4 and IPv6 each over a session of its
/// family. What the README's fleet section shows.
fn balancer_bird(addr: Ipv4Addr, addr6: Ipv6Addr, asn: u32) -> String {
    format!(
        "router id {addr};\n\
         protocol device {{\n  scan time 1;\n}}\n\
         protocol kernel nb {{\n  learn;\n  scan time 2;\n  kernel table {ANNOUNCE_TABLE};\n  \
         ipv4 {{\n    import where krt_source = 211;\n    export none;\n  }};\n}}\n\
         protocol bgp upstream {{\n  local {addr} as {asn};\n  neighbor 198.18.2.1 as 65000;\n  \
         hold time 3;\n  connect retry time 1;\n  \
         ipv4 {{\n    import none;\n    export where proto = \"nb\";\n    next hop self;\n  }};\n}}\n\
         protocol kernel nb6 {{\n  learn;\n  scan time 2;\n  kernel table {ANNOUNCE_TABLE};\n  \
         ipv6 {{\n    import where krt_source = 211;\n    export none;\n  }};\n}}\n\
         protocol bgp upstream6 {{\n  local {addr6} as {asn};\n  neighbor 2001:db8:2::1 as 65000;\n  \
         hold time 3;\n  connect retry time 1;\n  \
         ipv6 {{\n    import none;\n    export where proto = \"nb6\";\n    next hop self;\n  }};\n}}\n"
    )
}

/// The router's BIRD: takes the balancers' routes and installs one multipath route.
fn router_bird() -> String {
    "router id 198.18.2.1;\n\
     protocol device {\n  scan time 1;\n}\n\
     protocol kernel {\n  merge paths on;\n  ipv4 {\n    import none;\n    export all;\n  };\n}\n\
     template bgp balancers {\n  local 198.18.2.1 as 65000;\n  hold time 3;\n  \
     connect retry time 1;\n  ipv4 {\n    import all;\n    export none;\n  };\n}\n\
     protocol kernel kernel6 {\n  merge paths on;\n  ipv6 {\n    import none;\n    export all;\n  };\n}\n\
     template bgp balancers6 {\n  local 2001:db8:2::1 as 65000;\n  hold time 3;\n  \
     connect retry time 1;\n  ipv6 {\n    import all;\n    export none;\n  };\n}\n"
        .to_string()
}

/// A keepalived config for one VRRP instance holding the public address, its priority
/// lowered to FAULT while `check` fails (one keyword per line: keepalived refuses blocks on
/// one line). What the README's keepalived config shows.
fn keepalived_conf(check: &str, priority: u8) -> String {
    format!(
        "global_defs {{\n  enable_script_security\n  script_user root\n}}\n\
         vrrp_script nb_ready {{\n  script \"{check}\"\n  interval 1\n  fall 1\n  rise 1\n}}\n\
         vrrp_instance nb {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  \
         priority {priority}\n  advert_int 1\n  virtual_ipaddress {{\n    {VIP}/32\n  }}\n  \
         track_script {{\n    nb_ready\n  }}\n}}\n"
    )
}
