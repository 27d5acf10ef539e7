//! Out-of-process observer for uWSGI Python services.
//!
//! Data path (see docs/architecture.md): [`targets`] finds the uWSGI processes and the file
//! holding the request handler; [`probes`] loads the eBPF programs and keeps TRACKED in step;
//! the kernel emits one record per request into a ring buffer; [`decode`] validates and
//! decodes records; [`export`] prints them.

pub mod calls;
pub mod decode;
pub mod export;
pub mod probes;
pub mod python;
pub mod spans;
pub mod targets;

/// Deterministic junk (xorshift64) for the parsers' fuzz-style unit tests.
#[cfg(test)]
pub(crate) fn junk_bytes(seed: &mut u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *seed as u8
        })
        .collect()
}

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    os::fd::AsRawFd,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{MapData, RingBuf};
use observer_common::{ProcAction, Stat, Tracked, LAYOUT_NONE};
use serde::Serialize;
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};

use crate::{
    decode::{Decoder, Record},
    export::{Format, Printer},
    probes::Probes,
};

/// When the exception probes are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExceptionMode {
    /// Always: every failed request gets its traceback; each exception frame unwound in the
    /// app costs a probe hit, also on successful requests.
    Always,
    /// Only while the app is failing: the probes are attached at the first 5xx and taken
    /// off after a quiet minute, so a healthy app pays nothing; the first failure of a
    /// burst has no traceback.
    OnError,
    /// Never.
    Off,
}

/// How long `--exceptions on-error` keeps the probes on after the last 5xx.
const ON_ERROR_WINDOW: Duration = Duration::from_secs(60);

pub struct Options {
    pub pids: Vec<u32>,
    pub pidfiles: Vec<PathBuf>,
    pub format: Format,
    pub drop_headers: Vec<String>,
    pub ring_bytes: u32,
    /// Testing aid (hidden flag): added to every layout offset.
    pub layout_shift: u32,
    /// Testing aid (hidden flag): added to the CPython code-object offset.
    pub py_layout_shift: u32,
    /// Report to a SkyWalking OAP.
    pub oap: Option<export::oap::OapConfig>,
    /// Service name; else SW_AGENT_NAME / OTEL_SERVICE_NAME from the target, else derived.
    pub service: Option<String>,
    /// Component id for entry spans; else detected from the target's environment.
    pub component: Option<i32>,
    /// Statuses at or above this mark a span as an error.
    pub error_status: u16,
    /// Also write the detach summary, as JSON, to this file.
    pub summary_file: Option<PathBuf>,
    /// Follow outbound calls (HTTP, Redis, PostgreSQL, MySQL) into Exit spans.
    pub exit_spans: bool,
    /// Keep literal values in reported SQL statements.
    pub sql_literals: bool,
    /// When to read Python exceptions behind failed requests.
    pub exceptions: ExceptionMode,
}

/// What one run saw and lost; printed at detach (and as a JSON line with `--format json`).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub requests: u64,
    pub workers: usize,
    pub forks: u64,
    pub exits: u64,
    pub execs: u64,
    /// Request records lost in the kernel: ring buffer full.
    pub lost_ring_full: u64,
    /// Process records lost in the kernel: ring buffer full.
    pub lost_proc_ring_full: u64,
    /// New processes not followed: TRACKED map full.
    pub lost_tracked_full: u64,
    /// Request records rejected by validation, by reason.
    pub invalid: BTreeMap<String, u64>,
    /// Requests dropped because their target was refused (in userspace, or in the kernel
    /// once the refusal reached it).
    pub refused: u64,
    /// Records that could not be decoded at all.
    pub decode_errors: u64,
    /// Connections closed before sending a request (gevent mode reports these to the probe).
    pub empty_connections: u64,
    /// Incoming sw8 headers that could not be parsed (the request starts a new trace).
    pub sw8_malformed: u64,
    /// Segments handed to the OAP exporter, sent, and lost (queue over its bound, or still
    /// queued when the flush at detach ran out of time).
    pub oap_queued: u64,
    pub oap_sent: u64,
    pub oap_dropped_queue_full: u64,
    pub oap_dropped_at_shutdown: u64,
    pub oap_send_failures: u64,
    pub oap_properties_sent: u64,
    pub oap_heartbeats_sent: u64,
    /// Writes to the output that failed (printing stops after the first).
    pub output_errors: u64,
    /// Requests whose header scan stopped early (sw8 headers past the limit may be missed).
    pub vars_truncated: u64,
    /// Python exceptions: frames unwound in observed threads (kernel count), failed
    /// requests given a traceback, and exception records not used, by reason.
    pub py_frames_unwound: u64,
    pub exceptions_reported: u64,
    pub exceptions_unresolved: BTreeMap<String, u64>,
    /// Exception records lost in the kernel: ring buffer full.
    pub lost_exceptions_ring_full: u64,
    /// Unwinding frames the kernel could not read (those hits are skipped).
    pub py_read_errors: u64,
    /// Outbound calls: made into Exit spans, outside requests, not attributed (async).
    #[serde(flatten)]
    pub calls: calls::CallStats,
    /// Outbound-call records lost in the kernel: ring buffer full.
    pub lost_calls_ring_full: u64,
}

/// Per-instance state for the live layout check.
#[derive(Default)]
struct InstanceState {
    valid: u64,
    invalid: u64,
    refused: bool,
    version: String,
    file: String,
    spans: Option<spans::SpanConfig>,
    /// The interpreter, when exception capture works for its version.
    py: Option<python::PyTarget>,
    py_valid: u64,
    py_invalid: u64,
}

/// After this many invalid records with none valid, a target's layout is declared wrong.
const REFUSE_AFTER: u64 = 3;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

struct Session {
    probes: Probes,
    decoder: Decoder,
    printer: Printer<std::io::BufWriter<std::io::Stdout>>,
    instances: HashMap<u32, InstanceState>,
    /// Live workers seen serving (pruned on exit), and how many were ever seen.
    workers: HashSet<u32>,
    workers_seen: usize,
    summary: Summary,
    last_drops: u64,
    oap: Option<export::oap::Oap>,
    /// Worker pid -> its SkyWalking instance name, once reported.
    reported: HashMap<u32, String>,
    summary_file: Option<PathBuf>,
    /// Processes that exec'd and whose new image is not resolved yet, since when.
    pending_exec: HashMap<u32, Instant>,
    /// tid -> the exception record sent just before that thread's next request record.
    pending_exc: HashMap<u32, (Instant, Box<observer_common::ExceptionEvent>)>,
    /// Worker pid -> whether it runs several requests per thread (gevent, async).
    async_workers: HashMap<u32, bool>,
    /// tid -> the uWSGI core it served last (a second core on one thread means async).
    tid_core: HashMap<u32, i32>,
    calls: calls::Calls,
    resolver: python::Resolver,
    /// Wall clock minus monotonic clock, in ns (kernel timestamps are monotonic).
    wall_offset_ns: i64,
    exception_mode: ExceptionMode,
    /// `--exceptions on-error`: when the last 5xx was seen, per instance.
    last_5xx: HashMap<u32, Instant>,
}

pub async fn attach(opts: Options) -> Result<Summary> {
    // Installed first: a Ctrl-C or SIGTERM during setup is handled as a clean detach.
    let signals = Signals {
        int: tokio::signal::unix::signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        term: tokio::signal::unix::signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
    };
    let mut pids = opts.pids.clone();
    for f in &opts.pidfiles {
        pids.push(targets::read_pidfile(f)?);
    }
    if pids.is_empty() {
        bail!("nothing to attach to: give --pid PID or --pidfile FILE");
    }
    for &p in &pids {
        if !targets::exists(p) {
            bail!(targets::TargetError::NoProcess(p));
        }
    }
    probes::check_privileges()?;
    let mut roots: Vec<u32> = Vec::new();
    for &p in &pids {
        let r = targets::find_root(p)?;
        if !roots.contains(&r) {
            roots.push(r);
        }
    }
    let mut found = Vec::new();
    for &r in &roots {
        let mut t = targets::probe_target(r)?;
        if opts.layout_shift != 0 {
            t.layout = targets::shifted(t.layout, opts.layout_shift);
        }
        found.push((r, t));
    }
    probes::check_btf()?;
    let tracefs = probes::ensure_tracefs()?;
    let (probes, ring) = Probes::load(opts.ring_bytes, &tracefs, opts.exit_spans)?;

    let mut s = Session {
        probes,
        decoder: Decoder::new(&opts.drop_headers),
        printer: Printer::new(std::io::BufWriter::new(std::io::stdout()), opts.format),
        instances: HashMap::new(),
        workers: HashSet::new(),
        workers_seen: 0,
        summary: Summary { kind: "summary", ..Default::default() },
        last_drops: 0,
        oap: match opts.oap.clone() {
            Some(cfg) => Some(export::oap::Oap::start(cfg).context("starting the OAP exporter")?),
            None => None,
        },
        reported: HashMap::new(),
        summary_file: opts.summary_file.clone(),
        pending_exec: HashMap::new(),
        pending_exc: HashMap::new(),
        async_workers: HashMap::new(),
        tid_core: HashMap::new(),
        calls: calls::Calls::new(opts.sql_literals),
        resolver: python::Resolver::default(),
        wall_offset_ns: 0,
        exception_mode: opts.exceptions,
        last_5xx: HashMap::new(),
    };
    for (root, target) in &found {
        let slot = s.probes.attach_target(target)?;
        let py = match python::python_target(*root) {
            _ if opts.exceptions == ExceptionMode::Off => None,
            Ok(mut p) => {
                p.layouts.kernel.code += opts.py_layout_shift;
                Some(p)
            }
            Err(e) => {
                eprintln!(
                    "observer: warning: instance {root}: {e}; failed requests are reported from their status only, without a traceback"
                );
                None
            }
        };
        let py_slot = match &py {
            Some(p) => {
                if opts.exceptions == ExceptionMode::Always {
                    s.probes.attach_python(p)?;
                }
                s.probes.py_slot(p)?
            }
            None => LAYOUT_NONE,
        };
        let t = Tracked {
            instance: *root,
            layout: slot,
            py: py_slot,
            _pad: 0,
            py_runtime: py.as_ref().map_or(0, |p| p.runtime),
        };
        // Scan twice: a process forked between the first scan and its insertion is caught
        // by the second (after insertion, the fork tracepoint follows it in kernel).
        let mut n = 0;
        for _ in 0..2 {
            for pid in targets::members(*root) {
                if s.probes.tracked(pid).is_none() {
                    s.probes.track(pid, t)?;
                    n += 1;
                }
            }
        }
        let spans = s.oap.as_ref().map(|_| {
            let (cfg, source) = span_config(*root, &opts);
            eprintln!(
                "observer: reporting instance {root} as service {:?} ({source}), component {}, to OAP {}",
                cfg.service,
                cfg.component,
                opts.oap.as_ref().map(|o| o.address.as_str()).unwrap_or("")
            );
            cfg
        });
        s.instances.insert(
            *root,
            InstanceState {
                version: target.version.clone(),
                file: target.display.clone(),
                spans,
                py: py.clone(),
                ..Default::default()
            },
        );
        eprintln!(
            "observer: attached to uWSGI {} instance {root} ({n} processes), probe in {}",
            target.version, target.display
        );
        if let Some(p) = &py {
            let when = if opts.exceptions == ExceptionMode::OnError { " (probes armed at the first 5xx)" } else { "" };
            eprintln!("observer: instance {root}: Python {} exceptions from {}{when}", p.version, p.display);
        }
    }
    // Loading parsed the kernel's BTF (tens of MB, now freed): give that memory back.
    // SAFETY: plain glibc call, no preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    s.run(ring, &roots, signals).await?;
    if let Some(oap) = s.oap.take() {
        oap.shutdown_into(&mut s.summary).await;
    }
    s.finish()?;
    Ok(s.summary)
}

impl Session {
    async fn run(&mut self, ring: RingBuf<MapData>, roots: &[u32], mut sig: Signals) -> Result<()> {
        // SAFETY: the fd stays open for the AsyncFd's whole life: RingFd owns the map.
        let mut ring = unsafe { AsyncFd::register(RingFd(ring)) }
            .map_err(|e| e.into_parts().1)
            .context("polling the ring buffer")?;
        // The kernel wakes us only once records pile up (see WAKEUP_BYTES in the eBPF
        // crate); this tick bounds how long a record can wait in a quiet ring.
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard?;
                    self.drain(&mut guard.get_inner_mut().0);
                    guard.clear_ready();
                }
                _ = sig.int.recv() => break,
                _ = sig.term.recv() => break,
                _ = tick.tick() => {
                    ticks += 1;
                    self.drain(&mut ring.get_mut().0);
                    self.probes.flush_logs();
                    if ticks.is_multiple_of(5) {
                        self.report_new_drops();
                        if self.exception_mode == ExceptionMode::OnError {
                            self.disarm_quiet();
                        }
                    }
                    if ticks.is_multiple_of(5) && !self.pending_exec.is_empty() {
                        self.resolve_pending();
                    }
                    if ticks.is_multiple_of(20) {
                        self.prune_dead();
                        self.calls.prune(monotonic_ns(), CALL_MAX_AGE_NS);
                        self.pending_exc.retain(|_, (at, _)| at.elapsed() < Duration::from_nanos(CALL_MAX_AGE_NS));
                    }
                    if roots.iter().all(|r| !targets::exists(*r)) {
                        eprintln!("observer: every observed uWSGI instance has exited");
                        break;
                    }
                }
            }
        }
        // Records already in the ring still count.
        self.drain(&mut ring.get_mut().0);
        Ok(())
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        self.wall_offset_ns = wall_minus_monotonic_ns();
        while let Some(item) = ring.next() {
            match decode::parse_record(&item) {
                Ok(Record::Request(ev)) => self.on_request(&ev),
                Ok(Record::Proc(ev)) => self.on_proc(&ev),
                Ok(Record::Exception(ev)) => {
                    self.pending_exc.insert(ev.tid, (Instant::now(), ev));
                }
                Ok(Record::Call(ev)) => {
                    let data = &ev.data[..(ev.data_len as usize).min(ev.data.len())];
                    match observer_common::CallAction::try_from(ev.action) {
                        Ok(observer_common::CallAction::Connect) => self.calls.connect(ev.tgid, ev.fd, data),
                        Ok(observer_common::CallAction::Send) => {
                            self.calls.send(ev.tgid, ev.tid, ev.fd, data, ev.len, ev.ktime_ns)
                        }
                        Err(_) => self.summary.decode_errors += 1,
                    }
                }
                Ok(Record::Recv(ev)) => {
                    let n = (ev.len as usize).min(ev.data.len());
                    self.calls.recv(ev.tgid, ev.fd, &ev.data[..n], ev.ktime_ns);
                }
                Err(e) => {
                    self.summary.decode_errors += 1;
                    log::warn!("undecodable record: {e}");
                }
            }
        }
        let r = self.printer.flush();
        self.output_result(r);
    }

    fn on_request(&mut self, ev: &observer_common::RequestEvent) {
        // Sent right before this record by the same probe run: claimed here, whatever happens.
        let pending_exc = self.pending_exc.remove(&ev.tid);
        let st = self.instances.entry(ev.instance).or_default();
        if st.refused {
            self.summary.refused += 1;
            return;
        }
        if ev.flags & observer_common::FLAG_VARS_TRUNCATED != 0 {
            self.summary.vars_truncated += 1;
        }
        if let Err(why) = decode::validate(ev, now_us()) {
            if why == decode::Invalid::NoRequest {
                self.summary.empty_connections += 1;
                return;
            }
            *self.summary.invalid.entry(why.to_string()).or_default() += 1;
            if !why.suspects_layout() {
                return;
            }
            st.invalid += 1;
            if st.valid == 0 && st.invalid >= REFUSE_AFTER {
                st.refused = true;
                eprintln!(
                    "observer: error: uWSGI {} ({}) instance {}: request layout did not validate on live data ({why}); refusing this target",
                    st.version, st.file, ev.instance
                );
                self.refuse(ev.instance);
            }
            return;
        }
        st.valid += 1;
        let mut r = self.decoder.request(ev);
        let attribute = !self.is_async(ev);
        if let Some((_, exc)) = pending_exc {
            if exc.req == ev.req && exc.tgid == ev.tgid {
                r.exception = self.exception_for(ev, &exc, attribute);
            }
        }
        if self.exception_mode == ExceptionMode::OnError && r.status >= 500 {
            self.arm_exceptions(ev.instance);
        }
        r.calls = self.calls.take_for_request(ev.tid, ev.start_us, self.wall_offset_ns, attribute);
        let st = self.instances.entry(ev.instance).or_default();
        self.summary.requests += 1;
        if self.workers.insert(r.worker_pid) {
            self.workers_seen += 1;
        }
        if let (Some(oap), Some(cfg)) = (&self.oap, &st.spans) {
            let (seg, notes) = spans::segment(&r, cfg);
            if notes.sw8_malformed {
                self.summary.sw8_malformed += 1;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.reported.entry(r.worker_pid) {
                oap.add_instance(export::oap::Instance {
                    service: seg.service.clone(),
                    name: seg.service_instance.clone(),
                    properties: instance_properties(r.worker_pid, r.instance, &st.version),
                });
                e.insert(seg.service_instance.clone());
            }
            oap.push(seg);
        }
        let res = self.printer.request(&r);
        self.output_result(res);
    }

    /// `--exceptions on-error`: a 5xx puts the exception probes on for the next minute.
    fn arm_exceptions(&mut self, instance: u32) {
        self.last_5xx.insert(instance, Instant::now());
        let Some(p) = self.instances.get(&instance).and_then(|s| s.py.clone()) else { return };
        if !self.probes.python_attached(&p) {
            match self.probes.attach_python(&p) {
                Ok(()) => eprintln!("observer: instance {instance}: a 5xx: exception probes on"),
                Err(e) => eprintln!("observer: warning: instance {instance}: {e:#}"),
            }
        }
    }

    /// `--exceptions on-error`: probes off for instances quiet for a minute.
    fn disarm_quiet(&mut self) {
        let quiet: Vec<u32> =
            self.last_5xx.iter().filter(|(_, t)| t.elapsed() >= ON_ERROR_WINDOW).map(|(i, _)| *i).collect();
        for instance in quiet {
            self.last_5xx.remove(&instance);
            if let Some(p) = self.instances.get(&instance).and_then(|s| s.py.clone()) {
                // Libraries may be shared by instances: keep the probes while any is failing.
                let shared = self.last_5xx.keys().any(|i| {
                    self.instances.get(i).and_then(|s| s.py.as_ref()).is_some_and(|q| (q.dev, q.ino) == (p.dev, p.ino))
                });
                if !shared && self.probes.python_attached(&p) {
                    self.probes.detach_python(&p);
                    eprintln!(
                        "observer: instance {instance}: no 5xx for {}s: exception probes off",
                        ON_ERROR_WINDOW.as_secs()
                    );
                }
            }
        }
    }

    /// Whether the request's worker runs several requests per thread (gevent, async): from
    /// its options or loaded modules, or seen serving two uWSGI cores on one thread.
    fn is_async(&mut self, ev: &observer_common::RequestEvent) -> bool {
        let prev_core = self.tid_core.insert(ev.tid, ev.async_id);
        let is_async = self.async_workers.entry(ev.tgid).or_insert_with(|| targets::is_async_worker(ev.tgid));
        if prev_core.is_some_and(|c| c != ev.async_id) {
            *is_async = true;
        }
        *is_async
    }

    /// Resolves the exception record of a failed request, unless its worker runs several
    /// requests per thread (gevent, async): exceptions of concurrent requests share the
    /// thread there, so none is attributed (and each is counted).
    fn exception_for(
        &mut self,
        ev: &observer_common::RequestEvent,
        exc: &observer_common::ExceptionEvent,
        attribute: bool,
    ) -> Option<python::PyException> {
        let unresolved = |s: &mut Summary, why: &str| *s.exceptions_unresolved.entry(why.to_string()).or_default() += 1;
        if !attribute {
            unresolved(&mut self.summary, "async worker (not attributed)");
            return None;
        }
        let st = self.instances.get_mut(&ev.instance)?;
        let Some(t) = st.py.as_ref() else {
            unresolved(&mut self.summary, "no interpreter layout");
            return None;
        };
        match self.resolver.resolve(&exc.exc, t, ev.tgid) {
            Ok(e) => {
                st.py_valid += 1;
                self.summary.exceptions_reported += 1;
                Some(e)
            }
            Err(why) => {
                unresolved(&mut self.summary, &why.to_string());
                if why != python::Unresolved::Gone {
                    st.py_invalid += 1;
                    if st.py_valid == 0 && st.py_invalid >= REFUSE_AFTER {
                        eprintln!(
                            "observer: warning: instance {}: Python {} exception records did not validate on live data ({why}); tracebacks off for it, errors come from the status only",
                            ev.instance,
                            t.version
                        );
                        st.py = None;
                        let instance = ev.instance;
                        for pid in self.probes.tracked_pids() {
                            if let Some(mut tr) = self.probes.tracked(pid).filter(|t| t.instance == instance) {
                                tr.py = LAYOUT_NONE;
                                let _ = self.probes.track(pid, tr);
                            }
                        }
                    }
                }
                None
            }
        }
    }

    /// A broken output (closed pipe, full disk) must not stop the observer, its OAP
    /// reporting or its summary: printing stops, once, with a warning, and is counted.
    fn output_result(&mut self, r: std::io::Result<()>) {
        if let Err(e) = r {
            if self.printer.format() != Format::None {
                eprintln!("observer: warning: writing output failed ({e}); printing stops, everything else goes on");
                self.printer.disable();
            }
            self.summary.output_errors += 1;
        }
    }

    fn refuse(&mut self, instance: u32) {
        for pid in self.probes.tracked_pids() {
            if self.probes.tracked(pid).is_some_and(|t| t.instance == instance) {
                let _ = self
                    .probes
                    .track(pid, Tracked { instance, layout: LAYOUT_NONE, py: LAYOUT_NONE, _pad: 0, py_runtime: 0 });
            }
        }
    }

    fn on_proc(&mut self, ev: &observer_common::ProcEvent) {
        let rec = decode::proc_record(ev);
        match ProcAction::try_from(ev.action) {
            // The child inherited the parent's TRACKED value in the kernel (same interpreter,
            // same addresses), so its exceptions are followed from its first instruction.
            Ok(ProcAction::Fork) => self.summary.forks += 1,
            Ok(ProcAction::Exit) => {
                self.summary.exits += 1;
                self.async_workers.remove(&ev.pid);
                self.calls.forget_pid(ev.pid);
                self.resolver.forget_pid(ev.pid);
                self.decoder.forget_pid(ev.pid);
                self.forget_instance(ev.pid);
                self.workers.remove(&ev.pid);
                self.pending_exec.remove(&ev.pid);
            }
            Ok(ProcAction::Exec) => {
                self.summary.execs += 1;
                self.on_exec(ev.pid);
            }
            Err(_) => {}
        }
        let res = self.printer.process(&rec);
        self.output_result(res);
    }

    /// After execve a process may be uWSGI again (master on HUP, maybe a new build) or
    /// something else (a worker's subprocess): re-resolve it.
    fn on_exec(&mut self, pid: u32) {
        if !targets::is_uwsgi(pid) {
            self.probes.untrack(pid);
            return;
        }
        // Keep following it meanwhile: right after execve only the executable is mapped,
        // and a handler in a plugin (Debian) appears once uWSGI loads it.
        self.pending_exec.insert(pid, Instant::now());
        self.resolve_pending();
    }

    /// Re-resolves processes that exec'd: attaches the uprobe to a new build's file if it
    /// changed, and moves them to its layout. Gives up (with a warning) after 60 s.
    fn resolve_pending(&mut self) {
        let pending: Vec<(u32, Instant)> = self.pending_exec.iter().map(|(p, t)| (*p, *t)).collect();
        for (pid, since) in pending {
            let Some(t) = self.probes.tracked(pid) else {
                self.pending_exec.remove(&pid);
                continue;
            };
            let refused = self.instances.get(&t.instance).is_some_and(|s| s.refused);
            let had_py = self.instances.get(&t.instance).is_some_and(|s| s.py.is_some());
            let result = targets::probe_target(pid).map_err(anyhow::Error::from).and_then(|target| {
                let slot = if refused { LAYOUT_NONE } else { self.probes.attach_target(&target)? };
                // A new image has new addresses: find the interpreter again.
                let py = if had_py { python::python_target(pid).ok() } else { None };
                let (py_slot, runtime) = match &py {
                    Some(p) => {
                        if self.exception_mode == ExceptionMode::Always || self.last_5xx.contains_key(&t.instance) {
                            self.probes.attach_python(p)?;
                        }
                        (self.probes.py_slot(p)?, p.runtime)
                    }
                    None => (LAYOUT_NONE, 0),
                };
                if let (Some(p), Some(st)) = (py, self.instances.get_mut(&t.instance)) {
                    st.py = Some(p);
                }
                self.probes.track(
                    pid,
                    Tracked { instance: t.instance, layout: slot, py: py_slot, _pad: 0, py_runtime: runtime },
                )
            });
            match result {
                Ok(()) => {
                    self.pending_exec.remove(&pid);
                }
                Err(e) if since.elapsed() > Duration::from_secs(60) || !targets::exists(pid) => {
                    self.pending_exec.remove(&pid);
                    if targets::exists(pid) {
                        eprintln!("observer: warning: pid {pid} after exec: {e:#}; keeping its previous probe");
                    }
                }
                Err(_) => {}
            }
        }
    }

    /// A dead worker's instance stops sending heartbeats.
    fn forget_instance(&mut self, pid: u32) {
        if let (Some(oap), Some(name)) = (&self.oap, self.reported.remove(&pid)) {
            oap.remove_instance(&name);
        }
    }

    /// Removes processes whose exit record was lost (ring buffer full).
    fn prune_dead(&mut self) {
        for pid in self.probes.tracked_pids() {
            if !targets::exists(pid) {
                self.probes.untrack(pid);
                self.decoder.forget_pid(pid);
            }
        }
        // Exit records lost to a full ring leave state behind: drop it for dead pids.
        let gone: Vec<u32> =
            self.reported.keys().chain(self.workers.iter()).copied().filter(|p| !targets::exists(*p)).collect();
        for pid in gone {
            self.forget_instance(pid);
            self.workers.remove(&pid);
            self.decoder.forget_pid(pid);
        }
        for pid in self.decoder.pids() {
            if !targets::exists(pid) {
                self.decoder.forget_pid(pid);
            }
        }
    }

    fn kernel_drops(&mut self) -> u64 {
        let sm = &mut self.summary;
        sm.lost_ring_full = self.probes.stat(Stat::RingFull);
        sm.lost_proc_ring_full = self.probes.stat(Stat::ProcRingFull);
        sm.lost_tracked_full = self.probes.stat(Stat::TrackedFull);
        sm.lost_exceptions_ring_full = self.probes.stat(Stat::ExceptionRingFull);
        sm.py_frames_unwound = self.probes.stat(Stat::PyFrames);
        sm.py_read_errors = self.probes.stat(Stat::PyReadErrors);
        sm.lost_calls_ring_full = self.probes.stat(Stat::CallRingFull);
        sm.calls = self.calls.stats;
        sm.lost_ring_full
            + sm.lost_proc_ring_full
            + sm.lost_tracked_full
            + sm.lost_exceptions_ring_full
            + sm.lost_calls_ring_full
    }

    /// Drops are never silent: each new loss is reported as it happens.
    fn report_new_drops(&mut self) {
        let total = self.kernel_drops();
        if total > self.last_drops {
            eprintln!(
                "observer: warning: {} records lost so far (ring full: {} requests, {} process events; tracked map full: {}); consider --ring-bytes",
                total, self.summary.lost_ring_full, self.summary.lost_proc_ring_full, self.summary.lost_tracked_full
            );
            self.last_drops = total;
        }
    }

    fn finish(&mut self) -> Result<()> {
        self.kernel_drops();
        self.summary.refused += self.probes.stat(Stat::Refused);
        self.summary.workers = self.workers_seen;
        let s = &self.summary;
        let invalid: u64 = s.invalid.values().sum();
        if s.oap_queued > 0 || s.oap_properties_sent > 0 {
            eprintln!(
                "observer: OAP: segments queued={} sent={} dropped_queue_full={} dropped_at_shutdown={} send_failures={} properties={} heartbeats={} sw8_malformed={}",
                s.oap_queued, s.oap_sent, s.oap_dropped_queue_full, s.oap_dropped_at_shutdown, s.oap_send_failures,
                s.oap_properties_sent, s.oap_heartbeats_sent, s.sw8_malformed
            );
        }
        eprintln!(
            "observer: detached. requests={} workers={} forks={} exits={} execs={} empty_connections={} | lost: ring_full={} proc_ring_full={} tracked_full={} invalid={} refused={} decode_errors={} vars_truncated={}",
            s.requests, s.workers, s.forks, s.exits, s.execs, s.empty_connections, s.lost_ring_full, s.lost_proc_ring_full,
            s.lost_tracked_full, invalid, s.refused, s.decode_errors, s.vars_truncated
        );
        if s.py_frames_unwound > 0 || s.exceptions_reported > 0 {
            let unresolved: u64 = s.exceptions_unresolved.values().sum();
            eprintln!(
                "observer: Python: frames_unwound={} tracebacks={} not_attached={} {:?} | lost: ring_full={} read_errors={}",
                s.py_frames_unwound, s.exceptions_reported, unresolved, s.exceptions_unresolved,
                s.lost_exceptions_ring_full, s.py_read_errors
            );
        }
        if s.calls.exit_calls > 0 || s.lost_calls_ring_full > 0 {
            eprintln!(
                "observer: calls: exit_spans={} outside_requests={} async_unattributed={} | lost: ring_full={}",
                s.calls.exit_calls,
                s.calls.calls_outside_requests,
                s.calls.calls_async_unattributed,
                s.lost_calls_ring_full
            );
        }
        for f in self.probes.attached_files() {
            log::debug!("detaching uprobe from {f}");
        }
        if self.printer.format() == Format::Json {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, &self.summary)?;
            out.write_all(b"\n")?;
        }
        if let Some(path) = &self.summary_file {
            let text = serde_json::to_string(&self.summary)?;
            std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// Service name, instance base and component for one uWSGI instance, and where the
/// service name came from.
fn span_config(root: u32, opts: &Options) -> (spans::SpanConfig, &'static str) {
    let env = targets::environ(root);
    let (service, source) = if let Some(s) = &opts.service {
        (s.clone(), "--service")
    } else if let Some(s) = targets::environ_var(&env, "SW_AGENT_NAME") {
        (s, "SW_AGENT_NAME of the target")
    } else if let Some(s) = targets::environ_var(&env, "OTEL_SERVICE_NAME") {
        (s, "OTEL_SERVICE_NAME of the target")
    } else {
        let cmdline = std::fs::read(format!("/proc/{root}/cmdline")).unwrap_or_default();
        match targets::service_from_cmdline(&cmdline) {
            Some(s) => (s, "the app named on uWSGI's command line"),
            None => ("uwsgi".to_string(), "default"),
        }
    };
    let component = opts.component.unwrap_or_else(|| {
        if targets::environ_var(&env, "DJANGO_SETTINGS_MODULE").is_some() {
            spans::COMPONENT_DJANGO
        } else if targets::environ_var(&env, "FLASK_APP").is_some() {
            spans::COMPONENT_FLASK
        } else {
            spans::COMPONENT_PYTHON
        }
    });
    let cfg = spans::SpanConfig {
        service: spans::cut(&service, spans::SERVICE_MAX),
        instance_base: hostname(),
        component,
        error_status: opts.error_status,
    };
    (cfg, source)
}

/// Calls (and exception records) not claimed by a request within this long are dropped.
const CALL_MAX_AGE_NS: u64 = 60_000_000_000;

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: plain libc call writing our local.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

fn wall_minus_monotonic_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// What the agents report about an instance, plus where the data comes from.
fn instance_properties(pid: u32, master: u32, uwsgi_version: &str) -> Vec<(String, String)> {
    let mut p = vec![
        ("language".to_string(), "python".to_string()),
        ("OS Name".into(), "Linux".into()),
        ("Process No.".into(), pid.to_string()),
        ("hostname".into(), hostname()),
    ];
    for ip in export::ipv4_addresses() {
        p.push(("ipv4".into(), ip));
    }
    if let Some(v) = targets::python_version(pid) {
        p.push(("python_version".into(), v));
    }
    p.push(("uwsgi_version".into(), uwsgi_version.to_string()));
    p.push(("uwsgi_master_pid".into(), master.to_string()));
    p.push(("observer".into(), format!("out-of-process eBPF observer {}", env!("CARGO_PKG_VERSION"))));
    p
}

struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

/// Newtype so the ring buffer can sit in an AsyncFd.
struct RingFd(RingBuf<MapData>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}
