//! The machine: CPU and memory of the processes from /proc, and what the machine is.

use anyhow::{Context as _, Result, ensure};

/// A field of /proc/PID/status, in KiB (VmRSS, VmHWM).
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU seconds of the processes involved, and of the whole machine.
pub struct CpuWatch {
    pub worker: Option<u32>,
    pub gcs: Vec<u32>,
    pub pubsub: Vec<u32>,
}

#[derive(Default, Clone, Copy)]
pub struct Cpu {
    pub worker: f64,
    pub gcs: f64,
    pub pubsub: f64,
    pub bench: f64,
    pub machine_busy: f64,
    pub machine_total: f64,
}

impl CpuWatch {
    /// `gcs_endpoint` `http://127.0.0.X` names the fake-gcs; `pubsub_endpoint` the emulator.
    pub fn new(worker: Option<u32>, gcs_endpoint: Option<&str>, pubsub_endpoint: &str) -> CpuWatch {
        let host = gcs_endpoint.map(|e| e.trim_start_matches("http://").to_string());
        let port = format!(
            "--port={}",
            pubsub_endpoint.rsplit(':').next().unwrap_or_default()
        );
        let mut gcs = Vec::new();
        let mut pubsub = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if let Some(host) = &host
                && args.iter().any(|a| a.contains("fake-gcs-server"))
                && args.windows(2).any(|w| w[0] == "-host" && w[1] == *host)
            {
                gcs.push(pid);
            }
            if args.iter().any(|a| a == &port) {
                pubsub.push(pid);
            }
        }
        CpuWatch { worker, gcs, pubsub }
    }

    pub fn sample(&self) -> Cpu {
        let seconds = |pids: &[u32]| pids.iter().map(|pid| process_cpu(*pid)).sum::<f64>();
        let (machine_busy, machine_total) = machine_cpu();
        Cpu {
            worker: self.worker.map(process_cpu).unwrap_or_default(),
            gcs: seconds(&self.gcs),
            pubsub: seconds(&self.pubsub),
            bench: process_cpu(std::process::id()),
            machine_busy,
            machine_total,
        }
    }
}

impl Cpu {
    /// `f` of each reading and `other`'s.
    pub fn zip(&self, other: &Cpu, f: impl Fn(f64, f64) -> f64) -> Cpu {
        Cpu {
            worker: f(self.worker, other.worker),
            gcs: f(self.gcs, other.gcs),
            pubsub: f(self.pubsub, other.pubsub),
            bench: f(self.bench, other.bench),
            machine_busy: f(self.machine_busy, other.machine_busy),
            machine_total: f(self.machine_total, other.machine_total),
        }
    }

    pub fn since(&self, before: &Cpu) -> Cpu {
        self.zip(before, |now, then| now - then)
    }

    pub fn add(&mut self, other: &Cpu) {
        *self = self.zip(other, |sum, more| sum + more);
    }

    pub fn other(&self) -> f64 {
        (self.machine_busy - self.worker - self.gcs - self.pubsub - self.bench).max(0.0)
    }
}

pub fn clock_ticks() -> f64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100.0,
        ticks => ticks as f64,
    }
}

/// User + system CPU seconds of a process (all its threads); 0 when it is gone.
pub fn process_cpu(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces) start at field 3.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// Busy and total CPU seconds of the whole machine (all cores), from /proc/stat.
pub fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: f64 = values.iter().sum();
    let idle = values.get(3).copied().unwrap_or(0.0) + values.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clock_ticks(), total / clock_ticks())
}

/// Writes dirty pages out now, so that the kernel's writeback of the files
/// just written does not run during the first measurement.
pub fn sync_files() -> Result<()> {
    ensure!(
        std::process::Command::new("sync").status()?.success(),
        "sync failed"
    );
    Ok(())
}

pub struct Machine {
    pub cpus: usize,
    pub model: String,
    pub memory: String,
    pub kernel: String,
    pub date: String,
}

impl Machine {
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| format!("{:.1} GiB", kb / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            model,
            memory,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            date: jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC").to_string(),
        }
    }

    pub fn markdown(&self) -> String {
        format!(
            "# audio-store throughput benchmark\n\n\
             - date: {}\n- machine: {} CPUs ({}), {} RAM, Linux {}\n- load average at the start: {}\n\
             - the Pub/Sub emulator, fake-gcs-server, the worker and this bench all run on this machine",
            self.date,
            self.cpus,
            self.model,
            self.memory,
            self.kernel,
            loadavg()
        )
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
