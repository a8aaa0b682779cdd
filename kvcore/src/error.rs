//! One error type per concern. Every mismatch names the field and both values, so an operator
//! reading a log line knows which side to fix.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GeometryError {
    #[error("geometry field `{field}` = {value} {reason}")]
    Invalid {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("geometry mismatch in `{field}`: ours is {ours}, theirs is {theirs}")]
    Mismatch {
        field: &'static str,
        ours: String,
        theirs: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error("unknown KV layout name `{0}` (expected one of LBNHC, LBHNC, LHBNC, BLHNC, BLNHC, BHLNC, NHD, HND)")]
    UnknownName(String),
    #[error("layout field `{field}` = {value}: {reason}")]
    Invalid {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("layout has {got} layer offsets but the geometry has {expected} layers")]
    LayerCount { expected: u32, got: usize },
    #[error("layout strides make distinct elements overlap ({detail})")]
    Overlap { detail: String },
    #[error("layout spans more than 2^64 bytes")]
    TooLarge,
    #[error("{what} {value} is out of range 0..{bound}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        bound: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("block hash is {len} bytes; kvferry keeps at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("block hash is empty")]
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegionError {
    #[error("region has zero length")]
    EmptyRegion,
    #[error("region base {base:#x} + length {len} wraps the address space")]
    Wraps { base: u64, len: u64 },
    #[error("region [{base:#x}, +{len}) overlaps registered region {existing} [{existing_base:#x}, +{existing_len})")]
    Overlap {
        base: u64,
        len: u64,
        existing: u32,
        existing_base: u64,
        existing_len: u64,
    },
    #[error("region id {0} is already registered")]
    DuplicateId(u32),
    #[error("region {0} is not registered")]
    UnknownRegion(u32),
    #[error("descriptor {index} has zero length")]
    EmptyDescriptor { index: usize },
    #[error("descriptor {index} (region {region}, offset {offset}, len {len}) runs past the region's {region_len} bytes")]
    OutOfBounds {
        index: usize,
        region: u32,
        offset: u64,
        len: u64,
        region_len: u64,
    },
    #[error("no registered {space} region holds [{addr:#x}, +{len})")]
    Unregistered { space: String, addr: u64, len: u64 },
    #[error("region table is full ({0} regions)")]
    Full(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{src} source blocks but {dst} destination blocks")]
    BlockCount { src: usize, dst: usize },
    #[error("{side} block id {id} is out of range: the cache has {num_blocks} blocks")]
    BlockOutOfRange {
        side: &'static str,
        id: u32,
        num_blocks: u32,
    },
    #[error("{side} {what} range {start}..{end} is out of range 0..{bound}")]
    RangeOutOfBounds {
        side: &'static str,
        what: &'static str,
        start: u32,
        end: u32,
        bound: u32,
    },
    #[error("plan needs {src_need} source and {dst_need} destination bytes; buffers have {src_have} and {dst_have}")]
    BufferTooSmall {
        src_need: u64,
        src_have: u64,
        dst_need: u64,
        dst_have: u64,
    },
    #[error("tensor-parallel mapping: {0}")]
    TensorParallel(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("frame is truncated: `{field}` needs {need} bytes, {have} left")]
    Truncated {
        field: &'static str,
        need: u64,
        have: u64,
    },
    #[error("bad frame magic {got:02x?}")]
    BadMagic { got: [u8; 4] },
    #[error("unsupported wire version {got}; this build speaks {supported}")]
    Version { got: u16, supported: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("frame checksum mismatch: computed {computed:#018x}, frame says {stored:#018x}")]
    Checksum { computed: u64, stored: u64 },
    #[error("reserved bits set in `{field}`: {value:#x}")]
    Reserved { field: &'static str, value: u64 },
    #[error("`{field}` has {count} entries, more than the {max} allowed")]
    TooMany {
        field: &'static str,
        count: u64,
        max: u64,
    },
    #[error("`{field}` is not valid UTF-8")]
    Utf8 { field: &'static str },
    #[error("invalid `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
}

impl From<GeometryError> for WireError {
    fn from(e: GeometryError) -> Self {
        WireError::Invalid {
            field: "geometry",
            reason: e.to_string(),
        }
    }
}

impl From<LayoutError> for WireError {
    fn from(e: LayoutError) -> Self {
        WireError::Invalid {
            field: "layout",
            reason: e.to_string(),
        }
    }
}

impl From<HashError> for WireError {
    fn from(e: HashError) -> Self {
        WireError::Invalid {
            field: "block_hash",
            reason: e.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SlotError {
    #[error("slot is empty (never written)")]
    Empty,
    #[error("slot header is {len} bytes, too short")]
    Short { len: usize },
    #[error("slot header has a bad magic")]
    Magic,
    #[error("slot format version {got} is not supported")]
    Version { got: u16 },
    #[error("slot header checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    HeaderChecksum { stored: u64, computed: u64 },
    #[error("slot header is malformed: {0}")]
    Malformed(&'static str),
    #[error("slot holds block {found}, expected {expected}")]
    WrongBlock { expected: String, found: String },
    #[error("slot was written under geometry {found:#018x}, expected {expected:#018x}")]
    Geometry { expected: u64, found: u64 },
    #[error("slot payload length mismatch: expected {expected}, header says {found}")]
    Length { expected: u64, found: u64 },
    #[error("slot payload checksum mismatch: stored {stored:#018x}, computed {computed:#018x}")]
    PayloadChecksum { stored: u64, computed: u64 },
}
