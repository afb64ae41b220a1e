//! Tidy: the boundaries ARCHITECTURE.md promises, checked on the sources
//! (rust-analyzer's `tidy` is the model). Only the storage module talks to
//! Cloud Storage, only the Pub/Sub module to Pub/Sub, serde derives stay at
//! the edges, and the library has no unsafe code.

use std::path::{Path, PathBuf};

/// Each crate path, and the only files of `src/` that may name it in code.
const OWNERS: [(&str, &[&str]); 5] = [
    ("google_cloud_storage", &["store.rs"]),
    ("google_cloud_pubsub", &["pubsub.rs"]),
    ("google_cloud_auth", &["store.rs", "pubsub.rs"]),
    ("google_cloud_gax", &["store.rs", "pubsub.rs"]),
    ("google_cloud_wkt", &["pubsub.rs"]),
];

/// The edge modules: wire shapes of the configuration, the input message, the
/// event, the `publish` message and the replay report.
const SERDE_EDGES: [&str; 5] = ["config.rs", "event.rs", "publish.rs", "replay.rs", "message.rs"];

fn sources() -> anyhow::Result<Vec<(String, String)>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path: PathBuf = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            files.push((name, std::fs::read_to_string(&path)?));
        }
    }
    anyhow::ensure!(files.len() > 10, "found the sources in {}", dir.display());
    Ok(files)
}

/// The lines of `text` that are code, not comments.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .map(|(index, line)| (index + 1, line))
}

#[test]
fn only_the_storage_and_pubsub_modules_name_the_sdk_crates() -> anyhow::Result<()> {
    let mut offences = Vec::new();
    for (file, text) in sources()? {
        for (line_number, line) in code_lines(&text) {
            for (krate, owners) in OWNERS {
                let named = line.contains(&format!("{krate}::")) || line.contains(&format!("use {krate}"));
                if named && !owners.contains(&file.as_str()) {
                    offences.push(format!("src/{file}:{line_number} names {krate}"));
                }
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
    Ok(())
}

#[test]
fn serde_derives_stay_in_the_edge_modules() -> anyhow::Result<()> {
    let mut offences = Vec::new();
    for (file, text) in sources()? {
        for (line_number, line) in code_lines(&text) {
            let derives_serde =
                line.contains("derive(") && (line.contains("Serialize") || line.contains("Deserialize"));
            if derives_serde && !SERDE_EDGES.contains(&file.as_str()) {
                offences.push(format!("src/{file}:{line_number}: {}", line.trim()));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
    Ok(())
}

#[test]
fn the_library_and_the_binary_forbid_unsafe_code() -> anyhow::Result<()> {
    let files = sources()?;
    for root in ["lib.rs", "main.rs"] {
        let (_, text) = files
            .iter()
            .find(|(name, _)| name == root)
            .ok_or_else(|| anyhow::anyhow!("{root}"))?;
        anyhow::ensure!(
            text.contains("#![forbid(unsafe_code)]"),
            "src/{root} forbids unsafe code"
        );
    }
    Ok(())
}
