//! Tidy: the boundaries ARCHITECTURE.md promises, checked on the sources
//! (rust-analyzer's `tidy` is the model). Only the storage module talks to
//! Cloud Storage, only the Pub/Sub module to Pub/Sub, serde derives stay at
//! the edges, and the library has no unsafe code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each crate path, and the only modules of `src/` that may name it in code.
const OWNERS: [(&str, &[&str]); 5] = [
    ("google_cloud_storage", &["store"]),
    ("google_cloud_pubsub", &["pubsub"]),
    ("google_cloud_auth", &["store", "pubsub"]),
    ("google_cloud_gax", &["store", "pubsub"]),
    ("google_cloud_wkt", &["pubsub"]),
];

/// The edge modules: wire shapes of the configuration file, the input message,
/// the event, the `publish` message, the replay report and Cloud Storage's JSON answers.
const SERDE_EDGES: [&str; 6] = [
    "config/raw",
    "event",
    "publish",
    "replay",
    "message",
    "store/json_api",
];

/// Every `.rs` file under `src/`, as (module path such as `config/raw`, text).
fn sources() -> anyhow::Result<Vec<(String, String)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path: PathBuf = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(&root)?.with_extension("");
                let module = relative.to_string_lossy().trim_end_matches("/mod").to_string();
                files.push((module, std::fs::read_to_string(&path)?));
            }
        }
    }
    anyhow::ensure!(files.len() > 10, "found the sources in {}", root.display());
    Ok(files)
}

/// Whether `module` (`store/upload`) is `owner` (`store`) or inside it.
fn within(module: &str, owner: &str) -> bool {
    module == owner || module.starts_with(&format!("{owner}/"))
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
                if named && !owners.iter().any(|owner| within(&file, owner)) {
                    offences.push(format!("src/{file}.rs:{line_number} names {krate}"));
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
            if derives_serde && !SERDE_EDGES.iter().any(|edge| within(&file, edge)) {
                offences.push(format!("src/{file}.rs:{line_number}: {}", line.trim()));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
    Ok(())
}

#[test]
fn every_crate_of_the_workspace_forbids_unsafe_code() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for manifest in ["Cargo.toml", "testkit/Cargo.toml"] {
        let text = std::fs::read_to_string(root.join(manifest))?;
        let table: toml::Table = text.parse()?;
        let forbidden = table
            .get("lints")
            .and_then(|lints| lints.get("rust"))
            .and_then(|rust| rust.get("unsafe_code"))
            .and_then(|level| level.as_str());
        anyhow::ensure!(
            forbidden == Some("forbid"),
            "{manifest}: [lints.rust] unsafe_code = \"forbid\" (got {forbidden:?})"
        );
    }
    Ok(())
}

/// The top-level modules that `text` refers to as `crate::NAME`.
fn uses_of_crate_modules(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (_, line) in code_lines(text) {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                used.insert(name);
            }
        }
    }
    used
}

#[test]
fn the_top_level_modules_import_each_other_without_a_cycle() -> anyhow::Result<()> {
    // module -> the modules its code uses (its unit tests may use anything).
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in sources()? {
        let top = module.split('/').next().unwrap_or_default().to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let uses = graph.entry(top.clone()).or_default();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        uses.extend(
            uses_of_crate_modules(code)
                .into_iter()
                .filter(|used| *used != top),
        );
    }
    anyhow::ensure!(graph.len() > 10 && graph.values().any(|uses| !uses.is_empty()));
    // Depth-first search; a module met again on the current path closes a cycle.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|seen| seen == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if !done.insert(module.to_string()) {
            return None;
        }
        path.push(module.to_string());
        for used in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(used, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            anyhow::bail!("an import cycle: {}", cycle.join(" -> "));
        }
    }
    Ok(())
}

#[test]
fn only_the_error_module_turns_a_problem_into_a_failure_of_some_kind() -> anyhow::Result<()> {
    let mut offences = Vec::new();
    for (module, text) in sources()? {
        // Unit tests may build failures to check how they are handled.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (line_number, line) in code_lines(code) {
            if line.contains("Failure::new(") && module != "error" {
                offences.push(format!("src/{module}.rs:{line_number}: {}", line.trim()));
            }
        }
    }
    assert!(offences.is_empty(), "{offences:#?}");
    Ok(())
}
