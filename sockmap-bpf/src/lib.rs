//! Spindle's kernel dataplane: the eBPF sk_msg program (`src/bpf/sockmap.bpf.c`) on a SOCKHASH
//! of worker sockets, and the maps around it, owned by the running gateway.
//!
//! A descriptor written by a worker for another function is redirected by the program into the
//! receive queue of an instance of that function; descriptors for the gateway continue over
//! TCP. Programs and maps live only in this process's file descriptors (nothing is pinned), so
//! they vanish when the gateway exits, even by SIGKILL, and two gateways never share them.
//!
//! Needs CAP_BPF and CAP_NET_ADMIN (or root) and Linux 5.3+ (sk_msg on SOCKHASH, bounded loops).
//!
//! This crate owns the program and its maps (`src/bpf/spindle_maps.h`, mirrored in [`maps`]).
//! The descriptor it reads is not its own: it includes `proto/include/spindle_desc.h`. It must
//! not decide policy (which chains it routes, what a failure answers): the gateway does.

mod maps;

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject};

use maps::Pod;
pub use maps::{
    FnInfo, FnStats, HolderRecord, MAX_FUNCTIONS, MAX_INSTANCES, MAX_SLOTS, MAX_SOCKETS, ReadyList,
    Sender, SenderKey, SockKey,
};

mod skel {
    #![allow(clippy::all, unsafe_op_in_unsafe_fn, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/sockmap.skel.rs"));
}
use skel::{SockmapSkel, SockmapSkelBuilder};

#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("{what}: {source}")]
    Bpf {
        what: &'static str,
        source: libbpf_rs::Error,
    },
    #[error("function id {0} is beyond the kernel dataplane's limit of {MAX_FUNCTIONS}")]
    TooManyFunctions(u32),
    #[error("instance {0} is beyond the kernel dataplane's limit of {MAX_INSTANCES} per function")]
    TooManyInstances(u32),
    #[error("arena slots {0} exceed the kernel dataplane's limit of {MAX_SLOTS} over all chains")]
    TooManySlots(u64),
    #[error("socket: {0}")]
    Socket(std::io::Error),
    #[error("mapping the holder table into the gateway: {0}")]
    MapHolders(std::io::Error),
    #[error("holder index {0} is beyond the kernel dataplane's limit of {MAX_SLOTS}")]
    HolderOutOfRange(u32),
}

fn bpf(what: &'static str) -> impl FnOnce(libbpf_rs::Error) -> SockmapError {
    move |source| SockmapError::Bpf { what, source }
}

/// The loaded and attached program with its maps.
pub struct KernelDataplane {
    skel: SockmapSkel<'static>,
    /// Numbers the gateway ends of connections in the socket map.
    gateway_keys: std::sync::atomic::AtomicU32,
    /// The ready instances of each function, as last written to the `ready_list` map (the
    /// lock also keeps two readiness changes from writing the list out of order).
    ready: std::sync::Mutex<std::collections::HashMap<u32, std::collections::BTreeSet<u32>>>,
    /// The `holders` array mapped into this process: the gateway records and reads a slot's
    /// holder with two memory accesses instead of a bpf() call per request.
    holders: HolderTable,
}

/// The program's `holders` array (`BPF_F_MMAPABLE`), mapped shared: the same memory the
/// program's `bpf_map_lookup_elem` returns pointers into.
struct HolderTable {
    base: std::ptr::NonNull<HolderCell>,
    len: usize,
}

/// One record as it sits in the map: two 64-bit words, each stored and loaded whole (the
/// program writes them with plain stores too, so a reader may see a new `request_id` with an
/// old `at`, or the reverse, exactly as with a bpf() lookup, which copies without a lock).
#[repr(C)]
struct HolderCell {
    request_id: std::sync::atomic::AtomicU64,
    at: std::sync::atomic::AtomicU64,
}

// SAFETY: the table is plain shared memory accessed only through atomics; the mapping lives
// until Drop.
unsafe impl Send for HolderTable {}
// SAFETY: as above: every access is an atomic load or store.
unsafe impl Sync for HolderTable {}

impl HolderTable {
    fn map(map: BorrowedFd<'_>, entries: u32) -> Result<Self, SockmapError> {
        const _: () = assert!(std::mem::size_of::<HolderCell>() == 16);
        let len = entries as usize;
        let bytes = len * std::mem::size_of::<HolderCell>();
        // SAFETY: a fresh shared mapping of the map's value area (offset 0 of an mmapable
        // array is its first element); nothing else is placed at the address the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SockmapError::MapHolders(std::io::Error::last_os_error()));
        }
        let base = std::ptr::NonNull::new(ptr.cast::<HolderCell>())
            .ok_or_else(|| SockmapError::MapHolders(std::io::ErrorKind::InvalidData.into()))?;
        Ok(HolderTable { base, len })
    }

    fn cell(&self, index: u32) -> Result<&HolderCell, SockmapError> {
        if index as usize >= self.len {
            return Err(SockmapError::HolderOutOfRange(index));
        }
        // SAFETY: index < len, inside the mapping, which outlives &self; HolderCell is all
        // atomics, so shared references to memory the kernel also writes are sound.
        Ok(unsafe { &*self.base.as_ptr().add(index as usize) })
    }
}

impl Drop for HolderTable {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in HolderTable::map; no reference into it
        // outlives self.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                self.len * std::mem::size_of::<HolderCell>(),
            );
        }
    }
}

/// A worker connection registered with the program; pass it back to
/// [`KernelDataplane::remove_connection`].
#[derive(Clone, Copy, Debug)]
pub struct ConnectionEntry {
    worker: SockKey,
    gateway: SockKey,
    worker_sender: SenderKey,
    gateway_sender: SenderKey,
}

impl ConnectionEntry {
    /// The worker end's key: `{fn_id, instance}`.
    pub fn worker(&self) -> SockKey {
        self.worker
    }
}

impl KernelDataplane {
    /// Loads the program and attaches it to the socket hash. Fails without the privileges or
    /// kernel support, with libbpf's reason.
    pub fn load() -> Result<Self, SockmapError> {
        // The skeleton borrows its object storage for its whole life; the gateway keeps one
        // dataplane for the life of the process, so a leaked box of a few hundred bytes is the
        // simplest owner.
        let storage: &'static mut MaybeUninit<OpenObject> =
            Box::leak(Box::new(MaybeUninit::uninit()));
        let open = SockmapSkelBuilder::default()
            .open(storage)
            .map_err(bpf("opening the eBPF object"))?;
        let skel = open
            .load()
            .map_err(bpf("loading the eBPF program (needs root or CAP_BPF)"))?;
        skel.progs
            .spindle_redirect
            .attach_sockmap(skel.maps.sock_hash.as_fd().as_raw_fd())
            .map_err(bpf("attaching the sk_msg program to the socket hash"))?;
        let holders = HolderTable::map(skel.maps.holders.as_fd(), MAX_SLOTS)?;
        Ok(KernelDataplane {
            skel,
            gateway_keys: std::sync::atomic::AtomicU32::new(0),
            ready: std::sync::Mutex::new(std::collections::HashMap::new()),
            holders,
        })
    }

    /// Declares a function: its chain, instance count, and where its chain's slots start in the
    /// holder table.
    pub fn register_function(&self, fn_id: u32, info: FnInfo) -> Result<(), SockmapError> {
        if fn_id >= MAX_FUNCTIONS {
            return Err(SockmapError::TooManyFunctions(fn_id));
        }
        if info.instances > MAX_INSTANCES {
            return Err(SockmapError::TooManyInstances(info.instances));
        }
        if u64::from(info.slot_base) + u64::from(info.slots) > u64::from(MAX_SLOTS) {
            return Err(SockmapError::TooManySlots(
                u64::from(info.slot_base) + u64::from(info.slots),
            ));
        }
        self.skel
            .maps
            .fn_info
            .update(fn_id.as_bytes(), info.as_bytes(), MapFlags::ANY)
            .map_err(bpf("updating fn_info"))
    }

    /// Registers one worker connection: the worker's end becomes the destination
    /// `{fn_id, instance}` and a sender the program checks; the gateway's end becomes a sender
    /// whose descriptors the program redirects into that worker's receive queue. Call it
    /// before the worker reads its socket, and [`KernelDataplane::set_ready`] once it is ready.
    /// On error nothing stays registered.
    pub fn insert_connection(
        &self,
        worker: SockKey,
        chain: u16,
        worker_end: BorrowedFd<'_>,
        gateway_end: BorrowedFd<'_>,
    ) -> Result<ConnectionEntry, SockmapError> {
        if worker.instance >= MAX_INSTANCES {
            return Err(SockmapError::TooManyInstances(worker.instance));
        }
        let n = self
            .gateway_keys
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let entry = ConnectionEntry {
            worker,
            gateway: SockKey {
                fn_id: proto::GATEWAY_FN,
                instance: n,
            },
            worker_sender: sender_key(worker_end).map_err(SockmapError::Socket)?,
            gateway_sender: sender_key(gateway_end).map_err(SockmapError::Socket)?,
        };
        let chain = u32::from(chain);
        let as_worker = Sender {
            fn_id: worker.fn_id,
            instance: worker.instance,
            chain,
            peer_fn: proto::GATEWAY_FN,
        };
        let as_gateway = Sender {
            fn_id: proto::GATEWAY_FN,
            instance: worker.instance,
            chain,
            peer_fn: worker.fn_id,
        };
        let result = self
            .put_sender(entry.worker_sender, as_worker)
            .and_then(|()| self.put_sender(entry.gateway_sender, as_gateway))
            .and_then(|()| self.put_socket(worker, worker_end))
            // Last: from here on the gateway's writes on this connection go through the kernel.
            .and_then(|()| self.put_socket(entry.gateway, gateway_end));
        match result {
            Ok(()) => Ok(entry),
            Err(e) => {
                self.remove_connection(&entry);
                Err(e)
            }
        }
    }

    fn put_sender(&self, key: SenderKey, sender: Sender) -> Result<(), SockmapError> {
        self.skel
            .maps
            .senders
            .update(key.as_bytes(), sender.as_bytes(), MapFlags::ANY)
            .map_err(bpf("updating senders"))
    }

    fn put_socket(&self, key: SockKey, sock: BorrowedFd<'_>) -> Result<(), SockmapError> {
        let fd = u32::try_from(sock.as_raw_fd()).expect("open fds are non-negative");
        self.skel
            .maps
            .sock_hash
            .update(key.as_bytes(), fd.as_bytes(), MapFlags::ANY)
            .map_err(bpf("inserting a socket into sock_hash"))
    }

    /// Lets the program send descriptors to an instance (after it announced itself ready), or
    /// stops it.
    pub fn set_ready(&self, key: SockKey, ready: bool) -> Result<(), SockmapError> {
        if key.fn_id >= MAX_FUNCTIONS || key.instance >= MAX_INSTANCES {
            return Err(SockmapError::TooManyInstances(key.instance));
        }
        let index = key.fn_id * MAX_INSTANCES + key.instance;
        let mut lists = self.ready.lock().expect("ready lock");
        // Taken out of instance_ready before the list and put in after it, so a list the
        // program reads names no instance the check below would let through wrongly.
        if !ready {
            self.write_ready(index, false)?;
        }
        let list = lists.entry(key.fn_id).or_default();
        if ready {
            list.insert(key.instance);
        } else {
            list.remove(&key.instance);
        }
        let value = ReadyList::new(list.iter().copied());
        self.skel
            .maps
            .ready_list
            .update(key.fn_id.as_bytes(), value.as_bytes(), MapFlags::ANY)
            .map_err(bpf("updating ready_list"))?;
        if ready {
            self.write_ready(index, true)?;
        }
        Ok(())
    }

    fn write_ready(&self, index: u32, ready: bool) -> Result<(), SockmapError> {
        self.skel
            .maps
            .instance_ready
            .update(index.as_bytes(), u32::from(ready).as_bytes(), MapFlags::ANY)
            .map_err(bpf("updating instance_ready"))
    }

    /// The ready instances of `fn_id` as the program sees them.
    pub fn ready_instances(&self, fn_id: u32) -> Result<Vec<u32>, SockmapError> {
        let raw = self
            .skel
            .maps
            .ready_list
            .lookup(fn_id.as_bytes(), MapFlags::ANY)
            .map_err(bpf("reading ready_list"))?
            .unwrap_or_default();
        let list = ReadyList::from_bytes(&raw).unwrap_or_default();
        Ok(list.instances[..list.count.min(MAX_INSTANCES) as usize].to_vec())
    }

    /// Removes a connection's entries (closing a socket removes its sock_hash entry by itself;
    /// this makes it explicit before a restarted instance takes the key).
    pub fn remove_connection(&self, entry: &ConnectionEntry) {
        let _ = self.set_ready(entry.worker, false);
        // Absent entries are fine.
        let _ = self.skel.maps.sock_hash.delete(entry.gateway.as_bytes());
        let _ = self.skel.maps.sock_hash.delete(entry.worker.as_bytes());
        let _ = self
            .skel
            .maps
            .senders
            .delete(entry.worker_sender.as_bytes());
        let _ = self
            .skel
            .maps
            .senders
            .delete(entry.gateway_sender.as_bytes());
    }

    /// Records where a request is, for descriptors the gateway routed itself. `at` is stored
    /// after `request_id`, so the program never sees this request at a stale sender.
    pub fn set_holder(&self, index: u32, record: HolderRecord) -> Result<(), SockmapError> {
        use std::sync::atomic::Ordering;
        let cell = self.holders.cell(index)?;
        cell.request_id.store(record.request_id, Ordering::Relaxed);
        cell.at.store(record.at, Ordering::Release);
        Ok(())
    }

    /// Where the program last redirected the request in holder slot `index`.
    pub fn holder(&self, index: u32) -> Result<HolderRecord, SockmapError> {
        use std::sync::atomic::Ordering;
        let cell = self.holders.cell(index)?;
        let at = cell.at.load(Ordering::Acquire);
        Ok(HolderRecord {
            request_id: cell.request_id.load(Ordering::Relaxed),
            at,
        })
    }

    /// A function's counters, summed over CPUs.
    pub fn function_stats(&self, fn_id: u32) -> Result<FnStats, SockmapError> {
        let per_cpu = self
            .skel
            .maps
            .fn_stats
            .lookup_percpu(fn_id.as_bytes(), MapFlags::ANY)
            .map_err(bpf("reading fn_stats"))?
            .unwrap_or_default();
        Ok(per_cpu.iter().filter_map(|b| FnStats::from_bytes(b)).fold(
            FnStats::default(),
            |a, s| FnStats {
                messages: a.messages + s.messages,
                bytes: a.bytes + s.bytes,
                redirect_failures: a.redirect_failures + s.redirect_failures,
                returned: a.returned + s.returned,
                to_gateway: a.to_gateway + s.to_gateway,
                dropped: a.dropped + s.dropped,
            },
        ))
    }

    /// Descriptors redirected to one instance, summed over CPUs.
    pub fn instance_messages(&self, fn_id: u32, instance: u32) -> Result<u64, SockmapError> {
        let index = fn_id * MAX_INSTANCES + instance;
        let per_cpu = self
            .skel
            .maps
            .instance_messages
            .lookup_percpu(index.as_bytes(), MapFlags::ANY)
            .map_err(bpf("reading instance_messages"))?
            .unwrap_or_default();
        Ok(per_cpu.iter().filter_map(|b| u64::from_bytes(b)).sum())
    }
}

/// A connected socket's (local port, remote port), as the program sees it.
fn sender_key(sock: BorrowedFd<'_>) -> std::io::Result<SenderKey> {
    let stream = std::net::TcpStream::from(sock.try_clone_to_owned()?);
    Ok(SenderKey {
        local_port: u32::from(stream.local_addr()?.port()),
        remote_port: u32::from(stream.peer_addr()?.port()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use proto::{Descriptor, GATEWAY_FN, Status};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b) // (worker end, gateway end)
    }

    fn load_or_skip(test: &str) -> Option<KernelDataplane> {
        match KernelDataplane::load() {
            Ok(k) => Some(k),
            Err(e) if !testkit::is_root() => {
                testkit::cannot_run(test, format!("loading eBPF needs root ({e})"));
                None
            }
            Err(e) => panic!("loading as root failed: {e}"),
        }
    }

    fn read_desc(s: &mut TcpStream) -> Descriptor {
        let mut b = [0u8; Descriptor::SIZE];
        s.read_exact(&mut b).unwrap();
        Descriptor::from_bytes(&b)
    }

    /// Two "workers" of one chain, each with its gateway connection: what the gateway writes
    /// reaches its peer worker through the kernel; a descriptor worker 1 writes for function 2
    /// arrives on worker 2's socket, not at the gateway; one for the gateway goes over TCP;
    /// one for an unknown function or another chain comes back to the gateway marked.
    #[test]
    fn redirects_between_worker_sockets_in_the_kernel() {
        let Some(k) = load_or_skip("redirects_between_worker_sockets_in_the_kernel") else {
            return;
        };
        let info = |chain, slot_base| FnInfo {
            chain,
            instances: 1,
            slot_base,
            slots: 8,
        };
        k.register_function(1, info(0, 0)).unwrap();
        k.register_function(2, info(0, 0)).unwrap();
        k.register_function(3, info(1, 8)).unwrap();
        let (mut w1, mut g1) = pair();
        let (mut w2, mut g2) = pair();
        let key = |fn_id| SockKey { fn_id, instance: 0 };
        let e1 = k
            .insert_connection(key(1), 0, w1.as_fd(), g1.as_fd())
            .unwrap();
        k.insert_connection(key(2), 0, w2.as_fd(), g2.as_fd())
            .unwrap();
        // Not ready yet: function 2 is not a destination.
        w1.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        g1.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // Worker 1 holds request 30 (as if the gateway had sent it there).
        k.set_holder(0, HolderRecord::new(30, 1, 0)).unwrap();
        w1.write_all(
            &Descriptor {
                next_fn: 2,
                request_id: 30,
                ..Default::default()
            }
            .to_bytes(),
        )
        .unwrap();
        let not_ready = read_desc(&mut g1);
        assert_eq!(
            (not_ready.request_id, not_ready.status),
            (30, Status::Undeliverable as u8)
        );
        k.set_ready(key(1), true).unwrap();
        k.set_ready(key(2), true).unwrap();
        assert_eq!(
            k.ready_instances(2).unwrap(),
            [0],
            "the program's ready list"
        );
        // Gaps in the numbers (a scaled-down or reloaded function) leave none in the list.
        let at = |instance| SockKey { fn_id: 9, instance };
        k.set_ready(at(3), true).unwrap();
        k.set_ready(at(1), true).unwrap();
        assert_eq!(k.ready_instances(9).unwrap(), [1, 3]);
        k.set_ready(at(1), false).unwrap();
        assert_eq!(k.ready_instances(9).unwrap(), [3]);
        k.set_ready(at(3), false).unwrap();
        assert!(k.ready_instances(9).unwrap().is_empty());
        for s in [&w1, &w2, &g1] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
        }

        let d = Descriptor {
            next_fn: 2,
            chain: 0,
            request_id: 41,
            slot: 3,
            generation: 1,
            len: 5,
            ..Default::default()
        };
        // The gateway's first hop, through the kernel into worker 1's queue.
        g1.write_all(
            &Descriptor {
                next_fn: 1,
                request_id: 40,
                ..d
            }
            .to_bytes(),
        )
        .unwrap();
        assert_eq!(read_desc(&mut w1).request_id, 40);
        assert_eq!(k.holder(3).unwrap(), HolderRecord::new(40, 1, 0));
        // A descriptor the gateway writes on the wrong connection is not delivered anywhere.
        assert!(
            g2.write_all(
                &Descriptor {
                    next_fn: 1,
                    request_id: 39,
                    ..d
                }
                .to_bytes()
            )
            .is_err()
        );
        assert_eq!(k.function_stats(2).unwrap().dropped, 1);

        // A worker may only pass on what it holds: request 40 is worker 1's, so a descriptor
        // naming another request in that slot, or a slot worker 2 holds, is refused.
        for forged in [
            Descriptor {
                request_id: 99,
                ..d
            },
            Descriptor {
                slot: 5,
                request_id: 55,
                ..d
            },
        ] {
            if forged.slot == 5 {
                k.set_holder(5, HolderRecord::new(55, 2, 0)).unwrap();
            }
            w1.write_all(&forged.to_bytes()).unwrap();
            let back = read_desc(&mut g1);
            assert_eq!(
                (back.request_id, back.status),
                (forged.request_id, Status::Refused as u8)
            );
        }
        assert_eq!(
            k.function_stats(2).unwrap().messages,
            0,
            "nothing forged got through"
        );

        // Two descriptors in one write: each gets its own verdict.
        k.set_holder(3, HolderRecord::new(41, 1, 0)).unwrap();
        k.set_holder(4, HolderRecord::new(42, 1, 0)).unwrap();
        let mut batch = d.to_bytes().to_vec();
        batch.extend_from_slice(
            &Descriptor {
                request_id: 42,
                slot: 4,
                ..d
            }
            .to_bytes(),
        );
        w1.write_all(&batch).unwrap();
        assert_eq!(read_desc(&mut w2).request_id, 41);
        assert_eq!(read_desc(&mut w2).request_id, 42);
        assert_eq!(k.function_stats(2).unwrap().messages, 2);
        assert_eq!(k.instance_messages(2, 0).unwrap(), 2);
        assert_eq!(k.holder(3).unwrap(), HolderRecord::new(41, 2, 0));
        assert_eq!(k.holder(4).unwrap(), HolderRecord::new(42, 2, 0));

        // To the gateway: plain TCP to the peer.
        w2.write_all(
            &Descriptor {
                next_fn: GATEWAY_FN,
                ..d
            }
            .to_bytes(),
        )
        .unwrap();
        // Unknown function, another chain's function, a short write completed later: all come
        // back to the sender's gateway end marked.
        w1.write_all(&Descriptor { next_fn: 77, ..d }.to_bytes())
            .unwrap();
        w1.write_all(&Descriptor { next_fn: 3, ..d }.to_bytes())
            .unwrap();
        let bad = Descriptor {
            next_fn: 2,
            chain: 1,
            ..d
        }
        .to_bytes();
        w1.write_all(&bad[..10]).unwrap();
        w1.write_all(&bad[10..]).unwrap();
        assert_eq!(read_desc(&mut g1).status, Status::BadRoute as u8);
        assert_eq!(read_desc(&mut g1).status, Status::BadRoute as u8);
        let refused = read_desc(&mut g1);
        assert_eq!(
            (refused.status, refused.next_fn, refused.len),
            (Status::Refused as u8, 2, 0)
        );
        assert_eq!(
            k.function_stats(1).unwrap().returned,
            6,
            "three marked above, the two forged ones and the not-ready one"
        );
        assert_eq!(k.function_stats(2).unwrap().to_gateway, 1);

        // Destination gone: undeliverable, counted, back to the gateway.
        k.set_holder(3, HolderRecord::new(41, 1, 0)).unwrap();
        drop(w2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        w1.write_all(&d.to_bytes()).unwrap();
        let gone = read_desc(&mut g1);
        assert_eq!(
            (gone.status, gone.next_fn, gone.len),
            (Status::Undeliverable as u8, 2, d.len),
            "an undeliverable request keeps its length, for the gateway to send it on"
        );
        assert_eq!(k.function_stats(2).unwrap().redirect_failures, 2);

        // Removed: worker 1's writes are no longer seen by the program (plain TCP again).
        k.remove_connection(&e1);
        w1.write_all(
            &Descriptor {
                next_fn: 77,
                request_id: 50,
                ..d
            }
            .to_bytes(),
        )
        .unwrap();
        let passed = read_desc(&mut g1);
        assert_eq!((passed.request_id, passed.status), (50, Status::Ok as u8));
    }

    /// The mapped table is the program's map: what the gateway stores through the mapping is
    /// what a bpf() lookup returns, and what the map holds (written by bpf() update, as the
    /// program's redirects write it) is what the mapping reads. Out-of-range indices are
    /// refused, not read past the mapping.
    #[test]
    fn the_mapped_holder_table_is_the_programs_map() {
        let Some(k) = load_or_skip("the_mapped_holder_table_is_the_programs_map") else {
            return;
        };
        let last = MAX_SLOTS - 1;
        for index in [0, 7, last] {
            let record = HolderRecord::new(1000 + u64::from(index), 3, 9);
            k.set_holder(index, record).unwrap();
            let raw = k
                .skel
                .maps
                .holders
                .lookup(index.as_bytes(), MapFlags::ANY)
                .unwrap()
                .unwrap();
            assert_eq!(HolderRecord::from_bytes(&raw), Some(record));
            let written = HolderRecord::new(77 + u64::from(index), 5, 2);
            k.skel
                .maps
                .holders
                .update(index.as_bytes(), written.as_bytes(), MapFlags::ANY)
                .unwrap();
            assert_eq!(k.holder(index).unwrap(), written);
        }
        assert!(matches!(
            k.holder(MAX_SLOTS),
            Err(SockmapError::HolderOutOfRange(_))
        ));
        assert!(k.set_holder(MAX_SLOTS, HolderRecord::default()).is_err());
    }
}
