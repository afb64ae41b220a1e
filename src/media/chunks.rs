//! The chunks of a RIFF (WAV, RF64) or IFF (AIFF) file, as far as its first
//! bytes show them: after a 12-byte file header, each chunk is a 4-byte id, a
//! 32-bit size (little-endian in RIFF, big-endian in IFF) and a body padded
//! to an even length.

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

/// Where the audio data of a WAV, RF64 or AIFF file starts (the least it can
/// start at when its first bytes do not reach it); 0 for any other file.
pub(super) fn audio_data_start(leading: &[u8]) -> u64 {
    let riff =
        (leading.starts_with(b"RIFF") || leading.starts_with(b"RF64")) && leading.get(8..12) == Some(b"WAVE");
    let aiff = leading.starts_with(b"FORM") && matches!(leading.get(8..12), Some(b"AIFF") | Some(b"AIFC"));
    if riff {
        return match find(leading, b"data", false) {
            Found::At(at) => at as u64 + 8,
            Found::Beyond(at) => at + 8,
        };
    }
    if aiff {
        // SSND: id, size, then the offset of the samples within the body and a block size.
        return match find(leading, b"SSND", true) {
            Found::At(at) => {
                let offset = leading
                    .get(at + 8..at + 12)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                at as u64 + 16 + u64::from(offset)
            }
            Found::Beyond(at) => at + 16,
        };
    }
    0
}
