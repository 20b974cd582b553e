//! The `synopsis` binary: everything lives in the library so tests can reach it; this file only
//! turns the outcome into an exit code.

fn main() -> std::process::ExitCode {
    synopsis_cli::main_with_args(std::env::args_os())
}
