//! End to end: a zero-downtime upgrade (README "Upgrading without dropping a connection").
//! `nb-agent run --upgrade` takes the running agent's listening sockets while a client opens
//! new HTTP connections as fast as it can and one slow request is in flight: no connection is
//! refused or reset, every answer is a 200, the slow request completes through the old agent,
//! and the old agent exits once it has.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nb_tests::{
    require_root,
    topo::{Agent, Topology, Wiring, backend_v4, vip, wait_connectable, wait_log},
};

/// A plain HTTP/1.1 server in the backend namespace: `GET /slow` answers after 3 s, anything
/// else at once; every answer closes its connection.
fn http_server(t: &Topology, addr: SocketAddr) {
    let l = t
        .backends
        .enter(move || TcpListener::bind(addr))
        .expect("bind the backend");
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /slow") {
                    std::thread::sleep(Duration::from_secs(3));
                }
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                );
            });
        }
    });
}

/// One request on a new connection: the status line, or why there was none.
fn get(path: &str) -> Result<String, String> {
    let mut s =
        TcpStream::connect_timeout(&vip(80), Duration::from_secs(3)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: nb\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or("").to_string())
}

#[test]
fn an_upgrade_refuses_no_connection_and_finishes_the_request_in_flight() {
    require_root();
    let t = Topology::new("hv", Wiring::OneNic, 1);
    let backend = SocketAddr::new(backend_v4(1).into(), 8080);
    http_server(&t, backend);
    let ck = rcgen::generate_simple_self_signed(vec!["nb.test".to_string()]).expect("rcgen");
    let (cert, key) = (t.dir.join("nb.crt"), t.dir.join("nb.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("key");
    let node = format!("\n[[port.node]]\nlabel = \"b1\"\naddress = \"{backend}\"\n\n");
    let cfg = t.write_config(&format!(
        "[[port]]\nport = 80\nprotocol = \"http\"\ncheck = \"connection\"\ncheck_interval = 2\n\
         check_timeout = 1\n{node}\
         [[port]]\nport = 443\nprotocol = \"https\"\ncheck = \"connection\"\n\
         check_interval = 2\ncheck_timeout = 1\nssl_cert = \"{}\"\nssl_key = \"{}\"\n{node}",
        cert.display(),
        key.display()
    ));
    let mut old = Agent::start(&t, &cfg);
    wait_log(&old, "UP", 2, Duration::from_secs(10));
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));

    // New connections at full speed from the client, for as long as the upgrade takes.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, ok) = (stop.clone(), ok.clone());
        let client = t.client.name().to_string();
        std::thread::spawn(move || {
            nb_tests::netns::Netns::join(&client);
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get("/") {
                    Ok(l) if l.starts_with("HTTP/1.1 200") => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(l) => failures.push(format!("answer {l:?}")),
                    Err(e) => failures.push(e),
                }
            }
            failures
        })
    };
    // New HTTPS connections too, one curl after the other (each a full TLS handshake).
    let stop_file = t.dir.join("stop-https");
    let https = {
        let client = t.client.name().to_string();
        let stop_file = stop_file.clone();
        std::thread::spawn(move || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", &client, "sh", "-c"])
                .arg(format!(
                    "while [ ! -e {} ]; do curl -sk -o /dev/null -m 10 -w '%{{http_code}}\\n' \
                     https://{}/; done",
                    stop_file.display(),
                    vip(443)
                ))
                .output()
                .expect("curl loop");
            String::from_utf8_lossy(&out.stdout).to_string()
        })
    };
    let slow = {
        let client = t.client.name().to_string();
        std::thread::spawn(move || {
            nb_tests::netns::Netns::join(&client);
            let start = Instant::now();
            (get("/slow"), start.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = ok.load(Ordering::Relaxed);
    let started = Instant::now();
    let new = Agent::start_upgrade(&t, &cfg);
    wait_log(
        &new,
        "upgrade: told the old agent",
        1,
        Duration::from_secs(10),
    );
    let took = started.elapsed();
    let status = old.wait_exit(Duration::from_secs(20));
    let old_done = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    std::fs::write(&stop_file, "").expect("stop the https loop");
    let failures = load.join().expect("load thread");
    let codes = https.join().expect("https loop");
    let tls_ok = codes.lines().filter(|l| *l == "200").count();
    let tls_bad: Vec<&str> = codes.lines().filter(|l| *l != "200").collect();
    println!(
        "https: {tls_ok} new TLS connections answered 200, {} not",
        tls_bad.len()
    );
    assert!(tls_bad.is_empty(), "https answers: {tls_bad:?}");
    assert!(
        tls_ok > 5,
        "the https loop ran through the upgrade: {codes:?}"
    );
    let (slow_answer, slow_took) = slow.join().expect("slow request");
    let served = ok.load(Ordering::Relaxed);
    println!(
        "upgrade: the new agent served {took:?} after it started; the old one exited {old_done:?} \
         after ({status:?}); {served} requests on new connections ({} during the upgrade), {} \
         failed; the slow request: {slow_answer:?} in {slow_took:?}",
        served - before,
        failures.len()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "the old agent exited cleanly:\n{}",
        old.log_text()
    );
    assert!(
        failures.is_empty(),
        "failed connections: {failures:?}\n{}",
        old.log_text()
    );
    assert!(served - before > 50, "the load ran through the upgrade");
    assert_eq!(
        slow_answer.as_deref(),
        Ok("HTTP/1.1 200 OK"),
        "{}",
        old.log_text()
    );
    // The new agent serves the admin API on the same address, and nothing was withdrawn.
    let status = nb_tests::topo::admin_call(&t, "GET", "/v1/status", None, None);
    assert_eq!(status.0, 200, "{status:?}");
    assert!(
        new.log_text()
            .contains("taken over from the agent upgraded"),
        "{}",
        new.log_text()
    );
    // The new agent carries on alone.
    assert_eq!(get_in(&t, "/"), "HTTP/1.1 200 OK");
}

fn get_in(t: &Topology, path: &'static str) -> String {
    t.client
        .enter(move || get(path))
        .expect("request after the upgrade")
}
