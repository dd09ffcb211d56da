//! Config reload without dropped requests (SIGHUP, or `spindle reload` through the admin
//! socket): the config file is read and checked again, and every function whose module bytes
//! or per-call settings changed rolls to a new generation — a new sealed copy of the module,
//! a new zygote that compiles it once, and new instances forked from that zygote — while the
//! old instances drain (see [`crate::scaler::Pool`]'s roll). Requests are served by old or new
//! instances throughout, or wait the millisecond a fork takes; none fails. When the last old
//! instance has gone, the old zygote stops, which frees the old image and compiled module.
//!
//! What a reload can change: a function's module (its file's bytes), `memory`, `timeout_ms`,
//! `fuel`, `env`, `mode`, `start`, `isolation` and `idle_spin_us`. What needs a restart: `listen`,
//! `dataplane`, `http`, `ingress`, `node`, `peers` and `sandbox`, the set of functions and chains, chain settings (routes,
//! steps, arenas, deadlines), `instances` and `wait_queue` (they size the instance slots and
//! queues the gateway allocated at start). A reload that asks for those is refused as a whole and
//! changes nothing; a file with errors is refused with every error at file:line:col.

use std::path::PathBuf;
use std::sync::Arc;

use chain_runtime::config::{Config, FunctionSpec, StartMode};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dataplane::ChainRuntime;
use crate::metrics::Metrics;
use crate::scaler::{Generation, Roll};
use crate::supervisor::{FunctionInputs, WorkerCommand};

/// Why a reload changed nothing, or not everything.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file has errors (one per line, file:line:col: message).
    #[error("the new config has errors; nothing changed:\n{0}")]
    Invalid(String),
    #[error("a reload cannot change this (restart the gateway for it); nothing changed:\n{}", .0.join("\n"))]
    NeedsRestart(Vec<String>),
    #[error("cannot pin the new {what}: {source}")]
    Pin {
        what: String,
        source: std::io::Error,
    },
    /// Some functions rolled, these did not (they keep their old module and settings).
    #[error("{}", .0.join("\n"))]
    RollFailed(Vec<String>),
}

/// One reload request from the admin API; SIGHUP sends none (it only logs).
pub struct ReloadRequest {
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// One function of one chain as it runs now.
pub struct Running {
    pub chain: Arc<ChainRuntime>,
    pub stage: usize,
    pub rolls: mpsc::Sender<Roll>,
    pub spec: FunctionSpec,
    pub module_digest: [u8; 32],
    pub generation: u64,
}

/// Everything a reload needs; owned by the one task that performs reloads, so two never
/// overlap.
pub struct Reloader {
    pub config_path: PathBuf,
    pub config: Config,
    pub cmd: WorkerCommand,
    pub metrics: Arc<Metrics>,
    pub shutdown: watch::Receiver<bool>,
    pub zygote_reply_timeout: std::time::Duration,
    pub functions: Vec<Running>,
}

pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The settings a reload may change; everything else must be equal.
fn rollable(spec: &FunctionSpec) -> impl PartialEq + '_ {
    (
        spec.memory_limit,
        spec.timeout,
        spec.fuel,
        spec.mode,
        &spec.env,
        spec.start,
        spec.isolation,
        spec.idle_spin,
        &spec.args,
        &spec.files,
    )
}

/// What in `new` differs from `old` that only a restart can apply.
fn needs_restart(old: &Config, new: &Config) -> Vec<String> {
    let mut why = Vec::new();
    if old.listen != new.listen {
        why.push("`listen` changed".to_string());
    }
    if old.dataplane != new.dataplane {
        why.push("`dataplane` changed".to_string());
    }
    // The budget, the peer-control listener and the peer links are set up once (peers).
    if old.node != new.node {
        why.push("`node` changed".to_string());
    }
    if old.peers != new.peers || old.dns_peers != new.dns_peers {
        why.push("`peers` changed".to_string());
    }
    // The sandbox namespaces are made (or not) once, at start, and the uids of running
    // instances would no longer match the config.
    if old.sandbox != new.sandbox {
        why.push("`sandbox` changed".to_string());
    }
    // The front's listeners, shards and connection limits are set up once, at start.
    if old.http != new.http {
        why.push("`http` changed".to_string());
    }
    // The ingress programs are loaded and attached once, at start.
    if old.ingress != new.ingress {
        why.push("`ingress` changed".to_string());
    }
    let names = |c: &Config| {
        c.functions
            .iter()
            .map(|f| f.name.clone())
            .collect::<Vec<_>>()
    };
    if names(old) != names(new) {
        why.push(format!(
            "the functions changed (was {:?}, now {:?})",
            names(old),
            names(new)
        ));
    }
    for f in &old.functions {
        if let Some(n) = new.function(&f.name) {
            if n.instances != f.instances {
                why.push(format!("function {}: `instances` changed", f.name));
            }
            if n.wait_queue != f.wait_queue {
                why.push(format!("function {}: `wait_queue` changed", f.name));
            }
        }
    }
    if old.chains != new.chains {
        let changed: Vec<&str> = new
            .chains
            .iter()
            .filter(|c| !old.chains.contains(c))
            .map(|c| c.name.as_str())
            .collect();
        why.push(format!(
            "chains changed (added or edited: {})",
            if changed.is_empty() {
                "none; some were removed".to_string()
            } else {
                changed.join(", ")
            }
        ));
    }
    why
}

impl Reloader {
    /// Runs reloads as they are asked for (SIGHUP through `signals`, the admin API through
    /// `requests`) until shutdown.
    pub async fn serve(
        mut self,
        mut requests: mpsc::Receiver<ReloadRequest>,
        mut signals: mpsc::Receiver<()>,
    ) {
        let mut shutdown = self.shutdown.clone();
        loop {
            let reply = tokio::select! {
                Some(req) = requests.recv() => Some(req.reply),
                Some(()) = signals.recv() => None,
                _ = crate::supervisor::stopping(&mut shutdown) => return,
                else => return,
            };
            let outcome = self.reload().await;
            let label = match &outcome {
                Ok(_) => "ok",
                Err(ReloadError::RollFailed(_)) => "failed",
                Err(_) => "refused",
            };
            self.metrics.reloads.with_label_values(&[label]).inc();
            match &outcome {
                Ok(summary) => tracing::info!("reload: {summary}"),
                Err(e) => tracing::error!("reload: {e}"),
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome.map_err(|e| e.to_string()));
            }
        }
    }

    /// Reads the config file again and rolls every function that changed.
    pub async fn reload(&mut self) -> Result<String, ReloadError> {
        let path = &self.config_path;
        let text = std::fs::read_to_string(path).map_err(|source| ReloadError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Config::parse(&text, path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let mut why = needs_restart(&self.config, &config);
        for f in &self.functions {
            if self.cmd.images.contains_key(&f.spec.name)
                && config.function(&f.spec.name) != Some(&f.spec)
            {
                why.push(format!(
                    "function {} resumes from a remote image (--resume): its module is the \
                     image's, so it cannot roll to another",
                    f.spec.name
                ));
            }
        }
        if !why.is_empty() {
            return Err(ReloadError::NeedsRestart(why));
        }
        // Read every module before starting anything, so an unreadable one changes nothing.
        let mut changes = Vec::new();
        for (i, f) in self.functions.iter().enumerate() {
            if self.cmd.images.contains_key(&f.spec.name) {
                // Runs its image, whatever the module file holds now (checked above).
                continue;
            }
            let spec = config
                .function(&f.spec.name)
                .expect("same functions, checked above")
                .clone();
            let bytes = std::fs::read(&spec.module).map_err(|source| ReloadError::Read {
                path: spec.module.clone(),
                source,
            })?;
            let module_digest = digest(&bytes);
            if module_digest != f.module_digest || rollable(&spec) != rollable(&f.spec) {
                changes.push((i, spec, bytes, module_digest));
            }
        }
        if changes.is_empty() {
            self.config = config;
            return Ok("nothing changed".to_string());
        }
        let config_text = chain_runtime::instance::sealed_memfd("spindle-config", text.as_bytes())
            .map_err(|source| ReloadError::Pin {
                what: "config".into(),
                source,
            })?;
        let cmd = WorkerCommand {
            config_text: Arc::new(config_text),
            ..self.cmd.clone()
        };
        let mut rolled = Vec::new();
        let mut failed = Vec::new();
        for (i, spec, bytes, module_digest) in changes {
            let f = &mut self.functions[i];
            let who = format!("{}/{}", f.chain.plan.spec.name, spec.name);
            let inputs = match FunctionInputs::pin(&spec, &bytes) {
                Ok(inputs) => inputs,
                Err(e) => {
                    failed.push(format!("{who}: {e}"));
                    continue;
                }
            };
            let forks = spec.start == StartMode::Fork && !cmd.images.contains_key(&spec.name);
            let generation = Generation::start(
                f.generation + 1,
                cmd.clone(),
                &f.chain,
                &self.metrics,
                Arc::new(inputs),
                f.stage,
                forks.then_some(self.zygote_reply_timeout),
                &self.shutdown,
            );
            let (done, result) = oneshot::channel();
            if f.rolls.send(Roll { generation, done }).await.is_err() {
                failed.push(format!("{who}: its pool has stopped (shutting down)"));
                continue;
            }
            match result.await {
                Ok(Ok(moved)) => {
                    f.generation += 1;
                    f.chain.stages[f.stage].timeout_ms.store(
                        spec.timeout.as_millis() as u64,
                        std::sync::atomic::Ordering::Relaxed,
                    );
                    f.spec = spec;
                    f.module_digest = module_digest;
                    self.metrics
                        .function_generation
                        .with_label_values(&[f.chain.plan.spec.name.as_str(), f.spec.name.as_str()])
                        .set(f.generation as i64);
                    rolled.push(format!(
                        "{who}: {moved} instance(s) on generation {}",
                        f.generation
                    ));
                }
                Ok(Err(why)) => failed.push(format!("{who}: {why}")),
                Err(_) => failed.push(format!("{who}: its pool stopped during the roll")),
            }
        }
        if failed.is_empty() {
            self.config = config;
            self.cmd = cmd;
            Ok(format!("rolled {}", rolled.join("; ")))
        } else {
            // The rolled functions run the new file; the others keep what they had, so the
            // recorded config stays the old one and the next reload tries them again.
            let mut lines = rolled
                .iter()
                .map(|r| format!("rolled {r}"))
                .collect::<Vec<_>>();
            lines.extend(failed.iter().map(|f| format!("not rolled: {f}")));
            Err(ReloadError::RollFailed(lines))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("reload-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for m in ["a.wasm", "b.wasm"] {
            std::fs::write(dir.join(m), b"").unwrap();
        }
        Config::parse(yaml, &dir.join("spindle.yaml")).unwrap()
    }

    const BASE: &str = "functions:\n  - { name: f, module: a.wasm }\n\
                        chains:\n  - { name: c, route: /c, steps: [f] }\n";

    #[test]
    fn module_and_call_settings_roll_while_slots_and_routes_need_a_restart() {
        let old = config(BASE);
        let module = config(&BASE.replace("a.wasm", "b.wasm"));
        assert!(
            needs_restart(&old, &module).is_empty(),
            "a new module path rolls"
        );
        let timeout = config(&BASE.replace("a.wasm }", "a.wasm, timeout_ms: 50 }"));
        assert!(needs_restart(&old, &timeout).is_empty());
        assert!(rollable(&old.functions[0]) != rollable(&timeout.functions[0]));

        let instances = config(&BASE.replace("a.wasm }", "a.wasm, instances: 2 }"));
        assert_eq!(
            needs_restart(&old, &instances),
            vec!["function f: `instances` changed".to_string()]
        );
        let peers = config(&format!(
            "{BASE}node: {{ cluster_key: k }}\npeers:\n  - {{ name: b, http: 10.0.0.2:80, control: 10.0.0.2:70 }}\n"
        ));
        assert_eq!(
            needs_restart(&old, &peers),
            vec!["`node` changed".to_string(), "`peers` changed".to_string()]
        );
        let http = config(&format!("{BASE}http: {{ shards: 2 }}\n"));
        assert_eq!(
            needs_restart(&old, &http),
            vec!["`http` changed".to_string()]
        );
        let ingress = config(&format!(
            "{BASE}ingress: {{ guard: {{ interface: lo }} }}\n"
        ));
        assert_eq!(
            needs_restart(&old, &ingress),
            vec!["`ingress` changed".to_string()]
        );
        let sandbox = config(&format!("{BASE}sandbox: {{ uid_base: 300000 }}\n"));
        assert_eq!(
            needs_restart(&old, &sandbox),
            vec!["`sandbox` changed".to_string()]
        );
        let route = config(&BASE.replace("/c", "/d"));
        assert_eq!(
            needs_restart(&old, &route),
            vec!["chains changed (added or edited: c)".to_string()]
        );
    }
}
