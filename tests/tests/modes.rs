//! Every uWSGI serving mode: N requests in, N records out, every field right.

use std::time::Duration;

use observer_tests::*;
use serde_json::Value;

const SW8: &str = "1-MWY2YjE5YjY5ZGE2-MWY2YjE5YjY5ZGE3-3-c2hvcA==-c2hvcC0x-L2NoZWNrb3V0-MTAuMC4wLjE6ODA=";
const SW8_CORR: &str = "a2V5:dmFs";
const SW8_X: &str = "1-1700000000000";
const SECRET: &str = "secret-token-do-not-keep";

struct Expect {
    method: &'static str,
    path: &'static str,
    query: &'static str,
    status: u16,
    host: Option<&'static str>,
    reply: Reply,
    sw8: bool,
}

fn body_file() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("observer-body-{}", std::process::id()));
    std::fs::write(&p, vec![b'x'; 100 * 1024]).unwrap();
    p
}

/// Sends the standard request set through `base` (an http://host:port) and returns what
/// each should look like once observed.
fn send_standard(base: &str) -> Vec<Expect> {
    let body = body_file();
    let body_arg = format!("@{}", body.display());
    let auth = format!("Authorization: Bearer {SECRET}");
    let cookie = format!("Cookie: session={SECRET}");
    let sw8h = format!("sw8: {SW8}");
    let corrh = format!("sw8-correlation: {SW8_CORR}");
    let xh = format!("sw8-x: {SW8_X}");
    // (method, path, query, status, curl arguments, Host sent, sw8 headers sent)
    type Case<'a> = (&'static str, &'static str, &'static str, u16, Vec<&'a str>, Option<&'static str>, bool);
    let cases: Vec<Case<'_>> = vec![
        ("GET", "/users/1", "a=1", 200, vec!["-H", &sw8h, "-H", &corrh, "-H", &xh], None, true),
        ("POST", "/users/2", "b=2", 200, vec!["-X", "POST", "-d", "k=v"], None, false),
        ("PUT", "/users/3", "c=3", 200, vec!["-X", "PUT"], None, false),
        ("DELETE", "/users/4", "d=4", 200, vec!["-X", "DELETE"], None, false),
        ("GET", "/status/201", "e=5", 201, vec![], None, false),
        ("GET", "/status/503", "f=6", 503, vec![], None, false),
        ("GET", "/missing", "g=7", 404, vec![], None, false),
        ("GET", "/error", "h=8", 500, vec![], None, false),
        ("GET", "/crash", "i=9", 500, vec![], None, false),
        ("GET", "/", "j=10", 200, vec!["-H", &auth, "-H", &cookie], None, false),
        ("POST", "/upload", "k=11", 200, vec!["--data-binary", &body_arg], None, false),
        (
            "GET",
            "/users/12",
            "l=12&m=%20x",
            200,
            vec!["-H", "Host: shop.example:8080"],
            Some("shop.example:8080"),
            false,
        ),
    ];
    let mut out = Vec::new();
    for (method, path, query, status, extra, host, sw8) in cases {
        let reply = curl(&format!("{base}{path}?{query}"), &extra);
        if path == "/crash" {
            // The exception escapes to uWSGI: status 500 internally, zero bytes written, so
            // curl sees an empty reply (or nginx answers 502 for it).
            assert!(matches!(reply.status, 0 | 502), "/crash: {reply:?}");
        } else {
            assert_eq!(reply.status, status, "{method} {path} through {base}");
        }
        out.push(Expect { method, path, query, status, host, reply, sw8 });
    }
    let _ = std::fs::remove_file(body);
    out
}

/// What the app sees as its host: the Host header as sent, or (behind Debian's nginx, whose
/// uwsgi_params sends `HTTP_HOST $host`) without its port.
#[derive(Clone, Copy, PartialEq)]
enum Host {
    AsSent,
    NoPort,
}

fn check(records: &[Value], expects: &[Expect], default_host: &str, instance: u32, workers: &[u32], host: Host) {
    assert_eq!(records.len(), expects.len(), "one record per request: {records:#?}");
    for e in expects {
        let r = find(records, e.path, e.query);
        let ctx = format!("{} {}?{}: {r}", e.method, e.path, e.query);
        assert_eq!(r["method"], e.method, "{ctx}");
        assert_eq!(r["status"], e.status, "{ctx}");
        let want_host = e.host.unwrap_or(default_host);
        let want_host = match host {
            Host::AsSent => want_host,
            Host::NoPort => want_host.rsplit_once(':').map_or(want_host, |(h, _)| h),
        };
        assert_eq!(r["host"], want_host, "{ctx}");
        let bytes = if e.path == "/crash" { 0 } else { e.reply.bytes };
        assert_eq!(r["response_bytes"], bytes, "{ctx}");
        assert_eq!(r["client"], format!("127.0.0.1:{}", e.reply.local_port), "{ctx}");
        if e.sw8 {
            assert_eq!(r["sw8"], SW8, "{ctx}");
            assert_eq!(r["sw8_correlation"], SW8_CORR, "{ctx}");
            assert_eq!(r["sw8_x"], SW8_X, "{ctx}");
        } else {
            assert!(r["sw8"].is_null() && r["sw8_correlation"].is_null() && r["sw8_x"].is_null(), "{ctx}");
        }
        assert_eq!(r["instance"], instance, "{ctx}");
        let w = r["worker_pid"].as_u64().unwrap() as u32;
        assert!(workers.contains(&w), "{ctx}: worker {w} not in {workers:?}");
        let (s, en, d) =
            (r["start_us"].as_u64().unwrap(), r["end_us"].as_u64().unwrap(), r["duration_us"].as_u64().unwrap());
        assert!(s > 1_700_000_000_000_000 && en >= s && d == en - s && d < 10_000_000, "{ctx}");
        assert!(r.get("truncated").is_none(), "{ctx}");
    }
    let all = serde_json::to_string(records).unwrap();
    assert!(!all.contains(SECRET), "a sensitive header leaked into the output");
}

fn assert_clean(summary: &Value) {
    for k in
        ["lost_ring_full", "lost_proc_ring_full", "lost_tracked_full", "refused", "decode_errors", "vars_truncated"]
    {
        assert_eq!(summary[k], 0, "{k} in {summary}");
    }
    assert_eq!(summary["invalid"], serde_json::json!({}), "{summary}");
}

/// Runs the standard set against a started uWSGI through `base`.
fn run_standard(u: &Uwsgi, base: &str, default_host: &str, host: Host) {
    let master = u.master_pid();
    let obs = Observer::attach(&["--pidfile", u.pidfile.to_str().unwrap()]);
    let expects = send_standard(base);
    let records = obs.wait_requests(expects.len());
    let mut workers = u.children();
    workers.push(master);
    check(&records, &expects, default_host, master, &workers, host);
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], expects.len() as u64);
    assert_clean(&summary);
}

#[test]
fn pip_http_socket() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Pip,
        "http-socket",
        &["--master", "--workers", "2", "--http-socket", &addr],
        Ready::Port(port),
    );
    run_standard(&u, &u.url(""), &addr, Host::AsSent);
}

#[test]
fn pip_http_router() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(Build::Pip, "http-router", &["--master", "--workers", "2", "--http", &addr], Ready::Port(port));
    run_standard(&u, &u.url(""), &addr, Host::AsSent);
}

#[test]
fn pip_uwsgi_socket_tcp_behind_nginx() {
    require_root();
    let port = free_port();
    let up = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(Build::Pip, "socket-tcp", &["--master", "--workers", "2", "--socket", &up], Ready::Port(port));
    let n = Nginx::start("tcp", &up);
    run_standard(&u, &n.url(""), &format!("127.0.0.1:{}", n.port), Host::NoPort);
}

#[test]
fn pip_uwsgi_socket_unix_behind_nginx() {
    require_root();
    let dir = tmpdir("sock");
    let sock = dir.join("app.sock");
    let s = sock.to_str().unwrap();
    let u = Uwsgi::start(
        Build::Pip,
        "socket-unix",
        &["--master", "--workers", "2", "--socket", s, "--chmod-socket=666"],
        Ready::Unix(sock.clone()),
    );
    let n = Nginx::start("unix", &format!("unix:{s}"));
    run_standard(&u, &n.url(""), &format!("127.0.0.1:{}", n.port), Host::NoPort);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn pip_no_master() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(Build::Pip, "no-master", &["--workers", "1", "--http-socket", &addr], Ready::Port(port));
    assert_eq!(u.master_pid(), u.spawned_pid());
    run_standard(&u, &u.url(""), &addr, Host::AsSent);
}

#[test]
fn pip_lazy_apps() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Pip,
        "lazy",
        &["--master", "--lazy-apps", "--workers", "2", "--http-socket", &addr],
        Ready::Port(port),
    );
    run_standard(&u, &u.url(""), &addr, Host::AsSent);
}

#[test]
fn debian_http_socket() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Debian,
        "deb-http-socket",
        &["--master", "--workers", "2", "--http-socket", &addr],
        Ready::Port(port),
    );
    run_standard(&u, &u.url(""), &addr, Host::AsSent);
}

#[test]
fn debian_http_router() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Debian,
        "deb-http-router",
        &["--plugin", "http", "--master", "--workers", "2", "--http", &addr],
        Ready::Port(port),
    );
    run_standard(&u, &u.url(""), &addr, Host::AsSent);
}

/// Sends `n` concurrent requests to /slow?id=K (50 ms each) and returns their replies.
fn concurrent_slow(base: &str, n: usize) -> Vec<Reply> {
    let handles: Vec<_> = (0..n)
        .map(|k| {
            let url = format!("{base}/slow?id={k}");
            std::thread::spawn(move || curl(&url, &[]))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check_concurrent(records: &[Value], replies: &[Reply]) {
    assert_eq!(records.len(), replies.len(), "{records:#?}");
    for (k, rep) in replies.iter().enumerate() {
        assert_eq!(rep.status, 200);
        let r = find(records, "/slow", &format!("id={k}"));
        assert_eq!(r["status"], 200);
        assert_eq!(r["response_bytes"], rep.bytes);
        assert_eq!(r["client"], format!("127.0.0.1:{}", rep.local_port));
        assert!(r["duration_us"].as_u64().unwrap() >= 50_000, "{r}");
    }
}

#[test]
fn pip_threads() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Pip,
        "threads",
        &["--master", "--workers", "1", "--threads", "4", "--enable-threads", "--http-socket", &addr],
        Ready::Port(port),
    );
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    let replies = concurrent_slow(&u.url(""), 8);
    let records = obs.wait_requests(8);
    check_concurrent(&records, &replies);
    // Concurrent requests ran on several threads of one worker, each on its own core.
    let tids: std::collections::BTreeSet<u64> = records.iter().map(|r| r["tid"].as_u64().unwrap()).collect();
    let cores: std::collections::BTreeSet<i64> = records.iter().map(|r| r["core"].as_i64().unwrap()).collect();
    assert!(tids.len() >= 2, "expected several threads, got {tids:?}");
    assert!(cores.iter().all(|c| (0..4).contains(c)), "{cores:?}");
    let (summary, _) = obs.stop();
    assert_clean(&summary);
    // The standard set too, through the threaded worker.
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    let expects = send_standard(&u.url(""));
    let records = obs.wait_requests(expects.len());
    let mut workers = u.children();
    workers.push(u.master_pid());
    check(&records, &expects, &addr, u.master_pid(), &workers, Host::AsSent);
    obs.stop();
}

#[test]
fn pip_gevent() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Pip,
        "gevent",
        &["--master", "--workers", "1", "--gevent", "100", "--gevent-monkey-patch", "--http-socket", &addr],
        Ready::Port(port),
    );
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    let replies = concurrent_slow(&u.url(""), 8);
    let records = obs.wait_requests(8);
    check_concurrent(&records, &replies);
    // One thread, several async cores in flight at once.
    let cores: std::collections::BTreeSet<i64> = records.iter().map(|r| r["core"].as_i64().unwrap()).collect();
    assert!(cores.len() >= 2, "expected several gevent cores, got {cores:?}");
    // Connections that close without a request reach the probe in gevent mode: they are
    // counted, never reported as requests.
    for _ in 0..3 {
        drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    // gevent sees the EOF within a few ms; give it ample time before detaching.
    std::thread::sleep(Duration::from_millis(500));
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], 8);
    assert_eq!(summary["empty_connections"], 3, "{summary}");
    assert_clean(&summary);
}

#[test]
fn pip_http11_keepalive() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Pip,
        "http11",
        &["--master", "--workers", "1", "--http11-socket", &addr],
        Ready::Port(port),
    );
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    // One curl, four requests on one kept-alive connection.
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "%{local_port} %{num_connects}\n"])
        .args(["-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null"])
        .args((1..=4).map(|k| u.url(&format!("/users/{k}?ka={k}"))))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let port0 = lines[0].split_whitespace().next().unwrap().to_string();
    let connects: u32 = lines.iter().map(|l| l.split_whitespace().nth(1).unwrap().parse::<u32>().unwrap()).sum();
    assert_eq!(connects, 1, "curl should reuse one connection: {text}");
    let records = obs.wait_requests(4);
    assert_eq!(records.len(), 4);
    for k in 1..=4 {
        let r = find(&records, &format!("/users/{k}"), &format!("ka={k}"));
        assert_eq!(r["status"], 200);
        // uWSGI reports REMOTE_ADDR 0.0.0.0 for reused connections; we report the real peer.
        assert_eq!(r["client"], format!("127.0.0.1:{port0}"), "{r}");
    }
    let (summary, _) = obs.stop();
    assert_clean(&summary);
    std::thread::sleep(Duration::from_millis(10));
}
