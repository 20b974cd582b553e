//! Binaries linked against libtorch carry its directory as RUNPATH, so they run without
//! LD_LIBRARY_PATH, and do not link libtorch's CUDA half: a CPU host must not pay its ~230 MB,
//! and a GPU host must still get a working CUDA backend by loading it at run time. Each case
//! that loads libraries runs in a child process of this test binary, so what one loads cannot
//! leak into another.

use std::process::Command;

use synopsis_model::cuda_backend::{load_cuda_backend, nvidia_gpu_present, CUDA_LIBRARY};
use tch::{Device, Kind, Tensor};

/// Set in a child: which case it runs.
const CHILD_CASE: &str = "SYNOPSIS_LINKAGE_CASE";

fn dynamic_section() -> String {
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("readelf")
        .arg("-d")
        .arg(&exe)
        .output()
        .expect("run readelf");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the test `name` of this binary again in a child with `CHILD_CASE` set and returns its
/// standard output; panics with its output when it fails.
fn run_child(name: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .env(CHILD_CASE, name)
        .envs(env.iter().copied())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "child {name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn in_child(name: &str) -> bool {
    std::env::var(CHILD_CASE).as_deref() == Ok(name)
}

/// libtorch's messages run over many lines (a backtrace follows); the first says what failed.
fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn cuda_library_mapped() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains(CUDA_LIBRARY)
}

#[test]
fn binary_has_libtorch_runpath_and_no_cuda_library() {
    // Calling into libtorch makes this test binary link it like the services do.
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let dynamic = dynamic_section();
    let runpath = dynamic
        .lines()
        .find(|l| l.contains("(RUNPATH)") || l.contains("(RPATH)"))
        .unwrap_or_else(|| panic!("no RUNPATH:\n{dynamic}"));
    assert!(
        runpath.contains("torch/lib"),
        "RUNPATH lacks libtorch: {runpath}"
    );
    assert!(
        dynamic.contains("[libtorch_cpu.so]"),
        "libtorch_cpu.so not needed:\n{dynamic}"
    );
    assert!(
        !dynamic.contains(&format!("[{CUDA_LIBRARY}]")),
        "{CUDA_LIBRARY} is linked, so every process maps it:\n{dynamic}"
    );
}

#[test]
fn binary_runs_without_ld_library_path() {
    let name = "binary_runs_without_ld_library_path";
    if in_child(name) {
        let t = Tensor::ones([2], (Kind::Float, Device::Cpu));
        println!("sum={}", t.sum(Kind::Float).double_value(&[]));
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .env_remove("LD_LIBRARY_PATH")
        .env(CHILD_CASE, name)
        .args(["--exact", name, "--nocapture"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("sum=2"));
}

/// `auto` maps the CUDA half exactly when the host shows an NVIDIA GPU; `cpu` never does.
#[test]
fn auto_device_loads_cuda_only_on_gpu_hosts() {
    let name = "auto_device_loads_cuda_only_on_gpu_hosts";
    if in_child(name) {
        let spec = std::env::var("SYNOPSIS_LINKAGE_DEVICE").unwrap();
        let device = synopsis_model::parse_device(&spec).unwrap();
        println!(
            "device={} mapped={}",
            synopsis_model::device_name(device),
            cuda_library_mapped()
        );
        return;
    }
    let gpu = nvidia_gpu_present();
    let cpu = run_child(name, &[("SYNOPSIS_LINKAGE_DEVICE", "cpu")]);
    assert!(cpu.contains("device=cpu mapped=false"), "{cpu}");
    let auto = run_child(name, &[("SYNOPSIS_LINKAGE_DEVICE", "auto")]);
    assert!(auto.contains(&format!("mapped={gpu}")), "{auto}");
    if !gpu {
        assert!(auto.contains("device=cpu"), "{auto}");
    }
}

/// Loaded at run time, the CUDA half registers libtorch's CUDA backend: a CUDA tensor is made
/// on a GPU host, and on a CPU host the failure comes from the missing driver or device, not
/// from a backend libtorch does not know.
#[test]
fn runtime_loaded_cuda_backend_is_registered() {
    let name = "runtime_loaded_cuda_backend_is_registered";
    if in_child(name) {
        let before = Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0)));
        if let Err(e) = &before {
            println!("before: {}", first_line(e));
        }
        println!("loaded={:?}", load_cuda_backend());
        println!("mapped={}", cuda_library_mapped());
        println!("devices={}", tch::Cuda::device_count());
        match Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0))) {
            Ok(t) => println!("made={:?}", t.device()),
            Err(e) => println!("after: {}", first_line(&e)),
        }
        return;
    }
    let out = run_child(name, &[]);
    assert!(out.contains("loaded=Ok(())"), "{out}");
    assert!(out.contains("mapped=true"), "{out}");
    let unknown_backend = "from the 'CUDA' backend";
    // Without the library, libtorch has no CUDA kernels at all: the control this test needs.
    assert!(
        out.lines()
            .any(|l| l.contains("before: ") && l.contains(unknown_backend)),
        "{out}"
    );
    if nvidia_gpu_present() {
        assert!(out.contains("made=Cuda(0)"), "{out}");
    } else {
        let after = out
            .lines()
            .find(|l| l.contains("after: "))
            .unwrap_or_else(|| panic!("a CUDA tensor was made on a CPU host:\n{out}"));
        assert!(!after.contains(unknown_backend), "{out}");
        assert!(after.contains("NVIDIA") || after.contains("CUDA"), "{out}");
    }
}
