//! Stage 3: turn raw ring-buffer records into validated request and process records.
//! Pure functions plus one small cache; no I/O, so everything here is unit-tested.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use observer_common::*;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short")]
    Short(usize),
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("request record has {got} bytes, expected {want}")]
    RequestSize { got: usize, want: usize },
    #[error("process record has {got} bytes, expected {want}")]
    ProcSize { got: usize, want: usize },
    #[error("call record has {got} bytes, expected {want}")]
    CallSize { got: usize, want: usize },
    #[error("exception record has {got} bytes, expected {want}")]
    ExceptionSize { got: usize, want: usize },
    #[error("unknown process action {0}")]
    UnknownAction(u32),
}

/// Why a request record does not look like a real uWSGI request (layout check on live data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Not a layout problem: in async modes (gevent) uWSGI closes a connection that sent
    /// nothing through the same path as a request, with no vars parsed.
    #[error("connection closed before sending a request")]
    NoRequest,
    /// A request uWSGI passed to the app although it had no method (e.g. a bare CRLF CRLF):
    /// real, but nothing a span can be made of.
    #[error("request without a method (malformed HTTP)")]
    NoMethod,
    #[error("request memory could not be read")]
    ReadError,
    /// Preempted in the kernel while another run reused its scratch space (rare; only on
    /// preemptible kernels): its fields may be mixed, so it is dropped and counted.
    #[error("probe preempted, scratch space reused")]
    ScratchRace,
    #[error("method is not an HTTP token")]
    Method,
    #[error("status is outside 100..=599")]
    Status,
    #[error("timestamps are not plausible wall-clock microseconds")]
    Time,
    #[error("client socket address family is unknown")]
    Family,
    #[error("a text field holds NUL bytes")]
    Nul,
}

impl Invalid {
    /// Whether this rejection hints at a wrong struct layout (as opposed to odd traffic).
    /// A bad method or a NUL in the path can come from a client (uWSGI URL-decodes
    /// PATH_INFO and does not check the method), so they never count toward a refusal.
    pub fn suspects_layout(self) -> bool {
        matches!(self, Invalid::ReadError | Invalid::Time | Invalid::Family | Invalid::Status)
    }
}

pub enum Record {
    Request(Box<RequestEvent>),
    Proc(ProcEvent),
    Exception(Box<ExceptionEvent>),
    Call(Box<CallEvent>),
    Recv(RecvEvent),
}

/// Splits a ring-buffer record by its kind, checking its size exactly.
pub fn parse_record(buf: &[u8]) -> Result<Record, DecodeError> {
    let kind =
        buf.get(..4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]])).ok_or(DecodeError::Short(buf.len()))?;
    match EventKind::try_from(kind).map_err(DecodeError::UnknownKind)? {
        EventKind::Request => {
            let want = size_of::<RequestEvent>();
            if buf.len() != want {
                return Err(DecodeError::RequestSize { got: buf.len(), want });
            }
            // SAFETY: size checked; RequestEvent is plain integers and byte arrays, valid for
            // any bit pattern; read_unaligned copes with any alignment.
            Ok(Record::Request(Box::new(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) })))
        }
        EventKind::Proc => {
            let want = size_of::<ProcEvent>();
            if buf.len() != want {
                return Err(DecodeError::ProcSize { got: buf.len(), want });
            }
            // SAFETY: as above.
            let ev: ProcEvent = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            ProcAction::try_from(ev.action).map_err(DecodeError::UnknownAction)?;
            Ok(Record::Proc(ev))
        }
        EventKind::Exception => {
            let want = size_of::<ExceptionEvent>();
            if buf.len() != want {
                return Err(DecodeError::ExceptionSize { got: buf.len(), want });
            }
            // SAFETY: as above (integers and byte arrays only).
            Ok(Record::Exception(Box::new(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) })))
        }
        EventKind::Call => {
            let want = size_of::<CallEvent>();
            if buf.len() != want {
                return Err(DecodeError::CallSize { got: buf.len(), want });
            }
            // SAFETY: as above.
            Ok(Record::Call(Box::new(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) })))
        }
        EventKind::Recv => {
            let want = size_of::<RecvEvent>();
            if buf.len() != want {
                return Err(DecodeError::CallSize { got: buf.len(), want });
            }
            // SAFETY: as above.
            Ok(Record::Recv(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) }))
        }
    }
}

/// One observed request, as printed and later turned into a span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub instance: u32,
    pub worker_pid: u32,
    pub tid: u32,
    /// uWSGI core (async_id): the thread index, or the gevent/async slot.
    pub core: i32,
    pub method: String,
    pub path: String,
    pub query: String,
    pub host: String,
    pub status: u16,
    pub response_bytes: u64,
    pub start_us: u64,
    pub end_us: u64,
    pub duration_us: u64,
    pub client: String,
    pub sw8: Option<String>,
    pub sw8_correlation: Option<String>,
    pub sw8_x: Option<String>,
    /// Fields cut at the capture limit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub truncated: Vec<&'static str>,
    /// The Python exception that failed the request (status >= 500), read from the
    /// interpreter; absent when none was seen or it could not be resolved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exception: Option<crate::python::PyException>,
    /// Outbound calls the request made (Exit spans), in start order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub calls: Vec<crate::calls::ExitCall>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// "fork", "exit" or "exec".
    pub action: &'static str,
    pub pid: u32,
    pub parent: u32,
    pub instance: u32,
}

pub fn proc_record(ev: &ProcEvent) -> ProcRecord {
    let action = match ProcAction::try_from(ev.action) {
        Ok(ProcAction::Fork) => "fork",
        Ok(ProcAction::Exit) => "exit",
        Ok(ProcAction::Exec) => "exec",
        Err(_) => "unknown",
    };
    ProcRecord { kind: "process", action, pid: ev.pid, parent: ev.parent, instance: ev.instance }
}

fn field(buf: &[u8], len: u16) -> (&[u8], bool) {
    let n = (len as usize).min(buf.len());
    (&buf[..n], len as usize > buf.len())
}

fn is_token(b: &[u8]) -> bool {
    !b.is_empty() && b.iter().all(|&c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

const DAY_US: u64 = 86_400_000_000;

/// Checks that a record carries a plausible request: this is how a wrong layout is caught.
pub fn validate(ev: &RequestEvent, now_us: u64) -> Result<(), Invalid> {
    if ev.flags & FLAG_SCRATCH_RACE != 0 {
        return Err(Invalid::ScratchRace);
    }
    if ev.flags & FLAG_READ_ERROR != 0 {
        return Err(Invalid::ReadError);
    }
    // Checks that hold for anything uWSGI hands to the probe come first, so that a wrong
    // layout cannot pass itself off as an empty connection.
    let (s, e) = (ev.start_us, ev.end_us);
    if s == 0 || e < s || e - s > DAY_US || e.abs_diff(now_us) > DAY_US {
        return Err(Invalid::Time);
    }
    if !matches!(sa_family(&ev.sockaddr), 0 | 1 | 2 | 10) {
        return Err(Invalid::Family);
    }
    if ev.var_cnt == 0 && ev.method_len == 0 && ev.path_len == 0 {
        return Err(Invalid::NoRequest);
    }
    if ev.method_len == 0 {
        return Err(Invalid::NoMethod);
    }
    let (method, cut) = field(&ev.method, ev.method_len);
    if cut || !is_token(method) {
        return Err(Invalid::Method);
    }
    if !(100..=599).contains(&ev.status) {
        return Err(Invalid::Status);
    }
    let texts = [
        field(&ev.path, ev.path_len).0,
        field(&ev.query, ev.query_len).0,
        field(&ev.host, ev.host_len).0,
        field(&ev.remote_addr, ev.remote_addr_len).0,
    ];
    if texts.iter().any(|t| t.contains(&0)) {
        return Err(Invalid::Nul);
    }
    Ok(())
}

fn sa_family(sa: &[u8; SOCKADDR_CAP]) -> u16 {
    u16::from_ne_bytes([sa[0], sa[1]])
}

/// The peer in a `struct sockaddr` copied from the request, as "ip:port".
pub fn sockaddr_peer(sa: &[u8; SOCKADDR_CAP]) -> Option<String> {
    parse_sockaddr(sa).map(|a| a.to_string())
}

/// A `struct sockaddr_in` / `sockaddr_in6` (an IPv4-mapped IPv6 address becomes IPv4).
pub fn parse_sockaddr(b: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*b.first()?, *b.get(1)?]);
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family as i32 {
        libc::AF_INET => Some(SocketAddr::new(Ipv4Addr::new(b[4], b[5], b[6], *b.get(7)?).into(), port)),
        libc::AF_INET6 => {
            let a: [u8; 16] = b.get(8..24)?.try_into().ok()?;
            let ip = Ipv6Addr::from(a);
            Some(SocketAddr::new(ip.to_ipv4_mapped().map_or(ip.into(), Into::into), port))
        }
        _ => None,
    }
}

fn host_part(peer: &str) -> &str {
    match peer.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => peer,
    }
}

/// Turns validated records into [`Request`]s. Holds the only state decoding needs: the
/// client of each kept-alive connection, since uWSGI zeroes it for reused connections.
pub struct Decoder {
    /// Lowercase header names never to keep (from `--drop-header`, plus the defaults).
    drop: Vec<String>,
    conn_peer: HashMap<(u32, i32), String>,
}

pub const DEFAULT_DROPPED: [&str; 2] = ["authorization", "cookie"];

impl Decoder {
    pub fn new(extra_drop: &[String]) -> Self {
        let mut drop: Vec<String> = DEFAULT_DROPPED.iter().map(|s| s.to_string()).collect();
        drop.extend(extra_drop.iter().map(|s| s.trim().to_ascii_lowercase()));
        Self { drop, conn_peer: HashMap::new() }
    }

    fn keep(&self, header: &str) -> bool {
        !self.drop.iter().any(|d| d == header)
    }

    /// Pids with connection state.
    pub fn pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.conn_peer.keys().map(|(p, _)| *p).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Forgets connection state of a process that exited.
    pub fn forget_pid(&mut self, pid: u32) {
        self.conn_peer.retain(|(p, _), _| *p != pid);
    }

    /// Decodes a record that passed [`validate`].
    pub fn request(&mut self, ev: &RequestEvent) -> Request {
        let mut truncated = Vec::new();
        let mut text = |name: &'static str, buf: &[u8], len: u16| -> String {
            let (b, cut) = field(buf, len);
            if cut {
                truncated.push(name);
            }
            String::from_utf8_lossy(b).into_owned()
        };
        let method = text("method", &ev.method, ev.method_len);
        let path = text("path", &ev.path, ev.path_len);
        let query = text("query", &ev.query, ev.query_len);
        let host = text("host", &ev.host, ev.host_len);
        let remote_addr = text("remote_addr", &ev.remote_addr, ev.remote_addr_len);
        let remote_port = text("remote_port", &ev.remote_port, ev.remote_port_len);
        let router = text("router", &ev.router, ev.router_len);
        let sw8 = (ev.sw8_len > 0).then(|| text("sw8", &ev.sw8, ev.sw8_len));
        let sw8_corr = (ev.sw8_corr_len > 0).then(|| text("sw8_correlation", &ev.sw8_corr, ev.sw8_corr_len));
        let sw8_x = (ev.sw8_x_len > 0).then(|| text("sw8_x", &ev.sw8_x, ev.sw8_x_len));
        let client = self.client(ev, &remote_addr, &remote_port, &router);
        Request {
            kind: "request",
            instance: ev.instance,
            worker_pid: ev.tgid,
            tid: ev.tid,
            core: ev.async_id,
            method,
            path,
            query,
            host,
            status: ev.status as u16,
            response_bytes: ev.response_size,
            start_us: ev.start_us,
            end_us: ev.end_us,
            duration_us: ev.end_us - ev.start_us,
            client,
            sw8: sw8.filter(|_| self.keep("sw8")),
            sw8_correlation: sw8_corr.filter(|_| self.keep("sw8-correlation")),
            sw8_x: sw8_x.filter(|_| self.keep("sw8-x")),
            truncated,
            exception: None,
            calls: Vec::new(),
        }
    }

    /// The client address from the most trustworthy source:
    /// - a proxy speaking the uwsgi protocol (uWSGI's router, nginx) sends REMOTE_ADDR and
    ///   REMOTE_PORT; uWSGI's own router sends the port byte-swapped (corerouter.c formats
    ///   `sin_port` without ntohs), so it is swapped back when UWSGI_ROUTER=http;
    /// - a worker that parsed HTTP itself accepted the client: its socket address is right;
    /// - on a reused keep-alive connection uWSGI zeroes that address (REMOTE_ADDR=0.0.0.0), so
    ///   the address seen when the connection was accepted is used.
    fn client(&mut self, ev: &RequestEvent, remote_addr: &str, remote_port: &str, router: &str) -> String {
        if !remote_port.is_empty() {
            let port = match remote_port.parse::<u16>() {
                Ok(p) if router == "http" => p.swap_bytes().to_string(),
                Ok(p) => p.to_string(),
                Err(_) => return remote_addr.to_string(),
            };
            return if remote_addr.contains(':') {
                format!("[{remote_addr}]:{port}")
            } else {
                format!("{remote_addr}:{port}")
            };
        }
        let key = (ev.tgid, ev.fd);
        if let Some(peer) = sockaddr_peer(&ev.sockaddr) {
            if !remote_addr.is_empty() && remote_addr != "0.0.0.0" && remote_addr != host_part(&peer) {
                // A uwsgi-protocol sender that named the client but not its port.
                return remote_addr.to_string();
            }
            self.conn_peer.insert(key, peer.clone());
            return peer;
        }
        if sa_family(&ev.sockaddr) == 0 {
            if let Some(p) = self.conn_peer.get(&key) {
                return p.clone();
            }
        }
        remote_addr.to_string()
    }
}

/// A zeroed request record, for tests and fuzz-style checks.
pub fn empty_event() -> RequestEvent {
    // SAFETY: all-zero is a valid RequestEvent (integers and byte arrays only).
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_000_000_000_000;

    fn put<const N: usize>(dst: &mut [u8; N], len: &mut u16, s: &str) {
        let n = s.len().min(N);
        dst[..n].copy_from_slice(&s.as_bytes()[..n]);
        *len = s.len() as u16;
    }

    fn sample() -> RequestEvent {
        let mut e = empty_event();
        e.kind = EventKind::Request as u32;
        e.tgid = 100;
        e.tid = 101;
        e.instance = 99;
        e.fd = 7;
        e.status = 200;
        e.response_size = 13;
        e.start_us = NOW - 1500;
        e.end_us = NOW;
        put(&mut e.method, &mut e.method_len, "GET");
        put(&mut e.path, &mut e.path_len, "/users/42");
        put(&mut e.query, &mut e.query_len, "a=1&b=2");
        put(&mut e.host, &mut e.host_len, "example.com:8080");
        put(&mut e.remote_addr, &mut e.remote_addr_len, "10.1.2.3");
        e
    }

    fn v4(ip: [u8; 4], port: u16) -> [u8; SOCKADDR_CAP] {
        let mut sa = [0u8; SOCKADDR_CAP];
        sa[..2].copy_from_slice(&2u16.to_ne_bytes());
        sa[2..4].copy_from_slice(&port.to_be_bytes());
        sa[4..8].copy_from_slice(&ip);
        sa
    }

    fn bytes(e: &RequestEvent) -> Vec<u8> {
        // SAFETY: reading a repr(C) POD as bytes.
        unsafe { std::slice::from_raw_parts((e as *const RequestEvent).cast::<u8>(), size_of::<RequestEvent>()) }
            .to_vec()
    }

    #[test]
    fn decodes_a_request() {
        let mut e = sample();
        e.sockaddr = v4([10, 1, 2, 3], 5555);
        put(&mut e.sw8, &mut e.sw8_len, "1-abc-def-0-x-y-z-w");
        let Record::Request(ev) = parse_record(&bytes(&e)).unwrap() else { panic!() };
        assert_eq!(validate(&ev, NOW), Ok(()));
        let r = Decoder::new(&[]).request(&ev);
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/users/42");
        assert_eq!(r.query, "a=1&b=2");
        assert_eq!(r.host, "example.com:8080");
        assert_eq!(r.status, 200);
        assert_eq!(r.duration_us, 1500);
        assert_eq!(r.client, "10.1.2.3:5555");
        assert_eq!(r.sw8.as_deref(), Some("1-abc-def-0-x-y-z-w"));
        assert_eq!(r.sw8_correlation, None);
        assert!(r.truncated.is_empty());
        assert_eq!((r.worker_pid, r.tid, r.instance), (100, 101, 99));
    }

    #[test]
    fn router_port_is_swapped_back() {
        let mut e = sample();
        e.sockaddr = v4([127, 0, 0, 1], 40000); // the router's own connection
                                                // client port 34282 = 0x85EA, sent as 0xEA85 = 60037
        put(&mut e.remote_port, &mut e.remote_port_len, "60037");
        put(&mut e.router, &mut e.router_len, "http");
        assert_eq!(Decoder::new(&[]).request(&e).client, "10.1.2.3:34282");
        // nginx (no UWSGI_ROUTER) sends the port right
        e.router_len = 0;
        assert_eq!(Decoder::new(&[]).request(&e).client, "10.1.2.3:60037");
        put(&mut e.remote_port, &mut e.remote_port_len, "junk");
        assert_eq!(Decoder::new(&[]).request(&e).client, "10.1.2.3");
    }

    #[test]
    fn keepalive_reuses_the_accepted_peer() {
        let mut d = Decoder::new(&[]);
        let mut e = sample();
        e.sockaddr = v4([10, 1, 2, 3], 4444);
        assert_eq!(d.request(&e).client, "10.1.2.3:4444");
        let mut again = sample();
        put(&mut again.remote_addr, &mut again.remote_addr_len, "0.0.0.0");
        assert_eq!(d.request(&again).client, "10.1.2.3:4444");
        again.fd = 8; // another connection with no accept seen: fall back to the var
        assert_eq!(d.request(&again).client, "0.0.0.0");
        d.forget_pid(100);
        again.fd = 7;
        assert_eq!(d.request(&again).client, "0.0.0.0");
    }

    #[test]
    fn unix_socket_uses_remote_addr() {
        let mut e = sample();
        e.sockaddr[..2].copy_from_slice(&1u16.to_ne_bytes());
        assert_eq!(Decoder::new(&[]).request(&e).client, "10.1.2.3");
        // a proxy naming a client that differs from the TCP peer
        e.sockaddr = v4([127, 0, 0, 1], 1234);
        assert_eq!(Decoder::new(&[]).request(&e).client, "10.1.2.3");
    }

    #[test]
    fn ipv6_peers() {
        let mut sa = [0u8; SOCKADDR_CAP];
        sa[..2].copy_from_slice(&10u16.to_ne_bytes());
        sa[2..4].copy_from_slice(&8080u16.to_be_bytes());
        sa[8..24].copy_from_slice(&"::ffff:1.2.3.4".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(sockaddr_peer(&sa).as_deref(), Some("1.2.3.4:8080"));
        sa[8..24].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(sockaddr_peer(&sa).as_deref(), Some("[2001:db8::1]:8080"));
    }

    #[test]
    fn truncation_is_reported() {
        let mut e = sample();
        let long = format!("/{}", "a".repeat(PATH_CAP + 10));
        put(&mut e.path, &mut e.path_len, &long);
        let r = Decoder::new(&[]).request(&e);
        assert_eq!(r.path.len(), PATH_CAP);
        assert_eq!(r.truncated, vec!["path"]);
    }

    #[test]
    fn dropped_headers_never_come_out() {
        let mut e = sample();
        put(&mut e.sw8_corr, &mut e.sw8_corr_len, "dXNlcg==:c2VjcmV0");
        put(&mut e.sw8, &mut e.sw8_len, "1-a-b-0-c-d-e-f");
        let r = Decoder::new(&["SW8-Correlation ".to_string()]).request(&e);
        assert_eq!(r.sw8_correlation, None);
        assert!(r.sw8.is_some());
        let json = serde_json::to_string(&r).unwrap();
        assert!(!json.contains("c2VjcmV0"));
    }

    #[test]
    fn validation_rejects_garbage() {
        let ok = sample();
        assert_eq!(validate(&ok, NOW), Ok(()));
        let mut e = sample();
        e.status = 0;
        assert_eq!(validate(&e, NOW), Err(Invalid::Status));
        e.status = 600;
        assert_eq!(validate(&e, NOW), Err(Invalid::Status));
        let mut e = sample();
        e.method_len = 0;
        assert_eq!(validate(&e, NOW), Err(Invalid::NoMethod));
        assert!(!Invalid::NoMethod.suspects_layout() && Invalid::Status.suspects_layout());
        assert!(!Invalid::Nul.suspects_layout() && !Invalid::Method.suspects_layout());
        let mut e = sample();
        e.method_len = 0;
        e.path_len = 0;
        e.var_cnt = 0;
        assert_eq!(validate(&e, NOW), Err(Invalid::NoRequest));
        e.var_cnt = 2;
        assert_eq!(validate(&e, NOW), Err(Invalid::NoMethod));
        // An "empty connection" with implausible times is a layout problem, not traffic.
        e.var_cnt = 0;
        e.start_us = NOW / 1_000_000;
        assert_eq!(validate(&e, NOW), Err(Invalid::Time));
        let mut e = sample();
        put(&mut e.method, &mut e.method_len, "G T");
        assert_eq!(validate(&e, NOW), Err(Invalid::Method));
        let mut e = sample();
        e.method_len = 400;
        assert_eq!(validate(&e, NOW), Err(Invalid::Method));
        let mut e = sample();
        e.end_us = e.start_us - 1;
        assert_eq!(validate(&e, NOW), Err(Invalid::Time));
        let mut e = sample();
        e.start_us = 0;
        assert_eq!(validate(&e, NOW), Err(Invalid::Time));
        let mut e = sample();
        e.start_us = 5;
        e.end_us = 6;
        assert_eq!(validate(&e, NOW), Err(Invalid::Time));
        let mut e = sample();
        e.sockaddr[0] = 77;
        assert_eq!(validate(&e, NOW), Err(Invalid::Family));
        let mut e = sample();
        e.path[1] = 0;
        assert_eq!(validate(&e, NOW), Err(Invalid::Nul));
        let mut e = sample();
        e.flags = FLAG_READ_ERROR;
        assert_eq!(validate(&e, NOW), Err(Invalid::ReadError));
        e.flags = FLAG_SCRATCH_RACE | FLAG_READ_ERROR;
        assert_eq!(validate(&e, NOW), Err(Invalid::ScratchRace));
        assert!(!Invalid::ScratchRace.suspects_layout());
    }

    #[test]
    fn records_are_size_checked() {
        assert_eq!(parse_record(&[]).err(), Some(DecodeError::Short(0)));
        assert_eq!(parse_record(&[9, 0, 0, 0]).err(), Some(DecodeError::UnknownKind(9)));
        let b = bytes(&sample());
        assert!(matches!(parse_record(&b[..b.len() - 1]), Err(DecodeError::RequestSize { .. })));
        let mut p = vec![0u8; size_of::<ProcEvent>()];
        p[..4].copy_from_slice(&2u32.to_ne_bytes());
        p[4..8].copy_from_slice(&9u32.to_ne_bytes());
        assert_eq!(parse_record(&p).err(), Some(DecodeError::UnknownAction(9)));
        p[4..8].copy_from_slice(&1u32.to_ne_bytes());
        assert!(matches!(parse_record(&p), Ok(Record::Proc(_))));
        assert!(matches!(parse_record(&p[..31]), Err(DecodeError::ProcSize { .. })));
    }

    /// Fuzz-style: random bytes never panic the decoder, and anything that validates decodes.
    #[test]
    fn random_records_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let size = size_of::<RequestEvent>();
        let mut d = Decoder::new(&[]);
        for round in 0..2000 {
            let len = if round % 3 == 0 { size } else { (next() % (size as u64 + 64)) as usize };
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if buf.len() >= 4 && round % 2 == 0 {
                buf[..4].copy_from_slice(&1u32.to_ne_bytes());
            }
            if let Ok(Record::Request(ev)) = parse_record(&buf) {
                if validate(&ev, NOW).is_ok() {
                    let _ = d.request(&ev);
                }
            }
        }
    }
}
