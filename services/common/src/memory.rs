//! How much memory this process may still take on the host: what a run or a cache is sized
//! against before anything is allocated, so an oversized request is refused instead of ending
//! in the kernel's OOM killer.

use std::path::Path;

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Bytes the cgroup still allows (v2 `memory.max` − `memory.current`, or v1's pair); `None`
/// without a limit.
fn cgroup_available() -> Option<u64> {
    let v2 = Path::new("/sys/fs/cgroup");
    let (limit, used) = match read_u64(&v2.join("memory.max")) {
        Some(limit) => (limit, read_u64(&v2.join("memory.current")).unwrap_or(0)),
        None => {
            let v1 = Path::new("/sys/fs/cgroup/memory");
            let limit = read_u64(&v1.join("memory.limit_in_bytes"))?;
            // v1 reports "no limit" as a number near i64::MAX.
            if limit >= 1 << 60 {
                return None;
            }
            (
                limit,
                read_u64(&v1.join("memory.usage_in_bytes")).unwrap_or(0),
            )
        }
    };
    Some(limit.saturating_sub(used))
}

/// `MemAvailable` of /proc/meminfo, in bytes.
fn meminfo_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of host memory this process can still allocate: the smaller of the host's available
/// memory and what its cgroup allows. `None` where neither can be read.
pub fn available_host_memory() -> Option<u64> {
    match (cgroup_available(), meminfo_available()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `bytes` as a person reads it (GiB with two decimals, or MiB).
pub fn human_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let b = bytes as f64;
    if b >= 1024.0 * MIB {
        format!("{:.2} GiB", b / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", b / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_host_reports_some_available_memory() {
        let available = available_host_memory().expect("/proc/meminfo is readable on Linux");
        assert!(available > 0);
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
    }
}
