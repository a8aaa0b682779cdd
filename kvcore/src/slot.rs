//! The header at the start of every on-disk block slot. A store reads it back after a restart to
//! rebuild its index, and before serving a block: a torn, stale or corrupt slot fails here.
//!
//! ```text
//! offset size field
//!      0    4 magic "KVFS"
//!      4    2 format version (u16 LE), currently 1
//!      6    1 block hash length
//!      7    1 reserved, 0
//!      8   64 block hash, zero-padded
//!     72    8 geometry fingerprint
//!     80    8 payload length
//!     88    8 payload checksum (xxh3-64)
//!     96    8 sequence number (higher wins when two slots claim one hash)
//!    104    8 header checksum (xxh3-64 of bytes 0..104)
//! ```

use xxhash_rust::xxh3::xxh3_64;

use crate::error::SlotError;
use crate::hash::{BlockHash, MAX_HASH_LEN};

pub const SLOT_MAGIC: [u8; 4] = *b"KVFS";
pub const SLOT_VERSION: u16 = 1;
pub const SLOT_HEADER_LEN: usize = 112;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotHeader {
    pub hash: BlockHash,
    pub geometry: u64,
    pub payload_len: u64,
    pub checksum: u64,
    pub seq: u64,
}

/// The checksum stored for a payload.
pub fn payload_checksum(payload: &[u8]) -> u64 {
    xxh3_64(payload)
}

impl SlotHeader {
    pub fn new(hash: BlockHash, geometry: u64, payload: &[u8], seq: u64) -> SlotHeader {
        SlotHeader {
            hash,
            geometry,
            payload_len: payload.len() as u64,
            checksum: payload_checksum(payload),
            seq,
        }
    }

    pub fn encode(&self) -> [u8; SLOT_HEADER_LEN] {
        let mut b = [0u8; SLOT_HEADER_LEN];
        b[0..4].copy_from_slice(&SLOT_MAGIC);
        b[4..6].copy_from_slice(&SLOT_VERSION.to_le_bytes());
        let h = self.hash.as_bytes();
        b[6] = h.len() as u8;
        b[8..8 + h.len()].copy_from_slice(h);
        b[72..80].copy_from_slice(&self.geometry.to_le_bytes());
        b[80..88].copy_from_slice(&self.payload_len.to_le_bytes());
        b[88..96].copy_from_slice(&self.checksum.to_le_bytes());
        b[96..104].copy_from_slice(&self.seq.to_le_bytes());
        let sum = xxh3_64(&b[..104]);
        b[104..112].copy_from_slice(&sum.to_le_bytes());
        b
    }

    /// Parses a header. An all-zero header is [`SlotError::Empty`] (a never-written slot).
    pub fn decode(b: &[u8]) -> Result<SlotHeader, SlotError> {
        let b: &[u8; SLOT_HEADER_LEN] = b
            .get(..SLOT_HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(SlotError::Short { len: b.len() })?;
        if b.iter().all(|&x| x == 0) {
            return Err(SlotError::Empty);
        }
        if b[0..4] != SLOT_MAGIC {
            return Err(SlotError::Magic);
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let stored = u64_at(104);
        let computed = xxh3_64(&b[..104]);
        if stored != computed {
            return Err(SlotError::HeaderChecksum { stored, computed });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != SLOT_VERSION {
            return Err(SlotError::Version { got: version });
        }
        let len = b[6] as usize;
        if len == 0 || len > MAX_HASH_LEN || b[7] != 0 || b[8 + len..72].iter().any(|&x| x != 0) {
            return Err(SlotError::Malformed("block hash field"));
        }
        let hash = BlockHash::from_bytes(&b[8..8 + len])
            .map_err(|_| SlotError::Malformed("block hash"))?;
        Ok(SlotHeader {
            hash,
            geometry: u64_at(72),
            payload_len: u64_at(80),
            checksum: u64_at(88),
            seq: u64_at(96),
        })
    }

    /// Checks that this slot holds `expected` under geometry `geometry` and that `payload` is
    /// exactly what was written.
    pub fn verify(
        &self,
        expected: &BlockHash,
        geometry: u64,
        payload: &[u8],
    ) -> Result<(), SlotError> {
        if self.hash != *expected {
            return Err(SlotError::WrongBlock {
                expected: expected.to_string(),
                found: self.hash.to_string(),
            });
        }
        if self.geometry != geometry {
            return Err(SlotError::Geometry {
                expected: geometry,
                found: self.geometry,
            });
        }
        if self.payload_len != payload.len() as u64 {
            return Err(SlotError::Length {
                expected: payload.len() as u64,
                found: self.payload_len,
            });
        }
        let computed = payload_checksum(payload);
        if computed != self.checksum {
            return Err(SlotError::PayloadChecksum {
                stored: self.checksum,
                computed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let hash = BlockHash::from_bytes(&[3u8; 32]).expect("fits");
        let payload = vec![9u8; 1000];
        let h = SlotHeader::new(hash, 77, &payload, 5);
        let bytes = h.encode();
        assert_eq!(SlotHeader::decode(&bytes), Ok(h));
        assert_eq!(h.verify(&hash, 77, &payload), Ok(()));
        for i in 0..SLOT_HEADER_LEN {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(SlotHeader::decode(&bad).is_err(), "flip at {i} undetected");
        }
        assert_eq!(
            SlotHeader::decode(&[0u8; SLOT_HEADER_LEN]),
            Err(SlotError::Empty)
        );
        assert!(matches!(
            SlotHeader::decode(&bytes[..50]),
            Err(SlotError::Short { .. })
        ));
        let mut torn = payload.clone();
        torn[999] = 0;
        assert!(matches!(
            h.verify(&hash, 77, &torn),
            Err(SlotError::PayloadChecksum { .. })
        ));
        assert!(matches!(
            h.verify(&hash, 78, &payload),
            Err(SlotError::Geometry { .. })
        ));
        assert!(matches!(
            h.verify(&hash, 77, &payload[1..]),
            Err(SlotError::Length { .. })
        ));
        let other = BlockHash::from_u64(1);
        assert!(matches!(
            h.verify(&other, 77, &payload),
            Err(SlotError::WrongBlock { .. })
        ));
    }
}
