//! Exceptions read from the Python interpreter: a failed request carries the exception that
//! failed it (type, message, frames with file/line/function, the traceback text), whether or
//! not the app logs it; control-flow exceptions never do. Flask, Django (DEBUG=False) and a
//! bare WSGI app, on the pip build (pyenv 3.11.7) and Debian's (3.11.2, stripped).

use std::time::Duration;

use observer_tests::{receiver::Receiver, *};
use serde_json::Value;

/// Line number of the first line of `tests/apps/<file>` containing `text`.
fn line_of(file: &str, text: &str) -> i64 {
    let src = std::fs::read_to_string(apps().join(file)).unwrap();
    src.lines().position(|l| l.contains(text)).unwrap_or_else(|| panic!("{text:?} not in {file}")) as i64 + 1
}

fn start(build: Build, tag: &str, file: &str, extra: &[&str]) -> Uwsgi {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--master", "--workers", "2", "--http-socket", addr.as_str()];
    args.extend_from_slice(extra);
    Uwsgi::start_app(build, tag, &args, Ready::Port(port), file, "application")
}

/// Attaches to `u`, requests `paths` in order, detaches: the request records and the summary.
fn run_paths(u: &Uwsgi, extra: &[&str], paths: &[&str]) -> (Vec<Value>, Value) {
    let master = u.master_pid().to_string();
    let mut args = vec!["--pid", master.as_str()];
    args.extend_from_slice(extra);
    let obs = Observer::attach(&args);
    for p in paths {
        curl(&u.url(p), &[]);
    }
    let records = obs.wait_requests(paths.len());
    let (summary, _) = obs.stop();
    assert_eq!(records.len(), paths.len(), "{records:#?}");
    (records, summary)
}

fn only<'a>(records: &'a [Value], path: &str) -> &'a Value {
    let m: Vec<&Value> = records.iter().filter(|r| r["path"] == path).collect();
    assert_eq!(m.len(), 1, "one record for {path}: {records:#?}");
    m[0]
}

/// Checks one reported exception: type, message, innermost frames (file suffix, function,
/// line), the frame that caught it, and that the traceback text says the same.
fn check_exception(r: &Value, ty: &str, msg: &str, inner: &[(&str, &str, i64)], outer: Option<(&str, &str)>) {
    let e = &r["exception"];
    assert!(e.is_object(), "{} should carry an exception: {r:#}", r["path"]);
    assert_eq!(e["type"], ty);
    assert_eq!(e["message"], msg);
    let frames = e["frames"].as_array().unwrap();
    assert!(frames.len() >= inner.len(), "{frames:#?}");
    // Outermost first, as Python prints: the innermost frames are the last ones.
    let tail = &frames[frames.len() - inner.len()..];
    for (f, (file, func, line)) in tail.iter().zip(inner) {
        assert!(f["file"].as_str().unwrap().ends_with(file), "{f} vs {file}");
        assert_eq!(f["function"], *func, "{f}");
        assert_eq!(f["line"], *line, "{f}");
    }
    if let Some((file, func)) = outer {
        assert!(frames[0]["file"].as_str().unwrap().ends_with(file), "outermost {}", frames[0]);
        assert_eq!(frames[0]["function"], func);
    }
    let text = e["traceback"].as_str().unwrap();
    assert!(text.starts_with("Traceback (most recent call last):\n"), "{text}");
    assert!(text.ends_with(&format!("{ty}: {msg}\n")), "{text}");
    let (file, func, line) = inner.last().unwrap();
    assert!(text.contains(&format!("{file}\", line {line}, in {func}\n")), "{text}");
}

fn no_exception(r: &Value) {
    assert!(r.get("exception").is_none(), "{} must not carry an exception: {r:#}", r["path"]);
}

/// Flask: the view's exception (Flask catches it, logs it and answers 500), an exception
/// escaping the app into uWSGI, a 500 the view returns by itself, a caught exception, a 404.
fn flask_cases(build: Build, tag: &str) {
    let u = start(build, tag, "flask_app.py", &[]);
    let rx = Receiver::start();
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string(), "--oap", &rx.address(), "--service", "errors"]);
    let paths = ["/error", "/crash", "/status/500", "/caught", "/missing", "/", "/error", "/handled"];
    for p in paths {
        curl(&u.url(p), &[]);
    }
    let records = obs.wait_requests(paths.len());
    assert_eq!(records.len(), paths.len());
    let raise = line_of("flask_app.py", "raise RuntimeError(\"boom 42\")");
    let errors: Vec<&Value> = records.iter().filter(|r| r["path"] == "/error").collect();
    assert_eq!(errors.len(), 2);
    for r in &errors {
        assert_eq!(r["status"], 500);
        check_exception(
            r,
            "RuntimeError",
            "boom 42",
            &[("flask_app.py", "error", raise)],
            Some(("/flask/app.py", "wsgi_app")),
        );
    }
    let crash = only(&records, "/crash");
    check_exception(
        crash,
        "ValueError",
        "escaped to uwsgi",
        &[("flask_app.py", "__call__", line_of("flask_app.py", "raise ValueError(\"escaped to uwsgi\")"))],
        None,
    );
    assert_eq!(crash["exception"]["escaped"], true);
    assert_eq!(crash["exception"]["frames"].as_array().unwrap().len(), 1);
    // An app-level errorhandler turned it into a 503: still the exception that failed it.
    let handled = only(&records, "/handled");
    assert_eq!(handled["status"], 503);
    check_exception(
        handled,
        "OutOfStock",
        "sku 9",
        &[("flask_app.py", "handled", line_of("flask_app.py", "raise OutOfStock(\"sku 9\")"))],
        Some(("/flask/app.py", "full_dispatch_request")),
    );
    let own500 = only(&records, "/status/500");
    assert_eq!(own500["status"], 500);
    no_exception(own500);
    for p in ["/caught", "/missing", "/"] {
        no_exception(only(&records, p));
    }
    assert_eq!(only(&records, "/caught")["status"], 200);

    // The spans: isError where the status says so, a "Traceback" log exactly where an
    // exception failed the request.
    wait_until("8 segments", Duration::from_secs(20), || rx.store.segments().len() >= paths.len());
    let (summary, _) = obs.stop();
    let segs = rx.store.segments();
    assert_eq!(segs.len(), paths.len());
    for s in &segs {
        let sp = &s.spans[0];
        let status: u16 = sp.tags.iter().find(|t| t.key == "http.status_code").unwrap().value.parse().unwrap();
        // The agent's rule (and our default --error-status): 4xx and 5xx are errors.
        assert_eq!(sp.is_error, status >= 400, "{}", sp.operation_name);
        match sp.operation_name.as_str() {
            "/error" | "/crash" | "/handled" => {
                assert_eq!(sp.logs.len(), 1, "{sp:?}");
                let kv = &sp.logs[0].data;
                assert_eq!(kv.len(), 1);
                assert_eq!(kv[0].key, "Traceback");
                let want = match sp.operation_name.as_str() {
                    "/error" => "RuntimeError: boom 42\n",
                    "/handled" => "OutOfStock: sku 9\n",
                    _ => "ValueError: escaped to uwsgi\n",
                };
                assert!(kv[0].value.ends_with(want), "{}", kv[0].value);
                assert_eq!(sp.logs[0].time, sp.end_time);
            }
            _ => assert!(sp.logs.is_empty(), "{sp:?}"),
        }
    }
    assert_eq!(summary["exceptions_reported"], 4, "{summary}");
    // The view that returns a 500 by itself raised only control-flow exceptions (<= 2
    // frames): the kernel sends nothing for it.
    assert_eq!(summary["exceptions_unresolved"], serde_json::json!({}), "{summary}");
    assert_eq!(summary["lost_exceptions_ring_full"], 0);
    assert_eq!(summary["py_read_errors"], 0);
    assert!(summary["py_frames_unwound"].as_u64().unwrap() > 3 * 2 + 5, "{summary}");
}

#[test]
fn pip_flask_exceptions() {
    require_root();
    flask_cases(Build::Pip, "exc-flask");
}

/// Debian's uWSGI plugin and Debian's stripped libpython3.11 (and Debian's Flask).
#[test]
fn debian_flask_exceptions() {
    require_root();
    flask_cases(Build::Debian, "exc-debian");
}

/// Django with DEBUG=False and no logging set up: nothing is printed for the 500, the
/// traceback still reaches the span.
#[test]
fn pip_django_exceptions() {
    require_root();
    let u = start(Build::Pip, "exc-django", "django_app.py", &[]);
    let (records, summary) = run_paths(&u, &[], &["/error", "/caught", "/"]);
    let f = "django_app.py";
    let e = only(&records, "/error");
    assert_eq!(e["status"], 500);
    check_exception(
        e,
        "RuntimeError",
        "boom 42",
        &[
            (f, "error", line_of(f, "    middle()")),
            (f, "middle", line_of(f, "return inner()")),
            (f, "inner", line_of(f, "raise RuntimeError(\"boom 42\")")),
        ],
        Some(("/django/core/handlers/exception.py", "inner")),
    );
    assert!(!u.log().contains("boom 42"), "the app does not log it: {}", u.log());
    no_exception(only(&records, "/caught"));
    no_exception(only(&records, "/"));
    assert_eq!(summary["exceptions_reported"], 1, "{summary}");
}

/// bare_wsgi.py's /error: ValueError("bare 7") raised in helper(), called by the callable,
/// escaped into uWSGI: exactly those two frames.
fn check_bare_exception(r: &Value) {
    let f = "bare_wsgi.py";
    check_exception(
        r,
        "ValueError",
        "bare 7",
        &[
            (f, "application", line_of(f, "        helper()")),
            (f, "helper", line_of(f, "raise ValueError(\"bare 7\")")),
        ],
        Some((f, "application")),
    );
    assert_eq!(r["exception"]["frames"].as_array().unwrap().len(), 2);
    assert_eq!(r["exception"]["escaped"], true);
}

/// A bare WSGI callable whose exception escapes into uWSGI.
#[test]
fn pip_bare_wsgi_exception() {
    require_root();
    let u = start(Build::Pip, "exc-bare", "bare_wsgi.py", &[]);
    let (records, summary) = run_paths(&u, &[], &["/error", "/", "/error"]);
    let errors: Vec<&Value> = records.iter().filter(|r| r["path"] == "/error").collect();
    assert_eq!(errors.len(), 2);
    for r in errors {
        assert_eq!(r["status"], 500);
        check_bare_exception(r);
    }
    no_exception(only(&records, "/"));
    assert_eq!(summary["exceptions_reported"], 2, "{summary}");
}

/// Threads: each failed request gets its own thread's exception, concurrent successful
/// requests (raising and catching their own) none.
#[test]
fn pip_threads_exceptions() {
    require_root();
    let u = start(Build::Pip, "exc-threads", "flask_app.py", &["--threads", "4"]);
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    let base = u.url("");
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let url = format!("{base}{}", ["/error", "/caught", "/slow"][i % 3]);
            std::thread::spawn(move || curl(&url, &[]))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let records = obs.wait_requests(12);
    let (summary, _) = obs.stop();
    assert_eq!(records.len(), 12);
    let raise = line_of("flask_app.py", "raise RuntimeError(\"boom 42\")");
    for r in &records {
        if r["path"] == "/error" {
            check_exception(r, "RuntimeError", "boom 42", &[("flask_app.py", "error", raise)], None);
        } else {
            no_exception(r);
        }
    }
    assert_eq!(summary["exceptions_reported"], 4, "{summary}");
}

/// gevent runs many requests on one thread: their exceptions cannot be told apart from
/// outside, so none is attributed (each is counted); the span is still an error by status.
#[test]
fn pip_gevent_exceptions_not_attributed() {
    require_root();
    let u = start(Build::Pip, "exc-gevent", "flask_app.py", &["--gevent", "50", "--gevent-monkey-patch"]);
    let (records, summary) = run_paths(&u, &[], &["/error", "/", "/error"]);
    for r in &records {
        no_exception(r);
    }
    assert_eq!(records.iter().filter(|r| r["status"] == 500).count(), 2);
    assert_eq!(summary["exceptions_reported"], 0);
    assert_eq!(summary["exceptions_unresolved"], serde_json::json!({"async worker (not attributed)": 2}), "{summary}");
}

/// Every CPython the layout table covers besides the main venv's 3.11, as far as this
/// machine has it (pyenv): uWSGI built against it, a bare WSGI app whose exception escapes.
/// 3.12+ find the thread state through the GIL's last holder, 3.8-3.10 read frames without
/// `_PyInterpreterFrame`, 3.8/3.9 decode `co_lnotab`.
#[test]
fn other_python_versions() {
    require_root();
    let f = "bare_wsgi.py";
    let mut tested = Vec::new();
    for minor in ["3.8", "3.9", "3.10", "3.12", "3.13"] {
        let have = std::fs::read_dir("/root/.pyenv/versions")
            .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&format!("{minor}."))))
            .unwrap_or(false);
        if !have {
            println!("CPython {minor}: not on this machine");
            continue;
        }
        assert!(
            python_venv(minor).join("bin/uwsgi").exists(),
            "CPython {minor} is here but .venv-py{minor} is not: run ./x setup"
        );
        let u = start(Build::PipPython(minor), &format!("exc-py{minor}"), f, &[]);
        let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
        assert!(obs.stderr().contains(&format!("Python {minor}.")), "{}", obs.stderr());
        for p in ["/error", "/", "/error"] {
            curl(&u.url(p), &[]);
        }
        let records = obs.wait_requests(3);
        let (summary, _) = obs.stop();
        for r in records.iter().filter(|r| r["path"] == "/error") {
            check_bare_exception(r);
        }
        no_exception(only(&records, "/"));
        assert_eq!(summary["exceptions_reported"], 2, "{minor}: {summary}");
        tested.push(minor);
    }
    println!("tested: {tested:?}");
}

/// Wrong interpreter offsets (the hidden --py-layout-shift moves the code-object offset)
/// never produce a traceback: the frames fail the type check, each record is counted, and
/// after 3 with none good tracebacks are turned off for the instance with a warning. The
/// requests themselves are still reported, as errors by status.
#[test]
fn wrong_interpreter_layout_never_gives_a_traceback() {
    require_root();
    let u = start(Build::Pip, "exc-shift", "flask_app.py", &[]);
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string(), "--py-layout-shift", "8"]);
    for _ in 0..5 {
        curl(&u.url("/error"), &[]);
    }
    let records = obs.wait_requests(5);
    let (summary, stderr) = obs.stop();
    assert_eq!(records.len(), 5);
    for r in &records {
        assert_eq!(r["status"], 500);
        no_exception(r);
    }
    assert_eq!(summary["exceptions_reported"], 0);
    let unresolved = summary["exceptions_unresolved"]
        ["a frame's code object could not be read or is not a code object"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(unresolved, 3, "{summary}");
    assert_eq!(stderr.matches("did not validate on live data").count(), 1, "{stderr}");
}

/// `--exceptions on-error`: no exception probe while the app is healthy; the first 5xx
/// turns them on (that request is an error by status only), later failures carry their
/// traceback.
#[test]
fn exceptions_on_error_mode() {
    require_root();
    let u = start(Build::Pip, "exc-onerror", "flask_app.py", &[]);
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string(), "--exceptions", "on-error"]);
    assert!(obs.stderr().contains("(probes armed at the first 5xx)"), "{}", obs.stderr());
    for _ in 0..3 {
        curl(&u.url("/"), &[]);
    }
    curl(&u.url("/error"), &[]);
    wait_until("exception probes on", Duration::from_secs(10), || obs.stderr().contains("a 5xx: exception probes on"));
    curl(&u.url("/error"), &[]);
    let records = obs.wait_requests(5);
    let (summary, stderr) = obs.stop();
    let errors: Vec<&Value> = records.iter().filter(|r| r["path"] == "/error").collect();
    assert_eq!(errors.len(), 2);
    no_exception(errors[0]);
    let raise = line_of("flask_app.py", "raise RuntimeError(\"boom 42\")");
    check_exception(errors[1], "RuntimeError", "boom 42", &[("flask_app.py", "error", raise)], None);
    assert_eq!(summary["exceptions_reported"], 1, "{summary}");
    assert_eq!(stderr.matches("exception probes on").count(), 1, "{stderr}");
}
