//! Integration tests against the real Pub/Sub emulator and fake-gcs-server,
//! which the test kit (`testkit/`) starts for this test binary on loopback.

mod archive;
mod binary;
mod delivery;
mod failures;
mod faults;
mod media;
mod operations;
mod pulling;
mod redelivery;
mod replay;
mod replay_races;
mod resilience;
mod spool;
mod support;
mod tidy;
mod traces;
mod volume;
mod worker;
