//! A load step against a running server (`spindle_bench::run_step`): open loop at `--rate`,
//! then at `--step-rate`, reported before the step, during the ramp right after it, and after
//! the ramp. bench/scale.sh's burst benchmark drives it.
//!
//!   cargo run --release -p spindle-bench --example step -- URL [--rate R] [--step-rate R]
//!       [--connections N] [--warmup D] [--before D] [--ramp D] [--after D] [--bucket D]
//!       [--payload TEXT] [--json FILE]
//!
//! Defaults: 200 req/s stepping to 2000, 64 connections, 2 s warm-up, 3 s before, 2 s ramp,
//! 6 s after, 250 ms timeline buckets, body "hello spindle". Prints the phases as a Markdown
//! table; `--json` writes the whole report (phases and timeline).

use std::process::ExitCode;

use spindle_bench::{StepOptions, parse_duration, run_step};

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut opts = StepOptions::default();
    let mut json = None;
    let mut url = None;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--rate" => opts.rate = value()?.parse()?,
            "--step-rate" => opts.step_rate = value()?.parse()?,
            "--connections" => opts.connections = value()?.parse()?,
            "--warmup" => opts.warmup = parse_duration(&value()?)?,
            "--before" => opts.before = parse_duration(&value()?)?,
            "--ramp" => opts.ramp = parse_duration(&value()?)?,
            "--after" => opts.after = parse_duration(&value()?)?,
            "--bucket" => opts.bucket = parse_duration(&value()?)?,
            "--payload" => opts.payload = value()?.into_bytes(),
            "--json" => json = Some(value()?),
            _ if url.is_none() && !arg.starts_with("--") => url = Some(arg),
            _ => return Err(format!("unexpected argument `{arg}`").into()),
        }
    }
    opts.url = url.ok_or("usage: step URL [--rate R] [--step-rate R] [--flag value]...")?;
    let report = run_step(&opts)?;
    if let Some(path) = json {
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
            .map_err(|e| format!("writing {path}: {e}"))?;
    }
    print!("{}", report.to_markdown());
    Ok(())
}
