//! Command-line arguments of the roles, hand-parsed: the `spindle` binary forwards everything
//! after `knative-baseline` verbatim, so this crate owns the syntax.
//!
//! Each role's argument type lives in its role module (the `--pods` syntax with the ingress,
//! which consumes it and whose command line the orchestrator writes); this module depends on
//! the roles, never the other way round.

use std::path::PathBuf;
use std::time::Duration;

use crate::BaselineError;
use crate::function::FunctionArgs;
use crate::ingress::{IngressArgs, PodsArg};
use crate::orchestrator::RunArgs;
use crate::queue_proxy::QueueProxyArgs;

pub const USAGE: &str = "\
Knative-style baseline: Spindle's Wasm functions behind a Knative-like data path
(ingress -> queue-proxy -> function server, chains as Eventing Sequences).

usage: spindle knative-baseline ROLE [OPTIONS]

  run --config PATH [--listen ADDR] [--container-concurrency N] [--start-timeout-ms MS]
        start every process (one function server + one queue-proxy per function instance
        per chain, then the ingress), serve until SIGINT/SIGTERM [listen: 127.0.0.1:8090]
  function --config PATH --chain NAME --function NAME --listen ADDR
        the user container: runs one function of one chain, one request at a time
  queue-proxy --listen ADDR --upstream ADDR [--container-concurrency N] [--timeout-ms MS]
        [--name FUNCTION]
        the queue-proxy sidecar; N > 0 caps concurrent upstream requests (0 = unlimited);
        MS > 0 answers 504 MS milliseconds after a request arrives (the revision timeout;
        `run` passes the chain's timeout_ms)
  ingress --config PATH --listen ADDR --pods FUNCTION@CHAIN=ADDR[,ADDR...] ...
        the gateway and Sequence dispatcher; one --pods per function of every chain, each
        ADDR a queue-proxy of that function, used round-robin

Every role except `run` prints `listening on ADDR` on stdout once it serves (ADDR may use
port 0 to pick a free port).";

/// What `main_entry` was asked to run.
#[derive(Debug)]
pub enum Role {
    Help,
    Function(FunctionArgs),
    QueueProxy(QueueProxyArgs),
    Ingress(IngressArgs),
    Run(RunArgs),
}

/// `--key value` / `--key=value` pairs of one role, checked against the keys it accepts.
struct Flags {
    role: &'static str,
    pairs: Vec<(String, String)>,
}

impl Flags {
    fn parse(
        role: &'static str,
        args: &[String],
        known: &[&str],
        repeatable: &[&str],
    ) -> Result<Flags, BaselineError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(usage(format!("{role}: unexpected argument `{arg}`")));
            };
            let (key, value) = match flag.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => {
                    let value = it
                        .next()
                        .ok_or_else(|| usage(format!("{role}: --{flag} needs a value")))?;
                    (flag.to_string(), value.clone())
                }
            };
            if !known.contains(&key.as_str()) {
                return Err(usage(format!("{role}: unknown option --{key}")));
            }
            if !repeatable.contains(&key.as_str()) && pairs.iter().any(|(k, _)| *k == key) {
                return Err(usage(format!("{role}: --{key} given twice")));
            }
            pairs.push((key, value));
        }
        Ok(Flags { role, pairs })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, key: &str) -> impl Iterator<Item = &str> {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, key: &str) -> Result<&str, BaselineError> {
        self.get(key)
            .ok_or_else(|| usage(format!("{}: --{key} is required", self.role)))
    }

    fn parsed<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, BaselineError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| usage(format!("{}: --{key} {v}: {e}", self.role)))
            })
            .transpose()
    }

    fn required_parsed<T: std::str::FromStr>(&self, key: &str) -> Result<T, BaselineError>
    where
        T::Err: std::fmt::Display,
    {
        self.required(key)?;
        Ok(self.parsed(key)?.expect("checked present above"))
    }
}

fn usage(message: String) -> BaselineError {
    BaselineError::Usage(message)
}

/// 0 means "no limit", as Knative's `timeoutSeconds` never is but containerConcurrency is.
fn millis(ms: Option<u64>) -> Option<Duration> {
    ms.filter(|&ms| ms > 0).map(Duration::from_millis)
}

pub fn parse(args: &[String]) -> Result<Role, BaselineError> {
    let args = match args.first() {
        Some(first) if first == crate::SUBCOMMAND => &args[1..],
        _ => args,
    };
    let Some((role, rest)) = args.split_first() else {
        return Err(usage("no role given".into()));
    };
    match role.as_str() {
        "help" | "--help" | "-h" => Ok(Role::Help),
        "function" => {
            let f = Flags::parse(
                "function",
                rest,
                &["config", "chain", "function", "listen"],
                &[],
            )?;
            Ok(Role::Function(FunctionArgs {
                config: PathBuf::from(f.required("config")?),
                chain: f.required("chain")?.to_string(),
                function: f.required("function")?.to_string(),
                listen: f.required_parsed("listen")?,
            }))
        }
        "queue-proxy" => {
            let f = Flags::parse(
                "queue-proxy",
                rest,
                &[
                    "listen",
                    "upstream",
                    "container-concurrency",
                    "timeout-ms",
                    "name",
                ],
                &[],
            )?;
            Ok(Role::QueueProxy(QueueProxyArgs {
                listen: f.required_parsed("listen")?,
                upstream: f.required_parsed("upstream")?,
                container_concurrency: f.parsed("container-concurrency")?.unwrap_or(0),
                timeout: millis(f.parsed("timeout-ms")?),
                name: f.get("name").map(str::to_string),
            }))
        }
        "ingress" => {
            let f = Flags::parse("ingress", rest, &["config", "listen", "pods"], &["pods"])?;
            let pods = f
                .all("pods")
                .map(PodsArg::parse)
                .collect::<Result<Vec<_>, _>>()
                .map_err(usage)?;
            Ok(Role::Ingress(IngressArgs {
                config: PathBuf::from(f.required("config")?),
                listen: f.required_parsed("listen")?,
                pods,
            }))
        }
        "run" => {
            let f = Flags::parse(
                "run",
                rest,
                &[
                    "config",
                    "listen",
                    "container-concurrency",
                    "start-timeout-ms",
                ],
                &[],
            )?;
            let mut options = crate::Options::default();
            if let Some(n) = f.parsed("container-concurrency")? {
                options.container_concurrency = n;
            }
            if let Some(ms) = millis(f.parsed("start-timeout-ms")?) {
                options.start_timeout = ms;
            }
            Ok(Role::Run(RunArgs {
                config: PathBuf::from(f.required("config")?),
                listen: f
                    .parsed("listen")?
                    .unwrap_or_else(|| crate::DEFAULT_LISTEN.parse().expect("valid default")),
                options,
            }))
        }
        other => Err(usage(format!("unknown role `{other}`"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_every_role_with_and_without_the_subcommand_prefix() {
        let role = parse(&strings(&[
            "knative-baseline",
            "queue-proxy",
            "--listen=127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--container-concurrency",
            "1",
            "--timeout-ms",
            "0",
        ]))
        .unwrap();
        let Role::QueueProxy(q) = role else {
            panic!("wrong role {role:?}")
        };
        assert_eq!(q.container_concurrency, 1);
        assert_eq!(q.timeout, None);
        assert_eq!(q.upstream.port(), 9);

        let role = parse(&strings(&[
            "ingress",
            "--config",
            "c.yaml",
            "--listen",
            "127.0.0.1:0",
            "--pods",
            "a@x=127.0.0.1:1",
            "--pods",
            "b@x=127.0.0.1:2",
        ]))
        .unwrap();
        let Role::Ingress(i) = role else {
            panic!("wrong role {role:?}")
        };
        assert_eq!(i.pods.len(), 2);

        let Role::Run(r) = parse(&strings(&["run", "--config", "c.yaml"])).unwrap() else {
            panic!("wrong role")
        };
        assert_eq!(r.listen.to_string(), crate::DEFAULT_LISTEN);
        assert_eq!(r.options.container_concurrency, 0);
    }

    #[test]
    fn reports_mistakes() {
        let err = |a: &[&str]| parse(&strings(a)).unwrap_err().to_string();
        assert!(err(&[]).contains("no role"));
        assert!(err(&["dance"]).contains("unknown role `dance`"));
        assert!(err(&["function", "--config", "c"]).contains("--chain is required"));
        assert!(err(&["queue-proxy", "--listen"]).contains("needs a value"));
        assert!(err(&["queue-proxy", "--lisen", "x"]).contains("unknown option --lisen"));
        assert!(err(&["run", "--config", "a", "--config", "b"]).contains("--config given twice"));
        assert!(err(&["run", "--config", "a", "--listen", "nowhere"]).contains("--listen nowhere"));
    }
}
