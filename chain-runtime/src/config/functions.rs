//! Checking one entry of `functions:`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saphyr::{MarkedYaml, Scalar, YamlData};

use super::units::{GIB, KIB, MIB};
use super::yaml::{Pos, describe, looks_like_integer, pos, untag};
use super::{
    Autoscale, Checker, DEFAULT_IDLE_SPIN, FunctionSpec, Instances, Isolation, ModuleMode,
    PreopenDir, StartMode, label,
};

const WASM_PAGE: u64 = 64 * KIB;
const DEFAULT_INSTANCES: u32 = 1;
const MAX_INSTANCES: i64 = 64;
const DEFAULT_WAIT_QUEUE: u32 = 256;
const MAX_WAIT_QUEUE: i64 = 65536;
const DEFAULT_TARGET: u32 = 1;
const MAX_TARGET: i64 = 1000;
const DEFAULT_STABLE_WINDOW_MS: i64 = 6000;
const DEFAULT_SCALE_DOWN_DELAY_MS: i64 = 2000;
const MAX_WINDOW_MS: i64 = 3_600_000;
pub const INSTANCES_KEYS: &[&str] = &[
    "min",
    "max",
    "target",
    "stable_window_ms",
    "panic_window_ms",
    "scale_down_delay_ms",
    "utilization_percent",
    "concurrency",
];
const DEFAULT_UTILIZATION_PERCENT: i64 = 70;
const MAX_CONCURRENCY: i64 = 10_000;
/// Requests an autoscaled instance holds by default, per unit of `target`: a few in its
/// socket keep it busy between calls; the rest wait where any instance can take them.
const DEFAULT_CONCURRENCY_PER_TARGET: i64 = 4;
const DEFAULT_MEMORY_LIMIT: u64 = 64 * MIB;
const MIN_MEMORY_LIMIT: u64 = WASM_PAGE;
// A 32-bit linear memory cannot address more than this.
const MAX_MEMORY_LIMIT: u64 = 4 * GIB;
const DEFAULT_FUNCTION_TIMEOUT_MS: i64 = 1000;
const DEFAULT_FUEL: u64 = 1_000_000_000;

pub const FUNCTION_KEYS: &[&str] = &[
    "name",
    "module",
    "instances",
    "wait_queue",
    "memory",
    "timeout_ms",
    "fuel",
    "mode",
    "env",
    "start",
    "isolation",
    "idle_spin_us",
    "args",
    "files",
];
/// `args:` entries at most, each at most [`MAX_ARG_BYTES`], all of argv together (the
/// function's name included, each with its NUL) at most [`MAX_ARGV_BYTES`].
pub const MAX_ARGS: usize = 256;
pub const MAX_ARG_BYTES: usize = 4096;
pub const MAX_ARGV_BYTES: usize = 64 * 1024;
/// `files:` entries at most (each is an fd a worker is handed: `proto::worker::MAX_PREOPENS`).
pub const MAX_FILES: usize = 16;
/// Longest guest path of a `files:` entry.
pub const MAX_GUEST_PATH: usize = 1024;
/// Past this an idle instance would burn a core between requests; blocking costs ~10 µs.
const MAX_IDLE_SPIN_US: i64 = 1000;

impl Checker<'_> {
    pub(super) fn function(
        &mut self,
        node: &MarkedYaml<'_>,
        names: &mut HashMap<String, Pos>,
    ) -> Option<FunctionSpec> {
        let fields = self.fields(node, "a function", Some(FUNCTION_KEYS))?;
        let name = self.name_field(&fields, "function", names);
        let what = label("function", &name);

        let module_node = self.required(&fields, "module", &what);
        let errors_before = self.errors.len();
        let module = module_node.and_then(|n| self.module(n));
        // Only a module file that exists is worth a deeper look (`Config::load_checking`).
        let module_found = module.is_some() && self.errors.len() == errors_before;
        let module = module.unwrap_or_default();
        let instances = fields
            .get("instances")
            .and_then(|n| self.instances(n))
            .unwrap_or(Instances::fixed(DEFAULT_INSTANCES));
        let wait_queue = fields
            .get("wait_queue")
            .and_then(|n| self.int_in(n, "wait_queue", 0, MAX_WAIT_QUEUE))
            .map_or(DEFAULT_WAIT_QUEUE, |n| n as u32);
        if wait_queue == 0
            && instances.min == 0
            && let Some(node) = fields.get("wait_queue")
        {
            self.error(
                pos(node),
                "`wait_queue: 0` cannot go with `instances.min: 0`: at zero instances every \
                 request would be refused and none would wait to bring an instance up"
                    .to_string(),
            );
        }
        let memory_limit = fields
            .get("memory")
            .and_then(|n| self.memory(n))
            .unwrap_or(DEFAULT_MEMORY_LIMIT);
        let timeout = self.timeout_ms(&fields, DEFAULT_FUNCTION_TIMEOUT_MS);
        let fuel = match fields.get("fuel") {
            None => Some(DEFAULT_FUEL),
            Some(n) => self.fuel(n).unwrap_or(Some(DEFAULT_FUEL)),
        };
        let mode = fields
            .get("mode")
            .and_then(|n| self.mode(n))
            .unwrap_or_default();
        let env = fields.get("env").map(|n| self.env(n)).unwrap_or_default();
        let start = self.start(fields.get("start"), mode);
        let isolation = self.isolation(fields.get("isolation"), mode);
        let idle_spin = fields
            .get("idle_spin_us")
            .and_then(|n| self.int_in(n, "idle_spin_us", 0, MAX_IDLE_SPIN_US))
            .map_or(DEFAULT_IDLE_SPIN, |us| Duration::from_micros(us as u64));
        let args = fields
            .get("args")
            .map(|n| self.args(n, &name))
            .unwrap_or_default();
        let files = fields
            .get("files")
            .map(|n| self.files(n))
            .unwrap_or_default();

        let spec = FunctionSpec {
            name,
            module,
            instances,
            wait_queue,
            memory_limit,
            timeout,
            fuel,
            mode,
            env,
            start,
            isolation,
            idle_spin,
            args,
            files,
        };
        if module_found
            && let Some(at) = module_node.map(pos)
            && let Some(check) = self.check_module.take()
        {
            let problems = check(&spec);
            self.check_module = Some(check);
            for problem in problems {
                self.error(at, format!("{what}: {problem}"));
            }
        }
        Some(spec)
    }

    /// `args: [..]`: strings, argv[1..] (argv[0] is the function's name).
    fn args(&mut self, node: &MarkedYaml<'_>, name: &str) -> Vec<String> {
        let YamlData::Sequence(items) = &untag(node).data else {
            self.error(
                pos(node),
                format!("`args` must be a list of strings, found {}", describe(node)),
            );
            return Vec::new();
        };
        if items.len() > MAX_ARGS {
            self.error(
                pos(node),
                format!("{} arguments; at most {MAX_ARGS} are allowed", items.len()),
            );
        }
        let mut args = Vec::with_capacity(items.len());
        let mut total = name.len() + 1;
        for item in items {
            match &untag(item).data {
                YamlData::Value(Scalar::String(arg)) if arg.contains('\0') => {
                    self.error(pos(item), "an argument must not contain NUL");
                }
                YamlData::Value(Scalar::String(arg)) if arg.len() > MAX_ARG_BYTES => self.error(
                    pos(item),
                    format!(
                        "argument of {} bytes; at most {MAX_ARG_BYTES} are allowed",
                        arg.len()
                    ),
                ),
                YamlData::Value(Scalar::String(arg)) => {
                    total += arg.len() + 1;
                    args.push(arg.to_string());
                }
                _ => self.error(
                    pos(item),
                    format!(
                        "an argument must be a string, found {} (quote it)",
                        describe(item)
                    ),
                ),
            }
        }
        if total > MAX_ARGV_BYTES {
            self.error(
                pos(node),
                format!(
                    "the arguments take {total} bytes (with the function's name as argv[0]); \
                     at most {MAX_ARGV_BYTES} are allowed"
                ),
            );
        }
        args
    }

    /// `files: { /guest/path: host/dir, .. }`.
    fn files(&mut self, node: &MarkedYaml<'_>) -> Vec<PreopenDir> {
        let Some(fields) = self.fields(node, "`files`", None) else {
            return Vec::new();
        };
        if fields.entries.len() > MAX_FILES {
            self.error(
                fields.at,
                format!(
                    "{} preopened directories; at most {MAX_FILES} are allowed",
                    fields.entries.len()
                ),
            );
        }
        // A guest path cannot be given twice: YAML refuses duplicated keys, and normal form
        // leaves one spelling per path.
        let mut files = Vec::with_capacity(fields.entries.len());
        for field in &fields.entries {
            let guest = field.key;
            let guest_ok = match guest_path_problem(guest) {
                Some(problem) => {
                    self.error(
                        field.key_at,
                        format!("invalid guest path `{guest}` in `files`: {problem}"),
                    );
                    false
                }
                None => true,
            };
            let Some(host) = self.host_dir(field.value, guest) else {
                continue;
            };
            if guest_ok {
                files.push(PreopenDir {
                    guest: guest.to_string(),
                    host,
                });
            }
        }
        files
    }

    /// The host side of a `files:` entry: a directory, relative to the config's directory.
    fn host_dir(&mut self, node: &MarkedYaml<'_>, guest: &str) -> Option<PathBuf> {
        let YamlData::Value(Scalar::String(written)) = &untag(node).data else {
            self.error(
                pos(node),
                format!(
                    "the host directory for `{guest}` must be a string (a path), found {}",
                    describe(node)
                ),
            );
            return None;
        };
        if written.is_empty() {
            self.error(
                pos(node),
                format!("the host directory for `{guest}` must not be empty"),
            );
            return None;
        }
        let resolved = self.relative_to_config(Path::new(written.as_ref()));
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_dir() => Some(resolved),
            Ok(_) => {
                self.error(
                    pos(node),
                    format!("`{}` is not a directory", resolved.display()),
                );
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.error(
                    pos(node),
                    format!("directory not found: `{}`", resolved.display()),
                );
                None
            }
            Err(e) => {
                self.error(
                    pos(node),
                    format!("cannot access directory `{}`: {e}", resolved.display()),
                );
                None
            }
        }
    }

    /// Absolute paths as written; relative ones joined onto the configuration's directory.
    fn relative_to_config(&self, written: &Path) -> PathBuf {
        if written.is_absolute() {
            written.to_path_buf()
        } else {
            match self.source.parent() {
                Some(dir) => dir.join(written),
                None => written.to_path_buf(),
            }
        }
    }

    /// `instances: N` or `instances: { min, max, ... }`.
    fn instances(&mut self, node: &MarkedYaml<'_>) -> Option<Instances> {
        if !matches!(untag(node).data, YamlData::Mapping(_)) {
            return self
                .int_in(node, "instances", 1, MAX_INSTANCES)
                .map(|n| Instances::fixed(n as u32));
        }
        let fields = self.fields(node, "`instances`", Some(INSTANCES_KEYS))?;
        let Some(max_node) = fields.get("max") else {
            self.error(
                pos(node),
                "`instances` as a mapping needs `max`, the most instances the autoscaler may run"
                    .to_string(),
            );
            return None;
        };
        let max = self.int_in(max_node, "instances.max", 1, MAX_INSTANCES)?;
        let min = match fields.get("min") {
            None => 0,
            Some(n) => self.int_in(n, "instances.min", 0, max)?,
        };
        let window = |this: &mut Self, key: &str, default: i64| -> Option<i64> {
            match fields.get(key) {
                None => Some(default),
                Some(n) => this.int_in(n, &format!("instances.{key}"), 1, MAX_WINDOW_MS),
            }
        };
        let target = match fields.get("target") {
            None => i64::from(DEFAULT_TARGET),
            Some(n) => self.int_in(n, "instances.target", 1, MAX_TARGET)?,
        };
        let stable = window(self, "stable_window_ms", DEFAULT_STABLE_WINDOW_MS)?;
        let panic = match fields.get("panic_window_ms") {
            // A tenth of the stable window, as Knative's default panic window is.
            None => (stable / 10).max(1),
            Some(n) => self.int_in(n, "instances.panic_window_ms", 1, stable)?,
        };
        let delay = window(self, "scale_down_delay_ms", DEFAULT_SCALE_DOWN_DELAY_MS)?;
        let utilization = match fields.get("utilization_percent") {
            None => DEFAULT_UTILIZATION_PERCENT,
            Some(n) => self.int_in(n, "instances.utilization_percent", 1, 100)?,
        };
        let concurrency = match fields.get("concurrency") {
            None => (target * DEFAULT_CONCURRENCY_PER_TARGET).min(MAX_CONCURRENCY),
            Some(n) => self.int_in(n, "instances.concurrency", 1, MAX_CONCURRENCY)?,
        };
        Some(Instances {
            min: min as u32,
            max: max as u32,
            autoscale: Some(Autoscale {
                target: target as u32,
                stable_window: std::time::Duration::from_millis(stable as u64),
                panic_window: std::time::Duration::from_millis(panic as u64),
                scale_down_delay: std::time::Duration::from_millis(delay as u64),
                utilization_percent: utilization as u32,
                concurrency: concurrency as u32,
            }),
        })
    }

    fn isolation(&mut self, node: Option<&MarkedYaml<'_>>, mode: ModuleMode) -> Isolation {
        let Some(node) = node else {
            return Isolation::Reuse;
        };
        match self.string(node, "isolation") {
            Some("reuse") => Isolation::Reuse,
            Some("fresh_per_request") if mode == ModuleMode::Command => {
                self.error(
                    pos(node),
                    "`isolation: fresh_per_request` needs `mode: reactor`: a command module \
                     already runs every request in a fresh instance",
                );
                Isolation::Reuse
            }
            Some("fresh_per_request") => Isolation::FreshPerRequest,
            Some(other) => {
                let message =
                    format!("unknown isolation `{other}`: expected `reuse` or `fresh_per_request`");
                self.error(pos(node), message);
                Isolation::Reuse
            }
            None => Isolation::Reuse,
        }
    }

    fn start(&mut self, node: Option<&MarkedYaml<'_>>, mode: ModuleMode) -> StartMode {
        let default = match mode {
            ModuleMode::Reactor => StartMode::Fork,
            ModuleMode::Command => StartMode::Exec,
        };
        let Some(node) = node else {
            return default;
        };
        match self.string(node, "start") {
            Some("exec") => StartMode::Exec,
            Some("fork") if mode == ModuleMode::Command => {
                self.error(
                    pos(node),
                    "`start: fork` needs `mode: reactor`: a command module has no warm \
                     instance to fork (use `start: exec`)"
                        .to_string(),
                );
                default
            }
            Some("fork") => StartMode::Fork,
            Some(other) => {
                let message = format!("unknown start `{other}`: expected `fork` or `exec`");
                self.error(pos(node), message);
                default
            }
            None => default,
        }
    }

    fn module(&mut self, node: &MarkedYaml<'_>) -> Option<PathBuf> {
        let written = self.string(node, "module")?;
        if written.is_empty() {
            self.error(pos(node), "`module` must not be empty");
            return None;
        }
        let resolved = self.relative_to_config(Path::new(written));
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
}

/// What is wrong with `path` as the guest path of a preopened directory, if anything: it must
/// be absolute and in normal form, since the guest's libc matches paths against it by prefix.
pub(super) fn guest_path_problem(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return Some("it must be absolute (start with `/`)".into());
    }
    if path.len() > MAX_GUEST_PATH {
        return Some(format!("longer than {MAX_GUEST_PATH} bytes"));
    }
    if path.contains('\0') {
        return Some("it contains NUL".into());
    }
    if path == "/" {
        return None;
    }
    let normal: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if normal.contains(&"..") {
        return Some("it must not contain `..`".into());
    }
    let normal = format!("/{}", normal.join("/"));
    (normal != path).then(|| format!("write it as `{normal}`"))
}
