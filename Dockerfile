# Spindle's container image: the `spindle` binary, the example Wasm functions and configs/.
#
#   docker build -t spindle .
#   docker run --rm -p 8080:8080 spindle          # configs/hello.yaml, unprivileged
#
# Unprivileged (the default user below), the gateway serves on the userspace dataplane and
# its workers get only no_new_privs, seccomp and closed fds. The eBPF dataplane, the ingress
# programs, the worker sandbox's namespaces and uid change, and remote fork need uid 0 with
# the capabilities deploy/kubernetes/daemonset.yaml lists, each with its reason
# (deploy/kubernetes/README.md; README.md "Container image" has the `docker run` line).
#
# Needs BuildKit (Docker 23 and later use it by default; podman and buildah support it too)
# for the cache mounts. The base images are pinned by tag; where a registry can be reached,
# pin them by digest as well (`FROM rust:1.95.0-slim-bookworm@sha256:…`).

# --- build: Rust, clang for the eBPF programs and the wasm32-wasi examples ----------------
FROM rust:1.95.0-slim-bookworm AS build

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The packages scripts/setup.sh installs for building (its test-only tools stay out):
# clang, lld, wasi-libc, libclang-rt-14-dev-wasm32: the examples -> wasm32-wasi, and the eBPF
#   programs (bpf-kit runs clang; bindgen, for wasmer and userfaultfd-sys, loads libclang);
# make, pkg-config, libelf-dev, zlib1g-dev: libbpf-sys; cmake, g++: wasmer's build
#   dependencies (its build script uses the cmake crate), as in scripts/setup.sh.
# DL3008 (pin apt versions) is ignored: the pinned base image fixes the Debian release, and
# an exact version pin breaks the build at that package's next security update (the archive
# keeps only the newest).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      clang lld wasi-libc libclang-rt-14-dev-wasm32 \
      make pkg-config libelf-dev zlib1g-dev \
      cmake g++ \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The registry and target/ are cache mounts (kept between builds, not in the image), so the
# binary is copied out of target/ in the same step. Line tables stay (Cargo.toml's release
# profile): panics and backtraces name file:line.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p gateway \
 && install -D -m 0755 target/release/spindle /out/bin/spindle

RUN make -s -C examples \
 && install -d /out/share/spindle/examples/wasm /out/share/spindle/configs \
 && install -m 0644 examples/wasm/*.wasm /out/share/spindle/examples/wasm/ \
 && install -m 0644 configs/*.yaml /out/share/spindle/configs/

# --- runtime: no compiler, only what the binary links ---------------------------------------
FROM debian:bookworm-20260202-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# `ldd target/release/spindle`: libelf.so.1 (libelf1), libz.so.1 (zlib1g), libgcc_s.so.1,
# libm.so.6, libc.so.6. Only libelf1 is not in the slim image already. Spindle runs no
# external program (no ip, no tc: it attaches its eBPF programs through the bpf syscall), so
# nothing else is installed.
# DL3008 is ignored for the same reason as in the build stage.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libelf1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin spindle

COPY --from=build /out/bin/spindle /usr/local/bin/spindle
# Laid out as in the repository, so every shipped config's relative module paths
# (../examples/wasm/*.wasm) hold: /usr/local/share/spindle/configs/hello.yaml and so on.
COPY --from=build /out/share/spindle /usr/local/share/spindle

# HTTP (chains, /healthz, /readyz, /metrics); the peer-control channel; the image page server.
EXPOSE 8080 7070 7071

# Kubernetes runs this image as uid 0 with a bounded capability set (the DaemonSet says why);
# anywhere else it is an unprivileged user by default.
USER 10001:10001

# No HEALTHCHECK: Kubernetes ignores it and probes /healthz and /readyz itself (the
# DaemonSet), and the image has no HTTP client to run one with; under plain Docker, probe
# http://HOST:8080/readyz from outside.
# checkov:skip=CKV_DOCKER_2: Kubernetes probes /healthz and /readyz (deploy/kubernetes/daemonset.yaml); a Docker HEALTHCHECK would need an HTTP client in the image and Kubernetes ignores it
ENTRYPOINT ["/usr/local/bin/spindle"]
CMD ["run", "/usr/local/share/spindle/configs/hello.yaml", "--listen", "0.0.0.0:8080"]
