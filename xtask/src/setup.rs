//! Idempotent setup of a fresh machine: each step checks first and installs only what is
//! missing. Facts behind the pins: ../shared/notes/ebpf-build-facts.md.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{root, run};

/// The last nightly on LLVM 22: bpf-linker must be built against the same LLVM major.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-08-05";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const APT_PACKAGES: &[&str] = &[
    // bpf-linker, built against LLVM 22
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    // Debian's own uWSGI build (stripped; the Python handler lives in a plugin .so)
    "uwsgi-core",
    "uwsgi-plugin-python3",
    "python3-flask",
    // test and demo clients
    "curl",
    "wrk",
    // a real uwsgi-protocol client for --socket modes
    "nginx-light",
    // the detach test lists loaded eBPF programs
    "bpftool",
    // backends of the exit-span tests (tests/src/backends.rs starts private instances on free
    // ports; the system services are never started, see apt())
    "redis-server",
    "postgresql",
    "mariadb-server",
];
pub const UWSGI_VERSION: &str = "2.0.31";
const PY_PACKAGES: &[&str] = &[
    "uwsgi==2.0.31",
    "flask==3.1.3",
    "gevent==26.9.0",
    "apache-skywalking==1.2.0",
    // outbound clients of tests/apps/calls_app.py, and Django for tests/apps/django_app.py
    "requests==2.34.2",
    "redis==8.1.0",
    "psycopg2-binary==2.9.13",
    "PyMySQL==1.2.4",
    "Django==5.2.19",
];
/// What python() imports to decide whether the venv is complete.
const PY_IMPORTS: &str =
    "import flask, gevent, skywalking.protocol.language_agent.Tracing_pb2, requests, redis, psycopg2, pymysql, django";

pub fn venv() -> PathBuf {
    std::env::var_os("OBSERVER_VENV").map(PathBuf::from).unwrap_or_else(|| root().join(".venv"))
}

pub fn all() -> Result<()> {
    apt()?;
    toolchain()?;
    bpf_linker()?;
    python()?;
    other_pythons()?;
    tracefs()?;
    Ok(())
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run as root (sudo ./x ...) so setup can install them");
    }
    println!("== setup: apt-get install {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    // Packages such as nginx, redis-server, postgresql and mariadb-server start a system
    // service on install; tests start their own instances, so forbid service starts during the
    // install (policy-rc.d exit 101: invoke-rc.d and, under systemd, deb-systemd-invoke obey it).
    // An existing policy-rc.d (Docker images ship one that also exits 101) is left as it is.
    let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        run(Command::new("chmod").arg("755").arg(policy))?;
    }
    let r = run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    r
}

fn toolchain() -> Result<()> {
    let out = Command::new("rustup").args(["toolchain", "list"]).output().context("running rustup")?;
    let have = String::from_utf8_lossy(&out.stdout).contains(EBPF_TOOLCHAIN);
    let src = Command::new("rustup")
        .args(["+".to_string() + EBPF_TOOLCHAIN, "component".into(), "list".into(), "--installed".into()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
        .unwrap_or(false);
    if have && src {
        return Ok(());
    }
    println!("== setup: rustup toolchain {EBPF_TOOLCHAIN} with rust-src (for the eBPF crate)");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        EBPF_TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn bpf_linker() -> Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    println!("== setup: cargo install bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
}

/// CPython minor versions besides the main venv's 3.11 that the exception layouts cover.
pub const OTHER_PYTHONS: &[&str] = &["3.8", "3.9", "3.10", "3.12", "3.13"];

/// The interpreter of a minor version, if this machine has one (pyenv's builds are shared
/// libraries with headers, which is what a pip-built uWSGI links against).
pub fn interpreter(minor: &str) -> Option<PathBuf> {
    let root = std::env::var_os("PYENV_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{minor}."))))
        .map(|p| p.join("bin").join(format!("python{minor}")))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop()
}

/// A venv with uWSGI per other CPython version found on the machine (for the exception
/// tests across versions): `.venv-py3.X`.
fn other_pythons() -> Result<()> {
    for minor in OTHER_PYTHONS {
        let Some(py) = interpreter(minor) else {
            println!("== setup: no CPython {minor} on this machine (pyenv); its exception test will say so");
            continue;
        };
        let v = root().join(format!(".venv-py{minor}"));
        let ok = Command::new(v.join("bin/uwsgi"))
            .arg("--version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == UWSGI_VERSION);
        if ok {
            continue;
        }
        println!("== setup: venv {} (CPython {minor}) with uwsgi=={UWSGI_VERSION}", v.display());
        run(Command::new(&py).arg("-m").arg("venv").arg("--clear").arg(&v))?;
        run(Command::new(v.join("bin/pip")).args(["install", "-q", &format!("uwsgi=={UWSGI_VERSION}")]))?;
    }
    Ok(())
}

fn python() -> Result<()> {
    let v = venv();
    let uwsgi = v.join("bin/uwsgi");
    let ok = Command::new(&uwsgi)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == UWSGI_VERSION)
        .unwrap_or(false)
        && Command::new(v.join("bin/python"))
            .args(["-c", PY_IMPORTS])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Ok(());
    }
    println!("== setup: Python venv at {} with {}", v.display(), PY_PACKAGES.join(" "));
    if !v.join("bin/python").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&v))?;
    }
    run(Command::new(v.join("bin/pip")).args(["install", "-q"]).args(PY_PACKAGES))
}

fn tracefs() -> Result<()> {
    for d in ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"] {
        if std::path::Path::new(d).is_dir() {
            return Ok(());
        }
    }
    if !is_root() {
        println!("== setup: tracefs is not mounted; the observer mounts it itself when run as root");
        return Ok(());
    }
    println!("== setup: mount -t tracefs nodev /sys/kernel/tracing");
    run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}
