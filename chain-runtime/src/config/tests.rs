use super::units::parse_size;
use super::yaml::{closest, edit_distance};
use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A private directory tree for one test, removed on drop:
/// `conf/spindle.yaml` is the (never written) configuration source, and
/// `mods/{a,b,c}.wasm` plus `conf/local.wasm` are placeholder modules.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spindle-config-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("mods")).unwrap();
        std::fs::create_dir_all(dir.join("conf")).unwrap();
        for name in [
            "mods/a.wasm",
            "mods/b.wasm",
            "mods/c.wasm",
            "conf/local.wasm",
        ] {
            std::fs::write(dir.join(name), b"\0asm\x01\0\0\0").unwrap();
        }
        Scratch { dir }
    }

    fn source(&self) -> PathBuf {
        self.dir.join("conf").join("spindle.yaml")
    }

    fn parse(&self, lines: &[&str]) -> Result<Config, ConfigErrors> {
        Config::parse(&lines.join("\n"), &self.source())
    }

    fn ok(&self, lines: &[&str]) -> Config {
        match self.parse(lines) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected errors:\n{errors}"),
        }
    }

    /// `(line, col, message)` of every error, after checking each names
    /// the source file.
    fn errors(&self, lines: &[&str]) -> Vec<(usize, usize, String)> {
        let errors = match self.parse(lines) {
            Ok(config) => panic!("expected errors, got {config:#?}"),
            Err(errors) => errors,
        };
        errors
            .0
            .into_iter()
            .map(|e| {
                assert_eq!(e.file, self.source());
                (e.line, e.col, e.message)
            })
            .collect()
    }

    /// Asserts there is exactly one error, at `line:col`, whose message
    /// contains `needle`.
    fn one_error(&self, lines: &[&str], line: usize, col: usize, needle: &str) {
        let errors = self.errors(lines);
        assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
        assert_at(&errors[0], line, col, needle);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn assert_at(error: &(usize, usize, String), line: usize, col: usize, needle: &str) {
    assert_eq!(
        (error.0, error.1),
        (line, col),
        "wrong position for {:?}",
        error.2
    );
    assert!(
        error.2.contains(needle),
        "message {:?} lacks {needle:?}",
        error.2
    );
}

/// Two valid functions on lines 1-5; chains start on line 7.
fn with_chains<'a>(chains: &[&'a str]) -> Vec<&'a str> {
    let mut lines = vec![
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "  - name: b",
        "    module: ../mods/b.wasm",
        "chains:",
    ];
    lines.extend_from_slice(chains);
    lines
}

/// Functions from line 2 on, then one valid chain using `a`.
fn with_functions<'a>(functions: &[&'a str]) -> Vec<&'a str> {
    let mut lines = vec!["functions:"];
    lines.extend_from_slice(functions);
    lines.extend_from_slice(&["chains:", "  - name: c", "    route: /c", "    steps: [a]"]);
    lines
}

#[test]
fn full_config_round_trip() {
    let s = Scratch::new();
    let absolute = s.dir.join("mods").join("c.wasm");
    let absolute_line = format!("    module: {}", absolute.display());
    let config = s.ok(&[
        "# the whole format",
        "listen: 127.0.0.1:8080",
        "functions:",
        "  - name: upper",
        "    module: ../mods/a.wasm",
        "    instances: 4",
        "    memory: 128MiB",
        "    timeout_ms: 250",
        "    fuel: 5_000",
        "    mode: command",
        "    env: { GREETING: hello, LEVEL: \"3\" }",
        "  - name: plain-2",
        "    module: local.wasm",
        "  - name: no_fuel",
        &absolute_line,
        "    fuel: none",
        "    memory: 65536",
        "    mode: reactor",
        "chains:",
        "  - name: hello",
        "    route: /hello",
        "    steps: [upper, plain-2]",
        "    timeout_ms: 750",
        "    content_type: text/plain; charset=utf-8",
        "    arena: { slot_size: 4KiB, slots: 8 }",
        "  - name: shop",
        "    route: /shop/cart",
        "    entry: plain-2",
        "    functions: [upper, plain-2, no_fuel]",
        "    max_hops: 5",
        "  - name: defaults",
        "    route: /",
        "    entry: no_fuel",
        "    functions:",
        "      - no_fuel",
    ]);

    assert_eq!(config.source, s.source());
    assert_eq!(config.listen, Some("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(
        config.functions,
        vec![
            FunctionSpec {
                name: "upper".into(),
                module: s.dir.join("conf").join("../mods/a.wasm"),
                instances: Instances::fixed(4),
                wait_queue: 256,
                memory_limit: 128 * 1024 * 1024,
                timeout: Duration::from_millis(250),
                fuel: Some(5000),
                mode: ModuleMode::Command,
                env: vec![
                    ("GREETING".into(), "hello".into()),
                    ("LEVEL".into(), "3".into())
                ],
                start: StartMode::Exec,
                isolation: Isolation::Reuse,
                idle_spin: std::time::Duration::ZERO,
                args: Vec::new(),
                files: Vec::new(),
            },
            FunctionSpec {
                name: "plain-2".into(),
                module: s.dir.join("conf").join("local.wasm"),
                instances: Instances::fixed(1),
                wait_queue: 256,
                memory_limit: 64 * 1024 * 1024,
                timeout: Duration::from_millis(1000),
                fuel: Some(1_000_000_000),
                mode: ModuleMode::Reactor,
                env: vec![],
                start: StartMode::Fork,
                isolation: Isolation::Reuse,
                idle_spin: std::time::Duration::ZERO,
                args: Vec::new(),
                files: Vec::new(),
            },
            FunctionSpec {
                name: "no_fuel".into(),
                module: absolute,
                instances: Instances::fixed(1),
                wait_queue: 256,
                memory_limit: 65536,
                timeout: Duration::from_millis(1000),
                fuel: None,
                mode: ModuleMode::Reactor,
                env: vec![],
                start: StartMode::Fork,
                isolation: Isolation::Reuse,
                idle_spin: std::time::Duration::ZERO,
                args: Vec::new(),
                files: Vec::new(),
            },
        ]
    );
    assert!(config.functions.iter().all(|f| f.module.is_file()));
    assert_eq!(
        config.chains,
        vec![
            ChainSpec {
                name: "hello".into(),
                route: "/hello".into(),
                routing: Routing::Static {
                    steps: vec!["upper".into(), "plain-2".into()]
                },
                timeout: Duration::from_millis(750),
                content_type: "text/plain; charset=utf-8".into(),
                slot_size: 4096,
                slots: 8,
                large: None,
            },
            ChainSpec {
                name: "shop".into(),
                route: "/shop/cart".into(),
                routing: Routing::Dynamic {
                    entry: "plain-2".into(),
                    functions: vec!["upper".into(), "plain-2".into(), "no_fuel".into()],
                    max_hops: 5,
                },
                timeout: Duration::from_millis(5000),
                content_type: "application/octet-stream".into(),
                slot_size: 65536,
                slots: 1024,
                large: None,
            },
            ChainSpec {
                name: "defaults".into(),
                route: "/".into(),
                routing: Routing::Dynamic {
                    entry: "no_fuel".into(),
                    functions: vec!["no_fuel".into()],
                    max_hops: 16,
                },
                timeout: Duration::from_millis(5000),
                content_type: "application/octet-stream".into(),
                slot_size: 65536,
                slots: 1024,
                large: None,
            },
        ]
    );

    assert_eq!(config.function("no_fuel").unwrap().fuel, None);
    assert!(config.function("missing").is_none());
    assert_eq!(config.chains[0].functions(), ["upper", "plain-2"]);
    // The entry comes first even when listed later.
    assert_eq!(
        config.chains[1].functions(),
        ["plain-2", "upper", "no_fuel"]
    );
    assert_eq!(config.chains[2].functions(), ["no_fuel"]);
}

#[test]
fn minimal_config_gets_defaults() {
    let s = Scratch::new();
    let config = s.ok(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [b, a]",
    ]));
    assert_eq!(config.listen, None);
    let a = config.function("a").unwrap();
    assert_eq!(a.instances, Instances::fixed(1));
    assert_eq!(a.wait_queue, 256);
    assert_eq!(a.memory_limit, 64 << 20);
    assert_eq!(a.timeout, Duration::from_secs(1));
    assert_eq!(a.fuel, Some(1_000_000_000));
    assert_eq!(a.mode, ModuleMode::Reactor);
    assert!(a.env.is_empty());
    let c = &config.chains[0];
    assert_eq!(c.timeout, Duration::from_secs(5));
    assert_eq!(c.content_type, "application/octet-stream");
    assert_eq!((c.slot_size, c.slots), (64 * 1024, 1024));
    assert_eq!(c.functions(), ["b", "a"]);
}

#[test]
fn load_reads_the_file_and_resolves_modules_next_to_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let config = Config::load(&dir.join("valid.yaml")).unwrap();
    assert_eq!(config.source, dir.join("valid.yaml"));
    assert_eq!(
        config.function("echo").unwrap().module,
        dir.join("modules/echo.wasm")
    );
    assert_eq!(config.function("upper").unwrap().memory_limit, 1 << 30);
    assert_eq!(
        config.function("upper").unwrap().instances,
        Instances::fixed(2)
    );
    assert_eq!(config.chains[0].functions(), ["upper", "echo"]);
}

#[test]
fn load_reports_every_error_in_the_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/broken.yaml");
    let errors = Config::load(&path).unwrap_err();
    let positions: Vec<_> = errors.0.iter().map(|e| (e.line, e.col)).collect();
    assert_eq!(positions, [(4, 13), (7, 12), (8, 19)], "{errors}");
    assert!(errors.0.iter().all(|e| e.file == path));
    let shown = errors.to_string();
    let first = format!("{}:4:13: module file not found: ", path.display());
    assert!(shown.starts_with(&first), "{shown}");
    assert_eq!(shown.lines().count(), 3);
}

#[test]
fn unreadable_file() {
    let s = Scratch::new();
    let path = s.dir.join("absent.yaml");
    let errors = Config::load(&path).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let e = &errors.0[0];
    assert_eq!((e.file.as_path(), e.line, e.col), (path.as_path(), 1, 1));
    assert!(
        e.message.starts_with("cannot read configuration file"),
        "{}",
        e.message
    );
    // A directory cannot be read as a file either.
    let errors = Config::load(&s.dir).unwrap_err();
    assert_eq!((errors.0[0].line, errors.0[0].col), (1, 1));
}

#[test]
fn empty_file() {
    let s = Scratch::new();
    s.one_error(&[""], 1, 1, "configuration file is empty");
    s.one_error(
        &["# nothing but a comment", ""],
        1,
        1,
        "configuration file is empty",
    );
    s.one_error(&["---", "..."], 1, 1, "configuration file is empty");
}

#[test]
fn missing_module_file_points_at_module_value() {
    let s = Scratch::new();
    s.one_error(
        &with_functions(&["  - name: a", "    module: ../mods/nope.wasm"]),
        3,
        13,
        "module file not found",
    );
    // Quoted: the value starts at the quote.
    s.one_error(
        &with_functions(&["  - name: a", "    module:   \"nope.wasm\""]),
        3,
        15,
        "nope.wasm",
    );
    s.one_error(
        &with_functions(&["  - name: a", "    module: ../mods"]),
        3,
        13,
        "is not a file",
    );
    s.one_error(
        &with_functions(&["  - {name: a}"]),
        2,
        5,
        "function `a` is missing required key `module`",
    );
}

#[test]
fn duplicate_function_name() {
    let s = Scratch::new();
    s.one_error(
        &with_functions(&[
            "  - name: a",
            "    module: ../mods/a.wasm",
            "  - name: b",
            "    module: ../mods/b.wasm",
            "  - module: ../mods/c.wasm",
            "    name: a",
        ]),
        7,
        11,
        "duplicate function name `a` (first defined at line 2)",
    );
}

#[test]
fn duplicate_chain_name_and_route() {
    let s = Scratch::new();
    let errors = s.errors(&with_chains(&[
        "  - name: one",
        "    route: /same",
        "    steps: [a]",
        "  - name: two",
        "    route: /same",
        "    steps: [b]",
        "  - name: one",
        "    route: /other",
        "    steps: [a]",
    ]));
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_at(
        &errors[0],
        11,
        12,
        "duplicate route `/same` (first used at line 8)",
    );
    assert_at(
        &errors[1],
        13,
        11,
        "duplicate chain name `one` (first defined at line 7)",
    );
}

#[test]
fn unknown_functions_in_chains() {
    let s = Scratch::new();
    let errors = s.errors(&with_chains(&[
        "  - name: fixed",
        "    route: /fixed",
        "    steps: [a, bb, zzz]",
        "  - name: routed",
        "    route: /routed",
        "    entry: q",
        "    functions: [a, q, b]",
    ]));
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert_at(
        &errors[0],
        9,
        16,
        "unknown function `bb` in chain `fixed`; did you mean `b`?",
    );
    assert_at(
        &errors[1],
        9,
        20,
        "unknown function `zzz` in chain `fixed`; no function",
    );
    assert_at(&errors[2], 12, 12, "unknown function `q` in chain `routed`");
    assert_at(&errors[3], 13, 20, "unknown function `q` in chain `routed`");

    // A known entry must still be one of the chain's functions.
    s.one_error(
        &with_chains(&[
            "  - name: routed",
            "    route: /routed",
            "    entry: b",
            "    functions: [a]",
        ]),
        9,
        12,
        "entry `b` is not listed in the `functions` of chain `routed`",
    );
    s.one_error(
        &with_chains(&[
            "  - name: routed",
            "    route: /routed",
            "    entry: a",
            "    functions: [a, b, a]",
        ]),
        10,
        23,
        "function `a` is listed twice in chain `routed` (first at line 10)",
    );
}

#[test]
fn repeated_step_is_a_cycle() {
    let s = Scratch::new();
    s.one_error(
        &with_chains(&[
            "  - name: loop",
            "    route: /loop",
            "    steps:",
            "      - a",
            "      - b",
            "      - a",
        ]),
        12,
        9,
        "function `a` appears twice in chain `loop` (first as step 1 at line 10)",
    );
}

#[test]
fn step_count_limits() {
    let s = Scratch::new();
    s.one_error(
        &with_chains(&["  - name: c", "    route: /c", "    steps: []"]),
        9,
        12,
        "`steps` must list at least one step",
    );
    // 33 distinct (unknown) names would each be reported, so check the
    // limit with the function section missing, where names go unchecked.
    let names: Vec<String> = (0..33).map(|i| format!("f{i}")).collect();
    let steps = format!("    steps: [{}]", names.join(", "));
    let errors = s.errors(&["chains:", "  - name: c", "    route: /c", &steps]);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_at(&errors[0], 1, 1, "missing required key `functions`");
    // `f32` is the 33rd step: the list starts in column 13, and the 32
    // names before it take 4 (`f0, `) or 5 (`f10, `) columns each.
    assert_at(
        &errors[1],
        4,
        13 + 10 * 4 + 22 * 5,
        "has 33 steps; at most 32",
    );
}

#[test]
fn listen_address() {
    let s = Scratch::new();
    let mut lines = vec!["listen: localhost:8080"];
    lines.extend(with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
    ]));
    s.one_error(&lines, 1, 9, "invalid listen address `localhost:8080`");
    lines[0] = "listen: 8080";
    s.one_error(&lines, 1, 9, "`listen` must be an IP address and port");
    lines[0] = "listen: 127.0.0.1";
    s.one_error(&lines, 1, 9, "invalid listen address");
    lines[0] = "listen: '[::1]:9000'";
    assert_eq!(s.ok(&lines).listen, Some("[::1]:9000".parse().unwrap()));
}

#[test]
fn chain_count_is_bounded() {
    let s = Scratch::new();
    let owned: Vec<String> = (0..=MAX_CHAINS)
        .map(|i| format!("  - {{ name: c{i}, route: /c{i}, steps: [a] }}"))
        .collect();
    let chains: Vec<&str> = owned.iter().map(String::as_str).collect();
    let errors = s.errors(&with_chains(&chains));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!((errors[0].0, errors[0].1), (7, 3));
    assert!(errors[0].2.contains("at most 1024"), "{errors:?}");
}

#[test]
fn dataplane_mode() {
    let s = Scratch::new();
    let mut lines = vec!["dataplane: sockmap"];
    lines.extend(with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
    ]));
    assert_eq!(s.ok(&lines).dataplane, DataplaneMode::Sockmap);
    lines[0] = "dataplane: userspace";
    assert_eq!(s.ok(&lines).dataplane, DataplaneMode::Userspace);
    lines[0] = "dataplane: kernel";
    s.one_error(&lines, 1, 12, "unknown dataplane `kernel`");
    assert_eq!(s.ok(&lines[1..]).dataplane, DataplaneMode::Auto);
}

#[test]
fn out_of_range_numbers() {
    let s = Scratch::new();
    let errors = s.errors(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    instances: 0",
        "    memory: 32KiB",
        "    timeout_ms: 0",
        "    fuel: 0",
        "  - name: b",
        "    module: ../mods/b.wasm",
        "    instances: 65",
        "    memory: 5GiB",
        "    timeout_ms: 86400001",
        "  - name: c",
        "    module: ../mods/c.wasm",
        "    memory: 100000",
        "chains:",
        "  - name: c",
        "    route: /c",
        "    entry: a",
        "    functions: [a]",
        "    max_hops: 256",
        "    timeout_ms: -1",
        "    arena: {slot_size: 100, slots: 0}",
        "  - name: d",
        "    route: /d",
        "    entry: a",
        "    functions: [a]",
        "    max_hops: 0",
        "    arena:",
        "      slot_size: 128MiB",
        "      slots: 65537",
    ]);
    let expected = [
        (4, 16, "`instances` must be between 1 and 64, got 0"),
        (
            5,
            13,
            "`memory` must be between 64KiB and 4GiB, got 32768 bytes",
        ),
        (6, 17, "`timeout_ms` must be between 1 and 86400000, got 0"),
        (7, 11, "`fuel` must be at least 1, got 0"),
        (10, 16, "got 65"),
        (11, 13, "got 5368709120 bytes"),
        (12, 17, "got 86400001"),
        (15, 13, "`memory` must be a multiple of 64KiB"),
        (21, 15, "`max_hops` must be between 1 and 255, got 256"),
        (22, 17, "got -1"),
        (
            23,
            24,
            "`slot_size` must be a multiple of 64 between 64 and 64MiB, got 100",
        ),
        (23, 36, "`slots` must be between 1 and 65536, got 0"),
        (28, 15, "`max_hops` must be between 1 and 255, got 0"),
        (30, 18, "got 134217728 bytes"),
        (31, 14, "got 65537"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, (line, col, needle)) in errors.iter().zip(expected) {
        assert_at(error, line, col, needle);
    }
}

#[test]
fn boundary_values_are_accepted() {
    let s = Scratch::new();
    let config = s.ok(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    instances: 64",
        "    memory: 4GiB",
        "    timeout_ms: 86_400_000",
        "    fuel: 1",
        "  - name: b",
        "    module: ../mods/b.wasm",
        "    memory: 64KiB",
        "    instances: 1",
        "chains:",
        "  - name: c",
        "    route: /c",
        "    entry: a",
        "    functions: [a, b]",
        "    max_hops: 255",
        "    arena: {slot_size: 64MiB, slots: 65536}",
        "  - name: d",
        "    route: /d",
        "    steps: [b]",
        "    timeout_ms: 1",
    ]);
    let a = config.function("a").unwrap();
    assert_eq!(
        (a.instances, a.memory_limit, a.fuel),
        (Instances::fixed(64), 4 << 30, Some(1))
    );
    assert_eq!(a.timeout, Duration::from_secs(86_400));
    assert_eq!(config.function("b").unwrap().memory_limit, 64 * 1024);
    let c = &config.chains[0];
    assert_eq!((c.slot_size, c.slots), (64 << 20, 65536));
    assert!(matches!(c.routing, Routing::Dynamic { max_hops: 255, .. }));
    assert_eq!(config.chains[1].timeout, Duration::from_millis(1));
}

#[test]
fn wrong_types() {
    let s = Scratch::new();
    let errors = s.errors(&[
        "functions:",
        "  - name: [a]",
        "    module: ../mods/a.wasm",
        "    instances: two",
        "    timeout_ms: 1.5",
        "    fuel: lots",
        "    memory: true",
        "    mode: 1",
        "    env: { N: 5, OK: fine, E: }",
        "  - just-a-name",
        "chains:",
        "  - name: c",
        "    route: /c",
        "    steps: a",
        "    content_type: 7",
        "  - name: d",
        "    route: /d",
        "    entry: a",
        "    functions: {a: 1}",
        "    arena: 64KiB",
    ]);
    let expected = [
        (2, 11, "`name` must be a string, found a list"),
        (4, 16, "`instances` must be an integer, found string `two`"),
        (5, 17, "`timeout_ms` must be an integer, found number `1.5`"),
        (
            6,
            11,
            "`fuel` must be a positive instruction count or `none`, found string `lots`",
        ),
        (
            7,
            13,
            "`memory` must be a size such as 64MiB or a number of bytes, found boolean `true`",
        ),
        (8, 11, "`mode` must be a string, found integer `1`"),
        (
            9,
            15,
            "environment variable `N` must be a string, found integer `5` (quote it)",
        ),
        // An empty value sits right after its key's colon.
        (
            9,
            29,
            "environment variable `E` must be a string, found null",
        ),
        (
            10,
            5,
            "a function must be a mapping, found string `just-a-name`",
        ),
        (14, 12, "`steps` must be a list, found string `a`"),
        (15, 19, "`content_type` must be a string, found integer `7`"),
        // The function whose name was unusable never defined `a`.
        (18, 12, "unknown function `a` in chain `d`"),
        (19, 16, "`functions` must be a list, found a mapping"),
        (20, 12, "`arena` must be a mapping, found string `64KiB`"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, (line, col, needle)) in errors.iter().zip(expected) {
        assert_at(error, line, col, needle);
    }
}

#[test]
fn unknown_keys() {
    let s = Scratch::new();
    let errors = s.errors(&[
        "listen: 127.0.0.1:1",
        "function:",
        "  - name: x",
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    instance: 2",
        "    colour: blue",
        "chains:",
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
        "    arena: { slot_size: 64, slot: 4 }",
        "    timeout: 5",
        "    1: one",
    ]);
    let expected = [
        (
            2,
            1,
            "unknown key `function` in the configuration; did you mean `functions`?",
        ),
        (
            7,
            5,
            "unknown key `instance` in a function; did you mean `instances`?",
        ),
        (
            8,
            5,
            "unknown key `colour` in a function; expected one of: name, module, instances",
        ),
        (
            13,
            29,
            "unknown key `slot` in `arena`; did you mean `slots`?",
        ),
        (
            14,
            5,
            "unknown key `timeout` in a chain; did you mean `timeout_ms`?",
        ),
        (15, 5, "keys in a chain must be strings, found integer `1`"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, (line, col, needle)) in errors.iter().zip(expected) {
        assert_at(error, line, col, needle);
    }
}

#[test]
fn static_or_dynamic_but_not_both() {
    let s = Scratch::new();
    s.one_error(
        &with_chains(&[
            "  - name: c",
            "    route: /c",
            "    steps: [a]",
            "    functions: [a, b]",
            "    entry: a",
        ]),
        10,
        5,
        "chain `c` has both `steps` and `entry`/`functions`",
    );
    s.one_error(
        &with_chains(&["  - name: c", "    route: /c", "    timeout_ms: 10"]),
        7,
        5,
        "chain `c` needs either `steps` (static) or `entry` + `functions` (dynamic)",
    );
    s.one_error(
        &with_chains(&["  - name: c", "    route: /c", "    entry: a"]),
        7,
        5,
        "dynamic chain `c` is missing required key `functions`",
    );
    s.one_error(
        &with_chains(&["  - route: /c", "    functions: [a]", "    name: c"]),
        7,
        5,
        "dynamic chain `c` is missing required key `entry`",
    );
    s.one_error(
        &with_chains(&[
            "  - name: c",
            "    route: /c",
            "    steps: [a]",
            "    max_hops: 2",
        ]),
        10,
        5,
        "`max_hops` only applies to dynamic chains",
    );
    // Even in conflict, the names in both forms are checked.
    let errors = s.errors(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    entry: x",
        "    steps: [y]",
    ]));
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert_at(&errors[0], 9, 5, "has both");
    assert_at(&errors[1], 9, 12, "unknown function `x`");
    assert_at(&errors[2], 10, 13, "unknown function `y`");
}

#[test]
fn names_routes_and_content_types() {
    let s = Scratch::new();
    let errors = s.errors(&[
        "functions:",
        "  - name: Upper",
        "    module: ../mods/a.wasm",
        "  - name: ''",
        "    module: ../mods/b.wasm",
        "chains:",
        "  - name: has space",
        "    route: hello",
        "    steps: [Upper]",
        "  - name: c2",
        "    route: /healthz",
        "    steps: [Upper]",
        "  - name: c3",
        "    route: /a b",
        "    steps: [Upper]",
        "    content_type: plain",
    ]);
    let expected = [
        (
            2,
            11,
            "invalid function name `Upper`: use only lowercase letters",
        ),
        (4, 11, "function name must not be empty"),
        (7, 11, "invalid chain name `has space`"),
        (8, 12, "route `hello` must start with `/`"),
        (11, 12, "route `/healthz` is reserved"),
        (14, 12, "route `/a b` contains ' '"),
        (16, 19, "invalid content_type `plain`"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, (line, col, needle)) in errors.iter().zip(expected) {
        assert_at(error, line, col, needle);
    }
}

#[test]
fn missing_and_empty_sections() {
    let s = Scratch::new();
    let errors = s.errors(&["listen: 127.0.0.1:1"]);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_at(&errors[0], 1, 1, "missing required key `functions`");
    assert_at(&errors[1], 1, 1, "missing required key `chains`");
    let errors = s.errors(&[
        "functions: []",
        "chains:",
        "  - name: c",
        "    route: /c",
        "    steps: [zzz]",
    ]);
    // No unknown-function noise once the function list itself is unusable.
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_at(
        &errors[0],
        1,
        12,
        "`functions` must list at least one function",
    );
    let errors = s.errors(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "chains: []",
    ]);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_at(&errors[0], 4, 9, "`chains` must list at least one chain");
    let errors = s.errors(&["functions:", "chains:"]);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    // An absent value is placed at its key's colon.
    assert_at(&errors[0], 1, 10, "`functions` must be a list, found null");
    assert_at(&errors[1], 2, 7, "`chains` must be a list, found null");
    s.one_error(
        &["- just", "- a list"],
        1,
        1,
        "the configuration must be a mapping",
    );
    let errors = s.errors(&["listen: 127.0.0.1:1", "---", "listen: 127.0.0.1:2"]);
    assert_at(&errors[0], 1, 1, "missing required key `functions`");
    assert!(
        errors
            .iter()
            .any(|e| e.0 == 3 && e.2.contains("single YAML document")),
        "{errors:#?}"
    );
}

#[test]
fn all_errors_are_reported_together_in_file_order() {
    let s = Scratch::new();
    let errors = s.errors(&[
        "listen: nowhere",
        "functions:",
        "  - name: a",
        "    module: ../mods/gone.wasm",
        "    memory: 12 parsecs",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "chains:",
        "  - name: c",
        "    route: /metrics",
        "    steps: [a, ghost, a]",
        "    bogus: 1",
    ]);
    let positions: Vec<_> = errors.iter().map(|e| (e.0, e.1)).collect();
    assert_eq!(
        positions,
        [
            (1, 9),
            (4, 13),
            (5, 13),
            (6, 11),
            (10, 12),
            (11, 16),
            (11, 23),
            (12, 5)
        ],
        "{errors:#?}"
    );

    let shown = s
        .parse(&["listen: nowhere", "functions: 3"])
        .unwrap_err()
        .to_string();
    let file = s.source().display().to_string();
    assert_eq!(
        shown,
        format!(
            "{file}:1:1: missing required key `chains`\n\
             {file}:1:9: invalid listen address `nowhere`: expected an IP address and port \
             such as 127.0.0.1:8080 (host names are not resolved)\n\
             {file}:2:12: `functions` must be a list, found integer `3`"
        )
    );
}

#[test]
fn malformed_yaml_reports_position() {
    let s = Scratch::new();
    // Unclosed flow sequence: noticed where the next key begins.
    s.one_error(
        &[
            "functions:",
            "  - name: a",
            "    module: [x, y",
            "chains: []",
        ],
        4,
        7,
        "YAML syntax error",
    );
    // `module` is indented less than its sibling `name`.
    s.one_error(
        &["functions:", "  - name: a", "   module: x", "chains: []"],
        3,
        4,
        "YAML syntax error",
    );
    s.one_error(&["listen: \"127.0.0.1:80"], 1, 9, "quoted scalar");
    // Duplicate keys are rejected by the parser, at the second one.
    s.one_error(
        &["functions: []", "chains: []", "functions: []"],
        3,
        1,
        "duplicated key",
    );
}

#[test]
fn tags_and_anchors_are_transparent() {
    let s = Scratch::new();
    let config = s.ok(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    memory: &mem 1MiB",
        "  - name: b",
        "    module: !path ../mods/b.wasm",
        "    memory: *mem",
        "chains:",
        "  - name: c",
        "    route: /c",
        "    steps: !!seq [a, b]",
    ]);
    assert_eq!(config.function("b").unwrap().memory_limit, 1 << 20);
    assert_eq!(config.chains[0].functions(), ["a", "b"]);
}

#[test]
fn size_parser() {
    let ok = [
        ("0", 0),
        ("65536", 65536),
        ("1_048_576", 1 << 20),
        ("64B", 64),
        ("64KiB", 64 << 10),
        ("64MiB", 64 << 20),
        ("4GiB", 4 << 30),
        ("64 MiB", 64 << 20),
        ("  2GiB ", 2 << 30),
        ("18446744073709551615", u64::MAX),
        ("17179869183GiB", 17179869183 << 30),
    ];
    for (text, bytes) in ok {
        assert_eq!(parse_size(text), Ok(bytes), "{text:?}");
    }
    let bad = [
        ("", "not a size"),
        ("MiB", "not a size"),
        ("-1MiB", "not a size"),
        ("1.5MiB", "not a whole number"),
        ("64MB", "unknown size unit `MB`"),
        ("64mib", "unknown size unit `mib`"),
        ("64 K", "unknown size unit `K`"),
        ("64TiB", "unknown size unit `TiB`"),
        ("64MiB extra", "unknown size unit `MiB extra`"),
        ("1_", "not a whole number"),
        ("1__0", "not a whole number"),
        ("18446744073709551616", "too large"),
        ("17179869184GiB", "too large"),
    ];
    for (text, needle) in bad {
        let err = parse_size(text).expect_err(text);
        assert!(err.contains(needle), "{text:?}: {err}");
    }
}

#[test]
fn memory_accepts_sizes_and_plain_bytes() {
    let s = Scratch::new();
    for (written, bytes) in [
        ("64MiB", 64 << 20),
        ("131072", 128 << 10),
        ("'1 GiB'", 1 << 30),
    ] {
        let memory = format!("    memory: {written}");
        let config = s.ok(&with_functions(&[
            "  - name: a",
            "    module: ../mods/a.wasm",
            &memory,
        ]));
        assert_eq!(config.functions[0].memory_limit, bytes, "{written}");
    }
    s.one_error(
        &with_functions(&[
            "  - name: a",
            "    module: ../mods/a.wasm",
            "    memory: 64MB",
        ]),
        4,
        13,
        "invalid `memory`: unknown size unit `MB` in `64MB`: use B, KiB, MiB or GiB",
    );
    s.one_error(
        &with_functions(&[
            "  - name: a",
            "    module: ../mods/a.wasm",
            "    memory: -65536",
        ]),
        4,
        13,
        "a size cannot be negative",
    );
}

#[test]
fn typo_suggestions_stay_plausible() {
    let names = ["instances", "module", "name"];
    assert_eq!(closest("instance", names.into_iter()), Some("instances"));
    assert_eq!(closest("modul", names.into_iter()), Some("module"));
    assert_eq!(closest("colour", names.into_iter()), None);
    assert_eq!(closest("z", ["a", "b"].into_iter()), None);
    assert_eq!(closest("bb", ["a", "b"].into_iter()), Some("b"));
    assert_eq!(
        closest("timeout", ["timeout_ms"].into_iter()),
        Some("timeout_ms")
    );
    assert_eq!(
        closest("slot", ["slot_size", "slots"].into_iter()),
        Some("slots")
    );
    assert_eq!(closest("B", ["a", "b"].into_iter()), Some("b"));
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("", "abc"), 3);
}

/// A config of one function `a` with `extra` lines under it, in one chain.
fn one_function_with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut lines = vec!["functions:", "  - name: a", "    module: ../mods/a.wasm"];
    lines.extend_from_slice(extra);
    lines.extend_from_slice(&["chains:", "  - name: c", "    route: /c", "    steps: [a]"]);
    lines
}

#[test]
fn start_mode_defaults_to_fork_for_reactors_and_is_checked() {
    let s = Scratch::new();
    let with = one_function_with;
    assert_eq!(s.ok(&with(&[])).functions[0].start, StartMode::Fork);
    assert_eq!(
        s.ok(&with(&["    start: exec"])).functions[0].start,
        StartMode::Exec
    );
    assert_eq!(
        s.ok(&with(&["    mode: command"])).functions[0].start,
        StartMode::Exec
    );
    s.one_error(
        &with(&["    start: clone"]),
        4,
        12,
        "unknown start `clone`: expected `fork` or `exec`",
    );
    s.one_error(
        &with(&["    mode: command", "    start: fork"]),
        5,
        12,
        "`start: fork` needs `mode: reactor`",
    );
    s.one_error(
        &with(&["    start: 1"]),
        4,
        12,
        "`start` must be a string, found integer `1`",
    );
}

#[test]
fn http_limits_have_defaults_and_are_checked() {
    let s = Scratch::new();
    let base = [
        "functions:",
        "  - { name: a, module: ../mods/a.wasm }",
        "chains:",
        "  - { name: c, route: /c, steps: [a] }",
    ];
    let config = s.ok(&base);
    assert_eq!(config.http, HttpSpec::default());
    assert_eq!(config.http.max_connections, 4096);
    assert_eq!(config.http.idle_timeout, Duration::from_secs(60));
    let mut lines = vec!["http: { max_connections: 8, idle_timeout_ms: 250 }"];
    lines.extend(base);
    let config = s.ok(&lines);
    assert_eq!(
        config.http,
        HttpSpec {
            max_connections: 8,
            idle_timeout: Duration::from_millis(250),
            shards: Shards::Fixed(1),
        }
    );
    for (text, shards) in [("3", Shards::Fixed(3)), ("auto", Shards::PerCpu)] {
        let line = format!("http: {{ shards: {text} }}");
        let mut lines = vec![line.as_str()];
        lines.extend(base);
        assert_eq!(s.ok(&lines).http.shards, shards);
    }
    assert_eq!(Shards::PerCpu.count(6), 6);
    assert_eq!(Shards::PerCpu.count(0), 1);
    assert_eq!(Shards::Fixed(3).count(6), 3);
    for (text, message) in [
        ("0", "`http.shards` must be between 1 and 64, got 0"),
        ("65", "`http.shards` must be between 1 and 64, got 65"),
        ("many", "`http.shards` must be an integer"),
    ] {
        let line = format!("http: {{ shards: {text} }}");
        let mut lines = vec![line.as_str()];
        lines.extend(base);
        let errors = s.errors(&lines);
        assert!(
            errors
                .iter()
                .any(|(l, c, m)| (*l, *c) == (1, 17) && m.contains(message)),
            "{text}: {errors:?}"
        );
    }
    let mut lines = vec!["http: { max_connections: 0, idle: 5 }"];
    lines.extend(base);
    let errors = s.errors(&lines);
    assert!(
        errors.contains(&(
            1,
            26,
            "`http.max_connections` must be between 1 and 1000000, got 0".to_string()
        )),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|(l, c, m)| (*l, *c) == (1, 29) && m.contains("unknown key `idle` in `http`")),
        "{errors:?}"
    );
}

#[test]
fn instances_as_a_mapping_is_autoscaled_with_documented_defaults() {
    let s = Scratch::new();
    let config = s.ok(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    instances: { max: 8 }",
        "  - name: b",
        "    module: ../mods/b.wasm",
        "    wait_queue: 0",
        "    instances:",
        "      min: 2",
        "      max: 64",
        "      target: 4",
        "      stable_window_ms: 1_000",
        "      panic_window_ms: 1000",
        "      scale_down_delay_ms: 1",
        "      utilization_percent: 100",
        "      concurrency: 2",
        "chains:",
        "  - { name: c, route: /c, steps: [a, b] }",
    ]);
    let a = config.function("a").unwrap();
    assert_eq!(
        a.instances,
        Instances {
            min: 0,
            max: 8,
            autoscale: Some(Autoscale {
                target: 1,
                stable_window: Duration::from_secs(6),
                panic_window: Duration::from_millis(600),
                scale_down_delay: Duration::from_secs(2),
                utilization_percent: 70,
                concurrency: 4,
            }),
        }
    );
    let b = config.function("b").unwrap();
    assert_eq!(b.wait_queue, 0);
    assert_eq!(
        b.instances,
        Instances {
            min: 2,
            max: 64,
            autoscale: Some(Autoscale {
                target: 4,
                stable_window: Duration::from_secs(1),
                panic_window: Duration::from_secs(1),
                scale_down_delay: Duration::from_millis(1),
                utilization_percent: 100,
                concurrency: 2,
            }),
        }
    );
}

#[test]
fn bad_autoscaling_is_reported_where_it_is_written() {
    let s = Scratch::new();
    let errors = s.errors(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    instances: { min: 1 }",
        "  - name: b",
        "    module: ../mods/b.wasm",
        "    instances: { min: 5, max: 4 }",
        "  - name: c",
        "    module: ../mods/a.wasm",
        "    instances: { max: 4, stable_window_ms: 100, panic_window_ms: 200 }",
        "  - name: d",
        "    module: ../mods/a.wasm",
        "    instances: { max: 4, targt: 2 }",
        "  - name: e",
        "    module: ../mods/a.wasm",
        "    instances: { max: 65, target: 0 }",
        "    wait_queue: -1",
        "  - name: f",
        "    module: ../mods/a.wasm",
        "    instances: { max: 2 }",
        "    wait_queue: 0",
        "chains:",
        "  - { name: x, route: /x, steps: [a, b, c, d, e, f] }",
    ]);
    let expected = [
        (
            4,
            16,
            "`instances` as a mapping needs `max`, the most instances the autoscaler may run",
        ),
        (7, 23, "`instances.min` must be between 0 and 4, got 5"),
        (
            10,
            66,
            "`instances.panic_window_ms` must be between 1 and 100, got 200",
        ),
        (
            13,
            26,
            "unknown key `targt` in `instances`; did you mean `target`?",
        ),
        (16, 23, "`instances.max` must be between 1 and 64, got 65"),
        (17, 17, "`wait_queue` must be between 0 and 65536, got -1"),
        (
            21,
            17,
            "`wait_queue: 0` cannot go with `instances.min: 0`: at zero instances every \
             request would be refused and none would wait to bring an instance up",
        ),
    ];
    for (line, col, message) in expected {
        assert!(
            errors
                .iter()
                .any(|(l, c, m)| (*l, *c, m.as_str()) == (line, col, message)),
            "missing {line}:{col} {message} in {errors:#?}"
        );
    }
}

#[test]
fn isolation_defaults_to_reuse_and_fresh_per_request_needs_a_reactor() {
    let s = Scratch::new();
    let with = one_function_with;
    assert_eq!(s.ok(&with(&[])).functions[0].isolation, Isolation::Reuse);
    assert_eq!(
        s.ok(&with(&["    isolation: reuse"])).functions[0].isolation,
        Isolation::Reuse
    );
    for start in ["fork", "exec"] {
        let line = format!("    start: {start}");
        let config = s.ok(&with(&["    isolation: fresh_per_request", line.leak()]));
        assert_eq!(config.functions[0].isolation, Isolation::FreshPerRequest);
        assert_eq!(config.functions[0].start.label(), start);
    }
    assert_eq!(Isolation::FreshPerRequest.label(), "fresh_per_request");
    s.one_error(
        &with(&["    mode: command", "    isolation: fresh_per_request"]),
        5,
        16,
        "`isolation: fresh_per_request` needs `mode: reactor`",
    );
    s.one_error(
        &with(&["    isolation: fresh"]),
        4,
        16,
        "unknown isolation `fresh`: expected `reuse` or `fresh_per_request`",
    );
    s.one_error(
        &with(&["    isolation: true"]),
        4,
        16,
        "`isolation` must be a string, found",
    );
    // A misspelt key is refused like every other one.
    let errors = s.errors(&with(&["    isolaton: fresh_per_request"]));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].2.contains("isolation"), "{errors:?}");
}

#[test]
fn sandbox_is_on_by_default_gives_each_function_its_uid_and_is_checked() {
    let s = Scratch::new();
    let base = [
        "functions:",
        "  - { name: a, module: ../mods/a.wasm }",
        "  - { name: b, module: ../mods/a.wasm }",
        "chains:",
        "  - { name: c, route: /c, steps: [a, b] }",
    ];
    let config = s.ok(&base);
    assert_eq!(
        config.sandbox,
        SandboxSpec {
            enabled: true,
            uid_base: 200_000
        }
    );
    assert_eq!(config.function_uid("a"), Some(200_000));
    assert_eq!(config.function_uid("b"), Some(200_001));
    assert_eq!(config.function_uid("nope"), None);
    let mut lines = vec!["sandbox: { enabled: false, uid_base: 5000 }"];
    lines.extend(base);
    let config = s.ok(&lines);
    assert_eq!(
        config.sandbox,
        SandboxSpec {
            enabled: false,
            uid_base: 5000
        }
    );
    let mut lines = vec!["sandbox: { enabled: yes please, uid_base: 0, uid: 1 }"];
    lines.extend(base);
    let errors = s.errors(&lines);
    for (col, message) in [
        (
            21,
            "`sandbox.enabled` must be true or false, found string `yes please`",
        ),
        (
            43,
            "`sandbox.uid_base` must be between 1 and 4000000000, got 0",
        ),
    ] {
        assert!(
            errors.contains(&(1, col, message.to_string())),
            "{errors:?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|(l, _, m)| *l == 1 && m.contains("unknown key `uid` in `sandbox`")),
        "{errors:?}"
    );
}

#[test]
fn idle_spin_is_off_by_default_and_bounded() {
    let s = Scratch::new();
    let config = s.ok(&[
        "functions:",
        "  - { name: a, module: ../mods/a.wasm }",
        "  - { name: b, module: ../mods/b.wasm, idle_spin_us: 40 }",
        "chains:",
        "  - { name: c, route: /c, steps: [a, b] }",
    ]);
    assert_eq!(config.functions[0].idle_spin, DEFAULT_IDLE_SPIN);
    assert_eq!(config.functions[1].idle_spin, Duration::from_micros(40));
    let errors = s.errors(&[
        "functions:",
        "  - { name: a, module: ../mods/a.wasm, idle_spin_us: 5000 }",
        "chains:",
        "  - { name: c, route: /c, steps: [a] }",
    ]);
    assert!(
        errors.iter().any(|(l, _, m)| *l == 2
            && m.contains("`idle_spin_us` must be between 0 and 1000, got 5000")),
        "{errors:?}"
    );
}

#[test]
fn a_large_slot_class() {
    let s = Scratch::new();
    let config = s.ok(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
        "    arena: { slot_size: 64KiB, slots: 1024, large: { slot_size: 16MiB, slots: 8 } }",
    ]));
    let c = &config.chains[0];
    assert_eq!(
        c.large,
        Some(LargeSlots {
            slot_size: 16 << 20,
            slots: 8,
            above: 64 << 10,
        })
    );
    assert_eq!((c.total_slots(), c.max_payload()), (1032, 16 << 20));
    let headroom = s.ok(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
        "    arena: { slot_size: 64KiB, large: { slot_size: 1MiB, slots: 2, above: 8KiB } }",
    ]));
    assert_eq!(headroom.chains[0].large.map(|l| l.above), Some(8 << 10));
    let errors = s.errors(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
        "    arena: { slot_size: 64KiB, large: { slot_size: 1MiB, slots: 2, above: 128KiB } }",
    ]));
    assert!(
        errors
            .iter()
            .any(|(_, _, m)| m.contains("`large.above` must be at most the chain's slot_size")),
        "{errors:?}"
    );
    let plain = s.ok(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
    ]));
    assert_eq!(plain.chains[0].large, None);
    assert_eq!(plain.chains[0].max_payload(), 64 * 1024);
}

#[test]
fn large_slot_class_errors_point_at_the_value() {
    let s = Scratch::new();
    let errors = s.errors(&with_chains(&[
        "  - name: c",
        "    route: /c",
        "    steps: [a]",
        "    arena: { slot_size: 64KiB, large: { slot_size: 64KiB, slots: 0 } }",
        "  - name: d",
        "    route: /d",
        "    steps: [a]",
        "    arena:",
        "      large: { slot_size: 100000, slots: 1025, extra: 1 }",
        "  - name: e",
        "    route: /e",
        "    steps: [a]",
        "    arena: { large: { slot_size: 128MiB } }",
        "  - name: f",
        "    route: /f",
        "    steps: [a]",
        "    arena: { large: 8 }",
    ]));
    let expected = [
        (10, 52, "larger than the chain's slot_size (65536 bytes)"),
        (10, 66, "`slots` must be between 1 and 1024, got 0"),
        (15, 27, "multiple of 4KiB"),
        (15, 42, "got 1025"),
        (15, 48, "unknown key `extra`"),
        (19, 21, "missing required key `slots`"),
        (19, 34, "got 134217728 bytes"),
        (23, 21, "`arena.large` must be a mapping"),
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, (line, col, needle)) in errors.iter().zip(expected) {
        assert_at(error, line, col, needle);
    }
}

#[test]
fn ingress_is_off_by_default_and_each_part_is_read() {
    let s = Scratch::new();
    let base = [
        "functions:",
        "  - { name: a, module: ../mods/a.wasm }",
        "chains:",
        "  - { name: c, route: /c, steps: [a] }",
    ];
    assert_eq!(s.ok(&base).ingress, IngressSpec::default());
    let mut lines = vec![
        "http: { shards: 2 }",
        "ingress:",
        "  guard: { interface: eth0, hook: xdp, syn_rate: 50, syn_rate_all: 900, allow_tcp: [9100, 9200], allow_udp: [5353] }",
        "  steering: source_hash",
        "  fast_path: { interfaces: [veth-a, veth-b], netns: /run/netns/node }",
    ];
    lines.extend(base);
    let ingress = s.ok(&lines).ingress;
    let guard = ingress.guard.clone().unwrap();
    assert_eq!(
        guard,
        GuardSpec {
            interface: "eth0".into(),
            hook: GuardHook::Xdp,
            mode: GuardMode::Auto,
            syn_rate: 50,
            // The burst defaults to a second's worth.
            syn_burst: 50,
            syn_all: Some((900, 900)),
            sources: 65_536,
            allow_tcp: vec![9100, 9200],
            allow_udp: vec![5353],
        }
    );
    assert_eq!(guard.effective_mode(), GuardMode::Strict);
    assert_eq!(ingress.steering, Steering::SourceHash);
    assert_eq!(
        ingress.fast_path,
        Some(FastPathSpec {
            interfaces: vec!["veth-a".into(), "veth-b".into()],
            netns: Some(PathBuf::from("/run/netns/node")),
        })
    );
    for (text, expected) in [
        ("false", None),
        ("true", Some(LocalRedirectSpec { cgroup: None })),
        (
            "{ cgroup: /sys/fs/cgroup/x }",
            Some(LocalRedirectSpec {
                cgroup: Some(PathBuf::from("/sys/fs/cgroup/x")),
            }),
        ),
    ] {
        let line = format!("ingress: {{ local_redirect: {text} }}");
        let mut lines = vec![line.as_str()];
        lines.extend(base);
        assert_eq!(s.ok(&lines).ingress.local_redirect, expected, "{text}");
    }
    let mut lines = vec!["ingress: { guard: { interface: lo } }"];
    lines.extend(base);
    let guard = s.ok(&lines).ingress.guard.unwrap();
    assert_eq!(
        (guard.hook, guard.effective_mode()),
        (GuardHook::Tc, GuardMode::RateOnly)
    );
}

#[test]
fn ingress_mistakes_are_reported_where_they_are() {
    let s = Scratch::new();
    let base = [
        "functions:",
        "  - { name: a, module: ../mods/a.wasm }",
        "chains:",
        "  - { name: c, route: /c, steps: [a] }",
    ];
    for (line, at, message) in [
        (
            "ingress: { guard: { hook: tc } }",
            (1, 19),
            "`ingress.guard` is missing required key `interface`",
        ),
        (
            "ingress: { guard: { interface: lo, hook: xdp } }",
            (1, 42),
            "`hook: xdp` on lo would be generic XDP",
        ),
        (
            "ingress: { guard: { interface: eth0, hook: bpf } }",
            (1, 44),
            "unknown `ingress.guard.hook` `bpf`",
        ),
        (
            "ingress: { guard: { interface: eth0, mode: paranoid } }",
            (1, 44),
            "unknown `ingress.guard.mode` `paranoid`",
        ),
        (
            "ingress: { guard: { interface: a/b } }",
            (1, 32),
            "`a/b` is not an interface name",
        ),
        (
            "ingress: { guard: { interface: abcdefghijklmnop } }",
            (1, 32),
            "is not an interface name",
        ),
        (
            "ingress: { guard: { interface: eth0, syn_rate: 0 } }",
            (1, 48),
            "`ingress.guard.syn_rate` must be between 1 and 10000000",
        ),
        (
            "ingress: { guard: { interface: eth0, allow_tcp: [80, 80] } }",
            (1, 54),
            "port 80 is listed twice",
        ),
        (
            "ingress: { guard: { interface: eth0, allow_tcp: [70000] } }",
            (1, 50),
            "`ingress.guard.allow_tcp` must be between 1 and 65535",
        ),
        (
            "ingress: { guard: { interface: eth0, allow_tcp: [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15] } }",
            (1, 49),
            "lists 15 ports; the guard holds at most 14",
        ),
        (
            "ingress: { guard: { interface: eth0, allow_udp: 53 } }",
            (1, 49),
            "must be a list of ports",
        ),
        (
            "ingress: { guard: { interface: eth0, syn_burst_all: 5 } }",
            (1, 38),
            "`syn_burst_all` needs `syn_rate_all`",
        ),
        (
            "ingress: { guard: { interface: eth0, syn_rate_all: 0 } }",
            (1, 52),
            "`ingress.guard.syn_rate_all` must be between 1",
        ),
        (
            "ingress: { gaurd: { interface: eth0 } }",
            (1, 12),
            "unknown key `gaurd` in `ingress`",
        ),
        (
            "ingress: { steering: cpu }",
            (1, 22),
            "`ingress.steering: cpu` picks among shards: it needs `http.shards` above 1",
        ),
        (
            "ingress: { steering: random }",
            (1, 22),
            "unknown `ingress.steering` `random`",
        ),
        (
            "ingress: { fast_path: { interfaces: [] } }",
            (1, 37),
            "must list at least one interface",
        ),
        (
            "ingress: { fast_path: { interfaces: [v0, v0] } }",
            (1, 42),
            "interface `v0` is listed twice",
        ),
        (
            "ingress: { fast_path: { interfaces: [v0], netns: node } }",
            (1, 50),
            "must be an absolute path",
        ),
    ] {
        let mut lines = vec![line];
        lines.extend(base);
        let errors = s.errors(&lines);
        assert!(
            errors
                .iter()
                .any(|(l, c, m)| (*l, *c) == at && m.contains(message)),
            "{line}: {errors:?}"
        );
    }
}

#[test]
fn args_are_argv_after_the_function_name() {
    let s = Scratch::new();
    let config = s.ok(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    args: [--verbose, \"42\", 'two words', '']",
        "  - { name: b, module: ../mods/b.wasm }",
        "chains:",
        "  - { name: c, route: /c, steps: [a, b] }",
    ]);
    assert_eq!(
        config.functions[0].args,
        ["--verbose", "42", "two words", ""]
    );
    assert_eq!(
        config.functions[0].argv(),
        ["a", "--verbose", "42", "two words", ""]
    );
    assert_eq!(config.functions[1].argv(), ["b"]);
    let long = "x".repeat(MAX_ARG_BYTES + 1);
    let many = format!("[{}]", vec!["a"; MAX_ARGS + 1].join(", "));
    let errors = s.errors(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    args: [1, ok, {x: 1}]",
        "  - { name: b, module: ../mods/b.wasm, args: not-a-list }",
        &format!("  - {{ name: d, module: ../mods/c.wasm, args: [{long}] }}"),
        &format!("  - {{ name: e, module: ../mods/c.wasm, args: {many} }}"),
        "chains:",
        "  - { name: c, route: /c, steps: [a, b, d, e] }",
    ]);
    let at: Vec<(usize, usize, &str)> = errors
        .iter()
        .map(|(l, c, m)| (*l, *c, m.as_str()))
        .collect();
    assert_eq!(
        at,
        [
            (
                4,
                12,
                "an argument must be a string, found integer `1` (quote it)"
            ),
            (
                4,
                19,
                "an argument must be a string, found a mapping (quote it)"
            ),
            (
                5,
                46,
                "`args` must be a list of strings, found string `not-a-list`"
            ),
            (6, 47, "argument of 4097 bytes; at most 4096 are allowed"),
            (7, 46, "257 arguments; at most 256 are allowed"),
        ]
    );
    let huge = format!("[{}]", vec!["y".repeat(4000); 17].join(", "));
    s.one_error(
        &[
            "functions:",
            &format!("  - {{ name: a, module: ../mods/a.wasm, args: {huge} }}"),
            "chains:",
            "  - { name: c, route: /c, steps: [a] }",
        ],
        2,
        46,
        "the arguments take 68019 bytes (with the function's name as argv[0]); at most 65536 are allowed",
    );
}

#[test]
fn files_map_absolute_guest_paths_to_host_directories() {
    let s = Scratch::new();
    std::fs::create_dir_all(s.dir.join("conf/data")).unwrap();
    std::fs::create_dir_all(s.dir.join("shared")).unwrap();
    let shared = s.dir.join("shared");
    let config = s.ok(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    mode: command",
        "    files:",
        "      /data: data",
        &format!("      /: {}", shared.display()),
        "      /srv/a/b: ../shared",
        "chains:",
        "  - { name: c, route: /c, steps: [a] }",
    ]);
    let files: Vec<(&str, PathBuf)> = config.functions[0]
        .files
        .iter()
        .map(|f| (f.guest.as_str(), f.host.clone()))
        .collect();
    assert_eq!(
        files,
        [
            ("/data", s.dir.join("conf/data")),
            ("/", shared.clone()),
            ("/srv/a/b", s.dir.join("conf/../shared")),
        ],
        "relative host paths are the config's directory's, in file order"
    );
    std::fs::write(s.dir.join("conf/file"), "").unwrap();
    let errors = s.errors(&[
        "functions:",
        "  - name: a",
        "    module: ../mods/a.wasm",
        "    files:",
        "      data: data",
        "      /a/../b: data",
        "      /a//b/: data",
        "      /missing: nowhere",
        "      /file: file",
        "      /num: 5",
        "  - { name: b, module: ../mods/b.wasm, files: [a] }",
        "chains:",
        "  - { name: c, route: /c, steps: [a, b] }",
    ]);
    let at: Vec<(usize, usize, String)> = errors;
    let dir = s.dir.join("conf");
    assert_eq!(
        at,
        [
            (
                5,
                7,
                "invalid guest path `data` in `files`: it must be absolute (start with `/`)"
                    .to_string()
            ),
            (
                6,
                7,
                "invalid guest path `/a/../b` in `files`: it must not contain `..`".to_string()
            ),
            (
                7,
                7,
                "invalid guest path `/a//b/` in `files`: write it as `/a/b`".to_string()
            ),
            (
                8,
                17,
                format!("directory not found: `{}`", dir.join("nowhere").display())
            ),
            (
                9,
                14,
                format!("`{}` is not a directory", dir.join("file").display())
            ),
            (
                10,
                13,
                "the host directory for `/num` must be a string (a path), found integer `5`"
                    .to_string()
            ),
            (
                11,
                47,
                "`files` must be a mapping, found a list".to_string()
            ),
        ]
    );
    // A guest path given twice is a duplicated key, which YAML itself refuses (guest paths
    // must be in normal form, so two spellings of one path cannot both pass either).
    s.one_error(
        &[
            "functions:",
            "  - { name: a, module: ../mods/a.wasm, files: { /x: data, /x: data } }",
            "chains:",
            "  - { name: c, route: /c, steps: [a] }",
        ],
        2,
        59,
        "duplicated key",
    );
    let many: Vec<String> = (0..=MAX_FILES).map(|i| format!("/d{i}: data")).collect();
    s.one_error(
        &[
            "functions:",
            &format!(
                "  - {{ name: a, module: ../mods/a.wasm, files: {{ {} }} }}",
                many.join(", ")
            ),
            "chains:",
            "  - { name: c, route: /c, steps: [a] }",
        ],
        2,
        47,
        "17 preopened directories; at most 16 are allowed",
    );
}

#[test]
fn load_checking_reports_module_problems_at_the_module_key() {
    let s = Scratch::new();
    let path = s.source();
    std::fs::write(
        &path,
        "functions:\n  - name: a\n    module: ../mods/a.wasm\n  - { name: b, module: ../mods/b.wasm }\n  - { name: m, module: ../mods/missing.wasm }\nchains:\n  - { name: c, route: /c, steps: [a, b, m] }\n",
    )
    .unwrap();
    let mut seen = Vec::new();
    let errors = Config::load_checking(&path, &mut |spec| {
        seen.push(spec.name.clone());
        match spec.name.as_str() {
            "a" => vec!["first problem".into(), "second problem".into()],
            _ => vec![],
        }
    })
    .unwrap_err();
    assert_eq!(seen, ["a", "b"], "only modules that exist are checked");
    let at: Vec<(usize, usize, &str)> = errors
        .0
        .iter()
        .map(|e| (e.line, e.col, e.message.as_str()))
        .collect();
    assert_eq!(
        at[..2],
        [
            (3, 13, "function `a`: first problem"),
            (3, 13, "function `a`: second problem"),
        ]
    );
    assert!(at[2].2.starts_with("module file not found"), "{at:?}");
}
