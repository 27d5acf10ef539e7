//! Harness for the privileged integration tests: real uWSGI (pip and Debian builds), real
//! Flask, real nginx and curl, and the real observer binary loading real eBPF programs.
//! Every process started here is killed by a Drop guard, so a failing test leaves nothing.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod backends;
pub mod receiver;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn observer_bin() -> PathBuf {
    std::env::var_os("OBSERVER_BIN").map(PathBuf::from).unwrap_or_else(|| repo().join("target/release/observer"))
}

pub fn venv() -> PathBuf {
    std::env::var_os("OBSERVER_VENV").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv"))
}

pub fn apps() -> PathBuf {
    repo().join("tests/apps")
}

/// These tests load eBPF programs: without root they cannot mean anything, so they fail.
pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "integration tests must run as root (sudo ./x test)");
    assert!(observer_bin().exists(), "observer binary missing: {} (run ./x test)", observer_bin().display());
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("observer-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Which uWSGI build to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    /// PyPI's uwsgi in the venv: the Python handler is in the uwsgi binary.
    Pip,
    /// Debian's uwsgi-core + uwsgi-plugin-python3: the handler is in a stripped plugin .so.
    Debian,
    /// PyPI's uwsgi built against another CPython ("3.10"), in `.venv-py3.10` (set up by
    /// `./x setup` when the machine has that interpreter).
    PipPython(&'static str),
}

/// The venv of [`Build::PipPython`].
pub fn python_venv(minor: &str) -> PathBuf {
    repo().join(format!(".venv-py{minor}"))
}

pub struct Uwsgi {
    child: Option<Child>,
    pub dir: PathBuf,
    pub pidfile: PathBuf,
    pub port: u16,
}

impl Uwsgi {
    /// Starts uWSGI with `args` (the socket options included) on the fixture Flask app and
    /// waits for `ready` (a TCP port or a unix socket path) to accept connections.
    pub fn start(build: Build, tag: &str, args: &[&str], ready: Ready) -> Uwsgi {
        Self::start_app(build, tag, args, ready, "flask_app.py", "application")
    }

    pub fn start_app(build: Build, tag: &str, args: &[&str], ready: Ready, file: &str, callable: &str) -> Uwsgi {
        Self::start_full(build, tag, args, ready, file, callable, &[], &[])
    }

    /// Starts the pip build with extra environment variables.
    pub fn start_env(tag: &str, args: &[&str], ready: Ready, env: &[(&str, &str)]) -> Uwsgi {
        Self::start_full(Build::Pip, tag, args, ready, "flask_app.py", "application", &[], env)
    }

    /// Starts `file` (in tests/apps) with extra environment variables, optionally under the
    /// official agent (`agent_env` non-empty).
    pub fn start_app_env(
        build: Build,
        tag: &str,
        args: &[&str],
        ready: Ready,
        file: &str,
        env: &[(&str, &str)],
        agent_env: &[(&str, &str)],
    ) -> Uwsgi {
        Self::start_full(build, tag, args, ready, file, "application", agent_env, env)
    }

    /// Starts the pip build under the official SkyWalking Python agent
    /// (`sw-python run -p uwsgi ...`), with `env` (SW_AGENT_* settings).
    pub fn start_with_agent(tag: &str, args: &[&str], ready: Ready, env: &[(&str, &str)]) -> Uwsgi {
        Self::start_full(Build::Pip, tag, args, ready, "flask_app.py", "application", env, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn start_full(
        build: Build,
        tag: &str,
        args: &[&str],
        ready: Ready,
        file: &str,
        callable: &str,
        agent_env: &[(&str, &str)],
        env: &[(&str, &str)],
    ) -> Uwsgi {
        let dir = tmpdir(tag);
        let pidfile = dir.join("uwsgi.pid");
        let exe = match build {
            Build::Pip => venv().join("bin/uwsgi"),
            Build::Debian => PathBuf::from("/usr/bin/uwsgi_python311"),
            Build::PipPython(minor) => python_venv(minor).join("bin/uwsgi"),
        };
        let log = std::fs::File::create(dir.join("uwsgi.log")).unwrap();
        let mut cmd = if agent_env.is_empty() {
            Command::new(exe)
        } else {
            // The agent recognises uWSGI only by the bare command name `uwsgi` (found on PATH).
            let _ = exe;
            let mut c = Command::new(venv().join("bin/sw-python"));
            c.args(["run", "-p", "uwsgi"]).envs(agent_env.iter().copied());
            c.env("PATH", format!("{}:{}", venv().join("bin").display(), std::env::var("PATH").unwrap_or_default()));
            c
        };
        cmd.envs(env.iter().copied());
        cmd.current_dir(apps())
            .args(args)
            .args(["--wsgi-file", file, "--callable", callable, "--pidfile"])
            .arg(&pidfile)
            .arg("--die-on-term")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().expect("starting uwsgi");
        let port = match ready {
            Ready::Port(p) => p,
            Ready::Unix(_) => 0,
        };
        let u = Uwsgi { child: Some(child), dir, pidfile, port };
        let what = format!("uwsgi {tag} to listen");
        // Readiness without connecting: a probe connection would itself reach uWSGI.
        wait_until(&what, Duration::from_secs(30), || match &ready {
            Ready::Port(p) => tcp_listening(*p),
            Ready::Unix(path) => unix_listening(path),
        });
        wait_until("uwsgi pidfile", Duration::from_secs(10), || u.master_pid_opt().is_some());
        u
    }

    fn master_pid_opt(&self) -> Option<u32> {
        std::fs::read_to_string(&self.pidfile).ok()?.trim().parse().ok()
    }

    pub fn master_pid(&self) -> u32 {
        self.master_pid_opt().expect("pidfile")
    }

    /// The pid we spawned (the master, or the only process without --master).
    pub fn spawned_pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Direct children of the master (workers, and the router / mules if any).
    pub fn children(&self) -> Vec<u32> {
        children_of(self.master_pid())
    }

    /// Waits until the master has `n` children, and returns them.
    pub fn wait_children(&self, n: usize) -> Vec<u32> {
        wait_until(&format!("{n} uwsgi children"), Duration::from_secs(30), || self.children().len() == n);
        self.children()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("uwsgi.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Uwsgi {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id() as i32;
            // SAFETY: signals to the process group we created.
            unsafe { libc::kill(-pgid, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
                sleep(Duration::from_millis(50));
            }
            // SAFETY: as above; whatever is left of the group goes.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A socket in LISTEN state on this TCP port, from /proc/net/tcp.
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").unwrap_or_default().lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// A listening unix socket at this path, from /proc/net/unix (flags 00010000 = listening).
pub fn unix_listening(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .any(|l| l.ends_with(p.as_ref()) && l.split_whitespace().nth(3) == Some("00010000"))
}

pub enum Ready {
    Port(u16),
    Unix(PathBuf),
}

pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if rest.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok()) == Some(pid) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// The observer binary, run with `--format json`; its output is collected as it comes.
pub struct Observer {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<Value>>>,
    stderr: Arc<Mutex<String>>,
}

impl Observer {
    pub fn attach(args: &[&str]) -> Observer {
        let mut child = Command::new(observer_bin())
            .arg("attach")
            .args(["--format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting observer");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("observer printed a line that is not JSON ({e}): {line}"));
                l2.lock().unwrap().push(v);
            }
        });
        let err = child.stderr.take().unwrap();
        let e2 = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = e2.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut o = Observer { child: Some(child), lines, stderr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let err = o.stderr();
            if err.contains("observer: attached") {
                break;
            }
            if let Some(c) = o.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("observer exited early ({st}): {err}");
                }
            }
            assert!(Instant::now() < deadline, "observer did not attach in 30 s: {err}");
            sleep(Duration::from_millis(50));
        }
        o
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn records(&self, kind: &str) -> Vec<Value> {
        self.lines.lock().unwrap().iter().filter(|v| v["type"] == kind).cloned().collect()
    }

    pub fn requests(&self) -> Vec<Value> {
        self.records("request")
    }

    /// Waits until `n` request records arrived (and a little longer, to catch extras).
    pub fn wait_requests(&self, n: usize) -> Vec<Value> {
        wait_until(&format!("{n} request records"), Duration::from_secs(20), || self.requests().len() >= n);
        sleep(Duration::from_millis(300));
        self.requests()
    }

    /// Ctrl-C, then the summary record and stderr.
    pub fn stop(mut self) -> (Value, String) {
        let mut c = self.child.take().unwrap();
        // SAFETY: signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Ok(Some(st)) = c.try_wait() {
                break st;
            }
            assert!(Instant::now() < deadline, "observer did not stop on SIGINT");
            sleep(Duration::from_millis(50));
        };
        sleep(Duration::from_millis(200));
        assert!(status.success(), "observer exited with {status}: {}", self.stderr());
        let summary =
            self.records("summary").pop().unwrap_or_else(|| panic!("no summary record; stderr: {}", self.stderr()));
        (summary, self.stderr())
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the observer to completion with `args` (for the error cases).
pub fn observer_output(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(observer_bin()).args(args).output().expect("running observer");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// What one curl request returned.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub bytes: u64,
    pub local_port: u16,
}

/// One request with curl (a real HTTP client). `extra` are curl arguments (headers, -X ...).
pub fn curl(url: &str, extra: &[&str]) -> Reply {
    let out = Command::new("curl")
        .args(["-s", "-m", "20", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{local_port}"])
        .args(extra)
        .arg(url)
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut it = text.split_whitespace();
    let status = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let bytes = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let local_port = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply { status, bytes, local_port }
}

/// Finds the one request record with this path and query; fails on zero or several.
pub fn find<'a>(records: &'a [Value], path: &str, query: &str) -> &'a Value {
    let m: Vec<&Value> = records.iter().filter(|r| r["path"] == path && r["query"] == query).collect();
    assert_eq!(m.len(), 1, "expected one record for {path}?{query}, got {}: {records:#?}", m.len());
    m[0]
}

/// A small nginx in front of uWSGI, speaking the uwsgi protocol (`uwsgi_pass`).
pub struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
    pub port: u16,
}

impl Nginx {
    /// `upstream` is `127.0.0.1:PORT` or `unix:/path`.
    pub fn start(tag: &str, upstream: &str) -> Nginx {
        let dir = tmpdir(&format!("nginx-{tag}"));
        let port = free_port();
        let conf = format!(
            "worker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 64; }}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   include /etc/nginx/uwsgi_params;\n   uwsgi_pass {upstream};\n  }}\n }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .args(["-e", &format!("{}/error.log", dir.display()), "-p"])
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("starting nginx");
        let n = Nginx { child: Some(child), dir, port };
        wait_until("nginx to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        n
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signal to the process group we created.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Names of the observer's eBPF programs as the kernel lists them.
pub const OUR_PROGRAMS: [&str; 4] = ["after_request", "task_newtask", "process_exit", "process_exec"];

/// Our programs currently loaded in the kernel (by name, via `bpftool prog show`).
pub fn loaded_programs_of_ours() -> Vec<String> {
    let out = Command::new("bpftool").args(["-j", "prog", "show"]).output().expect("running bpftool");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
    v.as_array()
        .map(|a| {
            a.iter().filter_map(|p| p["name"].as_str()).filter(|n| OUR_PROGRAMS.contains(n)).map(String::from).collect()
        })
        .unwrap_or_default()
}
