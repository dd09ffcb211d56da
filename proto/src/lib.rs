//! Spindle's wire contract: every layout and number that crosses a process boundary, defined
//! once.
//!
//! - [`descriptor`]: the 32-byte chain descriptor. `include/spindle_desc.h` is its one
//!   definition, used by the eBPF programs; [`Descriptor`] mirrors it and a test compiles the
//!   header to check that size and offsets agree.
//! - [`worker`]: how the gateway hands a worker process its resources (the fd numbers), the
//!   control messages on a worker's socket, and the exit codes a worker reports with.
//! - [`control`]: the control messages on a worker's control socket (prepare an image of the
//!   running instance; the answer, whose image memfd travels as `SCM_RIGHTS`).
//! - [`image`]: the image descriptor that names a prepared (forkable) instance image across
//!   nodes: its parent's page server, the key that gates it, the module and engine it needs;
//!   binary and text forms.
//! - [`meta`]: image metadata, what a child restores besides memory pages: module and engine
//!   identity, memory size, which pages hold data, every global, every table's size.
//! - [`pages`]: the page-server protocol a forked child uses to fetch its parent's memory
//!   pages over TCP: framing, the frames, and the challenge-response proof of the key.
//! - [`zygote`]: the messages between the gateway and a function's zygote, the process that
//!   forks warm instances of it (local fork).
//!
//! This crate owns layouts and their encoding only. It holds no policy and does no I/O of its
//! own (the page-server frame helpers read and write a stream the caller opened): the arena
//! that slots live in is `shm`'s, the routing maps are `sockmap-bpf`'s, and what a worker does
//! with a descriptor is `chain-runtime`'s.

pub mod control;
pub mod descriptor;
pub mod image;
pub mod meta;
pub mod pages;
#[cfg(test)]
mod test_rng;
pub mod worker;
pub mod zygote;

pub use descriptor::{Descriptor, DescriptorError, GATEWAY_FN, Status};
pub use image::{ImageDescriptor, ImageDescriptorError, RdmaInfo};
pub use meta::{GlobalType, GlobalValue, ImageMeta, MetaError, PageBitmap};
