//! Page-locked host memory from CUDA for G2. `cuMemHostAlloc` pages are pinned and mapped into
//! every context (portable + device-mapped), so DMA needs no bounce buffer and the copy kernel can
//! write them directly; `cuMemHostRegister` does the same for memory allocated elsewhere.

use std::ptr::NonNull;

use cudarc::driver::sys;

use super::{driver_error, Gpu};
use crate::error::{CopyError, TierError};
use crate::pool::{pool_size, PinnedPool};

const FLAGS: u32 = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;

/// A G2 pool of `slots` slots of at least `slot_bytes` in CUDA pinned memory.
pub fn pinned_pool(gpu: &Gpu, slot_bytes: u64, slots: u32) -> Result<PinnedPool, TierError> {
    let (slot, len) = pool_size(slot_bytes, slots)?;
    gpu.bind()?;
    let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: writes one host pointer; freed once by the pool's release closure.
    unsafe { sys::cuMemHostAlloc(&mut ptr, len, FLAGS) }
        .result()
        .map_err(|e| {
            TierError::Copy(driver_error(
                &format!("cuMemHostAlloc of a {len}-byte pinned pool"),
                e,
            ))
        })?;
    let ptr = NonNull::new(ptr.cast::<u8>())
        .ok_or_else(|| TierError::Config("cuMemHostAlloc returned null".into()))?;
    let owner = gpu.clone();
    let release = Box::new(move |p: *mut u8, _len: usize| {
        if owner.bind().is_ok() {
            // SAFETY: frees the allocation made above, once, when the pool drops.
            unsafe { sys::cuMemFreeHost(p.cast()) };
        }
    });
    // SAFETY: `ptr..ptr+len` is the fresh allocation (page aligned), owned by the pool until
    // `release` runs.
    unsafe { PinnedPool::from_raw(ptr, len, slot, true, release) }
}

/// Host memory pinned and mapped for the device with `cuMemHostRegister` until dropped.
pub struct HostRegistration {
    gpu: Gpu,
    ptr: u64,
}

impl HostRegistration {
    /// # Safety
    /// `ptr..ptr+len` must be valid host memory that outlives the registration.
    pub unsafe fn new(gpu: &Gpu, ptr: *mut u8, len: usize) -> Result<HostRegistration, CopyError> {
        gpu.bind()?;
        // SAFETY: forwarded from this function's contract.
        unsafe {
            sys::cuMemHostRegister_v2(
                ptr.cast(),
                len,
                sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
            )
        }
        .result()
        .map_err(|e| driver_error("cuMemHostRegister", e))?;
        Ok(HostRegistration {
            gpu: gpu.clone(),
            ptr: ptr as u64,
        })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: undoes the registration made in `new`, once.
            unsafe { sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
        }
    }
}
