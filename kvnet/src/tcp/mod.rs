//! The TCP transport and side channel, on tokio. One listener per agent serves both: every
//! connection opens with a challenge, the peer's hello (with a token proof when a token is set)
//! and a metadata exchange, then carries transfer requests and notifications.
//!
//! Bulk bytes travel raw after a request frame: a READ is answered by a completion frame and,
//! if it succeeded, the bytes of every descriptor in order; a WRITE request is followed by the
//! bytes, and answered by a completion frame. The serving side resolves every descriptor against
//! what it exported before touching memory, and sends straight from (or receives straight into)
//! registered memory with vectored I/O.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kvcore::wire::{
    AgentMetadata, Call, Challenge, Completion, Hello, Message, Notification, Op, Proof, Reply,
    Status, TransferNotice, PROTOCOL_VERSION,
};
use kvcore::{Descriptor, Resolved};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::ctx::Ctx;
use crate::error::{code, NetError};
use crate::framing::{io, read_message_capped, write_message, PRE_AUTH_PAYLOAD};
use crate::mem;
use crate::peers::{Peer, MAX_PEERS};
use crate::registry::NoHold;
use crate::transport::{Refused, Transfer, TransportKind};
use kvcore::auth::{Role, Transcript};
use kvcore::{Region, RegionId};
use parking_lot::RwLock;

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

/// Answers a peer's [`crate::Agent::call`]: `(authenticated peer name, payload) -> reply`. It
/// runs on the network runtime, so it must not block.
pub type CallHandler = Arc<dyn Fn(&str, &[u8]) -> Vec<u8> + Send + Sync>;

/// The TCP transport and the side channel it shares a listener with: its connection pools, the
/// hooks that decide what peers may have served, and the runtime its tasks run on.
pub(crate) struct Tcp {
    pub ctx: Arc<Ctx>,
    pub rt: tokio::runtime::Handle,
    me: std::sync::Weak<Tcp>,
    /// Idle connections per peer name.
    pools: Mutex<std::collections::HashMap<String, Arc<ConnPool>>>,
    pub calls: RwLock<Option<CallHandler>>,
    pub serve_check: RwLock<Option<ServeCheck>>,
}

impl Tcp {
    pub fn new(ctx: Arc<Ctx>, rt: tokio::runtime::Handle) -> Arc<Tcp> {
        Arc::new_cyclic(|me| Tcp {
            ctx,
            rt,
            me: me.clone(),
            pools: Mutex::new(Default::default()),
            calls: RwLock::new(None),
            serve_check: RwLock::new(None),
        })
    }

    fn me(&self) -> Result<Arc<Tcp>, NetError> {
        self.me.upgrade().ok_or(NetError::Shutdown)
    }

    /// The pool of connections to `p` at its current address (a peer that moved gets a new,
    /// empty one).
    pub fn pool(&self, p: &Peer) -> Arc<ConnPool> {
        let mut pools = self.pools.lock();
        if let Some(pool) = pools.get(p.name()) {
            if Some(pool.addr) == p.tcp_addr {
                return pool.clone();
            }
        }
        if pools.len() >= MAX_PEERS {
            // Pools of peers no longer known go first; the bound follows the peer table's.
            pools.retain(|n, _| self.ctx.peers.get(n).is_some());
        }
        let pool = Arc::new(ConnPool {
            addr: p
                .tcp_addr
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            idle: Mutex::new(Vec::new()),
        });
        pools.insert(p.name().to_string(), pool.clone());
        pool
    }
}

impl crate::transport::Transport for Tcp {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn map(&self, _id: RegionId, _region: &Region) -> Result<Option<Vec<u8>>, NetError> {
        // Served from the registry's holds: nothing to map, no key to present.
        Ok(None)
    }

    fn unmap(&self, _id: RegionId, _timeout: Duration) -> Result<(), NetError> {
        Ok(())
    }

    fn reaches(&self, p: &Peer) -> bool {
        p.tcp_addr.is_some()
    }

    fn post(&self, t: Transfer) -> Result<(), Refused> {
        // The TCP transport moves bytes with the CPU: device memory on either side would be
        // dereferenced as host memory.
        if let Err(e) = mem::host_only(t.local(), "local") {
            return Err(Box::new((e, t)));
        }
        if let Some(i) = t.remote.iter().position(|d| {
            t.peer
                .regions
                .get(d.region)
                .is_some_and(|r| matches!(r.kind, kvcore::MemKind::Device { .. }))
        }) {
            let e = NetError::Descriptors(format!(
                "remote descriptor {i} names device memory, which {} serves only over UCX with \
                 CUDA; no such UCX path is available",
                t.peer.name()
            ));
            return Err(Box::new((e, t)));
        }
        let tcp = match self.me() {
            Ok(tcp) => tcp,
            Err(e) => return Err(Box::new((e, t))),
        };
        let mut t = FinishOnDrop(Some(t));
        self.rt.spawn(async move {
            let result = match &t.0 {
                Some(x) => transfer(&tcp, x).await,
                None => Err(NetError::Shutdown),
            };
            if let Some(x) = t.0.take() {
                x.finish(result);
            }
        });
        Ok(())
    }

    fn notify(&self, p: &Arc<Peer>, payload: Vec<u8>) -> Result<(), NetError> {
        let (tcp, p) = (self.me()?, p.clone());
        crate::ctx::block_on(&self.rt, async move { notify(&tcp, &p, payload).await })?
    }

    fn close(&self, peer: &str) {
        self.pools.lock().remove(peer);
    }
}

mod channel;

use channel::Channel;

/// A TCP transfer's task owns its transfer through this: dropped unfinished (the runtime shuts
/// down under it), it finishes it as failed. That is sound here, unlike for a transfer in
/// general: the task's futures touch memory only while polled, and each part that may run on
/// has its own share of the hold (`Transfer::share_hold`), so the memory is given back only when
/// the last part is gone.
struct FinishOnDrop(Option<Transfer>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.finish(Err(NetError::Shutdown));
        }
    }
}

/// An authenticated connection to a peer.
pub(crate) struct Conn {
    ch: Channel,
    peer: String,
    /// When it went back to the pool.
    idle_since: std::time::Instant,
}

/// Idle connections to one peer at one address, reused across transfers.
pub(crate) struct ConnPool {
    addr: SocketAddr,
    idle: Mutex<Vec<Conn>>,
}

impl ConnPool {
    pub fn put(&self, mut c: Conn) {
        c.idle_since = std::time::Instant::now();
        let mut idle = self.idle.lock();
        if idle.len() < 64 {
            idle.push(c);
        }
    }

    /// An idle connection the peer still holds open (it closes idle ones after its
    /// `idle_timeout`, whatever ours is): a notification or call sent on a closed one would be
    /// lost with it.
    fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.lock();
        idle.retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT / 2);
        while let Some(c) = idle.pop() {
            if c.ch.is_open() {
                return Some(c);
            }
        }
        None
    }
}

async fn step<T, F: std::future::Future<Output = Result<T, NetError>>>(
    limit: Duration,
    op: &'static str,
    peer: &str,
    f: F,
) -> Result<T, NetError> {
    match timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(NetError::Timeout {
            op,
            peer: peer.to_string(),
            secs: limit.as_secs_f64(),
        }),
    }
}

/// What an unexpected reply means: the peer's refusal (a failed completion), or a protocol error.
fn refusal(peer: &str, m: Message, expected: &'static str) -> NetError {
    match m {
        Message::Completion(Completion {
            status: Status::Failed { code, message },
            ..
        }) => NetError::Remote {
            peer: peer.to_string(),
            code,
            message,
        },
        _ => NetError::Unexpected {
            peer: peer.to_string(),
            expected,
        },
    }
}

/// Connects and runs the client half of the handshake. Returns the connection and the peer's
/// metadata.
pub(crate) async fn dial(tcp: &Tcp, addr: SocketAddr) -> Result<(Conn, AgentMetadata), NetError> {
    let peer = addr.to_string();
    let t = tcp.ctx.timeout;
    let mut stream = step(t, "connect", &peer, async {
        TcpStream::connect(addr)
            .await
            .map_err(|e| io("connect", &peer, e))
    })
    .await?;
    tune(&stream);
    step(t, "handshake", &peer, async {
        // Nothing about us goes out before the listener proved the token: a listener that
        // does not hold it learns our name and nonce, no metadata, keys or addresses.
        let challenge = match read_message_capped(&mut stream, &peer, PRE_AUTH_PAYLOAD).await? {
            Message::Challenge(c) => c,
            _ => {
                return Err(NetError::Unexpected {
                    peer: peer.clone(),
                    expected: "challenge",
                })
            }
        };
        let my_nonce = nonce()?;
        let transcript = Transcript {
            listener_nonce: &challenge.nonce,
            dialer_nonce: &my_nonce,
            listener_name: &challenge.name,
            dialer_name: &tcp.ctx.name,
        };
        let proof = our_proof(tcp, &transcript, Role::Dialer, &peer)?;
        let hello = Message::Hello(Hello {
            name: tcp.ctx.name.clone(),
            protocol_version: PROTOCOL_VERSION,
            nonce: my_nonce,
            proof,
        });
        write_message(&mut stream, &peer, &hello).await?;
        let theirs = match read_message_capped(&mut stream, &peer, PRE_AUTH_PAYLOAD).await? {
            Message::Proof(p) => p.proof,
            other => return Err(refusal(&peer, other, "proof")),
        };
        if let Some(tok) = &tcp.ctx.token {
            if !transcript.verify(tok, Role::Listener, &theirs) {
                let why = if theirs.is_empty() {
                    "the listener proved no token (it has none)"
                } else {
                    "the listener's proof is wrong (another token, or a relay)"
                };
                log::warn!(
                    "kvferry: not talking to {} at {peer}: {why}",
                    challenge.name
                );
                return Err(auth_error(&challenge.name, why));
            }
        }
        // From here on everything is sealed under the session's keys (with a token).
        let mut ch = Channel::new(stream, peer.clone(), seals(tcp, &transcript, Role::Dialer)?);
        let md = match ch.recv().await? {
            Message::Metadata(md) => md,
            other => return Err(refusal(&peer, other, "metadata")),
        };
        if md.protocol_version != PROTOCOL_VERSION {
            return Err(NetError::Version {
                peer: md.name,
                ours: PROTOCOL_VERSION,
                theirs: md.protocol_version,
            });
        }
        if md.name != challenge.name {
            return Err(auth_error(
                &peer,
                &format!(
                    "authenticated as {} but its metadata names {}",
                    challenge.name, md.name
                ),
            ));
        }
        ch.send(&Message::Metadata(tcp.ctx.metadata())).await?;
        Ok((
            Conn {
                ch,
                peer: md.name.clone(),
                idle_since: std::time::Instant::now(),
            },
            md,
        ))
    })
    .await
}

async fn conn_for(tcp: &Tcp, p: &Peer) -> Result<Conn, NetError> {
    if let Some(c) = tcp.pool(p).take() {
        return Ok(c);
    }
    let addr = p.tcp_addr.ok_or_else(|| NetError::NoTransport {
        peer: p.metadata.name.clone(),
        offered: p
            .metadata
            .endpoints
            .iter()
            .map(|e| e.transport.clone())
            .collect::<Vec<_>>()
            .join(","),
    })?;
    let (c, md) = dial(tcp, addr).await?;
    if md.name != p.metadata.name {
        return Err(NetError::Auth {
            peer: p.metadata.name.clone(),
            reason: format!("the agent at {addr} is now {}", md.name),
        });
    }
    if md.regions != p.metadata.regions {
        // Same name, other exports: the peer restarted (or re-registered) since we planned
        // against its metadata. Our descriptors name its old regions: learn the new ones for
        // the next transfer, and fail this one rather than touch whatever now sits there.
        let name = md.name.clone();
        tcp.ctx.load(md, Some(addr.ip()))?;
        return Err(NetError::Unavailable(format!(
            "{name} changed its exports since this transfer was planned (it restarted?)"
        )));
    }
    Ok(c)
}

/// Moves one transfer over up to `conns_per_peer` connections; Ok only if every part succeeded.
/// The parts borrow the transfer's hold, which `t` keeps until its owner finishes it.
async fn transfer(tcp: &Arc<Tcp>, t: &Transfer) -> Result<u64, NetError> {
    let (p, id, op) = (&t.peer, t.id, t.op);
    let total: u64 = t.local().iter().map(|r| r.len).sum();
    let conns = tcp.ctx.conns_per_peer.max(1);
    let (local, remote) = spread_over(t.local(), &t.remote, conns, total);
    let (local, remote) = (&local[..], &remote[..]);
    let parts = conns.min(local.len()).max(1);
    let share = total.div_ceil(parts as u64).max(1);
    // Contiguous runs of pairs of roughly `share` bytes each.
    let mut cuts = vec![0usize];
    let mut acc = 0u64;
    for (i, r) in local.iter().enumerate() {
        acc += r.len;
        if acc >= share * cuts.len() as u64 && i + 1 < local.len() {
            cuts.push(i + 1);
        }
    }
    cuts.push(local.len());
    if cuts.len() == 2 {
        // One part: run here rather than in a task of its own, whose spawn would wake an idle
        // worker for nothing. Its future is this task's, so it ends with the transfer's hold.
        part(tcp, p, id, op, local.to_vec(), remote.to_vec()).await?;
        if let Some(payload) = t.notification.clone() {
            notify(tcp, p, payload).await?;
        }
        return Ok(total);
    }
    let mut tasks = Vec::new();
    for w in cuts.windows(2) {
        if w[0] == w[1] {
            continue;
        }
        let (tcp, p) = (tcp.clone(), p.clone());
        let l = local[w[0]..w[1]].to_vec();
        let r = remote[w[0]..w[1]].to_vec();
        // The part's own share of the hold: its memory stays held until this task is gone,
        // even if the transfer's task is dropped first (at shutdown).
        let hold = t.share_hold();
        tasks.push(tokio::spawn(async move {
            let r = part(&tcp, &p, id, op, l, r).await;
            drop(hold);
            r
        }));
    }
    let mut first_err = None;
    for t in tasks {
        let r = t
            .await
            .unwrap_or_else(|e| Err(NetError::Unavailable(format!("transfer task failed: {e}"))));
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if let Some(payload) = t.notification.clone() {
        notify(tcp, p, payload).await?;
    }
    Ok(total)
}

/// Pieces below this are not split further: a connection's per-part cost would outweigh it.
const SPLIT_MIN: u64 = 64 << 10;

/// The pairs of a transfer, with large ones cut into pieces when there are fewer pairs than
/// connections (one 2 MiB block would otherwise ride one connection while the others idle).
/// Each piece is a contiguous sub-range of its pair on both sides, so pieces stay disjoint and
/// inside what was held and what the peer checks.
fn spread_over(
    local: &[kvcore::Resolved],
    remote: &[Descriptor],
    conns: usize,
    total: u64,
) -> (Vec<kvcore::Resolved>, Vec<Descriptor>) {
    if local.len() >= conns || total < 2 * SPLIT_MIN {
        return (local.to_vec(), remote.to_vec());
    }
    let piece = total.div_ceil(conns as u64).max(SPLIT_MIN);
    let (mut l, mut r) = (Vec::new(), Vec::new());
    for (a, b) in local.iter().zip(remote) {
        let mut off = 0;
        while off < a.len {
            let len = piece.min(a.len - off);
            l.push(kvcore::Resolved {
                kind: a.kind,
                addr: a.addr + off,
                len,
            });
            r.push(Descriptor {
                region: b.region,
                offset: b.offset + off,
                len,
            });
            off += len;
        }
    }
    (l, r)
}

async fn part(
    tcp: &Tcp,
    p: &Peer,
    id: u64,
    op: Op,
    local: Vec<Resolved>,
    remote: Vec<Descriptor>,
) -> Result<(), NetError> {
    // A pooled connection the peer closed while it sat idle (the peer restarted, or dropped
    // it) fails before the peer answered anything: then a fresh connection carries the part.
    // Once the peer's completion came, bytes moved, and a failure is the transfer's.
    for fresh in [false, true] {
        let (mut c, pooled) = conn_or_fresh(tcp, p, fresh).await?;
        match part_on(tcp, &mut c, id, op, &local, &remote).await {
            Ok(()) => {
                tcp.pool(p).put(c);
                return Ok(());
            }
            Err((e, false)) if pooled && is_dead_connection(&e) => {
                log::debug!(
                    "kvferry: a pooled connection to {} was dead ({e}); redialing",
                    c.peer
                );
                continue;
            }
            Err((e, _)) => return Err(e),
        }
    }
    Err(NetError::Shutdown)
}

/// One part on one connection; the flag says whether the peer's completion had arrived.
async fn part_on(
    tcp: &Tcp,
    c: &mut Conn,
    id: u64,
    op: Op,
    local: &[Resolved],
    remote: &[Descriptor],
) -> Result<(), (NetError, bool)> {
    let peer = c.peer.clone();
    let bytes: u64 = local.iter().map(|r| r.len).sum();
    // Room for the data at ≥ 100 MB/s on top of the per-step timeout.
    let limit = tcp.ctx.timeout + Duration::from_secs_f64(bytes as f64 / 100e6);
    let notice = Message::Transfer(TransferNotice {
        transfer_id: id,
        op,
        initiator: tcp.ctx.name.clone(),
        descriptors: remote.to_vec(),
        notification: None,
    });
    let mut answered = false;
    let r = step(
        limit,
        if op == Op::Read { "read" } else { "write" },
        &peer,
        async {
            if op == Op::Write {
                // SAFETY: `local` is a slice of the `Transfer`'s hold, which `transfer` keeps
                // until every part's task ended (it awaits them all, failed or not).
                let slices: Vec<&[u8]> = local.iter().map(|r| unsafe { mem::bytes(r) }).collect();
                c.ch.send_with_bytes(&notice, &slices).await?;
            } else {
                c.ch.send(&notice).await?;
            }
            match c.ch.recv().await? {
                Message::Completion(Completion {
                    status: Status::Ok,
                    transfer_id,
                }) if transfer_id == id => {}
                other => return Err(refusal(&peer, other, "completion")),
            }
            answered = true;
            if op == Op::Read {
                // SAFETY: as above, and the hold is a write hold whose parts are disjoint
                // (each part writes its own descriptors, claimed without overlap).
                let dsts: Vec<&mut [u8]> =
                    local.iter().map(|r| unsafe { mem::bytes_mut(r) }).collect();
                // Bytes that fail their seal fail the transfer: never reported as read.
                c.ch.recv_bytes(dsts).await?;
            }
            Ok(())
        },
    )
    .await;
    r.map_err(|e| (e, answered))
}

/// Sends our current metadata to a peer, so it stops using regions we no longer export.
pub(crate) async fn publish(tcp: &Tcp, p: &Peer) -> Result<(), NetError> {
    let mut c = conn_for(tcp, p).await?;
    let peer = c.peer.clone();
    let m = Message::Metadata(tcp.ctx.metadata());
    step(tcp.ctx.timeout, "publish metadata", &peer, c.ch.send(&m)).await?;
    tcp.pool(p).put(c);
    Ok(())
}

pub(crate) async fn notify(tcp: &Tcp, p: &Peer, payload: Vec<u8>) -> Result<(), NetError> {
    let m = Message::Notification(Notification {
        from: tcp.ctx.name.clone(),
        payload,
    });
    // A pooled connection the peer closed while idle fails the write; a fresh one carries it.
    // Sending a notification twice is impossible here: a failed write was not delivered whole,
    // and the peer's decoder drops a partial frame.
    for fresh in [false, true] {
        let (mut c, pooled) = conn_or_fresh(tcp, p, fresh).await?;
        let peer = c.peer.clone();
        match step(tcp.ctx.timeout, "notify", &peer, c.ch.send(&m)).await {
            Ok(()) => {
                tcp.pool(p).put(c);
                return Ok(());
            }
            Err(e) if pooled && is_dead_connection(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(NetError::Shutdown)
}

/// One call and its reply. A pooled connection that turns out dead before the call was sent
/// (the peer closed it while idle, or restarted) is replaced once; a call whose request went out
/// is never resent, so a handler never sees one call twice.
pub(crate) async fn call(
    tcp: &Tcp,
    p: &Peer,
    call_id: u64,
    payload: Vec<u8>,
) -> Result<Vec<u8>, NetError> {
    let m = Message::Call(Call { call_id, payload });
    for fresh in [false, true] {
        let (mut c, pooled) = conn_or_fresh(tcp, p, fresh).await?;
        let peer = c.peer.clone();
        let sent = step(tcp.ctx.timeout, "call", &peer, c.ch.send(&m)).await;
        match sent {
            Ok(()) => {}
            Err(e) if pooled && is_dead_connection(&e) => continue,
            Err(e) => return Err(e),
        }
        let reply = step(tcp.ctx.timeout, "call reply", &peer, async {
            match c.ch.recv().await? {
                Message::Reply(r) if r.call_id == call_id => Ok(r.payload),
                other => Err(refusal(&peer, other, "reply")),
            }
        })
        .await?;
        tcp.pool(p).put(c);
        return Ok(reply);
    }
    Err(NetError::Shutdown)
}

/// A pooled connection (`true` with it), or a fresh one when `fresh` or none is idle.
async fn conn_or_fresh(tcp: &Tcp, p: &Peer, fresh: bool) -> Result<(Conn, bool), NetError> {
    if !fresh {
        if let Some(c) = tcp.pool(p).take() {
            return Ok((c, true));
        }
    }
    // Drop every idle connection: if one was dead, its siblings from the same peer process are
    // too.
    if fresh {
        while tcp.pool(p).take().is_some() {}
    }
    Ok((conn_for(tcp, p).await?, false))
}

/// Errors a connection the peer already closed gives on its next use.
fn is_dead_connection(e: &NetError) -> bool {
    match e {
        NetError::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::NotConnected
        ),
        _ => false,
    }
}

/// Connections served at once; a connection beyond it is closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 4096;

/// Pooled connections are not reused after this long idle: by then the peer may have closed
/// them (it closes after its `AgentConfig::idle_timeout`, 10 minutes by default).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// Accepts connections until the runtime shuts down.
pub(crate) async fn serve(tcp: Arc<Tcp>, listener: TcpListener) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, addr)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            log::warn!("kvferry: {MAX_CONNECTIONS} connections open; closing one from {addr}");
            drop(stream);
            continue;
        };
        let tcp = tcp.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(&tcp, stream, addr).await {
                log::debug!("kvferry: connection from {addr} ended: {e}");
            }
            drop(slot);
        });
    }
}

/// No Nagle delay, and TCP keepalive: a peer whose host vanished without a FIN is found in
/// about a minute (30 s idle, then 3 probes 10 s apart) on connections that sit pooled or wait
/// for a reply, instead of at the next use or never.
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        log::debug!("kvferry: no TCP keepalive on a side-channel connection: {e}");
    }
}

/// A fresh nonce from the OS. Without OS randomness there is no handshake: a guessable nonce
/// would let a recorded proof be replayed.
fn nonce() -> Result<[u8; 32], NetError> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| {
        NetError::Unavailable(format!("no OS randomness for a handshake nonce: {e}"))
    })?;
    Ok(n)
}

/// The connection's seals (ours to send, ours to receive) when a token authenticated it.
fn seals(
    tcp: &Tcp,
    t: &Transcript<'_>,
    role: Role,
) -> Result<Option<(kvcore::auth::Seal, kvcore::auth::Seal)>, NetError> {
    let Some(tok) = &tcp.ctx.token else {
        return Ok(None);
    };
    let session = t
        .mac(tok, Role::Session)
        .ok_or_else(|| auth_error(t.listener_name, "cannot derive a session key"))?;
    Ok(Some(kvcore::auth::seals(&session, role)))
}

fn our_proof(tcp: &Tcp, t: &Transcript<'_>, role: Role, peer: &str) -> Result<Vec<u8>, NetError> {
    match &tcp.ctx.token {
        Some(tok) => t
            .mac(tok, role)
            .map(|p| p.to_vec())
            .ok_or_else(|| auth_error(peer, "cannot compute a proof")),
        None => Ok(Vec::new()),
    }
}

fn auth_error(peer: &str, reason: &str) -> NetError {
    NetError::Auth {
        peer: peer.to_string(),
        reason: reason.to_string(),
    }
}

async fn refuse(stream: &mut TcpStream, peer: &str, code: u16, message: String) {
    let m = Message::Completion(Completion {
        transfer_id: 0,
        status: Status::Failed { code, message },
    });
    let _ = write_message(stream, peer, &m).await;
}

async fn serve_conn(
    tcp: &Arc<Tcp>,
    mut stream: TcpStream,
    addr: SocketAddr,
) -> Result<(), NetError> {
    tune(&stream);
    let t = tcp.ctx.timeout;
    let who = addr.to_string();
    let nonce = nonce()?;
    let handshake = step(t, "handshake", &who, async {
        let challenge = Message::Challenge(Challenge {
            nonce,
            name: tcp.ctx.name.clone(),
        });
        write_message(&mut stream, &who, &challenge).await?;
        // Before the peer proved itself it gets no more than a small frame's buffer.
        let hello = match read_message_capped(&mut stream, &who, PRE_AUTH_PAYLOAD).await? {
            Message::Hello(h) => h,
            _ => {
                return Err(NetError::Unexpected {
                    peer: who.clone(),
                    expected: "hello",
                })
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            let msg = format!(
                "protocol version: ours is {PROTOCOL_VERSION}, theirs is {}",
                hello.protocol_version
            );
            log::warn!("kvferry: refusing {} at {who}: {msg}", hello.name);
            refuse(&mut stream, &who, code::BAD_REQUEST, msg).await;
            return Err(NetError::Version {
                peer: hello.name,
                ours: PROTOCOL_VERSION,
                theirs: hello.protocol_version,
            });
        }
        let transcript = Transcript {
            listener_nonce: &nonce,
            dialer_nonce: &hello.nonce,
            listener_name: &tcp.ctx.name,
            dialer_name: &hello.name,
        };
        if hello.name == tcp.ctx.name {
            refuse(
                &mut stream,
                &who,
                code::BAD_REQUEST,
                "a peer may not use our name".into(),
            )
            .await;
            return Err(auth_error(&who, "the peer claims our own name"));
        }
        if let Some(tok) = &tcp.ctx.token {
            if !transcript.verify(tok, Role::Dialer, &hello.proof) {
                let reason = if hello.proof.is_empty() {
                    "no token given"
                } else {
                    "wrong token"
                };
                log::warn!("kvferry: refusing {} at {who}: {reason}", hello.name);
                refuse(
                    &mut stream,
                    &who,
                    code::BAD_REQUEST,
                    format!("authentication failed: {reason}"),
                )
                .await;
                return Err(NetError::Auth {
                    peer: hello.name,
                    reason: reason.into(),
                });
            }
        }
        let proof = our_proof(tcp, &transcript, Role::Listener, &who)?;
        write_message(&mut stream, &who, &Message::Proof(Proof { proof })).await?;
        let mut ch = Channel::new(
            stream,
            who.clone(),
            seals(tcp, &transcript, Role::Listener)?,
        );
        ch.send(&Message::Metadata(tcp.ctx.metadata())).await?;
        match ch.recv().await? {
            Message::Metadata(md) if md.name == hello.name => {
                tcp.ctx.load(md, Some(addr.ip()))?;
            }
            _ => {
                return Err(NetError::Unexpected {
                    peer: who.clone(),
                    expected: "metadata",
                })
            }
        }
        ch.peer = hello.name.clone();
        Ok((hello.name, ch))
    })
    .await?;
    let (peer, mut ch) = handshake;
    loop {
        // An idle connection is closed after a while: a peer that vanished without a FIN (its
        // host died, a link went down) does not hold a connection slot for ever.
        let m = match timeout(tcp.ctx.idle_timeout, ch.recv()).await {
            Ok(m) => m?,
            Err(_) => return Ok(()),
        };
        match m {
            Message::Transfer(n) => serve_transfer(tcp, &mut ch, &peer, n).await?,
            Message::Notification(n) => tcp.ctx.inbox.deliver(Notification {
                from: peer.clone(),
                payload: n.payload,
            }),
            Message::Abort(_) => {}
            Message::Call(c) => {
                let handler = tcp.calls.read().clone();
                let payload = handler.map(|h| h(&peer, &c.payload)).unwrap_or_default();
                let reply = Message::Reply(Reply {
                    call_id: c.call_id,
                    payload,
                });
                step(tcp.ctx.timeout, "reply", &peer, ch.send(&reply)).await?;
            }
            // A peer re-publishes its metadata when its exports change (deregistration).
            Message::Metadata(md) if md.name == peer => {
                tcp.ctx.load(md, Some(addr.ip()))?;
            }
            _ => {
                return Err(NetError::Unexpected {
                    peer,
                    expected: "transfer or notification",
                })
            }
        }
    }
}

async fn serve_transfer(
    tcp: &Arc<Tcp>,
    ch: &mut Channel,
    peer: &str,
    n: TransferNotice,
) -> Result<(), NetError> {
    // Saturating: a peer's lengths could sum past u64 (each fits its region, the sum need not).
    let total: u64 = n
        .descriptors
        .iter()
        .fold(0u64, |a, d| a.saturating_add(d.len));
    let limit = tcp.ctx.timeout + Duration::from_secs_f64(total as f64 / 100e6);
    // Serving a READ reads our memory, a WRITE writes it: held and claimed like our own
    // transfers, in the registry's one critical section with the bounds check.
    let access = if n.op == Op::Read {
        mem::Access::Read
    } else {
        mem::Access::Write
    };
    // A claim conflict is waited out (bounded): the peer's previous transfer on these bytes may
    // have completed on its side a moment before our task serving it let go of its claim.
    let until = std::time::Instant::now() + tcp.ctx.timeout.min(Duration::from_secs(2));
    let held = loop {
        match tcp.ctx.exports.try_hold(access, &n.descriptors) {
            Ok(h) => break Ok(h),
            Err(NoHold::Contended(_)) if std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(NoHold::Contended(why)) => break Err(why),
            Err(NoHold::Bounds(e)) => break Err(e.to_string()),
        }
    }
    .and_then(|h| {
        mem::host_only(h.resolved(), "requested")
            .map(|()| h)
            .map_err(|e| e.to_string())
    });
    let check = tcp.serve_check.read().clone();
    let mut _allowed = None;
    let held = match (held, check) {
        (Ok(h), Some(c)) => {
            // Bounded: a peer can hold this connection for at most this long.
            let until = std::time::Instant::now() + tcp.ctx.timeout.min(Duration::from_secs(2));
            loop {
                match c(peer, n.op, &n.descriptors) {
                    Verdict::Serve(guard) => {
                        _allowed = guard;
                        break Ok(h);
                    }
                    Verdict::Refuse(why) => break Err(why),
                    Verdict::NotYet(why) if std::time::Instant::now() >= until => break Err(why),
                    Verdict::NotYet(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
        (r, _) => r,
    };
    let id = n.transfer_id;
    let ok = Message::Completion(Completion {
        transfer_id: id,
        status: Status::Ok,
    });
    step(limit, "serve transfer", peer, async {
        match (n.op, held) {
            (Op::Read, Ok(h)) => {
                // SAFETY: `h` is a live read hold on these descriptors, dropped at the end of
                // this arm, after the last byte went out (or with the future, when the step
                // times out: the slices go with it).
                let slices: Vec<&[u8]> = h
                    .resolved()
                    .iter()
                    .map(|r| unsafe { mem::bytes(r) })
                    .collect();
                ch.send_with_bytes(&ok, &slices).await?;
            }
            (Op::Write, Ok(h)) => {
                // SAFETY: `h` is a live write hold, used by this task alone; `dsts` is consumed
                // by `recv_bytes` before `h` is dropped below (or both go with the future).
                let dsts: Vec<&mut [u8]> = h
                    .resolved()
                    .iter()
                    .map(|r| unsafe { mem::bytes_mut(r) })
                    .collect();
                // A run that fails its seal fails the connection: the writer hears of it.
                ch.recv_bytes(dsts).await?;
                // Our memory is no longer touched: let go of it before the writer hears the
                // WRITE completed, so its next transfer on these bytes finds them free.
                drop(h);
                ch.send(&ok).await?;
            }
            (op, Err(e)) => {
                log::warn!("kvferry: refusing a transfer from {peer}: {e}");
                let m = Message::Completion(Completion {
                    transfer_id: id,
                    status: Status::Failed {
                        code: code::BAD_DESCRIPTOR,
                        message: e.to_string(),
                    },
                });
                ch.send(&m).await?;
                if op == Op::Write {
                    // The refused bytes follow on this connection, as many as the peer claims:
                    // close it rather than read them (a claim is no bound).
                    return Err(NetError::Unexpected {
                        peer: peer.to_string(),
                        expected: "a write we could accept",
                    });
                }
                return Ok(());
            }
        }
        if let Some(payload) = n.notification {
            tcp.ctx.inbox.deliver(Notification {
                from: peer.to_string(),
                payload,
            });
        }
        Ok(())
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_pair_is_cut_into_contiguous_pieces_that_cover_it_exactly() {
        let host = kvcore::MemKind::Host;
        let l = [kvcore::Resolved {
            kind: host,
            addr: 1 << 20,
            len: (2 << 20) + 5,
        }];
        let r = [Descriptor {
            region: kvcore::RegionId(3),
            offset: 4096,
            len: (2 << 20) + 5,
        }];
        let (pl, pr) = spread_over(&l, &r, 4, l[0].len);
        assert_eq!(pl.len(), 4, "one piece per connection");
        let (mut addr, mut off) = (l[0].addr, r[0].offset);
        for (a, b) in pl.iter().zip(&pr) {
            assert_eq!(
                (a.addr, b.offset, a.len, b.region),
                (addr, off, b.len, r[0].region)
            );
            addr += a.len;
            off += b.len;
        }
        assert_eq!(addr, l[0].addr + l[0].len);
        // Enough pairs for the connections, or too small to be worth it: left alone.
        assert_eq!(spread_over(&l, &r, 1, l[0].len).0.len(), 1);
        let small = [kvcore::Resolved {
            kind: host,
            addr: 0,
            len: SPLIT_MIN,
        }];
        assert_eq!(spread_over(&small, &r[..], 4, SPLIT_MIN).0.len(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri has no TCP socket options")]
    fn side_channel_sockets_get_keepalive_and_no_delay() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let s = TcpStream::connect(l.local_addr().expect("addr"))
                .await
                .expect("connect");
            tune(&s);
            let r = socket2::SockRef::from(&s);
            assert!(r.keepalive().expect("keepalive"));
            assert_eq!(
                r.tcp_keepalive_time().expect("time"),
                Duration::from_secs(30)
            );
            assert!(s.nodelay().expect("nodelay"));
        });
    }
}
