//! What the measurements found, the readings from /proc they rest on (the
//! worker's CPU and memory, the machine's CPU), and the results table.

use crate::{MIB, Params};
use anyhow::{Result, bail};
use std::time::{Duration, Instant};

/// Issue 6's targets.
const TARGET_SMALL: f64 = 0.80;
const TARGET_LARGE: f64 = 0.85;
const TARGET_PEAK_RSS_MIB: f64 = 64.0;
const TARGET_IDLE_RSS_MIB: f64 = 30.0;
/// How long the worker sits ready and idle before its idle RSS is read.
pub const IDLE_SETTLE: Duration = Duration::from_secs(2);

/// CPU seconds so far, from /proc: the worker's (if its pid is given) and the whole machine's.
fn cpu_seconds(worker: Option<u32>) -> [f64; 2] {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    // A field that is not a number reads as 0, so that every field keeps its position.
    let numbers = |text: &str| -> Vec<f64> {
        let fields = text.split_whitespace();
        fields.map(|field| field.parse().unwrap_or(0.0)).collect()
    };
    // After the command name (which may contain spaces), utime and stime are fields 11 and 12.
    let worker = worker.map_or(0.0, |pid| {
        let stat = read(&format!("/proc/{pid}/stat"));
        let fields = numbers(stat.rsplit_once(')').map_or("", |(_, rest)| rest));
        fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)
    });
    // "cpu user nice system idle iowait irq softirq steal …": all but idle and iowait.
    let times = numbers(read("/proc/stat").lines().next().unwrap_or_default());
    let machine: f64 = [1, 2, 3, 6, 7, 8].iter().filter_map(|&i| times.get(i)).sum();
    let ticks = rustix::param::clock_ticks_per_second().max(1) as f64;
    [worker / ticks, machine / ticks]
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM), from a line like "VmHWM:   15432 kB".
pub fn proc_status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(value) = line.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')) {
            return Ok(value.trim_end_matches("kB").trim().parse()?);
        }
    }
    bail!("no {field} in /proc/{pid}/status")
}

/// A measurement under way: when it started, and the CPU seconds by then.
pub struct Clock {
    started: Instant,
    worker: Option<u32>,
    cpu: [f64; 2],
}

impl Clock {
    pub fn start(worker: Option<u32>) -> Clock {
        let (started, cpu) = (Instant::now(), cpu_seconds(worker));
        Clock { started, worker, cpu }
    }

    /// The measurement, timed until `ended`, its CPU counted until now.
    pub fn run(&self, ended: Instant) -> Run {
        let [worker, machine] = cpu_seconds(self.worker);
        let cpu = [worker - self.cpu[0], machine - self.cpu[1]];
        let secs = (ended - self.started).as_secs_f64();
        Run { secs, cpu }
    }
}

/// One measurement: how long it took, and the CPU seconds of the worker and of
/// the whole machine (2 cores give 2 CPU-s per second; the difference is what
/// the services, the bench and anything else on the machine took).
pub struct Run {
    pub secs: f64,
    pub cpu: [f64; 2],
}

/// What was read of the worker beside its run.
#[derive(Default)]
pub struct Readings {
    /// VmRSS after [`IDLE_SETTLE`] ready and idle, before any message (not with a backlog).
    pub idle_rss_kib: Option<u64>,
    /// VmHWM at the end.
    pub peak_rss_kib: u64,
    /// With `BENCH_OTLP=1`: the spans received, and `audio_store_spans_dropped_total`.
    pub spans: Option<(u64, u64)>,
}

/// One round: the ceilings and the worker on the same files, back to back.
pub struct Round {
    pub gcs: Run,
    pub pubsub: Option<Run>,
    pub worker: Run,
    pub readings: Readings,
}

impl Round {
    /// Worker throughput / the lower ceiling's (the same work, so the inverse ratio of times).
    fn ratio(&self) -> f64 {
        let pubsub = self.pubsub.as_ref().map_or(0.0, |run| run.secs);
        self.gcs.secs.max(pubsub) / self.worker.secs
    }
}

/// A scenario (see `Bench::rounds`) and what its counted rounds found.
pub struct Scenario {
    pub name: &'static str,
    pub messages: usize,
    pub audio_size: u64,
    /// Small messages have a thumbnail each, a backlog, a Pub/Sub ceiling and a
    /// rate in messages/s; files a rate in MiB/s.
    pub small: bool,
    pub rounds: Vec<Round>,
}

impl Scenario {
    pub fn new(name: &'static str, messages: usize, audio_size: u64, small: bool) -> Scenario {
        Scenario {
            name,
            messages,
            audio_size,
            small,
            rounds: Vec::new(),
        }
    }

    pub fn title(&self) -> String {
        let (name, messages, mib) = (self.name, self.messages, self.audio_size / MIB);
        match self.small {
            true => format!("{name}: {messages} × (64 KiB WAV + 8 KiB PNG)"),
            false => format!("{name}: {messages} × {mib} MiB"),
        }
    }

    fn unit(&self) -> &'static str {
        if self.small { "msg/s" } else { "MiB/s" }
    }

    fn rate(&self, run: &Run) -> f64 {
        let amount = match self.small {
            true => self.messages as u64,
            false => self.messages as u64 * self.audio_size / MIB,
        };
        amount as f64 / run.secs
    }

    /// Prints the line of a measurement as it ends (with the worker's readings).
    pub fn print(&self, what: &str, run: &Run, readings: Option<&Readings>) {
        let [worker, machine] = run.cpu;
        let mut line = format!(
            "{:<24} {:>7.2} s {:>7.1} {}  CPU-s: worker {worker:.2}, machine {machine:.2}",
            format!("{} {what}", self.name),
            run.secs,
            self.rate(run),
            self.unit(),
        );
        if let Some(readings) = readings {
            if let Some(idle) = readings.idle_rss_kib {
                line += &format!("  idle RSS {:.1} MiB", mib(idle));
            }
            line += &format!("  peak RSS {:.1} MiB", mib(readings.peak_rss_kib));
            if let Some((received, dropped)) = readings.spans {
                line += &format!("  {received} spans received, {dropped} dropped");
            }
        }
        println!("{line}");
    }

    /// The median over the counted rounds.
    fn median(&self, value: impl Fn(&Round) -> f64) -> f64 {
        let mut values: Vec<f64> = self.rounds.iter().map(value).collect();
        values.sort_by(f64::total_cmp);
        let n = values.len();
        (values[(n - 1) / 2] + values[n / 2]) / 2.0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A row of the results table: its cells (`|` between them), and whether it meets its target.
fn row(out: &mut String, cells: String, met: bool) {
    let verdict = if met { "**met**" } else { "**not met**" };
    *out += &format!("| {cells} | {verdict} |\n");
}

/// A row for the worst reading of the worker's memory, and its limit in MiB.
fn memory_row(out: &mut String, what: &str, kib: Option<u64>, limit: f64) {
    let Some(size) = kib.map(mib) else { return };
    let cells = format!("worker {what}, worst round | {size:.1} MiB | | | < {limit} MiB");
    row(out, cells, size < limit);
}

/// The results table, and what span export sent.
pub fn results(params: &Params, scenarios: &[Scenario]) -> String {
    let mut out = format!(
        "Concurrency {}; medians over {} rounds, of the rates and of the ratios worker / the lower \
         ceiling; memory: the worst round.\n\n| measurement | worker | ceiling | worker / ceiling | \
         target | |\n|---|---:|---:|---:|---|---|\n",
        params.concurrency, params.rounds
    );
    for s in scenarios {
        let worker = s.median(|round| s.rate(&round.worker));
        let mut ceiling = format!("{:.1}", s.median(|round| s.rate(&round.gcs)));
        if s.small {
            let pubsub = s.median(|round| round.pubsub.as_ref().map_or(f64::NAN, |run| s.rate(run)));
            ceiling = format!("GCS {ceiling}; Pub/Sub {pubsub:.1}");
        }
        let (title, unit, ratio) = (s.title(), s.unit(), s.median(Round::ratio));
        let target = if s.small { TARGET_SMALL } else { TARGET_LARGE };
        let cells = format!("{title} | {worker:.1} {unit} | {ceiling} | {ratio:.2} | ≥ {target:.2}");
        row(&mut out, cells, ratio >= target);
    }
    let rounds = scenarios.iter().flat_map(|s| &s.rounds);
    let peak = rounds.clone().map(|round| round.readings.peak_rss_kib).max();
    let idle = rounds.filter_map(|round| round.readings.idle_rss_kib).max();
    memory_row(&mut out, "peak RSS (VmHWM)", peak, TARGET_PEAK_RSS_MIB);
    let idle_rss = format!("idle RSS (VmRSS {} s after ready)", IDLE_SETTLE.as_secs());
    memory_row(&mut out, &idle_rss, idle, TARGET_IDLE_RSS_MIB);
    if !params.otlp {
        return out + "\nSpan export: off (`BENCH_OTLP=1` turns it on).";
    }
    let mut parts = Vec::new();
    for s in scenarios {
        let spans = s.rounds.iter().filter_map(|round| round.readings.spans);
        let (received, dropped) = spans.fold((0, 0), |sum, spans| (sum.0 + spans.0, sum.1 + spans.1));
        let per_message = received as f64 / (s.messages * s.rounds.len()) as f64;
        let name = s.name;
        let part = format!("{name} {received} ({per_message:.2} per message), {dropped} dropped");
        parts.push(part);
    }
    let spans = parts.join("; ");
    out + &format!("\nSpan export (`BENCH_OTLP=1`): on, sample ratio 1.0; spans received: {spans}.")
}
