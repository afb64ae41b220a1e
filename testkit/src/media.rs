//! Test media from the fixtures in `tests/fixtures/media` (real encodings
//! made by `scripts/make-media-fixtures` with ffmpeg; `manifest.tsv` says what
//! ffprobe says of each). Nothing here encodes: a WAV of another length is the
//! WAV fixture with its data chunk cut or extended by repeating its samples.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result, ensure};

use crate::emulators::repository_root;

/// The WAV fixture that [`sample_wav`] and [`write_wav`] are made from.
pub const WAV_FIXTURE: &str = "wav-16bit.wav";
/// Its sample rate (16-bit PCM, mono; see `manifest.tsv`).
pub const WAV_SAMPLE_RATE: u32 = 44_100;
/// The PNG fixture that [`sample_png`] returns.
pub const PNG_FIXTURE: &str = "png.png";
/// Its width and height.
pub const PNG_SIZE: (u32, u32) = (40, 30);

/// The directory of the fixtures.
pub fn fixtures_dir() -> PathBuf {
    repository_root().join("tests/fixtures/media")
}

/// The bytes of the fixture `name`. Panics when it cannot be read (they are committed).
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read the fixture {}: {e}", path.display()))
}

/// One line of `manifest.tsv`: what ffprobe said of a good fixture (empty
/// where a field does not apply).
#[derive(Debug, Clone)]
pub struct Fixture {
    /// The file name.
    pub name: String,
    /// `audio` or `image`.
    pub kind: String,
    /// ffprobe's codec name.
    pub codec: String,
    /// Samples per second.
    pub sample_rate: String,
    /// Channel count.
    pub channels: String,
    /// Duration in milliseconds.
    pub duration_ms: Option<f64>,
    /// Image width.
    pub width: String,
    /// Image height.
    pub height: String,
}

/// Every line of `manifest.tsv`.
pub fn manifest() -> Result<Vec<Fixture>> {
    let text = std::fs::read_to_string(fixtures_dir().join("manifest.tsv"))?;
    text.lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            ensure!(fields.len() == 9, "manifest line {line:?}");
            Ok(Fixture {
                name: fields[0].into(),
                kind: fields[1].into(),
                codec: fields[3].into(),
                sample_rate: fields[4].into(),
                channels: fields[5].into(),
                duration_ms: fields[6].parse().ok(),
                width: fields[7].into(),
                height: fields[8].into(),
            })
        })
        .collect()
}

/// The WAV fixture split into everything before its data chunk's size field,
/// and its samples. (ffmpeg writes the data chunk last.)
fn wav_parts() -> &'static (Vec<u8>, Vec<u8>) {
    static PARTS: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    PARTS.get_or_init(|| {
        let wav = fixture(WAV_FIXTURE);
        let data = wav
            .windows(4)
            .position(|window| window == b"data")
            .expect("invariant: the WAV fixture has a data chunk");
        let head = wav[..data + 4].to_vec();
        (head, wav[data + 8..].to_vec())
    })
}

/// The bytes of a WAV header (the fixture's) for `data_len` bytes of samples.
fn wav_header(data_len: u64) -> Vec<u8> {
    let (head, _) = wav_parts();
    let mut header = head.clone();
    let size = |len: u64| u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes();
    header.extend_from_slice(&size(data_len));
    let riff = size(header.len() as u64 - 8 + data_len);
    header[4..8].copy_from_slice(&riff);
    header
}

/// The length of the header of [`sample_wav`] and [`write_wav`] files.
pub fn wav_header_len() -> usize {
    wav_parts().0.len() + 4
}

/// A valid WAV of [`WAV_FIXTURE`]'s format (16-bit PCM at [`WAV_SAMPLE_RATE`],
/// mono) with `samples` samples: its tone, repeated as needed. Files of
/// different lengths differ in content.
pub fn sample_wav(samples: usize) -> Vec<u8> {
    let (_, data) = wav_parts();
    let mut wav = wav_header(samples as u64 * 2);
    wav.extend(data.iter().copied().cycle().take(samples * 2));
    wav
}

/// The PNG fixture ([`PNG_FIXTURE`], [`PNG_SIZE`]).
pub fn sample_png() -> Vec<u8> {
    fixture(PNG_FIXTURE)
}

/// Writes a WAV of exactly `len` bytes to `path`, never all in memory: the
/// fixture's header with its data chunk extended by the fixture's samples,
/// repeated from sample `seed` on, so that files of the same length but
/// another seed differ.
pub fn write_wav(path: &Path, len: u64, seed: u64) -> Result<()> {
    let (_, data) = wav_parts();
    let header = wav_header(len.saturating_sub(wav_header_len() as u64));
    ensure!(
        len >= header.len() as u64,
        "a WAV of {len} bytes has no room for its header"
    );
    let start = (seed as usize * 2) % data.len();
    let samples = [&data[start..], &data[..start]].concat();
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    file.write_all(&header)?;
    let (mut remaining, mut at) = (len - header.len() as u64, 0);
    while remaining > 0 {
        let n = remaining.min((samples.len() - at) as u64) as usize;
        file.write_all(&samples[at..at + n])?;
        at = (at + n) % samples.len();
        remaining -= n as u64;
    }
    file.flush()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le32(bytes: &[u8], at: usize) -> u64 {
        u64::from(u32::from_le_bytes([
            bytes[at],
            bytes[at + 1],
            bytes[at + 2],
            bytes[at + 3],
        ]))
    }

    #[test]
    fn a_sample_wav_as_long_as_the_fixture_is_the_fixture() {
        let fixture = fixture(WAV_FIXTURE);
        assert_eq!(sample_wav((fixture.len() - wav_header_len()) / 2), fixture);
    }

    #[test]
    fn a_written_wav_has_the_length_asked_for_and_chunk_sizes_that_say_so() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (path, other) = (dir.path().join("a.wav"), dir.path().join("b.wav"));
        let len = 300_001;
        write_wav(&path, len, 1)?;
        write_wav(&other, len, 2)?;
        let (bytes, other) = (std::fs::read(&path)?, std::fs::read(&other)?);
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(le32(&bytes, 4), len - 8, "the RIFF size");
        assert_eq!(
            le32(&bytes, wav_header_len() - 4),
            len - wav_header_len() as u64,
            "the data size"
        );
        assert_ne!(bytes, other, "another seed, other samples");
        Ok(())
    }
}
