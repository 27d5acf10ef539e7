//! A SkyWalking OAP stand-in for tests: a real tonic gRPC server on the OAP's services that
//! records everything it receives. It can be stopped and started again on the same port
//! (to simulate an outage) while keeping what it recorded.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Instant,
};

use observer_proto::v3::{
    management_service_server::{ManagementService, ManagementServiceServer},
    trace_segment_report_service_server::{TraceSegmentReportService, TraceSegmentReportServiceServer},
    Commands, InstancePingPkg, InstanceProperties, SegmentCollection, SegmentObject,
};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

#[derive(Default)]
pub struct Recorded {
    pub segments: Vec<SegmentObject>,
    pub properties: Vec<InstanceProperties>,
    pub pings: Vec<(InstancePingPkg, Instant)>,
    /// The `authentication` metadata of every call, in order.
    pub auth: Vec<Option<String>>,
}

#[derive(Clone, Default)]
pub struct Store(pub Arc<Mutex<Recorded>>);

impl Store {
    pub fn segments(&self) -> Vec<SegmentObject> {
        self.0.lock().unwrap().segments.clone()
    }
    pub fn segment_count(&self) -> usize {
        self.0.lock().unwrap().segments.len()
    }
    pub fn properties(&self) -> Vec<InstanceProperties> {
        self.0.lock().unwrap().properties.clone()
    }
    pub fn pings(&self) -> Vec<(InstancePingPkg, Instant)> {
        self.0.lock().unwrap().pings.clone()
    }
    pub fn auth(&self) -> Vec<Option<String>> {
        self.0.lock().unwrap().auth.clone()
    }
    fn note_auth<T>(&self, r: &Request<T>) {
        let v = r.metadata().get("authentication").and_then(|v| v.to_str().ok()).map(String::from);
        self.0.lock().unwrap().auth.push(v);
    }
}

#[tonic::async_trait]
impl TraceSegmentReportService for Store {
    async fn collect(&self, req: Request<Streaming<SegmentObject>>) -> Result<Response<Commands>, Status> {
        self.note_auth(&req);
        let mut s = req.into_inner();
        while let Some(seg) = s.next().await {
            self.0.lock().unwrap().segments.push(seg?);
        }
        Ok(Response::new(Commands::default()))
    }

    async fn collect_in_sync(&self, req: Request<SegmentCollection>) -> Result<Response<Commands>, Status> {
        self.note_auth(&req);
        self.0.lock().unwrap().segments.extend(req.into_inner().segments);
        Ok(Response::new(Commands::default()))
    }
}

#[tonic::async_trait]
impl ManagementService for Store {
    async fn report_instance_properties(&self, req: Request<InstanceProperties>) -> Result<Response<Commands>, Status> {
        self.note_auth(&req);
        self.0.lock().unwrap().properties.push(req.into_inner());
        Ok(Response::new(Commands::default()))
    }

    async fn keep_alive(&self, req: Request<InstancePingPkg>) -> Result<Response<Commands>, Status> {
        self.note_auth(&req);
        self.0.lock().unwrap().pings.push((req.into_inner(), Instant::now()));
        Ok(Response::new(Commands::default()))
    }
}

type Shutdown = tokio::sync::oneshot::Sender<()>;

/// The server, running on its own thread and runtime.
pub struct Receiver {
    pub store: Store,
    pub port: u16,
    /// PEM certificate and key: serve over TLS.
    tls: Option<(Vec<u8>, Vec<u8>)>,
    /// PEM CA: require client certificates signed by it (mutual TLS).
    client_ca: Option<Vec<u8>>,
    running: Option<(Shutdown, std::thread::JoinHandle<()>)>,
}

impl Receiver {
    pub fn start() -> Receiver {
        Self::start_on(crate::free_port())
    }

    pub fn start_on(port: u16) -> Receiver {
        let mut r = Receiver { store: Store::default(), port, tls: None, client_ca: None, running: None };
        r.resume();
        r
    }

    /// Serves over TLS with this PEM certificate and key.
    pub fn start_tls(cert: Vec<u8>, key: Vec<u8>) -> Receiver {
        Self::start_mtls(cert, key, None)
    }

    /// TLS, and with `client_ca` only clients presenting a certificate it signed.
    pub fn start_mtls(cert: Vec<u8>, key: Vec<u8>, client_ca: Option<Vec<u8>>) -> Receiver {
        let mut r = Receiver {
            store: Store::default(),
            port: crate::free_port(),
            tls: Some((cert, key)),
            client_ca,
            running: None,
        };
        r.resume();
        r
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts serving (again) on the same port, with the same store.
    pub fn resume(&mut self) {
        assert!(self.running.is_none());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let store = self.store.clone();
        let tls = self.tls.clone();
        let client_ca = self.client_ca.clone();
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = loop {
                    match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => break l,
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                    }
                };
                ready_tx.send(()).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let shutdown: Pin<Box<dyn std::future::Future<Output = ()> + Send>> = Box::pin(async move {
                    let _ = rx.await;
                });
                let mut builder = tonic::transport::Server::builder();
                if let Some((cert, key)) = tls {
                    let id = tonic::transport::Identity::from_pem(cert, key);
                    let mut cfg = tonic::transport::ServerTlsConfig::new().identity(id);
                    if let Some(ca) = client_ca {
                        cfg = cfg.client_ca_root(tonic::transport::Certificate::from_pem(ca));
                    }
                    builder = builder.tls_config(cfg).unwrap();
                }
                builder
                    .add_service(TraceSegmentReportServiceServer::new(store.clone()))
                    .add_service(ManagementServiceServer::new(store))
                    .serve_with_incoming_shutdown(incoming, shutdown)
                    .await
                    .unwrap();
            });
        });
        ready_rx.recv().unwrap();
        self.running = Some((tx, h));
    }

    /// Stops serving (gracefully: calls in progress complete); the port refuses connections.
    pub fn pause(&mut self) {
        if let Some((tx, h)) = self.running.take() {
            let _ = tx.send(());
            let _ = h.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.pause();
    }
}
