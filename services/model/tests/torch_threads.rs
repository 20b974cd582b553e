//! A thread that runs libtorch serially starts no OpenMP team of its own, so the engine's team
//! keeps the cores to itself (see `synopsis_model::torch_threads`). Alone in its test binary:
//! it counts the process's OS threads, which concurrent tests would disturb.

use synopsis_model::torch_threads::run_serially_on_this_thread;
use tch::{Device, Kind, Tensor};

fn os_threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// OS threads a new thread adds to the process by running one large (parallel) op.
fn threads_added_by_a_parallel_op(big: &Tensor, serial: bool) -> usize {
    let big = big.shallow_clone();
    std::thread::spawn(move || {
        if serial {
            assert!(run_serially_on_this_thread(), "libtorch without OpenMP");
        }
        let before = os_threads();
        let sum = (&big * 2.0).sum(Kind::Float).double_value(&[]);
        assert_eq!(sum, 2.0 * big.numel() as f64);
        os_threads().saturating_sub(before)
    })
    .join()
    .unwrap()
}

#[test]
fn a_serial_thread_starts_no_openmp_team() {
    let big = Tensor::ones([1 << 22], (Kind::Float, Device::Cpu));
    assert_eq!(threads_added_by_a_parallel_op(&big, true), 0);
    if tch::get_num_threads() > 1 {
        // The control: without the setting, the same op starts a team.
        assert!(threads_added_by_a_parallel_op(&big, false) > 0);
    }
}
