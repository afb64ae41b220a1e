//! Throughput and memory benchmark of the `audio-store` worker (issue 6, "Fast and small").
//!
//! Run it with `scripts/bench`, which builds the release worker and then runs
//! `cargo bench --bench throughput`. It is not part of the test suite (run
//! without `--bench`, as `cargo test --all-targets` does, it does nothing).
//!
//! Everything runs on this machine, started by the test kit: one Pub/Sub
//! emulator for the whole run, a fresh fake-gcs-server (memory backend) for
//! every measurement, and the worker as a process. Three scenarios, each run
//! for several rounds (a round runs the ceilings and then the worker on the
//! same files, back to back):
//!
//! - **small**: N messages of a 64 KiB WAV plus an 8 KiB PNG, all published
//!   before the worker starts; messages/s from the worker's spawn to the last
//!   "audio stored" event.
//! - **large**: 8 messages of a 64 MiB WAV, published to an idle worker;
//!   MiB/s from the first publish to the last event.
//! - **huge**: one 1 GiB WAV, as above, plus the worker's peak RSS (VmHWM) and
//!   its idle RSS (VmRSS 2 s after it became ready, before any message).
//!
//! The ceilings do the same work without the worker, through the product's
//! own clients built from the worker's configuration (`scenarios.rs`). Every
//! measurement prints a line as it ends, with the CPU time of the worker,
//! fake-gcs, the emulator and the rest of the machine, read from /proc
//! (`report.rs`); the results table comes at the end.
//!
//! Arguments (after `--`): `small`, `large`, `huge` pick scenarios (default:
//! all). Environment: `BENCH_CONCURRENCY` (32), `BENCH_SMALL_MESSAGES` (500),
//! `BENCH_LARGE_MESSAGES` (8), `BENCH_LARGE_MIB` (64), `BENCH_HUGE_MIB`
//! (1024), `BENCH_ROUNDS` (5; medians are reported), `BENCH_WARMUP` (1; 0
//! skips the uncounted first round of the small scenario), `BENCH_OTLP` (0; 1
//! runs the worker with span export to an OTLP/HTTP receiver in this
//! process), `AUDIO_STORE_BIN` (default `target/release/audio-store`, which
//! `scripts/bench` builds first).

mod report;
mod scenarios;
mod traffic;

use anyhow::{Context as _, Result, bail, ensure};
use report::Kind;
use scenarios::Bench;
use std::path::{Path, PathBuf};
use std::time::Instant;
use testkit::PubsubEmulator;

pub const MIB: u64 = 1024 * 1024;

/// What a run is given (see the module's documentation).
pub struct Params {
    pub concurrency: usize,
    pub small_messages: usize,
    pub large_messages: usize,
    pub large_size: u64,
    pub huge_size: u64,
    pub rounds: usize,
    pub warmup: bool,
    pub otlp: bool,
}

impl Params {
    fn from_env() -> Result<Params> {
        fn number(name: &str, default: u64) -> Result<u64> {
            let Ok(value) = std::env::var(name) else {
                return Ok(default);
            };
            let number = value.parse::<u64>().ok().filter(|n| *n > 0);
            number.with_context(|| format!("{name}={value:?}: expected a positive integer"))
        }
        fn switch(name: &str, default: bool) -> Result<bool> {
            match std::env::var(name).as_deref() {
                Err(_) | Ok("") => Ok(default),
                Ok("0") => Ok(false),
                Ok("1") => Ok(true),
                Ok(other) => bail!("{name}={other:?}: expected 0 or 1"),
            }
        }
        Ok(Params {
            concurrency: number("BENCH_CONCURRENCY", 32)? as usize,
            small_messages: number("BENCH_SMALL_MESSAGES", 500)? as usize,
            large_messages: number("BENCH_LARGE_MESSAGES", 8)? as usize,
            large_size: number("BENCH_LARGE_MIB", 64)? * MIB,
            huge_size: number("BENCH_HUGE_MIB", 1024)? * MIB,
            rounds: number("BENCH_ROUNDS", 5)? as usize,
            warmup: switch("BENCH_WARMUP", true)?,
            otlp: switch("BENCH_OTLP", false)?,
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
    let mut kinds = Vec::new();
    for name in std::env::args().skip(1).filter(|arg| !arg.starts_with('-')) {
        let kind = [Kind::Small, Kind::Large, Kind::Huge]
            .into_iter()
            .find(|kind| kind.name() == name);
        kinds
            .push(kind.with_context(|| format!("unknown scenario {name:?}: expected small, large or huge"))?);
    }
    if kinds.is_empty() {
        kinds = vec![Kind::Small, Kind::Large, Kind::Huge];
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("target"),
        PathBuf::from,
    );
    let binary =
        std::env::var_os("AUDIO_STORE_BIN").map_or_else(|| target.join("release/audio-store"), PathBuf::from);
    ensure!(
        binary.exists(),
        "{} is missing: run scripts/bench",
        binary.display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let started = Instant::now();
        println!("{}", report::machine());
        println!("worker binary: {}", binary.display());
        println!("services' logs: {}", testkit::process::log_dir().display());
        let pubsub = tokio::task::spawn_blocking(PubsubEmulator::start_for_throughput).await??;
        let bench = Bench {
            params,
            binary,
            pubsub,
        };
        let mut scenarios = Vec::new();
        for kind in kinds {
            let scenario = bench.scenario(kind).await;
            scenarios.push(scenario.with_context(|| format!("the {} scenario", kind.name()))?);
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "\n## Results ({elapsed:.0} s, load average at the end: {})\n",
            report::loadavg()
        );
        println!("{}", report::results(&bench.params, &scenarios));
        Ok(())
    })
}
