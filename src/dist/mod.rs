//! Data-parallel training across processes and machines over MPI (cargo feature `mpi`).
//!
//! `mpirun -np N anetrain train …` starts N ranks. Every rank holds the whole model, the
//! whole optimizer state and the same sampler, and every rank draws **every** micro-batch of
//! an update (drawing is cheap), but rank r computes only micro-batches r, r + N, r + 2N, …
//! of the update's `--accum` (global) micro-batches. So the global batch and the order in
//! which data is consumed depend on neither N nor which rank runs what, and `--accum` must
//! be a multiple of N. Every rank applies the same AdamW update to the same summed gradient;
//! only rank 0 prints, logs, evaluates and writes checkpoints, and any N that divides
//! `--accum` can resume them.
//!
//! **The gradient of an update** is defined, for one process and for N ranks alike, as the
//! micro-batch gradients G₀ … G_{A−1} (each computed from zero) summed in micro-batch order:
//! ((G₀ + G₁) + G₂) + …, in f32. With `--dp-reduce exact` (the default) the ranks reproduce
//! exactly that sum: each bucket of the gradient (one per layer, then the embedding, then
//! the final norm and classifier) is cut into N shards; after each round of micro-batches
//! (one per rank) every rank sends shard s of its micro-batch's bucket to rank s
//! (all-to-all), which adds the N pieces to its accumulator in rank order — which is
//! micro-batch order — and after the last round the shards are gathered to every rank
//! (all-gather). Same additions in the same order: bit-identical weights to one process with
//! the same `--accum` run with `--exact-accum`, for any N (tested under `mpirun`). `--dp-reduce allreduce` instead
//! sums each rank's micro-batches locally and hands the buckets to `MPI_Allreduce`, whose
//! summation order is the library's: faster when a rank has several micro-batches per
//! update, close to but not bit-identical with one process.
//!
//! **Overlap.** The model reports each gradient tensor as soon as the backward has finished
//! it (`Model::set_grad_ready`); a layer's bucket is copied out as its tensors arrive and is
//! exchanged by a communication thread while the backward goes on with the next layer. The
//! time the trainer still waits for the exchange after its last backward is
//! `ms_comm_wait` in the telemetry and the efficiency report.
//!
//! **LoRA.** With `--lora-rank` only the adapters are trained, so only their gradient is
//! exchanged (`Plan::for_lora`: one bucket per layer's adapters), with the same order and
//! guarantees; every rank holds the frozen base, the adapters and their optimizer state.
//!
//! **Faults.** Open MPI's `mpirun` ends the whole job when a rank dies. As a second line, a
//! watchdog ends this rank with one sentence when a single MPI call has waited longer than
//! `--dp-timeout` seconds (a peer or the network gone). Checkpoints are written by rank 0
//! atomically, so the last one stays loadable. At start-up the ranks compare digests of
//! their configuration, data and binary and refuse to train when they differ.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::lora::LoraLayout;
use crate::params::ParamLayout;
use anyhow::{Result, bail, ensure};
use std::ops::Range;

/// How the ranks sum their gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceMode {
    /// Fixed-order sum: bit-identical to one process with the same --accum and --exact-accum.
    Exact,
    /// MPI_Allreduce: the library's summation order (not bit-exact).
    Allreduce,
}

/// What one update's gradient exchange cost this rank.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommStats {
    /// Time the trainer was blocked on the exchange: waiting for the reduced gradient after
    /// its last backward, plus backward time spent waiting for a bucket's buffer.
    pub wait_ms: f64,
    /// Gradient payload bytes this rank sent (for `allreduce`, the ring algorithm's
    /// 2·(N−1)/N of the gradient; the library may move more or less).
    pub bytes_sent: u64,
}

/// What the trainer needs from a data-parallel runtime (implemented over MPI in `mpi`).
pub trait Exchange: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn mode(&self) -> ReduceMode;
    /// The hook to install with `Model::set_grad_ready`.
    fn grad_ready(&self) -> crate::model::GradReady;
    /// After each local micro-batch: hands over the gradients the model does not report
    /// itself (embedding, final norm, classifier), from the micro-batch's gradient arena.
    fn micro_done(&mut self, grads: &[f32]);
    /// Waits for the update's reduced gradient and swaps it into `grads`; gathers every
    /// rank's per-micro-batch mean losses into `losses` in global micro-batch order; returns
    /// the costs and whether any rank asked to stop (`stop` is this rank's wish).
    fn finish(
        &mut self,
        grads: &mut Vec<f32>,
        local_losses: &[f64],
        stop: bool,
        losses: &mut Vec<f64>,
    ) -> Result<(CommStats, bool)>;
}

/// The error a rank other than 0 returns for a problem every rank detects: rank 0 says it,
/// the others exit non-zero without repeating it.
#[derive(Debug)]
pub struct QuietExit;

impl std::fmt::Display for QuietExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stopped: rank 0 reports the reason")
    }
}

impl std::error::Error for QuietExit {}

/// `Err(message)` on rank 0, `Err(QuietExit)` elsewhere.
pub fn fail_from_rank0(rank: usize, message: String) -> anyhow::Error {
    if rank == 0 { anyhow::anyhow!(message) } else { anyhow::Error::new(QuietExit) }
}

/// (rank, size) when an MPI launcher (`mpirun`/`mpiexec` of Open MPI, MPICH, MVAPICH)
/// started this process, read from the variables it sets.
pub fn launched_by_mpi() -> Option<(usize, usize)> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<usize>().ok());
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
    ]
    .iter()
    .find_map(|(rank, size)| Some((var(rank).unwrap_or(0), var(size)?)))
}

/// How many ranks of this job run on this machine (the launcher's local size), so that a
/// memory estimate counts all of them; 1 outside a launcher or when it does not say.
pub fn ranks_on_this_machine() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE", "PMI_LOCAL_SIZE"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(1)
        .max(1)
}

/// Refuses what a build without the `mpi` feature cannot do: `--dp-reduce`, or being started
/// by `mpirun` with more than one rank (which would train N unrelated copies).
pub fn check_no_mpi_build(dp_reduce_given: bool) -> Result<()> {
    if let Some((rank, size)) = launched_by_mpi()
        && size > 1
    {
        return Err(fail_from_rank0(
            rank,
            format!(
                "started by an MPI launcher with {size} ranks, but this anetrain was built without MPI: \
                 rebuild with `cargo build --release --features mpi` (Open MPI installed) to train across ranks"
            ),
        ));
    }
    ensure!(
        !dp_reduce_given,
        "--dp-reduce needs a build with MPI: rebuild with `cargo build --release --features mpi` and start it with mpirun"
    );
    Ok(())
}

/// Sends this process's standard output to /dev/null: ranks other than 0 stay silent
/// (errors still go to standard error).
pub fn silence_stdout() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    // SAFETY: dup2 on two valid descriptors; stdout is replaced atomically.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        bail!("cannot redirect the standard output of rank > 0: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The update's `accum` micro-batches must split evenly across `size` ranks.
pub fn check_divides(rank: usize, size: usize, accum: usize) -> Result<()> {
    if !accum.is_multiple_of(size) {
        return Err(fail_from_rank0(
            rank,
            format!(
                "--accum {accum} micro-batches per update do not divide across {size} ranks: \
                 use an --accum that is a multiple of {size}"
            ),
        ));
    }
    Ok(())
}

/// How an update's gradient is cut and exchanged; the same on every rank.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rank: usize,
    pub size: usize,
    pub mode: ReduceMode,
    /// Micro-batches this rank computes per update (`accum / size`).
    pub rounds: usize,
    /// Arena ranges in the order the backward finishes them: layers L−1 … 0, then the
    /// embedding, then the final norm and classifier (the tail of the arena).
    pub buckets: Vec<Range<usize>>,
    /// Number of leading buckets the model reports itself (the layers).
    pub model_buckets: usize,
    /// (start, bucket) sorted by start, to find a reported tensor's bucket.
    by_start: Vec<(usize, usize)>,
}

impl Plan {
    pub fn new(layout: &ParamLayout, rank: usize, size: usize, accum: usize, mode: ReduceMode) -> Result<Plan> {
        ensure!(size > 0 && rank < size, "rank {rank} of {size} is not a valid MPI rank");
        check_divides(rank, size, accum)?;
        let mut buckets: Vec<Range<usize>> = (0..layout.n_layers()).rev().map(|l| layout.layer_range(l)).collect();
        let model_buckets = buckets.len();
        let embed = layout.tensors[layout.embed].range();
        let tail = layout.tensors[layout.final_norm].offset..layout.total;
        ensure!(
            embed.start == 0 && buckets.last().is_none_or(|b| b.start == embed.end) && buckets[0].end <= tail.start,
            "internal error: the parameter arena is not embedding, layers, tail"
        );
        buckets.push(embed);
        buckets.push(tail);
        Self::with_buckets(buckets, model_buckets, rank, size, accum, mode)
    }

    /// The plan of a LoRA run: only the adapter arena's gradient is exchanged (the frozen
    /// base has none), one bucket per layer's adapters, L−1 … 0. The model reports none of
    /// them (`model_buckets` 0): each micro-batch's adapter gradient is handed over whole by
    /// `Exchange::micro_done`, so the exchange does not overlap the backward (adapters are
    /// a few MB).
    pub fn for_lora(lora: &LoraLayout, rank: usize, size: usize, accum: usize, mode: ReduceMode) -> Result<Plan> {
        ensure!(size > 0 && rank < size, "rank {rank} of {size} is not a valid MPI rank");
        check_divides(rank, size, accum)?;
        let layers = lora.adapters.iter().map(|a| a.layer + 1).max().unwrap_or(0);
        let buckets: Vec<Range<usize>> = (0..layers)
            .rev()
            .filter_map(|l| {
                let mut mine = lora.adapters.iter().filter(|a| a.layer == l);
                let first = mine.next()?;
                Some(mine.fold(first.a.start..first.b.end, |r, a| r.start.min(a.a.start)..r.end.max(a.b.end)))
            })
            .collect();
        ensure!(
            buckets.iter().map(|b| b.len()).sum::<usize>() == lora.total,
            "internal error: the adapter arena is not one contiguous range per layer"
        );
        Self::with_buckets(buckets, 0, rank, size, accum, mode)
    }

    fn with_buckets(
        buckets: Vec<Range<usize>>,
        model_buckets: usize,
        rank: usize,
        size: usize,
        accum: usize,
        mode: ReduceMode,
    ) -> Result<Plan> {
        ensure!(
            buckets.iter().all(|b| b.len() <= i32::MAX as usize),
            "a gradient bucket exceeds MPI's 2³¹ − 1 element count"
        );
        let mut by_start: Vec<(usize, usize)> = buckets.iter().enumerate().map(|(i, b)| (b.start, i)).collect();
        by_start.sort_unstable();
        Ok(Plan { rank, size, mode, rounds: accum / size, buckets, model_buckets, by_start })
    }

    /// Values the plan's buckets cover (the exchanged arena's length).
    pub fn total(&self) -> usize {
        self.buckets.iter().map(|b| b.len()).sum()
    }

    /// The bucket holding arena offset `at`.
    pub fn bucket_of(&self, at: usize) -> Option<usize> {
        let i = self.by_start.partition_point(|&(start, _)| start <= at).checked_sub(1)?;
        let b = self.by_start[i].1;
        self.buckets[b].contains(&at).then_some(b)
    }

    /// Shard `s` of a bucket of `len` values: the part rank `s` sums.
    pub fn shard(&self, len: usize, s: usize) -> Range<usize> {
        s * len / self.size..(s + 1) * len / self.size
    }

    /// The longest bucket.
    pub fn max_bucket(&self) -> usize {
        self.buckets.iter().map(|b| b.len()).max().unwrap_or(0)
    }

    /// f32 values the exchange allocates (`mpi::MpiRuntime::exchange` and its thread): the
    /// buckets' copy-out buffers and the accumulator (one exchanged arena each), the send copy
    /// of the longest bucket and its N received shards.
    pub fn buffer_values(&self) -> usize {
        let max = self.max_bucket();
        let max_shard = (0..self.size).map(|s| self.shard(max, s).len()).max().unwrap_or(0);
        2 * self.total() + max + self.size * max_shard
    }

    /// Gradient payload bytes this rank sends per update (see `CommStats::bytes_sent`).
    pub fn bytes_sent_per_update(&self) -> u64 {
        let n = self.size;
        let per_bucket = |b: &Range<usize>| -> usize {
            let own = self.shard(b.len(), self.rank).len();
            match self.mode {
                // Every round: all but the own shard out; last: the own shard to N − 1 ranks.
                ReduceMode::Exact => self.rounds * (b.len() - own) + own * (n - 1),
                ReduceMode::Allreduce => 2 * b.len() * (n - 1) / n,
            }
        };
        4 * self.buckets.iter().map(per_bucket).sum::<usize>() as u64
    }

    /// Puts the gathered losses (rank-major: rank r's `rounds` values, then rank r + 1's) in
    /// micro-batch order: micro-batch k = j·N + r is rank r's j-th.
    pub fn reorder_losses(&self, gathered: &[f64], out: &mut Vec<f64>) {
        out.clear();
        for j in 0..self.rounds {
            for r in 0..self.size {
                out.push(gathered[r * self.rounds + j]);
            }
        }
    }
}

/// What every rank must agree on before training: digests of the configuration (model,
/// training options, reduce mode), of the token data, and of the executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreement {
    pub config: u64,
    pub data: u64,
    pub binary: u64,
}

impl Agreement {
    pub fn to_words(self) -> [u64; 3] {
        [self.config, self.data, self.binary]
    }

    /// The digest of the running executable's bytes (XXH3, as checkpoint files) with the
    /// crate version.
    pub fn binary_digest() -> Result<u64> {
        let exe = std::env::current_exe()?;
        let sum = crate::hash::file_checksum(&exe)
            .map_err(|e| anyhow::anyhow!("cannot read this program ({}) to fingerprint it: {e:#}", exe.display()))?;
        Ok(crate::hash::Fnv1a::default().bytes(env!("CARGO_PKG_VERSION").as_bytes()).bytes(sum.as_bytes()).finish())
    }

    /// Checks every rank's digests (`all`: 3 words per rank, rank order) against rank 0's.
    pub fn check_all(all: &[u64], rank: usize) -> Result<()> {
        let words: Vec<&[u64]> = all.chunks_exact(3).collect();
        for (r, theirs) in words.iter().enumerate().skip(1) {
            for (i, what) in ["training configuration (model, options, --dp-reduce)", "token data", "anetrain binary"]
                .iter()
                .enumerate()
            {
                if theirs[i] != words[0][i] {
                    return Err(fail_from_rank0(
                        rank,
                        format!(
                            "rank {r} has a different {what} than rank 0: start every rank with the same binary, \
                             arguments and data"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn plan_buckets_cover_the_arena_once_and_shards_cover_buckets() {
        for name in ["stories260k", "qwen3-0.6b"] {
            let cfg = ModelConfig::resolve(name).unwrap();
            let layout = ParamLayout::new(&cfg);
            let plan = Plan::new(&layout, 1, 3, 6, ReduceMode::Exact).unwrap();
            assert_eq!(plan.rounds, 2);
            let mut covered = vec![0u8; layout.total];
            for b in &plan.buckets {
                covered[b.clone()].iter_mut().for_each(|c| *c += 1);
                let shards: Vec<_> = (0..3).map(|s| plan.shard(b.len(), s)).collect();
                assert_eq!((shards[0].start, shards[2].end), (0, b.len()));
                assert!(shards.windows(2).all(|w| w[0].end == w[1].start));
            }
            assert!(covered.iter().all(|&c| c == 1), "{name}");
            for t in &layout.tensors {
                let b = plan.bucket_of(t.offset).unwrap();
                assert!(plan.buckets[b].start <= t.offset && t.range().end <= plan.buckets[b].end, "{}", t.name);
            }
            assert_eq!(plan.bucket_of(layout.total), None);
            assert_eq!(plan.model_buckets, cfg.n_layers);
        }
    }

    /// LoRA: one bucket per layer's adapters, last layer first, covering the adapter arena
    /// once; the model reports none; the exchange's buffers are sized by the adapters.
    #[test]
    fn lora_plan_buckets_are_the_layers_adapters() {
        use crate::lora::{LoraConfig, LoraLayout, Target};
        let cfg = ModelConfig::resolve("stories15m").unwrap();
        let lc = LoraConfig { rank: 4, alpha: 8.0, targets: Target::parse_list("q,v,down").unwrap() };
        let lora = LoraLayout::new(&cfg, &ParamLayout::new(&cfg), &lc).unwrap();
        let plan = Plan::for_lora(&lora, 1, 2, 4, ReduceMode::Exact).unwrap();
        assert_eq!((plan.buckets.len(), plan.model_buckets, plan.total()), (cfg.n_layers, 0, lora.total));
        for (b, l) in plan.buckets.iter().zip((0..cfg.n_layers).rev()) {
            for a in lora.adapters.iter().filter(|a| a.layer == l) {
                assert!(b.start <= a.a.start.min(a.b.start) && a.a.end.max(a.b.end) <= b.end);
            }
        }
        assert!(plan.buckets.windows(2).all(|w| w[1].end == w[0].start));
        assert!(plan.buffer_values() <= 3 * lora.total);
        let full = Plan::new(&ParamLayout::new(&cfg), 1, 2, 4, ReduceMode::Exact).unwrap();
        assert!(full.buffer_values() >= 2 * cfg.param_count());
        assert!(plan.bytes_sent_per_update() * 100 < full.bytes_sent_per_update());
    }

    #[test]
    fn plan_refuses_accum_that_does_not_divide() {
        let layout = ParamLayout::new(&ModelConfig::resolve("stories260k").unwrap());
        let err = Plan::new(&layout, 0, 2, 3, ReduceMode::Exact).unwrap_err().to_string();
        assert!(err.contains("--accum 3 micro-batches per update do not divide across 2 ranks"), "{err}");
        let quiet = Plan::new(&layout, 1, 2, 3, ReduceMode::Exact).unwrap_err();
        assert!(quiet.downcast_ref::<QuietExit>().is_some());
    }

    #[test]
    fn losses_come_back_in_micro_batch_order() {
        let layout = ParamLayout::new(&ModelConfig::resolve("stories260k").unwrap());
        let plan = Plan::new(&layout, 0, 2, 6, ReduceMode::Exact).unwrap();
        // Rank 0 ran micro-batches 0, 2, 4; rank 1 ran 1, 3, 5.
        let mut out = Vec::new();
        plan.reorder_losses(&[0.0, 2.0, 4.0, 1.0, 3.0, 5.0], &mut out);
        assert_eq!(out, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn bytes_per_update_match_the_exchange() {
        let layout = ParamLayout::new(&ModelConfig::resolve("stories260k").unwrap());
        let p = layout.total as u64;
        // One round on 2 ranks: half out in the all-to-all, half out in the all-gather.
        let exact = Plan::new(&layout, 0, 2, 2, ReduceMode::Exact).unwrap().bytes_sent_per_update();
        assert!(exact.abs_diff(4 * p) <= 4 * 2 * 16, "{exact} vs {}", 4 * p);
        let ring = Plan::new(&layout, 0, 2, 4, ReduceMode::Allreduce).unwrap().bytes_sent_per_update();
        assert!(ring.abs_diff(4 * p) <= 4 * 16, "{ring}");
    }

    #[test]
    fn disagreement_names_the_rank_and_what_differs() {
        let a = Agreement { config: 1, data: 2, binary: 3 }.to_words();
        let mut all = [a, a, a].concat();
        Agreement::check_all(&all, 0).unwrap();
        all[7] = 9; // rank 2's data
        let err = Agreement::check_all(&all, 0).unwrap_err().to_string();
        assert!(err.starts_with("rank 2 has a different token data than rank 0"), "{err}");
        assert!(Agreement::check_all(&all, 2).unwrap_err().downcast_ref::<QuietExit>().is_some());
    }

    #[test]
    fn a_build_without_mpi_refuses_dp_reduce() {
        // Only meaningful when this test process was not itself started by mpirun.
        if launched_by_mpi().is_none() {
            let err = check_no_mpi_build(true).unwrap_err().to_string();
            assert!(err.contains("--features mpi"), "{err}");
            check_no_mpi_build(false).unwrap();
        }
    }
}
