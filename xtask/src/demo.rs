//! `cargo xtask demo`: nb in front of three backends in a network of namespaces, with traffic,
//! a backend failing and coming back. Every step is checked; the network is torn down at the
//! end, on failure and on Ctrl-C.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use nb_tests::{
    netns::{Backend, which_backend},
    topo::{Agent, Topology, Wiring, backend_v4, vip, wait_connectable},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: tearing the demo network down");
    }
    Ok(())
}

const CONNECTIONS: usize = 30;
const INTERVAL: u64 = 2;
const ATTEMPTS: u64 = 2;

pub fn run(agent_bin: &std::path::Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the demo needs root (XDP, network namespaces)"
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_sigint as *const () as libc::sighandler_t);
    }
    // SAFETY: set before any thread that reads the environment is started.
    unsafe { std::env::set_var("NB_AGENT_BIN", agent_bin) };

    println!("== building a test network: client, balancer (two NICs), 3 backends");
    let t = Topology::new("demo", Wiring::TwoNic, 3);
    let mut backends: Vec<Backend> = (1..=3).map(|i| start_backend(&t, i)).collect::<Vec<_>>();
    let nodes: String = (1..=3)
        .map(|i| {
            format!(
                "[[port.node]]\nlabel = \"b{i}\"\naddress = \"{}:8080\"\n\n",
                backend_v4(i)
            )
        })
        .collect();
    let http_nodes: String = (1..=3)
        .map(|i| {
            format!(
                "[[port.node]]\nlabel = \"w{i}\"\naddress = \"{}:8081\"\n\n",
                backend_v4(i)
            )
        })
        .collect();
    let tls = DemoTls::create(&t.dir)?;
    let config = t.write_config(&format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\nalgorithm = \"roundrobin\"\n\
         check = \"connection\"\ncheck_interval = {INTERVAL}\ncheck_timeout = 1\n\
         check_attempts = {ATTEMPTS}\n\n{nodes}\
         [[port]]\nport = 8000\nprotocol = \"http\"\nalgorithm = \"roundrobin\"\n\
         stickiness = \"http_cookie\"\ncheck = \"http\"\ncheck_interval = {INTERVAL}\n\
         check_timeout = 1\ncheck_attempts = {ATTEMPTS}\n\n{http_nodes}\
         [[port]]\nport = 8443\nprotocol = \"https\"\nalgorithm = \"roundrobin\"\n\
         stickiness = \"http_cookie\"\ncheck = \"http\"\ncheck_interval = {INTERVAL}\n\
         check_timeout = 1\ncheck_attempts = {ATTEMPTS}\nssl_cert = \"{}\"\nssl_key = \"{}\"\n\n{}",
        tls.cert_path.display(),
        tls.key_path.display(),
        http_nodes.replace("label = \"w", "label = \"s")
    ));
    let token = "demo-token";
    std::fs::write(t.dir.join("admin.token"), token)?;
    let _web: Vec<WebBackend> = (1..=3u8)
        .map(|i| WebBackend::start(&t, i))
        .collect::<Result<_>>()?;
    println!("   config: {}", config.display());
    println!("== starting nb-agent on the balancer (XDP on pub0 and priv0)");
    let agent = Agent::start(&t, &config);
    for line in agent
        .log_text()
        .lines()
        .filter(|l| l.contains("XDP attached"))
    {
        println!("   {line}");
    }
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    wait_log(&agent, "node b3 is UP", Duration::from_secs(15))?;
    println!("   all three nodes UP");

    println!(
        "== {CONNECTIONS} new connections from the client to {}",
        vip(80)
    );
    let seen = spread(&t, vip(80))?;
    print_spread(&seen);
    ensure!(
        seen.len() == 3,
        "expected every backend to get connections: {seen:?}"
    );
    for b in &backends {
        for p in b.peers() {
            ensure!(
                p.ip() == std::net::IpAddr::from(nb_tests::topo::LB_PRIVATE),
                "backend saw {p}, not the balancer's private address"
            );
        }
    }
    println!("   backends see the balancer's private address 198.19.0.1 (full NAT)");

    println!("== taking backend b2 down (its server stops)");
    let down_at = Instant::now();
    backends[1].stop();
    wait_log(
        &agent,
        "node b2 is DOWN",
        Duration::from_secs(INTERVAL * (ATTEMPTS + 2)),
    )?;
    println!(
        "   nb marked b2 DOWN after {:.1} s (check_interval {INTERVAL} s x {ATTEMPTS} attempts)",
        down_at.elapsed().as_secs_f64()
    );
    let seen = spread(&t, vip(80))?;
    print_spread(&seen);
    ensure!(
        !seen.contains_key("b2") && seen.len() == 2,
        "traffic must move off b2: {seen:?}"
    );
    println!("   every new connection went to b1 and b3; none failed");

    println!("== restoring backend b2");
    backends[1] = start_backend(&t, 2);
    // The second time: the first was its start-up transition from unknown.
    wait_log_n(
        &agent,
        "node b2 is UP",
        2,
        Duration::from_secs(INTERVAL * (ATTEMPTS + 2)),
    )?;
    let seen = spread(&t, vip(80))?;
    print_spread(&seen);
    ensure!(seen.len() == 3, "b2 must get traffic again: {seen:?}");
    println!("   b2 is UP and takes its share again");

    println!("== http port 8000 with cookie stickiness (NB_SRVID)");
    let (first, cookie) = http_get(&t, None)?;
    let cookie = cookie.ok_or_else(|| anyhow::anyhow!("no NB_SRVID cookie set"))?;
    println!("   first request answered by {first}; cookie {cookie}");
    for _ in 0..20 {
        check_interrupt()?;
        let (who, _) = http_get(&t, Some(&cookie))?;
        ensure!(who == first, "sticky request went to {who}, not {first}");
    }
    println!("   20 more requests with the cookie: all answered by {first}");
    let mut fresh = BTreeMap::new();
    for _ in 0..15 {
        let (who, _) = http_get(&t, None)?;
        *fresh.entry(who).or_insert(0usize) += 1;
    }
    print_spread(&fresh);
    ensure!(
        fresh.len() == 3,
        "new clients spread over the nodes: {fresh:?}"
    );
    println!("   clients without a cookie are spread over all three nodes");

    println!("== https port 8443: TLS ends at nb, cookie stickiness as on http");
    let (first, cookie, info) = https_get(&t, &tls, None)?;
    let cookie = cookie.ok_or_else(|| anyhow::anyhow!("no NB_SRVID cookie set over https"))?;
    println!("   {info}; first request answered by {first}");
    println!("   Set-Cookie: {cookie}");
    ensure!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "the https cookie must be Secure and HttpOnly: {cookie}"
    );
    let pair = cookie.split(';').next().unwrap_or_default().to_string();
    for _ in 0..10 {
        check_interrupt()?;
        let (who, _, _) = https_get(&t, &tls, Some(&pair))?;
        ensure!(
            who == first,
            "sticky https request went to {who}, not {first}"
        );
    }
    println!("   10 more requests with the cookie: all answered by {first}");

    // ACTIVE for tcp ports is bumped by XDP on each new flow and recounted by the agent's
    // sweep every 2 s: wait for one so closed demo connections no longer count.
    std::thread::sleep(Duration::from_millis(2500));
    println!("== nbctl status (the admin API)");
    let nbctl = agent_bin.with_file_name("nbctl");
    let out =
        t.lb.command(&nbctl)
            .arg("--config")
            .arg(&config)
            .arg("status")
            .output()?;
    ensure!(
        out.status.success(),
        "nbctl status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("   {line}");
    }

    println!("== tearing the network down");
    drop(agent);
    drop(backends);
    drop(t);
    println!("demo OK");
    Ok(())
}

fn start_backend(t: &Topology, i: u8) -> Backend {
    Backend::start(
        &t.backends,
        &format!("b{i}"),
        SocketAddr::new(backend_v4(i).into(), 8080),
    )
}

fn spread(t: &Topology, addr: SocketAddr) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for _ in 0..CONNECTIONS {
        check_interrupt()?;
        let label = which_backend(&t.client, addr)
            .map_err(|e| anyhow::anyhow!("a connection to {addr} failed: {e}"))?;
        *seen.entry(label).or_default() += 1;
    }
    Ok(seen)
}

fn print_spread(seen: &BTreeMap<String, usize>) {
    for (label, n) in seen {
        println!("   {label:>3} {n:>3} {}", "#".repeat(*n));
    }
}

/// Waits until the agent's log holds `needle` at least `times` times.
fn wait_log_n(agent: &Agent, needle: &str, times: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while agent.log_text().matches(needle).count() < times {
        check_interrupt()?;
        if Instant::now() > deadline {
            bail!(
                "nb-agent did not log \"{needle}\" within {timeout:?}:\n{}",
                agent.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_log(agent: &Agent, needle: &str, timeout: Duration) -> Result<()> {
    wait_log_n(agent, needle, 1, timeout)
}

/// A small real HTTP/1.1 server on a backend address, answering every request with its label.
struct WebBackend {
    stop: std::sync::Arc<AtomicBool>,
}

impl WebBackend {
    fn start(t: &Topology, i: u8) -> Result<WebBackend> {
        let addr = SocketAddr::new(backend_v4(i).into(), 8081);
        let listener = t
            .backends
            .enter(move || -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            })?;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let label = format!("w{i}");
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let label = label.clone();
                        std::thread::spawn(move || serve_http(s, &label));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(WebBackend { stop })
    }
}

impl Drop for WebBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers requests on one kept-alive connection until the peer closes it.
fn serve_http(s: std::net::TcpStream, label: &str) {
    use std::io::{BufRead, BufReader, Write};
    let _ = s.set_nonblocking(false);
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        let mut close = false;
        let mut first = true;
        // Request line and headers up to the blank line; GETs carry no body.
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {
                    let l = line.to_ascii_lowercase();
                    if (first && l.trim_end().ends_with("http/1.0"))
                        || l.starts_with("connection: close")
                    {
                        close = true;
                    }
                    first = false;
                }
            }
        }
        let body = format!("{label}\n");
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if w.write_all(resp.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// One GET / to the http port from the client, with `cookie` if given: (the node that
/// answered, the NB_SRVID cookie the balancer set, if any).
fn http_get(t: &Topology, cookie: Option<&str>) -> Result<(String, Option<String>)> {
    let mut s = demo_connect(t, 8000)?;
    let (who, set) = exchange(&mut s, cookie)?;
    Ok((
        who,
        set.map(|c| c.split(';').next().unwrap_or_default().trim().to_string()),
    ))
}

/// A TCP connection from the client namespace to the balancer's public address.
fn demo_connect(t: &Topology, port: u16) -> Result<std::net::TcpStream> {
    let addr = SocketAddr::new(nb_tests::topo::VIP.into(), port);
    let s = nb_tests::netns::connect_in(&t.client, addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Sends one `GET /` with `Connection: close` and reads the answer: (the body, i.e. the node
/// that answered; the whole NB_SRVID Set-Cookie value, attributes included, if any).
fn exchange(
    s: &mut (impl std::io::Read + std::io::Write),
    cookie: Option<&str>,
) -> Result<(String, Option<String>)> {
    let cookie_line = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {DEMO_HOST}\r\n{cookie_line}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed answer: {text:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "answer: {head}");
    let set = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        if !name.eq_ignore_ascii_case("set-cookie") {
            return None;
        }
        let value = value.trim();
        value.starts_with("NB_SRVID=").then(|| value.to_string())
    });
    Ok((body.trim().to_string(), set))
}

/// The https port's certificate, made for the demo, and a client configuration that trusts
/// exactly that certificate (so the demo checks the chain and the name like a browser would).
struct DemoTls {
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
    client: std::sync::Arc<rustls::ClientConfig>,
}

/// The name the demo's certificate is issued for and the client asks for by SNI.
const DEMO_HOST: &str = "demo.nb.test";

impl DemoTls {
    fn create(dir: &std::path::Path) -> Result<DemoTls> {
        let ck = rcgen::generate_simple_self_signed(vec![DEMO_HOST.to_string()])?;
        let cert_path = dir.join("demo.crt");
        let key_path = dir.join("demo.key");
        std::fs::write(&cert_path, ck.cert.pem())?;
        std::fs::write(&key_path, ck.signing_key.serialize_pem())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone())?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(DemoTls {
            cert_path,
            key_path,
            client: std::sync::Arc::new(client),
        })
    }
}

/// One GET / over TLS to the https port: (node that answered, the NB_SRVID Set-Cookie value
/// with its attributes, the negotiated TLS version and cipher suite).
fn https_get(
    t: &Topology,
    tls: &DemoTls,
    cookie: Option<&str>,
) -> Result<(String, Option<String>, String)> {
    let name = rustls_pki_types::ServerName::try_from(DEMO_HOST)?;
    let conn = rustls::ClientConnection::new(tls.client.clone(), name)?;
    let mut s = rustls::StreamOwned::new(conn, demo_connect(t, 8443)?);
    let (who, set) = exchange(&mut s, cookie)?;
    let info = format!(
        "{:?} {:?}",
        s.conn
            .protocol_version()
            .ok_or_else(|| anyhow::anyhow!("no TLS version"))?,
        s.conn
            .negotiated_cipher_suite()
            .map(|c| c.suite())
            .ok_or_else(|| anyhow::anyhow!("no cipher suite"))?
    );
    Ok((who, set, info))
}
