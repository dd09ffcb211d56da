"""What schemas cannot see in deploy/kubernetes: that the objects agree with each other, with
the chain config they ship, with the image the Dockerfile builds and with the gateway's own
timeouts. Run by scripts/lint-deploy.sh (in its virtualenv: PyYAML, jsonschema):

    python check_manifests.py RENDERED.yaml

RENDERED.yaml is `kubectl kustomize deploy/kubernetes`. Paths are relative to the repository
root (the script's caller's working directory). Prints one line per check; exits 1 if any
failed.
"""

import json
import re
import sys
from pathlib import Path

import jsonschema
import yaml

DEPLOY = Path("deploy/kubernetes")
IMAGE_WASM_DIR = "/usr/local/share/spindle/examples/wasm/"

failures = []


def check(ok, what):
    print(("ok      " if ok else "FAILED  ") + what)
    if not ok:
        failures.append(what)
    return ok


def load_all(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


def rust_secs(path, name):
    """The seconds of `const NAME: Duration = Duration::from_secs(N)` in a Rust file."""
    m = re.search(rf"const {name}: Duration = Duration::from_(secs|millis)\((\d+)\)",
                  Path(path).read_text())
    if not m:
        check(False, f"{path} defines {name} as Duration::from_secs/millis (the grace period is checked against it)")
        return 0.0
    return int(m.group(2)) / (1000.0 if m.group(1) == "millis" else 1.0)


def make_list(makefile, *names):
    text = Path(makefile).read_text().replace("\\\n", " ")
    out = set()
    for name in names:
        m = re.search(rf"^{name}\s*:=\s*(.*)$", text, re.M)
        out.update(m.group(1).split() if m else [])
    return out


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def main(rendered):
    objects = load_all(rendered)
    by_kind = {}
    for o in objects:
        by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

    # Every manifest is applied by `kubectl apply -k` except the ServiceMonitor.
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "servicemonitor.yaml"}
    check(listed == present, "kustomization.yaml lists every manifest but servicemonitor.yaml"
          + ("" if listed == present else f" (missing {sorted(present - listed)}, absent {sorted(listed - present)})"))
    check("Secret" not in by_kind, "no Secret is committed (the cluster key is made by hand: README.md)")

    [ns] = by_kind["Namespace"]
    for o in objects:
        if o["kind"] not in ("Namespace", "PriorityClass"):
            check(o["metadata"].get("namespace") == ns,
                  f"{o['kind']}/{o['metadata']['name']} is in namespace {ns}")

    ds = by_kind["DaemonSet"]["spindle"]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    labels = pod["metadata"]["labels"]
    check(ds["spec"]["selector"]["matchLabels"].items() <= labels.items(),
          "the DaemonSet's selector matches its pod labels")
    check(spec["serviceAccountName"] in by_kind.get("ServiceAccount", {}),
          f"ServiceAccount {spec['serviceAccountName']} is defined")
    check(spec["priorityClassName"] in by_kind.get("PriorityClass", {}),
          f"PriorityClass {spec['priorityClassName']} is defined")
    [c] = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    # Probes and Prometheus annotations point at the gateway's HTTP port.
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = c[probe]["httpGet"]
        check(get["port"] in ports and get["path"] in ("/healthz", "/readyz"),
              f"{probe} asks {get['path']} on a declared port ({get['port']})")
    ann = pod["metadata"]["annotations"]
    check(int(ann["prometheus.io/port"]) == ports["http"] and ann["prometheus.io/path"] == "/metrics",
          "prometheus.io annotations name the http port and /metrics")

    # Services select the pods and target declared ports.
    for name, svc in by_kind["Service"].items():
        check(svc["spec"]["selector"].items() <= labels.items(),
              f"Service {name} selects the DaemonSet's pods")
        for p in svc["spec"]["ports"]:
            check(p["targetPort"] in ports, f"Service {name} port {p['name']} targets a container port")

    # Volumes: the ConfigMap and its key exist; the Secret is the documented one.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    files = {}
    for v in spec["volumes"]:
        for src in v.get("projected", {}).get("sources", []):
            for kind, ref in src.items():
                for item in ref.get("items", []):
                    files[f"{mounts[v['name']]}/{item['path']}"] = (kind, ref["name"], item)
                if kind == "configMap":
                    cm = by_kind.get("ConfigMap", {}).get(ref["name"])
                    check(cm is not None and all(i["key"] in cm["data"] for i in ref.get("items", [])),
                          f"ConfigMap {ref['name']} exists with the keys mounted")
    secrets = {ref for kind, ref, _ in files.values() if kind == "secret"}
    check(secrets == {"spindle-cluster-key"}, "the one Secret mounted is spindle-cluster-key (README.md)")
    check(all(item.get("mode") == 0o400 for kind, _, item in files.values() if kind == "secret"),
          "the cluster key is mounted with mode 0400 (Spindle refuses a key others can read)")
    check("fsGroup" not in spec.get("securityContext", {}),
          "no fsGroup (it would make the cluster key group-readable)")

    # The chain config: what `spindle run` reads, where the image has it.
    args = c["args"]
    check(args[0] == "run" and args[1] in files and files[args[1]][0] == "configMap",
          f"`spindle run` reads the mounted ConfigMap ({args[1]})")
    kind, cm_name, item = files[args[1]]
    config = yaml.safe_load(by_kind["ConfigMap"][cm_name]["data"][item["key"]])
    check(port_of(config["listen"]) == ports["http"], "listen: is the http port")
    node = config.get("node", {})
    check(port_of(node["peer_listen"]) == ports["peer"], "node.peer_listen is the peer port")
    check(node["cluster_key"] in files and files[node["cluster_key"]][0] == "secret",
          f"node.cluster_key ({node['cluster_key']}) is the mounted Secret")
    serve = args[args.index("--serve-images") + 1]
    check(port_of(serve) == ports["images"], "--serve-images is the images port")
    check("--admin" in args, "--serve-images has the --admin it requires")
    built = make_list("examples/Makefile", "REACTORS", "COMMANDS", "FORK_EXAMPLES")
    for f in config["functions"]:
        m = f["module"]
        check(m.startswith(IMAGE_WASM_DIR) and m.endswith(".wasm") and Path(m).stem in built,
              f"function {f['name']}: {m} is an example the image ships")
    dockerfile = Path("Dockerfile").read_text()
    check("/out/share/spindle/examples/wasm" in dockerfile
          and "COPY --from=build /out/share/spindle /usr/local/share/spindle" in dockerfile,
          f"the Dockerfile puts the examples in {IMAGE_WASM_DIR}")

    # Peers: the headless Service the config resolves, with the ports the config names.
    peers_svc = [s for s in by_kind["Service"].values() if s["spec"].get("clusterIP") == "None"]
    check(len(peers_svc) == 1, "one headless Service (peer discovery)")
    svc_ports = {p["name"]: p["port"] for p in peers_svc[0]["spec"]["ports"]}
    for p in config.get("peers", []):
        check(p.get("dns") == f"{peers_svc[0]['metadata']['name']}.{ns}.svc.cluster.local",
              f"peers dns {p.get('dns')} is the headless Service")
        check(p.get("http_port") == svc_ports.get("http") == ports["http"]
              and p.get("control_port") == svc_ports.get("peer") == ports["peer"],
              "peers http_port/control_port are the Service's and the pod's")
    check(spec.get("dnsPolicy") == "ClusterFirstWithHostNet" or not spec.get("hostNetwork"),
          "a hostNetwork pod uses ClusterFirstWithHostNet (else the peers' Service name does not resolve)")

    # Shutdown: the grace period covers the preStop pause and the gateway's own timeouts.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    pause = float(pre_stop[-1]) if pre_stop[0].endswith("sleep") else 0.0
    needed = (pause + rust_secs("gateway/src/main.rs", "DRAIN_TIMEOUT")
              + rust_secs("gateway/src/main.rs", "PEER_RELEASE_TIMEOUT")
              + rust_secs("gateway/src/supervisor.rs", "STOP_GRACE")
              + rust_secs("gateway/src/supervisor.rs", "DRAIN_TIMEOUT"))
    grace = spec["terminationGracePeriodSeconds"]
    check(needed + 2 <= grace <= needed + 15,
          f"terminationGracePeriodSeconds {grace} covers preStop + drain + release + worker stop = {needed:g} s (2..15 s spare)")

    # The ServiceMonitor: its own schema, and it selects exactly the gateway Service's port.
    [sm] = load_all(DEPLOY / "servicemonitor.yaml")
    schema = json.loads(Path("deploy/lint/servicemonitor.schema.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(sm), key=str)
    for e in errors:
        print(f"        servicemonitor.yaml {'.'.join(map(str, e.path))}: {e.message}")
    check(not errors, "servicemonitor.yaml matches deploy/lint/servicemonitor.schema.json")
    if not errors:
        want = sm["spec"]["selector"]["matchLabels"]
        chosen = [s for s in by_kind["Service"].values()
                  if want.items() <= s["metadata"].get("labels", {}).items()]
        check(len(chosen) == 1, f"the ServiceMonitor selects exactly one Service (got {[s['metadata']['name'] for s in chosen]})")
        check(sm["metadata"]["namespace"] == ns and sm["spec"].get("namespaceSelector", {}).get("matchNames") == [ns],
              f"the ServiceMonitor looks in namespace {ns}")
        if len(chosen) == 1:
            names = {p["name"] for p in chosen[0]["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                check(ep.get("port") in names and ep.get("path") == "/metrics",
                      f"the ServiceMonitor scrapes /metrics on port {ep.get('port')} of Service {chosen[0]['metadata']['name']}")

    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
