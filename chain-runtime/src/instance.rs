//! How a function instance comes to exist: the one place that turns a module plus the config
//! into an instance ready to serve, and that knows what a worker process is handed to build
//! one.
//!
//! - [`Handoff`] is both sides of the gateway → worker hand-off: the gateway places its fds at
//!   the numbers `proto::worker` fixes ([`Handoff::exec_plan`]); the worker adopts them,
//!   checking each is what it should be ([`Handoff::inherited`]).
//! - [`InstanceBuilder`] resolves a (chain, function) in the config and builds its
//!   [`Instance`]. Today every build is cold: compile the module with Cranelift, instantiate,
//!   run `_initialize`. A build from a prepared image (remote fork) is a second constructor
//!   here, so callers do not change when instances stop being built cold.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use nix::sys::stat::{SFlag, fstat};
use proto::worker::{
    ARENA_FD, ARENA_META_FD, CACHE_FD, CONFIG_FD, CONTROL_FD, HIGHEST_FIXED_FD, IMAGE_FD,
    MAX_PREOPENS, MODULE_FD, MOUNT_NS_FD, NET_NS_FD, PREOPEN_FD, SOCKET_FD, STATS_FD, ZYGOTE_FD,
};

use crate::config::{Config, ConfigErrors, PreopenDir};
use crate::host::{FunctionHost, HostError};
use crate::plan::{ChainPlan, Plan, Stage};
use crate::wasi::{PreopenError, Preopens};

// A function's `files:` are placed at fixed numbers, one each.
const _: () = assert!(crate::config::MAX_FILES == MAX_PREOPENS);
/// Fixed placements an exec plan holds at most: the hand-off's eleven, and the preopens.
const MAX_PLACEMENTS: usize = 11 + MAX_PREOPENS;

/// Lowest fd number [`Handoff::exec_plan`] duplicates to: above stdio and every fixed
/// number, so placing the copies cannot overwrite one with another.
pub const EXEC_PLAN_MIN_FD: RawFd = HIGHEST_FIXED_FD + 1;

/// The sandbox namespaces a process joins before running guest code: (network, mount), as
/// `sandbox::SharedNamespaces` made them.
#[derive(Debug)]
pub struct Namespaces<Fd> {
    pub net: Fd,
    pub mount: Fd,
}

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("fd {fd} is not {what}: was this process started by the gateway?")]
    BadFd { fd: RawFd, what: &'static str },
    #[error("cannot read the {what} the gateway passed: {source}")]
    ReadInput {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("config passed by the gateway is not UTF-8")]
    ConfigEncoding,
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("no chain {0} in the config")]
    UnknownChain(String),
    #[error("no function {function} in chain {chain}")]
    UnknownStage { chain: String, function: String },
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Resume(#[from] crate::resume::ResumeError),
    #[error("confining the process: {0}")]
    Sandbox(sandbox::SandboxError),
    #[error("the preopened directories the gateway passed: {0}")]
    Preopens(#[from] PreopenError),
}

/// The resources a worker process gets from the gateway, one field per fixed fd number.
#[derive(Debug)]
pub struct Handoff<Fd> {
    /// The chain's arena payload memfd.
    pub arena: Fd,
    /// The chain's arena metadata memfd (sealed: the worker maps it read-only).
    pub arena_meta: Fd,
    /// The worker's end of its connected socket to the gateway.
    pub socket: Fd,
    /// Sealed memfd with the config text the gateway started with.
    pub config: Fd,
    /// Sealed memfd with the function's module bytes as the gateway read them at start.
    pub module: Fd,
    /// The instance's statistics page.
    pub stats: Fd,
    /// The worker's end of its Unix control socket pair with the gateway
    /// ([`crate::control`]: prepare an image of the running instance).
    pub control: Fd,
    /// Sealed memfd with the image descriptor to resume from, for an instance started from a
    /// remote image instead of cold (the worker's `--from-image`).
    pub image: Option<Fd>,
    /// The node page cache of that image (`rdma_fork::cache::NodeCache`), when the node
    /// keeps one; only beside `image`.
    pub cache: Option<Fd>,
    /// The sandbox namespaces to join, when the gateway confines workers.
    pub namespaces: Option<Namespaces<Fd>>,
    /// The function's preopened directories (`files:`), in config order, at
    /// `PREOPEN_FD + i`. [`Handoff::inherited`] adopts every directory there; the worker
    /// checks them against its config once it has read it ([`Preopens::adopt`]).
    pub preopens: Vec<Fd>,
}

/// What a zygote process is handed: a [`Handoff`] without the per-instance socket and
/// statistics page (those come with each spawn request), plus its socket to the gateway.
#[derive(Debug)]
pub struct ZygoteHandoff<Fd> {
    pub arena: Fd,
    pub arena_meta: Fd,
    pub config: Fd,
    pub module: Fd,
    /// The zygote's end of its Unix seqpacket socket to the gateway.
    pub zygote: Fd,
    /// The sandbox namespaces to join, when the gateway confines workers; the zygote's
    /// children inherit them.
    pub namespaces: Option<Namespaces<Fd>>,
    /// The function's preopened directories, as in [`Handoff::preopens`]; the zygote's
    /// children inherit them.
    pub preopens: Vec<Fd>,
}

/// The gateway's copies of a [`Handoff`], ready to be placed in a child between fork and exec.
pub struct ExecPlan {
    /// Kept open until the child has been spawned; dropping the plan closes them.
    _copies: Vec<OwnedFd>,
    placements: [(RawFd, RawFd); MAX_PLACEMENTS],
    count: usize,
}

impl ExecPlan {
    /// Duplicates every fd to a close-on-exec number above the fixed ones, so the child's
    /// `dup2` calls cannot clobber each other, and pairs each copy with its place.
    fn new(fds: &[(BorrowedFd<'_>, RawFd)]) -> std::io::Result<ExecPlan> {
        if fds.len() > MAX_PLACEMENTS {
            return Err(std::io::Error::other(format!(
                "{} fds to place, at most {MAX_PLACEMENTS} fit",
                fds.len()
            )));
        }
        let mut copies = Vec::with_capacity(fds.len());
        let mut placements = [(-1, -1); MAX_PLACEMENTS];
        for (i, (fd, target)) in fds.iter().enumerate() {
            let copy = dup_at_least(*fd, EXEC_PLAN_MIN_FD)?;
            placements[i] = (copy.as_raw_fd(), *target);
            copies.push(copy);
        }
        Ok(ExecPlan {
            count: copies.len(),
            _copies: copies,
            placements,
        })
    }

    /// `(source fd, fd number in the worker)` pairs, for `dup2` in a `pre_exec` closure: plain
    /// integers in a fixed array, so using them there needs no allocation. `dup2` clears
    /// close-on-exec on the copy, which is how the fds survive exec.
    pub fn placements(&self) -> &[(RawFd, RawFd)] {
        &self.placements[..self.count]
    }
}

impl Handoff<BorrowedFd<'_>> {
    /// The copies to place in the worker, see [`ExecPlan`].
    pub fn exec_plan(&self) -> std::io::Result<ExecPlan> {
        let mut fds = vec![
            (self.arena, ARENA_FD),
            (self.arena_meta, ARENA_META_FD),
            (self.socket, SOCKET_FD),
            (self.config, CONFIG_FD),
            (self.module, MODULE_FD),
            (self.stats, STATS_FD),
            (self.control, CONTROL_FD),
        ];
        fds.extend(self.image.map(|fd| (fd, IMAGE_FD)));
        fds.extend(self.cache.map(|fd| (fd, CACHE_FD)));
        fds.extend(namespace_placements(&self.namespaces));
        fds.extend(preopen_placements(&self.preopens)?);
        ExecPlan::new(&fds)
    }
}

impl ZygoteHandoff<BorrowedFd<'_>> {
    /// The copies to place in the zygote, see [`ExecPlan`].
    pub fn exec_plan(&self) -> std::io::Result<ExecPlan> {
        let mut fds = vec![
            (self.arena, ARENA_FD),
            (self.arena_meta, ARENA_META_FD),
            (self.config, CONFIG_FD),
            (self.module, MODULE_FD),
            (self.zygote, ZYGOTE_FD),
        ];
        fds.extend(namespace_placements(&self.namespaces));
        fds.extend(preopen_placements(&self.preopens)?);
        ExecPlan::new(&fds)
    }
}

fn preopen_placements<'a>(
    preopens: &[BorrowedFd<'a>],
) -> std::io::Result<impl Iterator<Item = (BorrowedFd<'a>, RawFd)>> {
    if preopens.len() > MAX_PREOPENS {
        return Err(std::io::Error::other(format!(
            "{} preopened directories, at most {MAX_PREOPENS} can be handed over",
            preopens.len()
        )));
    }
    Ok(preopens
        .iter()
        .enumerate()
        .map(|(i, fd)| (*fd, PREOPEN_FD + i as RawFd)))
}

/// Adopts the preopened directories the gateway placed from `PREOPEN_FD` on: every
/// directory fd there, up to the first number that holds none (the gateway places them
/// contiguously). Called with the rest of the hand-off, before this process opens an fd of
/// its own, so a number is the gateway's fd or nothing.
fn inherited_preopen_fds() -> Result<Vec<OwnedFd>, InstanceError> {
    let mut fds = Vec::new();
    for fd in PREOPEN_FD..PREOPEN_FD + MAX_PREOPENS as RawFd {
        // SAFETY: a fixed number borrowed only for this fstat; see take_fd.
        let is_dir = fstat(unsafe { BorrowedFd::borrow_raw(fd) }).is_ok_and(|st| {
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
        });
        if !is_dir {
            break;
        }
        fds.push(take_fd(fd, SFlag::S_IFDIR, "a preopened directory")?);
    }
    Ok(fds)
}

/// The function's preopened directories from the fds the gateway handed over, checked
/// against `dirs` (its `files:` in the config this process read): one directory each.
pub fn adopt_preopens(
    dirs: &[PreopenDir],
    handed: &mut Vec<OwnedFd>,
) -> Result<Preopens, InstanceError> {
    Ok(Preopens::adopt(dirs, std::mem::take(handed))?)
}

fn namespace_placements<'a>(
    namespaces: &Option<Namespaces<BorrowedFd<'a>>>,
) -> impl Iterator<Item = (BorrowedFd<'a>, RawFd)> {
    namespaces
        .iter()
        .flat_map(|ns| [(ns.net, NET_NS_FD), (ns.mount, MOUNT_NS_FD)])
}

/// The sandbox namespaces at their fixed numbers, if the gateway passed them.
fn inherited_namespaces() -> Result<Option<Namespaces<OwnedFd>>, InstanceError> {
    // SAFETY: a fixed number borrowed only for this fstat; see take_fd.
    if fstat(unsafe { BorrowedFd::borrow_raw(NET_NS_FD) }).is_err() {
        return Ok(None);
    }
    Ok(Some(Namespaces {
        net: take_fd(NET_NS_FD, SFlag::S_IFREG, "the sandbox network namespace")?,
        mount: take_fd(MOUNT_NS_FD, SFlag::S_IFREG, "the sandbox mount namespace")?,
    }))
}

impl ZygoteHandoff<OwnedFd> {
    /// Adopts the fds the gateway left open for this zygote, after checking each one's kind.
    /// Call it once per process.
    pub fn inherited() -> Result<Self, InstanceError> {
        Ok(ZygoteHandoff {
            arena: take_fd(ARENA_FD, SFlag::S_IFREG, "the arena memfd")?,
            arena_meta: take_fd(ARENA_META_FD, SFlag::S_IFREG, "the arena metadata memfd")?,
            config: take_fd(CONFIG_FD, SFlag::S_IFREG, "the config memfd")?,
            module: take_fd(MODULE_FD, SFlag::S_IFREG, "the module memfd")?,
            zygote: take_fd(ZYGOTE_FD, SFlag::S_IFSOCK, "the zygote socket")?,
            namespaces: inherited_namespaces()?,
            preopens: inherited_preopen_fds()?,
        })
    }

    /// Reads the config text and the module bytes out of their memfds.
    pub fn read_inputs(&self) -> Result<(String, Vec<u8>), InstanceError> {
        read_inputs(self.config.as_fd(), self.module.as_fd())
    }
}

/// A close-on-exec duplicate of `fd` numbered `min` or above (std's try_clone_to_owned
/// cannot choose the number).
pub(crate) fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> std::io::Result<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(min)).map_err(std::io::Error::from)?;
    // SAFETY: `new` is a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

impl Handoff<OwnedFd> {
    /// Adopts the fds the gateway left open for this process, after checking that each is of
    /// the kind expected. Call it once per process.
    pub fn inherited(from_image: bool) -> Result<Self, InstanceError> {
        let (image, cache) = if from_image {
            let image = take_fd(IMAGE_FD, SFlag::S_IFREG, "the image descriptor memfd")?;
            // Optional: a worker resumes without a cache when the gateway passed none.
            let cache = take_fd(CACHE_FD, SFlag::S_IFREG, "the node page cache memfd")
                .inspect_err(|e| tracing::debug!("no node page cache: {e}"))
                .ok();
            (Some(image), cache)
        } else {
            (None, None)
        };
        Ok(Handoff {
            image,
            cache,
            config: take_fd(CONFIG_FD, SFlag::S_IFREG, "the config memfd")?,
            module: take_fd(MODULE_FD, SFlag::S_IFREG, "the module memfd")?,
            stats: take_fd(STATS_FD, SFlag::S_IFREG, "the stats memfd")?,
            arena: take_fd(ARENA_FD, SFlag::S_IFREG, "the arena memfd")?,
            arena_meta: take_fd(ARENA_META_FD, SFlag::S_IFREG, "the arena metadata memfd")?,
            socket: take_fd(SOCKET_FD, SFlag::S_IFSOCK, "a socket")?,
            control: take_fd(CONTROL_FD, SFlag::S_IFSOCK, "the control socket")?,
            namespaces: inherited_namespaces()?,
            preopens: inherited_preopen_fds()?,
        })
    }

    /// The image descriptor's text, for an instance started from an image.
    pub fn read_image(&self) -> Result<Option<String>, InstanceError> {
        let Some(fd) = &self.image else {
            return Ok(None);
        };
        String::from_utf8(read_memfd(fd.as_fd(), "image descriptor")?)
            .map(Some)
            .map_err(|_| InstanceError::ConfigEncoding)
    }

    /// Reads the config text and the module bytes out of their memfds.
    pub fn read_inputs(&self) -> Result<(String, Vec<u8>), InstanceError> {
        read_inputs(self.config.as_fd(), self.module.as_fd())
    }
}

fn read_inputs(
    config: BorrowedFd<'_>,
    module: BorrowedFd<'_>,
) -> Result<(String, Vec<u8>), InstanceError> {
    let text = String::from_utf8(read_memfd(config, "config")?)
        .map_err(|_| InstanceError::ConfigEncoding)?;
    Ok((text, read_memfd(module, "module")?))
}

/// Adopts an fd the gateway left open for us, after checking it is what we expect.
fn take_fd(fd: RawFd, kind: SFlag, what: &'static str) -> Result<OwnedFd, InstanceError> {
    // SAFETY: `fd` is one of proto::worker's fixed numbers (never -1), borrowed only for this
    // fstat. The worker adopts the hand-off before it opens any descriptor of its own, so the
    // number is either the gateway's fd or not open at all, and then fstat fails with EBADF
    // and we return BadFd.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    let is_kind = fstat(borrowed)
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind);
    if !is_kind {
        return Err(InstanceError::BadFd { fd, what });
    }
    // SAFETY: the fd is open (fstat succeeded) and nothing else in this process owns it: the
    // gateway placed it here for the worker alone, and this is called once per fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads a whole memfd from offset 0 (positioned reads: the open file description, and so its
/// offset, is shared by every worker that inherited it).
fn read_memfd(fd: BorrowedFd<'_>, what: &'static str) -> Result<Vec<u8>, InstanceError> {
    let file = File::from(
        fd.try_clone_to_owned()
            .map_err(|source| InstanceError::ReadInput { what, source })?,
    );
    let err = |source| InstanceError::ReadInput { what, source };
    let len = file.metadata().map_err(err)?.len() as usize;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, 0).map_err(err)?;
    Ok(buf)
}

/// A read-only, sealed memfd holding `data`, for handing to worker processes: what a worker
/// builds from cannot change under it, even if the file it came from is edited.
pub fn sealed_memfd(name: &str, data: &[u8]) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let fd = memfd_create(
        cname.as_c_str(),
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(std::io::Error::from)?;
    let file = File::from(fd);
    file.write_all_at(data, 0)?;
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    fcntl(&file, FcntlArg::F_ADD_SEALS(seals)).map_err(std::io::Error::from)?;
    Ok(file.into())
}

/// One function of one chain, resolved in the plan, about to be built.
#[derive(Clone)]
pub struct InstanceBuilder {
    plan: Plan,
    chain: usize,
    stage: usize,
    /// How this function's processes are confined, and the uid they run as.
    sandbox: crate::confine::FunctionSandbox,
    /// The function's preopened directories as the gateway handed them over; `None`: opened
    /// from the config's paths when an instance is built (a tool outside the sandbox).
    preopens: Option<Preopens>,
}

impl InstanceBuilder {
    /// Resolves `function` of `chain` in `config`.
    pub fn new(config: &Config, chain: &str, function: &str) -> Result<Self, InstanceError> {
        let plan = Plan::new(config);
        let chain_index = plan
            .chains
            .iter()
            .position(|c| c.spec.name == chain)
            .ok_or_else(|| InstanceError::UnknownChain(chain.to_owned()))?;
        let stage = plan.chains[chain_index]
            .stages
            .iter()
            .position(|s| s.function.name == function)
            .ok_or_else(|| InstanceError::UnknownStage {
                chain: chain.to_owned(),
                function: function.to_owned(),
            })?;
        let uid = config
            .function_uid(function)
            .expect("the plan resolved the function, so the config defines it");
        Ok(InstanceBuilder {
            plan,
            chain: chain_index,
            stage,
            sandbox: crate::confine::FunctionSandbox {
                enabled: config.sandbox.enabled,
                uid,
                preopens: config.function(function).map_or(0, |f| f.files.len()),
            },
            preopens: None,
        })
    }

    /// Builds every instance with `preopens` (adopted from the gateway, see
    /// [`adopt_preopens`]) instead of opening the config's directories.
    pub fn with_preopens(mut self, preopens: Preopens) -> Self {
        self.preopens = Some(preopens);
        self
    }

    /// The preopens instances get: the ones handed over, else the config's, opened now.
    pub fn preopens(&self) -> Result<Preopens, InstanceError> {
        match &self.preopens {
            Some(p) => Ok(p.clone()),
            None => Ok(Preopens::open(&self.stage().function.files)?),
        }
    }

    /// Parses `text` (the config read from `path`) and resolves `function` of `chain` in it.
    pub fn from_config_text(
        text: &str,
        path: &Path,
        chain: &str,
        function: &str,
    ) -> Result<Self, InstanceError> {
        Self::new(&Config::parse(text, path)?, chain, function)
    }

    pub fn chain(&self) -> &ChainPlan {
        &self.plan.chains[self.chain]
    }

    pub fn stage(&self) -> &Stage {
        &self.chain().stages[self.stage]
    }

    /// How this function's processes are confined.
    pub fn sandbox(&self) -> crate::confine::FunctionSandbox {
        self.sandbox
    }

    /// Cold start from the module's bytes: compile, instantiate, `_initialize` (reactors).
    pub fn cold(self, module: &[u8]) -> Result<Instance, InstanceError> {
        let host = FunctionHost::from_bytes(
            &self.stage().function,
            module,
            self.chain().routes(),
            self.preopens()?,
        )?;
        Ok(self.finish(host))
    }

    /// Cold start from the module file the config names.
    pub fn cold_from_file(self) -> Result<Instance, InstanceError> {
        let bytes =
            std::fs::read(&self.stage().function.module).map_err(|source| HostError::Read {
                path: self.stage().function.module.display().to_string(),
                source,
            })?;
        self.cold(&bytes)
    }

    /// Cold start from a module compiled already ([`InstanceBuilder::compile`]):
    /// instantiate and `_initialize`, sharing the compiled code with every other instance
    /// built from it (a cold instance beside forked ones, measured against them).
    pub fn cold_compiled(
        self,
        module: &crate::host::CompiledModule,
    ) -> Result<Instance, InstanceError> {
        let host = FunctionHost::from_compiled(
            &self.stage().function,
            module,
            self.chain().routes(),
            self.preopens()?,
        )?;
        Ok(self.finish(host))
    }

    fn finish(self, host: FunctionHost) -> Instance {
        Instance {
            plan: self.plan,
            chain: self.chain,
            stage: self.stage,
            host,
        }
    }

    /// Local fork: an instance of this function built from `snapshot` of a warm instance of
    /// the same module, reusing `module` (the parent's, from
    /// [`FunctionHost::compiled_module`]): nothing is compiled and `_initialize` does not
    /// run. Linear memory is the image mapped copy-on-write, so the child starts with the
    /// parent's state and its writes stay its own; `spindle_on_fork` runs if exported.
    /// Refused when the image, the module and this function's config do not match (module
    /// hash, engine, metering, memory limit, WASI args/env).
    pub fn from_snapshot(
        self,
        snapshot: &crate::snapshot::Snapshot,
        module: &crate::host::CompiledModule,
    ) -> Result<Instance, InstanceError> {
        let host = FunctionHost::fork(
            &self.stage().function,
            self.chain().routes(),
            self.preopens()?,
            module,
            snapshot.meta(),
            crate::snapshot::MemoryFill::Map(snapshot.image()),
            Some(snapshot.clone()),
        )?;
        Ok(self.finish(host))
    }

    /// Compiles the function's module from its bytes: what a node does once per module, so
    /// that every child it forks ([`InstanceBuilder::from_snapshot_parts`]) shares the code.
    pub fn compile(&self, module: &[u8]) -> Result<crate::host::CompiledModule, InstanceError> {
        Ok(crate::host::CompiledModule::compile(
            &self.stage().function,
            module,
        )?)
    }

    /// The WASI layout (args, environment, preopens) this node's config gives the function:
    /// what a remote image's layout digest must match.
    pub fn wasi_layout(&self) -> crate::snapshot::WasiLayout {
        let f = &self.stage().function;
        let preopens = f.files.iter().map(|d| d.guest.clone()).collect();
        crate::host::wasi_layout(&f.argv(), &f.env, preopens, [false; 3])
    }

    /// Like [`InstanceBuilder::from_snapshot`] with the memory contents left to the caller
    /// (`fill`): the remote/lazy path, where pages arrive from elsewhere (e.g. userfaultfd
    /// on [`MemoryFill::Caller`](crate::snapshot::MemoryFill::Caller)'s region). Without the whole snapshot to rebuild from, a
    /// trapped instance of this host is rebuilt cold.
    pub fn from_snapshot_parts(
        self,
        meta: &crate::snapshot::SnapshotMeta,
        module: &crate::host::CompiledModule,
        fill: crate::snapshot::MemoryFill<'_>,
    ) -> Result<Instance, InstanceError> {
        let host = FunctionHost::fork(
            &self.stage().function,
            self.chain().routes(),
            self.preopens()?,
            module,
            meta,
            fill,
            None,
        )?;
        Ok(self.finish(host))
    }
}

/// A built function instance: its place in the plan and its live Wasm host.
pub struct Instance {
    plan: Plan,
    chain: usize,
    stage: usize,
    host: FunctionHost,
}

impl Instance {
    pub fn chain(&self) -> &ChainPlan {
        &self.plan.chains[self.chain]
    }

    pub fn stage(&self) -> &Stage {
        &self.chain().stages[self.stage]
    }

    pub fn host_mut(&mut self) -> &mut FunctionHost {
        &mut self.host
    }

    /// The plan entries and the host at once, for a caller that runs the host while reading
    /// its routing.
    pub fn parts_mut(&mut self) -> (&ChainPlan, &Stage, &mut FunctionHost) {
        let chain = &self.plan.chains[self.chain];
        (chain, &chain.stages[self.stage], &mut self.host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        // The smallest reactor: echoes its input.
        let wat = r#"(module
            (import "spindle" "output" (func $out (param i32 i32)))
            (memory (export "memory") 1)
            (func (export "spindle_alloc") (param i32) (result i32) (i32.const 1024))
            (func (export "spindle_handle") (param i32 i32) (result i32)
              (call $out (local.get 0) (local.get 1)) (i32.const 0)))"#;
        std::fs::write(dir.join("echo.wat"), wat).unwrap();
        let yaml = "functions:\n  - name: echo\n    module: echo.wat\n\
                    chains:\n  - name: c\n    route: /c\n    steps: [echo]\n";
        let path = dir.join("spindle.yaml");
        std::fs::write(&path, yaml).unwrap();
        Config::load(&path).unwrap()
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("instance-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn builds_a_cold_instance_from_bytes_and_from_the_file() {
        let dir = temp_dir("cold");
        let config = config(&dir);
        let bytes = std::fs::read(dir.join("echo.wat")).unwrap();
        let from_bytes = InstanceBuilder::new(&config, "c", "echo")
            .unwrap()
            .cold(&bytes)
            .unwrap();
        assert_eq!(from_bytes.stage().function.name, "echo");
        assert_eq!(from_bytes.chain().spec.name, "c");
        let mut from_file = InstanceBuilder::new(&config, "c", "echo")
            .unwrap()
            .cold_from_file()
            .unwrap();
        assert_eq!(from_file.host_mut().name(), "echo");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_chain_or_function_is_named() {
        let dir = temp_dir("unknown");
        let config = config(&dir);
        let err = InstanceBuilder::new(&config, "nope", "echo").err().unwrap();
        assert_eq!(err.to_string(), "no chain nope in the config");
        let err = InstanceBuilder::new(&config, "c", "nope").err().unwrap();
        assert_eq!(err.to_string(), "no function nope in chain c");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_module_that_does_not_compile_fails_the_build() {
        let dir = temp_dir("bad");
        let config = config(&dir);
        let err = InstanceBuilder::new(&config, "c", "echo")
            .unwrap()
            .cold(b"not wasm")
            .err()
            .unwrap();
        assert!(
            matches!(err, InstanceError::Host(HostError::Compile { .. })),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sealed_memfd_holds_the_bytes_and_refuses_writes() {
        let fd = sealed_memfd("test", b"hello").unwrap();
        assert_eq!(read_memfd(fd.as_fd(), "test").unwrap(), b"hello");
        let file = File::from(fd);
        assert!(file.write_at(b"x", 0).is_err(), "sealed against writes");
    }

    #[test]
    fn exec_plan_places_copies_above_the_fixed_numbers() {
        let fds: Vec<OwnedFd> = (0..7)
            .map(|i| sealed_memfd(&format!("f{i}"), b"x").unwrap())
            .collect();
        let handoff = Handoff {
            arena: fds[0].as_fd(),
            arena_meta: fds[6].as_fd(),
            socket: fds[1].as_fd(),
            config: fds[2].as_fd(),
            module: fds[3].as_fd(),
            stats: fds[4].as_fd(),
            control: fds[5].as_fd(),
            image: None,
            cache: None,
            namespaces: None,
            preopens: Vec::new(),
        };
        let plan = handoff.exec_plan().unwrap();
        let placements = plan.placements();
        let targets: Vec<RawFd> = placements.iter().map(|p| p.1).collect();
        assert_eq!(
            targets,
            [
                ARENA_FD,
                ARENA_META_FD,
                SOCKET_FD,
                CONFIG_FD,
                MODULE_FD,
                STATS_FD,
                CONTROL_FD
            ]
        );
        for (from, _) in placements {
            assert!(
                *from >= EXEC_PLAN_MIN_FD,
                "copy at {from} could be clobbered"
            );
        }
        let with_image = Handoff {
            image: Some(fds[0].as_fd()),
            ..handoff
        };
        let plan = with_image.exec_plan().unwrap();
        assert_eq!(plan.placements().len(), 8);
        assert_eq!(plan.placements()[7].1, IMAGE_FD);
        let with_cache = Handoff {
            cache: Some(fds[1].as_fd()),
            ..with_image
        };
        let plan = with_cache.exec_plan().unwrap();
        assert_eq!(plan.placements().len(), 9);
        assert_eq!(plan.placements()[8].1, CACHE_FD);
        let confined = Handoff {
            namespaces: Some(Namespaces {
                net: fds[2].as_fd(),
                mount: fds[3].as_fd(),
            }),
            ..with_cache
        };
        let plan = confined.exec_plan().unwrap();
        let targets: Vec<RawFd> = plan.placements()[9..].iter().map(|p| p.1).collect();
        assert_eq!(targets, [NET_NS_FD, MOUNT_NS_FD]);
        assert!(
            plan.placements()
                .iter()
                .all(|(from, _)| *from > HIGHEST_FIXED_FD)
        );
        // Preopened directories go after everything, from PREOPEN_FD on, up to MAX_PREOPENS.
        let dirs: Vec<OwnedFd> = (0..=MAX_PREOPENS)
            .map(|_| File::open(std::env::temp_dir()).unwrap().into())
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = dirs.iter().map(|d| d.as_fd()).collect();
        let with_files = Handoff {
            preopens: borrowed[..3].to_vec(),
            ..confined
        };
        let plan = with_files.exec_plan().unwrap();
        let targets: Vec<RawFd> = plan.placements()[11..].iter().map(|p| p.1).collect();
        assert_eq!(targets, [PREOPEN_FD, PREOPEN_FD + 1, PREOPEN_FD + 2]);
        let all = Handoff {
            preopens: borrowed[..MAX_PREOPENS].to_vec(),
            ..with_files
        };
        let plan = all.exec_plan().unwrap();
        assert_eq!(plan.placements().last().unwrap().1, HIGHEST_FIXED_FD);
        assert!(
            plan.placements()
                .iter()
                .all(|(from, _)| *from > HIGHEST_FIXED_FD)
        );
        let too_many = Handoff {
            preopens: borrowed.clone(),
            ..all
        };
        assert!(too_many.exec_plan().is_err());
    }
}
