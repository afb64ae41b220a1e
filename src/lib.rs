//! audio-store: the storage stage of an event-driven audio pipeline.
//!
//! It pulls "audio processed" messages from Pub/Sub, uploads each message's
//! audio file and optional thumbnail to Cloud Storage under a deterministic
//! UUID prefix, publishes an "audio stored" event, acks, and removes the
//! sources. Modules, in reading order:
//!
//! - [`config`] — the TOML file and environment overrides, validated into [`config::Settings`].
//! - [`message`] — the input "audio processed" message, parsed into an [`message::AudioMessage`].
//! - [`identity`] — the deterministic `audio_id` (UUIDv5).
//! - [`source`] — local and `gs://` sources, and which of them may be read.
//! - [`content`] — the accepted content types (MIME type, canonical extension).
//! - [`media`] — the probe: real demuxers and image headers decide what a file is.
//! - [`layout`] — object names from `storage.layout`.
//! - [`event`] — the output "audio stored" event.
//! - [`trace_context`] — W3C trace context in, and on to the event and dead letters.
//! - [`error`] — failure kinds; transient versus permanent is decided there.
//! - [`store`] — the only module that talks to Cloud Storage.
//! - [`pubsub`] — the only module that talks to Pub/Sub.
//! - [`pipeline`] — everything that happens to one message.
//! - [`outcome`] — how a message ended, and its labels.
//! - [`dead_letter`] — the dead-letter copy of a permanent failure, within Pub/Sub's limits.
//! - [`worker`] — the loop that pulls, bounds concurrency and shuts down.
//! - [`setup`], [`publish`] and [`replay`] — the operator commands.
//! - [`metrics`] and [`health`] — Prometheus metrics and the `/healthz` `/readyz` `/metrics` endpoint.
//! - [`monitor`] — liveness and the Pub/Sub probe, beside the worker loop.
//! - [`telemetry`] — JSON logs linked to traces, and span export over OTLP.

pub mod config;
pub mod content;
pub mod dead_letter;
pub mod envelope;
pub mod error;
pub mod event;
pub mod health;
pub mod identity;
pub mod layout;
pub mod media;
pub mod message;
pub mod metrics;
pub mod monitor;
pub mod outcome;
pub mod pipeline;
pub mod publish;
pub mod pubsub;
pub mod replay;
pub mod setup;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod trace_context;
pub mod worker;
