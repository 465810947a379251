//! What the operating system says about this process and machine: CPU time (getrusage), peak
//! resident memory (VmHWM, reset through /proc/self/clear_refs), the CPU model and core count.
//!
//! CPU time and memory are this process only: an in-process Mailroom host or a native consumer,
//! plus the bench's own bookkeeping. A local nats-server is a child process and is not counted.

/// User plus system CPU seconds this process has used so far; `None` where unsupported.
#[cfg(unix)]
pub fn cpu_seconds() -> Option<f64> {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

/// User plus system CPU seconds this process has used so far; `None` where unsupported.
#[cfg(not(unix))]
pub fn cpu_seconds() -> Option<f64> {
    None
}

/// Resets the peak-RSS watermark to the current RSS. Returns whether that worked (Linux
/// only; a container may also refuse it).
pub fn reset_peak_rss() -> bool {
    cfg!(target_os = "linux") && std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The peak resident set size since the last reset (or process start), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("VmHWM:")
}

/// Current resident memory of this process (VmRSS), in bytes.
pub fn current_rss_bytes() -> Option<u64> {
    status_bytes("VmRSS:")
}

/// A `kB` field of `/proc/self/status` (Linux only), in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Measures CPU time and peak memory over one phase of a scenario.
pub struct Meter {
    cpu_start: Option<f64>,
    rss_reset: bool,
}

/// What a [`Meter`] saw.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// CPU seconds (user + system) of this process.
    pub cpu_seconds: Option<f64>,
    /// Peak RSS in bytes since the meter started (None if the watermark could not be reset).
    pub peak_rss: Option<u64>,
}

impl Meter {
    /// Resets the peak-RSS watermark and starts counting CPU.
    pub fn start() -> Meter {
        let rss_reset = reset_peak_rss();
        Meter {
            cpu_start: cpu_seconds(),
            rss_reset,
        }
    }

    /// Starts counting CPU again from now (the RSS watermark is kept).
    pub fn restart_cpu(&mut self) {
        self.cpu_start = cpu_seconds();
    }

    /// CPU used since the start and the peak RSS since the reset.
    pub fn read(&self) -> Usage {
        Usage {
            cpu_seconds: match (self.cpu_start, cpu_seconds()) {
                (Some(a), Some(b)) => Some((b - a).max(0.0)),
                _ => None,
            },
            peak_rss: if self.rss_reset {
                peak_rss_bytes()
            } else {
                None
            },
        }
    }
}

/// The CPU model from /proc/cpuinfo, else "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_advances() {
        let a = cpu_seconds();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        if let (Some(a), Some(b)) = (a, cpu_seconds()) {
            assert!(b >= a);
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn peak_rss_is_read() {
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
