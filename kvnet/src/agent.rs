//! The agent, in NIXL's shape: register memory, publish metadata, load a peer's, post READ and
//! WRITE transfers of descriptor lists with an optional notification, poll completions and
//! notifications. A transfer completes whole or fails with an error; never a partial success.
//!
//! The agent composes its parts and owns none of their invariants: the export registry
//! (`registry`) owns memory's life, each transport (`tcp`, `ucx`) its own connections, the side
//! channel (in `tcp`) authentication, and the NIXL side channel (`nixl`) speaks stock NIXL on the
//! same registry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcore::nixl::NixlComm;
use kvcore::wire::{AgentMetadata, ExportedCache, Message, Notification, Op, TransportKey};
use kvcore::{Descriptor, MemKind, Region, RegionId};

use crate::ctx::Ctx;
use crate::error::NetError;
use crate::mem::Access;
use crate::peers::{Flavour, Peer};
use crate::tcp::{CallHandler, ServeCheck, Tcp};
use crate::transport::{Transfer, TransferDone, TransferId, Transport, TransportKind};
use crate::ucx::Ucx;
use crate::{nixl, tcp};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub name: String,
    /// Where the side channel (and the TCP transport) listens. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Peers must prove this shared token, and we prove it to them; none means no
    /// authentication, which is refused on addresses other than loopback unless `insecure`.
    pub token: Option<String>,
    /// Serve unauthenticated peers on a non-loopback address. Anyone who reaches the port can
    /// then read the exported memory; the agent says so in the log at start.
    pub insecure: bool,
    /// Bound on every network step (connect, handshake, each frame and each bulk transfer).
    pub timeout: Duration,
    /// A served connection with no request for this long is closed (the peer redials).
    pub idle_timeout: Duration,
    /// TCP connections per peer a transfer is spread over.
    pub connections_per_peer: usize,
    /// Transports in order of preference; the first both sides offer is used.
    pub transports: Vec<TransportKind>,
    /// UCX endpoints with error mode PEER: a dead peer fails transfers at once. Without it UCX
    /// may use transports that cannot detect failures (shared memory in UCX < 1.16), which are
    /// faster; a dead peer then surfaces at the transfer's deadline instead.
    pub ucx_peer_errors: bool,
    /// UCX configuration (`TLS`, `NET_DEVICES`, … without the `UCX_` prefix) applied to this
    /// agent's context, over the environment's; NIXL's backend parameters play this part.
    pub ucx_options: Vec<(String, String)>,
    /// Also serve NIXL's socket side channel here (stock NIXL agents `fetch_remote_metadata`
    /// and `send_local_metadata` against it). NIXL's side channel has no authentication: whoever
    /// reaches this port can read our metadata and with it our exported memory, so bind it to a
    /// trusted interface only.
    pub nixl_listen: Option<SocketAddr>,
}

impl AgentConfig {
    pub fn new(name: impl Into<String>) -> AgentConfig {
        AgentConfig {
            name: name.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            token: None,
            insecure: false,
            timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            connections_per_peer: 4,
            transports: vec![TransportKind::Ucx, TransportKind::Tcp],
            ucx_peer_errors: true,
            ucx_options: Vec::new(),
            nixl_listen: None,
        }
    }
}

pub struct Agent {
    ctx: Arc<Ctx>,
    tcp: Arc<Tcp>,
    ucx: Option<Ucx>,
    listen: SocketAddr,
    nixl_listen: Option<SocketAddr>,
    rt: Option<tokio::runtime::Runtime>,
    prefer_ucx: bool,
    next_id: AtomicU64,
}

impl Agent {
    /// Starts the agent: binds the listener and serves peers on it.
    pub fn new(cfg: AgentConfig) -> Result<Agent, NetError> {
        let open = !cfg.listen.ip().is_loopback();
        match (&cfg.token, open, cfg.insecure) {
            (Some(t), _, _) if t.is_empty() => {
                return Err(NetError::Config("the token is empty".into()));
            }
            (None, true, false) => {
                return Err(NetError::Config(format!(
                    "{} would listen on {} without a token: anyone who reaches it could read the \
                     exported memory. Set a token (the same on every peer), or set insecure to \
                     accept unauthenticated peers",
                    cfg.name, cfg.listen
                )));
            }
            (None, true, true) => log::warn!(
                "kvferry: INSECURE: {} listens on {} without a token; any host that reaches this \
                 port can read its exported memory",
                cfg.name,
                cfg.listen
            ),
            _ => {}
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvferry-net")
            .on_thread_start(crate::ctx::mark_network_thread)
            .enable_all()
            .build()
            .map_err(|e| crate::framing::io("start runtime", &cfg.name, e))?;
        let listener =
            crate::ctx::block_on(rt.handle(), tokio::net::TcpListener::bind(cfg.listen))?
                .map_err(|e| crate::framing::io("listen", &cfg.listen.to_string(), e))?;
        let listen = listener
            .local_addr()
            .map_err(|e| crate::framing::io("listen", &cfg.name, e))?;
        let ctx = Arc::new(Ctx::new(
            cfg.name,
            cfg.token.map(String::into_bytes),
            cfg.timeout,
            cfg.idle_timeout,
            cfg.connections_per_peer,
        ));
        ctx.add_endpoint(TransportKind::Tcp, listen.to_string().into_bytes());
        let tcp = Tcp::new(ctx.clone(), rt.handle().clone());
        rt.spawn(tcp::serve(tcp.clone(), listener));
        let nixl_listen = match cfg.nixl_listen {
            Some(addr) => {
                let l = crate::ctx::block_on(rt.handle(), tokio::net::TcpListener::bind(addr))?
                    .map_err(|e| {
                        crate::framing::io("listen (NIXL side channel)", &addr.to_string(), e)
                    })?;
                let at = l
                    .local_addr()
                    .map_err(|e| crate::framing::io("listen", &addr.to_string(), e))?;
                ctx.enable_nixl();
                rt.spawn(nixl::serve(ctx.clone(), l));
                Some(at)
            }
            None => None,
        };
        let pos = |t| cfg.transports.iter().position(|x| *x == t);
        let ucx = match pos(TransportKind::Ucx) {
            Some(_) => match Ucx::start(ctx.clone(), cfg.ucx_peer_errors, &cfg.ucx_options) {
                Ok(u) => {
                    log::info!("kvferry: UCX transport up ({})", u.library());
                    ctx.add_endpoint(TransportKind::Ucx, u.address().to_vec());
                    Some(u)
                }
                Err(e) => {
                    log::warn!("kvferry: UCX unavailable ({e}); the TCP transport serves");
                    None
                }
            },
            None => None,
        };
        let prefer_ucx = match (pos(TransportKind::Ucx), pos(TransportKind::Tcp)) {
            (Some(u), Some(t)) => u < t,
            (Some(_), None) => true,
            _ => false,
        };
        Ok(Agent {
            ctx,
            tcp,
            ucx,
            listen,
            nixl_listen,
            rt: Some(rt),
            prefer_ucx,
            next_id: AtomicU64::new(1),
        })
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    /// Address of the side channel (and TCP transport).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Every transport, TCP first; `live`: only those that can take new work (a UCX whose
    /// thread panicked still has mappings to refuse unmapping, but maps nothing new).
    fn transports_dyn(&self, live: bool) -> Vec<&dyn Transport> {
        let mut t: Vec<&dyn Transport> = vec![self.tcp.as_ref()];
        if let Some(u) = &self.ucx {
            if !live || u.alive() {
                t.push(u);
            }
        }
        t
    }

    /// Registers and exports memory. Peers that load our metadata may read and write it.
    ///
    /// # Safety
    /// For host kinds `region.base` is an address in this process: the memory must stay valid
    /// until `deregister` returns Ok (or the agent is dropped), and while a transfer runs nothing
    /// else may write what it reads or touch what it writes. (Dropping the agent returns only
    /// once nothing can reach the memory; where that cannot be established — after a panic of
    /// the UCX thread — it aborts the process.)
    pub unsafe fn register(&self, region: Region) -> Result<RegionId, NetError> {
        let device = matches!(region.kind, MemKind::Device { .. });
        if device && !self.device_memory() {
            return Err(NetError::Unavailable(format!(
                "device memory can be exported only through a UCX built with CUDA ({}); stage \
                 the blocks through pinned DRAM instead",
                match &self.ucx {
                    Some(u) => format!("{} has no CUDA support", u.library()),
                    None => "no UCX is loaded".into(),
                }
            )));
        }
        let timeout = self.ctx.timeout;
        self.ctx.exports.register(region, |id| {
            let mut keys = Vec::new();
            let running = self.transports_dyn(true);
            for (i, t) in running.iter().enumerate() {
                match t.map(id, &region) {
                    Ok(Some(key)) => keys.push(TransportKey {
                        transport: t.kind().name().into(),
                        key,
                    }),
                    Ok(None) => {}
                    Err(e) => {
                        for t in &running[..i] {
                            // Never visible to anyone: an unmap that fails leaves a mapping
                            // of memory no peer knows a key for.
                            let _ = t.unmap(id, timeout);
                        }
                        return Err(e);
                    }
                }
            }
            Ok(keys)
        })
    }

    /// The transports this agent runs ("tcp" always; "ucx" when libucp loaded), and the UCX
    /// library in use.
    pub fn transports(&self) -> Vec<TransportKind> {
        self.transports_dyn(true).iter().map(|t| t.kind()).collect()
    }

    /// Whether device (CUDA) memory can be registered: UCX is loaded and built with CUDA.
    pub fn device_memory(&self) -> bool {
        self.ucx.as_ref().is_some_and(|u| u.has_cuda() && u.alive())
    }

    pub fn ucx_library(&self) -> Option<&str> {
        self.ucx.as_ref().map(Ucx::library)
    }

    /// The transport transfers to `peer` would use now.
    pub fn transport_for(&self, peer: &str) -> Option<TransportKind> {
        let p = self.ctx.peers.get(peer)?;
        Some(self.carrier(&p).kind())
    }

    /// The transport that carries transfers to `p`: UCX when preferred (or the only way to
    /// reach it) and both sides run it, else TCP.
    fn carrier(&self, p: &Peer) -> &dyn Transport {
        match &self.ucx {
            Some(u) if u.reaches(p) && (self.prefer_ucx || !self.tcp.reaches(p)) => u,
            _ => self.tcp.as_ref(),
        }
    }

    /// Stops exporting a region; waits (up to the timeout) for transfers using it, then for
    /// every transport to unmap it, then tells peers. After an error the region is no longer
    /// reachable, but its memory must be kept until the agent drops.
    pub fn deregister(&self, id: RegionId) -> Result<Region, NetError> {
        let timeout = self.ctx.timeout;
        let r = self.ctx.exports.deregister(id, timeout, || {
            for t in self.transports_dyn(false) {
                // Done, not queued: after this the keys peers hold no longer reach the memory.
                t.unmap(id, timeout)?;
            }
            Ok(())
        })?;
        self.publish();
        Ok(r)
    }

    /// Publishes a KV cache layout living in a registered region (geometry checks at handshake).
    pub fn export_cache(&self, cache: ExportedCache) -> Result<(), NetError> {
        self.ctx.exports.export_cache(cache)
    }

    /// Our metadata as a kvcore wire frame.
    pub fn local_metadata(&self) -> Vec<u8> {
        Message::Metadata(self.ctx.metadata()).encode()
    }

    /// Loads a peer's metadata frame (from any channel); returns the peer's name.
    pub fn load_remote(&self, frame: &[u8]) -> Result<String, NetError> {
        match Message::decode(frame)? {
            Message::Metadata(md) => self.ctx.load(md, None),
            _ => Err(NetError::Unexpected {
                peer: "metadata frame".into(),
                expected: "agent metadata",
            }),
        }
    }

    /// The side-channel handshake: connects to a peer's listener, authenticates, exchanges
    /// metadata both ways (so the peer can notify us), loads the peer's. Returns its name.
    pub fn connect(&self, addr: SocketAddr) -> Result<String, NetError> {
        let tcp = self.tcp.clone();
        self.block_on(async move {
            let (conn, md) = tcp::dial(&tcp, addr).await?;
            let name = tcp.ctx.load(md, Some(addr.ip()))?;
            if let Some(p) = tcp.ctx.peers.get(&name) {
                tcp.pool(&p).put(conn);
            }
            Ok(name)
        })?
    }

    /// How many peers' metadata this agent keeps (at most [`crate::MAX_PEERS`]).
    pub fn peer_count(&self) -> usize {
        self.ctx.peers.len()
    }

    /// The metadata of a loaded peer.
    pub fn peer_metadata(&self, peer: &str) -> Option<AgentMetadata> {
        self.ctx.peers.get(peer).map(|p| p.metadata.clone())
    }

    /// Checks a loaded peer's exported KV caches against our geometry (all but the head count,
    /// which differs between tensor-parallel sizes); the error names the field and both values.
    pub fn check_peer_geometry(&self, peer: &str, ours: &kvcore::Geometry) -> Result<(), NetError> {
        let p = self.peer(peer)?;
        for c in &p.metadata.caches {
            ours.check_same_except_heads(c.layout.geometry())?;
        }
        Ok(())
    }

    /// Forgets a peer; each transport lets go of its connections to it once no transfer uses
    /// them.
    pub fn forget_peer(&self, peer: &str) {
        self.ctx.peers.remove(peer);
        for t in self.transports_dyn(false) {
            t.close(peer);
        }
    }

    /// Fault injection for tests: panics the UCX thread, as a bug in it would. Transfers in
    /// flight on it fail, their memory stays held, and the agent carries on over TCP.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_ucx_panic(&self) {
        if let Some(u) = &self.ucx {
            u.inject_panic();
        }
    }

    fn peer(&self, name: &str) -> Result<Arc<Peer>, NetError> {
        self.ctx
            .peers
            .get(name)
            .ok_or_else(|| NetError::UnknownPeer(name.to_string()))
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime, NetError> {
        self.rt.as_ref().ok_or(NetError::Shutdown)
    }

    /// Runs `f` on the agent's runtime and waits for it (from any thread, async code too).
    fn block_on<F>(&self, f: F) -> Result<F::Output, NetError>
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        crate::ctx::block_on(self.runtime()?.handle(), f)
    }

    /// Reads `remote` (in `peer`'s exported memory) into `local`, pairwise; then, if given,
    /// delivers `notification` to the peer.
    pub fn read(
        &self,
        local: &[Descriptor],
        peer: &str,
        remote: &[Descriptor],
        notification: Option<Vec<u8>>,
    ) -> Result<TransferId, NetError> {
        self.post(Op::Read, local, peer, remote, notification)
    }

    /// Writes `local` into `remote` (in `peer`'s exported memory), pairwise; then, if given,
    /// delivers `notification` to the peer.
    pub fn write(
        &self,
        local: &[Descriptor],
        peer: &str,
        remote: &[Descriptor],
        notification: Option<Vec<u8>>,
    ) -> Result<TransferId, NetError> {
        self.post(Op::Write, local, peer, remote, notification)
    }

    fn post(
        &self,
        op: Op,
        local: &[Descriptor],
        peer: &str,
        remote: &[Descriptor],
        notification: Option<Vec<u8>>,
    ) -> Result<TransferId, NetError> {
        if local.len() != remote.len() {
            return Err(NetError::Descriptors(format!(
                "{} local descriptors, {} remote",
                local.len(),
                remote.len()
            )));
        }
        if let Some(i) = local.iter().zip(remote).position(|(l, r)| l.len != r.len) {
            return Err(NetError::Descriptors(format!(
                "pair {i}: local {} bytes, remote {} bytes",
                local[i].len, remote[i].len
            )));
        }
        let p = self.peer(peer)?;
        // Both lists are checked here, before anything moves; the peer checks its side again.
        p.regions.resolve_all(remote)?;
        // A READ writes our memory, a WRITE reads it.
        let access = if op == Op::Read {
            Access::Write
        } else {
            Access::Read
        };
        let hold = self.ctx.exports.hold(access, local)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let carrier = self.carrier(&p);
        let ctx = self.ctx.clone();
        // kvferry peers take notifications only on the side channel's authenticated
        // connections: one that follows a UCX transfer goes there once the data is in place.
        let (notification, after) = match (carrier.kind(), p.flavour) {
            (TransportKind::Ucx, Flavour::Kvferry) => (None, notification),
            _ => (notification, None),
        };
        let done: Box<dyn FnOnce(Result<u64, NetError>) + Send + Sync> = match after {
            None => Box::new(move |r| ctx.inbox.finish(id, r)),
            Some(payload) => {
                let (tcp, p) = (self.tcp.clone(), p.clone());
                Box::new(move |r| match r {
                    Ok(n) => {
                        let rt = tcp.rt.clone();
                        rt.spawn(async move {
                            let r = tcp::notify(&tcp, &p, payload).await.map(|()| n);
                            tcp.ctx.inbox.finish(id, r);
                        });
                    }
                    Err(e) => ctx.inbox.finish(id, Err(e)),
                })
            }
        };
        let t = Transfer::new(id, op, p, hold, remote.to_vec(), notification, done);
        match carrier.post(t) {
            Ok(()) => Ok(id),
            Err(refused) => {
                let (e, t) = *refused;
                t.cancel();
                Err(e)
            }
        }
    }

    /// Sends our metadata to every loaded peer that can be reached over TCP. One-sided
    /// transports (UCX RMA) never ask the target, so after a deregistration this is what makes
    /// peers refuse the stale region; a transfer posted before the update lands may still run.
    pub fn publish(&self) {
        let peers: Vec<Arc<Peer>> = self.ctx.peers.all();
        let Ok(rt) = self.runtime() else { return };
        // Every peer at once, under one deadline: a deregistration waits for one timeout at
        // most, not one per peer (a peer that does not answer hears of it when it reconnects).
        let limit = self.ctx.timeout;
        let tasks: Vec<_> = peers
            .into_iter()
            .map(|p| {
                let tcp = self.tcp.clone();
                rt.spawn(async move {
                    let ctx = &tcp.ctx;
                    let r = match p.flavour {
                        Flavour::Kvferry => tcp::publish(&tcp, &p).await,
                        // NIXL adds what it loads to what it knew: forget us first, then reload.
                        Flavour::Nixl {
                            side_channel: Some(addr),
                        } => {
                            let invl = NixlComm::Invalidate(ctx.name.clone());
                            let load = NixlComm::Load(ctx.nixl_metadata().encode());
                            nixl::send(ctx, addr, &[invl, load]).await
                        }
                        Flavour::Nixl { side_channel: None } => Ok(()),
                    };
                    if let Err(e) = r {
                        log::warn!(
                            "kvferry: cannot update {} about our exports: {e}",
                            p.metadata.name
                        );
                    }
                })
            })
            .collect();
        let waited = crate::ctx::block_on(rt.handle(), async move {
            let all = async {
                for t in tasks {
                    let _ = t.await;
                }
            };
            if tokio::time::timeout(limit, all).await.is_err() {
                log::warn!("kvferry: not every peer heard of our exports within {limit:?}");
            }
        });
        if let Err(e) = waited {
            // The tasks run on regardless; only the wait for them is skipped.
            log::warn!("kvferry: not waiting for peers to hear of our exports: {e}");
        }
    }

    /// Our metadata as a stock NIXL agent reads it (`add_remote_agent` / `loadRemoteMD`): the
    /// UCX worker address and every region UCX can reach, with its packed rkey.
    pub fn nixl_metadata(&self) -> Vec<u8> {
        self.ctx.nixl_metadata().encode()
    }

    /// Loads a stock NIXL agent's metadata blob (`get_agent_metadata`, full or partial; partial
    /// blobs add to what was loaded, as in NIXL). Returns the agent's name.
    pub fn load_nixl_metadata(&self, blob: &[u8]) -> Result<String, NetError> {
        self.ctx.load_nixl(blob, None)
    }

    /// Where NIXL's side channel is served, when `AgentConfig::nixl_listen` asked for it.
    pub fn nixl_listen_addr(&self) -> Option<SocketAddr> {
        self.nixl_listen
    }

    /// NIXL's `fetch_remote_metadata`: asks the NIXL listener at `addr` for its agent's metadata
    /// and loads it. Returns the agent's name.
    pub fn nixl_fetch_metadata(&self, addr: SocketAddr) -> Result<String, NetError> {
        let ctx = self.ctx.clone();
        self.block_on(async move { nixl::fetch(&ctx, addr).await })?
    }

    /// NIXL's `send_local_metadata`: sends our metadata to the NIXL listener at `addr`.
    pub fn nixl_send_metadata(&self, addr: SocketAddr) -> Result<(), NetError> {
        let ctx = self.ctx.clone();
        self.block_on(async move {
            let load = NixlComm::Load(ctx.nixl_metadata().encode());
            nixl::send(&ctx, addr, &[load]).await
        })?
    }

    /// NIXL's `invalidate_local_metadata`: tells the NIXL listener at `addr` to forget us.
    pub fn nixl_invalidate(&self, addr: SocketAddr) -> Result<(), NetError> {
        let ctx = self.ctx.clone();
        self.block_on(async move {
            nixl::send(&ctx, addr, &[NixlComm::Invalidate(ctx.name.clone())]).await
        })?
    }

    /// The descriptor for raw `(addr, len)` inside a loaded peer's exported memory, the way NIXL
    /// names remote memory (`kind`: host memory for NIXL's DRAM, a device for VRAM).
    pub fn remote_descriptor(
        &self,
        peer: &str,
        kind: MemKind,
        addr: u64,
        len: u64,
    ) -> Result<Descriptor, NetError> {
        Ok(self.peer(peer)?.regions.find(kind, addr, len)?)
    }

    /// Completed transfers, oldest first.
    /// Progresses UCX once on the caller's thread first (as NIXL's status check does), so a
    /// caller polling in a loop completes UCX transfers without waiting for the UCX thread.
    pub fn poll(&self) -> Vec<TransferDone> {
        if let Some(u) = &self.ucx {
            u.progress();
        }
        self.ctx.inbox.poll()
    }

    /// Waits for one transfer; others stay queued for `poll`. A UCX transfer is progressed on
    /// the caller's thread while it waits (no hand-off to the UCX thread and back).
    pub fn wait(&self, id: TransferId, timeout: Duration) -> Option<TransferDone> {
        let until = Instant::now() + timeout;
        if let Some(u) = &self.ucx {
            u.drive(id, until);
        }
        self.ctx
            .inbox
            .wait(id, until.saturating_duration_since(Instant::now()))
    }

    /// Sends opaque bytes to a peer: to a kvferry peer on the side channel's authenticated
    /// connections, to a stock NIXL agent as NIXL's UCX active message.
    pub fn notify(&self, peer: &str, payload: Vec<u8>) -> Result<(), NetError> {
        let p = self.peer(peer)?;
        match (&self.ucx, p.flavour) {
            (Some(u), Flavour::Nixl { .. }) => u.notify(&p, payload),
            (None, Flavour::Nixl { .. }) => Err(NetError::NoTransport {
                peer: peer.to_string(),
                offered: "NIXL agents take notifications over UCX, which is not loaded".into(),
            }),
            (_, Flavour::Kvferry) => self.tcp.notify(&p, payload),
        }
    }

    /// Sets what decides which of the TCP transport's READs and WRITEs a peer may have served
    /// (replacing any earlier check). Without one, anything inside our exports is served.
    pub fn set_serve_check(&self, check: ServeCheck) {
        *self.tcp.serve_check.write() = Some(check);
    }

    /// Sets what answers peers' calls (replacing any earlier handler). Without one, every call
    /// is answered with an empty reply.
    pub fn set_call_handler(&self, handler: CallHandler) {
        *self.tcp.calls.write() = Some(handler);
    }

    /// Sends `payload` to a kvferry peer and waits for its handler's reply. Calls always travel
    /// on the side channel's authenticated TCP connections (whatever transport moves the bulk
    /// data), so the peer's handler learns who called from the handshake, not from the payload.
    pub fn call(&self, peer: &str, payload: Vec<u8>) -> Result<Vec<u8>, NetError> {
        let p = self.peer(peer)?;
        if p.flavour != Flavour::Kvferry {
            return Err(NetError::NoTransport {
                peer: peer.to_string(),
                offered: "calls need a kvferry peer".into(),
            });
        }
        let tcp = self.tcp.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.block_on(async move { tcp::call(&tcp, &p, id, payload).await })?
    }

    /// Notifications received since the last call, as `(sender, bytes)`.
    pub fn notifications(&self) -> Vec<Notification> {
        self.ctx.inbox.notifications(Duration::ZERO)
    }

    /// Waits until at least one notification is queued (or the timeout passes), then drains.
    pub fn wait_notifications(&self, timeout: Duration) -> Vec<Notification> {
        self.ctx.inbox.notifications(timeout)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // From here no transfer can take a hold on our memory.
        self.ctx.exports.close();
        // Cancels every task at its next await.
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // Dropped on a runtime thread (the last owner let go inside a callback the
                // runtime ran): tokio refuses to shut a runtime down from there, so another
                // thread does, and this one waits for it (bounded by the shutdown's timeout).
                let t = std::thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(1)));
                let _ = t.join();
            } else {
                rt.shutdown_timeout(Duration::from_secs(1));
            }
        }
        // Cancels UCX operations in flight, waits for them, and frees the worker.
        let ucx_dead = self.ucx.as_ref().is_some_and(|u| !u.alive());
        self.ucx = None;
        // `register`'s contract lets the caller free its memory once we return, so we return
        // only when nothing can touch it: a task still inside a poll when the shutdown timed out
        // (a handler that blocked) lets go of its holds when that poll ends. When that cannot
        // be known — the UCX thread panicked and left UCX's context, its mappings and its
        // abandoned operations alive, or a hold never ends — the process stops rather than let
        // freed memory be written.
        let drained = !ucx_dead
            && self
                .ctx
                .exports
                .wait_unheld(self.ctx.timeout.max(Duration::from_secs(10)));
        if !drained {
            log::error!(
                "kvferry: agent {} is dropped while its registered memory may still be reached \
                 ({}); aborting rather than let it be freed under a transfer",
                self.ctx.name,
                if ucx_dead {
                    "the UCX thread panicked with its mappings alive"
                } else {
                    "a transfer still holds it"
                }
            );
            eprintln!(
                "kvferry: aborting: agent {} dropped while its registered memory may still be reached",
                self.ctx.name
            );
            std::process::abort();
        }
    }
}
