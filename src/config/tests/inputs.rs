//! What the configuration reads besides keys (variables that are not UTF-8, files that are not
//! configuration files), and what it shows of URLs.

use super::*;

#[test]
fn a_variable_that_is_not_utf8_is_an_error_naming_it_only_when_the_configuration_reads_it() {
    use std::ffi::OsString;
    use std::os::unix::ffi::OsStringExt as _;
    let bad = || OsString::from_vec(vec![b'x', 0xff]);
    let variables = |name: &str, value: OsString| {
        minimal()
            .into_iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value)))
            .chain([(OsString::from(name), value)])
    };
    let unrelated = environment_of(variables("SOME_OTHER_TOOL", bad())).expect("ignored");
    assert!(!unrelated.contains_key("SOME_OTHER_TOOL"));
    assert!(Settings::load(None, &unrelated).is_ok());
    let name_not_utf8 = [(OsString::from_vec(vec![0xfe]), OsString::from("1"))];
    assert!(environment_of(name_not_utf8).expect("ignored").is_empty());
    for read in [
        "AUDIO_STORE__WORKER__CONCURRENCY",
        "RUST_LOG",
        "STORAGE_EMULATOR_HOST",
    ] {
        let error = environment_of(variables(read, bad())).expect_err(read);
        assert_eq!(
            (error.key.as_str(), error.problem.as_str()),
            (read, "the value is not valid UTF-8")
        );
    }
}

#[test]
fn a_config_file_that_is_not_a_regular_file_or_over_1_mib_is_refused_without_reading_it_all() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(1024 * 1024))).expect("written");
    for (path, problem) in [
        (std::path::PathBuf::from("/dev/zero"), "not a regular file"),
        (dir.path().to_path_buf(), "not a regular file"),
        (big, "larger than 1 MiB, too large for a configuration file"),
    ] {
        let error = Settings::load(Some(&path), &minimal()).expect_err(problem);
        assert_eq!(error.key, "--config");
        assert_eq!(error.problem, format!("{}: {problem}", path.display()));
    }
}

#[test]
fn a_url_shown_in_an_error_or_by_check_config_hides_its_credentials_and_its_query() {
    let refused = "https://user:secret@otel:4318/v1/traces?token=abc#top";
    let error = Settings::load(
        None,
        &with(minimal(), "AUDIO_STORE__TELEMETRY__OTLP_ENDPOINT", refused),
    )
    .expect_err("a query is refused");
    assert!(
        !error.problem.contains("secret") && !error.problem.contains("abc"),
        "{error}"
    );
    assert!(
        error
            .problem
            .contains("https://REDACTED@otel:4318/v1/traces?REDACTED#top"),
        "{error}"
    );
    let accepted = with(
        minimal(),
        "AUDIO_STORE__PUBSUB__ENDPOINT",
        "http://pubsub:8085/?key=abc",
    );
    let effective = Settings::load(None, &accepted).expect("valid").effective_toml();
    assert!(
        effective.contains("endpoint = \"http://pubsub:8085/?REDACTED\""),
        "{effective}"
    );
}
