//! Media: what a file really is, found by opening it with a real demuxer
//! (symphonia) or reading its image header (imagesize), never by its name.
//!
//! [`probe_audio`] accepts only playable audio: a recognised container with
//! an audio track whose sample rate and channels are known, whose first
//! packets decode, and whose header does not promise more than the file
//! holds. [`probe_image`] accepts JPEG, PNG and WebP with sane dimensions.
//! Both read a bounded amount: headers, the first packets, and a seek where a
//! format needs one; never the whole file.
//!
//! The files: this one (what a probe finds, the read budget), `audio.rs`
//! (symphonia: container, codec, first packets, truncation), `chunks.rs`
//! (RIFF and AIFF chunk walks), `rf64.rs` (the RF64 header patched for
//! symphonia), `image.rs` (imagesize), `tests.rs` (the unit tests, against
//! the fixtures).

mod audio;
mod chunks;
mod image;
mod rf64;
#[cfg(test)]
mod tests;

pub use audio::probe_audio;
pub use image::probe_image;

use crate::content::{ContentType, MediaClass};
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex, PoisonError};
use symphonia::core::io::MediaSource;

/// Most bytes one probe may read (headers, first packets, a seek to the end).
pub const READ_BUDGET: u64 = 4 * 1024 * 1024;
/// The error a read past [`READ_BUDGET`] gets.
const BUDGET_SPENT: &str = "the probe read budget is spent";
/// Packets decoded to accept a stream (fewer if the stream has fewer).
const PACKETS_TO_DECODE: usize = 4;
/// Consecutive valid frames an MP3 needs.
const MP3_FRAMES: usize = 3;
/// Largest width or height of an accepted thumbnail.
pub const MAX_IMAGE_SIDE: usize = 20_000;

/// What a stored audio file holds; a field is `None` when the file does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudioMedia {
    /// The container: `wav`, `flac`, `mp3`, `ogg`, `mp4`, `aiff`, `aac` (ADTS).
    pub container: &'static str,
    /// The codec: `pcm_s16le`…, `flac`, `mp3`, `vorbis`, `opus`, `aac`, `alac`.
    pub codec: &'static str,
    /// Samples per second.
    pub sample_rate: u32,
    /// Channel count.
    pub channels: u16,
    /// Bits per sample, for PCM and lossless codecs.
    pub bits_per_sample: Option<u32>,
    /// Duration in milliseconds.
    pub duration_ms: Option<u64>,
    /// The duration was computed from the size and bitrate (an MP3 without a Xing/VBRI/Info header, ADTS AAC).
    pub duration_estimated: bool,
    /// Average bits per second over the whole file.
    pub bitrate: Option<u64>,
}

/// What a stored image is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageMedia {
    /// `jpeg`, `png` or `webp`.
    pub format: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A file that was probed: its canonical content type and what was learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed<M> {
    /// MIME type and canonical extension.
    pub content_type: ContentType,
    /// The technical description.
    pub media: M,
}

/// What a stored file holds: audio or an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Media {
    /// An audio track.
    Audio(AudioMedia),
    /// A cover image.
    Image(ImageMedia),
}

impl Media {
    /// The technical metadata that goes into the object's custom metadata (reserved keys).
    pub fn object_metadata(&self) -> Vec<(&'static str, String)> {
        match self {
            Media::Audio(audio) => {
                let mut entries = vec![
                    ("codec", audio.codec.to_string()),
                    ("sample-rate", audio.sample_rate.to_string()),
                    ("channels", audio.channels.to_string()),
                ];
                if let Some(duration) = audio.duration_ms {
                    entries.push(("duration-ms", duration.to_string()));
                }
                entries
            }
            Media::Image(image) => vec![
                ("width", image.width.to_string()),
                ("height", image.height.to_string()),
            ],
        }
    }
}

/// How many leading bytes an image probe reads (JPEG markers may follow large EXIF segments).
const IMAGE_HEAD: u64 = 512 * 1024;

/// Probes `bytes` (`size` long) as what `class` requires: playable audio, or a JPEG, PNG or WebP image.
pub fn probe(
    class: MediaClass,
    bytes: impl Probeable + 'static,
    size: u64,
) -> Result<Probed<Media>, ProbeError> {
    match class {
        MediaClass::Audio => probe_audio(bytes, size).map(|probed| Probed {
            content_type: probed.content_type,
            media: Media::Audio(probed.media),
        }),
        MediaClass::Image => {
            let mut head = Vec::with_capacity(size.min(IMAGE_HEAD) as usize);
            let mut bytes = bytes;
            bytes
                .seek(SeekFrom::Start(0))
                .and_then(|_| bytes.take(IMAGE_HEAD).read_to_end(&mut head))
                .map_err(ProbeError::Unreadable)?;
            probe_image(&head)
                .map(|probed| Probed {
                    content_type: probed.content_type,
                    media: Media::Image(probed.media),
                })
                .map_err(ProbeError::from)
        }
    }
}

/// Why a probe has no answer: the file is not acceptable media, or it could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Not playable audio or a usable image: the file's own fault.
    #[error(transparent)]
    NotMedia(#[from] NotMedia),
    /// A read failed (the file's I/O, or the storage under an object after its client's
    /// retries): nothing was learned of the content, so another attempt may succeed.
    #[error("cannot be read")]
    Unreadable(#[source] std::io::Error),
}

/// Why a file is not acceptable media: a one-line reason for `bad_content`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NotMedia(pub String);

fn not_media(reason: impl Into<String>) -> NotMedia {
    NotMedia(reason.into())
}

/// Bytes of a file to probe: readable, seekable, of a known length.
pub trait Probeable: Read + Seek + Send + Sync {}
impl<T: Read + Seek + Send + Sync> Probeable for T {}

/// A file's bytes with a read budget: reading past [`READ_BUDGET`] fails, so
/// a hostile file cannot make the probe read it all.
struct Budgeted<R> {
    inner: R,
    size: u64,
    left: u64,
    /// Where a failed read of `inner` is kept: symphonia turns every I/O error into
    /// its own verdict on the content, so the probe asks here whether it could read at all.
    failed: ReadFailure,
}

impl<R> Budgeted<R> {
    /// `inner` (`size` long) with [`READ_BUDGET`] to read, its read errors kept in `failed`.
    fn new(inner: R, size: u64, failed: ReadFailure) -> Budgeted<R> {
        Budgeted {
            inner,
            size,
            left: READ_BUDGET,
            failed,
        }
    }
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(BUDGET_SPENT));
        }
        let wanted = buffer.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buffer[..wanted]).map_err(|error| {
            if error.kind() == std::io::ErrorKind::Interrupted {
                error
            } else {
                self.failed.keep(error)
            }
        })?;
        self.left -= read as u64;
        Ok(read)
    }
}

/// The first read error of a probe's reader (the reader itself goes to symphonia).
#[derive(Debug, Clone, Default)]
struct ReadFailure(Arc<Mutex<Option<std::io::Error>>>);

impl ReadFailure {
    /// Keeps `error` if it is the first; returns its like for the reader's caller.
    fn keep(&self, error: std::io::Error) -> std::io::Error {
        let like = std::io::Error::new(error.kind(), error.to_string());
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(error);
        like
    }

    /// The error kept, if a read failed.
    fn take(&self) -> Option<std::io::Error> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl<R: Seek> Seek for Budgeted<R> {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(position)
    }
}

impl<R: Read + Seek + Send + Sync> MediaSource for Budgeted<R> {
    fn is_seekable(&self) -> bool {
        true
    }

    fn byte_len(&self) -> Option<u64> {
        Some(self.size)
    }
}
