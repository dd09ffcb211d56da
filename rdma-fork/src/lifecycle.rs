//! Process-wide gauges of what this crate holds open, so a node service can export them
//! (`/metrics`) and tests can prove that every child's resources are given back.
//!
//! Each gauge is moved by an RAII [`Live`] token that the owning object carries: created
//! with the resource, dropped with it, so no code path (error, panic unwinding, early
//! return) can forget the decrement.

use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

/// What a [`Live`] token counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// memfds held by this crate: [`MemfdSource`](crate::MemfdSource) images, published
    /// images in a [`registry`](crate::registry), and mapped [`NodeCache`](crate::cache::NodeCache)s.
    Memfd,
    /// Regions registered with a userfaultfd and served by a handler.
    UffdRegistration,
    /// Connections a [`PageServer`](crate::server::PageServer) is serving.
    ServerConnection,
    /// [`PageClient`](crate::client::PageClient) connections to a parent.
    ClientConnection,
}

static GAUGES: [AtomicI64; 4] = [const { AtomicI64::new(0) }; 4];

fn gauge(r: Resource) -> &'static AtomicI64 {
    &GAUGES[r as usize]
}

/// Counts one resource for as long as it lives.
#[derive(Debug)]
pub struct Live(Resource);

impl Live {
    pub fn new(r: Resource) -> Self {
        gauge(r).fetch_add(1, Relaxed);
        Live(r)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        gauge(self.0).fetch_sub(1, Relaxed);
    }
}

/// The gauges at one moment (each is read on its own; they are not one atomic snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub memfds: i64,
    pub uffd_registrations: i64,
    pub server_connections: i64,
    pub client_connections: i64,
}

impl Snapshot {
    /// True when nothing is held.
    pub fn is_idle(&self) -> bool {
        *self == Snapshot::default()
    }
}

static CACHES_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a node page cache that [`NodeCache::open`](crate::cache::NodeCache::open) (or
/// `open_file`) refused: malformed, for another image, or revoked.
pub(crate) fn cache_refused() {
    CACHES_REFUSED.fetch_add(1, Relaxed);
}

/// Node page caches refused since the process started (a counter, unlike the gauges).
pub fn caches_refused() -> u64 {
    CACHES_REFUSED.load(Relaxed)
}

/// The gauges now.
pub fn snapshot() -> Snapshot {
    Snapshot {
        memfds: gauge(Resource::Memfd).load(Relaxed),
        uffd_registrations: gauge(Resource::UffdRegistration).load(Relaxed),
        server_connections: gauge(Resource::ServerConnection).load(Relaxed),
        client_connections: gauge(Resource::ClientConnection).load(Relaxed),
    }
}
