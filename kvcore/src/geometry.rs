//! The shape of one engine's KV cache: what a block holds, independent of where it sits in memory.

use std::fmt;

use crate::error::GeometryError;

/// Element type of the cached keys and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    Fp16,
    Fp8E4m3,
    Fp8E5m2,
    F32,
}

impl Dtype {
    pub const ALL: [Dtype; 5] = [
        Dtype::Bf16,
        Dtype::Fp16,
        Dtype::Fp8E4m3,
        Dtype::Fp8E5m2,
        Dtype::F32,
    ];

    /// Bytes per element.
    pub const fn size(self) -> u32 {
        match self {
            Dtype::Fp8E4m3 | Dtype::Fp8E5m2 => 1,
            Dtype::Bf16 | Dtype::Fp16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// Stable numeric code used by the wire format and geometry fingerprints.
    pub const fn code(self) -> u8 {
        match self {
            Dtype::Bf16 => 1,
            Dtype::Fp16 => 2,
            Dtype::Fp8E4m3 => 3,
            Dtype::Fp8E5m2 => 4,
            Dtype::F32 => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Accepts the names engines use (`bfloat16`, `torch.float16`, `fp8_e4m3`, ...).
    pub fn parse(name: &str) -> Option<Dtype> {
        let n = name.trim().to_ascii_lowercase();
        let n = n.strip_prefix("torch.").unwrap_or(&n);
        Some(match n {
            "bf16" | "bfloat16" => Dtype::Bf16,
            "fp16" | "f16" | "float16" | "half" => Dtype::Fp16,
            "fp8" | "fp8_e4m3" | "fp8e4m3" | "float8_e4m3fn" | "float8_e4m3" | "e4m3" => {
                Dtype::Fp8E4m3
            }
            "fp8_e5m2" | "fp8e5m2" | "float8_e5m2" | "e5m2" => Dtype::Fp8E5m2,
            "f32" | "fp32" | "float32" | "float" => Dtype::F32,
            _ => return None,
        })
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
            Dtype::Fp8E4m3 => "fp8_e4m3",
            Dtype::Fp8E5m2 => "fp8_e5m2",
            Dtype::F32 => "f32",
        })
    }
}

/// What one (head, token) cell holds: separate K and V vectors (which may differ in size), or
/// one compressed latent (MLA, where the cache has a single "head").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HeadShape {
    Mha { k_size: u32, v_size: u32 },
    Mla { latent: u32 },
}

impl HeadShape {
    /// Elements in one (head, token) cell: the `C` of `[L, B, H, N, C]` (K‖V).
    pub const fn channels(self) -> u32 {
        match self {
            HeadShape::Mha { k_size, v_size } => k_size + v_size,
            HeadShape::Mla { latent } => latent,
        }
    }
}

impl fmt::Display for HeadShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadShape::Mha { k_size, v_size } => write!(f, "K {k_size} + V {v_size}"),
            HeadShape::Mla { latent } => write!(f, "MLA latent {latent}"),
        }
    }
}

/// The geometry of one rank's KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Geometry {
    pub layers: u32,
    /// KV heads held by this rank (after tensor-parallel splitting); 1 for MLA.
    pub kv_heads: u32,
    pub head: HeadShape,
    pub dtype: Dtype,
    /// Tokens per block (vLLM's `block_size`).
    pub block_tokens: u32,
}

/// Upper bounds that keep every size product far from `u64` overflow and reject nonsense early.
pub const MAX_LAYERS: u32 = 1 << 12;
pub const MAX_KV_HEADS: u32 = 1 << 12;
pub const MAX_CHANNELS: u32 = 1 << 16;
pub const MAX_BLOCK_TOKENS: u32 = 1 << 16;

impl Geometry {
    /// A standard attention cache where K and V have the same head size.
    pub fn mha(
        layers: u32,
        kv_heads: u32,
        head_size: u32,
        dtype: Dtype,
        block_tokens: u32,
    ) -> Result<Geometry, GeometryError> {
        Geometry {
            layers,
            kv_heads,
            head: HeadShape::Mha {
                k_size: head_size,
                v_size: head_size,
            },
            dtype,
            block_tokens,
        }
        .validated()
    }

    /// A multi-head latent attention cache: one latent vector per token.
    pub fn mla(
        layers: u32,
        latent: u32,
        dtype: Dtype,
        block_tokens: u32,
    ) -> Result<Geometry, GeometryError> {
        Geometry {
            layers,
            kv_heads: 1,
            head: HeadShape::Mla { latent },
            dtype,
            block_tokens,
        }
        .validated()
    }

    /// Checks every field; geometries built by hand or decoded from a peer go through here.
    pub fn validated(self) -> Result<Geometry, GeometryError> {
        check_range("layers", self.layers, MAX_LAYERS)?;
        check_range("kv_heads", self.kv_heads, MAX_KV_HEADS)?;
        check_range("block_tokens", self.block_tokens, MAX_BLOCK_TOKENS)?;
        match self.head {
            HeadShape::Mha { k_size, v_size } => {
                check_range("k_size", k_size, MAX_CHANNELS)?;
                check_range("v_size", v_size, MAX_CHANNELS)?;
            }
            HeadShape::Mla { latent } => {
                check_range("latent", latent, MAX_CHANNELS)?;
                if self.kv_heads != 1 {
                    return Err(GeometryError::Invalid {
                        field: "kv_heads",
                        value: u64::from(self.kv_heads),
                        reason: "an MLA cache has exactly one latent head",
                    });
                }
            }
        }
        Ok(self)
    }

    /// Bytes of one (head, token) cell.
    pub const fn cell_bytes(&self) -> u64 {
        self.head.channels() as u64 * self.dtype.size() as u64
    }

    /// Bytes of one block of one layer (all heads, all tokens).
    pub const fn layer_block_bytes(&self) -> u64 {
        self.cell_bytes() * self.kv_heads as u64 * self.block_tokens as u64
    }

    /// Bytes of one block across all layers.
    pub const fn block_bytes(&self) -> u64 {
        self.layer_block_bytes() * self.layers as u64
    }

    /// A 64-bit identity of the geometry; stored with blocks on disk so a block written under
    /// another geometry is never served.
    pub fn fingerprint(&self) -> u64 {
        let mut buf = Vec::with_capacity(32);
        buf.extend_from_slice(b"kvferry-geometry-v1");
        buf.extend_from_slice(&self.layers.to_le_bytes());
        buf.extend_from_slice(&self.kv_heads.to_le_bytes());
        match self.head {
            HeadShape::Mha { k_size, v_size } => {
                buf.push(0);
                buf.extend_from_slice(&k_size.to_le_bytes());
                buf.extend_from_slice(&v_size.to_le_bytes());
            }
            HeadShape::Mla { latent } => {
                buf.push(1);
                buf.extend_from_slice(&latent.to_le_bytes());
            }
        }
        buf.push(self.dtype.code());
        buf.extend_from_slice(&self.block_tokens.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&buf)
    }

    /// Equality, reported as the first differing field with both values.
    pub fn check_same(&self, theirs: &Geometry) -> Result<(), GeometryError> {
        self.check_same_except_heads(theirs)?;
        mismatch("kv_heads", self.kv_heads, theirs.kv_heads)
    }

    /// Everything but the head count, which legitimately differs between tensor-parallel sizes.
    pub fn check_same_except_heads(&self, theirs: &Geometry) -> Result<(), GeometryError> {
        mismatch("layers", self.layers, theirs.layers)?;
        mismatch("head", self.head, theirs.head)?;
        mismatch("dtype", self.dtype, theirs.dtype)?;
        mismatch("block_tokens", self.block_tokens, theirs.block_tokens)
    }
}

impl fmt::Display for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} layers x {} KV heads x ({}) {} x {} tokens/block",
            self.layers, self.kv_heads, self.head, self.dtype, self.block_tokens
        )
    }
}

fn check_range(field: &'static str, value: u32, max: u32) -> Result<(), GeometryError> {
    if value == 0 || value > max {
        return Err(GeometryError::Invalid {
            field,
            value: u64::from(value),
            reason: if value == 0 {
                "must be positive"
            } else {
                "is larger than kvferry supports"
            },
        });
    }
    Ok(())
}

fn mismatch<T: PartialEq + fmt::Display>(
    field: &'static str,
    ours: T,
    theirs: T,
) -> Result<(), GeometryError> {
    if ours == theirs {
        Ok(())
    } else {
        Err(GeometryError::Mismatch {
            field,
            ours: ours.to_string(),
            theirs: theirs.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_fields() {
        let g = Geometry::mha(32, 8, 128, Dtype::Bf16, 16).expect("valid");
        assert_eq!(g.cell_bytes(), 512);
        assert_eq!(g.layer_block_bytes(), 512 * 8 * 16);
        // Llama-3.1-8B: 2 MiB per 16-token block over all layers.
        assert_eq!(g.block_bytes(), 2 << 20);
        let mla = Geometry::mla(61, 576, Dtype::Bf16, 16).expect("valid");
        assert_eq!(mla.block_bytes(), 61 * 576 * 2 * 16);
    }

    #[test]
    fn mismatch_names_field_and_both_values() {
        let a = Geometry::mha(32, 8, 128, Dtype::Bf16, 16).expect("valid");
        let b = Geometry::mha(32, 8, 128, Dtype::Fp16, 16).expect("valid");
        let msg = a.check_same(&b).expect_err("differs").to_string();
        assert!(
            msg.contains("dtype") && msg.contains("bf16") && msg.contains("fp16"),
            "{msg}"
        );
        let c = Geometry::mha(32, 4, 128, Dtype::Bf16, 16).expect("valid");
        assert!(a.check_same_except_heads(&c).is_ok());
        let msg = a.check_same(&c).expect_err("differs").to_string();
        assert!(
            msg.contains("kv_heads") && msg.contains('8') && msg.contains('4'),
            "{msg}"
        );
    }

    #[test]
    fn invalid_fields_are_rejected() {
        assert!(Geometry::mha(0, 8, 128, Dtype::Bf16, 16).is_err());
        assert!(Geometry::mha(32, 8, 128, Dtype::Bf16, MAX_BLOCK_TOKENS + 1).is_err());
        let bad_mla = Geometry {
            layers: 2,
            kv_heads: 2,
            head: HeadShape::Mla { latent: 512 },
            dtype: Dtype::Bf16,
            block_tokens: 16,
        };
        assert!(bad_mla.validated().is_err());
    }

    #[test]
    fn fingerprint_separates_geometries() {
        let a = Geometry::mha(32, 8, 128, Dtype::Bf16, 16).expect("valid");
        let b = Geometry::mha(32, 8, 128, Dtype::Bf16, 32).expect("valid");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.fingerprint());
    }

    #[test]
    fn dtype_names_and_codes_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_code(d.code()), Some(d));
            assert_eq!(Dtype::parse(&d.to_string()), Some(d));
        }
        assert_eq!(Dtype::parse("torch.bfloat16"), Some(Dtype::Bf16));
        assert_eq!(Dtype::parse("int4"), None);
    }
}
