//! In-place calls: a large request's slot mapped into the guest's linear memory, so a guest
//! that exports `spindle_handle_inplace` reads its input and writes its output where they
//! are, instead of the slot → linear memory → slot copies (docs/guest-abi.md "In-place
//! calls").
//!
//! The window is a range of the guest's own heap: the host reserves it once per instance
//! with the guest's `spindle_alloc(capacity + 2 MiB)` (so the guest's allocator never hands
//! it out) and aligns it to 2 MiB on the host. Each large slot has a *home* in the worker's
//! address space: a shared mapping of its range of the arena memfd, made on first use and
//! kept. A call moves the home's page tables into the window (`mremap` with
//! `MREMAP_DONTUNMAP`: 2 MiB-aligned ranges move a page-table page at a time, no page is
//! faulted), runs the guest, moves them back and puts fresh anonymous zero pages over the
//! window. Mapping the slot afresh per call instead costs a fault per page (~0.8 µs per 4 KiB
//! here, slower than copying); moving page tables costs ~15 µs for a 64 KiB input and ~45
//! µs for 16 MiB (docs/guest-abi.md has the table). `DONTUNMAP` keeps both ranges mapped
//! throughout, so no other thread's `mmap` can land in a hole in between.
//!
//! So between calls — where images are captured (`FunctionHost::snapshot`, a zygote's warm
//! image, a remote prepare) and where any other guest code runs — the window holds nothing
//! of any request and no image shares the arena: an image records zeros there.
//!
//! Only wasmer's static memory style keeps the base in place when the guest grows its
//! memory; a dynamic memory would be moved (copied) away from under the window, so the host
//! refuses in-place calls unless the memory is static and its base has not moved.
//! `isolation: fresh_per_request` keeps copying: its reset maps the image over linear
//! memory and tracks written pages there, which a foreign mapping in the middle would break.

use std::io;
use std::os::fd::RawFd;

/// Host page size large slots are made of.
pub const PAGE: usize = 4096;
/// Alignment of windows and homes: page tables move a whole 2 MiB page-table page at a time
/// when both ranges are aligned to it.
pub const ALIGN: usize = 2 << 20;

/// The smallest input served in place; smaller ones are copied. Measured with
/// `cargo test -p chain-runtime --release --lib -- --ignored --nocapture inplace_threshold`
/// (copy in and out vs moving the slot in and out, the guest touching every page of its input
/// in both; 2-vCPU VM, 2026-12-01): 256 KiB copy 6.2 µs / in place 13.8 µs, 512 KiB 17.4 /
/// 16.7, 1 MiB 43.8 / 21.5, 4 MiB 196 / 64, 16 MiB 1.3 ms / 0.66 ms.
pub const MIN_INPLACE_BYTES: usize = 512 * 1024;

const MREMAP_DONTUNMAP: libc::c_int = 4;

/// A reserved window of guest memory: where slots are moved in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Guest address of the window's first byte; `base + guest` is 2 MiB-aligned.
    pub guest: u32,
    /// Bytes the window spans.
    pub capacity: usize,
}

impl Window {
    /// The window inside a buffer of `capacity + ALIGN` bytes the guest allocated at `ptr`,
    /// placed so that its host address (`base + guest`) is 2 MiB-aligned; None when that does
    /// not fit 32-bit guest addresses.
    pub fn inside(base: usize, ptr: u32, capacity: usize) -> Option<Window> {
        let host = base
            .checked_add(ptr as usize)?
            .checked_next_multiple_of(ALIGN)?;
        let guest = host - base;
        guest
            .checked_add(capacity)
            .filter(|&end| end <= u32::MAX as usize + 1)?;
        Some(Window {
            guest: u32::try_from(guest).ok()?,
            capacity,
        })
    }
}

/// One slot's home: its memfd range mapped shared, 2 MiB-aligned, inside a reservation.
struct Home {
    /// The file's identity (device, inode): an fd number can name another file later.
    file: (u64, u64),
    offset: u64,
    capacity: usize,
    addr: *mut u8,
    reservation: (*mut u8, usize),
}

/// The homes of the slots this worker has served in place, made on first use.
#[derive(Default)]
pub struct Homes {
    homes: Vec<Home>,
}

// SAFETY: the pointers are addresses of mappings owned by this value for the process; they
// carry no thread affinity, and the value is only used by whoever holds it mutably.
unsafe impl Send for Homes {}

/// Homes kept at most; past it the oldest is unmapped (it is made again when needed).
const MAX_HOMES: usize = 64;

impl Homes {
    /// The home of `capacity` bytes of `fd` at `offset` (page-aligned), made on first use.
    pub fn get(&mut self, fd: RawFd, offset: u64, capacity: usize) -> io::Result<*mut u8> {
        // SAFETY: fstat only writes the struct it is given.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; a bad fd is an error, not UB.
        if unsafe { libc::fstat(fd, &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let file = (st.st_dev, st.st_ino);
        if let Some(h) = self
            .homes
            .iter()
            .find(|h| (h.file, h.offset, h.capacity) == (file, offset, capacity))
        {
            return Ok(h.addr);
        }
        if self.homes.len() >= MAX_HOMES {
            self.homes.remove(0);
        }
        let len = capacity + ALIGN;
        // SAFETY: a fresh PROT_NONE reservation at an address of the kernel's choosing.
        let reservation = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reservation == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let reservation = reservation.cast::<u8>();
        let home = Home {
            file,
            offset,
            capacity,
            addr: reservation.wrapping_add(reservation.align_offset(ALIGN)),
            reservation: (reservation, len),
        };
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: the aligned range lies inside our reservation (ALIGN bytes of slack); the
        // memfd is sealed against shrinking, so no access past its end can SIGBUS.
        let got = unsafe {
            libc::mmap(
                home.addr.cast(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                offset,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = home.addr;
        self.homes.push(home);
        Ok(addr)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // SAFETY: our own reservation (the home mapping inside it goes with it).
        unsafe { libc::munmap(self.reservation.0.cast(), self.reservation.1) };
    }
}

/// Moves a home's page tables into the window: the guest sees the slot at the window.
///
/// # Safety
/// `window..window + capacity` must be 2 MiB-aligned guest memory this process owns that
/// nothing references as Rust data; `home` a home of that capacity from [`Homes::get`]. The
/// caller must [`leave`] before anything but the guest call that needs it runs.
pub unsafe fn enter(home: *mut u8, window: *mut u8, capacity: usize) -> io::Result<()> {
    // SAFETY: per the contract; MREMAP_FIXED replaces the window's anonymous pages,
    // DONTUNMAP leaves the home mapped (without page tables) so no hole opens there.
    unsafe { remap(home, window, capacity) }
}

/// Moves the page tables back home and puts fresh anonymous zero pages over the window.
///
/// # Safety
/// As [`enter`], with the same `home` and `window`.
pub unsafe fn leave(window: *mut u8, home: *mut u8, capacity: usize) -> io::Result<()> {
    // SAFETY: per the contract. Whether or not the move back works, the window must become
    // anonymous memory again: a failed move leaves the slot's pages there otherwise (and
    // they simply fault in again at home next time).
    let moved = unsafe { remap(window, home, capacity) };
    // SAFETY: as above.
    let filled = unsafe { fill_anonymous(window, capacity) };
    moved.and(filled)
}

/// # Safety
/// `from` and `to` are mappings of `capacity` bytes the caller owns, referenced by nothing.
unsafe fn remap(from: *mut u8, to: *mut u8, capacity: usize) -> io::Result<()> {
    // SAFETY: the caller's contract.
    let got = unsafe {
        libc::mremap(
            from.cast(),
            capacity,
            capacity,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | MREMAP_DONTUNMAP,
            to.cast::<libc::c_void>(),
        )
    };
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Puts fresh private zero pages over `addr..addr + capacity`.
///
/// # Safety
/// The range is memory the caller owns and nothing references.
pub unsafe fn fill_anonymous(addr: *mut u8, capacity: usize) -> io::Result<()> {
    // SAFETY: replaces exactly the range with anonymous memory, as linear memory is.
    let got = unsafe {
        libc::mmap(
            addr.cast(),
            capacity,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    fn memfd(len: usize) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"inplace-test", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        nix::unistd::ftruncate(&fd, len as libc::off_t).unwrap();
        fd
    }

    /// An anonymous region standing in for linear memory.
    fn region(len: usize) -> *mut u8 {
        // SAFETY: a fresh private anonymous mapping; unmapped by the caller.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    #[test]
    fn window_is_2mib_aligned_on_the_host_inside_the_buffer() {
        let base = 0x7f00_0010_0000; // 1 MiB past a 2 MiB boundary
        let w = Window::inside(base, 1, 8192).unwrap();
        assert_eq!((base + w.guest as usize) % ALIGN, 0);
        assert_eq!(w.guest as usize, ALIGN - (1 << 20));
        assert!(
            w.guest as usize + 8192 <= 1 + 8192 + ALIGN,
            "inside the buffer"
        );
        assert_eq!(Window::inside(0, 0, 10).unwrap().guest, 0);
        assert_eq!(Window::inside(0, u32::MAX - 100, 4096), None);
    }

    /// An aligned stand-in for linear memory: `len` bytes at a 2 MiB boundary.
    fn aligned_region(len: usize) -> *mut u8 {
        let r = region(len + ALIGN);
        r.wrapping_add(r.align_offset(ALIGN))
    }

    #[test]
    fn a_window_sees_the_slot_while_entered_and_zeros_after() {
        const CAP: usize = ALIGN;
        let fd = memfd(2 * CAP);
        let file = std::fs::File::from(fd.try_clone().unwrap());
        file.write_all_at(b"slot bytes", CAP as u64).unwrap();
        let mem = aligned_region(3 * CAP);
        let mut homes = Homes::default();
        let home = homes.get(fd.as_raw_fd(), CAP as u64, CAP).unwrap();
        assert_eq!(home as usize % ALIGN, 0);
        assert_eq!(
            homes.get(fd.as_raw_fd(), CAP as u64, CAP).unwrap(),
            home,
            "kept"
        );
        for round in 0..3u8 {
            // SAFETY: the test region is ours; nothing references it as Rust data.
            unsafe {
                let window = mem.add(CAP);
                enter(home, window, CAP).unwrap();
                let mut seen = [0u8; 10];
                std::ptr::copy_nonoverlapping(window, seen.as_mut_ptr(), 10);
                assert_eq!(&seen, b"slot bytes");
                window.add(PAGE).write(b'0' + round);
                leave(window, home, CAP).unwrap();
                assert!((0..CAP).all(|i| *window.add(i) == 0), "zeros after leaving");
            }
            let mut back = [0u8; 1];
            file.read_exact_at(&mut back, (CAP + PAGE) as u64).unwrap();
            assert_eq!(
                back[0],
                b'0' + round,
                "the guest's write landed in the slot"
            );
        }
    }

    // ---- in-place calls through a real FunctionHost ----

    use crate::config::{FunctionSpec, Instances, Isolation, ModuleMode, StartMode};
    use crate::host::{FunctionHost, Outcome, SlotIo, SlotMapping};

    const SLOT: usize = 1 << 20;

    /// A reactor with a bump allocator over 5 MiB of memory; its copy path echoes, its
    /// in-place path runs `inplace_body` (locals $p $n $cap).
    fn module(inplace_body: Option<&str>) -> String {
        let inplace = inplace_body.map_or(String::new(), |body| {
            format!(
                r#"(func (export "spindle_handle_inplace") (param $p i32) (param $n i32)
                      (param $cap i32) (result i32) (local $i i32) (local $b i32)
                      {body})"#
            )
        });
        format!(
            r#"(module
                (import "spindle" "output" (func $output (param i32 i32)))
                (import "spindle" "error" (func $error (param i32 i32)))
                (memory (export "memory") 80)
                (global $bump (mut i32) (i32.const 1024))
                (data (i32.const 16) "in-place failure")
                (func (export "spindle_alloc") (param $n i32) (result i32)
                    (local $p i32)
                    (local.set $p (global.get $bump))
                    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
                    (local.get $p))
                (func (export "spindle_handle") (param $p i32) (param $n i32) (result i32)
                    (call $output (local.get $p) (local.get $n)) (i32.const 0))
                {inplace})"#
        )
    }

    /// ASCII uppercase of $p[0..$n) where it is; returns $n.
    const UPPER: &str = r#"
        (block $done (loop $next
            (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
            (local.set $b (i32.load8_u (i32.add (local.get $p) (local.get $i))))
            (if (i32.and (i32.ge_u (local.get $b) (i32.const 97))
                         (i32.le_u (local.get $b) (i32.const 122)))
                (then (i32.store8 (i32.add (local.get $p) (local.get $i))
                                  (i32.sub (local.get $b) (i32.const 32)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $next)))
        (local.get $n)"#;

    fn new_host(tag: &str, wat: &str, isolation: Isolation) -> FunctionHost {
        let path =
            std::env::temp_dir().join(format!("spindle-inplace-{tag}-{}.wat", std::process::id()));
        std::fs::write(&path, wat).unwrap();
        let spec = FunctionSpec {
            name: tag.to_string(),
            module: path,
            instances: Instances::fixed(1),
            wait_queue: 256,
            memory_limit: 8 << 20,
            timeout: Duration::from_secs(5),
            fuel: Some(100_000_000),
            mode: ModuleMode::Reactor,
            env: vec![],
            start: StartMode::Exec,
            isolation,
            idle_spin: Duration::ZERO,
            args: Vec::new(),
            files: Vec::new(),
        };
        FunctionHost::new(&spec, None).unwrap()
    }

    /// A slot in a memfd, as the worker's `ArenaSlot` presents one.
    struct MemfdSlot {
        file: std::fs::File,
        input_len: usize,
        reads: usize,
        writes: usize,
        in_place: Option<(usize, usize)>,
    }

    impl MemfdSlot {
        fn new(input: &[u8]) -> MemfdSlot {
            let file = std::fs::File::from(memfd(SLOT));
            file.write_all_at(input, 0).unwrap();
            MemfdSlot {
                file,
                input_len: input.len(),
                reads: 0,
                writes: 0,
                in_place: None,
            }
        }

        fn bytes(&self, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.file.read_exact_at(&mut v, 0).unwrap();
            v
        }
    }

    impl SlotIo for MemfdSlot {
        fn input_len(&self) -> usize {
            self.input_len
        }
        fn read_input(&self, dst: &mut [u8]) {
            self.file.read_exact_at(dst, 0).unwrap();
            // Interior counting is not worth a Cell here: reads are checked via `in_place`.
        }
        fn capacity(&self) -> usize {
            SLOT
        }
        fn write_output(&mut self, src: &[u8]) {
            self.writes += 1;
            self.file.write_all_at(src, 0).unwrap();
        }
        fn mapping(&self) -> Option<SlotMapping> {
            Some(SlotMapping {
                fd: self.file.as_raw_fd(),
                offset: 0,
                capacity: SLOT,
            })
        }
        fn served_in_place(&mut self, input: usize, output: usize) {
            self.reads += 1;
            self.in_place = Some((input, output));
        }
    }

    /// A large input, with a marker to look for in images.
    fn input(len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = b"inplace-marker "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect();
        v[len - 1] = b'z';
        v
    }

    fn image_contains(host: &mut FunctionHost, needle: &[u8]) -> bool {
        let snapshot = host.snapshot().unwrap();
        let file = std::fs::File::from(snapshot.image().try_clone_to_owned().unwrap());
        let mut image = Vec::new();
        use std::io::Read;
        (&file).read_to_end(&mut image).unwrap();
        image.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn a_large_input_is_handled_in_the_mapped_slot_and_no_image_holds_it() {
        let mut host = new_host("upper", &module(Some(UPPER)), Isolation::Reuse);
        let data = input(600 * 1024);
        for round in 0..3 {
            let mut slot = MemfdSlot::new(&data);
            let outcome = host.invoke(&mut slot);
            assert_eq!(
                outcome,
                Outcome::Done {
                    output_len: data.len(),
                    next: None
                },
                "round {round}"
            );
            assert_eq!(slot.in_place, Some((data.len(), data.len())));
            assert_eq!(slot.writes, 0, "no copy out");
            assert!(
                slot.bytes(data.len()) == data.to_ascii_uppercase(),
                "round {round}: the slot holds the uppercased input"
            );
        }
        // Between calls the window holds zeros: an image of the instance has none of the
        // request's bytes, in either case.
        assert!(!image_contains(&mut host, b"INPLACE-MARKER"));
        assert!(!image_contains(&mut host, b"inplace-marker"));

        // The same request on the copy path (a module without the export) leaves the input
        // in linear memory, where an image finds it: the check above can fail.
        let mut copying = new_host("copy", &module(None), Isolation::Reuse);
        let mut slot = MemfdSlot::new(&data);
        copying.invoke(&mut slot);
        assert_eq!((slot.in_place, slot.writes), (None, 1));
        assert!(image_contains(&mut copying, b"inplace-marker"));
    }

    #[test]
    fn small_inputs_and_fresh_per_request_take_the_copy_path() {
        let mut host_ = new_host("small", &module(Some(UPPER)), Isolation::Reuse);
        let mut slot = MemfdSlot::new(b"small input");
        assert!(matches!(
            host_.invoke(&mut slot),
            Outcome::Done { output_len: 11, .. }
        ));
        assert_eq!((slot.in_place, slot.writes), (None, 1));
        assert_eq!(slot.bytes(11), b"small input", "echoed by the copy path");

        let mut fresh = new_host("fresh", &module(Some(UPPER)), Isolation::FreshPerRequest);
        let data = input(600 * 1024);
        let mut slot = MemfdSlot::new(&data);
        assert!(matches!(fresh.invoke(&mut slot), Outcome::Done { .. }));
        assert_eq!((slot.in_place, slot.writes), (None, 1));
    }

    #[test]
    fn misbehaving_in_place_handlers_fail_cleanly_and_the_instance_recovers() {
        let data = input(600 * 1024);
        for (tag, body, want) in [
            (
                "toolong",
                "(i32.add (local.get $cap) (i32.const 1))",
                "the slot holds",
            ),
            (
                "negative",
                "(i32.const -1)",
                "returned -1 without an error message",
            ),
            (
                "error",
                "(call $error (i32.const 16) (i32.const 16)) (i32.const -1)",
                "in-place failure",
            ),
            (
                "output",
                "(call $output (local.get $p) (local.get $n)) (local.get $n)",
                "spindle.output cannot be called",
            ),
            ("trap", "unreachable", "unreachable"),
        ] {
            let mut h = new_host(tag, &module(Some(body)), Isolation::Reuse);
            let mut slot = MemfdSlot::new(&data);
            match h.invoke(&mut slot) {
                Outcome::Failed { message, .. } => {
                    assert!(message.contains(want), "{tag}: {message}")
                }
                other => panic!("{tag}: {other:?}"),
            }
            // Whatever happened, the next request is served (by a rebuilt instance after a
            // trap), and no image of the instance holds the failed request's bytes.
            let mut small = MemfdSlot::new(b"next");
            assert!(
                matches!(h.invoke(&mut small), Outcome::Done { output_len: 4, .. }),
                "{tag}"
            );
            assert!(!image_contains(&mut h, b"inplace-marker"), "{tag}");
        }
    }

    /// Copy in + copy out vs moving the slot in and out (enter/leave), for the sizes a large
    /// slot carries; the "guest" touches every page of its input in both. The slot's pages
    /// stay resident in its home between rounds, as a warm slot's do.
    #[test]
    #[ignore]
    fn inplace_threshold() {
        const CAP: usize = 16 << 20;
        let fd = memfd(CAP);
        let slot = region(CAP);
        // SAFETY: our fresh region; the memfd mapped shared over it, as the gateway has it.
        unsafe {
            libc::mmap(
                slot.cast(),
                CAP,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            );
            std::ptr::write_bytes(slot, 7, CAP);
        }
        let mem = aligned_region(2 * CAP);
        // SAFETY: warming our own region.
        unsafe { std::ptr::write_bytes(mem, 1, 2 * CAP) };
        let window = mem.wrapping_add(CAP);
        let mut homes = Homes::default();
        let home = homes.get(fd.as_raw_fd(), 0, CAP).unwrap();
        let touch = |p: *mut u8, n: usize| {
            for i in (0..n).step_by(PAGE) {
                // SAFETY: within the region/mapping the caller passes.
                unsafe {
                    p.add(i)
                        .write_volatile(p.add(i).read_volatile().wrapping_add(1))
                };
            }
        };
        let mut size = 64 * 1024;
        while size <= CAP {
            let rounds = (64 << 20) / size;
            let (mut copy, mut moved) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..rounds {
                let t = Instant::now();
                // SAFETY: both regions are ours and at least `size` long.
                unsafe {
                    std::ptr::copy_nonoverlapping(slot, mem, size);
                    touch(mem, size);
                    std::ptr::copy_nonoverlapping(mem, slot, size);
                }
                copy += t.elapsed();
                let t = Instant::now();
                // SAFETY: the window is ours and aligned; moved back out right after.
                unsafe {
                    enter(home, window, CAP).unwrap();
                    touch(window, size);
                    leave(window, home, CAP).unwrap();
                }
                moved += t.elapsed();
            }
            eprintln!(
                "{:>6} KiB: copy {:>9.1?}  in place {:>9.1?}",
                size / 1024,
                copy / rounds as u32,
                moved / rounds as u32
            );
            size *= 2;
        }
    }
}
