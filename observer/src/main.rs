use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use observer::{export::Format, Options};

#[derive(Parser)]
#[command(name = "observer", version, about = "Observe a running uWSGI Python service from outside, with eBPF")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to a running uWSGI instance and print one record per request until Ctrl-C.
    Attach {
        /// Any pid of the uWSGI instance (master, worker, router or mule). Repeatable.
        #[arg(long = "pid")]
        pids: Vec<u32>,
        /// uWSGI's own pidfile (`--pidfile`). Repeatable.
        #[arg(long = "pidfile")]
        pidfiles: Vec<PathBuf>,
        /// Output: a human line per request, or one JSON object per line.
        #[arg(long, value_enum, default_value = "console")]
        format: Format,
        /// A request header never to keep (Authorization and Cookie are always dropped). Repeatable.
        #[arg(long = "drop-header", value_name = "NAME")]
        drop_headers: Vec<String>,
        /// Kernel ring-buffer size in bytes (power of two, at least one page).
        #[arg(long, default_value_t = observer_common::DEFAULT_RING_BYTES, value_parser = ring_size)]
        ring_bytes: u32,
        /// Testing aid: shift every struct offset by this many bytes, to prove that a wrong
        /// layout is detected on live data and the target refused.
        #[arg(long, hide = true, default_value_t = 0)]
        layout_shift: u32,
    },
}

fn ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err("must be a power of two of at least 4096".into());
    }
    Ok(n)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let Cmd::Attach { pids, pidfiles, format, drop_headers, ring_bytes, layout_shift } = cli.cmd;
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("observer: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(observer::attach(Options { pids, pidfiles, format, drop_headers, ring_bytes, layout_shift })) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
