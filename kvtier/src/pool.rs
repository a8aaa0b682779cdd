//! G2: the pinned host DRAM pool. One large allocation cut into fixed-size slots; page-locked
//! when the system allows (so DMA engines and RDMA NICs can use it without a bounce buffer) and
//! registered with io_uring so DRAM↔NVMe needs no extra copy.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use kvcore::{MemKind, Region};
use parking_lot::Mutex;

use crate::error::TierError;

/// Slots are multiples of this so O_DIRECT I/O can use them in place.
pub const ALIGN: usize = 4096;

pub fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Slot size rounded up to 4 KiB, and the pool's total length in bytes.
pub(crate) fn pool_size(slot_bytes: u64, slots: u32) -> Result<(u64, usize), TierError> {
    let slot = round_up(slot_bytes.max(1), ALIGN as u64);
    let len = slot
        .checked_mul(u64::from(slots))
        .filter(|&l| l > 0 && l <= isize::MAX as u64)
        .ok_or_else(|| TierError::Config(format!("pool of {slots} x {slot} bytes")))?;
    Ok((slot, len as usize))
}

type Release = Box<dyn FnOnce(*mut u8, usize) + Send + Sync>;

pub struct PinnedPool {
    ptr: NonNull<u8>,
    len: usize,
    slot_bytes: usize,
    slots: u32,
    free: Mutex<Vec<u32>>,
    locked: bool,
    release: Mutex<Option<Release>>,
}

// SAFETY: the pool owns its allocation; slot memory is handed out by index and accessed through
// raw pointers whose exclusive use is the caller's contract (see `slot_ptr`).
unsafe impl Send for PinnedPool {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for PinnedPool {}

static UNLOCKED_WARNED: AtomicBool = AtomicBool::new(false);

impl PinnedPool {
    /// Allocates `slots` slots of at least `slot_bytes` (rounded up to 4 KiB) with mmap, asks for
    /// transparent huge pages, pre-faults the memory, and page-locks it; if locking is refused
    /// (RLIMIT_MEMLOCK), the pool runs unlocked and says so once in the log.
    pub fn new(slot_bytes: u64, slots: u32) -> Result<PinnedPool, TierError> {
        let (slot_bytes, len) = pool_size(slot_bytes, slots)?;
        // SAFETY: anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(TierError::Config(format!(
                "cannot map a {len}-byte pool: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `ptr..ptr+len` is the mapping just created; advice and locking do not change
        // its contents.
        let locked = unsafe {
            if len >= 2 << 20 {
                libc::madvise(ptr, len, libc::MADV_HUGEPAGE);
            }
            libc::mlock(ptr, len) == 0
        };
        if !locked && !UNLOCKED_WARNED.swap(true, Ordering::Relaxed) {
            log::warn!(
                "kvferry: cannot page-lock the {len}-byte DRAM pool ({}); running unlocked. \
                 Raise RLIMIT_MEMLOCK (ulimit -l) for pinned transfers.",
                std::io::Error::last_os_error()
            );
        }
        let release: Release = Box::new(|p, l| {
            // SAFETY: unmaps exactly the mapping created above, once, when the pool drops.
            unsafe {
                libc::munmap(p.cast(), l);
            }
        });
        Ok(PinnedPool {
            ptr: NonNull::new(ptr.cast())
                .ok_or_else(|| TierError::Config("mmap returned null".into()))?,
            len,
            slot_bytes: slot_bytes as usize,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
            locked,
            release: Mutex::new(Some(release)),
        })
    }

    /// Wraps memory allocated elsewhere — the hook for CUDA's `cuMemHostAlloc`, whose pages are
    /// pinned and mapped for the device.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be valid, writable, 4 KiB aligned and owned by the pool until
    /// `release(ptr, len)` is called when the pool drops.
    pub unsafe fn from_raw(
        ptr: NonNull<u8>,
        len: usize,
        slot_bytes: u64,
        locked: bool,
        release: Release,
    ) -> Result<PinnedPool, TierError> {
        let slot_bytes = round_up(slot_bytes.max(1), ALIGN as u64) as usize;
        if ptr.as_ptr() as usize % ALIGN != 0 || len < slot_bytes {
            return Err(TierError::Config(
                "external pool memory must be 4 KiB aligned and hold at least one slot".into(),
            ));
        }
        let slots = u32::try_from(len / slot_bytes).unwrap_or(u32::MAX);
        Ok(PinnedPool {
            ptr,
            len,
            slot_bytes,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
            locked,
            release: Mutex::new(Some(release)),
        })
    }

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes as u64
    }

    pub fn slots(&self) -> u32 {
        self.slots
    }

    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub fn base(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pool as a region to register with copy engines and transports.
    pub fn region(&self) -> Region {
        Region {
            kind: if self.locked {
                MemKind::PinnedHost
            } else {
                MemKind::Host
            },
            base: self.base(),
            len: self.len as u64,
        }
    }

    pub fn alloc(&self) -> Option<u32> {
        self.free.lock().pop()
    }

    pub fn free(&self, slot: u32) {
        debug_assert!(slot < self.slots);
        let mut f = self.free.lock();
        debug_assert!(!f.contains(&slot), "slot {slot} freed twice");
        f.push(slot);
    }

    pub fn free_slots(&self) -> u32 {
        self.free.lock().len() as u32
    }

    pub fn slot_offset(&self, slot: u32) -> u64 {
        u64::from(slot) * self.slot_bytes as u64
    }

    /// Address of a slot. Whoever allocated the slot decides who may touch it.
    pub fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} out of range");
        // SAFETY: in bounds of the allocation by the assertion above.
        unsafe { self.ptr.as_ptr().add(slot as usize * self.slot_bytes) }
    }

    /// A slot's bytes.
    ///
    /// # Safety
    /// No copy or I/O may be writing the slot while the slice lives.
    pub unsafe fn slot(&self, slot: u32) -> &[u8] {
        // SAFETY: in bounds (see `slot_ptr`); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), self.slot_bytes) }
    }

    /// A slot's bytes, writable.
    ///
    /// # Safety
    /// The caller must have exclusive use of the slot while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slot_mut(&self, slot: u32) -> &mut [u8] {
        // SAFETY: in bounds (see `slot_ptr`); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.slot_bytes) }
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        if let Some(release) = self.release.lock().take() {
            release(self.ptr.as_ptr(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_recycled() {
        let p = PinnedPool::new(5000, 4).expect("small pool");
        assert_eq!(p.slot_bytes(), 8192);
        assert_eq!(p.base() % ALIGN as u64, 0);
        let a: Vec<u32> = (0..4).filter_map(|_| p.alloc()).collect();
        assert_eq!(a.len(), 4);
        assert_eq!(p.alloc(), None, "an empty pool says so");
        p.free(a[2]);
        assert_eq!(p.alloc(), Some(a[2]));
        // SAFETY: this test owns every slot.
        unsafe {
            p.slot_mut(1).fill(7);
            assert!(p.slot(1).iter().all(|&b| b == 7));
            assert!(p.slot(0).iter().all(|&b| b == 0));
        }
    }
}
