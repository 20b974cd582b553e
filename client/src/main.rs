//! The `synopsis` binary: everything lives in the library so tests can reach it; this file only
//! sets up the process and turns the outcome into an exit code.

fn main() -> std::process::ExitCode {
    restore_default_sigpipe();
    synopsis_cli::main_with_args(std::env::args_os())
}

/// Rust starts programs with SIGPIPE ignored, so `synopsis runs | head -1` would panic on the
/// first print after `head` exits. The default action ends the process quietly instead, as it
/// does for every Unix filter. Sockets are unaffected: std sends on them with `MSG_NOSIGNAL`.
#[cfg(unix)]
#[allow(unsafe_code)]
fn restore_default_sigpipe() {
    // SAFETY: runs first in `main`, before any other thread exists, and SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

#[cfg(not(unix))]
fn restore_default_sigpipe() {}
