//! Registered memory and the descriptors that point into it. Every descriptor that arrives from a
//! peer is resolved here, against what was registered, before any byte is touched.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::RegionError;

/// What kind of memory a region is. Host and pinned host memory share one address space; each
/// device and each file is its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemKind {
    Host,
    PinnedHost,
    Device { ordinal: u32 },
    File { file: u32 },
}

impl MemKind {
    fn space(self) -> Space {
        match self {
            MemKind::Host | MemKind::PinnedHost => Space::Host,
            MemKind::Device { ordinal } => Space::Device(ordinal),
            MemKind::File { file } => Space::File(file),
        }
    }

    /// Wire code and index (ordinal or file id).
    pub fn to_code(self) -> (u8, u32) {
        match self {
            MemKind::Host => (0, 0),
            MemKind::PinnedHost => (1, 0),
            MemKind::Device { ordinal } => (2, ordinal),
            MemKind::File { file } => (3, file),
        }
    }

    pub fn from_code(code: u8, index: u32) -> Option<MemKind> {
        Some(match code {
            0 if index == 0 => MemKind::Host,
            1 if index == 0 => MemKind::PinnedHost,
            2 => MemKind::Device { ordinal: index },
            3 => MemKind::File { file: index },
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Space {
    Host,
    Device(u32),
    File(u32),
}

impl fmt::Display for Space {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Space::Host => f.write_str("host"),
            Space::Device(n) => write!(f, "device {n}"),
            Space::File(n) => write!(f, "file {n}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionId(pub u32);

impl fmt::Display for RegionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A registered range: an address (or file offset) and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub kind: MemKind,
    pub base: u64,
    pub len: u64,
}

/// `len` bytes at `offset` inside a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    pub region: RegionId,
    pub offset: u64,
    pub len: u64,
}

/// A descriptor that passed the bounds check: the absolute address (or file offset) to touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub kind: MemKind,
    pub addr: u64,
    pub len: u64,
}

/// Regions keyed by id, with an address index that rejects overlapping registrations and finds
/// the region holding a raw `(addr, len)` (the way NIXL descriptors name memory).
#[derive(Clone, Debug, Default)]
pub struct RegionTable {
    regions: BTreeMap<RegionId, Region>,
    by_addr: BTreeMap<(Space, u64), RegionId>,
    next_id: u32,
}

/// Enough for any engine; bounds the memory a peer's metadata can make us hold.
pub const MAX_REGIONS: usize = 1 << 16;

impl RegionTable {
    pub fn new() -> RegionTable {
        RegionTable::default()
    }

    /// Registers a region under a fresh id.
    pub fn insert(&mut self, region: Region) -> Result<RegionId, RegionError> {
        let mut id = RegionId(self.next_id);
        while self.regions.contains_key(&id) {
            id = RegionId(id.0.wrapping_add(1));
        }
        self.insert_with_id(id, region)?;
        self.next_id = id.0.wrapping_add(1);
        Ok(id)
    }

    /// Registers a region under an id chosen elsewhere (a peer's table, mirrored).
    pub fn insert_with_id(&mut self, id: RegionId, region: Region) -> Result<(), RegionError> {
        if region.len == 0 {
            return Err(RegionError::EmptyRegion);
        }
        let end = region
            .base
            .checked_add(region.len)
            .ok_or(RegionError::Wraps {
                base: region.base,
                len: region.len,
            })?;
        if self.regions.len() >= MAX_REGIONS {
            return Err(RegionError::Full(self.regions.len()));
        }
        if self.regions.contains_key(&id) {
            return Err(RegionError::DuplicateId(id.0));
        }
        let space = region.kind.space();
        // Only the nearest region at or below `base` and the nearest above can overlap.
        let below = self
            .by_addr
            .range((space, 0)..=(space, region.base))
            .next_back();
        let above = self
            .by_addr
            .range((space, region.base)..(space, end))
            .next();
        for (_, rid) in below.into_iter().chain(above) {
            let other = self.regions[rid];
            if other.base < end && region.base < other.base + other.len {
                return Err(self.overlap(region, *rid, other));
            }
        }
        self.regions.insert(id, region);
        self.by_addr.insert((space, region.base), id);
        Ok(())
    }

    fn overlap(&self, region: Region, id: RegionId, other: Region) -> RegionError {
        RegionError::Overlap {
            base: region.base,
            len: region.len,
            existing: id.0,
            existing_base: other.base,
            existing_len: other.len,
        }
    }

    pub fn remove(&mut self, id: RegionId) -> Result<Region, RegionError> {
        let r = self
            .regions
            .remove(&id)
            .ok_or(RegionError::UnknownRegion(id.0))?;
        self.by_addr.remove(&(r.kind.space(), r.base));
        Ok(r)
    }

    pub fn get(&self, id: RegionId) -> Option<&Region> {
        self.regions.get(&id)
    }

    pub fn iter(&self) -> impl Iterator<Item = (RegionId, &Region)> {
        self.regions.iter().map(|(id, r)| (*id, r))
    }

    pub fn len(&self) -> usize {
        self.regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Bounds-checks one descriptor.
    pub fn resolve(&self, d: &Descriptor) -> Result<Resolved, RegionError> {
        self.resolve_at(0, d)
    }

    fn resolve_at(&self, index: usize, d: &Descriptor) -> Result<Resolved, RegionError> {
        let r = self
            .regions
            .get(&d.region)
            .ok_or(RegionError::UnknownRegion(d.region.0))?;
        if d.len == 0 {
            return Err(RegionError::EmptyDescriptor { index });
        }
        let inside = d.offset.checked_add(d.len).is_some_and(|end| end <= r.len);
        if !inside {
            return Err(RegionError::OutOfBounds {
                index,
                region: d.region.0,
                offset: d.offset,
                len: d.len,
                region_len: r.len,
            });
        }
        Ok(Resolved {
            kind: r.kind,
            addr: r.base + d.offset,
            len: d.len,
        })
    }

    /// Bounds-checks a whole list; the first bad descriptor fails it all, so nothing is touched.
    pub fn resolve_all(&self, descs: &[Descriptor]) -> Result<Vec<Resolved>, RegionError> {
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| self.resolve_at(i, d))
            .collect()
    }

    /// The region holding `[addr, addr + len)` in the address space of `kind`, and the offset.
    pub fn find(&self, kind: MemKind, addr: u64, len: u64) -> Result<Descriptor, RegionError> {
        let space = kind.space();
        let unregistered = || RegionError::Unregistered {
            space: space.to_string(),
            addr,
            len,
        };
        let (_, id) = self
            .by_addr
            .range((space, 0)..=(space, addr))
            .next_back()
            .ok_or_else(unregistered)?;
        let r = self.regions[id];
        let offset = addr - r.base;
        let inside = len > 0 && offset.checked_add(len).is_some_and(|end| end <= r.len);
        if !inside {
            return Err(unregistered());
        }
        Ok(Descriptor {
            region: *id,
            offset,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(base: u64, len: u64) -> Region {
        Region {
            kind: MemKind::Host,
            base,
            len,
        }
    }

    #[test]
    fn overlapping_registrations_are_rejected_per_address_space() {
        let mut t = RegionTable::new();
        let a = t.insert(host(1000, 100)).expect("first");
        assert!(matches!(
            t.insert(host(1050, 10)),
            Err(RegionError::Overlap { .. })
        ));
        assert!(matches!(
            t.insert(host(900, 101)),
            Err(RegionError::Overlap { .. })
        ));
        assert!(matches!(
            t.insert(Region {
                kind: MemKind::PinnedHost,
                base: 1099,
                len: 5
            }),
            Err(RegionError::Overlap { .. })
        ));
        t.insert(host(900, 100)).expect("adjacent below");
        t.insert(host(1100, 100)).expect("adjacent above");
        t.insert(Region {
            kind: MemKind::Device { ordinal: 0 },
            base: 1000,
            len: 100,
        })
        .expect("another address space");
        assert_eq!(t.insert(host(5, 0)), Err(RegionError::EmptyRegion));
        assert!(matches!(
            t.insert(host(u64::MAX, 2)),
            Err(RegionError::Wraps { .. })
        ));
        t.remove(a).expect("registered");
        t.insert(host(1050, 10)).expect("space freed");
    }

    #[test]
    fn descriptors_are_bounds_checked() {
        let mut t = RegionTable::new();
        let id = t.insert(host(4096, 1024)).expect("ok");
        let ok = Descriptor {
            region: id,
            offset: 1000,
            len: 24,
        };
        assert_eq!(
            t.resolve(&ok),
            Ok(Resolved {
                kind: MemKind::Host,
                addr: 5096,
                len: 24
            })
        );
        let past = Descriptor { len: 25, ..ok };
        let wrap = Descriptor {
            offset: u64::MAX,
            len: 2,
            ..ok
        };
        let unknown = Descriptor {
            region: RegionId(77),
            ..ok
        };
        let err = t
            .resolve_all(&[ok, past])
            .expect_err("second is past the end");
        assert!(
            matches!(err, RegionError::OutOfBounds { index: 1, .. }),
            "{err}"
        );
        assert!(t.resolve(&wrap).is_err());
        assert_eq!(t.resolve(&unknown), Err(RegionError::UnknownRegion(77)));
        assert!(t.resolve(&Descriptor { len: 0, ..ok }).is_err());
    }

    #[test]
    fn raw_addresses_find_their_region() {
        let mut t = RegionTable::new();
        let a = t.insert(host(4096, 1024)).expect("ok");
        let b = t.insert(host(8192, 1024)).expect("ok");
        assert_eq!(
            t.find(MemKind::Host, 4096 + 10, 10)
                .map(|d| (d.region, d.offset)),
            Ok((a, 10))
        );
        assert_eq!(
            t.find(MemKind::PinnedHost, 8192, 1024).map(|d| d.region),
            Ok(b)
        );
        assert!(
            t.find(MemKind::Host, 4096 + 1000, 100).is_err(),
            "straddles the end"
        );
        assert!(t.find(MemKind::Host, 100, 1).is_err());
        assert!(t.find(MemKind::Device { ordinal: 0 }, 4096, 1).is_err());
    }
}
