//! The `[storage]` checks: storage classes, lifecycle rules, dated layouts.

use super::*;

#[test]
fn lifecycle_rules_are_checked_naming_the_entry_and_load_back() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("lifecycle.toml");
    let load = |rules: &str| {
        std::fs::write(&path, format!("[storage]\nbucket = \"audio-x\"\n{rules}"))?;
        Settings::load(Some(&path), &minimal()).map_err(Box::<dyn std::error::Error>::from)
    };
    let settings = load(
        "[[storage.lifecycle]]\nage_days = 90\naction = \"set_storage_class\"\nstorage_class = \"COLDLINE\"\n\
         [[storage.lifecycle]]\nage_days = 3650\naction = \"delete\"\nmatches_prefix = [\"audio/\"]\n",
    )?;
    assert_eq!(
        settings.storage.lifecycle,
        [
            LifecycleRule {
                age_days: 90,
                action: LifecycleAction::SetStorageClass("COLDLINE"),
                matches_prefix: vec![],
            },
            LifecycleRule {
                age_days: 3650,
                action: LifecycleAction::Delete,
                matches_prefix: vec!["audio/".into()],
            },
        ]
    );
    std::fs::write(&path, settings.effective_toml())?;
    assert_eq!(
        Settings::load(Some(&path), &Environment::new())?
            .storage
            .lifecycle,
        settings.storage.lifecycle
    );
    for (rules, key) in [
        (
            "age_days = -1\naction = \"delete\"",
            "storage.lifecycle[0].age_days",
        ),
        (
            "age_days = 1\naction = \"archive\"",
            "storage.lifecycle[0].action",
        ),
        (
            "age_days = 1\naction = \"set_storage_class\"",
            "storage.lifecycle[0].storage_class",
        ),
        (
            "age_days = 1\naction = \"set_storage_class\"\nstorage_class = \"COLD\"",
            "storage.lifecycle[0].storage_class",
        ),
        (
            "age_days = 1\naction = \"delete\"\nstorage_class = \"COLDLINE\"",
            "storage.lifecycle[0].storage_class",
        ),
        (
            "age_days = 1\naction = \"delete\"\nmatches_prefix = [\"\"]",
            "storage.lifecycle[0].matches_prefix[0]",
        ),
    ] {
        let error = load(&format!("[[storage.lifecycle]]\n{rules}\n")).expect_err(key);
        assert!(
            error.to_string().starts_with(&format!("{key}: ")),
            "{key}: {error}"
        );
    }
    Ok(())
}

#[test]
fn a_storage_class_must_be_one_gcs_knows() {
    let cases = [
        (
            "AUDIO_STORE__STORAGE__STORAGE_CLASS",
            "nearline",
            "storage.storage_class: expected one of STANDARD",
        ),
        (
            "AUDIO_STORE__STORAGE__LAYOUT",
            "{audio_id}/{kind}/{meta.a b}",
            "storage.layout: {meta.a b}",
        ),
        (
            "AUDIO_STORE__STORAGE__LAYOUT",
            "users/{meta.audio-id}/{audio_id}/{kind}{ext}",
            "storage.layout: {meta.audio-id}: audio-id is a reserved metadata key",
        ),
    ];
    for (key, value, expected) in cases {
        let error = Settings::load(None, &with(minimal(), key, value))
            .expect_err(&format!("{key}={value} is refused"));
        assert!(error.to_string().starts_with(expected), "{key}={value}: {error}");
    }
}

#[test]
fn a_dated_layout_gets_a_note_that_still_loads_back() -> Result<(), Box<dyn std::error::Error>> {
    let plain = Settings::load(None, &minimal())?;
    assert!(!plain.effective_toml().contains("# note:"));
    let dated = Settings::load(
        None,
        &with(
            minimal(),
            "AUDIO_STORE__STORAGE__LAYOUT",
            "{yyyy}/{mm}/{audio_id}/{kind}{ext}",
        ),
    )?;
    let text = dated.effective_toml();
    assert!(text.contains("# note: storage.layout is dated"), "{text}");
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("effective.toml");
    std::fs::write(&path, &text)?;
    assert_eq!(
        Settings::load(Some(&path), &Environment::new())?.effective_toml(),
        text
    );
    Ok(())
}
