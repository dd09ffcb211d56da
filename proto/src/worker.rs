//! The hand-off between the gateway and a worker process.
//!
//! A worker is started with its resources already open at fixed fd numbers, so it needs no
//! path, port or name to find them and a restart gets exactly what the first start got. On
//! its socket, descriptors with request id 0 are control messages; the only one today is the
//! ready message a worker sends once its instance can serve. Requests to a running worker
//! (prepare an image) go on its separate control socket, [`CONTROL_FD`]: see [`crate::control`].
//! A worker forked from a zygote (see [`crate::zygote`]) gets the same numbers from the zygote
//! instead of from exec.

use std::os::fd::RawFd;

use crate::descriptor::{Descriptor, GATEWAY_FN};

/// The chain's arena payload (a memfd the worker maps read-write; see `shm::ArenaView`).
pub const ARENA_FD: RawFd = 3;
/// This instance's end of a connected loopback TCP socket to the gateway.
pub const SOCKET_FD: RawFd = 4;
/// The config text the gateway started with (a sealed memfd).
pub const CONFIG_FD: RawFd = 5;
/// The function's module bytes as the gateway read them at start (a sealed memfd).
pub const MODULE_FD: RawFd = 6;
/// This instance's statistics page (a memfd).
pub const STATS_FD: RawFd = 7;
/// The image descriptor to resume from (a sealed memfd); only for a worker started with
/// `--from-image`. A descriptor is a credential: an fd, unlike argv, is not visible to other
/// processes.
pub const IMAGE_FD: RawFd = 8;
/// This instance's end of a Unix stream socket pair with the gateway, for
/// [`crate::control`] messages (prepare an image of the running instance). Kept apart from
/// [`SOCKET_FD`], which carries only descriptors and may be redirected by the kernel.
pub const CONTROL_FD: RawFd = 9;
/// A zygote's end of its Unix seqpacket socket to the gateway (see [`crate::zygote`]); only
/// for a process started with `--zygote`.
pub const ZYGOTE_FD: RawFd = 10;
/// The node page cache of the image to resume from (a sealed memfd laid out as
/// `rdma_fork::cache` describes), shared by every child of that image on this node.
/// Optional, and only beside `IMAGE_FD`; a worker that cannot use it resumes without it.
pub const CACHE_FD: RawFd = 11;
/// The chain's arena metadata: each slot's generation and request id, written by the
/// gateway only (a memfd sealed with `F_SEAL_FUTURE_WRITE`, which the worker can only map
/// read-only).
pub const ARENA_META_FD: RawFd = 12;
/// The gateway's sandbox network namespace (an nsfs fd), for a worker or zygote to join
/// before it runs guest code; passed only when the gateway confines workers.
pub const NET_NS_FD: RawFd = 13;
/// The gateway's sandbox mount namespace (empty read-only root), beside [`NET_NS_FD`].
pub const MOUNT_NS_FD: RawFd = 14;
/// The function's first preopened directory (`files:` in the config, in file order): a
/// directory fd the gateway opened in its own mount namespace, so a worker confined to the
/// empty one still reaches it. The `i`-th is at `PREOPEN_FD + i`, up to [`MAX_PREOPENS`].
pub const PREOPEN_FD: RawFd = 15;
/// Preopened directories a function may have.
pub const MAX_PREOPENS: usize = 16;
/// The highest of the fixed numbers above (the last preopen's).
pub const HIGHEST_FIXED_FD: RawFd = PREOPEN_FD + MAX_PREOPENS as RawFd - 1;

/// Exit status of a worker whose guest overran its wall-clock timeout (as timeout(1) uses).
pub const WATCHDOG_EXIT: i32 = 124;

/// The message a worker sends once its module is instantiated: request id 0 marks control
/// messages; `slot` carries the function id and `generation` the instance number.
pub fn ready_message(chain: u16, fn_id: u32, instance: u32) -> Descriptor {
    Descriptor {
        next_fn: GATEWAY_FN,
        chain,
        request_id: 0,
        slot: fn_id,
        generation: instance,
        ..Descriptor::default()
    }
}

/// True for control messages (request id 0: the gateway never assigns it to a request).
pub fn is_control(d: &Descriptor) -> bool {
    d.request_id == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_numbers_are_distinct_and_above_stdio() {
        let fds = [
            ARENA_FD,
            SOCKET_FD,
            CONFIG_FD,
            MODULE_FD,
            STATS_FD,
            IMAGE_FD,
            CONTROL_FD,
            ZYGOTE_FD,
            CACHE_FD,
            ARENA_META_FD,
            NET_NS_FD,
            MOUNT_NS_FD,
        ];
        let preopens = PREOPEN_FD..=HIGHEST_FIXED_FD;
        assert_eq!(preopens.clone().count(), MAX_PREOPENS);
        for (i, a) in fds.iter().enumerate() {
            assert!(!preopens.contains(a), "fd {a} inside the preopen range");
            assert!(*a > 2, "fd {a} would clobber stdio");
            assert!(*a <= HIGHEST_FIXED_FD, "fd {a} above HIGHEST_FIXED_FD");
            assert!(!fds[i + 1..].contains(a), "fd {a} assigned twice");
        }
    }

    #[test]
    fn ready_message_is_control_and_names_its_instance() {
        let d = ready_message(3, 17, 2);
        assert!(is_control(&d));
        assert_eq!(
            (d.chain, d.slot, d.generation, d.next_fn),
            (3, 17, 2, GATEWAY_FN)
        );
        assert!(!is_control(&Descriptor { request_id: 1, ..d }));
    }
}
