//! Checking one entry of `chains:`: its route, its static `steps` or dynamic
//! `entry` + `functions`, and its arena.

use std::collections::HashMap;

use saphyr::MarkedYaml;

use super::units::{KIB, MIB};
use super::yaml::{Fields, Pos, closest, pos};
use super::{ChainSpec, Checker, LargeSlots, Routing, label};

const DEFAULT_CHAIN_TIMEOUT_MS: i64 = 5000;
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

pub const CHAIN_KEYS: &[&str] = &[
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
pub const ARENA_KEYS: &[&str] = &["slot_size", "slots", "large"];
pub const LARGE_KEYS: &[&str] = &["slot_size", "slots", "above"];
// Large slots are mapped page by page (released to the kernel, mapped into a guest's
// memory), so they are whole pages.
const LARGE_ALIGN: u64 = 4 * KIB;
const MAX_LARGE_SLOTS: i64 = 1024;

/// Function names seen so far, for resolving references from chains.
/// `None` when the `functions` section itself is unusable, in which case
/// reference checks are skipped rather than flagging every name as unknown.
pub(super) type Known = Option<HashMap<String, Pos>>;

impl Checker<'_> {
    pub(super) fn chain(
        &mut self,
        node: &MarkedYaml<'_>,
        known: &Known,
        names: &mut HashMap<String, Pos>,
        routes: &mut HashMap<String, Pos>,
    ) -> Option<ChainSpec> {
        let fields = self.fields(node, "a chain", Some(CHAIN_KEYS))?;
        let name = self.name_field(&fields, "chain", names);
        let what = label("chain", &name);

        let route = self
            .required(&fields, "route", &what)
            .and_then(|n| self.route(n, routes))
            .unwrap_or_default();
        let routing = self.routing(&fields, &what, known);
        let timeout = self.timeout_ms(&fields, DEFAULT_CHAIN_TIMEOUT_MS);
        let content_type = fields
            .get("content_type")
            .and_then(|n| self.content_type(n))
            .unwrap_or_else(|| DEFAULT_CONTENT_TYPE.to_string());
        let (slot_size, slots, large) = fields
            .get("arena")
            .map_or((DEFAULT_SLOT_SIZE, DEFAULT_SLOTS, None), |n| self.arena(n));

        Some(ChainSpec {
            name,
            route,
            routing,
            timeout,
            content_type,
            slot_size,
            slots,
            large,
        })
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
        self.unique(routes, route, at, |first| {
            format!("duplicate route `{route}` (first used at line {first})")
        });
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

    fn arena(&mut self, node: &MarkedYaml<'_>) -> (u32, u32, Option<LargeSlots>) {
        let Some(fields) = self.fields(node, "`arena`", Some(ARENA_KEYS)) else {
            return (DEFAULT_SLOT_SIZE, DEFAULT_SLOTS, None);
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
        let large = fields
            .get("large")
            .and_then(|n| self.large_slots(n, slot_size));
        (slot_size, slots, large)
    }

    /// `arena.large`: both keys required (a large class of default size would be a guess).
    fn large_slots(&mut self, node: &MarkedYaml<'_>, small: u32) -> Option<LargeSlots> {
        let fields = self.fields(node, "`arena.large`", Some(LARGE_KEYS))?;
        let size = self.required(&fields, "slot_size", "`arena.large`");
        let count = self.required(&fields, "slots", "`arena.large`");
        let slot_size = size.and_then(|n| {
            let bytes = self.size(n, "slot_size")?;
            if bytes <= u64::from(small) || bytes > MAX_SLOT_SIZE || bytes % LARGE_ALIGN != 0 {
                self.error(
                    pos(n),
                    format!(
                        "`large.slot_size` must be a multiple of 4KiB, larger than the chain's \
                         slot_size ({small} bytes) and at most 64MiB, got {bytes} bytes"
                    ),
                );
                return None;
            }
            Some(bytes as u32)
        });
        let slots = count.and_then(|n| self.int_in(n, "slots", 1, MAX_LARGE_SLOTS));
        // Bodies over `above` start in a large slot: a small slot must also hold what the
        // functions make of the body (the hello chain's frame adds 27 bytes, up to 6x for
        // escape-heavy text), and the class is chosen before any function runs.
        let above = match fields.get("above") {
            None => Some(small),
            Some(n) => self.size(n, "above").and_then(|bytes| {
                if bytes > u64::from(small) {
                    self.error(
                        pos(n),
                        format!(
                            "`large.above` must be at most the chain's slot_size ({small} \
                             bytes), got {bytes} bytes"
                        ),
                    );
                    return None;
                }
                Some(bytes as u32)
            }),
        };
        Some(LargeSlots {
            slot_size: slot_size?,
            slots: slots? as u32,
            above: above?,
        })
    }
}
