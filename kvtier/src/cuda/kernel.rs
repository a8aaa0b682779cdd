//! The scattered-copy kernel, compiled with NVRTC when the copy engine starts. One thread block
//! per piece of at most `PIECE` bytes; 16-byte loads and stores when a piece is aligned. It reads
//! and writes through unified addresses, so the same kernel gathers scattered HBM blocks straight
//! into mapped pinned DRAM (offload) and scatters them back (onboard) with no staging copy, and
//! does many small blocks in one launch where DMA pays a fixed cost per block.

use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};
use cudarc::nvrtc;

use super::{driver_error, Gpu};
use crate::error::CopyError;

/// Pieces longer than this are split, so one big block cannot leave most SMs idle.
pub(crate) const PIECE: u64 = 64 << 10;
const THREADS: u32 = 256;
/// Enough blocks to fill every SM several times over; the kernel loops over the rest.
const MAX_GRID: u32 = 65535;

const SOURCE: &str = r#"
struct Piece { unsigned long long src, dst, len; };

extern "C" __global__ void __launch_bounds__(256)
kvferry_copy(const Piece* __restrict__ pieces, unsigned long long n)
{
    for (unsigned long long p = blockIdx.x; p < n; p += gridDim.x) {
        const Piece pc = pieces[p];
        const unsigned long long len = pc.len;
        if (((pc.src | pc.dst | len) & 15ull) == 0) {
            const uint4* __restrict__ s = (const uint4*)pc.src;
            uint4* __restrict__ d = (uint4*)pc.dst;
            const unsigned long long words = len >> 4;
            unsigned long long i = threadIdx.x;
            // Four loads in flight per thread before the stores: reads over PCIe are latency-bound.
            for (; i + 3 * blockDim.x < words; i += 4 * blockDim.x) {
                uint4 a = s[i];
                uint4 b = s[i + blockDim.x];
                uint4 c = s[i + 2 * blockDim.x];
                uint4 e = s[i + 3 * blockDim.x];
                d[i] = a;
                d[i + blockDim.x] = b;
                d[i + 2 * blockDim.x] = c;
                d[i + 3 * blockDim.x] = e;
            }
            for (; i < words; i += blockDim.x) d[i] = s[i];
        } else {
            const unsigned char* s = (const unsigned char*)pc.src;
            unsigned char* d = (unsigned char*)pc.dst;
            for (unsigned long long i = threadIdx.x; i < len; i += blockDim.x) d[i] = s[i];
        }
    }
}
"#;

pub(crate) struct Kernel {
    gpu: Gpu,
    module: sys::CUmodule,
    function: sys::CUfunction,
}

// SAFETY: module and function handles are plain driver handles, usable from any thread once the
// context is bound; the module is unloaded once, in Drop.
unsafe impl Send for Kernel {}
// SAFETY: as above; launching is thread-safe in the driver.
unsafe impl Sync for Kernel {}

impl Kernel {
    /// Compiles the kernel for this device. Fails with a clear message when NVRTC is missing.
    pub(crate) fn build(gpu: &Gpu) -> Result<Kernel, CopyError> {
        // SAFETY: only tries to dlopen the NVRTC library.
        if !unsafe { nvrtc::sys::is_culib_present() } {
            return Err(CopyError::Failed(
                "NVRTC (libnvrtc.so) not found: the copy kernel is unavailable; put the CUDA \
                 toolkit's lib64 (or the nvidia-cuda-nvrtc wheel's lib) on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let (major, minor) = gpu.info().compute_capability;
        let compile = |options: Vec<String>| {
            nvrtc::compile_ptx_with_opts(
                SOURCE,
                nvrtc::CompileOptions {
                    options,
                    name: Some("kvferry_copy.cu".into()),
                    ..Default::default()
                },
            )
        };
        // An NVRTC older than the device does not know its arch; its default PTX still JITs.
        let ptx = compile(vec![format!("--gpu-architecture=compute_{major}{minor}")])
            .or_else(|_| compile(Vec::new()))
            .map_err(|e| {
                CopyError::Failed(format!("NVRTC could not compile the copy kernel: {e}"))
            })?;
        let image = CString::new(ptx.to_src())
            .map_err(|_| CopyError::Failed("NVRTC returned PTX with a NUL byte".into()))?;
        gpu.bind()?;
        // SAFETY: `image` is NUL-terminated PTX text that outlives the call.
        let module = unsafe { result::module::load_data(image.as_ptr().cast()) }
            .map_err(|e| driver_error("cuModuleLoadData (copy kernel)", e))?;
        let name = CString::new("kvferry_copy").map_err(|e| CopyError::Failed(e.to_string()))?;
        // SAFETY: `module` was just loaded.
        let function = match unsafe { result::module::get_function(module, name) } {
            Ok(f) => f,
            Err(e) => {
                // SAFETY: unloads the module loaded above, once.
                unsafe { sys::cuModuleUnload(module) };
                return Err(driver_error("cuModuleGetFunction", e));
            }
        };
        Ok(Kernel {
            gpu: gpu.clone(),
            module,
            function,
        })
    }

    /// Launches the copy of `n` pieces whose `(src, dst, len)` triples are at device address
    /// `pieces`.
    ///
    /// # Safety
    /// `pieces` must hold `n` triples (written before the launch in stream order), and every
    /// piece must name memory the device may read (src) and write (dst) for the copy's duration.
    pub(crate) unsafe fn launch(
        &self,
        stream: sys::CUstream,
        pieces: u64,
        n: u64,
    ) -> Result<(), CopyError> {
        if n == 0 {
            return Ok(());
        }
        self.gpu.bind()?;
        let grid = n.min(u64::from(MAX_GRID)) as u32;
        let (mut a, mut b) = (pieces, n);
        let mut params: [*mut c_void; 2] =
            [(&mut a as *mut u64).cast(), (&mut b as *mut u64).cast()];
        // SAFETY: the kernel takes (const Piece*, u64); both parameters point to live locals;
        // the caller vouches for the memory the pieces name.
        unsafe {
            result::launch_kernel(
                self.function,
                (grid, 1, 1),
                (THREADS, 1, 1),
                0,
                stream,
                &mut params,
            )
        }
        .map_err(|e| driver_error("cuLaunchKernel (copy kernel)", e))
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: unloads the module loaded in `build`, once; no launch can follow.
            unsafe { sys::cuModuleUnload(self.module) };
        }
    }
}
