//! Binaries linked against libtorch carry its directory as RUNPATH and keep libtorch_cuda.so as
//! a needed library, so they run without LD_LIBRARY_PATH and use CUDA on a GPU node. A CPU-only
//! CI run catches a regression here before a GPU node silently falls back to the CPU.

use std::process::Command;

#[test]
fn test_binary_has_libtorch_runpath_and_cuda_library() {
    // Calling into libtorch makes this test binary link it like the services do.
    let _ = tch::Cuda::is_available();
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("readelf")
        .arg("-d")
        .arg(&exe)
        .output()
        .expect("run readelf");
    let dynamic = String::from_utf8_lossy(&output.stdout);
    let runpath = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .unwrap_or_else(|| panic!("no RUNPATH in {}:\n{dynamic}", exe.display()));
    assert!(
        runpath.contains("torch/lib"),
        "RUNPATH lacks libtorch: {runpath}"
    );
    assert!(
        dynamic.contains("[libtorch_cpu.so]"),
        "libtorch_cpu.so not needed:\n{dynamic}"
    );
    assert!(
        dynamic.contains("[libtorch_cuda.so]"),
        "libtorch_cuda.so dropped by the linker:\n{dynamic}"
    );
}

#[test]
fn test_binary_runs_without_ld_library_path() {
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .env_remove("LD_LIBRARY_PATH")
        .args([
            "--exact",
            "test_binary_has_libtorch_runpath_and_cuda_library",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
