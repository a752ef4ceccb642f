//! The MPI runtime: one communication thread makes every MPI call (MPI is initialised on it
//! with `MPI_THREAD_FUNNELED`), the training threads talk to it through one mutex-guarded
//! state and a condition variable, and a watchdog thread bounds every MPI call.
//!
//! Per update the communication thread walks the buckets in the order the backward finishes
//! them, once per round of micro-batches (`exact`) or once (`allreduce`): it waits until the
//! bucket's buffer is full, copies it to its own send buffer (freeing the bucket for the next
//! micro-batch), and runs the bucket's collectives while the backward goes on. Then it waits
//! for the trainer's `finish`, gathers the losses and stop wishes, and hands the reduced
//! gradient back. Every rank issues the same collectives in the same order by construction.

use super::{Agreement, CommStats, Exchange, Plan, ReduceMode};
use crate::model::GradReady;
use anyhow::{Context, Result, anyhow, bail};
use mpi::datatype::{Partition, PartitionMut};
use mpi::traits::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Set once training has ended without an error (`mark_success`). Without it the
/// communication thread leaves MPI unfinalised when it stops: a rank that fails must not
/// wait in `MPI_Finalize` for peers that wait in a collective for it; exiting without
/// finalising makes `mpirun` end the whole job instead.
static SUCCESS: AtomicBool = AtomicBool::new(false);

/// Declares that this rank's training ended without an error, so MPI is finalised normally
/// when the runtime is dropped.
pub fn mark_success() {
    SUCCESS.store(true, Ordering::SeqCst);
}

/// A bucket's copy-out buffer.
struct Fill {
    /// `[bucket len]` values of the micro-batch being reported
    data: Vec<f32>,
    /// Values reported so far in the current fill.
    filled: usize,
    /// Complete fills in this update (the round being filled).
    fills: usize,
    /// Complete and not yet taken by the communication thread.
    full: bool,
}

/// What the trainer hands over at the end of an update.
struct FinishRequest {
    /// This rank's mean loss per local micro-batch, then its stop wish (0 or 1).
    losses_and_stop: Vec<f64>,
    /// The buffer the next update's reduced gradient goes into.
    next_acc: Vec<f32>,
}

/// What the communication thread hands back.
struct Reduced {
    grads: Vec<f32>,
    /// Rank-major: every rank's `rounds` losses and stop wish.
    gathered: Vec<f64>,
}

struct State {
    fills: Vec<Fill>,
    finish: Option<FinishRequest>,
    result: Option<Reduced>,
    shutdown: bool,
}

struct Shared {
    plan: Plan,
    state: Mutex<State>,
    changed: Condvar,
    /// Nanoseconds the reporting threads waited for a bucket buffer in this update.
    fill_wait_ns: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain buffers: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed.wait(guard).unwrap_or_else(|e| e.into_inner())
    }

    /// Copies one reported gradient tensor into its bucket; marks the bucket full when it is
    /// complete and its round is one the communication thread exchanges.
    fn report(&self, at: usize, values: &[f32]) {
        let Some(b) = self.plan.bucket_of(at) else { return };
        let range = &self.plan.buckets[b];
        let start = at - range.start;
        let exchanged = |fills: usize| self.plan.mode == ReduceMode::Exact || fills + 1 == self.plan.rounds;
        let mut st = self.lock();
        if st.fills[b].full {
            let t = Instant::now();
            while st.fills[b].full && !st.shutdown {
                st = self.wait(st);
            }
            self.fill_wait_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        let fill = &mut st.fills[b];
        if exchanged(fill.fills) {
            fill.data[start..start + values.len()].copy_from_slice(values);
        }
        fill.filled += values.len();
        if fill.filled == range.len() {
            fill.filled = 0;
            fill.full = exchanged(fill.fills);
            fill.fills += 1;
            self.changed.notify_all();
        }
    }
}

/// Milliseconds since `EPOCH` of the MPI call in progress (0: none), for the watchdog.
struct Watch {
    epoch: Instant,
    busy_since_ms: AtomicU64,
}

impl Watch {
    fn enter(&self) {
        self.busy_since_ms.store(self.epoch.elapsed().as_millis() as u64 + 1, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.busy_since_ms.store(0, Ordering::SeqCst);
    }
}

enum Setup {
    Agree([u64; 3]),
    Train(Arc<Shared>, Vec<f32>),
}

/// An MPI job this process is a rank of. Made before the data is loaded (so ranks > 0 can
/// be silenced early); `agree` and `exchange` follow.
pub struct MpiRuntime {
    pub rank: usize,
    pub size: usize,
    setup: Sender<Setup>,
    replies: Receiver<Result<Vec<u64>, String>>,
    thread: Option<JoinHandle<()>>,
    shared: Option<Arc<Shared>>,
}

impl MpiRuntime {
    /// Initialises MPI on a new communication thread. `timeout` bounds every MPI call.
    pub fn start(timeout: Duration) -> Result<MpiRuntime> {
        let (setup_tx, setup_rx) = channel();
        let (reply_tx, reply_rx) = channel();
        let thread = std::thread::Builder::new()
            .name("anetrain-mpi".into())
            .spawn(move || comm_thread(timeout, setup_rx, reply_tx))
            .context("cannot start the MPI communication thread")?;
        let first = reply_rx.recv().map_err(|_| anyhow!("the MPI communication thread stopped during start-up"));
        let words = first?.map_err(|e| anyhow!(e))?;
        Ok(MpiRuntime {
            rank: words[0] as usize,
            size: words[1] as usize,
            setup: setup_tx,
            replies: reply_rx,
            thread: Some(thread),
            shared: None,
        })
    }

    fn ask(&self, msg: Setup) -> Result<Vec<u64>> {
        self.setup.send(msg).map_err(|_| anyhow!("the MPI communication thread stopped"))?;
        let reply = self.replies.recv().map_err(|_| anyhow!("the MPI communication thread stopped"))?;
        reply.map_err(|e| anyhow!(e))
    }

    /// Every rank's digests must equal rank 0's (one sentence from rank 0 otherwise).
    pub fn agree(&self, mine: Agreement) -> Result<()> {
        let all = self.ask(Setup::Agree(mine.to_words()))?;
        Agreement::check_all(&all, self.rank)
    }

    /// The exchange for training with `plan`; allocates its buffers (about one gradient
    /// arena for the buckets, one for the accumulator, and two of the longest bucket).
    pub fn exchange(mut self, plan: Plan, total: usize) -> Result<Box<dyn Exchange>> {
        let fills = plan
            .buckets
            .iter()
            .map(|b| Ok(Fill { data: zeroed(b.len())?, filled: 0, fills: 0, full: false }))
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            plan,
            state: Mutex::new(State { fills, finish: None, result: None, shutdown: false }),
            changed: Condvar::new(),
            fill_wait_ns: AtomicU64::new(0),
        });
        self.ask(Setup::Train(shared.clone(), zeroed(total)?))?;
        self.shared = Some(shared);
        Ok(Box::new(MpiExchange { rt: self, gathered: Vec::new() }))
    }
}

impl Drop for MpiRuntime {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().shutdown = true;
            shared.changed.notify_all();
        }
        // Closing the setup channel ends the thread's setup loop; it then finalises MPI.
        let (dead_tx, _) = channel();
        drop(std::mem::replace(&mut self.setup, dead_tx));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A zeroed buffer, refused with a sentence instead of aborting when memory is short.
fn zeroed(len: usize) -> Result<Vec<f32>> {
    crate::memory::try_vec_f32(len, "the gradient exchange buffers")
}

struct MpiExchange {
    rt: MpiRuntime,
    gathered: Vec<f64>,
}

impl MpiExchange {
    fn shared(&self) -> &Arc<Shared> {
        self.rt.shared.as_ref().expect("an exchange has its shared state")
    }
}

impl Exchange for MpiExchange {
    fn rank(&self) -> usize {
        self.rt.rank
    }

    fn size(&self) -> usize {
        self.rt.size
    }

    fn mode(&self) -> ReduceMode {
        self.shared().plan.mode
    }

    fn grad_ready(&self) -> GradReady {
        let shared = self.shared().clone();
        Arc::new(move |at, values| shared.report(at, values))
    }

    fn micro_done(&mut self, grads: &[f32]) {
        let shared = self.shared().clone();
        for b in shared.plan.model_buckets..shared.plan.buckets.len() {
            let range = shared.plan.buckets[b].clone();
            shared.report(range.start, &grads[range]);
        }
    }

    fn finish(
        &mut self,
        grads: &mut Vec<f32>,
        local_losses: &[f64],
        stop: bool,
        losses: &mut Vec<f64>,
    ) -> Result<(CommStats, bool)> {
        let shared = self.shared().clone();
        let plan = &shared.plan;
        let start = Instant::now();
        let mut losses_and_stop = Vec::with_capacity(plan.rounds + 1);
        losses_and_stop.extend_from_slice(local_losses);
        losses_and_stop.push(if stop { 1.0 } else { 0.0 });
        let mut st = shared.lock();
        st.finish = Some(FinishRequest { losses_and_stop, next_acc: std::mem::take(grads) });
        shared.changed.notify_all();
        let reduced = loop {
            if let Some(r) = st.result.take() {
                break r;
            }
            if st.shutdown {
                bail!("the MPI communication thread stopped");
            }
            st = shared.wait(st);
        };
        for f in st.fills.iter_mut() {
            f.fills = 0;
        }
        drop(st);
        *grads = reduced.grads;
        let k = plan.rounds + 1;
        let stop_any = reduced.gathered.chunks_exact(k).any(|r| r[plan.rounds] != 0.0);
        self.gathered.clear();
        for r in reduced.gathered.chunks_exact(k) {
            self.gathered.extend_from_slice(&r[..plan.rounds]);
        }
        plan.reorder_losses(&self.gathered, losses);
        let wait_ms = start.elapsed().as_secs_f64() * 1e3 + shared.fill_wait_ns.swap(0, Ordering::Relaxed) as f64 / 1e6;
        Ok((CommStats { wait_ms, bytes_sent: plan.bytes_sent_per_update() }, stop_any))
    }
}

/// The communication thread: MPI's whole life, from `MPI_Init_thread` to `MPI_Finalize`.
fn comm_thread(timeout: Duration, setup: Receiver<Setup>, reply: Sender<Result<Vec<u64>, String>>) {
    let Some((universe, _threading)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        let _ = reply.send(Err("MPI was already initialised in this process".into()));
        return;
    };
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let watch = Arc::new(Watch { epoch: Instant::now(), busy_since_ms: AtomicU64::new(0) });
    start_watchdog(watch.clone(), timeout, rank);
    if reply.send(Ok(vec![rank as u64, size as u64])).is_err() {
        return;
    }
    while let Ok(msg) = setup.recv() {
        match msg {
            Setup::Agree(words) => {
                let mut all = vec![0u64; 3 * size];
                watch.enter();
                world.all_gather_into(&words[..], &mut all[..]);
                watch.leave();
                if reply.send(Ok(all)).is_err() {
                    return;
                }
            }
            Setup::Train(shared, acc) => {
                if reply.send(Ok(Vec::new())).is_err() {
                    return;
                }
                train_loop(&world, &watch, &shared, acc);
                // Wake a trainer that might wait on a thread that is gone.
                shared.lock().shutdown = true;
                shared.changed.notify_all();
            }
        }
    }
    if SUCCESS.load(Ordering::SeqCst) {
        drop(universe); // MPI_Finalize
    } else {
        std::mem::forget(universe);
    }
}

/// Ends this rank with one sentence when an MPI call has waited longer than `timeout`: a
/// peer or the network is gone and MPI itself may never return.
fn start_watchdog(watch: Arc<Watch>, timeout: Duration, rank: usize) {
    let spawned = std::thread::Builder::new().name("anetrain-mpi-watchdog".into()).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let since = watch.busy_since_ms.load(Ordering::SeqCst);
            if since != 0 && watch.epoch.elapsed().as_millis() as u64 > since - 1 + timeout.as_millis() as u64 {
                eprintln!(
                    "error: rank {rank}: no answer from the other ranks for {} s during the gradient exchange \
                     (a rank died or the network failed); stopping this rank",
                    timeout.as_secs()
                );
                // SAFETY: ends the process at once; MPI may be stuck inside a call on another
                // thread, so neither destructors nor MPI_Finalize can run.
                unsafe { libc::_exit(1) };
            }
        }
    });
    if let Err(e) = spawned {
        eprintln!("warning: rank {rank}: no MPI watchdog ({e}); a dead peer may hang this rank");
    }
}

/// How a bucket is cut: each rank's shard (counts and offsets), and how this rank's shard
/// arrives from every rank (rank-major in `Work::recv`). Built once, so that the exchange
/// allocates nothing.
struct Cuts {
    counts: Vec<i32>,
    displs: Vec<i32>,
    recv_counts: Vec<i32>,
    recv_displs: Vec<i32>,
}

impl Cuts {
    fn new(plan: &Plan, len: usize) -> Cuts {
        let n = plan.size;
        let m = plan.shard(len, plan.rank).len();
        Cuts {
            counts: (0..n).map(|s| plan.shard(len, s).len() as i32).collect(),
            displs: (0..n).map(|s| plan.shard(len, s).start as i32).collect(),
            recv_counts: vec![m as i32; n],
            recv_displs: (0..n).map(|r| (r * m) as i32).collect(),
        }
    }
}

/// Buffers of the communication thread.
struct Work {
    /// `[max bucket]` this rank's copy of the bucket being exchanged
    send: Vec<f32>,
    /// `[N · max shard]` the pieces of this rank's shard, rank-major
    recv: Vec<f32>,
    /// `[P]` the reduced gradient being built
    acc: Vec<f32>,
}

fn train_loop(world: &mpi::topology::SimpleCommunicator, watch: &Watch, shared: &Shared, acc: Vec<f32>) {
    let plan = &shared.plan;
    let n = plan.size;
    let max_bucket = plan.max_bucket();
    let max_shard = (0..n).map(|s| plan.shard(max_bucket, s).len()).max().unwrap_or(0);
    let (send, recv) = match (zeroed(max_bucket), zeroed(n * max_shard)) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: rank {}: {e:#}", plan.rank);
            return;
        }
    };
    let mut work = Work { send, recv, acc };
    let cuts: Vec<Cuts> = plan.buckets.iter().map(|b| Cuts::new(plan, b.len())).collect();
    let exchanged_rounds = match plan.mode {
        ReduceMode::Exact => 0..plan.rounds,
        ReduceMode::Allreduce => plan.rounds - 1..plan.rounds,
    };
    loop {
        for round in exchanged_rounds.clone() {
            for (b, cut) in cuts.iter().enumerate() {
                let len = plan.buckets[b].len();
                {
                    let mut st = shared.lock();
                    while !st.fills[b].full && !st.shutdown {
                        st = shared.wait(st);
                    }
                    if st.shutdown {
                        return;
                    }
                    work.send[..len].copy_from_slice(&st.fills[b].data);
                    st.fills[b].full = false;
                    shared.changed.notify_all();
                }
                watch.enter();
                match plan.mode {
                    ReduceMode::Exact => exchange_exact(world, plan, b, cut, round, &mut work),
                    ReduceMode::Allreduce => {
                        let range = plan.buckets[b].clone();
                        world.all_reduce_into(
                            &work.send[..len],
                            &mut work.acc[range],
                            mpi::collective::SystemOperation::sum(),
                        );
                    }
                }
                watch.leave();
            }
        }
        let request = {
            let mut st = shared.lock();
            loop {
                if st.shutdown {
                    return;
                }
                if let Some(r) = st.finish.take() {
                    break r;
                }
                st = shared.wait(st);
            }
        };
        let mut gathered = vec![0.0f64; n * request.losses_and_stop.len()];
        watch.enter();
        world.all_gather_into(&request.losses_and_stop[..], &mut gathered[..]);
        watch.leave();
        let grads = std::mem::replace(&mut work.acc, request.next_acc);
        let mut st = shared.lock();
        st.result = Some(Reduced { grads, gathered });
        shared.changed.notify_all();
    }
}

/// One round of one bucket in `exact` mode: all-to-all of shards, then this rank adds the N
/// pieces of its shard in rank (= micro-batch) order; after the last round, all-gather.
fn exchange_exact(
    world: &mpi::topology::SimpleCommunicator,
    plan: &Plan,
    b: usize,
    cuts: &Cuts,
    round: usize,
    work: &mut Work,
) {
    let range = plan.buckets[b].clone();
    let (len, n) = (range.len(), plan.size);
    let own = plan.shard(len, plan.rank);
    let m = own.len();
    {
        let send = Partition::new(&work.send[..len], &cuts.counts[..], &cuts.displs[..]);
        let mut recv = PartitionMut::new(&mut work.recv[..n * m], &cuts.recv_counts[..], &cuts.recv_displs[..]);
        world.all_to_all_varcount_into(&send, &mut recv);
    }
    let acc = &mut work.acc[range.start + own.start..range.start + own.end];
    for (r, piece) in work.recv[..n * m].chunks_exact(m.max(1)).enumerate().take(n) {
        if round == 0 && r == 0 {
            acc.copy_from_slice(&piece[..m]);
        } else {
            for (a, p) in acc.iter_mut().zip(piece) {
                *a += *p;
            }
        }
    }
    if round + 1 == plan.rounds {
        work.send[..m].copy_from_slice(acc);
        let mut out = PartitionMut::new(&mut work.acc[range], &cuts.counts[..], &cuts.displs[..]);
        world.all_gather_varcount_into(&work.send[..m], &mut out);
    }
}
