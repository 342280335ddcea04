//! The agent under systemd's notify protocol: READY once serving, WATCHDOG while alive,
//! RELOADING/READY around a reload, STOPPING on SIGTERM; and `cargo xtask install` lays out
//! the binary, config and unit.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use nb_tests::{
    netns::unique_suffix,
    require_root,
    topo::{Agent, Topology, Wiring, backend_v4},
};

fn messages(sock: &UnixDatagram, until: impl Fn(&[String]) -> bool) -> Vec<String> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 512];
    while !until(&got) {
        assert!(Instant::now() < deadline, "notifications so far: {got:?}");
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

/// An agent serving a tcp port, started with `NOTIFY_SOCKET` on a socket of the test's, as
/// systemd starts a `Type=notify` service.
fn under_systemd(tag: &str) -> (Topology, Agent, UnixDatagram) {
    let t = Topology::new(tag, Wiring::TwoNic, 1);
    let cfg = t.write_config(&format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\ncheck = \"none\"\n\n\
         [[port.node]]\nlabel = \"b1\"\naddress = \"{}:8080\"\n",
        backend_v4(1)
    ));
    let path = t.dir.join(format!("notify-{}.sock", unique_suffix()));
    let sock = UnixDatagram::bind(&path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let p = path.to_str().expect("utf-8 path").to_string();
    let agent = Agent::start_with_env(&t, &cfg, &[("NOTIFY_SOCKET", p.as_str())]);
    (t, agent, sock)
}

#[test]
fn notifies_systemd_ready_watchdog_reload_and_stop() {
    require_root();
    let (_t, mut agent, sock) = under_systemd("y1");
    let got = messages(&sock, |m| {
        m.iter().any(|s| s.contains("READY=1")) && m.iter().any(|s| s.contains("WATCHDOG=1"))
    });
    assert!(
        agent.log_text().contains("serving"),
        "READY only once serving: {got:?}"
    );
    agent.signal(libc::SIGHUP);
    let got = messages(&sock, |m| {
        m.iter().any(|s| s.contains("RELOADING=1")) && m.iter().any(|s| s.contains("READY=1"))
    });
    assert!(got.iter().any(|s| s.contains("RELOADING=1")), "{got:?}");
    let status = agent.stop().expect("agent was running");
    assert!(status.success(), "SIGTERM exits cleanly: {status}");
    let got = messages(&sock, |m| m.iter().any(|s| s.contains("STOPPING=1")));
    assert!(got.iter().any(|s| s.contains("STOPPING=1")));
}

/// `systemctl kill -s SIGUSR2 nb-agent`: the agent starts its binary with `--upgrade`, which
/// takes its sockets and tells systemd it is the main process now (`MAINPID=`, then
/// `READY=1`); the old one exits without saying STOPPING (the service goes on).
#[test]
fn sigusr2_upgrades_in_place_and_moves_the_main_pid() {
    require_root();
    let (t, mut agent, sock) = under_systemd("y2");
    messages(&sock, |m| m.iter().any(|s| s.contains("READY=1")));
    let old = agent.pid();
    agent.signal(libc::SIGUSR2);
    let got = messages(&sock, |m| {
        let moved = m.iter().position(|s| s.starts_with("MAINPID="));
        moved.is_some_and(|i| m[i..].iter().any(|s| s.contains("READY=1")))
    });
    let new: i32 = got
        .iter()
        .find_map(|s| s.strip_prefix("MAINPID=")?.trim().parse().ok())
        .expect("a MAINPID");
    assert_ne!(new, old as i32, "{got:?}");
    let status = agent.wait_exit(Duration::from_secs(20));
    // The new agent is not this test's child: stopped by hand, whatever happens below.
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // SAFETY: kill has no memory preconditions; the pid is the agent this test started.
            unsafe { libc::kill(self.0, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::path::Path::new(&format!("/proc/{}", self.0)).exists()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let _stop = Stop(new);
    assert!(status.is_some_and(|s| s.success()), "{}", agent.log_text());
    // Whatever else comes in the next seconds: never STOPPING.
    let mut later = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 512];
    while Instant::now() < until {
        if let Ok(n) = sock.recv(&mut buf) {
            later.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let all: Vec<&String> = got.iter().chain(later.iter()).collect();
    assert!(
        !all.iter().any(|s| s.contains("STOPPING=1")),
        "the service did not stop: {all:?}"
    );
    let (code, _) = nb_tests::topo::admin_call(&t, "GET", "/v1/status", None, None);
    // The new agent logs into the old one's log (it inherited its stderr).
    assert_eq!(
        code,
        200,
        "the new agent answers the API:\n{}",
        agent.log_text()
    );
    assert!(
        std::path::Path::new(&format!("/proc/{new}")).exists(),
        "the new agent runs"
    );
}

/// `cargo xtask install --root DIR` puts the binary, a default config and the unit in place,
/// and the installed config passes `nb-agent check`.
#[test]
fn xtask_install_lays_out_binary_config_and_unit() {
    let root = std::env::temp_dir().join(format!("nb-install-{}", unique_suffix()));
    let ws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new("cargo")
        .current_dir(&ws)
        .args(["xtask", "install", "--root"])
        .arg(&root)
        .output()
        .expect("run cargo xtask install");
    assert!(
        out.status.success(),
        "install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root.join("usr/local/bin/nb-agent");
    let nbctl = root.join("usr/local/bin/nbctl");
    let unit = root.join("etc/systemd/system/nb-agent.service");
    let config = root.join("etc/nb/nb.toml");
    for f in [&bin, &nbctl, &unit, &config] {
        assert!(f.exists(), "{} installed", f.display());
    }
    let unit_text = std::fs::read_to_string(&unit).expect("unit");
    assert!(unit_text.contains("Type=notify") && unit_text.contains("WatchdogSec="));
    let check = std::process::Command::new(&bin)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("run installed nb-agent check");
    assert!(
        check.status.success(),
        "installed config is valid: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    let _ = std::fs::remove_dir_all(&root);
}
