use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use observer::{
    export::{oap::OapConfig, Format},
    spans, Options,
};

#[derive(Clone, Copy, ValueEnum)]
enum Framework {
    Flask,
    Django,
    Python,
}

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
        /// Report to a SkyWalking OAP at HOST:PORT (its gRPC port, 11800 by default).
        #[arg(long, value_name = "HOST:PORT")]
        oap: Option<String>,
        /// Service name (default: the target's SW_AGENT_NAME or OTEL_SERVICE_NAME, else the
        /// app named on uWSGI's command line).
        #[arg(long)]
        service: Option<String>,
        /// Framework of the app, for the entry spans' component id (default: detected from
        /// the target's environment, else python).
        #[arg(long, value_enum)]
        framework: Option<Framework>,
        /// Statuses at or above this mark a span as an error.
        #[arg(long, default_value_t = 400)]
        error_status: u16,
        /// Authentication token for the OAP (the agents' SW_AGENT_AUTHENTICATION).
        #[arg(long, env = "SW_AGENT_AUTHENTICATION", hide_env_values = true)]
        oap_token: Option<String>,
        /// CA certificate (PEM) to reach the OAP over TLS.
        #[arg(long, value_name = "PEM")]
        oap_tls_ca: Option<PathBuf>,
        /// Client certificate (PEM) for mutual TLS, with --oap-tls-key.
        #[arg(long, value_name = "PEM")]
        oap_tls_cert: Option<PathBuf>,
        #[arg(long, value_name = "PEM")]
        oap_tls_key: Option<PathBuf>,
        /// Segments kept while the OAP is unreachable; the oldest beyond are dropped (counted).
        #[arg(long, default_value_t = 10_000)]
        queue_max: usize,
        /// Bytes kept while the OAP is unreachable.
        #[arg(long, default_value_t = 32 << 20)]
        queue_max_bytes: usize,
        /// Seconds between instance heartbeats.
        #[arg(long, default_value_t = 30)]
        heartbeat_secs: u64,
        /// Seconds a detach may spend sending what is still queued.
        #[arg(long, default_value_t = 5)]
        flush_secs: u64,
        /// Also write the detach summary (JSON) to this file.
        #[arg(long, value_name = "FILE")]
        summary_file: Option<PathBuf>,
        /// Do not follow outbound calls (HTTP, Redis, PostgreSQL, MySQL) into Exit spans
        /// (their syscall tracepoints then stay detached).
        #[arg(long)]
        no_exit_spans: bool,
        /// When to read the Python exception behind a failed request: `always`; `on-error`
        /// (probes on from the first 5xx until a minute without one: a healthy app pays
        /// nothing, the first failure of a burst has no traceback); `off`.
        #[arg(long, value_enum, default_value = "always")]
        exceptions: observer::ExceptionMode,
        /// Same as `--exceptions off`.
        #[arg(long)]
        no_exceptions: bool,
        /// Keep literal values in db.statement (by default they are replaced with `?`).
        #[arg(long)]
        sql_literals: bool,
        /// Testing aid: shift every struct offset by this many bytes, to prove that a wrong
        /// layout is detected on live data and the target refused.
        #[arg(long, hide = true, default_value_t = 0)]
        layout_shift: u32,
        /// Testing aid: shift the CPython frame's code-object offset, to prove that wrong
        /// interpreter offsets never give a traceback (they are detected and turned off).
        #[arg(long, hide = true, default_value_t = 0)]
        py_layout_shift: u32,
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
    let Cmd::Attach {
        pids,
        pidfiles,
        format,
        drop_headers,
        ring_bytes,
        layout_shift,
        py_layout_shift,
        oap,
        service,
        framework,
        error_status,
        oap_token,
        oap_tls_ca,
        oap_tls_cert,
        oap_tls_key,
        queue_max,
        queue_max_bytes,
        heartbeat_secs,
        flush_secs,
        summary_file,
        no_exit_spans,
        exceptions,
        no_exceptions,
        sql_literals,
    } = cli.cmd;
    let oap = oap.map(|address| OapConfig {
        address,
        tls_ca: oap_tls_ca,
        tls_cert: oap_tls_cert,
        tls_key: oap_tls_key,
        token: oap_token,
        queue_max: queue_max.max(1),
        queue_max_bytes,
        batch: 1000,
        linger: Duration::from_millis(200),
        heartbeat: Duration::from_secs(heartbeat_secs.max(1)),
        flush_timeout: Duration::from_secs(flush_secs),
    });
    let component = framework.map(|f| match f {
        Framework::Flask => spans::COMPONENT_FLASK,
        Framework::Django => spans::COMPONENT_DJANGO,
        Framework::Python => spans::COMPONENT_PYTHON,
    });
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("observer: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(observer::attach(Options {
        pids,
        pidfiles,
        format,
        drop_headers,
        ring_bytes,
        layout_shift,
        py_layout_shift,
        oap,
        service,
        component,
        error_status,
        summary_file,
        exit_spans: !no_exit_spans,
        exceptions: if no_exceptions { observer::ExceptionMode::Off } else { exceptions },
        sql_literals,
    })) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("observer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
