//! Talking to stock NIXL agents: our regions and UCX address as NIXL metadata, NIXL metadata as a
//! peer, and NIXL's socket side channel (LOAD / SEND / INVL), both serving and asking. The bytes
//! are `kvcore::nixl`'s; the transfers themselves are the UCX backend's, unchanged.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use kvcore::nixl::{
    NixlComm, NixlConn, NixlDesc, NixlMem, NixlMetadata, NixlSection, COMM_LEN_BYTES,
    MAX_COMM_FRAME,
};
use kvcore::wire::{AgentMetadata, Endpoint, ExportedRegion, TransportKey, PROTOCOL_VERSION};
use kvcore::{MemKind, Region, RegionId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::ctx::Ctx;
use crate::error::NetError;
use crate::framing::io;
use crate::peers::Flavour;
use crate::transport::TransportKind;

/// NIXL's name for its UCX backend (sections and connection info are keyed by it).
pub const UCX_BACKEND: &str = "UCX";

fn nixl_mem(kind: MemKind) -> Option<(NixlMem, u64)> {
    match kind {
        MemKind::Host | MemKind::PinnedHost => Some((NixlMem::Dram, 0)),
        MemKind::Device { ordinal } => Some((NixlMem::Vram, u64::from(ordinal))),
        // UCX cannot reach file regions; NIXL serves files through other backends.
        MemKind::File { .. } => None,
    }
}

fn mem_kind(mem: NixlMem, dev_id: u64) -> Result<Option<MemKind>, NetError> {
    Ok(match mem {
        // NIXL's devId of host memory is a free tag; host addresses are one space.
        NixlMem::Dram => Some(MemKind::Host),
        NixlMem::Vram => Some(MemKind::Device {
            ordinal: u32::try_from(dev_id)
                .map_err(|_| NetError::Descriptors(format!("VRAM device id {dev_id}")))?,
        }),
        NixlMem::Blk | NixlMem::Obj | NixlMem::File => None,
    })
}

impl Ctx {
    pub fn nixl_metadata(&self) -> NixlMetadata {
        let (regions, _) = self.exports.snapshot();
        let mut sections: Vec<NixlSection> = Vec::new();
        for e in &regions {
            let r = &e.region;
            let key = e
                .keys
                .iter()
                .find(|k| k.transport == TransportKind::Ucx.name())
                .map(|k| &k.key);
            let (Some((mem, dev_id)), Some(key)) = (nixl_mem(r.kind), key) else {
                continue;
            };
            let desc = NixlDesc {
                addr: r.base,
                len: r.len,
                dev_id,
                meta: key.clone(),
            };
            match sections.iter_mut().find(|s| s.mem == mem) {
                Some(s) => s.descs.push(desc),
                None => sections.push(NixlSection {
                    backend: UCX_BACKEND.into(),
                    mem,
                    descs: vec![desc],
                }),
            }
        }
        NixlMetadata {
            agent: self.name.clone(),
            conns: self
                .endpoint(TransportKind::Ucx)
                .iter()
                .map(|a| NixlConn {
                    backend: UCX_BACKEND.into(),
                    info: a.clone(),
                })
                .collect(),
            sections,
        }
    }

    /// Loads a NIXL agent's metadata. As in NIXL, a blob adds to what was loaded before for that
    /// agent (partial metadata may omit the connection info); `side_channel` is remembered for
    /// re-publishing ours.
    pub fn load_nixl(
        &self,
        blob: &[u8],
        side_channel: Option<SocketAddr>,
    ) -> Result<String, NetError> {
        let md = NixlMetadata::decode(blob)?;
        self.enable_nixl();
        let old = self.peers.get(&md.agent);
        let old = old.filter(|p| matches!(p.flavour, Flavour::Nixl { .. }));
        let address = match (md.conn(UCX_BACKEND), &old) {
            (Some(a), _) => a.to_vec(),
            (None, Some(p)) => match &p.ucx_address {
                Some(a) => a.as_ref().clone(),
                None => return Err(no_ucx(&md.agent)),
            },
            (None, None) => return Err(no_ucx(&md.agent)),
        };
        // Overlaps and the region cap are checked by `load_peer`, as for any peer's metadata.
        let mut seen = HashSet::new();
        let mut regions: Vec<ExportedRegion> = Vec::new();
        let mut add = |region: Region, key: Vec<u8>| {
            // NIXL re-sends what it sent before; an identical range is not a new one.
            if !seen.insert(region) {
                return;
            }
            regions.push(ExportedRegion {
                id: RegionId(regions.len() as u32),
                region,
                keys: vec![TransportKey {
                    transport: TransportKind::Ucx.name().into(),
                    key,
                }],
            });
        };
        // What this blob says first: a range NIXL registered again comes with its new rkey,
        // which must win over the one we knew (the old key is for a registration NIXL dropped).
        for s in md.sections.iter().filter(|s| s.backend == UCX_BACKEND) {
            for d in &s.descs {
                let Some(kind) = mem_kind(s.mem, d.dev_id)? else {
                    continue;
                };
                let region = Region {
                    kind,
                    base: d.addr,
                    len: d.len,
                };
                add(region, d.meta.clone());
            }
        }
        if let Some(p) = &old {
            for r in &p.metadata.regions {
                let key = r.keys.first().map(|k| k.key.clone()).unwrap_or_default();
                add(r.region, key);
            }
        }
        let side_channel = side_channel.or(match old.map(|p| p.flavour) {
            Some(Flavour::Nixl { side_channel }) => side_channel,
            _ => None,
        });
        let am = AgentMetadata {
            name: md.agent,
            protocol_version: PROTOCOL_VERSION,
            endpoints: vec![Endpoint {
                transport: TransportKind::Ucx.name().into(),
                address,
            }],
            regions,
            caches: Vec::new(),
        };
        self.peers
            .load(&self.name, am, Flavour::Nixl { side_channel })
    }

    /// NIXL's INVL: forgets a NIXL peer (never a kvferry one: the channel is unauthenticated).
    fn invalidate_nixl(&self, name: &str) {
        if self
            .peers
            .remove_if(name, |p| matches!(p.flavour, Flavour::Nixl { .. }))
        {
            log::info!("kvferry: NIXL agent {name} invalidated its metadata");
        }
    }
}

fn no_ucx(agent: &str) -> NetError {
    NetError::NoTransport {
        peer: agent.to_string(),
        offered: "NIXL metadata without UCX connection info".into(),
    }
}

/// Reads one side-channel command; `None` at a clean end of stream. Waiting for a command is
/// unbounded (NIXL keeps these connections open); a started frame must finish within `limit`.
async fn read_comm(
    s: &mut TcpStream,
    limit: std::time::Duration,
    peer: &str,
) -> Result<Option<NixlComm>, NetError> {
    let mut prefix = [0u8; COMM_LEN_BYTES];
    let n = s
        .read(&mut prefix)
        .await
        .map_err(|e| io("read NIXL frame", peer, e))?;
    if n == 0 {
        return Ok(None);
    }
    let body = async {
        s.read_exact(&mut prefix[n..]).await?;
        let len = NixlComm::frame_len(prefix, MAX_COMM_FRAME)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = bounded(limit, "read NIXL frame", peer, body).await?;
    Ok(Some(NixlComm::decode(&body)?))
}

/// An I/O step with a deadline; both failures name the step and the peer.
async fn bounded<T>(
    limit: std::time::Duration,
    op: &'static str,
    peer: &str,
    f: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, NetError> {
    timeout(limit, f)
        .await
        .map_err(|_| NetError::Timeout {
            op,
            peer: peer.to_string(),
            secs: limit.as_secs_f64(),
        })?
        .map_err(|e| io(op, peer, e))
}

async fn write_comm(
    s: &mut TcpStream,
    limit: std::time::Duration,
    peer: &str,
    c: &NixlComm,
) -> Result<(), NetError> {
    bounded(limit, "write NIXL frame", peer, s.write_all(&c.encode())).await
}

pub(crate) async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let Ok((stream, addr)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_conn(&ctx, stream, addr).await {
                log::warn!("kvferry: NIXL side channel from {addr}: {e}");
            }
        });
    }
}

async fn serve_conn(ctx: &Ctx, mut s: TcpStream, addr: SocketAddr) -> Result<(), NetError> {
    let peer = addr.to_string();
    while let Some(cmd) = read_comm(&mut s, ctx.timeout, &peer).await? {
        match cmd {
            // A bad blob is refused (and said so); the connection stays, as in NIXL.
            NixlComm::Load(blob) => match ctx.load_nixl(&blob, None) {
                Ok(name) => log::info!("kvferry: loaded NIXL agent {name} from {peer}"),
                Err(e) => log::warn!("kvferry: NIXL metadata from {peer} refused: {e}"),
            },
            NixlComm::Send => {
                let md = NixlComm::Load(ctx.nixl_metadata().encode());
                write_comm(&mut s, ctx.timeout, &peer, &md).await?;
            }
            NixlComm::Invalidate(name) => ctx.invalidate_nixl(&name),
        }
    }
    Ok(())
}

async fn dial(ctx: &Ctx, addr: SocketAddr) -> Result<TcpStream, NetError> {
    let peer = addr.to_string();
    let s = bounded(
        ctx.timeout,
        "connect (NIXL side channel)",
        &peer,
        TcpStream::connect(addr),
    )
    .await?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Sends commands to a NIXL listener, in order, on one connection.
pub(crate) async fn send(ctx: &Ctx, addr: SocketAddr, cmds: &[NixlComm]) -> Result<(), NetError> {
    let mut s = dial(ctx, addr).await?;
    let peer = addr.to_string();
    for c in cmds {
        write_comm(&mut s, ctx.timeout, &peer, c).await?;
    }
    let _ = s.shutdown().await;
    Ok(())
}

/// Asks a NIXL listener for its metadata and loads it.
pub(crate) async fn fetch(ctx: &Ctx, addr: SocketAddr) -> Result<String, NetError> {
    let mut s = dial(ctx, addr).await?;
    let peer = addr.to_string();
    write_comm(&mut s, ctx.timeout, &peer, &NixlComm::Send).await?;
    // One deadline for the whole exchange: a listener that keeps sending other commands does
    // not keep us here.
    let deadline = tokio::time::Instant::now() + ctx.timeout;
    loop {
        let reply = tokio::time::timeout_at(deadline, read_comm(&mut s, ctx.timeout, &peer))
            .await
            .map_err(|_| NetError::Timeout {
                op: "fetch NIXL metadata",
                peer: peer.clone(),
                secs: ctx.timeout.as_secs_f64(),
            })??;
        match reply {
            Some(NixlComm::Load(blob)) => return ctx.load_nixl(&blob, Some(addr)),
            // Anything else is not the answer; NIXL sends nothing else here.
            Some(other) => log::debug!("kvferry: NIXL listener {peer} sent {other:?}"),
            None => {
                return Err(NetError::Unexpected {
                    peer,
                    expected: "NIXL metadata (the listener closed the connection)",
                })
            }
        }
    }
}
