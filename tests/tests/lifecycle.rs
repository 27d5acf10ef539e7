//! Workers come and go (kill -9, --max-requests, HUP, several instances): every request to
//! a new worker is still captured, births and deaths are reported, and detaching leaves no
//! eBPF program behind.

use std::{collections::BTreeSet, time::Duration};

use observer_tests::*;
use serde_json::Value;

fn procs(obs: &Observer, action: &str) -> Vec<u64> {
    obs.records("process").iter().filter(|p| p["action"] == action).map(|p| p["pid"].as_u64().unwrap()).collect()
}

/// Sends requests /users/K?tag=K for K in `range`, asserting each answered 200.
fn send(u: &Uwsgi, tag: &str, range: std::ops::Range<u32>) {
    for k in range {
        let r = curl(&u.url(&format!("/users/{k}?{tag}={k}")), &[]);
        assert_eq!(r.status, 200);
    }
}

fn workers_of(records: &[Value]) -> BTreeSet<u64> {
    records.iter().map(|r| r["worker_pid"].as_u64().unwrap()).collect()
}

fn start(tag: &str, extra: &[&str]) -> Uwsgi {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--master", "--http-socket", &addr];
    args.extend_from_slice(extra);
    Uwsgi::start(Build::Pip, tag, &args, Ready::Port(port))
}

#[test]
fn worker_kill9_and_respawn() {
    kill9_respawn("kill9", &["--workers", "1"]);
}

#[test]
fn lazy_apps_worker_kill9_and_respawn() {
    // With --lazy-apps the respawned worker imports the app itself after the fork.
    kill9_respawn("kill9-lazy", &["--workers", "1", "--lazy-apps"]);
}

fn kill9_respawn(tag: &str, args: &[&str]) {
    require_root();
    let u = start(tag, args);
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    send(&u, "before", 0..3);
    obs.wait_requests(3);
    let old = u.wait_children(1);
    // SAFETY: killing the worker we started.
    unsafe { libc::kill(old[0] as i32, libc::SIGKILL) };
    wait_until("respawn", Duration::from_secs(15), || {
        let c = u.children();
        c.len() == 1 && c[0] != old[0]
    });
    let new = u.children()[0];
    send(&u, "after", 0..3);
    let records = obs.wait_requests(6);
    assert_eq!(records.len(), 6);
    for k in 0..3 {
        assert_eq!(find(&records, &format!("/users/{k}"), &format!("before={k}"))["worker_pid"], old[0]);
        assert_eq!(find(&records, &format!("/users/{k}"), &format!("after={k}"))["worker_pid"], new);
    }
    wait_until("exit and fork records", Duration::from_secs(5), || {
        procs(&obs, "exit").contains(&(old[0] as u64)) && procs(&obs, "fork").contains(&(new as u64))
    });
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], 6);
    assert_eq!(summary["lost_ring_full"], 0);
}

#[test]
fn max_requests_recycling() {
    require_root();
    let u = start("maxreq", &["--workers", "1", "--max-requests", "3", "--min-worker-lifetime", "1"]);
    let first = u.wait_children(1)[0] as u64;
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    // 3 requests per round, 1.2 s apart: the worker has lived long enough to be recycled.
    let mut sent = 0;
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(1200));
        send(&u, &format!("r{round}"), 0..3);
        sent += 3;
    }
    let records = obs.wait_requests(sent);
    assert_eq!(records.len(), sent);
    let workers = workers_of(&records);
    assert!(workers.len() >= 2, "expected requests on recycled workers, got {workers:?}");
    let forks: BTreeSet<u64> = procs(&obs, "fork").into_iter().collect();
    // Every worker but the first was born while we watched, and reported.
    for w in workers.iter().filter(|w| **w != first) {
        assert!(forks.contains(w), "worker {w} served but its fork was not reported: {forks:?}");
    }
    assert!(procs(&obs, "exit").contains(&first), "the recycled worker's exit is reported");
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], sent as u64);
}

#[test]
fn master_hup_reload() {
    hup_reload(Build::Pip, "hup");
}

#[test]
fn master_hup_reload_debian() {
    // Debian: after the re-exec only uwsgi-core is mapped; the handler's plugin comes later.
    hup_reload(Build::Debian, "hup-deb");
}

fn hup_reload(build: Build, tag: &str) {
    require_root();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--master", "--workers", "2", "--http-socket", &addr];
    if build == Build::Debian {
        // The re-exec runs /usr/bin/uwsgi-core, which loads no plugin by its name: ask for it.
        args.extend(["--plugin", "python311"]);
    }
    let u = Uwsgi::start(build, tag, &args, Ready::Port(port));
    let master = u.master_pid();
    let obs = Observer::attach(&["--pid", &master.to_string()]);
    send(&u, "before", 0..4);
    obs.wait_requests(4);
    let old: BTreeSet<u32> = u.wait_children(2).into_iter().collect();
    // SAFETY: signalling the master we started.
    unsafe { libc::kill(master as i32, libc::SIGHUP) };
    wait_until("new workers after HUP", Duration::from_secs(30), || {
        let now: BTreeSet<u32> = u.children().into_iter().collect();
        now.len() == 2 && now.is_disjoint(&old)
    });
    wait_until("listening again", Duration::from_secs(10), || tcp_listening(u.port));
    send(&u, "after", 0..4);
    let records = obs.wait_requests(8);
    assert_eq!(records.len(), 8);
    let new: BTreeSet<u32> = u.children().into_iter().collect();
    for k in 0..4 {
        let r = find(&records, &format!("/users/{k}"), &format!("after={k}"));
        assert!(new.contains(&(r["worker_pid"].as_u64().unwrap() as u32)), "{r}");
        assert_eq!(r["instance"], master);
    }
    assert!(procs(&obs, "exec").contains(&(master as u64)), "the master's re-exec is reported");
    let (summary, _) = obs.stop();
    assert_eq!(summary["requests"], 8);
    assert_eq!(summary["execs"], 1);
}

#[test]
fn several_instances_and_any_pid() {
    require_root();
    let a = start("multi-a", &["--workers", "2"]);
    let b = start("multi-b", &["--workers", "1"]);
    // Any pid of an instance will do: give a worker of A and the master of B.
    let a_worker = a.wait_children(2)[0];
    let obs = Observer::attach(&["--pid", &a_worker.to_string(), "--pid", &b.master_pid().to_string()]);
    send(&a, "a", 0..3);
    send(&b, "b", 0..2);
    let records = obs.wait_requests(5);
    assert_eq!(records.len(), 5);
    for k in 0..3 {
        assert_eq!(find(&records, &format!("/users/{k}"), &format!("a={k}"))["instance"], a.master_pid());
    }
    for k in 0..2 {
        assert_eq!(find(&records, &format!("/users/{k}"), &format!("b={k}"))["instance"], b.master_pid());
    }
    obs.stop();
}

#[test]
fn detach_leaves_nothing_behind() {
    require_root();
    assert!(loaded_programs_of_ours().is_empty(), "programs of ours loaded before the test");
    let u = start("detach", &["--workers", "1"]);
    let obs = Observer::attach(&["--pid", &u.master_pid().to_string()]);
    let loaded = loaded_programs_of_ours();
    for p in OUR_PROGRAMS {
        assert!(loaded.iter().any(|l| l == p), "{p} not loaded while attached: {loaded:?}");
    }
    send(&u, "x", 0..2);
    obs.wait_requests(2);
    let (summary, stderr) = obs.stop();
    assert_eq!(summary["requests"], 2);
    assert!(stderr.contains("observer: detached. requests=2 workers=1"), "{stderr}");
    assert!(loaded_programs_of_ours().is_empty(), "programs left loaded: {:?}", loaded_programs_of_ours());
    // The app keeps serving, unharmed.
    assert_eq!(curl(&u.url("/"), &[]).status, 200);
}

#[test]
fn sigterm_detaches_and_target_exit_ends_the_run() {
    require_root();
    let u = start("sigterm", &["--workers", "1"]);
    let child = std::process::Command::new(observer_bin())
        .args(["attach", "--pid", &u.master_pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("programs loaded", Duration::from_secs(20), || loaded_programs_of_ours().len() == 4);
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("observer: detached."));
    assert!(loaded_programs_of_ours().is_empty());

    // When every observed instance exits, the observer detaches by itself.
    let obs = std::process::Command::new(observer_bin())
        .args(["attach", "--pid", &u.master_pid().to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("programs loaded", Duration::from_secs(20), || loaded_programs_of_ours().len() == 4);
    drop(u);
    let out = obs.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("every observed uWSGI instance has exited"), "{err}");
    assert!(loaded_programs_of_ours().is_empty());
}
