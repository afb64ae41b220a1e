//! The product as a process: the configuration a deployment for a
//! [`TestEnv`] would have, and the worker (`audio-store run`) with its own
//! operations port and log file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::env::{PROJECT, TestEnv};
use crate::http;

/// The environment a deployment for `env` would have: every key as
/// `AUDIO_STORE__…` and the emulators as `*_EMULATOR_HOST`; `overrides` win.
pub fn environment(env: &TestEnv, overrides: &[(&str, &str)]) -> BTreeMap<String, String> {
    let spool = env.spool.path().display().to_string();
    let pubsub_host = env.pubsub_endpoint.trim_start_matches("http://");
    let defaults = [
        ("AUDIO_STORE__PUBSUB__PROJECT", PROJECT),
        ("AUDIO_STORE__PUBSUB__TOPIC", &env.topic),
        ("AUDIO_STORE__PUBSUB__SUBSCRIPTION", &env.subscription),
        ("AUDIO_STORE__PUBSUB__STORED_TOPIC", &env.stored_topic),
        ("AUDIO_STORE__PUBSUB__DEAD_LETTER_TOPIC", &env.dead_letter_topic),
        (
            "AUDIO_STORE__PUBSUB__DEAD_LETTER_SUBSCRIPTION",
            &env.dead_letter_subscription,
        ),
        ("AUDIO_STORE__PUBSUB__ACK_DEADLINE", "10s"),
        ("AUDIO_STORE__PUBSUB__REDELIVERY_MIN_BACKOFF", "1s"),
        ("AUDIO_STORE__PUBSUB__REDELIVERY_MAX_BACKOFF", "5s"),
        ("AUDIO_STORE__STORAGE__BUCKET", &env.bucket),
        ("AUDIO_STORE__STORAGE__STAGING_BUCKETS", &env.staging_bucket),
        ("AUDIO_STORE__SOURCES__LOCAL_ROOTS", &spool),
        ("AUDIO_STORE__WORKER__CONCURRENCY", "4"),
        ("AUDIO_STORE__WORKER__SHUTDOWN_GRACE", "10s"),
        ("AUDIO_STORE__RETRY__MAX_ATTEMPTS", "3"),
        ("AUDIO_STORE__RETRY__INITIAL_BACKOFF", "50ms"),
        ("AUDIO_STORE__RETRY__MAX_BACKOFF", "500ms"),
        ("AUDIO_STORE__HTTP__LISTEN", "127.0.0.1:0"),
        ("AUDIO_STORE__LOG__LEVEL", "info"),
        ("PUBSUB_EMULATOR_HOST", pubsub_host),
        ("STORAGE_EMULATOR_HOST", &env.gcs_endpoint),
    ];
    defaults
        .into_iter()
        .chain(overrides.iter().copied())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
}

/// Sends `signal` (e.g. `-TERM`, `-KILL`) to a child process.
pub async fn signal(child: &tokio::process::Child, signal: &str) -> Result<()> {
    let pid = child.id().context("the process is running")?;
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await?;
    ensure!(status.success(), "kill {signal} {pid}");
    Ok(())
}

/// A worker process (`audio-store run`) with an operations port of its own;
/// its stderr (the log) goes to a file. Killed on drop.
pub struct WorkerProcess {
    /// The process, for waiting on it.
    pub child: tokio::process::Child,
    /// The port of `/healthz`, `/readyz` and `/metrics`.
    pub port: u16,
    log: PathBuf,
    http: reqwest::Client,
}

impl WorkerProcess {
    /// Starts `binary run` with exactly `environment` and a free operations
    /// port; its log goes to `log`.
    pub fn spawn(binary: &Path, environment: &BTreeMap<String, String>, log: &Path) -> Result<WorkerProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = tokio::process::Command::new(binary)
            .arg("run")
            .env_clear()
            .envs(environment)
            .env("AUDIO_STORE__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", binary.display()))?;
        Ok(WorkerProcess {
            child,
            port,
            log: log.to_path_buf(),
            http: http::client(),
        })
    }

    /// `GET /readyz`: status and body, `None` until the endpoint answers.
    pub async fn readyz(&self) -> Result<Option<(u16, String)>> {
        http::get(&self.http, self.port, "/readyz").await
    }

    /// Polls `/readyz` every 5 ms until it answers 200; how long that took.
    /// Fails, with the log's last lines, when the process exits first or after `timeout`.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration> {
        let started = std::time::Instant::now();
        while !matches!(self.readyz().await, Ok(Some((200, _)))) {
            let problem = match self.child.try_wait()? {
                Some(status) => format!("exited ({status}) before it was ready"),
                None if started.elapsed() > timeout => format!("was not ready within {timeout:?}"),
                None => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
            };
            let tail = crate::process::log_tail(&self.log);
            anyhow::bail!("the worker {problem}; log {}:\n{tail}", self.log.display());
        }
        Ok(started.elapsed())
    }

    /// A sample from `/metrics` (0 while the series is absent: a labelled one
    /// appears on its first count), `None` until the endpoint answers.
    pub async fn metric(&self, name: &str) -> Result<Option<f64>> {
        Ok(http::get(&self.http, self.port, "/metrics")
            .await?
            .map(|(_, text)| {
                text.lines()
                    .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
                    .unwrap_or(0.0)
            }))
    }

    /// Sends `name` (e.g. `-TERM`) to the process.
    pub async fn signal(&self, name: &str) -> Result<()> {
        signal(&self.child, name).await
    }

    /// Waits up to `timeout` for the process to exit; its exit code.
    pub async fn exit_code(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("the worker did not exit within {timeout:?}"))??;
        Ok(status.code())
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far, one JSON object per line (other lines are left out).
    pub fn log(&self) -> Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(&self.log)?;
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    }
}
