//! Loads libtorch's CUDA half at run time, and only where it can be used: mapped and
//! initialised, `libtorch_cuda.so` and the CUDA libraries it pulls in cost a process about
//! 230 MB of resident memory, which a CPU node would carry for nothing. Binaries therefore do
//! not link it; [`parse_device`](crate::parse_device) loads it before the first CUDA query on
//! a host with an NVIDIA device node, or whenever CUDA is asked for by name.
//!
//! It must be loaded before anything asks libtorch about CUDA: libtorch looks its CUDA hooks up
//! once per process and keeps the answer.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::OnceLock;

/// The library that registers libtorch's CUDA kernels and hooks when it is loaded.
pub const CUDA_LIBRARY: &str = "libtorch_cuda.so";

/// libtorch's directory when this binary was built (its RUNPATH too); a fallback for
/// `dlopen`, which searches the caller's RUNPATH only from some call sites.
const BUILD_LIBTORCH_DIR: Option<&str> = option_env!("SYNOPSIS_LIBTORCH_LIB");

/// Device nodes the NVIDIA driver creates (and the container runtime mounts) on a GPU host.
const NVIDIA_DEVICE_NODES: [&str; 2] = ["/dev/nvidiactl", "/dev/nvidia0"];

static LOADED: OnceLock<Result<(), String>> = OnceLock::new();

/// True when this host shows an NVIDIA GPU to the process.
pub fn nvidia_gpu_present() -> bool {
    NVIDIA_DEVICE_NODES.iter().any(|p| Path::new(p).exists())
}

/// Loads the CUDA backend once per process; later calls return the first outcome. An error
/// names why (the loader's message), e.g. a CPU-only libtorch has no such library.
pub fn load_cuda_backend() -> Result<(), String> {
    LOADED.get_or_init(load_once).clone()
}

/// Whether [`load_cuda_backend`] has run and succeeded in this process.
pub fn cuda_backend_loaded() -> bool {
    matches!(LOADED.get(), Some(Ok(())))
}

fn load_once() -> Result<(), String> {
    let mut candidates = vec![CUDA_LIBRARY.to_string()];
    if let Some(dir) = BUILD_LIBTORCH_DIR {
        candidates.push(Path::new(dir).join(CUDA_LIBRARY).display().to_string());
    }
    let mut errors = Vec::new();
    for name in candidates {
        match dlopen_global(&name) {
            Ok(()) => {
                tracing::debug!(library = %name, "CUDA backend loaded");
                return Ok(());
            }
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

/// `dlopen(name, RTLD_NOW | RTLD_GLOBAL)`: the handle is never closed, the library stays for
/// the life of the process as if it had been linked.
#[allow(unsafe_code)]
fn dlopen_global(name: &str) -> Result<(), String> {
    let c_name = CString::new(name).map_err(|_| format!("bad library name {name:?}"))?;
    // SAFETY: a valid NUL-terminated name; the library's initialisers are libtorch's own
    // registration code, the same that would run at start-up had it been linked.
    let handle = unsafe { libc::dlopen(c_name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns null or a NUL-terminated string owned by the loader, read at once.
    let message = unsafe {
        let err = libc::dlerror();
        if err.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(err).to_string_lossy().into_owned()
        }
    };
    Err(message)
}
