//! The chunks of a RIFF (WAV, RF64) or IFF (AIFF) file, as far as its first
//! bytes show them: after a 12-byte file header, each chunk is a 4-byte id, a
//! 32-bit size (little-endian in RIFF, big-endian in IFF) and a body padded
//! to an even length. And what those chunks, or a FLAC's STREAMINFO, promise,
//! for the reason a truncated file is given.

/// Where a chunk is, as far as the leading bytes tell.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Found {
    /// The offset of the chunk's header (its id).
    At(usize),
    /// Not within the leading bytes: its header is at this offset or later.
    Beyond(u64),
}

/// Finds the first chunk `wanted` in `leading`, the first bytes of a RIFF or IFF file.
pub(super) fn find(leading: &[u8], wanted: &[u8; 4], big_endian: bool) -> Found {
    let mut at: u64 = 12;
    loop {
        let header = usize::try_from(at)
            .ok()
            .and_then(|start| leading.get(start..start.checked_add(8)?));
        let Some(header) = header else {
            return Found::Beyond(at);
        };
        if &header[..4] == wanted {
            return Found::At(at as usize);
        }
        let size = [header[4], header[5], header[6], header[7]];
        let size = u64::from(if big_endian {
            u32::from_be_bytes(size)
        } else {
            u32::from_le_bytes(size)
        });
        at += 8 + size + (size & 1);
    }
}

/// The two chunked families of audio files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// RIFF or RF64 `WAVE`, little-endian sizes.
    Riff,
    /// IFF `AIFF` or `AIFC`, big-endian sizes.
    Aiff,
}

fn family(leading: &[u8]) -> Option<Family> {
    let form = leading.get(8..12);
    if (leading.starts_with(b"RIFF") || leading.starts_with(b"RF64")) && form == Some(b"WAVE") {
        return Some(Family::Riff);
    }
    if leading.starts_with(b"FORM") && matches!(form, Some(b"AIFF") | Some(b"AIFC")) {
        return Some(Family::Aiff);
    }
    None
}

fn u32_at(leading: &[u8], at: usize, big_endian: bool) -> Option<u32> {
    let bytes: [u8; 4] = leading.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(if big_endian {
        u32::from_be_bytes(bytes)
    } else {
        u32::from_le_bytes(bytes)
    })
}

/// Where the audio data of a WAV, RF64 or AIFF file starts (the least it can
/// start at when its first bytes do not reach it); 0 for any other file.
pub(super) fn audio_data_start(leading: &[u8]) -> u64 {
    match family(leading) {
        Some(Family::Riff) => match find(leading, b"data", false) {
            Found::At(at) => at as u64 + 8,
            Found::Beyond(at) => at + 8,
        },
        // SSND: id, size, then the offset of the samples within the body and a block size.
        Some(Family::Aiff) => match find(leading, b"SSND", true) {
            Found::At(at) => at as u64 + 16 + u64::from(u32_at(leading, at + 8, true).unwrap_or(0)),
            Found::Beyond(at) => at + 16,
        },
        None => 0,
    }
}

/// What the headers at the start of a WAV, AIFF or FLAC file promise, in
/// words ("44100 bytes of audio from byte 78", "0.500 s of audio (22050
/// samples)"), where the first bytes say it.
pub(super) fn promise(leading: &[u8]) -> Option<String> {
    // FLAC: "fLaC", then STREAMINFO (block type 0) whose body holds a 20-bit sample rate at
    // bit 80 and a 36-bit sample count at bit 108.
    if leading.starts_with(b"fLaC") && leading.get(4).map(|byte| byte & 0x7f) == Some(0) {
        let info = leading.get(8..26)?;
        let rate = u32::from(info[10]) << 12 | u32::from(info[11]) << 4 | u32::from(info[12]) >> 4;
        let samples = u64::from(info[13] & 0x0f) << 32 | u64::from(u32_at(info, 14, true)?);
        return (rate > 0 && samples > 0).then(|| {
            format!(
                "{:.3} s of audio ({samples} samples)",
                samples as f64 / f64::from(rate)
            )
        });
    }
    let start = audio_data_start(leading);
    let bytes = match family(leading)? {
        // RF64's 32-bit size is a placeholder (its ds64 chunk has the real one).
        Family::Riff if leading.starts_with(b"RF64") => return None,
        Family::Riff => match find(leading, b"data", false) {
            Found::At(at) => u64::from(u32_at(leading, at + 4, false)?),
            Found::Beyond(_) => return None,
        },
        // COMM: channels (16 bits), sample frames (32), bits per sample (16).
        Family::Aiff => match find(leading, b"COMM", true) {
            Found::At(at) => {
                let channels = u64::from(u32_at(leading, at + 6, true)? & 0xffff);
                let frames = u64::from(u32_at(leading, at + 10, true)?);
                let bits = u64::from(u32_at(leading, at + 12, true)? & 0xffff);
                frames * channels * bits.div_ceil(8)
            }
            Found::Beyond(_) => return None,
        },
    };
    Some(format!("{bytes} bytes of audio from byte {start}"))
}
