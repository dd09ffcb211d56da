//! Rust mirrors of `src/bpf/spindle_maps.h`. A test compiles the header with the system C
//! compiler and compares every size and offset, so the two cannot drift.

pub const MAX_FUNCTIONS: u32 = 1024;
pub const MAX_INSTANCES: u32 = 64;
pub const MAX_SLOTS: u32 = 1 << 20;
/// Sockets the map holds: both ends of every worker connection.
pub const MAX_SOCKETS: u32 = MAX_FUNCTIONS * 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub fn_id: u32,
    pub instance: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderKey {
    pub local_port: u32,
    pub remote_port: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sender {
    pub fn_id: u32,
    pub instance: u32,
    pub chain: u32,
    pub peer_fn: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnInfo {
    pub chain: u32,
    pub instances: u32,
    pub slot_base: u32,
    pub slots: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HolderRecord {
    pub request_id: u64,
    /// fn_id | instance << 32 (one store in the program).
    pub at: u64,
}

impl HolderRecord {
    pub fn new(request_id: u64, fn_id: u32, instance: u32) -> Self {
        HolderRecord {
            request_id,
            at: u64::from(fn_id) | (u64::from(instance) << 32),
        }
    }

    pub fn fn_id(&self) -> u32 {
        self.at as u32
    }

    pub fn instance(&self) -> u32 {
        (self.at >> 32) as u32
    }
}

/// The ready instances of one function, `instances[..count]` (see the header).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadyList {
    pub count: u32,
    pub instances: [u32; MAX_INSTANCES as usize],
}

impl Default for ReadyList {
    fn default() -> Self {
        ReadyList::new([])
    }
}

impl ReadyList {
    pub fn new(ready: impl IntoIterator<Item = u32>) -> Self {
        let mut list = ReadyList {
            count: 0,
            instances: [0; MAX_INSTANCES as usize],
        };
        for (slot, instance) in list.instances.iter_mut().zip(ready) {
            *slot = instance;
            list.count += 1;
        }
        list
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnStats {
    pub messages: u64,
    pub bytes: u64,
    pub redirect_failures: u64,
    pub returned: u64,
    pub to_gateway: u64,
    pub dropped: u64,
}

pub(crate) use bpf_kit::Pod;

// SAFETY: all are repr(C) structs of u32/u64 fields laid out without padding (checked below).
unsafe impl Pod for SockKey {}
unsafe impl Pod for Sender {}
unsafe impl Pod for SenderKey {}
unsafe impl Pod for FnInfo {}
unsafe impl Pod for HolderRecord {}
unsafe impl Pod for FnStats {}
unsafe impl Pod for ReadyList {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn rust_layout_has_no_padding() {
        assert_eq!(size_of::<SockKey>(), 8);
        assert_eq!(size_of::<Sender>(), 16);
        assert_eq!(size_of::<FnInfo>(), 16);
        assert_eq!(size_of::<SenderKey>(), 8);
        assert_eq!(size_of::<HolderRecord>(), 16);
        assert_eq!(offset_of!(HolderRecord, at), 8);
        assert_eq!(size_of::<FnStats>(), 48);
        assert_eq!(size_of::<ReadyList>(), 4 + 4 * 64);
        let h = HolderRecord::new(7, 3, 2);
        assert_eq!((h.fn_id(), h.instance()), (3, 2));
    }

    /// Compiles a C program against the header and compares its layout with ours.
    #[test]
    fn matches_c_header() {
        let header = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bpf/spindle_maps.h");
        // (C struct, field, Rust offset, size) for every field of every map type.
        let fields: Vec<(&str, &str, usize, usize)> = vec![
            ("spindle_sock_key", "fn_id", offset_of!(SockKey, fn_id), 4),
            (
                "spindle_sock_key",
                "instance",
                offset_of!(SockKey, instance),
                4,
            ),
            (
                "spindle_sender_key",
                "local_port",
                offset_of!(SenderKey, local_port),
                4,
            ),
            (
                "spindle_sender_key",
                "remote_port",
                offset_of!(SenderKey, remote_port),
                4,
            ),
            ("spindle_sender", "fn_id", offset_of!(Sender, fn_id), 4),
            (
                "spindle_sender",
                "instance",
                offset_of!(Sender, instance),
                4,
            ),
            ("spindle_sender", "chain", offset_of!(Sender, chain), 4),
            ("spindle_sender", "peer_fn", offset_of!(Sender, peer_fn), 4),
            ("spindle_fn_info", "chain", offset_of!(FnInfo, chain), 4),
            (
                "spindle_fn_info",
                "instances",
                offset_of!(FnInfo, instances),
                4,
            ),
            (
                "spindle_fn_info",
                "slot_base",
                offset_of!(FnInfo, slot_base),
                4,
            ),
            ("spindle_fn_info", "slots", offset_of!(FnInfo, slots), 4),
            (
                "spindle_holder",
                "request_id",
                offset_of!(HolderRecord, request_id),
                8,
            ),
            ("spindle_holder", "at", offset_of!(HolderRecord, at), 8),
            (
                "spindle_fn_stats",
                "messages",
                offset_of!(FnStats, messages),
                8,
            ),
            ("spindle_fn_stats", "bytes", offset_of!(FnStats, bytes), 8),
            (
                "spindle_fn_stats",
                "redirect_failures",
                offset_of!(FnStats, redirect_failures),
                8,
            ),
            (
                "spindle_fn_stats",
                "returned",
                offset_of!(FnStats, returned),
                8,
            ),
            (
                "spindle_fn_stats",
                "to_gateway",
                offset_of!(FnStats, to_gateway),
                8,
            ),
            (
                "spindle_fn_stats",
                "dropped",
                offset_of!(FnStats, dropped),
                8,
            ),
            (
                "spindle_ready_list",
                "count",
                offset_of!(ReadyList, count),
                4,
            ),
            (
                "spindle_ready_list",
                "instances",
                offset_of!(ReadyList, instances),
                4 * MAX_INSTANCES as usize,
            ),
        ];
        let sizes = [
            ("spindle_sock_key", size_of::<SockKey>()),
            ("spindle_sender_key", size_of::<SenderKey>()),
            ("spindle_sender", size_of::<Sender>()),
            ("spindle_fn_info", size_of::<FnInfo>()),
            ("spindle_holder", size_of::<HolderRecord>()),
            ("spindle_fn_stats", size_of::<FnStats>()),
            ("spindle_ready_list", size_of::<ReadyList>()),
        ];
        let mut check = bpf_kit::LayoutCheck::new(header)
            .include(concat!(env!("CARGO_MANIFEST_DIR"), "/../proto/include"));
        for (t, size) in sizes {
            check = check.size(t, size);
        }
        for (t, f, off, size) in fields {
            check = check.field(t, f, off, size);
        }
        let check = check
            .constant("SPINDLE_MAX_FUNCTIONS", MAX_FUNCTIONS.into())
            .constant("SPINDLE_MAX_INSTANCES", MAX_INSTANCES.into())
            .constant("SPINDLE_MAX_SLOTS", MAX_SLOTS.into())
            .constant("SPINDLE_MAX_SOCKETS", MAX_SOCKETS.into());
        match check.run() {
            Err(bpf_kit::LayoutError::NoCompiler(e)) => testkit::cannot_run("matches_c_header", e),
            other => other.unwrap(),
        }
    }
}
