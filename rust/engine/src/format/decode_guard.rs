//! A chunk's encoded bytes checked before they are decoded: a corrupt or malicious chunk that
//! claims to expand far beyond the size a chunk of its array holds (a decompression bomb) is
//! refused instead of filling memory. The zstd, gzip and blosc headers/trailers say how large
//! the decoded data are; a zstd frame that does not say is decoded once with a bounded reader.

use std::io::Read;

use zarrs::array::{Array, BytesToBytesCodecTraits, CodecChain};
use zarrs::plugin::{ExtensionName, ZarrVersion};

/// The outermost compressor of an array's codec chain, when its encoded form tells the decoded
/// size and the decoded size is the chunk's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeGuard {
    /// Nothing to check (no compressor, or a chain whose sizes this guard does not follow).
    None,
    /// A zstd frame, possibly followed by checksum bytes.
    Zstd {
        /// Checksum bytes after the frame.
        trailer: usize,
    },
    /// A gzip member (ISIZE in its last 4 bytes).
    Gzip {
        /// Checksum bytes after the member.
        trailer: usize,
    },
    /// A blosc buffer (uncompressed size in its header).
    Blosc,
}

impl DecodeGuard {
    /// The guard for `array`'s chunks.
    pub fn of<T: ?Sized>(array: &Array<T>) -> DecodeGuard {
        Self::of_chain(&array.codecs())
    }

    /// The guard for chunks encoded by `chain` (a sharded array's inner chunks).
    pub fn of_chain(chain: &CodecChain) -> DecodeGuard {
        if !chain.array_to_array_codecs().is_empty() || chain.array_to_bytes_codec().name(ZarrVersion::V3).as_deref() != Some("bytes") {
            return DecodeGuard::None;
        }
        let names: Vec<String> = chain
            .bytes_to_bytes_codecs()
            .iter()
            .map(|c: &std::sync::Arc<dyn BytesToBytesCodecTraits>| c.name(ZarrVersion::V3).map(|n| n.into_owned()).unwrap_or_default())
            .collect();
        // Checksums (crc32c: 4 bytes each) wrap the compressor's output; one compressor only.
        let trailer = 4 * names.iter().filter(|n| n.as_str() == "crc32c").count();
        let compressors: Vec<&String> = names.iter().filter(|n| n.as_str() != "crc32c").collect();
        match compressors.as_slice() {
            [one] if one.as_str() == "zstd" => DecodeGuard::Zstd { trailer },
            [one] if one.as_str() == "gzip" => DecodeGuard::Gzip { trailer },
            [one] if one.as_str() == "blosc" && trailer == 0 => DecodeGuard::Blosc,
            _ => DecodeGuard::None,
        }
    }

    /// Checks that `encoded` decodes to at most `expected` bytes; the message says why not.
    pub fn check(self, encoded: &[u8], expected: u64) -> Result<(), String> {
        let claimed: Option<u64> = match self {
            DecodeGuard::None => None,
            DecodeGuard::Zstd { trailer } => {
                let frame = &encoded[..encoded.len().saturating_sub(trailer)];
                match zstd::zstd_safe::get_frame_content_size(frame) {
                    Ok(Some(size)) => Some(size),
                    // No size in the frame: decode with a bound to find out.
                    Ok(None) => {
                        let mut decoder = zstd::stream::read::Decoder::new(frame).map_err(|e| e.to_string())?;
                        let mut sink = std::io::sink();
                        let read = std::io::copy(&mut (&mut decoder).take(expected + 1), &mut sink).map_err(|e| e.to_string())?;
                        Some(read)
                    }
                    Err(_) => None, // not a frame: the decoder reports it
                }
            }
            DecodeGuard::Gzip { trailer } => {
                let member = &encoded[..encoded.len().saturating_sub(trailer)];
                (member.len() >= 18).then(|| u64::from(u32::from_le_bytes(member[member.len() - 4..].try_into().expect("4 bytes"))))
            }
            DecodeGuard::Blosc => (encoded.len() >= 16).then(|| u64::from(u32::from_le_bytes(encoded[4..8].try_into().expect("4 bytes")))),
        };
        match claimed {
            Some(size) if size > expected => {
                // An unsized zstd frame was read only up to one byte past the limit.
                let decodes_to = if size == expected + 1 {
                    format!("more than {expected}")
                } else {
                    size.to_string()
                };
                Err(format!(
                    "the chunk decodes to {decodes_to} bytes but a chunk of this array holds {expected}; refusing to decode it (corrupt or malicious data)"
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_and_unsized_zstd_bombs_are_refused_and_honest_chunks_pass() {
        let honest = zstd::bulk::compress(&[7u8; 4096], 3).unwrap();
        assert!(DecodeGuard::Zstd { trailer: 0 }.check(&honest, 4096).is_ok());
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).unwrap();
        let e = DecodeGuard::Zstd { trailer: 0 }.check(&bomb, 4096).unwrap_err();
        assert!(e.contains("1048576 bytes") && e.contains("4096"), "{e}");
        let mut unsized_bomb = Vec::new();
        {
            let mut encoder = zstd::stream::write::Encoder::new(&mut unsized_bomb, 3).unwrap();
            std::io::Write::write_all(&mut encoder, &vec![0u8; 1 << 20]).unwrap();
            encoder.finish().unwrap();
        }
        let e = DecodeGuard::Zstd { trailer: 0 }.check(&unsized_bomb, 4096).unwrap_err();
        assert!(e.contains("more than 4096"), "{e}");
    }

    #[test]
    fn gzip_and_blosc_sizes_come_from_their_trailer_and_header() {
        let mut gzip = vec![0x1f, 0x8b];
        gzip.extend([0u8; 12]);
        gzip.extend(2_000_000u32.to_le_bytes());
        assert!(DecodeGuard::Gzip { trailer: 0 }.check(&gzip, 4096).is_err());
        assert!(DecodeGuard::Gzip { trailer: 0 }.check(&gzip, 2_000_000).is_ok());
        let mut blosc = vec![2u8, 1, 0, 4];
        blosc.extend(1_000_000u32.to_le_bytes());
        blosc.extend([0u8; 8]);
        assert!(DecodeGuard::Blosc.check(&blosc, 4096).is_err());
        assert!(DecodeGuard::None.check(&blosc, 1).is_ok());
    }
}
