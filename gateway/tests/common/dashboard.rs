//! The Grafana dashboard (deploy/grafana/spindle.json) held against real scrapes: every
//! metric a row's queries name must have samples in the scrapes a test took after making
//! that row's metrics move, and every label the queries group or filter by must be one
//! those metrics carry. Each row is checked by the test that produces its metrics
//! ([`ROWS_CHECKED_BY`]); tests/dashboard.rs checks that no row is left unchecked.

use std::collections::{BTreeMap, BTreeSet};

/// Which test checks each row, by the row's title.
pub const ROWS_CHECKED_BY: &[(&str, &str)] = &[
    (
        "Requests",
        "peers.rs remote_scale_out_to_a_peer_found_by_dns",
    ),
    (
        "Functions",
        "peers.rs remote_scale_out_to_a_peer_found_by_dns",
    ),
    (
        "Instances and autoscaling",
        "peers.rs remote_scale_out_to_a_peer_found_by_dns",
    ),
    (
        "Arena and payload",
        "peers.rs remote_scale_out_to_a_peer_found_by_dns",
    ),
    ("Forks", "peers.rs remote_scale_out_to_a_peer_found_by_dns"),
    (
        "Peers and budget",
        "peers.rs remote_scale_out_to_a_peer_found_by_dns",
    ),
    (
        "Processes",
        "peers.rs remote_scale_out_to_a_peer_found_by_dns",
    ),
    (
        "Dataplane",
        "ingress.rs the_guard_passes_the_service_drops_the_rest_and_throttles_new_connections",
    ),
    (
        "Ingress guard",
        "ingress.rs the_guard_passes_the_service_drops_the_rest_and_throttles_new_connections",
    ),
    (
        "Node fast path",
        "ingress.rs the_fast_path_from_the_config_carries_requests_past_the_nodes_forwarding",
    ),
    (
        "Shard steering",
        "ingress.rs steered_shards_answer_every_connection_and_count_it",
    ),
    (
        "Same-host acceleration",
        "ingress.rs same_host_clients_are_answered_socket_to_socket",
    ),
];

/// Labels every query may use without a metric carrying them: Prometheus adds `instance`
/// (and `job`) to every scraped sample, and histograms' buckets carry `le`.
const TARGET_LABELS: &[&str] = &["instance", "job", "le"];

pub struct Row {
    pub title: String,
    pub queries: Vec<String>,
}

/// The dashboard's rows with the queries of their panels, after checking its structure.
pub fn rows() -> Vec<Row> {
    let path = super::repo_root().join("deploy/grafana/spindle.json");
    let text = std::fs::read_to_string(&path).expect("deploy/grafana/spindle.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "spindle-overview");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let panels = dash["panels"].as_array().expect("panels");
    let mut rows: Vec<Row> = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        let grid = &panel["gridPos"];
        for key in ["h", "w", "x", "y"] {
            assert!(grid[key].as_u64().is_some(), "panel {id}: gridPos.{key}");
        }
        if panel["type"] == "row" {
            rows.push(Row {
                title: panel["title"].as_str().expect("row title").to_string(),
                queries: Vec::new(),
            });
            continue;
        }
        let row = rows.last_mut().expect("every panel sits under a row");
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {id}'s datasource"
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {id} queries nothing");
        for t in targets {
            let expr = t["expr"].as_str().expect("every target has an expr");
            assert!(t["refId"].as_str().is_some(), "panel {id}: refId");
            assert_balanced(expr);
            row.queries.push(expr.to_string());
        }
    }
    rows
}

fn assert_balanced(expr: &str) {
    let mut depth = Vec::new();
    for c in expr.chars() {
        match c {
            '(' | '{' | '[' => depth.push(c),
            ')' | '}' | ']' => {
                let open = depth.pop().unwrap_or_else(|| panic!("unbalanced: {expr}"));
                assert_eq!(
                    (open, c),
                    match open {
                        '(' => ('(', ')'),
                        '{' => ('{', '}'),
                        _ => ('[', ']'),
                    },
                    "mismatched brackets: {expr}"
                );
            }
            _ => {}
        }
    }
    assert!(depth.is_empty(), "unbalanced: {expr}");
}

/// The `spindle_*` metric names a query reads.
pub fn metrics_in(query: &str) -> BTreeSet<String> {
    words(query)
        .into_iter()
        .filter(|w| w.starts_with("spindle_"))
        .collect()
}

/// The labels a query groups by (`by (...)`) or matches on (`{label=...}`).
pub fn labels_in(query: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = query;
    while let Some(at) = rest.find("by (") {
        let inner = &rest[at + 4..];
        let end = inner.find(')').expect("closed by");
        out.extend(inner[..end].split(',').map(|l| l.trim().to_string()));
        rest = &inner[end..];
    }
    let mut rest = query;
    while let Some(at) = rest.find('{') {
        let inner = &rest[at + 1..];
        let end = inner.find('}').expect("closed matcher");
        for matcher in inner[..end].split(',') {
            let name: String = matcher
                .trim()
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
        rest = &inner[end..];
    }
    out
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Every sample name in Prometheus text pages, with the label names its samples carry.
pub fn series(pages: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for page in pages {
        for line in page
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name_end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = out.entry(line[..name_end].to_string()).or_default();
            if line[name_end..].starts_with('{') {
                let body = &line[name_end + 1..line.rfind('}').expect("closed labels")];
                // Values are quoted; split on `",` so commas inside values do not count.
                for pair in body.split("\",") {
                    if let Some((k, _)) = pair.split_once('=') {
                        labels.insert(k.trim().to_string());
                    }
                }
            }
        }
    }
    out
}

/// Checks every query of `rows` against `pages`: each metric it reads has samples there, and
/// each label it uses is carried by one of those metrics (or added by Prometheus).
pub fn assert_rows_have_samples(rows: &[&str], pages: &[String]) {
    let dashboard = self::rows();
    let seen = series(pages);
    let mut problems = Vec::new();
    for title in rows {
        let row = dashboard
            .iter()
            .find(|r| r.title == *title)
            .unwrap_or_else(|| panic!("the dashboard has no row {title:?}"));
        assert!(!row.queries.is_empty(), "row {title:?} has no panels");
        for query in &row.queries {
            let metrics = metrics_in(query);
            assert!(
                !metrics.is_empty(),
                "{title}: a query of no spindle metric: {query}"
            );
            let mut carried: BTreeSet<&str> = TARGET_LABELS.iter().copied().collect();
            for m in &metrics {
                match seen.get(m) {
                    Some(labels) => carried.extend(labels.iter().map(String::as_str)),
                    None => problems.push(format!("{title}: `{m}` has no sample ({query})")),
                }
            }
            for label in labels_in(query) {
                if !carried.contains(label.as_str()) {
                    problems.push(format!(
                        "{title}: no metric of `{query}` carries label `{label}`"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the dashboard queries what the scrapes lack:\n{}",
        problems.join("\n")
    );
}
