//! Shared memory for Spindle's function chains.
//!
//! The gateway copies each request body once into a slot of its chain's [`Arena`], a
//! sealed memfd mapped by the gateway and by every worker process of the chain. From then
//! on only a 32-byte [`Descriptor`] naming the slot (index + generation) travels between
//! processes; receivers validate it with [`Arena::check`] before touching the payload.
//!
//! This crate owns both: the arena (layout, lock-free cross-process slot allocation,
//! checked access) and the Rust mirror of the descriptor defined in
//! `include/spindle_desc.h`.

pub mod arena;
pub mod descriptor;

pub use arena::{Arena, ArenaError, SlotRef};
pub use descriptor::{Descriptor, DescriptorError, GATEWAY_FN, Status};
