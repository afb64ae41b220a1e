//! After the ack: the sources removed, exactly what was read and nothing else.

use super::Pipeline;
use crate::source::{KeptReason, Removal, SpoolEntry};
use tracing::{info, warn};

/// A source to delete after the ack: exactly what was read, nothing else.
#[derive(Debug, Clone)]
pub(super) enum Cleanup {
    Local(SpoolEntry),
    Staging {
        bucket: String,
        name: String,
        generation: i64,
    },
}

impl Pipeline {
    /// Deletes the sources; failures are logged, never fatal (the data is safe in the archive).
    ///
    /// A local source is removed only if its directory entry still is the very
    /// file that was read and stored (see [`SpoolEntry::remove`]); otherwise it
    /// is kept, and counted.
    pub(super) async fn clean_up(&self, cleanups: &[Cleanup]) {
        let local: Vec<SpoolEntry> = cleanups
            .iter()
            .filter_map(|cleanup| match cleanup {
                Cleanup::Local(entry) => Some(entry.clone()),
                Cleanup::Staging { .. } => None,
            })
            .collect();
        // The local files go in one trip to the blocking pool.
        if !local.is_empty() {
            let removals = tokio::task::spawn_blocking(move || {
                local
                    .into_iter()
                    .map(|entry| {
                        let removal = entry.remove();
                        (entry, removal)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            match removals {
                Ok(removals) => {
                    for (entry, removal) in removals {
                        self.report_removal(&entry, removal);
                    }
                }
                Err(error) => warn!(%error, "stored and acked, but removing the sources failed"),
            }
        }
        for cleanup in cleanups {
            if let Cleanup::Staging {
                bucket,
                name,
                generation,
            } = cleanup
                && let Err(error) = self.store.delete(bucket, name, *generation).await
            {
                warn!(%error, "stored and acked, but the source could not be removed");
            }
        }
    }

    fn report_removal(&self, entry: &SpoolEntry, removal: std::io::Result<Removal>) {
        let path = entry.path().display();
        match removal {
            Ok(Removal::Removed) => {}
            Ok(Removal::Gone) => info!(source = %path, "stored and acked; the source was already gone"),
            Ok(Removal::Moved) => {
                self.metrics.source_kept(KeptReason::Replaced);
                warn!(
                    source = %path,
                    reason = KeptReason::Replaced.as_str(),
                    "stored and acked, but the source was kept: its directory is no longer where it was beneath the root"
                );
            }
            Ok(Removal::Kept {
                reason,
                found,
                left_as,
            }) => {
                self.metrics.source_kept(reason);
                let why = match reason {
                    KeptReason::Replaced => "another file took its name after it was read",
                    KeptReason::Changed => "it changed after it was read",
                };
                warn!(
                    source = %path,
                    reason = reason.as_str(),
                    stored = %entry.identity(),
                    found = %found,
                    left_as = left_as.as_ref().map(|aside| aside.display().to_string()),
                    "stored and acked, but the source was kept: {why}; what was stored is what was read"
                );
            }
            Err(error) => {
                warn!(source = %path, %error, "stored and acked, but the source could not be removed")
            }
        }
    }
}
