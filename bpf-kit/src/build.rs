//! For build scripts: a `.bpf.c` compiled into a libbpf-rs skeleton the same way for every
//! Spindle program.

use std::path::{Path, PathBuf};

/// Compiles `source` (relative to the crate) into `$OUT_DIR/{name}.skel.rs`, with `includes`
/// searched for headers, every warning an error, and cargo told to rebuild when `source` or
/// any of `watch` changes. Panics with the reason (build scripts report by panicking).
pub fn skeleton(source: &str, name: &str, includes: &[&str], watch: &[&str]) {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR set by cargo"));
    // <linux/bpf.h> pulls in <asm/types.h>, which Debian keeps under the multiarch directory
    // that clang's bpf target does not search by itself.
    let mut args = vec![format!(
        "-I/usr/include/{}-linux-gnu",
        std::env::consts::ARCH
    )];
    args.extend(includes.iter().map(|dir| format!("-I{dir}")));
    args.extend(["-Wall", "-Werror", "-O2"].map(String::from));
    libbpf_cargo::SkeletonBuilder::new()
        .source(source)
        .clang_args(args)
        .build_and_generate(out.join(format!("{name}.skel.rs")))
        .unwrap_or_else(|e| panic!("building {source} (needs clang; run scripts/setup.sh): {e:#}"));
    println!("cargo:rerun-if-changed={source}");
    for path in watch {
        println!("cargo:rerun-if-changed={}", Path::new(path).display());
    }
}
