//! The one thing the bench needs from a chain configuration: the first chain's route.
//!
//! A line scan rather than the real parser: the parser lives in `chain-runtime`, which would
//! pull a Wasm runtime into the load generator. The gateway validates the file when it starts,
//! and `--path` overrides whatever is found here.

/// The `route:` of the first entry under the top-level `chains:` key, block or flow style.
pub(crate) fn first_route(yaml: &str) -> Option<String> {
    let mut in_chains = false;
    for raw in yaml.lines() {
        let line = strip_comment(raw);
        if line.trim().is_empty() {
            continue;
        }
        let top_level = !line.starts_with([' ', '\t', '-']);
        if top_level {
            in_chains = line.trim_end().starts_with("chains:");
            // `chains: [{ name: a, route: /a, ... }]` on one line.
            if !in_chains {
                continue;
            }
        }
        if !in_chains {
            continue;
        }
        if let Some(route) = route_value(line) {
            return Some(route);
        }
    }
    None
}

fn strip_comment(line: &str) -> &str {
    // A `#` starts a comment at the line start or after whitespace (YAML's rule); routes
    // cannot contain whitespace, so a `#` inside one is never mistaken for a comment.
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'#' && (i == 0 || bytes[i - 1].is_ascii_whitespace()) {
            return &line[..i];
        }
    }
    line
}

fn route_value(line: &str) -> Option<String> {
    let mut rest = line;
    while let Some(at) = rest.find("route:") {
        let before = rest[..at].chars().last();
        let after = &rest[at + "route:".len()..];
        // A key, not the tail of another word like `reroute:`.
        if before.is_none_or(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-')) {
            let value: String = after
                .trim_start()
                .chars()
                .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | '}' | ']'))
                .collect();
            let value = value.trim_matches(|c| c == '"' || c == '\'');
            if !value.is_empty() {
                return Some(value.to_string());
            }
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_chain_route() {
        let hello = include_str!("../../configs/hello.yaml");
        assert_eq!(first_route(hello).as_deref(), Some("/hello"));
        let bench = include_str!("../bench.yaml");
        assert_eq!(first_route(bench).as_deref(), Some("/hello"));
        let flow = "functions: []\nchains:\n  - { name: x, route: \"/shop\", steps: [a] }\n";
        assert_eq!(first_route(flow).as_deref(), Some("/shop"));
        let inline = "chains: [{ name: x, route: /one }, { name: y, route: /two }]\n";
        assert_eq!(first_route(inline).as_deref(), Some("/one"));
        // A `route:` outside `chains:` (here in a function's env) is not a chain route.
        let elsewhere = "functions:\n  - name: a\n    env: { route: /nope }\n# chains: none\n";
        assert_eq!(first_route(elsewhere), None);
        let commented = "chains:\n  - name: c\n    # route: /old\n    route: /new # current\n";
        assert_eq!(first_route(commented).as_deref(), Some("/new"));
    }
}
