//! Reading one counter family off a target's Prometheus text page (`GET /metrics`).
//!
//! The bench must not know how a target works inside, so "bytes copied per request" is
//! whatever the target itself counts in `spindle_payload_bytes_copied_total`, scraped before
//! and after the window. A target that does not expose the family gets `null`, never an
//! estimate.

/// The counter family the payload sweep reads.
pub const BYTES_COPIED_FAMILY: &str = "spindle_payload_bytes_copied_total";

/// The sum over every label set of the samples named `family` in a Prometheus text-format
/// page, or None if the page does not expose that family at all.
///
/// A family announced by `# TYPE`/`# HELP` but without samples yet (a labelled counter no
/// request has touched) is exposed and sums to 0. OpenMetrics announces a counter without its
/// `_total` suffix; that spelling is recognized too. NaN samples are left out.
pub fn counter_sum(page: &str, family: &str) -> Option<f64> {
    let bare = family.strip_suffix("_total").unwrap_or(family);
    let mut exposed = false;
    let mut sum = 0.0;
    for line in page.lines() {
        let line = line.trim_start();
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if matches!(words.next(), Some("TYPE" | "HELP"))
                && words
                    .next()
                    .is_some_and(|name| name == family || name == bare)
            {
                exposed = true;
            }
            continue;
        }
        let Some((name, value)) = sample(line) else {
            continue;
        };
        if name == family {
            exposed = true;
            if !value.is_nan() {
                sum += value;
            }
        }
    }
    exposed.then_some(sum)
}

/// One sample line: `name{labels} value [timestamp]` → (name, value). Label values are
/// quoted strings that may contain `}`, spaces and escaped quotes, so the label block is
/// scanned rather than split.
fn sample(line: &str) -> Option<(&str, f64)> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut close = None;
        for (i, c) in rest.char_indices().skip(1) {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    close = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &rest[close? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, value))
}

/// Bytes copied per request from two scrapes around a window, or why there is no figure.
pub(crate) fn per_request(
    before: Result<Option<f64>, String>,
    after: Result<Option<f64>, String>,
    requests: u64,
) -> Result<f64, String> {
    let (before, after) = (before?, after?);
    let (Some(before), Some(after)) = (before, after) else {
        return Err(format!(
            "not exposed: the target's /metrics has no {BYTES_COPIED_FAMILY}"
        ));
    };
    if after < before {
        return Err(format!(
            "{BYTES_COPIED_FAMILY} went backwards ({before} → {after}): the counter was reset"
        ));
    }
    if requests == 0 {
        return Err("no successful requests to divide by".into());
    }
    Ok((after - before) / requests as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP spindle_requests_total Requests answered, by chain and status.
# TYPE spindle_requests_total counter
spindle_requests_total{chain="hello",code="200"} 1042
# HELP spindle_payload_bytes_copied_total Payload bytes copied, by where.
# TYPE spindle_payload_bytes_copied_total counter
spindle_payload_bytes_copied_total{chain="hello",stage="ingress"} 13546
spindle_payload_bytes_copied_total{chain="hello",stage="egress",note="a } in \"quotes\""} 4.5e3 1700000000000
spindle_payload_bytes_copied_total_created{chain="hello"} 1.7e9
spindle_payload_bytes_copied_totalx 99
spindle_payload_bytes_copied_total 100
  spindle_payload_bytes_copied_total{chain="nan"} NaN
"#;

    #[test]
    fn sums_every_label_set_of_the_family_and_nothing_else() {
        assert_eq!(
            counter_sum(PAGE, BYTES_COPIED_FAMILY),
            Some(13546.0 + 4500.0 + 100.0)
        );
        assert_eq!(counter_sum(PAGE, "spindle_requests_total"), Some(1042.0));
        assert_eq!(counter_sum(PAGE, "spindle_nothing_total"), None);
        // The ceiling answers "hello world" to /metrics too: not exposed.
        assert_eq!(counter_sum("hello world", BYTES_COPIED_FAMILY), None);
        // Announced but not yet touched: exposed, 0.
        let empty = "# TYPE spindle_payload_bytes_copied_total counter\n";
        assert_eq!(counter_sum(empty, BYTES_COPIED_FAMILY), Some(0.0));
        // OpenMetrics names the family without `_total`.
        let om = "# TYPE spindle_payload_bytes_copied counter\n\
                  spindle_payload_bytes_copied_total{a=\"b\"} 7\n# EOF\n";
        assert_eq!(counter_sum(om, BYTES_COPIED_FAMILY), Some(7.0));
        // A broken label block is skipped, not misread.
        assert_eq!(
            counter_sum(
                "spindle_payload_bytes_copied_total{a=\"} 5\n",
                BYTES_COPIED_FAMILY
            ),
            None
        );
    }

    #[test]
    fn per_request_figures_are_deltas_or_say_why_not() {
        assert_eq!(
            per_request(Ok(Some(1000.0)), Ok(Some(5000.0)), 4),
            Ok(1000.0)
        );
        let absent = per_request(Ok(None), Ok(None), 4).unwrap_err();
        assert!(absent.starts_with("not exposed"), "{absent}");
        assert!(
            per_request(Ok(Some(5.0)), Ok(Some(1.0)), 4)
                .unwrap_err()
                .contains("backwards")
        );
        assert!(per_request(Ok(Some(1.0)), Ok(Some(1.0)), 0).is_err());
        let failed = per_request(Err("GET /metrics answered 404".into()), Ok(Some(1.0)), 4);
        assert_eq!(failed, Err("GET /metrics answered 404".into()));
    }
}
