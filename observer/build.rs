use anyhow::anyhow;
use aya_build::{Package, Toolchain};

/// The eBPF crate needs a nightly whose LLVM matches bpf-linker's (LLVM 22 here; see
/// xtask/src/setup.rs, which installs both). Override with OBSERVER_EBPF_TOOLCHAIN.
const EBPF_TOOLCHAIN: &str = "nightly-2026-08-05";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=OBSERVER_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("OBSERVER_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.into());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("observer-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [Package { name: "observer-ebpf", root_dir: root, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
}
