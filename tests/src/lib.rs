//! Helpers for end-to-end tests: find the workspace's binaries and data, pick ports, run a
//! server as a child process with its log captured, and wait for it to report healthy.
//! Nothing here links libtorch, so these helpers build on any machine.

mod health;
mod paths;
mod process;

pub use health::health_status;
pub use paths::{fixture, free_port, python, workspace_bin, workspace_root};
pub use process::ServiceProcess;
