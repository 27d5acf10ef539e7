//! SkyWalking reporting: segments, instances and heartbeats into a real gRPC receiver,
//! checked field by field, decoded by independent definitions (the apache-skywalking
//! wheel), and with the official Python agent reporting into the same receiver.

use std::{collections::BTreeSet, path::PathBuf, process::Command, time::Duration};

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use observer_proto::v3::{RefType, SegmentObject, SpanLayer, SpanType};
use observer_tests::{receiver::Receiver, *};
use prost::Message as _;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string()
}

fn python() -> PathBuf {
    venv().join("bin/python")
}

fn sw8(trace: &str, seg: &str, span: i32) -> String {
    format!(
        "1-{}-{}-{span}-{}-{}-{}-{}",
        B64.encode(trace),
        B64.encode(seg),
        B64.encode("gateway"),
        B64.encode("gateway-1"),
        B64.encode("/checkout"),
        B64.encode("shop.internal:80")
    )
}

fn start_app(tag: &str, workers: &str) -> (Uwsgi, String) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u =
        Uwsgi::start(Build::Pip, tag, &["--master", "--workers", workers, "--http-socket", &addr], Ready::Port(port));
    (u, addr)
}

fn attach_oap(u: &Uwsgi, rx: &Receiver, extra: &[&str]) -> Observer {
    let mut args = vec!["--pid".to_string(), u.master_pid().to_string(), "--oap".into(), rx.address()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Observer::attach(&a)
}

fn tags(seg: &SegmentObject) -> Vec<(String, String)> {
    seg.spans[0].tags.iter().map(|t| (t.key.clone(), t.value.clone())).collect()
}

fn by_url<'a>(segs: &'a [SegmentObject], url: &str) -> &'a SegmentObject {
    let m: Vec<&SegmentObject> =
        segs.iter().filter(|s| s.spans[0].tags.iter().any(|t| t.key == "http.url" && t.value == url)).collect();
    assert_eq!(m.len(), 1, "one segment for {url}: {segs:#?}");
    m[0]
}

#[test]
fn segments_instances_and_linkage() {
    require_root();
    let rx = Receiver::start();
    let (u, addr) = start_app("sw-seg", "2");
    let obs = attach_oap(&u, &rx, &["--service", "shop", "--framework", "flask", "--oap-token", "s3cret"]);
    let upstream = sw8("4a7b0c3e2f1d4c5b8a9e0f1a2b3c4d5e", "parentseg0000000000000000000000a", 2);
    let cases: Vec<(&str, Vec<String>, u16)> = vec![
        ("/users/1?q=1", vec![], 200),
        ("/status/201", vec![], 201),
        ("/missing", vec![], 404),
        ("/error", vec![], 500),
        ("/crash", vec![], 500),
        ("/users/2", vec!["-H".into(), format!("sw8: {upstream}")], 200),
        ("/users/3", vec!["-H".into(), format!("sw8: {upstream}"), "-H".into(), "sw8-x: 1-1700000000000".into()], 200),
        ("/users/4", vec!["-H".into(), "sw8: not-a-valid-header".into()], 200),
        ("/users/5", vec!["-X".into(), "POST".into(), "-d".into(), "x=1".into()], 200),
    ];
    let mut ports = Vec::new();
    for (path, extra, _) in &cases {
        let e: Vec<&str> = extra.iter().map(String::as_str).collect();
        ports.push(curl(&u.url(path), &e).local_port);
    }
    wait_until("all segments at the receiver", Duration::from_secs(20), || rx.store.segments().len() >= cases.len());
    let records = obs.wait_requests(cases.len());
    let (summary, _) = obs.stop();
    let segs = rx.store.segments();
    assert_eq!(segs.len(), cases.len(), "one segment per request");
    assert_eq!(summary["oap_sent"], cases.len() as u64);
    assert_eq!(summary["oap_queued"], cases.len() as u64);
    assert_eq!(summary["oap_dropped_queue_full"], 0);
    assert_eq!(summary["oap_dropped_at_shutdown"], 0);
    assert_eq!(summary["sw8_malformed"], 1);

    let master = u.master_pid();
    let ids: BTreeSet<&str> = segs.iter().map(|s| s.trace_segment_id.as_str()).collect();
    assert_eq!(ids.len(), segs.len(), "segment ids unique");
    for ((path, _, status), port) in cases.iter().zip(&ports) {
        let p = path.split('?').next().unwrap();
        let seg = by_url(&segs, &format!("http://{addr}{p}"));
        let rec = find(&records, p, path.split_once('?').map_or("", |x| x.1));
        let worker = rec["worker_pid"].as_u64().unwrap();
        assert_eq!(seg.service, "shop");
        assert_eq!(seg.service_instance, format!("{}-master({master})-child({worker})", hostname()));
        assert!(seg.trace_id.len() == 32 && seg.trace_segment_id.len() == 32, "{seg:?}");
        assert!(seg.trace_segment_id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(seg.spans.len(), 1);
        let s = &seg.spans[0];
        assert_eq!((s.span_id, s.parent_span_id), (0, -1));
        assert_eq!(s.operation_name, p);
        assert_eq!(s.span_type, SpanType::Entry as i32);
        assert_eq!(s.span_layer, SpanLayer::Http as i32);
        assert_eq!(s.component_id, 7001);
        assert_eq!(s.peer, format!("127.0.0.1:{port}"));
        assert_eq!(s.is_error, *status >= 400, "{path}");
        assert_eq!(s.start_time as u64, rec["start_us"].as_u64().unwrap() / 1000);
        assert_eq!(s.end_time as u64, rec["end_us"].as_u64().unwrap() / 1000);
        let method = if *path == "/users/5" { "POST" } else { "GET" };
        assert_eq!(
            tags(seg),
            vec![
                ("http.method".to_string(), method.to_string()),
                ("http.url".into(), format!("http://{addr}{p}")),
                ("http.status_code".into(), status.to_string()),
            ]
        );
        let linked = matches!(*path, "/users/2" | "/users/3");
        assert_eq!(s.skip_analysis, *path == "/users/3");
        if linked {
            assert_eq!(seg.trace_id, "4a7b0c3e2f1d4c5b8a9e0f1a2b3c4d5e");
            assert_eq!(s.refs.len(), 1);
            let r = &s.refs[0];
            assert_eq!(r.ref_type, RefType::CrossProcess as i32);
            assert_eq!(r.trace_id, "4a7b0c3e2f1d4c5b8a9e0f1a2b3c4d5e");
            assert_eq!(r.parent_trace_segment_id, "parentseg0000000000000000000000a");
            assert_eq!(r.parent_span_id, 2);
            assert_eq!(r.parent_service, "gateway");
            assert_eq!(r.parent_service_instance, "gateway-1");
            assert_eq!(r.parent_endpoint, "/checkout");
            assert_eq!(r.network_address_used_at_peer, "shop.internal:80");
        } else {
            assert!(s.refs.is_empty(), "{path}");
            assert_ne!(seg.trace_id, "4a7b0c3e2f1d4c5b8a9e0f1a2b3c4d5e");
        }
    }
    // One instance per worker that served, with its properties.
    let served: BTreeSet<u64> = records.iter().map(|r| r["worker_pid"].as_u64().unwrap()).collect();
    let props = rx.store.properties();
    for w in &served {
        let name = format!("{}-master({master})-child({w})", hostname());
        let p = props.iter().find(|p| p.service_instance == name).unwrap_or_else(|| panic!("no properties for {name}"));
        assert_eq!(p.service, "shop");
        let kv: Vec<(&str, &str)> = p.properties.iter().map(|k| (k.key.as_str(), k.value.as_str())).collect();
        for want in [("language", "python"), ("Process No.", &w.to_string()), ("uwsgi_version", "2.0.31")] {
            assert!(kv.contains(&want), "{want:?} in {kv:?}");
        }
        assert!(kv.contains(&("uwsgi_master_pid", &master.to_string())));
        assert!(kv.iter().any(|(k, v)| *k == "python_version" && v.starts_with("3.")), "{kv:?}");
        assert!(kv.iter().any(|(k, _)| *k == "observer"));
    }
    // Every call carried the token.
    let auth = rx.store.auth();
    assert!(!auth.is_empty() && auth.iter().all(|a| a.as_deref() == Some("s3cret")), "{auth:?}");

    // Independent decoding: the wheel's generated Tracing_pb2 reads what we sent.
    let dir = tmpdir("sw-decode");
    let mut buf = Vec::new();
    for s in &segs {
        let b = s.encode_to_vec();
        buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        buf.extend_from_slice(&b);
    }
    std::fs::write(dir.join("segs.bin"), buf).unwrap();
    let out = Command::new(python())
        .arg(repo().join("tests/py/sw_check.py"))
        .arg("decode-segments")
        .arg(dir.join("segs.bin"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let decoded: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(decoded.len(), segs.len());
    for (d, s) in decoded.iter().zip(&segs) {
        assert_eq!(d["traceId"].as_str().or(d["trace_id"].as_str()), Some(s.trace_id.as_str()));
        assert_eq!(d["service"], "shop");
        assert_eq!(d["serviceInstance"].as_str().or(d["service_instance"].as_str()), Some(s.service_instance.as_str()));
        let span = &d["spans"][0];
        let op = span["operationName"].as_str().or(span["operation_name"].as_str()).unwrap();
        assert_eq!(op, s.spans[0].operation_name);
        let peer = span["peer"].as_str().unwrap();
        assert_eq!(peer, s.spans[0].peer);
        let comp = span["componentId"].as_i64().or(span["component_id"].as_i64()).unwrap();
        assert_eq!(comp, 7001);
        let layer = span["spanLayer"].as_i64().or(span["span_layer"].as_i64()).unwrap();
        assert_eq!(layer, SpanLayer::Http as i64);
        let tag_keys: Vec<&str> = span["tags"].as_array().unwrap().iter().map(|t| t["key"].as_str().unwrap()).collect();
        assert_eq!(tag_keys, vec!["http.method", "http.url", "http.status_code"]);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn our_proto_matches_the_official_definitions() {
    require_root();
    let dir = tmpdir("fds");
    let ours = dir.join("ours.fds");
    std::fs::write(&ours, observer_proto::FILE_DESCRIPTOR_SET).unwrap();
    let run = |p: &PathBuf| {
        let o = Command::new(python())
            .arg(repo().join("tests/py/sw_check.py"))
            .arg("compare-descriptors")
            .arg(p)
            .output()
            .unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string())
    };
    let (ok, out) = run(&ours);
    assert!(ok && out.contains(" 0 problems"), "{out}");
    // The check can fail: renumber SpanObject.peer and it must be caught.
    let mut fds = prost_types_fds(observer_proto::FILE_DESCRIPTOR_SET);
    let mut changed = false;
    for f in &mut fds.file {
        for m in &mut f.message_type {
            if m.name() == "SpanObject" {
                for fld in &mut m.field {
                    if fld.name() == "peer" {
                        fld.number = Some(99);
                        changed = true;
                    }
                }
            }
        }
    }
    assert!(changed);
    let bad = dir.join("bad.fds");
    std::fs::write(&bad, fds.encode_to_vec()).unwrap();
    let (ok, out) = run(&bad);
    assert!(!ok && out.contains("SpanObject.peer"), "{out}");
    let _ = std::fs::remove_dir_all(dir);
}

fn prost_types_fds(b: &[u8]) -> prost_types::FileDescriptorSet {
    prost_types::FileDescriptorSet::decode(b).unwrap()
}

#[test]
fn heartbeats_follow_live_workers() {
    require_root();
    let rx = Receiver::start();
    let (u, _) = start_app("sw-hb", "1");
    let obs = attach_oap(&u, &rx, &["--service", "hb", "--heartbeat-secs", "1"]);
    let old = u.wait_children(1)[0];
    assert_eq!(curl(&u.url("/users/1"), &[]).status, 200);
    let old_name = format!("{}-master({})-child({old})", hostname(), u.master_pid());
    wait_until("pings for the first worker", Duration::from_secs(10), || {
        rx.store.pings().iter().filter(|(p, _)| p.service_instance == old_name).count() >= 2
    });
    // SAFETY: killing the worker we started.
    unsafe { libc::kill(old as i32, libc::SIGKILL) };
    wait_until("respawn", Duration::from_secs(15), || u.children().first().is_some_and(|c| *c != old));
    let new = u.children()[0];
    assert_eq!(curl(&u.url("/users/2"), &[]).status, 200);
    let new_name = format!("{}-master({})-child({new})", hostname(), u.master_pid());
    wait_until("pings for the new worker", Duration::from_secs(10), || {
        rx.store.pings().iter().filter(|(p, _)| p.service_instance == new_name).count() >= 2
    });
    let killed_at = std::time::Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    let late: Vec<_> =
        rx.store.pings().into_iter().filter(|(p, t)| p.service_instance == old_name && *t > killed_at).collect();
    assert!(late.is_empty(), "the killed worker's instance still pings: {late:?}");
    assert!(rx.store.properties().iter().any(|p| p.service_instance == new_name));
    let (summary, _) = obs.stop();
    assert!(summary["oap_heartbeats_sent"].as_u64().unwrap() >= 4, "{summary}");
}

#[test]
fn oap_outage_keeps_what_fits_and_counts_the_rest() {
    require_root();
    let mut rx = Receiver::start();
    let (u, _) = start_app("sw-outage", "2");
    let obs = attach_oap(&u, &rx, &["--service", "outage", "--queue-max", "20"]);
    let send = |range: std::ops::Range<u32>| {
        for k in range {
            assert_eq!(curl(&u.url(&format!("/users/{k}")), &[]).status, 200);
        }
    };
    let paths = |rx: &Receiver, range: std::ops::Range<u32>| -> BTreeSet<u32> {
        rx.store
            .segments()
            .iter()
            .filter_map(|s| s.spans[0].operation_name.strip_prefix("/users/")?.parse().ok())
            .filter(|k| range.contains(k))
            .collect()
    };
    send(0..5);
    wait_until("5 segments", Duration::from_secs(10), || rx.store.segments().len() == 5);
    rx.pause();
    // Outage within the bound: all 15 wait in the queue and arrive after it.
    send(100..115);
    let warned = |n: usize| obs.stderr().matches("unreachable").count() >= n;
    wait_until("the outage reported", Duration::from_secs(10), || warned(1));
    rx.resume();
    wait_until("outage segments delivered", Duration::from_secs(20), || rx.store.segments().len() == 20);
    assert_eq!(paths(&rx, 100..115).len(), 15);
    // Outage beyond the bound (20): 30 requests, so 10 are dropped, oldest first.
    rx.pause();
    send(200..230);
    wait_until("the second outage reported", Duration::from_secs(10), || warned(2));
    rx.resume();
    wait_until("flood segments delivered", Duration::from_secs(20), || rx.store.segments().len() == 40);
    let (summary, stderr) = obs.stop();
    let segs = rx.store.segments();
    let ids: BTreeSet<&str> = segs.iter().map(|s| s.trace_segment_id.as_str()).collect();
    assert_eq!(ids.len(), segs.len(), "no duplicates");
    assert_eq!(segs.len(), 40, "5 + 15 + the 20 the queue could hold");
    let flood = paths(&rx, 200..230);
    assert_eq!(flood.len(), 20);
    assert_eq!(summary["oap_queued"], 50, "{summary}");
    assert_eq!(summary["oap_sent"], 40, "{summary}");
    // The drop count equals what is missing, and the survivors are the newest.
    assert_eq!(summary["oap_dropped_queue_full"].as_u64().unwrap(), 30 - flood.len() as u64, "{summary}");
    assert!(flood.contains(&229) && !flood.contains(&200), "{flood:?}");
    assert_eq!(summary["oap_dropped_at_shutdown"], 0);
    assert!(stderr.contains("dropped_queue_full=10"), "{stderr}");
    // The outage and the recovery were told to the user as they happened.
    assert!(stderr.contains(&format!("observer: warning: OAP {} unreachable", rx.address())), "{stderr}");
    assert!(stderr.contains("reachable again"), "{stderr}");
}

/// The official Python agent, run the way its docs say for uWSGI, reporting into our
/// receiver: proves the receiver is a faithful OAP stand-in. (The agent adds --master and
/// --enable-threads itself.)
fn agent_segments(rx: &Receiver, paths: &[(&str, Vec<&str>)]) -> Vec<SegmentObject> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let backend = rx.address();
    let u = Uwsgi::start_with_agent(
        "agent",
        &["--master", "--workers", "1", "--http-socket", &addr],
        Ready::Port(port),
        &[
            ("SW_AGENT_COLLECTOR_BACKEND_SERVICES", backend.as_str()),
            ("SW_AGENT_NAME", "shop"),
            ("SW_AGENT_PROTOCOL", "grpc"),
            ("SW_AGENT_LOGGING_LEVEL", "WARNING"),
        ],
    );
    u.wait_children(1);
    std::thread::sleep(Duration::from_secs(2));
    let before = rx.store.segments().len();
    for (p, extra) in paths {
        curl(&u.url(p), extra);
    }
    wait_until("the agent's segments", Duration::from_secs(30), || rx.store.segments().len() >= before + paths.len());
    std::thread::sleep(Duration::from_millis(500));
    let segs: Vec<SegmentObject> = rx.store.segments()[before..].to_vec();
    assert!(
        !u.log().contains("Traceback") || u.log().contains("boom 42") || u.log().contains("escaped"),
        "{}",
        u.log()
    );
    segs
}

#[test]
fn official_agent_reports_into_the_receiver_and_parity() {
    require_root();
    let up = sw8("4a7b0c3e2f1d4c5b8a9e0f1a2b3c4d5e", "parentseg0000000000000000000000a", 2);
    let sw8h = format!("sw8: {up}");
    let paths: Vec<(&str, Vec<&str>)> = vec![
        ("/users/1?q=1", vec![]),
        ("/status/201", vec![]),
        ("/missing", vec![]),
        ("/error", vec![]),
        ("/users/2", vec!["-H", &sw8h]),
    ];
    let rx = Receiver::start();
    let agent = agent_segments(&rx, &paths);
    assert_eq!(agent.len(), paths.len(), "the agent sent one segment per request: {agent:#?}");
    assert!(rx.store.properties().iter().any(|p| p.service == "shop"), "the agent registered its instance");

    // The same app and requests under the observer.
    let rx2 = Receiver::start();
    let (u, _) = start_app("parity", "1");
    let obs = attach_oap(&u, &rx2, &["--service", "shop", "--framework", "flask"]);
    for (p, extra) in &paths {
        curl(&u.url(p), extra);
    }
    wait_until("observer segments", Duration::from_secs(20), || rx2.store.segments().len() == paths.len());
    obs.stop();
    let ours = rx2.store.segments();

    let entry = |segs: &[SegmentObject], op: &str| -> (SegmentObject, usize) {
        let m: Vec<&SegmentObject> = segs
            .iter()
            .filter(|s| s.spans.iter().any(|sp| sp.span_type == SpanType::Entry as i32 && sp.operation_name == op))
            .collect();
        (m[0].clone(), m.len())
    };
    for (p, _) in &paths {
        let op = p.split('?').next().unwrap();
        let (a, na) = entry(&agent, op);
        let (o, no) = entry(&ours, op);
        assert_eq!((na, no), (1, 1), "{op}: one entry span each");
        let sa = a.spans.iter().find(|s| s.span_type == SpanType::Entry as i32).unwrap();
        let so = &o.spans[0];
        assert_eq!(sa.operation_name, so.operation_name);
        assert_eq!(sa.is_error, so.is_error, "{op}");
        assert_eq!(sa.span_layer, so.span_layer, "{op}");
        assert_eq!(sa.component_id, so.component_id, "{op}");
        let ta: Vec<(&str, &str)> = sa.tags.iter().map(|t| (t.key.as_str(), t.value.as_str())).collect();
        let to: Vec<(&str, &str)> = so.tags.iter().map(|t| (t.key.as_str(), t.value.as_str())).collect();
        // Same keys in the same order; values equal except the URL's port (two different apps).
        // Documented difference (docs/skywalking.md): when the view raises, the agent's span has
        // no http.status_code (it records the exception as a log instead); ours has the 500
        // the client got.
        let to: Vec<(&str, &str)> = if *op == *"/error" {
            // Both report the exception as one log entry keyed "Traceback" whose text ends
            // with the same frame and exception line (the agent formats it in-process with
            // traceback.format_exc, we from the interpreter's memory).
            for (who, sp) in [("agent", sa), ("observer", so)] {
                assert_eq!(sp.logs.len(), 1, "{who}: {:?}", sp.logs);
                assert_eq!(sp.logs[0].data.len(), 1, "{who}");
                assert_eq!(sp.logs[0].data[0].key, "Traceback", "{who}");
                let text = &sp.logs[0].data[0].value;
                assert!(text.starts_with("Traceback (most recent call last):\n"), "{who}: {text}");
                assert!(
                    text.ends_with("in error\n    raise RuntimeError(\"boom 42\")\nRuntimeError: boom 42\n"),
                    "{who}: {text}"
                );
            }
            assert!(to.contains(&("http.status_code", "500")));
            to.into_iter().filter(|t| t.0 != "http.status_code").collect()
        } else {
            to
        };
        assert_eq!(ta.iter().map(|t| t.0).collect::<Vec<_>>(), to.iter().map(|t| t.0).collect::<Vec<_>>(), "{op}");
        for ((ka, va), (_, vo)) in ta.iter().zip(&to) {
            if *ka == "http.url" {
                assert!(va.ends_with(op) && vo.ends_with(op), "{va} {vo}");
            } else {
                assert_eq!(va, vo, "{op} {ka}");
            }
        }
        assert_eq!(sa.refs.len(), so.refs.len(), "{op}: trace linkage");
        if let (Some(ra), Some(ro)) = (sa.refs.first(), so.refs.first()) {
            assert_eq!(a.trace_id, o.trace_id);
            assert_eq!(ra.parent_trace_segment_id, ro.parent_trace_segment_id);
            assert_eq!(ra.parent_span_id, ro.parent_span_id);
            assert_eq!(ra.parent_service, ro.parent_service);
            assert_eq!(ra.parent_service_instance, ro.parent_service_instance);
            assert_eq!(ra.parent_endpoint, ro.parent_endpoint);
            assert_eq!(ra.network_address_used_at_peer, ro.network_address_used_at_peer);
        }
    }
}

#[test]
fn tls_to_the_oap() {
    require_root();
    let dir = tmpdir("tls");
    // A CA, and a server certificate for 127.0.0.1 signed by it (as an OAP would have).
    let sh = |script: &str| {
        let o = Command::new("sh").arg("-c").arg(script).current_dir(&dir).output().unwrap();
        assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    };
    sh("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem");
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout key.pem -out server.csr");
    sh("printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\n' > ext.cnf && \
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem");
    let cert = std::fs::read(dir.join("cert.pem")).unwrap();
    let key = std::fs::read(dir.join("key.pem")).unwrap();
    let rx = Receiver::start_tls(cert, key);
    let (u, _) = start_app("sw-tls", "1");
    let ca = dir.join("ca.pem");
    let obs = attach_oap(&u, &rx, &["--service", "tls", "--oap-tls-ca", ca.to_str().unwrap()]);
    for k in 0..3 {
        assert_eq!(curl(&u.url(&format!("/users/{k}")), &[]).status, 200);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rx.store.segments().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "no segments over TLS: {}", obs.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (summary, _) = obs.stop();
    assert_eq!(summary["oap_sent"], 3);
    // Without the CA the server is not trusted: nothing is delivered, and it is counted.
    let rx2 =
        Receiver::start_tls(std::fs::read(dir.join("cert.pem")).unwrap(), std::fs::read(dir.join("key.pem")).unwrap());
    let obs = attach_oap(
        &u,
        &rx2,
        &["--service", "tls", "--oap-tls-ca", "/etc/ssl/certs/ca-certificates.crt", "--flush-secs", "1"],
    );
    assert_eq!(curl(&u.url("/users/9"), &[]).status, 200);
    obs.wait_requests(1);
    wait_until("the TLS failure reported", Duration::from_secs(10), || {
        obs.stderr().contains("invalid peer certificate")
    });
    let (summary, _) = obs.stop();
    assert_eq!(rx2.store.segments().len(), 0);
    assert_eq!(summary["oap_sent"], 0);
    assert_eq!(summary["oap_dropped_at_shutdown"], 1, "{summary}");

    // Mutual TLS: the receiver accepts only clients with a certificate signed by the CA.
    sh("openssl req -newkey rsa:2048 -nodes -subj /CN=observer -keyout client.key -out client.csr");
    sh("printf 'basicConstraints=CA:FALSE\\nextendedKeyUsage=clientAuth\\n' > cext.cnf && \
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile cext.cnf -out client.pem");
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let rx3 = Receiver::start_mtls(read("cert.pem"), read("key.pem"), Some(read("ca.pem")));
    let (cert, key) = (dir.join("client.pem"), dir.join("client.key"));
    let obs = attach_oap(
        &u,
        &rx3,
        &[
            "--service",
            "mtls",
            "--oap-tls-ca",
            ca.to_str().unwrap(),
            "--oap-tls-cert",
            cert.to_str().unwrap(),
            "--oap-tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert_eq!(curl(&u.url("/users/5"), &[]).status, 200);
    wait_until("a segment over mutual TLS", Duration::from_secs(20), || rx3.store.segments().len() == 1);
    obs.stop();
    // The same server refuses a client without a certificate.
    let obs = attach_oap(&u, &rx3, &["--service", "mtls", "--oap-tls-ca", ca.to_str().unwrap(), "--flush-secs", "1"]);
    assert_eq!(curl(&u.url("/users/6"), &[]).status, 200);
    wait_until("the refusal reported", Duration::from_secs(10), || obs.stderr().contains("unreachable"));
    let (summary, _) = obs.stop();
    assert_eq!(summary["oap_sent"], 0, "{summary}");
    assert_eq!(rx3.store.segments().len(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn service_name_from_the_targets_environment() {
    require_root();
    let rx = Receiver::start();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let u = Uwsgi::start_env(
        "sw-env",
        &["--master", "--workers", "1", "--http-socket", &addr],
        Ready::Port(port),
        &[("SW_AGENT_NAME", "from-env"), ("DJANGO_SETTINGS_MODULE", "x.settings")],
    );
    let obs = attach_oap(&u, &rx, &[]);
    assert!(
        obs.stderr().contains("as service \"from-env\" (SW_AGENT_NAME of the target), component 7004"),
        "{}",
        obs.stderr()
    );
    assert_eq!(curl(&u.url("/users/1"), &[]).status, 200);
    wait_until("segment", Duration::from_secs(20), || rx.store.segments().len() == 1);
    obs.stop();
    let seg = &rx.store.segments()[0];
    assert_eq!(seg.service, "from-env");
    assert_eq!(seg.spans[0].component_id, 7004);
    // No flag, no environment: the app named on the command line.
    let (u2, _) = start_app("sw-env2", "1");
    let rx2 = Receiver::start();
    let obs = attach_oap(&u2, &rx2, &[]);
    assert!(
        obs.stderr().contains("as service \"flask_app\" (the app named on uWSGI's command line), component 7000"),
        "{}",
        obs.stderr()
    );
    obs.stop();
}
