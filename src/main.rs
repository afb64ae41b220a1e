//! The `audio-store` binary: parses arguments, loads the settings, starts
//! telemetry and calls into the library.

use audio_store::config::{self, ConfigError, Settings};
use audio_store::error::chain;
use audio_store::publish::ProcessedMessage;
use audio_store::replay::{self, Rate, ReplayError, ReplayOptions, Reporter};
use audio_store::{publish, setup, telemetry, worker};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// Stores processed audio from Pub/Sub in Cloud Storage.
#[derive(Debug, Parser)]
#[command(name = "audio-store", version, about)]
struct Cli {
    /// The TOML configuration file; every key can be overridden by AUDIO_STORE__SECTION__KEY.
    #[arg(long, global = true, env = "AUDIO_STORE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the worker until SIGTERM, SIGINT (Ctrl-C) or SIGHUP.
    Run,
    /// Create the configured topics, subscriptions and bucket (idempotent).
    Setup,
    /// Publish one "audio processed" message to the input topic.
    Publish {
        /// The audio source: an absolute path, file:///path or gs://bucket/object.
        #[arg(long, value_name = "SRC")]
        audio: String,
        /// The thumbnail source.
        #[arg(long, value_name = "SRC")]
        thumbnail: Option<String>,
        /// The producer's idempotency key.
        #[arg(long, value_name = "KEY")]
        id: Option<String>,
        /// A metadata entry, repeatable.
        #[arg(long = "meta", value_name = "K=V", value_parser = key_value)]
        metadata: Vec<(String, String)>,
    },
    /// Move dead-lettered messages back to the input topic.
    Replay {
        /// The dead-letter subscription (default: pubsub.dead_letter_subscription).
        #[arg(long, value_name = "DLQ_SUB")]
        subscription: Option<String>,
        /// The input topic (default: pubsub.topic).
        #[arg(long, value_name = "INPUT_TOPIC")]
        topic: Option<String>,
        /// Stop after moving this many messages.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// At most this many messages per second (0.001 to 10000).
        #[arg(long, value_name = "N")]
        rate: Option<Rate>,
        /// Move only messages of this error kind (e.g. source_missing; max_delivery_attempts for Pub/Sub's own).
        #[arg(long, value_name = "KIND", value_parser = clap::builder::PossibleValuesParser::new(replay::error_kind_names()))]
        error_kind: Option<String>,
        /// List what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long an empty pull means drained.
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
        idle: Duration,
        /// `text` for people, `json` (one object per line) for scripts.
        #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Validate the configuration and print the effective values.
    CheckConfig,
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|error| format!("expected a duration like 5s: {error}"))
}

fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// How a command failed, which decides the exit status.
#[derive(Debug)]
enum Failure {
    /// The configuration cannot work: exit 2.
    Config(ConfigError),
    /// The command line names something that does not exist: exit 2.
    Usage(anyhow::Error),
    /// Anything else: exit 1.
    Failed(anyhow::Error),
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Failure {
        Failure::Config(error)
    }
}

impl Failure {
    fn failed(error: impl Into<anyhow::Error>) -> Failure {
        Failure::Failed(error.into())
    }

    /// Prints the failure (each link of its chain once) and gives its exit status.
    fn report(self) -> ExitCode {
        match self {
            Failure::Config(error) => {
                eprintln!("audio-store: configuration error: {error}");
                ExitCode::from(2)
            }
            Failure::Usage(error) => {
                eprintln!("audio-store: {}", chain(error.as_ref()));
                ExitCode::from(2)
            }
            Failure::Failed(error) => {
                let error = chain(error.as_ref()).to_string();
                tracing::error!(%error, "audio-store failed");
                eprintln!("audio-store: {error}");
                ExitCode::FAILURE
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            return Failure::failed(anyhow::Error::new(error).context("cannot start the runtime")).report();
        }
    };
    let _runtime = runtime.enter();
    // The worker listens for signals before anything else, so a signal at any point of
    // start-up (even while the settings load) ends it cleanly instead of killing it.
    let shutdown = match cli.command {
        Command::Run => match shutdown_signal() {
            Ok(shutdown) => Some(shutdown),
            Err(error) => return Failure::failed(error).report(),
        },
        _ => None,
    };
    let loaded = config::environment_of(std::env::vars_os())
        .and_then(|environment| Settings::load(cli.config.as_deref(), &environment));
    let settings = match loaded {
        Ok(settings) => settings,
        Err(error) => return Failure::Config(error).report(),
    };
    if let Command::CheckConfig = cli.command {
        print!("{}", settings.effective_toml());
        return ExitCode::SUCCESS;
    }
    let telemetry = match telemetry::init(&settings) {
        Ok(telemetry) => telemetry,
        Err(error) => return Failure::Config(error).report(),
    };
    let code = match runtime.block_on(execute(cli.command, settings, shutdown)) {
        Ok(code) => code,
        Err(failure) => failure.report(),
    };
    runtime.block_on(telemetry.shutdown());
    code
}

async fn execute(
    command: Command,
    settings: Settings,
    shutdown: Option<impl Future<Output = ()>>,
) -> Result<ExitCode, Failure> {
    match command {
        Command::Run => {
            let shutdown = shutdown.expect("signals are caught for `run`");
            worker::run_service(Arc::new(settings), shutdown)
                .await
                .map_err(Failure::failed)?;
        }
        Command::Setup => {
            let topic = settings.input_topic()?;
            for step in setup::run(&settings, topic).await.map_err(Failure::failed)? {
                println!("{}", step.line());
            }
        }
        Command::Publish {
            audio,
            thumbnail,
            id,
            metadata,
        } => {
            let topic = settings.input_topic()?;
            let message = ProcessedMessage {
                audio,
                thumbnail,
                id,
                metadata: metadata.into_iter().collect::<BTreeMap<_, _>>(),
            };
            let message_id = publish::run(&settings, topic, &message)
                .await
                .map_err(Failure::failed)?;
            println!("{message_id}");
        }
        Command::Replay {
            subscription,
            topic,
            limit,
            rate,
            error_kind,
            dry_run,
            idle,
            output,
        } => {
            let options = ReplayOptions {
                subscription: match subscription {
                    Some(name) => settings.full_name("--subscription", "subscriptions", &name)?,
                    None => settings.pubsub.dead_letter_subscription.clone().ok_or_else(|| {
                        ConfigError::new(
                            "--subscription",
                            "required (pubsub.dead_letter_subscription is not set)",
                        )
                    })?,
                },
                topic: match topic {
                    Some(name) => settings.full_name("--topic", "topics", &name)?,
                    None => settings.input_topic()?.to_string(),
                },
                limit,
                rate,
                error_kind,
                dry_run,
                idle,
            };
            let mut reporter: Box<dyn Reporter> = if output == "json" {
                Box::new(replay::JsonReporter)
            } else {
                Box::new(replay::TextReporter::new())
            };
            let summary = replay::run(&settings, &options, reporter.as_mut())
                .await
                .map_err(|error| match error {
                    ReplayError::NoSubscription(_) | ReplayError::NoTopic(_) => Failure::Usage(error.into()),
                    ReplayError::Pubsub(_) => Failure::failed(error),
                })?;
            reporter.finish(&summary);
            if summary.failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::CheckConfig => unreachable!("handled before the runtime starts"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Listens for SIGTERM, SIGINT (Ctrl-C) and SIGHUP from now on; the future
/// completes on the first of them.
///
/// SIGHUP ends the worker the same graceful way: the worker has nothing to
/// reload, and a hangup (a closed terminal or session) means its owner is gone.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        let name = tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
            _ = hangup.recv() => "SIGHUP",
        };
        tracing::info!(signal = name, "shutdown requested");
    })
}
