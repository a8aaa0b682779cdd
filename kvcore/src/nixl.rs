//! NIXL's own bytes, for agents that must talk to stock NIXL (1.5.x): its `nixlSerDes`
//! serialization, the agent metadata blob (full and partial), the notification payload of its UCX
//! backend, and the frames of its socket side channel.
//!
//! `nixlSerDes` is a sequence of fields, each `tag bytes` (no length: the reader must know which
//! tag comes next), an 8-byte native-endian length, the value, and `|`, after the 11-byte prefix
//! `nixlSerDes|`. The decoder here is schema-driven like NIXL's, but stricter: every tag, length,
//! separator and count is checked against the bytes left, names must be UTF-8, and nothing may
//! trail the last field. NIXL writes native-endian integers; kvferry reads and writes
//! little-endian, which is what every platform NIXL ships for is.

use crate::error::WireError;

/// The prefix of every `nixlSerDes` buffer.
pub const SERDES_PREFIX: &[u8] = b"nixlSerDes|";
/// The prefix of every side-channel command.
pub const COMM_PREFIX: &[u8] = b"NIXLCOMM:";
/// The length prefix of a side-channel frame.
pub const COMM_LEN_BYTES: usize = 8;
/// Side-channel frames above this are refused before anything is allocated (NIXL caps at 1 GiB;
/// a metadata blob of a million descriptors is well under this).
pub const MAX_COMM_FRAME: usize = 256 << 20;
pub const MAX_AGENT_NAME: usize = 1024;
pub const MAX_CONNS: usize = 64;
pub const MAX_BACKEND_NAME: usize = 64;
pub const MAX_CONN_INFO: usize = 64 << 10;
pub const MAX_SECTIONS: usize = 1024;
pub const MAX_DESCS: usize = 1 << 22;
pub const MAX_DESC_META: usize = 64 << 10;
pub const MAX_NOTIF_MSG: usize = 16 << 20;
/// `{addr, len, devId}` as NIXL's `nixlBasicDesc` lays it out.
pub const BASIC_DESC_BYTES: usize = 24;

/// The smallest field: an empty tag, the length, an empty value and `|`.
const MIN_FIELD: usize = 8 + 1;

/// Writes a `nixlSerDes` buffer.
#[derive(Debug)]
pub struct SerWriter {
    buf: Vec<u8>,
}

impl Default for SerWriter {
    fn default() -> Self {
        SerWriter::new()
    }
}

impl SerWriter {
    pub fn new() -> SerWriter {
        SerWriter {
            buf: SERDES_PREFIX.to_vec(),
        }
    }

    /// NIXL's `addStr`/`addBuf`: tag, 8-byte length, value, `|`.
    pub fn field(&mut self, tag: &str, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(tag.as_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(value);
        self.buf.push(b'|');
        self
    }

    pub fn u64(&mut self, tag: &str, v: u64) -> &mut Self {
        self.field(tag, &v.to_le_bytes())
    }

    pub fn u32(&mut self, tag: &str, v: u32) -> &mut Self {
        self.field(tag, &v.to_le_bytes())
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads a `nixlSerDes` buffer field by field, each tag named by the caller.
#[derive(Debug)]
pub struct SerReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> SerReader<'a> {
    pub fn new(buf: &'a [u8]) -> Result<SerReader<'a>, WireError> {
        if !buf.starts_with(SERDES_PREFIX) {
            return Err(WireError::Invalid {
                field: "nixlSerDes",
                reason: "missing the `nixlSerDes|` prefix".into(),
            });
        }
        Ok(SerReader {
            buf,
            pos: SERDES_PREFIX.len(),
        })
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The value of the next field, which must carry `tag` and be at most `max` bytes.
    pub fn field(&mut self, tag: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let rest = &self.buf[self.pos..];
        let head = tag.len() + 8;
        if rest.len() < head {
            return Err(WireError::Truncated {
                field: tag,
                need: head as u64,
                have: rest.len() as u64,
            });
        }
        if &rest[..tag.len()] != tag.as_bytes() {
            return Err(WireError::Invalid {
                field: tag,
                reason: format!(
                    "expected tag {tag:?}, found {:?}",
                    String::from_utf8_lossy(&rest[..tag.len().min(16)])
                ),
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&rest[tag.len()..head]);
        let len = u64::from_le_bytes(len);
        if len > max as u64 {
            return Err(WireError::TooLarge {
                len,
                max: max as u64,
            });
        }
        let len = len as usize;
        // Value plus the `|` separator.
        if rest.len() - head < len + 1 {
            return Err(WireError::Truncated {
                field: tag,
                need: (len + 1) as u64,
                have: (rest.len() - head) as u64,
            });
        }
        let value = &rest[head..head + len];
        if rest[head + len] != b'|' {
            return Err(WireError::Invalid {
                field: tag,
                reason: format!(
                    "value not followed by `|` (found {:#04x})",
                    rest[head + len]
                ),
            });
        }
        self.pos += head + len + 1;
        Ok(value)
    }

    /// A field of exactly `N` bytes.
    fn fixed<const N: usize>(&mut self, tag: &'static str) -> Result<[u8; N], WireError> {
        let v = self.field(tag, N)?;
        v.try_into().map_err(|_| WireError::Invalid {
            field: tag,
            reason: format!("{} bytes, expected {N}", v.len()),
        })
    }

    pub fn u64(&mut self, tag: &'static str) -> Result<u64, WireError> {
        self.fixed(tag).map(u64::from_le_bytes)
    }

    pub fn u32(&mut self, tag: &'static str) -> Result<u32, WireError> {
        self.fixed(tag).map(u32::from_le_bytes)
    }

    /// A non-empty UTF-8 string field.
    pub fn text(&mut self, tag: &'static str, max: usize) -> Result<String, WireError> {
        let v = self.field(tag, max)?;
        if v.is_empty() {
            return Err(WireError::Invalid {
                field: tag,
                reason: "empty".into(),
            });
        }
        std::str::from_utf8(v)
            .map(str::to_owned)
            .map_err(|_| WireError::Utf8 { field: tag })
    }

    /// A count read as u64, accepted only if `count <= max` and the bytes left could hold that
    /// many elements of at least `min_size` bytes each.
    pub fn count(
        &mut self,
        tag: &'static str,
        min_size: usize,
        max: usize,
    ) -> Result<usize, WireError> {
        let n = self.u64(tag)?;
        if n > max as u64 {
            return Err(WireError::TooMany {
                field: tag,
                count: n,
                max: max as u64,
            });
        }
        let need = (n as usize).saturating_mul(min_size.max(1));
        if need > self.remaining() {
            return Err(WireError::Truncated {
                field: tag,
                need: need as u64,
                have: self.remaining() as u64,
            });
        }
        Ok(n as usize)
    }

    pub fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(WireError::TrailingBytes(n)),
        }
    }
}

/// NIXL's `nixl_mem_t`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NixlMem {
    Dram,
    Vram,
    Blk,
    Obj,
    File,
}

impl NixlMem {
    pub fn code(self) -> u32 {
        match self {
            NixlMem::Dram => 0,
            NixlMem::Vram => 1,
            NixlMem::Blk => 2,
            NixlMem::Obj => 3,
            NixlMem::File => 4,
        }
    }

    pub fn from_code(c: u32) -> Option<NixlMem> {
        Some(match c {
            0 => NixlMem::Dram,
            1 => NixlMem::Vram,
            2 => NixlMem::Blk,
            3 => NixlMem::Obj,
            4 => NixlMem::File,
            _ => return None,
        })
    }

    /// The name NIXL's Python API uses ("DRAM", "VRAM", …).
    pub fn name(self) -> &'static str {
        match self {
            NixlMem::Dram => "DRAM",
            NixlMem::Vram => "VRAM",
            NixlMem::Blk => "BLK",
            NixlMem::Obj => "OBJ",
            NixlMem::File => "FILE",
        }
    }
}

/// One registered range: `{addr, len, devId}` and the backend's public data (for UCX, the
/// packed rkey).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixlDesc {
    pub addr: u64,
    pub len: u64,
    pub dev_id: u64,
    pub meta: Vec<u8>,
}

/// The descriptors one backend registered for one memory type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixlSection {
    pub backend: String,
    pub mem: NixlMem,
    pub descs: Vec<NixlDesc>,
}

/// A backend's connection info (for UCX, the worker address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixlConn {
    pub backend: String,
    pub info: Vec<u8>,
}

/// What `getLocalMD` / `getLocalPartialMD` return and `loadRemoteMD` takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixlMetadata {
    pub agent: String,
    pub conns: Vec<NixlConn>,
    pub sections: Vec<NixlSection>,
}

impl NixlMetadata {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = SerWriter::new();
        w.field("Agent", self.agent.as_bytes());
        w.u64("Conns", self.conns.len() as u64);
        for c in &self.conns {
            w.field("t", c.backend.as_bytes()).field("c", &c.info);
        }
        w.field("", b"MemSection");
        w.u64("nixlSecElms", self.sections.len() as u64);
        for s in &self.sections {
            w.field("bknd", s.backend.as_bytes())
                .field("nixlDList", b"nixlSDList")
                .u32("t", s.mem.code())
                .u64("n", s.descs.len() as u64);
            let mut d = Vec::new();
            for desc in &s.descs {
                d.clear();
                d.extend_from_slice(&desc.addr.to_le_bytes());
                d.extend_from_slice(&desc.len.to_le_bytes());
                d.extend_from_slice(&desc.dev_id.to_le_bytes());
                d.extend_from_slice(&desc.meta);
                w.field("", &d);
            }
        }
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<NixlMetadata, WireError> {
        let mut r = SerReader::new(buf)?;
        let agent = r.text("Agent", MAX_AGENT_NAME)?;
        let n = r.count("Conns", 2 * (1 + MIN_FIELD), MAX_CONNS)?;
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let backend = r.text("t", MAX_BACKEND_NAME)?;
            let info = r.field("c", MAX_CONN_INFO)?;
            if info.is_empty() {
                return Err(WireError::Invalid {
                    field: "c",
                    reason: format!("empty connection info for backend {backend}"),
                });
            }
            conns.push(NixlConn {
                backend,
                info: info.to_vec(),
            });
        }
        if r.field("", 16)? != b"MemSection" {
            return Err(WireError::Invalid {
                field: "MemSection",
                reason: "memory section marker missing".into(),
            });
        }
        let n = r.count("nixlSecElms", 4 + MIN_FIELD, MAX_SECTIONS)?;
        let mut sections = Vec::with_capacity(n);
        for _ in 0..n {
            let backend = r.text("bknd", MAX_BACKEND_NAME)?;
            let kind = r.field("nixlDList", 16)?;
            if kind != b"nixlSDList" {
                return Err(WireError::Invalid {
                    field: "nixlDList",
                    reason: format!(
                        "descriptor list type {:?}, expected \"nixlSDList\"",
                        String::from_utf8_lossy(kind)
                    ),
                });
            }
            let code = r.u32("t")?;
            let mem = NixlMem::from_code(code).ok_or_else(|| WireError::Invalid {
                field: "t",
                reason: format!("unknown memory type {code}"),
            })?;
            let count = r.count("n", MIN_FIELD + BASIC_DESC_BYTES, MAX_DESCS)?;
            let mut descs = Vec::with_capacity(count);
            for _ in 0..count {
                let d = r.field("", BASIC_DESC_BYTES + MAX_DESC_META)?;
                if d.len() < BASIC_DESC_BYTES {
                    return Err(WireError::Invalid {
                        field: "descriptor",
                        reason: format!("{} bytes, at least {BASIC_DESC_BYTES} needed", d.len()),
                    });
                }
                let word = |i: usize| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(&d[i * 8..i * 8 + 8]);
                    u64::from_le_bytes(a)
                };
                descs.push(NixlDesc {
                    addr: word(0),
                    len: word(1),
                    dev_id: word(2),
                    meta: d[BASIC_DESC_BYTES..].to_vec(),
                });
            }
            sections.push(NixlSection {
                backend,
                mem,
                descs,
            });
        }
        r.finish()?;
        Ok(NixlMetadata {
            agent,
            conns,
            sections,
        })
    }

    /// The connection info a backend published (e.g. "UCX" → worker address).
    pub fn conn(&self, backend: &str) -> Option<&[u8]> {
        self.conns
            .iter()
            .find(|c| c.backend == backend)
            .map(|c| c.info.as_slice())
    }
}

/// The payload of a NIXL notification (UCX active message 0): sender name and opaque bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixlNotif {
    pub from: String,
    pub msg: Vec<u8>,
}

impl NixlNotif {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = SerWriter::new();
        w.field("name", self.from.as_bytes())
            .field("msg", &self.msg);
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<NixlNotif, WireError> {
        let mut r = SerReader::new(buf)?;
        let from = r.text("name", MAX_AGENT_NAME)?;
        // NIXL allows an empty message.
        let msg = r.field("msg", MAX_NOTIF_MSG)?.to_vec();
        r.finish()?;
        Ok(NixlNotif { from, msg })
    }
}

/// A command on NIXL's socket side channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NixlComm {
    /// "Load this metadata blob."
    Load(Vec<u8>),
    /// "Send me your metadata" (answered with `Load` on the same connection).
    Send,
    /// "Forget the agent of this name."
    Invalidate(String),
}

impl NixlComm {
    /// The whole frame: 8-byte length, then `NIXLCOMM:` and the command.
    pub fn encode(&self) -> Vec<u8> {
        let (head, body): (&[u8], &[u8]) = match self {
            NixlComm::Load(b) => (b"LOAD", b),
            NixlComm::Send => (b"SEND", &[]),
            NixlComm::Invalidate(n) => (b"INVL", n.as_bytes()),
        };
        let len = COMM_PREFIX.len() + head.len() + body.len();
        let mut out = Vec::with_capacity(COMM_LEN_BYTES + len);
        out.extend_from_slice(&(len as u64).to_le_bytes());
        out.extend_from_slice(COMM_PREFIX);
        out.extend_from_slice(head);
        out.extend_from_slice(body);
        out
    }

    /// The body length a frame's 8-byte prefix announces, refused above `max`.
    pub fn frame_len(prefix: [u8; COMM_LEN_BYTES], max: usize) -> Result<usize, WireError> {
        let len = u64::from_le_bytes(prefix);
        if len > max as u64 {
            return Err(WireError::TooLarge {
                len,
                max: max as u64,
            });
        }
        Ok(len as usize)
    }

    /// One frame's body (after the length prefix).
    pub fn decode(body: &[u8]) -> Result<NixlComm, WireError> {
        let invalid = |reason: String| WireError::Invalid {
            field: "NIXLCOMM",
            reason,
        };
        let rest = body
            .strip_prefix(COMM_PREFIX)
            .ok_or_else(|| invalid("missing the `NIXLCOMM:` prefix".into()))?;
        if rest.len() < 4 {
            return Err(WireError::Truncated {
                field: "NIXLCOMM",
                need: 4,
                have: rest.len() as u64,
            });
        }
        let (head, arg) = rest.split_at(4);
        match head {
            b"LOAD" => Ok(NixlComm::Load(arg.to_vec())),
            b"SEND" if arg.is_empty() => Ok(NixlComm::Send),
            b"SEND" => Err(WireError::TrailingBytes(arg.len())),
            b"INVL" => {
                if arg.is_empty() || arg.len() > MAX_AGENT_NAME {
                    return Err(invalid(format!("agent name of {} bytes", arg.len())));
                }
                std::str::from_utf8(arg)
                    .map(|s| NixlComm::Invalidate(s.to_owned()))
                    .map_err(|_| WireError::Utf8 { field: "INVL" })
            }
            other => Err(invalid(format!(
                "unknown command {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> NixlMetadata {
        NixlMetadata {
            agent: "a".into(),
            conns: vec![NixlConn {
                backend: "UCX".into(),
                info: vec![1, 2, 3],
            }],
            sections: vec![NixlSection {
                backend: "UCX".into(),
                mem: NixlMem::Vram,
                descs: vec![NixlDesc {
                    addr: 0x1000,
                    len: 64,
                    dev_id: 3,
                    meta: b"rkey".to_vec(),
                }],
            }],
        }
    }

    #[test]
    fn metadata_round_trips_and_refuses_damage() {
        let md = sample();
        let b = md.encode();
        assert_eq!(NixlMetadata::decode(&b).expect("test value"), md);
        for cut in 0..b.len() {
            assert!(NixlMetadata::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = b.clone();
        extra.push(0);
        assert_eq!(
            NixlMetadata::decode(&extra),
            Err(WireError::TrailingBytes(1))
        );
        // A separator that is not `|` is refused, not skipped as NIXL does.
        let mut bad = b.clone();
        let agent_sep = SERDES_PREFIX.len() + "Agent".len() + 8 + 1;
        bad[agent_sep] = b'#';
        assert!(NixlMetadata::decode(&bad).is_err());
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut w = SerWriter::new();
        w.field("Agent", b"x").u64("Conns", u64::MAX);
        assert!(matches!(
            NixlMetadata::decode(&w.finish()),
            Err(WireError::TooMany { .. })
        ));
        let mut w = SerWriter::new();
        w.field("Agent", b"x").u64("Conns", 3);
        assert!(matches!(
            NixlMetadata::decode(&w.finish()),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn notification_round_trips_with_empty_message() {
        let n = NixlNotif {
            from: "peer".into(),
            msg: vec![],
        };
        assert_eq!(NixlNotif::decode(&n.encode()).expect("test value"), n);
        assert!(NixlNotif::decode(b"KVFR").is_err());
    }

    #[test]
    fn comm_frames() {
        for c in [
            NixlComm::Load(b"nixlSerDes|".to_vec()),
            NixlComm::Send,
            NixlComm::Invalidate("agent".into()),
        ] {
            let f = c.encode();
            let len = NixlComm::frame_len(f[..8].try_into().expect("test value"), MAX_COMM_FRAME)
                .expect("test value");
            assert_eq!(len, f.len() - 8);
            assert_eq!(NixlComm::decode(&f[8..]).expect("test value"), c);
        }
        assert!(NixlComm::decode(b"NIXLCOMM:SENDx").is_err());
        assert!(NixlComm::decode(b"NIXLCOMM:INVL").is_err());
        assert!(NixlComm::decode(b"NIXLCOMM:NOPE").is_err());
        assert!(NixlComm::frame_len(u64::MAX.to_le_bytes(), MAX_COMM_FRAME).is_err());
    }
}
