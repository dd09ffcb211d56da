//! The span-carrying YAML tree as the checks see it: positions for messages,
//! mappings checked against their allowed keys, and suggestions for misspelt
//! names.

use saphyr::{MarkedYaml, Marker, Scalar, YamlData};

use super::Checker;
use super::units::parse_digits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pos {
    pub(super) line: usize,
    pub(super) col: usize,
}

impl Pos {
    pub(super) const START: Pos = Pos { line: 1, col: 1 };
}

impl From<Marker> for Pos {
    fn from(m: Marker) -> Self {
        Pos {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

pub(super) fn pos(node: &MarkedYaml<'_>) -> Pos {
    node.span.start.into()
}

/// Custom tags carry no meaning here; look through them to the node itself.
pub(super) fn untag<'n, 'i>(mut node: &'n MarkedYaml<'i>) -> &'n MarkedYaml<'i> {
    while let YamlData::Tagged(_, inner) = &node.data {
        node = inner;
    }
    node
}

pub(super) fn describe(node: &MarkedYaml<'_>) -> String {
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
pub(super) struct Fields<'n, 'i> {
    pub(super) at: Pos,
    pub(super) entries: Vec<Field<'n, 'i>>,
}

pub(super) struct Field<'n, 'i> {
    pub(super) key: &'n str,
    pub(super) key_at: Pos,
    pub(super) value: &'n MarkedYaml<'i>,
}

impl<'n, 'i> Fields<'n, 'i> {
    pub(super) fn field(&self, key: &str) -> Option<&Field<'n, 'i>> {
        self.entries.iter().find(|f| f.key == key)
    }

    pub(super) fn get(&self, key: &str) -> Option<&'n MarkedYaml<'i>> {
        self.field(key).map(|f| f.value)
    }
}

impl Checker<'_> {
    /// Checks that `node` is a mapping with string keys drawn from `allowed`
    /// (any key when `None`).
    pub(super) fn fields<'n, 'i>(
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

    /// The value of `key`; its absence is reported at the mapping, which `what`
    /// names in the message.
    pub(super) fn required<'n, 'i>(
        &mut self,
        fields: &Fields<'n, 'i>,
        key: &str,
        what: &str,
    ) -> Option<&'n MarkedYaml<'i>> {
        let value = fields.get(key);
        if value.is_none() {
            self.error(fields.at, format!("{what} is missing required key `{key}`"));
        }
        value
    }

    /// A non-empty list; `noun` names one element in the message.
    pub(super) fn list<'n, 'i>(
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

    pub(super) fn string<'n>(&mut self, node: &'n MarkedYaml<'_>, field: &str) -> Option<&'n str> {
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
}

pub(super) fn looks_like_integer(node: &MarkedYaml<'_>) -> bool {
    match &untag(node).data {
        YamlData::Value(Scalar::Integer(_)) => true,
        YamlData::Value(Scalar::String(s)) => parse_digits(s).is_ok(),
        _ => false,
    }
}

/// The candidate closest to `name` by edit distance, if close enough to be a
/// plausible typo.
pub(super) fn closest<'c>(
    name: &str,
    candidates: impl Iterator<Item = &'c str>,
) -> Option<&'c str> {
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

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
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
