//! Integration tests against the real Pub/Sub emulator and fake-gcs-server,
//! which the harness starts once for this test binary on loopback.

mod archive;
mod binary;
mod delivery;
mod failures;
mod faults;
#[allow(dead_code)] // A toolkit: later tests (faults, restarts) use the rest.
mod harness;
mod media;
mod operations;
mod proxy;
mod pulling;
mod replay;
mod resilience;
mod spool;
mod support;
mod tcp_proxy;
mod tidy;
mod worker;
