//! Both halves of llm-d's `offloading` protocol in the worker (see [`crate::rendezvous`]): the
//! prefill side posts offers on its board and answers asks for them; the decode side asks a
//! prefill engine for the offer under a key until it has an answer or its deadline passes.
//!
//! Asks to one address run on one thread of their own, so that an address that does not answer
//! (a client may name any `remote_host`) costs its own asks their connect timeouts and nobody
//! else's. The threads are bounded ([`MAX_ASK_ADDRS`]), as are the asks in flight
//! ([`MAX_ASKS`]); beyond either, the ask ends at once without an offer and the prompt is
//! computed here. A thread with nothing to ask for leaves.

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::{ConnectorError, Core, Result};
use crate::rendezvous::{self, Answer, Posted};
use crate::scheduler::RemotePrefiller;
use crate::Connector;

/// Asks in flight at once; more end at once without an offer.
pub(super) const MAX_ASKS: usize = 4096;
/// Prefill addresses asked at once (one thread each); asks to more end at once.
pub(super) const MAX_ASK_ADDRS: usize = 64;
/// The longest pause between two asks for one offer.
const ASK_EVERY: Duration = Duration::from_millis(100);
/// How long an address's thread waits for more asks before it leaves.
const IDLE: Duration = Duration::from_secs(2);

/// The threads asking, by address.
#[derive(Default)]
pub(super) struct Askers {
    by_addr: HashMap<(String, u16), (Sender<Asking>, JoinHandle<()>)>,
}

/// One ask in progress.
pub(super) struct Asking {
    req: String,
    p: RemotePrefiller,
    deadline: Instant,
    /// When to ask next, and how long to wait after that if the answer is still pending.
    next: Instant,
    backoff: Duration,
    last_error: Option<String>,
}

impl Connector {
    /// Decode side, llm-d's `offloading` protocol: asks `p`'s prefill engine for the offer it
    /// posts under `p.key`, again and again, for up to `wait`; the answer comes back from
    /// [`Core::poll`] as `Finished::offers` (see [`crate::rendezvous`]). Returns at once.
    pub fn ask(&self, req: &str, p: &RemotePrefiller, wait: Duration) {
        let core = &self.core;
        {
            let mut st = core.st.lock();
            if st.asking.len() >= MAX_ASKS {
                drop(st);
                log::warn!("kvferry: {MAX_ASKS} asks in flight; {req} is computed here");
                core.ask_ended(req, None);
                return;
            }
            st.asking.insert(req.to_string());
        }
        let now = Instant::now();
        let a = Asking {
            req: req.to_string(),
            p: p.clone(),
            deadline: now + wait,
            next: now,
            backoff: Duration::from_millis(5),
            last_error: None,
        };
        if let Err(why) = core.hand_to_asker(a) {
            log::warn!(
                "kvferry: cannot ask {}:{} for {req}'s offer: {why}",
                p.host,
                p.port
            );
            core.ask_ended(req, None);
        }
    }

    /// Decode side: `req` went away: its ask stops (an offer fetched anyway is still reported,
    /// so that the scheduler aborts its grant).
    pub fn cancel_ask(&self, req: &str) {
        self.core.st.lock().asking.remove(req);
    }
}

impl Core {
    fn hand_to_asker(self: &Arc<Core>, a: Asking) -> std::result::Result<(), String> {
        let mut askers = self.askers.lock();
        let Some(askers) = askers.as_mut() else {
            return Err("shutting down".into());
        };
        let addr = (a.p.host.clone(), a.p.port);
        // Sent under the lock a leaving thread takes to take itself off the map: an ask handed
        // to a thread is never left in a channel nobody reads.
        let a = match askers.by_addr.get(&addr) {
            Some((tx, _)) => match tx.send(a) {
                Ok(()) => return Ok(()),
                Err(e) => e.into_inner(),
            },
            None => a,
        };
        askers.by_addr.retain(|_, (_, t)| !t.is_finished());
        if askers.by_addr.len() >= MAX_ASK_ADDRS {
            return Err(format!(
                "{MAX_ASK_ADDRS} prefill addresses are being asked already"
            ));
        }
        let (tx, rx) = unbounded::<Asking>();
        tx.send(a)
            .map_err(|_| "a new channel refused".to_string())?;
        let c = self.clone();
        let at = addr.clone();
        let t = std::thread::Builder::new()
            .name("kvferry-ask".into())
            .spawn(move || c.run_asks(&at, rx))
            .map_err(|e| format!("cannot start an ask thread: {e}"))?;
        askers.by_addr.insert(addr, (tx, t));
        Ok(())
    }

    /// Stops every ask thread and waits for them (the connector is dropped).
    pub(super) fn stop_asking(&self) {
        let askers = self.askers.lock().take();
        // Dropping the senders ends each thread's loop; joined outside the lock they take.
        for (_, (tx, t)) in askers.map(|a| a.by_addr).unwrap_or_default() {
            drop(tx);
            let _ = t.join();
        }
    }

    /// One address's thread: each of its asks is asked again when due, until it has an answer,
    /// its deadline passed or its request went away.
    fn run_asks(&self, addr: &(String, u16), rx: Receiver<Asking>) {
        let mut asks: Vec<Asking> = Vec::new();
        loop {
            let now = Instant::now();
            let wait = asks
                .iter()
                .map(|a| a.next.saturating_duration_since(now))
                .min()
                .unwrap_or(IDLE);
            match rx.recv_timeout(wait) {
                Ok(a) => asks.push(a),
                Err(RecvTimeoutError::Timeout) if asks.is_empty() => {
                    if self.leave(addr, &rx, &mut asks) {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            asks.extend(rx.try_iter());
            let mut i = 0;
            while i < asks.len() {
                let now = Instant::now();
                let a = &mut asks[i];
                if a.next > now {
                    i += 1;
                    continue;
                }
                if !self.st.lock().asking.contains(&a.req) {
                    asks.swap_remove(i); // cancelled: its request went away
                    continue;
                }
                match self.step_ask(a, now) {
                    Some(offer) => {
                        let a = asks.swap_remove(i);
                        self.ask_ended(&a.req, offer);
                    }
                    None => i += 1,
                }
            }
        }
    }

    /// Takes this idle thread off the map, unless an ask arrived meanwhile (then it is moved to
    /// `asks` and the thread stays).
    fn leave(&self, addr: &(String, u16), rx: &Receiver<Asking>, asks: &mut Vec<Asking>) -> bool {
        let mut askers = self.askers.lock();
        match rx.try_recv() {
            Ok(a) => {
                asks.push(a);
                false
            }
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {
                if let Some(m) = askers.as_mut() {
                    m.by_addr.remove(addr);
                }
                true
            }
        }
    }

    /// One ask; the answer when it is final (an offer, or none to come), `None` to ask again.
    fn step_ask(&self, a: &mut Asking, now: Instant) -> Option<Option<Posted>> {
        let answer = match self.ask_once(&a.p) {
            Ok(answer) => answer,
            Err(e) => {
                // The prefill engine may not be up yet, or may have restarted under a new
                // name: its connection is forgotten, and asked again until the deadline.
                self.forget_addr(&a.p.host, a.p.port);
                a.last_error = Some(e.to_string());
                Answer::Pending
            }
        };
        match answer {
            Answer::Ready(p) => Some(Some(p)),
            Answer::Withdrawn => {
                log::info!(
                    "kvferry: {}:{} will offer nothing under {} for {}; computing it here",
                    a.p.host,
                    a.p.port,
                    a.p.key,
                    a.req
                );
                Some(None)
            }
            Answer::Pending if now < a.deadline => {
                a.next = now + a.backoff;
                a.backoff = (a.backoff * 2).min(ASK_EVERY);
                None
            }
            Answer::Pending => {
                log::warn!(
                    "kvferry: no offer for {} from {}:{} under {} in time{}; computing it here",
                    a.req,
                    a.p.host,
                    a.p.port,
                    a.p.key,
                    a.last_error
                        .as_ref()
                        .map_or(String::new(), |e| format!(" (last error: {e})"))
                );
                Some(None)
            }
        }
    }

    /// Reports an ask's end: an offer is always reported (a cancelled request's is aborted by
    /// the scheduler), no offer only while the request still waits.
    fn ask_ended(&self, req: &str, offer: Option<Posted>) {
        let mut st = self.st.lock();
        let waiting = st.asking.remove(req);
        if offer.is_some() {
            st.counters.offers_fetched += 1;
        } else {
            st.counters.offers_missed += 1;
        }
        if offer.is_some() || waiting {
            st.done.offers.push((req.to_string(), offer));
        }
    }

    /// One ask for the offer under `p.key`, to the prefill engine at `p.host:p.port`.
    fn ask_once(&self, p: &RemotePrefiller) -> Result<Answer> {
        let agent = self
            .agent
            .as_ref()
            .ok_or_else(|| ConnectorError::Config("P/D is not configured".into()))?;
        let peer = self.peer_for(agent, &p.host, p.port)?;
        let reply = agent.call(&peer, rendezvous::encode_ask(&p.key))?;
        Answer::decode(&reply).map_err(|e| ConnectorError::Config(format!("{peer}'s answer: {e}")))
    }

    /// Forgets the connection to `host:port`: the next call connects (and authenticates) anew.
    fn forget_addr(&self, host: &str, port: u16) {
        let Some(addr) = (host, port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
        else {
            return;
        };
        let name = self.st.lock().peers.remove(&addr);
        if let (Some(name), Some(agent)) = (name, &self.agent) {
            agent.forget_peer(&name);
        }
    }

    /// Prefill side: posts the offer made for a decoder that asks by `key` (`None`: none will
    /// come), for as long as its lease.
    pub fn post(&self, key: &str, offer: Option<Posted>) {
        let keep = self.cfg.pd.as_ref().map_or(Duration::ZERO, |p| p.lease);
        let mut st = self.st.lock();
        if offer.is_some() {
            st.counters.offers_posted += 1;
        }
        st.board.post(key, offer, keep, Instant::now());
    }

    /// Prefill side: a decoder's ask for the offer under a key.
    pub(super) fn answer_ask(&self, peer: &str, ask: std::result::Result<&str, String>) -> Vec<u8> {
        match ask {
            Ok(key) => {
                let engine = crate::lease::engine_of(peer);
                self.st
                    .lock()
                    .board
                    .answer(key, engine, Instant::now())
                    .encode()
            }
            Err(why) => {
                log::warn!("kvferry: a malformed ask from {peer}: {why}");
                Answer::Withdrawn.encode()
            }
        }
    }
}
