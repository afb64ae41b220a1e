//! The checks of single values: each returns the typed value or an error naming its key.

use super::*;

/// The collector's traces URL: `http(s)://host[:port][/path]`, with
/// `/v1/traces` appended unless the path already ends with it (the
/// `OTEL_EXPORTER_OTLP_ENDPOINT` convention); empty means no export.
pub(super) fn otlp_traces(key: &str, endpoint: &str) -> Result<Option<reqwest::Url>, ConfigError> {
    if endpoint.is_empty() {
        return Ok(None);
    }
    let shown = redacted_url(endpoint);
    let mut url = reqwest::Url::parse(endpoint)
        .map_err(|error| ConfigError::new(key, format!("not a URL ({error}): {shown:?}")))?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(ConfigError::new(
            key,
            format!("expected http(s)://host[:port][/path] of an OTLP/HTTP collector, got {shown:?}"),
        ));
    }
    let path = url.path().trim_end_matches('/').to_string();
    if path.ends_with("/v1/traces") {
        url.set_path(&path);
    } else {
        url.set_path(&format!("{path}/v1/traces"));
    }
    Ok(Some(url))
}

/// `url` as an error may show it: anything before an `@` in its authority
/// (a user name and password) and its query (which may hold a token) replaced
/// by `REDACTED`, even when it does not parse.
pub(super) fn redacted_url(url: &str) -> String {
    let url = match url.split_once('?') {
        Some((before, query)) => {
            let fragment = query.find('#').map_or("", |at| &query[at..]);
            format!("{before}?REDACTED{fragment}")
        }
        None => url.to_string(),
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://REDACTED{}", &rest[at..]),
        None => url.clone(),
    }
}

/// A probability: finite, from 0.0 to 1.0.
pub(super) fn sample_ratio(key: &str, ratio: f64) -> Result<f64, ConfigError> {
    if (0.0..=1.0).contains(&ratio) {
        Ok(ratio)
    } else {
        Err(ConfigError::new(key, format!("expected 0.0 to 1.0, got {ratio}")))
    }
}

/// A local root: an absolute path to an existing directory (symlinks followed), not `/`.
pub(super) fn local_root(key: &str, root: &str) -> Result<PathBuf, ConfigError> {
    let path = PathBuf::from(root);
    if !path.is_absolute() {
        return Err(ConfigError::new(
            key,
            format!("must be an absolute path, got {root:?}"),
        ));
    }
    let canonical = std::fs::canonicalize(&path)
        .map_err(|error| ConfigError::new(key, format!("{root:?} cannot be used ({error})")))?;
    if !canonical.is_dir() {
        return Err(ConfigError::new(key, format!("{root:?} is not a directory")));
    }
    if canonical == Path::new("/") {
        return Err(ConfigError::new(
            key,
            format!("{root:?} is the root of the file system: every file would be readable and deletable"),
        ));
    }
    Ok(path)
}

/// The levels a `log.level` directive may set.
pub(super) const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A `log.level` filter: comma-separated directives, each a level (`info`) or
/// `TARGET=LEVEL` (`audio_store=debug`, `h2[span]=off`), at least one.
///
/// Stricter than `EnvFilter`, which reads a bare word such as `verbose` as a
/// target and then logs nothing at all, not even errors.
pub(super) fn check_log_filter(key: &str, filter: &str) -> Result<(), ConfigError> {
    let invalid = |problem: String| {
        ConfigError::new(
            key,
            format!(
                "{problem}; expected LEVEL or TARGET=LEVEL, comma-separated, with LEVEL one of {}",
                LOG_LEVELS.join(" ")
            ),
        )
    };
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(invalid("no directive".into()));
    }
    for directive in directives {
        let (target, level) = match directive.rsplit_once('=') {
            Some((target, level)) => (Some(target.trim()), level.trim()),
            None => (None, directive),
        };
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(invalid(format!("{directive:?} sets no known level")));
        }
        if target.is_some_and(str::is_empty) {
            return Err(invalid(format!("{directive:?} has no target")));
        }
        directive
            .parse::<tracing_subscriber::filter::Directive>()
            .map_err(|error| invalid(format!("{directive:?} is not a directive ({error})")))?;
    }
    Ok(())
}

/// Checks one `[[storage.lifecycle]]` entry; errors name `key.field`.
pub(super) fn lifecycle_rule(key: &str, raw: &RawLifecycleRule) -> Result<LifecycleRule, ConfigError> {
    let age_days = in_range(&format!("{key}.age_days"), raw.age_days, 0, 36_500)? as u32;
    let class = || {
        STORAGE_CLASSES
            .into_iter()
            .find(|known| *known == raw.storage_class)
            .ok_or_else(|| {
                ConfigError::new(
                    format!("{key}.storage_class"),
                    format!(
                        "set_storage_class needs one of {}, got {:?}",
                        STORAGE_CLASSES.join(", "),
                        raw.storage_class
                    ),
                )
            })
    };
    let action = match raw.action.as_str() {
        "delete" if raw.storage_class.is_empty() => LifecycleAction::Delete,
        "delete" => {
            return Err(ConfigError::new(
                format!("{key}.storage_class"),
                "only set_storage_class takes a storage class",
            ));
        }
        "set_storage_class" => LifecycleAction::SetStorageClass(class()?),
        other => {
            return Err(ConfigError::new(
                format!("{key}.action"),
                format!("expected \"set_storage_class\" or \"delete\", got {other:?}"),
            ));
        }
    };
    if let Some(index) = raw.matches_prefix.iter().position(String::is_empty) {
        return Err(ConfigError::new(
            format!("{key}.matches_prefix[{index}]"),
            "an empty prefix would match every object; leave matches_prefix out instead",
        ));
    }
    Ok(LifecycleRule {
        age_days,
        action,
        matches_prefix: raw.matches_prefix.clone(),
    })
}

pub(super) fn required(key: &str, value: &str) -> Result<String, ConfigError> {
    optional(value).ok_or_else(|| ConfigError::new(key, "is required"))
}

pub(super) fn optional(value: &str) -> Option<String> {
    let trimmed = value.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

pub(super) fn in_range(key: &str, value: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::new(
            key,
            format!("must be between {min} and {max}, got {value}"),
        ))
    }
}

pub(super) fn duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|error| {
        ConfigError::new(
            key,
            format!("expected a duration like \"25s\" or \"200ms\", got {value:?} ({error})"),
        )
    })
}

/// Expands a short name to `projects/P/<collection>/NAME`, or checks a full one.
pub(super) fn full_name(
    key: &str,
    project: &str,
    collection: &str,
    name: &str,
) -> Result<String, ConfigError> {
    let short = match name.strip_prefix("projects/") {
        None => name,
        Some(rest) => {
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                [owner, kind, short] if *kind == collection => {
                    check_resource_id(key, owner)?;
                    *short
                }
                _ => {
                    return Err(ConfigError::new(
                        key,
                        format!("expected a short name or projects/PROJECT/{collection}/NAME, got {name:?}"),
                    ));
                }
            }
        }
    };
    check_resource_id(key, short)?;
    if name.starts_with("projects/") {
        Ok(name.to_string())
    } else {
        Ok(format!("projects/{project}/{collection}/{short}"))
    }
}

/// Pub/Sub resource ids: 3..=255 characters, a letter first, then `[A-Za-z0-9-_.~+%]`.
pub(super) fn check_resource_id(key: &str, id: &str) -> Result<(), ConfigError> {
    let valid_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.~+%:".contains(c));
    if !(3..=255).contains(&id.len()) || !id.starts_with(|c: char| c.is_ascii_alphabetic()) || !valid_chars {
        return Err(ConfigError::new(
            key,
            format!(
                "{id:?} is not a valid name (3-255 characters, starting with a letter; letters, digits, - _ . ~ + %)"
            ),
        ));
    }
    Ok(())
}

/// Bucket names: 3..=63 characters of `[a-z0-9-_.]`, starting and ending alphanumeric.
pub(super) fn check_bucket(key: &str, bucket: &str) -> Result<(), ConfigError> {
    let valid_chars = bucket
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c));
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&bucket.len())
        || !valid_chars
        || !alnum(bucket.chars().next())
        || !alnum(bucket.chars().last())
    {
        return Err(ConfigError::new(
            key,
            format!(
                "{bucket:?} is not a valid bucket name (3-63 of a-z 0-9 - _ ., starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// A CloudEvents attribute value the worker sends on every event: printable
/// ASCII without spaces (a URI reference, a reverse-DNS type name; nothing
/// invisible that would make a consumer's filter miss it), not empty, and
/// within Pub/Sub's 1,024 bytes per attribute value, which the emulator does
/// not enforce but Pub/Sub does.
pub(super) fn check_event_attribute(key: &str, value: &str) -> Result<(), ConfigError> {
    let shown: String = value.chars().take(60).collect();
    if value.is_empty() {
        return Err(ConfigError::new(key, "must not be empty"));
    }
    if let Some(bad) = value.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ConfigError::new(
            key,
            format!("must be printable ASCII without spaces, got {bad:?} in {shown:?}"),
        ));
    }
    if value.len() > crate::envelope::MAX_ATTRIBUTE_BYTES {
        return Err(ConfigError::new(
            key,
            format!(
                "is {} bytes; Pub/Sub allows {} in an attribute value",
                value.len(),
                crate::envelope::MAX_ATTRIBUTE_BYTES
            ),
        ));
    }
    Ok(())
}

/// Every `%` of a URI reference starts a two-digit hex escape.
pub(super) fn check_percent_escapes(key: &str, value: &str) -> Result<(), ConfigError> {
    let bytes = value.as_bytes();
    for (at, _) in value.match_indices('%') {
        let escape = bytes.get(at + 1..at + 3);
        if !escape.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
            return Err(ConfigError::new(
                key,
                format!("is not a URI reference: '%' at byte {at} does not start a %XX escape"),
            ));
        }
    }
    Ok(())
}
