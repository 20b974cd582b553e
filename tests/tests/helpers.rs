//! The end-to-end helpers themselves: processes are stopped on drop, logs are captured,
//! health waiting tells SERVING from not, ports and paths resolve.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use synopsis_tests::{fixture, free_port, workspace_bin, workspace_root, ServiceProcess};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

const LONG: Duration = Duration::from_secs(30);

fn is_running(pid: u32) -> bool {
    // A reaped child has no /proc entry; a zombie would still have one but shows state Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

#[test]
fn drop_stops_the_process() {
    let process = ServiceProcess::spawn("sleep", ["30"]).unwrap();
    let pid = process.pid();
    assert!(is_running(pid));
    assert!(process.rss_bytes().is_some_and(|rss| rss > 0));
    drop(process);
    assert!(!is_running(pid), "sleep {pid} survived drop");
}

#[test]
fn drop_escalates_to_sigkill_when_sigterm_is_ignored() {
    // `exec` keeps the ignored SIGTERM disposition, so this process really ignores it.
    let mut process =
        ServiceProcess::spawn("sh", ["-c", "trap '' TERM; echo ready; exec sleep 30"]).unwrap();
    process.set_grace(Duration::from_millis(200));
    assert!(process.wait_for_log("ready", LONG), "{}", process.log());
    process.sigterm();
    assert!(
        process.wait_exit(Duration::from_millis(300)).is_none(),
        "SIGTERM should have been ignored"
    );
    let pid = process.pid();
    drop(process);
    assert!(!is_running(pid), "process {pid} survived drop");
}

#[test]
fn sigterm_stops_and_wait_exit_reports_the_signal() {
    let process = ServiceProcess::spawn("sleep", ["30"]).unwrap();
    assert!(process.try_status().is_none());
    process.sigterm();
    let status = process.wait_exit(LONG).expect("sleep exits on SIGTERM");
    assert_eq!(status.signal(), Some(15));
    assert_eq!(process.rss_bytes(), None);
    // Signalling an exited process is harmless.
    process.sigterm();
}

#[test]
fn log_captures_stdout_and_stderr() {
    let process = ServiceProcess::spawn_env(
        "sh",
        ["-c", "echo to-out; echo \"$GREETING\" >&2"],
        [("GREETING", "to-err")],
    )
    .unwrap();
    let status = process.wait_exit(LONG).expect("sh exits");
    assert!(status.success());
    let log = process.log();
    assert!(log.contains("to-out") && log.contains("to-err"), "{log}");
    assert!(process.log_path().exists());
}

#[test]
fn missing_binary_is_a_clear_error() {
    let err = ServiceProcess::spawn(workspace_bin("no-such-binary"), ["x"]).unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("no-such-binary"), "{message}");
    assert!(message.contains("cargo build"), "{message}");
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("free port can be bound");
}

#[test]
fn paths_resolve_next_to_the_build_and_the_workspace() {
    let bin = workspace_bin("synopsis-trainer");
    let exe = std::env::current_exe().unwrap();
    // The test runs from target/<profile>/deps; binaries live in target/<profile>.
    assert_eq!(bin.parent(), exe.parent().and_then(Path::parent));
    assert!(bin.ends_with("synopsis-trainer"));
    let readme = fixture("README.md");
    assert!(readme.is_file(), "{}", readme.display());
    assert!(readme.starts_with(workspace_root()), "{}", readme.display());
}

#[tokio::test]
async fn wait_healthy_waits_for_serving_and_fails_when_the_process_dies() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = synopsis_common::health_service().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    // The helper watches a process while it polls; a sleeping stand-in plays the server.
    let stand_in = ServiceProcess::spawn("sleep", ["30"]).unwrap();

    let not_yet = stand_in
        .wait_healthy(addr, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        format!("{not_yet:#}").contains("NOT_SERVING"),
        "{not_yet:#}"
    );

    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    stand_in.wait_healthy(addr, LONG).await.unwrap();

    let dead = ServiceProcess::spawn("sh", ["-c", "echo bye; exit 3"]).unwrap();
    let err = dead
        .wait_healthy(([127, 0, 0, 1], free_port()).into(), LONG)
        .await
        .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("exited"), "{message}");
    assert!(message.contains("bye"), "{message}");
}
