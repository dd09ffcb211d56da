//! Checking one entry of `functions:`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use saphyr::{MarkedYaml, Scalar, YamlData};

use super::units::{GIB, KIB, MIB};
use super::yaml::{Pos, describe, looks_like_integer, pos, untag};
use super::{Checker, FunctionSpec, Isolation, ModuleMode, StartMode, label};

const WASM_PAGE: u64 = 64 * KIB;
const DEFAULT_INSTANCES: u32 = 1;
const MAX_INSTANCES: i64 = 64;
const DEFAULT_MEMORY_LIMIT: u64 = 64 * MIB;
const MIN_MEMORY_LIMIT: u64 = WASM_PAGE;
// A 32-bit linear memory cannot address more than this.
const MAX_MEMORY_LIMIT: u64 = 4 * GIB;
const DEFAULT_FUNCTION_TIMEOUT_MS: i64 = 1000;
const DEFAULT_FUEL: u64 = 1_000_000_000;

const FUNCTION_KEYS: &[&str] = &[
    "name",
    "module",
    "instances",
    "memory",
    "timeout_ms",
    "fuel",
    "mode",
    "env",
    "start",
    "isolation",
];

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
            .and_then(|n| self.int_in(n, "instances", 1, MAX_INSTANCES))
            .map_or(DEFAULT_INSTANCES, |n| n as u32);
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

        Some(FunctionSpec {
            name,
            module,
            instances,
            memory_limit,
            timeout,
            fuel,
            mode,
            env,
            start,
            isolation,
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
