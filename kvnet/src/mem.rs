//! The one place kvnet turns registered addresses into slices, and the claims that keep two
//! transfers from racing on the same bytes. Registration (`Agent::register`) carries the safety
//! contract; everything here works on descriptors of a live [`crate::registry::Hold`].

use std::sync::Arc;

use kvcore::Resolved;
use parking_lot::Mutex;

/// Refuses descriptors of device memory on paths that move bytes with the CPU.
pub(crate) fn host_only(rs: &[Resolved], side: &str) -> Result<(), crate::NetError> {
    match rs.iter().position(|r| {
        matches!(
            r.kind,
            kvcore::MemKind::Device { .. } | kvcore::MemKind::File { .. }
        )
    }) {
        Some(i) => Err(crate::NetError::Descriptors(format!(
            "{side} descriptor {i} is {:?} memory, which the TCP transport cannot reach (device \
             memory moves over UCX with CUDA, or is staged through pinned DRAM)",
            rs[i].kind
        ))),
        None => Ok(()),
    }
}

/// A resolved local descriptor as bytes to send.
///
/// # Safety
/// `r` must be one of a live [`crate::registry::Hold`]'s descriptors, and the slice must not
/// outlive the hold.
pub(crate) unsafe fn bytes<'a>(r: &Resolved) -> &'a [u8] {
    // SAFETY: the hold resolved `r` inside a region registered under `Agent::register`'s
    // contract (valid until deregistered), and `deregister` waits for the hold to drop; the
    // hold's claim keeps every writer of these bytes out while it lives.
    unsafe { std::slice::from_raw_parts(r.addr as *const u8, r.len as usize) }
}

/// A resolved local descriptor as bytes to fill.
///
/// # Safety
/// As for [`bytes`], and the hold must be a write hold (`Access::Write`), used by one task.
pub(crate) unsafe fn bytes_mut<'a>(r: &Resolved) -> &'a mut [u8] {
    // SAFETY: as above; the write claim excludes every other transfer touching these bytes, and
    // the registrant promised nothing outside kvnet touches them during transfers.
    unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len as usize) }
}

/// What a transfer does to our own memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reads it (we send it: a local WRITE, or serving a peer's READ).
    Read,
    /// Writes it (we receive into it: a local READ, or serving a peer's WRITE).
    Write,
}

/// Which bytes of our memory the transfers in flight read and write. Two transfers may read the
/// same bytes; a transfer that writes bytes excludes every other transfer that reads or writes
/// them, and one transfer may not write the same bytes twice. Without this, two transfers into
/// one buffer (two reads posted into the same blocks, a peer's WRITE racing a peer's READ of the
/// same bytes) would be two threads writing one location, or one reading what another writes:
/// a data race, whatever the safe API's caller meant.
#[derive(Default)]
pub(crate) struct Claims {
    inner: Mutex<(u64, Vec<Claim>)>,
}

struct Claim {
    id: u64,
    access: Access,
    /// Sorted, merged `[start, end)` per memory space.
    ranges: Vec<(u64, u64, u64)>,
}

/// Releases its claim when dropped (when the transfer can no longer touch the memory).
pub(crate) struct Claimed {
    claims: Arc<Claims>,
    id: u64,
}

/// The memory space a kind's addresses live in, as a number (host, each device, each file).
fn space(k: kvcore::MemKind) -> u64 {
    match k {
        kvcore::MemKind::Host | kvcore::MemKind::PinnedHost => 0,
        kvcore::MemKind::Device { ordinal } => 1 << 32 | u64::from(ordinal),
        kvcore::MemKind::File { file } => 2 << 32 | u64::from(file),
    }
}

impl Claims {
    pub fn claim(self: &Arc<Self>, access: Access, rs: &[Resolved]) -> Result<Claimed, String> {
        let mut ranges: Vec<(u64, u64, u64)> = rs
            .iter()
            .map(|r| (space(r.kind), r.addr, r.addr.saturating_add(r.len)))
            .collect();
        ranges.sort_unstable();
        // Merge, refusing a write that names the same bytes twice.
        let mut merged: Vec<(u64, u64, u64)> = Vec::with_capacity(ranges.len());
        for (sp, s, e) in ranges {
            match merged.last_mut() {
                Some(last) if last.0 == sp && s < last.2 && access == Access::Write => {
                    return Err(format!(
                        "one transfer writes the bytes at {s:#x} twice (overlapping local \
                         descriptors)"
                    ));
                }
                Some(last) if last.0 == sp && s <= last.2 => last.2 = last.2.max(e),
                _ => merged.push((sp, s, e)),
            }
        }
        let mut g = self.inner.lock();
        for c in &g.1 {
            if access == Access::Read && c.access == Access::Read {
                continue;
            }
            if let Some((sp, s, _)) = first_overlap(&merged, &c.ranges) {
                return Err(format!(
                    "the bytes at {s:#x} (space {sp:#x}) are {} by a transfer in flight",
                    if c.access == Access::Write {
                        "being written"
                    } else {
                        "being read"
                    }
                ));
            }
        }
        g.0 += 1;
        let id = g.0;
        g.1.push(Claim {
            id,
            access,
            ranges: merged,
        });
        Ok(Claimed {
            claims: self.clone(),
            id,
        })
    }
}

/// The first range of `a` that overlaps one of `b` (both sorted by space and start, merged).
fn first_overlap(a: &[(u64, u64, u64)], b: &[(u64, u64, u64)]) -> Option<(u64, u64, u64)> {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let (x, y) = (a[i], b[j]);
        if x.0 != y.0 {
            if x.0 < y.0 {
                i += 1;
            } else {
                j += 1;
            }
        } else if x.2 <= y.1 {
            i += 1;
        } else if y.2 <= x.1 {
            j += 1;
        } else {
            return Some(x);
        }
    }
    None
}

impl Drop for Claimed {
    fn drop(&mut self) {
        self.claims.inner.lock().1.retain(|c| c.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: u64, len: u64) -> Resolved {
        Resolved {
            kind: kvcore::MemKind::Host,
            addr,
            len,
        }
    }

    #[test]
    fn writers_exclude_everyone_and_readers_share() {
        let c = Arc::new(Claims::default());
        let w = c
            .claim(Access::Write, &[r(100, 50), r(300, 10)])
            .expect("write");
        assert!(c.claim(Access::Write, &[r(140, 20)]).is_err());
        assert!(c.claim(Access::Read, &[r(305, 1)]).is_err());
        c.claim(Access::Write, &[r(150, 150)])
            .expect("adjacent, not overlapping");
        drop(w);
        let a = c.claim(Access::Read, &[r(100, 50)]).expect("read");
        let b = c.claim(Access::Read, &[r(120, 50)]).expect("readers share");
        assert!(c.claim(Access::Write, &[r(160, 5)]).is_err());
        drop((a, b));
        c.claim(Access::Write, &[r(160, 5)]).expect("free again");
        // One transfer writing the same bytes twice; reading them twice is fine.
        assert!(c.claim(Access::Write, &[r(0, 10), r(5, 10)]).is_err());
        c.claim(Access::Read, &[r(0, 10), r(5, 10)]).expect("reads");
        // Another memory space at the same address does not collide.
        let dev = Resolved {
            kind: kvcore::MemKind::Device { ordinal: 0 },
            addr: 100,
            len: 50,
        };
        let _w = c.claim(Access::Write, &[r(100, 50)]).expect("host");
        c.claim(Access::Write, &[dev]).expect("device");
    }
}
