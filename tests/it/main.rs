//! Integration tests against the real Pub/Sub emulator and fake-gcs-server.

mod harness;
