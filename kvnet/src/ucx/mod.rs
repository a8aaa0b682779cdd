//! The UCX transport: one UCP context and worker per agent, behind one lock (the worker runs
//! in UCX's SERIALIZED thread mode: any thread, one at a time). A caller posts its operations
//! itself, under the lock, and a caller waiting for a transfer progresses the worker itself, as
//! NIXL's initiators do, so a transfer takes no hand-off to another thread on its way in or out.
//! The agent's UCX thread progresses what nobody waits for (transfers collected by `poll`, their
//! deadlines, incoming notifications): busy while such transfers are in flight, every 200 µs when
//! idle, and out of the way (parked) while a caller drives the worker.
//!
//! Exported regions are `ucp_mem_map`ped and their packed rkeys published in the metadata;
//! transfers are lists of `ucp_get_nbx`/`ucp_put_nbx` operations, all outstanding at once with
//! the endpoint's flush right behind them, then — if asked — a notification as an eager active
//! message. Completion is by callback: each operation's decrements its transfer's count, so
//! progress costs nothing per request. Endpoints use error mode PEER, so a dead peer fails the
//! operations instead of hanging them; a transfer past its deadline force-closes its endpoint
//! for the same effect. UCX's environment (`UCX_TLS`, `UCX_NET_DEVICES`, ...) applies as usual.
//!
//! Completions (the transfers' callbacks into the agent) run after the lock is released, so
//! they may take the agent's other locks without ordering against this one.
//!
//! libucp is loaded at run time: from `KVFERRY_UCX_LIB` (the library or its folder), else from
//! the `libucx-cu12`/`libucx-cu13` wheel of a Python environment it can find, else the system's
//! `libucp.so.0`.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::PathBuf;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicI8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvcore::wire::{Notification, Op};
use kvcore::RegionId;
use parking_lot::{Mutex, MutexGuard};

use crate::ctx::Ctx;
use crate::peers::{Flavour, Peer};

use crate::error::NetError;
use crate::transport::{Refused, Transfer, TransferId, Transport, TransportKind};
use kvferry_ucx_sys::*;

/// Active-message id of notifications (NIXL uses 0 too).
const AM_NOTIFY: u32 = 0;

/// One RMA operation: local address, remote address, length, and which remote region's key.
pub(crate) struct RmaOp {
    pub local: u64,
    pub remote: u64,
    pub len: u64,
    pub key: Arc<Vec<u8>>,
}

/// Called once when an operation ended: its result, and whether the memory it used may be
/// released (`false` only after code holding the worker panicked, when UCX may still write it).
pub(crate) type Done = Box<dyn FnOnce(Result<u64, NetError>, Released) + Send>;

/// Whether an operation's memory is no longer touched by UCX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Released {
    Yes,
    /// Code holding the worker panicked with the operation in flight: keep the memory held for
    /// ever.
    Never,
}

/// A completion, run once the worker's lock is released.
struct Ended {
    done: Done,
    result: Result<u64, NetError>,
    released: Released,
}

pub(crate) struct Ucx {
    /// Our agent's name (the sender of notifications) and its per-step timeout.
    name: String,
    timeout: Duration,
    shared: Arc<Shared>,
    address: Vec<u8>,
    library: String,
    cuda: bool,
    thread: Option<JoinHandle<()>>,
    /// Regions this transport mapped and has not unmapped.
    mapped: Mutex<std::collections::HashSet<RegionId>>,
}

/// What the callers and the UCX thread share.
struct Shared {
    /// `None` once shut down, or once code holding it panicked: it was then leaked alive (a peer
    /// may still reach mapped memory, over cma or RDMA without our progress), so nothing can be
    /// unmapped any more and the agent stops choosing UCX.
    worker: Mutex<Option<Worker>>,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// Callers inside [`Ucx::drive`]: while there are any, the UCX thread keeps out of the lock.
    pollers: AtomicUsize,
    /// Transfers in flight, as of the last release of the lock (read without it).
    busy: AtomicUsize,
    /// The UCX thread, to wake when the last poller leaves transfers in flight.
    thread: OnceLock<std::thread::Thread>,
}

impl Shared {
    /// Runs `f` on the worker under the lock, then the completions it produced, outside it. A
    /// panic in `f` fails every transfer in flight without releasing its memory and leaks the
    /// worker, its context and its mappings, alive: dropping them could free memory UCX still
    /// writes, or request state its callbacks still reach.
    fn with<R>(&self, f: impl FnOnce(&mut Worker) -> R) -> Result<R, NetError> {
        let mut slot = self.worker.lock();
        let Some(w) = slot.as_mut() else {
            return Err(self.gone());
        };
        let (r, ended) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(w))) {
            Ok(r) => {
                self.busy.store(w.inflight.len(), Ordering::Release);
                (Ok(r), std::mem::take(&mut w.ended))
            }
            Err(_) => {
                self.panicked.store(true, Ordering::Release);
                let _ =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.fail_after_panic()));
                let ended = std::mem::take(&mut w.ended);
                std::mem::forget(slot.take());
                self.busy.store(0, Ordering::Release);
                (Err(self.gone()), ended)
            }
        };
        // Fair: a caller waiting to post is not starved by the UCX thread's loop.
        MutexGuard::unlock_fair(slot);
        for e in ended {
            (e.done)(e.result, e.released);
        }
        r
    }

    fn gone(&self) -> NetError {
        if self.panicked.load(Ordering::Acquire) {
            NetError::Unavailable("code driving UCX panicked; UCX is out of service".into())
        } else {
            NetError::Shutdown
        }
    }

    /// The UCX thread: progress for transfers nobody drives, deadlines and notifications.
    fn background(&self) {
        while !self.stop.load(Ordering::Acquire) {
            let Ok(busy) = self.with(|w| {
                w.progress();
                w.inflight.len()
            }) else {
                return;
            };
            if busy > 0 && self.pollers.load(Ordering::Acquire) == 0 {
                continue;
            }
            // Idle, or a caller drives: look again soon (a poller that leaves transfers in
            // flight wakes us at once).
            let nap = if busy > 0 { 1000 } else { 200 };
            std::thread::park_timeout(Duration::from_micros(nap));
        }
    }

    /// Takes the worker out and closes it (after the UCX thread stopped).
    fn shutdown(&self) {
        let ended = match self.worker.lock().take() {
            Some(w) => w.shutdown(),
            None => Vec::new(),
        };
        for e in ended {
            (e.done)(e.result, e.released);
        }
    }
}

fn status_str(lib: &UcpLib, s: ucs_status_t) -> String {
    // SAFETY: ucs_status_string returns a static C string for any status value.
    unsafe {
        let p = lib.ucs_status_string(s);
        if p.is_null() {
            return format!("UCS status {s}");
        }
        std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// Zero bytes after a peer-supplied blob that UCX parses without a length (worker addresses,
/// packed rkeys): more than any field UCX reads in one step of its parse.
const BLOB_PAD: usize = 4096;

fn padded(blob: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(blob.len() + BLOB_PAD);
    v.extend_from_slice(blob);
    v.resize(blob.len() + BLOB_PAD, 0);
    v
}

/// `ucp_worker_progress` calls per turn of the UCX thread's loop.
const PROGRESS_BURST: usize = 256;

/// `UCS_PTR_IS_ERR` / `UCS_PTR_STATUS`: small negative values encode an error status.
fn ptr_status(p: ucs_status_ptr_t) -> Option<ucs_status_t> {
    let v = p as isize;
    (-100..0).contains(&v).then_some(v as ucs_status_t)
}

/// `libucx/lib` folders of the `libucx-cu12`/`libucx-cu13` wheels in the Python environments a
/// process is likely to run under: the active virtualenv or conda env, the user's and the
/// system's site-packages, and pyenv's versions.
fn wheel_dirs() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(std::env::var_os)
        .map(PathBuf::from)
        .collect();
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        prefixes.push(home.join(".local"));
        if let Ok(rd) = std::fs::read_dir(home.join(".pyenv/versions")) {
            prefixes.extend(rd.filter_map(Result::ok).map(|e| e.path()));
        }
    }
    prefixes.push("/usr/local".into());
    prefixes.push("/usr".into());
    let mut out = Vec::new();
    for p in prefixes {
        let Ok(rd) = std::fs::read_dir(p.join("lib")) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for sp in ["site-packages", "dist-packages"] {
                    let d = e.path().join(sp).join("libucx/lib");
                    if d.join("libucp.so.0").exists() {
                        out.push(d);
                    }
                }
            }
        }
    }
    out
}

fn load() -> Result<(UcpLib, String), NetError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("KVFERRY_UCX_LIB") {
        let p = PathBuf::from(v);
        if p.is_dir() {
            candidates.push(p.join("libucp.so"));
            candidates.push(p.join("libucp.so.0"));
        } else {
            candidates.push(p);
        }
    }
    candidates.extend(wheel_dirs().into_iter().map(|d| d.join("libucp.so.0")));
    candidates.push("libucp.so.0".into());
    candidates.push("libucp.so".into());
    let mut errors = Vec::new();
    for c in candidates {
        // SAFETY: loading libucp runs its initialisers, which only set up UCX's own state.
        match unsafe { UcpLib::new(&c) } {
            Ok(lib) => {
                let missing: Vec<&str> = [
                    ("ucp_init_version", lib.ucp_init_version.is_ok()),
                    ("ucp_worker_create", lib.ucp_worker_create.is_ok()),
                    ("ucp_get_nbx", lib.ucp_get_nbx.is_ok()),
                    ("ucp_put_nbx", lib.ucp_put_nbx.is_ok()),
                    ("ucp_am_send_nbx", lib.ucp_am_send_nbx.is_ok()),
                    (
                        "ucp_worker_set_am_recv_handler",
                        lib.ucp_worker_set_am_recv_handler.is_ok(),
                    ),
                    ("ucp_ep_flush_nbx", lib.ucp_ep_flush_nbx.is_ok()),
                    ("ucp_ep_close_nbx", lib.ucp_ep_close_nbx.is_ok()),
                    ("ucp_mem_map", lib.ucp_mem_map.is_ok()),
                    ("ucp_rkey_pack", lib.ucp_rkey_pack.is_ok()),
                    ("ucp_ep_rkey_unpack", lib.ucp_ep_rkey_unpack.is_ok()),
                    ("ucs_status_string", lib.ucs_status_string.is_ok()),
                    ("ucp_config_read", lib.ucp_config_read.is_ok()),
                    ("ucp_config_modify", lib.ucp_config_modify.is_ok()),
                    ("ucp_get_version", lib.ucp_get_version.is_ok()),
                ]
                .into_iter()
                .filter(|(_, ok)| !ok)
                .map(|(n, _)| n)
                .collect();
                if missing.is_empty() {
                    return Ok((lib, c.display().to_string()));
                }
                errors.push(format!("{}: missing {}", c.display(), missing.join(", ")));
            }
            Err(e) => errors.push(format!("{}: {e}", c.display())),
        }
    }
    Err(NetError::Unavailable(format!(
        "no usable libucp found (set KVFERRY_UCX_LIB): {}",
        errors.join("; ")
    )))
}

impl Ucx {
    /// Loads libucp, creates the context and worker, and starts the UCX thread.
    pub fn start(
        ctx: Arc<Ctx>,
        peer_errors: bool,
        options: &[(String, String)],
    ) -> Result<Ucx, NetError> {
        let (name, timeout) = (ctx.name.clone(), ctx.timeout);
        let (w, address, library) = Worker::new(ctx, peer_errors, options)?;
        let cuda = w.cuda;
        let shared = Arc::new(Shared {
            worker: Mutex::new(Some(w)),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            pollers: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            thread: OnceLock::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kvferry-ucx".into())
            .spawn(move || s.background());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                shared.shutdown();
                return Err(NetError::Unavailable(format!(
                    "cannot start the UCX thread: {e}"
                )));
            }
        };
        let _ = shared.thread.set(thread.thread().clone());
        Ok(Ucx {
            name,
            timeout,
            shared,
            address,
            library,
            cuda,
            thread: Some(thread),
            mapped: Default::default(),
        })
    }

    pub fn address(&self) -> &[u8] {
        &self.address
    }

    /// Which libucp was loaded, and its version.
    pub fn library(&self) -> &str {
        &self.library
    }

    /// Whether this UCX was built with CUDA (it can then register and move device memory).
    pub fn has_cuda(&self) -> bool {
        self.cuda
    }

    /// Maps a region for remote access (`device`: CUDA device memory); returns its packed rkey.
    fn mem_map(
        &self,
        id: RegionId,
        base: u64,
        len: u64,
        device: bool,
    ) -> Result<Vec<u8>, NetError> {
        let key = self.shared.with(|w| w.map(id, base, len, device))??;
        self.mapped.lock().insert(id);
        Ok(key)
    }

    /// Unmaps a region and waits until UCX did. If the worker's lock cannot be had in
    /// `timeout` the region stays mapped, and the caller must keep the memory until the agent
    /// drops; so it does once code driving UCX panicked (its mappings were leaked alive).
    fn mem_unmap(&self, id: RegionId, timeout: Duration) -> Result<(), NetError> {
        if !self.mapped.lock().contains(&id) {
            return Ok(());
        }
        if !self.alive() {
            return Err(NetError::Busy(id.0));
        }
        let Some(mut slot) = self.shared.worker.try_lock_for(timeout) else {
            return Err(NetError::Busy(id.0));
        };
        let Some(w) = slot.as_mut() else {
            return Err(NetError::Busy(id.0));
        };
        if let Some(m) = w.memh.remove(&id) {
            // SAFETY: the handle came from ucp_mem_map on this context, under this lock.
            unsafe { w.lib.ucp_mem_unmap(w.ctx, m) };
        }
        drop(slot);
        self.mapped.lock().remove(&id);
        Ok(())
    }

    /// Progresses the worker on the caller's thread until transfer `id` is no longer in UCX's
    /// hands or `until` passes. Its completion has run when this returns (into the agent's
    /// inbox); a transfer UCX does not carry returns at once.
    pub fn drive(&self, id: TransferId, until: Instant) {
        self.drive_while(until, |t| t.tid == Some(id));
    }

    fn drive_while(&self, until: Instant, ours: impl Fn(&Inflight) -> bool) {
        if self.shared.busy.load(Ordering::Acquire) == 0 {
            return;
        }
        self.shared.pollers.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.shared);
        loop {
            let more = self.shared.with(|w| {
                if !w.inflight.iter().any(&ours) {
                    return false;
                }
                w.progress();
                w.inflight.iter().any(&ours)
            });
            if !matches!(more, Ok(true)) || Instant::now() >= until {
                return;
            }
        }
    }

    /// One turn of progress, if anything is in flight (for callers that poll).
    pub fn progress(&self) {
        if self.shared.busy.load(Ordering::Acquire) > 0 {
            let _ = self.shared.with(Worker::progress);
        }
    }

    fn forget(&self, peer: &str) {
        let _ = self.shared.with(|w| w.forget(peer));
    }

    /// False once code driving UCX panicked.
    pub fn alive(&self) -> bool {
        !self.shared.panicked.load(Ordering::Acquire)
    }

    #[cfg(feature = "fault-injection")]
    pub fn inject_panic(&self) {
        let _ = self
            .shared
            .with(|_| panic!("kvferry fault injection: code driving UCX panics"));
    }
}

/// A poller leaving: the UCX thread takes over what is still in flight.
struct Leave<'a>(&'a Shared);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let last = self.0.pollers.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && self.0.busy.load(Ordering::Acquire) > 0 {
            if let Some(t) = self.0.thread.get() {
                t.unpark();
            }
        }
    }
}

impl Transport for Ucx {
    fn kind(&self) -> TransportKind {
        TransportKind::Ucx
    }

    fn map(&self, id: RegionId, region: &kvcore::Region) -> Result<Option<Vec<u8>>, NetError> {
        let device = matches!(region.kind, kvcore::MemKind::Device { .. });
        self.mem_map(id, region.base, region.len, device).map(Some)
    }

    fn unmap(&self, id: RegionId, timeout: Duration) -> Result<(), NetError> {
        self.mem_unmap(id, timeout)
    }

    fn reaches(&self, p: &Peer) -> bool {
        self.alive() && p.ucx_address.is_some()
    }

    fn post(&self, mut t: Transfer) -> Result<(), Refused> {
        let p = t.peer.clone();
        let Some(address) = p.ucx_address.clone() else {
            return Err(Box::new((no_ucx(p.name(), "it offers no UCX address"), t)));
        };
        let mut ops = Vec::with_capacity(t.remote.len());
        for (l, r) in t.local().iter().zip(&t.remote) {
            let Some(key) = p.ucx_keys.get(&r.region).cloned() else {
                let why = format!("no UCX key for region {}", r.region);
                return Err(Box::new((no_ucx(p.name(), &why), t)));
            };
            // Checked against the peer's regions when posted: base + offset is in range.
            let base = p.regions.get(r.region).map_or(0, |g| g.base);
            ops.push(RmaOp {
                local: l.addr,
                remote: base + r.offset,
                len: l.len,
                key,
            });
        }
        let frame = match (t.notification.take(), p.flavour) {
            (None, _) => None,
            (Some(payload), Flavour::Nixl { .. }) => Some(nixl_notification(&self.name, payload)),
            (Some(payload), Flavour::Kvferry) => {
                // The agent sends kvferry peers' notifications over the side channel.
                t.notification = Some(payload);
                let why = "kvferry peers are notified over the side channel";
                return Err(Box::new((no_ucx(p.name(), why), t)));
            }
        };
        if !self.alive() {
            let why = "code driving UCX panicked";
            return Err(Box::new((no_ucx(p.name(), why), t)));
        }
        let deadline =
            Instant::now() + self.timeout + Duration::from_secs_f64(t.bytes() as f64 / 100e6);
        let (op, tid) = (t.op, t.id);
        let done: Done = Box::new(move |result, released| match released {
            Released::Yes => t.finish(result),
            // UCX may still write this memory: its hold is never given back, so
            // deregistering it reports Busy and the memory is kept.
            Released::Never => t.abandon(result),
        });
        // Posted here, on the caller's thread, and progressed once: what completes at once (a
        // small READ over shared memory) is reported before this returns. Should the worker
        // be gone by now (a panic elsewhere), the transfer is dropped unstarted, which keeps
        // its memory held and reports it failed.
        let _ = self.shared.with(|w| {
            let start = Start {
                tid: Some(tid),
                op,
                peer: p.name().to_string(),
                address,
                ops,
                notification: frame,
                deadline,
            };
            w.start(start, done);
            w.progress();
        });
        Ok(())
    }

    fn notify(&self, p: &Arc<Peer>, payload: Vec<u8>) -> Result<(), NetError> {
        if !matches!(p.flavour, Flavour::Nixl { .. }) {
            return Err(no_ucx(
                p.name(),
                "kvferry peers are notified over the side channel",
            ));
        }
        let address = p
            .ucx_address
            .clone()
            .ok_or_else(|| no_ucx(p.name(), "it offers no UCX address"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let limit = self.timeout;
        let deadline = Instant::now() + limit;
        let seq = self.shared.with(|w| {
            let start = Start {
                tid: None,
                op: Op::Write,
                peer: p.name().to_string(),
                address,
                ops: Vec::new(),
                notification: Some(nixl_notification(&self.name, payload)),
                deadline,
            };
            let seq = w.start(
                start,
                Box::new(move |r, _| {
                    let _ = tx.send(r);
                }),
            );
            w.progress();
            seq
        })?;
        self.drive_while(deadline, |t| t.seq == seq);
        rx.recv_timeout(limit + Duration::from_secs(3))
            .map_err(|_| NetError::Timeout {
                op: "notify",
                peer: p.name().to_string(),
                secs: limit.as_secs_f64(),
            })?
            .map(|_| ())
    }

    fn close(&self, peer: &str) {
        self.forget(peer);
    }
}

fn no_ucx(peer: &str, why: &str) -> NetError {
    NetError::NoTransport {
        peer: peer.to_string(),
        offered: why.to_string(),
    }
}

/// A notification in the bytes a stock NIXL agent reads.
fn nixl_notification(from: &str, payload: Vec<u8>) -> Vec<u8> {
    kvcore::nixl::NixlNotif {
        from: from.to_string(),
        msg: payload,
    }
    .encode()
}

impl Drop for Ucx {
    fn drop(&mut self) {
        // Stop the thread, then cancel what is in flight and clean up.
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.shared.shutdown();
    }
}

struct Endpoint {
    ep: ucp_ep_h,
    address: Arc<Vec<u8>>,
    /// Set by UCX's error handler when the peer fails; boxed so its address is stable.
    failed: Box<AtomicBool>,
    rkeys: HashMap<Arc<Vec<u8>>, ucp_rkey_h>,
}

/// A transfer's outstanding UCX requests, counted down by their completion callbacks. Shared
/// (an `Arc`, whose address the callbacks get as user data) so that a callback writing it never
/// aliases a unique borrow of the transfer.
struct Pending {
    left: AtomicUsize,
    /// The first error status a request ended with (`UCS_OK` while none).
    status: AtomicI8,
    /// `ucp_request_free`, for the callback to free its request.
    free: unsafe extern "C" fn(*mut c_void),
}

/// Called by UCX, under the worker's lock (it runs only inside calls made under it), when a
/// request posted with it completes; never for one that completed at once.
unsafe extern "C" fn on_request_done(req: *mut c_void, status: ucs_status_t, user: *mut c_void) {
    if user.is_null() {
        return;
    }
    // SAFETY: `user` is `Arc::as_ptr` of the transfer's `Pending`, which its in-flight entry
    // keeps alive while `left > 0` (this request is counted in it) or for ever (leaked after a
    // panic); `req` is the completed request, ours to free, here or never.
    unsafe {
        let p = &*(user as *const Pending);
        if status != ucs_status_t_UCS_OK {
            let _ = p.status.compare_exchange(
                ucs_status_t_UCS_OK,
                status,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        (p.free)(req);
        p.left.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a caller asks the worker to start.
struct Start {
    tid: Option<TransferId>,
    op: Op,
    peer: String,
    address: Arc<Vec<u8>>,
    ops: Vec<RmaOp>,
    notification: Option<Vec<u8>>,
    deadline: Instant,
}

struct Inflight {
    /// The agent's transfer id (none for a bare notification).
    tid: Option<TransferId>,
    /// The worker's own number for it.
    seq: u64,
    peer: String,
    pending: Arc<Pending>,
    bytes: u64,
    error: Option<String>,
    /// It passed its deadline (its requests were cancelled): a timeout, whatever UCX said.
    timed_out: bool,
    posted: Instant,
    /// Sent once the data and the flush completed; kept here until its send completes.
    notification: Option<Vec<u8>>,
    notifying: bool,
    deadline: Instant,
    done: Option<Done>,
}

struct Worker {
    lib: Arc<UcpLib>,
    /// Error mode PEER on endpoints (fast failure on a dead peer; excludes transports without
    /// failure detection, such as shared memory in older UCX).
    peer_errors: bool,
    ctx: ucp_context_h,
    worker: ucp_worker_h,
    eps: HashMap<String, Endpoint>,
    memh: HashMap<RegionId, ucp_mem_h>,
    inflight: Vec<Inflight>,
    /// Completions to run once the lock is released.
    ended: Vec<Ended>,
    seq: u64,
    free_request: unsafe extern "C" fn(*mut c_void),
    /// Peers forgotten while transfers to them were in flight: closed when the last one ends.
    forgotten: std::collections::HashSet<String>,
    /// The context supports CUDA memory (UCX built with its cuda transports).
    cuda: bool,
    /// Owned by the worker for the AM handler's lifetime.
    sink: *mut Arc<Ctx>,
}

// SAFETY: the UCX handles (context, worker, endpoints, rkeys, memory handles, requests) are
// used only through `Shared::worker`'s lock, one thread at a time, which is what UCX's
// SERIALIZED thread mode (the worker's) allows; the context is used only by this worker. `sink`
// is an `Arc<Ctx>` (Send and Sync), read by the AM handler during progress, under the lock.
unsafe impl Send for Worker {}

unsafe extern "C" fn on_peer_error(arg: *mut c_void, _ep: ucp_ep_h, _status: ucs_status_t) {
    if !arg.is_null() {
        // SAFETY: `arg` is the endpoint's boxed flag, alive until the endpoint is destroyed.
        unsafe { (*(arg as *const AtomicBool)).store(true, Ordering::Release) };
    }
}

/// UCX's wire-up is unauthenticated and an active message names no verified sender, so one
/// counts only as what stock NIXL agents send (NIXL's own trust model), only once NIXL interop
/// was opted into (a NIXL side channel served, or a NIXL agent's metadata loaded), and never
/// under the name of a kvferry peer: those authenticated on the side channel and notify over
/// its connections, so a kvferry frame, or a NIXL one claiming a kvferry peer's name, arriving
/// here is somebody's forgery.
fn accept_notification(ctx: &Ctx, bytes: &[u8]) {
    if !bytes.starts_with(kvcore::nixl::SERDES_PREFIX) {
        log::warn!("kvferry: dropping a UCX active message that is not a NIXL notification");
        return;
    }
    if !ctx.nixl_enabled() {
        log::warn!("kvferry: dropping a NIXL notification: NIXL interop is not enabled here");
        return;
    }
    match kvcore::nixl::NixlNotif::decode(bytes) {
        Ok(n) => match ctx.peers.get(&n.from) {
            Some(p) if p.flavour == Flavour::Kvferry => log::warn!(
                "kvferry: dropping a UCX notification claiming to be from {:?}, an authenticated \
                 kvferry peer (they notify over the side channel)",
                n.from
            ),
            _ => ctx.inbox.deliver(Notification {
                from: n.from,
                payload: n.msg,
            }),
        },
        Err(e) => log::warn!("kvferry: dropping a malformed NIXL notification: {e}"),
    }
}

unsafe extern "C" fn on_notification(
    arg: *mut c_void,
    _header: *const c_void,
    _header_len: usize,
    data: *mut c_void,
    len: usize,
    param: *const ucp_am_recv_param_t,
) -> ucs_status_t {
    let _ = std::panic::catch_unwind(|| {
        // SAFETY: UCX passes a valid parameter struct; unless the RNDV flag is set, `data..+len`
        // is the whole (eager) payload, valid during this call; `arg` is the worker's sink.
        unsafe {
            let rndv = ucp_am_recv_attr_t_UCP_AM_RECV_ATTR_FLAG_RNDV as u64;
            if arg.is_null()
                || param.is_null()
                || (*param).recv_attr & rndv != 0
                || (data.is_null() && len > 0)
            {
                // kvferry sends notifications eagerly; a rendezvous descriptor is not data.
                return;
            }
            let bytes = std::slice::from_raw_parts(data as *const u8, len);
            let ctx = &*(arg as *const Arc<Ctx>);
            accept_notification(ctx, bytes);
        }
    });
    ucs_status_t_UCS_OK
}

impl Worker {
    fn new(
        sink_ctx: Arc<Ctx>,
        peer_errors: bool,
        options: &[(String, String)],
    ) -> Result<(Worker, Vec<u8>, String), NetError> {
        let (lib, path) = load()?;
        let fail = |what: &str, s: ucs_status_t, lib: &UcpLib| {
            NetError::Unavailable(format!("{what}: {}", status_str(lib, s)))
        };
        // SAFETY: plain UCP setup calls with valid out-pointers; every handle is checked. The
        // parameter structs start all-zero (`mem::zeroed`): bindgen C structs of integers, raw
        // pointers and optional callbacks, for which zero is valid and UCX reads "no fields set".
        unsafe {
            let (mut maj, mut min, mut rel) = (0u32, 0u32, 0u32);
            lib.ucp_get_version(&mut maj, &mut min, &mut rel);
            let mut config: *mut ucp_config_t = ptr::null_mut();
            let s = lib.ucp_config_read(ptr::null(), ptr::null(), &mut config);
            if s != ucs_status_t_UCS_OK {
                return Err(fail("ucp_config_read", s, &lib));
            }
            // Settings NIXL's UCX backend also makes; without the v2 address format, error mode
            // PEER loses the shared-memory lanes on one node. A value the user set in the
            // environment wins; an option this UCX does not know is skipped.
            let rails = if (maj, min) >= (1, 20) { "4" } else { "2" };
            for (k, v) in [
                ("ADDRESS_VERSION", "v2"),
                ("RNDV_THRESH", "inf"),
                ("MAX_RMA_RAILS", rails),
            ] {
                if std::env::var_os(format!("UCX_{k}")).is_none() {
                    let (ck, cv) = (std::ffi::CString::new(k), std::ffi::CString::new(v));
                    if let (Ok(ck), Ok(cv)) = (ck, cv) {
                        lib.ucp_config_modify(config, ck.as_ptr(), cv.as_ptr());
                    }
                }
            }
            for (k, v) in options {
                let (ck, cv) = (
                    std::ffi::CString::new(k.as_str()),
                    std::ffi::CString::new(v.as_str()),
                );
                let (Ok(ck), Ok(cv)) = (ck, cv) else {
                    lib.ucp_config_release(config);
                    return Err(NetError::Unavailable(format!(
                        "UCX option {k}={v}: NUL byte"
                    )));
                };
                let s = lib.ucp_config_modify(config, ck.as_ptr(), cv.as_ptr());
                if s != ucs_status_t_UCS_OK {
                    lib.ucp_config_release(config);
                    return Err(fail(&format!("UCX option {k}={v}"), s, &lib));
                }
            }
            let mut params: ucp_params_t = std::mem::zeroed();
            params.field_mask = ucp_params_field_UCP_PARAM_FIELD_FEATURES as u64;
            // No UCP_FEATURE_WAKEUP: asking for it drops transports without event support
            // (shared memory and cma among them), which cost 10x on one node.
            params.features = (ucp_feature_UCP_FEATURE_RMA | ucp_feature_UCP_FEATURE_AM) as u64;
            let mut ctx: ucp_context_h = ptr::null_mut();
            let s = lib.ucp_init_version(UCP_API_MAJOR, UCP_API_MINOR, &params, config, &mut ctx);
            lib.ucp_config_release(config);
            if s != ucs_status_t_UCS_OK {
                return Err(fail("ucp_init", s, &lib));
            }
            let mut wp: ucp_worker_params_t = std::mem::zeroed();
            wp.field_mask = ucp_worker_params_field_UCP_WORKER_PARAM_FIELD_THREAD_MODE as u64;
            wp.thread_mode = ucs_thread_mode_t_UCS_THREAD_MODE_SERIALIZED;
            let mut worker: ucp_worker_h = ptr::null_mut();
            let s = lib.ucp_worker_create(ctx, &wp, &mut worker);
            if s != ucs_status_t_UCS_OK {
                lib.ucp_cleanup(ctx);
                return Err(fail("ucp_worker_create", s, &lib));
            }
            let free_request = match lib.ucp_request_free.as_ref() {
                Ok(f) => *f,
                Err(e) => {
                    lib.ucp_worker_destroy(worker);
                    lib.ucp_cleanup(ctx);
                    return Err(NetError::Unavailable(format!("ucp_request_free: {e}")));
                }
            };
            let sink = Box::into_raw(Box::new(sink_ctx));
            let mut am: ucp_am_handler_param_t = std::mem::zeroed();
            am.field_mask = (ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ID
                | ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_CB
                | ucp_am_handler_param_field_UCP_AM_HANDLER_PARAM_FIELD_ARG)
                as u64;
            am.id = AM_NOTIFY;
            am.cb = Some(on_notification);
            am.arg = sink as *mut c_void;
            let w = Worker {
                lib: Arc::new(lib),
                peer_errors,
                ctx,
                worker,
                eps: HashMap::new(),
                memh: HashMap::new(),
                inflight: Vec::new(),
                ended: Vec::new(),
                seq: 0,
                free_request,
                forgotten: Default::default(),
                cuda: false,
                sink,
            };
            let mut w = w;
            if w.lib.ucp_context_query.is_ok() {
                let mut attr: ucp_context_attr_t = std::mem::zeroed();
                attr.field_mask = ucp_context_attr_field_UCP_ATTR_FIELD_MEMORY_TYPES as u64;
                if w.lib.ucp_context_query(ctx, &mut attr) == ucs_status_t_UCS_OK {
                    w.cuda =
                        attr.memory_types & (1u64 << ucs_memory_type_UCS_MEMORY_TYPE_CUDA) != 0;
                }
            }
            let s = w.lib.ucp_worker_set_am_recv_handler(worker, &am);
            if s != ucs_status_t_UCS_OK {
                return Err(fail("ucp_worker_set_am_recv_handler", s, &w.lib));
            }
            let mut addr: *mut ucp_address_t = ptr::null_mut();
            let mut len = 0usize;
            let s = w.lib.ucp_worker_get_address(worker, &mut addr, &mut len);
            if s != ucs_status_t_UCS_OK {
                return Err(fail("ucp_worker_get_address", s, &w.lib));
            }
            let address = std::slice::from_raw_parts(addr as *const u8, len).to_vec();
            w.lib.ucp_worker_release_address(worker, addr);
            Ok((w, address, format!("{path} (UCX {maj}.{min}.{rel})")))
        }
    }

    /// A burst of progress, then what it completed moves on.
    fn progress(&mut self) {
        // Bounded: a peer flooding us with active messages must not starve deadlines and the
        // callers waiting for the lock (what is left waits for the next turn).
        for _ in 0..PROGRESS_BURST {
            // SAFETY: the worker is ours, used under the lock.
            if unsafe { self.lib.ucp_worker_progress(self.worker) } == 0 {
                break;
            }
        }
        self.advance();
    }

    /// After a panic with the worker held: every operation in flight fails, keeping its memory
    /// held (its completion is told `Released::Never`), and nothing UCX owns is freed.
    fn fail_after_panic(&mut self) {
        log::error!(
            "kvferry: code driving UCX panicked; {} transfers in flight fail, and the memory they \
             use stays held (deregistering it reports Busy) because UCX may still write it",
            self.inflight.len()
        );
        for t in &mut self.inflight {
            if let Some(done) = t.done.take() {
                let e = NetError::Unavailable("code driving UCX panicked".into());
                self.ended.push(Ended {
                    done,
                    result: Err(e),
                    released: Released::Never,
                });
            }
        }
    }

    fn map(
        &mut self,
        id: RegionId,
        base: u64,
        len: u64,
        device: bool,
    ) -> Result<Vec<u8>, NetError> {
        if device && !self.cuda {
            return Err(NetError::Unavailable(
                "this UCX was built without CUDA support, so device memory cannot be registered \
                 with it: stage the blocks through pinned DRAM (kvtier's CudaCopy into a registered \
                 pinned pool), or use a UCX built with CUDA (the libucx-cu12 wheel is)"
                    .into(),
            ));
        }
        // SAFETY: the agent registered `base..base+len` under its contract (valid until unmapped);
        // the out-pointers are valid locals; the parameter struct starts all-zero, its "no
        // fields set" value.
        unsafe {
            let mut p: ucp_mem_map_params_t = std::mem::zeroed();
            p.field_mask = (ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_ADDRESS
                | ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_LENGTH)
                as u64;
            if device {
                // Told rather than detected, so UCX picks its CUDA transports (cuda_copy,
                // cuda_ipc, gdr_copy, GPUDirect RDMA) for this memory.
                p.field_mask |= ucp_mem_map_params_field_UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE as u64;
                p.memory_type = ucs_memory_type_UCS_MEMORY_TYPE_CUDA;
            }
            p.address = base as *mut c_void;
            p.length = len as usize;
            let mut memh: ucp_mem_h = ptr::null_mut();
            let s = self.lib.ucp_mem_map(self.ctx, &p, &mut memh);
            if s != ucs_status_t_UCS_OK {
                return Err(NetError::Unavailable(format!(
                    "ucp_mem_map: {}",
                    status_str(&self.lib, s)
                )));
            }
            let mut buf: *mut c_void = ptr::null_mut();
            let mut size = 0usize;
            let s = self.lib.ucp_rkey_pack(self.ctx, memh, &mut buf, &mut size);
            if s != ucs_status_t_UCS_OK {
                self.lib.ucp_mem_unmap(self.ctx, memh);
                return Err(NetError::Unavailable(format!(
                    "ucp_rkey_pack: {}",
                    status_str(&self.lib, s)
                )));
            }
            let key = std::slice::from_raw_parts(buf as *const u8, size).to_vec();
            self.lib.ucp_rkey_buffer_release(buf);
            if let Some(old) = self.memh.insert(id, memh) {
                self.lib.ucp_mem_unmap(self.ctx, old);
            }
            Ok(key)
        }
    }

    fn rkey(lib: &UcpLib, e: &mut Endpoint, key: &Arc<Vec<u8>>) -> Result<ucp_rkey_h, String> {
        if let Some(r) = e.rkeys.get(key) {
            return Ok(*r);
        }
        let mut rk: ucp_rkey_h = ptr::null_mut();
        let padded = padded(key);
        // SAFETY: `ucp_ep_rkey_unpack` takes no length and parses the buffer by the format it
        // finds in it, so a short or malformed key from a peer could make it read past the
        // peer's bytes. It reads `padded`, the key followed by `BLOB_PAD` zero bytes, which
        // live until the call returns: a parse that runs past the key reads zeros inside our
        // allocation (and fails on them), not memory beyond it. UCX copies what it keeps.
        let s = unsafe { lib.ucp_ep_rkey_unpack(e.ep, padded.as_ptr() as *const c_void, &mut rk) };
        if s != ucs_status_t_UCS_OK {
            return Err(format!("ucp_ep_rkey_unpack: {}", status_str(lib, s)));
        }
        e.rkeys.insert(key.clone(), rk);
        Ok(rk)
    }

    /// A parameter struct whose completion counts down `pending`.
    fn param(pending: &Arc<Pending>) -> ucp_request_param_t {
        // SAFETY: a bindgen C parameter struct; all-zero is its "no fields set" value.
        let mut p: ucp_request_param_t = unsafe { std::mem::zeroed() };
        p.op_attr_mask =
            ucp_op_attr_t_UCP_OP_ATTR_FIELD_CALLBACK | ucp_op_attr_t_UCP_OP_ATTR_FIELD_USER_DATA;
        p.cb.send = Some(on_request_done);
        p.user_data = Arc::as_ptr(pending) as *mut c_void;
        p
    }

    /// Counts what `post` started in `pending`: counted before the call (a callback may in
    /// principle run before the call returns), uncounted when it completed or failed at once.
    fn counted(
        pending: &Pending,
        lib: &UcpLib,
        what: &str,
        post: impl FnOnce() -> ucs_status_ptr_t,
    ) -> Result<(), String> {
        pending.left.fetch_add(1, Ordering::AcqRel);
        let r = post();
        if r.is_null() {
            pending.left.fetch_sub(1, Ordering::AcqRel);
            return Ok(());
        }
        if let Some(s) = ptr_status(r) {
            pending.left.fetch_sub(1, Ordering::AcqRel);
            return Err(format!("{what}: {}", status_str(lib, s)));
        }
        Ok(())
    }

    /// Posts a transfer's operations and, behind them, the endpoint's flush (for writes, and
    /// whatever a notification follows: the notification is sent only once the data is in
    /// place); returns the worker's number for it.
    fn start(&mut self, s: Start, done: Done) -> u64 {
        self.seq += 1;
        let flush_after = s.op == Op::Write || s.notification.is_some();
        let mut t = Inflight {
            tid: s.tid,
            seq: self.seq,
            peer: s.peer.clone(),
            pending: Arc::new(Pending {
                left: AtomicUsize::new(0),
                status: AtomicI8::new(ucs_status_t_UCS_OK),
                free: self.free_request,
            }),
            bytes: s.ops.iter().map(|o| o.len).sum(),
            error: None,
            timed_out: false,
            posted: Instant::now(),
            notification: s.notification,
            notifying: false,
            deadline: s.deadline,
            done: Some(done),
        };
        let lib = &self.lib;
        let ep = match Self::endpoint_in(
            &mut self.eps,
            lib,
            self.worker,
            self.peer_errors,
            &s.peer,
            &s.address,
        ) {
            Ok(e) => e,
            Err(e) => {
                t.error = Some(e);
                self.inflight.push(t);
                return self.seq;
            }
        };
        let param = Self::param(&t.pending);
        // Runs of operations share one region's key: looked up once per run, not hashed per op.
        let mut last: Option<(&Arc<Vec<u8>>, ucp_rkey_h)> = None;
        for o in &s.ops {
            let rk = match last {
                Some((k, rk)) if Arc::ptr_eq(k, &o.key) => rk,
                _ => match Self::rkey(lib, ep, &o.key) {
                    Ok(r) => {
                        last = Some((&o.key, r));
                        r
                    }
                    Err(e) => {
                        t.error = Some(e);
                        break;
                    }
                },
            };
            let (what, read) = match s.op {
                Op::Read => ("ucp_get_nbx", true),
                Op::Write => ("ucp_put_nbx", false),
            };
            // SAFETY: `o.local` lies in memory the agent holds in use for the whole transfer (the
            // caller checked it against its region table); the remote range was bounds-checked
            // against the peer's exported region; the request is counted in `t.pending`, which
            // outlives it, and the transfer ends only once it completed.
            let posted = Self::counted(&t.pending, lib, what, || unsafe {
                if read {
                    lib.ucp_get_nbx(
                        ep.ep,
                        o.local as *mut c_void,
                        o.len as usize,
                        o.remote,
                        rk,
                        &param,
                    )
                } else {
                    lib.ucp_put_nbx(
                        ep.ep,
                        o.local as *const c_void,
                        o.len as usize,
                        o.remote,
                        rk,
                        &param,
                    )
                }
            });
            if let Err(e) = posted {
                t.error = Some(e);
                break;
            }
        }
        if flush_after && t.error.is_none() {
            // SAFETY: a live endpoint of our worker; the request is counted like the others.
            let posted = Self::counted(&t.pending, lib, "ucp_ep_flush_nbx", || unsafe {
                lib.ucp_ep_flush_nbx(ep.ep, &param)
            });
            if let Err(e) = posted {
                t.error = Some(e);
            }
        }
        self.inflight.push(t);
        self.seq
    }

    /// The endpoint to `peer`, created (or re-created when stale) from its worker address.
    /// Takes the map, not `self`, so the library can be borrowed alongside.
    fn endpoint_in<'a>(
        eps: &'a mut HashMap<String, Endpoint>,
        lib: &UcpLib,
        worker: ucp_worker_h,
        peer_errors: bool,
        peer: &str,
        address: &Arc<Vec<u8>>,
    ) -> Result<&'a mut Endpoint, String> {
        let stale = eps
            .get(peer)
            .is_some_and(|e| e.address != *address || e.failed.load(Ordering::Acquire));
        if stale {
            if let Some(e) = eps.remove(peer) {
                Self::destroy(lib, worker, e, true, peer_errors);
            }
        }
        if !eps.contains_key(peer) {
            let failed = Box::new(AtomicBool::new(false));
            let padded_address = padded(address);
            // SAFETY: `address` is a peer-supplied worker address, which `ucp_ep_create` parses
            // without a length: it reads `padded_address` (the address then `BLOB_PAD` zero
            // bytes, alive for the call; UCX copies what it keeps), so a malformed one fails on
            // zeros inside our allocation instead of reading past it. The parameter struct is
            // all-zero (no fields) before the ones set here, and the error-handler argument
            // points into `failed`, which the endpoint entry keeps alive.
            let ep = unsafe {
                let mut p: ucp_ep_params_t = std::mem::zeroed();
                p.field_mask = (ucp_ep_params_field_UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
                    | ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                    | ucp_ep_params_field_UCP_EP_PARAM_FIELD_ERR_HANDLER)
                    as u64;
                p.address = padded_address.as_ptr() as *const ucp_address_t;
                p.err_mode = if peer_errors {
                    ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_PEER
                } else {
                    ucp_err_handling_mode_t_UCP_ERR_HANDLING_MODE_NONE
                };
                p.err_handler.cb = Some(on_peer_error);
                p.err_handler.arg = &*failed as *const AtomicBool as *mut c_void;
                let mut ep: ucp_ep_h = ptr::null_mut();
                let s = lib.ucp_ep_create(worker, &p, &mut ep);
                if s != ucs_status_t_UCS_OK {
                    return Err(format!("ucp_ep_create to {peer}: {}", status_str(lib, s)));
                }
                ep
            };
            eps.insert(
                peer.to_string(),
                Endpoint {
                    ep,
                    address: address.clone(),
                    failed,
                    rkeys: HashMap::new(),
                },
            );
        }
        eps.get_mut(peer)
            .ok_or_else(|| "endpoint vanished".to_string())
    }

    /// Moves every transfer whose requests all completed on: to its notification, or to its
    /// end; a transfer past its deadline has its endpoint force-closed (UCX then fails its
    /// requests, through their callbacks).
    fn advance(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.inflight.len() {
            let t = &mut self.inflight[i];
            if t.pending.left.load(Ordering::Acquire) > 0 {
                if now > t.deadline && !t.timed_out {
                    t.timed_out = true;
                    if t.error.is_none() {
                        t.error = Some("past its deadline".into());
                    }
                    let peer = t.peer.clone();
                    self.close(&peer, true);
                }
                i += 1;
                continue;
            }
            let s = t.pending.status.load(Ordering::Acquire);
            if s != ucs_status_t_UCS_OK && t.error.is_none() {
                t.error = Some(status_str(&self.lib, s));
            }
            if t.error.is_none() && !t.notifying && t.notification.is_some() {
                t.notifying = true;
                match self.post_notify(i) {
                    Ok(()) => continue,
                    Err(e) => self.inflight[i].error = Some(e),
                }
            }
            let mut t = self.inflight.swap_remove(i);
            let result = match t.error.take() {
                None => Ok(t.bytes),
                Some(_) if t.timed_out => Err(NetError::Timeout {
                    op: "UCX transfer",
                    peer: t.peer.clone(),
                    secs: t.deadline.saturating_duration_since(t.posted).as_secs_f64(),
                }),
                Some(e) => Err(NetError::Io {
                    op: "UCX transfer",
                    peer: t.peer.clone(),
                    source: std::io::Error::other(e),
                }),
            };
            if let Some(done) = t.done.take() {
                self.ended.push(Ended {
                    done,
                    result,
                    released: Released::Yes,
                });
            }
            if self.forgotten.contains(&t.peer) && !self.inflight.iter().any(|o| o.peer == t.peer) {
                self.forgotten.remove(&t.peer);
                self.close(&t.peer, false);
            }
        }
    }

    fn post_notify(&mut self, i: usize) -> Result<(), String> {
        let t = &self.inflight[i];
        let ep = self.eps.get(&t.peer).ok_or("endpoint closed")?.ep;
        let mut param = Self::param(&t.pending);
        param.op_attr_mask |= ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
        param.flags = ucp_send_am_flags_UCP_AM_SEND_FLAG_EAGER;
        // The payload stays with the in-flight entry, unmoved, until the send completed.
        let (data, len) = t
            .notification
            .as_ref()
            .map_or((ptr::null(), 0), |f| (f.as_ptr() as *const c_void, f.len()));
        let lib = &self.lib;
        // SAFETY: a live endpoint of our worker; `data..data+len` is owned by the in-flight
        // entry until the request, counted in its `pending`, completed.
        Self::counted(&t.pending, lib, "ucp_am_send_nbx", || unsafe {
            lib.ucp_am_send_nbx(ep, AM_NOTIFY, ptr::null(), 0, data, len, &param)
        })
    }

    fn close(&mut self, peer: &str, force: bool) {
        if let Some(e) = self.eps.remove(peer) {
            Self::destroy(&self.lib, self.worker, e, force, self.peer_errors);
        }
    }

    /// The agent forgets a peer: its endpoint goes once no transfer to it is in flight (those
    /// keep using it, and their rkeys, until they end).
    fn forget(&mut self, peer: &str) {
        if self.inflight.iter().any(|t| t.peer == peer) {
            self.forgotten.insert(peer.to_string());
        } else {
            self.close(peer, false);
        }
    }

    /// Closes an endpoint, then destroys its rkeys: UCX forbids destroying an rkey while an
    /// operation on it is outstanding, and a completed close (forced: UCX fails what is left;
    /// flushing: it waits for it) is what guarantees none is. With error mode NONE a forced
    /// close is refused by UCX, so those endpoints are flushed. If the close does not complete
    /// in time, the rkeys and the error flag (UCX may still write it) are leaked, never freed
    /// under UCX.
    fn destroy(lib: &UcpLib, worker: ucp_worker_h, e: Endpoint, force: bool, peer_errors: bool) {
        // SAFETY: the endpoint belongs to our worker and is used only on this thread; the rkeys
        // are destroyed only once its close completed (argued above).
        unsafe {
            // All-zero is this bindgen C struct's "no fields set" value.
            let mut param: ucp_request_param_t = std::mem::zeroed();
            if force && peer_errors {
                param.op_attr_mask = ucp_op_attr_t_UCP_OP_ATTR_FIELD_FLAGS;
                param.flags = ucp_ep_close_flags_t_UCP_EP_CLOSE_FLAG_FORCE;
            }
            let r = lib.ucp_ep_close_nbx(e.ep, &param);
            let closed = if r.is_null() {
                true
            } else if let Some(s) = ptr_status(r) {
                // An immediate error: UCX did not take the close.
                log::warn!(
                    "kvferry: closing a UCX endpoint failed: {}",
                    status_str(lib, s)
                );
                false
            } else {
                let deadline = Instant::now() + Duration::from_secs(2);
                while lib.ucp_request_check_status(r) == ucs_status_t_UCS_INPROGRESS
                    && Instant::now() < deadline
                {
                    lib.ucp_worker_progress(worker);
                }
                if lib.ucp_request_check_status(r) != ucs_status_t_UCS_INPROGRESS {
                    lib.ucp_request_free(r);
                    true
                } else {
                    false
                }
            };
            if closed {
                for (_, rk) in e.rkeys {
                    lib.ucp_rkey_destroy(rk);
                }
                drop(e.failed);
            } else {
                log::warn!("kvferry: a UCX endpoint did not close in time; keeping its keys");
                std::mem::forget(e.rkeys);
                Box::leak(e.failed);
            }
        }
    }

    /// Cancels what is in flight, waits for it (bounded), frees UCX's resources; returns the
    /// completions to run.
    fn shutdown(mut self) -> Vec<Ended> {
        for t in &mut self.inflight {
            if t.error.is_none() {
                t.error = Some("agent shut down".into());
            }
            t.notification = None;
        }
        let peers: Vec<String> = self.eps.keys().cloned().collect();
        for p in peers {
            self.close(&p, true);
        }
        // Let the cancelled requests complete, then report them.
        let deadline = Instant::now() + Duration::from_secs(2);
        self.advance();
        while !self.inflight.is_empty() && Instant::now() < deadline {
            self.progress();
        }
        // SAFETY: nothing references the memory handles, worker or context any more; requests
        // still outstanding are purged with the worker (their callbacks, if UCX runs them,
        // reach `Pending`s that the in-flight entries keep alive until after this).
        unsafe {
            for (_, m) in self.memh.drain() {
                self.lib.ucp_mem_unmap(self.ctx, m);
            }
            self.lib.ucp_worker_destroy(self.worker);
            self.lib.ucp_cleanup(self.ctx);
            drop(Box::from_raw(self.sink));
        }
        // Whatever outlived the deadline: the worker that carried it and the context that
        // mapped its memory are destroyed, so its memory is no longer reachable and may be
        // given back.
        let mut ended = std::mem::take(&mut self.ended);
        for mut t in self.inflight.drain(..) {
            if let Some(done) = t.done.take() {
                ended.push(Ended {
                    done,
                    result: Err(NetError::Shutdown),
                    released: Released::Yes,
                });
            }
        }
        ended
    }
}
