//! Audio: a recognised container with a decodable audio track, not cut short.

use super::chunks;
use super::rf64::Rf64;
use super::{
    AudioMedia, BUDGET_SPENT, Budgeted, MP3_FRAMES, NotMedia, PACKETS_TO_DECODE, ProbeError, Probeable,
    Probed, READ_BUDGET, ReadFailure, not_media,
};
use crate::content::{self, ContentType};
use std::io::{Read, Seek, SeekFrom};
use symphonia::core::codecs::CodecParameters;
use symphonia::core::codecs::audio::AudioDecoderOptions;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSource, MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

/// Probes `bytes` (positioned anywhere; `size` long) as audio.
pub fn probe_audio(bytes: impl Probeable + 'static, size: u64) -> Result<Probed<AudioMedia>, ProbeError> {
    let failed = ReadFailure::default();
    let probed = probe_budgeted(Budgeted::new(bytes, size, failed.clone()), size);
    // A failed read decides: what symphonia made of the bytes it lacked says nothing of the content.
    match failed.take() {
        Some(error) => Err(ProbeError::Unreadable(error)),
        None => probed.map_err(ProbeError::from),
    }
}

fn probe_budgeted(
    mut bytes: Budgeted<impl Probeable + 'static>,
    size: u64,
) -> Result<Probed<AudioMedia>, NotMedia> {
    if size == 0 {
        return Err(not_media("is empty"));
    }
    let unreadable = |error: std::io::Error| not_media(format!("cannot be read: {error}"));
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
                not_media(match chunks::promise(&leading) {
                    Some(promised) => format!(
                        "is truncated: its header promises {promised}, the file holds {size} bytes"
                    ),
                    None => format!("is truncated: the file ends at {size} bytes, inside what its headers describe"),
                })
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
    // first bitrate, and an ADTS stream's from its size and the mean size of frames sampled at
    // four places: say so.
    let duration_estimated =
        duration_ms.is_some() && (container == "aac" || codec == "mp3" && !has_vbr_header(&leading));
    if let Some(frames) = duration_frames {
        let data_start = chunks::audio_data_start(&leading);
        check_not_truncated(
            format.as_mut(),
            track.id,
            container,
            &params,
            frames,
            (data_start, size),
        )?;
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
        // Known to the demuxers, not decoded here: named so that the reason says which.
        CODEC_ID_ADPCM_IMA_WAV => "adpcm_ima_wav",
        CODEC_ID_ADPCM_MS => "adpcm_ms",
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
                "holds {codec} in {container}, which is not accepted (WAV, FLAC, MP3, Ogg Vorbis/Opus, M4A AAC/ALAC, AAC in ADTS, AIFF)"
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

/// For a WAV or AIFF, the data the header promises must be in the file after
/// the headers (`data_start`, where the file's `size` bytes begin their audio);
/// for a FLAC, the last quarter second must be reachable.
fn check_not_truncated(
    format: &mut dyn FormatReader,
    track: u32,
    container: &str,
    params: &symphonia::core::codecs::audio::AudioCodecParameters,
    frames: u64,
    (data_start, size): (u64, u64),
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
        if data_start + promised > size {
            return Err(not_media(format!(
                "is truncated: its header promises {promised} bytes of audio ({:.3} s) from byte {data_start}, the file holds {size} bytes",
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
