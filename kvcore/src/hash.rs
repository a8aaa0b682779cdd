//! Block identity. Engines bring their own hashes (vLLM's are bytes), which kvferry keeps as
//! opaque keys so KV events agree with the engine's routers; Rust users without one get a chained
//! prefix hasher over token ids.

use std::fmt;

use sha2::{Digest, Sha256};

use crate::error::HashError;

/// The longest engine hash kept; vLLM's SHA-256 hashes are 32 bytes.
pub const MAX_HASH_LEN: usize = 64;

/// The key of one full block's content: opaque bytes, compared and hashed bytewise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash {
    len: u8,
    bytes: [u8; MAX_HASH_LEN],
}

impl BlockHash {
    pub fn from_bytes(b: &[u8]) -> Result<BlockHash, HashError> {
        if b.is_empty() {
            return Err(HashError::Empty);
        }
        if b.len() > MAX_HASH_LEN {
            return Err(HashError::TooLong {
                len: b.len(),
                max: MAX_HASH_LEN,
            });
        }
        let mut bytes = [0u8; MAX_HASH_LEN];
        bytes[..b.len()].copy_from_slice(b);
        Ok(BlockHash {
            len: b.len() as u8,
            bytes,
        })
    }

    /// For engines whose hashes are integers.
    pub fn from_u64(v: u64) -> BlockHash {
        let mut bytes = [0u8; MAX_HASH_LEN];
        bytes[..8].copy_from_slice(&v.to_le_bytes());
        BlockHash { len: 8, bytes }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// The key of this block's KV in cache group `group` of a hybrid model (vLLM's KV cache
    /// groups: one per attention kind, each its own layers), whose groups share the block hash
    /// but not the layers it covers. Group 0 is the hash itself, so a model with one group keeps
    /// the keys it always had (and its G3 files); the others are SHA-256 of a domain tag, the
    /// group and the hash, so no group's key can equal another's or an engine hash.
    pub fn in_group(&self, group: u32) -> BlockHash {
        if group == 0 {
            return *self;
        }
        let mut d = Sha256::new();
        d.update(b"kvferry.group\0");
        d.update(group.to_be_bytes());
        d.update(self.as_bytes());
        let mut bytes = [0u8; MAX_HASH_LEN];
        bytes[..32].copy_from_slice(&d.finalize());
        BlockHash { len: 32, bytes }
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Chained prefix hashing: block `i`'s hash covers its tokens and block `i-1`'s hash, so equal
/// hashes mean equal whole prefixes. SHA-256, because cache keys shared between tenants must not
/// be forgeable by crafted prompts.
#[derive(Clone, Debug)]
pub struct PrefixHasher {
    block_tokens: usize,
    namespace: Vec<u8>,
}

impl PrefixHasher {
    pub fn new(block_tokens: usize) -> PrefixHasher {
        PrefixHasher {
            block_tokens: block_tokens.max(1),
            namespace: Vec::new(),
        }
    }

    /// Separates caches that must never share blocks: another model, LoRA adapter or salt.
    pub fn with_namespace(mut self, namespace: &[u8]) -> PrefixHasher {
        self.namespace = namespace.to_vec();
        self
    }

    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The hash of one block given its parent's hash (`None` for the first block).
    pub fn hash_block(&self, parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
        let mut h = Sha256::new();
        h.update(b"kvferry-prefix-v1");
        h.update((self.namespace.len() as u64).to_le_bytes());
        h.update(&self.namespace);
        match parent {
            Some(p) => {
                h.update([1u8, p.len]);
                h.update(p.as_bytes());
            }
            None => h.update([0u8]),
        }
        h.update((tokens.len() as u64).to_le_bytes());
        for t in tokens {
            h.update(t.to_le_bytes());
        }
        let digest = h.finalize();
        let mut bytes = [0u8; MAX_HASH_LEN];
        bytes[..32].copy_from_slice(&digest);
        BlockHash { len: 32, bytes }
    }

    /// Hashes of every full block of `tokens`; a trailing partial block has no hash.
    pub fn hash_prefix(&self, tokens: &[u32]) -> Vec<BlockHash> {
        let mut out: Vec<BlockHash> = Vec::with_capacity(tokens.len() / self.block_tokens);
        for chunk in tokens.chunks_exact(self.block_tokens) {
            let h = self.hash_block(out.last(), chunk);
            out.push(h);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_keep_group_zero_and_tell_the_others_apart() {
        let h = BlockHash::from_u64(7);
        assert_eq!(h.in_group(0), h);
        let (g1, g2) = (h.in_group(1), h.in_group(2));
        assert_ne!(g1, h);
        assert_ne!(g1, g2);
        assert_eq!(g1, BlockHash::from_u64(7).in_group(1), "deterministic");
        assert_ne!(g1, BlockHash::from_u64(8).in_group(1));
    }

    #[test]
    fn same_prefix_same_hashes_and_changes_propagate() {
        let h = PrefixHasher::new(4);
        let a: Vec<u32> = (0..18).collect();
        let ha = h.hash_prefix(&a);
        assert_eq!(ha.len(), 4, "partial trailing block has no hash");
        assert_eq!(ha, h.hash_prefix(&a));
        let mut b = a.clone();
        b[5] = 999;
        let hb = h.hash_prefix(&b);
        assert_eq!(ha[0], hb[0]);
        for i in 1..4 {
            assert_ne!(
                ha[i], hb[i],
                "block {i} must change after an upstream change"
            );
        }
        // Same tokens under another parent differ.
        assert_ne!(h.hash_block(None, &a[4..8]), ha[1]);
        assert_ne!(
            h.clone().with_namespace(b"lora-7").hash_prefix(&a)[0],
            ha[0]
        );
    }

    #[test]
    fn engine_hashes_are_kept_verbatim() {
        let raw = [7u8; 32];
        let bh = BlockHash::from_bytes(&raw).expect("fits");
        assert_eq!(bh.as_bytes(), &raw);
        assert_ne!(bh, BlockHash::from_bytes(&raw[..31]).expect("fits"));
        assert_eq!(BlockHash::from_bytes(&[]), Err(HashError::Empty));
        assert!(BlockHash::from_bytes(&[0; 65]).is_err());
        assert_eq!(BlockHash::from_u64(1).as_bytes(), &1u64.to_le_bytes());
    }
}
