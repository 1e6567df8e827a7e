//! Process-wide resource readings for the benchmark: CPU time (user + system, all threads) and resident memory.
//!
//! On Unix the CPU time and the peak RSS come from `getrusage(RUSAGE_SELF)`; the current RSS from
//! `/proc/self/statm` (Linux). Where a reading is unavailable the functions return `None` and the report says
//! so instead of printing a zero.

use std::time::Duration;

/// CPU time consumed by the whole process so far (user + system, every thread).
pub fn cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let u = rusage()?;
        let tv = |t: libc::timeval| Duration::new(t.tv_sec.max(0) as u64, (t.tv_usec.max(0) as u32) * 1000);
        Some(tv(u.ru_utime) + tv(u.ru_stime))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Peak resident set size of the process since it started, in bytes.
pub fn peak_rss() -> Option<u64> {
    #[cfg(unix)]
    {
        let u = rusage()?;
        // Linux and the BSDs report kilobytes; macOS reports bytes.
        let scale = if cfg!(target_os = "macos") { 1 } else { 1024 };
        Some(u.ru_maxrss.max(0) as u64 * scale)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Resident set size right now, in bytes (Linux only).
pub fn current_rss() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads a system constant.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 { n as u64 } else { 4096 }
    }
    #[cfg(not(unix))]
    {
        4096
    }
}

#[cfg(unix)]
fn rusage() -> Option<libc::rusage> {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given and nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: rc == 0 means the struct was filled (it was zeroed before in any case).
    (rc == 0).then(|| unsafe { u.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work() {
        let Some(a) = cpu_time() else { return };
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let b = cpu_time().unwrap_or_default();
        assert!(b > a, "{a:?} -> {b:?}");
    }

    #[test]
    fn peak_rss_covers_an_allocation_and_current_rss() {
        let Some(before) = peak_rss() else { return };
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        let cur = current_rss();
        let after = peak_rss().unwrap_or_default();
        assert!(after >= before);
        if let Some(cur) = cur {
            assert!(cur >= 64 << 20, "current RSS {cur} below the 64 MiB just touched");
            assert!(after >= cur, "peak {after} below current {cur}");
        }
    }
}
