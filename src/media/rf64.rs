//! RF64 (WAV over 4 GiB): the sizes symphonia cannot read, patched in from the `ds64` chunk.

use super::chunks::{self, Found};
use std::io::{Read, Seek, SeekFrom};
use symphonia::core::io::MediaSource;

/// An RF64 file (a WAV over 4 GiB): the WAV demuxer does not know it, so it is
/// shown one with `RIFF` instead of `RF64` and the 32-bit sizes (0xFFFFFFFF
/// in RF64) filled in from the `ds64` chunk, capped at 4 GiB; its real data
/// size gives the duration.
pub(super) struct Rf64 {
    /// The audio data's size from `ds64`.
    pub(super) data_size: u64,
    /// Byte ranges to show differently: offset and the bytes there.
    patches: Vec<(u64, [u8; 4])>,
}

impl Rf64 {
    /// `Some` for an RF64 file with a `ds64` chunk and a `data` chunk within the first bytes.
    pub(super) fn read(leading: &[u8]) -> Option<Rf64> {
        if !(leading.starts_with(b"RF64") && leading.get(8..12) == Some(b"WAVE")) {
            return None;
        }
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
        // The `data` chunk's size field.
        let Found::At(data) = chunks::find(leading, b"data", false) else {
            return None;
        };
        patches.push((data as u64 + 4, capped(data_size)));
        Some(Rf64 { data_size, patches })
    }

    pub(super) fn as_wav<R: Read + Seek + Send + Sync>(&self, inner: R) -> Patched<R> {
        Patched {
            inner,
            patches: self.patches.clone(),
        }
    }
}

/// A reader that shows some 4-byte ranges differently.
pub(super) struct Patched<R> {
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
