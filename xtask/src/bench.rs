//! `./x bench`: what the observer costs the app, side by side with the in-process agent.
//!
//! For each socket mode and route, three configs run in interleaved rounds (A B C A B C ...):
//! A the bare app, B the app with the observer reporting to the test receiver, C the app
//! under the official Python agent (`sw-python run -p uwsgi`) reporting to the same kind of
//! receiver. wrk on loopback drives each run. Results go to docs/benchmarks.md and
//! docs/benchmarks.json. Timings are printed, never asserted; `--short` (CI smoke) asserts
//! only that every run completes and, for B, that every span arrives.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{root, setup};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Bare,
    Observer,
    Agent,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Bare => "A bare app",
            Config::Observer => "B observer",
            Config::Agent => "C in-process agent",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    app_cpu_us_per_req: f64,
    observer_cpu_us_per_req: f64,
    observer_rss_mb: f64,
    spans: u64,
    spans_expected: u64,
    observer_lost: u64,
    /// Requests the app served (wrk's count, warm-up included).
    served: u64,
    lost_ring_full: u64,
    oap_dropped: u64,
    /// Kernel probe activity from the observer's summary (per run, warm-up included).
    py_frames: u64,
    exit_calls: u64,
}

/// The app under test: a file in tests/apps and its environment.
#[derive(Clone, Copy)]
struct App<'a> {
    file: &'a str,
    env: &'a [(String, String)],
}

const FLASK: App<'static> = App { file: "flask_app.py", env: &[] };

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        // SAFETY: signals to a process group we created.
        unsafe { libc::kill(-pgid, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(self.0.try_wait(), Ok(Some(_))) {
            sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(18200)
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        sleep(Duration::from_millis(50));
    }
    bail!("timed out waiting for {what}")
}

fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out
}

/// utime + stime of a process (all its threads), in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is 0, utime 11, stime 12 (fields 14 and 15 of stat).
    let ticks: u64 =
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0) + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / hz
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            })
        })
        .flatten()
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Wrk {
    requests: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn parse_ms(v: &str) -> f64 {
    let v = v.trim();
    let (num, mul) = if let Some(x) = v.strip_suffix("us") {
        (x, 0.001)
    } else if let Some(x) = v.strip_suffix("ms") {
        (x, 1.0)
    } else if let Some(x) = v.strip_suffix('s') {
        (x, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().unwrap_or(0.0) * mul
}

fn wrk(url: &str, secs: u64) -> Result<Wrk> {
    let out = Command::new("wrk")
        .args(["-t2", "-c16", &format!("-d{secs}s"), "--latency", url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut w = Wrk { requests: 0, rps: 0.0, p50_ms: 0.0, p99_ms: 0.0 };
    for l in text.lines() {
        let t = l.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = parse_ms(v);
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = parse_ms(v);
        } else if t.contains("requests in") {
            w.requests = t.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    if w.requests == 0 {
        bail!("wrk produced no requests: {text}");
    }
    Ok(w)
}

/// The receiver (an OAP stand-in) with a live segment count.
struct Receiver {
    _p: Proc,
    port: u16,
    count: Arc<Mutex<u64>>,
}

fn receiver() -> Result<Receiver> {
    let port = free_port();
    let mut c = Command::new(root().join("target/release/sw-receiver"));
    c.arg(port.to_string()).arg("--count").stdout(Stdio::piped()).stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut child = c.spawn().context("starting sw-receiver")?;
    let out = child.stdout.take().context("receiver stdout")?;
    let count = Arc::new(Mutex::new(0u64));
    let c2 = count.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("segments total=").and_then(|n| n.parse().ok()) {
                *c2.lock().unwrap() = n;
            }
        }
    });
    let r = Receiver { _p: Proc(child), port, count };
    wait_for("the receiver", 10, || listening(port))?;
    Ok(r)
}

fn one_run(cfg: Config, mode: &str, route: &str, secs: u64, observer: &Path) -> Result<Run> {
    one_run_with(cfg, mode, route, secs, observer, &[])
}

fn one_run_with(cfg: Config, mode: &str, route: &str, secs: u64, observer: &Path, extra: &[&str]) -> Result<Run> {
    one_run_app(FLASK, cfg, mode, route, secs, observer, extra)
}

fn one_run_app(
    app: App,
    cfg: Config,
    mode: &str,
    route: &str,
    secs: u64,
    observer: &Path,
    extra: &[&str],
) -> Result<Run> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let rx = if cfg == Config::Bare { None } else { Some(receiver()?) };
    let venv = setup::venv();
    let mut cmd = match cfg {
        Config::Agent => {
            let mut c = Command::new(venv.join("bin/sw-python"));
            c.args(["run", "-p", "uwsgi"])
                .env("PATH", format!("{}:{}", venv.join("bin").display(), std::env::var("PATH").unwrap_or_default()))
                .env("SW_AGENT_COLLECTOR_BACKEND_SERVICES", format!("127.0.0.1:{}", rx.as_ref().map_or(0, |r| r.port)))
                .env("SW_AGENT_NAME", "bench")
                .env("SW_AGENT_LOGGING_LEVEL", "ERROR")
                .env("SW_AGENT_METER_REPORTER_ACTIVE", "False");
            c
        }
        _ => Command::new(venv.join("bin/uwsgi")),
    };
    cmd.current_dir(root().join("tests/apps"))
        .args(["--master", "--workers", "2", mode, &addr, "--wsgi-file", app.file, "--callable", "application"])
        .envs(app.env.iter().map(|(k, v)| (k, v)))
        .args(["--disable-logging", "--die-on-term"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let app = Proc(cmd.spawn().context("starting uwsgi")?);
    wait_for("uwsgi to listen", 30, || listening(port))?;
    // The master: the uwsgi process in our group whose parent is not uwsgi.
    let master = find_master(app.0.id())?;
    wait_for("2 workers", 30, || children(master).len() >= if mode == "--http" { 3 } else { 2 })?;

    let summary = std::env::temp_dir().join(format!("observer-bench-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&summary);
    let obs = if cfg == Config::Observer {
        let mut c = Command::new(observer);
        c.args([
            "attach",
            "--pid",
            &master.to_string(),
            "--format",
            "none",
            "--service",
            "bench",
            "--framework",
            "flask",
        ])
        .arg("--oap")
        .arg(format!("127.0.0.1:{}", rx.as_ref().map_or(0, |r| r.port)))
        .arg("--summary-file")
        .arg(&summary)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        let mut child = c.spawn().context("starting the observer")?;
        let err = child.stderr.take().context("observer stderr")?;
        let (tx, rxc) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("observer: attached") {
                    let _ = tx.send(());
                }
            }
        });
        rxc.recv_timeout(Duration::from_secs(30)).context("observer did not attach")?;
        Some(Proc(child))
    } else {
        None
    };
    let url = format!("http://{addr}{route}");
    // Warm-up (the agent's first requests are slow; caches fill).
    let warm = wrk(&url, 2)?;
    let pids: Vec<u32> = children(master);
    let app_cpu0: u64 = pids.iter().map(|p| cpu_us(*p)).sum();
    let obs_cpu0 = obs.as_ref().map_or(0, |o| cpu_us(o.0.id()));
    let w = wrk(&url, secs)?;
    let app_cpu1: u64 = pids.iter().map(|p| cpu_us(*p)).sum();
    let obs_cpu1 = obs.as_ref().map_or(0, |o| cpu_us(o.0.id()));
    let mut run = Run {
        rps: w.rps,
        p50_ms: w.p50_ms,
        p99_ms: w.p99_ms,
        app_cpu_us_per_req: (app_cpu1 - app_cpu0) as f64 / w.requests as f64,
        observer_cpu_us_per_req: (obs_cpu1 - obs_cpu0) as f64 / w.requests as f64,
        served: warm.requests + w.requests,
        ..Default::default()
    };
    if let Some(o) = obs {
        run.observer_rss_mb = rss_mb(o.0.id());
        drop(o); // SIGINT: detach, flush the queue, write the summary
        let text = std::fs::read_to_string(&summary).context("observer summary")?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        run.spans_expected = v["requests"].as_u64().unwrap_or(0);
        run.observer_lost = ["lost_ring_full", "oap_dropped_queue_full", "oap_dropped_at_shutdown"]
            .iter()
            .map(|k| v[*k].as_u64().unwrap_or(0))
            .sum();
        run.lost_ring_full = v["lost_ring_full"].as_u64().unwrap_or(0);
        run.py_frames = v["py_frames_unwound"].as_u64().unwrap_or(0);
        run.exit_calls = v["exit_calls"].as_u64().unwrap_or(0);
        run.oap_dropped =
            v["oap_dropped_queue_full"].as_u64().unwrap_or(0) + v["oap_dropped_at_shutdown"].as_u64().unwrap_or(0);
        let _ = std::fs::remove_file(&summary);
    } else {
        run.spans_expected = warm.requests + w.requests;
    }
    if let Some(r) = &rx {
        // Let what is in flight land.
        let mut last = u64::MAX;
        for _ in 0..100 {
            let n = *r.count.lock().unwrap();
            if n == last && n >= run.spans_expected.min(n) {
                break;
            }
            last = n;
            sleep(Duration::from_millis(200));
        }
        run.spans = *r.count.lock().unwrap();
    }
    drop(app);
    Ok(run)
}

fn find_master(pgid_leader: u32) -> Result<u32> {
    // Without an agent the spawned process is the master; with `sw-python run` it may exec
    // uwsgi in place (same pid) or start it as a child.
    let comm = |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
    if comm(pgid_leader).trim().starts_with("uwsgi") {
        return Ok(pgid_leader);
    }
    children(pgid_leader).into_iter().find(|c| comm(*c).trim().starts_with("uwsgi")).context("no uwsgi master found")
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

pub fn bench(observer: &Path, short: bool, rounds: usize, secs: u64) -> Result<()> {
    let (rounds, secs) = if short { (1, 2) } else { (rounds, secs) };
    let modes = ["--http", "--http-socket"];
    let routes = [("/", "hello"), ("/work", "~1 ms of work")];
    let configs = [Config::Bare, Config::Observer, Config::Agent];
    let mut results: Vec<(String, String, Config, Vec<Run>)> = Vec::new();
    for mode in modes {
        for (route, _) in routes {
            for c in configs {
                results.push((mode.to_string(), route.to_string(), c, Vec::new()));
            }
        }
    }
    for round in 0..rounds {
        for mode in modes {
            for (route, _) in routes {
                for c in configs {
                    println!("== round {}/{rounds}: {mode} {route} {}", round + 1, c.name());
                    let r = one_run(c, mode, route, secs, observer)
                        .with_context(|| format!("{mode} {route} {}", c.name()))?;
                    println!(
                        "   {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, app CPU {:.0} us/req, observer CPU {:.1} us/req, spans {}/{}",
                        r.rps, r.p50_ms, r.p99_ms, r.app_cpu_us_per_req, r.observer_cpu_us_per_req, r.spans, r.spans_expected
                    );
                    if c == Config::Observer && (r.spans != r.spans_expected || r.observer_lost != 0) {
                        bail!(
                            "observer lost spans: {} of {} arrived, {} counted lost",
                            r.spans,
                            r.spans_expected,
                            r.observer_lost
                        );
                    }
                    results
                        .iter_mut()
                        .find(|(m, rt, cc, _)| m == mode && rt == route && *cc == c)
                        .expect("slot")
                        .3
                        .push(r);
                }
            }
        }
    }
    let saturation = if short { None } else { Some(saturation(observer, secs)?) };
    let probes = probes_section(observer, rounds, secs, short)?;
    write_report(&results, rounds, secs, short, &[saturation.as_deref().unwrap_or(""), &probes])
}

/// Zero loss at the bare app's saturation (wrk's closed loop drives the app as fast as it
/// goes), then the observer pushed beyond what it is given (a 16 KiB ring, a 50-segment
/// queue, no flush time at detach) to show that the drop counters add up.
fn saturation(observer: &Path, secs: u64) -> Result<String> {
    let mut md = String::from("## Saturation\n\n");
    md.push_str("`--http-socket`, route `/`, wrk closed loop (the app's own saturation rate).\n\n");
    md.push_str("| observer settings | req/s | requests served | spans delivered | lost: ring full | lost: OAP queue | delivered + lost |\n|---|---|---|---|---|---|---|\n");
    for (label, extra) in [
        ("defaults (4 MiB ring, 10,000-segment queue)", vec![]),
        (
            "pushed beyond: 16 KiB ring, 50-segment queue, no flush at detach",
            vec!["--ring-bytes", "16384", "--queue-max", "50", "--flush-secs", "0"],
        ),
    ] {
        println!("== saturation: {label}");
        let r = one_run_with(Config::Observer, "--http-socket", "/", secs, observer, &extra)?;
        md.push_str(&format!(
            "| {label} | {:.0} | {} | {} | {} | {} | {} |\n",
            r.rps,
            r.served,
            r.spans,
            r.lost_ring_full,
            r.oap_dropped,
            r.spans + r.lost_ring_full + r.oap_dropped
        ));
    }
    md.push_str("\nRequests served counts what wrk saw complete; a few requests in flight when wrk stops are served but not counted, so delivered + lost can exceed it slightly. With the defaults nothing is lost at the app's saturation rate; pushed beyond, every loss is counted by cause.\n\n");
    Ok(md)
}

/// The exception and exit-span probes, on and off: routes that raise (and catch) Python
/// exceptions or make outbound calls, each with B (every probe), R (the request probe only:
/// `--no-exceptions --no-exit-spans`) and A (bare), interleaved; `--http-socket`.
fn probes_section(observer: &Path, rounds: usize, secs: u64, short: bool) -> Result<String> {
    let rport = free_port();
    let hport = std::iter::repeat_with(free_port).find(|p| *p != rport).unwrap_or(rport);
    let _backends = crate::start_backends(rport, hport)?;
    let env =
        vec![("REDIS_PORT".to_string(), rport.to_string()), ("BACKEND_HTTP".to_string(), format!("127.0.0.1:{hport}"))];
    let flask = FLASK;
    let django = App { file: "django_app.py", env: &[] };
    let calls = App { file: "calls_app.py", env: &env };
    let all: Vec<(App, &str, &str)> = vec![
        (flask, "/caught", "Flask view raising and catching a KeyError (200)"),
        (flask, "/error", "Flask view raising: 500 with a traceback"),
        (django, "/", "Django (DEBUG=False) hello: raises and catches ~10 exceptions per request"),
        (calls, "/call/redis", "two Redis commands (redis-py)"),
        (calls, "/call/http", "one HTTP call (requests)"),
    ];
    let cases: Vec<(App, &str, &str)> = if short { vec![all[0], all[3]] } else { all };
    let request_only = ["--no-exceptions", "--no-exit-spans"];
    let configs: [(&str, Config, &[&str]); 3] = [
        ("A bare app", Config::Bare, &[]),
        ("R request probe only", Config::Observer, &request_only),
        ("B every probe", Config::Observer, &[]),
    ];
    let mut res: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); configs.len()]; cases.len()];
    for round in 0..rounds {
        for (ci, (app, route, _)) in cases.iter().enumerate() {
            for (k, (name, cfg, extra)) in configs.iter().enumerate() {
                println!("== probes round {}/{rounds}: {} {route} {name}", round + 1, app.file);
                let r = one_run_app(*app, *cfg, "--http-socket", route, secs, observer, extra)
                    .with_context(|| format!("{} {route} {name}", app.file))?;
                println!(
                    "   {:.0} req/s, app CPU {:.0} us/req, observer CPU {:.1} us/req, frames unwound {}, exit calls {}, spans {}/{}",
                    r.rps, r.app_cpu_us_per_req, r.observer_cpu_us_per_req, r.py_frames, r.exit_calls, r.spans, r.spans_expected
                );
                if *cfg == Config::Observer && (r.spans != r.spans_expected || r.observer_lost != 0) {
                    bail!(
                        "observer lost spans: {} of {} arrived, {} counted lost",
                        r.spans,
                        r.spans_expected,
                        r.observer_lost
                    );
                }
                res[ci][k].push(r);
            }
        }
    }
    let mut md = String::from(
        "## Exception and exit-span probes, on and off

",
    );
    md.push_str(
        "`--http-socket`, 2 workers. R runs the observer with `--no-exceptions --no-exit-spans` (only the request probe), B with every probe (libpython's PyTraceBack_Here and PyErr_Display; the connect/sendto/recvfrom tracepoints). Per request: frames the exception probe saw unwind, outbound calls made into Exit spans. Redis and the HTTP backend run on the same 2 cores.

",
    );
    md.push_str("| app, route | what it does | config | req/s | app CPU us/req | observer CPU us/req | frames unwound / req | exit spans / req |
|---|---|---|---|---|---|---|---|
");
    for (ci, (app, route, what)) in cases.iter().enumerate() {
        let mut rps_of = [0.0; 3];
        for (k, (name, cfg, _)) in configs.iter().enumerate() {
            let runs = &res[ci][k];
            let f = |g: fn(&Run) -> f64| mean_sd(&runs.iter().map(g).collect::<Vec<_>>());
            let (rps, sd) = f(|r| r.rps);
            rps_of[k] = rps;
            let (cpu, _) = f(|r| r.app_cpu_us_per_req);
            let (ocpu, _) = f(|r| r.observer_cpu_us_per_req);
            let reqs: u64 = runs.iter().map(|r| r.spans_expected).sum();
            let per = |n: u64| if reqs == 0 { 0.0 } else { n as f64 / reqs as f64 };
            let frames = per(runs.iter().map(|r| r.py_frames).sum());
            let calls = per(runs.iter().map(|r| r.exit_calls).sum());
            let obs = |v: String| if *cfg == Config::Observer { v } else { "-".into() };
            md.push_str(&format!(
                "| `{}` `{route}` | {what} | {name} | {rps:.0} ± {sd:.0} | {cpu:.0} | {} | {} | {} |
",
                app.file,
                obs(format!("{ocpu:.1}")),
                obs(format!("{frames:.1}")),
                obs(format!("{calls:.1}")),
            ));
        }
        md.push_str(&format!(
            "| | | **B/A {:+.1} %, R/A {:+.1} %, B/R {:+.1} %** | | | | | |
",
            (rps_of[2] / rps_of[0] - 1.0) * 100.0,
            (rps_of[1] / rps_of[0] - 1.0) * 100.0,
            (rps_of[2] / rps_of[1] - 1.0) * 100.0
        ));
    }
    md.push_str(
        "
B/R is what the exception and exit-span probes add on top of the request probe.

",
    );
    Ok(md)
}

fn machine() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    format!("{cores} cores ({cpu}), kernel {}", kernel.trim())
}

fn write_report(
    results: &[(String, String, Config, Vec<Run>)],
    rounds: usize,
    secs: u64,
    short: bool,
    sections: &[&str],
) -> Result<()> {
    let mut md = String::new();
    md.push_str("# Benchmarks: what the observer costs a uWSGI app\n\n");
    md.push_str(&format!(
        "Generated by `./x bench` ({}). Machine: {}. uWSGI {} (pip) + Flask 3.1, 2 workers, CPython 3.11; \
         wrk -t2 -c16 on loopback, {secs} s per run after a 2 s warm-up, {rounds} interleaved rounds (A B C A B C ...); \
         B reports to the test receiver over gRPC, C is apache-skywalking 1.2.0 (`sw-python run -p uwsgi`) reporting \
         to the same receiver. Mean ± standard deviation over rounds. App CPU counts every uWSGI child (workers, and the \
         router with `--http`). Spans: segments the receiver got / requests the app served (warm-up included).\n\n",
        if short { "short smoke mode" } else { "full mode" },
        machine(),
        setup::UWSGI_VERSION
    ));
    let mut json = Vec::new();
    for mode in ["--http", "--http-socket"] {
        for route in ["/", "/work"] {
            md.push_str(&format!("## `{mode}`, route `{route}`\n\n"));
            md.push_str("| config | req/s | p50 ms | p99 ms | app CPU us/req | observer CPU us/req | observer RSS MB | spans delivered / requests |\n");
            md.push_str("|---|---|---|---|---|---|---|---|\n");
            let mut bare_rps = 0.0;
            let mut bare_p99 = 0.0;
            let mut rows = Vec::new();
            for (m, r, c, runs) in results.iter().filter(|(m, r, _, _)| m == mode && r == route) {
                let f = |g: fn(&Run) -> f64| mean_sd(&runs.iter().map(g).collect::<Vec<_>>());
                let (rps, rps_sd) = f(|r| r.rps);
                let (p50, _) = f(|r| r.p50_ms);
                let (p99, p99_sd) = f(|r| r.p99_ms);
                let (cpu, _) = f(|r| r.app_cpu_us_per_req);
                let (ocpu, _) = f(|r| r.observer_cpu_us_per_req);
                let (orss, _) = f(|r| r.observer_rss_mb);
                let spans: u64 = runs.iter().map(|r| r.spans).sum();
                let expected: u64 = runs.iter().map(|r| r.spans_expected).sum();
                if *c == Config::Bare {
                    bare_rps = rps;
                    bare_p99 = p99;
                }
                let obs_cols = if *c == Config::Observer {
                    (format!("{ocpu:.1}"), format!("{orss:.1}"))
                } else {
                    ("-".into(), "-".into())
                };
                let spans_col = if *c == Config::Bare { "-".to_string() } else { format!("{spans} / {expected}") };
                rows.push(format!(
                    "| {} | {rps:.0} ± {rps_sd:.0} | {p50:.2} | {p99:.2} ± {p99_sd:.2} | {cpu:.0} | {} | {} | {spans_col} |\n",
                    c.name(),
                    obs_cols.0,
                    obs_cols.1
                ));
                json.push(serde_json::json!({
                    "mode": m, "route": r, "config": c.name(), "rounds": runs.len(),
                    "rps": rps, "rps_sd": rps_sd, "p50_ms": p50, "p99_ms": p99,
                    "app_cpu_us_per_req": cpu, "observer_cpu_us_per_req": ocpu, "observer_rss_mb": orss,
                    "spans": spans, "spans_expected": expected,
                }));
            }
            for r in rows {
                md.push_str(&r);
            }
            let get = |c: Config| {
                results
                    .iter()
                    .find(|(m, r, cc, _)| m == mode && r == route && *cc == c)
                    .map(|(_, _, _, runs)| mean_sd(&runs.iter().map(|r| r.rps).collect::<Vec<_>>()).0)
                    .unwrap_or(0.0)
            };
            let p99_of = |c: Config| {
                results
                    .iter()
                    .find(|(m, r, cc, _)| m == mode && r == route && *cc == c)
                    .map(|(_, _, _, runs)| mean_sd(&runs.iter().map(|r| r.p99_ms).collect::<Vec<_>>()).0)
                    .unwrap_or(0.0)
            };
            if bare_rps > 0.0 {
                let b = get(Config::Observer) / bare_rps;
                let c = get(Config::Agent) / bare_rps;
                md.push_str(&format!(
                    "\nB/A throughput {:.3} ({:+.1} %), C/A {:.3} ({:+.1} %); p99 B/A {:.2}, C/A {:.2}.\n\n",
                    b,
                    (b - 1.0) * 100.0,
                    c,
                    (c - 1.0) * 100.0,
                    p99_of(Config::Observer) / bare_p99.max(1e-9),
                    p99_of(Config::Agent) / bare_p99.max(1e-9)
                ));
            }
        }
    }
    for sec in sections {
        md.push_str(sec);
    }
    md.push_str("Targets (for the benchmark to show, not for tests to assert): throughput loss B/A <= 2 %, p99 added <= 5 %, observer CPU <= 10 us/request, observer RSS <= 40 MB, zero spans lost up to the bare app's saturation, B's overhead <= a tenth of C's. What was profiled and fixed, with before/after figures: [performance.md](performance.md).\n");
    let docs = root().join("docs");
    let name = if short { "benchmarks-short" } else { "benchmarks" };
    let md_path = docs.join(format!("{name}.md"));
    std::fs::write(&md_path, &md)?;
    std::fs::write(docs.join(format!("{name}.json")), serde_json::to_string_pretty(&json)?)?;
    println!("\n{md}\nwritten to {}", md_path.display());
    Ok(())
}

pub fn observer_bin() -> PathBuf {
    root().join("target/release/observer")
}
