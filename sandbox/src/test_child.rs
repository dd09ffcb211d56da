//! Running a confinement step in a child process: the steps are irreversible, and the test
//! harness's own process must keep its fds, uid and syscalls.

/// Forks, runs `check` in the child and fails the test with the child's message unless it
/// returned `Ok` and exited 0.
pub(crate) fn in_child(check: impl FnOnce() -> Result<(), String>) {
    let (read, write) = nix::unistd::pipe().unwrap();
    // SAFETY: the child runs only `check` and then `_exit`s, never returning into the test
    // harness; glibc's fork resets malloc's locks in the child, so allocating there is sound
    // even though the harness has other threads.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(read);
            let code = match check() {
                Ok(()) => 0,
                Err(message) => {
                    let _ = nix::unistd::write(&write, message.as_bytes());
                    1
                }
            };
            // SAFETY: _exit ends the child without running the harness's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write);
            let mut message = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut message).unwrap();
            let status = nix::sys::wait::waitpid(child, None).unwrap();
            assert_eq!(
                status,
                nix::sys::wait::WaitStatus::Exited(child, 0),
                "child failed: {message}"
            );
        }
    }
}
