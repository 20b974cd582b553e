//! `synopsis`, the command line of the synopsis services: it trains a GPT-2 on a CSV through the
//! trainer, follows and plots runs, and streams generated synopses from the generator. It speaks
//! gRPC only (synopsis-proto), so it never links libtorch and installs anywhere.
//!
//! Exit codes: 0 ok, 1 local failure or a run that finished FAILED, 2 usage error,
//! 3 a server refused the request (gRPC status), 4 a server could not be reached.

pub mod cli;
pub mod connect;
pub mod generate;
pub mod model;
pub mod output;
pub mod plot;
pub mod progress;
pub mod runs;
pub mod train;

use clap::{CommandFactory, Parser};
use std::ffi::OsString;
use std::process::ExitCode;

use crate::cli::{Cli, Command};
use crate::connect::{CliError, Servers};

/// Parses `args` (program name first), runs the command and returns the process exit code.
pub fn main_with_args<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    // clap prints usage errors itself and exits with 2 (and 0 for --help / --version).
    let cli = Cli::parse_from(args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Error text quotes servers (status messages): printed escaped.
            eprintln!("error: {}", output::safe(&format!("{e:#}")));
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for an error: the one its `CliError` asks for, else 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|cause| cause.downcast_ref::<CliError>())
        .map_or(1, CliError::exit_code)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Completions(args) = &cli.command {
        let mut cmd = Cli::command();
        clap_complete::generate(args.shell, &mut cmd, "synopsis", &mut std::io::stdout());
        return Ok(());
    }
    let servers = Servers::from_args(&cli.global)?;
    let json = cli.global.json;
    match cli.command {
        Command::Train(args) => train::train(&servers, &args, json).await,
        Command::Watch(args) => train::watch(&servers, &args, json).await,
        Command::Runs => runs::list_runs(&servers, json).await,
        Command::Stop(args) => runs::stop(&servers, &args, json).await,
        Command::Checkpoints(args) => runs::checkpoints(&servers, &args, json).await,
        Command::Plot(args) => plot::plot(&servers, &args, json).await,
        Command::Generate(args) => generate::generate(&servers, &args, json).await,
        Command::Model => model::info(&servers, json).await,
        Command::Load(args) => model::load(&servers, &args, json).await,
        Command::Completions(_) => Ok(()),
    }
}
