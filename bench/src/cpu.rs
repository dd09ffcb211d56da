//! CPU time of a process tree, from `/proc`.
//!
//! Spindle's cost is spread over a gateway and one process per function instance, so the
//! target's CPU is that of its whole tree. Descendants are found by walking every process's
//! `ppid` at each snapshot, which catches workers started (or restarted) mid-run.

use std::collections::{HashMap, HashSet};

use nix::unistd::{SysconfVar, sysconf};

use crate::report::ProcessCpu;

/// One line of `/proc/PID/stat`, reduced to what accounting needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub comm: String,
    /// Distinguishes a reused pid from the process that had it before.
    pub starttime: u64,
    /// Clock ticks: utime + stime + cutime + cstime. The reaped-children part matters: when a
    /// worker in the tree exits and its parent reaps it, its time moves from its own line (now
    /// gone) into the parent's cutime/cstime, so the tree's total stays continuous.
    pub ticks: u64,
    /// Arguments, space-separated: comm is cut at 15 bytes and is the same for the gateway
    /// and every worker. Read only for tree members.
    pub cmdline: Option<String>,
}

pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    // comm may contain spaces and parentheses; it ends at the last ')'.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let comm = text.get(open + 1..close)?.to_string();
    // Fields from 3 (state) on; field N of proc(5) is at index N - 3.
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let num = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    let signed = |n: usize| -> Option<i64> { fields.get(n - 3)?.parse().ok() };
    let ticks = [14, 15, 16, 17]
        .iter()
        .map(|&n| signed(n).map(|v| v.max(0) as u64))
        .sum::<Option<u64>>()?;
    Some(ProcStat {
        pid,
        ppid: signed(4)? as i32,
        comm,
        starttime: num(22)?,
        ticks,
        cmdline: None,
    })
}

fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process visible in /proc. Processes that exit while we read are skipped.
fn all_processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let name = entry.ok()?.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        read_stat(pid)
    })
    .collect()
}

/// A process identity that survives pid reuse.
pub(crate) type ProcKey = (i32, u64);

/// The processes of one tree at one instant.
#[derive(Debug, Clone, Default)]
pub(crate) struct TreeSnapshot {
    pub procs: HashMap<ProcKey, ProcStat>,
}

impl TreeSnapshot {
    pub fn total_ticks(&self) -> u64 {
        self.procs.values().map(|p| p.ticks).sum()
    }
}

/// `root` and all its descendants now; empty if `root` is gone.
pub(crate) fn tree(root: i32) -> TreeSnapshot {
    let all = all_processes();
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    let mut root_stat = None;
    for p in &all {
        children.entry(p.ppid).or_default().push(p);
        if p.pid == root {
            root_stat = Some(p);
        }
    }
    let mut snapshot = TreeSnapshot::default();
    let Some(root_stat) = root_stat else {
        return snapshot;
    };
    let mut seen = HashSet::new();
    let mut stack = vec![root_stat];
    while let Some(p) = stack.pop() {
        // A pid can only appear once in one read of /proc, but guard against cycles from
        // reading ppids across a fork/exit race.
        if !seen.insert(p.pid) {
            continue;
        }
        stack.extend(children.get(&p.pid).into_iter().flatten());
        let mut member = p.clone();
        member.cmdline = read_cmdline(p.pid);
        snapshot.procs.insert((p.pid, p.starttime), member);
    }
    snapshot
}

fn read_cmdline(pid: i32) -> Option<String> {
    const MAX: usize = 300;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let mut line = args.join(" ");
    if line.is_empty() {
        return None; // a zombie, or a kernel thread
    }
    if line.len() > MAX {
        let cut = (0..=MAX)
            .rev()
            .find(|&i| line.is_char_boundary(i))
            .unwrap_or(0);
        line.truncate(cut);
        line.push('…');
    }
    Some(line)
}

pub(crate) fn clock_ticks_per_second() -> f64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(tck)) if tck > 0 => tck as f64,
        _ => 100.0,
    }
}

/// CPU seconds this process has used so far (all threads, including the load generator's).
pub(crate) fn self_cpu_seconds() -> Option<f64> {
    let stat = parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(stat.ticks as f64 / clock_ticks_per_second())
}

/// CPU used by a tree between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TreeCpu {
    pub seconds: f64,
    pub processes: Vec<ProcessCpu>,
}

pub(crate) fn diff(before: &TreeSnapshot, after: &TreeSnapshot) -> TreeCpu {
    let tck = clock_ticks_per_second();
    // Sum(after) - Sum(before): a process that exited and was reaped inside the tree left its
    // whole lifetime in its parent's cutime and its pre-window part in `before`, so the
    // difference is exactly its in-window time. (One reaped from outside the tree, e.g. by
    // init after its parent died, is undercounted; clamp so that cannot go negative.)
    let total = after.total_ticks() as i64 - before.total_ticks() as i64;
    let mut processes: Vec<ProcessCpu> = after
        .procs
        .iter()
        .map(|(key, p)| {
            let was = before.procs.get(key).map_or(0, |b| b.ticks);
            ProcessCpu {
                pid: p.pid,
                command: p.comm.clone(),
                cmdline: p.cmdline.clone(),
                cpu_s: Some(p.ticks.saturating_sub(was) as f64 / tck),
                exited: false,
            }
        })
        .chain(
            before
                .procs
                .iter()
                .filter(|(key, _)| !after.procs.contains_key(key))
                .map(|(_, p)| ProcessCpu {
                    pid: p.pid,
                    command: p.comm.clone(),
                    cmdline: p.cmdline.clone(),
                    // Its window share is in its parent's reaped-children time, not knowable alone.
                    cpu_s: None,
                    exited: true,
                }),
        )
        .collect();
    processes.sort_by(|a, b| {
        b.cpu_s
            .unwrap_or(-1.0)
            .total_cmp(&a.cpu_s.unwrap_or(-1.0))
            .then(a.pid.cmp(&b.pid))
    });
    TreeCpu {
        seconds: total.max(0) as f64 / tck,
        processes,
    }
}

/// Whether `key` still names a live (not zombie) process.
pub(crate) fn is_alive(key: ProcKey) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{}/stat", key.0)) else {
        return false;
    };
    let state = text
        .rfind(')')
        .and_then(|close| text[close + 1..].split_whitespace().next());
    parse_stat(&text).is_some_and(|p| p.starttime == key.1) && state != Some("Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    #[test]
    fn parses_stat_lines_with_awkward_command_names() {
        let line = "4242 (my (odd) proc) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 7 3 20 0 4 0 987654 1000000 200 18446744073709551615";
        let p = parse_stat(line).unwrap();
        assert_eq!(p.pid, 4242);
        assert_eq!(p.ppid, 17);
        assert_eq!(p.comm, "my (odd) proc");
        assert_eq!(p.ticks, 250 + 50 + 7 + 3);
        assert_eq!(p.starttime, 987654);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_its_own_tree_root() {
        let me = std::process::id() as i32;
        let snapshot = tree(me);
        let mine = snapshot.procs.values().find(|p| p.pid == me).unwrap();
        let exe = std::env::current_exe().unwrap();
        assert!(
            mine.cmdline
                .as_deref()
                .unwrap()
                .starts_with(exe.to_str().unwrap()),
            "{mine:?}"
        );
        assert!(tree(i32::MAX).procs.is_empty());
        assert!(self_cpu_seconds().is_some());
    }

    /// A shell whose child burns CPU for ~400 ms and is then killed and reaped by the shell,
    /// plus a second child still burning at the second snapshot: both kinds must be counted,
    /// while the shell itself uses next to nothing.
    #[test]
    fn attributes_cpu_of_descendants_including_reaped_ones() {
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(
                "while :; do :; done & a=$!; sleep 0.4; kill $a; wait $a; \
                 while :; do :; done & b=$!; sleep 0.4; echo ready; sleep 30",
            )
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let root = shell.id() as i32;
        let before = tree(root);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut line = String::new();
        let mut out = std::io::BufReader::new(shell.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        assert!(Instant::now() < deadline);
        let after = tree(root);
        let cpu = diff(&before, &after);
        // Kill the still-burning loop and the shell before asserting, so a failure leaks nothing.
        let live: Vec<_> = after.procs.keys().copied().collect();
        for (pid, _) in &live {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        let _ = shell.wait();
        assert!(
            cpu.seconds > 0.1,
            "expected > 0.1 s of CPU in the shell's tree, got {cpu:?}"
        );
        // The live burner shows up by itself; the killed one only through the shell's cutime.
        let burning: f64 = cpu
            .processes
            .iter()
            .filter(|p| p.pid != root)
            .filter_map(|p| p.cpu_s)
            .sum();
        assert!(burning > 0.02, "{cpu:?}");
        let shell_share = cpu.processes.iter().find(|p| p.pid == root).unwrap();
        assert!(
            shell_share.cpu_s.unwrap() > 0.02,
            "reaped child's time: {cpu:?}"
        );
    }
}
