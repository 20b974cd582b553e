//! Keeps libtorch's CPU thread teams from outnumbering the cores.
//!
//! libtorch parallelises CPU ops with OpenMP, and OpenMP gives every OS thread that runs a
//! parallel op a team of its own. Once the threads of all teams outnumber the cores, OpenMP
//! stops spinning between parallel regions and parks its threads in the kernel, so every op
//! pays a wake-up. A decode step is ~100 small ops: a model loaded on a second thread made the
//! engine's steps 2.5× slower on a 2-core machine (3.1 ms against 8.3 ms per token, 4 × 256
//! model). Threads that only load or save models, where a few milliseconds do not matter,
//! therefore run libtorch serially and leave the parallel team to the thread that decodes.

use std::ffi::CStr;
use std::sync::OnceLock;

type SetNumThreads = unsafe extern "C" fn(libc::c_int);

/// OpenMP's per-thread setter, found in the libgomp libtorch loaded; None without OpenMP.
fn omp_set_num_threads() -> Option<SetNumThreads> {
    static SYMBOL: OnceLock<Option<SetNumThreads>> = OnceLock::new();
    *SYMBOL.get_or_init(lookup)
}

#[allow(unsafe_code)]
fn lookup() -> Option<SetNumThreads> {
    const NAME: &CStr = c"omp_set_num_threads";
    // SAFETY: dlsym on the global scope with a NUL-terminated name; a non-null result is the
    // address of OpenMP's `void omp_set_num_threads(int)`, which the transmute types as such.
    unsafe {
        let address = libc::dlsym(libc::RTLD_DEFAULT, NAME.as_ptr());
        (!address.is_null())
            .then(|| std::mem::transmute::<*mut libc::c_void, SetNumThreads>(address))
    }
}

/// Makes libtorch run every op of the calling thread on that thread alone, without an OpenMP
/// team; other threads keep theirs. Returns false (and changes nothing) when libtorch was
/// built without OpenMP.
#[allow(unsafe_code)]
pub fn run_serially_on_this_thread() -> bool {
    // libtorch sets each thread's OpenMP thread count once, on its first query from that
    // thread; asking first keeps that initialisation from undoing the setting below.
    let _ = tch::get_num_threads();
    match omp_set_num_threads() {
        Some(set) => {
            // SAFETY: OpenMP's setter for the calling thread's own thread count.
            unsafe { set(1) };
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn threads_in_new_thread(serial: bool) -> i32 {
        std::thread::spawn(move || {
            if serial {
                assert!(run_serially_on_this_thread(), "libtorch without OpenMP");
            }
            tch::get_num_threads()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn only_the_calling_thread_runs_serially() {
        let before = threads_in_new_thread(false);
        assert_eq!(threads_in_new_thread(true), 1);
        assert_eq!(
            threads_in_new_thread(false),
            before,
            "another thread changed"
        );
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            assert!(before > 1, "a parallel thread has {before} thread(s)");
        }
    }
}
