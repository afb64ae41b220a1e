//! Throughput and memory benchmark of the `audio-store` worker (issue 6, "Fast and small").
//!
//! Run it with `scripts/bench`, which builds the release worker and then runs
//! `cargo bench --bench throughput`. It is not part of the test suite (run
//! without `--bench`, as `cargo test --all-targets` does, it does nothing).
//!
//! Everything runs on this machine, started by the test kit (`testkit/`):
//! one Pub/Sub emulator for the whole run, a fresh fake-gcs-server (memory
//! backend) for every measurement, and the worker as a process
//! (`target/release/audio-store run`). Three scenarios, each run for several
//! rounds (a round runs the ceilings and then the worker on the same files,
//! back to back):
//!
//! - **small**: N messages of a 64 KiB WAV plus an 8 KiB PNG, all published
//!   before the worker starts; messages/s from the worker's spawn to the last
//!   "audio stored" event.
//! - **large**: 8 messages of a 64 MiB WAV, published to an idle worker;
//!   MiB/s from the first publish to the last event.
//! - **huge**: one 1 GiB WAV, as above, plus the worker's peak RSS (VmHWM) and
//!   its idle RSS (VmRSS 2 s after it became ready, before any message).
//!
//! The ceilings use the same files, concurrency and settings without the
//! worker, through the product's own clients, built from the same
//! configuration as the worker's (so they cannot drift from it): a tight
//! uploader straight to a fresh fake-gcs (`audio_store::store::Store`, no
//! Pub/Sub), and a Pub/Sub relay with no upload (`audio_store::pubsub`'s
//! `Inbox` and `Outbox`: pull the same input messages, publish an event of
//! the same size and wait for its confirmation, ack). Events are received the
//! same way for the relay and the worker: a streaming pull of the stored
//! subscription. The CPU time of every process (worker, fake-gcs, Pub/Sub
//! emulator, this bench, everything else) is read from /proc around each
//! measurement.
//!
//! Arguments (after `--`): `small`, `large`, `huge` pick scenarios (default:
//! all). Environment: `BENCH_CONCURRENCY` (32), `BENCH_SMALL_MESSAGES` (500),
//! `BENCH_LARGE_MESSAGES` (8), `BENCH_LARGE_MIB` (64), `BENCH_HUGE_MIB`
//! (1024), `BENCH_ROUNDS` (5; medians are reported), `BENCH_WARMUP` (1; 0
//! skips the uncounted first round of the small scenario), `BENCH_OTLP` (0; 1
//! runs the worker with span export to an OTLP/HTTP receiver in this process,
//! see `spans.rs`), `AUDIO_STORE_BIN` (the worker binary; default
//! `target/release/audio-store`, which must not be older than `src/`).

mod params;
mod report;
mod scenarios;
mod spans;
mod system;
mod traffic;

use anyhow::{Context as _, Result, ensure};
use params::{Params, worker_binary};
use report::Report;
use std::time::{Duration, Instant};
use system::{Machine, loadavg};
use testkit::PubsubEmulator;

use scenarios::Bench;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// Sizes of the small scenario's files.
const SMALL_AUDIO: usize = 64 * 1024;
const SMALL_THUMBNAIL: usize = 8 * 1024;
/// How long the worker sits idle before its idle RSS is read.
pub const IDLE_SETTLE: Duration = Duration::from_secs(2);

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, and the suite must not run a 10-minute benchmark.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("throughput: a benchmark, not a test; run it with scripts/bench (skipped)");
        return Ok(());
    }
    let params = Params::from_env()?;
    let selected: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    for name in &selected {
        ensure!(
            ["small", "large", "huge"].contains(&name.as_str()),
            "unknown scenario {name:?}: expected small, large or huge"
        );
    }
    let wanted = |name: &str| selected.is_empty() || selected.iter().any(|s| s == name);
    let binary = worker_binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(async {
        let started = Instant::now();
        println!("{}", Machine::describe().markdown());
        println!("worker binary: {}", binary.display());
        println!("services' logs: {}", testkit::process::log_dir().display());
        let pubsub = tokio::task::spawn_blocking(PubsubEmulator::start).await??;
        let bench = Bench {
            params,
            binary,
            pubsub_endpoint: pubsub.endpoint(),
        };
        let mut report = Report::default();
        if wanted("small") {
            bench.small(&mut report).await.context("small messages")?;
        }
        if wanted("large") {
            bench.large(&mut report).await.context("large files")?;
        }
        if wanted("huge") {
            bench.huge(&mut report).await.context("1 GiB file")?;
        }
        println!();
        println!(
            "## Results ({:.0} s, load average at the end: {})",
            started.elapsed().as_secs_f64(),
            loadavg()
        );
        println!();
        println!("{}", report.results_table(&bench.params));
        println!("{}", report.rounds_table());
        println!("{}", report.cpu_table());
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------
