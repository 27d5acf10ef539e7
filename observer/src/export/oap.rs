//! SkyWalking OAP exporter: segments over `TraceSegmentReportService/collect` (streamed in
//! batches), instance properties and heartbeats over `ManagementService`.
//!
//! The queue is bounded by count and bytes. While the OAP is down or slow, segments wait
//! (retry with backoff, the channel reconnects by itself); beyond the bound the oldest are
//! dropped and counted. At shutdown the queue is flushed for a bounded time; what cannot be
//! sent is counted too. Nothing is lost silently.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use observer_proto::v3::{
    management_service_client::ManagementServiceClient,
    trace_segment_report_service_client::TraceSegmentReportServiceClient, InstancePingPkg, InstanceProperties,
    KeyStringValuePair, SegmentObject,
};
use prost::Message as _;
use tokio::sync::Notify;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Clone)]
pub struct OapConfig {
    /// `host:port` of the OAP's gRPC endpoint (11800 by default on the OAP).
    pub address: String,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Sent as the `authentication` metadata, like the agents' SW_AGENT_AUTHENTICATION.
    pub token: Option<String>,
    pub queue_max: usize,
    pub queue_max_bytes: usize,
    pub batch: usize,
    /// How long a partial batch waits for more segments before it is sent.
    pub linger: Duration,
    pub heartbeat: Duration,
    /// How long a detach may wait for the queue to drain.
    pub flush_timeout: Duration,
}

/// Counters shown in the summary.
#[derive(Debug, Default)]
pub struct OapStats {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    /// Dropped because the queue was over its bound (oldest first).
    pub dropped_queue_full: AtomicU64,
    /// Still queued when the flush at shutdown ran out of time.
    pub dropped_at_shutdown: AtomicU64,
    pub send_failures: AtomicU64,
    pub properties_sent: AtomicU64,
    pub heartbeats_sent: AtomicU64,
}

struct Queue {
    items: VecDeque<(SegmentObject, usize)>,
    bytes: usize,
    /// The first `in_flight` items are being sent: they are never dropped meanwhile, so a
    /// success removes exactly them and a drop is never counted for a delivered segment.
    in_flight: usize,
}

impl Queue {
    /// Drops the oldest items not in flight until the queue is within its bounds.
    fn enforce(&mut self, max: usize, max_bytes: usize, dropped: &AtomicU64) {
        while (self.items.len() > max || self.bytes > max_bytes) && self.items.len() > self.in_flight.max(1) {
            if let Some((_, sz)) = self.items.remove(self.in_flight) {
                self.bytes -= sz;
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A worker reported as a service instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub service: String,
    pub name: String,
    pub properties: Vec<(String, String)>,
}

struct InstanceState {
    inst: Instance,
    properties_sent: bool,
    pings: u64,
}

struct Shared {
    cfg: OapConfig,
    queue: Mutex<Queue>,
    wake: Notify,
    closing: AtomicBool,
    stats: OapStats,
    instances: Mutex<HashMap<String, InstanceState>>,
}

pub struct Oap {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

fn endpoint(cfg: &OapConfig) -> Result<Endpoint> {
    let tls = cfg.tls_ca.is_some() || cfg.tls_cert.is_some();
    let scheme = if tls { "https" } else { "http" };
    let mut ep = Endpoint::from_shared(format!("{scheme}://{}", cfg.address))
        .with_context(|| format!("bad OAP address {:?}", cfg.address))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10));
    if tls {
        let mut t = ClientTlsConfig::new();
        if let Some(ca) = &cfg.tls_ca {
            let pem = std::fs::read(ca).with_context(|| format!("reading CA file {}", ca.display()))?;
            t = t.ca_certificate(Certificate::from_pem(pem));
        }
        match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => {
                let cert = std::fs::read(c).with_context(|| format!("reading client cert {}", c.display()))?;
                let key = std::fs::read(k).with_context(|| format!("reading client key {}", k.display()))?;
                t = t.identity(Identity::from_pem(cert, key));
            }
            (None, None) => {}
            _ => anyhow::bail!("a TLS client certificate needs both --oap-tls-cert and --oap-tls-key"),
        }
        ep = ep.tls_config(t).context("TLS configuration")?;
    }
    Ok(ep)
}

impl Oap {
    /// Starts the sender task. The connection is made lazily and re-made by itself.
    pub fn start(cfg: OapConfig) -> Result<Oap> {
        let channel = endpoint(&cfg)?.connect_lazy();
        let shared = Arc::new(Shared {
            cfg,
            queue: Mutex::new(Queue { items: VecDeque::new(), bytes: 0, in_flight: 0 }),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            stats: OapStats::default(),
            instances: Mutex::new(HashMap::new()),
        });
        let task = tokio::spawn(run(shared.clone(), channel));
        Ok(Oap { shared, task })
    }

    pub fn stats(&self) -> &OapStats {
        &self.shared.stats
    }

    /// Queues a segment; drops the oldest ones beyond the bound (counted).
    pub fn push(&self, seg: SegmentObject) {
        let size = seg.encoded_len();
        let s = &self.shared;
        {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.items.push_back((seg, size));
            q.bytes += size;
            q.enforce(s.cfg.queue_max, s.cfg.queue_max_bytes, &s.stats.dropped_queue_full);
        }
        s.stats.queued.fetch_add(1, Ordering::Relaxed);
        s.wake.notify_one();
    }

    /// Starts reporting an instance (properties now, then heartbeats).
    pub fn add_instance(&self, inst: Instance) {
        let mut m = self.shared.instances.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(inst.name.clone()).or_insert(InstanceState { inst, properties_sent: false, pings: 0 });
        drop(m);
        self.shared.wake.notify_one();
    }

    /// Stops heartbeats for an instance whose worker is gone.
    pub fn remove_instance(&self, name: &str) {
        self.shared.instances.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// Flushes what is queued (bounded by `flush_timeout`), stops, and copies the counters.
    pub async fn shutdown_into(self, sum: &mut crate::Summary) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
        let _ = tokio::time::timeout(self.shared.cfg.flush_timeout + Duration::from_secs(1), self.task).await;
        let left = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner()).items.len();
        let st = &self.shared.stats;
        st.dropped_at_shutdown.fetch_add(left as u64, Ordering::Relaxed);
        sum.oap_queued = st.queued.load(Ordering::Relaxed);
        sum.oap_sent = st.sent.load(Ordering::Relaxed);
        sum.oap_dropped_queue_full = st.dropped_queue_full.load(Ordering::Relaxed);
        sum.oap_dropped_at_shutdown = st.dropped_at_shutdown.load(Ordering::Relaxed);
        sum.oap_send_failures = st.send_failures.load(Ordering::Relaxed);
        sum.oap_properties_sent = st.properties_sent.load(Ordering::Relaxed);
        sum.oap_heartbeats_sent = st.heartbeats_sent.load(Ordering::Relaxed);
    }
}

fn request<T>(msg: T, token: &Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        if let Ok(v) = t.parse() {
            r.metadata_mut().insert("authentication", v);
        }
    }
    r
}

async fn run(s: Arc<Shared>, channel: Channel) {
    let mut traces = TraceSegmentReportServiceClient::new(channel.clone());
    let mut mgmt = ManagementServiceClient::new(channel);
    let mut backoff = Duration::from_millis(100);
    let mut next_ping = tokio::time::Instant::now();
    let mut flush_deadline: Option<tokio::time::Instant> = None;
    // The last failure told to the user: each new kind of failure, and the recovery, are
    // printed once, not per retry.
    let mut last_error: Option<String> = None;
    loop {
        let closing = s.closing.load(Ordering::SeqCst);
        if closing && flush_deadline.is_none() {
            flush_deadline = Some(tokio::time::Instant::now() + s.cfg.flush_timeout);
        }
        let now = tokio::time::Instant::now();
        if !closing && now >= next_ping {
            heartbeat(&s, &mut mgmt).await;
            next_ping = now + s.cfg.heartbeat;
        } else if !closing {
            send_new_properties(&s, &mut mgmt).await;
        }

        // One collect call per segment would cost more than the segment: let a partial
        // batch fill for a moment (not when closing).
        let pending = s.queue.lock().unwrap_or_else(|e| e.into_inner()).items.len();
        if !closing && pending > 0 && pending < s.cfg.batch {
            tokio::time::sleep(s.cfg.linger).await;
        }
        let batch: Vec<SegmentObject> = {
            let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
            let b: Vec<SegmentObject> = q.items.iter().take(s.cfg.batch).map(|(seg, _)| seg.clone()).collect();
            q.in_flight = b.len();
            b
        };
        if batch.is_empty() {
            if closing {
                return;
            }
            tokio::select! {
                _ = s.wake.notified() => {}
                _ = tokio::time::sleep_until(next_ping) => {}
            }
            continue;
        }
        let n = batch.len();
        let stream = tokio_stream::iter(batch);
        let mut req = request(stream, &s.cfg.token);
        if let Some(d) = flush_deadline {
            // While flushing at detach, never outlive the flush budget.
            req.set_timeout(d.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(10)));
        }
        match traces.collect(req).await {
            Ok(_) => {
                let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                for _ in 0..n {
                    if let Some((_, sz)) = q.items.pop_front() {
                        q.bytes -= sz;
                    }
                }
                q.in_flight = 0;
                q.enforce(s.cfg.queue_max, s.cfg.queue_max_bytes, &s.stats.dropped_queue_full);
                drop(q);
                s.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                if last_error.take().is_some() {
                    eprintln!("observer: OAP {} reachable again; queued segments are being sent", s.cfg.address);
                }
            }
            Err(e) => {
                {
                    let mut q = s.queue.lock().unwrap_or_else(|e| e.into_inner());
                    q.in_flight = 0;
                    q.enforce(s.cfg.queue_max, s.cfg.queue_max_bytes, &s.stats.dropped_queue_full);
                }
                s.stats.send_failures.fetch_add(1, Ordering::Relaxed);
                let msg = e.message().to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    eprintln!(
                        "observer: warning: OAP {} unreachable ({msg}); segments wait in the queue (bound {}) and are retried",
                        s.cfg.address, s.cfg.queue_max
                    );
                    last_error = Some(msg);
                }
                log::debug!("OAP collect failed: {e}");
                if let Some(d) = flush_deadline {
                    if tokio::time::Instant::now() >= d {
                        return;
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        if let Some(d) = flush_deadline {
            if tokio::time::Instant::now() >= d {
                return;
            }
        }
    }
}

fn props_msg(i: &Instance) -> InstanceProperties {
    InstanceProperties {
        service: i.service.clone(),
        service_instance: i.name.clone(),
        properties: i.properties.iter().map(|(k, v)| KeyStringValuePair { key: k.clone(), value: v.clone() }).collect(),
        layer: String::new(),
    }
}

async fn send_new_properties(s: &Shared, mgmt: &mut ManagementServiceClient<Channel>) {
    let pending: Vec<Instance> = {
        let m = s.instances.lock().unwrap_or_else(|e| e.into_inner());
        m.values().filter(|st| !st.properties_sent).map(|st| st.inst.clone()).collect()
    };
    for inst in pending {
        if mgmt.report_instance_properties(request(props_msg(&inst), &s.cfg.token)).await.is_ok() {
            s.stats.properties_sent.fetch_add(1, Ordering::Relaxed);
            if let Some(st) = s.instances.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&inst.name) {
                st.properties_sent = true;
            }
        }
    }
}

/// keepAlive for every live instance; properties again on every 10th beat, as the agents do.
async fn heartbeat(s: &Shared, mgmt: &mut ManagementServiceClient<Channel>) {
    send_new_properties(s, mgmt).await;
    let live: Vec<(Instance, u64)> = {
        let mut m = s.instances.lock().unwrap_or_else(|e| e.into_inner());
        m.values_mut()
            .map(|st| {
                st.pings += 1;
                (st.inst.clone(), st.pings)
            })
            .collect()
    };
    for (inst, n) in live {
        if n % 10 == 0 {
            let _ = mgmt.report_instance_properties(request(props_msg(&inst), &s.cfg.token)).await;
        }
        let ping = InstancePingPkg {
            service: inst.service.clone(),
            service_instance: inst.name.clone(),
            layer: String::new(),
        };
        if mgmt.keep_alive(request(ping, &s.cfg.token)).await.is_ok() {
            s.stats.heartbeats_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}
