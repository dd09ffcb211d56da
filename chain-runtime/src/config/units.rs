//! Numbers as they are written in the file: integers with `_` separators,
//! byte sizes with binary units, millisecond timeouts, and the range messages
//! for them.

use std::fmt;
use std::time::Duration;

use saphyr::{MarkedYaml, Scalar, YamlData};

use super::Checker;
use super::yaml::{Fields, describe, pos, untag};

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;
// Far beyond any sensible deadline, yet small enough that `Instant + timeout`
// can never overflow in the callers.
const MAX_TIMEOUT_MS: i64 = 24 * 60 * 60 * 1000;

impl Checker<'_> {
    /// Functions and chains both take their deadline as `timeout_ms`; `default_ms`
    /// stands in when it is absent or invalid.
    pub(super) fn timeout_ms(&mut self, fields: &Fields<'_, '_>, default_ms: i64) -> Duration {
        let ms = fields
            .get("timeout_ms")
            .and_then(|n| self.int_in(n, "timeout_ms", 1, MAX_TIMEOUT_MS))
            .unwrap_or(default_ms);
        Duration::from_millis(ms as u64)
    }

    pub(super) fn int_in(
        &mut self,
        node: &MarkedYaml<'_>,
        field: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
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

    pub(super) fn size(&mut self, node: &MarkedYaml<'_>, field: &str) -> Option<u64> {
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
pub(super) fn parse_size(text: &str) -> Result<u64, String> {
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
pub(super) fn parse_digits(text: &str) -> Result<u64, String> {
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
