//! Types shared by the eBPF programs (`observer-ebpf`) and the loader (`observer`).
//!
//! Rules: `#[repr(C)]`, explicit padding, no `bool`, tags are `u32` converted with
//! `TryFrom`, and every size is pinned by a compile-time assert so the two sides
//! cannot drift apart silently.
#![no_std]

/// Ring buffer carrying [`RequestEvent`] and [`ProcEvent`] records to userspace.
pub const MAP_EVENTS: &str = "EVENTS";
/// tgid -> [`Tracked`]: the processes we observe (masters, workers, routers, mules).
pub const MAP_TRACKED: &str = "TRACKED";
/// index -> [`ReqLayout`]: `struct wsgi_request` offsets, one slot per known layout.
pub const MAP_LAYOUTS: &str = "LAYOUTS";
/// index -> u64 per-CPU counters, see [`Stat`].
pub const MAP_STATS: &str = "STATS";
/// index 0 -> [`TpConfig`]: tracepoint record offsets read from tracefs at start.
pub const MAP_TPCONFIG: &str = "TPCONFIG";

/// Default ring-buffer size in bytes (a power of two, multiple of the page size).
/// 4 MiB hold about 1,400 request records; the reader is woken every ~20 records, so this
/// absorbs long stalls of the reader while keeping its memory small (the kernel maps the
/// ring's data twice, so it counts double in RSS).
pub const DEFAULT_RING_BYTES: u32 = 4 << 20;
pub const MAX_TRACKED: u32 = 4096;
pub const MAX_LAYOUTS: u32 = 8;

/// Event kinds, the first `u32` of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Request = 1,
    Proc = 2,
    Exception = 3,
    /// [`CallEvent`]: connect() or send on a socket of a tracked thread.
    Call = 4,
    /// [`RecvEvent`]: bytes received on a socket of a tracked thread.
    Recv = 5,
}

impl TryFrom<u32> for EventKind {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            1 => Ok(Self::Request),
            2 => Ok(Self::Proc),
            3 => Ok(Self::Exception),
            4 => Ok(Self::Call),
            5 => Ok(Self::Recv),
            other => Err(other),
        }
    }
}

/// What happened to a tracked process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcAction {
    /// A tracked process forked a new process (not a thread).
    Fork = 1,
    /// The last thread of a tracked process exited.
    Exit = 2,
    /// A tracked process called execve (uWSGI's master does this on SIGHUP).
    Exec = 3,
}

impl TryFrom<u32> for ProcAction {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            1 => Ok(Self::Fork),
            2 => Ok(Self::Exit),
            3 => Ok(Self::Exec),
            other => Err(other),
        }
    }
}

/// Value of the TRACKED map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    /// The root (master) pid of the uWSGI instance this process belongs to.
    pub instance: u32,
    /// Index into LAYOUTS; [`LAYOUT_NONE`] means "do not capture requests here".
    pub layout: u32,
    /// Index into PYLAYOUTS; [`LAYOUT_NONE`] means "no exception capture here".
    pub py: u32,
    pub _pad: u32,
    /// Address of `_PyRuntime` in this process (the same in every forked worker).
    pub py_runtime: u64,
}
pub const LAYOUT_NONE: u32 = u32::MAX;

/// The eBPF side reads this many bytes from the start of `struct wsgi_request` in one go;
/// every [`ReqLayout`] offset but `client_addr` must lie inside it (checked by userspace).
pub const REQ_HEAD_BYTES: usize = 768;

/// Byte offsets into `struct wsgi_request` for one uWSGI build.
/// Every string field is a `char *` followed by a `uint16_t` length 8 bytes later.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReqLayout {
    pub fd: u32,
    pub hvec: u32,
    pub start_of_request: u32,
    pub end_of_request: u32,
    pub remote_addr: u32,
    pub query_string: u32,
    pub method: u32,
    pub host: u32,
    pub path_info: u32,
    pub var_cnt: u32,
    pub status: u32,
    pub response_size: u32,
    pub async_id: u32,
    pub client_addr: u32,
}

impl ReqLayout {
    /// Whether every field read from the struct's head fits in [`REQ_HEAD_BYTES`]
    /// (string fields are a pointer plus a u16 length 8 bytes later).
    pub fn fits_head(&self) -> bool {
        let strings = [self.remote_addr, self.query_string, self.method, self.host, self.path_info];
        let scalars = [
            (self.fd, 4),
            (self.hvec, 8),
            (self.start_of_request, 8),
            (self.end_of_request, 8),
            (self.var_cnt, 2),
            (self.status, 4),
            (self.response_size, 8),
            (self.async_id, 4),
        ];
        let mut ok = true;
        let mut i = 0;
        while i < strings.len() {
            ok &= strings[i] as usize + 10 <= REQ_HEAD_BYTES;
            i += 1;
        }
        let mut j = 0;
        while j < scalars.len() {
            ok &= scalars[j].0 as usize + scalars[j].1 <= REQ_HEAD_BYTES;
            j += 1;
        }
        ok
    }
}

/// Offsets inside tracepoint records, read from `<tracefs>/events/*/format`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TpConfig {
    /// task/task_newtask: `pid_t pid` (the new task).
    pub newtask_pid: u32,
    /// task/task_newtask: `u64 clone_flags`.
    pub newtask_flags: u32,
    /// sched/sched_process_exit: `bool group_dead`, or `u32::MAX` when the kernel lacks it.
    pub exit_group_dead: u32,
    pub _pad: u32,
}

/// Per-CPU counters in the STATS map. Every drop in the kernel is one of these.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Request events handed to userspace.
    RequestsSent = 0,
    /// Request events lost because the ring buffer was full.
    RingFull = 1,
    /// Process events lost because the ring buffer was full.
    ProcRingFull = 2,
    /// New processes we could not track because TRACKED was full.
    TrackedFull = 3,
    /// A user-memory read failed while building a request event (the event is still sent,
    /// with the `FLAG_READ_ERROR` bit, and userspace rejects it).
    ReadErrors = 4,
    /// Requests whose header scan stopped at [`MAX_SCAN_VARS`] before the end.
    VarScanTruncated = 5,
    /// Requests not captured because their target was refused (layout failed validation).
    Refused = 6,
    /// Records whose per-CPU scratch space was reused by a run that preempted them (sent
    /// with `FLAG_SCRATCH_RACE`; userspace rejects them).
    ScratchRace = 7,
    /// Python exceptions seen unwinding a frame (PyTraceBack_Here hits in tracked threads).
    PyFrames = 8,
    /// Exception records for failed requests handed to userspace.
    ExceptionsSent = 9,
    /// Exception records lost because the ring buffer was full.
    ExceptionRingFull = 10,
    /// A user-memory read failed while following an exception (that hit is skipped).
    PyReadErrors = 11,
    /// Outbound-call records (connect, send, receive) handed to userspace.
    CallsSent = 12,
    /// Outbound-call records lost because the ring buffer was full.
    CallRingFull = 13,
}
pub const STAT_COUNT: u32 = 14;

/// Capture limits, in bytes (powers of two, see observer-ebpf's copy_user).
/// Header vars scanned per request (key+value pairs). uWSGI's default `--max-vars` is 64.
pub const MAX_SCAN_VARS: usize = 64;

pub const METHOD_CAP: usize = 16;
pub const PATH_CAP: usize = 512;
pub const QUERY_CAP: usize = 512;
pub const HOST_CAP: usize = 128;
pub const ADDR_CAP: usize = 64;
pub const PORT_CAP: usize = 8;
pub const ROUTER_CAP: usize = 8;
/// The protocol caps sw8 at 2 KB.
pub const SW8_CAP: usize = 2048;
pub const SW8_CORR_CAP: usize = 512;
pub const SW8_X_CAP: usize = 64;
pub const SOCKADDR_CAP: usize = 28;

/// Flag bits in [`RequestEvent::flags`].
pub const FLAG_READ_ERROR: u32 = 1;
pub const FLAG_VARS_TRUNCATED: u32 = 2;
/// The run was preempted and its per-CPU scratch space reused: fields may be mixed.
pub const FLAG_SCRATCH_RACE: u32 = 4;

/// One finished request, emitted at `uwsgi_after_request_wsgi` entry (all fields final).
///
/// `*_len` fields hold the length uWSGI reported; only `min(len, CAP)` bytes of the array
/// are valid, and a length above the cap means the value was cut.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RequestEvent {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    pub req: u64,
    pub start_us: u64,
    pub end_us: u64,
    pub response_size: u64,
    pub status: i32,
    pub async_id: i32,
    pub var_cnt: u32,
    pub flags: u32,
    pub method_len: u16,
    pub path_len: u16,
    pub query_len: u16,
    pub host_len: u16,
    pub remote_addr_len: u16,
    pub remote_port_len: u16,
    pub router_len: u16,
    pub sw8_len: u16,
    pub sw8_corr_len: u16,
    pub sw8_x_len: u16,
    /// Root pid of the uWSGI instance (from TRACKED).
    pub instance: u32,
    pub sockaddr: [u8; SOCKADDR_CAP],
    pub _pad2: [u8; 4],
    pub method: [u8; METHOD_CAP],
    pub path: [u8; PATH_CAP],
    pub query: [u8; QUERY_CAP],
    pub host: [u8; HOST_CAP],
    pub remote_addr: [u8; ADDR_CAP],
    pub remote_port: [u8; PORT_CAP],
    pub router: [u8; ROUTER_CAP],
    pub sw8: [u8; SW8_CAP],
    pub sw8_corr: [u8; SW8_CORR_CAP],
    pub sw8_x: [u8; SW8_X_CAP],
}

/// A tracked process forked, exited or exec'd.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcEvent {
    pub kind: u32,
    pub action: u32,
    /// The process the action is about (the child, for a fork).
    pub pid: u32,
    /// The forking parent, or the process itself for exit/exec.
    pub parent: u32,
    pub instance: u32,
    pub _pad: u32,
    pub ktime_ns: u64,
}

/// PYLAYOUTS: index -> [`PyLayout`], one slot per CPython minor version in use.
pub const MAP_PYLAYOUTS: &str = "PYLAYOUTS";
pub const MAX_PYLAYOUTS: u32 = 8;

/// CPython struct offsets for one minor version (x86_64, from the public headers).
/// Two frame models: 3.11+ reach the code object through `_PyInterpreterFrame`
/// (`frame_iframe` set), older versions read it from `PyFrameObject` itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PyLayout {
    /// `_PyRuntime.gilstate.tstate_current` (3.8-3.11): the thread state holding the GIL;
    /// [`PY_NONE`] from 3.12, where the holder is `interp->ceval.gil->last_holder`.
    pub runtime_tstate: u32,
    /// 3.12+: `_PyRuntime.interpreters.main`, `PyInterpreterState.ceval.gil`,
    /// `struct _gil_runtime_state.last_holder`.
    pub interp_main: u32,
    pub interp_gil: u32,
    pub gil_last_holder: u32,
    /// 0: `PyThreadState.curexc_type` with `curexc_value` and `curexc_traceback` 8 bytes
    /// apart (3.8-3.11); 1: `PyThreadState.current_exception`, one normalized instance whose
    /// traceback is at `exc_traceback` (3.12+).
    pub exc_model: u32,
    pub tstate_curexc: u32,
    pub exc_traceback: u32,
    /// `PyTracebackObject.tb_next`.
    pub tb_next: u32,
    /// `PyFrameObject.f_frame` (3.11+), or [`PY_NONE`].
    pub frame_iframe: u32,
    /// Code object pointer, in the interpreter frame (3.11+) or in the frame object.
    pub code: u32,
    /// 3.11+: `prev_instr` / `instr_ptr` in the interpreter frame; older: `int f_lasti`.
    pub instr: u32,
    /// 3.11+: `co_code_adaptive` (the bytecode inside the code object); older: unused.
    pub code_adaptive: u32,
    /// Older versions: bytes per `f_lasti` unit (1 for 3.8/3.9, 2 for 3.10).
    pub lasti_scale: u32,
    /// `PyTypeObject.tp_name` and `tp_flags`.
    pub tp_name: u32,
    pub tp_flags: u32,
    /// `PyBaseExceptionObject.args`.
    pub exc_args: u32,
    /// `str`: the `state` bit field, and where compact ASCII / compact non-ASCII data start.
    pub str_state: u32,
    pub str_ascii_data: u32,
    pub str_compact_data: u32,
    /// Non-compact (legacy) `str`: pointer to the data.
    pub str_data_ptr: u32,
}
pub const PY_NONE: u32 = u32::MAX;

/// PyTraceBack_Here state per thread (EXC map): the exception unwinding now and the one
/// that unwound the most frames since the thread's last request ended.
pub const MAP_EXC: &str = "EXC";
pub const MAX_EXC_THREADS: u32 = 8192;
/// Innermost frames kept per exception.
pub const PY_FRAMES: usize = 8;
pub const EXC_TYPE_CAP: usize = 64;
pub const EXC_MSG_CAP: usize = 256;

/// One frame of a traceback: resolved to file, function and line by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PyFrame {
    /// `PyCodeObject *` (long-lived: owned by the function).
    pub code: u64,
    /// Byte offset of the instruction in the code's bytecode.
    pub lasti: i32,
    pub _pad: u32,
}

/// One exception as it unwinds. `frames[..PY_FRAMES - 1]` are the innermost frames (the
/// raise site first); the last slot always holds the latest (outermost so far) frame once
/// the exception unwound more than that: the frame that caught it is always known.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExcSlot {
    /// The thread's `curexc_traceback` at the latest hit: the next hit of the same exception
    /// sees a traceback whose `tb_next` is this.
    pub last_tb: u64,
    /// The exception value at the latest hit.
    pub value: u64,
    /// Frames unwound so far (may exceed [`PY_FRAMES`]).
    pub nframes: u32,
    /// Type and message were read (done once, when this exception takes the lead).
    pub described: u32,
    /// It escaped into uWSGI (PyErr_Display ran while it was current).
    pub escaped: u32,
    pub _pad: u32,
    /// Bytes of `msg` the message has (cut at [`EXC_MSG_CAP`]); the full size in `msg_full`.
    pub msg_len: u32,
    /// `str` kind of the message: 0 none, 1 latin-1 (or ASCII), 2 UCS-2, 4 UCS-4.
    pub msg_kind: u32,
    pub msg_full: u32,
    /// What the message came from: 0 none, 1 str value, 2 first arg of the exception,
    /// 3 first item of a tuple value.
    pub msg_from: u32,
    pub frames: [PyFrame; PY_FRAMES],
    pub type_name: [u8; EXC_TYPE_CAP],
    pub msg: [u8; EXC_MSG_CAP],
}

/// Value of the EXC map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExcTrack {
    /// Which slot the current exception is in.
    pub cur: u32,
    pub _pad: u32,
    pub slots: [ExcSlot; 2],
}

/// The exception behind a failed request (status >= 500), sent right before its
/// [`RequestEvent`] by the same probe run.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExceptionEvent {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub instance: u32,
    /// The request it belongs to (`struct wsgi_request *`, as in [`RequestEvent::req`]).
    pub req: u64,
    pub exc: ExcSlot,
}

/// Bytes of each send kept: an HTTP request line and headers, a Redis command and key, an
/// SQL statement (cut here).
pub const CALL_SEND_CAP: usize = 512;
/// Bytes of a reply kept: enough for an HTTP status line or a protocol's error marker.
pub const CALL_RECV_CAP: usize = 16;
/// tid -> (fd, buffer) of an in-flight recvfrom, read at its exit.
pub const MAP_RECV_ARGS: &str = "RECV_ARGS";

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallAction {
    /// `connect(fd, addr)`: `data` holds the socket address (up to 28 bytes).
    Connect = 1,
    /// `sendto(fd, buf, len)` (what send() and Python's sendall() use).
    Send = 2,
}

/// A connect or a send by a tracked thread (syscall entry).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallEvent {
    pub kind: u32,
    pub action: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    /// Bytes of `data` filled.
    pub data_len: u32,
    /// Bytes the call sent (or the sockaddr length).
    pub len: u64,
    pub ktime_ns: u64,
    pub data: [u8; CALL_SEND_CAP],
}

/// Bytes received by a tracked thread (recvfrom exit, when it returned data).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RecvEvent {
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub fd: i32,
    pub len: u64,
    pub ktime_ns: u64,
    pub data: [u8; CALL_RECV_CAP],
}

impl TryFrom<u32> for CallAction {
    type Error = u32;
    fn try_from(v: u32) -> Result<Self, u32> {
        match v {
            1 => Ok(Self::Connect),
            2 => Ok(Self::Send),
            other => Err(other),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct RecvArgs {
    pub fd: i64,
    pub buf: u64,
}

const _: () = assert!(core::mem::size_of::<CallEvent>() == 552);
const _: () = assert!(core::mem::size_of::<RecvEvent>() == 48);
const _: () = assert!(core::mem::size_of::<PyLayout>() == 80);
const _: () = assert!(core::mem::size_of::<ExcSlot>() == 496);
const _: () = assert!(core::mem::size_of::<ExcTrack>() == 1000);
const _: () = assert!(core::mem::size_of::<ExceptionEvent>() == 520);
const _: () = assert!(core::mem::size_of::<Tracked>() == 24);
const _: () = assert!(core::mem::size_of::<ReqLayout>() == 56);
const _: () = assert!(core::mem::size_of::<TpConfig>() == 16);
const _: () = assert!(core::mem::size_of::<ProcEvent>() == 32);
const _: () = assert!(core::mem::size_of::<RequestEvent>() == 3992);
const _: () = assert!(core::mem::offset_of!(RequestEvent, sockaddr) == 88);
const _: () = assert!(core::mem::offset_of!(RequestEvent, method) == 120);

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, repr(C), no implicit padding (checked by the asserts above).
    unsafe impl aya::Pod for Tracked {}
    unsafe impl aya::Pod for ReqLayout {}
    unsafe impl aya::Pod for TpConfig {}
    unsafe impl aya::Pod for PyLayout {}
}
