//! Network namespaces, veth links and small real TCP peers for nb's tests.
//!
//! Every namespace gets a unique name and is deleted when its [`Netns`] is dropped, also when a
//! test panics, so a failed run leaves nothing behind. Sockets are made in a namespace by a
//! thread that has joined it with `setns(2)`; a socket keeps its namespace for its whole life,
//! so the rest of the test can use it from any thread.

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A suffix unique to this process and call, short enough for namespace and file names.
pub fn unique_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}x{n}", std::process::id())
}

/// A named network namespace (`ip netns`), deleted on drop with everything started in it.
pub struct Netns {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Creates `nb<tag>-<unique>` with its loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = format!("nb{tag}-{}", unique_suffix());
        run_ok(
            Command::new("ip").args(["netns", "add", &name]),
            "ip netns add",
        );
        let ns = Netns {
            name,
            children: Mutex::new(Vec::new()),
        };
        ns.sh("ip link set lo up");
        ns
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `cmd` with `sh -c` inside the namespace; panics (with its output) if it fails.
    /// Returns its standard output.
    pub fn sh(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .unwrap_or_else(|e| panic!("run `{cmd}` in {}: {e}", self.name));
        if !out.status.success() {
            panic!(
                "`{cmd}` in {} failed ({}):\n{}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A counter of the kernel's `TcpExt` table in the namespace (/proc/net/netstat is per
    /// namespace): TCP's own account of what it met, such as SYNs refused in TIME_WAIT
    /// (`PAWSTimewait`) or resent (`TCPSynRetrans`). None if the kernel has no such counter.
    pub fn tcp_ext(&self, name: &str) -> Option<u64> {
        let text = self.sh("cat /proc/net/netstat");
        let mut rows = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (rows.next()?, rows.next()?);
        let at = names.split_whitespace().position(|n| n == name)?;
        values.split_whitespace().nth(at)?.parse().ok()
    }

    /// Runs `cmd` with `sh -c` inside the namespace; true if it exited 0.
    pub fn sh_ok(&self, cmd: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// Starts `program args` in the namespace in the background; it is killed when the
    /// namespace is dropped. Its output goes to `log` if given.
    pub fn spawn(&self, program: &str, args: &[&str], log: Option<&std::path::Path>) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]).args(args);
        cmd.stdin(Stdio::null());
        match log {
            Some(p) => {
                let f = File::create(p).unwrap_or_else(|e| panic!("log {}: {e}", p.display()));
                let f2 = f.try_clone().expect("dup log");
                cmd.stdout(f).stderr(f2);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {program} in {}: {e}", self.name));
        let pid = child.id();
        self.children.lock().expect("children").push(child);
        pid
    }

    /// A command that runs `program` in this namespace's network stack but, unlike
    /// `ip netns exec`, in the caller's mount namespace: it sees the host's `/sys/fs/bpf`, as
    /// nb-agent does on a real host.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let f = File::open(format!("/var/run/netns/{}", self.name))
            .unwrap_or_else(|e| panic!("open netns {}: {e}", self.name));
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only calls setns, which
        // is async-signal-safe; `f` stays open (moved into the closure) until then.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread that has joined this namespace and returns its result; a panic in
    /// `f` is re-raised here.
    /// Moves the calling thread into namespace `name` for good (a thread of the test's own
    /// that runs a long loop there, such as a client load).
    pub fn join(name: &str) {
        let path = format!("/var/run/netns/{name}");
        join_netns(&path).unwrap_or_else(|e| panic!("setns {path}: {e}"));
    }

    pub fn enter<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        let path = format!("/var/run/netns/{}", self.name);
        let h = std::thread::spawn(move || {
            join_netns(&path).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        });
        match h.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(mut kids) = self.children.lock() {
            for c in kids.iter_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        // Processes started with `sh` may still hold the namespace; kill them first.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        // SAFETY: kill has no memory preconditions.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    if !out.status.success() {
        panic!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Moves the calling thread into the namespace at `path`.
fn join_netns(path: &str) -> io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: the fd is valid for the duration of the call; setns only changes this thread's
    // network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A veth pair `a_if` in `a` and `b_if` in `b`, both up.
///
/// Both ends get GRO on: a frame sent by XDP_TX or XDP_REDIRECT into a veth only reaches the
/// far end when that end has GRO (or an XDP program) on. Checksum and segmentation offloads
/// are off so that every frame on the wire carries a full checksum and fits the MTU, as on a
/// real NIC.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    run_ok(
        Command::new("ip").args([
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ]),
        "ip link add veth",
    );
    for (ns, i) in [(a, a_if), (b, b_if)] {
        ns.sh(&format!(
            "ip link set {i} up && ethtool -K {i} gro on tx off tso off gso off >/dev/null 2>&1 || \
             ethtool -K {i} gro on tx off >/dev/null"
        ));
    }
}

/// Opens a TCP connection to `addr` from inside `ns`.
pub fn connect_in(ns: &Netns, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    ns.enter(move || TcpStream::connect_timeout(&addr, timeout))
}

/// Connects from `ns` to `addr` and returns the label the backend greets with.
pub fn which_backend(ns: &Netns, addr: SocketAddr) -> io::Result<String> {
    let mut s = connect_in(ns, addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut label = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b)? {
            0 => break,
            _ if b[0] == b'\n' => break,
            _ => label.push(b[0]),
        }
    }
    if label.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "no greeting"));
    }
    Ok(String::from_utf8_lossy(&label).into_owned())
}

/// A real TCP server in a namespace: greets every connection with `label\n`, then echoes.
/// Records the peer address of every connection (what the backend sees).
pub struct Backend {
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Backend {
    /// Listens on `addr` inside `ns`.
    pub fn start(ns: &Netns, label: &str, addr: SocketAddr) -> Backend {
        let listener = ns
            .enter(move || {
                let l = TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok::<_, io::Error>(l)
            })
            .unwrap_or_else(|e| panic!("backend {label} bind {addr}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let greeting = format!("{label}\n").into_bytes();
        let thread = {
            let (stop, peers, open, accepted) =
                (stop.clone(), peers.clone(), open.clone(), accepted.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, peer)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            peers.lock().expect("peers").push(peer);
                            let _ = s.set_nonblocking(false);
                            if let Ok(c) = s.try_clone() {
                                open.lock().expect("open").push(c);
                            }
                            let greeting = greeting.clone();
                            std::thread::spawn(move || serve(s, &greeting));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        Backend {
            stop,
            peers,
            open,
            accepted,
            thread: Some(thread),
            addr,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The peer address of every connection accepted so far.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }

    /// The peer address of every connection accepted so far, in order, each with whether its
    /// peer still has it open: a connect-only health check has closed it at once.
    pub fn peers_open(&self) -> Vec<(SocketAddr, bool)> {
        let peers = self.peers();
        let open = self.open.lock().expect("open");
        peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let alive = open.get(i).is_some_and(|s| {
                    let mut b = [0u8; 1];
                    // SAFETY: a one-byte peek into a live buffer on a socket this backend owns.
                    let n = unsafe {
                        libc::recv(
                            std::os::fd::AsRawFd::as_raw_fd(s),
                            b.as_mut_ptr().cast(),
                            1,
                            libc::MSG_PEEK | libc::MSG_DONTWAIT,
                        )
                    };
                    // Data waiting, or nothing yet (EAGAIN): open; 0 (EOF) or an error: closed.
                    n > 0
                        || (n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock)
                });
                (*p, alive)
            })
            .collect()
    }

    /// How many connections it accepted.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listener and every open connection (a backend going away).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        for s in self.open.lock().expect("open").drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(mut s: TcpStream, greeting: &[u8]) {
    if s.write_all(greeting).is_err() {
        return;
    }
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
