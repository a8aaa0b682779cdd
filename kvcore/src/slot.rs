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
//!
//! The rest of the header page may hold the block's *note*: bytes the tier keeps with the block
//! for its owner and hands back when it recovers the slot (kvferry's scheduler keeps what a
//! router needs to announce the block: its tokens and parent). A note is not part of the block:
//! a torn or stale one is dropped, never the block.
//!
//! ```text
//! offset       size field
//!    112          4 note length n (u32 LE), 0: none
//!    116          8 note checksum (xxh3-64 of the block hash, then the note)
//!    124          n note
//! ```
//!
//! The checksum binds the note to the block hash, so a note left in a page by the block that
//! used the slot before is never read as this block's.

use xxhash_rust::xxh3::xxh3_64;

use crate::error::SlotError;
use crate::hash::{BlockHash, MAX_HASH_LEN};

pub const SLOT_MAGIC: [u8; 4] = *b"KVFS";
pub const SLOT_VERSION: u16 = 1;
pub const SLOT_HEADER_LEN: usize = 112;

/// Where a note starts in the header page.
pub const NOTE_OFFSET: usize = SLOT_HEADER_LEN;
const NOTE_PREFIX: usize = 12;

/// The longest note a header page of `page` bytes holds.
pub const fn max_note_len(page: usize) -> usize {
    page.saturating_sub(NOTE_OFFSET + NOTE_PREFIX)
}

fn note_checksum(hash: &BlockHash, note: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(hash.as_bytes());
    h.update(note);
    h.digest()
}

/// Writes `note` for block `hash` into `area`, the header page from [`NOTE_OFFSET`] on; a note
/// that does not fit is written as none. Returns whether the note was written.
pub fn write_note(area: &mut [u8], hash: &BlockHash, note: &[u8]) -> bool {
    let fits = area.len() >= NOTE_PREFIX && note.len() <= area.len() - NOTE_PREFIX;
    let Some(prefix) = area.get_mut(..NOTE_PREFIX) else {
        return false;
    };
    if note.is_empty() || !fits {
        prefix.fill(0);
        return false;
    }
    prefix[..4].copy_from_slice(&(note.len() as u32).to_le_bytes());
    prefix[4..].copy_from_slice(&note_checksum(hash, note).to_le_bytes());
    area[NOTE_PREFIX..NOTE_PREFIX + note.len()].copy_from_slice(note);
    true
}

/// The note [`write_note`] left for block `hash` in `area`, if it is whole and this block's.
pub fn read_note<'a>(area: &'a [u8], hash: &BlockHash) -> Option<&'a [u8]> {
    let len = u32::from_le_bytes(area.get(..4)?.try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(area.get(4..NOTE_PREFIX)?.try_into().ok()?);
    let note = area.get(NOTE_PREFIX..NOTE_PREFIX.checked_add(len)?)?;
    (len > 0 && note_checksum(hash, note) == sum).then_some(note)
}

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

    #[test]
    fn a_note_is_read_back_only_whole_and_for_its_own_block() {
        let (a, b) = (BlockHash::from_u64(7), BlockHash::from_u64(8));
        let mut page = vec![0u8; 4096];
        let area = &mut page[NOTE_OFFSET..];
        assert_eq!(read_note(area, &a), None, "a zeroed page has none");
        assert!(write_note(area, &a, b"tokens"));
        assert_eq!(read_note(area, &a), Some(&b"tokens"[..]));
        // The slot's next block finds the old note but never takes it for its own.
        assert_eq!(read_note(area, &b), None);
        for i in 0..NOTE_PREFIX + 6 {
            let mut bad = area.to_vec();
            bad[i] ^= 0x04;
            assert_eq!(read_note(&bad, &a), None, "flip at {i} undetected");
        }
        // A length past the page is refused, not read.
        area[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(read_note(area, &a), None);
        // Too long for the page: written as none, so an older note cannot stay behind.
        assert!(write_note(area, &a, b"tokens"));
        let long = vec![1u8; max_note_len(4096) + 1];
        assert!(!write_note(area, &a, &long));
        assert_eq!(read_note(area, &a), None);
        let longest = vec![2u8; max_note_len(4096)];
        assert!(write_note(area, &a, &longest));
        assert_eq!(read_note(area, &a), Some(&longest[..]));
        assert!(!write_note(&mut [0u8; 5], &a, b"x"));
        assert_eq!(read_note(&[0u8; 5], &a), None);
    }
}
