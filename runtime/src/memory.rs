//! Whether a run fits in its device's memory, asked before anything large
//! is allocated: a run past it would otherwise end in an allocation
//! failure part way (an abort on the host, with no word of why) or the
//! kernel's out-of-memory killer, after minutes of binding weights and
//! filling a context.
//!
//! The backends tell what a step holds at a point (the CPU step's
//! `bytes_at`, [`crate::exec::ExecPlan::bytes_needed`] on CUDA); this
//! module tells how much the host has ([`host_available`]) and words the
//! refusal ([`Shortfall`]).

use std::fmt;

/// A run that needs more memory than its device has available.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// What needs it, e.g. "the decode step at b = 32, m_c = 8192, m_d = 63".
    pub what: String,
    /// What it holds, e.g. "weights, KV caches and activations".
    pub holds: String,
    /// Bytes it needs at least.
    pub needed: usize,
    /// Bytes the device has available.
    pub available: usize,
    /// The device, e.g. "this machine" or "the GPU".
    pub device: String,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not enough memory for {}: it needs at least {} ({}), and {} has {} available",
            self.what,
            gb(self.needed),
            self.holds,
            self.device,
            gb(self.available)
        )
    }
}

impl std::error::Error for Shortfall {}

/// `Err` when `needed` bytes exceed `available` (`None`: unknown, which
/// passes), for a step: its weights, KV caches and activations.
pub fn check(what: &str, needed: usize, available: Option<usize>, device: &str) -> Result<(), Shortfall> {
    check_holding(what, "weights, KV caches and activations", needed, available, device)
}

/// [`check`] for something that holds `holds`.
pub fn check_holding(
    what: &str,
    holds: &str,
    needed: usize,
    available: Option<usize>,
    device: &str,
) -> Result<(), Shortfall> {
    match available {
        Some(available) if needed > available => Err(Shortfall {
            what: what.to_string(),
            holds: holds.to_string(),
            needed,
            available,
            device: device.to_string(),
        }),
        _ => Ok(()),
    }
}

/// Bytes as gigabytes (10^9), two decimals.
pub fn gb(bytes: usize) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// Bytes the host can still give this process: `MemAvailable` of
/// `/proc/meminfo`, or less where the process's memory cgroup has a lower
/// limit: the limit less the cgroup's anonymous memory (its page cache
/// can be reclaimed, as `MemAvailable` counts it). `None` where neither
/// can be read (not Linux).
pub fn host_available() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| mem_available(&t));
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|t| cgroup_available(&t));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let value: usize = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        None => Some(value),
        Some(_) => None,
    }
}

/// Room under the memory limit of the cgroup that `/proc/self/cgroup`
/// (its text) names: v1's `memory` controller, else v2's unified one.
/// `None` without a limit.
fn cgroup_available(cgroups: &str) -> Option<usize> {
    let read = |dir: &std::path::Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
    let root = std::path::Path::new("/sys/fs/cgroup");
    let v1 = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| root.join("memory").join(path.trim_start_matches('/')))
    });
    if let Some(dir) = v1 {
        return cgroup_room(&read(&dir, "memory.limit_in_bytes")?, &read(&dir, "memory.stat")?, "total_rss");
    }
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(path.trim_start_matches('/'));
    cgroup_room(&read(&dir, "memory.max")?, &read(&dir, "memory.stat")?, "anon")
}

/// Room under a cgroup's memory limit (`limit`: a number of bytes, or no
/// limit: `max`, or a value past 2^60 as v1 writes it) less the anonymous
/// memory its `memory.stat` gives under `anon`.
fn cgroup_room(limit: &str, stat: &str, anon: &str) -> Option<usize> {
    let limit: usize = limit.trim().parse().ok().filter(|&l: &usize| l < 1 << 60)?;
    let used = stat.lines().find_map(|l| {
        let (key, value) = l.split_once(' ')?;
        (key == anon).then(|| value.trim().parse::<usize>().ok()).flatten()
    })?;
    Some(limit.saturating_sub(used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(mem_available(text), Some(22_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn cgroup_room_is_the_limit_less_anonymous_memory() {
        let stat = "cache 5000\nrss 300\ntotal_cache 5000\ntotal_rss 400\n";
        assert_eq!(cgroup_room("1000\n", stat, "total_rss"), Some(600));
        assert_eq!(cgroup_room("100", stat, "total_rss"), Some(0));
        // No limit: v2's `max`, v1's largest page-aligned value.
        assert_eq!(cgroup_room("max\n", "anon 400\n", "anon"), None);
        assert_eq!(cgroup_room("9223372036854771712\n", stat, "total_rss"), None);
        assert_eq!(cgroup_room("1000", "file 10\n", "anon"), None);
    }

    #[test]
    fn a_shortfall_says_what_needs_how_much_of_what_is_there() {
        assert_eq!(check("x", 10, None, "the GPU"), Ok(()));
        assert_eq!(check("x", 10, Some(10), "the GPU"), Ok(()));
        let e = check("the decode step at b = 2", 51_200_000_000, Some(22_610_000_000), "this machine");
        let text = e.map_err(|e| e.to_string()).err().unwrap_or_default();
        assert_eq!(
            text,
            "not enough memory for the decode step at b = 2: it needs at least 51.20 GB (weights, KV caches \
             and activations), and this machine has 22.61 GB available"
        );
    }

    #[test]
    fn this_host_has_some_memory_available() {
        if cfg!(target_os = "linux") {
            assert!(host_available().is_some_and(|n| n > 0));
        }
    }
}
