//! Spindle's chain runtime: the YAML configuration ([`config`]), the ids derived from it
//! ([`plan`]), the Wasm function host ([`host`], with WASI preview-1 in [`wasi`]), how an
//! instance comes to exist ([`instance`]: the only place that builds one, and both sides of
//! the gateway → worker hand-off), per-instance statistics pages ([`stats`]), images of warm
//! instances that new instances fork from without compiling ([`snapshot`]) and the worker
//! process loop ([`worker`]) that runs one function instance against a chain's arena, with
//! its control channel to the gateway ([`control`]: prepare an image of the running instance),
//! and the zygote ([`zygote`]) that forks warm instances of one function (local fork). A
//! function with `isolation: fresh_per_request` has its instance reset in place to its warm
//! image after every call ([`fresh`]).
//!
//! Whether a module can run as its function at all ([`abi`]: imports, memory, exports) is
//! checked before an instance is built, and by `spindle validate`.
//!
//! The gateway crate owns HTTP, supervision and routing; this crate owns everything that
//! happens inside a function instance and the config both sides read. It must not route
//! between instances, speak HTTP or define wire layouts (those are `proto`'s).

pub mod abi;
pub mod config;
pub mod confine;
pub mod control;
pub mod fresh;
pub mod host;
pub mod inplace;
pub mod instance;
pub mod plan;
pub mod resume;
pub mod snapshot;
pub mod stats;
pub mod wasi;
pub mod worker;
pub mod zygote;
