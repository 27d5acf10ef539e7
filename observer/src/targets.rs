//! Stage 1: find what to observe. From any pid of a uWSGI instance, find its master (root)
//! and members from /proc, and the file that holds the Python request handler, with the
//! `struct wsgi_request` layout for that build.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSymbol};
use observer_common::ReqLayout;

/// The uprobe's function: `void uwsgi_after_request_wsgi(struct wsgi_request *)`.
pub const HANDLER_SYMBOL: &str = "uwsgi_after_request_wsgi";
/// Present in the file that holds uWSGI's core (the executable).
const CORE_SYMBOL: &str = "uwsgi_close_request";
/// Present only when uWSGI was built with OpenSSL, which adds `SSL *ssl` to wsgi_request.
const SSL_SYMBOL: &str = "uwsgi_proto_ssl_accept";

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no such process: {0}")]
    NoProcess(u32),
    #[error("pid {pid} ({comm}) is not a uWSGI process")]
    NotUwsgi { pid: u32, comm: String },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("pidfile {path}: {reason}")]
    PidFile { path: String, reason: String },
    #[error("pid {pid}: no mapped file exports {HANDLER_SYMBOL} (uWSGI without its Python plugin, or a build with missing symbols)")]
    NoHandler { pid: u32 },
    #[error("pid {pid}: cannot find uWSGI's version in {path}")]
    NoVersion { pid: u32, path: String },
    #[error("pid {pid}: uWSGI {version} has no known struct wsgi_request layout (known: 2.0.x)")]
    UnknownVersion { pid: u32, version: String },
}

/// Reads a pid from a uWSGI pidfile (`--pidfile`): one decimal number, maybe a newline.
pub fn parse_pidfile(text: &str) -> Result<u32, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("is empty".into());
    }
    match t.parse::<u32>() {
        Ok(0) => Err("holds pid 0".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("does not hold a pid: {:?}", t.chars().take(32).collect::<String>())),
    }
}

pub fn read_pidfile(path: &Path) -> Result<u32, TargetError> {
    let text = fs::read_to_string(path)
        .map_err(|e| TargetError::PidFile { path: path.display().to_string(), reason: e.to_string() })?;
    parse_pidfile(&text).map_err(|reason| TargetError::PidFile { path: path.display().to_string(), reason })
}

pub fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn comm(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim_end().to_string())
}

/// Parent pid from /proc/PID/stat (the field after the parenthesised comm).
pub fn ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ppid(&stat)
}

/// Pure parser for /proc/PID/stat's ppid: comm may hold spaces and parentheses.
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A process is uWSGI when its executable's name starts with "uwsgi" (pip: `uwsgi`; Debian:
/// `uwsgi-core` started as `uwsgi_python311`, whose comm is the link name).
pub fn is_uwsgi(pid: u32) -> bool {
    let by_comm = comm(pid).is_some_and(|c| c.starts_with("uwsgi"));
    let by_exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().starts_with("uwsgi")))
        .unwrap_or(false);
    by_comm || by_exe
}

/// Walks up from `pid` to the topmost uWSGI ancestor: the master (or the only process when
/// uWSGI runs without `--master`).
pub fn find_root(pid: u32) -> Result<u32, TargetError> {
    if !exists(pid) {
        return Err(TargetError::NoProcess(pid));
    }
    if !is_uwsgi(pid) {
        return Err(TargetError::NotUwsgi { pid, comm: comm(pid).unwrap_or_else(|| "?".into()) });
    }
    let mut root = pid;
    // Bounded: a process tree deeper than this is not uWSGI's (which has no grandchildren).
    for _ in 0..64 {
        match ppid(root) {
            Some(p) if p > 1 && is_uwsgi(p) => root = p,
            _ => break,
        }
    }
    Ok(root)
}

/// The root and all its descendants that are uWSGI processes, from one /proc scan.
pub fn members(root: u32) -> BTreeSet<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                if let Some(pp) = ppid(pid) {
                    children.entry(pp).or_default().push(pid);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if out.insert(p) {
            if let Some(c) = children.get(&p) {
                stack.extend(c.iter().copied().filter(|&c| is_uwsgi(c)));
            }
        }
    }
    out
}

/// A file to put the uprobe in, and the request layout of the uWSGI build around it.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// Path usable from our mount namespace (`/proc/PID/root/...`).
    pub path: PathBuf,
    /// The path as the target process sees it.
    pub display: String,
    pub dev: u64,
    pub ino: u64,
    pub version: String,
    pub ssl: bool,
    pub layout: ReqLayout,
    /// Bytes into the handler where the probe goes (see [`cheap_probe_offset`]).
    pub entry_offset: u64,
}

/// Where in a function's first bytes a uprobe is cheapest. The kernel emulates a `push`
/// under the breakpoint, but most other instructions must be single-stepped out of line,
/// which costs a second trap (several microseconds in a VM). pip's uwsgi starts
/// `uwsgi_after_request_wsgi` with `cmpq $0, x(%rip)` then `push %rbx`: probing the push is
/// equivalent (the compare only sets flags, never branches, and leaves the argument in rdi).
/// Only such side-effect-free, non-branching prefixes are skipped; otherwise 0.
pub fn cheap_probe_offset(code: &[u8]) -> u64 {
    let is_push = |b: &[u8]| matches!(b, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..]);
    let mut off = 0usize;
    for _ in 0..2 {
        let rest = code.get(off..).unwrap_or(&[]);
        if is_push(rest) {
            return off as u64;
        }
        match rest {
            // endbr64
            [0xf3, 0x0f, 0x1e, 0xfa, ..] => off += 4,
            // cmpq $imm8, disp32(%rip)
            [0x48, 0x83, 0x3d, _, _, _, _, _, ..] => off += 8,
            _ => return 0,
        }
    }
    if is_push(code.get(off..).unwrap_or(&[])) {
        off as u64
    } else {
        0
    }
}

/// The first bytes of `sym` in an ELF image.
fn function_bytes(data: &[u8], sym: &str) -> Option<Vec<u8>> {
    let file = object::File::parse(data).ok()?;
    let s = file.dynamic_symbols().chain(file.symbols()).find(|s| s.name() == Ok(sym) && s.is_definition())?;
    let sec = file.section_by_index(s.section_index()?).ok()?;
    let bytes = sec.data_range(s.address(), 16).ok()??;
    Some(bytes.to_vec())
}

/// One file-backed line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    pub perms: String,
    pub path: String,
}

/// The file-backed mappings of a process, from /proc/PID/maps.
pub fn parse_maps(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms, off) = (f.next()?, f.next()?, f.next()?);
            let path = f.nth(2)?;
            let (a, b) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(a, 16).ok()?,
                end: u64::from_str_radix(b, 16).ok()?,
                offset: u64::from_str_radix(off, 16).ok()?,
                perms: perms.to_string(),
                path: path.to_string(),
            })
        })
        .filter(|m| m.path.starts_with('/'))
        .collect()
}

/// Executable file mappings of a process, from /proc/PID/maps (each file once).
pub fn parse_maps_exec_files(maps: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in parse_maps(maps) {
        if m.perms.contains('x') && !out.contains(&m.path) {
            out.push(m.path);
        }
    }
    out
}

fn elf_symbols(data: &[u8]) -> Option<BTreeSet<String>> {
    let file = object::File::parse(data).ok()?;
    let mut set = BTreeSet::new();
    for s in file.dynamic_symbols().chain(file.symbols()) {
        if s.is_definition() {
            if let Ok(n) = s.name() {
                if n == HANDLER_SYMBOL || n == CORE_SYMBOL || n == SSL_SYMBOL {
                    set.insert(n.to_string());
                }
            }
        }
    }
    Some(set)
}

/// Finds uWSGI's version string ("2.0.31", "2.0.21-debian") in a binary's read-only data.
pub fn find_version(data: &[u8]) -> Option<String> {
    // A NUL-delimited string that starts "2." and is made of version characters.
    let mut i = 0;
    while let Some(pos) = memfind(&data[i..], b"\x002.") {
        let start = i + pos + 1;
        let end = data[start..].iter().position(|&b| b == 0).map(|e| start + e)?;
        let s = &data[start..end];
        if s.len() <= 32 && is_version(s) {
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        i = start;
    }
    None
}

fn is_version(s: &[u8]) -> bool {
    let core_len = s.iter().position(|&b| b == b'-').unwrap_or(s.len());
    let core = &s[..core_len];
    let dots = core.iter().filter(|&&b| b == b'.').count();
    (2..=3).contains(&dots)
        && core.iter().all(|&b| b.is_ascii_digit() || b == b'.')
        && !core.ends_with(b".")
        && !core.windows(2).any(|w| w == b"..")
        && s[core_len..].iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'+')
}

fn memfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `struct wsgi_request` offsets (x86_64) by uWSGI version. The struct text is identical in
/// 2.0.21 to 2.0.31 (measured); its only `#ifdef` is `SSL *ssl`, before `client_addr`.
pub fn layout_for(version: &str, ssl: bool) -> Option<ReqLayout> {
    let mut parts = version.split(['.', '-']);
    let (major, minor) = (parts.next()?, parts.next()?);
    if major != "2" || minor != "0" {
        return None;
    }
    Some(ReqLayout {
        fd: 0,
        hvec: 160,
        start_of_request: 168,
        end_of_request: 184,
        remote_addr: 208,
        query_string: 240,
        method: 272,
        host: 336,
        path_info: 448,
        var_cnt: 680,
        status: 696,
        response_size: 712,
        async_id: 728,
        client_addr: if ssl { 1436 } else { 1428 },
    })
}

/// NUL-separated KEY=VALUE pairs of /proc/PID/environ: the value of `key`.
pub fn environ_var(environ: &[u8], key: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|kv| {
        let kv = std::str::from_utf8(kv).ok()?;
        let (k, v) = kv.split_once('=')?;
        (k == key && !v.is_empty()).then(|| v.to_string())
    })
}

pub fn environ(pid: u32) -> Vec<u8> {
    fs::read(format!("/proc/{pid}/environ")).unwrap_or_default()
}

/// A readable default service name from uWSGI's command line: the app module or file.
pub fn service_from_cmdline(cmdline: &[u8]) -> Option<String> {
    let args: Vec<&str> = cmdline.split(|&b| b == 0).filter_map(|a| std::str::from_utf8(a).ok()).collect();
    let mut it = args.iter().copied();
    while let Some(a) = it.next() {
        let (flag, inline): (&str, Option<&str>) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (a, None),
        };
        if matches!(flag, "--module" | "-w" | "--wsgi" | "--wsgi-file" | "--file" | "--mount") {
            let v = inline.or_else(|| it.next())?;
            let v = v.rsplit('=').next().unwrap_or(v);
            let base = v.rsplit('/').next().unwrap_or(v);
            let base = base.trim_end_matches(".py").split(':').next().unwrap_or(base);
            if !base.is_empty() {
                return Some(base.replace(['.', ' '], "-"));
            }
        }
    }
    None
}

/// uWSGI options that run several requests on one thread.
const ASYNC_OPTIONS: [&str; 7] = ["gevent", "async", "ugreen", "greenlet", "asyncio", "tornado", "coroae"];

/// Whether a uWSGI worker runs several requests per thread (gevent, async cores): from its
/// command line (`--gevent 100`, `--async=10`) or a loaded greenlet/gevent module (for
/// options given in a config file).
pub fn is_async_worker(pid: u32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    async_from(&cmdline, &maps)
}

pub fn async_from(cmdline: &[u8], maps: &str) -> bool {
    let by_flag = cmdline.split(|&b| b == 0).any(|a| {
        let a = String::from_utf8_lossy(a);
        let opt = a.trim_start_matches('-').split('=').next().unwrap_or("").to_string();
        a.starts_with("--") && ASYNC_OPTIONS.contains(&opt.as_str())
    });
    let by_module = parse_maps_exec_files(maps).iter().any(|p| {
        let name = p.rsplit('/').next().unwrap_or("");
        name.starts_with("_greenlet")
            || name.starts_with("gevent")
            || p.contains("/greenlet/")
            || p.contains("/gevent/")
    });
    by_flag || by_module
}

/// The Python version of the libpython a process maps ("3.11"), if any.
pub fn python_version(pid: u32) -> Option<String> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    parse_maps_exec_files(&maps).iter().find_map(|p| {
        let (major, minor) = crate::python::soname_version(p.rsplit('/').next()?)?;
        Some(format!("{major}.{minor}"))
    })
}

/// Every offset moved by `by` bytes (the hidden `--layout-shift` testing aid).
pub fn shifted(l: ReqLayout, by: u32) -> ReqLayout {
    ReqLayout {
        fd: l.fd + by,
        hvec: l.hvec + by,
        start_of_request: l.start_of_request + by,
        end_of_request: l.end_of_request + by,
        remote_addr: l.remote_addr + by,
        query_string: l.query_string + by,
        method: l.method + by,
        host: l.host + by,
        path_info: l.path_info + by,
        var_cnt: l.var_cnt + by,
        status: l.status + by,
        response_size: l.response_size + by,
        async_id: l.async_id + by,
        client_addr: l.client_addr + by,
    }
}

/// Resolves the probe target of one uWSGI process from its memory map.
pub fn probe_target(pid: u32) -> Result<ProbeTarget, TargetError> {
    let maps_path = format!("/proc/{pid}/maps");
    let maps = fs::read_to_string(&maps_path).map_err(|source| {
        if exists(pid) {
            TargetError::Read { path: maps_path.clone(), source }
        } else {
            TargetError::NoProcess(pid)
        }
    })?;
    let mut handler: Option<(String, PathBuf)> = None;
    let mut core: Option<(Vec<u8>, bool)> = None;
    for file in parse_maps_exec_files(&maps) {
        let path = PathBuf::from(format!("/proc/{pid}/root{file}"));
        let Ok(data) = fs::read(&path) else { continue };
        let Some(syms) = elf_symbols(&data) else { continue };
        if syms.contains(HANDLER_SYMBOL) && handler.is_none() {
            handler = Some((file.clone(), path.clone()));
        }
        if syms.contains(CORE_SYMBOL) && core.is_none() {
            core = Some((data, syms.contains(SSL_SYMBOL)));
        }
    }
    let (display, path) = handler.ok_or(TargetError::NoHandler { pid })?;
    let entry_offset =
        fs::read(&path).ok().and_then(|d| function_bytes(&d, HANDLER_SYMBOL)).map_or(0, |b| cheap_probe_offset(&b));
    let (core_data, ssl) = core.ok_or(TargetError::NoHandler { pid })?;
    let version = find_version(&core_data).ok_or_else(|| TargetError::NoVersion { pid, path: display.clone() })?;
    let layout =
        layout_for(&version, ssl).ok_or_else(|| TargetError::UnknownVersion { pid, version: version.clone() })?;
    let md = fs::metadata(&path).map_err(|source| TargetError::Read { path: display.clone(), source })?;
    Ok(ProbeTarget { path, display, dev: md.dev(), ino: md.ino(), version, ssl, layout, entry_offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_detection() {
        assert!(async_from(b"uwsgi\0--gevent\x00100\0", ""));
        assert!(async_from(b"uwsgi\0--async=10\0", ""));
        assert!(!async_from(b"uwsgi\0--threads\x004\0--http\0:80\0", ""));
        assert!(!async_from(b"uwsgi\0--ini\0gevent.ini\0", ""));
        let maps = "7f00-7f01 r-xp 00000000 fe:00 1 /v/lib/python3.11/site-packages/greenlet/_greenlet.cpython-311-x86_64-linux-gnu.so\n";
        assert!(async_from(b"uwsgi\0--ini\0x.ini\0", maps));
        assert!(async_from(b"", "7f00-7f01 r-xp 00000000 fe:00 1 /usr/lib/uwsgi/plugins/gevent_python3_plugin.so\n"));
    }

    #[test]
    fn pidfile() {
        assert_eq!(parse_pidfile("1234\n"), Ok(1234));
        assert_eq!(parse_pidfile("  77 "), Ok(77));
        assert!(parse_pidfile("").is_err());
        assert!(parse_pidfile("\n").is_err());
        assert!(parse_pidfile("0").is_err());
        assert!(parse_pidfile("12a").is_err());
        assert!(parse_pidfile("-5").is_err());
        assert!(parse_pidfile("99999999999").is_err());
        assert!(parse_pidfile("\u{0}\u{1}garbage").is_err());
    }

    #[test]
    fn stat_ppid() {
        assert_eq!(parse_stat_ppid("42 (uwsgi) S 41 42 42 0"), Some(41));
        assert_eq!(parse_stat_ppid("42 (a b) c) S 7 1"), Some(7));
        assert_eq!(parse_stat_ppid("42 (x"), None);
        assert_eq!(parse_stat_ppid(""), None);
        assert_eq!(parse_stat_ppid("1 (x) S"), None);
    }

    #[test]
    fn maps() {
        let m = "55d0-55d1 r--p 00000000 fe:00 123 /usr/bin/uwsgi-core\n\
                 55d1-55d2 r-xp 00001000 fe:00 123 /usr/bin/uwsgi-core\n\
                 7f00-7f01 r-xp 00000000 fe:00 456 /usr/lib/uwsgi/plugins/python311_plugin.so\n\
                 7f02-7f03 rw-p 00000000 00:00 0 \n\
                 7f04-7f05 r-xp 00000000 00:00 0 [vdso]\n\
                 7f06-7f07 r-xp 00000000 fe:00 789 /tmp/x (deleted)\n\
                 garbage\n";
        assert_eq!(
            parse_maps_exec_files(m),
            vec!["/usr/bin/uwsgi-core", "/usr/lib/uwsgi/plugins/python311_plugin.so", "/tmp/x"]
        );
        assert!(parse_maps_exec_files("").is_empty());
    }

    #[test]
    fn version() {
        assert_eq!(find_version(b"abc\x002.0.31\x00xyz").as_deref(), Some("2.0.31"));
        assert_eq!(find_version(b"\x002.x\x00\x002.0.21-debian\x00").as_deref(), Some("2.0.21-debian"));
        assert_eq!(find_version(b"\x002.\x00\x002..1\x00"), None);
        assert_eq!(find_version(b"2.0.31"), None);
        assert_eq!(find_version(b""), None);
        assert_eq!(find_version(b"\x002.0.31"), None);
    }

    #[test]
    fn environ_and_cmdline() {
        let env = b"PATH=/bin\0SW_AGENT_NAME=shop\0EMPTY=\0";
        assert_eq!(environ_var(env, "SW_AGENT_NAME").as_deref(), Some("shop"));
        assert_eq!(environ_var(env, "EMPTY"), None);
        assert_eq!(environ_var(env, "NOPE"), None);
        assert_eq!(environ_var(b"", "X"), None);
        assert_eq!(environ_var(b"\xff\xfe=1", "X"), None);
        let c = b"uwsgi\0--http\0:80\0--wsgi-file\0/srv/app/flask_app.py\0";
        assert_eq!(service_from_cmdline(c).as_deref(), Some("flask_app"));
        assert_eq!(service_from_cmdline(b"uwsgi\0--module=mysite.wsgi:application\0").as_deref(), Some("mysite-wsgi"));
        assert_eq!(service_from_cmdline(b"uwsgi\0-w\0app\0").as_deref(), Some("app"));
        assert_eq!(service_from_cmdline(b"uwsgi\0--ini\0x.ini\0"), None);
        assert_eq!(service_from_cmdline(b"uwsgi\0--module\0"), None);
        assert_eq!(service_from_cmdline(b""), None);
    }

    #[test]
    fn probe_offsets() {
        // pip uwsgi 2.0.31: cmpq $0x0,0x89698(%rip); push %rbx
        assert_eq!(cheap_probe_offset(&[0x48, 0x83, 0x3d, 0x98, 0x96, 0x08, 0x00, 0x00, 0x53, 0x48]), 8);
        // Debian plugin: push %rbp first
        assert_eq!(cheap_probe_offset(&[0x55, 0x48, 0x89, 0xfd]), 0);
        assert_eq!(cheap_probe_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x41, 0x54]), 4);
        assert_eq!(cheap_probe_offset(&[0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0x3d, 1, 2, 3, 4, 0, 0x53]), 12);
        // Anything else stays at the symbol.
        assert_eq!(cheap_probe_offset(&[0x48, 0x83, 0xec, 0x08]), 0);
        assert_eq!(cheap_probe_offset(&[0x48, 0x83, 0x3d, 1, 2, 3, 4, 0, 0x74, 0x10]), 0);
        assert_eq!(cheap_probe_offset(&[0x48, 0x83, 0x3d]), 0);
        assert_eq!(cheap_probe_offset(&[]), 0);
    }

    #[test]
    fn layouts() {
        let l = layout_for("2.0.31", true).unwrap();
        assert_eq!((l.method, l.status, l.client_addr), (272, 696, 1436));
        assert!(l.fits_head());
        assert!(!shifted(l, 100).fits_head());
        assert_eq!(layout_for("2.0.21-debian", false).unwrap().client_addr, 1428);
        assert!(layout_for("2.1.0", true).is_none());
        assert!(layout_for("3", true).is_none());
        assert!(layout_for("", true).is_none());
    }
}
