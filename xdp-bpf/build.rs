//! Compiles the ingress programs with clang and generates their libbpf-rs skeletons.

fn main() {
    for (source, name) in [
        ("src/bpf/guard.bpf.c", "guard"),
        ("src/bpf/fast_path.bpf.c", "fast_path"),
        ("src/bpf/steer.bpf.c", "steer"),
        ("src/bpf/local.bpf.c", "local"),
    ] {
        bpf_kit::build::skeleton(source, name, &[], &["src/bpf/ingress_maps.h"]);
    }
}
