//! The command line itself: usage errors exit with 2 and say what is wrong, every subcommand
//! has help, completions are generated, and unreachable servers exit with 4 and say how to
//! start them.

mod common;

use clap::CommandFactory;
use common::{closed_port, run, stderr, stdout};
use synopsis_cli::cli::Cli;

#[tokio::test]
async fn bad_arguments_exit_2_with_a_message() {
    let out = run(&["train"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("--data"), "{err}");

    let out = run(&["generate", "--top-k", "many"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("invalid value 'many'"),
        "{}",
        stderr(&out)
    );

    let out = run(&["generate", "--condition", "novalue"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("KEY=VALUE"), "{}", stderr(&out));

    let out = run(&["train", "--data", "a.csv", "--data-path", "b.csv"]).await;
    assert_eq!(out.status.code(), Some(2));

    let out = run(&["frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2));
}

/// A negative sampling number is a value, not an unknown flag: it reaches the generator, whose
/// INVALID_ARGUMENT names the field (clap would otherwise answer "unexpected argument '-1'").
#[test]
fn negative_sampling_numbers_parse_as_values() {
    use clap::Parser;
    use synopsis_cli::cli::Command;
    let cli = Cli::try_parse_from([
        "synopsis",
        "generate",
        "In the year 2199,",
        "--temperature",
        "-1",
        "--top-p",
        "-0.5",
        "--repetition-penalty",
        "-2",
    ])
    .expect("negative numbers parse");
    let Command::Generate(args) = cli.command else {
        panic!("parsed as another subcommand");
    };
    assert_eq!(args.temperature, -1.0);
    assert_eq!(args.top_p, -0.5);
    assert_eq!(args.repetition_penalty, -2.0);
}

#[tokio::test]
async fn help_works_on_every_subcommand() {
    let out = run(&["--help"]).await;
    assert_eq!(out.status.code(), Some(0));
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .filter(|n| n != "help")
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        assert!(
            stdout(&out).contains(name.as_str()),
            "top help lists {name}"
        );
        let out = run(&[name, "--help"]).await;
        assert_eq!(out.status.code(), Some(0), "{name} --help");
        let text = stdout(&out);
        assert!(
            text.contains(&format!("Usage: synopsis {name}")),
            "{name}: {text}"
        );
        assert!(text.contains("--trainer"), "{name} shows the global flags");
    }
}

/// Output into a pipe whose reader is gone (`synopsis runs | head -1`) ends the process by
/// SIGPIPE, like any Unix filter, instead of a panic and its backtrace.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(common::BIN)
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

#[tokio::test]
async fn completions_are_generated() {
    let out = run(&["completions", "bash"]).await;
    assert_eq!(out.status.code(), Some(0));
    let script = stdout(&out);
    assert!(script.contains("synopsis") && script.contains("generate"));
}

/// A malformed address is the user's to fix (exit 2, saying how), not an unreachable server.
#[tokio::test]
async fn malformed_addresses_exit_2_and_say_what_to_fix() {
    for (flag, url, says) in [
        (
            "--trainer",
            "127.0.0.1:50051",
            "add the scheme, e.g. `http://127.0.0.1:50051`",
        ),
        ("--trainer", "notaurl", "add the scheme"),
        ("--trainer", "ftp://127.0.0.1:1", "use http:// or https://"),
        ("--trainer", "http://", "not a valid address"),
        (
            "--generator",
            "localhost:50052",
            "--generator `localhost:50052` is not a URL",
        ),
    ] {
        let command = if flag == "--trainer" { "runs" } else { "model" };
        let out = run(&[flag, url, command]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{url}: {err}");
        assert!(err.contains(says), "{url}: {err}");
        assert!(!err.contains("cannot reach"), "{url}: {err}");
    }
}

#[tokio::test]
async fn unreachable_trainer_exits_4_and_says_how_to_start_it() {
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}");
    let expected = format!(
        "cannot reach the trainer at {url}: is it running? start it with \
         `synopsis-trainer --listen 127.0.0.1:{port} --root DIR`"
    );
    for args in [
        vec!["runs"],
        vec!["watch", "run-1"],
        vec!["stop", "run-1"],
        vec!["checkpoints"],
        vec!["plot", "run-1", "-o", "loss.svg"],
        vec!["train", "--data-path", "anime.csv"],
    ] {
        let mut all = vec!["--trainer", url.as_str()];
        all.extend(args.iter().copied());
        let out = run(&all).await;
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn unreachable_generator_exits_4_and_says_how_to_start_it() {
    let port = closed_port();
    let url = format!("http://127.0.0.1:{port}");
    let expected = format!(
        "cannot reach the generator at {url}: is it running? start it with \
         `synopsis-generator --listen 127.0.0.1:{port} --trainer http://127.0.0.1:50051`"
    );
    for args in [
        vec!["generate", "Hello"],
        vec!["model"],
        vec!["load", "run-1/step-000001"],
    ] {
        let mut all = vec!["--generator", url.as_str()];
        all.extend(args.iter().copied());
        let out = run(&all).await;
        assert_eq!(out.status.code(), Some(4), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}
