//! The `audio-store` binary: parses arguments, loads the settings, starts
//! telemetry and calls into the library.

use anyhow::Context as _;
use audio_store::config::{Environment, Settings};
use audio_store::publish::ProcessedMessage;
use audio_store::{publish, setup, telemetry, worker};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

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
    /// Validate the configuration and print the effective values.
    CheckConfig,
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
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "audio-store failed");
            eprintln!("audio-store: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, settings: Settings) -> anyhow::Result<()> {
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
        Command::CheckConfig => unreachable!("handled before the runtime starts"),
    }
    Ok(())
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
