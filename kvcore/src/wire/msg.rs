//! The messages agents exchange, and their payload codecs. Every decoder checks semantic rules
//! too (ids unique, regions non-overlapping, layouts valid and inside their region), so what comes
//! out of `decode` is safe to act on.

use super::codec::{Reader, Writer};
use super::frame::{open, seal, Kind, DEFAULT_MAX_PAYLOAD};
use crate::error::WireError;
use crate::geometry::{Dtype, Geometry, HeadShape};
use crate::layout::{CacheLayout, LayerPlacement, StrideOrder};
use crate::region::{Descriptor, MemKind, Region, RegionId, RegionTable};

/// Version of the agent protocol carried in metadata (distinct from the frame format's version).
/// 2: mutual authentication (the listener names itself in its challenge, the dialer sends a
/// nonce of its own, the listener proves the token too; see [`crate::auth`]), calls and replies.
/// 3: everything after the proofs is sealed under the session key when a token is set.
/// 4: an exported cache says whether it is a staged copy ([`ExportedCache::staged`]).
pub const PROTOCOL_VERSION: u16 = 4;
pub const MAX_NAME_LEN: usize = 256;
pub const MAX_TRANSPORT_LEN: usize = 64;
/// Transport blobs: UCX worker addresses and packed rkeys are well under this.
pub const MAX_BLOB_LEN: usize = 64 << 10;
pub const MAX_NOTIFICATION_LEN: usize = 1 << 20;
/// A call or a reply is a small control message (a lease to extend, a grant to confirm).
pub const MAX_CALL_LEN: usize = 64 << 10;
pub const MAX_TEXT_LEN: usize = 4096;
pub const MAX_ENDPOINTS: usize = 64;
pub const MAX_KEYS_PER_REGION: usize = 16;
pub const MAX_CACHES: usize = 4096;
pub const MAX_DESCRIPTORS: usize = 1 << 20;

/// How to reach an agent over one transport (e.g. "ucx" → worker address, "tcp" → host:port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub transport: String,
    pub address: Vec<u8>,
}

/// A transport's key for remote access to a region (e.g. a packed UCX rkey).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportKey {
    pub transport: String,
    pub key: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedRegion {
    pub id: RegionId,
    pub region: Region,
    pub keys: Vec<TransportKey>,
}

/// A KV cache the agent exports: which region holds it and how it is laid out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedCache {
    pub region: RegionId,
    pub layout: CacheLayout,
    pub tp_size: u32,
    pub tp_rank: u32,
    /// The region is a host copy of the engine's cache (its cache is in device memory that no
    /// transport here can export), into which a finished request's blocks are copied before
    /// their grant goes live: a block's bytes there are the request's only once the grant
    /// answers live, so a peer reads only after such an answer.
    pub staged: bool,
}

/// What an agent publishes about itself (NIXL's "local metadata").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentMetadata {
    pub name: String,
    pub protocol_version: u16,
    pub endpoints: Vec<Endpoint>,
    pub regions: Vec<ExportedRegion>,
    pub caches: Vec<ExportedCache>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
}

/// Announces a transfer against the receiver's memory: the descriptors are in the receiver's
/// regions; `notification` is delivered to the receiver when the transfer completes whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferNotice {
    pub transfer_id: u64,
    pub op: Op,
    pub initiator: String,
    pub descriptors: Vec<Descriptor>,
    pub notification: Option<Vec<u8>>,
}

/// Opaque bytes from one agent to another (NIXL's `(agent, bytes)` notification).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notification {
    pub from: String,
    pub payload: Vec<u8>,
}

/// A request that wants an answer on the same connection: the served side hands `payload`, with
/// the name the connection authenticated, to its call handler and sends back its [`Reply`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub call_id: u64,
    pub payload: Vec<u8>,
}

/// The answer to the [`Call`] of the same id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub call_id: u64,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed { code: u16, message: String },
}

/// The outcome of a whole transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub transfer_id: u64,
    pub status: Status,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    pub transfer_id: u64,
    pub reason: String,
}

/// The first frame a listening agent sends on every connection: a fresh nonce to prove the
/// shared token against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; 32],
    /// The listener's agent name (bound into both proofs).
    pub name: String,
}

/// The dialing agent's answer: who it is, which protocol it speaks, its own nonce, and, when a
/// token is configured, the dialer's proof over both nonces and both names (else empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub name: String,
    pub protocol_version: u16,
    pub nonce: [u8; 32],
    pub proof: Vec<u8>,
}

/// The listener's proof, sent after it checked the dialer's and before its metadata (empty
/// without a token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    pub proof: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Metadata(AgentMetadata),
    Transfer(TransferNotice),
    Notification(Notification),
    Completion(Completion),
    Abort(Abort),
    Challenge(Challenge),
    Hello(Hello),
    Call(Call),
    Reply(Reply),
    Proof(Proof),
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Metadata(_) => Kind::Metadata,
            Message::Transfer(_) => Kind::Transfer,
            Message::Notification(_) => Kind::Notification,
            Message::Completion(_) => Kind::Completion,
            Message::Abort(_) => Kind::Abort,
            Message::Challenge(_) => Kind::Challenge,
            Message::Hello(_) => Kind::Hello,
            Message::Call(_) => Kind::Call,
            Message::Reply(_) => Kind::Reply,
            Message::Proof(_) => Kind::Proof,
        }
    }

    /// The whole frame.
    pub fn encode(&self) -> Vec<u8> {
        seal(self.kind(), &self.encode_body())
    }

    /// The payload alone.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Message::Metadata(m) => m.write(&mut w),
            Message::Transfer(m) => m.write(&mut w),
            Message::Notification(m) => m.write(&mut w),
            Message::Completion(m) => m.write(&mut w),
            Message::Abort(m) => m.write(&mut w),
            Message::Challenge(m) => m.write(&mut w),
            Message::Hello(m) => m.write(&mut w),
            Message::Call(m) => {
                w.u64(m.call_id);
                w.bytes(&m.payload);
            }
            Message::Reply(m) => {
                w.u64(m.call_id);
                w.bytes(&m.payload);
            }
            Message::Proof(m) => w.bytes(&m.proof),
        }
        w.buf
    }

    /// Exactly one frame, with the default payload cap.
    pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
        Message::decode_with_limit(frame, DEFAULT_MAX_PAYLOAD)
    }

    pub fn decode_with_limit(frame: &[u8], max_payload: u32) -> Result<Message, WireError> {
        let (kind, body) = open(frame, max_payload)?;
        Message::decode_body(kind, body)
    }

    /// A payload of the given kind, without the frame (what the fuzz targets drive directly).
    pub fn decode_body(kind: Kind, body: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader::new(body);
        let m = match kind {
            Kind::Metadata => Message::Metadata(AgentMetadata::read(&mut r)?),
            Kind::Transfer => Message::Transfer(TransferNotice::read(&mut r)?),
            Kind::Notification => Message::Notification(Notification::read(&mut r)?),
            Kind::Completion => Message::Completion(Completion::read(&mut r)?),
            Kind::Abort => Message::Abort(Abort::read(&mut r)?),
            Kind::Challenge => Message::Challenge(Challenge::read(&mut r)?),
            Kind::Hello => Message::Hello(Hello::read(&mut r)?),
            Kind::Call => Message::Call(Call {
                call_id: r.u64("call_id")?,
                payload: r.bytes("payload", MAX_CALL_LEN)?.to_vec(),
            }),
            Kind::Reply => Message::Reply(Reply {
                call_id: r.u64("call_id")?,
                payload: r.bytes("payload", MAX_CALL_LEN)?.to_vec(),
            }),
            Kind::Proof => Message::Proof(Proof {
                proof: read_proof(&mut r)?,
            }),
        };
        r.finish()?;
        Ok(m)
    }
}

macro_rules! into_message {
    ($($t:ident),*) => {$(
        impl From<$t> for Message {
            fn from(m: $t) -> Message {
                Message::$t(m)
            }
        }
    )*};
}
into_message!(
    Notification,
    Completion,
    Abort,
    Challenge,
    Hello,
    Call,
    Reply,
    Proof
);

/// A proof: empty (no token) or one HMAC-SHA256.
fn read_proof(r: &mut Reader<'_>) -> Result<Vec<u8>, WireError> {
    let proof = r.bytes("proof", 64)?.to_vec();
    if !(proof.is_empty() || proof.len() == 32) {
        return Err(WireError::Invalid {
            field: "proof",
            reason: format!("{} bytes; expected 0 or 32", proof.len()),
        });
    }
    Ok(proof)
}

fn read_nonce(r: &mut Reader<'_>) -> Result<[u8; 32], WireError> {
    let mut nonce = [0u8; 32];
    for b in nonce.iter_mut() {
        *b = r.u8("nonce")?;
    }
    Ok(nonce)
}

impl From<AgentMetadata> for Message {
    fn from(m: AgentMetadata) -> Message {
        Message::Metadata(m)
    }
}

impl From<TransferNotice> for Message {
    fn from(m: TransferNotice) -> Message {
        Message::Transfer(m)
    }
}

fn nonempty_name(field: &'static str, s: String) -> Result<String, WireError> {
    if s.is_empty() {
        return Err(WireError::Invalid {
            field,
            reason: "must not be empty".into(),
        });
    }
    Ok(s)
}

impl AgentMetadata {
    fn write(&self, w: &mut Writer) {
        w.str(&self.name);
        w.u16(self.protocol_version);
        w.count(self.endpoints.len());
        for e in &self.endpoints {
            w.str(&e.transport);
            w.bytes(&e.address);
        }
        w.count(self.regions.len());
        for r in &self.regions {
            w.u32(r.id.0);
            write_region(w, &r.region);
            w.count(r.keys.len());
            for k in &r.keys {
                w.str(&k.transport);
                w.bytes(&k.key);
            }
        }
        w.count(self.caches.len());
        for c in &self.caches {
            w.u32(c.region.0);
            w.u32(c.tp_size);
            w.u32(c.tp_rank);
            w.u8(u8::from(c.staged));
            write_layout(w, &c.layout);
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<AgentMetadata, WireError> {
        let name = nonempty_name("name", r.string("name", MAX_NAME_LEN)?)?;
        let protocol_version = r.u16("protocol_version")?;
        let n = r.count("endpoints", 8, MAX_ENDPOINTS)?;
        let mut endpoints = Vec::with_capacity(n);
        for _ in 0..n {
            endpoints.push(Endpoint {
                transport: nonempty_name("transport", r.string("transport", MAX_TRANSPORT_LEN)?)?,
                address: r.bytes("address", MAX_BLOB_LEN)?.to_vec(),
            });
        }
        let n = r.count("regions", 4 + REGION_LEN + 4, crate::region::MAX_REGIONS)?;
        let mut regions = Vec::with_capacity(n);
        let mut table = RegionTable::new();
        for _ in 0..n {
            let id = RegionId(r.u32("region_id")?);
            let region = read_region(r)?;
            table
                .insert_with_id(id, region)
                .map_err(|e| WireError::Invalid {
                    field: "regions",
                    reason: e.to_string(),
                })?;
            let k = r.count("keys", 8, MAX_KEYS_PER_REGION)?;
            let mut keys = Vec::with_capacity(k);
            for _ in 0..k {
                keys.push(TransportKey {
                    transport: nonempty_name(
                        "transport",
                        r.string("transport", MAX_TRANSPORT_LEN)?,
                    )?,
                    key: r.bytes("key", MAX_BLOB_LEN)?.to_vec(),
                });
            }
            regions.push(ExportedRegion { id, region, keys });
        }
        let n = r.count("caches", 13 + MIN_LAYOUT_LEN, MAX_CACHES)?;
        let mut caches = Vec::with_capacity(n);
        for _ in 0..n {
            let region = RegionId(r.u32("cache_region")?);
            let tp_size = r.u32("tp_size")?;
            let tp_rank = r.u32("tp_rank")?;
            if tp_size == 0 || tp_rank >= tp_size {
                return Err(WireError::Invalid {
                    field: "tp_rank",
                    reason: format!("rank {tp_rank} of TP size {tp_size}"),
                });
            }
            let staged = match r.u8("staged")? {
                0 => false,
                1 => true,
                v => {
                    return Err(WireError::Invalid {
                        field: "staged",
                        reason: format!("{v} is not a boolean"),
                    })
                }
            };
            let layout = read_layout(r)?;
            let reg = table.get(region).ok_or_else(|| WireError::Invalid {
                field: "cache_region",
                reason: format!("region {region} is not exported"),
            })?;
            if layout.span_bytes() > reg.len {
                return Err(WireError::Invalid {
                    field: "cache_region",
                    reason: format!(
                        "layout spans {} bytes but region {region} has {}",
                        layout.span_bytes(),
                        reg.len
                    ),
                });
            }
            caches.push(ExportedCache {
                region,
                layout,
                tp_size,
                tp_rank,
                staged,
            });
        }
        Ok(AgentMetadata {
            name,
            protocol_version,
            endpoints,
            regions,
            caches,
        })
    }
}

const REGION_LEN: usize = 1 + 4 + 8 + 8;
const DESCRIPTOR_LEN: usize = 4 + 8 + 8;

fn write_region(w: &mut Writer, r: &Region) {
    let (code, index) = r.kind.to_code();
    w.u8(code);
    w.u32(index);
    w.u64(r.base);
    w.u64(r.len);
}

fn read_region(r: &mut Reader<'_>) -> Result<Region, WireError> {
    let code = r.u8("mem_kind")?;
    let index = r.u32("mem_index")?;
    let kind = MemKind::from_code(code, index).ok_or_else(|| WireError::Invalid {
        field: "mem_kind",
        reason: format!("unknown memory kind {code} (index {index})"),
    })?;
    Ok(Region {
        kind,
        base: r.u64("region_base")?,
        len: r.u64("region_len")?,
    })
}

pub(crate) fn write_geometry(w: &mut Writer, g: &Geometry) {
    w.u32(g.layers);
    w.u32(g.kv_heads);
    match g.head {
        HeadShape::Mha { k_size, v_size } => {
            w.u8(0);
            w.u32(k_size);
            w.u32(v_size);
        }
        HeadShape::Mla { latent } => {
            w.u8(1);
            w.u32(latent);
            w.u32(0);
        }
    }
    w.u8(g.dtype.code());
    w.u32(g.block_tokens);
}

pub(crate) fn read_geometry(r: &mut Reader<'_>) -> Result<Geometry, WireError> {
    let layers = r.u32("layers")?;
    let kv_heads = r.u32("kv_heads")?;
    let head = match r.u8("head_kind")? {
        0 => HeadShape::Mha {
            k_size: r.u32("k_size")?,
            v_size: r.u32("v_size")?,
        },
        1 => {
            let latent = r.u32("latent")?;
            let pad = r.u32("latent_pad")?;
            if pad != 0 {
                return Err(WireError::Reserved {
                    field: "latent_pad",
                    value: u64::from(pad),
                });
            }
            HeadShape::Mla { latent }
        }
        k => {
            return Err(WireError::Invalid {
                field: "head_kind",
                reason: format!("unknown head kind {k}"),
            })
        }
    };
    let code = r.u8("dtype")?;
    let dtype = Dtype::from_code(code).ok_or_else(|| WireError::Invalid {
        field: "dtype",
        reason: format!("unknown dtype code {code}"),
    })?;
    let block_tokens = r.u32("block_tokens")?;
    Ok(Geometry {
        layers,
        kv_heads,
        head,
        dtype,
        block_tokens,
    }
    .validated()?)
}

const MIN_LAYOUT_LEN: usize = 22 + 4 + 1 + 1 + 24;

fn write_layout(w: &mut Writer, l: &CacheLayout) {
    write_geometry(w, l.geometry());
    w.u32(l.num_blocks());
    w.u8(l.order().map_or(0, StrideOrder::code));
    match l.layers() {
        LayerPlacement::Strided { first, stride } => {
            w.u8(0);
            w.u64(*first);
            w.u64(*stride);
        }
        LayerPlacement::Explicit(v) => {
            w.u8(1);
            w.count(v.len());
            for o in v {
                w.u64(*o);
            }
        }
    }
    let (b, h, t) = l.strides();
    w.u64(b);
    w.u64(h);
    w.u64(t);
}

fn read_layout(r: &mut Reader<'_>) -> Result<CacheLayout, WireError> {
    let geometry = read_geometry(r)?;
    let num_blocks = r.u32("num_blocks")?;
    let order = match r.u8("stride_order")? {
        0 => None,
        c => Some(StrideOrder::from_code(c).ok_or_else(|| WireError::Invalid {
            field: "stride_order",
            reason: format!("unknown stride order code {c}"),
        })?),
    };
    let layers = match r.u8("layer_placement")? {
        0 => LayerPlacement::Strided {
            first: r.u64("layer_first")?,
            stride: r.u64("layer_stride")?,
        },
        1 => {
            let n = r.count("layer_offsets", 8, crate::geometry::MAX_LAYERS as usize)?;
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                v.push(r.u64("layer_offset")?);
            }
            LayerPlacement::Explicit(v)
        }
        p => {
            return Err(WireError::Invalid {
                field: "layer_placement",
                reason: format!("unknown placement {p}"),
            })
        }
    };
    let (b, h, t) = (
        r.u64("block_stride")?,
        r.u64("head_stride")?,
        r.u64("token_stride")?,
    );
    let layout = CacheLayout::from_strides(geometry, num_blocks, layers, b, h, t)?;
    match order {
        None => Ok(layout),
        Some(o) => {
            // A name is a claim about the strides; accept it only if they agree.
            let named = CacheLayout::named(geometry, num_blocks, o)?;
            if named.strides() != layout.strides() || named.layers() != layout.layers() {
                return Err(WireError::Invalid {
                    field: "stride_order",
                    reason: format!("strides do not match the named order {o}"),
                });
            }
            Ok(named)
        }
    }
}

impl TransferNotice {
    fn write(&self, w: &mut Writer) {
        w.u64(self.transfer_id);
        w.u8(match self.op {
            Op::Read => 1,
            Op::Write => 2,
        });
        w.str(&self.initiator);
        w.count(self.descriptors.len());
        for d in &self.descriptors {
            w.u32(d.region.0);
            w.u64(d.offset);
            w.u64(d.len);
        }
        match &self.notification {
            None => w.u8(0),
            Some(n) => {
                w.u8(1);
                w.bytes(n);
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<TransferNotice, WireError> {
        let transfer_id = r.u64("transfer_id")?;
        let op = match r.u8("op")? {
            1 => Op::Read,
            2 => Op::Write,
            o => {
                return Err(WireError::Invalid {
                    field: "op",
                    reason: format!("unknown operation {o}"),
                })
            }
        };
        let initiator = nonempty_name("initiator", r.string("initiator", MAX_NAME_LEN)?)?;
        let n = r.count("descriptors", DESCRIPTOR_LEN, MAX_DESCRIPTORS)?;
        let mut descriptors = Vec::with_capacity(n);
        for _ in 0..n {
            let d = Descriptor {
                region: RegionId(r.u32("desc_region")?),
                offset: r.u64("desc_offset")?,
                len: r.u64("desc_len")?,
            };
            if d.len == 0 || d.offset.checked_add(d.len).is_none() {
                return Err(WireError::Invalid {
                    field: "descriptors",
                    reason: format!("empty or wrapping descriptor {d:?}"),
                });
            }
            descriptors.push(d);
        }
        let notification = match r.u8("has_notification")? {
            0 => None,
            1 => Some(r.bytes("notification", MAX_NOTIFICATION_LEN)?.to_vec()),
            v => {
                return Err(WireError::Invalid {
                    field: "has_notification",
                    reason: format!("flag {v}"),
                })
            }
        };
        Ok(TransferNotice {
            transfer_id,
            op,
            initiator,
            descriptors,
            notification,
        })
    }
}

impl Notification {
    fn write(&self, w: &mut Writer) {
        w.str(&self.from);
        w.bytes(&self.payload);
    }

    fn read(r: &mut Reader<'_>) -> Result<Notification, WireError> {
        Ok(Notification {
            from: nonempty_name("from", r.string("from", MAX_NAME_LEN)?)?,
            payload: r.bytes("payload", MAX_NOTIFICATION_LEN)?.to_vec(),
        })
    }
}

impl Completion {
    fn write(&self, w: &mut Writer) {
        w.u64(self.transfer_id);
        match &self.status {
            Status::Ok => w.u8(0),
            Status::Failed { code, message } => {
                w.u8(1);
                w.u16(*code);
                w.str(message);
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Completion, WireError> {
        let transfer_id = r.u64("transfer_id")?;
        let status = match r.u8("status")? {
            0 => Status::Ok,
            1 => Status::Failed {
                code: r.u16("error_code")?,
                message: r.string("error_message", MAX_TEXT_LEN)?,
            },
            s => {
                return Err(WireError::Invalid {
                    field: "status",
                    reason: format!("unknown status {s}"),
                })
            }
        };
        Ok(Completion {
            transfer_id,
            status,
        })
    }
}

impl Abort {
    fn write(&self, w: &mut Writer) {
        w.u64(self.transfer_id);
        w.str(&self.reason);
    }

    fn read(r: &mut Reader<'_>) -> Result<Abort, WireError> {
        Ok(Abort {
            transfer_id: r.u64("transfer_id")?,
            reason: r.string("reason", MAX_TEXT_LEN)?,
        })
    }
}

impl Challenge {
    fn write(&self, w: &mut Writer) {
        w.buf.extend_from_slice(&self.nonce);
        w.str(&self.name);
    }

    fn read(r: &mut Reader<'_>) -> Result<Challenge, WireError> {
        let nonce = read_nonce(r)?;
        let name = nonempty_name("name", r.string("name", MAX_NAME_LEN)?)?;
        Ok(Challenge { nonce, name })
    }
}

impl Hello {
    fn write(&self, w: &mut Writer) {
        w.str(&self.name);
        w.u16(self.protocol_version);
        w.buf.extend_from_slice(&self.nonce);
        w.bytes(&self.proof);
    }

    fn read(r: &mut Reader<'_>) -> Result<Hello, WireError> {
        let name = nonempty_name("name", r.string("name", MAX_NAME_LEN)?)?;
        let protocol_version = r.u16("protocol_version")?;
        let nonce = read_nonce(r)?;
        let proof = read_proof(r)?;
        Ok(Hello {
            name,
            protocol_version,
            nonce,
            proof,
        })
    }
}
