//! Where things are: built binaries, the test fixtures, the Python venv, a free port.

use std::path::PathBuf;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let tests_crate = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    tests_crate
        .parent()
        .map(PathBuf::from)
        .unwrap_or(tests_crate)
}

/// Path of the workspace binary `name` built in the same profile as the running test:
/// `target/<profile>/<name>`, found from the test executable (`target/<profile>/deps/…`), so
/// it follows `CARGO_TARGET_DIR` and `--release`. The binary must already be built
/// (`cargo build --workspace` or `make test`); [`crate::ServiceProcess::spawn`] says so if not.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// `tests/fixtures/<rel>` in the repository: the files tests read but do not make (see its
/// README for each file's origin). Tests never read outside the repository.
pub fn fixture(rel: &str) -> PathBuf {
    workspace_root().join("tests/fixtures").join(rel)
}

/// The Python with torch and transformers used to cross-check checkpoints:
/// `$SYNOPSIS_PYTHON`, else the venv the Makefile creates under `~/.cache/synopsis`.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("SYNOPSIS_PYTHON") {
        return PathBuf::from(python);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/synopsis/torch-2.11.0/bin/python")
}

/// A TCP port on 127.0.0.1 that was free a moment ago: bound, read, released. Another
/// process may take it before the server under test binds it; on loopback in a test run that
/// is rare enough, and it is the only way to hand a port to a child process by flag.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("cannot bind an ephemeral port on 127.0.0.1: {err}"))
}
