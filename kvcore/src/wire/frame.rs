//! The frame around every message:
//!
//! ```text
//! offset  size  field
//!      0     4  magic "KVFR"
//!      4     2  wire version (u16 LE), currently 1
//!      6     1  kind (1 metadata, 2 transfer notice, 3 notification, 4 completion, 5 abort,
//!                    6 challenge, 7 hello)
//!      7     1  flags, reserved, must be 0
//!      8     4  payload length (u32 LE), capped by the decoder's limit
//!     12     n  payload
//!   12+n     8  xxh3-64 of bytes 0..12+n (u64 LE)
//! ```
//!
//! The header is judged as soon as its 12 bytes are in, so a stream decoder drops a bad peer
//! before buffering any of its claimed payload.

use xxhash_rust::xxh3::xxh3_64;

use super::msg::Message;
use crate::error::WireError;

pub const MAGIC: [u8; 4] = *b"KVFR";
pub const WIRE_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 12;
pub const TRAILER_LEN: usize = 8;
/// Default cap on a frame's payload; metadata of a large engine is a few hundred KiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 16 << 20;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Metadata = 1,
    Transfer = 2,
    Notification = 3,
    Completion = 4,
    Abort = 5,
    Challenge = 6,
    Hello = 7,
    Call = 8,
    Reply = 9,
    Proof = 10,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Metadata,
        Kind::Transfer,
        Kind::Notification,
        Kind::Completion,
        Kind::Abort,
        Kind::Challenge,
        Kind::Hello,
        Kind::Call,
        Kind::Reply,
        Kind::Proof,
    ];

    pub fn from_u8(v: u8) -> Result<Kind, WireError> {
        Kind::ALL
            .into_iter()
            .find(|k| *k as u8 == v)
            .ok_or(WireError::UnknownKind(v))
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub payload_len: u32,
}

impl Header {
    /// Validates the first 12 bytes of a frame.
    pub fn parse(b: &[u8; HEADER_LEN], max_payload: u32) -> Result<Header, WireError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic { got: magic });
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != WIRE_VERSION {
            return Err(WireError::Version {
                got: version,
                supported: WIRE_VERSION,
            });
        }
        let kind = Kind::from_u8(b[6])?;
        if b[7] != 0 {
            return Err(WireError::Reserved {
                field: "flags",
                value: u64::from(b[7]),
            });
        }
        let payload_len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if payload_len > max_payload {
            return Err(WireError::TooLarge {
                len: u64::from(payload_len),
                max: u64::from(max_payload),
            });
        }
        Ok(Header { kind, payload_len })
    }

    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize + TRAILER_LEN
    }
}

/// Wraps an encoded payload in a frame.
pub(crate) fn seal(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    f.extend_from_slice(&MAGIC);
    f.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    f.push(kind as u8);
    f.push(0);
    debug_assert!(u32::try_from(payload.len()).is_ok());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    let sum = xxh3_64(&f);
    f.extend_from_slice(&sum.to_le_bytes());
    f
}

/// Checks a complete frame (header, length, checksum) and returns its kind and payload.
pub fn open(frame: &[u8], max_payload: u32) -> Result<(Kind, &[u8]), WireError> {
    let head: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(WireError::Truncated {
            field: "header",
            need: HEADER_LEN as u64,
            have: frame.len() as u64,
        })?;
    let h = Header::parse(head, max_payload)?;
    let total = h.frame_len();
    if frame.len() < total {
        return Err(WireError::Truncated {
            field: "payload",
            need: total as u64,
            have: frame.len() as u64,
        });
    }
    if frame.len() > total {
        return Err(WireError::TrailingBytes(frame.len() - total));
    }
    let body_end = HEADER_LEN + h.payload_len as usize;
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&frame[body_end..total]);
    let stored = u64::from_le_bytes(stored);
    let computed = xxh3_64(&frame[..body_end]);
    if stored != computed {
        return Err(WireError::Checksum { computed, stored });
    }
    Ok((h.kind, &frame[HEADER_LEN..body_end]))
}

/// Sans-IO stream decoder: feed it whatever bytes arrived, take whole messages out. After an
/// error the stream is out of sync and the connection should be dropped; the decoder keeps
/// returning that error.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_payload: u32,
    failed: Option<WireError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameDecoder {
    pub fn new(max_payload: u32) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            max_payload,
            failed: None,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes buffered but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.try_next() {
            Ok(m) => Ok(m),
            Err(e) => {
                self.buf = Vec::new();
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Message>, WireError> {
        // Judge the magic as soon as it can be judged, so garbage is refused at once.
        let n = self.buf.len().min(MAGIC.len());
        if self.buf[..n] != MAGIC[..n] {
            let mut got = [0u8; 4];
            got[..n].copy_from_slice(&self.buf[..n]);
            return Err(WireError::BadMagic { got });
        }
        let Some(head) = self.buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(head);
        let total = Header::parse(&h, self.max_payload)?.frame_len();
        if self.buf.len() < total {
            return Ok(None);
        }
        let msg = Message::decode_with_limit(&self.buf[..total], self.max_payload)?;
        self.buf.drain(..total);
        Ok(Some(msg))
    }
}
