//! Request bodies into arena slots by size class, and every payload copy the gateway makes,
//! counted (`spindle_payload_bytes_copied_total`).
//!
//! A chain's arena has small slots and, with `arena.large`, a class of large ones (see
//! `shm::arena`). A body announced larger than a small slot (`Content-Length`) gets a large
//! slot at once; a body of unknown length (chunked) starts in a small slot and, when it
//! outgrows it, moves to a large one: the bytes received so far are copied over once
//! (counted as `copy="class_move"`) and the small slot is released. Over the largest class
//! is 413, before reading when the length is announced. No free slot of the class needed is
//! 503 with `Retry-After`, counted per class.

use http_body_util::BodyExt;
use http_edge::{Reply, payload_too_large, text};
use hyper::StatusCode;
use hyper::body::{Body, Incoming};
use shm::{ArenaError, ArenaSpec, ClassSpec, SlotClass};

use chain_runtime::config::ChainSpec;

use crate::dataplane::{ChainRuntime, SlotGuard};
use crate::metrics::ChainMetrics;

/// The arena a chain's config asks for.
pub fn arena_spec(spec: &ChainSpec) -> ArenaSpec {
    ArenaSpec {
        small: ClassSpec {
            slot_size: spec.slot_size,
            slot_count: spec.slots,
        },
        large: spec.large.map(|l| ClassSpec {
            slot_size: l.slot_size,
            slot_count: l.slots,
        }),
    }
}

/// Bytes a body may have and still use a small slot: `arena.large.above`, which leaves the
/// chain's functions room to grow the payload inside the small slot.
fn small_limit(chain: &ChainRuntime) -> u64 {
    let small = u64::from(chain.arena.slot_size());
    chain
        .plan
        .spec
        .large
        .map_or(small, |l| u64::from(l.above).min(small))
}

/// The class a body of at least `len` bytes starts in: small up to `large.above`, else large.
pub fn class_for(chain: &ChainRuntime, len: u64) -> SlotClass {
    if len > small_limit(chain) {
        SlotClass::Large
    } else {
        SlotClass::Small
    }
}

/// 413 before anything is allocated when the announced body is over the largest class:
/// `Content-Length`, or hyper's own reading of the framing (which also catches a
/// Content-Length hyper accepts but a plain number parse does not, `10, 10`).
pub fn too_large_up_front(chain: &ChainRuntime, req: &hyper::Request<Incoming>) -> Option<Reply> {
    let max = u64::from(chain.arena.max_slot_size());
    if http_edge::check_content_length(req.headers(), max).is_err()
        || req.body().size_hint().lower() > max
    {
        return Some(payload_too_large(&chain.plan.spec.name, max));
    }
    None
}

/// How much of a body answered before it was read (413, 503) is still read and dropped, and
/// for how long: closing a connection with unread bytes resets it, and the reset can reach
/// the client before it has read the answer, so it would see "connection reset" instead of
/// the 413 (lingering close, as nginx does). Beyond either bound the connection is closed.
const DISCARD_BYTES: usize = 64 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops `body` in the background (bounded by [`DISCARD_BYTES`] and
/// [`DISCARD_TIME`]), so the early answer written meanwhile reaches the client.
pub fn discard_body(mut body: Incoming) {
    tokio::spawn(async move {
        let mut read = 0usize;
        let _ = tokio::time::timeout(DISCARD_TIME, async {
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len());
                if read > DISCARD_BYTES {
                    break;
                }
            }
        })
        .await;
    });
}

/// A slot of `class`, or the 503 (or 500) to answer instead; a full class is counted.
// The error is the reply itself, returned once per request at most: boxing it would only
// add an allocation to the refusal path.
#[allow(clippy::result_large_err)]
pub fn alloc(
    chain: &ChainRuntime,
    metrics: &ChainMetrics,
    class: SlotClass,
) -> Result<SlotGuard, Reply> {
    match SlotGuard::alloc_in(&chain.arena, class) {
        Ok(slot) => Ok(slot),
        Err(ArenaError::Full) => {
            metrics.alloc_failures.inc();
            metrics.class_alloc_failures(class).inc();
            let in_flight = chain.arena.class(class).map_or(0, |c| c.slot_count);
            let what = match class {
                SlotClass::Small => "",
                SlotClass::Large => " large",
            };
            Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "chain {} is at capacity ({in_flight}{what} requests in flight); retry shortly",
                    chain.plan.spec.name,
                ),
            ))
        }
        Err(e) => Err(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("arena: {e}"),
        )),
    }
}

/// Copies the body into `slot` as hyper delivers it, moving to a large slot when a small
/// one is outgrown. Returns the slot holding the body and its length.
pub async fn copy_body(
    chain: &ChainRuntime,
    metrics: &ChainMetrics,
    mut slot: SlotGuard,
    mut body: Incoming,
) -> Result<(SlotGuard, u32), Reply> {
    let max = chain.arena.max_slot_size() as usize;
    let mut capacity = room_for_body(chain, &slot);
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            text(
                StatusCode::BAD_REQUEST,
                format!("reading request body: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let end = len + data.len();
        if end > max {
            return Err(payload_too_large(&chain.plan.spec.name, max as u64));
        }
        if end > capacity {
            slot = move_to_large(chain, metrics, slot, len)?;
            capacity = room_for_body(chain, &slot);
        }
        chain
            .arena
            .write(slot.slot(), len, &data)
            .map_err(|e| text(StatusCode::INTERNAL_SERVER_ERROR, format!("arena: {e}")))?;
        metrics.copied_request.inc_by(data.len() as u64);
        len = end;
    }
    // Every class's slot size is a u32, so len fits.
    Ok((slot, len as u32))
}

/// How much body `slot` takes before it must move: a small slot up to `large.above`, a
/// large one its whole capacity.
fn room_for_body(chain: &ChainRuntime, slot: &SlotGuard) -> usize {
    let capacity = chain.arena.capacity(slot.slot().index) as usize;
    if capacity <= chain.arena.slot_size() as usize {
        capacity.min(small_limit(chain) as usize)
    } else {
        capacity
    }
}

/// The first `len` bytes of a small slot into a fresh large slot; the small one is released
/// (dropped) once they are copied.
#[allow(clippy::result_large_err)] // as `alloc`
fn move_to_large(
    chain: &ChainRuntime,
    metrics: &ChainMetrics,
    small: SlotGuard,
    len: usize,
) -> Result<SlotGuard, Reply> {
    let internal = |e: ArenaError| text(StatusCode::INTERNAL_SERVER_ERROR, format!("arena: {e}"));
    let large = alloc(chain, metrics, SlotClass::Large)?;
    let from = chain.arena.slot_ptr(small.slot()).map_err(internal)?;
    let to = chain.arena.slot_ptr(large.slot()).map_err(internal)?;
    // SAFETY: we own both slots (their guards), so no well-behaved process touches either;
    // `len` bytes were written into the small slot (len <= its capacity) and the large slot
    // is larger; the slots are distinct, so the ranges do not overlap; raw-pointer copy
    // only, never a slice into shared memory (see `shm::Arena::slot_ptr`).
    unsafe { std::ptr::copy_nonoverlapping(from, to, len) };
    metrics.copied_move.inc_by(len as u64);
    drop(small);
    Ok(large)
}

/// Copies `len` bytes out of the slot for the response (the gateway's copy out).
pub fn read_answer(
    chain: &ChainRuntime,
    metrics: &ChainMetrics,
    slot: &SlotGuard,
    len: u32,
) -> Result<Vec<u8>, ArenaError> {
    let mut payload = vec![0u8; len as usize];
    chain.arena.read(slot.slot(), 0, &mut payload)?;
    metrics.copied_response.inc_by(u64::from(len));
    Ok(payload)
}
