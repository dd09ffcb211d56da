//! The page server: serves a parent node's published images to forked children over TCP.
//!
//! Blocking threads, one per connection and at most [`ServerConfig::max_connections`] of
//! them (a connection past the limit is refused `Busy`): a child's fetches are a short burst
//! of small round trips, which threads serve with the least latency, and the bound keeps a
//! flood from exhausting the node. Every read and write runs against a deadline (handshake,
//! idle, write), so a silent or trickling peer never pins a thread.
//!
//! The protocol is [`proto::pages`]'s. The server answers anything it does not expect —
//! a frame that does not decode, a frame of the wrong kind for the connection's state, a
//! read past the memory's end — with `Refused` and closes that connection, counting it in
//! the registry's [`Stats`](crate::registry::Stats); other connections carry on. Client
//! frames are at most [`MAX_REQUEST`] bytes long, so a hostile length header costs neither
//! memory nor time.
//!
//! **RDMA.** A server probes for an RDMA device when it binds ([`ServerRdma`]). An
//! authenticated child's `RdmaConnect` is answered, with a device, by registering the image
//! for remote READ (once per image, at the first request), connecting a reliable-connection
//! queue pair to the child's and sending `RdmaAccept` (queue pair and region, rkey included);
//! the connection then stays open as that queue pair's lifetime: it waits for the child's
//! next frame without an idle deadline, checks for revocation every 100 ms, and destroys the
//! queue pair when it ends. Without a device (or without the `rdma` feature) the answer is
//! `RdmaUnavailable` with the reason, and the connection keeps serving `Read`s. Both are
//! counted (`rdma_connects_ok`, `rdma_unavailable`).

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};
#[cfg(feature = "rdma")]
use proto::pages::RDMA_VERSION;
use proto::pages::{
    Frame, FrameError, HEADER_LEN, PAGE_SIZE, PROTOCOL_VERSION, QpInfo, RefuseReason, RegionInfo,
    fresh_nonce, verify_proof,
};
use proto::{ImageDescriptor, RdmaInfo};

use crate::lifecycle::{Live, Resource};
use crate::registry::{Attachment, Bucket, Entry, ImageHandle, ImageRegistry};
use crate::transport::Fallback;
use crate::wire::{Timed, deadline_after, is_timeout};

const PAGE: usize = PAGE_SIZE as usize;

/// Longest frame (kind + payload) a client may send: `Proof`, 33 bytes, rounded up. Longer
/// lengths are refused from the header alone.
pub const MAX_REQUEST: u32 = 64;

/// Largest reply buffer a connection keeps between reads.
const RETAIN_BUFFER: usize = 64 << 10;

/// How often the accept loop wakes to notice a shutdown and reap expired images.
const TICK: Duration = Duration::from_millis(100);

/// Limits of a [`PageServer`].
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Connections served at once, handshaking or not; more are refused `Busy`.
    pub max_connections: usize,
    /// From accepting a connection to the end of the handshake (`Hello` and `Proof`).
    pub handshake_timeout: Duration,
    /// Longest wait for a child's next `Read` (a child that faults rarely still holds a
    /// connection, so this is generous).
    pub idle_timeout: Duration,
    /// Longest time to write one frame to a child that does not read.
    pub write_timeout: Duration,
    /// How often [`ImageRegistry::reap`] runs.
    pub reap_interval: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            reap_interval: Duration::from_secs(1),
        }
    }
}

/// A page server's RDMA side, decided when it binds: the device it registers images on, or
/// why it has none.
pub struct ServerRdma(RdmaState);

enum RdmaState {
    #[cfg(feature = "rdma")]
    Device(crate::rdma::RdmaDevice),
    None(Fallback),
}

impl ServerRdma {
    /// Probes for a usable device (never with a build without the `rdma` feature).
    pub fn probe() -> Self {
        #[cfg(feature = "rdma")]
        let state = match crate::rdma::probe() {
            Ok(dev) => {
                tracing::info!(
                    device = dev.name(),
                    port = dev.port(),
                    "page server: images served by RDMA READ too"
                );
                RdmaState::Device(dev)
            }
            Err(why) => {
                tracing::info!("page server: no RDMA ({why}); pages over TCP only");
                RdmaState::None(Fallback::Unavailable(why))
            }
        };
        #[cfg(not(feature = "rdma"))]
        let state = RdmaState::None(Fallback::NotBuilt);
        ServerRdma(state)
    }

    /// Why this server answers `RdmaConnect` with `RdmaUnavailable`; `None` when it has a
    /// device.
    pub fn unavailable(&self) -> Option<&Fallback> {
        match &self.0 {
            RdmaState::None(why) => Some(why),
            #[cfg(feature = "rdma")]
            RdmaState::Device(_) => None,
        }
    }

    /// What a descriptor of an image of `memory_bytes` says about this server's RDMA: its
    /// device (gid, lid) and the image's length, when it has one. The region and its rkey go
    /// only to authenticated children, in `RdmaAccept`, so they are 0 here, as is the queue
    /// pair (one per child).
    pub fn advert(&self, memory_bytes: u64) -> Option<RdmaInfo> {
        match &self.0 {
            RdmaState::None(_) => {
                let _ = memory_bytes;
                None
            }
            #[cfg(feature = "rdma")]
            RdmaState::Device(dev) => Some(RdmaInfo {
                gid: dev.gid(),
                lid: dev.lid(),
                qp_num: 0,
                rkey: 0,
                remote_addr: 0,
                len: memory_bytes,
            }),
        }
    }

    /// Connects a queue pair to an authenticated child's `qp` for `entry`: ours and the
    /// region, or the reason for `RdmaUnavailable`.
    fn accept(
        &self,
        entry: &Entry,
        version: u8,
        child: &QpInfo,
    ) -> Result<(QpLink, QpInfo, RegionInfo), String> {
        let _ = (entry, version, child);
        match &self.0 {
            RdmaState::None(why) => Err(why.to_string()),
            #[cfg(feature = "rdma")]
            RdmaState::Device(dev) => {
                if version != RDMA_VERSION {
                    return Err(format!(
                        "RDMA exchange version {version} is not supported (this server speaks {RDMA_VERSION})"
                    ));
                }
                let export = entry
                    .rdma_export(dev)
                    .map_err(|e| format!("registering the image: {e}"))?;
                let (conn, local) = export
                    .accept_qp(child)
                    .map_err(|e| format!("connecting a queue pair: {e}"))?;
                let region = export.region();
                Ok((
                    QpLink {
                        _conn: conn,
                        _export: export,
                    },
                    local,
                    region,
                ))
            }
        }
    }
}

/// One child's queue pair on this server, owned by the connection that asked for it.
/// Field order is drop order: the queue pair goes before the registration it reads from.
#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
struct QpLink {
    #[cfg(feature = "rdma")]
    _conn: crate::rdma::ParentConn,
    #[cfg(feature = "rdma")]
    _export: Arc<crate::rdma::RdmaExport>,
}

/// A bound page server that is not accepting yet: [`spawn`](Self::spawn) or
/// [`run`](Self::run) it.
pub struct PageServer {
    listener: TcpListener,
    addr: SocketAddr,
    registry: Arc<ImageRegistry>,
    config: ServerConfig,
    shared: Arc<Shared>,
    rdma: Arc<ServerRdma>,
}

struct Shared {
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Open connections: a clone of the socket (to cut it at shutdown) and the thread.
    conns: Mutex<HashMap<u64, Conn>>,
}

struct Conn {
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops a [`PageServer::run`] loop from another thread.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Asks the server to stop; `run` returns within about 100 ms, after closing every
    /// connection and joining its thread.
    pub fn shutdown(&self) {
        self.0.stop.store(true, Relaxed);
    }
}

impl PageServer {
    /// Binds with the default [`ServerConfig`].
    pub fn bind(addr: impl ToSocketAddrs, registry: Arc<ImageRegistry>) -> io::Result<Self> {
        PageServer::bind_with(addr, registry, ServerConfig::default())
    }

    pub fn bind_with(
        addr: impl ToSocketAddrs,
        registry: Arc<ImageRegistry>,
        config: ServerConfig,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        // Accepts follow a poll that can be stale (the peer may have reset meanwhile).
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        Ok(PageServer {
            listener,
            addr,
            registry,
            config,
            rdma: Arc::new(ServerRdma::probe()),
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                next_id: AtomicU64::new(0),
                conns: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The address children connect to (the one for descriptors' `parent`, when bound to a
    /// specific interface).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Whether (and why not) this server serves RDMA READ.
    pub fn rdma(&self) -> &ServerRdma {
        &self.rdma
    }

    /// The descriptor of `handle` served here: [`ImageHandle::descriptor`] at this server's
    /// address, with the server's [`ServerRdma::advert`].
    pub fn descriptor(
        &self,
        handle: &ImageHandle,
        module_hash: [u8; 32],
        engine: impl Into<String>,
    ) -> ImageDescriptor {
        descriptor_at(self.addr, &self.rdma, handle, module_hash, engine)
    }

    /// Accepts on a new thread; the returned server shuts down when dropped.
    pub fn spawn(self) -> io::Result<RunningServer> {
        let addr = self.addr;
        let handle = self.shutdown_handle();
        let rdma = self.rdma.clone();
        let thread = thread::Builder::new()
            .name("pagesrv-accept".into())
            .spawn(move || self.run())?;
        Ok(RunningServer {
            addr,
            handle,
            rdma,
            thread: Some(thread),
        })
    }

    /// Accepts connections on this thread until [`ShutdownHandle::shutdown`], then closes
    /// every connection and joins its thread.
    pub fn run(self) -> io::Result<()> {
        tracing::info!(addr = %self.addr, max_connections = self.config.max_connections, "page server listening");
        let mut last_reap = Instant::now();
        let result = loop {
            if self.shared.stop.load(Relaxed) {
                break Ok(());
            }
            let mut fds = [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, TICK.as_millis() as u16) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => break Err(io::Error::from(e)),
            }
            if let Err(e) = self.accept_ready() {
                break Err(e);
            }
            if last_reap.elapsed() >= self.config.reap_interval {
                let reaped = self.registry.reap();
                if reaped > 0 {
                    tracing::debug!(reaped, "expired images reaped");
                }
                last_reap = Instant::now();
            }
        };
        self.close_all();
        tracing::info!(addr = %self.addr, "page server stopped");
        result
    }

    /// Accepts every pending connection.
    fn accept_ready(&self) -> io::Result<()> {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of fds or memory: transient, and fatal to nobody but the new peer.
                    // Back off so a listener that stays readable does not spin.
                    tracing::warn!(error = %e, "accept failed");
                    thread::sleep(TICK);
                    return Ok(());
                }
            }
        }
    }

    fn admit(&self, stream: TcpStream, peer: SocketAddr) {
        let counters = self.registry.counters();
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let mut conns = self.shared.conns();
        if conns.len() >= self.config.max_connections {
            drop(conns);
            counters.refused(Bucket::Busy);
            tracing::debug!(%peer, "refused: at the connection limit");
            let mut t = Timed::within(&stream, Duration::from_millis(100));
            let _ = proto::pages::write_frame(
                &mut t,
                &Frame::Refused {
                    reason: RefuseReason::Busy,
                    message: format!(
                        "the page server is at its limit of {} connections",
                        self.config.max_connections
                    ),
                },
            );
            let _ = stream.shutdown(Shutdown::Write);
            return;
        }
        let clone = match stream.try_clone() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot track connection; dropped");
                return;
            }
        };
        let id = self.shared.next_id.fetch_add(1, Relaxed);
        let registry = self.registry.clone();
        let shared = self.shared.clone();
        let config = self.config.clone();
        let rdma = self.rdma.clone();
        counters.connections_open.fetch_add(1, Relaxed);
        // Spawned under the lock: the thread's own removal from the map waits for its insertion.
        let spawned = thread::Builder::new()
            .name("pagesrv-conn".into())
            .spawn(move || {
                let _live = Live::new(Resource::ServerConnection);
                let _done = ConnDone {
                    id,
                    shared: &shared,
                    registry: &registry,
                };
                serve(stream, peer, &registry, &config, &rdma);
            });
        match spawned {
            Ok(thread) => {
                conns.insert(
                    id,
                    Conn {
                        stream: clone,
                        thread: Some(thread),
                    },
                );
            }
            Err(e) => {
                // The closure (and its stream) dropped with the failed spawn.
                counters.connections_open.fetch_sub(1, Relaxed);
                tracing::warn!(%peer, error = %e, "cannot spawn a connection thread");
            }
        }
    }

    fn close_all(&self) {
        let conns: Vec<Conn> = self.shared.conns().drain().map(|(_, c)| c).collect();
        for c in &conns {
            // Wakes a thread blocked on the socket; it sees end of stream and leaves.
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for mut c in conns {
            if let Some(t) = c.thread.take()
                && t.join().is_err()
            {
                tracing::error!("a page-server connection thread panicked");
            }
        }
    }
}

/// Runs when a connection thread ends, however it ends.
struct ConnDone<'a> {
    id: u64,
    shared: &'a Shared,
    registry: &'a ImageRegistry,
}

impl Drop for ConnDone<'_> {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
        self.registry
            .counters()
            .connections_open
            .fetch_sub(1, Relaxed);
    }
}

/// A page server accepting on its own thread; shuts down when dropped.
pub struct RunningServer {
    addr: SocketAddr,
    handle: ShutdownHandle,
    rdma: Arc<ServerRdma>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.handle.clone()
    }

    /// Whether (and why not) this server serves RDMA READ.
    pub fn rdma(&self) -> &ServerRdma {
        &self.rdma
    }

    /// See [`PageServer::descriptor`].
    pub fn descriptor(
        &self,
        handle: &ImageHandle,
        module_hash: [u8; 32],
        engine: impl Into<String>,
    ) -> ImageDescriptor {
        descriptor_at(self.addr, &self.rdma, handle, module_hash, engine)
    }

    /// False once the accept loop ended (shut down, or failed: the error comes from
    /// [`shutdown`](Self::shutdown)).
    pub fn is_accepting(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops accepting, closes every connection and joins all threads; returns the accept
    /// loop's error, if it failed before.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        self.handle.shutdown();
        match self.thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("the page server's accept thread panicked")),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "page server ended with an error");
        }
    }
}

fn descriptor_at(
    addr: SocketAddr,
    rdma: &ServerRdma,
    handle: &ImageHandle,
    module_hash: [u8; 32],
    engine: impl Into<String>,
) -> ImageDescriptor {
    let mut d = handle.descriptor(addr, module_hash, engine);
    d.rdma = rdma.advert(handle.memory_bytes);
    d
}

/// How a connection ended.
enum End {
    /// `Bye`, or the peer closed between frames.
    Done,
    /// Send `Refused` and close; counted in `bucket`.
    Refuse {
        bucket: Bucket,
        reason: RefuseReason,
        message: String,
    },
    /// The peer went silent past a deadline.
    TimedOut(&'static str),
    /// The connection broke; nothing more can be said on it.
    Lost(io::Error),
}

impl End {
    fn refuse(bucket: Bucket, reason: RefuseReason, message: impl Into<String>) -> End {
        End::Refuse {
            bucket,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> End {
        End::refuse(Bucket::BadRequest, RefuseReason::BadRequest, message)
    }

    fn unexpected(state: &'static str, got: &Frame) -> End {
        End::bad_request(format!("{state}: unexpected {} frame", frame_name(got)))
    }

    fn from_io(during: &'static str, e: io::Error) -> End {
        if is_timeout(&e) {
            End::TimedOut(during)
        } else {
            End::Lost(e)
        }
    }
}

pub(crate) fn frame_name(f: &Frame) -> &'static str {
    match f {
        Frame::Hello { .. } => "Hello",
        Frame::Challenge { .. } => "Challenge",
        Frame::Proof { .. } => "Proof",
        Frame::Welcome { .. } => "Welcome",
        Frame::Refused { .. } => "Refused",
        Frame::Read { .. } => "Read",
        Frame::Pages { .. } => "Pages",
        Frame::Bye => "Bye",
        Frame::MetaRequest => "MetaRequest",
        Frame::Meta { .. } => "Meta",
        Frame::RdmaConnect { .. } => "RdmaConnect",
        Frame::RdmaAccept { .. } => "RdmaAccept",
        Frame::RdmaUnavailable { .. } => "RdmaUnavailable",
    }
}

fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    registry: &Arc<ImageRegistry>,
    config: &ServerConfig,
    rdma: &ServerRdma,
) {
    let mut conn = Connection {
        stream: &stream,
        registry,
        config,
        rdma,
        out: Vec::new(),
        pages: Vec::new(),
    };
    let end = conn.run();
    let counters = registry.counters();
    match end {
        End::Done => tracing::trace!(%peer, "connection closed"),
        End::Refuse {
            bucket,
            reason,
            message,
        } => {
            counters.refused(bucket);
            tracing::debug!(%peer, ?reason, %message, "refused");
            let frame = Frame::Refused { reason, message };
            let mut t = Timed::within(&stream, config.write_timeout);
            if let Err(e) = proto::pages::write_frame(&mut t, &frame) {
                tracing::debug!(%peer, error = %e, "could not send Refused");
            }
            // FIN after the Refused bytes, so the peer reads them before any reset.
            let _ = stream.shutdown(Shutdown::Write);
        }
        End::TimedOut(during) => {
            counters.timeouts.fetch_add(1, Relaxed);
            tracing::debug!(%peer, during, "peer silent past its deadline; closed");
        }
        End::Lost(e) => tracing::debug!(%peer, error = %e, "connection lost"),
    }
}

/// Why a request frame could not be read.
enum RecvError {
    Closed,
    Io(io::Error),
    Malformed(String),
    /// Decodes, but asks for something no server gives (a read count of 0, say).
    BadRequest(String),
}

struct Connection<'a> {
    stream: &'a TcpStream,
    registry: &'a Arc<ImageRegistry>,
    config: &'a ServerConfig,
    rdma: &'a ServerRdma,
    /// Reused buffers: the encoded reply and the pages read for it.
    out: Vec<u8>,
    pages: Vec<u8>,
}

impl Connection<'_> {
    fn run(&mut self) -> End {
        let deadline = deadline_after(self.config.handshake_timeout);
        let (attachment, entry) = match self.handshake(deadline) {
            Ok(a) => a,
            Err(end) => return end,
        };
        let end = self.session(&entry);
        drop(attachment);
        end
    }

    fn recv(&self, deadline: Instant, during: &'static str) -> Result<Frame, End> {
        read_request(&mut Timed::new(self.stream, deadline)).map_err(|e| match e {
            RecvError::Closed => End::Done,
            RecvError::Io(e) => End::from_io(during, e),
            RecvError::Malformed(m) => End::refuse(
                Bucket::Malformed,
                RefuseReason::BadRequest,
                format!("{during}: {m}"),
            ),
            RecvError::BadRequest(m) => End::bad_request(format!("{during}: {m}")),
        })
    }

    fn send(&mut self, frame: &Frame, during: &'static str) -> Result<(), End> {
        self.out.clear();
        frame.encode(&mut self.out);
        self.write_out(during)
    }

    fn write_out(&mut self, during: &'static str) -> Result<(), End> {
        let mut t = Timed::within(self.stream, self.config.write_timeout);
        io::Write::write_all(&mut t, &self.out).map_err(|e| End::from_io(during, e))
    }

    fn handshake(&mut self, deadline: Instant) -> Result<(Attachment, Arc<Entry>), End> {
        let (handle, client_nonce) = match self.recv(deadline, "handshake")? {
            Frame::Hello {
                version,
                handle,
                client_nonce,
            } => {
                if version != PROTOCOL_VERSION {
                    return Err(End::bad_request(format!(
                        "protocol version {version} is not supported (this server speaks {PROTOCOL_VERSION})"
                    )));
                }
                (handle, client_nonce)
            }
            other => return Err(End::unexpected("expecting Hello", &other)),
        };
        let refused = |r: crate::registry::Refusal| {
            End::refuse(r.into(), r.reason(), format!("handle {handle:#018x}: {r}"))
        };
        let entry = self.registry.lookup(handle).map_err(refused)?;
        let server_nonce = fresh_nonce::<32>().map_err(|e| {
            tracing::error!(error = %e, "no randomness for a challenge");
            End::refuse(
                Bucket::Internal,
                RefuseReason::Internal,
                "server has no randomness",
            )
        })?;
        self.send(&Frame::Challenge { server_nonce }, "handshake")?;
        let mac = match self.recv(deadline, "handshake")? {
            Frame::Proof { mac } => mac,
            other => return Err(End::unexpected("expecting Proof", &other)),
        };
        if !verify_proof(entry.key(), handle, &server_nonce, &client_nonce, &mac) {
            return Err(End::refuse(
                Bucket::BadProof,
                RefuseReason::BadProof,
                format!("handle {handle:#018x}: the proof does not verify"),
            ));
        }
        // The image may have ended while the child computed its proof.
        let attachment = self.registry.attach(&entry).map_err(refused)?;
        self.registry.counters().handshakes_ok.fetch_add(1, Relaxed);
        self.send(
            &Frame::Welcome {
                memory_bytes: entry.memory_bytes(),
                page_size: PAGE_SIZE,
            },
            "handshake",
        )?;
        Ok((attachment, entry))
    }

    fn session(&mut self, entry: &Entry) -> End {
        // The child's RDMA queue pair, once connected: it lives as long as this connection.
        let mut qp: Option<QpLink> = None;
        loop {
            if qp.is_some()
                && let Err(end) = self.await_frame(entry)
            {
                return end;
            }
            let deadline = deadline_after(self.config.idle_timeout);
            let (first_page, count) = match self.recv(deadline, "session") {
                Ok(Frame::Read { first_page, count }) => (first_page, count),
                Ok(Frame::MetaRequest) => {
                    if entry.meta().is_empty() {
                        return End::bad_request(format!(
                            "handle {:#018x} was published without metadata",
                            entry.handle()
                        ));
                    }
                    let meta = Frame::Meta {
                        bytes: entry.meta().to_vec(),
                    };
                    if let Err(end) = self.send(&meta, "metadata") {
                        return end;
                    }
                    continue;
                }
                Ok(Frame::RdmaConnect { version, qp: child }) => {
                    if qp.is_some() {
                        return End::bad_request(
                            "RdmaConnect: this connection already carries a queue pair",
                        );
                    }
                    if entry.is_revoked() {
                        return revoked(entry);
                    }
                    match self.rdma_connect(entry, version, &child) {
                        Ok(link) => qp = link,
                        Err(end) => return end,
                    }
                    continue;
                }
                Ok(Frame::Bye) => return End::Done,
                Ok(other) => {
                    return End::unexpected(
                        "expecting Read, MetaRequest, RdmaConnect or Bye",
                        &other,
                    );
                }
                Err(end) => return end,
            };
            if entry.is_revoked() {
                return revoked(entry);
            }
            // `decode` already checked 1..=MAX_READ_PAGES and u32 overflow.
            let end = u64::from(first_page) + u64::from(count);
            if end > entry.page_count() {
                return End::bad_request(format!(
                    "read of pages {first_page}..{end} past the end of a {}-page memory",
                    entry.page_count()
                ));
            }
            if let Err(end) = self.answer(entry, first_page, count) {
                return end;
            }
        }
    }

    /// Answers `RdmaConnect`: `RdmaAccept` and the queue pair to keep, or `RdmaUnavailable`
    /// and none (the connection goes on serving reads).
    fn rdma_connect(
        &mut self,
        entry: &Entry,
        version: u8,
        child: &QpInfo,
    ) -> Result<Option<QpLink>, End> {
        let counters = self.registry.counters();
        let handle = format_args!("{:#018x}", entry.handle()).to_string();
        match self.rdma.accept(entry, version, child) {
            Ok((link, qp, region)) => {
                counters.rdma_connects_ok.fetch_add(1, Relaxed);
                tracing::debug!(%handle, child_qp = child.qp_num, "RDMA queue pair connected");
                // On a failed write the link drops here, destroying the queue pair.
                self.send(&Frame::RdmaAccept { qp, region }, "RDMA set-up")?;
                Ok(Some(link))
            }
            Err(reason) => {
                counters.rdma_unavailable.fetch_add(1, Relaxed);
                tracing::debug!(%handle, %reason, "RDMA unavailable; the child reads over TCP");
                self.send(&Frame::RdmaUnavailable { reason }, "RDMA set-up")?;
                Ok(None)
            }
        }
    }

    /// With a queue pair connected the child may stay silent for as long as it lives: waits
    /// for its next frame (or the end of the connection) without a deadline, ending the
    /// connection, and with it the queue pair, when the image is revoked.
    fn await_frame(&self, entry: &Entry) -> Result<(), End> {
        loop {
            if entry.is_revoked() {
                return Err(revoked(entry));
            }
            let mut fds = [PollFd::new(self.stream.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, TICK.as_millis() as u16) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => {}
                // Readable, closed or failed: the read that follows says which.
                Ok(_) => return Ok(()),
                Err(e) => return Err(End::Lost(io::Error::from(e))),
            }
        }
    }

    fn answer(&mut self, entry: &Entry, first_page: u32, count: u32) -> Result<(), End> {
        let internal = |what: String| {
            tracing::error!(handle = %format_args!("{:#018x}", entry.handle()), %what, "cannot serve a read");
            End::refuse(Bucket::Internal, RefuseReason::Internal, what)
        };
        let len = count as usize * PAGE;
        self.pages.resize(len, 0);
        entry
            .read_pages(u64::from(first_page), &mut self.pages[..len])
            .map_err(|e| internal(format!("reading the image: {e}")))?;
        let frame = Frame::pages_from(first_page, &self.pages[..len])
            .map_err(|e| internal(format!("building Pages: {e}")))?;
        let zeros = match &frame {
            Frame::Pages { zero_map, .. } => zero_map.iter().map(|b| b.count_ones()).sum(),
            _ => 0,
        };
        self.out.clear();
        frame.encode(&mut self.out);
        // Counted before the write, so a child that has its pages sees them counted.
        entry.count_served(u64::from(count), u64::from(zeros), self.out.len() as u64);
        let sent = self.write_out("session");
        // A child holds its connection for as long as it lives, mostly idle: keep buffers
        // for the common small reads (a fault plus readahead), not a megabyte per child.
        if self.pages.capacity() > RETAIN_BUFFER {
            self.pages = Vec::new();
        }
        if self.out.capacity() > RETAIN_BUFFER {
            self.out = Vec::new();
        }
        sent
    }
}

fn revoked(entry: &Entry) -> End {
    End::refuse(
        Bucket::Revoked,
        RefuseReason::Revoked,
        format!(
            "handle {:#018x}: the parent revoked the image",
            entry.handle()
        ),
    )
}

/// Reads one client frame: the length is checked against [`MAX_REQUEST`] before the body is
/// read, so the body fits a stack buffer.
fn read_request(r: &mut impl Read) -> Result<Frame, RecvError> {
    let mut buf = [0u8; HEADER_LEN + MAX_REQUEST as usize];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut buf[got..HEADER_LEN]) {
            Ok(0) if got == 0 => return Err(RecvError::Closed),
            Ok(0) => return Err(RecvError::Malformed("frame header truncated".into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RecvError::Io(e)),
        }
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len > MAX_REQUEST {
        return Err(RecvError::Malformed(format!(
            "frame length {len} is longer than any request ({MAX_REQUEST})"
        )));
    }
    let total = HEADER_LEN + len as usize;
    if let Err(e) = r.read_exact(&mut buf[HEADER_LEN..total]) {
        return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
            RecvError::Malformed(format!("frame of {len} bytes truncated"))
        } else {
            RecvError::Io(e)
        });
    }
    match Frame::decode(&buf[..total]) {
        Ok((frame, _)) => Ok(frame),
        Err(e @ (FrameError::BadCount { .. } | FrameError::PageRangeOverflow { .. })) => {
            Err(RecvError::BadRequest(e.to_string()))
        }
        Err(e) => Err(RecvError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Frame, RecvError> {
        read_request(&mut io::Cursor::new(bytes))
    }

    #[test]
    fn request_reader_checks_length_before_body() {
        let mut hello = Vec::new();
        Frame::Hello {
            version: 1,
            handle: 7,
            client_nonce: [3; 16],
        }
        .encode(&mut hello);
        assert!(matches!(decode(&hello), Ok(Frame::Hello { handle: 7, .. })));
        assert!(matches!(decode(&[]), Err(RecvError::Closed)));
        assert!(matches!(decode(&hello[..2]), Err(RecvError::Malformed(_))));
        assert!(
            matches!(decode(&hello[..10]), Err(RecvError::Malformed(m)) if m.contains("truncated"))
        );
        // An oversized header is refused without the body behind it.
        assert!(
            matches!(decode(&65u32.to_le_bytes()), Err(RecvError::Malformed(m)) if m.contains("65"))
        );
        assert!(matches!(
            decode(&u32::MAX.to_le_bytes()),
            Err(RecvError::Malformed(_))
        ));
        assert!(matches!(
            decode(&[0, 0, 0, 0]),
            Err(RecvError::Malformed(_))
        ));
        assert!(
            matches!(decode(&[1, 0, 0, 0, 99]), Err(RecvError::Malformed(m)) if m.contains("99"))
        );
        let mut read0 = vec![9, 0, 0, 0, 6];
        read0.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&read0), Err(RecvError::BadRequest(m)) if m.contains("count 0")));
    }
}
