//! Checking one entry of `functions:`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use saphyr::{MarkedYaml, Scalar, YamlData};

use super::units::{GIB, KIB, MIB};
use super::yaml::{Pos, describe, looks_like_integer, pos, untag};
use super::{
    Autoscale, Checker, DEFAULT_IDLE_SPIN, FunctionSpec, Instances, Isolation, ModuleMode,
    StartMode, label,
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
];
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

        let module = self
            .required(&fields, "module", &what)
            .and_then(|n| self.module(n))
            .unwrap_or_default();
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

        Some(FunctionSpec {
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
        })
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
