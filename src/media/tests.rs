//! Unit tests of the probe against the fixtures (tests/fixtures/media).

use super::*;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/media")
}

fn probe_file(name: &str) -> Result<Probed<AudioMedia>, ProbeError> {
    let bytes = std::fs::read(fixtures().join(name)).expect("fixture");
    let size = bytes.len() as u64;
    probe_audio(std::io::Cursor::new(bytes), size)
}

#[test]
fn every_good_fixture_probes_as_ffprobe_says() {
    let manifest = std::fs::read_to_string(fixtures().join("manifest.tsv")).expect("manifest");
    let mut failures = Vec::new();
    for line in manifest.lines().skip(1) {
        let fields: Vec<&str> = line.split('\t').collect();
        let (name, kind) = (fields[0], fields[1]);
        if kind == "image" {
            let bytes = std::fs::read(fixtures().join(name)).expect("fixture");
            match probe_image(&bytes) {
                Ok(probed) => {
                    let size = (probed.media.width.to_string(), probed.media.height.to_string());
                    if (size.0.as_str(), size.1.as_str()) != (fields[7], fields[8]) {
                        failures.push(format!("{name}: {size:?}"));
                    }
                }
                Err(error) => failures.push(format!("{name}: {error}")),
            }
            continue;
        }
        match probe_file(name) {
            Ok(probed) => {
                let media = &probed.media;
                let expected_ms: f64 = fields[6].parse().unwrap_or(0.0);
                let got_ms = media.duration_ms.unwrap_or(0) as f64;
                let close = (got_ms - expected_ms).abs() <= (expected_ms * 0.02).max(80.0);
                let estimated = ["mp3-cbr-bare.mp3", "mp3-leading-junk.mp3", "adts.aac"].contains(&name);
                if media.sample_rate.to_string() != fields[4]
                    || media.channels.to_string() != fields[5]
                    || media.codec != fields[3]
                    || !close
                    || media.duration_estimated != estimated
                    || media.bitrate.is_none()
                {
                    failures.push(format!("{name}: {media:?} vs {line}"));
                }
            }
            Err(error) => failures.push(format!("{name}: {error}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn flac_cut_short_anywhere_is_truncated() {
    let whole = std::fs::read(fixtures().join("flac-16bit.flac")).expect("fixture");
    for percent in [99, 95, 75, 50, 25, 10] {
        let cut = whole[..whole.len() * percent / 100].to_vec();
        let size = cut.len() as u64;
        let error = probe_audio(std::io::Cursor::new(cut), size).expect_err("truncated");
        let reason = error.to_string();
        // The promise, and the size: where the stream ends after a seek, or where the file does.
        let size_named = [format!("({size} bytes)"), format!("the file holds {size} bytes")]
            .iter()
            .any(|said| reason.contains(said.as_str()));
        assert!(
            reason.contains("is truncated: its header promises 0.500 s of audio (22050 samples)")
                && size_named,
            "{percent}%: {reason}"
        );
    }
}

#[test]
fn opus_whose_audio_pages_fail_their_checksums_has_no_frames() {
    let mut opus = std::fs::read(fixtures().join("opus.opus")).expect("fixture");
    // The third Ogg page on holds the audio; flip a byte in each of them.
    let pages: Vec<usize> = opus
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == b"OggS")
        .map(|(at, _)| at)
        .collect();
    assert!(pages.len() >= 3, "{pages:?}");
    for at in &pages[2..] {
        opus[at + 30] ^= 0xff;
    }
    let size = opus.len() as u64;
    let error = probe_audio(std::io::Cursor::new(opus), size).expect_err("corrupt pages");
    assert!(
        error.to_string().contains("no audio frames") || error.to_string().contains("crc mismatch"),
        "{error}"
    );
}

#[test]
fn an_mp3_whose_tag_alone_outgrows_the_read_budget_says_so() {
    // An ID3v2.3 tag with one 5 MiB TXXX frame, before a real MP3.
    let value = vec![b'a'; 5 * 1024 * 1024];
    let mut frame = b"TXXX".to_vec();
    frame.extend_from_slice(&(value.len() as u32 + 5).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0]);
    frame.extend_from_slice(b"big\0");
    frame.extend_from_slice(&value);
    let syncsafe = |size: usize| {
        [
            (size >> 21) as u8 & 0x7f,
            (size >> 14) as u8 & 0x7f,
            (size >> 7) as u8 & 0x7f,
            size as u8 & 0x7f,
        ]
    };
    let mut file = b"ID3\x03\x00\x00".to_vec();
    file.extend_from_slice(&syncsafe(frame.len()));
    file.extend_from_slice(&frame);
    file.extend_from_slice(&std::fs::read(fixtures().join("mp3-cbr-bare.mp3")).expect("fixture"));
    let size = file.len() as u64;
    let error = probe_audio(std::io::Cursor::new(file), size).expect_err("over the budget");
    assert!(
        error.to_string().starts_with("cannot be probed within 4 MiB"),
        "{error}"
    );
}

#[test]
fn every_bad_fixture_is_rejected_with_a_reason() {
    let mut accepted = Vec::new();
    for entry in std::fs::read_dir(fixtures().join("bad")).expect("bad fixtures") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let bytes = std::fs::read(&path).expect("fixture");
        let size = bytes.len() as u64;
        let image = probe_image(&bytes);
        let audio = probe_audio(std::io::Cursor::new(bytes), size);
        match (&audio, &image) {
            (Err(a), Err(i)) => eprintln!("{name}: audio: {a}; image: {i}"),
            _ => accepted.push(format!("{name}: {audio:?} {image:?}")),
        }
    }
    assert!(accepted.is_empty(), "{accepted:#?}");
}

/// A fixture's bytes whose reads fail from `fail_at` on, as a disk with a bad
/// sector or a connection reset mid-object would.
struct FailingFrom {
    bytes: std::io::Cursor<Vec<u8>>,
    fail_at: u64,
}

impl Read for FailingFrom {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.bytes.position() >= self.fail_at {
            return Err(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        }
        let until = usize::try_from(self.fail_at - self.bytes.position()).unwrap_or(usize::MAX);
        let wanted = buffer.len().min(until);
        self.bytes.read(&mut buffer[..wanted])
    }
}

impl Seek for FailingFrom {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        self.bytes.seek(position)
    }
}

#[test]
fn a_read_that_fails_during_the_probe_is_unreadable_not_bad_content() {
    for (name, class, fail_at) in [
        ("wav-16bit.wav", MediaClass::Audio, 0),
        ("wav-16bit.wav", MediaClass::Audio, 100),
        ("flac-16bit.flac", MediaClass::Audio, 4_000),
        ("m4a-moov-last.m4a", MediaClass::Audio, 1_000),
        ("png.png", MediaClass::Image, 10),
    ] {
        let bytes = std::fs::read(fixtures().join(name)).expect("fixture");
        let size = bytes.len() as u64;
        assert!(fail_at < size, "{name}");
        let failing = FailingFrom {
            bytes: std::io::Cursor::new(bytes),
            fail_at,
        };
        match probe(class, failing, size) {
            Err(ProbeError::Unreadable(error)) => {
                assert_eq!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionReset,
                    "{name}: {error}"
                );
            }
            other => panic!("{name} failing at {fail_at}: {other:?}"),
        }
    }
}

#[test]
fn a_wav_or_aiff_cut_by_less_than_its_headers_is_truncated() {
    for (name, keep) in [
        ("wav-16bit.wav", Keep::AllBut(10)),
        ("wav-16bit.wav", Keep::AllBut(1)),
        ("rf64.wav", Keep::AllBut(10)),
        ("aiff.aiff", Keep::AllBut(10)),
        ("aiff.aiff", Keep::Half),
    ] {
        let whole = std::fs::read(fixtures().join(name)).expect("fixture");
        let cut = match keep {
            Keep::AllBut(bytes) => whole.len() - bytes,
            Keep::Half => whole.len() / 2,
        };
        let bytes = whole[..cut].to_vec();
        let error = probe_audio(std::io::Cursor::new(bytes), cut as u64).expect_err("truncated");
        let reason = error.to_string();
        assert!(
            reason.contains("is truncated: its header promises ")
                && reason.contains(&format!("the file holds {cut} bytes")),
            "{name} cut to {cut}: {reason}"
        );
    }
}

#[test]
fn the_headers_say_where_the_audio_starts_and_what_they_promise() {
    let leading = |name: &str| {
        let whole = std::fs::read(fixtures().join(name)).expect("fixture");
        whole[..whole.len().min(8192)].to_vec()
    };
    // RIFF: fmt (16) and LIST (26) before `data` at 70; AIFF: COMM (18), SSND at 38 with offset 0.
    assert_eq!(chunks::audio_data_start(&leading("wav-16bit.wav")), 78);
    assert_eq!(chunks::audio_data_start(&leading("aiff.aiff")), 54);
    assert_eq!(chunks::audio_data_start(&leading("flac-16bit.flac")), 0);
    assert_eq!(
        chunks::find(b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0", b"data", false),
        chunks::Found::Beyond(36)
    );
    let promise = |name: &str| chunks::promise(&leading(name));
    assert_eq!(
        promise("wav-16bit.wav").as_deref(),
        Some("44100 bytes of audio from byte 78")
    );
    assert_eq!(
        promise("aiff.aiff").as_deref(),
        Some("22050 bytes of audio from byte 54")
    );
    assert_eq!(
        promise("flac-16bit.flac").as_deref(),
        Some("0.500 s of audio (22050 samples)")
    );
    assert_eq!(promise("rf64.wav"), None);
    assert_eq!(promise("mp3-cbr-bare.mp3"), None);
}

/// How much of a fixture a test keeps.
enum Keep {
    AllBut(usize),
    Half,
}

#[test]
fn an_image_wider_or_taller_than_the_bound_is_rejected_naming_it() {
    let png = std::fs::read(fixtures().join("png.png")).expect("fixture");
    // IHDR: width at bytes 16..20, height at 20..24 (its CRC is not checked by a header probe).
    let with_side = |at: usize, side: u32| {
        let mut patched = png.clone();
        patched[at..at + 4].copy_from_slice(&side.to_be_bytes());
        probe_image(&patched)
    };
    let bound = MAX_IMAGE_SIDE as u32;
    for (at, side) in [(16, bound + 1), (20, bound + 1), (16, u32::MAX >> 1)] {
        let error = with_side(at, side).expect_err("over the bound");
        assert!(
            error.0.contains(&format!("{side}")) && error.0.ends_with("more than 20000 per side"),
            "{error}"
        );
    }
    let probed = with_side(16, bound).expect("at the bound");
    assert_eq!((probed.media.width, probed.media.height), (bound, 30));
}

/// A reader that counts the bytes read through it.
struct Counting {
    bytes: std::io::Cursor<Vec<u8>>,
    read: Arc<Mutex<u64>>,
}

impl Read for Counting {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.bytes.read(buffer)?;
        *self.read.lock().expect("not poisoned") += read as u64;
        Ok(read)
    }
}

impl Seek for Counting {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        self.bytes.seek(position)
    }
}

#[test]
fn the_probe_reads_at_most_its_budget_of_a_large_file_good_or_bad() {
    const LARGE: usize = 16 * 1024 * 1024;
    // A 16 MiB WAV (the fixture's samples repeated) and 16 MiB that no demuxer recognises: four budgets.
    let wav = testkit::media::sample_wav(LARGE / 2);
    let junk: Vec<u8> = b"JUNKDATA".iter().copied().cycle().take(LARGE).collect();
    for (name, bytes, playable) in [("long wav", wav, true), ("junk", junk, false)] {
        let read = Arc::new(Mutex::new(0));
        let size = bytes.len() as u64;
        let counting = Counting {
            bytes: std::io::Cursor::new(bytes),
            read: Arc::clone(&read),
        };
        let probed = probe(MediaClass::Audio, counting, size);
        assert_eq!(probed.is_ok(), playable, "{name}: {probed:?}");
        let read = *read.lock().expect("not poisoned");
        assert!(read <= READ_BUDGET, "{name}: read {read} bytes of {size}");
    }
}
