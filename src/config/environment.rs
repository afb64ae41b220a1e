//! The `AUDIO_STORE__SECTION__KEY` overlay on the file.

use super::*;

/// Keys that only the file can set: their values are tables.
pub(super) const FILE_ONLY: [(&str, &str); 1] = [("storage", "lifecycle")];

/// The shape of a key's value, for reading it from an environment variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    Text,
    Integer,
    Float,
    List,
}

/// Every `(section, key, kind)` that the environment can set, read off the
/// defaults of the raw shapes: every key of the file but [`FILE_ONLY`].
pub(super) fn keys() -> Vec<(String, String, KeyKind)> {
    let defaults = toml::Table::try_from(RawSettings::default()).expect("the defaults serialise");
    let mut keys = Vec::new();
    for (section, table) in &defaults {
        for (key, value) in table.as_table().into_iter().flatten() {
            let kind = match value {
                toml::Value::String(_) => KeyKind::Text,
                toml::Value::Integer(_) => KeyKind::Integer,
                toml::Value::Float(_) => KeyKind::Float,
                toml::Value::Array(_) => KeyKind::List,
                _ => continue,
            };
            if !FILE_ONLY.contains(&(section.as_str(), key.as_str())) {
                keys.push((section.clone(), key.clone(), kind));
            }
        }
    }
    keys
}

/// Applies the `AUDIO_STORE__SECTION__KEY` variables of `environment` to the file's `table`.
pub(super) fn apply_environment(
    table: &mut toml::Table,
    environment: &Environment,
) -> Result<(), ConfigError> {
    let keys = keys();
    for (variable, value) in environment {
        let Some(rest) = variable.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let lowered = rest.to_ascii_lowercase();
        let Some((section, key)) = lowered.split_once("__") else {
            return Err(ConfigError::new(
                variable,
                "expected AUDIO_STORE__SECTION__KEY, e.g. AUDIO_STORE__STORAGE__BUCKET",
            ));
        };
        if FILE_ONLY.contains(&(section, key)) {
            return Err(ConfigError::new(
                variable,
                format!("{section}.{key} can only be set in the configuration file"),
            ));
        }
        let Some((_, _, kind)) = keys.iter().find(|(s, k, _)| s == section && k == key) else {
            return Err(ConfigError::new(variable, format!("unknown key {section}.{key}")));
        };
        let converted =
            match kind {
                KeyKind::Text => toml::Value::String(value.clone()),
                KeyKind::Integer => toml::Value::Integer(value.trim().parse().map_err(|_| {
                    ConfigError::new(variable, format!("expected an integer, got {value:?}"))
                })?),
                KeyKind::Float => {
                    toml::Value::Float(value.trim().parse().map_err(|_| {
                        ConfigError::new(variable, format!("expected a number, got {value:?}"))
                    })?)
                }
                KeyKind::List => toml::Value::Array(parse_list(variable, value)?),
            };
        let section_table = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = section_table else {
            return Err(ConfigError::new(section, "expected a table"));
        };
        section_table.insert(key.to_string(), converted);
    }
    Ok(())
}

/// A list from an environment variable: a TOML array (`["a", "b"]`) or comma-separated (`a,b`).
fn parse_list(variable: &str, value: &str) -> Result<Vec<toml::Value>, ConfigError> {
    let trimmed = value.trim();
    if trimmed.starts_with('[') {
        let parsed = format!("list = {trimmed}")
            .parse::<toml::Table>()
            .map_err(|error| {
                ConfigError::new(
                    variable,
                    format!("not a TOML array ({})", one_line(&error.to_string())),
                )
            })?;
        return match parsed.get("list") {
            Some(toml::Value::Array(items)) => Ok(items.clone()),
            _ => Err(ConfigError::new(variable, "not a TOML array")),
        };
    }
    Ok(trimmed
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| toml::Value::String(item.to_string()))
        .collect())
}
