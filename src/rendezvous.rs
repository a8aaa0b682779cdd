//! llm-d's `offloading` protocol over kvferry's pull: a router sends the prompt to a prefill and
//! a decode engine at once and names one key (`kv_request_id`) to both. The prefill engine posts
//! its offer under the key when the request finishes; the decode engine asks the prefill engine
//! for it until it is there, the prefill says there will be none, or the decoder's own deadline
//! passes. From there on it is an ordinary offer: the same grant, lease, pull and release as under
//! `nixlv2` (see [`crate::lease`]).
//!
//! Why this never loads wrong KV:
//! - Nothing is claimed before the offer arrives. The decode request waits (vLLM's scheduler
//!   skips it while the connector cannot say how many tokens it has), so a prefill that fails,
//!   is slow or never comes costs the wait and then local compute, never a load error.
//! - The offer carries a digest of the prompt's token ids as the prefill engine computed them.
//!   The decoder accepts it only for its own prompt: a key reused by another request, a router
//!   that sent the two engines different prompts or a different chat template, are refused.
//! - What the blocks hold is proven as before: the release after the reads says whether the grant
//!   was live throughout, and names the offer's blocks.
//! - The first decode engine that fetches an offer owns it; another engine asking under the same
//!   key (a router's retry) is told there is none and computes locally, instead of pulling under
//!   a grant the lease would refuse it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::scheduler::MAX_GROUPS;
use crate::RemoteParams;

// 2: offers carry their KV cache group count.
const TAG: &[u8] = b"kvferry-offer/2\n";

/// The longest key accepted (llm-d sends a UUID).
pub const MAX_KEY: usize = 256;
/// The most blocks an offer may name on the wire.
pub const MAX_OFFER_BLOCKS: usize = 1 << 20;
/// Offers kept on the prefill side at once; the oldest go first (their grants expire anyway).
const MAX_POSTED: usize = 1 << 16;
/// How long a "there will be none" is remembered.
const KEEP_WITHDRAWN: Duration = Duration::from_secs(120);

/// What the decoder learns in answer to its ask.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// The prefill engine has not finished the request (or never heard of the key): ask again.
    Pending,
    /// The prefill engine will offer nothing under this key (its request failed or was aborted,
    /// or another decode engine took the offer).
    Withdrawn,
    Ready(Posted),
}

/// An offer as posted under a key.
#[derive(Clone, Debug, PartialEq)]
pub struct Posted {
    /// The offer (`num_tokens`: the prompt tokens its blocks hold).
    pub remote: RemoteParams,
    /// [`prompt_digest`] of the prefill request's prompt.
    pub prompt: u64,
}

/// What a decoder proves its prompt by: a digest of its token ids and of what else makes the
/// KV of the same tokens differ (`extra`: the LoRA adapter, the cache salt, multimodal inputs'
/// hashes and places, as the engine names them). The same on both engines whatever their hash
/// seeds, unlike vLLM's block hashes.
pub fn prompt_digest(tokens: &[u32], extra: &[u8]) -> u64 {
    let mut bytes = Vec::with_capacity(16 + tokens.len() * 4 + extra.len());
    bytes.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    bytes.extend_from_slice(&(extra.len() as u64).to_le_bytes());
    bytes.extend_from_slice(extra);
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// The decoder's ask: the key.
pub fn encode_ask(key: &str) -> Vec<u8> {
    let mut b = TAG.to_vec();
    b.extend_from_slice(key.as_bytes());
    b
}

/// The key of an ask, if `payload` is one (other payloads are the lease protocol's).
pub fn decode_ask(payload: &[u8]) -> Option<Result<&str, String>> {
    let key = payload.strip_prefix(TAG)?;
    Some(match std::str::from_utf8(key) {
        Ok(k) if !k.is_empty() && k.len() <= MAX_KEY => Ok(k),
        Ok(k) => Err(format!("a key of {} bytes", k.len())),
        Err(_) => Err("a key that is not UTF-8".into()),
    })
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    // Strings longer than u16 are refused when posted; this truncation never happens.
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s);
}

impl Answer {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = TAG.to_vec();
        match self {
            Answer::Pending => b.push(b'p'),
            Answer::Withdrawn => b.push(b'n'),
            Answer::Ready(p) => {
                let r = &p.remote;
                b.push(b'r');
                b.extend_from_slice(&r.grant.to_le_bytes());
                b.extend_from_slice(&r.expires_unix.to_bits().to_le_bytes());
                b.extend_from_slice(&r.tp_size.to_le_bytes());
                b.extend_from_slice(&r.port.to_le_bytes());
                b.extend_from_slice(&r.num_tokens.to_le_bytes());
                b.extend_from_slice(&p.prompt.to_le_bytes());
                b.extend_from_slice(&(r.block_ids.len() as u32).to_le_bytes());
                for id in &r.block_ids {
                    b.extend_from_slice(&id.to_le_bytes());
                }
                b.extend_from_slice(&r.groups.to_le_bytes());
                put_str(&mut b, &r.host);
                put_str(&mut b, &r.engine_id);
                put_str(&mut b, &r.request_id);
            }
        }
        b
    }

    /// Parses a prefill engine's answer; every length is checked against what is left before
    /// anything is allocated.
    pub fn decode(b: &[u8]) -> Result<Answer, String> {
        let mut r = Reader(b.strip_prefix(TAG).ok_or("not an offer answer")?);
        let kind = r.take(1)?[0];
        if kind != b'r' && !r.0.is_empty() {
            return Err("trailing bytes after an answer".into());
        }
        match kind {
            b'p' => Ok(Answer::Pending),
            b'n' => Ok(Answer::Withdrawn),
            b'r' => {
                let grant = r.u64()?;
                let expires_unix = f64::from_bits(r.u64()?);
                let tp_size = r.u32()?;
                let port = u16::from_le_bytes(r.array()?);
                let num_tokens = r.u32()?;
                let prompt = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_OFFER_BLOCKS {
                    return Err(format!("an offer of {n} blocks"));
                }
                let ids = r.take(n * 4)?;
                let block_ids = ids
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let groups = r.u32()?;
                if groups == 0 || groups > MAX_GROUPS || n % groups as usize != 0 {
                    return Err(format!("{n} blocks in {groups} KV cache groups"));
                }
                let host = r.str()?;
                let engine_id = r.str()?;
                let request_id = r.str()?;
                if !r.0.is_empty() {
                    return Err("trailing bytes after an offer".into());
                }
                Ok(Answer::Ready(Posted {
                    remote: RemoteParams {
                        host,
                        port,
                        request_id,
                        engine_id,
                        tp_size,
                        block_ids,
                        groups,
                        grant,
                        expires_unix,
                        num_tokens,
                    },
                    prompt,
                }))
            }
            k => Err(format!("answer kind {k}")),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("{n} bytes wanted, {} left", self.0.len()));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn str(&mut self) -> Result<String, String> {
        let n = u16::from_le_bytes(self.array()?) as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string that is not UTF-8".into())
    }
}

/// The prefill side's offers by key, bounded in count and time.
#[derive(Default)]
pub struct Board {
    /// Key -> (the offer, or none to come; the engine that fetched it first; until when kept;
    /// the post's number).
    posted: HashMap<String, Entry>,
    /// Keys in the order posted, with the post's number (a key posted again is a new post).
    order: VecDeque<(String, u64)>,
    posts: u64,
    /// The prefill request of each posted offer -> its key (to withdraw it when its grant ends).
    by_request: HashMap<String, String>,
}

type Entry = (Option<Posted>, Option<String>, Instant, u64);

impl Board {
    /// Posts what the prefill engine offers under `key` (`None`: nothing will come), kept for
    /// `keep` (the lease: past it the grant is gone anyway). A key posted again replaces the
    /// earlier post.
    pub fn post(&mut self, key: &str, offer: Option<Posted>, keep: Duration, now: Instant) {
        if key.is_empty() || key.len() > MAX_KEY {
            return;
        }
        let offer = offer.filter(|p| {
            let r = &p.remote;
            let fits = r.block_ids.len() <= MAX_OFFER_BLOCKS
                && [&r.host, &r.engine_id, &r.request_id]
                    .iter()
                    .all(|s| s.len() <= u16::MAX as usize);
            if !fits {
                log::warn!("kvferry: an offer too large to post under {key}");
            }
            fits
        });
        let keep = if offer.is_some() {
            keep
        } else {
            KEEP_WITHDRAWN
        };
        self.expire(now);
        while self.posted.len() >= MAX_POSTED {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.remove_post(&old);
        }
        if self.order.len() >= 2 * MAX_POSTED {
            // Superseded posts of keys posted again (any client may repeat a key).
            let posted = &self.posted;
            self.order
                .retain(|(k, n)| posted.get(k).is_some_and(|e| e.3 == *n));
        }
        self.posts += 1;
        if let Some(p) = &offer {
            self.by_request
                .insert(p.remote.request_id.clone(), key.to_string());
        }
        self.posted
            .insert(key.to_string(), (offer, None, now + keep, self.posts));
        self.order.push_back((key.to_string(), self.posts));
    }

    fn remove_post(&mut self, (key, n): &(String, u64)) {
        if self.posted.get(key).is_some_and(|e| e.3 == *n) {
            if let Some((Some(p), ..)) = self.posted.remove(key) {
                if self.by_request.get(&p.remote.request_id) == Some(key) {
                    self.by_request.remove(&p.remote.request_id);
                }
            }
        }
    }

    /// The grant of prefill request `req` ended (released, aborted, expired, replaced): its
    /// offer is withdrawn, so that an ask under its key again (the same decoder retrying, or two
    /// of its requests under one key) is told there is none instead of getting a grant whose
    /// release would answer `gone`.
    pub fn withdraw_request(&mut self, req: &str) {
        let Some(key) = self.by_request.remove(req) else {
            return;
        };
        if let Some(e) = self.posted.get_mut(&key) {
            if e.0.as_ref().is_some_and(|p| p.remote.request_id == req) {
                e.0 = None;
            }
        }
    }

    /// Answers `engine`'s ask for `key`.
    pub fn answer(&mut self, key: &str, engine: &str, now: Instant) -> Answer {
        self.expire(now);
        if let Some(n) = self.posted.get(key).filter(|e| e.2 <= now).map(|e| e.3) {
            self.remove_post(&(key.to_string(), n));
        }
        match self.posted.get_mut(key) {
            None => Answer::Pending,
            Some((None, ..)) => Answer::Withdrawn,
            Some((Some(p), owner, ..)) => match owner {
                Some(o) if o != engine => Answer::Withdrawn,
                _ => {
                    *owner = Some(engine.to_string());
                    Answer::Ready(p.clone())
                }
            },
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((k, n)) = self.order.front() {
            match self.posted.get(k) {
                Some(e) if e.3 == *n && e.2 > now => break,
                _ => {
                    if let Some(old) = self.order.pop_front() {
                        self.remove_post(&old);
                    }
                }
            }
        }
        // Entries behind a longer-lived one may have expired too: `answer` checks each entry's
        // own time, and they are bounded by MAX_POSTED and swept when they reach the front.
    }

    pub fn len(&self) -> usize {
        self.posted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.posted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn posted(blocks: Vec<u32>) -> Posted {
        Posted {
            remote: RemoteParams {
                host: "10.0.0.1".into(),
                port: 7777,
                request_id: "cmpl-1 with spaces".into(),
                engine_id: "pre".into(),
                tp_size: 2,
                block_ids: blocks,
                groups: 1,
                grant: 0xfeed,
                expires_unix: 1.8e9,
                num_tokens: 64,
            },
            prompt: prompt_digest(&[1, 2, 3], b""),
        }
    }

    #[test]
    fn answers_round_trip_and_every_truncation_is_an_error() {
        for a in [
            Answer::Pending,
            Answer::Withdrawn,
            Answer::Ready(posted(vec![3, 1, 4, 1, 5])),
        ] {
            let b = a.encode();
            assert_eq!(Answer::decode(&b), Ok(a.clone()));
            for cut in TAG.len()..b.len() {
                assert!(Answer::decode(&b[..cut]).is_err(), "cut at {cut} of {a:?}");
            }
        }
        let mut b = Answer::Withdrawn.encode();
        b.push(0);
        assert!(Answer::decode(&b).is_err());
        assert!(Answer::decode(&Answer::Pending.encode()[..3]).is_err());
        // A block count beyond the bound is refused before anything is allocated.
        let mut big = Answer::Ready(posted(vec![])).encode();
        let at = TAG.len() + 1 + 8 + 8 + 4 + 2 + 4 + 8;
        big[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Answer::decode(&big)
            .expect_err("refused")
            .contains("blocks"));
    }

    #[test]
    fn an_offer_keeps_its_kv_cache_groups_and_a_list_they_do_not_split_is_refused() {
        let mut p = posted(vec![0, 7, 8, 9, 10, 11]);
        p.remote.groups = 2;
        let a = Answer::Ready(p.clone());
        let decoded = Answer::decode(&a.encode());
        assert_eq!(decoded, Ok(a));
        for groups in [0, 4, MAX_GROUPS + 1] {
            let mut bad = p.clone();
            bad.remote.groups = groups;
            assert!(
                Answer::decode(&Answer::Ready(bad).encode()).is_err(),
                "{groups} groups"
            );
        }
    }

    #[test]
    fn asks_carry_bounded_keys_and_other_payloads_are_not_asks() {
        assert_eq!(decode_ask(&encode_ask("k-1")), Some(Ok("k-1")));
        assert!(decode_ask(b"kvferry-lease/1 extend").is_none());
        assert!(matches!(decode_ask(&encode_ask("")), Some(Err(_))));
        assert!(matches!(
            decode_ask(&encode_ask(&"x".repeat(MAX_KEY + 1))),
            Some(Err(_))
        ));
    }

    #[test]
    fn the_board_answers_pending_until_posted_and_gives_an_offer_to_one_engine_only() {
        let now = Instant::now();
        let mut b = Board::default();
        assert_eq!(b.answer("k", "dec-a", now), Answer::Pending);
        b.post("k", Some(posted(vec![1, 2])), Duration::from_secs(30), now);
        assert_eq!(
            b.answer("k", "dec-a", now),
            Answer::Ready(posted(vec![1, 2]))
        );
        // Its own ask again (a lost reply) gets it again; another engine does not.
        assert!(matches!(b.answer("k", "dec-a", now), Answer::Ready(_)));
        assert_eq!(b.answer("k", "dec-b", now), Answer::Withdrawn);
        b.post("gone", None, Duration::from_secs(30), now);
        assert_eq!(b.answer("gone", "dec-a", now), Answer::Withdrawn);
        // Past the lease the offer is forgotten (the grant ended too).
        let later = now + Duration::from_secs(31);
        assert_eq!(b.answer("k", "dec-a", later), Answer::Pending);
    }

    #[test]
    fn an_offer_is_withdrawn_when_its_grant_ends() {
        let now = Instant::now();
        let mut b = Board::default();
        b.post("k", Some(posted(vec![1])), Duration::from_secs(30), now);
        assert!(matches!(b.answer("k", "d", now), Answer::Ready(_)));
        b.withdraw_request("someone else");
        assert!(matches!(b.answer("k", "d", now), Answer::Ready(_)));
        b.withdraw_request("cmpl-1 with spaces");
        assert_eq!(b.answer("k", "d", now), Answer::Withdrawn);
        assert!(b.by_request.is_empty());
    }

    #[test]
    fn the_board_is_bounded() {
        let now = Instant::now();
        let mut b = Board::default();
        for i in 0..MAX_POSTED + 10 {
            b.post(&format!("k{i}"), None, Duration::from_secs(30), now);
        }
        assert_eq!(b.len(), MAX_POSTED);
        assert!(b.by_request.is_empty());
        assert_eq!(b.answer("k0", "d", now), Answer::Pending);
        assert_eq!(
            b.answer(&format!("k{}", MAX_POSTED + 9), "d", now),
            Answer::Withdrawn
        );
    }

    #[test]
    fn a_key_posted_again_is_a_new_post_and_repeats_stay_bounded() {
        let now = Instant::now();
        let mut b = Board::default();
        b.post("k", None, Duration::from_secs(30), now);
        b.post("k", Some(posted(vec![1])), Duration::from_secs(30), now);
        assert!(matches!(b.answer("k", "d", now), Answer::Ready(_)));
        for _ in 0..3 * MAX_POSTED {
            b.post("k", None, Duration::from_secs(30), now);
        }
        assert_eq!(b.len(), 1);
        assert!(b.order.len() <= 2 * MAX_POSTED);
        assert_eq!(b.answer("k", "d", now), Answer::Withdrawn);
    }

    #[test]
    fn the_prompt_digest_tells_prompts_apart() {
        assert_ne!(
            prompt_digest(&[1, 2, 3], b""),
            prompt_digest(&[1, 2, 4], b"")
        );
        assert_ne!(prompt_digest(&[], b""), prompt_digest(&[0], b""));
        assert_eq!(
            prompt_digest(&[7; 100], b"x"),
            prompt_digest(&[7; 100], b"x")
        );
        // The same tokens under another LoRA adapter or image are another prompt.
        assert_ne!(
            prompt_digest(&[7; 100], b"lora-a"),
            prompt_digest(&[7; 100], b"lora-b")
        );
    }
}
