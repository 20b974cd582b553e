//! A server under test as a child process: output captured to a log file, stopped the way
//! Kubernetes stops it (SIGTERM, then SIGKILL after a grace period) when the test lets go of
//! it, even when the test panics.

use std::ffi::OsStr;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rustix::process::{kill_process, Pid, Signal};
use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::health::health_status;

/// How long Drop waits after SIGTERM before SIGKILL, unless changed with `set_grace`.
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// How much of the log a failure message or a panicking test shows.
const LOG_TAIL_BYTES: usize = 6000;

/// A running child process whose stdout and stderr go to one log file in a temporary
/// directory. Dropping it stops the process; if the test is panicking, the log tail is
/// printed so the failure can be understood from the test output alone.
pub struct ServiceProcess {
    name: String,
    child: Mutex<Child>,
    log_path: PathBuf,
    grace: Duration,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for ServiceProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceProcess")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .field("log", &self.log_path)
            .finish()
    }
}

impl ServiceProcess {
    /// Starts `bin` with `args`, inheriting the environment. `bin` is a path (see
    /// [`crate::workspace_bin`]) or a bare name looked up in `PATH`.
    pub fn spawn<A>(bin: impl AsRef<Path>, args: A) -> anyhow::Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
    {
        Self::spawn_env(bin, args, std::iter::empty::<(&str, &str)>())
    }

    /// Like [`Self::spawn`], with extra environment variables.
    pub fn spawn_env<A, E, K, V>(bin: impl AsRef<Path>, args: A, envs: E) -> anyhow::Result<Self>
    where
        A: IntoIterator,
        A::Item: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let bin = bin.as_ref();
        if bin.components().count() > 1 && !bin.exists() {
            bail!(
                "{} does not exist: build the workspace binaries first \
                 (`cargo build --workspace` or `make test`)",
                bin.display()
            );
        }
        let mut command = Command::new(bin);
        command.args(args).envs(envs);
        Self::from_command(command)
    }

    /// Starts a prepared command (for a working directory or a cleared environment); its
    /// stdin, stdout and stderr are replaced.
    pub fn from_command(mut command: Command) -> anyhow::Result<Self> {
        let program = PathBuf::from(command.get_program());
        let name = program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".to_owned());
        let dir = tempfile::Builder::new()
            .prefix(&format!("synopsis-{name}-"))
            .tempdir()
            .context("cannot create a temporary directory for the log")?;
        let log_path = dir.path().join(format!("{name}.log"));
        let stdout = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let stderr = stdout.try_clone().context("cannot share the log file")?;
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Self {
            name,
            child: Mutex::new(child),
            log_path,
            grace: DEFAULT_GRACE,
            _dir: dir,
        })
    }

    /// Changes how long Drop waits between SIGTERM and SIGKILL.
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    /// The file receiving the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The last few kilobytes of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let mut start = log.len().saturating_sub(LOG_TAIL_BYTES);
        while !log.is_char_boundary(start) {
            start += 1;
        }
        log[start..].to_owned()
    }

    /// Resident memory of the process in bytes, `None` once it has exited.
    pub fn rss_bytes(&self) -> Option<u64> {
        if self.try_status().is_some() {
            return None;
        }
        synopsis_common::rss_bytes_of(self.pid())
    }

    /// Asks the process to stop, as Kubernetes does. No effect once it has exited.
    pub fn sigterm(&self) {
        self.signal(Signal::TERM);
    }

    /// Kills the process outright. No effect once it has exited.
    pub fn sigkill(&self) {
        self.signal(Signal::KILL);
    }

    fn signal(&self, signal: Signal) {
        let mut child = self.child();
        // Holding the lock while signalling: the child cannot be reaped (and its pid reused)
        // between the check and the kill.
        if child_status(&mut child).is_none() {
            if let Some(pid) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
                let _ = kill_process(pid, signal);
            }
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_status(&self) -> Option<ExitStatus> {
        child_status(&mut self.child())
    }

    /// Waits up to `timeout` for the process to exit. Blocks the calling thread (the server
    /// under test is another process, so nothing of it is starved).
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the log contains `needle`; false if the process exits or `timeout` passes
    /// first. Blocks the calling thread.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if self.try_status().is_some() {
                // One last look: the line may have been written just before exiting.
                return self.log().contains(needle);
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `grpc.health.v1.Health/Check` (service `""`) on plaintext `addr` until SERVING.
    /// Fails early, with the log tail, if the process exits.
    pub async fn wait_healthy(&self, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?;
        self.wait_healthy_at(endpoint, timeout).await
    }

    /// Like [`Self::wait_healthy`] for any endpoint (TLS, a custom authority).
    pub async fn wait_healthy_at(
        &self,
        endpoint: Endpoint,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                bail!(
                    "{} exited ({status}) before reporting SERVING; log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            let last = match health_status(endpoint.clone()).await {
                Ok(ServingStatus::Serving) => return Ok(()),
                Ok(status) => format!("status {}", status.as_str_name()),
                Err(err) => format!("{err:#}"),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "{} not SERVING at {} after {timeout:?} (last: {last}); log tail:\n{}",
                    self.name,
                    endpoint.uri(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        // A poisoned lock only means another thread panicked while holding it; the Child
        // itself is still usable.
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The exit status if the child has exited (reaping it), `None` while it runs. A failing
/// `try_wait` (the child was already reaped elsewhere) cannot happen here: only this type
/// waits on it.
fn child_status(child: &mut Child) -> Option<ExitStatus> {
    child.try_wait().ok().flatten()
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            self.sigterm();
            if self.wait_exit(self.grace).is_none() {
                self.sigkill();
                let _ = self.child().wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- {} (pid {}) log tail, {} ----\n{}",
                self.name,
                self.pid(),
                self.log_path.display(),
                self.log_tail()
            );
        }
    }
}
