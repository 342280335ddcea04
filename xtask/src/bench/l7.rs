//! L7 (README "Benchmarks"): nb's http and https ports vs HAProxy in http mode vs nginx as a
//! reverse proxy, each with the same number of worker threads, the same three nginx backends, and
//! a network of its own (as in the L4 part: leftover TIME_WAIT state distorts later contenders).
//! Per contender: kept-alive HTTP and HTTPS requests/s with p50 and p99, new TLS connections/s
//! (`Connection: close`: every request a new TCP + TLS connection) with full handshakes and with
//! resumed ones, the balancer's CPU during each load, the connections it holds to the backends
//! mid-load, and its memory (RSS of all its processes) at rest and after the loads.
//!
//! The three run at once, each in its network, and take turns: every load is measured in
//! `ROUNDS` short rounds, one contender after the other, and a row averages its rounds (the
//! latencies are the median round's). Background load on a shared machine then weighs on all
//! of them alike, rather than on whichever contender ran while it lasted.
//!
//! wrk resumes TLS sessions: it reuses one `SSL` object per connection slot and `SSL_clear`
//! keeps the last session, so every reconnect offers the ticket it got last time, and all three
//! contenders accept it (checked with nginx's `$ssl_session_reused`: all but the first
//! handshake of each slot were resumed). For full handshakes wrk runs with a small preload
//! that drops the session after `SSL_clear`; the resumed rate is reported beside it.
//!
//! The three configs are as alike as the programs allow:
//! - one ECDSA P-256 certificate for all; TLS 1.2 and 1.3 with the groups X25519, P-256 and
//!   P-384 (what nb's rustls allows and cannot narrow; HAProxy and nginx are given the same),
//!   ALPN h2 and http/1.1. wrk sends no ALPN, so every contender speaks HTTP/1.1 over TLS 1.3
//!   on X25519: the probe line under the table shows what was negotiated.
//! - X-Forwarded-For, -Proto and -Port added by all; no access logs; clients kept alive 10 s
//!   with no limit of requests per connection; up to 64 idle connections kept per backend (nb's
//!   pool, HAProxy `http-reuse always`, nginx `keepalive 64`); round robin.
//!
//! `NB_AGENT_BIN_BASE=path` adds a fourth lane: nb again, running the agent at that path (an
//! earlier build), with the same config. The key numbers then end with this build against
//! that one, measured in the same rounds: the way to tell a change's effect from the
//! machine's noise, which moves whole runs by 10% here.
//!
//! What differs: nginx (open source) has no active health checks, nb and HAProxy connect to
//! every backend each 10 s; nginx's workers are processes beside an idle master (counted in its
//! memory), HAProxy's and nb's are threads; resumption differs (rustls keeps a session cache of
//! 256 and issues single-use tickets naming an entry, OpenSSL issues stateless tickets); nb runs
//! its XDP program on the balancer's interfaces (it passes this traffic to the kernel), so
//! HAProxy and nginx get an empty XDP program there, for the same veth receive path.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nb_tests::topo::{Agent, Topology, VIP, backend_v4};

use super::{
    BACKENDS, Fd, L4Rig, Load, check_interrupt, connectable, cpu_seconds, link_xdp, load_empty_xdp,
    median, nodes_toml, proc_stat, require_tools,
    summary::{self, Key, Target},
    wrk_at,
};

const HTTP: u16 = 80;
const HTTPS: u16 = 443;

/// Rounds each load is measured in, the contenders taking turns, and the seconds of each
/// round. These machines are shared: measured one after the other, each contender met other
/// background load than the next, and the nb/HAProxy ratio of one build moved between 0.77x
/// and 0.99x from run to run. Taking turns spreads that load over all of them.
/// `NB_BENCH_L7_ROUNDS` asks for more: with 3, two contenders doing the same work (a load a
/// change does not touch, against `NB_AGENT_BIN_BASE`) still differed by up to 7%.
const ROUNDS: usize = 3;
const ROUND_SECONDS: u64 = 4;

/// `NB_BENCH_L7_COOKIE=1`: cookie stickiness on nb (`stickiness = "http_cookie"`) and HAProxy
/// (`cookie NB_SRVID insert indirect nocache`), nginx unchanged (open-source nginx has no
/// cookie insertion). wrk sends no cookie, so every answer of nb and HAProxy inserts one: the
/// cost of signing (nb: an HMAC) and of the extra header, on top of the plain proxying.
fn cookie() -> bool {
    std::env::var("NB_BENCH_L7_COOKIE").is_ok_and(|v| v == "1")
}

/// `ROUNDS`, or `NB_BENCH_L7_ROUNDS` when set.
fn rounds() -> Result<usize> {
    match std::env::var("NB_BENCH_L7_ROUNDS") {
        Err(_) => Ok(ROUNDS),
        Ok(v) => match v.parse() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("NB_BENCH_L7_ROUNDS: {v:?} is not a number of rounds (1 or more)"),
        },
    }
}

/// Runs the L7 part with `workers` threads per contender; writes `l7.json` into `out` and
/// returns the key numbers against their targets.
pub fn run(out: &Path, workers: u32) -> Result<Vec<Key>> {
    require_tools(&[
        "wrk", "nginx", "haproxy", "curl", "openssl", "cc", "ethtool", "ip",
    ])?;
    ensure!(workers >= 1, "--workers must be at least 1");
    let rounds = rounds()?;
    println!(
        "== L7: nb's http/https ports vs HAProxy (http mode) vs nginx (proxy), {workers} worker \
         thread(s) each, {rounds} rounds of {ROUND_SECONDS} s per load, taking turns{}",
        if cookie() {
            "; cookie stickiness on nb and HAProxy (a cookie inserted in every answer), none on nginx"
        } else {
            ""
        }
    );
    let files = Files::new()?;
    // All run at once (four with a base build), each in a network of its own; only the one
    // under load is busy.
    let mut lanes = Vec::new();
    let base = std::env::var_os("NB_AGENT_BIN_BASE").map(PathBuf::from);
    let mut contenders = vec![Contender::Nb, Contender::Haproxy, Contender::Nginx];
    if let Some(b) = &base {
        ensure!(b.is_file(), "NB_AGENT_BIN_BASE: no file at {}", b.display());
        contenders.push(Contender::NbBase);
    }
    for c in contenders {
        lanes.push(Lane::start(c, workers, &files, base.as_deref())?);
    }
    for round in 0..rounds {
        for load in LOADS {
            // Who goes first changes from round to round.
            for k in 0..lanes.len() {
                let i = (k + round) % lanes.len();
                lanes[i].measure(load, &files)?;
            }
        }
    }
    let rows: Vec<Row> = lanes.into_iter().map(Lane::finish).collect();
    print_rows(&rows);
    let keys = keys(&rows);
    std::fs::write(out.join("l7.json"), json(&rows, workers, rounds, &keys))?;
    Ok(keys)
}

/// What wrk preloads for full handshakes: `SSL_clear` as OpenSSL has it, then the session
/// dropped, so the next handshake on that `SSL` offers nothing to resume.
const NO_RESUME_C: &str = r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
typedef struct ssl_st SSL;
int SSL_clear(SSL *s) {
    static int (*real_clear)(SSL *);
    static int (*set_session)(SSL *, void *);
    if (!real_clear) {
        real_clear = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_clear");
        set_session = (int (*)(SSL *, void *))dlsym(RTLD_NEXT, "SSL_set_session");
    }
    int r = real_clear(s);
    set_session(s, NULL);
    return r;
}
"#;

/// The run's files, removed after it: the certificate every contender serves (ECDSA P-256,
/// self-signed) and wrk's no-resumption preload.
struct Files {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, as HAProxy wants them.
    pem: PathBuf,
    no_resume: PathBuf,
}

impl Files {
    fn new() -> Result<Files> {
        let dir = std::env::temp_dir().join(format!("nb-bench-l7-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let c = Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            pem: dir.join("cert-and-key.pem"),
            no_resume: dir.join("no-resume.so"),
            dir,
        };
        let src = c.dir.join("no-resume.c");
        std::fs::write(&src, NO_RESUME_C)?;
        let built = Command::new("cc")
            .args(["-shared", "-fPIC", "-O2", "-o"])
            .arg(&c.no_resume)
            .arg(&src)
            .arg("-ldl")
            .status()
            .context("running cc")?;
        ensure!(
            built.success(),
            "cc could not build wrk's no-resumption preload"
        );
        let status = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=bench.nb.test"])
            .args(["-addext", "subjectAltName=DNS:bench.nb.test", "-keyout"])
            .arg(&c.key)
            .arg("-out")
            .arg(&c.cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl req")?;
        ensure!(status.success(), "openssl req could not make a certificate");
        let both = [std::fs::read(&c.cert)?, std::fs::read(&c.key)?].concat();
        std::fs::write(&c.pem, both)?;
        Ok(c)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Clone, Copy)]
enum Contender {
    Nb,
    Haproxy,
    Nginx,
    /// nb, another build (`NB_AGENT_BIN_BASE`).
    NbBase,
}

impl Contender {
    fn name(self) -> &'static str {
        match self {
            Contender::Nb => "nb",
            Contender::Haproxy => "HAProxy (http mode)",
            Contender::Nginx => "nginx (proxy)",
            Contender::NbBase => "nb-base",
        }
    }

    /// The namespace tag of its network.
    fn tag(self) -> &'static str {
        match self {
            Contender::Nb => "7n",
            Contender::Haproxy => "7h",
            Contender::Nginx => "7g",
            Contender::NbBase => "7b",
        }
    }
}

/// A started contender: the process whose tree is measured and what keeps it running.
struct Running {
    pid: u32,
    /// nb's agent (stopped on drop); HAProxy and nginx die with their namespace.
    agent: Option<Agent>,
    /// HAProxy's and nginx's output.
    log: Option<PathBuf>,
    /// The empty XDP program's links on the balancer's interfaces (HAProxy, nginx).
    _links: Vec<Fd>,
}

impl Running {
    fn log_text(&self) -> String {
        match (&self.agent, &self.log) {
            (Some(a), _) => a.log_text(),
            (None, Some(p)) => std::fs::read_to_string(p).unwrap_or_default(),
            (None, None) => String::new(),
        }
    }
}

/// One load's numbers.
struct Measured {
    load: Load,
    /// The balancer's processes' CPU during the load, in cores.
    cpu: f64,
    /// Connections open from the balancer to the backends halfway through the load.
    backend_conns: usize,
}

struct Row {
    name: &'static str,
    /// Protocol, cipher suite, key exchange group and signature the TLS probe negotiated.
    tls: String,
    rss_rest_kb: u64,
    rss_after_kb: u64,
    http: Measured,
    https: Measured,
    /// New connections, full handshakes.
    full_tls: Measured,
    /// New connections, resumed handshakes.
    resumed_tls: Measured,
}

impl Row {
    fn loads(&self) -> [(&'static str, &Measured); 4] {
        [
            ("HTTP kept-alive", &self.http),
            ("HTTPS kept-alive", &self.https),
            ("new TLS, full", &self.full_tls),
            ("new TLS, resumed", &self.resumed_tls),
        ]
    }
}

/// The loads, in the order of `Row::loads`.
#[derive(Clone, Copy)]
enum LoadKind {
    Http,
    Https,
    FullTls,
    ResumedTls,
}

const LOADS: [LoadKind; 4] = [
    LoadKind::Http,
    LoadKind::Https,
    LoadKind::FullTls,
    LoadKind::ResumedTls,
];

/// A contender running in a network of its own, and its measurements so far.
struct Lane {
    name: &'static str,
    tls: String,
    rss_rest_kb: u64,
    /// Per load (by `LOADS` index), one measurement per round.
    rounds: [Vec<Measured>; 4],
    // The contender stops before its network goes (fields drop in declaration order).
    running: Running,
    rig: L4Rig,
}

impl Lane {
    fn start(c: Contender, workers: u32, files: &Files, base: Option<&Path>) -> Result<Lane> {
        check_interrupt()?;
        let rig = L4Rig::new(c.tag())?;
        let running = start(c, &rig.t, workers, files, base)?;
        ready(&rig.t, &running)?;
        Ok(Lane {
            name: c.name(),
            tls: negotiated(&rig.t),
            rss_rest_kb: rss_kb(running.pid),
            rounds: Default::default(),
            running,
            rig,
        })
    }

    fn measure(&mut self, load: LoadKind, files: &Files) -> Result<()> {
        let (t, pid) = (&self.rig.t, self.running.pid);
        let http = format!("http://{VIP}/");
        let https = format!("https://{VIP}/");
        let close = ["-H", "Connection: close"];
        let m = match load {
            LoadKind::Http => measure(t, pid, &http, &[], None)?,
            LoadKind::Https => measure(t, pid, &https, &[], None)?,
            LoadKind::FullTls => measure(t, pid, &https, &close, Some(&files.no_resume))?,
            LoadKind::ResumedTls => measure(t, pid, &https, &close, None)?,
        };
        self.rounds[load as usize].push(m);
        Ok(())
    }

    /// The row of all rounds: requests/s and CPU averaged over them (every round lasts as
    /// long), latencies their median, errors summed.
    fn finish(self) -> Row {
        let rss_after_kb = rss_kb(self.running.pid);
        let [http, https, full_tls, resumed_tls] = self.rounds.map(|r| combine(&r));
        Row {
            name: self.name,
            tls: self.tls,
            rss_rest_kb: self.rss_rest_kb,
            rss_after_kb,
            http,
            https,
            full_tls,
            resumed_tls,
        }
    }
}

fn combine(rounds: &[Measured]) -> Measured {
    let n = rounds.len().max(1) as f64;
    let of = |f: fn(&Measured) -> f64| rounds.iter().map(f).collect::<Vec<_>>();
    Measured {
        load: Load {
            rps: of(|m| m.load.rps).iter().sum::<f64>() / n,
            p50_ms: median(&of(|m| m.load.p50_ms)),
            p99_ms: median(&of(|m| m.load.p99_ms)),
            errors: rounds.iter().map(|m| m.load.errors).sum(),
        },
        cpu: of(|m| m.cpu).iter().sum::<f64>() / n,
        backend_conns: rounds.iter().map(|m| m.backend_conns).max().unwrap_or(0),
    }
}

fn start(
    c: Contender,
    t: &Topology,
    workers: u32,
    files: &Files,
    base: Option<&Path>,
) -> Result<Running> {
    let path = |p: &Path| p.to_str().map(str::to_string).context("non-UTF-8 path");
    let (program, conf, text) = match c {
        Contender::Nb | Contender::NbBase => {
            let cfg = nb_config(t, workers, files)?;
            let agent = match (c, base) {
                (Contender::NbBase, Some(bin)) => Agent::start_bin(t, &cfg, bin),
                _ => Agent::start(t, &cfg),
            };
            return Ok(Running {
                pid: agent.pid(),
                agent: Some(agent),
                log: None,
                _links: Vec::new(),
            });
        }
        Contender::Haproxy => (
            "haproxy",
            t.dir.join("haproxy.cfg"),
            haproxy_config(workers, files),
        ),
        Contender::Nginx => (
            "nginx",
            t.dir.join("proxy-nginx.conf"),
            nginx_config(workers, files, &t.dir),
        ),
    };
    std::fs::write(&conf, text)?;
    let links = empty_xdp_on_balancer(t)?;
    let log = t.dir.join(format!("{program}-proxy.log"));
    let conf = path(&conf)?;
    let args: Vec<&str> = match c {
        Contender::Haproxy => vec!["-db", "-f", &conf],
        _ => vec!["-c", &conf, "-g", "daemon off;"],
    };
    let pid = t.lb.spawn(program, &args, Some(&log));
    Ok(Running {
        pid,
        agent: None,
        log: Some(log),
        _links: links,
    })
}

/// nb: an http and an https port over the three backends, `workers` runtime threads.
fn nb_config(t: &Topology, workers: u32, files: &Files) -> Result<PathBuf> {
    let nodes = nodes_toml();
    let sticky = if cookie() { "http_cookie" } else { "none" };
    let port = |port: u16, protocol: &str, tls: &str| {
        format!(
            "[[port]]\nport = {port}\nprotocol = \"{protocol}\"\nalgorithm = \"roundrobin\"\n\
             stickiness = \"{sticky}\"\ncheck = \"connection\"\ncheck_interval = 10\n{tls}\n{nodes}"
        )
    };
    let tls = format!(
        "ssl_cert = \"{}\"\nssl_key = \"{}\"\n",
        files.cert.display(),
        files.key.display()
    );
    let cfg = t.write_config(&format!(
        "{}{}",
        port(HTTP, "http", ""),
        port(HTTPS, "https", &tls)
    ));
    let text = std::fs::read_to_string(&cfg)?;
    let anchor = "max_flows = 65536\n";
    ensure!(text.contains(anchor), "the balancer table changed: {text}");
    std::fs::write(
        &cfg,
        text.replace(anchor, &format!("{anchor}workers = {workers}\n")),
    )?;
    Ok(cfg)
}

fn haproxy_config(workers: u32, files: &Files) -> String {
    let servers: String = (1..=BACKENDS)
        .map(|i| {
            let c = if cookie() {
                format!(" cookie b{i}")
            } else {
                String::new()
            };
            format!("  server b{i} {}:8080 check inter 10s{c}\n", backend_v4(i))
        })
        .collect();
    let sticky = if cookie() {
        "  cookie NB_SRVID insert indirect nocache\n"
    } else {
        ""
    };
    format!(
        "global\n  nbthread {workers}\n  maxconn 8000\n\n\
         defaults\n  mode http\n  option http-keep-alive\n  http-reuse always\n  \
         option forwardfor\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  \
         timeout http-request 10s\n  timeout http-keep-alive 10s\n\n\
         frontend f\n  bind {VIP}:{HTTP}\n  \
         bind {VIP}:{HTTPS} ssl crt {} alpn h2,http/1.1 ssl-min-ver TLSv1.2 curves X25519:P-256:P-384\n  \
         http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}\n  \
         http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}\n  \
         http-request set-header X-Forwarded-Port %[dst_port]\n  default_backend nodes\n\n\
         backend nodes\n  balance roundrobin\n{sticky}{servers}",
        files.pem.display()
    )
}

fn nginx_config(workers: u32, files: &Files, dir: &Path) -> String {
    let servers: String = (1..=BACKENDS)
        .map(|i| format!("    server {}:8080;\n", backend_v4(i)))
        .collect();
    format!(
        "worker_processes {workers};\npid {0}/proxy-nginx.pid;\nerror_log {0}/proxy-nginx-error.log;\n\
         events {{ worker_connections 8000; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 10s;\n  keepalive_requests 1000000;\n  \
         upstream nodes {{\n{servers}    keepalive 64;\n    keepalive_requests 1000000;\n  }}\n  \
         server {{\n    listen {VIP}:{HTTP};\n    listen {VIP}:{HTTPS} ssl http2;\n    \
         ssl_certificate {1};\n    ssl_certificate_key {2};\n    \
         ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_ecdh_curve X25519:prime256v1:secp384r1;\n    \
         location / {{\n      proxy_pass http://nodes;\n      proxy_http_version 1.1;\n      \
         proxy_set_header Connection \"\";\n      proxy_set_header Host $http_host;\n      \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      \
         proxy_set_header X-Forwarded-Proto $scheme;\n      \
         proxy_set_header X-Forwarded-Port $server_port;\n    }}\n  }}\n}}\n",
        dir.display(),
        files.cert.display(),
        files.key.display()
    )
}

/// An empty XDP program on the balancer's two interfaces, where nb has its own.
fn empty_xdp_on_balancer(t: &Topology) -> Result<Vec<Fd>> {
    let mut links = Vec::new();
    for ifname in ["pub0", "priv0"] {
        let ifindex: u32 =
            t.lb.sh(&format!("cat /sys/class/net/{ifname}/ifindex"))
                .trim()
                .parse()
                .with_context(|| format!("{ifname} ifindex"))?;
        let (prog, link) = t.lb.enter(move || -> std::io::Result<(Fd, Fd)> {
            let p = load_empty_xdp()?;
            let l = link_xdp(&p, ifindex)?;
            Ok((p, l))
        })?;
        links.extend([prog, link]);
    }
    Ok(links)
}

/// Waits until the client gets a 200 over http and over https (the one request before the
/// memory at rest is read).
fn ready(t: &Topology, running: &Running) -> Result<()> {
    for port in [HTTP, HTTPS] {
        connectable(t, port).with_context(|| format!("log:\n{}", running.log_text()))?;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        check_interrupt()?;
        let codes = t.client.sh(&format!(
            "curl -sk -o /dev/null -o /dev/null --max-time 2 -w '%{{http_code}} ' \
             http://{VIP}/ https://{VIP}/ || true"
        ));
        if codes.trim() == "200 200" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no 200 over http and https after 20 s (got '{}'); log:\n{}",
                codes.trim(),
                running.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What a TLS client like wrk's (OpenSSL, no ALPN, no resumption) negotiates.
fn negotiated(t: &Topology) -> String {
    let out = t.client.sh(&format!(
        "openssl s_client -connect {VIP}:{HTTPS} -brief </dev/null 2>&1 || true"
    ));
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    format!(
        "{} {} {} {}",
        field("Protocol version:"),
        field("Ciphersuite:"),
        field("Server Temp Key:"),
        field("Signature type:")
    )
}

/// wrk to `url` while the balancer's CPU is counted and, halfway through, its connections to
/// the backends (a working keep-alive pool holds about as many as the client has, not more).
fn measure(
    t: &Topology,
    pid: u32,
    url: &str,
    extra: &[&str],
    preload: Option<&Path>,
) -> Result<Measured> {
    let (cpu0, t0) = (tree_cpu(pid), Instant::now());
    let (load, backend_conns) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(ROUND_SECONDS) / 2);
            t.backends
                .sh("ss -tn state established '( sport = :8080 )' | tail -n +2 | wc -l")
                .trim()
                .parse::<usize>()
                .unwrap_or(0)
        });
        let load = wrk_at(&t.client, url, extra, preload, ROUND_SECONDS);
        (load, sampler.join().unwrap_or(0))
    });
    let cpu = (tree_cpu(pid) - cpu0) / t0.elapsed().as_secs_f64();
    Ok(Measured {
        load: load?,
        cpu,
        backend_conns,
    })
}

/// `root` and every process descended from it (nginx's workers under its master).
fn process_tree(root: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, proc_stat(pid)?.get(1)?.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut tree = vec![root];
    let mut i = 0;
    while let Some(&p) = tree.get(i) {
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree
}

/// Resident memory of the whole process tree, in kB.
fn rss_kb(root: u32) -> u64 {
    process_tree(root)
        .into_iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// CPU seconds used so far by the whole process tree.
fn tree_cpu(root: u32) -> f64 {
    process_tree(root).into_iter().filter_map(cpu_seconds).sum()
}

/// Requests per second of balancer CPU: on two shared cores the client is often the limit,
/// and this shows the balancer's own cost.
fn per_cpu(m: &Measured) -> f64 {
    m.load.rps / m.cpu.max(1e-9)
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn print_rows(rows: &[Row]) {
    println!(
        "   {:<20} {:<17} {:>8} {:>7} {:>7} {:>6} {:>7} {:>9} {:>8}",
        "balancer",
        "load",
        "req/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "LB CPU",
        "req/CPU-s",
        "bk conns"
    );
    for r in rows {
        for (i, (load, m)) in r.loads().into_iter().enumerate() {
            println!(
                "   {:<20} {:<17} {:>8.0} {:>7.2} {:>7.2} {:>6} {:>6.0}% {:>9.0} {:>8}",
                if i == 0 { r.name } else { "" },
                load,
                m.load.rps,
                m.load.p50_ms,
                m.load.p99_ms,
                m.load.errors,
                m.cpu * 100.0,
                per_cpu(m),
                m.backend_conns
            );
        }
    }
    for r in rows {
        println!(
            "   {:<20} RSS {:.1} MB at rest, {:.1} MB after the loads; TLS: {}",
            r.name,
            mb(r.rss_rest_kb),
            mb(r.rss_after_kb),
            r.tls
        );
    }
    if rows
        .iter()
        .any(|r| r.loads().iter().any(|(_, m)| m.load.errors > 0))
    {
        println!("   note: wrk saw errors or non-2xx answers (see target/bench/l7.json)");
    }
}

/// nb / HAProxy with the targets set for them; nb / nginx beside them, reported only.
fn keys(rows: &[Row]) -> Vec<Key> {
    let (nb, haproxy, nginx) = (&rows[0], &rows[1], &rows[2]);
    type Pick = fn(&Row) -> f64;
    let vs_haproxy: [(&str, Pick, Target); 9] = [
        (
            "HTTP kept-alive req/s",
            |r| r.http.load.rps,
            Target::AtLeast(1.0),
        ),
        (
            "HTTP kept-alive p99 ms",
            |r| r.http.load.p99_ms,
            Target::AtMost(1.0),
        ),
        (
            "HTTPS kept-alive req/s",
            |r| r.https.load.rps,
            Target::AtLeast(1.0),
        ),
        (
            "HTTPS kept-alive p99 ms",
            |r| r.https.load.p99_ms,
            Target::None,
        ),
        (
            "new TLS, full handshakes/s",
            |r| r.full_tls.load.rps,
            Target::AtLeast(0.8),
        ),
        (
            "new TLS, resumed handshakes/s",
            |r| r.resumed_tls.load.rps,
            Target::None,
        ),
        (
            "HTTP req per LB CPU-second",
            |r| per_cpu(&r.http),
            Target::None,
        ),
        (
            "HTTPS req per LB CPU-second",
            |r| per_cpu(&r.https),
            Target::None,
        ),
        (
            "full handshakes per LB CPU-second",
            |r| per_cpu(&r.full_tls),
            Target::None,
        ),
    ];
    let key = |what: &str, other: &Row, f: Pick, target| Key {
        part: "l7",
        what: format!("{what} vs {}", other.name.split(' ').next().unwrap_or("")),
        nb: f(nb),
        other: Some(f(other)),
        target,
        assumed: false,
    };
    let mut keys: Vec<Key> = vs_haproxy
        .iter()
        .map(|&(what, f, target)| key(what, haproxy, f, target))
        .collect();
    // Against nginx: the four headline numbers, no targets.
    keys.extend(
        [0, 1, 2, 4]
            .map(|i| vs_haproxy[i])
            .map(|(what, f, _)| key(what, nginx, f, Target::None)),
    );
    // Against the base build, when there is one: the same numbers, no targets.
    if let Some(base) = rows.get(3) {
        keys.extend(
            [0, 1, 2, 4, 6]
                .map(|i| vs_haproxy[i])
                .map(|(what, f, _)| key(what, base, f, Target::None)),
        );
    }
    keys.push(Key {
        part: "l7",
        what: "nb RSS at rest, MB".into(),
        nb: mb(nb.rss_rest_kb),
        other: None,
        target: Target::Below(30.0),
        assumed: false,
    });
    keys
}

fn json(rows: &[Row], workers: u32, rounds: usize, keys: &[Key]) -> String {
    let rows: Vec<String> = rows
        .iter()
        .map(|r| {
            let loads: Vec<String> = r
                .loads()
                .iter()
                .map(|(name, m)| {
                    format!(
                        "{{\"load\": \"{name}\", \"rps\": {:.0}, \"p50_ms\": {:.3}, \
                         \"p99_ms\": {:.3}, \"errors\": {}, \"balancer_cpu\": {:.3}, \
                         \"backend_conns\": {}}}",
                        m.load.rps,
                        m.load.p50_ms,
                        m.load.p99_ms,
                        m.load.errors,
                        m.cpu,
                        m.backend_conns
                    )
                })
                .collect();
            format!(
                "    {{\"balancer\": \"{}\", \"tls\": \"{}\", \"rss_rest_kb\": {}, \
                 \"rss_after_kb\": {}, \"loads\": [\n      {}\n    ]}}",
                r.name,
                r.tls,
                r.rss_rest_kb,
                r.rss_after_kb,
                loads.join(",\n      ")
            )
        })
        .collect();
    let mut s = String::new();
    let _ = write!(
        s,
        "{{\n  \"rounds\": {rounds},\n  \"seconds_per_round\": {ROUND_SECONDS},\n  \"workers\": {workers},\n  \"cookie\": {},\n  \"rows\": [\n{}\n  ],\n  \
         \"keys\": {}\n}}\n",
        cookie(),
        rows.join(",\n"),
        summary::json(keys)
    );
    s
}
