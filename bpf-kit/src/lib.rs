//! What Spindle's eBPF crates (`sockmap-bpf`, `xdp-bpf`) share, so each owns only its
//! programs and their policy:
//! - [`build::skeleton`] (feature `build`): compiles a `.bpf.c` into a libbpf-rs skeleton
//!   with the include paths and warnings every program gets;
//! - [`Pod`]: map keys and values as bytes, for `#[repr(C)]` mirrors of C structs;
//! - [`LayoutCheck`]: compiles a C header with the system compiler and compares every size,
//!   offset and constant with the Rust mirror's, so the two cannot drift;
//! - [`sum_per_cpu`]: a per-CPU counter read as one number.

use std::fmt::Write as _;
use std::path::PathBuf;

#[cfg(feature = "build")]
pub mod build;

/// Plain-old-data map keys and values: any byte pattern of the right length is a valid value.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers (and arrays of them) without padding.
pub unsafe trait Pod: Copy + Default {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod types are repr(C) integers without padding, so every byte is initialised.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast(), size_of::<Self>()) }
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        (bytes.len() == size_of::<Self>()).then(|| {
            // SAFETY: length checked; any bit pattern is valid for Pod; read_unaligned copes
            // with the buffer's alignment.
            unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
        })
    }
}

// SAFETY: integers have no padding and no invalid bit patterns.
unsafe impl Pod for u8 {}
// SAFETY: as above.
unsafe impl Pod for u16 {}
// SAFETY: as above.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}

/// The sum over CPUs of a per-CPU `u64` counter, as libbpf returns it (one value per CPU).
pub fn sum_per_cpu(values: &[Vec<u8>]) -> u64 {
    values
        .iter()
        .filter_map(|b| u64::from_bytes(b))
        .fold(0u64, u64::wrapping_add)
}

/// Why a layout check did not pass.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The check could not run here; tests report it with `testkit::cannot_run`.
    #[error("no C compiler (cc) on this machine: {0}")]
    NoCompiler(std::io::Error),
    #[error("compiling the layout program against {header}: {stderr}")]
    Compile { header: PathBuf, stderr: String },
    #[error("the C header and the Rust mirror disagree:\n--- C\n{c}--- Rust\n{rust}")]
    Mismatch { c: String, rust: String },
    #[error("layout check: {0}")]
    Io(#[from] std::io::Error),
}

/// Compares a C header's struct layouts and constants with what the Rust side expects.
pub struct LayoutCheck {
    header: PathBuf,
    includes: Vec<PathBuf>,
    printfs: String,
    expected: String,
}

impl LayoutCheck {
    pub fn new(header: impl Into<PathBuf>) -> Self {
        LayoutCheck {
            header: header.into(),
            includes: Vec::new(),
            printfs: String::new(),
            expected: String::new(),
        }
    }

    /// Another directory the header's own includes are found in.
    pub fn include(mut self, dir: impl Into<PathBuf>) -> Self {
        self.includes.push(dir.into());
        self
    }

    /// `sizeof(struct c_struct)` must be `size`.
    pub fn size(mut self, c_struct: &str, size: usize) -> Self {
        let _ = writeln!(
            self.printfs,
            "printf(\"{c_struct} %zu\\n\", sizeof(struct {c_struct}));"
        );
        let _ = writeln!(self.expected, "{c_struct} {size}");
        self
    }

    /// `c_struct.field` must sit at `offset` and be `size` bytes.
    pub fn field(mut self, c_struct: &str, field: &str, offset: usize, size: usize) -> Self {
        let _ = writeln!(
            self.printfs,
            "printf(\"{c_struct}.{field} %zu %zu\\n\", offsetof(struct {c_struct}, {field}), \
             sizeof(((struct {c_struct} *)0)->{field}));"
        );
        let _ = writeln!(self.expected, "{c_struct}.{field} {offset} {size}");
        self
    }

    /// The C expression `expr` (a macro or enum constant) must equal `value`.
    pub fn constant(mut self, expr: &str, value: i64) -> Self {
        let _ = writeln!(
            self.printfs,
            "printf(\"{expr} %lld\\n\", (long long)({expr}));"
        );
        let _ = writeln!(self.expected, "{expr} {value}");
        self
    }

    /// Compiles and runs the comparison program in a fresh temporary directory.
    pub fn run(self) -> Result<(), LayoutError> {
        let dir = std::env::temp_dir().join(format!(
            "spindle-layout-{}-{}",
            std::process::id(),
            self.header
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir)?;
        let src = format!(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"{}\"\nint main(void) {{\n{}return 0;\n}}\n",
            self.header.display(),
            self.printfs
        );
        let source = dir.join("layout.c");
        std::fs::write(&source, src)?;
        let exe = dir.join("layout");
        let mut cc = std::process::Command::new("cc");
        for include in &self.includes {
            cc.arg("-I").arg(include);
        }
        let out = cc
            .arg(&source)
            .arg("-o")
            .arg(&exe)
            .output()
            .map_err(LayoutError::NoCompiler)?;
        if !out.status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(LayoutError::Compile {
                header: self.header,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let run = std::process::Command::new(&exe).output();
        let _ = std::fs::remove_dir_all(&dir);
        let c = String::from_utf8_lossy(&run?.stdout).into_owned();
        if c != self.expected {
            return Err(LayoutError::Mismatch {
                c,
                rust: self.expected,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Pair {
        a: u32,
        b: u64,
    }

    fn header(text: &str, tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("bpf-kit-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pair.h");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn check(path: &Path) -> Result<(), LayoutError> {
        LayoutCheck::new(path)
            .size("pair", size_of::<Pair>())
            .field("pair", "a", std::mem::offset_of!(Pair, a), 4)
            .field("pair", "b", std::mem::offset_of!(Pair, b), 8)
            .constant("PAIR_MAX", 7)
            .run()
    }

    /// The check passes on a matching header and fails, saying what differs, on one that
    /// does not: it is not a check that cannot fail.
    #[test]
    fn a_layout_check_tells_matching_from_drifted_headers() {
        let good = header(
            "#include <stdint.h>\nstruct pair { uint32_t a; uint64_t b; };\n#define PAIR_MAX 7\n",
            "good",
        );
        match check(&good) {
            Err(LayoutError::NoCompiler(e)) => {
                // Every machine that builds the eBPF crates has cc (setup.sh): say so loudly.
                panic!("no C compiler: {e}");
            }
            other => other.unwrap(),
        }
        let drifted = header(
            "#include <stdint.h>\nstruct pair { uint32_t a; uint32_t b; };\n#define PAIR_MAX 8\n",
            "drifted",
        );
        match check(&drifted) {
            Err(LayoutError::Mismatch { c, rust }) => {
                assert!(c.contains("pair 8"), "{c}");
                assert!(rust.contains("pair 16"), "{rust}");
                assert!(c.contains("PAIR_MAX 8"), "{c}");
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn pod_round_trips_and_refuses_the_wrong_length() {
        let p = 0x0102_0304_0506_0708u64;
        assert_eq!(u64::from_bytes(p.as_bytes()), Some(p));
        assert_eq!(u64::from_bytes(&[0; 7]), None);
        assert_eq!(
            sum_per_cpu(&[3u64.as_bytes().to_vec(), 4u64.as_bytes().to_vec()]),
            7
        );
    }
}
