//! Kernel side of the observer: one uprobe turns each finished uWSGI request into one
//! ring-buffer record, and three tracepoints follow the uWSGI process tree.
//!
//! Everything here is read-only towards the target: `bpf_probe_read_user` only, loops
//! bounded by constants, and nothing is written to user memory.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_loop, bpf_probe_read_user as raw_read_user, bpf_probe_read_user_str},
    },
    macros::{map, tracepoint, uprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, TracePointContext},
    EbpfContext as _,
};
use observer_common::*;

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);

#[map(name = "TRACKED")]
static TRACKED: HashMap<u32, Tracked> = HashMap::with_max_entries(MAX_TRACKED, 0);

#[map(name = "LAYOUTS")]
static LAYOUTS: Array<ReqLayout> = Array::with_max_entries(MAX_LAYOUTS, 0);

#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

#[map(name = "TPCONFIG")]
static TPCONFIG: Array<TpConfig> = Array::with_max_entries(1, 0);

/// Token of the run that last claimed this CPU's HEAD and SCRATCH.
#[map(name = "OWNER")]
static OWNER: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Copy of the first REQ_HEAD_BYTES of the request struct (all fields but client_addr).
#[map(name = "HEAD")]
static HEAD: PerCpuArray<[u8; REQ_HEAD_BYTES]> = PerCpuArray::with_max_entries(1, 0);

/// Scratch space for the request's iovec array (key iovec + value iovec per var).
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<[u8; MAX_SCAN_VARS * 32]> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "PYLAYOUTS")]
static PYLAYOUTS: Array<PyLayout> = Array::with_max_entries(MAX_PYLAYOUTS, 0);

/// tid -> the exceptions that unwound Python frames on this thread since its last request
/// ended. LRU: threads that die or never finish a request age out.
#[map(name = "EXC")]
static EXC: LruHashMap<u32, ExcTrack> = LruHashMap::with_max_entries(MAX_EXC_THREADS, 0);

/// All zeroes: the initial EXC value (too big for the BPF stack).
#[map(name = "EXC_ZERO")]
static EXC_ZERO: PerCpuArray<ExcTrack> = PerCpuArray::with_max_entries(1, 0);

/// A plain (preallocated) hash: cheaper than an LRU, and every entry is removed at the
/// syscall's exit, so it cannot fill up with stale ones.
#[map(name = "RECV_ARGS")]
static RECV_ARGS: HashMap<u32, RecvArgs> = HashMap::with_max_entries(MAX_EXC_THREADS, 0);

const CLONE_THREAD: u64 = 0x0001_0000;
/// Pending bytes in EVENTS that justify waking the reader (about 20 request records).
const WAKEUP_BYTES: u64 = 64 * 1024;

#[inline(always)]
fn bump(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot. Not atomic (the bpfel target has no 64-bit fetch_add in core); on a
        // preemptible kernel a preempted run could lose a count (docs/architecture.md).
        // SAFETY: p points to a live, aligned u64 map slot.
        unsafe { *p += 1 };
    }
}

/// Submit flags: wake the reader only once a batch has piled up. One wakeup per event would
/// cost the reader (and the CPU the app shares with it) far more than the event itself; the
/// reader also drains on a short timer, so a quiet ring still reaches it promptly.
#[inline(always)]
fn wake_flags() -> u64 {
    (if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }) as u64
}

#[inline(always)]
fn tgid_tid() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Reads a `T` at `base + off` in the target's memory.
#[inline(always)]
fn read<T>(base: u64, off: u32) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_user validates the address; a bad one returns an error.
    unsafe { bpf_probe_read_user((base + off as u64) as *const T).map_err(|e| e as i64) }
}

/// Copies `min(len, N)` bytes from user address `src` into `dst`. Returns false on fault.
/// N is a power of two: the variable size is masked right before the helper call (after a
/// volatile reload, so LLVM cannot drop the mask), which is what the verifier can follow.
#[inline(always)]
fn copy_user<const N: usize>(dst: *mut [u8; N], src: u64, len: u16) -> bool {
    const { assert!(N.is_power_of_two()) };
    if len == 0 || src == 0 {
        return true;
    }
    let rc = if len as usize >= N {
        // SAFETY: dst points into a ring-buffer reservation of N bytes.
        unsafe { raw_read_user(dst as *mut c_void, N as u32, src as *const c_void) }
    } else {
        let n = len as u32;
        // SAFETY: reading our own stack variable.
        let n = unsafe { core::ptr::read_volatile(&n) } & (N as u32 - 1);
        // SAFETY: as above, n < N.
        unsafe { raw_read_user(dst as *mut c_void, n, src as *const c_void) }
    };
    rc >= 0
}

type Head = [u8; REQ_HEAD_BYTES];

/// A `T` at `off` in the copy of the request's head (0 when out of range).
#[inline(always)]
fn at<T: Copy + Default>(h: &Head, off: u32) -> T {
    let o = (off as usize) & 1023;
    if o + size_of::<T>() > REQ_HEAD_BYTES {
        return T::default();
    }
    // SAFETY: in bounds (checked above); unaligned reads are fine on this target.
    unsafe { core::ptr::read_unaligned(h.as_ptr().add(o) as *const T) }
}

/// Copies the string of a `char *` + `uint16_t` field pair of `struct wsgi_request`.
/// Returns the length.
#[inline(always)]
fn copy_field<const N: usize>(dst: *mut [u8; N], h: &Head, off: u32, flags: &mut u32) -> u16 {
    let len: u16 = at(h, off + 8);
    if !copy_user(dst, at(h, off), len) {
        *flags |= FLAG_READ_ERROR;
    }
    len
}

// Keys looked up by scanning the request's vars (not parsed into wsgi_request by uWSGI).
const K_SW8: &[u8; 8] = b"HTTP_SW8";
const K_SW8_X: &[u8; 10] = b"HTTP_SW8_X";
const K_PORT: &[u8; 11] = b"REMOTE_PORT";
const K_ROUTER: &[u8; 12] = b"UWSGI_ROUTER";
const K_CORR: &[u8; 20] = b"HTTP_SW8_CORRELATION";
const SLOTS: usize = 5;
const NOT_FOUND: u8 = u8::MAX;

/// bpf_loop context: index of the var holding each wanted key.
#[repr(C)]
struct Scan {
    found: [u8; SLOTS],
}

/// One bpf_loop iteration: looks at var `i` (its key iovec) in SCRATCH.
extern "C" fn scan_one(i: u64, ctx: *mut c_void) -> i64 {
    let i = i as usize;
    if i >= MAX_SCAN_VARS {
        return 1;
    }
    let Some(iov) = SCRATCH.get_ptr(0) else { return 1 };
    // SAFETY: per-CPU map value, filled by the caller just before the loop.
    let iov = unsafe { &*iov };
    let kptr = u64::from_ne_bytes(pick(iov, i * 32));
    let klen = u64::from_ne_bytes(pick(iov, i * 32 + 8));
    let slot = match klen {
        8 if key_is(kptr, K_SW8) => 0,
        20 if key_is(kptr, K_CORR) => 1,
        10 if key_is(kptr, K_SW8_X) => 2,
        11 if key_is(kptr, K_PORT) => 3,
        12 if key_is(kptr, K_ROUTER) => 4,
        _ => return 0,
    };
    // SAFETY: ctx is the caller's `Scan` on its stack.
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    if scan.found[slot] == NOT_FOUND {
        scan.found[slot] = i as u8;
    }
    0
}

#[inline(always)]
fn key_is<const N: usize>(ptr: u64, want: &[u8; N]) -> bool {
    // SAFETY: reads N bytes of the key; the caller checked the key is exactly N long.
    match unsafe { bpf_probe_read_user(ptr as *const [u8; N]) } {
        Ok(k) => {
            let mut i = 0;
            while i < N {
                if k[i] != want[i] {
                    return false;
                }
                i += 1;
            }
            true
        }
        Err(_) => false,
    }
}

/// `void uwsgi_after_request_wsgi(struct wsgi_request *wsgi_req)`, uWSGI 2.0.x, in the uwsgi
/// binary (pip build) or python3*_plugin.so (Debian). Called once per request from
/// uwsgi_close_request after end_of_request, status and response_size are final.
#[uprobe]
pub fn after_request(ctx: ProbeContext) -> u32 {
    let _ = try_after_request(&ctx);
    0
}

fn try_after_request(ctx: &ProbeContext) -> Result<(), i64> {
    let (tgid, tid) = tgid_tid();
    // SAFETY: map lookups return pointers valid for the program's run.
    let tracked = unsafe { TRACKED.get(&tgid) }.ok_or(0i64)?;
    let Some(layout) = LAYOUTS.get(tracked.layout) else {
        // LAYOUT_NONE: userspace refused this target (its layout failed validation).
        bump(Stat::Refused);
        return Ok(());
    };
    let req: u64 = ctx.arg(0).ok_or(0i64)?;
    if req == 0 {
        return Ok(());
    }
    let mut flags = 0u32;
    // Claim this CPU's scratch buffers (HEAD, SCRATCH). Uprobe programs run with migration,
    // not preemption, disabled: another run on this CPU may reuse the buffers meanwhile.
    // It would leave its own token here, and this record is then flagged, never mixed.
    // SAFETY: helper with no preconditions.
    let token = unsafe { bpf_ktime_get_ns() } | 1;
    let owner = OWNER.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: per-CPU u64 slot.
    unsafe { core::ptr::write_volatile(owner, token) };
    // One read of the struct's head instead of one per field: each user-memory read costs
    // far more than picking fields out of a copy.
    let head = HEAD.get_ptr_mut(0).ok_or(0i64)?;
    // SAFETY: per-CPU map value of REQ_HEAD_BYTES bytes.
    if unsafe { raw_read_user(head as *mut c_void, REQ_HEAD_BYTES as u32, req as *const c_void) } < 0 {
        flags |= FLAG_READ_ERROR;
    }
    // Exceptions unwound on this thread during the request: for a failed request, send
    // the one that went furthest, ahead of the request record (so userspace has it first).
    if let Some(tr) = EXC.get_ptr_mut(&tid) {
        // SAFETY: map value pointer, valid for this run.
        let tr = unsafe { &mut *tr };
        // SAFETY: per-CPU map value, filled just above.
        if flags & FLAG_READ_ERROR == 0 && at::<i32>(unsafe { &*head }, layout.status) >= 500 {
            send_exception(tr, tgid, tid, tracked.instance, req);
        }
        // Reset in place: cheaper than a delete and a fresh insert on the next exception.
        tr.cur = 0;
        tr.slots[0].nframes = 0;
        tr.slots[0].escaped = 0;
        tr.slots[1].nframes = 0;
        tr.slots[1].escaped = 0;
    }
    let Some(mut entry) = EVENTS.reserve::<RequestEvent>(0) else {
        bump(Stat::RingFull);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: as above; only read from here on.
    let h = unsafe { &*head };
    // SAFETY: `ev` is a live reservation of size_of::<RequestEvent>(); we only write fields.
    unsafe {
        (*ev).kind = EventKind::Request as u32;
        (*ev).tgid = tgid;
        (*ev).tid = tid;
        (*ev).instance = tracked.instance;
        (*ev).req = req;
        (*ev).fd = at(h, layout.fd);
        (*ev).start_us = at(h, layout.start_of_request);
        (*ev).end_us = at(h, layout.end_of_request);
        (*ev).response_size = at(h, layout.response_size);
        (*ev).status = at(h, layout.status);
        (*ev).async_id = at(h, layout.async_id);
        let var_cnt: u16 = at(h, layout.var_cnt);
        (*ev).var_cnt = var_cnt as u32;
        match read::<[u8; SOCKADDR_CAP]>(req, layout.client_addr) {
            Ok(sa) => (*ev).sockaddr = sa,
            Err(_) => {
                (*ev).sockaddr = [0; SOCKADDR_CAP];
                flags |= FLAG_READ_ERROR;
            }
        }
        (*ev).method_len = copy_field(addr_of_mut!((*ev).method), h, layout.method, &mut flags);
        (*ev).path_len = copy_field(addr_of_mut!((*ev).path), h, layout.path_info, &mut flags);
        (*ev).query_len = copy_field(addr_of_mut!((*ev).query), h, layout.query_string, &mut flags);
        (*ev).host_len = copy_field(addr_of_mut!((*ev).host), h, layout.host, &mut flags);
        (*ev).remote_addr_len = copy_field(addr_of_mut!((*ev).remote_addr), h, layout.remote_addr, &mut flags);

        // Vars uWSGI does not parse into fields: find them in the iovec array. The scan runs
        // in bpf_loop so the verifier checks one iteration, not every path through 64.
        let hvec: u64 = at(h, layout.hvec);
        let pairs = (var_cnt / 2) as usize;
        if pairs > MAX_SCAN_VARS {
            flags |= FLAG_VARS_TRUNCATED;
            bump(Stat::VarScanTruncated);
        }
        let pairs = if pairs > MAX_SCAN_VARS { MAX_SCAN_VARS } else { pairs };
        let mut scan = Scan { found: [NOT_FOUND; SLOTS] };
        if let Some(scratch) = SCRATCH.get_ptr_mut(0) {
            if !copy_user(scratch, hvec, (pairs * 32) as u16) {
                flags |= FLAG_READ_ERROR;
            } else if pairs > 0 {
                bpf_loop(pairs as u32, scan_one as *mut c_void, (&raw mut scan).cast(), 0);
                let iov = &*scratch;
                let val = |slot: usize| -> (u64, u16) {
                    let i = scan.found[slot] as usize;
                    if i >= MAX_SCAN_VARS {
                        return (0, 0);
                    }
                    let base = i * 32 + 16;
                    let vlen = u64::from_ne_bytes(pick(iov, base + 8));
                    let vlen = if vlen > u16::MAX as u64 { u16::MAX } else { vlen as u16 };
                    (u64::from_ne_bytes(pick(iov, base)), vlen)
                };
                let (p, l) = val(0);
                (*ev).sw8_len = l;
                flags |= fault(copy_user(addr_of_mut!((*ev).sw8), p, l));
                let (p, l) = val(1);
                (*ev).sw8_corr_len = l;
                flags |= fault(copy_user(addr_of_mut!((*ev).sw8_corr), p, l));
                let (p, l) = val(2);
                (*ev).sw8_x_len = l;
                flags |= fault(copy_user(addr_of_mut!((*ev).sw8_x), p, l));
                let (p, l) = val(3);
                (*ev).remote_port_len = l;
                flags |= fault(copy_user(addr_of_mut!((*ev).remote_port), p, l));
                let (p, l) = val(4);
                (*ev).router_len = l;
                flags |= fault(copy_user(addr_of_mut!((*ev).router), p, l));
            }
        }
        if flags & FLAG_READ_ERROR != 0 {
            bump(Stat::ReadErrors);
        }
        // Everything taken from the scratch buffers is in the record now: were they ours
        // throughout?
        if core::ptr::read_volatile(owner) != token {
            flags |= FLAG_SCRATCH_RACE;
            bump(Stat::ScratchRace);
        }
        (*ev).flags = flags;
    }
    entry.submit(wake_flags());
    bump(Stat::RequestsSent);
    Ok(())
}

/// Sends the exception of `tr` that escaped into uWSGI, else the one that unwound the most
/// frames (on a tie, the earlier one).
#[inline(always)]
fn send_exception(tr: &ExcTrack, tgid: u32, tid: u32, instance: u32, req: u64) {
    let c = tr.cur & 1;
    let (cur, other) = if c == 0 { (&tr.slots[0], &tr.slots[1]) } else { (&tr.slots[1], &tr.slots[0]) };
    let best = if cur.escaped != 0 {
        cur
    } else if other.escaped != 0 || other.nframes >= cur.nframes {
        other
    } else {
        cur
    };
    if best.nframes == 0 || best.described == 0 {
        return;
    }
    match EVENTS.reserve::<ExceptionEvent>(0) {
        Some(mut e) => {
            let ev = e.as_mut_ptr();
            // SAFETY: live reservation of size_of::<ExceptionEvent>(); `best` is a map value.
            unsafe {
                (*ev).kind = EventKind::Exception as u32;
                (*ev).tgid = tgid;
                (*ev).tid = tid;
                (*ev).instance = instance;
                (*ev).req = req;
                core::ptr::copy_nonoverlapping(best as *const ExcSlot, addr_of_mut!((*ev).exc), 1);
            }
            e.submit(0);
            bump(Stat::ExceptionsSent);
        }
        None => bump(Stat::ExceptionRingFull),
    }
}

const TPF_TUPLE: u64 = 1 << 26;
const NONE_SLOT: u32 = 2;
/// Frames an exception must unwind before its type and message are read.
const DESCRIBE_AT: u32 = 3;
/// Bytes read from a frame to get its code object and instruction in one go.
const FRAME_SPAN: usize = 128;

const TPF_STR: u64 = 1 << 28;
const TPF_BASE_EXC: u64 = 1 << 30;

/// `int PyTraceBack_Here(PyFrameObject *f)`, in libpython: CPython calls it once per
/// (exception, Python frame) as an exception unwinds, including the frame that catches it.
/// Nothing calls it on a request without exceptions, so it costs nothing there. Each hit
/// appends the frame to the thread's current exception; a request's error is the exception
/// that unwound the most frames (the one that escaped the view: control-flow exceptions
/// are caught within a frame or two).
#[uprobe]
pub fn py_traceback(ctx: ProbeContext) -> u32 {
    if try_py_traceback(&ctx).is_err() {
        bump(Stat::PyReadErrors);
    }
    0
}

fn try_py_traceback(ctx: &ProbeContext) -> Result<(), i64> {
    let (tgid, tid) = tgid_tid();
    // SAFETY: map lookups return pointers valid for the program's run.
    let Some(t) = (unsafe { TRACKED.get(&tgid) }) else { return Ok(()) };
    let Some(pl) = PYLAYOUTS.get(t.py) else { return Ok(()) };
    bump(Stat::PyFrames);
    let frame: u64 = ctx.arg(0).ok_or(0i64)?;
    // The GIL holder is the thread running this frame.
    let tstate: u64 = if pl.runtime_tstate != PY_NONE {
        read(t.py_runtime, pl.runtime_tstate)?
    } else {
        let interp: u64 = read(t.py_runtime, pl.interp_main)?;
        let gil: u64 = read(interp, pl.interp_gil)?;
        read(gil, pl.gil_last_holder)?
    };
    let (etype, value, tb) = if pl.exc_model == 0 {
        let exc: [u64; 3] = read(tstate, pl.tstate_curexc)?;
        (exc[0], exc[1], exc[2])
    } else {
        let value: u64 = read(tstate, pl.tstate_curexc)?;
        (read(value, 8)?, value, read(value, pl.exc_traceback)?)
    };
    // Code object and instruction in one read: both sit within FRAME_SPAN bytes.
    let holder = if pl.frame_iframe != PY_NONE { read::<u64>(frame, pl.frame_iframe)? } else { frame };
    let lo = if pl.code < pl.instr { pl.code } else { pl.instr };
    let block: [u8; FRAME_SPAN] = read(holder, lo)?;
    let off = |field: u32| (field - lo) as usize & (FRAME_SPAN - 1);
    let code = u64::from_ne_bytes(pick(&block, off(pl.code)));
    let lasti = if pl.frame_iframe != PY_NONE {
        u64::from_ne_bytes(pick(&block, off(pl.instr))).wrapping_sub(code + pl.code_adaptive as u64) as i32
    } else {
        i32::from_ne_bytes(pick(&block, off(pl.instr))).wrapping_mul(pl.lasti_scale as i32)
    };

    let tr = match EXC.get_ptr_mut(&tid) {
        Some(p) => p,
        None => {
            let zero = EXC_ZERO.get_ptr(0).ok_or(0i64)?;
            // SAFETY: per-CPU map value, never written.
            let _ = EXC.insert(&tid, unsafe { &*zero }, BPF_NOEXIST as u64);
            EXC.get_ptr_mut(&tid).ok_or(0i64)?
        }
    };
    // SAFETY: map value pointer, valid for this run; one program run per thread at a time.
    let tr = unsafe { &mut *tr };
    let c = tr.cur & 1;
    let o = c ^ 1;
    // Which exception is this? A raise site has no traceback yet: always a new one. Else the
    // same value as a slot's is the same exception (also after a bare `raise`); a value that
    // changed (3.8-3.11 normalize C-raised exceptions when a handler takes them) is matched
    // through the traceback chain: this hit extends the traceback the slot's last hit saw.
    let mut idx = NONE_SLOT;
    if tb != 0 {
        if value != 0 && slot(tr, c).nframes > 0 && slot(tr, c).value == value {
            idx = c;
        } else if value != 0 && slot(tr, o).nframes > 0 && slot(tr, o).value == value {
            idx = o;
        } else {
            let prev: u64 = read(tb, pl.tb_next)?;
            if slot(tr, c).nframes > 0 && slot(tr, c).last_tb == prev {
                idx = c;
            } else if slot(tr, o).nframes > 0 && slot(tr, o).last_tb == prev {
                idx = o;
            }
        }
    }
    if idx == NONE_SLOT {
        // A new exception: it takes the slot that does not hold the leader (an exception
        // that escaped into uWSGI leads whatever its depth: 3.13 prints it with Python code
        // that raises and catches on its own).
        let (sc, so) = (slot(tr, c), slot(tr, o));
        let keep_c = if sc.escaped != so.escaped { sc.escaped != 0 } else { sc.nframes > so.nframes };
        idx = if keep_c { o } else { c };
        let s = slot_mut(tr, idx);
        s.nframes = 0;
        s.described = 0;
        s.escaped = 0;
        s.msg_len = 0;
        s.msg_full = 0;
        s.msg_kind = 0;
        s.msg_from = 0;
        s.type_name[0] = 0;
    }
    tr.cur = idx;
    let rival = slot(tr, idx ^ 1).nframes;
    let rival_escaped = slot(tr, idx ^ 1).escaped != 0;
    let s = slot_mut(tr, idx);
    // Innermost frames fill the array; past it, the last slot tracks the outermost frame.
    let n = s.nframes as usize;
    let at = if n < PY_FRAMES - 1 { n } else { PY_FRAMES - 1 };
    s.frames[at & (PY_FRAMES - 1)] = PyFrame { code, lasti, _pad: 0 };
    s.nframes += 1;
    s.last_tb = tb;
    s.value = value;
    // Read type and message once, when this exception leads and is deep enough to be a
    // request's error (control-flow exceptions unwind 1-2 frames; a view's error reaches
    // the framework's handler at 3 or more; an escaped one is read at PyErr_Display): the
    // objects are alive now (the thread's current exception), maybe not at the request's end.
    if s.described == 0 && s.nframes >= DESCRIBE_AT && s.nframes > rival && !rival_escaped {
        s.described = 1;
        describe(s, pl, etype, value);
    }
    Ok(())
}

/// `void PyErr_Display(PyObject *type, PyObject *value, PyObject *tb)`: uWSGI prints an
/// exception that escaped the WSGI callable; it is this thread's current one.
#[uprobe]
pub fn py_display(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = tgid_tid();
    // SAFETY: map lookups return pointers valid for the program's run.
    let Some(t) = (unsafe { TRACKED.get(&tgid) }) else { return 0 };
    let Some(pl) = PYLAYOUTS.get(t.py) else { return 0 };
    let value: u64 = ctx.arg(1).unwrap_or(0);
    if let Some(tr) = EXC.get_ptr_mut(&tid) {
        // SAFETY: map value pointer, valid for this run.
        let tr = unsafe { &mut *tr };
        let c = tr.cur;
        let s = slot_mut(tr, c);
        if s.nframes > 0 {
            s.escaped = 1;
            // It may not have led on depth: read it now (the value is normalized here).
            if s.described == 0 && value != 0 {
                s.described = 1;
                describe(s, pl, read::<u64>(value, 8).unwrap_or(0), value);
            }
        }
    }
    0
}

#[inline(always)]
fn slot(tr: &ExcTrack, i: u32) -> &ExcSlot {
    if i == 0 {
        &tr.slots[0]
    } else {
        &tr.slots[1]
    }
}

#[inline(always)]
fn slot_mut(tr: &mut ExcTrack, i: u32) -> &mut ExcSlot {
    if i == 0 {
        &mut tr.slots[0]
    } else {
        &mut tr.slots[1]
    }
}

/// Type name and message of an exception (3.8-3.11 may hold it unnormalized: the value is
/// then a `str`, a tuple of args, or NULL).
#[inline(always)]
fn describe(s: &mut ExcSlot, pl: &PyLayout, etype: u64, value: u64) {
    if let Ok(name) = read::<u64>(etype, pl.tp_name) {
        // SAFETY: bounded by the buffer's size; a fault leaves an empty string.
        let rc = unsafe {
            bpf_probe_read_user_str(s.type_name.as_mut_ptr() as *mut c_void, EXC_TYPE_CAP as u32, name as *const c_void)
        };
        if rc < 0 {
            s.type_name[0] = 0;
        }
    }
    if value == 0 {
        return;
    }
    let Ok(flags) = type_flags(value, pl) else { return };
    let (obj, from) = if flags & TPF_STR != 0 {
        (value, 1)
    } else if flags & TPF_BASE_EXC != 0 {
        match first_item(read::<u64>(value, pl.exc_args).unwrap_or(0)) {
            Some(o) => (o, 2),
            None => return,
        }
    } else if flags & TPF_TUPLE != 0 {
        match first_item(value) {
            Some(o) => (o, 3),
            None => return,
        }
    } else {
        return;
    };
    if from != 1 && !matches!(type_flags(obj, pl), Ok(f) if f & TPF_STR != 0) {
        s.msg_from = from + 10; // first item is not a str: no text
        return;
    }
    let Ok(state) = read::<u32>(obj, pl.str_state) else { return };
    let Ok(length) = read::<i64>(obj, 16) else { return };
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    let data = if compact && ascii {
        obj + pl.str_ascii_data as u64
    } else if compact {
        obj + pl.str_compact_data as u64
    } else {
        read::<u64>(obj, pl.str_data_ptr).unwrap_or(0)
    };
    if !matches!(kind, 1 | 2 | 4) || length < 0 || data == 0 {
        return;
    }
    // Cap before multiplying (no 128-bit arithmetic on BPF); only the cap is copied anyway.
    let length = if length > (1 << 28) { 1u64 << 28 } else { length as u64 };
    let bytes = (length * kind as u64) as u32;
    let take = if bytes > u16::MAX as u32 { u16::MAX } else { bytes as u16 };
    if copy_user(addr_of_mut!(s.msg), data, take) {
        s.msg_kind = kind;
        s.msg_full = bytes;
        s.msg_len = if bytes as usize > EXC_MSG_CAP { EXC_MSG_CAP as u32 } else { bytes };
        s.msg_from = from;
    }
}

#[inline(always)]
fn type_flags(obj: u64, pl: &PyLayout) -> Result<u64, i64> {
    let ty: u64 = read(obj, 8)?;
    read(ty, pl.tp_flags)
}

/// `tuple[0]`, if the tuple is not empty.
#[inline(always)]
fn first_item(tuple: u64) -> Option<u64> {
    if tuple == 0 {
        return None;
    }
    let n: i64 = read(tuple, 16).ok()?;
    if n < 1 {
        return None;
    }
    read::<u64>(tuple, 24).ok().filter(|p| *p != 0)
}

#[inline(always)]
fn fault(ok: bool) -> u32 {
    if ok {
        0
    } else {
        FLAG_READ_ERROR
    }
}

/// `N` bytes at `at` in `buf` (zeroes when out of range).
#[inline(always)]
fn pick<const N: usize, const M: usize>(buf: &[u8; M], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    if at + N <= M {
        let mut j = 0;
        while j < N {
            out[j] = buf[at + j];
            j += 1;
        }
    }
    out
}

#[inline(always)]
fn emit_proc(action: ProcAction, pid: u32, parent: u32, instance: u32) {
    match EVENTS.reserve::<ProcEvent>(0) {
        Some(mut e) => {
            e.write(ProcEvent {
                kind: EventKind::Proc as u32,
                action: action as u32,
                pid,
                parent,
                instance,
                _pad: 0,
                // SAFETY: helper with no preconditions.
                ktime_ns: unsafe { bpf_ktime_get_ns() },
            });
            e.submit(0);
        }
        None => bump(Stat::ProcRingFull),
    }
}

/// task/task_newtask, in the parent's context: a tracked process made a new process.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let _ = try_task_newtask(&ctx);
    0
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, _) = tgid_tid();
    // SAFETY: map lookups return pointers valid for the program's run.
    let Some(parent) = (unsafe { TRACKED.get(&tgid) }).copied() else {
        return Ok(());
    };
    let cfg = TPCONFIG.get(0).ok_or(0i64)?;
    // SAFETY: offsets come from this kernel's tracepoint format file.
    let flags: u64 = unsafe { ctx.read_at(cfg.newtask_flags as usize) }.map_err(|e| e as i64)?;
    if flags & CLONE_THREAD != 0 {
        return Ok(());
    }
    let child: i32 = unsafe { ctx.read_at(cfg.newtask_pid as usize) }.map_err(|e| e as i64)?;
    if TRACKED.insert(&(child as u32), &parent, BPF_ANY as u64).is_err() {
        bump(Stat::TrackedFull);
    }
    emit_proc(ProcAction::Fork, child as u32, tgid, parent.instance);
    Ok(())
}

/// sched/sched_process_exit, in the exiting task's context.
#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_process_exit(&ctx);
    0
}

fn try_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, tid) = tgid_tid();
    // SAFETY: map lookups return pointers valid for the program's run.
    let Some(t) = (unsafe { TRACKED.get(&tgid) }).copied() else {
        return Ok(());
    };
    let cfg = TPCONFIG.get(0).ok_or(0i64)?;
    let group_dead = if cfg.exit_group_dead == u32::MAX {
        tgid == tid
    } else {
        // SAFETY: offset from this kernel's tracepoint format file.
        unsafe { ctx.read_at::<u8>(cfg.exit_group_dead as usize) }.map_err(|e| e as i64)? != 0
    };
    if !group_dead {
        return Ok(());
    }
    let _ = TRACKED.remove(&tgid);
    emit_proc(ProcAction::Exit, tgid, tgid, t.instance);
    Ok(())
}

/// sched/sched_process_exec: a tracked process replaced its image (uWSGI master on HUP).
#[tracepoint]
pub fn process_exec(_ctx: TracePointContext) -> u32 {
    let (tgid, _) = tgid_tid();
    // SAFETY: map lookups return pointers valid for the program's run.
    if let Some(t) = unsafe { TRACKED.get(&tgid) } {
        emit_proc(ProcAction::Exec, tgid, tgid, t.instance);
    }
    0
}

// Outbound calls. These tracepoints fire for every process; anything untracked returns
// after one hash lookup. Record offsets: syscall arguments are 8-byte slots from 16
// (checked against tracefs by userspace before attaching).
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;

/// A u64 slot of a tracepoint record, read directly (tracepoint programs may read their
/// context without a helper call).
#[inline(always)]
fn tp_u64(ctx: &TracePointContext, off: usize) -> u64 {
    // SAFETY: `off` is inside the syscall record (checked against tracefs by userspace),
    // 8-aligned, and the verifier bounds context reads.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(off) as *const u64) }
}

#[inline(always)]
fn tracked_thread() -> Option<(u32, u32)> {
    let (tgid, tid) = tgid_tid();
    // SAFETY: map lookup; only presence matters.
    unsafe { TRACKED.get(&tgid) }.map(|_| (tgid, tid))
}

#[inline(always)]
fn submit_wake<T>(e: aya_ebpf::maps::ring_buf::RingBufEntry<T>) {
    e.submit(wake_flags());
    bump(Stat::CallsSent);
}

/// syscalls/sys_enter_connect: where a socket of the app connects to.
#[tracepoint]
pub fn sys_connect(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = tracked_thread() else { return 0 };
    let (fd, addr, alen) = (tp_u64(&ctx, ARG0), tp_u64(&ctx, ARG1), tp_u64(&ctx, ARG2));
    emit_call(CallAction::Connect, tgid, tid, fd as i32, addr, if alen > 28 { 28 } else { alen }, alen);
    0
}

/// syscalls/sys_enter_sendto: the first bytes of what the app sends.
#[tracepoint]
pub fn sys_sendto(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid)) = tracked_thread() else { return 0 };
    let (fd, buf, len) = (tp_u64(&ctx, ARG0), tp_u64(&ctx, ARG1), tp_u64(&ctx, ARG2));
    emit_call(CallAction::Send, tgid, tid, fd as i32, buf, len, len);
    0
}

#[inline(always)]
fn emit_call(action: CallAction, tgid: u32, tid: u32, fd: i32, src: u64, take: u64, len: u64) {
    let Some(mut e) = EVENTS.reserve::<CallEvent>(0) else {
        bump(Stat::CallRingFull);
        return;
    };
    let ev = e.as_mut_ptr();
    let take = if take > CALL_SEND_CAP as u64 { CALL_SEND_CAP as u16 } else { take as u16 };
    // SAFETY: live reservation; we fill every field.
    unsafe {
        (*ev).kind = EventKind::Call as u32;
        (*ev).action = action as u32;
        (*ev).tgid = tgid;
        (*ev).tid = tid;
        (*ev).fd = fd;
        (*ev).len = len;
        (*ev).ktime_ns = bpf_ktime_get_ns();
        (*ev).data_len = if copy_user(addr_of_mut!((*ev).data), src, take) { take as u32 } else { 0 };
    }
    submit_wake(e);
}

/// syscalls/sys_enter_recvfrom: remember the buffer; the bytes are there at exit.
#[tracepoint]
pub fn sys_recvfrom(ctx: TracePointContext) -> u32 {
    let Some((_, tid)) = tracked_thread() else { return 0 };
    let args = RecvArgs { fd: tp_u64(&ctx, ARG0) as i64, buf: tp_u64(&ctx, ARG1) };
    let _ = RECV_ARGS.insert(&tid, &args, BPF_ANY as u64);
    0
}

/// syscalls/sys_exit_recvfrom: the first bytes received, when there are any.
#[tracepoint]
pub fn sys_recvfrom_exit(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = tgid_tid();
    // SAFETY: map lookup; copied out at once.
    let Some(args) = (unsafe { RECV_ARGS.get(&tid) }).copied() else { return 0 };
    let _ = RECV_ARGS.remove(&tid);
    let ret = tp_u64(&ctx, RET) as i64;
    if ret <= 0 {
        return 0;
    }
    let Some(mut e) = EVENTS.reserve::<RecvEvent>(0) else {
        bump(Stat::CallRingFull);
        return 0;
    };
    let ev = e.as_mut_ptr();
    let take = if ret > CALL_RECV_CAP as i64 { CALL_RECV_CAP as u16 } else { ret as u16 };
    // SAFETY: live reservation; we fill every field.
    unsafe {
        (*ev).kind = EventKind::Recv as u32;
        (*ev).tgid = tgid;
        (*ev).tid = tid;
        (*ev).fd = args.fd as i32;
        (*ev).len = ret as u64;
        (*ev).ktime_ns = bpf_ktime_get_ns();
        if !copy_user(addr_of_mut!((*ev).data), args.buf, take) {
            (*ev).data = [0; CALL_RECV_CAP];
        }
    }
    submit_wake(e);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
