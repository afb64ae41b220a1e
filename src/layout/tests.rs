//! The unit tests of object-name layouts.

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
        layout
            .render(id, Kind::Audio, ".flac", date(), &BTreeMap::new())
            .expect("no metadata needed"),
        format!("audio/{id}/audio.flac")
    );
    assert_eq!(
        layout
            .render(id, Kind::Thumbnail, ".jpg", date(), &BTreeMap::new())
            .expect("no metadata needed"),
        format!("audio/{id}/thumbnail.jpg")
    );
    Ok(())
}

#[test]
fn date_placeholders_are_zero_padded() -> Result<(), LayoutError> {
    let layout = Layout::parse("{yyyy}/{mm}/{dd}/{audio_id}-{kind}{ext}")?;
    let id = AudioId::from_key(IdentityKey::MessageId("42"));
    assert_eq!(
        layout
            .render(id, Kind::Audio, "", date(), &BTreeMap::new())
            .expect("no metadata needed"),
        format!("2026/03/07/{id}-audio")
    );
    Ok(())
}

#[test]
fn a_meta_placeholder_takes_the_value_of_the_message_metadata() -> Result<(), LayoutError> {
    let layout = Layout::parse("users/{meta.user_id}/{audio_id}/{kind}{ext}")?;
    let id = AudioId::from_key(IdentityKey::MessageId("42"));
    let metadata = BTreeMap::from([("user_id".to_string(), "u123".to_string())]);
    assert_eq!(
        layout.render(id, Kind::Audio, ".wav", date(), &metadata),
        Ok(format!("users/u123/{id}/audio.wav"))
    );
    assert_eq!(layout.meta_keys().collect::<Vec<_>>(), ["user_id"]);
    Ok(())
}

#[test]
fn a_meta_value_that_cannot_be_a_name_segment_is_refused_naming_the_key() -> Result<(), LayoutError> {
    let layout = Layout::parse("users/{meta.user_id}/{audio_id}/{kind}{ext}")?;
    let long = "x".repeat(129);
    for (value, problem) in [
        (None, "is missing"),
        (Some(""), "is empty"),
        (Some(long.as_str()), "is longer than 128 bytes"),
        (Some("a/b"), "contains '/'"),
        (Some("a\nb"), "contains a control character"),
        (Some("."), "is '.' or '..'"),
        (Some(".."), "is '.' or '..'"),
    ] {
        let metadata: BTreeMap<String, String> = value
            .map(|v| ("user_id".to_string(), v.to_string()))
            .into_iter()
            .collect();
        let error = layout.check_metadata(&metadata).expect_err(problem);
        assert_eq!(error.problem, problem);
        assert!(error.to_string().starts_with("metadata.user_id "), "{error}");
    }
    assert!(
        layout
            .check_metadata(&BTreeMap::from([("user_id".into(), "x".repeat(128))]))
            .is_ok()
    );
    Ok(())
}

#[test]
fn meta_values_that_together_make_a_name_over_1024_bytes_are_refused_naming_the_longest()
-> Result<(), LayoutError> {
    // The adversarial tester's layout: each value fits, nine of them do not.
    let layout = Layout::parse(&format!(
        "{{meta.user}}/{{audio_id}}/{}/{{kind}}{{ext}}",
        "{meta.a}".repeat(9)
    ))?;
    let id = AudioId::from_key(IdentityKey::MessageId("42"));
    let with_a = |a: String| BTreeMap::from([("user".to_string(), "u".to_string()), ("a".to_string(), a)]);
    let error = layout
        .check_metadata(&with_a("a".repeat(128)))
        .expect_err("1,201 bytes");
    assert_eq!(error.key, "a");
    assert_eq!(error.problem, "makes object names longer than 1,024 bytes");
    let rendered = layout.render(id, Kind::Audio, ".wav", date(), &with_a("é".repeat(64)));
    assert_eq!(rendered.expect_err("two bytes each").key, "a");
    // The longest name is a thumbnail's with a four-letter extension: 54 + 9 × len(a) bytes.
    let name = layout.render(id, Kind::Thumbnail, ".webp", date(), &with_a("a".repeat(107)));
    assert_eq!(name.expect("1,017 bytes fit").len(), 1017);
    assert!(
        layout.check_metadata(&with_a("a".repeat(108))).is_err(),
        "1,026 bytes"
    );
    Ok(())
}

#[test]
fn a_meta_placeholder_needs_a_usable_key() {
    for template in [
        "{audio_id}/{kind}/{meta.}",
        "{audio_id}/{kind}/{meta.a b}",
        "{audio_id}/{kind}/{meta.a\tb}",
    ] {
        assert!(
            matches!(Layout::parse(template), Err(LayoutError::InvalidMetaKey(_))),
            "{template:?}"
        );
    }
}

#[test]
fn a_meta_placeholder_of_a_reserved_key_is_rejected_naming_the_key() {
    for key in ["audio-id", "kind", "source-uri", "duration-ms", "Sample-Rate"] {
        let template = format!("users/{{meta.{key}}}/{{audio_id}}/{{kind}}{{ext}}");
        let error = Layout::parse(&template).expect_err("a reserved key");
        assert_eq!(error, LayoutError::ReservedMetaKey(key.to_string()), "{template}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("{{meta.{key}}}: {key} is a reserved")),
            "{error}"
        );
    }
    assert!(Layout::parse("{meta.audio_id}/{audio_id}/{kind}{ext}").is_ok());
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
