//! Compiles the eBPF program with clang and generates its libbpf-rs skeleton.

use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SRC: &str = "src/bpf/sockmap.bpf.c";
/// The wire contract's C headers (the descriptor): one definition, shared with `proto`.
const PROTO_INCLUDE: &str = "../proto/include";

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    // <linux/bpf.h> pulls in <asm/types.h>, which Debian keeps under the multiarch directory
    // that clang's bpf target does not search by itself.
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let proto = format!("-I{PROTO_INCLUDE}");
    SkeletonBuilder::new()
        .source(SRC)
        .clang_args([
            multiarch.as_str(),
            proto.as_str(),
            "-Wall",
            "-Werror",
            "-O2",
        ])
        .build_and_generate(out.join("sockmap.skel.rs"))
        .expect("building the eBPF program (needs clang; run scripts/setup.sh)");
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-changed=src/bpf/spindle_maps.h");
    println!("cargo:rerun-if-changed={PROTO_INCLUDE}/spindle_desc.h");
}
