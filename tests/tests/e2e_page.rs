//! End to end: the status page at `/` on the admin listener (README "Status page"), rendered
//! by a real browser (headless Chromium) in the balancer's namespace: it lists every node with
//! its status, a node taken DOWN shows DOWN at the next refresh, and its graphs have points
//! once traffic has flowed.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use nb_tests::{
    netns::{Backend, which_backend},
    require_root,
    topo::{Agent, Topology, Wiring, backend_v4, vip, wait_connectable, wait_log},
};

fn backend_addr(i: u8) -> SocketAddr {
    SocketAddr::new(backend_v4(i).into(), 8080)
}

fn browser() -> &'static str {
    for b in ["chromium-headless-shell", "chromium"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if found {
            return b;
        }
    }
    panic!("no headless Chromium: apt-get install chromium-headless-shell");
}

/// The page's DOM after its script ran for `budget_ms` of virtual time (a few refreshes),
/// up to the script (whose text would match what is looked for).
fn render(t: &Topology, url: &str, budget_ms: u32) -> String {
    let profile = t
        .dir
        .join(format!("chromium-{}", nb_tests::netns::unique_suffix()));
    let dom = t.lb.sh(&format!(
        "{} --headless --no-sandbox --disable-gpu --user-data-dir={} \
         --virtual-time-budget={budget_ms} --dump-dom '{url}' 2>/dev/null",
        browser(),
        profile.display()
    ));
    dom.split("<script>").next().unwrap_or_default().to_string()
}

/// Status cells of the node rows: (label, status) in page order.
fn statuses(dom: &str) -> Vec<(String, String)> {
    dom.split("<tr class=\"node\" data-node=\"")
        .skip(1)
        .filter_map(|row| {
            let label = row.split('"').next()?.to_string();
            let status = row.split("class=\"status ").nth(1)?.split('"').next()?;
            Some((label, status.to_string()))
        })
        .collect()
}

/// The point counts of every graph's lines.
fn points(dom: &str) -> Vec<usize> {
    dom.split("data-points=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next()?.parse().ok())
        .collect()
}

/// The highest point of any line (smallest y; the zero line is at y = 102).
fn highest(dom: &str) -> f64 {
    dom.split(" points=\"")
        .skip(1)
        .filter_map(|s| s.split('"').next())
        .flat_map(|pts| {
            pts.split(' ')
                .filter_map(|p| p.split(',').nth(1)?.parse::<f64>().ok())
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn the_status_page_shows_every_node_its_status_and_graphs() {
    require_root();
    let t = Topology::new("pg", Wiring::OneNic, 2);
    let mut backends: Vec<Backend> = (1..=2)
        .map(|i| Backend::start(&t.backends, &format!("b{i}"), backend_addr(i)))
        .collect();
    let nodes: String = (1..=2)
        .map(|i| {
            format!(
                "[[port.node]]\nlabel = \"b{i}\"\naddress = \"{}\"\n\n",
                backend_addr(i)
            )
        })
        .collect();
    let cfg = t.write_config(&format!(
        "[[port]]\nport = 80\nprotocol = \"tcp\"\ncheck = \"connection\"\ncheck_interval = 2\n\
         check_timeout = 1\ncheck_attempts = 1\n\n{nodes}"
    ));
    let agent = Agent::start(&t, &cfg);
    wait_log(&agent, "UP", 2, Duration::from_secs(10));
    wait_connectable(&t.client, vip(80), Duration::from_secs(10));
    for _ in 0..20 {
        which_backend(&t.client, vip(80)).expect("a connection through nb");
    }
    let url = format!("http://{}/", t.admin);
    // The second sample of the hour's ring (10 s after the first, taken at start) holds the
    // traffic.
    let deadline = Instant::now() + Duration::from_secs(20);
    while t
        .lb
        .sh(&format!("curl -sS {url}v1/history"))
        .matches("\"t\":")
        .count()
        < 3
    {
        assert!(Instant::now() < deadline, "no second sample in /v1/history");
        std::thread::sleep(Duration::from_millis(500));
    }
    // The page itself: plain HTML whose every fetch is a path on this listener.
    let source = t.lb.sh(&format!("curl -sS {url}"));
    assert!(source.contains("<script>"), "{source}");
    for outside in ["http://", "https://", "src=", "href=", "@import", "url("] {
        assert!(
            !source.contains(outside),
            "the page refers outside the admin listener ({outside}):\n{source}"
        );
    }
    let start = Instant::now();
    let dom = render(&t, &url, 9000);
    println!("rendered in {:?}", start.elapsed());
    assert_eq!(
        statuses(&dom),
        [
            ("b1".to_string(), "UP".to_string()),
            ("b2".into(), "UP".into())
        ],
        "{dom}"
    );
    let counts = points(&dom);
    assert_eq!(counts.len(), 8, "4 graphs of 2 nodes: {dom}");
    assert!(
        counts.iter().any(|&n| n > 0),
        "the graphs have points after traffic: {counts:?}\n{dom}"
    );
    assert!(
        highest(&dom) < 100.0,
        "a graph shows the traffic above its zero line: {dom}"
    );
    // b2 dies: DOWN at its next check, and on the page at its next refresh.
    backends[1].stop();
    wait_log(&agent, "DOWN", 1, Duration::from_secs(10));
    let dom = render(&t, &url, 3000);
    assert_eq!(
        statuses(&dom),
        [
            ("b1".to_string(), "UP".to_string()),
            ("b2".into(), "DOWN".into())
        ],
        "{dom}"
    );
    assert!(dom.contains("1 of 2 node(s) UP"), "{dom}");
}
