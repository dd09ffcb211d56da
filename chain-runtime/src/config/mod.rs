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
//!
//! functions:                        # at least one
//!   - name: uppercase               # [a-z0-9_-]+, unique
//!     module: ../examples/wasm/uppercase.wasm   # relative to this file's directory; must exist
//!     instances: 2                  # worker processes, 1..=64, default 1
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
//!                                   #   slots 1..=65536 (default 1024)
//!   - name: shop
//!     route: /shop
//!     entry: frontend               # dynamic chain: the first function called ...
//!     functions: [frontend, cart]   # ... and every function it may route to (includes entry)
//!     max_hops: 16                  # 1..=255, default 16
//! ```
//!
//! A chain has either `steps` or `entry` + `functions`, never both. Unknown keys
//! are errors, so a misspelt optional key cannot silently fall back to its
//! default. Integers may use `_` separators.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saphyr::{LoadableYamlNode, MarkedYaml, Marker, Scalar, YamlData};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

const WASM_PAGE: u64 = 64 * KIB;
/// Chain ids are 16-bit in the descriptor.
const MAX_CHAINS: usize = 1024;
const DEFAULT_INSTANCES: u32 = 1;
const MAX_INSTANCES: i64 = 64;
const DEFAULT_MEMORY_LIMIT: u64 = 64 * MIB;
const MIN_MEMORY_LIMIT: u64 = WASM_PAGE;
// A 32-bit linear memory cannot address more than this.
const MAX_MEMORY_LIMIT: u64 = 4 * GIB;
const DEFAULT_FUNCTION_TIMEOUT_MS: i64 = 1000;
const DEFAULT_CHAIN_TIMEOUT_MS: i64 = 5000;
// Far beyond any sensible deadline, yet small enough that `Instant + timeout`
// can never overflow in the callers.
const MAX_TIMEOUT_MS: i64 = 24 * 60 * 60 * 1000;
const DEFAULT_FUEL: u64 = 1_000_000_000;
const MAX_STEPS: usize = 32;
const DEFAULT_MAX_HOPS: u8 = 16;
const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
const DEFAULT_SLOT_SIZE: u32 = 64 * KIB as u32;
const DEFAULT_SLOTS: u32 = 1024;
// Slots are laid out back to back in shared memory; keeping each a multiple of a
// cache line keeps slot headers from sharing lines.
const SLOT_ALIGN: u64 = 64;
const MAX_SLOT_SIZE: u64 = 64 * MIB;
const MAX_SLOTS: i64 = 65536;
// The gateway answers these itself.
const RESERVED_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

const TOP_KEYS: &[&str] = &["listen", "dataplane", "functions", "chains"];
const FUNCTION_KEYS: &[&str] = &[
    "name",
    "module",
    "instances",
    "memory",
    "timeout_ms",
    "fuel",
    "mode",
    "env",
];
const CHAIN_KEYS: &[&str] = &[
    "name",
    "route",
    "steps",
    "entry",
    "functions",
    "max_hops",
    "timeout_ms",
    "content_type",
    "arena",
];
const ARENA_KEYS: &[&str] = &["slot_size", "slots"];

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
}

/// One Wasm function; every instance runs in its own worker process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSpec {
    pub name: String,
    /// Absolute as written, or joined onto the configuration file's directory.
    pub module: PathBuf,
    pub instances: u32,
    /// Linear-memory limit in bytes, a whole number of Wasm pages.
    pub memory_limit: u64,
    pub timeout: Duration,
    /// Per-call instruction budget; `None` turns metering off.
    pub fuel: Option<u64>,
    pub mode: ModuleMode,
    /// In file order.
    pub env: Vec<(String, String)>,
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

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 1,
                col: 1,
                message: format!("cannot read configuration file: {e}"),
            }])
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`. `source` names the file in error messages,
    /// and relative module paths are resolved against its directory.
    pub fn parse(text: &str, source: &Path) -> Result<Config, ConfigErrors> {
        let mut checker = Checker {
            source,
            errors: Vec::new(),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    line: usize,
    col: usize,
}

impl Pos {
    const START: Pos = Pos { line: 1, col: 1 };
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

fn pos(node: &MarkedYaml<'_>) -> Pos {
    node.span.start.into()
}

/// Custom tags carry no meaning here; look through them to the node itself.
fn untag<'n, 'i>(mut node: &'n MarkedYaml<'i>) -> &'n MarkedYaml<'i> {
    while let YamlData::Tagged(_, inner) = &node.data {
        node = inner;
    }
    node
}

fn describe(node: &MarkedYaml<'_>) -> String {
    match &untag(node).data {
        YamlData::Value(Scalar::Null) => "null".into(),
        YamlData::Value(Scalar::Boolean(b)) => format!("boolean `{b}`"),
        YamlData::Value(Scalar::Integer(i)) => format!("integer `{i}`"),
        YamlData::Value(Scalar::FloatingPoint(f)) => format!("number `{f}`"),
        YamlData::Value(Scalar::String(s)) => format!("string `{s}`"),
        YamlData::Representation(s, ..) => format!("`{s}`"),
        YamlData::Sequence(_) => "a list".into(),
        YamlData::Mapping(_) => "a mapping".into(),
        YamlData::Tagged(..) | YamlData::Alias(_) | YamlData::BadValue => "an invalid value".into(),
    }
}

/// A mapping whose keys have been checked against the allowed set.
struct Fields<'n, 'i> {
    at: Pos,
    entries: Vec<Field<'n, 'i>>,
}

struct Field<'n, 'i> {
    key: &'n str,
    key_at: Pos,
    value: &'n MarkedYaml<'i>,
}

impl<'n, 'i> Fields<'n, 'i> {
    fn field(&self, key: &str) -> Option<&Field<'n, 'i>> {
        self.entries.iter().find(|f| f.key == key)
    }

    fn get(&self, key: &str) -> Option<&'n MarkedYaml<'i>> {
        self.field(key).map(|f| f.value)
    }
}

/// Function names seen so far, for resolving references from chains.
/// `None` when the `functions` section itself is unusable, in which case
/// reference checks are skipped rather than flagging every name as unknown.
type Known = Option<HashMap<String, Pos>>;

struct Checker<'s> {
    source: &'s Path,
    errors: Vec<ConfigError>,
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

        Some(Config {
            source: self.source.to_path_buf(),
            listen,
            dataplane,
            functions,
            chains,
        })
    }

    fn function(
        &mut self,
        node: &MarkedYaml<'_>,
        names: &mut HashMap<String, Pos>,
    ) -> Option<FunctionSpec> {
        let fields = self.fields(node, "a function", Some(FUNCTION_KEYS))?;
        let name = self.name_field(&fields, "function", names);
        let what = label("function", &name);

        let module = match fields.get("module") {
            None => {
                self.error(
                    fields.at,
                    format!("{what} is missing required key `module`"),
                );
                PathBuf::new()
            }
            Some(node) => self.module(node).unwrap_or_default(),
        };
        let instances = fields
            .get("instances")
            .and_then(|n| self.int_in(n, "instances", 1, MAX_INSTANCES))
            .map_or(DEFAULT_INSTANCES, |n| n as u32);
        let memory_limit = fields
            .get("memory")
            .and_then(|n| self.memory(n))
            .unwrap_or(DEFAULT_MEMORY_LIMIT);
        let timeout_ms = fields
            .get("timeout_ms")
            .and_then(|n| self.int_in(n, "timeout_ms", 1, MAX_TIMEOUT_MS))
            .unwrap_or(DEFAULT_FUNCTION_TIMEOUT_MS);
        let fuel = match fields.get("fuel") {
            None => Some(DEFAULT_FUEL),
            Some(n) => self.fuel(n).unwrap_or(Some(DEFAULT_FUEL)),
        };
        let mode = fields
            .get("mode")
            .and_then(|n| self.mode(n))
            .unwrap_or_default();
        let env = fields.get("env").map(|n| self.env(n)).unwrap_or_default();

        Some(FunctionSpec {
            name,
            module,
            instances,
            memory_limit,
            timeout: Duration::from_millis(timeout_ms as u64),
            fuel,
            mode,
            env,
        })
    }

    fn chain(
        &mut self,
        node: &MarkedYaml<'_>,
        known: &Known,
        names: &mut HashMap<String, Pos>,
        routes: &mut HashMap<String, Pos>,
    ) -> Option<ChainSpec> {
        let fields = self.fields(node, "a chain", Some(CHAIN_KEYS))?;
        let name = self.name_field(&fields, "chain", names);
        let what = label("chain", &name);

        let route = match fields.get("route") {
            None => {
                self.error(fields.at, format!("{what} is missing required key `route`"));
                String::new()
            }
            Some(node) => self.route(node, routes).unwrap_or_default(),
        };
        let routing = self.routing(&fields, &what, known);
        let timeout_ms = fields
            .get("timeout_ms")
            .and_then(|n| self.int_in(n, "timeout_ms", 1, MAX_TIMEOUT_MS))
            .unwrap_or(DEFAULT_CHAIN_TIMEOUT_MS);
        let content_type = fields
            .get("content_type")
            .and_then(|n| self.content_type(n))
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
        let (slot_size, slots) = fields
            .get("arena")
            .map_or((DEFAULT_SLOT_SIZE, DEFAULT_SLOTS), |n| self.arena(n));

        Some(ChainSpec {
            name,
            route,
            routing,
            timeout: Duration::from_millis(timeout_ms as u64),
            content_type,
            slot_size,
            slots,
        })
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
        let Some(node) = fields.get("name") else {
            self.error(fields.at, format!("{kind} is missing required key `name`"));
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
        match seen.get(name) {
            Some(first) => self.error(
                at,
                format!(
                    "duplicate {kind} name `{name}` (first defined at line {})",
                    first.line
                ),
            ),
            None => {
                seen.insert(name.to_string(), at);
            }
        }
        name.to_string()
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

    fn module(&mut self, node: &MarkedYaml<'_>) -> Option<PathBuf> {
        let written = self.string(node, "module")?;
        if written.is_empty() {
            self.error(pos(node), "`module` must not be empty");
            return None;
        }
        let written = Path::new(written);
        let resolved = if written.is_absolute() {
            written.to_path_buf()
        } else {
            match self.source.parent() {
                Some(dir) => dir.join(written),
                None => written.to_path_buf(),
            }
        };
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => {}
            Ok(_) => self.error(
                pos(node),
                format!("module `{}` is not a file", resolved.display()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.error(
                pos(node),
                format!("module file not found: `{}`", resolved.display()),
            ),
            Err(e) => self.error(
                pos(node),
                format!("cannot access module file `{}`: {e}", resolved.display()),
            ),
        }
        Some(resolved)
    }

    fn memory(&mut self, node: &MarkedYaml<'_>) -> Option<u64> {
        let bytes = self.size(node, "memory")?;
        if !(MIN_MEMORY_LIMIT..=MAX_MEMORY_LIMIT).contains(&bytes) {
            self.error(
                pos(node),
                format!("`memory` must be between 64KiB and 4GiB, got {bytes} bytes"),
            );
            return None;
        }
        if bytes % WASM_PAGE != 0 {
            self.error(
                pos(node),
                format!(
                    "`memory` must be a multiple of 64KiB (the Wasm page size), got {bytes} bytes"
                ),
            );
            return None;
        }
        Some(bytes)
    }

    /// `Some(None)` is `fuel: none`.
    fn fuel(&mut self, node: &MarkedYaml<'_>) -> Option<Option<u64>> {
        if let YamlData::Value(Scalar::String(s)) = &untag(node).data
            && s == "none"
        {
            return Some(None);
        }
        if !looks_like_integer(node) {
            self.error(
                pos(node),
                format!(
                    "`fuel` must be a positive instruction count or `none`, found {}",
                    describe(node)
                ),
            );
            return None;
        }
        self.int_in(node, "fuel", 1, i64::MAX)
            .map(|n| Some(n as u64))
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

    fn mode(&mut self, node: &MarkedYaml<'_>) -> Option<ModuleMode> {
        match self.string(node, "mode")? {
            "reactor" => Some(ModuleMode::Reactor),
            "command" => Some(ModuleMode::Command),
            other => {
                self.error(
                    pos(node),
                    format!("unknown mode `{other}`: expected `reactor` or `command`"),
                );
                None
            }
        }
    }

    fn env(&mut self, node: &MarkedYaml<'_>) -> Vec<(String, String)> {
        let Some(fields) = self.fields(node, "`env`", None) else {
            return Vec::new();
        };
        let mut env = Vec::with_capacity(fields.entries.len());
        for field in &fields.entries {
            if field.key.is_empty() || field.key.contains(['=', '\0']) {
                self.error(
                    field.key_at,
                    format!(
                        "invalid environment variable name `{}`: it must be non-empty and contain neither `=` nor NUL",
                        field.key
                    ),
                );
                continue;
            }
            match &untag(field.value).data {
                YamlData::Value(Scalar::String(value)) if value.contains('\0') => {
                    self.error(
                        pos(field.value),
                        format!("environment variable `{}` contains NUL", field.key),
                    );
                }
                YamlData::Value(Scalar::String(value)) => {
                    env.push((field.key.to_string(), value.to_string()));
                }
                _ => self.error(
                    pos(field.value),
                    format!(
                        "environment variable `{}` must be a string, found {} (quote it)",
                        field.key,
                        describe(field.value)
                    ),
                ),
            }
        }
        env
    }

    fn route(
        &mut self,
        node: &MarkedYaml<'_>,
        routes: &mut HashMap<String, Pos>,
    ) -> Option<String> {
        let route = self.string(node, "route")?;
        let at = pos(node);
        if !route.starts_with('/') {
            self.error(at, format!("route `{route}` must start with `/`"));
        } else if let Some(c) = route
            .chars()
            .find(|&c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            self.error(
                at,
                format!("route `{route}` contains {c:?}, which cannot appear in a request path"),
            );
        } else if RESERVED_ROUTES.contains(&route) {
            self.error(
                at,
                format!("route `{route}` is reserved for the gateway's own endpoint"),
            );
        }
        match routes.get(route) {
            Some(first) => self.error(
                at,
                format!(
                    "duplicate route `{route}` (first used at line {})",
                    first.line
                ),
            ),
            None => {
                routes.insert(route.to_string(), at);
            }
        }
        Some(route.to_string())
    }

    fn routing(&mut self, fields: &Fields<'_, '_>, chain: &str, known: &Known) -> Routing {
        let steps = fields.get("steps");
        let entry = fields.get("entry");
        let functions = fields.get("functions");
        let max_hops = fields.field("max_hops");
        let first_dynamic_key = [fields.field("entry"), fields.field("functions")]
            .into_iter()
            .flatten()
            .map(|f| f.key_at)
            .min_by_key(|p| (p.line, p.col));

        // Everything present is checked, even when the combination is wrong, so
        // one run reports bad function names as well as the conflict.
        let static_steps = steps.map(|n| self.steps(n, chain, known));
        let dynamic_functions = functions.map(|n| self.dynamic_functions(n, chain, known));
        let entry_name = entry.and_then(|n| self.function_ref(n, "entry", chain, known));

        match (static_steps, first_dynamic_key) {
            (Some(_), Some(at)) => {
                self.error(
                    at,
                    format!(
                        "{chain} has both `steps` and `entry`/`functions`: \
                         a chain is either static (`steps`) or dynamic (`entry` + `functions`)"
                    ),
                );
                Routing::Static { steps: Vec::new() }
            }
            (None, None) => {
                self.error(
                    fields.at,
                    format!(
                        "{chain} needs either `steps` (static) or `entry` + `functions` (dynamic)"
                    ),
                );
                Routing::Static { steps: Vec::new() }
            }
            (Some(steps), None) => {
                if let Some(hops) = max_hops {
                    self.error(
                        hops.key_at,
                        format!(
                            "`max_hops` only applies to dynamic chains (`entry` + `functions`), \
                             but {chain} has `steps`"
                        ),
                    );
                }
                Routing::Static { steps }
            }
            (None, Some(_)) => {
                if entry.is_none() {
                    self.error(
                        fields.at,
                        format!("dynamic {chain} is missing required key `entry`"),
                    );
                }
                if functions.is_none() {
                    self.error(
                        fields.at,
                        format!("dynamic {chain} is missing required key `functions`"),
                    );
                }
                let functions = dynamic_functions.unwrap_or_default();
                let entry_name = entry_name.unwrap_or_default();
                // An unknown entry has already been reported as such, and an
                // empty list has been reported on its own.
                let entry_known = known.as_ref().is_none_or(|k| k.contains_key(&entry_name));
                if let Some(node) = entry
                    && entry_known
                    && !entry_name.is_empty()
                    && !functions.is_empty()
                    && !functions.contains(&entry_name)
                {
                    self.error(
                        pos(node),
                        format!("entry `{entry_name}` is not listed in the `functions` of {chain}"),
                    );
                }
                let max_hops = max_hops
                    .and_then(|f| self.int_in(f.value, "max_hops", 1, u8::MAX.into()))
                    .map_or(DEFAULT_MAX_HOPS, |n| n as u8);
                Routing::Dynamic {
                    entry: entry_name,
                    functions,
                    max_hops,
                }
            }
        }
    }

    fn steps(&mut self, node: &MarkedYaml<'_>, chain: &str, known: &Known) -> Vec<String> {
        let Some(items) = self.list(node, "steps", "step") else {
            return Vec::new();
        };
        if let Some(extra) = items.get(MAX_STEPS) {
            self.error(
                pos(extra),
                format!(
                    "{chain} has {} steps; at most {MAX_STEPS} are allowed",
                    items.len()
                ),
            );
        }
        let mut steps: Vec<String> = Vec::with_capacity(items.len());
        let mut seen: Vec<Pos> = Vec::with_capacity(items.len());
        for item in items {
            let Some(name) = self.function_ref(item, "steps", chain, known) else {
                continue;
            };
            if let Some(i) = steps.iter().position(|s| *s == name) {
                self.error(
                    pos(item),
                    format!(
                        "function `{name}` appears twice in {chain} (first as step {} at line {}); \
                         a static chain visits each function at most once, a repeat would be a cycle",
                        i + 1,
                        seen[i].line
                    ),
                );
            }
            steps.push(name);
            seen.push(pos(item));
        }
        steps
    }

    fn dynamic_functions(
        &mut self,
        node: &MarkedYaml<'_>,
        chain: &str,
        known: &Known,
    ) -> Vec<String> {
        let Some(items) = self.list(node, "functions", "function") else {
            return Vec::new();
        };
        let mut names: Vec<(String, Pos)> = Vec::with_capacity(items.len());
        for item in items {
            let Some(name) = self.function_ref(item, "functions", chain, known) else {
                continue;
            };
            if let Some((_, first)) = names.iter().find(|(n, _)| *n == name) {
                self.error(
                    pos(item),
                    format!(
                        "function `{name}` is listed twice in {chain} (first at line {})",
                        first.line
                    ),
                );
                continue;
            }
            names.push((name, pos(item)));
        }
        names.into_iter().map(|(n, _)| n).collect()
    }

    /// A function name used by a chain; reports it if no function has it.
    fn function_ref(
        &mut self,
        node: &MarkedYaml<'_>,
        field: &str,
        chain: &str,
        known: &Known,
    ) -> Option<String> {
        let name = self.string(node, field)?;
        if let Some(known) = known
            && !known.contains_key(name)
        {
            let hint = match closest(name, known.keys().map(String::as_str)) {
                Some(near) => format!("did you mean `{near}`?"),
                None => "no function with that name is defined under `functions`".to_string(),
            };
            self.error(
                pos(node),
                format!("unknown function `{name}` in {chain}; {hint}"),
            );
        }
        Some(name.to_string())
    }

    fn content_type(&mut self, node: &MarkedYaml<'_>) -> Option<String> {
        let value = self.string(node, "content_type")?;
        // It is copied into a response header verbatim.
        let printable = value.chars().all(|c| c == '\t' || (' '..='~').contains(&c));
        if !printable || !value.contains('/') || value.trim() != value {
            self.error(
                pos(node),
                format!(
                    "invalid content_type `{}`: expected a media type such as text/plain, in printable ASCII",
                    value.escape_debug()
                ),
            );
            return None;
        }
        Some(value.to_string())
    }

    fn arena(&mut self, node: &MarkedYaml<'_>) -> (u32, u32) {
        let Some(fields) = self.fields(node, "`arena`", Some(ARENA_KEYS)) else {
            return (DEFAULT_SLOT_SIZE, DEFAULT_SLOTS);
        };
        let slot_size = fields
            .get("slot_size")
            .and_then(|n| {
                let bytes = self.size(n, "slot_size")?;
                if !(SLOT_ALIGN..=MAX_SLOT_SIZE).contains(&bytes) || bytes % SLOT_ALIGN != 0 {
                    self.error(
                        pos(n),
                        format!(
                            "`slot_size` must be a multiple of 64 between 64 and 64MiB, got {bytes} bytes"
                        ),
                    );
                    return None;
                }
                Some(bytes as u32)
            })
            .unwrap_or(DEFAULT_SLOT_SIZE);
        let slots = fields
            .get("slots")
            .and_then(|n| self.int_in(n, "slots", 1, MAX_SLOTS))
            .map_or(DEFAULT_SLOTS, |n| n as u32);
        (slot_size, slots)
    }

    /// Checks that `node` is a mapping with string keys drawn from `allowed`
    /// (any key when `None`).
    fn fields<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        what: &str,
        allowed: Option<&[&str]>,
    ) -> Option<Fields<'n, 'i>> {
        let YamlData::Mapping(map) = &untag(node).data else {
            self.error(
                pos(node),
                format!("{what} must be a mapping, found {}", describe(node)),
            );
            return None;
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let key_at = pos(key);
            let YamlData::Value(Scalar::String(name)) = &untag(key).data else {
                self.error(
                    key_at,
                    format!("keys in {what} must be strings, found {}", describe(key)),
                );
                continue;
            };
            if let Some(allowed) = allowed
                && !allowed.contains(&name.as_ref())
            {
                let hint = match closest(name, allowed.iter().copied()) {
                    Some(near) => format!("did you mean `{near}`?"),
                    None => format!("expected one of: {}", allowed.join(", ")),
                };
                self.error(key_at, format!("unknown key `{name}` in {what}; {hint}"));
                continue;
            }
            entries.push(Field {
                key: name.as_ref(),
                key_at,
                value,
            });
        }
        Some(Fields {
            at: pos(node),
            entries,
        })
    }

    /// A non-empty list; `noun` names one element in the message.
    fn list<'n, 'i>(
        &mut self,
        node: &'n MarkedYaml<'i>,
        field: &str,
        noun: &str,
    ) -> Option<&'n [MarkedYaml<'i>]> {
        match &untag(node).data {
            YamlData::Sequence(items) if items.is_empty() => {
                self.error(
                    pos(node),
                    format!("`{field}` must list at least one {noun}"),
                );
                None
            }
            YamlData::Sequence(items) => Some(items),
            _ => {
                self.error(
                    pos(node),
                    format!("`{field}` must be a list, found {}", describe(node)),
                );
                None
            }
        }
    }

    fn string<'n>(&mut self, node: &'n MarkedYaml<'_>, field: &str) -> Option<&'n str> {
        match &untag(node).data {
            YamlData::Value(Scalar::String(s)) => Some(s),
            _ => {
                self.error(
                    pos(node),
                    format!("`{field}` must be a string, found {}", describe(node)),
                );
                None
            }
        }
    }

    fn int_in(&mut self, node: &MarkedYaml<'_>, field: &str, min: i64, max: i64) -> Option<i64> {
        let value = match &untag(node).data {
            YamlData::Value(Scalar::Integer(i)) => *i,
            // YAML has no digit separators, so `1_000` arrives as a string.
            YamlData::Value(Scalar::String(s)) if parse_digits(s).is_ok() => {
                match parse_digits(s).ok().and_then(|n| i64::try_from(n).ok()) {
                    Some(n) => n,
                    None => {
                        self.error(pos(node), out_of_range(field, min, max, s));
                        return None;
                    }
                }
            }
            _ => {
                self.error(
                    pos(node),
                    format!("`{field}` must be an integer, found {}", describe(node)),
                );
                return None;
            }
        };
        if !(min..=max).contains(&value) {
            self.error(pos(node), out_of_range(field, min, max, value));
            return None;
        }
        Some(value)
    }

    fn size(&mut self, node: &MarkedYaml<'_>, field: &str) -> Option<u64> {
        let result = match &untag(node).data {
            YamlData::Value(Scalar::Integer(i)) => {
                u64::try_from(*i).map_err(|_| "a size cannot be negative".to_string())
            }
            YamlData::Value(Scalar::String(s)) => parse_size(s),
            _ => {
                self.error(
                    pos(node),
                    format!(
                        "`{field}` must be a size such as 64MiB or a number of bytes, found {}",
                        describe(node)
                    ),
                );
                return None;
            }
        };
        result
            .map_err(|reason| {
                self.error(pos(node), format!("invalid `{field}`: {reason}"));
            })
            .ok()
    }
}

fn looks_like_integer(node: &MarkedYaml<'_>) -> bool {
    match &untag(node).data {
        YamlData::Value(Scalar::Integer(_)) => true,
        YamlData::Value(Scalar::String(s)) => parse_digits(s).is_ok(),
        _ => false,
    }
}

fn label(kind: &str, name: &str) -> String {
    if name.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} `{name}`")
    }
}

fn out_of_range(field: &str, min: i64, max: i64, got: impl fmt::Display) -> String {
    if max == i64::MAX {
        format!("`{field}` must be at least {min}, got {got}")
    } else {
        format!("`{field}` must be between {min} and {max}, got {got}")
    }
}

/// Parses a byte size: a whole number with an optional binary unit
/// (`B`, `KiB`, `MiB`, `GiB`), with optional space between them.
/// Decimal units (`MB`) are refused rather than guessed at, since whether they
/// mean 10^6 or 2^20 is exactly the ambiguity a memory limit should not have.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim_start();
    if number.is_empty() {
        return Err(format!(
            "`{text}` is not a size: expected a whole number of bytes with an optional unit B, KiB, MiB or GiB, e.g. 64MiB"
        ));
    }
    if unit.starts_with(['.', ',']) {
        return Err(format!(
            "`{text}` is not a whole number; use a smaller unit instead of a fraction"
        ));
    }
    let multiplier = match unit {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}`: use B, KiB, MiB or GiB"
            ));
        }
    };
    parse_digits(number)?
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large"))
}

/// Decimal digits with optional `_` separators between them.
fn parse_digits(text: &str) -> Result<u64, String> {
    let well_formed = text.starts_with(|c: char| c.is_ascii_digit())
        && !text.ends_with('_')
        && !text.contains("__")
        && text.chars().all(|c| c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(format!("`{text}` is not a whole number"));
    }
    let mut value: u64 = 0;
    for digit in text.bytes().filter(u8::is_ascii_digit) {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(digit - b'0')))
            .ok_or_else(|| format!("`{text}` is too large"))?;
    }
    Ok(value)
}

/// The candidate closest to `name` by edit distance, if close enough to be a
/// plausible typo.
fn closest<'c>(name: &str, candidates: impl Iterator<Item = &'c str>) -> Option<&'c str> {
    let len = name.chars().count();
    let limit = (len / 3).max(1);
    candidates
        .map(|c| (edit_distance(name, c), c))
        // Any two one-letter names are one edit apart, which says nothing; a
        // truncated name (`timeout` for `timeout_ms`) is plausible however far.
        .filter(|&(d, c)| {
            name.eq_ignore_ascii_case(c)
                || (d <= limit && d < len.max(c.chars().count()))
                || (len >= 4 && c.starts_with(name))
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(b.1)))
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;
