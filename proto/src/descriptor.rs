//! The 32-byte descriptor that travels between the gateway and the workers.
//!
//! `proto/include/spindle_desc.h` is the one definition of the layout (the eBPF programs use it);
//! [`Descriptor`] mirrors it field for field and the tests compile the header with the C
//! compiler to check that size and offsets agree. On the wire a descriptor is exactly
//! [`Descriptor::SIZE`] little-endian bytes, encoded field by field so that no `unsafe`
//! reinterpretation of foreign bytes is needed.

use core::mem::offset_of;

/// Function id 0 is the gateway: a descriptor sent to it ends the chain or reports an error.
pub const GATEWAY_FN: u32 = 0;

/// Mirror of `struct spindle_desc`. The fields are public because it is a plain message;
/// nothing in it is trusted until `shm::ArenaView::check` (or `shm::Arena::check`) has validated it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Descriptor {
    /// Function id this descriptor is going to (eBPF reads it at offset 0).
    pub next_fn: u32,
    /// Chain id: which arena the slot is in.
    pub chain: u16,
    /// Number of functions the request has passed through.
    pub hop: u8,
    /// A [`Status`] as `u8`; use [`Descriptor::status`] to decode it.
    pub status: u8,
    /// Gateway-assigned, unique per gateway run, and recorded with the slot when the gateway
    /// allocates it: a descriptor naming the slot with another request id is refused.
    pub request_id: u64,
    /// Slot index in the chain's arena.
    pub slot: u32,
    /// Slot generation when the gateway allocated it.
    pub generation: u32,
    /// Payload length in bytes, at most the arena's slot size.
    pub len: u32,
    /// Must be zero.
    pub reserved: u32,
}

const _: () = assert!(size_of::<Descriptor>() == Descriptor::SIZE);

/// Outcome carried by a descriptor (`enum spindle_status`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// The payload in the slot is the hop's output.
    Ok = 0,
    /// The function reported an error; the slot holds the message.
    GuestError = 1,
    /// The function trapped; the slot holds the message.
    Trap = 2,
    /// The function ran out of fuel or time.
    Timeout = 3,
    /// A hop refused this descriptor (forged, stale, malformed).
    Refused = 4,
    /// The next hop named does not exist in this chain.
    BadRoute = 5,
    /// The next hop exists but has no live instance (set by the kernel dataplane).
    Undeliverable = 6,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    #[error("unknown descriptor status {0} (known: 0..=6)")]
    UnknownStatus(u8),
}

impl TryFrom<u8> for Status {
    type Error = DescriptorError;

    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::GuestError,
            2 => Status::Trap,
            3 => Status::Timeout,
            4 => Status::Refused,
            5 => Status::BadRoute,
            6 => Status::Undeliverable,
            other => return Err(DescriptorError::UnknownStatus(other)),
        })
    }
}

impl From<Status> for u8 {
    fn from(s: Status) -> u8 {
        s as u8
    }
}

// Encode/decode at the `repr(C)` offsets, which the C test pins to the header's.
macro_rules! put {
    ($buf:ident, $self:ident . $field:ident) => {{
        let bytes = $self.$field.to_le_bytes();
        let at = offset_of!(Descriptor, $field);
        $buf[at..at + bytes.len()].copy_from_slice(&bytes);
    }};
}

macro_rules! get {
    ($buf:ident, $ty:ty, $field:ident) => {{
        let at = offset_of!(Descriptor, $field);
        <$ty>::from_le_bytes($buf[at..at + size_of::<$ty>()].try_into().unwrap())
    }};
}

impl Descriptor {
    /// Size on the wire and in memory (`SPINDLE_DESC_SIZE`).
    pub const SIZE: usize = 32;

    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        put!(b, self.next_fn);
        put!(b, self.chain);
        put!(b, self.hop);
        put!(b, self.status);
        put!(b, self.request_id);
        put!(b, self.slot);
        put!(b, self.generation);
        put!(b, self.len);
        put!(b, self.reserved);
        b
    }

    /// Decodes any 32 bytes; validation is left to [`Descriptor::status`] and
    /// `shm::ArenaView::check`.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        Descriptor {
            next_fn: get!(b, u32, next_fn),
            chain: get!(b, u16, chain),
            hop: get!(b, u8, hop),
            status: get!(b, u8, status),
            request_id: get!(b, u64, request_id),
            slot: get!(b, u32, slot),
            generation: get!(b, u32, generation),
            len: get!(b, u32, len),
            reserved: get!(b, u32, reserved),
        }
    }

    pub fn status(&self) -> Result<Status, DescriptorError> {
        Status::try_from(self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::process::Command;

    /// (name, Rust offset, Rust size) of every field, in declaration order.
    fn rust_fields() -> Vec<(&'static str, usize, usize)> {
        let d = Descriptor::default();
        macro_rules! f {
            ($name:ident) => {
                (
                    stringify!($name),
                    offset_of!(Descriptor, $name),
                    size_of_val(&d.$name),
                )
            };
        }
        vec![
            f!(next_fn),
            f!(chain),
            f!(hop),
            f!(status),
            f!(request_id),
            f!(slot),
            f!(generation),
            f!(len),
            f!(reserved),
        ]
    }

    #[test]
    fn size_and_offsets() {
        assert_eq!(size_of::<Descriptor>(), 32);
        let expected = [
            ("next_fn", 0, 4),
            ("chain", 4, 2),
            ("hop", 6, 1),
            ("status", 7, 1),
            ("request_id", 8, 8),
            ("slot", 16, 4),
            ("generation", 20, 4),
            ("len", 24, 4),
            ("reserved", 28, 4),
        ];
        assert_eq!(rust_fields(), expected);
    }

    #[test]
    fn matches_c_header() {
        let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
        let dir = std::env::temp_dir().join(format!("spindle-desc-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("check.c");
        let bin = dir.join("check");
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"spindle_desc.h\"\n\
             #define F(f) printf(#f \" %zu %zu\\n\", offsetof(struct spindle_desc, f), \
             sizeof(((struct spindle_desc *)0)->f));\n\
             int main(void) {\n\
             printf(\"sizeof %zu %d\\n\", sizeof(struct spindle_desc), SPINDLE_DESC_SIZE);\n\
             printf(\"gateway_fn %d 0\\n\", SPINDLE_GATEWAY_FN);\n",
        );
        for (name, _, _) in rust_fields() {
            c += &format!("F({name})\n");
        }
        for (name, _) in STATUSES {
            c += &format!("printf(\"{name} %d 0\\n\", (int)SPINDLE_STATUS_{name});\n");
        }
        c += "return 0;\n}\n";
        std::fs::write(&src, c).unwrap();

        let out = match Command::new("cc")
            .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                testkit::cannot_run(
                    "matches_c_header",
                    "no C compiler (cc): header/mirror drift NOT checked",
                );
                return;
            }
            Err(e) => panic!("running cc: {e}"),
        };
        assert!(
            out.status.success(),
            "cc failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let run = Command::new(&bin).output().unwrap();
        assert!(run.status.success());
        let _ = std::fs::remove_dir_all(&dir);

        let c_vals: HashMap<String, (usize, usize)> = String::from_utf8(run.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: Vec<&str> = l.split_whitespace().collect();
                (
                    v[0].to_owned(),
                    (v[1].parse().unwrap(), v[2].parse().unwrap()),
                )
            })
            .collect();

        assert_eq!(c_vals["sizeof"], (Descriptor::SIZE, Descriptor::SIZE));
        assert_eq!(c_vals["gateway_fn"].0, GATEWAY_FN as usize);
        for (name, off, size) in rust_fields() {
            assert_eq!(
                c_vals[name],
                (off, size),
                "field {name}: C (offset, size) vs Rust"
            );
        }
        for (name, status) in STATUSES {
            assert_eq!(c_vals[name].0, status as usize, "SPINDLE_STATUS_{name}");
        }
    }

    const STATUSES: [(&str, Status); 7] = [
        ("OK", Status::Ok),
        ("GUEST_ERROR", Status::GuestError),
        ("TRAP", Status::Trap),
        ("TIMEOUT", Status::Timeout),
        ("REFUSED", Status::Refused),
        ("BAD_ROUTE", Status::BadRoute),
        ("UNDELIVERABLE", Status::Undeliverable),
    ];

    #[test]
    fn round_trip() {
        let d = Descriptor {
            next_fn: 0x0102_0304,
            chain: 0x0506,
            hop: 7,
            status: Status::Trap as u8,
            request_id: 0x1122_3344_5566_7788,
            slot: 0x99aa_bbcc,
            generation: 0xddee_ff00,
            len: 4096,
            reserved: 0,
        };
        let b = d.to_bytes();
        assert_eq!(&b[0..4], &[4, 3, 2, 1], "next_fn little-endian at offset 0");
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(Descriptor::from_bytes(&b), d);
        assert_eq!(d.status(), Ok(Status::Trap));

        // Every byte position must land in some field.
        let all = [0xa5u8; 32];
        assert_eq!(Descriptor::from_bytes(&all).to_bytes(), all);
    }

    #[test]
    fn status_decoding() {
        for (_, s) in STATUSES {
            assert_eq!(Status::try_from(s as u8), Ok(s));
            assert_eq!(u8::from(s), s as u8);
        }
        let d = Descriptor {
            status: 7,
            ..Default::default()
        };
        assert_eq!(d.status(), Err(DescriptorError::UnknownStatus(7)));
    }
}
