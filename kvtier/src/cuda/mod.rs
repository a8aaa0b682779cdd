//! The CUDA G1 path: device contexts, streams and events through cudarc with the driver and NVRTC
//! loaded at run time. Builds need no CUDA toolkit; on a machine without a driver or a GPU,
//! [`Gpu::open`] returns [`CopyError::NoGpu`] with the reason and everything else in kvferry
//! works as before.
//!
//! Raw driver calls live in this module and its children only, each behind a `// SAFETY:` note;
//! the rest of kvferry sees [`Gpu`], [`CudaCopy`] and [`pinned_pool`].

mod copy;
mod kernel;
mod pinned;

use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

pub use copy::{CopyMethod, CudaCopy, CudaCopyConfig, MethodChoice};
pub use pinned::{pinned_pool, HostRegistration};

use crate::error::CopyError;

/// One CUDA device, its primary context (the one PyTorch and vLLM use) and what kvferry learnt
/// about it when it was opened.
#[derive(Clone)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    info: Arc<GpuInfo>,
}

#[derive(Clone, Debug)]
pub struct GpuInfo {
    pub ordinal: u32,
    pub name: String,
    /// `cuDriverGetVersion`, e.g. 12080 or 13000.
    pub driver_version: i32,
    pub compute_capability: (i32, i32),
    pub total_mem: u64,
}

fn driver_error(what: &str, e: impl std::fmt::Display) -> CopyError {
    CopyError::Failed(format!("{what}: {e}"))
}

impl Gpu {
    /// Opens device `ordinal`. Without a loadable CUDA driver or without that device, the error
    /// says which; no call here can abort the process.
    pub fn open(ordinal: u32) -> Result<Gpu, CopyError> {
        // SAFETY: only tries to dlopen the driver library; nothing is called through it.
        if !unsafe { sys::is_culib_present() } {
            return Err(CopyError::NoGpu(
                "no CUDA driver found (libcuda.so could not be loaded); GPU tiers need an NVIDIA \
                 driver"
                    .into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| CopyError::NoGpu(format!("the CUDA driver did not initialise: {e}")))?;
        if ordinal as i32 >= count {
            return Err(CopyError::NoGpu(format!(
                "CUDA device {ordinal} requested but the driver sees {count} device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal as usize)
            .map_err(|e| CopyError::NoGpu(format!("cannot open CUDA device {ordinal}: {e}")))?;
        let mut version = 0i32;
        // SAFETY: writes one int; the driver is loaded and initialised (CudaContext::new).
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| driver_error("cuDriverGetVersion", e))?;
        let info = GpuInfo {
            ordinal,
            name: ctx.name().map_err(|e| driver_error("cuDeviceGetName", e))?,
            driver_version: version,
            compute_capability: ctx
                .compute_capability()
                .map_err(|e| driver_error("compute capability", e))?,
            total_mem: ctx
                .total_mem()
                .map_err(|e| driver_error("cuDeviceTotalMem", e))? as u64,
        };
        Ok(Gpu {
            ctx,
            info: Arc::new(info),
        })
    }

    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    pub fn ordinal(&self) -> u32 {
        self.info.ordinal
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Makes this device's context current on the calling thread (driver calls need it).
    pub(crate) fn bind(&self) -> Result<(), CopyError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error("cuCtxSetCurrent", e))
    }

    /// Checks that every layer of a cache laid out as `layout` from `device_ptr` lies inside one
    /// allocation of device memory on this GPU ([`Gpu::check_device_range`] per layer), so a
    /// wrong pointer or geometry is refused at registration, not found as a fault in a copy.
    pub fn check_cache(
        &self,
        layout: &kvcore::CacheLayout,
        device_ptr: u64,
    ) -> Result<(), crate::error::TierError> {
        let extent = layout.layer_extent();
        for l in 0..layout.geometry().layers {
            let at = device_ptr
                .checked_add(layout.layer_offset(l)?)
                .ok_or(kvcore::LayoutError::TooLarge)?;
            self.check_device_range(at, extent)?;
        }
        Ok(())
    }

    /// Checks that `ptr..ptr+len` lies inside one allocation of device memory on this GPU, so a
    /// descriptor bounds-checked against a region registered with it can never make the copy
    /// engine touch memory the caller does not own. Returns that allocation's `(start, size)`.
    pub fn check_device_range(&self, ptr: u64, len: u64) -> Result<(u64, u64), CopyError> {
        self.bind()?;
        let bad = |why: String| CopyError::Failed(format!("0x{ptr:x}+{len}: {why}"));
        let attr =
            |a| pointer_attr(ptr, a).map_err(|e| bad(format!("not memory CUDA knows ({e})")));
        use sys::CUpointer_attribute as A;
        if attr(A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE)? as u32
            != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
        {
            return Err(bad("not device memory".into()));
        }
        let ordinal = attr(A::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL)? as u32;
        if ordinal != self.info.ordinal {
            return Err(bad(format!(
                "memory of device {ordinal}, not of device {}",
                self.info.ordinal
            )));
        }
        let start = attr(A::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR)?;
        let size = attr(A::CU_POINTER_ATTRIBUTE_RANGE_SIZE)?;
        if ptr.checked_add(len).is_none_or(|end| end > start + size) {
            return Err(bad(format!(
                "runs past the end of its allocation (0x{start:x}+{size})"
            )));
        }
        Ok((start, size))
    }

    /// Whether `ptr` is page-locked host memory mapped into this device's address space, which
    /// the copy kernel may read and write directly.
    pub(crate) fn is_mapped_host(&self, ptr: u64) -> bool {
        if self.bind().is_err() {
            return false;
        }
        use sys::CUpointer_attribute as A;
        // An unknown (pageable) pointer is an error from the driver, so: not mapped.
        pointer_attr(ptr, A::CU_POINTER_ATTRIBUTE_MEMORY_TYPE)
            .is_ok_and(|t| t as u32 == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32)
            // With unified addressing the device pointer of mapped memory equals its address.
            && pointer_attr(ptr, A::CU_POINTER_ATTRIBUTE_DEVICE_POINTER).is_ok_and(|d| d == ptr)
    }

    /// Device memory for tests and benchmarks (the engine's own cache comes from the engine).
    pub fn alloc(&self, len: u64) -> Result<DeviceBuffer, CopyError> {
        self.bind()?;
        let mut ptr = 0u64;
        // SAFETY: writes one device pointer; freed exactly once in DeviceBuffer's Drop.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, len as usize) }
            .result()
            .map_err(|e| driver_error(&format!("cuMemAlloc({len})"), e))?;
        Ok(DeviceBuffer {
            gpu: self.clone(),
            ptr,
            len,
        })
    }
}

/// One pointer attribute. Every attribute kvferry asks for fits in the low bytes of a zeroed
/// u64 (memory type and ordinal are 32-bit, addresses and sizes 64-bit; x86-64 is
/// little-endian). The caller has bound the device's context.
fn pointer_attr(ptr: u64, a: sys::CUpointer_attribute) -> Result<u64, cudarc::driver::DriverError> {
    let mut v = 0u64;
    // SAFETY: `v` is a live u64, at least as large as each attribute's value; an address CUDA
    // does not know is an error return, not undefined behaviour.
    unsafe { sys::cuPointerGetAttribute((&mut v as *mut u64).cast(), a, ptr) }.result()?;
    Ok(v)
}

/// A device allocation owned by kvferry (tests, benchmarks, staging).
pub struct DeviceBuffer {
    gpu: Gpu,
    ptr: u64,
    len: u64,
}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets every byte (set-up of benchmarks: real bytes, without a host round trip).
    pub fn fill(&self, byte: u8) -> Result<(), CopyError> {
        self.gpu.bind()?;
        // SAFETY: the whole allocation, which this buffer owns.
        unsafe { sys::cuMemsetD8_v2(self.ptr, byte, self.len as usize) }
            .result()
            .map_err(|e| driver_error("cuMemsetD8", e))?;
        self.gpu
            .context()
            .synchronize()
            .map_err(|e| driver_error("cuCtxSynchronize", e))
    }

    /// Synchronous upload (tests and set-up; not a transfer path).
    pub fn upload(&self, offset: u64, data: &[u8]) -> Result<(), CopyError> {
        self.check(offset, data.len() as u64)?;
        self.gpu.bind()?;
        // SAFETY: destination bounds checked above; the source is a live slice.
        unsafe { sys::cuMemcpyHtoD_v2(self.ptr + offset, data.as_ptr().cast(), data.len()) }
            .result()
            .map_err(|e| driver_error("cuMemcpyHtoD", e))
    }

    /// Synchronous download (tests and set-up; not a transfer path).
    pub fn download(&self, offset: u64, out: &mut [u8]) -> Result<(), CopyError> {
        self.check(offset, out.len() as u64)?;
        self.gpu.bind()?;
        // SAFETY: source bounds checked above; the destination is a live, exclusive slice.
        unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr + offset, out.len()) }
            .result()
            .map_err(|e| driver_error("cuMemcpyDtoH", e))
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        if offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(CopyError::Failed(format!(
                "{offset}+{len} is outside a {}-byte device buffer",
                self.len
            )));
        }
        Ok(())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: frees the allocation made in Gpu::alloc, once.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}
