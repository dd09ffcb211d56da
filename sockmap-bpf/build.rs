//! Compiles the eBPF program with clang and generates its libbpf-rs skeleton.

fn main() {
    // The wire contract's C headers (the descriptor): one definition, shared with `proto`.
    bpf_kit::build::skeleton(
        "src/bpf/sockmap.bpf.c",
        "sockmap",
        &["../proto/include"],
        &["src/bpf/spindle_maps.h", "../proto/include/spindle_desc.h"],
    );
}
