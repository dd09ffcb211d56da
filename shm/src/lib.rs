//! Shared memory for Spindle's function chains.
//!
//! The gateway copies each request body once into a slot of its chain's [`Arena`], a
//! sealed memfd mapped by the gateway and by every worker process of the chain. From then
//! on only a 32-byte descriptor naming the slot (index + generation) travels between
//! processes; receivers validate it with [`Arena::check`] before touching the payload.
//!
//! This crate owns the arena: its layout, lock-free cross-process slot allocation and checked
//! access. The descriptor's layout is the wire contract's (`proto`); the arena only checks a
//! descriptor against its slots. It must not know about functions, routing or HTTP.

pub mod arena;

pub use arena::{Arena, ArenaError, SlotRef};
