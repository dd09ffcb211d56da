//! Whether a compiled module can run as a function, checked without running any of it: its
//! imports against what Spindle provides (the `spindle` host functions and WASI preview 1),
//! its linear memory against the function's `memory:` limit, and its exports against what its
//! `mode:` calls. Every problem is found at once, so a module is fixed in one go.
//!
//! The worker runs this before it instantiates anything, and `spindle validate` runs the same
//! check on every module of a config, so both say the same thing (docs/guest-abi.md).

use std::fmt;

use wasmer::{ExternType, FunctionType, Mutability, Type, WASM_PAGE_SIZE};

use crate::config::{FunctionSpec, ModuleMode};
use crate::host::CompiledModule;
use crate::wasi;

/// The import module name of Spindle's own host functions.
pub const SPINDLE_IMPORTS: &str = "spindle";

/// Spindle's own host functions: (name, params, results).
pub const SPINDLE_FUNCTIONS: &[(&str, &[Type], &[Type])] = &[
    ("output", &[Type::I32, Type::I32], &[]),
    ("error", &[Type::I32, Type::I32], &[]),
    ("next", &[Type::I32, Type::I32], &[Type::I32]),
];

/// Exports a reactor must have: (name, params, results); `memory` besides.
const REACTOR_FUNCTIONS: &[(&str, &[Type], &[Type])] = &[
    ("spindle_alloc", &[Type::I32], &[Type::I32]),
    ("spindle_handle", &[Type::I32, Type::I32], &[Type::I32]),
];
/// Exports a reactor may have, with the types they must then have.
const REACTOR_OPTIONAL: &[(&str, &[Type], &[Type])] = &[
    ("_initialize", &[], &[]),
    (crate::host::ON_FORK_EXPORT, &[], &[]),
    (
        crate::host::INPLACE_EXPORT,
        &[Type::I32, Type::I32, Type::I32],
        &[Type::I32],
    ),
];
const COMMAND_START: (&str, &[Type], &[Type]) = ("_start", &[], &[]);

/// One reason a module cannot run as its function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkProblem {
    /// An import from a module Spindle does not provide, or a name `spindle` lacks.
    UnknownImport {
        module: String,
        name: String,
        ty: String,
    },
    /// An import Spindle provides, declared with another type.
    ImportType {
        module: String,
        name: String,
        declared: String,
        provided: String,
    },
    /// Linear memory's declared minimum is over the function's `memory:` limit.
    MemoryTooSmall {
        what: String,
        pages: u64,
        limit_pages: u64,
    },
    /// An export the mode needs is missing.
    MissingExport {
        name: &'static str,
        ty: String,
        mode: ModuleMode,
        hint: Option<&'static str>,
    },
    /// An export the host calls has another type than it must.
    ExportType {
        name: String,
        declared: String,
        expected: String,
    },
}

impl fmt::Display for LinkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkProblem::UnknownImport { module, name, ty } if module == SPINDLE_IMPORTS => {
                write!(
                    f,
                    "imports `{module}.{name}` {ty}, which Spindle does not provide (the \
                     `spindle` module has {})",
                    SPINDLE_FUNCTIONS
                        .iter()
                        .map(|(n, ..)| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            LinkProblem::UnknownImport { module, name, ty } => write!(
                f,
                "imports `{module}.{name}` {ty}, which Spindle does not provide (only \
                 `spindle` functions and WASI preview 1 are)"
            ),
            LinkProblem::ImportType {
                module,
                name,
                declared,
                provided,
            } => write!(
                f,
                "imports `{module}.{name}` as {declared}, but Spindle provides {provided}"
            ),
            LinkProblem::MemoryTooSmall {
                what,
                pages,
                limit_pages,
            } => write!(
                f,
                "{what} needs {} at start, more than its `memory:` limit of {}",
                pages_text(*pages),
                pages_text(*limit_pages)
            ),
            LinkProblem::MissingExport {
                name,
                ty,
                mode,
                hint,
            } => {
                let mode = match mode {
                    ModuleMode::Reactor => "a reactor",
                    ModuleMode::Command => "a command (`mode: command`)",
                };
                write!(f, "does not export `{name}` {ty}, which {mode} must")?;
                if let Some(hint) = hint {
                    write!(f, " ({hint})")?;
                }
                Ok(())
            }
            LinkProblem::ExportType {
                name,
                declared,
                expected,
            } => write!(
                f,
                "exports `{name}` as {declared}, but it must be {expected}"
            ),
        }
    }
}

fn pages_text(pages: u64) -> String {
    let bytes = pages * WASM_PAGE_SIZE as u64;
    let size = if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{}MiB", bytes >> 20)
    } else {
        format!("{}KiB", bytes >> 10)
    };
    format!("{pages} page{} ({size})", if pages == 1 { "" } else { "s" })
}

/// Every problem of a module with its function, in the module's order: imports, memory,
/// exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkProblems(pub Vec<LinkProblem>);

impl fmt::Display for LinkProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Checks `compiled` against what `spec`'s function gives it and calls of it.
pub fn check(compiled: &CompiledModule, spec: &FunctionSpec) -> Vec<LinkProblem> {
    let module = compiled.module();
    let mut problems = Vec::new();
    let mut wasi_types = None;
    for import in module.imports() {
        let (ns, name, ty) = (import.module(), import.name(), import.ty());
        let unknown = || LinkProblem::UnknownImport {
            module: ns.to_owned(),
            name: name.to_owned(),
            ty: extern_text(ty),
        };
        if ns == SPINDLE_IMPORTS {
            match SPINDLE_FUNCTIONS.iter().find(|(n, ..)| *n == name) {
                None => problems.push(unknown()),
                Some((_, params, results)) => {
                    let provided = FunctionType::new(params.to_vec(), results.to_vec());
                    if !matches!(ty, ExternType::Function(declared) if *declared == provided) {
                        problems.push(LinkProblem::ImportType {
                            module: ns.to_owned(),
                            name: name.to_owned(),
                            declared: extern_text(ty),
                            provided: func_text(&provided),
                        });
                    }
                }
            }
        } else if wasi::is_wasi_namespace(ns) {
            let types = wasi_types.get_or_insert_with(|| wasi::Signatures::new(compiled.engine()));
            match ty {
                ExternType::Function(declared) => {
                    // A name WASI does not define still links (to a NOSYS stub): any
                    // preview-1 module instantiates, later revisions' included.
                    if let Some(provided) = types.get(ns, name)
                        && provided != *declared
                    {
                        problems.push(LinkProblem::ImportType {
                            module: ns.to_owned(),
                            name: name.to_owned(),
                            declared: extern_text(ty),
                            provided: func_text(&provided),
                        });
                    }
                }
                _ => problems.push(LinkProblem::ImportType {
                    module: ns.to_owned(),
                    name: name.to_owned(),
                    declared: extern_text(ty),
                    provided: "only functions under WASI preview 1".to_owned(),
                }),
            }
        } else {
            problems.push(unknown());
        }
    }

    let limit_pages = spec.memory_limit / WASM_PAGE_SIZE as u64;
    for export in module.exports() {
        if let ExternType::Memory(m) = export.ty()
            && u64::from(m.minimum.0) > limit_pages
        {
            problems.push(LinkProblem::MemoryTooSmall {
                what: format!("memory `{}`", export.name()),
                pages: u64::from(m.minimum.0),
                limit_pages,
            });
        }
    }

    let export = |name: &str| module.exports().find(|e| e.name() == name);
    let has = |name: &str| export(name).is_some();
    let expect_function =
        |problems: &mut Vec<LinkProblem>,
         (name, params, results): (&'static str, &[Type], &[Type]),
         required: Option<(ModuleMode, Option<&'static str>)>| {
            let expected = FunctionType::new(params.to_vec(), results.to_vec());
            match export(name) {
                Some(e) => {
                    if !matches!(e.ty(), ExternType::Function(f) if *f == expected) {
                        problems.push(LinkProblem::ExportType {
                            name: name.to_owned(),
                            declared: extern_text(e.ty()),
                            expected: func_text(&expected),
                        });
                    }
                }
                None => {
                    if let Some((mode, hint)) = required {
                        problems.push(LinkProblem::MissingExport {
                            name,
                            ty: func_text(&expected),
                            mode,
                            hint,
                        });
                    }
                }
            }
        };
    match spec.mode {
        ModuleMode::Reactor => {
            let hint = has("_start")
                .then_some("it exports `_start`: set `mode: command` to run it as a WASI command");
            expect_memory(
                &mut problems,
                export("memory").map(|e| e.ty().clone()),
                spec.mode,
                hint,
            );
            for &f in REACTOR_FUNCTIONS {
                expect_function(&mut problems, f, Some((ModuleMode::Reactor, hint)));
            }
            for &f in REACTOR_OPTIONAL {
                expect_function(&mut problems, f, None);
            }
        }
        ModuleMode::Command => {
            let hint = has("spindle_handle").then_some(
                "it exports `spindle_handle`: leave out `mode: command` to run it as a reactor",
            );
            expect_memory(
                &mut problems,
                export("memory").map(|e| e.ty().clone()),
                spec.mode,
                hint,
            );
            expect_function(
                &mut problems,
                COMMAND_START,
                Some((ModuleMode::Command, hint)),
            );
        }
    }
    problems
}

/// What `spindle validate` says of `spec`'s module: that it cannot be read or compiled, or
/// every problem [`check`] finds; nothing when it can run as its function. Compiles the
/// module as a worker would (the function's engine: fuel metering, memory limit) and runs
/// none of it.
pub fn check_file(spec: &FunctionSpec) -> Vec<String> {
    let bytes = match std::fs::read(&spec.module) {
        Ok(bytes) => bytes,
        Err(e) => return vec![format!("cannot read module {}: {e}", spec.module.display())],
    };
    match CompiledModule::compile(spec, &bytes) {
        Ok(compiled) => check(&compiled, spec)
            .iter()
            .map(ToString::to_string)
            .collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// Both modes read and write the guest through its exported `memory`.
fn expect_memory(
    problems: &mut Vec<LinkProblem>,
    ty: Option<ExternType>,
    mode: ModuleMode,
    hint: Option<&'static str>,
) {
    match ty {
        Some(ExternType::Memory(_)) => {}
        Some(other) => problems.push(LinkProblem::ExportType {
            name: "memory".to_owned(),
            declared: extern_text(&other),
            expected: "a memory".to_owned(),
        }),
        None => problems.push(LinkProblem::MissingExport {
            name: "memory",
            ty: "(memory)".to_owned(),
            mode,
            hint,
        }),
    }
}

/// A value type as the text format writes it.
fn type_text(t: Type) -> &'static str {
    match t {
        Type::I32 => "i32",
        Type::I64 => "i64",
        Type::F32 => "f32",
        Type::F64 => "f64",
        Type::V128 => "v128",
        Type::ExternRef => "externref",
        Type::FuncRef => "funcref",
        Type::ExceptionRef => "exnref",
    }
}

/// A function type as the text format writes it: `(func (param i32 i32) (result i32))`.
pub fn func_text(f: &FunctionType) -> String {
    let mut s = String::from("(func");
    for (word, types) in [("param", f.params()), ("result", f.results())] {
        if !types.is_empty() {
            s.push_str(&format!(" ({word}"));
            for t in types {
                s.push(' ');
                s.push_str(type_text(*t));
            }
            s.push(')');
        }
    }
    s.push(')');
    s
}

/// Any import or export's type, as the text format writes it.
pub fn extern_text(ty: &ExternType) -> String {
    let limits = |min: u64, max: Option<u64>| match max {
        Some(max) => format!("{min} {max}"),
        None => min.to_string(),
    };
    match ty {
        ExternType::Function(f) => func_text(f),
        ExternType::Memory(m) => format!(
            "(memory {}{})",
            limits(u64::from(m.minimum.0), m.maximum.map(|p| u64::from(p.0))),
            if m.shared { " shared" } else { "" }
        ),
        ExternType::Table(t) => format!(
            "(table {} {})",
            limits(u64::from(t.minimum), t.maximum.map(u64::from)),
            type_text(t.ty)
        ),
        ExternType::Global(g) => match g.mutability {
            Mutability::Var => format!("(global (mut {}))", type_text(g.ty)),
            Mutability::Const => format!("(global {})", type_text(g.ty)),
        },
        ExternType::Tag(t) => {
            let params: Vec<&str> = t.params.iter().map(|t| type_text(*t)).collect();
            if params.is_empty() {
                "(tag)".to_owned()
            } else {
                format!("(tag (param {}))", params.join(" "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FunctionSpec, Instances, Isolation, StartMode};

    fn spec(tag: &str, wat: &str, mode: ModuleMode, memory_limit: u64) -> FunctionSpec {
        let path =
            std::env::temp_dir().join(format!("spindle-abi-{tag}-{}.wat", std::process::id()));
        std::fs::write(&path, wat).unwrap();
        FunctionSpec {
            name: tag.to_string(),
            module: path,
            instances: Instances::fixed(1),
            wait_queue: 256,
            memory_limit,
            timeout: std::time::Duration::from_secs(1),
            fuel: None,
            mode,
            env: vec![],
            start: StartMode::Exec,
            isolation: Isolation::Reuse,
            idle_spin: std::time::Duration::ZERO,
            args: Vec::new(),
            files: Vec::new(),
        }
    }

    fn problems(tag: &str, wat: &str, mode: ModuleMode, memory_limit: u64) -> Vec<String> {
        let spec = spec(tag, wat, mode, memory_limit);
        let compiled = CompiledModule::compile(&spec, wat.as_bytes()).unwrap();
        let found = check(&compiled, &spec);
        let _ = std::fs::remove_file(&spec.module);
        found.iter().map(ToString::to_string).collect()
    }

    const REACTOR: &str = r#"
        (memory (export "memory") 1)
        (func (export "spindle_alloc") (param i32) (result i32) (i32.const 0))
        (func (export "spindle_handle") (param i32 i32) (result i32) (i32.const 0))"#;

    #[test]
    fn a_well_formed_reactor_and_command_have_no_problem() {
        let reactor = format!(
            r#"(module (import "spindle" "output" (func (param i32 i32)))
                (import "spindle" "next" (func (param i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "wasi_snapshot_preview1" "from_a_later_revision" (func (param i32) (result i32)))
                (func (export "_initialize")) {REACTOR})"#
        );
        assert_eq!(
            problems("ok-reactor", &reactor, ModuleMode::Reactor, 1 << 20),
            Vec::<String>::new()
        );
        let command = r#"(module (memory (export "memory") 1) (func (export "_start")))"#;
        assert_eq!(
            problems("ok-command", command, ModuleMode::Command, 1 << 20),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_missing_import_is_listed_with_its_type() {
        let wat = format!(
            r#"(module
                (import "env" "foo" (func (param i32 i64) (result f32)))
                (import "env" "table" (table 2 funcref))
                (import "env" "counter" (global (mut i32)))
                (import "env" "heap" (memory 1 2))
                (import "spindle" "log" (func (param i32 i32)))
                (import "spindle" "output" (func (param i32)))
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32) (result i32)))
                (import "wasi_unstable" "some_memory" (memory 1))
                {REACTOR})"#
        );
        assert_eq!(
            problems("imports", &wat, ModuleMode::Reactor, 1 << 20),
            [
                "imports `env.foo` (func (param i32 i64) (result f32)), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)",
                "imports `env.table` (table 2 funcref), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)",
                "imports `env.counter` (global (mut i32)), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)",
                "imports `env.heap` (memory 1 2), which Spindle does not provide (only `spindle` functions and WASI preview 1 are)",
                "imports `spindle.log` (func (param i32 i32)), which Spindle does not provide (the `spindle` module has `output`, `error`, `next`)",
                "imports `spindle.output` as (func (param i32)), but Spindle provides (func (param i32 i32))",
                "imports `wasi_snapshot_preview1.fd_write` as (func (param i32) (result i32)), but Spindle provides (func (param i32 i32 i32 i32) (result i32))",
                "imports `wasi_unstable.some_memory` as (memory 1), but Spindle provides only functions under WASI preview 1",
            ]
        );
    }

    #[test]
    fn memory_over_the_limit_and_missing_or_mistyped_exports() {
        let wat = r#"(module
            (memory (export "memory") 20)
            (global (export "spindle_alloc") i32 (i32.const 0))
            (func (export "spindle_on_fork") (param i32))
            (func (export "_start")))"#;
        assert_eq!(
            problems("exports", wat, ModuleMode::Reactor, 1 << 20),
            [
                "memory `memory` needs 20 pages (1280KiB) at start, more than its `memory:` limit of 16 pages (1MiB)",
                "exports `spindle_alloc` as (global i32), but it must be (func (param i32) (result i32))",
                "does not export `spindle_handle` (func (param i32 i32) (result i32)), which a reactor must (it exports `_start`: set `mode: command` to run it as a WASI command)",
                "exports `spindle_on_fork` as (func (param i32)), but it must be (func)",
            ]
        );
        let wat = format!("(module {REACTOR})");
        assert_eq!(
            problems("no-start", &wat, ModuleMode::Command, 1 << 20),
            [
                "does not export `_start` (func), which a command (`mode: command`) must (it exports `spindle_handle`: leave out `mode: command` to run it as a reactor)"
            ]
        );
        let wat = r#"(module (memory 1) (func (export "_start")))"#;
        assert_eq!(
            problems("no-memory", wat, ModuleMode::Command, 1 << 20),
            ["does not export `memory` (memory), which a command (`mode: command`) must"]
        );
    }
}
