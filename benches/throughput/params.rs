//! What a run is given: the parameters and the worker binary.

use crate::MIB;
use anyhow::{Context as _, Result, bail};
use std::path::{Path, PathBuf};

pub struct Params {
    pub concurrency: usize,
    pub small_messages: usize,
    pub large_messages: usize,
    pub large_size: u64,
    pub huge_size: u64,
    pub rounds: usize,
    /// Whether the small scenario runs one uncounted round first (`BENCH_WARMUP=0` skips it).
    pub warmup: bool,
    /// Whether the worker exports its spans to an OTLP/HTTP receiver in this process
    /// (`BENCH_OTLP=1`; off by default, as in production without `telemetry.otlp_endpoint`).
    pub otlp: bool,
}

impl Params {
    pub fn from_env() -> Result<Params> {
        fn number(name: &str, default: u64) -> Result<u64> {
            match std::env::var(name) {
                Ok(value) => value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("{name}={value:?}: expected a positive integer")),
                Err(_) => Ok(default),
            }
        }
        Ok(Params {
            concurrency: number("BENCH_CONCURRENCY", 32)? as usize,
            small_messages: number("BENCH_SMALL_MESSAGES", 500)? as usize,
            large_messages: number("BENCH_LARGE_MESSAGES", 8)? as usize,
            large_size: number("BENCH_LARGE_MIB", 64)? * MIB,
            huge_size: number("BENCH_HUGE_MIB", 1024)? * MIB,
            rounds: number("BENCH_ROUNDS", 5)? as usize,
            warmup: std::env::var("BENCH_WARMUP").map_or(true, |value| value != "0"),
            otlp: match std::env::var("BENCH_OTLP").as_deref() {
                Err(_) | Ok("" | "0") => false,
                Ok("1") => true,
                Ok(other) => bail!("BENCH_OTLP={other:?}: expected 1 (span export on) or 0"),
            },
        })
    }
}

/// The release worker (or `AUDIO_STORE_BIN`), refusing a default one older
/// than a file of `src/`: cargo would have rebuilt it.
pub fn worker_binary() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rebuild = "run scripts/bench, or `cargo build --release --bin audio-store` first";
    if let Some(path) = std::env::var_os("AUDIO_STORE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let binary = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("release/audio-store");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .with_context(|| format!("the release worker {} is missing: {rebuild}", binary.display()))?;
    let mut visit = vec![root.join("src")];
    while let Some(path) = visit.pop() {
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            visit.extend(std::fs::read_dir(&path)?.flatten().map(|entry| entry.path()));
        } else if meta.modified()? > built {
            bail!(
                "the release worker {} is older than {}: {rebuild}",
                binary.display(),
                path.display()
            );
        }
    }
    Ok(binary)
}
