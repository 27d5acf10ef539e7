//! Bad input: clear one-line errors with a non-zero exit, and junk traffic that never
//! crashes the observer nor produces a bogus request record.

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::Command,
    time::Duration,
};

use observer_tests::*;

/// The error is one line on stderr, starts with "observer: error:", and the exit code is 1.
fn assert_one_line_error(args: &[&str], want: &str) {
    let (code, stdout, stderr) = observer_output(args);
    assert_eq!(code, 1, "exit code for {args:?}: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("observer: error: "), "{stderr}");
    assert!(lines[0].contains(want), "{want:?} not in {stderr}");
}

#[test]
fn no_such_pid() {
    require_root();
    assert_one_line_error(&["attach", "--pid", "999999999"], "no such process: 999999999");
}

#[test]
fn not_uwsgi() {
    require_root();
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    assert_one_line_error(&["attach", "--pid", &pid], &format!("pid {pid} (sleep) is not a uWSGI process"));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn nothing_to_attach_and_bad_pidfiles() {
    require_root();
    assert_one_line_error(&["attach"], "nothing to attach to");
    let dir = tmpdir("pidfile");
    let junk = dir.join("junk.pid");
    std::fs::write(&junk, b"\x00\x01garbage\n").unwrap();
    assert_one_line_error(&["attach", "--pidfile", junk.to_str().unwrap()], "does not hold a pid");
    assert_one_line_error(&["attach", "--pidfile", dir.join("absent.pid").to_str().unwrap()], "absent.pid");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_arguments_are_usage_errors() {
    require_root();
    let (code, _, stderr) = observer_output(&["attach", "--pid", "abc"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = observer_output(&["attach", "--pid", "1", "--ring-bytes", "1000"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("power of two"), "{stderr}");
}

#[test]
fn not_root() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(Build::Pip, "notroot", &["--master", "--workers", "1", "--http-socket", &addr], Ready::Port(port));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"])
        .arg(observer_bin())
        .args(["attach", "--pid", &u.master_pid().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("observer: error: not enough privilege: run as root"), "{err}");
}

#[test]
fn uwsgi_without_python_handler() {
    require_root();
    // Debian's uwsgi-core alone (no Python plugin loaded): no file exports the handler.
    let port = free_port();
    let dir = tmpdir("nopython");
    let mut u = Command::new("/usr/bin/uwsgi-core")
        .args(["--master", "--workers", "1", "--http-socket", &format!("127.0.0.1:{port}"), "--die-on-term"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("uwsgi-core listening", Duration::from_secs(20), || tcp_listening(port));
    let pid = u.id().to_string();
    assert_one_line_error(&["attach", "--pid", &pid], "no mapped file exports uwsgi_after_request_wsgi");
    // SAFETY: our own child.
    unsafe { libc::kill(u.id() as i32, libc::SIGINT) };
    let _ = u.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends `chunks` on one connection. Junk (`half_close`) ends with a FIN so uWSGI answers at
/// once; real requests keep the write side open, as clients do, and read until uWSGI closes.
fn raw_conn(port: u16, chunks: &[&[u8]], pause: Duration, half_close: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (i, c) in chunks.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(pause);
        }
        if s.write_all(c).is_err() {
            break;
        }
    }
    if half_close {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn raw(port: u16, chunks: &[&[u8]], pause: Duration) -> Vec<u8> {
    raw_conn(port, chunks, pause, true)
}

fn request(port: u16, chunks: &[&[u8]], pause: Duration) -> Vec<u8> {
    raw_conn(port, chunks, pause, false)
}

/// Binary garbage, oversized headers, a 100 KB body and headers split across reads: only
/// the real requests come out, each right, and the observer carries on.
fn junk_traffic(build: Build, mode: &str, malformed: u64) {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(build, &format!("junk-{mode}"), &["--master", "--workers", "2", mode, &addr], Ready::Port(port));
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..20 {
        let junk: Vec<u8> = (0..512)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        raw(port, &[&junk], Duration::ZERO);
    }
    // A uwsgi-protocol header claiming a huge packet, then nothing.
    raw(port, &[b"\x00\xff\xff\x00GET"], Duration::ZERO);
    // Headers larger than uWSGI's buffer (4096): rejected by uWSGI, no request.
    let big = format!("GET /big HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "p".repeat(8000));
    raw(port, &[big.as_bytes()], Duration::ZERO);
    // Real requests among the junk: headers split across reads, and a 100 KB body.
    let split = request(
        port,
        &[
            b"GET /users/77?split=1 HTTP/1.1\r\nHo",
            b"st: split.example\r\nsw8: 1-YQ==-Yg==-0-Yw==-ZA==-ZQ==-Zg==\r\n\r\n",
        ],
        Duration::from_millis(200),
    );
    assert!(String::from_utf8_lossy(&split).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&split));
    let body = vec![b'z'; 100 * 1024];
    let head = format!("POST /upload?big=1 HTTP/1.1\r\nHost: up.example\r\nContent-Length: {}\r\n\r\n", body.len());
    let up = request(port, &[head.as_bytes(), &body], Duration::from_millis(50));
    assert!(String::from_utf8_lossy(&up).contains("got 102400 bytes"), "{}", String::from_utf8_lossy(&up));
    // An empty request line and a lone CRLF.
    raw(port, &[b"\r\n\r\n"], Duration::ZERO);

    let records = obs.wait_requests(2);
    assert_eq!(records.len(), 2, "{records:#?}");
    let s = find(&records, "/users/77", "split=1");
    assert_eq!(s["host"], "split.example");
    assert_eq!(s["sw8"], "1-YQ==-Yg==-0-Yw==-ZA==-ZQ==-Zg==");
    assert_eq!(s["status"], 200);
    let b = find(&records, "/upload", "big=1");
    assert_eq!(b["method"], "POST");
    assert_eq!(b["host"], "up.example");
    assert_eq!(b["response_bytes"], "got 102400 bytes\n".len());
    // The app still serves.
    assert_eq!(curl(&u.url("/"), &[]).status, 200);
    obs.wait_requests(3);
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], 3);
    // A bare CRLF CRLF reaches the app through --http-socket (uWSGI logs it as a request
    // with no method and a 500): counted, never printed as a request.
    let want = if malformed > 0 {
        serde_json::json!({"request without a method (malformed HTTP)": malformed})
    } else {
        serde_json::json!({})
    };
    assert_eq!(summary["invalid"], want, "{summary}");
    assert_eq!(summary["decode_errors"], 0);
}

#[test]
fn junk_traffic_http_socket_pip() {
    junk_traffic(Build::Pip, "--http-socket", 1);
}

#[test]
fn junk_traffic_http_router_pip() {
    junk_traffic(Build::Pip, "--http", 0);
}

#[test]
fn junk_traffic_uwsgi_socket_debian() {
    // Raw junk straight into the uwsgi protocol parser (what nginx would normally send).
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start(
        Build::Debian,
        "junk-uwsgi",
        &["--master", "--workers", "1", "--socket", &addr],
        Ready::Port(port),
    );
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    raw(port, &[b"\x00\x10\x00\x00\x05\x00AB"], Duration::ZERO); // var length past the packet
    raw(port, &[b"\x00\x04\x00\x00\xff\xff\x00\x00"], Duration::ZERO); // key length past the packet
    raw(port, &[b"GET / HTTP/1.1\r\n\r\n"], Duration::ZERO); // HTTP to a uwsgi socket
    let n = Nginx::start("junk", &addr);
    assert_eq!(curl(&n.url("/users/5?ok=1"), &[]).status, 200);
    let records = obs.wait_requests(1);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(find(&records, "/users/5", "ok=1")["status"], 200);
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], 1);
    assert_eq!(summary["invalid"], serde_json::json!({}), "{summary}");
}

#[test]
fn wrong_layout_is_refused_not_printed() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(Build::Pip, "layout", &["--master", "--workers", "1", "--http-socket", &addr], Ready::Port(port));
    // Every offset 8 bytes off, as if uWSGI's struct had changed under us.
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string(), "--layout-shift", "8"]);
    for k in 0..5 {
        assert_eq!(curl(&u.url(&format!("/users/{k}")), &[]).status, 200);
    }
    wait_until("refusal", Duration::from_secs(10), || obs.stderr().contains("did not validate on live data"));
    std::thread::sleep(Duration::from_millis(300));
    let (summary, stderr) = obs.stop();
    assert!(stderr.contains("refusing this target"), "{stderr}");
    assert_eq!(summary["requests"], 0, "no record from a wrong layout: {summary}");
    let invalid: u64 = summary["invalid"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(invalid >= 3, "{summary}");
    // Each of the 5 requests is accounted for: rejected, or dropped after the refusal.
    assert_eq!(invalid + summary["refused"].as_u64().unwrap(), 5, "{summary}");
    // The app is unharmed.
    assert_eq!(curl(&u.url("/"), &[]).status, 200);
}

#[test]
fn mounts_tracefs_when_missing() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(Build::Pip, "tracefs", &["--master", "--workers", "1", "--http-socket", &addr], Ready::Port(port));
    // In a private mount namespace with no tracefs anywhere, the observer mounts it itself.
    let script = format!(
        "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null; \
         test ! -d /sys/kernel/tracing/events || exit 90; \
         {} attach --pid {} --format json & p=$!; sleep 3; \
         test -d /sys/kernel/tracing/events || exit 91; kill -INT $p; wait $p",
        observer_bin().display(),
        u.master_pid()
    );
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "status {:?}: {err}", out.status.code());
    assert!(err.contains("observer: attached"), "{err}");
    assert!(err.contains("observer: detached."), "{err}");
}

#[test]
fn hostile_requests_cannot_get_a_target_refused() {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(Build::Pip, "hostile", &["--master", "--workers", "1", "--http-socket", &addr], Ready::Port(port));
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    // Before any valid request: NUL bytes in the path (uWSGI URL-decodes PATH_INFO) and a
    // method that is not an HTTP token.
    for _ in 0..3 {
        request(port, &[b"GET /a%00b HTTP/1.0\r\nHost: x\r\n\r\n"], Duration::ZERO);
        request(port, &[b"G\x01T /x HTTP/1.0\r\nHost: x\r\n\r\n"], Duration::ZERO);
    }
    assert_eq!(curl(&u.url("/users/1?after=1"), &[]).status, 200);
    let records = obs.wait_requests(1);
    let (summary, stderr) = obs.stop();
    assert!(!stderr.contains("refusing"), "{stderr}");
    assert_eq!(find(&records, "/users/1", "after=1")["status"], 200);
    assert_eq!(summary["refused"], 0, "{summary}");
    let invalid: u64 = summary["invalid"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(summary["requests"].as_u64().unwrap() + invalid, 7, "every request is accounted for: {summary}");
}
