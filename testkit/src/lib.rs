//! The test kit of audio-store: what the integration tests, the benchmark and
//! `scripts/local-run` share (google-cloud-rust's `src/test-utils` is the
//! model). It talks to the emulators and runs the product's binary; it does
//! not link the product.
//!
//! In reading order:
//!
//! - [`process`] — service processes that cannot outlive their owner; their logs.
//! - [`emulators`] — the Pub/Sub emulator and fake-gcs-server (installed by
//!   `scripts/install-tools`, never from here).
//! - [`pubsub_rest`], [`gcs_rest`] — REST clients of the emulators,
//!   independent of the code under test; [`http`] — what they share.
//! - [`env`](mod@env) — [`TestEnv`]: fresh names, resources and a spool directory per
//!   test; [`wait_for`].
//! - [`media`] — test media from the fixtures in `tests/fixtures/media`.
//! - [`worker`] — the product's configuration for a [`TestEnv`] and the
//!   worker as a process.
//! - [`fault_proxy`] — an HTTP/1.1 proxy in front of fake-gcs that injects
//!   faults, records requests and, where a test asks, corrects fake-gcs.
//! - [`tcp_proxy`] — a TCP proxy that cuts a service off.
//! - [`otlp`] — an OTLP/HTTP collector that keeps the spans it receives.

pub mod emulators;
pub mod env;
pub mod fault_proxy;
pub mod gcs_rest;
pub mod http;
pub mod media;
pub mod otlp;
pub mod process;
pub mod pubsub_rest;
pub mod tcp_proxy;
pub mod worker;

pub use emulators::{FakeGcs, PubsubEmulator};
pub use env::{PROJECT, TestEnv, unique, wait_for};
pub use fault_proxy::FaultProxy;
pub use gcs_rest::{GcsRest, ObjectInfo, crc32c_base64, crc32c_file};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use pubsub_rest::{PubsubRest, Received, SubscriptionOptions};
pub use tcp_proxy::TcpProxy;
pub use worker::{WorkerProcess, environment};
