//! Data-parallel training through the binary. With `--features mpi` the jobs run under a real
//! `mpirun` (Open MPI): two ranks against one process, bit for bit (`exact`) and within a
//! tolerance (`allreduce`); resuming with a different number of ranks; a killed rank; ranks
//! that disagree; an --accum that does not divide; LoRA (only the adapters' gradients
//! exchanged), bit for bit and across rank counts, and within a tolerance (`allreduce`).
//! Without the feature: the build refuses MPI options and launchers with one sentence.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_anetrain")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("anetrain-mpi-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A few updates of the tiny model on synthetic data at a constant learning rate (so a run
/// cut in two follows the same schedule), one thread per process. `--exact-accum` makes a
/// single process sum its micro-batches in the ranks' order (ranks ignore it).
fn train_args(steps: usize, accum: usize, ckpt: &Path) -> Vec<String> {
    let args = format!(
        "train --model stories260k --data synthetic --steps {steps} --batch 2 --seq 32 --accum {accum} \
         --lr 1e-3 --min-lr 1e-3 --warmup 0 --threads 1 --no-peak --exact-accum --eval-every 0 --print-every 1000 --ckpt-dir {}",
        ckpt.display()
    );
    args.split_whitespace().map(String::from).collect()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::*;
    use anetrain::checkpoint::native;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    fn mpirun(np: usize) -> Command {
        let mut cmd = Command::new("mpirun");
        cmd.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string(), bin()]);
        cmd
    }

    fn run(mut cmd: Command) -> Output {
        let out = cmd.output().expect("cannot start mpirun: install Open MPI (apt-get install openmpi-bin)");
        assert!(out.status.success(), "{:?} failed:\n{}", cmd, text(&out));
        out
    }

    /// The per-update losses of a --log file.
    fn losses(log: &Path) -> Vec<f64> {
        let text = std::fs::read_to_string(log).unwrap();
        text.lines()
            .filter(|l| l.contains(r#""type":"update""#))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The same global batch trained twice, `steps` updates of --accum 4 with `extra` options:
    /// by one process and by 2 ranks (`ranks_only`: options for the ranks' run alone).
    struct Pair {
        one: PathBuf,
        two: PathBuf,
        log1: PathBuf,
        log2: PathBuf,
        /// What mpirun printed.
        shown: String,
    }

    fn one_process_and_two_ranks(dir: &Path, steps: usize, extra: &[&str], ranks_only: &[&str]) -> Pair {
        let (one, two) = (dir.join("one"), dir.join("two"));
        let (log1, log2) = (dir.join("one.jsonl"), dir.join("two.jsonl"));
        run({
            let mut c = Command::new(bin());
            c.args(train_args(steps, 4, &one)).args(extra).args(["--log", log1.to_str().unwrap()]);
            c
        });
        let out = run({
            let mut c = mpirun(2);
            c.args(train_args(steps, 4, &two)).args(extra).args(ranks_only);
            c.args(["--log", log2.to_str().unwrap()]);
            c
        });
        let shown = text(&out);
        assert!(shown.contains("data parallel: 2 ranks, 2 micro-batches each"), "{shown}");
        Pair { one, two, log1, log2, shown }
    }

    /// The first update's `comm_bytes` in a --log file.
    fn bytes_sent(log: &Path) -> u64 {
        let text = std::fs::read_to_string(log).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(text.lines().find(|l| l.contains(r#""type":"update""#)).unwrap()).unwrap();
        v["comm_bytes"].as_u64().unwrap()
    }

    #[test]
    fn two_ranks_exact_equal_one_process_bit_for_bit() {
        let dir = scratch("exact");
        // --accum 4 on 2 ranks: two rounds of micro-batches per update.
        let Pair { one, two, log1, log2, shown } = one_process_and_two_ranks(&dir, 3, &[], &[]);
        assert_eq!(shown.matches("step     3/3").count(), 1, "only rank 0 prints:\n{shown}");
        let (a, b) = (native::load(&one).unwrap(), native::load(&two).unwrap());
        assert_eq!(b.step, 3);
        assert!(bits(&a.params) == bits(&b.params), "weights differ");
        assert!(bits(&a.m) == bits(&b.m) && bits(&a.v) == bits(&b.v), "optimizer moments differ");
        let (l1, l2) = (losses(&log1), losses(&log2));
        assert_eq!(l1.len(), 3);
        assert_eq!(
            l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // With the dW GEMMs on a worker thread, the layers' gradients reach the exchange from
        // that thread: still the same bits.
        let overlap = dir.join("overlap");
        run({
            let mut c = mpirun(2);
            c.args(train_args(3, 4, &overlap)).args(["--dw-overlap", "on"]);
            c
        });
        assert!(bits(&native::load(&overlap).unwrap().params) == bits(&a.params), "weights differ with dW overlap");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn two_ranks_allreduce_are_close_to_one_process() {
        let dir = scratch("allreduce");
        let Pair { one, two, .. } = one_process_and_two_ranks(&dir, 3, &[], &["--dp-reduce", "allreduce"]);
        let (a, b) = (native::load(&one).unwrap(), native::load(&two).unwrap());
        let max = a.params.iter().zip(&b.params).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        // Three updates of lr 1e-3 move weights by ~3e-3; a different summation order moves
        // them by far less.
        assert!(max < 1e-5, "max weight difference {max}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn checkpoints_resume_with_another_number_of_ranks() {
        let dir = scratch("resume");
        let (straight, a, b) = (dir.join("straight"), dir.join("a"), dir.join("b"));
        run({
            let mut c = Command::new(bin());
            c.args(train_args(4, 2, &straight));
            c
        });
        // 2 ranks, then 1 process.
        run({
            let mut c = mpirun(2);
            c.args(train_args(2, 2, &a));
            c
        });
        run({
            let mut c = Command::new(bin());
            c.args(train_args(4, 2, &a)).args(["--resume", "latest"]);
            c
        });
        // 1 process, then 2 ranks.
        run({
            let mut c = Command::new(bin());
            c.args(train_args(2, 2, &b));
            c
        });
        run({
            let mut c = mpirun(2);
            c.args(train_args(4, 2, &b)).args(["--resume", "latest"]);
            c
        });
        let want = bits(&native::load(&straight).unwrap().params);
        for got in [&a, &b] {
            let ckpt = native::load(got).unwrap();
            assert_eq!(ckpt.step, 4);
            assert!(bits(&ckpt.params) == want, "resumed run {} differs", got.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Processes whose parent is `parent`.
    fn children(parent: u32) -> Vec<u32> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            // After the parenthesised command name: state, then the parent's pid.
            let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
            if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
                out.push(pid);
            }
        }
        out
    }

    /// Starts a long 2-rank job that checkpoints every update, waits for its first
    /// checkpoint, and returns it with rank 1's pid.
    fn long_job(ckpt: &Path) -> (std::process::Child, u32) {
        let mut args = train_args(100_000, 2, ckpt);
        args.extend(["--ckpt-every", "1", "--dp-timeout", "20"].map(String::from));
        args.extend(["--log".to_string(), ckpt.with_extension("jsonl").display().to_string()]);
        let mut child = mpirun(2).args(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let start = Instant::now();
        while !ckpt.join("latest").exists() {
            assert!(child.try_wait().unwrap().is_none(), "the job ended before its first checkpoint");
            assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        let rank1 = children(child.id())
            .into_iter()
            .find(|pid| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == b"OMPI_COMM_WORLD_RANK=1"))
            })
            .expect("rank 1 is a child of mpirun");
        (child, rank1)
    }

    #[test]
    fn a_stop_signal_to_one_rank_stops_every_rank_after_the_same_update() {
        let dir = scratch("stop");
        let ckpt = dir.join("ckpt");
        let (child, rank1) = long_job(&ckpt);
        // SAFETY: signalling a process this test started (through mpirun).
        unsafe { libc::kill(rank1 as i32, libc::SIGTERM) };
        // The signalled rank exits with the signal's status (143), so mpirun reports a failure;
        // what matters is that every rank stopped after the same update, checkpointed by rank 0.
        let out = child.wait_with_output().unwrap();
        let shown = text(&out);
        assert!(!shown.contains("no answer from the other ranks"), "a rank was left waiting:\n{shown}");
        let loaded = native::load(&ckpt).unwrap();
        let log = std::fs::read_to_string(ckpt.with_extension("jsonl")).unwrap();
        let updates = log.lines().filter(|l| l.contains(r#""type":"update""#)).count();
        assert_eq!(updates, loaded.step, "rank 0 did not stop with a checkpoint of its last update:\n{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_killed_rank_ends_the_job_and_leaves_a_loadable_checkpoint() {
        let dir = scratch("killed");
        let ckpt = dir.join("ckpt");
        let (child, rank1) = long_job(&ckpt);
        // SAFETY: killing a process this test started (through mpirun).
        unsafe { libc::kill(rank1 as i32, libc::SIGKILL) };
        let killed = Instant::now();
        let out = child.wait_with_output().unwrap();
        let waited = killed.elapsed();
        assert!(!out.status.success(), "the job must fail when a rank dies");
        assert!(waited < Duration::from_secs(30), "the job took {waited:?} to end after a rank died");
        let shown = text(&out);
        assert!(shown.contains("rank 1") || shown.contains("signal 9"), "no word of the dead rank:\n{shown}");
        let loaded = native::load(&ckpt).unwrap();
        assert!(loaded.step >= 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ranks_that_disagree_are_refused_by_rank_0() {
        let dir = scratch("disagree");
        let mut cmd = mpirun(1);
        cmd.args(train_args(2, 2, &dir.join("c"))).args(["--seed", "1", ":", "-np", "1", bin()]);
        cmd.args(train_args(2, 2, &dir.join("c"))).args(["--seed", "2"]);
        let out = cmd.output().unwrap();
        assert!(!out.status.success());
        let shown = text(&out);
        let sentence = "rank 1 has a different training configuration (model, options, --dp-reduce) than rank 0";
        assert_eq!(shown.matches(sentence).count(), 1, "{shown}");
        assert!(!dir.join("c").join("latest").exists(), "nothing was trained");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_accum_that_does_not_divide_is_refused_once() {
        let dir = scratch("divide");
        let out = mpirun(2).args(train_args(2, 3, &dir.join("c"))).output().unwrap();
        assert!(!out.status.success());
        let shown = text(&out);
        assert_eq!(
            shown.matches("--accum 3 micro-batches per update do not divide across 2 ranks").count(),
            1,
            "{shown}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A LoRA run's checkpoint: adapters and their AdamW moments, as bits.
    fn lora_state(dir: &Path) -> (usize, Vec<u32>, Vec<u32>, Vec<u32>) {
        let c = native::load(dir).unwrap();
        let (_, adapters) = c.lora.expect("a LoRA checkpoint");
        (c.step, bits(&adapters), bits(&c.m), bits(&c.v))
    }

    /// LoRA under mpirun exchanges only the adapters' gradients: 2 ranks equal one
    /// `--exact-accum` process bit for bit (adapters, AdamW moments, losses), send far fewer
    /// bytes per update than full fine-tuning, and resume each other's checkpoints.
    #[test]
    fn lora_two_ranks_exact_equal_one_process_and_resume_across_rank_counts() {
        let dir = scratch("lora");
        let lora = ["--lora-rank", "2", "--lora-targets", "q,v,down"];
        let Pair { one, two, log1, log2, .. } = one_process_and_two_ranks(&dir, 4, &lora, &[]);
        let (a, b) = (lora_state(&one), lora_state(&two));
        assert_eq!(b.0, 4);
        assert!(a.1 == b.1, "adapters differ");
        assert!(a.2 == b.2 && a.3 == b.3, "optimizer moments differ");
        let (l1, l2) = (losses(&log1), losses(&log2));
        assert_eq!(l1.len(), 4);
        assert_eq!(
            l1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            l2.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // Bytes sent per update: the adapter arena's, not the model's.
        let adapters = a.1.len() as u64;
        // Two rounds each send the other rank's half of every bucket, then the own half is
        // gathered once: 1.5 adapter arenas of f32.
        let sent = bytes_sent(&log2);
        assert!(sent > 4 * adapters && sent <= 4 * 2 * adapters, "{sent} bytes for {adapters} adapter values");

        // Resume across rank counts: 2 ranks then 1 process, 1 process then 2 ranks.
        let (x, y) = (dir.join("x"), dir.join("y"));
        run({
            let mut c = mpirun(2);
            c.args(train_args(2, 4, &x)).args(lora);
            c
        });
        run({
            let mut c = Command::new(bin());
            c.args(train_args(4, 4, &x)).args(lora).args(["--resume", "latest"]);
            c
        });
        run({
            let mut c = Command::new(bin());
            c.args(train_args(2, 4, &y)).args(lora);
            c
        });
        run({
            let mut c = mpirun(2);
            c.args(train_args(4, 4, &y)).args(lora).args(["--resume", "latest"]);
            c
        });
        for got in [&x, &y] {
            let s = lora_state(got);
            assert_eq!(s.0, 4);
            assert!(s.1 == a.1 && s.2 == a.2 && s.3 == a.3, "resumed LoRA run {} differs", got.display());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// LoRA with `--dp-reduce allreduce`: 2 ranks stay within a summation-order tolerance of
    /// one process (adapters, AdamW moments, losses) and all-reduce only the adapters'
    /// gradient. Four updates at lr 1e-3 move the adapters by ~4e-3 (AdamW steps are ~lr per
    /// entry whatever the gradient's scale), while MPI's reduction order changes the gradients
    /// only in their last bits: the adapters differ by 3.4e-7 (bound 1e-5), the moments by
    /// 4.2e-7 of their largest (bound 1e-5). A rank 1 that contributed zeros would leave rank
    /// 0's two micro-batches alone, a different direction for every entry: ~1e-3 apart. Only
    /// rank 0 writes checkpoints; rank 1's adapters show in the logged losses, which average
    /// both ranks' micro-batches: a rank 1 that drifted would move updates 2-4's losses.
    #[test]
    fn lora_two_ranks_allreduce_are_close_to_one_process() {
        let dir = scratch("lora-allreduce");
        let lora = ["--lora-rank", "2", "--lora-targets", "q,v,down"];
        let Pair { one, two, log1, log2, .. } =
            one_process_and_two_ranks(&dir, 4, &lora, &["--dp-reduce", "allreduce"]);
        let load = |d: &Path| {
            let c = native::load(d).unwrap();
            (c.step, c.lora.expect("a LoRA checkpoint").1, c.m, c.v)
        };
        let (a, b) = (load(&one), load(&two));
        assert_eq!((a.0, b.0), (4, 4));
        let max_diff = |x: &[f32], y: &[f32]| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max)
        };
        let max_abs = |x: &[f32]| x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let adapters = max_diff(&a.1, &b.1);
        let (dm, dv) = (max_diff(&a.2, &b.2) / max_abs(&a.2), max_diff(&a.3, &b.3) / max_abs(&a.3));
        eprintln!("LoRA allreduce vs one process: adapters {adapters:.2e}, moments m {dm:.2e} v {dv:.2e} (relative)");
        assert!(adapters < 1e-5, "max adapter difference {adapters}");
        assert!(dm < 1e-5 && dv < 1e-5, "AdamW moments differ by {dm:.2e} (m) and {dv:.2e} (v) of their largest");
        let (l1, l2) = (losses(&log1), losses(&log2));
        assert_eq!((l1.len(), l2.len()), (4, 4));
        for (x, y) in l1.iter().zip(&l2) {
            assert!((x - y).abs() <= 1e-5 * x, "losses {l1:?} vs {l2:?}");
        }
        // Bytes sent per update: the ring's 2·(N−1)/N = 1 adapter arena of f32, not the model's.
        assert_eq!(bytes_sent(&log2), 4 * a.1.len() as u64);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(not(feature = "mpi"))]
mod without_mpi {
    use super::*;

    fn without_launcher(cmd: &mut Command) -> &mut Command {
        for var in ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMI_RANK"] {
            cmd.env_remove(var);
        }
        cmd
    }

    #[test]
    fn mpirun_on_a_build_without_mpi_says_to_rebuild_from_rank_0_only() {
        let dir = scratch("nompi");
        for rank in ["0", "1"] {
            let mut cmd = Command::new(bin());
            without_launcher(&mut cmd).args(train_args(2, 2, &dir.join("c")));
            let out = cmd.env("OMPI_COMM_WORLD_SIZE", "2").env("OMPI_COMM_WORLD_RANK", rank).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "rank {rank}");
            let shown = text(&out);
            if rank == "0" {
                assert!(
                    shown.contains("built without MPI: rebuild with `cargo build --release --features mpi`"),
                    "{shown}"
                );
            } else {
                assert!(shown.is_empty(), "rank 1 repeats rank 0's message: {shown}");
            }
        }
        let mut cmd = Command::new(bin());
        without_launcher(&mut cmd).args(train_args(2, 2, &dir.join("c"))).args(["--dp-reduce", "exact"]);
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(text(&out).contains("--dp-reduce needs a build with MPI"), "{}", text(&out));
        assert!(!dir.join("c").exists(), "nothing was written");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
