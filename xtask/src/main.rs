//! Project tasks cargo cannot do alone: `setup` (idempotent installs), `demo`, `test`.
//! Run through `./x <task>`, which first makes sure the pinned Rust toolchain exists.

mod bench;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: apt packages, eBPF toolchain, bpf-linker, Python venv, tracefs.
    Setup,
    /// Build the observer (release).
    Build,
    /// Start a sample uWSGI + Flask app, attach the observer, send traffic, show the output.
    Demo {
        /// Seconds of traffic to send.
        #[arg(long, default_value_t = 6)]
        seconds: u64,
    },
    /// Measure the observer's cost against the bare app and the in-process agent
    /// (writes docs/benchmarks.md and docs/benchmarks.json).
    Bench {
        /// A few seconds per config, one round: the CI smoke test.
        #[arg(long)]
        short: bool,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Run every test: unit tests, then the privileged integration tests against real uWSGI.
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn build() -> Result<PathBuf> {
    run(Command::new("cargo").current_dir(root()).args(["build", "--release", "-p", "observer"]))?;
    // The test receiver (an OAP stand-in) is part of the demo too.
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-p",
        "observer-tests",
        "--bin",
        "sw-receiver",
    ]))?;
    Ok(root().join("target/release/observer"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Task::Setup => setup::all(),
        Task::Build => build().map(|_| ()),
        Task::Demo { seconds } => {
            setup::all()?;
            let bin = build()?;
            demo(&bin, seconds)
        }
        Task::Bench { short, rounds, seconds } => {
            setup::all()?;
            build()?;
            bench::bench(&bench::observer_bin(), short, rounds, seconds)
        }
        Task::Test { filter } => {
            setup::all()?;
            let bin = build()?;
            test(&bin, filter)
        }
    }
}

/// Kills a child process group on drop, so nothing is left behind on error.
/// A child process stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
pub(crate) struct Guard(Child, &'static str);

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        eprintln!("xtask: {} had to be killed", self.1);
    }
}

fn demo(bin: &Path, seconds: u64) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("observer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pidfile = dir.join("uwsgi.pid");
    let port = 18090;
    // Two backends for the app's outbound calls (Exit spans): Redis and a small HTTP service.
    let (redis_port, http_port) = (18092u16, 18093u16);
    println!("== starting backends for the app's calls: redis-server :{redis_port}, an HTTP service :{http_port}");
    let _backends = start_backends(redis_port, http_port)?;
    println!("== starting a sample app: uWSGI (pip build) + Flask, 2 workers, --http :{port}");
    let uwsgi = Command::new(setup::venv().join("bin/uwsgi"))
        .current_dir(root().join("tests/apps"))
        .env("BACKEND_HTTP", format!("127.0.0.1:{http_port}"))
        .env("REDIS_PORT", redis_port.to_string())
        .args(["--master", "--workers", "2", "--http", &format!("127.0.0.1:{port}")])
        .args(["--wsgi-file", "flask_app.py", "--callable", "application", "--disable-logging", "--die-on-term"])
        .arg("--pidfile")
        .arg(&pidfile)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("uwsgi.log"))?)
        .spawn()
        .context("starting uwsgi")?;
    let _uwsgi = Guard(uwsgi, "uwsgi");
    wait_http(port)?;
    let master = std::fs::read_to_string(&pidfile)?.trim().to_string();
    let oap_port = "18091";
    println!(
        "== starting a SkyWalking OAP stand-in (the test receiver) on 127.0.0.1:{oap_port}; its lines start with [oap]"
    );
    let mut rx = Command::new(root().join("target/release/sw-receiver"))
        .arg(oap_port)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting sw-receiver")?;
    let rx_out = rx.stdout.take().context("receiver stdout")?;
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(rx_out).lines().map_while(Result::ok) {
            println!("[oap] {line}");
        }
    });
    let _rx = Guard(rx, "sw-receiver");
    let oap = format!("127.0.0.1:{oap_port}");
    println!("== attaching: observer attach --pid {master} --oap {oap} --service demo-shop --framework flask");
    println!("   (no restart, no code change)");
    let observer = Command::new(bin)
        .args(["attach", "--pid", &master, "--oap", &oap, "--service", "demo-shop", "--framework", "flask"])
        .spawn()
        .context("starting the observer")?;
    let mut observer = Guard(observer, "observer");
    sleep(Duration::from_secs(2));
    println!("== sending traffic for {seconds} s");
    let urls = ["/", "/users/42?expand=1", "/checkout", "/status/201", "/missing", "/error", "/crash", "/slow"];
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let url = urls[n % urls.len()];
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", &format!("http://127.0.0.1:{port}{url}")]);
        if n % 5 == 0 {
            c.args([
                "-H",
                "sw8: 1-MWY2YjE5YjY5ZGE2-MWY2YjE5YjY5ZGE3-0-c2hvcA==-c2hvcC0x-L2NoZWNrb3V0-MTAuMC4wLjE6ODA=",
            ]);
        }
        let _ = c.status();
        n += 1;
        sleep(Duration::from_millis(300));
    }
    println!("== {n} requests sent; detaching (Ctrl-C does the same)");
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(observer.0.id() as i32, libc::SIGINT) };
    let _ = observer.0.wait();
    Ok(())
}

/// The outbound-call targets of the demo and the benchmark: redis-server and
/// tests/py/http_backend.py on loopback, accepting connections when this returns.
pub(crate) fn start_backends(redis_port: u16, http_port: u16) -> Result<[Guard; 2]> {
    let redis = Command::new("redis-server")
        .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (apt: redis-server)")?;
    let redis = Guard(redis, "redis-server");
    let backend = Command::new(setup::venv().join("bin/python"))
        .arg(root().join("tests/py/http_backend.py"))
        .arg(http_port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the HTTP backend")?;
    let backend = Guard(backend, "http backend");
    wait_http(http_port)?;
    wait_http(redis_port)?;
    Ok([redis, backend])
}

fn wait_http(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        sleep(Duration::from_millis(100));
    }
    bail!("uwsgi did not listen on port {port} within 30 s")
}

fn test(bin: &Path, filter: Option<String>) -> Result<()> {
    println!("== unit tests");
    run(Command::new("cargo").current_dir(root()).args([
        "test",
        "--release",
        "-p",
        "observer",
        "-p",
        "observer-common",
    ]))?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the integration tests load eBPF programs: run them as root (sudo ./x test)");
    }
    println!("== integration tests (root, real uWSGI, real eBPF)");
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .args(["test", "--release", "-p", "observer-tests", "--", "--test-threads=1"])
        .env("OBSERVER_BIN", bin)
        .env("OBSERVER_VENV", setup::venv());
    let smoke = filter.is_none();
    if let Some(f) = filter {
        c.arg(f);
    }
    run(&mut c)?;
    if smoke {
        println!("== benchmark smoke run (completes, every span arrives; timings are not asserted)");
        bench::bench(bin, true, 1, 2)?;
    }
    Ok(())
}
