//! What this machine can do, measured in the same run as the benchmark it qualifies: float32
//! GEMM FLOP/s (the ceiling of training and of decoding many streams at once), copy and
//! cache-read bandwidth (the ceilings of one-stream decoding, which reads every weight once per
//! token) and a process's resident memory.

use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

/// FLOP/s of an `n × n × n` float32 matmul with libtorch (best of `reps`).
pub fn gemm_flops(n: i64, reps: usize) -> f64 {
    let _guard = tch::no_grad_guard();
    let a = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([n, n], (Kind::Float, Device::Cpu));
    let out = Tensor::empty([n, n], (Kind::Float, Device::Cpu));
    2.0 * (n as f64).powi(3)
        / best_seconds(reps, || {
            let _ = a.mm_out(&out, &b);
        })
}

/// Seconds of the fastest of `reps` calls of `work`, after one untimed call that warms caches
/// and allocators: the machine is shared, and the best run is the least disturbed one.
fn best_seconds(reps: usize, mut work: impl FnMut()) -> f64 {
    work();
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        work();
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// Bytes copied per second by a `bytes`-sized float32 tensor copy (best of `reps`). This is the
/// rate at which a decoding step can stream weights it reads once each.
pub fn copy_bandwidth(bytes: usize, reps: usize) -> f64 {
    let _guard = tch::no_grad_guard();
    let numel = (bytes / 4) as i64;
    let src = Tensor::ones([numel], (Kind::Float, Device::Cpu));
    let mut dst = Tensor::zeros([numel], (Kind::Float, Device::Cpu));
    (numel * 4) as f64 / best_seconds(reps, || dst.copy_(&src))
}

/// Bytes read per second by summing a `bytes`-sized float32 tensor (best of `reps`). Sized like
/// a small model's weights, the buffer stays in the last-level cache, so this is the rate at
/// which a decoding step can stream weights that fit there.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let _guard = tch::no_grad_guard();
    let numel = (bytes / 4) as i64;
    let src = Tensor::ones([numel], (Kind::Float, Device::Cpu));
    (numel * 4) as f64
        / best_seconds(reps, || {
            let _ = src.sum(Kind::Float).double_value(&[]);
        })
}

/// Resident memory (VmRSS) of process `pid`, or of this process for `None`.
pub fn rss_bytes(pid: Option<u32>) -> anyhow::Result<u64> {
    status_field(pid, "VmRSS:")
}

/// Peak resident memory (VmHWM) of process `pid`, or of this process for `None`.
pub fn peak_rss_bytes(pid: Option<u32>) -> anyhow::Result<u64> {
    status_field(pid, "VmHWM:")
}

fn status_field(pid: Option<u32>, field: &str) -> anyhow::Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{path} has no {field}"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("unreadable {line:?} in {path}"))?;
    Ok(kib * 1024)
}
