//! Shared memory for Spindle's function chains.
//!
//! The gateway copies each request body once into a slot of its chain's [`Arena`], a
//! sealed memfd mapped by the gateway and by every worker process of the chain. From then
//! on only a 32-byte descriptor naming the slot (index, generation, request id) travels
//! between processes; receivers validate it with [`ArenaView::check`] before touching the
//! payload. Which slots are free, and each slot's generation and request, live where workers
//! cannot write them: the gateway's memory and a second memfd the kernel lets workers map
//! read-only.
//!
//! This crate owns the arena: its layout, lock-free slot allocation in the gateway, and
//! checked access from every process. The descriptor's layout is the wire contract's (`proto`); the arena only checks a
//! descriptor against its slots. It must not know about functions, routing or HTTP.

pub mod arena;

pub use arena::{
    Arena, ArenaError, ArenaSpec, ArenaView, ClassSpec, DEFAULT_WARM_LARGE_SLOTS, SlotClass,
    SlotRef,
};
