//! The peers whose metadata we loaded, bounded in number and in bytes: a flood of handshakes
//! under fresh names or oversized metadata cannot grow our memory without bound.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use kvcore::wire::{AgentMetadata, PROTOCOL_VERSION};
use kvcore::{RegionId, RegionTable};
use parking_lot::RwLock;

use crate::error::NetError;
use crate::transport::TransportKind;

/// Peers an agent keeps metadata for. A new name beyond it makes room by forgetting the peer
/// loaded longest ago that nothing uses; when all are in use, it is refused.
pub const MAX_PEERS: usize = 4096;

/// Metadata bytes kept per peer (its encoded size): a region table of 65k regions with keys
/// fits; more is refused.
pub const MAX_PEER_METADATA: usize = 8 << 20;

/// Which protocol a peer speaks: kvferry's frames, or stock NIXL's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    Kvferry,
    /// `side_channel`: where its NIXL listener is, when we know (to re-publish our metadata).
    Nixl {
        side_channel: Option<SocketAddr>,
    },
}

/// A peer whose metadata was loaded. Immutable: a reload replaces the entry, so a transfer
/// planned against one entry keeps seeing that entry's regions.
pub(crate) struct Peer {
    pub flavour: Flavour,
    pub metadata: AgentMetadata,
    pub regions: RegionTable,
    pub tcp_addr: Option<SocketAddr>,
    pub ucx_address: Option<Arc<Vec<u8>>>,
    pub ucx_keys: HashMap<RegionId, Arc<Vec<u8>>>,
    /// When its metadata was (last) loaded: the oldest idle peer makes room for a new one.
    pub loaded_at: Instant,
}

impl Peer {
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
}

#[derive(Default)]
pub(crate) struct Peers {
    map: RwLock<HashMap<String, Arc<Peer>>>,
}

impl Peers {
    pub fn get(&self, name: &str) -> Option<Arc<Peer>> {
        self.map.read().get(name).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Peer>> {
        self.map.read().values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn remove(&self, name: &str) {
        self.map.write().remove(name);
    }

    /// Removes `name` if its entry passes `pred` (checked and removed under one lock).
    pub fn remove_if(&self, name: &str, pred: impl FnOnce(&Peer) -> bool) -> bool {
        let mut map = self.map.write();
        if map.get(name).is_some_and(|p| pred(p)) {
            map.remove(name);
            return true;
        }
        false
    }

    /// Loads (or refreshes) a peer from its metadata; returns its name. `ours` is our own name,
    /// which no peer may use.
    pub fn load(
        &self,
        ours: &str,
        md: AgentMetadata,
        flavour: Flavour,
    ) -> Result<String, NetError> {
        if md.name == ours {
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
        let mut regions = RegionTable::new();
        for r in &md.regions {
            regions.insert_with_id(r.id, r.region)?;
        }
        let endpoint = |t: TransportKind| md.endpoints.iter().find(|e| e.transport == t.name());
        let tcp_addr = endpoint(TransportKind::Tcp)
            .and_then(|e| std::str::from_utf8(&e.address).ok()?.parse().ok());
        let ucx_address = endpoint(TransportKind::Ucx).map(|e| Arc::new(e.address.clone()));
        let ucx_keys = md
            .regions
            .iter()
            .filter_map(|r| {
                let k = r
                    .keys
                    .iter()
                    .find(|k| k.transport == TransportKind::Ucx.name())?;
                Some((r.id, Arc::new(k.key.clone())))
            })
            .collect();
        let name = md.name.clone();
        let mut peers = self.map.write();
        if !peers.contains_key(&name) && peers.len() >= MAX_PEERS {
            // Room for a new peer: the one loaded longest ago that nothing uses right now (no
            // transfer or call holds its entry). It reconnects if it comes back.
            // A NIXL agent (unauthenticated: anyone reaching the NIXL side channel) makes room
            // only among NIXL agents, never by pushing out a peer that authenticated.
            let nixl = matches!(flavour, Flavour::Nixl { .. });
            let idle = peers
                .iter()
                .filter(|(_, p)| Arc::strong_count(p) == 1)
                .filter(|(_, p)| !nixl || matches!(p.flavour, Flavour::Nixl { .. }))
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
        // NIXL's side channel is unauthenticated: it never replaces a kvferry peer's entry. A
        // kvferry handshake (authenticated) does replace a NIXL agent's entry of that name, so
        // squatting a name through the NIXL side channel cannot lock its real owner out.
        if let Some(old) = peers.get(&name) {
            match (old.flavour, flavour) {
                (Flavour::Kvferry, Flavour::Nixl { .. }) => {
                    return Err(NetError::Descriptors(format!(
                        "peer name {name:?} belongs to an authenticated kvferry peer"
                    )))
                }
                (Flavour::Nixl { .. }, Flavour::Kvferry) => log::warn!(
                    "kvferry: {name} authenticated; it replaces the NIXL agent loaded under its name"
                ),
                _ => {}
            }
        }
        peers.insert(
            name.clone(),
            Arc::new(Peer {
                flavour,
                metadata: md,
                regions,
                tcp_addr,
                ucx_address,
                ucx_keys,
                loaded_at: Instant::now(),
            }),
        );
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(name: &str) -> AgentMetadata {
        AgentMetadata {
            name: name.into(),
            protocol_version: PROTOCOL_VERSION,
            endpoints: Vec::new(),
            regions: Vec::new(),
            caches: Vec::new(),
        }
    }

    const NIXL: Flavour = Flavour::Nixl { side_channel: None };

    #[test]
    fn unauthenticated_nixl_loads_never_displace_or_lock_out_kvferry_peers() {
        let p = Peers::default();
        p.load("us", md("decode-0"), Flavour::Kvferry)
            .expect("kvferry");
        // A NIXL load cannot take an authenticated peer's name...
        assert!(p.load("us", md("decode-0"), NIXL).is_err());
        assert_eq!(p.get("decode-0").map(|x| x.flavour), Some(Flavour::Kvferry));
        // ...and a name squatted through the NIXL side channel goes to its real owner.
        p.load("us", md("decode-1"), NIXL).expect("nixl");
        p.load("us", md("decode-1"), Flavour::Kvferry)
            .expect("authenticated wins");
        assert_eq!(p.get("decode-1").map(|x| x.flavour), Some(Flavour::Kvferry));
        // A flood of NIXL names makes room among NIXL agents only (too slow under Miri, which
        // runs the rest).
        if cfg!(miri) {
            return;
        }
        for i in 0..MAX_PEERS + 10 {
            let _ = p.load("us", md(&format!("flood-{i}")), NIXL);
        }
        assert!(p.len() <= MAX_PEERS);
        for name in ["decode-0", "decode-1"] {
            assert_eq!(
                p.get(name).map(|x| x.flavour),
                Some(Flavour::Kvferry),
                "{name}"
            );
        }
    }
}
