//! Spindle's kernel dataplane: the eBPF sk_msg program (`src/bpf/sockmap.bpf.c`) on a SOCKHASH
//! of worker sockets, and the maps around it, owned by the running gateway.
//!
//! A descriptor written by a worker for another function is redirected by the program into the
//! receive queue of an instance of that function; descriptors for the gateway continue over
//! TCP. Programs and maps live only in this process's file descriptors (nothing is pinned), so
//! they vanish when the gateway exits, even by SIGKILL, and two gateways never share them.
//!
//! Needs CAP_BPF and CAP_NET_ADMIN (or root) and Linux 5.3+ (sk_msg on SOCKHASH, bounded loops).

mod maps;

use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, OpenObject};

use maps::Pod;
pub use maps::{
    FnInfo, FnStats, HolderRecord, MAX_FUNCTIONS, MAX_INSTANCES, MAX_SLOTS, Sender, SockKey,
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
}

fn bpf(what: &'static str) -> impl FnOnce(libbpf_rs::Error) -> SockmapError {
    move |source| SockmapError::Bpf { what, source }
}

/// The loaded and attached program with its maps.
pub struct KernelDataplane {
    skel: SockmapSkel<'static>,
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
        Ok(KernelDataplane { skel })
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

    /// Puts a worker's socket (its end of the gateway connection) into the socket hash, so the
    /// program sees what the worker sends and can redirect descriptors to it. Returns the
    /// socket's local port, the key of the sender entry.
    pub fn insert_socket(
        &self,
        key: SockKey,
        chain: u16,
        sock: BorrowedFd<'_>,
    ) -> Result<u16, SockmapError> {
        if key.instance >= MAX_INSTANCES {
            return Err(SockmapError::TooManyInstances(key.instance));
        }
        let port = local_port(sock).map_err(SockmapError::Socket)?;
        let sender = Sender {
            fn_id: key.fn_id,
            instance: key.instance,
            chain: u32::from(chain),
            pad: 0,
        };
        self.skel
            .maps
            .sender_by_port
            .update(u32::from(port).as_bytes(), sender.as_bytes(), MapFlags::ANY)
            .map_err(bpf("updating sender_by_port"))?;
        let fd = u32::try_from(sock.as_raw_fd()).expect("open fds are non-negative");
        self.skel
            .maps
            .sock_hash
            .update(key.as_bytes(), fd.as_bytes(), MapFlags::ANY)
            .map_err(bpf("inserting the socket into sock_hash"))?;
        Ok(port)
    }

    /// Removes an instance's socket and sender entry (closing the socket removes the former by
    /// itself; this makes it explicit before a restarted instance takes the key).
    pub fn remove_socket(&self, key: SockKey, local_port: u16) {
        // Absent entries are fine: the kernel drops a socket's entry when it closes.
        let _ = self.skel.maps.sock_hash.delete(key.as_bytes());
        let _ = self
            .skel
            .maps
            .sender_by_port
            .delete(u32::from(local_port).as_bytes());
    }

    /// Where the program last redirected the request in holder slot `index`.
    pub fn holder(&self, index: u32) -> Result<HolderRecord, SockmapError> {
        let raw = self
            .skel
            .maps
            .holders
            .lookup(index.as_bytes(), MapFlags::ANY)
            .map_err(bpf("reading holders"))?;
        Ok(raw
            .and_then(|b| HolderRecord::from_bytes(&b))
            .unwrap_or_default())
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

fn local_port(sock: BorrowedFd<'_>) -> std::io::Result<u16> {
    let stream = std::net::TcpStream::from(sock.try_clone_to_owned()?);
    Ok(stream.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    use shm::{Descriptor, GATEWAY_FN, Status};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b) // (worker end, gateway end)
    }

    fn load_or_skip(test: &str) -> Option<KernelDataplane> {
        match KernelDataplane::load() {
            Ok(k) => Some(k),
            // SAFETY: geteuid has no preconditions.
            Err(e) if unsafe { libc::geteuid() } != 0 => {
                eprintln!("SKIPPED {test}: loading eBPF needs root ({e})");
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

    /// Two "workers" of one chain: a descriptor worker 1 writes for function 2 arrives on
    /// worker 2's socket, not at the gateway; one for the gateway goes over TCP; one for an
    /// unknown function or another chain comes back to the gateway marked.
    #[test]
    fn redirects_between_worker_sockets_in_the_kernel() {
        let Some(k) = load_or_skip("redirects_between_worker_sockets_in_the_kernel") else {
            return;
        };
        k.register_function(
            1,
            FnInfo {
                chain: 0,
                instances: 1,
                slot_base: 0,
                slots: 8,
            },
        )
        .unwrap();
        k.register_function(
            2,
            FnInfo {
                chain: 0,
                instances: 1,
                slot_base: 0,
                slots: 8,
            },
        )
        .unwrap();
        k.register_function(
            3,
            FnInfo {
                chain: 1,
                instances: 1,
                slot_base: 8,
                slots: 8,
            },
        )
        .unwrap();
        let (mut w1, mut g1) = pair();
        let (mut w2, _g2) = pair();
        k.insert_socket(
            SockKey {
                fn_id: 1,
                instance: 0,
            },
            0,
            w1.as_fd(),
        )
        .unwrap();
        k.insert_socket(
            SockKey {
                fn_id: 2,
                instance: 0,
            },
            0,
            w2.as_fd(),
        )
        .unwrap();
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
        // Two descriptors in one write: each gets its own verdict.
        let mut batch = d.to_bytes().to_vec();
        batch.extend_from_slice(
            &Descriptor {
                request_id: 42,
                ..d
            }
            .to_bytes(),
        );
        w1.write_all(&batch).unwrap();
        assert_eq!(read_desc(&mut w2).request_id, 41);
        assert_eq!(read_desc(&mut w2).request_id, 42);
        assert_eq!(k.function_stats(2).unwrap().messages, 2);
        assert_eq!(k.instance_messages(2, 0).unwrap(), 2);
        assert_eq!(
            k.holder(3).unwrap(),
            HolderRecord {
                request_id: 42,
                fn_id: 2,
                instance: 0
            }
        );

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
        assert_eq!(k.function_stats(1).unwrap().returned, 3);
        assert_eq!(k.function_stats(2).unwrap().to_gateway, 1);

        // Destination gone: undeliverable, counted, back to the gateway.
        drop(w2);
        std::thread::sleep(std::time::Duration::from_millis(50));
        w1.write_all(&d.to_bytes()).unwrap();
        let gone = read_desc(&mut g1);
        assert_eq!(
            (gone.status, gone.next_fn),
            (Status::Undeliverable as u8, 2)
        );
        assert_eq!(k.function_stats(2).unwrap().redirect_failures, 1);
    }
}
