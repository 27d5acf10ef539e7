//! Real backends for the exit-span tests: Redis, PostgreSQL, MariaDB and a small HTTP/1.1
//! server (tests/py/http_backend.py), each a child process on a free 127.0.0.1 port in its own
//! temp dir. Drop stops the process by pid (its whole process group, and any descendant found
//! before the signal), waits for it, and removes the temp dir: nothing is left behind.
//!
//! The Debian packages (redis-server, postgresql, mariadb-server) are installed by
//! `./x setup` with their system services kept stopped; only these private instances run.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io::{Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use crate::{children_of, free_port, repo, tcp_listening, tmpdir, venv, wait_until};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// One spawned server process, leader of its own process group.
struct Proc {
    child: Option<Child>,
    /// The signal that asks for a clean shutdown.
    soft: i32,
    grace: Duration,
}

impl Proc {
    fn none() -> Proc {
        Proc { child: None, soft: libc::SIGTERM, grace: Duration::ZERO }
    }

    fn spawn(cmd: &mut Command, soft: i32, grace: Duration) -> Proc {
        let child =
            cmd.stdin(Stdio::null()).process_group(0).spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child: Some(child), soft, grace }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("server process").id()
    }

    /// Exits early (with the log) if the server died during start-up.
    fn check_alive(&mut self, what: &str, log: &Path) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!(
                    "{what} exited during start-up ({st}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        }
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = c.id() as i32;
        let tree = descendants(c.id());
        // SAFETY: signals to the process group we created (pgid = our child's pid).
        unsafe { libc::kill(-pid, self.soft) };
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline && !matches!(c.try_wait(), Ok(Some(_))) {
            sleep(Duration::from_millis(50));
        }
        // SAFETY: as above; then whatever descendant left the group. Pids of our own tree,
        // taken just before the first signal; one already gone and reused in that instant is
        // the only (negligible) risk.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            for p in &tree {
                if alive(*p) {
                    libc::kill(*p as i32, libc::SIGKILL);
                }
            }
        }
        let _ = c.wait();
        // Orphaned descendants are reaped by init; wait until they are gone from /proc.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && tree.iter().any(|p| alive(*p)) {
            sleep(Duration::from_millis(20));
        }
    }
}

/// The pid and every descendant of it.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        out.extend(children_of(out[i]));
        i += 1;
    }
    out
}

/// A live process with this pid (not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

fn log_file(dir: &Path, name: &str) -> std::fs::File {
    std::fs::File::create(dir.join(name)).unwrap()
}

fn output(cmd: &mut Command) -> (bool, String) {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => (
            o.status.success(),
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
        ),
        Err(e) => (false, format!("{cmd:?}: {e}")),
    }
}

fn must(cmd: &mut Command) -> String {
    let (ok, out) = output(cmd);
    assert!(ok, "{cmd:?} failed:\n{out}");
    out
}

// ---------------------------------------------------------------------------------------------

/// `redis-server` on 127.0.0.1:port, no persistence, working dir in its temp dir.
pub struct Redis {
    proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let dir = tmpdir(&format!("redis-{port}"));
        let mut r = Redis { proc: Proc::none(), dir, port };
        let log = r.dir.join("redis.log");
        r.proc = Proc::spawn(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--daemonize", "no", "--protected-mode", "yes", "--dir"])
                .arg(&r.dir)
                .stdout(log_file(&r.dir, "redis.log"))
                .stderr(log_file(&r.dir, "redis.err")),
            libc::SIGTERM,
            Duration::from_secs(5),
        );
        wait_until("redis to answer PING", Duration::from_secs(20), || {
            r.proc.check_alive("redis-server", &log);
            r.try_command(&["PING"]).is_some_and(|s| s == "+PONG")
        });
        r.command(&["CONFIG", "RESETSTAT"]);
        r
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// One command over a fresh connection; the raw RESP reply (e.g. "+OK", "$1\r\nv").
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).unwrap_or_else(|| panic!("redis command {args:?} failed"))
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        req += "*1\r\n$4\r\nQUIT\r\n";
        s.write_all(req.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        // Drop QUIT's "+OK" at the end.
        let out = out.strip_suffix("+OK\r\n")?.trim_end().to_string();
        Some(out)
    }

    /// Calls per command since start (`INFO commandstats`, after `CONFIG RESETSTAT`), without
    /// this query's own INFO, e.g. {"get": 1, "set": 1}.
    pub fn commandstats(&self) -> BTreeMap<String, u64> {
        let text = self.command(&["INFO", "commandstats"]);
        let mut m = BTreeMap::new();
        for l in text.lines() {
            let Some(rest) = l.strip_prefix("cmdstat_") else { continue };
            let Some((name, stats)) = rest.split_once(':') else { continue };
            let calls = stats.split(',').find_map(|kv| kv.strip_prefix("calls=")).and_then(|v| v.parse().ok());
            if let Some(c) = calls {
                // Not the harness's own commands.
                if name != "info" && name != "quit" && !name.starts_with("config") {
                    m.insert(name.to_string(), c);
                }
            }
        }
        m
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------

/// PostgreSQL 15 (`initdb` + `postgres`) on 127.0.0.1:port as the `postgres` system user,
/// trust authentication, unix socket in its temp dir, every statement and connection logged to
/// `postgres.log`. Database `shop` has `items(id int primary key, name text)`:
/// (1, 'apple'), (2, 'pear').
pub struct Postgres {
    proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
    pub db: &'static str,
    pub user: &'static str,
}

fn postgres_ids() -> (u32, u32) {
    let name = CString::new("postgres").unwrap();
    // SAFETY: a valid C string; the returned record is read at once, before any other call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(!pw.is_null(), "no `postgres` system user: is the postgresql package installed (./x setup)?");
    // SAFETY: non-null record from getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl Postgres {
    pub fn start() -> Postgres {
        let port = free_port();
        let dir = tmpdir(&format!("pg-{port}"));
        let mut pg = Postgres { proc: Proc::none(), dir, port, db: "shop", user: "postgres" };
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid)).unwrap();
        let data = pg.dir.join("data");
        let as_postgres = |exe: &str| {
            let mut c = Command::new(Path::new(PG_BIN).join(exe));
            c.uid(uid).gid(gid).current_dir(&pg.dir).env("LC_ALL", "C").env_remove("PGDATA");
            c
        };
        must(as_postgres("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ]));
        let log = pg.dir.join("postgres.log");
        let log_out = log_file(&pg.dir, "postgres.log");
        pg.proc = Proc::spawn(
            as_postgres("postgres")
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", pg.dir.display()))
                .args(["-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"])
                .args(["-c", "log_statement=all", "-c", "log_connections=on", "-c", "log_disconnections=on"])
                .args(["-c", "logging_collector=off", "-c", "max_connections=20", "-c", "shared_buffers=16MB"])
                .stdout(log_out.try_clone().unwrap())
                .stderr(log_out),
            // SIGINT is the "fast" shutdown: clients disconnected, children stopped, then exit.
            libc::SIGINT,
            Duration::from_secs(10),
        );
        wait_until("postgres to accept queries", Duration::from_secs(30), || {
            pg.proc.check_alive("postgres", &log);
            tcp_listening(port) && output(&mut pg.psql("postgres", "SELECT 1")).0
        });
        must(&mut pg.psql("postgres", "CREATE DATABASE shop"));
        must(&mut pg.psql(
            "shop",
            "CREATE TABLE items(id int primary key, name text); INSERT INTO items VALUES (1, 'apple'), (2, 'pear');",
        ));
        pg
    }

    /// psql over TCP as `postgres` (trust), one command.
    pub fn psql(&self, db: &str, sql: &str) -> Command {
        let mut c = Command::new(Path::new(PG_BIN).join("psql"));
        c.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", db, "-c", sql]);
        c
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The server log: with `log_statement=all`, one "LOG:  statement: ..." line per
    /// statement, and "connection authorized" / "disconnection" lines.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------

/// MariaDB (`mariadb-install-db` + `mariadbd --user=root`) on 127.0.0.1:port, socket in its
/// temp dir, general query log in `general.log`. Database `shop` has
/// `items(id int primary key, name text)`: (1, 'apple'), (2, 'pear'); user `app` with password
/// `secret` at '127.0.0.1' and '%' has all privileges on `shop`.
pub struct Mysql {
    proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
    pub db: &'static str,
    pub user: &'static str,
    pub password: &'static str,
}

impl Mysql {
    pub fn start() -> Mysql {
        let port = free_port();
        let dir = tmpdir(&format!("mysql-{port}"));
        let mut m = Mysql { proc: Proc::none(), dir, port, db: "shop", user: "app", password: "secret" };
        let data = m.dir.join("data");
        must(
            Command::new("mariadb-install-db")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args(["--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"])
                .args(["--skip-name-resolve", "--innodb-buffer-pool-size=16M"]),
        );
        let log = m.dir.join("error.log");
        m.proc = Proc::spawn(
            Command::new("mariadbd")
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--socket={}", m.socket().display()))
                .arg(format!("--pid-file={}", m.dir.join("mariadbd.pid").display()))
                .arg(format!("--log-error={}", log.display()))
                .arg(format!("--general-log-file={}", m.dir.join("general.log").display()))
                .args(["--user=root", "--port", &port.to_string(), "--bind-address=127.0.0.1"])
                .args(["--general-log=1", "--skip-log-bin", "--skip-name-resolve", "--innodb-buffer-pool-size=16M"])
                .args(["--innodb-flush-log-at-trx-commit=0", "--max-connections=20"])
                .stdout(Stdio::null())
                .stderr(log_file(&m.dir, "stderr.log")),
            libc::SIGTERM,
            Duration::from_secs(15),
        );
        wait_until("mariadbd to accept root on its socket", Duration::from_secs(60), || {
            m.proc.check_alive("mariadbd", &log);
            output(&mut m.root_sql("SELECT 1")).0
        });
        must(&mut m.root_sql(
            "CREATE DATABASE shop; CREATE TABLE shop.items(id int primary key, name text); \
             INSERT INTO shop.items VALUES (1, 'apple'), (2, 'pear'); \
             CREATE USER 'app'@'127.0.0.1' IDENTIFIED BY 'secret'; CREATE USER 'app'@'%' IDENTIFIED BY 'secret'; \
             GRANT ALL PRIVILEGES ON shop.* TO 'app'@'127.0.0.1'; GRANT ALL PRIVILEGES ON shop.* TO 'app'@'%';",
        ));
        // Ready when a real client query over TCP, as the app's user, works.
        wait_until("mariadb to answer `app` over TCP", Duration::from_secs(20), || {
            output(&mut m.app_sql("SELECT count(*) FROM items")).1.trim() == "2"
        });
        m
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }

    /// The mariadb client as root over the unix socket, one batch.
    pub fn root_sql(&self, sql: &str) -> Command {
        let mut c = Command::new("mariadb");
        c.arg("--no-defaults")
            .arg(format!("--socket={}", self.socket().display()))
            .args(["-u", "root", "-N", "-B", "-e", sql]);
        c
    }

    /// The mariadb client as `app` over TCP, in `shop`.
    pub fn app_sql(&self, sql: &str) -> Command {
        let mut c = Command::new("mariadb");
        c.args(["--no-defaults", "--protocol=TCP", "-h", "127.0.0.1", "-P", &self.port.to_string()]).args([
            "-u",
            self.user,
            &format!("-p{}", self.password),
            "-N",
            "-B",
            self.db,
            "-e",
            sql,
        ]);
        c
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The general query log: one "Connect" line per connection and one "Query" line per
    /// COM_QUERY.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("general.log")).unwrap_or_default()
    }
}

impl Drop for Mysql {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------

/// tests/py/http_backend.py on 127.0.0.1:port (HTTP/1.1, keep-alive): GET /api/items/<n>
/// answers 200 JSON, GET /api/status/<code> that status. Each request it answered is one line
/// of `requests()`.
pub struct HttpBackend {
    proc: Proc,
    pub dir: PathBuf,
    pub port: u16,
}

impl HttpBackend {
    pub fn start() -> HttpBackend {
        let port = free_port();
        let dir = tmpdir(&format!("http-backend-{port}"));
        let mut h = HttpBackend { proc: Proc::none(), dir, port };
        let log = h.dir.join("stderr.log");
        h.proc = Proc::spawn(
            Command::new(venv().join("bin/python"))
                .arg("-u")
                .arg(repo().join("tests/py/http_backend.py"))
                .arg(port.to_string())
                .current_dir(&h.dir)
                .stdout(log_file(&h.dir, "requests.log"))
                .stderr(log_file(&h.dir, "stderr.log")),
            libc::SIGTERM,
            Duration::from_secs(5),
        );
        wait_until("http backend to listen", Duration::from_secs(20), || {
            h.proc.check_alive("http_backend.py", &log);
            tcp_listening(port)
        });
        h
    }

    /// `host:port` (127.0.0.1), as calls_app.py's BACKEND_HTTP wants it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// One line per answered request: "<method> <path> <status> <client-ip>:<client-port>".
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("requests.log")).unwrap_or_default().lines().map(String::from).collect()
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.proc.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// All four backends, and the environment calls_app.py reads.
pub struct Backends {
    pub http: HttpBackend,
    pub redis: Redis,
    pub pg: Postgres,
    pub mysql: Mysql,
}

impl Backends {
    pub fn start() -> Backends {
        Backends { http: HttpBackend::start(), redis: Redis::start(), pg: Postgres::start(), mysql: Mysql::start() }
    }

    /// BACKEND_HTTP, REDIS_PORT, PG_*, MYSQL_* for tests/apps/calls_app.py.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BACKEND_HTTP", self.http.addr()),
            ("REDIS_PORT", self.redis.port.to_string()),
            ("PG_PORT", self.pg.port.to_string()),
            ("PG_DB", self.pg.db.to_string()),
            ("PG_USER", self.pg.user.to_string()),
            ("MYSQL_PORT", self.mysql.port.to_string()),
            ("MYSQL_DB", self.mysql.db.to_string()),
            ("MYSQL_USER", self.mysql.user.to_string()),
            ("MYSQL_PASSWORD", self.mysql.password.to_string()),
        ]
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use serde_json::Value;

    use super::*;

    /// calls_app.py's routes through Flask's test client, in one long-lived venv Python
    /// process (so connections are reused as in a uWSGI worker): one path per line in, one JSON
    /// line {"status", "body"} out.
    struct Driver {
        child: Child,
        out: BufReader<std::process::ChildStdout>,
    }

    const DRIVER: &str = "import json, sys\n\
        sys.path.insert(0, sys.argv[1])\n\
        import calls_app\n\
        c = calls_app.app.test_client()\n\
        for line in sys.stdin:\n\
        \x20   r = c.get(line.strip())\n\
        \x20   print(json.dumps({'status': r.status_code, 'body': r.get_json(silent=True)}), flush=True)\n";

    impl Driver {
        fn start(env: &[(&'static str, String)]) -> Driver {
            let mut child = Command::new(venv().join("bin/python"))
                .args(["-c", DRIVER])
                .arg(crate::apps())
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = BufReader::new(child.stdout.take().unwrap());
            Driver { child, out }
        }

        fn get(&mut self, path: &str) -> Value {
            writeln!(self.child.stdin.as_mut().unwrap(), "{path}").unwrap();
            let mut line = String::new();
            self.out.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{path}: {e}: {line:?}"));
            assert_eq!(v["status"], 200, "{path}: {v}");
            v["body"].clone()
        }
    }

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn count(text: &str, needle: &str) -> usize {
        text.lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until `f` reaches `want` (logs are written asynchronously), then checks it stays.
    fn settle(what: &str, want: usize, f: impl Fn() -> usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while f() < want && Instant::now() < deadline {
            sleep(Duration::from_millis(20));
        }
        sleep(Duration::from_millis(150));
        assert_eq!(f(), want, "{what}");
    }

    struct Counts {
        http: usize,
        redis: u64,
        pg_statements: usize,
        pg_connections: usize,
        my_queries: usize,
        my_connections: usize,
    }

    fn counts(b: &Backends) -> Counts {
        let pg = b.pg.log();
        let my = b.mysql.log();
        Counts {
            http: b.http.requests().len(),
            redis: b.redis.commandstats().values().sum(),
            pg_statements: count(&pg, "LOG:  statement: "),
            pg_connections: count(&pg, "connection authorized: user=postgres database=shop"),
            my_queries: count(&my, " Query\t"),
            my_connections: count(&my, " Connect\tapp@"),
        }
    }

    /// Sends `path` and checks the body and exactly what reached each backend.
    #[allow(clippy::too_many_arguments)]
    fn check(
        d: &mut Driver,
        b: &Backends,
        path: &str,
        http: usize,
        redis: u64,
        pg: (usize, usize),
        my: (usize, usize),
    ) -> Value {
        let before = counts(b);
        let body = d.get(path);
        settle(&format!("{path}: HTTP requests"), before.http + http, || b.http.requests().len());
        let after = counts(b);
        assert_eq!(after.redis - before.redis, redis, "{path}: redis commands {:?}", b.redis.commandstats());
        settle(&format!("{path}: PG statements"), before.pg_statements + pg.0, || {
            count(&b.pg.log(), "LOG:  statement: ")
        });
        assert_eq!(counts(b).pg_connections - before.pg_connections, pg.1, "{path}: PG connections");
        settle(&format!("{path}: MySQL queries\n{}", b.mysql.log()), before.my_queries + my.0, || {
            count(&b.mysql.log(), " Query\t")
        });
        assert_eq!(counts(b).my_connections - before.my_connections, my.1, "{path}: MySQL connections");
        body
    }

    fn ps_mentions(s: &str) -> Vec<String> {
        let out = Command::new("ps").args(["-eo", "pid,args"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(s)).map(String::from).collect()
    }

    /// Starts each backend, drives every calls_app.py route against them from a plain Python
    /// process, checks the answers and the exact number of calls each backend saw, then that
    /// Drop leaves no process and no temp dir. Needs root (postgres runs as its system user).
    #[test]
    fn backends_serve_calls_app_and_leave_nothing() {
        // SAFETY: no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the backends test needs root");
        let b = Backends::start();
        let mut pids = Vec::new();
        for (name, pid) in
            [("http", b.http.pid()), ("redis", b.redis.pid()), ("pg", b.pg.pid()), ("mysql", b.mysql.pid())]
        {
            let tree = descendants(pid);
            assert!(tree.iter().all(|p| alive(*p)), "{name}: {tree:?}");
            pids.push((name, tree));
        }
        // Postgres forks its auxiliary processes (checkpointer, walwriter, ...).
        assert!(pids[2].1.len() > 1, "postgres children: {:?}", pids[2].1);
        let dirs = [b.http.dir.clone(), b.redis.dir.clone(), b.pg.dir.clone(), b.mysql.dir.clone()];

        let mut d = Driver::start(&b.env());
        // (path, HTTP requests, Redis commands, (PG statements, PG connections),
        //  (MySQL COM_QUERY, MySQL connections)) as seen by the backends.
        let v = check(&mut d, &b, "/call/http", 1, 0, (0, 0), (0, 0));
        assert_eq!(v["status"], 200);
        assert_eq!(v["body"]["name"], "item 1");
        assert!(b.http.requests().last().unwrap().starts_with("GET /api/items/1 200 127.0.0.1:"));
        let v = check(&mut d, &b, "/call/http-status/503", 1, 0, (0, 0), (0, 0));
        assert_eq!(v["status"], 503);
        let v = check(&mut d, &b, "/call/http-status/404", 1, 0, (0, 0), (0, 0));
        assert_eq!(v["status"], 404);
        let v = check(&mut d, &b, "/call/urllib", 1, 0, (0, 0), (0, 0));
        assert_eq!(v["body"]["id"], 2);
        let v = check(&mut d, &b, "/call/httpclient", 1, 0, (0, 0), (0, 0));
        assert_eq!(v["body"]["id"], 3);
        let v = check(&mut d, &b, "/call/redis", 0, 2, (0, 0), (0, 0));
        assert_eq!(v["value"], "v");
        assert_eq!(b.redis.commandstats(), BTreeMap::from([("get".into(), 1), ("set".into(), 1)]));
        let v = check(&mut d, &b, "/call/redis", 0, 2, (0, 0), (0, 0));
        assert_eq!(v["value"], "v");
        assert_eq!(b.redis.command(&["CLIENT", "LIST"]).matches("cmd=").count(), 2, "one app connection + ours");
        // First use opens the connection: PG sends no SQL for it, PyMySQL one SET NAMES.
        let v = check(&mut d, &b, "/call/pg", 0, 0, (1, 1), (0, 0));
        assert_eq!(v["name"], "apple");
        let v = check(&mut d, &b, "/call/pg", 0, 0, (1, 0), (0, 0));
        assert_eq!(v["name"], "apple");
        let v = check(&mut d, &b, "/call/mysql", 0, 0, (0, 0), (2, 1));
        assert_eq!(v["name"], "apple");
        assert!(b.mysql.log().contains("SET NAMES utf8mb4"));
        let v = check(&mut d, &b, "/call/mysql", 0, 0, (0, 0), (1, 0));
        assert_eq!(v["name"], "apple");
        let v = check(&mut d, &b, "/call/all", 3, 2, (1, 0), (1, 0));
        assert_eq!(v["http"]["body"]["id"], 1);
        assert_eq!(v["urllib"]["body"]["id"], 2);
        assert_eq!(v["httpclient"]["body"]["id"], 3);
        assert_eq!(v["redis"]["value"], "v");
        assert_eq!(v["pg"]["name"], "apple");
        assert_eq!(v["mysql"]["name"], "apple");
        assert_eq!(b.pg.log().matches("statement: SELECT name FROM items WHERE id = 1").count(), 3);
        assert_eq!(b.mysql.log().matches("SELECT name FROM items WHERE id = 1").count(), 3);
        drop(d);

        // A fresh process: /warm opens the three connections with no command or statement
        // except PyMySQL's SET NAMES; then /call/all is exactly 7 calls.
        let mut d = Driver::start(&b.env());
        check(&mut d, &b, "/warm", 0, 0, (0, 1), (1, 1));
        check(&mut d, &b, "/call/all", 3, 2, (1, 0), (1, 0));
        drop(d);

        drop(b);
        for (name, tree) in &pids {
            let left: Vec<u32> = tree.iter().copied().filter(|p| alive(*p)).collect();
            assert!(left.is_empty(), "{name}: processes left {left:?}");
        }
        for dir in &dirs {
            assert!(!dir.exists(), "{} left", dir.display());
            let ps = ps_mentions(&dir.to_string_lossy());
            assert!(ps.is_empty(), "processes mention {}: {ps:?}", dir.display());
        }
    }
}
