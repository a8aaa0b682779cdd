//! Sans-IO wire codecs: versioned, length-prefixed, checksummed frames for agent metadata,
//! transfer notices, notifications, completions and aborts. `encode(&T) -> Vec<u8>`,
//! `decode(&[u8]) -> Result<T, WireError>`; decoding never panics and never allocates beyond the
//! (capped) frame it is given. The shapes follow NIXL's (agents, per-transport connection blobs,
//! memory regions of `(addr, len, device)` with DRAM/VRAM/FILE kinds, `(agent, bytes)`
//! notifications); the bytes are kvferry's own, with a checksum NIXL's frames lack.

mod codec;
mod frame;
mod msg;

pub use frame::{
    open, FrameDecoder, Header, Kind, DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC, TRAILER_LEN,
    WIRE_VERSION,
};
pub use msg::*;

use crate::error::WireError;
use crate::geometry::Geometry;

/// A geometry alone, as 22 bytes (used in on-disk slot headers and handshakes).
pub fn encode_geometry(g: &Geometry) -> Vec<u8> {
    let mut w = codec::Writer::default();
    msg::write_geometry(&mut w, g);
    w.buf
}

pub fn decode_geometry(b: &[u8]) -> Result<Geometry, WireError> {
    let mut r = codec::Reader::new(b);
    let g = msg::read_geometry(&mut r)?;
    r.finish()?;
    Ok(g)
}
