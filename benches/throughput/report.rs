//! Results: runs, rounds, scenarios and the markdown tables.

use crate::params::Params;
use crate::spans::{self, Spans};
use crate::system::Cpu;
use crate::{IDLE_SETTLE, KIB, MIB};
use std::fmt::Write as _;
use std::time::Duration;

/// Issue 6's targets.
const TARGET_SMALL: f64 = 0.80;
const TARGET_LARGE: f64 = 0.85;
const TARGET_PEAK_RSS_MIB: f64 = 64.0;
const TARGET_IDLE_RSS_MIB: f64 = 30.0;

/// One measurement: how long it took, the CPU it cost and, for the worker, its readings.
#[derive(Clone, Default)]
pub struct Run {
    pub label: String,
    pub elapsed: Duration,
    pub cpu: Cpu,
    pub ready: Option<Duration>,
    pub idle_rss_kib: Option<u64>,
    pub peak_rss_kib: Option<u64>,
    /// CPU while the worker sat idle for [`IDLE_SETTLE`] before the messages.
    pub idle_cpu: Option<Cpu>,
    pub warnings: usize,
    /// With `BENCH_OTLP=1`, what the worker exported.
    pub spans: Option<Spans>,
}

impl Run {
    pub fn new(label: &str, elapsed: Duration, cpu: Cpu) -> Run {
        Run {
            label: label.to_string(),
            elapsed,
            cpu,
            ..Run::default()
        }
    }

    pub fn secs(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }

    pub fn line(&self, messages: usize, bytes: u64) -> String {
        let mut line = format!(
            "{:<24} {:>8.2} s  {:>8.1} msg/s  {:>8.1} MiB/s",
            self.label,
            self.secs(),
            messages as f64 / self.secs(),
            bytes as f64 / MIB as f64 / self.secs()
        );
        if let Some(ready) = self.ready {
            let _ = write!(line, "  ready after {:.0} ms", ready.as_secs_f64() * 1000.0);
        }
        if let Some(idle) = self.idle_rss_kib {
            let _ = write!(line, "  idle RSS {:.1} MiB", idle as f64 / KIB as f64);
        }
        if let Some(peak) = self.peak_rss_kib {
            let _ = write!(line, "  peak RSS {:.1} MiB", peak as f64 / KIB as f64);
        }
        if self.warnings > 0 {
            let _ = write!(line, "  {} log line(s) at warn or above", self.warnings);
        }
        if let Some(spans) = self.spans {
            let _ = write!(
                line,
                "  {} spans received, {} dropped, worker CPU after the last event {:.3} s",
                spans.received, spans.dropped, spans.tail_cpu
            );
        }
        line
    }
}

/// The median (the mean of the middle two of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

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

/// One round: the ceilings and the worker on the same files, back to back.
#[derive(Default)]
pub struct Round {
    pub gcs: Run,
    /// Diagnostic (small): the uploads each preceded by a lookup.
    pub gcs_lookup: Option<Run>,
    pub pubsub: Option<Run>,
    /// Diagnostic (small): the Pub/Sub relay with each message held as long as its uploads took.
    pub pubsub_paced: Option<Run>,
    pub worker: Run,
}

impl Round {
    /// Seconds of this round's ceiling: the slower of the GCS and the Pub/Sub ceiling.
    pub fn ceiling_secs(&self) -> f64 {
        let pubsub = self.pubsub.as_ref().map(Run::secs).unwrap_or(0.0);
        self.gcs.secs().max(pubsub)
    }

    /// Worker throughput / ceiling throughput (the same work, so the inverse ratio of times).
    pub fn ratio(&self) -> f64 {
        self.ceiling_secs() / self.worker.secs()
    }

    pub fn runs(&self) -> impl Iterator<Item = &Run> {
        [
            Some(&self.gcs),
            self.gcs_lookup.as_ref(),
            self.pubsub.as_ref(),
            self.pubsub_paced.as_ref(),
            Some(&self.worker),
        ]
        .into_iter()
        .flatten()
    }
}

pub struct Scenario {
    pub kind: Kind,
    pub title: String,
    pub messages: usize,
    pub bytes: u64,
    pub rounds: Vec<Round>,
}

impl Scenario {
    pub fn new(kind: Kind, title: String, messages: usize, bytes: u64) -> Scenario {
        Scenario {
            kind,
            title,
            messages,
            bytes,
            rounds: Vec::new(),
        }
    }

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

    pub fn target(&self) -> f64 {
        match self.kind {
            Kind::Small => TARGET_SMALL,
            Kind::Large | Kind::Huge => TARGET_LARGE,
        }
    }

    /// The median over rounds of a run's rate.
    pub fn median_rate(&self, run: impl Fn(&Round) -> Option<&Run>) -> f64 {
        median(
            self.rounds
                .iter()
                .filter_map(|round| run(round).map(|r| self.rate(r.secs())))
                .collect(),
        )
    }

    pub fn ratio(&self) -> f64 {
        median(self.rounds.iter().map(Round::ratio).collect())
    }

    /// The worst round's value of a worker memory reading.
    pub fn worst(&self, reading: impl Fn(&Run) -> Option<u64>) -> Option<f64> {
        self.rounds
            .iter()
            .filter_map(|round| reading(&round.worker))
            .max()
            .map(|kib| kib as f64 / KIB as f64)
    }
}

#[derive(Default)]
pub struct Report {
    pub scenarios: Vec<Scenario>,
}

pub fn verdict(met: bool) -> &'static str {
    if met { "**met**" } else { "**not met**" }
}

impl Report {
    pub fn results_table(&self, params: &Params) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Concurrency {} (worker.concurrency, and the ceilings' messages in flight). Rates are \
             medians over {} rounds; worker / ceiling is the median of the rounds' ratios (each \
             round runs its ceilings and the worker back to back on the same files).\n",
            params.concurrency, params.rounds
        );
        let _ = writeln!(out, "{}\n", spans::summary(params.otlp, &self.scenarios));
        let _ = writeln!(
            out,
            "| measurement | worker | ceiling | worker / ceiling | target | |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---|---|");
        for scenario in &self.scenarios {
            let worker = scenario.median_rate(|r| Some(&r.worker));
            let gcs = scenario.median_rate(|r| Some(&r.gcs));
            let ratio = scenario.ratio();
            let target = scenario.target();
            let (what, ceiling) = match scenario.kind {
                Kind::Small => {
                    let pubsub = scenario.median_rate(|r| r.pubsub.as_ref());
                    (
                        "messages/s, worker timed from its spawn (backlog published before) to the last event",
                        format!("GCS {gcs:.1} ({:.1} objects/s); Pub/Sub {pubsub:.1}", gcs * 2.0),
                    )
                }
                Kind::Large | Kind::Huge => (
                    "MiB/s, worker timed from the first publish (worker idle) to the last event",
                    format!("{gcs:.1}"),
                ),
            };
            let target_text = match scenario.kind {
                Kind::Small => format!("≥ {target:.2} of the lower ceiling"),
                Kind::Large => format!("≥ {target:.2}"),
                Kind::Huge => format!("(≥ {target:.2}, as large)"),
            };
            let _ = writeln!(
                out,
                "| {}, {what} | {worker:.1} | {ceiling} | {ratio:.2} | {target_text} | {} |",
                scenario.title,
                verdict(ratio >= target)
            );
        }
        let huge = self.scenarios.iter().find(|s| s.kind == Kind::Huge);
        if let Some(huge) = huge
            && let Some(peak) = huge.worst(|run| run.peak_rss_kib)
        {
            let _ = writeln!(
                out,
                "| worker peak RSS (VmHWM) with the {} MiB file, worst round | {peak:.1} MiB | | | < {TARGET_PEAK_RSS_MIB:.0} MiB | {} |",
                huge.bytes / MIB,
                verdict(peak < TARGET_PEAK_RSS_MIB)
            );
        }
        let idle = self
            .scenarios
            .iter()
            .filter_map(|s| s.worst(|run| run.idle_rss_kib))
            .reduce(f64::max);
        if let Some(idle) = idle {
            let _ = writeln!(
                out,
                "| worker idle RSS (VmRSS {} s after ready), worst round | {idle:.1} MiB | | | < {TARGET_IDLE_RSS_MIB:.0} MiB | {} |",
                IDLE_SETTLE.as_secs(),
                verdict(idle < TARGET_IDLE_RSS_MIB)
            );
        }
        let peaks: Vec<String> = self
            .scenarios
            .iter()
            .filter(|s| s.kind != Kind::Huge)
            .filter_map(|s| {
                s.worst(|run| run.peak_rss_kib)
                    .map(|peak| format!("{} {peak:.1} MiB", s.kind.name()))
            })
            .collect();
        if !peaks.is_empty() {
            let _ = writeln!(
                out,
                "\nWorker peak RSS in the other scenarios (worst round): {}.",
                peaks.join(", ")
            );
        }
        let worker_cpu: Vec<String> = self
            .scenarios
            .iter()
            .filter(|s| !s.rounds.is_empty())
            .map(|s| {
                let cpu: f64 = s.rounds.iter().map(|r| r.worker.cpu.worker).sum();
                let runs = s.rounds.len() as f64;
                match s.kind {
                    Kind::Small => format!(
                        "small {:.3} ms per message",
                        cpu * 1000.0 / (runs * s.messages as f64)
                    ),
                    Kind::Large | Kind::Huge => format!(
                        "{} {:.2} s per GiB",
                        s.kind.name(),
                        cpu / (runs * s.bytes as f64 / (1024.0 * MIB as f64))
                    ),
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "\nWorker CPU in the timed window, over all counted rounds: {}.",
            worker_cpu.join(", ")
        );
        if let Some(small) = self.scenarios.iter().find(|s| s.kind == Kind::Small) {
            let lookup = small.median_rate(|r| r.gcs_lookup.as_ref());
            let gcs = small.median_rate(|r| Some(&r.gcs));
            let paced = small.median_rate(|r| r.pubsub_paced.as_ref());
            let cpu = |run: fn(&Round) -> Option<&Run>| {
                median(
                    small
                        .rounds
                        .iter()
                        .filter_map(|r| run(r).map(|r| r.cpu.pubsub))
                        .collect(),
                )
            };
            let _ = writeln!(
                out,
                "\nDiagnostics, small (medians): the GCS uploads each preceded by a lookup (metadata \
                 GET, 404; the worker makes one before uploads of 8 MiB or more): {lookup:.1} msg/s, \
                 {:.2} of the upload-only ceiling. The Pub/Sub relay with each message held as long \
                 as its uploads took: {paced:.1} msg/s, the emulator using {:.2} CPU-s (unpaced: {:.2}).",
                lookup / gcs,
                cpu(|r| r.pubsub_paced.as_ref()),
                cpu(|r| r.pubsub.as_ref()),
            );
        }
        out
    }

    /// Every round: the worker, the ceilings, the ratio and the CPU that others used.
    pub fn rounds_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Every round (\"others\": CPU-s used by processes outside the benchmark during the \
             worker's run, e.g. concurrent builds):\n"
        );
        let _ = writeln!(
            out,
            "| scenario | round | worker | GCS ceiling | Pub/Sub ceiling | worker / ceiling | others |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
        for scenario in &self.scenarios {
            let unit = scenario.unit();
            for (i, round) in scenario.rounds.iter().enumerate() {
                let pubsub = round
                    .pubsub
                    .as_ref()
                    .map(|r| format!("{:.1} {unit}", scenario.rate(r.secs())))
                    .unwrap_or_else(|| "–".into());
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.1} {unit} | {:.1} {unit} | {pubsub} | {:.2} | {:.2} |",
                    scenario.kind.name(),
                    i + 1,
                    scenario.rate(round.worker.secs()),
                    scenario.rate(round.gcs.secs()),
                    round.ratio(),
                    round.worker.cpu.other()
                );
            }
        }
        out
    }

    /// CPU per process, summed over the rounds of each measurement.
    pub fn cpu_table(&self) -> String {
        let mut totals: Vec<(String, f64, Cpu)> = Vec::new();
        let mut add =
            |label: String, secs: f64, cpu: &Cpu| match totals.iter_mut().find(|(l, _, _)| *l == label) {
                Some((_, total_secs, total)) => {
                    *total_secs += secs;
                    total.add(cpu);
                }
                None => totals.push((label, secs, *cpu)),
            };
        for scenario in &self.scenarios {
            for round in &scenario.rounds {
                for run in round.runs() {
                    if let Some(idle) = &run.idle_cpu {
                        let label = format!(
                            "{} (idle {} s, before the messages)",
                            run.label,
                            IDLE_SETTLE.as_secs()
                        );
                        add(label, IDLE_SETTLE.as_secs_f64(), idle);
                    }
                    add(run.label.clone(), run.secs(), &run.cpu);
                }
            }
        }
        let mut out = String::new();
        let _ = writeln!(
            out,
            "CPU seconds per process, summed over the rounds (2 cores = 2 CPU-s per wall second; \
             \"others\" is the rest of the machine):\n"
        );
        let _ = writeln!(
            out,
            "| measurement | wall s | worker | fake-gcs | Pub/Sub emulator | bench process | others | machine busy |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
        for (label, secs, cpu) in totals {
            let busy = if cpu.machine_total > 0.0 {
                cpu.machine_busy / cpu.machine_total * 100.0
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "| {label} | {secs:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {busy:.0} % |",
                cpu.worker,
                cpu.gcs,
                cpu.pubsub,
                cpu.bench,
                cpu.other()
            );
        }
        out
    }
}
