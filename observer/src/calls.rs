//! Stage 3c: outbound calls. The kernel reports, for tracked threads, each `connect`, the
//! first bytes of each `sendto` and of each `recvfrom` that returned data. Here they become
//! calls: a send on a socket opens a call (when its bytes parse as HTTP/1.x, Redis,
//! PostgreSQL or MySQL), replies extend it, the next send on that socket or the end of the
//! thread's request closes it. At the request's end its thread's calls become Exit spans.
//!
//! Protocol parsers are pure functions over the captured prefix, unit-tested with junk.

use std::{
    collections::HashMap,
    fs,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use serde::Serialize;

use crate::decode::parse_sockaddr;

/// Component ids (OAP component-libraries.yml), as the Python agent reports them.
pub const COMPONENT_PYTHON: i32 = 7000;
pub const COMPONENT_REQUESTS: i32 = 7002;
pub const COMPONENT_PYMYSQL: i32 = 7003;
pub const COMPONENT_URLLIB3: i32 = 7006;
pub const COMPONENT_PSYCOPG: i32 = 7010;
pub const COMPONENT_REDIS: i32 = 7;

/// One outbound call of a request, ready to become an Exit span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExitCall {
    /// "http", "redis", "postgresql" or "mysql".
    pub kind: &'static str,
    pub operation: String,
    pub peer: String,
    /// "Http", "Cache" or "Database" (SkyWalking's span layers).
    pub layer: &'static str,
    pub component: i32,
    pub start_us: u64,
    pub end_us: u64,
    pub is_error: bool,
    pub tags: Vec<(String, String)>,
}

/// What the first bytes of a send are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Http { method: String, target: String, host: Option<String>, user_agent: Option<String> },
    Redis { cmd: String, key: String },
    PgStartup { database: Option<String> },
    PgQuery { sql: String, cut: bool },
    MysqlHandshake { database: Option<String> },
    MysqlQuery { sql: String, cut: bool },
    Other,
}

const METHODS: [&str; 9] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE"];

/// Classifies a send from its first bytes (`data`) and its full length (`len`).
pub fn classify(data: &[u8], len: u64) -> Sent {
    if let Some(s) = parse_http_request(data) {
        return s;
    }
    if let Some(s) = parse_resp(data) {
        return s;
    }
    if let Some(s) = parse_mysql(data, len) {
        return s;
    }
    if let Some(s) = parse_pg(data, len) {
        return s;
    }
    Sent::Other
}

/// `GET /path?q HTTP/1.1\r\nHost: h\r\n...`
pub fn parse_http_request(data: &[u8]) -> Option<Sent> {
    let text = std::str::from_utf8(data).ok().or_else(|| {
        // The capture may cut a multi-byte character: keep the valid prefix.
        let e = std::str::from_utf8(data).err()?;
        std::str::from_utf8(&data[..e.valid_up_to()]).ok()
    })?;
    let (line, rest) = text.split_once("\r\n")?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !METHODS.contains(&method) || !version.starts_with("HTTP/1.") || target.is_empty() {
        return None;
    }
    let mut host = None;
    let mut user_agent = None;
    for h in rest.split("\r\n") {
        let Some((k, v)) = h.split_once(':') else { continue };
        if k.eq_ignore_ascii_case("host") {
            host = Some(v.trim().to_string());
        } else if k.eq_ignore_ascii_case("user-agent") {
            user_agent = Some(v.trim().to_string());
        }
    }
    Some(Sent::Http { method: method.into(), target: target.into(), host, user_agent })
}

/// `HTTP/1.1 404 Not Found` -> 404.
pub fn parse_http_status(data: &[u8]) -> Option<u16> {
    let rest = data.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok().filter(|c| (100..600).contains(c))
}

/// A RESP array of bulk strings: `*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n` -> (GET, key).
pub fn parse_resp(data: &[u8]) -> Option<Sent> {
    let rest = data.strip_prefix(b"*")?;
    let (n, mut rest) = resp_int(rest)?;
    if n < 1 {
        return None;
    }
    let mut items = Vec::new();
    for _ in 0..n.min(2) {
        let r = rest.strip_prefix(b"$")?;
        let (len, r) = resp_int(r)?;
        let len = usize::try_from(len).ok()?;
        let avail = r.len().min(len);
        items.push(String::from_utf8_lossy(&r[..avail]).into_owned());
        if avail < len {
            break; // cut by the capture: keep what we have
        }
        rest = r.get(len..)?.strip_prefix(b"\r\n").unwrap_or(&[]);
    }
    let cmd = items.first()?.to_ascii_uppercase();
    if cmd.is_empty() || !cmd.bytes().all(|b| b.is_ascii_alphabetic() || b == b' ') {
        return None;
    }
    Some(Sent::Redis { cmd, key: items.get(1).cloned().unwrap_or_default() })
}

fn resp_int(b: &[u8]) -> Option<(i64, &[u8])> {
    let end = b.iter().take(12).position(|&c| c == b'\r')?;
    let n: i64 = std::str::from_utf8(&b[..end]).ok()?.parse().ok()?;
    Some((n, b.get(end + 1..)?.strip_prefix(b"\n")?))
}

/// A Redis reply that is an error (`-ERR ...`).
pub fn redis_error(reply: &[u8]) -> bool {
    reply.first() == Some(&b'-')
}

/// PostgreSQL frontend messages: the startup packet (no type byte) or a simple Query /
/// a Parse (extended protocol), whose length field must agree with the send.
pub fn parse_pg(data: &[u8], len: u64) -> Option<Sent> {
    if data.len() >= 8 {
        let l = u32::from_be_bytes(data[0..4].try_into().ok()?) as u64;
        let proto = u32::from_be_bytes(data[4..8].try_into().ok()?);
        if l == len && proto == 0x0003_0000 {
            // key\0value\0 ... \0
            let mut database = None;
            let mut it = data[8..].split(|&b| b == 0);
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if k == b"database" {
                    database = Some(String::from_utf8_lossy(v).into_owned());
                }
            }
            return Some(Sent::PgStartup { database });
        }
    }
    let (&t, rest) = data.split_first()?;
    let l = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as u64;
    if l + 1 > len || l < 5 {
        return None;
    }
    let body = &rest[4..];
    let sql = match t {
        b'Q' => body,
        // Parse: statement name \0, then the query \0.
        b'P' => body.splitn(2, |&b| b == 0).nth(1)?,
        _ => return None,
    };
    let end = sql.iter().position(|&b| b == 0);
    let sql_bytes = &sql[..end.unwrap_or(sql.len())];
    let sql = std::str::from_utf8(sql_bytes).ok()?;
    if sql.trim().is_empty() || sql.chars().any(|c| c.is_control() && !c.is_whitespace()) {
        return None;
    }
    Some(Sent::PgQuery { sql: sql.to_string(), cut: end.is_none() })
}

/// A PostgreSQL reply that is an ErrorResponse.
pub fn pg_error(reply: &[u8]) -> bool {
    reply.first() == Some(&b'E')
}

const MYSQL_COM_QUERY: u8 = 3;
const CLIENT_CONNECT_WITH_DB: u32 = 8;
const CLIENT_PLUGIN_AUTH_LENENC: u32 = 1 << 21;
const CLIENT_SECURE_CONNECTION: u32 = 1 << 15;
const CLIENT_PROTOCOL_41: u32 = 1 << 9;

/// MySQL client packets (3-byte length, sequence id, payload) whose length agrees with the
/// send: COM_QUERY, and the handshake response (which names the database).
pub fn parse_mysql(data: &[u8], len: u64) -> Option<Sent> {
    let plen = u32::from_le_bytes([*data.first()?, *data.get(1)?, *data.get(2)?, 0]) as u64;
    let seq = *data.get(3)?;
    if plen + 4 != len || plen == 0 {
        return None;
    }
    let payload = &data[4..];
    if seq == 0 && payload.first() == Some(&MYSQL_COM_QUERY) {
        let sql = String::from_utf8_lossy(&payload[1..]).into_owned();
        if sql.trim().is_empty() || sql.chars().any(|c| c.is_control() && !c.is_whitespace()) {
            return None;
        }
        return Some(Sent::MysqlQuery { cut: (payload.len() as u64) < plen, sql });
    }
    if seq == 1 && payload.len() >= 32 {
        let caps = u32::from_le_bytes(payload[0..4].try_into().ok()?);
        if caps & CLIENT_PROTOCOL_41 == 0 || payload[9..32].iter().any(|&b| b != 0) {
            return None;
        }
        let rest = &payload[32..];
        let user_end = rest.iter().position(|&b| b == 0)?;
        let rest = &rest[user_end + 1..];
        let rest = if caps & CLIENT_PLUGIN_AUTH_LENENC != 0 || caps & CLIENT_SECURE_CONNECTION != 0 {
            let n = *rest.first()? as usize; // lenenc < 251, or 1-byte length
            rest.get(1 + n..)?
        } else {
            &rest[rest.iter().position(|&b| b == 0)? + 1..]
        };
        let database = if caps & CLIENT_CONNECT_WITH_DB != 0 {
            let end = rest.iter().position(|&b| b == 0)?;
            Some(String::from_utf8_lossy(&rest[..end]).into_owned())
        } else {
            None
        };
        return Some(Sent::MysqlHandshake { database });
    }
    None
}

/// A MySQL reply that is an ERR packet.
pub fn mysql_error(reply: &[u8]) -> bool {
    reply.get(4) == Some(&0xff)
}

/// Replaces SQL string and number literals with `?`: the statement is reported without the
/// values the client library interpolated into it (unless asked for).
pub fn mask_sql_literals(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    let mut prev_word = false;
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                // 'it''s' is one literal; an unterminated one (cut) ends the text.
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                        }
                        Some('\'') | None => break,
                        Some(_) => {}
                    }
                }
                out.push('?');
                prev_word = false;
            }
            '0'..='9' if !prev_word => {
                while chars.peek().is_some_and(|d| d.is_ascii_alphanumeric() || *d == '.') {
                    chars.next();
                }
                out.push('?');
                prev_word = false;
            }
            _ => {
                prev_word = c.is_alphanumeric() || c == '_' || c == '$' || c == '"' || c == '`';
                out.push(c);
            }
        }
    }
    out
}

/// The remote address of a process's socket, from /proc (for connections made before we
/// attached, whose connect() we did not see).
pub fn socket_peer(pid: u32, fd: i32) -> Option<SocketAddr> {
    let link = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let inode = link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.to_string();
    for table in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        if let Some(a) = text.lines().skip(1).find_map(|l| proc_net_remote(l, &inode)) {
            return Some(a);
        }
    }
    None
}

/// The remote address on a /proc/net/tcp{,6} line, if the line is socket `inode`.
pub fn proc_net_remote(line: &str, inode: &str) -> Option<SocketAddr> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.get(9) != Some(&inode) {
        return None;
    }
    let (ip, port) = f.get(2)?.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => std::net::IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(ip, 16).ok()?.to_le_bytes())),
        32 => {
            // Four host-order 32-bit words.
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

const REDIS_WRITES: [&str; 24] = [
    "SET", "SETEX", "SETNX", "PSETEX", "MSET", "APPEND", "DEL", "UNLINK", "INCR", "INCRBY", "DECR", "DECRBY", "EXPIRE",
    "HSET", "HDEL", "HMSET", "LPUSH", "RPUSH", "LPOP", "RPOP", "SADD", "SREM", "ZADD", "ZREM",
];
const REDIS_READS: [&str; 16] = [
    "GET", "MGET", "GETRANGE", "STRLEN", "EXISTS", "TTL", "HGET", "HGETALL", "HMGET", "HKEYS", "LRANGE", "LLEN",
    "SMEMBERS", "SCARD", "ZRANGE", "ZSCORE",
];

/// Per-connection facts learnt from earlier traffic.
#[derive(Debug, Default, Clone)]
struct Conn {
    peer: Option<SocketAddr>,
    database: Option<String>,
}

#[derive(Debug)]
struct Open {
    tid: u32,
    sent: Sent,
    start_ns: u64,
    end_ns: u64,
    reply: Option<Vec<u8>>,
}

/// Counters for the summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CallStats {
    /// Calls made to Exit spans.
    pub exit_calls: u64,
    /// Calls that happened outside any request of their thread (startup, background).
    pub calls_outside_requests: u64,
    /// Calls of workers running several requests per thread (gevent): not attributed.
    pub calls_async_unattributed: u64,
}

#[derive(Debug, Default)]
pub struct Calls {
    conns: HashMap<(u32, i32), Conn>,
    open: HashMap<(u32, i32), Open>,
    done: HashMap<u32, Vec<(Open, Conn)>>,
    /// Statements keep their literal values (`--sql-literals`).
    pub keep_literals: bool,
    pub stats: CallStats,
}

impl Calls {
    pub fn new(keep_literals: bool) -> Self {
        Self { keep_literals, ..Default::default() }
    }

    pub fn connect(&mut self, tgid: u32, fd: i32, sockaddr: &[u8]) {
        self.finish(tgid, fd);
        self.conns.insert((tgid, fd), Conn { peer: parse_sockaddr(sockaddr), database: None });
    }

    pub fn send(&mut self, tgid: u32, tid: u32, fd: i32, data: &[u8], len: u64, ts_ns: u64) {
        if let Some(o) = self.open.get_mut(&(tgid, fd)) {
            if o.reply.is_none() {
                o.end_ns = ts_ns; // more of the same request
                return;
            }
            self.finish(tgid, fd);
        }
        let sent = classify(data, len);
        match &sent {
            Sent::Other => return,
            Sent::PgStartup { database } | Sent::MysqlHandshake { database } => {
                let c = self.conns.entry((tgid, fd)).or_default();
                c.database = database.clone();
                return;
            }
            _ => {}
        }
        self.open.insert((tgid, fd), Open { tid, sent, start_ns: ts_ns, end_ns: ts_ns, reply: None });
    }

    pub fn recv(&mut self, tgid: u32, fd: i32, data: &[u8], ts_ns: u64) {
        if let Some(o) = self.open.get_mut(&(tgid, fd)) {
            if o.reply.is_none() {
                o.reply = Some(data.to_vec());
            }
            o.end_ns = ts_ns;
        }
    }

    fn finish(&mut self, tgid: u32, fd: i32) {
        if let Some(o) = self.open.remove(&(tgid, fd)) {
            let conn = self.conns.entry((tgid, fd)).or_default();
            if conn.peer.is_none() {
                conn.peer = socket_peer(tgid, fd);
            }
            let conn = conn.clone();
            self.done.entry(o.tid).or_default().push((o, conn));
        }
    }

    /// The calls of a request that ran on `tid` from `start_us` to `end_us` (wall clock),
    /// given `wall_offset_ns` = wall clock - monotonic clock. Calls of the thread before the
    /// request are counted and dropped.
    pub fn take_for_request(&mut self, tid: u32, start_us: u64, wall_offset_ns: i64, attribute: bool) -> Vec<ExitCall> {
        let fds: Vec<(u32, i32)> = self.open.iter().filter(|(_, o)| o.tid == tid).map(|(k, _)| *k).collect();
        for (g, fd) in fds {
            self.finish(g, fd);
        }
        let Some(done) = self.done.remove(&tid) else { return Vec::new() };
        let mut out = Vec::new();
        for (o, conn) in done {
            let wall = |ns: u64| ((ns as i64 + wall_offset_ns).max(0) as u64) / 1000;
            let (start, end) = (wall(o.start_ns), wall(o.end_ns));
            if !attribute {
                self.stats.calls_async_unattributed += 1;
                continue;
            }
            // uWSGI stamps the start before reading the request; a call cannot precede it.
            if start < start_us {
                self.stats.calls_outside_requests += 1;
                continue;
            }
            if let Some(c) = self.exit_call(&o, &conn, start, end) {
                self.stats.exit_calls += 1;
                out.push(c);
            }
        }
        out.sort_by_key(|c| c.start_us);
        out
    }

    /// Forgets a process (its sockets' fds may be reused by the next one).
    pub fn forget_pid(&mut self, pid: u32) {
        self.conns.retain(|(p, _), _| *p != pid);
        self.open.retain(|(p, _), _| *p != pid);
    }

    /// Bounded memory: calls of threads that never finish a request (the master, a
    /// background thread, a thread that died) are dropped after `max_age_ns` and counted.
    pub fn prune(&mut self, now_ns: u64, max_age_ns: u64) {
        let old = |ns: u64| now_ns.saturating_sub(ns) > max_age_ns;
        let stale: Vec<(u32, i32)> = self.open.iter().filter(|(_, o)| old(o.end_ns)).map(|(k, _)| *k).collect();
        for (g, fd) in stale {
            self.finish(g, fd);
        }
        let mut dropped = 0u64;
        self.done.retain(|_, v| {
            let before = v.len();
            v.retain(|(o, _)| !old(o.end_ns));
            dropped += (before - v.len()) as u64;
            !v.is_empty()
        });
        self.stats.calls_outside_requests += dropped;
    }

    fn exit_call(&self, o: &Open, conn: &Conn, start_us: u64, end_us: u64) -> Option<ExitCall> {
        let peer_ip = conn.peer.map(|a| a.to_string()).unwrap_or_default();
        let reply = o.reply.as_deref().unwrap_or(&[]);
        let t = |k: &str, v: &str| (k.to_string(), v.to_string());
        let db = conn.database.clone().unwrap_or_default();
        let statement = |sql: &str, cut: bool| {
            let s = if self.keep_literals { sql.to_string() } else { mask_sql_literals(sql) };
            if cut {
                format!("{s}...")
            } else {
                s
            }
        };
        Some(match &o.sent {
            Sent::Http { method, target, host, user_agent } => {
                let status = parse_http_status(reply);
                let peer = host.clone().unwrap_or(peer_ip);
                let path = target.split(['?', '#']).next().unwrap_or("/");
                let path = if path.starts_with('/') { path.to_string() } else { url_path(path) };
                let ua = user_agent.as_deref().unwrap_or("");
                let component = if ua.starts_with("python-requests/") {
                    COMPONENT_REQUESTS
                } else if ua.starts_with("python-urllib3/") {
                    COMPONENT_URLLIB3
                } else {
                    COMPONENT_PYTHON
                };
                let url = if target.starts_with('/') { format!("http://{peer}{target}") } else { target.clone() };
                let mut tags = vec![t("http.method", method), t("http.url", &url)];
                if let Some(s) = status {
                    tags.push(t("http.status_code", &s.to_string()));
                }
                ExitCall {
                    kind: "http",
                    operation: path,
                    peer,
                    layer: "Http",
                    component,
                    start_us,
                    end_us,
                    is_error: status.is_none_or(|s| s >= 400),
                    tags,
                }
            }
            Sent::Redis { cmd, key } => {
                let op = if REDIS_WRITES.contains(&cmd.as_str()) {
                    "write"
                } else if REDIS_READS.contains(&cmd.as_str()) {
                    "read"
                } else {
                    ""
                };
                ExitCall {
                    kind: "redis",
                    operation: format!("Redis/{cmd}"),
                    peer: peer_ip,
                    layer: "Cache",
                    component: COMPONENT_REDIS,
                    start_us,
                    end_us,
                    is_error: reply.is_empty() || redis_error(reply),
                    tags: vec![t("cache.type", "Redis"), t("cache.key", key), t("cache.cmd", cmd), t("cache.op", op)],
                }
            }
            Sent::PgQuery { sql, cut } => ExitCall {
                kind: "postgresql",
                operation: "PostgreSQL/Psycopg/execute".into(),
                peer: peer_ip,
                layer: "Database",
                component: COMPONENT_PSYCOPG,
                start_us,
                end_us,
                is_error: reply.is_empty() || pg_error(reply),
                tags: vec![t("db.type", "PostgreSQL"), t("db.instance", &db), t("db.statement", &statement(sql, *cut))],
            },
            Sent::MysqlQuery { sql, cut } => ExitCall {
                kind: "mysql",
                operation: "Mysql/PyMsql/execute".into(),
                peer: peer_ip,
                layer: "Database",
                component: COMPONENT_PYMYSQL,
                start_us,
                end_us,
                is_error: reply.is_empty() || mysql_error(reply),
                tags: vec![t("db.type", "mysql"), t("db.instance", &db), t("db.statement", &statement(sql, *cut))],
            },
            _ => return None,
        })
    }
}

/// The path of an absolute-form target (`http://h:1/p?q` -> `/p`).
fn url_path(target: &str) -> String {
    let rest = target.split_once("://").map_or(target, |(_, r)| r);
    match rest.find('/') {
        Some(i) => rest[i..].split(['?', '#']).next().unwrap_or("/").to_string(),
        None => "/".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http() {
        let req = b"GET /api/items/1?x=2 HTTP/1.1\r\nHost: localhost:8390\r\nUser-Agent: python-requests/2.34.2\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            classify(req, req.len() as u64),
            Sent::Http {
                method: "GET".into(),
                target: "/api/items/1?x=2".into(),
                host: Some("localhost:8390".into()),
                user_agent: Some("python-requests/2.34.2".into())
            }
        );
        assert_eq!(parse_http_status(b"HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(parse_http_status(b"HTTP/1.0 200 OK"), Some(200));
        assert_eq!(parse_http_status(b"HTTP/1.1 99 x"), None);
        assert_eq!(parse_http_status(b"HTTP/2 200"), None);
        assert_eq!(parse_http_status(b""), None);
        assert_eq!(parse_http_request(b"GET /x HTTP/1.1"), None, "no CRLF: not a request line we saw whole");
        assert_eq!(parse_http_request(b"FOO /x HTTP/1.1\r\n"), None);
        assert_eq!(parse_http_request(b"GET  HTTP/1.1\r\n"), None);
        // A capture cut inside a UTF-8 character keeps the valid prefix.
        let mut cut = b"POST /p HTTP/1.1\r\nHost: h\r\nX: \xc3".to_vec();
        assert!(matches!(parse_http_request(&cut), Some(Sent::Http { host: Some(h), .. }) if h == "h"));
        cut.truncate(3);
        assert_eq!(parse_http_request(&cut), None);
        assert_eq!(url_path("http://h:1/p/q?z"), "/p/q");
        assert_eq!(url_path("http://h:1"), "/");
    }

    #[test]
    fn redis() {
        let set = b"*3\r\n$3\r\nSET\r\n$3\r\nk:1\r\n$1\r\nv\r\n";
        assert_eq!(classify(set, 29), Sent::Redis { cmd: "SET".into(), key: "k:1".into() });
        assert_eq!(parse_resp(b"*1\r\n$4\r\nping\r\n"), Some(Sent::Redis { cmd: "PING".into(), key: String::new() }));
        // Key cut by the capture.
        assert_eq!(
            parse_resp(b"*2\r\n$3\r\nGET\r\n$10\r\nabc"),
            Some(Sent::Redis { cmd: "GET".into(), key: "abc".into() })
        );
        assert_eq!(parse_resp(b"*0\r\n"), None);
        assert_eq!(parse_resp(b"*2\r\n$3\r\nG1T\r\n"), None);
        assert_eq!(parse_resp(b"*x\r\n"), None);
        assert!(redis_error(b"-ERR wrong"));
        assert!(!redis_error(b"+OK\r\n"));
    }

    #[test]
    fn postgres() {
        let mut startup = Vec::new();
        let body = b"\x00\x03\x00\x00user\0postgres\0database\0shop\0\0";
        startup.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        startup.extend_from_slice(body);
        assert_eq!(classify(&startup, startup.len() as u64), Sent::PgStartup { database: Some("shop".into()) });
        let sql = b"SELECT name FROM items WHERE id = 1\0";
        let mut q = vec![b'Q'];
        q.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
        q.extend_from_slice(sql);
        assert_eq!(
            classify(&q, q.len() as u64),
            Sent::PgQuery { sql: "SELECT name FROM items WHERE id = 1".into(), cut: false }
        );
        // Cut by the capture: no NUL seen.
        assert!(matches!(parse_pg(&q[..20], q.len() as u64), Some(Sent::PgQuery { cut: true, .. })));
        // Length field disagreeing with the send: not PostgreSQL.
        assert_eq!(parse_pg(&q, 3), None);
        assert!(pg_error(b"E\0\0\0"));
        assert!(!pg_error(b"T\0\0\0"));
    }

    #[test]
    fn mysql() {
        let sql = b"SELECT name FROM items WHERE id = 1";
        let mut p = vec![(sql.len() + 1) as u8, 0, 0, 0, MYSQL_COM_QUERY];
        p.extend_from_slice(sql);
        assert_eq!(
            classify(&p, p.len() as u64),
            Sent::MysqlQuery { sql: "SELECT name FROM items WHERE id = 1".into(), cut: false }
        );
        assert_eq!(parse_mysql(&p, p.len() as u64 + 1), None);
        // Handshake response 41 with a database.
        let caps: u32 = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_CONNECT_WITH_DB;
        let mut payload = caps.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0, 1, 33]);
        payload.extend_from_slice(&[0; 23]);
        payload.extend_from_slice(b"app\0");
        payload.push(20);
        payload.extend_from_slice(&[7; 20]);
        payload.extend_from_slice(b"shop\0mysql_native_password\0");
        let mut h = vec![payload.len() as u8, 0, 0, 1];
        h.extend_from_slice(&payload);
        assert_eq!(classify(&h, h.len() as u64), Sent::MysqlHandshake { database: Some("shop".into()) });
        assert!(mysql_error(&[9, 0, 0, 1, 0xff, 0x48]));
        assert!(!mysql_error(&[7, 0, 0, 1, 0, 0]));
    }

    #[test]
    fn literals() {
        assert_eq!(mask_sql_literals("SELECT a FROM t WHERE id = 1"), "SELECT a FROM t WHERE id = ?");
        assert_eq!(mask_sql_literals("x = 'it''s' AND y=2.5 AND t1.c=3"), "x = ? AND y=? AND t1.c=?");
        assert_eq!(mask_sql_literals("INSERT INTO t2 VALUES ('a', 42)"), "INSERT INTO t2 VALUES (?, ?)");
        assert_eq!(mask_sql_literals("name = 'cut"), "name = ?");
        assert_eq!(mask_sql_literals("SET NAMES utf8mb4"), "SET NAMES utf8mb4");
    }

    #[test]
    fn addresses() {
        let mut sa = vec![0u8; 16];
        sa[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        sa[2..4].copy_from_slice(&6390u16.to_be_bytes());
        sa[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_sockaddr(&sa), Some("127.0.0.1:6390".parse().unwrap()));
        assert_eq!(parse_sockaddr(&[1, 0]), None);
        let line = "   3: 0100007F:A1B2 0100007F:18F6 01 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(proc_net_remote(line, "123456"), Some("127.0.0.1:6390".parse().unwrap()));
        assert_eq!(proc_net_remote(line, "1"), None);
        let v6 = "   0: 00000000000000000000000000000000:1F90 0000000000000000FFFF00000100007F:18F6 01 0 0 0 0 0 99 1";
        assert_eq!(proc_net_remote(v6, "99"), Some("127.0.0.1:6390".parse().unwrap()));
    }

    /// A request's calls: the open call is closed at the request's end, calls before the
    /// request are dropped and counted, async workers attribute nothing.
    #[test]
    fn tracker() {
        let mut c = Calls::default();
        let mut sa = vec![0u8; 16];
        sa[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        sa[2..4].copy_from_slice(&6390u16.to_be_bytes());
        sa[4..8].copy_from_slice(&[127, 0, 0, 1]);
        let set = b"*3\r\n$3\r\nSET\r\n$3\r\nk:1\r\n$1\r\nv\r\n";
        let get = b"*2\r\n$3\r\nGET\r\n$3\r\nk:1\r\n";
        c.connect(10, 5, &sa);
        c.send(10, 11, 5, set, 29, 1_000_000); // before the request: dropped
        c.recv(10, 5, b"+OK\r\n", 1_100_000);
        c.send(10, 11, 5, set, 29, 5_000_000);
        c.recv(10, 5, b"+OK\r\n", 5_200_000);
        c.send(10, 11, 5, get, 22, 6_000_000);
        c.recv(10, 5, b"-ERR x\r\n", 6_500_000);
        c.send(10, 11, 7, b"junk", 4, 6_600_000);
        let calls = c.take_for_request(11, 4000, 0, true);
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].operation, "Redis/SET");
        assert_eq!((calls[0].start_us, calls[0].end_us), (5000, 5200));
        assert!(!calls[0].is_error);
        assert_eq!(calls[1].operation, "Redis/GET");
        assert!(calls[1].is_error);
        assert_eq!(calls[1].peer, "127.0.0.1:6390");
        assert_eq!(c.stats, CallStats { exit_calls: 2, calls_outside_requests: 1, calls_async_unattributed: 0 });
        c.send(10, 11, 5, get, 22, 7_000_000);
        assert!(c.take_for_request(11, 4000, 0, false).is_empty());
        assert_eq!(c.stats.calls_async_unattributed, 1);
        // A thread that never finishes a request: its calls age out, counted.
        c.send(10, 99, 5, get, 22, 8_000_000);
        c.recv(10, 5, b"$1\r\nv\r\n", 8_100_000);
        c.prune(9_000_000, 5_000_000);
        assert_eq!(c.open.len() + c.done.len(), 1, "young call kept");
        c.prune(20_000_000, 5_000_000);
        assert_eq!(c.open.len() + c.done.len(), 0);
        assert_eq!(c.stats.calls_outside_requests, 2);
    }

    /// Junk never panics.
    #[test]
    fn junk() {
        let mut seed = 0x9E3779B97F4A7C15u64;
        for n in 0..3000usize {
            let len = n % 70;
            let mut data = crate::junk_bytes(&mut seed, len);
            if n % 5 == 0 && !data.is_empty() {
                data[0] = [b'*', b'Q', b'P', b'G', 3][n % 5];
            }
            let _ = classify(&data, len as u64);
            let _ = classify(&data, (len as u64).wrapping_mul(3));
            let _ = parse_http_status(&data);
            let _ = parse_sockaddr(&data);
            let _ = mask_sql_literals(&String::from_utf8_lossy(&data));
        }
    }
}
