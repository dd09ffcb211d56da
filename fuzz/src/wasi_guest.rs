//! The WASI preview-1 layer and Spindle's host imports, driven by random valid modules:
//! wasm-smith builds a reactor from the input (it may import any preview-1 function and
//! `spindle.output`/`error`/`next`, and exports `memory`, `spindle_alloc`, `spindle_handle`
//! and `_initialize`, with random bodies), chain-runtime builds an instance of it as a worker
//! would (compile, ABI check, instantiate, `_initialize`) and invokes it on inputs from the
//! fuzz data, with `prepare` between calls and a snapshot at the end. Refusals, traps, fuel
//! and guest errors are answers; a panic in the host, an output past its capacity or a
//! failure without a message is a bug.

use std::path::PathBuf;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use chain_runtime::host::{BufferIo, Outcome};
use chain_runtime::instance::InstanceBuilder;
use proto::Status;
use wasm_encoder::{
    CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection, ImportSection,
    Instruction, MemorySection, MemoryType, Module, TypeSection, ValType,
};

use ValType::{I32, I64};

/// Every preview-1 import a guest may call, with its signature (results are the errno).
const WASI: &[(&str, &[ValType], bool)] = &[
    ("args_sizes_get", &[I32, I32], true),
    ("args_get", &[I32, I32], true),
    ("environ_sizes_get", &[I32, I32], true),
    ("environ_get", &[I32, I32], true),
    ("clock_res_get", &[I32, I32], true),
    ("clock_time_get", &[I32, I64, I32], true),
    ("random_get", &[I32, I32], true),
    ("fd_write", &[I32, I32, I32, I32], true),
    ("fd_read", &[I32, I32, I32, I32], true),
    ("fd_pread", &[I32, I32, I32, I64, I32], true),
    ("fd_pwrite", &[I32, I32, I32, I64, I32], true),
    ("fd_prestat_get", &[I32, I32], true),
    ("fd_prestat_dir_name", &[I32, I32, I32], true),
    ("fd_fdstat_get", &[I32, I32], true),
    ("fd_fdstat_set_flags", &[I32, I32], true),
    ("fd_filestat_get", &[I32, I32], true),
    ("fd_close", &[I32], true),
    ("fd_seek", &[I32, I64, I32, I32], true),
    ("fd_tell", &[I32, I32], true),
    ("fd_sync", &[I32], true),
    ("poll_oneoff", &[I32, I32, I32, I32], true),
    ("proc_exit", &[I32], false),
    ("proc_raise", &[I32], true),
    ("sched_yield", &[], true),
    (
        "path_open",
        &[I32, I32, I32, I32, I32, I64, I64, I32, I32],
        true,
    ),
    ("sock_accept", &[I32, I32, I32], true),
    ("sock_recv", &[I32, I32, I32, I32, I32, I32], true),
    ("sock_send", &[I32, I32, I32, I32, I32], true),
    ("sock_shutdown", &[I32, I32], true),
];

/// `spindle` imports: name, params, returns an i32.
const SPINDLE: &[(&str, &[ValType], bool)] = &[
    ("output", &[I32, I32], false),
    ("error", &[I32, I32], false),
    ("next", &[I32, I32], true),
];

/// The module wasm-smith may import from.
fn imports_module() -> Vec<u8> {
    let mut types = TypeSection::new();
    let mut imports = ImportSection::new();
    for (i, (namespace, name, params, result)) in WASI
        .iter()
        .map(|(n, p, r)| ("wasi_snapshot_preview1", n, p, r))
        .chain(SPINDLE.iter().map(|(n, p, r)| ("spindle", n, p, r)))
        .enumerate()
    {
        let results: &[ValType] = if *result { &[I32] } else { &[] };
        types
            .ty()
            .function(params.iter().copied(), results.iter().copied());
        imports.import(namespace, name, EntityType::Function(i as u32));
    }
    let mut module = Module::new();
    module.section(&types).section(&imports);
    module.finish()
}

/// The exports a reactor must have, which wasm-smith then gives random bodies.
fn exports_module() -> Vec<u8> {
    let mut types = TypeSection::new();
    types.ty().function([I32], [I32]); // spindle_alloc
    types.ty().function([I32, I32], [I32]); // spindle_handle
    types.ty().function([], []); // _initialize
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    for ty in 0..3 {
        funcs.function(ty);
        let mut body = Function::new([]);
        body.instruction(&Instruction::Unreachable)
            .instruction(&Instruction::End);
        code.function(&body);
    }
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: 1,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    let mut exports = ExportSection::new();
    exports.export("spindle_alloc", ExportKind::Func, 0);
    exports.export("spindle_handle", ExportKind::Func, 1);
    exports.export("_initialize", ExportKind::Func, 2);
    exports.export("memory", ExportKind::Memory, 0);
    let mut module = Module::new();
    module
        .section(&types)
        .section(&funcs)
        .section(&memories)
        .section(&exports)
        .section(&code);
    module.finish()
}

fn smith_config() -> wasm_smith::Config {
    wasm_smith::Config {
        available_imports: Some(imports_module()),
        exports: Some(exports_module()),
        // What wasmer's Cranelift backend compiles; anything else would only be refused.
        gc_enabled: false,
        exceptions_enabled: false,
        threads_enabled: false,
        shared_everything_threads_enabled: false,
        memory64_enabled: false,
        tail_call_enabled: false,
        relaxed_simd_enabled: false,
        wide_arithmetic_enabled: false,
        custom_page_sizes_enabled: false,
        compact_imports_enabled: false,
        custom_descriptors_enabled: false,
        max_memories: 1,
        // Within the function's memory limit below (2 MiB), so most modules instantiate.
        max_memory32_bytes: 1 << 20,
        max_funcs: 12,
        max_instructions: 200,
        max_imports: 16,
        max_data_segments: 4,
        max_table_elements: 64,
        ..wasm_smith::Config::default()
    }
}

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("spindle-fuzz-wasi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the fuzz wasi directory");
        // Only named by the config: the module's bytes are handed to the builder.
        std::fs::write(dir.join("w.wasm"), b"").expect("writing the module file");
        dir
    })
}

#[derive(Arbitrary, Debug)]
struct Call {
    input: Vec<u8>,
    capacity: u16,
}

pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(module) = wasm_smith::Module::new(smith_config(), &mut u) else {
        return;
    };
    let fresh = u.arbitrary::<bool>().unwrap_or(false);
    let dynamic = u.arbitrary::<bool>().unwrap_or(false);
    let isolation = if fresh { "fresh_per_request" } else { "reuse" };
    let routing = if dynamic {
        "entry: w, functions: [w]"
    } else {
        "steps: [w]"
    };
    // Fuel bounds every call (and `_initialize`): a loop ends in a Timeout answer, quickly.
    let yaml = format!(
        "functions:\n  - {{ name: w, module: w.wasm, memory: 2MiB, fuel: 20000, timeout_ms: 2000, \
         start: exec, isolation: {isolation}, env: {{ K: v }} }}\n\
         chains:\n  - {{ name: c, route: /c, {routing} }}\n"
    );
    let path = dir().join("spindle.yaml");
    let builder =
        InstanceBuilder::from_config_text(&yaml, &path, "c", "w").expect("the fuzz config");
    // A module the host refuses to build (ABI, instantiation, a trap in `_initialize`) is
    // answered with an error, which is all that is asked of it here.
    let Ok(mut instance) = builder.cold(&module.to_bytes()) else {
        return;
    };
    for _ in 0..3 {
        let Ok(call) = Call::arbitrary(&mut u) else {
            break;
        };
        let capacity = usize::from(call.capacity);
        let mut io = BufferIo::new(capacity, &call.input);
        match instance.host_mut().invoke(&mut io) {
            Outcome::Done { output_len, next } => {
                assert!(
                    output_len <= capacity,
                    "output of {output_len} bytes past capacity {capacity}"
                );
                assert!(io.output.len() <= capacity);
                if !dynamic {
                    assert_eq!(next, None, "a static chain's guest picked a next hop");
                }
            }
            Outcome::Failed { status, message } => {
                assert_ne!(status, Status::Ok);
                assert!(
                    !message.is_empty(),
                    "a failure without a message ({status:?})"
                );
            }
        }
        let _ = instance.host_mut().prepare();
        let _ = instance.host_mut().take_resets().count();
    }
    let _ = instance.host_mut().snapshot();
}
