//! A small team of helper threads that share one decoding step's matrix products with the
//! thread that decodes. A step on CPU is a few dozen short, memory-bound products; libtorch's
//! OpenMP team charges a fork and a join for each and then spins for milliseconds, and one core
//! alone reads weights at about half the machine's bandwidth. This team spins only briefly
//! between jobs, then parks, so the cores are free again while the engine samples and streams.

#![allow(unsafe_code)]

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks: longer than the gaps between the products of
/// one step (microseconds), shorter than the engine's work between steps, so a helper never
/// holds a core the server needs.
const SPIN_BEFORE_PARK: Duration = Duration::from_micros(100);

/// What every member runs: `job(member, members)`.
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

/// A thin pointer the helpers can load atomically; it points at the caller's `&Job`.
struct JobSlot<'a>(&'a Job<'a>);

struct Shared {
    /// Bumped once per job; a helper runs the job when it sees a new value.
    epoch: AtomicU64,
    job: AtomicPtr<JobSlot<'static>>,
    /// Helpers that finished the current job.
    done: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Per helper: parked (or about to park), so the caller must unpark it.
    parked: Vec<AtomicBool>,
}

pub(crate) struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `members` threads in all: the caller of [`run`](Self::run) and
    /// `members - 1` helpers.
    /// If a helper cannot be started, the team is the caller alone: members must be numbered
    /// without gaps for the work to be split completely.
    pub fn new(members: usize) -> Team {
        let helper_count = members.max(1) - 1;
        let shared = |helper_count: usize| {
            Arc::new(Shared {
                epoch: AtomicU64::new(0),
                job: AtomicPtr::new(std::ptr::null_mut()),
                done: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                parked: (0..helper_count).map(|_| AtomicBool::new(false)).collect(),
            })
        };
        let mut team = Team {
            shared: shared(helper_count),
            helpers: Vec::with_capacity(helper_count),
        };
        for i in 0..helper_count {
            let for_helper = Arc::clone(&team.shared);
            let spawned = std::thread::Builder::new()
                .name(format!("decode-helper-{}", i + 1))
                .spawn(move || helper_loop(&for_helper, i));
            match spawned {
                Ok(handle) => team.helpers.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a decoding helper; decoding alone");
                    drop(team); // stops and joins the helpers already started
                    return Team {
                        shared: shared(0),
                        helpers: Vec::new(),
                    };
                }
            }
        }
        team
    }

    /// Members, the caller included.
    pub fn members(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Wakes parked helpers, so they are spinning when the next job comes: a parked thread
    /// takes tens of microseconds to run again, about what a caller spends preparing a step.
    pub fn wake(&self) {
        for (flag, handle) in self.shared.parked.iter().zip(&self.helpers) {
            if flag.load(Ordering::SeqCst) {
                handle.thread().unpark();
            }
        }
    }

    /// Runs `job(member, members)` on every member at once and returns when all are done. A
    /// panic in any member is raised here, after every member has stopped using `job`.
    pub fn run(&self, job: &(dyn Fn(usize, usize) + Sync)) {
        let members = self.members();
        if members == 1 {
            job(0, 1);
            return;
        }
        let slot = JobSlot(job);
        let shared = &*self.shared;
        shared.done.store(0, Ordering::Relaxed);
        // SAFETY of the lifetime erasure: helpers dereference the slot only between seeing the
        // new epoch and incrementing `done`, and this function does not return (or unwind)
        // before `done` counts every helper.
        let erased = (&slot as *const JobSlot<'_>)
            .cast_mut()
            .cast::<JobSlot<'static>>();
        shared.job.store(erased, Ordering::Relaxed);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        for (flag, handle) in shared.parked.iter().zip(&self.helpers) {
            if flag.load(Ordering::SeqCst) {
                handle.thread().unpark();
            }
        }
        let own = catch_unwind(AssertUnwindSafe(|| job(0, members)));
        let helpers = self.helpers.len();
        let mut spins = 0u32;
        while shared.done.load(Ordering::Acquire) < helpers {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        if let Err(payload) = own {
            resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a decoding helper thread panicked");
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for handle in &self.helpers {
            handle.thread().unpark();
        }
        for handle in self.helpers.drain(..) {
            let _ = handle.join();
        }
    }
}

fn helper_loop(shared: &Shared, index: usize) {
    let member = index + 1;
    let mut seen = 0u64;
    loop {
        let Some(epoch) = wait_for_job(shared, index, seen) else {
            return;
        };
        seen = epoch;
        let slot = shared.job.load(Ordering::Acquire);
        // SAFETY: `run` published this slot before bumping the epoch and keeps it alive until
        // this helper increments `done` below.
        let job = unsafe { (*slot).0 };
        let members = shared.parked.len() + 1;
        if catch_unwind(AssertUnwindSafe(|| job(member, members))).is_err() {
            shared.panicked.store(true, Ordering::Release);
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// Spins, then parks, until the epoch moves past `seen`; `None` when the team is dropped.
fn wait_for_job(shared: &Shared, index: usize, seen: u64) -> Option<u64> {
    let mut since = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if epoch != seen {
            return Some(epoch);
        }
        if shared.stop.load(Ordering::Acquire) {
            return None;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) || since.elapsed() < SPIN_BEFORE_PARK {
            std::hint::spin_loop();
            continue;
        }
        // Announce the park, then look again: `run` bumps the epoch before it reads the flag,
        // so either it unparks this thread or this thread sees the new epoch.
        shared.parked[index].store(true, Ordering::SeqCst);
        if shared.epoch.load(Ordering::SeqCst) == seen && !shared.stop.load(Ordering::SeqCst) {
            std::thread::park();
        }
        shared.parked[index].store(false, Ordering::SeqCst);
        since = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn every_member_runs_each_job_once_with_its_own_index() {
        let team = Team::new(3);
        for round in 0..200 {
            let seen = Mutex::new(Vec::new());
            team.run(&|member, members| {
                seen.lock().unwrap().push((member, members));
            });
            let mut seen = seen.into_inner().unwrap();
            seen.sort_unstable();
            assert_eq!(seen, vec![(0, 3), (1, 3), (2, 3)], "round {round}");
            if round % 50 == 0 {
                // Long enough for the helpers to park: the next job must wake them.
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    #[test]
    fn a_panicking_helper_is_reported_to_the_caller_and_the_team_keeps_working() {
        let team = Team::new(2);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            team.run(&|member, _| assert!(member == 0, "helper fails"));
        }));
        assert!(outcome.is_err());
        let count = AtomicUsize::new(0);
        team.run(&|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_team_of_one_runs_the_job_on_the_caller() {
        let team = Team::new(1);
        let caller = std::thread::current().id();
        team.run(&|member, members| {
            assert_eq!((member, members), (0, 1));
            assert_eq!(std::thread::current().id(), caller);
        });
    }
}
