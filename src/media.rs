//! Media: what a file really is, found by opening it with a real demuxer
//! (symphonia) or reading its image header (imagesize), never by its name.
//!
//! [`probe_audio`] accepts only playable audio: a recognised container with
//! an audio track whose sample rate and channels are known, whose first
//! packets decode, and whose header does not promise more than the file
//! holds. [`probe_image`] accepts JPEG, PNG and WebP with sane dimensions.
//! Both read a bounded amount: headers, the first packets, and a seek where a
//! format needs one; never the whole file.

use crate::content::{self, ContentType, MediaClass};
use std::io::{Read, Seek, SeekFrom};
use symphonia::core::codecs::CodecParameters;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

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
    /// The duration was computed from the size and bitrate (an MP3 without a Xing/VBRI/Info header).
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
) -> Result<Probed<Media>, NotMedia> {
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
                .map_err(|error| not_media(format!("cannot be read: {error}")))?;
            probe_image(&head).map(|probed| Probed {
                content_type: probed.content_type,
                media: Media::Image(probed.media),
            })
        }
    }
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
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(BUDGET_SPENT));
        }
        let wanted = buffer.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let read = self.inner.read(&mut buffer[..wanted])?;
        self.left -= read as u64;
        Ok(read)
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

/// Probes `bytes` (positioned anywhere; `size` long) as audio.
pub fn probe_audio(bytes: impl Probeable + 'static, size: u64) -> Result<Probed<AudioMedia>, NotMedia> {
    if size == 0 {
        return Err(not_media("is empty"));
    }
    let unreadable = |error: std::io::Error| not_media(format!("cannot be read: {error}"));
    let mut bytes = Budgeted {
        inner: bytes,
        size,
        left: READ_BUDGET,
    };
    let leading = leading_bytes(&mut bytes).map_err(unreadable)?;
    let rf64 = Rf64::read(&leading);
    bytes.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let source: Box<dyn MediaSource> = match &rf64 {
        Some(rf64) => Box::new(rf64.as_wav(bytes)),
        None => Box::new(bytes),
    };
    let stream = MediaSourceStream::new(source, MediaSourceStreamOptions::default());
    let mut format = symphonia::default::get_probe()
        .probe(
            &Hint::new(),
            stream,
            FormatOptions::default(),
            MetadataOptions::default(),
        )
        .map_err(|error| match error {
            symphonia::core::errors::Error::IoError(error)
                if error.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                not_media(format!(
                    "is truncated: the file ends at {size} bytes, inside what its headers describe"
                ))
            }
            symphonia::core::errors::Error::IoError(error) if error.to_string() == BUDGET_SPENT => not_media(format!(
                "cannot be probed within {} MiB of reading (an ID3v2 tag or header that large, e.g. a huge embedded picture)",
                READ_BUDGET / (1024 * 1024)
            )),
            error => not_media(format!("is not a recognised audio container ({error})")),
        })?;
    let container = container_name(format.format_info().short_name);
    let track = format
        .default_track(TrackType::Audio)
        .or_else(|| format.first_track(TrackType::Audio))
        .ok_or_else(|| not_media(format!("has no audio track ({container} container)")))?
        .clone();
    let Some(CodecParameters::Audio(params)) = track.codec_params.clone() else {
        return Err(not_media(format!(
            "has an audio track without codec parameters ({container})"
        )));
    };
    let sample_rate = params
        .sample_rate
        .filter(|rate| *rate > 0)
        .ok_or_else(|| not_media(format!("does not say its sample rate ({container})")))?;
    let channels = params
        .channels
        .as_ref()
        .map(|channels| channels.count())
        .filter(|count| *count > 0)
        .ok_or_else(|| not_media(format!("does not say its channels ({container})")))?;
    let codec = codec_name(&params);
    let content_type = content_type_of(container, codec)?;

    let frames = first_packets(format.as_mut(), track.id, &params, codec)?;
    if frames == 0 {
        return Err(not_media(format!("has no audio frames ({container}, {codec})")));
    }
    if codec == "mp3" && frames < MP3_FRAMES {
        return Err(not_media(format!(
            "has {frames} valid MP3 frame(s), at least {MP3_FRAMES} consecutive ones are needed"
        )));
    }

    let frame_bytes = params.channels.as_ref().map_or(1, |c| c.count()) as u64
        * u64::from(
            params
                .bits_per_coded_sample
                .or(params.bits_per_sample)
                .unwrap_or(8),
        )
        .div_ceil(8);
    let duration_frames = match &rf64 {
        Some(rf64) => Some(rf64.data_size / frame_bytes.max(1)),
        None => track.num_frames,
    };
    let duration_frames = duration_frames.or_else(|| {
        let (time_base, duration) = (track.time_base?, track.duration?);
        let time = time_base.calc_duration(duration)?;
        Some((time.as_secs_f64() * f64::from(sample_rate)).round() as u64)
    });
    let duration_ms = duration_frames.map(|frames| frames * 1_000 / u64::from(sample_rate));
    // Without a Xing/Info/VBRI header the demuxer computes an MP3's length from its size and
    // first bitrate: say so.
    let duration_estimated = codec == "mp3" && duration_ms.is_some() && !has_vbr_header(&leading);
    if let Some(frames) = duration_frames {
        check_not_truncated(format.as_mut(), track.id, container, &params, frames, size)?;
    }
    let bitrate = duration_ms.filter(|ms| *ms > 0).map(|ms| size * 8 * 1_000 / ms);
    Ok(Probed {
        content_type,
        media: AudioMedia {
            container,
            codec,
            sample_rate,
            channels: u16::try_from(channels).unwrap_or(u16::MAX),
            bits_per_sample: params.bits_per_sample,
            duration_ms,
            duration_estimated,
            bitrate,
        },
    })
}

/// The container's name as audio-store reports it.
fn container_name(short_name: &'static str) -> &'static str {
    match short_name {
        "wave" => "wav",
        "isomp4" => "mp4",
        "mp1" | "mp2" | "mp3" => "mp3",
        "adts" => "aac",
        other => other,
    }
}

fn codec_name(params: &symphonia::core::codecs::audio::AudioCodecParameters) -> &'static str {
    use symphonia::core::codecs::audio::well_known::*;
    match params.codec {
        CODEC_ID_FLAC => "flac",
        CODEC_ID_MP3 => "mp3",
        CODEC_ID_MP2 => "mp2",
        CODEC_ID_MP1 => "mp1",
        CODEC_ID_VORBIS => "vorbis",
        CODEC_ID_OPUS => "opus",
        CODEC_ID_AAC => "aac",
        CODEC_ID_ALAC => "alac",
        CODEC_ID_PCM_U8 => "pcm_u8",
        CODEC_ID_PCM_S8 => "pcm_s8",
        CODEC_ID_PCM_S16LE => "pcm_s16le",
        CODEC_ID_PCM_S16BE => "pcm_s16be",
        CODEC_ID_PCM_S24LE => "pcm_s24le",
        CODEC_ID_PCM_S24BE => "pcm_s24be",
        CODEC_ID_PCM_S32LE => "pcm_s32le",
        CODEC_ID_PCM_S32BE => "pcm_s32be",
        CODEC_ID_PCM_F32LE => "pcm_f32le",
        CODEC_ID_PCM_F32BE => "pcm_f32be",
        CODEC_ID_PCM_F64LE => "pcm_f64le",
        CODEC_ID_PCM_F64BE => "pcm_f64be",
        CODEC_ID_PCM_ALAW => "pcm_alaw",
        CODEC_ID_PCM_MULAW => "pcm_mulaw",
        _ => "other",
    }
}

/// The canonical content type of a container and codec, or why it is not accepted.
fn content_type_of(container: &str, codec: &str) -> Result<ContentType, NotMedia> {
    let name = match (container, codec) {
        ("wav", _) => "wav",
        ("aiff", _) => "aiff",
        ("flac", "flac") => "flac",
        ("mp3", "mp3") => "mp3",
        ("ogg", "opus") => "opus",
        ("ogg", "vorbis" | "flac") => "ogg",
        ("mp4", "aac" | "alac") => "m4a",
        ("aac", "aac") => "aac",
        (container, codec) => {
            return Err(not_media(format!(
                "holds {codec} in {container}, which is not accepted (WAV, FLAC, MP3, Ogg Vorbis/Opus, M4A AAC/ALAC, AIFF)"
            )));
        }
    };
    content::from_extension(name).ok_or_else(|| not_media(format!("{container}/{codec} has no content type")))
}

/// Reads (and, where a decoder exists, decodes) the first packets of `track`;
/// returns how many were good. Opus, which has no decoder here, must have a
/// valid `OpusHead` and packets in Ogg pages whose checksums verify (the Ogg
/// demuxer drops pages whose CRC does not match).
fn first_packets(
    format: &mut dyn FormatReader,
    track: u32,
    params: &symphonia::core::codecs::audio::AudioCodecParameters,
    codec: &str,
) -> Result<usize, NotMedia> {
    let mut decoder = if codec == "opus" {
        let head = params.extra_data.as_deref().unwrap_or_default();
        if !head.starts_with(b"OpusHead") || head.len() < 19 || head[8] == 0 || head[8] > 15 {
            return Err(not_media("is Opus without a valid OpusHead"));
        }
        None
    } else {
        Some(
            symphonia::default::get_codecs()
                .make_audio_decoder(params, &AudioDecoderOptions::default())
                .map_err(|error| {
                    not_media(format!("uses {codec}, which cannot be decoded here ({error})"))
                })?,
        )
    };
    let wanted = if codec == "mp3" {
        MP3_FRAMES.max(PACKETS_TO_DECODE)
    } else {
        PACKETS_TO_DECODE
    };
    let mut good = 0;
    while good < wanted {
        let packet = match format.next_packet() {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            Err(symphonia::core::errors::Error::IoError(error))
                if error.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                break;
            }
            Err(error) if good == 0 => return Err(not_media(format!("cannot be demuxed ({error})"))),
            Err(_) => break,
        };
        if packet.track_id != track {
            continue;
        }
        if let Some(decoder) = decoder.as_mut() {
            decoder.decode(&packet).map_err(|error| {
                not_media(format!("does not decode: {codec} packet {} ({error})", good + 1))
            })?;
        }
        good += 1;
    }
    Ok(good)
}

/// For a WAV or AIFF, the data the header promises must be in the file; for
/// any other format with a known length, the last second must be reachable.
fn check_not_truncated(
    format: &mut dyn FormatReader,
    track: u32,
    container: &str,
    params: &symphonia::core::codecs::audio::AudioCodecParameters,
    frames: u64,
    size: u64,
) -> Result<(), NotMedia> {
    let sample_rate = u64::from(params.sample_rate.unwrap_or(1));
    let seconds = |frames: u64| frames as f64 / sample_rate as f64;
    if matches!(container, "wav" | "aiff") {
        let channels = params.channels.as_ref().map_or(1, |c| c.count()) as u64;
        let bytes_per_sample = u64::from(
            params
                .bits_per_coded_sample
                .or(params.bits_per_sample)
                .unwrap_or(8),
        )
        .div_ceil(8);
        let promised = frames * channels * bytes_per_sample;
        if promised > size {
            return Err(not_media(format!(
                "is truncated: its header promises {promised} bytes of audio ({:.3} s), the file holds {size} bytes",
                seconds(frames)
            )));
        }
        return Ok(());
    }
    if container != "flac" {
        return Ok(());
    }
    // A FLAC's STREAMINFO says how many samples there are: the last of them must be there.
    // Seek to the last quarter second and read to the end.
    let from = frames.saturating_sub(sample_rate / 4);
    let seeked = format.seek(
        symphonia::core::formats::SeekMode::Coarse,
        symphonia::core::formats::SeekTo::Timestamp {
            ts: symphonia::core::units::Timestamp::new(i64::try_from(from).unwrap_or(i64::MAX)),
            track_id: track,
        },
    );
    let mut reached = 0_u64;
    if seeked.is_ok() {
        while let Ok(Some(packet)) = format.next_packet() {
            if packet.track_id == track {
                let end = packet.pts.get().max(0) as u64 + packet.dur.get();
                reached = reached.max(end);
            }
        }
    }
    if reached < frames {
        return Err(not_media(format!(
            "is truncated: its header promises {:.3} s of audio ({frames} samples), the stream ends at {:.3} s ({size} bytes)",
            seconds(frames),
            seconds(reached)
        )));
    }
    Ok(())
}

/// How far into a file (after an ID3v2 tag) the first MPEG frame and its VBR header are looked for.
const LEADING_LEN: usize = 8 * 1024;

/// The first bytes of a file, and of its audio after an ID3v2 tag if it has one (those are
/// where an MP3's Xing/Info/VBRI header and an RF64's `ds64` chunk live).
fn leading_bytes(bytes: &mut (impl Read + Seek)) -> std::io::Result<Vec<u8>> {
    let mut header = [0_u8; 10];
    bytes.seek(SeekFrom::Start(0))?;
    let got = read_up_to(bytes, &mut header)?;
    let mut start = 0;
    if got == 10 && header.starts_with(b"ID3") {
        // A syncsafe size (7 bits a byte), plus the header and, when flagged, a footer.
        let tag = header[6..10]
            .iter()
            .fold(0_u64, |size, byte| size << 7 | u64::from(byte & 0x7f));
        start = 10 + tag + if header[5] & 0x10 != 0 { 10 } else { 0 };
    }
    bytes.seek(SeekFrom::Start(start))?;
    let mut leading = vec![0_u8; LEADING_LEN];
    let got = read_up_to(bytes, &mut leading)?;
    leading.truncate(got);
    Ok(leading)
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// Whether an MP3's first frame carries a Xing, Info or VBRI header (its frame count).
fn has_vbr_header(leading: &[u8]) -> bool {
    [b"Xing", b"Info", b"VBRI"]
        .iter()
        .any(|tag| leading.windows(4).any(|window| window == *tag))
}

/// An RF64 file (a WAV over 4 GiB): the WAV demuxer does not know it, so it is
/// shown one with `RIFF` instead of `RF64` and the 32-bit sizes (0xFFFFFFFF
/// in RF64) filled in from the `ds64` chunk, capped at 4 GiB; its real data
/// size gives the duration.
struct Rf64 {
    /// The audio data's size from `ds64`.
    data_size: u64,
    /// Byte ranges to show differently: offset and the bytes there.
    patches: Vec<(u64, [u8; 4])>,
}

impl Rf64 {
    /// `Some` for an RF64 file with a `ds64` chunk and a `data` chunk within the first bytes.
    fn read(leading: &[u8]) -> Option<Rf64> {
        if !(leading.starts_with(b"RF64") && leading.get(8..12) == Some(b"WAVE")) {
            return None;
        }
        let u32_at = |at: usize| {
            leading
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let u64_at = |at: usize| {
            leading
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        };
        if leading.get(12..16) != Some(b"ds64") {
            return None;
        }
        let (riff_size, data_size) = (u64_at(20)?, u64_at(28)?);
        let capped = |size: u64| {
            u32::try_from(size)
                .unwrap_or(u32::MAX - 1)
                .min(u32::MAX - 1)
                .to_le_bytes()
        };
        let mut patches = vec![(0, *b"RIFF"), (4, capped(riff_size))];
        // Walk the chunks to the `data` chunk's size field.
        let mut at = 12_usize;
        while let (Some(id), Some(size)) = (leading.get(at..at + 4), u32_at(at + 4)) {
            if id == b"data" {
                patches.push((at as u64 + 4, capped(data_size)));
                return Some(Rf64 { data_size, patches });
            }
            at += 8 + size as usize + (size as usize & 1);
        }
        None
    }

    fn as_wav<R: Read + Seek + Send + Sync>(&self, inner: R) -> Patched<R> {
        Patched {
            inner,
            patches: self.patches.clone(),
        }
    }
}

/// A reader that shows some 4-byte ranges differently.
struct Patched<R> {
    inner: R,
    patches: Vec<(u64, [u8; 4])>,
}

impl<R: Read + Seek> Read for Patched<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let position = self.inner.stream_position()?;
        let read = self.inner.read(buffer)?;
        for (offset, bytes) in &self.patches {
            for (index, byte) in bytes.iter().enumerate() {
                let at = offset + index as u64;
                if at >= position && at < position + read as u64 {
                    buffer[(at - position) as usize] = *byte;
                }
            }
        }
        Ok(read)
    }
}

impl<R: Seek> Seek for Patched<R> {
    fn seek(&mut self, position: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(position)
    }
}

impl<R: Read + Seek + Send + Sync + MediaSource> MediaSource for Patched<R> {
    fn is_seekable(&self) -> bool {
        true
    }

    fn byte_len(&self) -> Option<u64> {
        self.inner.byte_len()
    }
}

/// Probes the head of an image (the first bytes suffice for JPEG, PNG and WebP).
pub fn probe_image(head: &[u8]) -> Result<Probed<ImageMedia>, NotMedia> {
    if head.is_empty() {
        return Err(not_media("is empty"));
    }
    let (format, name) = match imagesize::image_type(head) {
        Ok(imagesize::ImageType::Jpeg) => ("jpeg", "jpg"),
        Ok(imagesize::ImageType::Png) => ("png", "png"),
        Ok(imagesize::ImageType::Webp) => ("webp", "webp"),
        Ok(other) => {
            return Err(not_media(format!("is a {other:?} image, not JPEG, PNG or WebP")));
        }
        Err(_) => return Err(not_media("is not a recognised image (JPEG, PNG or WebP)")),
    };
    let size = imagesize::blob_size(head)
        .map_err(|error| not_media(format!("is a {format} image whose size cannot be read ({error})")))?;
    if size.width == 0 || size.height == 0 {
        return Err(not_media(format!(
            "is a {format} image of {}x{} pixels",
            size.width, size.height
        )));
    }
    if size.width > MAX_IMAGE_SIDE || size.height > MAX_IMAGE_SIDE {
        return Err(not_media(format!(
            "is a {format} image of {}x{} pixels, more than {MAX_IMAGE_SIDE} per side",
            size.width, size.height
        )));
    }
    let content_type = content::from_extension(name).ok_or_else(|| not_media("no content type"))?;
    Ok(Probed {
        content_type,
        media: ImageMedia {
            format,
            width: size.width as u32,
            height: size.height as u32,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/media")
    }

    fn probe_file(name: &str) -> Result<Probed<AudioMedia>, NotMedia> {
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
                    let estimated = name == "mp3-cbr-bare.mp3" || name == "mp3-leading-junk.mp3";
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
            assert!(error.0.contains("truncated"), "{percent}%: {error}");
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
            error.0.contains("no audio frames") || error.0.contains("crc mismatch"),
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
        assert!(error.0.starts_with("cannot be probed within 4 MiB"), "{error}");
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
}
