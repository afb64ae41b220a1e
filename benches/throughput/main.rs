//! Throughput and memory benchmark of the `audio-store` worker (issue 6, "Fast and small").
//!
//! Run it with `scripts/bench`, which builds the release worker and then runs `cargo bench
//! --bench throughput`; docs/benchmarks.md says what it measures and has the results. It is
//! not part of the test suite: run without `--bench`, as `cargo test --all-targets` does, it
//! does nothing.
//!
//! Everything runs on this machine, started by the test kit: one Pub/Sub emulator for the
//! whole run, a fresh fake-gcs-server (memory backend) for every measurement, and the worker
//! as a process. The scenarios are `small`, `large` and `huge` (`Bench::rounds`); arguments
//! (after `--`) pick some, by default all. The environment (`BENCH_*`, `AUDIO_STORE_BIN`) is
//! read in [`Params::from_env`], each variable with its default and its range.

mod report;
mod scenarios;
mod traffic;

use anyhow::{Context as _, Result, bail, ensure};
use report::Scenario;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const MIB: u64 = 1024 * 1024;

/// What a run is given.
pub struct Params {
    /// `worker.concurrency`, and the ceilings' messages in flight.
    pub concurrency: usize,
    pub small_messages: usize,
    pub large_messages: usize,
    pub large_size: u64,
    pub huge_size: u64,
    /// Counted rounds per scenario; the report gives medians.
    pub rounds: usize,
    /// Whether the small scenario starts with an uncounted round.
    pub warmup: bool,
    /// Whether the worker exports its spans (to an OTLP/HTTP receiver in this process).
    pub otlp: bool,
    /// The worker, `target/release/audio-store` by default (which `scripts/bench` builds).
    pub binary: PathBuf,
}

impl Params {
    fn from_env() -> Result<Params> {
        /// The variable `name` as a whole number in `range`, `default` when it is unset.
        fn knob(name: &str, default: u64, range: impl RangeBounds<u64> + Debug) -> Result<u64> {
            let Ok(value) = std::env::var(name) else {
                return Ok(default);
            };
            let number = value.parse().ok().filter(|n| range.contains(n));
            number.with_context(|| format!("{name}={value:?}: expected a whole number in {range:?}"))
        }
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from);
        let target = target.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
        let binary = std::env::var_os("AUDIO_STORE_BIN").map(PathBuf::from);
        let binary = binary.unwrap_or_else(|| target.join("release/audio-store"));
        ensure!(binary.exists(), "{binary:?} is missing: run scripts/bench");
        Ok(Params {
            concurrency: knob("BENCH_CONCURRENCY", 32, 1..)? as usize,
            small_messages: knob("BENCH_SMALL_MESSAGES", 500, 1..)? as usize,
            large_messages: knob("BENCH_LARGE_MESSAGES", 8, 1..)? as usize,
            large_size: knob("BENCH_LARGE_MIB", 64, 1..)? * MIB,
            huge_size: knob("BENCH_HUGE_MIB", 1024, 1..)? * MIB,
            rounds: knob("BENCH_ROUNDS", 5, 1..)? as usize,
            warmup: knob("BENCH_WARMUP", 1, 0..=1)? == 1,
            otlp: knob("BENCH_OTLP", 0, 0..=1)? == 1,
            binary,
        })
    }
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, and the suite must not run a 10-minute benchmark.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("throughput: a benchmark, not a test; run it with scripts/bench (skipped)");
        return Ok(());
    }
    let params = Params::from_env()?;
    let mut scenarios = vec![
        Scenario::new("small", params.small_messages, 64 * 1024, true),
        Scenario::new("large", params.large_messages, params.large_size, false),
        Scenario::new("huge", 1, params.huge_size, false),
    ];
    let mut picked: Vec<String> = std::env::args().skip(1).collect();
    picked.retain(|arg| !arg.starts_with('-'));
    let known = |name: &str| scenarios.iter().any(|s| s.name == name);
    if let Some(name) = picked.iter().find(|name| !known(name)) {
        bail!("unknown scenario {name:?}: expected small, large or huge");
    }
    scenarios.retain(|s| picked.is_empty() || picked.iter().any(|name| name == s.name));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let started = Instant::now();
        let now = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC");
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (binary, logs) = (params.binary.display(), testkit::process::log_dir().display());
        println!("# audio-store throughput benchmark\n\n{now}, {cpus} CPUs; worker {binary}; logs in {logs}");
        let pubsub = tokio::task::spawn_blocking(testkit::PubsubEmulator::start_for_throughput).await??;
        let bench = scenarios::Bench { params, pubsub };
        for scenario in &mut scenarios {
            let rounds = bench.rounds(scenario).await;
            rounds.with_context(|| format!("the {} scenario", scenario.name))?;
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!("\n## Results ({elapsed:.0} s)\n");
        println!("{}", report::results(&bench.params, &scenarios));
        Ok(())
    })
}
