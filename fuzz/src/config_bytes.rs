//! The YAML config loader on any text: `Config::parse` must return a config or errors that
//! each point at `file:line:col` inside the text, never panic or hang; a config it accepts
//! must plan (`Plan::new`) without panicking and into consistent ids, and parse the same
//! way twice. Random bytes come here directly (lossily made UTF-8, as any text file would
//! be read); `config_yaml.rs` builds structured documents and checks them here too.
//!
//! `crate::config` and `crate::plan` are chain-runtime's modules: in the fuzz target they are
//! compiled from its sources by `#[path]` (no wasmer needed), in chain-runtime's replay test
//! they are `chain_runtime::config` and `chain_runtime::plan`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::config::{Config, ConfigErrors};
use crate::plan::Plan;

/// Module files that exist, so that documents naming them can be valid.
pub const MODULES: &[&str] = &["a.wasm", "b.wasm", "c.wasm"];

/// The config's path: a directory holding [`MODULES`] (empty files: the loader does not read
/// them).
pub fn source() -> &'static Path {
    static SOURCE: OnceLock<PathBuf> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spindle-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz config directory");
        for m in MODULES {
            std::fs::write(dir.join(m), b"").expect("writing a module file");
        }
        dir.join("spindle.yaml")
    })
}

pub fn run(data: &[u8]) {
    check(&String::from_utf8_lossy(data));
}

/// Lines as YAML counts them: `\n`, `\r\n` and a lone `\r` each end one.
fn yaml_lines(text: &str) -> usize {
    let b = text.as_bytes();
    let breaks = (0..b.len())
        .filter(|&i| b[i] == b'\n' || (b[i] == b'\r' && b.get(i + 1) != Some(&b'\n')))
        .count();
    breaks + 1
}

/// Parses `text` and checks the result; returns whether it was accepted.
pub fn check(text: &str) -> bool {
    let source = source();
    match Config::parse(text, source) {
        Ok(config) => {
            assert!(!config.functions.is_empty() && !config.chains.is_empty());
            for f in &config.functions {
                // An accepted function's argv and preopens are what a worker can hand over.
                assert!(f.args.len() <= crate::config::MAX_ARGS);
                assert!(f.args.iter().all(|a| !a.contains('\0')));
                assert!(f.files.len() <= crate::config::MAX_FILES);
                for d in &f.files {
                    assert!(
                        d.guest.starts_with('/') && !d.guest.contains("/../"),
                        "{d:?}"
                    );
                    assert!(d.guest == "/" || !d.guest.ends_with('/'), "{d:?}");
                    assert!(d.host.is_dir(), "{d:?}");
                }
            }
            let plan = Plan::new(&config);
            assert_eq!(plan.chains.len(), config.chains.len());
            let mut ids = std::collections::HashSet::new();
            for (i, chain) in plan.chains.iter().enumerate() {
                assert!(chain.spec.route.starts_with('/'), "{:?}", chain.spec.route);
                assert!(!chain.stages.is_empty());
                assert_eq!(usize::from(chain.id), i);
                assert_eq!(
                    plan.chain(chain.id).map(|c| &c.spec.name),
                    Some(&chain.spec.name)
                );
                assert_ne!(chain.first_fn(), proto::GATEWAY_FN);
                for stage in &chain.stages {
                    assert!(ids.insert(stage.fn_id), "fn id {} given twice", stage.fn_id);
                    assert_eq!(chain.stage(stage.fn_id).map(|s| s.fn_id), Some(stage.fn_id));
                    assert!(config.function(&stage.function.name).is_some());
                }
                if chain.is_dynamic() {
                    assert_eq!(chain.routes().map(|r| r.len()), Some(chain.stages.len()));
                } else {
                    // The static route visits every stage once, then ends at the gateway.
                    let (mut at, mut visited) = (chain.first_fn(), 1);
                    while let Some(next) = chain.static_next(at).filter(|&n| n != proto::GATEWAY_FN)
                    {
                        at = next;
                        visited += 1;
                        assert!(visited <= chain.stages.len(), "the static route loops");
                    }
                    assert_eq!(visited, chain.stages.len());
                    assert_eq!(usize::from(chain.max_hops()), chain.stages.len().min(255));
                }
            }
            assert_eq!(
                Config::parse(text, source).as_ref().ok(),
                Some(&config),
                "parsed differently twice"
            );
            true
        }
        Err(ConfigErrors(errors)) => {
            assert!(!errors.is_empty(), "an error without a message");
            let lines = yaml_lines(text);
            for e in &errors {
                assert_eq!(e.file, source);
                assert!(e.line >= 1 && e.col >= 1, "{e}");
                assert!(
                    e.line <= lines + 1,
                    "{e}: line past the text's {lines} lines"
                );
                let shown = e.to_string();
                let prefix = format!("{}:{}:{}: ", source.display(), e.line, e.col);
                assert!(
                    shown.starts_with(&prefix) && shown.len() > prefix.len(),
                    "{shown}"
                );
            }
            assert!(
                errors
                    .windows(2)
                    .all(|w| (w[0].line, w[0].col) <= (w[1].line, w[1].col))
            );
            false
        }
    }
}
