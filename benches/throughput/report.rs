//! What a measurement found (runs, rounds, scenarios), the CPU and memory of
//! the processes from /proc, and the markdown tables.

use crate::{MIB, Params};
use anyhow::{Context as _, Result};
use std::fmt::Write as _;
use std::time::Duration;

/// Issue 6's targets.
const TARGET_SMALL: f64 = 0.80;
const TARGET_LARGE: f64 = 0.85;
const TARGET_PEAK_RSS_MIB: f64 = 64.0;
const TARGET_IDLE_RSS_MIB: f64 = 30.0;
/// How long the worker sits idle before its idle RSS is read.
pub const IDLE_SETTLE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Small,
    Large,
    Huge,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Small => "small",
            Kind::Large => "large",
            Kind::Huge => "huge",
        }
    }
}

/// CPU seconds of the processes involved; `busy` is the whole machine's.
#[derive(Default, Clone, Copy)]
pub struct Cpu {
    pub worker: f64,
    pub gcs: f64,
    pub pubsub: f64,
    pub bench: f64,
    pub busy: f64,
}

impl Cpu {
    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            worker: self.worker - before.worker,
            gcs: self.gcs - before.gcs,
            pubsub: self.pubsub - before.pubsub,
            bench: self.bench - before.bench,
            busy: self.busy - before.busy,
        }
    }

    /// What the rest of the machine used.
    pub fn others(&self) -> f64 {
        (self.busy - self.worker - self.gcs - self.pubsub - self.bench).max(0.0)
    }
}

/// Which processes to read: the worker by pid, the services by process group
/// (each runs in a group of its own, see `testkit::process`).
pub struct CpuWatch {
    pub worker: Option<u32>,
    pub gcs: Option<u32>,
    pub pubsub: Option<u32>,
}

impl CpuWatch {
    pub fn sample(&self) -> Cpu {
        let ticks = match rustix::param::clock_ticks_per_second() {
            0 => 100.0,
            ticks => ticks as f64,
        };
        let mut cpu = Cpu::default();
        let bench = std::process::id();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // After the command name (which may contain spaces): state, ppid, pgrp, ...,
            // utime and stime at 11 and 12.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
            let field = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
            let group = Some(field(2) as u32);
            let slot = match Some(pid) {
                pid if pid == self.worker => &mut cpu.worker,
                _ if group == self.gcs => &mut cpu.gcs,
                _ if group == self.pubsub => &mut cpu.pubsub,
                pid if pid == Some(bench) => &mut cpu.bench,
                _ => continue,
            };
            *slot += (field(11) + field(12)) / ticks;
        }
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let times: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .take(8)
            .filter_map(|value| value.parse().ok())
            .collect();
        // All but idle and iowait.
        let idle = times.get(3).unwrap_or(&0.0) + times.get(4).unwrap_or(&0.0);
        cpu.busy = (times.iter().sum::<f64>() - idle) / ticks;
        cpu
    }
}

/// A field of /proc/PID/status, in KiB (VmRSS, VmHWM).
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// What span export (`BENCH_OTLP=1`) sent during one worker run.
#[derive(Clone, Copy)]
pub struct Spans {
    pub received: usize,
    /// `audio_store_spans_dropped_total` at the end.
    pub dropped: u64,
    /// Worker CPU-s from the last event until no span came for a while.
    pub tail_cpu: f64,
}

/// One measurement: how long it took, the CPU it cost and, for the worker, its readings.
#[derive(Default)]
pub struct Run {
    pub label: String,
    pub elapsed: Duration,
    pub cpu: Cpu,
    pub ready: Option<Duration>,
    /// VmRSS and CPU after [`IDLE_SETTLE`] idle before the messages.
    pub idle: Option<(u64, Cpu)>,
    pub peak_rss_kib: Option<u64>,
    pub warnings: usize,
    pub spans: Option<Spans>,
}

impl Run {
    pub fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    /// The line printed as the run ends.
    pub fn line(&self, scenario: &Scenario) -> String {
        let mut line = format!(
            "{:<24} {:>8.2} s  {:>8.1} {}  CPU-s: worker {:.2}, fake-gcs {:.2}, emulator {:.2}, bench {:.2}, others {:.2}",
            self.label,
            self.secs(),
            scenario.rate(self.secs()),
            scenario.unit(),
            self.cpu.worker,
            self.cpu.gcs,
            self.cpu.pubsub,
            self.cpu.bench,
            self.cpu.others()
        );
        let mib = |kib: u64| kib as f64 / 1024.0;
        if let Some(ready) = self.ready {
            let _ = write!(line, "  ready after {} ms", ready.as_millis());
        }
        if let Some((rss, _)) = self.idle {
            let _ = write!(line, "  idle RSS {:.1} MiB", mib(rss));
        }
        if let Some(peak) = self.peak_rss_kib {
            let _ = write!(line, "  peak RSS {:.1} MiB", mib(peak));
        }
        if self.warnings > 0 {
            let _ = write!(line, "  {} log line(s) at warn or above", self.warnings);
        }
        if let Some(spans) = self.spans {
            let _ = write!(
                line,
                "  {} spans received, {} dropped",
                spans.received, spans.dropped
            );
        }
        line
    }
}

/// One round: the ceilings and the worker on the same files, back to back.
pub struct Round {
    pub gcs: Run,
    pub pubsub: Option<Run>,
    pub worker: Run,
}

impl Round {
    /// Worker throughput / the lower ceiling's (the same work, so the inverse ratio of times).
    pub fn ratio(&self) -> f64 {
        let pubsub = self.pubsub.as_ref().map_or(0.0, Run::secs);
        self.gcs.secs().max(pubsub) / self.worker.secs()
    }
}

pub struct Scenario {
    pub kind: Kind,
    pub title: String,
    pub messages: usize,
    pub bytes: u64,
    pub rounds: Vec<Round>,
}

/// The median (the mean of the middle two of an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Scenario {
    /// The scenario's unit: messages/s for small messages, MiB/s for files.
    pub fn rate(&self, secs: f64) -> f64 {
        match self.kind {
            Kind::Small => self.messages as f64 / secs,
            Kind::Large | Kind::Huge => self.bytes as f64 / MIB as f64 / secs,
        }
    }

    pub fn unit(&self) -> &'static str {
        match self.kind {
            Kind::Small => "msg/s",
            Kind::Large | Kind::Huge => "MiB/s",
        }
    }

    /// The median over the rounds of a run's rate.
    fn median_rate(&self, run: impl Fn(&Round) -> Option<&Run>) -> f64 {
        median(
            self.rounds
                .iter()
                .filter_map(|r| run(r).map(|r| self.rate(r.secs())))
                .collect(),
        )
    }

    /// The worst round's value of a worker memory reading, in MiB.
    fn worst(&self, reading: impl Fn(&Run) -> Option<u64>) -> Option<f64> {
        let kib = self
            .rounds
            .iter()
            .filter_map(|round| reading(&round.worker))
            .max();
        kib.map(|kib| kib as f64 / 1024.0)
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

/// The results table, then the worker's memory, CPU and span export.
pub fn results(params: &Params, scenarios: &[Scenario]) -> String {
    let mut out = format!(
        "Concurrency {} (worker.concurrency, and the ceilings' messages in flight). Rates are \
         medians over {} rounds; worker / ceiling is the median of the rounds' ratios (each \
         round runs its ceilings and the worker back to back on the same files).\n\n\
         | measurement | worker | ceiling | worker / ceiling | target | |\n|---|---:|---:|---:|---|---|\n",
        params.concurrency, params.rounds
    );
    for scenario in scenarios {
        let worker = scenario.median_rate(|r| Some(&r.worker));
        let gcs = scenario.median_rate(|r| Some(&r.gcs));
        let ratio = median(scenario.rounds.iter().map(Round::ratio).collect());
        let (what, ceiling, target, target_text) = match scenario.kind {
            Kind::Small => {
                let pubsub = scenario.median_rate(|r| r.pubsub.as_ref());
                let what =
                    "messages/s, worker timed from its spawn (backlog published before) to the last event";
                let ceiling = format!("GCS {gcs:.1} ({:.1} objects/s); Pub/Sub {pubsub:.1}", gcs * 2.0);
                (
                    what,
                    ceiling,
                    TARGET_SMALL,
                    format!("≥ {TARGET_SMALL:.2} of the lower ceiling"),
                )
            }
            kind => {
                let what = "MiB/s, worker timed from the first publish (worker idle) to the last event";
                let huge = if kind == Kind::Huge { " (as large)" } else { "" };
                (
                    what,
                    format!("{gcs:.1}"),
                    TARGET_LARGE,
                    format!("≥ {TARGET_LARGE:.2}{huge}"),
                )
            }
        };
        let _ = writeln!(
            out,
            "| {}, {what} | {worker:.1} | {ceiling} | {ratio:.2} | {target_text} | {} |",
            scenario.title,
            verdict(ratio >= target)
        );
    }
    let huge = scenarios.iter().find(|s| s.kind == Kind::Huge);
    if let Some((huge, peak)) = huge.and_then(|s| Some((s, s.worst(|run| run.peak_rss_kib)?))) {
        let _ = writeln!(
            out,
            "| worker peak RSS (VmHWM) with the {} MiB file, worst round | {peak:.1} MiB | | | < {TARGET_PEAK_RSS_MIB:.0} MiB | {} |",
            huge.bytes / MIB,
            verdict(peak < TARGET_PEAK_RSS_MIB)
        );
    }
    let idle = scenarios
        .iter()
        .filter_map(|s| s.worst(|run| run.idle.map(|(rss, _)| rss)));
    if let Some(idle) = idle.reduce(f64::max) {
        let _ = writeln!(
            out,
            "| worker idle RSS (VmRSS {} s after ready), worst round | {idle:.1} MiB | | | < {TARGET_IDLE_RSS_MIB:.0} MiB | {} |",
            IDLE_SETTLE.as_secs(),
            verdict(idle < TARGET_IDLE_RSS_MIB)
        );
    }
    let mut worker = Vec::new();
    for s in scenarios {
        let peak = s.worst(|run| run.peak_rss_kib).unwrap_or(f64::NAN);
        let cpu: f64 = s.rounds.iter().map(|r| r.worker.cpu.worker).sum();
        let runs = s.rounds.len() as f64;
        let cpu = match s.kind {
            Kind::Small => format!("{:.3} ms per message", cpu * 1000.0 / (runs * s.messages as f64)),
            _ => format!(
                "{:.2} s per GiB",
                cpu / (runs * s.bytes as f64 / (1024.0 * MIB as f64))
            ),
        };
        worker.push(format!("{} peak RSS {peak:.1} MiB, CPU {cpu}", s.kind.name()));
    }
    let _ = writeln!(
        out,
        "\nThe worker, over all counted rounds (peak RSS: the worst): {}.",
        worker.join("; ")
    );
    let _ = write!(out, "\nSpan export: ");
    if !params.otlp {
        let _ = writeln!(
            out,
            "**off** (no `telemetry.otlp_endpoint`; `BENCH_OTLP=1` turns it on)."
        );
        return out;
    }
    let mut parts = Vec::new();
    for s in scenarios {
        let spans: Vec<Spans> = s.rounds.iter().filter_map(|r| r.worker.spans).collect();
        let messages = (s.messages * spans.len()).max(1) as f64;
        let received: usize = spans.iter().map(|s| s.received).sum();
        let dropped: u64 = spans.iter().map(|s| s.dropped).sum();
        let tail: f64 = spans.iter().map(|s| s.tail_cpu).sum();
        parts.push(format!(
            "{} {received} spans ({:.2} per message), {dropped} dropped, worker CPU after the last \
             event {:.3} ms per message",
            s.kind.name(),
            received as f64 / messages,
            tail * 1000.0 / messages
        ));
    }
    let _ = writeln!(
        out,
        "**on** (`BENCH_OTLP=1`, to a receiver in the bench process, sample ratio 1.0): {}.",
        parts.join("; ")
    );
    out
}

/// The report's heading: the date and the machine.
pub fn machine() -> String {
    format!(
        "# audio-store throughput benchmark\n\n- date: {}\n- machine: {} CPUs, Linux {}, load average \
         at the start {}\n- the Pub/Sub emulator, fake-gcs-server, the worker and this bench all run \
         on this machine",
        jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        loadavg()
    )
}

pub fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
