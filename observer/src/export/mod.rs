//! Stage 5: where records go. The embedded default prints them: a human line per request
//! (console) or one JSON object per line (json); [`oap`] reports segments to SkyWalking.
//! Any combination runs at once.

pub mod oap;

use std::io::{self, Write};

use crate::decode::{ProcRecord, Request};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Console,
    Json,
    /// Print nothing per request (with --oap: report only).
    None,
}

pub struct Printer<W: Write> {
    out: W,
    format: Format,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: Format) -> Self {
        Self { out, format }
    }

    pub fn request(&mut self, r: &Request) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, r)?;
                self.out.write_all(b"\n")
            }
            Format::Console => {
                writeln!(self.out, "{}", console_line(r))?;
                for c in &r.calls {
                    writeln!(
                        self.out,
                        "    -> {} {} peer={} {:.3}ms{}",
                        c.kind,
                        c.operation,
                        c.peer,
                        c.end_us.saturating_sub(c.start_us) as f64 / 1000.0,
                        if c.is_error { " error" } else { "" }
                    )?;
                }
                match &r.exception {
                    Some(e) => {
                        for l in e.traceback.lines() {
                            writeln!(self.out, "    | {l}")?;
                        }
                        Ok(())
                    }
                    None => Ok(()),
                }
            }
            Format::None => Ok(()),
        }
    }

    pub fn process(&mut self, p: &ProcRecord) -> io::Result<()> {
        match self.format {
            Format::Json => {
                serde_json::to_writer(&mut self.out, p)?;
                self.out.write_all(b"\n")
            }
            Format::Console => {
                let what = match p.action {
                    "fork" => "born",
                    "exit" => "gone",
                    other => other,
                };
                writeln!(self.out, "# process {} {what} (parent {}, instance {})", p.pid, p.parent, p.instance)
            }
            Format::None => Ok(()),
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// Stops printing (after an output error).
    pub fn disable(&mut self) {
        self.format = Format::None;
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// `HH:MM:SS.uuuuuu pid/tid core METHOD path?query host=H -> STATUS BYTES B DUR ms client=C sw8=yes|no`
pub fn console_line(r: &Request) -> String {
    let secs = r.start_us / 1_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let q = if r.query.is_empty() { String::new() } else { format!("?{}", r.query) };
    format!(
        "{h:02}:{m:02}:{s:02}.{:06}Z worker={} tid={} core={} {} {}{q} host={} -> {} {}B {:.3}ms client={} sw8={}",
        r.start_us % 1_000_000,
        r.worker_pid,
        r.tid,
        r.core,
        r.method,
        r.path,
        if r.host.is_empty() { "-" } else { &r.host },
        r.status,
        r.response_bytes,
        r.duration_us as f64 / 1000.0,
        if r.client.is_empty() { "-" } else { &r.client },
        if r.sw8.is_some() { "yes" } else { "no" },
    )
}

/// This host's non-loopback IPv4 addresses (reported as instance properties).
pub fn ipv4_addresses() -> Vec<String> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET {
            // SAFETY: family is AF_INET, so this is a sockaddr_in.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            if !ip.is_loopback() && !out.contains(&ip.to_string()) {
                out.push(ip.to_string());
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_format() {
        let r = Request {
            kind: "request",
            instance: 1,
            worker_pid: 10,
            tid: 11,
            core: 0,
            method: "POST".into(),
            path: "/a".into(),
            query: "x=1".into(),
            host: "h:80".into(),
            status: 201,
            response_bytes: 5,
            start_us: 3_723_000_042,
            end_us: 3_723_001_542,
            duration_us: 1500,
            client: "1.2.3.4:5".into(),
            sw8: Some("s".into()),
            sw8_correlation: None,
            sw8_x: None,
            truncated: vec![],
            exception: None,
            calls: vec![],
        };
        assert_eq!(
            console_line(&r),
            "01:02:03.000042Z worker=10 tid=11 core=0 POST /a?x=1 host=h:80 -> 201 5B 1.500ms client=1.2.3.4:5 sw8=yes"
        );
        let mut buf = Vec::new();
        Printer::new(&mut buf, Format::Json).request(&r).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["type"], "request");
        assert_eq!(v["status"], 201);
        assert_eq!(v["sw8"], "s");
        assert!(v.get("truncated").is_none());
    }
}
