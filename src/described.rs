//! What a router needs to know of a block besides its hash, and its note: the bytes the tiers
//! keep with the block in its G3 slot, so that a scheduler restarted over the same directory
//! announces recovered blocks as fully as the blocks it saved itself.
//!
//! A note comes back from disk: it is parsed with every length checked against what is left,
//! and a note that does not parse, or names a block other than the one it came back with, is
//! dropped (the block is then announced without its description, never with another's).

use kvcore::BlockHash;

/// vLLM's self-describing `BlockStored`: the block before it in its chain, its tokens and LoRA
/// adapter. Taken from the request when the block is saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Described {
    /// vLLM's hash of the block (the tier key differs in groups other than 0).
    pub hash: BlockHash,
    /// The KV cache group whose KV the stored block holds.
    pub group: u32,
    pub parent: Option<BlockHash>,
    pub tokens: Vec<u32>,
    pub lora: Option<String>,
}

const NOTE_VERSION: u8 = 1;

impl Described {
    /// The tier key of the block described: its hash in its group.
    pub fn key(&self) -> BlockHash {
        self.hash.in_group(self.group)
    }

    /// The note kept with the block:
    ///
    /// ```text
    /// u8 version (1) | u32 group | u8 n, n bytes hash | u8 n (0: none), n bytes parent |
    /// u32 n, n × u32 token ids | u16 n, n bytes LoRA name (UTF-8)
    /// ```
    /// (integers little-endian). `None` when a LoRA name is too long for its field.
    pub fn note(&self) -> Option<Vec<u8>> {
        let lora = self.lora.as_deref().unwrap_or("").as_bytes();
        let lora_len = u16::try_from(lora.len()).ok()?;
        let tokens = u32::try_from(self.tokens.len()).ok()?;
        let parent = self.parent.as_ref().map_or(&[][..], BlockHash::as_bytes);
        let mut b = Vec::with_capacity(80 + 4 * self.tokens.len() + lora.len());
        b.push(NOTE_VERSION);
        b.extend_from_slice(&self.group.to_le_bytes());
        for h in [self.hash.as_bytes(), parent] {
            // BlockHash holds at most 64 bytes.
            b.push(h.len() as u8);
            b.extend_from_slice(h);
        }
        b.extend_from_slice(&tokens.to_le_bytes());
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b.extend_from_slice(&lora_len.to_le_bytes());
        b.extend_from_slice(lora);
        Some(b)
    }

    /// Parses a note that came back with the block stored under `key`: `None` unless it is
    /// whole, of this version, and describes that block.
    pub fn from_note(key: &BlockHash, note: &[u8]) -> Option<Described> {
        let mut r = Reader(note);
        if r.u8()? != NOTE_VERSION {
            return None;
        }
        let group = u32::from_le_bytes(r.array()?);
        let n = usize::from(r.u8()?);
        let hash = BlockHash::from_bytes(r.take(n)?).ok()?;
        let parent = match usize::from(r.u8()?) {
            0 => None,
            n => Some(BlockHash::from_bytes(r.take(n)?).ok()?),
        };
        let n = u32::from_le_bytes(r.array()?) as usize;
        let tokens = r
            .take(n.checked_mul(4)?)?
            .chunks_exact(4)
            .map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]))
            .collect();
        let lora = match usize::from(u16::from_le_bytes(r.array()?)) {
            0 => None,
            n => Some(std::str::from_utf8(r.take(n)?).ok()?.to_string()),
        };
        let d = Described {
            hash,
            group,
            parent,
            tokens,
            lora,
        };
        (r.0.is_empty() && d.key() == *key).then_some(d)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn described(group: u32, parent: bool, lora: Option<&str>) -> Described {
        Described {
            hash: BlockHash::from_bytes(&[7u8; 32]).expect("fits"),
            group,
            parent: parent.then(|| BlockHash::from_u64(3)),
            tokens: (0..32).map(|t| t * 1000 + 7).collect(),
            lora: lora.map(str::to_string),
        }
    }

    #[test]
    fn a_note_round_trips_for_its_own_block_only() {
        for d in [
            described(0, false, None),
            described(1, true, Some("adapter-ü")),
        ] {
            let note = d.note().expect("fits");
            assert_eq!(Described::from_note(&d.key(), &note), Some(d.clone()));
            // Under another key (another group's block, or another block): not this one's.
            let other = d.hash.in_group(d.group + 1);
            assert_eq!(Described::from_note(&other, &note), None);
            // Every truncation and every extra byte is refused.
            for n in 0..note.len() {
                assert_eq!(Described::from_note(&d.key(), &note[..n]), None, "{n}");
            }
            let mut long = note.clone();
            long.push(0);
            assert_eq!(Described::from_note(&d.key(), &long), None);
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_not_without_panicking(
            note in proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            key in proptest::num::u64::ANY,
        ) {
            let _ = Described::from_note(&BlockHash::from_u64(key), &note);
        }

        #[test]
        fn every_description_round_trips(
            group in 0u32..16,
            parent in proptest::option::of(proptest::num::u64::ANY),
            tokens in proptest::collection::vec(proptest::num::u32::ANY, 0..64),
            lora in proptest::option::of("[a-z0-9-]{1,40}"),
            hash in proptest::num::u64::ANY,
        ) {
            let d = Described {
                hash: BlockHash::from_u64(hash),
                group,
                parent: parent.map(BlockHash::from_u64),
                tokens,
                lora,
            };
            let note = d.note().expect("fits");
            proptest::prop_assert_eq!(Described::from_note(&d.key(), &note), Some(d));
        }
    }

    #[test]
    fn hostile_lengths_are_refused_not_allocated() {
        let d = described(0, true, None);
        let mut note = d.note().expect("fits");
        // The token count sits after version, group and both hashes (1 + 4 + 33 + 9 bytes).
        let at = 1 + 4 + 1 + 32 + 1 + 8;
        note[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Described::from_note(&d.key(), &note), None);
        let mut bad = d.note().expect("fits");
        bad[0] = 2;
        assert_eq!(
            Described::from_note(&d.key(), &bad),
            None,
            "another version"
        );
        let mut long = described(0, false, None);
        long.lora = Some("x".repeat(70_000));
        assert_eq!(long.note(), None);
    }
}
