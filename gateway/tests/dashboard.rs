//! deploy/grafana/spindle.json: valid JSON in Grafana's dashboard shape, every query reading
//! only documented spindle metrics, and every row held against a real scrape by the test
//! named in `common::dashboard::ROWS_CHECKED_BY` (those tests call
//! `assert_rows_have_samples` with the scrapes they took).

mod common;

use common::dashboard::{ROWS_CHECKED_BY, labels_in, metrics_in, rows, series};

#[test]
fn every_row_is_checked_against_a_real_scrape_by_some_test() {
    let rows = rows();
    assert!(rows.len() >= 10, "{} rows", rows.len());
    for row in &rows {
        assert!(
            ROWS_CHECKED_BY.iter().any(|(title, _)| *title == row.title),
            "row {:?} is checked by no test: add it to ROWS_CHECKED_BY and to the test that makes its metrics move",
            row.title
        );
    }
    for (title, test) in ROWS_CHECKED_BY {
        assert!(
            rows.iter().any(|r| r.title == *title),
            "{test} checks a row {title:?} the dashboard lacks"
        );
        let (file, name) = test.split_once(' ').unwrap();
        let source =
            std::fs::read_to_string(common::repo_root().join("gateway/tests").join(file)).unwrap();
        assert!(
            source.contains(&format!("fn {name}(")),
            "{file} has no test {name}"
        );
        assert!(
            source.contains(&format!("\"{title}\"")),
            "{file} never checks row {title:?}"
        );
    }
}

#[test]
fn every_metric_the_dashboard_reads_is_documented() {
    let documented = std::fs::read_to_string(common::repo_root().join("docs/metrics.md")).unwrap();
    for row in rows() {
        for query in &row.queries {
            for metric in metrics_in(query) {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| metric.strip_suffix(s))
                    .unwrap_or(&metric);
                assert!(
                    documented.contains(&format!("`{family}`")),
                    "{}: `{family}` is not in docs/metrics.md",
                    row.title
                );
            }
        }
    }
}

/// The checks' own parsing, on queries and a page whose answers are known.
#[test]
fn queries_and_pages_are_read_as_prometheus_means_them() {
    let q = r#"sum by (chain, code) (rate(spindle_requests_total{chain=~"$chain",code!="200"}[$__rate_interval]))"#;
    assert_eq!(
        metrics_in(q).into_iter().collect::<Vec<_>>(),
        ["spindle_requests_total"]
    );
    assert_eq!(
        labels_in(q).into_iter().collect::<Vec<_>>(),
        ["chain", "code"]
    );
    let page =
        "# HELP x y\nspindle_a_total{chain=\"c,1\",code=\"200\"} 3\nspindle_b 1\n".to_string();
    let s = series(&[page]);
    assert_eq!(
        s["spindle_a_total"].iter().collect::<Vec<_>>(),
        ["chain", "code"]
    );
    assert!(s["spindle_b"].is_empty());
}
