//! The agent, in NIXL's shape: register memory, publish metadata, load a peer's, post READ and
//! WRITE transfers of descriptor lists with an optional notification, poll completions and
//! notifications. A transfer completes whole or fails with an error; never a partial success.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcore::nixl::NixlComm;
use kvcore::wire::{
    AgentMetadata, Endpoint, ExportedCache, ExportedRegion, Message, Notification, Op,
    TransportKey, PROTOCOL_VERSION,
};
use kvcore::{Descriptor, MemKind, Region, RegionId, RegionTable, Resolved};
use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::NetError;
use crate::mem::{Access, Claims, UseCounts};
use crate::ucx::{RmaOp, Ucx};
use crate::{nixl, tcp};

/// Which transport carries transfers to a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Tcp,
    Ucx,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ucx => "ucx",
        }
    }
}

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
    pub transports: Vec<Transport>,
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
            transports: vec![Transport::Ucx, Transport::Tcp],
            ucx_peer_errors: true,
            ucx_options: Vec::new(),
            nixl_listen: None,
        }
    }
}

pub type TransferId = u64;

/// Peers an agent keeps metadata for. A new name beyond it is refused (the handshake fails),
/// so a flood of handshakes under fresh names cannot grow our memory without bound.
pub const MAX_PEERS: usize = 4096;

/// Notifications queued and not yet taken, in number and in payload bytes; beyond either the
/// oldest are dropped (and counted).
pub const MAX_QUEUED_NOTIFICATIONS: usize = 65536;
pub const MAX_QUEUED_NOTIFICATION_BYTES: usize = 64 << 20;

/// Metadata bytes kept per peer (its encoded size): a region table of 65k regions with keys
/// fits; more is refused.
pub const MAX_PEER_METADATA: usize = 8 << 20;

#[derive(Debug)]
pub struct TransferDone {
    pub id: TransferId,
    /// Bytes moved, or why the transfer failed.
    pub result: Result<u64, NetError>,
}

/// Which protocol a peer speaks: kvferry's frames, or stock NIXL's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    Kvferry,
    /// `side_channel`: where its NIXL listener is, when we know (to re-publish our metadata).
    Nixl {
        side_channel: Option<SocketAddr>,
    },
}

/// A peer whose metadata was loaded.
pub(crate) struct Peer {
    pub flavour: Flavour,
    pub metadata: AgentMetadata,
    pub regions: RegionTable,
    pub tcp_addr: Option<SocketAddr>,
    pub conns: Arc<tcp::ConnPool>,
    pub ucx_address: Option<Arc<Vec<u8>>>,
    pub ucx_keys: HashMap<RegionId, Arc<Vec<u8>>>,
    /// When its metadata was (last) loaded: the oldest idle peer makes room for a new one.
    pub loaded_at: Instant,
}

pub(crate) struct Shared {
    pub name: String,
    pub token: Option<Vec<u8>>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub conns_per_peer: usize,
    pub regions: RwLock<RegionTable>,
    pub caches: RwLock<Vec<ExportedCache>>,
    pub uses: Arc<UseCounts>,
    /// The bytes of our memory transfers in flight read and write (see [`Claims`]).
    pub claims: Arc<Claims>,
    pub peers: RwLock<HashMap<String, Arc<Peer>>>,
    pub done: Mutex<VecDeque<TransferDone>>,
    pub done_cv: Condvar,
    pub notifications: Mutex<VecDeque<Notification>>,
    pub notif_cv: Condvar,
    pub listen: SocketAddr,
    pub ucx_address: RwLock<Option<Vec<u8>>>,
    pub ucx_keys: RwLock<HashMap<RegionId, Vec<u8>>>,
    pub calls: RwLock<Option<CallHandler>>,
    pub serve_check: RwLock<Option<ServeCheck>>,
    pub dropped_notifications: AtomicU64,
    /// Payload bytes in `notifications` (changed only under its lock).
    pub queued_bytes: std::sync::atomic::AtomicUsize,
}

/// Decides, before the TCP transport serves a peer's READ or WRITE, whether that peer may touch
/// those descriptors now (`Err` says why not). It runs after the bounds check against our
/// exports, on the network runtime, so it must not block. One-sided UCX operations never ask
/// the target: a check cannot refuse those (see kvferry's leases for how the reading side
/// proves its bytes were still the ones granted).
pub type ServeCheck = Arc<dyn Fn(&str, Op, &[Descriptor]) -> Verdict + Send + Sync>;

/// A [`ServeCheck`]'s answer.
pub enum Verdict {
    /// Serve it; the guard, if any, is held until the bytes are sent or received (so what the
    /// check allowed cannot be taken back while the memory is being used).
    Serve(Option<Box<dyn Send>>),
    Refuse(String),
    /// Not yet: ask again shortly, up to a bounded wait, then refuse with this reason (what
    /// would allow it may be on its way, as a grant the engine learns of a step later).
    NotYet(String),
}

/// Answers a peer's [`Agent::call`]: `(authenticated peer name, payload) -> reply`. It runs on
/// the network runtime, so it must not block.
pub type CallHandler = Arc<dyn Fn(&str, &[u8]) -> Vec<u8> + Send + Sync>;

impl Shared {
    pub fn metadata(&self) -> AgentMetadata {
        let regions = self.regions.read();
        let keys = self.ucx_keys.read();
        let mut endpoints = vec![Endpoint {
            transport: Transport::Tcp.name().into(),
            address: self.listen.to_string().into_bytes(),
        }];
        if let Some(a) = self.ucx_address.read().as_ref() {
            endpoints.push(Endpoint {
                transport: Transport::Ucx.name().into(),
                address: a.clone(),
            });
        }
        AgentMetadata {
            name: self.name.clone(),
            protocol_version: PROTOCOL_VERSION,
            endpoints,
            regions: regions
                .iter()
                .map(|(id, r)| ExportedRegion {
                    id,
                    region: *r,
                    keys: keys
                        .get(&id)
                        .map(|k| {
                            vec![TransportKey {
                                transport: Transport::Ucx.name().into(),
                                key: k.clone(),
                            }]
                        })
                        .unwrap_or_default(),
                })
                .collect(),
            caches: self.caches.read().clone(),
        }
    }

    /// Loads (or refreshes) a peer from its metadata; returns its name.
    pub fn load(&self, md: AgentMetadata) -> Result<String, NetError> {
        self.load_peer(md, Flavour::Kvferry)
    }

    pub fn load_peer(&self, md: AgentMetadata, flavour: Flavour) -> Result<String, NetError> {
        if md.name == self.name {
            return Err(NetError::Descriptors(format!(
                "peer metadata carries our own name {:?}",
                md.name
            )));
        }
        if md.protocol_version != PROTOCOL_VERSION {
            return Err(NetError::Version {
                peer: md.name,
                ours: PROTOCOL_VERSION,
                theirs: md.protocol_version,
            });
        }
        let mut regions = RegionTable::new();
        for r in &md.regions {
            regions.insert_with_id(r.id, r.region)?;
        }
        let tcp_addr = md
            .endpoints
            .iter()
            .find(|e| e.transport == Transport::Tcp.name())
            .and_then(|e| std::str::from_utf8(&e.address).ok()?.parse().ok());
        let ucx_address = md
            .endpoints
            .iter()
            .find(|e| e.transport == Transport::Ucx.name())
            .map(|e| Arc::new(e.address.clone()));
        let ucx_keys = md
            .regions
            .iter()
            .filter_map(|r| {
                let k = r
                    .keys
                    .iter()
                    .find(|k| k.transport == Transport::Ucx.name())?;
                Some((r.id, Arc::new(k.key.clone())))
            })
            .collect();
        let size: usize = md
            .regions
            .iter()
            .map(|r| 64 + r.keys.iter().map(|k| k.key.len() + 16).sum::<usize>())
            .sum::<usize>()
            + md.endpoints
                .iter()
                .map(|e| e.address.len() + 16)
                .sum::<usize>()
            + md.caches.len() * 256;
        if size > MAX_PEER_METADATA {
            return Err(NetError::Descriptors(format!(
                "peer {:?} sends {size} bytes of metadata; at most {MAX_PEER_METADATA} are kept",
                md.name
            )));
        }
        let name = md.name.clone();
        let mut peers = self.peers.write();
        if !peers.contains_key(&name) && peers.len() >= MAX_PEERS {
            // Room for a new peer: the one loaded longest ago that nothing uses right now (no
            // transfer or call holds its entry). It reconnects if it comes back.
            let idle = peers
                .iter()
                .filter(|(_, p)| Arc::strong_count(p) == 1)
                .min_by_key(|(_, p)| p.loaded_at)
                .map(|(n, _)| n.clone());
            match idle {
                Some(old) => {
                    log::info!("kvferry: {MAX_PEERS} peers known; forgetting {old} for {name}");
                    peers.remove(&old);
                }
                None => {
                    return Err(NetError::Descriptors(format!(
                        "{MAX_PEERS} peers known and all in use; {name:?} is refused"
                    )))
                }
            }
        }
        // NIXL's side channel is unauthenticated: it must not replace a kvferry peer's entry.
        if let Some(old) = peers.get(&name) {
            if std::mem::discriminant(&old.flavour) != std::mem::discriminant(&flavour) {
                return Err(NetError::Descriptors(format!(
                    "peer name {name:?} is taken by a peer of another protocol"
                )));
            }
        }
        let conns = match peers.get(&name) {
            // Keep warm connections when a peer re-sends unchanged addresses.
            Some(p) if p.tcp_addr == tcp_addr => p.conns.clone(),
            _ => Arc::new(tcp::ConnPool::default()),
        };
        peers.insert(
            name.clone(),
            Arc::new(Peer {
                flavour,
                metadata: md,
                regions,
                tcp_addr,
                conns,
                ucx_address,
                ucx_keys,
                loaded_at: Instant::now(),
            }),
        );
        Ok(name)
    }

    pub fn finish(&self, id: TransferId, result: Result<u64, NetError>) {
        self.done.lock().push_back(TransferDone { id, result });
        self.done_cv.notify_all();
    }

    /// A notification to `p` in the bytes it reads.
    pub fn notification_frame(&self, p: &Peer, payload: Vec<u8>) -> Vec<u8> {
        match p.flavour {
            Flavour::Kvferry => Message::Notification(Notification {
                from: self.name.clone(),
                payload,
            })
            .encode(),
            Flavour::Nixl { .. } => kvcore::nixl::NixlNotif {
                from: self.name.clone(),
                msg: payload,
            }
            .encode(),
        }
    }

    pub fn deliver(&self, n: Notification) {
        let mut q = self.notifications.lock();
        let mut bytes = self.queued_bytes.load(Ordering::Relaxed) + n.payload.len();
        while !q.is_empty()
            && (q.len() >= MAX_QUEUED_NOTIFICATIONS || bytes > MAX_QUEUED_NOTIFICATION_BYTES)
        {
            if let Some(old) = q.pop_front() {
                bytes -= old.payload.len();
            }
            let dropped = self.dropped_notifications.fetch_add(1, Ordering::Relaxed);
            if dropped.is_power_of_two() {
                log::warn!(
                    "kvferry: {} notifications dropped: nobody takes them ({MAX_QUEUED_NOTIFICATIONS} queued)",
                    dropped + 1
                );
            }
        }
        q.push_back(n);
        self.queued_bytes.store(bytes, Ordering::Relaxed);
        drop(q);
        self.notif_cv.notify_all();
    }

    /// Takes every queued notification.
    pub fn take_notifications(&self, q: &mut VecDeque<Notification>) -> Vec<Notification> {
        self.queued_bytes.store(0, Ordering::Relaxed);
        q.drain(..).collect()
    }
}

pub struct Agent {
    shared: Arc<Shared>,
    nixl_listen: Option<SocketAddr>,
    rt: Option<tokio::runtime::Runtime>,
    ucx: Option<Ucx>,
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
            .enable_all()
            .build()
            .map_err(|e| crate::framing::io("start runtime", &cfg.name, e))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(cfg.listen))
            .map_err(|e| crate::framing::io("listen", &cfg.listen.to_string(), e))?;
        let listen = listener
            .local_addr()
            .map_err(|e| crate::framing::io("listen", &cfg.name, e))?;
        let shared = Arc::new(Shared {
            name: cfg.name,
            token: cfg.token.map(String::into_bytes),
            timeout: cfg.timeout,
            idle_timeout: cfg.idle_timeout,
            conns_per_peer: cfg.connections_per_peer.max(1),
            regions: RwLock::new(RegionTable::new()),
            caches: RwLock::new(Vec::new()),
            uses: Arc::new(UseCounts::default()),
            claims: Arc::new(Claims::default()),
            peers: RwLock::new(HashMap::new()),
            done: Mutex::new(VecDeque::new()),
            done_cv: Condvar::new(),
            notifications: Mutex::new(VecDeque::new()),
            notif_cv: Condvar::new(),
            listen,
            ucx_address: RwLock::new(None),
            ucx_keys: RwLock::new(HashMap::new()),
            calls: RwLock::new(None),
            serve_check: RwLock::new(None),
            dropped_notifications: AtomicU64::new(0),
            queued_bytes: std::sync::atomic::AtomicUsize::new(0),
        });
        rt.spawn(tcp::serve(shared.clone(), listener));
        let nixl_listen = match cfg.nixl_listen {
            Some(addr) => {
                let l = rt
                    .block_on(tokio::net::TcpListener::bind(addr))
                    .map_err(|e| {
                        crate::framing::io("listen (NIXL side channel)", &addr.to_string(), e)
                    })?;
                let at = l
                    .local_addr()
                    .map_err(|e| crate::framing::io("listen", &addr.to_string(), e))?;
                rt.spawn(nixl::serve(shared.clone(), l));
                Some(at)
            }
            None => None,
        };
        let pos = |t| cfg.transports.iter().position(|x| *x == t);
        let ucx = match pos(Transport::Ucx) {
            Some(_) => match Ucx::start(shared.clone(), cfg.ucx_peer_errors, &cfg.ucx_options) {
                Ok(u) => {
                    log::info!("kvferry: UCX transport up ({})", u.library());
                    *shared.ucx_address.write() = Some(u.address().to_vec());
                    Some(u)
                }
                Err(e) => {
                    log::warn!("kvferry: UCX unavailable ({e}); the TCP transport serves");
                    None
                }
            },
            None => None,
        };
        let prefer_ucx = match (pos(Transport::Ucx), pos(Transport::Tcp)) {
            (Some(u), Some(t)) => u < t,
            (Some(_), None) => true,
            _ => false,
        };
        Ok(Agent {
            shared,
            nixl_listen,
            rt: Some(rt),
            ucx,
            prefer_ucx,
            next_id: AtomicU64::new(1),
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Address of the side channel (and TCP transport).
    pub fn listen_addr(&self) -> SocketAddr {
        self.shared.listen
    }

    /// Registers and exports memory. Peers that load our metadata may read and write it.
    ///
    /// # Safety
    /// For host kinds `region.base` is an address in this process: the memory must stay valid
    /// until `deregister` returns Ok (or the agent is dropped), and while a transfer runs nothing
    /// else may write what it reads or touch what it writes.
    pub unsafe fn register(&self, region: Region) -> Result<RegionId, NetError> {
        let device = matches!(region.kind, MemKind::Device { .. });
        if device && self.ucx.as_ref().is_none_or(|u| !u.has_cuda()) {
            return Err(NetError::Unavailable(format!(
                "device memory can be exported only through a UCX built with CUDA ({}); stage \
                 the blocks through pinned DRAM instead",
                match &self.ucx {
                    Some(u) => format!("{} has no CUDA support", u.library()),
                    None => "no UCX is loaded".into(),
                }
            )));
        }
        // The table stays write-locked until the transport mapped the region: no peer can see
        // it (metadata and bounds checks take the read lock, and use-holds are taken under it)
        // before its registration fully succeeded, so a failed one is removed untouched. The
        // UCX thread never takes this lock, so waiting for it here cannot deadlock.
        let mut regions = self.shared.regions.write();
        let id = regions.insert(region)?;
        if let Some(u) = &self.ucx {
            match u.map(id, region.base, region.len, device) {
                Ok(key) => {
                    self.shared.ucx_keys.write().insert(id, key);
                }
                Err(e) => {
                    regions.remove(id)?;
                    return Err(e);
                }
            }
        }
        Ok(id)
    }

    /// The transports this agent runs ("tcp" always; "ucx" when libucp loaded), and the UCX
    /// library in use.
    pub fn transports(&self) -> Vec<Transport> {
        let mut t = vec![Transport::Tcp];
        if self.ucx.is_some() {
            t.push(Transport::Ucx);
        }
        t
    }

    /// Whether device (CUDA) memory can be registered: UCX is loaded and built with CUDA.
    pub fn device_memory(&self) -> bool {
        self.ucx.as_ref().is_some_and(Ucx::has_cuda)
    }

    pub fn ucx_library(&self) -> Option<&str> {
        self.ucx.as_ref().map(Ucx::library)
    }

    /// The transport transfers to `peer` would use now.
    pub fn transport_for(&self, peer: &str) -> Option<Transport> {
        let p = self.shared.peers.read().get(peer).cloned()?;
        Some(if self.use_ucx(&p) {
            Transport::Ucx
        } else {
            Transport::Tcp
        })
    }

    fn use_ucx(&self, p: &Peer) -> bool {
        (self.prefer_ucx || p.tcp_addr.is_none()) && self.ucx.is_some() && p.ucx_address.is_some()
    }

    /// Stops exporting a region; waits (up to the timeout) for transfers using it. After an
    /// error the region is no longer reachable, but its memory must be kept until the agent
    /// drops.
    pub fn deregister(&self, id: RegionId) -> Result<Region, NetError> {
        let r = self.shared.regions.write().remove(id)?;
        self.shared.caches.write().retain(|c| c.region != id);
        if !self.shared.uses.wait_idle(id, self.shared.timeout) {
            return Err(NetError::Busy(id.0));
        }
        if let Some(u) = &self.ucx {
            self.shared.ucx_keys.write().remove(&id);
            // Done, not queued: after this the rkey peers hold no longer reaches the memory.
            u.unmap(id, self.shared.timeout)?;
        }
        self.publish();
        Ok(r)
    }

    /// Publishes a KV cache layout living in a registered region (geometry checks at handshake).
    pub fn export_cache(&self, cache: ExportedCache) -> Result<(), NetError> {
        let regions = self.shared.regions.read();
        let r = regions
            .get(cache.region)
            .ok_or(kvcore::RegionError::UnknownRegion(cache.region.0))?;
        if cache.layout.span_bytes() > r.len {
            return Err(NetError::Descriptors(format!(
                "cache layout spans {} bytes, region {} has {}",
                cache.layout.span_bytes(),
                cache.region,
                r.len
            )));
        }
        self.shared.caches.write().push(cache);
        Ok(())
    }

    /// Our metadata as a kvcore wire frame.
    pub fn local_metadata(&self) -> Vec<u8> {
        Message::Metadata(self.shared.metadata()).encode()
    }

    /// Loads a peer's metadata frame (from any channel); returns the peer's name.
    pub fn load_remote(&self, frame: &[u8]) -> Result<String, NetError> {
        match Message::decode(frame)? {
            Message::Metadata(md) => self.shared.load(md),
            _ => Err(NetError::Unexpected {
                peer: "metadata frame".into(),
                expected: "agent metadata",
            }),
        }
    }

    /// The side-channel handshake: connects to a peer's listener, authenticates, exchanges
    /// metadata both ways (so the peer can notify us), loads the peer's. Returns its name.
    pub fn connect(&self, addr: SocketAddr) -> Result<String, NetError> {
        let shared = self.shared.clone();
        self.runtime()?.block_on(async move {
            let (conn, md) = tcp::dial(&shared, addr).await?;
            let name = shared.load(md)?;
            if let Some(p) = shared.peers.read().get(&name) {
                p.conns.put(conn);
            }
            Ok(name)
        })
    }

    /// The metadata of a loaded peer.
    /// How many peers' metadata this agent keeps (at most [`MAX_PEERS`]).
    pub fn peer_count(&self) -> usize {
        self.shared.peers.read().len()
    }

    pub fn peer_metadata(&self, peer: &str) -> Option<AgentMetadata> {
        self.shared
            .peers
            .read()
            .get(peer)
            .map(|p| p.metadata.clone())
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

    pub fn forget_peer(&self, peer: &str) {
        self.shared.peers.write().remove(peer);
        if let Some(u) = &self.ucx {
            u.forget(peer);
        }
    }

    fn peer(&self, name: &str) -> Result<Arc<Peer>, NetError> {
        self.shared
            .peers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| NetError::UnknownPeer(name.to_string()))
    }

    fn runtime(&self) -> Result<&tokio::runtime::Runtime, NetError> {
        self.rt.as_ref().ok_or(NetError::Shutdown)
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
        let p = self.peer(peer)?;
        // Both lists are checked here, before anything moves; the peer checks its side again.
        // The use-hold is taken under the same read lock as the bounds check: `deregister`
        // removes a region under the write lock and then waits for holds, so it either sees
        // this hold or this check fails — never a transfer into memory already given back.
        let (resolved, held) = {
            let regions = self.shared.regions.read();
            let resolved: Vec<Resolved> = regions.resolve_all(local)?;
            (
                resolved,
                self.shared.uses.hold(local.iter().map(|d| d.region)),
            )
        };
        p.regions.resolve_all(remote)?;
        // A READ writes our memory, a WRITE reads it: no other transfer may touch bytes one of
        // them writes, until it can no longer touch them.
        let access = if op == Op::Read {
            Access::Write
        } else {
            Access::Read
        };
        let claimed = self
            .shared
            .claims
            .claim(access, &resolved)
            .map_err(NetError::Descriptors)?;
        if let Some(i) = local.iter().zip(remote).position(|(l, r)| l.len != r.len) {
            return Err(NetError::Descriptors(format!(
                "pair {i}: local {} bytes, remote {} bytes",
                local[i].len, remote[i].len
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.clone();
        if let (true, Some(u), Some(addr)) = (self.use_ucx(&p), &self.ucx, &p.ucx_address) {
            let mut ops = Vec::with_capacity(local.len());
            for (l, r) in resolved.iter().zip(remote) {
                let key =
                    p.ucx_keys
                        .get(&r.region)
                        .cloned()
                        .ok_or_else(|| NetError::NoTransport {
                            peer: peer.to_string(),
                            offered: format!("no UCX key for region {}", r.region),
                        })?;
                // Resolved above, so the region exists and base + offset is in range.
                let base = p.regions.get(r.region).map_or(0, |g| g.base);
                ops.push(RmaOp {
                    local: l.addr,
                    remote: base + r.offset,
                    len: l.len,
                    key,
                });
            }
            let bytes: u64 = ops.iter().map(|o| o.len).sum();
            let deadline = Instant::now()
                + self.shared.timeout
                + Duration::from_secs_f64(bytes as f64 / 100e6);
            let frame = notification.map(|payload| self.shared.notification_frame(&p, payload));
            u.transfer(
                op,
                peer.to_string(),
                addr.clone(),
                ops,
                frame,
                deadline,
                Box::new(move |result, released| {
                    if released == crate::ucx::Released::Never {
                        // UCX may still write this memory: its holds are never given back,
                        // so deregistering it reports Busy and the memory is kept.
                        std::mem::forget((held, claimed));
                    } else {
                        drop((held, claimed));
                    }
                    shared.finish(id, result);
                }),
            );
            return Ok(id);
        }
        // The TCP transport moves bytes with the CPU: device memory on either side would be
        // dereferenced as host memory.
        crate::mem::host_only(&resolved, "local")?;
        if let Some(i) = remote.iter().position(|d| {
            p.regions
                .get(d.region)
                .is_some_and(|r| matches!(r.kind, MemKind::Device { .. }))
        }) {
            return Err(NetError::Descriptors(format!(
                "remote descriptor {i} names device memory, which {peer} serves only over UCX with \
                 CUDA; no such UCX path is available"
            )));
        }
        let remote = remote.to_vec();
        self.runtime()?.spawn(async move {
            let result = tcp::transfer(&shared, &p, id, op, resolved, remote, notification).await;
            drop((held, claimed));
            shared.finish(id, result);
        });
        Ok(id)
    }

    /// Sends our metadata to every loaded peer that can be reached over TCP. One-sided
    /// transports (UCX RMA) never ask the target, so after a deregistration this is what makes
    /// peers refuse the stale region; a transfer posted before the update lands may still run.
    pub fn publish(&self) {
        let peers: Vec<Arc<Peer>> = self.shared.peers.read().values().cloned().collect();
        let Ok(rt) = self.runtime() else { return };
        // Every peer at once, under one deadline: a deregistration waits for one timeout at
        // most, not one per peer (a peer that does not answer hears of it when it reconnects).
        let limit = self.shared.timeout;
        let tasks: Vec<_> = peers
            .into_iter()
            .map(|p| {
                let shared = self.shared.clone();
                rt.spawn(async move {
                    let r = match p.flavour {
                        Flavour::Kvferry => tcp::publish(&shared, &p).await,
                        // NIXL adds what it loads to what it knew: forget us first, then reload.
                        Flavour::Nixl {
                            side_channel: Some(addr),
                        } => {
                            let invl = NixlComm::Invalidate(shared.name.clone());
                            let load = NixlComm::Load(shared.nixl_metadata().encode());
                            nixl::send(&shared, addr, &[invl, load]).await
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
        rt.block_on(async move {
            let all = async {
                for t in tasks {
                    let _ = t.await;
                }
            };
            if tokio::time::timeout(limit, all).await.is_err() {
                log::warn!("kvferry: not every peer heard of our exports within {limit:?}");
            }
        });
    }

    /// Our metadata as a stock NIXL agent reads it (`add_remote_agent` / `loadRemoteMD`): the
    /// UCX worker address and every region UCX can reach, with its packed rkey.
    pub fn nixl_metadata(&self) -> Vec<u8> {
        self.shared.nixl_metadata().encode()
    }

    /// Loads a stock NIXL agent's metadata blob (`get_agent_metadata`, full or partial; partial
    /// blobs add to what was loaded, as in NIXL). Returns the agent's name.
    pub fn load_nixl_metadata(&self, blob: &[u8]) -> Result<String, NetError> {
        self.shared.load_nixl(blob, None)
    }

    /// Where NIXL's side channel is served, when `AgentConfig::nixl_listen` asked for it.
    pub fn nixl_listen_addr(&self) -> Option<SocketAddr> {
        self.nixl_listen
    }

    /// NIXL's `fetch_remote_metadata`: asks the NIXL listener at `addr` for its agent's metadata
    /// and loads it. Returns the agent's name.
    pub fn nixl_fetch_metadata(&self, addr: SocketAddr) -> Result<String, NetError> {
        let shared = self.shared.clone();
        self.runtime()?
            .block_on(async move { nixl::fetch(&shared, addr).await })
    }

    /// NIXL's `send_local_metadata`: sends our metadata to the NIXL listener at `addr`.
    pub fn nixl_send_metadata(&self, addr: SocketAddr) -> Result<(), NetError> {
        let shared = self.shared.clone();
        self.runtime()?.block_on(async move {
            let load = NixlComm::Load(shared.nixl_metadata().encode());
            nixl::send(&shared, addr, &[load]).await
        })
    }

    /// NIXL's `invalidate_local_metadata`: tells the NIXL listener at `addr` to forget us.
    pub fn nixl_invalidate(&self, addr: SocketAddr) -> Result<(), NetError> {
        let shared = self.shared.clone();
        self.runtime()?.block_on(async move {
            nixl::send(&shared, addr, &[NixlComm::Invalidate(shared.name.clone())]).await
        })
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
    pub fn poll(&self) -> Vec<TransferDone> {
        self.shared.done.lock().drain(..).collect()
    }

    /// Waits for one transfer; others stay queued for `poll`.
    pub fn wait(&self, id: TransferId, timeout: Duration) -> Option<TransferDone> {
        let deadline = Instant::now() + timeout;
        let mut done = self.shared.done.lock();
        loop {
            if let Some(pos) = done.iter().position(|d| d.id == id) {
                return done.remove(pos);
            }
            if self
                .shared
                .done_cv
                .wait_until(&mut done, deadline)
                .timed_out()
            {
                return done
                    .iter()
                    .position(|d| d.id == id)
                    .and_then(|p| done.remove(p));
            }
        }
    }

    /// Sends opaque bytes to a peer.
    pub fn notify(&self, peer: &str, payload: Vec<u8>) -> Result<(), NetError> {
        let p = self.peer(peer)?;
        if let (true, Some(u), Some(addr)) = (self.use_ucx(&p), &self.ucx, &p.ucx_address) {
            let frame = self.shared.notification_frame(&p, payload);
            let (tx, rx) = std::sync::mpsc::channel();
            let limit = self.shared.timeout;
            u.notify(
                peer.to_string(),
                addr.clone(),
                frame,
                Instant::now() + limit,
                Box::new(move |r, _| {
                    let _ = tx.send(r);
                }),
            );
            return rx
                .recv_timeout(limit + Duration::from_secs(3))
                .map_err(|_| NetError::Timeout {
                    op: "notify",
                    peer: peer.to_string(),
                    secs: limit.as_secs_f64(),
                })?
                .map(|_| ());
        }
        let shared = self.shared.clone();
        self.runtime()?
            .block_on(async move { tcp::notify(&shared, &p, payload).await })
    }

    /// Sets what decides which of the TCP transport's READs and WRITEs a peer may have served
    /// (replacing any earlier check). Without one, anything inside our exports is served.
    pub fn set_serve_check(&self, check: ServeCheck) {
        *self.shared.serve_check.write() = Some(check);
    }

    /// Sets what answers peers' calls (replacing any earlier handler). Without one, every call
    /// is answered with an empty reply.
    pub fn set_call_handler(&self, handler: CallHandler) {
        *self.shared.calls.write() = Some(handler);
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
        let shared = self.shared.clone();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.runtime()?
            .block_on(async move { tcp::call(&shared, &p, id, payload).await })
    }

    /// Notifications received since the last call, as `(sender, bytes)`.
    pub fn notifications(&self) -> Vec<Notification> {
        let mut q = self.shared.notifications.lock();
        self.shared.take_notifications(&mut q)
    }

    /// Waits until at least one notification is queued (or the timeout passes), then drains.
    pub fn wait_notifications(&self, timeout: Duration) -> Vec<Notification> {
        let deadline = Instant::now() + timeout;
        let mut q = self.shared.notifications.lock();
        while q.is_empty() {
            if self
                .shared
                .notif_cv
                .wait_until(&mut q, deadline)
                .timed_out()
            {
                break;
            }
        }
        self.shared.take_notifications(&mut q)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Cancels every task at its next await: after this, nothing touches registered memory.
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
        // Cancels UCX operations in flight and frees the worker.
        self.ucx = None;
    }
}
