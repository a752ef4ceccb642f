//! A persistent team of threads for decoding's many small parallel regions.
//!
//! One decoded token runs ~5 parallel regions per layer (the matvecs and the attention), each
//! only tens to hundreds of microseconds long. Through rayon every region wakes a worker
//! that may have gone to sleep (a futex round trip, in a VM often longer than the region's
//! own work), and the caller then frequently runs both halves itself. A `Team` keeps its
//! helpers spinning on one atomic counter between regions, so a fork costs one cache-line
//! transfer; helpers that see no work for `SPIN` park, so an idle decoder (a chat waiting
//! for input, a server waiting for requests) costs nothing, and they yield while spinning,
//! so an oversubscribed machine is not burnt.
//!
//! A job has one share per member. Each share is claimed once (a compare-and-swap of the
//! share's claim word to the job's epoch) by its own member or, when that member has not
//! started it by the time the leader is done with its own share (descheduled on a busy
//! machine, or still waking from a park), by the leader, which then runs it itself, as a
//! rayon caller would: a late helper costs no more than doing without it.
//!
//! Invariants: the leader (the thread that owns the team and calls `run`) publishes a job
//! only after every share of the previous one has been claimed and finished, so a stale
//! helper's claim always fails; a helper reads the job only after claiming a share of it,
//! and `run` returns (or unwinds) only after every claimed share has finished, which is what
//! makes lending the helpers a closure that borrows the leader's stack sound.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a helper spins (yielding now and then) after its last job before it parks.
const SPIN: Duration = Duration::from_millis(2);

/// A job as the helpers see it: the leader's closure with its lifetime erased (module docs).
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job (and once more to stop).
    epoch: AtomicU64,
    /// The current job; written by the leader only while no helper is running one.
    job: UnsafeCell<Job>,
    /// Shares of the current job finished by helpers.
    done: AtomicUsize,
    /// Per member: the epoch of the last job whose share was claimed.
    claims: Vec<AtomicU64>,
    /// Helpers parked or about to park (the leader unparks them when non-zero).
    sleeping: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
}

// SAFETY: `job` is written only by the leader between jobs (no helper reads it then) and
// read by helpers after an Acquire load of the epoch that the write happened before.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// A leader (the caller) and `threads() - 1` helper threads (module docs).
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` (the caller counts as one; 0 is taken as 1). Fails only when the
    /// OS refuses a thread.
    pub fn new(threads: usize) -> std::io::Result<Team> {
        let noop: &'static (dyn Fn(usize) + Sync) = &|_| {};
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: UnsafeCell::new(noop as Job),
            done: AtomicUsize::new(0),
            claims: (0..threads.max(1)).map(|_| AtomicU64::new(0)).collect(),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut team = Team { shared, helpers: Vec::new() };
        for id in 1..threads.max(1) {
            let shared = team.shared.clone();
            // Dropping `team` on an error stops and joins the helpers started so far.
            let handle = std::thread::Builder::new().name(format!("decode-{id}")).spawn(move || helper(&shared, id))?;
            team.helpers.push(handle);
        }
        Ok(team)
    }

    /// Members, the leader included.
    pub fn threads(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(id)` once for every share `id` in `0..threads()`, share 0 on the caller, and
    /// returns when all have finished; a helper's share runs on that helper, or on the
    /// caller when the helper is late (module docs). A panic in any share is re-raised here
    /// after every share has finished.
    pub fn run<F: Fn(usize) + Sync>(&mut self, f: F) {
        if self.helpers.is_empty() {
            return f(0);
        }
        let s = &*self.shared;
        s.panicked.store(false, Relaxed);
        let job: &(dyn Fn(usize) + Sync) = &f;
        // SAFETY: the erased reference is used only until every helper has counted itself
        // done, which `Wait` below ensures happens before `f` goes out of scope, even when
        // `f(0)` unwinds. `&mut self` makes this the only job in flight.
        unsafe { *s.job.get() = std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(job) };
        s.done.store(0, Relaxed);
        // SeqCst with the helpers' `sleeping` increment: either a helper about to park sees
        // the new epoch, or we see it sleeping and unpark it.
        let epoch = s.epoch.fetch_add(1, SeqCst) + 1;
        if s.sleeping.load(SeqCst) > 0 {
            self.helpers.iter().for_each(|h| h.thread().unpark());
        }
        /// Waits, even while unwinding, until the helpers have finished every share they
        /// claimed (all shares but the `.1` the leader ran).
        struct Wait<'a>(&'a Shared, usize, u64);
        impl Drop for Wait<'_> {
            fn drop(&mut self) {
                // Claim whatever is left, so no helper can start a share after we return.
                for c in &self.0.claims[1..] {
                    if claim(c, self.2) {
                        self.1 += 1;
                    }
                }
                let helpers = self.0.claims.len() - self.1;
                let mut spins = 0u32;
                while self.0.done.load(Acquire) < helpers {
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(1024) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        let mut wait = Wait(s, 1, epoch);
        s.claims[0].store(epoch, Relaxed);
        f(0);
        // The shares of helpers that have not started yet run here.
        for (id, c) in s.claims.iter().enumerate().skip(1) {
            if claim(c, epoch) {
                wait.1 += 1;
                f(id);
            }
        }
        drop(wait);
        if s.panicked.swap(false, Relaxed) {
            panic!("a decoding thread panicked");
        }
    }

    /// Splits `a` into `a.len() / ca` tasks of `ca` items and `b` into as many of `cb`,
    /// gives each member one contiguous range of tasks (even shares of at least `min` tasks,
    /// so small work stays on fewer members) and runs `f(first task, its a, its b)` on it.
    pub fn for_chunks2<A: Send, B: Send>(
        &mut self,
        a: &mut [A],
        ca: usize,
        b: &mut [B],
        cb: usize,
        min: usize,
        f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
    ) {
        let tasks = a.len().checked_div(ca).unwrap_or(0);
        assert!(b.len() >= tasks * cb, "for_chunks2: b holds fewer than {tasks} tasks of {cb}");
        let split = Split::new(tasks, self.threads(), min);
        if split.members <= 1 {
            // One member: no fork at all.
            if tasks > 0 {
                f(0, &mut a[..tasks * ca], &mut b[..tasks * cb]);
            }
            return;
        }
        let (pa, pb) = (SendPtr(a.as_mut_ptr()), SendPtr(b.as_mut_ptr()));
        self.run(|id| {
            let r = split.range(id);
            if r.is_empty() {
                return;
            }
            // SAFETY: `Split` gives the members disjoint task ranges inside `0..tasks`, so
            // these are disjoint in-bounds subslices of `a` and `b`, which `self.run` keeps
            // borrowed until every member is done.
            let (sa, sb) = unsafe {
                (
                    std::slice::from_raw_parts_mut(pa.get().add(r.start * ca), r.len() * ca),
                    std::slice::from_raw_parts_mut(pb.get().add(r.start * cb), r.len() * cb),
                )
            };
            f(r.start, sa, sb)
        });
    }

    /// `for_chunks2` over one slice.
    pub fn for_chunks<A: Send>(&mut self, a: &mut [A], ca: usize, min: usize, f: impl Fn(usize, &mut [A]) + Sync) {
        self.for_chunks2(a, ca, &mut [(); 0], 0, min, |t, a, _| f(t, a))
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        for h in self.helpers.drain(..) {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

/// Contiguous task ranges, one per member that works: as many members as get `min` tasks
/// each (at least one, at most the team), the tasks spread evenly over them (sizes differ
/// by at most one), so no member waits on another's larger share; members beyond get none.
#[derive(Clone, Copy)]
struct Split {
    tasks: usize,
    members: usize,
}

impl Split {
    fn new(tasks: usize, threads: usize, min: usize) -> Split {
        Split { tasks, members: (tasks / min.max(1)).clamp(1, threads.max(1)) }
    }
    /// The first task of member `id` (`tasks` for `id` ≥ members).
    fn start(&self, id: usize) -> usize {
        let id = id.min(self.members);
        let (base, extra) = (self.tasks / self.members, self.tasks % self.members);
        id * base + id.min(extra)
    }
    fn range(&self, id: usize) -> Range<usize> {
        self.start(id)..self.start(id + 1)
    }
}

struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only used to hand disjoint subslices of a `Send` slice to the members.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}
impl<T> SendPtr<T> {
    // A method (not a field access) so closures capture the whole `Sync` wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Claims the share of job `epoch` whose claim word is `c`; false when it is already taken
/// (or the job is over).
fn claim(c: &AtomicU64, epoch: u64) -> bool {
    let cur = c.load(Acquire);
    cur < epoch && c.compare_exchange(cur, epoch, AcqRel, Acquire).is_ok()
}

fn helper(s: &Shared, id: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for the next epoch: spin, yielding now and then, then park.
        let since = Instant::now();
        let mut spins = 0u32;
        while s.epoch.load(Acquire) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            if since.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            s.sleeping.fetch_add(1, SeqCst);
            if s.epoch.load(SeqCst) == seen {
                std::thread::park();
            }
            s.sleeping.fetch_sub(1, SeqCst);
        }
        // Possibly several jobs later than `seen`, when this thread was descheduled and the
        // leader ran our shares meanwhile.
        seen = s.epoch.load(Acquire);
        if s.stop.load(Acquire) {
            return;
        }
        if !claim(&s.claims[id], seen) {
            continue;
        }
        // SAFETY: we claimed a share of job `seen`, so the leader, which wrote `job` before
        // publishing that epoch, publishes no other job and keeps this one alive until we
        // count ourselves done.
        let job = unsafe { &**s.job.get() };
        if catch_unwind(AssertUnwindSafe(|| job(id))).is_err() {
            s.panicked.store(true, Relaxed);
        }
        s.done.fetch_add(1, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every member runs every job exactly once, and `run` returns only after all have: the
    /// sums a job's members add are complete when the leader reads them, over many short
    /// jobs (the spin path) and a few after the helpers have parked.
    #[test]
    fn every_member_runs_every_job_once() {
        for threads in [1, 2, 3, 4] {
            let mut team = Team::new(threads).unwrap();
            assert_eq!(team.threads(), threads);
            let hits: Vec<AtomicUsize> = (0..threads).map(|_| AtomicUsize::new(0)).collect();
            let total = AtomicUsize::new(0);
            let (leader, on_helpers) = (std::thread::current().id(), AtomicUsize::new(0));
            for round in 0..8_000usize {
                team.run(|id| {
                    // A few microseconds of work, so that helpers get to claim their shares.
                    let mut x = id as u64;
                    for i in 0..2000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    hits[id].fetch_add(1, Relaxed);
                    if std::thread::current().id() != leader {
                        on_helpers.fetch_add(1, Relaxed);
                    }
                    total.fetch_add(round, Relaxed);
                });
                assert_eq!(total.swap(0, Relaxed), round * threads, "round {round}, {threads} threads");
                if round % 2000 == 1999 {
                    // Let the helpers park, then wake them with the next job.
                    std::thread::sleep(SPIN * 3);
                }
            }
            for (id, h) in hits.iter().enumerate() {
                assert_eq!(h.load(Relaxed), 8_000, "member {id} of {threads}");
            }
            // The helpers do take part (the leader only runs the shares of late ones).
            assert_eq!(on_helpers.load(Relaxed) > 0, threads > 1, "{threads} threads");
        }
    }

    /// The leader's writes before a job and the members' writes in it are visible across
    /// the fork and the join (a chain of dependent phases, as a decode step is).
    #[test]
    fn phases_see_each_others_writes() {
        for threads in [2, 3, 4] {
            let mut team = Team::new(threads).unwrap();
            let n = 1000;
            let (mut a, mut b) = (vec![0u64; n], vec![0u64; n]);
            for phase in 0..2000u64 {
                let (src, dst) = if phase % 2 == 0 { (&a, &mut b) } else { (&b, &mut a) };
                let src = &src[..];
                team.for_chunks(dst, 1, 1, |t0, d| {
                    for (i, v) in d.iter_mut().enumerate() {
                        *v = src[(t0 + i + 1) % n] + 1;
                    }
                });
            }
            // After 2000 phases every element has been incremented 2000 times.
            assert!(a.iter().all(|&v| v == 2000), "{threads} threads");
        }
    }

    #[test]
    fn chunks_cover_every_task_once_in_contiguous_ranges() {
        for threads in [1, 2, 3, 4] {
            let mut team = Team::new(threads).unwrap();
            for (tasks, ca, cb, min) in
                [(0, 3, 2, 1), (1, 3, 2, 1), (7, 1, 5, 1), (100, 4, 3, 1), (100, 4, 3, 40), (10, 1, 1, 3), (5, 2, 0, 9)]
            {
                let mut a = vec![usize::MAX; tasks * ca];
                let mut b = vec![usize::MAX; tasks * cb + 3];
                team.for_chunks2(&mut a, ca, &mut b, cb, min, |t0, sa, sb| {
                    assert!(
                        sa.len() % ca == 0 && sb.len() == sa.len() / ca * cb,
                        "a chunk's a and b hold the same tasks"
                    );
                    for (i, v) in sa.iter_mut().enumerate() {
                        *v = t0 + i / ca;
                    }
                    for (i, v) in sb.iter_mut().enumerate() {
                        *v = t0 + i / cb;
                    }
                });
                for (i, &v) in a.iter().enumerate() {
                    assert_eq!(v, i / ca, "a[{i}] tasks={tasks} threads={threads}");
                }
                for (i, &v) in b.iter().enumerate().take(tasks * cb) {
                    assert_eq!(v, i / cb, "b[{i}] tasks={tasks} threads={threads}");
                }
                assert!(b[tasks * cb..].iter().all(|&v| v == usize::MAX), "b's tail beyond the tasks is untouched");
                let split = Split::new(tasks, threads, min);
                assert!(split.members >= 1 && split.members <= threads);
                let lens: Vec<usize> = (0..threads).map(|m| split.range(m).len()).collect();
                assert_eq!(lens.iter().sum::<usize>(), tasks);
                let working = &lens[..split.members];
                assert!(working.iter().all(|&n| n >= min.min(tasks)), "{lens:?}: a share under {min} tasks");
                assert!(working.iter().max().unwrap() - working.iter().min().unwrap() <= 1, "{lens:?}: uneven");
            }
        }
    }

    /// A panic in a helper's share reaches the leader, and the team keeps working after it.
    #[test]
    fn a_panicking_member_is_reported_and_the_team_survives() {
        let mut team = Team::new(3).unwrap();
        let caught = catch_unwind(AssertUnwindSafe(|| {
            team.run(|id| {
                if id == 2 {
                    panic!("member 2 fails");
                }
            })
        }));
        assert!(caught.is_err());
        let count = AtomicUsize::new(0);
        team.run(|_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 3);
        // And when the leader's own share panics, every share a helper started has finished
        // before `run` unwinds (the closure borrows this frame), and none starts after.
        let (started, finished) = (AtomicUsize::new(0), AtomicUsize::new(0));
        for _ in 0..50 {
            let caught = catch_unwind(AssertUnwindSafe(|| {
                team.run(|id| {
                    if id == 0 {
                        panic!("leader fails");
                    }
                    started.fetch_add(1, Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                    finished.fetch_add(1, Relaxed);
                })
            }));
            assert!(caught.is_err());
            assert_eq!(started.load(Relaxed), finished.load(Relaxed));
        }
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(started.load(Relaxed), finished.load(Relaxed));
        team.run(|_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 6);
    }
}
