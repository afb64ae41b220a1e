//! Service processes that cannot outlive their owner, and where their logs go.
//!
//! Shared services live in statics, which Rust never drops. Every service
//! therefore runs in its own process group next to a small `sh` watchdog (in
//! a process group of its own as well) that kills the group once the owning
//! process is gone, whether it exited, panicked or was killed. Output goes to
//! [`log_dir`]; log directories of processes that no longer run are removed
//! when the next one starts.
//!
//! Nothing here is bound to a tokio runtime (each `#[tokio::test]` has its
//! own): processes are spawned with `std::process` and readiness is probed
//! from a thread of its own ([`probe_get`]).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long a service may take to answer its readiness probe.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Prefix of the per-process log directories under the temp dir.
const LOG_DIR_PREFIX: &str = "audio-store-it-";

static LOG_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The log directory of this process: `$TMPDIR/audio-store-it-<pid>/` unless
/// [`use_log_dir`] chose another first.
///
/// Created on first use; log directories of processes that no longer run are
/// removed at that moment.
pub fn log_dir() -> &'static Path {
    LOG_DIR.get_or_init(|| {
        remove_stale_log_dirs();
        let dir = std::env::temp_dir().join(format!("{LOG_DIR_PREFIX}{}", std::process::id()));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create the log dir {}: {e}", dir.display()));
        dir
    })
}

/// Makes `dir` (which must exist) the [`log_dir`]; fails once a log was written elsewhere.
pub fn use_log_dir(dir: &Path) -> Result<()> {
    LOG_DIR
        .set(dir.to_path_buf())
        .map_err(|used| anyhow!("the log dir is already {}", used.display()))
}

fn remove_stale_log_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name.to_str().and_then(|n| n.strip_prefix(LOG_DIR_PREFIX));
        if let Some(pid) = pid.and_then(|pid| pid.parse::<u32>().ok())
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            // Best effort: another process may be removing it at the same time.
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Fails with the one line that tells what to do when a tool is missing.
pub(crate) fn require_executable(path: &Path, what: &str) -> Result<()> {
    let executable = fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if !executable {
        bail!(
            "{what} is missing at {}: run scripts/install-tools",
            path.display()
        );
    }
    Ok(())
}

/// A service process in its own process group plus the watchdog that kills
/// that group once this process is gone.
pub(crate) struct Supervised {
    what: String,
    child: Child,
    watchdog: Child,
    log: PathBuf,
    /// Where this start's output begins in the log (which is appended to).
    log_start: u64,
}

/// Why a service did not become ready.
pub(crate) struct StartFailure {
    pub(crate) error: anyhow::Error,
    /// Whether starting it again elsewhere (another port or address) may work.
    pub(crate) retryable: bool,
}

impl From<anyhow::Error> for StartFailure {
    /// A failure that another attempt would not mend.
    fn from(error: anyhow::Error) -> StartFailure {
        StartFailure {
            error,
            retryable: false,
        }
    }
}

/// Calls `start` up to `attempts` times, again only after a retryable failure.
pub(crate) fn with_retries<T>(
    attempts: usize,
    mut start: impl FnMut() -> Result<T, StartFailure>,
) -> Result<T> {
    let mut last = anyhow!("no attempt to start");
    for _attempt in 0..attempts {
        match start() {
            Ok(started) => return Ok(started),
            Err(failure) if failure.retryable => last = failure.error,
            Err(failure) => return Err(failure.error),
        }
    }
    Err(last)
}

impl Supervised {
    /// Starts `program` with `envs` added to the environment and its output appended to `log`.
    pub(crate) fn spawn(
        what: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Supervised> {
        let mut log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening the log file {}", log.display()))?;
        writeln!(log_file, "--- starting {} {}", program.display(), args.join(" "))?;
        let log_start = log_file.metadata()?.len();
        let mut child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .current_dir(log_dir())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawning {what} ({})", program.display()))?;
        // The child leads its own process group, so its pid is the group id.
        let (pgid, owner) = (child.id(), std::process::id());
        let script = format!(
            "while kill -0 {owner} 2>/dev/null; do sleep 1; done; \
             kill -TERM -{pgid} 2>/dev/null || exit 0; \
             i=0; while kill -0 -{pgid} 2>/dev/null && [ $i -lt 30 ]; do sleep 0.1; i=$((i+1)); done; \
             kill -KILL -{pgid} 2>/dev/null; exit 0"
        );
        let watchdog = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match watchdog {
            Ok(watchdog) => Ok(Supervised {
                what: what.to_string(),
                child,
                watchdog,
                log: log.to_path_buf(),
                log_start,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e).with_context(|| format!("spawning the watchdog of {what}"))
            }
        }
    }

    /// Polls `ready` with what the process has logged so far until it returns
    /// true. Fails, with the log tail, when the process exits first or its log
    /// shows `failure_marker` (both retryable: most likely the address was
    /// taken), or after [`READY_TIMEOUT`]; the process is killed then.
    pub(crate) fn ready(
        mut self,
        failure_marker: Option<&str>,
        ready: impl Fn(&str) -> bool,
    ) -> Result<Supervised, StartFailure> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let failure = loop {
            match self.child.try_wait() {
                Err(error) => break StartFailure::from(anyhow::Error::from(error)),
                Ok(Some(status)) => {
                    break self.failure(&format!("exited ({status}) before it became ready"), true);
                }
                Ok(None) => {}
            }
            let log = self.own_log();
            if let Some(marker) = failure_marker
                && log.contains(marker)
            {
                break self.failure(&format!("failed to start ({marker})"), true);
            }
            if ready(&log) {
                return Ok(self);
            }
            if Instant::now() >= deadline {
                break self.failure(&format!("did not become ready within {READY_TIMEOUT:?}"), false);
            }
            std::thread::sleep(PROBE_INTERVAL);
        };
        let _ = self.kill();
        Err(failure)
    }

    /// What this start wrote to the log.
    fn own_log(&self) -> String {
        let mut text = Vec::new();
        let read = File::open(&self.log).and_then(|mut file| {
            file.seek(SeekFrom::Start(self.log_start))?;
            file.read_to_end(&mut text)
        });
        read.map_or_else(|_| String::new(), |_| String::from_utf8_lossy(&text).into_owned())
    }

    fn failure(&self, problem: &str, retryable: bool) -> StartFailure {
        let error = anyhow!(
            "{} {problem}; log {}:\n{}",
            self.what,
            self.log.display(),
            log_tail(&self.log)
        );
        StartFailure { error, retryable }
    }

    /// SIGKILLs the service and its watchdog and reaps both.
    pub(crate) fn kill(mut self) -> Result<()> {
        // kill() fails only when the child had already exited, which is fine.
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("waiting for {} to exit", self.what))?;
        let _ = self.watchdog.kill();
        self.watchdog.wait()?;
        Ok(())
    }
}

/// The last ~40 lines (at most 8 KiB) of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    const MAX: u64 = 8 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Err(e) => format!("(cannot read the log: {e})"),
    }
}

/// `GET url` for readiness probes: the status and the body, `None` when there
/// is no answer. Blocking, and bound to no caller's runtime: the request runs
/// on a thread and a runtime of its own.
pub(crate) fn probe_get(url: String) -> Option<(u16, String)> {
    let probe = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        runtime.block_on(async {
            let response = crate::http::client()
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            Some((response.status().as_u16(), response.text().await.ok()?))
        })
    });
    probe.join().ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_says_in_one_line_to_run_install_tools() {
        let error = require_executable(Path::new("/nonexistent/fake-gcs-server"), "fake-gcs-server")
            .expect_err("the tool is missing");
        assert_eq!(
            error.to_string(),
            "fake-gcs-server is missing at /nonexistent/fake-gcs-server: run scripts/install-tools"
        );
    }
}
