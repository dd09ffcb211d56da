//! Rust mirrors of `src/bpf/spindle_maps.h`. A test compiles the header with the system C
//! compiler and compares every size and offset, so the two cannot drift.

pub const MAX_FUNCTIONS: u32 = 1024;
pub const MAX_INSTANCES: u32 = 64;
pub const MAX_SLOTS: u32 = 1 << 20;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub fn_id: u32,
    pub instance: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sender {
    pub fn_id: u32,
    pub instance: u32,
    pub chain: u32,
    pub pad: u32,
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
    pub fn_id: u32,
    pub instance: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FnStats {
    pub messages: u64,
    pub bytes: u64,
    pub redirect_failures: u64,
    pub returned: u64,
    pub to_gateway: u64,
}

/// Plain-old-data map values: any byte pattern of the right length is a valid value.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers without padding.
pub(crate) unsafe trait Pod: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod types are repr(C) integers without padding, so every byte is initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast(), size_of::<Self>()) }
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == size_of::<Self>()).then(|| {
            // SAFETY: length checked; any bit pattern is valid for Pod; read_unaligned copes
            // with the Vec's alignment.
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
        })
    }
}

// SAFETY: all are repr(C) structs of u32/u64 fields laid out without padding (checked below).
unsafe impl Pod for SockKey {}
unsafe impl Pod for Sender {}
unsafe impl Pod for FnInfo {}
unsafe impl Pod for HolderRecord {}
unsafe impl Pod for FnStats {}
unsafe impl Pod for u32 {}
unsafe impl Pod for u64 {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn rust_layout_has_no_padding() {
        assert_eq!(size_of::<SockKey>(), 8);
        assert_eq!(size_of::<Sender>(), 16);
        assert_eq!(size_of::<FnInfo>(), 16);
        assert_eq!(size_of::<HolderRecord>(), 16);
        assert_eq!(offset_of!(HolderRecord, fn_id), 8);
        assert_eq!(size_of::<FnStats>(), 40);
    }

    /// Compiles a C program against the header and compares its layout with ours.
    #[test]
    fn matches_c_header() {
        let dir = std::env::temp_dir().join(format!("spindle-maps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let header = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bpf/spindle_maps.h");
        let src = format!(
            r#"#include <stdio.h>
#include <stddef.h>
#include "{header}"
#define F(t, f) printf(#t "." #f " %zu %zu\n", offsetof(struct t, f), sizeof(((struct t *)0)->f))
#define S(t) printf(#t " %zu\n", sizeof(struct t))
int main(void) {{
  S(spindle_sock_key); F(spindle_sock_key, fn_id); F(spindle_sock_key, instance);
  S(spindle_sender); F(spindle_sender, fn_id); F(spindle_sender, instance); F(spindle_sender, chain);
  S(spindle_fn_info); F(spindle_fn_info, chain); F(spindle_fn_info, instances); F(spindle_fn_info, slot_base); F(spindle_fn_info, slots);
  S(spindle_holder); F(spindle_holder, request_id); F(spindle_holder, fn_id); F(spindle_holder, instance);
  S(spindle_fn_stats); F(spindle_fn_stats, messages); F(spindle_fn_stats, bytes); F(spindle_fn_stats, redirect_failures); F(spindle_fn_stats, returned); F(spindle_fn_stats, to_gateway);
  printf("MAX %d %d %d %d\n", SPINDLE_MAX_FUNCTIONS, SPINDLE_MAX_INSTANCES, SPINDLE_MAX_SLOTS, SPINDLE_MAX_SOCKETS);
  return 0;
}}"#
        );
        std::fs::write(dir.join("layout.c"), src).unwrap();
        let exe = dir.join("layout");
        let Ok(status) = std::process::Command::new("cc")
            .arg(dir.join("layout.c"))
            .arg("-o")
            .arg(&exe)
            .status()
        else {
            eprintln!("SKIPPED matches_c_header: no C compiler (cc) on this machine");
            return;
        };
        assert!(status.success(), "compiling the header failed");
        let out =
            String::from_utf8(std::process::Command::new(&exe).output().unwrap().stdout).unwrap();
        let expected = format!(
            "spindle_sock_key {}\nspindle_sock_key.fn_id {} 4\nspindle_sock_key.instance {} 4\n\
             spindle_sender {}\nspindle_sender.fn_id {} 4\nspindle_sender.instance {} 4\nspindle_sender.chain {} 4\n\
             spindle_fn_info {}\nspindle_fn_info.chain {} 4\nspindle_fn_info.instances {} 4\nspindle_fn_info.slot_base {} 4\nspindle_fn_info.slots {} 4\n\
             spindle_holder {}\nspindle_holder.request_id {} 8\nspindle_holder.fn_id {} 4\nspindle_holder.instance {} 4\n\
             spindle_fn_stats {}\nspindle_fn_stats.messages {} 8\nspindle_fn_stats.bytes {} 8\nspindle_fn_stats.redirect_failures {} 8\nspindle_fn_stats.returned {} 8\nspindle_fn_stats.to_gateway {} 8\n\
             MAX {MAX_FUNCTIONS} {MAX_INSTANCES} {MAX_SLOTS} {}\n",
            size_of::<SockKey>(),
            offset_of!(SockKey, fn_id),
            offset_of!(SockKey, instance),
            size_of::<Sender>(),
            offset_of!(Sender, fn_id),
            offset_of!(Sender, instance),
            offset_of!(Sender, chain),
            size_of::<FnInfo>(),
            offset_of!(FnInfo, chain),
            offset_of!(FnInfo, instances),
            offset_of!(FnInfo, slot_base),
            offset_of!(FnInfo, slots),
            size_of::<HolderRecord>(),
            offset_of!(HolderRecord, request_id),
            offset_of!(HolderRecord, fn_id),
            offset_of!(HolderRecord, instance),
            size_of::<FnStats>(),
            offset_of!(FnStats, messages),
            offset_of!(FnStats, bytes),
            offset_of!(FnStats, redirect_failures),
            offset_of!(FnStats, returned),
            offset_of!(FnStats, to_gateway),
            MAX_FUNCTIONS * 4,
        );
        assert_eq!(out, expected);
    }
}
