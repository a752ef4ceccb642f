//! Process and machine figures for telemetry and the dashboard's system panel: CPU time and
//! resident memory of a process, system memory, and package power from Linux RAPL. Each
//! returns None where the system does not expose it; callers show "n/a".

use std::path::PathBuf;

/// CPU time (user + system, all threads) this process has used, in seconds.
pub fn process_cpu_s() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Resident memory of this process in MB: current on Linux, the peak elsewhere.
pub fn process_rss_mb() -> f64 {
    if let Some(sample) = ProcSample::read(std::process::id()) {
        return sample.rss_mb;
    }
    // SAFETY: as above.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return f64::NAN;
    }
    // ru_maxrss is in bytes on macOS, in KB elsewhere.
    let unit = if cfg!(target_os = "macos") { 1.0 } else { 1024.0 };
    ru.ru_maxrss as f64 * unit / 1e6
}

/// CPU time and resident memory of a running process (Linux `/proc`).
#[derive(Clone, Copy, Debug)]
pub struct ProcSample {
    pub cpu_s: f64,
    pub rss_mb: f64,
}

impl ProcSample {
    pub fn read(pid: u32) -> Option<ProcSample> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name (field 2) may hold spaces; the fields after its ')' are plain.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        // Fields 14, 15 (utime, stime) and 24 (rss) of proc(5), counted from field 3.
        let num = |i: usize| fields.get(i - 3)?.parse::<f64>().ok();
        // SAFETY: sysconf has no preconditions.
        let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        if ticks <= 0 || page <= 0 {
            return None;
        }
        Some(ProcSample { cpu_s: (num(14)? + num(15)?) / ticks as f64, rss_mb: num(24)? * page as f64 / 1e6 })
    }
}

/// Total and available system memory in MB (Linux `/proc/meminfo`).
pub fn system_memory_mb() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|kb| kb * 1024.0 / 1e6)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Package energy counters of Linux RAPL (`/sys/class/powercap/intel-rapl:N/energy_uj`; on
/// most systems only root may read them). Power is the difference of two samples.
pub struct Rapl {
    /// (energy_uj path, wrap-around range in µJ) per package.
    zones: Vec<(PathBuf, u64)>,
    last: Option<(std::time::Instant, Vec<u64>)>,
}

impl Rapl {
    /// The readable package zones, or None when there are none.
    pub fn open() -> Option<Rapl> {
        let mut zones = Vec::new();
        for entry in std::fs::read_dir("/sys/class/powercap").ok()?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Packages are `intel-rapl:N` (AMD too); sub-zones `intel-rapl:N:M` are parts of them.
            if !name.starts_with("intel-rapl:") || name.matches(':').count() != 1 {
                continue;
            }
            let path = entry.path().join("energy_uj");
            let range = std::fs::read_to_string(entry.path().join("max_energy_range_uj"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(u64::MAX);
            if std::fs::read_to_string(&path).is_ok() {
                zones.push((path, range));
            }
        }
        zones.sort();
        if zones.is_empty() { None } else { Some(Rapl { zones, last: None }) }
    }

    /// Watts since the previous call (None on the first call or a failed read).
    pub fn sample(&mut self) -> Option<f64> {
        let now = std::time::Instant::now();
        let values: Option<Vec<u64>> = self
            .zones
            .iter()
            .map(|(p, _)| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()))
            .collect();
        let values = values?;
        let previous = self.last.replace((now, values.clone()));
        let (then, before) = previous?;
        let dt = now.duration_since(then).as_secs_f64();
        if dt <= 0.0 {
            return None;
        }
        let uj: u64 = values
            .iter()
            .zip(&before)
            .zip(&self.zones)
            .map(|((&v, &b), (_, range))| if v >= b { v - b } else { range.saturating_sub(b) + v })
            .sum();
        Some(uj as f64 * 1e-6 / dt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures_are_plausible() {
        // Spin until getrusage shows 50 ms more CPU time (bounded: a few seconds at most).
        let cpu = process_cpu_s();
        let mut x = 0u64;
        for i in 0..u64::MAX {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            if i % 1_000_000 == 0 && (process_cpu_s() > cpu + 0.05 || i > 20_000_000_000) {
                break;
            }
        }
        assert!(process_cpu_s() > cpu + 0.05, "CPU time did not advance");
        let rss = process_rss_mb();
        assert!(rss > 1.0 && rss < 1e6, "rss {rss} MB");
        if cfg!(target_os = "linux") {
            let s = ProcSample::read(std::process::id()).expect("/proc/self/stat");
            assert!(s.cpu_s > 0.0 && s.rss_mb > 1.0);
            let (total, avail) = system_memory_mb().expect("/proc/meminfo");
            assert!(total > avail && avail > 0.0);
        }
    }
}
