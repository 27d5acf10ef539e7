//! Stage 1b and 3b for Python exceptions: find the interpreter a uWSGI instance embeds
//! (library, version, `_PyRuntime`), pick its struct layout, and turn an exception record
//! from the kernel into the traceback text a Python user expects.
//!
//! The kernel sends only what dies with the request (type name, message) plus, per frame,
//! the code object's address and the instruction offset. Code objects live as long as their
//! function, so file, function and line are read here from the process's memory
//! (`/proc/PID/mem`, read-only) and every object is type-checked first: a frame that does
//! not check out drops the whole traceback rather than print a wrong one.

use std::{
    fs,
    os::unix::fs::{FileExt, MetadataExt},
    path::PathBuf,
};

use object::{Object, ObjectSegment, ObjectSymbol};
use observer_common::{ExcSlot, PyLayout, EXC_MSG_CAP, PY_FRAMES, PY_NONE};

use crate::targets::{parse_maps, Mapping};

/// The function the exception probe goes on (exported by every CPython 3.x).
pub const TRACEBACK_SYMBOL: &str = "PyTraceBack_Here";
/// Called when uWSGI prints an exception that escaped the WSGI callable.
pub const DISPLAY_SYMBOL: &str = "PyErr_Display";

/// How a code object maps instructions to lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineTable {
    /// 3.8, 3.9: `co_lnotab`, (address delta u8, line delta i8) pairs.
    Lnotab,
    /// 3.10: `co_linetable`, (address delta u8, line delta i8; -128 = no line) pairs.
    V310,
    /// 3.11+: the location table of `Objects/locations.md`.
    V311,
}

/// Code-object offsets userspace needs (the kernel needs only [`PyLayout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub firstlineno: u64,
    pub filename: u64,
    pub name: u64,
    pub qualname: Option<u64>,
    pub linetable: u64,
    pub table: LineTable,
    /// Where compact ASCII / compact non-ASCII `str` data and the legacy data pointer are.
    pub str_ascii_data: u64,
    pub str_compact_data: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layouts {
    pub kernel: PyLayout,
    pub code: CodeLayout,
}

/// Offsets for x86_64 CPython, from the headers of each version (`offsetof` against pyenv
/// 3.8.18 to 3.13.0; 3.11 also against the pyenv build's DWARF). From 3.12 the current
/// thread state is thread-local; the probe takes the GIL's last holder instead (the thread
/// running Python code holds the GIL). Free-threaded 3.13 builds have no GIL and are not
/// supported (Py_GIL_DISABLED changes these layouts).
pub fn layouts_for(major: u32, minor: u32) -> Option<Layouts> {
    if major != 3 {
        return None;
    }
    let common = PyLayout {
        runtime_tstate: 0,
        interp_main: PY_NONE,
        interp_gil: PY_NONE,
        gil_last_holder: PY_NONE,
        exc_model: 0,
        tstate_curexc: 0,
        exc_traceback: PY_NONE,
        tb_next: 16,
        frame_iframe: PY_NONE,
        code: 32,
        instr: 0,
        code_adaptive: 0,
        lasti_scale: 1,
        tp_name: 24,
        tp_flags: 168,
        exc_args: 24,
        str_state: 32,
        str_ascii_data: 48,
        str_compact_data: 72,
        str_data_ptr: 72,
    };
    let old_code = CodeLayout {
        firstlineno: 40,
        filename: 104,
        name: 112,
        qualname: None,
        linetable: 120,
        table: LineTable::Lnotab,
        str_ascii_data: 48,
        str_compact_data: 72,
    };
    Some(match minor {
        8 | 9 => Layouts {
            kernel: PyLayout {
                runtime_tstate: if minor == 8 { 1368 } else { 568 },
                tstate_curexc: 88,
                instr: 104,
                ..common
            },
            code: old_code,
        },
        10 => Layouts {
            kernel: PyLayout { runtime_tstate: 568, tstate_curexc: 88, instr: 96, lasti_scale: 2, ..common },
            code: CodeLayout { table: LineTable::V310, ..old_code },
        },
        11 => Layouts {
            kernel: PyLayout {
                runtime_tstate: 576,
                tstate_curexc: 96,
                frame_iframe: 24,
                code: 32,
                instr: 56,
                code_adaptive: 184,
                ..common
            },
            code: CodeLayout {
                firstlineno: 72,
                filename: 112,
                name: 120,
                qualname: Some(128),
                linetable: 136,
                table: LineTable::V311,
                str_ascii_data: 48,
                str_compact_data: 72,
            },
        },
        12 | 13 => Layouts {
            kernel: PyLayout {
                runtime_tstate: PY_NONE,
                interp_main: if minor == 12 { 48 } else { 640 },
                interp_gil: if minor == 12 { 384 } else { 16 },
                gil_last_holder: 8,
                exc_model: 1,
                tstate_curexc: if minor == 12 { 96 } else { 112 },
                exc_traceback: 40,
                frame_iframe: 24,
                code: 0,
                instr: 56,
                code_adaptive: if minor == 12 { 192 } else { 200 },
                str_ascii_data: 40,
                str_compact_data: 56,
                str_data_ptr: 56,
                ..common
            },
            code: CodeLayout {
                firstlineno: 68,
                filename: 112,
                name: 120,
                qualname: Some(128),
                linetable: 136,
                table: LineTable::V311,
                str_ascii_data: 40,
                str_compact_data: 56,
            },
        },
        _ => return None,
    })
}

/// The interpreter embedded in one uWSGI process.
#[derive(Clone, Debug)]
pub struct PyTarget {
    /// Path usable from our mount namespace (`/proc/PID/root/...`), for the uprobe.
    pub path: PathBuf,
    /// The path as the target sees it.
    pub display: String,
    pub dev: u64,
    pub ino: u64,
    pub version: String,
    pub layouts: Layouts,
    /// Run-time addresses in this process (the same in workers forked from it).
    pub runtime: u64,
    pub code_type: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PyError {
    #[error("no Python interpreter mapped")]
    NoPython,
    #[error("Python {0}: exception capture not supported for this version yet")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
}

/// "3.11" from a file name like `libpython3.11.so.1.0`.
pub fn soname_version(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("libpython")?;
    let mut it = rest.split('.');
    let major = it.next()?.parse().ok()?;
    let minor: String = it.next()?.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some((major, minor.parse().ok()?))
}

/// `PY_VERSION_HEX` to "3.11.7".
pub fn version_from_hex(v: u64) -> String {
    format!("{}.{}.{}", (v >> 24) & 0xff, (v >> 16) & 0xff, (v >> 8) & 0xff)
}

/// Finds the interpreter of `pid`: a mapped libpython, or an executable that exports
/// `_PyRuntime` (a statically linked Python).
pub fn python_target(pid: u32) -> Result<PyTarget, PyError> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|e| PyError::Other(format!("reading /proc/{pid}/maps: {e}")))?;
    let maps = parse_maps(&maps);
    let mut files: Vec<&str> = Vec::new();
    for m in &maps {
        if !files.contains(&m.path.as_str()) {
            files.push(&m.path);
        }
    }
    // libpython first; else any file exporting _PyRuntime (static interpreter).
    files.sort_by_key(|f| !f.rsplit('/').next().unwrap_or("").starts_with("libpython"));
    for file in files {
        let name = file.rsplit('/').next().unwrap_or("");
        let is_lib = name.starts_with("libpython");
        let path = PathBuf::from(format!("/proc/{pid}/root{file}"));
        if !is_lib && !(name.starts_with("uwsgi") || name.starts_with("python")) {
            continue;
        }
        let Ok(data) = fs::read(&path) else { continue };
        let Ok(elf) = object::File::parse(&*data) else { continue };
        let sym =
            |want: &str| elf.dynamic_symbols().chain(elf.symbols()).find(|s| s.name() == Ok(want) && s.is_definition());
        let Some(runtime) = sym("_PyRuntime") else { continue };
        let (major, minor, version) = match sym("Py_Version").and_then(|s| read_u64(&elf, &data, s.address())) {
            Some(v) => ((v >> 24) as u32 & 0xff, (v >> 16) as u32 & 0xff, version_from_hex(v)),
            None => {
                let (ma, mi) =
                    soname_version(name).ok_or_else(|| PyError::Unsupported("older than 3.11, static".into()))?;
                let v = find_py_version(&data, ma, mi).unwrap_or_else(|| format!("{ma}.{mi}"));
                (ma, mi, v)
            }
        };
        // libpython3.13t: the free-threaded build (no GIL, other layouts).
        if name.starts_with(&format!("libpython{major}.{minor}t")) {
            return Err(PyError::Unsupported(format!("{version} free-threaded")));
        }
        let layouts = layouts_for(major, minor).ok_or_else(|| PyError::Unsupported(version.clone()))?;
        let code_type = sym("PyCode_Type").ok_or_else(|| PyError::Other(format!("{file}: no PyCode_Type symbol")))?;
        for f in [TRACEBACK_SYMBOL, DISPLAY_SYMBOL] {
            sym(f).ok_or_else(|| PyError::Other(format!("{file}: no {f} symbol")))?;
        }
        let runtime = runtime_address(&elf, &maps, file, runtime.address())
            .ok_or_else(|| PyError::Other(format!("{file}: _PyRuntime is not mapped")))?;
        let code_type = runtime_address(&elf, &maps, file, code_type.address())
            .ok_or_else(|| PyError::Other(format!("{file}: PyCode_Type is not mapped")))?;
        let md = fs::metadata(&path).map_err(|e| PyError::Other(format!("{file}: {e}")))?;
        return Ok(PyTarget {
            path,
            display: file.to_string(),
            dev: md.dev(),
            ino: md.ino(),
            version,
            layouts,
            runtime,
            code_type,
        });
    }
    Err(PyError::NoPython)
}

/// A symbol's virtual address to its address in the process: plus the file's load bias,
/// taken from the mapping of its first page (the symbol itself may be in .bss, which has no
/// file-backed mapping).
fn runtime_address(elf: &object::File, maps: &[Mapping], file: &str, vaddr: u64) -> Option<u64> {
    let first = elf.segments().min_by_key(|s| s.file_range().0)?;
    let base_vaddr = first.address().checked_sub(first.file_range().0)?;
    let m = maps.iter().filter(|m| m.path == file).min_by_key(|m| m.offset)?;
    let bias = (m.start - m.offset).checked_sub(base_vaddr & !0xfff)?;
    let addr = vaddr.checked_add(bias)?;
    // It must land inside this file's span of the address space.
    let end = maps.iter().filter(|m| m.path == file).map(|m| m.end).max()?;
    let bss_room = 1 << 24;
    (addr >= m.start && addr < end + bss_room).then_some(addr)
}

fn read_u64(elf: &object::File, data: &[u8], vaddr: u64) -> Option<u64> {
    let seg = elf.segments().find(|s| s.address() <= vaddr && vaddr + 8 <= s.address() + s.size())?;
    let (file_off, file_size) = seg.file_range();
    let rel = vaddr - seg.address();
    if rel + 8 > file_size {
        return None;
    }
    let at = (file_off + rel) as usize;
    Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
}

/// The "3.X.Y" version string in a pre-3.11 library (its `3.X` must match the soname). The
/// linker may merge `PY_VERSION` into the tail of a longer string (a prefix path ending in
/// "3.10.13"), so the match needs only a non-digit before it and a NUL after.
pub fn find_py_version(data: &[u8], major: u32, minor: u32) -> Option<String> {
    let prefix = format!("{major}.{minor}.");
    let p = prefix.as_bytes();
    let mut i = 0;
    while i + p.len() < data.len() {
        let start = i + data[i..].windows(p.len()).position(|w| w == p)?;
        i = start + 1;
        if start > 0 && (data[start - 1].is_ascii_digit() || data[start - 1] == b'.') {
            continue;
        }
        let digits = data[start + p.len()..].iter().take(4).take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && data.get(start + p.len() + digits) == Some(&0) {
            return Some(String::from_utf8_lossy(&data[start..start + p.len() + digits]).into_owned());
        }
    }
    None
}

/// Decodes a `str`'s raw data of the given kind (1 = latin-1, 2 = UCS-2, 4 = UCS-4).
pub fn decode_str(raw: &[u8], kind: u32) -> String {
    match kind {
        1 => raw.iter().map(|&b| b as char).collect(),
        2 => raw
            .as_chunks::<2>()
            .0
            .iter()
            .map(|c| char::from_u32(u16::from_le_bytes(*c) as u32).unwrap_or('\u{fffd}'))
            .collect(),
        4 => raw
            .as_chunks::<4>()
            .0
            .iter()
            .map(|c| char::from_u32(u32::from_le_bytes(*c)).unwrap_or('\u{fffd}'))
            .collect(),
        _ => String::new(),
    }
}

/// Line of the instruction at byte offset `addr`, from a code object's line table.
pub fn line_for(table: LineTable, data: &[u8], first_line: i32, addr: i32) -> Option<i32> {
    if addr < 0 {
        return None;
    }
    match table {
        LineTable::Lnotab => {
            // (addr delta, line delta) pairs; the line applies from its address on.
            let mut line = first_line;
            let mut pc = 0i32;
            for pair in data.as_chunks::<2>().0 {
                pc += pair[0] as i32;
                if pc > addr {
                    break;
                }
                line += pair[1] as i8 as i32;
            }
            Some(line)
        }
        LineTable::V310 => {
            // (byte length, line delta) pairs; each covers [pc, pc + length).
            let mut line = first_line;
            let mut pc = 0i32;
            for pair in data.as_chunks::<2>().0 {
                let (len, delta) = (pair[0] as i32, pair[1] as i8);
                if delta != -128 {
                    line += delta as i32;
                }
                if pc <= addr && addr < pc + len {
                    return (delta != -128).then_some(line);
                }
                pc += len;
            }
            None
        }
        LineTable::V311 => line_v311(data, first_line, addr),
    }
}

fn line_v311(data: &[u8], first_line: i32, addr: i32) -> Option<i32> {
    let mut line = first_line;
    let mut pc = 0i32;
    let mut i = 0usize;
    while i < data.len() {
        let head = data[i];
        if head & 0x80 == 0 {
            return None; // not at an entry start: corrupt table
        }
        let code = (head >> 3) & 0x0f;
        let len = (head & 7) as i32 + 1;
        i += 1;
        let varint = |i: &mut usize| -> Option<u32> {
            let mut v: u32 = 0;
            let mut shift = 0;
            loop {
                let b = *data.get(*i)? as u32;
                *i += 1;
                v |= (b & 63) << shift;
                if b & 64 == 0 {
                    return Some(v);
                }
                shift += 6;
                if shift > 30 {
                    return None;
                }
            }
        };
        let svarint = |v: u32| if v & 1 != 0 { -((v >> 1) as i32) } else { (v >> 1) as i32 };
        let delta = match code {
            0..=9 => {
                i += 1; // one byte of column data
                0
            }
            10..=12 => {
                i += 2; // start and end columns
                code as i32 - 10
            }
            13 => svarint(varint(&mut i)?),
            14 => {
                let d = svarint(varint(&mut i)?);
                varint(&mut i)?; // end line delta
                varint(&mut i)?; // start column + 1
                varint(&mut i)?; // end column + 1
                d
            }
            _ => 0, // 15: no location
        };
        line += delta;
        let end = pc + 2 * len;
        if pc <= addr && addr < end {
            return (code != 15).then_some(line);
        }
        pc = end;
    }
    None
}

/// One resolved frame.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    pub file: String,
    pub line: Option<i32>,
    pub function: String,
}

/// The exception behind a failed request, resolved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PyException {
    #[serde(rename = "type")]
    pub type_name: String,
    pub message: String,
    /// Outermost first, as Python prints them.
    pub frames: Vec<Frame>,
    /// Frames between the outermost and the innermost kept ones that were not kept.
    pub frames_omitted: u32,
    /// It escaped the WSGI callable into uWSGI.
    pub escaped: bool,
    /// The whole text, as `traceback.format_exc()` prints it (with source lines when the
    /// file is readable).
    pub traceback: String,
}

impl PyException {
    /// Whether this exception is what failed the request: it escaped into uWSGI, or a
    /// framework's request-level handler caught it, or (other frameworks) it unwound many
    /// frames.
    pub fn failed_request(&self) -> bool {
        let caught_by_framework = self.frames.first().is_some_and(|f| {
            FRAMEWORK_HANDLERS.iter().any(|(file, func)| f.file.ends_with(file) && f.function == *func)
        });
        self.escaped || caught_by_framework || self.frames.len() + self.frames_omitted as usize >= GENERIC_MIN_FRAMES
    }

    /// The text `traceback.format_exc()` would give (without source-range carets).
    pub fn traceback_text(&self, mut source_line: impl FnMut(&str, i32) -> Option<String>) -> String {
        let mut out = String::from("Traceback (most recent call last):\n");
        for (i, f) in self.frames.iter().enumerate() {
            if i == 1 && self.frames_omitted > 0 {
                out.push_str(&format!("  [... {} frames not captured]\n", self.frames_omitted));
            }
            match f.line {
                Some(l) => out.push_str(&format!("  File \"{}\", line {l}, in {}\n", f.file, f.function)),
                None => out.push_str(&format!("  File \"{}\", in {}\n", f.file, f.function)),
            }
            if let Some(src) = f.line.and_then(|l| source_line(&f.file, l)) {
                out.push_str(&format!("    {src}\n"));
            }
        }
        out.push_str(&self.summary_line());
        out.push('\n');
        out
    }

    /// `RuntimeError: boom 42`, as the last line of a traceback.
    pub fn summary_line(&self) -> String {
        if self.message.is_empty() {
            self.type_name.clone()
        } else {
            format!("{}: {}", self.type_name, self.message)
        }
    }
}

/// Why an exception record was not turned into a traceback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    #[error("exception type name is not a Python identifier")]
    TypeName,
    #[error("a frame's code object could not be read or is not a code object")]
    Code,
    #[error("the process is gone")]
    Gone,
    /// The request failed, but no exception reached its handler: the exceptions seen were
    /// caught as control flow (e.g. a view that returns a 500 by itself).
    #[error("no exception failed the request (only control-flow ones)")]
    Handled,
}

/// Functions in which frameworks catch a view's exception and turn it into a 500 (Flask's
/// `full_dispatch_request` when an errorhandler answers for it, `wsgi_app` otherwise).
const FRAMEWORK_HANDLERS: [(&str, &str); 3] = [
    ("/flask/app.py", "wsgi_app"),
    ("/flask/app.py", "full_dispatch_request"),
    ("/django/core/handlers/exception.py", "inner"),
];

/// Frames an exception must unwind to count as the request's error in other frameworks:
/// control-flow exceptions measured in Flask and Django unwound at most 2. (The kernel
/// does not even send an exception of fewer than 3 frames unless it escaped.)
pub const GENERIC_MIN_FRAMES: usize = 4;

/// Whether this looks like a class name CPython would print (`tp_name`: bare or dotted).
pub fn plausible_type_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() < 64
        && s.split('.').all(|p| {
            let mut c = p.chars();
            c.next().is_some_and(|f| f.is_alphabetic() || f == '_') && c.all(|x| x.is_alphanumeric() || x == '_')
        })
}

/// Message text as Python prints it in a traceback's last line.
pub fn message_text(slot: &ExcSlot, type_name: &str) -> String {
    let n = (slot.msg_len as usize).min(EXC_MSG_CAP);
    let mut m = decode_str(&slot.msg[..n], slot.msg_kind);
    if slot.msg_full as usize > n {
        m.push_str("...");
    }
    // KeyError prints repr() of its key; other exceptions print str() of their one arg.
    if type_name == "KeyError" && slot.msg_from != 0 && slot.msg_from < 10 {
        m = format!("'{m}'");
    }
    m
}

/// Reads a target process's memory (read-only).
pub struct Mem {
    file: fs::File,
}

impl Mem {
    pub fn open(pid: u32) -> Option<Self> {
        fs::File::open(format!("/proc/{pid}/mem")).ok().map(|file| Self { file })
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, addr).ok()?;
        Some(buf)
    }

    pub fn u64(&self, addr: u64) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(addr, 8)?.try_into().ok()?))
    }

    /// A `str` object's text (capped at `cap` code points).
    pub fn str_obj(&self, obj: u64, code: &CodeLayout, cap: usize) -> Option<String> {
        let hdr = self.bytes(obj, 40)?;
        let length = i64::from_le_bytes(hdr[16..24].try_into().ok()?);
        let state = u32::from_le_bytes(hdr[32..36].try_into().ok()?);
        let kind = (state >> 2) & 7;
        if !(0..=1 << 20).contains(&length) || !matches!(kind, 1 | 2 | 4) {
            return None;
        }
        let (compact, ascii) = (state & (1 << 5) != 0, state & (1 << 6) != 0);
        let data = match (compact, ascii) {
            (true, true) => obj + code.str_ascii_data,
            (true, false) => obj + code.str_compact_data,
            _ => self.u64(obj + code.str_compact_data)?,
        };
        let n = (length as usize).min(cap);
        Some(decode_str(&self.bytes(data, n * kind as usize)?, kind))
    }

    /// A `bytes` object's content (capped).
    pub fn bytes_obj(&self, obj: u64, cap: usize) -> Option<Vec<u8>> {
        let len = self.u64(obj + 16)? as i64;
        if !(0..=1 << 24).contains(&len) {
            return None;
        }
        self.bytes(obj + 32, (len as usize).min(cap))
    }
}

/// What a code object resolves to, kept with the pointers it was read from.
struct CodeInfo {
    /// The pointers it was read from (file name, name, line table) and the first line: a
    /// cached entry is used only while they are unchanged (the rest of the head, reference
    /// count and warm-up counters, changes all the time).
    key: [u64; 4],
    file: String,
    function: String,
    first_line: i32,
    table: Vec<u8>,
}

/// Bytes at the start of a code object that cover every field read from it.
const CODE_HEAD: usize = 160;
/// Entries kept per cache before it is cleared (bounded memory).
const CACHE_MAX: usize = 512;

/// Resolves exception records, with caches: failed requests often repeat the same frames.
#[derive(Default)]
pub struct Resolver {
    mems: std::collections::HashMap<u32, Mem>,
    codes: std::collections::HashMap<(u32, u64), CodeInfo>,
    /// Source files by the path we read them at, split into lines.
    sources: std::collections::HashMap<String, Option<std::sync::Arc<Vec<String>>>>,
}

impl Resolver {
    /// Forgets a process (its memory and addresses).
    pub fn forget_pid(&mut self, pid: u32) {
        self.mems.remove(&pid);
        self.codes.retain(|(p, _), _| *p != pid);
    }

    /// Turns a kernel exception record into a resolved exception.
    pub fn resolve(&mut self, slot: &ExcSlot, t: &PyTarget, pid: u32) -> Result<PyException, Unresolved> {
        let type_name = cstr(&slot.type_name);
        if !plausible_type_name(&type_name) {
            return Err(Unresolved::TypeName);
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.mems.entry(pid) {
            e.insert(Mem::open(pid).ok_or(Unresolved::Gone)?);
        }
        let kept = (slot.nframes as usize).min(PY_FRAMES);
        let mut frames = Vec::with_capacity(kept);
        // The kernel keeps the innermost frames first, and the outermost in the last slot
        // once there are more; Python prints the outermost first.
        for f in slot.frames[..kept].iter().rev() {
            frames.push(self.frame(t, pid, f.code, f.lasti).ok_or(Unresolved::Code)?);
        }
        let mut e = PyException {
            message: message_text(slot, &type_name),
            type_name,
            frames,
            frames_omitted: slot.nframes.saturating_sub(PY_FRAMES as u32),
            escaped: slot.escaped != 0,
            traceback: String::new(),
        };
        if !e.failed_request() {
            return Err(Unresolved::Handled);
        }
        e.traceback = e.traceback_text(|f, l| self.source_line(pid, f, l));
        Ok(e)
    }

    /// One frame: the code object must be of `PyCode_Type`; its strings and line table are
    /// read once and reused while the object's head is unchanged.
    fn frame(&mut self, t: &PyTarget, pid: u32, code: u64, lasti: i32) -> Option<Frame> {
        let mem = self.mems.get(&pid)?;
        let cl = &t.layouts.code;
        let head = mem.bytes(code, CODE_HEAD)?;
        let at = |off: u64| u64::from_le_bytes(head[off as usize..off as usize + 8].try_into().unwrap_or([0; 8]));
        if at(8) != t.code_type {
            return None;
        }
        let first_line =
            i32::from_le_bytes(head[cl.firstlineno as usize..cl.firstlineno as usize + 4].try_into().ok()?);
        let key = [at(cl.filename), at(cl.name), at(cl.linetable), first_line as u64];
        let fresh = match self.codes.get(&(pid, code)) {
            Some(c) => c.key != key,
            None => true,
        };
        if fresh {
            let info = CodeInfo {
                file: mem.str_obj(key[0], cl, 1024)?,
                function: mem.str_obj(key[1], cl, 256)?,
                first_line,
                table: mem.bytes_obj(key[2], 1 << 16)?,
                key,
            };
            if self.codes.len() >= CACHE_MAX {
                self.codes.clear();
            }
            self.codes.insert((pid, code), info);
        }
        let c = self.codes.get(&(pid, code))?;
        Some(Frame {
            file: c.file.clone(),
            line: line_for(cl.table, &c.table, c.first_line, lasti),
            function: c.function.clone(),
        })
    }

    /// Line `line` of a source file as the target sees it, stripped (like the traceback
    /// module). A relative name (`uwsgi --wsgi-file app.py`) is relative to the process's
    /// directory.
    fn source_line(&mut self, pid: u32, file: &str, line: i32) -> Option<String> {
        if line < 1 || file.starts_with('<') {
            return None;
        }
        let path =
            if file.starts_with('/') { format!("/proc/{pid}/root{file}") } else { format!("/proc/{pid}/cwd/{file}") };
        if self.sources.len() >= CACHE_MAX && !self.sources.contains_key(&path) {
            self.sources.clear();
        }
        let lines = self
            .sources
            .entry(path)
            .or_insert_with_key(|p| {
                fs::read_to_string(p)
                    .ok()
                    .map(|t| std::sync::Arc::new(t.lines().map(|l| l.trim().to_string()).collect()))
            })
            .clone()?;
        lines.get(line as usize - 1).filter(|l| !l.is_empty()).cloned()
    }
}

fn cstr(b: &[u8]) -> String {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..n]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(soname_version("libpython3.11.so.1.0"), Some((3, 11)));
        assert_eq!(soname_version("libpython3.8.so"), Some((3, 8)));
        assert_eq!(soname_version("libpython3.so"), None);
        assert_eq!(soname_version("libc.so.6"), None);
        assert_eq!(version_from_hex(0x030b07f0), "3.11.7");
        assert_eq!(version_from_hex(0x030b02f0), "3.11.2");
        let mut blob = b"junk\x003.2.0\x00v13.11.1\x00more\x003.11.7\x00".to_vec();
        assert_eq!(find_py_version(&blob, 3, 11).as_deref(), Some("3.11.7"));
        assert_eq!(find_py_version(b"/root/.pyenv/versions/3.10.13\0", 3, 10).as_deref(), Some("3.10.13"));
        assert_eq!(find_py_version(b"3.10.13x\0", 3, 10), None);
        blob.truncate(20);
        assert_eq!(find_py_version(&blob, 3, 11), None);
        assert!(layouts_for(3, 11).is_some());
        assert!(layouts_for(3, 13).is_some());
        assert!(layouts_for(3, 14).is_none());
        assert!(layouts_for(3, 7).is_none());
        assert!(layouts_for(2, 7).is_none());
    }

    #[test]
    fn strings() {
        assert_eq!(decode_str(b"boom 42", 1), "boom 42");
        assert_eq!(decode_str(&[0xe9], 1), "é");
        assert_eq!(decode_str(&[0x3b, 0x04, 0x41, 0x00], 2), "лA");
        assert_eq!(decode_str(&[0x00, 0xf6, 0x01, 0x00], 4), "😀");
        assert_eq!(decode_str(&[0xff, 0xff, 0x11, 0x00], 4), "\u{fffd}");
        assert_eq!(decode_str(&[1, 2, 3], 2), "\u{201}");
        assert_eq!(decode_str(b"x", 3), "");
    }

    #[test]
    fn type_names() {
        assert!(plausible_type_name("RuntimeError"));
        assert!(plausible_type_name("werkzeug.exceptions.NotFound"));
        assert!(!plausible_type_name(""));
        assert!(!plausible_type_name("a b"));
        assert!(!plausible_type_name("\u{1}x"));
        assert!(!plausible_type_name("9abc"));
        assert!(!plausible_type_name("a..b"));
    }

    /// 3.11 table of `def f():\n    x = 1\n    raise E` (first line 1), as compiled by 3.11:
    /// RESUME (line 1), x = 1 (line 2), raise (line 3); built by hand from locations.md.
    #[test]
    fn v311_table() {
        // entry: 1 | code<<3 | (len-1)
        let t = [
            0x80 | (10 << 3),
            0,
            0, // one-line form, delta 0, 1 unit: pc 0..2 line 1
            0x80 | (11 << 3) | 1,
            4,
            9, // delta +1, 2 units: pc 2..6 line 2
            0x80 | (13 << 3),
            2, // no-column form, svarint(2) = +1, 1 unit: pc 6..8 line 3
            0x80 | (14 << 3) | 1,
            3,
            0,
            5,
            9,                // long form, svarint(3) = -1: pc 8..12 line 2
            0x80 | (15 << 3), // no location: pc 12..14
        ];
        assert_eq!(line_for(LineTable::V311, &t, 1, 0), Some(1));
        assert_eq!(line_for(LineTable::V311, &t, 1, 4), Some(2));
        assert_eq!(line_for(LineTable::V311, &t, 1, 6), Some(3));
        assert_eq!(line_for(LineTable::V311, &t, 1, 10), Some(2));
        assert_eq!(line_for(LineTable::V311, &t, 1, 12), None);
        assert_eq!(line_for(LineTable::V311, &t, 1, 100), None);
        assert_eq!(line_for(LineTable::V311, &t, 1, -1), None);
        // Short form (codes 0-9) carries one column byte and no line change.
        assert_eq!(line_for(LineTable::V311, &[0x80 | (3 << 3), 7], 5, 0), Some(5));
        // Multi-chunk varint: 0b1_000001 then 0b000001 = 1 + 64 = 65 -> svarint -32.
        assert_eq!(line_for(LineTable::V311, &[0x80 | (13 << 3), 0x41, 0x01], 100, 0), Some(68));
    }

    #[test]
    fn old_tables() {
        // lnotab: from addr 0 line 10; +6 bytes -> +1; +4 -> +2; (8 bytes, -1).
        let t = [6, 1, 4, 2, 8, 0xff];
        assert_eq!(line_for(LineTable::Lnotab, &t, 10, 0), Some(10));
        assert_eq!(line_for(LineTable::Lnotab, &t, 10, 6), Some(11));
        assert_eq!(line_for(LineTable::Lnotab, &t, 10, 9), Some(11));
        assert_eq!(line_for(LineTable::Lnotab, &t, 10, 10), Some(13));
        assert_eq!(line_for(LineTable::Lnotab, &t, 10, 18), Some(12));
        // 3.10: (length, delta) covering ranges; -128 = no line.
        let t = [2, 0, 4, 1, 2, 0x80, 6, 2];
        assert_eq!(line_for(LineTable::V310, &t, 7, 0), Some(7));
        assert_eq!(line_for(LineTable::V310, &t, 7, 3), Some(8));
        assert_eq!(line_for(LineTable::V310, &t, 7, 6), None);
        assert_eq!(line_for(LineTable::V310, &t, 7, 9), Some(10));
        assert_eq!(line_for(LineTable::V310, &t, 7, 14), None);
    }

    /// Junk tables never panic and never loop.
    #[test]
    fn junk_tables() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for n in 0..2000i32 {
            let len = (n % 97) as usize;
            let data = crate::junk_bytes(&mut seed, len);
            for t in [LineTable::Lnotab, LineTable::V310, LineTable::V311] {
                let _ = line_for(t, &data, 1, n % 300);
            }
        }
    }

    #[test]
    fn traceback_text() {
        let e = PyException {
            type_name: "RuntimeError".into(),
            message: "boom 42".into(),
            frames: vec![
                Frame { file: "/app/a.py".into(), line: Some(9), function: "error".into() },
                Frame { file: "/app/a.py".into(), line: None, function: "inner".into() },
            ],
            frames_omitted: 2,
            escaped: false,
            traceback: String::new(),
        };
        let txt = e.traceback_text(|f, l| (f == "/app/a.py" && l == 9).then(|| "return inner()".into()));
        assert_eq!(
            txt,
            "Traceback (most recent call last):\n  File \"/app/a.py\", line 9, in error\n    return inner()\n  [... 2 frames not captured]\n  File \"/app/a.py\", in inner\nRuntimeError: boom 42\n"
        );
        assert!(e.failed_request(), "4 frames unwound");
        let bare = PyException { message: String::new(), frames: vec![], frames_omitted: 0, ..e.clone() };
        assert_eq!(bare.summary_line(), "RuntimeError");
        assert!(!bare.failed_request());
        assert!(PyException { escaped: true, ..bare.clone() }.failed_request());
        let caught = |file: &str, func: &str| PyException {
            frames: vec![
                Frame { file: file.into(), line: Some(1), function: func.into() },
                Frame { file: "/app/v.py".into(), line: Some(2), function: "view".into() },
            ],
            ..bare.clone()
        };
        assert!(caught("/venv/lib/python3.11/site-packages/flask/app.py", "wsgi_app").failed_request());
        assert!(caught("/usr/lib/python3/dist-packages/django/core/handlers/exception.py", "inner").failed_request());
        assert!(!caught("/venv/lib/python3.11/site-packages/werkzeug/datastructures/headers.py", "__contains__")
            .failed_request());
    }
}
