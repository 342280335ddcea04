//! Test networks for nb: a client, a balancer and backends in network namespaces, wired with
//! one NIC or two, and an nb-agent process running on the balancer.

use std::{
    fs,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::netns::{Netns, connect_in, unique_suffix, veth};

/// The public address the tests serve on (IPv4).
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The public address the tests serve on (IPv6).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// The client's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The balancer's private address (what backends see with full NAT).
pub const LB_PRIVATE: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The balancer's private IPv6 address.
pub const LB_PRIVATE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);

/// Backend address number `i` (1-based): 198.19.0.1i.
pub fn backend_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, 10 + i)
}

/// Backend IPv6 address number `i` (1-based): 2001:db8:2::1i.
pub fn backend_v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10 + i as u16)
}

/// How the balancer is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wiring {
    /// `pub0` towards the client, `priv0` towards the backends.
    TwoNic,
    /// One `eth0` on a bridge shared by client, balancer and backends.
    OneNic,
    /// As `TwoNic`, with a router between the client and the balancer: the client is
    /// `ROUTED_CLIENT` (`ROUTED_CLIENT6`) on a network of its own, the router (`switch`) is
    /// 198.18.0.254 on the balancer's public network, its client side `rc`.
    Routed,
}

/// The client's address in the `Routed` wiring.
pub const ROUTED_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// The client's IPv6 address in the `Routed` wiring.
pub const ROUTED_CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);

/// A client namespace, a balancer namespace and a backends namespace (all backends' addresses
/// on one interface there), plus a switch namespace in the one-NIC wiring (a router in the
/// routed one).
pub struct Topology {
    pub client: Netns,
    pub lb: Netns,
    pub backends: Netns,
    pub switch: Option<Netns>,
    pub wiring: Wiring,
    /// The balancer's interfaces, for `[balancer] interfaces`.
    pub interfaces: Vec<String>,
    /// A unique bpffs directory for this test's agent.
    pub pin_path: PathBuf,
    /// A scratch directory for config, state and logs.
    pub dir: PathBuf,
    /// `[admin] listen`: a port free on the balancer namespace's loopback, so tests (and
    /// nbctl, which reads it from the config) know where the API is.
    pub admin: SocketAddr,
    /// `[balancer] workers`, written when not 0.
    pub workers: u32,
}

impl Topology {
    /// Builds the namespaces, links and addresses; `n` backend addresses (v4 and v6).
    pub fn new(tag: &str, wiring: Wiring, n: u8) -> Topology {
        let client = Netns::new(&format!("{tag}c"));
        let lb = Netns::new(&format!("{tag}l"));
        let backends = Netns::new(&format!("{tag}b"));
        let mut switch = None;
        let interfaces;
        match wiring {
            Wiring::TwoNic => {
                veth(&client, "c0", &lb, "pub0");
                veth(&lb, "priv0", &backends, "bk0");
                lb.sh(
                    "ip addr add 198.18.0.1/24 dev pub0 && ip addr add 198.18.0.10/32 dev pub0 && \
                     ip addr add 198.19.0.1/24 dev priv0 && \
                     ip -6 addr add 2001:db8:1::1/64 dev pub0 nodad && \
                     ip -6 addr add 2001:db8:1::10/128 dev pub0 nodad && \
                     ip -6 addr add 2001:db8:2::1/64 dev priv0 nodad",
                );
                interfaces = vec!["pub0".to_string(), "priv0".to_string()];
            }
            Wiring::OneNic => {
                let sw = Netns::new(&format!("{tag}s"));
                sw.sh("ip link add br0 type bridge && ip link set br0 up");
                veth(&client, "c0", &sw, "swc");
                veth(&lb, "eth0", &sw, "swl");
                veth(&backends, "bk0", &sw, "swb");
                sw.sh(
                    "for i in swc swl swb; do ip link set $i master br0; done && \
                     sysctl -qw net.ipv6.conf.br0.disable_ipv6=1",
                );
                lb.sh(
                    "ip addr add 198.18.0.1/24 dev eth0 && ip addr add 198.18.0.10/32 dev eth0 && \
                     ip addr add 198.19.0.1/24 dev eth0 && \
                     ip -6 addr add 2001:db8:1::1/64 dev eth0 nodad && \
                     ip -6 addr add 2001:db8:1::10/128 dev eth0 nodad && \
                     ip -6 addr add 2001:db8:2::1/64 dev eth0 nodad",
                );
                switch = Some(sw);
                interfaces = vec!["eth0".to_string()];
            }
            Wiring::Routed => {
                let router = Netns::new(&format!("{tag}r"));
                veth(&client, "c0", &router, "rc");
                veth(&router, "rl", &lb, "pub0");
                veth(&lb, "priv0", &backends, "bk0");
                router.sh(
                    "ip addr add 198.18.0.254/24 dev rl && ip addr add 198.18.2.1/24 dev rc && \
                     ip -6 addr add 2001:db8:1::fe/64 dev rl nodad && \
                     ip -6 addr add 2001:db8:3::1/64 dev rc nodad && \
                     sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
                );
                lb.sh(
                    "ip addr add 198.18.0.1/24 dev pub0 && ip addr add 198.18.0.10/32 dev pub0 && \
                     ip addr add 198.19.0.1/24 dev priv0 && \
                     ip -6 addr add 2001:db8:1::1/64 dev pub0 nodad && \
                     ip -6 addr add 2001:db8:1::10/128 dev pub0 nodad && \
                     ip -6 addr add 2001:db8:2::1/64 dev priv0 nodad && \
                     ip route add 198.18.2.0/24 via 198.18.0.254 && \
                     ip -6 route add 2001:db8:3::/64 via 2001:db8:1::fe",
                );
                client.sh(
                    "ip addr add 198.18.2.2/24 dev c0 && ip -6 addr add 2001:db8:3::2/64 dev c0 nodad \
                     && ip route add default via 198.18.2.1 && ip -6 route add default via 2001:db8:3::1",
                );
                switch = Some(router);
                interfaces = vec!["pub0".to_string(), "priv0".to_string()];
            }
        }
        if wiring != Wiring::Routed {
            client.sh(
                "ip addr add 198.18.0.2/24 dev c0 && ip -6 addr add 2001:db8:1::2/64 dev c0 nodad",
            );
        }
        let mut cmds = Vec::new();
        for i in 1..=n {
            cmds.push(format!("ip addr add {}/24 dev bk0", backend_v4(i)));
            cmds.push(format!("ip -6 addr add {}/64 dev bk0 nodad", backend_v6(i)));
        }
        backends.sh(&cmds.join(" && "));
        // Nothing else runs in the new namespace, so the port stays free until the agent binds.
        let admin = lb
            .enter(|| std::net::TcpListener::bind("127.0.0.1:0")?.local_addr())
            .expect("a free port for the admin API");
        let suffix = unique_suffix();
        let dir = std::env::temp_dir().join(format!("nb-{tag}-{suffix}"));
        fs::create_dir_all(&dir).expect("scratch dir");
        Topology {
            client,
            lb,
            backends,
            switch,
            wiring,
            interfaces,
            pin_path: PathBuf::from(format!("/sys/fs/bpf/nb-{tag}-{suffix}")),
            dir,
            admin,
            workers: 0,
        }
    }

    /// The `[balancer]` table for this topology; ports are appended by the caller.
    pub fn balancer_toml(&self) -> String {
        let ifaces: Vec<String> = self.interfaces.iter().map(|i| format!("\"{i}\"")).collect();
        format!(
            "[balancer]\ninterfaces = [{}]\naddresses = [\"{VIP}\", \"{VIP6}\"]\n\
             state_dir = \"{}\"\nbpf_pin_path = \"{}\"\nmax_flows = 65536\n\n\
             {}[admin]\nlisten = \"{}\"\ntoken_file = \"{}\"\n\n",
            ifaces.join(", "),
            self.dir.join("state").display(),
            self.pin_path.display(),
            if self.workers > 0 {
                format!("workers = {}\n\n", self.workers)
            } else {
                String::new()
            },
            self.admin,
            self.dir.join("admin.token").display(),
        )
    }

    /// Writes `nb.toml` (the balancer table followed by `ports`) and returns its path.
    pub fn write_config(&self, ports: &str) -> PathBuf {
        let path = self.dir.join("nb.toml");
        fs::write(&path, format!("{}{}", self.balancer_toml(), ports)).expect("write config");
        path
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.pin_path);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The nb-agent binary under test: `NB_AGENT_BIN` (set by `cargo xtask test`), else the
/// release build in this workspace.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("NB_AGENT_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/nb-agent")
}

/// An nb-agent process running in the balancer namespace; stopped (SIGTERM) on drop.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Starts `nb-agent run --config` in `topo.lb` and waits until it has attached its program
    /// (the pinned link exists for every interface).
    pub fn start(topo: &Topology, config: &Path) -> Agent {
        Agent::start_with_env(topo, config, &[])
    }

    /// As [`Agent::start`], with extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub fn start_with_env(topo: &Topology, config: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::launch(topo, config, env, true)
    }

    /// As [`Agent::start`], with the agent binary at `bin` rather than [`agent_bin`]: two
    /// builds side by side in one benchmark run.
    pub fn start_bin(topo: &Topology, config: &Path, bin: &Path) -> Agent {
        Agent::launch_bin(topo, config, &[], true, bin)
    }

    /// Starts an agent that attaches no XDP program (`xdp_mode = "off"`): waits only until it
    /// says it is serving.
    pub fn start_without_xdp(topo: &Topology, config: &Path) -> Agent {
        Agent::launch(topo, config, &[], false)
    }

    /// As [`Agent::start_without_xdp`], with extra environment variables (e.g. a test
    /// override of a timeout).
    pub fn start_without_xdp_with_env(
        topo: &Topology,
        config: &Path,
        env: &[(&str, &str)],
    ) -> Agent {
        Agent::launch(topo, config, env, false)
    }

    fn launch(topo: &Topology, config: &Path, env: &[(&str, &str)], xdp: bool) -> Agent {
        Agent::launch_bin(topo, config, env, xdp, &agent_bin())
    }

    /// Starts the agent as operators run it in a network namespace, `ip netns exec NS
    /// nb-agent run` (a mount namespace of its own, whose fresh `/sys` hides the host's
    /// bpffs), and waits until it has attached its program.
    pub fn start_by_netns_exec(topo: &Topology, config: &Path) -> Agent {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", topo.lb.name()]).arg(agent_bin());
        Agent::launch_cmd(topo, config, &[], true, cmd)
    }

    /// Starts the agent with its descriptor limit (soft and hard) at `limit`, as `prlimit`
    /// sets it: what a host with a low `ulimit -n` or `LimitNOFILE` gives it.
    pub fn start_with_fd_limit(topo: &Topology, config: &Path, limit: u32) -> Agent {
        let mut cmd = topo.lb.command("prlimit");
        cmd.arg(format!("--nofile={limit}:{limit}"))
            .arg("--")
            .arg(agent_bin());
        Agent::launch_cmd(topo, config, &[], true, cmd)
    }

    fn launch_bin(
        topo: &Topology,
        config: &Path,
        env: &[(&str, &str)],
        xdp: bool,
        bin: &Path,
    ) -> Agent {
        Agent::launch_cmd(topo, config, env, xdp, topo.lb.command(bin))
    }

    fn launch_cmd(
        topo: &Topology,
        config: &Path,
        env: &[(&str, &str)],
        xdp: bool,
        cmd: std::process::Command,
    ) -> Agent {
        let attached = || {
            !xdp || topo
                .interfaces
                .iter()
                .all(|i| topo.pin_path.join(format!("link_{i}")).exists())
        };
        Agent::spawn(&topo.dir, config, env, cmd, &attached)
    }

    /// Starts an agent that attaches no XDP program in `ns`, a namespace of the caller's own
    /// making (a fleet's balancers), logging into `dir`; waits until it says it is serving.
    pub fn start_in(ns: &Netns, dir: &Path, config: &Path) -> Agent {
        Agent::spawn(dir, config, &[], ns.command(agent_bin()), &|| true)
    }

    fn spawn(
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
        cmd: std::process::Command,
        attached: &dyn Fn() -> bool,
    ) -> Agent {
        Agent::spawn_with(dir, config, env, cmd, attached, &[])
    }

    /// As [`Agent::start_in`], with `--upgrade`: it takes over from the agent running in `ns`.
    pub fn start_upgrade_in(ns: &Netns, dir: &Path, config: &Path) -> Agent {
        Agent::spawn_with(
            dir,
            config,
            &[],
            ns.command(agent_bin()),
            &|| true,
            &["--upgrade"],
        )
    }

    /// Starts `nb-agent run --config CONFIG --upgrade` in `topo.lb`: it takes over from the
    /// agent running there; waits until it says it is serving.
    pub fn start_upgrade(topo: &Topology, config: &Path) -> Agent {
        Agent::spawn_with(
            &topo.dir,
            config,
            &[],
            topo.lb.command(agent_bin()),
            &|| true,
            &["--upgrade"],
        )
    }

    fn spawn_with(
        dir: &Path,
        config: &Path,
        env: &[(&str, &str)],
        mut cmd: std::process::Command,
        attached: &dyn Fn() -> bool,
        extra: &[&str],
    ) -> Agent {
        let log = dir.join(format!("agent-{}.log", unique_suffix()));
        let logf = fs::File::create(&log).expect("agent log");
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .args(extra)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn nb-agent");
        let mut a = Agent {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = a.log_text().contains("serving");
            if attached() && ready {
                break;
            }
            if let Some(status) = a.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "nb-agent exited ({status}) before it was ready:\n{}",
                    a.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!("nb-agent not ready after 30 s:\n{}", a.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `sig` to the agent.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill has no memory preconditions; the pid is our own child's.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// Stops the agent with SIGTERM and waits for it; returns its exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: as in `signal`.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the agent to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                self.child = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the agent with SIGKILL (a crash), leaving whatever it pinned.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until a TCP connection from the client to `addr` succeeds (e.g. after the agent has
/// programmed the maps), panicking after `timeout`.
pub fn wait_connectable(ns: &Netns, addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        if connect_in(ns, addr, Duration::from_millis(500)).is_ok() {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{addr} not connectable from {} after {timeout:?}",
                ns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Socket address on the IPv4 public address.
pub fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), port)
}

/// Socket address on the IPv6 public address.
pub fn vip6(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), port)
}

/// Polls `f` every 20 ms until it is true; panics with `what` and the agent's log after
/// `timeout`. Returns how long it took.
pub fn wait_until(
    what: &str,
    agent: &Agent,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{what}: not within {timeout:?}; agent log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the agent's log holds `needle` at least `count` times.
pub fn wait_log(agent: &Agent, needle: &str, count: usize, timeout: Duration) -> Duration {
    wait_until(
        &format!("{count} x {needle:?} in the agent log"),
        agent,
        timeout,
        || agent.log_text().matches(needle).count() >= count,
    )
}

/// A connection from the client to `addr`, with the greeting line of the backend it reached
/// (`netns::Backend` greets with its label).
pub fn open_greeted(t: &Topology, addr: SocketAddr) -> (std::net::TcpStream, String) {
    let mut s = connect_in(&t.client, addr, Duration::from_secs(2)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    let mut label = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).expect("read greeting") == 1 && b[0] != b'\n' {
        label.push(b[0]);
    }
    (s, String::from_utf8(label).expect("label"))
}

/// Sends `msg` on a connection to an echoing backend and reads it back.
pub fn echo(s: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    s.write_all(msg)?;
    let mut buf = vec![0u8; msg.len()];
    s.read_exact(&mut buf)?;
    if buf != msg {
        return Err(std::io::Error::other(format!(
            "echo mismatch: sent {msg:?}, got {buf:?}"
        )));
    }
    Ok(())
}

/// One HTTP/1.1 request to the admin API from inside the balancer namespace: status and body.
pub fn admin_call(
    t: &Topology,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let addr = t.admin;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(tok) = token {
        req.push_str(&format!("Authorization: Bearer {tok}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let raw =
        t.lb.enter(move || {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            std::io::Write::write_all(&mut s, req.as_bytes())?;
            let mut raw = Vec::new();
            s.read_to_end(&mut raw)?;
            Ok::<_, std::io::Error>(raw)
        })
        .unwrap_or_else(|e| panic!("{method} {path} on {addr}: {e}"));
    let text = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line of {head}"));
    (status, body.to_string())
}

/// `n` new connections from the client to `addr`; how many landed on each backend label.
/// Panics on the first that fails.
pub fn spread(
    t: &Topology,
    addr: SocketAddr,
    n: usize,
) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for i in 0..n {
        let label = crate::netns::which_backend(&t.client, addr)
            .unwrap_or_else(|e| panic!("new connection {i} of {n} to {addr} failed: {e}"));
        *seen.entry(label).or_default() += 1;
    }
    seen
}

/// Runs nbctl (beside the agent binary) in the balancer namespace with `--config cfg`.
pub fn nbctl(t: &Topology, cfg: &Path, args: &[&str]) -> std::process::Output {
    let bin = agent_bin().with_file_name("nbctl");
    t.lb.command(&bin)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}
