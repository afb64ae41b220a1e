//! Object names: the `storage.layout` template, parsed once at start-up.

use crate::identity::AudioId;
use std::collections::BTreeMap;
use std::fmt;

/// Longest value a `{meta.KEY}` placeholder takes, in bytes.
pub const MAX_META_VALUE_BYTES: usize = 128;
/// Cloud Storage's limit on an object name, in bytes of UTF-8 (the emulator enforces none).
pub const MAX_NAME_BYTES: usize = 1024;

/// The layout users get when they configure none.
pub const DEFAULT_LAYOUT: &str = "audio/{audio_id}/{kind}{ext}";

/// Which of a message's two files an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The audio track.
    Audio,
    /// The cover image.
    Thumbnail,
}

impl Kind {
    /// `audio` or `thumbnail`, as used in names, metadata and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Audio => "audio",
            Kind::Thumbnail => "thumbnail",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A calendar date in UTC, for `{yyyy}` `{mm}` `{dd}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    /// Four-digit year.
    pub year: i16,
    /// 1..=12.
    pub month: i8,
    /// 1..=31.
    pub day: i8,
}

impl Date {
    /// The UTC date of a timestamp.
    pub fn of(timestamp: jiff::Timestamp) -> Date {
        let date = timestamp.to_zoned(jiff::tz::TimeZone::UTC).date();
        Date {
            year: date.year(),
            month: date.month(),
            day: date.day(),
        }
    }
}

/// Why a layout template was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// A `{name}` that is not one of the placeholders.
    #[error(
        "unknown placeholder {{{0}}} (known: {{audio_id}} {{kind}} {{ext}} {{yyyy}} {{mm}} {{dd}} {{meta.KEY}})"
    )]
    UnknownPlaceholder(String),
    /// A `{meta.KEY}` whose KEY cannot be a metadata key.
    #[error("{{meta.{0}}}: KEY must be 1-128 bytes without control characters, whitespace or braces")]
    InvalidMetaKey(String),
    /// A `{meta.KEY}` whose KEY is one the worker writes itself: no message may
    /// carry it, so no message could ever be stored.
    #[error(
        "{{meta.{0}}}: {0} is a reserved metadata key (the worker writes it itself), so no message can carry it"
    )]
    ReservedMetaKey(String),
    /// A `{` without `}` or a stray `}`.
    #[error("unbalanced braces in {0:?}")]
    Unbalanced(String),
    /// A required placeholder is absent.
    #[error("must contain {{{0}}} so that {1}")]
    Missing(&'static str, &'static str),
    /// The names it would produce are not valid object names.
    #[error("produces invalid object names: {0}")]
    InvalidName(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    AudioId,
    Kind,
    Ext,
    Year,
    Month,
    Day,
    Meta(String),
}

/// Why a message's metadata cannot fill the layout's `{meta.KEY}` placeholders.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("metadata.{key} {problem} (storage.layout uses {{meta.{key}}})")]
pub struct MetaValueError {
    /// The metadata key.
    pub key: String,
    /// What is wrong with its value.
    pub problem: &'static str,
}

/// A parsed object-name template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    template: String,
    segments: Vec<Segment>,
}

impl Layout {
    /// Parses and checks a template such as `audio/{audio_id}/{kind}{ext}`.
    pub fn parse(template: &str) -> Result<Layout, LayoutError> {
        let mut segments = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match (rest.find('{'), rest.find('}')) {
                (_, Some(close)) if rest.find('{').is_none_or(|open| close < open) => {
                    return Err(LayoutError::Unbalanced(template.to_string()));
                }
                (None, None) => {
                    segments.push(Segment::Literal(rest.to_string()));
                    rest = "";
                }
                (Some(open), _) => {
                    if open > 0 {
                        segments.push(Segment::Literal(rest[..open].to_string()));
                    }
                    let after = &rest[open + 1..];
                    let close = after
                        .find('}')
                        .ok_or_else(|| LayoutError::Unbalanced(template.to_string()))?;
                    let name = &after[..close];
                    segments.push(match name {
                        "audio_id" => Segment::AudioId,
                        "kind" => Segment::Kind,
                        "ext" => Segment::Ext,
                        "yyyy" => Segment::Year,
                        "mm" => Segment::Month,
                        "dd" => Segment::Day,
                        other => match other.strip_prefix("meta.") {
                            Some(key) if crate::message::is_reserved(key) => {
                                return Err(LayoutError::ReservedMetaKey(key.to_string()));
                            }
                            Some(key) if is_meta_key(key) => Segment::Meta(key.to_string()),
                            Some(key) => return Err(LayoutError::InvalidMetaKey(key.to_string())),
                            None => return Err(LayoutError::UnknownPlaceholder(other.to_string())),
                        },
                    });
                    rest = &after[close + 1..];
                }
                (None, Some(_)) => unreachable!("handled by the first arm"),
            }
        }
        if !segments.contains(&Segment::AudioId) {
            return Err(LayoutError::Missing(
                "audio_id",
                "each message gets its own objects",
            ));
        }
        if !segments.contains(&Segment::Kind) {
            return Err(LayoutError::Missing(
                "kind",
                "the audio and its thumbnail do not collide",
            ));
        }
        let layout = Layout {
            template: template.to_string(),
            segments,
        };
        layout.check_names()?;
        Ok(layout)
    }

    /// Whether names contain the date (`{yyyy}`, `{mm}` or `{dd}`).
    pub fn is_dated(&self) -> bool {
        self.segments
            .iter()
            .any(|segment| matches!(segment, Segment::Year | Segment::Month | Segment::Day))
    }

    /// The template as configured.
    pub fn template(&self) -> &str {
        &self.template
    }

    /// Checks that `metadata` has a usable value for every `{meta.KEY}`: present,
    /// not empty, at most [`MAX_META_VALUE_BYTES`], no `/` or control
    /// character, not `.` or `..`.
    pub fn check_metadata(&self, metadata: &BTreeMap<String, String>) -> Result<(), MetaValueError> {
        for segment in &self.segments {
            let Segment::Meta(key) = segment else { continue };
            let problem = match metadata.get(key).map(String::as_str) {
                None => Some("is missing"),
                Some("") => Some("is empty"),
                Some(value) if value.len() > MAX_META_VALUE_BYTES => Some("is longer than 128 bytes"),
                Some(value) if value.contains('/') => Some("contains '/'"),
                Some(value) if value.chars().any(char::is_control) => Some("contains a control character"),
                Some("." | "..") => Some("is '.' or '..'"),
                Some(_) => None,
            };
            if let Some(problem) = problem {
                return Err(MetaValueError {
                    key: key.clone(),
                    problem,
                });
            }
        }
        // Each value fits, but together they may make a name Cloud Storage refuses.
        if self.longest_name(metadata) > MAX_NAME_BYTES {
            let longest = self
                .meta_keys()
                .max_by_key(|key| metadata.get(*key).map_or(0, String::len));
            return Err(MetaValueError {
                key: longest.unwrap_or_default().to_string(),
                problem: "makes object names longer than 1,024 bytes",
            });
        }
        Ok(())
    }

    /// The longest object name `metadata` can give, whatever the kind and the extension.
    fn longest_name(&self, metadata: &BTreeMap<String, String>) -> usize {
        let extension = crate::content::ALL
            .iter()
            .map(|content| content.extension.len() + 1);
        let segment = |segment: &Segment| match segment {
            Segment::Literal(text) => text.len(),
            Segment::AudioId => AudioId::TEXT_LEN,
            Segment::Kind => Kind::Audio.as_str().len().max(Kind::Thumbnail.as_str().len()),
            Segment::Ext => extension.clone().max().unwrap_or(0),
            Segment::Year => 4,
            Segment::Month | Segment::Day => 2,
            Segment::Meta(key) => metadata.get(key).map_or(0, String::len),
        };
        self.segments.iter().map(segment).sum()
    }

    /// The metadata keys the layout uses (`{meta.KEY}`), in order.
    pub fn meta_keys(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Meta(key) => Some(key.as_str()),
            _ => None,
        })
    }

    /// The object name for one file of a message; `extension` includes its dot (or is empty).
    pub fn render(
        &self,
        audio_id: AudioId,
        kind: Kind,
        extension: &str,
        date: Date,
        metadata: &BTreeMap<String, String>,
    ) -> Result<String, MetaValueError> {
        self.check_metadata(metadata)?;
        let mut name = String::with_capacity(self.template.len() + 48);
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => name.push_str(text),
                Segment::AudioId => name.push_str(&audio_id.to_string()),
                Segment::Kind => name.push_str(kind.as_str()),
                Segment::Ext => name.push_str(extension),
                Segment::Year => name.push_str(&format!("{:04}", date.year)),
                Segment::Month => name.push_str(&format!("{:02}", date.month)),
                Segment::Day => name.push_str(&format!("{:02}", date.day)),
                Segment::Meta(key) => name.push_str(metadata.get(key).map_or("", String::as_str)),
            }
        }
        Ok(name)
    }

    fn check_names(&self) -> Result<(), LayoutError> {
        let sample_metadata = self
            .meta_keys()
            .map(|key| (key.to_string(), "sample".to_string()))
            .collect();
        let sample = self
            .render(
                AudioId::from_key(crate::identity::IdentityKey::MessageId("sample")),
                Kind::Thumbnail,
                ".webp",
                Date {
                    year: 2026,
                    month: 12,
                    day: 31,
                },
                &sample_metadata,
            )
            .map_err(|_| LayoutError::InvalidName("sample metadata does not fit"))?;
        if sample.starts_with('/') {
            return Err(LayoutError::InvalidName("names must not start with '/'"));
        }
        if sample.starts_with(".well-known/acme-challenge/") {
            return Err(LayoutError::InvalidName(
                "names must not start with .well-known/acme-challenge/",
            ));
        }
        if sample.split('/').any(|part| part == "." || part == "..") {
            return Err(LayoutError::InvalidName(
                "names must not contain '.' or '..' segments",
            ));
        }
        if sample.chars().any(|c| c.is_control()) {
            return Err(LayoutError::InvalidName(
                "names must not contain control characters",
            ));
        }
        if sample.len() > 900 {
            return Err(LayoutError::InvalidName("names must stay well under 1024 bytes"));
        }
        Ok(())
    }
}

/// Whether `key` can name a metadata entry in a `{meta.KEY}` placeholder.
fn is_meta_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '{' || c == '}')
}

#[cfg(test)]
mod tests;
