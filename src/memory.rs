//! Memory accounting: how much memory this process may still use, a check that refuses a
//! planned allocation with its estimate, and fallible allocation for big buffers.
//!
//! The rule for all code that allocates in proportion to user input (model shape, batch,
//! sequence length, vocabulary, corpus size): **estimate first, then allocate fallibly**.
//!
//! ```no_run
//! use anetrain::memory::{self, Estimate};
//! # fn f(b: usize, t: usize, v: usize) -> anyhow::Result<()> {
//! // 1. Add up every big buffer from the arguments (saturating: absurd sizes never overflow).
//! let mut est = Estimate::new();
//! est.add("logits [B·T, V]", memory::f32_bytes(&[b, t, v]));
//! est.add("dlogits [B·T, V]", memory::f32_bytes(&[b, t, v]));
//! // 2. Refuse with the estimate, the available memory and what to change.
//! est.ensure("eval with --batch 4 --seq 256", "lower --batch or --seq")?;
//! // 3. Allocate with an error instead of an abort if the estimate was optimistic.
//! let logits: Vec<f32> = memory::try_zeroed(b * t * v, "logits")?;
//! # Ok(()) }
//! ```
//!
//! API:
//! - [`available`] → [`Available`]: the smallest of the limits that apply, with the name of the
//!   one that binds: Linux `MemAvailable` (`/proc/meminfo`), the cgroup's `memory.max` (v2) or
//!   `memory.limit_in_bytes` (v1) less its current usage, `RLIMIT_AS` (`ulimit -v`) less this
//!   process's address space, and on macOS `hw.memsize` scaled by `kern.memorystatus_level`.
//!   `None` where nothing is known (then every check passes and fallible allocation is the only
//!   guard).
//! - [`ensure_fits`]`(what, bytes, fix)`: `Err` naming `what`, the estimate, the available
//!   memory and its source, and `fix` (what the user should change) when `bytes` exceeds it.
//! - [`Estimate`]: a named sum of parts; [`Estimate::ensure`] is `ensure_fits` with the three
//!   biggest parts listed in the message.
//! - [`f32_bytes`], [`bytes`]: saturating sizes of `dims`-shaped buffers.
//! - [`try_zeroed`]`::<T>(n, what)`: a zero-filled `Vec<T>` of length `n` (`T` a primitive
//!   number) that reports allocation failure as an error; like `vec![0; n]` the zero pages are
//!   not touched until written. [`try_vec_f32`] is its `f32` instance.
//! - [`try_with_capacity`]`::<T>(n, what)`: an empty `Vec<T>` with room for `n` (`try_reserve_exact`).
//! - [`format_bytes`]: `1.5 GB`, `640 MB`, `12 KB`.

use anyhow::{Result, anyhow, bail};
use std::alloc::Layout;

/// Memory this process may still allocate, and the limit that decides it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Available {
    pub bytes: u64,
    /// Where the figure comes from, for messages: `MemAvailable`, `cgroup memory.max`, `ulimit -v`…
    pub source: &'static str,
}

/// The smallest of the memory limits known on this machine (see the module doc); `None` when
/// none can be read.
pub fn available() -> Option<Available> {
    let mut best: Option<Available> = None;
    let mut consider = |bytes: Option<u64>, source: &'static str| {
        if let Some(bytes) = bytes
            && best.is_none_or(|b| bytes < b.bytes)
        {
            best = Some(Available { bytes, source });
        }
    };
    consider(mem_available(), "MemAvailable");
    consider(cgroup_headroom(), "cgroup memory limit");
    consider(rlimit_headroom(), "ulimit -v");
    consider(macos_available(), "memory status");
    best
}

/// [`available`] without the per-process `ulimit -v`: the memory that every process on this
/// machine draws from (for several ranks of one job started on it).
pub fn available_to_machine() -> Option<Available> {
    [
        (mem_available(), "MemAvailable"),
        (cgroup_headroom(), "cgroup memory limit"),
        (macos_available(), "memory status"),
    ]
    .into_iter()
    .filter_map(|(bytes, source)| Some(Available { bytes: bytes?, source }))
    .min_by_key(|a| a.bytes)
}

/// Refuses `bytes` for `what` when it exceeds the [`available`] memory. The error is one
/// sentence: the estimate, the available memory and its source, and `fix`.
pub fn ensure_fits(what: &str, bytes: u64, fix: &str) -> Result<()> {
    check_against(what, bytes, "", fix, available())
}

fn check_against(what: &str, bytes: u64, detail: &str, fix: &str, avail: Option<Available>) -> Result<()> {
    match avail {
        Some(a) if bytes > a.bytes => bail!(
            "{what} needs about {}{detail}, but only {} is available ({}); {fix}",
            format_bytes(bytes),
            format_bytes(a.bytes),
            a.source
        ),
        _ => Ok(()),
    }
}

/// A planned allocation as a sum of named parts.
#[derive(Clone, Debug, Default)]
pub struct Estimate {
    parts: Vec<(String, u64)>,
}

impl Estimate {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, part: impl Into<String>, bytes: u64) -> &mut Self {
        self.parts.push((part.into(), bytes));
        self
    }

    /// The sum of the parts (saturating).
    pub fn total(&self) -> u64 {
        self.parts.iter().fold(0u64, |s, (_, b)| s.saturating_add(*b))
    }

    /// [`ensure_fits`] for the total, naming the biggest parts.
    pub fn ensure(&self, what: &str, fix: &str) -> Result<()> {
        self.ensure_against(what, fix, available())
    }

    /// [`Estimate::ensure`] for one process, then for `copies` such processes together against
    /// [`available_to_machine`] (ranks of a data-parallel job on one machine).
    pub fn ensure_copies(&self, what: &str, fix: &str, copies: usize) -> Result<()> {
        self.ensure(what, fix)?;
        self.copies(copies).ensure_against(what, fix, available_to_machine())
    }

    /// This estimate plus `copies - 1` more of its total, as one named part.
    fn copies(&self, copies: usize) -> Estimate {
        let mut all = self.clone();
        if copies > 1 {
            let others = self.total().saturating_mul(copies as u64 - 1);
            all.add(format!("{} more processes like it on this machine", copies - 1), others);
        }
        all
    }

    fn ensure_against(&self, what: &str, fix: &str, avail: Option<Available>) -> Result<()> {
        let mut parts: Vec<&(String, u64)> = self.parts.iter().filter(|(_, b)| *b > 0).collect();
        parts.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
        let detail = if parts.len() > 1 {
            let named: Vec<String> =
                parts.iter().take(3).map(|(name, b)| format!("{name} {}", format_bytes(*b))).collect();
            format!(" ({}{})", named.join(", "), if parts.len() > 3 { ", …" } else { "" })
        } else {
            String::new()
        };
        check_against(what, self.total(), &detail, fix, avail)
    }
}

/// Bytes of a buffer of `elem` bytes per element and shape `dims` (saturating).
pub fn bytes(elem: usize, dims: &[usize]) -> u64 {
    dims.iter().fold(elem as u64, |s, &d| s.saturating_mul(d as u64))
}

/// Bytes of an `f32` buffer of shape `dims` (saturating).
pub fn f32_bytes(dims: &[usize]) -> u64 {
    bytes(4, dims)
}

/// `1.5 GB`, `640 MB`, `12 KB`, `100 B` (decimal units).
pub fn format_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e15 {
        format!("{:.1} PB", b / 1e15)
    } else if b >= 1e12 {
        format!("{:.1} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.0} KB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

/// Types for which all-zero bytes are a valid value.
///
/// # Safety
/// Implement only for types whose every all-zero bit pattern is a valid value.
pub unsafe trait Zeroable: Copy {}
// SAFETY: primitive numbers; zero bits are 0 / 0.0.
unsafe impl Zeroable for f32 {}
// SAFETY: as above.
unsafe impl Zeroable for f64 {}
// SAFETY: as above.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for u16 {}
// SAFETY: as above.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for i32 {}
// SAFETY: as above.
unsafe impl Zeroable for usize {}
// SAFETY: half::f16 is a u16 bit pattern; zero is +0.0.
unsafe impl Zeroable for half::f16 {}

/// A zero-filled `Vec<T>` of length `n`, or an error naming `what` and the size when the
/// allocator refuses. Zero pages come from the allocator (`calloc`), so nothing is touched
/// until written, as with `vec![0; n]`.
pub fn try_zeroed<T: Zeroable>(n: usize, what: &str) -> Result<Vec<T>> {
    let layout = Layout::array::<T>(n).map_err(|_| alloc_error::<T>(n, what))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: layout has non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut T;
    if ptr.is_null() {
        return Err(alloc_error::<T>(n, what));
    }
    // SAFETY: `ptr` was allocated by the global allocator with the layout of `[T; n]`, which is
    // what `Vec<T>` with capacity `n` deallocates with; all `n` elements are zero, a valid `T`.
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// [`try_zeroed`] for `f32`.
pub fn try_vec_f32(n: usize, what: &str) -> Result<Vec<f32>> {
    try_zeroed(n, what)
}

/// An empty `Vec<T>` with capacity for `n` elements, or an error when the allocator refuses.
pub fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| alloc_error::<T>(n, what))?;
    Ok(v)
}

fn alloc_error<T>(n: usize, what: &str) -> anyhow::Error {
    let size = bytes(std::mem::size_of::<T>(), &[n]);
    let avail = available().map_or(String::new(), |a| format!(" ({} available, {})", format_bytes(a.bytes), a.source));
    anyhow!("cannot allocate {} for {what}: out of memory{avail}", format_bytes(size))
}

/// A `key:  1234 kB` value of a `/proc` file, in bytes.
fn proc_kb(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse::<u64>().ok().map(|kb| kb.saturating_mul(1024))
}

fn mem_available() -> Option<u64> {
    proc_kb(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemAvailable:")
}

/// The limit of this process's cgroup less its usage (v2, then v1); `None` without a limit.
fn cgroup_headroom() -> Option<u64> {
    let read_u64 = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    // v2: "0::/path" names this process's group; inside a container it is usually "/".
    let rel = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("0::").map(|p| p.trim().to_string())));
    let mut dirs = Vec::new();
    if let Some(rel) = rel.filter(|r| r != "/") {
        dirs.push(format!("/sys/fs/cgroup{rel}"));
    }
    dirs.push("/sys/fs/cgroup".to_string());
    for dir in dirs {
        if let Some(max) = read_u64(&format!("{dir}/memory.max")) {
            let used = read_u64(&format!("{dir}/memory.current")).unwrap_or(0);
            return Some(max.saturating_sub(used));
        }
    }
    // v1: an unlimited group reports a near-u64::MAX limit.
    let limit = read_u64("/sys/fs/cgroup/memory/memory.limit_in_bytes").filter(|&l| l < 1 << 60)?;
    let used = read_u64("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0);
    Some(limit.saturating_sub(used))
}

/// `RLIMIT_AS` less this process's current address space (Linux `VmSize`).
fn rlimit_headroom() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let used = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| proc_kb(&s, "VmSize:")).unwrap_or(0);
    Some(lim.rlim_cur.saturating_sub(used))
}

#[cfg(target_os = "macos")]
fn macos_available() -> Option<u64> {
    fn sysctl_u64(name: &str) -> Option<u64> {
        let cname = std::ffi::CString::new(name).ok()?;
        let mut buf = [0u8; 8];
        let mut len = buf.len();
        // SAFETY: buf has `len` writable bytes; sysctlbyname writes at most that many.
        let rc =
            unsafe { libc::sysctlbyname(cname.as_ptr(), buf.as_mut_ptr().cast(), &mut len, std::ptr::null_mut(), 0) };
        match (rc, len) {
            (0, 8) => Some(u64::from_ne_bytes(buf)),
            (0, 4) => Some(u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64),
            _ => None,
        }
    }
    let total = sysctl_u64("hw.memsize")?;
    // The kernel's own "percent of memory available" (what memory pressure is computed from).
    match sysctl_u64("kern.memorystatus_level") {
        Some(level) if level <= 100 => Some(total / 100 * level),
        _ => Some(total),
    }
}

#[cfg(not(target_os = "macos"))]
fn macos_available() -> Option<u64> {
    None
}

/// Asks the system to back the whole 2 MB pages inside `buf` with 2 MB pages (Linux
/// transparent huge pages), now: `MADV_HUGEPAGE` for pages faulted in later and
/// `MADV_COLLAPSE` (Linux 6.1+) to copy the present ones into huge pages. Returns how many
/// bytes were advised and collapsed (0 where the system declines or is not Linux).
///
/// Why: decoding streams every weight once per token, 4 KB page after 4 KB page; each new
/// page is a TLB miss and a page walk. llama2.c's `run.c` mmaps its checkpoint, and the page
/// cache (ext4 large folios) maps it 2 MB at a time, while our weights sit in anonymous 4 KB
/// pages unless asked (`transparent_hugepage` is `madvise` on most distributions). Only an
/// optimisation: the contents never change, and any refusal is ignored.
pub fn advise_huge_pages<T>(buf: &[T]) -> usize {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (buf.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_ptr() as usize + std::mem::size_of_val(buf)) / HUGE * HUGE;
        if end <= start {
            return 0;
        }
        // SAFETY: [start, end) lies inside `buf`'s allocation; both advices keep every byte's
        // value (they change only which physical pages hold it) and return errors, never
        // signals, for memory they cannot handle.
        let ok = unsafe {
            let p = start as *mut libc::c_void;
            libc::madvise(p, end - start, libc::MADV_HUGEPAGE) == 0
                && libc::madvise(p, end - start, libc::MADV_COLLAPSE) == 0
        };
        if ok { end - start } else { 0 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buf;
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_with_the_estimate_the_available_memory_and_the_fix() {
        let avail = Some(Available { bytes: 2_000_000_000, source: "MemAvailable" });
        assert!(check_against("x", 2_000_000_000, "", "lower --batch", avail).is_ok());
        let err = check_against("training stories260k", 17_200_000_000, "", "lower --batch", avail).unwrap_err();
        assert_eq!(
            err.to_string(),
            "training stories260k needs about 17.2 GB, but only 2.0 GB is available (MemAvailable); lower --batch"
        );
        assert!(check_against("x", u64::MAX, "", "", None).is_ok(), "no known limit: no refusal");
    }

    #[test]
    fn estimate_names_its_biggest_parts_and_saturates() {
        let mut est = Estimate::new();
        est.add("logits", 8_000_000_000).add("weights", 1_000_000).add("activations", 3_000_000_000);
        est.add("a", 1).add("empty", 0);
        assert_eq!(est.total(), 11_001_000_001);
        let avail = Some(Available { bytes: 1_000_000_000, source: "ulimit -v" });
        let msg = est.ensure_against("eval", "lower --batch", avail).unwrap_err().to_string();
        assert_eq!(
            msg,
            "eval needs about 11.0 GB (logits 8.0 GB, activations 3.0 GB, weights 1 MB, …), \
             but only 1.0 GB is available (ulimit -v); lower --batch"
        );
        assert_eq!(f32_bytes(&[usize::MAX, 4]), u64::MAX);
        assert_eq!(f32_bytes(&[2, 3]), 24);
        assert_eq!(bytes(2, &[]), 2);
    }

    /// Two ranks on one machine: each fits, both together do not.
    #[test]
    fn copies_on_one_machine_are_counted_together() {
        let mut est = Estimate::new();
        est.add("weights", 600_000_000).add("activations", 100_000_000);
        let machine = Some(Available { bytes: 1_000_000_000, source: "MemAvailable" });
        est.copies(1).ensure_against("train", "fewer ranks", machine).unwrap();
        let msg = est.copies(2).ensure_against("train", "fewer ranks", machine).unwrap_err().to_string();
        assert!(msg.contains("1.4 GB") && msg.contains("1 more processes like it on this machine 700 MB"), "{msg}");
        assert!(available_to_machine().is_none_or(|a| a.source != "ulimit -v"));
    }

    #[test]
    fn fallible_allocation_errs_instead_of_aborting() {
        let v: Vec<f32> = try_vec_f32(1000, "test").unwrap();
        assert!(v.len() == 1000 && v.iter().all(|&x| x == 0.0));
        assert!(try_vec_f32(0, "empty").unwrap().is_empty());
        // More than the address space: the layout itself is refused.
        let err = try_vec_f32(usize::MAX / 2, "a huge buffer").unwrap_err().to_string();
        assert!(err.starts_with("cannot allocate") && err.contains("a huge buffer"), "{err}");
        // A valid layout no allocator can satisfy (2^62 bytes).
        assert!(try_zeroed::<u8>(1 << 62, "4 EiB").is_err());
        assert!(try_with_capacity::<u64>(1 << 61, "16 EiB").is_err());
        let mut w = try_with_capacity::<u32>(10, "small").unwrap();
        w.push(1);
        assert_eq!(w.capacity(), 10);
    }

    #[test]
    fn reads_this_machines_limits() {
        assert_eq!(proc_kb("MemTotal:  100 kB\nMemAvailable:   2048 kB\n", "MemAvailable:"), Some(2048 * 1024));
        if cfg!(target_os = "linux") {
            let a = available().expect("Linux has /proc/meminfo");
            assert!(a.bytes > 0);
        }
        assert_eq!(format_bytes(640_000_000), "640 MB");
        assert_eq!(format_bytes(3_500_000_000_000_000), "3.5 PB");
    }

    /// Advising keeps every value (it moves them between physical pages), covers only whole
    /// 2 MB pages inside the buffer, and declines a buffer without one.
    #[test]
    fn huge_page_advice_keeps_the_contents() {
        let mut big: Vec<f32> = (0..3 << 20).map(|i| i as f32).collect();
        let advised = advise_huge_pages(&big);
        assert!(advised.is_multiple_of(2 << 20) && advised <= big.len() * 4, "{advised} bytes");
        assert!(big.iter().enumerate().all(|(i, &v)| v == i as f32), "a value changed");
        big[12345] = -1.0;
        assert_eq!(big[12345], -1.0);
        assert_eq!(advise_huge_pages(&big[..1000]), 0);
    }
}
