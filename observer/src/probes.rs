//! Stage 2: check the host, load the eBPF programs, attach tracepoints and uprobes, and keep
//! the in-kernel TRACKED map in step with the processes we observe.

use std::{
    collections::HashMap as StdHashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};
use observer_common::*;

use crate::{
    python::{PyTarget, DISPLAY_SYMBOL, TRACEBACK_SYMBOL},
    targets::{ProbeTarget, HANDLER_SYMBOL},
};

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Fails with a one-line reason unless we may load eBPF programs and read other processes.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_PERFMON: u64 = 1 << 38;
    const CAP_BPF: u64 = 1 << 39;
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    let bpf = cap_eff & CAP_SYS_ADMIN != 0 || (cap_eff & CAP_BPF != 0 && cap_eff & CAP_PERFMON != 0);
    if !bpf || cap_eff & CAP_SYS_PTRACE == 0 {
        bail!(
            "not enough privilege: run as root (sudo observer ...) or grant CAP_BPF, CAP_PERFMON, \
             CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
        );
    }
    Ok(())
}

pub fn check_btf() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!("kernel BTF not found at /sys/kernel/btf/vmlinux: this kernel needs CONFIG_DEBUG_INFO_BTF=y");
    }
    Ok(())
}

/// Finds tracefs, mounting it at /sys/kernel/tracing when nothing is mounted (as root may).
pub fn ensure_tracefs() -> Result<PathBuf> {
    for d in TRACEFS_DIRS {
        if Path::new(d).join("events").is_dir() {
            return Ok(PathBuf::from(d));
        }
    }
    let target = TRACEFS_DIRS[0];
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", target])
        .stderr(std::process::Stdio::null())
        .status();
    if matches!(status, Ok(s) if s.success()) && Path::new(target).join("events").is_dir() {
        log::info!("mounted tracefs at {target}");
        return Ok(PathBuf::from(target));
    }
    bail!("tracefs is not mounted and could not be mounted: run `mount -t tracefs nodev {target}`")
}

/// Offset of a field in a tracepoint record, from its `format` file text.
pub fn format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        let name = decl.split_whitespace().last()?;
        if name.trim_start_matches('*') != field {
            return None;
        }
        l.split(';').find_map(|p| p.trim().strip_prefix("offset:")?.parse().ok())
    })
}

fn tp_config(tracefs: &Path) -> Result<TpConfig> {
    let read = |ev: &str| {
        let p = tracefs.join("events").join(ev).join("format");
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let newtask = read("task/task_newtask")?;
    let exit = read("sched/sched_process_exit")?;
    let need = |fmt: &str, f: &str, ev: &str| {
        format_offset(fmt, f).with_context(|| format!("tracepoint {ev} has no field {f}"))
    };
    Ok(TpConfig {
        newtask_pid: need(&newtask, "pid", "task_newtask")?,
        newtask_flags: need(&newtask, "clone_flags", "task_newtask")?,
        exit_group_dead: format_offset(&exit, "group_dead").unwrap_or(u32::MAX),
        _pad: 0,
    })
}

/// The exception probes, per process: (program, libpython function).
const PY_PROBES: [(&str, &str); 2] = [("py_traceback", TRACEBACK_SYMBOL), ("py_display", DISPLAY_SYMBOL)];

/// Outbound-call tracepoints: (program, syscalls/<event>).
const SYSCALL_TPS: [(&str, &str); 4] = [
    ("sys_connect", "sys_enter_connect"),
    ("sys_sendto", "sys_enter_sendto"),
    ("sys_recvfrom", "sys_enter_recvfrom"),
    ("sys_recvfrom_exit", "sys_exit_recvfrom"),
];

/// The eBPF side reads syscall arguments as 8-byte slots from offset 16 and `ret` at 16:
/// check this kernel agrees.
fn check_syscall_formats(tracefs: &Path) -> Result<()> {
    let want: [(&str, &[(&str, u32)]); 4] = [
        ("sys_enter_connect", &[("fd", 16), ("uservaddr", 24), ("addrlen", 32)]),
        ("sys_enter_sendto", &[("fd", 16), ("buff", 24), ("len", 32)]),
        ("sys_enter_recvfrom", &[("fd", 16), ("ubuf", 24)]),
        ("sys_exit_recvfrom", &[("ret", 16)]),
    ];
    for (ev, fields) in want {
        let p = tracefs.join("events/syscalls").join(ev).join("format");
        let fmt = fs::read_to_string(&p)
            .with_context(|| format!("reading {} (needed for exit spans; --no-exit-spans to skip)", p.display()))?;
        for (f, off) in fields {
            if format_offset(&fmt, f) != Some(*off) {
                bail!("tracepoint syscalls/{ev}: field {f} is not at offset {off} on this kernel; run with --no-exit-spans");
            }
        }
    }
    Ok(())
}

pub struct Probes {
    ebpf: Ebpf,
    tracked: HashMap<MapData, u32, Tracked>,
    layouts: Array<MapData, ReqLayout>,
    stats: PerCpuArray<MapData, u64>,
    /// (dev, inode) of each file we put the uprobe in.
    attached: StdHashMap<(u64, u64), String>,
    layout_slots: Vec<ReqLayout>,
    pylayouts: Array<MapData, PyLayout>,
    py_slots: Vec<PyLayout>,
    /// Interpreter libraries carrying the exception probes, by (dev, ino), with their links.
    py_files: StdHashMap<(u64, u64), Vec<(&'static str, UProbeLinkId)>>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Probes {
    /// Loads the programs and attaches the process-tree tracepoints.
    pub fn load(ring_bytes: u32, tracefs: &Path, exit_spans: bool) -> Result<(Self, RingBuf<MapData>)> {
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
        let rl = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain syscall with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) };

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_EVENTS, ring_bytes)
            .load(EBPF_OBJECT)
            .context("loading the eBPF programs")?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();

        let cfg = tp_config(tracefs)?;
        let mut tpc: Array<_, TpConfig> = Array::try_from(ebpf.take_map(MAP_TPCONFIG).context("map TPCONFIG")?)?;
        tpc.set(0, &cfg, 0).context("writing TPCONFIG")?;

        for (prog, cat, name) in [
            ("task_newtask", "task", "task_newtask"),
            ("process_exit", "sched", "sched_process_exit"),
            ("process_exec", "sched", "sched_process_exec"),
        ] {
            let p: &mut TracePoint = ebpf.program_mut(prog).context(prog)?.try_into()?;
            p.load().with_context(|| format!("loading {prog}"))?;
            p.attach(cat, name).with_context(|| format!("attaching tracepoint {cat}/{name}"))?;
        }
        if exit_spans {
            check_syscall_formats(tracefs)?;
            for (prog, name) in SYSCALL_TPS {
                let p: &mut TracePoint = ebpf.program_mut(prog).context(prog)?.try_into()?;
                p.load().with_context(|| format!("loading {prog}"))?;
                p.attach("syscalls", name).with_context(|| format!("attaching tracepoint syscalls/{name}"))?;
            }
        }
        let up: &mut UProbe = ebpf.program_mut("after_request").context("after_request")?.try_into()?;
        up.load().context("loading the after_request uprobe")?;
        let py: &mut UProbe = ebpf.program_mut("py_traceback").context("py_traceback")?.try_into()?;
        py.load().context("loading the py_traceback uprobe")?;
        let pd: &mut UProbe = ebpf.program_mut("py_display").context("py_display")?.try_into()?;
        pd.load().context("loading the py_display uprobe")?;
        let pylayouts = Array::try_from(ebpf.take_map(MAP_PYLAYOUTS).context("map PYLAYOUTS")?)?;

        let events = RingBuf::try_from(ebpf.take_map(MAP_EVENTS).context("map EVENTS")?)?;
        let tracked = HashMap::try_from(ebpf.take_map(MAP_TRACKED).context("map TRACKED")?)?;
        let layouts = Array::try_from(ebpf.take_map(MAP_LAYOUTS).context("map LAYOUTS")?)?;
        let stats = PerCpuArray::try_from(ebpf.take_map(MAP_STATS).context("map STATS")?)?;
        // Dropping `tpc` is fine: loaded programs hold their own reference to the map.
        drop(tpc);
        Ok((
            Self {
                ebpf,
                tracked,
                layouts,
                stats,
                attached: StdHashMap::new(),
                layout_slots: Vec::new(),
                pylayouts,
                py_slots: Vec::new(),
                py_files: StdHashMap::new(),
                logger,
            },
            events,
        ))
    }

    /// Puts the request uprobe into `target`'s file (once per file; it fires for every
    /// process that maps it and the kernel filters by TRACKED) and returns its layout slot.
    pub fn attach_target(&mut self, target: &ProbeTarget) -> Result<u32> {
        if !target.layout.fits_head() {
            bail!(
                "uWSGI {} ({}): request layout reaches past the {REQ_HEAD_BYTES}-byte head the probe reads",
                target.version,
                target.display
            );
        }
        let slot = match self.layout_slots.iter().position(|l| *l == target.layout) {
            Some(i) => i as u32,
            None => {
                let i = self.layout_slots.len() as u32;
                if i >= MAX_LAYOUTS {
                    bail!("too many different uWSGI builds at once (max {MAX_LAYOUTS})");
                }
                self.layouts.set(i, &target.layout, 0).context("writing LAYOUTS")?;
                self.layout_slots.push(target.layout);
                i
            }
        };
        if !self.attached.contains_key(&(target.dev, target.ino)) {
            let up: &mut UProbe = self.ebpf.program_mut("after_request").context("after_request")?.try_into()?;
            let at = UProbeAttachLocation::SymbolOffset(HANDLER_SYMBOL, target.entry_offset);
            up.attach([at], &target.path, UProbeScope::AllProcesses)
                .with_context(|| format!("attaching uprobe {HANDLER_SYMBOL} in {}", target.display))?;
            self.attached.insert((target.dev, target.ino), target.display.clone());
        }
        Ok(slot)
    }

    /// The PYLAYOUTS slot of an interpreter's layout.
    pub fn py_slot(&mut self, t: &PyTarget) -> Result<u32> {
        let l = t.layouts.kernel;
        if let Some(i) = self.py_slots.iter().position(|x| *x == l) {
            return Ok(i as u32);
        }
        let i = self.py_slots.len() as u32;
        if i >= MAX_PYLAYOUTS {
            bail!("too many different Python versions at once (max {MAX_PYLAYOUTS})");
        }
        self.pylayouts.set(i, &l, 0).context("writing PYLAYOUTS")?;
        self.py_slots.push(l);
        Ok(i)
    }

    /// Puts the exception probes on an interpreter library (once per file). They fire in
    /// every process mapping that file and return at once outside TRACKED: scoping them to
    /// pids instead would miss a new worker's first requests (forks are seen asynchronously).
    pub fn attach_python(&mut self, t: &PyTarget) -> Result<()> {
        if self.py_files.contains_key(&(t.dev, t.ino)) {
            return Ok(());
        }
        let mut links = Vec::new();
        for (prog, sym) in PY_PROBES {
            let up: &mut UProbe = self.ebpf.program_mut(prog).context(prog)?.try_into()?;
            match up.attach([UProbeAttachLocation::Symbol(sym)], &t.path, UProbeScope::AllProcesses) {
                Ok(id) => links.push((prog, id)),
                Err(e) => {
                    self.detach_links(links);
                    return Err(e).with_context(|| format!("attaching uprobe {sym} in {}", t.display));
                }
            }
        }
        self.py_files.insert((t.dev, t.ino), links);
        Ok(())
    }

    /// Takes the exception probes off an interpreter library (`--exceptions on-error`).
    pub fn detach_python(&mut self, t: &PyTarget) {
        if let Some(links) = self.py_files.remove(&(t.dev, t.ino)) {
            self.detach_links(links);
        }
    }

    pub fn python_attached(&self, t: &PyTarget) -> bool {
        self.py_files.contains_key(&(t.dev, t.ino))
    }

    fn detach_links(&mut self, links: Vec<(&'static str, UProbeLinkId)>) {
        for (prog, id) in links {
            if let Some(p) = self.ebpf.program_mut(prog) {
                if let Ok(up) = <&mut UProbe>::try_from(p) {
                    let _ = up.detach(id);
                }
            }
        }
    }

    pub fn track(&mut self, pid: u32, t: Tracked) -> Result<()> {
        self.tracked.insert(&pid, &t, 0).with_context(|| format!("tracking pid {pid}"))
    }

    pub fn untrack(&mut self, pid: u32) {
        let _ = self.tracked.remove(&pid);
    }

    pub fn tracked(&self, pid: u32) -> Option<Tracked> {
        self.tracked.get(&pid, 0).ok()
    }

    /// All pids in TRACKED.
    pub fn tracked_pids(&self) -> Vec<u32> {
        self.tracked.keys().filter_map(|k| k.ok()).collect()
    }

    /// Kernel-side counters summed over CPUs.
    pub fn stat(&self, s: Stat) -> u64 {
        self.stats.get(&(s as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn attached_files(&self) -> impl Iterator<Item = &String> {
        self.attached.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXIT_FMT: &str = "name: sched_process_exit\nID: 300\nformat:\n\
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
\tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";

    #[test]
    fn format_offsets() {
        assert_eq!(format_offset(EXIT_FMT, "pid"), Some(24));
        assert_eq!(format_offset(EXIT_FMT, "group_dead"), Some(32));
        assert_eq!(format_offset(EXIT_FMT, "comm[16]"), Some(8));
        assert_eq!(format_offset(EXIT_FMT, "prio"), None);
        assert_eq!(format_offset("", "pid"), None);
        assert_eq!(format_offset("field:int pid;\toffset:x;", "pid"), None);
        let newtask = "\tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n";
        assert_eq!(format_offset(newtask, "clone_flags"), Some(32));
    }
}
