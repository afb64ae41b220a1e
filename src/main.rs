//! The `audio-store` binary: parses arguments, loads the settings, starts
//! telemetry and calls into the library.

use anyhow::Context as _;
use audio_store::config::{ConfigError, Environment, Settings};
use audio_store::publish::ProcessedMessage;
use audio_store::replay::{self, ReplayError, ReplayOptions, Reporter};
use audio_store::{publish, setup, telemetry, worker};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

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
    /// Run the worker until SIGTERM or Ctrl-C.
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
        /// At most this many messages per second.
        #[arg(long, value_name = "N")]
        rate: Option<f64>,
        /// Move only messages of this error kind (e.g. source_missing; max_delivery_attempts for Pub/Sub's own).
        #[arg(long, value_name = "KIND")]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let environment: Environment = std::env::vars().collect();
    let settings = match Settings::load(cli.config.as_deref(), &environment) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("audio-store: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    if let Command::CheckConfig = cli.command {
        print!("{}", settings.effective_toml());
        return ExitCode::SUCCESS;
    }
    telemetry::init(&settings.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("audio-store: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command, settings)) {
        Ok(code) => code,
        Err(error) if error.downcast_ref::<ConfigError>().is_some() => {
            eprintln!("audio-store: configuration error: {error:#}");
            ExitCode::from(2)
        }
        Err(error)
            if matches!(
                error.downcast_ref::<ReplayError>(),
                Some(ReplayError::NoSubscription(_) | ReplayError::NoTopic(_))
            ) =>
        {
            eprintln!("audio-store: {error:#}");
            ExitCode::from(2)
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "audio-store failed");
            eprintln!("audio-store: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => {
            worker::run_service(Arc::new(settings), shutdown_signal()).await?;
        }
        Command::Setup => {
            for step in setup::run(&settings).await? {
                let state = if step.created { "created" } else { "exists " };
                println!("{state} {:<12} {}", step.resource, step.name);
            }
        }
        Command::Publish {
            audio,
            thumbnail,
            id,
            metadata,
        } => {
            let message = ProcessedMessage {
                audio,
                thumbnail,
                id,
                metadata: metadata.into_iter().collect::<BTreeMap<_, _>>(),
            };
            let message_id = publish::run(&settings, &message).await?;
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
            let summary = replay::run(&settings, &options, reporter.as_mut()).await?;
            reporter.finish(&summary);
            if summary.failed > 0 {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::CheckConfig => unreachable!("handled before the runtime starts"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("SIGTERM handler")
        {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot listen for SIGTERM; Ctrl-C only"
                );
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutdown requested"),
        () = terminate => tracing::info!(signal = "SIGTERM", "shutdown requested"),
    }
}
