//! Descriptor checks against a model: an arena is driven through allocations (each for a
//! request id) and releases chosen by the input, and every descriptor the input builds
//! (from a live slot with fields changed, or from raw bytes) must be accepted exactly when
//! the model says a well-behaved sender could have sent it. [`arena`] checks
//! `shm::ArenaView::check`, a worker's view of the arena (the gateway's `shm::Arena::check`
//! must agree with it on every descriptor); `descriptor_worker.rs` runs the worker's whole
//! check through [`run_with`].

use arbitrary::{Arbitrary, Unstructured};
use proto::{Descriptor, Status};
use shm::{Arena, ArenaSpec, ArenaView, ClassSpec, SlotClass, SlotRef};

pub const SLOT_SIZE: u32 = 4096;
pub const SLOTS: u32 = 8;
/// The large class: indices SLOTS..SLOTS + LARGE_SLOTS, LARGE_SLOT_SIZE bytes each.
pub const LARGE_SLOT_SIZE: u32 = 16384;
pub const LARGE_SLOTS: u32 = 2;
const ALL_SLOTS: u32 = SLOTS + LARGE_SLOTS;

/// The model's capacity of slot `index`: which class its index is in (0 outside both).
fn capacity(index: u32) -> u32 {
    match index {
        i if i < SLOTS => SLOT_SIZE,
        i if i < ALL_SLOTS => LARGE_SLOT_SIZE,
        _ => 0,
    }
}

/// What the input asks for next.
#[derive(Arbitrary, Debug)]
enum Op {
    Alloc,
    AllocLarge,
    /// Releases the live slot at this position (modulo the live count).
    Release(u8),
    /// Releases a slot released before, which the arena must refuse.
    ReleaseStale(u8),
    /// A descriptor built from a live slot, then changed.
    Check {
        live: u8,
        edit: Edit,
        addressed: bool,
    },
    /// A descriptor from 32 raw bytes.
    Raw([u8; Descriptor::SIZE]),
    /// A write then read of a slot at an offset: in bounds exactly when the model says so.
    Access {
        live: u8,
        offset: u16,
        len: u16,
    },
}

/// How a genuine descriptor is changed before it is checked.
#[derive(Arbitrary, Debug)]
enum Edit {
    None,
    Generation(u32),
    Slot(u32),
    Len(u32),
    Reserved(u32),
    Status(u8),
    NextFn(u32),
    Chain(u16),
    RequestId(u64),
}

/// The addressing a checker expects of a descriptor before it looks at the arena.
pub struct Addressing {
    pub fn_id: u32,
    pub chain: u16,
}

/// Runs `data` against `check`, which must accept a descriptor iff it is addressed as
/// `addressing` says (None: the arena alone, which does not look at the address) and the
/// arena holds its slot at its generation with `len` and `reserved` in bounds.
pub fn run_with(
    data: &[u8],
    addressing: Option<Addressing>,
    check: impl Fn(&ArenaView, &Descriptor) -> Result<SlotRef, String>,
) {
    let mut u = Unstructured::new(data);
    // A fresh arena per input: generations then depend on this input alone.
    let spec = ArenaSpec {
        small: ClassSpec {
            slot_size: SLOT_SIZE,
            slot_count: SLOTS,
        },
        large: Some(ClassSpec {
            slot_size: LARGE_SLOT_SIZE,
            slot_count: LARGE_SLOTS,
        }),
    };
    let arena = Arena::create_classes("spindle-fuzz-descriptor", &spec).expect("creating an arena");
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().expect("dup");
    let view = ArenaView::from_fds(dup(arena.meta_fd()), dup(arena.payload_fd()))
        .expect("a worker's view of the arena");
    // Each live slot with the request id it was allocated for.
    let mut live: Vec<(SlotRef, u64)> = Vec::new();
    let mut released: Vec<SlotRef> = Vec::new();
    let mut next_request = 1u64;
    let (fn_id, chain) = addressing.as_ref().map_or((0, 0), |a| (a.fn_id, a.chain));
    let in_arena = |d: &Descriptor, live: &[(SlotRef, u64)]| {
        d.reserved == 0
            && d.len <= capacity(d.slot)
            && live.contains(&(
                SlotRef {
                    index: d.slot,
                    generation: d.generation,
                },
                d.request_id,
            ))
    };
    let expect_ok = |d: &Descriptor, live: &[(SlotRef, u64)]| {
        let addressed = addressing.as_ref().is_none_or(|a| {
            d.next_fn == a.fn_id && d.chain == a.chain && d.status == Status::Ok as u8
        });
        addressed && in_arena(d, live)
    };
    let checked = |d: &Descriptor, live: &[(SlotRef, u64)]| {
        // The wire form is exactly 32 bytes and round-trips.
        assert_eq!(Descriptor::from_bytes(&d.to_bytes()), *d);
        let _ = proto::worker::is_control(d);
        // The gateway's own check of the slot agrees with the model (and so with workers').
        assert_eq!(
            arena.check(d).is_ok(),
            in_arena(d, live),
            "gateway check of {d:?}"
        );
        let got = check(&view, d);
        let want = expect_ok(d, live);
        match &got {
            Ok(slot) => {
                assert!(want, "accepted {d:?}; live slots {live:?}");
                assert_eq!(
                    *slot,
                    SlotRef {
                        index: d.slot,
                        generation: d.generation
                    }
                );
            }
            Err(why) => {
                assert!(!want, "refused {d:?} ({why}); live slots {live:?}");
                assert!(!why.is_empty());
            }
        }
    };
    // Arbitrary gives default values once the input runs out: stop there.
    while !u.is_empty() {
        let Ok(op) = Op::arbitrary(&mut u) else { break };
        match op {
            Op::Alloc | Op::AllocLarge => {
                let (class, range) = match op {
                    Op::Alloc => (SlotClass::Small, 0..SLOTS),
                    _ => (SlotClass::Large, SLOTS..ALL_SLOTS),
                };
                match arena.alloc_in(class, next_request) {
                    Ok(slot) => {
                        assert!(
                            range.contains(&slot.index)
                                && !live.iter().any(|(s, _)| s.index == slot.index)
                        );
                        live.push((slot, next_request));
                        next_request += 1;
                    }
                    Err(shm::ArenaError::Full) => assert_eq!(
                        live.iter()
                            .filter(|(s, _)| range.contains(&s.index))
                            .count(),
                        range.len()
                    ),
                    Err(e) => panic!("alloc: {e}"),
                }
            }
            Op::Release(i) if !live.is_empty() => {
                let (slot, _) = live.swap_remove(i as usize % live.len());
                arena.release(slot).expect("releasing a live slot");
                released.push(slot);
            }
            Op::Release(_) => {}
            Op::ReleaseStale(i) if !released.is_empty() => {
                let slot = released[i as usize % released.len()];
                arena.release(slot).expect_err("releasing a slot twice");
            }
            Op::ReleaseStale(_) => {}
            Op::Check {
                live: i,
                edit,
                addressed,
            } => {
                let Some(&(slot, request_id)) = live.get(i as usize % live.len().max(1)) else {
                    continue;
                };
                let mut d = Descriptor {
                    next_fn: if addressed {
                        fn_id
                    } else {
                        fn_id.wrapping_add(1)
                    },
                    chain,
                    hop: 0,
                    status: Status::Ok as u8,
                    request_id,
                    slot: slot.index,
                    generation: slot.generation,
                    len: 0,
                    reserved: 0,
                };
                match edit {
                    Edit::None => {}
                    Edit::Generation(g) => d.generation = g,
                    Edit::Slot(s) => d.slot = s,
                    Edit::Len(l) => d.len = l,
                    Edit::Reserved(r) => d.reserved = r,
                    Edit::Status(s) => d.status = s,
                    Edit::NextFn(f) => d.next_fn = f,
                    Edit::Chain(c) => d.chain = c,
                    Edit::RequestId(r) => d.request_id = r,
                }
                checked(&d, &live);
            }
            Op::Raw(bytes) => checked(&Descriptor::from_bytes(&bytes), &live),
            Op::Access {
                live: i,
                offset,
                len,
            } => {
                let Some(&(slot, _)) = live.get(i as usize % live.len().max(1)) else {
                    continue;
                };
                let (offset, len) = (offset as usize, len as usize);
                let fits = offset + len <= capacity(slot.index) as usize;
                let src = vec![0xa5u8; len];
                assert_eq!(view.write(slot, offset, &src).is_ok(), fits);
                let mut dst = vec![0u8; len];
                assert_eq!(view.read(slot, offset, &mut dst).is_ok(), fits);
                if fits {
                    assert_eq!(dst, src);
                }
            }
        }
        assert_eq!(arena.free_slots() as usize, ALL_SLOTS as usize - live.len());
    }
}

/// `shm::ArenaView::check` alone.
pub fn arena(data: &[u8]) {
    run_with(data, None, |view, d| {
        view.check(d).map_err(|e| e.to_string())
    });
}
