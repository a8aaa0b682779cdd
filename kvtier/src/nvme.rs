//! G3: block slots in preallocated files on local NVMe, read and written with io_uring and
//! O_DIRECT straight from the DRAM pool's slots (registered buffers, registered files, a bounded
//! queue depth). When the kernel refuses io_uring (seccomp, old kernels) a pread/pwrite worker
//! pool takes over; `backend()` says which runs.
//!
//! A disk slot mirrors a pool slot byte for byte: a 4 KiB header page (kvcore's `SlotHeader`)
//! then the payload padded to 4 KiB. The store moves whole slots; judging their contents is the
//! tier engine's job, through kvcore.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Sender, TryRecvError};

use crate::lanes::{LaneRx, LaneTx};
use io_uring::{opcode, types, IoUring};
use kvcore::slot::SlotHeader;
use kvcore::SlotError;

use crate::error::TierError;
use crate::pool::{PinnedPool, ALIGN};

/// Which I/O engine to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when the kernel allows it, else the thread pool.
    Auto,
    Uring,
    Threads,
}

#[derive(Clone, Debug)]
pub struct NvmeConfig {
    pub dir: PathBuf,
    pub slots: u64,
    /// Files the slots are spread over (round-robin).
    pub files: u32,
    /// Requests in flight at once.
    pub queue_depth: u32,
    pub io: IoMode,
    /// O_DIRECT (bypass the page cache); falls back to buffered I/O where the file system refuses.
    pub direct: bool,
    /// Reserve the space up front (fallocate), so a full disk shows at start, not mid-transfer.
    pub preallocate: bool,
    /// Every read and write finishes within this or fails (its block is recomputed) and takes
    /// G3 out of service: a disk that stalls must not hold vLLM's requests.
    pub timeout: std::time::Duration,
    /// This many I/O errors in a row take G3 out of service (until restart).
    pub fail_limit: u32,
}

impl NvmeConfig {
    pub fn new(dir: impl Into<PathBuf>, slots: u64) -> NvmeConfig {
        NvmeConfig {
            dir: dir.into(),
            slots,
            files: 1,
            queue_depth: 32,
            io: IoMode::Auto,
            direct: true,
            preallocate: true,
            timeout: std::time::Duration::from_secs(5),
            fail_limit: 3,
        }
    }
}

/// The lock file every store holds while open.
pub const LOCK_FILE: &str = "kvferry-g3.lock";

/// Takes the directory's lock: two processes writing one set of slot files would overwrite each
/// other's slots (each believes it owns the free ones), and a read could then pass every check
/// with the other process's bytes. The lock is an `flock` on a file in the directory, released
/// by the kernel when the process dies, so a crash never leaves the directory locked.
fn lock_dir(dir: &Path) -> Result<File, TierError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| TierError::io("open", &path, e))?;
    // SAFETY: flock on a descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = std::io::Read::read_to_string(&mut f, &mut holder);
            return Err(TierError::Config(format!(
                "{} is in use by another kvferry process ({}); every engine and every TP rank \
                 needs its own G3 directory (kvferry's connector gives each its own namespace \
                 under nvme_dir)",
                dir.display(),
                holder.trim()
            )));
        }
        return Err(TierError::io("lock", &path, e));
    }
    let me = format!("pid {}", std::process::id());
    let _ = f.set_len(0);
    let _ = f.write_all_at(me.as_bytes(), 0);
    Ok(f)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
}

/// Move one whole slot between disk slot `slot` and the memory at `buf`.
#[derive(Clone, Copy, Debug)]
pub struct IoRequest {
    pub op: IoOp,
    pub slot: u64,
    pub buf: u64,
    pub tag: u64,
}

#[derive(Debug)]
pub struct IoDone {
    pub tag: u64,
    pub op: IoOp,
    pub slot: u64,
    pub result: Result<(), TierError>,
}

struct StoreFile {
    file: File,
    path: PathBuf,
}

/// A slot and what its header page says.
#[derive(Debug)]
pub struct ScannedSlot {
    pub slot: u64,
    pub header: Result<SlotHeader, SlotError>,
    /// The block's note (`kvcore::slot::write_note`), where the header parses and the note is
    /// whole and its own.
    pub note: Option<Vec<u8>>,
}

pub struct NvmeStore {
    /// Held (flock'd) for the store's life: one process per directory.
    _lock: File,
    files: Arc<Vec<StoreFile>>,
    slot_bytes: u64,
    slots: u64,
    direct: bool,
    backend: &'static str,
    /// Reads and writes in their own lanes (reads first).
    tx: Option<LaneTx>,
    threads: Vec<JoinHandle<()>>,
}

/// One header page in front of the payload.
pub const HEADER_PAGE: u64 = ALIGN as u64;

impl NvmeStore {
    /// Opens (or creates) the store's files. `slot_bytes` is the whole slot (header page plus
    /// padded payload), a multiple of 4 KiB. `pool`, when given, is registered with io_uring as
    /// fixed buffers. Completions are sent to `done`.
    pub fn open(
        cfg: &NvmeConfig,
        slot_bytes: u64,
        pool: Option<&PinnedPool>,
        done: Sender<IoDone>,
    ) -> Result<NvmeStore, TierError> {
        if slot_bytes == 0 || slot_bytes % ALIGN as u64 != 0 || cfg.slots == 0 || cfg.files == 0 {
            return Err(TierError::Config(format!(
                "NVMe store needs slots > 0, files > 0 and 4 KiB-aligned slots (got {} slots of {slot_bytes} bytes in {} files)",
                cfg.slots, cfg.files
            )));
        }
        std::fs::create_dir_all(&cfg.dir).map_err(|e| TierError::io("create", &cfg.dir, e))?;
        let lock = lock_dir(&cfg.dir)?;
        let nfiles = u64::from(cfg.files).min(cfg.slots);
        let mut direct = cfg.direct;
        let mut files = Vec::with_capacity(nfiles as usize);
        let mut missing: Vec<(usize, u64)> = Vec::new();
        for i in 0..nfiles {
            let path = cfg.dir.join(format!("kvferry-g3-{i}.slots"));
            let per_file = cfg.slots / nfiles + u64::from(i < cfg.slots % nfiles);
            let size = per_file * slot_bytes;
            let file = match open_file(&path, direct) {
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    log::warn!(
                        "kvferry: {} refuses O_DIRECT; using buffered I/O",
                        cfg.dir.display()
                    );
                    direct = false;
                    open_file(&path, false)
                }
                r => r,
            }
            .map_err(|e| TierError::io("open", &path, e))?;
            let len = file
                .metadata()
                .map_err(|e| TierError::io("stat", &path, e))?
                .len();
            if len != 0 && len != size {
                return Err(TierError::Config(format!(
                    "{} is {len} bytes but this store's geometry needs {size}; it was made with other settings (use another directory or remove it)",
                    path.display()
                )));
            }
            if len == 0 {
                missing.push((files.len(), size));
            }
            files.push(StoreFile { file, path });
        }
        let need: u64 = missing.iter().map(|m| m.1).sum();
        if need > 0 {
            let have = free_bytes(&cfg.dir)?;
            if cfg.preallocate && need > have {
                for (i, _) in &missing {
                    let _ = std::fs::remove_file(&files[*i].path);
                }
                return Err(TierError::NoSpace {
                    path: cfg.dir.display().to_string(),
                    need,
                    have,
                });
            }
            for (i, size) in &missing {
                let f = &files[*i];
                allocate(f, *size, cfg.preallocate).inspect_err(|_| {
                    for (j, _) in &missing {
                        let _ = std::fs::remove_file(&files[*j].path);
                    }
                })?;
            }
        }
        let files = Arc::new(files);
        let qd = cfg.queue_depth.clamp(1, 4096);
        let (tx, rx) = crate::lanes::lanes(qd as usize * 4);
        let want_uring = matches!(cfg.io, IoMode::Auto | IoMode::Uring);
        let uring = if want_uring {
            match UringDriver::new(files.clone(), slot_bytes, nfiles, qd, pool) {
                Ok(d) => Some(d),
                Err(e) if cfg.io == IoMode::Auto => {
                    log::warn!("kvferry: io_uring unavailable ({e}); using the pread/pwrite pool");
                    None
                }
                Err(e) => return Err(TierError::io("io_uring setup", &cfg.dir, e)),
            }
        } else {
            None
        };
        let (backend, threads) = match uring {
            Some(d) => {
                let name = d.name();
                let t = std::thread::Builder::new()
                    .name("kvferry-uring".into())
                    .spawn(move || d.run(rx, done))
                    .map_err(|e| TierError::io("spawn", &cfg.dir, e))?;
                (name, vec![t])
            }
            None => {
                let n = qd.min(16) as usize;
                let mut ts = Vec::with_capacity(n);
                for i in 0..n {
                    let (rx, done, files) = (rx.clone(), done.clone(), files.clone());
                    ts.push(
                        std::thread::Builder::new()
                            .name(format!("kvferry-io-{i}"))
                            .spawn(move || thread_worker(rx, done, files, slot_bytes, nfiles))
                            .map_err(|e| TierError::io("spawn", &cfg.dir, e))?,
                    );
                }
                ("threads", ts)
            }
        };
        Ok(NvmeStore {
            _lock: lock,
            files,
            slot_bytes,
            slots: cfg.slots,
            direct,
            backend,
            tx: Some(tx),
            threads,
        })
    }

    /// "io_uring" (with "+fixed" when buffers and files are registered) or "threads".
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// Queues one whole-slot transfer; blocks while the queue is full (back-pressure).
    ///
    /// # Safety
    /// `req.buf..req.buf + slot_bytes` must be valid, 4 KiB aligned memory that nothing else
    /// touches until the matching `IoDone` arrives.
    pub unsafe fn submit(&self, req: IoRequest) -> Result<(), TierError> {
        if req.slot >= self.slots {
            return Err(TierError::Config(format!(
                "slot {} out of range ({} slots)",
                req.slot, self.slots
            )));
        }
        self.tx
            .as_ref()
            .ok_or(TierError::Shutdown)?
            .send(req)
            .map_err(|_| TierError::Shutdown)
    }

    /// Queues one whole-slot transfer if the queue has room: `Ok(None)` when queued,
    /// `Ok(Some(req))` (the request back) when its lane is full. Never waits.
    ///
    /// # Safety
    /// As [`NvmeStore::submit`]: from when it is queued (`Ok(None)`), `req.buf..req.buf +
    /// slot_bytes` must be valid, 4 KiB aligned memory that nothing else touches until the
    /// matching `IoDone` arrives.
    pub unsafe fn try_submit(&self, req: IoRequest) -> Result<Option<IoRequest>, TierError> {
        if req.slot >= self.slots {
            return Err(TierError::Config(format!(
                "slot {} out of range ({} slots)",
                req.slot, self.slots
            )));
        }
        match self.tx.as_ref().ok_or(TierError::Shutdown)?.try_send(req) {
            Ok(()) => Ok(None),
            Err(crossbeam_channel::TrySendError::Full(r)) => Ok(Some(r)),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(TierError::Shutdown),
        }
    }

    /// Reads a slot's header page synchronously (used when recovering the index).
    pub fn read_header(&self, slot: u64, scratch: &PinnedPool) -> Result<SlotHeader, TierError> {
        self.read_header_page(slot, scratch)?
            .header
            .map_err(|source| TierError::Slot { slot, source })
    }

    fn read_header_page(&self, slot: u64, scratch: &PinnedPool) -> Result<ScannedSlot, TierError> {
        let (file, off) = locate(&self.files, slot, self.slot_bytes, self.files.len() as u64);
        // SAFETY: slot 0 of the scratch pool is owned by this call (callers pass a private pool).
        let page = unsafe { &mut scratch.slot_mut(0)[..HEADER_PAGE as usize] };
        read_full(&file.file, page, off).map_err(|e| TierError::io("read", &file.path, e))?;
        let header = SlotHeader::decode(page);
        let note = header.as_ref().ok().and_then(|h| {
            kvcore::slot::read_note(&page[kvcore::slot::NOTE_OFFSET..], &h.hash).map(<[u8]>::to_vec)
        });
        Ok(ScannedSlot { slot, header, note })
    }

    /// Reads a whole slot synchronously into slot 0 of `scratch` (which must be at least
    /// `slot_bytes` per slot).
    pub fn read_slot(&self, slot: u64, scratch: &PinnedPool) -> Result<(), TierError> {
        let (file, off) = locate(&self.files, slot, self.slot_bytes, self.files.len() as u64);
        // SAFETY: slot 0 of the scratch pool is owned by this call.
        let buf = unsafe { &mut scratch.slot_mut(0)[..self.slot_bytes as usize] };
        read_full(&file.file, buf, off).map_err(|e| TierError::io("read", &file.path, e))
    }

    /// Every slot's header: the ones that parse, and why the others do not (`SlotError::Empty`
    /// for never-written slots).
    pub fn scan(&self) -> Result<Vec<ScannedSlot>, TierError> {
        let scratch = PinnedPool::new(HEADER_PAGE, 1)?;
        (0..self.slots)
            .map(|s| self.read_header_page(s, &scratch))
            .collect()
    }

    /// The files, for tests and tools that inspect or damage them on purpose.
    pub fn file_of(&self, slot: u64) -> (PathBuf, u64) {
        let (f, off) = locate(&self.files, slot, self.slot_bytes, self.files.len() as u64);
        (f.path.clone(), off)
    }
}

impl Drop for NvmeStore {
    fn drop(&mut self) {
        // Closing the queue lets the I/O threads finish what was queued, then exit.
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn open_file(path: &Path, direct: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn free_bytes(dir: &Path) -> Result<u64, TierError> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| TierError::Config(format!("bad path {}", dir.display())))?;
    let mut st: libc::statvfs = unsafe_zeroed_statvfs();
    // SAFETY: `c` is a valid C string and `st` a valid out-pointer for the call's duration.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(TierError::io(
            "statvfs",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between libc targets
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

fn unsafe_zeroed_statvfs() -> libc::statvfs {
    // SAFETY: statvfs is a plain C struct of integers, for which all-zero bytes are valid.
    unsafe { std::mem::zeroed() }
}

fn allocate(f: &StoreFile, size: u64, preallocate: bool) -> Result<(), TierError> {
    if preallocate {
        // SAFETY: a valid open descriptor; fallocate only changes the file's allocation.
        let rc = unsafe { libc::fallocate(f.file.as_raw_fd(), 0, 0, size as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSPC) => {
                return Err(TierError::NoSpace {
                    path: f.path.display().to_string(),
                    need: size,
                    have: f
                        .path
                        .parent()
                        .and_then(|d| free_bytes(d).ok())
                        .unwrap_or(0),
                })
            }
            Some(libc::EOPNOTSUPP) => {
                log::warn!(
                    "kvferry: {} cannot preallocate; the store is sparse",
                    f.path.display()
                )
            }
            _ => return Err(TierError::io("fallocate", &f.path, e)),
        }
    }
    f.file
        .set_len(size)
        .map_err(|e| TierError::io("truncate", &f.path, e))
}

fn locate(files: &[StoreFile], slot: u64, slot_bytes: u64, nfiles: u64) -> (&StoreFile, u64) {
    (
        &files[(slot % nfiles) as usize],
        (slot / nfiles) * slot_bytes,
    )
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn thread_worker(
    rx: LaneRx,
    done: Sender<IoDone>,
    files: Arc<Vec<StoreFile>>,
    slot_bytes: u64,
    nfiles: u64,
) {
    while let Some(req) = rx.recv() {
        let (f, off) = locate(&files, req.slot, slot_bytes, nfiles);
        let result = match req.op {
            IoOp::Read => {
                // SAFETY: `submit`'s contract: the buffer is valid and exclusively ours.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut(req.buf as *mut u8, slot_bytes as usize)
                };
                read_full(&f.file, buf, off)
                    .map_err(|e| short_or_io("read", req.slot, slot_bytes, f, e))
            }
            IoOp::Write => {
                // SAFETY: `submit`'s contract: the buffer is valid and not written meanwhile.
                let buf = unsafe {
                    std::slice::from_raw_parts(req.buf as *const u8, slot_bytes as usize)
                };
                f.file
                    .write_all_at(buf, off)
                    .map_err(|e| short_or_io("write", req.slot, slot_bytes, f, e))
            }
        };
        let _ = done.send(IoDone {
            tag: req.tag,
            op: req.op,
            slot: req.slot,
            result,
        });
    }
}

fn short_or_io(
    op: &'static str,
    slot: u64,
    want: u64,
    f: &StoreFile,
    e: std::io::Error,
) -> TierError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::WriteZero => TierError::ShortIo {
            op,
            slot,
            done: 0,
            want,
        },
        _ => TierError::io(op, &f.path, e),
    }
}

/// The io_uring side: one thread owns the ring, keeps up to `qd` slots in flight, resubmits the
/// rest of a short transfer, and fails one that makes no progress.
struct UringDriver {
    ring: IoUring,
    files: Arc<Vec<StoreFile>>,
    slot_bytes: u64,
    nfiles: u64,
    qd: u32,
    fixed_files: bool,
    /// Registered buffers: (start address, length) of each, when registration succeeded.
    buffers: Vec<(u64, u64)>,
}

struct InFlight {
    req: IoRequest,
    done: u64,
}

impl UringDriver {
    fn new(
        files: Arc<Vec<StoreFile>>,
        slot_bytes: u64,
        nfiles: u64,
        qd: u32,
        pool: Option<&PinnedPool>,
    ) -> std::io::Result<UringDriver> {
        let ring = IoUring::new(qd.next_power_of_two().max(8))?;
        let fds: Vec<i32> = files.iter().map(|f| f.file.as_raw_fd()).collect();
        let fixed_files = ring.submitter().register_files(&fds).is_ok();
        let mut buffers = Vec::new();
        if let Some(p) = pool {
            // The kernel takes at most 1 GiB per registered buffer; cut on slot boundaries so a
            // slot never straddles two.
            let per = ((1u64 << 30) / p.slot_bytes()).max(1) * p.slot_bytes();
            let mut start = 0;
            while start < p.len() {
                let len = per.min(p.len() - start);
                buffers.push((p.base() + start, len));
                start += len;
            }
            let iov: Vec<libc::iovec> = buffers
                .iter()
                .map(|&(b, l)| libc::iovec {
                    iov_base: b as *mut libc::c_void,
                    iov_len: l as usize,
                })
                .collect();
            // SAFETY: the iovecs cover the pool, which outlives the store (the tier engine drops
            // the store first); the kernel pins those pages until the ring is dropped.
            if unsafe { ring.submitter().register_buffers(&iov) }.is_err() {
                buffers.clear();
            }
        }
        Ok(UringDriver {
            ring,
            files,
            slot_bytes,
            nfiles,
            qd,
            fixed_files,
            buffers,
        })
    }

    fn name(&self) -> &'static str {
        match (self.fixed_files, self.buffers.is_empty()) {
            (true, false) => "io_uring+fixed",
            _ => "io_uring",
        }
    }

    fn entry(&self, f: &InFlight, idx: usize) -> io_uring::squeue::Entry {
        let file_idx = (f.req.slot % self.nfiles) as usize;
        let off = (f.req.slot / self.nfiles) * self.slot_bytes + f.done;
        let buf = f.req.buf + f.done;
        let len = (self.slot_bytes - f.done) as u32;
        let fixed_buf = self
            .buffers
            .iter()
            .position(|&(b, l)| f.req.buf >= b && f.req.buf + self.slot_bytes <= b + l);
        macro_rules! build {
            ($fd:expr) => {
                match (f.req.op, fixed_buf) {
                    (IoOp::Read, Some(i)) => {
                        opcode::ReadFixed::new($fd, buf as *mut u8, len, i as u16)
                            .offset(off)
                            .build()
                    }
                    (IoOp::Read, None) => opcode::Read::new($fd, buf as *mut u8, len)
                        .offset(off)
                        .build(),
                    (IoOp::Write, Some(i)) => {
                        opcode::WriteFixed::new($fd, buf as *const u8, len, i as u16)
                            .offset(off)
                            .build()
                    }
                    (IoOp::Write, None) => opcode::Write::new($fd, buf as *const u8, len)
                        .offset(off)
                        .build(),
                }
            };
        }
        let e = if self.fixed_files {
            build!(types::Fixed(file_idx as u32))
        } else {
            build!(types::Fd(self.files[file_idx].file.as_raw_fd()))
        };
        e.user_data(idx as u64)
    }

    fn run(mut self, rx: LaneRx, done: Sender<IoDone>) {
        let mut slab: Vec<Option<InFlight>> = (0..self.qd).map(|_| None).collect();
        let mut free: Vec<usize> = (0..self.qd as usize).rev().collect();
        let mut open = true;
        loop {
            let mut pushed = false;
            while open && !free.is_empty() {
                let in_flight = slab.len() - free.len();
                let req = if in_flight == 0 && !pushed {
                    match rx.recv() {
                        Some(r) => r,
                        None => {
                            open = false;
                            break;
                        }
                    }
                } else {
                    match rx.try_recv() {
                        Ok(r) => r,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                };
                let Some(idx) = free.pop() else { break };
                self.push(&mut slab, &mut free, idx, &done, InFlight { req, done: 0 });
                pushed = true;
            }
            if free.len() == slab.len() {
                if open {
                    continue;
                }
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    let kind = e.kind();
                    for idx in 0..slab.len() {
                        if slab[idx].is_some() {
                            self.fail(
                                &mut slab,
                                &mut free,
                                idx,
                                &done,
                                std::io::Error::new(kind, e.to_string()),
                            );
                        }
                    }
                    return;
                }
            }
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (ud, res) in cqes {
                let idx = ud as usize;
                let Some(mut f) = slab.get_mut(idx).and_then(Option::take) else {
                    continue;
                };
                if res < 0 {
                    slab[idx] = Some(f);
                    self.fail(
                        &mut slab,
                        &mut free,
                        idx,
                        &done,
                        std::io::Error::from_raw_os_error(-res),
                    );
                    continue;
                }
                if res == 0 {
                    let _ = done.send(IoDone {
                        tag: f.req.tag,
                        op: f.req.op,
                        slot: f.req.slot,
                        result: Err(TierError::ShortIo {
                            op: if f.req.op == IoOp::Read {
                                "read"
                            } else {
                                "write"
                            },
                            slot: f.req.slot,
                            done: f.done,
                            want: self.slot_bytes,
                        }),
                    });
                    free.push(idx);
                    continue;
                }
                f.done += res as u64;
                if f.done >= self.slot_bytes {
                    let _ = done.send(IoDone {
                        tag: f.req.tag,
                        op: f.req.op,
                        slot: f.req.slot,
                        result: Ok(()),
                    });
                    free.push(idx);
                } else {
                    // Short transfer: ask for the rest.
                    self.push(&mut slab, &mut free, idx, &done, f);
                }
            }
        }
    }

    /// Queues (the rest of) a transfer in slab entry `idx`.
    fn push(
        &mut self,
        slab: &mut [Option<InFlight>],
        free: &mut Vec<usize>,
        idx: usize,
        done: &Sender<IoDone>,
        f: InFlight,
    ) {
        let e = self.entry(&f, idx);
        slab[idx] = Some(f);
        // SAFETY: the entry points at memory the submitter keeps valid until its IoDone
        // (`NvmeStore::submit`'s contract); at most `qd` entries are in flight, and the ring has
        // room for that many.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            let full = std::io::Error::other("submission queue full");
            self.fail(slab, free, idx, done, full);
        }
    }

    fn fail(
        &self,
        slab: &mut [Option<InFlight>],
        free: &mut Vec<usize>,
        idx: usize,
        done: &Sender<IoDone>,
        e: std::io::Error,
    ) {
        if let Some(f) = slab[idx].take() {
            let file = &self.files[(f.req.slot % self.nfiles) as usize];
            let op = if f.req.op == IoOp::Read {
                "read"
            } else {
                "write"
            };
            let _ = done.send(IoDone {
                tag: f.req.tag,
                op: f.req.op,
                slot: f.req.slot,
                result: Err(TierError::io(op, &file.path, e)),
            });
            free.push(idx);
        }
    }
}
