//! Leases on a prefill request's blocks: what lets a decoder know that the bytes it read were the
//! request's KV and not another request's that reused the blocks.
//!
//! The prefill engine keeps a finished request's blocks (vLLM does not reuse them) until the
//! connector reports the request in `sending`. The connector reports it only after the request's
//! grant ended, and a grant ends in exactly three ways, each under the connector's state lock:
//! every decode rank released it, a decoder aborted it, or its lease ran out (heartbeats extend
//! it). A grant is named by (request id, generation); generations are never reused, so a grant
//! that ended never becomes live again, and a restarted prefill process knows none of the old
//! ones.
//!
//! A decoder reads the blocks (over TCP or one-sided UCX reads, which the prefill cannot refuse),
//! waits until every read completed, then calls `release` on every prefill rank it read from.
//! The prefill answers `live` only if the grant is live when the call arrives, and the call is
//! sent after the reads completed; so a `live` answer proves the grant was live during every
//! read, the blocks were held by this request throughout, and nothing else wrote them. Only then
//! does the decoder report the blocks loaded; any other answer (`gone`, `pending` past the
//! deadline, an error) makes them load errors, and vLLM recomputes them.
//!
//! A release also names the offer's blocks (a digest of their ids): a decoder whose request
//! carried someone else's block ids under a live grant (a client's hand-made params) is answered
//! `gone`, so it never reports another request's KV as its own.
//!
//! The first decode engine that calls about a grant owns it (calls arrive on authenticated
//! connections, so the caller's name is the one it proved): another engine's calls about it are
//! answered `gone`, so a second decoder (a router's retry) can neither free the blocks under the
//! first one nor read them as good.
//!
//! `pending` means the prefill's worker has not yet heard that the request finished (its
//! scheduler made the offer, the worker learns it a step later): the blocks are held meanwhile,
//! and the decoder asks again until its deadline.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// The prefix of every lease call; the version follows it.
const TAG: &str = "kvferry-lease/1";

/// The most decode ranks one grant waits for.
pub const MAX_DECODE_RANKS: u32 = 4096;

/// Ended grants remembered (to answer `gone` at once rather than `pending`).
const MAX_ENDED: usize = 1 << 16;

/// A grant's name on the wire: the prefill request and the generation of its offer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GrantId {
    pub request: String,
    pub generation: u64,
}

/// What a decoder asks of a prefill rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseCall {
    /// Keep the blocks for another lease period (the decode request is still waiting).
    Extend(GrantId),
    /// Decode rank `rank` of `ranks` is done with the blocks named by `blocks` (see
    /// [`blocks_digest`]); answer whether the grant over those blocks was live.
    Release {
        grant: GrantId,
        rank: u32,
        ranks: u32,
        blocks: u64,
    },
    /// The decode request is gone: free the blocks now.
    Abort(GrantId),
}

/// The prefill's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseReply {
    /// The grant is live (for `Release`: it was live when the call arrived).
    Live,
    /// The worker does not know the grant yet; ask again.
    Pending,
    /// The grant ended (or never existed here): the blocks may have been reused.
    Gone,
}

impl LeaseCall {
    pub fn encode(&self) -> Vec<u8> {
        let (op, g, rank, ranks, blocks) = match self {
            LeaseCall::Extend(g) => ("extend", g, 0, 0, 0),
            LeaseCall::Release {
                grant,
                rank,
                ranks,
                blocks,
            } => ("release", grant, *rank, *ranks, *blocks),
            LeaseCall::Abort(g) => ("abort", g, 0, 0, 0),
        };
        // The request id goes last: it may contain spaces.
        format!(
            "{TAG} {op} {:016x} {rank} {ranks} {blocks:016x} {}",
            g.generation, g.request
        )
        .into_bytes()
    }

    /// Parses a call; anything malformed is `None` (and answered `Gone`).
    pub fn decode(b: &[u8]) -> Option<LeaseCall> {
        let s = std::str::from_utf8(b).ok()?;
        let mut it = s.splitn(7, ' ');
        if it.next()? != TAG {
            return None;
        }
        let op = it.next()?;
        let generation = u64::from_str_radix(it.next()?, 16).ok()?;
        let rank: u32 = it.next()?.parse().ok()?;
        let ranks: u32 = it.next()?.parse().ok()?;
        let blocks = u64::from_str_radix(it.next()?, 16).ok()?;
        let request = it.next()?.to_string();
        if request.is_empty() {
            return None;
        }
        let g = GrantId {
            request,
            generation,
        };
        match op {
            "extend" => Some(LeaseCall::Extend(g)),
            "release" if ranks > 0 && ranks <= MAX_DECODE_RANKS && rank < ranks => {
                Some(LeaseCall::Release {
                    grant: g,
                    rank,
                    ranks,
                    blocks,
                })
            }
            "abort" => Some(LeaseCall::Abort(g)),
            _ => None,
        }
    }
}

impl LeaseReply {
    pub fn encode(self) -> Vec<u8> {
        match self {
            LeaseReply::Live => b"live".to_vec(),
            LeaseReply::Pending => b"pending".to_vec(),
            LeaseReply::Gone => b"gone".to_vec(),
        }
    }

    pub fn decode(b: &[u8]) -> LeaseReply {
        match b {
            b"live" => LeaseReply::Live,
            b"pending" => LeaseReply::Pending,
            _ => LeaseReply::Gone,
        }
    }
}

/// Generations for one scheduler's offers: a random 32-bit instance in the high half (so two
/// processes never share generations) and a counter in the low half (so a worker that saw
/// generation n knows every generation below n of its instance was issued before).
pub struct Generations {
    instance: u64,
    next: u64,
}

impl Default for Generations {
    fn default() -> Self {
        Self::new()
    }
}

impl Generations {
    pub fn new() -> Generations {
        // RandomState is seeded from the OS's randomness once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        let instance = (h.finish() & 0xffff_ffff).max(1);
        Generations { instance, next: 1 }
    }

    pub fn issue(&mut self) -> u64 {
        let g = (self.instance << 32) | (self.next & 0xffff_ffff);
        self.next += 1;
        g
    }
}

/// What a release names the offered blocks by: xxh3 of their ids, in order.
pub fn blocks_digest(blocks: &[u32]) -> u64 {
    let bytes: Vec<u8> = blocks.iter().flat_map(|b| b.to_le_bytes()).collect();
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

struct Grant {
    generation: u64,
    /// [`blocks_digest`] of the blocks offered under it.
    blocks: u64,
    expires: Instant,
    released: BTreeSet<u32>,
    /// The decode engine that first called about it.
    owner: Option<String>,
}

/// The engine an agent name belongs to: the connector names its agents `<engine>-rank<r>`.
pub fn engine_of(agent: &str) -> &str {
    match agent.rsplit_once("-rank") {
        Some((engine, r)) if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) => engine,
        _ => agent,
    }
}

/// Why a grant ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Released,
    Aborted,
}

/// The prefill side's live grants.
pub struct Grants {
    lease: Duration,
    live: HashMap<String, Grant>,
    ended: HashSet<GrantId>,
    ended_order: VecDeque<GrantId>,
    /// The newest generation per scheduler instance the worker was told of.
    newest: HashMap<u64, u64>,
    /// Grants whose blocks are being copied to where decoders read them (see
    /// [`crate::staging`]): answered `pending` until they go live or are abandoned. Bounded by
    /// the copies in flight.
    staging: HashSet<GrantId>,
}

impl Grants {
    pub fn new(lease: Duration) -> Grants {
        Grants {
            lease,
            live: HashMap::new(),
            ended: HashSet::new(),
            ended_order: VecDeque::new(),
            newest: HashMap::new(),
            staging: HashSet::new(),
        }
    }

    /// The engine finished `request` under `generation`, and its blocks are being staged: calls
    /// about the grant are answered `pending` until [`Grants::grant`] (the copy completed) or
    /// [`Grants::abandon`] (it failed). No decoder can see it live before its blocks are there.
    ///
    /// Like [`Grants::grant`], a new offer of the request ends its earlier grant, live or still
    /// staging, at once: one grant per request, whichever way it was offered.
    pub fn stage(&mut self, request: &str, generation: u64) {
        self.end(request);
        let older: Vec<GrantId> = self
            .staging
            .iter()
            .filter(|g| g.request == request)
            .cloned()
            .collect();
        for g in older {
            self.staging.remove(&g);
            self.remember_ended(&g.request, g.generation);
        }
        self.staging.insert(GrantId {
            request: request.to_string(),
            generation,
        });
    }

    /// A staged grant whose copy failed: it never goes live (calls about it are answered
    /// `gone`).
    pub fn abandon(&mut self, request: &str, generation: u64) {
        let id = GrantId {
            request: request.to_string(),
            generation,
        };
        if self.staging.remove(&id) {
            self.remember_ended(request, generation);
        }
    }

    /// The engine finished `request` and offered `blocks` (a [`blocks_digest`]) under
    /// `generation`: hold them.
    pub fn grant(&mut self, request: &str, generation: u64, blocks: u64, now: Instant) {
        self.staging.remove(&GrantId {
            request: request.to_string(),
            generation,
        });
        let n = self.newest.entry(generation >> 32).or_insert(0);
        *n = (*n).max(generation);
        if let Some(old) = self.live.remove(request) {
            self.remember_ended(request, old.generation);
        }
        self.live.insert(
            request.to_string(),
            Grant {
                generation,
                blocks,
                expires: now + self.lease,
                released: BTreeSet::new(),
                owner: None,
            },
        );
    }

    pub fn is_live(&self, request: &str) -> bool {
        self.live.contains_key(request)
    }

    /// A staged grant's copy completed: it goes live, unless it was superseded or abandoned
    /// meanwhile (then false, and nothing changes).
    pub fn grant_staged(
        &mut self,
        request: &str,
        generation: u64,
        blocks: u64,
        now: Instant,
    ) -> bool {
        let id = GrantId {
            request: request.to_string(),
            generation,
        };
        if !self.staging.contains(&id) {
            return false;
        }
        self.grant(request, generation, blocks, now);
        true
    }

    /// Whether any grant of `request` is live or staging: its blocks must stay held.
    pub fn holds(&self, request: &str) -> bool {
        self.live.contains_key(request) || self.staging.iter().any(|g| g.request == request)
    }

    /// Answers a decoder's call from the engine `caller`; returns the reply and, when the call
    /// ended the grant, why.
    pub fn answer(
        &mut self,
        call: &LeaseCall,
        caller: &str,
        now: Instant,
    ) -> (LeaseReply, Option<Ended>) {
        let g = match call {
            LeaseCall::Extend(g) | LeaseCall::Abort(g) => g,
            LeaseCall::Release { grant, .. } => grant,
        };
        let live = self
            .live
            .get_mut(&g.request)
            .filter(|l| l.generation == g.generation && l.expires > now);
        let Some(l) = live else {
            return (self.unknown(g), None);
        };
        match &l.owner {
            None => l.owner = Some(caller.to_string()),
            Some(o) if o != caller => return (LeaseReply::Gone, None),
            Some(_) => {}
        }
        match call {
            LeaseCall::Extend(_) => {
                l.expires = l.expires.max(now + self.lease);
                (LeaseReply::Live, None)
            }
            LeaseCall::Release { blocks, .. } if *blocks != l.blocks => (LeaseReply::Gone, None),
            LeaseCall::Release { rank, ranks, .. } => {
                l.released.insert(*rank);
                if l.released.len() as u32 >= *ranks {
                    self.end(&g.request);
                    (LeaseReply::Live, Some(Ended::Released))
                } else {
                    (LeaseReply::Live, None)
                }
            }
            LeaseCall::Abort(_) => {
                self.end(&g.request);
                (LeaseReply::Live, Some(Ended::Aborted))
            }
        }
    }

    /// A grant this worker does not hold: `Pending` only if its offer may still be on its way to
    /// the worker (a generation newer than any it was told of).
    fn unknown(&self, g: &GrantId) -> LeaseReply {
        if self.staging.contains(g) {
            return LeaseReply::Pending;
        }
        // Generation 0 is never issued (instances start at 1).
        if self.ended.contains(g) || g.generation >> 32 == 0 {
            return LeaseReply::Gone;
        }
        match self.newest.get(&(g.generation >> 32)) {
            Some(&n) if g.generation <= n => LeaseReply::Gone,
            // An instance we never heard of: this process's scheduler before its first offer
            // reached us, or another process's (a restarted prefill): wait, bounded by the
            // decoder's deadline.
            _ => LeaseReply::Pending,
        }
    }

    /// Grants whose lease ran out; they are ended.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let out: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(r, _)| r.clone())
            .collect();
        for r in &out {
            self.end(r);
        }
        out
    }

    fn end(&mut self, request: &str) {
        if let Some(l) = self.live.remove(request) {
            self.remember_ended(request, l.generation);
        }
    }

    fn remember_ended(&mut self, request: &str, generation: u64) {
        let id = GrantId {
            request: request.to_string(),
            generation,
        };
        if self.ended.len() >= MAX_ENDED {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
        self.ended.insert(id.clone());
        self.ended_order.push_back(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gid(r: &str, g: u64) -> GrantId {
        GrantId {
            request: r.into(),
            generation: g,
        }
    }

    #[test]
    fn calls_round_trip_and_garbage_is_refused() {
        for c in [
            LeaseCall::Extend(gid("a b:c", 7)),
            LeaseCall::Release {
                grant: gid("r", u64::MAX),
                rank: 3,
                ranks: 4,
                blocks: 0xfeed,
            },
            LeaseCall::Abort(gid("x", 1)),
        ] {
            assert_eq!(LeaseCall::decode(&c.encode()), Some(c));
        }
        for bad in [
            &b""[..],
            b"kvferry-lease/1 release 01 4 4 00 r",
            b"kvferry-lease/1 release 01 0 0 00 r",
            b"kvferry-lease/1 release 01 0 1 r",
            b"kvferry-lease/1 extend zz 0 0 00 r",
            b"kvferry-lease/1 extend 01 0 0 00 ",
            b"kvferry-lease/2 extend 01 0 0 00 r",
            b"\xff\xfe",
        ] {
            assert_eq!(LeaseCall::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_grant_is_live_until_every_rank_released_and_never_again() {
        let now = Instant::now();
        let mut gens = Generations::new();
        let (g1, g2) = (gens.issue(), gens.issue());
        let mut t = Grants::new(Duration::from_secs(30));
        // Before the worker hears of the offer: pending.
        let rel = |g, rank| LeaseCall::Release {
            grant: gid("r", g),
            rank,
            ranks: 2,
            blocks: 0,
        };
        assert_eq!(t.answer(&rel(g1, 0), "d", now).0, LeaseReply::Pending);
        t.grant("r", g1, 0, now);
        assert_eq!(t.answer(&rel(g1, 0), "d", now), (LeaseReply::Live, None));
        // A duplicate release of rank 0 does not count as rank 1.
        assert_eq!(t.answer(&rel(g1, 0), "d", now), (LeaseReply::Live, None));
        assert_eq!(
            t.answer(&rel(g1, 1), "d", now),
            (LeaseReply::Live, Some(Ended::Released))
        );
        assert_eq!(t.answer(&rel(g1, 1), "d", now).0, LeaseReply::Gone);
        assert_eq!(
            t.answer(&LeaseCall::Extend(gid("r", g1)), "d", now).0,
            LeaseReply::Gone
        );
        // The same request id offered again gets a new generation; the old one stays gone.
        t.grant("r", g2, 0, now);
        assert_eq!(t.answer(&rel(g1, 0), "d", now).0, LeaseReply::Gone);
        assert_eq!(t.answer(&rel(g2, 0), "d", now).0, LeaseReply::Live);
        // A generation below the newest one seen, never granted here: gone, not pending.
        assert_eq!(t.answer(&rel(g1 - 1, 0), "d", now).0, LeaseReply::Gone);
    }

    /// A staged grant is pending while its copy runs, even after a later grant went live
    /// (which would otherwise make an unknown older generation `gone`), then live; an abandoned
    /// one is gone for good.
    #[test]
    fn a_staged_grant_is_pending_until_its_copy_lands_then_live_or_gone() {
        let now = Instant::now();
        let mut gens = Generations::new();
        let (g1, g2, g3) = (gens.issue(), gens.issue(), gens.issue());
        let mut t = Grants::new(Duration::from_secs(30));
        let ext = |r: &str, g| LeaseCall::Extend(gid(r, g));
        t.stage("a", g1);
        t.stage("c", g3);
        // A later grant went live first (staging copies complete in any order).
        t.grant("b", g2, 0, now);
        assert_eq!(t.answer(&ext("a", g1), "d", now).0, LeaseReply::Pending);
        assert_eq!(
            t.answer(&LeaseCall::Abort(gid("a", g1)), "d", now),
            (LeaseReply::Pending, None)
        );
        t.grant("a", g1, 0, now);
        assert_eq!(t.answer(&ext("a", g1), "d", now).0, LeaseReply::Live);
        t.abandon("c", g3);
        assert_eq!(t.answer(&ext("c", g3), "d", now).0, LeaseReply::Gone);
        // Abandoning a grant that is not staging (it went live) changes nothing.
        t.abandon("a", g1);
        assert_eq!(t.answer(&ext("a", g1), "d", now).0, LeaseReply::Live);
    }

    /// A request offered again while staged ends its earlier grant, live or staging, at once;
    /// the earlier copy's completion is stale and installs nothing.
    #[test]
    fn a_new_offer_of_a_staged_request_supersedes_every_earlier_grant() {
        let now = Instant::now();
        let mut gens = Generations::new();
        let (g1, g2, g3) = (gens.issue(), gens.issue(), gens.issue());
        let mut t = Grants::new(Duration::from_secs(30));
        let ext = |g| LeaseCall::Extend(gid("r", g));
        t.stage("r", g1);
        assert!(t.grant_staged("r", g1, 0, now));
        assert_eq!(t.answer(&ext(g1), "d", now).0, LeaseReply::Live);
        // Offered again: the live g1 ends now, not when g2's copy lands.
        t.stage("r", g2);
        assert_eq!(t.answer(&ext(g1), "d", now).0, LeaseReply::Gone);
        assert!(t.holds("r"));
        // Offered a third time while g2 still copies: g2 is gone, and its late copy is stale.
        t.stage("r", g3);
        assert!(!t.grant_staged("r", g2, 0, now));
        assert_eq!(t.answer(&ext(g2), "d", now).0, LeaseReply::Gone);
        assert_eq!(t.answer(&ext(g3), "d", now).0, LeaseReply::Pending);
        assert!(t.grant_staged("r", g3, 0, now));
        assert_eq!(t.answer(&ext(g3), "d", now).0, LeaseReply::Live);
        t.abandon("r", g3);
        assert!(
            t.holds("r"),
            "abandoning a grant that went live changes nothing"
        );
    }

    #[test]
    fn leases_run_out_unless_extended_and_abort_ends_them() {
        let now = Instant::now();
        let lease = Duration::from_secs(10);
        let mut t = Grants::new(lease);
        let mut gens = Generations::new();
        let (a, b) = (gens.issue(), gens.issue());
        t.grant("a", a, 0, now);
        t.grant("b", b, 0, now);
        let later = now + Duration::from_secs(8);
        assert_eq!(
            t.answer(&LeaseCall::Extend(gid("a", a)), "d", later).0,
            LeaseReply::Live
        );
        let expired = t.expire(now + Duration::from_secs(11));
        assert_eq!(expired, vec!["b".to_string()]);
        assert!(t.is_live("a"));
        // An expired grant answers gone even before expire() ran.
        assert_eq!(
            t.answer(&LeaseCall::Extend(gid("a", a)), "d", later + lease + lease)
                .0,
            LeaseReply::Gone
        );
        let mut t = Grants::new(lease);
        t.grant("c", a, 0, now);
        assert_eq!(
            t.answer(&LeaseCall::Abort(gid("c", a)), "d", now),
            (LeaseReply::Live, Some(Ended::Aborted))
        );
        assert!(!t.is_live("c"));
    }

    #[test]
    fn a_grant_belongs_to_the_first_decode_engine_that_calls() {
        assert_eq!(engine_of("decode-a-rank3"), "decode-a");
        assert_eq!(engine_of("decode-rankx"), "decode-rankx");
        assert_eq!(engine_of("plain"), "plain");
        let now = Instant::now();
        let mut t = Grants::new(Duration::from_secs(30));
        let g = Generations::new().issue();
        t.grant("r", g, 0, now);
        let ext = LeaseCall::Extend(gid("r", g));
        assert_eq!(t.answer(&ext, "decode-a", now).0, LeaseReply::Live);
        // A second engine (a retried request elsewhere) can neither extend, release nor abort.
        assert_eq!(t.answer(&ext, "decode-b", now).0, LeaseReply::Gone);
        let abort = LeaseCall::Abort(gid("r", g));
        assert_eq!(t.answer(&abort, "decode-b", now), (LeaseReply::Gone, None));
        assert!(t.is_live("r"));
        assert_eq!(t.answer(&abort, "decode-a", now).1, Some(Ended::Aborted));
    }

    #[test]
    fn a_release_naming_other_blocks_than_the_offer_is_answered_gone() {
        let now = Instant::now();
        let mut t = Grants::new(Duration::from_secs(30));
        let g = Generations::new().issue();
        t.grant("r", g, blocks_digest(&[5, 6, 7]), now);
        let rel = |blocks| LeaseCall::Release {
            grant: gid("r", g),
            rank: 0,
            ranks: 1,
            blocks,
        };
        assert_eq!(
            t.answer(&rel(blocks_digest(&[5, 6, 9])), "d", now).0,
            LeaseReply::Gone
        );
        assert_eq!(
            t.answer(&rel(blocks_digest(&[5, 6])), "d", now).0,
            LeaseReply::Gone
        );
        assert!(t.is_live("r"));
        assert_eq!(
            t.answer(&rel(blocks_digest(&[5, 6, 7])), "d", now),
            (LeaseReply::Live, Some(Ended::Released))
        );
    }
}
