//! The import table: which host function each WASI name links to, and the stub for names it
//! doesn't know.

use wasmer::{AsStoreMut, Function, FunctionEnv, FunctionType, RuntimeError, Type, Value};

use super::errno::*;
use super::{Flavor, WasiCtx, args, clocks, denied, poll, stdio};

/// Every WASI function this module implements (or denies) by name, for both namespaces.
pub const KNOWN_FUNCTIONS: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_link",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_symlink",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "proc_raise",
    "sched_yield",
    "random_get",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

pub(super) fn known_function(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<WasiCtx>,
    flavor: Flavor,
    name: &str,
) -> Option<Function> {
    macro_rules! host {
        ($f:expr) => {
            Function::new_typed_with_env(store, env, $f)
        };
    }
    Some(match name {
        "args_get" => host!(args::args_get),
        "args_sizes_get" => host!(args::args_sizes_get),
        "environ_get" => host!(args::environ_get),
        "environ_sizes_get" => host!(args::environ_sizes_get),
        "clock_res_get" => host!(clocks::clock_res_get),
        "clock_time_get" => host!(clocks::clock_time_get),
        "fd_advise" => host!(denied::fd_advise),
        "fd_allocate" => host!(denied::fd_allocate),
        "fd_close" => host!(stdio::fd_close),
        "fd_datasync" => host!(denied::fd_datasync),
        "fd_fdstat_get" => host!(stdio::fd_fdstat_get),
        "fd_fdstat_set_flags" => host!(stdio::fd_fdstat_set_flags),
        "fd_fdstat_set_rights" => host!(stdio::fd_fdstat_set_rights),
        "fd_filestat_get" => match flavor {
            Flavor::Preview1 => host!(stdio::fd_filestat_get),
            Flavor::Unstable => host!(stdio::fd_filestat_get_unstable),
        },
        "fd_filestat_set_size" => host!(denied::fd_filestat_set_size),
        "fd_filestat_set_times" => host!(denied::fd_filestat_set_times),
        "fd_pread" => host!(stdio::fd_pread),
        "fd_prestat_get" => host!(stdio::fd_prestat_get),
        "fd_prestat_dir_name" => host!(stdio::fd_prestat_dir_name),
        "fd_pwrite" => host!(stdio::fd_pwrite),
        "fd_read" => host!(stdio::fd_read),
        "fd_readdir" => host!(denied::fd_readdir),
        "fd_renumber" => host!(denied::fd_renumber),
        "fd_seek" => host!(stdio::fd_seek),
        "fd_sync" => host!(denied::fd_sync),
        "fd_tell" => host!(stdio::fd_tell),
        "fd_write" => host!(stdio::fd_write),
        "path_create_directory" => host!(denied::path_create_directory),
        "path_filestat_get" => host!(denied::path_filestat_get),
        "path_filestat_set_times" => host!(denied::path_filestat_set_times),
        "path_link" => host!(denied::path_link),
        "path_open" => host!(denied::path_open),
        "path_readlink" => host!(denied::path_readlink),
        "path_remove_directory" => host!(denied::path_remove_directory),
        "path_rename" => host!(denied::path_rename),
        "path_symlink" => host!(denied::path_symlink),
        "path_unlink_file" => host!(denied::path_unlink_file),
        "poll_oneoff" => match flavor {
            Flavor::Preview1 => host!(poll::poll_oneoff),
            Flavor::Unstable => host!(poll::poll_oneoff_unstable),
        },
        "proc_exit" => host!(clocks::proc_exit),
        "proc_raise" => host!(clocks::proc_raise),
        "sched_yield" => host!(clocks::sched_yield),
        "random_get" => host!(clocks::random_get),
        "sock_accept" => host!(denied::sock_accept),
        "sock_recv" => host!(denied::sock_recv),
        "sock_send" => host!(denied::sock_send),
        "sock_shutdown" => host!(denied::sock_shutdown),
        _ => return None,
    })
}

/// For an import we don't know, perhaps from a later WASI revision or a toolchain
/// extension. It must still link, so the module can run as long as it never calls it. If
/// the result is a single i32 it is taken to be an errno, and NOSYS is the honest answer.
/// With any other shape there is no error channel, so the call traps.
pub(super) fn nosys_stub(
    store: &mut impl AsStoreMut,
    env: &FunctionEnv<WasiCtx>,
    module: &str,
    name: &str,
    ty: &FunctionType,
) -> Function {
    let returns_errno = ty.results() == [Type::I32];
    let what = format!("{module}.{name}");
    tracing::warn!(import = %what, signature = %ty, returns_errno, "unknown WASI import; linking a stub that denies it");
    Function::new_with_env(store, env, ty.clone(), move |_env, _args| {
        if returns_errno {
            Ok(vec![Value::I32(i32::from(NOSYS))])
        } else {
            Err(RuntimeError::new(format!(
                "wasi: `{what}` is not provided by this host, and its signature has no errno result to report that"
            )))
        }
    })
}
