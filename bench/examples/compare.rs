//! `spindle bench` without the `spindle` CLI around it, for trying the load generator against
//! any `spindle` binary:
//!
//!   cargo run --release -p spindle-bench --example compare -- SPINDLE_EXE [TARGETS] [DURATION]
//!       [--rate R] [--connections N] [--config FILE] [--json FILE] [--markdown FILE] [--plot FILE]

use std::path::PathBuf;
use std::process::ExitCode;

use spindle_bench::{BenchOptions, parse_duration, parse_targets, run};

fn main() -> ExitCode {
    match try_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let exe = PathBuf::from(
        args.next()
            .ok_or("usage: compare SPINDLE_EXE [TARGETS] [DURATION] [--flag value]...")?,
    );
    let mut opts = BenchOptions::default();
    let mut positional = 0;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--rate" => opts.rate = Some(value()?.parse()?),
            "--connections" => opts.connections = value()?.parse()?,
            "--warmup" => opts.warmup = parse_duration(&value()?)?,
            "--config" => opts.config = value()?.into(),
            "--path" => opts.path = Some(value()?),
            "--json" => opts.json = Some(value()?.into()),
            "--markdown" => opts.markdown = Some(value()?.into()),
            "--plot" => opts.plot = Some(value()?.into()),
            _ if positional == 0 => {
                opts.targets = parse_targets(&arg)?;
                positional += 1;
            }
            _ if positional == 1 => {
                opts.duration = parse_duration(&arg)?;
                positional += 1;
            }
            _ => return Err(format!("unexpected argument `{arg}`").into()),
        }
    }
    run(&opts, &exe)?;
    Ok(ExitCode::SUCCESS)
}
