//! Content sniffing: what a file's leading bytes say it is.
//!
//! [`sniff`] looks at up to [`SNIFF_LEN`] leading bytes and recognises the
//! audio and image formats the store accepts by their magic bytes. The file
//! extension is only a fallback: it is consulted when no magic matched and the
//! bytes are neither empty nor text, so a text file named `song.mp3` is never
//! taken for audio, while an unrecognised binary named `song.mp3` is.
//!
//! Recognised: WAV, FLAC, MP3 (ID3 tag or MPEG audio frame), Ogg (Vorbis and
//! others as `audio/ogg`, Opus as `audio/opus`), AAC (ADTS), MP4 audio, AIFF,
//! JPEG, PNG and WebP.

/// Whether a content type is audio or an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaClass {
    /// A sound recording.
    Audio,
    /// A picture, such as cover art.
    Image,
}

/// A recognised media type.
///
/// Obtained from [`sniff`] or [`from_extension`]; two values are equal when they
/// name the same format, so aliases such as `jpeg` and `jpg` compare equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentType {
    /// The MIME type, e.g. `audio/flac`.
    pub mime: &'static str,
    /// The canonical file extension without the dot, e.g. `flac`, `jpg`.
    pub extension: &'static str,
    /// Audio or image.
    pub class: MediaClass,
}

/// How many leading bytes `sniff` looks at; callers read at most this many.
///
/// Longer inputs are accepted, but bytes past this length are ignored.
pub const SNIFF_LEN: usize = 4096;

const WAV: ContentType = media("audio/wav", "wav", MediaClass::Audio);
const FLAC: ContentType = media("audio/flac", "flac", MediaClass::Audio);
const MPEG: ContentType = media("audio/mpeg", "mp3", MediaClass::Audio);
const OGG: ContentType = media("audio/ogg", "ogg", MediaClass::Audio);
const OPUS: ContentType = media("audio/opus", "opus", MediaClass::Audio);
const AAC: ContentType = media("audio/aac", "aac", MediaClass::Audio);
const MP4: ContentType = media("audio/mp4", "m4a", MediaClass::Audio);
const AIFF: ContentType = media("audio/aiff", "aiff", MediaClass::Audio);
const JPEG: ContentType = media("image/jpeg", "jpg", MediaClass::Image);
const PNG: ContentType = media("image/png", "png", MediaClass::Image);
const WEBP: ContentType = media("image/webp", "webp", MediaClass::Image);

/// Every content type the store accepts, one per canonical extension.
pub const ALL: [ContentType; 11] = [WAV, FLAC, MPEG, OGG, OPUS, MP4, AAC, AIFF, JPEG, PNG, WEBP];

/// The accepted content types of one class (the names an object of that kind can have).
pub fn of_class(class: MediaClass) -> impl Iterator<Item = ContentType> {
    ALL.into_iter()
        .filter(move |content_type| content_type.class == class)
}

/// Fixed signatures: the bytes a file starts with, the bytes at offset 8, and what they mean.
const SIGNATURES: [(&[u8], &[u8], ContentType); 8] = [
    (b"RIFF", b"WAVE", WAV),
    (b"RF64", b"WAVE", WAV),
    (b"RIFF", b"WEBP", WEBP),
    (b"FORM", b"AIFF", AIFF),
    (b"FORM", b"AIFC", AIFF),
    (b"fLaC", b"", FLAC),
    (b"\x89PNG\r\n\x1a\n", b"", PNG),
    (&[0xFF, 0xD8, 0xFF], b"", JPEG),
];

const AUDIO_MP4_BRANDS: [&[u8]; 5] = [b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "];
const GENERIC_MP4_BRANDS: [&[u8]; 5] = [b"isom", b"mp41", b"mp42", b"iso2", b"dash"];
const AUDIO_MP4_EXTENSIONS: [&str; 4] = ["m4a", "mp4", "aac", "m4b"];

/// How far into the head an MPEG audio frame may start after junk bytes.
const MPEG_JUNK_LIMIT: usize = 1024;

/// Bitrates in kbit/s for bitrate indexes 1 to 14: MPEG 1 layers I, II and III, then
/// MPEG 2 and 2.5 layer I, then MPEG 2 and 2.5 layers II and III.
#[rustfmt::skip]
const MPEG_KBPS: [[usize; 14]; 5] = [
    [32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448],
    [32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384],
    [32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320],
    [32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256],
    [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
];

/// A content type from its parts, for the constants above.
const fn media(mime: &'static str, extension: &'static str, class: MediaClass) -> ContentType {
    ContentType {
        mime,
        extension,
        class,
    }
}

/// Recognises the content type from the leading bytes, falling back to the extension.
///
/// Magic bytes always win. The extension (without the dot, any case) is only
/// used when no magic matched and `head` is neither empty nor text.
pub fn sniff(head: &[u8], extension: Option<&str>) -> Option<ContentType> {
    let head = &head[..head.len().min(SNIFF_LEN)];
    if let Some(content_type) = sniff_magic(head, extension) {
        return Some(content_type);
    }
    if head.is_empty() || looks_like_text(head) {
        return None;
    }
    extension.and_then(from_extension)
}

/// The content type a (lowercase or not, without dot) file extension names, if any.
///
/// Aliases map to the canonical type: `jpeg` is `jpg`, `oga` is `ogg`,
/// `m4b` is `m4a`, and `aif`/`aifc` are `aiff`.
pub fn from_extension(extension: &str) -> Option<ContentType> {
    match extension.to_ascii_lowercase().as_str() {
        "wav" => Some(WAV),
        "flac" => Some(FLAC),
        "mp3" => Some(MPEG),
        "ogg" | "oga" => Some(OGG),
        "opus" => Some(OPUS),
        "m4a" | "m4b" => Some(MP4),
        "aac" => Some(AAC),
        "aif" | "aiff" | "aifc" => Some(AIFF),
        "jpg" | "jpeg" => Some(JPEG),
        "png" => Some(PNG),
        "webp" => Some(WEBP),
        _ => None,
    }
}

/// The content type the magic bytes of `head` name; the extension only qualifies generic MP4.
fn sniff_magic(head: &[u8], extension: Option<&str>) -> Option<ContentType> {
    let at_offset_8 = head.get(8..).unwrap_or_default();
    let signature = SIGNATURES
        .iter()
        .find(|(start, at_8, _)| head.starts_with(start) && at_offset_8.starts_with(at_8));
    if let Some(&(_, _, content_type)) = signature {
        return Some(content_type);
    }
    if head.starts_with(b"OggS") {
        return Some(ogg_type(head));
    }
    if let Some(tag_length) = id3_tag_length(head) {
        return Some(audio_after_id3_tag(head, tag_length).unwrap_or(MPEG));
    }
    mp4_type(head, extension)
        .or_else(|| is_adts(head).then_some(AAC))
        .or_else(|| is_mpeg_audio(head).then_some(MPEG))
}

/// Whether `bytes` holds `magic` starting at `offset`.
fn has_at(bytes: &[u8], offset: usize, magic: &[u8]) -> bool {
    bytes.get(offset..).is_some_and(|rest| rest.starts_with(magic))
}

/// Whether the head is (possibly truncated) UTF-8 without control characters besides whitespace.
fn looks_like_text(head: &[u8]) -> bool {
    let valid_len = match std::str::from_utf8(head) {
        Ok(_) => head.len(),
        // A multi-byte character cut off by the end of the head still counts as text.
        Err(error) if error.error_len().is_none() => error.valid_up_to(),
        Err(_) => return false,
    };
    std::str::from_utf8(&head[..valid_len]).is_ok_and(|text| {
        text.chars()
            .all(|character| !character.is_control() || matches!(character, '\t' | '\n' | '\r' | '\x0c'))
    })
}

/// Opus when the first Ogg page carries an `OpusHead` packet, plain Ogg otherwise.
fn ogg_type(head: &[u8]) -> ContentType {
    let segment_count = head.get(26).map_or(0, |&count| usize::from(count));
    if has_at(head, 27 + segment_count, b"OpusHead") {
        OPUS
    } else {
        OGG
    }
}

/// The full length of the `ID3v2` tag at the start of the head, if there is one.
fn id3_tag_length(head: &[u8]) -> Option<usize> {
    let [b'I', b'D', b'3', major_version, _, flags, ref size @ ..] = *head.get(..10)? else {
        return None;
    };
    if !(2..=4).contains(&major_version) || size.iter().any(|byte| byte & 0x80 != 0) {
        return None;
    }
    let body_length = size
        .iter()
        .fold(0, |length, &byte| (length << 7) | usize::from(byte));
    let footer_length = if flags & 0x10 == 0 { 0 } else { 10 };
    Some(10 + body_length + footer_length)
}

/// The audio format behind an ID3 tag (FLAC and AAC files sometimes carry one), if visible.
fn audio_after_id3_tag(head: &[u8], tag_length: usize) -> Option<ContentType> {
    let content_type = sniff_magic(head.get(tag_length..)?, None)?;
    (content_type.class == MediaClass::Audio).then_some(content_type)
}

/// MP4 audio when the `ftyp` box names an audio brand, or a generic brand with an audio extension.
fn mp4_type(head: &[u8], extension: Option<&str>) -> Option<ContentType> {
    if !has_at(head, 4, b"ftyp") {
        return None;
    }
    let box_length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let box_end = usize::try_from(box_length).map_or(head.len(), |length| length.min(head.len()));
    let major_brand = head.get(8..12)?;
    // Compatible brands follow the major brand and the four-byte minor version.
    let compatible_brands = head.get(16..box_end).unwrap_or_default();
    if std::iter::once(major_brand)
        .chain(compatible_brands.chunks_exact(4))
        .any(|brand| AUDIO_MP4_BRANDS.contains(&brand))
    {
        return Some(MP4);
    }
    let has_audio_extension = extension.is_some_and(|extension| {
        AUDIO_MP4_EXTENSIONS
            .iter()
            .any(|audio_extension| audio_extension.eq_ignore_ascii_case(extension))
    });
    (GENERIC_MP4_BRANDS.contains(&major_brand) && has_audio_extension).then_some(MP4)
}

/// Whether the head starts with an AAC ADTS header: 12-bit sync, layer 0, known sample rate.
fn is_adts(head: &[u8]) -> bool {
    let [0xFF, second, third, ..] = *head else {
        return false;
    };
    second & 0xF6 == 0xF0 && (third >> 2) & 0x0F < 13
}

/// Whether the head holds an MPEG audio frame at the start, or two in a row after a little junk.
fn is_mpeg_audio(head: &[u8]) -> bool {
    if mpeg_frame_length(head).is_some() {
        return true;
    }
    (1..head.len().min(MPEG_JUNK_LIMIT)).any(|offset| {
        mpeg_frame_length(&head[offset..]).is_some_and(|frame_length| {
            head.get(offset + frame_length..)
                .and_then(mpeg_frame_length)
                .is_some()
        })
    })
}

/// The length in bytes of the MPEG audio frame whose header starts `bytes`, if the header is valid.
fn mpeg_frame_length(bytes: &[u8]) -> Option<usize> {
    let [0xFF, second, third, _, ..] = *bytes else {
        return None;
    };
    // Version: 0 is MPEG 2.5, 1 reserved, 2 MPEG 2, 3 MPEG 1. Layer: 0 reserved, 1 III, 2 II, 3 I.
    let version = (second >> 3) & 0b11;
    let layer = (second >> 1) & 0b11;
    let bitrate_index = usize::from(third >> 4);
    let sample_rate_index = usize::from((third >> 2) & 0b11);
    let padding = usize::from((third >> 1) & 1);
    let reserved = version == 1 || layer == 0 || sample_rate_index == 3;
    if second & 0xE0 != 0xE0 || reserved || bitrate_index == 0 || bitrate_index == 15 {
        return None;
    }
    let is_mpeg1 = version == 3;
    let table = match (is_mpeg1, layer) {
        (true, 3) => 0,
        (true, 2) => 1,
        (true, _) => 2,
        (false, 3) => 3,
        (false, _) => 4,
    };
    let bitrate = MPEG_KBPS[table][bitrate_index - 1] * 1000;
    let sample_rate_divisor = match version {
        3 => 1,
        2 => 2,
        _ => 4,
    };
    let sample_rate = [44_100, 48_000, 32_000][sample_rate_index] / sample_rate_divisor;
    let frame_length = match layer {
        3 => (12 * bitrate / sample_rate + padding) * 4,
        1 if !is_mpeg1 => 72 * bitrate / sample_rate + padding,
        _ => 144 * bitrate / sample_rate + padding,
    };
    Some(frame_length)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAV_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.wav");
    const FLAC_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.flac");
    const MP3_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.mp3");
    const MP3_WITHOUT_ID3_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone-noid3.mp3");
    const VORBIS_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.ogg");
    const OPUS_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.opus");
    const M4A_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.m4a");
    const ISOM_MP4_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone-isom.mp4");
    const ADTS_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.aac");
    const AIFF_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/tone.aiff");
    const JPEG_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/cover.jpg");
    const PNG_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/cover.png");
    const WEBP_HEAD: &[u8] = include_bytes!("../tests/fixtures/headers/cover.webp");

    /// Bytes that match no magic and are not text.
    const UNKNOWN_BINARY: &[u8] = &[0x00, 0x01, 0x02, 0x03, 0x10, 0x20, 0x7F, 0x80, 0xFE];

    #[test]
    fn a_wav_header_is_audio_wav() {
        assert_eq!(sniff(WAV_HEAD, None), Some(WAV));
    }

    #[test]
    fn a_flac_header_is_audio_flac() {
        assert_eq!(sniff(FLAC_HEAD, None), Some(FLAC));
    }

    #[test]
    fn an_mp3_with_an_id3_tag_is_audio_mpeg() {
        assert_eq!(sniff(MP3_HEAD, None), Some(MPEG));
    }

    #[test]
    fn an_mp3_without_an_id3_tag_is_audio_mpeg() {
        assert_eq!(sniff(MP3_WITHOUT_ID3_HEAD, None), Some(MPEG));
    }

    #[test]
    fn an_mp3_after_a_short_junk_prefix_is_audio_mpeg() {
        let head = [[0u8; 100].as_slice(), MP3_WITHOUT_ID3_HEAD].concat();
        assert_eq!(sniff(&head, None), Some(MPEG));
    }

    #[test]
    fn an_mp3_frame_far_past_the_start_is_not_found() {
        let head = [[0u8; 2000].as_slice(), MP3_WITHOUT_ID3_HEAD].concat();
        assert_eq!(sniff(&head, None), None);
    }

    #[test]
    fn an_mpeg_frame_header_with_a_reserved_bitrate_is_not_audio() {
        assert_eq!(sniff(&[0xFF, 0xFB, 0xF0, 0x00], None), None);
    }

    #[test]
    fn a_flac_behind_an_id3_tag_is_audio_flac() {
        let head = [b"ID3\x04\0\0\0\0\0\0".as_slice(), FLAC_HEAD].concat();
        assert_eq!(sniff(&head, None), Some(FLAC));
    }

    #[test]
    fn an_ogg_vorbis_header_is_audio_ogg() {
        assert_eq!(sniff(VORBIS_HEAD, None), Some(OGG));
    }

    #[test]
    fn an_ogg_opus_header_is_audio_opus() {
        assert_eq!(sniff(OPUS_HEAD, None), Some(OPUS));
        assert_eq!(sniff(OPUS_HEAD, Some("ogg")), Some(OPUS));
    }

    #[test]
    fn an_m4a_header_is_audio_mp4() {
        assert_eq!(sniff(M4A_HEAD, None), Some(MP4));
    }

    #[test]
    fn a_generic_mp4_is_audio_only_with_an_audio_extension() {
        assert_eq!(sniff(ISOM_MP4_HEAD, Some("mp4")), Some(MP4));
        assert_eq!(sniff(ISOM_MP4_HEAD, Some("M4A")), Some(MP4));
        assert_eq!(sniff(ISOM_MP4_HEAD, None), None);
        assert_eq!(sniff(ISOM_MP4_HEAD, Some("mov")), None);
    }

    #[test]
    fn an_adts_header_is_audio_aac() {
        assert_eq!(sniff(ADTS_HEAD, None), Some(AAC));
    }

    #[test]
    fn an_aiff_header_is_audio_aiff() {
        assert_eq!(sniff(AIFF_HEAD, None), Some(AIFF));
    }

    #[test]
    fn a_jpeg_header_is_image_jpeg() {
        assert_eq!(sniff(JPEG_HEAD, None), Some(JPEG));
    }

    #[test]
    fn a_png_header_is_image_png() {
        assert_eq!(sniff(PNG_HEAD, None), Some(PNG));
    }

    #[test]
    fn a_webp_header_is_image_webp() {
        assert_eq!(sniff(WEBP_HEAD, None), Some(WEBP));
    }

    #[test]
    fn a_text_file_named_mp3_is_not_audio() {
        let playlist = b"# playlist\r\none.flac\ttwo.flac\x0c\n";
        assert_eq!(sniff(playlist, Some("mp3")), None);
    }

    #[test]
    fn text_cut_inside_a_multibyte_character_is_still_text() {
        let text = "caf\u{e9} \u{266b}".as_bytes();
        assert_eq!(sniff(&text[..text.len() - 1], Some("mp3")), None);
    }

    #[test]
    fn an_empty_file_is_not_recognised() {
        assert_eq!(sniff(b"", Some("flac")), None);
        assert_eq!(sniff(b"", None), None);
    }

    #[test]
    fn unknown_binary_falls_back_to_the_extension() {
        assert_eq!(sniff(UNKNOWN_BINARY, Some("mp3")), Some(MPEG));
        assert_eq!(sniff(UNKNOWN_BINARY, Some("JPEG")), Some(JPEG));
    }

    #[test]
    fn unknown_binary_without_a_known_extension_is_not_recognised() {
        assert_eq!(sniff(UNKNOWN_BINARY, None), None);
        assert_eq!(sniff(UNKNOWN_BINARY, Some("exe")), None);
    }

    #[test]
    fn magic_bytes_win_over_the_extension() {
        assert_eq!(sniff(PNG_HEAD, Some("mp3")), Some(PNG));
        assert_eq!(sniff(FLAC_HEAD, Some("wav")), Some(FLAC));
    }

    #[test]
    fn a_truncated_magic_is_not_recognised() {
        assert_eq!(sniff(&WAV_HEAD[..10], None), None);
        assert_eq!(sniff(&PNG_HEAD[..4], None), None);
    }

    #[test]
    fn bytes_past_the_sniff_length_are_ignored() {
        let head = [[0u8; SNIFF_LEN].as_slice(), FLAC_HEAD].concat();
        assert_eq!(sniff(&head, None), None);
    }

    #[test]
    fn each_type_has_its_documented_mime_extension_and_class() {
        let types = [WAV, FLAC, MPEG, OGG, OPUS, AAC, MP4, AIFF, JPEG, PNG, WEBP];
        let described: Vec<String> = types
            .iter()
            .map(|found| format!("{} {} {:?}", found.mime, found.extension, found.class))
            .collect();
        let expected = "audio/wav wav Audio, audio/flac flac Audio, audio/mpeg mp3 Audio, \
            audio/ogg ogg Audio, audio/opus opus Audio, audio/aac aac Audio, \
            audio/mp4 m4a Audio, audio/aiff aiff Audio, image/jpeg jpg Image, \
            image/png png Image, image/webp webp Image";
        assert_eq!(described.join(", "), expected);
    }

    #[test]
    fn extensions_are_case_insensitive_and_aliases_are_canonical() {
        assert_eq!(from_extension("FLAC"), Some(FLAC));
        assert_eq!(from_extension("Jpeg"), Some(JPEG));
        assert_eq!(from_extension("aifc"), Some(AIFF));
        assert_eq!(from_extension("oga"), Some(OGG));
        assert_eq!(from_extension("m4b"), Some(MP4));
        assert_eq!(from_extension("opus"), Some(OPUS));
        assert_eq!(from_extension(".mp3"), None);
        assert_eq!(from_extension("txt"), None);
    }
}
