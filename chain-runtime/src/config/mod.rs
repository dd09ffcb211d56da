//! Spindle's chain configuration: which Wasm functions exist, how each one is
//! sandboxed, and which HTTP routes are served by which chain of them.
//!
//! The file is YAML. It is read into `saphyr`'s span-carrying node tree and
//! converted by hand rather than through serde, because every problem has to be
//! reported as `file:line:col` pointing at the offending node, and all problems
//! are reported at once rather than stopping at the first.
//!
//! # Format
//!
//! ```yaml
//! listen: 127.0.0.1:8080            # optional; an IP:port, host names are not resolved
//! dataplane: auto                   # auto (default) | sockmap | userspace: how descriptors move
//!                                   #   between functions (sockmap = eBPF sk_msg redirect)
//! http:                             # optional; the HTTP front's connection limits
//!   max_connections: 4096           # client connections at once, 1..=1000000, default 4096;
//!                                   #   one more is answered 503 (Retry-After: 1) and closed
//!   idle_timeout_ms: 60000          # keep-alive connections idle this long are closed,
//!                                   #   1..=86400000, default 60000
//!   shards: 1                       # dataplane threads, 1..=64 or `auto` (one per usable
//!                                   #   CPU), default 1: each a single-threaded event loop
//!                                   #   running client connections and a share of the worker
//!                                   #   connections; more than one: each with its own
//!                                   #   SO_REUSEPORT listener on the address
//! sandbox:                          # optional; how worker processes are confined
//!   enabled: true                   # default true: each worker and zygote joins an empty
//!                                   #   network and mount namespace, drops to its uid, keeps
//!                                   #   only its fds, runs under seccomp (docs/security.md)
//!   uid_base: 200000                # function i (0-based, file order) runs as uid and gid
//!                                   #   uid_base + i; 1..=4000000000, default 200000
//!
//! functions:                        # at least one
//!   - name: uppercase               # [a-z0-9_-]+, unique
//!     module: ../examples/wasm/uppercase.wasm   # relative to this file's directory; must exist
//!     instances: 2                  # a fixed count of worker processes, 1..=64, default 1;
//!                                   #   or a mapping: the autoscaler keeps between min and max
//!     # instances: { min: 0, max: 8, target: 1, stable_window_ms: 6000, panic_window_ms: 600,
//!     #              scale_down_delay_ms: 2000, utilization_percent: 70, concurrency: 4 }
//!                                   #   min 0..=max (0 = scale to zero), max 1..=64 (required),
//!                                   #   target: requests in flight per instance, 1..=1000,
//!                                   #   default 1; windows 1..=3600000 ms, panic window
//!                                   #   <= stable window; utilization_percent 1..=100,
//!                                   #   default 70; concurrency: requests one instance
//!                                   #   holds at most, 1..=10000, default 4 x target
//!                                   #   (docs/autoscaling.md)
//!     wait_queue: 256               # requests that may wait for a ready instance (while
//!                                   #   none is up, or all are full), 0..=65536, default 256
//!     memory: 64MiB                 # linear-memory limit: B, KiB, MiB, GiB or plain bytes;
//!                                   #   a multiple of 64KiB (the Wasm page), 64KiB..=4GiB,
//!                                   #   default 64MiB
//!     timeout_ms: 1000              # per-call wall-clock limit, 1..=86400000, default 1000
//!     fuel: 1_000_000_000           # per-call instruction budget, default 1_000_000_000;
//!                                   #   `fuel: none` disables metering
//!     mode: reactor                 # reactor (default): instantiate once, call
//!                                   #   `spindle_handle` per request;
//!                                   # command: WASI `_start` in a fresh instance per
//!                                   #   request, request on stdin, response on stdout
//!     env: { GREETING: hello }      # optional; values must be strings (quote numbers)
//!     start: fork                   # fork (default for reactors): workers are forked from
//!                                   #   the function's zygote, which compiled the module once
//!                                   #   and holds a warm instance's image;
//!                                   # exec (default and only choice for commands): every
//!                                   #   worker compiles and instantiates the module itself
//!     isolation: reuse              # reuse (default): one warm instance serves request after
//!                                   #   request, keeping what they leave in memory and globals;
//!                                   # fresh_per_request (reactors only): every request runs
//!                                   #   in a fresh copy of the warm image — after each call
//!                                   #   the instance is reset in place, copy-on-write
//!                                   #   (memory, globals, memory size, stdio), same process
//!     idle_spin_us: 0               # 0..=1000, default 0: an instance out of descriptors
//!                                   #   sleeps at once; N: it polls its socket up to N µs
//!                                   #   first, but only while its recent idle gaps average
//!                                   #   under N µs (never when quiet)
//!     args: [--verbose, data.txt]   # optional; argv[1..] as the guest sees it (WASI
//!                                   #   args_get): strings, at most 256, each at most 4096
//!                                   #   bytes, all of argv under 64KiB; argv[0] is always the
//!                                   #   function's name. Commands and reactors alike
//!     files:                        # optional; host directories the guest sees read-only
//!       /data: ../examples/data     #   (WASI preopens): guest path (absolute, normal form,
//!                                   #   unique) -> host directory (relative to this file's
//!                                   #   directory; must exist and be one), at most 16. The
//!                                   #   i-th is the guest's fd 3 + i. Every guest path
//!                                   #   resolves beneath its directory (`..`, absolute
//!                                   #   symlinks and symlinks out of it fail); nothing can
//!                                   #   be written, created or removed (EROFS). With the
//!                                   #   sandbox on, the files are read as the function's uid
//!                                   #   (sandbox.uid_base + i): they must be readable by it
//!                                   #   (docs/guest-abi.md "Arguments and files")
//!   - name: reverse
//!     module: ../examples/wasm/reverse.wasm
//!   - name: frame
//!     module: /opt/spindle/frame.wasm
//!     mode: command
//!     fuel: none
//!   - name: frontend
//!     module: shop/frontend.wasm
//!   - name: cart
//!     module: shop/cart.wasm
//!
//! chains:                           # at least one
//!   - name: hello                   # [a-z0-9_-]+, unique
//!     route: /hello                 # starts with '/', unique; not /healthz, /readyz, /metrics
//!     steps: [uppercase, reverse, frame]   # static chain: 1..=32 defined functions, each at
//!                                   #   most once (a repeat would be a cycle)
//!     timeout_ms: 5000              # whole-chain deadline, 1..=86400000, default 5000
//!     content_type: text/plain      # response Content-Type, default application/octet-stream
//!     arena: { slot_size: 64KiB, slots: 1024 }   # shared-memory request slots:
//!                                   #   slot_size a multiple of 64 in 64..=64MiB (default 64KiB),
//!                                   #   slots 1..=65536 (default 1024);
//!                                   # optional large: { slot_size: 16MiB, slots: 8 }: a second
//!                                   #   class for bodies over slot_size, up to its slot_size
//!                                   #   (a multiple of 4KiB, > slot_size, <= 64MiB; slots
//!                                   #   1..=1024); the memfd is sparse, so unused large
//!                                   #   slots cost no memory
//!   - name: shop
//!     route: /shop
//!     entry: frontend               # dynamic chain: the first function called ...
//!     functions: [frontend, cart]   # ... and every function it may route to (includes entry)
//!     max_hops: 16                  # 1..=255, default 16
//! ```
//!
//! Optional `ingress:` (the eBPF guard, connection steering and the node's fast path) is
//! described in the `ingress` module.
//!
//! Optional `node:` (this node's CPU and memory budget, its peer-control address and the
//! cluster key) and `peers:` (other nodes' gateways to scale out to) are described in the
//! `cluster` module.
//!
//! A chain has either `steps` or `entry` + `functions`, never both. Unknown keys
//! are errors, so a misspelt optional key cannot silently fall back to its
//! default. Integers may use `_` separators.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};

use chains::Known;
use yaml::{Fields, Pos, describe, pos, untag};

mod chains;
mod cluster;
mod functions;
mod ingress;
mod units;
mod yaml;

/// The keys each section of a config accepts, as the checker knows them: for tools that
/// generate configs (the fuzzer's structured YAML), so they never fall behind the checker.
pub mod keys {
    pub use super::chains::{ARENA_KEYS as ARENA, CHAIN_KEYS as CHAIN, LARGE_KEYS as LARGE};
    pub use super::cluster::{NODE_KEYS as NODE, PEER_KEYS as PEER};
    pub use super::functions::{FUNCTION_KEYS as FUNCTION, INSTANCES_KEYS as INSTANCES};
    pub use super::ingress::{
        FAST_PATH_KEYS as FAST_PATH, GUARD_KEYS as GUARD, INGRESS_KEYS as INGRESS,
        LOCAL_REDIRECT_KEYS as LOCAL_REDIRECT,
    };
    pub use super::{HTTP_KEYS as HTTP, SANDBOX_KEYS as SANDBOX, TOP_KEYS as TOP};
}

/// Chain ids are 16-bit in the descriptor.
const MAX_CHAINS: usize = 1024;

pub const TOP_KEYS: &[&str] = &[
    "listen",
    "dataplane",
    "functions",
    "chains",
    "node",
    "peers",
    "http",
    "sandbox",
    "ingress",
];

pub const SANDBOX_KEYS: &[&str] = &["enabled", "uid_base"];
const DEFAULT_UID_BASE: i64 = 200_000;
/// Well below u32::MAX (the kernel's "no uid", -1) with room for every function.
const MAX_UID_BASE: i64 = 4_000_000_000;

/// How worker processes are confined (`sandbox:`; the `sandbox` crate applies it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxSpec {
    pub enabled: bool,
    /// Function `i` of [`Config::functions`] runs as uid and gid `uid_base + i`: functions
    /// cannot signal, trace or read each other's processes.
    pub uid_base: u32,
}

impl Default for SandboxSpec {
    fn default() -> Self {
        SandboxSpec {
            enabled: true,
            uid_base: DEFAULT_UID_BASE as u32,
        }
    }
}

pub const HTTP_KEYS: &[&str] = &["max_connections", "idle_timeout_ms", "shards"];
/// More accept loops than this would only contend for the same listening port.
pub const MAX_HTTP_SHARDS: i64 = 64;
const DEFAULT_MAX_CONNECTIONS: i64 = 4096;
const MAX_MAX_CONNECTIONS: i64 = 1_000_000;
const DEFAULT_IDLE_TIMEOUT_MS: i64 = 60_000;
const MAX_IDLE_TIMEOUT_MS: i64 = 86_400_000;

/// The HTTP front's connection limits (`http:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSpec {
    /// Client connections open at once; one more is answered 503 and closed.
    pub max_connections: u32,
    /// A keep-alive connection with no request in flight and no bytes moving for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// How the HTTP front spreads client connections over threads.
    pub shards: Shards,
}

/// `http.shards`: how many dataplane threads the gateway runs (`N`, default 1, or `auto`: one
/// per CPU the gateway may run on). Each is a single-threaded event loop that serves client
/// connections and a share of the worker connections; with more than one, each has its own
/// `SO_REUSEPORT` listener on the same address, so the kernel spreads connections over them
/// and a connection's requests never change thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    Fixed(u32),
    PerCpu,
}

impl Shards {
    /// The number of shards on a machine where `cpus` CPUs are usable.
    pub fn count(self, cpus: usize) -> usize {
        match self {
            Shards::Fixed(n) => n as usize,
            Shards::PerCpu => cpus.clamp(1, MAX_HTTP_SHARDS as usize),
        }
    }
}

impl Default for HttpSpec {
    fn default() -> Self {
        HttpSpec {
            max_connections: DEFAULT_MAX_CONNECTIONS as u32,
            idle_timeout: Duration::from_millis(DEFAULT_IDLE_TIMEOUT_MS as u64),
            shards: Shards::Fixed(1),
        }
    }
}

pub use cluster::{
    DEFAULT_CPU_BUDGET, DEFAULT_MEMORY_BUDGET, DnsPeerSpec, NodeSpec, PeerSpec, parse_percent,
};
pub use functions::{MAX_ARG_BYTES, MAX_ARGS, MAX_ARGV_BYTES, MAX_FILES, MAX_GUEST_PATH};
pub use ingress::{
    FastPathSpec, GuardHook, GuardMode, GuardSpec, IngressSpec, LocalRedirectSpec, Steering,
};

/// A validated configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file the configuration came from, as given to [`Config::load`] or
    /// [`Config::parse`].
    pub source: PathBuf,
    pub listen: Option<SocketAddr>,
    /// How descriptors move between functions (`dataplane:`, default `auto`).
    pub dataplane: DataplaneMode,
    /// In file order.
    pub functions: Vec<FunctionSpec>,
    /// In file order.
    pub chains: Vec<ChainSpec>,
    /// This node's budget and peer-control settings (`node:`, module `cluster`).
    pub node: NodeSpec,
    /// Peer nodes this gateway may scale out to (`peers:` entries with addresses), in file
    /// order.
    pub peers: Vec<PeerSpec>,
    /// Peers found by DNS (`peers:` entries with `dns:`), in file order.
    pub dns_peers: Vec<DnsPeerSpec>,
    /// The HTTP front's connection limits (`http:`).
    pub http: HttpSpec,
    /// How worker processes are confined (`sandbox:`).
    pub sandbox: SandboxSpec,
    /// The eBPF programs at the gateway's ingress (`ingress:`, module `ingress`).
    pub ingress: IngressSpec,
}

impl Config {
    /// The uid and gid `function`'s processes run as, if it is defined.
    pub fn function_uid(&self, function: &str) -> Option<u32> {
        let index = self.functions.iter().position(|f| f.name == function)?;
        Some(self.sandbox.uid_base + index as u32)
    }
}

/// One Wasm function; every instance runs in its own worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    pub name: String,
    /// Absolute as written, or joined onto the configuration file's directory.
    pub module: PathBuf,
    pub instances: Instances,
    /// Requests that may wait for a ready instance of this function; more get 503.
    pub wait_queue: u32,
    /// Linear-memory limit in bytes, a whole number of Wasm pages.
    pub memory_limit: u64,
    pub timeout: Duration,
    /// Per-call instruction budget; `None` turns metering off.
    pub fuel: Option<u64>,
    pub mode: ModuleMode,
    /// In file order.
    pub env: Vec<(String, String)>,
    pub start: StartMode,
    /// What one request may see of the previous ones (`isolation:`, default `reuse`).
    pub isolation: Isolation,
    /// How long an idle instance may poll its socket before it sleeps (`idle_spin_us`), at
    /// most: the worker spins only while descriptors have recently been arriving closer
    /// together than this (see `chain_runtime::worker`), so a quiet instance never spins.
    pub idle_spin: Duration,
    /// The guest's `argv[1..]` (`args:`), in file order; `argv[0]` is always the function's
    /// name.
    pub args: Vec<String>,
    /// Host directories the guest sees read-only, as WASI preopens (`files:`), in file order:
    /// the `i`-th is the guest's fd `3 + i`.
    pub files: Vec<PreopenDir>,
}

/// One entry of `files:`: a host directory the guest sees, read-only, at `guest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreopenDir {
    /// Where the guest sees it: an absolute path in normal form (no `.`, `..`, empty or
    /// trailing components), `/` included.
    pub guest: String,
    /// The host directory: absolute as written, or joined onto the configuration file's
    /// directory. It existed and was a directory when the file was checked.
    pub host: PathBuf,
}

impl FunctionSpec {
    /// The guest's whole argv: the function's name, then `args`.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.name.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

/// `idle_spin_us` when not given.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::from_micros(0);

/// What a reactor's requests share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// One warm instance serves every request: state left in linear memory and globals is
    /// seen by the next request (a cache, or a leak).
    #[default]
    Reuse,
    /// Every request runs in a fresh copy of the warm image: after each call (trapped and
    /// timed-out ones too) the instance is reset in place to the image, copy-on-write, in
    /// the same process (see [`crate::fresh`]).
    FreshPerRequest,
}

impl Isolation {
    /// The value as written in the config.
    pub fn label(self) -> &'static str {
        match self {
            Isolation::Reuse => "reuse",
            Isolation::FreshPerRequest => "fresh_per_request",
        }
    }
}

/// How many instances of a function run (`instances:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instances {
    /// Instances kept up even when idle; 0 lets the function scale to zero.
    pub min: u32,
    /// Instances at most; also how many instance slots (statistics pages, kernel map
    /// entries) the function has.
    pub max: u32,
    /// `None` for a fixed count (`instances: N`, min = max = N).
    pub autoscale: Option<Autoscale>,
}

impl Instances {
    pub fn fixed(n: u32) -> Self {
        Instances {
            min: n,
            max: n,
            autoscale: None,
        }
    }
}

/// The autoscaler's knobs for one function (see docs/autoscaling.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    /// Requests in flight per instance the autoscaler aims for.
    pub target: u32,
    /// Average concurrency over this window sets the instance count in stable mode.
    pub stable_window: Duration,
    /// Average over this shorter window detects bursts (panic mode: scale up, never down).
    pub panic_window: Duration,
    /// A lower count takes effect only after it has been wanted this long.
    pub scale_down_delay: Duration,
    /// Share of `target` an instance is planned to carry, in percent (Knative's
    /// container-concurrency-target-percentage): headroom, so a steady load is not served at
    /// exactly full instances, where queues grow without bound.
    pub utilization_percent: u32,
    /// Requests one instance may hold at once (queued for it, in its socket, running); more
    /// wait in the function's wait queue for whichever instance frees up or comes up first.
    pub concurrency: u32,
}

/// How a function's worker processes are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// Forked from the function's zygote, which compiled the module once and holds the image
    /// of a warm instance: the default for reactors (command modules have no warm instance).
    Fork,
    /// Each worker is a fresh process that compiles and instantiates the module itself.
    Exec,
}

impl StartMode {
    pub fn label(self) -> &'static str {
        match self {
            StartMode::Fork => "fork",
            StartMode::Exec => "exec",
        }
    }
}

/// How descriptors move between a chain's functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataplaneMode {
    /// The kernel (sk_msg) dataplane when it can be loaded, else userspace.
    #[default]
    Auto,
    /// The kernel dataplane; failing to load it is an error.
    Sockmap,
    /// The gateway routes every hop.
    Userspace,
}

impl std::str::FromStr for DataplaneMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DataplaneMode::Auto),
            "sockmap" => Ok(DataplaneMode::Sockmap),
            "userspace" => Ok(DataplaneMode::Userspace),
            other => Err(format!(
                "unknown dataplane `{other}`: expected `auto`, `sockmap` or `userspace`"
            )),
        }
    }
}

/// How a module is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModuleMode {
    /// Instantiated once; `spindle_handle` is called per request.
    #[default]
    Reactor,
    /// A WASI command: `_start` runs in a fresh instance per request, with the
    /// request on stdin and the response taken from stdout.
    Command,
}

/// One HTTP route and the functions that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: String,
    pub route: String,
    pub routing: Routing,
    /// Deadline for the whole chain.
    pub timeout: Duration,
    pub content_type: String,
    /// Bytes per shared-memory request slot.
    pub slot_size: u32,
    pub slots: u32,
    /// Optional class of larger slots for bodies over `slot_size` (`arena.large`).
    pub large: Option<LargeSlots>,
}

/// A chain's class of large slots: requests and responses over `slot_size` use one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LargeSlots {
    /// Bytes per large slot: a multiple of 4KiB, larger than the chain's `slot_size`.
    pub slot_size: u32,
    pub slots: u32,
    /// Bodies larger than this start in a large slot (`above`, default the chain's
    /// `slot_size`): headroom for functions whose output outgrows their input.
    pub above: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// Every request visits `steps` in order.
    Static { steps: Vec<String> },
    /// Requests start at `entry`; each function names the next one, which must
    /// be among `functions`, for at most `max_hops` calls.
    Dynamic {
        entry: String,
        functions: Vec<String>,
        max_hops: u8,
    },
}

/// The configuration file's text; a file that cannot be read is reported at its 1:1.
fn read_source(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read configuration file: {e}"),
        }])
    })
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Config::parse(&read_source(path)?, path)
    }

    /// Parses and validates `text`. `source` names the file in error messages,
    /// and relative module paths are resolved against its directory.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
        Self::parse_checking(text, source, None)
    }

    /// Like [`Config::load`], and every function whose module file exists is also handed to
    /// `check`, whose problems are reported at the function's `module:` value (prefixed with
    /// the function's name): how `spindle validate` checks each module against what its
    /// function gives it without running it.
    pub fn load_checking(path: &Path, check: &mut ModuleCheck<'_>) -> Result<Config, ConfigErrors> {
        Self::parse_checking(&read_source(path)?, path, Some(check))
    }

    fn parse_checking<'s>(
        text: &str,
        source: &'s Path,
        check_module: Option<&'s mut ModuleCheck<'s>>,
    ) -> Result<Config, ConfigErrors> {
        let mut checker = Checker {
            source,
            errors: Vec::new(),
            check_module,
        };
        let config = match MarkedYaml::load_from_str(text) {
            Ok(docs) => checker.config(&docs),
            Err(e) => {
                checker.error(
                    Pos::from(*e.marker()),
                    format!("YAML syntax error: {}", e.info()),
                );
                None
            }
        };
        match config {
            Some(config) if checker.errors.is_empty() => Ok(config),
            _ => {
                debug_assert!(!checker.errors.is_empty());
                let mut errors = checker.errors;
                errors.sort_by_key(|e| (e.line, e.col));
                Err(ConfigErrors(errors))
            }
        }
    }

    pub fn function(&self, name: &str) -> Option<&FunctionSpec> {
        self.functions.iter().find(|f| f.name == name)
    }
}

impl ChainSpec {
    /// Slots of every class (the index space of the chain's arena).
    pub fn total_slots(&self) -> u32 {
        self.slots + self.large.map_or(0, |l| l.slots)
    }

    /// The largest body (request or response) the chain can carry.
    pub fn max_payload(&self) -> u32 {
        self.large.map_or(self.slot_size, |l| l.slot_size)
    }

    /// The functions this chain uses, in order of first use, without repeats.
    pub fn functions(&self) -> Vec<&str> {
        let names: Vec<&str> = match &self.routing {
            Routing::Static { steps } => steps.iter().map(String::as_str).collect(),
            Routing::Dynamic {
                entry, functions, ..
            } => std::iter::once(entry.as_str())
                .chain(functions.iter().map(String::as_str))
                .collect(),
        };
        let mut unique = Vec::with_capacity(names.len());
        for name in names {
            if !unique.contains(&name) {
                unique.push(name);
            }
        }
        unique
    }
}

/// One problem in a configuration file. `line` and `col` are 1-based; `col`
/// counts characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{col}: {message}", file.display())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

/// A deeper look at one function's module ([`Config::load_checking`]): its problems, as
/// messages.
pub type ModuleCheck<'a> = dyn FnMut(&FunctionSpec) -> Vec<String> + 'a;

/// Every problem found in a configuration file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Its checks are spread over the submodules, one `impl Checker` block each, so
/// that every check sits next to the part of the format it belongs to.
struct Checker<'s> {
    source: &'s Path,
    errors: Vec<ConfigError>,
    /// Looks deeper into each function's module ([`Config::load_checking`]).
    check_module: Option<&'s mut ModuleCheck<'s>>,
}

impl Checker<'_> {
    fn error(&mut self, at: Pos, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.source.to_path_buf(),
            line: at.line,
            col: at.col,
            message: message.into(),
        });
    }

    /// Values that fail validation are replaced by defaults so checking can go
    /// on; the result is only handed out when no error was recorded.
    fn config(&mut self, docs: &[MarkedYaml<'_>]) -> Option<Config> {
        let Some(root) = docs.first() else {
            self.error(Pos::START, "configuration file is empty");
            return None;
        };
        if let Some(extra) = docs.get(1) {
            self.error(
                pos(extra),
                "expected a single YAML document, found another one here",
            );
        }
        if matches!(untag(root).data, YamlData::Value(Scalar::Null)) {
            self.error(Pos::START, "configuration file is empty");
            return None;
        }
        let top = self.fields(root, "the configuration", Some(TOP_KEYS))?;

        let listen = top.get("listen").and_then(|n| self.listen(n));
        let dataplane = top
            .get("dataplane")
            .and_then(|n| self.dataplane(n))
            .unwrap_or_default();

        let mut known: Known = None;
        let mut functions = Vec::new();
        match top.get("functions") {
            None => self.error(top.at, "missing required key `functions`"),
            Some(node) => {
                if let Some(items) = self.list(node, "functions", "function") {
                    let mut names = HashMap::new();
                    for item in items {
                        if let Some(spec) = self.function(item, &mut names) {
                            functions.push(spec);
                        }
                    }
                    known = Some(names);
                }
            }
        }

        let mut chains = Vec::new();
        match top.get("chains") {
            None => self.error(top.at, "missing required key `chains`"),
            Some(node) => {
                if let Some(items) = self.list(node, "chains", "chain") {
                    if items.len() > MAX_CHAINS {
                        self.error(
                            pos(node),
                            format!("{} chains; at most {MAX_CHAINS} are supported", items.len()),
                        );
                    }
                    let mut names = HashMap::new();
                    let mut routes = HashMap::new();
                    for item in items {
                        if let Some(spec) = self.chain(item, &known, &mut names, &mut routes) {
                            chains.push(spec);
                        }
                    }
                }
            }
        }

        let http = top.get("http").map(|n| self.http(n)).unwrap_or_default();
        let sandbox = top
            .get("sandbox")
            .map(|n| self.sandbox(n))
            .unwrap_or_default();
        let ingress = top
            .get("ingress")
            .map(|n| self.ingress(n, http.shards))
            .unwrap_or_default();
        let node = top.get("node").map(|n| self.node(n)).unwrap_or_default();
        let (peers, dns_peers) = top.get("peers").map(|n| self.peers(n)).unwrap_or_default();
        self.check_cluster(
            &node,
            peers.len() + dns_peers.len(),
            top.get("node"),
            top.get("peers"),
        );

        Some(Config {
            source: self.source.to_path_buf(),
            listen,
            dataplane,
            functions,
            chains,
            node,
            peers,
            dns_peers,
            http,
            sandbox,
            ingress,
        })
    }

    fn sandbox(&mut self, node: &MarkedYaml<'_>) -> SandboxSpec {
        let mut spec = SandboxSpec::default();
        let Some(fields) = self.fields(node, "`sandbox`", Some(SANDBOX_KEYS)) else {
            return spec;
        };
        if let Some(n) = fields.get("enabled") {
            match &untag(n).data {
                YamlData::Value(Scalar::Boolean(b)) => spec.enabled = *b,
                _ => self.error(
                    pos(n),
                    format!(
                        "`sandbox.enabled` must be true or false, found {}",
                        describe(n)
                    ),
                ),
            }
        }
        if let Some(n) = fields.get("uid_base")
            && let Some(v) = self.int_in(n, "sandbox.uid_base", 1, MAX_UID_BASE)
        {
            spec.uid_base = v as u32;
        }
        spec
    }

    fn http(&mut self, node: &MarkedYaml<'_>) -> HttpSpec {
        let mut spec = HttpSpec::default();
        let Some(fields) = self.fields(node, "`http`", Some(HTTP_KEYS)) else {
            return spec;
        };
        if let Some(n) = fields.get("max_connections")
            && let Some(v) = self.int_in(n, "http.max_connections", 1, MAX_MAX_CONNECTIONS)
        {
            spec.max_connections = v as u32;
        }
        if let Some(n) = fields.get("idle_timeout_ms")
            && let Some(v) = self.int_in(n, "http.idle_timeout_ms", 1, MAX_IDLE_TIMEOUT_MS)
        {
            spec.idle_timeout = Duration::from_millis(v as u64);
        }
        if let Some(n) = fields.get("shards") {
            if let YamlData::Value(Scalar::String(word)) = &untag(n).data
                && word == "auto"
            {
                spec.shards = Shards::PerCpu;
            } else if let Some(v) = self.int_in(n, "http.shards", 1, MAX_HTTP_SHARDS) {
                spec.shards = Shards::Fixed(v as u32);
            }
        }
        spec
    }

    /// Reads `name`, checks its spelling and uniqueness, and records it in
    /// `seen`. Returns the name even when it is invalid, so that later
    /// messages can still refer to it.
    fn name_field(
        &mut self,
        fields: &Fields<'_, '_>,
        kind: &str,
        seen: &mut HashMap<String, Pos>,
    ) -> String {
        let Some(node) = self.required(fields, "name", kind) else {
            return String::new();
        };
        let Some(name) = self.string(node, "name") else {
            return String::new();
        };
        let at = pos(node);
        if name.is_empty() {
            self.error(at, format!("{kind} name must not be empty"));
        } else if !name
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
        {
            self.error(
                at,
                format!(
                    "invalid {kind} name `{name}`: use only lowercase letters, digits, `_` and `-`"
                ),
            );
        }
        self.unique(seen, name, at, |first| {
            format!("duplicate {kind} name `{name}` (first defined at line {first})")
        });
        name.to_string()
    }

    /// Records `key` as first seen at `at`. The first use stands and every
    /// later one is the error, reported where it is with `duplicate` given the
    /// line of the first.
    fn unique(
        &mut self,
        seen: &mut HashMap<String, Pos>,
        key: &str,
        at: Pos,
        duplicate: impl FnOnce(usize) -> String,
    ) {
        match seen.get(key) {
            Some(first) => self.error(at, duplicate(first.line)),
            None => {
                seen.insert(key.to_string(), at);
            }
        }
    }

    fn listen(&mut self, node: &MarkedYaml<'_>) -> Option<SocketAddr> {
        let hint = "an IP address and port such as 127.0.0.1:8080";
        let YamlData::Value(Scalar::String(text)) = &untag(node).data else {
            self.error(
                pos(node),
                format!("`listen` must be {hint}, found {}", describe(node)),
            );
            return None;
        };
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    pos(node),
                    format!(
                        "invalid listen address `{text}`: expected {hint} (host names are not resolved)"
                    ),
                );
                None
            }
        }
    }

    fn dataplane(&mut self, node: &MarkedYaml<'_>) -> Option<DataplaneMode> {
        let text = self.string(node, "dataplane")?;
        match text.parse() {
            Ok(mode) => Some(mode),
            Err(message) => {
                self.error(pos(node), message);
                None
            }
        }
    }
}

fn label(kind: &str, name: &str) -> String {
    if name.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} `{name}`")
    }
}

#[cfg(test)]
mod tests;
