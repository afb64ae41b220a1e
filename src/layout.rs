//! Object names: the `storage.layout` template, parsed once at start-up.

use crate::identity::AudioId;
use std::fmt;

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
    #[error("unknown placeholder {{{0}}} (known: {{audio_id}} {{kind}} {{ext}} {{yyyy}} {{mm}} {{dd}})")]
    UnknownPlaceholder(String),
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
                        other => return Err(LayoutError::UnknownPlaceholder(other.to_string())),
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

    /// The object name for one file of a message; `extension` includes its dot (or is empty).
    pub fn render(&self, audio_id: AudioId, kind: Kind, extension: &str, date: Date) -> String {
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
            }
        }
        name
    }

    fn check_names(&self) -> Result<(), LayoutError> {
        let sample = self.render(
            AudioId::from_key(crate::identity::IdentityKey::MessageId("sample")),
            Kind::Thumbnail,
            ".webp",
            Date {
                year: 2026,
                month: 12,
                day: 31,
            },
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityKey;

    fn date() -> Date {
        Date {
            year: 2026,
            month: 3,
            day: 7,
        }
    }

    #[test]
    fn the_default_layout_gives_audio_and_thumbnail_under_one_prefix() -> Result<(), LayoutError> {
        let layout = Layout::parse(DEFAULT_LAYOUT)?;
        let id = AudioId::from_key(IdentityKey::Producer("track-7f3c"));
        assert_eq!(
            layout.render(id, Kind::Audio, ".flac", date()),
            format!("audio/{id}/audio.flac")
        );
        assert_eq!(
            layout.render(id, Kind::Thumbnail, ".jpg", date()),
            format!("audio/{id}/thumbnail.jpg")
        );
        Ok(())
    }

    #[test]
    fn date_placeholders_are_zero_padded() -> Result<(), LayoutError> {
        let layout = Layout::parse("{yyyy}/{mm}/{dd}/{audio_id}-{kind}{ext}")?;
        let id = AudioId::from_key(IdentityKey::MessageId("42"));
        assert_eq!(
            layout.render(id, Kind::Audio, "", date()),
            format!("2026/03/07/{id}-audio")
        );
        Ok(())
    }

    #[test]
    fn only_layouts_with_a_date_placeholder_are_dated() -> Result<(), LayoutError> {
        assert!(!Layout::parse(DEFAULT_LAYOUT)?.is_dated());
        assert!(Layout::parse("{yyyy}/{audio_id}/{kind}{ext}")?.is_dated());
        assert!(Layout::parse("x/{audio_id}/{dd}/{kind}")?.is_dated());
        Ok(())
    }

    #[test]
    fn a_layout_without_audio_id_or_kind_is_rejected() {
        assert!(matches!(
            Layout::parse("audio/{kind}{ext}"),
            Err(LayoutError::Missing("audio_id", _))
        ));
        assert!(matches!(
            Layout::parse("audio/{audio_id}{ext}"),
            Err(LayoutError::Missing("kind", _))
        ));
    }

    #[test]
    fn unknown_placeholders_and_stray_braces_are_rejected() {
        assert_eq!(
            Layout::parse("{audio_id}/{kind}/{user}"),
            Err(LayoutError::UnknownPlaceholder("user".into()))
        );
        assert!(matches!(
            Layout::parse("{audio_id}/{kind"),
            Err(LayoutError::Unbalanced(_))
        ));
        assert!(matches!(
            Layout::parse("{audio_id}}/{kind}"),
            Err(LayoutError::Unbalanced(_))
        ));
    }

    #[test]
    fn layouts_producing_invalid_names_are_rejected() {
        assert!(matches!(
            Layout::parse("/{audio_id}/{kind}"),
            Err(LayoutError::InvalidName(_))
        ));
        assert!(matches!(
            Layout::parse("a/../{audio_id}/{kind}"),
            Err(LayoutError::InvalidName(_))
        ));
    }

    #[test]
    fn a_date_is_taken_in_utc() -> Result<(), jiff::Error> {
        let timestamp: jiff::Timestamp = "2026-11-24T23:30:00-05:00".parse()?;
        assert_eq!(
            Date::of(timestamp),
            Date {
                year: 2026,
                month: 11,
                day: 25
            }
        );
        Ok(())
    }
}
