//! The gateway's dataplane threads (`http.shards`). Each shard is one thread running a
//! single-threaded tokio runtime that owns an accept loop on its own listener (a plain one for
//! one shard; `SO_REUSEPORT` sockets on one port for more, so the kernel hashes each new
//! connection to one shard) **and** the socket tasks of a share of the worker connections
//! (reader and writer, [`crate::dataplane`]). A connection's requests are read, routed to the
//! workers, and answered without leaving its thread, and nothing on the hot path is handed
//! between threads by a work-stealing scheduler. With one shard — the default — everything a
//! request touches in the gateway runs on one thread; supervision, autoscaling, reloads,
//! image preparation and the peer links stay on the multi-threaded control runtime, where a
//! slow start or fork never stalls a request.
//!
//! It owns the dataplane threads, the listening sockets and the client connections' tasks
//! until they drain; it must not decide what a request does (that is [`crate::http`]'s) or
//! whom to admit ([`crate::front`]'s).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::front::{Front, Tracked};
use crate::http::Gateway;

/// Why the front could not listen.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("starting front shard {shard}: {source}")]
    Start {
        shard: usize,
        source: std::io::Error,
    },
}

/// The front's listening sockets, bound before any worker starts.
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

/// Pending connections the kernel keeps per listener before refusing more.
const BACKLOG: i32 = 1024;

impl Listeners {
    /// Binds `shards` listeners on `addr`: a plain one for a single shard, otherwise
    /// `SO_REUSEPORT` sockets on the one port (chosen by the first when `addr` has port 0).
    pub fn bind(addr: SocketAddr, shards: usize) -> Result<Self, ShardError> {
        let listen_err = |addr, source| ShardError::Listen { addr, source };
        if shards <= 1 {
            let socket = std::net::TcpListener::bind(addr).map_err(|e| listen_err(addr, e))?;
            socket
                .set_nonblocking(true)
                .map_err(|e| listen_err(addr, e))?;
            let addr = socket.local_addr().map_err(|e| listen_err(addr, e))?;
            return Ok(Listeners {
                sockets: vec![socket],
                addr,
            });
        }
        // SO_REUSEPORT would let a second gateway (of the same user) join this one's port
        // silently and take half its connections: a plain bind first proves the port free
        // (and picks it, for port 0), and is let go just before the shards bind it.
        let bound = std::net::TcpListener::bind(addr)
            .and_then(|probe| probe.local_addr())
            .map_err(|e| listen_err(addr, e))?;
        let mut sockets = Vec::with_capacity(shards);
        for _ in 0..shards {
            sockets.push(reuseport_listener(bound).map_err(|e| listen_err(bound, e))?);
        }
        Ok(Listeners {
            sockets,
            addr: bound,
        })
    }

    /// The address every listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shards(&self) -> usize {
        self.sockets.len()
    }

    /// The listening sockets, shard by shard.
    pub fn sockets(&self) -> impl Iterator<Item = &std::net::TcpListener> {
        self.sockets.iter()
    }

    /// `SO_INCOMING_CPU` on each listener: the kernel prefers, for a connection received on
    /// CPU c, the listener marked c (`cpus[i]` for shard i; its thread is pinned there).
    pub fn set_incoming_cpus(&self, cpus: &[usize]) -> std::io::Result<()> {
        for (socket, cpu) in self.sockets.iter().zip(cpus.iter().cycle()) {
            let cpu = *cpu as libc::c_int;
            // SAFETY: a plain setsockopt on a socket we own, with a pointer to an int that
            // outlives the call and its size.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_INCOMING_CPU,
                    (&cpu as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The CPUs this process may run on, in order: where shard threads are pinned (shard i on
/// the i-th, round and round) when steering asks for it.
pub fn usable_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    match sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// A listening TCP socket with `SO_REUSEPORT` (and `SO_REUSEADDR`, as `bind` in std sets it),
/// non-blocking, close-on-exec.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen,
        setsockopt, socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd: OwnedFd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    listen(
        &fd,
        Backlog::new(BACKLOG).map_err(|e| std::io::Error::from_raw_os_error(e as i32))?,
    )?;
    // SAFETY: `fd` is a listening TCP socket this function just made and owns; ownership
    // moves into the TcpListener.
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd.into_raw_fd()) })
}

/// What every accept loop shares.
#[derive(Clone)]
pub struct FrontContext {
    pub gateway: Arc<Gateway>,
    pub front: Arc<Front>,
    pub header_read_timeout: Duration,
    /// How long connections may take to finish their requests once the front stops.
    pub drain_timeout: Duration,
}

/// The dataplane threads. Dropping the last handle ends them (after [`Shards::stop_front`]
/// has drained the front, and the gateway has stopped its workers).
pub struct Shards {
    runtimes: Vec<tokio::runtime::Handle>,
    /// Round-robin over shards for new worker connections.
    next: std::sync::atomic::AtomicUsize,
    /// Ends each thread's runtime.
    end: watch::Sender<bool>,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Stops the accept loops; each reports when its connections have drained.
    stop_accepting: watch::Sender<bool>,
    drained: std::sync::Mutex<Vec<tokio::sync::oneshot::Receiver<()>>>,
}

impl Shards {
    /// Starts `n` dataplane threads, each with its own single-threaded runtime, idle until
    /// [`Shards::serve`] and [`Shards::spawn_link`] give them work. With `pin`, thread i runs
    /// only on CPU `pin[i % pin.len()]`.
    pub fn spawn(n: usize, pin: Option<&[usize]>) -> Result<Arc<Self>, ShardError> {
        let (end, _) = watch::channel(false);
        let mut runtimes = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for shard in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| ShardError::Start { shard, source })?;
            runtimes.push(runtime.handle().clone());
            let mut end_rx = end.subscribe();
            let cpu = pin
                .filter(|cpus| !cpus.is_empty())
                .map(|cpus| cpus[shard % cpus.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("dataplane-{shard}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        pin_current_thread(shard, cpu);
                    }
                    runtime.block_on(async move {
                        let _ = end_rx.wait_for(|end| *end).await;
                    });
                    // Dropping the runtime cancels what is left on it (nothing: the workers
                    // were stopped and their sockets closed first).
                    drop(runtime);
                })
                .map_err(|source| ShardError::Start { shard, source })?;
            threads.push(thread);
        }
        let (stop_accepting, _) = watch::channel(false);
        Ok(Arc::new(Shards {
            runtimes,
            next: std::sync::atomic::AtomicUsize::new(0),
            end,
            threads: std::sync::Mutex::new(threads),
            stop_accepting,
            drained: std::sync::Mutex::new(Vec::new()),
        }))
    }

    /// Runs a worker connection's socket task on the next shard in turn. `make` is called on
    /// that shard's thread, so the sockets it registers belong to that shard's event loop.
    pub fn spawn_link<F, Fut>(&self, make: F) -> tokio::task::JoinHandle<Fut::Output>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.runtimes.len();
        self.runtimes[i].spawn(async move { make().await })
    }

    /// Starts one accept loop per listener, listener i on shard i (there are as many of each).
    pub fn serve(&self, listeners: Listeners, context: FrontContext) {
        let mut drained = self.drained.lock().expect("drained lock");
        for (shard, socket) in listeners.sockets.into_iter().enumerate() {
            let runtime = &self.runtimes[shard % self.runtimes.len()];
            let (done, done_rx) = tokio::sync::oneshot::channel();
            drained.push(done_rx);
            let context = context.clone();
            let stopped = self.stop_accepting.subscribe();
            // Registered with this shard's reactor: from_std runs on its thread.
            runtime.spawn(async move {
                match TcpListener::from_std(socket) {
                    Ok(listener) => accept_loop(listener, context, stopped).await,
                    Err(e) => tracing::error!(shard, "front shard cannot listen: {e}"),
                }
                let _ = done.send(());
            });
        }
    }

    /// Stops accepting on every listener, then waits while each loop's connections finish
    /// their requests (each loop gives up after its drain timeout). Worker links keep running.
    pub async fn stop_front(&self) {
        let _ = self.stop_accepting.send(true);
        let drained = std::mem::take(&mut *self.drained.lock().expect("drained lock"));
        for done in drained {
            let _ = done.await;
        }
    }

    /// Ends the dataplane threads, once the workers are stopped, and waits for them.
    pub async fn shut_down(&self) {
        let _ = self.end.send(true);
        let threads = std::mem::take(&mut *self.threads.lock().expect("threads lock"));
        for thread in threads {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        // Threads not joined by shut_down end on their own once told to.
        let _ = self.end.send(true);
    }
}

fn pin_current_thread(shard: usize, cpu: usize) {
    use nix::sched::{CpuSet, sched_setaffinity};
    let mut set = CpuSet::new();
    let pinned = set
        .set(cpu)
        .and_then(|()| sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    match pinned {
        Ok(()) => tracing::debug!(shard, cpu, "dataplane thread pinned"),
        // Still correct, only less local: steering then merely prefers this shard.
        Err(e) => tracing::warn!(shard, cpu, "cannot pin the dataplane thread: {e}"),
    }
}

/// Accepts and serves client connections on one listener until `stopped`, then closes the
/// listener and drains this loop's connections.
async fn accept_loop(
    listener: TcpListener,
    context: FrontContext,
    mut stopped: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(context.header_read_timeout);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds or similar: keep serving existing connections, retry soon.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let front = &context.front;
        let Some(admitted) = front.admit(&stream) else {
            front.close_refused(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let gateway = Arc::clone(&context.gateway);
        let activity = Arc::clone(&admitted.activity);
        let service = service_fn(move |req| {
            let gateway = Arc::clone(&gateway);
            let activity = Arc::clone(&activity);
            activity.begin();
            async move {
                let reply = gateway.handle(req).await;
                activity.end();
                reply
            }
        });
        let io = TokioIo::new(Tracked::new(stream, Arc::clone(&admitted.activity)));
        let connection = graceful.watch(http.serve_connection(io, service));
        let front = Arc::clone(front);
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(e) = ended {
                    front.cut(Front::reason(&e));
                    tracing::debug!("connection ended: {e}");
                },
                // Dropping the connection closes it: nothing is in flight on it.
                _ = front.idle(&admitted.activity) => front.cut("idle"),
            }
            drop(admitted);
        });
    }
    drop(listener);
    if tokio::time::timeout(context.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after {:?}; stopping anyway",
            context.drain_timeout
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shard's socket listens on the one port, and connections to it are spread over
    /// them by the kernel (each is accepted by exactly one).
    #[test]
    fn reuseport_shards_share_one_port_and_split_connections() {
        let listeners = Listeners::bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(listeners.shards(), 3);
        let addr = listeners.local_addr();
        assert_ne!(addr.port(), 0);
        for s in &listeners.sockets {
            assert_eq!(s.local_addr().unwrap(), addr);
        }
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        let mut per_shard = Vec::new();
        for s in &listeners.sockets {
            let mut n = 0;
            while s.accept().is_ok() {
                n += 1;
            }
            per_shard.push(n);
        }
        assert_eq!(
            per_shard.iter().sum::<usize>(),
            clients.len(),
            "{per_shard:?}"
        );
        assert!(
            per_shard.iter().filter(|&&n| n > 0).count() >= 2,
            "the kernel spreads connections over the shards: {per_shard:?}"
        );
    }

    /// A second gateway on a port one already serves is refused, sharded or not, rather
    /// than silently joining its SO_REUSEPORT group.
    #[test]
    fn a_second_gateway_cannot_join_a_port_in_use() {
        for first_shards in [1, 2] {
            let one = Listeners::bind("127.0.0.1:0".parse().unwrap(), first_shards).unwrap();
            let taken = one.local_addr();
            for second_shards in [1, 2] {
                assert!(
                    matches!(
                        Listeners::bind(taken, second_shards),
                        Err(ShardError::Listen { .. })
                    ),
                    "{first_shards} then {second_shards} shards"
                );
            }
        }
    }
}
