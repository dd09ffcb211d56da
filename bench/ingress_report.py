#!/usr/bin/env python3
"""The report of bench/ingress.sh: reads the cells it left in WORK and writes OUT.json and
OUT.md. Every figure is computed here from the raw files of each cell (spindle bench's JSON,
spindle-flood's JSON, and before/after snapshots of /proc/stat, the namespaces' SNMP
counters, their links' statistics and the gateway's /metrics); nothing is estimated.

    python3 bench/ingress_report.py WORK OUT [--rounds N ...]   (bench/ingress.sh runs it)
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- parsing the raw files --------------------------------------------------------------------

def read_meta(path):
    meta = {}
    for line in path.read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            meta[k] = v
    return meta


def read_stat(path):
    """Busy, softirq and steal CPU-seconds (all CPUs) from /proc/stat's `cpu` line; busy is
    user + nice + system + irq + softirq, as spindle bench counts it."""
    fields = path.read_text().splitlines()[0].split()
    assert fields[0] == "cpu", f"{path}: not /proc/stat"
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
    return {
        "busy_s": (user + nice + system + irq + softirq) / CLK_TCK,
        "softirq_s": softirq / CLK_TCK,
        "steal_s": steal / CLK_TCK,
    }


def read_softnet(path):
    """/proc/net/softnet_stat summed over CPUs: packets processed, dropped (a full backlog)
    and time squeezes (softirq out of budget with work left)."""
    total = [0, 0, 0]
    for line in path.read_text().split("\n"):
        cols = line.split()
        if len(cols) >= 3:
            for i in range(3):
                total[i] += int(cols[i], 16)
    return dict(zip(("processed", "dropped", "time_squeeze"), total))


def read_snmp(path):
    """/proc/net/snmp and /proc/net/netstat: {"Ip": {"ForwDatagrams": n, ...}, "TcpExt": ...}."""
    out = {}
    lines = path.read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        n, v = names.split(), values.split()
        if not n or n[0] != v[0]:
            raise ValueError(f"{path}: header and values out of step at {n[:1]}")
        out[n[0].rstrip(":")] = {k: int(x) for k, x in zip(n[1:], v[1:])}
    return out


def read_links(path):
    """`ip -s -j link show`: {ifname: stats64}."""
    return {l["ifname"]: l.get("stats64", {}) for l in json.loads(path.read_text() or "[]")}


def read_metrics(path):
    """Prometheus text: [(name, {label: value}, value)]."""
    samples = []
    if not path.exists():
        return samples
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, labels = head, {}
        if "{" in head:
            name, rest = head.split("{", 1)
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, v = part.split("=", 1)
                    labels[k] = v.strip('"')
        try:
            samples.append((name, labels, float(value)))
        except ValueError:
            pass
    return samples


def metric_sum(samples, name, **want):
    found = [v for n, l, v in samples if n == name and all(l.get(k) == x for k, x in want.items())]
    return sum(found) if found else None


def by_label(samples, name, label, **want):
    out = {}
    for n, l, v in samples:
        if n == name and all(l.get(k) == x for k, x in want.items()):
            out[l.get(label)] = out.get(l.get(label), 0.0) + v
    return out


def delta(before, after):
    if before is None or after is None:
        return None
    return after - before


def link_delta(b, a, dev, direction, field):
    try:
        return a[dev][direction][field] - b[dev][direction][field]
    except KeyError:
        return None


# --- one cell ---------------------------------------------------------------------------------

def bench_figures(path):
    """The one target of a `spindle bench --rounds 1` report."""
    if not path.exists():
        return {"bench_error": "no bench.json"}
    report = json.loads(path.read_text())
    t = report["targets"][0]
    if t.get("skipped"):
        return {"bench_error": f"skipped: {t['skipped']}"}
    us = lambda x: None if x is None else x * 1e6
    system, loadgen = t.get("system_cpu_s_per_req"), t.get("loadgen_cpu_s_per_req")
    return {
        "rps": t["rps"],
        "intended_rps": t.get("intended_rps"),
        "p50_us": t["p50_us"],
        "p90_us": t["p90_us"],
        "p99_us": t["p99_us"],
        "p999_us": t["p999_us"],
        "errors": t["errors"],
        "error_kinds": t.get("error_kinds"),
        "requests": t["requests"],
        "wrong_bodies": (t.get("verification") or {}).get("wrong_body"),
        "verified_bodies": (t.get("verification") or {}).get("verified"),
        # Whole machine per request: everything but the load generator (idle baseline taken
        # out), the load generator's own process CPU, and the two together.
        "system_cpu_us_per_req": us(system),
        "loadgen_cpu_us_per_req": us(loadgen),
        "total_cpu_us_per_req": None if system is None or loadgen is None else us(system + loadgen),
        "softirq_us_per_req": us(t.get("softirq_s_per_req")),
        "softirq_share": t.get("softirq_share"),
        "sched_lateness_p99_us": t.get("sched_lateness_p99_us"),
        "idle_baseline_cpu_per_s": max((b["busy_cpu_per_s"] for b in report.get("idle_baselines") or []),
                                       default=None),
    }


def cell_record(d):
    meta = read_meta(d / "meta")
    rec = {
        "round": int(meta["round"]),
        "part": meta["part"],
        "variant": meta["variant"],
        "load": meta.get("load") or None,
        "flood": meta.get("flood") or None,
        "status": meta.get("status", "failed"),
        "reason": meta.get("reason"),
        # The cell's config up to configs/hello.yaml's chain (which follows unchanged).
        "config_head": (d / "config.yaml").read_text().split("functions:")[0].strip()
        if (d / "config.yaml").exists() else None,
        "gateway_log_tail": (d / "gateway.log").read_text(errors="replace").splitlines()[-3:]
        if (d / "gateway.log").exists() else [],
    }
    if rec["status"] != "ok":
        return rec
    t0 = float((d / "time.before").read_text())
    t1 = float((d / "time.after").read_text())
    s0, s1 = read_stat(d / "stat.before"), read_stat(d / "stat.after")
    rec["interval_s"] = t1 - t0
    rec["cpu"] = {k: s1[k] - s0[k] for k in s0}
    n0, n1 = read_snmp(d / "node_snmp.before"), read_snmp(d / "node_snmp.after")
    g0, g1 = read_snmp(d / "gw_snmp.before"), read_snmp(d / "gw_snmp.after")
    m0, m1 = read_metrics(d / "metrics.before"), read_metrics(d / "metrics.after")
    gl0, gl1 = read_links(d / "gw_links.before"), read_links(d / "gw_links.after")
    cl0, cl1 = read_links(d / "cli_links.before"), read_links(d / "cli_links.after")
    rec.update(bench_figures(d / "bench.json"))
    rec["node_forwarded"] = n1["Ip"]["ForwDatagrams"] - n0["Ip"]["ForwDatagrams"]
    fp0 = by_label(m0, "spindle_ingress_fast_path_packets_total", "outcome")
    fp1 = by_label(m1, "spindle_ingress_fast_path_packets_total", "outcome")
    rec["fast_path"] = {k: fp1[k] - fp0.get(k, 0) for k in fp1} or None
    st0 = by_label(m0, "spindle_ingress_steered_connections_total", "shard")
    st1 = by_label(m1, "spindle_ingress_steered_connections_total", "shard")
    rec["steered"] = {k: st1[k] - st0.get(k, 0) for k in st1} or None
    if rec["part"] == "guard":
        guard = {}
        for (n, l, v) in m1:
            if n == "spindle_ingress_guard_packets_total":
                key = f"{l.get('verdict')}:{l.get('reason')}"
                before = metric_sum(m0, n, verdict=l.get("verdict"), reason=l.get("reason")) or 0
                guard[key] = guard.get(key, 0) + v - before
        rec["guard"] = guard or None
        rec["guard_dropped"] = sum(v for k, v in guard.items() if k.startswith("drop:")) if guard else None
        g = lambda table, field: g1.get(table, {}).get(field, 0) - g0.get(table, {}).get(field, 0)
        rec["stack"] = {
            "udp_no_ports": g("Udp", "NoPorts"),
            "udp_in_errors": g("Udp", "InErrors"),
            "udp_in_csum_errors": g("Udp", "InCsumErrors"),
            "tcp_in_segs": g("Tcp", "InSegs"),
            "tcp_in_csum_errors": g("Tcp", "InCsumErrors"),
            "syncookies_sent": g("TcpExt", "SyncookiesSent"),
            "listen_drops": g("TcpExt", "ListenDrops"),
            "listen_overflows": g("TcpExt", "ListenOverflows"),
            "icmp_out_dest_unreachs": g("Icmp", "OutDestUnreachs"),
        }
        rec["gateway_veth"] = {
            "rx_packets": link_delta(gl0, gl1, "vgd", "rx", "packets"),
            "rx_dropped": link_delta(gl0, gl1, "vgd", "rx", "dropped"),
            "tx_packets": link_delta(gl0, gl1, "vgd", "tx", "packets"),
        }
        rec["client_veth"] = {
            "tx_packets": link_delta(cl0, cl1, "vcd", "tx", "packets"),
            "tx_dropped": link_delta(cl0, cl1, "vcd", "tx", "dropped"),
        }
        if (d / "softnet.before").exists():
            sn0, sn1 = read_softnet(d / "softnet.before"), read_softnet(d / "softnet.after")
            rec["softnet"] = {k: sn1[k] - sn0[k] for k in sn0}
        fj = d / "flood.json"
        rec["flood_run"] = json.loads(fj.read_text()) if fj.exists() else None
    return rec


# --- across cells -----------------------------------------------------------------------------

def add_flood_costs(records, syn_rate, syn_burst):
    """CPU per flood packet: the flood cell's busy CPU less what the same guard variant's
    no-flood cell of the same round burned per second over as long an interval, over the
    packets sent; and the counter checks."""
    checks = []
    none = {(r["round"], r["variant"]): r for r in records
            if r["part"] == "guard" and r["flood"] == "none" and r["status"] == "ok"}
    for r in records:
        if r["part"] != "guard" or r["status"] != "ok":
            continue
        interval = r["interval_s"]
        where = f"round {r['round']}, guard {r['variant']}, flood {r['flood']}"
        if r["flood"] == "none":
            if r["variant"] != "off" and r.get("guard_dropped"):
                checks.append(f"{where}: the guard dropped {r['guard_dropped']:.0f} packets "
                              f"with no flood running (legitimate traffic only): {r['guard']}")
            continue
        fr = r.get("flood_run") or {}
        packets = fr.get("packets")
        if not packets:
            checks.append(f"{where}: the flood sent nothing")
            continue
        r["flood_pps"] = fr["pps"]
        r["flood_packets"] = packets
        # Packets the client's veth dropped on the way (its peer's queue full): the flood's
        # and, sharing the queue, the legitimate load's.
        veth_dropped = (r.get("client_veth") or {}).get("tx_dropped") or 0
        r["veth_dropped_per_s"] = veth_dropped / fr["elapsed_s"]
        if veth_dropped > 0.001 * packets:
            checks.append(f"{where}: the client's veth dropped {veth_dropped} packets before "
                          f"the gateway saw them ({packets} flood packets sent, "
                          f"{fr.get('send_errors', 0)} refused to the sender): its peer's "
                          "queue was full, and legitimate packets share that queue")
        base = none.get((r["round"], r["variant"]))
        if base:
            rate = base["cpu"]["busy_s"] / base["interval_s"]
            extra = r["cpu"]["busy_s"] - rate * interval
            r["flood_cpu_s"] = extra
            r["cpu_us_per_flood_packet"] = extra / packets * 1e6
        else:
            r["cpu_us_per_flood_packet"] = None
        # Who refused the flood, and how many per second.
        st = r["stack"]
        if st["udp_in_csum_errors"] or st["tcp_in_csum_errors"]:
            checks.append(f"{where}: the gateway's stack counted checksum errors: {st}")
        if r["flood"] != "udp":
            # SYNs that reach the listener are answered; with its queue full, by SYN cookies.
            r["answered_per_s"] = st["syncookies_sent"] / fr["elapsed_s"]
        if r["variant"] == "off":
            refused = st["udp_no_ports"] + st["udp_in_errors"] if r["flood"] == "udp" \
                else st["listen_drops"]
            r["refused_by"] = "stack"
            r["refused_per_s"] = refused / fr["elapsed_s"]
            if r["flood"] == "udp" and abs(refused - packets) > max(10, 0.001 * packets):
                checks.append(f"{where}: the stack refused {refused} UDP datagrams (NoPorts + "
                              f"InErrors) against {packets} sent")
        else:
            r["refused_by"] = "guard"
            r["refused_per_s"] = (r["guard_dropped"] or 0) / fr["elapsed_s"]
            g = r["guard"] or {}
            if r["flood"] == "udp":
                got = g.get("drop:port", 0)
                if abs(got - packets) > max(10, 0.001 * packets):
                    checks.append(f"{where}: drop:port {got:.0f} against {packets} UDP packets sent")
            elif r["flood"] == "syn":
                # GCRA: one source gets its burst at once, then syn_rate per second.
                admitted = syn_burst + syn_rate * fr["elapsed_s"]
                want = max(0.0, packets - admitted)
                got = g.get("drop:throttled", 0)
                r["throttled_expected"] = want
                if abs(got - want) > max(50, 0.01 * packets):
                    checks.append(f"{where}: drop:throttled {got:.0f}, expected about {want:.0f} "
                                  f"({packets} SYNs from one source at {syn_rate}/s, burst {syn_burst})")
            elif r["flood"] == "syn_spoofed":
                sources = 2 ** (32 - 18) - 2
                per_source = packets / sources
                want = max(0.0, per_source - (syn_burst + syn_rate * fr["elapsed_s"])) * sources
                got = g.get("drop:throttled", 0)
                r["throttled_expected"] = want
                if abs(got - want) > max(50, 0.01 * packets):
                    checks.append(f"{where}: drop:throttled {got:.0f}, expected about {want:.0f} "
                                  f"({per_source:.0f} SYNs per spoofed source)")
    return checks


def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"n": len(values), "median": statistics.median(values), "min": min(values),
            "max": max(values)}


def summarise(records, keys):
    groups = {}
    for r in records:
        if r["status"] != "ok":
            continue
        groups.setdefault((r["part"], r["variant"], r["load"], r["flood"]), []).append(r)
    out = []
    for (part, variant, load, flood), rs in groups.items():
        row = {"part": part, "variant": variant, "load": load, "flood": flood,
               "rounds": len(rs)}
        for k in keys:
            row[k] = spread([r.get(k) for r in rs])
        for nested in ("fast_path", "steered", "guard"):
            merged = {}
            for r in rs:
                for k, v in (r.get(nested) or {}).items():
                    merged.setdefault(k, []).append(v)
            if merged:
                row[nested] = {k: spread(v) for k, v in merged.items()}
        out.append(row)
    return out


# --- Markdown ---------------------------------------------------------------------------------

def fmt(s, digits=1, thousands=False):
    if s is None:
        return "—"
    def one(x):
        if thousands:
            return f"{x:,.0f}"
        return f"{x:,.{digits}f}"
    if s["n"] == 1 or s["min"] == s["max"]:
        return one(s["median"])
    return f"{one(s['median'])} [{one(s['min'])}–{one(s['max'])}]"


TOPOLOGY_NAMES = {
    "loopback": "loopback (one namespace)",
    "direct": "direct veth",
    "routed": "routed (node forwards)",
    "routed_fast": "routed + fast path",
}
GUARD_NAMES = {"off": "off", "tc": "strict, TC", "xdp": "strict, XDP",
               "tc_all": "strict, TC, syn_rate_all 2000/s"}
FLOOD_NAMES = {
    "none": "no flood",
    "udp": "UDP, closed port",
    "syn": "SYN, one source",
    "syn_spoofed": "SYN, spoofed /18",
}


def markdown(report):
    o = report["options"]
    m = report["machine"]
    rows = report["summary"]
    find = lambda part, **kw: [r for r in rows if r["part"] == part
                               and all(r[k] == v for k, v in kw.items())]
    idle_text = " / ".join("—" if x is None else f"{x:.2f}" for x in
                           (m["idle_busy_cpu_per_s_before"], m["idle_busy_cpu_per_s_after"]))
    lines = [
        f"# Ingress programs: cost and savings ({report['date'][:10]}, `bench/ingress.sh "
        f"{o['rounds']}`)",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}; load average "
        f"before {m['load_before']}, after {m['load_after']}; busy with nothing of this run's "
        f"going: {idle_text} CPU-s/s before and after. Gateway: `{o['spindle']}` "
        f"(commit {m['commit']}), configs/hello.yaml's chain, a fresh `spindle run` per cell. "
        f"{o['rounds']} round(s) of every variant, interleaved; cells are median [min–max] over "
        f"rounds. Each cell: {o['warmup']} s warm-up, {o['duration']} s measured. CPU figures "
        "are whole-machine `/proc/stat` busy time (user+nice+system+irq+softirq, both cores); "
        "only ratios within this run mean much.",
        "",
    ]
    busy = [x for x in [m["idle_busy_cpu_per_s_before"], m["idle_busy_cpu_per_s_after"]]
            + [r.get("idle_baseline_cpu_per_s") for r in report["cells"]] if x is not None]
    if busy and max(busy) > 0.25 * m["cpus"]:
        lines += [
            f"**Warning: the machine was not idle.** With nothing of this run's going, it was "
            f"busy up to {max(busy):.2f} CPU-s/s (of {m['cpus']}): other work shared the cores, "
            "so the CPU figures (and likely the latencies) below do not describe Spindle.",
            "",
        ]
    failed = [r for r in report["cells"] if r["status"] != "ok"]
    if failed:
        lines += ["**Failed cells:**", ""]
        for r in failed:
            lines.append(f"- round {r['round']} {r['part']} {r['variant']} "
                         f"{r['load'] or ''}{r['flood'] or ''}: {r['reason']}")
        lines.append("")

    topo = find("topology")
    if topo:
        lines += [
            "## Topologies",
            "",
            f"CPU µs/request: the whole machine, load generator included (spindle bench's "
            f"system CPU with the idle baseline taken out, plus its own process CPU); "
            f"*excl. load gen.*: without the load generator's process (which, with tick-based "
            f"accounting, is also charged the softirq work done during its system calls).",
            "",
            f"**At a fixed offered rate: {o['fixed_rate']:,} requests/s** (open loop, "
            f"{o['connections']} connections)",
            "",
            "| topology | requests/s | p50 µs | p99 µs | CPU µs/request | excl. load gen. | "
            "softirq µs/request | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in TOPOLOGY_NAMES:
            for r in find("topology", variant=v, load="fixed"):
                lines.append(
                    f"| {TOPOLOGY_NAMES[v]} | {fmt(r['rps'], thousands=True)} | "
                    f"{fmt(r['p50_us'], 0)} | {fmt(r['p99_us'], 0)} | "
                    f"{fmt(r['total_cpu_us_per_req'])} | {fmt(r['system_cpu_us_per_req'])} | "
                    f"{fmt(r['softirq_us_per_req'])} | {fmt(r['errors'], 0)} |")
        lines += [
            "",
            f"**At saturation** (closed loop, {o['connections']} connections)",
            "",
            "| topology | requests/s | p50 µs | p99 µs | CPU µs/request | excl. load gen. | "
            "softirq µs/request | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in TOPOLOGY_NAMES:
            for r in find("topology", variant=v, load="saturation"):
                lines.append(
                    f"| {TOPOLOGY_NAMES[v]} | {fmt(r['rps'], thousands=True)} | "
                    f"{fmt(r['p50_us'], 0)} | {fmt(r['p99_us'], 0)} | "
                    f"{fmt(r['total_cpu_us_per_req'])} | {fmt(r['system_cpu_us_per_req'])} | "
                    f"{fmt(r['softirq_us_per_req'])} | {fmt(r['errors'], 0)} |")
        lines += [
            "",
            "**The bypass**: packets the node namespace forwarded through its stack "
            "(`ForwDatagrams` of its /proc/net/snmp) and packets the fast path redirected "
            "(`spindle_ingress_fast_path_packets_total{outcome=\"redirected\"}`), over each "
            "whole `spindle bench` run (check, warm-up and window).",
            "",
            "| topology | load | node ForwDatagrams | fast path redirected | other fast-path outcomes |",
            "|---|---|---:|---:|---|",
        ]
        for load in ("fixed", "saturation"):
            for v in ("routed", "routed_fast"):
                for r in find("topology", variant=v, load=load):
                    fp = r.get("fast_path") or {}
                    other = ", ".join(f"{k} {fmt(s, 0)}" for k, s in sorted(fp.items())
                                      if k != "redirected" and s and s["max"] > 0) or "—"
                    lines.append(
                        f"| {TOPOLOGY_NAMES[v]} | {load} | {fmt(r['node_forwarded'], thousands=True)} | "
                        f"{fmt(fp.get('redirected'), thousands=True)} | {other} |")
        lines.append("")

    guard = find("guard")
    if guard:
        pace = f"{o['flood_pps']:,} packets/s" if o["flood_pps"] else "as fast as it can"
        lines += [
            "## Guard cost under floods",
            "",
            f"Direct veth topology. Legitimate load: `spindle bench --rate {o['legit_rate']:,}` "
            f"(open loop, 16 connections) from the client namespace; the flood "
            f"(`spindle-flood`, {pace}, "
            f"from the same namespace, at the gateway's veth) runs through warm-up and window. "
            "UDP: to a closed port (9) from the client's address; SYN, one source: to the "
            "service port from one spoofed address; SYN, spoofed /18: from a random address of "
            "198.18.64.0/18 per packet. *Lost at the veth/s*: packets the client's veth "
            "dropped because its peer's queue was full (`tx_dropped`), flood and legitimate "
            "ones alike. Guard: `ingress.guard` strict on the gateway's veth, "
            "syn_rate 1000/s and burst 1000 per source (the defaults). *Refused/s*: the "
            "guard's drops, or with the guard off the stack's (UDP `NoPorts`; a SYN flood is "
            "answered with SYN cookies instead: *answered/s*, SYN cookies sent per second, whatever "
            "the guard). *CPU µs per flood packet*: the "
            "cell's busy CPU less the same guard's no-flood cell's (same round, as long), over "
            "the packets sent; it includes building and sending them.",
            "",
            "| flood | guard | sent packets/s | lost at the veth/s | refused/s | answered/s | "
            "CPU µs per flood packet | legit requests/s | legit p50 µs | legit p99 µs | "
            "legit errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for f in FLOOD_NAMES:
            for v in GUARD_NAMES:
                for r in find("guard", variant=v, flood=f):
                    lines.append(
                        f"| {FLOOD_NAMES[f]} | {GUARD_NAMES[v]} | "
                        f"{fmt(r.get('flood_pps'), thousands=True)} | "
                        f"{fmt(r.get('veth_dropped_per_s'), thousands=True)} | "
                        f"{fmt(r.get('refused_per_s'), thousands=True)} | "
                        f"{fmt(r.get('answered_per_s'), thousands=True)} | "
                        f"{fmt(r.get('cpu_us_per_flood_packet'), 2)} | "
                        f"{fmt(r['rps'], thousands=True)} | {fmt(r['p50_us'], 0)} | "
                        f"{fmt(r['p99_us'], 0)} | {fmt(r['errors'], 0)} |")
        lines += [
            "",
            "The guard's counters (`spindle_ingress_guard_packets_total` deltas over the "
            "flood, by verdict:reason; zero ones left out):",
            "",
            "| flood | guard | counters |",
            "|---|---|---|",
        ]
        for f in FLOOD_NAMES:
            for v in ("tc", "xdp", "tc_all"):
                for r in find("guard", variant=v, flood=f):
                    g = r.get("guard") or {}
                    text = ", ".join(f"{k} {fmt(s, thousands=True)}" for k, s in sorted(g.items())
                                     if s and s["max"] > 0) or "—"
                    lines.append(f"| {FLOOD_NAMES[f]} | {GUARD_NAMES[v]} | {text} |")
        lines.append("")

    steer = find("steering")
    if steer:
        lines += [
            "## Steering across two front shards",
            "",
            f"One shard (the default: `one_shard`), and `http: {{ shards: 2 }}` with "
            f"`ingress.steering`, loopback, closed loop, "
            f"{o['connections']} connections (all from 127.0.0.1). *Per shard*: new connections "
            "the SK_REUSEPORT program counted on each (only the `cpu` and `source_hash` modes "
            "run one).",
            "",
            "| steering | requests/s | p50 µs | p99 µs | CPU µs/request | excl. load gen. | "
            "per shard |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for v in ("one_shard", "reuseport", "incoming_cpu", "cpu", "source_hash"):
            for r in find("steering", variant=v):
                st = r.get("steered") or {}
                per = ", ".join(f"{k}: {fmt(s, 0)}" for k, s in sorted(st.items())) or "—"
                lines.append(
                    f"| {v} | {fmt(r['rps'], thousands=True)} | {fmt(r['p50_us'], 0)} | "
                    f"{fmt(r['p99_us'], 0)} | {fmt(r['total_cpu_us_per_req'])} | "
                    f"{fmt(r['system_cpu_us_per_req'])} | {per} |")
        lines.append("")

    lines += ["## Checks", ""]
    if report["checks"]:
        lines += [f"- {c}" for c in report["checks"]]
    elif not [r for r in report["cells"] if r["part"] == "guard" and r["status"] == "ok"]:
        lines.append("- No guard cell was measured: nothing to check.")
    else:
        lines.append("- Every guard counter matched the packets sent (UDP: `drop:port` = "
                     "packets sent; SYN: `drop:throttled` = sent − burst − rate × time, within "
                     "1%), the guard dropped nothing without a flood, and the gateway's stack "
                     "counted no checksum errors.")
    lines.append("")
    return "\n".join(lines)


def machine(args, work):
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = lambda name: (work / name).read_text().split("load average:")[-1].strip() \
        if (work / name).exists() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    def idle(name):
        b, a = work / f"idle-{name}.before", work / f"idle-{name}.after"
        if not (b.exists() and a.exists()):
            return None
        seconds = float((work / f"idle-{name}.time.after").read_text()) - \
            float((work / f"idle-{name}.time.before").read_text())
        return (read_stat(a)["busy_s"] - read_stat(b)["busy_s"]) / seconds

    return {
        "idle_busy_cpu_per_s_before": idle("before"),
        "idle_busy_cpu_per_s_after": idle("after"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_before": load("load.before"),
        "load_after": load("load.after"),
        "commit": commit,
        "clk_tck": CLK_TCK,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("out")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--duration", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--fixed-rate", type=int, required=True)
    p.add_argument("--legit-rate", type=int, required=True)
    p.add_argument("--flood-pps", type=int, required=True)
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--spindle", required=True)
    p.add_argument("--syn-rate", type=int, default=1000, help="the guard's (default) syn_rate")
    p.add_argument("--syn-burst", type=int, default=1000, help="the guard's (default) syn_burst")
    args = p.parse_args()
    cells = sorted((args.work / "cells").iterdir()) if (args.work / "cells").exists() else []
    if not cells:
        sys.exit(f"ingress_report.py: no cells in {args.work}")
    records = [cell_record(d) for d in cells]
    records.sort(key=lambda r: r["round"])
    checks = add_flood_costs(records, args.syn_rate, args.syn_burst)
    for r in records:
        if r["status"] == "ok" and r.get("wrong_bodies"):
            checks.append(f"round {r['round']} {r['part']} {r['variant']}: "
                          f"{r['wrong_bodies']} wrong response bodies")
    keys = ["rps", "intended_rps", "p50_us", "p99_us", "errors", "total_cpu_us_per_req",
            "system_cpu_us_per_req", "loadgen_cpu_us_per_req", "softirq_us_per_req",
            "node_forwarded", "flood_pps", "veth_dropped_per_s", "refused_per_s", "answered_per_s",
            "cpu_us_per_flood_packet", "throttled_expected"]
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args, args.work),
        "options": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "summary": summarise(records, keys),
        "checks": checks,
        "cells": records,
    }
    Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    md = markdown(report)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
