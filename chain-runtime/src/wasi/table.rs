//! The import table: which host function each WASI name links to, and the stub for names it
//! doesn't know.

use wasmer::{AsStoreMut, Function, FunctionEnv, FunctionType, RuntimeError, Type, Value};

use super::errno::*;
use super::{Flavor, WasiCtx, args, clocks, denied, paths, poll, stdio};

/// Expands one list into both [`KNOWN_FUNCTIONS`] and `known_function`, so that the two can't
/// disagree. After `|` comes the function for `wasi_unstable`, for the calls whose layout
/// differs there.
macro_rules! import_table {
    ($($module:ident::$name:ident $(| $unstable_module:ident::$unstable:ident)?,)*) => {
        /// Every WASI function this module implements (or denies) by name, for both namespaces.
        pub const KNOWN_FUNCTIONS: &[&str] = &[$(stringify!($name)),*];

        pub(super) fn known_function(
            store: &mut impl AsStoreMut,
            env: &FunctionEnv<WasiCtx>,
            flavor: Flavor,
            name: &str,
        ) -> Option<Function> {
            Some(match name {
                $(stringify!($name) => {
                    $(if flavor == Flavor::Unstable {
                        return Some(Function::new_typed_with_env(
                            store,
                            env,
                            $unstable_module::$unstable,
                        ));
                    })?
                    Function::new_typed_with_env(store, env, $module::$name)
                })*
                _ => return None,
            })
        }
    };
}

import_table! {
    args::args_get,
    args::args_sizes_get,
    args::environ_get,
    args::environ_sizes_get,
    clocks::clock_res_get,
    clocks::clock_time_get,
    paths::fd_advise,
    paths::fd_allocate,
    stdio::fd_close,
    paths::fd_datasync,
    stdio::fd_fdstat_get,
    stdio::fd_fdstat_set_flags,
    stdio::fd_fdstat_set_rights,
    stdio::fd_filestat_get | stdio::fd_filestat_get_unstable,
    paths::fd_filestat_set_size,
    paths::fd_filestat_set_times,
    stdio::fd_pread,
    stdio::fd_prestat_get,
    stdio::fd_prestat_dir_name,
    stdio::fd_pwrite,
    stdio::fd_read,
    paths::fd_readdir,
    paths::fd_renumber,
    stdio::fd_seek | stdio::fd_seek_unstable,
    paths::fd_sync,
    stdio::fd_tell,
    stdio::fd_write,
    paths::path_create_directory,
    paths::path_filestat_get | paths::path_filestat_get_unstable,
    paths::path_filestat_set_times,
    paths::path_link,
    paths::path_open,
    paths::path_readlink,
    paths::path_remove_directory,
    paths::path_rename,
    paths::path_symlink,
    paths::path_unlink_file,
    poll::poll_oneoff | poll::poll_oneoff_unstable,
    clocks::proc_exit,
    clocks::proc_raise,
    clocks::sched_yield,
    clocks::random_get,
    denied::sock_accept,
    denied::sock_recv,
    denied::sock_send,
    denied::sock_shutdown,
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
