//! The process collector: the standard `process_*` metrics (resident and
//! virtual memory, open and maximum file descriptors, CPU time, start time)
//! that Prometheus' own client libraries export, read from `/proc/self` at
//! each scrape.
//!
//! Linux only: elsewhere (and when `/proc` cannot be read) the metrics are
//! absent rather than wrong. Reading costs a few small file reads per
//! scrape and nothing between scrapes.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What `/proc` says about this process.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct ProcessStats {
    pub cpu_seconds: f64,
    pub start_time_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub virtual_bytes: u64,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
}

/// Clock ticks per second in `/proc/*/stat` (`USER_HZ`): 100 on every
/// architecture Linux exposes to user space this way, which is why
/// Prometheus' procfs reader hard-codes it too (no `sysconf` needed).
const USER_HZ: f64 = 100.0;

/// Reads the figures of a `/proc/{pid}/stat` line: CPU time (user + system),
/// start time in ticks after boot, and virtual memory in bytes.
fn parse_stat(stat: &str) -> Option<(f64, u64, u64)> {
    // The command name (field 2) is in parentheses and may itself hold
    // spaces and parentheses: the fields that follow start after the last
    // ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is fields[n - 3].
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = field(14)? + field(15)?;
    Some((ticks as f64 / USER_HZ, field(22)?, field(23)?))
}

/// `VmRSS` of `/proc/{pid}/status`, in bytes (the kernel writes kB).
fn parse_resident(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft limit of `Max open files` in `/proc/{pid}/limits`; `None` when
/// unlimited.
fn parse_max_fds(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `btime` of `/proc/stat`: when the system booted, Unix seconds.
fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// Reads this process' figures; `None` where `/proc` is not there.
fn read() -> Option<ProcessStats> {
    if !cfg!(target_os = "linux") {
        return None;
    }
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let (cpu_seconds, start_ticks, virtual_bytes) = parse_stat(&read("/proc/self/stat")?)?;
    let start_time_seconds = read("/proc/stat")
        .as_deref()
        .and_then(parse_boot_time)
        .map(|boot| boot as f64 + start_ticks as f64 / USER_HZ);
    Some(ProcessStats {
        cpu_seconds,
        start_time_seconds,
        resident_bytes: read("/proc/self/status")
            .as_deref()
            .and_then(parse_resident),
        virtual_bytes,
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| entries.count() as u64),
        max_fds: read("/proc/self/limits").as_deref().and_then(parse_max_fds),
    })
}

/// Exports the `process_*` metrics; see the module doc.
#[derive(Debug, Default)]
pub(crate) struct ProcessCollector;

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> fmt::Result {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(stats) = read() else {
            return Ok(());
        };
        let cpu = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(stats.cpu_seconds).encode(cpu)?;
        if let Some(open) = stats.open_fds {
            let help = "Number of open file descriptors.";
            gauge(&mut encoder, "process_open_fds", help, open as f64)?;
        }
        if let Some(max) = stats.max_fds {
            let help = "Maximum number of open file descriptors.";
            gauge(&mut encoder, "process_max_fds", help, max as f64)?;
        }
        let help = "Virtual memory size in bytes.";
        let virtual_bytes = stats.virtual_bytes as f64;
        gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            help,
            virtual_bytes,
        )?;
        if let Some(resident) = stats.resident_bytes {
            let help = "Resident memory size in bytes.";
            gauge(
                &mut encoder,
                "process_resident_memory_bytes",
                help,
                resident as f64,
            )?;
        }
        if let Some(start) = stats.start_time_seconds {
            let help = "Start time of the process since unix epoch in seconds.";
            gauge(&mut encoder, "process_start_time_seconds", help, start)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_proc_formats() {
        // A command name with a space and a parenthesis of its own.
        let stat = "4242 (presence gw) x) S 1 4242 4242 0 -1 4194560 2117 0 0 0 \
                    250 75 0 0 20 0 9 0 123456 987654321 4321 18446744073709551615";
        let (cpu, start, virt) = parse_stat(stat).unwrap();
        assert_eq!((cpu, start, virt), (3.25, 123_456, 987_654_321));
        assert_eq!(parse_stat("garbage"), None);

        let status = "Name:\tpresence-gateway\nVmSize:\t  964504 kB\nVmRSS:\t   69216 kB\n";
        assert_eq!(parse_resident(status), Some(69_216 * 1024));

        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_max_fds(limits), Some(1024));
        let unlimited = limits.replace("1024  ", "unlimited");
        assert_eq!(parse_max_fds(&unlimited), None);

        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1764000000\nprocesses 9\n"),
            Some(1_764_000_000)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let stats = read().expect("/proc/self");
        assert!(stats.resident_bytes.is_some_and(|b| b > 0));
        assert!(stats.virtual_bytes >= stats.resident_bytes.unwrap_or(0));
        assert!(stats.open_fds.is_some_and(|n| n >= 3));
        assert!(stats.max_fds.is_some());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = stats.start_time_seconds.expect("start time");
        // Started before now, and not before the machine booted this
        // century (a tick of rounding either way).
        assert!(started <= now + 1.0 && started > 946_684_800.0, "{started}");
    }
}
