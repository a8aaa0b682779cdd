//! What the agent's components share: who we are, the export registry, the peer table and the
//! inbox. Each part keeps its own invariants under its own lock (the registry all of memory's);
//! no transport is reachable from here, so transports and the side channels depend on this and
//! never on each other or on the agent.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kvcore::wire::{AgentMetadata, Endpoint, PROTOCOL_VERSION};
use parking_lot::RwLock;

use crate::error::NetError;
use crate::inbox::Inbox;
use crate::peers::{Flavour, Peers};
use crate::registry::Exports;
use crate::transport::TransportKind;

pub(crate) struct Ctx {
    pub name: String,
    pub token: Option<Vec<u8>>,
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub conns_per_peer: usize,
    pub exports: Exports,
    pub peers: Peers,
    pub inbox: Inbox,
    /// How peers reach us, one per transport running (set while the agent starts).
    endpoints: RwLock<Vec<Endpoint>>,
    /// NIXL interop was opted into (its side channel served, or a NIXL agent loaded): only then
    /// are stock NIXL agents' unauthenticated notifications taken.
    nixl: AtomicBool,
}

impl Ctx {
    pub fn new(
        name: String,
        token: Option<Vec<u8>>,
        timeout: Duration,
        idle_timeout: Duration,
        conns_per_peer: usize,
    ) -> Ctx {
        Ctx {
            name,
            token,
            timeout,
            idle_timeout,
            conns_per_peer: conns_per_peer.max(1),
            exports: Exports::default(),
            peers: Peers::default(),
            inbox: Inbox::default(),
            endpoints: RwLock::new(Vec::new()),
            nixl: AtomicBool::new(false),
        }
    }

    pub fn enable_nixl(&self) {
        self.nixl.store(true, Ordering::Release);
    }

    pub fn nixl_enabled(&self) -> bool {
        self.nixl.load(Ordering::Acquire)
    }

    pub fn add_endpoint(&self, kind: TransportKind, address: Vec<u8>) {
        self.endpoints.write().push(Endpoint {
            transport: kind.name().into(),
            address,
        });
    }

    pub fn endpoint(&self, kind: TransportKind) -> Option<Vec<u8>> {
        self.endpoints
            .read()
            .iter()
            .find(|e| e.transport == kind.name())
            .map(|e| e.address.clone())
    }

    pub fn metadata(&self) -> AgentMetadata {
        let (regions, caches) = self.exports.snapshot();
        AgentMetadata {
            name: self.name.clone(),
            protocol_version: PROTOCOL_VERSION,
            endpoints: self.endpoints.read().clone(),
            regions,
            caches,
        }
    }

    /// Loads (or refreshes) a kvferry peer from its metadata; returns its name. `via`: the
    /// address the metadata came from (the one we dialed, or the dialer's), which stands in
    /// for an unspecified address (`0.0.0.0`, `::`) the peer listens on: an agent bound to
    /// every interface does not know which one its peers reach it on.
    pub fn load(&self, mut md: AgentMetadata, via: Option<IpAddr>) -> Result<String, NetError> {
        if let Some(ip) = via {
            for e in &mut md.endpoints {
                if e.transport != TransportKind::Tcp.name() {
                    continue;
                }
                let Some(mut a) = std::str::from_utf8(&e.address)
                    .ok()
                    .and_then(|s| s.parse::<SocketAddr>().ok())
                else {
                    continue;
                };
                if a.ip().is_unspecified() {
                    a.set_ip(ip);
                    e.address = a.to_string().into_bytes();
                }
            }
        }
        self.peers.load(&self.name, md, Flavour::Kvferry)
    }
}

thread_local! {
    /// Set on the network runtime's own threads (the callbacks a ServeCheck or CallHandler runs
    /// in): blocking one of them on the runtime's work could stop the runtime for good.
    static NETWORK_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one of the network runtime's.
pub(crate) fn mark_network_thread() {
    NETWORK_THREAD.with(|t| t.set(true));
}

/// Runs `f` on `rt` and waits for it. Called from inside another tokio runtime (a user's async
/// code), where tokio refuses to block a worker thread, it waits on a thread of its own instead.
/// Called from the network runtime's own threads it refuses: both workers could end up waiting
/// on work only they can drive.
pub(crate) fn block_on<F>(rt: &tokio::runtime::Handle, f: F) -> Result<F::Output, NetError>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    if NETWORK_THREAD.with(|t| t.get()) {
        return Err(NetError::Unavailable(
            "a blocking agent call from the network runtime's own thread (a ServeCheck or \
             CallHandler): it would wait on work only that runtime can do"
                .into(),
        ));
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Ok(rt.block_on(f));
    }
    Ok(std::thread::scope(|s| {
        match s.spawn(|| rt.block_on(f)).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }))
}
